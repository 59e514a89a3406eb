//! A token bucket with the time passed in: how often something costly may be done on the
//! word of a peer that has not proved anything yet. [`crate::crypto`] spends one token per
//! key derivation for an ESP epoch it has not seen (boringtun rate-limits its handshakes for
//! the same reason). Integer arithmetic in thousandths of a token, so no float and no clock.

/// Thousandths of a token in one token.
const MILLI: u64 = 1000;

/// Up to `burst` tokens, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Thousandths of a token held.
    milli: u64,
    /// When `milli` was last brought up to date, in milliseconds.
    at_ms: u64,
}

/// How large a bucket is and how fast it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub per_sec: u32,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub fn full(rate: Rate, now_ms: u64) -> Bucket {
        Bucket {
            milli: u64::from(rate.burst) * MILLI,
            at_ms: now_ms,
        }
    }

    /// Takes a token at `now_ms` if there is one. Time that runs backwards adds nothing.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        // `per_sec` tokens a second are `per_sec` thousandths a millisecond.
        let cap = u64::from(rate.burst) * MILLI;
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(rate.per_sec)))
            .min(cap);
        self.at_ms = self.at_ms.max(now_ms);
        if self.milli >= MILLI {
            self.milli -= MILLI;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        burst: 4,
        per_sec: 2,
    };

    fn taken(b: &mut Bucket, now_ms: u64, tries: u32) -> u32 {
        (0..tries).filter(|_| b.take(RATE, now_ms)).count() as u32
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut b = Bucket::full(RATE, 1_000);
        assert_eq!(taken(&mut b, 1_000, 100), 4);
        // Half a second: one token (2 a second).
        assert_eq!(taken(&mut b, 1_500, 100), 1);
        assert_eq!(taken(&mut b, 1_999, 100), 0);
        assert_eq!(taken(&mut b, 2_000, 100), 1);
        // A long quiet spell refills to the burst, no further.
        assert_eq!(taken(&mut b, 3_600_000, 100), 4);
    }

    #[test]
    fn time_going_backwards_gives_nothing() {
        let mut b = Bucket::full(RATE, 10_000);
        assert_eq!(taken(&mut b, 10_000, 100), 4);
        assert_eq!(taken(&mut b, 0, 100), 0);
        // Nor does it earn twice the same span once time moves on again.
        assert_eq!(taken(&mut b, 10_500, 100), 1);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let mut b = Bucket::full(RATE, 0);
        assert_eq!(taken(&mut b, u64::MAX, 100), 4);
        let r = Rate {
            burst: u32::MAX,
            per_sec: u32::MAX,
        };
        let mut b = Bucket::full(r, 0);
        assert!(b.take(r, u64::MAX));
    }
}
