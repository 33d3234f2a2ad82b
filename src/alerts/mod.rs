//! Alert messages: their JSON and Avro forms (`schemas/alert.avsc`), and the
//! publisher that sends them to the alerts topic through an idempotent
//! producer, behind a per-rule storm limiter.

pub mod publisher;
pub mod view;

use apache_avro::Schema;
use apache_avro::types::Value;
use serde::Serialize;

use crate::detect::{AlertFormat, Transition};
use crate::event::{EpochMicros, avro};

pub const ALERT_SCHEMA: &str = include_str!("../../schemas/alert.avsc");

/// The storm summary part of an aggregate alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Withheld {
    /// How many transitions this summary carries.
    pub count: u64,
    /// Up to 10 of their subjects.
    pub subjects: Vec<String>,
    /// Every transition it carries.
    pub alerts: Vec<HeldAlert>,
}

/// A transition carried by a storm summary instead of a message of its own:
/// what a consumer needs to act on it (an account to lock, an address to
/// block) and to de-duplicate it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldAlert {
    pub alert_id: String,
    pub subject: String,
    pub state: &'static str,
    pub severity: &'static str,
    pub recommended_action: &'static str,
}

impl HeldAlert {
    pub fn from_transition(t: &Transition) -> HeldAlert {
        HeldAlert {
            alert_id: t.alert_id.to_string(),
            subject: t.subject.clone(),
            state: t.state.as_str(),
            severity: t.severity.as_str(),
            recommended_action: t.recommended_action.as_str(),
        }
    }
}

/// The message on the alerts topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertMessage {
    pub alert_id: String,
    pub rule: String,
    pub severity: &'static str,
    pub state: &'static str,
    pub subject: String,
    pub count: u64,
    pub threshold: u64,
    pub window_seconds: u64,
    #[serde(serialize_with = "rfc3339")]
    pub episode_start: EpochMicros,
    #[serde(serialize_with = "rfc3339_opt")]
    pub first_event_at: Option<EpochMicros>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_event_at: Option<EpochMicros>,
    pub sample_event_ids: Vec<String>,
    #[serde(serialize_with = "rfc3339")]
    pub detected_at: EpochMicros,
    pub recommended_action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withheld: Option<Withheld>,
}

fn to_rfc3339(micros: EpochMicros) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

fn rfc3339<S: serde::Serializer>(v: &EpochMicros, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_rfc3339(*v))
}

fn rfc3339_opt<S: serde::Serializer>(v: &Option<EpochMicros>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => s.serialize_str(&to_rfc3339(*t)),
        None => s.serialize_none(),
    }
}

impl AlertMessage {
    pub fn from_transition(t: &Transition) -> AlertMessage {
        AlertMessage {
            alert_id: t.alert_id.to_string(),
            rule: t.rule.clone(),
            severity: t.severity.as_str(),
            state: t.state.as_str(),
            subject: t.subject.clone(),
            count: u64::from(t.count),
            threshold: u64::from(t.threshold),
            window_seconds: t.window_seconds,
            episode_start: t.episode_start,
            first_event_at: t.first_event_at,
            last_event_at: t.last_event_at,
            sample_event_ids: t.sample_event_ids.iter().map(ToString::to_string).collect(),
            detected_at: t.detected_at,
            recommended_action: t.recommended_action.as_str(),
            withheld: None,
        }
    }

    /// The Kafka key: alerts of one subject stay in order.
    pub fn key(&self) -> &str {
        &self.subject
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an alert always serialises")
    }

    fn to_avro_value(&self) -> Value {
        let enum_value = |symbols: &[&str], s: &str| {
            Value::Enum(symbols.iter().position(|x| *x == s).unwrap_or(0) as u32, s.to_owned())
        };
        let severity = |s: &str| enum_value(&["warning", "critical"], s);
        let state = |s: &str| enum_value(&["firing", "escalated", "resolved"], s);
        let action = |s: &str| enum_value(&["lock_account", "block_ip", "investigate"], s);
        let ts_opt = |v: Option<EpochMicros>| match v {
            Some(t) => Value::Union(1, Box::new(Value::TimestampMicros(t))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let withheld = match &self.withheld {
            Some(w) => Value::Union(
                1,
                Box::new(Value::Record(vec![
                    ("count".into(), Value::Long(w.count as i64)),
                    ("subjects".into(), strings(&w.subjects)),
                    (
                        "alerts".into(),
                        Value::Array(
                            w.alerts
                                .iter()
                                .map(|a| {
                                    Value::Record(vec![
                                        ("alert_id".into(), Value::String(a.alert_id.clone())),
                                        ("subject".into(), Value::String(a.subject.clone())),
                                        ("state".into(), state(a.state)),
                                        ("severity".into(), severity(a.severity)),
                                        ("recommended_action".into(), action(a.recommended_action)),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                ])),
            ),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        Value::Record(vec![
            ("alert_id".into(), Value::String(self.alert_id.clone())),
            ("rule".into(), Value::String(self.rule.clone())),
            ("severity".into(), severity(self.severity)),
            ("state".into(), state(self.state)),
            ("subject".into(), Value::String(self.subject.clone())),
            ("count".into(), Value::Long(self.count as i64)),
            ("threshold".into(), Value::Long(self.threshold as i64)),
            ("window_seconds".into(), Value::Long(self.window_seconds as i64)),
            ("episode_start".into(), Value::TimestampMicros(self.episode_start)),
            ("first_event_at".into(), ts_opt(self.first_event_at)),
            ("last_event_at".into(), ts_opt(self.last_event_at)),
            ("sample_event_ids".into(), strings(&self.sample_event_ids)),
            ("detected_at".into(), Value::TimestampMicros(self.detected_at)),
            ("recommended_action".into(), action(self.recommended_action)),
            ("withheld".into(), withheld),
        ])
    }
}

/// Encodes alerts in the configured format.
pub struct AlertEncoder {
    format: AlertFormat,
    schema: Schema,
    fingerprint: u64,
}

impl AlertEncoder {
    pub fn new(format: AlertFormat) -> AlertEncoder {
        let schema = Schema::parse_str(ALERT_SCHEMA).expect("schemas/alert.avsc is valid");
        let fingerprint = avro::schema_fingerprint(&schema);
        AlertEncoder { format, schema, fingerprint }
    }

    /// The CRC-64-AVRO fingerprint that frames Avro alerts.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn encode(&self, alert: &AlertMessage) -> Vec<u8> {
        match self.format {
            AlertFormat::Json => alert.to_json(),
            AlertFormat::Avro => {
                let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
                    .build()
                    .expect("a writer for a parsed schema");
                let body = writer.write_value_to_vec(alert.to_avro_value()).expect("an alert matches its schema");
                avro::single_object_frame(self.fingerprint, &body)
            }
        }
    }
}

/// An escalated alert, for the tests of this module and its submodules.
#[cfg(test)]
pub(crate) fn sample_transition() -> Transition {
    use crate::detect::{AlertState, RecommendedAction, Severity};
    use uuid::Uuid;
    Transition {
        alert_id: Uuid::from_u128(7),
        rule: "user_failed_logins".into(),
        key_spec: "user".into(),
        key_hash: 1,
        subject: "user:42".into(),
        state: AlertState::Escalated,
        severity: Severity::Critical,
        count: 11,
        threshold: 10,
        window_seconds: 60,
        episode_start: 1_800_000_000_000_000,
        first_event_at: Some(1_800_000_000_000_000),
        last_event_at: Some(1_800_000_010_000_000),
        sample_event_ids: vec![uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2)],
        recommended_action: RecommendedAction::LockAccount,
        detected_at: 1_800_000_010_100_000,
        partition: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn json_has_the_contract_fields() {
        let v: serde_json::Value =
            serde_json::from_slice(&AlertMessage::from_transition(&sample_transition()).to_json()).unwrap();
        assert_eq!(v["alert_id"], "00000000-0000-0000-0000-000000000007");
        assert_eq!(v["state"], "escalated");
        assert_eq!(v["severity"], "critical");
        assert_eq!(v["count"], 11);
        assert_eq!(v["threshold"], 10);
        assert_eq!(v["window_seconds"], 60);
        assert_eq!(v["first_event_at"], "2027-01-15T08:00:00.000000Z");
        assert_eq!(v["recommended_action"], "lock_account");
        assert_eq!(v["sample_event_ids"].as_array().unwrap().len(), 2);
        assert!(v.get("withheld").is_none());
    }

    #[test]
    fn avro_decodes_with_the_published_schema() {
        let enc = AlertEncoder::new(AlertFormat::Avro);
        let mut msg = AlertMessage::from_transition(&sample_transition());
        let held = HeldAlert::from_transition(&sample_transition());
        msg.withheld = Some(Withheld { count: 1, subjects: vec!["user:42".into()], alerts: vec![held] });
        let bytes = enc.encode(&msg);
        let (fp, body) = avro::split_single_object(&bytes).unwrap();
        assert_eq!(fp, enc.fingerprint());
        // An independent reader: apache-avro with the .avsc file.
        let schema = Schema::parse_str(ALERT_SCHEMA).unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &body[..])
            .unwrap();
        let Value::Record(fields) = value else { panic!("not a record") };
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("subject"), Value::String("user:42".into()));
        assert_eq!(get("state"), Value::Enum(1, "escalated".into()));
        assert_eq!(get("count"), Value::Long(11));
        let Value::Union(1, withheld) = get("withheld") else { panic!("no withheld part") };
        let Value::Record(withheld) = *withheld else { panic!("not a record") };
        let (_, Value::Array(alerts)) = &withheld[2] else { panic!("no alerts array") };
        let Value::Record(held) = &alerts[0] else { panic!("not a record") };
        assert_eq!(held[0].1, Value::Uuid(Uuid::from_u128(7)));
        assert_eq!(held[2].1, Value::Enum(1, "escalated".into()));
        assert_eq!(held[4].1, Value::Enum(0, "lock_account".into()));
    }
}
