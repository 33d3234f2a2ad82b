//! `GET /api/v1/audit/security`: the runbook's daily security review in one
//! call: failed logins in the last minute and hour (system-wide and the
//! top users), suspicious IPs, open alerts and recent `SECURITY_*` events.

use std::net::IpAddr;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::alerts::AlertRow;
use super::logs::LogRow;
use crate::api::error::ApiError;
use crate::api::extract::ApiQuery;
use crate::api::params::{self, ActionFilter};
use crate::api::queries::{self, LogSearch, param_refs};
use crate::api::{Ctx, db};

/// Open alerts are looked for among transitions of the last week.
const OPEN_ALERT_WINDOW_DAYS: i64 = 7;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityParams {
    /// Users listed per window (default 10, at most 100).
    pub top: Option<u64>,
    /// `SECURITY_*` events and open alerts listed (default 50, at most 500).
    pub limit: Option<u64>,
    /// Start of the `SECURITY_*` event list (default: 24 hours ago).
    pub since: Option<String>,
    /// An IP is suspicious above this many failed logins in the last hour
    /// (default 10, the runbook's).
    pub ip_threshold: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct SecurityOverview {
    pub as_of: DateTime<Utc>,
    pub failed_logins: FailedLogins,
    pub suspicious_ips: Vec<SuspiciousIp>,
    pub ip_threshold: i64,
    pub open_alerts: Vec<AlertRow>,
    pub recent_security_events: Vec<LogRow>,
    pub security_events_since: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct FailedLogins {
    pub last_minute: FailedWindow,
    pub last_hour: FailedWindow,
}

#[derive(Debug, Serialize)]
pub struct FailedWindow {
    pub total: i64,
    pub top_users: Vec<UserFailures>,
}

#[derive(Debug, Serialize)]
pub struct UserFailures {
    /// Null: logins for an unknown user.
    pub user_id: Option<String>,
    pub failures: i64,
}

#[derive(Debug, Serialize)]
pub struct SuspiciousIp {
    pub ip_address: IpAddr,
    pub failures: i64,
    pub distinct_usernames: i64,
}

pub async fn overview(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<SecurityParams>,
) -> Result<Json<SecurityOverview>, ApiError> {
    let top = params::limit(p.top, 10, 100)?;
    let limit = params::limit(p.limit, 50, 500)?;
    let ip_threshold = match p.ip_threshold {
        None => 10,
        Some(t) if t <= 1_000_000 => t as i64,
        Some(_) => return Err(ApiError::bad_request("invalid_parameter", "ip_threshold must be at most 1000000")),
    };
    let now = Utc::now();
    let since = params::optional_timestamp("since", p.since.as_deref())?.unwrap_or(now - chrono::Duration::days(1));
    let minute_ago = now - chrono::Duration::minutes(1);
    let hour_ago = now - chrono::Duration::hours(1);
    let alerts_since = now - chrono::Duration::days(OPEN_ALERT_WINDOW_DAYS);

    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let counts = tx.query_one(queries::FAILED_LOGIN_COUNTS, &[&hour_ago, &minute_ago]).await?;
    let top_users = |rows: Vec<tokio_postgres::Row>| -> Result<Vec<UserFailures>, tokio_postgres::Error> {
        rows.iter().map(|r| Ok(UserFailures { user_id: r.try_get(0)?, failures: r.try_get(1)? })).collect()
    };
    let top_minute = top_users(tx.query(queries::TOP_FAILED_USERS, &[&minute_ago, &top]).await?)?;
    let top_hour = top_users(tx.query(queries::TOP_FAILED_USERS, &[&hour_ago, &top]).await?)?;
    let suspicious_ips = tx
        .query(queries::SUSPICIOUS_IPS, &[&hour_ago, &ip_threshold, &limit])
        .await?
        .iter()
        .map(|r| {
            Ok(SuspiciousIp { ip_address: r.try_get(0)?, failures: r.try_get(1)?, distinct_usernames: r.try_get(2)? })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let open_alerts = tx
        .query(queries::OPEN_ALERTS, &[&alerts_since, &limit])
        .await?
        .iter()
        .map(AlertRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let (sql, search_params) = LogSearch {
        action: Some(ActionFilter::Prefix("SECURITY_".into())),
        from: Some(since),
        limit: Some(limit),
        ..LogSearch::default()
    }
    .to_sql();
    let recent_security_events = tx
        .query(&sql, &param_refs(&search_params))
        .await?
        .iter()
        .map(LogRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit().await?;

    Ok(Json(SecurityOverview {
        as_of: now,
        failed_logins: FailedLogins {
            last_minute: FailedWindow { total: counts.try_get(1)?, top_users: top_minute },
            last_hour: FailedWindow { total: counts.try_get(0)?, top_users: top_hour },
        },
        suspicious_ips,
        ip_threshold,
        open_alerts,
        recent_security_events,
        security_events_since: since,
    }))
}
