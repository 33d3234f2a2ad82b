//! The HTTP listener: liveness and Prometheus metrics. The admin API joins
//! this router in its own module.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use deadpool_postgres::Pool;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
    pub status: Arc<IngestStatus>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn render_metrics(axum::extract::State(state): axum::extract::State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
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
