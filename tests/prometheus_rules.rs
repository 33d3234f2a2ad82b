//! The Prometheus configuration and alerting rules shipped in
//! `config/prometheus/`, and `docker-compose.yml`: the same checks as CI's
//! `.ci/run`, so that `cargo test` covers them too.
//!
//! - `promtool check config`, `promtool check rules`, `promtool test rules`
//!   (skipped, with a message, when promtool is not installed);
//! - every alert in rules.yml has unit tests that see it fire at each of its
//!   severities and tests that see it stay silent;
//! - `scripts/check-compose.sh` (PyYAML, and `docker compose config` where
//!   a Compose implementation is installed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn prometheus_dir() -> PathBuf {
    repo().join("config/prometheus")
}

/// Runs `program args` in the repository and fails the test with its output
/// unless it succeeds.
fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{program} {}` failed ({}):\n{stdout}\n{stderr}", args.join(" "), out.status);
    print!("{stdout}");
}

/// True when promtool can be run; otherwise says why the test is skipped.
fn promtool_available(test: &str) -> bool {
    match Command::new("promtool").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            println!("SKIPPED {test}: promtool is not installed (Debian package `prometheus`)");
            false
        }
    }
}

#[test]
fn prometheus_config_is_valid() {
    if !promtool_available("prometheus_config_is_valid") {
        return;
    }
    // rule_files are resolved relative to prometheus.yml, so this also loads
    // rules.yml exactly as Prometheus in docker-compose does.
    run_ok("promtool", &["check", "config", "config/prometheus/prometheus.yml"]);
}

#[test]
fn alerting_rules_are_valid() {
    if !promtool_available("alerting_rules_are_valid") {
        return;
    }
    run_ok("promtool", &["check", "rules", "config/prometheus/rules.yml"]);
}

#[test]
fn alerting_rule_unit_tests_pass() {
    if !promtool_available("alerting_rule_unit_tests_pass") {
        return;
    }
    run_ok("promtool", &["test", "rules", "config/prometheus/rules_test.yml"]);
}

/// `(alert, severity)` pairs defined in rules.yml, and every alert's
/// runbook_url.
/// (alert, severity) pairs, and per alert its severities.
type AlertIndex = (BTreeSet<(String, String)>, BTreeMap<String, BTreeSet<String>>);

fn defined_alerts(rules: &str) -> AlertIndex {
    let mut pairs = BTreeSet::new();
    let mut runbooks: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in rules.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alert:") {
            current = Some(name.trim().to_owned());
        } else if t.starts_with("- record:") {
            current = None;
        } else if let (Some(alert), Some(sev)) = (&current, t.strip_prefix("severity:")) {
            pairs.insert((alert.clone(), sev.trim().to_owned()));
        } else if let (Some(alert), Some(url)) = (&current, t.strip_prefix("runbook_url:")) {
            runbooks.entry(alert.clone()).or_default().insert(url.trim().trim_matches('"').to_owned());
        }
    }
    (pairs, runbooks)
}

/// From rules_test.yml: `(alert, severity)` seen firing, and alerts with a
/// case expecting no alert. The file uses no YAML anchors, so that each
/// case's expectations are written out under its `- alertname:` line.
fn tested_alerts(tests: &str) -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut current: Option<String> = None;
    for line in tests.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alertname:") {
            current = Some(name.trim().to_owned());
        } else if t.starts_with("- name:")
            || t.starts_with("- expr:")
            || t.starts_with("input_series:")
            || t.starts_with("promql_expr_test:")
        {
            current = None;
        } else if let Some(alert) = &current {
            if t == "exp_alerts: []" {
                silent.insert(alert.clone());
            } else if let Some(sev) = t.strip_prefix("severity:") {
                firing.insert((alert.clone(), sev.trim().to_owned()));
            }
        }
    }
    (firing, silent)
}

#[test]
fn every_alert_is_tested_firing_and_silent_with_a_runbook_link() {
    let rules = std::fs::read_to_string(prometheus_dir().join("rules.yml")).unwrap();
    let tests = std::fs::read_to_string(prometheus_dir().join("rules_test.yml")).unwrap();
    assert!(
        !tests.lines().any(|l| l.contains(": &") || l.trim_start().starts_with("- *") || l.contains(": *")),
        "rules_test.yml must not use YAML anchors (this test reads it line by line)"
    );
    let (defined, runbooks) = defined_alerts(&rules);
    assert!(defined.len() >= 8, "too few alerts parsed from rules.yml: {defined:?}");
    let (firing, silent) = tested_alerts(&tests);

    let untested_firing: Vec<_> = defined.difference(&firing).collect();
    assert!(untested_firing.is_empty(), "no unit test sees these fire (alert, severity): {untested_firing:?}");
    let alerts: BTreeSet<String> = defined.iter().map(|(a, _)| a.clone()).collect();
    let untested_silent: Vec<_> = alerts.difference(&silent).collect();
    assert!(untested_silent.is_empty(), "no unit test expects these to stay silent: {untested_silent:?}");
    let unknown: Vec<_> = firing.difference(&defined).collect();
    assert!(unknown.is_empty(), "tests expect alerts/severities that rules.yml does not define: {unknown:?}");

    for alert in &alerts {
        let urls = runbooks.get(alert).cloned().unwrap_or_default();
        assert!(!urls.is_empty(), "{alert} has no runbook_url");
        for url in urls {
            assert!(url.starts_with("docs/RUNBOOK.md#"), "{alert}: runbook_url {url} is not a docs/RUNBOOK.md anchor");
        }
    }
}

#[test]
fn alertmanager_routes_every_rule_and_the_dashboard_queries_are_valid() {
    let amtool = Command::new("amtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !amtool {
        println!("SKIPPED: amtool is not installed (Debian package `prometheus-alertmanager`)");
        return;
    }
    if !promtool_available("alertmanager_routes_every_rule_and_the_dashboard_queries_are_valid") {
        return;
    }
    run_ok("bash", &["scripts/check-alerting.sh"]);
}

#[test]
fn docker_compose_is_consistent() {
    run_ok("bash", &["scripts/check-compose.sh"]);
}
