//! The record format of the routing topic (`src/detect/routing.rs`).
//!
//! One record carries the events of one ingest batch that go to one
//! routing partition for one routed rule key, each with the events-topic
//! partition and offset it came from (`schemas/routed_events.avsc`, Avro
//! single-object encoding). One record per event and key, as before, cost
//! a produce future, an acknowledgement and a Kafka record each: the
//! system-wide key alone sent every failed login to one partition as a
//! record of its own. Records written that way by an earlier version are
//! still read (`crate::ingest::routed`).

use std::sync::OnceLock;

use apache_avro::Schema;

use super::DecodeError;
use super::avro::{Cursor, schema_fingerprint, single_object_frame, write_bytes, write_long};

pub const ROUTED_EVENTS_SCHEMA: &str = include_str!("../../schemas/routed_events.avsc");

/// Fingerprint of [`ROUTED_EVENTS_SCHEMA`] (single-object encoding).
pub fn routed_events_fingerprint() -> u64 {
    static FINGERPRINT: OnceLock<u64> = OnceLock::new();
    *FINGERPRINT.get_or_init(|| {
        let schema = Schema::parse_str(ROUTED_EVENTS_SCHEMA).expect("built-in schema is valid");
        schema_fingerprint(&schema)
    })
}

/// One event of a routed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedEntry<'a> {
    pub source_partition: i32,
    pub source_offset: i64,
    /// The event as an Avro body of `schemas/auth_event.avsc`.
    pub event: &'a [u8],
}

/// Builds one routed record, entry by entry.
#[derive(Debug, Default)]
pub struct RoutedRecordWriter {
    entries: Vec<u8>,
    count: usize,
}

impl RoutedRecordWriter {
    pub fn push(&mut self, source_partition: i32, source_offset: i64, event_body: &[u8]) {
        write_long(&mut self.entries, i64::from(source_partition));
        write_long(&mut self.entries, source_offset);
        write_bytes(&mut self.entries, event_body);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the entries so far (the record is about this size).
    pub fn encoded_len(&self) -> usize {
        self.entries.len()
    }

    /// The record: single-object framing, then the array as one block.
    pub fn finish(self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() + 12);
        if self.count > 0 {
            write_long(&mut body, self.count as i64);
            body.extend_from_slice(&self.entries);
        }
        write_long(&mut body, 0);
        single_object_frame(routed_events_fingerprint(), &body)
    }
}

/// The entries of a routed record's body (after the single-object header).
pub fn decode_routed_entries(body: &[u8]) -> Result<Vec<RoutedEntry<'_>>, DecodeError> {
    let mut input = Cursor::new(body);
    let mut entries = Vec::new();
    loop {
        let mut count = input.long()?;
        if count == 0 {
            break;
        }
        if count < 0 {
            // A negative count is followed by the block's size in bytes.
            input.len()?;
            count = count.checked_neg().ok_or_else(|| input.error("block count out of range"))?;
        }
        for _ in 0..count {
            let source_partition = input.long()?;
            let source_partition = i32::try_from(source_partition)
                .map_err(|_| input.error(format!("source partition {source_partition} is not an int")))?;
            let source_offset = input.long()?;
            let event = input.bytes()?;
            entries.push(RoutedEntry { source_partition, source_offset, event });
        }
    }
    if input.remaining() > 0 {
        return Err(input.error("trailing bytes after the routed record"));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::avro::{auth_event_fingerprint, split_single_object};
    use apache_avro::types::Value;

    #[test]
    fn a_record_round_trips_and_is_plain_avro_of_its_schema() {
        let mut writer = RoutedRecordWriter::default();
        writer.push(3, 41, b"first");
        writer.push(0, 1 << 40, b"");
        writer.push(7, 0, &[0xff; 300]);
        assert_eq!(writer.len(), 3);
        let record = writer.finish();

        let (fingerprint, body) = split_single_object(&record).unwrap();
        assert_eq!(fingerprint, routed_events_fingerprint());
        assert_ne!(fingerprint, auth_event_fingerprint());
        let entries = decode_routed_entries(body).unwrap();
        assert_eq!(
            entries,
            [
                RoutedEntry { source_partition: 3, source_offset: 41, event: b"first" },
                RoutedEntry { source_partition: 0, source_offset: 1 << 40, event: b"" },
                RoutedEntry { source_partition: 7, source_offset: 0, event: &[0xff; 300] },
            ]
        );

        // Any Avro library reads it with the schema file.
        let schema = Schema::parse_str(ROUTED_EVENTS_SCHEMA).unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &body[..])
            .unwrap();
        let Value::Record(fields) = value else { panic!("not a record: {value:?}") };
        let Value::Array(items) = &fields[0].1 else { panic!("not an array: {:?}", fields[0]) };
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[1],
            Value::Record(vec![
                ("source_partition".into(), Value::Int(0)),
                ("source_offset".into(), Value::Long(1 << 40)),
                ("event".into(), Value::Bytes(vec![])),
            ])
        );
    }

    #[test]
    fn an_empty_record_has_no_entries() {
        let record = RoutedRecordWriter::default().finish();
        let (_, body) = split_single_object(&record).unwrap();
        assert_eq!(decode_routed_entries(body).unwrap(), []);
    }

    #[test]
    fn blocks_with_a_byte_size_are_read_too() {
        // Another Avro writer may split the array into blocks with a
        // negative count followed by the block's size.
        let mut one = RoutedRecordWriter::default();
        one.push(1, 2, b"ab");
        let entries = one.entries.clone();
        let mut body = Vec::new();
        write_long(&mut body, -1);
        write_long(&mut body, entries.len() as i64);
        body.extend_from_slice(&entries);
        write_long(&mut body, 1);
        body.extend_from_slice(&entries);
        write_long(&mut body, 0);
        let decoded = decode_routed_entries(&body).unwrap();
        assert_eq!(decoded.len(), 2);
        assert!(decoded.iter().all(|e| e.source_partition == 1 && e.source_offset == 2 && e.event == b"ab"));
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut writer = RoutedRecordWriter::default();
        writer.push(1, 2, b"abc");
        let record = writer.finish();
        let (_, body) = split_single_object(&record).unwrap();
        for cut in 0..body.len() {
            assert!(decode_routed_entries(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = body.to_vec();
        trailing.push(0);
        assert!(decode_routed_entries(&trailing).is_err());
        // A source partition beyond an int.
        let mut wide = Vec::new();
        write_long(&mut wide, 1);
        write_long(&mut wide, i64::from(i32::MAX) + 1);
        write_long(&mut wide, 0);
        write_bytes(&mut wide, b"");
        write_long(&mut wide, 0);
        assert!(decode_routed_entries(&wide).is_err());
    }
}
