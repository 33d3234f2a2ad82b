//! The `audit-service` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use audit_service::config::{Config, DEFAULT_CONFIG_PATH};
use audit_service::telemetry::{self, LogFormat};
use audit_service::service;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "audit-service", version, about = "Auth events from Kafka into PostgreSQL, exactly once, with attack detection")]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    telemetry::init(format);
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
        Command::Run => runtime.block_on(run(config)),
    }
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

