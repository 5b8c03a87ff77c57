//! The pure connectivity logic of an edge: the online/offline state machine and upstream failover.
//!
//! Nothing in this crate does I/O, spawns a task, sleeps or reads a clock. Each piece is a plain
//! state machine: the async driver (the edge's connectivity task) feeds it events together with
//! the current time as a [`Moment`], and gets back a list of actions to carry out (probe an
//! upstream, run the online checks, append to the offline log, record a state change). The
//! driver asks [`Connectivity::next_deadline`] when to call [`Connectivity::tick`] next, so
//! timeouts (missed pings, the transition-to-offline wait, offline probes) are decided here too.
//! [`Failover`] chooses which upstream to try and when, from success and failure reports. Because
//! time only ever comes in as an argument, tests drive both machines with a fake clock
//! (`base + Duration`) and plain values, with no sockets and no waiting.
//!
//! The edge's states (CONTRACT section 5) and what moves between them:
//!
//! ```text
//!                  Started | probe answered (outside the failed-transition wait)
//!                  | manual trigger (admin API or central; ignores the wait)
//!   boot --> +---------+ -----------------------------------> +----------------------+
//!            | offline |                                       | transition_to_online |
//!            +---------+ <----------------------------------- +----------------------+
//!              ^     ^     a check fails after an upstream answered       | every check passes:
//!              |     |     (log; no automatic transition for              | a trigger upstream
//!              |     |     failed_transition_wait), or no upstream        | answers, accepts the
//!              |     |     answered at all (log; just keep probing)       | edge, no maintenance,
//!              |     |                                                    | backlog drained
//!              |     | re-checks failed for                               |
//!              |     | transition_to_offline_wait (log)                   v
//!              |  +-----------------------+ <------ failure ------- +--------+
//!              |  | transition_to_offline |                         | online |
//!              |  +-----------------------+ -- a re-check passes -> +--------+
//!              |                                                          |
//!              +----------------------------------------------------------+
//!                maintenance (also from transition_to_offline), or a failure
//!                with transition_to_offline_wait = 0 (log)
//! ```
//!
//! A *failure* while online is a forward or handshake that failed on every endpoint, the loss of
//! the ping connection, or no ping for `missed_pings * ping_interval`.
//! Every arrow into `offline` appends `{at, cause, detail}` to the offline log (newest 100 kept).

pub mod connectivity;
pub mod failover;
pub mod jitter;

use std::time::{Duration, Instant};

pub use connectivity::{
    Action, Connectivity, ConnectivityParams, Event, OfflineCause, OfflineLogEntry, State, StateChangeReason,
    TransitionId, TriggerSource, UpstreamFailure, OFFLINE_LOG_CAPACITY_ENTRIES,
    TRANSITION_TO_OFFLINE_RECHECK_INTERVAL, TRANSITION_TO_ONLINE_RETRY_AFTER,
};
pub use failover::{
    AllEndpointsFailed, Attempt, Endpoint, EndpointError, Failover, FailoverParams, FailureOutcome,
    SuccessOutcome,
};
pub use jitter::Jitter;

/// One reading of the driver's clocks: the monotonic instant that all timing decisions use, and
/// the wall-clock time (milliseconds since the Unix epoch) that goes into the offline log and
/// the status. Both are taken by the driver at the same moment and passed in; nothing here reads
/// a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    pub instant: Instant,
    pub unix_ms: i64,
}

/// The longest duration any parameter may have. It bounds every deadline this crate computes,
/// so adding a parameter to an `Instant` can never overflow.
pub const PARAMETER_DURATION_LIMIT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parameters that cannot drive a state machine, named by their configuration key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidParams {
    #[error("{key} must be greater than zero")]
    Zero { key: &'static str },
    #[error("{key} is longer than the limit of 100 years")]
    TooLong { key: &'static str },
    #[error("no [[upstream]] is configured: an edge needs at least one")]
    NoEndpoints,
}

/// A duration as the configuration writes it: `500ms`, `60s`, `300s`, `1h`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    match duration.as_secs() {
        s if s != 0 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

fn check_duration(key: &'static str, value: Duration, may_be_zero: bool) -> Result<(), InvalidParams> {
    if value.is_zero() && !may_be_zero {
        return Err(InvalidParams::Zero { key });
    }
    if value > PARAMETER_DURATION_LIMIT {
        return Err(InvalidParams::TooLong { key });
    }
    Ok(())
}
