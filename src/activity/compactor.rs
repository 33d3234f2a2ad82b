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
//! is pending). Every `session_sweep_interval` it folds and then closes
//! idle sessions (by event time) in the same transaction, so that a session
//! is judged by all its activity, pending deltas included; while ingest
//! catches up, that waits too. It also publishes the open-session gauge.

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

/// One fold of every pending delta, in one transaction; returns delta rows
/// folded.
pub async fn compact_once(pool: &Pool) -> Result<i64, String> {
    fold(pool, None).await
}

/// Folds what is pending and then, with `close_idle` (event time, idle
/// timeout), closes the sessions idle as of that time, in one REPEATABLE
/// READ transaction. Nothing is pending in its snapshot once folded, so
/// each session is judged by all its activity: a session's folded row
/// alone can be older than its newest pending event. Returns delta rows
/// folded.
async fn fold(pool: &Pool, close_idle: Option<(chrono::DateTime<chrono::Utc>, Duration)>) -> Result<i64, String> {
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
    if let Some((event_time, idle)) = close_idle {
        let idle = format!("{} seconds", idle.as_secs());
        let closed: i64 = tx
            .query_one(queries::ACTIVITY_CLOSE_IDLE, &[&event_time, &idle])
            .await
            .map_err(|e| with_causes(&e))?
            .get(0);
        if closed > 0 {
            debug!(closed, "sessions closed after idling");
        }
    }
    tx.commit().await.map_err(|e| with_causes(&e))?;
    metrics::counter!("audit_activity_deltas_folded_total").increment(moved.max(0) as u64);
    // Folds take seconds per million entries: how long they take tells an
    // operator what a bigger pending bound would cost (BENCHMARKS.md). A
    // sweep's fold of nothing is not one: it would pull the quantiles
    // toward zero and make the count tick on an idle service.
    if moved > 0 {
        metrics::histogram!("audit_activity_fold_duration_seconds").record(started.elapsed().as_secs_f64());
    }
    Ok(moved)
}

/// Closes the sessions idle as of `event_time` (the newest stored event
/// time), after folding what is pending (see [`fold`]); returns delta rows
/// folded.
pub async fn sweep_sessions(pool: &Pool, cfg: &ActivityConfig, event_time: Option<i64>) -> Result<i64, String> {
    fold(pool, idle_as_of(cfg, event_time)).await
}

/// What [`fold`] closes idle sessions by: the event time and the timeout.
fn idle_as_of(cfg: &ActivityConfig, event_time: Option<i64>) -> Option<(chrono::DateTime<chrono::Utc>, Duration)> {
    event_time.and_then(chrono::DateTime::from_timestamp_micros).map(|t| (t, cfg.idle_timeout))
}

/// Publishes how many sessions are open (reads what is pending too).
async fn count_open_sessions(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| with_causes(&e))?;
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
    let mut last_count = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let pending = status.pending_deltas();
        let catching_up = status.catching_up(CATCHING_UP_WITHIN);
        metrics::gauge!("audit_activity_deltas_pending").set(pending as f64);
        metrics::gauge!("audit_ingest_catching_up").set(if catching_up { 1.0 } else { 0.0 });
        let since = Since { fold: last_fold.elapsed(), sweep: last_sweep.elapsed() };
        let step = next_step(&cfg, pending, status.idle_for(), since, catching_up);
        if step != Step::Wait {
            let sweep = step == Step::FoldAndCloseIdle;
            let close_idle = if sweep { idle_as_of(&cfg, status.max_event_time()) } else { None };
            match fold(&pool, close_idle).await {
                Ok(_) => {
                    status.deltas_folded(pending);
                    last_fold = Instant::now();
                    if sweep {
                        last_sweep = last_fold;
                    }
                }
                Err(e) => warn!(error = %e, "activity fold failed; will retry"),
            }
        }
        if last_count.elapsed() >= cfg.session_sweep_interval {
            last_count = Instant::now();
            if let Err(e) = count_open_sessions(&pool).await {
                warn!(error = %e, "counting open sessions failed; will retry");
            }
        }
    }
}

/// How long since the last fold and the last idle sweep.
#[derive(Debug, Clone, Copy)]
struct Since {
    fold: Duration,
    sweep: Duration,
}

/// What the compactor does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Wait,
    Fold,
    /// Fold, then close idle sessions in the same transaction.
    FoldAndCloseIdle,
}

/// Idle sessions are closed right after a fold, in its transaction, every
/// `session_sweep_interval`. While ingest catches up that waits, as the
/// fold does: an idle session's end is its last activity plus the timeout,
/// whenever the sweep records it.
fn next_step(cfg: &ActivityConfig, pending: u64, idle_for: Duration, since: Since, catching_up: bool) -> Step {
    if since.sweep >= cfg.session_sweep_interval && !catching_up {
        Step::FoldAndCloseIdle
    } else if fold_due(cfg, pending, idle_for, since.fold, catching_up) {
        Step::Fold
    } else {
        Step::Wait
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

    #[test]
    fn idle_sessions_are_closed_after_a_fold_except_while_catching_up() {
        let cfg = ActivityConfig::default();
        let (busy, s) = (Duration::ZERO, Duration::from_secs);
        let swept = Since { fold: s(1), sweep: s(1) };
        let sweep_due = Since { fold: s(1), sweep: cfg.session_sweep_interval };
        assert_eq!(next_step(&cfg, 10, busy, swept, false), Step::Wait);
        assert_eq!(next_step(&cfg, 10, busy, sweep_due, false), Step::FoldAndCloseIdle);
        assert_eq!(next_step(&cfg, 0, busy, sweep_due, false), Step::FoldAndCloseIdle, "nothing pending: sweep alone");
        assert_eq!(next_step(&cfg, 10, busy, sweep_due, true), Step::Wait, "catching up: the sweep waits");
        let bound = cfg.max_pending_deltas_catching_up;
        assert_eq!(next_step(&cfg, bound, busy, sweep_due, true), Step::Fold, "the fold's bound still applies");
        assert_eq!(next_step(&cfg, 10, s(2), swept, false), Step::Fold, "idle ingest: fold, no sweep");
    }
}
