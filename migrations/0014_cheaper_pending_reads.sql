-- Reads and the fold touch less of the pending deltas.
--
-- Measured on the deltas of 1,000,000 benchmark events (200 batches,
-- 954 k session entries, 957 k rollup entries) on a slow host:
-- open_session_count() 2.0 s -> 0.9 s, the summary's active users
-- 1.9 s -> 0.7 s; in the fold, the session merge step 2.3 s -> 0.5 s
-- (under EXPLAIN ANALYZE) and the system-wide counts 0.6 s -> 2 ms. The
-- fold's cost is its writes, so as a whole it gained less (BENCHMARKS.md).
-- With 1 M entries pending (the default bound) the first two reads came
-- close to the API's 5 s statement timeout under load.

-- Open sessions: only the session ids and end times are unnested (the
-- session_deltas view unnests all eight arrays of every batch), and the
-- grouping stays in memory.
CREATE OR REPLACE FUNCTION open_session_count() RETURNS bigint
LANGUAGE sql STABLE SET work_mem = '64MB' AS $$
    WITH p AS (SELECT s.session_id COLLATE "C" AS session_id, bool_or(s.ended_at IS NOT NULL) AS ends
                 FROM activity_delta_batches b, unnest(b.session_ids, b.s_ended) AS s(session_id, ended_at)
                GROUP BY 1)
    SELECT (SELECT count(*) FROM sessions WHERE ended_at IS NULL)
         - (SELECT count(*) FROM p JOIN sessions s USING (session_id) WHERE s.ended_at IS NULL AND p.ends)
         + (SELECT count(*) FROM p WHERE NOT p.ends
                                     AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = p.session_id))
$$;

-- Distinct users with events in [p_from, p_to), exactly as
-- activity_user_hourly_v counts them: the folded rows of the range plus
-- the pending entries of batches whose hours (h_hours, migrations/0006)
-- meet the range; only the user ids and hours are unnested.
CREATE FUNCTION active_user_count(p_from timestamptz, p_to timestamptz) RETURNS bigint
LANGUAGE sql STABLE SET work_mem = '64MB' AS $$
    SELECT count(*) FROM (
        SELECT user_id FROM activity_user_hourly WHERE hour >= p_from AND hour < p_to
        UNION
        SELECT r.user_id COLLATE "C"
          FROM activity_delta_batches b, unnest(b.user_ids, b.hours) AS r(user_id, hour)
         WHERE (b.h_hours IS NULL OR EXISTS (SELECT 1 FROM unnest(b.h_hours) h WHERE h >= p_from AND h < p_to))
           AND r.user_id IS NOT NULL AND r.hour >= p_from AND r.hour < p_to) u
$$;

-- The fold of migrations/0004 with a cheaper session merge (same rules as
-- sessions_v) and system-wide counts from the batches' sums.
CREATE OR REPLACE FUNCTION activity_compact() RETURNS bigint
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
    PERFORM set_config('max_parallel_workers_per_gather', '0', true);

    -- Sorted in key order, so that the upserts walk the index in order.
    WITH r AS (SELECT u.* FROM activity_delta_batches b,
                      unnest(b.user_ids, b.hours, b.actions, b.events) AS u(user_id, hour, action, events)),
         a AS (SELECT user_id COLLATE "C" AS user_id, hour, action COLLATE "C" AS action, sum(events) AS events
                 FROM r WHERE user_id IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3)
    INSERT INTO activity_user_hourly AS t SELECT * FROM a
    ON CONFLICT (user_id, hour, action) DO UPDATE SET events = t.events + EXCLUDED.events;
    GET DIAGNOSTICS n = ROW_COUNT;
    moved := moved + n;

    -- System-wide counts from each batch's own (hour, action) sums
    -- (migrations/0006): a few dozen entries a batch instead of one an
    -- event (0.6 s -> 2 ms for 1 M events); entry by entry only for
    -- batches written before those sums existed.
    WITH r AS (SELECT u.* FROM activity_delta_batches b,
                      unnest(b.h_hours, b.h_actions, b.h_events) AS u(hour, action, events)
                WHERE b.h_hours IS NOT NULL
               UNION ALL
               SELECT u.* FROM activity_delta_batches b,
                      unnest(b.hours, b.actions, b.events) AS u(hour, action, events)
                WHERE b.h_hours IS NULL),
         a AS (SELECT hour, action, sum(events) AS events FROM r GROUP BY 1, 2)
    INSERT INTO activity_hourly AS t SELECT * FROM a
    ON CONFLICT (hour, action) DO UPDATE SET events = t.events + EXCLUDED.events;

    -- One sort puts each session's entries in merge order (earliest start
    -- first); the aggregates then take their first non-null value from
    -- that order. array_agg(... ORDER BY ...) inside each aggregate, as
    -- sessions_v does, sorted every session's entries once per aggregate:
    -- a third of this statement's time. Parallel plans are off for the
    -- fold (set above), so the order reaches the aggregates intact.
    WITH d AS (SELECT s.session_id COLLATE "C" AS session_id, s.user_id, s.ip_address, s.user_agent, s.started_at,
                      s.last_seen_at, s.ended_at, s.end_reason
                 FROM activity_delta_batches b,
                      unnest(b.session_ids, b.s_user_ids, b.s_ips, b.s_agents, b.s_started, b.s_last_seen, b.s_ended,
                             b.s_reasons)
                      AS s(session_id, user_id, ip_address, user_agent, started_at, last_seen_at, ended_at, end_reason)
                ORDER BY 1, s.started_at NULLS LAST),
         a AS (SELECT session_id,
                      (array_agg(user_id) FILTER (WHERE user_id IS NOT NULL))[1] AS user_id,
                      (array_agg(ip_address) FILTER (WHERE ip_address IS NOT NULL))[1] AS ip_address,
                      (array_agg(user_agent) FILTER (WHERE user_agent IS NOT NULL))[1] AS user_agent,
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
