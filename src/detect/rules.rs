//! Detection rules as data. Each rule is an instance of one of three kinds,
//! the way Sigma correlation rules are:
//!
//! - `event_count`: matching events per key in a sliding window;
//! - `distinct_count`: distinct values of a field per key in a window;
//! - `sequence`: at least N events matching A, then one matching B, per key,
//!   within the window.
//!
//! The five rules of the runbook are the default `[[detect.rules]]`; an
//! operator adds, changes or switches off rules in the config file only.

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::keys::{Field, KeySpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    EventCount,
    DistinctCount,
    Sequence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    /// As stored; anything but "critical" reads as a warning.
    pub fn parse(s: &str) -> Severity {
        if s == "critical" { Severity::Critical } else { Severity::Warning }
    }
}

/// What an automated consumer of the alert should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecommendedAction {
    LockAccount,
    BlockIp,
    Investigate,
}

impl RecommendedAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RecommendedAction::LockAccount => "lock_account",
            RecommendedAction::BlockIp => "block_ip",
            RecommendedAction::Investigate => "investigate",
        }
    }
    pub fn parse(s: &str) -> Option<RecommendedAction> {
        [RecommendedAction::LockAccount, RecommendedAction::BlockIp, RecommendedAction::Investigate]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// One rule as written in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Stable identifier; part of every alert_id, so renaming a rule starts
    /// new episodes.
    pub id: String,
    pub kind: RuleKind,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Actions the rule counts (for `sequence`: the A events). Each entry is
    /// an exact action, a prefix ending in `*` (`ADMIN_*`), or `@failure` /
    /// `@success` for the configured sets.
    pub actions: Vec<String>,
    /// `sequence` only: the B events (e.g. `["@success"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then_actions: Vec<String>,
    /// The rule runs once per entry. Each entry is a field (`user`,
    /// `user_id`, `username`, `ip_address`, `session_id`, `user_agent`,
    /// `action`, `metadata.<key>`), a pair joined by `+`
    /// (`user+ip_address`), or `system` (one key for everything).
    pub group_by: Vec<String>,
    /// `distinct_count` only: the field whose distinct values are counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct: Option<String>,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fires `warning` when the count exceeds this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<u32>,
    /// Fires (or escalates to) `critical` when the count exceeds this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<u32>,
    /// `sequence` only: how many A events must precede the B event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u32>,
    /// `sequence` only: the severity of a match (default critical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    pub recommended_action: RecommendedAction,
    /// Users (user id or username) and networks the rule ignores: their
    /// events are not counted and they are never alerted on.
    #[serde(default)]
    pub allow: AllowList,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowList {
    pub users: Vec<String>,
    pub cidrs: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("detect.rules[{index}] ({id}): {message}")]
pub struct RuleError {
    pub index: usize,
    pub id: String,
    pub message: String,
}

/// An action filter entry, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionMatch {
    Exact(String),
    Prefix(String),
}

impl ActionMatch {
    pub fn matches(&self, action: &str) -> bool {
        match self {
            ActionMatch::Exact(a) => a == action,
            ActionMatch::Prefix(p) => action.starts_with(p.as_str()),
        }
    }
}

/// A rule ready to run.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub kind: RuleKind,
    pub actions: Vec<ActionMatch>,
    pub then_actions: Vec<ActionMatch>,
    pub keys: Vec<KeySpec>,
    pub distinct: Option<Field>,
    pub window_micros: i64,
    /// Ascending (threshold, severity): fires above the threshold.
    pub levels: Vec<(u32, Severity)>,
    /// `sequence`: A events needed before B.
    pub min_count: u32,
    pub recommended_action: RecommendedAction,
    pub allow: AllowList,
}

impl Rule {
    /// The lowest threshold: at or below it an episode calms down.
    pub fn calm_threshold(&self) -> u32 {
        self.levels.first().map_or(0, |(t, _)| *t)
    }

    /// How many timestamps (or distinct values) a key ever needs to keep:
    /// one more than the highest threshold.
    pub fn capacity(&self) -> usize {
        match self.kind {
            RuleKind::Sequence => self.min_count as usize,
            _ => self.levels.last().map_or(1, |(t, _)| *t as usize + 1),
        }
    }

    /// The severity a count reaches, if any.
    pub fn level_for(&self, count: u32) -> Option<(u32, Severity)> {
        self.levels.iter().rev().find(|(t, _)| count > *t).copied()
    }
}

fn compile_actions(list: &[String], failures: &[String], successes: &[String]) -> Result<Vec<ActionMatch>, String> {
    let mut out = Vec::new();
    for entry in list {
        match entry.as_str() {
            "@failure" => out.extend(failures.iter().cloned().map(ActionMatch::Exact)),
            "@success" => out.extend(successes.iter().cloned().map(ActionMatch::Exact)),
            other if other.starts_with('@') => return Err(format!("unknown action set `{other}`")),
            other => match other.strip_suffix('*') {
                Some(prefix) if prefix.contains('*') => {
                    return Err(format!("`{other}`: only a trailing `*` is allowed"));
                }
                Some(prefix) => out.push(ActionMatch::Prefix(prefix.to_owned())),
                None if other.contains('*') => return Err(format!("`{other}`: only a trailing `*` is allowed")),
                None if other.is_empty() => return Err("empty action".into()),
                None => out.push(ActionMatch::Exact(other.to_owned())),
            },
        }
    }
    Ok(out)
}

impl RuleConfig {
    /// Checks and compiles the rule; errors name the rule and the field.
    pub fn compile(&self, index: usize, failures: &[String], successes: &[String]) -> Result<Rule, RuleError> {
        let err = |message: String| RuleError { index, id: self.id.clone(), message };
        if self.id.is_empty() || !self.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(err("id must be non-empty letters, digits, `_` or `-`".into()));
        }
        let actions = compile_actions(&self.actions, failures, successes).map_err(|m| err(format!("actions: {m}")))?;
        if actions.is_empty() {
            return Err(err("actions: at least one action is needed".into()));
        }
        let then_actions =
            compile_actions(&self.then_actions, failures, successes).map_err(|m| err(format!("then_actions: {m}")))?;
        if self.group_by.is_empty() {
            return Err(err("group_by: at least one key (or \"system\") is needed".into()));
        }
        let keys = self
            .group_by
            .iter()
            .map(|spec| KeySpec::parse(spec))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| err(format!("group_by: {m}")))?;
        let window_micros = i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX);
        if window_micros <= 0 {
            return Err(err("window must be greater than zero".into()));
        }
        let mut levels = Vec::new();
        let mut distinct = None;
        let mut min_count = 0;
        match self.kind {
            RuleKind::EventCount | RuleKind::DistinctCount => {
                if let Some(w) = self.warning {
                    levels.push((w, Severity::Warning));
                }
                if let Some(c) = self.critical {
                    levels.push((c, Severity::Critical));
                }
                if levels.is_empty() {
                    return Err(err("needs `warning`, `critical` or both".into()));
                }
                if let (Some(w), Some(c)) = (self.warning, self.critical)
                    && c <= w
                {
                    return Err(err("critical must be greater than warning".into()));
                }
                if levels.last().is_some_and(|(t, _)| *t > 100_000) {
                    return Err(err("thresholds above 100000 are not supported".into()));
                }
                if self.kind == RuleKind::DistinctCount {
                    let field =
                        self.distinct.as_deref().ok_or_else(|| err("distinct_count needs `distinct`".into()))?;
                    distinct = Some(Field::parse(field).map_err(|m| err(format!("distinct: {m}")))?);
                } else if self.distinct.is_some() {
                    return Err(err("`distinct` is only for distinct_count rules".into()));
                }
                if !self.then_actions.is_empty() || self.min_count.is_some() || self.severity.is_some() {
                    return Err(err("then_actions, min_count and severity are only for sequence rules".into()));
                }
            }
            RuleKind::Sequence => {
                if then_actions.is_empty() {
                    return Err(err("sequence needs `then_actions`".into()));
                }
                min_count = self.min_count.ok_or_else(|| err("sequence needs `min_count`".into()))?;
                if min_count == 0 || min_count > 10_000 {
                    return Err(err("min_count must be between 1 and 10000".into()));
                }
                if self.warning.is_some() || self.critical.is_some() || self.distinct.is_some() {
                    return Err(err("sequence rules use min_count and severity, not warning/critical/distinct".into()));
                }
                // A sequence match is one step: it fires at its severity.
                levels.push((0, self.severity.unwrap_or(Severity::Critical)));
            }
        }
        Ok(Rule {
            id: self.id.clone(),
            kind: self.kind,
            actions,
            then_actions,
            keys,
            distinct,
            window_micros,
            levels,
            min_count,
            recommended_action: self.recommended_action,
            allow: self.allow.clone(),
        })
    }
}

/// The runbook's five rules.
pub fn default_rules() -> Vec<RuleConfig> {
    let base = |id: &str, kind: RuleKind, group_by: &[&str], window_secs: u64, action: RecommendedAction| RuleConfig {
        id: id.into(),
        kind,
        enabled: true,
        actions: vec!["@failure".into()],
        then_actions: Vec::new(),
        group_by: group_by.iter().map(|s| s.to_string()).collect(),
        distinct: None,
        window: Duration::from_secs(window_secs),
        warning: None,
        critical: None,
        min_count: None,
        severity: None,
        recommended_action: action,
        allow: AllowList::default(),
    };
    vec![
        RuleConfig {
            warning: Some(5),
            critical: Some(10),
            ..base("user_failed_logins", RuleKind::EventCount, &["user"], 60, RecommendedAction::LockAccount)
        },
        RuleConfig {
            warning: Some(50),
            critical: Some(100),
            ..base("system_failed_logins", RuleKind::EventCount, &["system"], 60, RecommendedAction::Investigate)
        },
        RuleConfig {
            critical: Some(10),
            ..base("ip_failed_logins", RuleKind::EventCount, &["ip_address"], 3600, RecommendedAction::BlockIp)
        },
        RuleConfig {
            warning: Some(10),
            distinct: Some("username".into()),
            ..base("ip_password_spraying", RuleKind::DistinctCount, &["ip_address"], 600, RecommendedAction::BlockIp)
        },
        RuleConfig {
            then_actions: vec!["@success".into()],
            min_count: Some(5),
            severity: Some(Severity::Critical),
            ..base(
                "brute_force_success",
                RuleKind::Sequence,
                &["user", "ip_address"],
                600,
                RecommendedAction::LockAccount,
            )
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets() -> (Vec<String>, Vec<String>) {
        (vec!["FAILED_AUTH_LOGIN".into()], vec!["AUTH_LOGIN".into()])
    }

    #[test]
    fn default_rules_compile() {
        let (f, s) = sets();
        for (i, r) in default_rules().iter().enumerate() {
            let rule = r.compile(i, &f, &s).unwrap();
            assert!(!rule.levels.is_empty());
        }
    }

    #[test]
    fn levels_fire_strictly_above_thresholds() {
        let (f, s) = sets();
        let rule = default_rules()[0].compile(0, &f, &s).unwrap();
        assert_eq!(rule.level_for(5), None);
        assert_eq!(rule.level_for(6), Some((5, Severity::Warning)));
        assert_eq!(rule.level_for(10), Some((5, Severity::Warning)));
        assert_eq!(rule.level_for(11), Some((10, Severity::Critical)));
        assert_eq!(rule.capacity(), 11);
    }

    #[test]
    fn bad_rules_are_refused_with_their_name() {
        let (f, s) = sets();
        let mut r = default_rules()[0].clone();
        r.critical = Some(3);
        let e = r.compile(0, &f, &s).unwrap_err();
        assert!(e.to_string().contains("user_failed_logins") && e.to_string().contains("critical"), "{e}");
        let mut r = default_rules()[0].clone();
        r.actions = vec!["AD*MIN".into()];
        assert!(r.compile(0, &f, &s).unwrap_err().message.contains("trailing"));
        let mut r = default_rules()[0].clone();
        r.group_by = vec!["shoe_size".into()];
        assert!(r.compile(0, &f, &s).unwrap_err().message.contains("group_by"));
        let mut r = default_rules()[4].clone();
        r.then_actions.clear();
        assert!(r.compile(4, &f, &s).unwrap_err().message.contains("then_actions"));
    }

    #[test]
    fn action_sets_and_prefixes() {
        let (f, s) = sets();
        let m = compile_actions(&["@failure".into(), "ADMIN_*".into(), "X".into()], &f, &s).unwrap();
        assert!(m[0].matches("FAILED_AUTH_LOGIN"));
        assert!(m[1].matches("ADMIN_ROLE_GRANT") && !m[1].matches("ADMINX"[..5].as_ref()));
        assert!(m[2].matches("X") && !m[2].matches("XY"));
    }
}
