//! The HTTP listener: liveness, Prometheus metrics and the admin API
//! (`crate::api`), all on one router.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiSetupError};
use crate::config::Config;
use crate::ingest::status::IngestStatus;

/// What the HTTP side needs from the rest of the service.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: PrometheusHandle,
    pub config: Arc<Config>,
    /// A pool of its own, so that a slow API query never takes a connection
    /// from ingest.
    pub api_pool: Pool,
    /// The ingest pool, only to report its use in health.
    pub ingest_pool: Pool,
    pub status: Arc<IngestStatus>,
}

/// The service's router; credentials from the environment (`ADMIN_TOKEN`)
/// are read here, once.
pub fn router(state: HttpState) -> Result<Router, ApiSetupError> {
    router_with_env(state, &|name| std::env::var(name).ok())
}

/// [`router`] with an explicit environment lookup, for tests.
pub fn router_with_env(state: HttpState, env: &dyn Fn(&str) -> Option<String>) -> Result<Router, ApiSetupError> {
    api::router(state, env)
}

/// Binds `addr` (port 0 picks a free port) and serves until cancelled.
/// Returns the bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((bound, task))
}
