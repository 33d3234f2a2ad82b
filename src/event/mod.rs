//! The auth event: the one record type audit-service ingests, its decoders
//! (JSON, Avro with Confluent framing, Avro single-object encoding) and its
//! validation rules.
//!
//! Everything that turns the bytes of a Kafka message into an [`AuthEvent`]
//! lives below this module; nothing here touches Kafka or PostgreSQL.

pub mod avro;
pub mod decode;
pub mod json;
pub mod registry;
pub mod routed;
pub mod validate;

use std::net::IpAddr;

use uuid::Uuid;

pub use decode::{Decoder, Encoding};
pub use validate::{ValidationLimits, Violation};

/// Microseconds since the Unix epoch (UTC). Event times are kept in this
/// form end to end: it is what Avro `timestamp-micros` carries and what
/// PostgreSQL's binary `timestamptz` needs after a constant shift.
pub type EpochMicros = i64;

/// One authentication event, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthEvent {
    /// Idempotency key chosen by the producer.
    pub event_id: Uuid,
    /// Event time, stored as `audit_logs.created_at`.
    pub occurred_at: EpochMicros,
    /// `AUTH_LOGIN`, `FAILED_AUTH_LOGIN`, `ADMIN_*`, `SECURITY_*`, ...
    pub action: String,
    /// Unknown user when `None`. JSON numbers are accepted and kept as text.
    pub user_id: Option<String>,
    pub username: Option<String>,
    pub ip_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub session_id: Option<String>,
    pub request_id: Option<String>,
    /// Free-form string map; kept in arrival order.
    pub metadata: Vec<(String, String)>,
}

/// Why a message could not become an [`AuthEvent`]. The `code` is a short,
/// stable, metric-friendly identifier; the display text is for humans and
/// is written to the dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("unrecognised encoding (first byte 0x{first_byte:02x})")]
    UnknownEncoding { first_byte: u8 },
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("malformed Avro: {0}")]
    Avro(String),
    #[error("unknown Avro schema id {0}")]
    UnknownSchemaId(u32),
    #[error("unknown Avro schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("Avro schema {0} cannot be read as an auth event: {1}")]
    IncompatibleSchema(String, String),
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("validation failed: {0}")]
    Invalid(#[from] Violation),
}

impl DecodeError {
    /// Stable reason code, used as the `reason` label of
    /// `audit_events_dead_lettered_total` and the `dlq.reason.code` header.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnknownEncoding { .. } => "unknown_encoding",
            DecodeError::Json(_) => "malformed_json",
            DecodeError::Avro(_) => "malformed_avro",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::UnknownFingerprint(_) => "unknown_schema_fingerprint",
            DecodeError::IncompatibleSchema(..) => "incompatible_schema",
            DecodeError::InvalidUtf8(_) => "invalid_utf8",
            DecodeError::RegistryUnavailable(_) => "registry_unavailable",
            DecodeError::Invalid(v) => v.code(),
        }
    }

    /// A transient error says nothing about the message: the caller must
    /// retry it later instead of dead-lettering it.
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable(_))
    }
}
