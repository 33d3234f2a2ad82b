-- Alerts at least once across a crash (DESIGN guarantee 4).
--
-- A transition is stored with the batch that raised it and handed to the
-- producer at the same time; Kafka may acknowledge it only later. The
-- sender records the acknowledgement here. A published transition still
-- without one when its partition is next assigned (the process died with it
-- in flight, or Kafka refused it for good) is sent again under the same
-- alert_id, which consumers de-duplicate on.
ALTER TABLE alerts ADD COLUMN delivered_at timestamptz;

-- What was stored before this migration is taken as delivered: it is not
-- known, and re-sending the whole history would be worse.
UPDATE alerts SET delivered_at = detected_at WHERE published;

CREATE INDEX alerts_undelivered_idx ON alerts (kafka_partition) WHERE published AND delivered_at IS NULL;
