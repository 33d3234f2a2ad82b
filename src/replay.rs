//! `audit-service replay`: runs the detectors of the CURRENT configuration
//! over events already stored in PostgreSQL and prints the alerts they would
//! raise, without publishing anything. Operators tune thresholds with it:
//! change a rule, replay last week, compare.
//!
//! Detection runs on event time, so a replay of the same events gives the
//! alerts the live service gave with the same rules. As on a service start,
//! the rules' longest window before `--from` is read first to warm the
//! windows up, without printing what it raises.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, pin_mut};
use tokio_postgres::types::ToSql;

use crate::alerts::AlertMessage;
use crate::alerts::view::AlertView;
use crate::config::Config;
use crate::detect::{AlertState, DetectConfig, Detector, RuleError, Transition};
use crate::ingest::detection::row_to_event;
use crate::store::{self, StoreError, queries};

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Event time, inclusive.
    pub from: DateTime<Utc>,
    /// Event time, exclusive.
    pub to: DateTime<Utc>,
    /// Only these rules (by id); empty: every enabled rule.
    pub rules: Vec<String>,
    /// Print each alert as the JSON message the service would publish.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("--from ({from}) must be before --to ({to})")]
    EmptyRange { from: DateTime<Utc>, to: DateTime<Utc> },
    #[error("unknown rule `{rule}`; the configuration has: {known}")]
    UnknownRule { rule: String, known: String },
    #[error("detection rules: {0}")]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("the database has no audit_logs table: check DATABASE_URL, or run `audit-service migrate`")]
    NotMigrated,
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    /// Events in the range the rules looked at.
    pub events: u64,
    /// Events before the range read to warm the windows up.
    pub warmup_events: u64,
    /// Per rule: firing, escalated, resolved transitions.
    pub per_rule: BTreeMap<String, [u64; 3]>,
    /// Per rule: the distinct subjects alerted on.
    pub subjects: BTreeMap<String, BTreeSet<String>>,
    pub elapsed: Duration,
}

impl ReplayReport {
    fn count(&mut self, t: &Transition) {
        let slot = match t.state {
            AlertState::Firing => 0,
            AlertState::Escalated => 1,
            AlertState::Resolved => 2,
        };
        self.per_rule.entry(t.rule.clone()).or_default()[slot] += 1;
        self.subjects.entry(t.rule.clone()).or_default().insert(t.subject.clone());
    }

    /// The per-rule table; `rules` are listed even without alerts.
    pub fn print_summary(&self, rules: &[String], opts: &ReplayOptions, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out)?;
        writeln!(
            out,
            "Replayed {} events from {} to {} ({} earlier events warmed the windows up) in {:.1}s; nothing was published.",
            self.events,
            opts.from.to_rfc3339(),
            opts.to.to_rfc3339(),
            self.warmup_events,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(out, "Alerts the current rules would raise, by rule:")?;
        writeln!(out, "  {:<24} {:>7} {:>10} {:>9} {:>9}", "rule", "firing", "escalated", "resolved", "subjects")?;
        let mut all: Vec<&String> = rules.iter().collect();
        all.extend(self.per_rule.keys().filter(|r| !rules.contains(r)));
        for rule in all {
            let c = self.per_rule.get(rule).copied().unwrap_or_default();
            let subjects = self.subjects.get(rule).map_or(0, BTreeSet::len);
            writeln!(out, "  {rule:<24} {:>7} {:>10} {:>9} {:>9}", c[0], c[1], c[2], subjects)?;
        }
        Ok(())
    }
}

/// The detect configuration limited to `only` (ids), every one of which
/// must exist.
pub fn select_rules(detect: &DetectConfig, only: &[String]) -> Result<DetectConfig, ReplayError> {
    let mut detect = detect.clone();
    if only.is_empty() {
        return Ok(detect);
    }
    for id in only {
        if !detect.rules.iter().any(|r| &r.id == id) {
            let known = detect.rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", ");
            return Err(ReplayError::UnknownRule { rule: id.clone(), known });
        }
    }
    for rule in &mut detect.rules {
        rule.enabled = only.contains(&rule.id);
    }
    Ok(detect)
}

/// Replays `[opts.from, opts.to)`: each alert is written to `out` as it is
/// raised (a line, or JSON with `opts.json`); `progress` sees events done
/// and the total.
pub async fn run(
    config: &Config,
    opts: &ReplayOptions,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, ReplayError> {
    if opts.from >= opts.to {
        return Err(ReplayError::EmptyRange { from: opts.from, to: opts.to });
    }
    let detect = select_rules(&config.detect, &opts.rules)?;
    let mut detector = Detector::new(&detect)?;
    let started = Instant::now();

    let pool = store::connect_pool(&config.database, 1)?;
    let client = pool.get().await.map_err(StoreError::from)?;
    let migrated: bool = client.query_one(queries::AUDIT_LOG_EXISTS, &[]).await?.get(0);
    if !migrated {
        return Err(ReplayError::NotMigrated);
    }

    let warm_span = detector.rebuild_span().min(detect.rebuild_window_max);
    let warm_from = opts.from - chrono::Duration::from_std(warm_span).unwrap_or_default();
    let (exact, prefixes) = detector.relevant_actions();
    let total: i64 = client.query_one(queries::REPLAY_COUNT, &[&opts.from, &opts.to, &exact, &prefixes]).await?.get(0);
    let total = total.max(0) as u64;
    progress(0, total);

    // The live detectors' lateness, judged in each partition's offset order.
    let lateness = format!("{} microseconds", detect.lateness.as_micros());
    let params: [&(dyn ToSql + Sync); 5] = [&warm_from, &opts.to, &exact, &prefixes, &lateness];
    let rows = client.query_raw(queries::REPLAY_EVENTS, params).await?;
    pin_mut!(rows);
    let from = opts.from.timestamp_micros();
    let mut report = ReplayReport::default();
    let mut transitions = Vec::new();
    detector.set_emitting(false);
    let mut warming = true;
    while let Some(row) = rows.next().await {
        let row = row?;
        let event = row_to_event(&row);
        if warming && event.occurred_at >= from {
            warming = false;
            detector.set_emitting(true);
        }
        detector.observe(&event, row.get(10), &mut transitions);
        if warming {
            report.warmup_events += 1;
            continue;
        }
        report.events += 1;
        emit(&mut transitions, event.occurred_at, opts.json, out, &mut report)?;
        if report.events.is_multiple_of(1024) {
            progress(report.events, total);
        }
    }
    detector.set_emitting(true);
    // Episodes whose quiet period ends after the last event but inside the
    // range resolve in it (stamped with the range's end).
    let end = opts.to.min(Utc::now()).timestamp_micros();
    detector.resolve_until(end, &mut transitions);
    emit(&mut transitions, end, opts.json, out, &mut report)?;
    progress(report.events, total.max(report.events));
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Writes the transitions raised at event time `clock`. Their
/// `detected_at` is that event time (when the live service would have
/// raised them), not the wall clock of the replay.
fn emit(
    transitions: &mut Vec<Transition>,
    clock: i64,
    json: bool,
    out: &mut dyn Write,
    report: &mut ReplayReport,
) -> std::io::Result<()> {
    for t in transitions.drain(..) {
        let mut message = AlertMessage::from_transition(&t);
        message.detected_at = clock;
        if json {
            out.write_all(&message.to_json())?;
            out.write_all(b"\n")?;
        } else {
            writeln!(out, "{}", AlertView::from(&message).line(true))?;
        }
        report.count(&t);
    }
    Ok(())
}

/// A text progress bar on stderr: redrawn in place on a terminal, a line
/// every few seconds otherwise (logs, CI). Alert lines written through
/// [`ProgressBar::writer`] clear it first when both go to the terminal.
pub struct ProgressBar {
    terminal: bool,
    /// stdout shares the terminal: its lines must not land inside the bar.
    shared: bool,
    started: Instant,
    last_draw: Cell<Option<Instant>>,
    drawn: Cell<bool>,
    last: Cell<(u64, u64)>,
}

impl Default for ProgressBar {
    fn default() -> Self {
        ProgressBar::new()
    }
}

impl ProgressBar {
    const WIDTH: u64 = 30;

    pub fn new() -> ProgressBar {
        let terminal = std::io::stderr().is_terminal();
        ProgressBar {
            terminal,
            shared: terminal && std::io::stdout().is_terminal(),
            started: Instant::now(),
            last_draw: Cell::new(None),
            drawn: Cell::new(false),
            last: Cell::new((0, 0)),
        }
    }

    pub fn update(&self, done: u64, total: u64) {
        self.last.set((done, total));
        let every = if self.terminal { Duration::from_millis(100) } else { Duration::from_secs(5) };
        let finished = done >= total;
        if !finished && self.last_draw.get().is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.draw();
    }

    fn draw(&self) {
        let (done, total) = self.last.get();
        self.last_draw.set(Some(Instant::now()));
        let line = Self::render(done, total, self.started.elapsed());
        let mut err = std::io::stderr().lock();
        let _ = if self.terminal { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
        self.drawn.set(self.terminal);
    }

    /// Ends the bar's line.
    pub fn finish(&self) {
        if self.drawn.get() {
            let _ = writeln!(std::io::stderr());
            self.drawn.set(false);
        }
    }

    /// `out` with the bar moved out of the way of each line written.
    pub fn writer<W: Write>(&self, out: W) -> BarWriter<'_, W> {
        BarWriter { bar: self, out }
    }

    fn render(done: u64, total: u64, elapsed: Duration) -> String {
        // Nothing to do counts as done.
        let filled = (done.min(total) * Self::WIDTH).checked_div(total).unwrap_or(Self::WIDTH);
        let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        format!(
            "[{}{}] {percent:>3}% {done}/{total} events {:.1}s",
            "#".repeat(filled as usize),
            "-".repeat((Self::WIDTH - filled) as usize),
            elapsed.as_secs_f64()
        )
    }
}

/// See [`ProgressBar::writer`].
pub struct BarWriter<'a, W: Write> {
    bar: &'a ProgressBar,
    out: W,
}

impl<W: Write> Write for BarWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bar.shared && self.bar.drawn.get() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.bar.drawn.set(false);
        }
        let n = self.out.write(buf)?;
        if self.bar.shared && buf.ends_with(b"\n") {
            self.out.flush()?;
            self.bar.draw();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_done_out_of_total() {
        assert_eq!(
            ProgressBar::render(50, 200, Duration::from_millis(1500)),
            "[#######-----------------------]  25% 50/200 events 1.5s"
        );
        assert!(ProgressBar::render(0, 0, Duration::ZERO).starts_with("[##############################] 100% 0/0"));
    }

    #[test]
    fn rules_are_selected_by_id() {
        let detect = DetectConfig::default();
        let only = select_rules(&detect, &["ip_password_spraying".into()]).unwrap();
        assert_eq!(only.compile().unwrap().len(), 1);
        assert_eq!(select_rules(&detect, &[]).unwrap().compile().unwrap().len(), 5);
        let err = select_rules(&detect, &["nope".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown rule `nope`") && err.contains("user_failed_logins"), "{err}");
    }
}
