//! Route handlers, one file per area; the small shared ones here.

pub mod activity;
pub mod alerts;
pub mod cleanup;
pub mod health;
pub mod logs;
pub mod maintenance;
pub mod reports;
pub mod security;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::error::ApiError;
use super::{Ctx, openapi};

/// `GET /api/v1/health`: liveness (the process answers), no token.
pub async fn liveness() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn render_metrics(State(ctx): State<Ctx>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], ctx.metrics.render())
}

/// `GET /api/v1/openapi.json`.
pub async fn openapi_document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi::document_text())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
