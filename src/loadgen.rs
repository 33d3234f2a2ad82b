//! Synthetic auth traffic: a deterministic generator of realistic events and
//! the encoders for every wire format the service accepts. Used by the load
//! generator command, the demo, the benchmarks and the tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use uuid::Uuid;

use crate::event::{AuthEvent, EpochMicros, avro};

/// How an event is put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Json,
    /// Confluent framing with this schema id.
    AvroConfluent(u32),
    AvroSingleObject,
}

/// Encodes an event in the given format.
pub fn encode(event: &AuthEvent, format: WireFormat) -> Vec<u8> {
    match format {
        WireFormat::Json => encode_json(event),
        WireFormat::AvroConfluent(id) => avro::confluent_frame(id, &avro::encode_body(event)),
        WireFormat::AvroSingleObject => avro::single_object_frame(avro::auth_event_fingerprint(), &avro::encode_body(event)),
    }
}

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

/// Produces `(key, payload)` messages as fast as the producer's queue
/// allows, then waits until every one is acknowledged.
pub fn produce_all<'a>(
    producer: &BaseProducer,
    topic: &str,
    messages: impl IntoIterator<Item = (Option<&'a [u8]>, &'a [u8])>,
    flush_timeout: Duration,
) -> Result<(), KafkaError> {
    for (key, payload) in messages {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(flush_timeout)
}

/// splitmix64: small, fast, and the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn uuid(&mut self) -> Uuid {
        let hi = u128::from(self.next_u64()) << 64;
        uuid::Builder::from_random_bytes((hi | u128::from(self.next_u64())).to_be_bytes()).into_uuid()
    }
}

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "okhttp/4.12.0",
    "python-requests/2.32.3",
];

/// Ordinary traffic: mostly logins, some failures, logouts, token and admin
/// actions, a few security events.
const ACTION_MIX: &[(&str, u64)] = &[
    ("AUTH_LOGIN", 40),
    ("FAILED_AUTH_LOGIN", 12),
    ("AUTH_LOGOUT", 20),
    ("TOKEN_ISSUED", 15),
    ("TOKEN_REVOKED", 5),
    ("ADMIN_USER_UPDATE", 3),
    ("ADMIN_ROLE_GRANT", 1),
    ("SECURITY_PASSWORD_CHANGE", 3),
    ("SECURITY_MFA_ENABLED", 1),
];

/// A deterministic stream of ordinary auth events.
pub struct EventGenerator {
    rng: Rng,
    users: u64,
    total_weight: u64,
}

impl EventGenerator {
    pub fn new(seed: u64, users: u64) -> Self {
        EventGenerator { rng: Rng::new(seed), users: users.max(1), total_weight: ACTION_MIX.iter().map(|(_, w)| w).sum() }
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn pick_action(&mut self) -> &'static str {
        let mut roll = self.rng.below(self.total_weight);
        for (action, weight) in ACTION_MIX {
            if roll < *weight {
                return action;
            }
            roll -= weight;
        }
        ACTION_MIX[0].0
    }

    /// One ordinary event at `occurred_at`.
    pub fn next_event(&mut self, occurred_at: EpochMicros) -> AuthEvent {
        let user = self.rng.below(self.users);
        let action = self.pick_action();
        let ip = self.user_ip(user);
        let session = self.rng.below(4);
        let mut metadata = Vec::new();
        if action.starts_with("ADMIN_") {
            metadata.push(("target_user".to_owned(), format!("{}", self.rng.below(self.users))));
        }
        if action == "FAILED_AUTH_LOGIN" {
            metadata.push(("reason".to_owned(), "invalid_password".to_owned()));
        }
        AuthEvent {
            event_id: self.rng.uuid(),
            occurred_at,
            action: action.to_owned(),
            user_id: Some(user.to_string()),
            username: Some(format!("user{user}@example.com")),
            ip_address: Some(ip),
            user_agent: Some(USER_AGENTS[(user % USER_AGENTS.len() as u64) as usize].to_owned()),
            session_id: Some(format!("s-{user}-{session}")),
            request_id: Some(format!("r-{:016x}", self.rng.next_u64())),
            metadata,
        }
    }

    /// Users keep to a home address; one in ten is on IPv6.
    fn user_ip(&mut self, user: u64) -> IpAddr {
        if user % 10 == 9 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (user >> 16) as u16, user as u16))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, (user >> 16) as u8, (user >> 8) as u8, user as u8))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::json::decode_json;

    #[test]
    fn generator_is_deterministic_and_json_round_trips() {
        let mut a = EventGenerator::new(7, 1000);
        let mut b = EventGenerator::new(7, 1000);
        for i in 0..1000 {
            let e = a.next_event(1_700_000_000_000_000 + i);
            assert_eq!(e, b.next_event(1_700_000_000_000_000 + i));
            assert_eq!(decode_json(&encode_json(&e)).unwrap(), e);
        }
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}
