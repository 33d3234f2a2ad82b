//! Service configuration: one TOML file, every field defaulted, overridable by
//! environment variables.
//!
//! Precedence, lowest first: built-in defaults, the TOML file, `DATABASE_URL`
//! and `KAFKA_BROKERS`, then `AUDIT__<SECTION>__<FIELD>` (any depth, e.g.
//! `AUDIT__KAFKA__EVENTS_TOPIC`, `AUDIT__KAFKA__PROPERTIES__SECURITY.PROTOCOL`).
//! An override value that reads as a TOML integer, float, boolean or array is
//! taken as such; anything else is a string (quote it to force a string).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::activity::ActivityConfig;
use crate::detect::DetectConfig;
use crate::event::ValidationLimits;
use crate::event::registry::RegistryConfig;
use crate::store::writer::InsertMethod;

/// Prefix of the generic environment overrides.
pub const ENV_PREFIX: &str = "AUDIT__";
/// Default location of the config file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/audit-service.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Field { field: String, message: String },
}

impl ConfigError {
    fn field(field: &str, message: impl Into<String>) -> Self {
        ConfigError::Field { field: field.to_owned(), message: message.into() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub database: DatabaseConfig,
    pub ingest: IngestConfig,
    pub storage: StorageConfig,
    pub validation: ValidationLimits,
    pub schema_registry: RegistryConfig,
    pub http: HttpConfig,
    pub api: ApiConfig,
    pub retention: RetentionConfig,
    pub detect: DetectConfig,
    pub activity: ActivityConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`. Env: `KAFKA_BROKERS`.
    pub brokers: String,
    pub events_topic: String,
    pub dlq_topic: String,
    pub alerts_topic: String,
    pub group_id: String,
    pub client_id: String,
    /// librdkafka properties for every client (`security.protocol`,
    /// `sasl.mechanisms`, `ssl.ca.location`, ...), passed through unchanged.
    #[serde(deserialize_with = "scalar_map")]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the events consumer only.
    #[serde(deserialize_with = "scalar_map")]
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the producers (DLQ, alerts) only.
    #[serde(deserialize_with = "scalar_map")]
    pub producer_properties: BTreeMap<String, String>,
    /// How long a dead-letter produce may take before the batch is retried.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// Dead-letter payloads longer than this are cut (header
    /// `dlq.payload.truncated_from` keeps the original size), so that an
    /// oversized message cannot block its partition.
    pub dlq_max_payload_bytes: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            events_topic: "auth.events".into(),
            dlq_topic: "auth.events.dlq".into(),
            alerts_topic: "auth.alerts".into(),
            group_id: "audit-service".into(),
            client_id: "audit-service".into(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            produce_timeout: Duration::from_secs(30),
            dlq_max_payload_bytes: 900_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style URL or key=value string; `sslmode=require` encrypts.
    /// Env: `DATABASE_URL`.
    pub url: String,
    /// Connections for ingest (the writer holds one per in-flight batch).
    pub pool_size: usize,
    /// Connections for the HTTP API, kept apart so that a slow query never
    /// holds up ingest.
    pub api_pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// CA bundle to verify the server certificate. Without it, TLS still
    /// encrypts but does not verify, as libpq's `sslmode=require` does.
    pub ssl_root_cert: Option<PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/audit".into(),
            pool_size: 4,
            api_pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            ssl_root_cert: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A batch is written when it holds this many messages...
    pub batch_max_rows: usize,
    /// ...or when its oldest message has waited this long.
    #[serde(with = "humantime_serde")]
    pub batch_max_age: Duration,
    /// Batches queued for the writer before the consumer pauses its
    /// partitions (backpressure).
    pub max_queued_batches: usize,
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Upper bound on the flush at shutdown and on a revoke barrier.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// `optimistic_copy` (default), `staged` or `unnest`; see BENCHMARKS.md.
    pub insert_method: InsertMethod,
    /// Writers working in parallel, each over its own connection; partition
    /// `p` always goes to writer `p % writers` (its batches stay in order).
    pub writers: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            batch_max_rows: 5000,
            batch_max_age: Duration::from_millis(200),
            max_queued_batches: 2,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            insert_method: InsertMethod::default(),
            writers: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Daily partitions of audit_logs created ahead of today.
    pub partition_premake_days: u32,
    /// Daily partitions kept present behind today (late events land there
    /// rather than in the default partition).
    pub partition_lookback_days: u32,
    /// How often partitions are (re)checked.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            partition_premake_days: 7,
            partition_lookback_days: 3,
            maintenance_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP listener (health, metrics, admin API).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)) }
    }
}

/// `[api]`: the admin HTTP API (authentication, client limits, query limits).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Static admin tokens, kept only as SHA-256 hashes:
    /// `tokens = [{ name = "ops", sha256 = "<64 hex digits>" }]`
    /// (`printf %s "$TOKEN" | sha256sum`). The name identifies the caller
    /// in the audit trail and the rate limiter.
    pub tokens: Vec<StaticTokenConfig>,
    /// Environment variable whose value is also accepted as an admin token
    /// (the runbook's `$ADMIN_TOKEN`); empty to disable. Default `ADMIN_TOKEN`.
    pub admin_token_env: String,
    /// JWTs from the authentication service.
    pub jwt: JwtConfig,
    /// Client networks (CIDR or single address) allowed on the admin routes;
    /// empty allows every client. Others get 403.
    pub allowed_networks: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` is believed when finding the
    /// client address; empty: the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
    /// Admin requests per second per client (verified token, else IP); 0
    /// disables rate limiting.
    pub rate_limit_per_second: u32,
    /// Requests a client may make at once before the rate applies.
    pub rate_limit_burst: u32,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest accepted query string.
    pub max_query_bytes: usize,
    /// Statement timeout of every API query (also bounds the wait for a
    /// connection of the API pool).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Require an admin token on `/metrics` too.
    pub metrics_require_token: bool,
    /// NDJSON log exports running at once (each holds an API connection).
    pub max_concurrent_streams: usize,
    /// Health is `degraded` above this total consumer lag (messages).
    pub health_max_lag: i64,
    /// Health is `degraded` above this lag of the routed consumer (records
    /// of the routing topic; each carries a batch's events of one key and
    /// partition, so a record is worth up to `ingest.batch_max_rows`
    /// events).
    pub health_max_routed_lag: i64,
    /// Health is `degraded` when a pool's use is above this share (0..1).
    pub health_max_pool_utilization: f64,
    /// Health is `degraded` when there is lag but no batch was stored for
    /// this long.
    #[serde(with = "humantime_serde")]
    pub health_stall_after: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            tokens: Vec::new(),
            admin_token_env: "ADMIN_TOKEN".into(),
            jwt: JwtConfig::default(),
            allowed_networks: Vec::new(),
            trusted_proxies: Vec::new(),
            rate_limit_per_second: 10,
            rate_limit_burst: 30,
            max_body_bytes: 64 * 1024,
            max_query_bytes: 4096,
            statement_timeout: Duration::from_secs(5),
            metrics_require_token: false,
            max_concurrent_streams: 2,
            health_max_lag: 100_000,
            health_max_routed_lag: 1_000,
            health_max_pool_utilization: 0.8,
            health_stall_after: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticTokenConfig {
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
}

/// A JWT signature algorithm the API accepts (one per deployment, so that a
/// token cannot pick a weaker one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// `HS256`, `RS256` or `ES256`; unset: JWTs are not accepted.
    pub algorithm: Option<JwtAlgorithm>,
    /// HS256 shared secret (at least 32 bytes). Secret: redacted in output.
    pub secret: Option<String>,
    /// RS256/ES256 public key, PEM text...
    pub public_key_pem: Option<String>,
    /// ...or a PEM file.
    pub public_key_file: Option<PathBuf>,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Claim that marks an admin (dotted path for nested claims, e.g.
    /// `realm_access.roles`): `true`, or a string / array of strings
    /// containing `admin_value`.
    pub admin_claim: String,
    pub admin_value: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: None,
            secret: None,
            public_key_pem: None,
            public_key_file: None,
            issuer: String::new(),
            audience: String::new(),
            admin_claim: "is_admin".into(),
            admin_value: "admin".into(),
            leeway: Duration::from_secs(30),
        }
    }
}

/// `[retention]`: how long audit_logs keeps events, for the cleanup
/// endpoint and the scheduled cleanup.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Compliance floor: no cleanup keeps fewer days than this.
    pub min_days: u32,
    /// The retention policy in days (scheduled cleanup, retention report).
    pub days: u32,
    /// Run the cleanup with `days` every `interval`.
    pub scheduled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long a cleanup may wait for its lock on audit_logs (while it
    /// waits, ingest queues behind it).
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// Statement timeout of a cleanup (the boundary partition's DELETE can
    /// take longer than an API query).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            min_days: 90,
            days: 365,
            scheduled: false,
            interval: Duration::from_secs(24 * 3600),
            lock_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(300),
        }
    }
}

impl ApiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (i, token) in self.tokens.iter().enumerate() {
            if token.name.trim().is_empty() {
                return Err(ConfigError::field(&format!("api.tokens[{i}].name"), "must not be empty"));
            }
            if self.tokens[..i].iter().any(|t| t.name == token.name) {
                return Err(ConfigError::field(&format!("api.tokens[{i}].name"), "is used twice"));
            }
            if token.sha256.len() != 64 || !token.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::field(&format!("api.tokens[{i}].sha256"), "must be 64 hex digits (SHA-256)"));
            }
        }
        for (section, list) in
            [("api.allowed_networks", &self.allowed_networks), ("api.trusted_proxies", &self.trusted_proxies)]
        {
            for (i, net) in list.iter().enumerate() {
                crate::api::allowlist::parse_network(net)
                    .map_err(|e| ConfigError::field(&format!("{section}[{i}]"), e))?;
            }
        }
        if self.rate_limit_per_second > 0 && self.rate_limit_burst == 0 {
            return Err(ConfigError::field("api.rate_limit_burst", "must be at least 1 when rate limiting is on"));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > 16 * 1024 * 1024 {
            return Err(ConfigError::field("api.max_body_bytes", "must be between 1 and 16777216"));
        }
        if self.max_query_bytes < 256 {
            return Err(ConfigError::field("api.max_query_bytes", "must be at least 256"));
        }
        if self.statement_timeout < Duration::from_millis(10) {
            return Err(ConfigError::field("api.statement_timeout", "must be at least 10ms"));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::field("api.max_concurrent_streams", "must be at least 1"));
        }
        if !(self.health_max_pool_utilization > 0.0 && self.health_max_pool_utilization <= 1.0) {
            return Err(ConfigError::field("api.health_max_pool_utilization", "must be in (0, 1]"));
        }
        crate::api::auth::JwtVerifier::from_config(&self.jwt)
            .map_err(|e| ConfigError::field(&format!("api.jwt.{}", e.field()), e.to_string()))?;
        Ok(())
    }
}

impl RetentionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.min_days == 0 {
            return Err(ConfigError::field("retention.min_days", "must be at least 1"));
        }
        if self.days < self.min_days {
            return Err(ConfigError::field("retention.days", "must be at least retention.min_days"));
        }
        if self.interval < Duration::from_secs(60) {
            return Err(ConfigError::field("retention.interval", "must be at least 1m"));
        }
        Ok(())
    }
}

impl Config {
    /// Loads `path` (a missing file is an error only when `required`), then
    /// applies the environment overrides and validates the result.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        Self::load_with_env(path, required, std::env::vars())
    }

    /// [`Config::load`] with an explicit environment, for tests.
    pub fn load_with_env(
        path: &Path,
        required: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        Self::from_toml_with_env(&text, env).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax { path: path.to_owned(), message },
            other => other,
        })
    }

    /// Parses TOML text, applies environment overrides and validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { path: PathBuf::new(), message: e.to_string() })?;
        apply_env_overrides(&mut table, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Field { field, message: e.into_inner().to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values serde cannot: ranges, non-empty names, parsable URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        for (field, value) in [
            ("kafka.brokers", &k.brokers),
            ("kafka.events_topic", &k.events_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
            ("kafka.alerts_topic", &k.alerts_topic),
            ("kafka.group_id", &k.group_id),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::field(field, "must not be empty"));
            }
        }
        if k.events_topic == k.dlq_topic {
            return Err(ConfigError::field("kafka.dlq_topic", "must differ from kafka.events_topic"));
        }
        for (section, props) in [
            ("kafka.properties", &k.properties),
            ("kafka.consumer_properties", &k.consumer_properties),
            ("kafka.producer_properties", &k.producer_properties),
        ] {
            if let Some(key) = props.keys().find(|key| RESERVED_KAFKA_PROPERTIES.contains(&key.as_str())) {
                return Err(ConfigError::field(
                    &format!("{section}.{key}"),
                    "is managed by audit-service and cannot be overridden",
                ));
            }
        }
        self.database
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::field("database.url", format!("not a PostgreSQL connection string: {e}")))?;
        if self.database.pool_size < 2 {
            return Err(ConfigError::field("database.pool_size", "must be at least 2"));
        }
        if self.database.api_pool_size == 0 {
            return Err(ConfigError::field("database.api_pool_size", "must be at least 1"));
        }
        if self.storage.maintenance_interval.is_zero() {
            return Err(ConfigError::field("storage.maintenance_interval", "must be greater than zero"));
        }
        let i = &self.ingest;
        if i.batch_max_rows == 0 || i.batch_max_rows > 100_000 {
            return Err(ConfigError::field("ingest.batch_max_rows", "must be between 1 and 100000"));
        }
        if i.batch_max_age.is_zero() {
            return Err(ConfigError::field("ingest.batch_max_age", "must be greater than zero"));
        }
        if i.writers == 0 || i.writers > 16 {
            return Err(ConfigError::field("ingest.writers", "must be between 1 and 16"));
        }
        if self.database.pool_size < i.writers + 1 {
            return Err(ConfigError::field(
                "database.pool_size",
                format!(
                    "must be at least ingest.writers + 1 ({}): one connection per writer and one for upkeep",
                    i.writers + 1
                ),
            ));
        }
        if i.max_queued_batches == 0 {
            return Err(ConfigError::field("ingest.max_queued_batches", "must be at least 1"));
        }
        if i.retry_initial_backoff.is_zero() || i.retry_initial_backoff > i.retry_max_backoff {
            return Err(ConfigError::field(
                "ingest.retry_initial_backoff",
                "must be greater than zero and at most ingest.retry_max_backoff",
            ));
        }
        if self.storage.partition_premake_days == 0 {
            return Err(ConfigError::field("storage.partition_premake_days", "must be at least 1"));
        }
        if k.dlq_max_payload_bytes < 1024 {
            return Err(ConfigError::field("kafka.dlq_max_payload_bytes", "must be at least 1024"));
        }
        if let Err(e) = self.detect.compile() {
            return Err(ConfigError::field(&format!("detect.rules[{}]", e.index), format!("{} ({})", e.message, e.id)));
        }
        if self.detect.storm_limit_per_second == 0 || self.detect.storm_burst == 0 {
            return Err(ConfigError::field("detect.storm_limit_per_second", "limit and burst must be at least 1"));
        }
        if self.validation.max_message_bytes == 0 {
            return Err(ConfigError::field("validation.max_message_bytes", "must be greater than zero"));
        }
        self.api.validate()?;
        self.retention.validate()?;
        Ok(())
    }

    /// A copy safe to print or log: passwords and secret-looking properties
    /// are replaced by `****`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.database.url = redact_database_url(&c.database.url);
        for props in [&mut c.kafka.properties, &mut c.kafka.consumer_properties, &mut c.kafka.producer_properties] {
            for (key, value) in props.iter_mut() {
                if is_secret_key(key) {
                    *value = REDACTED.into();
                }
            }
        }
        if c.schema_registry.basic_auth_password.is_some() {
            c.schema_registry.basic_auth_password = Some(REDACTED.into());
        }
        if let Some(url) = &c.schema_registry.url {
            c.schema_registry.url = Some(redact_url_password(url));
        }
        if c.api.jwt.secret.is_some() {
            c.api.jwt.secret = Some(REDACTED.into());
        }
        c
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(&self.redacted()).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

const REDACTED: &str = "****";

/// A map of librdkafka properties: values may be written as TOML strings,
/// numbers or booleans (`"linger.ms" = 5`); librdkafka takes them as text.
fn scalar_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// Properties the pipeline's guarantees depend on: exactly-once needs manual
/// offset handling and the group/bootstrap come from their own fields.
const RESERVED_KAFKA_PROPERTIES: &[&str] =
    &["enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers", "enable.partition.eof"];

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "ssl.key.pem", "token", "credentials"].iter().any(|s| key.contains(s))
}

fn redact_url_password(url: &str) -> String {
    // scheme://user:password@host/...
    let Some(scheme_end) = url.find("://") else { return url.to_owned() };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else { return url.to_owned() };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}://{}:{}{}", &url[..scheme_end], &userinfo[..colon], REDACTED, &rest[at..]),
        None => url.to_owned(),
    }
}

fn redact_database_url(url: &str) -> String {
    if !url.contains("://") {
        return redact_pairs(url, ' ');
    }
    // A password may sit in the userinfo and in the query string.
    let url = redact_url_password(url);
    match url.split_once('?') {
        Some((base, query)) => format!("{base}?{}", redact_pairs(query, '&')),
        None => url,
    }
}

/// Redacts `password=...` in a `key=value` list separated by `sep`.
fn redact_pairs(s: &str, sep: char) -> String {
    s.split(sep)
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.trim() == "password" => format!("{key}={REDACTED}"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(&sep.to_string())
}

/// Applies `DATABASE_URL`, `KAFKA_BROKERS` and `AUDIT__A__B=v` to the table.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut generic = Vec::new();
    for (name, value) in env {
        match name.as_str() {
            "DATABASE_URL" => set_path(table, &["database", "url"], toml::Value::String(value), &name)?,
            "KAFKA_BROKERS" => set_path(table, &["kafka", "brokers"], toml::Value::String(value), &name)?,
            _ => {
                if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                    generic.push((name.clone(), path.to_ascii_lowercase(), value));
                }
            }
        }
    }
    // Generic overrides win over the two conventional variables; sorted so the
    // outcome never depends on the environment's order.
    generic.sort();
    for (name, path, value) in generic {
        let segments: Vec<&str> = path.split("__").collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(ConfigError::field(&name, "malformed override name (empty segment)"));
        }
        set_path(table, &segments, parse_env_value(&value), &name)?;
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match wrapped.parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Array(_)
                | toml::Value::String(_)),
            ) => v,
            _ => toml::Value::String(raw.to_owned()),
        },
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[&str], value: toml::Value, source: &str) -> Result<(), ConfigError> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut current = table;
    for segment in parents {
        let entry = current.entry((*segment).to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| {
            ConfigError::field(&path.join("."), format!("{source} overrides a value that is not a section"))
        })?;
    }
    current.insert((*last).to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::from_toml_with_env("", env(&[])).unwrap();
        assert_eq!(c.kafka.events_topic, "auth.events");
        assert_eq!(c.kafka.dlq_topic, "auth.events.dlq");
        assert_eq!(c.kafka.alerts_topic, "auth.alerts");
        assert_eq!(c.kafka.group_id, "audit-service");
        assert_eq!(c.ingest.batch_max_rows, 5000);
        assert_eq!(c.ingest.batch_max_age, Duration::from_millis(200));
    }

    #[test]
    fn shipped_config_file_parses_and_ships_the_default_rules() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let c = Config::load_with_env(&path, true, env(&[])).unwrap();
        assert_eq!(c.detect, crate::detect::DetectConfig::default(), "config file and built-in defaults agree");
        assert_eq!(c.activity, crate::activity::ActivityConfig::default());
    }

    #[test]
    fn env_overrides_file_and_generic_overrides_win() {
        let c = Config::from_toml_with_env(
            "[kafka]\nevents_topic = \"from-file\"\nbrokers = \"file:9092\"\n",
            env(&[
                ("KAFKA_BROKERS", "env:9092"),
                ("DATABASE_URL", "postgres://u@h/db"),
                ("AUDIT__KAFKA__EVENTS_TOPIC", "from-env"),
                ("AUDIT__INGEST__BATCH_MAX_ROWS", "17"),
                ("AUDIT__INGEST__BATCH_MAX_AGE", "1s"),
                ("AUDIT__KAFKA__PROPERTIES__SECURITY.PROTOCOL", "SASL_SSL"),
                ("AUDIT__KAFKA__PRODUCER_PROPERTIES__LINGER.MS", "5"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.events_topic, "from-env");
        assert_eq!(c.kafka.brokers, "env:9092");
        assert_eq!(c.database.url, "postgres://u@h/db");
        assert_eq!(c.ingest.batch_max_rows, 17);
        assert_eq!(c.ingest.batch_max_age, Duration::from_secs(1));
        assert_eq!(c.kafka.properties.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
        assert_eq!(c.kafka.producer_properties.get("linger.ms").map(String::as_str), Some("5"));
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let err = Config::from_toml_with_env("[kafka]\nevents_topc = \"x\"\n", env(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("events_topc"), "{msg}");
        let err = Config::from_toml_with_env("", env(&[("AUDIT__INGEST__BATCH_ROWS", "3")])).unwrap_err();
        assert!(err.to_string().contains("batch_rows"), "{err}");
    }

    #[test]
    fn wrong_type_and_range_name_the_field() {
        let err = Config::from_toml_with_env("[ingest]\nbatch_max_rows = \"many\"\n", env(&[])).unwrap_err();
        assert!(err.to_string().contains("ingest.batch_max_rows"), "{err}");
        let err = Config::from_toml_with_env("[ingest]\nbatch_max_rows = 0\n", env(&[])).unwrap_err();
        assert!(err.to_string().contains("ingest.batch_max_rows"), "{err}");
        let err = Config::from_toml_with_env("[database]\nurl = \"postgres://h:notaport/x\"\n", env(&[])).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
        let err = Config::from_toml_with_env("[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n", env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("enable.auto.commit"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Config::from_toml_with_env(
            "[database]\nurl = \"postgres://svc:hunter2@db:5432/audit?sslmode=require\"\n\
             [kafka.properties]\n\"sasl.password\" = \"hunter3\"\n\"sasl.username\" = \"svc\"\n",
            env(&[]),
        )
        .unwrap();
        let text = c.to_redacted_toml();
        assert!(!text.contains("hunter2") && !text.contains("hunter3"), "{text}");
        assert!(text.contains("svc:****@db:5432/audit?sslmode=require"), "{text}");
        assert!(text.contains("sasl.username"), "{text}");
        assert_eq!(redact_database_url("host=db user=u password=p"), "host=db user=u password=****");
        assert_eq!(redact_database_url("postgres://u@h/db?password=p&x=1"), "postgres://u@h/db?password=****&x=1");
    }

    #[test]
    fn api_and_retention_sections_are_validated_and_redacted() {
        let c = Config::from_toml_with_env("", env(&[])).unwrap();
        assert_eq!(c.api.admin_token_env, "ADMIN_TOKEN");
        assert_eq!(c.api.rate_limit_per_second, 10);
        assert_eq!(c.api.statement_timeout, Duration::from_secs(5));
        assert_eq!(c.retention.min_days, 90);
        assert!(!c.retention.scheduled);
        let field_of = |toml: &str| match Config::from_toml_with_env(toml, env(&[])) {
            Err(ConfigError::Field { field, .. }) => field,
            other => panic!("{toml}: expected a field error, got {other:?}"),
        };
        assert_eq!(field_of("[api]\nallowed_networks = [\"10.0.0.0/8\", \"10.0.0.300\"]\n"), "api.allowed_networks[1]");
        assert_eq!(field_of("[api]\ntokens = [{ name = \"ops\", sha256 = \"abc\" }]\n"), "api.tokens[0].sha256");
        assert_eq!(
            field_of("[api.jwt]\nalgorithm = \"HS256\"\nissuer = \"i\"\naudience = \"a\"\nsecret = \"short\"\n"),
            "api.jwt.secret"
        );
        assert_eq!(
            field_of("[api.jwt]\nalgorithm = \"RS256\"\nissuer = \"i\"\naudience = \"a\"\npublic_key_pem = \"x\"\n"),
            "api.jwt.public_key_pem"
        );
        assert_eq!(
            field_of("[api.jwt]\nalgorithm = \"HS256\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n"),
            "api.jwt.issuer"
        );
        assert_eq!(field_of("[retention]\nmin_days = 90\ndays = 30\n"), "retention.days");
        assert_eq!(field_of("[api]\nrate_limt = 3\n"), "api.rate_limt");

        let c = Config::from_toml_with_env(
            "[api.jwt]\nalgorithm = \"HS256\"\nissuer = \"auth\"\naudience = \"audit\"\n",
            env(&[("AUDIT__API__JWT__SECRET", "hunter4-0123456789abcdef0123456789")]),
        )
        .unwrap();
        let text = c.to_redacted_toml();
        assert!(!text.contains("hunter4") && text.contains("secret = \"****\""), "{text}");
    }

    #[test]
    fn env_value_types() {
        assert_eq!(parse_env_value("12"), toml::Value::Integer(12));
        assert_eq!(parse_env_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_env_value("auth.events"), toml::Value::String("auth.events".into()));
        assert_eq!(parse_env_value("\"12\""), toml::Value::String("12".into()));
        assert_eq!(parse_env_value("localhost:9092"), toml::Value::String("localhost:9092".into()));
    }
}
