//! Writes one batch in ONE transaction: its rows into audit_logs (duplicate
//! event_ids skipped), its dead-letter records, and the next offset of every
//! partition it covers. Either all of it commits or none of it does, which
//! is what makes ingest exactly-once.

use std::collections::HashSet;
use std::pin::pin;

use futures::SinkExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::copy_format::{CopyEncoder, RowRef};
use super::{is_data_error, is_unique_violation, queries};
use crate::activity::{ActivityConfig, ActivityDeltas};
use crate::detect::Transition;

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
    /// Alert transitions and whether each was published.
    pub alerts: Vec<(&'a Transition, bool)>,
    /// Sessions and rollups to keep, when the activity tracker is on.
    pub activity: Option<&'a ActivityConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteResult {
    /// Rows new to audit_logs.
    pub inserted: u64,
    /// Rows whose event_id was already stored.
    pub duplicates: u64,
    /// True when the batch took the de-duplicating path.
    pub staged: bool,
    /// Activity delta rows appended (for the compactor's pacing).
    pub activity_deltas: u64,
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
    /// What had to be acknowledged elsewhere first (the routed records) was
    /// not. Nothing was committed; retry the same batch later.
    #[error("not committed: {0}")]
    NotReady(String),
}

/// Writes and commits the set. The client must not be inside a transaction.
pub async fn write(client: &mut Client, set: &WriteSet<'_>, method: InsertMethod) -> Result<WriteResult, WriteError> {
    write_when(client, set, method, async { Ok(()) }).await
}

/// Writes the set and commits it once `ready` has succeeded too; `ready`
/// runs while the statements do (the routed records' acknowledgements,
/// awaited beside PostgreSQL's work instead of before it).
pub async fn write_when(
    client: &mut Client,
    set: &WriteSet<'_>,
    method: InsertMethod,
    ready: impl std::future::Future<Output = Result<(), String>>,
) -> Result<WriteResult, WriteError> {
    let mut tx = client.transaction().await?;
    let statements = async {
        let (mut result, inserted) = insert_rows(&mut tx, &set.rows, method).await?;
        if let Some(cfg) = set.activity {
            // From the rows actually inserted: a duplicate adds nothing.
            let events = set.rows.iter().filter(|r| inserted.contains(&r.event.event_id)).map(|r| r.event);
            let deltas = ActivityDeltas::from_events(cfg, events);
            deltas.write(&tx).await?;
            result.activity_deltas = deltas.rows() as u64;
        }
        record_dead_letters(&tx, set).await?;
        record_alerts(&tx, &set.alerts).await?;
        advance_offsets(&tx, set).await?;
        Ok::<_, WriteError>(result)
    };
    let (result, ready) = tokio::join!(statements, ready);
    let result = result?;
    ready.map_err(WriteError::NotReady)?;
    tx.commit().await?;
    Ok(result)
}

/// Which rows a write inserted: all of them, or only these event_ids.
enum Inserted {
    All,
    Only(HashSet<Uuid>),
}

impl Inserted {
    fn contains(&self, id: &Uuid) -> bool {
        match self {
            Inserted::All => true,
            Inserted::Only(ids) => ids.contains(id),
        }
    }
}

async fn insert_rows(
    tx: &mut Transaction<'_>,
    rows: &[RowRef<'_>],
    method: InsertMethod,
) -> Result<(WriteResult, Inserted), WriteError> {
    if rows.is_empty() {
        return Ok((WriteResult::default(), Inserted::All));
    }
    if method == InsertMethod::OptimisticCopy {
        let attempt = {
            let sp = tx.savepoint("optimistic_copy").await?;
            match copy_rows(&sp, queries::COPY_AUDIT_LOGS, rows.iter()).await {
                Ok(n) => sp.commit().await.map(|_| Some(n)),
                // Dropping the savepoint rolls back to it.
                Err(e) if is_unique_violation(&e) || is_data_error(&e) => Ok(None),
                Err(e) => Err(e),
            }
        }?;
        if let Some(inserted) = attempt {
            return Ok((WriteResult { inserted, duplicates: 0, staged: false, activity_deltas: 0 }, Inserted::All));
        }
    }
    let refs: Vec<&RowRef<'_>> = rows.iter().collect();
    let attempt = {
        let sp = tx.savepoint("dedup_insert").await?;
        match dedup_insert(&sp, &refs, method).await {
            Ok(ids) => sp.commit().await.map(|_| Some(ids)),
            Err(e) if is_data_error(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }?;
    match attempt {
        Some(ids) => {
            let inserted = ids.len() as u64;
            let result =
                WriteResult { inserted, duplicates: rows.len() as u64 - inserted, staged: true, activity_deltas: 0 };
            Ok((result, Inserted::Only(ids)))
        }
        None => Err(WriteError::Rejected(find_rejected(tx, rows).await?)),
    }
}

async fn dedup_insert(
    tx: &Transaction<'_>,
    rows: &[&RowRef<'_>],
    method: InsertMethod,
) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    match method {
        InsertMethod::Unnest => insert_unnest(tx, rows).await,
        InsertMethod::OptimisticCopy | InsertMethod::Staged => insert_staged(tx, rows).await,
    }
}

/// Bisects the batch under savepoints to name the rows PostgreSQL refuses.
/// Everything it inserts is rolled back; the caller retries without them.
async fn find_rejected(
    tx: &mut Transaction<'_>,
    rows: &[RowRef<'_>],
) -> Result<Vec<(usize, String)>, tokio_postgres::Error> {
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
    rows: impl ExactSizeIterator<Item = &'r RowRef<'r>>,
) -> Result<u64, tokio_postgres::Error> {
    // Sized for a typical row, so the buffer rarely grows (and copies).
    let mut encoder = CopyEncoder::with_capacity(rows.len() * 384);
    for row in rows {
        encoder.push(row);
    }
    let sink = tx.copy_in(statement).await?;
    let mut sink = pin!(sink);
    sink.send(encoder.finish().freeze()).await?;
    sink.finish().await
}

/// Returns the event_ids it inserted (the others were stored already).
async fn insert_staged(tx: &Transaction<'_>, rows: &[&RowRef<'_>]) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    tx.batch_execute(queries::CREATE_STAGING).await?;
    tx.batch_execute(queries::TRUNCATE_STAGING).await?;
    copy_rows(tx, queries::COPY_STAGING, rows.iter().copied()).await?;
    Ok(tx.query(queries::INSERT_FROM_STAGING, &[]).await?.iter().map(|r| r.get(0)).collect())
}

async fn insert_unnest(tx: &Transaction<'_>, rows: &[&RowRef<'_>]) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
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
    let inserted = tx
        .query(
            queries::INSERT_UNNEST,
            &[
                &event_id,
                &created_at,
                &received_at,
                &action,
                &user_id,
                &username,
                &ip,
                &user_agent,
                &session_id,
                &request_id,
                &metadata,
                &partition,
                &offset,
            ],
        )
        .await?;
    Ok(inserted.iter().map(|r| r.get(0)).collect())
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
    tx.execute(queries::INSERT_DEAD_LETTERS, &[&set.topic, &partitions, &offsets, &codes, &reasons, &sizes]).await?;
    Ok(())
}

/// Stores alert transitions; a re-detection after a restart (same alert_id
/// and state) is stored once.
pub async fn record_alerts(tx: &Transaction<'_>, alerts: &[(&Transition, bool)]) -> Result<(), tokio_postgres::Error> {
    if alerts.is_empty() {
        return Ok(());
    }
    let ts = |m: i64| chrono::DateTime::from_timestamp_micros(m).unwrap_or_default();
    let ids: Vec<uuid::Uuid> = alerts.iter().map(|(a, _)| a.alert_id).collect();
    let rules: Vec<&str> = alerts.iter().map(|(a, _)| a.rule.as_str()).collect();
    let subjects: Vec<&str> = alerts.iter().map(|(a, _)| a.subject.as_str()).collect();
    let key_specs: Vec<&str> = alerts.iter().map(|(a, _)| a.key_spec.as_str()).collect();
    let key_hashes: Vec<i64> = alerts.iter().map(|(a, _)| a.key_hash as i64).collect();
    let states: Vec<&str> = alerts.iter().map(|(a, _)| a.state.as_str()).collect();
    let severities: Vec<&str> = alerts.iter().map(|(a, _)| a.severity.as_str()).collect();
    let counts: Vec<i64> = alerts.iter().map(|(a, _)| i64::from(a.count)).collect();
    let thresholds: Vec<i64> = alerts.iter().map(|(a, _)| i64::from(a.threshold)).collect();
    let windows: Vec<i64> = alerts.iter().map(|(a, _)| a.window_seconds as i64).collect();
    let starts: Vec<chrono::DateTime<chrono::Utc>> = alerts.iter().map(|(a, _)| ts(a.episode_start)).collect();
    let firsts: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        alerts.iter().map(|(a, _)| a.first_event_at.map(ts)).collect();
    let lasts: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        alerts.iter().map(|(a, _)| a.last_event_at.map(ts)).collect();
    // uuid[] per row cannot go through unnest (arrays must be rectangular):
    // each row's samples travel as one comma-separated text.
    let samples: Vec<String> = alerts
        .iter()
        .map(|(a, _)| a.sample_event_ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(","))
        .collect();
    let actions: Vec<&str> = alerts.iter().map(|(a, _)| a.recommended_action.as_str()).collect();
    let detected: Vec<chrono::DateTime<chrono::Utc>> = alerts.iter().map(|(a, _)| ts(a.detected_at)).collect();
    let published: Vec<bool> = alerts.iter().map(|(_, p)| *p).collect();
    let partitions: Vec<Option<i32>> = alerts.iter().map(|(a, _)| (a.partition >= 0).then_some(a.partition)).collect();
    tx.execute(
        queries::INSERT_ALERTS,
        &[
            &ids,
            &rules,
            &subjects,
            &key_specs,
            &key_hashes,
            &states,
            &severities,
            &counts,
            &thresholds,
            &windows,
            &starts,
            &firsts,
            &lasts,
            &samples,
            &actions,
            &detected,
            &published,
            &partitions,
        ],
    )
    .await?;
    Ok(())
}

/// The newest event time among `rows` of each of `partitions` (None where
/// the batch stored none: only dead letters, say).
fn newest_event_times(rows: &[RowRef<'_>], partitions: &[i32]) -> Vec<Option<chrono::DateTime<chrono::Utc>>> {
    let mut newest: Vec<Option<i64>> = vec![None; partitions.len()];
    for row in rows {
        if let Some(i) = partitions.iter().position(|p| *p == row.partition) {
            newest[i] = newest[i].max(Some(row.event.occurred_at));
        }
    }
    newest.into_iter().map(|t| t.and_then(chrono::DateTime::from_timestamp_micros)).collect()
}

async fn advance_offsets(tx: &Transaction<'_>, set: &WriteSet<'_>) -> Result<(), WriteError> {
    if set.offsets.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = set.offsets.iter().map(|o| o.partition).collect();
    let next: Vec<i64> = set.offsets.iter().map(|o| o.next_offset).collect();
    let expected: Vec<Option<i64>> = set.offsets.iter().map(|o| o.expected).collect();
    let newest = newest_event_times(&set.rows, &partitions);
    let moved: Vec<i32> = tx
        .query(queries::ADVANCE_OFFSETS, &[&set.group, &set.topic, &partitions, &next, &expected, &newest])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let fenced: Vec<i32> = partitions.into_iter().filter(|p| !moved.contains(p)).collect();
    if fenced.is_empty() { Ok(()) } else { Err(WriteError::Fenced(fenced)) }
}
