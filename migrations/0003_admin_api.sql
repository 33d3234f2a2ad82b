-- The admin API: retention (cleanup by whole partitions), the audit trail of
-- admin actions, and the catalog views the health and retention reports use.
--
-- Admin actions (a cleanup, maintenance mode) are recorded as rows of
-- audit_logs itself, so that the log search, the reports and the runbook's
-- queries see them like any other event: action ADMIN_*, user_id = the
-- caller, kafka_partition = -1 (no Kafka message) and kafka_offset taken
-- from this sequence, so that (kafka_partition, kafka_offset) stays unique.
CREATE SEQUENCE admin_event_offset_seq;

-- Every daily partition of audit_logs with its bounds, read from the
-- catalog (not from the name), its row estimate and size on disk. The
-- default partition is left out: it has no bounds.
CREATE VIEW audit_log_partitions AS
SELECT n.nspname                          AS schema_name,
       c.relname                          AS partition_name,
       b.range_from,
       b.range_to,
       greatest(c.reltuples, 0)::bigint   AS row_estimate,
       -- reltuples is -1 until the first VACUUM or ANALYZE.
       c.reltuples >= 0                   AS analyzed,
       pg_total_relation_size(c.oid)      AS size_bytes
  FROM pg_inherits i
  JOIN pg_class c ON c.oid = i.inhrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) e
 CROSS JOIN LATERAL (
       SELECT substring(e.bound FROM $re$FROM \('([^']*)'\)$re$)::timestamptz AS range_from,
              substring(e.bound FROM $re$TO \('([^']*)'\)$re$)::timestamptz   AS range_to) b
 WHERE i.inhparent = 'audit_logs'::regclass
   AND e.bound <> 'DEFAULT';

-- Detached partitions wait here, renamed, until audit_retention_purge()
-- drops them (see audit_retention_cleanup).
CREATE SCHEMA audit_retention_trash;

-- Removes every audit_logs row older than p_cutoff, cheaply:
--  * rows older than the cutoff in the boundary partition (the one whose
--    range holds the cutoff) and in the default partition are DELETEd;
--  * every daily partition that ends at or before the cutoff is DETACHed
--    and moved (renamed) into audit_retention_trash, catalog work only.
-- The deletes run first, under the ordinary row locks, so that ingest keeps
-- writing; the detaches come last because DETACH takes an ACCESS EXCLUSIVE
-- lock on audit_logs, held until the caller commits (the caller sets
-- lock_timeout so that a long reader cannot make it queue everyone).
-- The tables are dropped afterwards by audit_retention_purge(), one
-- transaction each and without any lock on audit_logs: a DROP frees its
-- files at COMMIT, which for 90 days of data takes seconds (measured: 1.7 s
-- for 4 GB), and ingest would wait behind that lock all along.
-- With p_dry_run nothing changes: the same rows are only counted.
-- One row per partition touched: action 'drop' (row_count is the planner's
-- estimate, exact = false, unless the partition was never analyzed) or
-- 'delete' (row_count exact).
CREATE FUNCTION audit_retention_cleanup(p_cutoff timestamptz, p_dry_run boolean)
RETURNS TABLE (action text, partition_name text, range_from timestamptz, range_to timestamptz,
               row_count bigint, exact boolean)
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    n bigint;
    doomed text[] := '{}';
    doomed_schema text[] := '{}';
BEGIN
    IF NOT p_dry_run THEN
        -- The lock audit_ensure_partition takes: no partition is created
        -- or attached while this runs. It does not block ingest.
        LOCK TABLE audit_logs IN SHARE UPDATE EXCLUSIVE MODE;
    END IF;

    FOR part IN
        SELECT p.schema_name, p.partition_name, p.range_from, p.range_to, p.row_estimate, p.analyzed
          FROM audit_log_partitions p
         WHERE p.range_from < p_cutoff
         ORDER BY p.range_from
    LOOP
        action := CASE WHEN part.range_to <= p_cutoff THEN 'drop' ELSE 'delete' END;
        partition_name := part.partition_name;
        range_from := part.range_from;
        range_to := part.range_to;
        IF action = 'drop' THEN
            IF part.analyzed THEN
                row_count := part.row_estimate;
                exact := false;
            ELSE
                EXECUTE format('SELECT count(*) FROM %I.%I', part.schema_name, part.partition_name) INTO n;
                row_count := n;
                exact := true;
            END IF;
            doomed := doomed || part.partition_name::text;
            doomed_schema := doomed_schema || part.schema_name::text;
        ELSE
            IF p_dry_run THEN
                EXECUTE format('SELECT count(*) FROM %I.%I WHERE created_at < $1',
                               part.schema_name, part.partition_name) INTO n USING p_cutoff;
            ELSE
                EXECUTE format('DELETE FROM %I.%I WHERE created_at < $1',
                               part.schema_name, part.partition_name) USING p_cutoff;
                GET DIAGNOSTICS n = ROW_COUNT;
            END IF;
            row_count := n;
            exact := true;
        END IF;
        RETURN NEXT;
    END LOOP;

    -- Stray rows (outside every daily partition) live in the default one.
    IF p_dry_run THEN
        SELECT count(*) INTO n FROM audit_logs_default WHERE created_at < p_cutoff;
    ELSE
        DELETE FROM audit_logs_default WHERE created_at < p_cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    IF n > 0 THEN
        action := 'delete';
        partition_name := 'audit_logs_default';
        range_from := NULL;
        range_to := NULL;
        row_count := n;
        exact := true;
        RETURN NEXT;
    END IF;

    IF NOT p_dry_run THEN
        FOR i IN 1 .. coalesce(array_length(doomed, 1), 0) LOOP
            EXECUTE format('ALTER TABLE audit_logs DETACH PARTITION %I.%I', doomed_schema[i], doomed[i]);
            -- The transaction id keeps names unique if a day is cleaned
            -- again before the purge ran.
            EXECUTE format('ALTER TABLE %I.%I RENAME TO %I', doomed_schema[i], doomed[i], doomed[i] || '_' || txid_current());
            EXECUTE format('ALTER TABLE %I.%I SET SCHEMA audit_retention_trash', doomed_schema[i], doomed[i] || '_' || txid_current());
        END LOOP;
    END IF;
END
$$;

-- Drops the detached partitions left by audit_retention_cleanup, each in
-- its own transaction (CALL it outside a transaction block). Safe to run
-- concurrently and again after a crash.
CREATE PROCEDURE audit_retention_purge()
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.relname
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'audit_retention_trash' AND c.relkind = 'r'
         ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS audit_retention_trash.%I', t.relname);
        COMMIT;
    END LOOP;
END
$$;

-- The oldest event time in audit_logs without scanning the whole table
-- (there is no B-tree on created_at alone): the default partition, then the
-- daily partitions oldest first, stopping at the first that has a row.
CREATE FUNCTION audit_oldest_event() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    part record;
    oldest timestamptz;
    stray timestamptz;
BEGIN
    SELECT min(created_at) INTO stray FROM audit_logs_default;
    FOR part IN SELECT schema_name, partition_name FROM audit_log_partitions ORDER BY range_from LOOP
        EXECUTE format('SELECT min(created_at) FROM %I.%I', part.schema_name, part.partition_name) INTO oldest;
        IF oldest IS NOT NULL THEN
            -- least() ignores NULLs.
            RETURN least(oldest, stray);
        END IF;
    END LOOP;
    RETURN stray;
END
$$;
