//! The runbook's "Compliance and Reporting" queries as endpoints:
//! - `reports/daily?date=`: events per action for a UTC day (default: the
//!   last 24 hours);
//! - `reports/security-incidents?since=`: `SECURITY_*` events, newest
//!   first, paginated like the logs;
//! - `reports/retention`: oldest event, events older than the policy,
//!   partitions, the last cleanup;
//! - `reports/completeness?from=&to=`: events per UTC hour, hours without
//!   events flagged.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, DurationRound, NaiveTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::logs::{self, LogRow, Page};
use crate::api::error::ApiError;
use crate::api::extract::ApiQuery;
use crate::api::params::{self, ActionFilter, MAX_LIMIT};
use crate::api::{Ctx, db, queries, retention};

/// Longest completeness report: 31 days of hours.
const MAX_COMPLETENESS_HOURS: i64 = 31 * 24;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyParams {
    pub date: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DailyReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub total_events: i64,
    pub actions: Vec<ActionCount>,
}

#[derive(Debug, Serialize)]
pub struct ActionCount {
    pub action: String,
    pub events: i64,
    pub distinct_users: i64,
}

pub async fn daily(State(ctx): State<Ctx>, ApiQuery(p): ApiQuery<DailyParams>) -> Result<Json<DailyReport>, ApiError> {
    let (from, to) = match p.date.as_deref() {
        Some(text) => {
            let day = params::date("date", text)?;
            let from = day.and_time(NaiveTime::MIN).and_utc();
            (from, from + TimeDelta::days(1))
        }
        None => {
            let now = Utc::now();
            (now - TimeDelta::days(1), now)
        }
    };
    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let actions = tx
        .query(queries::DAILY_ACTIONS, &[&from, &to])
        .await?
        .iter()
        .map(|r| Ok(ActionCount { action: r.try_get(0)?, events: r.try_get(1)?, distinct_users: r.try_get(2)? }))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    tx.commit().await?;
    Ok(Json(DailyReport { from, to, total_events: actions.iter().map(|a| a.events).sum(), actions }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentParams {
    pub since: Option<String>,
    pub limit: Option<u64>,
    pub cursor: Option<String>,
}

pub async fn security_incidents(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<IncidentParams>,
) -> Result<Json<Page<LogRow>>, ApiError> {
    let limit = params::limit(p.limit, logs::DEFAULT_LIMIT, MAX_LIMIT)?;
    let since =
        params::optional_timestamp("since", p.since.as_deref())?.unwrap_or_else(|| Utc::now() - TimeDelta::days(1));
    let mut search = logs::build_search(&logs::LogParams {
        user_id: None,
        action: None,
        ip: None,
        session_id: None,
        from: None,
        to: None,
        limit: None,
        cursor: p.cursor,
        format: None,
    })?;
    search.action = Some(ActionFilter::Prefix("SECURITY_".into()));
    search.from = Some(since);
    Ok(Json(logs::page(&ctx, search, limit).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionParams {
    /// The policy to check against (default `retention.days`).
    pub retention_days: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct RetentionReport {
    pub retention_days: u32,
    pub min_retention_days: u32,
    pub scheduled_cleanup: bool,
    pub cutoff: DateTime<Utc>,
    pub oldest_event_at: Option<DateTime<Utc>>,
    /// Events older than the cutoff: 0 means compliant.
    pub events_older_than_cutoff: i64,
    pub compliant: bool,
    pub partitions: PartitionSpan,
    /// Partitions a cleanup detached whose files are still being released.
    pub partitions_awaiting_purge: i64,
    pub last_cleanup: Option<LastCleanup>,
}

#[derive(Debug, Serialize)]
pub struct PartitionSpan {
    pub count: i64,
    pub first_day_from: Option<DateTime<Utc>>,
    pub last_day_to: Option<DateTime<Utc>>,
    pub size_bytes: i64,
}

#[derive(Debug, Serialize)]
pub struct LastCleanup {
    pub at: DateTime<Utc>,
    pub by: Option<String>,
    pub details: Option<serde_json::Value>,
}

pub async fn retention(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<RetentionParams>,
) -> Result<Json<RetentionReport>, ApiError> {
    let policy = &ctx.config.retention;
    let days = p.retention_days.unwrap_or(policy.days);
    if days == 0 || days > retention::MAX_RETENTION_DAYS {
        return Err(ApiError::bad_request(
            "invalid_retention_days",
            format!("retention_days must be between 1 and {}", retention::MAX_RETENTION_DAYS),
        ));
    }
    let cutoff = Utc::now() - TimeDelta::days(i64::from(days));
    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let oldest: Option<DateTime<Utc>> = tx.query_one(queries::OLDEST_EVENT, &[]).await?.try_get(0)?;
    let older: i64 = tx.query_one(queries::EVENTS_BEFORE, &[&cutoff]).await?.try_get(0)?;
    let span = tx.query_one(queries::PARTITION_SPAN, &[]).await?;
    let last = tx.query_opt(queries::LAST_CLEANUP, &[]).await?;
    let awaiting_purge: i64 = tx.query_one(queries::RETENTION_TRASH, &[]).await?.try_get(0)?;
    tx.commit().await?;
    Ok(Json(RetentionReport {
        retention_days: days,
        min_retention_days: policy.min_days,
        scheduled_cleanup: policy.scheduled,
        cutoff,
        oldest_event_at: oldest,
        events_older_than_cutoff: older,
        compliant: older == 0,
        partitions: PartitionSpan {
            count: span.try_get(0)?,
            first_day_from: span.try_get(1)?,
            last_day_to: span.try_get(2)?,
            size_bytes: span.try_get(3)?,
        },
        partitions_awaiting_purge: awaiting_purge,
        last_cleanup: last
            .map(|r| {
                Ok::<_, tokio_postgres::Error>(LastCleanup {
                    at: r.try_get(0)?,
                    by: r.try_get(1)?,
                    details: r.try_get(2)?,
                })
            })
            .transpose()?,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletenessParams {
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CompletenessReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub total_events: i64,
    pub hours: Vec<HourCount>,
    pub empty_hours: usize,
}

#[derive(Debug, Serialize)]
pub struct HourCount {
    pub hour: DateTime<Utc>,
    pub events: i64,
    /// No event in this hour: a gap worth a look.
    pub empty: bool,
}

pub async fn completeness(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<CompletenessParams>,
) -> Result<Json<CompletenessReport>, ApiError> {
    let hour = TimeDelta::hours(1);
    let floor_hour = |t: DateTime<Utc>| t.duration_trunc(hour).unwrap_or(t);
    let ceil_hour = |t: DateTime<Utc>| {
        let f = floor_hour(t);
        if f == t { t } else { f + hour }
    };
    let now = Utc::now();
    let to = ceil_hour(params::optional_timestamp("to", p.to.as_deref())?.unwrap_or(now));
    let from = floor_hour(params::optional_timestamp("from", p.from.as_deref())?.unwrap_or(to - TimeDelta::days(1)));
    params::check_range(Some(from), Some(to))?;
    if (to - from).num_hours() > MAX_COMPLETENESS_HOURS {
        return Err(ApiError::bad_request(
            "range_too_large",
            format!("the completeness report covers at most {MAX_COMPLETENESS_HOURS} hours (31 days)"),
        ));
    }
    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let hours = tx
        .query(queries::HOURLY_COUNTS, &[&from, &to])
        .await?
        .iter()
        .map(|r| {
            let events: i64 = r.try_get(1)?;
            Ok(HourCount { hour: r.try_get(0)?, events, empty: events == 0 })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    tx.commit().await?;
    Ok(Json(CompletenessReport {
        from,
        to,
        total_events: hours.iter().map(|h| h.events).sum(),
        empty_hours: hours.iter().filter(|h| h.empty).count(),
        hours,
    }))
}
