//! Shared test harness: a fresh PostgreSQL database per test, an embedded
//! Kafka cluster, unique topic and group names, producers, and polling with
//! deadlines (never sleeps for ordering).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use audit_service::config::Config;
use audit_service::event::AuthEvent;
use audit_service::kafka::embedded::EmbeddedKafka;
use audit_service::loadgen::{self, EventGenerator, WireFormat};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, Producer};

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The Confluent schema id the tests map to schemas/auth_event.avsc.
pub const TEST_SCHEMA_ID: u32 = 7;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, safe for databases and topics.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// A database created for one test and dropped (forcibly) afterwards.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = unique("audit_test");
        let admin = pg_connect(PG_ADMIN_URL).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        TestDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&self.url).await
    }

    /// A single number; 0 while the queried table or column does not exist
    /// yet (the service under test has not finished migrating).
    pub async fn count(&self, sql: &str) -> i64 {
        use tokio_postgres::error::SqlState;
        match self.client().await.query_one(sql, &[]).await {
            Ok(row) => row.get(0),
            Err(e) if [Some(&SqlState::UNDEFINED_TABLE), Some(&SqlState::UNDEFINED_COLUMN)].contains(&e.code()) => 0,
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    /// Messages the service has stored the offsets of, over all partitions.
    pub async fn stored_offsets(&self) -> i64 {
        self.count("SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets").await
    }

    /// Waits until the stored offsets cover `messages` messages.
    pub async fn wait_for_offsets(&self, messages: i64, timeout: Duration, what: &str) {
        eventually(timeout, what, || async { (self.stored_offsets().await == messages).then_some(()) }).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime: do the async work on a fresh thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let admin = pg_connect(PG_ADMIN_URL).await;
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
            });
        })
        .join();
    }
}

/// Topics and group unique to one test on a shared or own cluster.
pub struct Names {
    pub events: String,
    pub dlq: String,
    pub alerts: String,
    pub group: String,
}

impl Names {
    pub fn new() -> Names {
        let base = unique("t");
        Names {
            events: format!("{base}.events"),
            dlq: format!("{base}.dlq"),
            alerts: format!("{base}.alerts"),
            group: format!("{base}.group"),
        }
    }

    pub fn create(&self, kafka: &EmbeddedKafka, partitions: i32) {
        kafka.create_topic(&self.events, partitions).unwrap();
        kafka.create_topic(&self.dlq, 1).unwrap();
        kafka.create_topic(&self.alerts, 1).unwrap();
    }
}

/// A mock cluster (one broker) with this test's own topics, `partitions`
/// each.
pub fn cluster(partitions: i32) -> (EmbeddedKafka, Names) {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let names = Names::new();
    names.create(&kafka, partitions);
    (kafka, names)
}

/// One test's own world: a mock cluster with the test's topics, a fresh
/// database (dropped afterwards) and a folder for the logs of the service
/// processes the test starts.
pub struct World {
    pub kafka: EmbeddedKafka,
    pub names: Names,
    pub db: TestDb,
    pub logs: tempfile::TempDir,
}

/// Runs `test` in a fresh [`World`] whose events topic has `partitions`
/// partitions, on a two-thread runtime.
pub fn with_world(partitions: i32, test: impl AsyncFnOnce(&World)) {
    let (kafka, names) = cluster(partitions);
    rt().block_on(async {
        let world = World { kafka, names, db: TestDb::create().await, logs: tempfile::tempdir().unwrap() };
        test(&world).await;
    });
}

/// A service config pointing at the test's database, cluster and topics.
pub fn service_config(db: &TestDb, kafka: &EmbeddedKafka, names: &Names) -> Config {
    let schema_path = format!("{}/schemas/auth_event.avsc", env!("CARGO_MANIFEST_DIR"));
    let toml = format!(
        r#"
[kafka]
brokers = "{brokers}"
events_topic = "{events}"
dlq_topic = "{dlq}"
alerts_topic = "{alerts}"
group_id = "{group}"
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"statistics.interval.ms" = "1000"
[database]
url = "{db}"
[ingest]
batch_max_rows = 2000
batch_max_age = "50ms"
retry_initial_backoff = "50ms"
retry_max_backoff = "1s"
[schema_registry]
schema_dirs = ["{dir}/schemas"]
[schema_registry.local_schemas]
"{id}" = "{schema_path}"
[http]
listen = "127.0.0.1:0"
"#,
        brokers = kafka.bootstrap_servers(),
        events = names.events,
        dlq = names.dlq,
        alerts = names.alerts,
        group = names.group,
        db = db.url,
        dir = env!("CARGO_MANIFEST_DIR"),
        id = TEST_SCHEMA_ID,
    );
    Config::from_toml_with_env(&toml, Vec::new()).unwrap()
}

/// The same settings as environment variables, for the binary as a child.
pub fn service_env(db: &TestDb, kafka: &EmbeddedKafka, names: &Names) -> Vec<(String, String)> {
    let schema_path = format!("{}/schemas/auth_event.avsc", env!("CARGO_MANIFEST_DIR"));
    vec![
        ("KAFKA_BROKERS".into(), kafka.bootstrap_servers().to_owned()),
        ("DATABASE_URL".into(), db.url.clone()),
        ("AUDIT__KAFKA__EVENTS_TOPIC".into(), names.events.clone()),
        ("AUDIT__KAFKA__DLQ_TOPIC".into(), names.dlq.clone()),
        ("AUDIT__KAFKA__ALERTS_TOPIC".into(), names.alerts.clone()),
        ("AUDIT__KAFKA__GROUP_ID".into(), names.group.clone()),
        ("AUDIT__KAFKA__CONSUMER_PROPERTIES__SESSION.TIMEOUT.MS".into(), "6000".into()),
        ("AUDIT__KAFKA__CONSUMER_PROPERTIES__HEARTBEAT.INTERVAL.MS".into(), "500".into()),
        ("AUDIT__KAFKA__CONSUMER_PROPERTIES__STATISTICS.INTERVAL.MS".into(), "1000".into()),
        ("AUDIT__INGEST__BATCH_MAX_ROWS".into(), "2000".into()),
        ("AUDIT__INGEST__BATCH_MAX_AGE".into(), "50ms".into()),
        ("AUDIT__INGEST__RETRY_INITIAL_BACKOFF".into(), "50ms".into()),
        ("AUDIT__INGEST__RETRY_MAX_BACKOFF".into(), "1s".into()),
        (format!("AUDIT__SCHEMA_REGISTRY__LOCAL_SCHEMAS__{TEST_SCHEMA_ID}"), schema_path),
        ("AUDIT__SCHEMA_REGISTRY__SCHEMA_DIRS".into(), format!("[\"{}/schemas\"]", env!("CARGO_MANIFEST_DIR"))),
        ("AUDIT__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
        ("RUST_LOG".into(), "info".into()),
    ]
}

pub fn producer(kafka: &EmbeddedKafka) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("compression.type", "zstd")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

/// Produces raw payloads (the partitioner hashes the key), waits until all
/// are acknowledged, and checks the embedded broker kept them all (it drops
/// the oldest data beyond 5 MiB per partition).
pub fn produce_raw(producer: &BaseProducer, topic: &str, messages: &[(Option<Vec<u8>>, Vec<u8>)]) {
    loadgen::produce_all(
        producer,
        topic,
        messages.iter().map(|(k, p)| (k.as_deref(), p.as_slice())),
        Duration::from_secs(120),
    )
    .expect("produce");
    let metadata = producer.client().fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    for p in metadata.topics()[0].partitions() {
        let (low, _) = producer.client().fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
        assert_eq!(low, 0, "the mock broker dropped data of {topic}[{}]: use more partitions", p.id());
    }
}

/// Produces events in the given formats (cycled), keyed by user id.
pub fn produce_events(producer: &BaseProducer, topic: &str, events: &[AuthEvent], formats: &[WireFormat]) {
    let messages: Vec<(Option<Vec<u8>>, Vec<u8>)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let key = e.user_id.clone().map(String::into_bytes);
            (key, loadgen::encode(e, formats[i % formats.len()]))
        })
        .collect();
    produce_raw(producer, topic, &messages);
}

pub const ALL_FORMATS: &[WireFormat] =
    &[WireFormat::Json, WireFormat::AvroConfluent(TEST_SCHEMA_ID), WireFormat::AvroSingleObject];

/// `n` ordinary events with times spread over the last ten minutes.
pub fn events(seed: u64, n: usize) -> Vec<AuthEvent> {
    let mut generator = EventGenerator::new(seed, 5000);
    let now = chrono::Utc::now().timestamp_micros();
    (0..n).map(|i| generator.next_event(now - 600_000_000 + (i as i64 * 600_000_000 / n.max(1) as i64))).collect()
}

/// Polls `check` until it returns Some or the deadline passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A dead-letter message as read back from the topic.
#[derive(Debug, Clone)]
pub struct DlqMessage {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Reads `expected` messages from a topic (from the beginning), with a
/// deadline.
pub fn read_topic(kafka: &EmbeddedKafka, topic: &str, expected: usize, timeout: Duration) -> Vec<DlqMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(DlqMessage {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Reads `/metrics` from a running service.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of one sample line (`name{labels} value`) in a scrape, if any.
pub fn metric_value(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The service binary as a child process, with its output in a log file
/// (printed when the test fails).
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl ServiceProcess {
    pub fn spawn(env: &[(String, String)], log_dir: &std::path::Path, run: usize) -> ServiceProcess {
        let log = log_dir.join(format!("service-{run}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_audit-service"))
            .args(["--log-format", "json", "run"])
            .env_clear()
            .envs(env.iter().cloned())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn audit-service");
        ServiceProcess { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (waits at most `timeout`).
    pub fn sigterm(&mut self, timeout: Duration) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc_kill(self.pid(), 15) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.child.kill().unwrap();
                panic!("service did not exit within {timeout:?} of SIGTERM; log: {}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The HTTP address the service logged at start.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            v.get("http_addr")?.as_str()?.parse().ok()
        })
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// An event with the fields detector and activity tests vary; the rest is
/// fixed (username = user, no session). Adjust fields on the result.
pub fn auth_event(action: &str, user: &str, ip: &str, at: i64) -> AuthEvent {
    AuthEvent {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: at,
        action: action.into(),
        user_id: Some(user.into()),
        username: Some(user.into()),
        ip_address: Some(ip.parse().expect("a valid IP in the test")),
        user_agent: Some("test-agent/1.0".into()),
        session_id: None,
        request_id: None,
        metadata: vec![],
    }
}

/// Produces JSON events to one partition (the test decides where they go),
/// keyed by user id, and waits until all are acknowledged.
pub fn produce_to(producer: &BaseProducer, topic: &str, partition: i32, events: &[AuthEvent]) {
    for e in events {
        let payload = loadgen::encode(e, WireFormat::Json);
        let key = e.user_id.clone().unwrap_or_default();
        producer
            .send(rdkafka::producer::BaseRecord::to(topic).partition(partition).key(&key).payload(&payload))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The events-topic partitions an in-process service owns, sorted.
pub fn assigned(s: &audit_service::service::RunningService) -> Vec<i32> {
    let mut p = s.status.snapshot().assigned_partitions;
    p.sort();
    p
}

/// Configures `token` as a static admin token of `config` (name `test`).
pub fn with_admin_token(config: &mut Config, token: &str) {
    use sha2::Digest;
    config.api.tokens = vec![audit_service::config::StaticTokenConfig {
        name: "test".into(),
        sha256: format!("{:x}", sha2::Sha256::digest(token.as_bytes())),
    }];
}
