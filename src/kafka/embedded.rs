//! An in-process Kafka cluster: librdkafka's mock cluster, which speaks the
//! real Kafka protocol over TCP on localhost. The demo runs on it and the
//! tests use it; any Kafka client (kcat, the service as a child process) can
//! connect to its bootstrap servers.

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::bindings as sys;
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::types::{RDKafkaRespErr, RDKafkaType};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("creating the mock cluster: {0}")]
    Create(String),
    #[error("mock cluster operation {op} failed: {code:?}")]
    Op { op: &'static str, code: RDKafkaRespErr },
}

/// A mock Kafka cluster owned by this process; dropped, it shuts down.
pub struct EmbeddedKafka {
    cluster: *mut sys::rd_kafka_mock_cluster_t,
    bootstrap: String,
    // The handle the cluster was created from; it must outlive the cluster.
    _client: Client<DefaultClientContext>,
}

// SAFETY: the rd_kafka_mock_* functions hand each operation to the cluster's
// own thread through librdkafka's op queues; they may be called from any
// thread. The handle itself is only destroyed in Drop.
unsafe impl Send for EmbeddedKafka {}
unsafe impl Sync for EmbeddedKafka {}

impl EmbeddedKafka {
    /// Starts `brokers` mock brokers with group rebalances that start at once
    /// (instead of the 3 s initial delay a real broker uses).
    pub fn start(brokers: i32) -> Result<Self, EmbeddedError> {
        let config = ClientConfig::new();
        let native = config.create_native_config().map_err(|e| EmbeddedError::Create(e.to_string()))?;
        let client = Client::new(&config, native, RDKafkaType::RD_KAFKA_PRODUCER, DefaultClientContext)
            .map_err(|e| EmbeddedError::Create(e.to_string()))?;
        // SAFETY: the client handle is valid for the cluster's lifetime.
        let cluster = unsafe { sys::rd_kafka_mock_cluster_new(client.native_ptr(), brokers) };
        if cluster.is_null() {
            return Err(EmbeddedError::Create("rd_kafka_mock_cluster_new returned null".into()));
        }
        // SAFETY: cluster is valid; the returned string lives as long as it.
        let bootstrap =
            unsafe { CStr::from_ptr(sys::rd_kafka_mock_cluster_bootstraps(cluster)) }.to_string_lossy().into_owned();
        let kafka = EmbeddedKafka { cluster, bootstrap, _client: client };
        // SAFETY: cluster is valid.
        unsafe { sys::rd_kafka_mock_group_initial_rebalance_delay_ms(kafka.cluster, 0) };
        Ok(kafka)
    }

    /// `host:port,...` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), EmbeddedError> {
        let name = CString::new(topic).map_err(|_| EmbeddedError::Create("topic name holds a NUL".into()))?;
        // SAFETY: cluster and name are valid for the call.
        let code = unsafe { sys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1) };
        check("create_topic", code)
    }

    /// Takes a broker down: its connections are closed and it refuses new ones.
    pub fn broker_down(&self, broker_id: i32) -> Result<(), EmbeddedError> {
        // SAFETY: cluster is valid.
        check("broker_down", unsafe { sys::rd_kafka_mock_broker_set_down(self.cluster, broker_id) })
    }

    pub fn broker_up(&self, broker_id: i32) -> Result<(), EmbeddedError> {
        // SAFETY: cluster is valid.
        check("broker_up", unsafe { sys::rd_kafka_mock_broker_set_up(self.cluster, broker_id) })
    }

    /// Makes the next `count` requests of `api_key` fail with `error`.
    pub fn push_request_errors(&self, api_key: i16, error: RDKafkaRespErr, count: usize) {
        let errors = vec![error; count];
        // SAFETY: cluster and the array are valid for the call.
        unsafe { sys::rd_kafka_mock_push_request_errors_array(self.cluster, api_key, errors.len(), errors.as_ptr()) };
    }

    /// Drops the errors still pushed for `api_key`.
    pub fn clear_request_errors(&self, api_key: i16) {
        // SAFETY: cluster is valid.
        unsafe { sys::rd_kafka_mock_clear_request_errors(self.cluster, api_key) };
    }

    /// Adds latency to every response of a broker.
    pub fn broker_round_trip_time(&self, broker_id: i32, rtt: Duration) -> Result<(), EmbeddedError> {
        let ms = i32::try_from(rtt.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: cluster is valid.
        check("broker_rtt", unsafe { sys::rd_kafka_mock_broker_set_rtt(self.cluster, broker_id, ms) })
    }
}

fn check(op: &'static str, code: RDKafkaRespErr) -> Result<(), EmbeddedError> {
    if code == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR { Ok(()) } else { Err(EmbeddedError::Op { op, code }) }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new and not yet destroyed.
        unsafe { sys::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}
