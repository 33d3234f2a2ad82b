//! The dead-letter topic: a message that cannot be stored goes there with its
//! original key, bytes and headers, plus headers saying why and where from.
//! A batch's offsets are stored only after its dead letters are acknowledged.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::batch::DeadLetter;

/// Header names, documented in the README.
pub const HEADER_REASON_CODE: &str = "dlq.reason.code";
pub const HEADER_REASON: &str = "dlq.reason";
pub const HEADER_SOURCE_TOPIC: &str = "dlq.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "dlq.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "dlq.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "dlq.source.timestamp";
/// Present when the payload was cut to fit the dead-letter topic; holds the
/// original size in bytes.
pub const HEADER_TRUNCATED_FROM: &str = "dlq.payload.truncated_from";

/// The cap applied after the broker refused a letter as too large anyway.
const FALLBACK_PAYLOAD_CAP: usize = 64 * 1024;

#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
    timeout: Duration,
    max_payload: usize,
}

impl DeadLetterProducer {
    /// Payloads longer than `max_payload` are cut to it (and marked), so that
    /// an oversized message cannot block its partition on a DLQ that refuses it.
    pub fn new(
        producer: FutureProducer,
        topic: String,
        source_topic: String,
        timeout: Duration,
        max_payload: usize,
    ) -> Self {
        DeadLetterProducer { producer, topic, source_topic, timeout, max_payload }
    }

    /// Produces every letter and waits until all are acknowledged. A letter
    /// the broker still finds too large is sent again with a smaller cut.
    pub async fn send_all(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let results = join_all(letters.iter().map(|letter| self.send(letter, self.max_payload))).await;
        for (letter, result) in letters.iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    self.send(letter, FALLBACK_PAYLOAD_CAP.min(self.max_payload)).await?
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn send(&self, letter: &DeadLetter, max_payload: usize) -> Result<(), KafkaError> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let timestamp = letter.timestamp.map(|t| t.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len() + 6);
        for h in &letter.headers {
            headers = headers.insert(KafkaHeader { key: &h.key, value: h.value.as_deref() });
        }
        headers = headers
            .insert(KafkaHeader { key: HEADER_REASON_CODE, value: Some(letter.reason_code.as_bytes()) })
            .insert(KafkaHeader { key: HEADER_REASON, value: Some(letter.reason.as_bytes()) })
            .insert(KafkaHeader { key: HEADER_SOURCE_TOPIC, value: Some(self.source_topic.as_bytes()) })
            .insert(KafkaHeader { key: HEADER_SOURCE_PARTITION, value: Some(partition.as_bytes()) })
            .insert(KafkaHeader { key: HEADER_SOURCE_OFFSET, value: Some(offset.as_bytes()) });
        if let Some(ts) = &timestamp {
            headers = headers.insert(KafkaHeader { key: HEADER_SOURCE_TIMESTAMP, value: Some(ts.as_bytes()) });
        }
        let original_size = letter.payload.len().to_string();
        let payload = if letter.payload.len() > max_payload {
            headers = headers.insert(KafkaHeader { key: HEADER_TRUNCATED_FROM, value: Some(original_size.as_bytes()) });
            &letter.payload[..max_payload]
        } else {
            &letter.payload[..]
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).payload(payload).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        self.producer.send(record, Timeout::After(self.timeout)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}
