//! Per-key sliding-window state, bounded by construction:
//!
//! - [`TimeList`]: the newest `cap` event times of a key (cap = highest
//!   threshold + 1, because a count above that changes nothing). One time
//!   is stored inline; more go to the heap.
//! - [`DistinctSet`]: the `cap` most recently seen distinct values with the
//!   time each was last seen.
//! - [`Buckets`]: counts per 1/64 of the window, for long windows or high
//!   thresholds where keeping every time would cost too much.
//!
//! A window at time `t` covers `(t - window, t]`.

use std::collections::VecDeque;

use super::keys::KeyMap;
use crate::event::EpochMicros;

/// Sorted event times, oldest first, at most `cap` of them. A ring, so that
/// a full list takes a new time and drops its oldest without moving the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TimeList {
    #[default]
    Empty,
    One(EpochMicros),
    Many(Box<VecDeque<EpochMicros>>),
}

impl TimeList {
    pub fn len(&self) -> usize {
        match self {
            TimeList::Empty => 0,
            TimeList::One(_) => 1,
            TimeList::Many(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th oldest time.
    pub fn get(&self, i: usize) -> Option<EpochMicros> {
        match self {
            TimeList::Empty => None,
            TimeList::One(t) => (i == 0).then_some(*t),
            TimeList::Many(v) => v.get(i).copied(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = EpochMicros> + '_ {
        let (one, many) = match self {
            TimeList::Empty => (None, None),
            TimeList::One(t) => (Some(*t), None),
            TimeList::Many(v) => (None, Some(v.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    pub fn newest(&self) -> Option<EpochMicros> {
        self.get(self.len().checked_sub(1)?)
    }

    /// How many times are at or before `t`.
    fn rank(&self, t: EpochMicros) -> usize {
        match self {
            TimeList::Empty => 0,
            TimeList::One(x) => usize::from(*x <= t),
            TimeList::Many(v) => v.partition_point(|x| *x <= t),
        }
    }

    /// Inserts `t` in order; beyond `cap` the oldest time goes.
    pub fn insert(&mut self, t: EpochMicros, cap: usize) {
        match self {
            TimeList::Empty => *self = TimeList::One(t),
            TimeList::One(first) if cap <= 1 => *first = (*first).max(t),
            TimeList::One(first) => {
                let mut v = VecDeque::with_capacity(cap.min(4));
                v.push_back((*first).min(t));
                v.push_back((*first).max(t));
                *self = TimeList::Many(Box::new(v));
            }
            TimeList::Many(v) => {
                if v.back().is_none_or(|last| *last <= t) {
                    v.push_back(t);
                } else {
                    let at = v.partition_point(|x| *x <= t);
                    v.insert(at, t);
                }
                if v.len() > cap {
                    v.pop_front();
                }
            }
        }
    }

    /// Forgets times before `before`.
    pub fn prune(&mut self, before: EpochMicros) {
        match self {
            TimeList::Empty => {}
            TimeList::One(t) => {
                if *t < before {
                    *self = TimeList::Empty;
                }
            }
            TimeList::Many(v) => {
                while v.front().is_some_and(|x| *x < before) {
                    v.pop_front();
                }
                match v.len() {
                    0 => *self = TimeList::Empty,
                    1 => *self = TimeList::One(v[0]),
                    _ => v.shrink_to_fit(),
                }
            }
        }
    }

    /// Events in the window ending at `t`.
    pub fn count_at(&self, t: EpochMicros, window: i64) -> u32 {
        (self.rank(t) - self.rank(t - window)) as u32
    }

    /// The highest count of any window that holds `t` (an out-of-order event
    /// counts in every window it falls in, not just the newest).
    pub fn peak_count_around(&self, t: EpochMicros, window: i64) -> u32 {
        self.iter()
            .filter(|x| *x >= t && *x < t + window)
            .map(|x| self.count_at(x, window))
            .max()
            .unwrap_or(0)
    }

    /// When the count falls to `threshold` or below if no more events come.
    pub fn calm_at(&self, threshold: u32, window: i64) -> Option<EpochMicros> {
        let n = threshold as usize + 1;
        let len = self.len();
        (len >= n).then(|| self.get(len - n).expect("in range") + window)
    }

    /// Heap bytes held beyond the enum itself.
    pub fn heap_bytes(&self) -> usize {
        match self {
            TimeList::Many(v) => std::mem::size_of::<VecDeque<EpochMicros>>() + v.capacity() * 8,
            _ => 0,
        }
    }
}

/// The most recently seen distinct values (by hash) and when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistinctSet {
    entries: Vec<(u64, EpochMicros)>,
}

impl DistinctSet {
    /// Records `value` seen at `t`; beyond `cap` values the least recently
    /// seen goes.
    pub fn insert(&mut self, value: u64, t: EpochMicros, cap: usize) {
        if let Some(entry) = self.entries.iter_mut().find(|(v, _)| *v == value) {
            entry.1 = entry.1.max(t);
            return;
        }
        self.entries.push((value, t));
        if self.entries.len() > cap
            && let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, (_, seen))| *seen).map(|(i, _)| i)
        {
            self.entries.swap_remove(oldest);
        }
    }

    pub fn prune(&mut self, before: EpochMicros) {
        self.entries.retain(|(_, seen)| *seen >= before);
    }

    /// Distinct values last seen in the window ending at `t`.
    pub fn count_at(&self, t: EpochMicros, window: i64) -> u32 {
        self.entries.iter().filter(|(_, seen)| *seen > t - window && *seen <= t).count() as u32
    }

    /// The highest distinct count of any window that holds `t`.
    pub fn peak_count_around(&self, t: EpochMicros, window: i64) -> u32 {
        self.entries
            .iter()
            .map(|(_, seen)| *seen)
            .filter(|x| *x >= t && *x < t + window)
            .map(|x| self.count_at(x, window))
            .max()
            .unwrap_or(0)
    }

    pub fn calm_at(&self, threshold: u32, window: i64) -> Option<EpochMicros> {
        let mut seen: Vec<EpochMicros> = self.entries.iter().map(|(_, s)| *s).collect();
        seen.sort_unstable();
        let n = threshold as usize + 1;
        (seen.len() >= n).then(|| seen[seen.len() - n] + window)
    }

    pub fn newest(&self) -> Option<EpochMicros> {
        self.entries.iter().map(|(_, s)| *s).max()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * 16
    }
}

/// Coarse counts: the window split into 64 buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Index (time / width) of the newest bucket.
    head: i64,
    counts: [u32; Buckets::N],
}

impl Buckets {
    pub const N: usize = 64;

    pub fn new() -> Self {
        Buckets { head: i64::MIN, counts: [0; Self::N] }
    }

    fn width(window: i64) -> i64 {
        (window + Self::N as i64 - 1) / Self::N as i64
    }

    pub fn insert(&mut self, t: EpochMicros, window: i64) {
        let b = t.div_euclid(Self::width(window));
        if self.head == i64::MIN {
            self.head = b;
        }
        if b > self.head {
            let shift = (b - self.head).min(Self::N as i64);
            for i in 1..=shift {
                self.counts[((self.head + i).rem_euclid(Self::N as i64)) as usize] = 0;
            }
            self.head = b;
        } else if b <= self.head - Self::N as i64 {
            return; // older than the whole window
        }
        let slot = &mut self.counts[b.rem_euclid(Self::N as i64) as usize];
        *slot = slot.saturating_add(1);
    }

    /// Events in the buckets covering the window ending at `t`.
    pub fn count_at(&self, t: EpochMicros, window: i64) -> u32 {
        if self.head == i64::MIN {
            return 0;
        }
        let b = t.div_euclid(Self::width(window)).min(self.head);
        (0..Self::N as i64)
            .map(|i| b - i)
            .filter(|idx| *idx > self.head - Self::N as i64)
            .map(|idx| self.counts[idx.rem_euclid(Self::N as i64) as usize])
            .fold(0u32, u32::saturating_add)
    }

    pub fn newest(&self, window: i64) -> Option<EpochMicros> {
        (self.head != i64::MIN).then(|| (self.head + 1) * Self::width(window) - 1)
    }

    /// When the count falls to `threshold` or below: the end of the first
    /// bucket after which the remaining ones hold no more than it.
    pub fn calm_at(&self, threshold: u32, window: i64) -> Option<EpochMicros> {
        let width = Self::width(window);
        let mut remaining = self.count_at(self.newest(window)?, window);
        if remaining <= threshold {
            return None;
        }
        for idx in (self.head - Self::N as i64 + 1)..=self.head {
            remaining -= self.counts[idx.rem_euclid(Self::N as i64) as usize].min(remaining);
            if remaining <= threshold {
                return Some((idx + 1) * width + window);
            }
        }
        None
    }
}

impl Default for Buckets {
    fn default() -> Self {
        Self::new()
    }
}

/// The states of one rule instance, by key.
pub enum KeyStates {
    Times(KeyMap<TimeList>),
    Distinct(KeyMap<DistinctSet>),
    Coarse(KeyMap<Box<Buckets>>),
}

impl KeyStates {
    pub fn len(&self) -> usize {
        match self {
            KeyStates::Times(m) => m.len(),
            KeyStates::Distinct(m) => m.len(),
            KeyStates::Coarse(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops keys whose newest event is before `before`, except `keep`;
    /// returns how many went.
    pub fn evict(&mut self, before: EpochMicros, window: i64, keep: impl Fn(u64) -> bool) -> usize {
        let n = self.len();
        match self {
            KeyStates::Times(m) => m.retain(|k, v| keep(*k) || v.newest().is_some_and(|t| t >= before)),
            KeyStates::Distinct(m) => m.retain(|k, v| keep(*k) || v.newest().is_some_and(|t| t >= before)),
            KeyStates::Coarse(m) => m.retain(|k, v| keep(*k) || v.newest(window).is_some_and(|t| t >= before)),
        }
        n - self.len()
    }

    /// Approximate bytes held: table slots plus heap per key.
    pub fn approx_bytes(&self) -> usize {
        fn table<V>(m: &KeyMap<V>) -> usize {
            // hashbrown: one control byte per bucket; buckets ≈ capacity / 7 * 8.
            let buckets = (m.capacity() * 8).div_ceil(7).next_power_of_two();
            buckets * (std::mem::size_of::<(u64, V)>() + 1)
        }
        match self {
            KeyStates::Times(m) => table(m) + m.values().map(TimeList::heap_bytes).sum::<usize>(),
            KeyStates::Distinct(m) => table(m) + m.values().map(DistinctSet::heap_bytes).sum::<usize>(),
            KeyStates::Coarse(m) => table(m) + m.len() * std::mem::size_of::<Buckets>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn time_list_keeps_the_newest_cap_times_in_order() {
        let mut l = TimeList::default();
        for t in [5, 1, 3, 9, 7] {
            l.insert(t * S, 3);
        }
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![5 * S, 7 * S, 9 * S]);
        l.prune(6 * S);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![7 * S, 9 * S]);
        l.prune(8 * S);
        assert_eq!(l, TimeList::One(9 * S));
        assert_eq!(std::mem::size_of::<TimeList>(), 16);
    }

    #[test]
    fn window_is_half_open() {
        let mut l = TimeList::default();
        l.insert(0, 10);
        l.insert(60 * S, 10);
        // (t - 60 s, t]: at 60 s the event at 0 is just outside.
        assert_eq!(l.count_at(60 * S, 60 * S), 1);
        assert_eq!(l.count_at(60 * S - 1, 60 * S), 1);
        assert_eq!(l.count_at(59 * S, 60 * S), 1);
        l.insert(1, 10);
        assert_eq!(l.count_at(60 * S, 60 * S), 2);
    }

    #[test]
    fn late_event_counts_in_every_window_it_falls_in() {
        let mut l = TimeList::default();
        for t in [10, 20, 30] {
            l.insert(t * S, 10);
        }
        l.insert(5 * S, 10);
        // Window of 20 s: the late event at 5 s and those at 10 s, 20 s.
        assert_eq!(l.peak_count_around(5 * S, 20 * S), 3);
    }

    #[test]
    fn calm_time_is_when_the_count_drops_to_the_threshold() {
        let mut l = TimeList::default();
        for t in [1, 2, 3, 4] {
            l.insert(t * S, 10);
        }
        // 4 events, threshold 2: calm once the event at 2 s leaves a 10 s window.
        assert_eq!(l.calm_at(2, 10 * S), Some(12 * S));
        assert_eq!(l.count_at(12 * S, 10 * S), 2);
        assert_eq!(l.count_at(12 * S - 1, 10 * S), 3);
        assert_eq!(l.calm_at(4, 10 * S), None);
    }

    #[test]
    fn distinct_set_is_bounded_and_counts_in_window() {
        let mut d = DistinctSet::default();
        for (v, t) in [(1, 1), (2, 2), (3, 3), (1, 4), (4, 5)] {
            d.insert(v, t * S, 3);
        }
        // cap 3: value 2 (seen longest ago) is gone.
        assert_eq!(d.count_at(5 * S, 100 * S), 3);
        assert_eq!(d.count_at(5 * S, 2 * S), 2); // 1@4 and 4@5
        assert_eq!(d.calm_at(1, 10 * S), Some(14 * S));
    }

    #[test]
    fn buckets_count_a_long_window_coarsely() {
        let day = 86_400 * S;
        let mut b = Buckets::new();
        for i in 0..60 {
            b.insert(i * 3600 * S / 2, day); // every 30 min for 30 h
        }
        // The last 24 h hold about 48 of them (bucket granularity 22.5 min).
        let n = b.count_at(59 * 1800 * S, day);
        assert!((47..=50).contains(&n), "{n}");
        assert!(b.calm_at(10, day).is_some());
    }
}
