//! Starting the node as a child in its own process group with a readiness pipe, and ending it without orphans.
//!
//! The readiness pipe is created close-on-exec; only the forked child clears the flag on its
//! write end (in `pre_exec`), so no other process inherits it. The watcher closes its copy of the
//! write end right after the spawn, so the read end reports end-of-file once the child (and
//! anything it passed the fd to) is gone.
//!
//! The child's end is detected with `waitid(WNOWAIT)`, which leaves it a zombie: while the zombie
//! exists its pid, and so its process group id, cannot be reused, so killing the group before
//! reaping can never hit an unrelated process.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::systemd::{NOTIFY_SOCKET_ENV, WATCHDOG_PID_ENV, WATCHDOG_USEC_ENV};
use crate::READY_FD_ENV;

/// A started child: its process (also its process group leader) and the read end of its
/// readiness pipe.
pub struct RunningChild {
    process: Child,
    pid: Pid,
    pub started_at: Instant,
    ready_read: OwnedFd,
}

impl RunningChild {
    /// Starts `program args...` with stdin from /dev/null, stdout/stderr inherited, in a new
    /// process group, with the readiness pipe's fd number in `OUTPOST_HA_READY_FD`.
    pub fn spawn(program: &Path, args: &[OsString]) -> io::Result<RunningChild> {
        let (ready_read, ready_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // std puts the child's stdio on fds 0-2 before pre_exec runs; a write end that landed
        // there (a watcher started with closed stdio) would be overwritten, so move it above.
        let ready_write = if ready_write.as_raw_fd() <= 2 {
            let moved = fcntl(ready_write.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(3))?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(moved) }
        } else {
            ready_write
        };
        let ready_write_fd = ready_write.as_raw_fd();
        let watcher_pid = nix::unistd::getpid().as_raw();

        let mut command = Command::new(program);
        command
            .args(args)
            .env(READY_FD_ENV, ready_write_fd.to_string())
            // Under systemd with --ha, the watcher is the main process and talks to systemd;
            // the child's notifications would be rejected (NotifyAccess=main) or confusing.
            .env_remove(NOTIFY_SOCKET_ENV)
            .env_remove(WATCHDOG_USEC_ENV)
            .env_remove(WATCHDOG_PID_ENV)
            .stdin(Stdio::null());
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls; it allocates nothing (io::Error::last_os_error does not allocate).
        unsafe {
            command.pre_exec(move || {
                // Own process group: a terminal's Ctrl-C reaches only the watcher (which then
                // stops the child cleanly), and the whole group can be killed at the end.
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // If the watcher dies (even by SIGKILL), the child is asked to stop instead of
                // running on unwatched.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != watcher_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH)); // watcher already gone
                }
                if libc::fcntl(ready_write_fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = command.spawn()?;
        let started_at = Instant::now();
        drop(ready_write);
        Ok(RunningChild { pid: Pid::from_raw(process.id() as i32), process, started_at, ready_read })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready_read.as_fd()
    }

    /// Reads what the child wrote to the readiness pipe: `Ok(true)` for a readiness notice,
    /// `Ok(false)` for end-of-file (the child closed the pipe without reporting ready).
    pub fn read_readiness(&self) -> io::Result<bool> {
        let mut buffer = [0_u8; 64];
        loop {
            match nix::unistd::read(self.ready_read.as_raw_fd(), &mut buffer) {
                Ok(count) => return Ok(count > 0),
                Err(Errno::EINTR) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Whether the child has ended, without reaping it (see the module doc).
    pub fn has_ended(&self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.pid), flags) {
            Ok(WaitStatus::StillAlive) => false,
            Ok(_) => true,
            Err(Errno::EINTR) => false,
            // ECHILD: already reaped, which only `finish` does; anything else cannot happen for
            // our own child. Either way there is nothing left to wait for.
            Err(_) => true,
        }
    }

    /// Asks the child (only the leader: it stops its own helpers) to stop.
    pub fn request_stop(&self) {
        let _ = kill(self.pid, Signal::SIGTERM);
    }

    /// Kills every process of the child's group.
    pub fn kill_group(&self) {
        // ESRCH: the group is already empty, which is the goal.
        let _ = killpg(self.pid, Signal::SIGKILL);
    }

    /// Kills whatever is left of the child's process group, then reaps the child and returns
    /// how it ended. Blocks until the child is gone (immediately, if it already ended).
    pub fn finish(mut self) -> ExitStatus {
        self.kill_group();
        // std retries EINTR itself; ECHILD would mean someone else reaped our child, which this
        // crate never does. Report that as killed rather than hang or panic.
        self.process.wait().unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
    }
}

/// `code=N` or `signal=NAME`, as in the HA07 line.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("code={code}");
    }
    match status.signal() {
        Some(number) => match Signal::try_from(number) {
            Ok(signal) => format!("signal={}", signal.as_str()),
            Err(_) => format!("signal={number}"),
        },
        None => format!("status={status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_codes_and_signals() {
        let cases = [
            (ExitStatus::from_raw(0), "code=0"),
            (ExitStatus::from_raw(3 << 8), "code=3"),
            (ExitStatus::from_raw(libc::SIGKILL), "signal=SIGKILL"),
            (ExitStatus::from_raw(libc::SIGTERM), "signal=SIGTERM"),
            (ExitStatus::from_raw(libc::SIGSEGV | 0x80), "signal=SIGSEGV"), // core dumped
        ];
        for (status, expected) in cases {
            assert_eq!(describe_exit(status), expected);
        }
    }
}
