//! The event ids the detectors counted recently, so that a duplicate (a
//! producer retry: the same `event_id` at another offset) is not counted
//! twice. Storage de-duplicates by `event_id`; without this the detectors
//! would not, and live alerts would differ from a replay of the stored
//! events (DESIGN guarantee 5).
//!
//! An id is kept while an event of its time can still be accepted on its
//! partition: until the partition's newest event time is more than the
//! lateness ahead of it. Past that, a duplicate is late anyway and the
//! detector drops it as such. So the set holds the events of one lateness
//! window (30 s of event time by default), bounded by a cap.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};

use crate::event::EpochMicros;

/// Ids kept at most, whatever the lateness window holds.
pub const MAX_RECENT_EVENTS: usize = 1_000_000;

/// Each id is kept as a 64-bit fingerprint with its event time (about 25 to
/// 50 bytes per event, with the table's slack): two distinct events of one
/// window share a fingerprint and a time with odds far below 1 in 10^15.
///
/// One table probe per event: an entry left from an older window is told
/// apart by its time (a duplicate has the time of its original) and
/// overwritten; entries beyond every partition's lateness are swept out in
/// one sequential pass when the table has doubled since the last sweep.
pub struct RecentEvents {
    seen: HashMap<u64, EpochMicros, BuildHasherDefault<IdHasher>>,
    /// Size after the last sweep: the next sweep is due at twice it.
    swept_at: usize,
    cap: usize,
}

impl Default for RecentEvents {
    fn default() -> Self {
        RecentEvents::with_cap(MAX_RECENT_EVENTS)
    }
}

impl RecentEvents {
    pub fn with_cap(cap: usize) -> RecentEvents {
        RecentEvents { seen: HashMap::default(), swept_at: 0, cap: cap.max(1) }
    }

    /// True the first time an event is offered (by `id` and event time
    /// `at`) while it is remembered; false for a duplicate. `horizon` is
    /// the oldest event time any partition still accepts (its newest minus
    /// the lateness): what is older is forgotten at the next sweep.
    pub fn first_sighting(&mut self, id: u128, at: EpochMicros, horizon: impl FnOnce() -> EpochMicros) -> bool {
        match self.seen.entry(fingerprint(id)) {
            Entry::Occupied(mut e) => {
                if *e.get() == at {
                    return false;
                }
                // A fingerprint left by an event of another time.
                e.insert(at);
                return true;
            }
            Entry::Vacant(e) => {
                e.insert(at);
            }
        }
        if self.seen.len() >= (2 * self.swept_at).max(1024) || self.seen.len() > self.cap {
            let horizon = horizon();
            self.seen.retain(|_, t| *t >= horizon);
            if self.seen.len() > self.cap {
                // Still too many within the window: keep the newest half.
                let mut times: Vec<EpochMicros> = self.seen.values().copied().collect();
                let median = *times.select_nth_unstable(self.seen.len() / 2).1;
                self.seen.retain(|_, t| *t >= median);
            }
            self.swept_at = self.seen.len();
        }
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Heap bytes held, approximately.
    pub fn approx_bytes(&self) -> usize {
        // hashbrown: the entry and one control byte per bucket.
        self.seen.capacity() * (std::mem::size_of::<(u64, EpochMicros)>() + 1)
    }
}

/// Event ids are mostly random (UUID v4) or random in their low half (v7):
/// folding the halves and one multiply spread any of them.
fn fingerprint(id: u128) -> u64 {
    ((id as u64) ^ ((id >> 64) as u64).rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Fingerprints are spread already.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const S: i64 = 1_000_000;

    #[test]
    fn a_duplicate_is_refused_while_remembered() {
        let mut recent = RecentEvents::default();
        let horizon = || 70 * S;
        assert!(recent.first_sighting(1, 100 * S, horizon));
        assert!(recent.first_sighting(2, 95 * S, horizon));
        assert!(!recent.first_sighting(1, 100 * S, horizon), "a retry of 1");
        assert!(!recent.first_sighting(2, 95 * S, horizon), "a retry of 2");
        // Another event whose id happens to match an old entry's, at
        // another time: not a duplicate.
        assert!(recent.first_sighting(2, 96 * S, horizon));
    }

    #[test]
    fn sweeps_forget_what_no_partition_accepts_and_the_cap_bounds_the_rest() {
        let mut recent = RecentEvents::default();
        for id in 0..10_000u128 {
            // Event times 1 ms apart; every partition accepts the last 2 s.
            let at = id as i64 * 1_000;
            assert!(recent.first_sighting(id, at, || at - 2 * S));
        }
        assert!(recent.len() <= 2 * 2_000 + 1, "{}", recent.len());
        assert!(!recent.first_sighting(9_999, 9_999_000, || 0), "the newest are kept");

        let mut capped = RecentEvents::with_cap(1_000);
        for id in 0..10_000u128 {
            assert!(capped.first_sighting(id, id as i64, || 0));
        }
        assert!(capped.len() <= 1_000, "{}", capped.len());
        assert!(!capped.first_sighting(9_999, 9_999, || 0), "the newest are kept");
    }

    #[test]
    fn sequential_and_random_ids_get_distinct_fingerprints() {
        let mut seen = HashSet::new();
        for i in 0..100_000u128 {
            assert!(seen.insert(fingerprint(i)));
            assert!(seen.insert(fingerprint(uuid::Uuid::new_v4().as_u128())));
        }
    }
}
