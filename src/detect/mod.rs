//! Sliding-window attack detection on event time.
//!
//! Every event is evaluated as it arrives: crossing a threshold fires at
//! once, never at window close. Each (rule, subject) has an alert lifecycle
//! (firing → escalated → resolved) with an `alert_id` derived from rule,
//! subject and episode start, so that a re-send after a restart carries the
//! same id. The engine is single-threaded and deterministic: the same events
//! in the same order give the same transitions (only the resolution of a
//! quiet stream also looks at the wall clock).

pub mod keys;
pub mod recent;
pub mod routing;
pub mod rules;
pub mod window;

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{AuthEvent, EpochMicros};
use keys::{KeySpec, StableHasher};

/// Small maps on the per-event path: a fast fixed hash instead of SipHash
/// (their keys are not attacker-chosen, or are bounded in number).
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<StableHasher>>;
pub use rules::{RecommendedAction, Rule, RuleConfig, RuleError, RuleKind, Severity};
use window::{Buckets, RuleState, SlotMap};

/// Windows longer than this, or thresholds above `COARSE_CAPACITY`, keep
/// bucket counts instead of event times.
const EXACT_MAX_WINDOW: Duration = Duration::from_secs(3600);
const COARSE_CAPACITY: usize = 1024;
/// Distinct actions whose rule matches are remembered (producers choose
/// action strings; the cache must not grow without bound).
const ACTION_CACHE_MAX: usize = 1024;
/// Transitions keep at most this many sample event ids.
const MAX_SAMPLES: usize = 10;
/// Namespace of alert ids (UUID v5 over rule, subject and episode start).
const ALERT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0b_4d0e_8f3c_4c1d_9a57_2b1e_aa5e_d7c1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AlertFormat {
    #[default]
    Json,
    Avro,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    pub enabled: bool,
    /// Actions that are failed logins (`@failure` in rules).
    pub failure_actions: Vec<String>,
    /// Actions that are successful logins (`@success` in rules).
    pub success_actions: Vec<String>,
    /// How far out of order (event time, per partition) an event may
    /// arrive and still count; later ones are counted in a metric only.
    #[serde(with = "humantime_serde")]
    pub lateness: Duration,
    /// An alert resolves once its count has stayed at or below the lowest
    /// threshold this long.
    #[serde(with = "humantime_serde")]
    pub quiet_period: Duration,
    pub alert_format: AlertFormat,
    /// Storm limiter: alert messages per rule per second, and burst.
    pub storm_limit_per_second: u32,
    pub storm_burst: u32,
    /// Keys tracked per rule at most; new keys beyond it are not tracked
    /// (counted in `audit_detector_keys_dropped_total`).
    pub max_keys_per_rule: usize,
    /// On start, state is rebuilt from the events stored in this window
    /// (at most; each rule needs its own window plus the lateness).
    #[serde(with = "humantime_serde")]
    pub rebuild_window_max: Duration,
    /// Rules keyed by something other than the user (IP address,
    /// system-wide) are evaluated on this topic, so that they count the
    /// events of every instance (src/detect/routing.rs). Unset: they count
    /// what this instance consumes, exact with one instance only.
    pub routing_topic: Option<String>,
    pub rules: Vec<RuleConfig>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            enabled: true,
            failure_actions: vec!["FAILED_AUTH_LOGIN".into()],
            success_actions: vec!["AUTH_LOGIN".into()],
            lateness: Duration::from_secs(30),
            quiet_period: Duration::from_secs(120),
            alert_format: AlertFormat::Json,
            storm_limit_per_second: 20,
            storm_burst: 50,
            max_keys_per_rule: 2_000_000,
            rebuild_window_max: Duration::from_secs(24 * 3600),
            routing_topic: None,
            rules: rules::default_rules(),
        }
    }
}

impl DetectConfig {
    /// Compiles the enabled rules; errors name the rule.
    pub fn compile(&self) -> Result<Vec<Rule>, RuleError> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let rule = r.compile(i, &self.failure_actions, &self.success_actions)?;
            if self.rules[..i].iter().any(|other| other.id == r.id) {
                return Err(RuleError { index: i, id: r.id.clone(), message: "duplicate rule id".into() });
            }
            if r.enabled {
                out.push(rule);
            }
        }
        let instances: usize = out.iter().map(|r| r.keys.len()).sum();
        if instances > 64 {
            return Err(RuleError { index: 0, id: String::new(), message: "more than 64 rule keys in all".into() });
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Escalated,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Escalated => "escalated",
            AlertState::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<AlertState> {
        match s {
            "firing" => Some(AlertState::Firing),
            "escalated" => Some(AlertState::Escalated),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        }
    }
}

/// One step of an alert's lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub alert_id: Uuid,
    pub rule: String,
    pub key_spec: String,
    pub key_hash: u64,
    pub subject: String,
    pub state: AlertState,
    pub severity: Severity,
    pub count: u32,
    pub threshold: u32,
    pub window_seconds: u64,
    pub episode_start: EpochMicros,
    pub first_event_at: Option<EpochMicros>,
    pub last_event_at: Option<EpochMicros>,
    pub sample_event_ids: Vec<Uuid>,
    pub recommended_action: RecommendedAction,
    /// Wall clock at detection.
    pub detected_at: EpochMicros,
    /// The Kafka partition of the event that opened the episode (-1: not
    /// known): the instance that owns it picks the episode up after a
    /// restart or a rebalance.
    pub partition: i32,
}

/// An alert still open in the database, picked up again after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenEpisode {
    pub alert_id: Uuid,
    pub rule: String,
    pub key_spec: String,
    pub key_hash: u64,
    pub subject: String,
    pub state: AlertState,
    pub severity: Severity,
    pub episode_start: EpochMicros,
    pub last_event_at: EpochMicros,
    pub partition: i32,
}

/// The alert id of an episode: the same rule, subject and start always
/// give the same id.
pub fn alert_id(rule: &str, subject: &str, episode_start: EpochMicros) -> Uuid {
    Uuid::new_v5(&ALERT_ID_NAMESPACE, format!("{rule}\u{1f}{subject}\u{1f}{episode_start}").as_bytes())
}

/// One rule applied to one of its `group_by` keys.
struct Instance {
    rule: usize,
    key: KeySpec,
    key_text: String,
    /// The slot of its key spec, and its position in the slot's entries.
    slot: usize,
    member: usize,
    /// Sequence rules: the keys with at least `min_count` A events kept,
    /// the only ones a B event can complete. Most B events (successful
    /// logins) belong to other keys; this small set answers for them from
    /// cache where a lookup in the big state map would miss it.
    armed: Option<KeySet>,
}

type KeySet = std::collections::HashSet<u64, BuildHasherDefault<keys::PassThroughHasher>>;

/// Every instance grouping by one key spec shares a slot: one map entry per
/// key holds all their states, so an event costs one lookup per key, not
/// one per rule.
struct Slot {
    key: KeySpec,
    /// Instance indexes, in entry order.
    members: Vec<usize>,
    /// The same as a bit mask over instances.
    member_mask: u64,
    /// A fresh entry.
    template: Vec<RuleState>,
    map: SlotMap,
}

/// A count to judge, collected while a slot entry is borrowed.
struct Judgment {
    instance: usize,
    key: u64,
    count: u32,
    calm_at: EpochMicros,
    first: Option<EpochMicros>,
}

struct Episode {
    alert_id: Uuid,
    state: AlertState,
    severity: Severity,
    subject: String,
    start: EpochMicros,
    /// When the count fell (or will fall) to the calm threshold.
    calm_at: EpochMicros,
    first_event_at: Option<EpochMicros>,
    last_event_at: EpochMicros,
    count: u32,
    samples: Vec<Uuid>,
    partition: i32,
}

#[derive(Clone, Copy, Default)]
struct ActionPlan {
    /// Instances for which the action is an A (counted) event.
    counted: u64,
    /// Instances (sequence rules) for which it is a B event.
    then: u64,
}

/// Counters kept locally and flushed to the metrics recorder on `tick`, so
/// that the per-event path does no atomic work.
#[derive(Default)]
struct PendingMetrics {
    late: u64,
    duplicates: u64,
    keys_dropped: Vec<u64>,
    evicted: Vec<u64>,
}

pub struct Detector {
    /// What it was built from (to start afresh on a rebalance).
    config: DetectConfig,
    rules: Vec<Rule>,
    instances: Vec<Instance>,
    slots: Vec<Slot>,
    action_cache: FastMap<String, ActionPlan>,
    lateness: i64,
    quiet: i64,
    max_keys: usize,
    /// Newest event time per partition (index = partition number).
    partition_max: Vec<EpochMicros>,
    max_event_time: EpochMicros,
    /// `max_event_time` as seen at the last tick, and when that was.
    max_at_last_tick: EpochMicros,
    wall_at_max: Instant,
    episodes: FastMap<(usize, u64), Episode>,
    /// Earliest event time at which some episode may resolve.
    next_resolution: EpochMicros,
    emitting: bool,
    /// Keys with an open episode, per instance: only their events (and
    /// those crossing a level) need judging.
    open_keys: Vec<KeySet>,
    judgments: Vec<Judgment>,
    pending: PendingMetrics,
    last_eviction: Instant,
    /// Event ids counted within the lateness window: a retried event is
    /// counted once.
    recent: recent::RecentEvents,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn wall_micros() -> EpochMicros {
    chrono::Utc::now().timestamp_micros()
}

impl Detector {
    pub fn new(cfg: &DetectConfig) -> Result<Detector, RuleError> {
        let rules = cfg.compile()?;
        let mut instances = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        for (r, rule) in rules.iter().enumerate() {
            for key in &rule.keys {
                let coarse = rule.window_micros > micros(EXACT_MAX_WINDOW) || rule.capacity() > COARSE_CAPACITY;
                let fresh = match rule.kind {
                    RuleKind::DistinctCount => RuleState::Distinct(Default::default()),
                    RuleKind::EventCount if coarse => RuleState::Coarse(None),
                    _ => RuleState::Times(Default::default()),
                };
                let i = instances.len();
                let slot = match slots.iter().position(|s| s.key == *key) {
                    Some(s) => s,
                    None => {
                        slots.push(Slot {
                            key: key.clone(),
                            members: Vec::new(),
                            member_mask: 0,
                            template: Vec::new(),
                            map: SlotMap::new(1),
                        });
                        slots.len() - 1
                    }
                };
                let member = slots[slot].members.len();
                slots[slot].members.push(i);
                slots[slot].member_mask |= 1 << i;
                slots[slot].template.push(fresh);
                let armed = (rule.kind == RuleKind::Sequence).then(KeySet::default);
                instances.push(Instance { rule: r, key: key.clone(), key_text: key.text(), slot, member, armed });
            }
        }
        for slot in &mut slots {
            slot.map = SlotMap::new(slot.members.len());
        }
        let n = instances.len();
        Ok(Detector {
            config: cfg.clone(),
            rules,
            instances,
            slots,
            action_cache: FastMap::default(),
            lateness: micros(cfg.lateness),
            quiet: micros(cfg.quiet_period),
            max_keys: cfg.max_keys_per_rule,
            partition_max: Vec::new(),
            max_event_time: EpochMicros::MIN,
            max_at_last_tick: EpochMicros::MIN,
            wall_at_max: Instant::now(),
            episodes: FastMap::default(),
            next_resolution: EpochMicros::MAX,
            emitting: true,
            open_keys: vec![KeySet::default(); n],
            judgments: Vec::new(),
            pending: PendingMetrics { keys_dropped: vec![0; n], evicted: vec![0; n], ..Default::default() },
            last_eviction: Instant::now(),
            recent: recent::RecentEvents::default(),
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// While false (rebuilding state after a start), transitions update the
    /// lifecycle but are not returned: they were sent before.
    pub fn set_emitting(&mut self, on: bool) {
        self.emitting = on;
    }

    /// The exact actions and prefixes any rule looks at (to select the
    /// events worth replaying on rebuild).
    pub fn relevant_actions(&self) -> (Vec<String>, Vec<String>) {
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for rule in &self.rules {
            for m in rule.actions.iter().chain(&rule.then_actions) {
                match m {
                    rules::ActionMatch::Exact(a) if !exact.contains(a) => exact.push(a.clone()),
                    rules::ActionMatch::Prefix(p) if !prefixes.contains(p) => prefixes.push(p.clone()),
                    _ => {}
                }
            }
        }
        (exact, prefixes)
    }

    /// How far behind its partition's newest event an event may be and
    /// still count.
    pub fn lateness(&self) -> Duration {
        Duration::from_micros(self.lateness.max(0) as u64)
    }

    /// How far back a rebuild must read: the longest window plus lateness.
    pub fn rebuild_span(&self) -> Duration {
        let longest = self.rules.iter().map(|r| r.window_micros).max().unwrap_or(0);
        Duration::from_micros((longest.saturating_add(self.lateness)).max(0) as u64)
    }

    /// Forgets every key's state and open episode without emitting anything:
    /// on a rebalance, when this instance's partitions are revoked. The
    /// partitions it gets next are rebuilt from the stored events and open
    /// alerts (a partition that comes back may have moved on meanwhile).
    pub fn forget_all(&mut self) {
        self.flush_metrics();
        let emitting = self.emitting;
        // The config compiled when this detector was built; it still does.
        *self = Detector::new(&self.config).expect("the detector's own config compiles");
        self.emitting = emitting;
    }

    /// Picks up alerts that were open before a restart.
    pub fn restore(&mut self, open: Vec<OpenEpisode>) {
        for ep in open {
            let Some(index) = self
                .instances
                .iter()
                .position(|inst| self.rules[inst.rule].id == ep.rule && inst.key_text == ep.key_spec)
            else {
                continue; // the rule was removed or changed its keys
            };
            self.open_keys[index].insert(ep.key_hash);
            self.episodes.insert(
                (index, ep.key_hash),
                Episode {
                    alert_id: ep.alert_id,
                    state: ep.state,
                    severity: ep.severity,
                    subject: ep.subject,
                    start: ep.episode_start,
                    calm_at: ep.last_event_at,
                    first_event_at: None,
                    last_event_at: ep.last_event_at,
                    count: 0,
                    samples: Vec::new(),
                    partition: ep.partition,
                },
            );
            self.next_resolution = self.next_resolution.min(ep.last_event_at.saturating_add(self.quiet));
        }
    }

    fn plan_for(&mut self, action: &str) -> ActionPlan {
        if let Some(plan) = self.action_cache.get(action) {
            return *plan;
        }
        let mut plan = ActionPlan::default();
        for (i, inst) in self.instances.iter().enumerate() {
            let rule = &self.rules[inst.rule];
            if rule.actions.iter().any(|m| m.matches(action)) {
                plan.counted |= 1 << i;
            }
            if rule.then_actions.iter().any(|m| m.matches(action)) {
                plan.then |= 1 << i;
            }
        }
        if self.action_cache.len() < ACTION_CACHE_MAX {
            self.action_cache.insert(action.to_owned(), plan);
        }
        plan
    }

    fn allowed(rule: &Rule, e: &AuthEvent) -> bool {
        let allow = &rule.allow;
        (!allow.users.is_empty()
            && [e.user_id.as_deref(), e.username.as_deref()]
                .into_iter()
                .flatten()
                .any(|u| allow.users.iter().any(|a| a == u)))
            || (!allow.cidrs.is_empty() && e.ip_address.is_some_and(|ip| allow.cidrs.iter().any(|n| n.contains(&ip))))
    }

    /// Evaluates one event (from `partition`); transitions go to `out`.
    pub fn observe(&mut self, e: &AuthEvent, partition: i32, out: &mut Vec<Transition>) {
        let plan = self.plan_for(&e.action);
        if plan.counted | plan.then == 0 {
            return;
        }
        let t = e.occurred_at;
        let slot = usize::try_from(partition).unwrap_or(0);
        if slot >= self.partition_max.len() {
            self.partition_max.resize(slot + 1, EpochMicros::MIN);
        }
        let newest = &mut self.partition_max[slot];
        if *newest == EpochMicros::MIN {
            *newest = t;
        }
        if t < newest.saturating_sub(self.lateness) {
            self.pending.late += 1;
            return;
        }
        *newest = (*newest).max(t);
        if !self.recent.first_sighting(e.event_id.as_u128(), t, slot, self.lateness) {
            self.pending.duplicates += 1;
            return;
        }
        self.max_event_time = self.max_event_time.max(t);
        let active = plan.counted | plan.then;
        let mut judgments = std::mem::take(&mut self.judgments);
        for s in 0..self.slots.len() {
            let mask = self.slots[s].member_mask & active;
            if mask != 0 {
                self.observe_slot(s, mask, &plan, e, &mut judgments);
            }
        }
        for j in judgments.drain(..) {
            self.judge(j, e, partition, out);
        }
        self.judgments = judgments;
        if self.max_event_time >= self.next_resolution {
            self.sweep(self.max_event_time, out);
        }
    }

    /// One key slot for one event: one lookup, then each member rule.
    fn observe_slot(&mut self, s: usize, mask: u64, plan: &ActionPlan, e: &AuthEvent, judgments: &mut Vec<Judgment>) {
        let Detector { rules, instances, slots, pending, open_keys, max_keys, .. } = self;
        let slot = &mut slots[s];
        // Members that ignore this event (allow-listed subject) drop out.
        let mut members = mask;
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            if Self::allowed(&rules[instances[i].rule], e) {
                members &= !(1 << i);
            }
        }
        if members == 0 {
            return;
        }
        let Some(key) = slot.key.hash(e) else { return };
        let counted = members & plan.counted;
        if counted == 0 {
            // Only B events of sequence rules: a key that is not armed
            // (fewer A events than needed) cannot complete, and most are not.
            let mut m = members;
            let mut armed = false;
            while m != 0 {
                let i = m.trailing_zeros() as usize;
                m &= m - 1;
                armed |= instances[i].armed.as_ref().is_some_and(|a| a.contains(&key));
            }
            if !armed {
                return;
            }
        }
        let states = match slot.map.entry(key, &slot.template, counted != 0, *max_keys) {
            Ok(states) => states,
            Err(full) => {
                if full {
                    let mut m = counted;
                    while m != 0 {
                        let i = m.trailing_zeros() as usize;
                        m &= m - 1;
                        pending.keys_dropped[i] += 1;
                    }
                }
                return;
            }
        };
        let mut m = members;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            let inst = &mut instances[i];
            let rule = &rules[inst.rule];
            let is_counted = plan.counted & (1 << i) != 0;
            let is_then = plan.then & (1 << i) != 0;
            let open = open_keys[i].contains(&key);
            if let Some((count, calm_at, first)) =
                Self::observe_member(rule, inst, &mut states[inst.member], key, e, is_counted, is_then, open)
            {
                judgments.push(Judgment { instance: i, key, count, calm_at, first });
            }
        }
    }

    /// One rule's state for one key and event: the count to judge (with
    /// when it calms down and the first event of the window), or None when
    /// there is nothing to judge.
    #[allow(clippy::too_many_arguments)]
    fn observe_member(
        rule: &Rule,
        inst: &mut Instance,
        state: &mut RuleState,
        key: u64,
        e: &AuthEvent,
        counted: bool,
        then: bool,
        open: bool,
    ) -> Option<(u32, EpochMicros, Option<EpochMicros>)> {
        let t = e.occurred_at;
        let w = rule.window_micros;
        let cap = rule.capacity();
        let calm_threshold = rule.calm_threshold();
        // Below every threshold and no open episode: nothing to judge, and
        // the calm time and first event need not be computed (the common
        // case, kept cheap).
        let needs_judging = |count: u32| open || rule.level_for(count).is_some();
        match state {
            RuleState::Times(list) if rule.kind == RuleKind::Sequence => {
                let armed = inst.armed.as_mut().expect("sequence instances keep an armed set");
                if counted {
                    list.insert(t, cap);
                    if list.len() >= rule.min_count as usize {
                        armed.insert(key);
                    }
                }
                if !then || !armed.contains(&key) {
                    return None;
                }
                let failures = list.count_at(t, w);
                (failures >= rule.min_count).then(|| (failures, t, list.get(0)))
            }
            RuleState::Times(list) => {
                // Out of order for this key (other partitions, or late
                // within the lateness): it counts in every window it is in.
                let in_order = list.newest().is_none_or(|n| t >= n);
                list.insert(t, cap);
                let count = if in_order { list.count_at(t, w) } else { list.peak_count_around(t, w) };
                if !needs_judging(count) {
                    return None;
                }
                let first = list.iter().find(|x| *x > t - w);
                Some((count, list.calm_at(calm_threshold, w).unwrap_or(EpochMicros::MIN), first))
            }
            RuleState::Coarse(buckets) => {
                let buckets = buckets.get_or_insert_with(|| Box::new(Buckets::new()));
                buckets.insert(t, w);
                let count = buckets.count_at(t, w);
                if !needs_judging(count) {
                    return None;
                }
                Some((count, buckets.calm_at(calm_threshold, w).unwrap_or(EpochMicros::MIN), None))
            }
            RuleState::Distinct(set) => {
                let mut h = StableHasher::default();
                if !rule.distinct.as_ref().is_some_and(|f| f.hash_into(e, &mut h)) {
                    return None;
                }
                let value = std::hash::Hasher::finish(&h);
                let in_order = set.newest().is_none_or(|n| t >= n);
                set.insert(value, t, cap);
                let count = if in_order { set.count_at(t, w) } else { set.peak_count_around(t, w) };
                if !needs_judging(count) {
                    return None;
                }
                Some((count, set.calm_at(calm_threshold, w).unwrap_or(EpochMicros::MIN), None))
            }
        }
    }

    /// Moves the (rule, key) lifecycle for a new count at event `e`.
    fn judge(&mut self, j: Judgment, e: &AuthEvent, partition: i32, out: &mut Vec<Transition>) {
        let Judgment { instance: i, key, count, calm_at, first } = j;
        let t = e.occurred_at;
        let rule_index = self.instances[i].rule;
        let level = self.rules[rule_index].level_for(count);
        // An episode whose quiet period has passed in event time ends
        // before this event is judged (deterministic in replays).
        if let Some(ep) = self.episodes.get(&(i, key))
            && t >= ep.calm_at.saturating_add(self.quiet)
            && ep.calm_at != EpochMicros::MIN
        {
            let ep = self.episodes.remove(&(i, key)).expect("present");
            self.emit_resolved(i, key, ep, out);
        }
        match self.episodes.get_mut(&(i, key)) {
            None => {
                let Some((threshold, severity)) = level else { return };
                let Some(subject) = self.instances[i].key.subject(e) else { return };
                let rule = &self.rules[rule_index];
                let ep = Episode {
                    alert_id: alert_id(&rule.id, &subject, t),
                    state: AlertState::Firing,
                    severity,
                    subject,
                    start: t,
                    calm_at: calm_at.max(t),
                    first_event_at: first,
                    last_event_at: t,
                    count,
                    samples: vec![e.event_id],
                    partition,
                };
                self.next_resolution = self.next_resolution.min(ep.calm_at.saturating_add(self.quiet));
                let tr = self.transition(i, key, &ep, AlertState::Firing, threshold);
                self.episodes.insert((i, key), ep);
                self.open_keys[i].insert(key);
                self.push(tr, out);
            }
            Some(ep) => {
                ep.last_event_at = ep.last_event_at.max(t);
                ep.count = count;
                if ep.samples.len() < MAX_SAMPLES && !ep.samples.contains(&e.event_id) {
                    ep.samples.push(e.event_id);
                }
                if level.is_some() {
                    ep.calm_at = ep.calm_at.max(calm_at).max(t);
                }
                let next = ep.calm_at.saturating_add(self.quiet);
                self.next_resolution = self.next_resolution.min(next);
                if let Some((threshold, severity)) = level
                    && severity > ep.severity
                {
                    ep.severity = severity;
                    ep.state = AlertState::Escalated;
                    let ep = &self.episodes[&(i, key)];
                    let tr = self.transition(i, key, ep, AlertState::Escalated, threshold);
                    self.push(tr, out);
                }
            }
        }
    }

    fn transition(&self, i: usize, key: u64, ep: &Episode, state: AlertState, threshold: u32) -> Transition {
        let inst = &self.instances[i];
        let rule = &self.rules[inst.rule];
        // A sequence rule's threshold is its A-event count.
        let threshold = if rule.kind == RuleKind::Sequence { rule.min_count } else { threshold };
        Transition {
            alert_id: ep.alert_id,
            rule: rule.id.clone(),
            key_spec: inst.key_text.clone(),
            key_hash: key,
            subject: ep.subject.clone(),
            state,
            severity: ep.severity,
            count: ep.count,
            threshold,
            window_seconds: (rule.window_micros / 1_000_000) as u64,
            episode_start: ep.start,
            first_event_at: ep.first_event_at,
            last_event_at: Some(ep.last_event_at),
            sample_event_ids: ep.samples.clone(),
            recommended_action: rule.recommended_action,
            detected_at: wall_micros(),
            partition: ep.partition,
        }
    }

    fn emit_resolved(&mut self, i: usize, key: u64, mut ep: Episode, out: &mut Vec<Transition>) {
        self.open_keys[i].remove(&key);
        ep.count = self.current_count(i, key, ep.calm_at.saturating_add(self.quiet));
        let calm_threshold = self.rules[self.instances[i].rule].calm_threshold();
        let tr = self.transition(i, key, &ep, AlertState::Resolved, calm_threshold);
        self.push(tr, out);
    }

    fn current_count(&mut self, i: usize, key: u64, at: EpochMicros) -> u32 {
        let inst = &self.instances[i];
        let w = self.rules[inst.rule].window_micros;
        let slot = &mut self.slots[inst.slot];
        let Ok(states) = slot.map.entry(key, &slot.template, false, usize::MAX) else { return 0 };
        match &states[inst.member] {
            RuleState::Times(l) => l.count_at(at, w),
            RuleState::Distinct(d) => d.count_at(at, w),
            RuleState::Coarse(b) => b.as_ref().map_or(0, |b| b.count_at(at, w)),
        }
    }

    fn push(&mut self, tr: Transition, out: &mut Vec<Transition>) {
        // Not while rebuilding: those transitions were made and counted
        // before (by this process or the one before it).
        if self.emitting {
            metrics::counter!(
                "audit_alerts_total",
                "rule" => tr.rule.clone(),
                "severity" => tr.severity.as_str(),
                "state" => tr.state.as_str()
            )
            .increment(1);
            out.push(tr);
        }
    }

    /// Resolves every episode whose quiet period has passed at `clock`.
    fn sweep(&mut self, clock: EpochMicros, out: &mut Vec<Transition>) {
        let due: Vec<(usize, u64)> = self
            .episodes
            .iter()
            .filter(|(_, ep)| ep.calm_at != EpochMicros::MIN && clock >= ep.calm_at.saturating_add(self.quiet))
            .map(|(k, _)| *k)
            .collect();
        for (i, key) in due {
            if let Some(ep) = self.episodes.remove(&(i, key)) {
                self.emit_resolved(i, key, ep, out);
            }
        }
        self.next_resolution =
            self.episodes.values().map(|ep| ep.calm_at.saturating_add(self.quiet)).min().unwrap_or(EpochMicros::MAX);
    }

    /// Wall-clock housekeeping, about once a second: resolves alerts of a
    /// stream that went quiet (event time advanced by the wall clock since
    /// the newest event), evicts idle keys, publishes gauges.
    pub fn tick(&mut self, out: &mut Vec<Transition>) {
        // The newest event time is stamped with the wall clock here, not per
        // event (a clock read per event costs more than the detection):
        // the quiet-stream clock is exact to one tick.
        if self.max_event_time != self.max_at_last_tick {
            self.max_at_last_tick = self.max_event_time;
            self.wall_at_max = Instant::now();
        }
        if self.max_event_time != EpochMicros::MIN {
            let clock = self.max_event_time.saturating_add(micros(self.wall_at_max.elapsed()));
            self.resolve_until(clock, out);
        }
        if self.last_eviction.elapsed() >= Duration::from_secs(10) {
            self.evict();
            self.last_eviction = Instant::now();
        }
        self.flush_metrics();
    }

    /// Resolves what is due at event-time `clock` (the tick's clock, made
    /// explicit for tests and replays).
    pub fn resolve_until(&mut self, clock: EpochMicros, out: &mut Vec<Transition>) {
        if clock >= self.next_resolution {
            self.sweep(clock, out);
        }
    }

    fn evict(&mut self) {
        if self.max_event_time == EpochMicros::MIN {
            return;
        }
        let Detector { rules, instances, slots, episodes, pending, max_event_time, lateness, .. } = self;
        for slot in slots.iter_mut() {
            // Per member: the window, where it starts now, and (sequence
            // rules) the armed keys rebuilt from what survives.
            let members: Vec<(usize, i64, EpochMicros, Option<usize>)> = slot
                .members
                .iter()
                .map(|&i| {
                    let rule = &rules[instances[i].rule];
                    let w = rule.window_micros;
                    let before = max_event_time.saturating_sub(w).saturating_sub(*lateness);
                    (i, w, before, (rule.kind == RuleKind::Sequence).then_some(rule.min_count as usize))
                })
                .collect();
            let mut armed: Vec<KeySet> = members.iter().map(|_| KeySet::default()).collect();
            let before_count = slot.map.len();
            slot.map.retain(|key, states| {
                let mut live = false;
                for (j, (i, w, before, min_count)) in members.iter().enumerate() {
                    states[j].prune(*before);
                    live |= states[j].newest(*w).is_some_and(|t| t >= *before) || episodes.contains_key(&(*i, key));
                    if let (Some(min), RuleState::Times(list)) = (min_count, &states[j])
                        && list.len() >= *min
                    {
                        armed[j].insert(key);
                    }
                }
                live
            });
            let gone = (before_count - slot.map.len()) as u64;
            for (j, (i, ..)) in members.iter().enumerate() {
                pending.evicted[*i] += gone;
                if let Some(set) = &mut instances[*i].armed {
                    *set = std::mem::take(&mut armed[j]);
                }
            }
        }
    }

    fn flush_metrics(&mut self) {
        let p = &mut self.pending;
        metrics::counter!("audit_detector_late_events_total").increment(std::mem::take(&mut p.late));
        metrics::counter!("audit_detector_duplicate_events_total").increment(std::mem::take(&mut p.duplicates));
        for (i, inst) in self.instances.iter().enumerate() {
            let rule = self.rules[inst.rule].id.clone();
            let labels = [("rule", rule), ("key", inst.key_text.clone())];
            metrics::gauge!("audit_detector_keys", &labels).set(self.slots[inst.slot].map.len() as f64);
            metrics::counter!("audit_detector_evictions_total", &labels).increment(std::mem::take(&mut p.evicted[i]));
            metrics::counter!("audit_detector_keys_dropped_total", &labels)
                .increment(std::mem::take(&mut p.keys_dropped[i]));
        }
        metrics::gauge!("audit_detector_open_alerts").set(self.episodes.len() as f64);
    }

    /// Keys tracked (a key shared by several rules counts once).
    pub fn keys_tracked(&self) -> usize {
        self.slots.iter().map(|s| s.map.len()).sum()
    }

    /// Approximate memory held by per-key state.
    pub fn approx_state_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.map.approx_bytes()).sum::<usize>() + self.recent.approx_bytes()
    }

    /// Approximate memory held by the ids of the lateness window's events
    /// (part of [`Detector::approx_state_bytes`]), and how many there are.
    pub fn recent_events(&self) -> (usize, usize) {
        (self.recent.approx_bytes(), self.recent.len())
    }

    pub fn open_alerts(&self) -> usize {
        self.episodes.len()
    }
}

#[cfg(test)]
mod tests;
