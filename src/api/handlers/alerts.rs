//! `GET /api/v1/audit/alerts`: the detectors' alert transitions (the
//! `alerts` table), filtered by `state`, `rule`, `subject`, `severity` and
//! `since`, newest first, keyset-paginated like the logs.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use super::logs::Page;
use crate::api::error::ApiError;
use crate::api::extract::ApiQuery;
use crate::api::params::{self, MAX_LIMIT};
use crate::api::queries::{AlertSearch, param_refs};
use crate::api::{Ctx, cursor, db};

const CURSOR_KIND: &str = "alerts";
const STATES: &[&str] = &["firing", "escalated", "resolved"];
const SEVERITIES: &[&str] = &["warning", "critical"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertParams {
    pub state: Option<String>,
    pub rule: Option<String>,
    pub subject: Option<String>,
    pub severity: Option<String>,
    pub since: Option<String>,
    pub limit: Option<u64>,
    pub cursor: Option<String>,
}

/// One alert transition.
#[derive(Debug, Clone, Serialize)]
pub struct AlertRow {
    pub id: i64,
    pub alert_id: Uuid,
    pub rule: String,
    pub subject: String,
    pub state: String,
    pub severity: String,
    pub count: i64,
    pub threshold: i64,
    pub window_seconds: i64,
    pub episode_start: DateTime<Utc>,
    pub first_event_at: Option<DateTime<Utc>>,
    pub last_event_at: Option<DateTime<Utc>>,
    pub sample_event_ids: Vec<Uuid>,
    pub recommended_action: String,
    pub detected_at: DateTime<Utc>,
    pub published: bool,
}

impl AlertRow {
    /// Reads a row selected with `queries::ALERT_COLUMNS`.
    pub fn from_row(row: &Row) -> Result<AlertRow, tokio_postgres::Error> {
        Ok(AlertRow {
            id: row.try_get(0)?,
            alert_id: row.try_get(1)?,
            rule: row.try_get(2)?,
            subject: row.try_get(3)?,
            state: row.try_get(4)?,
            severity: row.try_get(5)?,
            count: row.try_get(6)?,
            threshold: row.try_get(7)?,
            window_seconds: row.try_get(8)?,
            episode_start: row.try_get(9)?,
            first_event_at: row.try_get(10)?,
            last_event_at: row.try_get(11)?,
            sample_event_ids: row.try_get(12)?,
            recommended_action: row.try_get(13)?,
            detected_at: row.try_get(14)?,
            published: row.try_get(15)?,
        })
    }
}

fn one_of(name: &str, value: Option<&str>, allowed: &[&str]) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if !allowed.contains(&v) => {
            Err(ApiError::bad_request("invalid_parameter", format!("{name} must be one of {}", allowed.join(", "))))
        }
        v => Ok(v.map(str::to_owned)),
    }
}

pub async fn list(
    State(ctx): State<Ctx>,
    ApiQuery(p): ApiQuery<AlertParams>,
) -> Result<Json<Page<AlertRow>>, ApiError> {
    let limit = params::limit(p.limit, 100, MAX_LIMIT)?;
    let after = match p.cursor.as_deref() {
        Some(text) => {
            let (at, id) = cursor::decode(CURSOR_KIND, text)?;
            let id = id
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not one returned by this endpoint"))?;
            Some((at, id))
        }
        None => None,
    };
    let search = AlertSearch {
        state: one_of("state", p.state.as_deref(), STATES)?,
        severity: one_of("severity", p.severity.as_deref(), SEVERITIES)?,
        rule: params::optional_text("rule", p.rule.as_deref(), 256)?,
        subject: params::optional_text("subject", p.subject.as_deref(), 512)?,
        since: params::optional_timestamp("since", p.since.as_deref())?,
        after,
        limit: limit + 1,
    };
    let (sql, params) = search.to_sql();
    let mut conn = db::connection(&ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let rows = tx.query(&sql, &param_refs(&params)).await?;
    tx.commit().await?;
    let mut items = rows.iter().map(AlertRow::from_row).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|a| cursor::encode(CURSOR_KIND, a.detected_at, &a.id.to_string()))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor, limit }))
}
