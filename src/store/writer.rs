//! Writes one batch in ONE transaction: its rows into audit_logs (duplicate
//! event_ids skipped), its dead-letter records, and the next offset of every
//! partition it covers. Either all of it commits or none of it does, which
//! is what makes ingest exactly-once.

use std::pin::pin;

use futures::SinkExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Transaction};

use super::copy_format::{CopyEncoder, RowRef};
use super::{is_data_error, is_unique_violation, queries};

/// How rows get into audit_logs. Chosen by measurement; see BENCHMARKS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InsertMethod {
    /// Binary COPY straight into audit_logs; on a duplicate event_id the
    /// batch falls back to `Staged`. Duplicates are rare (producer retries),
    /// so nearly every batch costs one COPY.
    #[default]
    OptimisticCopy,
    /// Binary COPY into a temporary table, then INSERT ... ON CONFLICT DO
    /// NOTHING.
    Staged,
    /// INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING.
    Unnest,
}

/// One dead-lettered message as recorded in `dead_letters`.
pub struct DeadLetterRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub reason_code: &'a str,
    pub reason: &'a str,
    pub payload_bytes: i32,
}

/// Where a partition's stored offset moves to, and where this consumer
/// believes it is now (the fence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetAdvance {
    pub partition: i32,
    /// The stored `next_offset` this consumer last read or wrote; `None`
    /// when the partition had no row.
    pub expected: Option<i64>,
    pub next_offset: i64,
}

pub struct WriteSet<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub rows: Vec<RowRef<'a>>,
    pub dead: Vec<DeadLetterRecord<'a>>,
    pub offsets: Vec<OffsetAdvance>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteResult {
    /// Rows new to audit_logs.
    pub inserted: u64,
    /// Rows whose event_id was already stored.
    pub duplicates: u64,
    /// True when the batch took the de-duplicating path.
    pub staged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Nothing was committed; retry the same batch later.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// PostgreSQL refused these rows (indexes into `WriteSet::rows`, with
    /// the server's message). Nothing was committed: dead-letter them and
    /// write the batch again without them.
    #[error("PostgreSQL rejected {} row(s)", .0.len())]
    Rejected(Vec<(usize, String)>),
    /// Another consumer moved these partitions' offsets since we read them.
    /// Nothing was committed: this consumer no longer owns their position.
    #[error("offsets of partitions {0:?} were moved by another consumer")]
    Fenced(Vec<i32>),
}

/// Writes and commits the set. The client must not be inside a transaction.
pub async fn write(client: &mut Client, set: &WriteSet<'_>, method: InsertMethod) -> Result<WriteResult, WriteError> {
    let mut tx = client.transaction().await?;
    let result = insert_rows(&mut tx, &set.rows, method).await?;
    record_dead_letters(&tx, set).await?;
    advance_offsets(&tx, set).await?;
    tx.commit().await?;
    Ok(result)
}

async fn insert_rows(tx: &mut Transaction<'_>, rows: &[RowRef<'_>], method: InsertMethod) -> Result<WriteResult, WriteError> {
    if rows.is_empty() {
        return Ok(WriteResult::default());
    }
    if method == InsertMethod::OptimisticCopy {
        let attempt = {
            let sp = tx.savepoint("optimistic_copy").await?;
            match copy_rows(&sp, queries::COPY_AUDIT_LOGS, rows).await {
                Ok(n) => sp.commit().await.map(|_| Some(n)),
                // Dropping the savepoint rolls back to it.
                Err(e) if is_unique_violation(&e) || is_data_error(&e) => Ok(None),
                Err(e) => Err(e),
            }
        }?;
        if let Some(inserted) = attempt {
            return Ok(WriteResult { inserted, duplicates: 0, staged: false });
        }
    }
    let refs: Vec<&RowRef<'_>> = rows.iter().collect();
    let attempt = {
        let sp = tx.savepoint("dedup_insert").await?;
        match dedup_insert(&sp, &refs, method).await {
            Ok(n) => sp.commit().await.map(|_| Some(n)),
            Err(e) if is_data_error(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }?;
    match attempt {
        Some(inserted) => Ok(WriteResult { inserted, duplicates: rows.len() as u64 - inserted, staged: true }),
        None => Err(WriteError::Rejected(find_rejected(tx, rows).await?)),
    }
}

async fn dedup_insert(tx: &Transaction<'_>, rows: &[&RowRef<'_>], method: InsertMethod) -> Result<u64, tokio_postgres::Error> {
    match method {
        InsertMethod::Unnest => insert_unnest(tx, rows).await,
        InsertMethod::OptimisticCopy | InsertMethod::Staged => insert_staged(tx, rows).await,
    }
}

/// Bisects the batch under savepoints to name the rows PostgreSQL refuses.
/// Everything it inserts is rolled back; the caller retries without them.
async fn find_rejected(tx: &mut Transaction<'_>, rows: &[RowRef<'_>]) -> Result<Vec<(usize, String)>, tokio_postgres::Error> {
    let mut rejected = Vec::new();
    let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
    pending.push(0..rows.len());
    while let Some(range) = pending.pop() {
        let sp = tx.savepoint("probe").await?;
        let subset: Vec<&RowRef<'_>> = rows[range.clone()].iter().collect();
        let outcome = insert_staged(&sp, &subset).await;
        sp.rollback().await?;
        match outcome {
            Ok(_) => {}
            Err(e) if is_data_error(&e) => {
                if range.len() == 1 {
                    let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
                    rejected.push((range.start, message));
                } else {
                    let mid = range.start + range.len() / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                }
            }
            Err(e) => return Err(e),
        }
    }
    rejected.sort_by_key(|(i, _)| *i);
    Ok(rejected)
}

async fn copy_rows<'r>(
    tx: &Transaction<'_>,
    statement: &str,
    rows: impl IntoIterator<Item = &'r RowRef<'r>>,
) -> Result<u64, tokio_postgres::Error> {
    let mut encoder = CopyEncoder::with_capacity(256 * 1024);
    for row in rows {
        encoder.push(row);
    }
    let sink = tx.copy_in(statement).await?;
    let mut sink = pin!(sink);
    sink.send(encoder.finish().freeze()).await?;
    sink.finish().await
}

async fn insert_staged(tx: &Transaction<'_>, rows: &[&RowRef<'_>]) -> Result<u64, tokio_postgres::Error> {
    tx.batch_execute(queries::CREATE_STAGING).await?;
    tx.batch_execute(queries::TRUNCATE_STAGING).await?;
    copy_rows(tx, queries::COPY_STAGING, rows.iter().copied()).await?;
    tx.execute(queries::INSERT_FROM_STAGING, &[]).await
}

async fn insert_unnest(tx: &Transaction<'_>, rows: &[&RowRef<'_>]) -> Result<u64, tokio_postgres::Error> {
    use crate::event::EpochMicros;
    fn ts(micros: EpochMicros) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_micros(micros).unwrap_or_default()
    }
    let mut event_id = Vec::with_capacity(rows.len());
    let mut created_at = Vec::with_capacity(rows.len());
    let mut received_at = Vec::with_capacity(rows.len());
    let mut action = Vec::with_capacity(rows.len());
    let mut user_id = Vec::with_capacity(rows.len());
    let mut username = Vec::with_capacity(rows.len());
    let mut ip = Vec::with_capacity(rows.len());
    let mut user_agent = Vec::with_capacity(rows.len());
    let mut session_id = Vec::with_capacity(rows.len());
    let mut request_id = Vec::with_capacity(rows.len());
    let mut metadata = Vec::with_capacity(rows.len());
    let mut partition = Vec::with_capacity(rows.len());
    let mut offset = Vec::with_capacity(rows.len());
    for r in rows {
        let e = r.event;
        event_id.push(e.event_id);
        created_at.push(ts(e.occurred_at));
        received_at.push(ts(r.received_at));
        action.push(e.action.as_str());
        user_id.push(e.user_id.as_deref());
        username.push(e.username.as_deref());
        ip.push(e.ip_address.map(|a| a.to_string()));
        user_agent.push(e.user_agent.as_deref());
        session_id.push(e.session_id.as_deref());
        request_id.push(e.request_id.as_deref());
        metadata.push((!e.metadata.is_empty()).then(|| {
            serde_json::Value::Object(
                e.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
            )
        }));
        partition.push(r.partition);
        offset.push(r.offset);
    }
    tx.execute(
        queries::INSERT_UNNEST,
        &[
            &event_id, &created_at, &received_at, &action, &user_id, &username, &ip, &user_agent, &session_id,
            &request_id, &metadata, &partition, &offset,
        ],
    )
    .await
}

async fn record_dead_letters(tx: &Transaction<'_>, set: &WriteSet<'_>) -> Result<(), tokio_postgres::Error> {
    if set.dead.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = set.dead.iter().map(|d| d.partition).collect();
    let offsets: Vec<i64> = set.dead.iter().map(|d| d.offset).collect();
    let codes: Vec<&str> = set.dead.iter().map(|d| d.reason_code).collect();
    let reasons: Vec<&str> = set.dead.iter().map(|d| d.reason).collect();
    let sizes: Vec<i32> = set.dead.iter().map(|d| d.payload_bytes).collect();
    tx.execute(queries::INSERT_DEAD_LETTERS, &[&set.topic, &partitions, &offsets, &codes, &reasons, &sizes])
        .await?;
    Ok(())
}

async fn advance_offsets(tx: &Transaction<'_>, set: &WriteSet<'_>) -> Result<(), WriteError> {
    if set.offsets.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = set.offsets.iter().map(|o| o.partition).collect();
    let next: Vec<i64> = set.offsets.iter().map(|o| o.next_offset).collect();
    let expected: Vec<Option<i64>> = set.offsets.iter().map(|o| o.expected).collect();
    let moved: Vec<i32> = tx
        .query(queries::ADVANCE_OFFSETS, &[&set.group, &set.topic, &partitions, &next, &expected])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let fenced: Vec<i32> = partitions.into_iter().filter(|p| !moved.contains(p)).collect();
    if fenced.is_empty() { Ok(()) } else { Err(WriteError::Fenced(fenced)) }
}
