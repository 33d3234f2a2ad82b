#!/usr/bin/env python3
"""Baseline (d) of `cargo bench --bench pipeline`: the hand-written Python
consumer a team writes first.

    python3 benches/baselines/python_consumer.py \
        --bootstrap-servers HOST:PORT --topic auth.events \
        --dsn postgres://postgres@127.0.0.1:5432/audit [--expect N]

confluent-kafka consumer, poll one message at a time, json.loads, build a
row, COPY the rows into audit_logs in batches with psycopg 3, commit the
transaction, then commit the Kafka offsets (at-least-once: no
de-duplication, no dead-letter topic, no validation beyond what PostgreSQL
refuses). `--expect N` makes it exit once N events are stored (for the
benchmark); it then prints `done <events> <cpu seconds> <peak RSS KiB>`.
"""

import argparse
import json
import resource
import sys
import time

import psycopg
from confluent_kafka import Consumer

COPY = (
    "COPY audit_logs (event_id, created_at, action, user_id, username, ip_address, "
    "user_agent, session_id, request_id, metadata, kafka_partition, kafka_offset) FROM STDIN"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap-servers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", default="audit-python-consumer")
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--expect", type=int, default=0)
    args = ap.parse_args()

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([args.topic])
    conn = psycopg.connect(args.dsn)
    print("running", flush=True)

    stored = 0
    batch = []
    last_flush = time.monotonic()

    def flush():
        nonlocal stored, last_flush
        with conn.cursor() as cur:
            with cur.copy(COPY) as copy:
                for row in batch:
                    copy.write_row(row)
        conn.commit()
        consumer.commit(asynchronous=False)
        stored += len(batch)
        batch.clear()
        last_flush = time.monotonic()

    try:
        while not args.expect or stored < args.expect:
            msg = consumer.poll(1.0)
            if msg is None:
                if batch:
                    flush()
                continue
            if msg.error():
                print(f"kafka error: {msg.error()}", file=sys.stderr)
                continue
            event = json.loads(msg.value())
            metadata = event.get("metadata")
            batch.append(
                (
                    event["event_id"],
                    event["occurred_at"],
                    event["action"],
                    event.get("user_id"),
                    event.get("username"),
                    event.get("ip_address"),
                    event.get("user_agent"),
                    event.get("session_id"),
                    event.get("request_id"),
                    json.dumps(metadata) if metadata else None,
                    msg.partition(),
                    msg.offset(),
                )
            )
            if len(batch) >= args.batch_size or time.monotonic() - last_flush > 1.0:
                flush()
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"done {stored} {usage.ru_utime + usage.ru_stime:.2f} {usage.ru_maxrss}", flush=True)
        consumer.close()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
