-- Admin actions per batch, read per batch, not per entry.
--
-- The summary's admin action frequency per admin summed every pending
-- rollup entry, about one per event, to find the few ADMIN_* ones. Each
-- delta batch now also carries its ADMIN_* counts per (admin, hour,
-- action) apart, usually none or a handful. Batches written before this
-- migration lack them and are read entry by entry, as before.

ALTER TABLE activity_delta_batches
    ADD COLUMN a_users   text[],
    ADD COLUMN a_hours   timestamptz[],
    ADD COLUMN a_actions text[],
    ADD COLUMN a_events  bigint[];

-- ADMIN_* events per admin, hour and action: folded rows plus pending
-- deltas, exact at any moment (like activity_user_hourly_v, for these
-- actions only).
CREATE VIEW activity_admin_hourly_v AS
SELECT user_id, hour, action, sum(events)::bigint AS events
  FROM (SELECT user_id, hour, action, events FROM activity_user_hourly
         WHERE action >= 'ADMIN_' AND action < 'ADMIN`'
        UNION ALL
        SELECT r.user_id COLLATE "C", r.hour, r.action COLLATE "C", r.events
          FROM activity_delta_batches b, unnest(b.a_users, b.a_hours, b.a_actions, b.a_events) AS r(user_id, hour, action, events)
         WHERE b.a_users IS NOT NULL
        UNION ALL
        SELECT r.user_id COLLATE "C", r.hour, r.action COLLATE "C", r.events
          FROM activity_delta_batches b, unnest(b.user_ids, b.hours, b.actions, b.events) AS r(user_id, hour, action, events)
         WHERE b.a_users IS NULL AND r.user_id IS NOT NULL AND r.action >= 'ADMIN_' AND r.action < 'ADMIN`') u
 GROUP BY user_id, hour, action;
