//! Ingest end to end, in process: the embedded Kafka cluster, the real
//! consumer and producers, a fresh PostgreSQL database per test.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use audit_service::event::AuthEvent;
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
    with_world(4, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);

        // 100,000 messages: 95,000 distinct events, 5,000 producer retries
        // of earlier ones (same event, possibly another encoding).
        let distinct = events(1, 95_000);
        let mut all = distinct.clone();
        let mut rng = loadgen::Rng::new(99);
        for _ in 0..5_000 {
            let i = rng.below(distinct.len() as u64) as usize;
            all.push(distinct[i].clone());
        }
        let producer = producer(kafka);
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
        db.wait_for_offsets(all.len() as i64, Duration::from_secs(30), "offsets stored for 100,000 messages").await;
        running.stop();
        running.wait().await;

        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, expected);
        assert_eq!(db.count("SELECT count(DISTINCT event_id) FROM audit_logs").await, expected);
        assert_eq!(db.count("SELECT count(*) FROM dead_letters").await, 0);
        let stored = stored_events(db).await;
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
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);
        let producer = producer(kafka);
        let evs = events(2, 500);
        produce_events(&producer, &names.events, &evs, ALL_FORMATS);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(30), "500 events stored", || async {
            (db.count("SELECT count(*) FROM audit_logs").await == 500).then_some(())
        })
        .await;
        // The pipeline's metrics are exposed (the recorder is shared by the
        // tests of this binary, so counters are at least this test's).
        let metrics = scrape(running.http_addr).await;
        for name in [
            "audit_events_consumed_total{encoding=\"json\"}",
            "audit_events_stored_total",
            "audit_batch_messages_count",
        ] {
            assert!(metric_value(&metrics, name).is_some_and(|v| v > 0.0), "{name} in\n{metrics}");
        }
        assert!(metrics.contains("audit_batch_write_duration_seconds_bucket"), "{metrics}");
        running.stop();
        tokio::time::timeout(Duration::from_secs(20), running.wait()).await.expect("service stops within 20 s");
        assert_eq!(db.count("SELECT sum(next_offset)::bigint FROM consumer_offsets").await, 500);
    });
}

/// One bad message of every kind, each between good ones, all on one
/// partition: each bad one reaches the DLQ with its reason and original
/// bytes, and every good one is stored.
#[test]
fn bad_messages_are_dead_lettered_and_good_ones_around_them_stored() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);
        let good = events(3, 12);
        let json = |e: &AuthEvent| loadgen::encode_json(e);
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_slice(&json(&good[0])).unwrap();
            v["event_id"] = serde_json::Value::String(Uuid::new_v4().to_string());
            f(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let avro = loadgen::encode(&good[1], WireFormat::AvroConfluent(TEST_SCHEMA_ID));
        let mut non_utf8 = json(&good[2]);
        let at = non_utf8.windows(4).position(|w| w == b"user").unwrap();
        non_utf8[at] = 0xff;
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("malformed_avro", avro[..avro.len() - 7].to_vec()),
            ("unknown_schema_id", loadgen::encode(&good[1], WireFormat::AvroConfluent(4242))),
            ("malformed_json", b"{\"event_id\": \"abc\", ".to_vec()),
            (
                "missing_field",
                with(&|v| {
                    v.as_object_mut().unwrap().remove("event_id");
                }),
            ),
            ("invalid_ip", with(&|v| v["ip_address"] = "300.1.2.3".into())),
            ("invalid_ip", with(&|v| v["ip_address"] = "2001:db8::zz".into())),
            ("nul_byte", with(&|v| v["user_agent"] = "Mozilla\u{0}/5.0".into())),
            ("too_large", {
                let mut big = with(&|_| {});
                big.extend(std::iter::repeat_n(b' ', 2 * 1024 * 1024));
                big
            }),
            ("timestamp_in_future", with(&|v| v["occurred_at"] = "9999-01-01T00:00:00Z".into())),
            ("invalid_utf8", non_utf8),
            ("empty", Vec::new()),
        ];
        // good, bad, good, bad, ..., good
        let mut messages = Vec::new();
        let mut good_iter = good.iter();
        for (_, payload) in &bad {
            let e = good_iter.next().unwrap();
            messages.push((Some(b"good".to_vec()), json(e)));
            messages.push((Some(b"bad-key".to_vec()), payload.clone()));
        }
        let last = good_iter.next().unwrap();
        messages.push((Some(b"good".to_vec()), json(last)));
        let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("message.max.bytes", "4000000")
            .create()
            .unwrap();
        produce_raw(&producer, &names.events, &messages);

        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(messages.len() as i64, Duration::from_secs(60), "every message stored or dead-lettered")
            .await;
        running.stop();
        running.wait().await;

        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, bad.len() as i64 + 1);
        assert_eq!(db.count("SELECT count(*) FROM dead_letters").await, bad.len() as i64);
        let dlq = read_topic(kafka, &names.dlq, bad.len(), Duration::from_secs(30));
        assert_eq!(dlq.len(), bad.len(), "every bad message is on the DLQ");
        for (i, (code, payload)) in bad.iter().enumerate() {
            let source_offset = (2 * i + 1).to_string();
            let letter = dlq
                .iter()
                .find(|m| m.headers.get("dlq.source.offset") == Some(&source_offset))
                .unwrap_or_else(|| panic!("no dead letter for offset {source_offset} ({code})"));
            assert_eq!(letter.headers["dlq.reason.code"], *code, "offset {source_offset}");
            assert!(!letter.headers["dlq.reason"].is_empty());
            assert_eq!(letter.headers["dlq.source.topic"], names.events);
            assert_eq!(letter.headers["dlq.source.partition"], "0");
            if payload.len() > 900_000 {
                // Cut to fit the DLQ, marked with the original size.
                assert_eq!(letter.headers["dlq.payload.truncated_from"], payload.len().to_string());
                assert_eq!(&letter.payload[..], &payload[..900_000]);
            } else {
                assert_eq!(&letter.payload, payload, "original bytes for {code}");
            }
            assert_eq!(letter.key.as_deref(), Some(&b"bad-key"[..]));
        }
        let client = db.client().await;
        let reasons: Vec<String> = client
            .query("SELECT reason_code FROM dead_letters ORDER BY kafka_offset", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(reasons, bad.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>());
    });
}

/// A bad message whose key and headers alone exceed what the dead-letter
/// topic takes: its letter goes out with the key cut and the original
/// headers left out (both marked), and the partition moves on.
#[test]
fn a_letter_too_large_for_its_key_is_cut_and_does_not_block_the_partition() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer};
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);
        let good = events(4, 2);
        let big_key = vec![b'k'; 1_500_000];
        let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("message.max.bytes", "4000000")
            .create()
            .unwrap();
        let first = loadgen::encode_json(&good[0]);
        let second = loadgen::encode_json(&good[1]);
        producer.send(BaseRecord::to(&names.events).key(&b"good"[..]).payload(&first[..])).unwrap();
        producer
            .send(
                BaseRecord::to(&names.events)
                    .key(&big_key[..])
                    .payload(&b"{not json"[..])
                    .headers(OwnedHeaders::new().insert(Header { key: "trace-id", value: Some("t-1") })),
            )
            .unwrap();
        producer.send(BaseRecord::to(&names.events).key(&b"good"[..]).payload(&second[..])).unwrap();
        producer.flush(Duration::from_secs(30)).unwrap();

        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(3, Duration::from_secs(60), "all three consumed").await;
        running.stop();
        running.wait().await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 2);
        let dlq = read_topic(kafka, &names.dlq, 1, Duration::from_secs(30));
        assert_eq!(dlq.len(), 1);
        let letter = &dlq[0];
        assert_eq!(letter.headers["dlq.reason.code"], "malformed_json");
        assert_eq!(letter.headers["dlq.key.truncated_from"], "1500000");
        assert_eq!(letter.headers["dlq.headers.dropped"], "1");
        assert!(!letter.headers.contains_key("trace-id"));
        assert_eq!(letter.key.as_deref(), Some(&big_key[..1024]));
        assert_eq!(&letter.payload[..], b"{not json");
    });
}

/// A row that decodes fine but that PostgreSQL refuses (here: a CHECK
/// constraint an operator added) goes to the DLQ; the rest of its batch is
/// stored.
#[test]
fn rows_postgres_rejects_are_dead_lettered_without_failing_their_batch() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);
        service::prepare_database(&config).await.unwrap();
        db.client()
            .await
            .batch_execute(
                "ALTER TABLE audit_logs ADD CONSTRAINT no_rejects CHECK (username IS DISTINCT FROM 'reject-me')",
            )
            .await
            .unwrap();
        let mut evs = events(4, 3000);
        for i in [10, 1500, 2999] {
            evs[i].username = Some("reject-me".into());
        }
        // A producer retry in the same run exercises the staged path too.
        evs.push(evs[20].clone());
        let producer = producer(kafka);
        produce_events(&producer, &names.events, &evs, ALL_FORMATS);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(evs.len() as i64, Duration::from_secs(60), "all offsets stored").await;
        running.stop();
        running.wait().await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 2997);
        assert_eq!(db.count("SELECT count(*) FROM dead_letters WHERE reason_code = 'db_rejected'").await, 3);
        let dlq = read_topic(kafka, &names.dlq, 3, Duration::from_secs(30));
        assert_eq!(dlq.len(), 3);
        for letter in &dlq {
            assert_eq!(letter.headers["dlq.reason.code"], "db_rejected");
            assert!(letter.headers["dlq.reason"].contains("no_rejects"), "{:?}", letter.headers);
        }
    });
}
