-- The Kafka partition an alert's episode came from (the partition of the
-- event that opened it), so that after a restart or a rebalance only the
-- instance that owns the partition picks the open episode up again. An
-- instance that restored every open alert would resolve, after the quiet
-- period, episodes whose events another instance is still counting.
-- NULL on rows stored before this migration: those are picked up by every
-- instance, as before.
ALTER TABLE alerts ADD COLUMN kafka_partition integer;
