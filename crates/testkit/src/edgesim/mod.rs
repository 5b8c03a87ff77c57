//! An edge simulator: N simulated edges in one process, each a client of the link protocol
//! (`outpost_core::wire`) against one central or a cluster, and a verifier that reads back what
//! the central stored.
//!
//! Each simulated edge, like a real one:
//!
//! - opens its link (`POST /v1/link` with its handshake), reads `welcome` (the central's position
//!   per queue) and then the stream of `ping`s; it reports (`POST /v1/link/report`) after the
//!   welcome and after every ping, as the edge's connectivity task does;
//! - generates messages at `rate_per_edge` per second spread over its queues, each with its own
//!   consecutive seqs, and forwards them as binary batch frames (`POST /v1/link/messages`), at most
//!   `in_flight` batches per queue at once, and more than one only when they are full (as a real
//!   edge: what arrives while a batch is in flight goes in one batch after its answer); batches in
//!   flight together can arrive
//!   out of order: the central waits for a predecessor or answers 409 with `expected_seq`, and the
//!   edge goes back there;
//! - every `replay_every`-th acknowledged batch is sent once more, and the central must answer it
//!   with every message counted as a duplicate;
//! - reopens a lost link and resumes after the central's positions from the new welcome.
//!
//! After the run every queue is read back (`GET /v1/queues/{q}/messages`) and checked per
//! (edge, queue): the seqs are 1, 2, 3… with no gap, no duplicate and no reordering, each payload
//! is the one sent, and the last seq is the last one generated ([`verify`]).
//!
//! It measures what an operator of a central cares about: time to open links, ping lateness
//! (gap between two pings minus the interval asked for), end-to-end latency (message generated →
//! the central's acknowledgement, which comes after its commit) and the backlog over time.
//!
//! # Design constraints
//!
//! - **One process, not N.** Tasks per edge (an edge loop and a stream reader), HTTP clients per
//!   edge (its own connections, like a real edge: HTTP/2 with prior knowledge, so the link stream,
//!   batches and reports are streams of one connection; HTTP/1.1 if the central does not speak
//!   HTTP/2 or with [`SimConfig::http1`]: one for the link stream, one per batch in flight, one for
//!   a report sent while a batch is in flight; at most one idle, closed after 5 s unused).
//!   Latencies go into shared lock-free histograms.
//! - **No node code.** Like the rest of testkit it shares nothing with the node: the batch frame
//!   is encoded here ([`frame`]), link events are read as JSON by their `type`, and event types it
//!   does not know (a newer central's) are counted and skipped, so protocol additions that keep
//!   old edges working keep the simulator working.
//! - **Bounded.** Per edge: at most `in_flight` batches per queue plus one replay and one report in
//!   flight, a bounded event channel, and the creation times of unacknowledged messages only.
//!   Many sockets: the process raises its own open-file limit to the hard limit, and spreads edges
//!   over loopback source addresses (127.0.0.1, 127.0.0.2, …; [`SimConfig::edges_per_source_ip`])
//!   so 10,000+ connections to one port do not run out of ephemeral ports.

mod edge;
pub mod frame;
pub mod histogram;
pub mod verify;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use histogram::{Histogram, Percentiles};

/// At most this many problem descriptions are kept (every problem is counted).
pub const MAX_PROBLEMS_KEPT: usize = 50;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Base URLs of the centrals (`http://127.0.0.1:7401`); edge i uses `centrals[i % len]`.
    pub centrals: Vec<String>,
    pub edges: usize,
    /// Edge ids are `{edge_prefix}{i:05}`. Default: `sim` plus a random run tag, so runs against the
    /// same central do not meet each other's positions.
    pub edge_prefix: String,
    /// When set, edge `id` sends `Authorization: Bearer {token_prefix}{id}` (for a central that
    /// lists its edges in `[[edge]]`).
    pub token_prefix: Option<String>,
    /// Sent as `Authorization: Bearer` when reading the queues back (a central with `[auth]`).
    pub admin_token: Option<String>,
    /// Queues each edge writes; edge i's queue j is `{queue_prefix}{(i + j) % queue_names}`.
    pub queues_per_edge: usize,
    pub queue_names: usize,
    pub queue_prefix: String,
    /// Messages per second per edge, over all its queues.
    pub rate_per_edge: f64,
    /// How long messages are generated (after the ramp).
    pub duration: Duration,
    /// Links open over this long (edge i at `ramp * i / edges`); generation starts when it ends.
    pub ramp: Duration,
    /// How long after generation ended every message must be acknowledged.
    pub drain_timeout: Duration,
    pub payload_bytes: usize,
    /// The ping interval each edge asks for in its handshake.
    pub ping_interval: Duration,
    /// Batches in flight per queue (an edge's `forwarding.in_flight`, default 4).
    pub in_flight: u32,
    /// Messages per batch at most (`forwarding.batch_messages`).
    pub batch_messages: u64,
    /// Every n-th acknowledged batch is sent again; 0: never.
    pub replay_every: u64,
    /// Each request (and the wait for the welcome) gives up after this long.
    pub request_timeout: Duration,
    /// Edges per loopback source address (127.0.0.1, then 127.0.0.2, …); 0: let the kernel choose.
    pub edges_per_source_ip: usize,
    /// Read every queue back and check it after the run.
    pub verify: bool,
    /// Print a progress line to stderr this often; `None`: quiet.
    pub progress_every: Option<Duration>,
    /// The version the handshake announces (the central refuses another major version).
    pub version: String,
    /// Speak HTTP/1.1 only, as edges did before the link was one HTTP/2 connection (the link
    /// stream, one connection per batch in flight, one for a report during a batch).
    pub http1: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            centrals: vec!["http://127.0.0.1:7401".into()],
            edges: 100,
            edge_prefix: format!("sim{:04x}-", crate::Rng::from_seed(now_nanos()).next_u64() & 0xffff),
            token_prefix: None,
            admin_token: None,
            queues_per_edge: 1,
            queue_names: 8,
            queue_prefix: "sim".into(),
            rate_per_edge: 1.0,
            duration: Duration::from_secs(10),
            ramp: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(60),
            payload_bytes: 256,
            ping_interval: Duration::from_secs(5),
            in_flight: 4,
            batch_messages: 1000,
            replay_every: 50,
            request_timeout: Duration::from_secs(30),
            edges_per_source_ip: 4000,
            verify: true,
            progress_every: None,
            version: outpost_core::VERSION.to_string(),
            http1: false,
        }
    }
}

impl SimConfig {
    pub fn edge_id(&self, index: usize) -> String {
        format!("{}{index:05}", self.edge_prefix)
    }

    pub fn queue_name(&self, edge_index: usize, queue_index: usize) -> String {
        format!("{}{}", self.queue_prefix, (edge_index + queue_index) % self.queue_names.max(1))
    }

    /// Every queue name any edge writes.
    pub fn all_queue_names(&self) -> Vec<String> {
        let used = self.queue_names.max(1).min(self.edges.saturating_add(self.queues_per_edge));
        let mut names: Vec<String> = (0..used).map(|i| format!("{}{i}", self.queue_prefix)).collect();
        names.sort();
        names.dedup();
        names
    }

    fn check(&self) -> Result<(), String> {
        if self.centrals.is_empty() || self.edges == 0 || self.queues_per_edge == 0 || self.queue_names == 0 {
            return Err("need at least one central, one edge, one queue per edge and one queue name".into());
        }
        if self.queues_per_edge > self.queue_names {
            return Err(format!(
                "{} queues per edge but only {} queue names: an edge's queues must differ",
                self.queues_per_edge, self.queue_names
            ));
        }
        if !(self.rate_per_edge > 0.0 && self.rate_per_edge.is_finite()) {
            return Err(format!("rate per edge {} must be positive", self.rate_per_edge));
        }
        if self.in_flight == 0 || self.batch_messages == 0 {
            return Err("in_flight and batch_messages must be positive".into());
        }
        if self.edge_id(self.edges).len() > 100 || self.queue_prefix.len() > 100 {
            return Err("edge and queue prefixes must be short (ids are at most 255 bytes)".into());
        }
        Ok(())
    }
}

/// Counters every edge adds to, and the shared histograms.
#[derive(Default)]
pub(crate) struct Shared {
    pub links_open: AtomicU64,
    pub links_opened: AtomicU64,
    pub link_open_failures: AtomicU64,
    pub links_lost: AtomicU64,
    pub generated: AtomicU64,
    pub acknowledged: AtomicU64,
    pub batches: AtomicU64,
    pub batch_failures: AtomicU64,
    pub gaps: AtomicU64,
    pub replays: AtomicU64,
    pub duplicates_reported: AtomicU64,
    pub pings: AtomicU64,
    pub reports_sent: AtomicU64,
    pub report_failures: AtomicU64,
    pub reports_skipped: AtomicU64,
    pub other_events: AtomicU64,
    pub problems: AtomicU64,
    pub problem_texts: Mutex<Vec<String>>,
    pub link_open_latency: Histogram,
    pub ping_lateness: Histogram,
    pub end_to_end_latency: Histogram,
    pub batch_latency: Histogram,
}

impl Shared {
    pub(crate) fn problem(&self, text: String) {
        self.problems.fetch_add(1, Ordering::Relaxed);
        let mut texts = self.problem_texts.lock().expect("problem list lock");
        if texts.len() < MAX_PROBLEMS_KEPT {
            texts.push(text);
        }
    }
}

/// What a run found. `ok()` is the simulator's own check.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    pub edges: usize,
    pub centrals: usize,
    pub queues_per_edge: usize,
    pub rate_per_edge: f64,
    pub payload_bytes: usize,
    pub generation_seconds: f64,
    pub total_seconds: f64,
    /// Wall time from the end of generation until every message was acknowledged.
    pub drain_seconds: f64,
    pub links_opened: u64,
    pub link_open_failures: u64,
    pub links_lost: u64,
    pub messages_generated: u64,
    pub messages_acknowledged: u64,
    /// Acknowledged during the generation window, per second (the offered rate is
    /// `edges × rate_per_edge`).
    pub acknowledged_per_second_while_generating: f64,
    pub offered_per_second: f64,
    pub batches: u64,
    pub batch_failures: u64,
    pub gaps: u64,
    pub replays: u64,
    pub duplicates_reported: u64,
    pub pings: u64,
    pub reports_sent: u64,
    pub report_failures: u64,
    pub reports_skipped: u64,
    /// Link events of a type the simulator does not know (skipped).
    pub other_events: u64,
    /// Generated but not acknowledged, sampled every second: the largest sample during generation
    /// and the sample when generation ended.
    pub backlog_max_while_generating: u64,
    pub backlog_at_generation_end: u64,
    pub link_open_latency: Percentiles,
    pub ping_lateness: Percentiles,
    pub end_to_end_latency: Percentiles,
    pub batch_latency: Percentiles,
    /// CPU the simulator itself used (user + system), in seconds.
    pub simulator_cpu_seconds: f64,
    pub problems: u64,
    pub problem_samples: Vec<String>,
    pub verification: Option<verify::Verification>,
}

impl SimReport {
    /// Every message generated was acknowledged, nothing went wrong, and (when verified) the
    /// central stored each message exactly once and in order.
    pub fn ok(&self) -> bool {
        self.problems == 0
            && self.messages_acknowledged == self.messages_generated
            && self.verification.as_ref().is_none_or(|v| v.ok())
    }
}

/// Runs the simulation to the end (generation, drain, verification) and reports.
pub async fn run(config: SimConfig) -> Result<SimReport, String> {
    config.check()?;
    raise_open_file_limit();
    let config = Arc::new(config);
    let shared = Arc::new(Shared::default());
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let generation_start = started + config.ramp;
    let generation_end = generation_start + config.duration;
    let drain_deadline = generation_end + config.drain_timeout;

    let sampler =
        tokio::spawn(sample_backlog(shared.clone(), config.clone(), generation_start, generation_end));
    let mut edges = tokio::task::JoinSet::new();
    for index in 0..config.edges {
        let spec =
            edge::EdgeSpec::new(&config, index, started, generation_start, generation_end, drain_deadline)?;
        edges.spawn(edge::run(spec, config.clone(), shared.clone()));
    }
    let mut acked_at_generation_end = None;
    let mut positions = Vec::with_capacity(config.edges);
    let mut end_of_generation = Box::pin(tokio::time::sleep_until(generation_end.into()));
    while !edges.is_empty() {
        tokio::select! {
            joined = edges.join_next() => match joined {
                Some(Ok(acked)) => positions.push(acked),
                Some(Err(e)) => shared.problem(format!("a simulated edge's task failed: {e}")),
                None => break,
            },
            () = &mut end_of_generation, if acked_at_generation_end.is_none() => {
                acked_at_generation_end = Some(shared.acknowledged.load(Ordering::Relaxed));
            }
        }
    }
    let drained_at = Instant::now();
    let acked_at_generation_end =
        acked_at_generation_end.unwrap_or_else(|| shared.acknowledged.load(Ordering::Relaxed));
    let (backlog_max, backlog_at_end) = sampler.await.unwrap_or((0, 0));
    let simulator_cpu_seconds = process_cpu_seconds() - cpu_before;

    let verification = if config.verify {
        let expected = positions.into_iter().flatten().collect();
        Some(verify::verify(&config, expected).await)
    } else {
        None
    };
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let problem_samples = shared.problem_texts.lock().expect("problem list lock").clone();
    let generation_seconds = config.duration.as_secs_f64();
    Ok(SimReport {
        edges: config.edges,
        centrals: config.centrals.len(),
        queues_per_edge: config.queues_per_edge,
        rate_per_edge: config.rate_per_edge,
        payload_bytes: config.payload_bytes,
        generation_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        drain_seconds: drained_at.saturating_duration_since(generation_end).as_secs_f64(),
        links_opened: load(&shared.links_opened),
        link_open_failures: load(&shared.link_open_failures),
        links_lost: load(&shared.links_lost),
        messages_generated: load(&shared.generated),
        messages_acknowledged: load(&shared.acknowledged),
        acknowledged_per_second_while_generating: acked_at_generation_end as f64 / generation_seconds,
        offered_per_second: config.edges as f64 * config.rate_per_edge,
        batches: load(&shared.batches),
        batch_failures: load(&shared.batch_failures),
        gaps: load(&shared.gaps),
        replays: load(&shared.replays),
        duplicates_reported: load(&shared.duplicates_reported),
        pings: load(&shared.pings),
        reports_sent: load(&shared.reports_sent),
        report_failures: load(&shared.report_failures),
        reports_skipped: load(&shared.reports_skipped),
        other_events: load(&shared.other_events),
        backlog_max_while_generating: backlog_max,
        backlog_at_generation_end: backlog_at_end,
        link_open_latency: shared.link_open_latency.summary(),
        ping_lateness: shared.ping_lateness.summary(),
        end_to_end_latency: shared.end_to_end_latency.summary(),
        batch_latency: shared.batch_latency.summary(),
        simulator_cpu_seconds,
        problems: load(&shared.problems),
        problem_samples: problem_samples.clone(),
        verification,
    })
}

/// Samples the backlog (generated − acknowledged) every second until generation ends; prints
/// progress when asked. Returns (largest sample, sample at the end of generation).
async fn sample_backlog(
    shared: Arc<Shared>,
    config: Arc<SimConfig>,
    generation_start: Instant,
    generation_end: Instant,
) -> (u64, u64) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut largest = 0;
    let mut last_print = Instant::now();
    loop {
        ticker.tick().await;
        let now = Instant::now();
        let generated = shared.generated.load(Ordering::Relaxed);
        let acked = shared.acknowledged.load(Ordering::Relaxed);
        let backlog = generated.saturating_sub(acked);
        if now >= generation_start {
            largest = largest.max(backlog);
        }
        if let Some(every) = config.progress_every {
            if now.duration_since(last_print) >= every {
                last_print = now;
                eprintln!(
                    "edgesim: links open {}/{}, generated {generated}, acknowledged {acked}, backlog {backlog}, \
                     pings {}, batches {} ({} failed, {} gaps), problems {}",
                    shared.links_open.load(Ordering::Relaxed),
                    config.edges,
                    shared.pings.load(Ordering::Relaxed),
                    shared.batches.load(Ordering::Relaxed),
                    shared.batch_failures.load(Ordering::Relaxed),
                    shared.gaps.load(Ordering::Relaxed),
                    shared.problems.load(Ordering::Relaxed),
                );
            }
        }
        if now >= generation_end {
            return (largest, backlog);
        }
    }
}

/// Raises this process's soft open-file limit to its hard limit (ten thousand edges need tens of
/// thousands of sockets).
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// User + system CPU time of this process, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct passed by pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
