//! What a rule groups by: event fields, pairs of fields, or the whole
//! system; how a key is hashed (stably, so that a restarted detector finds
//! the open episode of a key again) and how it is named in an alert subject
//! (`user:<id>`, `ip:<addr>`, `system`, `user:<id>|ip:<addr>`).

use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use crate::event::AuthEvent;

/// An event field a rule can group by or count distinct values of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The user id, or the username as typed when the user is unknown.
    User,
    UserId,
    Username,
    IpAddress,
    SessionId,
    RequestId,
    UserAgent,
    Action,
    Metadata(String),
}

impl Field {
    pub fn parse(name: &str) -> Result<Field, String> {
        Ok(match name {
            "user" => Field::User,
            "user_id" => Field::UserId,
            "username" => Field::Username,
            "ip_address" | "ip" => Field::IpAddress,
            "session_id" => Field::SessionId,
            "request_id" => Field::RequestId,
            "user_agent" => Field::UserAgent,
            "action" => Field::Action,
            other => match other.strip_prefix("metadata.") {
                Some(key) if !key.is_empty() => Field::Metadata(key.to_owned()),
                _ => return Err(format!("unknown field `{other}`")),
            },
        })
    }

    pub fn name(&self) -> String {
        match self {
            Field::User => "user".into(),
            Field::UserId => "user_id".into(),
            Field::Username => "username".into(),
            Field::IpAddress => "ip_address".into(),
            Field::SessionId => "session_id".into(),
            Field::RequestId => "request_id".into(),
            Field::UserAgent => "user_agent".into(),
            Field::Action => "action".into(),
            Field::Metadata(k) => format!("metadata.{k}"),
        }
    }

    /// The part of the alert subject before the `:`.
    fn subject_prefix(&self) -> String {
        match self {
            Field::User | Field::UserId => "user".into(),
            Field::Username => "username".into(),
            Field::IpAddress => "ip".into(),
            Field::SessionId => "session".into(),
            Field::RequestId => "request".into(),
            Field::UserAgent => "user_agent".into(),
            Field::Action => "action".into(),
            Field::Metadata(k) => format!("metadata.{k}"),
        }
    }

    fn text<'e>(&self, e: &'e AuthEvent) -> Option<&'e str> {
        match self {
            Field::User => e.user_id.as_deref().or(e.username.as_deref()),
            Field::UserId => e.user_id.as_deref(),
            Field::Username => e.username.as_deref(),
            Field::SessionId => e.session_id.as_deref(),
            Field::RequestId => e.request_id.as_deref(),
            Field::UserAgent => e.user_agent.as_deref(),
            Field::Action => Some(&e.action),
            Field::Metadata(k) => e.metadata.iter().find(|(mk, _)| mk == k).map(|(_, v)| v.as_str()),
            Field::IpAddress => None,
        }
    }

    /// Feeds the field's value into the hasher; false when the event has
    /// no value for it (the event then has no key for this rule).
    pub fn hash_into(&self, e: &AuthEvent, h: &mut StableHasher) -> bool {
        if *self == Field::IpAddress {
            return match e.ip_address {
                Some(ip) => {
                    hash_ip(ip, h);
                    true
                }
                None => false,
            };
        }
        match self.text(e) {
            Some(v) => {
                h.write(v.as_bytes());
                true
            }
            None => false,
        }
    }

    pub fn value_string(&self, e: &AuthEvent) -> Option<String> {
        match self {
            Field::IpAddress => e.ip_address.map(|ip| ip.to_string()),
            other => other.text(e).map(str::to_owned),
        }
    }
}

fn hash_ip(ip: IpAddr, h: &mut StableHasher) {
    match ip {
        IpAddr::V4(v4) => h.write_u64(u64::from(u32::from(v4)) | (4 << 32)),
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            h.write_u64(n as u64);
            h.write_u64((n >> 64) as u64 ^ 6);
        }
    }
}

/// One `group_by` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    System,
    One(Field),
    Pair(Field, Field),
}

impl KeySpec {
    pub fn parse(spec: &str) -> Result<KeySpec, String> {
        if spec == "system" {
            return Ok(KeySpec::System);
        }
        match spec.split_once('+') {
            Some((a, b)) => Ok(KeySpec::Pair(Field::parse(a.trim())?, Field::parse(b.trim())?)),
            None => Ok(KeySpec::One(Field::parse(spec.trim())?)),
        }
    }

    /// The spec as written in config, e.g. `user+ip_address`.
    pub fn text(&self) -> String {
        match self {
            KeySpec::System => "system".into(),
            KeySpec::One(f) => f.name(),
            KeySpec::Pair(a, b) => format!("{}+{}", a.name(), b.name()),
        }
    }

    /// The key's stable hash, or None when the event lacks a field.
    pub fn hash(&self, e: &AuthEvent) -> Option<u64> {
        let mut h = StableHasher::default();
        match self {
            KeySpec::System => return Some(0),
            KeySpec::One(f) => f.hash_into(e, &mut h).then_some(())?,
            KeySpec::Pair(a, b) => (a.hash_into(e, &mut h) && b.hash_into(e, &mut h)).then_some(())?,
        }
        Some(h.finish())
    }

    /// The alert subject for the event's key.
    pub fn subject(&self, e: &AuthEvent) -> Option<String> {
        match self {
            KeySpec::System => Some("system".into()),
            KeySpec::One(f) => Some(format!("{}:{}", f.subject_prefix(), f.value_string(e)?)),
            KeySpec::Pair(a, b) => Some(format!(
                "{}:{}|{}:{}",
                a.subject_prefix(),
                a.value_string(e)?,
                b.subject_prefix(),
                b.value_string(e)?
            )),
        }
    }
}

/// A fast hash that is the same in every process and version (unlike the
/// standard library's randomly seeded one): word-at-a-time folded multiply
/// with a final avalanche.
#[derive(Default, Clone, Copy)]
pub struct StableHasher {
    state: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // Little-endian word of the last 1..=7 bytes (a loop: cheaper
            // than a memcpy call for so few).
            let word = rest.iter().rev().fold(0u64, |w, b| (w << 8) | u64::from(*b));
            self.write_u64(word);
        }
        // The length as a word of its own: "ab" + "c" never equals "a" + "bc",
        // and zero padding never equals a real byte.
        self.write_u64(bytes.len() as u64);
    }

    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i) | 0x100);
    }

    fn write_u64(&mut self, i: u64) {
        // Folded 64×64→128 multiply: every input bit reaches every output
        // bit (a plain multiply never moves high input bits down, which
        // made keys differing only in their last characters collide).
        let product = u128::from(self.state ^ i) * u128::from(SEED);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        // murmur3's fmix64: spreads every input bit over the output.
        let mut h = self.state;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Maps keyed by an already-mixed u64 need no further hashing.
#[derive(Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type KeyMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<PassThroughHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn event(user_id: Option<&str>, username: Option<&str>, ip: Option<&str>) -> AuthEvent {
        AuthEvent {
            event_id: Uuid::nil(),
            occurred_at: 0,
            action: "FAILED_AUTH_LOGIN".into(),
            user_id: user_id.map(Into::into),
            username: username.map(Into::into),
            ip_address: ip.map(|i| i.parse().unwrap()),
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: vec![("tenant".into(), "t1".into())],
        }
    }

    #[test]
    fn user_falls_back_to_username_and_subjects_are_readable() {
        let spec = KeySpec::parse("user").unwrap();
        assert_eq!(spec.subject(&event(Some("42"), Some("bob"), None)).unwrap(), "user:42");
        assert_eq!(spec.subject(&event(None, Some("bob"), None)).unwrap(), "user:bob");
        assert_eq!(spec.hash(&event(None, None, None)), None);
        let pair = KeySpec::parse("user+ip_address").unwrap();
        assert_eq!(pair.subject(&event(Some("42"), None, Some("10.0.0.1"))).unwrap(), "user:42|ip:10.0.0.1");
        assert_eq!(
            KeySpec::parse("ip_address").unwrap().subject(&event(None, None, Some("2001:db8::1"))).unwrap(),
            "ip:2001:db8::1"
        );
        assert_eq!(
            KeySpec::parse("metadata.tenant").unwrap().subject(&event(None, None, None)).unwrap(),
            "metadata.tenant:t1"
        );
        assert_eq!(KeySpec::System.subject(&event(None, None, None)).unwrap(), "system");
        assert_eq!(spec.text(), "user");
        assert_eq!(pair.text(), "user+ip_address");
    }

    #[test]
    fn similar_keys_do_not_collide() {
        let spec = KeySpec::parse("user").unwrap();
        let mut seen = std::collections::HashSet::new();
        for u in 0..200_000 {
            let id = format!("storm{u}");
            assert!(seen.insert(spec.hash(&event(Some(&id), None, None)).unwrap()), "collision at {id}");
        }
    }

    #[test]
    fn hashes_are_stable_and_separate_values() {
        let spec = KeySpec::parse("user").unwrap();
        let a = spec.hash(&event(Some("42"), None, None)).unwrap();
        // The same in every process: a restarted detector relies on it.
        assert_eq!(a, spec.hash(&event(Some("42"), Some("other"), None)).unwrap());
        assert_ne!(a, spec.hash(&event(Some("43"), None, None)).unwrap());
        let pair = KeySpec::parse("username+user_id").unwrap();
        assert_ne!(pair.hash(&event(Some("c"), Some("ab"), None)), pair.hash(&event(Some("bc"), Some("a"), None)));
        let ip = KeySpec::parse("ip_address").unwrap();
        assert_ne!(ip.hash(&event(None, None, Some("10.0.0.1"))), ip.hash(&event(None, None, Some("10.0.0.2"))));
        assert_eq!(a, 4468664193061235058, "the hash must not change between versions");
    }
}
