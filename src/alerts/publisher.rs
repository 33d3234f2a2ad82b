//! Sends alert messages to the alerts topic.
//!
//! `AlertPublisher::offer` runs on the consumer thread, right after the
//! detectors: a per-rule storm limiter (governor) lets through at most the
//! configured messages per second; what it holds back is counted and
//! summarised once a second in an aggregate alert per rule, never dropped
//! silently. Messages go through a bounded queue to a task that produces
//! them with an idempotent producer, without waiting for one delivery
//! before sending the next.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use uuid::Uuid;

use super::{AlertEncoder, AlertMessage, Withheld};
use crate::detect::{RecommendedAction, Severity, Transition};
use crate::store::{queries, with_causes};

/// Messages waiting for the producer task at most.
const QUEUE: usize = 10_000;
const MAX_WITHHELD_SUBJECTS: usize = 10;

/// A message ready for the topic.
pub struct Outgoing {
    pub key: String,
    pub payload: Vec<u8>,
    pub rule: String,
    /// The stored transition it carries (alert_id, state), whose delivery
    /// is recorded once Kafka acknowledges it; None for storm summaries,
    /// which are not stored.
    pub transition: Option<(Uuid, &'static str)>,
}

struct WithheldSummary {
    count: u64,
    subjects: Vec<String>,
    severity: Severity,
}

pub struct AlertPublisher {
    encoder: Arc<AlertEncoder>,
    queue: mpsc::Sender<Outgoing>,
    limiter: DefaultKeyedRateLimiter<String>,
    withheld: BTreeMap<String, WithheldSummary>,
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
            withheld: BTreeMap::new(),
        };
        (publisher, rx)
    }

    /// Offers one transition; true when it went out (false: withheld by
    /// the storm limiter, to be summarised).
    pub fn offer(&mut self, t: &Transition) -> bool {
        if self.limiter.check_key(&t.rule).is_ok() {
            let msg = AlertMessage::from_transition(t);
            if self.enqueue(msg, Some((t.alert_id, t.state.as_str()))) {
                metrics::counter!("audit_alerts_published_total", "rule" => t.rule.clone()).increment(1);
                return true;
            }
        }
        metrics::counter!("audit_alerts_withheld_total", "rule" => t.rule.clone()).increment(1);
        let summary = self.withheld.entry(t.rule.clone()).or_insert(WithheldSummary {
            count: 0,
            subjects: Vec::new(),
            severity: Severity::Warning,
        });
        summary.count += 1;
        summary.severity = summary.severity.max(t.severity);
        if summary.subjects.len() < MAX_WITHHELD_SUBJECTS && !summary.subjects.contains(&t.subject) {
            summary.subjects.push(t.subject.clone());
        }
        false
    }

    /// Sends again a stored transition Kafka never acknowledged (the
    /// storm limiter let it out the first time); false when the queue is
    /// full (it stays undelivered, for the next assignment).
    pub fn resend(&mut self, t: &Transition) -> bool {
        let sent = self.enqueue(AlertMessage::from_transition(t), Some((t.alert_id, t.state.as_str())));
        if sent {
            metrics::counter!("audit_alerts_resent_total", "rule" => t.rule.clone()).increment(1);
        }
        sent
    }

    fn enqueue(&self, msg: AlertMessage, transition: Option<(Uuid, &'static str)>) -> bool {
        let out = Outgoing {
            key: msg.key().to_owned(),
            payload: self.encoder.encode(&msg),
            rule: msg.rule.clone(),
            transition,
        };
        self.queue.try_send(out).is_ok()
    }

    /// Sends one aggregate alert per rule for what was withheld since the
    /// last call (call about once a second).
    pub fn flush_withheld(&mut self, now: i64) {
        let withheld = std::mem::take(&mut self.withheld);
        for (rule, summary) in withheld {
            let subject = format!("aggregate:{rule}");
            let msg = AlertMessage {
                alert_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("{subject}\u{1f}{now}").as_bytes()).to_string(),
                rule: rule.clone(),
                severity: summary.severity.as_str(),
                state: "firing",
                subject,
                count: summary.count,
                threshold: 0,
                window_seconds: 1,
                episode_start: now,
                first_event_at: None,
                last_event_at: None,
                sample_event_ids: Vec::new(),
                detected_at: now,
                recommended_action: RecommendedAction::Investigate.as_str(),
                withheld: Some(Withheld { count: summary.count, subjects: summary.subjects.clone() }),
            };
            if self.enqueue(msg, None) {
                metrics::counter!("audit_alert_summaries_total", "rule" => rule).increment(1);
            } else {
                // The producer queue itself is full: keep counting for the
                // next summary.
                self.withheld.insert(rule, summary);
            }
        }
    }
}

/// Produces queued alerts until the publisher is dropped, and records in
/// `alerts.delivered_at` (through `pool`) which stored transitions Kafka
/// acknowledged.
pub async fn run_sender(mut queue: mpsc::Receiver<Outgoing>, producer: FutureProducer, topic: String, pool: Pool) {
    let mut in_flight = futures::stream::FuturesUnordered::new();
    // Recorded by a task of its own: a slow database must not hold up the
    // next alert.
    let (acks, acked_rx) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record_deliveries(acked_rx, pool));
    loop {
        let out = tokio::select! {
            next = queue.recv() => match next {
                Some(out) => out,
                None => break,
            },
            // Deliveries complete in the background of the same task.
            Some(acked) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                if let Some(transition) = acked {
                    let _ = acks.send(transition);
                }
                continue;
            }
        };
        let mut record = FutureRecord::to(&topic).key(&out.key).payload(&out.payload);
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((e, back)) => {
                    // Local queue full: wait for room, do not drop.
                    warn!(error = %e, "alert producer queue full; waiting");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    record = back;
                }
            }
        };
        let (rule, transition) = (out.rule, out.transition);
        in_flight.push(async move {
            match delivery.await {
                Ok(Ok(_)) => transition,
                Ok(Err((e, _))) => {
                    metrics::counter!("audit_alert_publish_errors_total", "rule" => rule).increment(1);
                    warn!(error = %e, "alert not delivered");
                    None
                }
                Err(_) => {
                    metrics::counter!("audit_alert_publish_errors_total", "rule" => rule).increment(1);
                    None
                }
            }
        });
    }
    // Shutting down: wait for what is in flight (the producer retries until
    // its message timeout), and record those deliveries too.
    while let Some(acked) = futures::StreamExt::next(&mut in_flight).await {
        if let Some(transition) = acked {
            let _ = acks.send(transition);
        }
    }
    drop(acks);
    let _ = recorder.await;
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
