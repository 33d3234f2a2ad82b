//! The activity tracker: sessions and per-hour rollups, kept exact in the
//! ingest transaction so that reports never scan audit_logs.
//!
//! For each batch, the rows actually inserted (duplicates excluded) become
//! deltas: counts per (user, hour, action) and per (hour, action), and one
//! merged delta per session. They are appended with binary COPY (cheap: the
//! delta tables have no index) in the same transaction as the rows. The
//! compactor folds them into the final tables (`activity_compact()` in
//! migrations/0004) and closes idle sessions; the `*_v` views add pending
//! deltas, so readers always see exact figures.

pub mod compactor;
pub mod hll;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bytes::BufMut;
use futures::SinkExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;

use crate::event::{AuthEvent, EpochMicros};
use crate::store::copy_format::{
    CopyStream, OID_INET, OID_INT8, OID_TEXT, OID_TIMESTAMPTZ, put_array, put_i64, put_inet, put_null, put_text,
    put_timestamptz,
};
use crate::store::queries;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActivityConfig {
    /// Sessions and rollups on (they cost a little ingest speed; see
    /// BENCHMARKS.md).
    pub enabled: bool,
    /// A session with no event for this long (event time) is closed as
    /// `idle_timeout`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Folding pending deltas into the final tables is background work: it
    /// waits until ingest has been idle this long (readers see exact figures
    /// either way: the views add what is pending)...
    #[serde(with = "humantime_serde")]
    pub compact_when_idle_for: Duration,
    /// ...but no longer than this...
    #[serde(with = "humantime_serde")]
    pub compact_interval: Duration,
    /// ...nor beyond this many pending delta entries (each read of the
    /// pending deltas costs time in proportion)...
    pub max_pending_deltas: u64,
    /// ...or this many while ingest is catching up on a backlog (its batches
    /// close full): the fold then yields the CPU to ingest. Reads stay exact
    /// but slow down with what is pending (about 0.5 s per million entries
    /// for the activity summary, see BENCHMARKS.md).
    pub max_pending_deltas_catching_up: u64,
    /// How often idle sessions are closed and open ones counted (each reads
    /// the whole sessions table). Idle sessions are closed right after a
    /// fold, in its transaction, so each sweep folds what is pending first
    /// (except while ingest catches up: then the sweep waits for it).
    #[serde(with = "humantime_serde")]
    pub session_sweep_interval: Duration,
    /// Actions that open a session (with a session_id).
    pub session_open_actions: Vec<String>,
    /// Actions that close their session, with the reason stored.
    pub session_close_actions: Vec<SessionClose>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionClose {
    pub action: String,
    pub reason: String,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        ActivityConfig {
            enabled: true,
            idle_timeout: Duration::from_secs(30 * 60),
            compact_when_idle_for: Duration::from_secs(1),
            compact_interval: Duration::from_secs(300),
            max_pending_deltas: 1_000_000,
            max_pending_deltas_catching_up: 3_000_000,
            session_sweep_interval: Duration::from_secs(60),
            session_open_actions: vec!["AUTH_LOGIN".into()],
            session_close_actions: vec![
                SessionClose { action: "AUTH_LOGOUT".into(), reason: "logout".into() },
                SessionClose { action: "TOKEN_REVOKED".into(), reason: "token_revoked".into() },
            ],
        }
    }
}

const HOUR: i64 = 3_600_000_000;

fn hour_of(t: EpochMicros) -> EpochMicros {
    t.div_euclid(HOUR) * HOUR
}

/// One session's merged view of the events of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDelta<'a> {
    pub user_id: Option<&'a str>,
    pub ip_address: Option<IpAddr>,
    pub user_agent: Option<&'a str>,
    pub started_at: Option<EpochMicros>,
    pub last_seen_at: EpochMicros,
    pub ended_at: Option<EpochMicros>,
    pub end_reason: Option<&'a str>,
}

impl<'a> SessionDelta<'a> {
    /// The same merge rules as `sessions_v` / `activity_compact()`.
    fn merge(&mut self, other: SessionDelta<'a>) {
        let other_starts_first = match (other.started_at, self.started_at) {
            (Some(o), Some(s)) => o < s,
            (Some(_), None) => true,
            _ => false,
        };
        if other_starts_first || self.ip_address.is_none() {
            self.ip_address = other.ip_address.or(self.ip_address);
        }
        if other_starts_first || self.user_agent.is_none() {
            self.user_agent = other.user_agent.or(self.user_agent);
        }
        self.user_id = self.user_id.or(other.user_id);
        self.started_at = match (self.started_at, other.started_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seen_at = self.last_seen_at.max(other.last_seen_at);
        if let Some(end) = other.ended_at
            && self.ended_at.is_none_or(|mine| end < mine)
        {
            self.ended_at = Some(end);
            self.end_reason = other.end_reason;
        }
    }
}

/// Maps built per batch: a fast fixed hash (SipHash was a tenth of the
/// writer's CPU here).
type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<crate::detect::keys::StableHasher>>;

/// What a batch's inserted rows add to the activity tables.
#[derive(Debug, Default)]
pub struct ActivityDeltas<'a> {
    /// Events per (user, hour, action)...
    pub user_hourly: FastMap<(&'a str, EpochMicros, &'a str), i64>,
    /// ...and per (hour, action) of events without a user: the per-hour
    /// rollup is the sum of both.
    pub anonymous_hourly: FastMap<(EpochMicros, &'a str), i64>,
    pub sessions: FastMap<&'a str, SessionDelta<'a>>,
}

impl<'a> ActivityDeltas<'a> {
    pub fn from_events(cfg: &'a ActivityConfig, events: impl IntoIterator<Item = &'a AuthEvent>) -> Self {
        let mut d = ActivityDeltas::default();
        for e in events {
            let hour = hour_of(e.occurred_at);
            match e.user_id.as_deref() {
                Some(user) => *d.user_hourly.entry((user, hour, e.action.as_str())).or_default() += 1,
                None => *d.anonymous_hourly.entry((hour, e.action.as_str())).or_default() += 1,
            }
            let Some(session) = e.session_id.as_deref() else { continue };
            let opens = cfg.session_open_actions.contains(&e.action);
            let closes = cfg.session_close_actions.iter().find(|c| c.action == e.action);
            let delta = SessionDelta {
                user_id: e.user_id.as_deref(),
                ip_address: if opens { e.ip_address } else { None },
                user_agent: if opens { e.user_agent.as_deref() } else { None },
                started_at: opens.then_some(e.occurred_at),
                last_seen_at: e.occurred_at,
                ended_at: closes.map(|_| e.occurred_at),
                end_reason: closes.map(|c| c.reason.as_str()),
            };
            match d.sessions.get_mut(session) {
                Some(existing) => existing.merge(delta),
                None => {
                    d.sessions.insert(session, delta);
                }
            }
        }
        d
    }

    /// Delta rows these add up to.
    pub fn rows(&self) -> usize {
        self.user_hourly.len() + self.anonymous_hourly.len() + self.sessions.len()
    }

    /// Appends the deltas in the batch's transaction, as one row of arrays.
    pub async fn write(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        if self.rows() == 0 {
            return Ok(());
        }
        copy(tx, queries::COPY_ACTIVITY_DELTAS, self.encode()).await?;
        Ok(())
    }

    /// The binary COPY stream of that one row (`activity_delta_batches`).
    pub fn encode(&self) -> CopyStream {
        // Rollup entries: per user, then those without a user (they count
        // system-wide only).
        let rollup: Vec<(Option<&str>, EpochMicros, &str, i64)> = self
            .user_hourly
            .iter()
            .map(|((u, h, a), n)| (Some(*u), *h, *a, *n))
            .chain(self.anonymous_hourly.iter().map(|((h, a), n)| (None, *h, *a, *n)))
            .collect();
        let sessions: Vec<(&&str, &SessionDelta<'_>)> = self.sessions.iter().collect();
        let ts = |b: &mut bytes::BytesMut, t: &Option<EpochMicros>| match t {
            Some(t) => put_timestamptz(b, *t),
            None => put_null(b),
        };
        let mut s = CopyStream::new();
        // Counts per (hour, action), users and anonymous together, for the
        // system-wide reads.
        let mut hourly: FastMap<(EpochMicros, &str), i64> = FastMap::default();
        for &(_, hour, action, n) in &rollup {
            *hourly.entry((hour, action)).or_default() += n;
        }
        let hourly: Vec<((EpochMicros, &str), i64)> = hourly.into_iter().collect();
        // ADMIN_* counts apart: the per-admin reads take these few.
        let admin: Vec<&(Option<&str>, EpochMicros, &str, i64)> =
            rollup.iter().filter(|r| r.0.is_some() && r.2.starts_with("ADMIN_")).collect();
        let b = s.row(20);
        put_array(b, OID_TEXT, &rollup, |b, r| put_text(b, r.0));
        put_array(b, OID_TIMESTAMPTZ, &rollup, |b, r| put_timestamptz(b, r.1));
        put_array(b, OID_TEXT, &rollup, |b, r| put_text(b, Some(r.2)));
        put_array(b, OID_INT8, &rollup, |b, r| put_i64(b, r.3));
        put_array(b, OID_TEXT, &sessions, |b, (id, _)| put_text(b, Some(id)));
        put_array(b, OID_TEXT, &sessions, |b, (_, d)| put_text(b, d.user_id));
        put_array(b, OID_INET, &sessions, |b, (_, d)| put_inet(b, d.ip_address));
        put_array(b, OID_TEXT, &sessions, |b, (_, d)| put_text(b, d.user_agent));
        put_array(b, OID_TIMESTAMPTZ, &sessions, |b, (_, d)| ts(b, &d.started_at));
        put_array(b, OID_TIMESTAMPTZ, &sessions, |b, (_, d)| put_timestamptz(b, d.last_seen_at));
        put_array(b, OID_TIMESTAMPTZ, &sessions, |b, (_, d)| ts(b, &d.ended_at));
        put_array(b, OID_TEXT, &sessions, |b, (_, d)| put_text(b, d.end_reason));
        let filter = self.key_filter();
        b.put_i32(filter.len() as i32);
        b.put_slice(&filter);
        put_array(b, OID_TIMESTAMPTZ, &hourly, |b, ((h, _), _)| put_timestamptz(b, *h));
        put_array(b, OID_TEXT, &hourly, |b, ((_, a), _)| put_text(b, Some(a)));
        put_array(b, OID_INT8, &hourly, |b, (_, n)| put_i64(b, *n));
        put_array(b, OID_TEXT, &admin, |b, r| put_text(b, r.0));
        put_array(b, OID_TIMESTAMPTZ, &admin, |b, r| put_timestamptz(b, r.1));
        put_array(b, OID_TEXT, &admin, |b, r| put_text(b, Some(r.2)));
        put_array(b, OID_INT8, &admin, |b, r| put_i64(b, r.3));
        s
    }

    /// The batch's key filter (migrations/0005): a Bloom filter over the
    /// user ids and session ids it holds, so that a per-user read can skip
    /// batches.
    fn key_filter(&self) -> Vec<u8> {
        let mut filter = vec![0u8; KEY_FILTER_BITS / 8];
        let users = self.user_hourly.keys().map(|(u, _, _)| *u);
        let sessions = self.sessions.iter().flat_map(|(id, d)| std::iter::once(*id).chain(d.user_id));
        for key in users.chain(sessions) {
            for bit in key_bits(key) {
                filter[bit >> 3] |= 1 << (bit & 7);
            }
        }
        filter
    }
}

/// Bits in a batch's key filter. A batch of 5,000 events holds ~8,500
/// keys: with two bits per key, ~1.5 % of unrelated batches still match.
const KEY_FILTER_BITS: usize = 1 << 17;

/// The two filter bits of a key: bits 0-16 and 15-31 of the 32-bit FNV-1a
/// hash of its bytes; the same as `activity_key_bits()` in migrations/0005.
pub fn key_bits(key: &str) -> [usize; 2] {
    let mut h: u32 = 0x811c_9dc5;
    for &byte in key.as_bytes() {
        h = (h ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    let mask = KEY_FILTER_BITS - 1;
    [h as usize & mask, (h >> 15) as usize & mask]
}

async fn copy(tx: &Transaction<'_>, statement: &str, stream: CopyStream) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(statement).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(stream.finish().freeze()).await?;
    sink.finish().await
}

/// The metric label of an action: known actions as themselves, families by
/// prefix, anything else as `other` (producers choose action strings; a
/// label per arbitrary string would not be bounded).
pub const ACTION_LABELS: [&str; 8] = [
    "AUTH_LOGIN",
    "FAILED_AUTH_LOGIN",
    "AUTH_LOGOUT",
    "TOKEN_ISSUED",
    "TOKEN_REVOKED",
    "ADMIN_*",
    "SECURITY_*",
    "other",
];

/// The index into [`ACTION_LABELS`] of an action.
pub fn action_label_index(action: &str) -> usize {
    match action {
        "AUTH_LOGIN" => 0,
        "FAILED_AUTH_LOGIN" => 1,
        "AUTH_LOGOUT" => 2,
        "TOKEN_ISSUED" => 3,
        "TOKEN_REVOKED" => 4,
        a if a.starts_with("ADMIN_") => 5,
        a if a.starts_with("SECURITY_") => 6,
        _ => 7,
    }
}

pub fn action_label(action: &str) -> &'static str {
    ACTION_LABELS[action_label_index(action)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn ev(action: &str, session: &str, at: i64) -> AuthEvent {
        AuthEvent {
            event_id: Uuid::new_v4(),
            occurred_at: at,
            action: action.into(),
            user_id: Some("u1".into()),
            username: None,
            ip_address: Some("10.0.0.1".parse().unwrap()),
            user_agent: Some("ua".into()),
            session_id: Some(session.into()),
            request_id: None,
            metadata: vec![],
        }
    }

    #[test]
    fn a_logout_before_its_login_still_gives_one_closed_session() {
        let cfg = ActivityConfig::default();
        let events = [ev("AUTH_LOGOUT", "s1", 50), ev("AUTH_LOGIN", "s1", 10), ev("TOKEN_ISSUED", "s1", 20)];
        let d = ActivityDeltas::from_events(&cfg, &events);
        let s = &d.sessions["s1"];
        assert_eq!((s.started_at, s.last_seen_at, s.ended_at, s.end_reason), (Some(10), 50, Some(50), Some("logout")));
        assert_eq!(s.ip_address, Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn the_first_end_wins_and_rollups_count_per_hour() {
        let cfg = ActivityConfig::default();
        let events = [
            ev("AUTH_LOGIN", "s1", 10),
            ev("TOKEN_REVOKED", "s1", 40),
            ev("AUTH_LOGOUT", "s1", 30),
            ev("AUTH_LOGIN", "s2", HOUR + 5),
        ];
        let d = ActivityDeltas::from_events(&cfg, &events);
        assert_eq!((d.sessions["s1"].ended_at, d.sessions["s1"].end_reason), (Some(30), Some("logout")));
        assert_eq!(d.user_hourly[&("u1", 0, "AUTH_LOGIN")], 1);
        assert_eq!(d.user_hourly[&("u1", HOUR, "AUTH_LOGIN")], 1);
        assert_eq!(d.user_hourly[&("u1", 0, "AUTH_LOGOUT")], 1);
        assert!(d.anonymous_hourly.is_empty());
    }

    #[test]
    fn key_bits_are_fnv1a_and_every_key_of_a_batch_is_in_its_filter() {
        // FNV-1a 32 reference values: "a" 0xe40c292c, "foobar" 0xbf9cf968.
        assert_eq!(key_bits("a"), [0xe40c_292c & 0x1_ffff, (0xe40c_292c >> 15) & 0x1_ffff]);
        assert_eq!(key_bits("foobar"), [0xbf9c_f968 & 0x1_ffff, (0xbf9c_f968 >> 15) & 0x1_ffff]);
        let cfg = ActivityConfig::default();
        let events = [ev("AUTH_LOGIN", "s1", 10), ev("AUTH_LOGOUT", "s2", 20)];
        let filter = ActivityDeltas::from_events(&cfg, &events).key_filter();
        let set = |key: &str| key_bits(key).iter().all(|&bit| filter[bit >> 3] & (1 << (bit & 7)) != 0);
        assert!(set("u1") && set("s1") && set("s2"));
        assert!(!set("u2"));
        assert!(filter.iter().map(|b| b.count_ones()).sum::<u32>() <= 6);
    }

    #[test]
    fn action_labels_are_bounded() {
        assert_eq!(action_label("ADMIN_ROLE_GRANT"), "ADMIN_*");
        assert_eq!(action_label("whatever-the-producer-says"), "other");
    }
}
