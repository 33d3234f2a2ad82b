//! Outages: PostgreSQL refusing connections, a Kafka broker going away.
//! Nothing is lost, ingest resumes by itself, memory stays bounded.

mod common;

use std::time::{Duration, Instant};

use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::service;
use common::*;
use rdkafka::producer::Producer;
use tokio_util::sync::CancellationToken;

#[test]
fn database_outage_pauses_consumption_and_ingest_resumes_by_itself_with_bounded_memory() {
    with_world(4, async |world| {
        let World { kafka, names, db, logs } = world;
        let env = service_env(db, kafka, names);
        let producer = producer(kafka);
        let all = events(21, 160_000);
        produce_events(&producer, &names.events, &all[..20_000], ALL_FORMATS);
        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        db.wait_for_offsets(20_000, Duration::from_secs(60), "first 20,000 stored").await;
        let rss_before = service.rss_kib();

        // The outage: nobody may connect, and the service's sessions die.
        let admin = pg_connect(PG_ADMIN_URL).await;
        admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name)).await.unwrap();
        admin
            .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&db.name])
            .await
            .unwrap();
        // 140,000 events arrive while the database is away.
        produce_events(&producer, &names.events, &all[20_000..], ALL_FORMATS);
        let addr = service.http_addr().expect("service logged its HTTP address");
        // It pauses consumption (backpressure) instead of buffering.
        eventually(Duration::from_secs(30), "backpressure pause reported", || async {
            let m = scrape(addr).await;
            (metric_value(&m, "audit_ingest_paused{reason=\"backpressure\"}") == Some(1.0)).then_some(())
        })
        .await;
        // Hold the outage while the rest of the topic is available to it,
        // sampling its memory.
        let mut rss_peak = 0;
        let outage_end = Instant::now() + Duration::from_secs(4);
        while Instant::now() < outage_end {
            rss_peak = rss_peak.max(service.rss_kib());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let m = scrape(addr).await;
        assert!(metric_value(&m, "audit_db_write_errors_total{kind=\"connect\"}").unwrap_or(0.0) > 0.0, "{m}");
        // The waiting work shows as consumer lag.
        let lag: f64 = m
            .lines()
            .filter(|l| l.starts_with("audit_consumer_lag_messages{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(lag > 0.0, "no consumer lag reported during the outage:\n{m}");

        admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name)).await.unwrap();
        db.wait_for_offsets(160_000, Duration::from_secs(120), "all 160,000 stored after the outage").await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 160_000);
        assert_eq!(db.count("SELECT count(DISTINCT event_id) FROM audit_logs").await, 160_000);
        // 140,000 events (~45 MB as JSON) waited on Kafka, not in memory:
        // the service held at most its queue and librdkafka's bounded prefetch.
        let growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
        println!("RSS before outage {} MiB, peak during outage {} MiB", rss_before / 1024, rss_peak / 1024);
        assert!(growth_mib < 64, "memory grew by {growth_mib} MiB during the outage");
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
    });
}

#[test]
fn broker_down_and_back_loses_nothing() {
    let kafka = EmbeddedKafka::start(3).unwrap();
    let names = Names::new();
    names.create(&kafka, 6);
    let rt = rt();
    rt.block_on(async {
        let db = TestDb::create().await;
        let config = service_config(&db, &kafka, &names);
        let all = events(31, 60_000);
        let producer = producer(&kafka);
        produce_events(&producer, &names.events, &all[..30_000], ALL_FORMATS);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        // Events of every partition stored: the consumer fetches from every
        // leader, so the one taken down below is one it depends on.
        eventually(Duration::from_secs(60), "events of every partition stored", || async {
            (db.count("SELECT count(DISTINCT kafka_partition) FROM audit_logs").await == 6).then_some(())
        })
        .await;
        // The leader of partition 0 (replication factor 1): its partitions
        // are unreachable until it is back. (The mock cluster places leaders
        // at random: a fixed broker may lead none of the partitions, and
        // the consumer never connects to it.)
        let metadata = producer.client().fetch_metadata(Some(&names.events), Duration::from_secs(10)).unwrap();
        let leader = metadata.topics()[0].partitions().iter().find(|p| p.id() == 0).unwrap().leader();
        kafka.broker_down(leader).unwrap();
        eventually(Duration::from_secs(60), "the service notices the broker is gone", || async {
            running.status.snapshot().last_kafka_error.is_some().then_some(())
        })
        .await;
        let stalled_at = db.stored_offsets().await;
        kafka.broker_up(leader).unwrap();
        produce_events(&producer, &names.events, &all[30_000..], ALL_FORMATS);
        db.wait_for_offsets(60_000, Duration::from_secs(120), "all 60,000 stored after the broker returned").await;
        running.stop();
        running.wait().await;
        assert!(stalled_at < 60_000);
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 60_000);
        assert_eq!(db.count("SELECT count(DISTINCT event_id) FROM audit_logs").await, 60_000);
    });
}

/// The schema registry away: Avro messages whose schema id only it knows
/// wait with their partition (nothing dead-lettered, nothing lost), the
/// other partitions go on, health and a metric say why, and the waiting
/// partition resumes by itself when the registry answers.
#[test]
fn a_schema_registry_outage_holds_avro_messages_and_is_reported() {
    use audit_service::loadgen::WireFormat;
    const REGISTRY_ONLY_ID: u32 = 4242;
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        // A port nothing listens on yet: the registry is down.
        let registry_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut config = service_config(db, kafka, names);
        config.schema_registry.url = Some(format!("http://{registry_addr}"));
        config.schema_registry.timeout = Duration::from_millis(500);
        let token = "registry-outage-token-0123456789";
        with_admin_token(&mut config, token);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        // Partition 0: Avro that needs the registry; partition 1: JSON.
        let all = events(31, 50);
        let (avro, json) = all.split_at(25);
        let producer = producer(kafka);
        for e in avro {
            let payload = audit_service::loadgen::encode(e, WireFormat::AvroConfluent(REGISTRY_ONLY_ID));
            producer
                .send(rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&names.events).partition(0).payload(&payload[..]))
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        produce_to(&producer, &names.events, 1, json);

        let health = || async {
            let resp = reqwest::Client::new()
                .get(format!("http://{}/api/v1/audit/health", running.http_addr))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            resp.json::<serde_json::Value>().await.unwrap()
        };
        let h = eventually(Duration::from_secs(60), "health names the registry", || async {
            let h = health().await;
            h["ingest"]["schema_registry_error"].is_string().then_some(h)
        })
        .await;
        assert_eq!(h["status"], "degraded", "{h}");
        assert!(h["problems"].to_string().contains("schema registry"), "{h}");
        let errors = metric_value(&scrape(running.http_addr).await, "audit_schema_registry_errors_total");
        assert!(errors >= Some(1.0), "{errors:?}");
        // The JSON partition is not held up by the Avro one.
        eventually(Duration::from_secs(60), "the JSON partition stored", || async {
            (db.count("SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE kafka_partition = 1")
                .await
                == json.len() as i64)
                .then_some(())
        })
        .await;
        assert_eq!(
            db.count("SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE kafka_partition = 0")
                .await,
            0,
            "the Avro partition waits"
        );
        assert_eq!(db.count("SELECT count(*) FROM dead_letters").await, 0, "held, not dead-lettered");
        let h = health().await;
        assert!(h["ingest"]["schema_registry_error"].is_string(), "still waiting: {h}");

        // The registry comes back on its address.
        let schema = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/auth_event.avsc")).unwrap();
        let body = serde_json::json!({ "schema": schema }).to_string();
        let app = axum::Router::new().route(
            "/schemas/ids/{id}",
            axum::routing::get(move || {
                let body = body.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json")], body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind(registry_addr).await.unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        db.wait_for_offsets(all.len() as i64, Duration::from_secs(60), "every event stored").await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, all.len() as i64);
        let h = health().await;
        assert!(h["ingest"]["schema_registry_error"].is_null(), "{h}");
        running.stop();
        running.wait().await;
    });
}
