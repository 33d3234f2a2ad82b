//! Distinct active users in the last hour, approximated with HyperLogLog:
//! one sketch of 4,096 registers per minute of event time, merged over the
//! last 60 minutes (standard error about 1.6 %). Memory stays at most 61
//! sketches (~250 KiB) whatever the number of users.

use std::collections::VecDeque;
use std::hash::Hasher;

use crate::detect::keys::StableHasher;
use crate::event::EpochMicros;

const P: u32 = 12;
const M: usize = 1 << P;
const MINUTE: i64 = 60_000_000;

#[derive(Default)]
pub struct ActiveUsers {
    /// (minute index, registers), oldest first.
    minutes: VecDeque<(i64, Box<[u8; M]>)>,
}

impl ActiveUsers {
    pub fn add(&mut self, user: &str, at: EpochMicros) {
        let minute = at.div_euclid(MINUTE);
        let newest = self.minutes.back().map_or(minute, |(m, _)| *m);
        if minute < newest - 59 {
            return; // older than the hour we report
        }
        // Nearly every event is in the newest minute: look there first.
        let newest_index = self.minutes.len().checked_sub(1).filter(|i| self.minutes[*i].0 == minute);
        let index = match newest_index.or_else(|| self.minutes.iter().position(|(m, _)| *m == minute)) {
            Some(i) => i,
            None => {
                let at = self.minutes.partition_point(|(m, _)| *m < minute);
                self.minutes.insert(at, (minute, Box::new([0; M])));
                let newest = self.minutes.back().map_or(minute, |(m, _)| *m);
                while self.minutes.front().is_some_and(|(m, _)| *m < newest - 59) {
                    self.minutes.pop_front();
                }
                match self.minutes.iter().position(|(m, _)| *m == minute) {
                    Some(i) => i,
                    None => return,
                }
            }
        };
        let mut h = StableHasher::default();
        h.write(user.as_bytes());
        let hash = h.finish();
        let register = (hash >> (64 - P)) as usize;
        let rank = ((hash << P) | (1 << (P - 1))).leading_zeros() as u8 + 1;
        let slot = &mut self.minutes[index].1[register];
        *slot = (*slot).max(rank);
    }

    /// Estimated distinct users over the 60 minutes ending at the newest
    /// minute seen.
    pub fn estimate(&self) -> f64 {
        let mut merged = [0u8; M];
        for (_, regs) in &self.minutes {
            for (m, r) in merged.iter_mut().zip(regs.iter()) {
                *m = (*m).max(*r);
            }
        }
        let m = M as f64;
        let sum: f64 = merged.iter().map(|r| 2f64.powi(-i32::from(*r))).sum();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let zeros = merged.iter().filter(|r| **r == 0).count();
        if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln() // linear counting for small numbers
        } else {
            raw
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_within_a_few_percent_and_forgets_old_minutes() {
        let mut a = ActiveUsers::default();
        for u in 0..50_000 {
            a.add(&format!("user{u}"), (u % 60) * MINUTE);
        }
        // Duplicates do not count.
        for u in 0..50_000 {
            a.add(&format!("user{u}"), 30 * MINUTE);
        }
        let e = a.estimate();
        assert!((e - 50_000.0).abs() / 50_000.0 < 0.05, "{e}");
        // Two hours later, only the new users remain.
        for u in 0..100 {
            a.add(&format!("late{u}"), 180 * MINUTE);
        }
        let e = a.estimate();
        assert!((e - 100.0).abs() < 5.0, "{e}");
    }
}
