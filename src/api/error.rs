//! The one error type of the admin API and its wire form:
//! `{"error": {"code": "...", "message": "..."}}` with the matching status.
//!
//! Client mistakes are 4xx with a message that says what to fix; server
//! trouble is 5xx with a generic message (the detail goes to the log, never
//! to the client).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a parameter or body the API cannot use.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401: no credentials, or credentials that do not verify.
    #[error("{message}")]
    Unauthorized { code: &'static str, message: String },
    /// 403: verified but not allowed (not an admin, or from a network
    /// outside the allow-list).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("no such route")]
    NotFound,
    /// 409: the request conflicts with work in progress.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("query string longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429 with `Retry-After`.
    #[error("too many requests; retry after {} s", retry_after_secs(*.retry_after))]
    RateLimited { retry_after: Duration },
    /// 503: the database (or a shared resource) is unavailable or busy.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String, retry_after: Option<Duration> },
    /// 500: a bug or an unexpected database error; detail logged only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { code, message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::Unauthorized { code, .. }
            | ApiError::Forbidden { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unavailable { code, .. } => code,
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UriTooLong { .. } => "query_too_long",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The error as one JSON document (also used as the last line of an
    /// NDJSON stream that fails half way).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}})
    }
}

fn retry_after_secs(d: Duration) -> u64 {
    // Round up: retrying before the limiter allows it only earns another 429.
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "admin API request failed");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::RateLimited { retry_after } | ApiError::Unavailable { retry_after: Some(retry_after), .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after).max(1)));
            }
            ApiError::Unauthorized { code, .. } => {
                // RFC 6750: tell the client which scheme and what was wrong.
                let error = if *code == "missing_token" { "" } else { ", error=\"invalid_token\"" };
                if let Ok(value) = HeaderValue::from_str(&format!("Bearer realm=\"audit-service\"{error}")) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(state) if *state == SqlState::QUERY_CANCELED => ApiError::Unavailable {
                code: "query_timeout",
                message: "the query exceeded the API statement timeout; narrow the filter or the time range".into(),
                retry_after: None,
            },
            Some(state) if *state == SqlState::LOCK_NOT_AVAILABLE => ApiError::Unavailable {
                code: "lock_timeout",
                message: "audit_logs is busy (a lock could not be taken in time); retry later".into(),
                retry_after: Some(Duration::from_secs(5)),
            },
            Some(state)
                if state.code().starts_with("08")
                    || state.code().starts_with("57P")
                    || state.code().starts_with("53") =>
            {
                ApiError::Unavailable {
                    code: "database_unavailable",
                    message: "PostgreSQL is unavailable".into(),
                    retry_after: Some(Duration::from_secs(5)),
                }
            }
            // Class 22 (data exception): a value of the request PostgreSQL
            // cannot take (out of range, malformed); the request's fault.
            Some(state) if state.code().starts_with("22") => ApiError::BadRequest {
                code: "invalid_value",
                message: format!(
                    "a value of the request is out of range for the database: {}",
                    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned())
                ),
            },
            Some(_) => ApiError::Internal(e.as_db_error().map_or_else(|| e.to_string(), |d| d.to_string())),
            // No SQLSTATE and an I/O cause: the connection broke.
            None if e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) => {
                ApiError::Unavailable {
                    code: "database_unavailable",
                    message: "PostgreSQL is unavailable".into(),
                    retry_after: Some(Duration::from_secs(5)),
                }
            }
            None => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            deadpool_postgres::PoolError::Timeout(_) => ApiError::Unavailable {
                code: "database_busy",
                message: "no API database connection became free in time".into(),
                retry_after: Some(Duration::from_secs(1)),
            },
            other => {
                tracing::warn!(error = %other, "API pool cannot connect");
                ApiError::Unavailable {
                    code: "database_unavailable",
                    message: "PostgreSQL is unavailable".into(),
                    retry_after: Some(Duration::from_secs(5)),
                }
            }
        }
    }
}
