//! Keeps the daily partitions of audit_logs ahead of time.
//!
//! The work itself is the `audit_ensure_partitions` function of the
//! migrations (it also moves a day's rows out of the default partition);
//! this module decides which days and when.

use chrono::{Days, NaiveDate, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{StoreError, queries};
use crate::config::StorageConfig;

/// The range of days that must have partitions, seen from `today`.
pub fn wanted_days(cfg: &StorageConfig, today: NaiveDate) -> (NaiveDate, NaiveDate) {
    let from = today.checked_sub_days(Days::new(cfg.partition_lookback_days.into())).unwrap_or(today);
    let to = today.checked_add_days(Days::new(cfg.partition_premake_days.into())).unwrap_or(today);
    (from, to)
}

/// Creates the missing partitions around today; returns how many it made.
pub async fn ensure(pool: &Pool, cfg: &StorageConfig) -> Result<i32, StoreError> {
    let (from, to) = wanted_days(cfg, Utc::now().date_naive());
    ensure_range(pool, from, to).await
}

pub async fn ensure_range(pool: &Pool, from: NaiveDate, to: NaiveDate) -> Result<i32, StoreError> {
    let client = pool.get().await?;
    let created: i32 = client.query_one(queries::ENSURE_PARTITIONS, &[&from, &to]).await?.get(0);
    if created > 0 {
        info!(created, %from, %to, "created audit_logs partitions");
        metrics::counter!("audit_partitions_created_total").increment(created as u64);
    }
    Ok(created)
}

/// Re-checks the partitions every `maintenance_interval` until cancelled.
pub async fn maintain(pool: Pool, cfg: StorageConfig, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(cfg.maintenance_interval) => {}
        }
        if let Err(e) = ensure(&pool, &cfg).await {
            warn!(error = %e, "partition maintenance failed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_days_spans_lookback_to_premake() {
        let cfg = StorageConfig { partition_premake_days: 7, partition_lookback_days: 3, ..Default::default() };
        let today = NaiveDate::from_ymd_opt(2026, 2, 27).unwrap();
        assert_eq!(
            wanted_days(&cfg, today),
            (NaiveDate::from_ymd_opt(2026, 2, 24).unwrap(), NaiveDate::from_ymd_opt(2026, 3, 6).unwrap())
        );
    }
}
