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
-- fillfactor: room on each page, so that adding to a count is a HOT update
-- (no index entry rewritten).
-- Key columns compare bytewise (COLLATE "C"): the compactor sorts and
-- inserts hundreds of thousands of keys, and locale rules buy nothing here.
CREATE TABLE activity_user_hourly (
    user_id text COLLATE "C" NOT NULL,
    hour    timestamptz NOT NULL,
    action  text COLLATE "C" NOT NULL,
    events  bigint      NOT NULL,
    PRIMARY KEY (user_id, hour, action)
) WITH (fillfactor = 80);
-- Folds append rows of recent hours: a BRIN index finds a time range at
-- almost no cost to the fold (a B-tree here cost a second index insert).
CREATE INDEX activity_user_hourly_hour_idx ON activity_user_hourly USING brin (hour);

-- Events per hour and action, system-wide (events without a user too).
CREATE TABLE activity_hourly (
    hour   timestamptz NOT NULL,
    action text COLLATE "C" NOT NULL,
    events bigint      NOT NULL,
    PRIMARY KEY (hour, action)
) WITH (fillfactor = 50);

-- One row per session. Every column merges commutatively (earliest start,
-- latest activity, first end), so duplicates and out-of-order events (a
-- logout before its login) still give one correct session.
CREATE TABLE sessions (
    session_id   text COLLATE "C" PRIMARY KEY,
    user_id      text COLLATE "C",
    ip_address   inet,
    user_agent   text,
    started_at   timestamptz,
    last_seen_at timestamptz NOT NULL,
    ended_at     timestamptz,
    -- logout | token_revoked | idle_timeout
    end_reason   text
) WITH (fillfactor = 70);
-- No index holds last_seen_at, which nearly every event moves: those updates
-- stay HOT (heap only). A user's sessions are few; sorting them is cheap.
CREATE INDEX sessions_user_idx ON sessions (user_id);

-- The deltas of one ingest transaction, as ONE row of parallel arrays:
-- a batch of thousands of events costs one tuple here instead of
-- thousands (per-tuple overhead was most of the tracker's ingest cost).
-- Rollup part: (user_id or NULL, hour, action, events); session part: one
-- merged entry per session of the batch. Arrays are stored uncompressed.
CREATE TABLE activity_delta_batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_ids      text[]        NOT NULL,
    hours         timestamptz[] NOT NULL,
    actions       text[]        NOT NULL,
    events        bigint[]      NOT NULL,
    session_ids   text[]        NOT NULL,
    s_user_ids    text[]        NOT NULL,
    s_ips         inet[]        NOT NULL,
    s_agents      text[]        NOT NULL,
    s_started     timestamptz[] NOT NULL,
    s_last_seen   timestamptz[] NOT NULL,
    s_ended       timestamptz[] NOT NULL,
    s_reasons     text[]        NOT NULL
);
ALTER TABLE activity_delta_batches
    ALTER COLUMN user_ids SET STORAGE EXTERNAL, ALTER COLUMN hours SET STORAGE EXTERNAL,
    ALTER COLUMN actions SET STORAGE EXTERNAL, ALTER COLUMN events SET STORAGE EXTERNAL,
    ALTER COLUMN session_ids SET STORAGE EXTERNAL, ALTER COLUMN s_user_ids SET STORAGE EXTERNAL,
    ALTER COLUMN s_ips SET STORAGE EXTERNAL, ALTER COLUMN s_agents SET STORAGE EXTERNAL,
    ALTER COLUMN s_started SET STORAGE EXTERNAL, ALTER COLUMN s_last_seen SET STORAGE EXTERNAL,
    ALTER COLUMN s_ended SET STORAGE EXTERNAL, ALTER COLUMN s_reasons SET STORAGE EXTERNAL;

-- The pending deltas, one row per entry.
CREATE VIEW activity_rollup_deltas AS
SELECT r.user_id COLLATE "C" AS user_id, r.hour, r.action COLLATE "C" AS action, r.events
  FROM activity_delta_batches b,
       unnest(b.user_ids, b.hours, b.actions, b.events) AS r(user_id, hour, action, events);

CREATE VIEW session_deltas AS
SELECT s.session_id COLLATE "C" AS session_id, s.user_id COLLATE "C" AS user_id, s.ip_address, s.user_agent, s.started_at, s.last_seen_at, s.ended_at, s.end_reason
  FROM activity_delta_batches b,
       unnest(b.session_ids, b.s_user_ids, b.s_ips, b.s_agents, b.s_started, b.s_last_seen, b.s_ended, b.s_reasons)
           AS s(session_id, user_id, ip_address, user_agent, started_at, last_seen_at, ended_at, end_reason);

-- Exact figures at any moment: folded rows plus pending deltas.
CREATE VIEW activity_user_hourly_v AS
SELECT user_id, hour, action, sum(events)::bigint AS events
  FROM (SELECT user_id, hour, action, events FROM activity_user_hourly
        UNION ALL
        SELECT user_id, hour, action, events FROM activity_rollup_deltas WHERE user_id IS NOT NULL) u
 GROUP BY user_id, hour, action;

CREATE VIEW activity_hourly_v AS
SELECT hour, action, sum(events)::bigint AS events
  FROM (SELECT hour, action, events FROM activity_hourly
        UNION ALL
        SELECT hour, action, events FROM activity_rollup_deltas) u
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

-- One user's sessions, merged by the rules of sessions_v (keep the two in
-- step) without merging everyone's: the user's session ids come from the
-- folded rows (by index) and from the pending deltas, and only those merge.
-- The pending deltas are read twice, so the cost grows with what is pending
-- (bounded by max_pending_deltas), not with all sessions ever stored.
CREATE FUNCTION user_sessions(p_user text) RETURNS SETOF sessions_v
LANGUAGE sql STABLE AS $$
    WITH ids AS (SELECT session_id FROM sessions WHERE user_id = p_user
                 UNION
                 SELECT session_id FROM session_deltas WHERE user_id = p_user)
    SELECT session_id,
           (array_agg(user_id ORDER BY started_at NULLS LAST) FILTER (WHERE user_id IS NOT NULL))[1],
           (array_agg(ip_address ORDER BY started_at NULLS LAST) FILTER (WHERE ip_address IS NOT NULL))[1],
           (array_agg(user_agent ORDER BY started_at NULLS LAST) FILTER (WHERE user_agent IS NOT NULL))[1],
           min(started_at),
           max(last_seen_at),
           min(ended_at),
           (array_agg(end_reason ORDER BY ended_at) FILTER (WHERE ended_at IS NOT NULL))[1]
      FROM (SELECT * FROM sessions WHERE session_id IN (SELECT session_id FROM ids)
            UNION ALL
            SELECT * FROM session_deltas WHERE session_id IN (SELECT session_id FROM ids)) s
     GROUP BY session_id
$$;

-- Folded sessions still open: counted from a small partial index.
CREATE INDEX sessions_open_idx ON sessions (session_id) WHERE ended_at IS NULL;

-- Sessions open now, exactly as sessions_v would count them: the folded
-- open ones, less those a pending delta ends, plus the pending-only ones
-- that no delta ends. Never merges every session.
CREATE FUNCTION open_session_count() RETURNS bigint
LANGUAGE sql STABLE AS $$
    WITH p AS (SELECT session_id, bool_or(ended_at IS NOT NULL) AS ends FROM session_deltas GROUP BY session_id)
    SELECT (SELECT count(*) FROM sessions WHERE ended_at IS NULL)
         - (SELECT count(*) FROM p JOIN sessions s USING (session_id) WHERE s.ended_at IS NULL AND p.ends)
         + (SELECT count(*) FROM p WHERE NOT p.ends
                                     AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = p.session_id))
$$;

-- Folds every pending delta into the final tables; returns how many rollup
-- and session rows it wrote. Runs in the caller's transaction, which must be
-- REPEATABLE READ: every statement then sees the same delta rows, and the
-- final DELETE removes exactly those (batches committed meanwhile stay for
-- the next fold). A second compactor that raced on the same rows fails on
-- its DELETE with a serialization error and rolls back: nothing is counted
-- twice.
CREATE FUNCTION activity_compact() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint := 0;
    n bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'repeatable read' THEN
        RAISE EXCEPTION 'activity_compact() needs a REPEATABLE READ transaction';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('activity_compact'));
    -- Aggregate and sort a fold in memory rather than in temp files.
    PERFORM set_config('work_mem', '256MB', true);

    -- Sorted in key order, so that the upserts walk the index in order.
    WITH r AS (SELECT u.* FROM activity_delta_batches b,
                      unnest(b.user_ids, b.hours, b.actions, b.events) AS u(user_id, hour, action, events)),
         a AS (SELECT user_id COLLATE "C" AS user_id, hour, action COLLATE "C" AS action, sum(events) AS events
                 FROM r WHERE user_id IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3)
    INSERT INTO activity_user_hourly AS t SELECT * FROM a
    ON CONFLICT (user_id, hour, action) DO UPDATE SET events = t.events + EXCLUDED.events;
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    WITH r AS (SELECT u.* FROM activity_delta_batches b,
                      unnest(b.hours, b.actions, b.events) AS u(hour, action, events)),
         a AS (SELECT hour, action, sum(events) AS events FROM r GROUP BY 1, 2)
    INSERT INTO activity_hourly AS t SELECT * FROM a
    ON CONFLICT (hour, action) DO UPDATE SET events = t.events + EXCLUDED.events;

    WITH d AS (SELECT s.* FROM activity_delta_batches b,
                      unnest(b.session_ids, b.s_user_ids, b.s_ips, b.s_agents, b.s_started, b.s_last_seen, b.s_ended,
                             b.s_reasons)
                      AS s(session_id, user_id, ip_address, user_agent, started_at, last_seen_at, ended_at, end_reason)),
         a AS (SELECT session_id COLLATE "C" AS session_id,
                      (array_agg(user_id ORDER BY started_at NULLS LAST) FILTER (WHERE user_id IS NOT NULL))[1] AS user_id,
                      (array_agg(ip_address ORDER BY started_at NULLS LAST) FILTER (WHERE ip_address IS NOT NULL))[1] AS ip_address,
                      (array_agg(user_agent ORDER BY started_at NULLS LAST) FILTER (WHERE user_agent IS NOT NULL))[1] AS user_agent,
                      min(started_at) AS started_at,
                      max(last_seen_at) AS last_seen_at,
                      min(ended_at) AS ended_at,
                      (array_agg(end_reason ORDER BY ended_at) FILTER (WHERE ended_at IS NOT NULL))[1] AS end_reason
                 FROM d GROUP BY 1 ORDER BY 1)
    INSERT INTO sessions AS s SELECT * FROM a
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
        ended_at     = least(s.ended_at, EXCLUDED.ended_at);
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    DELETE FROM activity_delta_batches;
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

-- Retention for what the tracker derived from the audit log: rollup hours
-- that end at or before the cutoff, and sessions last seen before it, go
-- with the events they were counted from. Called by the audit log cleanup
-- in its transaction. One row per table ('delete', exact counts), like
-- audit_retention_cleanup; with p_dry_run the rows are only counted.
-- (Deltas still pending for such old hours are folded later and removed by
-- the next cleanup.)
CREATE FUNCTION activity_retention_cleanup(p_cutoff timestamptz, p_dry_run boolean)
RETURNS TABLE (action text, table_name text, row_count bigint)
LANGUAGE plpgsql AS $$
DECLARE
    target record;
    n bigint;
BEGIN
    action := 'delete';
    FOR target IN
        SELECT * FROM (VALUES
            ('activity_user_hourly', 'hour <= $1 - interval ''1 hour'''),
            ('activity_hourly',      'hour <= $1 - interval ''1 hour'''),
            ('sessions',             'last_seen_at < $1')) AS t(name, condition)
    LOOP
        IF p_dry_run THEN
            EXECUTE format('SELECT count(*) FROM %I WHERE %s', target.name, target.condition) INTO n USING p_cutoff;
        ELSE
            EXECUTE format('DELETE FROM %I WHERE %s', target.name, target.condition) USING p_cutoff;
            GET DIAGNOSTICS n = ROW_COUNT;
        END IF;
        table_name := target.name;
        row_count := n;
        RETURN NEXT;
    END LOOP;
END
$$;
