//! A lock-free log-linear histogram of durations (microseconds), shared by every simulated edge.
//!
//! 32 buckets per power of two (about 3 % resolution), exact below 64 µs. Recording is one atomic
//! add, so ten thousand edges record into the same histogram without a lock; a quantile is the
//! upper bound of the bucket it falls in (never below the true value).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const LINEAR_BELOW: u64 = 64;
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Enough buckets for any u64 value.
const BUCKETS: usize = (LINEAR_BELOW + (64 - 6) * SUB_BUCKETS) as usize;

pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

fn index_of(value: u64) -> usize {
    if value < LINEAR_BELOW {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros(); // >= 6
    let sub = (value >> (exponent - SUB_BUCKET_BITS)) & (SUB_BUCKETS - 1);
    (LINEAR_BELOW + u64::from(exponent - 6) * SUB_BUCKETS + sub) as usize
}

/// The largest value that falls in bucket `index`.
fn upper_bound_of(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR_BELOW {
        return index;
    }
    let exponent = (index - LINEAR_BELOW) / SUB_BUCKETS + 6;
    let sub = (index - LINEAR_BELOW) % SUB_BUCKETS;
    let width_shift = exponent - u64::from(SUB_BUCKET_BITS);
    let low = (SUB_BUCKETS + sub) << width_shift;
    low.saturating_add((1u64 << width_shift) - 1)
}

impl Histogram {
    pub fn record(&self, value: Duration) {
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.buckets[index_of(us)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The value at quantile `q` (0..=1) in microseconds; 0 when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                return upper_bound_of(index).min(self.max_us.load(Ordering::Relaxed));
            }
        }
        self.max_us.load(Ordering::Relaxed)
    }

    /// p50, p90, p99, p99.9 and max in milliseconds, and the count.
    pub fn summary(&self) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: self.count(),
            p50_ms: ms(self.quantile_us(0.50)),
            p90_ms: ms(self.quantile_us(0.90)),
            p99_ms: ms(self.quantile_us(0.99)),
            p999_ms: ms(self.quantile_us(0.999)),
            max_ms: ms(self.max_us.load(Ordering::Relaxed)),
        }
    }
}

/// Quantiles of one histogram, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values_within_three_percent() {
        for value in (0..100_000u64).chain([1 << 20, (1 << 20) + 12345, u64::MAX / 3, u64::MAX]) {
            let index = index_of(value);
            assert!(index < BUCKETS, "{value} -> {index}");
            let upper = upper_bound_of(index);
            assert!(upper >= value, "{value}: upper bound {upper}");
            assert!(upper - value <= value / 32 + 1, "{value}: upper bound {upper} too far");
            if index > 0 {
                assert!(upper_bound_of(index - 1) < value, "{value} belongs to a lower bucket");
            }
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        assert_eq!(h.quantile_us(0.99), 0);
        for us in 1..=1000 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile_us(0.5);
        assert!((500..=516).contains(&p50), "p50 {p50}");
        let p99 = h.quantile_us(0.99);
        assert!((990..=1000).contains(&p99), "p99 {p99}");
        assert_eq!(h.quantile_us(1.0), 1000);
    }
}
