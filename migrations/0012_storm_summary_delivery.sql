-- Storm summaries carry every transition the storm limiter held back
-- (schemas/alert.avsc, withheld.alerts), and their acknowledgement is
-- recorded for each one: every transition, published on its own or not,
-- is now delivered at least once, and one still without `delivered_at`
-- when its partition is next assigned is sent again.

-- Held back before this migration: only counted in a summary, and the
-- history is not re-sent (as migrations/0011 did for the published ones).
UPDATE alerts SET delivered_at = detected_at WHERE NOT published AND delivered_at IS NULL;

DROP INDEX IF EXISTS alerts_undelivered_idx;
CREATE INDEX alerts_undelivered_idx ON alerts (kafka_partition) WHERE delivered_at IS NULL;
