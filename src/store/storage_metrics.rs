//! How big the audit log and the database are, as gauges, so that growth can
//! be graphed and alerted on (the health endpoint shows the same on demand).

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{StoreError, queries, with_causes};

/// Catalog reads only (sizes and the planner's row estimate): cheap enough
/// every minute.
const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Sizes of the audit log and the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSizes {
    pub audit_log_bytes: i64,
    pub audit_log_rows_estimate: i64,
    pub audit_log_partitions: i64,
    pub database_bytes: i64,
}

pub async fn read(pool: &Pool) -> Result<StorageSizes, StoreError> {
    let client = pool.get().await?;
    let row = client.query_one(queries::STORAGE_SIZES, &[]).await?;
    Ok(StorageSizes {
        audit_log_bytes: row.get(0),
        audit_log_rows_estimate: row.get(1),
        audit_log_partitions: row.get(2),
        database_bytes: row.get(3),
    })
}

/// Publishes the sizes every minute until cancelled.
pub async fn sample(pool: Pool, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match read(&pool).await {
            Ok(s) => {
                metrics::gauge!("audit_log_size_bytes").set(s.audit_log_bytes as f64);
                metrics::gauge!("audit_log_rows_estimate").set(s.audit_log_rows_estimate as f64);
                metrics::gauge!("audit_log_partitions").set(s.audit_log_partitions as f64);
                metrics::gauge!("audit_database_size_bytes").set(s.database_bytes as f64);
            }
            // The pool and write paths report an unreachable database.
            Err(e) => debug!(error = %with_causes(&e), "sampling storage sizes failed"),
        }
    }
}
