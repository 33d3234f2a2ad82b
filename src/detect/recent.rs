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

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::event::EpochMicros;

/// Ids kept at most, whatever the lateness window holds.
pub const MAX_RECENT_EVENTS: usize = 1_000_000;

pub struct RecentEvents {
    seen: HashSet<u128, BuildHasherDefault<IdHasher>>,
    /// In arrival order: (event time, partition slot, id).
    order: VecDeque<(EpochMicros, u32, u128)>,
    cap: usize,
}

impl Default for RecentEvents {
    fn default() -> Self {
        RecentEvents::with_cap(MAX_RECENT_EVENTS)
    }
}

impl RecentEvents {
    pub fn with_cap(cap: usize) -> RecentEvents {
        RecentEvents { seen: HashSet::default(), order: VecDeque::new(), cap: cap.max(1) }
    }

    /// True the first time `id` is offered while it is remembered; false
    /// for a duplicate. `partition_max` holds each partition slot's newest
    /// event time, `lateness` what the detector accepts behind it.
    pub fn first_sighting(
        &mut self,
        id: u128,
        at: EpochMicros,
        slot: usize,
        partition_max: &[EpochMicros],
        lateness: i64,
    ) -> bool {
        // Forget, oldest arrival first, what no partition can accept any
        // more (and the oldest beyond the cap).
        while let Some(&(t, p, old)) = self.order.front() {
            let newest = partition_max.get(p as usize).copied().unwrap_or(EpochMicros::MAX);
            if t >= newest.saturating_sub(lateness) && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back((at, u32::try_from(slot).unwrap_or(u32::MAX), id));
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Heap bytes held, approximately.
    pub fn approx_bytes(&self) -> usize {
        // hashbrown: the value and one control byte per bucket.
        self.seen.capacity() * (std::mem::size_of::<u128>() + 1)
            + self.order.capacity() * std::mem::size_of::<(EpochMicros, u32, u128)>()
    }
}

/// Event ids are mostly random (UUID v4) or random in their low half (v7):
/// folding the halves with one multiply spreads any of them.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, i: u128) {
        self.0 = ((i as u64) ^ ((i >> 64) as u64)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn a_duplicate_is_refused_while_its_time_can_still_be_accepted() {
        let mut recent = RecentEvents::default();
        let lateness = 30 * S;
        let mut newest = vec![100 * S, 100 * S];
        assert!(recent.first_sighting(1, 100 * S, 0, &newest, lateness));
        assert!(recent.first_sighting(2, 95 * S, 1, &newest, lateness));
        assert!(!recent.first_sighting(1, 100 * S, 0, &newest, lateness), "a retry of 1");
        assert!(!recent.first_sighting(2, 95 * S, 1, &newest, lateness), "a retry of 2, other partition");
        // Partition 0 moves 31 s on: event 1 is beyond its lateness, and
        // forgotten (a duplicate of it would be late). Partition 1 has not
        // moved: event 2 stays, though it arrived after 1.
        newest[0] = 131 * S;
        assert!(recent.first_sighting(3, 131 * S, 0, &newest, lateness));
        assert_eq!(recent.len(), 2, "1 forgotten, 2 and 3 kept");
        assert!(!recent.first_sighting(2, 95 * S, 1, &newest, lateness));
        assert!(recent.first_sighting(1, 100 * S, 0, &newest, lateness), "forgotten: up to the lateness check");
    }

    #[test]
    fn the_cap_bounds_what_is_kept() {
        let mut recent = RecentEvents::with_cap(100);
        let newest = vec![0];
        for id in 0..1_000u128 {
            assert!(recent.first_sighting(id, 0, 0, &newest, 30 * S));
        }
        assert!(recent.len() <= 100);
        assert!(!recent.first_sighting(999, 0, 0, &newest, 30 * S), "the newest are the ones kept");
    }
}
