//! Logging: human-readable by default, one JSON object per line with
//! `--log-format json`. The level comes from `RUST_LOG` (default `info`;
//! `warn` for the interactive commands, whose own output is the point).

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat) {
    init_with_level(format, "info");
}

/// [`init`] with another default level (`RUST_LOG` still wins).
pub fn init_with_level(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},librdkafka=warn,rdkafka=warn,tokio_postgres=warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
