//! Maintenance mode (the runbook's "enable maintenance mode" under high
//! load): `POST /api/v1/audit/maintenance` with `{"paused": true}` pauses
//! consumption of the events topic, `false` resumes it, on every instance:
//! the switch is stored (migrations/0007) and the other instances follow it
//! within a second; an instance started while it is set starts paused
//! (src/ingest/maintenance.rs). Nothing is lost: the events wait in Kafka,
//! the lag grows and is reported by health and
//! `audit_consumer_lag_messages`; the state shows in health and in
//! `audit_ingest_paused{reason="maintenance"}`.
//!
//! The switch is made on this instance first, then stored and recorded in
//! the audit trail in one transaction, so that an overloaded database cannot
//! stop an operator from pausing the instance they reached; the answer says
//! whether the switch was stored (and so reaches the other instances).

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::audit_trail::{self, Actor};
use crate::api::error::ApiError;
use crate::api::extract::ApiJson;
use crate::api::middleware::{Caller, RequestId};
use crate::api::params;
use crate::api::{Ctx, db};
use crate::ingest::maintenance::{self, StoredSwitch};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    pub paused: bool,
    /// Why (kept in the audit trail).
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MaintenanceState {
    /// This instance's state.
    pub paused: bool,
    pub backpressure_paused: bool,
    pub consumer_lag: i64,
    /// The last switch stored for every instance (null: none yet, or the
    /// database could not be read).
    pub shared: Option<StoredSwitch>,
    /// Whether the switch was stored for every instance and recorded in
    /// audit_logs (POST only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_event_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded: Option<bool>,
}

pub async fn state(State(ctx): State<Ctx>) -> Json<MaintenanceState> {
    let shared = stored_switch(&ctx).await;
    let s = ctx.status.snapshot();
    Json(MaintenanceState {
        paused: s.maintenance_paused,
        backpressure_paused: s.backpressure_paused,
        consumer_lag: s.total_lag,
        shared,
        audit_event_id: None,
        recorded: None,
    })
}

/// The stored switch; None when there is none or it cannot be read (this
/// instance's own state is still reported).
async fn stored_switch(ctx: &Ctx) -> Option<StoredSwitch> {
    async {
        let mut conn = db::connection(ctx).await?;
        let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
        Ok::<_, ApiError>(maintenance::read(&*tx).await?)
    }
    .await
    .inspect_err(|e| tracing::warn!(error = ?e, "cannot read the shared maintenance mode"))
    .ok()
    .flatten()
}

pub async fn set(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<MaintenanceRequest>,
) -> Result<Json<MaintenanceState>, ApiError> {
    let reason = params::optional_text("reason", body.reason.as_deref(), 1024)?;
    let was_paused = ctx.status.maintenance_paused();
    ctx.status.set_maintenance_paused(body.paused);
    let actor = Actor {
        id: caller.principal.id(),
        client_ip: caller.client_ip,
        user_agent: caller.user_agent,
        request_id: Some(request_id.0),
    };
    tracing::info!(actor = %actor.id, paused = body.paused, was_paused, reason = reason.as_deref().unwrap_or(""), "maintenance mode set");
    let action = if body.paused { audit_trail::ACTION_MAINTENANCE_ON } else { audit_trail::ACTION_MAINTENANCE_OFF };
    let metadata = serde_json::json!({"paused": body.paused, "was_paused": was_paused, "reason": reason});
    let recorded = async {
        let mut conn = db::connection(&ctx).await?;
        let tx = db::read_write(&mut conn, ctx.config.api.statement_timeout).await?;
        let shared = maintenance::store(&*tx, body.paused, reason.as_deref(), &actor.id).await?;
        let id = audit_trail::record(&tx, action, &actor, metadata, Some(&ctx.config.activity)).await?;
        tx.commit().await?;
        Ok::<_, ApiError>((id, shared))
    }
    .await
    .inspect_err(|e| {
        tracing::warn!(error = ?e, "maintenance switch made on this instance only: not stored, not in the audit trail")
    })
    .ok();
    let s = ctx.status.snapshot();
    Ok(Json(MaintenanceState {
        paused: s.maintenance_paused,
        backpressure_paused: s.backpressure_paused,
        consumer_lag: s.total_lag,
        recorded: Some(recorded.is_some()),
        audit_event_id: recorded.as_ref().map(|(id, _)| *id),
        shared: recorded.map(|(_, shared)| shared),
    }))
}
