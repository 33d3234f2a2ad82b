-- Activity tracker: sessions and rollups, kept exact without scanning
-- audit_logs.
--
-- The ingest transaction appends DELTAS (plain COPY into unindexed tables:
-- cheap) computed from the rows it actually inserted, so they share the
-- exactly-once guarantee of audit_logs. A compactor folds the deltas into
-- the final tables in transactions of its own (delete + upsert, atomic).
-- The *_v views add the deltas not folded yet, so that a reader always
-- sees exact figures.

-- Events per user, hour and action (admin actions per admin included).
CREATE TABLE activity_user_hourly (
    user_id text        NOT NULL,
    hour    timestamptz NOT NULL,
    action  text COLLATE "C" NOT NULL,
    events  bigint      NOT NULL,
    PRIMARY KEY (user_id, hour, action)
);
CREATE INDEX activity_user_hourly_hour_idx ON activity_user_hourly (hour);

-- Events per hour and action, system-wide (events without a user too).
CREATE TABLE activity_hourly (
    hour   timestamptz NOT NULL,
    action text COLLATE "C" NOT NULL,
    events bigint      NOT NULL,
    PRIMARY KEY (hour, action)
);

CREATE TABLE activity_user_hourly_deltas (
    user_id text        NOT NULL,
    hour    timestamptz NOT NULL,
    action  text COLLATE "C" NOT NULL,
    events  bigint      NOT NULL
);

CREATE TABLE activity_hourly_deltas (
    hour   timestamptz NOT NULL,
    action text COLLATE "C" NOT NULL,
    events bigint      NOT NULL
);

-- One row per session. Every column merges commutatively (earliest start,
-- latest activity, first end), so duplicates and out-of-order events (a
-- logout before its login) still give one correct session.
CREATE TABLE sessions (
    session_id   text        PRIMARY KEY,
    user_id      text,
    ip_address   inet,
    user_agent   text,
    started_at   timestamptz,
    last_seen_at timestamptz NOT NULL,
    ended_at     timestamptz,
    -- logout | token_revoked | idle_timeout
    end_reason   text
);
CREATE INDEX sessions_user_idx ON sessions (user_id, last_seen_at DESC);
CREATE INDEX sessions_open_idx ON sessions (last_seen_at) WHERE ended_at IS NULL;

CREATE TABLE session_deltas (
    session_id   text        NOT NULL,
    user_id      text,
    ip_address   inet,
    user_agent   text,
    started_at   timestamptz,
    last_seen_at timestamptz NOT NULL,
    ended_at     timestamptz,
    end_reason   text
);

-- Exact figures at any moment: folded rows plus pending deltas.
CREATE VIEW activity_user_hourly_v AS
SELECT user_id, hour, action, sum(events)::bigint AS events
  FROM (SELECT user_id, hour, action, events FROM activity_user_hourly
        UNION ALL
        SELECT user_id, hour, action, events FROM activity_user_hourly_deltas) u
 GROUP BY user_id, hour, action;

CREATE VIEW activity_hourly_v AS
SELECT hour, action, sum(events)::bigint AS events
  FROM (SELECT hour, action, events FROM activity_hourly
        UNION ALL
        SELECT hour, action, events FROM activity_hourly_deltas) u
 GROUP BY hour, action;

-- The merge rules of a session, shared by the view and the compactor.
-- The end is the earliest end event; its reason comes with it.
CREATE VIEW sessions_v AS
SELECT session_id,
       (array_agg(user_id ORDER BY started_at NULLS LAST) FILTER (WHERE user_id IS NOT NULL))[1] AS user_id,
       (array_agg(ip_address ORDER BY started_at NULLS LAST) FILTER (WHERE ip_address IS NOT NULL))[1] AS ip_address,
       (array_agg(user_agent ORDER BY started_at NULLS LAST) FILTER (WHERE user_agent IS NOT NULL))[1] AS user_agent,
       min(started_at) AS started_at,
       max(last_seen_at) AS last_seen_at,
       min(ended_at) AS ended_at,
       (array_agg(end_reason ORDER BY ended_at) FILTER (WHERE ended_at IS NOT NULL))[1] AS end_reason
  FROM (SELECT * FROM sessions UNION ALL SELECT * FROM session_deltas) s
 GROUP BY session_id;

-- Folds every pending delta into the final tables; returns how many delta
-- rows it moved. Runs in the caller's transaction.
CREATE FUNCTION activity_compact() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint := 0;
    n bigint;
BEGIN
    -- One compactor at a time (several instances may run one each).
    PERFORM pg_advisory_xact_lock(hashtext('activity_compact'));

    WITH d AS (DELETE FROM activity_user_hourly_deltas RETURNING *),
         a AS (SELECT user_id, hour, action, sum(events) AS events FROM d GROUP BY 1, 2, 3),
         up AS (INSERT INTO activity_user_hourly AS t SELECT * FROM a
                ON CONFLICT (user_id, hour, action) DO UPDATE SET events = t.events + EXCLUDED.events)
    SELECT count(*) INTO n FROM d;
    moved := moved + n;

    WITH d AS (DELETE FROM activity_hourly_deltas RETURNING *),
         a AS (SELECT hour, action, sum(events) AS events FROM d GROUP BY 1, 2),
         up AS (INSERT INTO activity_hourly AS t SELECT * FROM a
                ON CONFLICT (hour, action) DO UPDATE SET events = t.events + EXCLUDED.events)
    SELECT count(*) INTO n FROM d;
    moved := moved + n;

    WITH d AS (DELETE FROM session_deltas RETURNING *),
         a AS (SELECT session_id,
                      (array_agg(user_id ORDER BY started_at NULLS LAST) FILTER (WHERE user_id IS NOT NULL))[1] AS user_id,
                      (array_agg(ip_address ORDER BY started_at NULLS LAST) FILTER (WHERE ip_address IS NOT NULL))[1] AS ip_address,
                      (array_agg(user_agent ORDER BY started_at NULLS LAST) FILTER (WHERE user_agent IS NOT NULL))[1] AS user_agent,
                      min(started_at) AS started_at,
                      max(last_seen_at) AS last_seen_at,
                      min(ended_at) AS ended_at,
                      (array_agg(end_reason ORDER BY ended_at) FILTER (WHERE ended_at IS NOT NULL))[1] AS end_reason
                 FROM d GROUP BY session_id),
         up AS (INSERT INTO sessions AS s SELECT * FROM a
                ON CONFLICT (session_id) DO UPDATE SET
                    user_id      = coalesce(s.user_id, EXCLUDED.user_id),
                    ip_address   = CASE WHEN EXCLUDED.started_at < s.started_at OR s.ip_address IS NULL
                                        THEN coalesce(EXCLUDED.ip_address, s.ip_address) ELSE s.ip_address END,
                    user_agent   = CASE WHEN EXCLUDED.started_at < s.started_at OR s.user_agent IS NULL
                                        THEN coalesce(EXCLUDED.user_agent, s.user_agent) ELSE s.user_agent END,
                    started_at   = least(s.started_at, EXCLUDED.started_at),
                    last_seen_at = greatest(s.last_seen_at, EXCLUDED.last_seen_at),
                    end_reason   = CASE WHEN EXCLUDED.ended_at IS NOT NULL
                                         AND (s.ended_at IS NULL OR EXCLUDED.ended_at < s.ended_at)
                                        THEN EXCLUDED.end_reason ELSE s.end_reason END,
                    ended_at     = least(s.ended_at, EXCLUDED.ended_at))
    SELECT count(*) INTO n FROM d;
    moved := moved + n;
    RETURN moved;
END
$$;

-- Closes sessions idle (by event time) for longer than p_idle as of
-- p_event_time; returns how many it closed.
CREATE FUNCTION activity_close_idle(p_event_time timestamptz, p_idle interval) RETURNS bigint
LANGUAGE sql AS $$
    WITH closed AS (
        UPDATE sessions
           SET ended_at = last_seen_at + p_idle, end_reason = 'idle_timeout'
         WHERE ended_at IS NULL AND last_seen_at < p_event_time - p_idle
        RETURNING 1)
    SELECT count(*) FROM closed
$$;
