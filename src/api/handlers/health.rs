//! `GET /api/v1/audit/health`: the operator's view of the whole service.
//!
//! `status` is `failing` (HTTP 503) when PostgreSQL cannot be reached,
//! `degraded` (200) when ingest is paused, has no partitions, lags or
//! stalls, or a pool is nearly exhausted, else `ok`; `problems` says why.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;

use crate::api::error::ApiError;
use crate::api::{Ctx, db, queries};
use crate::ingest::status::{RoutedStatus, StatusSnapshot};

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub problems: Vec<String>,
    pub checked_at: DateTime<Utc>,
    pub kafka: KafkaHealth,
    pub ingest: IngestHealth,
    pub database: DatabaseHealth,
    /// Counts and sizes from the database; null when it is unreachable.
    pub storage: Option<StorageHealth>,
}

#[derive(Debug, Serialize)]
pub struct KafkaHealth {
    /// The consumer holds partitions of the events topic (it reached the
    /// brokers and joined the group).
    pub connected: bool,
    pub assigned_partitions: Vec<i32>,
    pub consumer_lag: i64,
    pub consumer_lag_by_partition: std::collections::BTreeMap<i32, i64>,
    /// The last error the Kafka client reported (it may have recovered).
    pub last_error: Option<String>,
    /// The routed consumer (IP and system-wide rules across instances);
    /// null when routed detection is off.
    pub routed_detection: Option<RoutedHealth>,
}

#[derive(Debug, Serialize)]
pub struct RoutedHealth {
    pub topic: String,
    pub group: String,
    /// Routing partitions this instance counts (others may own the rest).
    pub assigned_partitions: Vec<i32>,
    pub consumer_lag: i64,
    pub consumer_lag_by_partition: std::collections::BTreeMap<i32, i64>,
    /// Partitions records are routed by (read at start) and the topic's
    /// partitions now: they must agree on every instance.
    pub routes_by_partitions: i32,
    pub topic_partitions: Option<i32>,
    pub last_stored_at: Option<DateTime<Utc>>,
    pub last_stored_age_seconds: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct IngestHealth {
    pub maintenance_paused: bool,
    pub backpressure_paused: bool,
    pub last_batch_stored_at: Option<DateTime<Utc>>,
    pub last_batch_age_seconds: Option<i64>,
    pub batches_committed: u64,
    pub last_database_error_at: Option<DateTime<Utc>>,
    /// While Avro decoding waits for the schema registry: its last error.
    pub schema_registry_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DatabaseHealth {
    pub reachable: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
    pub pools: Pools,
}

#[derive(Debug, Serialize)]
pub struct Pools {
    pub api: PoolUse,
    pub ingest: PoolUse,
}

#[derive(Debug, Serialize)]
pub struct PoolUse {
    pub max: usize,
    pub open: usize,
    pub in_use: usize,
    pub waiting: usize,
    /// in_use / max, 0..1 (the runbook's 60 % / 80 % thresholds).
    pub utilization: f64,
}

#[derive(Debug, Serialize)]
pub struct StorageHealth {
    pub events_last_hour: i64,
    pub events_last_day: i64,
    pub dead_letters_total: i64,
    pub dead_letters_last_day: i64,
    /// Tables, indexes and TOAST of every partition.
    pub audit_logs_size_bytes: i64,
    /// The planner's estimate (pg_class.reltuples over the partitions).
    pub audit_logs_row_estimate: i64,
    pub audit_logs_partitions: i64,
}

fn pool_use(pool: &Pool) -> PoolUse {
    let s = pool.status();
    let in_use = s.size.saturating_sub(s.available);
    PoolUse {
        max: s.max_size,
        open: s.size,
        in_use,
        waiting: s.waiting,
        utilization: in_use as f64 / s.max_size.max(1) as f64,
    }
}

fn unix(seconds: Option<i64>) -> Option<DateTime<Utc>> {
    seconds.and_then(|s| DateTime::from_timestamp(s, 0))
}

pub async fn health(State(ctx): State<Ctx>) -> Result<Response, ApiError> {
    let now = Utc::now();
    let snapshot = ctx.status.snapshot();
    // Pool use before this request takes an API connection.
    let pools = Pools { api: pool_use(&ctx.pool), ingest: pool_use(&ctx.ingest_pool) };
    let started = Instant::now();
    let (database, storage) = match storage(&ctx, now).await {
        Ok(storage) => (
            DatabaseHealth {
                reachable: true,
                latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
                error: None,
                pools,
            },
            Some(storage),
        ),
        Err(e) => {
            tracing::warn!(error = ?e, "health: database check failed");
            // A pool with no free connection says nothing about PostgreSQL.
            let reachable = e.code() == "database_busy";
            (DatabaseHealth { reachable, latency_ms: None, error: Some(e.to_string()), pools }, None)
        }
    };
    let health = assess(&ctx, now, &snapshot, database, storage);
    let code = if health.status == "failing" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    Ok((code, Json(health)).into_response())
}

async fn storage(ctx: &Ctx, now: DateTime<Utc>) -> Result<StorageHealth, ApiError> {
    let mut conn = db::connection(ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    tx.query_one(queries::PING, &[]).await?;
    let hour_ago = now - chrono::Duration::hours(1);
    let day_ago = now - chrono::Duration::days(1);
    let events = tx.query_one(queries::RECENT_EVENT_COUNTS, &[&hour_ago, &day_ago]).await?;
    let dead = tx.query_one(queries::DEAD_LETTER_COUNTS, &[&day_ago]).await?;
    // The storage gauges' query (store::storage_metrics): its first three
    // columns are audit_logs' size, row estimate and partitions.
    let size = tx.query_one(crate::store::queries::STORAGE_SIZES, &[]).await?;
    tx.commit().await?;
    Ok(StorageHealth {
        events_last_hour: events.try_get(0)?,
        events_last_day: events.try_get(1)?,
        dead_letters_total: dead.try_get(0)?,
        dead_letters_last_day: dead.try_get(1)?,
        audit_logs_size_bytes: size.try_get(0)?,
        audit_logs_row_estimate: size.try_get(1)?,
        audit_logs_partitions: size.try_get(2)?,
    })
}

/// The routed consumer's part: lagging behind the routing topic, or records
/// waiting while no progress is stored, makes IP and system-wide alerts late.
fn assess_routed(
    r: &RoutedStatus,
    now: DateTime<Utc>,
    max_lag: i64,
    stall_seconds: i64,
    problems: &mut Vec<String>,
) -> RoutedHealth {
    let lag: i64 = r.lag.values().sum();
    let age = r.last_stored_at.map(|t| now.timestamp() - t);
    if lag > max_lag {
        problems.push(format!("routed detection lag {lag} is above {max_lag} records"));
    }
    if let Some(now) = r.topic_partitions.filter(|n| *n != r.routes_by_partitions) {
        problems.push(format!(
            "the routing topic has {now} partitions but this instance routes by {}: restart every instance",
            r.routes_by_partitions
        ));
    }
    if lag > 0 && age.is_none_or(|age| age > stall_seconds) {
        problems
            .push(format!("routed records are waiting but no routed progress was stored for over {stall_seconds} s"));
    }
    RoutedHealth {
        topic: r.topic.clone(),
        group: r.group.clone(),
        assigned_partitions: r.assigned_partitions.clone(),
        consumer_lag: lag,
        consumer_lag_by_partition: r.lag.clone(),
        routes_by_partitions: r.routes_by_partitions,
        topic_partitions: r.topic_partitions,
        last_stored_at: unix(r.last_stored_at),
        last_stored_age_seconds: age,
    }
}

fn assess(
    ctx: &Ctx,
    now: DateTime<Utc>,
    s: &StatusSnapshot,
    database: DatabaseHealth,
    storage: Option<StorageHealth>,
) -> Health {
    let api = &ctx.config.api;
    let mut problems = Vec::new();
    let mut failing = false;
    if !database.reachable {
        failing = true;
        problems.push("PostgreSQL is unreachable from the API pool".to_owned());
    } else if let Some(error) = &database.error {
        problems.push(format!("the database checks did not run: {error}"));
    }
    if s.maintenance_paused {
        problems.push(
            "ingest is paused for maintenance (POST /api/v1/audit/maintenance {\"paused\": false} resumes)".into(),
        );
    }
    if s.backpressure_paused {
        problems.push("ingest is paused by backpressure: PostgreSQL is not keeping up".into());
    }
    if let Some(error) = &s.schema_registry_error {
        problems.push(format!("ingest waits for the schema registry to resolve an Avro schema id: {error}"));
    }
    if s.assigned_partitions.is_empty() {
        problems.push("no partition of the events topic is assigned to this instance".into());
    }
    if s.total_lag > api.health_max_lag {
        problems.push(format!("consumer lag {} is above {}", s.total_lag, api.health_max_lag));
    }
    let last_batch_age = s.last_batch_at.map(|t| now.timestamp() - t);
    let stall = api.health_stall_after.as_secs() as i64;
    if s.total_lag > 0 && !s.maintenance_paused && last_batch_age.is_none_or(|age| age > stall) {
        problems.push(format!("events are waiting but no batch was stored for over {stall} s"));
    }
    let routed_detection =
        s.routed.as_ref().map(|r| assess_routed(r, now, api.health_max_routed_lag, stall, &mut problems));
    for (name, pool) in [("api", &database.pools.api), ("ingest", &database.pools.ingest)] {
        if pool.utilization > api.health_max_pool_utilization {
            problems.push(format!(
                "{name} pool use {:.0} % is above {:.0} %",
                pool.utilization * 100.0,
                api.health_max_pool_utilization * 100.0
            ));
        }
    }
    let status = if failing {
        "failing"
    } else if problems.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    Health {
        status,
        problems,
        checked_at: now,
        kafka: KafkaHealth {
            connected: !s.assigned_partitions.is_empty(),
            assigned_partitions: s.assigned_partitions.clone(),
            consumer_lag: s.total_lag,
            consumer_lag_by_partition: s.lag.clone(),
            last_error: s.last_kafka_error.clone(),
            routed_detection,
        },
        ingest: IngestHealth {
            maintenance_paused: s.maintenance_paused,
            backpressure_paused: s.backpressure_paused,
            last_batch_stored_at: unix(s.last_batch_at),
            last_batch_age_seconds: last_batch_age,
            batches_committed: s.batches_committed,
            last_database_error_at: unix(s.last_db_error_at),
            schema_registry_error: s.schema_registry_error.clone(),
        },
        database,
        storage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(lag: &[(i32, i64)], stored_secs_ago: Option<i64>, now: DateTime<Utc>) -> RoutedStatus {
        RoutedStatus {
            topic: "auth-events.routed".into(),
            group: "audit.routed".into(),
            assigned_partitions: lag.iter().map(|(p, _)| *p).collect(),
            lag: lag.iter().copied().collect(),
            routes_by_partitions: 2,
            topic_partitions: Some(2),
            last_stored_at: stored_secs_ago.map(|s| now.timestamp() - s),
        }
    }

    #[test]
    fn routed_detection_is_a_problem_when_it_lags_or_stalls() {
        let now = Utc::now();
        let mut problems = Vec::new();
        let h = assess_routed(&routed(&[(0, 0), (1, 0)], Some(400), now), now, 1_000, 300, &mut problems);
        assert!(problems.is_empty(), "caught up, quiet for long: fine ({problems:?})");
        assert_eq!((h.consumer_lag, h.last_stored_age_seconds), (0, Some(400)));

        let h = assess_routed(&routed(&[(0, 600), (1, 500)], Some(1), now), now, 1_000, 300, &mut problems);
        assert_eq!(h.consumer_lag, 1_100);
        assert_eq!(problems, ["routed detection lag 1100 is above 1000 records"]);

        problems.clear();
        assess_routed(&routed(&[(0, 5)], Some(301), now), now, 1_000, 300, &mut problems);
        assert_eq!(problems, ["routed records are waiting but no routed progress was stored for over 300 s"]);

        problems.clear();
        assess_routed(&routed(&[(0, 5)], None, now), now, 1_000, 300, &mut problems);
        assert_eq!(problems.len(), 1, "waiting and never stored: {problems:?}");

        problems.clear();
        assess_routed(&routed(&[], None, now), now, 1_000, 300, &mut problems);
        assert!(problems.is_empty(), "no routing partition here (another instance owns them)");

        let grown = RoutedStatus { topic_partitions: Some(4), ..routed(&[(0, 0)], Some(1), now) };
        let h = assess_routed(&grown, now, 1_000, 300, &mut problems);
        assert_eq!((h.routes_by_partitions, h.topic_partitions), (2, Some(4)));
        assert_eq!(
            problems,
            ["the routing topic has 4 partitions but this instance routes by 2: restart every instance"]
        );
    }
}
