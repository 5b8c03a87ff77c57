//! Every wait of a route's task, in one place. A wait always ends when the node stops or the lease
//! changes hands; as the caller asks ([`Until`]), also when the route's mode changes, when work may
//! have arrived (a store commit, a resubmit notice) or at a deadline (a retry's time, the probe
//! interval, the held lease's end by this node's clock). [`Signals::wait`] says what came first
//! with a closed [`Wake`]; [`Signals::wait_or`] also ends when a piece of work (a delivery, a
//! window of POSTs) finishes, and gives its output.
//!
//! When several are ready at once the first in [`Wake`]'s order wins: a stop before anything else,
//! then the lease, so a task never starts or keeps waiting on something it is told to drop.

use std::future::Future;

use outpost_store::Lease;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::modes::ModeState;

/// What ended a wait, in the order they are looked at when several are ready at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// The node is stopping.
    Stopped,
    /// The lease changed hands (or was renewed: its end moved).
    LeaseChanged,
    /// The route's mode changed.
    ModeChanged,
    /// Entries of the route were resubmitted.
    Resubmitted,
    /// The store committed something: the queue may have new messages.
    Committed,
    /// The deadline passed.
    Elapsed,
}

/// What, besides a stop and the lease changing hands, ends a wait.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Until {
    deadline: Option<Instant>,
    mode_change: bool,
    work: bool,
}

impl Until {
    /// Only a stop or the lease changing hands.
    pub(super) fn stop_or_lease() -> Until {
        Until::default()
    }

    /// Also a change of the route's mode.
    pub(super) fn or_mode_change(self) -> Until {
        Until { mode_change: true, ..self }
    }

    /// Also work that may have arrived: a store commit or a resubmit notice.
    pub(super) fn or_work(self) -> Until {
        Until { work: true, ..self }
    }

    /// Also the time `at`.
    pub(super) fn or_deadline(self, at: Instant) -> Until {
        Until { deadline: Some(at), ..self }
    }

    /// Also the end of a held lease's validity by this node's clock; nothing more for one without
    /// an end (SQLite's).
    pub(super) fn or_lease_end(self, lease: Lease) -> Until {
        match lease.valid_until {
            Some(until) if lease.held => self.or_deadline(until.into()),
            _ => self,
        }
    }
}

/// The inputs a route's task waits on; it owns them, and reads the current mode and lease from
/// them between waits.
pub(super) struct Signals {
    pub(super) stop: watch::Receiver<bool>,
    pub(super) mode: watch::Receiver<ModeState>,
    /// Whether this node may deliver the route (store lease `route:<name>`).
    pub(super) lease: watch::Receiver<Lease>,
    pub(super) commits: watch::Receiver<u64>,
    /// Tells the task that entries were resubmitted (capacity 1: one pending notice is enough).
    pub(super) resubmit_notices: mpsc::Receiver<()>,
}

impl Signals {
    /// Waits until one of `until`'s events, and says which came first.
    pub(super) async fn wait(&mut self, until: Until) -> Wake {
        match self.wait_or(until, std::future::pending::<std::convert::Infallible>()).await {
            Ok(never) => match never {},
            Err(wake) => wake,
        }
    }

    /// Runs `work` until it finishes (`Ok` with its output) or one of `until`'s events comes
    /// first (`Err`; `work` is left where it was, to be polled again or dropped).
    pub(super) async fn wait_or<F: Future>(&mut self, until: Until, work: F) -> Result<F::Output, Wake> {
        let deadline = async {
            match until.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            // A closed channel ends the wait as its event would: the task looks again.
            _ = self.stop.changed() => Err(Wake::Stopped),
            _ = lease_changed(&mut self.lease) => Err(Wake::LeaseChanged),
            _ = self.mode.changed(), if until.mode_change => Err(Wake::ModeChanged),
            _ = self.resubmit_notices.recv(), if until.work => Err(Wake::Resubmitted),
            _ = self.commits.changed(), if until.work => Err(Wake::Committed),
            _ = deadline => Err(Wake::Elapsed),
            output = work => Ok(output),
        }
    }
}

/// Resolves when the lease changes hands; never when its sender is gone (SQLite's lease is a
/// constant: always held).
async fn lease_changed(lease: &mut watch::Receiver<Lease>) {
    if lease.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::route::modes::Mode;

    struct Senders {
        stop: watch::Sender<bool>,
        mode: watch::Sender<ModeState>,
        lease: watch::Sender<Lease>,
        commits: watch::Sender<u64>,
        resubmit_notices: mpsc::Sender<()>,
    }

    fn signals() -> (Senders, Signals) {
        let state = ModeState {
            mode: Mode::Forward,
            mode_since_ms: 0,
            changed_by: "start".into(),
            reason: String::new(),
        };
        let (stop, stop_rx) = watch::channel(false);
        let (mode, mode_rx) = watch::channel(state);
        let (lease, lease_rx) = watch::channel(Lease::ALWAYS);
        let (commits, commits_rx) = watch::channel(0);
        let (resubmit_notices, notices_rx) = mpsc::channel(1);
        let senders = Senders { stop, mode, lease, commits, resubmit_notices };
        let signals = Signals {
            stop: stop_rx,
            mode: mode_rx,
            lease: lease_rx,
            commits: commits_rx,
            resubmit_notices: notices_rx,
        };
        (senders, signals)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(1)
    }

    #[tokio::test(start_paused = true)]
    async fn each_event_wakes_the_waits_that_ask_for_it() {
        type Send = fn(&Senders);
        let all = || Until::stop_or_lease().or_mode_change().or_work().or_deadline(soon());
        let cases: [(&str, Send, Until, Wake); 10] = [
            (
                "stop",
                |s| {
                    s.stop.send_replace(true);
                },
                Until::stop_or_lease(),
                Wake::Stopped,
            ),
            (
                "lease",
                |s| {
                    s.lease.send_replace(Lease { held: false, valid_until: None });
                },
                Until::stop_or_lease(),
                Wake::LeaseChanged,
            ),
            ("mode", |s| s.mode.send_modify(|m| m.mode = Mode::Store), all(), Wake::ModeChanged),
            ("resubmit", |s| s.resubmit_notices.try_send(()).unwrap(), all(), Wake::Resubmitted),
            (
                "commit",
                |s| {
                    s.commits.send_replace(1);
                },
                all(),
                Wake::Committed,
            ),
            ("nothing", |_| {}, all(), Wake::Elapsed),
            // Not asked for: the deadline ends the wait instead.
            (
                "mode unasked",
                |s| s.mode.send_modify(|m| m.mode = Mode::Store),
                Until::stop_or_lease().or_deadline(soon()),
                Wake::Elapsed,
            ),
            (
                "commit unasked",
                |s| {
                    s.commits.send_replace(1);
                },
                Until::stop_or_lease().or_mode_change().or_deadline(soon()),
                Wake::Elapsed,
            ),
            (
                "resubmit unasked",
                |s| s.resubmit_notices.try_send(()).unwrap(),
                Until::stop_or_lease().or_deadline(soon()),
                Wake::Elapsed,
            ),
            // A stop comes first when several are ready.
            (
                "stop and more",
                |s| {
                    s.stop.send_replace(true);
                    s.mode.send_modify(|m| m.mode = Mode::Store);
                    s.commits.send_replace(1);
                },
                all(),
                Wake::Stopped,
            ),
        ];
        for (name, send, until, expected) in cases {
            let (senders, mut signals) = signals();
            send(&senders);
            assert_eq!(signals.wait(until).await, expected, "{name}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_leases_end_is_a_deadline_and_an_endless_lease_is_none() {
        let (_senders, mut signals) = signals();
        let ending = Lease { held: true, valid_until: Some(soon().into_std()) };
        assert_eq!(signals.wait(Until::stop_or_lease().or_lease_end(ending)).await, Wake::Elapsed);
        let endless = Until::stop_or_lease().or_lease_end(Lease::ALWAYS);
        let work = tokio::time::sleep(Duration::from_secs(3600));
        assert_eq!(signals.wait_or(endless, work).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_finishes_first_gives_its_output_and_a_stop_abandons_it() {
        let (senders, mut signals) = signals();
        let until = Until::stop_or_lease().or_deadline(soon());
        assert_eq!(signals.wait_or(until, async { 7 }).await, Ok(7));
        let slow = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(slow);
        assert_eq!(signals.wait_or(until, &mut slow).await, Err(Wake::Elapsed));
        senders.stop.send_replace(true);
        assert_eq!(signals.wait_or(Until::stop_or_lease(), &mut slow).await, Err(Wake::Stopped));
    }
}
