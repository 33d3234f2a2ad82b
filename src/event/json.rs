//! JSON encoding of an auth event:
//!
//! ```json
//! {"event_id": "…uuid…", "occurred_at": "2025-06-01T12:00:00.123456Z",
//!  "action": "AUTH_LOGIN", "user_id": 42, "username": "alice",
//!  "ip_address": "203.0.113.7", "user_agent": "…", "session_id": "…",
//!  "request_id": "…", "metadata": {"mfa": "totp"}}
//! ```
//!
//! Unknown fields are ignored so producers can add fields before this
//! service knows them. Strings without escapes are borrowed from the input
//! rather than copied into intermediate buffers.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use chrono::DateTime;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use uuid::Uuid;

use super::{AuthEvent, DecodeError, Violation};

/// The JSON form of the event contract (RFC 3339 times, absent fields null).
pub fn encode_json(event: &AuthEvent) -> Vec<u8> {
    let occurred_at = chrono::DateTime::from_timestamp_micros(event.occurred_at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default();
    let metadata: serde_json::Map<String, serde_json::Value> =
        event.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    let value = serde_json::json!({
        "event_id": event.event_id.to_string(),
        "occurred_at": occurred_at,
        "action": event.action,
        "user_id": event.user_id,
        "username": event.username,
        "ip_address": event.ip_address.map(|ip| ip.to_string()),
        "user_agent": event.user_agent,
        "session_id": event.session_id,
        "request_id": event.request_id,
        "metadata": metadata,
    });
    serde_json::to_vec(&value).expect("a JSON value always serialises")
}

/// Decodes one JSON auth event. Validation beyond the shape of the message
/// is left to [`super::validate::validate`].
pub fn decode_json(bytes: &[u8]) -> Result<AuthEvent, DecodeError> {
    let wire: WireEvent<'_> = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json reports bad UTF-8 like any syntax error; re-checking
        // costs nothing on the happy path and gives it its own reason code.
        if std::str::from_utf8(bytes).is_err() {
            DecodeError::InvalidUtf8("payload")
        } else {
            DecodeError::Json(e.to_string())
        }
    })?;

    let event_id = wire.event_id.ok_or(Violation::MissingField("event_id"))?;
    let event_id = Uuid::parse_str(&event_id.0).map_err(|_| Violation::InvalidUuid)?;
    let occurred_at = wire.occurred_at.ok_or(Violation::MissingField("occurred_at"))?;
    let occurred_at =
        DateTime::parse_from_rfc3339(&occurred_at.0).map_err(|_| Violation::InvalidTimestamp)?.timestamp_micros();
    let action = wire.action.ok_or(Violation::MissingField("action"))?;
    let ip_address = match non_empty(wire.ip_address) {
        Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| Violation::InvalidIp)?),
        None => None,
    };

    Ok(AuthEvent {
        event_id,
        occurred_at,
        action: action.0.into_owned(),
        user_id: non_empty(wire.user_id),
        username: non_empty(wire.username),
        ip_address,
        user_agent: non_empty(wire.user_agent),
        session_id: non_empty(wire.session_id),
        request_id: non_empty(wire.request_id),
        metadata: wire.metadata.map(|m| m.0).unwrap_or_default(),
    })
}

/// Optional text fields: an empty string means the same as absent.
fn non_empty(text: Option<Text<'_>>) -> Option<String> {
    text.filter(|t| !t.0.is_empty()).map(|t| t.0.into_owned())
}

#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow)]
    event_id: Option<Text<'a>>,
    #[serde(borrow)]
    occurred_at: Option<Text<'a>>,
    #[serde(borrow)]
    action: Option<Text<'a>>,
    #[serde(borrow, deserialize_with = "user_id")]
    #[serde(default)]
    user_id: Option<Text<'a>>,
    #[serde(borrow)]
    username: Option<Text<'a>>,
    #[serde(borrow)]
    ip_address: Option<Text<'a>>,
    #[serde(borrow)]
    user_agent: Option<Text<'a>>,
    #[serde(borrow)]
    session_id: Option<Text<'a>>,
    #[serde(borrow)]
    request_id: Option<Text<'a>>,
    metadata: Option<Metadata>,
}

/// A JSON string, borrowed when it contains no escapes.
///
/// serde's own `Cow<str>` only borrows when it is the field's whole type,
/// not inside an `Option`, hence this wrapper.
struct Text<'a>(Cow<'a, str>);

struct TextVisitor {
    accept_integers: bool,
}

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.accept_integers { f.write_str("a string or an integer") } else { f.write_str("a string") }
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(v)))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        if self.accept_integers {
            Ok(Text(Cow::Owned(v.to_string())))
        } else {
            Err(E::invalid_type(serde::de::Unexpected::Unsigned(v), &self))
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        if self.accept_integers {
            Ok(Text(Cow::Owned(v.to_string())))
        } else {
            Err(E::invalid_type(serde::de::Unexpected::Signed(v), &self))
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextVisitor { accept_integers: false })
    }
}

/// `user_id` may be a JSON integer (numeric ids in some producers); it is
/// kept as its decimal text.
fn user_id<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Text<'a>>, D::Error> {
    struct UserId<'a>(Text<'a>);
    impl<'de: 'a, 'a> Deserialize<'de> for UserId<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(TextVisitor { accept_integers: true }).map(UserId)
        }
    }
    Ok(Option::<UserId<'a>>::deserialize(d)?.map(|u| u.0))
}

/// String-to-string object, kept in document order.
struct Metadata(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MetadataVisitor;
        impl<'de> Visitor<'de> for MetadataVisitor {
            type Value = Metadata;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object with string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some((key, value)) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    entries.push((key.0.into_owned(), value.0.into_owned()));
                }
                Ok(Metadata(entries))
            }
        }
        d.deserialize_map(MetadataVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
        "event_id": "6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10",
        "occurred_at": "2025-06-01T14:00:00.123456+02:00",
        "action": "AUTH_LOGIN",
        "user_id": "u-42",
        "username": "al\"ice",
        "ip_address": "203.0.113.7",
        "user_agent": "Mozilla/5.0",
        "session_id": "s-1",
        "request_id": "r-1",
        "metadata": {"mfa": "totp", "country": "DE"},
        "schema_version": 3,
        "extra": {"nested": [1, 2, {"x": null}]}
    }"#;

    #[test]
    fn decodes_every_field() {
        let e = decode_json(FULL.as_bytes()).unwrap();
        assert_eq!(e.event_id, Uuid::parse_str("6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10").unwrap());
        // 2025-06-01T12:00:00.123456Z
        assert_eq!(e.occurred_at, 1_748_779_200_123_456);
        assert_eq!(e.action, "AUTH_LOGIN");
        assert_eq!(e.user_id.as_deref(), Some("u-42"));
        assert_eq!(e.username.as_deref(), Some("al\"ice"));
        assert_eq!(e.ip_address, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(e.user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(e.session_id.as_deref(), Some("s-1"));
        assert_eq!(e.request_id.as_deref(), Some("r-1"));
        assert_eq!(e.metadata, vec![("mfa".to_owned(), "totp".to_owned()), ("country".to_owned(), "DE".to_owned())]);
    }

    #[test]
    fn minimal_event_has_empty_optionals() {
        let e = decode_json(
            br#"{"event_id":"6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10","occurred_at":"2025-06-01T12:00:00Z","action":"X","user_id":null,"username":"","ip_address":"","metadata":null}"#,
        )
        .unwrap();
        assert_eq!(e.occurred_at, 1_748_779_200_000_000);
        assert_eq!(e.user_id, None);
        assert_eq!(e.username, None);
        assert_eq!(e.ip_address, None);
        assert_eq!(e.user_agent, None);
        assert!(e.metadata.is_empty());
    }

    fn with(field: &str, value: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(FULL).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        serde_json::to_vec(&v).unwrap()
    }

    fn without(field: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(FULL).unwrap();
        v.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn numeric_user_id_is_kept_as_text() {
        assert_eq!(decode_json(&with("user_id", "42")).unwrap().user_id.as_deref(), Some("42"));
        assert_eq!(decode_json(&with("user_id", "-7")).unwrap().user_id.as_deref(), Some("-7"));
        let err = decode_json(&with("user_id", "4.5")).unwrap_err();
        assert_eq!(err.code(), "malformed_json");
        assert!(err.to_string().contains("expected a string or an integer"), "{err}");
        // Other text fields do not take numbers.
        assert_eq!(decode_json(&with("username", "42")).unwrap_err().code(), "malformed_json");
    }

    #[test]
    fn ip_addresses() {
        let ip = |s: &str| decode_json(&with("ip_address", &format!("\"{s}\"")));
        assert_eq!(ip("192.0.2.1").unwrap().ip_address, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(ip("2001:db8::1").unwrap().ip_address, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(ip("::ffff:192.0.2.1").unwrap().ip_address, Some("::ffff:192.0.2.1".parse().unwrap()));
        for bad in ["256.0.0.1", "192.0.2", "2001:db8::g", "2001:db8:::1", "localhost"] {
            assert_eq!(ip(bad), Err(DecodeError::Invalid(Violation::InvalidIp)), "{bad}");
        }
    }

    #[test]
    fn missing_required_fields() {
        for field in ["event_id", "occurred_at", "action"] {
            assert_eq!(decode_json(&without(field)), Err(DecodeError::Invalid(Violation::MissingField(field))));
            assert_eq!(decode_json(&with(field, "null")), Err(DecodeError::Invalid(Violation::MissingField(field))));
        }
    }

    #[test]
    fn malformed_values() {
        assert_eq!(decode_json(&with("event_id", "\"not-a-uuid\"")), Err(DecodeError::Invalid(Violation::InvalidUuid)));
        assert_eq!(
            decode_json(&with("occurred_at", "\"2025-06-01 12:00\"")),
            Err(DecodeError::Invalid(Violation::InvalidTimestamp))
        );
        // Epoch numbers are not accepted: the unit would be a guess.
        assert_eq!(decode_json(&with("occurred_at", "1748779200000")).unwrap_err().code(), "malformed_json");
        let err = decode_json(&with("metadata", r#"{"attempts": 3}"#)).unwrap_err();
        assert_eq!(err.code(), "malformed_json");
        assert!(err.to_string().contains("expected a string"), "{err}");
        assert_eq!(decode_json(&with("metadata", "[]")).unwrap_err().code(), "malformed_json");
    }

    #[test]
    fn malformed_json() {
        for bad in [&br#"{"event_id": "#[..], b"{", b"{} x", b"[]", br#"{"action": "A", "action": "B"}"#] {
            let err = decode_json(bad).unwrap_err();
            assert!(matches!(err, DecodeError::Json(_)), "{err:?}");
            assert_eq!(err.code(), "malformed_json");
        }
    }

    #[test]
    fn year_9999_decodes_without_overflow() {
        let e = decode_json(&with("occurred_at", "\"9999-12-31T23:59:59Z\"")).unwrap();
        assert_eq!(e.occurred_at, 253_402_300_799_000_000);
    }

    #[test]
    fn invalid_utf8_is_reported_as_such() {
        let mut bytes = FULL.as_bytes().to_vec();
        let at = FULL.find("Mozilla").unwrap();
        bytes[at] = 0xff;
        assert_eq!(decode_json(&bytes), Err(DecodeError::InvalidUtf8("payload")));
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let e = decode_json(&with("user_agent", r#""tab\there \u00e9 \ud83d\ude00""#)).unwrap();
        assert_eq!(e.user_agent.as_deref(), Some("tab\there é 😀"));
        let e = decode_json(&with("metadata", r#"{"k\n": "v\u0000"}"#)).unwrap();
        assert_eq!(e.metadata, vec![("k\n".to_owned(), "v\0".to_owned())]);
    }
}
