//! Maintenance mode shared by every instance (migrations/0007).
//!
//! The admin API's switch pauses the instance that took the request at
//! once and stores the switch; every instance then follows the stored
//! state: at start (so that a restarted instance stays paused) and by
//! polling it every [`POLL_EVERY`]. Each stored switch has a version and is
//! applied once: a pause an instance made on its own while the database was
//! unreachable is not undone by the older stored state, only by a newer
//! switch.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::status::IngestStatus;
use crate::store::queries;

/// How often an instance reads the stored switch (one single-row read).
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// The stored switch: the last one any instance made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredSwitch {
    pub paused: bool,
    pub reason: Option<String>,
    pub changed_by: String,
    pub changed_at: DateTime<Utc>,
    pub version: i64,
}

/// The stored switch, if any was ever made.
pub async fn read(client: &impl GenericClient) -> Result<Option<StoredSwitch>, tokio_postgres::Error> {
    Ok(client.query_opt(queries::MAINTENANCE_MODE, &[]).await?.as_ref().map(switch_of))
}

/// Stores a switch (in the caller's transaction); returns it as stored.
pub async fn store(
    client: &impl GenericClient,
    paused: bool,
    reason: Option<&str>,
    changed_by: &str,
) -> Result<StoredSwitch, tokio_postgres::Error> {
    Ok(switch_of(&client.query_one(queries::SET_MAINTENANCE_MODE, &[&paused, &reason, &changed_by]).await?))
}

fn switch_of(row: &tokio_postgres::Row) -> StoredSwitch {
    StoredSwitch {
        paused: row.get(0),
        reason: row.get(1),
        changed_by: row.get(2),
        changed_at: row.get(3),
        version: row.get(4),
    }
}

/// Applies `stored` unless its version was applied already; returns the
/// version now applied.
fn follow_switch(status: &IngestStatus, applied: i64, stored: Option<&StoredSwitch>) -> i64 {
    match stored {
        Some(s) if s.version > applied => {
            if status.maintenance_paused() != s.paused {
                info!(paused = s.paused, changed_by = %s.changed_by, reason = s.reason.as_deref().unwrap_or(""),
                      "maintenance mode switched by another instance or before this one started");
            }
            status.set_maintenance_paused(s.paused);
            s.version
        }
        _ => applied,
    }
}

/// Applies the stored switch before ingest starts; returns its version
/// (0 when none was ever made).
pub async fn restore(pool: &Pool, status: &IngestStatus) -> Result<i64, crate::store::StoreError> {
    let client = pool.get().await?;
    let stored = read(&**client).await?;
    Ok(follow_switch(status, 0, stored.as_ref()))
}

/// Follows the stored switch until `cancel`, from version `applied` on.
pub async fn follow(pool: Pool, status: Arc<IngestStatus>, mut applied: i64, cancel: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
        let stored = match pool.get().await {
            Ok(client) => read(&**client).await.map_err(|e| crate::store::with_causes(&e)),
            Err(e) => Err(crate::store::with_causes(&e)),
        };
        match stored {
            Ok(stored) => {
                failing = false;
                applied = follow_switch(&status, applied, stored.as_ref());
            }
            // Keeps the state it has; says so once per outage.
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "cannot read the shared maintenance mode; keeping this instance's state");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch(paused: bool, version: i64) -> StoredSwitch {
        StoredSwitch { paused, reason: None, changed_by: "token:ops".into(), changed_at: Utc::now(), version }
    }

    #[test]
    fn each_stored_switch_is_applied_once_and_a_local_pause_survives_an_old_one() {
        let status = IngestStatus::default();
        assert_eq!(follow_switch(&status, 0, None), 0);
        assert!(!status.maintenance_paused());
        assert_eq!(follow_switch(&status, 0, Some(&switch(true, 1))), 1);
        assert!(status.maintenance_paused());
        // Resumed locally (the database was down when the switch was made):
        // the stored version 1 is not applied again.
        status.set_maintenance_paused(false);
        assert_eq!(follow_switch(&status, 1, Some(&switch(true, 1))), 1);
        assert!(!status.maintenance_paused());
        // A newer switch from anywhere is.
        assert_eq!(follow_switch(&status, 1, Some(&switch(true, 2))), 2);
        assert!(status.maintenance_paused());
        assert_eq!(follow_switch(&status, 2, Some(&switch(false, 3))), 3);
        assert!(!status.maintenance_paused());
    }
}
