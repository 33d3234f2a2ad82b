-- The audit log, the ingest bookkeeping and the partition maintenance.
--
-- audit_logs keeps the column names of the operators' runbook (user_id,
-- action, ip_address, created_at) so that its queries run unchanged.
-- created_at is the EVENT time (occurred_at of the event), which is also the
-- partition key: retention drops whole daily partitions.

CREATE TABLE audit_logs (
    event_id        uuid        NOT NULL,
    created_at      timestamptz NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    -- "C" collation lets a plain B-tree serve prefix searches such as
    -- action LIKE 'SECURITY_%'.
    action          text COLLATE "C" NOT NULL,
    user_id         text,
    username        text,
    ip_address      inet,
    user_agent      text,
    session_id      text,
    request_id      text,
    metadata        jsonb,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    -- The idempotency key: a producer retry of the same event is stored once.
    -- A unique constraint on a partitioned table must hold the partition key.
    CONSTRAINT audit_logs_event_id_key UNIQUE (event_id, created_at)
) PARTITION BY RANGE (created_at);

COMMENT ON COLUMN audit_logs.created_at IS 'event time (occurred_at), the partition key';
COMMENT ON COLUMN audit_logs.received_at IS 'when audit-service consumed the event';

-- Events outside every daily partition land here instead of failing.
CREATE TABLE audit_logs_default PARTITION OF audit_logs DEFAULT;

-- Indexes are the main cost of ingest (every B-tree over every row roughly
-- halves COPY speed), so each one serves a query that needs it, partial
-- indexes cover only the rare rows the security queries look for, time is
-- served by partition pruning and a BRIN, and the counting reports read the
-- activity rollups instead. See tests/schema.rs for the EXPLAIN checks.
--
-- Log search and activity by user (the latency target of the admin API).
CREATE INDEX audit_logs_user_time_idx ON audit_logs (user_id, created_at);
-- Everything but the routine session traffic (about a fifth of the rows):
-- failed logins by time, SECURITY_* and ADMIN_* searches (the API's prefix
-- search is a range, which this predicate is proven to cover), lockdown.
CREATE INDEX audit_logs_notable_idx ON audit_logs (action, created_at)
    WHERE action NOT IN ('AUTH_LOGIN', 'AUTH_LOGOUT', 'TOKEN_ISSUED', 'TOKEN_REVOKED');
-- The runbook's security-incident report, verbatim (LIKE 'SECURITY_%').
CREATE INDEX audit_logs_security_idx ON audit_logs (created_at) WHERE action LIKE 'SECURITY_%';
-- Failed logins by address and network (suspicious IPs, the runbook's
-- failed-login analysis). Other searches by address go by time.
CREATE INDEX audit_logs_failed_ip_idx ON audit_logs (ip_address, created_at) WHERE action = 'FAILED_AUTH_LOGIN';
-- Time ranges inside a partition (last hour, completeness check): a BRIN
-- costs almost nothing at ingest because rows arrive roughly in time order.
CREATE INDEX audit_logs_time_brin ON audit_logs USING brin (created_at);

-- Where each partition of each consumed topic has got to. Written in the
-- same transaction as the rows, which is what makes ingest exactly-once.
CREATE TABLE consumer_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    kafka_partition integer    NOT NULL,
    next_offset    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- One row per message sent to the dead-letter topic, written in the same
-- transaction as the offsets that pass over it.
CREATE TABLE dead_letters (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    topic            text        NOT NULL,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    reason_code      text        NOT NULL,
    reason           text        NOT NULL,
    payload_bytes    integer     NOT NULL
);
CREATE INDEX dead_letters_time_idx ON dead_letters (dead_lettered_at);

-- Creates the daily partition holding p_day (UTC) if it is missing, moving
-- any rows of that day out of the default partition first (attaching a
-- partition whose rows sit in the default partition would fail).
-- Returns true when it created the partition.
CREATE FUNCTION audit_ensure_partition(p_day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('audit_logs_p%s', to_char(p_day, 'YYYYMMDD'));
    lo timestamptz := p_day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (p_day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Serialise concurrent creators (several instances, a retention run, a
    -- killed instance whose statement is still finishing). A relation lock,
    -- unlike an advisory lock, also makes this session see the catalog as
    -- the previous holder left it. It does not block inserts.
    LOCK TABLE audit_logs IN SHARE UPDATE EXCLUSIVE MODE;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE audit_logs INCLUDING DEFAULTS)', part);
    EXECUTE format(
        'WITH moved AS (DELETE FROM audit_logs_default WHERE created_at >= %L AND created_at < %L RETURNING *)
         INSERT INTO %I SELECT * FROM moved', lo, hi, part);
    EXECUTE format('ALTER TABLE audit_logs ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    RETURN true;
END
$$;

-- Ensures the daily partitions from p_from to p_to inclusive; returns how
-- many it created.
CREATE FUNCTION audit_ensure_partitions(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d date := p_from;
    created integer := 0;
BEGIN
    WHILE d <= p_to LOOP
        IF audit_ensure_partition(d) THEN
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END
$$;
