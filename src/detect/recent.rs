//! The event ids the detectors counted recently, so that a duplicate (a
//! producer retry: the same `event_id` at another offset) is not counted
//! twice. Storage de-duplicates by `event_id`; without this the detectors
//! would not, and live alerts would differ from a replay of the stored
//! events (DESIGN guarantee 5).
//!
//! An id is kept while an event of its time can still be accepted on its
//! partition: until the partition's newest event time is more than the
//! lateness ahead of it. Past that, a duplicate is late anyway and the
//! detector drops it as such. So what is kept is one lateness window of
//! each partition (30 s of event time by default), bounded by a cap.
//!
//! Kept per partition, as a 64-bit fingerprint with the event time. A
//! duplicate has its original's time, so an event newer than everything its
//! partition has seen cannot be one: the common case (a partition's events
//! arrive nearly in time order) costs an append to a time-ordered queue, no
//! hash probe. Only an event at or behind its partition's newest time is
//! looked up: by binary search among the ordered ones, and in a small table
//! of those that arrived behind. Two distinct events of one window share a
//! fingerprint and a time with odds far below 1 in 10^15.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use super::keys::PassThroughHasher;
use crate::event::EpochMicros;

/// Ids kept at most, whatever the lateness windows hold.
pub const MAX_RECENT_EVENTS: usize = 1_000_000;

/// One partition's window.
#[derive(Default)]
struct PartitionWindow {
    /// Events in non-decreasing event time (arrived at or after the newest).
    ordered: VecDeque<(EpochMicros, u64)>,
    /// Events that arrived behind the newest: fingerprint → time.
    behind: HashMap<u64, EpochMicros, BuildHasherDefault<PassThroughHasher>>,
    /// Size of `behind` after its last sweep: the next is due at twice it.
    behind_swept_at: usize,
}

impl PartitionWindow {
    fn newest(&self) -> Option<EpochMicros> {
        self.ordered.back().map(|e| e.0)
    }

    fn len(&self) -> usize {
        self.ordered.len() + self.behind.len()
    }

    /// Forgets what is older than `horizon`; returns how many went.
    fn forget_before(&mut self, horizon: EpochMicros) -> usize {
        let before = self.len();
        while self.ordered.front().is_some_and(|e| e.0 < horizon) {
            self.ordered.pop_front();
        }
        if self.behind.len() >= (2 * self.behind_swept_at).max(64) {
            self.behind.retain(|_, t| *t >= horizon);
            self.behind_swept_at = self.behind.len();
        }
        before - self.len()
    }

    fn contains(&self, fingerprint: u64, at: EpochMicros) -> bool {
        let start = self.ordered.partition_point(|e| e.0 < at);
        self.ordered.range(start..).take_while(|e| e.0 == at).any(|e| e.1 == fingerprint)
            || self.behind.get(&fingerprint) == Some(&at)
    }
}

pub struct RecentEvents {
    partitions: Vec<PartitionWindow>,
    len: usize,
    cap: usize,
}

impl Default for RecentEvents {
    fn default() -> Self {
        RecentEvents::with_cap(MAX_RECENT_EVENTS)
    }
}

impl RecentEvents {
    pub fn with_cap(cap: usize) -> RecentEvents {
        RecentEvents { partitions: Vec::new(), len: 0, cap: cap.max(1) }
    }

    /// True the first time an event (`id`, event time `at`) is offered on
    /// partition slot `slot` while it is remembered; false for a duplicate.
    /// `lateness` is how far behind its partition's newest an event still
    /// counts.
    pub fn first_sighting(&mut self, id: u128, at: EpochMicros, slot: usize, lateness: i64) -> bool {
        if slot >= self.partitions.len() {
            self.partitions.resize_with(slot + 1, PartitionWindow::default);
        }
        let window = &mut self.partitions[slot];
        let fingerprint = fingerprint(id);
        match window.newest() {
            // Newer than all this partition has seen: new.
            None => {}
            Some(newest) if at > newest => {}
            Some(_) if window.contains(fingerprint, at) => return false,
            Some(newest) if at == newest => {}
            Some(_) => {
                window.behind.insert(fingerprint, at);
                self.len += 1;
                return true;
            }
        }
        window.ordered.push_back((at, fingerprint));
        self.len += 1;
        let newest = window.newest().unwrap_or(at);
        self.len -= window.forget_before(newest.saturating_sub(lateness));
        if self.len > self.cap {
            // More within the windows than the cap: this partition's oldest go.
            let excess = (self.len - self.cap).min(window.ordered.len());
            window.ordered.drain(..excess);
            self.len -= excess;
        }
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held, approximately.
    pub fn approx_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(EpochMicros, u64)>();
        self.partitions.iter().map(|p| p.ordered.capacity() * entry + p.behind.capacity() * (entry + 1)).sum()
    }
}

/// Event ids are mostly random (UUID v4) or random in their low half (v7):
/// folding the halves and one multiply spread any of them (so the tables
/// keyed by it hash no further).
fn fingerprint(id: u128) -> u64 {
    ((id as u64) ^ ((id >> 64) as u64).rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const S: i64 = 1_000_000;
    const LATENESS: i64 = 30 * S;

    #[test]
    fn a_duplicate_is_refused_in_order_out_of_order_and_at_equal_times() {
        let mut recent = RecentEvents::default();
        assert!(recent.first_sighting(1, 100 * S, 0, LATENESS));
        assert!(recent.first_sighting(2, 100 * S, 0, LATENESS), "same time, another event");
        assert!(recent.first_sighting(3, 95 * S, 0, LATENESS), "behind the newest");
        assert!(recent.first_sighting(4, 101 * S, 0, LATENESS));
        for (id, at) in [(1, 100), (2, 100), (3, 95), (4, 101)] {
            assert!(!recent.first_sighting(id, at * S, 0, LATENESS), "a retry of {id}");
        }
        // Another partition keeps its own window.
        assert!(recent.first_sighting(1, 100 * S, 1, LATENESS));
        assert!(!recent.first_sighting(1, 100 * S, 1, LATENESS));
        // The same id at another time is another event.
        assert!(recent.first_sighting(3, 96 * S, 0, LATENESS));
    }

    #[test]
    fn what_no_partition_accepts_is_forgotten_and_the_cap_bounds_the_rest() {
        let mut recent = RecentEvents::default();
        for id in 0..10_000u128 {
            // 1 ms apart, a window of 2 s.
            assert!(recent.first_sighting(id, id as i64 * 1_000, 0, 2 * S));
        }
        assert!(recent.len() <= 2_001, "{}", recent.len());
        assert!(!recent.first_sighting(9_999, 9_999_000, 0, 2 * S), "the newest are kept");

        let mut capped = RecentEvents::with_cap(1_000);
        for id in 0..10_000u128 {
            assert!(capped.first_sighting(id, id as i64, 0, LATENESS));
        }
        assert!(capped.len() <= 1_000, "{}", capped.len());
        assert!(!capped.first_sighting(9_999, 9_999, 0, LATENESS), "the newest are kept");
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
