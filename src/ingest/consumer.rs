//! The consumer thread: polls the events topic, decodes and validates each
//! message, builds batches and hands them to the writer.
//!
//! It runs on a plain OS thread (not a runtime worker) because librdkafka's
//! callbacks (rebalance, statistics) run inside `poll`, and the rebalance
//! callback must read the stored offsets from PostgreSQL before it assigns:
//! blocking on that here is correct, blocking a runtime worker would not be.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::batch::{Batch, BatchBuilder, Header, Position, SourceMessage};
use super::detection::Detection;
use super::status::IngestStatus;
use super::writer::{WriterCommand, WriterEvent};
use crate::event::{Decoder, EpochMicros};
use crate::store::queries;

/// Longest a poll blocks, so that commands, pauses and shutdown are seen.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);
/// How long the loop waits for room in the writer's queue before it pauses
/// its partitions and goes back to polling.
const BRIEF_BACKPRESSURE_WAIT: Duration = Duration::from_millis(500);
/// Messages taken from the client per loop turn at most.
const BURST: usize = 256;
/// How often the lag is asked of the brokers while consumption is paused.
const LAG_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// One writer and what goes to it: the partitions `p` with
/// `p % lanes == lane`. Several lanes write in parallel over their own
/// connections; a partition always takes the same lane, so its batches
/// still commit in order (its offsets advance one transaction at a time).
struct Lane {
    builder: BatchBuilder,
    /// A closed batch the writer's queue had no room for yet.
    waiting: Option<Batch>,
    commands: mpsc::Sender<WriterCommand>,
}

/// State shared between the poll loop and the rebalance callback (which
/// runs inside `poll`, on the same thread: the lock is never contended).
struct LoopState {
    lanes: Vec<Lane>,
    positions: HashMap<i32, Position>,
    next_epoch: u64,
    /// Bumped on every assignment change, to re-apply a pause.
    assignment_generation: u64,
    /// The detectors and the alert publisher (None when detection is off).
    detection: Option<Detection>,
}

pub struct IngestContext {
    runtime: Handle,
    pool: Pool,
    group: String,
    topic: String,
    state: Mutex<LoopState>,
    status: Arc<IngestStatus>,
    drain_timeout: Duration,
    retry_backoff: (Duration, Duration),
    cancel: CancellationToken,
}

pub struct ContextSettings {
    pub group: String,
    pub topic: String,
    pub batch_max_rows: usize,
    pub batch_max_age: Duration,
    pub drain_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl IngestContext {
    pub fn new(
        runtime: Handle,
        pool: Pool,
        settings: ContextSettings,
        writers: Vec<mpsc::Sender<WriterCommand>>,
        status: Arc<IngestStatus>,
        detection: Option<Detection>,
        cancel: CancellationToken,
    ) -> Self {
        IngestContext {
            runtime,
            pool,
            group: settings.group,
            topic: settings.topic,
            state: Mutex::new(LoopState {
                lanes: writers
                    .into_iter()
                    .map(|commands| Lane {
                        builder: BatchBuilder::new(settings.batch_max_rows, settings.batch_max_age),
                        waiting: None,
                        commands,
                    })
                    .collect(),
                positions: HashMap::new(),
                next_epoch: 1,
                assignment_generation: 0,
                detection,
            }),
            status,
            drain_timeout: settings.drain_timeout,
            retry_backoff: (settings.initial_backoff, settings.max_backoff),
            cancel,
        }
    }

    fn state(&self) -> MutexGuard<'_, LoopState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a database step from this thread, retried with backoff until it
    /// succeeds. `None` only when shutting down.
    fn retry_db<T>(&self, what: &str, step: impl FnMut() -> Result<T, String>) -> Option<T> {
        super::retry_blocking(what, self.retry_backoff, &self.cancel, step, || self.status.db_error())
    }

    /// Stored positions of `partitions`, retried until PostgreSQL answers.
    fn stored_offsets(&self, partitions: &[i32]) -> Option<HashMap<i32, i64>> {
        self.retry_db("reading stored offsets", || {
            self.runtime.block_on(async {
                let client = self.pool.get().await.map_err(|e| crate::store::with_causes(&e))?;
                let rows = client
                    .query(queries::STORED_OFFSETS, &[&self.group, &self.topic, &partitions])
                    .await
                    .map_err(|e| crate::store::with_causes(&e))?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })
    }

    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<i32> = tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect();
        let Some(stored) = self.stored_offsets(&partitions) else {
            warn!("shutting down during assignment; not assigning");
            return;
        };
        let mut state = self.state();
        if let Some(detection) = state.detection.as_mut() {
            // Detector state for these partitions comes from what is stored
            // below the offsets we resume from: nothing twice, nothing lost.
            let rebuilt = self.retry_db("rebuilding detector state", || {
                self.runtime.block_on(detection.rebuild(&self.pool, &partitions))
            });
            if rebuilt.is_none() {
                return;
            }
        }
        for &p in &partitions {
            let offset = stored.get(&p).copied();
            // No stored position means nothing of this partition is in the
            // audit log yet: read it from the beginning rather than trust a
            // Kafka-committed offset that may be ahead of the database.
            let start = offset.map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = tpl.set_partition_offset(&self.topic, p, start) {
                error!(partition = p, error = %e, "cannot set start offset");
            }
            let epoch = state.next_epoch;
            state.next_epoch += 1;
            state.positions.insert(p, Position { epoch, expected: offset });
        }
        state.assignment_generation += 1;
        drop(state);
        info!(?partitions, ?stored, "partitions assigned; resuming from stored offsets");
        if let Err(e) = consumer.assign(tpl) {
            error!(error = %e, "assign failed");
        }
        self.status.set_assigned(partitions);
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>) {
        info!("partitions revoked; flushing what was consumed");
        self.drain();
        let mut state = self.state();
        state.positions.clear();
        // Their detector state is the next owner's now; whatever comes back
        // to this instance is rebuilt from what is stored then.
        if let Some(detection) = state.detection.as_mut() {
            detection.forget_all();
        }
        state.assignment_generation += 1;
        drop(state);
        if let Err(e) = consumer.unassign() {
            warn!(error = %e, "unassign failed");
        }
        self.status.set_assigned(Vec::new());
        // Another instance reports these partitions' lag now.
        for p in self.status.snapshot().lag.keys() {
            metrics::gauge!("audit_consumer_lag_messages", "topic" => self.topic.clone(), "partition" => p.to_string())
                .set(0.0);
        }
        self.status.set_lag(BTreeMap::new());
    }

    /// Sends whatever is open or waiting to the writer and waits (bounded)
    /// until the writer has handled it.
    fn drain(&self) {
        let work: Vec<(mpsc::Sender<WriterCommand>, Vec<Batch>)> = {
            let mut state = self.state();
            let state = &mut *state;
            state
                .lanes
                .iter_mut()
                .map(|lane| {
                    let mut v: Vec<Batch> = lane.waiting.take().into_iter().collect();
                    v.extend(lane.builder.take(&mut state.positions));
                    (lane.commands.clone(), v)
                })
                .collect()
        };
        let deadline = self.drain_timeout;
        let mut acks = Vec::new();
        for (commands, batches) in work {
            for batch in batches {
                let sent = self.runtime.block_on(async {
                    tokio::time::timeout(deadline, commands.send(WriterCommand::Batch(batch))).await
                });
                if !matches!(sent, Ok(Ok(()))) {
                    warn!("writer did not take the last batch in time; it will be read again");
                    return;
                }
            }
            let (ack_tx, ack_rx) = std::sync::mpsc::channel();
            let sent = self.runtime.block_on(async {
                tokio::time::timeout(deadline, commands.send(WriterCommand::Barrier(ack_tx))).await
            });
            if matches!(sent, Ok(Ok(()))) {
                acks.push(ack_rx);
            }
        }
        // The lanes finish in parallel; wait for each.
        for ack in acks {
            if ack.recv_timeout(deadline).is_err() {
                warn!("writer did not finish in time; unwritten messages will be read again");
            }
        }
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, statistics: Statistics) {
        // Paused partitions are not fetched: their statistics are stale, and
        // the loop asks the brokers instead (probe_lag).
        if self.status.paused() {
            return;
        }
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        let assigned: Vec<i32> = self.state().positions.keys().copied().collect();
        let mut lag = BTreeMap::new();
        for (p, stats) in &topic.partitions {
            if assigned.contains(p) && stats.consumer_lag >= 0 {
                lag.insert(*p, stats.consumer_lag);
                metrics::gauge!("audit_consumer_lag_messages", "topic" => self.topic.clone(), "partition" => p.to_string())
                    .set(stats.consumer_lag as f64);
            }
        }
        self.status.set_lag(lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        metrics::counter!("audit_kafka_errors_total").increment(1);
        warn!(error = %error, reason, "Kafka client error");
        self.status.kafka_error(Some(format!("{error}: {reason}")));
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(consumer),
            other => {
                error!(error = ?other, "rebalance error; dropping the assignment");
                self.on_revoke(consumer);
            }
        }
    }
}

/// The poll loop. Returns when `cancel` fires (after flushing) or when the
/// writer has gone away.
pub fn run_loop(
    consumer: BaseConsumer<IngestContext>,
    decoder: Decoder,
    writer_events: std::sync::mpsc::Receiver<WriterEvent>,
) {
    let ctx = consumer.context().clone();
    let mut paused_generation: Option<u64> = None;
    let mut last_lag_probe = Instant::now();
    let mut registry_waits: HashMap<i32, RegistryWait> = HashMap::new();
    loop {
        if ctx.cancel.is_cancelled() {
            break;
        }
        if paused_generation.is_none() {
            // (While everything is paused, for maintenance or backpressure,
            // a wait over resumes nothing: the general resume does.)
            retry_registry_waits(&consumer, &mut registry_waits);
        }
        handle_writer_events(&consumer, &writer_events, CommitMode::Async);
        {
            let mut guard = ctx.state();
            let state = &mut *guard;
            if let Some(detection) = state.detection.as_mut() {
                let alerts = detection.tick_if_due();
                state.lanes[0].builder.push_alerts(alerts);
            }
        }
        if !hand_off_due_batch(&ctx) {
            error!("writer stopped; consumer loop exits");
            break;
        }
        let wait = {
            let state = ctx.state();
            let backpressure = state.lanes.iter().any(|l| l.waiting.is_some());
            let should_pause = backpressure || ctx.status.maintenance_paused();
            ctx.status.set_backpressure_paused(backpressure);
            match (should_pause, paused_generation) {
                (true, Some(g)) if g == state.assignment_generation => {}
                (true, _) => {
                    set_paused(&consumer, true);
                    paused_generation = Some(state.assignment_generation);
                }
                (false, Some(_)) => {
                    set_paused(&consumer, false);
                    paused_generation = None;
                }
                (false, None) => {}
            }
            let now = Instant::now();
            state
                .lanes
                .iter()
                .filter_map(|l| l.builder.time_until_due(now))
                .min()
                .unwrap_or(MAX_POLL_WAIT)
                .min(MAX_POLL_WAIT)
        };
        if paused_generation.is_some() && last_lag_probe.elapsed() >= LAG_PROBE_INTERVAL {
            probe_lag(&consumer);
            last_lag_probe = Instant::now();
        }
        // Take what is already fetched in a burst, so that the loop's
        // upkeep (clock reads, hand-off, pauses) is paid per burst, not per
        // message. The burst may carry a batch a little past its size.
        let mut wait = wait;
        for _ in 0..BURST {
            match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    metrics::counter!("audit_kafka_errors_total").increment(1);
                    warn!(error = %e, "consume error");
                    break;
                }
                Some(Ok(message)) => {
                    let (partition, offset) = (message.partition(), message.offset());
                    let waiting = !registry_waits.is_empty();
                    if waiting && registry_waits.get(&partition).is_some_and(|w| offset > w.offset) {
                        // Behind a message that waits for the registry: read
                        // again after it (the seek back brings them again).
                        continue;
                    }
                    match ingest_message(&ctx, &decoder, &message) {
                        Ingested::Taken => {
                            if waiting && registry_waits.remove(&partition).is_some() && registry_waits.is_empty() {
                                ctx.status.registry_answered();
                            }
                        }
                        Ingested::WaitsForRegistry => {
                            wait_for_registry(&consumer, &mut registry_waits, partition, offset)
                        }
                    }
                }
            }
            // A maintenance pause takes effect within one message, not one
            // burst: the operator's switch is the point where intake stops.
            if ctx.status.maintenance_paused() {
                break;
            }
            wait = Duration::ZERO;
        }
    }
    info!("consumer stopping: flushing the open batch");
    ctx.drain();
    handle_writer_events(&consumer, &writer_events, CommitMode::Sync);
    consumer.unsubscribe();
    // Dropping the consumer closes it: it leaves the group (the revoke
    // callback finds nothing left to flush).
    drop(consumer);
    info!("consumer stopped");
}

/// Closes each lane's due batch and offers it to the lane's writer; a full
/// queue keeps it waiting (and the loop pauses). False when a writer is gone.
fn hand_off_due_batch(ctx: &IngestContext) -> bool {
    let mut guard = ctx.state();
    let state = &mut *guard;
    let now = Instant::now();
    for lane in &mut state.lanes {
        if lane.waiting.is_none() && lane.builder.is_due(now) {
            lane.waiting = lane.builder.take(&mut state.positions);
        }
        if !offer_waiting(ctx, lane) {
            return false;
        }
    }
    true
}

/// The lane (writer) of a partition.
fn lane_of(partition: i32, lanes: usize) -> usize {
    partition.unsigned_abs() as usize % lanes.max(1)
}

fn offer_waiting(ctx: &IngestContext, lane: &mut Lane) -> bool {
    if let Some(batch) = lane.waiting.take() {
        match lane.commands.try_send(WriterCommand::Batch(batch)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(WriterCommand::Batch(batch))) => {
                // The writer is busy: wait a little without polling. Fetching
                // goes on into librdkafka's own bounded queue meanwhile; a
                // pause (which drops that prefetch and costs a refetch) only
                // pays off when the writer is stuck for longer.
                let permit = ctx
                    .runtime
                    .block_on(async { tokio::time::timeout(BRIEF_BACKPRESSURE_WAIT, lane.commands.reserve()).await });
                match permit {
                    Ok(Ok(permit)) => permit.send(WriterCommand::Batch(batch)),
                    Ok(Err(_closed)) => return false,
                    Err(_elapsed) => lane.waiting = Some(batch),
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// A message whose schema the registry could not give: its partition waits
/// (paused) and reads it again after `retry_at`, from `offset`.
struct RegistryWait {
    offset: i64,
    retry_at: Instant,
    backoff: Duration,
    /// The assignment it belongs to; a new assignment starts afresh.
    generation: u64,
}

/// Pauses `partition` until the schema registry may answer: the message at
/// `offset` is read again then (by seeking back to it). The other
/// partitions, the rebalances and the maintenance switch go on meanwhile.
fn wait_for_registry(
    consumer: &BaseConsumer<IngestContext>,
    waits: &mut HashMap<i32, RegistryWait>,
    partition: i32,
    offset: i64,
) {
    let ctx = consumer.context();
    let generation = ctx.state().assignment_generation;
    let backoff = waits
        .get(&partition)
        .filter(|w| w.generation == generation)
        .map_or(ctx.retry_backoff.0, |w| (w.backoff * 2).min(ctx.retry_backoff.1));
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&ctx.topic, partition);
    if let Err(e) = consumer.pause(&tpl) {
        warn!(partition, error = %e, "cannot pause the partition waiting for the schema registry");
    }
    waits.insert(partition, RegistryWait { offset, retry_at: Instant::now() + backoff, backoff, generation });
}

/// Seeks each partition whose wait is over back to its message and resumes
/// it; forgets the waits of an earlier assignment.
fn retry_registry_waits(consumer: &BaseConsumer<IngestContext>, waits: &mut HashMap<i32, RegistryWait>) {
    if waits.is_empty() {
        return;
    }
    let ctx = consumer.context();
    let generation = ctx.state().assignment_generation;
    waits.retain(|_, w| w.generation == generation);
    let now = Instant::now();
    for (&partition, wait) in waits.iter_mut().filter(|(_, w)| w.retry_at <= now) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&ctx.topic, partition);
        match consumer.seek(&ctx.topic, partition, Offset::Offset(wait.offset), Duration::from_secs(10)) {
            Ok(()) => {
                if let Err(e) = consumer.resume(&tpl) {
                    warn!(partition, error = %e, "cannot resume the partition after waiting for the schema registry");
                }
                // Not asked again before the message comes back (or fails).
                wait.retry_at = now + ctx.retry_backoff.1.max(Duration::from_secs(60));
            }
            Err(e) => {
                warn!(partition, error = %e, "cannot seek back to the message waiting for the schema registry; will retry");
                wait.retry_at = now + wait.backoff;
            }
        }
    }
}

/// Whether a message was taken (stored, dead-lettered or skipped), or must
/// wait for the schema registry.
enum Ingested {
    Taken,
    WaitsForRegistry,
}

fn ingest_message(ctx: &IngestContext, decoder: &Decoder, message: &BorrowedMessage<'_>) -> Ingested {
    let source = || SourceMessage {
        partition: message.partition(),
        offset: message.offset(),
        timestamp: message.timestamp().to_millis(),
        key: message.key(),
        payload: message.payload(),
        headers: message
            .headers()
            .map(|hs| hs.iter().map(|h| Header { key: h.key.to_owned(), value: h.value.map(<[u8]>::to_vec) }).collect())
            .unwrap_or_default(),
    };
    let payload = message.payload().unwrap_or_default();
    // One clock read per message: the decoder's "now" and received_at.
    let now = now_micros();
    let decoded = decoder.decode(payload, now);
    if let Err(e) = &decoded
        && e.is_transient()
    {
        // Not the message's fault (the schema registry is away): its
        // partition waits for it rather than dead-letter it.
        warn!(error = %e, partition = message.partition(), offset = message.offset(), "transient decode failure; the partition waits");
        ctx.status.registry_unavailable(e.to_string());
        return Ingested::WaitsForRegistry;
    }
    let mut guard = ctx.state();
    let state = &mut *guard;
    if !state.positions.contains_key(&message.partition()) {
        // Consumed just before its partition was revoked; the next owner
        // reads it again.
        return Ingested::Taken;
    }
    let lane = lane_of(message.partition(), state.lanes.len());
    let builder = &mut state.lanes[lane].builder;
    match decoded {
        Ok((event, encoding)) => {
            metrics::counter!("audit_events_consumed_total", "encoding" => encoding.as_str()).increment(1);
            if let Some(detection) = state.detection.as_mut() {
                let alerts = detection.observe(&event, message.partition());
                builder.push_alerts(alerts);
            }
            builder.push_event(source(), event, encoding, now);
        }
        Err(e) => {
            metrics::counter!("audit_events_consumed_total", "encoding" => "invalid").increment(1);
            debug!(reason = e.code(), partition = message.partition(), offset = message.offset(), "dead-lettering");
            builder.push_dead(source(), &e);
        }
    }
    Ingested::Taken
}

/// Commits stored positions to Kafka (for lag tooling) and re-seeks fenced
/// partitions to the position another consumer stored.
fn handle_writer_events(
    consumer: &BaseConsumer<IngestContext>,
    events: &std::sync::mpsc::Receiver<WriterEvent>,
    mode: CommitMode,
) {
    let ctx = consumer.context();
    let mut commit: BTreeMap<i32, i64> = BTreeMap::new();
    while let Ok(event) = events.try_recv() {
        match event {
            WriterEvent::Committed(offsets) => commit.extend(offsets),
            WriterEvent::Fenced { partition, epoch } => reseek_fenced(consumer, partition, epoch),
        }
    }
    if commit.is_empty() {
        return;
    }
    let assigned: Vec<i32> = ctx.state().positions.keys().copied().collect();
    let mut tpl = TopicPartitionList::new();
    for (p, next) in commit.into_iter().filter(|(p, _)| assigned.contains(p)) {
        let _ = tpl.add_partition_offset(&ctx.topic, p, Offset::Offset(next));
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, mode)
    {
        // Only lag tooling reads these; the next commit catches up.
        debug!(error = %e, "Kafka offset commit failed");
    }
}

fn reseek_fenced(consumer: &BaseConsumer<IngestContext>, partition: i32, epoch: u64) {
    let ctx = consumer.context();
    if ctx.state().positions.get(&partition).map(|p| p.epoch) != Some(epoch) {
        return; // reassigned since; the assignment already read the offset
    }
    let Some(stored) = ctx.stored_offsets(&[partition]) else { return };
    let offset = stored.get(&partition).copied();
    {
        let mut guard = ctx.state();
        let state = &mut *guard;
        let lane = lane_of(partition, state.lanes.len());
        let lane = &mut state.lanes[lane];
        lane.builder.discard_partitions(&[partition]);
        if let Some(waiting) = &mut lane.waiting {
            waiting.remove_partitions(&[partition]);
        }
        let epoch = state.next_epoch;
        state.next_epoch += 1;
        state.positions.insert(partition, Position { epoch, expected: offset });
    }
    let target = offset.map_or(Offset::Beginning, Offset::Offset);
    warn!(partition, ?offset, "offsets moved by another consumer; seeking to the stored position");
    if let Err(e) = consumer.seek(&ctx.topic, partition, target, Duration::from_secs(10)) {
        error!(partition, error = %e, "seek after fence failed");
    }
}

/// While paused, librdkafka fetches nothing, so its statistics keep the
/// lag of the moment of the pause. Ask the brokers for the end of each
/// partition instead; the lag is what lies beyond the stored position.
fn probe_lag(consumer: &BaseConsumer<IngestContext>) {
    let ctx = consumer.context();
    let positions: Vec<(i32, Option<i64>)> = ctx.state().positions.iter().map(|(p, pos)| (*p, pos.expected)).collect();
    let mut lag = BTreeMap::new();
    for (partition, stored) in positions {
        match consumer.fetch_watermarks(&ctx.topic, partition, Duration::from_secs(2)) {
            Ok((low, high)) => {
                let behind = (high - stored.unwrap_or(low)).max(0);
                lag.insert(partition, behind);
                metrics::gauge!("audit_consumer_lag_messages", "topic" => ctx.topic.clone(), "partition" => partition.to_string())
                    .set(behind as f64);
            }
            Err(e) => debug!(partition, error = %e, "watermark query failed"),
        }
    }
    if !lag.is_empty() {
        ctx.status.set_lag(lag);
    }
}

fn set_paused(consumer: &BaseConsumer<IngestContext>, paused: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    if assignment.count() == 0 {
        return;
    }
    let result = if paused { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    match result {
        Ok(()) => debug!(paused, "consumption paused/resumed"),
        Err(e) => warn!(error = %e, paused, "pause/resume failed"),
    }
}

pub fn now_micros() -> EpochMicros {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.as_micros() as EpochMicros
}
