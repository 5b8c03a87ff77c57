//! The watcher's self-pipe: SIGTERM, SIGINT and SIGCHLD become bytes on a pipe that `poll()` waits on.
//!
//! A handler may only do async-signal-safe work, so it writes the signal number as one byte to
//! a non-blocking pipe and returns; the watcher's loop polls that pipe together with the child's
//! readiness pipe, so one wait notices a stop request, a child's end and readiness alike. This
//! works whichever thread the kernel picks to run the handler, unlike a blocked-signal approach
//! (`sigtimedwait`, `signalfd`) that needs every thread of the process to block the signals.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Write end of the active self-pipe, or -1. Read by the signal handler, so it must be an atomic.
static SIGNAL_PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);
/// The watcher's pid. Between `fork()` and `exec()` a spawned child still runs our handler; it
/// must not write into the watcher's pipe (a SIGTERM meant for the child would look like a stop
/// request to the watcher), so it compares pids.
static WATCHER_PID: AtomicI32 = AtomicI32::new(-1);

const HANDLED_SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD];

extern "C" fn on_signal(signal: libc::c_int) {
    let saved_errno = Errno::last_raw();
    // SAFETY: getpid, signal, raise and write are async-signal-safe.
    unsafe {
        if libc::getpid() != WATCHER_PID.load(Ordering::Relaxed) {
            // We are a freshly forked child that has not exec'd yet: act as if we had no handler.
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        } else {
            let fd = SIGNAL_PIPE_WRITE_FD.load(Ordering::Relaxed);
            if fd >= 0 {
                let byte = signal as u8;
                // A full pipe drops the byte, which is fine: the pipe is readable anyway.
                libc::write(fd, (&byte as *const u8).cast(), 1);
            }
        }
    }
    Errno::set_raw(saved_errno);
}

/// What arrived since the last drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceivedSignals {
    /// SIGTERM or SIGINT arrived this many times.
    pub stop_requests: u32,
    /// SIGCHLD arrived: some child changed state.
    pub child_changed: bool,
}

/// Installed handlers plus the pipe they write to; dropping it restores the previous handlers.
pub struct SignalPipe {
    read_end: OwnedFd,
    _write_end: OwnedFd,
    previous_actions: Vec<(Signal, SigAction)>,
}

impl SignalPipe {
    /// Creates the pipe and installs the handlers. Only one may exist per process at a time
    /// (the watcher holds a process-wide lock while it runs).
    pub fn install() -> io::Result<SignalPipe> {
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        WATCHER_PID.store(std::process::id() as i32, Ordering::Relaxed);
        SIGNAL_PIPE_WRITE_FD.store(write_end.as_raw_fd(), Ordering::Relaxed);

        let mut pipe = SignalPipe { read_end, _write_end: write_end, previous_actions: Vec::new() };
        // SA_RESTART keeps unrelated blocking calls (file writes) from failing with EINTR;
        // poll() is never restarted, which is what wakes the loop. SA_NOCLDSTOP: a stopped or
        // continued child is not an event for us.
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
            SigSet::empty(),
        );
        for signal in HANDLED_SIGNALS {
            // SAFETY: the handler only performs async-signal-safe calls.
            let previous = unsafe { sigaction(signal, &action) }?;
            pipe.previous_actions.push((signal, previous));
        }
        Ok(pipe)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read_end.as_fd()
    }

    /// Reads every pending byte without blocking.
    pub fn drain(&self) -> ReceivedSignals {
        let mut received = ReceivedSignals::default();
        let mut buffer = [0_u8; 64];
        loop {
            match nix::unistd::read(self.read_end.as_raw_fd(), &mut buffer) {
                Ok(0) | Err(Errno::EAGAIN) => return received,
                Ok(count) => {
                    for &byte in &buffer[..count] {
                        match i32::from(byte) {
                            libc::SIGTERM | libc::SIGINT => received.stop_requests += 1,
                            libc::SIGCHLD => received.child_changed = true,
                            _ => {}
                        }
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(error) => {
                    // Cannot happen on a pipe we own; treat as "something changed" so the
                    // caller re-checks the child rather than missing an event.
                    debug_assert!(false, "reading the signal pipe failed: {error}");
                    received.child_changed = true;
                    return received;
                }
            }
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for (signal, previous) in self.previous_actions.drain(..).rev() {
            // SAFETY: restoring the action that was installed before us.
            let _ = unsafe { sigaction(signal, &previous) };
        }
        SIGNAL_PIPE_WRITE_FD.store(-1, Ordering::Relaxed);
    }
}
