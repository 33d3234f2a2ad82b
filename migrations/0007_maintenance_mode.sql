-- Maintenance mode belongs to the deployment, not to one instance.
--
-- An operator's pause (POST /api/v1/audit/maintenance, on whichever
-- instance the load balancer picked) is stored here; every instance follows
-- it within a second (src/ingest/maintenance.rs), and an instance that
-- starts or restarts while it is set starts paused: a pause for database
-- maintenance must not end because a pod was rescheduled.
--
-- One row. `version` grows by one at each switch: an instance applies each
-- switch once, so that a pause it made alone while the database was
-- unreachable is not undone by the older stored state.
CREATE TABLE maintenance_mode (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    paused     boolean     NOT NULL,
    reason     text,
    changed_by text        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    version    bigint      NOT NULL
);
