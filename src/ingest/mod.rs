//! Ingest: Kafka events topic → decode/validate → batches → PostgreSQL, with
//! a dead-letter topic, exactly-once offsets and backpressure.
//!
//! ```text
//!  consumer thread (consumer.rs)          writer task (writer.rs)
//!  poll → decode → BatchBuilder ──queue──► DLQ produce → one transaction:
//!       ▲  (bounded: full → pause)          rows + dead_letters + offsets
//!       └──────── committed / fenced ◄──────┘
//! ```

pub mod batch;
pub mod consumer;
pub mod detection;
pub mod dlq;
pub mod maintenance;
pub mod routed;
pub mod router;
pub mod status;
pub mod writer;

use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::activity::hll::ActiveUsers;
use crate::alerts::AlertEncoder;
use crate::alerts::publisher::{AlertPublisher, run_sender};
use crate::config::Config;
use crate::detect::{Detector, routing};
use crate::event::Decoder;
use crate::kafka;
use consumer::{ContextSettings, IngestContext};
use detection::Detection;
use router::Router;
use status::IngestStatus;
use writer::{BatchWriter, WriterSettings};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("starting the consumer thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("detection rules: {0}")]
    Rules(#[from] crate::detect::RuleError),
    #[error("detect.routing_topic `{topic}`: {message}")]
    RoutingTopic { topic: String, message: String },
}

/// The running pipeline; `join` waits until it has flushed and stopped.
pub struct IngestHandle {
    consumer_thread: std::thread::JoinHandle<()>,
    writer_tasks: Vec<tokio::task::JoinHandle<()>>,
    alert_sender: Option<tokio::task::JoinHandle<()>>,
    /// The routed detectors' consumer thread and alert sender (routed
    /// detection on).
    routed: Option<(std::thread::JoinHandle<()>, tokio::task::JoinHandle<()>)>,
}

impl IngestHandle {
    pub async fn join(self) {
        let consumer = tokio::task::spawn_blocking(move || self.consumer_thread.join());
        if let Ok(Err(panic)) = consumer.await {
            tracing::error!(?panic, "consumer thread panicked");
        }
        for task in self.writer_tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "writer task failed");
            }
        }
        if let Some(sender) = self.alert_sender
            && let Err(e) = sender.await
        {
            tracing::error!(error = %e, "alert sender failed");
        }
        if let Some((thread, sender)) = self.routed {
            if let Ok(Err(panic)) = tokio::task::spawn_blocking(move || thread.join()).await {
                tracing::error!(?panic, "routed consumer thread panicked");
            }
            if let Err(e) = sender.await {
                tracing::error!(error = %e, "routed alert sender failed");
            }
        }
    }
}

/// Starts the consumer thread and the writer task. Cancel `cancel` to stop:
/// the open batch is flushed, offsets stored, the group left.
pub fn start(
    config: &Config,
    pool: Pool,
    decoder: Decoder,
    status: Arc<IngestStatus>,
    cancel: CancellationToken,
) -> Result<IngestHandle, IngestError> {
    let k = &config.kafka;
    let i = &config.ingest;
    let (events_tx, events_rx) = std::sync::mpsc::channel();

    let dlq_producer: FutureProducer = kafka::producer_config(k).create()?;
    let dlq = dlq::DeadLetterProducer::new(
        dlq_producer,
        k.dlq_topic.clone(),
        k.events_topic.clone(),
        k.produce_timeout,
        k.dlq_max_payload_bytes,
    );
    // Routed detection: rules keyed by IP or system-wide go through the
    // routing topic (src/detect/routing.rs); the rest stay here.
    let routing = match (&config.detect.routing_topic, config.detect.enabled) {
        (Some(topic), true) => {
            let split = routing::split(&config.detect)?;
            let producer: FutureProducer = kafka::producer_config(k).create()?;
            let partitions = topic_partitions(&producer, topic, k.produce_timeout)?;
            let router = Router::new(producer, topic.clone(), partitions, Arc::new(split.routed), k.produce_timeout);
            Some((split.local, router))
        }
        _ => None,
    };
    let local_rules = routing.as_ref().map_or_else(|| config.detect.clone(), |(local, _)| local.clone());

    // One writer per lane, each with its own connection and queue.
    let active_users = Arc::new(Mutex::new(ActiveUsers::default()));
    let mut senders = Vec::new();
    let mut writer_tasks = Vec::new();
    for _ in 0..i.writers.max(1) {
        let (commands_tx, commands_rx) = mpsc::channel(i.max_queued_batches);
        let writer = BatchWriter::new(
            pool.clone(),
            dlq.clone(),
            routing.as_ref().map(|(_, router)| router.clone()),
            WriterSettings {
                activity: config.activity.enabled.then(|| config.activity.clone()),
                group: k.group_id.clone(),
                topic: k.events_topic.clone(),
                failure_actions: config.detect.failure_actions.clone(),
                method: i.insert_method,
                initial_backoff: i.retry_initial_backoff,
                max_backoff: i.retry_max_backoff,
            },
            status.clone(),
            events_tx.clone(),
            active_users.clone(),
        );
        writer_tasks.push(tokio::spawn(writer.run(commands_rx)));
        senders.push(commands_tx);
    }
    drop(events_tx);

    let (detection, alert_sender) = if config.detect.enabled {
        let detector = Detector::new(&local_rules)?;
        let (publisher, sender) = alert_publisher(config, &pool)?;
        let source = (k.group_id.as_str(), k.events_topic.as_str());
        (Some(Detection::new(detector, publisher, source, config.detect.rebuild_window_max)), Some(sender))
    } else {
        (None, None)
    };

    let (pool_for_routed, routed_cancel) = (pool.clone(), cancel.clone());
    let context = IngestContext::new(
        tokio::runtime::Handle::current(),
        pool,
        ContextSettings {
            group: k.group_id.clone(),
            topic: k.events_topic.clone(),
            batch_max_rows: i.batch_max_rows,
            batch_max_age: i.batch_max_age,
            drain_timeout: i.drain_timeout,
            initial_backoff: i.retry_initial_backoff,
            max_backoff: i.retry_max_backoff,
        },
        senders,
        status.clone(),
        detection,
        cancel,
    );
    let consumer: BaseConsumer<IngestContext> = kafka::consumer_config(k).create_with_context(context)?;
    consumer.subscribe(&[&k.events_topic])?;

    let consumer_thread = std::thread::Builder::new()
        .name("ingest-consumer".into())
        .spawn(move || consumer::run_loop(consumer, decoder, events_rx))?;

    let routed = match routing {
        Some((_, router)) => {
            let (publisher, sender) = alert_publisher(config, &pool_for_routed)?;
            let group = format!("{}.routed", k.group_id);
            let mut client_config = kafka::consumer_config(k);
            client_config.set("group.id", &group);
            let consumer = routed::consumer(
                client_config,
                tokio::runtime::Handle::current(),
                pool_for_routed,
                routed::RoutedSettings {
                    group,
                    events_group: k.group_id.clone(),
                    events_topic: k.events_topic.clone(),
                    topic: router.topic().to_owned(),
                    partitions: router.partitions(),
                    keys: router.keys().clone(),
                    rebuild_window_max: config.detect.rebuild_window_max,
                    retry_backoff: (i.retry_initial_backoff, i.retry_max_backoff),
                },
                publisher,
                status,
                routed_cancel,
            )?;
            let thread =
                std::thread::Builder::new().name("routed-consumer".into()).spawn(move || routed::run_loop(consumer))?;
            Some((thread, sender))
        }
        None => None,
    };
    Ok(IngestHandle { consumer_thread, writer_tasks, alert_sender, routed })
}

/// An alert publisher and its sender task on the alerts topic.
fn alert_publisher(config: &Config, pool: &Pool) -> Result<(AlertPublisher, tokio::task::JoinHandle<()>), IngestError> {
    let k = &config.kafka;
    let (publisher, queue) = AlertPublisher::new(
        AlertEncoder::new(config.detect.alert_format),
        config.detect.storm_limit_per_second,
        config.detect.storm_burst,
    );
    let mut producer_config = kafka::producer_config(k);
    if !k.producer_properties.contains_key("linger.ms") && !k.properties.contains_key("linger.ms") {
        // An alert is one message that should leave at once.
        producer_config.set("linger.ms", "0");
    }
    let producer: FutureProducer = producer_config.create()?;
    Ok((publisher, tokio::spawn(run_sender(queue, producer, k.alerts_topic.clone(), pool.clone()))))
}

/// Partitions of the routing topic; it must exist (routing by key hash
/// needs a fixed count).
fn topic_partitions(producer: &FutureProducer, topic: &str, timeout: std::time::Duration) -> Result<i32, IngestError> {
    let error = |message: String| IngestError::RoutingTopic { topic: topic.to_owned(), message };
    let metadata = producer.client().fetch_metadata(Some(topic), timeout).map_err(|e| error(e.to_string()))?;
    let t = metadata.topics().iter().find(|t| t.name() == topic).ok_or_else(|| error("not in metadata".into()))?;
    if let Some(e) = t.error() {
        return Err(error(format!("{e:?}")));
    }
    match i32::try_from(t.partitions().len()) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(error("has no partitions; create it first".into())),
    }
}

/// Runs a database step from a consumer thread (inside librdkafka's
/// callbacks, where blocking is right), retried with exponential backoff
/// until it succeeds; `on_failure` runs after each failure. `None` only when
/// `cancel` fires.
pub(crate) fn retry_blocking<T>(
    what: &str,
    (initial, max): (std::time::Duration, std::time::Duration),
    cancel: &CancellationToken,
    mut step: impl FnMut() -> Result<T, String>,
    mut on_failure: impl FnMut(),
) -> Option<T> {
    let mut backoff = initial;
    loop {
        match step() {
            Ok(v) => return Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                on_failure();
                if cancel.is_cancelled() {
                    return None;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(max);
            }
        }
    }
}
