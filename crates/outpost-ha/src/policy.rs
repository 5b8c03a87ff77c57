//! The restart policy: pure decisions (delay doubling, reset after `min_uptime`, window limit) with time passed in.
//!
//! Rules (CONTRACT section 7):
//! - the first restart waits `restart_delay`; every child that ends younger than `min_uptime`
//!   doubles the delay for the next restart, up to `restart_delay_max`;
//! - a child that ran at least `min_uptime` resets the delay to `restart_delay`;
//! - a restart that would be the `max_restarts + 1`-th within the last `restart_window` is refused:
//!   the watcher gives up.
//!
//! "Restart" is counted when the decision is made (at the child's end), so the window does not
//! depend on how long the delays were.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::HaSettings;

/// What the watcher does after a child ended without a requested stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    /// Start a new child after this delay.
    RestartAfter(Duration),
    /// `max_restarts` restarts already happened within `restart_window`: stop trying.
    GiveUp { restarts_in_window: u32 },
}

/// Decides whether and when to restart a child. Holds no clock: every call gets the instants.
#[derive(Debug)]
pub struct RestartPolicy {
    restart_delay: Duration,
    restart_delay_max: Duration,
    min_uptime: Duration,
    max_restarts: u32,
    restart_window: Duration,
    next_delay: Duration,
    /// Instants of the restarts still inside the window, oldest first; never more than `max_restarts`.
    recent_restarts: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(settings: &HaSettings) -> RestartPolicy {
        // A base delay above the cap would otherwise never be capped on the first restart.
        let restart_delay = settings.restart_delay.min(settings.restart_delay_max);
        RestartPolicy {
            restart_delay,
            restart_delay_max: settings.restart_delay_max,
            min_uptime: settings.min_uptime,
            max_restarts: settings.max_restarts,
            restart_window: settings.restart_window,
            next_delay: restart_delay,
            recent_restarts: VecDeque::with_capacity(settings.max_restarts.min(1024) as usize),
        }
    }

    /// The child that started at `started_at` ended (not by a requested stop) at `ended_at`.
    pub fn on_child_ended(&mut self, started_at: Instant, ended_at: Instant) -> RestartDecision {
        let uptime = ended_at.saturating_duration_since(started_at);
        if uptime >= self.min_uptime {
            self.next_delay = self.restart_delay;
        }

        while let Some(&oldest) = self.recent_restarts.front() {
            if ended_at.saturating_duration_since(oldest) >= self.restart_window {
                self.recent_restarts.pop_front();
            } else {
                break;
            }
        }
        if self.recent_restarts.len() >= self.max_restarts as usize {
            return RestartDecision::GiveUp { restarts_in_window: self.recent_restarts.len() as u32 };
        }
        self.recent_restarts.push_back(ended_at);
        debug_assert!(self.recent_restarts.len() <= self.max_restarts as usize);

        let delay = self.next_delay;
        self.next_delay = delay.saturating_mul(2).min(self.restart_delay_max);
        RestartDecision::RestartAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RestartDecision::{GiveUp, RestartAfter};

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    /// One child life: it started `start_offset` after the test's origin and ran for `uptime`.
    struct Life {
        start_offset: Duration,
        uptime: Duration,
        expected: RestartDecision,
    }

    fn life(start_offset: Duration, uptime: Duration, expected: RestartDecision) -> Life {
        Life { start_offset, uptime, expected }
    }

    fn run_table(name: &str, settings: HaSettings, lives: &[Life]) {
        let origin = Instant::now();
        let mut policy = RestartPolicy::new(&settings);
        for (index, life) in lives.iter().enumerate() {
            let started_at = origin + life.start_offset;
            let decision = policy.on_child_ended(started_at, started_at + life.uptime);
            assert_eq!(decision, life.expected, "{name}: life #{index}");
        }
    }

    /// Lives that each start right after the previous one's delay, all dying after `uptime`.
    fn back_to_back(uptime: Duration, expected: &[RestartDecision]) -> Vec<Life> {
        let mut offset = Duration::ZERO;
        let mut lives = Vec::new();
        for &decision in expected {
            lives.push(life(offset, uptime, decision));
            offset += uptime;
            if let RestartAfter(delay) = decision {
                offset += delay;
            }
        }
        lives
    }

    #[test]
    fn contract_defaults_double_from_two_seconds_and_cap_at_sixty() {
        let expected = [2, 4, 8, 16, 32, 60, 60].map(|s| RestartAfter(secs(s)));
        run_table("defaults", HaSettings::default(), &back_to_back(ms(10), &expected));
    }

    #[test]
    fn delay_tables() {
        let fast = HaSettings {
            restart_delay: ms(100),
            restart_delay_max: ms(500),
            min_uptime: secs(1),
            max_restarts: 100,
            restart_window: secs(60),
            ready_timeout: secs(1),
        };
        let cases: Vec<(&str, HaSettings, Vec<Life>)> = vec![
            (
                "young deaths double then cap",
                fast.clone(),
                back_to_back(ms(1), &[100, 200, 400, 500, 500].map(|m| RestartAfter(ms(m)))),
            ),
            (
                "a child that lived min_uptime resets the delay",
                fast.clone(),
                vec![
                    life(ms(0), ms(1), RestartAfter(ms(100))),
                    life(ms(200), ms(1), RestartAfter(ms(200))),
                    life(ms(500), ms(1), RestartAfter(ms(400))),
                    life(ms(1000), secs(1), RestartAfter(ms(100))), // exactly min_uptime counts
                    life(ms(3000), ms(1), RestartAfter(ms(200))),
                ],
            ),
            (
                "a child just short of min_uptime keeps doubling",
                fast.clone(),
                vec![
                    life(ms(0), ms(999), RestartAfter(ms(100))),
                    life(ms(2000), ms(999), RestartAfter(ms(200))),
                ],
            ),
            (
                "base delay above the cap is capped",
                HaSettings { restart_delay: secs(5), restart_delay_max: secs(3), ..fast.clone() },
                back_to_back(ms(1), &[RestartAfter(secs(3)), RestartAfter(secs(3))]),
            ),
            (
                "zero delay stays zero",
                HaSettings { restart_delay: Duration::ZERO, ..fast.clone() },
                back_to_back(ms(1), &[RestartAfter(Duration::ZERO), RestartAfter(Duration::ZERO)]),
            ),
        ];
        for (name, settings, lives) in cases {
            run_table(name, settings, &lives);
        }
    }

    #[test]
    fn restart_window_tables() {
        let limited = HaSettings {
            restart_delay: ms(10),
            restart_delay_max: ms(10),
            min_uptime: secs(1),
            max_restarts: 3,
            restart_window: secs(10),
            ready_timeout: secs(1),
        };
        let cases: Vec<(&str, HaSettings, Vec<Life>)> = vec![
            (
                "the fourth restart within the window gives up",
                limited.clone(),
                vec![
                    life(secs(0), ms(1), RestartAfter(ms(10))),
                    life(secs(1), ms(1), RestartAfter(ms(10))),
                    life(secs(2), ms(1), RestartAfter(ms(10))),
                    life(secs(3), ms(1), GiveUp { restarts_in_window: 3 }),
                ],
            ),
            (
                "restarts older than the window no longer count",
                limited.clone(),
                vec![
                    life(secs(0), ms(1), RestartAfter(ms(10))), // counted at 0.001 s
                    life(secs(1), ms(1), RestartAfter(ms(10))),
                    life(secs(2), ms(1), RestartAfter(ms(10))),
                    // ends at 10.001 s: the restart at 0.001 s is exactly restart_window old
                    life(secs(10), ms(1), RestartAfter(ms(10))),
                    life(secs(11), ms(0), GiveUp { restarts_in_window: 3 }),
                ],
            ),
            (
                "long-lived children still count toward the window",
                HaSettings { min_uptime: ms(1), ..limited.clone() },
                vec![
                    life(secs(0), secs(2), RestartAfter(ms(10))),
                    life(secs(2), secs(2), RestartAfter(ms(10))),
                    life(secs(4), secs(2), RestartAfter(ms(10))),
                    life(secs(6), ms(500), GiveUp { restarts_in_window: 3 }),
                ],
            ),
            (
                "max_restarts zero gives up at the first end",
                HaSettings { max_restarts: 0, ..limited.clone() },
                vec![life(secs(0), secs(100), GiveUp { restarts_in_window: 0 })],
            ),
        ];
        for (name, settings, lives) in cases {
            run_table(name, settings, &lives);
        }
    }

    #[test]
    fn giving_up_does_not_consume_a_restart() {
        let settings = HaSettings { max_restarts: 1, restart_window: secs(10), ..HaSettings::default() };
        let origin = Instant::now();
        let mut policy = RestartPolicy::new(&settings);
        assert_eq!(policy.on_child_ended(origin, origin), RestartAfter(secs(2)));
        assert_eq!(policy.on_child_ended(origin, origin + secs(5)), GiveUp { restarts_in_window: 1 });
        // Asked again later (the caller would have stopped, but the policy must stay consistent).
        assert_eq!(policy.on_child_ended(origin, origin + secs(10)), RestartAfter(secs(4)));
    }
}
