//! An attack that straddles a SIGKILL of the service: still detected after
//! the restart, and an alert already sent is continued under its id, not
//! sent again under a new one. The events are three hours old, as after an
//! outage longer than any rule's window: the detector state is rebuilt up to
//! where the stored events end, not up to the wall clock.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use audit_service::event::AuthEvent;
use audit_service::loadgen::WireFormat;
use common::*;

/// A different address each time: only the per-user rule is in play.
fn failure(user: &str, n: u32, at: i64) -> AuthEvent {
    auth_event("FAILED_AUTH_LOGIN", user, &format!("10.4.{}.{}", n / 250, n % 250 + 1), at)
}

#[test]
fn an_attack_straddling_a_sigkill_is_detected_with_one_alert_id() {
    with_world(2, async |world| {
        let World { kafka, names, db, logs } = world;
        let env = service_env(db, kafka, names);
        let producer = producer(kafka);
        // Older than the longest default window (1 h) plus lateness.
        let t0 = chrono::Utc::now().timestamp_micros() - 3 * 3_600_000_000;
        let at = |i: i64| t0 + i * 100_000;
        // Before the crash: "loud" crosses the warning level (6 failures),
        // "quiet" is at 4, below it.
        let mut before = Vec::new();
        for i in 0..6 {
            before.push(failure("loud", i as u32, at(i)));
        }
        for i in 0..4 {
            before.push(failure("quiet", 100 + i as u32, at(i)));
        }
        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        produce_events(&producer, &names.events, &before, &[WireFormat::Json]);
        // Stored with its batch, and Kafka's acknowledgement recorded (an
        // alert killed in flight would be sent again: tests/alert_delivery.rs).
        eventually(Duration::from_secs(60), "loud's alert stored with its batch and delivered", || async {
            let stored = db.count("SELECT count(*) FROM audit_logs").await;
            let fired =
                db.count("SELECT count(*) FROM alerts WHERE subject = 'user:loud' AND delivered_at IS NOT NULL").await;
            (stored == 10 && fired == 1).then_some(())
        })
        .await;
        service.sigkill();

        // After the restart the attack goes on.
        let mut service = ServiceProcess::spawn(&env, logs.path(), 1);
        let mut after = Vec::new();
        for i in 6..11 {
            after.push(failure("loud", i as u32, at(i)));
        }
        for i in 4..6 {
            after.push(failure("quiet", 100 + i as u32, at(i)));
        }
        produce_events(&producer, &names.events, &after, &[WireFormat::Json]);
        eventually(Duration::from_secs(60), "escalation and the late starter's alert stored", || async {
            let n = db.count("SELECT count(*) FROM alerts WHERE subject IN ('user:loud', 'user:quiet')").await;
            (n == 3).then_some(())
        })
        .await;
        // The restarted process counts what it stored and raised, not the
        // failures and alerts its rebuild replayed (those were counted by
        // the process before; a replay that counted them would also set off
        // the failed-login spike rule after every restart).
        let addr = service.http_addr().expect("the restarted service serves HTTP");
        let metrics = eventually(Duration::from_secs(20), "the stored failures counted", || async {
            let scrape = scrape(addr).await;
            (metric_value(&scrape, "audit_failed_logins_total") == Some(7.0)).then_some(scrape)
        })
        .await;
        let alerts: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("audit_alerts_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(alerts, 2.0, "escalation of loud + quiet's first alert:\n{metrics}");
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());

        let topic = read_topic(kafka, &names.alerts, 4, Duration::from_secs(10));
        let mut by_subject: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for m in &topic {
            let a: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            by_subject
                .entry(a["subject"].as_str().unwrap().to_owned())
                .or_default()
                .push((a["state"].as_str().unwrap().to_owned(), a["alert_id"].as_str().unwrap().to_owned()));
        }
        let loud = &by_subject["user:loud"];
        assert_eq!(
            loud.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            vec!["firing", "escalated"],
            "{by_subject:?}"
        );
        assert_eq!(loud[0].1, loud[1].1, "the escalation continues the episode sent before the crash");
        let quiet = &by_subject["user:quiet"];
        assert_eq!(
            quiet.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            vec!["firing"],
            "4 before + 2 after the crash"
        );
        assert_eq!(topic.len(), 3, "nothing sent twice: {by_subject:?}");
    });
}
