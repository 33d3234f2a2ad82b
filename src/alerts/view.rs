//! Alerts as an operator reads them: decoded from the alerts topic (JSON or
//! Avro single-object, `schemas/alert.avsc`) or taken from a detector
//! transition, and printed one line each. The demo and `audit-service
//! replay` print the same lines.

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use serde::Deserialize;

use super::{ALERT_SCHEMA, AlertMessage};
use crate::event::{EpochMicros, avro};

#[derive(Debug, thiserror::Error)]
pub enum AlertDecodeError {
    #[error("alert JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("alert Avro: {0}")]
    Avro(String),
}

/// One alert message, owned and decoded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AlertView {
    pub alert_id: String,
    pub rule: String,
    pub severity: String,
    pub state: String,
    pub subject: String,
    pub count: u64,
    pub threshold: u64,
    pub window_seconds: u64,
    #[serde(with = "rfc3339_micros")]
    pub episode_start: EpochMicros,
    #[serde(default, with = "rfc3339_micros_opt")]
    pub first_event_at: Option<EpochMicros>,
    #[serde(default, with = "rfc3339_micros_opt")]
    pub last_event_at: Option<EpochMicros>,
    #[serde(default)]
    pub sample_event_ids: Vec<String>,
    #[serde(with = "rfc3339_micros")]
    pub detected_at: EpochMicros,
    pub recommended_action: String,
    /// Set on the storm limiter's aggregate alerts.
    #[serde(default)]
    pub withheld: Option<WithheldView>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WithheldView {
    pub count: u64,
    pub subjects: Vec<String>,
    /// Every transition the summary carries (empty from versions before it
    /// carried them).
    #[serde(default)]
    pub alerts: Vec<HeldAlertView>,
}

/// A transition carried by a storm summary.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HeldAlertView {
    pub alert_id: String,
    pub subject: String,
    pub state: String,
    pub severity: String,
    pub recommended_action: String,
}

impl AlertView {
    /// Decodes a message of the alerts topic in either format the service
    /// writes (`detect.alert_format`).
    pub fn decode(payload: &[u8]) -> Result<AlertView, AlertDecodeError> {
        if payload.starts_with(&avro::SINGLE_OBJECT_MAGIC) {
            Self::from_avro(payload)
        } else {
            Ok(serde_json::from_slice(payload)?)
        }
    }

    fn from_avro(payload: &[u8]) -> Result<AlertView, AlertDecodeError> {
        let err = |e: &dyn std::fmt::Display| AlertDecodeError::Avro(e.to_string());
        let (_, body) = avro::split_single_object(payload).map_err(|e| err(&e))?;
        let schema = Schema::parse_str(ALERT_SCHEMA).expect("schemas/alert.avsc is valid");
        let reader = GenericDatumReader::builder(&schema).build().map_err(|e| err(&e))?;
        let Value::Record(fields) = reader.read_value(&mut &body[..]).map_err(|e| err(&e))? else {
            return Err(AlertDecodeError::Avro("not a record".into()));
        };
        let get = |name: &str| field(&fields, name);
        let text = |name: &str| text_of(get(name));
        let long = |name: &str| match get(name) {
            Some(Value::Long(n) | Value::TimestampMicros(n)) => Some(*n),
            _ => None,
        };
        let strings = |v: Option<&Value>| match v {
            Some(Value::Array(items)) => {
                items.iter().filter_map(|i| if let Value::String(s) = i { Some(s.clone()) } else { None }).collect()
            }
            _ => Vec::new(),
        };
        let withheld = match get("withheld") {
            Some(Value::Record(w)) => {
                let count = w.iter().find(|(k, _)| k == "count").and_then(|(_, v)| match v {
                    Value::Long(n) => Some(*n as u64),
                    _ => None,
                });
                let subjects = strings(w.iter().find(|(k, _)| k == "subjects").map(|(_, v)| v));
                let alerts = match field(w, "alerts") {
                    Some(Value::Array(items)) => items
                        .iter()
                        .filter_map(|item| match item {
                            Value::Record(a) => Some(HeldAlertView {
                                alert_id: text_of(field(a, "alert_id")),
                                subject: text_of(field(a, "subject")),
                                state: text_of(field(a, "state")),
                                severity: text_of(field(a, "severity")),
                                recommended_action: text_of(field(a, "recommended_action")),
                            }),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Some(WithheldView { count: count.unwrap_or(0), subjects, alerts })
            }
            _ => None,
        };
        Ok(AlertView {
            alert_id: text("alert_id"),
            rule: text("rule"),
            severity: text("severity"),
            state: text("state"),
            subject: text("subject"),
            count: long("count").unwrap_or(0) as u64,
            threshold: long("threshold").unwrap_or(0) as u64,
            window_seconds: long("window_seconds").unwrap_or(0) as u64,
            episode_start: long("episode_start").unwrap_or(0),
            first_event_at: long("first_event_at"),
            last_event_at: long("last_event_at"),
            sample_event_ids: strings(get("sample_event_ids")),
            detected_at: long("detected_at").unwrap_or(0),
            recommended_action: text("recommended_action"),
            withheld,
        })
    }

    /// The storm limiter's summary of alerts it held back.
    pub fn is_aggregate(&self) -> bool {
        self.withheld.is_some()
    }

    /// When the transition happened: a resolution when it was detected,
    /// otherwise the event that crossed the threshold.
    pub fn event_time(&self) -> EpochMicros {
        if self.state == "resolved" { self.detected_at } else { self.last_event_at.unwrap_or(self.detected_at) }
    }

    /// One readable line, e.g.
    /// `ALERT 14:03:07 FIRING    warning  user_failed_logins    user:1002417   6 in 1m (threshold 5) -> lock_account`.
    /// `with_date` puts the UTC date before the time (replays span days).
    pub fn line(&self, with_date: bool) -> String {
        let format = if with_date { "%Y-%m-%d %H:%M:%SZ" } else { "%H:%M:%S" };
        let time = chrono::DateTime::from_timestamp_micros(self.event_time())
            .map(|t| t.format(format).to_string())
            .unwrap_or_default();
        if let Some(w) = &self.withheld {
            return format!(
                "ALERT {time} WITHHELD  {:<8} {:<22} {} alert(s) held back by the storm limiter, carried here (subjects: {})",
                self.severity,
                self.rule,
                w.count,
                w.subjects.join(", ")
            );
        }
        let short_id = self.alert_id.get(..8).unwrap_or(&self.alert_id);
        format!(
            "ALERT {time} {:<9} {:<8} {:<22} {:<26} {} in {} (threshold {}) -> {}  [{short_id}]",
            self.state.to_uppercase(),
            self.severity,
            self.rule,
            self.subject,
            self.count,
            window_text(self.window_seconds),
            self.threshold,
            self.recommended_action,
        )
    }
}

impl From<&AlertMessage> for AlertView {
    fn from(m: &AlertMessage) -> AlertView {
        AlertView {
            alert_id: m.alert_id.clone(),
            rule: m.rule.clone(),
            severity: m.severity.to_owned(),
            state: m.state.to_owned(),
            subject: m.subject.clone(),
            count: m.count,
            threshold: m.threshold,
            window_seconds: m.window_seconds,
            episode_start: m.episode_start,
            first_event_at: m.first_event_at,
            last_event_at: m.last_event_at,
            sample_event_ids: m.sample_event_ids.clone(),
            detected_at: m.detected_at,
            recommended_action: m.recommended_action.to_owned(),
            withheld: m.withheld.as_ref().map(|w| WithheldView {
                count: w.count,
                subjects: w.subjects.clone(),
                alerts: w
                    .alerts
                    .iter()
                    .map(|a| HeldAlertView {
                        alert_id: a.alert_id.clone(),
                        subject: a.subject.clone(),
                        state: a.state.to_owned(),
                        severity: a.severity.to_owned(),
                        recommended_action: a.recommended_action.to_owned(),
                    })
                    .collect(),
            }),
        }
    }
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| unwrap_union(v))
}

fn text_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s) | Value::Enum(_, s)) => s.clone(),
        Some(Value::Uuid(u)) => u.to_string(),
        _ => String::new(),
    }
}

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

/// `60` → `1m`, `600` → `10m`, `3600` → `1h`, `90` → `90s`.
pub fn window_text(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

mod rfc3339_micros {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let text = String::deserialize(d)?;
        chrono::DateTime::parse_from_rfc3339(&text).map(|t| t.timestamp_micros()).map_err(serde::de::Error::custom)
    }
}

mod rfc3339_micros_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => chrono::DateTime::parse_from_rfc3339(&text)
                .map(|t| Some(t.timestamp_micros()))
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{AlertEncoder, Withheld};
    use crate::detect::AlertFormat;
    use uuid::Uuid;

    fn message() -> AlertMessage {
        let mut t = crate::alerts::sample_transition();
        t.alert_id = Uuid::from_u128(0xabcdef12_0000_0000_0000_000000000001);
        t.sample_event_ids.truncate(1);
        AlertMessage::from_transition(&t)
    }

    #[test]
    fn both_formats_decode_to_the_same_view() {
        let mut msg = message();
        let expected = AlertView::from(&msg);
        for format in [AlertFormat::Json, AlertFormat::Avro] {
            assert_eq!(AlertView::decode(&AlertEncoder::new(format).encode(&msg)).unwrap(), expected, "{format:?}");
        }
        let mut held = crate::alerts::HeldAlert::from_transition(&crate::alerts::sample_transition());
        held.state = "resolved";
        msg.withheld = Some(Withheld { count: 1, subjects: vec![held.subject.clone()], alerts: vec![held] });
        let expected = AlertView::from(&msg);
        assert_eq!(expected.withheld.as_ref().unwrap().alerts[0].state, "resolved");
        for format in [AlertFormat::Json, AlertFormat::Avro] {
            let view = AlertView::decode(&AlertEncoder::new(format).encode(&msg)).unwrap();
            assert_eq!(view, expected, "{format:?}");
            assert!(view.is_aggregate());
        }
    }

    #[test]
    fn one_readable_line() {
        let line = AlertView::from(&message()).line(false);
        assert_eq!(
            line,
            "ALERT 08:00:10 ESCALATED critical user_failed_logins     user:42                    11 in 1m (threshold 10) -> lock_account  [abcdef12]"
        );
        assert!(AlertView::from(&message()).line(true).starts_with("ALERT 2027-01-15 08:00:10Z ESCALATED"));
        assert_eq!(window_text(600), "10m");
        assert_eq!(window_text(3600), "1h");
        assert_eq!(window_text(90), "90s");
    }
}
