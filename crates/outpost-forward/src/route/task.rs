//! One route's task: the only owner of that route's delivery state (position, read-ahead, the
//! message being delivered, its retries, the lease it delivers under). It runs one loop: take over
//! or let go of the route as the lease says, then one step of `forward` or `store` mode.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use outpost_core::config::RouteConfig;
use outpost_core::metrics::{Metrics, RouteLabel};
use outpost_core::time::now_unix_ms;
use outpost_link::Jitter;
use outpost_store::{FailedEntry, FailedQuery, FailedStatus, NewFailure, Store, StoreError, StoredMessage};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::cursor::CursorCommit;
use super::delivery::{Deliverer, DeliveryFailure, Outgoing, Unit};
use super::modes::{Mode, ModeState, RouteModes, CHANGED_BY_OPERATOR};
use super::pipeline::Answer;
use super::policy::{Class, RoutePolicy, Verdict};
use super::wait::{Signals, Until, Wake};
use super::{
    reader_name, MAX_POST_BYTES, MAX_UNCOMMITTED_DELIVERIES, MAX_WINDOW_BYTES, MESSAGE_FOOTPRINT,
    READ_AHEAD_BYTES, READ_AHEAD_MESSAGES,
};

/// How long an idle route waits before looking again when no commit or notice woke it.
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// Pause before trying again after the store refused an operation (disk full, shutting down).
const STORE_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long a task that lost its lease waits for its cursor commit before letting go of it.
const LEASE_LOST_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// A window starts a cursor commit once this many deliveries are uncommitted (and when it ends),
/// half the bound, so the commit is done before the bound would stop the window from growing.
const WINDOW_COMMIT_EVERY: u64 = MAX_UNCOMMITTED_DELIVERIES / 2;
/// `changed_by` of the task's own switches.
const CHANGED_BY_SERVICE_DOWN: &str = "auto:service_down";
const CHANGED_BY_PROBE: &str = "auto:probe";

async fn refresh_failed_metric<'a>(
    store: &Store,
    metrics: &Metrics,
    routes: impl Iterator<Item = &'a String>,
) {
    match store.failed_counts(FailedStatus::Failed).await {
        Ok(counts) => {
            for route in routes {
                let count = counts.get(route).copied().unwrap_or(0);
                metrics.failed_messages.get_or_create(&RouteLabel { route: route.clone() }).set(count as i64);
            }
        }
        Err(e) => tracing::warn!("cannot count failed messages for the metrics: {e}"),
    }
}

/// What a route delivers next.
#[derive(Debug, Clone)]
enum Head {
    Queued(StoredMessage),
    Resubmitted(FailedEntry),
}

impl Head {
    fn outgoing(&self) -> Outgoing {
        match self {
            Head::Queued(m) => Outgoing {
                message_id: m.id.clone(),
                queue: m.queue.clone(),
                origin: m.origin.clone(),
                origin_seq: m.origin_seq,
                content_type: m.content_type.clone(),
                payload: m.payload.clone(),
            },
            Head::Resubmitted(e) => Outgoing {
                message_id: e.message_id.clone(),
                queue: e.queue.clone(),
                origin: e.origin.clone(),
                origin_seq: e.origin_seq,
                content_type: e.content_type.clone(),
                payload: e.payload.clone().unwrap_or_default(),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Head::Queued(m) => format!("message {} (seq {})", m.id, m.seq),
            Head::Resubmitted(e) => {
                format!("resubmitted message {} (seq {}, failed entry {})", e.message_id, e.seq, e.id)
            }
        }
    }
}

/// Why a window has no next POST.
enum NoUnit {
    /// Nothing read ahead (the queue may have more later).
    Empty,
    /// The next message expired: it is failed as a head, outside the window.
    Expired,
}

/// What `messages` hold in memory, for [`MAX_WINDOW_BYTES`].
fn footprint<'a>(messages: impl Iterator<Item = &'a StoredMessage>) -> usize {
    messages.map(|m| m.payload.len() + MESSAGE_FOOTPRINT).sum()
}

/// The head and how often it was tried.
struct Current {
    head: Head,
    attempts: u32,
}

/// What a delivery attempt led to.
enum Attempt {
    Delivered,
    Failed(DeliveryFailure),
    /// The node is stopping; the attempt was abandoned.
    Stopped,
}

/// One route's task: the only owner of its delivery state.
pub(super) struct RouteTask {
    name: String,
    queue: String,
    reader: String,
    auto_forward: bool,
    probe_interval: Duration,
    message_ttl: Option<Duration>,
    /// `[[route]] max_in_flight` and `batch`: a window of up to `max_in_flight` POSTs of up to
    /// `batch` messages each (see [`RouteTask::forward_window`]).
    max_in_flight: usize,
    batch: usize,
    /// After a batch POST failed, its messages go one by one: how many are left to go so.
    singles_after_failed_batch: usize,
    policy: RoutePolicy,
    deliverer: Deliverer,
    store: Store,
    metrics: Arc<Metrics>,
    /// `outpost_messages_delivered{route}` of this route.
    delivered_counter: Counter,
    modes: Arc<RouteModes>,
    /// The stop, the mode, the lease, commits and resubmit notices: what the task waits on.
    signals: Signals,
    /// Whether the task has taken over the route under the lease (see [`RouteTask::gain_lease`]).
    holding: bool,
    jitter: Jitter,
    /// Highest queue seq delivered or failed; ahead of the durable cursor by the commits in flight.
    delivered_through: u64,
    /// Read from the queue, not yet delivered: each read at most [`READ_AHEAD_MESSAGES`] (a window's
    /// up to four times that) and [`READ_AHEAD_BYTES`] of payload.
    read_ahead: VecDeque<StoredMessage>,
    cursor: CursorCommit,
    /// Resubmitted entries may be waiting (set at start and by every notice).
    resubmits_pending: bool,
    /// The message being delivered; it stays first in line through retries and store mode.
    head: Option<Current>,
    retry_at: Option<Instant>,
    /// The route's mode state when the current decision began (an attempt, or an expiry): the
    /// task's switches and reasons apply only if it is still in force.
    seen: ModeState,
}

impl RouteTask {
    /// The task of `route`, at its durable cursor, with resubmitted entries to look for first.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        route: &RouteConfig,
        message_ttl: Option<Duration>,
        policy: RoutePolicy,
        deliverer: Deliverer,
        store: &Store,
        metrics: &Arc<Metrics>,
        modes: &Arc<RouteModes>,
        resubmit_notices: mpsc::Receiver<()>,
        stop: watch::Receiver<bool>,
        jitter: Jitter,
    ) -> RouteTask {
        let task = RouteTask {
            name: route.name.clone(),
            queue: route.queue.clone(),
            reader: reader_name(&route.name),
            auto_forward: route.auto_forward,
            probe_interval: route.probe_interval,
            message_ttl,
            max_in_flight: route.max_in_flight.get() as usize,
            batch: route.batch.get() as usize,
            singles_after_failed_batch: 0,
            policy,
            deliverer,
            store: store.clone(),
            metrics: metrics.clone(),
            delivered_counter: metrics
                .messages_delivered
                .get_or_create(&RouteLabel { route: route.name.clone() })
                .clone(),
            modes: modes.clone(),
            signals: Signals {
                stop,
                mode: modes.subscribe(&route.name).expect("modes were loaded for every route"),
                lease: store.lease(&reader_name(&route.name)),
                commits: store.commits(),
                resubmit_notices,
            },
            holding: false,
            jitter,
            delivered_through: store.cursor(&route.queue, &reader_name(&route.name)),
            read_ahead: VecDeque::new(),
            cursor: CursorCommit::new(store, &route.queue, &reader_name(&route.name)),
            resubmits_pending: true,
            head: None,
            retry_at: None,
            seen: modes.current(&route.name).expect("modes were loaded for every route"),
        };
        tracing::info!(
            route = %route.name, queue = %route.queue, urls = ?route.urls,
            mode = modes.current(&route.name).map(|m| m.mode.as_str()).unwrap_or("?"),
            position = task.delivered_through, "route starting"
        );
        task
    }

    pub(super) async fn run(mut self) {
        let mut last_mode = self.signals.mode.borrow().mode;
        while !*self.signals.stop.borrow() {
            let held = self.signals.lease.borrow_and_update().is_valid();
            if !held {
                if self.holding {
                    self.lose_lease().await;
                }
                self.signals.wait(Until::stop_or_lease()).await;
                continue;
            }
            if !self.holding {
                if let Err(e) = self.gain_lease().await {
                    if matches!(e, StoreError::Closed) {
                        break;
                    }
                    tracing::warn!(route = %self.name, "cannot read the route's cursor after taking it over, retrying in {STORE_RETRY_PAUSE:?}: {e}");
                    self.pause(STORE_RETRY_PAUSE).await;
                    continue;
                }
            }
            let mode = self.signals.mode.borrow_and_update().mode;
            if mode == Mode::Forward && last_mode == Mode::Store {
                // Back in service: primary endpoint first, no leftover backoff.
                self.deliverer.prefer_primary();
                self.retry_at = None;
            }
            last_mode = mode;
            let outcome = match mode {
                Mode::Forward => self.forward_step().await,
                Mode::Store => self.store_step().await,
            };
            match outcome {
                Ok(()) => {}
                Err(StoreError::Closed) => break,
                Err(e) => {
                    tracing::warn!(route = %self.name, "store error, retrying in {STORE_RETRY_PAUSE:?}: {e}");
                    self.pause(STORE_RETRY_PAUSE).await;
                }
            }
        }
        self.cursor.flush().await;
        tracing::debug!(route = %self.name, position = self.cursor.durable, "route stopped");
    }

    /// This node now delivers the route: start from the cursor as the database has it (another
    /// central may have delivered since this node last looked), with nothing read ahead.
    async fn gain_lease(&mut self) -> Result<(), StoreError> {
        let position = self.store.fresh_cursor(&self.queue, &self.reader).await?;
        self.delivered_through = position;
        self.read_ahead.clear();
        self.cursor = CursorCommit::new(&self.store, &self.queue, &self.reader);
        self.singles_after_failed_batch = 0;
        self.head = None;
        self.retry_at = None;
        self.resubmits_pending = true;
        self.deliverer.prefer_primary();
        self.holding = true;
        if self.store.is_shared() {
            tracing::info!(route = %self.name, position, "this central now delivers the route (lease taken)");
        }
        Ok(())
    }

    /// Another central delivers the route now (or may, soon): start nothing new and commit what was
    /// delivered, so the next holder repeats as little as possible.
    async fn lose_lease(&mut self) {
        self.holding = false;
        self.head = None;
        self.retry_at = None;
        self.read_ahead.clear();
        if tokio::time::timeout(LEASE_LOST_FLUSH_TIMEOUT, self.cursor.flush()).await.is_err() {
            tracing::warn!(route = %self.name, "the cursor commit did not finish within {LEASE_LOST_FLUSH_TIMEOUT:?} after losing the lease; the next holder may repeat those deliveries");
        }
        tracing::info!(route = %self.name, position = self.cursor.durable, "this central stopped delivering the route (lease lost)");
    }

    /// Sleeps, waking early for a stop, a mode change or the lease changing hands.
    async fn pause(&mut self, duration: Duration) {
        self.signals
            .wait(Until::stop_or_lease().or_mode_change().or_deadline(Instant::now() + duration))
            .await;
    }

    /// Takes the resubmit notices that came; says whether any did.
    fn take_notices(&mut self) -> bool {
        let mut any = false;
        while self.signals.resubmit_notices.try_recv().is_ok() {
            self.resubmits_pending = true;
            any = true;
        }
        any
    }

    /// Forward mode: deliver the head, or wait for work.
    async fn forward_step(&mut self) -> Result<(), StoreError> {
        self.take_notices();
        self.cursor.poll();
        // Seen before looking, so a commit after the look wakes the wait below.
        self.signals.commits.borrow_and_update();
        if self.head.is_none() {
            self.head = self.next_head().await?;
        }
        let Some(current) = &self.head else {
            self.cursor.flush().await;
            let until =
                Until::stop_or_lease().or_mode_change().or_work().or_deadline(Instant::now() + IDLE_RECHECK);
            if self.signals.wait(until).await == Wake::Resubmitted {
                self.resubmits_pending = true;
            }
            return Ok(());
        };
        let expired = matches!(&current.head, Head::Queued(message) if self.expired(message));
        if expired {
            self.seen = self.signals.mode.borrow().clone();
            return self.fail_head(Verdict::FailExhausted, None).await;
        }
        if let Some(at) = self.retry_at {
            if at > Instant::now() {
                let until = Until::stop_or_lease().or_mode_change().or_deadline(at);
                if self.signals.wait(until).await != Wake::Elapsed {
                    return Ok(());
                }
            }
            self.retry_at = None;
        }
        if self.cursor.uncommitted() >= MAX_UNCOMMITTED_DELIVERIES {
            self.cursor.settle().await;
            self.cursor.poll();
        }
        let fresh_queued = matches!(&current.head, Head::Queued(_)) && current.attempts == 0;
        if fresh_queued && self.singles_after_failed_batch == 0 && (self.max_in_flight > 1 || self.batch > 1)
        {
            return self.forward_window().await;
        }
        match self.attempt().await {
            Attempt::Delivered => self.delivered().await,
            Attempt::Failed(failure) => self.failed(failure, false).await,
            Attempt::Stopped => Ok(()),
        }
    }

    /// Delivers the head and the messages after it as a sliding window: up to `max_in_flight`
    /// POSTs outstanding, each of one message or (`batch` > 1) an NDJSON body of up to `batch`,
    /// sent in queue order on one connection ([`crate::route::pipeline`]: pipelined over HTTP/1.1,
    /// or HTTP/2 streams the downstream may handle at once). The answers are taken in that order
    /// too, whatever order they finished in: as each comes, the cursor
    /// moves over it (the delivered prefix only) and the next POST goes out, so the connection
    /// never drains while the queue has more. The first answer that is not a delivery stops the
    /// window there: nothing more is pushed, the answers of what was are taken but not
    /// acknowledged, and everything from that POST on goes back in line (POSTs after it that
    /// succeeded are sent again later: repeats, which the downstream drops by `Idempotency-Key`,
    /// never a skip). A failed single message is judged by the policy as a single delivery would
    /// be; a failed batch sends its first message alone next, so the policy judges messages, not
    /// batches; a POST the server did not handle (it closed the connection, refused the stream or
    /// went away past it, after an earlier answer) is not a failure and goes first in the next
    /// window.
    ///
    /// The window also stops growing (and ends once its answers are in) when the route has
    /// something else to do first: a mode change, resubmitted entries, an expired message next in
    /// line, the queue running out. It pushes a POST only while the acknowledged deliveries not yet
    /// committed and the messages in flight stay within [`MAX_UNCOMMITTED_DELIVERIES`] plus one
    /// window (`max_in_flight` × `batch`): what a crash may deliver again.
    async fn forward_window(&mut self) -> Result<(), StoreError> {
        if !self.signals.lease.borrow().is_valid() {
            return Ok(());
        }
        self.seen = self.signals.mode.borrow().clone();
        let Some(Current { head: Head::Queued(first), .. }) = self.head.take() else {
            unreachable!("a window starts at a fresh queued head")
        };
        self.read_ahead.push_front(first);
        let mut posts = self.deliverer.posts();
        // The messages of the POSTs in flight, in order, and how many each POST holds; after a
        // failure also those of the failed POST and every one after it (they go back in line).
        let mut sent: VecDeque<StoredMessage> = VecDeque::new();
        let mut sizes: VecDeque<usize> = VecDeque::new();
        // What the POSTs in flight hold, for [`MAX_WINDOW_BYTES`].
        let mut in_flight_bytes = 0;
        let mut growing = true;
        let mut acknowledging = true;
        let mut failure: Option<(usize, DeliveryFailure)> = None;
        let mut store_error = None;
        let repeat_bound = MAX_UNCOMMITTED_DELIVERIES + (self.max_in_flight * self.batch) as u64;
        loop {
            while growing && posts.outstanding() < self.max_in_flight {
                if in_flight_bytes >= MAX_WINDOW_BYTES && posts.outstanding() > 0 {
                    break; // an answer first
                }
                // What a crash now would deliver again: the acknowledged deliveries not yet
                // committed and the messages in flight, with the next POST at most `batch` more.
                let repeats = |task: &Self, in_flight: usize| {
                    task.cursor.uncommitted() + (in_flight + task.batch) as u64
                };
                if repeats(self, sent.len()) > repeat_bound {
                    self.cursor.poll();
                    if repeats(self, sent.len()) > repeat_bound {
                        if posts.outstanding() > 0 {
                            break; // an answer first; the commit may be done by then
                        }
                        self.cursor.flush().await;
                    }
                }
                if self.signals.mode.has_changed().unwrap_or(true) || self.take_notices() {
                    growing = false;
                    break;
                }
                if self.read_ahead.len() < self.batch {
                    let after = sent.back().map_or(self.delivered_through, |m| m.seq);
                    let window = self.max_in_flight * self.batch;
                    if let Err(e) = self.read_more(after, self.batch, window).await {
                        store_error = Some(e);
                        growing = false;
                        break;
                    }
                }
                match self.next_unit() {
                    Ok(unit) => {
                        posts.push(&unit);
                        sizes.push_back(unit.len());
                        in_flight_bytes += footprint(self.read_ahead.iter().take(unit.len()));
                        sent.extend(self.read_ahead.drain(..unit.len()));
                    }
                    // Nothing more now: the answers to come may find more.
                    Err(NoUnit::Empty) => break,
                    Err(NoUnit::Expired) => {
                        growing = false;
                        break;
                    }
                }
            }
            let Some(size) = sizes.pop_front() else { break };
            // Stopping, or the lease running out (as in `attempt`): nothing more of the window
            // counts, the cursor does not move over it, and the next holder starts from the cursor.
            let answer = {
                let next = self.deliverer.next_answer(&mut posts);
                tokio::pin!(next);
                loop {
                    let lease = *self.signals.lease.borrow();
                    if !lease.is_valid() {
                        tracing::warn!(route = %self.name, "the route's lease ran out during a window of deliveries: abandoning it to the next holder");
                        break None;
                    }
                    match self.signals.wait_or(Until::stop_or_lease().or_lease_end(lease), &mut next).await {
                        Ok(answer) => break self.signals.lease.borrow().is_valid().then_some(answer),
                        Err(Wake::Stopped) => break None,
                        // Renewed, or its end passed: look again.
                        Err(_) => {}
                    }
                }
            };
            let Some(answer) = answer else {
                self.back_in_line(sent);
                return Ok(());
            };
            match answer {
                Answer::Delivered if acknowledging => {
                    in_flight_bytes -= footprint(sent.iter().take(size));
                    let last = sent.drain(..size).last().expect("a POST holds at least one message");
                    self.delivered_through = last.seq;
                    self.cursor.want(last.seq);
                    self.cursor.poll_from(WINDOW_COMMIT_EVERY);
                    self.delivered_counter.inc_by(size as u64);
                }
                // After the window stopped: answered, not acknowledged.
                Answer::Delivered => {}
                Answer::Failed(error) => {
                    if acknowledging {
                        failure = Some((size, DeliveryFailure { errors: vec![error] }));
                    }
                    acknowledging = false;
                    growing = false;
                }
                Answer::Unanswered => {
                    acknowledging = false;
                    growing = false;
                }
            }
        }
        self.cursor.poll();
        self.back_in_line(sent);
        if let Some(e) = store_error {
            return Err(e);
        }
        let Some((unit_len, error)) = failure else { return Ok(()) };
        let head = self.read_ahead.pop_front().expect("the failed POST's messages went back in line");
        self.head = Some(Current { head: Head::Queued(head), attempts: 0 });
        if unit_len == 1 {
            return self.failed(error, false).await;
        }
        // A batch failed: its messages go one by one (the first one now), so the policy judges the
        // message that fails, not the batch; then batches resume.
        tracing::debug!(route = %self.name, "a batch POST failed, delivering its messages one by one: {error}");
        self.singles_after_failed_batch = unit_len;
        if self.policy.classify(error.kind()) == Class::ServiceDown {
            return self.failed(error, false).await;
        }
        Ok(())
    }

    /// Messages taken for a window and not delivered go back first in line, in order.
    fn back_in_line(&mut self, messages: VecDeque<StoredMessage>) {
        for message in messages.into_iter().rev() {
            self.read_ahead.push_front(message);
        }
    }

    /// The next POST of a window from the front of the read-ahead: up to `batch` messages and
    /// [`MAX_POST_BYTES`] of body (at least one message), stopping before an expired one (it is
    /// failed as the head of a later step); a payload with a line break cannot be an NDJSON line
    /// and goes alone. The messages stay in the read-ahead.
    fn next_unit(&self) -> Result<Unit, NoUnit> {
        let first = self.read_ahead.front().ok_or(NoUnit::Empty)?;
        if self.expired(first) {
            return Err(NoUnit::Expired);
        }
        let outgoing = |message: &StoredMessage| Head::Queued(message.clone()).outgoing();
        if self.batch == 1 || first.payload.contains(&b'\n') {
            return Ok(Unit::Single(outgoing(first)));
        }
        let mut body_bytes = 0;
        let messages: Vec<Outgoing> = self
            .read_ahead
            .iter()
            .take(self.batch)
            .take_while(|m| !self.expired(m) && !m.payload.contains(&b'\n'))
            .take_while(|m| {
                let first = body_bytes == 0;
                body_bytes += m.payload.len() + 1; // and its line break
                first || body_bytes <= MAX_POST_BYTES
            })
            .map(outgoing)
            .collect();
        Ok(match messages.len() {
            1 => Unit::Single(messages.into_iter().next().expect("one")),
            _ => Unit::Batch(messages),
        })
    }

    /// Reads the queue after `after` into the read-ahead until it holds `count` messages or
    /// [`MAX_POST_BYTES`] of payload, or the queue has no more: a whole `window` of messages per
    /// read where it can (so a window of batches does not go to the store for every POST), between
    /// [`READ_AHEAD_MESSAGES`] and four times that, and at most [`READ_AHEAD_BYTES`] of payload.
    async fn read_more(&mut self, after: u64, count: usize, window: usize) -> Result<(), StoreError> {
        let mut bytes: usize = self.read_ahead.iter().take(count).map(|m| m.payload.len()).sum();
        while self.read_ahead.len() < count && bytes < MAX_POST_BYTES {
            let after = self.read_ahead.back().map_or(after, |m| m.seq);
            let has_more = self.store.queue(&self.queue).is_some_and(|stats| stats.last_seq > after);
            if !has_more {
                break;
            }
            let limit = (count - self.read_ahead.len())
                .max(window)
                .clamp(READ_AHEAD_MESSAGES, READ_AHEAD_MESSAGES * 4);
            let messages = self.store.read_within(&self.queue, after, limit, READ_AHEAD_BYTES).await?;
            if messages.is_empty() {
                break;
            }
            bytes += messages.iter().map(|m| m.payload.len()).sum::<usize>();
            self.read_ahead.extend(messages);
        }
        Ok(())
    }

    /// Store mode: send nothing; with `auto_forward`, probe every `probe_interval`.
    async fn store_step(&mut self) -> Result<(), StoreError> {
        self.cursor.flush().await;
        let held_by_operator = self.signals.mode.borrow().changed_by == CHANGED_BY_OPERATOR;
        if !self.auto_forward || held_by_operator {
            self.signals.wait(Until::stop_or_lease().or_mode_change()).await;
            return Ok(());
        }
        let until = Until::stop_or_lease().or_mode_change().or_deadline(Instant::now() + self.probe_interval);
        if self.signals.wait(until).await != Wake::Elapsed {
            return Ok(());
        }
        self.take_notices();
        if self.head.is_none() {
            self.head = self.next_head().await?;
        }
        let Some(current) = &self.head else { return Ok(()) };
        let what = current.head.describe();
        match self.attempt().await {
            Attempt::Delivered => {
                let url = self.deliverer.preferred_url().to_string();
                self.set_mode(Mode::Forward, CHANGED_BY_PROBE, &format!("probe delivered {what} to {url}"))
                    .await;
                self.delivered().await
            }
            Attempt::Failed(failure) => self.failed(failure, true).await,
            Attempt::Stopped => Ok(()),
        }
    }

    /// The next thing to deliver: a resubmitted entry first, then the queue.
    async fn next_head(&mut self) -> Result<Option<Current>, StoreError> {
        if self.resubmits_pending {
            let query = FailedQuery {
                route: Some(self.name.clone()),
                status: FailedStatus::Resubmitted,
                after_id: 0,
                limit: 1,
                with_payload: true,
            };
            if let Some(entry) = self.store.failed(query).await?.pop() {
                return Ok(Some(Current { head: Head::Resubmitted(entry), attempts: 0 }));
            }
            self.resubmits_pending = false;
        }
        if self.read_ahead.is_empty() {
            let has_more =
                self.store.queue(&self.queue).is_some_and(|stats| stats.last_seq > self.delivered_through);
            if !has_more {
                return Ok(None);
            }
            let messages = self
                .store
                .read_within(&self.queue, self.delivered_through, READ_AHEAD_MESSAGES, READ_AHEAD_BYTES)
                .await?;
            if let Some(first) = messages.first() {
                if first.seq != self.delivered_through + 1 && self.delivered_through != 0 {
                    // Only a route added after messages were released starts past a gap.
                    tracing::warn!(route = %self.name, expected = self.delivered_through + 1, found = first.seq,
                        "route position is behind the oldest stored message; continuing from there");
                }
            }
            self.read_ahead.extend(messages);
        }
        Ok(self.read_ahead.pop_front().map(|m| Current { head: Head::Queued(m), attempts: 0 }))
    }

    fn expired(&self, message: &StoredMessage) -> bool {
        self.message_ttl
            .is_some_and(|ttl| now_unix_ms().saturating_sub(message.accepted_at_ms) > ttl.as_millis() as i64)
    }

    /// One delivery attempt of the head, abandoned if the node stops or the lease runs out first
    /// (CONTRACT 4.5: another central may deliver from then on). Nothing is started once the lease
    /// is gone, even if the loop has not seen it yet, and an outcome that arrives after the lease's
    /// end by this node's clock (say, after the process was frozen) is not acted on: the next
    /// holder delivers that message again, in order.
    async fn attempt(&mut self) -> Attempt {
        if !self.signals.lease.borrow().is_valid() {
            return Attempt::Stopped;
        }
        self.seen = self.signals.mode.borrow().clone();
        let current = self.head.as_ref().expect("attempt needs a head");
        let outgoing = current.head.outgoing();
        let delivery = self.deliverer.deliver(&outgoing, &self.policy);
        tokio::pin!(delivery);
        loop {
            // Renewals move the end while the delivery waits; only a lease that really ran out
            // stops it.
            let lease = *self.signals.lease.borrow();
            if !lease.is_valid() {
                tracing::warn!(route = %self.name, what = %current.head.describe(),
                    "the route's lease ran out during a delivery: abandoning it to the next holder");
                return Attempt::Stopped;
            }
            match self.signals.wait_or(Until::stop_or_lease().or_lease_end(lease), &mut delivery).await {
                Ok(result) => {
                    if !self.signals.lease.borrow().is_valid() {
                        tracing::warn!(route = %self.name, what = %current.head.describe(),
                            "a delivery finished after the route's lease ran out: leaving it to the next holder");
                        return Attempt::Stopped;
                    }
                    return match result {
                        Ok(()) => Attempt::Delivered,
                        Err(failure) => Attempt::Failed(failure),
                    };
                }
                Err(Wake::Stopped) => return Attempt::Stopped,
                // Renewed, or its end passed: look again.
                Err(_) => {}
            }
        }
    }

    async fn delivered(&mut self) -> Result<(), StoreError> {
        let current = self.head.take().expect("delivered needs a head");
        self.delivered_counter.inc();
        match current.head {
            Head::Queued(message) => {
                self.delivered_through = message.seq;
                self.cursor.want(message.seq);
                self.cursor.poll();
                self.singles_after_failed_batch = self.singles_after_failed_batch.saturating_sub(1);
            }
            Head::Resubmitted(entry) => {
                tracing::info!(route = %self.name, id = entry.id, message_id = %entry.message_id, "resubmitted message delivered");
                if let Err(e) = self.store.remove_failed(entry.id).await {
                    // It stays `resubmitted` and is delivered once more later: a repeat, not a loss.
                    tracing::warn!(route = %self.name, id = entry.id, "cannot remove a delivered failed entry: {e}");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Applies the policy to a failed attempt. `probing`: the route is in store mode and this was
    /// the auto-forward probe.
    async fn failed(&mut self, failure: DeliveryFailure, probing: bool) -> Result<(), StoreError> {
        let kind = failure.kind();
        let what = self.head.as_ref().expect("failed needs a head").head.describe();
        if self.policy.classify(kind) == Class::ServiceDown {
            let reason = format!("service_down: {failure}");
            if probing {
                tracing::info!(route = %self.name, "probe: service still down: {failure}");
                self.set_reason(&format!("{reason} (probe)")).await;
            } else {
                tracing::warn!(route = %self.name, %what, "service down, route switches to store mode: {failure}");
                self.set_mode(Mode::Store, CHANGED_BY_SERVICE_DOWN, &reason).await;
            }
            return Ok(());
        }
        if probing {
            // It answered: the service is back, whatever it thinks of this message.
            self.set_mode(
                Mode::Forward,
                CHANGED_BY_PROBE,
                &format!("probe: the service answered ({failure})"),
            )
            .await;
        }
        let current = self.head.as_mut().expect("failed needs a head");
        current.attempts += 1;
        match self.policy.decide(kind, current.attempts, &mut self.jitter) {
            Verdict::RetryAfter(delay) => {
                tracing::debug!(route = %self.name, %what, attempts = current.attempts, ?delay, "delivery failed, retrying: {failure}");
                self.retry_at = Some(Instant::now() + delay);
                Ok(())
            }
            verdict @ (Verdict::FailPoison | Verdict::FailExhausted) => {
                self.fail_head(verdict, Some(failure)).await
            }
            Verdict::StoreRoute => unreachable!("service_down was handled above"),
        }
    }

    /// Moves the head to the failed table. `failure: None` means it expired.
    async fn fail_head(
        &mut self,
        verdict: Verdict,
        failure: Option<DeliveryFailure>,
    ) -> Result<(), StoreError> {
        let current = self.head.as_ref().expect("fail_head needs a head");
        let (reason, last_error) = match &failure {
            Some(failure) => (
                verdict.failure_reason(failure.kind()).expect("a failing verdict has a reason"),
                failure.to_string(),
            ),
            None => (
                "expired".to_string(),
                format!(
                    "the message_ttl of {:?} (limits or [[queue]]) passed before the route reached the message",
                    self.message_ttl.unwrap_or_default()
                ),
            ),
        };
        let what = current.head.describe();
        let attempts = current.attempts;
        match &current.head {
            Head::Queued(message) => {
                let failure = NewFailure {
                    route: self.name.clone(),
                    reader: self.reader.clone(),
                    message: message.clone(),
                    attempts: current.attempts,
                    reason: reason.clone(),
                    last_error: last_error.clone(),
                };
                let id = self.store.fail_message(failure).await?;
                self.singles_after_failed_batch = self.singles_after_failed_batch.saturating_sub(1);
                self.delivered_through = message.seq;
                self.cursor.committed(message.seq);
                tracing::error!(route = %self.name, %what, failed_id = id, attempts = current.attempts, %reason, %last_error,
                    "message failed: it is in /v1/failed until an operator resubmits or discards it");
            }
            Head::Resubmitted(entry) => {
                let still_there = self
                    .store
                    .fail_again(entry.id, current.attempts, reason.clone(), last_error.clone())
                    .await?;
                if still_there {
                    tracing::error!(route = %self.name, %what, attempts = current.attempts, %reason, %last_error,
                        "resubmitted message failed again");
                }
            }
        }
        self.head = None;
        self.retry_at = None;
        self.set_reason(&format!("{reason}: {what} failed after {attempts} attempt(s)")).await;
        refresh_failed_metric(&self.store, &self.metrics, std::iter::once(&self.name)).await;
        Ok(())
    }

    /// Switches the mode, unless someone changed the route since [`Self::seen`].
    async fn set_mode(&mut self, mode: Mode, changed_by: &str, reason: &str) {
        match self.modes.set_mode_if_unchanged(&self.name, &self.seen, mode, changed_by, reason).await {
            Ok(Some(now)) => self.seen = now,
            Ok(None) => {}
            Err(e) => tracing::warn!(route = %self.name, "cannot record the route's mode change: {e}"),
        }
    }

    /// Records the policy's decision, unless someone changed the route since [`Self::seen`].
    async fn set_reason(&mut self, reason: &str) {
        match self.modes.set_reason_if_unchanged(&self.name, &self.seen, reason).await {
            Ok(Some(now)) => self.seen = now,
            Ok(None) => {}
            Err(e) => tracing::warn!(route = %self.name, "cannot record the route's reason: {e}"),
        }
    }
}
