//! Retention: removes audit events older than N days, by dropping whole
//! daily partitions and deleting only the rows of the boundary partition
//! (the work is `audit_retention_cleanup`, migrations/0003_admin_api.sql),
//! and with them the sessions and rollup hours derived from them
//! (`activity_retention_cleanup`, migrations/0004_activity.sql).
//! Used by `POST /api/v1/audit/cleanup` and by the scheduled cleanup.
//!
//! A cleanup never keeps fewer days than `retention.min_days` (the
//! compliance floor), is recorded in the audit trail in the same
//! transaction as the removal, and runs on one instance at a time.
//!
//! The dropped partitions leave audit_logs when the cleanup commits; their
//! files are released right after by [`purge`], in the background, one
//! table per transaction, so that neither the caller nor ingest waits for
//! the file system (see migrations/0003_admin_api.sql).

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::audit_trail::{self, Actor};
use super::db;
use super::error::ApiError;
use super::queries;
use crate::config::Config;

/// Longest retention accepted (100 years): beyond it the cutoff means
/// nothing and the arithmetic could overflow.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// Arbitrary constant naming the cleanup lock (one cleanup at a time across
/// instances).
const CLEANUP_LOCK_KEY: i64 = 0x6175_6469_745f_7274;

/// What a cleanup did (or, for a dry run, would do) to one partition.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartitionChange {
    /// `drop` (the whole partition) or `delete` (rows before the cutoff).
    pub action: String,
    pub partition: String,
    pub range_from: Option<DateTime<Utc>>,
    pub range_to: Option<DateTime<Utc>>,
    pub rows: i64,
    /// False when `rows` is the planner's estimate (a dropped partition).
    pub rows_exact: bool,
}

/// Rows removed (or, for a dry run, to remove) from one derived table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DerivedChange {
    pub action: String,
    pub table: String,
    pub rows: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CleanupOutcome {
    pub dry_run: bool,
    pub retention_days: u32,
    pub min_retention_days: u32,
    /// Events before this time are (or would be) removed.
    pub cutoff: DateTime<Utc>,
    pub partitions_dropped: usize,
    /// Rows removed: exact for deletes, estimated for dropped partitions.
    pub rows_removed: i64,
    pub rows_removed_exact: bool,
    pub changes: Vec<PartitionChange>,
    /// What the activity tracker derived from the removed events (rollup
    /// hours, sessions), removed with them.
    pub activity: Vec<DerivedChange>,
    /// The audit_logs row recording this cleanup (none for a dry run).
    pub audit_event_id: Option<Uuid>,
    /// The dropped partitions' files are being released in the background.
    pub purge_pending: bool,
    pub duration_ms: u64,
}

/// Checks `days` against the floor and the maximum.
pub fn check_days(config: &Config, days: u32) -> Result<(), ApiError> {
    let floor = config.retention.min_days;
    if days < floor {
        return Err(ApiError::bad_request(
            "below_retention_floor",
            format!("retention_days {days} is below the compliance floor of {floor} days (retention.min_days)"),
        ));
    }
    if days > MAX_RETENTION_DAYS {
        return Err(ApiError::bad_request(
            "invalid_retention_days",
            format!("retention_days must be at most {MAX_RETENTION_DAYS}"),
        ));
    }
    Ok(())
}

/// Removes (or with `dry_run`, counts) the events older than `days` days.
pub async fn cleanup(
    pool: &Pool,
    config: &Config,
    days: u32,
    dry_run: bool,
    actor: &Actor,
) -> Result<CleanupOutcome, ApiError> {
    check_days(config, days)?;
    let started = Instant::now();
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(days));
    let retention = &config.retention;
    let connect = config.database.connect_timeout;
    let wait = deadpool_postgres::Timeouts {
        wait: Some(config.api.statement_timeout),
        create: Some(connect),
        recycle: Some(connect),
    };
    let mut conn = pool.timeout_get(&wait).await?;
    let tx = if dry_run {
        db::read_only(&mut conn, retention.statement_timeout).await?
    } else {
        db::read_write(&mut conn, retention.statement_timeout).await?
    };
    if !dry_run {
        let locked: bool = tx.query_one(queries::TRY_CLEANUP_LOCK, &[&CLEANUP_LOCK_KEY]).await?.get(0);
        if !locked {
            return Err(ApiError::Conflict {
                code: "cleanup_in_progress",
                message: "another cleanup is running; retry when it has finished".into(),
            });
        }
        tx.query_one(queries::SET_LOCK_TIMEOUT, &[&db::millis(retention.lock_timeout)]).await?;
    }
    let changes: Vec<PartitionChange> = tx
        .query(queries::RETENTION_CLEANUP, &[&cutoff, &dry_run])
        .await?
        .iter()
        .map(|row| PartitionChange {
            action: row.get(0),
            partition: row.get(1),
            range_from: row.get(2),
            range_to: row.get(3),
            rows: row.get(4),
            rows_exact: row.get(5),
        })
        .collect();
    let activity: Vec<DerivedChange> = tx
        .query(queries::ACTIVITY_RETENTION_CLEANUP, &[&cutoff, &dry_run])
        .await?
        .iter()
        .map(|row| DerivedChange { action: row.get(0), table: row.get(1), rows: row.get(2) })
        .collect();
    let partitions_dropped = changes.iter().filter(|c| c.action == "drop").count();
    let rows_removed = changes.iter().map(|c| c.rows).sum();
    let rows_removed_exact = changes.iter().all(|c| c.rows_exact);
    let mut outcome = CleanupOutcome {
        dry_run,
        retention_days: days,
        min_retention_days: retention.min_days,
        cutoff,
        partitions_dropped,
        rows_removed,
        rows_removed_exact,
        changes,
        activity,
        audit_event_id: None,
        purge_pending: false,
        duration_ms: 0,
    };
    if !dry_run {
        let metadata = serde_json::json!({
            "retention_days": days,
            "cutoff": cutoff,
            "partitions_dropped": outcome.partitions_dropped,
            "rows_removed": outcome.rows_removed,
            "rows_removed_exact": outcome.rows_removed_exact,
            "changes": outcome.changes,
            "activity": outcome.activity,
        });
        outcome.audit_event_id =
            Some(audit_trail::record(&tx, audit_trail::ACTION_CLEANUP, actor, metadata, Some(&config.activity)).await?);
    }
    tx.commit().await?;
    drop(conn);
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    if !dry_run {
        // Also picks up what an interrupted earlier purge left.
        outcome.purge_pending = outcome.partitions_dropped > 0;
        tokio::spawn(purge(pool.clone()));
        metrics::counter!("audit_retention_partitions_dropped_total").increment(outcome.partitions_dropped as u64);
        metrics::counter!("audit_retention_rows_removed_total").increment(outcome.rows_removed.max(0) as u64);
        metrics::gauge!("audit_retention_last_success_timestamp_seconds").set(Utc::now().timestamp() as f64);
        tracing::info!(
            actor = %actor.id,
            retention_days = days,
            %cutoff,
            partitions_dropped = outcome.partitions_dropped,
            rows_removed = outcome.rows_removed,
            duration_ms = outcome.duration_ms,
            "audit log cleanup done"
        );
    }
    Ok(outcome)
}

/// Drops the partitions earlier cleanups detached. Holds no lock on
/// audit_logs; a failure is logged and the next cleanup tries again.
pub async fn purge(pool: Pool) {
    let started = Instant::now();
    let result = async {
        let conn = pool.get().await.map_err(|e| crate::store::with_causes(&e))?;
        conn.batch_execute(queries::RETENTION_PURGE).await.map_err(|e| crate::store::with_causes(&e))
    }
    .await;
    match result {
        Ok(()) => tracing::debug!(duration_ms = started.elapsed().as_millis() as u64, "retention purge done"),
        Err(e) => {
            metrics::counter!("audit_retention_failures_total").increment(1);
            tracing::warn!(error = %e, "dropping detached audit_logs partitions failed; the next cleanup retries");
        }
    }
}

/// The scheduled cleanup: with `retention.scheduled`, runs with
/// `retention.days` at start and then every `retention.interval` until
/// cancelled. A failed run is logged and counted, and tried again at the
/// next interval.
pub async fn run_scheduled(pool: Pool, config: Arc<Config>, cancel: CancellationToken) {
    let retention = &config.retention;
    if !retention.scheduled {
        return;
    }
    tracing::info!(days = retention.days, interval = ?retention.interval, "scheduled audit log retention on");
    loop {
        match cleanup(&pool, &config, retention.days, false, &Actor::scheduler()).await {
            Ok(_) => {}
            Err(ApiError::Conflict { .. }) => {
                tracing::info!("scheduled cleanup skipped: another instance is cleaning up")
            }
            Err(e) => {
                metrics::counter!("audit_retention_failures_total").increment(1);
                tracing::warn!(error = ?e, "scheduled audit log cleanup failed; will retry at the next interval");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retention.interval) => {}
        }
    }
}
