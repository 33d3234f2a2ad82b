//! Detector state follows the partition across rebalances: a partition that
//! moves to another instance and comes back is rebuilt from what is stored
//! then, so that an attack counted partly by each instance is still seen
//! whole; the alert records the partition it came from.

mod common;

use std::time::Duration;

use audit_service::event::AuthEvent;
use audit_service::service;
use common::*;
use tokio_util::sync::CancellationToken;

/// Failed logins of one user from different addresses: only the per-user
/// rule (> 5 in a minute: warning) is in play.
fn failures(user: &str, from: u32, n: u32, t0: i64) -> Vec<AuthEvent> {
    (from..from + n)
        .map(|i| auth_event("FAILED_AUTH_LOGIN", user, &format!("10.7.0.{}", i + 1), t0 + i64::from(i) * 100_000))
        .collect()
}

#[test]
fn an_attack_split_across_a_partition_move_and_back_is_detected() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);
        let producer = producer(kafka);
        let a = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(60), "the first instance owns both partitions", || async {
            (assigned(&a) == [0, 1]).then_some(())
        })
        .await;
        let b = service::start(&config, CancellationToken::new()).await.unwrap();
        let moved = eventually(Duration::from_secs(120), "one partition each", || async {
            let (pa, pb) = (assigned(&a), assigned(&b));
            (pa.len() == 1 && pb.len() == 1 && pa != pb).then(|| pb[0])
        })
        .await;

        // Four failures while the second instance owns the user's partition
        // (below the warning level)...
        let t0 = chrono::Utc::now().timestamp_micros() - 20_000_000;
        produce_to(&producer, &names.events, moved, &failures("roamer", 0, 4, t0));
        eventually(Duration::from_secs(60), "four failures stored", || async {
            (db.count("SELECT count(*) FROM audit_logs").await == 4).then_some(())
        })
        .await;
        b.stop();
        b.wait().await;
        eventually(Duration::from_secs(120), "the partition is back with the first instance", || async {
            (assigned(&a) == [0, 1]).then_some(())
        })
        .await;

        // ...and four more once it is back: eight within the minute.
        produce_to(&producer, &names.events, moved, &failures("roamer", 4, 4, t0));
        let partition = eventually(Duration::from_secs(60), "the user's alert stored", || async {
            let client = db.client().await;
            let rows = client
                .query("SELECT state, count, kafka_partition FROM alerts WHERE subject = 'user:roamer'", &[])
                .await
                .unwrap();
            let stored = db.count("SELECT count(*) FROM audit_logs").await;
            (stored == 8 && rows.len() == 1).then(|| {
                assert_eq!(rows[0].get::<_, &str>(0), "firing");
                assert_eq!(rows[0].get::<_, i64>(1), 6, "fired at the sixth failure: the first four were counted");
                rows[0].get::<_, Option<i32>>(2)
            })
        })
        .await;
        assert_eq!(partition, Some(moved), "the alert records its partition");
        a.stop();
        a.wait().await;
    });
}
