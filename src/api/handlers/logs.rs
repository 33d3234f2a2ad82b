//! `GET /api/v1/audit/logs`: the audit log search.
//!
//! Filters: `user_id`, `action` (exact, or a prefix ending in `*`), `ip`
//! (address or CIDR), `session_id`, `from` (inclusive) / `to` (exclusive).
//! Newest first. JSON pages of at most `limit` (≤ 1000) rows with an opaque
//! `next_cursor`; or `format=ndjson`, which streams the whole range (or
//! `limit` rows) from a server-side portal, 1000 rows at a time, never
//! holding the range in memory.

use std::net::IpAddr;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::api::error::ApiError;
use crate::api::extract::ApiQuery;
use crate::api::params::{self, ActionFilter, MAX_LIMIT};
use crate::api::queries::{LogSearch, param_refs};
use crate::api::{Ctx, cursor, db};

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: u64 = 100;
/// Rows fetched from the portal per round trip of an NDJSON export.
const EXPORT_CHUNK_ROWS: i32 = 1000;
const CURSOR_KIND: &str = "logs";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    pub user_id: Option<String>,
    pub action: Option<String>,
    pub ip: Option<String>,
    pub session_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: Option<u64>,
    pub cursor: Option<String>,
    /// `json` (default) or `ndjson`.
    pub format: Option<String>,
}

/// One audit_logs row as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LogRow {
    pub event_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub action: String,
    pub user_id: Option<String>,
    pub username: Option<String>,
    pub ip_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

impl LogRow {
    /// Reads a row selected with `queries::LOG_COLUMNS`.
    pub fn from_row(row: &Row) -> Result<LogRow, tokio_postgres::Error> {
        Ok(LogRow {
            event_id: row.try_get(0)?,
            created_at: row.try_get(1)?,
            received_at: row.try_get(2)?,
            action: row.try_get(3)?,
            user_id: row.try_get(4)?,
            username: row.try_get(5)?,
            ip_address: row.try_get(6)?,
            user_agent: row.try_get(7)?,
            session_id: row.try_get(8)?,
            request_id: row.try_get(9)?,
            metadata: row.try_get(10)?,
            kafka_partition: row.try_get(11)?,
            kafka_offset: row.try_get(12)?,
        })
    }
}

/// A page of a keyset-paginated listing.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    pub limit: i64,
}

/// Turns the parameters into a search (without limit), or a 400.
pub fn build_search(p: &LogParams) -> Result<LogSearch, ApiError> {
    let from = params::optional_timestamp("from", p.from.as_deref())?;
    let to = params::optional_timestamp("to", p.to.as_deref())?;
    params::check_range(from, to)?;
    Ok(LogSearch {
        user_id: params::optional_text("user_id", p.user_id.as_deref(), 256)?,
        action: p.action.as_deref().map(ActionFilter::parse).transpose()?,
        ip: p.ip.as_deref().map(params::ip_filter).transpose()?,
        session_id: params::optional_text("session_id", p.session_id.as_deref(), 256)?,
        from,
        to,
        after: p.cursor.as_deref().map(decode_cursor).transpose()?,
        limit: None,
    })
}

fn decode_cursor(text: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let (at, id) = cursor::decode(CURSOR_KIND, text)?;
    let id = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not one returned by this endpoint"))?;
    Ok((at, id))
}

/// One page of `search` (its `limit` is the page size).
pub async fn page(ctx: &Ctx, mut search: LogSearch, limit: i64) -> Result<Page<LogRow>, ApiError> {
    // One row more than asked tells whether there is a next page.
    search.limit = Some(limit + 1);
    let (sql, params) = search.to_sql();
    let mut conn = db::connection(ctx).await?;
    let tx = db::read_only(&mut conn, ctx.config.api.statement_timeout).await?;
    let rows = tx.query(&sql, &param_refs(&params)).await?;
    tx.commit().await?;
    let mut items = rows.iter().map(LogRow::from_row).collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| cursor::encode(CURSOR_KIND, last.created_at, &last.event_id.to_string()))
    } else {
        None
    };
    Ok(Page { items, next_cursor, limit })
}

pub async fn search(State(ctx): State<Ctx>, ApiQuery(p): ApiQuery<LogParams>) -> Result<Response, ApiError> {
    let mut search = build_search(&p)?;
    match p.format.as_deref().unwrap_or("json") {
        "json" => {
            let limit = params::limit(p.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
            Ok(axum::Json(page(&ctx, search, limit).await?).into_response())
        }
        "ndjson" => {
            search.limit = p.limit.map(|l| params::limit(Some(l), DEFAULT_LIMIT, MAX_LIMIT)).transpose()?;
            export_ndjson(ctx, search).await
        }
        other => Err(ApiError::bad_request("invalid_format", format!("format must be json or ndjson, got `{other}`"))),
    }
}

/// Streams the search as NDJSON. The first chunk is fetched before the
/// response starts, so that a bad query still gets a proper status; an
/// error later ends the stream with an `{"error": ...}` line.
async fn export_ndjson(ctx: Ctx, search: LogSearch) -> Result<Response, ApiError> {
    let permit = ctx.streams.clone().try_acquire_owned().map_err(|_| ApiError::Unavailable {
        code: "too_many_exports",
        message: "too many NDJSON exports are running; retry later".into(),
        retry_after: Some(std::time::Duration::from_secs(5)),
    })?;
    let conn = db::connection(&ctx).await?;
    let (first_tx, first_rx) = oneshot::channel();
    let (rest_tx, rest_rx) = mpsc::channel::<Bytes>(2);
    let timeout = ctx.config.api.statement_timeout;
    tokio::spawn(async move {
        let _permit = permit;
        run_export(conn, search, timeout, first_tx, rest_tx).await;
    });
    let first = first_rx.await.map_err(|_| ApiError::Internal("the export task ended early".into()))??;
    let rest = futures::stream::unfold(rest_rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) });
    let body = futures::stream::once(async move { first }).chain(rest).map(Ok::<_, std::io::Error>);
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response())
}

/// Where the next chunk of an export goes.
enum Sink {
    First(oneshot::Sender<Result<Bytes, ApiError>>),
    Body(mpsc::Sender<Bytes>),
}

async fn run_export(
    mut conn: deadpool_postgres::Object,
    search: LogSearch,
    timeout: std::time::Duration,
    first: oneshot::Sender<Result<Bytes, ApiError>>,
    rest: mpsc::Sender<Bytes>,
) {
    let mut sink = Sink::First(first);
    let result: Result<(), ApiError> = async {
        let tx = db::read_only(&mut conn, timeout).await?;
        let (sql, params) = search.to_sql();
        let statement = tx.prepare(&sql).await?;
        let portal = tx.bind(&statement, &param_refs(&params)).await?;
        loop {
            let rows = tx.query_portal(&portal, EXPORT_CHUNK_ROWS).await?;
            let last_chunk = rows.len() < EXPORT_CHUNK_ROWS as usize;
            let mut buf = Vec::with_capacity(rows.len() * 512);
            for row in &rows {
                serde_json::to_writer(&mut buf, &LogRow::from_row(row)?)
                    .map_err(|e| ApiError::Internal(format!("serialising a log row: {e}")))?;
                buf.push(b'\n');
            }
            let delivered = match std::mem::replace(&mut sink, Sink::Body(rest.clone())) {
                Sink::First(tx) => tx.send(Ok(Bytes::from(buf))).is_ok(),
                Sink::Body(tx) => tx.send(Bytes::from(buf)).await.is_ok(),
            };
            // The client went away: stop reading (the transaction rolls back).
            if !delivered || last_chunk {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        match sink {
            Sink::First(tx) => {
                let _ = tx.send(Err(e));
            }
            Sink::Body(tx) => {
                tracing::warn!(error = ?e, "NDJSON export failed part way");
                let mut line = e.body().to_string().into_bytes();
                line.push(b'\n');
                let _ = tx.send(Bytes::from(line)).await;
            }
        }
    }
}
