//! The activity tracker's endpoints (sessions and rollups; they never scan
//! audit_logs):
//! - `users/{user_id}/activity?days=`: open and recent sessions, logins and
//!   failed logins (24 h, 7 d, 30 d), actions per day, distinct addresses and
//!   user agents;
//! - `activity/summary?from=&to=`: active sessions and users, top actions,
//!   admin actions per admin, busiest hours.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, DurationRound, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::extract::{ApiPath, ApiQuery};
use crate::api::{Ctx, db, params, queries};

const MAX_DAYS: u64 = 366;
const TOP: i64 = 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserParams {
    /// How far back recent sessions and per-day counts go (default 30).
    pub days: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Session {
    pub session_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub last_seen_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub last_24h: i64,
    pub last_7d: i64,
    pub last_30d: i64,
}

#[derive(Debug, Serialize)]
pub struct DayActions {
    pub day: NaiveDate,
    pub action: String,
    pub events: i64,
}

#[derive(Debug, Serialize)]
pub struct UserActivity {
    pub user_id: String,
    pub days: u64,
    pub open_sessions: Vec<Session>,
    pub recent_sessions: Vec<Session>,
    pub logins: Totals,
    pub failed_logins: Totals,
    pub actions_per_day: Vec<DayActions>,
    pub distinct_ips: Vec<String>,
    pub distinct_user_agents: Vec<String>,
}

pub async fn user(
    State(ctx): State<Ctx>,
    ApiPath(user_id): ApiPath<String>,
    ApiQuery(p): ApiQuery<UserParams>,
) -> Result<Json<UserActivity>, ApiError> {
    let user_id = params::text("user_id", &user_id, 256)?;
    let days = params::limit(p.days, 30, MAX_DAYS)? as u64;
    let now = Utc::now();
    let since = now - TimeDelta::days(days as i64);
    let hour_floor = |t: DateTime<Utc>| t.duration_trunc(TimeDelta::hours(1)).unwrap_or(t);
    let windows = [
        hour_floor(now - TimeDelta::days(1)),
        hour_floor(now - TimeDelta::days(7)),
        hour_floor(now - TimeDelta::days(30)),
    ];
    let detect = &ctx.config.detect;
    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let session = |r: &tokio_postgres::Row, ended: bool| -> Result<Session, tokio_postgres::Error> {
        Ok(if ended {
            Session {
                session_id: r.try_get(0)?,
                started_at: r.try_get(1)?,
                last_seen_at: r.try_get(2)?,
                ended_at: r.try_get(3)?,
                end_reason: r.try_get(4)?,
                ip_address: r.try_get(5)?,
                user_agent: r.try_get(6)?,
            }
        } else {
            Session {
                session_id: r.try_get(0)?,
                started_at: r.try_get(1)?,
                last_seen_at: r.try_get(2)?,
                ended_at: None,
                end_reason: None,
                ip_address: r.try_get(3)?,
                user_agent: r.try_get(4)?,
            }
        })
    };
    let open_sessions = tx
        .query(queries::USER_OPEN_SESSIONS, &[&user_id])
        .await?
        .iter()
        .map(|r| session(r, false))
        .collect::<Result<Vec<_>, _>>()?;
    let recent_sessions = tx
        .query(queries::USER_RECENT_SESSIONS, &[&user_id, &since, &50i64])
        .await?
        .iter()
        .map(|r| session(r, true))
        .collect::<Result<Vec<_>, _>>()?;
    let totals = |actions: &[String]| {
        let tx = &tx;
        let user_id = &user_id;
        let windows = windows.to_vec();
        let actions = actions.to_vec();
        async move {
            let rows = tx.query(queries::USER_ACTION_TOTALS, &[user_id, &windows, &actions]).await?;
            let v: Vec<i64> = rows.iter().map(|r| r.try_get(1)).collect::<Result<_, _>>()?;
            Ok::<_, tokio_postgres::Error>(Totals {
                last_24h: v.first().copied().unwrap_or(0),
                last_7d: v.get(1).copied().unwrap_or(0),
                last_30d: v.get(2).copied().unwrap_or(0),
            })
        }
    };
    let logins = totals(&detect.success_actions).await?;
    let failed_logins = totals(&detect.failure_actions).await?;
    let actions_per_day = tx
        .query(queries::USER_ACTIONS_PER_DAY, &[&user_id, &hour_floor(since)])
        .await?
        .iter()
        .map(|r| Ok(DayActions { day: r.try_get(0)?, action: r.try_get(1)?, events: r.try_get(2)? }))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let origins = tx.query_one(queries::USER_DISTINCT_ORIGINS, &[&user_id, &since]).await?;
    let distinct_ips: Option<Vec<String>> = origins.try_get(0)?;
    let distinct_user_agents: Option<Vec<String>> = origins.try_get(1)?;
    tx.commit().await?;
    Ok(Json(UserActivity {
        user_id,
        days,
        open_sessions,
        recent_sessions,
        logins,
        failed_logins,
        actions_per_day,
        distinct_ips: distinct_ips.unwrap_or_default(),
        distinct_user_agents: distinct_user_agents.unwrap_or_default(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryParams {
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Count {
    pub name: String,
    pub events: i64,
}

#[derive(Debug, Serialize)]
pub struct HourCount {
    pub hour: DateTime<Utc>,
    pub events: i64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    /// The range, widened to whole hours (the rollups' grain).
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub active_sessions: i64,
    pub active_users: i64,
    pub top_actions: Vec<Count>,
    pub admin_actions_per_admin: Vec<Count>,
    pub busiest_hours: Vec<HourCount>,
}

pub async fn summary(State(ctx): State<Ctx>, ApiQuery(p): ApiQuery<SummaryParams>) -> Result<Json<Summary>, ApiError> {
    let now = Utc::now();
    let from = params::optional_timestamp("from", p.from.as_deref())?.unwrap_or(now - TimeDelta::days(1));
    let to = params::optional_timestamp("to", p.to.as_deref())?.unwrap_or(now);
    params::check_range(Some(from), Some(to))?;
    if to - from > TimeDelta::days(MAX_DAYS as i64) {
        return Err(ApiError::bad_request("invalid_range", format!("the range may span at most {MAX_DAYS} days")));
    }
    let hour = TimeDelta::hours(1);
    let from = from.duration_trunc(hour).unwrap_or(from);
    let to = match to.duration_trunc(hour) {
        Ok(t) if t == to => t,
        Ok(t) => t + hour,
        Err(_) => to,
    };
    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let active_sessions: i64 = tx.query_one(crate::store::queries::ACTIVE_SESSIONS, &[]).await?.try_get(0)?;
    let active_users: i64 = tx.query_one(queries::ACTIVE_USERS, &[&from, &to]).await?.try_get(0)?;
    let counts = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| Ok(Count { name: r.try_get(0)?, events: r.try_get(1)? }))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
    };
    let top_actions = counts(tx.query(queries::TOP_ACTIONS, &[&from, &to, &TOP]).await?)?;
    let admin_actions_per_admin = counts(tx.query(queries::ADMIN_ACTIONS_PER_ADMIN, &[&from, &to, &TOP]).await?)?;
    let busiest_hours = tx
        .query(queries::BUSIEST_HOURS, &[&from, &to, &5i64])
        .await?
        .iter()
        .map(|r| Ok(HourCount { hour: r.try_get(0)?, events: r.try_get(1)? }))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    tx.commit().await?;
    Ok(Json(Summary { from, to, active_sessions, active_users, top_actions, admin_actions_per_admin, busiest_hours }))
}
