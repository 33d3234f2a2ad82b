//! Sends a batch's events to the routing topic (src/detect/routing.rs),
//! once per routed key each wants, before the batch commits: like dead
//! letters, a batch's offsets are stored only after its routed records are
//! acknowledged, so that no event is lost to the routed rules. A batch
//! retried after a crash sends them again; the routed consumers skip what
//! they have counted already (by source partition and offset).
//!
//! The events of a batch bound for the same key and routing partition
//! travel together in one record (src/event/routed.rs), of about
//! [`MAX_RECORD_BYTES`] at most: one produce and one acknowledgement per
//! partition and key instead of one per event and key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::batch::BatchRow;
use crate::detect::routing::{self, HEADER_KEY_SPEC, RoutedKey};
use crate::event::AuthEvent;
use crate::event::avro::encode_body;
use crate::event::routed::RoutedRecordWriter;

/// Size at which a routed record is closed and another begun. A record
/// holds at most this plus one event, whose size validation bounds
/// (`validation.max_text_bytes` per text, `max_metadata_bytes` for the
/// metadata; about 24 KiB with the defaults): well under the brokers'
/// default `message.max.bytes` (1 MB) and librdkafka's producer limit of
/// the same size.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct Router {
    producer: FutureProducer,
    topic: String,
    partitions: i32,
    keys: Arc<Vec<RoutedKey>>,
    timeout: Duration,
}

impl Router {
    pub fn new(
        producer: FutureProducer,
        topic: String,
        partitions: i32,
        keys: Arc<Vec<RoutedKey>>,
        timeout: Duration,
    ) -> Router {
        Router { producer, topic, partitions, keys, timeout }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partitions of the routing topic (read once at start).
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    pub fn keys(&self) -> &Arc<Vec<RoutedKey>> {
        &self.keys
    }

    /// Produces the routed records of `rows` and waits until all are
    /// acknowledged; returns how many events were routed (once per key).
    pub async fn send_all(&self, rows: &[BatchRow]) -> Result<usize, KafkaError> {
        let sources = rows.iter().map(|row| (row.partition, row.offset, &row.event));
        let (records, routed) = routed_records(&self.keys, self.partitions, sources, MAX_RECORD_BYTES);
        let sends = records.iter().map(|r| self.send(&self.keys[r.key].text, r.partition, &r.payload));
        for result in join_all(sends).await {
            result?;
        }
        metrics::counter!("audit_routed_records_total").increment(records.len() as u64);
        metrics::counter!("audit_routed_events_total").increment(routed as u64);
        Ok(routed)
    }

    async fn send(&self, key_spec: &str, partition: i32, payload: &[u8]) -> Result<(), KafkaError> {
        let headers = OwnedHeaders::new_with_capacity(1)
            .insert(KafkaHeader { key: HEADER_KEY_SPEC, value: Some(key_spec.as_bytes()) });
        let record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).partition(partition).payload(payload).headers(headers);
        self.producer.send(record, Timeout::After(self.timeout)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}

/// One record for the routing topic.
#[derive(Debug)]
struct RoutedRecord {
    /// Index of the routed key in the router's keys.
    key: usize,
    partition: i32,
    payload: Vec<u8>,
}

/// The records of a batch's events, given as (events-topic partition,
/// offset, event) in the batch's order, and how many events they carry:
/// one record per routed key and routing partition, closed and another
/// begun once its entries reach `max_bytes`. Within a record and across a
/// key and partition's records the events keep the batch's order, so that
/// the routed consumer meets each source partition's offsets in order.
fn routed_records<'a>(
    keys: &[RoutedKey],
    partitions: i32,
    events: impl Iterator<Item = (i32, i64, &'a AuthEvent)>,
    max_bytes: usize,
) -> (Vec<RoutedRecord>, usize) {
    let mut open: BTreeMap<(usize, i32), RoutedRecordWriter> = BTreeMap::new();
    let mut records = Vec::new();
    let mut routed = 0;
    for (source_partition, source_offset, event) in events {
        let mut routes = routing::routes(keys, partitions, event).peekable();
        if routes.peek().is_none() {
            continue;
        }
        let body = encode_body(event);
        for (key, partition) in routes {
            let writer = open.entry((key, partition)).or_default();
            writer.push(source_partition, source_offset, &body);
            routed += 1;
            if writer.encoded_len() >= max_bytes {
                records.push(RoutedRecord { key, partition, payload: std::mem::take(writer).finish() });
            }
        }
    }
    records.extend(
        open.into_iter().filter(|(_, writer)| !writer.is_empty()).map(|((key, partition), writer)| RoutedRecord {
            key,
            partition,
            payload: writer.finish(),
        }),
    );
    (records, routed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::DetectConfig;
    use crate::event::avro::{AUTH_EVENT_SCHEMA, ReadPlan, split_single_object};
    use crate::event::routed::decode_routed_entries;

    fn failed_login(n: u32, ip: &str) -> AuthEvent {
        AuthEvent {
            event_id: uuid::Uuid::from_u128(u128::from(n)),
            occurred_at: i64::from(n),
            action: "FAILED_AUTH_LOGIN".into(),
            user_id: Some(format!("u{n}")),
            username: Some(format!("u{n}")),
            ip_address: Some(ip.parse().unwrap()),
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: vec![],
        }
    }

    /// (source partition, offset, event id) of one entry.
    type Entry = (i32, i64, u128);

    /// (key text, partition, entries) of each record.
    fn read(keys: &[RoutedKey], records: &[RoutedRecord]) -> Vec<(String, i32, Vec<Entry>)> {
        let plan = ReadPlan::compile(&apache_avro::Schema::parse_str(AUTH_EVENT_SCHEMA).unwrap()).unwrap();
        records
            .iter()
            .map(|r| {
                let (_, body) = split_single_object(&r.payload).unwrap();
                let entries = decode_routed_entries(body).unwrap();
                let events = entries
                    .iter()
                    .map(|e| (e.source_partition, e.source_offset, plan.decode(e.event).unwrap().event_id.as_u128()))
                    .collect();
                (keys[r.key].text.clone(), r.partition, events)
            })
            .collect()
    }

    #[test]
    fn a_batch_makes_one_record_per_key_and_partition_in_batch_order() {
        let keys = routing::split(&DetectConfig::default()).unwrap().routed;
        let events: Vec<(i32, i64, AuthEvent)> = vec![
            (0, 10, failed_login(1, "203.0.113.1")),
            (1, 20, failed_login(2, "203.0.113.2")),
            (0, 11, failed_login(3, "203.0.113.1")),
            (1, 21, AuthEvent { action: "AUTH_LOGOUT".into(), ..failed_login(4, "203.0.113.1") }),
        ];
        let (records, routed) = routed_records(&keys, 16, events.iter().map(|(p, o, e)| (*p, *o, e)), MAX_RECORD_BYTES);
        // Three failed logins, each to the system key and to its address; a
        // logout to neither.
        assert_eq!(routed, 6);
        let read = read(&keys, &records);
        let system: Vec<_> = read.iter().filter(|r| r.0 == "system").collect();
        assert_eq!(system.len(), 1, "{read:?}");
        assert_eq!(system[0].2, [(0, 10, 1), (1, 20, 2), (0, 11, 3)]);
        let ip = keys.iter().position(|k| k.text == "ip_address").unwrap();
        let partition_of = |e: &AuthEvent| routing::partition_of(keys[ip].spec.hash(e).unwrap(), 16);
        // Each address partition's record: its failed logins in batch order.
        let mut expected: BTreeMap<i32, Vec<Entry>> = BTreeMap::new();
        for (p, o, e) in events.iter().filter(|(_, _, e)| e.action == "FAILED_AUTH_LOGIN") {
            expected.entry(partition_of(e)).or_default().push((*p, *o, e.event_id.as_u128()));
        }
        let by_address: BTreeMap<i32, Vec<Entry>> =
            read.iter().filter(|r| r.0 == "ip_address").map(|r| (r.1, r.2.clone())).collect();
        assert_eq!(by_address, expected);
        assert_eq!(records.len(), 1 + expected.len(), "one record per key and partition: {read:?}");
    }

    #[test]
    fn a_full_record_is_closed_and_the_next_one_goes_on_in_order() {
        let keys = routing::split(&DetectConfig::default()).unwrap().routed;
        let events: Vec<(i32, i64, AuthEvent)> =
            (0..50).map(|i| (2, 100 + i64::from(i), failed_login(i, "198.51.100.7"))).collect();
        let one = encode_body(&events[0].2).len();
        // Room for about ten events a record.
        let (records, routed) = routed_records(&keys, 4, events.iter().map(|(p, o, e)| (*p, *o, e)), one * 10);
        assert_eq!(routed, 100);
        let read = read(&keys, &records);
        for key in ["system", "ip_address"] {
            let of_key: Vec<_> = read.iter().filter(|r| r.0 == key).collect();
            assert!(of_key.len() >= 4, "{key}: {} records", of_key.len());
            assert!(of_key.iter().all(|r| r.2.len() <= 11));
            // Concatenated, the records hold the fifty offsets in order.
            let offsets: Vec<i64> = of_key.iter().flat_map(|r| r.2.iter().map(|e| e.1)).collect();
            assert_eq!(offsets, (100..150).collect::<Vec<_>>(), "{key}");
        }
    }
}
