//! What the pipeline reports about itself to the health endpoint: lag,
//! assignment, pauses, the last stored batch. Cheap to update, shared by
//! reference.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct IngestStatus {
    /// Operator-requested pause (maintenance mode).
    maintenance_paused: AtomicBool,
    /// The writer cannot keep up (or PostgreSQL is down).
    backpressure_paused: AtomicBool,
    /// Unix seconds of the last committed batch; 0 before the first.
    last_batch_at: AtomicI64,
    /// Newest event time (epoch micros) committed; i64::MIN before any.
    max_event_time: AtomicI64,
    /// Activity delta rows written since the compactor last folded them.
    pending_deltas: AtomicU64,
    /// Monotonic time of the last commit, in ms since `started`.
    last_commit_ms: AtomicU64,
    /// The same for the last commit of a full batch (one closed at the size
    /// limit), plus one; 0 before the first.
    last_full_commit_ms: AtomicU64,
    started: std::sync::OnceLock<std::time::Instant>,
    batches_committed: AtomicU64,
    /// Unix seconds of the last database write failure; 0 when none.
    last_db_error_at: AtomicI64,
    /// partition → consumer lag in messages, from librdkafka statistics.
    lag: Mutex<BTreeMap<i32, i64>>,
    assigned: Mutex<Vec<i32>>,
    last_kafka_error: Mutex<Option<String>>,
    /// Set while decoding waits for the schema registry (its last error),
    /// cleared by the next message decoded.
    registry_waiting: AtomicBool,
    registry_error: Mutex<Option<String>>,
    /// The routed consumer, when routed detection is on.
    routed: Mutex<Option<RoutedStatus>>,
}

/// What the routed consumer (routed detection) reports: its routing
/// partitions, how far behind it is, when it last stored its progress.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoutedStatus {
    pub topic: String,
    pub group: String,
    /// The routing topic's partitions as read at start: what every record
    /// is routed by (a key's partition is its hash modulo this).
    pub routes_by_partitions: i32,
    /// The routing topic's partitions as the Kafka client sees them now.
    pub topic_partitions: Option<i32>,
    pub assigned_partitions: Vec<i32>,
    /// Routing partition → lag in messages, from librdkafka statistics.
    pub lag: BTreeMap<i32, i64>,
    /// Unix seconds of the last stored progress (offsets, marks, alerts).
    pub last_stored_at: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusSnapshot {
    pub maintenance_paused: bool,
    pub backpressure_paused: bool,
    pub last_batch_at: Option<i64>,
    pub batches_committed: u64,
    pub last_db_error_at: Option<i64>,
    pub lag: BTreeMap<i32, i64>,
    pub total_lag: i64,
    pub assigned_partitions: Vec<i32>,
    pub last_kafka_error: Option<String>,
    /// Why decoding is waiting for the schema registry, while it is.
    pub schema_registry_error: Option<String>,
    pub routed: Option<RoutedStatus>,
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl IngestStatus {
    pub fn set_maintenance_paused(&self, paused: bool) {
        self.maintenance_paused.store(paused, Ordering::SeqCst);
        metrics::gauge!("audit_ingest_paused", "reason" => "maintenance").set(if paused { 1.0 } else { 0.0 });
    }

    pub fn maintenance_paused(&self) -> bool {
        self.maintenance_paused.load(Ordering::SeqCst)
    }

    /// Paused for either reason.
    pub fn paused(&self) -> bool {
        self.maintenance_paused() || self.backpressure_paused.load(Ordering::SeqCst)
    }

    pub fn set_backpressure_paused(&self, paused: bool) {
        self.backpressure_paused.store(paused, Ordering::SeqCst);
        metrics::gauge!("audit_ingest_paused", "reason" => "backpressure").set(if paused { 1.0 } else { 0.0 });
    }

    /// Decoding waits for the schema registry (unreachable, or answering
    /// neither the schema nor "not found").
    pub fn registry_unavailable(&self, error: String) {
        metrics::counter!("audit_schema_registry_errors_total").increment(1);
        self.registry_waiting.store(true, Ordering::SeqCst);
        *self.registry_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// A message was decoded: whatever the registry did before is over.
    pub fn registry_answered(&self) {
        if self.registry_waiting.swap(false, Ordering::SeqCst) {
            *self.registry_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn batch_committed(&self) {
        let now = unix_now();
        self.last_batch_at.store(now, Ordering::SeqCst);
        self.batches_committed.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("audit_last_batch_stored_timestamp_seconds").set(now as f64);
    }

    fn since_start(&self) -> std::time::Duration {
        self.started.get_or_init(std::time::Instant::now).elapsed()
    }

    /// A batch committed, appending `deltas` activity rows; `full` when it
    /// closed at the size limit.
    pub fn note_commit(&self, deltas: u64, full: bool) {
        let now_ms = self.since_start().as_millis() as u64;
        // Catching up is known before the deltas count: a compactor that sees
        // them pending also sees why they may wait.
        if full {
            self.last_full_commit_ms.store(now_ms + 1, Ordering::SeqCst);
        }
        self.last_commit_ms.store(now_ms, Ordering::SeqCst);
        self.pending_deltas.fetch_add(deltas, Ordering::SeqCst);
    }

    /// Whether ingest is catching up on a backlog: a full batch committed
    /// within `within`. Batches close full only while the consumer has more
    /// waiting than one batch holds; once it is caught up they close by age.
    pub fn catching_up(&self, within: std::time::Duration) -> bool {
        match self.last_full_commit_ms.load(Ordering::SeqCst) {
            0 => false,
            at => {
                let last = std::time::Duration::from_millis(at - 1);
                self.since_start().saturating_sub(last) < within
            }
        }
    }

    pub fn pending_deltas(&self) -> u64 {
        self.pending_deltas.load(Ordering::SeqCst)
    }

    /// What the database holds pending, read when the compactor starts:
    /// deltas an earlier process wrote are folded (and gauged) too.
    pub fn set_pending_deltas(&self, n: u64) {
        self.pending_deltas.store(n, Ordering::SeqCst);
    }

    /// The compactor folded `n` of them.
    pub fn deltas_folded(&self, n: u64) {
        let _ = self.pending_deltas.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| Some(p.saturating_sub(n)));
    }

    /// How long since the last commit (since start when none).
    pub fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_commit_ms.load(Ordering::SeqCst));
        self.since_start().saturating_sub(last)
    }

    pub fn note_event_time(&self, t: i64) {
        self.max_event_time.fetch_max(t, Ordering::SeqCst);
    }

    /// The newest event time stored, if any (the activity tracker's clock).
    pub fn max_event_time(&self) -> Option<i64> {
        let t = self.max_event_time.load(Ordering::SeqCst);
        (t != 0 && t != i64::MIN).then_some(t)
    }

    pub fn db_error(&self) {
        self.last_db_error_at.store(unix_now(), Ordering::SeqCst);
    }

    pub fn set_lag(&self, lag: BTreeMap<i32, i64>) {
        *self.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
    }

    pub fn set_assigned(&self, partitions: Vec<i32>) {
        metrics::gauge!("audit_consumer_assigned_partitions").set(partitions.len() as f64);
        *self.assigned.lock().unwrap_or_else(|e| e.into_inner()) = partitions;
    }

    pub fn kafka_error(&self, message: Option<String>) {
        *self.last_kafka_error.lock().unwrap_or_else(|e| e.into_inner()) = message;
    }

    /// Routed detection runs: its consumer reads `topic` in `group`.
    pub fn routed_started(&self, topic: &str, group: &str, partitions: i32) {
        *self.routed.lock().unwrap_or_else(|e| e.into_inner()) = Some(RoutedStatus {
            topic: topic.to_owned(),
            group: group.to_owned(),
            routes_by_partitions: partitions,
            ..RoutedStatus::default()
        });
    }

    /// The routing topic's partition count, from the client's metadata.
    pub fn set_routing_topic_partitions(&self, partitions: i32) {
        self.update_routed(|r| r.topic_partitions = Some(partitions));
    }

    fn update_routed(&self, change: impl FnOnce(&mut RoutedStatus)) {
        if let Some(routed) = self.routed.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            change(routed);
        }
    }

    /// The routing partitions the routed consumer owns now (their lag goes
    /// with those it gave up).
    pub fn set_routed_assigned(&self, partitions: Vec<i32>) {
        metrics::gauge!("audit_routed_assigned_partitions").set(partitions.len() as f64);
        self.update_routed(|r| {
            r.lag.retain(|p, _| partitions.contains(p));
            r.assigned_partitions = partitions;
        });
    }

    pub fn set_routed_lag(&self, lag: BTreeMap<i32, i64>) {
        self.update_routed(|r| r.lag = lag);
    }

    /// The routed consumer committed its progress.
    pub fn routed_stored(&self) {
        let now = unix_now();
        metrics::gauge!("audit_routed_last_stored_timestamp_seconds").set(now as f64);
        self.update_routed(|r| r.last_stored_at = Some(now));
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let nonzero = |v: i64| (v != 0).then_some(v);
        StatusSnapshot {
            maintenance_paused: self.maintenance_paused(),
            backpressure_paused: self.backpressure_paused.load(Ordering::SeqCst),
            last_batch_at: nonzero(self.last_batch_at.load(Ordering::SeqCst)),
            batches_committed: self.batches_committed.load(Ordering::SeqCst),
            last_db_error_at: nonzero(self.last_db_error_at.load(Ordering::SeqCst)),
            total_lag: lag.values().sum(),
            lag,
            assigned_partitions: self.assigned.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            last_kafka_error: self.last_kafka_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            schema_registry_error: self.registry_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            routed: self.routed.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn catching_up_while_full_batches_commit_and_not_after() {
        let status = IngestStatus::default();
        assert!(!status.catching_up(Duration::from_secs(5)), "nothing committed yet");
        status.note_commit(10, false);
        assert!(!status.catching_up(Duration::from_secs(5)), "batches closing by age: caught up");
        status.note_commit(10, true);
        assert!(status.catching_up(Duration::from_secs(5)));
        assert!(!status.catching_up(Duration::ZERO), "the full batch is older than the window");
        assert_eq!(status.pending_deltas(), 20);
    }
}
