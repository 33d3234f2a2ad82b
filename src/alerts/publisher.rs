//! Sends alert messages to the alerts topic.
//!
//! `AlertPublisher::offer` runs on the consumer thread, right after the
//! detectors: a per-rule storm limiter (governor) lets through at most the
//! configured messages per second. What it holds back is not dropped: once
//! a second, per rule, aggregate alerts carry every transition held back
//! (alert id, subject, state, severity, recommended action; at most
//! [`MAX_HELD_PER_SUMMARY`] each), so that a consumer that locks accounts
//! still gets every account in a storm, in a bounded number of messages.
//! Messages go through a bounded queue to a task that produces them with an
//! idempotent producer, without waiting for one delivery before sending the
//! next, and sends a message Kafka refused again after a backoff.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

use super::{AlertEncoder, AlertMessage, HeldAlert, Withheld};
use crate::detect::{RecommendedAction, Severity, Transition};
use crate::store::{queries, with_causes};

/// Messages waiting for the producer task at most.
const QUEUE: usize = 10_000;
/// Transitions one storm summary carries at most...
pub const MAX_HELD_PER_SUMMARY: usize = 1_000;
/// ...and the bytes of their subjects at most: a summary stays well below
/// Kafka's default 1 MB message limit even with the longest subjects.
const MAX_SUMMARY_SUBJECT_BYTES: usize = 256 * 1024;
/// Transitions held back in memory at most. Only reached when summaries
/// cannot be queued either (Kafka unreachable for long during a storm);
/// beyond it a transition stays undelivered in `alerts`
/// (`audit_alerts_unsent_total`) and is sent at its partition's next
/// assignment.
const MAX_HELD: usize = 100_000;
/// Summary subjects listed for a reader in a hurry.
const SUMMARY_SUBJECTS: usize = 10;

/// A message ready for the topic.
pub struct Outgoing {
    pub key: String,
    pub payload: Vec<u8>,
    pub rule: String,
    /// The stored transitions it carries (alert_id, state): one for a
    /// single alert, every held-back one for a storm summary. Their
    /// delivery is recorded once Kafka acknowledges the message.
    pub transitions: Vec<(Uuid, &'static str)>,
}

/// What the storm limiter held back of one rule since the last summary.
struct HeldBack {
    severity: Severity,
    alerts: Vec<(Uuid, HeldAlert)>,
}

pub struct AlertPublisher {
    encoder: Arc<AlertEncoder>,
    queue: mpsc::Sender<Outgoing>,
    limiter: DefaultKeyedRateLimiter<String>,
    held: BTreeMap<String, HeldBack>,
    held_count: usize,
}

impl AlertPublisher {
    /// The publisher and the receiving end for [`run_sender`].
    pub fn new(encoder: AlertEncoder, per_second: u32, burst: u32) -> (AlertPublisher, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let quota = Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("non-zero"))
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("non-zero"));
        let publisher = AlertPublisher {
            encoder: Arc::new(encoder),
            queue: tx,
            limiter: RateLimiter::keyed(quota),
            held: BTreeMap::new(),
            held_count: 0,
        };
        (publisher, rx)
    }

    /// Offers one transition; true when it went out as a message of its
    /// own (false: held back by the storm limiter, to go out in the rule's
    /// next summary).
    pub fn offer(&mut self, t: &Transition) -> bool {
        if self.limiter.check_key(&t.rule).is_ok() {
            let msg = AlertMessage::from_transition(t);
            if self.enqueue(msg, vec![(t.alert_id, t.state.as_str())]) {
                metrics::counter!("audit_alerts_published_total", "rule" => t.rule.clone()).increment(1);
                return true;
            }
        }
        metrics::counter!("audit_alerts_withheld_total", "rule" => t.rule.clone()).increment(1);
        self.hold_back(t);
        false
    }

    /// Sends again a stored transition Kafka never acknowledged, through
    /// the storm limiter like a new one.
    pub fn resend(&mut self, t: &Transition) {
        metrics::counter!("audit_alerts_resent_total", "rule" => t.rule.clone()).increment(1);
        self.offer(t);
    }

    fn hold_back(&mut self, t: &Transition) {
        if self.held_count >= MAX_HELD {
            metrics::counter!("audit_alerts_unsent_total", "rule" => t.rule.clone()).increment(1);
            return;
        }
        let held =
            self.held.entry(t.rule.clone()).or_insert(HeldBack { severity: Severity::Warning, alerts: Vec::new() });
        held.severity = held.severity.max(t.severity);
        held.alerts.push((t.alert_id, HeldAlert::from_transition(t)));
        self.held_count += 1;
    }

    fn enqueue(&self, msg: AlertMessage, transitions: Vec<(Uuid, &'static str)>) -> bool {
        let out = Outgoing {
            key: msg.key().to_owned(),
            payload: self.encoder.encode(&msg),
            rule: msg.rule.clone(),
            transitions,
        };
        self.queue.try_send(out).is_ok()
    }

    /// Sends, per rule, what was held back since the last call in as many
    /// aggregate alerts as it takes (call about once a second).
    pub fn flush_withheld(&mut self, now: i64) {
        let held = std::mem::take(&mut self.held);
        self.held_count = 0;
        for (rule, HeldBack { severity, mut alerts }) in held {
            let subject = format!("aggregate:{rule}");
            let mut part_index = 0u32;
            while !alerts.is_empty() {
                let part: Vec<(Uuid, HeldAlert)> = alerts.drain(..summary_part_len(&alerts)).collect();
                let subjects = summary_subjects(&part);
                let transitions = part.iter().map(|(id, a)| (*id, a.state)).collect();
                let held: Vec<HeldAlert> = part.iter().map(|(_, a)| a.clone()).collect();
                let part_severity = held.iter().map(|a| Severity::parse(a.severity)).max().unwrap_or(severity);
                let msg = AlertMessage {
                    alert_id: Uuid::new_v5(
                        &Uuid::NAMESPACE_OID,
                        format!("{subject}\u{1f}{now}\u{1f}{part_index}").as_bytes(),
                    )
                    .to_string(),
                    rule: rule.clone(),
                    severity: part_severity.as_str(),
                    state: "firing",
                    subject: subject.clone(),
                    count: held.len() as u64,
                    threshold: 0,
                    window_seconds: 1,
                    episode_start: now,
                    first_event_at: None,
                    last_event_at: None,
                    sample_event_ids: Vec::new(),
                    detected_at: now,
                    recommended_action: RecommendedAction::Investigate.as_str(),
                    withheld: Some(Withheld { count: held.len() as u64, subjects, alerts: held }),
                };
                if self.enqueue(msg, transitions) {
                    metrics::counter!("audit_alert_summaries_total", "rule" => rule.clone()).increment(1);
                    part_index += 1;
                } else {
                    // The producer queue itself is full: keep this part and
                    // the rest for the next summary.
                    let mut rest = part;
                    rest.append(&mut alerts);
                    self.held_count += rest.len();
                    self.held.insert(rule.clone(), HeldBack { severity, alerts: rest });
                    break;
                }
            }
        }
    }
}

/// How many of `alerts` (at least one) the next summary carries.
fn summary_part_len(alerts: &[(Uuid, HeldAlert)]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for (_, a) in alerts.iter().take(MAX_HELD_PER_SUMMARY) {
        bytes += a.subject.len();
        if n > 0 && bytes > MAX_SUMMARY_SUBJECT_BYTES {
            break;
        }
        n += 1;
    }
    n.max(1).min(alerts.len())
}

fn summary_subjects(part: &[(Uuid, HeldAlert)]) -> Vec<String> {
    let mut subjects: Vec<String> = Vec::new();
    for (_, a) in part {
        if subjects.len() == SUMMARY_SUBJECTS {
            break;
        }
        if !subjects.contains(&a.subject) {
            subjects.push(a.subject.clone());
        }
    }
    subjects
}

/// Messages Kafka refused that wait to be sent again, at most; beyond it a
/// refused message's transitions stay undelivered in `alerts` until their
/// partition's next assignment.
const MAX_RETRIES: usize = 10_000;
/// The wait before sending a refused message again, doubled on each
/// refusal up to [`RETRY_BACKOFF_MAX`]. (The producer has already retried
/// it for `message.timeout.ms`.)
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How a produced message ended.
enum Delivery {
    Acknowledged(Vec<(Uuid, &'static str)>),
    Refused(Outgoing, u32),
}

/// A refused message waiting for its next attempt.
struct Retry {
    due: Instant,
    out: Outgoing,
    attempts: u32,
}

/// Produces queued alerts until the publisher is dropped, sends again what
/// Kafka refused (with backoff, while the process lives), and records in
/// `alerts.delivered_at` (through `pool`) which stored transitions Kafka
/// acknowledged.
pub async fn run_sender(mut queue: mpsc::Receiver<Outgoing>, producer: FutureProducer, topic: String, pool: Pool) {
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut retries: VecDeque<Retry> = VecDeque::new();
    // Recorded by a task of its own: a slow database must not hold up the
    // next alert.
    let (acks, acked_rx) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record_deliveries(acked_rx, pool));
    loop {
        let next_retry = retries.front().map(|r| r.due);
        let (out, attempts) = tokio::select! {
            next = queue.recv() => match next {
                Some(out) => (out, 0),
                None => break,
            },
            // Deliveries complete in the background of the same task.
            Some(done) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                settle(done, &acks, &mut retries);
                continue;
            }
            _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                let retry = retries.pop_front().expect("a due retry");
                (retry.out, retry.attempts)
            }
        };
        let delivery = produce(&producer, &topic, &out).await;
        in_flight.push(async move {
            let result = delivery.await;
            if let Ok(Ok(_)) = result {
                return Delivery::Acknowledged(out.transitions);
            }
            metrics::counter!("audit_alert_publish_errors_total", "rule" => out.rule.clone()).increment(1);
            if let Ok(Err((e, _))) = result {
                warn!(error = %e, rule = %out.rule, attempts = attempts + 1, "alert not delivered; will send it again");
            }
            Delivery::Refused(out, attempts + 1)
        });
    }
    // Shutting down: wait for what is in flight (the producer retries until
    // its message timeout), and record those deliveries too. What is still
    // refused stays undelivered in `alerts`, for the next assignment.
    while let Some(done) = futures::StreamExt::next(&mut in_flight).await {
        settle(done, &acks, &mut retries);
    }
    if !retries.is_empty() {
        warn!(messages = retries.len(), "stopping with refused alert messages; they are sent at the next start");
    }
    drop(acks);
    let _ = recorder.await;
}

/// Passes acknowledged transitions on to be recorded; queues a refused
/// message for another attempt.
fn settle(done: Delivery, acks: &mpsc::UnboundedSender<(Uuid, &'static str)>, retries: &mut VecDeque<Retry>) {
    match done {
        Delivery::Acknowledged(transitions) => {
            for t in transitions {
                let _ = acks.send(t);
            }
        }
        Delivery::Refused(out, attempts) => schedule_retry(retries, out, attempts),
    }
}

/// Hands one message to the producer, waiting while its local queue is
/// full (never dropping it).
async fn produce(producer: &FutureProducer, topic: &str, out: &Outgoing) -> DeliveryFuture {
    let mut record = FutureRecord::to(topic).key(&out.key).payload(&out.payload);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return delivery,
            Err((e, back)) => {
                warn!(error = %e, "alert producer queue full; waiting");
                tokio::time::sleep(Duration::from_millis(50)).await;
                record = back;
            }
        }
    }
}

/// Queues a refused message for another attempt after its backoff; when
/// too many wait already, leaves its transitions to the next assignment.
fn schedule_retry(retries: &mut VecDeque<Retry>, out: Outgoing, attempts: u32) {
    if retries.len() >= MAX_RETRIES {
        metrics::counter!("audit_alerts_unsent_total", "rule" => out.rule.clone())
            .increment(out.transitions.len() as u64);
        return;
    }
    let backoff = RETRY_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(6)).min(RETRY_BACKOFF_MAX);
    // Due times only grow along the queue when backoffs are equal; keep it
    // ordered so that the front is always the next one due.
    let due = Instant::now() + backoff;
    let at = retries.partition_point(|r| r.due <= due);
    retries.insert(at, Retry { due, out, attempts });
}

/// Writes the acknowledged transitions to `alerts` every
/// [`RECORD_DELIVERIES_EVERY`], until the sender is done (then once more).
async fn record_deliveries(mut acked: mpsc::UnboundedReceiver<(Uuid, &'static str)>, pool: Pool) {
    let mut log = DeliveryLog::default();
    let mut every = tokio::time::interval(RECORD_DELIVERIES_EVERY);
    loop {
        tokio::select! {
            next = acked.recv() => match next {
                Some(transition) => log.acknowledged(transition),
                None => break,
            },
            _ = every.tick() => log.record(&pool).await,
        }
    }
    log.record(&pool).await;
}

/// How often acknowledged deliveries are written to `alerts`.
const RECORD_DELIVERIES_EVERY: Duration = Duration::from_millis(250);
/// How long an acknowledgement waits for its transition's batch to commit;
/// a batch that never commits is consumed again, and its alert re-detected
/// and sent again.
const ACK_WAITS_AT_MOST: Duration = Duration::from_secs(120);

/// Acknowledged transitions not yet recorded in `alerts`.
#[derive(Default)]
struct DeliveryLog {
    pending: Vec<(Uuid, &'static str, std::time::Instant)>,
}

impl DeliveryLog {
    fn acknowledged(&mut self, (id, state): (Uuid, &'static str)) {
        self.pending.push((id, state, std::time::Instant::now()));
    }

    /// Records what is pending; keeps what is not stored yet (Kafka often
    /// acknowledges before the batch commits) or what failed, for the next
    /// call.
    async fn record(&mut self, pool: &Pool) {
        if self.pending.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = self.pending.iter().map(|p| p.0).collect();
        let states: Vec<&str> = self.pending.iter().map(|p| p.1).collect();
        let found = match pool.get().await {
            Ok(client) => client.query(queries::MARK_ALERTS_DELIVERED, &[&ids, &states]).await,
            Err(e) => {
                debug!(error = %with_causes(&e), "recording alert deliveries: no connection; will retry");
                return;
            }
        };
        match found {
            Ok(rows) => {
                let found: Vec<(Uuid, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                self.pending.retain(|(id, state, since)| {
                    !found.iter().any(|(f, s)| f == id && s == state) && since.elapsed() < ACK_WAITS_AT_MOST
                });
            }
            Err(e) => debug!(error = %with_causes(&e), "recording alert deliveries failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::sample_transition;
    use crate::alerts::view::AlertView;
    use crate::detect::AlertFormat;

    fn transition(i: u128, subject_len: usize) -> Transition {
        let mut t = sample_transition();
        t.alert_id = Uuid::from_u128(i);
        t.subject = format!("user:{i:0>width$}", width = subject_len.saturating_sub(5));
        t
    }

    #[test]
    fn a_storm_is_carried_whole_by_bounded_summaries() {
        let (mut publisher, mut rx) = AlertPublisher::new(AlertEncoder::new(AlertFormat::Json), 1, 1);
        let storm: Vec<Transition> = (0..2_500).map(|i| transition(i, 12)).collect();
        let published: Vec<bool> = storm.iter().map(|t| publisher.offer(t)).collect();
        assert_eq!(published.iter().filter(|p| **p).count(), 1, "the burst of one went out on its own");
        let single = rx.try_recv().unwrap();
        assert_eq!(single.transitions, [(storm[0].alert_id, "escalated")]);
        assert!(rx.try_recv().is_err(), "the rest waits for the summary");

        publisher.flush_withheld(1_800_000_000_000_000);
        let mut carried = Vec::new();
        let mut sizes = Vec::new();
        while let Ok(out) = rx.try_recv() {
            let view = AlertView::decode(&out.payload).unwrap();
            let withheld = view.withheld.expect("a summary");
            assert_eq!(out.key, "aggregate:user_failed_logins");
            assert_eq!(withheld.count as usize, withheld.alerts.len());
            assert_eq!(withheld.subjects.len(), 10);
            let ids: Vec<Uuid> = withheld.alerts.iter().map(|a| a.alert_id.parse().unwrap()).collect();
            assert_eq!(ids, out.transitions.iter().map(|t| t.0).collect::<Vec<_>>(), "acks cover what it carries");
            assert!(withheld.alerts.iter().all(|a| a.recommended_action == "lock_account" && a.state == "escalated"));
            sizes.push(ids.len());
            carried.extend(ids);
        }
        assert_eq!(sizes, [1_000, 1_000, 499]);
        let held: Vec<Uuid> = storm[1..].iter().map(|t| t.alert_id).collect();
        assert_eq!(carried, held, "every held-back transition, once, in order");

        // Nothing left for the next second.
        publisher.flush_withheld(1_800_000_001_000_000);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn long_subjects_make_smaller_summaries() {
        let long: Vec<(Uuid, HeldAlert)> = (0..1_000)
            .map(|i| {
                let t = transition(i, 1_030);
                (t.alert_id, HeldAlert::from_transition(&t))
            })
            .collect();
        assert_eq!(summary_part_len(&long), MAX_SUMMARY_SUBJECT_BYTES / 1_030);
        assert_eq!(summary_part_len(&long[..3]), 3);
        assert_eq!(summary_subjects(&long[..3]).len(), 3);
    }

    #[test]
    fn refused_messages_wait_in_due_order_and_are_bounded() {
        let out = |rule: &str| Outgoing {
            key: "k".into(),
            payload: Vec::new(),
            rule: rule.into(),
            transitions: vec![(Uuid::nil(), "firing")],
        };
        let mut retries = VecDeque::new();
        schedule_retry(&mut retries, out("third"), 3);
        schedule_retry(&mut retries, out("first"), 1);
        schedule_retry(&mut retries, out("second"), 2);
        let rules: Vec<&str> = retries.iter().map(|r| r.out.rule.as_str()).collect();
        assert_eq!(rules, ["first", "second", "third"], "the front is the next one due");
        let waits: Vec<Duration> = retries.iter().map(|r| r.due - Instant::now()).collect();
        assert!(waits[0] <= RETRY_BACKOFF && waits[2] > 2 * RETRY_BACKOFF, "{waits:?}");
        schedule_retry(&mut retries, out("late"), 40);
        assert!(retries.back().unwrap().due - Instant::now() <= RETRY_BACKOFF_MAX);
        while retries.len() < MAX_RETRIES {
            schedule_retry(&mut retries, out("filler"), 1);
        }
        schedule_retry(&mut retries, out("dropped"), 1);
        assert_eq!(retries.len(), MAX_RETRIES, "bounded");
    }
}
