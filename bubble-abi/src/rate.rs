//! The credential rate limit: a token bucket per credential, enforced by
//! the guest on every credential host function of a portion (the broker
//! cannot see those calls). Its clock is the host's: the `host_time_ns`
//! of each CALL header (see [`crate::Header`]).
//!
//! The bucket starts full (`burst` uses), refills `per_sec` uses per second
//! of host time up to `burst`, and a use takes one. Time that goes
//! backwards (a copy restored on another host, whose monotonic clock is
//! behind) refills nothing and becomes the new reference; a jump forward
//! refills at most `burst`. So one step of the clock never grants more
//! than `burst` uses, whatever the host says.

/// A policy's credential rate: `burst` uses at once, `per_sec` after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CredentialRate {
    /// Uses per second of host time, in the long run (at least 1).
    pub per_sec: u32,
    /// Most uses in a burst: the bucket's size (at least 1).
    pub burst: u32,
}

/// Fractions of a use the bucket counts in (one use = 10^9 units, so a
/// nanosecond at `per_sec` adds `per_sec` units).
const UNIT: u64 = 1_000_000_000;

/// One credential's token bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    rate: CredentialRate,
    /// Level in 10^-9 uses; at most `burst × 10^9` (fits a u64 for any u32).
    level: u64,
    /// Host time of the last use or refusal.
    last_ns: Option<u64>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: CredentialRate) -> Self {
        Self {
            rate,
            level: Self::cap(rate),
            last_ns: None,
        }
    }

    fn cap(rate: CredentialRate) -> u64 {
        u64::from(rate.burst) * UNIT
    }

    /// Takes one use at host time `now_ns`: `true` if the bucket had one.
    pub fn take(&mut self, now_ns: u64) -> bool {
        if let Some(last) = self.last_ns {
            if now_ns > last {
                let add = u128::from(now_ns - last) * u128::from(self.rate.per_sec);
                let level = u128::from(self.level).saturating_add(add);
                self.level = level.min(u128::from(Self::cap(self.rate))) as u64;
            }
        }
        // Backwards: no refill, and the new time is the reference.
        self.last_ns = Some(now_ns);
        if self.level >= UNIT {
            self.level -= UNIT;
            true
        } else {
            false
        }
    }

    /// Whole uses left now (without refilling).
    pub fn available(&self) -> u64 {
        self.level / UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn bucket(per_sec: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(CredentialRate { per_sec, burst })
    }

    fn takes(b: &mut TokenBucket, now: u64, n: u32) -> u32 {
        (0..n).filter(|_| b.take(now)).count() as u32
    }

    #[test]
    fn burst_then_refused() {
        let mut b = bucket(10, 5);
        assert_eq!(takes(&mut b, 7 * SEC, 100), 5);
        assert!(!b.take(7 * SEC));
    }

    #[test]
    fn refills_at_the_rate() {
        let mut b = bucket(10, 5);
        assert_eq!(takes(&mut b, SEC, 5), 5);
        // 100 ms at 10/s is one use; 99 ms is none.
        assert!(!b.take(SEC + 99_000_000));
        assert!(b.take(SEC + 100_000_000));
        assert!(!b.take(SEC + 100_000_000));
        // Half a second later: 5 more (the fraction carried over counts).
        assert_eq!(takes(&mut b, SEC + 600_000_000, 100), 5);
    }

    #[test]
    fn never_refills_past_burst() {
        let mut b = bucket(1_000, 3);
        assert_eq!(takes(&mut b, 0, 3), 3);
        assert_eq!(takes(&mut b, u64::MAX, 100), 3);
        assert_eq!(b.available(), 0);
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut b = bucket(1, 2);
        assert_eq!(takes(&mut b, 100 * SEC, 2), 2);
        // The clock steps back (another host's monotonic clock).
        assert!(!b.take(5 * SEC));
        assert!(!b.take(SEC));
        // It counts forward from the new reference, at the rate, capped.
        assert!(!b.take(SEC + SEC / 2));
        assert!(b.take(2 * SEC + SEC / 2));
        assert_eq!(takes(&mut b, 1_000 * SEC, 10), 2);
    }

    #[test]
    fn a_back_and_forth_clock_grants_at_most_burst_per_forward_step() {
        let mut b = bucket(1_000_000, 4);
        let mut granted = 0;
        for i in 0..100u64 {
            let t = if i % 2 == 0 { 1_000 * SEC } else { 0 };
            granted += takes(&mut b, t, 10);
        }
        // 4 at the start, then at most 4 per forward step (50 of them).
        assert!(granted <= 4 + 50 * 4, "{granted}");
    }

    #[test]
    fn extreme_rates_do_not_overflow() {
        let mut b = bucket(u32::MAX, u32::MAX);
        assert!(b.take(0));
        assert!(b.take(u64::MAX));
        assert_eq!(b.available(), u64::from(u32::MAX) - 1);
    }
}
