//! `audit-service replay` over a seeded database: the binary as a child
//! process, the alerts it prints checked against the attacks stored, the
//! current configuration's rules applied, nothing written or published.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use audit_service::config::Config;
use audit_service::event::AuthEvent;
use audit_service::loadgen::{Attack, Traffic};
use audit_service::service::prepare_database;
use chrono::{DateTime, SecondsFormat, Utc};
use common::{TestDb, rt};

const S: i64 = 1_000_000;

/// What the seeded database holds.
struct Seeded {
    db: TestDb,
    t0: DateTime<Utc>,
    brute_victim: String,
    brute_ip: String,
    spray_ip: String,
    success_victim: String,
    success_ip: String,
    /// When the brute force's 6th and 11th failures happened.
    brute_sixth: i64,
}

/// Twenty minutes of quiet ordinary traffic from two hours ago, with a
/// brute force at +2 min, password spraying at +4, a brute force followed
/// by success at +6 and a system-wide spike at +8.
fn seed() -> Seeded {
    rt().block_on(async {
        let db = TestDb::create().await;
        let config = Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap();
        prepare_database(&config).await.unwrap();

        let t0 = DateTime::from_timestamp(Utc::now().timestamp() - 7200, 0).unwrap();
        let t = t0.timestamp_micros();
        let mut traffic = Traffic::new(99, 2000, Some(5));
        let mut events: Vec<AuthEvent> = (0..1200).map(|i| traffic.ordinary(t + i * S)).collect();
        let brute = traffic.attack(Attack::BruteForce, t + 120 * S).events;
        let spray = traffic.attack(Attack::Spraying, t + 240 * S).events;
        let success = traffic.attack(Attack::BruteForceSuccess, t + 360 * S).events;
        let spike = traffic.attack(Attack::Spike, t + 480 * S).events;
        let seeded = Seeded {
            t0,
            brute_victim: brute[0].user_id.clone().unwrap(),
            brute_ip: brute[0].ip_address.unwrap().to_string(),
            spray_ip: spray[0].ip_address.unwrap().to_string(),
            success_victim: success[0].user_id.clone().unwrap(),
            success_ip: success[0].ip_address.unwrap().to_string(),
            brute_sixth: brute[5].occurred_at,
            db,
        };
        events.extend(brute.into_iter().chain(spray).chain(success).chain(spike));
        events.sort_by_key(|e| e.occurred_at);

        let mut client = seeded.db.client().await;
        let tx = client.transaction().await.unwrap();
        let insert = tx
            .prepare(
                "INSERT INTO audit_logs (event_id, created_at, action, user_id, username, ip_address, user_agent, \
                 session_id, request_id, metadata, kafka_partition, kafka_offset) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11)",
            )
            .await
            .unwrap();
        for (offset, e) in events.iter().enumerate() {
            let at = DateTime::from_timestamp_micros(e.occurred_at).unwrap();
            let metadata: serde_json::Map<String, serde_json::Value> =
                e.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            let metadata = serde_json::Value::Object(metadata);
            tx.execute(
                &insert,
                &[
                    &e.event_id,
                    &at,
                    &e.action,
                    &e.user_id,
                    &e.username,
                    &e.ip_address,
                    &e.user_agent,
                    &e.session_id,
                    &e.request_id,
                    &metadata,
                    &(offset as i64),
                ],
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        seeded
    })
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The binary in `dir` (its config file, if any, is `dir/audit-service.toml`).
fn replay(dir: &Path, database_url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-service"));
    cmd.current_dir(dir);
    for (name, _) in std::env::vars() {
        if name.starts_with("AUDIT__") || ["DATABASE_URL", "KAFKA_BROKERS", "RUST_LOG"].contains(&name.as_str()) {
            cmd.env_remove(name);
        }
    }
    if dir.join("audit-service.toml").exists() {
        cmd.args(["--config", "audit-service.toml"]);
    }
    cmd.env("DATABASE_URL", database_url).arg("replay").args(args).output().expect("run audit-service replay")
}

fn stdout_of(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "replay failed: {}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The alert lines of `rule` about `subject` in `state`.
fn alerts<'a>(output: &'a str, state: &str, rule: &str, subject: &str) -> Vec<&'a str> {
    output
        .lines()
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            // ALERT <date> <time> <STATE> <severity> <rule> <subject> ...
            words.first() == Some(&"ALERT")
                && words.get(3) == Some(&state)
                && words.get(5) == Some(&rule)
                && words.get(6) == Some(&subject)
        })
        .collect()
}

/// The summary row of a rule: firing, escalated, resolved, subjects.
fn summary_row(output: &str, rule: &str) -> Vec<u64> {
    let line = output
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{rule} ")))
        .unwrap_or_else(|| panic!("no summary row for {rule}:\n{output}"));
    line.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect()
}

async fn alerts_stored(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM alerts").await
}

#[test]
fn replay_prints_the_alerts_the_stored_attacks_raise_without_writing_anything() {
    let s = seed();
    let dir = tempfile::tempdir().unwrap();
    let from = rfc3339(s.t0);
    let to = rfc3339(s.t0 + chrono::Duration::minutes(30));
    let out = replay(dir.path(), &s.db.url, &["--from", &from, "--to", &to]);
    let output = stdout_of(&out);

    let user = |id: &str| format!("user:{id}");
    let ip = |a: &str| format!("ip:{a}");
    for (state, rule, subject) in [
        ("FIRING", "user_failed_logins", user(&s.brute_victim)),
        ("ESCALATED", "user_failed_logins", user(&s.brute_victim)),
        // Quiet for two minutes after the window emptied: resolved.
        ("RESOLVED", "user_failed_logins", user(&s.brute_victim)),
        ("FIRING", "ip_failed_logins", ip(&s.brute_ip)),
        ("FIRING", "ip_failed_logins", ip(&s.spray_ip)),
        ("FIRING", "ip_password_spraying", ip(&s.spray_ip)),
        ("FIRING", "brute_force_success", user(&s.success_victim)),
        ("FIRING", "brute_force_success", ip(&s.success_ip)),
        ("FIRING", "system_failed_logins", "system".to_owned()),
        ("ESCALATED", "system_failed_logins", "system".to_owned()),
    ] {
        assert_eq!(alerts(&output, state, rule, &subject).len(), 1, "{state} {rule} {subject}:\n{output}");
    }
    // Lines carry the event time, with its date (UTC).
    let fired = alerts(&output, "FIRING", "user_failed_logins", &user(&s.brute_victim))[0];
    let sixth = DateTime::from_timestamp_micros(s.brute_sixth).unwrap();
    assert!(fired.starts_with(&format!("ALERT {}", sixth.format("%Y-%m-%d %H:%M:%SZ"))), "{fired}");

    assert_eq!(summary_row(&output, "user_failed_logins"), [1, 1, 1, 1]);
    assert_eq!(summary_row(&output, "ip_failed_logins"), [2, 0, 0, 2]);
    // Its 10-minute window empties at +14 min, quiet two more: resolved.
    assert_eq!(summary_row(&output, "ip_password_spraying"), [1, 0, 1, 1]);
    assert_eq!(summary_row(&output, "brute_force_success")[..2], [2, 0]);
    assert_eq!(summary_row(&output, "system_failed_logins")[..2], [1, 1]);
    assert!(output.contains("nothing was published"), "{output}");

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("100%") && stderr.contains(" events"), "no progress bar on stderr: {stderr}");
    rt().block_on(async { assert_eq!(alerts_stored(&s.db).await, 0, "replay must not write alerts") });
}

#[test]
fn replay_applies_the_current_configuration_so_thresholds_can_be_tuned() {
    let s = seed();
    let from = rfc3339(s.t0);
    let dir = tempfile::tempdir().unwrap();
    // The per-user rule raised to 20 / 30: the 12-attempt brute force no
    // longer alerts; spraying still does.
    std::fs::write(
        dir.path().join("audit-service.toml"),
        r#"
[[detect.rules]]
id = "user_failed_logins"
kind = "event_count"
actions = ["@failure"]
group_by = ["user"]
window = "1m"
warning = 20
critical = 30
recommended_action = "lock_account"

[[detect.rules]]
id = "ip_password_spraying"
kind = "distinct_count"
actions = ["@failure"]
group_by = ["ip_address"]
distinct = "username"
window = "10m"
warning = 10
recommended_action = "block_ip"
"#,
    )
    .unwrap();
    let output = stdout_of(&replay(dir.path(), &s.db.url, &["--from", &from]));
    assert!(!output.lines().any(|l| l.starts_with("ALERT ") && l.contains("user_failed_logins")), "{output}");
    assert_eq!(alerts(&output, "FIRING", "ip_password_spraying", &format!("ip:{}", s.spray_ip)).len(), 1, "{output}");
    assert_eq!(summary_row(&output, "user_failed_logins"), [0, 0, 0, 0]);
    assert!(!output.contains("system_failed_logins"), "only the configured rules run:\n{output}");

    // One rule, as JSON messages like those on the alerts topic.
    let output =
        stdout_of(&replay(dir.path(), &s.db.url, &["--from", &from, "--rule", "ip_password_spraying", "--json"]));
    let messages: Vec<serde_json::Value> =
        output.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    let states: Vec<&str> = messages.iter().map(|m| m["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["firing", "resolved"], "{output}");
    assert!(
        messages.iter().all(|m| m["rule"] == "ip_password_spraying" && m["subject"] == format!("ip:{}", s.spray_ip))
    );
    assert_eq!(messages[0]["count"], 11);
    assert_eq!(messages[0]["alert_id"], messages[1]["alert_id"], "one episode, one alert_id");

    let out = replay(dir.path(), &s.db.url, &["--from", &from, "--rule", "no_such_rule"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown rule `no_such_rule`"));
}

#[test]
fn the_range_is_warmed_up_like_a_service_start_and_bounded() {
    let s = seed();
    let dir = tempfile::tempdir().unwrap();
    let victim = format!("user:{}", s.brute_victim);
    // From just after the 6th failure: the warning fired before the range
    // (warm-up, not printed); the escalation at the 11th is in it.
    let from = rfc3339(DateTime::from_timestamp_micros(s.brute_sixth + 500).unwrap());
    let output = stdout_of(&replay(dir.path(), &s.db.url, &["--from", &from]));
    assert_eq!(alerts(&output, "FIRING", "user_failed_logins", &victim).len(), 0, "{output}");
    assert_eq!(alerts(&output, "ESCALATED", "user_failed_logins", &victim).len(), 1, "{output}");
    let warmed: u64 = output
        .split(" earlier events warmed")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no warm-up count:\n{output}"));
    assert!(warmed >= 6, "the brute force's first failures warm the window up: {warmed}");

    // A range before the attacks: nothing.
    let from = rfc3339(s.t0);
    let to = rfc3339(s.t0 + chrono::Duration::seconds(60));
    let output = stdout_of(&replay(dir.path(), &s.db.url, &["--from", &from, "--to", &to]));
    assert!(!output.lines().any(|l| l.starts_with("ALERT ")), "{output}");

    let out = replay(dir.path(), &s.db.url, &["--from", &to, "--to", &from]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be before --to"));
}

#[test]
fn replay_says_so_when_the_database_holds_no_audit_log() {
    rt().block_on(async {
        let db = TestDb::create().await;
        let dir = tempfile::tempdir().unwrap();
        let out = replay(dir.path(), &db.url, &["--from", "2026-01-01T00:00:00Z"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no audit_logs table"), "{stderr}");
    });
}

/// Events the live service drops as late (older, in their partition's
/// offset order, than its newest event minus the lateness) are dropped by
/// the replay too, although in time order nothing is late: the replay gives
/// the alerts the live service gave.
#[test]
fn events_late_in_their_partition_are_late_in_the_replay_too() {
    rt().block_on(async {
        let db = TestDb::create().await;
        let config = Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap();
        prepare_database(&config).await.unwrap();
        let t0 = DateTime::from_timestamp(Utc::now().timestamp() - 3600, 0).unwrap();
        // Partition 0, in offset order: a failure at +100 s; six failures of
        // `late` at +0..5 s (100 s behind: late, lateness 30 s); six of
        // `ontime` at +101..106 s.
        let mut rows: Vec<(&str, i64)> = vec![("ahead", 100)];
        rows.extend((0..6).map(|i| ("late", i)));
        rows.extend((0..6).map(|i| ("ontime", 101 + i)));
        let client = db.client().await;
        for (offset, (user, secs)) in rows.iter().enumerate() {
            let at = t0 + chrono::Duration::seconds(*secs);
            client
                .execute(
                    "INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, kafka_partition, kafka_offset)
                     VALUES (gen_random_uuid(), $1, 'FAILED_AUTH_LOGIN', $2, '198.51.100.1', 0, $3)",
                    &[&at, user, &(offset as i64)],
                )
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let from = rfc3339(t0 - chrono::Duration::minutes(1));
        let to = rfc3339(t0 + chrono::Duration::minutes(10));
        let output = stdout_of(&replay(dir.path(), &db.url, &["--from", &from, "--to", &to]));
        assert_eq!(alerts(&output, "FIRING", "user_failed_logins", "user:ontime").len(), 1, "{output}");
        assert!(alerts(&output, "FIRING", "user_failed_logins", "user:late").is_empty(), "{output}");
    });
}
