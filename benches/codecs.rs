//! Codec micro-benchmarks (criterion), each beside a baseline:
//!
//! ```text
//! cargo bench --bench codecs                 # about 1.5 minutes once built
//! cargo bench --bench codecs -- decode       # one group (a criterion filter)
//! ```
//!
//! Inputs are the load generator's realistic mix (the same events the
//! pipeline benchmark puts on its topic), cycled through so that every
//! iteration sees a different event.
//!
//! - `decode/*`: one payload → a validated [`AuthEvent`], per event.
//!   `decoder_*` go through [`Decoder::decode`] (size check, encoding
//!   detection, registry lookup, decoding, validation: what ingest runs);
//!   `raw_*` call the decoders alone (`json::decode_json`,
//!   `ReadPlan::decode` on the Avro body). Baselines: the generic trees
//!   (`serde_json::Value`, apache-avro's `Value` through its datum reader),
//!   which are what a first implementation would decode through before it
//!   even starts converting to an event.
//! - `detect/observe`: [`Detector::observe`] with the default (all five)
//!   rules, per event.
//! - `encode/*`: a batch of 5,000 rows (the default `batch_max_rows`) for
//!   PostgreSQL: the service's [`CopyEncoder`] against the encoding loop of
//!   `tokio_postgres::binary_copy::BinaryCopyInWriter` (one `ToSql` value
//!   per column, length patched afterwards, 4 KiB chunks handed to the
//!   sink) and against building an `INSERT … VALUES` statement as text.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_service::activity::{ActivityConfig, ActivityDeltas};
use audit_service::detect::{DetectConfig, Detector};
use audit_service::event::avro::AUTH_EVENT_SCHEMA;
use audit_service::event::decode::Decoder;
use audit_service::event::registry::{RegistryConfig, SchemaRegistry};
use audit_service::event::{AuthEvent, ValidationLimits, avro, json};
use audit_service::loadgen::{self, EventGenerator, WireFormat};
use audit_service::store::copy_format::{CopyEncoder, RowRef};
use bytes::{BufMut, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio_postgres::types::{IsNull, Json, ToSql, Type};

const SCHEMA_ID: u32 = 1;
/// Distinct events cycled through by the decoders.
const MIX: usize = 10_000;
const BATCH_ROWS: usize = 5_000;

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// `n` events of the realistic mix, over the last hour.
fn mix(n: usize, seed: u64) -> Vec<AuthEvent> {
    let mut generator = EventGenerator::new(seed, 100_000);
    let now = now_micros();
    (0..n).map(|i| generator.next_event(now - 3_600_000_000 + i as i64 * 1000)).collect()
}

/// The decoder as ingest builds it, and its registry (for the raw plans).
fn decoder() -> (Decoder, Arc<SchemaRegistry>) {
    let registry =
        SchemaRegistry::from_config(&RegistryConfig { schema_dirs: Vec::new(), ..RegistryConfig::default() })
            .expect("registry");
    registry.register_schema_for_id(SCHEMA_ID, AUTH_EVENT_SCHEMA).expect("register the built-in schema");
    let registry = Arc::new(registry);
    (Decoder::new(ValidationLimits::default(), registry.clone()), registry)
}

/// Calls `f` on the next item of `items` each iteration, round robin.
fn cycle<'a, T, R>(items: &'a [T], mut f: impl FnMut(&'a T) -> R) -> impl FnMut() -> R {
    let mut i = 0;
    move || {
        i += 1;
        if i == items.len() {
            i = 0;
        }
        f(&items[i])
    }
}

fn decode(c: &mut Criterion) {
    let events = mix(MIX, 42);
    let (decoder, registry) = decoder();
    let json: Vec<Vec<u8>> = events.iter().map(|e| loadgen::encode(e, WireFormat::Json)).collect();
    let confluent: Vec<Vec<u8>> =
        events.iter().map(|e| loadgen::encode(e, WireFormat::AvroConfluent(SCHEMA_ID))).collect();
    let single: Vec<Vec<u8>> = events.iter().map(|e| loadgen::encode(e, WireFormat::AvroSingleObject)).collect();
    let bodies: Vec<Vec<u8>> = events.iter().map(avro::encode_body).collect();
    let avg = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>() / v.len();
    eprintln!(
        "payload bytes per event: json {}, avro confluent {}, avro single-object {}",
        avg(&json),
        avg(&confluent),
        avg(&single)
    );
    // Every payload must decode back to its event, or the figures mean nothing.
    let now = now_micros();
    for (i, e) in events.iter().enumerate() {
        for p in [&json[i], &confluent[i], &single[i]] {
            assert_eq!(&decoder.decode(p, now).expect("decodes").0, e);
        }
    }
    let plan = registry.plan_for_id(SCHEMA_ID).unwrap();
    let fingerprint_plan = registry.plan_for_fingerprint(avro::auth_event_fingerprint()).unwrap();

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decoder_json", |b| b.iter(cycle(&json, |p| decoder.decode(black_box(p), now).unwrap())));
    g.bench_function("decoder_avro_confluent", |b| {
        b.iter(cycle(&confluent, |p| decoder.decode(black_box(p), now).unwrap()))
    });
    g.bench_function("decoder_avro_single_object", |b| {
        b.iter(cycle(&single, |p| decoder.decode(black_box(p), now).unwrap()))
    });
    g.bench_function("raw_json", |b| b.iter(cycle(&json, |p| json::decode_json(black_box(p)).unwrap())));
    g.bench_function("raw_avro_confluent", |b| {
        b.iter(cycle(&confluent, |p| {
            let (_, body) = avro::split_confluent(black_box(p)).unwrap();
            plan.decode(body).unwrap()
        }))
    });
    g.bench_function("raw_avro_single_object", |b| {
        b.iter(cycle(&single, |p| {
            let (_, body) = avro::split_single_object(black_box(p)).unwrap();
            fingerprint_plan.decode(body).unwrap()
        }))
    });
    g.bench_function("baseline_serde_json_value_tree", |b| {
        b.iter(cycle(&json, |p| serde_json::from_slice::<serde_json::Value>(black_box(p)).unwrap()))
    });
    let schema = apache_avro::Schema::parse_str(AUTH_EVENT_SCHEMA).unwrap();
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema).build().unwrap();
    g.bench_function("baseline_apache_avro_value_tree", |b| {
        b.iter(cycle(&bodies, |body| reader.read_value(&mut black_box(&body[..])).unwrap()))
    });
    g.finish();
}

fn detect(c: &mut Criterion) {
    const N: usize = 200_000;
    const STEP: i64 = 100; // µs between events: 10,000 events/s of event time
    let mut generator = EventGenerator::new(9, 100_000);
    let t0 = 1_800_000_000_000_000;
    let mut events: Vec<AuthEvent> = (0..N).map(|i| generator.next_event(t0 + i as i64 * STEP)).collect();
    let mut detector = Detector::new(&DetectConfig::default()).unwrap();
    assert_eq!(detector.rules().len(), 5, "the default rules are all on");
    let mut out = Vec::new();
    let mut next = 0usize;
    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(1));
    g.bench_function("observe_all_rules", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                if next == N {
                    // Go round again later in event time (not timed).
                    for e in &mut events {
                        e.occurred_at += N as i64 * STEP;
                    }
                    next = 0;
                }
                let take = left.min(N - next);
                let start = Instant::now();
                for e in &events[next..next + take] {
                    detector.observe(black_box(e), 0, &mut out);
                    out.clear();
                }
                spent += start.elapsed();
                next += take;
                left -= take;
            }
            spent
        })
    });
    g.finish();
}

/// The row as a generic binary-copy writer takes it: one `ToSql` per
/// column, metadata as a JSON value.
fn encode_generic(buf: &mut BytesMut, types: &[Type], e: &AuthEvent, received_at: i64, partition: i32, offset: i64) {
    let created = chrono::DateTime::from_timestamp_micros(e.occurred_at).unwrap();
    let received = chrono::DateTime::from_timestamp_micros(received_at).unwrap();
    let metadata = (!e.metadata.is_empty()).then(|| {
        Json(serde_json::Value::Object(
            e.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
        ))
    });
    let values: [&(dyn ToSql + Sync); 13] = [
        &e.event_id,
        &created,
        &received,
        &e.action,
        &e.user_id,
        &e.username,
        &e.ip_address,
        &e.user_agent,
        &e.session_id,
        &e.request_id,
        &metadata,
        &partition,
        &offset,
    ];
    // BinaryCopyInWriter::write_raw, minus the await.
    buf.put_i16(types.len() as i16);
    for (value, ty) in values.iter().zip(types) {
        let at = buf.len();
        buf.put_i32(0);
        let len = match value.to_sql_checked(ty, buf).unwrap() {
            IsNull::Yes => -1,
            IsNull::No => (buf.len() - at - 4) as i32,
        };
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

fn quote_literal(out: &mut String, s: Option<&str>) {
    match s {
        None => out.push_str("NULL"),
        Some(s) => {
            out.push('\'');
            for c in s.chars() {
                if c == '\'' {
                    out.push('\'');
                }
                out.push(c);
            }
            out.push('\'');
        }
    }
}

/// One multi-row `INSERT … VALUES (…), (…)` statement as text.
fn encode_insert_values(out: &mut String, events: &[AuthEvent], received_at: i64) {
    out.push_str(
        "INSERT INTO audit_logs (event_id, created_at, received_at, action, user_id, username, ip_address, \
         user_agent, session_id, request_id, metadata, kafka_partition, kafka_offset) VALUES ",
    );
    let received = chrono::DateTime::from_timestamp_micros(received_at).unwrap().to_rfc3339();
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let created = chrono::DateTime::from_timestamp_micros(e.occurred_at).unwrap().to_rfc3339();
        let metadata = (!e.metadata.is_empty()).then(|| {
            serde_json::to_string(&e.metadata.iter().cloned().collect::<std::collections::BTreeMap<String, String>>())
                .unwrap()
        });
        let _ = write!(out, "('{}','{created}','{received}',", e.event_id);
        quote_literal(out, Some(&e.action));
        out.push(',');
        quote_literal(out, e.user_id.as_deref());
        out.push(',');
        quote_literal(out, e.username.as_deref());
        out.push(',');
        quote_literal(out, e.ip_address.map(|ip: IpAddr| ip.to_string()).as_deref());
        for s in [&e.user_agent, &e.session_id, &e.request_id] {
            out.push(',');
            quote_literal(out, s.as_deref());
        }
        out.push(',');
        quote_literal(out, metadata.as_deref());
        let _ = write!(out, ",{},{})", i % 16, i);
    }
    out.push_str(" ON CONFLICT DO NOTHING");
}

fn encode(c: &mut Criterion) {
    let events = mix(BATCH_ROWS, 7);
    let now = now_micros();
    let types = [
        Type::UUID,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INET,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
        Type::INT4,
        Type::INT8,
    ];
    // Both binary encoders must produce the same stream.
    {
        let mut ours = CopyEncoder::with_capacity(256 * 1024);
        let mut generic = BytesMut::new();
        generic.put_slice(b"PGCOPY\n\xff\r\n\0");
        generic.put_i32(0);
        generic.put_i32(0);
        for (i, e) in events.iter().enumerate() {
            ours.push(&RowRef { event: e, received_at: now, partition: (i % 16) as i32, offset: i as i64 });
            encode_generic(&mut generic, &types, e, now, (i % 16) as i32, i as i64);
        }
        generic.put_i16(-1);
        assert_eq!(ours.finish(), generic, "CopyEncoder and the generic writer disagree");
    }

    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(BATCH_ROWS as u64));
    g.bench_function("copy_encoder_batch_5000", |b| {
        b.iter(|| {
            // As the writer does per batch.
            let mut enc = CopyEncoder::with_capacity(256 * 1024);
            for (i, e) in events.iter().enumerate() {
                enc.push(&RowRef {
                    event: black_box(e),
                    received_at: now,
                    partition: (i % 16) as i32,
                    offset: i as i64,
                });
            }
            enc.finish()
        })
    });
    g.bench_function("baseline_binary_copy_in_writer_batch_5000", |b| {
        b.iter(|| {
            let mut buf = BytesMut::new();
            buf.put_slice(b"PGCOPY\n\xff\r\n\0");
            buf.put_i32(0);
            buf.put_i32(0);
            let mut sent = 0;
            for (i, e) in events.iter().enumerate() {
                encode_generic(&mut buf, &types, black_box(e), now, (i % 16) as i32, i as i64);
                if buf.len() > 4096 {
                    // What the writer hands to its sink.
                    sent += black_box(buf.split().freeze()).len();
                }
            }
            buf.put_i16(-1);
            sent + buf.len()
        })
    });
    // What the activity tracker adds to each batch: its deltas, computed
    // and encoded as the one row of arrays the writer COPYs.
    let activity = ActivityConfig::default();
    g.bench_function("activity_deltas_batch_5000", |b| {
        b.iter(|| ActivityDeltas::from_events(&activity, black_box(&events)).encode().finish())
    });
    g.bench_function("baseline_insert_values_text_batch_5000", |b| {
        b.iter(|| {
            let mut sql = String::new();
            encode_insert_values(&mut sql, black_box(&events), now);
            sql
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // 12 benchmarks × (1 s warm-up + 3 s measurement + analysis): ~1.5 minutes.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(40);
    targets = decode, detect, encode
}
criterion_main!(benches);
