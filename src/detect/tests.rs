//! The rules at their boundaries, the lifecycle, lateness and replay.

use super::*;

const S: i64 = 1_000_000;
const T0: i64 = 1_800_000_000 * S;

struct Feed {
    detector: Detector,
    out: Vec<Transition>,
    n: u128,
}

impl Feed {
    fn new(cfg: DetectConfig) -> Feed {
        Feed { detector: Detector::new(&cfg).unwrap(), out: Vec::new(), n: 0 }
    }

    fn default() -> Feed {
        Feed::new(DetectConfig::default())
    }

    fn event(&mut self, action: &str, user: &str, ip: &str, at: i64) -> AuthEvent {
        self.n += 1;
        AuthEvent {
            event_id: Uuid::from_u128(self.n),
            occurred_at: at,
            action: action.into(),
            user_id: Some(user.into()),
            username: Some(format!("{user}@example.com")),
            ip_address: Some(ip.parse().unwrap()),
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: vec![],
        }
    }

    fn send(&mut self, action: &str, user: &str, ip: &str, at: i64) -> Vec<Transition> {
        let e = self.event(action, user, ip, at);
        self.send_event(&e)
    }

    fn send_event(&mut self, e: &AuthEvent) -> Vec<Transition> {
        let before = self.out.len();
        self.detector.observe(e, 0, &mut self.out);
        self.out[before..].to_vec()
    }

    fn fail(&mut self, user: &str, ip: &str, at: i64) -> Vec<Transition> {
        self.send("FAILED_AUTH_LOGIN", user, ip, at)
    }

    fn of(&self, rule: &str) -> Vec<&Transition> {
        self.out.iter().filter(|t| t.rule == rule).collect()
    }
}

fn only(cfg_rules: &[&str]) -> DetectConfig {
    let mut cfg = DetectConfig::default();
    cfg.rules.retain(|r| cfg_rules.contains(&r.id.as_str()));
    cfg
}

#[test]
fn user_failed_logins_fires_above_5_escalates_above_10() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    for i in 0..5 {
        assert!(f.fail("alice", "10.0.0.1", T0 + i * S).is_empty(), "exactly 5 does not fire");
    }
    let fired = f.fail("alice", "10.0.0.1", T0 + 5 * S);
    assert_eq!(fired.len(), 1);
    let a = &fired[0];
    assert_eq!((a.state, a.severity, a.count, a.threshold), (AlertState::Firing, Severity::Warning, 6, 5));
    assert_eq!(a.subject, "user:alice");
    assert_eq!(a.recommended_action, RecommendedAction::LockAccount);
    assert_eq!(a.first_event_at, Some(T0));
    assert_eq!(a.window_seconds, 60);
    for i in 6..10 {
        assert!(f.fail("alice", "10.0.0.1", T0 + i * S).is_empty(), "one message per transition");
    }
    let esc = f.fail("alice", "10.0.0.1", T0 + 10 * S);
    assert_eq!(esc.len(), 1);
    assert_eq!(
        (esc[0].state, esc[0].severity, esc[0].count, esc[0].threshold),
        (AlertState::Escalated, Severity::Critical, 11, 10)
    );
    assert_eq!(esc[0].alert_id, a.alert_id, "same episode, same id");
    assert_eq!(esc[0].sample_event_ids.len(), MAX_SAMPLES.min(6));
    // Another user is separate.
    assert!(f.fail("bob", "10.0.0.1", T0 + 10 * S).is_empty());
}

#[test]
fn an_event_just_outside_the_window_does_not_count() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    f.fail("alice", "10.0.0.1", T0);
    for i in 1..=5 {
        f.fail("alice", "10.0.0.1", T0 + 60 * S + i);
    }
    // 6 events, but the first is exactly 60 s before the last: (t-60s, t].
    assert!(f.out.is_empty());
    f.fail("alice", "10.0.0.1", T0 + 60 * S + 10);
    assert_eq!(f.out.len(), 1, "six inside the window now");
}

#[test]
fn system_rule_counts_everyone() {
    let mut f = Feed::new(only(&["system_failed_logins"]));
    for i in 0..50 {
        f.fail(&format!("u{i}"), "10.0.0.1", T0 + i * 1000);
    }
    assert!(f.out.is_empty());
    f.fail("u50", "10.0.0.2", T0 + 51_000);
    assert_eq!(f.out.len(), 1);
    assert_eq!((f.out[0].subject.as_str(), f.out[0].severity), ("system", Severity::Warning));
    for i in 51..101 {
        f.fail(&format!("u{i}"), "10.0.0.1", T0 + 52_000 + i);
    }
    assert_eq!(f.out.last().unwrap().severity, Severity::Critical);
    assert_eq!(f.out.len(), 2);
}

#[test]
fn ip_rule_goes_straight_to_critical_above_10_in_an_hour() {
    let mut f = Feed::new(only(&["ip_failed_logins"]));
    for i in 0..10 {
        f.fail(&format!("u{i}"), "203.0.113.9", T0 + i * 300 * S);
    }
    assert!(f.out.is_empty());
    f.fail("u10", "203.0.113.9", T0 + 3000 * S);
    assert_eq!(f.out.len(), 1);
    let a = &f.out[0];
    assert_eq!((a.state, a.severity, a.subject.as_str()), (AlertState::Firing, Severity::Critical, "ip:203.0.113.9"));
    assert_eq!(a.recommended_action, RecommendedAction::BlockIp);
}

#[test]
fn password_spraying_counts_distinct_usernames() {
    let mut f = Feed::new(only(&["ip_password_spraying"]));
    // Many failures for the same 10 usernames: not spraying.
    for round in 0..3 {
        for u in 0..10 {
            f.fail(&format!("u{u}"), "198.51.100.7", T0 + (round * 10 + u) * S);
        }
    }
    assert!(f.out.is_empty());
    f.fail("u10", "198.51.100.7", T0 + 40 * S);
    assert_eq!(f.out.len(), 1);
    assert_eq!((f.out[0].count, f.out[0].severity), (11, Severity::Warning));
}

#[test]
fn brute_force_then_success_needs_five_failures_first() {
    let mut f = Feed::new(only(&["brute_force_success"]));
    for i in 0..4 {
        f.fail("carol", "192.0.2.1", T0 + i * S);
    }
    assert!(f.send("AUTH_LOGIN", "carol", "192.0.2.1", T0 + 5 * S).is_empty(), "4 failures then success");
    f.fail("carol", "192.0.2.1", T0 + 6 * S);
    let hits = f.send("AUTH_LOGIN", "carol", "192.0.2.1", T0 + 7 * S);
    // Keyed by user and by IP: both instances match.
    let subjects: Vec<&str> = hits.iter().map(|t| t.subject.as_str()).collect();
    assert_eq!(subjects, vec!["user:carol", "ip:192.0.2.1"]);
    assert!(hits.iter().all(|t| t.severity == Severity::Critical && t.threshold == 5 && t.count == 5));
    // A success with no failures before it is nothing.
    assert!(f.send("AUTH_LOGIN", "dave", "192.0.2.2", T0 + 8 * S).is_empty());
}

#[test]
fn alert_resolves_after_the_quiet_period_in_event_time() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    for i in 0..6 {
        f.fail("alice", "10.0.0.1", T0 + i * S);
    }
    assert_eq!(f.out.len(), 1);
    // The count drops to 5 at T0 + 60 s (the first failure leaves the
    // window (t - 60 s, t]); the quiet period is 120 s.
    let calm = T0 + 60 * S;
    f.fail("zed", "10.0.0.9", calm + 120 * S - 1);
    assert_eq!(f.out.len(), 1, "not yet");
    f.fail("zed", "10.0.0.9", calm + 120 * S);
    assert_eq!(f.out.len(), 2);
    let r = &f.out[1];
    assert_eq!((r.state, r.alert_id, r.subject.as_str()), (AlertState::Resolved, f.out[0].alert_id, "user:alice"));
    // A new attack later is a new episode with a new id.
    for i in 0..6 {
        f.fail("alice", "10.0.0.1", calm + 200 * S + i);
    }
    assert_eq!(f.out.len(), 3);
    assert_eq!(f.out[2].state, AlertState::Firing);
    assert_ne!(f.out[2].alert_id, f.out[0].alert_id);
}

#[test]
fn a_quiet_stream_resolves_on_the_clock() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    for i in 0..6 {
        f.fail("alice", "10.0.0.1", T0 + i * S);
    }
    let mut out = Vec::new();
    f.detector.resolve_until(T0 + 180 * S - 1, &mut out);
    assert!(out.is_empty());
    f.detector.resolve_until(T0 + 180 * S, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].state, AlertState::Resolved);
}

#[test]
fn allow_listed_subjects_never_alert() {
    let mut cfg = only(&["user_failed_logins", "ip_failed_logins"]);
    cfg.rules[0].allow.users = vec!["svc-probe".into()];
    cfg.rules[1].allow.cidrs = vec!["10.9.0.0/16".parse().unwrap()];
    let mut f = Feed::new(cfg);
    for i in 0..20 {
        f.fail("svc-probe", "10.9.1.1", T0 + i * S);
    }
    assert!(f.out.is_empty(), "{:?}", f.out);
}

#[test]
fn a_rule_added_in_config_fires_as_configured() {
    let toml = r#"
        id = "user_ip_failures"
        kind = "event_count"
        actions = ["@failure"]
        group_by = ["user+ip_address"]
        window = "5m"
        warning = 3
        recommended_action = "investigate"
    "#;
    let rule: RuleConfig = toml::from_str(toml).unwrap();
    let mut cfg = only(&[]);
    cfg.rules.push(rule);
    let mut f = Feed::new(cfg);
    for i in 0..3 {
        f.fail("erin", "10.0.0.1", T0 + i * S);
        f.fail("erin", "10.0.0.2", T0 + i * S);
    }
    assert!(f.out.is_empty());
    f.fail("erin", "10.0.0.2", T0 + 10 * S);
    assert_eq!(f.out.len(), 1);
    assert_eq!(f.out[0].subject, "user:erin|ip:10.0.0.2");
    assert_eq!(f.out[0].rule, "user_ip_failures");
}

#[test]
fn admin_actions_per_admin_with_a_prefix_and_slow_brute_force_in_buckets() {
    let rules: Vec<RuleConfig> = toml::from_str::<toml::Table>(
        r#"
        [[r]]
        id = "admin_actions"
        kind = "event_count"
        actions = ["ADMIN_*"]
        group_by = ["user"]
        window = "1h"
        warning = 20
        recommended_action = "investigate"
        [[r]]
        id = "slow_brute_force"
        kind = "event_count"
        actions = ["@failure"]
        group_by = ["user"]
        window = "24h"
        critical = 50
        recommended_action = "lock_account"
    "#,
    )
    .unwrap()["r"]
        .clone()
        .try_into()
        .unwrap();
    let mut cfg = only(&[]);
    cfg.rules = rules;
    let mut f = Feed::new(cfg);
    for i in 0..21 {
        f.send(if i % 2 == 0 { "ADMIN_ROLE_GRANT" } else { "ADMIN_USER_UPDATE" }, "root", "10.0.0.1", T0 + i * S);
    }
    assert_eq!(f.of("admin_actions").len(), 1);
    // 51 failures spread over 20 hours.
    for i in 0..51 {
        f.fail("frank", "10.0.0.5", T0 + i * 1400 * S);
    }
    let slow = f.of("slow_brute_force");
    assert_eq!(slow.len(), 1);
    assert_eq!(slow[0].severity, Severity::Critical);
}

#[test]
fn out_of_order_within_lateness_counts_later_ones_do_not() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    for i in 0..5 {
        f.fail("gina", "10.0.0.1", T0 + 10 * S + i * S);
    }
    // 20 s late (lateness is 30 s) but inside the window: counts.
    f.fail("gina", "10.0.0.1", T0 + 14 * S - 20 * S + 25 * S);
    assert_eq!(f.out.len(), 1);
    let mut g = Feed::new(only(&["user_failed_logins"]));
    g.fail("hank", "10.0.0.1", T0 + 100 * S);
    for i in 0..5 {
        g.fail("hank", "10.0.0.1", T0 + 100 * S - 31 * S - i);
    }
    assert!(g.out.is_empty(), "events later than the lateness trigger nothing");
    assert_eq!(g.detector.pending.late, 5);
}

#[test]
fn a_retried_event_counts_once_as_in_the_stored_log() {
    let mut g = Feed::default();
    // Five failures, each sent twice (a producer retry: same event_id),
    // the retries a little out of order: five stored events, no alert
    // (the warning needs more than five).
    let sent: Vec<AuthEvent> = (0..5).map(|i| g.event("FAILED_AUTH_LOGIN", "u1", "10.0.0.1", T0 + i * S)).collect();
    for e in &sent {
        g.send_event(e);
    }
    for e in sent.iter().rev() {
        g.send_event(e);
    }
    assert!(g.of("user_failed_logins").is_empty(), "{:?}", g.out);
    assert_eq!(g.detector.pending.duplicates, 5);
    // The sixth distinct failure fires, with a count of six.
    let fired = g.fail("u1", "10.0.0.1", T0 + 6 * S);
    assert_eq!(fired.iter().find(|t| t.rule == "user_failed_logins").map(|t| t.count), Some(6));
    // A retry older than the lateness is late, not a duplicate.
    g.fail("u1", "10.0.0.1", T0 + 60 * S);
    g.send_event(&sent[0]);
    assert_eq!((g.detector.pending.duplicates, g.detector.pending.late), (5, 1));
}

#[test]
fn replaying_the_same_input_gives_the_same_alert_ids() {
    let run = || {
        let mut f = Feed::default();
        let mut rng = crate::loadgen::Rng::new(5);
        for i in 0..20_000 {
            let user = format!("u{}", rng.below(50));
            let ip = format!("10.0.0.{}", rng.below(20));
            let action = if rng.below(10) < 7 { "FAILED_AUTH_LOGIN" } else { "AUTH_LOGIN" };
            f.send(action, &user, &ip, T0 + i * 50_000);
        }
        f.out.iter().map(|t| (t.alert_id, t.state, t.rule.clone())).collect::<Vec<_>>()
    };
    let a = run();
    assert!(a.len() > 10, "the mix produces alerts: {}", a.len());
    assert_eq!(a, run());
}

#[test]
fn restored_episodes_are_continued_not_reopened() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    for i in 0..6 {
        f.fail("ivy", "10.0.0.1", T0 + i * S);
    }
    let first = f.out[0].clone();
    // A new detector (after a restart) restored from the database, then
    // fed the same stored events without emitting.
    let mut g = Feed::new(only(&["user_failed_logins"]));
    g.detector.restore(vec![OpenEpisode {
        alert_id: first.alert_id,
        rule: first.rule.clone(),
        key_spec: first.key_spec.clone(),
        key_hash: first.key_hash,
        subject: first.subject.clone(),
        state: AlertState::Firing,
        severity: Severity::Warning,
        episode_start: first.episode_start,
        last_event_at: T0 + 5 * S,
        partition: first.partition,
    }]);
    g.detector.set_emitting(false);
    for i in 0..6 {
        g.fail("ivy", "10.0.0.1", T0 + i * S);
    }
    g.detector.set_emitting(true);
    assert!(g.out.is_empty());
    // The attack goes on after the restart: escalation under the same id.
    for i in 6..11 {
        g.fail("ivy", "10.0.0.1", T0 + i * S);
    }
    assert_eq!(g.out.len(), 1);
    assert_eq!((g.out[0].state, g.out[0].alert_id), (AlertState::Escalated, first.alert_id));
}

#[test]
fn transitions_carry_the_partition_and_forget_all_drops_state_silently() {
    let mut f = Feed::new(only(&["user_failed_logins"]));
    let mut out = Vec::new();
    for i in 0..6 {
        let e = f.event("FAILED_AUTH_LOGIN", "uma", "10.0.0.1", T0 + i * S);
        f.detector.observe(&e, 3, &mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].state, out[0].partition), (AlertState::Firing, 3));
    // Revoked: state and episode are gone, nothing is emitted, not even the
    // resolution a quiet stream would bring.
    f.detector.forget_all();
    out.clear();
    f.detector.resolve_until(T0 + 3600 * S, &mut out);
    assert!(out.is_empty());
    // Counting starts afresh (the next owner's rebuild brings the history).
    for i in 0..5 {
        let e = f.event("FAILED_AUTH_LOGIN", "uma", "10.0.0.1", T0 + (10 + i) * S);
        f.detector.observe(&e, 3, &mut out);
    }
    assert!(out.is_empty(), "5 failures after forgetting are below the warning level: {out:?}");
    let e = f.event("FAILED_AUTH_LOGIN", "uma", "10.0.0.1", T0 + 15 * S);
    f.detector.observe(&e, 3, &mut out);
    assert_eq!(out.len(), 1, "a new episode, after six failures since");
}

#[test]
fn per_key_state_stays_bounded_under_attack() {
    let mut f = Feed::new(only(&["user_failed_logins", "ip_password_spraying"]));
    for i in 0..10_000 {
        f.fail("target", "198.51.100.1", T0 + i * 1000);
        f.fail(&format!("sprayed{i}"), "198.51.100.2", T0 + i * 1000);
    }
    let mut checked = 0;
    for slot in &mut f.detector.slots {
        for key in slot.map.keys() {
            let states = slot.map.entry(key, &slot.template, false, usize::MAX).unwrap();
            for state in states.iter() {
                match state {
                    window::RuleState::Times(l) => assert!(l.len() <= 11),
                    window::RuleState::Distinct(d) => assert!(d.count_at(i64::MAX / 2, i64::MAX / 2) <= 11),
                    window::RuleState::Coarse(_) => {}
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000);
}
