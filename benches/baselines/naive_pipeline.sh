#!/usr/bin/env bash
# Baseline (c) of `cargo bench --bench pipeline`: the pipeline a team would
# script before writing a service. kcat reads the whole topic, jq turns each
# JSON event into a CSV row, psql COPYs the rows into audit_logs.
#
#   bash benches/baselines/naive_pipeline.sh BOOTSTRAP_SERVERS TOPIC DATABASE_URL
#
# No de-duplication, no stored offsets, one transaction, nothing dead-
# lettered: it is only a speed reference. kcat's format string wraps each
# payload (a JSON object) in a JSON object with its partition and offset,
# so that jq can fill kafka_partition and kafka_offset; created_at is the
# event's occurred_at, received_at takes the column default (now()),
# metadata goes in as JSON text (NULL when empty, as the service stores it).
set -euo pipefail

bootstrap=$1
topic=$2
database_url=$3

kcat -C -b "$bootstrap" -t "$topic" -o beginning -e -q -f '{"p":%p,"o":%o,"v":%s}\n' \
  | jq -r '[.v.event_id, .v.occurred_at, .v.action, .v.user_id, .v.username, .v.ip_address,
            .v.user_agent, .v.session_id, .v.request_id,
            (.v.metadata | if . == null or . == {} then null else tojson end),
            .p, .o] | @csv' \
  | psql "$database_url" -v ON_ERROR_STOP=1 -q -c "COPY audit_logs (event_id, created_at, action, user_id, \
username, ip_address, user_agent, session_id, request_id, metadata, kafka_partition, kafka_offset) \
FROM STDIN WITH (FORMAT csv)"
