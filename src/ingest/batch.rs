//! Batches: what the consumer thread hands to the writer.
//!
//! A batch holds the decoded events of a run of messages, the messages that
//! failed decoding (bound for the dead-letter topic), and for every partition
//! it covers the offset to store once it commits. The raw bytes of every row
//! are kept too (in one arena, not one allocation per message) so that a row
//! PostgreSQL refuses can still be dead-lettered with its original bytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::detect::Transition;
use crate::event::{AuthEvent, DecodeError, Encoding, EpochMicros};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// A consumed message, borrowed from the Kafka client.
pub struct SourceMessage<'a> {
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp, milliseconds since the epoch.
    pub timestamp: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<Header>,
}

/// A message bound for the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<Header>,
    pub reason_code: String,
    pub reason: String,
}

/// A decoded event and where it came from.
pub struct BatchRow {
    pub event: AuthEvent,
    pub encoding: Encoding,
    pub partition: i32,
    pub offset: i64,
    pub received_at: EpochMicros,
    raw: RawSpan,
}

struct RawSpan {
    key: Option<Range<usize>>,
    payload: Range<usize>,
    timestamp: Option<i64>,
    headers: Vec<Header>,
}

/// The offset a partition's stored position moves to when the batch commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    pub partition: i32,
    /// Which assignment of the partition this batch belongs to; a fenced
    /// epoch's batches are dropped by the writer.
    pub epoch: u64,
    /// The stored position this consumer expects to find (the fence).
    pub expected: Option<i64>,
    pub next_offset: i64,
}

pub struct Batch {
    pub seq: u64,
    pub rows: Vec<BatchRow>,
    pub dead: Vec<DeadLetter>,
    pub progress: Vec<PartitionProgress>,
    /// Messages whose event_id already appeared earlier in this batch.
    pub duplicates_in_batch: u64,
    /// Messages consumed into this batch (rows + dead + duplicates).
    pub messages: u64,
    /// Alert transitions the detectors made from these events (or from the
    /// clock), with whether the storm limiter let them out.
    pub alerts: Vec<(Transition, bool)>,
    pub opened_at: Instant,
    /// Closed because it reached the size limit, not its age: the consumer
    /// had more waiting than one batch holds (it is catching up).
    pub full: bool,
    raw: Vec<u8>,
}

impl Batch {
    /// The dead letter for row `index`, rebuilt from its original bytes.
    pub fn dead_letter_for_row(&self, index: usize, reason_code: &str, reason: String) -> DeadLetter {
        let row = &self.rows[index];
        DeadLetter {
            partition: row.partition,
            offset: row.offset,
            timestamp: row.raw.timestamp,
            key: row.raw.key.clone().map(|r| self.raw[r].to_vec()),
            payload: self.raw[row.raw.payload.clone()].to_vec(),
            headers: row.raw.headers.clone(),
            reason_code: reason_code.to_owned(),
            reason,
        }
    }

    /// Removes everything of the given partitions (after a fence).
    pub fn remove_partitions(&mut self, partitions: &[i32]) {
        self.rows.retain(|r| !partitions.contains(&r.partition));
        self.dead.retain(|d| !partitions.contains(&d.partition));
        self.progress.retain(|p| !partitions.contains(&p.partition));
    }

    /// Approximate bytes held, for the memory bound.
    pub fn raw_bytes(&self) -> usize {
        self.raw.len()
    }
}

/// Where this consumer believes a partition's stored position is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub expected: Option<i64>,
}

/// Accumulates messages into a batch until it is full or old enough.
pub struct BatchBuilder {
    max_rows: usize,
    max_age: Duration,
    next_seq: u64,
    current: Option<Batch>,
    seen: HashSet<Uuid>,
    last_offset: BTreeMap<i32, i64>,
}

impl BatchBuilder {
    pub fn new(max_rows: usize, max_age: Duration) -> Self {
        BatchBuilder {
            max_rows,
            max_age,
            next_seq: 1,
            current: None,
            seen: HashSet::new(),
            last_offset: BTreeMap::new(),
        }
    }

    fn open(&mut self) -> &mut Batch {
        let seq = self.next_seq;
        self.current.get_or_insert_with(|| Batch {
            seq,
            rows: Vec::new(),
            dead: Vec::new(),
            progress: Vec::new(),
            duplicates_in_batch: 0,
            messages: 0,
            alerts: Vec::new(),
            opened_at: Instant::now(),
            full: false,
            raw: Vec::new(),
        })
    }

    /// Adds a message that decoded to `event`.
    pub fn push_event(
        &mut self,
        msg: SourceMessage<'_>,
        event: AuthEvent,
        encoding: Encoding,
        received_at: EpochMicros,
    ) {
        self.last_offset.insert(msg.partition, msg.offset);
        let fresh = self.seen.insert(event.event_id);
        let batch = self.open();
        batch.messages += 1;
        if !fresh {
            // A producer retry inside one batch: the database would skip it
            // anyway, so it never leaves memory.
            batch.duplicates_in_batch += 1;
            return;
        }
        let key = msg.key.map(|k| push_raw(&mut batch.raw, k));
        let payload = push_raw(&mut batch.raw, msg.payload.unwrap_or_default());
        batch.rows.push(BatchRow {
            event,
            encoding,
            partition: msg.partition,
            offset: msg.offset,
            received_at,
            raw: RawSpan { key, payload, timestamp: msg.timestamp, headers: msg.headers },
        });
    }

    /// Adds a message that failed decoding or validation.
    pub fn push_dead(&mut self, msg: SourceMessage<'_>, error: &DecodeError) {
        self.last_offset.insert(msg.partition, msg.offset);
        let batch = self.open();
        batch.messages += 1;
        batch.dead.push(DeadLetter {
            partition: msg.partition,
            offset: msg.offset,
            timestamp: msg.timestamp,
            key: msg.key.map(<[u8]>::to_vec),
            payload: msg.payload.unwrap_or_default().to_vec(),
            headers: msg.headers,
            reason_code: error.code().to_owned(),
            reason: error.to_string(),
        });
    }

    /// Adds alert transitions; they are stored with this batch.
    pub fn push_alerts(&mut self, alerts: impl IntoIterator<Item = (Transition, bool)>) {
        let mut alerts = alerts.into_iter().peekable();
        if alerts.peek().is_some() {
            self.open().alerts.extend(alerts);
        }
    }

    pub fn messages(&self) -> u64 {
        self.current.as_ref().map_or(0, |b| b.messages)
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_none()
    }

    /// True when the batch should be written now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.current
            .as_ref()
            .is_some_and(|b| b.messages as usize >= self.max_rows || now.duration_since(b.opened_at) >= self.max_age)
    }

    /// How long until the open batch is due (None when there is none).
    pub fn time_until_due(&self, now: Instant) -> Option<Duration> {
        self.current.as_ref().map(|b| (b.opened_at + self.max_age).saturating_duration_since(now))
    }

    /// Closes the open batch: each covered partition gets its next offset
    /// and the fence it expects, and `positions` moves on as if it commits.
    /// Messages of partitions no longer in `positions` (revoked) are dropped:
    /// their next owner reads them again.
    pub fn take(&mut self, positions: &mut HashMap<i32, Position>) -> Option<Batch> {
        let mut batch = self.current.take()?;
        batch.full = batch.messages as usize >= self.max_rows;
        self.next_seq += 1;
        self.seen.clear();
        let revoked: Vec<i32> = self.last_offset.keys().copied().filter(|p| !positions.contains_key(p)).collect();
        for (partition, last) in std::mem::take(&mut self.last_offset) {
            if let Some(pos) = positions.get_mut(&partition) {
                batch.progress.push(PartitionProgress {
                    partition,
                    epoch: pos.epoch,
                    expected: pos.expected,
                    next_offset: last + 1,
                });
                pos.expected = Some(last + 1);
            }
        }
        if !revoked.is_empty() {
            batch.remove_partitions(&revoked);
        }
        Some(batch)
    }

    /// Forgets the open batch's messages of these partitions (a seek follows).
    pub fn discard_partitions(&mut self, partitions: &[i32]) {
        if let Some(batch) = &mut self.current {
            batch.remove_partitions(partitions);
            let seen: HashSet<Uuid> = batch.rows.iter().map(|r| r.event.event_id).collect();
            self.seen = seen;
        }
        for p in partitions {
            self.last_offset.remove(p);
        }
    }
}

fn push_raw(raw: &mut Vec<u8>, bytes: &[u8]) -> Range<usize> {
    let start = raw.len();
    raw.extend_from_slice(bytes);
    start..raw.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u128) -> AuthEvent {
        AuthEvent {
            event_id: Uuid::from_u128(n),
            occurred_at: 1_700_000_000_000_000,
            action: "AUTH_LOGIN".into(),
            user_id: Some("u1".into()),
            username: None,
            ip_address: None,
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: vec![],
        }
    }

    fn msg(partition: i32, offset: i64, payload: &[u8]) -> SourceMessage<'_> {
        SourceMessage {
            partition,
            offset,
            timestamp: Some(1),
            key: Some(b"k"),
            payload: Some(payload),
            headers: vec![],
        }
    }

    #[test]
    fn take_advances_positions_and_drops_in_batch_duplicates() {
        let mut b = BatchBuilder::new(10, Duration::from_secs(1));
        let mut pos =
            HashMap::from([(0, Position { epoch: 1, expected: None }), (1, Position { epoch: 1, expected: Some(40) })]);
        b.push_event(msg(0, 5, b"a"), event(1), Encoding::Json, 0);
        b.push_event(msg(1, 40, b"b"), event(2), Encoding::Json, 0);
        b.push_event(msg(0, 6, b"a"), event(1), Encoding::Json, 0);
        b.push_dead(msg(1, 41, b"zz"), &DecodeError::Empty);
        let batch = b.take(&mut pos).unwrap();
        assert_eq!(batch.rows.len(), 2);
        assert_eq!(batch.duplicates_in_batch, 1);
        assert_eq!(batch.messages, 4);
        assert_eq!(batch.dead.len(), 1);
        assert_eq!(
            batch.progress,
            vec![
                PartitionProgress { partition: 0, epoch: 1, expected: None, next_offset: 7 },
                PartitionProgress { partition: 1, epoch: 1, expected: Some(40), next_offset: 42 },
            ]
        );
        assert_eq!(pos[&0].expected, Some(7));
        assert_eq!(pos[&1].expected, Some(42));
        // The next batch may carry the same event_id again (the database
        // de-duplicates across batches).
        b.push_event(msg(0, 7, b"a"), event(1), Encoding::Json, 0);
        assert_eq!(b.take(&mut pos).unwrap().rows.len(), 1);
    }

    #[test]
    fn dead_letter_for_row_keeps_original_bytes() {
        let mut b = BatchBuilder::new(10, Duration::from_secs(1));
        let mut pos = HashMap::from([(3, Position { epoch: 1, expected: None })]);
        b.push_event(msg(3, 9, b"first"), event(1), Encoding::Json, 0);
        b.push_event(msg(3, 10, b"second"), event(2), Encoding::Json, 0);
        let batch = b.take(&mut pos).unwrap();
        let dl = batch.dead_letter_for_row(1, "db_rejected", "no".into());
        assert_eq!(dl.payload, b"second");
        assert_eq!(dl.key.as_deref(), Some(&b"k"[..]));
        assert_eq!((dl.partition, dl.offset), (3, 10));
    }

    #[test]
    fn due_by_size_or_age_and_revoked_partitions_are_dropped() {
        let mut b = BatchBuilder::new(2, Duration::from_millis(50));
        let now = Instant::now();
        assert!(!b.is_due(now));
        b.push_event(msg(0, 1, b"a"), event(1), Encoding::Json, 0);
        assert!(!b.is_due(Instant::now()));
        assert!(b.is_due(Instant::now() + Duration::from_millis(60)));
        b.push_event(msg(1, 1, b"b"), event(2), Encoding::Json, 0);
        assert!(b.is_due(Instant::now()));
        let mut pos = HashMap::from([(1, Position { epoch: 2, expected: None })]);
        let batch = b.take(&mut pos).unwrap();
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].partition, 1);
        assert_eq!(batch.progress.len(), 1);
        assert!(batch.full, "closed at the size limit");
    }

    #[test]
    fn a_batch_closed_by_age_is_not_full() {
        let mut b = BatchBuilder::new(2, Duration::ZERO);
        let mut pos = HashMap::from([(0, Position { epoch: 1, expected: None })]);
        b.push_event(msg(0, 1, b"a"), event(1), Encoding::Json, 0);
        assert!(b.is_due(Instant::now()));
        assert!(!b.take(&mut pos).unwrap().full);
        b.push_event(msg(0, 2, b"b"), event(2), Encoding::Json, 0);
        b.push_event(msg(0, 3, b"c"), event(3), Encoding::Json, 0);
        assert!(b.take(&mut pos).unwrap().full);
    }
}
