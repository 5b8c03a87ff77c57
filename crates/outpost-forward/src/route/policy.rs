//! The failure policy of a route, pure: what a delivery error means (the route's `service_down`
//! and `poison` classes) and when to try a message again (`retry_initial` doubling to `retry_max`,
//! `max_attempts`). No I/O, no clock: the caller passes the attempt count and a seeded [`Jitter`],
//! and gets back a [`Verdict`].
//!
//! Precedence when a class is listed both as `service_down` and as `poison`: `service_down` wins,
//! since storing keeps every message while failing one is an operator's chore.

use std::fmt;
use std::time::Duration;

pub use outpost_core::config::ErrorClass;
use outpost_core::config::RouteConfig;
use outpost_link::Jitter;

/// What went wrong with one delivery attempt to one endpoint, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No connection: refused, unreachable, name not resolved, TLS handshake failed.
    Connect,
    /// No complete answer within the route's `timeout`.
    Timeout,
    /// The connection broke after it was made (reset, closed before the answer was complete).
    Reset,
    /// An answer with a status other than 2xx.
    Status(u16),
    /// Anything else (a request that could not be built or sent); never matches a class.
    Other,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Connect => f.write_str("connect"),
            FailureKind::Timeout => f.write_str("timeout"),
            FailureKind::Reset => f.write_str("reset"),
            FailureKind::Status(status) => write!(f, "http:{status}"),
            FailureKind::Other => f.write_str("other"),
        }
    }
}

impl FailureKind {
    /// Whether this failure is one of the errors `class` names.
    pub fn is_in(self, class: ErrorClass) -> bool {
        match (class, self) {
            (ErrorClass::Connect, FailureKind::Connect)
            | (ErrorClass::Timeout, FailureKind::Timeout)
            | (ErrorClass::Reset, FailureKind::Reset) => true,
            (ErrorClass::Http(class), FailureKind::Status(status)) => class == status,
            _ => false,
        }
    }
}

/// Which way a failure points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The service is down: the route goes to `store` mode; the message stays first in line.
    ServiceDown,
    /// The message is at fault: it fails at once.
    Poison,
    /// Neither: try the message again, up to `max_attempts`.
    Transient,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Switch the route to `store` mode; the message is not charged an attempt.
    StoreRoute,
    /// Fail the message at once (`poison`).
    FailPoison,
    /// Try the same message again after `delay`.
    RetryAfter(Duration),
    /// `max_attempts` reached: fail the message.
    FailExhausted,
}

impl Verdict {
    /// The `reason` recorded with a failed message, e.g. `poison: http:400`.
    pub fn failure_reason(self, kind: FailureKind) -> Option<String> {
        match self {
            Verdict::FailPoison => Some(format!("poison: {kind}")),
            Verdict::FailExhausted => Some(format!("max_attempts: {kind}")),
            Verdict::StoreRoute | Verdict::RetryAfter(_) => None,
        }
    }
}

/// A route's failure policy, from its validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    pub service_down: Vec<ErrorClass>,
    pub poison: Vec<ErrorClass>,
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl RoutePolicy {
    /// The policy of a validated route (classes parsed, `max_attempts` at least 1, `retry_max` at
    /// least `retry_initial`).
    pub fn from_config(route: &RouteConfig) -> RoutePolicy {
        RoutePolicy {
            service_down: route.service_down.clone(),
            poison: route.poison.clone(),
            max_attempts: route.max_attempts.get(),
            retry_initial: route.retry_initial,
            retry_max: route.retry_max,
        }
    }

    pub fn classify(&self, kind: FailureKind) -> Class {
        if self.service_down.iter().any(|&c| kind.is_in(c)) {
            Class::ServiceDown
        } else if self.poison.iter().any(|&c| kind.is_in(c)) {
            Class::Poison
        } else {
            Class::Transient
        }
    }

    /// The verdict on a failed attempt; `attempts` counts this message's attempts so far,
    /// including the one that just failed (service-down failures are not counted).
    pub fn decide(&self, kind: FailureKind, attempts: u32, jitter: &mut Jitter) -> Verdict {
        match self.classify(kind) {
            Class::ServiceDown => Verdict::StoreRoute,
            Class::Poison => Verdict::FailPoison,
            Class::Transient if attempts >= self.max_attempts => Verdict::FailExhausted,
            Class::Transient => Verdict::RetryAfter(self.retry_delay(attempts, jitter)),
        }
    }

    /// The pause before retry number `retry` (1: the first retry): `retry_initial * 2^(retry-1)`
    /// stretched by the jitter, never more than `retry_max`.
    pub fn retry_delay(&self, retry: u32, jitter: &mut Jitter) -> Duration {
        let doublings = retry.saturating_sub(1).min(32);
        let base = self.retry_initial.saturating_mul(1u32 << doublings.min(31)).min(self.retry_max);
        jitter.stretch(base).min(self.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn policy() -> RoutePolicy {
        RoutePolicy {
            service_down: ["connect", "timeout", "http:502", "http:503", "http:504"]
                .iter()
                .map(|c| c.parse().unwrap())
                .collect(),
            poison: ["http:400", "http:413", "http:422"].iter().map(|c| c.parse().unwrap()).collect(),
            max_attempts: 3,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(5),
        }
    }

    #[test]
    fn verdicts_by_kind_and_attempts() {
        use FailureKind::*;
        let cases = [
            // kind, attempts so far, verdict
            (Connect, 1, Verdict::StoreRoute),
            (Timeout, 7, Verdict::StoreRoute),
            (Status(503), 1, Verdict::StoreRoute),
            (Status(400), 1, Verdict::FailPoison),
            (Status(422), 2, Verdict::FailPoison),
            (Status(500), 1, Verdict::RetryAfter(Duration::from_secs(1))),
            (Status(500), 2, Verdict::RetryAfter(Duration::from_secs(2))),
            (Status(500), 3, Verdict::FailExhausted),
            (Reset, 2, Verdict::RetryAfter(Duration::from_secs(2))),
            (Reset, 4, Verdict::FailExhausted),
            (Status(404), 1, Verdict::RetryAfter(Duration::from_secs(1))),
            (Status(301), 1, Verdict::RetryAfter(Duration::from_secs(1))),
            (Other, 3, Verdict::FailExhausted),
        ];
        for (kind, attempts, want) in cases {
            assert_eq!(policy().decide(kind, attempts, &mut Jitter::none()), want, "{kind} after {attempts}");
        }
    }

    #[test]
    fn service_down_wins_over_poison() {
        let mut p = policy();
        p.poison.push(ErrorClass::Http(503));
        assert_eq!(p.classify(FailureKind::Status(503)), Class::ServiceDown);
    }

    #[test]
    fn reasons_name_the_decision_and_the_class() {
        assert_eq!(Verdict::FailPoison.failure_reason(FailureKind::Status(400)).unwrap(), "poison: http:400");
        assert_eq!(
            Verdict::FailExhausted.failure_reason(FailureKind::Timeout).unwrap(),
            "max_attempts: timeout"
        );
        assert_eq!(Verdict::StoreRoute.failure_reason(FailureKind::Connect), None);
    }

    #[test]
    fn delays_double_up_to_retry_max() {
        let p = policy();
        let delays: Vec<u64> = (1..=6).map(|r| p.retry_delay(r, &mut Jitter::none()).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5, 5]);
        // Far beyond any doubling that fits: still retry_max, no overflow.
        assert_eq!(p.retry_delay(u32::MAX, &mut Jitter::none()), Duration::from_secs(5));
    }

    #[test]
    fn jitter_only_stretches_and_never_passes_retry_max() {
        let p = policy();
        let mut jitter = Jitter::new(7, 50);
        for retry in 1..=10 {
            let plain = p.retry_delay(retry, &mut Jitter::none());
            let stretched = p.retry_delay(retry, &mut jitter);
            assert!(stretched >= plain && stretched <= p.retry_max, "retry {retry}: {stretched:?}");
        }
    }

    #[test]
    fn from_config_reads_the_defaults() {
        let route = RouteConfig {
            name: "r".into(),
            queue: "q".into(),
            urls: vec!["http://127.0.0.1:1/".into()],
            timeout: Duration::from_secs(10),
            max_attempts: NonZeroU32::new(3).unwrap(),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(5),
            service_down: ErrorClass::DEFAULT_SERVICE_DOWN.to_vec(),
            poison: ErrorClass::DEFAULT_POISON.to_vec(),
            auto_forward: false,
            probe_interval: Duration::from_secs(30),
            max_in_flight: NonZeroU32::MIN,
            batch: NonZeroU32::MIN,
            tls: Default::default(),
        };
        assert_eq!(RoutePolicy::from_config(&route), policy());
    }
}
