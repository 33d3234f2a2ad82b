-- Alert transitions from the detectors: one row per transition (firing,
-- escalated, resolved), written in the same transaction as the batch whose
-- events caused it, so that a restart knows exactly which alerts were sent.

CREATE TABLE alerts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stable per episode: derived from rule, subject and episode start.
    alert_id         uuid        NOT NULL,
    rule             text        NOT NULL,
    subject          text        NOT NULL,
    -- Which of the rule's group_by keys, and the key's stable hash: lets a
    -- restarted detector pick the open episode up again.
    key_spec         text        NOT NULL,
    key_hash         bigint      NOT NULL,
    state            text        NOT NULL CHECK (state IN ('firing', 'escalated', 'resolved')),
    severity         text        NOT NULL CHECK (severity IN ('warning', 'critical')),
    count            bigint      NOT NULL,
    threshold        bigint      NOT NULL,
    window_seconds   bigint      NOT NULL,
    episode_start    timestamptz NOT NULL,
    first_event_at   timestamptz,
    last_event_at    timestamptz,
    sample_event_ids uuid[]      NOT NULL DEFAULT '{}',
    recommended_action text      NOT NULL,
    detected_at      timestamptz NOT NULL DEFAULT now(),
    -- Whether the storm limiter let the message out (false: summarised in
    -- an aggregate alert instead).
    published        boolean     NOT NULL DEFAULT true,
    -- A re-detection after a restart re-sends; it is stored once.
    CONSTRAINT alerts_transition_key UNIQUE (alert_id, state)
);

CREATE INDEX alerts_detected_idx ON alerts (detected_at DESC);
CREATE INDEX alerts_rule_subject_idx ON alerts (rule, subject, detected_at DESC);
