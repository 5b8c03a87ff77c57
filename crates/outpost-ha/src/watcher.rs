//! The watcher loop: start the child, wait for its readiness, restart it by the policy, stop it on request.
//!
//! One thread, no async runtime: every wait is a `poll()` on the signal self-pipe and (while
//! the child is not yet ready) its readiness pipe, with a timeout no longer than
//! [`MAX_POLL_INTERVAL`]. After each wake the loop re-checks everything (stop requested? child
//! ended? deadline passed?), so a lost wake-up costs at most that interval, never a hang.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::child::{describe_exit, RunningChild};
use crate::log::{HaCode, HaLog};
use crate::policy::{RestartDecision, RestartPolicy};
use crate::signals::SignalPipe;
use crate::{systemd, HaSettings};

/// How long a child gets to stop after SIGTERM before its process group is killed.
pub const STOP_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// The longest single `poll()`; see the module doc.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Signal handlers are process-wide, so only one watcher may run in a process at a time; a
/// second call waits for the first to return.
static ONE_WATCHER_PER_PROCESS: Mutex<()> = Mutex::new(());

pub fn run_watcher(settings: &HaSettings, program: &Path, args: &[OsString], ha_log_path: &Path) -> i32 {
    let _only_watcher = ONE_WATCHER_PER_PROCESS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut log = HaLog::open(ha_log_path);
    log.event(HaCode::LogOpened, &format!("log opened path={}", ha_log_path.display()));
    let watcher_pid = std::process::id();
    let signals = match SignalPipe::install() {
        Ok(signals) => signals,
        Err(error) => {
            log.event(
                HaCode::WatcherPid,
                &format!("watcher pid={watcher_pid} cannot install signal handlers ({error}), giving up"),
            );
            return 1;
        }
    };
    log.event(HaCode::WatcherPid, &format!("watcher pid={watcher_pid}"));
    let mut watcher = Watcher {
        settings,
        program,
        args,
        log,
        signals,
        stop_requests: 0,
        systemd: SystemdRelay::from_env(Instant::now()),
    };
    watcher.run()
}

enum ChildOutcome {
    /// The child ended by itself (or was killed for not becoming ready).
    Ended { started_at: Instant, ended_at: Instant },
    /// A stop was requested and the child has been stopped.
    Stopped,
}

struct Watcher<'a> {
    settings: &'a HaSettings,
    program: &'a Path,
    args: &'a [OsString],
    log: HaLog,
    signals: SignalPipe,
    /// SIGTERM/SIGINT received so far; a second one during a stop skips the grace period.
    stop_requests: u32,
    systemd: SystemdRelay,
}

impl Watcher<'_> {
    fn run(&mut self) -> i32 {
        let mut policy = RestartPolicy::new(self.settings);
        loop {
            if self.stop_requests > 0 {
                self.log.event(HaCode::StopRequested, "stop requested, no child running");
                return 0;
            }
            let (started_at, ended_at) = match self.start_child() {
                Some(child) => match self.supervise(child) {
                    ChildOutcome::Ended { started_at, ended_at } => (started_at, ended_at),
                    ChildOutcome::Stopped => return 0,
                },
                None => {
                    let now = Instant::now();
                    (now, now)
                }
            };
            match policy.on_child_ended(started_at, ended_at) {
                RestartDecision::GiveUp { restarts_in_window } => {
                    self.log.event(
                        HaCode::RestartLimitReached,
                        &format!(
                            "restart limit reached, giving up ({restarts_in_window} restarts within {}ms, max_restarts={})",
                            self.settings.restart_window.as_millis(),
                            self.settings.max_restarts
                        ),
                    );
                    return 1;
                }
                RestartDecision::RestartAfter(delay) => {
                    self.log
                        .event(HaCode::Restarting, &format!("restarting child in {}ms", delay.as_millis()));
                    let restart_at = Instant::now() + delay;
                    while self.stop_requests == 0 && Instant::now() < restart_at {
                        self.wait_for_events(None, Some(restart_at));
                    }
                }
            }
        }
    }

    /// Starts a child, logging HA03/HA04, or logs why it could not (as the child's end: the
    /// restart policy then decides, so a missing program ends in HA09, not a busy loop).
    fn start_child(&mut self) -> Option<RunningChild> {
        self.log.event(
            HaCode::ChildCommandLine,
            &format!("child command line: [{}]", command_line(self.program, self.args)),
        );
        match RunningChild::spawn(self.program, self.args) {
            Ok(child) => {
                self.log.event(HaCode::ChildStarted, &format!("child started pid={}", child.pid()));
                Some(child)
            }
            Err(error) => {
                self.log.event(
                    HaCode::ChildEnded,
                    &format!("child ended before it started: cannot run {}: {error}", self.program.display()),
                );
                None
            }
        }
    }

    fn supervise(&mut self, child: RunningChild) -> ChildOutcome {
        self.log.event(HaCode::WaitingForReadiness, "waiting for child readiness");
        let ready_deadline = child.started_at + self.settings.ready_timeout;
        let mut ready = false;
        let mut ready_pipe_open = true;
        loop {
            if self.stop_requests > 0 {
                return self.stop(child);
            }
            if child.has_ended() {
                return self.reap(child, "");
            }
            if !ready && Instant::now() >= ready_deadline {
                let note =
                    format!(" (killed: not ready within {}ms)", self.settings.ready_timeout.as_millis());
                child.kill_group();
                return self.reap(child, &note);
            }

            let watch_ready_pipe = !ready && ready_pipe_open;
            let deadline = if ready { None } else { Some(ready_deadline) };
            let ready_pipe_readable =
                self.wait_for_events(watch_ready_pipe.then(|| child.ready_fd()), deadline);
            if watch_ready_pipe && ready_pipe_readable {
                match child.read_readiness() {
                    Ok(true) => {
                        ready = true;
                        let after = child.started_at.elapsed().as_millis();
                        self.log.event(
                            HaCode::ChildReady,
                            &format!("child ready pid={} after={after}ms", child.pid()),
                        );
                        if let Err(error) = self.systemd.ready() {
                            self.log.event(HaCode::ChildReady, &format!("systemd not told: {error}"));
                        }
                    }
                    // End of file: the child closed its end without a notice. It will either
                    // end (noticed by has_ended) or hit the ready deadline; stop polling an fd
                    // that would now be readable forever.
                    Ok(false) | Err(_) => ready_pipe_open = false,
                }
            }
        }
    }

    /// Stops the child: SIGTERM, up to [`STOP_GRACE_PERIOD`] for it to end (cut short by a
    /// second stop request), then SIGKILL to its whole group.
    fn stop(&mut self, child: RunningChild) -> ChildOutcome {
        let pid = child.pid();
        self.log.event(HaCode::StopRequested, &format!("stop requested, stopping child pid={pid}"));
        self.systemd.stopping();
        child.request_stop();
        let stop_requests_seen = self.stop_requests;
        let deadline = Instant::now() + STOP_GRACE_PERIOD;
        let note = loop {
            if child.has_ended() {
                break String::new();
            }
            if Instant::now() >= deadline {
                break format!(" (killed: did not stop within {}ms)", STOP_GRACE_PERIOD.as_millis());
            }
            if self.stop_requests > stop_requests_seen {
                break " (killed: stop requested again)".to_string();
            }
            self.wait_for_events(None, Some(deadline));
        };
        self.reap(child, &note);
        ChildOutcome::Stopped
    }

    /// Cleans up the child's group, reaps it and logs HA07.
    fn reap(&mut self, child: RunningChild, note: &str) -> ChildOutcome {
        let pid = child.pid();
        let started_at = child.started_at;
        let status = child.finish();
        let ended_at = Instant::now();
        let uptime = ended_at.saturating_duration_since(started_at).as_millis();
        self.log.event(
            HaCode::ChildEnded,
            &format!("child ended {} pid={pid} uptime={uptime}ms{note}", describe_exit(status)),
        );
        ChildOutcome::Ended { started_at, ended_at }
    }

    /// Waits until a signal arrives, `ready_pipe` is readable, `deadline` passes or
    /// [`MAX_POLL_INTERVAL`] elapses; returns whether `ready_pipe` is readable. Records stop
    /// requests and sends watchdog pings that fall due.
    fn wait_for_events(&mut self, ready_pipe: Option<BorrowedFd<'_>>, deadline: Option<Instant>) -> bool {
        let now = Instant::now();
        let mut timeout = MAX_POLL_INTERVAL;
        if let Some(deadline) = deadline {
            timeout = timeout.min(deadline.saturating_duration_since(now));
        }
        if let Some(ping_at) = self.systemd.next_watchdog_at() {
            timeout = timeout.min(ping_at.saturating_duration_since(now));
        }

        let mut fds = [
            libc::pollfd { fd: self.signals.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            // poll() ignores negative fds.
            libc::pollfd { fd: ready_pipe.map_or(-1, |fd| fd.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        // Round up: waking a little before the deadline would only cause a zero-timeout spin.
        let timeout_ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let result = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        // EINTR (a signal ran its handler) is a normal wake: the byte is in the pipe.
        let woke_on_fds = result > 0;

        if woke_on_fds && fds[0].revents != 0 {
            self.stop_requests += self.signals.drain().stop_requests;
        }
        self.systemd.ping_watchdog_if_due(Instant::now());
        woke_on_fds && fds[1].revents != 0
    }
}

/// The child's command line for HA03, arguments with spaces or quotes shown quoted.
fn command_line(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(quote_if_needed)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote_if_needed(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    if text.is_empty() || text.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        format!("{text:?}")
    } else {
        text.into_owned()
    }
}

/// Under systemd with `--ha`, the watcher is the service's main process: it passes the child's
/// readiness on as `READY=1` and sends watchdog pings for itself (the child's environment has
/// the notify variables removed).
struct SystemdRelay {
    under_systemd: bool,
    ready_sent: bool,
    watchdog: Option<Watchdog>,
}

struct Watchdog {
    interval: Duration,
    next_ping_at: Instant,
    failure_reported: bool,
}

impl SystemdRelay {
    fn from_env(now: Instant) -> SystemdRelay {
        let under_systemd =
            std::env::var_os(systemd::NOTIFY_SOCKET_ENV).is_some_and(|socket| !socket.is_empty());
        let watchdog = systemd::watchdog_interval().filter(|_| under_systemd).map(|interval| Watchdog {
            interval,
            next_ping_at: now,
            failure_reported: false,
        });
        SystemdRelay { under_systemd, ready_sent: false, watchdog }
    }

    fn ready(&mut self) -> Result<(), systemd::NotifyError> {
        if !self.under_systemd || self.ready_sent {
            return Ok(());
        }
        self.ready_sent = true;
        systemd::notify("READY=1").map(drop)
    }

    fn stopping(&mut self) {
        if self.under_systemd {
            let _ = systemd::notify("STOPPING=1");
        }
    }

    fn next_watchdog_at(&self) -> Option<Instant> {
        self.watchdog.as_ref().map(|watchdog| watchdog.next_ping_at)
    }

    fn ping_watchdog_if_due(&mut self, now: Instant) {
        let Some(watchdog) = self.watchdog.as_mut() else { return };
        if now < watchdog.next_ping_at {
            return;
        }
        watchdog.next_ping_at = now + watchdog.interval;
        if let Err(error) = systemd::notify("WATCHDOG=1") {
            if !watchdog.failure_reported {
                watchdog.failure_reported = true;
                eprintln!("outpost-ha: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_only_where_needed() {
        let args: Vec<OsString> =
            ["edge", "--data-dir", "/var/lib/out post", "", "--child"].iter().map(OsString::from).collect();
        assert_eq!(
            command_line(Path::new("/usr/local/bin/outpost"), &args),
            r#"/usr/local/bin/outpost edge --data-dir "/var/lib/out post" "" --child"#
        );
    }
}
