//! docs/RUNBOOK.md works as written: every ```sql block runs against a
//! freshly migrated database (empty, and with data), the Prometheus rules'
//! runbook links and the page's own links land on headings, the endpoints,
//! commands and metrics it names exist, its PromQL parses, and its
//! dead-letter re-drive script moves dead letters back byte for byte.
//!
//! A block may opt out with a first line `-- runbook-test: skip (reason)`,
//! only when it needs an extension the test server lacks.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use audit_service::config::Config;
use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::service::prepare_database;
use common::{TestDb, read_topic, rt, unique};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const SKIP_MARKER: &str = "-- runbook-test: skip";

fn runbook() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/RUNBOOK.md")).expect("docs/RUNBOOK.md")
}

/// A fenced code block with the heading it sits under.
#[derive(Debug, Clone)]
struct Block {
    heading: String,
    line: usize,
    text: String,
}

impl Block {
    /// `Some(reason)` when the block opts out of the SQL test.
    fn skip_reason(&self) -> Option<&str> {
        let first = self.text.lines().find(|l| !l.trim().is_empty())?.trim();
        first.strip_prefix(SKIP_MARKER).map(str::trim)
    }

    fn place(&self) -> String {
        format!("docs/RUNBOOK.md:{} ({})", self.line, self.heading)
    }
}

/// Every block fenced as ```` ```lang ````.
fn blocks(text: &str, lang: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut current: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(block) = current.as_mut() {
            if line.trim_start().starts_with("```") {
                out.push(current.take().unwrap());
            } else {
                block.text.push_str(line);
                block.text.push('\n');
            }
            continue;
        }
        if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_owned();
        } else if let Some(rest) = line.trim_start().strip_prefix("```") {
            if rest.trim() == lang {
                current = Some(Block { heading: heading.clone(), line: i + 1, text: String::new() });
            } else {
                // Another language: skip to its end.
                current = Some(Block { heading: String::new(), line: 0, text: String::new() });
            }
        }
    }
    out.into_iter().filter(|b| b.line > 0).collect()
}

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn headings(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            let anchor = slug(line.trim_start_matches('#'));
            assert!(out.insert(anchor.clone()), "two headings share the anchor #{anchor}");
        }
    }
    out
}

/// A few rows in every table the runbook's queries read, so that their
/// expressions meet real values (casts, regular expressions, joins).
const SEED: &str = r#"
INSERT INTO audit_logs (event_id, created_at, action, user_id, username, ip_address, user_agent, session_id,
                        request_id, metadata, kafka_partition, kafka_offset)
SELECT gen_random_uuid(),
       now() - i * interval '1 minute',
       (ARRAY['AUTH_LOGIN', 'FAILED_AUTH_LOGIN', 'FAILED_AUTH_LOGIN', 'AUTH_LOGOUT', 'TOKEN_ISSUED',
              'SECURITY_PASSWORD_CHANGE', 'ADMIN_AUDIT_CLEANUP'])[1 + i % 7],
       CASE WHEN i % 13 = 0 THEN NULL ELSE 'u' || (i % 17) END,
       'user' || (i % 17) || '@example.com',
       CASE WHEN i % 5 = 0 THEN ('2001:db8::' || (i % 9))::inet ELSE ('203.0.113.' || (i % 9))::inet END,
       'curl/8.5.0', 's-' || (i % 23), 'r-' || i, jsonb_build_object('reason', 'invalid_password'),
       i % 3, i
  FROM generate_series(1, 3000) AS i;
-- Far in the past: the default partition.
INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
SELECT gen_random_uuid(), now() - interval '200 days' - i * interval '1 hour', 'AUTH_LOGIN', 'u1', 0, 100000 + i
  FROM generate_series(1, 5) AS i;
INSERT INTO alerts (alert_id, rule, subject, key_spec, key_hash, state, severity, count, threshold, window_seconds,
                    episode_start, first_event_at, last_event_at, recommended_action, detected_at, published)
VALUES (gen_random_uuid(), 'user_failed_logins', 'user:u3', 'user', 3, 'firing', 'warning', 6, 5, 60,
        now() - interval '5 minutes', now() - interval '6 minutes', now() - interval '5 minutes', 'lock_account',
        now() - interval '5 minutes', true),
       (gen_random_uuid(), 'ip_password_spraying', 'ip:203.0.113.4', 'ip_address', 4, 'firing', 'warning', 11, 10,
        600, now() - interval '4 minutes', NULL, now() - interval '4 minutes', 'block_ip',
        now() - interval '4 minutes', true),
       (gen_random_uuid(), 'brute_force_success', 'user:u5', 'user', 5, 'firing', 'critical', 5, 5, 600,
        now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 'lock_account',
        now() - interval '20 hours', false),
       (gen_random_uuid(), 'user_ip_failed_logins', 'user:u6|ip:2001:db8::6', 'user+ip_address', 6, 'escalated',
        'critical', 11, 10, 300, now() - interval '3 minutes', NULL, now() - interval '2 minutes', 'investigate',
        now() - interval '2 minutes', true);
INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, reason_code, reason, payload_bytes)
VALUES ('auth.events', 0, 17, 'malformed_json', 'malformed JSON: expected value at line 1 column 1', 9),
       ('auth.events', 1, 4, 'unknown_schema_id', 'unknown Avro schema id 42', 120);
INSERT INTO consumer_offsets (consumer_group, topic, kafka_partition, next_offset)
VALUES ('audit-service', 'auth.events', 0, 200000), ('audit-service', 'auth.events', 1, 200000),
       ('audit-service', 'auth.events', 2, 200000);
INSERT INTO sessions (session_id, user_id, ip_address, user_agent, started_at, last_seen_at)
VALUES ('s-1', 'u1', '203.0.113.1', 'curl/8.5.0', now() - interval '1 hour', now() - interval '1 minute');
INSERT INTO activity_hourly (hour, action, events)
VALUES (date_trunc('hour', now()), 'AUTH_LOGIN', 42);
ANALYZE;
"#;

/// Runs every SQL block of the runbook on a migrated database; the list of
/// failures (empty when all ran).
async fn run_sql_blocks(db: &TestDb) -> Vec<String> {
    let client = db.client().await;
    let mut failures = Vec::new();
    for block in blocks(&runbook(), "sql") {
        if block.skip_reason().is_some() {
            continue;
        }
        if let Err(e) = client.batch_execute(&block.text).await {
            let message = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned());
            failures.push(format!("{}: {message}\n{}", block.place(), block.text));
        }
    }
    failures
}

async fn migrated_database() -> TestDb {
    let db = TestDb::create().await;
    let config = Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap();
    prepare_database(&config).await.unwrap();
    db
}

#[test]
fn every_sql_block_runs_unchanged_on_a_database_with_data() {
    rt().block_on(async {
        let db = migrated_database().await;
        db.client().await.batch_execute(SEED).await.expect("seed data");
        let failures = run_sql_blocks(&db).await;
        assert!(failures.is_empty(), "runbook SQL that does not run:\n\n{}", failures.join("\n\n"));
    });
}

#[test]
fn every_sql_block_runs_unchanged_on_an_empty_database() {
    rt().block_on(async {
        let db = migrated_database().await;
        let failures = run_sql_blocks(&db).await;
        assert!(failures.is_empty(), "runbook SQL that does not run:\n\n{}", failures.join("\n\n"));
    });
}

#[test]
fn sql_blocks_are_many_and_skips_rare_and_justified() {
    let sql = blocks(&runbook(), "sql");
    assert!(sql.len() >= 30, "only {} SQL blocks found", sql.len());
    let skipped: Vec<&Block> = sql.iter().filter(|b| b.skip_reason().is_some()).collect();
    assert!(skipped.len() <= 2, "too many skipped blocks: {skipped:?}");
    for b in skipped {
        let reason = b.skip_reason().unwrap();
        assert!(reason.starts_with('(') && reason.ends_with(')') && reason.len() > 10, "{}: say why", b.place());
    }
    // Table sizes come from the partition tree: the parent has no storage.
    assert!(!sql.iter().any(|b| b.text.contains("pg_total_relation_size('audit_logs')")));
}

#[test]
fn the_prometheus_rules_and_the_runbook_links_land_on_headings() {
    let text = runbook();
    let anchors = headings(&text);
    for required in [
        "service-down",
        "high-api-latency",
        "database-pool-saturation",
        "database-write-errors",
        "consumer-lag",
        "ingest-stalled",
        "dead-letter-queue-growth",
        "failed-login-spike",
    ] {
        assert!(anchors.contains(required), "no heading for #{required}");
    }
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus/rules.yml")).unwrap();
    let linked: Vec<&str> =
        rules.split("docs/RUNBOOK.md#").skip(1).map(|rest| rest.split('"').next().unwrap()).collect();
    assert!(linked.len() >= 8);
    for anchor in linked {
        assert!(anchors.contains(anchor), "rules.yml links to #{anchor}, which docs/RUNBOOK.md lacks");
    }
    for link in text.split("](#").skip(1) {
        let anchor = link.split(')').next().unwrap();
        assert!(anchors.contains(anchor), "the runbook links to #{anchor}, which it lacks");
    }
}

/// `/api/v1/...` paths in the text.
fn api_paths(text: &str) -> BTreeSet<String> {
    text.match_indices("/api/v1/")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "/_-{}.".contains(*c))
                .collect::<String>()
                .trim_end_matches('.')
                .to_owned()
        })
        .collect()
}

fn route_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
}

#[test]
fn the_endpoints_commands_and_metrics_it_names_exist() {
    let text = runbook();
    let routes = audit_service::api::routes();
    for path in api_paths(&text) {
        assert!(routes.iter().any(|r| route_matches(r.path, &path)), "the runbook names {path}, which is no route");
    }

    let help = Command::new(env!("CARGO_BIN_EXE_audit-service")).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let commands: BTreeSet<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // Commands as shown: in shell blocks and inline code.
    let mut code: Vec<String> = blocks(&text, "bash").into_iter().map(|b| b.text).collect();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("```")) {
        code.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    let code = code.join("\n");
    let mut named = BTreeSet::new();
    for (i, _) in code.match_indices("audit-service ") {
        let rest = &code[i + "audit-service ".len()..];
        // Past global options (`--config FILE`) to the subcommand.
        let mut words = rest.split_whitespace().peekable();
        while words.peek().is_some_and(|w| w.starts_with("--")) {
            words.next();
            words.next();
        }
        let Some(word) = words.next() else { continue };
        let word = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
        if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '-')
            && !word.is_empty()
            && word.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        {
            named.insert(word.to_owned());
        }
    }
    for word in ["run", "migrate", "check-config", "demo", "produce", "replay"] {
        assert!(named.contains(word), "the runbook never shows `audit-service {word}`");
    }
    for word in &named {
        assert!(commands.contains(word.as_str()), "`audit-service {word}` is not a command ({commands:?})");
    }

    // audit_* names: metrics the service describes, or schema objects.
    let metrics_rs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    let mut schema = String::new();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        schema.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    let databases = ["audit_demo", "audit_restored"];
    for (i, _) in text.match_indices("audit_") {
        if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let metric = ["_bucket", "_count", "_sum"].iter().fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        // `audit_events_*`: a family of metrics.
        let quoted =
            if text[i + name.len()..].starts_with('*') { format!("\"{metric}") } else { format!("\"{metric}\"") };
        let known = metrics_rs.contains(&quoted) || schema.contains(&name) || databases.contains(&name.as_str());
        assert!(known, "the runbook names `{name}`: neither a metric of src/metrics.rs nor in migrations/");
    }
}

#[test]
fn its_promql_parses() {
    let queries = blocks(&runbook(), "promql");
    assert!(queries.len() >= 5);
    let mut rules = String::from("groups:\n  - name: runbook\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!("      - record: runbook:query_{i}\n        expr: |\n"));
        for line in q.text.lines() {
            rules.push_str(&format!("          {line}\n"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("runbook-queries.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool is installed (bash .ci/run installs it)");
    assert!(
        out.status.success(),
        "runbook PromQL does not parse:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dead_letter_redrive_script_sends_back_exactly_the_chosen_messages() {
    let script = blocks(&runbook(), "bash")
        .into_iter()
        .find(|b| b.heading == "Re-drive dead letters")
        .expect("a bash block under 'Re-drive dead letters'");
    let kafka = EmbeddedKafka::start(1).unwrap();
    let (dlq, events) = (unique("redrive.dlq"), unique("redrive.events"));
    kafka.create_topic(&dlq, 2).unwrap();
    kafka.create_topic(&events, 1).unwrap();

    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", kafka.bootstrap_servers()).create().unwrap();
    // Avro bytes include newlines, tabs and NULs.
    let avro = b"\x00\x00\x00\x00\x2a\n\tH\x00\x1f binary\nbody".to_vec();
    let dead = [
        (Some("user 7"), avro.clone(), "unknown_schema_id", 0),
        (Some("user-8"), b"{not json".to_vec(), "malformed_json", 1),
        (None, b"\x00\x00\x00\x00\x2b\r\nmore".to_vec(), "unknown_schema_id", 1),
    ];
    for (key, payload, reason, partition) in &dead {
        let headers = OwnedHeaders::new()
            .insert(Header { key: "traceparent", value: Some("00-abc-01") })
            .insert(Header { key: "dlq.reason.code", value: Some(*reason) })
            .insert(Header { key: "dlq.reason", value: Some("unknown Avro schema id 42, or worse") })
            .insert(Header { key: "dlq.source.topic", value: Some("auth.events") });
        let mut record: BaseRecord<'_, str, [u8]> =
            BaseRecord::to(&dlq).payload(payload.as_slice()).partition(*partition).headers(headers);
        if let Some(k) = key {
            record = record.key(*k);
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let out = Command::new("bash")
        .arg("-c")
        .arg(&script.text)
        .env("BROKERS", kafka.bootstrap_servers())
        .env("DLQ", &dlq)
        .env("EVENTS", &events)
        .env("REASON", "unknown_schema_id")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("re-drove").count(), 2, "{stdout}");

    let mut redriven: Vec<(Option<Vec<u8>>, Vec<u8>)> =
        read_topic(&kafka, &events, 3, Duration::from_secs(10)).into_iter().map(|m| (m.key, m.payload)).collect();
    redriven.sort();
    let mut expected = vec![(Some(b"user 7".to_vec()), avro), (None, dead[2].1.clone())];
    expected.sort();
    assert_eq!(redriven, expected);
}
