//! The layers around the routes: request metrics (outermost, so that every
//! answer is counted, 401 and 429 included), request limits and request
//! ids, and the admin guard (allow-list, authentication, rate limit).

use std::net::IpAddr;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Ctx;
use super::allowlist::client_ip;
use super::auth::Principal;
use super::error::ApiError;

/// The verified caller of an admin route, for handlers and the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

/// The request's id: the client's `X-Request-Id` when it is sane, else a
/// new UUID; echoed in the response and stored with admin actions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

const REQUEST_ID: &str = "x-request-id";

/// Records `audit_http_request_duration_seconds{route, method, status}`.
/// `route` is the matched route template (`unmatched` for a 404), never
/// the raw path, so that a scan of random URLs cannot blow up the series.
/// For a streamed body the time is to the response head.
pub async fn observe(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let response = next.run(req).await;
    metrics::histogram!(
        "audit_http_request_duration_seconds",
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Refuses overlong query strings (414) and assigns the request id.
pub async fn request_limits(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    let limit = ctx.config.api.max_query_bytes;
    if req.uri().query().map_or(0, str::len) > limit {
        return ApiError::UriTooLong { limit }.into_response();
    }
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(req).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Admin routes: the client must be in the allow-list, within its rate
/// limit, and present an admin credential.
pub async fn admin_guard(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    match authorize(&ctx, &req) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

fn authorize(ctx: &Ctx, req: &Request) -> Result<Caller, ApiError> {
    let ip = client_ip(req, &ctx.trusted_proxies);
    if !ctx.allowed_networks.is_empty() && !ip.is_some_and(|ip| ctx.allowed_networks.contains(ip)) {
        metrics::counter!("audit_http_auth_failures_total", "reason" => "client_not_allowed").increment(1);
        tracing::warn!(client = ?ip, "admin request from outside api.allowed_networks refused");
        return Err(ApiError::Forbidden {
            code: "client_not_allowed",
            message: "this client address is not in the admin API's allowed networks".into(),
        });
    }
    let authenticated = ctx.auth.authenticate(req.headers().get(header::AUTHORIZATION));
    // Failed attempts are limited per address, so that guessing tokens is
    // throttled too.
    let key = match &authenticated {
        Ok(principal) => principal.id(),
        Err(_) => format!("ip:{}", ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())),
    };
    ctx.limiter.check(&key)?;
    let principal = authenticated.inspect_err(|e| {
        tracing::info!(client = ?ip, code = e.code(), "admin request refused");
    })?;
    let user_agent =
        req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(|v| v.chars().take(512).collect());
    Ok(Caller { principal, client_ip: ip, user_agent })
}
