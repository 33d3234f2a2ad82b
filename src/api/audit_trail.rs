//! Admin actions recorded in audit_logs itself (see
//! migrations/0003_admin_api.sql): searchable like any event, e.g.
//! `GET /api/v1/audit/logs?action=ADMIN_*`.

use std::net::IpAddr;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::queries;

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

/// Inserts the row; returns its event_id.
pub async fn record(
    client: &impl GenericClient,
    action: &str,
    actor: &Actor,
    metadata: serde_json::Value,
) -> Result<Uuid, tokio_postgres::Error> {
    let event_id = Uuid::new_v4();
    client
        .execute(
            queries::INSERT_ADMIN_EVENT,
            &[&event_id, &action, &actor.id, &actor.client_ip, &actor.user_agent, &actor.request_id, &metadata],
        )
        .await?;
    metrics::counter!("audit_admin_actions_total", "action" => action.to_owned()).increment(1);
    Ok(event_id)
}
