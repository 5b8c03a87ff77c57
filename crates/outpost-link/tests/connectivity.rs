//! Table-driven tests of the online/offline state machine, with a fake clock and no I/O.

use std::time::{Duration, Instant};

use outpost_link::{
    Action, Connectivity, ConnectivityParams, Event, InvalidParams, Jitter, Moment, OfflineCause,
    OfflineLogEntry, State, StateChangeReason, TransitionId, TriggerSource, UpstreamFailure,
    OFFLINE_LOG_CAPACITY_ENTRIES, TRANSITION_TO_OFFLINE_RECHECK_INTERVAL,
};

const BASE_UNIX_MS: i64 = 1_800_000_000_000;
const CENTRAL: &str = "http://central-a:7401";

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn millis(milliseconds: u64) -> Duration {
    Duration::from_millis(milliseconds)
}

/// A machine plus a fake clock: every call takes the offset from the start of the test.
struct Edge {
    base: Instant,
    machine: Connectivity,
}

impl Edge {
    fn new(params: ConnectivityParams) -> Edge {
        Edge::with_jitter(params, Jitter::none())
    }

    fn with_jitter(params: ConnectivityParams, jitter: Jitter) -> Edge {
        let base = Instant::now();
        let machine = Connectivity::new(params, jitter, moment(base, Duration::ZERO)).expect("valid params");
        Edge { base, machine }
    }

    /// Started at 0s, handshake and (empty) drain at 1s: online since 1s.
    fn online(params: ConnectivityParams) -> Edge {
        let mut edge = Edge::new(params);
        edge.handle(secs(0), Event::Started);
        let transition = edge.machine.current_transition().expect("transitioning");
        edge.handle(secs(1), handshake_ok(transition));
        edge.handle(secs(1), drain_target(transition, &[]));
        assert_eq!(edge.machine.state(), State::Online);
        edge
    }

    fn at(&self, offset: Duration) -> Moment {
        moment(self.base, offset)
    }

    fn handle(&mut self, offset: Duration, event: Event) -> Vec<Action> {
        let now = self.at(offset);
        self.machine.handle(now, event)
    }

    fn tick(&mut self, offset: Duration) -> Vec<Action> {
        let now = self.at(offset);
        self.machine.tick(now)
    }

    fn state(&self) -> State {
        self.machine.state()
    }

    fn deadline_offset(&self) -> Option<Duration> {
        self.machine.next_deadline().map(|deadline| deadline - self.base)
    }
}

fn moment(base: Instant, offset: Duration) -> Moment {
    Moment { instant: base + offset, unix_ms: BASE_UNIX_MS + offset.as_millis() as i64 }
}

fn handshake_ok(transition: TransitionId) -> Event {
    Event::HandshakeOk { transition, endpoint: CENTRAL.to_string() }
}

fn drain_target(transition: TransitionId, targets: &[(&str, u64)]) -> Event {
    let last_seq_by_queue = targets.iter().map(|(queue, seq)| (queue.to_string(), *seq)).collect();
    Event::DrainTargetRecorded { transition, last_seq_by_queue }
}

fn enter(from: State, to: State, reason: StateChangeReason) -> Action {
    Action::EnterState { from, to, reason }
}

fn failure(cause: OfflineCause) -> StateChangeReason {
    StateChangeReason::Failure { cause }
}

fn offline_log_entries(actions: &[Action]) -> Vec<&OfflineLogEntry> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::AppendOfflineLog(entry) => Some(entry),
            _ => None,
        })
        .collect()
}

/// The params most tests use: the contract's defaults, spelled out so the numbers below read plainly.
fn params() -> ConnectivityParams {
    ConnectivityParams {
        ping_interval: secs(300),
        missed_pings: 3,
        offline_probe_interval: secs(60),
        transition_to_offline_wait: secs(10),
        failed_transition_wait: secs(3600),
        block_during_transition: false,
    }
}

#[test]
fn defaults_are_the_contracts() {
    assert_eq!(ConnectivityParams::default(), params());
}

#[test]
fn a_starting_edge_is_offline_then_transitions_then_goes_online_whichever_check_passes_last() {
    // (name, events after Started, in order)
    type Case = (&'static str, fn(TransitionId) -> Vec<Event>);
    let cases: [Case; 2] = [
        ("handshake first", |t| vec![handshake_ok(t), drain_target(t, &[])]),
        ("drain target first", |t| vec![drain_target(t, &[]), handshake_ok(t)]),
    ];
    for (name, events) in cases {
        let mut edge = Edge::new(params());
        assert_eq!(edge.state(), State::Offline, "{name}");
        assert_eq!(edge.machine.state_since(), edge.at(secs(0)), "{name}");

        let actions = edge.handle(secs(2), Event::Started);
        let transition = TransitionId(1);
        assert_eq!(
            actions,
            vec![
                enter(State::Offline, State::TransitionToOnline, StateChangeReason::Startup),
                Action::StartOnlineChecks { transition }
            ],
            "{name}"
        );
        assert_eq!(edge.state(), State::TransitionToOnline, "{name}");
        assert_eq!(edge.machine.state_since(), edge.at(secs(2)), "{name}");

        let mut events = events(transition);
        let last = events.pop().expect("two events");
        for event in events {
            assert_eq!(edge.handle(secs(3), event), vec![], "{name}: one check alone is not enough");
            assert_eq!(edge.state(), State::TransitionToOnline, "{name}");
        }
        assert_eq!(
            edge.handle(secs(4), last),
            vec![enter(State::TransitionToOnline, State::Online, StateChangeReason::OnlineChecksPassed)],
            "{name}"
        );
        assert_eq!(edge.state(), State::Online, "{name}");
        assert_eq!(edge.machine.state_since(), edge.at(secs(4)), "{name}");
        assert_eq!(edge.machine.connected_endpoint(), Some(CENTRAL), "{name}");
        assert!(edge.machine.offline_log().is_empty(), "{name}");
    }
}

#[test]
fn only_the_backlog_held_at_transition_start_must_drain() {
    let mut edge = Edge::new(params());
    edge.handle(secs(0), Event::Started);
    let transition = TransitionId(1);
    edge.handle(secs(1), handshake_ok(transition));
    edge.handle(secs(1), drain_target(transition, &[("orders", 10), ("audit", 3)]));

    // (forwarded event, state expected after it)
    let steps = [
        (("orders", 5), State::TransitionToOnline),
        // A queue that was empty at transition start (new writes) does not hold anything back.
        (("new-queue", 1), State::TransitionToOnline),
        (("audit", 3), State::TransitionToOnline),
        // orders has grown to seq 20 meanwhile; reaching the recorded 10 is enough.
        (("orders", 10), State::Online),
    ];
    for ((queue, seq), expected_state) in steps {
        edge.handle(secs(2), Event::Forwarded { queue: queue.to_string(), forwarded_through_seq: seq });
        assert_eq!(edge.state(), expected_state, "after forwarding {queue} through {seq}");
    }
}

#[test]
fn forwarding_past_the_target_counts_and_progress_before_the_target_is_recorded_does_not() {
    let mut edge = Edge::new(params());
    edge.handle(secs(0), Event::Started);
    let transition = TransitionId(1);
    edge.handle(secs(1), handshake_ok(transition));
    edge.handle(secs(1), Event::Forwarded { queue: "orders".into(), forwarded_through_seq: 50 });
    assert_eq!(edge.state(), State::TransitionToOnline, "no drain target yet: the check has not passed");
    edge.handle(secs(1), drain_target(transition, &[("orders", 10)]));
    assert_eq!(edge.state(), State::TransitionToOnline);
    edge.handle(secs(2), Event::Forwarded { queue: "orders".into(), forwarded_through_seq: 12 });
    assert_eq!(edge.state(), State::Online);
}

/// How each online check can fail during a transition that started at 0s; each returns the
/// actions of the failure, which happens at 10s (missed pings: at the end of the window).
type FailTransition = fn(&mut Edge, TransitionId) -> (Duration, Vec<Action>);

/// (name, how it fails, the cause logged, whether an upstream answered: only then does
/// `failed_transition_wait` apply).
fn failed_online_checks() -> Vec<(&'static str, FailTransition, OfflineCause, bool)> {
    vec![
        (
            "no upstream answers the handshake",
            |edge, t| {
                let event = Event::HandshakeFailed {
                    transition: t,
                    failure: UpstreamFailure::Unreachable,
                    detail: "all 1 upstreams failed: http://central-a:7401: connection refused".into(),
                };
                (secs(10), edge.handle(secs(10), event))
            },
            OfflineCause::CentralUnreachable,
            false,
        ),
        (
            "the central rejects this edge",
            |edge, t| {
                let event = Event::HandshakeFailed {
                    transition: t,
                    failure: UpstreamFailure::Rejected,
                    detail: "http://central-a:7401: 401 unknown token for edge store-042".into(),
                };
                (secs(10), edge.handle(secs(10), event))
            },
            OfflineCause::Rejected,
            true,
        ),
        (
            "only a non-trigger upstream answers",
            |edge, t| {
                let event = Event::HandshakeFailed {
                    transition: t,
                    failure: UpstreamFailure::NoTriggerUpstream,
                    detail: "no upstream with trigger = true answered".into(),
                };
                (secs(10), edge.handle(secs(10), event))
            },
            OfflineCause::NoUpstream,
            false,
        ),
        (
            "the central is in maintenance",
            |edge, _| (secs(10), edge.handle(secs(10), Event::Maintenance { endpoint: CENTRAL.into() })),
            OfflineCause::Maintenance,
            true,
        ),
        (
            "forwarding the backlog fails",
            |edge, t| {
                edge.handle(secs(1), handshake_ok(t));
                edge.handle(secs(1), drain_target(t, &[("orders", 10)]));
                let event = Event::ForwardFailed {
                    failure: UpstreamFailure::Unreachable,
                    detail: "all 1 upstreams failed: http://central-a:7401: timed out".into(),
                };
                (secs(10), edge.handle(secs(10), event))
            },
            OfflineCause::CentralUnreachable,
            true,
        ),
        (
            "the ping connection drops",
            |edge, t| {
                edge.handle(secs(1), handshake_ok(t));
                (secs(10), edge.handle(secs(10), Event::ConnectionLost { detail: "reset by peer".into() }))
            },
            OfflineCause::ConnectionLost,
            true,
        ),
        (
            "no ping during a long drain",
            |edge, t| {
                edge.handle(secs(1), handshake_ok(t));
                edge.handle(secs(1), drain_target(t, &[("orders", 1_000_000)]));
                assert_eq!(edge.tick(secs(900) - millis(1)), vec![], "not before the window");
                (secs(900), edge.tick(secs(900)))
            },
            OfflineCause::MissedPings,
            true,
        ),
        (
            "the link drops before the handshake finished",
            |edge, _| {
                (secs(10), edge.handle(secs(10), Event::ConnectionLost { detail: "reset by peer".into() }))
            },
            OfflineCause::ConnectionLost,
            false,
        ),
    ]
}

#[test]
fn each_failed_online_check_goes_offline_logs_the_cause_and_honours_failed_transition_wait() {
    for (name, fail, cause, answered) in failed_online_checks().into_iter().filter(|check| check.3) {
        assert!(answered);
        let mut edge = Edge::new(params());
        edge.handle(secs(0), Event::Started);
        let (failed_at, actions) = fail(&mut edge, TransitionId(1));

        assert_eq!(
            actions.first(),
            Some(&enter(State::TransitionToOnline, State::Offline, failure(cause))),
            "{name}"
        );
        let entries = offline_log_entries(&actions);
        assert_eq!(entries.len(), 1, "{name}: one log entry");
        assert_eq!(entries[0].cause, cause, "{name}");
        assert_eq!(entries[0].at_unix_ms, edge.at(failed_at).unix_ms, "{name}");
        assert!(
            entries[0].detail.starts_with("transition to online failed: "),
            "{name}: {}",
            entries[0].detail
        );
        assert_eq!(edge.machine.offline_log().back(), Some(entries[0]), "{name}");
        assert_eq!(edge.state(), State::Offline, "{name}");

        let wait_ends = failed_at + secs(3600);
        assert_eq!(
            edge.machine.automatic_transition_blocked_until(edge.at(failed_at).instant),
            Some(edge.at(wait_ends).instant),
            "{name}"
        );
        // Probes still run during the wait, every offline_probe_interval ...
        assert_eq!(edge.tick(failed_at + secs(60)), vec![Action::Probe], "{name}");
        // ... but an answer does not start a transition, up to the last moment of the wait.
        for offset in [failed_at + secs(60), wait_ends - millis(1)] {
            let answered = edge.handle(offset, Event::ProbeSucceeded { endpoint: CENTRAL.into() });
            assert_eq!(answered, vec![], "{name}: probe answer at {offset:?} is inside the wait");
            assert_eq!(edge.state(), State::Offline, "{name}");
        }
        // The end of the wait probes at once, and an answer then starts a transition.
        assert_eq!(edge.tick(wait_ends), vec![Action::Probe], "{name}");
        assert_eq!(
            edge.machine.automatic_transition_blocked_until(edge.at(wait_ends).instant),
            None,
            "{name}"
        );
        assert_eq!(
            edge.handle(wait_ends + secs(1), Event::ProbeSucceeded { endpoint: CENTRAL.into() }),
            vec![
                enter(State::Offline, State::TransitionToOnline, StateChangeReason::UpstreamAnswered),
                Action::StartOnlineChecks { transition: TransitionId(2) }
            ],
            "{name}"
        );
    }
}

/// CONTRACT section 5: when no upstream answered at all (at startup, or a probe's answer turned out
/// stale), the edge is offline with one log entry and no failed-transition wait: the next probe
/// that an upstream answers starts a transition.
#[test]
fn when_no_upstream_answered_there_is_no_failed_transition_wait() {
    for (name, fail, cause, answered) in failed_online_checks().into_iter().filter(|check| !check.3) {
        assert!(!answered);
        let mut edge = Edge::new(params());
        edge.handle(secs(0), Event::Started);
        let (failed_at, actions) = fail(&mut edge, TransitionId(1));
        assert_eq!(
            actions.first(),
            Some(&enter(State::TransitionToOnline, State::Offline, failure(cause))),
            "{name}"
        );
        let entries = offline_log_entries(&actions);
        assert_eq!(entries.len(), 1, "{name}: one log entry");
        assert!(
            entries[0].detail.starts_with("no upstream answered (probing every 60s): "),
            "{name}: {}",
            entries[0].detail
        );
        assert_eq!(
            edge.machine.automatic_transition_blocked_until(edge.at(failed_at).instant),
            None,
            "{name}"
        );
        // Probing goes on every offline_probe_interval, and the first answer starts a transition.
        assert_eq!(edge.deadline_offset(), Some(failed_at + secs(60)), "{name}");
        assert_eq!(edge.tick(failed_at + secs(60)), vec![Action::Probe], "{name}");
        assert_eq!(
            edge.handle(failed_at + secs(60), Event::ProbeFailed { detail: "refused".into() }),
            vec![]
        );
        assert_eq!(edge.tick(failed_at + secs(120)), vec![Action::Probe], "{name}");
        assert_eq!(
            edge.handle(failed_at + secs(120), Event::ProbeSucceeded { endpoint: CENTRAL.into() }),
            vec![
                enter(State::Offline, State::TransitionToOnline, StateChangeReason::UpstreamAnswered),
                Action::StartOnlineChecks { transition: TransitionId(2) }
            ],
            "{name}"
        );
        // That answer turns out stale (the handshake reaches nobody): still no wait.
        let stale = Event::HandshakeFailed {
            transition: TransitionId(2),
            failure: UpstreamFailure::Unreachable,
            detail: "all 1 upstreams failed: http://central-a:7401: connection refused".into(),
        };
        edge.handle(failed_at + secs(121), stale);
        assert_eq!(edge.state(), State::Offline, "{name}");
        assert_eq!(
            edge.machine.automatic_transition_blocked_until(edge.at(failed_at + secs(121)).instant),
            None
        );
        assert_eq!(edge.tick(failed_at + secs(181)), vec![Action::Probe], "{name}");
        edge.handle(failed_at + secs(181), Event::ProbeSucceeded { endpoint: CENTRAL.into() });
        edge.handle(failed_at + secs(182), handshake_ok(TransitionId(3)));
        edge.handle(failed_at + secs(182), drain_target(TransitionId(3), &[]));
        assert_eq!(edge.state(), State::Online, "{name}");
        assert_eq!(edge.machine.offline_log().len(), 2, "{name}: one entry per return to offline");
    }
}

#[test]
fn probe_answers_during_the_wait_never_start_a_transition() {
    let mut edge = Edge::new(params());
    edge.handle(secs(0), Event::Started);
    let detail = "unknown token".to_string();
    edge.handle(
        secs(0),
        Event::HandshakeFailed { transition: TransitionId(1), failure: UpstreamFailure::Rejected, detail },
    );
    // The whole hour: a probe every minute, each answered, none starting a transition.
    for minute in 1..60 {
        let offset = secs(60 * minute);
        assert_eq!(edge.tick(offset), vec![Action::Probe], "minute {minute}");
        assert_eq!(edge.handle(offset, Event::ProbeSucceeded { endpoint: CENTRAL.into() }), vec![]);
    }
    assert_eq!(edge.state(), State::Offline);
    assert_eq!(edge.machine.state_since(), edge.at(secs(0)));
}

#[test]
fn a_manual_trigger_overrides_failed_transition_wait_from_either_source() {
    for source in [TriggerSource::AdminApi, TriggerSource::Central] {
        let mut edge = Edge::new(params());
        edge.handle(secs(0), Event::Started);
        edge.handle(secs(1), Event::Maintenance { endpoint: CENTRAL.into() });
        assert!(edge.machine.automatic_transition_blocked_until(edge.at(secs(2)).instant).is_some());

        let actions = edge.handle(secs(120), Event::ManualTrigger { source });
        assert_eq!(
            actions,
            vec![
                enter(State::Offline, State::TransitionToOnline, StateChangeReason::ManualTrigger { source }),
                Action::StartOnlineChecks { transition: TransitionId(2) }
            ],
            "{source:?}"
        );
        // And the manual transition can succeed.
        edge.handle(secs(121), handshake_ok(TransitionId(2)));
        edge.handle(secs(121), drain_target(TransitionId(2), &[]));
        assert_eq!(edge.state(), State::Online, "{source:?}");
    }
}

#[test]
fn a_manual_trigger_while_offline_without_a_wait_starts_a_transition_too() {
    let mut edge = Edge::online(ConnectivityParams { transition_to_offline_wait: secs(0), ..params() });
    edge.handle(secs(5), Event::ConnectionLost { detail: "reset".into() });
    assert_eq!(edge.state(), State::Offline);
    let actions = edge.handle(secs(6), Event::ManualTrigger { source: TriggerSource::AdminApi });
    assert_eq!(actions.len(), 2);
    assert_eq!(edge.state(), State::TransitionToOnline);
}

#[test]
fn a_manual_trigger_during_transition_to_offline_starts_a_transition_once_offline() {
    let mut edge = Edge::online(params());
    edge.handle(secs(10), Event::ConnectionLost { detail: "reset".into() });
    assert_eq!(edge.handle(secs(11), Event::ManualTrigger { source: TriggerSource::Central }), vec![]);
    let actions = edge.tick(secs(20));
    let reason = StateChangeReason::ManualTrigger { source: TriggerSource::Central };
    assert_eq!(
        actions[0],
        enter(State::TransitionToOffline, State::Offline, failure(OfflineCause::ConnectionLost))
    );
    assert!(matches!(actions[1], Action::AppendOfflineLog(_)));
    assert_eq!(
        actions[2..],
        [
            enter(State::Offline, State::TransitionToOnline, reason),
            Action::StartOnlineChecks { transition: TransitionId(2) }
        ]
    );
}

#[test]
fn missed_pings_go_offline_at_exactly_missed_pings_times_ping_interval() {
    // (ping_interval, missed_pings)
    let cases = [(secs(300), 3), (secs(2), 1), (millis(500), 5), (secs(60), 10)];
    for (ping_interval, missed_pings) in cases {
        let mut edge = Edge::online(ConnectivityParams { ping_interval, missed_pings, ..params() });
        // Online since 1s; the window runs from the transition start (0s) and restarts with each ping.
        edge.handle(secs(0), Event::Ping);
        let window = ping_interval * missed_pings;
        assert_eq!(edge.deadline_offset(), Some(window), "{ping_interval:?} x {missed_pings}");
        assert_eq!(edge.tick(window - millis(1)), vec![], "{ping_interval:?} x {missed_pings}: not before");
        assert_eq!(edge.state(), State::Online);
        assert_eq!(
            edge.tick(window),
            vec![
                enter(State::Online, State::TransitionToOffline, failure(OfflineCause::MissedPings)),
                Action::Probe
            ],
            "{ping_interval:?} x {missed_pings}"
        );
    }
}

#[test]
fn each_ping_restarts_the_missed_ping_window() {
    let mut edge = Edge::online(params());
    for ping_at in [secs(299), secs(600), secs(1400)] {
        edge.handle(ping_at, Event::Ping);
        assert_eq!(edge.machine.last_ping_at(), Some(edge.at(ping_at)));
        assert_eq!(edge.deadline_offset(), Some(ping_at + secs(900)));
        assert_eq!(edge.tick(ping_at + secs(899)), vec![]);
    }
    assert_eq!(edge.tick(secs(2300)).len(), 2);
    assert_eq!(edge.state(), State::TransitionToOffline);
}

#[test]
fn a_sign_of_life_restarts_the_missed_ping_window_without_counting_as_a_ping() {
    let mut edge = Edge::online(params());
    let before = edge.machine.last_ping_at();
    for seen_at in [secs(299), secs(600), secs(1400)] {
        assert_eq!(edge.handle(seen_at, Event::SignOfLife), vec![]);
        assert_eq!(edge.machine.last_ping_at(), before, "a sign of life is not a ping");
        assert_eq!(edge.deadline_offset(), Some(seen_at + secs(900)));
        assert_eq!(edge.tick(seen_at + secs(899)), vec![]);
        assert_eq!(edge.state(), State::Online);
    }
    assert_eq!(edge.tick(secs(2300)).len(), 2);
    assert_eq!(edge.state(), State::TransitionToOffline);
}

/// How a link can fail while online (online since 1s): each returns when it failed and the actions.
type FailWhileOnline = fn(&mut Edge) -> (Duration, Vec<Action>);

fn failures_while_online() -> Vec<(&'static str, FailWhileOnline, OfflineCause)> {
    vec![
        (
            "ping connection lost",
            |edge| {
                let event = Event::ConnectionLost { detail: "connection reset by peer".into() };
                (secs(100), edge.handle(secs(100), event))
            },
            OfflineCause::ConnectionLost,
        ),
        (
            "forward failed everywhere",
            |edge| {
                let detail =
                    "all 2 upstreams failed: http://central-a:7401: refused; http://central-b:7401: refused";
                let event =
                    Event::ForwardFailed { failure: UpstreamFailure::Unreachable, detail: detail.into() };
                (secs(100), edge.handle(secs(100), event))
            },
            OfflineCause::CentralUnreachable,
        ),
        (
            "forward rejected",
            |edge| {
                let event = Event::ForwardFailed {
                    failure: UpstreamFailure::Rejected,
                    detail: "403 edge unknown".into(),
                };
                (secs(100), edge.handle(secs(100), event))
            },
            OfflineCause::Rejected,
        ),
        (
            "forward reached only a non-trigger upstream",
            |edge| {
                let event = Event::ForwardFailed {
                    failure: UpstreamFailure::NoTriggerUpstream,
                    detail: "only http://relay:7401 (trigger = false) answered".into(),
                };
                (secs(100), edge.handle(secs(100), event))
            },
            OfflineCause::NoUpstream,
        ),
        (
            // The window (3 x 300s) runs from the transition start at 0s.
            "missed pings",
            |edge| (secs(900), edge.tick(secs(900))),
            OfflineCause::MissedPings,
        ),
    ]
}

#[test]
fn a_failure_while_online_rechecks_for_transition_to_offline_wait_then_goes_offline() {
    for (name, fail, cause) in failures_while_online() {
        let mut edge = Edge::online(params());
        let (failed_at, actions) = fail(&mut edge);
        let wait_ends = failed_at + secs(10);
        assert_eq!(
            actions,
            vec![enter(State::Online, State::TransitionToOffline, failure(cause)), Action::Probe],
            "{name}: a re-check at once"
        );
        assert_eq!(edge.machine.state_since(), edge.at(failed_at), "{name}");
        // Re-checks every TRANSITION_TO_OFFLINE_RECHECK_INTERVAL, each failing.
        let mut offset = failed_at;
        let mut rechecks = 1;
        loop {
            let next = edge.deadline_offset().expect("deadline");
            assert!(next <= wait_ends, "{name}: nothing scheduled past the wait");
            if next == wait_ends {
                break;
            }
            assert_eq!(next, offset + TRANSITION_TO_OFFLINE_RECHECK_INTERVAL, "{name}");
            offset = next;
            assert_eq!(edge.tick(offset), vec![Action::Probe], "{name}");
            edge.handle(offset, Event::ProbeFailed { detail: format!("re-check {rechecks}: refused") });
            rechecks += 1;
        }
        assert_eq!(rechecks, 5, "{name}: at 0, 2, 4, 6 and 8 seconds");
        assert_eq!(edge.tick(wait_ends - millis(1)), vec![], "{name}");
        let actions = edge.tick(wait_ends);
        assert_eq!(actions[0], enter(State::TransitionToOffline, State::Offline, failure(cause)), "{name}");
        let entry = offline_log_entries(&actions)[0].clone();
        assert_eq!(entry.cause, cause, "{name}");
        assert_eq!(entry.at_unix_ms, edge.at(wait_ends).unix_ms, "{name}");
        assert!(
            entry.detail.ends_with("; re-checks failed: re-check 4: refused"),
            "{name}: {}",
            entry.detail
        );
        assert_eq!(edge.state(), State::Offline, "{name}");
        // Going offline from online is not a failed transition: no wait.
        assert_eq!(
            edge.machine.automatic_transition_blocked_until(edge.at(wait_ends).instant),
            None,
            "{name}"
        );
    }
}

#[test]
fn the_missed_ping_failure_detail_names_the_endpoint_and_the_window() {
    let mut edge = Edge::online(params());
    edge.tick(secs(900));
    let actions = edge.tick(secs(910));
    let detail = &offline_log_entries(&actions)[0].detail;
    assert_eq!(detail, "no ping from http://central-a:7401 for 900s (missed_pings 3 x ping_interval 300s)");
}

#[test]
fn a_successful_recheck_returns_online_without_a_log_entry() {
    for (name, fail, _) in failures_while_online() {
        let mut edge = Edge::online(params());
        let (failed_at, _) = fail(&mut edge);
        assert_eq!(edge.state(), State::TransitionToOffline, "{name}");
        assert_eq!(edge.tick(failed_at + secs(2)), vec![Action::Probe], "{name}");
        let recheck_answered_at = failed_at + secs(3);
        let actions = edge
            .handle(recheck_answered_at, Event::ProbeSucceeded { endpoint: "http://central-b:7401".into() });
        assert_eq!(
            actions,
            vec![enter(State::TransitionToOffline, State::Online, StateChangeReason::RecheckSucceeded)],
            "{name}"
        );
        assert_eq!(edge.machine.connected_endpoint(), Some("http://central-b:7401"), "{name}");
        assert!(edge.machine.offline_log().is_empty(), "{name}");
        // A fresh missed-ping window from the return.
        assert_eq!(edge.deadline_offset(), Some(recheck_answered_at + secs(900)), "{name}");
    }
}

#[test]
fn a_zero_transition_to_offline_wait_goes_offline_at_once() {
    for (name, fail, cause) in failures_while_online() {
        let mut edge = Edge::online(ConnectivityParams { transition_to_offline_wait: secs(0), ..params() });
        let (_, actions) = fail(&mut edge);
        assert_eq!(actions.len(), 2, "{name}: {actions:?}");
        assert_eq!(actions[0], enter(State::Online, State::Offline, failure(cause)), "{name}");
        assert_eq!(offline_log_entries(&actions)[0].cause, cause, "{name}");
        assert_eq!(edge.state(), State::Offline, "{name}");
    }
}

#[test]
fn maintenance_takes_an_edge_offline_at_once_and_keeps_it_there() {
    // From online and from transition_to_offline: straight to offline, no re-checks.
    for recheck_first in [false, true] {
        let mut edge = Edge::online(params());
        let from = if recheck_first {
            edge.handle(secs(50), Event::ConnectionLost { detail: "reset".into() });
            State::TransitionToOffline
        } else {
            State::Online
        };
        let actions = edge.handle(secs(51), Event::Maintenance { endpoint: CENTRAL.into() });
        assert_eq!(actions[0], enter(from, State::Offline, failure(OfflineCause::Maintenance)));
        let entry = offline_log_entries(&actions)[0];
        assert_eq!(entry.cause, OfflineCause::Maintenance);
        assert_eq!(entry.detail, "central http://central-a:7401 is in maintenance");

        // While maintenance lasts, probes report it and nothing starts.
        assert_eq!(edge.tick(secs(111)), vec![Action::Probe]);
        assert_eq!(edge.handle(secs(111), Event::Maintenance { endpoint: CENTRAL.into() }), vec![]);
        assert_eq!(edge.state(), State::Offline);
        assert_eq!(edge.machine.offline_log().len(), 1, "no entry while already offline");
        // Not a failed transition: the first answer after maintenance starts one.
        edge.tick(secs(171));
        let actions = edge.handle(secs(171), Event::ProbeSucceeded { endpoint: CENTRAL.into() });
        assert_eq!(
            actions[0],
            enter(State::Offline, State::TransitionToOnline, StateChangeReason::UpstreamAnswered)
        );
    }
}

#[test]
fn offline_probes_every_offline_probe_interval() {
    // (offline_probe_interval)
    for interval in [secs(60), secs(5), millis(250)] {
        let mut edge = Edge::online(ConnectivityParams {
            offline_probe_interval: interval,
            transition_to_offline_wait: secs(0),
            ..params()
        });
        edge.handle(secs(10), Event::ConnectionLost { detail: "reset".into() });
        let mut due = secs(10) + interval;
        for round in 0..5 {
            assert_eq!(edge.deadline_offset(), Some(due), "{interval:?} round {round}");
            assert_eq!(edge.tick(due - millis(1).min(interval / 2)), vec![], "{interval:?} round {round}");
            assert_eq!(edge.tick(due), vec![Action::Probe], "{interval:?} round {round}");
            assert_eq!(edge.handle(due, Event::ProbeFailed { detail: "refused".into() }), vec![]);
            due += interval;
        }
        // A late tick probes once and schedules from then, with no burst of catch-up probes.
        let late = due + interval * 3;
        assert_eq!(edge.tick(late), vec![Action::Probe], "{interval:?}");
        assert_eq!(edge.deadline_offset(), Some(late + interval), "{interval:?}");
        // An answer starts a transition.
        let actions = edge.handle(late, Event::ProbeSucceeded { endpoint: CENTRAL.into() });
        assert_eq!(
            actions[0],
            enter(State::Offline, State::TransitionToOnline, StateChangeReason::UpstreamAnswered)
        );
    }
}

#[test]
fn offline_probe_jitter_is_bounded_and_deterministic() {
    let probe_times = |seed| {
        let mut edge = Edge::with_jitter(params(), Jitter::new(seed, 10));
        let mut last = Duration::ZERO;
        let mut gaps = Vec::new();
        for _ in 0..50 {
            let due = edge.deadline_offset().expect("offline has a deadline");
            let gap = due - last;
            assert!((secs(60)..=secs(66)).contains(&gap), "gap {gap:?} outside [60s, 66s]");
            assert_eq!(edge.tick(due), vec![Action::Probe]);
            gaps.push(gap);
            last = due;
        }
        gaps
    };
    assert_eq!(probe_times(7), probe_times(7));
    assert_ne!(probe_times(7), probe_times(8));
}

#[test]
fn block_during_transition_blocks_writes_only_while_transitioning() {
    // (block_during_transition, state to reach, writes blocked, retry-after)
    let cases = [
        (true, State::Offline, false, None),
        (true, State::TransitionToOnline, true, Some(secs(5))),
        (true, State::Online, false, None),
        // Entered at 100s with a 10s wait, asked at 102.5s: 7.5s left, rounded up.
        (true, State::TransitionToOffline, true, Some(secs(8))),
        (false, State::Offline, false, None),
        (false, State::TransitionToOnline, false, None),
        (false, State::Online, false, None),
        (false, State::TransitionToOffline, false, None),
    ];
    for (block_during_transition, state, blocked, retry_after) in cases {
        let params = ConnectivityParams { block_during_transition, ..params() };
        let mut edge = Edge::new(params.clone());
        match state {
            State::Offline => {}
            State::TransitionToOnline => {
                edge.handle(secs(0), Event::Started);
            }
            State::Online => edge = Edge::online(params),
            State::TransitionToOffline => {
                edge = Edge::online(params);
                edge.handle(secs(100), Event::ConnectionLost { detail: "reset".into() });
            }
        }
        assert_eq!(edge.state(), state);
        let label = format!("block_during_transition={block_during_transition} in {state}");
        assert_eq!(edge.machine.writes_blocked(), blocked, "{label}");
        assert_eq!(edge.machine.retry_after(edge.at(millis(102_500)).instant), retry_after, "{label}");
    }
}

#[test]
fn retry_after_is_at_least_one_second() {
    let mut edge = Edge::online(ConnectivityParams { block_during_transition: true, ..params() });
    edge.handle(secs(100), Event::ConnectionLost { detail: "reset".into() });
    assert_eq!(edge.machine.retry_after(edge.at(millis(109_999)).instant), Some(secs(1)));
    assert_eq!(edge.machine.retry_after(edge.at(secs(200)).instant), Some(secs(1)));
}

#[test]
fn the_offline_log_keeps_the_newest_100_entries() {
    let mut edge = Edge::new(params());
    edge.handle(secs(0), Event::Started);
    for attempt in 0..150u64 {
        let transition = edge.machine.current_transition().expect("transitioning");
        let detail = format!("attempt #{attempt}");
        let event = Event::HandshakeFailed { transition, failure: UpstreamFailure::Rejected, detail };
        edge.handle(secs(attempt * 10 + 1), event);
        edge.handle(secs(attempt * 10 + 2), Event::ManualTrigger { source: TriggerSource::AdminApi });
    }
    let log = edge.machine.offline_log();
    assert_eq!(log.len(), OFFLINE_LOG_CAPACITY_ENTRIES);
    assert_eq!(log.front().map(|e| e.detail.as_str()), Some("transition to online failed: attempt #50"));
    assert_eq!(log.back().map(|e| e.detail.as_str()), Some("transition to online failed: attempt #149"));
    assert!(log.iter().zip(log.iter().skip(1)).all(|(older, newer)| older.at_unix_ms < newer.at_unix_ms));
}

#[test]
fn a_restored_offline_log_keeps_the_newest_100_and_grows_from_there() {
    let mut edge = Edge::online(ConnectivityParams { transition_to_offline_wait: secs(0), ..params() });
    let persisted = (0..130).map(|index| OfflineLogEntry {
        at_unix_ms: index,
        cause: OfflineCause::CentralUnreachable,
        detail: format!("old #{index}"),
    });
    edge.machine.restore_offline_log(persisted);
    assert_eq!(edge.machine.offline_log().len(), 100);
    assert_eq!(edge.machine.offline_log().front().map(|e| e.at_unix_ms), Some(30));
    edge.handle(secs(5), Event::ConnectionLost { detail: "reset".into() });
    let log = edge.machine.offline_log();
    assert_eq!(log.len(), 100);
    assert_eq!(log.front().map(|e| e.at_unix_ms), Some(31));
    assert_eq!(log.back().map(|e| e.cause), Some(OfflineCause::ConnectionLost));
}

#[test]
fn results_of_an_abandoned_transition_are_ignored() {
    let mut edge = Edge::new(params());
    edge.handle(secs(0), Event::Started);
    let old = TransitionId(1);
    edge.handle(secs(1), Event::ConnectionLost { detail: "reset".into() });
    edge.handle(secs(2), Event::ManualTrigger { source: TriggerSource::AdminApi });
    let current = edge.machine.current_transition().expect("transitioning");
    assert_eq!(current, TransitionId(2));

    let stale = [
        handshake_ok(old),
        drain_target(old, &[]),
        Event::HandshakeFailed { transition: old, failure: UpstreamFailure::Rejected, detail: "late".into() },
    ];
    for event in stale {
        assert_eq!(edge.handle(secs(3), event.clone()), vec![], "{event:?}");
        assert_eq!(edge.state(), State::TransitionToOnline);
    }
    edge.handle(secs(4), handshake_ok(current));
    edge.handle(secs(4), drain_target(current, &[]));
    assert_eq!(edge.state(), State::Online);
}

#[test]
fn events_that_do_not_fit_the_state_change_nothing() {
    // (state to reach, events that must be ignored there)
    let online_noise = vec![
        Event::Started,
        Event::ManualTrigger { source: TriggerSource::Central },
        Event::ProbeSucceeded { endpoint: CENTRAL.into() },
        Event::ProbeFailed { detail: "late".into() },
        handshake_ok(TransitionId(1)),
        Event::HandshakeFailed {
            transition: TransitionId(1),
            failure: UpstreamFailure::Rejected,
            detail: "x".into(),
        },
        Event::Forwarded { queue: "orders".into(), forwarded_through_seq: 9 },
        Event::Ping,
    ];
    let mut edge = Edge::online(params());
    for event in online_noise {
        assert_eq!(edge.handle(secs(5), event.clone()), vec![], "online: {event:?}");
        assert_eq!(edge.state(), State::Online);
    }

    let offline_noise = vec![
        Event::ProbeFailed { detail: "refused".into() },
        Event::ConnectionLost { detail: "reset".into() },
        Event::ForwardFailed { failure: UpstreamFailure::Unreachable, detail: "late".into() },
        Event::Maintenance { endpoint: CENTRAL.into() },
        handshake_ok(TransitionId(1)),
        Event::Ping,
    ];
    let mut edge = Edge::new(params());
    for event in offline_noise {
        assert_eq!(edge.handle(secs(5), event.clone()), vec![], "offline: {event:?}");
        assert_eq!(edge.state(), State::Offline);
    }

    // Started counts only once: after a failed transition it cannot dodge the wait.
    let mut edge = Edge::new(params());
    edge.handle(secs(0), Event::Started);
    edge.handle(secs(1), Event::Maintenance { endpoint: CENTRAL.into() });
    assert_eq!(edge.handle(secs(2), Event::Started), vec![]);
    assert_eq!(edge.state(), State::Offline);
}

#[test]
fn next_deadline_in_each_state() {
    let mut edge = Edge::new(params());
    assert_eq!(edge.deadline_offset(), Some(secs(60)), "offline: the next probe");
    edge.handle(secs(0), Event::Started);
    assert_eq!(edge.deadline_offset(), Some(secs(900)), "transition_to_online: the missed-ping window");
    edge.handle(secs(1), handshake_ok(TransitionId(1)));
    edge.handle(secs(1), drain_target(TransitionId(1), &[]));
    assert_eq!(edge.deadline_offset(), Some(secs(900)), "online: the missed-ping window");
    edge.handle(secs(100), Event::ConnectionLost { detail: "reset".into() });
    assert_eq!(edge.deadline_offset(), Some(secs(102)), "transition_to_offline: the next re-check");
    let mut edge = Edge::online(ConnectivityParams { transition_to_offline_wait: secs(1), ..params() });
    edge.handle(secs(100), Event::ConnectionLost { detail: "reset".into() });
    assert_eq!(edge.deadline_offset(), Some(secs(101)), "transition_to_offline: the end of a short wait");
    edge.tick(secs(101));
    assert_eq!(edge.deadline_offset(), Some(secs(161)), "offline again: the next probe");
}

#[test]
fn failed_transition_wait_shorter_than_the_probe_interval_probes_when_it_ends() {
    let mut edge = Edge::new(ConnectivityParams { failed_transition_wait: secs(30), ..params() });
    edge.handle(secs(0), Event::Started);
    edge.handle(secs(1), Event::Maintenance { endpoint: CENTRAL.into() });
    assert_eq!(edge.deadline_offset(), Some(secs(31)));
    assert_eq!(edge.tick(secs(31)), vec![Action::Probe]);
    assert_eq!(edge.deadline_offset(), Some(secs(91)));
}

#[test]
fn names_on_the_wire() {
    let states: Vec<String> =
        State::ALL.iter().map(|state| serde_json::to_string(state).expect("serializes")).collect();
    assert_eq!(
        states,
        ["\"offline\"", "\"transition_to_online\"", "\"online\"", "\"transition_to_offline\""]
    );
    for state in State::ALL {
        assert_eq!(serde_json::to_string(&state).expect("serializes"), format!("\"{}\"", state.as_str()));
    }
    let causes = [
        (OfflineCause::CentralUnreachable, "central_unreachable"),
        (OfflineCause::ConnectionLost, "connection_lost"),
        (OfflineCause::MissedPings, "missed_pings"),
        (OfflineCause::Maintenance, "maintenance"),
        (OfflineCause::Rejected, "rejected"),
        (OfflineCause::NoUpstream, "no_upstream"),
    ];
    for (cause, name) in causes {
        assert_eq!(cause.as_str(), name);
        assert_eq!(serde_json::to_string(&cause).expect("serializes"), format!("\"{name}\""));
    }
    let entry =
        OfflineLogEntry { at_unix_ms: 42, cause: OfflineCause::MissedPings, detail: "no ping".into() };
    let json = serde_json::to_string(&entry).expect("serializes");
    assert_eq!(json, r#"{"at_unix_ms":42,"cause":"missed_pings","detail":"no ping"}"#);
    assert_eq!(serde_json::from_str::<OfflineLogEntry>(&json).expect("parses"), entry);
}

#[test]
fn invalid_params_are_refused_naming_the_key() {
    let century = secs(200 * 365 * 24 * 3600);
    let cases = [
        (ConnectivityParams { ping_interval: secs(0), ..params() }, "connectivity.ping_interval"),
        (ConnectivityParams { missed_pings: 0, ..params() }, "connectivity.missed_pings"),
        (
            ConnectivityParams { offline_probe_interval: secs(0), ..params() },
            "connectivity.offline_probe_interval",
        ),
        (
            ConnectivityParams { failed_transition_wait: century, ..params() },
            "connectivity.failed_transition_wait",
        ),
        (ConnectivityParams { missed_pings: u32::MAX, ..params() }, "connectivity.missed_pings"),
    ];
    for (params, key) in cases {
        let error = params.validate().expect_err(key);
        assert!(error.to_string().starts_with(key), "{error}");
        assert!(matches!(error, InvalidParams::Zero { .. } | InvalidParams::TooLong { .. }));
    }
    // Zero waits are valid: go offline at once, retry at once.
    let zero_waits = ConnectivityParams {
        transition_to_offline_wait: secs(0),
        failed_transition_wait: secs(0),
        ..params()
    };
    assert_eq!(zero_waits.validate(), Ok(()));
}

/// Issue 10: an offline-log detail repeated the endpoint's error (and URL) when the re-checks
/// failed exactly as the failure that started `transition_to_offline`.
#[test]
fn re_checks_failing_the_same_way_are_not_repeated_in_the_detail() {
    let mut edge = Edge::online(params());
    let error = "all 1 upstreams failed: http://central-a:7401: connection refused".to_string();
    edge.handle(
        secs(5),
        Event::ForwardFailed { failure: UpstreamFailure::Unreachable, detail: error.clone() },
    );
    edge.tick(secs(7));
    edge.handle(secs(7), Event::ProbeFailed { detail: error.clone() });
    let actions = edge.tick(secs(15));
    let detail = &offline_log_entries(&actions)[0].detail;
    assert_eq!(*detail, format!("{error}; re-checks failed the same way"));
    assert_eq!(detail.matches("http://central-a:7401").count(), 1, "{detail}");
}
