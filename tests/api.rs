//! The admin HTTP API against a real PostgreSQL database (fresh per test)
//! and a real HTTP server on 127.0.0.1 (port 0), called with a real HTTP
//! client. No Kafka: the ingest status is driven directly.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_service::api;
use audit_service::api::queries::LogSearch;
use audit_service::config::Config;
use audit_service::http::{self, HttpState};
use audit_service::ingest::status::IngestStatus;
use audit_service::service::prepare_database;
use audit_service::store;
use chrono::{DateTime, Days, DurationRound, NaiveTime, TimeDelta, Utc};
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// The static admin token every server below accepts (named `admin`).
const TOKEN: &str = "static-admin-token-0123456789abcdef";
/// A second static token (named `second`), for per-client limits.
const TOKEN_2: &str = "second-admin-token-0123456789abcdef";
/// What the injected environment holds as ADMIN_TOKEN.
const ENV_TOKEN: &str = "env-admin-token-0123456789abcdef";
const HS_SECRET: &str = "hs256-shared-secret-0123456789abcdef0123";

/// A running API: its database, server and ingest status.
struct Api {
    db: TestDb,
    addr: SocketAddr,
    http: reqwest::Client,
    status: Arc<IngestStatus>,
    cancel: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `[api]` settings every test server shares; `extra` is appended (more
/// `[api]` keys first, then other sections).
fn config_toml(db_url: &str, extra_api: &str, extra: &str) -> String {
    format!(
        r#"
[database]
url = "{db_url}"
api_pool_size = 4
[api]
tokens = [{{ name = "admin", sha256 = "{h1}" }}, {{ name = "second", sha256 = "{h2}" }}]
rate_limit_per_second = 1000
rate_limit_burst = 1000
{extra_api}
{extra}
"#,
        h1 = sha256_hex(TOKEN),
        h2 = sha256_hex(TOKEN_2),
    )
}

impl Api {
    async fn start() -> Api {
        Api::start_with("", "").await
    }

    async fn start_with(extra_api: &str, extra: &str) -> Api {
        let db = TestDb::create().await;
        let config = Config::from_toml_with_env(&config_toml(&db.url, extra_api, extra), Vec::new()).unwrap();
        prepare_database(&config).await.unwrap();
        Api::serve(db, config, None).await
    }

    /// Serves `config` over `db`; `api_pool_url` replaces the API pool's
    /// database (to make it unreachable).
    async fn serve(db: TestDb, config: Config, api_pool_url: Option<&str>) -> Api {
        let mut api_db = config.database.clone();
        if let Some(url) = api_pool_url {
            api_db.url = url.to_owned();
            api_db.connect_timeout = Duration::from_secs(2);
        }
        let api_pool = store::connect_pool(&api_db, config.database.api_pool_size).unwrap();
        let ingest_pool = store::connect_pool(&config.database, 2).unwrap();
        let status = Arc::new(IngestStatus::default());
        let config = Arc::new(config);
        let env = |name: &str| (name == "ADMIN_TOKEN").then(|| ENV_TOKEN.to_owned());
        let router = http::router_with_env(
            HttpState {
                metrics: audit_service::metrics::install(),
                config: config.clone(),
                api_pool,
                ingest_pool,
                status: status.clone(),
            },
            &env,
        )
        .unwrap();
        let cancel = CancellationToken::new();
        let (addr, _task) = http::serve("127.0.0.1:0".parse().unwrap(), router, cancel.clone()).await.unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Api { db, addr, http, status, cancel }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request with the admin token.
    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(TOKEN), None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(TOKEN), Some(body)).await
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn client(&self) -> tokio_postgres::Client {
        self.db.client().await
    }
}

/// Asserts a JSON error of the API's shape with `status` and `code`.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: u16, code: &str) {
    assert_eq!(got.0.as_u16(), status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert!(got.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
}

/// One audit row to insert.
#[derive(Clone, Debug)]
struct Row {
    id: Uuid,
    at: DateTime<Utc>,
    action: &'static str,
    user: Option<String>,
    username: Option<String>,
    ip: Option<&'static str>,
    session: Option<String>,
}

fn row(at: DateTime<Utc>, action: &'static str, user: Option<&str>, ip: Option<&'static str>) -> Row {
    Row {
        id: Uuid::new_v4(),
        at,
        action,
        user: user.map(str::to_owned),
        username: user.map(|u| format!("{u}@example.com")),
        ip,
        session: None,
    }
}

async fn insert(client: &tokio_postgres::Client, rows: &[Row]) {
    for (i, r) in rows.iter().enumerate() {
        client
            .execute(
                "INSERT INTO audit_logs (event_id, created_at, action, user_id, username, ip_address, session_id,
                                         kafka_partition, kafka_offset)
                 VALUES ($1, $2, $3, $4, $5, $6::text::inet, $7, 0, $8)",
                &[&r.id, &r.at, &r.action, &r.user, &r.username, &r.ip, &r.session, &(i as i64)],
            )
            .await
            .unwrap();
    }
}

/// Inserts an alert transition; returns its id.
#[allow(clippy::too_many_arguments)]
async fn insert_alert(
    client: &tokio_postgres::Client,
    alert_id: Uuid,
    rule: &str,
    subject: &str,
    state: &str,
    severity: &str,
    detected_at: DateTime<Utc>,
) -> i64 {
    client
        .query_one(
            "INSERT INTO alerts (alert_id, rule, subject, key_spec, key_hash, state, severity, count, threshold,
                                 window_seconds, episode_start, recommended_action, detected_at)
             VALUES ($1, $2, $3, 'user_id', 42, $4, $5, 12, 10, 60, $6, 'lock the account', $6)
             RETURNING id",
            &[&alert_id, &rule, &subject, &state, &severity, &detected_at],
        )
        .await
        .unwrap()
        .get(0)
}

fn ids(items: &Value) -> Vec<String> {
    items.as_array().unwrap().iter().map(|i| i["event_id"].as_str().unwrap().to_owned()).collect()
}

/// Expected event ids, newest first (ties by event_id descending).
fn newest_first<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Vec<String> {
    let mut v: Vec<&Row> = rows.into_iter().collect();
    v.sort_by_key(|r| std::cmp::Reverse((r.at, r.id)));
    v.iter().map(|r| r.id.to_string()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(token: &str) -> String {
    hex(&api::auth::sha256(token.as_bytes()))
}

/// A JWT with `claims` merged over valid defaults (iss, aud, exp in 10 min).
fn jwt(alg: jsonwebtoken::Algorithm, key: &jsonwebtoken::EncodingKey, claims: Value) -> String {
    let now = Utc::now().timestamp();
    let mut all = json!({"sub": "alice", "iss": "auth-service", "aud": "audit-admin", "iat": now, "exp": now + 600, "is_admin": true});
    for (k, v) in claims.as_object().unwrap() {
        if v.is_null() {
            all.as_object_mut().unwrap().remove(k);
        } else {
            all[k] = v.clone();
        }
    }
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &all, key).unwrap()
}

fn hs_key(secret: &str) -> jsonwebtoken::EncodingKey {
    jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())
}

/// (private PKCS#8 PEM, public SPKI PEM).
fn rsa_keys() -> (Vec<u8>, String) {
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    (key.private_key_to_pem_pkcs8().unwrap(), String::from_utf8(key.public_key_to_pem().unwrap()).unwrap())
}

fn ec_keys() -> (Vec<u8>, String) {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let key = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap();
    (key.private_key_to_pem_pkcs8().unwrap(), String::from_utf8(key.public_key_to_pem().unwrap()).unwrap())
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn midnight(day: chrono::NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

async fn scrape_text(api: &Api) -> String {
    api.http.get(api.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

// ---------------------------------------------------------------------------
// Routes and authentication
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_answer_without_token_and_admin_routes_demand_one() {
    let api = Api::start().await;
    let (status, body) = api.call(Method::GET, "/api/v1/health", None, None).await;
    assert_eq!((status.as_u16(), body), (200, json!({"status": "ok"})));
    let metrics = api.http.get(api.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("# TYPE audit_http_rate_limited_total counter"));
    let (status, doc) = api.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");

    for route in api::routes().into_iter().filter(|r| r.access == api::Access::Admin) {
        let resp = api.http.request(route.method.clone(), api.url(route.path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{} {}", route.method, route.path);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"audit-service\"");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "missing_token", "{} {}", route.method, route.path);
    }
}

/// The issue's matrix, against an HS256 deployment with static tokens and
/// ADMIN_TOKEN in the (injected) environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_hs256_static_and_env_tokens() {
    let jwt_cfg = format!(
        "[api.jwt]\nalgorithm = \"HS256\"\nsecret = {}\nissuer = \"auth-service\"\naudience = \"audit-admin\"\nleeway = \"5s\"\n",
        toml_string(HS_SECRET)
    );
    let api = Api::start_with("", &jwt_cfg).await;
    let hs = |claims: Value| jwt(jsonwebtoken::Algorithm::HS256, &hs_key(HS_SECRET), claims);
    let now = Utc::now().timestamp();
    let (rsa_private, _) = rsa_keys();
    let rs_signed =
        jwt(jsonwebtoken::Algorithm::RS256, &jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_private).unwrap(), json!({}));
    // alg "none": header and claims, empty signature.
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "x", "iss": "auth-service", "aud": "audit-admin", "exp": now + 600, "is_admin": true}))
    );

    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("no token", None, 401, "missing_token"),
        ("malformed: Basic", Some("Basic YWRtaW46YWRtaW4=".into()), 401, "malformed_token"),
        ("malformed: empty bearer", Some("Bearer".into()), 401, "malformed_token"),
        ("malformed: two words", Some("Bearer abc def".into()), 401, "malformed_token"),
        ("malformed: JWT-shaped garbage", Some("Bearer aaa.bbb.ccc".into()), 401, "malformed_token"),
        ("unknown static token", Some("Bearer not-a-configured-token-0123456789".into()), 401, "invalid_token"),
        ("expired JWT", Some(format!("Bearer {}", hs(json!({"exp": now - 3600})))), 401, "token_expired"),
        ("JWT not valid yet", Some(format!("Bearer {}", hs(json!({"nbf": now + 3600})))), 401, "token_not_yet_valid"),
        (
            "wrong signature",
            Some(format!(
                "Bearer {}",
                jwt(jsonwebtoken::Algorithm::HS256, &hs_key("another-secret-0123456789abcdef01234"), json!({}))
            )),
            401,
            "invalid_token",
        ),
        ("wrong audience", Some(format!("Bearer {}", hs(json!({"aud": "billing"})))), 401, "invalid_token"),
        ("wrong issuer", Some(format!("Bearer {}", hs(json!({"iss": "evil"})))), 401, "invalid_token"),
        ("no exp", Some(format!("Bearer {}", hs(json!({"exp": null})))), 401, "invalid_token"),
        ("no aud", Some(format!("Bearer {}", hs(json!({"aud": null})))), 401, "invalid_token"),
        ("alg none", Some(format!("Bearer {alg_none}")), 401, "malformed_token"),
        ("RS256 token on an HS256 deployment", Some(format!("Bearer {rs_signed}")), 401, "invalid_token"),
        ("non-admin JWT", Some(format!("Bearer {}", hs(json!({"is_admin": false})))), 403, "not_admin"),
        ("JWT without the admin claim", Some(format!("Bearer {}", hs(json!({"is_admin": null})))), 403, "not_admin"),
        ("admin JWT", Some(format!("Bearer {}", hs(json!({})))), 200, ""),
        (
            "admin JWT, audience in a list",
            Some(format!("Bearer {}", hs(json!({"aud": ["x", "audit-admin"]})))),
            200,
            "",
        ),
        ("static admin token", Some(format!("Bearer {TOKEN}")), 200, ""),
        ("static admin token, lower-case scheme", Some(format!("bearer {TOKEN_2}")), 200, ""),
        ("ADMIN_TOKEN environment variable", Some(format!("Bearer {ENV_TOKEN}")), 200, ""),
    ];
    for (name, header, status, code) in cases {
        let mut req = api.http.get(api.url("/api/v1/audit/maintenance"));
        if let Some(h) = &header {
            req = req.header("authorization", h);
        }
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        let body: Value = resp.json().await.unwrap();
        assert_eq!(got, status, "{name}: {body}");
        if status == 200 {
            assert_eq!(body["paused"], false, "{name}");
        } else {
            assert_eq!(body["error"]["code"], code, "{name}: {body}");
        }
        if status == 401 && code != "missing_token" {
            assert_eq!(www.as_deref(), Some("Bearer realm=\"audit-service\", error=\"invalid_token\""), "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_rs256_with_nested_role_claim_and_es256() {
    let (rsa_private, rsa_public) = rsa_keys();
    let rs_cfg = format!(
        "[api.jwt]\nalgorithm = \"RS256\"\npublic_key_pem = {}\nissuer = \"auth-service\"\naudience = \"audit-admin\"\n\
         admin_claim = \"realm_access.roles\"\nadmin_value = \"audit-admin\"\n",
        toml_string(&rsa_public)
    );
    let api = Api::start_with("", &rs_cfg).await;
    let rs = |claims: Value| {
        jwt(jsonwebtoken::Algorithm::RS256, &jsonwebtoken::EncodingKey::from_rsa_pem(&rsa_private).unwrap(), claims)
    };
    let status = |token: String| {
        let api = &api;
        async move { api.call(Method::GET, "/api/v1/audit/maintenance", Some(&token), None).await }
    };
    assert_eq!(status(rs(json!({"realm_access": {"roles": ["user", "audit-admin"]}}))).await.0, 200);
    assert_error(&status(rs(json!({"realm_access": {"roles": ["user"]}}))).await, 403, "not_admin");
    // Algorithm confusion: HS256 signed with the public key as the secret.
    let confused =
        jwt(jsonwebtoken::Algorithm::HS256, &hs_key(&rsa_public), json!({"realm_access": {"roles": ["audit-admin"]}}));
    assert_error(&status(confused).await, 401, "invalid_token");
    // Another RSA key.
    let (other_private, _) = rsa_keys();
    let forged = jwt(
        jsonwebtoken::Algorithm::RS256,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&other_private).unwrap(),
        json!({"realm_access": {"roles": ["audit-admin"]}}),
    );
    assert_error(&status(forged).await, 401, "invalid_token");
    drop(api);

    let (ec_private, ec_public) = ec_keys();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("jwt-es256.pem");
    std::fs::write(&key_file, &ec_public).unwrap();
    let es_cfg = format!(
        "[api.jwt]\nalgorithm = \"ES256\"\npublic_key_file = {}\nissuer = \"auth-service\"\naudience = \"audit-admin\"\n",
        toml_string(key_file.to_str().unwrap())
    );
    let api = Api::start_with("", &es_cfg).await;
    let es = |key: &[u8], claims: Value| {
        jwt(jsonwebtoken::Algorithm::ES256, &jsonwebtoken::EncodingKey::from_ec_pem(key).unwrap(), claims)
    };
    let (status, body) =
        api.call(Method::GET, "/api/v1/audit/maintenance", Some(&es(&ec_private, json!({}))), None).await;
    assert_eq!(status, 200, "{body}");
    let (other_ec, _) = ec_keys();
    let got = api.call(Method::GET, "/api/v1/audit/maintenance", Some(&es(&other_ec, json!({}))), None).await;
    assert_error(&got, 401, "invalid_token");
    let got = api
        .call(Method::GET, "/api/v1/audit/maintenance", Some(&es(&ec_private, json!({"is_admin": "no"}))), None)
        .await;
    assert_error(&got, 403, "not_admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after_per_client() {
    let db = TestDb::create().await;
    let mut toml = config_toml(&db.url, "", "");
    toml = toml
        .replace("rate_limit_per_second = 1000", "rate_limit_per_second = 1")
        .replace("rate_limit_burst = 1000", "rate_limit_burst = 3");
    let config = Config::from_toml_with_env(&toml, Vec::new()).unwrap();
    prepare_database(&config).await.unwrap();
    let api = Api::serve(db, config, None).await;
    let limited = |scrape: &str| metric_value(scrape, "audit_http_rate_limited_total").unwrap_or(0.0);
    let before = limited(&scrape_text(&api).await);

    for _ in 0..3 {
        assert_eq!(api.get("/api/v1/audit/maintenance").await.0, 200);
    }
    let resp = api.http.get(api.url("/api/v1/audit/maintenance")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another token is another client.
    assert_eq!(api.call(Method::GET, "/api/v1/audit/maintenance", Some(TOKEN_2), None).await.0, 200);
    // Failed attempts are limited per address: 3 answered 401, then 429.
    for _ in 0..3 {
        assert_error(
            &api.call(Method::GET, "/api/v1/audit/maintenance", Some("wrong-token-0123456789"), None).await,
            401,
            "invalid_token",
        );
    }
    assert_error(
        &api.call(Method::GET, "/api/v1/audit/maintenance", Some("wrong-token-0123456789"), None).await,
        429,
        "rate_limited",
    );
    // Public routes are not limited.
    for _ in 0..10 {
        assert_eq!(api.call(Method::GET, "/api/v1/health", None, None).await.0, 200);
    }
    assert_eq!(limited(&scrape_text(&api).await) - before, 2.0);
    // After the advertised wait, the client is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(api.get("/api/v1/audit/maintenance").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refuses_other_networks_and_trusts_only_configured_proxies() {
    let api = Api::start_with("allowed_networks = [\"10.0.0.0/8\", \"2001:db8::/32\"]", "").await;
    assert_error(&api.get("/api/v1/audit/maintenance").await, 403, "client_not_allowed");
    // Without proxies configured, X-Forwarded-For is ignored.
    let resp = api
        .http
        .get(api.url("/api/v1/audit/maintenance"))
        .bearer_auth(TOKEN)
        .header("x-forwarded-for", "10.1.2.3")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(api.call(Method::GET, "/api/v1/health", None, None).await.0, 200);
    drop(api);

    let api = Api::start_with("allowed_networks = [\"127.0.0.0/8\"]", "").await;
    assert_eq!(api.get("/api/v1/audit/maintenance").await.0, 200);
    drop(api);

    let api = Api::start_with("allowed_networks = [\"198.51.100.0/24\"]\ntrusted_proxies = [\"127.0.0.1\"]", "").await;
    for (xff, status) in [
        (Some("198.51.100.7"), 200),
        (Some("203.0.113.9"), 403),
        // The rightmost address not a trusted proxy decides: the left part is forgeable.
        (Some("198.51.100.7, 203.0.113.9"), 403),
        (Some("203.0.113.9, 198.51.100.7"), 200),
        (None, 403),
    ] {
        let mut req = api.http.get(api.url("/api/v1/audit/maintenance")).bearer_auth(TOKEN);
        if let Some(xff) = xff {
            req = req.header("x-forwarded-for", xff);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), status, "{xff:?}");
    }
}

// ---------------------------------------------------------------------------
// Health, security, alerts
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ingest_database_and_storage_from_real_rows() {
    let api = Api::start().await;
    let client = api.client().await;
    let now = Utc::now();
    let mut rows = Vec::new();
    for i in 0..5 {
        rows.push(row(now - TimeDelta::minutes(5 + i), "AUTH_LOGIN", Some("u1"), Some("10.0.0.1")));
    }
    for i in 0..3 {
        rows.push(row(now - TimeDelta::hours(2 + 5 * i), "AUTH_LOGOUT", Some("u2"), None));
    }
    for _ in 0..2 {
        rows.push(row(now - TimeDelta::hours(40), "AUTH_LOGIN", Some("u3"), None));
    }
    insert(&client, &rows).await;
    client
        .batch_execute(
            "INSERT INTO dead_letters (dead_lettered_at, topic, kafka_partition, kafka_offset, reason_code, reason, payload_bytes)
             SELECT now() - make_interval(hours => g), 'auth.events', 0, g, 'malformed_json', 'bad', 10
               FROM generate_series(1, 3) g;
             INSERT INTO dead_letters (dead_lettered_at, topic, kafka_partition, kafka_offset, reason_code, reason, payload_bytes)
             VALUES (now() - interval '3 days', 'auth.events', 0, 99, 'invalid_ip', 'bad', 10);
             ANALYZE audit_logs;",
        )
        .await
        .unwrap();
    api.status.set_assigned(vec![0, 1]);
    api.status.set_lag(BTreeMap::from([(0, 5), (1, 7)]));
    api.status.batch_committed();

    let (status, h) = api.get("/api/v1/audit/health").await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["problems"], json!([]));
    assert_eq!(h["kafka"]["connected"], true);
    assert_eq!(h["kafka"]["assigned_partitions"], json!([0, 1]));
    assert_eq!(h["kafka"]["consumer_lag"], 12);
    assert_eq!(h["kafka"]["consumer_lag_by_partition"], json!({"0": 5, "1": 7}));
    assert_eq!(h["ingest"]["maintenance_paused"], false);
    assert_eq!(h["ingest"]["batches_committed"], 1);
    assert!(h["ingest"]["last_batch_age_seconds"].as_i64().unwrap() <= 5);
    assert_eq!(h["database"]["reachable"], true);
    assert_eq!(h["database"]["pools"]["api"]["max"], 4);
    assert_eq!(h["database"]["pools"]["ingest"]["max"], 2);
    let s = &h["storage"];
    assert_eq!(s["events_last_hour"], 5);
    assert_eq!(s["events_last_day"], 8);
    assert_eq!(s["dead_letters_total"], 4);
    assert_eq!(s["dead_letters_last_day"], 3);
    assert_eq!(s["audit_logs_row_estimate"], 10);
    // Size summed over the partitions, independently of the API's query.
    let (size, leaves): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT sum(pg_total_relation_size(relid))::bigint, count(*) FROM pg_partition_tree('audit_logs') WHERE isleaf",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let parent: i64 = client.query_one("SELECT pg_total_relation_size('audit_logs')", &[]).await.unwrap().get(0);
    assert_eq!(parent, 0, "the partitioned parent has no storage of its own");
    assert!(size > 0);
    assert_eq!(s["audit_logs_size_bytes"], size);
    assert_eq!(s["audit_logs_partitions"], leaves);
    assert_eq!(leaves, 12, "3 days back, today, 7 ahead, and the default partition");

    // Backpressure, no assignment and lag each degrade it (maintenance:
    // see the maintenance test).
    api.status.set_backpressure_paused(true);
    let (_, h) = api.get("/api/v1/audit/health").await;
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["ingest"]["backpressure_paused"], true);
    assert_eq!(h["problems"].as_array().unwrap().len(), 1, "{h}");
    assert!(h["problems"][0].as_str().unwrap().contains("paused by backpressure"));
    api.status.set_backpressure_paused(false);
    api.status.set_assigned(Vec::new());
    api.status.set_lag(BTreeMap::from([(0, 200_000)]));
    let (_, h) = api.get("/api/v1/audit/health").await;
    assert_eq!(h["status"], "degraded");
    let problems: Vec<&str> = h["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("no partition"), "{problems:?}");
    assert!(problems[1].contains("consumer lag 200000 is above 100000"), "{problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_failing_with_503_when_postgres_is_unreachable() {
    let db = TestDb::create().await;
    let config = Config::from_toml_with_env(&config_toml(&db.url, "", ""), Vec::new()).unwrap();
    prepare_database(&config).await.unwrap();
    // Nothing listens on port 1.
    let api = Api::serve(db, config, Some("postgres://postgres@127.0.0.1:1/nowhere")).await;
    let (status, h) = api.get("/api/v1/audit/health").await;
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "failing");
    assert_eq!(h["database"]["reachable"], false);
    assert_eq!(h["storage"], Value::Null);
    assert!(h["problems"][0].as_str().unwrap().contains("PostgreSQL is unreachable"), "{h}");
    // Other routes answer 503 with the JSON error, not a hang or a 500.
    assert_error(&api.get("/api/v1/audit/logs").await, 503, "database_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_overview_counts_failed_logins_ips_alerts_and_incidents() {
    let api = Api::start().await;
    let client = api.client().await;
    let now = Utc::now();
    let mut rows = Vec::new();
    for i in 0..7 {
        rows.push(row(now - TimeDelta::seconds(5 + i), "FAILED_AUTH_LOGIN", Some("alice"), Some("203.0.113.5")));
    }
    for i in 0..3 {
        rows.push(row(now - TimeDelta::seconds(10 + i), "FAILED_AUTH_LOGIN", Some("bob"), Some("198.51.100.2")));
    }
    for i in 0..4 {
        rows.push(row(now - TimeDelta::minutes(30 + i), "FAILED_AUTH_LOGIN", Some("carol"), Some("203.0.113.5")));
    }
    // Outside the hour; a success does not count.
    rows.push(row(now - TimeDelta::hours(2), "FAILED_AUTH_LOGIN", Some("dave"), Some("203.0.113.5")));
    rows.push(row(now - TimeDelta::seconds(3), "AUTH_LOGIN", Some("alice"), Some("203.0.113.5")));
    let sec_recent = [
        row(now - TimeDelta::minutes(1), "SECURITY_TOKEN_REUSE", Some("alice"), None),
        row(now - TimeDelta::hours(3), "SECURITY_PASSWORD_RESET", Some("bob"), None),
        row(now - TimeDelta::hours(20), "SECURITY_MFA_DISABLED", Some("carol"), None),
    ];
    rows.extend(sec_recent.iter().cloned());
    rows.push(row(now - TimeDelta::hours(50), "SECURITY_OLD", Some("x"), None));
    // Not the SECURITY_ prefix (LIKE 'SECURITY_%' would match it).
    rows.push(row(now - TimeDelta::minutes(2), "SECURITYX", Some("x"), None));
    insert(&client, &rows).await;

    let (a, b, c, d) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    insert_alert(&client, a, "failed_logins_per_user", "user:alice", "firing", "warning", now - TimeDelta::minutes(50))
        .await;
    let a_escalated = insert_alert(
        &client,
        a,
        "failed_logins_per_user",
        "user:alice",
        "escalated",
        "critical",
        now - TimeDelta::minutes(40),
    )
    .await;
    insert_alert(
        &client,
        b,
        "failed_logins_per_ip",
        "ip:198.51.100.2",
        "firing",
        "critical",
        now - TimeDelta::minutes(30),
    )
    .await;
    insert_alert(
        &client,
        b,
        "failed_logins_per_ip",
        "ip:198.51.100.2",
        "resolved",
        "critical",
        now - TimeDelta::minutes(20),
    )
    .await;
    let c_firing = insert_alert(
        &client,
        c,
        "password_spraying",
        "ip:203.0.113.5",
        "firing",
        "warning",
        now - TimeDelta::minutes(10),
    )
    .await;
    insert_alert(&client, d, "failed_logins_per_user", "user:old", "firing", "warning", now - TimeDelta::days(8)).await;

    let (status, s) = api.get("/api/v1/audit/security").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        s["failed_logins"]["last_minute"],
        json!({"total": 10, "top_users": [{"user_id": "alice", "failures": 7}, {"user_id": "bob", "failures": 3}]})
    );
    assert_eq!(
        s["failed_logins"]["last_hour"],
        json!({"total": 14, "top_users": [
            {"user_id": "alice", "failures": 7}, {"user_id": "carol", "failures": 4}, {"user_id": "bob", "failures": 3}]})
    );
    assert_eq!(s["suspicious_ips"], json!([{"ip_address": "203.0.113.5", "failures": 11, "distinct_usernames": 2}]));
    let open: Vec<i64> = s["open_alerts"].as_array().unwrap().iter().map(|x| x["id"].as_i64().unwrap()).collect();
    assert_eq!(open, vec![c_firing, a_escalated]);
    assert_eq!(s["open_alerts"][1]["state"], "escalated");
    assert_eq!(ids(&s["recent_security_events"]), newest_first(&sec_recent));

    let (_, s) = api.get("/api/v1/audit/security?top=1&ip_threshold=2").await;
    assert_eq!(s["failed_logins"]["last_hour"]["top_users"], json!([{"user_id": "alice", "failures": 7}]));
    assert_eq!(
        s["suspicious_ips"],
        json!([{"ip_address": "203.0.113.5", "failures": 11, "distinct_usernames": 2},
               {"ip_address": "198.51.100.2", "failures": 3, "distinct_usernames": 1}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_filter_and_paginate_newest_first() {
    let api = Api::start().await;
    let client = api.client().await;
    let now = Utc::now();
    let mut all = Vec::new();
    for i in 0..25i64 {
        let state = ["firing", "escalated", "resolved"][(i % 3) as usize];
        let severity = if i % 2 == 0 { "warning" } else { "critical" };
        let rule = if i < 10 { "failed_logins_per_user" } else { "password_spraying" };
        let subject = format!("user:u{}", i % 4);
        // Pairs share a detection time: the id breaks the tie.
        let at = now - TimeDelta::minutes(i / 2);
        let id = insert_alert(&client, Uuid::new_v4(), rule, &subject, state, severity, at).await;
        all.push((id, at, state, severity, rule, subject));
    }
    let expect = |f: &dyn Fn(&AlertFixture) -> bool| -> Vec<i64> {
        let mut v: Vec<_> = all.iter().filter(|a| f(a)).map(|a| (a.1, a.0)).collect();
        v.sort_by(|x, y| y.cmp(x));
        v.into_iter().map(|(_, id)| id).collect()
    };
    let got =
        |v: &Value| -> Vec<i64> { v["items"].as_array().unwrap().iter().map(|a| a["id"].as_i64().unwrap()).collect() };

    let (_, page) = api.get("/api/v1/audit/alerts?state=firing&severity=critical").await;
    assert_eq!(got(&page), expect(&|a| a.2 == "firing" && a.3 == "critical"));
    let (_, page) = api.get("/api/v1/audit/alerts?rule=failed_logins_per_user&subject=user:u1").await;
    assert_eq!(got(&page), expect(&|a| a.4 == "failed_logins_per_user" && a.5 == "user:u1"));
    let since = (now - TimeDelta::minutes(3)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let (_, page) = api.get(&format!("/api/v1/audit/alerts?since={}", urlencode(&since))).await;
    assert_eq!(got(&page), expect(&|a| a.1 >= now - TimeDelta::minutes(3)));

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/audit/alerts?limit=10&cursor={c}"),
            None => "/api/v1/audit/alerts?limit=10".into(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(got(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, expect(&|_| true));
}

/// (id, detected_at, state, severity, rule, subject)
type AlertFixture<'a> = (i64, DateTime<Utc>, &'a str, &'a str, &'a str, String);

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Log search
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_search_filters_return_exactly_the_matching_rows() {
    let api = Api::start().await;
    let client = api.client().await;
    let now = Utc::now().duration_trunc(TimeDelta::seconds(1)).unwrap();
    let actions = [
        "AUTH_LOGIN",
        "FAILED_AUTH_LOGIN",
        "SECURITY_TOKEN_REUSE",
        "SECURITY_MFA_DISABLED",
        "TOKEN_ISSUED",
        "SECURITYX",
    ];
    let ips = [Some("10.1.2.3"), Some("10.1.9.9"), Some("192.0.2.10"), Some("2001:db8::5"), None];
    let mut rows = Vec::new();
    for i in 0..90usize {
        let mut r = row(
            now - TimeDelta::minutes(i as i64 * 7),
            actions[i % actions.len()],
            Some(&format!("user-{}", i % 4)),
            ips[i % ips.len()],
        );
        r.session = Some(format!("s{}", i % 9));
        rows.push(r);
    }
    insert(&client, &rows).await;

    let from = now - TimeDelta::hours(3);
    let to = now - TimeDelta::hours(1);
    let cases: Vec<(String, Vec<String>)> = vec![
        ("user_id=user-2".into(), newest_first(rows.iter().filter(|r| r.user.as_deref() == Some("user-2")))),
        ("action=FAILED_AUTH_LOGIN".into(), newest_first(rows.iter().filter(|r| r.action == "FAILED_AUTH_LOGIN"))),
        ("action=SECURITY_*".into(), newest_first(rows.iter().filter(|r| r.action.starts_with("SECURITY_")))),
        ("ip=10.1.2.3".into(), newest_first(rows.iter().filter(|r| r.ip == Some("10.1.2.3")))),
        ("ip=10.1.0.0/16".into(), newest_first(rows.iter().filter(|r| r.ip.is_some_and(|ip| ip.starts_with("10.1."))))),
        ("ip=2001:db8::/32".into(), newest_first(rows.iter().filter(|r| r.ip == Some("2001:db8::5")))),
        ("session_id=s4".into(), newest_first(rows.iter().filter(|r| r.session.as_deref() == Some("s4")))),
        (
            format!("from={}&to={}", urlencode(&from.to_rfc3339()), urlencode(&to.to_rfc3339())),
            newest_first(rows.iter().filter(|r| r.at >= from && r.at < to)),
        ),
        (
            format!("user_id=user-1&action=SECURITY_*&from={}", urlencode(&from.to_rfc3339())),
            newest_first(
                rows.iter().filter(|r| {
                    r.user.as_deref() == Some("user-1") && r.action.starts_with("SECURITY_") && r.at >= from
                }),
            ),
        ),
        // SQL-injection text in a free-text filter is just a value: no match.
        (urlencode_pair("user_id", "user-1' OR '1'='1"), vec![]),
        ("".into(), newest_first(&rows)),
    ];
    for (query, expected) in cases {
        let (status, page) = api.get(&format!("/api/v1/audit/logs?limit=1000&{query}")).await;
        assert_eq!(status, 200, "{query}: {page}");
        assert!(!expected.is_empty() || query.contains("OR"), "{query}: the fixture should match something");
        assert_eq!(ids(&page["items"]), expected, "{query}");
        assert_eq!(page["next_cursor"], Value::Null, "{query}");
    }
    let (_, page) = api.get("/api/v1/audit/logs?user_id=user-3&limit=1").await;
    let item = &page["items"][0];
    let newest = rows.iter().filter(|r| r.user.as_deref() == Some("user-3")).max_by_key(|r| (r.at, r.id)).unwrap();
    assert_eq!(item["event_id"], newest.id.to_string());
    assert_eq!(item["username"], "user-3@example.com");
    assert_eq!(item["action"], newest.action);
    assert_eq!(item["ip_address"], newest.ip.map_or(Value::Null, |ip| Value::String(ip.into())));
    assert_eq!(item["kafka_partition"], 0);
    assert_eq!(api.db.count("SELECT count(*) FROM audit_logs").await, 90, "the table is intact");
}

/// Partitions detached by a cleanup and not dropped yet.
async fn trash_tables(db: &TestDb) -> i64 {
    db.count(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'audit_retention_trash' AND c.relkind = 'r'",
    )
    .await
}

async fn partitions(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT partition_name FROM audit_log_partitions ORDER BY range_from", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

fn urlencode_pair(k: &str, v: &str) -> String {
    format!("{k}={}", urlencode(v))
}

/// Keyset pagination while a writer keeps inserting rows (newer ones, and
/// late ones inside the range being paged): every row that existed at the
/// start comes back exactly once, and no row twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_returns_every_row_exactly_once_while_rows_arrive() {
    let api = Api::start().await;
    let client = api.client().await;
    // 3,000 rows on 300 distinct timestamps: ties straddle page boundaries.
    client
        .batch_execute(
            "INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
             SELECT gen_random_uuid(), date_trunc('second', now()) - (g / 10) * interval '13 seconds',
                    'AUTH_LOGIN', 'pager', 0, g
               FROM generate_series(0, 2999) g",
        )
        .await
        .unwrap();
    let initial: HashSet<String> =
        client.query("SELECT event_id::text FROM audit_logs", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(initial.len(), 3000);

    let stop = CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        let url = api.db.url.clone();
        tokio::spawn(async move {
            let client = pg_connect(&url).await;
            let mut inserted = 0u64;
            while !stop.is_cancelled() {
                // Five new rows (now) and five late ones inside the paged range.
                client
                    .batch_execute(
                        "INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
                         SELECT gen_random_uuid(),
                                CASE WHEN g <= 5 THEN now() ELSE now() - random() * interval '10 hours' END,
                                'AUTH_LOGIN', 'pager', 1, g
                           FROM generate_series(1, 10) g",
                    )
                    .await
                    .unwrap();
                inserted += 10;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            inserted
        })
    };

    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/audit/logs?user_id=pager&limit=97&cursor={c}"),
            None => "/api/v1/audit/logs?user_id=pager&limit=97".into(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        // Newest first within the page.
        let keys: Vec<(String, String)> = items
            .iter()
            .map(|i| (i["created_at"].as_str().unwrap().to_owned(), i["event_id"].as_str().unwrap().to_owned()))
            .collect();
        let times: Vec<DateTime<Utc>> = keys.iter().map(|(t, _)| t.parse().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "page not newest first");
        seen.extend(keys.into_iter().map(|(_, id)| id));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    stop.cancel();
    let inserted = writer.await.unwrap();
    assert!(inserted > 0, "the writer ran during the paging");
    assert!(pages >= 31, "{pages} pages");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a row came back twice");
    for id in &initial {
        assert!(unique.contains(id), "row {id} never came back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_export_streams_a_large_range_in_chunks() {
    let api = Api::start().await;
    let client = api.client().await;
    client
        .batch_execute(
            "INSERT INTO audit_logs (event_id, created_at, action, user_id, ip_address, kafka_partition, kafka_offset)
             SELECT gen_random_uuid(), now() - g * interval '1 second', 'AUTH_LOGIN', 'exporter', '10.0.0.1', 0, g
               FROM generate_series(1, 25000) g;
             INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
             SELECT gen_random_uuid(), now() - g * interval '1 second', 'AUTH_LOGIN', 'someone-else', 0, g
               FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let mut resp = api
        .http
        .get(api.url("/api/v1/audit/logs?user_id=exporter&format=ndjson"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    assert!(resp.headers().get("content-length").is_none(), "streamed, not buffered");
    let mut buffer = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        chunks += 1;
        buffer.extend_from_slice(&chunk);
    }
    let lines: Vec<Value> =
        buffer.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
    assert_eq!(lines.len(), 25_000);
    assert!(chunks >= 25, "{chunks} chunks");
    assert!(lines.iter().all(|l| l["user_id"] == "exporter"));
    let offsets: Vec<i64> = lines.iter().map(|l| l["kafka_offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets, (1..=25_000).collect::<Vec<i64>>(), "newest first, each once");

    let text = api
        .http
        .get(api.url("/api/v1/audit/logs?user_id=exporter&format=ndjson&limit=10"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 10);
}

/// Every index of audit_logs serves a query: log search by user walks the
/// (user_id, created_at) index of each partition, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_search_by_user_is_an_index_scan() {
    let api = Api::start().await;
    let client = api.client().await;
    // The 2.8 days before today (UTC): whole partitions of rows. Ending at
    // now() instead, today's partition held only minutes of rows just
    // after midnight, and the planner rightly seq-scanned it.
    client
        .batch_execute(
            "INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
             SELECT gen_random_uuid(), date_trunc('day', now(), 'UTC') - (g % 4000 + 1) * interval '1 minute',
                    'AUTH_LOGIN', 'user-' || (g % 2000), 0, g
               FROM generate_series(1, 40000) g;
             ANALYZE audit_logs;",
        )
        .await
        .unwrap();
    let (sql, params) = LogSearch { user_id: Some("user-7".into()), limit: Some(101), ..Default::default() }.to_sql();
    let explain = format!("EXPLAIN {sql}");
    let plan: Vec<String> =
        client.query(&explain, &api::queries::param_refs(&params)).await.unwrap().iter().map(|r| r.get(0)).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("user_id_created_at_idx"), "{plan}");
    // Only partitions without rows (premade days ahead) may be scanned.
    for line in plan.lines().filter(|l| l.contains("Seq Scan on ")) {
        let partition = line.split("Seq Scan on ").nth(1).unwrap().split(' ').next().unwrap();
        assert_eq!(
            api.db.count(&format!("SELECT count(*) FROM {partition}")).await,
            0,
            "{partition} seq-scanned:\n{plan}"
        );
    }
}

// ---------------------------------------------------------------------------
// Bad parameters
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_get_a_4xx_json_error_never_a_5xx() {
    // A cursor in the API's own format, at year −250,000.
    fn crafted_cursor(kind: &str, id: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1|{kind}|-8000000000000000000|{id}"))
    }
    let api = Api::start().await;
    let injection = urlencode("'; DROP TABLE audit_logs; --");
    let gets: Vec<(String, u16, &str)> = vec![
        ("/api/v1/audit/logs?from=yesterday".into(), 400, "invalid_timestamp"),
        ("/api/v1/audit/logs?from=2026-13-45".into(), 400, "invalid_timestamp"),
        ("/api/v1/audit/logs?to=0000-01-01T00:00:00Z".into(), 400, "invalid_timestamp"),
        ("/api/v1/audit/logs?from=2026-02-01&to=2026-01-01".into(), 400, "invalid_range"),
        ("/api/v1/audit/logs?ip=10.0.0.0/33".into(), 400, "invalid_ip"),
        ("/api/v1/audit/logs?ip=300.1.1.1".into(), 400, "invalid_ip"),
        (format!("/api/v1/audit/logs?ip={injection}"), 400, "invalid_ip"),
        ("/api/v1/audit/logs?limit=1000000000".into(), 400, "invalid_limit"),
        ("/api/v1/audit/logs?limit=1001".into(), 400, "invalid_limit"),
        ("/api/v1/audit/logs?limit=0".into(), 400, "invalid_limit"),
        ("/api/v1/audit/logs?limit=-1".into(), 400, "invalid_query"),
        ("/api/v1/audit/logs?limit=99999999999999999999999".into(), 400, "invalid_query"),
        ("/api/v1/audit/logs?limit=ten".into(), 400, "invalid_query"),
        ("/api/v1/audit/logs?usr_id=x".into(), 400, "invalid_query"),
        ("/api/v1/audit/logs?user_id=a&user_id=b".into(), 400, "invalid_query"),
        (format!("/api/v1/audit/logs?action={injection}"), 400, "invalid_action"),
        ("/api/v1/audit/logs?action=%25".into(), 400, "invalid_action"),
        ("/api/v1/audit/logs?user_id=%00x".into(), 400, "invalid_parameter"),
        (format!("/api/v1/audit/logs?user_id={}", "u".repeat(300)), 400, "invalid_parameter"),
        (format!("/api/v1/audit/logs?cursor={injection}"), 400, "invalid_cursor"),
        ("/api/v1/audit/logs?cursor=djF8YWxlcnRzfDF8Mg".into(), 400, "invalid_cursor"),
        ("/api/v1/audit/logs?format=xml".into(), 400, "invalid_format"),
        (format!("/api/v1/audit/logs?user_id={}", "x".repeat(5000)), 414, "query_too_long"),
        ("/api/v1/audit/alerts?state=open".into(), 400, "invalid_parameter"),
        ("/api/v1/audit/alerts?severity=high".into(), 400, "invalid_parameter"),
        ("/api/v1/audit/alerts?since=soon".into(), 400, "invalid_timestamp"),
        ("/api/v1/audit/alerts?cursor=abc".into(), 400, "invalid_cursor"),
        // Well-formed cursors at times chrono holds but PostgreSQL does not.
        (
            format!("/api/v1/audit/logs?cursor={}", crafted_cursor("logs", "0b4e6f1c-0000-4000-8000-000000000001")),
            400,
            "invalid_cursor",
        ),
        (format!("/api/v1/audit/alerts?cursor={}", crafted_cursor("alerts", "7")), 400, "invalid_cursor"),
        // Not valid UTF-8 once percent-decoded.
        ("/api/v1/audit/users/%FF/activity".into(), 400, "invalid_path"),
        ("/api/v1/audit/security?top=0".into(), 400, "invalid_limit"),
        ("/api/v1/audit/security?top=1000000000".into(), 400, "invalid_limit"),
        ("/api/v1/audit/security?ip_threshold=10000000000".into(), 400, "invalid_parameter"),
        ("/api/v1/audit/reports/daily?date=2026-02-30".into(), 400, "invalid_date"),
        (format!("/api/v1/audit/reports/daily?date={injection}"), 400, "invalid_date"),
        ("/api/v1/audit/reports/daily?day=2026-01-01".into(), 400, "invalid_query"),
        ("/api/v1/audit/reports/completeness?from=2026-01-01&to=2026-03-01".into(), 400, "range_too_large"),
        ("/api/v1/audit/reports/completeness?from=2026-01-02&to=2026-01-01".into(), 400, "invalid_range"),
        ("/api/v1/audit/reports/security-incidents?since=x".into(), 400, "invalid_timestamp"),
        ("/api/v1/audit/reports/retention?retention_days=0".into(), 400, "invalid_retention_days"),
        ("/api/v1/audit/reports/retention?retention_days=1000000".into(), 400, "invalid_retention_days"),
        ("/api/v1/audit/nope".into(), 404, "not_found"),
    ];
    for (path, status, code) in &gets {
        let got = api.get(path).await;
        assert_error(&got, *status, code);
    }
    let raw_posts: Vec<(&str, &str, Option<&str>, u16, &str)> = vec![
        ("/api/v1/audit/cleanup", "{\"retention_days\": 90", Some("application/json"), 400, "invalid_body"),
        ("/api/v1/audit/cleanup", "{\"retention_days\": \"ninety\"}", Some("application/json"), 400, "invalid_body"),
        ("/api/v1/audit/cleanup", "{\"retention_days\": 1000000000000}", Some("application/json"), 400, "invalid_body"),
        ("/api/v1/audit/cleanup", "{\"retention_days\": -5}", Some("application/json"), 400, "invalid_body"),
        (
            "/api/v1/audit/cleanup",
            "{\"retention_days\": 90, \"dryrun\": true}",
            Some("application/json"),
            400,
            "invalid_body",
        ),
        ("/api/v1/audit/cleanup", "{}", Some("application/json"), 400, "invalid_body"),
        ("/api/v1/audit/cleanup", "{\"retention_days\": 90}", None, 415, "unsupported_media_type"),
        ("/api/v1/audit/cleanup", "{\"retention_days\": 90}", Some("text/plain"), 415, "unsupported_media_type"),
        ("/api/v1/audit/cleanup", "{\"retention_days\": 7}", Some("application/json"), 400, "below_retention_floor"),
        (
            "/api/v1/audit/cleanup",
            "{\"retention_days\": 4000000}",
            Some("application/json"),
            400,
            "invalid_retention_days",
        ),
        ("/api/v1/audit/maintenance", "{\"paused\": \"yes\"}", Some("application/json"), 400, "invalid_body"),
        ("/api/v1/audit/maintenance", "{\"pause\": true}", Some("application/json"), 400, "invalid_body"),
        ("/api/v1/audit/maintenance", "[true]", Some("application/json"), 400, "invalid_body"),
    ];
    for (path, body, content_type, status, code) in &raw_posts {
        let mut req = api.http.post(api.url(path)).bearer_auth(TOKEN).body(body.to_string());
        if let Some(ct) = content_type {
            req = req.header("content-type", *ct);
        }
        let resp = req.send().await.unwrap();
        let got = (resp.status(), resp.json::<Value>().await.unwrap());
        assert_error(&got, *status, code);
    }
    // Oversized body: 413, before it is parsed.
    let big = format!("{{\"retention_days\": 90, \"pad\": \"{}\"}}", "x".repeat(100_000));
    let resp = api
        .http
        .post(api.url("/api/v1/audit/cleanup"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_error(&(resp.status(), resp.json::<Value>().await.unwrap()), 413, "payload_too_large");
    // Wrong method: 405 with the JSON error.
    let got = api.call(Method::DELETE, "/api/v1/audit/logs", Some(TOKEN), None).await;
    assert_error(&got, 405, "method_not_allowed");
    let got = api.call(Method::GET, "/api/v1/audit/cleanup", Some(TOKEN), None).await;
    assert_error(&got, 405, "method_not_allowed");

    // Nothing above reached the database with harm, and nothing was cleaned.
    assert_eq!(api.db.count("SELECT count(*) FROM pg_tables WHERE tablename = 'audit_logs'").await, 1);
    assert_eq!(api.db.count("SELECT count(*) FROM audit_logs").await, 0);
}

/// A query stuck behind a lock ends at the statement timeout with a 503;
/// the API pool is usable again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_query_ends_at_the_statement_timeout() {
    let api = Api::start_with("statement_timeout = \"300ms\"", "").await;
    let mut locker = api.client().await;
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE audit_logs IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let started = Instant::now();
    let got = api.get("/api/v1/audit/logs?user_id=x").await;
    assert_error(&got, 503, "query_timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    tx.rollback().await.unwrap();
    assert_eq!(api.get("/api/v1/audit/logs?user_id=x").await.0, 200);
}

// ---------------------------------------------------------------------------
// Cleanup, retention, maintenance, reports
// ---------------------------------------------------------------------------

/// Sessions and rollup hours derived from removed events go with them: a
/// rollup hour once it has ended before the cutoff, a session once last
/// seen before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_the_sessions_and_rollups_of_removed_events() {
    let api = Api::start_with("", "[retention]\nmin_days = 30\ndays = 60\n").await;
    let client = api.client().await;
    client
        .batch_execute(
            "INSERT INTO activity_user_hourly (user_id, hour, action, events) VALUES
                 ('ann', date_trunc('hour', now() - interval '40 days'), 'AUTH_LOGIN', 3),
                 ('ann', date_trunc('hour', now() - interval '31 days'), 'AUTH_LOGIN', 1),
                 ('ann', date_trunc('hour', now() - interval '1 day'), 'AUTH_LOGIN', 2);
             INSERT INTO activity_hourly (hour, action, events) VALUES
                 (date_trunc('hour', now() - interval '40 days'), 'AUTH_LOGIN', 3),
                 (date_trunc('hour', now() - interval '1 day'), 'AUTH_LOGIN', 2);
             INSERT INTO sessions (session_id, user_id, started_at, last_seen_at, ended_at, end_reason) VALUES
                 ('old', 'ann', now() - interval '40 days', now() - interval '39 days', now() - interval '39 days', 'logout'),
                 ('new', 'ann', now() - interval '2 days', now() - interval '1 day', NULL, NULL);",
        )
        .await
        .unwrap();
    let expected = json!([
        {"action": "delete", "table": "activity_user_hourly", "rows": 2},
        {"action": "delete", "table": "activity_hourly", "rows": 1},
        {"action": "delete", "table": "sessions", "rows": 1},
    ]);
    let (status, dry) = api.post("/api/v1/audit/cleanup", json!({"retention_days": 30, "dry_run": true})).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["activity"], expected);
    assert_eq!(api.db.count("SELECT count(*) FROM activity_user_hourly").await, 3, "a dry run changes nothing");

    let (status, done) = api.post("/api/v1/audit/cleanup", json!({"retention_days": 30})).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["activity"], expected);
    assert_eq!(
        api.db.count("SELECT count(*) FROM activity_user_hourly WHERE hour > now() - interval '2 days'").await,
        1
    );
    assert_eq!(api.db.count("SELECT count(*) FROM activity_user_hourly").await, 1);
    assert_eq!(api.db.count("SELECT count(*) FROM activity_hourly").await, 1);
    let left: Vec<String> =
        client.query("SELECT session_id FROM sessions", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, vec!["new".to_owned()]);
    // Recorded in the cleanup's own audit event.
    let recorded = api
        .db
        .count("SELECT (metadata->'activity'->2->>'rows')::bigint FROM audit_logs WHERE action = 'ADMIN_AUDIT_CLEANUP'")
        .await;
    assert_eq!(recorded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_drops_old_partitions_keeps_the_floor_and_dry_run_changes_nothing() {
    let api = Api::start_with("", "[retention]\nmin_days = 30\ndays = 60\n").await;
    let client = api.client().await;
    let today = Utc::now().date_naive();
    let first = today - Days::new(40);
    client.execute("SELECT audit_ensure_partitions($1, $2)", &[&first, &today]).await.unwrap();
    // One row per hour over days -40 .. -25 (16 days), and two strays far
    // back in the default partition.
    client
        .execute(
            "INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
             SELECT gen_random_uuid(), $1::date + g * interval '1 hour', 'AUTH_LOGIN', 'old', 0, g
               FROM generate_series(0, 16 * 24 - 1) g",
            &[&first],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO audit_logs (event_id, created_at, action, user_id, kafka_partition, kafka_offset)
             SELECT gen_random_uuid(), now() - interval '400 days' - g * interval '1 hour', 'AUTH_LOGIN', 'stray', 0, g
               FROM generate_series(1, 2) g;
             ANALYZE audit_logs;",
        )
        .await
        .unwrap();
    let before_partitions = partitions(&client).await;
    let total_before = api.db.count("SELECT count(*) FROM audit_logs").await;
    assert_eq!(total_before, 16 * 24 + 2);

    // Below the floor: refused, nothing touched.
    let got = api.post("/api/v1/audit/cleanup", json!({"retention_days": 29})).await;
    assert_error(&got, 400, "below_retention_floor");
    assert!(got.1["error"]["message"].as_str().unwrap().contains("30"));

    // The expected effect, computed from the inserted rows.
    let (status, dry) = api.post("/api/v1/audit/cleanup", json!({"retention_days": 30, "dry_run": true})).await;
    assert_eq!(status, 200, "{dry}");
    let cutoff: DateTime<Utc> = dry["cutoff"].as_str().unwrap().parse().unwrap();
    let cutoff_day = cutoff.date_naive();
    let dropped_days: Vec<String> = (0..)
        .map(|d| first + Days::new(d))
        .take_while(|d| *d < cutoff_day)
        .map(|d| format!("audit_logs_p{}", d.format("%Y%m%d")))
        .collect();
    assert_eq!(dropped_days.len(), 10);
    let boundary_rows: i64 = client
        .query_one(
            "SELECT count(*) FROM audit_logs WHERE created_at >= $1::date AND created_at < $2",
            &[&cutoff_day, &cutoff],
        )
        .await
        .unwrap()
        .get(0);
    let older: i64 =
        client.query_one("SELECT count(*) FROM audit_logs WHERE created_at < $1", &[&cutoff]).await.unwrap().get(0);
    assert_eq!(older, 10 * 24 + boundary_rows + 2);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["partitions_dropped"], 10);
    assert_eq!(dry["rows_removed"], older);
    assert_eq!(dry["audit_event_id"], Value::Null);
    let changes = dry["changes"].as_array().unwrap();
    let dropped: Vec<&str> =
        changes.iter().filter(|c| c["action"] == "drop").map(|c| c["partition"].as_str().unwrap()).collect();
    assert_eq!(dropped, dropped_days);
    assert!(changes.iter().filter(|c| c["action"] == "drop").all(|c| c["rows"] == 24));
    let deletes: Vec<(&str, i64)> = changes
        .iter()
        .filter(|c| c["action"] == "delete")
        .map(|c| (c["partition"].as_str().unwrap(), c["rows"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        deletes,
        vec![
            (format!("audit_logs_p{}", cutoff_day.format("%Y%m%d")).as_str(), boundary_rows),
            ("audit_logs_default", 2)
        ]
    );
    // ...and changed nothing.
    assert_eq!(partitions(&client).await, before_partitions);
    assert_eq!(api.db.count("SELECT count(*) FROM audit_logs").await, total_before);
    assert_eq!(api.db.count("SELECT count(*) FROM audit_logs WHERE action LIKE 'ADMIN%'").await, 0);

    // The real run, as the runbook calls it.
    let resp = api
        .http
        .post(api.url("/api/v1/audit/cleanup"))
        .bearer_auth(TOKEN)
        .header("x-request-id", "runbook-monthly-1")
        .json(&json!({"retention_days": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "runbook-monthly-1");
    let done: Value = resp.json().await.unwrap();
    assert_eq!(done["dry_run"], false);
    assert_eq!(done["partitions_dropped"], 10);
    assert_eq!(done["rows_removed"], older);
    let done_cutoff: DateTime<Utc> = done["cutoff"].as_str().unwrap().parse().unwrap();
    let after_partitions = partitions(&client).await;
    let expected_left: Vec<String> = before_partitions.iter().filter(|p| !dropped_days.contains(p)).cloned().collect();
    assert_eq!(after_partitions, expected_left);
    for p in &dropped_days {
        assert_eq!(
            api.db.count(&format!("SELECT count(*) FROM pg_class WHERE relname = '{p}'")).await,
            0,
            "{p} still attached"
        );
    }
    // Their files are released right after, in the background.
    assert_eq!(done["purge_pending"], true);
    eventually(Duration::from_secs(20), "the detached partitions are dropped", || async {
        (trash_tables(&api.db).await == 0).then_some(())
    })
    .await;
    let remaining_old: i64 = client
        .query_one("SELECT count(*) FROM audit_logs WHERE created_at < $1", &[&done_cutoff])
        .await
        .unwrap()
        .get(0);
    assert_eq!(remaining_old, 0);
    // Everything at or after the cutoff is still there (plus the audit row).
    let kept: i64 = client
        .query_one("SELECT count(*) FROM audit_logs WHERE created_at >= $1 AND action = 'AUTH_LOGIN'", &[&done_cutoff])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, total_before - older);
    // The cleanup is an audit event itself.
    let audit = client
        .query_one(
            "SELECT event_id, user_id, kafka_partition, request_id, metadata FROM audit_logs WHERE action = 'ADMIN_AUDIT_CLEANUP'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.get::<_, Uuid>(0).to_string(), done["audit_event_id"].as_str().unwrap());
    assert_eq!(audit.get::<_, String>(1), "token:admin");
    assert_eq!(audit.get::<_, i32>(2), -1);
    assert_eq!(audit.get::<_, String>(3), "runbook-monthly-1");
    let metadata: Value = audit.get(4);
    assert_eq!(metadata["partitions_dropped"], 10);
    assert_eq!(metadata["retention_days"], 30);

    // Again: nothing left to do.
    let (_, again) = api.post("/api/v1/audit/cleanup", json!({"retention_days": 30})).await;
    assert_eq!(again["partitions_dropped"], 0);
    assert_eq!(again["rows_removed"], 0);

    // The retention report sees a compliant log and the last cleanup.
    let (_, report) = api.get("/api/v1/audit/reports/retention?retention_days=30").await;
    assert_eq!(report["compliant"], true, "{report}");
    assert_eq!(report["events_older_than_cutoff"], 0);
    assert_eq!(report["last_cleanup"]["by"], "token:admin");
    assert_eq!(report["min_retention_days"], 30);
    assert_eq!(report["partitions"]["count"], after_partitions.len());
    assert_eq!(report["partitions_awaiting_purge"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_retention_runs_and_records_itself() {
    let db = TestDb::create().await;
    let config = Config::from_toml_with_env(
        &format!("[database]\nurl = \"{}\"\n[retention]\nmin_days = 2\ndays = 2\nscheduled = true\n", db.url),
        Vec::new(),
    )
    .unwrap();
    prepare_database(&config).await.unwrap();
    let client = db.client().await;
    let today = Utc::now().date_naive();
    client.execute("SELECT audit_ensure_partitions($1, $2)", &[&(today - Days::new(6)), &today]).await.unwrap();
    let old_day = today - Days::new(5);
    client
        .execute(
            "INSERT INTO audit_logs (event_id, created_at, action, kafka_partition, kafka_offset)
             VALUES (gen_random_uuid(), $1, 'AUTH_LOGIN', 0, 1)",
            &[&midnight(old_day)],
        )
        .await
        .unwrap();
    let pool = store::connect_pool(&config.database, 2).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(api::retention::run_scheduled(pool, Arc::new(config), cancel.clone()));
    let old_partition = format!("audit_logs_p{}", old_day.format("%Y%m%d"));
    eventually(Duration::from_secs(20), "the scheduled cleanup dropped the old partitions", || async {
        let left = db.count(&format!("SELECT count(*) FROM pg_class WHERE relname = '{old_partition}'")).await;
        let recorded = db
            .count("SELECT count(*) FROM audit_logs WHERE action = 'ADMIN_AUDIT_CLEANUP' AND user_id = 'scheduler'")
            .await;
        (left == 0 && recorded == 1).then_some(())
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM audit_logs WHERE created_at < now() - interval '2 days'").await, 0);
    eventually(Duration::from_secs(20), "the detached partitions are dropped", || async {
        (trash_tables(&db).await == 0).then_some(())
    })
    .await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_pauses_ingest_and_shows_in_health_metrics_and_audit_trail() {
    let api = Api::start().await;
    api.status.set_assigned(vec![0]);
    let (status, body) =
        api.post("/api/v1/audit/maintenance", json!({"paused": true, "reason": "runbook: high load"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true);
    assert_eq!(body["recorded"], true);
    assert!(api.status.maintenance_paused(), "the consumer loop's flag is set");
    assert_eq!(api.get("/api/v1/audit/maintenance").await.1["paused"], true);
    let (_, h) = api.get("/api/v1/audit/health").await;
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["ingest"]["maintenance_paused"], true);
    assert_eq!(metric_value(&scrape_text(&api).await, "audit_ingest_paused{reason=\"maintenance\"}"), Some(1.0));
    let client = api.client().await;
    let row = client
        .query_one("SELECT event_id, user_id, metadata FROM audit_logs WHERE action = 'ADMIN_MAINTENANCE_ENABLED'", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0).to_string(), body["audit_event_id"].as_str().unwrap());
    assert_eq!(row.get::<_, String>(1), "token:admin");
    assert_eq!(row.get::<_, Value>(2), json!({"paused": true, "was_paused": false, "reason": "runbook: high load"}));

    let (_, body) = api.post("/api/v1/audit/maintenance", json!({"paused": false})).await;
    assert_eq!(body["paused"], false);
    assert!(!api.status.maintenance_paused());
    assert_eq!(metric_value(&scrape_text(&api).await, "audit_ingest_paused{reason=\"maintenance\"}"), Some(0.0));
    assert_eq!(api.db.count("SELECT count(*) FROM audit_logs WHERE action = 'ADMIN_MAINTENANCE_DISABLED'").await, 1);
    // The admin actions are searchable like any event.
    let (_, page) = api.get("/api/v1/audit/logs?action=ADMIN_*").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["items"][0]["action"], "ADMIN_MAINTENANCE_DISABLED");
    // And they count in the rollups (per admin, per hour) like any event:
    // exactly what a GROUP BY over audit_logs gives.
    let difference = "SELECT count(*) FROM (
        (SELECT user_id, date_trunc('hour', created_at) AS hour, action, count(*)::bigint AS events
           FROM audit_logs WHERE action LIKE 'ADMIN_%' GROUP BY 1, 2, 3
         EXCEPT ALL
         SELECT user_id, hour, action, events FROM activity_user_hourly_v WHERE action LIKE 'ADMIN_%')
        UNION ALL
        (SELECT user_id, hour, action, events FROM activity_user_hourly_v WHERE action LIKE 'ADMIN_%'
         EXCEPT ALL
         SELECT user_id, date_trunc('hour', created_at), action, count(*)::bigint
           FROM audit_logs WHERE action LIKE 'ADMIN_%' GROUP BY 1, 2, 3)) d";
    assert_eq!(api.db.count(difference).await, 0);
    // The same through the per-batch admin sums the summary reads
    // (migrations/0013).
    assert_eq!(api.db.count(&difference.replace("activity_user_hourly_v", "activity_admin_hourly_v")).await, 0);
    // Batches written before it (no admin sums) are read entry by entry.
    let pending = api.db.count("SELECT count(*) FROM activity_delta_batches WHERE a_users IS NOT NULL").await;
    assert!(pending > 0, "the admin actions' deltas are pending");
    api.client()
        .await
        .batch_execute(
            "UPDATE activity_delta_batches SET a_users = NULL, a_hours = NULL, a_actions = NULL, a_events = NULL",
        )
        .await
        .unwrap();
    assert_eq!(api.db.count(&difference.replace("activity_user_hourly_v", "activity_admin_hourly_v")).await, 0);
    assert_eq!(
        api.db
            .count("SELECT coalesce(sum(events), 0)::bigint FROM activity_user_hourly_v WHERE user_id = 'token:admin'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_answer_the_runbook_queries_from_real_rows() {
    let api = Api::start().await;
    let client = api.client().await;
    let yesterday = Utc::now().date_naive() - Days::new(1);
    let day_start = midnight(yesterday);
    let mut rows = Vec::new();
    // Yesterday: hours 0, 1, 3 and 5 have events; 2 and 4 are empty.
    for (hour, n, action) in
        [(0, 3, "AUTH_LOGIN"), (1, 2, "FAILED_AUTH_LOGIN"), (3, 4, "AUTH_LOGIN"), (5, 1, "SECURITY_LOCKOUT")]
    {
        for i in 0..n {
            rows.push(row(
                day_start + TimeDelta::hours(hour) + TimeDelta::minutes(i * 5),
                action,
                Some(&format!("u{i}")),
                None,
            ));
        }
    }
    // The days around it.
    rows.push(row(day_start - TimeDelta::minutes(1), "AUTH_LOGIN", Some("x"), None));
    rows.push(row(day_start + TimeDelta::days(1), "AUTH_LOGIN", Some("x"), None));
    insert(&client, &rows).await;

    let (status, daily) = api.get(&format!("/api/v1/audit/reports/daily?date={yesterday}")).await;
    assert_eq!(status, 200, "{daily}");
    assert_eq!(daily["total_events"], 10);
    assert_eq!(
        daily["actions"],
        json!([
            {"action": "AUTH_LOGIN", "events": 7, "distinct_users": 4},
            {"action": "FAILED_AUTH_LOGIN", "events": 2, "distinct_users": 2},
            {"action": "SECURITY_LOCKOUT", "events": 1, "distinct_users": 1}
        ])
    );

    let (_, c) = api
        .get(&format!(
            "/api/v1/audit/reports/completeness?from={}&to={}",
            urlencode(&day_start.to_rfc3339()),
            urlencode(&(day_start + TimeDelta::hours(6)).to_rfc3339())
        ))
        .await;
    let hours: Vec<(i64, bool)> = c["hours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["events"].as_i64().unwrap(), h["empty"].as_bool().unwrap()))
        .collect();
    assert_eq!(hours, vec![(1, false), (0, true), (4, false), (0, true), (2, false), (3, false)], "{c}");
    assert_eq!(
        c["hours"][0]["hour"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(),
        day_start + TimeDelta::hours(5)
    );
    assert_eq!(c["empty_hours"], 2);
    assert_eq!(c["total_events"], 10);

    // Security incidents since the day before, two per page.
    let since = urlencode(&(day_start - TimeDelta::days(1)).to_rfc3339());
    let (_, page) = api.get(&format!("/api/v1/audit/reports/security-incidents?since={since}&limit=2")).await;
    assert_eq!(ids(&page["items"]), newest_first(rows.iter().filter(|r| r.action.starts_with("SECURITY_"))));
    assert_eq!(page["next_cursor"], Value::Null);

    let (_, r) = api.get("/api/v1/audit/reports/retention?retention_days=1").await;
    let oldest = rows.iter().map(|r| r.at).min().unwrap();
    assert_eq!(r["oldest_event_at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), oldest);
    let cutoff: DateTime<Utc> = r["cutoff"].as_str().unwrap().parse().unwrap();
    assert_eq!(r["events_older_than_cutoff"], rows.iter().filter(|x| x.at < cutoff).count());
    assert_eq!(r["compliant"], false);
    assert_eq!(r["retention_days"], 1);
    assert_eq!(r["min_retention_days"], 90);
    assert_eq!(r["last_cleanup"], Value::Null);
}

/// Every route of the OpenAPI document exists on the live server, and the
/// router's table matches the document both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served() {
    let api = Api::start().await;
    let (_, doc) = api.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
            let body = match (method.as_str(), path.as_str()) {
                ("post", "/api/v1/audit/cleanup") => Some(json!({"retention_days": 90, "dry_run": true})),
                ("post", "/api/v1/audit/maintenance") => Some(json!({"paused": false})),
                _ => None,
            };
            let (status, body) = api.call(method.to_uppercase().parse().unwrap(), path, Some(TOKEN), body).await;
            assert_eq!(status, 200, "{method} {path}: {body}");
        }
    }
    let routed: BTreeSet<(String, String)> =
        api::routes().into_iter().map(|r| (r.method.to_string(), r.path.to_owned())).collect();
    assert_eq!(documented, routed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_use_route_templates_and_pass_promtool() {
    let api = Api::start().await;
    assert_eq!(api.get("/api/v1/audit/logs?user_id=m").await.0, 200);
    assert_eq!(api.call(Method::GET, "/api/v1/audit/logs", None, None).await.0, 401);
    let random = format!("/api/v1/scan-{}", Uuid::new_v4());
    assert_eq!(api.get(&random).await.0, 404);
    let scrape = scrape_text(&api).await;
    let count = |labels: &str| metric_value(&scrape, &format!("audit_http_request_duration_seconds_count{{{labels}}}"));
    assert!(count("route=\"/api/v1/audit/logs\",method=\"GET\",status=\"200\"").is_some_and(|n| n >= 1.0), "{scrape}");
    assert!(count("route=\"/api/v1/audit/logs\",method=\"GET\",status=\"401\"").is_some_and(|n| n >= 1.0), "{scrape}");
    assert!(count("route=\"unmatched\",method=\"GET\",status=\"404\"").is_some_and(|n| n >= 1.0), "{scrape}");
    assert!(!scrape.contains("scan-"), "a raw path leaked into the labels");
    // The runbook's 500 ms / 1000 ms thresholds are bucket boundaries.
    assert!(scrape.contains("audit_http_request_duration_seconds_bucket{route=\"/api/v1/audit/logs\",method=\"GET\",status=\"200\",le=\"0.5\"}"), "{scrape}");
    assert!(scrape.contains("le=\"1\"}"), "{scrape}");
    assert!(scrape.contains("# HELP audit_http_request_duration_seconds "));

    let out = promtool_check(&scrape);
    assert!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "promtool: {out:?}\n{scrape}");
}

/// Runs `promtool check metrics` on a scrape.
fn promtool_check(scrape: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}
