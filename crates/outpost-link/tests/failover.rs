//! Table-driven tests of endpoint failover and retry jitter, with a fake clock and no I/O.

use std::time::{Duration, Instant};

use outpost_link::{
    AllEndpointsFailed, Attempt, Endpoint, EndpointError, Failover, FailoverParams, FailureOutcome,
    InvalidParams, Jitter, SuccessOutcome,
};

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn url(index: usize) -> String {
    format!("http://central-{index}:7401")
}

fn endpoints(count: usize) -> Vec<Endpoint> {
    (0..count).map(|index| Endpoint { url: url(index), trigger: true }).collect()
}

fn failover(count: usize, params: FailoverParams) -> Failover {
    Failover::new(endpoints(count), params, Jitter::none()).expect("valid failover")
}

fn params(primary_retries: u32, primary_retry_delay: Duration) -> FailoverParams {
    FailoverParams { primary_retries, primary_retry_delay, failback_interval: secs(60) }
}

fn try_next(outcome: FailureOutcome) -> Attempt {
    match outcome {
        FailureOutcome::TryNext(attempt) => attempt,
        FailureOutcome::AllFailed(all) => panic!("expected another attempt, got {all}"),
    }
}

/// Fails every attempt at the moment it is allowed, starting with a failure of `first_failed`
/// at `start`. Returns each planned attempt as (endpoint, delay since the previous failure), and
/// the final all-failed outcome.
fn fail_everything(
    failover: &mut Failover,
    first_failed: usize,
    start: Instant,
) -> (Vec<(usize, Duration)>, AllEndpointsFailed) {
    let mut plan = Vec::new();
    let mut now = start;
    let mut outcome =
        failover.report_failure(first_failed, now, format!("error of {} at try 0", url(first_failed)));
    for try_number in 1..1000 {
        match outcome {
            FailureOutcome::TryNext(attempt) => {
                assert_eq!(failover.next_attempt(now), attempt, "next_attempt agrees with the outcome");
                plan.push((attempt.endpoint_index, attempt.not_before - now));
                now = attempt.not_before;
                let error = format!("error of {} at try {try_number}", url(attempt.endpoint_index));
                outcome = failover.report_failure(attempt.endpoint_index, now, error);
            }
            FailureOutcome::AllFailed(all) => return (plan, all),
        }
    }
    panic!("the round never ended");
}

#[test]
fn defaults_are_the_contracts() {
    assert_eq!(FailoverParams::default(), params(0, secs(5)));
}

#[test]
fn the_primary_gets_primary_retries_more_tries_primary_retry_delay_apart_then_each_alternate_once() {
    // (primary_retries, primary_retry_delay, upstream count)
    let cases = [
        (0, secs(5), 3),
        (1, secs(5), 3),
        (3, secs(2), 3),
        (2, secs(0), 2),
        (0, secs(5), 1),
        (4, secs(1), 1),
    ];
    for (primary_retries, delay, count) in cases {
        let label = format!("primary_retries={primary_retries} delay={delay:?} upstreams={count}");
        let mut failover = failover(count, params(primary_retries, delay));
        let start = Instant::now();
        assert_eq!(failover.next_attempt(start), Attempt { endpoint_index: 0, not_before: start }, "{label}");

        let (plan, all) = fail_everything(&mut failover, 0, start);
        let mut expected = vec![(0, delay); primary_retries as usize];
        expected.extend((1..count).map(|alternate| (alternate, Duration::ZERO)));
        assert_eq!(plan, expected, "{label}");

        // The cause names every endpoint with its last error, in list order.
        let tries_of_primary = primary_retries as usize;
        let expected_errors: Vec<EndpointError> = (0..count)
            .map(|index| {
                let try_number = if index == 0 { tries_of_primary } else { tries_of_primary + index };
                EndpointError {
                    url: url(index),
                    error: format!("error of {} at try {try_number}", url(index)),
                }
            })
            .collect();
        assert_eq!(all.errors, expected_errors, "{label}");
        // A new round starts over at the primary.
        assert!(!failover.in_failure_round(), "{label}");
        let later = start + secs(3600);
        assert_eq!(failover.next_attempt(later), Attempt { endpoint_index: 0, not_before: later }, "{label}");
    }
}

#[test]
fn the_all_failed_text_lists_every_endpoint() {
    let mut failover = failover(3, params(0, secs(5)));
    let (_, all) = fail_everything(&mut failover, 0, Instant::now());
    assert_eq!(
        all.to_string(),
        "all 3 upstreams failed: \
         http://central-0:7401: error of http://central-0:7401 at try 0; \
         http://central-1:7401: error of http://central-1:7401 at try 1; \
         http://central-2:7401: error of http://central-2:7401 at try 2"
    );
}

#[test]
fn success_on_an_alternate_switches_to_it_and_ends_the_round() {
    let mut failover = failover(3, params(1, secs(5)));
    let start = Instant::now();
    let retry = try_next(failover.report_failure(0, start, "refused".into()));
    assert_eq!(retry, Attempt { endpoint_index: 0, not_before: start + secs(5) });
    let alternate = try_next(failover.report_failure(0, start + secs(5), "refused".into()));
    assert_eq!(alternate, Attempt { endpoint_index: 1, not_before: start + secs(5) });
    assert_eq!(failover.current_endpoint_index(), 1);
    assert!(!failover.current_is_primary());

    assert_eq!(failover.report_success(1, start + secs(6)), SuccessOutcome::Switched { from: 0, to: 1 });
    assert!(!failover.in_failure_round());
    assert_eq!(failover.report_success(1, start + secs(7)), SuccessOutcome::Stayed);
    let now = start + secs(8);
    assert_eq!(failover.next_attempt(now), Attempt { endpoint_index: 1, not_before: now });
}

#[test]
fn when_an_alternate_in_use_fails_the_round_goes_primary_first_and_skips_that_alternate() {
    // (primary_retries, upstream count, alternate in use)
    let cases = [(0, 3, 1), (1, 3, 1), (0, 4, 2), (2, 4, 3), (0, 2, 1)];
    for (primary_retries, count, in_use) in cases {
        let label = format!("primary_retries={primary_retries} upstreams={count} in use={in_use}");
        let mut failover = failover(count, params(primary_retries, secs(5)));
        let start = Instant::now();
        failover.report_success(in_use, start);

        let (plan, all) = fail_everything(&mut failover, in_use, start + secs(1));
        // The primary at once, then its retries, then the other alternates in order.
        let mut expected = vec![(0, Duration::ZERO)];
        expected.extend(vec![(0, secs(5)); primary_retries as usize]);
        expected.extend((1..count).filter(|&index| index != in_use).map(|index| (index, Duration::ZERO)));
        assert_eq!(plan, expected, "{label}");
        assert_eq!(all.errors.len(), count, "{label}");
        assert!(all.errors.iter().all(|e| e.error.starts_with(&format!("error of {}", e.url))), "{label}");
    }
}

#[test]
fn a_success_resets_the_round() {
    let mut failover = failover(2, params(2, secs(5)));
    let start = Instant::now();
    try_next(failover.report_failure(0, start, "refused".into()));
    assert_eq!(failover.report_success(0, start + secs(5)), SuccessOutcome::Stayed);
    assert!(!failover.in_failure_round());
    // A later failure gets the full count of retries again, not what was left.
    let (plan, _) = fail_everything(&mut failover, 0, start + secs(100));
    assert_eq!(plan, vec![(0, secs(5)), (0, secs(5)), (1, Duration::ZERO)]);
}

#[test]
fn while_on_an_alternate_the_primary_is_retried_every_failback_interval() {
    // (failback_interval)
    for failback_interval in [secs(60), secs(1), secs(3600)] {
        let params = FailoverParams { failback_interval, ..params(0, secs(5)) };
        let mut failover = failover(2, params);
        let start = Instant::now();
        assert_eq!(failover.poll_failback(start + secs(10_000)), None, "on the primary: no failback");

        try_next(failover.report_failure(0, start, "refused".into()));
        assert_eq!(failover.next_failback_at(), None, "during a round: no failback");
        failover.report_success(1, start);
        let mut due = start + failback_interval;
        for round in 0..3 {
            assert_eq!(failover.next_failback_at(), Some(due), "{failback_interval:?} round {round}");
            assert_eq!(failover.poll_failback(due - Duration::from_millis(1)), None);
            // Repeated successes on the alternate do not push failback out.
            failover.report_success(1, due - Duration::from_millis(1));
            assert_eq!(failover.poll_failback(due), Some(Attempt { endpoint_index: 0, not_before: due }));
            assert_eq!(failover.poll_failback(due), None, "once per interval, even before the result");
            // The primary still fails: stay on the alternate.
            let stay = try_next(failover.report_failure(0, due, "still refused".into()));
            assert_eq!(stay, Attempt { endpoint_index: 1, not_before: due });
            assert!(!failover.in_failure_round());
            due += failback_interval;
        }
        assert_eq!(failover.poll_failback(due), Some(Attempt { endpoint_index: 0, not_before: due }));
        assert_eq!(failover.report_success(0, due), SuccessOutcome::Switched { from: 1, to: 0 });
        assert_eq!(failover.next_failback_at(), None);
        assert_eq!(failover.poll_failback(due + failback_interval * 10), None);
    }
}

#[test]
fn a_late_failure_report_of_another_endpoint_does_not_change_the_plan() {
    let mut failover = failover(3, params(0, secs(5)));
    let start = Instant::now();
    let planned = try_next(failover.report_failure(0, start, "refused".into()));
    assert_eq!(planned.endpoint_index, 1);
    let unchanged = try_next(failover.report_failure(2, start, "late".into()));
    assert_eq!(unchanged, planned);
    let next = try_next(failover.report_failure(1, start, "refused".into()));
    assert_eq!(next.endpoint_index, 2);
}

#[test]
fn trigger_flags_say_whether_the_current_endpoint_decides_the_online_state() {
    let endpoints = vec![
        Endpoint { url: url(0), trigger: true },
        Endpoint { url: url(1), trigger: false },
        Endpoint { url: url(2), trigger: true },
    ];
    let mut failover = Failover::new(endpoints, params(0, secs(5)), Jitter::none()).expect("valid");
    assert!(failover.has_trigger_endpoint());
    // (endpoint in use, counts for online)
    for (in_use, counts) in [(0, true), (1, false), (2, true)] {
        failover.report_success(in_use, Instant::now());
        assert_eq!(failover.current_endpoint().url, url(in_use));
        assert_eq!(failover.current_counts_for_online(), counts, "endpoint {in_use}");
    }
    let relay_only = vec![Endpoint { url: url(0), trigger: false }];
    assert!(!Failover::new(relay_only, params(0, secs(5)), Jitter::none())
        .expect("valid")
        .has_trigger_endpoint());
}

#[test]
fn invalid_failover_params_are_refused() {
    let no_endpoints = Failover::new(vec![], params(0, secs(5)), Jitter::none());
    assert_eq!(no_endpoints.err(), Some(InvalidParams::NoEndpoints));
    let zero_failback = FailoverParams { failback_interval: secs(0), ..params(0, secs(5)) };
    assert_eq!(zero_failback.validate(), Err(InvalidParams::Zero { key: "failover.failback_interval" }));
    assert_eq!(params(0, secs(0)).validate(), Ok(()), "retrying the primary at once is allowed");
}

#[test]
fn jitter_is_bounded_and_deterministic_for_a_seed() {
    // (seed, max_extra_percent, effective percent)
    let cases = [(42, 10, 10), (0, 10, 10), (7, 50, 50), (7, 250, 100), (u64::MAX, 1, 1)];
    for (seed, max_extra_percent, effective_percent) in cases {
        let base = secs(5);
        let upper = base + base * effective_percent / 100;
        let draw = || {
            let mut jitter = Jitter::new(seed, max_extra_percent);
            (0..1000).map(|_| jitter.stretch(base)).collect::<Vec<_>>()
        };
        let delays = draw();
        assert_eq!(delays, draw(), "seed {seed}: same seed, same delays");
        assert!(
            delays.iter().all(|d| (base..=upper).contains(d)),
            "seed {seed}: within [{base:?}, {upper:?}]"
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 900, "seed {seed}: delays actually spread ({} distinct)", distinct.len());
        // The spread uses most of its range.
        let largest = delays.iter().max().copied().unwrap_or_default();
        assert!(largest > base + (upper - base) * 9 / 10, "seed {seed}: largest {largest:?}");
    }
    let mut a = Jitter::new(1, 10);
    let mut b = Jitter::new(2, 10);
    assert_ne!(
        (0..10).map(|_| a.stretch(secs(60))).collect::<Vec<_>>(),
        (0..10).map(|_| b.stretch(secs(60))).collect::<Vec<_>>(),
        "different seeds, different delays"
    );
}

#[test]
fn no_jitter_and_zero_delays_are_exact() {
    let mut none = Jitter::none();
    assert_eq!(none.stretch(secs(5)), secs(5));
    let mut some = Jitter::with_default_spread(9);
    assert_eq!(some.stretch(Duration::ZERO), Duration::ZERO);
    assert_eq!(some.max_extra_percent(), 10);
}

#[test]
fn retry_and_failback_timing_with_jitter_stays_within_bounds() {
    let params =
        FailoverParams { primary_retries: 3, primary_retry_delay: secs(10), failback_interval: secs(60) };
    let run = |seed| {
        let mut failover = Failover::new(endpoints(2), params.clone(), Jitter::new(seed, 20)).expect("valid");
        let start = Instant::now();
        let (plan, _) = fail_everything(&mut failover, 0, start);
        for (endpoint, delay) in &plan[..3] {
            assert_eq!(*endpoint, 0);
            assert!((secs(10)..=secs(12)).contains(delay), "retry delay {delay:?}");
        }
        failover.report_success(1, start);
        let failback_in = failover.next_failback_at().expect("on an alternate") - start;
        assert!((secs(60)..=secs(72)).contains(&failback_in), "failback in {failback_in:?}");
        (plan, failback_in)
    };
    assert_eq!(run(3), run(3));
}
