//! Folds activity deltas into the final tables, closes idle sessions (by
//! event time) and publishes the session gauge, every `compact_interval`.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ActivityConfig;
use crate::ingest::status::IngestStatus;
use crate::store::queries;

/// One compaction, in one transaction; returns delta rows folded.
pub async fn compact_once(pool: &Pool, cfg: &ActivityConfig, event_time: Option<i64>) -> Result<i64, String> {
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let moved: i64 = tx.query_one(queries::ACTIVITY_COMPACT, &[]).await.map_err(|e| e.to_string())?.get(0);
    if let Some(t) = event_time.and_then(chrono::DateTime::from_timestamp_micros) {
        let idle = chrono::Duration::from_std(cfg.idle_timeout).unwrap_or_default();
        let idle = postgres_interval(idle);
        let closed: i64 =
            tx.query_one(queries::ACTIVITY_CLOSE_IDLE, &[&t, &idle]).await.map_err(|e| e.to_string())?.get(0);
        if closed > 0 {
            debug!(closed, "sessions closed after idling");
        }
    }
    let active: i64 = tx.query_one(queries::ACTIVE_SESSIONS, &[]).await.map_err(|e| e.to_string())?.get(0);
    tx.commit().await.map_err(|e| e.to_string())?;
    metrics::gauge!("audit_active_sessions").set(active as f64);
    Ok(moved)
}

/// An interval parameter as text (`'1800 seconds'`), cast in SQL.
fn postgres_interval(d: chrono::Duration) -> String {
    format!("{} seconds", d.num_seconds())
}

pub async fn run(pool: Pool, cfg: ActivityConfig, status: Arc<IngestStatus>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(cfg.compact_interval) => {}
        }
        if let Err(e) = compact_once(&pool, &cfg, status.max_event_time()).await {
            warn!(error = %e, "activity compaction failed; will retry");
        }
    }
}
