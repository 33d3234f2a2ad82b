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
/// Present when the key was cut (a letter too large even with its payload
/// cut); holds the original key size in bytes.
pub const HEADER_KEY_TRUNCATED_FROM: &str = "dlq.key.truncated_from";
/// Present when the original headers were left out (same case); holds how
/// many there were.
pub const HEADER_HEADERS_DROPPED: &str = "dlq.headers.dropped";

/// How much of a letter goes out.
#[derive(Clone, Copy)]
struct Cut {
    payload: usize,
    /// None: the whole key.
    key: Option<usize>,
    original_headers: bool,
}

/// After the broker (or the client's own limit) refused a letter as too
/// large: a smaller payload, a key of at most 1 KiB, no original headers;
/// then, last, the dead-letter headers alone. So an oversized key or
/// headers cannot block the partition either.
const FALLBACKS: [Cut; 2] = [
    Cut { payload: 64 * 1024, key: Some(1024), original_headers: false },
    Cut { payload: 0, key: Some(0), original_headers: false },
];

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
        let whole = Cut { payload: self.max_payload, key: None, original_headers: true };
        let results = join_all(letters.iter().map(|letter| self.send(letter, whole))).await;
        for (letter, result) in letters.iter().zip(results) {
            let mut result = result;
            for fallback in FALLBACKS {
                match &result {
                    Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                        let cut = Cut { payload: fallback.payload.min(self.max_payload), ..fallback };
                        result = self.send(letter, cut).await;
                    }
                    _ => break,
                }
            }
            result?;
        }
        Ok(())
    }

    async fn send(&self, letter: &DeadLetter, cut: Cut) -> Result<(), KafkaError> {
        let max_payload = cut.payload;
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let timestamp = letter.timestamp.map(|t| t.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len() + 9);
        let dropped = letter.headers.len().to_string();
        if cut.original_headers {
            for h in &letter.headers {
                headers = headers.insert(KafkaHeader { key: &h.key, value: h.value.as_deref() });
            }
        } else if !letter.headers.is_empty() {
            headers = headers.insert(KafkaHeader { key: HEADER_HEADERS_DROPPED, value: Some(dropped.as_bytes()) });
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
        let key_size = letter.key.as_ref().map_or(0, Vec::len).to_string();
        let key = match (&letter.key, cut.key) {
            (Some(key), Some(max)) if key.len() > max => {
                headers =
                    headers.insert(KafkaHeader { key: HEADER_KEY_TRUNCATED_FROM, value: Some(key_size.as_bytes()) });
                Some(&key[..max])
            }
            (key, _) => key.as_deref(),
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer.send(record, Timeout::After(self.timeout)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}
