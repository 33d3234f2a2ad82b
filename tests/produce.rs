//! `audit-service produce` against an embedded cluster: the messages are read
//! back with kcat (an independent Kafka client) and decoded with the
//! published schemas, JSON by its field names and Avro with
//! schemas/auth_event.avsc through apache-avro.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use audit_service::detect::{AlertState, DetectConfig, Detector};
use audit_service::event::json::decode_json;
use audit_service::event::{AuthEvent, avro};
use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::loadgen;
use common::unique;

/// One message as kcat printed it.
#[derive(Debug)]
struct Record {
    partition: i32,
    key: Option<String>,
    payload: Vec<u8>,
}

/// The binary in an empty directory (no config file: defaults), with none
/// of the caller's service configuration.
fn produce(dir: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-service"));
    cmd.current_dir(dir);
    for (name, _) in std::env::vars() {
        if name.starts_with("AUDIT__") || ["DATABASE_URL", "KAFKA_BROKERS", "RUST_LOG"].contains(&name.as_str()) {
            cmd.env_remove(name);
        }
    }
    cmd.arg("produce").args(args).output().expect("run audit-service produce")
}

fn assert_ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "produce failed: {}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Every message of `topic`, read by kcat from the beginning to the end.
/// Format: `partition:keylen:key` then the payload length as a binary
/// 32-bit integer and the payload (Avro payloads hold any byte).
fn kcat(brokers: &str, topic: &str) -> Vec<Record> {
    let out = Command::new("kcat")
        .args(["-C", "-b", brokers, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%p:%K:%k%R%s"])
        .output()
        .expect("kcat is installed (bash .ci/run installs it)");
    assert!(out.status.success(), "kcat: {}", String::from_utf8_lossy(&out.stderr));
    let mut bytes = &out.stdout[..];
    let mut records = Vec::new();
    let number = |bytes: &mut &[u8]| -> i64 {
        let colon = bytes.iter().position(|b| *b == b':').expect("a number and a colon");
        let n = std::str::from_utf8(&bytes[..colon]).unwrap().parse().unwrap();
        *bytes = &bytes[colon + 1..];
        n
    };
    while !bytes.is_empty() {
        let partition = number(&mut bytes) as i32;
        let key_len = number(&mut bytes);
        let key = (key_len >= 0).then(|| {
            let (k, rest) = bytes.split_at(key_len as usize);
            bytes = rest;
            String::from_utf8(k.to_vec()).unwrap()
        });
        let (len, rest) = bytes.split_at(4);
        let len = i32::from_be_bytes(len.try_into().unwrap());
        let (payload, rest) = rest.split_at(len.max(0) as usize);
        bytes = rest;
        records.push(Record { partition, key, payload: payload.to_vec() });
    }
    records
}

fn schema() -> Schema {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/auth_event.avsc")).unwrap();
    Schema::parse_str(&text).unwrap()
}

fn schema_fields(schema: &Schema) -> BTreeSet<String> {
    let Schema::Record(record) = schema else { panic!("auth_event.avsc is a record") };
    record.fields.iter().map(|f| f.name.clone()).collect()
}

/// Keys go with the user, so one user's events share a partition.
fn assert_keyed_by_user(records: &[Record], events: &[AuthEvent]) {
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    for (r, e) in records.iter().zip(events) {
        let key = r.key.as_deref().expect("every message has a key");
        assert_eq!(Some(key), e.user_id.as_deref().or(e.username.as_deref()));
        assert_eq!(*partition_of.entry(key).or_insert(r.partition), r.partition, "key {key} on two partitions");
    }
}

#[test]
fn json_events_read_back_with_kcat_follow_the_schema_and_raise_every_rule() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let topic = unique("produce.json");
    kafka.create_topic(&topic, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let brokers = kafka.bootstrap_servers();
    let stdout = assert_ok(&produce(
        dir.path(),
        &[
            "--brokers",
            brokers,
            "--topic",
            &topic,
            "--scenario",
            "mixed",
            "--format",
            "json",
            "--count",
            "500",
            "--rate",
            "0",
            "--attack-every",
            "40",
            "--failed-logins",
            "0.5",
            "--seed",
            "7",
        ],
    ));
    assert!(stdout.contains("produced 500 events") && stdout.contains("500 acknowledged, 0 failed"), "{stdout}");

    let records = kcat(brokers, &topic);
    assert_eq!(records.len(), 500);
    let fields = schema_fields(&schema());
    let now = chrono::Utc::now();
    let mut events = Vec::new();
    for r in &records {
        let value: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let object = value.as_object().unwrap();
        let names: BTreeSet<String> = object.keys().cloned().collect();
        assert_eq!(names, fields, "JSON field names are the schema's");
        uuid::Uuid::parse_str(object["event_id"].as_str().unwrap()).unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(object["occurred_at"].as_str().unwrap()).unwrap();
        assert!((now - at.with_timezone(&chrono::Utc)).num_seconds().abs() < 120, "event time is now: {at}");
        assert!(object["metadata"].is_object());
        events.push(decode_json(&r.payload).expect("the service's own decoder accepts it"));
    }
    assert_keyed_by_user(&records, &events);

    // The mixed scenario raises every rule of the default configuration.
    let mut ordered = events.clone();
    ordered.sort_by_key(|e| e.occurred_at);
    let mut detector = Detector::new(&DetectConfig::default()).unwrap();
    let mut transitions = Vec::new();
    for e in &ordered {
        detector.observe(e, 0, &mut transitions);
    }
    let fired: BTreeSet<&str> =
        transitions.iter().filter(|t| t.state == AlertState::Firing).map(|t| t.rule.as_str()).collect();
    assert_eq!(
        fired,
        BTreeSet::from([
            "brute_force_success",
            "ip_failed_logins",
            "ip_password_spraying",
            "system_failed_logins",
            "user_failed_logins"
        ])
    );
}

#[test]
fn avro_events_in_both_framings_decode_with_the_published_schema() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let brokers = kafka.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let schema = schema();
    let reader = GenericDatumReader::builder(&schema).build().unwrap();
    for (format, framing) in [("avro-confluent", "confluent"), ("avro-single-object", "single-object")] {
        let topic = unique("produce.avro");
        kafka.create_topic(&topic, 2).unwrap();
        let stdout = assert_ok(&produce(
            dir.path(),
            &[
                "--brokers",
                brokers,
                "--topic",
                &topic,
                "--scenario",
                "brute-force",
                "--format",
                format,
                "--schema-id",
                "42",
                "--count",
                "100",
                "--rate",
                "0",
            ],
        ));
        assert!(stdout.contains("100 acknowledged, 0 failed"), "{stdout}");
        let records = kcat(brokers, &topic);
        assert_eq!(records.len(), 100);
        let mut failures_by_user_ip: BTreeMap<(String, String), usize> = BTreeMap::new();
        for r in &records {
            let body = match framing {
                "confluent" => {
                    assert_eq!(r.payload[0], 0, "Confluent magic byte");
                    assert_eq!(u32::from_be_bytes(r.payload[1..5].try_into().unwrap()), 42, "the --schema-id");
                    &r.payload[5..]
                }
                _ => {
                    assert_eq!(r.payload[..2], [0xC3, 0x01], "single-object magic");
                    let fingerprint = u64::from_le_bytes(r.payload[2..10].try_into().unwrap());
                    assert!(
                        avro::schema_fingerprints(&schema).contains(&fingerprint),
                        "fingerprint of auth_event.avsc"
                    );
                    &r.payload[10..]
                }
            };
            let mut rest = body;
            let Value::Record(fields) = reader.read_value(&mut rest).unwrap() else { panic!("not a record") };
            assert!(rest.is_empty(), "the body is exactly one record");
            let names: BTreeSet<String> = fields.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(names, schema_fields(&schema));
            let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
            let text = |v: Value| match v {
                Value::Union(_, inner) => match *inner {
                    Value::String(s) => Some(s),
                    _ => None,
                },
                Value::String(s) => Some(s),
                Value::Uuid(u) => Some(u.to_string()),
                _ => None,
            };
            assert!(matches!(get("occurred_at"), Value::TimestampMicros(_)));
            if text(get("action")).as_deref() == Some("FAILED_AUTH_LOGIN") {
                let user = text(get("user_id")).unwrap_or_default();
                let ip = text(get("ip_address")).unwrap();
                *failures_by_user_ip.entry((user, ip)).or_default() += 1;
            }
        }
        // The scenario opens with a brute force: 12 failures, one user, one address.
        let most = failures_by_user_ip.values().max().copied().unwrap_or(0);
        assert!(most >= loadgen::BRUTE_FORCE_ATTEMPTS, "{format}: {failures_by_user_ip:?}");
    }
}

#[test]
fn the_rate_paces_the_producer() {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let topic = unique("produce.rate");
    kafka.create_topic(&topic, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let stdout = assert_ok(&produce(
        dir.path(),
        &["--brokers", kafka.bootstrap_servers(), "--topic", &topic, "--count", "60", "--rate", "100"],
    ));
    // The 60th event is due 0.59 s after the first.
    assert!(started.elapsed() >= Duration::from_millis(590), "{stdout}");
    assert!(stdout.contains("60 acknowledged"), "{stdout}");
    assert_eq!(kcat(kafka.bootstrap_servers(), &topic).len(), 60);
}

#[test]
fn the_config_files_kafka_properties_reach_the_producer() {
    // A secured cluster is configured in [kafka.properties]; here an
    // invalid value proves the property is applied.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("audit-service.toml");
    std::fs::write(&config, "[kafka.properties]\n\"security.protocol\" = \"no-such-protocol\"\n").unwrap();
    let out = produce(dir.path(), &["--config", config.to_str().unwrap(), "--brokers", "127.0.0.1:1", "--count", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("security.protocol"), "{stderr}");
}
