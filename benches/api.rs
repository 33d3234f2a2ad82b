//! Admin API benchmark, end to end over HTTP (reqwest → axum → PostgreSQL):
//!
//! ```text
//! cargo bench --bench api
//! AUDIT_BENCH_ROWS=1000000 AUDIT_BENCH_QUERIES=300 cargo bench --bench api
//! ```
//!
//! 1. bulk-loads N rows (default 10,000,000) into a fresh, migrated
//!    database: 90 daily partitions ending two days ago, each filled with
//!    `generate_series` while detached and then attached (PostgreSQL builds
//!    its indexes in bulk), then `VACUUM ANALYZE`, as autovacuum would leave
//!    old partitions;
//! 2. log search by user: the first page (100 rows) for random users,
//!    a 7-day window, and the deep pages of a heavy user (cursor), each as
//!    p50 / p99 / max over HTTP;
//! 3. retention: a dry run, then the cleanup that drops all 90 partitions,
//!    then a cleanup whose boundary partition holds a full day of rows;
//! 4. prints the tables for BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_service::config::Config;
use audit_service::http::{self, HttpState};
use audit_service::ingest::status::IngestStatus;
use audit_service::service::prepare_database;
use audit_service::store;
use chrono::{Days, NaiveTime, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const USERS: i64 = 100_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// One day's rows into a detached table, then attached. Rows are in event
/// time order (as ingest writes them), users spread by a multiplicative
/// hash, 0.5 % of them belong to `user-heavy`.
const LOAD_DAY: &str = "
INSERT INTO {part} (event_id, created_at, received_at, action, user_id, username, ip_address, user_agent,
                    session_id, request_id, metadata, kafka_partition, kafka_offset)
SELECT gen_random_uuid(),
       $1::timestamptz + g * $3::float8 * interval '1 microsecond',
       $1::timestamptz + g * $3::float8 * interval '1 microsecond' + interval '40 milliseconds',
       CASE WHEN g % 100 < 70 THEN 'AUTH_LOGIN'
            WHEN g % 100 < 85 THEN 'FAILED_AUTH_LOGIN'
            WHEN g % 100 < 93 THEN 'AUTH_LOGOUT'
            WHEN g % 100 < 98 THEN 'TOKEN_ISSUED'
            ELSE 'SECURITY_SUSPICIOUS_LOGIN' END,
       u.user_id, u.user_id || '@example.com',
       '10.0.0.0'::inet + ((($4::bigint + g) * 40503) % 16777216),
       'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36',
       'sess-' || (($4::bigint + g) / 17), NULL, '{\"client\": \"web\", \"mfa\": \"totp\"}'::jsonb,
       (g % 16)::int, $4::bigint + g
  FROM generate_series(0, $2::bigint - 1) AS g
 CROSS JOIN LATERAL (SELECT CASE WHEN g % 200 = 0 THEN 'user-heavy'
                                 ELSE 'user-' || ((($4::bigint + g) * 2654435761) % $5::bigint) END AS user_id) u";

async fn bulk_load(url: &str, days: u64, rows: i64) -> f64 {
    let started = Instant::now();
    let today = Utc::now().date_naive();
    let last = today - Days::new(2);
    let first = last - Days::new(days - 1);
    let per_day = rows / days as i64;
    // Two loaders, one day at a time each (2 cores here).
    let mut tasks = Vec::new();
    for worker in 0..2u64 {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut d = worker;
            while d < days {
                let day = first + Days::new(d);
                let part = format!("audit_logs_p{}", day.format("%Y%m%d"));
                let lo = day.and_time(NaiveTime::MIN).and_utc();
                let hi = lo + chrono::TimeDelta::days(1);
                client
                    .batch_execute(&format!("CREATE TABLE {part} (LIKE audit_logs INCLUDING DEFAULTS)"))
                    .await
                    .unwrap();
                let step_us = 86_400_000_000f64 / per_day as f64;
                let offset = d as i64 * per_day;
                client
                    .execute(&LOAD_DAY.replace("{part}", &part), &[&lo, &per_day, &step_us, &offset, &USERS])
                    .await
                    .unwrap();
                client
                    .execute(
                        &format!("ALTER TABLE audit_logs ATTACH PARTITION {part} FOR VALUES FROM ($1) TO ($2)")
                            .replace("$1", &format!("'{}'", lo.to_rfc3339()))
                            .replace("$2", &format!("'{}'", hi.to_rfc3339())),
                        &[],
                    )
                    .await
                    .unwrap();
                d += 2;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let client = connect(url).await;
    client.batch_execute("VACUUM (ANALYZE) audit_logs").await.unwrap();
    started.elapsed().as_secs_f64()
}

struct Server {
    base: String,
    http: reqwest::Client,
    cancel: CancellationToken,
}

async fn start_server(url: &str) -> Server {
    let hash: String = audit_service::api::auth::sha256(TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let config = Config::from_toml_with_env(
        &format!(
            "[database]\nurl = \"{url}\"\n[storage]\npartition_lookback_days = 0\n\
             [api]\ntokens = [{{ name = \"bench\", sha256 = \"{hash}\" }}]\nrate_limit_per_second = 0\n\
             [retention]\nmin_days = 1\ndays = 1\n"
        ),
        Vec::new(),
    )
    .unwrap();
    prepare_database(&config).await.unwrap();
    let state = HttpState {
        metrics: audit_service::metrics::install(),
        api_pool: store::connect_pool(&config.database, config.database.api_pool_size).unwrap(),
        ingest_pool: store::connect_pool(&config.database, 2).unwrap(),
        status: Arc::new(IngestStatus::default()),
        config: Arc::new(config),
    };
    let router = http::router_with_env(state, &|_| None).unwrap();
    let cancel = CancellationToken::new();
    let (addr, _) = http::serve("127.0.0.1:0".parse().unwrap(), router, cancel.clone()).await.unwrap();
    Server { base: format!("http://{addr}"), http: reqwest::Client::new(), cancel }
}

impl Server {
    async fn get(&self, path: &str) -> (Duration, Value) {
        let started = Instant::now();
        let resp = self.http.get(format!("{}{path}", self.base)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let body: Value = resp.json().await.unwrap();
        (started.elapsed(), body)
    }

    async fn post(&self, path: &str, body: Value) -> (Duration, Value) {
        let started = Instant::now();
        let resp = self.http.post(format!("{}{path}", self.base)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let body: Value = resp.json().await.unwrap();
        (started.elapsed(), body)
    }
}

struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    rows: f64,
}

fn stats(mut samples: Vec<(Duration, usize)>) -> Stats {
    samples.sort_by_key(|s| s.0);
    let ms = |i: usize| samples[i.min(samples.len() - 1)].0.as_secs_f64() * 1000.0;
    let n = samples.len();
    Stats {
        n,
        p50: ms(n / 2),
        p99: ms((n * 99).div_ceil(100) - 1),
        max: ms(n - 1),
        rows: samples.iter().map(|s| s.1 as f64).sum::<f64>() / n as f64,
    }
}

/// A small deterministic generator, so that runs query the same users.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: i64) -> i64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as i64
    }
}

fn main() {
    // `cargo test --benches` runs bench targets without --bench: skip.
    if !std::env::args().any(|a| a == "--bench") {
        println!("api benchmark: run with `cargo bench --bench api`");
        return;
    }
    let rows: i64 = env_or("AUDIT_BENCH_ROWS", 10_000_000);
    let days: u64 = env_or("AUDIT_BENCH_DAYS", 90);
    let queries: usize = env_or("AUDIT_BENCH_QUERIES", 1000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let name = format!("audit_bench_api_{}", std::process::id());
        let admin = connect(ADMIN_URL).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode=disable");
        let server = start_server(&url).await;
        let load_s = bulk_load(&url, days, rows).await;
        let client = connect(&url).await;
        let stored: i64 = client.query_one("SELECT count(*) FROM audit_logs", &[]).await.unwrap().get(0);
        let partitions: i64 = client.query_one("SELECT count(*) FROM audit_log_partitions", &[]).await.unwrap().get(0);
        let size: String =
            client.query_one("SELECT pg_size_pretty(sum(size_bytes)) FROM audit_log_partitions", &[]).await.unwrap().get(0);
        eprintln!("loaded {stored} rows into {partitions} partitions ({size}) in {load_s:.0} s");
        let heavy: i64 = client.query_one("SELECT count(*) FROM audit_logs WHERE user_id = 'user-heavy'", &[]).await.unwrap().get(0);

        let mut rng = Lcg(42);
        // Warm-up: the first queries pay for connections and catalog caches.
        for _ in 0..20 {
            server.get(&format!("/api/v1/audit/logs?user_id=user-{}&limit=100", rng.below(USERS))).await;
        }
        let mut first_page = Vec::new();
        for _ in 0..queries {
            let (t, body) = server.get(&format!("/api/v1/audit/logs?user_id=user-{}&limit=100", rng.below(USERS))).await;
            first_page.push((t, body["items"].as_array().unwrap().len()));
        }
        let week_ago = (Utc::now() - chrono::TimeDelta::days(9)).format("%Y-%m-%d").to_string();
        let mut windowed = Vec::new();
        for _ in 0..queries {
            let path = format!("/api/v1/audit/logs?user_id=user-{}&from={week_ago}&limit=100", rng.below(USERS));
            let (t, body) = server.get(&path).await;
            windowed.push((t, body["items"].as_array().unwrap().len()));
        }
        let mut deep = Vec::new();
        let mut cursor: Option<String> = None;
        while deep.len() < queries {
            let path = match &cursor {
                Some(c) => format!("/api/v1/audit/logs?user_id=user-heavy&limit=1000&cursor={c}"),
                None => "/api/v1/audit/logs?user_id=user-heavy&limit=1000".to_owned(),
            };
            let (t, body) = server.get(&path).await;
            deep.push((t, body["items"].as_array().unwrap().len()));
            // Past the last page, start again from the first.
            cursor = body["next_cursor"].as_str().map(str::to_owned);
        }

        let plan: Vec<String> = client
            .query(
                "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM audit_logs WHERE user_id = 'user-4242' ORDER BY created_at DESC, event_id DESC LIMIT 101",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        eprintln!("(plan of a typical search, for reference)\n{}", plan.join("\n"));

        // Retention: all partitions are older than the 1-day cutoff.
        let (dry_t, dry) = server.post("/api/v1/audit/cleanup", json!({"retention_days": 1, "dry_run": true})).await;
        let (drop_t, dropped) = server.post("/api/v1/audit/cleanup", json!({"retention_days": 1})).await;
        assert_eq!(dropped["partitions_dropped"].as_i64().unwrap(), days as i64);
        // The detached partitions' files are released in the background.
        let purge_started = Instant::now();
        loop {
            let (_, report) = server.get("/api/v1/audit/reports/retention?retention_days=1").await;
            if report["partitions_awaiting_purge"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let purge_t = drop_t + purge_started.elapsed();
        let left: i64 = client.query_one("SELECT count(*) FROM audit_logs WHERE action <> 'ADMIN_AUDIT_CLEANUP'", &[]).await.unwrap().get(0);
        assert_eq!(left, 0, "every loaded row removed");
        // A boundary partition with a full day of rows (yesterday), cut at now - 1 day.
        let yesterday = Utc::now().date_naive() - Days::new(1);
        client.execute("SELECT audit_ensure_partitions($1, $1)", &[&yesterday]).await.unwrap();
        let per_day = rows / days as i64;
        let lo = yesterday.and_time(NaiveTime::MIN).and_utc();
        let part = format!("audit_logs_p{}", yesterday.format("%Y%m%d"));
        client
            .execute(&LOAD_DAY.replace("{part}", &part), &[&lo, &per_day, &(86_400_000_000f64 / per_day as f64), &0i64, &USERS])
            .await
            .unwrap();
        client.batch_execute(&format!("VACUUM (ANALYZE) {part}")).await.unwrap();
        let (boundary_t, boundary) = server.post("/api/v1/audit/cleanup", json!({"retention_days": 1})).await;


        let s1 = stats(first_page);
        let s2 = stats(windowed);
        let s3 = stats(deep);
        println!();
        println!("Log search over HTTP ({stored} rows, {partitions} daily partitions, {size}; {USERS} users, user-heavy = {heavy} rows):");
        println!();
        println!("| query | requests | rows/response | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|");
        for (label, s) in [
            ("by user, first page (limit 100)", &s1),
            ("by user, last 9 days (from=, limit 100)", &s2),
            ("user-heavy, successive pages by cursor (limit 1000)", &s3),
        ] {
            println!("| {label} | {} | {:.0} | {:.1} | {:.1} | {:.1} |", s.n, s.rows, s.p50, s.p99, s.max);
        }
        println!();
        println!("| cleanup | partitions dropped | rows removed | server ms | HTTP ms |");
        println!("|---|---|---|---|---|");
        for (label, t, body) in [
            ("dry run, retention_days = 1", dry_t, &dry),
            ("drop all partitions, retention_days = 1", drop_t, &dropped),
            ("boundary partition only (one full day, cut at now - 1 day)", boundary_t, &boundary),
        ] {
            println!(
                "| {label} | {} | {} | {} | {:.0} |",
                body["partitions_dropped"],
                body["rows_removed"],
                body["duration_ms"],
                t.as_secs_f64() * 1000.0
            );
        }
        println!();
        println!(
            "Background purge of the {days} detached partitions finished {:.0} ms after the cleanup request started \
             (no lock on audit_logs meanwhile).",
            purge_t.as_secs_f64() * 1000.0
        );
        server.cancel.cancel();
        drop(client);
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
    });
}
