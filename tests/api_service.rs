//! The admin API inside the running service: maintenance mode against the
//! real consumer (embedded Kafka), and the `audit-service` binary taking
//! its admin token from `ADMIN_TOKEN`, never logging it, and exposing
//! metrics that pass `promtool check metrics`.

mod common;

use std::time::Duration;

use audit_service::config::StaticTokenConfig;
use audit_service::service;
use common::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "service-test-admin-token-0123456789";

fn sha256_hex(token: &str) -> String {
    audit_service::api::auth::sha256(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let resp = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Pausing stops the real consumer (rows stop, lag grows and is reported);
/// resuming stores every event, none twice.
#[test]
fn maintenance_pauses_the_consumer_and_resumes_without_loss() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.api.tokens.push(StaticTokenConfig { name: "ops".into(), sha256: sha256_hex(TOKEN) });
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        let base = format!("http://{}", running.http_addr);
        let http = reqwest::Client::new();
        let producer = producer(kafka);

        let first = events(11, 200);
        produce_events(&producer, &names.events, &first, ALL_FORMATS);
        eventually(Duration::from_secs(30), "200 events stored", || async {
            (db.count("SELECT count(*) FROM audit_logs WHERE kafka_partition >= 0").await == 200).then_some(())
        })
        .await;

        let resp = http
            .post(format!("{base}/api/v1/audit/maintenance"))
            .bearer_auth(TOKEN)
            .json(&json!({"paused": true, "reason": "load test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let second = events(12, 300);
        produce_events(&producer, &names.events, &second, ALL_FORMATS);
        // Paused: whatever the consumer had not taken before the switch
        // waits in Kafka and shows as lag in health.
        let (stored, lag) =
            eventually(Duration::from_secs(30), "health reports the lag of the paused consumer", || async {
                let (status, h) = get(&http, format!("{base}/api/v1/audit/health")).await;
                assert_eq!(status, 200, "{h}");
                let lag = h["kafka"]["consumer_lag"].as_i64().unwrap();
                let stored = db.count("SELECT count(*) FROM audit_logs WHERE kafka_partition >= 0").await;
                (lag > 0 && stored + lag == 500 && h["ingest"]["maintenance_paused"] == true).then_some((stored, lag))
            })
            .await;
        assert!(lag >= 250, "most of the second batch waits: lag {lag}, stored {stored}");
        // It stays paused.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs WHERE kafka_partition >= 0").await, stored);
        let (_, h) = get(&http, format!("{base}/api/v1/audit/health")).await;
        assert_eq!(h["status"], "degraded");
        let scrape = scrape(running.http_addr).await;
        assert_eq!(metric_value(&scrape, "audit_ingest_paused{reason=\"maintenance\"}"), Some(1.0));

        let resp = http
            .post(format!("{base}/api/v1/audit/maintenance"))
            .bearer_auth(TOKEN)
            .json(&json!({"paused": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        eventually(Duration::from_secs(30), "all 500 events stored after resuming", || async {
            (db.count("SELECT count(*) FROM audit_logs WHERE kafka_partition >= 0").await == 500).then_some(())
        })
        .await;
        eventually(Duration::from_secs(30), "lag back to 0", || async {
            let (_, h) = get(&http, format!("{base}/api/v1/audit/health")).await;
            (h["kafka"]["consumer_lag"] == 0).then_some(())
        })
        .await;
        assert_eq!(db.count("SELECT count(DISTINCT event_id) FROM audit_logs WHERE kafka_partition >= 0").await, 500);
        assert_eq!(
            db.count(
                "SELECT count(*) FROM audit_logs WHERE action LIKE 'ADMIN_MAINTENANCE_%' AND user_id = 'token:ops'"
            )
            .await,
            2
        );
        running.stop();
        running.wait().await;
    });
}

async fn post_maintenance(http: &reqwest::Client, base: &str, body: Value) -> Value {
    let resp =
        http.post(format!("{base}/api/v1/audit/maintenance")).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Maintenance mode is the deployment's: a pause made through one instance
/// holds on the others, on an instance that restarts while it is set (from
/// its first message), and a resume through any instance ends it everywhere.
#[test]
fn maintenance_mode_holds_on_every_instance_and_across_a_restart() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.api.tokens.push(StaticTokenConfig { name: "ops".into(), sha256: sha256_hex(TOKEN) });
        // Two instances of one deployment: same group, same database.
        let a = service::start(&config, CancellationToken::new()).await.unwrap();
        let b = service::start(&config, CancellationToken::new()).await.unwrap();
        let (base_a, base_b) = (format!("http://{}", a.http_addr), format!("http://{}", b.http_addr));
        let http = reqwest::Client::new();

        let (_, before) = get(&http, format!("{base_b}/api/v1/audit/maintenance")).await;
        assert_eq!((before["paused"].clone(), before["shared"].clone()), (json!(false), Value::Null));
        let paused = post_maintenance(&http, &base_a, json!({"paused": true, "reason": "vacuum full"})).await;
        assert_eq!(paused["recorded"], true, "{paused}");
        assert_eq!(paused["shared"]["paused"], true, "{paused}");
        assert_eq!(paused["shared"]["changed_by"], "token:ops");
        assert_eq!(paused["shared"]["reason"], "vacuum full");
        eventually(Duration::from_secs(10), "the other instance follows the pause", || async {
            let (_, h) = get(&http, format!("{base_b}/api/v1/audit/health")).await;
            (h["ingest"]["maintenance_paused"] == true).then_some(())
        })
        .await;

        // A restart while paused: the new instance is paused before it
        // takes any message.
        a.stop();
        a.wait().await;
        let a = service::start(&config, CancellationToken::new()).await.unwrap();
        let base_a = format!("http://{}", a.http_addr);
        let (_, state) = get(&http, format!("{base_a}/api/v1/audit/maintenance")).await;
        assert_eq!(state["paused"], true, "a restarted instance starts paused: {state}");

        let produced = events(31, 300);
        produce_events(&producer(kafka), &names.events, &produced, ALL_FORMATS);
        // Both instances hold their partitions and report the events as lag:
        // none was taken.
        eventually(Duration::from_secs(120), "the paused instances report all 300 events as lag", || async {
            let (_, ha) = get(&http, format!("{base_a}/api/v1/audit/health")).await;
            let (_, hb) = get(&http, format!("{base_b}/api/v1/audit/health")).await;
            let lag = ha["kafka"]["consumer_lag"].as_i64().unwrap() + hb["kafka"]["consumer_lag"].as_i64().unwrap();
            let stored = db.count("SELECT count(*) FROM audit_logs WHERE kafka_partition >= 0").await;
            assert_eq!(stored, 0, "an event was stored while every instance was paused");
            (lag == 300).then_some(())
        })
        .await;

        let resumed = post_maintenance(&http, &base_b, json!({"paused": false})).await;
        assert_eq!((resumed["recorded"].clone(), resumed["shared"]["paused"].clone()), (json!(true), json!(false)));
        eventually(Duration::from_secs(10), "the restarted instance follows the resume", || async {
            let (_, state) = get(&http, format!("{base_a}/api/v1/audit/maintenance")).await;
            (state["paused"] == false).then_some(())
        })
        .await;
        eventually(Duration::from_secs(60), "all 300 events stored after the resume", || async {
            (db.count("SELECT count(DISTINCT event_id) FROM audit_logs WHERE kafka_partition >= 0").await == 300)
                .then_some(())
        })
        .await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs WHERE action LIKE 'ADMIN_MAINTENANCE_%'").await, 2);
        for running in [a, b] {
            running.stop();
            running.wait().await;
        }
    });
}

/// The binary, as the runbook runs it: `Authorization: Bearer $ADMIN_TOKEN`.
#[test]
fn binary_takes_admin_token_from_environment_never_logs_it_and_passes_promtool() {
    with_world(2, async |world| {
        let World { kafka, names, db, logs } = world;
        let mut env = service_env(db, kafka, names);
        env.retain(|(k, _)| k != "RUST_LOG");
        env.push(("RUST_LOG".into(), "debug,rdkafka=info,hyper=info,h2=info,tokio_postgres=info".into()));
        env.push(("ADMIN_TOKEN".into(), TOKEN.into()));
        let service = ServiceProcess::spawn(&env, logs.path(), 0);
        let addr = eventually(Duration::from_secs(60), "the service is up", || async { service.http_addr() }).await;
        let http = reqwest::Client::new();
        let base = format!("http://{addr}");

        produce_events(&producer(kafka), &names.events, &events(21, 300), ALL_FORMATS);
        eventually(Duration::from_secs(60), "300 events stored", || async {
            (db.count("SELECT count(*) FROM audit_logs").await == 300).then_some(())
        })
        .await;

        let (status, h) = get(&http, format!("{base}/api/v1/audit/health")).await;
        assert_eq!(status, 200, "{h}\n{}", service.tail());
        assert_eq!(h["storage"]["events_last_hour"], 300, "{h}");
        let (status, page) = get(&http, format!("{base}/api/v1/audit/logs?limit=5")).await;
        assert_eq!(status, 200);
        assert_eq!(page["items"].as_array().unwrap().len(), 5);
        let wrong = http
            .get(format!("{base}/api/v1/audit/health"))
            .bearer_auth("not-the-admin-token-012345")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let (status, _) = get(&http, format!("{base}/api/v1/audit/security")).await;
        assert_eq!(status, 200);

        let metrics = scrape(addr).await;
        let body = metrics.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        for name in [
            "audit_http_request_duration_seconds_bucket",
            "audit_http_rate_limited_total",
            "audit_db_pool_utilization_ratio{pool=\"api\"}",
            "audit_db_pool_utilization_ratio{pool=\"ingest\"}",
            "audit_events_stored_total",
        ] {
            assert!(body.contains(name), "{name} missing from\n{body}");
        }
        let out = promtool_check(&body);
        assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "promtool: {out:?}\n{body}");

        let log = std::fs::read_to_string(&service.log).unwrap();
        assert!(log.contains("admin request refused"), "the refused request is logged (without its token)");
        assert!(!log.contains(TOKEN), "the admin token appears in the log");
        assert!(!log.contains("not-the-admin-token-012345"), "a presented token appears in the log");
    });
}

fn promtool_check(scrape: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}
