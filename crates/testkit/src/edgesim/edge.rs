//! One simulated edge: its link (handshake, event stream, reports), its message generator and its
//! batch pipeline per queue, in one task with a `select!` loop; the link stream is read by a task
//! of its own that hands events over a bounded channel.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{frame, Shared, SimConfig};

/// Events the link reader hands to the edge loop; more wait in the stream's socket.
const EVENT_CHANNEL_CAPACITY: usize = 32;
/// The longest line of the link stream the reader accepts.
const MAX_EVENT_LINE_BYTES: usize = 64 << 10;
/// Idle connections an edge's client keeps, and for how long (as a real edge).
const POOL_MAX_IDLE: usize = 1;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before reopening a lost link, or after a failed batch.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where and when one edge runs.
pub(super) struct EdgeSpec {
    id: String,
    central: String,
    token: Option<String>,
    queues: Vec<String>,
    /// HTTP/2 with prior knowledge, as a real edge speaks to an `http://` central; `None` with
    /// `SimConfig::http1` (an edge from before the link was one connection).
    http2: Option<reqwest::Client>,
    http1: reqwest::Client,
    /// The central did not speak HTTP/2 at a handshake: HTTP/1.1 from then on (a real edge tries
    /// HTTP/2 again an hour later; a run is shorter).
    http1_only: AtomicBool,
    link_at: Instant,
    /// Message k (0-based, over all queues) is due at `generation_start + (k + phase) / rate`.
    generation_start: Instant,
    generation_end: Instant,
    phase: f64,
    drain_deadline: Instant,
}

impl EdgeSpec {
    pub(super) fn new(
        config: &SimConfig,
        index: usize,
        started: Instant,
        generation_start: Instant,
        generation_end: Instant,
        drain_deadline: Instant,
    ) -> Result<EdgeSpec, String> {
        // Pooled like a real edge's client (outpost-forward's edge.rs and client.rs): HTTP/2 with
        // prior knowledge (the link, batches and reports are streams of one connection), HTTP/1.1
        // for a central that does not speak it; one idle connection at most, closed after 5 s
        // unused.
        let local_address = match index.checked_div(config.edges_per_source_ip) {
            Some(block) => {
                let host = u32::try_from(block + 1)
                    .ok()
                    .filter(|h| *h < 1 << 24)
                    .ok_or("too many source addresses")?;
                Some(IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | host)))
            }
            None => None,
        };
        let builder = || {
            reqwest::Client::builder()
                .no_proxy()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(POOL_MAX_IDLE)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .local_address(local_address)
        };
        let built =
            |b: reqwest::ClientBuilder| b.build().map_err(|e| format!("cannot build an HTTP client: {e}"));
        // The HTTP/2 connection carries the link stream all the time: its pool must not drop it
        // after 5 s without a new request (the next would open a second connection).
        let http2 = if config.http1 {
            None
        } else {
            Some(built(builder().http2_prior_knowledge().pool_idle_timeout(None))?)
        };
        let http1 = built(builder().http1_only())?;
        let id = config.edge_id(index);
        let ramp_share = if config.edges > 1 { index as f64 / config.edges as f64 } else { 0.0 };
        Ok(EdgeSpec {
            token: config.token_prefix.as_ref().map(|prefix| format!("{prefix}{id}")),
            central: config.centrals[index % config.centrals.len()].trim_end_matches('/').to_string(),
            queues: (0..config.queues_per_edge).map(|j| config.queue_name(index, j)).collect(),
            http2,
            http1,
            http1_only: AtomicBool::new(false),
            link_at: started + config.ramp.mul_f64(ramp_share),
            generation_start,
            generation_end,
            // Spreads the edges' messages evenly over each generation interval.
            phase: (index as f64 * 0.618_033_988_75).fract(),
            drain_deadline,
            id,
        })
    }
}

impl EdgeSpec {
    /// The client of this edge's requests: HTTP/2 unless the central turned out not to speak it.
    fn http(&self) -> &reqwest::Client {
        match &self.http2 {
            Some(http2) if !self.http1_only.load(Ordering::Relaxed) => http2,
            _ => &self.http1,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.request_on(self.http(), method, path)
    }

    fn request_on(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut request =
            http.request(method, format!("{}{path}", self.central)).header("outpost-edge-id", &self.id);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }
}

/// Starts one batch request of messages `seqs` of queue number `queue`.
#[allow(clippy::too_many_arguments)]
fn send_batch(
    spec: &EdgeSpec,
    config: &SimConfig,
    shared: &Arc<Shared>,
    batches: &mut JoinSet<BatchDone>,
    queue: usize,
    (first_seq, last_seq): (u64, u64),
    frame: Bytes,
    replay: bool,
) {
    let request = spec
        .request(reqwest::Method::POST, "/v1/link/messages")
        .header(reqwest::header::CONTENT_TYPE, "application/vnd.outpost.batch.v1")
        .timeout(config.request_timeout)
        .body(frame.clone());
    let shared = shared.clone();
    shared.batches.fetch_add(1, Ordering::Relaxed);
    batches.spawn(async move {
        let started = Instant::now();
        let outcome = send(request).await;
        shared.batch_latency.record(started.elapsed());
        BatchDone { queue, first_seq, last_seq, replay, frame, outcome }
    });
}

/// One queue of the edge.
struct QueueState {
    name: String,
    /// Highest seq generated.
    generated: u64,
    /// Highest seq the central said it holds.
    acked: u64,
    next_to_send: u64,
    in_flight: u32,
    replay_in_flight: bool,
    /// When each message after `acked` was generated (front: seq `acked + 1`).
    generated_at: VecDeque<Instant>,
    /// No new batch before this (after a failure).
    paused_until: Option<Instant>,
}

impl QueueState {
    /// Records the central's position: every message up to `through` is acknowledged.
    fn acknowledge(&mut self, through: u64, now: Instant, shared: &Shared) -> Result<(), String> {
        if through > self.generated {
            return Err(format!(
                "queue {}: the central says it holds seq {through} but only {} were generated",
                self.name, self.generated
            ));
        }
        while self.acked < through {
            let at = self.generated_at.pop_front().expect("a generated message has a generation time");
            shared.end_to_end_latency.record(now.saturating_duration_since(at));
            self.acked += 1;
            shared.acknowledged.fetch_add(1, Ordering::Relaxed);
        }
        self.next_to_send = self.next_to_send.max(self.acked + 1);
        Ok(())
    }
}

/// A batch request that finished.
struct BatchDone {
    queue: usize,
    first_seq: u64,
    last_seq: u64,
    replay: bool,
    frame: Bytes,
    outcome: Result<Ack, BatchError>,
}

struct Ack {
    stored_through: u64,
    stored: u64,
    duplicates: u64,
}

enum BatchError {
    Gap(u64),
    /// A 4xx that retrying will not change.
    Refused(String),
    /// No answer, a timeout, a 5xx (maintenance, stopping): try again.
    Transient(String),
}

/// What the link reader hands over.
enum LinkEvent {
    Welcome { positions: BTreeMap<String, u64>, maintenance: bool },
    Ping,
    Other(String),
    Lost(String),
}

/// An open link; dropping it closes the connection.
struct Link {
    events: mpsc::Receiver<LinkEvent>,
    reader: tokio::task::JoinHandle<()>,
    last_ping_at: Instant,
    shared: Arc<Shared>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.links_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one edge until all its messages are acknowledged or the drain deadline passes. Returns
/// ((edge, queue), generated, acknowledged) per queue, for the verifier.
pub(super) async fn run(
    spec: EdgeSpec,
    config: Arc<SimConfig>,
    shared: Arc<Shared>,
) -> Vec<((String, String), u64, u64)> {
    let mut edge = Edge {
        queues: spec
            .queues
            .iter()
            .map(|name| QueueState {
                name: name.clone(),
                generated: 0,
                acked: 0,
                next_to_send: 1,
                in_flight: 0,
                replay_in_flight: false,
                generated_at: VecDeque::new(),
                paused_until: None,
            })
            .collect(),
        generated_total: 0,
        acked_batches: 0,
        batches: JoinSet::new(),
        report: None,
        spec,
        config,
        shared,
    };
    tokio::time::sleep_until(edge.spec.link_at.into()).await;
    edge.run().await;
    edge.batches.abort_all();
    if let Some(report) = edge.report.take() {
        report.abort();
    }
    edge.queues.iter().map(|q| ((edge.spec.id.clone(), q.name.clone()), q.generated, q.acked)).collect()
}

struct Edge {
    spec: EdgeSpec,
    config: Arc<SimConfig>,
    shared: Arc<Shared>,
    queues: Vec<QueueState>,
    generated_total: u64,
    acked_batches: u64,
    batches: JoinSet<BatchDone>,
    report: Option<tokio::task::JoinHandle<()>>,
}

impl Edge {
    async fn run(&mut self) {
        let mut link: Option<Link> = None;
        let mut reconnect_at = Instant::now();
        loop {
            let now = Instant::now();
            self.generate(now);
            if link.is_none() && now >= reconnect_at {
                match self.open_link().await {
                    Ok(opened) => link = Some(opened),
                    Err(e) => {
                        self.shared.link_open_failures.fetch_add(1, Ordering::Relaxed);
                        self.shared.problem(format!("edge {}: cannot open the link: {e}", self.spec.id));
                        reconnect_at = Instant::now() + RETRY_PAUSE;
                    }
                }
                continue;
            }
            if link.is_some() {
                self.fill_pipelines(now);
            }
            if now >= self.spec.generation_end
                && self.batches.is_empty()
                && self.queues.iter().all(|q| q.acked == q.generated)
            {
                return;
            }
            if now >= self.spec.drain_deadline {
                let unacked: u64 = self.queues.iter().map(|q| q.generated - q.acked).sum();
                self.shared.problem(format!(
                    "edge {}: {unacked} messages not acknowledged {:?} after generation ended",
                    self.spec.id, self.config.drain_timeout
                ));
                return;
            }
            let next_message_at = self.next_message_at();
            let wake_at = [
                next_message_at,
                // The end of generation, when the edge may be done.
                (now < self.spec.generation_end).then_some(self.spec.generation_end),
                Some(self.spec.drain_deadline),
                link.is_none().then_some(reconnect_at),
                self.queues.iter().filter_map(|q| q.paused_until).min(),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("the drain deadline is always there");
            tokio::select! {
                biased;
                event = next_event(&mut link) => {
                    if let Err(lost) = self.on_event(event, link.as_mut().expect("an event comes from a link")) {
                        // A healthy central under the simulated load never drops a link.
                        self.shared.links_lost.fetch_add(1, Ordering::Relaxed);
                        self.shared.problem(format!("edge {}: link lost: {lost}", self.spec.id));
                        link = None;
                        reconnect_at = Instant::now() + RETRY_PAUSE;
                    }
                }
                Some(done) = self.batches.join_next(), if !self.batches.is_empty() => match done {
                    Ok(done) => self.on_batch_done(done),
                    Err(e) => self.shared.problem(format!("edge {}: a batch task failed: {e}", self.spec.id)),
                },
                () = tokio::time::sleep_until(wake_at.into()) => {}
            }
        }
    }

    /// Generates every message due by `now` (none after the generation window).
    fn generate(&mut self, now: Instant) {
        let until = now.min(self.spec.generation_end);
        if until < self.spec.generation_start {
            return;
        }
        let elapsed = until.duration_since(self.spec.generation_start).as_secs_f64();
        let due = (elapsed * self.config.rate_per_edge - self.spec.phase).floor() + 1.0;
        let due = if due < 0.0 { 0 } else { due as u64 };
        while self.generated_total < due {
            // Its due time, not now: a late wake-up counts in the message's latency.
            let due_at = self.due_at(self.generated_total);
            let queue_count = self.queues.len() as u64;
            let queue = &mut self.queues[(self.generated_total % queue_count) as usize];
            queue.generated += 1;
            queue.generated_at.push_back(due_at);
            self.generated_total += 1;
            self.shared.generated.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When message `k` (0-based, over all queues) is due.
    fn due_at(&self, k: u64) -> Instant {
        self.spec.generation_start
            + Duration::from_secs_f64(((k as f64 + self.spec.phase) / self.config.rate_per_edge).max(0.0))
    }

    fn next_message_at(&self) -> Option<Instant> {
        let at = self.due_at(self.generated_total);
        (at < self.spec.generation_end).then_some(at)
    }

    async fn open_link(&mut self) -> Result<Link, String> {
        let started = Instant::now();
        let backlog: u64 = self.queues.iter().map(|q| q.generated - q.acked).sum();
        let hello = json!({
            "edge_id": self.spec.id,
            "version": self.config.version,
            "ping_interval_ms": self.config.ping_interval.as_millis() as u64,
            "report": self.report_body("transition_to_online", backlog),
        });
        let timeout = self.config.request_timeout;
        let handshake = |http: &reqwest::Client| {
            let request = self.spec.request_on(http, reqwest::Method::POST, "/v1/link").json(&hello);
            async move {
                tokio::time::timeout(timeout, request.send())
                    .await
                    .map_err(|_| format!("no answer to the handshake within {timeout:?}"))?
                    .map_err(|e| format!("handshake: {}", error_chain(&e)))
            }
        };
        let response = match handshake(self.spec.http()).await {
            Ok(response) => response,
            // As a real edge: a handshake over HTTP/2 that failed goes again over HTTP/1.1, and if
            // that is answered the central is HTTP/1.1-only.
            Err(first) if self.spec.http2.is_some() && !self.spec.http1_only.load(Ordering::Relaxed) => {
                let response = handshake(&self.spec.http1).await.map_err(|_| first)?;
                self.spec.http1_only.store(true, Ordering::Relaxed);
                response
            }
            Err(first) => return Err(first),
        };
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(format!("handshake answered {status}: {body}"));
        }
        let (sender, mut events) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let reader = tokio::spawn(read_link(response, sender));
        let welcome = tokio::time::timeout(timeout, events.recv())
            .await
            .map_err(|_| format!("no welcome within {timeout:?}"))?;
        self.shared.links_open.fetch_add(1, Ordering::Relaxed);
        let link = Link { events, reader, last_ping_at: Instant::now(), shared: self.shared.clone() };
        let positions = match welcome {
            Some(LinkEvent::Welcome { maintenance: true, .. }) => {
                return Err("the central is in maintenance".into())
            }
            Some(LinkEvent::Welcome { positions, .. }) => positions,
            Some(LinkEvent::Lost(e)) | Some(LinkEvent::Other(e)) => {
                return Err(format!("instead of a welcome: {e}"))
            }
            Some(LinkEvent::Ping) => return Err("a ping before the welcome".into()),
            None => return Err("the link ended before the welcome".into()),
        };
        let now = Instant::now();
        self.shared.link_open_latency.record(now - started);
        self.shared.links_opened.fetch_add(1, Ordering::Relaxed);
        for queue in &mut self.queues {
            let position = positions.get(&queue.name).copied().unwrap_or(0);
            if position < queue.acked {
                self.shared.problem(format!(
                    "edge {} queue {}: the welcome says the central holds seq {position}, but it acknowledged {}",
                    self.spec.id, queue.name, queue.acked
                ));
            }
            if let Err(e) = queue.acknowledge(position, now, &self.shared) {
                self.shared.problem(format!("edge {}: welcome: {e}", self.spec.id));
            }
            // Resume right after the central's position, as a real edge's forwarder does.
            queue.next_to_send = queue.acked + 1;
        }
        self.send_report("online");
        Ok(link)
    }

    /// Handles one link event; `Err` when the link is lost.
    fn on_event(&mut self, event: LinkEvent, link: &mut Link) -> Result<(), String> {
        match event {
            LinkEvent::Ping => {
                let now = Instant::now();
                let gap = now.saturating_duration_since(link.last_ping_at);
                link.last_ping_at = now;
                self.shared.ping_lateness.record(gap.saturating_sub(self.config.ping_interval));
                self.shared.pings.fetch_add(1, Ordering::Relaxed);
                self.send_report("online");
                Ok(())
            }
            LinkEvent::Other(kind) => {
                self.shared.other_events.fetch_add(1, Ordering::Relaxed);
                if kind == "maintenance" {
                    return Err("the central went into maintenance".into());
                }
                Ok(())
            }
            LinkEvent::Welcome { .. } => Err("a second welcome on one link".into()),
            LinkEvent::Lost(reason) => Err(reason),
        }
    }

    /// Starts batches on every queue with messages to send and room in its pipeline.
    fn fill_pipelines(&mut self, now: Instant) {
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if queue.paused_until.is_some_and(|until| now < until) {
                continue;
            }
            queue.paused_until = None;
            while queue.in_flight < self.config.in_flight && queue.next_to_send <= queue.generated {
                if queue.in_flight > 0
                    && queue.generated + 1 - queue.next_to_send < self.config.batch_messages
                {
                    // As a real edge, whose forwarder puts everything waiting into one batch when
                    // an answer comes: a second batch is in flight only when the first was full.
                    break;
                }
                let first_seq = queue.next_to_send;
                let last_seq = queue.generated.min(first_seq + self.config.batch_messages - 1);
                queue.next_to_send = last_seq + 1;
                queue.in_flight += 1;
                let frame = Bytes::from(frame::encode_batch(
                    &self.spec.id,
                    &queue.name,
                    first_seq,
                    last_seq,
                    self.config.payload_bytes,
                ));
                send_batch(
                    &self.spec,
                    &self.config,
                    &self.shared,
                    &mut self.batches,
                    index,
                    (first_seq, last_seq),
                    frame,
                    false,
                );
            }
        }
    }

    fn on_batch_done(&mut self, done: BatchDone) {
        let now = Instant::now();
        let id = self.spec.id.clone();
        let count = done.last_seq - done.first_seq + 1;
        let queue = &mut self.queues[done.queue];
        if done.replay {
            queue.replay_in_flight = false;
        } else {
            queue.in_flight -= 1;
        }
        match done.outcome {
            Ok(ack) => {
                self.shared.duplicates_reported.fetch_add(ack.duplicates, Ordering::Relaxed);
                if ack.stored + ack.duplicates != count || ack.stored_through < done.last_seq {
                    self.shared.problem(format!(
                        "edge {id} queue {}: batch {}..={} answered stored {} duplicates {} stored_through {}",
                        queue.name, done.first_seq, done.last_seq, ack.stored, ack.duplicates, ack.stored_through
                    ));
                }
                if done.replay && (ack.duplicates != count || ack.stored != 0) {
                    self.shared.problem(format!(
                        "edge {id} queue {}: replayed batch {}..={} (all acknowledged before) answered stored {} \
                         duplicates {}",
                        queue.name, done.first_seq, done.last_seq, ack.stored, ack.duplicates
                    ));
                }
                if let Err(e) = queue.acknowledge(ack.stored_through, now, &self.shared) {
                    self.shared.problem(format!("edge {id}: {e}"));
                }
                if !done.replay {
                    self.acked_batches += 1;
                    let replay_every = self.config.replay_every;
                    if replay_every > 0
                        && self.acked_batches.is_multiple_of(replay_every)
                        && !queue.replay_in_flight
                    {
                        queue.replay_in_flight = true;
                        self.shared.replays.fetch_add(1, Ordering::Relaxed);
                        let seqs = (done.first_seq, done.last_seq);
                        send_batch(
                            &self.spec,
                            &self.config,
                            &self.shared,
                            &mut self.batches,
                            done.queue,
                            seqs,
                            done.frame,
                            true,
                        );
                    }
                }
            }
            Err(BatchError::Gap(expected_seq)) => {
                self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                if done.replay || expected_seq >= done.first_seq || expected_seq == 0 {
                    self.shared.problem(format!(
                        "edge {id} queue {}: batch {}..={}{} answered gap, expected_seq {expected_seq}",
                        queue.name,
                        done.first_seq,
                        done.last_seq,
                        if done.replay { " (a replay)" } else { "" }
                    ));
                    return;
                }
                // The central holds everything before expected_seq; go back there.
                if let Err(e) = queue.acknowledge(expected_seq - 1, now, &self.shared) {
                    self.shared.problem(format!("edge {id}: {e}"));
                }
                queue.next_to_send = queue.next_to_send.min(expected_seq).max(queue.acked + 1);
            }
            Err(BatchError::Refused(detail)) => {
                self.shared.batch_failures.fetch_add(1, Ordering::Relaxed);
                self.shared.problem(format!("edge {id} queue {}: batch refused: {detail}", queue.name));
                queue.next_to_send = queue.next_to_send.min(done.first_seq).max(queue.acked + 1);
                queue.paused_until = Some(now + RETRY_PAUSE);
            }
            Err(BatchError::Transient(detail)) => {
                self.shared.batch_failures.fetch_add(1, Ordering::Relaxed);
                self.shared.problem(format!("edge {id} queue {}: batch failed: {detail}", queue.name));
                queue.next_to_send = queue.next_to_send.min(done.first_seq).max(queue.acked + 1);
                queue.paused_until = Some(now + RETRY_PAUSE);
            }
        }
    }

    fn report_body(&self, state: &str, backlog: u64) -> Value {
        json!({
            "state": state,
            "state_since_ms": 0,
            "upstream_url": self.spec.central,
            "backlog_messages": backlog,
            "offline_log": [],
        })
    }

    /// Sends a report unless the previous one is still in flight (then it is skipped and counted).
    fn send_report(&mut self, state: &str) {
        if self.report.as_ref().is_some_and(|r| !r.is_finished()) {
            self.shared.reports_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let backlog: u64 = self.queues.iter().map(|q| q.generated - q.acked).sum();
        let request = self
            .spec
            .request(reqwest::Method::POST, "/v1/link/report")
            .timeout(self.config.request_timeout)
            .json(&self.report_body(state, backlog));
        let shared = self.shared.clone();
        self.report = Some(tokio::spawn(async move {
            shared.reports_sent.fetch_add(1, Ordering::Relaxed);
            match request.send().await {
                Ok(response) if response.status().is_success() => {}
                _ => {
                    shared.report_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
}

/// The next event of the open link; pending forever while there is none.
async fn next_event(link: &mut Option<Link>) -> LinkEvent {
    match link {
        Some(link) => link.events.recv().await.unwrap_or(LinkEvent::Lost("the link reader ended".into())),
        None => std::future::pending().await,
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<Ack, BatchError> {
    let response = request.send().await.map_err(|e| BatchError::Transient(error_chain(&e)))?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| {
        BatchError::Transient(format!("{status} with an unreadable body: {}", error_chain(&e)))
    })?;
    if status == reqwest::StatusCode::OK {
        let field = |name: &str| {
            body[name]
                .as_u64()
                .ok_or_else(|| BatchError::Refused(format!("acknowledgement without {name}: {body}")))
        };
        return Ok(Ack {
            stored_through: field("stored_through")?,
            stored: field("stored")?,
            duplicates: field("duplicates")?,
        });
    }
    if status == reqwest::StatusCode::CONFLICT {
        if let Some(expected_seq) = body["expected_seq"].as_u64() {
            return Err(BatchError::Gap(expected_seq));
        }
    }
    let detail = format!("{status}: {body}");
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Err(BatchError::Transient(detail))
    } else {
        Err(BatchError::Refused(detail))
    }
}

/// Reads the NDJSON link stream into events until it ends; the last event says why it ended.
async fn read_link(mut response: reqwest::Response, events: mpsc::Sender<LinkEvent>) {
    let mut buffer = BytesMut::new();
    loop {
        while let Some(newline) = buffer.iter().position(|b| *b == b'\n') {
            let line = buffer.split_to(newline + 1);
            let line = &line[..newline];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event = match serde_json::from_slice::<Value>(line) {
                Ok(value) => parse_event(&value),
                Err(e) => LinkEvent::Lost(format!("unreadable link event: {e}")),
            };
            let lost = matches!(event, LinkEvent::Lost(_));
            if events.send(event).await.is_err() || lost {
                return;
            }
        }
        if buffer.len() > MAX_EVENT_LINE_BYTES {
            let _ = events.send(LinkEvent::Lost("a link event line is too long".into())).await;
            return;
        }
        match response.chunk().await {
            Ok(Some(chunk)) => buffer.extend_from_slice(&chunk),
            Ok(None) => {
                let _ = events.send(LinkEvent::Lost("the central closed the link".into())).await;
                return;
            }
            Err(e) => {
                let _ = events.send(LinkEvent::Lost(error_chain(&e))).await;
                return;
            }
        }
    }
}

fn parse_event(value: &Value) -> LinkEvent {
    match value["type"].as_str() {
        Some("welcome") => LinkEvent::Welcome {
            maintenance: value["maintenance"].as_bool().unwrap_or(false),
            positions: value["positions"]
                .as_object()
                .map(|positions| {
                    positions.iter().filter_map(|(queue, seq)| Some((queue.clone(), seq.as_u64()?))).collect()
                })
                .unwrap_or_default(),
        },
        Some("ping") => LinkEvent::Ping,
        Some(other) => LinkEvent::Other(other.to_string()),
        None => LinkEvent::Lost(format!("a link event without a type: {value}")),
    }
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
