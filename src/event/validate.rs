//! Business rules an [`AuthEvent`] must satisfy before it is stored.
//!
//! Decoders check the shape of a message (types, UUID and IP syntax); this
//! module checks the content: sizes that keep one event from bloating the
//! table, characters PostgreSQL cannot store, and plausible event times.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{AuthEvent, EpochMicros};

/// Limits applied to every event; part of the service configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationLimits {
    /// Largest accepted message, framing included.
    pub max_message_bytes: usize,
    /// Largest accepted `action` and optional text field, in UTF-8 bytes.
    pub max_text_bytes: usize,
    pub max_metadata_entries: usize,
    /// Largest sum of the lengths of all metadata keys and values.
    pub max_metadata_bytes: usize,
    /// Events older than this are rejected as implausible (RFC 3339).
    pub min_occurred_at: DateTime<Utc>,
    /// How far ahead of the consumer's clock an event may be, to allow for
    /// clock skew between producers and this service (e.g. `"5m"`).
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            max_message_bytes: 256 * 1024,
            max_text_bytes: 1024,
            max_metadata_entries: 64,
            max_metadata_bytes: 16 * 1024,
            min_occurred_at: Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap(),
            max_future: Duration::from_secs(5 * 60),
        }
    }
}

/// A rule an event broke. Carried inside [`super::DecodeError::Invalid`].
///
/// Offending text values are deliberately not echoed: the display text ends
/// up in dead-letter headers and logs, and the values are untrusted input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("required field `{0}` is missing or null")]
    MissingField(&'static str),
    #[error("event_id is not a valid UUID")]
    InvalidUuid,
    #[error("occurred_at is not an RFC 3339 timestamp")]
    InvalidTimestamp,
    #[error("occurred_at {} is before the earliest accepted time {}", rfc3339(*.occurred_at), rfc3339(*.min))]
    TimestampTooOld { occurred_at: EpochMicros, min: EpochMicros },
    #[error("occurred_at {} is after the latest accepted time {}", rfc3339(*.occurred_at), rfc3339(*.max))]
    TimestampInFuture { occurred_at: EpochMicros, max: EpochMicros },
    #[error("ip_address is not a valid IPv4 or IPv6 address")]
    InvalidIp,
    #[error("{field} is {len} bytes long, the limit is {limit}")]
    FieldTooLong { field: &'static str, len: usize, limit: usize },
    #[error("{0} contains a NUL character")]
    NulByte(&'static str),
    #[error("metadata has {count} entries, the limit is {limit}")]
    TooManyMetadataEntries { count: usize, limit: usize },
    #[error("metadata keys and values total {bytes} bytes, the limit is {limit}")]
    MetadataTooLarge { bytes: usize, limit: usize },
    #[error("action is empty")]
    EmptyAction,
    #[error("action may only contain ASCII letters, digits, '_', '.', '-' and ':'")]
    InvalidAction,
}

impl Violation {
    /// Stable reason code; see [`super::DecodeError::code`].
    pub fn code(&self) -> &'static str {
        match self {
            Violation::MissingField(_) => "missing_field",
            Violation::InvalidUuid => "invalid_uuid",
            Violation::InvalidTimestamp => "invalid_timestamp",
            Violation::TimestampTooOld { .. } => "timestamp_too_old",
            Violation::TimestampInFuture { .. } => "timestamp_in_future",
            Violation::InvalidIp => "invalid_ip",
            Violation::FieldTooLong { .. } => "field_too_long",
            Violation::NulByte(_) => "nul_byte",
            Violation::TooManyMetadataEntries { .. } => "too_many_metadata_entries",
            Violation::MetadataTooLarge { .. } => "metadata_too_large",
            Violation::EmptyAction => "empty_action",
            Violation::InvalidAction => "invalid_action",
        }
    }
}

fn rfc3339(micros: EpochMicros) -> String {
    match DateTime::from_timestamp_micros(micros) {
        Some(t) => t.to_rfc3339(),
        None => format!("{micros} µs after the epoch"),
    }
}

/// Checks `event` against `limits`; `now` is the consumer's clock.
pub fn validate(event: &AuthEvent, limits: &ValidationLimits, now: EpochMicros) -> Result<(), Violation> {
    check_action(&event.action, limits)?;

    let optional_text = [
        ("user_id", &event.user_id),
        ("username", &event.username),
        ("user_agent", &event.user_agent),
        ("session_id", &event.session_id),
        ("request_id", &event.request_id),
    ];
    for (field, value) in optional_text {
        if let Some(value) = value {
            check_text(field, value, limits.max_text_bytes)?;
        }
    }

    let min = limits.min_occurred_at.timestamp_micros();
    if event.occurred_at < min {
        return Err(Violation::TimestampTooOld { occurred_at: event.occurred_at, min });
    }
    let max_future = i64::try_from(limits.max_future.as_micros()).unwrap_or(i64::MAX);
    let max = now.saturating_add(max_future);
    if event.occurred_at > max {
        return Err(Violation::TimestampInFuture { occurred_at: event.occurred_at, max });
    }

    check_metadata(&event.metadata, limits)
}

fn check_action(action: &str, limits: &ValidationLimits) -> Result<(), Violation> {
    if action.is_empty() {
        return Err(Violation::EmptyAction);
    }
    if action.len() > limits.max_text_bytes {
        return Err(Violation::FieldTooLong { field: "action", len: action.len(), limit: limits.max_text_bytes });
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':');
    if !action.bytes().all(allowed) {
        return Err(Violation::InvalidAction);
    }
    Ok(())
}

fn check_text(field: &'static str, value: &str, limit: usize) -> Result<(), Violation> {
    if value.len() > limit {
        return Err(Violation::FieldTooLong { field, len: value.len(), limit });
    }
    check_no_nul(field, value)
}

/// PostgreSQL `text` and `jsonb` cannot hold U+0000; an insert would fail
/// for the whole batch, so such events are rejected here instead.
fn check_no_nul(field: &'static str, value: &str) -> Result<(), Violation> {
    if value.as_bytes().contains(&0) {
        return Err(Violation::NulByte(field));
    }
    Ok(())
}

fn check_metadata(metadata: &[(String, String)], limits: &ValidationLimits) -> Result<(), Violation> {
    if metadata.len() > limits.max_metadata_entries {
        return Err(Violation::TooManyMetadataEntries { count: metadata.len(), limit: limits.max_metadata_entries });
    }
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_metadata_bytes {
        return Err(Violation::MetadataTooLarge { bytes, limit: limits.max_metadata_bytes });
    }
    for (key, value) in metadata {
        check_no_nul("metadata", key)?;
        check_no_nul("metadata", value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const NOW: EpochMicros = 1_750_000_000_000_000;

    fn event() -> AuthEvent {
        AuthEvent {
            event_id: Uuid::from_u128(1),
            occurred_at: NOW - 1_000_000,
            action: "AUTH_LOGIN".to_owned(),
            user_id: Some("42".to_owned()),
            username: Some("alice".to_owned()),
            ip_address: None,
            user_agent: Some("curl/8".to_owned()),
            session_id: Some("s-1".to_owned()),
            request_id: Some("r-1".to_owned()),
            metadata: vec![("mfa".to_owned(), "totp".to_owned())],
        }
    }

    fn check(event: &AuthEvent) -> Result<(), Violation> {
        validate(event, &ValidationLimits::default(), NOW)
    }

    #[test]
    fn accepts_a_plausible_event() {
        assert_eq!(check(&event()), Ok(()));
    }

    #[test]
    fn action_rules() {
        let mut e = event();
        e.action = String::new();
        assert_eq!(check(&e), Err(Violation::EmptyAction));
        e.action = "ADMIN user.delete".to_owned();
        assert_eq!(check(&e), Err(Violation::InvalidAction));
        e.action = "LOGIN\0".to_owned();
        assert_eq!(check(&e), Err(Violation::InvalidAction));
        e.action = "SECURITY:mfa.reset-2".to_owned();
        assert_eq!(check(&e), Ok(()));
        e.action = "A".repeat(1025);
        assert_eq!(check(&e), Err(Violation::FieldTooLong { field: "action", len: 1025, limit: 1024 }));
    }

    #[test]
    fn text_fields_are_bounded_and_nul_free() {
        let mut e = event();
        e.user_agent = Some("x".repeat(1024));
        assert_eq!(check(&e), Ok(()));
        e.user_agent = Some("x".repeat(1025));
        let err = check(&e).unwrap_err();
        assert_eq!(err, Violation::FieldTooLong { field: "user_agent", len: 1025, limit: 1024 });
        assert_eq!(err.code(), "field_too_long");

        let mut e = event();
        e.username = Some("al\0ice".to_owned());
        let err = check(&e).unwrap_err();
        assert_eq!(err, Violation::NulByte("username"));
        assert_eq!(err.code(), "nul_byte");
    }

    #[test]
    fn metadata_rules() {
        let mut e = event();
        e.metadata = vec![("k".to_owned(), "v\0".to_owned())];
        assert_eq!(check(&e), Err(Violation::NulByte("metadata")));
        e.metadata = vec![("k\0".to_owned(), "v".to_owned())];
        assert_eq!(check(&e), Err(Violation::NulByte("metadata")));

        e.metadata = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        let err = check(&e).unwrap_err();
        assert_eq!(err, Violation::TooManyMetadataEntries { count: 65, limit: 64 });
        assert_eq!(err.code(), "too_many_metadata_entries");

        e.metadata = vec![("k".to_owned(), "v".repeat(16 * 1024))];
        let err = check(&e).unwrap_err();
        assert_eq!(err, Violation::MetadataTooLarge { bytes: 16 * 1024 + 1, limit: 16 * 1024 });
        assert_eq!(err.code(), "metadata_too_large");
    }

    #[test]
    fn timestamp_bounds() {
        let limits = ValidationLimits::default();
        let mut e = event();

        e.occurred_at = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap().timestamp_micros();
        let err = check(&e).unwrap_err();
        assert_eq!(err.code(), "timestamp_too_old");
        assert_eq!(
            err.to_string(),
            "occurred_at 1999-12-31T23:59:59+00:00 is before the earliest accepted time 2000-01-01T00:00:00+00:00"
        );
        e.occurred_at = limits.min_occurred_at.timestamp_micros();
        assert_eq!(check(&e), Ok(()));

        let five_minutes = 5 * 60 * 1_000_000;
        e.occurred_at = NOW + five_minutes;
        assert_eq!(check(&e), Ok(()));
        e.occurred_at = NOW + five_minutes + 1;
        assert_eq!(
            check(&e),
            Err(Violation::TimestampInFuture { occurred_at: NOW + five_minutes + 1, max: NOW + five_minutes })
        );
        e.occurred_at = i64::MAX;
        assert_eq!(check(&e).unwrap_err().code(), "timestamp_in_future");
    }

    #[test]
    fn limits_deserialize_with_defaults_and_reject_unknown_fields() {
        let limits: ValidationLimits = serde_json::from_str(
            r#"{"max_text_bytes": 10, "max_future": "90s", "min_occurred_at": "2020-01-01T00:00:00+02:00"}"#,
        )
        .unwrap();
        assert_eq!(limits.max_text_bytes, 10);
        assert_eq!(limits.max_future, Duration::from_secs(90));
        assert_eq!(limits.min_occurred_at, Utc.with_ymd_and_hms(2019, 12, 31, 22, 0, 0).unwrap());
        assert_eq!(limits.max_message_bytes, 262_144);

        let json = serde_json::to_value(ValidationLimits::default()).unwrap();
        assert_eq!(json["max_future"], "5m");
        assert_eq!(json["min_occurred_at"], "2000-01-01T00:00:00Z");

        let err = serde_json::from_str::<ValidationLimits>(r#"{"max_txt_bytes": 1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `max_txt_bytes`"), "{err}");
    }
}
