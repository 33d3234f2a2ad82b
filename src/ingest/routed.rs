//! The routed detectors: consume the routing topic (src/detect/routing.rs)
//! in the consumer group `<group_id>.routed` and count the rules keyed by
//! IP address or system-wide over the events of every instance.
//!
//! Like the main pipeline, a routed consumer stores its offsets in
//! PostgreSQL, in one transaction with the alert transitions it made and
//! with how far it has counted each events-topic partition on each routing
//! partition (`routed_progress`). That mark makes counting exact: a record
//! at or below it is a re-send and is skipped, and on assignment the state
//! of a routing partition is rebuilt from the stored events up to it, then
//! consumption resumes at the stored offset. On revocation all state is
//! forgotten; open alerts are picked up by whoever owns their key's
//! partition.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::{StreamExt, pin_mut};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::detection::{RebuildWindows, ReplayOrder, open_episode, row_to_event, stored_transition};
use super::status::IngestStatus;
use crate::alerts::publisher::AlertPublisher;
use crate::detect::routing::{self, HEADER_KEY_SPEC, HEADER_SOURCE, RoutedKey};
use crate::detect::{Detector, OpenEpisode, Transition};
use crate::event::avro::{AUTH_EVENT_SCHEMA, ReadPlan, auth_event_fingerprint, split_single_object};
use crate::event::routed::{RoutedEntry, decode_routed_entries, routed_events_fingerprint};
use crate::store::{queries, with_causes};

const POLL_WAIT: Duration = Duration::from_millis(50);
/// How often offsets, marks and alerts are stored when records flow.
const STORE_EVERY: Duration = Duration::from_millis(50);
/// How often quiet streams are judged (resolutions).
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("{0}")]
    Db(String),
    #[error("routed offsets of partitions {0:?} were moved by another consumer")]
    Fenced(Vec<i32>),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Db(with_causes(&e))
    }
}

pub struct RoutedSettings {
    pub group: String,
    /// The main pipeline's group and events topic: their stored offsets say
    /// where each events partition's stored events end (rebuild windows).
    pub events_group: String,
    pub events_topic: String,
    pub topic: String,
    /// Partitions of the routing topic.
    pub partitions: i32,
    pub keys: Arc<Vec<RoutedKey>>,
    pub rebuild_window_max: Duration,
    pub retry_backoff: (Duration, Duration),
}

struct RoutedState {
    /// One detector per routed key spec (index as in `keys`).
    detectors: Vec<Detector>,
    publisher: AlertPublisher,
    /// Routing partition → (next offset to store, the stored one it expects).
    positions: HashMap<i32, (Option<i64>, Option<i64>)>,
    /// (routing partition, source partition) → highest source offset counted.
    marks: HashMap<(i32, i32), i64>,
    /// (routing partition, source partition) → the detectors' partition slot
    /// its events are judged in ([`StreamSlots`]).
    slots: StreamSlots,
    dirty_marks: HashSet<(i32, i32)>,
    /// Transitions not stored yet, with whether they were published.
    pending: Vec<(Transition, bool)>,
}

/// The streams whose order the routed consumer can rely on: one routing
/// partition's events from one events-topic partition arrive in offset
/// order, but the routing partitions an instance owns are fetched each at
/// its own pace, so the events of one source partition reach a detector
/// in no fixed order across them. Each stream gets its own detector
/// partition slot, in which lateness and duplicates are judged; judged per
/// source partition alone, whether an event counted as late would depend
/// on the fetches' timing.
#[derive(Debug, Default)]
struct StreamSlots(HashMap<(i32, i32), i32>);

impl StreamSlots {
    /// The slot of (routing partition, source partition), numbered in order
    /// of first sight.
    fn of(&mut self, routed_partition: i32, source_partition: i32) -> i32 {
        let next = self.0.len() as i32;
        *self.0.entry((routed_partition, source_partition)).or_insert(next)
    }
}

pub struct RoutedContext {
    runtime: Handle,
    /// Decodes the routed records (the built-in event schema).
    plan: ReadPlan,
    pool: Pool,
    settings: RoutedSettings,
    state: Mutex<RoutedState>,
    /// Where health reads the routed consumer's partitions, lag and progress.
    status: Arc<IngestStatus>,
    /// Said once: the routing topic no longer has the partitions routed by.
    partition_change_reported: AtomicBool,
    cancel: CancellationToken,
}

impl ClientContext for RoutedContext {
    /// The routed consumer's lag per routing partition it owns
    /// (`audit_routed_consumer_lag_messages`): the partition's end, from
    /// librdkafka's statistics, less this consumer's own position (what it
    /// has read, else where it resumed), so that a partition nobody has
    /// written to yet reports 0 rather than nothing.
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.settings.topic) else { return };
        let state = self.state();
        let mut lag = std::collections::BTreeMap::new();
        for (p, stats) in &topic.partitions {
            let Some((read, stored)) = state.positions.get(p) else { continue };
            if stats.hi_offset < 0 {
                continue; // end not known yet
            }
            let position = read.or(*stored).unwrap_or(stats.lo_offset.max(0));
            let behind = (stats.hi_offset - position).max(0);
            lag.insert(*p, behind);
            metrics::gauge!("audit_routed_consumer_lag_messages", "partition" => p.to_string()).set(behind as f64);
        }
        drop(state);
        self.status.set_routed_lag(lag);
        // Partitions added to the routing topic while instances run: those
        // started since route keys elsewhere, and counts split (health says so).
        let partitions = topic.partitions.keys().filter(|p| **p >= 0).count() as i32;
        if partitions > 0 {
            if partitions != self.settings.partitions && !self.partition_change_reported.swap(true, Ordering::Relaxed) {
                warn!(
                    topic = %self.settings.topic,
                    now = partitions,
                    routed_by = self.settings.partitions,
                    "the routing topic's partition count changed: restart every instance"
                );
            }
            self.status.set_routing_topic_partitions(partitions);
        }
    }
}

impl ConsumerContext for RoutedContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> =
                    tpl.elements_for_topic(&self.settings.topic).iter().map(|e| e.partition()).collect();
                let Some(starts) = self.retry("loading routed detector state", || self.load(&partitions)) else {
                    return;
                };
                for (p, start) in starts {
                    let offset = start.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = tpl.set_partition_offset(&self.settings.topic, p, offset) {
                        warn!(partition = p, error = %e, "cannot set routed start offset");
                    }
                }
                info!(?partitions, "routed partitions assigned");
                self.status.set_routed_assigned(partitions);
                if let Err(e) = consumer.assign(tpl) {
                    warn!(error = %e, "routed assign failed");
                }
            }
            _ => {
                if let Err(e) = self.store() {
                    warn!(error = %e, "storing routed progress before giving the partitions up failed");
                }
                self.forget();
                if let Err(e) = consumer.unassign() {
                    warn!(error = %e, "routed unassign failed");
                }
            }
        }
    }
}

impl RoutedContext {
    fn state(&self) -> MutexGuard<'_, RoutedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn retry<T>(&self, what: &str, step: impl FnMut() -> Result<T, String>) -> Option<T> {
        super::retry_blocking(what, self.settings.retry_backoff, &self.cancel, step, || {})
    }

    fn fresh_detectors(&self) -> Vec<Detector> {
        detectors_for(&self.settings.keys)
    }

    fn forget(&self) {
        let detectors = self.fresh_detectors();
        let mut state = self.state();
        state.detectors = detectors;
        // Another instance reports these partitions' lag now.
        for p in state.positions.keys() {
            metrics::gauge!("audit_routed_consumer_lag_messages", "partition" => p.to_string()).set(0.0);
        }
        state.positions.clear();
        state.marks.clear();
        state.slots = StreamSlots::default();
        state.dirty_marks.clear();
        drop(state);
        self.status.set_routed_assigned(Vec::new());
    }

    /// Rebuilds the state of `partitions` and returns where each resumes.
    fn load(&self, partitions: &[i32]) -> Result<Vec<(i32, Option<i64>)>, String> {
        let s = &self.settings;
        let mut detectors = self.fresh_detectors();
        self.runtime.block_on(async {
            let client = self.pool.get().await.map_err(|e| with_causes(&e))?;
            let stored: HashMap<i32, i64> = client
                .query(queries::STORED_OFFSETS, &[&s.group, &s.topic, &partitions])
                .await
                .map_err(|e| with_causes(&e))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let marks: HashMap<(i32, i32), i64> = client
                .query(queries::ROUTED_PROGRESS, &[&s.group, &partitions])
                .await
                .map_err(|e| with_causes(&e))?
                .iter()
                .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                .collect();
            // Open alerts whose key lands on these partitions.
            let specs: Vec<&str> = s.keys.iter().map(|k| k.text.as_str()).collect();
            let open: Vec<OpenEpisode> = client
                .query(queries::OPEN_ROUTED_ALERTS, &[&specs])
                .await
                .map_err(|e| with_causes(&e))?
                .iter()
                .filter(|r| partitions.contains(&routing::partition_of(r.get::<_, i64>(3) as u64, s.partitions)))
                .filter_map(open_episode)
                .collect();
            let restored = open.len();
            for (k, detector) in s.keys.iter().zip(&mut detectors) {
                detector.restore(open.iter().filter(|ep| ep.key_spec == k.text).cloned().collect());
                detector.set_emitting(false);
            }
            // Replay what these partitions have counted so far.
            let span = detectors.iter().map(Detector::rebuild_span).max().unwrap_or_default();
            // Every events partition feeds every routing partition. (Their
            // windows end at the newest event stored, which may be past what
            // was counted here; the marks bound what is replayed.)
            let windows = RebuildWindows::read(
                &client,
                (&s.events_group, &s.events_topic),
                None,
                span.min(s.rebuild_window_max),
                s.rebuild_window_max,
            )
            .await
            .map_err(|e| with_causes(&e))?;
            let (mut exact, mut prefixes) = (Vec::new(), Vec::new());
            for d in &detectors {
                let (e, p) = d.relevant_actions();
                exact.extend(e);
                prefixes.extend(p);
            }
            // A routed detector sees each source partition's events in order,
            // but only those routed to its partition: which of them were late
            // is not what a filter over all of them would say. Each source
            // partition is replayed in offset order instead, and each
            // detector drops again, per stream, what it dropped live.
            let rows =
                windows.events(&client, &exact, &prefixes, ReplayOrder::Streams).await.map_err(|e| with_causes(&e))?;
            pin_mut!(rows);
            let (mut replayed, mut discard) = (0u64, Vec::new());
            let mut slots = StreamSlots::default();
            while let Some(row) = rows.next().await {
                let row = row.map_err(|e| with_causes(&e))?;
                let (source_partition, source_offset): (i32, i64) = (row.get(10), row.get(11));
                let event = row_to_event(&row);
                for (k, p) in routing::routes(&s.keys, s.partitions, &event) {
                    let counted = marks.get(&(p, source_partition)).is_some_and(|&mark| source_offset <= mark);
                    if partitions.contains(&p) && counted {
                        detectors[k].observe(&event, slots.of(p, source_partition), &mut discard);
                        discard.clear();
                        replayed += 1;
                    }
                }
            }
            for d in &mut detectors {
                d.set_emitting(true);
            }
            info!(?partitions, restored, replayed, "routed detector state rebuilt");
            // Transitions of these partitions' keys never acknowledged: again,
            // under the same alert_id.
            let undelivered: Vec<Transition> = client
                .query(queries::UNDELIVERED_ROUTED_ALERTS, &[&specs])
                .await
                .map_err(|e| with_causes(&e))?
                .iter()
                .filter(|r| partitions.contains(&routing::partition_of(r.get::<_, i64>(3) as u64, s.partitions)))
                .filter_map(stored_transition)
                .collect();
            let mut state = self.state();
            if !undelivered.is_empty() {
                info!(
                    resent = undelivered.len(),
                    ?partitions,
                    "sent again the routed alerts Kafka had not acknowledged"
                );
            }
            for t in &undelivered {
                state.publisher.resend(t);
            }
            state.detectors = detectors;
            state.positions =
                partitions.iter().map(|p| (*p, (stored.get(p).copied(), stored.get(p).copied()))).collect();
            state.marks = marks;
            state.slots = slots;
            state.dirty_marks.clear();
            Ok(partitions.iter().map(|p| (*p, stored.get(p).copied())).collect())
        })
    }

    /// Counts the events of one routed record.
    fn observe(&self, message: &BorrowedMessage<'_>) {
        let p = message.partition();
        let header =
            |name: &str| message.headers().and_then(|hs| hs.iter().find(|h| h.key == name).and_then(|h| h.value));
        let key = header(HEADER_KEY_SPEC).and_then(|v| std::str::from_utf8(v).ok());
        let skipped = |reason: &'static str, n: usize| {
            metrics::counter!("audit_routed_events_skipped_total", "reason" => reason).increment(n as u64);
        };
        let mut guard = self.state();
        let state = &mut *guard;
        let Some(position) = state.positions.get_mut(&p) else { return };
        position.0 = Some(message.offset() + 1);
        let Some(index) = key.and_then(|key| self.settings.keys.iter().position(|k| k.text == key)) else {
            // A rule removed since, or not our record: nothing to count.
            return skipped("unknown", 1);
        };
        let entries: Vec<RoutedEntry<'_>> = match split_single_object(message.payload().unwrap_or_default()) {
            Ok((fingerprint, body)) if fingerprint == routed_events_fingerprint() => {
                match decode_routed_entries(body) {
                    Ok(entries) => entries,
                    Err(_) => return skipped("undecodable", 1),
                }
            }
            // One event a record, its source in a header: what versions
            // before src/event/routed.rs wrote.
            Ok((fingerprint, body)) if fingerprint == auth_event_fingerprint() => {
                let source = header(HEADER_SOURCE)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.split_once(':'))
                    .and_then(|(sp, so)| Some((sp.parse::<i32>().ok()?, so.parse::<i64>().ok()?)));
                match source {
                    Some((source_partition, source_offset)) => {
                        vec![RoutedEntry { source_partition, source_offset, event: body }]
                    }
                    None => return skipped("unknown", 1),
                }
            }
            _ => return skipped("undecodable", 1),
        };
        let mut out = Vec::new();
        let (mut resent, mut undecodable) = (0, 0);
        for RoutedEntry { source_partition: sp, source_offset: so, event: body } in entries {
            if state.marks.get(&(p, sp)).is_some_and(|&mark| so <= mark) {
                resent += 1;
                continue;
            }
            let Ok(event) = self.plan.decode(body) else {
                undecodable += 1;
                continue;
            };
            state.marks.insert((p, sp), so);
            state.dirty_marks.insert((p, sp));
            let slot = state.slots.of(p, sp);
            state.detectors[index].observe(&event, slot, &mut out);
        }
        if resent > 0 {
            skipped("resent", resent);
        }
        if undecodable > 0 {
            skipped("undecodable", undecodable);
        }
        Self::offer(state, out);
    }

    fn offer(state: &mut RoutedState, transitions: Vec<Transition>) {
        for mut t in transitions {
            // Found by key hash, not by an events-topic partition.
            t.partition = -1;
            let sent = state.publisher.offer(&t);
            state.pending.push((t, sent));
        }
    }

    fn tick(&self) {
        let mut guard = self.state();
        let state = &mut *guard;
        let mut out = Vec::new();
        for d in &mut state.detectors {
            d.tick(&mut out);
        }
        Self::offer(state, out);
        state.publisher.flush_withheld(chrono::Utc::now().timestamp_micros());
    }

    /// Stores the alerts made, the offsets and the marks in one transaction;
    /// returns the (partition, next offset) pairs it stored.
    fn store(&self) -> Result<Vec<(i32, i64)>, StoreError> {
        let (alerts, moved, marks) = {
            let state = self.state();
            let moved: Vec<(i32, i64, Option<i64>)> = state
                .positions
                .iter()
                .filter_map(|(p, (next, stored))| next.filter(|n| Some(*n) != *stored).map(|n| (*p, n, *stored)))
                .collect();
            let marks: Vec<(i32, i32, i64)> =
                state.dirty_marks.iter().filter_map(|k| state.marks.get(k).map(|m| (k.0, k.1, *m))).collect();
            (state.pending.clone(), moved, marks)
        };
        if alerts.is_empty() && moved.is_empty() && marks.is_empty() {
            return Ok(Vec::new());
        }
        let s = &self.settings;
        let stored_partitions: Vec<i32> = self.runtime.block_on(async {
            let mut client = self.pool.get().await.map_err(|e| StoreError::Db(with_causes(&e)))?;
            let tx = client.transaction().await?;
            let refs: Vec<(&Transition, bool)> = alerts.iter().map(|(t, p)| (t, *p)).collect();
            crate::store::writer::record_alerts(&tx, &refs).await?;
            let partitions: Vec<i32> = moved.iter().map(|m| m.0).collect();
            let next: Vec<i64> = moved.iter().map(|m| m.1).collect();
            let expected: Vec<Option<i64>> = moved.iter().map(|m| m.2).collect();
            // No event time: the routing topic's offsets are not rebuilt from.
            let no_event_times: Vec<Option<chrono::DateTime<chrono::Utc>>> = vec![None; partitions.len()];
            let advanced: Vec<i32> = tx
                .query(queries::ADVANCE_OFFSETS, &[&s.group, &s.topic, &partitions, &next, &expected, &no_event_times])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if advanced.len() != partitions.len() {
                // Another routed consumer moved them: it owns them now.
                return Err(StoreError::Fenced(partitions.into_iter().filter(|p| !advanced.contains(p)).collect()));
            }
            let (mp, ms, mo): (Vec<i32>, Vec<i32>, Vec<i64>) =
                marks.iter().fold((Vec::new(), Vec::new(), Vec::new()), |(mut a, mut b, mut c), m| {
                    a.push(m.0);
                    b.push(m.1);
                    c.push(m.2);
                    (a, b, c)
                });
            tx.execute(queries::ADVANCE_ROUTED_PROGRESS, &[&s.group, &mp, &ms, &mo]).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(partitions)
        })?;
        self.status.routed_stored();
        let mut state = self.state();
        let stored = alerts.len();
        let done = stored.min(state.pending.len());
        state.pending.drain(..done);
        for (p, next, _) in &moved {
            if let Some(position) = state.positions.get_mut(p) {
                position.1 = Some(*next);
            }
        }
        for (p, sp, m) in &marks {
            if state.marks.get(&(*p, *sp)) == Some(m) {
                state.dirty_marks.remove(&(*p, *sp));
            }
        }
        debug!(alerts = stored, partitions = ?stored_partitions, "routed progress stored");
        Ok(moved.iter().map(|(p, next, _)| (*p, *next)).collect())
    }
}

/// Commits the offsets just stored in PostgreSQL to Kafka as well, for the
/// group's lag tooling only: the stored ones are where consumption resumes.
fn commit_to_kafka(consumer: &BaseConsumer<RoutedContext>, stored: &[(i32, i64)]) {
    if stored.is_empty() {
        return;
    }
    let topic = &consumer.context().settings.topic;
    let mut tpl = TopicPartitionList::new();
    for (p, next) in stored {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*next));
    }
    if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
        debug!(error = %e, "routed Kafka offset commit failed");
    }
}

/// One fresh detector per routed key spec.
fn detectors_for(keys: &[RoutedKey]) -> Vec<Detector> {
    // routing::split compiled these configs when the service started.
    keys.iter().map(|k| Detector::new(&k.config).expect("the routed rules compiled at start")).collect()
}

/// Creates the routed consumer (subscribed, not polling yet).
pub fn consumer(
    client_config: rdkafka::ClientConfig,
    runtime: Handle,
    pool: Pool,
    settings: RoutedSettings,
    publisher: AlertPublisher,
    status: Arc<IngestStatus>,
    cancel: CancellationToken,
) -> Result<BaseConsumer<RoutedContext>, rdkafka::error::KafkaError> {
    status.routed_started(&settings.topic, &settings.group, settings.partitions);
    let detectors = detectors_for(&settings.keys);
    let topic = settings.topic.clone();
    let schema = apache_avro::Schema::parse_str(AUTH_EVENT_SCHEMA).expect("built-in schema is valid");
    let plan = ReadPlan::compile(&schema).expect("the built-in schema reads itself");
    let context = RoutedContext {
        runtime,
        plan,
        pool,
        settings,
        state: Mutex::new(RoutedState {
            detectors,
            publisher,
            positions: HashMap::new(),
            marks: HashMap::new(),
            slots: StreamSlots::default(),
            dirty_marks: HashSet::new(),
            pending: Vec::new(),
        }),
        status,
        partition_change_reported: AtomicBool::new(false),
        cancel,
    };
    let consumer: BaseConsumer<RoutedContext> = client_config.create_with_context(context)?;
    consumer.subscribe(&[&topic])?;
    Ok(consumer)
}

/// The poll loop; returns when `cancel` fires (after storing progress).
pub fn run_loop(consumer: BaseConsumer<RoutedContext>) {
    let ctx = consumer.context();
    let (mut last_store, mut last_tick) = (Instant::now(), Instant::now());
    // Said once per outage, not once per attempt.
    let mut failing = false;
    while !ctx.cancel.is_cancelled() {
        if let Some(result) = consumer.poll(POLL_WAIT) {
            match result {
                Ok(message) => ctx.observe(&message),
                Err(e) => {
                    metrics::counter!("audit_kafka_errors_total").increment(1);
                    warn!(error = %e, "routed consume error");
                }
            }
        }
        if last_tick.elapsed() >= TICK {
            ctx.tick();
            last_tick = Instant::now();
        }
        if last_store.elapsed() >= STORE_EVERY {
            match ctx.store() {
                Ok(stored) => {
                    failing = false;
                    commit_to_kafka(&consumer, &stored);
                }
                Err(StoreError::Fenced(partitions)) => {
                    // This consumer was replaced (a rebalance it missed):
                    // drop what it counted and wait to be assigned again.
                    warn!(?partitions, "routed partitions taken over by another consumer; giving them up");
                    ctx.state().pending.clear();
                    ctx.forget();
                    if let Err(e) = consumer.unassign() {
                        warn!(error = %e, "routed unassign failed");
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!(error = %e, "storing routed progress failed; will retry");
                }
                Err(_) => {}
            }
            last_store = Instant::now();
        }
    }
    if let Err(e) = ctx.store() {
        warn!(error = %e, "storing routed progress at shutdown failed");
    }
    consumer.unsubscribe();
    drop(consumer);
    info!("routed consumer stopped");
}
