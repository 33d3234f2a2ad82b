//! PostgreSQL's binary COPY format, written by hand for the audit_logs row.
//!
//! Encoding straight into one buffer avoids the per-value `ToSql` dispatch
//! of a generic binary-copy writer; see `benches/codecs.rs` for the figures.

use std::net::IpAddr;

use bytes::{BufMut, BytesMut};

use crate::event::{AuthEvent, EpochMicros};

/// Columns in the order the encoder writes them; the COPY statement in
/// `queries` names the same list.
pub const COLUMNS: &[&str] = &[
    "event_id",
    "created_at",
    "received_at",
    "action",
    "user_id",
    "username",
    "ip_address",
    "user_agent",
    "session_id",
    "request_id",
    "metadata",
    "kafka_partition",
    "kafka_offset",
];

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// PostgreSQL's own address family codes in the inet wire format.
const PGSQL_AF_INET: u8 = 2;
const PGSQL_AF_INET6: u8 = 3;
const JSONB_VERSION: u8 = 1;

/// One row as it goes to PostgreSQL.
pub struct RowRef<'a> {
    pub event: &'a AuthEvent,
    pub received_at: EpochMicros,
    pub partition: i32,
    pub offset: i64,
}

/// Builds one COPY stream: header, rows, trailer.
pub struct CopyEncoder {
    buf: BytesMut,
    rows: usize,
}

impl CopyEncoder {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = BytesMut::with_capacity(bytes.max(64));
        buf.put_slice(SIGNATURE);
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyEncoder { buf, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn push(&mut self, row: &RowRef<'_>) {
        let e = row.event;
        let b = &mut self.buf;
        b.put_i16(COLUMNS.len() as i16);
        b.put_i32(16);
        b.put_slice(e.event_id.as_bytes());
        put_timestamptz(b, e.occurred_at);
        put_timestamptz(b, row.received_at);
        put_text(b, Some(&e.action));
        put_text(b, e.user_id.as_deref());
        put_text(b, e.username.as_deref());
        put_inet(b, e.ip_address);
        put_text(b, e.user_agent.as_deref());
        put_text(b, e.session_id.as_deref());
        put_text(b, e.request_id.as_deref());
        put_metadata(b, &e.metadata);
        b.put_i32(4);
        b.put_i32(row.partition);
        b.put_i32(8);
        b.put_i64(row.offset);
        self.rows += 1;
    }

    /// Closes the stream and returns its bytes.
    pub fn finish(mut self) -> BytesMut {
        self.buf.put_i16(-1);
        self.buf
    }
}

/// A binary COPY stream for any small table: the caller writes each row's
/// field count, then its fields with the `put_*` functions.
pub struct CopyStream {
    pub buf: BytesMut,
}

impl CopyStream {
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.put_slice(SIGNATURE);
        buf.put_i32(0);
        buf.put_i32(0);
        CopyStream { buf }
    }

    pub fn row(&mut self, fields: i16) -> &mut BytesMut {
        self.buf.put_i16(fields);
        &mut self.buf
    }

    pub fn finish(mut self) -> BytesMut {
        self.buf.put_i16(-1);
        self.buf
    }
}

impl Default for CopyStream {
    fn default() -> Self {
        Self::new()
    }
}

/// PostgreSQL type oids of the array elements written below.
pub(crate) const OID_TEXT: u32 = 25;
pub(crate) const OID_INT8: u32 = 20;
pub(crate) const OID_TIMESTAMPTZ: u32 = 1184;
pub(crate) const OID_INET: u32 = 869;

/// A one-dimensional array field: `put_element` writes each element's
/// length and bytes (or -1 for NULL) exactly as a field would be written.
pub(crate) fn put_array<T>(b: &mut BytesMut, oid: u32, items: &[T], mut put_element: impl FnMut(&mut BytesMut, &T)) {
    let len_at = b.len();
    b.put_i32(0); // patched below
    b.put_i32(1); // dimensions
    b.put_i32(1); // may hold NULLs (a flag PostgreSQL does not require to be exact)
    b.put_u32(oid);
    b.put_i32(items.len() as i32);
    b.put_i32(1); // lower bound
    for item in items {
        put_element(b, item);
    }
    let len = (b.len() - len_at - 4) as i32;
    b[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

pub(crate) fn put_i64(b: &mut BytesMut, v: i64) {
    b.put_i32(8);
    b.put_i64(v);
}

pub(crate) fn put_null(b: &mut BytesMut) {
    b.put_i32(-1);
}

pub(crate) fn put_timestamptz(b: &mut BytesMut, micros: EpochMicros) {
    b.put_i32(8);
    b.put_i64(micros - PG_EPOCH_OFFSET_MICROS);
}

pub(crate) fn put_text(b: &mut BytesMut, value: Option<&str>) {
    match value {
        Some(s) => {
            b.put_i32(s.len() as i32);
            b.put_slice(s.as_bytes());
        }
        None => put_null(b),
    }
}

pub(crate) fn put_inet(b: &mut BytesMut, ip: Option<IpAddr>) {
    match ip {
        Some(IpAddr::V4(v4)) => {
            b.put_i32(8);
            b.put_slice(&[PGSQL_AF_INET, 32, 0, 4]);
            b.put_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            b.put_i32(20);
            b.put_slice(&[PGSQL_AF_INET6, 128, 0, 16]);
            b.put_slice(&v6.octets());
        }
        None => put_null(b),
    }
}

/// An empty map is stored as NULL; otherwise a JSON object of strings.
fn put_metadata(b: &mut BytesMut, metadata: &[(String, String)]) {
    if metadata.is_empty() {
        return put_null(b);
    }
    let len_at = b.len();
    b.put_i32(0); // patched below
    b.put_u8(JSONB_VERSION);
    b.put_u8(b'{');
    for (i, (k, v)) in metadata.iter().enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        put_json_string(b, k);
        b.put_u8(b':');
        put_json_string(b, v);
    }
    b.put_u8(b'}');
    let len = (b.len() - len_at - 4) as i32;
    b[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_json_string(b: &mut BytesMut, s: &str) {
    b.put_u8(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match c {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        b.put_slice(&bytes[start..i]);
        match escape {
            Some(e) => b.put_slice(e),
            None => b.put_slice(format!("\\u{c:04x}").as_bytes()),
        }
        start = i + 1;
    }
    b.put_slice(&bytes[start..]);
    b.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped_like_serde_json() {
        for s in ["plain", "quote\"back\\slash", "ctl\u{1}\n\t\r", "ünïcödé ✓", ""] {
            let mut b = BytesMut::new();
            put_json_string(&mut b, s);
            assert_eq!(std::str::from_utf8(&b).unwrap(), serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn metadata_is_a_jsonb_object() {
        let mut b = BytesMut::new();
        put_metadata(&mut b, &[("a".into(), "1".into()), ("b\"".into(), "x".into())]);
        let len = i32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
        assert_eq!(len, b.len() - 4);
        assert_eq!(b[4], JSONB_VERSION);
        let v: serde_json::Value = serde_json::from_slice(&b[5..]).unwrap();
        assert_eq!(v, serde_json::json!({"a": "1", "b\"": "x"}));
    }

    #[test]
    fn timestamps_shift_to_the_postgres_epoch() {
        let mut b = BytesMut::new();
        put_timestamptz(&mut b, PG_EPOCH_OFFSET_MICROS + 5);
        assert_eq!(&b[..], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 5]);
    }
}
