//! The batch writer against PostgreSQL, without Kafka: the offset fence,
//! duplicate handling on every insert method, and row rejection.

mod common;

use audit_service::config::Config;
use audit_service::event::AuthEvent;
use audit_service::service;
use audit_service::store::copy_format::RowRef;
use audit_service::store::writer::{self, InsertMethod, OffsetAdvance, WriteError, WriteSet};
use common::*;

async fn migrated_db() -> (TestDb, tokio_postgres::Client) {
    let db = TestDb::create().await;
    let config = Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap();
    service::prepare_database(&config).await.unwrap();
    let client = db.client().await;
    (db, client)
}

fn rows(events: &[AuthEvent], first_offset: i64) -> Vec<RowRef<'_>> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| RowRef { event: e, received_at: e.occurred_at, partition: 0, offset: first_offset + i as i64 })
        .collect()
}

fn set<'a>(rows: Vec<RowRef<'a>>, expected: Option<i64>, next: i64) -> WriteSet<'a> {
    WriteSet {
        group: "g",
        topic: "t",
        rows,
        dead: Vec::new(),
        offsets: vec![OffsetAdvance { partition: 0, expected, next_offset: next }],
        alerts: Vec::new(),
        activity: None,
    }
}

#[test]
fn offsets_are_fenced_and_a_fenced_batch_commits_nothing() {
    rt().block_on(async {
        let (db, mut client) = migrated_db().await;
        let evs = events(1, 20);
        let r = writer::write(&mut client, &set(rows(&evs[..10], 0), None, 10), InsertMethod::OptimisticCopy)
            .await
            .unwrap();
        assert_eq!(r.inserted, 10);
        // A second consumer that still believes the partition is fresh.
        let err = writer::write(&mut client, &set(rows(&evs[10..], 0), None, 10), InsertMethod::OptimisticCopy)
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Fenced(ref p) if p == &[0]), "{err:?}");
        // One that expects a position the partition never had.
        let err = writer::write(&mut client, &set(rows(&evs[10..], 10), Some(7), 20), InsertMethod::OptimisticCopy)
            .await
            .unwrap_err();
        assert!(matches!(err, WriteError::Fenced(_)), "{err:?}");
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 10, "fenced batches stored nothing");
        // The rightful owner moves on from 10.
        writer::write(&mut client, &set(rows(&evs[10..], 10), Some(10), 20), InsertMethod::OptimisticCopy)
            .await
            .unwrap();
        assert_eq!(db.count("SELECT next_offset FROM consumer_offsets").await, 20);
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 20);
    });
}

#[test]
fn every_insert_method_stores_duplicates_once() {
    for method in [InsertMethod::OptimisticCopy, InsertMethod::Staged, InsertMethod::Unnest] {
        rt().block_on(async {
            let (db, mut client) = migrated_db().await;
            let evs = events(2, 100);
            let first = writer::write(&mut client, &set(rows(&evs[..60], 0), None, 60), method).await.unwrap();
            assert_eq!((first.inserted, first.duplicates), (60, 0), "{method:?}");
            // Rows 40..100: 20 already stored.
            let second = writer::write(&mut client, &set(rows(&evs[40..], 60), Some(60), 120), method).await.unwrap();
            assert_eq!((second.inserted, second.duplicates, second.staged), (40, 20, true), "{method:?}");
            assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 100, "{method:?}");
        });
    }
}

#[test]
fn rejected_rows_are_named_and_nothing_is_committed() {
    rt().block_on(async {
        let (db, mut client) = migrated_db().await;
        client
            .batch_execute("ALTER TABLE audit_logs ADD CONSTRAINT short_agents CHECK (length(user_agent) < 200)")
            .await
            .unwrap();
        let mut evs = events(3, 50);
        for i in [3, 4, 31] {
            evs[i].user_agent = Some("x".repeat(300));
        }
        let err =
            writer::write(&mut client, &set(rows(&evs, 0), None, 50), InsertMethod::OptimisticCopy).await.unwrap_err();
        match err {
            WriteError::Rejected(rejected) => {
                assert_eq!(rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 4, 31]);
                assert!(rejected[0].1.contains("short_agents"), "{}", rejected[0].1);
            }
            other => panic!("expected rejection, got {other:?}"),
        }
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 0);
        assert_eq!(db.count("SELECT count(*) FROM consumer_offsets").await, 0);
    });
}

/// Log lines and errors carry PostgreSQL's own message: the client's
/// Display alone says only "db error".
#[test]
fn database_errors_are_described_with_postgresql_message() {
    rt().block_on(async {
        let (_db, client) = migrated_db().await;
        let e = client.query("SELECT no_such_column FROM audit_logs", &[]).await.unwrap_err();
        assert_eq!(e.to_string(), "db error");
        let text = audit_service::store::with_causes(&e);
        assert!(text.contains("column \"no_such_column\" does not exist"), "{text}");
    });
}

/// The offsets row keeps the newest event time its batches stored (where a
/// detector rebuild's window ends): a batch of older events does not move it
/// back, a batch of only dead letters leaves it.
#[test]
fn offsets_keep_the_newest_stored_event_time() {
    rt().block_on(async {
        let (db, mut client) = migrated_db().await;
        let mut evs = events(2, 12);
        let t0 = 1_790_000_000_000_000;
        for (i, e) in evs.iter_mut().enumerate() {
            e.occurred_at = t0 + i as i64 * 1_000_000;
        }
        let newest = || async {
            db.count("SELECT (extract(epoch FROM max_event_time) * 1000000)::bigint FROM consumer_offsets").await
        };
        // Stored out of order within the batch: the newest counts.
        let mut first: Vec<AuthEvent> = evs[..6].to_vec();
        first.reverse();
        writer::write(&mut client, &set(rows(&first, 0), None, 6), InsertMethod::OptimisticCopy).await.unwrap();
        assert_eq!(newest().await, t0 + 5_000_000);
        writer::write(&mut client, &set(rows(&evs[6..], 6), Some(6), 12), InsertMethod::OptimisticCopy).await.unwrap();
        assert_eq!(newest().await, t0 + 11_000_000);
        // Late events (older) and then a batch with no rows.
        let mut late = events(3, 2);
        late[0].occurred_at = t0;
        late[1].occurred_at = t0 + 1;
        writer::write(&mut client, &set(rows(&late, 12), Some(12), 14), InsertMethod::OptimisticCopy).await.unwrap();
        writer::write(&mut client, &set(Vec::new(), Some(14), 15), InsertMethod::OptimisticCopy).await.unwrap();
        assert_eq!(newest().await, t0 + 11_000_000);
        assert_eq!(db.count("SELECT next_offset FROM consumer_offsets").await, 15);
    });
}

/// The storage gauges' figures: audit_logs' partitions and size grow with
/// what is stored; the database is at least as big.
#[test]
fn storage_sizes_follow_what_is_stored() {
    rt().block_on(async {
        let (db, mut client) = migrated_db().await;
        let config = Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap();
        let pool = audit_service::store::connect_pool(&config.database, 1).unwrap();
        let empty = audit_service::store::storage_metrics::read(&pool).await.unwrap();
        let partitions = db.count("SELECT count(*) FROM pg_partition_tree('audit_logs') WHERE isleaf").await;
        assert!(partitions > 1, "daily partitions and the default");
        assert_eq!(empty.audit_log_partitions, partitions);

        let evs = events(4, 2_000);
        writer::write(&mut client, &set(rows(&evs, 0), None, 2_000), InsertMethod::OptimisticCopy).await.unwrap();
        client.batch_execute("ANALYZE audit_logs").await.unwrap();
        let full = audit_service::store::storage_metrics::read(&pool).await.unwrap();
        assert!(full.audit_log_bytes > empty.audit_log_bytes, "{empty:?} → {full:?}");
        assert_eq!(full.audit_log_rows_estimate, 2_000, "exact after ANALYZE of so few rows");
        assert!(full.database_bytes > full.audit_log_bytes, "{full:?}");
    });
}
