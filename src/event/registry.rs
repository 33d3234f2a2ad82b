//! Writer schemas for Avro messages, by Confluent schema id or by
//! single-object fingerprint, compiled into cached [`ReadPlan`]s.
//!
//! Schema ids come from local files (`local_schemas`), from
//! [`SchemaRegistry::register_schema_for_id`], or from a
//! Confluent-compatible schema registry over HTTP. Fingerprints come from
//! the built-in schema and the `*.avsc` files of `schema_dirs`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde::{Deserialize, Serialize};

use super::DecodeError;
use super::avro::{AUTH_EVENT_SCHEMA, ReadPlan, schema_fingerprints};

/// How long an id the registry does not know is answered from the cache, so
/// that a stream of messages with a bad id does not hammer the registry.
const UNKNOWN_ID_TTL: Duration = Duration::from_secs(60);

const DEFAULT_SCHEMA_DIR: &str = "schemas";

/// Where writer schemas come from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of a Confluent-compatible schema registry; without it only
    /// `local_schemas` resolve schema ids.
    pub url: Option<String>,
    pub basic_auth_user: Option<String>,
    pub basic_auth_password: Option<String>,
    /// Per-request timeout for the registry (e.g. `"5s"`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Schema id (decimal) → `.avsc` file, for ids known without a registry.
    pub local_schemas: BTreeMap<String, PathBuf>,
    /// Directories whose `*.avsc` auth event schemas are accepted in
    /// single-object encoding. Schemas of other record types are ignored.
    pub schema_dirs: Vec<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            url: None,
            basic_auth_user: None,
            basic_auth_password: None,
            timeout: Duration::from_secs(5),
            local_schemas: BTreeMap::new(),
            schema_dirs: vec![PathBuf::from(DEFAULT_SCHEMA_DIR)],
        }
    }
}

/// Hand-written so that the password never reaches a log line.
impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("basic_auth_user", &self.basic_auth_user)
            .field("basic_auth_password", &self.basic_auth_password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("local_schemas", &self.local_schemas)
            .field("schema_dirs", &self.schema_dirs)
            .finish()
    }
}

/// A configuration that cannot be used; raised at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry `url` {url:?} is not an http(s) URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("schema registry `basic_auth_password` is set without `basic_auth_user`")]
    PasswordWithoutUser,
    #[error("`local_schemas` key {0:?} is not a schema id (a decimal integer up to 4294967295)")]
    InvalidSchemaId(String),
    #[error("cannot read schema file {}: {reason}", .path.display())]
    ReadFile { path: PathBuf, reason: String },
    #[error("schema file {}: {reason}", .path.display())]
    InvalidSchema { path: PathBuf, reason: String },
    #[error("`schema_dirs` entry {}: {reason}", .path.display())]
    SchemaDir { path: PathBuf, reason: String },
}

/// What is known about a schema id.
#[derive(Clone)]
enum Lookup {
    Found(Arc<ReadPlan>),
    /// The id's schema cannot be read as an auth event. Registry ids never
    /// change meaning, so this is final.
    Rejected(DecodeError),
    /// The registry did not know the id at the time; ask again after `until`.
    Unknown {
        until: Instant,
    },
}

/// Resolves writer schemas. Shared by all decoding threads.
pub struct SchemaRegistry {
    http: Option<HttpRegistry>,
    by_id: RwLock<HashMap<u32, Lookup>>,
    by_fingerprint: RwLock<HashMap<u64, Arc<ReadPlan>>>,
}

impl SchemaRegistry {
    /// Loads the local schemas; does not contact the registry.
    pub fn from_config(config: &RegistryConfig) -> Result<Self, RegistryError> {
        if config.basic_auth_password.is_some() && config.basic_auth_user.is_none() {
            return Err(RegistryError::PasswordWithoutUser);
        }
        let http = match &config.url {
            Some(url) => Some(HttpRegistry::new(url, config)?),
            None => None,
        };
        let registry = SchemaRegistry { http, by_id: RwLock::default(), by_fingerprint: RwLock::default() };

        let builtin = Schema::parse_str(AUTH_EVENT_SCHEMA).expect("built-in schema is valid");
        let plan = ReadPlan::compile(&builtin).expect("built-in schema is readable");
        registry.add_fingerprints(&builtin, Arc::new(plan));

        for (key, path) in &config.local_schemas {
            let id = key.parse::<u32>().map_err(|_| RegistryError::InvalidSchemaId(key.clone()))?;
            let (schema, plan) = load_file(path)?;
            let plan = plan.map_err(|e| RegistryError::InvalidSchema { path: path.clone(), reason: e.to_string() })?;
            let plan = Arc::new(plan);
            registry.add_fingerprints(&schema, plan.clone());
            write(&registry.by_id).insert(id, Lookup::Found(plan));
        }

        for dir in &config.schema_dirs {
            for path in avsc_files(dir)? {
                let (schema, plan) = load_file(&path)?;
                match plan {
                    Ok(plan) => registry.add_fingerprints(&schema, Arc::new(plan)),
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e, "not an auth event schema; ignored")
                    }
                }
            }
        }
        Ok(registry)
    }

    /// The plan for a Confluent schema id.
    ///
    /// Blocking: an id not yet cached is fetched with a blocking HTTP
    /// client, so call this from a plain thread, never from inside an async
    /// runtime (reqwest's blocking client panics there).
    pub fn plan_for_id(&self, id: u32) -> Result<Arc<ReadPlan>, DecodeError> {
        if let Some(lookup) = read(&self.by_id).get(&id) {
            match lookup {
                Lookup::Found(plan) => return Ok(plan.clone()),
                Lookup::Rejected(err) => return Err(err.clone()),
                Lookup::Unknown { until } if Instant::now() < *until => {
                    return Err(DecodeError::UnknownSchemaId(id));
                }
                Lookup::Unknown { .. } => {}
            }
        }
        let Some(http) = &self.http else {
            return Err(DecodeError::UnknownSchemaId(id));
        };
        // Transient failures are returned without caching: the next message
        // asks again.
        let lookup = match http.fetch(id)? {
            Fetched::NotFound => Lookup::Unknown { until: Instant::now() + UNKNOWN_ID_TTL },
            Fetched::NotAvro(kind) => Lookup::Rejected(DecodeError::IncompatibleSchema(
                format!("id {id}"),
                format!("the registry holds a {kind} schema, not Avro"),
            )),
            Fetched::Avro(avsc) => match compile(id, &avsc) {
                Ok(plan) => Lookup::Found(Arc::new(plan)),
                Err(err) => Lookup::Rejected(err),
            },
        };
        write(&self.by_id).insert(id, lookup.clone());
        match lookup {
            Lookup::Found(plan) => Ok(plan),
            Lookup::Rejected(err) => Err(err),
            Lookup::Unknown { .. } => Err(DecodeError::UnknownSchemaId(id)),
        }
    }

    /// The plan for a single-object fingerprint; never blocks.
    pub fn plan_for_fingerprint(&self, fingerprint: u64) -> Result<Arc<ReadPlan>, DecodeError> {
        read(&self.by_fingerprint).get(&fingerprint).cloned().ok_or(DecodeError::UnknownFingerprint(fingerprint))
    }

    /// Makes `avsc` the schema of `id` (and known by its fingerprint),
    /// replacing whatever was cached for the id.
    pub fn register_schema_for_id(&self, id: u32, avsc: &str) -> Result<(), DecodeError> {
        let schema = parse(id, avsc)?;
        let plan = Arc::new(ReadPlan::compile(&schema).map_err(|e| relabel(id, e))?);
        self.add_fingerprints(&schema, plan.clone());
        write(&self.by_id).insert(id, Lookup::Found(plan));
        Ok(())
    }

    fn add_fingerprints(&self, schema: &Schema, plan: Arc<ReadPlan>) {
        let mut by_fingerprint = write(&self.by_fingerprint);
        for fingerprint in schema_fingerprints(schema) {
            by_fingerprint.insert(fingerprint, plan.clone());
        }
    }
}

// The maps are only ever updated by single inserts, so a panic elsewhere
// cannot leave them inconsistent; poisoning is ignored.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn parse(id: u32, avsc: &str) -> Result<Schema, DecodeError> {
    Schema::parse_str(avsc)
        .map_err(|e| DecodeError::IncompatibleSchema(format!("id {id}"), format!("not a valid Avro schema: {e}")))
}

fn compile(id: u32, avsc: &str) -> Result<ReadPlan, DecodeError> {
    ReadPlan::compile(&parse(id, avsc)?).map_err(|e| relabel(id, e))
}

/// Names the schema by id as well as by record name.
fn relabel(id: u32, err: DecodeError) -> DecodeError {
    match err {
        DecodeError::IncompatibleSchema(name, reason) => {
            DecodeError::IncompatibleSchema(format!("id {id} ({name})"), reason)
        }
        other => other,
    }
}

/// Reads and parses a schema file; a parse error is a configuration error,
/// an incompatible schema is left to the caller.
fn load_file(path: &Path) -> Result<(Schema, Result<ReadPlan, DecodeError>), RegistryError> {
    let avsc = std::fs::read_to_string(path)
        .map_err(|e| RegistryError::ReadFile { path: path.to_owned(), reason: e.to_string() })?;
    let schema = Schema::parse_str(&avsc).map_err(|e| RegistryError::InvalidSchema {
        path: path.to_owned(),
        reason: format!("not a valid Avro schema: {e}"),
    })?;
    let plan = ReadPlan::compile(&schema);
    Ok((schema, plan))
}

/// The `*.avsc` files of `dir`, sorted. The default directory may be
/// absent (e.g. when running outside the source tree).
fn avsc_files(dir: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    let dir_error = |e: std::io::Error| RegistryError::SchemaDir { path: dir.to_owned(), reason: e.to_string() };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == Path::new(DEFAULT_SCHEMA_DIR) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(dir_error(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(dir_error)?.path();
        if path.extension().is_some_and(|ext| ext == "avsc") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

enum Fetched {
    Avro(String),
    /// A Protobuf or JSON Schema schema under this id.
    NotAvro(String),
    NotFound,
}

#[derive(Deserialize)]
struct SchemaResponse {
    schema: String,
    /// Absent for Avro, which is the registry's default type.
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
}

struct HttpRegistry {
    /// Base URL without a trailing slash.
    base: String,
    auth: Option<(String, Option<String>)>,
    timeout: Duration,
    /// Built on first use: building a blocking client inside an async
    /// runtime panics, and `from_config` may well be called from one.
    client: OnceLock<Client>,
}

impl HttpRegistry {
    fn new(url: &str, config: &RegistryConfig) -> Result<Self, RegistryError> {
        let invalid = |reason: String| RegistryError::InvalidUrl { url: without_userinfo(url), reason };
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(format!("unsupported scheme {:?}", parsed.scheme())));
        }
        // Credentials in the URL (https://user:password@host) become basic
        // auth, and leave the URL: it appears in log lines and errors.
        let mut base = parsed.clone();
        let url_auth = (!parsed.username().is_empty()).then(|| {
            let decode = |s: &str| percent_decode(s);
            (decode(parsed.username()), parsed.password().map(decode))
        });
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let configured = config.basic_auth_user.clone().map(|user| (user, config.basic_auth_password.clone()));
        Ok(HttpRegistry {
            base: base.as_str().trim_end_matches('/').to_owned(),
            auth: configured.or(url_auth),
            timeout: config.timeout,
            client: OnceLock::new(),
        })
    }

    fn client(&self) -> Result<&Client, DecodeError> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let client = Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .build()
            .map_err(|e| DecodeError::RegistryUnavailable(format!("cannot create an HTTP client: {e}")))?;
        Ok(self.client.get_or_init(|| client))
    }

    /// `GET {url}/schemas/ids/{id}`. Errors are all transient.
    fn fetch(&self, id: u32) -> Result<Fetched, DecodeError> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let unavailable = |what: String| DecodeError::RegistryUnavailable(format!("GET {url}: {what}"));

        let mut request = self
            .client()?
            .get(&url)
            .header(reqwest::header::ACCEPT, "application/vnd.schemaregistry.v1+json, application/json");
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, password.as_ref());
        }
        let response = request.send().map_err(|e| unavailable(error_chain(&e)))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Fetched::NotFound),
            status => return Err(unavailable(format!("HTTP {status}"))),
        }
        let body: SchemaResponse =
            response.json().map_err(|e| unavailable(format!("unreadable response: {}", error_chain(&e))))?;
        Ok(match body.schema_type {
            Some(kind) if !kind.eq_ignore_ascii_case("AVRO") => Fetched::NotAvro(kind),
            _ => Fetched::Avro(body.schema),
        })
    }
}

/// `url` with whatever precedes an `@` in its authority replaced, for
/// messages about a URL that may not even parse.
fn without_userinfo(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

/// `%xx` escapes of a URL's user or password, decoded.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// reqwest's top-level message ("error sending request") hides the cause
/// (refused, timed out, ...); include the sources.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::avro::{auth_event_fingerprint, encode_body, schema_fingerprint};
    use std::collections::HashMap;
    use std::sync::Mutex;

    fn offline() -> RegistryConfig {
        RegistryConfig { schema_dirs: Vec::new(), ..RegistryConfig::default() }
    }

    const OTHER_RECORD: &str = r#"{"type": "record", "name": "Alert", "fields": [{"name": "x", "type": "int"}]}"#;

    /// Our schema under another name with an extra leading field.
    const EVOLVED: &str = r#"{"type": "record", "name": "AuthEventV2", "fields": [
        {"name": "tenant", "type": "string"},
        {"name": "event_id", "type": "string"},
        {"name": "occurred_at", "type": "long"},
        {"name": "action", "type": "string"}
    ]}"#;

    fn fingerprint_of(avsc: &str) -> u64 {
        schema_fingerprint(&Schema::parse_str(avsc).unwrap())
    }

    #[test]
    fn builtin_schema_is_known_by_fingerprint_only() {
        let registry = SchemaRegistry::from_config(&offline()).unwrap();
        assert!(registry.plan_for_fingerprint(auth_event_fingerprint()).is_ok());
        assert_eq!(registry.plan_for_fingerprint(42).unwrap_err(), DecodeError::UnknownFingerprint(42));
        let err = registry.plan_for_id(1).unwrap_err();
        assert_eq!(err, DecodeError::UnknownSchemaId(1));
        assert!(!err.is_transient());
    }

    #[test]
    fn register_schema_for_id() {
        let registry = SchemaRegistry::from_config(&offline()).unwrap();
        registry.register_schema_for_id(7, EVOLVED).unwrap();
        assert!(registry.plan_for_id(7).is_ok());
        assert!(registry.plan_for_fingerprint(fingerprint_of(EVOLVED)).is_ok());

        assert_eq!(
            registry.register_schema_for_id(8, OTHER_RECORD),
            Err(DecodeError::IncompatibleSchema(
                "id 8 (Alert)".into(),
                "the writer schema has no field `event_id`".into()
            ))
        );
        let err = registry.register_schema_for_id(8, "{").unwrap_err();
        assert!(
            matches!(&err, DecodeError::IncompatibleSchema(id, why) if id == "id 8" && why.starts_with("not a valid Avro schema")),
            "{err:?}"
        );
        assert_eq!(registry.plan_for_id(8).unwrap_err(), DecodeError::UnknownSchemaId(8));
    }

    #[test]
    fn local_schemas_and_schema_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("v2.avsc"), EVOLVED).unwrap();
        std::fs::write(dir.path().join("alert.avsc"), OTHER_RECORD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a schema").unwrap();
        let local = tempfile::tempdir().unwrap();
        let local_file = local.path().join("auth.avsc");
        std::fs::write(&local_file, AUTH_EVENT_SCHEMA).unwrap();

        let registry = SchemaRegistry::from_config(&RegistryConfig {
            local_schemas: [("17".to_owned(), local_file)].into(),
            schema_dirs: vec![dir.path().to_owned()],
            ..RegistryConfig::default()
        })
        .unwrap();
        assert!(registry.plan_for_id(17).is_ok());
        assert!(registry.plan_for_fingerprint(fingerprint_of(EVOLVED)).is_ok());
        assert_eq!(
            registry.plan_for_fingerprint(fingerprint_of(OTHER_RECORD)).unwrap_err().code(),
            "unknown_schema_fingerprint"
        );
    }

    #[test]
    fn default_config_loads_the_repository_schema_dir() {
        // Tests run in the crate root, whose schemas/ also holds other
        // record types; those must not stop the start-up.
        let registry = SchemaRegistry::from_config(&RegistryConfig::default()).unwrap();
        assert!(registry.plan_for_fingerprint(auth_event_fingerprint()).is_ok());
    }

    fn config_error(config: RegistryConfig) -> String {
        match SchemaRegistry::from_config(&config) {
            Ok(_) => panic!("expected a configuration error"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn configuration_errors_name_the_culprit() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.avsc");
        let broken = dir.path().join("broken.avsc");
        std::fs::write(&broken, "{\"type\": ").unwrap();
        let alert = dir.path().join("alert.avsc");
        std::fs::write(&alert, OTHER_RECORD).unwrap();
        let local = |key: &str, path: &Path| RegistryConfig {
            local_schemas: [(key.to_owned(), path.to_owned())].into(),
            ..offline()
        };

        assert_eq!(
            config_error(local("abc", &alert)),
            "`local_schemas` key \"abc\" is not a schema id (a decimal integer up to 4294967295)"
        );
        assert!(config_error(local("4294967296", &alert)).contains("key \"4294967296\""));
        let err = config_error(local("1", &missing));
        assert!(err.starts_with(&format!("cannot read schema file {}: ", missing.display())), "{err}");
        let err = config_error(local("1", &broken));
        assert!(err.starts_with(&format!("schema file {}: not a valid Avro schema", broken.display())), "{err}");
        let err = config_error(local("1", &alert));
        assert!(err.contains("alert.avsc: Avro schema Alert cannot be read as an auth event"), "{err}");

        let err = config_error(RegistryConfig { schema_dirs: vec![dir.path().join("nope")], ..offline() });
        assert!(err.starts_with("`schema_dirs` entry "), "{err}");
        let err = config_error(RegistryConfig { schema_dirs: vec![dir.path().to_owned()], ..offline() });
        assert!(err.contains("broken.avsc: not a valid Avro schema"), "{err}");

        let err = config_error(RegistryConfig { url: Some("ftp://registry".into()), ..offline() });
        assert_eq!(err, "schema registry `url` \"ftp://registry\" is not an http(s) URL: unsupported scheme \"ftp\"");
        assert!(config_error(RegistryConfig { url: Some("registry:8081".into()), ..offline() }).contains("`url`"));
        assert_eq!(
            config_error(RegistryConfig { basic_auth_password: Some("pw".into()), ..offline() }),
            "schema registry `basic_auth_password` is set without `basic_auth_user`"
        );
    }

    #[test]
    fn config_deserializes_and_hides_the_password() {
        let config: RegistryConfig = serde_json::from_str(
            r#"{"url": "http://r:8081", "basic_auth_user": "u", "basic_auth_password": "hunter2",
                "timeout": "250ms", "local_schemas": {"7": "x.avsc"}}"#,
        )
        .unwrap();
        assert_eq!(config.timeout, Duration::from_millis(250));
        assert_eq!(config.local_schemas["7"], PathBuf::from("x.avsc"));
        assert_eq!(config.schema_dirs, vec![PathBuf::from("schemas")]);
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2") && debug.contains("<redacted>"), "{debug}");
        assert!(serde_json::from_str::<RegistryConfig>(r#"{"uri": "x"}"#).is_err());
        assert_eq!(serde_json::to_value(RegistryConfig::default()).unwrap()["timeout"], "5s");
    }

    /// A fake Confluent registry on 127.0.0.1, run by its own tokio runtime
    /// on a background thread; counts requests per schema id.
    struct FakeRegistry {
        url: String,
        hits: Arc<Mutex<HashMap<u32, usize>>>,
    }

    impl FakeRegistry {
        fn start() -> FakeRegistry {
            use axum::extract::{Path as UrlPath, State};
            use axum::http::{HeaderMap, StatusCode, header};
            use axum::response::{IntoResponse, Response};
            use axum::{Json, Router, routing::get};

            async fn schema(
                State(hits): State<Arc<Mutex<HashMap<u32, usize>>>>,
                UrlPath(id): UrlPath<u32>,
                headers: HeaderMap,
            ) -> Response {
                *hits.lock().unwrap().entry(id).or_default() += 1;
                let avsc = |avsc: &str| Json(serde_json::json!({ "schema": avsc })).into_response();
                match id {
                    1 => avsc(AUTH_EVENT_SCHEMA),
                    2 => (
                        StatusCode::NOT_FOUND,
                        Json(serde_json::json!({"error_code": 40403, "message": "Schema not found"})),
                    )
                        .into_response(),
                    4 => Json(serde_json::json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}))
                        .into_response(),
                    5 => avsc(OTHER_RECORD),
                    6 if headers.get(header::AUTHORIZATION).is_some_and(|v| v == "Basic YXVkaXQ6czNjcmV0") => {
                        avsc(EVOLVED)
                    }
                    6 => StatusCode::UNAUTHORIZED.into_response(),
                    7 => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        avsc(AUTH_EVENT_SCHEMA)
                    }
                    8 => "<html>oops</html>".into_response(),
                    _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }

            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(Mutex::new(HashMap::new()));
            let state = hits.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let app = Router::new().route("/sr/schemas/ids/{id}", get(schema)).with_state(state);
                    axum::serve(listener, app).await.unwrap();
                });
            });
            FakeRegistry {
                // A trailing slash, as people write it in configs.
                url: format!("http://{addr}/sr/"),
                hits,
            }
        }

        fn hits(&self, id: u32) -> usize {
            self.hits.lock().unwrap().get(&id).copied().unwrap_or(0)
        }

        fn client(&self) -> SchemaRegistry {
            SchemaRegistry::from_config(&RegistryConfig {
                url: Some(self.url.clone()),
                timeout: Duration::from_millis(500),
                ..offline()
            })
            .unwrap()
        }
    }

    #[test]
    fn http_schema_is_fetched_once() {
        let server = FakeRegistry::start();
        let registry = server.client();
        let plan = registry.plan_for_id(1).unwrap();
        assert!(plan.decode(&encode_body(&sample())).is_ok());
        registry.plan_for_id(1).unwrap();
        assert_eq!(server.hits(1), 1);
    }

    #[test]
    fn http_404_is_a_permanent_unknown_id_and_cached() {
        let server = FakeRegistry::start();
        let registry = server.client();
        for _ in 0..3 {
            let err = registry.plan_for_id(2).unwrap_err();
            assert_eq!(err, DecodeError::UnknownSchemaId(2));
            assert!(!err.is_transient());
        }
        assert_eq!(server.hits(2), 1);
    }

    #[test]
    fn http_500_is_transient_and_not_cached() {
        let server = FakeRegistry::start();
        let registry = server.client();
        for _ in 0..2 {
            let err = registry.plan_for_id(3).unwrap_err();
            assert!(err.is_transient(), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!("schema registry unavailable: GET {}schemas/ids/3: HTTP 500 Internal Server Error", server.url)
            );
        }
        assert_eq!(server.hits(3), 2);
    }

    #[test]
    fn http_schemas_we_cannot_use_are_permanent() {
        let server = FakeRegistry::start();
        let registry = server.client();
        assert_eq!(
            registry.plan_for_id(4).unwrap_err(),
            DecodeError::IncompatibleSchema("id 4".into(), "the registry holds a PROTOBUF schema, not Avro".into())
        );
        for _ in 0..2 {
            assert_eq!(
                registry.plan_for_id(5).unwrap_err(),
                DecodeError::IncompatibleSchema(
                    "id 5 (Alert)".into(),
                    "the writer schema has no field `event_id`".into()
                )
            );
        }
        assert_eq!(server.hits(5), 1);
    }

    #[test]
    fn http_basic_auth() {
        let server = FakeRegistry::start();
        let err = server.client().plan_for_id(6).unwrap_err();
        assert!(err.is_transient() && err.to_string().ends_with("HTTP 401 Unauthorized"), "{err}");

        let registry = SchemaRegistry::from_config(&RegistryConfig {
            url: Some(server.url.clone()),
            basic_auth_user: Some("audit".into()),
            basic_auth_password: Some("s3cret".into()),
            ..offline()
        })
        .unwrap();
        assert!(registry.plan_for_id(6).is_ok());

        // Credentials in the URL are sent as basic auth and never shown.
        let with_userinfo = server.url.replacen("http://", "http://audit:s3cret@", 1);
        let registry = SchemaRegistry::from_config(&RegistryConfig { url: Some(with_userinfo), ..offline() }).unwrap();
        assert!(registry.plan_for_id(6).is_ok());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://audit:s3cret@{}", closed.local_addr().unwrap());
        drop(closed);
        let registry = SchemaRegistry::from_config(&RegistryConfig { url: Some(url), ..offline() }).unwrap();
        let err = registry.plan_for_id(1).unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(!err.to_string().contains("s3cret") && !err.to_string().contains("audit:"), "{err}");
        let err =
            SchemaRegistry::from_config(&RegistryConfig { url: Some("ftp://audit:s3cret@host/".into()), ..offline() })
                .err()
                .unwrap();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert_eq!(percent_decode("p%40ss%2Fw"), "p@ss/w");
    }

    #[test]
    fn http_timeouts_garbage_and_refused_connections_are_transient() {
        let server = FakeRegistry::start();
        let registry = server.client();
        let started = Instant::now();
        let err = registry.plan_for_id(7).unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

        let err = registry.plan_for_id(8).unwrap_err();
        assert!(err.is_transient() && err.to_string().contains("unreadable response"), "{err}");

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let registry = SchemaRegistry::from_config(&RegistryConfig { url: Some(url), ..offline() }).unwrap();
        let err = registry.plan_for_id(1).unwrap_err();
        assert_eq!(err.code(), "registry_unavailable");
        assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    }

    #[test]
    fn registry_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SchemaRegistry>();
    }

    fn sample() -> crate::event::AuthEvent {
        crate::event::AuthEvent {
            event_id: uuid::Uuid::from_u128(9),
            occurred_at: 1_700_000_000_000_000,
            action: "AUTH_LOGIN".into(),
            user_id: None,
            username: None,
            ip_address: None,
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: Vec::new(),
        }
    }
}
