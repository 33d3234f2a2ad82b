//! Applies `migrations/*.sql` in order, once each, recording them in
//! `schema_migrations`. Safe to run from several instances at once (an
//! advisory lock serialises them) and on every start.

use tokio_postgres::Client;
use tracing::info;

use super::{StoreError, queries};

/// A migration compiled into the binary, so that `migrate` needs no files.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "audit_log", sql: include_str!("../../migrations/0001_audit_log.sql") },
    Migration { version: 2, name: "alerts", sql: include_str!("../../migrations/0002_alerts.sql") },
    Migration { version: 3, name: "admin_api", sql: include_str!("../../migrations/0003_admin_api.sql") },
    Migration { version: 4, name: "activity", sql: include_str!("../../migrations/0004_activity.sql") },
    Migration {
        version: 5,
        name: "activity_key_filter",
        sql: include_str!("../../migrations/0005_activity_key_filter.sql"),
    },
    Migration {
        version: 6,
        name: "activity_hourly_deltas",
        sql: include_str!("../../migrations/0006_activity_hourly_deltas.sql"),
    },
    Migration { version: 7, name: "maintenance_mode", sql: include_str!("../../migrations/0007_maintenance_mode.sql") },
    Migration { version: 8, name: "alert_partition", sql: include_str!("../../migrations/0008_alert_partition.sql") },
    Migration { version: 9, name: "routed_detection", sql: include_str!("../../migrations/0009_routed_detection.sql") },
    Migration {
        version: 10,
        name: "offsets_event_time",
        sql: include_str!("../../migrations/0010_offsets_event_time.sql"),
    },
    Migration { version: 11, name: "alert_delivery", sql: include_str!("../../migrations/0011_alert_delivery.sql") },
    Migration {
        version: 12,
        name: "storm_summary_delivery",
        sql: include_str!("../../migrations/0012_storm_summary_delivery.sql"),
    },
    Migration {
        version: 13,
        name: "activity_admin_deltas",
        sql: include_str!("../../migrations/0013_activity_admin_deltas.sql"),
    },
    Migration {
        version: 14,
        name: "cheaper_pending_reads",
        sql: include_str!("../../migrations/0014_cheaper_pending_reads.sql"),
    },
    Migration {
        version: 15,
        name: "activity_delta_compression",
        sql: include_str!("../../migrations/0015_activity_delta_compression.sql"),
    },
];

/// Arbitrary constant naming the migration lock.
const MIGRATION_LOCK_KEY: i64 = 0x6175_6469_745f_6d67;

/// Applies what is missing; returns the versions it applied.
pub async fn run(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client.batch_execute(queries::CREATE_MIGRATIONS_TABLE).await?;
    client.query(queries::ADVISORY_LOCK, &[&MIGRATION_LOCK_KEY]).await?;
    let result = apply_missing(client).await;
    // Unlock even when a migration failed; the session may be gone already.
    let _ = client.query(queries::ADVISORY_UNLOCK, &[&MIGRATION_LOCK_KEY]).await;
    result
}

async fn apply_missing(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    let applied: Vec<(i32, String)> =
        client.query(queries::APPLIED_MIGRATIONS, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut done = Vec::new();
    for m in MIGRATIONS {
        let checksum = checksum(m.sql);
        if let Some((_, stored)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *stored != checksum {
                return Err(StoreError::Migration {
                    version: m.version,
                    name: m.name.into(),
                    message: "already applied with different contents; migrations must not be edited".into(),
                });
            }
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(m.sql).await.map_err(|e| StoreError::Migration {
            version: m.version,
            name: m.name.into(),
            message: e.as_db_error().map(|d| d.to_string()).unwrap_or_else(|| e.to_string()),
        })?;
        tx.execute(queries::RECORD_MIGRATION, &[&m.version, &m.name, &checksum]).await?;
        tx.commit().await?;
        info!(version = m.version, name = m.name, "applied migration");
        done.push(m.version);
    }
    Ok(done)
}

/// FNV-1a over the file: enough to notice an edited migration.
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_increasing_and_match_file_names() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let expected: Vec<String> = MIGRATIONS.iter().map(|m| format!("{:04}_{}.sql", m.version, m.name)).collect();
        assert_eq!(files, expected, "every file in migrations/ must be listed in MIGRATIONS");
    }
}
