//! The service binary as a child process, killed with SIGKILL at different
//! points while it ingests, restarted each time: the audit log ends up equal
//! to the input, with no duplicate and no gap.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use uuid::Uuid;

const EVENTS: usize = 200_000;
const PARTITIONS: i32 = 4;

#[test]
fn sigkill_at_five_points_during_ingest_loses_and_duplicates_nothing() {
    with_world(PARTITIONS, async |world| {
        let World { kafka, names, db, logs } = world;
        let env = service_env(db, kafka, names);
        let all = events(11, EVENTS);
        let producer = producer(kafka);
        // Half is waiting when the service first starts; the rest arrives
        // while it is being killed and restarted.
        produce_events(&producer, &names.events, &all[..EVENTS / 2], ALL_FORMATS);
        let second_half = {
            let topic = names.events.clone();
            let rest = all[EVENTS / 2..].to_vec();
            let producer = common::producer(kafka);
            std::thread::spawn(move || produce_events(&producer, &topic, &rest, ALL_FORMATS))
        };

        let stored = || async { db.count("SELECT count(*) FROM audit_logs").await.max(0) };
        let mut run = 0;
        // Kill points: during start-up (before the first batch), then at
        // growing row counts, i.e. mid-batch, mid-transaction or between.
        let kill_points: [i64; 5] = [0, 30_000, 70_000, 110_000, 150_000];
        for (i, threshold) in kill_points.iter().enumerate() {
            let mut service = ServiceProcess::spawn(&env, logs.path(), run);
            run += 1;
            if *threshold == 0 {
                // Wait until it has connected to the database, then kill it
                // while it joins the group.
                eventually(Duration::from_secs(30), "service connected", || async {
                    (db.count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'audit-service'").await
                        > 0)
                    .then_some(())
                })
                .await;
            } else {
                let deadline = Instant::now() + Duration::from_secs(120);
                while stored().await < *threshold {
                    assert!(Instant::now() < deadline, "kill {i}: stuck below {threshold} rows\n{}", service.tail());
                    assert!(service.child.try_wait().unwrap().is_none(), "service exited early\n{}", service.tail());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            service.sigkill();
        }
        second_half.join().unwrap();

        // The last run drains everything and stops cleanly on SIGTERM.
        let mut service = ServiceProcess::spawn(&env, logs.path(), run);
        db.wait_for_offsets(EVENTS as i64, Duration::from_secs(180), "every offset stored").await;
        let status = service.sigterm(Duration::from_secs(30));
        assert!(status.success(), "exit status {status:?}\n{}", service.tail());

        assert_eq!(stored().await, EVENTS as i64, "row count");
        assert_eq!(db.count("SELECT count(DISTINCT event_id) FROM audit_logs").await, EVENTS as i64, "duplicates");
        // No gap: each partition's offsets are exactly 0..next_offset.
        let client = db.client().await;
        let per_partition = client
            .query(
                "SELECT o.kafka_partition, o.next_offset, count(a.*), count(DISTINCT a.kafka_offset),
                        coalesce(min(a.kafka_offset), 0), coalesce(max(a.kafka_offset), -1)
                   FROM consumer_offsets o
                   LEFT JOIN audit_logs a ON a.kafka_partition = o.kafka_partition
                  GROUP BY o.kafka_partition, o.next_offset",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(per_partition.len(), PARTITIONS as usize);
        for row in per_partition {
            let (p, next, rows, distinct, min, max): (i32, i64, i64, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
            assert_eq!((rows, distinct, min, max), (next, next, 0, next - 1), "partition {p}");
        }
        let ids: HashSet<Uuid> =
            client.query("SELECT event_id FROM audit_logs", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        let expected: HashSet<Uuid> = all.iter().map(|e| e.event_id).collect();
        assert!(ids == expected, "stored event ids differ from the produced ones");
    });
}
