//! Rules keyed by something other than the user, across instances.
//!
//! Events are keyed by user, so a user's events stay on one partition and
//! per-user state follows the partition to whichever instance owns it. A
//! rule keyed by IP address or system-wide sees events of every partition:
//! with several instances each would count only its own share. When
//! `detect.routing_topic` is set, such rule keys are evaluated on that
//! topic instead: the instance that consumes an event re-publishes it there
//! once per routed key, partitioned by the key's hash (a batch's events of
//! one key and partition in one record, `crate::event::routed`), and whichever
//! instance owns that partition counts every event of the key
//! (`crate::ingest::routed`). Rule keys that include the user stay where
//! the events are consumed.

use super::keys::{Field, KeySpec};
use super::rules::ActionMatch;
use super::{DetectConfig, RuleError};
use crate::event::AuthEvent;

/// Headers of a routed record: the key spec it is routed by; and, only on
/// records of one event each (written before src/event/routed.rs, still
/// read), the events-topic partition and offset it came from
/// (`<partition>:<offset>`).
pub const HEADER_KEY_SPEC: &str = "audit.routed.key";
pub const HEADER_SOURCE: &str = "audit.routed.source";

/// Whether every event of a key of `spec` is on one events-topic partition
/// (the key includes the user the events are keyed by).
pub fn follows_partition(spec: &KeySpec) -> bool {
    let is_user = |f: &Field| matches!(f, Field::User | Field::UserId);
    match spec {
        KeySpec::System => false,
        KeySpec::One(f) => is_user(f),
        KeySpec::Pair(a, b) => is_user(a) || is_user(b),
    }
}

/// One routed key spec and the rules that group by it.
#[derive(Debug, Clone)]
pub struct RoutedKey {
    pub spec: KeySpec,
    /// `spec` as written in alerts (`ip_address`, `system`).
    pub text: String,
    /// The detection config restricted to the rules on this key, each
    /// grouped by this key only.
    pub config: DetectConfig,
    actions: Vec<ActionMatch>,
}

impl RoutedKey {
    /// Whether some rule on this key looks at `action`.
    pub fn wants(&self, action: &str) -> bool {
        self.actions.iter().any(|m| m.matches(action))
    }
}

/// The rules split by where they are evaluated.
#[derive(Debug, Clone)]
pub struct Split {
    /// Rule keys that follow the events topic's partitions.
    pub local: DetectConfig,
    /// Rule keys evaluated on the routing topic, one entry per key spec.
    pub routed: Vec<RoutedKey>,
}

/// Splits the rules; the config must compile.
pub fn split(cfg: &DetectConfig) -> Result<Split, RuleError> {
    let rules = cfg.compile()?;
    let mut local = cfg.clone();
    let mut routed: Vec<RoutedKey> = Vec::new();
    for rule_cfg in &mut local.rules {
        let mut kept = Vec::new();
        for text in &rule_cfg.group_by {
            let spec = KeySpec::parse(text).map_err(|message| RuleError {
                index: 0,
                id: rule_cfg.id.clone(),
                message: format!("group_by: {message}"),
            })?;
            if follows_partition(&spec) {
                kept.push(text.clone());
                continue;
            }
            if !rule_cfg.enabled {
                continue;
            }
            let canonical = spec.text();
            let index = match routed.iter().position(|r| r.text == canonical) {
                Some(i) => i,
                None => {
                    let mut config = cfg.clone();
                    config.rules.clear();
                    routed.push(RoutedKey { spec, text: canonical, config, actions: Vec::new() });
                    routed.len() - 1
                }
            };
            let mut only_this_key = rule_cfg.clone();
            only_this_key.group_by = vec![text.clone()];
            routed[index].config.rules.push(only_this_key);
            if let Some(rule) = rules.iter().find(|r| r.id == rule_cfg.id) {
                routed[index].actions.extend(rule.actions.iter().chain(&rule.then_actions).cloned());
            }
        }
        if kept.is_empty() {
            // Nothing of it stays local; compile() still checks the rule.
            rule_cfg.enabled = false;
        } else {
            rule_cfg.group_by = kept;
        }
    }
    // Both halves are what detectors get built from, here and after every
    // rebalance: they compile now or the service does not start.
    local.compile()?;
    for key in &routed {
        key.config.compile()?;
    }
    Ok(Split { local, routed })
}

/// Where one event goes on the routing topic: for each routed key it has,
/// the key's index in [`Split::routed`] and the partition.
pub fn routes<'a>(
    routed: &'a [RoutedKey],
    partitions: i32,
    e: &'a AuthEvent,
) -> impl Iterator<Item = (usize, i32)> + 'a {
    routed.iter().enumerate().filter(|(_, k)| k.wants(&e.action)).filter_map(move |(i, k)| {
        let hash = k.spec.hash(e)?;
        Some((i, partition_of(hash, partitions)))
    })
}

/// The routing-topic partition of a key hash; also how an instance finds
/// the open alerts of the partitions it owns.
pub fn partition_of(key_hash: u64, partitions: i32) -> i32 {
    (key_hash % u64::from(partitions.max(1).unsigned_abs())) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, ip: Option<&str>) -> AuthEvent {
        AuthEvent {
            event_id: uuid::Uuid::from_u128(1),
            occurred_at: 0,
            action: action.into(),
            user_id: Some("u1".into()),
            username: Some("u1".into()),
            ip_address: ip.map(|ip| ip.parse().unwrap()),
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: vec![],
        }
    }

    #[test]
    fn the_default_rules_split_into_per_user_local_and_ip_and_system_routed() {
        let split = split(&DetectConfig::default()).unwrap();
        let local: Vec<&str> =
            split.local.rules.iter().filter(|r| r.enabled).map(|r| r.id.as_str()).collect::<Vec<_>>();
        assert_eq!(local, ["user_failed_logins", "brute_force_success"]);
        let routed: Vec<(&str, Vec<&str>)> = split
            .routed
            .iter()
            .map(|k| (k.text.as_str(), k.config.rules.iter().map(|r| r.id.as_str()).collect()))
            .collect();
        assert_eq!(
            routed,
            [
                ("system", vec!["system_failed_logins"]),
                ("ip_address", vec!["ip_failed_logins", "ip_password_spraying", "brute_force_success"])
            ]
        );
        // Both halves still compile; no rule is lost or doubled.
        assert!(split.local.compile().is_ok());
        for k in &split.routed {
            assert!(k.config.compile().is_ok(), "{}", k.text);
        }
    }

    #[test]
    fn a_failed_login_goes_to_its_ip_and_system_partitions_a_logout_nowhere() {
        let split = split(&DetectConfig::default()).unwrap();
        let failed = event("FAILED_AUTH_LOGIN", Some("203.0.113.9"));
        let to: Vec<(usize, i32)> = routes(&split.routed, 8, &failed).collect();
        assert_eq!(to.len(), 2);
        let ip = split.routed.iter().position(|k| k.text == "ip_address").unwrap();
        let expected = partition_of(split.routed[ip].spec.hash(&failed).unwrap(), 8);
        assert!(to.contains(&(ip, expected)));
        assert!(to.iter().all(|&(_, p)| (0..8).contains(&p)));
        // The same address always lands on the same partition.
        let again = event("FAILED_AUTH_LOGIN", Some("203.0.113.9"));
        assert_eq!(routes(&split.routed, 8, &again).collect::<Vec<_>>(), to);
        // No address: only the system-wide key.
        assert_eq!(routes(&split.routed, 8, &event("FAILED_AUTH_LOGIN", None)).count(), 1);
        assert_eq!(routes(&split.routed, 8, &event("AUTH_LOGOUT", Some("203.0.113.9"))).count(), 0);
        // A success goes to its address: the brute-force rule's B event.
        assert_eq!(routes(&split.routed, 8, &event("AUTH_LOGIN", Some("203.0.113.9"))).count(), 1);
    }
}
