//! `audit-service demo` as a user runs it: the binary as a child process on
//! its own fresh database, its output read line by line while it runs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{TestDb, rt, unique};

const RULES: [&str; 5] =
    ["user_failed_logins", "system_failed_logins", "ip_failed_logins", "ip_password_spraying", "brute_force_success"];

/// A database name the demo accepts (it must contain `demo`), not created
/// yet: the demo creates it; the guard drops it when the test ends.
fn demo_database() -> TestDb {
    let name = unique("audit_demo_test");
    TestDb { url: format!("postgres://postgres@127.0.0.1:5432/{name}"), name }
}

/// The binary with none of the caller's service configuration.
fn audit_service() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_audit-service"));
    for (name, _) in std::env::vars() {
        if name.starts_with("AUDIT__")
            || ["DATABASE_URL", "KAFKA_BROKERS", "RUST_LOG", "ADMIN_TOKEN"].contains(&name.as_str())
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The demo running, its stdout collected line by line.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Demo {
    fn spawn(database_url: &str, args: &[&str]) -> Demo {
        let mut child = audit_service()
            .arg("demo")
            .args(args)
            .env("DATABASE_URL", database_url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn audit-service demo");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        Demo { child, lines, seen: Vec::new(), stderr: Some(stderr) }
    }

    /// The first line (from the start) that satisfies `pred`, waiting for
    /// it until `timeout`.
    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("no such line within {timeout:?}; output so far:\n{}", self.seen.join("\n"));
    }

    /// Waits for the exit; the whole stdout and stderr.
    fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the demo did not end within {timeout:?}; output:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stderr = self.stderr.take().map(|t| t.join().unwrap()).unwrap_or_default();
        (status, self.seen.join("\n"), stderr)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Events: N produced (M acknowledged by Kafka), S stored ...` → (M, S).
fn acknowledged_and_stored(output: &str) -> (u64, u64) {
    let line = output.lines().find(|l| l.starts_with("Events: ")).expect("a summary line of events");
    let numbers: Vec<u64> =
        line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    (numbers[1], numbers[2])
}

fn alert_lines<'a>(output: &'a str, rule: &str) -> Vec<&'a str> {
    output.lines().filter(|l| l.starts_with("ALERT ") && l.split_whitespace().any(|w| w == rule)).collect()
}

#[test]
fn the_demo_raises_every_rule_serves_the_api_and_stores_its_events() {
    let db = demo_database();
    let mut demo = Demo::spawn(&db.url, &["--duration", "20s", "--listen", "127.0.0.1:0"]);

    // While it runs, the API answers with the printed token (and only with it).
    let token = demo.wait_for(Duration::from_secs(60), |l| l.trim_start().starts_with("Admin token"));
    let token = token.split_whitespace().last().unwrap().to_owned();
    let api = demo.wait_for(Duration::from_secs(5), |l| l.trim_start().starts_with("API "));
    let health_url = api.split_whitespace().nth(1).unwrap().to_owned();
    assert!(health_url.ends_with("/api/v1/audit/health"), "{api}");
    let security_url = health_url.replace("/health", "/security");
    let http = reqwest::blocking::Client::new();
    let with_token = http.get(&security_url).bearer_auth(&token).send().unwrap();
    assert_eq!(with_token.status(), 200, "{:?}", with_token.text());
    assert_eq!(http.get(&security_url).send().unwrap().status(), 401);
    let metrics = http.get(health_url.replace("/api/v1/audit/health", "/metrics")).send().unwrap();
    assert_eq!(metrics.status(), 200);

    let (status, output, stderr) = demo.finish(Duration::from_secs(120));
    assert!(status.success(), "demo failed: {status}\n{output}\nstderr:\n{stderr}");

    // An alert of every rule, each as one readable line.
    for rule in RULES {
        let lines = alert_lines(&output, rule);
        assert!(
            lines.iter().any(|l| l.contains(" FIRING ")),
            "no alert of {rule} fired; output:\n{output}\nstderr:\n{stderr}"
        );
    }
    // Escalations of the brute force and of the spike.
    assert!(alert_lines(&output, "user_failed_logins").iter().any(|l| l.contains(" ESCALATED critical ")), "{output}");
    assert!(
        alert_lines(&output, "system_failed_logins").iter().any(|l| l.contains(" ESCALATED critical ")),
        "{output}"
    );

    // The summary: every event acknowledged by Kafka was stored.
    assert!(output.contains("== Summary"), "{output}");
    let (acknowledged, stored) = acknowledged_and_stored(&output);
    assert!(acknowledged > 300, "{output}");
    assert_eq!(stored, acknowledged, "{output}");
    for rule in RULES {
        assert!(output.lines().any(|l| l.trim_start().starts_with(rule)), "summary lacks {rule}:\n{output}");
    }
    assert!(output.contains(&format!("Bearer {token}")), "no curl line with the token:\n{output}");
    assert!(output.contains("/metrics"), "{output}");

    // The events and alerts are in PostgreSQL afterwards.
    rt().block_on(async {
        let events = db.count("SELECT count(*) FROM audit_logs").await;
        assert_eq!(events as u64, stored);
        let client = db.client().await;
        let rules: Vec<String> =
            client.query("SELECT DISTINCT rule FROM alerts", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        for rule in RULES {
            assert!(rules.iter().any(|r| r == rule), "no {rule} in the alerts table: {rules:?}");
        }
    });
}

#[test]
fn ctrl_c_stops_the_demo_cleanly_after_storing_what_it_produced() {
    let db = demo_database();
    let mut demo = Demo::spawn(&db.url, &["--duration", "10m", "--listen", "127.0.0.1:0"]);
    // The first attack comes 9 s in; its alerts show the pipeline works.
    demo.wait_for(Duration::from_secs(90), |l| l.starts_with("ALERT "));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc_kill(demo.child.id() as i32, 2) };
    let (status, output, stderr) = demo.finish(Duration::from_secs(60));
    assert!(status.success(), "{status}\n{output}\nstderr:\n{stderr}");
    assert!(output.contains("interrupted"), "{output}");
    assert!(output.contains("== Summary"), "{output}");
    let (acknowledged, stored) = acknowledged_and_stored(&output);
    assert!(acknowledged > 0);
    assert_eq!(stored, acknowledged, "events produced before Ctrl-C were not all stored:\n{output}");
    assert!(output.trim_end().ends_with("demo stopped"), "{output}");
}

#[test]
fn the_demo_never_writes_to_a_database_not_meant_for_it() {
    let out = audit_service()
        .args(["demo", "--duration", "1s", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/audit")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to write synthetic events to database `audit`"), "{stderr}");
}

#[test]
fn the_demo_says_clearly_when_no_postgresql_answers() {
    let started = Instant::now();
    let out = audit_service()
        .args(["demo", "--duration", "1s", "--listen", "127.0.0.1:0"])
        // Nothing listens on port 1.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/audit_demo")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PostgreSQL does not answer for postgres://postgres@127.0.0.1:1/audit_demo"), "{stderr}");
    assert!(stderr.contains("Start PostgreSQL"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
