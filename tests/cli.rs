//! The `audit-service` binary as operators run it: configuration errors,
//! environment overrides and redaction, `migrate` (fresh database, again,
//! unreachable server, TLS) and JSON logs. Each test runs the real binary as
//! a child process in an empty working directory, so that the repository's
//! config/audit-service.toml is not picked up.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use audit_service::config::DatabaseConfig;
use audit_service::store::{self, migrate::MIGRATIONS};
use common::{TestDb, pg_connect, rt, unique};

/// The binary with none of the caller's configuration in its environment.
fn audit_service(workdir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-service"));
    cmd.current_dir(workdir);
    for (name, _) in std::env::vars() {
        if name.starts_with("AUDIT__") || ["DATABASE_URL", "KAFKA_BROKERS", "RUST_LOG"].contains(&name.as_str()) {
            cmd.env_remove(name);
        }
    }
    cmd
}

struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Run {
    let Output { status, stdout, stderr } = cmd.output().expect("run audit-service");
    Run {
        success: status.success(),
        code: status.code(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// A config file holding `text` in `dir`.
fn config_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("audit-service.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A database name that does not exist yet; the guard drops it (if the
/// binary created it) when the test ends, pass or fail.
fn fresh_database() -> TestDb {
    let name = unique("audit_cli");
    TestDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
}

async fn applied_versions(url: &str) -> Vec<i32> {
    let client = pg_connect(url).await;
    client
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn all_versions() -> Vec<i32> {
    MIGRATIONS.iter().map(|m| m.version).collect()
}

// ---------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------

#[test]
fn check_config_prints_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(audit_service(dir.path()).arg("check-config"));
    assert!(out.success, "{}", out.stderr);
    let printed: toml::Table = out.stdout.parse().unwrap_or_else(|e| panic!("not TOML ({e}):\n{}", out.stdout));
    let kafka = &printed["kafka"];
    assert_eq!(kafka["events_topic"].as_str(), Some("auth.events"));
    assert_eq!(kafka["dlq_topic"].as_str(), Some("auth.events.dlq"));
    assert_eq!(kafka["alerts_topic"].as_str(), Some("auth.alerts"));
    assert_eq!(kafka["group_id"].as_str(), Some("audit-service"));
}

#[test]
fn unknown_field_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), "[kafka]\nevents_topc = \"x\"\n");
    let out = run(audit_service(dir.path()).arg("--config").arg(&path).arg("check-config"));
    assert!(!out.success);
    assert!(out.stderr.contains("events_topc"), "{}", out.stderr);
}

#[test]
fn wrong_type_is_refused_with_the_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(dir.path(), "[ingest]\nbatch_max_rows = \"many\"\n");
    let out = run(audit_service(dir.path()).arg("--config").arg(&path).arg("check-config"));
    assert!(!out.success);
    assert!(out.stderr.contains("ingest.batch_max_rows"), "{}", out.stderr);
}

#[test]
fn missing_explicit_config_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere").join("audit.toml");
    let out = run(audit_service(dir.path()).arg("--config").arg(&path).arg("check-config"));
    assert!(!out.success);
    assert!(out.stderr.contains(&*path.to_string_lossy()), "{}", out.stderr);
    // The reason, once (it used to be printed twice).
    assert_eq!(out.stderr.matches("No such file or directory").count(), 1, "{}", out.stderr);
}

#[test]
fn environment_overrides_show_and_secrets_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(audit_service(dir.path())
        .arg("check-config")
        .env("AUDIT__KAFKA__EVENTS_TOPIC", "custom.events")
        .env("KAFKA_BROKERS", "b1:9092")
        .env("DATABASE_URL", "postgres://svc:s3cret@db/x")
        .env("AUDIT__KAFKA__PROPERTIES__SASL.PASSWORD", "hunter2"));
    assert!(out.success, "{}", out.stderr);
    let printed: toml::Table = out.stdout.parse().unwrap();
    assert_eq!(printed["kafka"]["events_topic"].as_str(), Some("custom.events"));
    assert_eq!(printed["kafka"]["brokers"].as_str(), Some("b1:9092"));
    assert_eq!(printed["database"]["url"].as_str(), Some("postgres://svc:****@db/x"));
    // The property is there, its value is not.
    assert_eq!(printed["kafka"]["properties"]["sasl.password"].as_str(), Some("****"));
    for secret in ["s3cret", "hunter2"] {
        assert!(!out.stdout.contains(secret), "{secret} on stdout:\n{}", out.stdout);
        assert!(!out.stderr.contains(secret), "{secret} on stderr:\n{}", out.stderr);
    }
}

// ---------------------------------------------------------------------------
// migrate
// ---------------------------------------------------------------------------

#[test]
fn migrate_creates_the_database_and_is_repeatable() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database();
    for round in ["first", "second"] {
        let out = run(audit_service(dir.path()).arg("migrate").env("DATABASE_URL", &db.url));
        assert!(out.success, "{round} migrate failed:\n{}", out.stderr);
        let versions = rt().block_on(applied_versions(&db.url));
        assert_eq!(versions, all_versions(), "after the {round} migrate");
    }
}

/// `fold` (the runbook's manual fold): pending activity deltas end up in
/// the rollup and session tables, none stay pending, and a second run with
/// nothing pending is harmless.
#[test]
fn fold_folds_the_pending_activity_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database();
    let out = run(audit_service(dir.path()).arg("migrate").env("DATABASE_URL", &db.url));
    assert!(out.success, "migrate failed:\n{}", out.stderr);
    rt().block_on(async {
        let client = pg_connect(&db.url).await;
        // Two batches' deltas: u1 logs in (session s1) then logs out.
        client
            .batch_execute(
                "INSERT INTO activity_delta_batches (user_ids, hours, actions, events, session_ids, s_user_ids, s_ips, \
                   s_agents, s_started, s_last_seen, s_ended, s_reasons) VALUES
                 ('{u1}', '{2026-11-27 10:00+00}', '{AUTH_LOGIN}', '{1}', '{s1}', '{u1}', '{10.0.0.1}', '{ua}',
                  '{2026-11-27 10:05+00}', '{2026-11-27 10:05+00}', '{NULL}', '{NULL}'),
                 ('{u1}', '{2026-11-27 10:00+00}', '{AUTH_LOGOUT}', '{1}', '{s1}', '{u1}', '{NULL}', '{NULL}',
                  '{NULL}', '{2026-11-27 10:20+00}', '{2026-11-27 10:20+00}', '{logout}')",
            )
            .await
            .unwrap();
    });
    for round in ["first", "second"] {
        let out = run(audit_service(dir.path()).arg("fold").env("DATABASE_URL", &db.url));
        assert!(out.success, "{round} fold failed:\n{}", out.stderr);
        assert!(out.stdout.contains("folded"), "{}", out.stdout);
    }
    rt().block_on(async {
        let client = pg_connect(&db.url).await;
        let count = |sql: &'static str| {
            let client = &client;
            async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(count("SELECT count(*) FROM activity_delta_batches").await, 0);
        assert_eq!(count("SELECT sum(events)::bigint FROM activity_user_hourly WHERE user_id = 'u1'").await, 2);
        let session = client
            .query_one("SELECT user_id, started_at < ended_at, end_reason FROM sessions WHERE session_id = 's1'", &[])
            .await
            .unwrap();
        assert_eq!(
            (session.get::<_, String>(0), session.get::<_, bool>(1), session.get::<_, String>(2)),
            ("u1".to_owned(), true, "logout".to_owned())
        );
    });
}

#[test]
fn migrate_against_an_unreachable_server_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(audit_service(dir.path())
        .arg("migrate")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")
        .env("RUST_BACKTRACE", "1"));
    // 1 is the error exit; a panic would be 101.
    assert_eq!(out.code, Some(1), "stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("error: migration failed"), "{}", out.stderr);
    // What went wrong, not only that something did.
    assert!(out.stderr.contains("no PostgreSQL connection"), "{}", out.stderr);
    assert!(out.stderr.contains("Connection refused"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked") && !out.stderr.contains("backtrace"), "{}", out.stderr);
}

#[test]
fn migrate_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database();
    let out = run(audit_service(dir.path()).arg("migrate").env("DATABASE_URL", format!("{}?sslmode=require", db.url)));
    assert!(out.success, "{}", out.stderr);
    assert_eq!(rt().block_on(applied_versions(&db.url)), all_versions());
}

/// The pool really encrypts with `sslmode=require` (and does not with
/// `sslmode=disable`, so the check means something).
#[test]
fn connect_pool_uses_tls_when_required() {
    rt().block_on(async {
        let db = TestDb::create().await;
        let ssl: String = db.client().await.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        if ssl != "on" {
            eprintln!("skipped: the PostgreSQL server at 127.0.0.1:5432 has ssl = {ssl}");
            return;
        }
        for (mode, expected) in [("require", true), ("disable", false)] {
            let cfg = DatabaseConfig { url: format!("{}?sslmode={mode}", db.url), ..DatabaseConfig::default() };
            let pool = store::connect_pool(&cfg, 1).unwrap();
            let client = pool.get().await.unwrap();
            let encrypted: bool =
                client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
            assert_eq!(encrypted, expected, "sslmode={mode}");
        }
    });
}

// ---------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database();
    let out = run(audit_service(dir.path()).args(["--log-format", "json", "migrate"]).env("DATABASE_URL", &db.url));
    assert!(out.success, "{}", out.stderr);
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(serde_json::Value::is_object), "{}", out.stderr);
    // A fresh database: it is created and migrated, and says so.
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.contains(&"created database"), "{messages:?}");
    assert!(
        lines.iter().any(|l| l["message"] == "applied migration" && l["level"] == "INFO" && l["version"] == 1),
        "{}",
        out.stderr
    );
}
