//! Every SQL statement the service runs, named. Schema lives in
//! `migrations/`; these are the statements that use it.

/// Fast path: the batch straight into the partitioned table. Fails as a
/// whole on a duplicate event_id, after which the writer takes the staged
/// path for that batch.
pub const COPY_AUDIT_LOGS: &str = "COPY audit_logs (event_id, created_at, received_at, action, user_id, username, \
     ip_address, user_agent, session_id, request_id, metadata, kafka_partition, kafka_offset) FROM STDIN BINARY";

/// Session-local staging table for the de-duplicating path.
pub const CREATE_STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS audit_logs_staging \
     (LIKE audit_logs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS";

pub const COPY_STAGING: &str = "COPY audit_logs_staging (event_id, created_at, received_at, action, user_id, \
     username, ip_address, user_agent, session_id, request_id, metadata, kafka_partition, kafka_offset) \
     FROM STDIN BINARY";

pub const TRUNCATE_STAGING: &str = "TRUNCATE audit_logs_staging";

/// Moves the staged rows in, skipping event_ids already stored.
pub const INSERT_FROM_STAGING: &str = "INSERT INTO audit_logs SELECT * FROM audit_logs_staging \
     ON CONFLICT (event_id, created_at) DO NOTHING RETURNING event_id";

/// The row-at-a-time alternative to COPY, kept for the insert-method
/// benchmark: arrays in, duplicates skipped.
pub const INSERT_UNNEST: &str = "
INSERT INTO audit_logs (event_id, created_at, received_at, action, user_id, username, ip_address, user_agent,
                        session_id, request_id, metadata, kafka_partition, kafka_offset)
SELECT event_id, created_at, received_at, action, user_id, username, ip::inet, user_agent,
       session_id, request_id, metadata, kafka_partition, kafka_offset
  FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[],
              $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::int[], $13::bigint[])
       AS t(event_id, created_at, received_at, action, user_id, username, ip, user_agent,
            session_id, request_id, metadata, kafka_partition, kafka_offset)
ON CONFLICT (event_id, created_at) DO NOTHING
RETURNING event_id";

/// Advances the stored offsets of a batch's partitions, fenced: a partition
/// moves only from the offset this consumer last read or wrote for it
/// (`expected`, NULL when there was no row). Returns the partitions that
/// moved; a missing one means another consumer wrote it in between.
/// $1 group, $2 topic, $3 partitions, $4 next offsets, $5 expected offsets,
/// $6 the newest event time stored per partition by this batch (NULL: none,
/// or a routed consumer; migrations/0010).
pub const ADVANCE_OFFSETS: &str = "
WITH input AS (
    SELECT * FROM unnest($3::int[], $4::bigint[], $5::bigint[], $6::timestamptz[])
               AS t(kafka_partition, next_offset, expected, max_event_time)
), updated AS (
    UPDATE consumer_offsets o
       SET next_offset = i.next_offset, updated_at = now(),
           max_event_time = greatest(o.max_event_time, i.max_event_time)
      FROM input i
     WHERE o.consumer_group = $1 AND o.topic = $2
       AND o.kafka_partition = i.kafka_partition
       AND o.next_offset = i.expected
    RETURNING o.kafka_partition
), inserted AS (
    INSERT INTO consumer_offsets (consumer_group, topic, kafka_partition, next_offset, max_event_time)
    SELECT $1, $2, i.kafka_partition, i.next_offset, i.max_event_time FROM input i WHERE i.expected IS NULL
    ON CONFLICT DO NOTHING
    RETURNING kafka_partition
)
SELECT kafka_partition FROM updated
UNION ALL
SELECT kafka_partition FROM inserted";

/// The newest event time stored through each partition's offsets (NULL
/// for rows that predate migrations/0010): where the detectors' rebuild
/// windows end. $1 group, $2 topic, $3 partitions (NULL: all).
pub const REBUILD_WINDOW_ENDS: &str = "SELECT kafka_partition, max_event_time FROM consumer_offsets \
     WHERE consumer_group = $1 AND topic = $2 AND ($3::int[] IS NULL OR kafka_partition = ANY($3::int[]))";

/// Stored positions for partitions being assigned.
/// $1 group, $2 topic, $3 partitions.
pub const STORED_OFFSETS: &str = "SELECT kafka_partition, next_offset FROM consumer_offsets \
     WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = ANY($3::int[])";

/// Records dead-lettered messages in the same transaction as the offsets
/// that move past them.
pub const INSERT_DEAD_LETTERS: &str = "
INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, reason_code, reason, payload_bytes)
SELECT $1, * FROM unnest($2::int[], $3::bigint[], $4::text[], $5::text[], $6::int[])";

/// Alert transitions of a batch. $14 holds each row's sample event ids as
/// comma-separated text; $18 the partition (NULL when not known).
pub const INSERT_ALERTS: &str = "
INSERT INTO alerts (alert_id, rule, subject, key_spec, key_hash, state, severity, count, threshold,
                    window_seconds, episode_start, first_event_at, last_event_at, sample_event_ids,
                    recommended_action, detected_at, published, kafka_partition)
SELECT alert_id, rule, subject, key_spec, key_hash, state, severity, count, threshold,
       window_seconds, episode_start, first_event_at, last_event_at,
       coalesce(string_to_array(nullif(samples, ''), ',')::uuid[], '{}'),
       recommended_action, detected_at, published, kafka_partition
  FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::bigint[],
              $9::bigint[], $10::bigint[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], $14::text[],
              $15::text[], $16::timestamptz[], $17::bool[], $18::int[])
       AS t(alert_id, rule, subject, key_spec, key_hash, state, severity, count, threshold, window_seconds,
            episode_start, first_event_at, last_event_at, samples, recommended_action, detected_at, published,
            kafka_partition)
ON CONFLICT (alert_id, state) DO NOTHING";

/// Episodes that were open when the service stopped or the partitions
/// were revoked: the newest transition of each alert_id that has no
/// `resolved` row, of the partitions $1 (and those stored without one, if
/// $2).
pub const OPEN_ALERTS: &str = "
SELECT DISTINCT ON (a.alert_id) a.alert_id, a.rule, a.key_spec, a.key_hash, a.subject, a.state, a.severity,
       a.episode_start, coalesce(a.last_event_at, a.episode_start), coalesce(a.kafka_partition, -1)
  FROM alerts a
 WHERE (a.kafka_partition = ANY($1::int[]) OR ($2 AND a.kafka_partition IS NULL))
   AND NOT EXISTS (SELECT 1 FROM alerts r WHERE r.alert_id = a.alert_id AND r.state = 'resolved')
 ORDER BY a.alert_id, a.detected_at DESC, a.id DESC";

/// Transitions of partitions $1 that Kafka has not acknowledged, in a
/// message of their own or in a storm summary (migrations/0011, 0012),
/// oldest first, with what a message needs.
pub const UNDELIVERED_ALERTS: &str = "
SELECT alert_id, rule, key_spec, key_hash, subject, state, severity, count, threshold, window_seconds,
       episode_start, first_event_at, last_event_at, sample_event_ids, recommended_action, detected_at,
       coalesce(kafka_partition, -1)
  FROM alerts
 WHERE delivered_at IS NULL AND kafka_partition = ANY($1::int[])
 ORDER BY id";

/// The same for the routed rules' keys $1 (stored without a partition:
/// the caller keeps those whose key hash lands on its routing partitions).
pub const UNDELIVERED_ROUTED_ALERTS: &str = "
SELECT alert_id, rule, key_spec, key_hash, subject, state, severity, count, threshold, window_seconds,
       episode_start, first_event_at, last_event_at, sample_event_ids, recommended_action, detected_at, -1
  FROM alerts
 WHERE delivered_at IS NULL AND kafka_partition IS NULL AND key_spec = ANY($1::text[])
 ORDER BY id";

/// Records Kafka's acknowledgement of the transitions ($1 alert ids, $2
/// states); returns those found (a transition acknowledged before its batch
/// committed is not there yet).
pub const MARK_ALERTS_DELIVERED: &str = "
UPDATE alerts a SET delivered_at = coalesce(a.delivered_at, now())
  FROM unnest($1::uuid[], $2::text[]) AS d(alert_id, state)
 WHERE a.alert_id = d.alert_id AND a.state = d.state
RETURNING a.alert_id, a.state";

/// The stored events detector state is rebuilt from: of each partition in
/// $1, those from $2 to $3 of event time, whose action is one of $6 or
/// starts with one of $7, with the partition and offset. $4..$5 spans every
/// window: it bounds the daily partitions of audit_logs that are read.
///
/// The order is either:
/// - event time ($9 false). With a lateness $8 (an interval as text), the
///   events the live detectors dropped as late are left out, as in
///   [`REPLAY_EVENTS`]; NULL keeps them all;
/// - or stream order ($9 true, $8 NULL): each partition in offset order,
///   the partitions interleaved by their clock, the newest event time seen
///   so far in that partition. A detector fed this order judges lateness
///   itself, in each stream it reads, as it did live.
pub const REBUILD_EVENTS: &str = "
SELECT event_id, created_at, action, user_id, username, ip_address, user_agent, session_id,
       request_id, metadata, kafka_partition, kafka_offset
  FROM (SELECT a.*,
               max(a.created_at) OVER (PARTITION BY a.kafka_partition ORDER BY a.kafka_offset
                                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS newest_before
          FROM audit_logs a
          JOIN unnest($1::int[], $2::timestamptz[], $3::timestamptz[]) AS w(kafka_partition, since, until)
            ON a.kafka_partition = w.kafka_partition AND a.created_at >= w.since AND a.created_at <= w.until
         WHERE a.created_at >= $4 AND a.created_at <= $5
           AND (a.action = ANY($6::text[]) OR EXISTS (SELECT 1 FROM unnest($7::text[]) p WHERE starts_with(a.action, p)))
       ) r
 WHERE $8::text IS NULL OR newest_before IS NULL OR created_at >= newest_before - $8::text::interval
 ORDER BY CASE WHEN $9::boolean THEN greatest(created_at, newest_before) ELSE created_at END, kafka_partition, kafka_offset";

/// Routed detection (migrations/0009): how far each events-topic partition
/// has been counted on the routing partitions $2 of group $1.
pub const ROUTED_PROGRESS: &str = "SELECT routed_partition, source_partition, source_offset FROM routed_progress \
     WHERE consumer_group = $1 AND routed_partition = ANY($2::int[])";
/// Moves those marks forward: $2 routing partitions, $3 source partitions,
/// $4 source offsets.
pub const ADVANCE_ROUTED_PROGRESS: &str = "
INSERT INTO routed_progress AS r (consumer_group, routed_partition, source_partition, source_offset)
SELECT $1, * FROM unnest($2::int[], $3::int[], $4::bigint[])
ON CONFLICT (consumer_group, routed_partition, source_partition)
DO UPDATE SET source_offset = greatest(r.source_offset, EXCLUDED.source_offset)";
/// Open alerts of the routed key specs $1 (the newest transition of each
/// alert_id without a `resolved` row), with the columns of [`OPEN_ALERTS`].
pub const OPEN_ROUTED_ALERTS: &str = "
SELECT DISTINCT ON (a.alert_id) a.alert_id, a.rule, a.key_spec, a.key_hash, a.subject, a.state, a.severity,
       a.episode_start, coalesce(a.last_event_at, a.episode_start), -1
  FROM alerts a
 WHERE a.key_spec = ANY($1::text[])
   AND NOT EXISTS (SELECT 1 FROM alerts r WHERE r.alert_id = a.alert_id AND r.state = 'resolved')
 ORDER BY a.alert_id, a.detected_at DESC, a.id DESC";

/// A batch's activity deltas: one row of parallel arrays, its key filter,
/// its counts per (hour, action) and its ADMIN_* counts (migrations/0004,
/// 0005, 0006, 0013).
pub const COPY_ACTIVITY_DELTAS: &str = "COPY activity_delta_batches (user_ids, hours, actions, events, session_ids, \
     s_user_ids, s_ips, s_agents, s_started, s_last_seen, s_ended, s_reasons, key_filter, h_hours, h_actions, h_events, \
     a_users, a_hours, a_actions, a_events) \
     FROM STDIN BINARY";

/// Folds pending activity deltas; returns delta rows moved.
pub const ACTIVITY_COMPACT: &str = "SELECT activity_compact()";
/// Delta entries written and not folded yet, counted as the writer counts
/// them (rollup entries, anonymous ones included, plus session entries).
pub const PENDING_ACTIVITY_DELTAS: &str =
    "SELECT coalesce(sum(cardinality(user_ids) + cardinality(session_ids)), 0)::bigint FROM activity_delta_batches";
/// Closes sessions idle since before $1 - $2 (event time); $2 is an interval as text.
pub const ACTIVITY_CLOSE_IDLE: &str = "SELECT activity_close_idle($1, $2::text::interval)";
/// Sessions open now, pending deltas included.
pub const ACTIVE_SESSIONS: &str = "SELECT open_session_count()";

/// The deployment's maintenance mode (migrations/0007); no row until the
/// first switch.
pub const MAINTENANCE_MODE: &str = "SELECT paused, reason, changed_by, changed_at, version FROM maintenance_mode";
/// Stores a switch: $1 paused, $2 reason, $3 who; returns it as stored
/// (the columns of [`MAINTENANCE_MODE`]).
pub const SET_MAINTENANCE_MODE: &str = "
INSERT INTO maintenance_mode AS m (paused, reason, changed_by, version) VALUES ($1, $2, $3, 1)
ON CONFLICT (singleton) DO UPDATE
   SET paused = EXCLUDED.paused, reason = EXCLUDED.reason, changed_by = EXCLUDED.changed_by, changed_at = now(),
       version = m.version + 1
RETURNING paused, reason, changed_by, changed_at, version";

/// Creates the missing daily partitions between two dates (inclusive).
pub const ENSURE_PARTITIONS: &str = "SELECT audit_ensure_partitions($1::date, $2::date)";

/// `audit-service replay`: the stored events the rules look at with event
/// time in [$1, $2), in event-time order, with the columns of
/// [`REBUILD_EVENTS`]; $3 exact actions, $4 action prefixes.
///
/// Without the events the live detectors dropped as late: an event older
/// than the newest before it in its partition's offset order (the order
/// they were consumed in) minus the lateness $5 (an interval as text).
/// Admin actions recorded by the API (partition -1) never went through the
/// detectors and are left out too.
pub const REPLAY_EVENTS: &str = "
SELECT event_id, created_at, action, user_id, username, ip_address, user_agent, session_id, request_id,
       metadata, kafka_partition
  FROM (SELECT *,
               max(created_at) OVER (PARTITION BY kafka_partition ORDER BY kafka_offset
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS newest_before
          FROM audit_logs
         WHERE created_at >= $1 AND created_at < $2 AND kafka_partition >= 0
           AND (action = ANY($3::text[]) OR EXISTS (SELECT 1 FROM unnest($4::text[]) p WHERE starts_with(action, p)))
       ) r
 WHERE newest_before IS NULL OR created_at >= newest_before - $5::text::interval
 ORDER BY created_at, kafka_partition, kafka_offset";

/// How many rows [`REPLAY_EVENTS`] returns at most (for the progress bar;
/// late events are not told apart here).
pub const REPLAY_COUNT: &str = "
SELECT count(*)
  FROM audit_logs
 WHERE created_at >= $1 AND created_at < $2 AND kafka_partition >= 0
   AND (action = ANY($3::text[]) OR EXISTS (SELECT 1 FROM unnest($4::text[]) p WHERE starts_with(action, p)))";

/// Size of audit_logs (tables, indexes and TOAST of its leaf partitions: the
/// partitioned parent has no storage), the planner's estimate of its rows,
/// its partitions, and the size of the whole database (catalog reads only).
/// Read by the storage gauges and the health endpoint.
pub const STORAGE_SIZES: &str = "
SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint,
       coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint,
       count(*),
       pg_database_size(current_database())
  FROM pg_partition_tree('audit_logs') t
  JOIN pg_class c ON c.oid = t.relid
 WHERE t.isleaf";

// ---------------------------------------------------------------------------
// Migrations (src/store/migrate.rs), the replay's and the demo's checks
// ---------------------------------------------------------------------------

/// The table of applied migrations, created before anything else.
pub const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())";
/// Session-level advisory lock and unlock on key $1 (one migrator at a time).
pub const ADVISORY_LOCK: &str = "SELECT pg_advisory_lock($1)";
pub const ADVISORY_UNLOCK: &str = "SELECT pg_advisory_unlock($1)";
pub const APPLIED_MIGRATIONS: &str = "SELECT version, checksum FROM schema_migrations ORDER BY version";
/// $1 version, $2 name, $3 checksum of the file applied.
pub const RECORD_MIGRATION: &str = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)";
/// Whether the audit log exists (the database is migrated).
pub const AUDIT_LOG_EXISTS: &str = "SELECT to_regclass('audit_logs') IS NOT NULL";

/// Demo counts. Events consumed during this run ($1: when it started).
pub const DEMO_STORED_SINCE: &str = "SELECT count(*) FROM audit_logs WHERE received_at >= $1";
/// Everything in the demo database ($1 unused, for a uniform call).
pub const DEMO_STORED_TOTAL: &str = "SELECT count(*) FROM audit_logs WHERE $1::timestamptz IS NOT NULL";
pub const DEMO_DEAD_LETTERED_SINCE: &str = "SELECT count(*) FROM dead_letters WHERE dead_lettered_at >= $1";
/// Alert transitions sent on their own (the rest went in storm summaries).
pub const DEMO_PUBLISHED_ALERTS_SINCE: &str = "SELECT count(*) FROM alerts WHERE detected_at >= $1 AND published";
/// Messages of the events topic consumed by a group ($1) of topic $2:
/// stored, dead-lettered or skipped as duplicates.
pub const CONSUMED_BY_GROUP: &str =
    "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2";
