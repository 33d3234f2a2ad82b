//! Every SQL statement of the admin API, named. Values always travel as
//! bind parameters; the two searches assemble their WHERE clause from the
//! fixed fragments below (only the parameter numbers vary), so that each
//! filter present becomes an index condition instead of an `$n IS NULL OR`
//! that no plan can use.

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::params::ActionFilter;

/// A bind parameter of a built query.
pub type Param = Box<dyn ToSql + Sync + Send>;

/// Borrows built parameters in the form tokio-postgres takes.
pub fn param_refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

// ---------------------------------------------------------------------------
// Session settings (transaction-local)
// ---------------------------------------------------------------------------

/// $1: milliseconds, as text.
pub const SET_STATEMENT_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1, true)";
/// $1: milliseconds, as text.
pub const SET_LOCK_TIMEOUT: &str = "SELECT set_config('lock_timeout', $1, true)";

// ---------------------------------------------------------------------------
// Log search
// ---------------------------------------------------------------------------

/// The columns of a log row, in the order `LogRow::from_row` reads them.
pub const LOG_COLUMNS: &str = "event_id, created_at, received_at, action, user_id, username, ip_address, \
     user_agent, session_id, request_id, metadata, kafka_partition, kafka_offset";

/// A log search: every filter optional, newest first, keyset-paginated on
/// (created_at DESC, event_id DESC).
#[derive(Debug, Clone, Default)]
pub struct LogSearch {
    pub user_id: Option<String>,
    pub action: Option<ActionFilter>,
    pub ip: Option<IpNet>,
    pub session_id: Option<String>,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
    /// Rows strictly after this (created_at, event_id) in the order.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: Option<i64>,
}

impl LogSearch {
    pub fn to_sql(&self) -> (String, Vec<Param>) {
        let mut q = Where::default();
        if let Some(user) = &self.user_id {
            q.add("user_id = $?", [Box::new(user.clone()) as Param]);
        }
        match &self.action {
            Some(ActionFilter::Exact(action)) => q.add("action = $?", [Box::new(action.clone()) as Param]),
            Some(ActionFilter::Prefix(prefix)) => {
                // A range in the column's "C" collation: the (action,
                // created_at) B-tree serves it, unlike LIKE with a parameter.
                let (low, high) = ActionFilter::prefix_range(prefix);
                q.add("action >= $? AND action < $?", [Box::new(low) as Param, Box::new(high)]);
            }
            None => {}
        }
        if let Some(net) = &self.ip {
            q.add("ip_address <<= ($?::text)::inet", [Box::new(net.to_string()) as Param]);
        }
        if let Some(session) = &self.session_id {
            q.add("session_id = $?", [Box::new(session.clone()) as Param]);
        }
        if let Some(from) = self.from {
            q.add("created_at >= $?", [Box::new(from) as Param]);
        }
        if let Some(to) = self.to {
            q.add("created_at < $?", [Box::new(to) as Param]);
        }
        if let Some((at, id)) = self.after {
            // Spelt out rather than a row comparison, so that `created_at <=`
            // bounds the index scans and prunes partitions.
            q.add(
                "created_at <= $? AND (created_at < $? OR event_id < $?)",
                [Box::new(at) as Param, Box::new(at), Box::new(id)],
            );
        }
        let mut sql =
            format!("SELECT {LOG_COLUMNS} FROM audit_logs{} ORDER BY created_at DESC, event_id DESC", q.clause());
        if let Some(limit) = self.limit {
            q.params.push(Box::new(limit));
            sql.push_str(&format!(" LIMIT ${}", q.params.len()));
        }
        (sql, q.params)
    }
}

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

pub const ALERT_COLUMNS: &str = "id, alert_id, rule, subject, state, severity, count, threshold, window_seconds, \
     episode_start, first_event_at, last_event_at, sample_event_ids, recommended_action, detected_at, published";

/// Alert transitions, newest first, keyset-paginated on (detected_at DESC,
/// id DESC).
#[derive(Debug, Clone, Default)]
pub struct AlertSearch {
    pub state: Option<String>,
    pub rule: Option<String>,
    pub subject: Option<String>,
    pub severity: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub after: Option<(DateTime<Utc>, i64)>,
    pub limit: i64,
}

impl AlertSearch {
    pub fn to_sql(&self) -> (String, Vec<Param>) {
        let mut q = Where::default();
        for (column, value) in
            [("state", &self.state), ("rule", &self.rule), ("subject", &self.subject), ("severity", &self.severity)]
        {
            if let Some(v) = value {
                q.add(&format!("{column} = $?"), [Box::new(v.clone()) as Param]);
            }
        }
        if let Some(since) = self.since {
            q.add("detected_at >= $?", [Box::new(since) as Param]);
        }
        if let Some((at, id)) = self.after {
            q.add(
                "detected_at <= $? AND (detected_at < $? OR id < $?)",
                [Box::new(at) as Param, Box::new(at), Box::new(id)],
            );
        }
        q.params.push(Box::new(self.limit));
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM alerts{} ORDER BY detected_at DESC, id DESC LIMIT ${}",
            q.clause(),
            q.params.len()
        );
        (sql, q.params)
    }
}

/// Alerts whose episode has not resolved: the latest transition of each
/// alert_id detected since $1, unless it is `resolved`; newest first, at
/// most $2.
pub const OPEN_ALERTS: &str = "
SELECT id, alert_id, rule, subject, state, severity, count, threshold, window_seconds,
       episode_start, first_event_at, last_event_at, sample_event_ids, recommended_action, detected_at, published
  FROM (SELECT DISTINCT ON (alert_id) *
          FROM alerts
         WHERE detected_at >= $1
         ORDER BY alert_id, detected_at DESC, id DESC) latest
 WHERE state <> 'resolved'
 ORDER BY detected_at DESC, id DESC
 LIMIT $2";

/// A `WHERE` clause assembled from fixed fragments; `$?` in a fragment is
/// replaced by the next parameter number.
#[derive(Default)]
struct Where {
    conditions: Vec<String>,
    params: Vec<Param>,
}

impl Where {
    fn add<const N: usize>(&mut self, fragment: &str, params: [Param; N]) {
        let mut condition = String::with_capacity(fragment.len() + 8);
        let mut pieces = fragment.split("$?");
        if let Some(first) = pieces.next() {
            condition.push_str(first);
        }
        for (piece, param) in pieces.zip(params) {
            self.params.push(param);
            condition.push_str(&format!("${}", self.params.len()));
            condition.push_str(piece);
        }
        self.conditions.push(condition);
    }

    fn clause(&self) -> String {
        if self.conditions.is_empty() { String::new() } else { format!(" WHERE {}", self.conditions.join(" AND ")) }
    }
}

// ---------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------

pub const PING: &str = "SELECT 1";

/// Events with event time since $2 (last day), and of those since $1 (last
/// hour).
pub const RECENT_EVENT_COUNTS: &str = "
SELECT count(*) FILTER (WHERE created_at >= $1), count(*)
  FROM audit_logs
 WHERE created_at >= $2";

/// Dead letters in all, and since $1.
pub const DEAD_LETTER_COUNTS: &str =
    "SELECT count(*), count(*) FILTER (WHERE dead_lettered_at >= $1) FROM dead_letters";

// ---------------------------------------------------------------------------
// Security overview
// ---------------------------------------------------------------------------

/// Failed logins system-wide since $1 (hour) and of those since $2 (minute).
pub const FAILED_LOGIN_COUNTS: &str = "
SELECT count(*), count(*) FILTER (WHERE created_at >= $2)
  FROM audit_logs
 WHERE action = 'FAILED_AUTH_LOGIN' AND created_at >= $1";

/// Users with the most failed logins since $1, at most $2.
pub const TOP_FAILED_USERS: &str = "
SELECT user_id, count(*) AS failures
  FROM audit_logs
 WHERE action = 'FAILED_AUTH_LOGIN' AND created_at >= $1
 GROUP BY user_id
 ORDER BY failures DESC, user_id NULLS LAST
 LIMIT $2";

/// The runbook's "Check failed login patterns": addresses with more than
/// $2 failed logins since $1 (with how many usernames they tried), at most
/// $3, most first.
pub const SUSPICIOUS_IPS: &str = "
SELECT ip_address, count(*) AS failures, count(DISTINCT username) AS usernames
  FROM audit_logs
 WHERE action = 'FAILED_AUTH_LOGIN' AND created_at >= $1 AND ip_address IS NOT NULL
 GROUP BY ip_address
HAVING count(*) > $2
 ORDER BY failures DESC, ip_address
 LIMIT $3";

// ---------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------

/// Events per action in [$1, $2), with distinct users.
pub const DAILY_ACTIONS: &str = "
SELECT action, count(*), count(DISTINCT user_id)
  FROM audit_logs
 WHERE created_at >= $1 AND created_at < $2
 GROUP BY action
 ORDER BY action";

/// Events per UTC hour over [$1, $2) ($1 on an hour), every hour listed
/// (an hour without events has count 0), newest first.
pub const HOURLY_COUNTS: &str = "
WITH counts AS (
    SELECT date_trunc('hour', created_at, 'UTC') AS hour, count(*) AS events
      FROM audit_logs
     WHERE created_at >= $1 AND created_at < $2
     GROUP BY 1
)
SELECT h.hour, coalesce(c.events, 0)
  FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', interval '1 hour') AS h(hour)
  LEFT JOIN counts c ON c.hour = h.hour
 ORDER BY h.hour DESC";

/// The oldest event (see migrations/0003_admin_api.sql).
pub const OLDEST_EVENT: &str = "SELECT audit_oldest_event()";

/// Events older than the cutoff $1 (only the partitions before it are read).
pub const EVENTS_BEFORE: &str = "SELECT count(*) FROM audit_logs WHERE created_at < $1";

/// Daily partitions: how many, the first and last day covered.
pub const PARTITION_SPAN: &str = "
SELECT count(*), min(range_from), max(range_to), coalesce(sum(size_bytes), 0)::bigint
  FROM audit_log_partitions";

/// The last cleanup recorded in the audit trail.
pub const LAST_CLEANUP: &str = "
SELECT created_at, user_id, metadata
  FROM audit_logs
 WHERE action = 'ADMIN_AUDIT_CLEANUP'
 ORDER BY created_at DESC
 LIMIT 1";

// ---------------------------------------------------------------------------
// Retention and the admin audit trail
// ---------------------------------------------------------------------------

/// Whole-partition cleanup (migrations/0003_admin_api.sql). $1 cutoff,
/// $2 dry run.
pub const RETENTION_CLEANUP: &str = "
SELECT action, partition_name, range_from, range_to, row_count, exact
  FROM audit_retention_cleanup($1, $2)";

/// The activity tracker's rows before the cutoff (migrations/0004): $1
/// cutoff, $2 dry run; one row per table.
pub const ACTIVITY_RETENTION_CLEANUP: &str = "
SELECT action, table_name, row_count FROM activity_retention_cleanup($1, $2)";

/// Drops the partitions a cleanup detached, one transaction each (a
/// procedure with COMMITs: run it outside a transaction).
pub const RETENTION_PURGE: &str = "CALL audit_retention_purge()";

/// Detached partitions not dropped yet.
pub const RETENTION_TRASH: &str = "
SELECT count(*)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'audit_retention_trash' AND c.relkind = 'r'";

/// Serialises cleanups across instances for one transaction; false when
/// another instance is cleaning up.
pub const TRY_CLEANUP_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// An admin action as an audit_logs row (kafka_partition -1: it did not
/// come from Kafka). $1 event_id, $2 action, $3 user_id (principal id),
/// $4 client address, $5 user agent, $6 request id, $7 metadata, $8 time.
pub const INSERT_ADMIN_EVENT: &str = "
INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, user_agent, request_id, metadata,
                        kafka_partition, kafka_offset)
VALUES ($1, $8, $2, $3, $4, $5, $6, $7, -1, nextval('admin_event_offset_seq'))";

// --- Activity (sessions and rollups; migrations/0004). None of these scans
// audit_logs: they read the rollups and sessions, pending deltas included.

/// A user's open sessions, newest first. $1 user.
pub const USER_OPEN_SESSIONS: &str = "
SELECT session_id, started_at, last_seen_at, host(ip_address), user_agent
  FROM user_sessions($1)
 WHERE ended_at IS NULL
 ORDER BY last_seen_at DESC
 LIMIT 100";

/// A user's sessions active since $2, newest first, at most $3.
pub const USER_RECENT_SESSIONS: &str = "
SELECT session_id, started_at, last_seen_at, ended_at, end_reason, host(ip_address), user_agent
  FROM user_sessions($1)
 WHERE last_seen_at >= $2
 ORDER BY last_seen_at DESC
 LIMIT $3";

/// A user's events per UTC day and action since $2. $1 user.
pub const USER_ACTIONS_PER_DAY: &str = "
SELECT date_trunc('day', hour, 'UTC')::date AS day, action, sum(events)::bigint
  FROM user_hourly($1)
 WHERE hour >= $2
 GROUP BY 1, 2
 ORDER BY 1 DESC, 2";

/// A user's events of actions $3 since each of $2 (24 h, 7 d, 30 d).
pub const USER_ACTION_TOTALS: &str = "
SELECT since, coalesce(sum(events) FILTER (WHERE action = ANY($3::text[])), 0)::bigint
  FROM unnest($2::timestamptz[]) AS since
  LEFT JOIN user_hourly($1) r ON r.hour >= since
 GROUP BY since
 ORDER BY since DESC";

/// Distinct addresses and user agents a user logged in from since $2.
pub const USER_DISTINCT_ORIGINS: &str = "
SELECT array_remove(array_agg(DISTINCT host(ip_address)), NULL), array_remove(array_agg(DISTINCT user_agent), NULL)
  FROM user_sessions($1)
 WHERE last_seen_at >= $2";

/// Distinct users with events in [$1, $2) (whole hours).
pub const ACTIVE_USERS: &str = "SELECT active_user_count($1, $2)";

/// Events per action in [$1, $2), most frequent first, at most $3.
pub const TOP_ACTIONS: &str = "
SELECT action, sum(events)::bigint AS n FROM activity_hourly_v
 WHERE hour >= $1 AND hour < $2 GROUP BY action ORDER BY n DESC, action LIMIT $3";

/// ADMIN_* actions per admin in [$1, $2), most active first, at most $3
/// (migrations/0013: pending batches read by their few admin entries).
pub const ADMIN_ACTIONS_PER_ADMIN: &str = "
SELECT user_id, sum(events)::bigint AS n FROM activity_admin_hourly_v
 WHERE hour >= $1 AND hour < $2
 GROUP BY user_id ORDER BY n DESC, user_id LIMIT $3";

/// The busiest hours in [$1, $2), at most $3.
pub const BUSIEST_HOURS: &str = "
SELECT hour, sum(events)::bigint AS n FROM activity_hourly_v
 WHERE hour >= $1 AND hour < $2 GROUP BY hour ORDER BY n DESC, hour DESC LIMIT $3";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_search_sql_has_one_fragment_per_filter() {
        let empty = LogSearch::default().to_sql();
        assert_eq!(empty.0, format!("SELECT {LOG_COLUMNS} FROM audit_logs ORDER BY created_at DESC, event_id DESC"));
        assert!(empty.1.is_empty());

        let search = LogSearch {
            user_id: Some("u1".into()),
            action: Some(ActionFilter::Prefix("SECURITY_".into())),
            ip: Some("10.0.0.0/8".parse().unwrap()),
            after: Some((Utc::now(), Uuid::nil())),
            limit: Some(101),
            ..Default::default()
        };
        let (sql, params) = search.to_sql();
        assert_eq!(
            sql,
            format!(
                "SELECT {LOG_COLUMNS} FROM audit_logs WHERE user_id = $1 AND action >= $2 AND action < $3 \
                 AND ip_address <<= ($4::text)::inet AND created_at <= $5 AND (created_at < $6 OR event_id < $7) \
                 ORDER BY created_at DESC, event_id DESC LIMIT $8"
            )
        );
        assert_eq!(params.len(), 8);
    }

    #[test]
    fn alert_search_sql() {
        let (sql, params) = AlertSearch {
            state: Some("firing".into()),
            severity: Some("critical".into()),
            limit: 10,
            ..Default::default()
        }
        .to_sql();
        assert_eq!(
            sql,
            format!(
                "SELECT {ALERT_COLUMNS} FROM alerts WHERE state = $1 AND severity = $2 ORDER BY detected_at DESC, id DESC LIMIT $3"
            )
        );
        assert_eq!(params.len(), 3);
    }
}
