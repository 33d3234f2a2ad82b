//! Connections and transactions of the API pool. Every API statement runs
//! in a transaction with a local `statement_timeout`, and waiting for a
//! connection is bounded the same way, so a slow query or a busy pool
//! answers 503 instead of hanging; ingest has its own pool and never waits
//! for these.

use std::time::Duration;

use deadpool_postgres::{Object, Timeouts, Transaction};

use super::ApiContext;
use super::error::ApiError;
use super::queries;

/// A connection of the API pool, waiting at most the statement timeout.
pub async fn connection(ctx: &ApiContext) -> Result<Object, ApiError> {
    let api = &ctx.config.api;
    let timeouts = Timeouts {
        wait: Some(api.statement_timeout),
        create: Some(ctx.config.database.connect_timeout),
        recycle: Some(ctx.config.database.connect_timeout),
    };
    Ok(ctx.pool.timeout_get(&timeouts).await?)
}

/// A read-only transaction with the API statement timeout.
pub async fn read_only<'a>(conn: &'a mut Object, statement_timeout: Duration) -> Result<Transaction<'a>, ApiError> {
    let tx = conn.build_transaction().read_only(true).start().await?;
    tx.query_one(queries::SET_STATEMENT_TIMEOUT, &[&millis(statement_timeout)]).await?;
    Ok(tx)
}

/// A read-write transaction with the API statement timeout.
pub async fn read_write<'a>(conn: &'a mut Object, statement_timeout: Duration) -> Result<Transaction<'a>, ApiError> {
    let tx = conn.transaction().await?;
    tx.query_one(queries::SET_STATEMENT_TIMEOUT, &[&millis(statement_timeout)]).await?;
    Ok(tx)
}

/// A duration as the text `set_config` takes (milliseconds).
pub fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}
