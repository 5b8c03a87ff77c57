//! The edge's online/offline state machine (CONTRACT section 5): events and time in, actions out.
//!
//! The driver owns one [`Connectivity`], feeds it every [`Event`] with the [`Moment`] it happened,
//! calls [`Connectivity::tick`] when [`Connectivity::next_deadline`] comes, and carries out the
//! returned [`Action`]s in order. The machine never blocks on the driver: an action is a request
//! whose result comes back later as an event, and results that no longer fit the state (a
//! handshake of an abandoned transition, a probe answer after the edge is back online) are ignored.
//!
//! Design choices the contract leaves open, written down here so the driver can rely on them:
//!
//! - **Drain target.** On [`Action::StartOnlineChecks`] the driver records, per queue with
//!   unforwarded messages, the last seq stored at that moment and sends it as
//!   [`Event::DrainTargetRecorded`] *before* it reports forwarding progress. The backlog check
//!   passes once [`Event::Forwarded`] has reached every target; later writes have higher seqs
//!   and so never hold it back.
//! - **Transition ids.** Each transition to online has a [`TransitionId`]; handshake and drain
//!   results carry it, and results of an older transition are ignored.
//! - **Missed pings bound a transition too.** In `transition_to_online` the missed-ping clock
//!   starts when the transition starts, so a transition whose central went silent fails after
//!   `missed_pings * ping_interval` instead of hanging (and blocking writes) forever.
//! - **Maintenance skips `transition_to_offline`.** Re-checking cannot change an operator's
//!   decision, so maintenance takes an online edge offline at once.
//! - **`transition_to_offline_wait = 0s`** goes `online -> offline` directly, with no
//!   zero-length `transition_to_offline` in between.
//! - **Re-checks** during `transition_to_offline` run at once and then every
//!   [`TRANSITION_TO_OFFLINE_RECHECK_INTERVAL`]; a manual trigger arriving meanwhile is kept and
//!   starts a transition to online as soon as the edge has gone offline.
//! - **Who answered decides the wait.** A transition that ends because no trigger upstream
//!   answered at all (the handshake reached nobody: at startup, or when the probe's answer that
//!   started it turned out stale) is not a failed transition: the edge goes back to `offline`
//!   (one log entry) and keeps probing every `offline_probe_interval`, with no
//!   `failed_transition_wait`. The wait follows only a check that failed once an upstream
//!   answered: it refused this edge, is in maintenance, or the link it opened broke, went silent
//!   or could not take the backlog.
//! - **Probes** are fire-and-forget: if a probe is still running when the next one is due, the
//!   driver may skip the new one. Offline probes are spaced `offline_probe_interval` plus jitter.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::jitter::Jitter;
use crate::{check_duration, InvalidParams, Moment, PARAMETER_DURATION_LIMIT};

/// The offline log keeps this many entries, the newest.
pub const OFFLINE_LOG_CAPACITY_ENTRIES: usize = 100;

/// Spacing of re-check probes while in `transition_to_offline`. Short, because the whole state
/// lasts only `transition_to_offline_wait` (10 s by default); not configurable because the
/// contract has no key for it.
pub const TRANSITION_TO_OFFLINE_RECHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Retry-After suggested to blocked writers during `transition_to_online`, whose length is not
/// known in advance (a handshake plus a backlog drain).
pub const TRANSITION_TO_ONLINE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The `[connectivity]` settings, as typed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectivityParams {
    /// How often the central pings a connected edge.
    pub ping_interval: Duration,
    /// No ping for `missed_pings * ping_interval` means the link is down (at least 1).
    pub missed_pings: u32,
    /// While offline, how often to probe the upstreams (must not be zero).
    pub offline_probe_interval: Duration,
    /// How long to keep re-checking before going offline; zero goes offline at once.
    pub transition_to_offline_wait: Duration,
    /// After a failed transition to online, how long before the next automatic one.
    pub failed_transition_wait: Duration,
    /// Whether client writes are refused (503 + Retry-After) while transitioning.
    pub block_during_transition: bool,
}

impl Default for ConnectivityParams {
    /// The contract's defaults.
    fn default() -> Self {
        ConnectivityParams {
            ping_interval: Duration::from_secs(300),
            missed_pings: 3,
            offline_probe_interval: Duration::from_secs(60),
            transition_to_offline_wait: Duration::from_secs(10),
            failed_transition_wait: Duration::from_secs(3600),
            block_during_transition: false,
        }
    }
}

impl ConnectivityParams {
    /// Checks what the state machine relies on: non-zero intervals, no duration (nor the
    /// missed-ping window) over [`PARAMETER_DURATION_LIMIT`].
    pub fn validate(&self) -> Result<(), InvalidParams> {
        check_duration("connectivity.ping_interval", self.ping_interval, false)?;
        check_duration("connectivity.offline_probe_interval", self.offline_probe_interval, false)?;
        check_duration("connectivity.transition_to_offline_wait", self.transition_to_offline_wait, true)?;
        check_duration("connectivity.failed_transition_wait", self.failed_transition_wait, true)?;
        if self.missed_pings == 0 {
            return Err(InvalidParams::Zero { key: "connectivity.missed_pings" });
        }
        match self.ping_interval.checked_mul(self.missed_pings) {
            Some(window) if window <= PARAMETER_DURATION_LIMIT => Ok(()),
            _ => Err(InvalidParams::TooLong { key: "connectivity.missed_pings" }),
        }
    }

    /// No ping for this long means the link is down: `missed_pings * ping_interval`.
    pub fn missed_ping_window(&self) -> Duration {
        self.ping_interval.saturating_mul(self.missed_pings)
    }
}

/// The edge's connectivity state, named as in the API (`GET /v1/status` `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Offline,
    TransitionToOnline,
    Online,
    TransitionToOffline,
}

impl State {
    /// Every state, for metrics that report one series per state (`outpost_edge_state{state}`).
    pub const ALL: [State; 4] =
        [State::Offline, State::TransitionToOnline, State::Online, State::TransitionToOffline];

    /// The API name: `offline`, `transition_to_online`, `online`, `transition_to_offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Offline => "offline",
            State::TransitionToOnline => "transition_to_online",
            State::Online => "online",
            State::TransitionToOffline => "transition_to_offline",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the edge went offline: the offline log's machine-friendly `cause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineCause {
    /// No upstream answered (failover tried every endpoint), for a forward, handshake or re-check.
    CentralUnreachable,
    /// The ping connection from the central dropped.
    ConnectionLost,
    /// No ping for `missed_pings * ping_interval`.
    MissedPings,
    /// The central is in maintenance.
    Maintenance,
    /// The central refused this edge: unknown id, wrong token or incompatible version.
    Rejected,
    /// No upstream with `trigger = true` is configured or answered; only those decide the state.
    NoUpstream,
}

impl OfflineCause {
    pub fn as_str(self) -> &'static str {
        match self {
            OfflineCause::CentralUnreachable => "central_unreachable",
            OfflineCause::ConnectionLost => "connection_lost",
            OfflineCause::MissedPings => "missed_pings",
            OfflineCause::Maintenance => "maintenance",
            OfflineCause::Rejected => "rejected",
            OfflineCause::NoUpstream => "no_upstream",
        }
    }
}

impl fmt::Display for OfflineCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One offline-log entry: when (wall clock, unix ms), why, and human text naming the endpoint and error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineLogEntry {
    pub at_unix_ms: i64,
    pub cause: OfflineCause,
    pub detail: String,
}

/// Who asked for a transition to online by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    /// `POST /v1/admin/transition-online` on the edge (or `outpost ctl online`).
    AdminApi,
    /// "Send transition to online" from the central, over the ping connection.
    Central,
}

/// How an upstream failed, as far as the online state cares. The driver classifies its errors
/// into these; the text goes into the event's `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamFailure {
    /// No endpoint answered (failover tried them all): connect error, timeout, 5xx.
    Unreachable,
    /// The upstream answered and refused this edge (id, token, version).
    Rejected,
    /// Only upstreams with `trigger = false` answered, or none with `trigger = true` is configured.
    NoTriggerUpstream,
}

impl UpstreamFailure {
    fn offline_cause(self) -> OfflineCause {
        match self {
            UpstreamFailure::Unreachable => OfflineCause::CentralUnreachable,
            UpstreamFailure::Rejected => OfflineCause::Rejected,
            UpstreamFailure::NoTriggerUpstream => OfflineCause::NoUpstream,
        }
    }
}

/// Names one transition to online, so late results of an abandoned one are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransitionId(pub u64);

/// Something the driver observed. Events that do not fit the current state are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The node has started: begin the first transition to online. Only the first one counts.
    Started,
    /// A manual "transition to online now"; overrides `failed_transition_wait`.
    ManualTrigger { source: TriggerSource },
    /// The central pinged this edge.
    Ping,
    /// Bytes arrived from the central other than a ping (a batch acknowledged, downlink pulled):
    /// the link is alive, so the missed-ping clock restarts, but `last_ping_at` stays. On a slow
    /// line a ping may queue behind data; what arrived meanwhile is progress, not silence.
    SignOfLife,
    /// A probe (requested by [`Action::Probe`]) reached a trigger upstream that is not in maintenance.
    ProbeSucceeded { endpoint: String },
    /// A probe reached no trigger upstream; `detail` names the endpoints and errors.
    ProbeFailed { detail: String },
    /// The handshake of this transition succeeded: the trigger upstream at `endpoint` accepted
    /// this edge and is not in maintenance.
    HandshakeOk { transition: TransitionId, endpoint: String },
    /// The handshake of this transition failed.
    HandshakeFailed { transition: TransitionId, failure: UpstreamFailure, detail: String },
    /// The backlog to forward before this transition can finish: for each queue holding
    /// unforwarded messages, the last seq stored when the transition began. Empty: nothing to drain.
    DrainTargetRecorded { transition: TransitionId, last_seq_by_queue: BTreeMap<String, u64> },
    /// The forwarder has forwarded `queue` up to and including `forwarded_through_seq`.
    Forwarded { queue: String, forwarded_through_seq: u64 },
    /// Forwarding to the trigger upstream failed after failover tried every endpoint.
    ForwardFailed { failure: UpstreamFailure, detail: String },
    /// The ping connection from the central dropped.
    ConnectionLost { detail: String },
    /// The central at `endpoint` says it is in maintenance (in a probe, handshake or ping).
    Maintenance { endpoint: String },
}

/// Why a state change happened, for the driver's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateChangeReason {
    /// The node started.
    Startup,
    /// An offline probe reached a trigger upstream.
    UpstreamAnswered,
    /// A manual trigger.
    ManualTrigger { source: TriggerSource },
    /// Every online check passed.
    OnlineChecksPassed,
    /// A re-check during `transition_to_offline` succeeded.
    RecheckSucceeded,
    /// A failure; entering `offline` this is the logged cause.
    Failure { cause: OfflineCause },
}

impl fmt::Display for StateChangeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateChangeReason::Startup => f.write_str("startup"),
            StateChangeReason::UpstreamAnswered => f.write_str("upstream answered a probe"),
            StateChangeReason::ManualTrigger { source: TriggerSource::AdminApi } => {
                f.write_str("manual trigger from the admin API")
            }
            StateChangeReason::ManualTrigger { source: TriggerSource::Central } => {
                f.write_str("manual trigger from the central")
            }
            StateChangeReason::OnlineChecksPassed => f.write_str("online checks passed"),
            StateChangeReason::RecheckSucceeded => f.write_str("re-check succeeded"),
            StateChangeReason::Failure { cause } => write!(f, "failure: {cause}"),
        }
    }
}

/// Something the driver must do, in the order returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The state changed (already applied): log one line, count `outpost_state_transitions_total{from,to}`.
    EnterState { from: State, to: State, reason: StateChangeReason },
    /// Run the online checks of this transition: record the drain target
    /// ([`Event::DrainTargetRecorded`]), handshake with a trigger upstream (report
    /// [`Event::HandshakeOk`] / [`Event::HandshakeFailed`]) and forward the backlog
    /// (report [`Event::Forwarded`] / [`Event::ForwardFailed`]).
    StartOnlineChecks { transition: TransitionId },
    /// Check whether a trigger upstream answers; report [`Event::ProbeSucceeded`],
    /// [`Event::ProbeFailed`] or [`Event::Maintenance`].
    Probe,
    /// Persist this entry (the log survives restarts); it is already in [`Connectivity::offline_log`].
    AppendOfflineLog(OfflineLogEntry),
}

/// Per-state data. The public [`State`] is derived from it, so the two cannot disagree.
#[derive(Debug, Clone)]
enum Phase {
    Offline {
        next_probe_at: Instant,
        /// Set after a failed transition to online: until then, probe answers do not start one.
        automatic_transition_blocked_until: Option<Instant>,
    },
    TransitionToOnline {
        transition: TransitionId,
        /// A trigger upstream accepted this edge in this transition (so an upstream answered).
        handshake_ok: bool,
        /// `None` until the driver has recorded the drain target.
        queues_left_to_drain: Option<BTreeMap<String, u64>>,
    },
    Online,
    TransitionToOffline {
        give_up_at: Instant,
        next_recheck_at: Instant,
        cause: OfflineCause,
        detail: String,
        last_recheck_error: Option<String>,
        manual_trigger_pending: Option<TriggerSource>,
    },
}

/// The online/offline state machine of one edge; see the module doc.
#[derive(Debug, Clone)]
pub struct Connectivity {
    params: ConnectivityParams,
    jitter: Jitter,
    phase: Phase,
    state_since: Moment,
    started: bool,
    last_transition_id: u64,
    last_ping_at: Option<Moment>,
    /// The missed-ping window runs from here: the later of the last ping and the start of the
    /// current transition to online (or return to online).
    missed_ping_clock_start: Instant,
    connected_endpoint: Option<String>,
    offline_log: VecDeque<OfflineLogEntry>,
}

impl Connectivity {
    /// A machine in `offline`, as a starting edge is; send [`Event::Started`] to begin.
    pub fn new(params: ConnectivityParams, jitter: Jitter, now: Moment) -> Result<Self, InvalidParams> {
        params.validate()?;
        let mut jitter = jitter;
        let next_probe_at = now.instant + jitter.stretch(params.offline_probe_interval);
        Ok(Connectivity {
            params,
            jitter,
            phase: Phase::Offline { next_probe_at, automatic_transition_blocked_until: None },
            state_since: now,
            started: false,
            last_transition_id: 0,
            last_ping_at: None,
            missed_ping_clock_start: now.instant,
            connected_endpoint: None,
            offline_log: VecDeque::with_capacity(OFFLINE_LOG_CAPACITY_ENTRIES),
        })
    }

    /// Loads the persisted offline log (oldest first), keeping the newest
    /// [`OFFLINE_LOG_CAPACITY_ENTRIES`]. Entries already held are replaced.
    pub fn restore_offline_log(&mut self, entries_oldest_first: impl IntoIterator<Item = OfflineLogEntry>) {
        self.offline_log.clear();
        for entry in entries_oldest_first {
            self.push_offline_log(entry);
        }
    }

    pub fn params(&self) -> &ConnectivityParams {
        &self.params
    }

    pub fn state(&self) -> State {
        match self.phase {
            Phase::Offline { .. } => State::Offline,
            Phase::TransitionToOnline { .. } => State::TransitionToOnline,
            Phase::Online => State::Online,
            Phase::TransitionToOffline { .. } => State::TransitionToOffline,
        }
    }

    /// When the current state was entered.
    pub fn state_since(&self) -> Moment {
        self.state_since
    }

    /// The offline log, oldest first, at most [`OFFLINE_LOG_CAPACITY_ENTRIES`] entries.
    pub fn offline_log(&self) -> &VecDeque<OfflineLogEntry> {
        &self.offline_log
    }

    /// When the central last pinged this edge (`last_ping_at` in the status).
    pub fn last_ping_at(&self) -> Option<Moment> {
        self.last_ping_at
    }

    /// The upstream of the last successful handshake or re-check.
    pub fn connected_endpoint(&self) -> Option<&str> {
        self.connected_endpoint.as_deref()
    }

    /// The running transition to online, if any (for matching results to it).
    pub fn current_transition(&self) -> Option<TransitionId> {
        match self.phase {
            Phase::TransitionToOnline { transition, .. } => Some(transition),
            _ => None,
        }
    }

    /// Until when probe answers may not start a transition (after a failed one); `None` if they may.
    pub fn automatic_transition_blocked_until(&self, now: Instant) -> Option<Instant> {
        match self.phase {
            Phase::Offline { automatic_transition_blocked_until: Some(until), .. } if now < until => {
                Some(until)
            }
            _ => None,
        }
    }

    /// Whether client writes must be refused now (503): transitioning with `block_during_transition`.
    pub fn writes_blocked(&self) -> bool {
        self.params.block_during_transition
            && matches!(self.state(), State::TransitionToOnline | State::TransitionToOffline)
    }

    /// The Retry-After to send with a refused write, in whole seconds (at least 1); `None` when
    /// writes are not blocked. In `transition_to_offline` it is the time left of the wait.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        if !self.writes_blocked() {
            return None;
        }
        let suggested = match self.phase {
            Phase::TransitionToOffline { give_up_at, .. } => give_up_at.saturating_duration_since(now),
            _ => TRANSITION_TO_ONLINE_RETRY_AFTER,
        };
        let whole_seconds = suggested.as_secs() + u64::from(suggested.subsec_nanos() > 0);
        Some(Duration::from_secs(whole_seconds.max(1)))
    }

    /// When the driver must call [`Connectivity::tick`] next (`None`: only events matter now).
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Offline { next_probe_at, automatic_transition_blocked_until } => {
                Some(match automatic_transition_blocked_until {
                    Some(until) => (*next_probe_at).min(*until),
                    None => *next_probe_at,
                })
            }
            Phase::TransitionToOnline { .. } | Phase::Online => Some(self.missed_ping_deadline()),
            Phase::TransitionToOffline { give_up_at, next_recheck_at, .. } => {
                Some((*give_up_at).min(*next_recheck_at))
            }
        }
    }

    /// Applies one event that happened at `now`.
    pub fn handle(&mut self, now: Moment, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Event::Ping = event {
            self.last_ping_at = Some(now);
            self.missed_ping_clock_start = self.missed_ping_clock_start.max(now.instant);
            return actions;
        }
        if let Event::SignOfLife = event {
            self.missed_ping_clock_start = self.missed_ping_clock_start.max(now.instant);
            return actions;
        }
        match self.state() {
            State::Offline => self.handle_offline(now, event, &mut actions),
            State::TransitionToOnline => self.handle_transition_to_online(now, event, &mut actions),
            State::Online => self.handle_online(now, event, &mut actions),
            State::TransitionToOffline => self.handle_transition_to_offline(now, event, &mut actions),
        }
        actions
    }

    /// Acts on the time that has passed: probes, missed pings, the end of a wait. Calling it
    /// early or often is harmless; calling it late catches up with one action, not many.
    pub fn tick(&mut self, now: Moment) -> Vec<Action> {
        let mut actions = Vec::new();
        match &mut self.phase {
            Phase::Offline { next_probe_at, automatic_transition_blocked_until } => {
                let wait_just_ended =
                    automatic_transition_blocked_until.is_some_and(|until| now.instant >= until);
                if wait_just_ended {
                    *automatic_transition_blocked_until = None;
                }
                // The end of a failed-transition wait probes at once, so the next automatic
                // transition comes right when the wait allows it.
                if wait_just_ended || now.instant >= *next_probe_at {
                    *next_probe_at = now.instant + self.jitter.stretch(self.params.offline_probe_interval);
                    actions.push(Action::Probe);
                }
            }
            Phase::TransitionToOnline { handshake_ok, .. } => {
                let answered = *handshake_ok;
                if now.instant >= self.missed_ping_deadline() {
                    let detail = self.missed_pings_detail(now);
                    self.fail_transition_to_online(
                        now,
                        OfflineCause::MissedPings,
                        detail,
                        answered,
                        &mut actions,
                    );
                }
            }
            Phase::Online => {
                if now.instant >= self.missed_ping_deadline() {
                    let detail = self.missed_pings_detail(now);
                    self.fail_while_online(now, OfflineCause::MissedPings, detail, &mut actions);
                }
            }
            Phase::TransitionToOffline { give_up_at, next_recheck_at, .. } => {
                if now.instant >= *give_up_at {
                    self.give_up_transition_to_offline(now, &mut actions);
                } else if now.instant >= *next_recheck_at {
                    *next_recheck_at = now.instant + TRANSITION_TO_OFFLINE_RECHECK_INTERVAL;
                    actions.push(Action::Probe);
                }
            }
        }
        actions
    }

    fn handle_offline(&mut self, now: Moment, event: Event, actions: &mut Vec<Action>) {
        match event {
            Event::Started if !self.started => {
                self.begin_transition_to_online(now, StateChangeReason::Startup, actions);
            }
            Event::ManualTrigger { source } => {
                self.begin_transition_to_online(now, StateChangeReason::ManualTrigger { source }, actions);
            }
            // During a failed-transition wait probes still run, so that a central's trigger can
            // reach the edge, but only a manual trigger may start a transition.
            Event::ProbeSucceeded { .. }
                if self.automatic_transition_blocked_until(now.instant).is_none() =>
            {
                self.begin_transition_to_online(now, StateChangeReason::UpstreamAnswered, actions);
            }
            // Already offline; failures and late results change nothing. Maintenance answers
            // to probes simply do not start a transition.
            _ => {}
        }
    }

    fn handle_transition_to_online(&mut self, now: Moment, event: Event, actions: &mut Vec<Action>) {
        let Phase::TransitionToOnline { transition: current, handshake_ok, queues_left_to_drain } =
            &mut self.phase
        else {
            unreachable!("handle_transition_to_online is called only in transition_to_online");
        };
        match event {
            Event::HandshakeOk { transition, endpoint } if transition == *current => {
                *handshake_ok = true;
                self.connected_endpoint = Some(endpoint);
            }
            Event::DrainTargetRecorded { transition, last_seq_by_queue } if transition == *current => {
                *queues_left_to_drain = Some(last_seq_by_queue);
            }
            Event::Forwarded { queue, forwarded_through_seq } => {
                if let Some(queues_left) = queues_left_to_drain {
                    if queues_left.get(&queue).is_some_and(|&last_seq| forwarded_through_seq >= last_seq) {
                        queues_left.remove(&queue);
                    }
                }
            }
            Event::HandshakeFailed { transition, failure, detail } if transition == *current => {
                let answered = *handshake_ok || failure == UpstreamFailure::Rejected;
                self.fail_transition_to_online(now, failure.offline_cause(), detail, answered, actions);
                return;
            }
            Event::ForwardFailed { failure, detail } => {
                let answered = *handshake_ok || failure == UpstreamFailure::Rejected;
                self.fail_transition_to_online(now, failure.offline_cause(), detail, answered, actions);
                return;
            }
            Event::ConnectionLost { detail } => {
                let answered = *handshake_ok;
                self.fail_transition_to_online(now, OfflineCause::ConnectionLost, detail, answered, actions);
                return;
            }
            Event::Maintenance { endpoint } => {
                let detail = format!("central {endpoint} is in maintenance");
                self.fail_transition_to_online(now, OfflineCause::Maintenance, detail, true, actions);
                return;
            }
            // Already transitioning; stale results of other transitions are ignored.
            _ => return,
        }
        let all_checks_passed =
            *handshake_ok && queues_left_to_drain.as_ref().is_some_and(BTreeMap::is_empty);
        if all_checks_passed {
            self.enter(now, Phase::Online, StateChangeReason::OnlineChecksPassed, actions);
        }
    }

    fn handle_online(&mut self, now: Moment, event: Event, actions: &mut Vec<Action>) {
        match event {
            Event::ForwardFailed { failure, detail } => {
                self.fail_while_online(now, failure.offline_cause(), detail, actions);
            }
            Event::ConnectionLost { detail } => {
                self.fail_while_online(now, OfflineCause::ConnectionLost, detail, actions);
            }
            Event::Maintenance { endpoint } => {
                let detail = format!("central {endpoint} is in maintenance");
                let reason = StateChangeReason::Failure { cause: OfflineCause::Maintenance };
                self.go_offline(now, OfflineCause::Maintenance, detail, reason, false, actions);
            }
            // Already online: triggers and probe answers have nothing to add, handshake results
            // belong to a finished transition.
            _ => {}
        }
    }

    fn handle_transition_to_offline(&mut self, now: Moment, event: Event, actions: &mut Vec<Action>) {
        let Phase::TransitionToOffline { last_recheck_error, manual_trigger_pending, .. } = &mut self.phase
        else {
            unreachable!("handle_transition_to_offline is called only in transition_to_offline");
        };
        match event {
            Event::ProbeSucceeded { endpoint } => {
                self.connected_endpoint = Some(endpoint);
                // A fresh missed-ping window: the central gets its full allowance to ping again.
                self.missed_ping_clock_start = now.instant;
                self.enter(now, Phase::Online, StateChangeReason::RecheckSucceeded, actions);
            }
            Event::ProbeFailed { detail } => *last_recheck_error = Some(detail),
            Event::ManualTrigger { source } => *manual_trigger_pending = Some(source),
            Event::Maintenance { endpoint } => {
                let detail = format!("central {endpoint} is in maintenance");
                let reason = StateChangeReason::Failure { cause: OfflineCause::Maintenance };
                self.go_offline(now, OfflineCause::Maintenance, detail, reason, false, actions);
            }
            // Further failures while already re-checking add nothing.
            _ => {}
        }
    }

    fn begin_transition_to_online(
        &mut self,
        now: Moment,
        reason: StateChangeReason,
        actions: &mut Vec<Action>,
    ) {
        self.started = true;
        self.last_transition_id += 1;
        let transition = TransitionId(self.last_transition_id);
        self.missed_ping_clock_start = now.instant;
        let phase = Phase::TransitionToOnline { transition, handshake_ok: false, queues_left_to_drain: None };
        self.enter(now, phase, reason, actions);
        actions.push(Action::StartOnlineChecks { transition });
    }

    /// Back to `offline` from `transition_to_online`. `upstream_answered`: a trigger upstream
    /// answered during this transition, so it failed and `failed_transition_wait` applies; if
    /// none did, the edge just keeps probing (see the module doc).
    fn fail_transition_to_online(
        &mut self,
        now: Moment,
        cause: OfflineCause,
        detail: String,
        upstream_answered: bool,
        actions: &mut Vec<Action>,
    ) {
        let detail = if upstream_answered {
            format!("transition to online failed: {detail}")
        } else {
            format!(
                "no upstream answered (probing every {}): {detail}",
                crate::format_duration(self.params.offline_probe_interval)
            )
        };
        let reason = StateChangeReason::Failure { cause };
        self.go_offline(now, cause, detail, reason, upstream_answered, actions);
    }

    fn fail_while_online(
        &mut self,
        now: Moment,
        cause: OfflineCause,
        detail: String,
        actions: &mut Vec<Action>,
    ) {
        let reason = StateChangeReason::Failure { cause };
        if self.params.transition_to_offline_wait.is_zero() {
            self.go_offline(now, cause, detail, reason, false, actions);
            return;
        }
        let phase = Phase::TransitionToOffline {
            give_up_at: now.instant + self.params.transition_to_offline_wait,
            next_recheck_at: now.instant + TRANSITION_TO_OFFLINE_RECHECK_INTERVAL,
            cause,
            detail,
            last_recheck_error: None,
            manual_trigger_pending: None,
        };
        self.enter(now, phase, reason, actions);
        actions.push(Action::Probe);
    }

    fn give_up_transition_to_offline(&mut self, now: Moment, actions: &mut Vec<Action>) {
        let Phase::TransitionToOffline { cause, detail, last_recheck_error, manual_trigger_pending, .. } =
            &mut self.phase
        else {
            unreachable!("give_up_transition_to_offline is called only in transition_to_offline");
        };
        let cause = *cause;
        let manual_trigger_pending = *manual_trigger_pending;
        let mut detail = std::mem::take(detail);
        match last_recheck_error {
            Some(recheck_error) if *recheck_error == detail => {
                detail.push_str("; re-checks failed the same way")
            }
            Some(recheck_error) => detail = format!("{detail}; re-checks failed: {recheck_error}"),
            None => {}
        }
        self.go_offline(now, cause, detail, StateChangeReason::Failure { cause }, false, actions);
        if let Some(source) = manual_trigger_pending {
            self.begin_transition_to_online(now, StateChangeReason::ManualTrigger { source }, actions);
        }
    }

    fn go_offline(
        &mut self,
        now: Moment,
        cause: OfflineCause,
        detail: String,
        reason: StateChangeReason,
        after_failed_transition: bool,
        actions: &mut Vec<Action>,
    ) {
        let phase = Phase::Offline {
            next_probe_at: now.instant + self.jitter.stretch(self.params.offline_probe_interval),
            automatic_transition_blocked_until: after_failed_transition
                .then(|| now.instant + self.params.failed_transition_wait),
        };
        self.enter(now, phase, reason, actions);
        self.connected_endpoint = None;
        let entry = OfflineLogEntry { at_unix_ms: now.unix_ms, cause, detail };
        self.push_offline_log(entry.clone());
        actions.push(Action::AppendOfflineLog(entry));
    }

    fn enter(&mut self, now: Moment, phase: Phase, reason: StateChangeReason, actions: &mut Vec<Action>) {
        let from = self.state();
        self.phase = phase;
        self.state_since = now;
        actions.push(Action::EnterState { from, to: self.state(), reason });
    }

    fn push_offline_log(&mut self, entry: OfflineLogEntry) {
        if self.offline_log.len() == OFFLINE_LOG_CAPACITY_ENTRIES {
            self.offline_log.pop_front();
        }
        self.offline_log.push_back(entry);
    }

    fn missed_ping_deadline(&self) -> Instant {
        self.missed_ping_clock_start + self.params.missed_ping_window()
    }

    fn missed_pings_detail(&self, now: Moment) -> String {
        let silent_for = now.instant.saturating_duration_since(self.missed_ping_clock_start);
        let from = match &self.connected_endpoint {
            Some(endpoint) => format!("from {endpoint} "),
            None => String::new(),
        };
        format!(
            "no ping {from}for {}s (missed_pings {} x ping_interval {}s)",
            silent_for.as_secs(),
            self.params.missed_pings,
            self.params.ping_interval.as_secs()
        )
    }
}
