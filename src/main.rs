//! The `audit-service` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use audit_service::config::{Config, DEFAULT_CONFIG_PATH};
use audit_service::demo::{self, DEMO_DATABASE_URL, DemoOptions};
use audit_service::loadgen::{self, DeliveryCounter, PayloadFormat, ProducePlan, Scenario};
use audit_service::replay::{self, ProgressBar, ReplayOptions};
use audit_service::service;
use audit_service::telemetry::{self, LogFormat};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use rdkafka::producer::{BaseProducer, Producer};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "audit-service",
    version,
    about = "Auth events from Kafka into PostgreSQL, exactly once, with attack detection"
)]
struct Cli {
    /// Config file (TOML). Environment variables override it: DATABASE_URL,
    /// KAFKA_BROKERS and AUDIT__<SECTION>__<FIELD>.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: migrations, the ingest pipeline and the HTTP listener.
    Run,
    /// Apply database migrations and create the partitions, then exit.
    Migrate,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Fold the activity tracker's pending deltas into sessions and rollups
    /// now, then exit (what a running service does when ingest idles; safe
    /// beside it).
    Fold,
    /// Try everything on one machine: an embedded Kafka, the whole service
    /// on the local PostgreSQL, synthetic traffic with attacks, every alert
    /// printed as it fires.
    Demo(DemoArgs),
    /// Load generator: write realistic auth events to a Kafka topic.
    Produce(ProduceArgs),
    /// Re-run the detectors of the current configuration over stored events
    /// and print the alerts they would raise (nothing is published).
    Replay(ReplayArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// How long the traffic plays (e.g. 20s, 5m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: Duration,
    /// HTTP listener of the API and /metrics; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The demo's database (its name must contain `demo`; created if
    /// missing).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, default_value = DEMO_DATABASE_URL)]
    database_url: String,
    /// Ordinary events per second.
    #[arg(long, default_value_t = 30)]
    rate: u64,
    /// Users of the ordinary traffic.
    #[arg(long, default_value_t = 2000)]
    users: u64,
    /// Seed of the synthetic traffic (default: a new one each run).
    #[arg(long)]
    seed: Option<u64>,
    /// After the summary, keep the service running until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

#[derive(Args)]
struct ProduceArgs {
    /// Bootstrap servers (default: kafka.brokers of the config / KAFKA_BROKERS).
    /// The config's [kafka.properties] and [kafka.producer_properties] apply
    /// (security settings of a secured cluster).
    #[arg(long)]
    brokers: Option<String>,
    /// Topic (default: kafka.events_topic of the config).
    #[arg(long)]
    topic: Option<String>,
    /// What the traffic holds.
    #[arg(long, value_enum, default_value_t = Scenario::Normal)]
    scenario: Scenario,
    /// Wire format of the events.
    #[arg(long, value_enum, default_value_t = PayloadFormat::Json)]
    format: PayloadFormat,
    /// Schema id in the Confluent framing (avro-confluent); the consumer
    /// must know it (schema registry or [schema_registry.local_schemas]).
    #[arg(long, default_value_t = 1)]
    schema_id: u32,
    /// Events per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Events in all; 0 = until Ctrl-C.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Users of the ordinary traffic.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Seed (default: a new one each run). The same seed gives the same
    /// event ids, which the service stores once.
    #[arg(long)]
    seed: Option<u64>,
    /// Failed logins in the ordinary traffic, in percent (default: the
    /// realistic mix's 12).
    #[arg(long, value_name = "PERCENT")]
    failed_logins: Option<f64>,
    /// Ordinary events between two attacks of the scenario.
    #[arg(long, default_value_t = 1000)]
    attack_every: u64,
}

#[derive(Args)]
struct ReplayArgs {
    /// Start of the range (event time, RFC 3339, inclusive).
    #[arg(long, value_parser = parse_time)]
    from: DateTime<Utc>,
    /// End of the range (event time, RFC 3339, exclusive; default: now).
    #[arg(long, value_parser = parse_time)]
    to: Option<DateTime<Utc>>,
    /// Only this rule (repeatable; default: every enabled rule).
    #[arg(long = "rule", value_name = "ID")]
    rules: Vec<String>,
    /// Print each alert as the JSON message the service would publish.
    #[arg(long)]
    json: bool,
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2026-11-27T08:00:00Z)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    match cli.command {
        // Their own output is what these show; service logs only when wrong.
        Command::Demo(_) | Command::Produce(_) | Command::Replay(_) => telemetry::init_with_level(format, "warn"),
        _ => telemetry::init(format),
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = error_chain(&e);
            match format {
                // A log collector reading JSON sees the fatal error too.
                LogFormat::Json => tracing::error!(error = %message, "fatal"),
                LogFormat::Text => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: ` (like `{:#}`), leaving out a
/// cause whose text its parent already shows (many errors here print their
/// source in their own message too).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    // The default path may be absent (defaults + environment); a path given
    // on the command line must exist.
    let explicit = cli.config.as_os_str() != DEFAULT_CONFIG_PATH;
    let config = Config::load(&cli.config, explicit).context("invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::CheckConfig => {
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
        Command::Migrate => runtime.block_on(async {
            let applied = service::prepare_database(&config).await.context("migration failed")?;
            println!("migrations applied: {applied:?} (schema is current)");
            Ok(())
        }),
        Command::Fold => runtime.block_on(async {
            let pool = audit_service::store::connect_pool(&config.database, 1).context("database")?;
            let started = std::time::Instant::now();
            let rows = audit_service::activity::compactor::compact_once(&pool)
                .await
                .map_err(|e| anyhow::anyhow!("fold failed: {e}"))?;
            println!(
                "folded the pending activity deltas into {rows} session and rollup rows in {:.2}s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }),
        Command::Run => runtime.block_on(run(config)),
        Command::Demo(args) => runtime.block_on(run_demo(config, args)),
        Command::Produce(args) => runtime.block_on(produce(config, args)),
        Command::Replay(args) => runtime.block_on(run_replay(config, args)),
    }
}

async fn run_demo(config: Config, args: DemoArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.cancel();
            // A second Ctrl-C does not wait for the drain.
            shutdown_signal().await;
            std::process::exit(130);
        });
    }
    let opts = DemoOptions {
        duration: args.duration,
        listen: args.listen,
        database_url: args.database_url,
        rate: args.rate,
        users: args.users,
        seed: args.seed,
        keep_running: args.keep_running,
    };
    demo::run(config, opts, stop).await.context("demo")
}

async fn produce(mut config: Config, args: ProduceArgs) -> anyhow::Result<()> {
    if let Some(brokers) = args.brokers {
        config.kafka.brokers = brokers;
    }
    config.kafka.client_id = format!("{}-loadgen", config.kafka.client_id);
    let plan = ProducePlan {
        topic: args.topic.unwrap_or_else(|| config.kafka.events_topic.clone()),
        scenario: args.scenario,
        format: args.format.wire(args.schema_id),
        rate: args.rate,
        count: args.count,
        users: args.users,
        seed: args.seed.unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64),
        failure_per_mille: args.failed_logins.map(|p| (p.clamp(0.0, 100.0) * 10.0).round() as u64),
        attack_every: args.attack_every,
        flush_timeout: Duration::from_secs(30),
    };
    let producer: BaseProducer<DeliveryCounter> = audit_service::kafka::producer_config(&config.kafka)
        .create_with_context(DeliveryCounter::default())
        .context("Kafka producer")?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let (plan_ref, brokers) = (plan.clone(), config.kafka.brokers.clone());
    let done = tokio::task::spawn_blocking(move || {
        let context = producer.context().clone();
        loadgen::produce(&producer, &plan_ref, &stop, &mut |p| {
            let error = context.last_error().map(|e| format!("; last Kafka error: {e}")).unwrap_or_default();
            eprintln!(
                "produced {} events, {} acknowledged ({:.0} events/s){error}",
                p.produced,
                p.acknowledged,
                p.rate()
            );
        })
        .map(|done| (done, producer.context().last_error()))
    })
    .await
    .context("load generator")??;
    let (done, last_error) = done;
    let name = |v: Option<clap::builder::PossibleValue>| v.map(|v| v.get_name().to_owned()).unwrap_or_default();
    println!(
        "produced {} events (scenario {}, format {}) to {} at {} in {:.1}s ({:.0} events/s); {} acknowledged, {} failed",
        done.produced,
        name(clap::ValueEnum::to_possible_value(&args.scenario)),
        name(clap::ValueEnum::to_possible_value(&args.format)),
        plan.topic,
        brokers,
        done.elapsed.as_secs_f64(),
        done.rate(),
        done.acknowledged,
        done.failed
    );
    if done.failed > 0 {
        anyhow::bail!(
            "{} events were not acknowledged (last error: {})",
            done.failed,
            last_error.unwrap_or_else(|| "timed out".into())
        );
    }
    Ok(())
}

async fn run_replay(config: Config, args: ReplayArgs) -> anyhow::Result<()> {
    let opts =
        ReplayOptions { from: args.from, to: args.to.unwrap_or_else(Utc::now), rules: args.rules, json: args.json };
    let bar = ProgressBar::new();
    let mut alerts = bar.writer(std::io::stdout().lock());
    let report = replay::run(&config, &opts, &mut alerts, &mut |done, total| bar.update(done, total)).await;
    bar.finish();
    let mut out = std::io::stdout().lock();
    let report = report.context("replay")?;
    let rules: Vec<String> = replay::select_rules(&config.detect, &opts.rules)?
        .rules
        .into_iter()
        .filter(|r| r.enabled)
        .map(|r| r.id)
        .collect();
    report.print_summary(&rules, &opts, &mut out)?;
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let running = service::start(&config, cancel.clone()).await.map_err(anyhow::Error::from).context("cannot start")?;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        name = &mut signal => tracing::info!(signal = name, "shutting down"),
        _ = cancel.cancelled() => {}
    }
    running.stop();
    running.wait().await;
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}
