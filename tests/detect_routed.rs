//! Routed detection: a rule keyed by IP address counts the events of every
//! instance (through the routing topic), exactly, also across a rebalance
//! of the routed consumers.

mod common;

use std::time::Duration;

use audit_service::config::{Config, StaticTokenConfig};
use audit_service::detect::keys::KeySpec;
use audit_service::detect::rules::AllowList;
use audit_service::detect::{RecommendedAction, RuleConfig, RuleKind, routing};
use audit_service::event::AuthEvent;
use audit_service::event::avro::encode_body;
use audit_service::event::routed::RoutedRecordWriter;
use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::loadgen::{self, WireFormat};
use audit_service::service;
use common::*;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use tokio_util::sync::CancellationToken;

const IP: &str = "198.51.100.77";
const TOKEN: &str = "routed-test-admin-token-0123456789";

fn sha256_hex(token: &str) -> String {
    audit_service::api::auth::sha256(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Failed logins from one address, each by another user (no per-user rule
/// would fire), a tenth of a second apart from `t0`.
fn failures(from: u32, n: u32, t0: i64) -> Vec<AuthEvent> {
    (from..from + n)
        .map(|i| auth_event("FAILED_AUTH_LOGIN", &format!("victim{i}"), IP, t0 + i64::from(i) * 100_000))
        .collect()
}

/// Warning above 11 failures from one address in an hour, critical above 15.
fn ip_rule() -> RuleConfig {
    RuleConfig {
        id: "ip_failures".into(),
        kind: RuleKind::EventCount,
        enabled: true,
        actions: vec!["@failure".into()],
        then_actions: Vec::new(),
        group_by: vec!["ip_address".into()],
        distinct: None,
        window: Duration::from_secs(3600),
        warning: Some(11),
        critical: Some(15),
        min_count: None,
        severity: None,
        recommended_action: RecommendedAction::BlockIp,
        allow: AllowList::default(),
    }
}

/// The test service's config with routed detection on and only [`ip_rule`].
fn routed_config(db: &TestDb, kafka: &EmbeddedKafka, names: &Names, routing_topic: &str) -> Config {
    let mut config = service_config(db, kafka, names);
    config.detect.routing_topic = Some(routing_topic.to_owned());
    config.detect.rules = vec![ip_rule()];
    config
}

/// (state, severity, count) of the address's alert transitions, in order.
async fn ip_alerts(db: &TestDb) -> Vec<(String, String, i64)> {
    db.client()
        .await
        .query(
            "SELECT state, severity, count FROM alerts WHERE rule = 'ip_failures' AND subject = $1 ORDER BY id",
            &[&format!("ip:{IP}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A routing topic of the test's own with `partitions` partitions.
fn routing_topic(kafka: &EmbeddedKafka, names: &Names, partitions: i32) -> String {
    let topic = format!("{}.routed", names.events);
    kafka.create_topic(&topic, partitions).unwrap();
    topic
}

/// A routed record of `events`, each given with its offset on events
/// partition 0.
fn routed_record(events: &[(i64, &AuthEvent)]) -> Vec<u8> {
    let mut record = RoutedRecordWriter::default();
    for (offset, e) in events {
        record.push(0, *offset, &encode_body(e));
    }
    record.finish()
}

/// Produces `payload` to `partition` of the routing topic as a record of the
/// routed key `key` (with `source`: the header of earlier versions' records
/// of one event each); the caller flushes.
fn send_routed(producer: &BaseProducer, topic: &str, partition: i32, key: &str, source: Option<&str>, payload: &[u8]) {
    let mut headers = OwnedHeaders::new().insert(Header { key: routing::HEADER_KEY_SPEC, value: Some(key) });
    if let Some(source) = source {
        headers = headers.insert(Header { key: routing::HEADER_SOURCE, value: Some(source) });
    }
    producer.send(BaseRecord::<(), _>::to(topic).partition(partition).payload(payload).headers(headers)).unwrap();
}

/// 1 once routing partition `routed` has counted events partition `source`
/// up to `offset` (its mark is stored with any alert it made), else 0.
fn counted_up_to(routed: i32, source: i32, offset: i64) -> String {
    format!(
        "SELECT count(*) FROM routed_progress WHERE routed_partition = {routed} \
         AND source_partition = {source} AND source_offset >= {offset}"
    )
}

#[test]
fn an_ip_rule_counts_every_instance_exactly_across_a_rebalance() {
    let (kafka, names) = cluster(2);
    let routing_topic = routing_topic(&kafka, &names, 4);
    let rt = rt();
    rt.block_on(async {
        let db = TestDb::create().await;
        let config = routed_config(&db, &kafka, &names, &routing_topic);
        let producer = producer(&kafka);
        let a = service::start(&config, CancellationToken::new()).await.unwrap();
        let b = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(120), "one events partition each", || async {
            let (pa, pb) = (assigned(&a), assigned(&b));
            (pa.len() == 1 && pb.len() == 1 && pa != pb).then_some(())
        })
        .await;

        // Twelve failures from one address, six through each instance: each
        // alone sees six, below the warning level (> 11).
        let t0 = chrono::Utc::now().timestamp_micros() - 60_000_000;
        produce_to(&producer, &names.events, 0, &failures(0, 6, t0));
        produce_to(&producer, &names.events, 1, &failures(6, 6, t0));
        eventually(Duration::from_secs(90), "the warning, counted over both instances", || async {
            let alerts = ip_alerts(&db).await;
            (!alerts.is_empty()).then(|| {
                assert_eq!(alerts, [("firing".to_owned(), "warning".to_owned(), 12)]);
            })
        })
        .await;

        // One instance leaves: the other takes over every routing partition
        // and rebuilds their counts. Three more failures (below) make 15, not
        // above the critical level: a count rebuilt twice, or the re-send
        // counted, would escalate there.
        b.stop();
        b.wait().await;
        eventually(Duration::from_secs(120), "the remaining instance owns both events partitions", || async {
            (assigned(&a) == [0, 1]).then_some(())
        })
        .await;
        // A re-send of a counted event (what an instance that crashed before
        // its batch committed sends again) must not count twice; sent now,
        // it is read after the routed state was rebuilt. Sent twice: as a
        // routed record of today, and as one event a record with its
        // source in a header (what earlier versions wrote).
        let first = &failures(0, 1, t0)[0];
        let ip_key = KeySpec::parse("ip_address").unwrap();
        let routed_partition = routing::partition_of(ip_key.hash(first).unwrap(), 4);
        let record = routed_record(&[(0, first)]);
        send_routed(&producer, &routing_topic, routed_partition, "ip_address", None, &record);
        let legacy = loadgen::encode(first, WireFormat::AvroSingleObject);
        send_routed(&producer, &routing_topic, routed_partition, "ip_address", Some("0:0"), &legacy);
        producer.flush(Duration::from_secs(30)).unwrap();

        produce_to(&producer, &names.events, 1, &failures(12, 3, t0));
        // Counted up to the fifteenth (offset 8 of partition 1): its mark is
        // stored in the same transaction as any alert it made.
        let mark = counted_up_to(routed_partition, 1, 8);
        eventually(Duration::from_secs(90), "the fifteenth failure counted", || async {
            (db.count(&mark).await == 1).then_some(())
        })
        .await;
        assert_eq!(ip_alerts(&db).await.len(), 1, "no escalation at fifteen: {:?}", ip_alerts(&db).await);
        // The sixteenth crosses it: escalated with the exact count.
        produce_to(&producer, &names.events, 0, &failures(15, 1, t0));
        eventually(Duration::from_secs(90), "the escalation at the sixteenth failure", || async {
            let alerts = ip_alerts(&db).await;
            (alerts.len() == 2).then(|| {
                assert_eq!(alerts[1], ("escalated".to_owned(), "critical".to_owned(), 16), "{alerts:?}");
            })
        })
        .await;
        a.stop();
        a.wait().await;
    });
}

/// A batch whose routed records Kafka refuses is not committed: it is
/// written again once they are acknowledged, and nothing is counted twice.
#[test]
fn a_batch_waits_for_its_routed_records() {
    let (kafka, names) = cluster(1);
    let routing_topic = routing_topic(&kafka, &names, 2);
    let rt = rt();
    rt.block_on(async {
        let db = TestDb::create().await;
        let mut config = routed_config(&db, &kafka, &names, &routing_topic);
        config.api.tokens.push(StaticTokenConfig { name: "ops".into(), sha256: sha256_hex(TOKEN) });
        // The events are in the topic before the service starts; the next
        // produce requests then fail for good (not retried by the client):
        // they are the service's first, its first batch's routed records.
        let t0 = chrono::Utc::now().timestamp_micros() - 60_000_000;
        produce_to(&producer(&kafka), &names.events, 0, &failures(0, 12, t0));
        kafka.push_request_errors(0, RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED, 3);
        let service = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(90), "the warning at twelve, once", || async {
            let alerts = ip_alerts(&db).await;
            (!alerts.is_empty()).then(|| assert_eq!(alerts, [("firing".to_owned(), "warning".to_owned(), 12)]))
        })
        .await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 12);
        // The routed consumer reports its lag per routing partition: all read.
        eventually(Duration::from_secs(30), "the routed consumer's lag reported, 0", || async {
            let scrape = scrape(service.http_addr).await;
            let lag =
                |p: i32| metric_value(&scrape, &format!("audit_routed_consumer_lag_messages{{partition=\"{p}\"}}"));
            (lag(0) == Some(0.0) && lag(1) == Some(0.0)).then_some(())
        })
        .await;
        let scrape = scrape(service.http_addr).await;
        assert!(
            metric_value(&scrape, "audit_routed_produce_errors_total").is_some_and(|n| n >= 1.0),
            "the refused routed records were retried"
        );
        // (Gauges without labels are shared by this binary's tests: only
        // their presence is this test's to check; health below is its own.)
        assert!(metric_value(&scrape, "audit_routed_assigned_partitions").is_some());
        assert!(metric_value(&scrape, "audit_routed_last_stored_timestamp_seconds").is_some_and(|t| t > 0.0));
        // Health shows the routed consumer: both routing partitions, caught
        // up, its progress stored; nothing wrong with it.
        let health: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{}/api/v1/audit/health", service.http_addr))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let routed = &health["kafka"]["routed_detection"];
        assert_eq!(routed["topic"], routing_topic.as_str(), "{health}");
        assert_eq!(routed["group"], format!("{}.routed", config.kafka.group_id));
        assert_eq!(routed["assigned_partitions"], serde_json::json!([0, 1]));
        assert_eq!(routed["consumer_lag"], 0);
        assert_eq!((&routed["routes_by_partitions"], &routed["topic_partitions"]), (&2.into(), &2.into()), "{health}");
        assert!(routed["last_stored_at"].is_string(), "{health}");
        let problems = health["problems"].as_array().unwrap();
        assert!(!problems.iter().any(|p| p.as_str().unwrap().contains("routed")), "{health}");
        // The routed offsets stored in PostgreSQL are committed to Kafka too,
        // for the group's lag tooling.
        let group = format!("{}.routed", config.kafka.group_id);
        let stored: Vec<(i32, i64)> = db
            .client()
            .await
            .query(
                "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 ORDER BY 1",
                &[&group],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // (The address's records all went to one routing partition.) The
        // twelve events travelled in fewer records than events: a batch's
        // events of one key and partition share a record.
        assert_eq!(stored.len(), 1, "the routing partition that got records: {stored:?}");
        assert!(stored[0].1 < 12, "records on the routing partition: {stored:?}");
        let tooling: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.bootstrap_servers())
            .set("group.id", &group)
            .create()
            .unwrap();
        eventually(Duration::from_secs(30), "the routed offsets committed to Kafka", || async {
            let mut tpl = TopicPartitionList::new();
            for p in 0..2 {
                tpl.add_partition(&routing_topic, p);
            }
            let committed: Vec<(i32, i64)> = tooling
                .committed_offsets(tpl, Duration::from_secs(5))
                .ok()?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect();
            (committed == stored).then_some(())
        })
        .await;
        service.stop();
        service.wait().await;
    });
}

/// A batch written again after a crash need not have the same bounds: its
/// routed records may hold events counted already beside new ones. Each
/// event is counted once, by its source partition and offset. Records that
/// cannot be counted are skipped, with a metric, and block nothing.
#[test]
fn a_routed_record_overlapping_what_was_counted_adds_only_the_new_events_and_bad_ones_block_nothing() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let routing_topic = routing_topic(kafka, names, 2);
        let config = routed_config(db, kafka, names, &routing_topic);
        let producer = producer(kafka);
        let t0 = chrono::Utc::now().timestamp_micros() - 60_000_000;
        let all = failures(0, 20, t0);
        produce_to(&producer, &names.events, 0, &all[..12]);
        let service = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(90), "the warning at twelve", || async {
            (ip_alerts(db).await == [("firing".to_owned(), "warning".to_owned(), 12)]).then_some(())
        })
        .await;

        // What another instance's re-sent batch would carry: the twelve
        // counted (offsets 0-11 of events partition 0) and three new ones.
        let ip_key = KeySpec::parse("ip_address").unwrap();
        let partition = routing::partition_of(ip_key.hash(&all[0]).unwrap(), 2);
        let send = |offsets: std::ops::Range<usize>| {
            let events: Vec<(i64, &AuthEvent)> = offsets.map(|o| (o as i64, &all[o])).collect();
            send_routed(&producer, &routing_topic, partition, "ip_address", None, &routed_record(&events));
            producer.flush(Duration::from_secs(30)).unwrap();
        };
        // Bad input first: it is skipped and blocks nothing after it. Bytes
        // that are no record; an event of one event a record without its
        // source header; a record for a rule key this instance does not
        // have.
        let bad = |key: &str, payload: &[u8]| send_routed(&producer, &routing_topic, partition, key, None, payload);
        bad("ip_address", b"not a routed record");
        bad("ip_address", &loadgen::encode(&all[19], WireFormat::AvroSingleObject));
        bad("user_agent", &routed_record(&[(19, &all[19])]));
        send(0..15);
        eventually(Duration::from_secs(60), "offsets up to 14 counted", || async {
            (db.count(&counted_up_to(partition, 0, 14)).await == 1).then_some(())
        })
        .await;
        // Fifteen: not above the critical level. Counting the twelve again
        // would have made 27 and escalated.
        assert_eq!(ip_alerts(db).await, [("firing".to_owned(), "warning".to_owned(), 12)]);
        // Again overlapping (14 counted), one new: sixteen, escalated.
        send(14..16);
        eventually(Duration::from_secs(60), "the escalation at sixteen", || async {
            let alerts = ip_alerts(db).await;
            (alerts.len() == 2).then(|| {
                assert_eq!(alerts[1], ("escalated".to_owned(), "critical".to_owned(), 16), "{alerts:?}");
            })
        })
        .await;
        // The bad records were counted as skipped, by reason.
        let scrape = scrape(service.http_addr).await;
        let skipped =
            |reason: &str| metric_value(&scrape, &format!("audit_routed_events_skipped_total{{reason=\"{reason}\"}}"));
        assert!(skipped("undecodable").is_some_and(|n| n >= 1.0), "{scrape}");
        assert!(skipped("unknown").is_some_and(|n| n >= 2.0), "{scrape}");
        service.stop();
        service.wait().await;
    });
}

/// Lateness is judged per stream the routed consumer reads in order: one
/// routing partition's events from one events partition. The partitions it
/// owns are fetched at their own pace, so an address whose events come
/// after another address's newer event on its routing partition must not
/// find them "late": here twelve failures from one address (offsets 0-11
/// of events partition 0, ten minutes old) reach the consumer after a
/// failure from another address (offset 12, one minute old) on the other
/// routing partition, and still make their warning.
#[test]
fn lateness_is_judged_per_routing_partition_not_across_the_ones_an_instance_owns() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let routing_topic = routing_topic(kafka, names, 2);
        let config = routed_config(db, kafka, names, &routing_topic);
        let producer = producer(kafka);
        let ip_key = KeySpec::parse("ip_address").unwrap();
        let now = chrono::Utc::now().timestamp_micros();
        let at = |ip: &str, i: u32, t: i64| auth_event("FAILED_AUTH_LOGIN", &format!("victim{i}"), ip, t);
        let partition_of = |e: &AuthEvent| routing::partition_of(ip_key.hash(e).unwrap(), 2);
        // Two addresses on different routing partitions.
        let early_ip = "198.51.100.10";
        let later_ip = (11..255)
            .map(|n| format!("198.51.100.{n}"))
            .find(|ip| partition_of(&at(ip, 0, now)) != partition_of(&at(early_ip, 0, now)))
            .unwrap();
        let early: Vec<AuthEvent> =
            (0..12).map(|i| at(early_ip, i, now - 600_000_000 + i64::from(i) * 100_000)).collect();
        let later = at(&later_ip, 12, now - 60_000_000);
        let service = service::start(&config, CancellationToken::new()).await.unwrap();
        let send = |partition: i32, events: &[(i64, &AuthEvent)]| {
            send_routed(&producer, &routing_topic, partition, "ip_address", None, &routed_record(events));
            producer.flush(Duration::from_secs(30)).unwrap();
        };
        // The newer event is read first.
        send(partition_of(&later), &[(12, &later)]);
        eventually(Duration::from_secs(60), "offset 12 counted", || async {
            (db.count(&counted_up_to(partition_of(&later), 0, 12)).await == 1).then_some(())
        })
        .await;
        let entries: Vec<(i64, &AuthEvent)> = early.iter().enumerate().map(|(o, e)| (o as i64, e)).collect();
        send(partition_of(&early[0]), &entries);
        let warning = format!(
            "SELECT count(*) FROM alerts WHERE rule = 'ip_failures' AND subject = 'ip:{early_ip}' \
             AND state = 'firing' AND count = 12"
        );
        eventually(Duration::from_secs(60), "the earlier address's warning at twelve", || async {
            (db.count(&warning).await == 1).then_some(())
        })
        .await;
        service.stop();
        service.wait().await;
    });
}

/// A restart rebuilds the routed detectors from the stored events, and
/// drops again what they dropped live as late in their stream: ten
/// failures from one address, then one two minutes older than them (past
/// the 30 s lateness), are ten counted, not eleven. So after the restart
/// the eleventh failure raises nothing and the twelfth the warning.
#[test]
fn a_routed_rebuild_drops_again_what_was_late_in_its_stream() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let routing_topic = routing_topic(kafka, names, 1);
        let config = routed_config(db, kafka, names, &routing_topic);
        let producer = producer(kafka);
        let t0 = chrono::Utc::now().timestamp_micros() - 600_000_000;
        let mut first = failures(0, 10, t0);
        first.push(auth_event("FAILED_AUTH_LOGIN", "victim10", IP, t0 - 120_000_000));
        produce_events(&producer, &names.events, &first, &[WireFormat::Json]);
        let counted = async |offset: i64| {
            eventually(Duration::from_secs(60), &format!("offset {offset} counted"), || async {
                (db.count(&counted_up_to(0, 0, offset)).await == 1).then_some(())
            })
            .await
        };
        let service = service::start(&config, CancellationToken::new()).await.unwrap();
        counted(10).await;
        assert_eq!(ip_alerts(db).await, [], "the late failure was counted live");
        service.stop();
        service.wait().await;

        let service = service::start(&config, CancellationToken::new()).await.unwrap();
        produce_events(&producer, &names.events, &failures(11, 1, t0), &[WireFormat::Json]);
        counted(11).await;
        assert_eq!(ip_alerts(db).await, [], "the rebuild counted the late failure");
        produce_events(&producer, &names.events, &failures(12, 1, t0), &[WireFormat::Json]);
        eventually(Duration::from_secs(60), "the warning at twelve", || async {
            (ip_alerts(db).await == [("firing".to_owned(), "warning".to_owned(), 12)]).then_some(())
        })
        .await;
        service.stop();
        service.wait().await;
    });
}

/// A routed alert stored but never acknowledged by Kafka (the process that
/// raised it died with it in flight) is sent again, under its alert_id, by
/// the instance that loads its routing partition, and recorded as
/// delivered.
#[test]
fn an_undelivered_routed_alert_is_sent_again_when_its_partition_is_loaded() {
    let (kafka, names) = cluster(1);
    let routing_topic = routing_topic(&kafka, &names, 4);
    let rt = rt();
    rt.block_on(async {
        let db = TestDb::create().await;
        let config = routed_config(&db, &kafka, &names, &routing_topic);
        let key_spec = routing::split(&config.detect).unwrap().routed[0].text.clone();
        // What a crash leaves: the transition stored with its routed batch
        // (no events partition), no acknowledgement recorded.
        let mut client = db.client().await;
        audit_service::store::migrate::run(&mut client).await.unwrap();
        let alert_id = uuid::Uuid::new_v4();
        client
            .execute(
                "INSERT INTO alerts (alert_id, rule, subject, key_spec, key_hash, state, severity, count, threshold,
                                     window_seconds, episode_start, recommended_action, published)
                 VALUES ($1, 'ip_failures', $2, $3, 987654321, 'firing', 'warning', 12, 11, 3600, now(), 'block_ip', true)",
                &[&alert_id, &format!("ip:{IP}"), &key_spec],
            )
            .await
            .unwrap();

        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(60), "the delivery recorded", || async {
            (db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NOT NULL").await == 1).then_some(())
        })
        .await;
        let topic = read_topic(&kafka, &names.alerts, 1, Duration::from_secs(10));
        assert_eq!(topic.len(), 1);
        let sent: serde_json::Value = serde_json::from_slice(&topic[0].payload).unwrap();
        assert_eq!(sent["alert_id"], alert_id.to_string());
        assert_eq!((sent["subject"].as_str(), sent["count"].as_u64()), (Some(format!("ip:{IP}").as_str()), Some(12)));
        assert_eq!(sent["recommended_action"], "block_ip");
        running.stop();
        running.wait().await;
    });
}
