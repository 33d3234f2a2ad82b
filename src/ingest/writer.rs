//! The writer task: takes batches from the consumer thread, in order, and
//! makes each durable: dead letters acknowledged by Kafka first (and the
//! records of routed detection, produced while the statements run, before
//! the commit), then rows,
//! dead-letter records and offsets in one PostgreSQL transaction. A batch is
//! retried (with backoff) until it commits; the bounded queue in front of
//! this task is what pauses the consumer while PostgreSQL is away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use super::batch::Batch;
use super::dlq::DeadLetterProducer;
use super::router::Router;
use super::status::IngestStatus;
use crate::activity::hll::ActiveUsers;
use crate::activity::{ACTION_LABELS, ActivityConfig, action_label_index};
use crate::store::copy_format::RowRef;
use crate::store::writer::{self, DeadLetterRecord, InsertMethod, OffsetAdvance, WriteError, WriteResult, WriteSet};

/// What the consumer thread sends to the writer.
pub enum WriterCommand {
    Batch(Batch),
    /// Answered once every batch sent before it has been handled.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// What the writer tells the consumer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterEvent {
    /// These partitions' next offsets are stored; commit them to Kafka too.
    Committed(Vec<(i32, i64)>),
    /// Another consumer moved this partition's stored offset: re-read it
    /// and seek there.
    Fenced { partition: i32, epoch: u64 },
}

pub struct WriterSettings {
    /// Sessions and rollups kept in the batch transaction (None: off).
    pub activity: Option<ActivityConfig>,
    pub group: String,
    pub topic: String,
    /// Actions counted as failed logins (`audit_failed_logins_total`).
    pub failure_actions: Vec<String>,
    pub method: InsertMethod,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

pub struct BatchWriter {
    pool: Pool,
    dlq: DeadLetterProducer,
    router: Option<Router>,
    settings: WriterSettings,
    status: Arc<IngestStatus>,
    events: std::sync::mpsc::Sender<WriterEvent>,
    /// partition → epoch whose batches must be dropped (fenced).
    fenced: HashMap<i32, u64>,
    /// Shared by the lanes: one estimate of distinct active users.
    active_users: Arc<Mutex<ActiveUsers>>,
}

enum AttemptError {
    Pool(deadpool_postgres::PoolError),
    Write(WriteError),
}

impl BatchWriter {
    pub fn new(
        pool: Pool,
        dlq: DeadLetterProducer,
        router: Option<Router>,
        settings: WriterSettings,
        status: Arc<IngestStatus>,
        events: std::sync::mpsc::Sender<WriterEvent>,
        active_users: Arc<Mutex<ActiveUsers>>,
    ) -> Self {
        BatchWriter { pool, dlq, router, settings, status, events, fenced: HashMap::new(), active_users }
    }

    /// Handles commands until the consumer thread drops its sender.
    pub async fn run(mut self, mut commands: mpsc::Receiver<WriterCommand>) {
        while let Some(command) = commands.recv().await {
            match command {
                WriterCommand::Batch(batch) => {
                    let span = info_span!(
                        "batch",
                        seq = batch.seq,
                        messages = batch.messages,
                        rows = batch.rows.len(),
                        dead = batch.dead.len()
                    );
                    self.write(batch).instrument(span).await;
                }
                WriterCommand::Barrier(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }

    async fn write(&mut self, mut batch: Batch) {
        let stale: Vec<i32> = batch
            .progress
            .iter()
            .filter(|p| self.fenced.get(&p.partition) == Some(&p.epoch))
            .map(|p| p.partition)
            .collect();
        if !stale.is_empty() {
            debug!(?stale, "dropping rows of fenced partitions");
            batch.remove_partitions(&stale);
        }
        if batch.progress.is_empty() && batch.alerts.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut dead_sent = 0;
        let mut backoff = self.settings.initial_backoff;
        loop {
            if dead_sent < batch.dead.len() {
                match self.dlq.send_all(&batch.dead[dead_sent..]).await {
                    Ok(()) => dead_sent = batch.dead.len(),
                    Err(e) => {
                        warn!(error = %e, "dead-letter produce failed; retrying");
                        metrics::counter!("audit_dlq_produce_errors_total").increment(1);
                        backoff = self.pause(backoff).await;
                        continue;
                    }
                }
            }
            match self.attempt(&batch).await {
                Ok(result) => {
                    self.committed(&batch, result, started);
                    return;
                }
                Err(AttemptError::Write(WriteError::Rejected(rejected))) => {
                    warn!(rows = rejected.len(), "PostgreSQL rejected rows; dead-lettering them");
                    // Highest index first so the remaining indexes stay valid.
                    for (index, message) in rejected.into_iter().rev() {
                        let letter = batch.dead_letter_for_row(index, "db_rejected", format!("PostgreSQL: {message}"));
                        batch.rows.remove(index);
                        batch.dead.push(letter);
                    }
                }
                Err(AttemptError::Write(WriteError::Fenced(partitions))) => {
                    warn!(?partitions, "another consumer moved these offsets; dropping our rows for them");
                    metrics::counter!("audit_offset_fence_conflicts_total").increment(partitions.len() as u64);
                    for p in batch.progress.iter().filter(|p| partitions.contains(&p.partition)) {
                        self.fenced.insert(p.partition, p.epoch);
                        let _ = self.events.send(WriterEvent::Fenced { partition: p.partition, epoch: p.epoch });
                    }
                    batch.remove_partitions(&partitions);
                    if batch.progress.is_empty() && batch.alerts.is_empty() {
                        return;
                    }
                }
                Err(AttemptError::Write(WriteError::NotReady(e))) => {
                    warn!(error = %e, "routing produce failed; retrying the batch");
                    metrics::counter!("audit_routed_produce_errors_total").increment(1);
                    backoff = self.pause(backoff).await;
                }
                Err(AttemptError::Write(WriteError::Db(e))) => {
                    self.status.db_error();
                    let kind = if crate::store::is_transient(&e) { "transient" } else { "other" };
                    metrics::counter!("audit_db_write_errors_total", "kind" => kind).increment(1);
                    warn!(error = %e, kind, "batch write failed; retrying");
                    backoff = self.pause(backoff).await;
                }
                Err(AttemptError::Pool(e)) => {
                    self.status.db_error();
                    metrics::counter!("audit_db_write_errors_total", "kind" => "connect").increment(1);
                    warn!(error = %e, "no database connection; retrying");
                    backoff = self.pause(backoff).await;
                }
            }
        }
    }

    async fn attempt(&self, batch: &Batch) -> Result<WriteResult, AttemptError> {
        let mut client = self.pool.get().await.map_err(AttemptError::Pool)?;
        let set = WriteSet {
            group: &self.settings.group,
            topic: &self.settings.topic,
            rows: batch
                .rows
                .iter()
                .map(|r| RowRef {
                    event: &r.event,
                    received_at: r.received_at,
                    partition: r.partition,
                    offset: r.offset,
                })
                .collect(),
            dead: batch
                .dead
                .iter()
                .map(|d| DeadLetterRecord {
                    partition: d.partition,
                    offset: d.offset,
                    reason_code: &d.reason_code,
                    reason: &d.reason,
                    payload_bytes: i32::try_from(d.payload.len()).unwrap_or(i32::MAX),
                })
                .collect(),
            offsets: batch
                .progress
                .iter()
                .map(|p| OffsetAdvance { partition: p.partition, expected: p.expected, next_offset: p.next_offset })
                .collect(),
            alerts: batch.alerts.iter().map(|(t, published)| (t, *published)).collect(),
            activity: self.settings.activity.as_ref(),
        };
        // The routed records (routed detection on) are produced while the
        // statements run; the transaction commits only once they are
        // acknowledged. A retried batch sends them again: the routed
        // consumers skip what they counted.
        let routed = async {
            match &self.router {
                Some(router) => {
                    router.send_all(&batch.rows).await.map(|_| ()).map_err(|e| format!("routing topic: {e}"))
                }
                None => Ok(()),
            }
        };
        writer::write_when(&mut client, &set, self.settings.method, routed).await.map_err(AttemptError::Write)
    }

    fn committed(&mut self, batch: &Batch, result: WriteResult, started: Instant) {
        let elapsed = started.elapsed();
        metrics::histogram!("audit_batch_write_duration_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("audit_batch_messages").record(batch.messages as f64);
        metrics::counter!("audit_events_stored_total").increment(result.inserted);
        metrics::counter!("audit_events_duplicate_total").increment(result.duplicates + batch.duplicates_in_batch);
        if result.staged {
            metrics::counter!("audit_batches_deduplicated_total").increment(1);
        }
        for letter in &batch.dead {
            metrics::counter!("audit_events_dead_lettered_total", "reason" => letter.reason_code.clone()).increment(1);
        }
        if !batch.dead.is_empty() {
            // One line per batch, not per message: a stream of bad messages
            // must not flood the log. The dead-letter topic has each reason.
            warn!(
                count = batch.dead.len(),
                reasons = %dead_letter_summary(&batch.dead),
                "events sent to the dead-letter topic"
            );
        }
        // Counted once stored, not by the detectors: a rebuild replays stored
        // failures, and routed detection sees each one more than once.
        let failures = batch.rows.iter().filter(|r| self.settings.failure_actions.contains(&r.event.action)).count();
        metrics::counter!("audit_failed_logins_total").increment(failures as u64);
        self.status.batch_committed();
        self.status.note_commit(result.activity_deltas, batch.full);
        if let Some(newest) = batch.rows.iter().map(|r| r.event.occurred_at).max() {
            self.status.note_event_time(newest);
        }
        if self.settings.activity.is_some() {
            self.record_activity_metrics(batch);
        }
        debug!(
            inserted = result.inserted,
            duplicates = result.duplicates,
            ms = elapsed.as_millis() as u64,
            "batch committed"
        );
        let offsets = batch.progress.iter().map(|p| (p.partition, p.next_offset)).collect();
        let _ = self.events.send(WriterEvent::Committed(offsets));
    }

    /// Logins, events by action and distinct active users (HyperLogLog over
    /// the last hour of event time).
    fn record_activity_metrics(&mut self, batch: &Batch) {
        let mut by_action = [0u64; ACTION_LABELS.len()];
        let mut active_users = self.active_users.lock().unwrap_or_else(|e| e.into_inner());
        for row in &batch.rows {
            by_action[action_label_index(&row.event.action)] += 1;
            if let Some(user) = row.event.user_id.as_deref() {
                active_users.add(user, row.event.occurred_at);
            }
        }
        for (action, n) in ACTION_LABELS.iter().zip(by_action) {
            if n > 0 {
                metrics::counter!("audit_events_by_action_total", "action" => *action).increment(n);
            }
        }
        metrics::counter!("audit_logins_total").increment(by_action[0]);
        metrics::gauge!("audit_active_users_last_hour").set(active_users.estimate());
    }

    async fn pause(&self, backoff: Duration) -> Duration {
        tokio::time::sleep(backoff).await;
        (backoff * 2).min(self.settings.max_backoff)
    }
}

/// Per reason: how many, and where the first was (`partition:offset`),
/// e.g. `invalid_json ×2 (first 0:17), timestamp_too_old ×1 (first 3:5)`.
fn dead_letter_summary(dead: &[crate::ingest::batch::DeadLetter]) -> String {
    let mut reasons: Vec<(&str, usize, (i32, i64))> = Vec::new();
    for letter in dead {
        match reasons.iter_mut().find(|(code, _, _)| *code == letter.reason_code) {
            Some((_, n, _)) => *n += 1,
            None => reasons.push((&letter.reason_code, 1, (letter.partition, letter.offset))),
        }
    }
    reasons.iter().map(|(code, n, (p, o))| format!("{code} ×{n} (first {p}:{o})")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod dead_letter_tests {
    use super::*;
    use crate::ingest::batch::DeadLetter;

    fn letter(partition: i32, offset: i64, code: &str) -> DeadLetter {
        DeadLetter {
            partition,
            offset,
            timestamp: None,
            key: None,
            payload: Vec::new(),
            headers: Vec::new(),
            reason_code: code.into(),
            reason: format!("{code}: details"),
        }
    }

    #[test]
    fn dead_letters_are_summed_up_by_reason_in_order_of_appearance() {
        let dead = [letter(0, 17, "invalid_json"), letter(3, 5, "timestamp_too_old"), letter(1, 2, "invalid_json")];
        assert_eq!(dead_letter_summary(&dead), "invalid_json ×2 (first 0:17), timestamp_too_old ×1 (first 3:5)");
    }
}
