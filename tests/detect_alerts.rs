//! Detectors end to end: events through the real pipeline, alerts on the
//! alerts topic (read back by an outside consumer and decoded with the
//! published schema) and in the alerts table.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use audit_service::alerts::ALERT_SCHEMA;
use audit_service::detect::AlertFormat;
use audit_service::event::{AuthEvent, avro};
use audit_service::loadgen::WireFormat;
use audit_service::service;
use common::*;
use tokio_util::sync::CancellationToken;

fn attempt(user: &str, ip: &str, action: &str, at: i64) -> AuthEvent {
    auth_event(action, user, ip, at)
}

/// Every rule's attack, in event time order, starting `t0`.
fn attacks(t0: i64) -> Vec<AuthEvent> {
    let s = 1_000_000;
    let mut v = Vec::new();
    let mut push = |e: AuthEvent| {
        v.push(e);
    };
    // Brute force on one user: 11 failures in 11 s (firing, then escalated).
    for i in 0..11 {
        push(attempt("victim", "203.0.113.5", "FAILED_AUTH_LOGIN", t0 + i * s));
    }
    // Password spraying: one IP, 11 usernames.
    for i in 0..11 {
        push(attempt(&format!("sprayed{i}"), "198.51.100.77", "FAILED_AUTH_LOGIN", t0 + 12 * s + i * 100_000));
    }
    // Brute force then success: 5 failures, then a login.
    for i in 0..5 {
        push(attempt("mallory-target", "192.0.2.44", "FAILED_AUTH_LOGIN", t0 + 14 * s + i * 100_000));
    }
    push(attempt("mallory-target", "192.0.2.44", "AUTH_LOGIN", t0 + 15 * s));
    // A system-wide spike: 101 failures from many users and IPs in 30 s.
    for i in 0..101 {
        push(attempt(
            &format!("spike{i}"),
            &format!("10.1.{}.{}", i / 200, i % 200),
            "FAILED_AUTH_LOGIN",
            t0 + 16 * s + i * 200_000,
        ));
    }
    v
}

#[derive(Debug, Clone)]
struct SeenAlert {
    key: String,
    alert_id: String,
    rule: String,
    state: String,
    severity: String,
    subject: String,
}

fn decode_avro_alert(bytes: &[u8]) -> SeenAlert {
    let (_, body) = avro::split_single_object(bytes).expect("single-object framing");
    let schema = apache_avro::Schema::parse_str(ALERT_SCHEMA).unwrap();
    let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .unwrap()
        .read_value(&mut &body[..])
        .expect("decodes with alert.avsc");
    let apache_avro::types::Value::Record(fields) = value else { panic!("not a record") };
    let text = |n: &str| match &fields.iter().find(|(k, _)| k == n).unwrap().1 {
        apache_avro::types::Value::String(s) => s.clone(),
        apache_avro::types::Value::Enum(_, s) => s.clone(),
        apache_avro::types::Value::Uuid(u) => u.to_string(),
        other => panic!("{n}: {other:?}"),
    };
    SeenAlert {
        key: String::new(),
        alert_id: text("alert_id"),
        rule: text("rule"),
        state: text("state"),
        severity: text("severity"),
        subject: text("subject"),
    }
}

#[test]
fn every_rule_alerts_on_the_topic_in_avro_and_in_the_table() {
    with_world(3, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.detect.alert_format = AlertFormat::Avro;
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        let t0 = chrono::Utc::now().timestamp_micros() - 60_000_000;
        let events = attacks(t0);
        produce_events(&producer(kafka), &names.events, &events, &[WireFormat::Json]);

        let expected: &[(&str, &str, &str, &str)] = &[
            ("user_failed_logins", "user:victim", "firing", "warning"),
            ("user_failed_logins", "user:victim", "escalated", "critical"),
            ("ip_failed_logins", "ip:203.0.113.5", "firing", "critical"),
            ("ip_password_spraying", "ip:198.51.100.77", "firing", "warning"),
            ("brute_force_success", "user:mallory-target", "firing", "critical"),
            ("brute_force_success", "ip:192.0.2.44", "firing", "critical"),
            ("system_failed_logins", "system", "firing", "warning"),
            ("system_failed_logins", "system", "escalated", "critical"),
        ];
        // The expected ones plus ip_failed_logins for the spraying address
        // (11 failures in an hour): nine in all.
        let messages = read_topic(kafka, &names.alerts, expected.len() + 2, Duration::from_secs(15));
        assert_eq!(
            messages.len(),
            expected.len() + 1,
            "{:#?}",
            messages.iter().map(|m| decode_avro_alert(&m.payload)).collect::<Vec<_>>()
        );
        let seen: Vec<SeenAlert> = messages
            .iter()
            .map(|m| SeenAlert {
                key: String::from_utf8(m.key.clone().unwrap()).unwrap(),
                ..decode_avro_alert(&m.payload)
            })
            .collect();
        for (rule, subject, state, severity) in expected {
            let hit = seen.iter().find(|a| a.rule == *rule && a.subject == *subject && a.state == *state);
            let hit = hit.unwrap_or_else(|| panic!("no {rule} {state} for {subject} in {seen:#?}"));
            assert_eq!(hit.severity, *severity, "{rule} {state}");
            assert_eq!(hit.key, *subject, "keyed by subject");
        }
        // One message per transition: no duplicates of (alert_id, state).
        let distinct: HashSet<(String, String)> = seen.iter().map(|a| (a.alert_id.clone(), a.state.clone())).collect();
        assert_eq!(distinct.len(), seen.len());
        // The same transitions are in the alerts table.
        eventually(Duration::from_secs(30), "alerts stored", || async {
            (db.count("SELECT count(*) FROM alerts").await >= expected.len() as i64).then_some(())
        })
        .await;
        let client = db.client().await;
        let rows = client.query("SELECT alert_id::text, state, published FROM alerts", &[]).await.unwrap();
        for a in &seen {
            assert!(rows.iter().any(|r| r.get::<_, String>(0) == a.alert_id && r.get::<_, String>(1) == a.state));
        }
        // Kafka acknowledged each one, often before its batch committed:
        // every delivery is recorded all the same (none would be re-sent).
        eventually(Duration::from_secs(30), "every delivery recorded", || async {
            (db.count("SELECT count(*) FROM alerts WHERE published AND delivered_at IS NULL").await == 0).then_some(())
        })
        .await;
        running.stop();
        running.wait().await;
    });
}

#[test]
fn an_outside_consumer_reads_json_alerts_with_kcat_and_a_quiet_stream_resolves() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.detect.quiet_period = Duration::from_secs(2);
        // A 3 s window (instead of a minute) keeps the wait for resolution short.
        config.detect.rules[0].window = Duration::from_secs(3);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        let t0 = chrono::Utc::now().timestamp_micros() - 5_000_000;
        let events: Vec<AuthEvent> =
            (0..6).map(|i| attempt("quiet", "10.2.0.1", "FAILED_AUTH_LOGIN", t0 + i * 100_000)).collect();
        produce_events(&producer(kafka), &names.events, &events, &[WireFormat::Json]);
        // No more events: the alert resolves on the clock (event time of the
        // last event, advanced by the wall clock), 3 s window + 2 s quiet.
        let lines = eventually(Duration::from_secs(90), "firing and resolved read by kcat", || async {
            let out = std::process::Command::new("kcat")
                .args([
                    "-C",
                    "-b",
                    kafka.bootstrap_servers(),
                    "-t",
                    &names.alerts,
                    "-o",
                    "beginning",
                    "-e",
                    "-q",
                    "-f",
                    "%k\t%s\n",
                ])
                .output()
                .expect("kcat is installed (CI installs it)");
            let text = String::from_utf8(out.stdout).unwrap();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            (lines.len() >= 2).then_some(lines)
        })
        .await;
        let alerts: Vec<(String, serde_json::Value)> = lines
            .iter()
            .map(|l| {
                let (k, v) = l.split_once('\t').unwrap();
                (k.to_owned(), serde_json::from_str(v).expect("JSON alert"))
            })
            .collect();
        let states: Vec<&str> = alerts.iter().map(|(_, a)| a["state"].as_str().unwrap()).collect();
        assert_eq!(states, vec!["firing", "resolved"]);
        assert_eq!(alerts[0].1["alert_id"], alerts[1].1["alert_id"]);
        for (key, a) in &alerts {
            assert_eq!(key, "user:quiet");
            for field in [
                "alert_id",
                "rule",
                "severity",
                "state",
                "subject",
                "count",
                "threshold",
                "window_seconds",
                "first_event_at",
                "last_event_at",
                "sample_event_ids",
                "detected_at",
                "recommended_action",
            ] {
                assert!(a.get(field).is_some(), "{field} missing in {a}");
            }
            assert_eq!(a["recommended_action"], "lock_account");
        }
        running.stop();
        running.wait().await;
    });
}

/// 50,000 users each failing 11 times within a minute: a bounded number of
/// alert messages, a system-wide critical alert, and every transition the
/// storm limiter held back carried by a storm summary (so an account-lock
/// consumer still gets every account) and recorded as delivered.
#[test]
fn a_storm_is_limited_and_every_transition_carried() {
    const USERS: usize = 50_000;
    with_world(16, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.detect.storm_limit_per_second = 20;
        config.detect.storm_burst = 50;
        config.ingest.batch_max_rows = 5000;
        let t0 = chrono::Utc::now().timestamp_micros() - 120_000_000;
        let mut events = Vec::with_capacity(USERS * 11);
        for round in 0..11i64 {
            for u in 0..USERS {
                let at = t0 + round * 5_000_000 + (u as i64 * 80);
                events.push(attempt(&format!("storm{u}"), "10.3.0.1", "FAILED_AUTH_LOGIN", at));
            }
        }
        produce_events(&producer(kafka), &names.events, &events, &[WireFormat::AvroConfluent(TEST_SCHEMA_ID)]);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(events.len() as i64, Duration::from_secs(300), "all storm events stored").await;
        // Every user crossed warning (6th) and critical (11th): 100,000
        // transitions of user_failed_logins, all stored.
        let client = db.client().await;
        let per_rule: BTreeMap<String, (i64, i64)> = client
            .query(
                "SELECT rule, count(*) FILTER (WHERE published), count(*) FILTER (WHERE NOT published) FROM alerts GROUP BY rule",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let (published, withheld) = per_rule["user_failed_logins"];
        assert_eq!(published + withheld, 2 * USERS as i64, "every transition stored");
        assert!(withheld > 90_000, "the limiter held most back: {per_rule:?}");
        // The system-wide rule went critical.
        assert_eq!(
            db.count("SELECT count(*) FROM alerts WHERE rule = 'system_failed_logins' AND severity = 'critical'").await,
            1
        );
        // The topic holds the published ones plus the summaries, and the
        // summaries account for every withheld one.
        let total_published: i64 = per_rule.values().map(|(p, _)| p).sum();
        // Summaries go out on the tick after the limiter holds alerts back:
        // read the topic until they account for every withheld one.
        let (topic, plain, summarised) =
            eventually(Duration::from_secs(60), "summaries cover the withheld alerts", || async {
                let summaries = metric_value(
                    &scrape(running.http_addr).await,
                    "audit_alert_summaries_total{rule=\"user_failed_logins\"}",
                )
                .unwrap_or(0.0) as i64;
                let topic =
                    read_topic(kafka, &names.alerts, (total_published + summaries) as usize, Duration::from_secs(10));
                let (mut plain, mut summarised) = (0i64, 0i64);
                for m in &topic {
                    let a: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    match a.get("withheld") {
                        Some(w) if a["rule"] == "user_failed_logins" => summarised += w["count"].as_i64().unwrap(),
                        Some(_) => {}
                        None => plain += 1,
                    }
                }
                (summarised == withheld).then_some((topic, plain, summarised))
            })
            .await;
        // The summaries carry exactly the transitions stored as held back,
        // each with what a consumer acts on.
        let mut carried: Vec<(String, String)> = Vec::new();
        for m in &topic {
            let a: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if let Some(w) = a.get("withheld").filter(|_| a["rule"] == "user_failed_logins") {
                let alerts = w["alerts"].as_array().unwrap();
                assert_eq!(alerts.len() as i64, w["count"].as_i64().unwrap());
                assert!(alerts.len() <= 1_000, "a summary carries at most 1,000");
                for h in alerts {
                    assert_eq!(h["recommended_action"], "lock_account");
                    assert!(h["subject"].as_str().unwrap().starts_with("user:storm"));
                    carried.push((h["alert_id"].as_str().unwrap().to_owned(), h["state"].as_str().unwrap().to_owned()));
                }
            }
        }
        carried.sort();
        let mut stored: Vec<(String, String)> = client
            .query("SELECT alert_id::text, state FROM alerts WHERE rule = 'user_failed_logins' AND NOT published", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        stored.sort();
        assert_eq!(carried, stored, "every held-back transition carried once");
        // Kafka acknowledged every message: every transition is recorded as
        // delivered, so a restart sends none of them again.
        eventually(Duration::from_secs(60), "every delivery recorded", || async {
            (db.count("SELECT count(*) FROM alerts WHERE delivered_at IS NULL").await == 0).then_some(())
        })
        .await;
        assert_eq!(plain, total_published, "published messages on the topic");
        assert_eq!(summarised, withheld, "the aggregate alerts account for every withheld one");
        assert!(topic.len() < 2_000, "a bounded number of messages: {}", topic.len());
        running.stop();
        running.wait().await;
    });
}

/// A producer that retries (the same event_id at another offset) does not
/// double the count: five failures each sent twice raise nothing, as the
/// five stored events would not; the sixth distinct one fires with a count
/// of six.
#[test]
fn retried_events_are_counted_once() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let config = service_config(db, kafka, names);
        let t0 = chrono::Utc::now().timestamp_micros() - 60_000_000;
        let failures: Vec<AuthEvent> =
            (0..5).map(|i| attempt("retried", "203.0.113.9", "FAILED_AUTH_LOGIN", t0 + i * 1_000_000)).collect();
        let mut sent = failures.clone();
        sent.extend(failures.iter().cloned());
        let producer = producer(kafka);
        produce_events(&producer, &names.events, &sent, &[WireFormat::Json]);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(10, Duration::from_secs(60), "all ten consumed").await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 5, "stored once");
        assert_eq!(db.count("SELECT count(*) FROM alerts WHERE subject = 'user:retried'").await, 0);

        let sixth = attempt("retried", "203.0.113.9", "FAILED_AUTH_LOGIN", t0 + 6_000_000);
        produce_events(&producer, &names.events, &[sixth], &[WireFormat::Json]);
        let count = eventually(Duration::from_secs(60), "the warning on the sixth", || async {
            let client = db.client().await;
            let row = client
                .query_opt("SELECT count FROM alerts WHERE subject = 'user:retried' AND state = 'firing'", &[])
                .await
                .unwrap();
            row.map(|r| r.get::<_, i64>(0))
        })
        .await;
        assert_eq!(count, 6);
        running.stop();
        running.wait().await;
    });
}
