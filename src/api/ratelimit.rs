//! Per-client rate limiting of the admin routes (GCRA, governor). The key
//! is the verified principal when the request authenticates, else the
//! client address: an unverified token is never a key, or a caller could
//! mint a fresh bucket per request.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::error::ApiError;

/// Forget idle clients every this many checks, so that the key map stays
/// bounded under a flood of distinct addresses.
const SWEEP_EVERY: u64 = 4096;

pub struct ClientRateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    checks: AtomicU64,
}

impl ClientRateLimiter {
    /// `per_second` 0 disables limiting.
    pub fn new(per_second: u32, burst: u32) -> ClientRateLimiter {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        ClientRateLimiter { limiter, clock: DefaultClock::default(), checks: AtomicU64::new(0) }
    }

    /// Counts one request of `client`; 429 (with the wait) over the limit.
    pub fn check(&self, client: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&client.to_owned()).map_err(|not_until| {
            metrics::counter!("audit_http_rate_limited_total").increment(1);
            let retry_after = not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1));
            ApiError::RateLimited { retry_after }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_429_per_client() {
        let limiter = ClientRateLimiter::new(1, 3);
        for _ in 0..3 {
            limiter.check("token:a").unwrap();
        }
        let err = limiter.check("token:a").unwrap_err();
        assert_eq!(err.code(), "rate_limited");
        let ApiError::RateLimited { retry_after } = err else { unreachable!() };
        assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}");
        // Another client has its own bucket.
        limiter.check("ip:192.0.2.1").unwrap();
        // Disabled: never limits.
        let off = ClientRateLimiter::new(0, 0);
        for _ in 0..100 {
            off.check("x").unwrap();
        }
    }
}
