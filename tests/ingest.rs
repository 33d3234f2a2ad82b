//! Ingest end to end, in process: the embedded Kafka cluster, the real
//! consumer and producers, a fresh PostgreSQL database per test.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use audit_service::event::AuthEvent;
use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::loadgen::{self, WireFormat};
use audit_service::service;
use common::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Reads every stored row back as an AuthEvent, keyed by event_id.
async fn stored_events(db: &TestDb) -> HashMap<Uuid, AuthEvent> {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT event_id, (extract(epoch FROM created_at) * 1000000)::bigint, action, user_id, username,
                    host(ip_address), user_agent, session_id, request_id, metadata
               FROM audit_logs",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let metadata: Option<serde_json::Value> = r.get(9);
            let mut metadata: Vec<(String, String)> = metadata
                .and_then(|m| m.as_object().cloned())
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
                .collect();
            metadata.sort();
            let ip: Option<String> = r.get(5);
            let e = AuthEvent {
                event_id: r.get(0),
                occurred_at: r.get(1),
                action: r.get(2),
                user_id: r.get(3),
                username: r.get(4),
                ip_address: ip.map(|s| s.parse::<IpAddr>().unwrap()),
                user_agent: r.get(6),
                session_id: r.get(7),
                request_id: r.get(8),
                metadata,
            };
            (e.event_id, e)
        })
        .collect()
}

fn normalised(mut e: AuthEvent) -> AuthEvent {
    e.metadata.sort();
    e
}

#[test]
fn mixed_encodings_with_duplicates_are_stored_exactly_once_field_for_field() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let names = Names::new();
    names.create(&kafka, 4);
    let rt = rt();
    rt.block_on(async {
        let db = TestDb::create().await;
        let config = service_config(&db, &kafka, &names);

        // 100,000 messages: 95,000 distinct events, 5,000 producer retries
        // of earlier ones (same event, possibly another encoding).
        let distinct = events(1, 95_000);
        let mut all = distinct.clone();
        let mut rng = loadgen::Rng::new(99);
        for _ in 0..5_000 {
            let i = rng.below(distinct.len() as u64) as usize;
            all.push(distinct[i].clone());
        }
        let producer = producer(&kafka);
        // Half before the service starts, half while it runs.
        produce_events(&producer, &names.events, &all[..50_000], ALL_FORMATS);

        let cancel = CancellationToken::new();
        let running = service::start(&config, cancel.clone()).await.unwrap();
        produce_events(&producer, &names.events, &all[50_000..], ALL_FORMATS);

        let expected = distinct.len() as i64;
        eventually(Duration::from_secs(120), "all distinct events stored", || async {
            let n = db.count("SELECT count(*) FROM audit_logs").await;
            (n >= expected).then_some(())
        })
        .await;
        // Every offset of every partition consumed and stored.
        eventually(Duration::from_secs(30), "offsets stored for 100,000 messages", || async {
            let n = db.count("SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets").await;
            (n == all.len() as i64).then_some(())
        })
        .await;
        running.stop();
        running.wait().await;

        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, expected);
        assert_eq!(db.count("SELECT count(DISTINCT event_id) FROM audit_logs").await, expected);
        assert_eq!(db.count("SELECT count(*) FROM dead_letters").await, 0);
        let stored = stored_events(&db).await;
        for e in &distinct {
            let got = stored.get(&e.event_id).unwrap_or_else(|| panic!("event {} missing", e.event_id));
            assert_eq!(got, &normalised(e.clone()));
        }
        // All three encodings were really exercised.
        let json = distinct.iter().step_by(3).count();
        assert!(json > 30_000);
    });
}

#[test]
fn stop_flushes_and_returns_promptly() {
    audit_service::telemetry::init(audit_service::telemetry::LogFormat::Text);
    let kafka = EmbeddedKafka::start(1).unwrap();
    let names = Names::new();
    names.create(&kafka, 2);
    let rt = rt();
    rt.block_on(async {
        let db = TestDb::create().await;
        let config = service_config(&db, &kafka, &names);
        let producer = producer(&kafka);
        let evs = events(2, 500);
        produce_events(&producer, &names.events, &evs, ALL_FORMATS);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(30), "500 events stored", || async {
            (db.count("SELECT count(*) FROM audit_logs").await == 500).then_some(())
        })
        .await;
        running.stop();
        tokio::time::timeout(Duration::from_secs(20), running.wait()).await.expect("service stops within 20 s");
        assert_eq!(db.count("SELECT sum(next_offset)::bigint FROM consumer_offsets").await, 500);
    });
}
