//! Folds activity deltas into the final tables, and closes idle sessions.
//!
//! Folding is background work, paced so that it does not compete with a
//! burst of ingest: it runs once ingest has been idle for
//! `compact_when_idle_for`, or when the pending deltas exceed
//! `max_pending_deltas`, or `compact_interval` after the last fold at the
//! latest. While ingest catches up on a backlog (its batches close full),
//! the fold yields to it up to `max_pending_deltas_catching_up`: on two
//! cores a fold beside a saturated drain takes the CPU that PostgreSQL
//! needs for the audit rows themselves, so lag would fall more slowly for
//! the sake of rollups that readers see exactly anyway (the views add what
//! is pending). Every `session_sweep_interval` it also closes idle sessions
//! (by event time) and publishes the open-session gauge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ActivityConfig;
use crate::ingest::status::IngestStatus;
use crate::store::{queries, with_causes};

/// How often the compactor looks whether folding is due.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Ingest counts as catching up while a full batch committed this recently.
/// Long enough to bridge the gaps between a slow writer's batches.
const CATCHING_UP_WITHIN: Duration = Duration::from_secs(5);

/// One compaction, in one transaction; returns delta rows folded.
pub async fn compact_once(pool: &Pool) -> Result<i64, String> {
    let started = Instant::now();
    let mut client = pool.get().await.map_err(|e| with_causes(&e))?;
    // REPEATABLE READ: one snapshot of the deltas for the whole fold.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(|e| with_causes(&e))?;
    let moved: i64 = tx.query_one(queries::ACTIVITY_COMPACT, &[]).await.map_err(|e| with_causes(&e))?.get(0);
    tx.commit().await.map_err(|e| with_causes(&e))?;
    metrics::counter!("audit_activity_deltas_folded_total").increment(moved.max(0) as u64);
    // Folds take seconds per million entries: how long they take tells an
    // operator what a bigger pending bound would cost (BENCHMARKS.md).
    metrics::histogram!("audit_activity_fold_duration_seconds").record(started.elapsed().as_secs_f64());
    Ok(moved)
}

/// Closes sessions idle as of `event_time` (the newest stored event time)
/// and publishes how many are open.
pub async fn sweep_sessions(pool: &Pool, cfg: &ActivityConfig, event_time: Option<i64>) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| with_causes(&e))?;
    if let Some(t) = event_time.and_then(chrono::DateTime::from_timestamp_micros) {
        let idle = format!("{} seconds", cfg.idle_timeout.as_secs());
        let closed: i64 =
            client.query_one(queries::ACTIVITY_CLOSE_IDLE, &[&t, &idle]).await.map_err(|e| with_causes(&e))?.get(0);
        if closed > 0 {
            debug!(closed, "sessions closed after idling");
        }
    }
    let active: i64 = client.query_one(queries::ACTIVE_SESSIONS, &[]).await.map_err(|e| with_causes(&e))?.get(0);
    metrics::gauge!("audit_active_sessions").set(active as f64);
    Ok(())
}

/// Whether pending deltas should be folded now. While catching up, a gap
/// between batches is a slow writer, not an idle stream, so only the bounds
/// count.
fn fold_due(cfg: &ActivityConfig, pending: u64, idle_for: Duration, since_fold: Duration, catching_up: bool) -> bool {
    let (pending_bound, idle) = if catching_up {
        (cfg.max_pending_deltas_catching_up, false)
    } else {
        (cfg.max_pending_deltas, idle_for >= cfg.compact_when_idle_for)
    };
    pending > 0 && (idle || pending >= pending_bound || since_fold >= cfg.compact_interval)
}

/// Delta entries pending in the database (an earlier process may have
/// left some).
pub async fn pending_in_database(pool: &Pool) -> Result<i64, String> {
    let client = pool.get().await.map_err(|e| with_causes(&e))?;
    Ok(client.query_one(queries::PENDING_ACTIVITY_DELTAS, &[]).await.map_err(|e| with_causes(&e))?.get(0))
}

pub async fn run(pool: Pool, cfg: ActivityConfig, status: Arc<IngestStatus>, cancel: CancellationToken) {
    // Start from what is pending in the database, not from zero: deltas
    // left by the process before are folded without waiting for new ingest.
    loop {
        match pending_in_database(&pool).await {
            Ok(n) => {
                status.set_pending_deltas(n.max(0) as u64);
                break;
            }
            Err(e) => warn!(error = %e, "reading pending activity deltas failed; will retry"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let mut last_fold = Instant::now();
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let pending = status.pending_deltas();
        let catching_up = status.catching_up(CATCHING_UP_WITHIN);
        metrics::gauge!("audit_activity_deltas_pending").set(pending as f64);
        metrics::gauge!("audit_ingest_catching_up").set(if catching_up { 1.0 } else { 0.0 });
        if fold_due(&cfg, pending, status.idle_for(), last_fold.elapsed(), catching_up) {
            match compact_once(&pool).await {
                Ok(_) => {
                    status.deltas_folded(pending);
                    last_fold = Instant::now();
                }
                Err(e) => warn!(error = %e, "activity compaction failed; will retry"),
            }
        }
        if last_sweep.elapsed() >= cfg.session_sweep_interval {
            last_sweep = Instant::now();
            if let Err(e) = sweep_sessions(&pool, &cfg, status.max_event_time()).await {
                warn!(error = %e, "session sweep failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_waits_for_idle_ingest_unless_too_much_or_too_long() {
        let cfg = ActivityConfig::default();
        let s = Duration::from_secs;
        assert!(!fold_due(&cfg, 0, s(10), s(1000), false), "nothing pending");
        assert!(!fold_due(&cfg, 10, Duration::from_millis(100), s(10), false), "ingest busy");
        assert!(fold_due(&cfg, 10, s(2), s(10), false), "ingest idle");
        assert!(fold_due(&cfg, cfg.max_pending_deltas, Duration::ZERO, s(1), false), "too much pending");
        assert!(fold_due(&cfg, 10, Duration::ZERO, cfg.compact_interval, false), "waited long enough");
    }

    #[test]
    fn while_catching_up_the_fold_yields_to_ingest_up_to_its_own_bound() {
        let cfg = ActivityConfig::default();
        assert!(cfg.max_pending_deltas_catching_up > cfg.max_pending_deltas);
        let busy = Duration::ZERO;
        let recently = Duration::from_secs(1);
        assert!(!fold_due(&cfg, cfg.max_pending_deltas, busy, recently, true), "the live bound does not apply");
        assert!(fold_due(&cfg, cfg.max_pending_deltas_catching_up, busy, recently, true), "its own bound does");
        assert!(fold_due(&cfg, 10, busy, cfg.compact_interval, true), "nor longer than compact_interval");
        assert!(!fold_due(&cfg, 10, Duration::from_secs(2), recently, true), "a slow writer is not idle ingest");
    }
}
