//! Prometheus metrics: the recorder, the bucket layout, and a description of
//! every metric the service emits (names follow Prometheus conventions: the
//! `audit_` prefix, base units, `_total` on counters, no user ids as labels).

use std::sync::OnceLock;
use std::time::Duration;

use deadpool_postgres::Pool;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns the handle that
/// renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                )
                .and_then(|b| {
                    // A fold takes seconds per million pending entries.
                    b.set_buckets_for_metric(
                        Matcher::Full("audit_activity_fold_duration_seconds".into()),
                        &[0.01, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("audit_batch_messages".into()),
                        &[1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0],
                    )
                })
                .expect("static bucket layout is valid")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            describe_all();
            handle
        })
        .clone()
}

fn describe_all() {
    describe_counter!(
        "audit_events_consumed_total",
        "Messages consumed from the events topic, by encoding (invalid = failed decoding)."
    );
    describe_counter!("audit_events_stored_total", "Events newly stored in audit_logs.");
    describe_counter!("audit_events_duplicate_total", "Events skipped because their event_id was already stored.");
    describe_counter!("audit_events_dead_lettered_total", "Messages sent to the dead-letter topic, by reason.");
    describe_histogram!(
        "audit_batch_messages",
        "Kafka messages per written batch (stored, duplicate and dead-lettered alike)."
    );
    describe_histogram!(
        "audit_batch_write_duration_seconds",
        Unit::Seconds,
        "Time to make a batch durable (dead letters and transaction, retries included)."
    );
    describe_counter!("audit_batches_deduplicated_total", "Batches that took the de-duplicating insert path.");
    describe_counter!("audit_db_write_errors_total", "Failed batch write attempts, by kind (each is retried).");
    describe_counter!("audit_dlq_produce_errors_total", "Failed dead-letter produce attempts (each is retried).");
    describe_counter!(
        "audit_offset_fence_conflicts_total",
        "Partitions whose stored offset another consumer had moved."
    );
    describe_counter!(
        "audit_schema_registry_errors_total",
        "Decode attempts that found the schema registry unavailable (the message waits and is retried)."
    );
    describe_counter!("audit_kafka_errors_total", "Errors reported by the Kafka client.");
    describe_gauge!(
        "audit_consumer_lag_messages",
        "Messages between the stored position and the end of each partition."
    );
    describe_gauge!("audit_consumer_assigned_partitions", "Partitions of the events topic assigned to this instance.");
    describe_counter!(
        "audit_routed_records_total",
        "Records produced to the routing topic (routed detection: one per batch, routed key and routing partition)."
    );
    describe_counter!(
        "audit_routed_events_total",
        "Events routed to the routing topic, once per routed key each goes to."
    );
    describe_counter!(
        "audit_routed_produce_errors_total",
        "Failed routing-topic produce attempts (the batch is retried)."
    );
    describe_counter!(
        "audit_routed_events_skipped_total",
        "Routed events not counted, by reason (resent: counted already; unknown: no such rule key; undecodable)."
    );
    describe_gauge!(
        "audit_routed_consumer_lag_messages",
        "Messages between the routed consumer's position and the end of each routing partition it owns."
    );
    describe_gauge!(
        "audit_routed_assigned_partitions",
        "Partitions of the routing topic this instance's routed consumer owns."
    );
    describe_gauge!(
        "audit_routed_last_stored_timestamp_seconds",
        Unit::Seconds,
        "Unix time the routed consumer last stored its progress (offsets, marks, alerts)."
    );
    describe_gauge!("audit_ingest_paused", "1 while consumption is paused, by reason (backpressure, maintenance).");
    describe_gauge!(
        "audit_last_batch_stored_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last committed batch."
    );
    describe_gauge!(
        "audit_db_pool_connections",
        "Pool connections, by pool (ingest, api) and state (in_use, idle, max)."
    );
    describe_gauge!(
        "audit_db_pool_utilization_ratio",
        "Share of each pool's connections in use (0..1), by pool (ingest, api)."
    );
    describe_gauge!("audit_log_size_bytes", Unit::Bytes, "Size of audit_logs (all partitions, indexes included).");
    describe_gauge!("audit_log_rows_estimate", "Rows of audit_logs as the planner estimates them (no scan).");
    describe_gauge!("audit_log_partitions", "Partitions of audit_logs (daily ones and the default).");
    describe_gauge!("audit_database_size_bytes", Unit::Bytes, "Size of the service's PostgreSQL database.");
    describe_counter!("audit_partitions_created_total", "Daily audit_logs partitions created.");
    describe_counter!(
        "audit_failed_logins_total",
        "Failed-login events stored (the configured detect.failure_actions), counted when their batch commits."
    );
    describe_counter!(
        "audit_alerts_resent_total",
        "Stored alert transitions sent again because Kafka had not acknowledged them (same alert_id)."
    );
    describe_counter!("audit_alerts_total", "Alert transitions, by rule, severity and state (published or withheld).");
    describe_counter!("audit_alerts_published_total", "Alert messages sent to the alerts topic, by rule.");
    describe_counter!(
        "audit_alerts_withheld_total",
        "Alert transitions held back by the storm limiter (carried by a storm summary instead), by rule."
    );
    describe_counter!(
        "audit_alert_summaries_total",
        "Storm summaries sent (aggregate alerts carrying withheld ones), by rule."
    );
    describe_counter!(
        "audit_alert_publish_errors_total",
        "Alert messages Kafka refused (sent again after a backoff), by rule."
    );
    describe_counter!(
        "audit_alerts_unsent_total",
        "Alert transitions left unsent while the process runs (the storm backlog or the retry buffer was full); they stay undelivered in the alerts table and are sent at their partition's next assignment."
    );
    describe_counter!(
        "audit_detector_late_events_total",
        "Events later than the allowed lateness: counted, trigger nothing."
    );
    describe_counter!(
        "audit_detector_duplicate_events_total",
        "Events the detectors skipped because their event_id was counted already within the lateness window (a producer retry)."
    );
    describe_gauge!("audit_detector_keys", "Keys tracked by each rule instance.");
    describe_counter!("audit_detector_evictions_total", "Idle keys evicted, by rule instance.");
    describe_counter!(
        "audit_detector_keys_dropped_total",
        "New keys not tracked because a rule reached max_keys_per_rule."
    );
    describe_gauge!("audit_detector_open_alerts", "Alert episodes currently open (firing or escalated).");
    describe_gauge!("audit_active_sessions", "Sessions open (not logged out, revoked or idle).");
    describe_gauge!(
        "audit_activity_deltas_pending",
        "Activity delta rows written and not yet folded (the views include them)."
    );
    describe_counter!("audit_activity_deltas_folded_total", "Activity delta rows folded into sessions and rollups.");
    describe_histogram!(
        "audit_activity_fold_duration_seconds",
        Unit::Seconds,
        "Time of each successful fold that folded pending activity deltas (one transaction)."
    );
    describe_gauge!(
        "audit_ingest_catching_up",
        "1 while ingest catches up on a backlog (a batch closed full in the last 5 s): the activity fold yields to it."
    );
    describe_counter!("audit_logins_total", "Successful logins stored (rate: logins per second).");
    describe_counter!(
        "audit_events_by_action_total",
        "Events stored, by action family (known actions, ADMIN_*, SECURITY_*, other)."
    );
    describe_gauge!(
        "audit_active_users_last_hour",
        "Distinct users with events in the last hour of event time (HyperLogLog, ~1.6 % error)."
    );
    describe_histogram!(
        "audit_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request duration (to the response head), by route template, method and status."
    );
    describe_counter!(
        "audit_http_rate_limited_total",
        "Admin API requests refused with 429 by the per-client rate limit."
    );
    describe_counter!(
        "audit_http_auth_failures_total",
        "Admin API requests refused by authentication or the client allow-list, by reason."
    );
    describe_counter!("audit_admin_actions_total", "Admin actions recorded in the audit trail, by action.");
    describe_counter!(
        "audit_retention_partitions_dropped_total",
        "Daily audit_logs partitions dropped by retention cleanups."
    );
    describe_counter!(
        "audit_retention_rows_removed_total",
        "Audit rows removed by retention cleanups (estimated for dropped partitions)."
    );
    describe_counter!("audit_retention_failures_total", "Scheduled retention cleanups that failed.");
    describe_gauge!(
        "audit_retention_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last successful retention cleanup."
    );
}

/// Samples the pool's use every second until cancelled.
pub async fn sample_pool(pool: Pool, name: &'static str, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = pool.status();
        let in_use = s.size.saturating_sub(s.available);
        metrics::gauge!("audit_db_pool_connections", "pool" => name, "state" => "in_use").set(in_use as f64);
        metrics::gauge!("audit_db_pool_connections", "pool" => name, "state" => "idle").set(s.available as f64);
        metrics::gauge!("audit_db_pool_connections", "pool" => name, "state" => "max").set(s.max_size as f64);
        metrics::gauge!("audit_db_pool_utilization_ratio", "pool" => name)
            .set(in_use as f64 / s.max_size.max(1) as f64);
    }
}
