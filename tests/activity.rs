//! The activity tracker end to end: rollups equal to GROUP BY over
//! audit_logs, and sessions right under duplicates, disorder, idling and a
//! SIGKILL restart.

mod common;

use std::time::Duration;

use audit_service::activity::compactor;
use audit_service::event::AuthEvent;
use audit_service::loadgen::{self, WireFormat};
use audit_service::service;
use common::*;
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000_000;

/// Rows in the first query and not the second, both ways: 0 when equal.
async fn difference(db: &TestDb, a: &str, b: &str) -> i64 {
    db.count(&format!(
        "SELECT (SELECT count(*) FROM (({a}) EXCEPT ALL ({b})) x) + (SELECT count(*) FROM (({b}) EXCEPT ALL ({a})) y)"
    ))
    .await
}

/// The per-user reads (`user_sessions`, `user_hourly`) and the open-session
/// count give what merging everything (`sessions_v`,
/// `activity_user_hourly_v`) gives, for a sample of 50 users.
async fn assert_session_reads_agree(db: &TestDb) {
    let users = "SELECT DISTINCT user_id FROM sessions_v WHERE user_id IS NOT NULL ORDER BY 1 LIMIT 50";
    let per_user = format!("SELECT u.user_id, s.* FROM ({users}) u, LATERAL user_sessions(u.user_id) s");
    let merged = format!("SELECT user_id, * FROM sessions_v WHERE user_id IN ({users})");
    assert!(db.count(&format!("SELECT count(*) FROM ({merged}) m")).await > 50);
    assert_eq!(difference(db, &per_user, &merged).await, 0);
    // The same for a user's hourly counts (`user_hourly`, which skips the
    // pending batches whose key filter rules the user out).
    let per_user = format!("SELECT u.user_id, h.* FROM ({users}) u, LATERAL user_hourly(u.user_id) h");
    let merged = format!("SELECT user_id, hour, action, events FROM activity_user_hourly_v WHERE user_id IN ({users})");
    assert_eq!(difference(db, &per_user, &merged).await, 0);
    let open = db.count("SELECT count(*) FROM sessions_v WHERE ended_at IS NULL").await;
    assert!(open > 0);
    assert_eq!(db.count("SELECT open_session_count()").await, open);
    // Distinct active users (`active_user_count`, which reads only the
    // pending batches whose hours meet the range) over a wide range and
    // over the last whole hour, as the view counts them.
    for (from, to) in [
        ("now() - interval '1 day'", "now() + interval '1 hour'"),
        ("date_trunc('hour', now()) - interval '1 hour'", "date_trunc('hour', now())"),
    ] {
        let merged =
            format!("SELECT count(DISTINCT user_id) FROM activity_user_hourly_v WHERE hour >= {from} AND hour < {to}");
        assert!(db.count(&merged).await > 0, "no active users in [{from}, {to})");
        // One statement: now() is the same for both sides.
        let differ = db.count(&format!("SELECT active_user_count({from}, {to}) - ({merged})")).await;
        assert_eq!(differ, 0, "[{from}, {to})");
    }
}

/// The pending batches' key filters: SQL and Rust agree on a key's bits, and
/// a user who is nowhere is ruled out by some pending batch.
async fn assert_key_filters_rule_out(db: &TestDb) {
    for key in ["", "u1", "s-1999-3", "ünïcødé-user", "a much longer user id than the generator makes"] {
        let first = db.count(&format!("SELECT (activity_key_bits('{key}'))[1]::bigint")).await;
        let second = db.count(&format!("SELECT (activity_key_bits('{key}'))[2]::bigint")).await;
        assert_eq!([first as usize, second as usize], audit_service::activity::key_bits(key), "bits of {key:?}");
    }
    let batches = db.count("SELECT count(*) FROM activity_delta_batches WHERE key_filter IS NOT NULL").await;
    let may_hold = db
        .count(
            "SELECT count(*) FROM activity_delta_batches \
             WHERE activity_batch_may_hold(key_filter, activity_key_bits('no-such-user'))",
        )
        .await;
    assert!(batches > 0 && may_hold < batches, "{may_hold} of {batches} batches may hold an absent user");
}

const USER_ROLLUP: &str = "SELECT user_id, hour, action, events FROM activity_user_hourly_v";
const USER_GROUP_BY: &str = "SELECT user_id, date_trunc('hour', created_at), action, count(*) FROM audit_logs \
                             WHERE user_id IS NOT NULL GROUP BY 1, 2, 3";
const SYSTEM_ROLLUP: &str = "SELECT hour, action, events FROM activity_hourly_v";
const SYSTEM_GROUP_BY: &str = "SELECT date_trunc('hour', created_at), action, count(*) FROM audit_logs GROUP BY 1, 2";

#[test]
fn after_a_large_mixed_ingest_every_rollup_equals_the_group_by_exactly() {
    with_world(4, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.activity.compact_when_idle_for = Duration::from_millis(300);
        config.detect.enabled = false;
        // 60,000 events over three hours of event time (several hourly
        // buckets), 3,000 of them producer retries in later batches.
        let mut generator = loadgen::EventGenerator::new(44, 2_000);
        let now = chrono::Utc::now().timestamp_micros();
        let mut evs: Vec<AuthEvent> =
            (0..57_000).map(|i| generator.next_event(now - 180 * MIN + i * (180 * MIN / 57_000))).collect();
        for i in 0..3_000 {
            evs.push(evs[i * 19].clone());
        }
        for e in evs.iter_mut().step_by(97) {
            e.user_id = None; // unknown users count system-wide only
        }
        let producer = producer(kafka);
        produce_events(&producer, &names.events, &evs, ALL_FORMATS);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(evs.len() as i64, Duration::from_secs(120), "all stored").await;
        assert_eq!(db.count("SELECT count(*) FROM audit_logs").await, 57_000);
        // Exact at any moment through the views (folded + pending deltas)...
        assert_eq!(difference(db, USER_ROLLUP, USER_GROUP_BY).await, 0);
        assert_eq!(difference(db, SYSTEM_ROLLUP, SYSTEM_GROUP_BY).await, 0);
        assert_session_reads_agree(db).await;
        // ...and in the final tables once the compactor has folded everything.
        eventually(Duration::from_secs(30), "deltas folded", || async {
            let pending = db.count("SELECT count(*) FROM activity_delta_batches").await;
            (pending == 0).then_some(())
        })
        .await;
        running.stop();
        running.wait().await;
        assert_eq!(
            difference(db, "SELECT user_id, hour, action, events FROM activity_user_hourly", USER_GROUP_BY).await,
            0
        );
        assert_eq!(difference(db, "SELECT hour, action, events FROM activity_hourly", SYSTEM_GROUP_BY).await, 0);
        // Sessions agree with the stored events too.
        let sessions_from_logs = "SELECT session_id, min(created_at) FILTER (WHERE action = 'AUTH_LOGIN'), max(created_at) \
                                  FROM audit_logs WHERE session_id IS NOT NULL GROUP BY 1";
        assert_eq!(
            difference(db, "SELECT session_id, started_at, last_seen_at FROM sessions", sessions_from_logs).await,
            0
        );
        assert_session_reads_agree(db).await;
    });
}

fn session_event(action: &str, session: &str, user: &str, at: i64) -> AuthEvent {
    let mut e = auth_event(action, user, "192.0.2.10", at);
    e.user_agent = Some(format!("agent-{session}"));
    e.session_id = Some(session.into());
    e
}

#[test]
fn sessions_open_and_close_under_duplicates_disorder_and_idling() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.activity.idle_timeout = Duration::from_secs(600);
        config.activity.compact_when_idle_for = Duration::from_millis(200);
        config.activity.session_sweep_interval = Duration::from_millis(200);
        let t0 = chrono::Utc::now().timestamp_micros() - 60 * MIN;
        let login = session_event("AUTH_LOGIN", "normal", "ann", t0);
        let mut evs = vec![
            // A normal session.
            login.clone(),
            session_event("TOKEN_ISSUED", "normal", "ann", t0 + MIN),
            session_event("AUTH_LOGOUT", "normal", "ann", t0 + 2 * MIN),
            // A logout that arrives before its login.
            session_event("AUTH_LOGOUT", "backwards", "ben", t0 + 5 * MIN),
            session_event("AUTH_LOGIN", "backwards", "ben", t0 + MIN),
            // Revoked.
            session_event("AUTH_LOGIN", "revoked", "cid", t0),
            session_event("TOKEN_REVOKED", "revoked", "cid", t0 + 3 * MIN),
            // Idle: no event after login; others go on for more than 10 min.
            session_event("AUTH_LOGIN", "idle", "dee", t0),
            // Still open.
            session_event("AUTH_LOGIN", "open", "eve", t0 + 25 * MIN),
            session_event("TOKEN_ISSUED", "filler", "fay", t0 + 30 * MIN),
        ];
        // A producer retry of the normal login, later in the stream.
        evs.push(login);
        produce_events(&producer(kafka), &names.events, &evs, &[WireFormat::Json]);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(60), "all stored and idle session closed", || async {
            let stored = db.stored_offsets().await == evs.len() as i64;
            let idle = db
                .count("SELECT count(*) FROM sessions WHERE session_id = 'idle' AND end_reason = 'idle_timeout'")
                .await;
            (stored && idle == 1).then_some(())
        })
        .await;
        running.stop();
        running.wait().await;
        let client = db.client().await;
        let rows = client
            .query(
                "SELECT session_id, user_id, (extract(epoch FROM started_at) * 1e6)::bigint, \
                        (extract(epoch FROM ended_at) * 1e6)::bigint, end_reason, user_agent FROM sessions_v ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        type SessionRow = (String, String, Option<i64>, Option<i64>, Option<String>);
        let got: Vec<SessionRow> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
        let s = |id: &str, user: &str, start: Option<i64>, end: Option<i64>, reason: Option<&str>| {
            (id.to_owned(), user.to_owned(), start, end, reason.map(str::to_owned))
        };
        assert_eq!(
            got,
            vec![
                s("backwards", "ben", Some(t0 + MIN), Some(t0 + 5 * MIN), Some("logout")),
                s("filler", "fay", None, None, None),
                s("idle", "dee", Some(t0), Some(t0 + 10 * MIN), Some("idle_timeout")),
                s("normal", "ann", Some(t0), Some(t0 + 2 * MIN), Some("logout")),
                s("open", "eve", Some(t0 + 25 * MIN), None, None),
                s("revoked", "cid", Some(t0), Some(t0 + 3 * MIN), Some("token_revoked")),
            ]
        );
        assert_eq!(
            rows.iter().find(|r| r.get::<_, String>(0) == "normal").unwrap().get::<_, String>(5),
            "agent-normal"
        );
        // The retried login was stored once and counted once.
        assert_eq!(
            db.count("SELECT events FROM activity_user_hourly_v WHERE user_id = 'ann' AND action = 'AUTH_LOGIN'").await,
            1
        );
    });
}

#[test]
fn sessions_survive_a_sigkill_restart() {
    with_world(2, async |world| {
        let World { kafka, names, db, logs } = world;
        let env = service_env(db, kafka, names);
        let producer = producer(kafka);
        let t0 = chrono::Utc::now().timestamp_micros() - 10 * MIN;
        let logins: Vec<AuthEvent> =
            (0..200).map(|i| session_event("AUTH_LOGIN", &format!("k{i}"), &format!("user{i}"), t0 + i)).collect();
        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        produce_events(&producer, &names.events, &logins, &[WireFormat::Json]);
        db.wait_for_offsets(200, Duration::from_secs(60), "logins stored").await;
        service.sigkill();
        let logouts: Vec<AuthEvent> = (0..200)
            .map(|i| session_event("AUTH_LOGOUT", &format!("k{i}"), &format!("user{i}"), t0 + MIN + i))
            .collect();
        produce_events(&producer, &names.events, &logouts, &[WireFormat::Json]);
        let mut service = ServiceProcess::spawn(&env, logs.path(), 1);
        db.wait_for_offsets(400, Duration::from_secs(60), "logouts stored").await;
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
        // Fold what is pending, as the service would on its next tick.
        let config = service_config(db, kafka, names);
        let pool = audit_service::store::connect_pool(&config.database, 2).unwrap();
        compactor::compact_once(&pool).await.unwrap();
        assert_eq!(db.count("SELECT count(*) FROM sessions").await, 200);
        assert_eq!(
            db.count("SELECT count(*) FROM sessions WHERE end_reason = 'logout' AND started_at IS NOT NULL").await,
            200
        );
        assert_eq!(difference(db, USER_ROLLUP, USER_GROUP_BY).await, 0);
    });
}

/// The idle sweep judges a session by all its activity, pending deltas
/// included (it folds them first): a session whose folded row is older
/// than the idle timeout, but whose newer event is still pending, stays
/// open, and closes the idle timeout after that event.
#[test]
fn the_idle_sweep_waits_for_pending_activity() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        // Only this test folds and sweeps.
        config.activity.compact_when_idle_for = Duration::from_secs(3600);
        config.activity.compact_interval = Duration::from_secs(3600);
        config.activity.session_sweep_interval = Duration::from_secs(3600);
        assert_eq!(config.activity.idle_timeout, Duration::from_secs(30 * 60));
        let pool = audit_service::store::connect_pool(&config.database, 2).unwrap();
        let producer = producer(kafka);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        let t0 = chrono::Utc::now().timestamp_micros() - 180 * MIN;
        let logins = [session_event("AUTH_LOGIN", "kept", "kim", t0), session_event("AUTH_LOGIN", "idle", "ida", t0)];
        produce_events(&producer, &names.events, &logins, &[WireFormat::Json]);
        db.wait_for_offsets(2, Duration::from_secs(60), "logins stored").await;
        compactor::compact_once(&pool).await.unwrap();
        // Kim is active again 20 minutes later; that delta stays pending.
        produce_events(
            &producer,
            &names.events,
            &[session_event("TOKEN_ISSUED", "kept", "kim", t0 + 20 * MIN)],
            &[WireFormat::Json],
        );
        db.wait_for_offsets(3, Duration::from_secs(60), "kim's event stored").await;
        assert_eq!(db.count("SELECT count(*) FROM session_deltas WHERE session_id = 'kept'").await, 1);

        let ends = async || {
            let rows = db
                .client()
                .await
                .query(
                    "SELECT session_id, (extract(epoch FROM ended_at) * 1e6)::bigint, end_reason FROM sessions_v \
                     ORDER BY 1",
                    &[],
                )
                .await
                .unwrap();
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect::<Vec<(String, Option<i64>, Option<String>)>>()
        };
        let timed_out = |id: &str, at: i64| (id.to_owned(), Some(at), Some("idle_timeout".to_owned()));
        // At 45 minutes: Ida idled from 0 (closed at 30), Kim from 20.
        compactor::sweep_sessions(&pool, &config.activity, Some(t0 + 45 * MIN)).await.unwrap();
        assert_eq!(ends().await, [timed_out("idle", t0 + 30 * MIN), ("kept".into(), None, None)]);
        assert_eq!(db.count("SELECT count(*) FROM activity_delta_batches").await, 0, "the sweep folded first");
        compactor::sweep_sessions(&pool, &config.activity, Some(t0 + 55 * MIN)).await.unwrap();
        assert_eq!(ends().await[1], timed_out("kept", t0 + 50 * MIN));
        running.stop();
        running.wait().await;
    });
}

/// Deltas a stopped process left unfolded are folded by the next one
/// without waiting for new ingest: the compactor starts from what the
/// database holds pending, not from zero.
#[test]
fn deltas_left_by_a_stopped_process_are_folded_by_the_next() {
    with_world(1, async |world| {
        let World { kafka, names, db, logs } = world;
        let env = service_env(db, kafka, names);
        let mut deferred = env.clone();
        deferred.push(("AUDIT__ACTIVITY__COMPACT_WHEN_IDLE_FOR".into(), "1h".into()));
        deferred.push(("AUDIT__ACTIVITY__COMPACT_INTERVAL".into(), "1h".into()));
        deferred.push(("AUDIT__ACTIVITY__SESSION_SWEEP_INTERVAL".into(), "1h".into()));
        let t0 = chrono::Utc::now().timestamp_micros() - 10 * MIN;
        let logins: Vec<AuthEvent> =
            (0..100).map(|i| session_event("AUTH_LOGIN", &format!("left{i}"), &format!("user{i}"), t0 + i)).collect();
        produce_events(&producer(kafka), &names.events, &logins, &[WireFormat::Json]);
        let mut service = ServiceProcess::spawn(&deferred, logs.path(), 0);
        db.wait_for_offsets(100, Duration::from_secs(60), "logins stored").await;
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
        assert!(db.count("SELECT count(*) FROM activity_delta_batches").await > 0, "deltas left pending");
        // Pending deltas are stored compressed (migrations/0015).
        let compressed = db
            .count(
                "SELECT count(*) FROM activity_delta_batches WHERE 'lz4' IN (pg_column_compression(user_ids), \
                 pg_column_compression(session_ids), pg_column_compression(s_agents), pg_column_compression(s_last_seen))",
            )
            .await;
        assert!(compressed > 0, "no pending delta batch is lz4-compressed");
        assert_eq!(db.count("SELECT count(*) FROM sessions").await, 0);

        // Default folding, and nothing new to ingest.
        let mut service = ServiceProcess::spawn(&env, logs.path(), 1);
        eventually(Duration::from_secs(60), "the deltas folded", || async {
            (db.count("SELECT count(*) FROM activity_delta_batches").await == 0).then_some(())
        })
        .await;
        assert_eq!(db.count("SELECT count(*) FROM sessions").await, 100);
        assert_eq!(difference(db, USER_ROLLUP, USER_GROUP_BY).await, 0);
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
    });
}

/// While ingest catches up on a backlog (its batches close full), the fold
/// yields to it: far past the live bound, nothing is folded until the
/// backlog is stored; then the fold follows and every figure is exact.
#[test]
fn the_fold_waits_while_ingest_catches_up_then_follows() {
    with_world(1, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        config.ingest.batch_max_rows = 20;
        // One batch's deltas reach the live bound: live, every batch folds.
        config.activity.max_pending_deltas = 20;
        config.activity.max_pending_deltas_catching_up = 1_000_000_000;
        config.activity.compact_interval = Duration::from_secs(3600);
        config.activity.compact_when_idle_for = Duration::from_millis(100);
        // A sweep folds too (it waits while catching up as well: unit
        // tests in compactor.rs).
        config.activity.session_sweep_interval = Duration::from_secs(3600);
        let t0 = chrono::Utc::now().timestamp_micros() - 30 * MIN;
        let backlog: Vec<AuthEvent> = (0..3000)
            .map(|i| session_event("AUTH_LOGIN", &format!("c{i}"), &format!("user{}", i % 100), t0 + i))
            .collect();
        produce_events(&producer(kafka), &names.events, &backlog, &[WireFormat::Json]);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        eventually(Duration::from_secs(120), "the backlog stored", || async {
            let stored = db.stored_offsets().await;
            assert_eq!(db.count("SELECT count(*) FROM sessions").await, 0, "folded while catching up, at {stored}");
            (stored == 3000).then_some(())
        })
        .await;
        // Each batch's deltas alone exceed the live bound (a poll burst can
        // make a batch longer than batch_max_rows, never shorter when full).
        let pending = db.count("SELECT count(*) FROM activity_delta_batches").await;
        assert!(pending >= 5, "{pending} delta batches pending after the backlog");

        eventually(Duration::from_secs(60), "the deltas folded once caught up", || async {
            (db.count("SELECT count(*) FROM activity_delta_batches").await == 0).then_some(())
        })
        .await;
        assert_eq!(db.count("SELECT count(*) FROM sessions").await, 3000);
        assert_eq!(difference(db, USER_ROLLUP, USER_GROUP_BY).await, 0);
        // The operator sees both: the catch-up and the folds' time.
        let metrics = scrape(running.http_addr).await;
        assert!(metric_value(&metrics, "audit_ingest_catching_up").is_some(), "{metrics}");
        assert!(
            metric_value(&metrics, "audit_activity_fold_duration_seconds_count").is_some_and(|n| n >= 1.0),
            "{metrics}"
        );
        assert!(metrics.contains("audit_activity_fold_duration_seconds_bucket{le=\"160\"}"), "{metrics}");
        running.stop();
        running.wait().await;
    });
}

/// A sweep with nothing pending folds nothing and records no fold time, so
/// on an idle service the fold-duration histogram stays empty and its
/// count says when real folds ran (the runbook's capacity planning reads
/// it). In its own process: the metrics recorder is global.
#[test]
fn a_sweep_with_nothing_pending_records_no_fold() {
    with_world(1, async |world| {
        let World { kafka, names, db, logs } = world;
        let mut env = service_env(db, kafka, names);
        env.push(("AUDIT__ACTIVITY__SESSION_SWEEP_INTERVAL".into(), "100ms".into()));
        let mut service = ServiceProcess::spawn(&env, logs.path(), 0);
        let addr = eventually(Duration::from_secs(60), "the service listening", || async { service.http_addr() }).await;
        // The open-session count runs on the same tick as the sweep's fold,
        // after it.
        let metrics = eventually(Duration::from_secs(60), "a sweep and an open-session count", || async {
            let metrics = scrape(addr).await;
            metric_value(&metrics, "audit_active_sessions").is_some().then_some(metrics)
        })
        .await;
        assert_eq!(metric_value(&metrics, "audit_activity_fold_duration_seconds_count"), None, "{metrics}");
        assert!(service.sigterm(Duration::from_secs(30)).success(), "{}", service.tail());
    });
}

/// GET with a bearer token over a real TCP connection; the JSON body.
async fn get_json(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new().get(format!("http://{addr}{path}")).bearer_auth(token).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[test]
fn the_activity_endpoints_answer_from_sessions_and_rollups() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        let token = "activity-test-token-0123456789";
        with_admin_token(&mut config, token);
        let now = chrono::Utc::now().timestamp_micros();
        let mut evs = vec![
            session_event("AUTH_LOGIN", "a1", "alice", now - 3 * MIN),
            session_event("AUTH_LOGOUT", "a1", "alice", now - 2 * MIN),
            session_event("AUTH_LOGIN", "a2", "alice", now - MIN),
            session_event("FAILED_AUTH_LOGIN", "a3", "alice", now - 4 * MIN),
        ];
        for i in 0..3 {
            let mut e = session_event("ADMIN_ROLE_GRANT", "r1", "root", now - MIN + i);
            e.session_id = None;
            evs.push(e);
        }
        produce_events(&producer(kafka), &names.events, &evs, &[WireFormat::Json]);
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        db.wait_for_offsets(evs.len() as i64, Duration::from_secs(60), "stored").await;

        let (status, a) = get_json(running.http_addr, "/api/v1/audit/users/alice/activity", token).await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["open_sessions"].as_array().unwrap().len(), 2, "{a}"); // a2, and a3 (a failure carries a session id)
        assert_eq!(a["open_sessions"][0]["session_id"], "a2");
        let recent = a["recent_sessions"].as_array().unwrap();
        let a1 = recent.iter().find(|s| s["session_id"] == "a1").unwrap();
        assert_eq!(a1["end_reason"], "logout");
        assert_eq!(a["logins"]["last_24h"], 2);
        assert_eq!(a["failed_logins"]["last_24h"], 1);
        assert_eq!(a["distinct_ips"], serde_json::json!(["192.0.2.10"]));
        let per_day: i64 = a["actions_per_day"].as_array().unwrap().iter().map(|d| d["events"].as_i64().unwrap()).sum();
        assert_eq!(per_day, 4);

        let (status, s) = get_json(running.http_addr, "/api/v1/audit/activity/summary", token).await;
        assert_eq!(status, 200, "{s}");
        assert_eq!(s["active_users"], 2);
        assert_eq!(s["admin_actions_per_admin"], serde_json::json!([{"name": "root", "events": 3}]));
        let top: i64 = s["top_actions"].as_array().unwrap().iter().map(|c| c["events"].as_i64().unwrap()).sum();
        assert_eq!(top, evs.len() as i64);
        assert!(s["active_sessions"].as_i64().unwrap() >= 2);

        let (status, e) = get_json(running.http_addr, "/api/v1/audit/activity/summary?from=2026-13-01", token).await;
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["error"]["code"], "invalid_timestamp");
        let (status, _) = get_json(running.http_addr, "/api/v1/audit/users/alice/activity?days=100000", token).await;
        assert_eq!(status, 400);
        running.stop();
        running.wait().await;
    });
}

/// The per-user and counting session reads stay exact while deltas are
/// pending on top of folded sessions: half the stream is folded, the other
/// half (logouts of folded sessions among it) stays pending, then is folded.
#[test]
fn session_reads_are_exact_over_folded_and_pending_deltas() {
    with_world(2, async |world| {
        let World { kafka, names, db, .. } = world;
        let mut config = service_config(db, kafka, names);
        // Only this test folds (a sweep folds too).
        config.activity.compact_when_idle_for = Duration::from_secs(3600);
        config.activity.compact_interval = Duration::from_secs(3600);
        config.activity.session_sweep_interval = Duration::from_secs(3600);
        config.detect.enabled = false;
        let mut generator = loadgen::EventGenerator::new(45, 300);
        let now = chrono::Utc::now().timestamp_micros();
        let mut evs: Vec<AuthEvent> = (0..6_000).map(|i| generator.next_event(now - 60 * MIN + i * 500_000)).collect();
        // A session's events from several user agents: the merged session
        // must take the one of its earliest start, as sessions_v does.
        for (i, e) in evs.iter_mut().enumerate() {
            e.user_agent = Some(format!("agent-{}", i % 7));
        }
        let (first, second) = evs.split_at(3_000);
        let producer = producer(kafka);
        let pool = audit_service::store::connect_pool(&config.database, 2).unwrap();
        let running = service::start(&config, CancellationToken::new()).await.unwrap();
        produce_events(&producer, &names.events, first, &[WireFormat::Json]);
        db.wait_for_offsets(3_000, Duration::from_secs(60), "first half stored").await;
        compactor::compact_once(&pool).await.unwrap();
        assert_eq!(db.count("SELECT count(*) FROM activity_delta_batches").await, 0);
        // In two steps, so that a session's entries pend in several batches
        // and the fold has to merge them.
        for (i, part) in second.chunks(1_500).enumerate() {
            produce_events(&producer, &names.events, part, &[WireFormat::Json]);
            let stored = 3_000 + 1_500 * (i as i64 + 1);
            db.wait_for_offsets(stored, Duration::from_secs(60), "second half stored").await;
        }
        let merged_across_batches = "SELECT count(*) FROM (SELECT session_id FROM session_deltas \
                                     WHERE started_at IS NOT NULL GROUP BY 1 HAVING count(*) > 1) m";
        assert!(db.count(merged_across_batches).await > 10);
        // Pending deltas that end sessions already folded as open.
        assert!(db.count("SELECT count(*) FROM activity_delta_batches").await > 0);
        let ended_by_pending = "SELECT count(*) FROM sessions s JOIN session_deltas d USING (session_id) \
                                WHERE s.ended_at IS NULL AND d.ended_at IS NOT NULL";
        assert!(db.count(ended_by_pending).await > 0);
        assert_key_filters_rule_out(db).await;
        assert_session_reads_agree(db).await;
        // System-wide hourly counts from the batches' own sums, exact too.
        assert_eq!(difference(db, SYSTEM_ROLLUP, SYSTEM_GROUP_BY).await, 0);
        assert_eq!(difference(db, USER_ROLLUP, USER_GROUP_BY).await, 0);
        // The fold writes exactly the sessions the merge rules give.
        db.client().await.batch_execute("CREATE TABLE sessions_before_fold AS SELECT * FROM sessions_v").await.unwrap();
        compactor::compact_once(&pool).await.unwrap();
        assert_eq!(difference(db, "SELECT * FROM sessions", "SELECT * FROM sessions_before_fold").await, 0);
        assert_session_reads_agree(db).await;
        running.stop();
        running.wait().await;
    });
}
