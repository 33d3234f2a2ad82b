//! From a Kafka message payload to a validated [`AuthEvent`]: size check,
//! encoding detection by the first bytes, decoding, validation.

use std::sync::Arc;

use super::avro::{self, CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC};
use super::registry::SchemaRegistry;
use super::validate::{ValidationLimits, validate};
use super::{AuthEvent, DecodeError, EpochMicros, json};

/// The wire encodings a payload may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    /// `0x00`, 4-byte big-endian schema id, Avro body.
    AvroConfluent,
    /// `0xC3 0x01`, 8-byte little-endian schema fingerprint, Avro body.
    AvroSingleObject,
}

impl Encoding {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::AvroConfluent => "avro_confluent",
            Encoding::AvroSingleObject => "avro_single_object",
        }
    }

    /// Recognises the encoding from the first bytes. A JSON object may be
    /// preceded by JSON whitespace.
    pub fn detect(payload: &[u8]) -> Result<Encoding, DecodeError> {
        let first_byte = *payload.first().ok_or(DecodeError::Empty)?;
        if first_byte == CONFLUENT_MAGIC {
            return Ok(Encoding::AvroConfluent);
        }
        if payload.starts_with(&SINGLE_OBJECT_MAGIC) {
            return Ok(Encoding::AvroSingleObject);
        }
        let json_start = payload.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if json_start == Some(&b'{') {
            return Ok(Encoding::Json);
        }
        Err(DecodeError::UnknownEncoding { first_byte })
    }
}

/// Turns payloads into validated events. Shared by all decoding threads.
pub struct Decoder {
    limits: ValidationLimits,
    registry: Arc<SchemaRegistry>,
}

impl Decoder {
    pub fn new(limits: ValidationLimits, registry: Arc<SchemaRegistry>) -> Self {
        Decoder { limits, registry }
    }

    pub fn limits(&self) -> &ValidationLimits {
        &self.limits
    }

    /// Decodes and validates one payload; `now` is the consumer's clock.
    ///
    /// Blocking: an Avro schema id seen for the first time is fetched from
    /// the schema registry (see [`SchemaRegistry::plan_for_id`]), so call
    /// this from a plain thread, not from async code.
    pub fn decode(&self, payload: &[u8], now: EpochMicros) -> Result<(AuthEvent, Encoding), DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        if payload.len() > self.limits.max_message_bytes {
            return Err(DecodeError::TooLarge { size: payload.len(), limit: self.limits.max_message_bytes });
        }
        let encoding = Encoding::detect(payload)?;
        let event = match encoding {
            Encoding::Json => json::decode_json(payload)?,
            Encoding::AvroConfluent => {
                let (id, body) = avro::split_confluent(payload)?;
                self.registry.plan_for_id(id)?.decode(body)?
            }
            Encoding::AvroSingleObject => {
                let (fingerprint, body) = avro::split_single_object(payload)?;
                self.registry.plan_for_fingerprint(fingerprint)?.decode(body)?
            }
        };
        validate(&event, &self.limits, now)?;
        Ok((event, encoding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Violation;
    use crate::event::avro::{
        AUTH_EVENT_SCHEMA, auth_event_fingerprint, confluent_frame, encode_body, single_object_frame,
    };
    use crate::event::registry::RegistryConfig;
    use chrono::{DateTime, SecondsFormat};
    use serde_json::{Value, json};
    use uuid::Uuid;

    /// 2025-06-01T12:00:00Z
    const NOW: EpochMicros = 1_748_779_200_000_000;
    const MINUTE: EpochMicros = 60_000_000;
    const SCHEMA_ID: u32 = 1;
    const NUMERIC_USER_ID_SCHEMA_ID: u32 = 2;

    fn decoder() -> Decoder {
        let registry =
            SchemaRegistry::from_config(&RegistryConfig { schema_dirs: Vec::new(), ..RegistryConfig::default() })
                .unwrap();
        registry.register_schema_for_id(SCHEMA_ID, AUTH_EVENT_SCHEMA).unwrap();
        registry
            .register_schema_for_id(
                NUMERIC_USER_ID_SCHEMA_ID,
                r#"{"type": "record", "name": "AuthEvent", "fields": [
                    {"name": "event_id", "type": "string"},
                    {"name": "occurred_at", "type": "long"},
                    {"name": "action", "type": "string"},
                    {"name": "user_id", "type": "long"}
                ]}"#,
            )
            .unwrap();
        Decoder::new(ValidationLimits::default(), Arc::new(registry))
    }

    fn event() -> AuthEvent {
        AuthEvent {
            event_id: Uuid::parse_str("0b7e7c3e-3f0e-4d5b-9a43-5d1d2e7f9a01").unwrap(),
            occurred_at: NOW - 1_500_000,
            action: "FAILED_AUTH_LOGIN".to_owned(),
            user_id: Some("u-7".to_owned()),
            username: Some("mallory".to_owned()),
            ip_address: Some("198.51.100.23".parse().unwrap()),
            user_agent: Some("python-requests/2.32".to_owned()),
            session_id: None,
            request_id: Some("req-19".to_owned()),
            // In key order: serde_json's Map used to build payloads sorts keys.
            metadata: vec![
                ("attempt".to_owned(), "3".to_owned()),
                ("failure_reason".to_owned(), "bad_password".to_owned()),
            ],
        }
    }

    /// The JSON fields of an event; tests then change single fields.
    fn fields(e: &AuthEvent) -> Value {
        let time = DateTime::from_timestamp_micros(e.occurred_at).unwrap().to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let metadata: serde_json::Map<String, Value> =
            e.metadata.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        json!({
            "event_id": e.event_id.to_string(),
            "occurred_at": time,
            "action": e.action,
            "user_id": e.user_id,
            "username": e.username,
            "ip_address": e.ip_address.map(|ip| ip.to_string()),
            "user_agent": e.user_agent,
            "session_id": e.session_id,
            "request_id": e.request_id,
            "metadata": metadata,
        })
    }

    fn write_long(out: &mut Vec<u8>, value: i64) {
        let mut n = ((value << 1) ^ (value >> 63)) as u64;
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    fn write_str(out: &mut Vec<u8>, text: &str) {
        write_long(out, text.len() as i64);
        out.extend_from_slice(text.as_bytes());
    }

    /// The same fields as an Avro body of our schema, written by hand so
    /// that values an `AuthEvent` cannot hold (a bad IP, say) can be sent.
    fn avro_body(fields: &Value) -> Vec<u8> {
        let text = |name: &str| fields[name].as_str();
        let mut out = Vec::new();
        write_str(&mut out, text("event_id").unwrap());
        let time = DateTime::parse_from_rfc3339(text("occurred_at").unwrap()).unwrap();
        write_long(&mut out, time.timestamp_micros());
        write_str(&mut out, text("action").unwrap());
        for name in ["user_id", "username", "ip_address", "user_agent", "session_id", "request_id"] {
            match text(name) {
                None => write_long(&mut out, 0),
                Some(value) => {
                    write_long(&mut out, 1);
                    write_str(&mut out, value);
                }
            }
        }
        let metadata = fields["metadata"].as_object().unwrap();
        if !metadata.is_empty() {
            write_long(&mut out, metadata.len() as i64);
            for (key, value) in metadata {
                write_str(&mut out, key);
                write_str(&mut out, value.as_str().unwrap());
            }
        }
        write_long(&mut out, 0);
        out
    }

    /// The fields in each of the three encodings.
    fn payloads(fields: &Value) -> [(Encoding, Vec<u8>); 3] {
        let body = avro_body(fields);
        [
            (Encoding::Json, serde_json::to_vec(fields).unwrap()),
            (Encoding::AvroConfluent, confluent_frame(SCHEMA_ID, &body)),
            (Encoding::AvroSingleObject, single_object_frame(auth_event_fingerprint(), &body)),
        ]
    }

    /// Decodes `fields` in every encoding and checks all agree.
    fn decode_all(fields: &Value) -> Result<AuthEvent, DecodeError> {
        let decoder = decoder();
        let [first, rest @ ..] = payloads(fields).map(|(encoding, payload)| {
            decoder.decode(&payload, NOW).map(|(event, detected)| {
                assert_eq!(detected, encoding);
                event
            })
        });
        for other in rest {
            assert_eq!(other, first);
        }
        first
    }

    fn with(field: &str, value: Value) -> Value {
        let mut f = fields(&event());
        f[field] = value;
        f
    }

    #[test]
    fn the_three_encodings_give_identical_events() {
        let expected = event();
        let decoder = decoder();
        let body = encode_body(&expected);
        let payloads = [
            (Encoding::Json, serde_json::to_vec(&fields(&expected)).unwrap()),
            (Encoding::AvroConfluent, confluent_frame(SCHEMA_ID, &body)),
            (Encoding::AvroSingleObject, single_object_frame(auth_event_fingerprint(), &body)),
        ];
        for (encoding, payload) in payloads {
            let (event, detected) = decoder.decode(&payload, NOW).unwrap();
            assert_eq!(detected, encoding);
            assert_eq!(event, expected, "{}", encoding.as_str());
        }
        assert_eq!(decode_all(&fields(&expected)), Ok(expected));
    }

    #[test]
    fn json_may_start_with_whitespace() {
        let mut payload = b" \r\n\t".to_vec();
        payload.extend(serde_json::to_vec(&fields(&event())).unwrap());
        assert_eq!(decoder().decode(&payload, NOW), Ok((event(), Encoding::Json)));
    }

    #[test]
    fn encoding_labels() {
        assert_eq!(Encoding::Json.as_str(), "json");
        assert_eq!(Encoding::AvroConfluent.as_str(), "avro_confluent");
        assert_eq!(Encoding::AvroSingleObject.as_str(), "avro_single_object");
    }

    #[test]
    fn empty_and_unrecognised_payloads() {
        let decoder = decoder();
        assert_eq!(decoder.decode(b"", NOW), Err(DecodeError::Empty));
        for (payload, first_byte) in [
            (&b"hello"[..], b'h'),
            (b"[{}]", b'['),
            (b"  \n", b' '),
            (b"\xC3", 0xC3),
            (b"\xC3\x02{}", 0xC3),
            (b"\xEF\xBB\xBF{}", 0xEF),
        ] {
            let err = decoder.decode(payload, NOW).unwrap_err();
            assert_eq!(err, DecodeError::UnknownEncoding { first_byte });
            assert_eq!(err.code(), "unknown_encoding");
        }
    }

    #[test]
    fn two_megabyte_message_is_too_large() {
        let decoder = decoder();
        for first in [b'{', 0x00] {
            let mut payload = vec![b' '; 2 * 1024 * 1024];
            payload[0] = first;
            let err = decoder.decode(&payload, NOW).unwrap_err();
            assert_eq!(err, DecodeError::TooLarge { size: 2_097_152, limit: 262_144 });
            assert_eq!(err.code(), "too_large");
        }
    }

    #[test]
    fn truncated_avro() {
        let decoder = decoder();
        let body = encode_body(&event());
        for payload in [
            confluent_frame(SCHEMA_ID, &body[..body.len() - 1]),
            single_object_frame(auth_event_fingerprint(), &body[..20]),
            confluent_frame(SCHEMA_ID, &[])[..3].to_vec(),
            single_object_frame(auth_event_fingerprint(), &[])[..6].to_vec(),
        ] {
            let err = decoder.decode(&payload, NOW).unwrap_err();
            assert_eq!(err.code(), "malformed_avro", "{err}");
            assert!(!err.is_transient());
        }
        assert_eq!(
            decoder.decode(&[0, 0, 1], NOW),
            Err(DecodeError::Avro("Confluent header truncated: 3 of 5 bytes".into()))
        );
    }

    #[test]
    fn unknown_schema_id_and_fingerprint() {
        let decoder = decoder();
        let body = encode_body(&event());
        let err = decoder.decode(&confluent_frame(99, &body), NOW).unwrap_err();
        assert_eq!(err, DecodeError::UnknownSchemaId(99));
        assert_eq!(err.code(), "unknown_schema_id");
        let err = decoder.decode(&single_object_frame(0x0123_4567_89ab_cdef, &body), NOW).unwrap_err();
        assert_eq!(err, DecodeError::UnknownFingerprint(0x0123_4567_89ab_cdef));
        assert_eq!(err.to_string(), "unknown Avro schema fingerprint 0123456789abcdef");
    }

    #[test]
    fn malformed_json() {
        let err = decoder().decode(br#"{"event_id": "0b7e7c3e-"#, NOW).unwrap_err();
        assert_eq!(err.code(), "malformed_json");
        assert!(err.to_string().starts_with("malformed JSON: EOF while parsing"), "{err}");
    }

    #[test]
    fn missing_event_id() {
        let mut f = fields(&event());
        f.as_object_mut().unwrap().remove("event_id");
        let err = decoder().decode(&serde_json::to_vec(&f).unwrap(), NOW).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(Violation::MissingField("event_id")));
        assert_eq!(err.code(), "missing_field");
        assert_eq!(err.to_string(), "validation failed: required field `event_id` is missing or null");
    }

    #[test]
    fn ip_addresses_v4_and_v6() {
        for valid in ["192.0.2.255", "0.0.0.0", "2001:db8:85a3::8a2e:370:7334", "::1", "::ffff:10.0.0.1"] {
            let event = decode_all(&with("ip_address", json!(valid))).unwrap();
            assert_eq!(event.ip_address, Some(valid.parse().unwrap()));
        }
        for invalid in [
            "192.0.2.256",
            "192.0.2",
            "192.0.2.1/24",
            " 192.0.2.1",
            "2001:db8::85a3::1",
            "2001:db8::zz",
            "fe80::1%eth0",
        ] {
            let err = decode_all(&with("ip_address", json!(invalid))).unwrap_err();
            assert_eq!(err, DecodeError::Invalid(Violation::InvalidIp), "{invalid}");
            assert_eq!(err.code(), "invalid_ip");
        }
        assert_eq!(decode_all(&with("ip_address", json!(""))).unwrap().ip_address, None);
    }

    #[test]
    fn nul_bytes() {
        let err = decode_all(&with("username", json!("bob\u{0}"))).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(Violation::NulByte("username")));
        assert_eq!(err.code(), "nul_byte");
        let err = decode_all(&with("metadata", json!({"reason": "x\u{0}y"}))).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(Violation::NulByte("metadata")));
    }

    #[test]
    fn timestamps_out_of_range() {
        let err = decode_all(&with("occurred_at", json!("9999-12-31T23:59:59Z"))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Invalid(Violation::TimestampInFuture {
                occurred_at: 253_402_300_799_000_000,
                max: NOW + 5 * MINUTE
            })
        );
        assert_eq!(err.code(), "timestamp_in_future");

        let err = decode_all(&with("occurred_at", json!("1999-06-30T10:00:00Z"))).unwrap_err();
        assert_eq!(err.code(), "timestamp_too_old");

        let ten_minutes_ahead = DateTime::from_timestamp_micros(NOW + 10 * MINUTE).unwrap().to_rfc3339();
        let err = decode_all(&with("occurred_at", json!(ten_minutes_ahead))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Invalid(Violation::TimestampInFuture {
                occurred_at: NOW + 10 * MINUTE,
                max: NOW + 5 * MINUTE
            })
        );

        let four_minutes_ahead = DateTime::from_timestamp_micros(NOW + 4 * MINUTE).unwrap().to_rfc3339();
        assert_eq!(decode_all(&with("occurred_at", json!(four_minutes_ahead))).unwrap().occurred_at, NOW + 4 * MINUTE);
    }

    #[test]
    fn non_utf8_bytes() {
        let decoder = decoder();
        let mut e = event();
        e.username = Some("zzz".to_owned());

        let mut json = serde_json::to_vec(&fields(&e)).unwrap();
        let at = json.windows(3).position(|w| w == b"zzz").unwrap();
        json[at + 1] = 0xfe;
        assert_eq!(decoder.decode(&json, NOW), Err(DecodeError::InvalidUtf8("payload")));

        let mut body = encode_body(&e);
        let at = body.windows(3).position(|w| w == b"zzz").unwrap();
        body[at + 1] = 0xfe;
        let err = decoder.decode(&confluent_frame(SCHEMA_ID, &body), NOW).unwrap_err();
        assert_eq!(err, DecodeError::InvalidUtf8("username"));
        assert_eq!(err.code(), "invalid_utf8");
    }

    #[test]
    fn numeric_user_id() {
        let decoder = decoder();
        let f = with("user_id", json!(1234567890123_i64));
        let (event, _) = decoder.decode(&serde_json::to_vec(&f).unwrap(), NOW).unwrap();
        assert_eq!(event.user_id.as_deref(), Some("1234567890123"));

        let mut body = Vec::new();
        write_str(&mut body, "0b7e7c3e-3f0e-4d5b-9a43-5d1d2e7f9a01");
        write_long(&mut body, NOW);
        write_str(&mut body, "AUTH_LOGIN");
        write_long(&mut body, 1234567890123);
        let (event, encoding) = decoder.decode(&confluent_frame(NUMERIC_USER_ID_SCHEMA_ID, &body), NOW).unwrap();
        assert_eq!(encoding, Encoding::AvroConfluent);
        assert_eq!(event.user_id.as_deref(), Some("1234567890123"));
    }

    #[test]
    fn validation_applies_to_every_encoding() {
        let err = decode_all(&with("action", json!("drop table;"))).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(Violation::InvalidAction));
        let err = decode_all(&with("event_id", json!("0b7e7c3e"))).unwrap_err();
        assert_eq!(err, DecodeError::Invalid(Violation::InvalidUuid));
    }

    #[test]
    fn decoder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Decoder>();
    }

    /// Decode cost per event for each encoding, end to end (framing,
    /// registry lookup, decoding, validation), and apache_avro's generic
    /// reader on the same Avro body for comparison.
    #[test]
    #[ignore = "micro-benchmark: cargo test --release --lib event -- --ignored --nocapture"]
    fn decode_throughput() {
        use apache_avro::reader::datum::GenericDatumReader;
        use std::hint::black_box;
        use std::time::Instant;

        const EVENTS: u32 = 1_000_000;
        let decoder = decoder();
        let event = event();
        let body = encode_body(&event);
        let payloads = [
            ("json", serde_json::to_vec(&fields(&event)).unwrap()),
            ("avro_confluent", confluent_frame(SCHEMA_ID, &body)),
            ("avro_single_object", single_object_frame(auth_event_fingerprint(), &body)),
        ];
        for (label, payload) in &payloads {
            let started = Instant::now();
            for _ in 0..EVENTS {
                black_box(decoder.decode(black_box(payload), NOW).unwrap());
            }
            let elapsed = started.elapsed();
            println!(
                "{label:>20}: {EVENTS} events of {} bytes in {elapsed:.2?} ({:.0} ns/event)",
                payload.len(),
                elapsed.as_nanos() as f64 / f64::from(EVENTS)
            );
        }

        let plan = decoder.registry.plan_for_id(SCHEMA_ID).unwrap();
        let decoders: [(&str, &dyn Fn() -> AuthEvent); 2] = [
            ("json::decode_json", &|| json::decode_json(black_box(&payloads[0].1)).unwrap()),
            ("ReadPlan::decode", &|| plan.decode(black_box(&body)).unwrap()),
        ];
        for (label, decode) in decoders {
            let started = Instant::now();
            for _ in 0..EVENTS {
                black_box(decode());
            }
            let elapsed = started.elapsed();
            println!(
                "{label:>20}: {EVENTS} events in {elapsed:.2?} ({:.0} ns/event, decoding only)",
                elapsed.as_nanos() as f64 / f64::from(EVENTS)
            );
        }

        let schema = apache_avro::Schema::parse_str(AUTH_EVENT_SCHEMA).unwrap();
        let reader = GenericDatumReader::builder(&schema).build().unwrap();
        let started = Instant::now();
        for _ in 0..EVENTS {
            black_box(reader.read_value(&mut black_box(&body[..])).unwrap());
        }
        let elapsed = started.elapsed();
        println!(
            "{:>20}: {EVENTS} bodies in {elapsed:.2?} ({:.0} ns/event, Value tree only)",
            "apache_avro generic",
            elapsed.as_nanos() as f64 / f64::from(EVENTS)
        );
    }
}
