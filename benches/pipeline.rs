//! End-to-end ingest benchmark, one run, every figure beside its baseline:
//!
//! ```text
//! cargo bench --bench pipeline
//! AUDIT_BENCH_EVENTS=200000 AUDIT_BENCH_METHODS=optimistic_copy cargo bench --bench pipeline
//! ```
//!
//! 1. fills a topic of the embedded Kafka cluster with N events (default
//!    1,000,000; the load generator's realistic mix, JSON);
//! 2. (a) runs the `audit-service` binary (release build) on it with each
//!    insert method, on a fresh database each, and measures events/s from
//!    "running" to "every offset stored", its CPU seconds and peak RSS;
//! 3. (b) the ceiling: one plain binary COPY of the same rows into the same
//!    schema on a fresh database;
//! 4. prints the table for BENCHMARKS.md.

use std::time::{Duration, Instant};

use audit_service::config::Config;
use audit_service::event::decode::Decoder;
use audit_service::event::registry::{RegistryConfig, SchemaRegistry};
use audit_service::event::{AuthEvent, ValidationLimits};
use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::loadgen::{self, EventGenerator, WireFormat};
use audit_service::store::copy_format::{CopyEncoder, RowRef};
use audit_service::store::queries;
use futures::SinkExt;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct FreshDb {
    name: String,
    url: String,
}

impl FreshDb {
    async fn create(label: &str) -> FreshDb {
        let name = format!("audit_bench_{label}_{}", std::process::id());
        let admin = connect(ADMIN_URL).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        FreshDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable"), name }
    }

    async fn drop_db(self) {
        let admin = connect(ADMIN_URL).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await.unwrap();
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn config_for(db: &FreshDb) -> Config {
    Config::from_toml_with_env(&format!("[database]\nurl = \"{}\"\n", db.url), Vec::new()).unwrap()
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

struct RunResult {
    events_per_s: f64,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

/// (a) the service binary draining the topic into a fresh database.
async fn run_service(kafka: &EmbeddedKafka, topic: &str, n: u64, method: &str) -> RunResult {
    let db = FreshDb::create(method).await;
    let log_dir = std::env::temp_dir();
    let log_path = log_dir.join(format!("audit-bench-{method}-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let group = format!("bench-{method}-{}", std::process::id());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_audit-service"))
        .args(["--log-format", "json", "run"])
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", kafka.bootstrap_servers())
        .env("AUDIT__KAFKA__EVENTS_TOPIC", topic)
        .env("AUDIT__KAFKA__GROUP_ID", &group)
        .env("AUDIT__INGEST__INSERT_METHOD", method)
        .env("AUDIT__HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", std::env::var("AUDIT_BENCH_LOG").unwrap_or_else(|_| "warn,audit_service::service=info".into()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn the service");
    let pid = child.id();
    // Start the clock when the service reports it is running (migrations done).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("audit-service running") {
        assert!(Instant::now() < deadline, "service did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let cpu_at_start = cpu_seconds(pid);
    let client = connect(&db.url).await;
    loop {
        let stored: i64 = client
            .query_one("SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets", &[])
            .await
            .unwrap()
            .get(0);
        if stored as u64 >= n {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "ingest did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let result = RunResult {
        events_per_s: n as f64 / seconds,
        seconds,
        cpu_seconds: cpu_seconds(pid) - cpu_at_start,
        peak_rss_mib: peak_rss_mib(pid),
    };
    let rows: i64 = client.query_one("SELECT count(*) FROM audit_logs", &[]).await.unwrap().get(0);
    assert_eq!(rows as u64, n, "every event stored");
    // SAFETY: signalling our own child.
    unsafe { kill(pid as i32, 15) };
    let _ = child.wait();
    drop(client);
    db.drop_db().await;
    if std::env::var("AUDIT_BENCH_LOG").is_err() {
        let _ = std::fs::remove_file(&log_path);
    }
    result
}

/// (b) the ceiling: one binary COPY of the same rows, one transaction.
async fn copy_ceiling(events: &[AuthEvent]) -> (f64, f64) {
    let db = FreshDb::create("copy").await;
    audit_service::service::prepare_database(&config_for(&db)).await.unwrap();
    let mut encoder = CopyEncoder::with_capacity(events.len() * 400);
    let now = chrono::Utc::now().timestamp_micros();
    for (i, e) in events.iter().enumerate() {
        encoder.push(&RowRef { event: e, received_at: now, partition: (i % 16) as i32, offset: i as i64 });
    }
    let bytes = encoder.finish().freeze();
    let mut client = connect(&db.url).await;
    let started = Instant::now();
    let tx = client.transaction().await.unwrap();
    let sink = tx.copy_in::<_, bytes::Bytes>(queries::COPY_AUDIT_LOGS).await.unwrap();
    let mut sink = std::pin::pin!(sink);
    for chunk in bytes.chunks(1 << 20) {
        sink.send(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let n = sink.as_mut().finish().await.unwrap();
    tx.commit().await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(n as usize, events.len());
    drop(client);
    db.drop_db().await;
    (events.len() as f64 / seconds, seconds)
}

/// (k) how fast a bare consumer with the service's settings reads the
/// topic: the Kafka side of the ceiling.
fn raw_consume(kafka: &EmbeddedKafka, topic: &str, n: u64) -> f64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut cfg = audit_service::config::KafkaConfig::default();
    cfg.brokers = kafka.bootstrap_servers().to_owned();
    cfg.group_id = format!("bench-raw-{}", std::process::id());
    let consumer: BaseConsumer = audit_service::kafka::consumer_config(&cfg).create().unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = 0u64;
    let mut started = None;
    while seen < n {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            started.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    n as f64 / started.unwrap().elapsed().as_secs_f64()
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

fn main() {
    // `cargo test --benches` runs bench targets with --bench absent; skip
    // the heavy run there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pipeline benchmark: run with `cargo bench --bench pipeline`");
        return;
    }
    let n: u64 = env_or("AUDIT_BENCH_EVENTS", 1_000_000);
    let partitions: i32 = env_or("AUDIT_BENCH_PARTITIONS", 16);
    let methods: Vec<String> = std::env::var("AUDIT_BENCH_METHODS")
        .unwrap_or_else(|_| "optimistic_copy,staged,unnest".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    let kafka = EmbeddedKafka::start(1).unwrap();
    let topic = format!("bench.events.{}", std::process::id());
    kafka.create_topic(&topic, partitions).unwrap();

    // The realistic mix, timed over the last hour (so rows land in the
    // daily partitions, as in production).
    let mut generator = EventGenerator::new(42, 100_000);
    let now = chrono::Utc::now().timestamp_micros();
    let events: Vec<AuthEvent> =
        (0..n).map(|i| generator.next_event(now - 3_600_000_000 + (i as i64 * 3_600_000_000 / n as i64))).collect();
    let payloads: Vec<(Vec<u8>, Vec<u8>)> = events
        .iter()
        .map(|e| (e.user_id.clone().unwrap_or_default().into_bytes(), loadgen::encode(e, WireFormat::Json)))
        .collect();
    let payload_bytes: usize = payloads.iter().map(|(_, p)| p.len()).sum();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("compression.type", "zstd")
        .set("linger.ms", "50")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .unwrap();
    let t = Instant::now();
    loadgen::produce_all(
        &producer,
        &topic,
        payloads.iter().map(|(k, p)| (Some(k.as_slice()), p.as_slice())),
        Duration::from_secs(300),
    )
    .unwrap();
    for p in 0..partitions {
        let (low, _) = producer.client().fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
        assert_eq!(low, 0, "the embedded broker dropped data; raise AUDIT_BENCH_PARTITIONS");
    }
    eprintln!("produced {n} events ({:.0} MB of JSON) in {:.1}s", payload_bytes as f64 / 1e6, t.elapsed().as_secs_f64());

    // Decode once in process (also checks the payloads are valid).
    let registry = SchemaRegistry::from_config(&RegistryConfig::default()).unwrap();
    let decoder = Decoder::new(ValidationLimits::default(), std::sync::Arc::new(registry));
    let decoded: Vec<AuthEvent> =
        payloads.iter().map(|(_, p)| decoder.decode(p, chrono::Utc::now().timestamp_micros()).unwrap().0).collect();

    let kafka_read = raw_consume(&kafka, &topic, n);
    eprintln!("(k) bare consumer: {kafka_read:.0} messages/s");
    runtime.block_on(async {
        let (ceiling, ceiling_s) = copy_ceiling(&decoded).await;
        eprintln!("(b) COPY ceiling: {ceiling:.0} rows/s ({ceiling_s:.2}s)");
        let mut results = Vec::new();
        for method in &methods {
            let r = run_service(&kafka, &topic, n, method).await;
            eprintln!(
                "(a) audit-service [{method}]: {:.0} events/s ({:.2}s, {:.1} CPU s, peak RSS {:.0} MiB)",
                r.events_per_s, r.seconds, r.cpu_seconds, r.peak_rss_mib
            );
            results.push((method.clone(), r));
        }
        println!();
        println!("| pipeline ({n} events, {partitions} partitions) | events/s | seconds | ratio to COPY ceiling | CPU s | peak RSS MiB |");
        println!("|---|---|---|---|---|---|");
        println!("| (b) plain binary COPY, one transaction (ceiling) | {ceiling:.0} | {ceiling_s:.2} | 1.00 | | |");
        for (method, r) in &results {
            println!(
                "| (a) audit-service, insert_method = {method} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} |",
                r.events_per_s,
                r.seconds,
                r.events_per_s / ceiling,
                r.cpu_seconds,
                r.peak_rss_mib
            );
        }
    });
}
