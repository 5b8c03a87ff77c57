//! How fast and in what sizes the forwarder sends on a thin line: the token bucket of
//! `forwarding.max_bandwidth` (batch bytes only: pings, reports and handshakes never wait behind
//! it), the batch sizer that keeps one batch shorter than a fraction of the ping interval at the
//! rate the line shows, and the rate meter behind the drain estimate.
//!
//! The sizer and the meter are pure (time passed in); the bucket is the one piece that sleeps.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// The bucket holds at most this long of the cap: short bursts only, refilled continuously.
const BUCKET_DEPTH: Duration = Duration::from_millis(50);
/// The smallest and largest piece a paced body is cut into.
const MIN_PIECE_BYTES: usize = 1 << 10;
const MAX_PIECE_BYTES: usize = 16 << 10;

/// A token bucket shared by every batch of one link. Waiters are served in the order they came
/// (the lock is fair), so batches leave in the order the forwarder made them, priorities included.
pub struct TokenBucket {
    bytes_per_second: f64,
    capacity_bytes: f64,
    state: tokio::sync::Mutex<BucketState>,
}

struct BucketState {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    pub fn new(bytes_per_second: u64) -> TokenBucket {
        let bytes_per_second = bytes_per_second.max(1) as f64;
        let capacity_bytes = (bytes_per_second * BUCKET_DEPTH.as_secs_f64()).max(MIN_PIECE_BYTES as f64);
        TokenBucket {
            bytes_per_second,
            capacity_bytes,
            state: tokio::sync::Mutex::new(BucketState { tokens: 0.0, refilled_at: Instant::now() }),
        }
    }

    /// The size of the pieces a body is cut into: at most one bucket, so no burst exceeds it.
    pub fn piece_bytes(&self) -> usize {
        (self.capacity_bytes as usize).clamp(MIN_PIECE_BYTES, MAX_PIECE_BYTES)
    }

    /// Waits until `bytes` may go. The debt is paid by sleeping while holding the lock, so later
    /// callers queue behind (in order) instead of overtaking.
    pub async fn take(&self, bytes: usize) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.refilled_at).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.bytes_per_second).min(self.capacity_bytes);
        state.refilled_at = now;
        state.tokens -= bytes as f64;
        if state.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-state.tokens / self.bytes_per_second);
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request body that passes `frame` through `bucket` piece by piece.
pub fn paced_body(frame: Bytes, bucket: std::sync::Arc<TokenBucket>) -> reqwest::Body {
    let piece = bucket.piece_bytes();
    let stream = futures_util::stream::unfold((frame, bucket), move |(mut rest, bucket)| async move {
        if rest.is_empty() {
            return None;
        }
        let next = rest.split_to(piece.min(rest.len()));
        bucket.take(next.len()).await;
        Some((Ok::<Bytes, std::io::Error>(next), (rest, bucket)))
    });
    reqwest::Body::wrap_stream(stream)
}

/// The smallest payload budget of a batch (a single message larger than the budget still goes).
pub const MIN_BATCH_BUDGET_BYTES: u64 = 4 << 10;
/// Where a new link starts: small enough to cross a 64 kbit/s line well within any timeout,
/// doubling with every fast batch up to `forwarding.batch_bytes`.
pub const INITIAL_BATCH_BUDGET_BYTES: u64 = 64 << 10;

/// Adapts the payload bytes of a batch to the line: a batch should take about `target` to cross
/// (beyond the round trip), a fraction of the ping interval, so on a slow line batches stay small
/// enough that each one shows progress long before the link's liveness or a request timeout
/// could count it as silence; on a fast line they grow to the configured maximum.
#[derive(Debug, Clone)]
pub struct BatchSizer {
    target: Duration,
    max_bytes: u64,
    budget_bytes: u64,
    /// The shortest time a small batch took: the round trip and fixed costs, not the transfer.
    floor: Option<Duration>,
}

impl BatchSizer {
    /// `ping_interval` of the link and `request_timeout` of a batch bound the target; `max_bytes`
    /// is `forwarding.batch_bytes`.
    pub fn new(ping_interval: Duration, request_timeout: Duration, max_bytes: u64) -> BatchSizer {
        let target = (ping_interval / 4).min(request_timeout / 4).max(Duration::from_millis(100));
        let max_bytes = max_bytes.max(MIN_BATCH_BUDGET_BYTES);
        BatchSizer { target, max_bytes, budget_bytes: INITIAL_BATCH_BUDGET_BYTES.min(max_bytes), floor: None }
    }

    /// Payload bytes for the next batch.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn target(&self) -> Duration {
        self.target
    }

    /// A batch of `payload_bytes` took `elapsed` from the first byte sent to its acknowledgement.
    pub fn observe(&mut self, payload_bytes: u64, elapsed: Duration) {
        // Only a small batch shows the round trip; a big one's time is mostly transfer. Until a
        // small one was seen the whole time counts as transfer, so the budget shrinks first.
        if payload_bytes <= MIN_BATCH_BUDGET_BYTES {
            self.floor = Some(self.floor.map_or(elapsed, |f| f.min(elapsed)));
        }
        let floor = self.floor.unwrap_or_default();
        let transfer = elapsed.saturating_sub(floor).max(Duration::from_millis(1));
        let full = payload_bytes * 2 >= self.budget_bytes;
        if transfer <= self.target && !full {
            return; // a small batch that was quick says nothing about a bigger one
        }
        let factor = (self.target.as_secs_f64() / transfer.as_secs_f64()).clamp(0.5, 2.0);
        self.budget_bytes =
            ((self.budget_bytes as f64 * factor) as u64).clamp(MIN_BATCH_BUDGET_BYTES, self.max_bytes);
    }
}

/// The recent forwarding rate (payload bytes per second the central acknowledged), smoothed over
/// about [`RateMeter::HALF_LIFE`]: what the drain estimate divides the backlog by.
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    bytes_per_second: Option<f64>,
    last_at: Option<Instant>,
    pending_bytes: u64,
}

impl RateMeter {
    pub const HALF_LIFE: Duration = Duration::from_secs(10);
    /// Samples shorter than this are pooled with the next one.
    const MIN_SAMPLE: Duration = Duration::from_millis(500);

    /// `bytes` more were acknowledged at `now`.
    pub fn record(&mut self, bytes: u64, now: Instant) {
        self.pending_bytes += bytes;
        let Some(last_at) = self.last_at else {
            self.last_at = Some(now);
            self.pending_bytes = 0; // the first ack only starts the clock
            return;
        };
        let elapsed = now.saturating_duration_since(last_at);
        if elapsed < Self::MIN_SAMPLE {
            return;
        }
        let sample = self.pending_bytes as f64 / elapsed.as_secs_f64();
        let weight = 1.0 - 0.5f64.powf(elapsed.as_secs_f64() / Self::HALF_LIFE.as_secs_f64());
        self.bytes_per_second = Some(match self.bytes_per_second {
            None => sample,
            Some(previous) => previous + (sample - previous) * weight,
        });
        self.last_at = Some(now);
        self.pending_bytes = 0;
    }

    pub fn bytes_per_second(&self) -> Option<f64> {
        self.bytes_per_second.filter(|r| *r > 0.0)
    }
}

/// Seconds to forward `backlog_bytes` at `bytes_per_second`; `None` when no rate is known yet.
pub fn drain_seconds(backlog_bytes: u64, bytes_per_second: Option<f64>) -> Option<f64> {
    if backlog_bytes == 0 {
        return Some(0.0);
    }
    bytes_per_second.map(|rate| backlog_bytes as f64 / rate)
}

/// One queue's part of the drain estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDrain {
    pub queue: String,
    pub priority: u8,
    /// Payload bytes not yet forwarded.
    pub unforwarded_bytes: u64,
}

/// Seconds until each queue's backlog is forwarded at `bytes_per_second`: its own bytes plus
/// those of every queue that goes before it or alongside it (a lower or equal priority number).
pub fn drain_estimates(queues: &[QueueDrain], bytes_per_second: Option<f64>) -> Vec<(String, Option<f64>)> {
    queues
        .iter()
        .map(|q| {
            if q.unforwarded_bytes == 0 {
                return (q.queue.clone(), Some(0.0));
            }
            let ahead: u64 =
                queues.iter().filter(|o| o.priority <= q.priority).map(|o| o.unforwarded_bytes).sum();
            (q.queue.clone(), drain_seconds(ahead, bytes_per_second))
        })
        .collect()
}

/// The payload bytes of a queue not yet forwarded, from its totals: messages after `cursor`, at
/// the queue's mean message size (the store keeps byte totals per queue, not per cursor).
pub fn unforwarded_bytes(messages: u64, bytes: u64, first_seq: u64, last_seq: u64, cursor: u64) -> u64 {
    let unforwarded = last_seq.saturating_sub(cursor.max(first_seq.saturating_sub(1)));
    if messages == 0 {
        return 0;
    }
    (bytes as u128 * u128::from(unforwarded.min(messages)) / u128::from(messages)) as u64
}

/// "~4 min at 310 kB/s": a drain estimate for people.
pub fn describe_drain(seconds: f64, bytes_per_second: f64) -> String {
    let time = match seconds {
        s if s < 90.0 => format!("~{} s", s.round() as u64),
        s if s < 90.0 * 60.0 => format!("~{} min", (s / 60.0).round() as u64),
        s => format!("~{:.1} h", s / 3600.0),
    };
    let rate = match bytes_per_second {
        r if r >= 1e6 => format!("{:.1} MB/s", r / 1e6),
        r if r >= 1e3 => format!("{} kB/s", (r / 1e3).round() as u64),
        r => format!("{} B/s", r.round() as u64),
    };
    format!("{time} at {rate}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn sizer_shrinks_on_a_slow_line_and_grows_on_a_fast_one() {
        // ping_interval 2s: one batch should take about 500 ms beyond the round trip.
        let mut sizer = BatchSizer::new(Duration::from_secs(2), Duration::from_secs(30), 4 << 20);
        assert_eq!(sizer.target(), ms(500));
        assert_eq!(sizer.budget_bytes(), INITIAL_BATCH_BUDGET_BYTES);
        // A 64 kbit/s line with a 600 ms round trip: 8 kB/s, a full batch of B bytes takes
        // 600 ms + B / 8000 s. The budget settles where the transfer takes about the target.
        sizer.observe(1000, ms(600)); // a small first batch shows the round trip
        for _ in 0..20 {
            let b = sizer.budget_bytes();
            sizer.observe(b, ms(600) + Duration::from_secs_f64(b as f64 / 8000.0));
        }
        let settled = sizer.budget_bytes();
        assert!((3_000..=8_000).contains(&settled), "settled at {settled}");
        // A fast line: the budget doubles up to the maximum.
        let mut sizer = BatchSizer::new(Duration::from_secs(300), Duration::from_secs(30), 4 << 20);
        for _ in 0..10 {
            let b = sizer.budget_bytes();
            sizer.observe(b, ms(2) + Duration::from_secs_f64(b as f64 / 100e6));
        }
        assert_eq!(sizer.budget_bytes(), 4 << 20);
        // A line too slow for even the smallest batch: the budget stays at the minimum (or one
        // step above it, where the floor learnt at the minimum is measured again).
        let mut sizer = BatchSizer::new(Duration::from_secs(1), Duration::from_secs(30), 16 << 10);
        for _ in 0..30 {
            let b = sizer.budget_bytes();
            sizer.observe(b, Duration::from_secs_f64(b as f64 / 100.0)); // 100 B/s
            assert!(sizer.budget_bytes() <= 16 << 10);
        }
        assert!(sizer.budget_bytes() <= 2 * MIN_BATCH_BUDGET_BYTES, "{}", sizer.budget_bytes());
    }

    #[test]
    fn meter_and_drain_estimate() {
        let start = Instant::now();
        let mut meter = RateMeter::default();
        assert_eq!(meter.bytes_per_second(), None);
        for i in 0..=60u64 {
            meter.record(100_000, start + Duration::from_secs(i));
        }
        let rate = meter.bytes_per_second().unwrap();
        assert!((rate - 100_000.0).abs() < 1.0, "{rate}");
        assert_eq!(drain_seconds(0, None), Some(0.0));
        assert_eq!(drain_seconds(10, None), None);
        assert_eq!(drain_seconds(1_000_000, Some(100_000.0)), Some(10.0));
        let queues = [
            QueueDrain { queue: "alarms".into(), priority: 0, unforwarded_bytes: 100_000 },
            QueueDrain { queue: "sales".into(), priority: 9, unforwarded_bytes: 900_000 },
            QueueDrain { queue: "idle".into(), priority: 5, unforwarded_bytes: 0 },
        ];
        assert_eq!(
            drain_estimates(&queues, Some(100_000.0)),
            vec![("alarms".into(), Some(1.0)), ("sales".into(), Some(10.0)), ("idle".into(), Some(0.0))]
        );
        assert_eq!(unforwarded_bytes(10, 1000, 1, 10, 5), 500);
        assert_eq!(unforwarded_bytes(10, 1000, 11, 20, 0), 1000);
        assert_eq!(unforwarded_bytes(0, 0, 1, 0, 0), 0);
        assert_eq!(describe_drain(240.0, 310_000.0), "~4 min at 310 kB/s");
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_paces_pieces_to_the_rate() {
        let bucket = TokenBucket::new(100_000);
        assert_eq!(bucket.piece_bytes(), 5_000);
        let start = Instant::now();
        for _ in 0..100 {
            bucket.take(5_000).await;
        }
        // 500 kB at 100 kB/s: 5 s, less at most the one bucket it may start with.
        let took = start.elapsed();
        assert!(took >= ms(4_900) && took <= ms(5_100), "{took:?}");
    }
}
