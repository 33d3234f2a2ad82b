//! The admin HTTP API: health, security overview, alerts, log search,
//! cleanup, maintenance mode and reports, with bearer-token authentication,
//! a client allow-list, per-client rate limiting and request metrics.
//!
//! One table ([`routes`]) lists every route with its method and access
//! level; the router and the OpenAPI document's test both come from it.

pub mod allowlist;
pub mod audit_trail;
pub mod auth;
pub mod cursor;
pub mod db;
pub mod error;
pub mod extract;
pub mod handlers;
pub mod middleware;
pub mod openapi;
pub mod params;
pub mod queries;
pub mod ratelimit;
pub mod retention;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{MethodRouter, get, post};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use self::allowlist::NetworkList;
use self::auth::{AuthSetupError, Authenticator};
use self::ratelimit::ClientRateLimiter;
use crate::config::Config;
use crate::http::HttpState;
use crate::ingest::status::IngestStatus;

/// Everything a handler may need, shared by reference.
pub struct ApiContext {
    pub config: Arc<Config>,
    /// The API's own pool: a slow query never takes an ingest connection.
    pub pool: Pool,
    /// Only looked at (its status), for health.
    pub ingest_pool: Pool,
    pub status: Arc<IngestStatus>,
    pub metrics: PrometheusHandle,
    pub auth: Authenticator,
    pub limiter: ClientRateLimiter,
    pub allowed_networks: NetworkList,
    pub trusted_proxies: NetworkList,
    /// Bounds concurrent NDJSON exports (each holds a connection).
    pub streams: Arc<Semaphore>,
}

pub type Ctx = Arc<ApiContext>;

#[derive(Debug, thiserror::Error)]
pub enum ApiSetupError {
    #[error("admin API authentication: {0}")]
    Auth(#[from] AuthSetupError),
    #[error("config field `{field}`: {message}")]
    Network { field: &'static str, message: String },
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (liveness, the OpenAPI document).
    Public,
    /// `/metrics`: public unless `api.metrics_require_token`.
    Metrics,
    /// An admin token, from an allowed network, within the rate limit.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

fn spec(method: Method, path: &'static str, access: Access) -> RouteSpec {
    RouteSpec { method, path, access }
}

/// The route table: every route, its access level and handler.
fn route_table() -> Vec<(RouteSpec, MethodRouter<Ctx>)> {
    use handlers::*;
    vec![
        (spec(Method::GET, "/api/v1/health", Access::Public), get(liveness)),
        (spec(Method::GET, "/api/v1/openapi.json", Access::Public), get(openapi_document)),
        (spec(Method::GET, "/metrics", Access::Metrics), get(render_metrics)),
        (spec(Method::GET, "/api/v1/audit/health", Access::Admin), get(health::health)),
        (spec(Method::GET, "/api/v1/audit/security", Access::Admin), get(security::overview)),
        (spec(Method::GET, "/api/v1/audit/alerts", Access::Admin), get(alerts::list)),
        (spec(Method::GET, "/api/v1/audit/logs", Access::Admin), get(logs::search)),
        (spec(Method::POST, "/api/v1/audit/cleanup", Access::Admin), post(cleanup::cleanup)),
        (spec(Method::GET, "/api/v1/audit/maintenance", Access::Admin), get(maintenance::state)),
        (spec(Method::POST, "/api/v1/audit/maintenance", Access::Admin), post(maintenance::set)),
        (spec(Method::GET, "/api/v1/audit/reports/daily", Access::Admin), get(reports::daily)),
        (
            spec(Method::GET, "/api/v1/audit/reports/security-incidents", Access::Admin),
            get(reports::security_incidents),
        ),
        (spec(Method::GET, "/api/v1/audit/reports/retention", Access::Admin), get(reports::retention)),
        (spec(Method::GET, "/api/v1/audit/reports/completeness", Access::Admin), get(reports::completeness)),
        (spec(Method::GET, "/api/v1/audit/users/{user_id}/activity", Access::Admin), get(activity::user)),
        (spec(Method::GET, "/api/v1/audit/activity/summary", Access::Admin), get(activity::summary)),
    ]
}

/// Every route the router serves.
pub fn routes() -> Vec<RouteSpec> {
    route_table().into_iter().map(|(spec, _)| spec).collect()
}

/// The HTTP router: the admin API, liveness and `/metrics`. `env` looks up
/// environment variables (`ADMIN_TOKEN`).
pub fn router(state: HttpState, env: &dyn Fn(&str) -> Option<String>) -> Result<Router, ApiSetupError> {
    let api = &state.config.api;
    let network_list = |field: &'static str, items: &[String]| {
        NetworkList::parse(items).map_err(|message| ApiSetupError::Network { field, message })
    };
    let auth = Authenticator::new(api, env)?;
    if auth.is_empty() {
        tracing::warn!(
            "no admin credential is configured (api.tokens, ADMIN_TOKEN, api.jwt): admin routes will answer 401"
        );
    }
    let ctx: Ctx = Arc::new(ApiContext {
        allowed_networks: network_list("api.allowed_networks", &api.allowed_networks)?,
        trusted_proxies: network_list("api.trusted_proxies", &api.trusted_proxies)?,
        limiter: ClientRateLimiter::new(api.rate_limit_per_second, api.rate_limit_burst),
        streams: Arc::new(Semaphore::new(api.max_concurrent_streams)),
        auth,
        config: state.config.clone(),
        pool: state.api_pool,
        ingest_pool: state.ingest_pool,
        status: state.status,
        metrics: state.metrics,
    });
    let metrics_need_token = api.metrics_require_token;
    // Present from the first scrape, so that rate() over it is never absent.
    metrics::counter!("audit_http_rate_limited_total").increment(0);

    let mut open = Router::new();
    let mut guarded = Router::new();
    for (spec, handler) in route_table() {
        let needs_token = match spec.access {
            Access::Public => false,
            Access::Metrics => metrics_need_token,
            Access::Admin => true,
        };
        if needs_token {
            guarded = guarded.route(spec.path, handler);
        } else {
            open = open.route(spec.path, handler);
        }
    }
    let guarded = guarded.route_layer(axum::middleware::from_fn_with_state(ctx.clone(), middleware::admin_guard));
    let router = open
        .merge(guarded)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(api.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), middleware::request_limits))
        .layer(axum::middleware::from_fn(middleware::observe))
        .with_state(ctx);
    Ok(router)
}
