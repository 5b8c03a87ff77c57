//! Endpoint choice for an ordered upstream list: primary retries, alternates once each, failback.
//!
//! The list is ordered; index 0 is the primary. While things work, every request goes to the
//! endpoint in use. A failure there starts a *round* (CONTRACT section 5, `[failover]`):
//!
//! - the primary is tried `1 + primary_retries` times in all, `primary_retry_delay` apart
//!   (plus jitter); when the round began with a failure of the primary, that failure is the first try;
//! - then each alternate is tried once, in order, at once; an alternate whose failure began the
//!   round is not tried again;
//! - if none answers, the round ends in [`FailureOutcome::AllFailed`] carrying every endpoint's
//!   last error (the offline cause), and the next attempt starts over at the primary.
//!
//! A success anywhere ends the round and makes that endpoint the one in use. While the one in use
//! is an alternate, [`Failover::poll_failback`] hands out a try of the primary once per
//! `failback_interval` (plus jitter); its success switches back, its failure changes nothing.
//!
//! Only `trigger = true` upstreams decide the edge's online state; each [`Endpoint`] carries that
//! flag and [`Failover::current_counts_for_online`] says whether the endpoint in use counts.

use std::fmt;
use std::time::{Duration, Instant};

use crate::jitter::Jitter;
use crate::{check_duration, InvalidParams};

/// One upstream, as configured in `[[upstream]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    /// Whether this upstream's reachability decides the edge's online state.
    pub trigger: bool,
}

/// The `[failover]` settings that shape retry timing (`connect_timeout` is the driver's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverParams {
    /// Extra tries of the primary, after the failure that began a round, before the alternates.
    pub primary_retries: u32,
    /// Time between two tries of the primary within a round (may be zero).
    pub primary_retry_delay: Duration,
    /// While an alternate is in use, how often the primary is tried again (must not be zero).
    pub failback_interval: Duration,
}

impl Default for FailoverParams {
    /// The contract's defaults.
    fn default() -> Self {
        FailoverParams {
            primary_retries: 0,
            primary_retry_delay: Duration::from_secs(5),
            failback_interval: Duration::from_secs(60),
        }
    }
}

impl FailoverParams {
    /// Checks what the state machine relies on: a non-zero failback interval, no duration over
    /// [`crate::PARAMETER_DURATION_LIMIT`].
    pub fn validate(&self) -> Result<(), InvalidParams> {
        check_duration("failover.primary_retry_delay", self.primary_retry_delay, true)?;
        check_duration("failover.failback_interval", self.failback_interval, false)?;
        Ok(())
    }
}

/// What to try next: an endpoint (index into the list) and the earliest time to try it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub endpoint_index: usize,
    /// Never earlier than the `now` passed in; equal to it means "at once".
    pub not_before: Instant,
}

/// One endpoint's last error in a round that failed everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointError {
    pub url: String,
    pub error: String,
}

/// Every endpoint was tried in this round and none answered; one entry per endpoint, in list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllEndpointsFailed {
    pub errors: Vec<EndpointError>,
}

impl fmt::Display for AllEndpointsFailed {
    /// `all 2 upstreams failed: http://a:7401: connection refused; http://b:7401: timed out`:
    /// the text that goes into the offline log's detail.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "all {} upstreams failed: ", self.errors.len())?;
        for (position, endpoint_error) in self.errors.iter().enumerate() {
            if position > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", endpoint_error.url, endpoint_error.error)?;
        }
        Ok(())
    }
}

/// The answer to a failure report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Try this next (it may be the endpoint that just failed, after `primary_retry_delay`).
    TryNext(Attempt),
    /// The round is over and every endpoint failed. The next attempt starts again at the primary.
    AllFailed(AllEndpointsFailed),
}

/// The answer to a success report, so the driver can log and count failovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuccessOutcome {
    /// The endpoint that answered was already the one in use.
    Stayed,
    /// The endpoint in use changed (a failover, or a failback when `to` is 0).
    Switched { from: usize, to: usize },
}

/// A round of tries after a failure; see the module doc for the order.
#[derive(Debug, Clone)]
struct Round {
    planned_endpoint_index: usize,
    planned_not_before: Instant,
    /// Tries of the primary still to come in this round, counting the planned one if it is the primary.
    primary_tries_left: u32,
    /// The alternate whose failure began the round: it had its one try already.
    alternate_that_began_round: Option<usize>,
    /// Last error per endpoint in this round, by index.
    errors: Vec<Option<String>>,
}

/// Endpoint choice over an ordered upstream list; see the module doc.
#[derive(Debug, Clone)]
pub struct Failover {
    endpoints: Vec<Endpoint>,
    params: FailoverParams,
    jitter: Jitter,
    /// The endpoint in use: the last one that answered (the primary before anything happened).
    in_use: usize,
    round: Option<Round>,
    /// When the next failback try of the primary is due; set only while an alternate is in use.
    failback_at: Option<Instant>,
}

impl Failover {
    /// A failover over `endpoints` (index 0 = primary), starting on the primary.
    pub fn new(
        endpoints: Vec<Endpoint>,
        params: FailoverParams,
        jitter: Jitter,
    ) -> Result<Self, InvalidParams> {
        if endpoints.is_empty() {
            return Err(InvalidParams::NoEndpoints);
        }
        params.validate()?;
        Ok(Failover { endpoints, params, jitter, in_use: 0, round: None, failback_at: None })
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn params(&self) -> &FailoverParams {
        &self.params
    }

    /// The endpoint being used: during a round the one planned next, otherwise the last that answered.
    pub fn current_endpoint_index(&self) -> usize {
        match &self.round {
            Some(round) => round.planned_endpoint_index,
            None => self.in_use,
        }
    }

    pub fn current_endpoint(&self) -> &Endpoint {
        &self.endpoints[self.current_endpoint_index()]
    }

    /// Whether the current endpoint is the primary (`upstream.is_primary` in the status).
    pub fn current_is_primary(&self) -> bool {
        self.current_endpoint_index() == 0
    }

    /// Whether the current endpoint has `trigger = true`, i.e. its results decide the online state.
    pub fn current_counts_for_online(&self) -> bool {
        self.current_endpoint().trigger
    }

    /// Whether any configured upstream has `trigger = true`; with none the edge can never be online.
    pub fn has_trigger_endpoint(&self) -> bool {
        self.endpoints.iter().any(|endpoint| endpoint.trigger)
    }

    /// Whether a round of retries is under way (the last report was a failure).
    pub fn in_failure_round(&self) -> bool {
        self.round.is_some()
    }

    /// What to try next and when.
    pub fn next_attempt(&self, now: Instant) -> Attempt {
        match &self.round {
            Some(round) => Attempt {
                endpoint_index: round.planned_endpoint_index,
                not_before: round.planned_not_before.max(now),
            },
            None => Attempt { endpoint_index: self.in_use, not_before: now },
        }
    }

    /// `endpoint_index` answered: it becomes the endpoint in use and any round ends.
    pub fn report_success(&mut self, endpoint_index: usize, now: Instant) -> SuccessOutcome {
        self.assert_index(endpoint_index);
        let previous = self.in_use;
        self.round = None;
        self.in_use = endpoint_index;
        if endpoint_index == 0 {
            self.failback_at = None;
        } else if previous != endpoint_index || self.failback_at.is_none() {
            self.failback_at = Some(now + self.jitter.stretch(self.params.failback_interval));
        }
        if previous == endpoint_index {
            SuccessOutcome::Stayed
        } else {
            SuccessOutcome::Switched { from: previous, to: endpoint_index }
        }
    }

    /// `endpoint_index` failed with `error` (text naming what went wrong: connect refused, timeout,
    /// HTTP status). Returns what to try next, or that every endpoint failed.
    ///
    /// A failure of an endpoint that is neither in use nor planned (a failback try of the primary,
    /// a late report) is recorded for the round if there is one but changes no plan.
    pub fn report_failure(&mut self, endpoint_index: usize, now: Instant, error: String) -> FailureOutcome {
        self.assert_index(endpoint_index);
        let Some(round) = self.round.as_mut() else {
            if endpoint_index != self.in_use {
                // A failback try of the primary failed: stay on the alternate; poll_failback
                // already scheduled the next try.
                return FailureOutcome::TryNext(Attempt { endpoint_index: self.in_use, not_before: now });
            }
            return self.begin_round(endpoint_index, now, error);
        };
        round.errors[endpoint_index] = Some(error);
        if endpoint_index != round.planned_endpoint_index {
            return FailureOutcome::TryNext(self.next_attempt(now));
        }
        self.advance_round(now)
    }

    /// While an alternate is in use and `failback_interval` has passed, returns a try of the
    /// primary and schedules the next one a `failback_interval` later (so a lost result does not
    /// stop failback). Report its result with `report_success` / `report_failure` as usual.
    pub fn poll_failback(&mut self, now: Instant) -> Option<Attempt> {
        if self.round.is_some() || self.in_use == 0 {
            return None;
        }
        let due_at = self.failback_at?;
        if now < due_at {
            return None;
        }
        self.failback_at = Some(now + self.jitter.stretch(self.params.failback_interval));
        Some(Attempt { endpoint_index: 0, not_before: now })
    }

    /// When [`Failover::poll_failback`] will next return a try, for the driver's timer.
    pub fn next_failback_at(&self) -> Option<Instant> {
        if self.round.is_some() || self.in_use == 0 {
            return None;
        }
        self.failback_at
    }

    fn begin_round(&mut self, failed_endpoint_index: usize, now: Instant, error: String) -> FailureOutcome {
        let mut errors = vec![None; self.endpoints.len()];
        errors[failed_endpoint_index] = Some(error);
        self.round = Some(Round {
            planned_endpoint_index: 0,
            planned_not_before: now,
            primary_tries_left: self.params.primary_retries.saturating_add(1),
            alternate_that_began_round: (failed_endpoint_index != 0).then_some(failed_endpoint_index),
            errors,
        });
        self.failback_at = None;
        if failed_endpoint_index == 0 {
            // Treat the reported failure as the planned first try of the primary.
            self.advance_round(now)
        } else {
            FailureOutcome::TryNext(self.next_attempt(now))
        }
    }

    /// The planned attempt failed: plan the next one or end the round.
    fn advance_round(&mut self, now: Instant) -> FailureOutcome {
        let round = self.round.as_mut().expect("advance_round is called only during a round");
        let first_candidate = if round.planned_endpoint_index == 0 {
            round.primary_tries_left = round.primary_tries_left.saturating_sub(1);
            if round.primary_tries_left > 0 {
                round.planned_not_before = now + self.jitter.stretch(self.params.primary_retry_delay);
                return FailureOutcome::TryNext(self.next_attempt(now));
            }
            1
        } else {
            round.planned_endpoint_index + 1
        };
        let next_alternate = (first_candidate..self.endpoints.len())
            .find(|&index| Some(index) != round.alternate_that_began_round);
        match next_alternate {
            Some(index) => {
                round.planned_endpoint_index = index;
                round.planned_not_before = now;
                FailureOutcome::TryNext(self.next_attempt(now))
            }
            None => {
                let errors = self
                    .endpoints
                    .iter()
                    .zip(&round.errors)
                    .map(|(endpoint, error)| EndpointError {
                        url: endpoint.url.clone(),
                        error: error.clone().unwrap_or_else(|| "not tried".to_string()),
                    })
                    .collect();
                self.round = None;
                self.in_use = 0;
                self.failback_at = None;
                FailureOutcome::AllFailed(AllEndpointsFailed { errors })
            }
        }
    }

    fn assert_index(&self, endpoint_index: usize) {
        assert!(
            endpoint_index < self.endpoints.len(),
            "endpoint index {endpoint_index} out of range: {} upstreams configured",
            self.endpoints.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_every_endpoint() {
        let all = AllEndpointsFailed {
            errors: vec![
                EndpointError { url: "http://a".into(), error: "refused".into() },
                EndpointError { url: "http://b".into(), error: "timeout".into() },
            ],
        };
        assert_eq!(all.to_string(), "all 2 upstreams failed: http://a: refused; http://b: timeout");
    }
}
