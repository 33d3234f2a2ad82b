//! Detector benchmarks, each beside a baseline measured in the same run:
//!
//! ```text
//! cargo bench --bench detect
//! ```
//!
//! 1. Throughput with all five default rules on, one core: the realistic
//!    mix of the load generator (1 M users), against a straightforward
//!    implementation a team would write first (string keys, a `VecDeque` of
//!    times per key and rule).
//! 2. Memory per tracked user at 1 M users, measured by a counting
//!    allocator (every byte the detector holds on the heap).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use audit_service::detect::{DetectConfig, Detector};
use audit_service::event::AuthEvent;
use audit_service::loadgen::EventGenerator;

/// Counts live heap bytes, so that memory is measured, not estimated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const S: i64 = 1_000_000;

/// The first implementation a team would write: the same five rules, keyed
/// by formatted subject strings, a deque of event times per key.
#[derive(Default)]
struct NaiveDetector {
    user_failures: HashMap<String, VecDeque<i64>>,
    system_failures: VecDeque<i64>,
    ip_failures: HashMap<String, VecDeque<i64>>,
    ip_usernames: HashMap<String, HashMap<String, i64>>,
    brute_user: HashMap<String, VecDeque<i64>>,
    brute_ip: HashMap<String, VecDeque<i64>>,
    alerts: u64,
}

fn slide(q: &mut VecDeque<i64>, t: i64, window: i64) -> usize {
    q.push_back(t);
    while q.front().is_some_and(|x| *x <= t - window) {
        q.pop_front();
    }
    q.len()
}

impl NaiveDetector {
    fn observe(&mut self, e: &AuthEvent) {
        let t = e.occurred_at;
        let user = format!("user:{}", e.user_id.as_deref().or(e.username.as_deref()).unwrap_or(""));
        let ip = format!("ip:{}", e.ip_address.map(|i| i.to_string()).unwrap_or_default());
        match e.action.as_str() {
            "FAILED_AUTH_LOGIN" => {
                if slide(self.user_failures.entry(user.clone()).or_default(), t, 60 * S) == 6 {
                    self.alerts += 1;
                }
                if slide(&mut self.system_failures, t, 60 * S) == 51 {
                    self.alerts += 1;
                }
                if slide(self.ip_failures.entry(ip.clone()).or_default(), t, 3600 * S) == 11 {
                    self.alerts += 1;
                }
                let names = self.ip_usernames.entry(ip.clone()).or_default();
                names.insert(e.username.clone().unwrap_or_default(), t);
                names.retain(|_, seen| *seen > t - 600 * S);
                if names.len() == 11 {
                    self.alerts += 1;
                }
                slide(self.brute_user.entry(user).or_default(), t, 600 * S);
                slide(self.brute_ip.entry(ip).or_default(), t, 600 * S);
            }
            "AUTH_LOGIN" => {
                for (map, key) in [(&mut self.brute_user, user), (&mut self.brute_ip, ip)] {
                    if let Some(q) = map.get_mut(&key) {
                        while q.front().is_some_and(|x| *x <= t - 600 * S) {
                            q.pop_front();
                        }
                        if q.len() >= 5 {
                            self.alerts += 1;
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Events in chunks the size of an ingest batch, generated just before they
/// are timed: as in the pipeline, the detector sees freshly decoded events
/// (warm in cache), not a cold multi-gigabyte array.
struct Chunks {
    generator: EventGenerator,
    next: usize,
    total: usize,
    buf: Vec<AuthEvent>,
}

const CHUNK: usize = 4096;
const EVENTS: usize = 2_000_000;

fn events_total() -> usize {
    std::env::var("AUDIT_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(EVENTS)
}

impl Chunks {
    fn new(users: u64) -> Chunks {
        Chunks {
            generator: EventGenerator::new(9, users),
            next: 0,
            total: events_total(),
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn next_chunk(&mut self) -> Option<&[AuthEvent]> {
        if self.next >= self.total {
            return None;
        }
        self.buf.clear();
        let t0 = 1_800_000_000 * S;
        for i in self.next..(self.next + CHUNK).min(self.total) {
            self.buf.push(self.generator.next_event(t0 + i as i64 * 100));
        }
        self.next += self.buf.len();
        Some(&self.buf)
    }
}

fn best_of<F: FnMut() -> f64>(runs: usize, mut f: F) -> f64 {
    (0..runs).map(|_| f()).fold(f64::MAX, f64::min)
}

/// Seconds spent in `observe` over all chunks (generation not timed).
fn timed(users: u64, mut observe: impl FnMut(&AuthEvent)) -> f64 {
    let mut chunks = Chunks::new(users);
    let mut spent = 0.0;
    while let Some(chunk) = chunks.next_chunk() {
        let start = Instant::now();
        for e in chunk {
            observe(e);
        }
        spent += start.elapsed().as_secs_f64();
    }
    spent
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("detector benchmark: run with `cargo bench --bench detect`");
        return;
    }
    let only_detector = std::env::var("AUDIT_BENCH_ONLY").as_deref() == Ok("detector");
    println!(
        "| detector throughput, all 5 rules, one core ({EVENTS} events, the load generator's mix) | users | events/s | ratio |"
    );
    println!("|---|---|---|---|");
    // 100 k users (the load generator's default population), then 1 M:
    // ten times the keys, most state out of cache.
    let populations: Vec<u64> = match std::env::var("AUDIT_BENCH_USERS") {
        Ok(v) => v.split(',').filter_map(|u| u.parse().ok()).collect(),
        Err(_) => vec![100_000, 1_000_000],
    };
    for users in populations {
        let detector_s = best_of(3, || {
            let mut d = Detector::new(&DetectConfig::default()).unwrap();
            let mut out = Vec::new();
            timed(users, |e| {
                d.observe(e, 0, &mut out);
                out.clear();
            })
        });
        let n = events_total() as f64;
        if only_detector {
            let mut d = Detector::new(&DetectConfig::default()).unwrap();
            let mut out = Vec::new();
            let mut transitions = 0;
            timed(users, |e| {
                d.observe(e, 0, &mut out);
                transitions += out.len();
                out.clear();
            });
            println!(
                "| audit-service detector | {users} | {:.0} | | transitions {transitions}, keys {}, open {} |",
                n / detector_s,
                d.keys_tracked(),
                d.open_alerts()
            );
            continue;
        }
        let naive_s = best_of(3, || {
            let mut d = NaiveDetector::default();
            let spent = timed(users, |e| d.observe(e));
            std::hint::black_box(d.alerts);
            spent
        });
        println!("| naive baseline (string keys, VecDeque per key) | {users} | {:.0} | 1.00 |", n / naive_s);
        println!("| audit-service detector | {users} | {:.0} | {:.2} |", n / detector_s, naive_s / detector_s);
    }
    if only_detector {
        return;
    }

    // Memory: 1 M distinct users, each with one failed login (the common
    // case), then each with five (an attack on every account at once).
    println!();
    // Every event is within the lateness window of the last (1 µs apart):
    // the window's event ids, kept to count a retried event once, are all
    // held, the worst case for them.
    println!(
        "| tracked users | failures each | heap bytes per user (counted) | estimate by the detector | of which event ids of the lateness window (estimate, ids held) |"
    );
    println!("|---|---|---|---|---|");
    for per_user in [1usize, 5] {
        let users = 1_000_000usize;
        let mut generator = EventGenerator::new(3, 1);
        let template = generator.next_event(0);
        let before = LIVE.load(Ordering::Relaxed);
        let mut d = Detector::new(&DetectConfig::default()).unwrap();
        let mut out = Vec::new();
        let mut e = template.clone();
        e.action = "FAILED_AUTH_LOGIN".into();
        let t0 = 1_800_000_000 * S;
        for round in 0..per_user {
            for u in 0..users {
                e.user_id = Some(u.to_string());
                e.username = Some(format!("u{u}"));
                e.occurred_at = t0 + (round * users + u) as i64;
                e.event_id = uuid::Uuid::from_u128(((round * users + u) as u128) << 1 | 1);
                d.observe(&e, 0, &mut out);
                out.clear();
            }
        }
        let held = LIVE.load(Ordering::Relaxed) - before;
        let (window_bytes, window_ids) = d.recent_events();
        println!(
            "| {users} | {per_user} | {:.0} | {:.0} | {:.0} ({window_ids}) |",
            held as f64 / users as f64,
            d.approx_state_bytes() as f64 / users as f64,
            window_bytes as f64 / users as f64
        );
        drop(d);
    }
}
