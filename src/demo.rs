//! `audit-service demo`: the whole service on one machine with nothing but
//! PostgreSQL. An embedded Kafka cluster (librdkafka's mock cluster, the real
//! protocol over TCP) holds the topics; the service runs in-process against
//! it (pipeline, detectors, admin API, metrics); synthetic traffic plays
//! ordinary logins plus one of each attack the rules exist for; every alert
//! is read back from the alerts topic by an ordinary consumer and printed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::alerts::view::AlertView;
use crate::config::{Config, StaticTokenConfig};
use crate::kafka::embedded::{EmbeddedError, EmbeddedKafka};
use crate::loadgen::{Attack, DeliveryCounter, Traffic, WireFormat, send_event};
use crate::service::{self, ServiceError};
use crate::store::{self, StoreError, queries};

/// The demo's database unless `DATABASE_URL` says otherwise: never the
/// service's own `audit` database.
pub const DEMO_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/audit_demo";

const EVENTS_PARTITIONS: i32 = 6;
const ALERTS_PARTITIONS: i32 = 3;
/// Failed logins in the ordinary traffic, ‰: low enough that only the
/// attacks cross a threshold.
const ORDINARY_FAILURES_PER_MILLE: u64 = 5;
/// The attacks repeat in cycles of at most this long.
const MAX_CYCLE: Duration = Duration::from_secs(60);
/// Where in a cycle each attack starts (fractions of the cycle).
const ATTACK_AT: [f64; 4] = [0.15, 0.30, 0.45, 0.60];
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// How long the end of the demo waits for the pipeline to store what was
/// produced, and for the last alerts to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long traffic plays.
    pub duration: Duration,
    /// The HTTP listener (port 0: any free port).
    pub listen: SocketAddr,
    pub database_url: String,
    /// Ordinary events per second.
    pub rate: u64,
    /// Size of the ordinary user population.
    pub users: u64,
    /// Seed of the synthetic traffic (None: a new one each run).
    pub seed: Option<u64>,
    /// After the summary, keep the service up until interrupted.
    pub keep_running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "refusing to write synthetic events to database `{0}`: the demo only uses a database whose name contains \
         `demo` (default: audit_demo), so that it never touches a real audit log; unset DATABASE_URL or point it at one"
    )]
    NotADemoDatabase(String),
    #[error("database URL: {0}")]
    DatabaseUrl(String),
    #[error(
        "PostgreSQL does not answer for {url}: {message}\n  Start PostgreSQL on 127.0.0.1:5432 or set DATABASE_URL \
         to a server you can use (the demo creates its database if missing)."
    )]
    NoDatabase { url: String, message: String },
    #[error("preparing the demo database: {0}")]
    Database(#[from] StoreError),
    #[error("embedded Kafka: {0}")]
    Embedded(#[from] EmbeddedError),
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error("HTTP listener on {addr}: {source} (use --listen 127.0.0.1:0 for any free port)")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("starting the service: {0}")]
    Service(ServiceError),
    #[error("the traffic generator failed: {0}")]
    Traffic(String),
}

impl From<ServiceError> for DemoError {
    fn from(e: ServiceError) -> DemoError {
        match e {
            ServiceError::Http { addr, source } => DemoError::Listen { addr, source },
            other => DemoError::Service(other),
        }
    }
}

/// Runs the demo until `opts.duration` has passed or `stop` is cancelled
/// (Ctrl-C), then drains, prints the summary and stops the service.
pub async fn run(mut config: Config, opts: DemoOptions, stop: CancellationToken) -> Result<(), DemoError> {
    let database = database_name(&opts.database_url)?;
    if !database.contains("demo") {
        return Err(DemoError::NotADemoDatabase(database));
    }
    let seed = opts.seed.unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64);
    let token = uuid::Uuid::new_v4().simple().to_string();

    let kafka = EmbeddedKafka::start(1)?;
    configure(&mut config, &opts, &kafka, seed, &token);
    let k = &config.kafka;
    kafka.create_topic(&k.events_topic, EVENTS_PARTITIONS)?;
    kafka.create_topic(&k.dlq_topic, 1)?;
    kafka.create_topic(&k.alerts_topic, ALERTS_PARTITIONS)?;

    let shown_url = config.redacted().database.url;
    service::prepare_database(&config).await.map_err(|e| match e {
        StoreError::Connect(message) => DemoError::NoDatabase { url: shown_url.clone(), message },
        other => DemoError::Database(other),
    })?;
    let pool = store::connect_pool(&config.database, 2)?;

    let started_at = Utc::now();
    let clock = Instant::now();
    let cancel = CancellationToken::new();
    let running = service::start(&config, cancel.clone()).await?;
    let base = format!("http://{}", running.http_addr);

    println!("audit-service demo");
    println!(
        "  Kafka (embedded)  {}  topics {}, {}, {}",
        kafka.bootstrap_servers(),
        k.events_topic,
        k.dlq_topic,
        k.alerts_topic
    );
    println!("  PostgreSQL        {shown_url}");
    println!("  API               {base}/api/v1/audit/health   (OpenAPI: {base}/api/v1/openapi.json)");
    println!("  Metrics           {base}/metrics");
    println!("  Admin token       {token}");
    println!("  Try               curl -H \"Authorization: Bearer {token}\" {base}/api/v1/audit/security");
    println!(
        "Playing {}s of traffic: {} ordinary events/s from {} users (JSON and Avro), plus a brute force, password \
         spraying, a brute force followed by success and a system-wide spike. Ctrl-C stops.",
        opts.duration.as_secs(),
        opts.rate,
        opts.users
    );

    let alerts = AlertReader::start(kafka.bootstrap_servers(), &k.alerts_topic, ALERTS_PARTITIONS)?;
    let producer: BaseProducer<DeliveryCounter> =
        crate::kafka::producer_config(k).create_with_context(DeliveryCounter::default())?;
    let producer = Arc::new(producer);
    let traffic_stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (producer, stop, produced, topic) =
            (producer.clone(), traffic_stop.clone(), produced.clone(), k.events_topic.clone());
        let plan = TrafficPlan { duration: opts.duration, rate: opts.rate, users: opts.users, seed };
        tokio::task::spawn_blocking(move || play(&producer, &topic, &plan, clock, &stop, &produced))
    };

    // Progress until the traffic ends or Ctrl-C.
    let mut traffic = std::pin::pin!(traffic);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let played = loop {
        tokio::select! {
            done = &mut traffic => break done,
            _ = ticker.tick() => {
                let stored = count_since(&pool, queries::DEMO_STORED_SINCE, started_at).await;
                println!(
                    "[{}] events: {} produced, {} stored | alerts: {}",
                    elapsed(clock),
                    produced.load(Ordering::Relaxed),
                    stored.map_or("?".into(), |n| n.to_string()),
                    alerts.total()
                );
            }
            _ = stop.cancelled() => {
                println!("[{}] interrupted: stopping the traffic", elapsed(clock));
                traffic_stop.store(true, Ordering::Relaxed);
                break (&mut traffic).await;
            }
        }
    };
    if let Err(e) = played.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
        running.stop();
        running.wait().await;
        return Err(DemoError::Traffic(e));
    }
    let acknowledged = producer.context().acknowledged();

    // Everything the broker acknowledged is consumed (stored or
    // dead-lettered), then every alert the detectors published is read.
    // Also after Ctrl-C: a second one skips this (see main.rs).
    println!("[{}] traffic done; waiting for the pipeline to store the last events", elapsed(clock));
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while Instant::now() < deadline {
        let consumed = count_group(&pool, &config.kafka.group_id, &config.kafka.events_topic).await.unwrap_or(0);
        if consumed >= acknowledged as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while Instant::now() < deadline {
        let published = count_since(&pool, queries::DEMO_PUBLISHED_ALERTS_SINCE, started_at).await.unwrap_or(0);
        if alerts.individual() >= published as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let summary = Summary {
        seconds: clock.elapsed().as_secs(),
        produced: produced.load(Ordering::Relaxed),
        acknowledged,
        stored: count_since(&pool, queries::DEMO_STORED_SINCE, started_at).await,
        stored_total: count_since(&pool, queries::DEMO_STORED_TOTAL, started_at).await,
        dead_lettered: count_since(&pool, queries::DEMO_DEAD_LETTERED_SINCE, started_at).await,
        rules: config.detect.rules.iter().filter(|r| r.enabled).map(|r| r.id.clone()).collect(),
        alerts: alerts.by_rule(),
    };
    summary.print(&base, &token, &shown_url, &config.kafka.alerts_topic);

    if opts.keep_running && !stop.is_cancelled() {
        println!("The service keeps running (--keep-running); Ctrl-C stops it.");
        stop.cancelled().await;
    }
    running.stop();
    running.wait().await;
    alerts.stop();
    println!("demo stopped");
    Ok(())
}

fn database_name(url: &str) -> Result<String, DemoError> {
    let parsed: tokio_postgres::Config =
        url.parse().map_err(|e: tokio_postgres::Error| DemoError::DatabaseUrl(e.to_string()))?;
    // libpq defaults the database name to the user name.
    Ok(parsed.get_dbname().or(parsed.get_user()).unwrap_or_default().to_owned())
}

/// The configuration the in-process service runs with: the embedded
/// cluster (plaintext, so the file's security properties do not apply), a
/// consumer group of its own per run (offsets stored by earlier runs belong
/// to earlier clusters), the demo database and listener, and the demo's
/// admin token.
fn configure(config: &mut Config, opts: &DemoOptions, kafka: &EmbeddedKafka, seed: u64, token: &str) {
    let k = &mut config.kafka;
    k.brokers = kafka.bootstrap_servers().to_owned();
    k.properties.clear();
    k.producer_properties.clear();
    k.consumer_properties.clear();
    // Fresh lag figures for the health endpoint.
    k.consumer_properties.insert("statistics.interval.ms".into(), "1000".into());
    k.group_id = format!("audit-demo-{seed:x}");
    k.client_id = "audit-service-demo".into();
    config.database.url = opts.database_url.clone();
    config.http.listen = opts.listen;
    let sha256: String = Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    config.api.tokens.retain(|t| t.name != "demo");
    config.api.tokens.push(StaticTokenConfig { name: "demo".into(), sha256 });
    // A weak ADMIN_TOKEN in the environment would stop the API from
    // starting; the demo prints its own token instead.
    config.api.admin_token_env = String::new();
    // Deleting data is never part of a demo.
    config.retention.scheduled = false;
}

struct TrafficPlan {
    duration: Duration,
    rate: u64,
    users: u64,
    seed: u64,
}

impl TrafficPlan {
    /// Attacks in cycles of at most a minute, each at its place in the
    /// cycle, as long as the demo runs: (when, attack), in order.
    fn schedule(&self) -> Vec<(Duration, Attack)> {
        let cycle = self.duration.clamp(Duration::from_secs(4), MAX_CYCLE);
        let mut out = Vec::new();
        let mut start = Duration::ZERO;
        while start < self.duration {
            for (frac, attack) in ATTACK_AT.iter().zip(Attack::ALL) {
                let at = start + cycle.mul_f64(*frac);
                if at < self.duration {
                    out.push((at, attack));
                }
            }
            start += cycle;
        }
        out
    }
}

/// Plays the ordinary traffic at `plan.rate`, each attack at its time as a
/// burst, until the duration has passed or `stop`. Events alternate between
/// JSON and Avro single-object encoding.
fn play(
    producer: &BaseProducer<DeliveryCounter>,
    topic: &str,
    plan: &TrafficPlan,
    clock: Instant,
    stop: &AtomicBool,
    produced: &AtomicU64,
) -> Result<(), KafkaError> {
    let mut traffic = Traffic::new(plan.seed, plan.users, Some(ORDINARY_FAILURES_PER_MILLE));
    let mut schedule = plan.schedule().into_iter().peekable();
    let mut sent = 0u64;
    let mut ordinary = 0u64;
    let format = |n: u64| if n.is_multiple_of(2) { WireFormat::Json } else { WireFormat::AvroSingleObject };
    while clock.elapsed() < plan.duration && !stop.load(Ordering::Relaxed) {
        let now = Utc::now().timestamp_micros();
        if let Some((_, attack)) = schedule.next_if(|(at, _)| clock.elapsed() >= *at) {
            let episode = traffic.attack(attack, now);
            println!("[{}] >>> {}: {}", elapsed(clock), attack.name(), episode.summary);
            for e in &episode.events {
                if !send_event(producer, topic, e, format(sent), stop)? {
                    break;
                }
                sent += 1;
            }
        } else {
            let due = clock + Duration::from_secs_f64(ordinary as f64 / plan.rate.max(1) as f64);
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                producer.poll(wait.min(Duration::from_millis(50)));
                continue;
            }
            let e = traffic.ordinary(now);
            if !send_event(producer, topic, &e, format(sent), stop)? {
                break;
            }
            sent += 1;
            ordinary += 1;
        }
        produced.store(sent, Ordering::Relaxed);
        producer.poll(Duration::ZERO);
    }
    produced.store(sent, Ordering::Relaxed);
    producer.flush(Duration::from_secs(10))
}

fn elapsed(clock: Instant) -> String {
    let s = clock.elapsed().as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

// ---------------------------------------------------------------------------
// The alerts topic, read like any alert consumer would
// ---------------------------------------------------------------------------

/// Per rule: firing, escalated, resolved, and withheld (summarised by the
/// storm limiter).
type RuleCounts = BTreeMap<String, [u64; 4]>;

struct AlertReader {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<RuleCounts>>,
    thread: std::thread::JoinHandle<()>,
}

impl AlertReader {
    /// Reads every partition of `topic` from the beginning on a thread of
    /// its own, printing each alert as it arrives.
    fn start(brokers: &str, topic: &str, partitions: i32) -> Result<AlertReader, KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "audit-demo-alert-reader")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(RuleCounts::new()));
        let thread = {
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::Builder::new()
                .name("demo-alerts".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else { continue };
                        match AlertView::decode(message.payload().unwrap_or_default()) {
                            Ok(alert) => {
                                println!("{}", alert.line(false));
                                let slot = match (alert.is_aggregate(), alert.state.as_str()) {
                                    (true, _) => 3,
                                    (false, "firing") => 0,
                                    (false, "escalated") => 1,
                                    _ => 2,
                                };
                                let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
                                counts.entry(alert.rule.clone()).or_default()[slot] += 1;
                            }
                            Err(e) => println!("ALERT (cannot decode: {e})"),
                        }
                    }
                })
                .expect("spawn the alert reader thread")
        };
        Ok(AlertReader { stop, counts, thread })
    }

    fn by_rule(&self) -> RuleCounts {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn total(&self) -> u64 {
        self.by_rule().values().map(|c| c.iter().sum::<u64>()).sum()
    }

    /// Alerts read, storm summaries left out.
    fn individual(&self) -> u64 {
        self.by_rule().values().map(|c| c[0] + c[1] + c[2]).sum()
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

// ---------------------------------------------------------------------------
// Counting in PostgreSQL
// ---------------------------------------------------------------------------

async fn count_since(pool: &Pool, sql: &str, since: DateTime<Utc>) -> Option<i64> {
    let client = pool.get().await.ok()?;
    client.query_one(sql, &[&since]).await.ok().map(|row| row.get(0))
}

async fn count_group(pool: &Pool, group: &str, topic: &str) -> Option<i64> {
    let client = pool.get().await.ok()?;
    client.query_one(queries::CONSUMED_BY_GROUP, &[&group, &topic]).await.ok().map(|row| row.get(0))
}

struct Summary {
    seconds: u64,
    produced: u64,
    acknowledged: u64,
    stored: Option<i64>,
    stored_total: Option<i64>,
    dead_lettered: Option<i64>,
    rules: Vec<String>,
    alerts: RuleCounts,
}

impl Summary {
    fn print(&self, base: &str, token: &str, database: &str, alerts_topic: &str) {
        let n = |v: Option<i64>| v.map_or("?".into(), |v| v.to_string());
        println!();
        println!("== Summary ({}s)", self.seconds);
        println!(
            "Events: {} produced ({} acknowledged by Kafka), {} stored in PostgreSQL by this run \
             (audit_logs holds {} in all), {} dead-lettered",
            self.produced,
            self.acknowledged,
            n(self.stored),
            n(self.stored_total),
            n(self.dead_lettered)
        );
        println!("Alerts read from the topic {alerts_topic}, by rule:");
        println!("  {:<24} {:>7} {:>10} {:>9} {:>9}", "rule", "firing", "escalated", "resolved", "withheld");
        let mut rules = self.rules.clone();
        rules.extend(self.alerts.keys().filter(|r| !self.rules.contains(r)).cloned());
        for rule in rules {
            let c = self.alerts.get(&rule).copied().unwrap_or_default();
            println!("  {rule:<24} {:>7} {:>10} {:>9} {:>9}", c[0], c[1], c[2], c[3]);
        }
        println!("API      {base}/api/v1/audit/health   (OpenAPI: {base}/api/v1/openapi.json)");
        println!("Metrics  {base}/metrics");
        println!("Try      curl -H \"Authorization: Bearer {token}\" '{base}/api/v1/audit/alerts?limit=20'");
        println!("         (the service stops with the demo; --keep-running keeps it up after the summary)");
        println!("SQL      psql '{database}' -c 'SELECT action, count(*) FROM audit_logs GROUP BY action'");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_demo_databases_are_used() {
        assert_eq!(database_name(DEMO_DATABASE_URL).unwrap(), "audit_demo");
        assert_eq!(database_name("postgres://postgres@127.0.0.1:5432/audit").unwrap(), "audit");
        assert_eq!(database_name("host=localhost user=demo_user").unwrap(), "demo_user");
    }

    #[test]
    fn every_attack_plays_in_a_short_demo_and_again_in_each_minute_of_a_long_one() {
        let plan = |secs| TrafficPlan { duration: Duration::from_secs(secs), rate: 30, users: 2000, seed: 1 };
        let short = plan(20).schedule();
        assert_eq!(short.iter().map(|(_, a)| *a).collect::<Vec<_>>(), Attack::ALL);
        assert_eq!(short[0].0, Duration::from_secs(3));
        assert_eq!(short[3].0, Duration::from_secs(12));
        let long = plan(150).schedule();
        // Third cycle: 129 s, 138 s, 147 s (the spike at 156 s is past the end).
        assert_eq!(long.len(), 4 + 4 + 3);
        assert_eq!(long[4].0, Duration::from_secs(69));
        assert!(long.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
