//! Kafka client settings shared by the consumer and the producers, and the
//! embedded (mock) cluster used by the demo and the tests.

pub mod embedded;

use rdkafka::ClientConfig;

use crate::config::KafkaConfig;

/// Settings every client gets: brokers, client id, the pass-through
/// properties (security, SASL, SSL, ...).
fn base(
    cfg: &KafkaConfig,
    defaults: &[(&str, &str)],
    specific: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", &cfg.client_id);
    // Defaults of ours that an operator may override...
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in cfg.properties.iter().chain(specific) {
        c.set(k, v);
    }
    // ...and what the service's guarantees need, which nobody may override
    // (config validation refuses these keys in the property maps).
    c.set("bootstrap.servers", &cfg.brokers);
    c
}

/// The events consumer: offsets are managed by the service (stored in
/// PostgreSQL, committed to Kafka afterwards for lag tooling only).
pub fn consumer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base(
        cfg,
        &[
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            // Bounds what librdkafka pre-fetches (memory under backpressure).
            ("queued.max.messages.kbytes", "16384"),
            // When that bound is reached, look again soon: the default (1 s)
            // leaves the pipeline idle in bursts.
            ("fetch.queue.backoff.ms", "20"),
            // A broker answers a fetch when data arrives or after this wait;
            // librdkafka's mock broker always waits it out, so it bounds
            // alert latency there. 10 ms costs ~100 idle fetches/s.
            ("fetch.wait.max.ms", "10"),
            ("partition.assignment.strategy", "range,roundrobin"),
        ],
        &cfg.consumer_properties,
    );
    c.set("group.id", &cfg.group_id);
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c.set("enable.partition.eof", "false");
    c
}

/// The dead-letter and alert producers: idempotent, acknowledged by all
/// in-sync replicas.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    base(
        cfg,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            ("linger.ms", "5"),
            ("message.timeout.ms", "300000"),
        ],
        &cfg.producer_properties,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_properties_reach_the_clients_but_guarantees_win() {
        let mut cfg = KafkaConfig::default();
        cfg.properties.insert("security.protocol".into(), "SASL_SSL".into());
        cfg.properties.insert("sasl.mechanisms".into(), "SCRAM-SHA-512".into());
        cfg.consumer_properties.insert("auto.offset.reset".into(), "latest".into());
        cfg.producer_properties.insert("linger.ms".into(), "1".into());
        let consumer = consumer_config(&cfg);
        assert_eq!(consumer.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(consumer.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(consumer.get("auto.offset.reset"), Some("latest"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("group.id"), Some("audit-service"));
        assert_eq!(consumer.get("linger.ms"), None);
        let producer = producer_config(&cfg);
        assert_eq!(producer.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(producer.get("linger.ms"), Some("1"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
    }
}
