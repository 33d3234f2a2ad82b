//! PostgreSQL: connection pools (with TLS), migrations, partition upkeep, the
//! batch writer, storage gauges and the named queries.

pub mod copy_format;
pub mod migrate;
pub mod partitions;
pub mod queries;
pub mod storage_metrics;
pub mod writer;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;

use crate::config::DatabaseConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database.url: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("TLS setup for PostgreSQL: {0}")]
    Tls(#[from] openssl::error::ErrorStack),
    #[error("building the connection pool: {0}")]
    Pool(String),
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("no PostgreSQL connection: {0}")]
    Connect(String),
    #[error("migration {version} ({name}): {message}")]
    Migration { version: i32, name: String, message: String },
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Db(e),
            other => StoreError::Connect(other.to_string()),
        }
    }
}

/// Parses the configured URL into a tokio-postgres config.
pub fn pg_config(cfg: &DatabaseConfig) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(StoreError::Url)?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(cfg.connect_timeout);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("audit-service");
    }
    Ok(pg)
}

/// The TLS connector used for every connection. `sslmode` in the URL decides
/// whether TLS is used (`prefer` by default, `require`, or `disable`).
pub fn tls_connector(cfg: &DatabaseConfig) -> Result<MakeTlsConnector, StoreError> {
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    match &cfg.ssl_root_cert {
        Some(ca) => builder.set_ca_file(ca)?,
        // libpq's sslmode=require: encrypt, do not verify the certificate.
        None => builder.set_verify(SslVerifyMode::NONE),
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if cfg.ssl_root_cert.is_none() {
        connector.set_callback(|config, _| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

/// A pool of `size` connections.
pub fn connect_pool(cfg: &DatabaseConfig, size: usize) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        pg_config(cfg)?,
        tls_connector(cfg)?,
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(Duration::from_secs(30)),
            create: Some(cfg.connect_timeout),
            recycle: Some(cfg.connect_timeout),
        })
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))
}

/// True when the error says nothing about the data: the connection broke,
/// the server is shutting down or refusing us, or a transaction lost a race.
/// Such a batch is retried as it is.
pub fn is_transient(err: &tokio_postgres::Error) -> bool {
    let Some(state) = err.code() else {
        // No SQLSTATE: I/O, closed connection, TLS or protocol trouble.
        return true;
    };
    let code = state.code();
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || code.starts_with("57") // operator intervention (terminated, shutdown)
        || code.starts_with("58") // system error
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock
        || code == "42501" // insufficient privilege: an operator revoked us
        || code == "55P03" // lock not available
        || code == "25P02" // in failed transaction (after a transient failure)
}

/// True when PostgreSQL rejected the data itself (a value, a constraint):
/// the rows at fault go to the dead-letter topic, the rest are stored.
pub fn is_data_error(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|state| {
        let code = state.code();
        (code.starts_with("22") || code.starts_with("23") || code.starts_with("54")) && code != "23505"
    })
}

pub fn is_unique_violation(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// `error: cause: cause...`: tokio-postgres keeps the reason a connection
/// failed ("Connection refused", a TLS or authentication error) and
/// PostgreSQL's own message in the source; its Display alone says only
/// "db error". For log lines and health reports.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Creates the configured database when it does not exist yet (connecting
/// to the server's `postgres` database to do so).
pub async fn ensure_database(cfg: &DatabaseConfig) -> Result<(), StoreError> {
    let target = pg_config(cfg)?;
    let tls = tls_connector(cfg)?;
    let error = match target.connect(tls.clone()).await {
        Ok(_) => return Ok(()),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => e,
        Err(e) => {
            return Err(StoreError::Connect(format!(
                "{} (is PostgreSQL running, and database.url / DATABASE_URL right?)",
                with_causes(&e)
            )));
        }
    };
    let Some(name) = target.get_dbname().map(str::to_owned) else { return Err(error.into()) };
    let mut admin = target.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(tls).await?;
    let conn = tokio::spawn(connection);
    // Identifiers cannot be bound parameters; quote it.
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match client.batch_execute(&format!("CREATE DATABASE {quoted}")).await {
        Ok(()) => tracing::info!(database = %name, "created database"),
        // Another instance created it first.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
        Err(e) => return Err(e.into()),
    }
    drop(client);
    let _ = conn.await;
    Ok(())
}
