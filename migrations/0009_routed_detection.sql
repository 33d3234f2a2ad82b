-- Routed detection (src/detect/routing.rs, src/ingest/routed.rs): rules keyed
-- by IP address or system-wide are evaluated on a routing topic, where each
-- event arrives once per routed key, partitioned by the key.
--
-- The routed consumers store their offsets in consumer_offsets (group
-- `<group_id>.routed`) and, in the same transaction, how far they have
-- counted each events-topic partition on each routing partition. Both
-- together make the count exact: a record at or below that source offset is
-- a re-send (the instance that consumed the event restarted before its
-- batch committed) and is skipped, and a rebuild after a rebalance replays
-- from audit_logs exactly the events counted so far.
CREATE TABLE routed_progress (
    consumer_group   text    NOT NULL,
    routed_partition integer NOT NULL,
    source_partition integer NOT NULL,
    -- Highest events-topic offset of source_partition counted on
    -- routed_partition.
    source_offset    bigint  NOT NULL,
    PRIMARY KEY (consumer_group, routed_partition, source_partition)
);
