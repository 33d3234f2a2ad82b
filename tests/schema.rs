//! The audit_logs schema as the operators use it: the runbook's queries run
//! unchanged against a migrated database, the indexes serve them, migrations
//! are idempotent and partition upkeep moves stray rows out of the default
//! partition. Every test migrates its own fresh database.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use audit_service::config::Config;
use audit_service::service::prepare_database;
use audit_service::store::{self, migrate::MIGRATIONS, partitions};
use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use common::{TestDb, rt};
use serde_json::Value;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Runbook queries, copied verbatim (trailing spaces included) from
// audit-service-runbook.md. Only those that touch audit_logs or the
// statistics views are here: "orphaned records", "lock suspicious accounts"
// and the permission queries need a `users` table that belongs to the auth
// service's database, not to this one.
// ---------------------------------------------------------------------------

// Troubleshooting / High API Latency: "Check for slow queries"
const RUNBOOK_SLOW_QUERIES: &str = "SELECT query, calls, total_time, mean_time
FROM pg_stat_statements
ORDER BY total_time DESC
LIMIT 10;";

// Troubleshooting / Database Connection Issues: "Check active connections"
const RUNBOOK_ACTIVE_CONNECTIONS: &str = "SELECT count(*) FROM pg_stat_activity;";

// Troubleshooting / Database Connection Issues: "Check connection states"
const RUNBOOK_CONNECTION_STATES: &str = "SELECT state, count(*) 
FROM pg_stat_activity 
GROUP BY state;";

// Troubleshooting / Log Storage Issues: "Check table sizes"
const RUNBOOK_TABLE_SIZE: &str = "SELECT pg_size_pretty(pg_total_relation_size('audit_logs'));";

// Troubleshooting / Log Storage Issues: "Check row counts" (also the
// recovery procedures' "Verify data integrity")
const RUNBOOK_ROW_COUNT: &str = "SELECT count(*) FROM audit_logs;";

// Recovery / Data Consistency Check: "Check for missing timestamps"
const RUNBOOK_MISSING_TIMESTAMPS: &str = "SELECT * FROM audit_logs 
WHERE created_at IS NULL;";

// Security Monitoring: "Check active sessions"
const RUNBOOK_ACTIVE_SESSIONS: &str = "SELECT user_id, count(*) 
FROM audit_logs 
WHERE action = 'AUTH_LOGIN' 
AND created_at > now() - interval '1 day'
GROUP BY user_id;";

// Security Monitoring: "Check failed login patterns"
const RUNBOOK_FAILED_LOGINS_BY_IP: &str = "SELECT ip_address, count(*) 
FROM audit_logs 
WHERE action = 'FAILED_AUTH_LOGIN'
AND created_at > now() - interval '1 hour'
GROUP BY ip_address
HAVING count(*) > 10;";

// Audit Reports: "Generate daily summary"
const RUNBOOK_DAILY_ACTIVITY: &str = "SELECT action, count(*) 
FROM audit_logs 
WHERE created_at > now() - interval '1 day'
GROUP BY action;";

// Audit Reports: "List security incidents"
const RUNBOOK_SECURITY_INCIDENTS: &str = "SELECT * FROM audit_logs 
WHERE action LIKE 'SECURITY_%'
AND created_at > now() - interval '1 day'
ORDER BY created_at DESC;";

// Compliance Checks: "Check oldest logs"
const RUNBOOK_OLDEST_LOG: &str = "SELECT min(created_at) FROM audit_logs;";

// Compliance Checks: "Check retention compliance"
const RUNBOOK_RETENTION: &str = "SELECT count(*) FROM audit_logs 
WHERE created_at < now() - interval '90 days';";

// Compliance Checks: "Check for missing data"
const RUNBOOK_COMPLETENESS: &str = "SELECT date_trunc('hour', created_at) as hour,
       count(*) as log_count
FROM audit_logs
GROUP BY hour
ORDER BY hour DESC;";

// Emergency / Database Performance Issues: "Kill long-running queries".
// Terminates other sessions server-wide, so it is only planned (EXPLAIN),
// never executed, here.
const RUNBOOK_KILL_LONG_RUNNING: &str = "SELECT pg_terminate_backend(pid) 
FROM pg_stat_activity 
WHERE state = 'active'
AND state_change < now() - interval '5 minutes';";

// Emergency / Account Lockdown: the subquery of "Lock suspicious accounts"
// (the UPDATE around it targets `users`), dedented.
const RUNBOOK_LOCKDOWN_CANDIDATES: &str = "SELECT user_id FROM audit_logs 
WHERE action = 'FAILED_AUTH_LOGIN'
GROUP BY user_id 
HAVING count(*) > 10";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn config_for(db: &TestDb) -> Config {
    Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap()
}

/// A fresh database migrated by the library, as `migrate` would.
async fn migrated_db() -> (TestDb, Config) {
    let db = TestDb::create().await;
    let config = config_for(&db);
    prepare_database(&config).await.expect("prepare_database");
    (db, config)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

// The background rows of the runbook test: one every BG_STEP_SECS seconds
// going back from now, 2.9 days in all, so that every one of them lies in a
// premade daily partition (3 days of lookback). The Rust functions mirror
// the SQL so that the expected results can be computed independently.
const BG_ROWS: i64 = 3000;
const BG_STEP_SECS: i64 = 83;

const INSERT_BACKGROUND: &str = "
INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, user_agent, kafka_partition, kafka_offset)
SELECT gen_random_uuid(),
       now() - g * interval '83 seconds',
       CASE WHEN g % 7 = 0 THEN 'FAILED_AUTH_LOGIN'
            WHEN g % 3 = 0 THEN 'AUTH_LOGOUT'
            WHEN g % 5 = 0 THEN 'TOKEN_REFRESH'
            ELSE 'AUTH_LOGIN' END,
       'user-' || (g % 400),
       ('172.16.' || (g / 250) || '.' || (g % 250 + 1))::inet,
       'Mozilla/5.0 (X11; Linux x86_64)',
       g % 3, g
  FROM generate_series(1, 3000) AS g";

fn bg_action(g: i64) -> &'static str {
    if g % 7 == 0 {
        "FAILED_AUTH_LOGIN"
    } else if g % 3 == 0 {
        "AUTH_LOGOUT"
    } else if g % 5 == 0 {
        "TOKEN_REFRESH"
    } else {
        "AUTH_LOGIN"
    }
}

fn bg_user(g: i64) -> String {
    format!("user-{}", g % 400)
}

/// Background rows newer than one day (with 83 s of slack for the time
/// between the insert's now() and the query's).
fn bg_in_last_day() -> impl Iterator<Item = i64> {
    (1..=BG_ROWS).filter(|g| g * BG_STEP_SECS < 86_400)
}

/// `n` failed logins from one address for one user, `every` minutes apart,
/// the newest `start + every` minutes ago.
const INSERT_FAILURES: &str = "
INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, kafka_partition, kafka_offset)
SELECT gen_random_uuid(), now() - make_interval(mins => $3::int + g * $4::int), 'FAILED_AUTH_LOGIN', $2,
       $1::text::inet, 1, 100000 + g
  FROM generate_series(1, $5::int) AS g";

/// (ip, user, failures, start minutes ago, minutes apart)
const FAILURE_BURSTS: &[(&str, &str, i32, i32, i32)] = &[
    ("203.0.113.10", "victim-a", 15, 0, 2),   // 15 in the last 30 minutes: reported
    ("203.0.113.11", "victim-b", 11, 0, 3),   // 11 in the last 33 minutes: reported
    ("203.0.113.12", "victim-c", 10, 0, 4),   // exactly 10: not "> 10"
    ("2001:db8::1", "victim-e", 12, 0, 1),    // IPv6 too
    ("198.51.100.7", "victim-d", 20, 120, 1), // 20, but two hours ago
];

const INSERT_ONE: &str = "
INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, kafka_partition, kafka_offset)
VALUES ($1, $2, $3, $4, '192.0.2.1', 2, $5)";

/// A row far outside the premade partitions: it lands in audit_logs_default.
fn ancient() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2019, 6, 1, 12, 0, 0).unwrap()
}

// ---------------------------------------------------------------------------
// The runbook
// ---------------------------------------------------------------------------

#[test]
fn runbook_queries_on_audit_logs_run_unchanged_and_give_sensible_answers() {
    rt().block_on(async {
        let (db, _config) = migrated_db().await;
        let client = db.client().await;

        // Seed: background traffic, failure bursts, security incidents and
        // one ancient row.
        client.execute(INSERT_BACKGROUND, &[]).await.unwrap();
        for (ip, user, n, start, every) in FAILURE_BURSTS {
            client.execute(INSERT_FAILURES, &[ip, user, start, every, n]).await.unwrap();
        }
        // (action, minutes ago); the first three are within the last day.
        let incidents = [
            ("SECURITY_BRUTE_FORCE", 60),
            ("SECURITY_ACCOUNT_LOCKED", 300),
            ("SECURITY_IMPOSSIBLE_TRAVEL", 23 * 60),
            ("SECURITY_BRUTE_FORCE", 25 * 60),
            ("SECURITY_TOKEN_REUSE", 2 * 24 * 60),
        ];
        let seeded_at = Utc::now();
        let mut incident_ids = Vec::new();
        for (i, (action, mins)) in incidents.iter().enumerate() {
            let id = Uuid::new_v4();
            let at = seeded_at - chrono::Duration::minutes(*mins);
            client.execute(INSERT_ONE, &[&id, &at, action, &"user-7", &(i as i64)]).await.unwrap();
            incident_ids.push(id);
        }
        client
            .execute(INSERT_ONE, &[&Uuid::new_v4(), &ancient(), &"AUTH_LOGIN", &"user-ancient", &99i64])
            .await
            .unwrap();

        let bursts: i64 = FAILURE_BURSTS.iter().map(|b| i64::from(b.2)).sum();
        let total = BG_ROWS + bursts + incidents.len() as i64 + 1;
        // Only the ancient row is outside the daily partitions.
        assert_eq!(count(&client, "SELECT count(*) FROM audit_logs_default").await, 1);

        // Row count.
        assert_eq!(count(&client, RUNBOOK_ROW_COUNT).await, total);

        // Table size: runs, but a partitioned table has no storage of its own,
        // so the runbook's query reports 0 bytes whatever the data. The real
        // size is the sum over the partition tree.
        let size: String = client.query_one(RUNBOOK_TABLE_SIZE, &[]).await.unwrap().get(0);
        assert_eq!(size, "0 bytes", "pg_total_relation_size of the partitioned parent");
        let tree_bytes =
            count(&client, "SELECT sum(pg_total_relation_size(relid))::bigint FROM pg_partition_tree('audit_logs')")
                .await;
        assert!(tree_bytes > 0);

        // Active sessions: AUTH_LOGIN of the last day per user.
        let mut expected_sessions: BTreeMap<String, i64> = BTreeMap::new();
        for g in bg_in_last_day().filter(|g| bg_action(*g) == "AUTH_LOGIN") {
            *expected_sessions.entry(bg_user(g)).or_default() += 1;
        }
        let sessions: BTreeMap<String, i64> = client
            .query(RUNBOOK_ACTIVE_SESSIONS, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, Option<String>>(0).unwrap(), r.get(1)))
            .collect();
        assert_eq!(sessions, expected_sessions);
        assert!(!sessions.contains_key("user-ancient"));

        // Failed logins: exactly the addresses with more than 10 in the last
        // hour (background failures come from a different address each).
        let by_ip: BTreeMap<IpAddr, i64> = client
            .query(RUNBOOK_FAILED_LOGINS_BY_IP, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let expected_ips: BTreeMap<IpAddr, i64> = [("203.0.113.10", 15), ("203.0.113.11", 11), ("2001:db8::1", 12)]
            .into_iter()
            .map(|(ip, n)| (ip.parse().unwrap(), n))
            .collect();
        assert_eq!(by_ip, expected_ips);

        // Daily activity: per action over the last day.
        let mut expected_daily: BTreeMap<String, i64> = BTreeMap::new();
        for g in bg_in_last_day() {
            *expected_daily.entry(bg_action(g).into()).or_default() += 1;
        }
        *expected_daily.entry("FAILED_AUTH_LOGIN".into()).or_default() += bursts; // all within 140 minutes
        for (action, mins) in &incidents {
            if *mins < 24 * 60 {
                *expected_daily.entry((*action).into()).or_default() += 1;
            }
        }
        let daily: BTreeMap<String, i64> =
            client.query(RUNBOOK_DAILY_ACTIVITY, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(daily, expected_daily);

        // Security incidents: the SECURITY_ rows of the last day, newest first.
        let rows = client.query(RUNBOOK_SECURITY_INCIDENTS, &[]).await.unwrap();
        let got: Vec<Uuid> = rows.iter().map(|r| r.get("event_id")).collect();
        assert_eq!(got, incident_ids[..3].to_vec());
        assert!(rows.iter().all(|r| r.get::<_, String>("action").starts_with("SECURITY_")));

        // Retention: the oldest row is the ancient one, the only one past 90 days.
        let oldest: Option<DateTime<Utc>> = client.query_one(RUNBOOK_OLDEST_LOG, &[]).await.unwrap().get(0);
        assert_eq!(oldest, Some(ancient()));
        assert_eq!(count(&client, RUNBOOK_RETENTION).await, 1);

        // Completeness: hourly buckets, newest first, covering every row.
        let hours: Vec<(DateTime<Utc>, i64)> =
            client.query(RUNBOOK_COMPLETENESS, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(hours.iter().map(|h| h.1).sum::<i64>(), total);
        assert!(hours.windows(2).all(|w| w[0].0 > w[1].0), "hours must be strictly descending");
        // date_trunc works in the session's time zone: compare loosely.
        let newest = hours.first().unwrap().0;
        assert!(newest <= Utc::now() && newest > Utc::now() - chrono::Duration::hours(2), "{newest}");
        let last = hours.last().unwrap();
        assert!(last.0 <= ancient() && last.0 > ancient() - chrono::Duration::hours(1) && last.1 == 1, "{last:?}");
        // At most one bucket per hour spanned by the background plus the ancient one.
        assert!(hours.len() as i64 <= BG_ROWS * BG_STEP_SECS / 3600 + 4, "{} buckets", hours.len());

        // Missing timestamps: none can exist (created_at is NOT NULL).
        assert!(client.query(RUNBOOK_MISSING_TIMESTAMPS, &[]).await.unwrap().is_empty());

        // Lockdown candidates: users with more than 10 failures ever.
        let mut expected_locked: BTreeSet<String> =
            FAILURE_BURSTS.iter().filter(|b| b.2 > 10).map(|b| b.1.to_owned()).collect();
        let mut bg_failures: BTreeMap<String, i64> = BTreeMap::new();
        for g in (1..=BG_ROWS).filter(|g| bg_action(*g) == "FAILED_AUTH_LOGIN") {
            *bg_failures.entry(bg_user(g)).or_default() += 1;
        }
        expected_locked.extend(bg_failures.into_iter().filter(|(_, n)| *n > 10).map(|(u, _)| u));
        let locked: BTreeSet<String> =
            client.query(RUNBOOK_LOCKDOWN_CANDIDATES, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(locked, ["victim-a", "victim-b", "victim-d", "victim-e"].map(String::from).into());
        assert_eq!(locked, expected_locked);
    });
}

#[test]
fn runbook_connection_queries_run_unchanged() {
    rt().block_on(async {
        let (db, _config) = migrated_db().await;
        let client = db.client().await;

        assert!(count(&client, RUNBOOK_ACTIVE_CONNECTIONS).await >= 1);

        // This very session is active while it runs the query.
        let states: BTreeMap<Option<String>, i64> =
            client.query(RUNBOOK_CONNECTION_STATES, &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(states.get(&Some("active".to_owned())).is_some_and(|n| *n >= 1), "{states:?}");

        // The kill query would terminate other people's sessions on a shared
        // server: plan it (which checks every name in it) without running it.
        let plan = client.query(&format!("EXPLAIN {RUNBOOK_KILL_LONG_RUNNING}"), &[]).await.unwrap();
        assert!(!plan.is_empty());
    });
}

#[test]
fn runbook_slow_query_report_needs_pg_stat_statements() {
    rt().block_on(async {
        let (db, _config) = migrated_db().await;
        let client = db.client().await;
        let installed = count(&client, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'").await;
        let err = client.query(RUNBOOK_SLOW_QUERIES, &[]).await.expect_err("pg_stat_statements query");
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("not a server error: {err}"));
        if installed == 0 {
            // The extension is not installed in this database (and is not in
            // shared_preload_libraries on the test server); we do not
            // install extensions. The only failure is the missing view.
            assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{db_err}");
            assert!(db_err.message().contains("pg_stat_statements"), "{db_err}");
        } else {
            // Installed (e.g. via template1): even then the runbook's query
            // cannot run unchanged on PostgreSQL 13+, where total_time and
            // mean_time became total_exec_time and mean_exec_time; without
            // the preload the view itself refuses to be read.
            assert!(
                err.code() == Some(&SqlState::UNDEFINED_COLUMN)
                    || err.code() == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
                "{db_err}"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Indexes (EXPLAIN)
// ---------------------------------------------------------------------------

/// The JSON plan of `sql` and its text form (for failure messages).
async fn explain(client: &Client, sql: &str) -> (Value, String) {
    let json: Value = client.query_one(&format!("EXPLAIN (FORMAT JSON) {sql}"), &[]).await.unwrap().get(0);
    let text: Vec<String> =
        client.query(&format!("EXPLAIN {sql}"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    (json[0]["Plan"].clone(), text.join("\n"))
}

fn plan_nodes<'a>(node: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(node);
    for child in node["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, out);
    }
}

/// The top-level (audit_logs) indexes whose per-partition children the plan
/// scans.
async fn root_indexes_used(client: &Client, plan: &Value) -> BTreeSet<String> {
    let mut nodes = Vec::new();
    plan_nodes(plan, &mut nodes);
    let mut roots = BTreeSet::new();
    for node in nodes {
        let kind = node["Node Type"].as_str().unwrap_or_default();
        if matches!(kind, "Index Scan" | "Index Only Scan" | "Bitmap Index Scan") {
            let index = node["Index Name"].as_str().unwrap();
            let root: Option<String> =
                client.query_one("SELECT pg_partition_root($1::text::regclass)::text", &[&index]).await.unwrap().get(0);
            roots.insert(root.unwrap_or_else(|| index.to_owned()));
        }
    }
    roots
}

fn relations_scanned(plan: &Value) -> BTreeSet<String> {
    let mut nodes = Vec::new();
    plan_nodes(plan, &mut nodes);
    nodes.iter().filter_map(|n| n["Relation Name"].as_str().map(str::to_owned)).collect()
}

/// A partition this small may rightly be read sequentially: the data starts
/// 2.9 days back, so how many rows the oldest and today's partitions hold
/// depends on the time of day the test runs.
const SMALL_PARTITION_ROWS: i64 = 10_000;

/// The plan reaches the rows through `index` (the audit_logs index; the
/// partitions' own copies have generated names), and reads no partition of
/// any size sequentially.
async fn assert_uses_index(client: &Client, sql: &str, index: &str) {
    let (plan, text) = explain(client, sql).await;
    let used = root_indexes_used(client, &plan).await;
    assert!(used.contains(index), "expected {index} for\n{sql}\nplan:\n{text}");
    let mut nodes = Vec::new();
    plan_nodes(&plan, &mut nodes);
    for node in nodes.iter().filter(|n| n["Node Type"] == "Seq Scan") {
        let relation = node["Relation Name"].as_str().unwrap();
        let rows = count(client, &format!("SELECT count(*) FROM {relation}")).await;
        assert!(rows < SMALL_PARTITION_ROWS, "sequential scan of {relation} ({rows} rows) for\n{sql}\nplan:\n{text}");
    }
}

#[test]
fn indexes_serve_the_runbook_and_search_queries() {
    rt().block_on(async {
        let (db, _config) = migrated_db().await;
        let client = db.client().await;
        // 250k rows, one a second over 2.9 days: ~86k per daily partition,
        // 5000 users, 1% failed logins, 0.1% security incidents, addresses
        // spread over 10.0.0.0/8.
        client
            .batch_execute(
                "INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, kafka_partition, kafka_offset)
                 SELECT gen_random_uuid(),
                        now() - g * interval '1 second',
                        CASE WHEN g % 1000 = 0 THEN 'SECURITY_BRUTE_FORCE'
                             WHEN g % 100 = 0 THEN 'FAILED_AUTH_LOGIN'
                             WHEN g % 2 = 0 THEN 'AUTH_LOGIN'
                             ELSE 'TOKEN_REFRESH' END,
                        'user-' || (g % 5000),
                        ('10.' || (g % 200) || '.' || (g / 200 % 256) || '.' || (g % 250 + 1))::inet,
                        0, g
                   FROM generate_series(1, 250000) AS g;
                 ANALYZE audit_logs;",
            )
            .await
            .unwrap();

        // One user's activity over a time range: (user_id, created_at).
        assert_uses_index(
            &client,
            "SELECT * FROM audit_logs WHERE user_id = 'user-42'
               AND created_at >= now() - interval '2 days' AND created_at < now() - interval '1 day'",
            "audit_logs_user_time_idx",
        )
        .await;

        // The runbook's failed-login analysis and security report, unchanged:
        // the partial indexes over the rare rows they look for.
        assert_uses_index(&client, RUNBOOK_FAILED_LOGINS_BY_IP, "audit_logs_notable_idx").await;
        assert_uses_index(&client, RUNBOOK_SECURITY_INCIDENTS, "audit_logs_security_idx").await;
        // The API's prefix search (a range on the "C"-collated action) is
        // proven to lie inside the notable index's predicate.
        assert_uses_index(
            &client,
            "SELECT * FROM audit_logs WHERE action >= 'SECURITY_' AND action < 'SECURITY`' ORDER BY created_at DESC LIMIT 50",
            "audit_logs_notable_idx",
        )
        .await;

        // Failed logins by address and by network.
        assert_uses_index(
            &client,
            "SELECT * FROM audit_logs WHERE action = 'FAILED_AUTH_LOGIN' AND ip_address = '10.1.2.3'",
            "audit_logs_failed_ip_idx",
        )
        .await;
        assert_uses_index(
            &client,
            "SELECT * FROM audit_logs WHERE action = 'FAILED_AUTH_LOGIN' AND ip_address <<= '10.1.0.0/16'",
            "audit_logs_failed_ip_idx",
        )
        .await;

        // A range inside one day touches that day's partition only.
        let day = Utc::now().date_naive() - Days::new(1);
        let sql = format!(
            "SELECT count(*) FROM audit_logs
              WHERE created_at >= '{day} 10:00:00+00' AND created_at < '{day} 11:00:00+00'"
        );
        let (plan, text) = explain(&client, &sql).await;
        let partition = format!("audit_logs_p{}", day.format("%Y%m%d"));
        assert_eq!(relations_scanned(&plan), BTreeSet::from([partition]), "plan:\n{text}");
        // ...and inside it the hour's blocks only, through the BRIN on
        // created_at (rows arrive roughly in time order).
        assert_uses_index(&client, &sql, "audit_logs_time_brin").await;
        // One row a second: the hour holds exactly 3600.
        assert_eq!(count(&client, &sql).await, 3600);
    });
}

// ---------------------------------------------------------------------------
// Migrations, partitions, the idempotency key
// ---------------------------------------------------------------------------

#[test]
fn migrations_are_idempotent() {
    rt().block_on(async {
        let db = TestDb::create().await;
        let config = config_for(&db);
        let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();

        let today = Utc::now().date_naive();
        assert_eq!(prepare_database(&config).await.unwrap(), all);
        let client = db.client().await;
        let partitions_sql = "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_logs'::regclass";
        let partitions = count(&client, partitions_sql).await;
        // Lookback + today + premake, plus the default partition.
        let storage = &config.storage;
        assert_eq!(partitions, i64::from(storage.partition_lookback_days + 1 + storage.partition_premake_days) + 1);

        // Second run: nothing applied, nothing created, one row per migration.
        assert_eq!(prepare_database(&config).await.unwrap(), Vec::<i32>::new());
        let rows: Vec<(i32, String)> = client
            .query("SELECT version, name FROM schema_migrations ORDER BY version", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let expected: Vec<(i32, String)> = MIGRATIONS.iter().map(|m| (m.version, m.name.to_owned())).collect();
        assert_eq!(rows, expected);
        // (Unless midnight UTC passed in between: then one more day is due.)
        if Utc::now().date_naive() == today {
            assert_eq!(count(&client, partitions_sql).await, partitions);
        }

        // An applied migration whose file changed is refused, not re-run.
        client.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1", &[]).await.unwrap();
        let err = prepare_database(&config).await.expect_err("edited migration");
        assert!(matches!(err, store::StoreError::Migration { version: 1, .. }), "{err}");
    });
}

#[test]
fn ensure_range_moves_default_partition_rows_into_the_new_partition() {
    rt().block_on(async {
        let (db, config) = migrated_db().await;
        let client = db.client().await;
        let day = NaiveDate::from_ymd_opt(2020, 1, 15).unwrap();
        let partition = "audit_logs_p20200115";

        // 100 rows through the day, plus one either side of it.
        client
            .batch_execute(
                "INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, metadata, kafka_partition, kafka_offset)
                 SELECT gen_random_uuid(), '2020-01-15 00:00:00+00'::timestamptz + g * interval '14 minutes',
                        'AUTH_LOGIN', 'user-' || g, '192.0.2.7', jsonb_build_object('g', g), 0, g
                   FROM generate_series(0, 99) AS g;
                 INSERT INTO audit_logs (event_id, created_at, action, kafka_partition, kafka_offset) VALUES
                   (gen_random_uuid(), '2020-01-14 23:59:59.999999+00', 'AUTH_LOGIN', 0, 1000),
                   (gen_random_uuid(), '2020-01-16 00:00:00+00', 'AUTH_LOGIN', 0, 1001);",
            )
            .await
            .unwrap();
        assert_eq!(count(&client, "SELECT count(*) FROM audit_logs_default").await, 102);
        let fingerprint_sql = "SELECT md5(string_agg(t::text, ',' ORDER BY event_id)) FROM audit_logs t
                                WHERE created_at >= '2020-01-15 00:00:00+00' AND created_at < '2020-01-16 00:00:00+00'";
        let before: String = client.query_one(fingerprint_sql, &[]).await.unwrap().get(0);

        let pool = store::connect_pool(&config.database, 2).unwrap();
        assert_eq!(partitions::ensure_range(&pool, day, day).await.unwrap(), 1);

        // The day's rows moved, unchanged; the neighbours stayed in default.
        assert_eq!(count(&client, &format!("SELECT count(*) FROM {partition}")).await, 100);
        assert_eq!(count(&client, "SELECT count(*) FROM audit_logs_default").await, 2);
        let after: String = client.query_one(fingerprint_sql, &[]).await.unwrap().get(0);
        assert_eq!(after, before);
        assert_eq!(count(&client, "SELECT count(*) FROM audit_logs").await, 102);

        // The new partition carries every index of audit_logs, the unique
        // constraint included, and enforces it.
        let parent_indexes = count(&client, "SELECT count(*) FROM pg_indexes WHERE tablename = 'audit_logs'").await;
        assert_eq!(
            count(&client, &format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{partition}'")).await,
            parent_indexes
        );
        let err = client
            .execute(&format!("INSERT INTO audit_logs SELECT * FROM {partition} LIMIT 1"), &[])
            .await
            .expect_err("duplicate into the new partition");
        assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");

        // Already there: nothing to do.
        assert_eq!(partitions::ensure_range(&pool, day, day).await.unwrap(), 0);
    });
}

#[test]
fn duplicate_event_is_rejected_by_the_unique_constraint() {
    rt().block_on(async {
        let (db, _config) = migrated_db().await;
        let client = db.client().await;
        // In a daily partition and in the default partition alike.
        for at in [Utc::now(), ancient()] {
            let id = Uuid::new_v4();
            client.execute(INSERT_ONE, &[&id, &at, &"AUTH_LOGIN", &"user-1", &1i64]).await.unwrap();
            let err = client
                .execute(INSERT_ONE, &[&id, &at, &"AUTH_LOGIN", &"user-1", &2i64])
                .await
                .expect_err("duplicate (event_id, created_at)");
            assert!(store::is_unique_violation(&err), "{err}");
            // What the writer's de-duplicating path relies on.
            let inserted = client
                .execute(
                    "INSERT INTO audit_logs (event_id, created_at, action, kafka_partition, kafka_offset)
                     VALUES ($1, $2, 'AUTH_LOGIN', 0, 3) ON CONFLICT (event_id, created_at) DO NOTHING",
                    &[&id, &at],
                )
                .await
                .unwrap();
            assert_eq!(inserted, 0);
            let stored = client.query_one("SELECT count(*) FROM audit_logs WHERE event_id = $1", &[&id]).await.unwrap();
            assert_eq!(stored.get::<_, i64>(0), 1);
        }
    });
}
