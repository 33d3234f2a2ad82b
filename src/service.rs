//! `audit-service run`: wires configuration, PostgreSQL, the ingest pipeline
//! and the HTTP listener together, and takes them down in order.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::event::Decoder;
use crate::event::registry::SchemaRegistry;
use crate::ingest::maintenance;
use crate::ingest::status::IngestStatus;
use crate::ingest::{self, IngestHandle};
use crate::store::{self, migrate, partitions};
use crate::{activity, http, metrics};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error("HTTP listener on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Api(#[from] crate::api::ApiSetupError),
}

pub struct RunningService {
    pub http_addr: SocketAddr,
    pub status: Arc<IngestStatus>,
    cancel: CancellationToken,
    ingest: IngestHandle,
    background: Vec<tokio::task::JoinHandle<()>>,
}

/// Creates the database if needed, applies migrations, prepares partitions.
pub async fn prepare_database(config: &Config) -> Result<Vec<i32>, store::StoreError> {
    store::ensure_database(&config.database).await?;
    let pool = store::connect_pool(&config.database, 1)?;
    let mut client = pool.get().await?;
    let applied = migrate::run(&mut client).await?;
    drop(client);
    partitions::ensure(&pool, &config.storage).await?;
    Ok(applied)
}

/// Starts everything; cancel `cancel` (or call [`RunningService::stop`]) to
/// stop, then [`RunningService::wait`].
pub async fn start(config: &Config, cancel: CancellationToken) -> Result<RunningService, ServiceError> {
    let metrics_handle = metrics::install();
    prepare_database(config).await?;
    let pool = store::connect_pool(&config.database, config.database.pool_size)?;

    let registry =
        SchemaRegistry::from_config(&config.schema_registry).map_err(|e| ServiceError::Registry(e.to_string()))?;
    let decoder = Decoder::new(config.validation.clone(), Arc::new(registry));
    let status = Arc::new(IngestStatus::default());
    // "No batch yet" counts from the start, so a stall right after start
    // shows in audit_last_batch_stored_timestamp_seconds too.
    ::metrics::gauge!("audit_last_batch_stored_timestamp_seconds").set(chrono::Utc::now().timestamp() as f64);

    // A pause stored by any instance holds from the first message on.
    let maintenance_version = maintenance::restore(&pool, &status).await?;
    let ingest = ingest::start(config, pool.clone(), decoder, status.clone(), cancel.clone())?;

    let mut background = vec![
        tokio::spawn(maintenance::follow(pool.clone(), status.clone(), maintenance_version, cancel.clone())),
        tokio::spawn(partitions::maintain(pool.clone(), config.storage.clone(), cancel.clone())),
        tokio::spawn(store::storage_metrics::sample(pool.clone(), cancel.clone())),
        tokio::spawn(metrics::sample_pool(pool.clone(), "ingest", cancel.clone())),
    ];
    if config.activity.enabled {
        background.push(tokio::spawn(activity::compactor::run(
            pool.clone(),
            config.activity.clone(),
            status.clone(),
            cancel.clone(),
        )));
    }

    let api_pool = store::connect_pool(&config.database, config.database.api_pool_size)?;
    background.push(tokio::spawn(metrics::sample_pool(api_pool.clone(), "api", cancel.clone())));
    let shared_config = Arc::new(config.clone());
    background.push(tokio::spawn(crate::api::retention::run_scheduled(
        api_pool.clone(),
        shared_config.clone(),
        cancel.clone(),
    )));
    let router = http::router(http::HttpState {
        metrics: metrics_handle,
        config: shared_config,
        api_pool,
        ingest_pool: pool.clone(),
        status: status.clone(),
    })?;
    let (http_addr, http_task) = http::serve(config.http.listen, router, cancel.clone())
        .await
        .map_err(|source| ServiceError::Http { addr: config.http.listen, source })?;
    background.push(http_task);
    info!(%http_addr, topic = %config.kafka.events_topic, group = %config.kafka.group_id, "audit-service running");
    Ok(RunningService { http_addr, status, cancel, ingest, background })
}

impl RunningService {
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Waits for the pipeline to flush and every task to end.
    pub async fn wait(self) {
        self.ingest.join().await;
        self.cancel.cancel();
        for task in self.background {
            let _ = task.await;
        }
        info!("audit-service stopped");
    }
}
