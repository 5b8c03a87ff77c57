//! A tiny seeded random number generator, so a failing randomized test can be replayed.

use std::time::{SystemTime, UNIX_EPOCH};

/// xorshift64*: fast, small, and good enough to pick delays, queues and payloads.
/// Not for anything that needs real randomness.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn from_seed(seed: u64) -> Rng {
        // A zero state would stay zero forever; mix the seed so nearby seeds diverge at once.
        Rng { state: splitmix64(seed) | 1 }
    }

    /// Seeded from `OUTPOST_TEST_SEED` if set (to replay a failure), else from the clock. Prints
    /// the seed (captured by the test harness, shown when the test fails).
    pub fn from_env_or_time(test_name: &str) -> Rng {
        let seed = match std::env::var("OUTPOST_TEST_SEED") {
            Ok(text) => {
                text.trim().parse().unwrap_or_else(|_| panic!("OUTPOST_TEST_SEED={text:?} is not a u64"))
            }
            Err(_) => {
                SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
            }
        };
        eprintln!("{test_name}: random seed {seed} (replay with OUTPOST_TEST_SEED={seed})");
        Rng::from_seed(seed)
    }

    /// A new generator for a sub-task, independent of this one's future output.
    pub fn fork(&mut self) -> Rng {
        Rng::from_seed(self.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "empty range {low}..={high}");
        low + self.next_u64() % (high - low + 1)
    }

    /// An index below `len`.
    pub fn index(&mut self, len: usize) -> usize {
        assert!(len > 0, "no index below 0");
        (self.next_u64() % len as u64) as usize
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    /// `len` arbitrary bytes (every value 0..=255, newlines and NULs included).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }

    /// `len` printable ASCII characters without spaces or newlines.
    pub fn ascii(&mut self, len: usize) -> String {
        (0..len).map(|_| char::from(b'!' + (self.next_u64() % 94) as u8)).collect()
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_ranges_hold() {
        let mut a = Rng::from_seed(7);
        let mut b = Rng::from_seed(7);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let n = a.between(100, 800);
            assert!((100..=800).contains(&n));
            b.between(100, 800);
        }
        assert_ne!(Rng::from_seed(0).next_u64(), Rng::from_seed(1).next_u64());
        assert!(Rng::from_seed(3).ascii(500).bytes().all(|c| c.is_ascii_graphic()));
    }
}
