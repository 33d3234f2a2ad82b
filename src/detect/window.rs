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
        self.iter().filter(|x| *x >= t && *x < t + window).map(|x| self.count_at(x, window)).max().unwrap_or(0)
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

/// The most recently seen distinct values (by hash) and when. Boxed, so
/// that the per-key state stays one word when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistinctSet {
    // Boxed on purpose: one word in the key's entry instead of three.
    #[allow(clippy::box_collection)]
    entries: Option<Box<Vec<(u64, EpochMicros)>>>,
}

impl DistinctSet {
    fn entries(&self) -> &[(u64, EpochMicros)] {
        self.entries.as_deref().map_or(&[], |v| v.as_slice())
    }

    /// Records `value` seen at `t`; beyond `cap` values the least recently
    /// seen goes.
    pub fn insert(&mut self, value: u64, t: EpochMicros, cap: usize) {
        let entries = self.entries.get_or_insert_with(Default::default);
        if let Some(entry) = entries.iter_mut().find(|(v, _)| *v == value) {
            entry.1 = entry.1.max(t);
            return;
        }
        entries.push((value, t));
        if entries.len() > cap
            && let Some(oldest) = entries.iter().enumerate().min_by_key(|(_, (_, seen))| *seen).map(|(i, _)| i)
        {
            entries.swap_remove(oldest);
        }
    }

    pub fn prune(&mut self, before: EpochMicros) {
        if let Some(entries) = &mut self.entries {
            entries.retain(|(_, seen)| *seen >= before);
            if entries.is_empty() {
                self.entries = None;
            }
        }
    }

    /// Distinct values last seen in the window ending at `t`.
    pub fn count_at(&self, t: EpochMicros, window: i64) -> u32 {
        self.entries().iter().filter(|(_, seen)| *seen > t - window && *seen <= t).count() as u32
    }

    /// The highest distinct count of any window that holds `t`.
    pub fn peak_count_around(&self, t: EpochMicros, window: i64) -> u32 {
        self.entries()
            .iter()
            .map(|(_, seen)| *seen)
            .filter(|x| *x >= t && *x < t + window)
            .map(|x| self.count_at(x, window))
            .max()
            .unwrap_or(0)
    }

    pub fn calm_at(&self, threshold: u32, window: i64) -> Option<EpochMicros> {
        let mut seen: Vec<EpochMicros> = self.entries().iter().map(|(_, s)| *s).collect();
        seen.sort_unstable();
        let n = threshold as usize + 1;
        (seen.len() >= n).then(|| seen[seen.len() - n] + window)
    }

    pub fn newest(&self) -> Option<EpochMicros> {
        self.entries().iter().map(|(_, s)| *s).max()
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.entries.as_ref().map_or(0, |v| std::mem::size_of::<Vec<(u64, EpochMicros)>>() + v.capacity() * 16)
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

/// What one rule keeps for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleState {
    Times(TimeList),
    Distinct(DistinctSet),
    Coarse(Option<Box<Buckets>>),
}

impl RuleState {
    pub fn newest(&self, window: i64) -> Option<EpochMicros> {
        match self {
            RuleState::Times(l) => l.newest(),
            RuleState::Distinct(d) => d.newest(),
            RuleState::Coarse(b) => b.as_ref().and_then(|b| b.newest(window)),
        }
    }

    /// Forgets what lies before `before` (a coarse window forgets on its own).
    pub fn prune(&mut self, before: EpochMicros) {
        match self {
            RuleState::Times(l) => l.prune(before),
            RuleState::Distinct(d) => d.prune(before),
            RuleState::Coarse(_) => {}
        }
    }

    pub fn heap_bytes(&self) -> usize {
        match self {
            RuleState::Times(l) => l.heap_bytes(),
            RuleState::Distinct(d) => d.heap_bytes(),
            RuleState::Coarse(b) => b.as_ref().map_or(0, |_| std::mem::size_of::<Buckets>()),
        }
    }
}

/// The states of every rule that groups by one key spec, one map entry per
/// key: an event touches the key once however many rules use it. Up to four
/// rules' states sit inline in the entry.
pub enum SlotMap {
    One(KeyMap<[RuleState; 1]>),
    Two(KeyMap<[RuleState; 2]>),
    Three(KeyMap<[RuleState; 3]>),
    Four(KeyMap<[RuleState; 4]>),
    Many(KeyMap<Box<[RuleState]>>),
}

/// Runs `$body` with `$m` bound to the variant's map.
macro_rules! on_map {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            SlotMap::One($m) => $body,
            SlotMap::Two($m) => $body,
            SlotMap::Three($m) => $body,
            SlotMap::Four($m) => $body,
            SlotMap::Many($m) => $body,
        }
    };
}

fn table_bytes<V>(m: &KeyMap<V>) -> usize {
    // hashbrown: one control byte per bucket; buckets ≈ capacity / 7 * 8.
    let buckets = (m.capacity() * 8).div_ceil(7).next_power_of_two();
    buckets * (std::mem::size_of::<(u64, V)>() + 1)
}

fn entry_of<'m, V: AsMut<[RuleState]>>(
    map: &'m mut KeyMap<V>,
    key: u64,
    create: Option<&dyn Fn() -> V>,
    max_keys: usize,
) -> Result<&'m mut [RuleState], bool> {
    use std::collections::hash_map::Entry;
    let full = map.len() >= max_keys;
    match map.entry(key) {
        Entry::Occupied(o) => Ok(o.into_mut().as_mut()),
        Entry::Vacant(_) if create.is_none() => Err(false),
        Entry::Vacant(_) if full => Err(true),
        Entry::Vacant(v) => Ok(v.insert(create.expect("checked")()).as_mut()),
    }
}

impl SlotMap {
    /// An empty map for entries shaped like `template`.
    pub fn new(members: usize) -> SlotMap {
        match members {
            1 => SlotMap::One(KeyMap::default()),
            2 => SlotMap::Two(KeyMap::default()),
            3 => SlotMap::Three(KeyMap::default()),
            4 => SlotMap::Four(KeyMap::default()),
            _ => SlotMap::Many(KeyMap::default()),
        }
    }

    pub fn len(&self) -> usize {
        on_map!(self, m => m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The states of `key`; created from `template` when `create` and the
    /// map has room. `Err(true)`: not created because the map is full;
    /// `Err(false)`: absent and not asked to create.
    pub fn entry(
        &mut self,
        key: u64,
        template: &[RuleState],
        create: bool,
        max_keys: usize,
    ) -> Result<&mut [RuleState], bool> {
        macro_rules! array {
            ($m:expr, $n:literal) => {{
                let make = || -> [RuleState; $n] { std::array::from_fn(|j| template[j].clone()) };
                entry_of($m, key, create.then_some(&make as &dyn Fn() -> [RuleState; $n]), max_keys)
            }};
        }
        match self {
            SlotMap::One(m) => array!(m, 1),
            SlotMap::Two(m) => array!(m, 2),
            SlotMap::Three(m) => array!(m, 3),
            SlotMap::Four(m) => array!(m, 4),
            SlotMap::Many(m) => {
                let make = || -> Box<[RuleState]> { template.to_vec().into_boxed_slice() };
                entry_of(m, key, create.then_some(&make as &dyn Fn() -> Box<[RuleState]>), max_keys)
            }
        }
    }

    /// Keeps the keys for which `keep` says so (it may prune the states).
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &mut [RuleState]) -> bool) {
        on_map!(self, m => m.retain(|k, v| keep(*k, v.as_mut())))
    }

    pub fn keys(&self) -> Vec<u64> {
        on_map!(self, m => m.keys().copied().collect())
    }

    /// Approximate bytes held: table slots plus heap per key.
    pub fn approx_bytes(&self) -> usize {
        fn heap<V: AsRef<[RuleState]>>(m: &KeyMap<V>) -> usize {
            m.values().map(|v| v.as_ref().iter().map(RuleState::heap_bytes).sum::<usize>()).sum()
        }
        match self {
            SlotMap::One(m) => table_bytes(m) + heap(m),
            SlotMap::Two(m) => table_bytes(m) + heap(m),
            SlotMap::Three(m) => table_bytes(m) + heap(m),
            SlotMap::Four(m) => table_bytes(m) + heap(m),
            SlotMap::Many(m) => table_bytes(m) + heap(m) + m.len() * 16,
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
        assert_eq!(std::mem::size_of::<RuleState>(), 16, "two rules of a key share a 40-byte entry");
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
