//! Synthetic auth traffic: a deterministic generator of realistic events,
//! the attacks each detection rule exists for, and the encoders for every
//! wire format the service accepts. Used by `audit-service produce` (the load
//! generator), the demo, the benchmarks and the tests.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use uuid::Uuid;

use crate::event::{AuthEvent, EpochMicros, avro};

/// How an event is put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    Json,
    /// Confluent framing with this schema id.
    AvroConfluent(u32),
    AvroSingleObject,
}

/// Encodes an event in the given format.
pub fn encode(event: &AuthEvent, format: WireFormat) -> Vec<u8> {
    match format {
        WireFormat::Json => encode_json(event),
        WireFormat::AvroConfluent(id) => avro::confluent_frame(id, &avro::encode_body(event)),
        WireFormat::AvroSingleObject => {
            avro::single_object_frame(avro::auth_event_fingerprint(), &avro::encode_body(event))
        }
    }
}

/// The JSON form of the event contract (RFC 3339 times, absent fields null).
pub use crate::event::json::encode_json;

/// Produces `(key, payload)` messages as fast as the producer's queue
/// allows, then waits until every one is acknowledged.
pub fn produce_all<'a>(
    producer: &BaseProducer,
    topic: &str,
    messages: impl IntoIterator<Item = (Option<&'a [u8]>, &'a [u8])>,
    flush_timeout: Duration,
) -> Result<(), KafkaError> {
    for (key, payload) in messages {
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(payload);
            if let Some(k) = key {
                record = record.key(k);
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(flush_timeout)
}

/// splitmix64: small, fast, and the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn uuid(&mut self) -> Uuid {
        let hi = u128::from(self.next_u64()) << 64;
        uuid::Builder::from_random_bytes((hi | u128::from(self.next_u64())).to_be_bytes()).into_uuid()
    }
}

const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "okhttp/4.12.0",
    "python-requests/2.32.3",
];

const FAILED_LOGIN: &str = "FAILED_AUTH_LOGIN";
const LOGIN: &str = "AUTH_LOGIN";

/// Ordinary traffic: mostly logins, some failures, logouts, token and admin
/// actions, a few security events.
const ACTION_MIX: &[(&str, u64)] = &[
    ("AUTH_LOGIN", 40),
    ("FAILED_AUTH_LOGIN", 12),
    ("AUTH_LOGOUT", 20),
    ("TOKEN_ISSUED", 15),
    ("TOKEN_REVOKED", 5),
    ("ADMIN_USER_UPDATE", 3),
    ("ADMIN_ROLE_GRANT", 1),
    ("SECURITY_PASSWORD_CHANGE", 3),
    ("SECURITY_MFA_ENABLED", 1),
];

/// A deterministic stream of ordinary auth events.
pub struct EventGenerator {
    rng: Rng,
    users: u64,
    mix: Vec<(&'static str, u64)>,
    total_weight: u64,
}

impl EventGenerator {
    pub fn new(seed: u64, users: u64) -> Self {
        EventGenerator {
            rng: Rng::new(seed),
            users: users.max(1),
            mix: ACTION_MIX.to_vec(),
            total_weight: ACTION_MIX.iter().map(|(_, w)| w).sum(),
        }
    }

    /// The same mix with failed logins at `per_mille` ‰ of all events (the
    /// default mix has 120 ‰, which at a few events per second already
    /// crosses the system-wide failed-login threshold).
    pub fn with_failure_per_mille(mut self, per_mille: u64) -> Self {
        let p = per_mille.min(1000);
        let others: u64 = ACTION_MIX.iter().filter(|(a, _)| *a != FAILED_LOGIN).map(|(_, w)| w).sum();
        // Others keep their proportions; failure weight / total = p / 1000.
        self.mix = ACTION_MIX
            .iter()
            .map(|&(a, w)| if a == FAILED_LOGIN { (a, p * others) } else { (a, w * (1000 - p)) })
            .collect();
        self.total_weight = self.mix.iter().map(|(_, w)| w).sum();
        self
    }

    /// Users of the ordinary population are `0..users`.
    pub fn users(&self) -> u64 {
        self.users
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn pick_action(&mut self) -> &'static str {
        let mut roll = self.rng.below(self.total_weight.max(1));
        for &(action, weight) in &self.mix {
            if roll < weight {
                return action;
            }
            roll -= weight;
        }
        self.mix[0].0
    }

    /// One ordinary event at `occurred_at`.
    pub fn next_event(&mut self, occurred_at: EpochMicros) -> AuthEvent {
        let user = self.rng.below(self.users);
        let action = self.pick_action();
        let ip = self.user_ip(user);
        let session = self.rng.below(4);
        let mut metadata = Vec::new();
        if action.starts_with("ADMIN_") {
            metadata.push(("target_user".to_owned(), format!("{}", self.rng.below(self.users))));
        }
        if action == "FAILED_AUTH_LOGIN" {
            metadata.push(("reason".to_owned(), "invalid_password".to_owned()));
        }
        AuthEvent {
            event_id: self.rng.uuid(),
            occurred_at,
            action: action.to_owned(),
            user_id: Some(user.to_string()),
            username: Some(format!("user{user}@example.com")),
            ip_address: Some(ip),
            user_agent: Some(USER_AGENTS[(user % USER_AGENTS.len() as u64) as usize].to_owned()),
            session_id: Some(format!("s-{user}-{session}")),
            request_id: Some(format!("r-{:016x}", self.rng.next_u64())),
            metadata,
        }
    }

    /// Users keep to a home address; one in ten is on IPv6.
    fn user_ip(&mut self, user: u64) -> IpAddr {
        if user % 10 == 9 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (user >> 16) as u16, user as u16))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, (user >> 16) as u8, (user >> 8) as u8, user as u8))
        }
    }
}

// ---------------------------------------------------------------------------
// Attacks and scenarios
// ---------------------------------------------------------------------------

/// Failed logins of a brute force on one user, from one address: crosses
/// the per-user warning (> 5) and critical (> 10) thresholds of a minute and
/// the per-IP threshold of an hour (> 10).
pub const BRUTE_FORCE_ATTEMPTS: usize = 12;
/// Usernames one address tries in a password spraying run (> 10 distinct
/// usernames in 10 minutes).
pub const SPRAY_USERNAMES: usize = 15;
/// Failed logins of a system-wide spike, from as many users and addresses
/// (> 100 in a minute: critical).
pub const SPIKE_FAILURES: usize = 150;
/// Failed logins before the successful one in a brute force that works
/// (the sequence rule's `min_count`).
pub const BRUTE_FORCE_SUCCESS_FAILURES: usize = 5;

/// Usernames a password sprayer tries: mostly accounts that do not exist.
const SPRAYED_NAMES: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "test",
    "guest",
    "info",
    "support",
    "sales",
    "webmaster",
    "oracle",
    "backup",
    "operator",
    "postgres",
    "helpdesk",
    "service",
];

const ATTACKER_AGENTS: &[&str] = &["python-requests/2.32.3", "Mozilla/5.0 (Hydra)", "curl/8.5.0", "Go-http-client/1.1"];

/// One attack a detection rule exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// Many failed logins on one user from one address.
    BruteForce,
    /// One address tries one password on many usernames.
    Spraying,
    /// Failed logins from many users and addresses at once.
    Spike,
    /// Failed logins on one user, then a successful login.
    BruteForceSuccess,
}

impl Attack {
    pub const ALL: [Attack; 4] = [Attack::BruteForce, Attack::Spraying, Attack::BruteForceSuccess, Attack::Spike];

    pub fn name(self) -> &'static str {
        match self {
            Attack::BruteForce => "brute force",
            Attack::Spraying => "password spraying",
            Attack::Spike => "system-wide spike",
            Attack::BruteForceSuccess => "brute force followed by success",
        }
    }
}

/// What an attack episode did, in words, with its events.
#[derive(Debug, Clone)]
pub struct Episode {
    pub attack: Attack,
    /// E.g. `12 failed logins on user 1002417 from 203.0.113.7`.
    pub summary: String,
    pub events: Vec<AuthEvent>,
}

/// Ordinary traffic of a user population plus attack episodes on accounts
/// outside it, from documentation address ranges (RFC 5737, RFC 2544), so
/// that every alert an attack causes names the attack's own subjects.
pub struct Traffic {
    ordinary: EventGenerator,
    rng: Rng,
}

impl Traffic {
    /// `failure_per_mille`: failed logins in ordinary traffic (None: the
    /// realistic mix's 12 %).
    pub fn new(seed: u64, users: u64, failure_per_mille: Option<u64>) -> Traffic {
        let ordinary = EventGenerator::new(seed, users);
        let ordinary = match failure_per_mille {
            Some(p) => ordinary.with_failure_per_mille(p),
            None => ordinary,
        };
        Traffic { ordinary, rng: Rng::new(seed ^ 0x5eed_a77a_c4ed_0001) }
    }

    /// One ordinary event.
    pub fn ordinary(&mut self, at: EpochMicros) -> AuthEvent {
        self.ordinary.next_event(at)
    }

    /// One episode of `attack`; its events are 1 ms apart from `at`.
    pub fn attack(&mut self, attack: Attack, at: EpochMicros) -> Episode {
        let agent = ATTACKER_AGENTS[self.rng.below(ATTACKER_AGENTS.len() as u64) as usize];
        let mut events = Vec::new();
        let summary = match attack {
            Attack::BruteForce => {
                let (victim, ip) = (self.victim(), self.address([203, 0, 113]));
                for _ in 0..BRUTE_FORCE_ATTEMPTS {
                    events.push(self.attempt(FAILED_LOGIN, Some(&victim), &user_name(&victim), ip, agent));
                }
                format!("{BRUTE_FORCE_ATTEMPTS} failed logins on user {victim} from {ip}")
            }
            Attack::Spraying => {
                let ip = self.address([198, 51, 100]);
                for name in SPRAYED_NAMES.iter().take(SPRAY_USERNAMES) {
                    events.push(self.attempt(FAILED_LOGIN, None, name, ip, agent));
                }
                format!("{SPRAY_USERNAMES} usernames tried from {ip}, one failed login each")
            }
            Attack::BruteForceSuccess => {
                let (victim, ip) = (self.victim(), self.address([192, 0, 2]));
                for _ in 0..BRUTE_FORCE_SUCCESS_FAILURES {
                    events.push(self.attempt(FAILED_LOGIN, Some(&victim), &user_name(&victim), ip, agent));
                }
                let mut success = self.attempt(LOGIN, Some(&victim), &user_name(&victim), ip, agent);
                success.session_id = Some(format!("s-{victim}-{:x}", self.rng.below(1 << 32)));
                success.metadata.clear();
                events.push(success);
                format!(
                    "{BRUTE_FORCE_SUCCESS_FAILURES} failed logins on user {victim} from {ip}, then a successful login"
                )
            }
            Attack::Spike => {
                let users = self.ordinary.users();
                for _ in 0..SPIKE_FAILURES {
                    let user = self.rng.below(users).to_string();
                    // A botnet: addresses all over 198.18.0.0/15.
                    let ip = IpAddr::V4(Ipv4Addr::new(
                        198,
                        18 + self.rng.below(2) as u8,
                        self.rng.below(256) as u8,
                        1 + self.rng.below(254) as u8,
                    ));
                    events.push(self.attempt(FAILED_LOGIN, Some(&user), &user_name(&user), ip, agent));
                }
                format!("{SPIKE_FAILURES} failed logins from {SPIKE_FAILURES} users and addresses")
            }
        };
        for (i, e) in events.iter_mut().enumerate() {
            e.occurred_at = at + i as i64 * 1000;
        }
        Episode { attack, summary, events }
    }

    /// An account outside the ordinary population, new for each episode.
    fn victim(&mut self) -> String {
        (self.ordinary.users() + 1_000_000 + self.rng.below(1_000_000)).to_string()
    }

    fn address(&mut self, net: [u8; 3]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(net[0], net[1], net[2], 1 + self.rng.below(254) as u8))
    }

    fn attempt(&mut self, action: &str, user_id: Option<&str>, username: &str, ip: IpAddr, agent: &str) -> AuthEvent {
        let reason = if user_id.is_some() { "invalid_password" } else { "unknown_user" };
        AuthEvent {
            event_id: self.rng.uuid(),
            occurred_at: 0,
            action: action.to_owned(),
            user_id: user_id.map(str::to_owned),
            username: Some(username.to_owned()),
            ip_address: Some(ip),
            user_agent: Some(agent.to_owned()),
            session_id: None,
            request_id: Some(format!("r-{:016x}", self.rng.next_u64())),
            metadata: vec![("reason".to_owned(), reason.to_owned())],
        }
    }
}

fn user_name(user_id: &str) -> String {
    format!("user{user_id}@example.com")
}

/// What `audit-service produce --scenario` plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Ordinary traffic only.
    Normal,
    /// Ordinary traffic and, every `--attack-every` events, a brute force on one user.
    BruteForce,
    /// Ordinary traffic and, every `--attack-every` events, password spraying from one IP.
    Spraying,
    /// Ordinary traffic and, every `--attack-every` events, a system-wide spike of failed logins.
    Spike,
    /// Ordinary traffic and, every `--attack-every` events, a brute force followed by a successful login.
    BruteForceSuccess,
    /// Ordinary traffic and each of the attacks in turn.
    Mixed,
}

impl Scenario {
    /// The attacks the scenario cycles through.
    pub fn attacks(self) -> &'static [Attack] {
        match self {
            Scenario::Normal => &[],
            Scenario::BruteForce => &[Attack::BruteForce],
            Scenario::Spraying => &[Attack::Spraying],
            Scenario::Spike => &[Attack::Spike],
            Scenario::BruteForceSuccess => &[Attack::BruteForceSuccess],
            Scenario::Mixed => &Attack::ALL,
        }
    }
}

/// A scenario as an endless stream: an attack episode first, then
/// `attack_every` ordinary events, the next episode, and so on. Each event
/// is stamped with the time it is asked for, so that event time follows the
/// wall clock at any rate.
pub struct ScenarioStream {
    traffic: Traffic,
    attacks: &'static [Attack],
    attack_every: u64,
    since_attack: u64,
    next_attack: usize,
    pending: VecDeque<AuthEvent>,
}

impl ScenarioStream {
    pub fn new(scenario: Scenario, traffic: Traffic, attack_every: u64) -> ScenarioStream {
        ScenarioStream {
            traffic,
            attacks: scenario.attacks(),
            attack_every,
            since_attack: attack_every,
            next_attack: 0,
            pending: VecDeque::new(),
        }
    }

    pub fn next_event(&mut self, at: EpochMicros) -> AuthEvent {
        if self.pending.is_empty() && !self.attacks.is_empty() && self.since_attack >= self.attack_every {
            let attack = self.attacks[self.next_attack % self.attacks.len()];
            self.next_attack += 1;
            self.since_attack = 0;
            self.pending.extend(self.traffic.attack(attack, at).events);
        }
        match self.pending.pop_front() {
            Some(mut e) => {
                e.occurred_at = at;
                e
            }
            None => {
                self.since_attack += 1;
                self.traffic.ordinary(at)
            }
        }
    }
}

/// The Kafka key of an event: the user id (the contract), else the
/// username as typed, so that one account's events stay in order.
pub fn event_key(event: &AuthEvent) -> Option<&str> {
    event.user_id.as_deref().or(event.username.as_deref())
}

/// `--format` of the load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadFormat {
    /// JSON with the field names of schemas/auth_event.avsc.
    Json,
    /// Confluent wire format (magic byte, schema id, Avro body).
    AvroConfluent,
    /// Avro single-object encoding (schema fingerprint, Avro body).
    AvroSingleObject,
}

impl PayloadFormat {
    pub fn wire(self, schema_id: u32) -> WireFormat {
        match self {
            PayloadFormat::Json => WireFormat::Json,
            PayloadFormat::AvroConfluent => WireFormat::AvroConfluent(schema_id),
            PayloadFormat::AvroSingleObject => WireFormat::AvroSingleObject,
        }
    }
}

// ---------------------------------------------------------------------------
// Producing at a rate
// ---------------------------------------------------------------------------

/// Counts the broker's acknowledgements of a producer.
#[derive(Debug, Default)]
pub struct DeliveryCounter {
    acknowledged: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DeliveryCounter {
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for DeliveryCounter {
    /// Client-wide errors (all brokers down, authentication failed) repeat
    /// while they last: kept as the last error, reported with the progress.
    fn error(&self, error: KafkaError, reason: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{error}: {reason}"));
    }
}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Sends one event, keyed by [`event_key`], waiting for room when the
/// producer's queue is full (or until `stop`).
pub fn send_event<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    topic: &str,
    event: &AuthEvent,
    format: WireFormat,
    stop: &AtomicBool,
) -> Result<bool, KafkaError> {
    let payload = encode(event, format);
    let key = event_key(event);
    loop {
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(&payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        match producer.send(record) {
            Ok(()) => return Ok(true),
            Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// What `audit-service produce` does.
#[derive(Debug, Clone)]
pub struct ProducePlan {
    pub topic: String,
    pub scenario: Scenario,
    pub format: WireFormat,
    /// Events per second; 0 = as fast as the producer takes them.
    pub rate: u64,
    /// Events in all; 0 = until stopped.
    pub count: u64,
    pub users: u64,
    pub seed: u64,
    /// Failed logins in ordinary traffic, ‰ (None: the realistic mix).
    pub failure_per_mille: Option<u64>,
    /// Ordinary events between two attack episodes.
    pub attack_every: u64,
    /// How long to wait for the last acknowledgements.
    pub flush_timeout: Duration,
}

/// Progress and outcome of a produce run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProduceProgress {
    pub produced: u64,
    pub acknowledged: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl ProduceProgress {
    pub fn rate(&self) -> f64 {
        self.produced as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How often [`produce`] reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Plays `plan` into Kafka: paced to `plan.rate`, until `plan.count` events
/// or `stop`; then waits for the acknowledgements. `progress` is called
/// every two seconds.
pub fn produce(
    producer: &BaseProducer<DeliveryCounter>,
    plan: &ProducePlan,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&ProduceProgress),
) -> Result<ProduceProgress, LoadgenError> {
    let traffic = Traffic::new(plan.seed, plan.users, plan.failure_per_mille);
    let mut stream = ScenarioStream::new(plan.scenario, traffic, plan.attack_every);
    let start = Instant::now();
    let mut last_report = start;
    let mut produced = 0u64;
    let snapshot = |produced: u64| ProduceProgress {
        produced,
        acknowledged: producer.context().acknowledged(),
        failed: producer.context().failed(),
        elapsed: start.elapsed(),
    };
    while (plan.count == 0 || produced < plan.count) && !stop.load(Ordering::Relaxed) {
        if plan.rate > 0 {
            // The n-th event is due at n / rate seconds.
            let due = start + Duration::from_secs_f64(produced as f64 / plan.rate as f64);
            let now = Instant::now();
            if due > now {
                // poll() serves delivery reports while it waits.
                producer.poll((due - now).min(Duration::from_millis(100)));
                continue;
            }
        }
        let event = stream.next_event(chrono::Utc::now().timestamp_micros());
        if !send_event(producer, &plan.topic, &event, plan.format, stop)? {
            break;
        }
        produced += 1;
        if produced.is_multiple_of(256) {
            producer.poll(Duration::ZERO);
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            progress(&snapshot(produced));
        }
    }
    // Unacknowledged messages after the timeout count as failed below.
    let _ = producer.flush(plan.flush_timeout);
    let mut done = snapshot(produced);
    done.failed = done.failed.max(produced - done.acknowledged.min(produced));
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{DetectConfig, Detector};
    use crate::event::json::decode_json;

    #[test]
    fn generator_is_deterministic_and_json_round_trips() {
        let mut a = EventGenerator::new(7, 1000);
        let mut b = EventGenerator::new(7, 1000);
        for i in 0..1000 {
            let e = a.next_event(1_700_000_000_000_000 + i);
            assert_eq!(e, b.next_event(1_700_000_000_000_000 + i));
            assert_eq!(decode_json(&encode_json(&e)).unwrap(), e);
        }
    }

    #[test]
    fn failure_share_is_configurable_and_other_actions_keep_their_proportions() {
        let mut g = EventGenerator::new(3, 1000).with_failure_per_mille(5);
        let n = 200_000;
        let mut failures = 0;
        let mut logins = 0;
        for i in 0..n {
            match g.next_event(i).action.as_str() {
                FAILED_LOGIN => failures += 1,
                LOGIN => logins += 1,
                _ => {}
            }
        }
        // 0.5 % of 200,000 = 1,000; logins keep 40/88 of the rest.
        assert!((800..1200).contains(&failures), "{failures}");
        let expected_logins = (n - 1000) * 40 / 88;
        assert!((logins - expected_logins).abs() < 2000, "{logins} vs {expected_logins}");
    }

    fn rules_raised(events: &[AuthEvent]) -> Vec<(String, &'static str, &'static str)> {
        let mut detector = Detector::new(&DetectConfig::default()).unwrap();
        let mut out = Vec::new();
        for e in events {
            detector.observe(e, 0, &mut out);
        }
        out.iter().map(|t| (t.rule.clone(), t.state.as_str(), t.severity.as_str())).collect()
    }

    #[test]
    fn each_attack_raises_the_rules_it_is_for_with_the_default_rules() {
        let t0 = 1_800_000_000_000_000;
        let mut traffic = Traffic::new(11, 2000, Some(5));
        let raised = |attack: Attack, traffic: &mut Traffic| rules_raised(&traffic.attack(attack, t0).events);
        let fired = |v: &[(String, &str, &str)]| {
            let mut rules: Vec<String> =
                v.iter().filter(|(_, s, _)| *s == "firing").map(|(r, _, _)| r.clone()).collect();
            rules.sort();
            rules.dedup();
            rules
        };
        let brute = raised(Attack::BruteForce, &mut traffic);
        assert_eq!(fired(&brute), ["ip_failed_logins", "user_failed_logins"]);
        assert!(brute.contains(&("user_failed_logins".into(), "escalated", "critical")), "{brute:?}");
        let spray = raised(Attack::Spraying, &mut traffic);
        assert_eq!(fired(&spray), ["ip_failed_logins", "ip_password_spraying"]);
        let success = raised(Attack::BruteForceSuccess, &mut traffic);
        assert_eq!(fired(&success), ["brute_force_success"]);
        let spike = raised(Attack::Spike, &mut traffic);
        assert_eq!(fired(&spike), ["system_failed_logins"]);
        assert!(spike.contains(&("system_failed_logins".into(), "escalated", "critical")), "{spike:?}");
    }

    #[test]
    fn quiet_ordinary_traffic_raises_nothing() {
        // The demo's background: 30 events/s for two minutes, 0.5 % failed.
        let mut traffic = Traffic::new(5, 2000, Some(5));
        let t0 = 1_800_000_000_000_000;
        let events: Vec<AuthEvent> = (0..3600).map(|i| traffic.ordinary(t0 + i * 33_333)).collect();
        assert_eq!(rules_raised(&events), []);
    }

    #[test]
    fn a_scenario_stream_opens_with_an_attack_and_repeats_it() {
        let traffic = Traffic::new(1, 100, None);
        let mut stream = ScenarioStream::new(Scenario::Mixed, traffic, 10);
        let events: Vec<AuthEvent> = (0..200).map(|i| stream.next_event(i)).collect();
        // Brute force first: its failures share one victim outside 0..100.
        let victim = events[0].user_id.clone().unwrap();
        assert!(victim.parse::<u64>().unwrap() >= 100);
        assert!(events[..BRUTE_FORCE_ATTEMPTS].iter().all(|e| e.user_id.as_deref() == Some(&victim)));
        // Then ten ordinary events, then the spraying run.
        let spray = &events[BRUTE_FORCE_ATTEMPTS + 10..BRUTE_FORCE_ATTEMPTS + 10 + SPRAY_USERNAMES];
        assert!(spray.iter().all(|e| e.user_id.is_none() && e.ip_address == spray[0].ip_address));
        // Stamped with the time asked for, in order.
        assert!(events.iter().enumerate().all(|(i, e)| e.occurred_at == i as i64));
        assert_eq!(event_key(&spray[0]), spray[0].username.as_deref());
        // Normal: no attack at all.
        let mut normal = ScenarioStream::new(Scenario::Normal, Traffic::new(1, 100, None), 10);
        assert!((0..200).all(|i| normal.next_event(i).user_id.unwrap().parse::<u64>().unwrap() < 100));
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}
