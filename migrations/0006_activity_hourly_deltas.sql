-- System-wide hourly counts read per batch, not per entry.
--
-- activity_hourly_v (the summary's top actions and busiest hours) summed
-- every pending rollup entry, about one per event. Each delta batch now
-- also carries its counts per (hour, action) already summed: a few dozen
-- entries instead of thousands. Batches written before this migration
-- lack them and are summed entry by entry, as before.

ALTER TABLE activity_delta_batches
    ADD COLUMN h_hours   timestamptz[],
    ADD COLUMN h_actions text[],
    ADD COLUMN h_events  bigint[];

CREATE OR REPLACE VIEW activity_hourly_v AS
SELECT hour, action, sum(events)::bigint AS events
  FROM (SELECT hour, action, events FROM activity_hourly
        UNION ALL
        SELECT r.hour, r.action COLLATE "C", r.events
          FROM activity_delta_batches b, unnest(b.h_hours, b.h_actions, b.h_events) AS r(hour, action, events)
         WHERE b.h_hours IS NOT NULL
        UNION ALL
        SELECT r.hour, r.action COLLATE "C", r.events
          FROM activity_delta_batches b, unnest(b.hours, b.actions, b.events) AS r(hour, action, events)
         WHERE b.h_hours IS NULL) u
 GROUP BY hour, action;
