//! Admin actions recorded in audit_logs itself (see
//! migrations/0003_admin_api.sql): searchable like any event, e.g.
//! `GET /api/v1/audit/logs?action=ADMIN_*`.

use std::net::IpAddr;

use tokio_postgres::Transaction;
use uuid::Uuid;

use super::queries;
use crate::activity::{ActivityConfig, ActivityDeltas};
use crate::event::AuthEvent;

/// A cleanup (not a dry run) that removed or would have removed rows.
pub const ACTION_CLEANUP: &str = "ADMIN_AUDIT_CLEANUP";
/// Maintenance mode switched on or off.
pub const ACTION_MAINTENANCE_ON: &str = "ADMIN_MAINTENANCE_ENABLED";
pub const ACTION_MAINTENANCE_OFF: &str = "ADMIN_MAINTENANCE_DISABLED";

/// Who did it, from where.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Principal id (`token:ops`, `jwt:alice`, `env:ADMIN_TOKEN`) or
    /// `scheduler` for the scheduled retention.
    pub id: String,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

impl Actor {
    pub fn scheduler() -> Actor {
        Actor { id: "scheduler".into(), client_ip: None, user_agent: None, request_id: None }
    }
}

/// Inserts the row in `tx`, and with the activity tracker on (`activity`)
/// its rollup deltas too, as ingest does for every event: the admin's
/// actions count in the reports like any other. Returns its event_id.
pub async fn record(
    tx: &Transaction<'_>,
    action: &str,
    actor: &Actor,
    metadata: serde_json::Value,
    activity: Option<&ActivityConfig>,
) -> Result<Uuid, tokio_postgres::Error> {
    let event_id = Uuid::new_v4();
    // One time for the row and its rollup hour.
    let at = chrono::Utc::now();
    tx.execute(
        queries::INSERT_ADMIN_EVENT,
        &[&event_id, &action, &actor.id, &actor.client_ip, &actor.user_agent, &actor.request_id, &metadata, &at],
    )
    .await?;
    if let Some(cfg) = activity.filter(|cfg| cfg.enabled) {
        let event = AuthEvent {
            event_id,
            occurred_at: at.timestamp_micros(),
            action: action.to_owned(),
            user_id: Some(actor.id.clone()),
            username: None,
            ip_address: actor.client_ip,
            user_agent: actor.user_agent.clone(),
            session_id: None,
            request_id: actor.request_id.clone(),
            metadata: Vec::new(),
        };
        ActivityDeltas::from_events(cfg, [&event]).write(tx).await?;
    }
    metrics::counter!("audit_admin_actions_total", "action" => action.to_owned()).increment(1);
    Ok(event_id)
}
