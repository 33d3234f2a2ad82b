//! Alerts at least once across a crash: a transition stored with its batch
//! but never acknowledged by Kafka (the process was killed with it in
//! flight) is sent again, under the same alert_id, when its partition is
//! next assigned; an acknowledged one is recorded as delivered and is not
//! sent again.

mod common;

use std::time::Duration;

use audit_service::event::AuthEvent;
use audit_service::loadgen::WireFormat;
use common::*;
use rdkafka::types::RDKafkaRespErr;

/// Kafka's API key of Produce requests.
const PRODUCE: i16 = 0;

fn failures(user: &str, n: u32, t0: i64) -> Vec<AuthEvent> {
    (0..n)
        .map(|i| {
            auth_event(
                "FAILED_AUTH_LOGIN",
                user,
                &format!("10.9.{}.{}", i / 250, i % 250 + 1),
                t0 + i64::from(i) * 100_000,
            )
        })
        .collect()
}

#[test]
fn an_alert_in_flight_at_a_sigkill_is_sent_again_after_the_restart() {
    with_world(1, async |world| {
        let World { kafka, names, db, logs } = world;
        let env = service_env(db, kafka, names);
        let t0 = chrono::Utc::now().timestamp_micros() - 30_000_000;
        // Six failures: the per-user warning (> 5). They are in the topic
        // before Kafka starts refusing produce requests (retriable errors:
        // the alert producer keeps trying, nothing is acknowledged).
        produce_events(&producer(kafka), &names.events, &failures("victim", 6, t0), &[WireFormat::Json]);
        kafka.push_request_errors(PRODUCE, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, 1_000_000);

        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        let stored = "SELECT count(*) FROM alerts WHERE subject = 'user:victim' AND state = 'firing'";
        eventually(Duration::from_secs(60), "the alert stored with its batch", || async {
            (db.count(stored).await == 1).then_some(())
        })
        .await;
        assert_eq!(
            db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL").await,
            0,
            "Kafka acknowledged nothing"
        );
        service.sigkill();

        kafka.clear_request_errors(PRODUCE);
        let mut service = ServiceProcess::spawn(&env, logs.path(), 1);
        let alert_id: uuid::Uuid = db
            .client()
            .await
            .query_one("SELECT alert_id FROM alerts WHERE subject = 'user:victim'", &[])
            .await
            .unwrap()
            .get(0);
        eventually(Duration::from_secs(60), "the delivery recorded", || async {
            (db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL").await == 1).then_some(())
        })
        .await;
        let topic = read_topic(kafka, &names.alerts, 1, Duration::from_secs(10));
        assert_eq!(topic.len(), 1, "sent once the broker took it");
        let sent: serde_json::Value = serde_json::from_slice(&topic[0].payload).unwrap();
        assert_eq!(sent["alert_id"], alert_id.to_string(), "under the stored alert_id");
        assert_eq!((sent["state"].as_str(), sent["count"].as_u64()), (Some("firing"), Some(6)));

        // Delivered: a second restart sends nothing again.
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
        let mut service = ServiceProcess::spawn(&env, logs.path(), 2);
        eventually(Duration::from_secs(30), "the restarted service owns its partition", || async {
            let addr = service.http_addr()?;
            let scrape = scrape(addr).await;
            (metric_value(&scrape, "audit_consumer_assigned_partitions") == Some(1.0)).then_some(())
        })
        .await;
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
        let topic = read_topic(kafka, &names.alerts, 1, Duration::from_secs(5));
        assert_eq!(topic.len(), 1, "nothing sent twice");
    });
}

/// A transition the storm limiter held back (carried by a storm summary)
/// and never acknowledged is sent again after a restart too: through the
/// limiter again, so in a summary when the burst is spent.
#[test]
fn a_held_back_alert_in_flight_at_a_sigkill_is_carried_again_after_the_restart() {
    with_world(1, async |world| {
        let World { kafka, names, db, logs } = world;
        let mut env = service_env(db, kafka, names);
        env.push(("AUDIT__DETECT__STORM_LIMIT_PER_SECOND".into(), "1".into()));
        env.push(("AUDIT__DETECT__STORM_BURST".into(), "1".into()));
        let t0 = chrono::Utc::now().timestamp_micros() - 30_000_000;
        let mut events = failures("first", 6, t0);
        events.extend(failures("second", 6, t0 + 1_000_000));
        produce_events(&producer(kafka), &names.events, &events, &[WireFormat::Json]);
        kafka.push_request_errors(PRODUCE, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, 1_000_000);

        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        eventually(Duration::from_secs(60), "both alerts stored, one held back", || async {
            let held = db.count("SELECT count(*) FROM alerts WHERE NOT published").await;
            (db.count("SELECT count(*) FROM alerts").await == 2 && held == 1).then_some(())
        })
        .await;
        service.sigkill();

        kafka.clear_request_errors(PRODUCE);
        let mut service = ServiceProcess::spawn(&env, logs.path(), 1);
        eventually(Duration::from_secs(60), "both deliveries recorded", || async {
            (db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL").await == 2).then_some(())
        })
        .await;
        let mut stored: Vec<String> = db
            .client()
            .await
            .query("SELECT alert_id::text FROM alerts ORDER BY alert_id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let topic = read_topic(kafka, &names.alerts, 2, Duration::from_secs(10));
        let mut sent = Vec::new();
        for m in &topic {
            let a: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            match a.get("withheld") {
                Some(w) => sent.extend(w["alerts"].as_array().unwrap().iter().map(|h| h["alert_id"].to_string())),
                None => sent.push(a["alert_id"].to_string()),
            }
        }
        let mut sent: Vec<String> = sent.iter().map(|s| s.trim_matches('"').to_owned()).collect();
        sent.sort();
        stored.sort();
        assert_eq!(sent, stored, "each sent once, one on its own and one in a summary: {topic:?}");
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
    });
}

/// Kafka refusing an alert for longer than the producer's message timeout
/// does not lose it while the service runs: it is sent again after a
/// backoff, until Kafka takes it, without a restart.
#[test]
fn a_refused_alert_is_sent_again_while_the_service_runs() {
    with_world(1, async |world| {
        let World { kafka, names, db, logs } = world;
        let mut env = service_env(db, kafka, names);
        env.push(("AUDIT__KAFKA__PRODUCER_PROPERTIES__MESSAGE.TIMEOUT.MS".into(), "1500".into()));
        let t0 = chrono::Utc::now().timestamp_micros() - 30_000_000;
        produce_events(&producer(kafka), &names.events, &failures("victim", 6, t0), &[WireFormat::Json]);
        kafka.push_request_errors(PRODUCE, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, 1_000_000);

        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        eventually(Duration::from_secs(60), "the alert refused twice (sent again once)", || async {
            let addr = service.http_addr()?;
            let errors =
                metric_value(&scrape(addr).await, "audit_alert_publish_errors_total{rule=\"user_failed_logins\"}");
            (errors >= Some(2.0)).then_some(())
        })
        .await;
        assert_eq!(db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL").await, 0);

        kafka.clear_request_errors(PRODUCE);
        eventually(Duration::from_secs(90), "the delivery recorded", || async {
            (db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL").await == 1).then_some(())
        })
        .await;
        let topic = read_topic(kafka, &names.alerts, 1, Duration::from_secs(10));
        assert_eq!(topic.len(), 1, "on the topic once");
        let sent: serde_json::Value = serde_json::from_slice(&topic[0].payload).unwrap();
        assert_eq!(sent["subject"], "user:victim");
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
    });
}
