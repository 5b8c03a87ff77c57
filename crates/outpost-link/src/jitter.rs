//! Bounded, seeded random stretch of retry delays, so that a thousand edges do not retry in lockstep.
//!
//! The jitter only ever *adds* time: a delay `d` becomes a value in `[d, d + d * max_extra_percent / 100]`.
//! Never shortening a delay keeps the contract's promises ("`primary_retry_delay` apart",
//! "every `offline_probe_interval`") true as lower bounds. The random source is a tiny xorshift64
//! generator seeded by the caller, so tests are deterministic and the driver can seed it from
//! something that differs between edges (node id, start time).

use std::time::Duration;

/// The stretch applied by [`Jitter::with_default_spread`]: up to 10 % more than the base delay.
pub const DEFAULT_JITTER_MAX_EXTRA_PERCENT: u32 = 10;

/// The largest spread accepted: a delay is at most doubled.
pub const JITTER_MAX_EXTRA_PERCENT_LIMIT: u32 = 100;

/// Substituted for a zero seed: zero is the one state xorshift never leaves.
const NONZERO_SEED_FOR_ZERO: u64 = 0x9E37_79B9_7F4A_7C15;

/// A seeded source of bounded extra delay.
#[derive(Debug, Clone)]
pub struct Jitter {
    rng_state: u64,
    max_extra_percent: u32,
}

impl Jitter {
    /// A jitter that adds up to `max_extra_percent` % (capped at 100) to each delay, drawn from a
    /// generator seeded with `seed`. The same seed gives the same sequence.
    pub fn new(seed: u64, max_extra_percent: u32) -> Self {
        Jitter {
            rng_state: if seed == 0 { NONZERO_SEED_FOR_ZERO } else { seed },
            max_extra_percent: max_extra_percent.min(JITTER_MAX_EXTRA_PERCENT_LIMIT),
        }
    }

    /// A jitter with the default spread ([`DEFAULT_JITTER_MAX_EXTRA_PERCENT`]).
    pub fn with_default_spread(seed: u64) -> Self {
        Jitter::new(seed, DEFAULT_JITTER_MAX_EXTRA_PERCENT)
    }

    /// No jitter at all: every delay is used exactly. For tests and for single-edge setups.
    pub fn none() -> Self {
        Jitter::new(1, 0)
    }

    /// The configured spread, after capping.
    pub fn max_extra_percent(&self) -> u32 {
        self.max_extra_percent
    }

    /// `base` plus a random extra in `[0, base * max_extra_percent / 100]`.
    pub fn stretch(&mut self, base: Duration) -> Duration {
        if self.max_extra_percent == 0 || base.is_zero() {
            return base;
        }
        let max_extra_nanos = base.as_nanos() * u128::from(self.max_extra_percent) / 100;
        // Delays beyond ~584 years do not fit u64 nanoseconds; validated parameters never get
        // there, and an unjittered delay is still correct.
        let Ok(max_extra_nanos) = u64::try_from(max_extra_nanos) else {
            return base;
        };
        let extra_nanos = self.next_u64() % max_extra_nanos.saturating_add(1);
        base.saturating_add(Duration::from_nanos(extra_nanos))
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.rng_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng_state = x;
        x
    }
}
