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
pub mod status;
pub mod writer;

use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::activity::hll::ActiveUsers;
use crate::alerts::AlertEncoder;
use crate::alerts::publisher::{AlertPublisher, run_sender};
use crate::config::Config;
use crate::detect::Detector;
use crate::event::Decoder;
use crate::kafka;
use consumer::{ContextSettings, IngestContext};
use detection::Detection;
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
}

/// The running pipeline; `join` waits until it has flushed and stopped.
pub struct IngestHandle {
    consumer_thread: std::thread::JoinHandle<()>,
    writer_tasks: Vec<tokio::task::JoinHandle<()>>,
    alert_sender: Option<tokio::task::JoinHandle<()>>,
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
    // One writer per lane, each with its own connection and queue.
    let active_users = Arc::new(Mutex::new(ActiveUsers::default()));
    let mut senders = Vec::new();
    let mut writer_tasks = Vec::new();
    for _ in 0..i.writers.max(1) {
        let (commands_tx, commands_rx) = mpsc::channel(i.max_queued_batches);
        let writer = BatchWriter::new(
            pool.clone(),
            dlq.clone(),
            WriterSettings {
                activity: config.activity.enabled.then(|| config.activity.clone()),
                group: k.group_id.clone(),
                topic: k.events_topic.clone(),
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
        let detector = Detector::new(&config.detect)?;
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
        let sender = tokio::spawn(run_sender(queue, producer, k.alerts_topic.clone()));
        (Some(Detection::new(detector, publisher, config.detect.rebuild_window_max)), Some(sender))
    } else {
        (None, None)
    };

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
        status,
        detection,
        cancel,
    );
    let consumer: BaseConsumer<IngestContext> = kafka::consumer_config(k).create_with_context(context)?;
    consumer.subscribe(&[&k.events_topic])?;

    let consumer_thread = std::thread::Builder::new()
        .name("ingest-consumer".into())
        .spawn(move || consumer::run_loop(consumer, decoder, events_rx))?;
    Ok(IngestHandle { consumer_thread, writer_tasks, alert_sender })
}
