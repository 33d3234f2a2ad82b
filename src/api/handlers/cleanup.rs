//! `POST /api/v1/audit/cleanup` with `{"retention_days": N, "dry_run": false}`:
//! the runbook's monthly log retention (see `api::retention`).

use axum::extract::State;
use axum::{Extension, Json};
use serde::Deserialize;

use crate::api::Ctx;
use crate::api::audit_trail::Actor;
use crate::api::error::ApiError;
use crate::api::extract::ApiJson;
use crate::api::middleware::{Caller, RequestId};
use crate::api::retention::{self, CleanupOutcome};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupRequest {
    pub retention_days: u32,
    #[serde(default)]
    pub dry_run: bool,
}

pub async fn cleanup(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<CleanupRequest>,
) -> Result<Json<CleanupOutcome>, ApiError> {
    let actor = Actor {
        id: caller.principal.id(),
        client_ip: caller.client_ip,
        user_agent: caller.user_agent,
        request_id: Some(request_id.0),
    };
    Ok(Json(retention::cleanup(&ctx.pool, &ctx.config, body.retention_days, body.dry_run, &actor).await?))
}
