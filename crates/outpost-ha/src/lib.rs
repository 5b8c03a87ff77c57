//! outpost-ha: the `--ha` watcher that runs the node as a child and restarts it, plus systemd notify support.
//!
//! Two halves, used by two processes:
//!
//! - The **watcher** ([`run_watcher`]) runs `outpost edge|central ... --child`, waits for its
//!   readiness notice, restarts it by the rules of CONTRACT section 7 and writes
//!   `outpost_ha.log`. It must be unable to fail the ways the node can, so it has no store, no
//!   network and no async runtime: `std::process`, `poll()` and signals only.
//! - The **node** calls [`notify_ready`] once its store is open and its listener serves, and
//!   [`notify_watchdog`] every [`watchdog_interval`] under a systemd watchdog.
//!
//! Readiness travels over a pipe the watcher creates per child: the fd number of its write end
//! is in the child's environment as `OUTPOST_HA_READY_FD`; the child writes a line and closes it.
//!
//! Must not: depend on the store, the network or tokio; read the configuration file (the binary
//! turns the `[ha]` section into [`HaSettings`]).

mod child;
mod log;
mod policy;
mod rfc3339;
mod signals;
mod systemd;
mod watcher;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use log::{HA_LOG_FILE_NAME, HA_LOG_MAX_BYTES};
pub use policy::{RestartDecision, RestartPolicy};
pub use systemd::NotifyError;
pub use watcher::STOP_GRACE_PERIOD;

/// Environment variable naming the child's end of the readiness pipe.
pub const READY_FD_ENV: &str = "OUTPOST_HA_READY_FD";

/// The `[ha]` section of the configuration, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaSettings {
    /// Delay before the first restart; doubles for each child that ends younger than `min_uptime`.
    pub restart_delay: Duration,
    /// Cap on the doubled delay.
    pub restart_delay_max: Duration,
    /// A child that ran at least this long resets the delay to `restart_delay`.
    pub min_uptime: Duration,
    /// More restarts than this within `restart_window` and the watcher gives up (exit 1).
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// A child not ready this long after its start is killed and restarted.
    pub ready_timeout: Duration,
}

impl Default for HaSettings {
    /// The contract's defaults: 2 s, 60 s, 60 s, 10, 10 min, 30 s.
    fn default() -> HaSettings {
        HaSettings {
            restart_delay: Duration::from_secs(2),
            restart_delay_max: Duration::from_secs(60),
            min_uptime: Duration::from_secs(60),
            max_restarts: 10,
            restart_window: Duration::from_secs(10 * 60),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// Runs the watcher until a requested stop (returns 0) or the restart limit (returns 1).
/// `program` + `args` is the child's full command line (the caller already appended `--child`).
///
/// Installs handlers for SIGTERM, SIGINT and SIGCHLD for its duration (restoring the previous
/// ones on return); call it from a process that does nothing else with those signals. One
/// watcher runs per process at a time; a concurrent call waits for the first to return.
pub fn run_watcher(settings: &HaSettings, program: &Path, args: &[OsString], ha_log_path: &Path) -> i32 {
    watcher::run_watcher(settings, program, args, ha_log_path)
}

/// Called by the node (child) once its store is open and its listener serves. Writes to the
/// readiness pipe whose fd number is in env `OUTPOST_HA_READY_FD` (if set), and sends `READY=1`
/// to `NOTIFY_SOCKET` (if set). Failures are printed on stderr; use [`try_notify_ready`] to
/// handle them yourself.
pub fn notify_ready() {
    if let Err(error) = try_notify_ready() {
        eprintln!("outpost: readiness notice not delivered: {error}");
    }
}

/// [`notify_ready`], returning the first failure. Both channels are tried either way.
pub fn try_notify_ready() -> Result<(), NotifyError> {
    let pipe = notify_ready_pipe();
    let systemd = systemd::notify("READY=1").map(drop);
    pipe.and(systemd)
}

/// The interval at which to call [`notify_watchdog`]: half of `$WATCHDOG_USEC`, or `None` when
/// systemd's watchdog is not on for this process.
pub fn watchdog_interval() -> Option<Duration> {
    systemd::watchdog_interval()
}

/// Sends `WATCHDOG=1` to `NOTIFY_SOCKET` (if set). Failures are printed on stderr.
pub fn notify_watchdog() {
    if let Err(error) = try_notify_watchdog() {
        eprintln!("outpost: watchdog ping not delivered: {error}");
    }
}

/// [`notify_watchdog`], returning the failure.
pub fn try_notify_watchdog() -> Result<(), NotifyError> {
    systemd::notify("WATCHDOG=1").map(drop)
}

/// Sends `STOPPING=1` to `NOTIFY_SOCKET` (if set), for a node beginning a clean stop.
pub fn notify_stopping() {
    if let Err(error) = systemd::notify("STOPPING=1") {
        eprintln!("outpost: stopping notice not delivered: {error}");
    }
}

/// The readiness fd is used at most once: after the first notice it is closed, and its number
/// may belong to some other file by the time of a second call.
static READY_PIPE_USED: AtomicBool = AtomicBool::new(false);

fn notify_ready_pipe() -> Result<(), NotifyError> {
    let Some(value) = std::env::var_os(READY_FD_ENV) else {
        return Ok(());
    };
    if READY_PIPE_USED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let fd = value
        .to_str()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| NotifyError::BadReadinessFd { value: value.clone() })?;
    // Only take ownership of the fd if it really is a pipe: a stray OUTPOST_HA_READY_FD in the
    // environment must not make us write into (and close) some unrelated file.
    let stat =
        nix::sys::stat::fstat(fd).map_err(|errno| NotifyError::ReadinessPipe { fd, source: errno.into() })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(NotifyError::ReadinessPipe {
            fd,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a pipe"),
        });
    }
    // SAFETY: the fd is open, is a pipe, and was handed to this process (by the watcher) for
    // exactly this one use; READY_PIPE_USED guarantees we take it only once. Dropping the File
    // closes it, so the watcher's read end sees end-of-file after the notice.
    let mut pipe = unsafe { File::from_raw_fd(fd) };
    pipe.write_all(b"READY=1\n").map_err(|source| NotifyError::ReadinessPipe { fd, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_contract_defaults() {
        let settings = HaSettings::default();
        assert_eq!(settings.restart_delay, Duration::from_secs(2));
        assert_eq!(settings.restart_delay_max, Duration::from_secs(60));
        assert_eq!(settings.min_uptime, Duration::from_secs(60));
        assert_eq!(settings.max_restarts, 10);
        assert_eq!(settings.restart_window, Duration::from_secs(600));
        assert_eq!(settings.ready_timeout, Duration::from_secs(30));
    }
}
