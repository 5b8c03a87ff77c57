//! Helpers shared by the watcher tests: child scripts, a watcher in a forked process, log reading, deadlines.
#![allow(dead_code)] // each test file uses a different subset

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use outpost_ha::{run_watcher, HaSettings};

/// Every watcher test holds this for its whole run. nextest runs each test in its own process,
/// but `cargo test` runs them as threads of one process, and `fork()` copies only the calling
/// thread: a lock another test's in-process watcher holds at that moment (the crate's
/// one-watcher-per-process lock, stderr) would stay locked forever in the forked copy.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A child that reports ready at once, then sleeps (as the node would serve).
pub const READY_THEN_SLEEP: &str = r#"printf ready > "/dev/fd/$OUTPOST_HA_READY_FD"; exec sleep 1000"#;
/// A child that never reports ready.
pub const NEVER_READY: &str = "exec sleep 1000";
/// A child that fails at once, like a node with a broken store.
pub const EXIT_3: &str = "exit 3";

/// `/bin/sh -c SCRIPT` as (program, args); `--child` is appended as the binary would.
pub fn shell(script: &str) -> (PathBuf, Vec<OsString>) {
    let args = ["-c", script, "outpost-test-child", "--child"].iter().map(OsString::from).collect();
    (PathBuf::from("/bin/sh"), args)
}

/// Settings short enough for a test suite.
pub fn fast_settings() -> HaSettings {
    HaSettings {
        restart_delay: Duration::from_millis(100),
        restart_delay_max: Duration::from_millis(400),
        min_uptime: Duration::from_secs(10),
        max_restarts: 5,
        restart_window: Duration::from_secs(60),
        ready_timeout: Duration::from_secs(5),
    }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub time: String,
    pub code: String,
    pub text: String,
}

/// Reads the HA log, asserting every line has the `<RFC 3339 UTC ms> HAnn <text>` shape.
pub fn read_log(path: &Path) -> Vec<LogLine> {
    let Ok(content) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    content
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let (time, code, text) =
                (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(is_rfc3339_utc_millis(time), "bad time in log line {line:?}");
            assert!(
                code.len() == 4 && code.starts_with("HA") && code[2..].bytes().all(|b| b.is_ascii_digit()),
                "bad code in log line {line:?}"
            );
            assert!(!text.is_empty(), "empty text in log line {line:?}");
            LogLine { time: time.to_string(), code: code.to_string(), text: text.to_string() }
        })
        .collect()
}

fn is_rfc3339_utc_millis(time: &str) -> bool {
    let bytes = time.as_bytes();
    let shape = "dddd-dd-ddTdd:dd:dd.dddZ".as_bytes();
    bytes.len() == shape.len()
        && bytes.iter().zip(shape).all(|(&b, &s)| if s == b'd' { b.is_ascii_digit() } else { b == s })
}

pub fn lines_with_code<'a>(log: &'a [LogLine], code: &str) -> Vec<&'a LogLine> {
    log.iter().filter(|line| line.code == code).collect()
}

pub fn count_code(path: &Path, code: &str) -> usize {
    read_log(path).iter().filter(|line| line.code == code).count()
}

/// The number after `key=` in `text` (e.g. `pid=` in "child started pid=1234").
pub fn field(text: &str, key: &str) -> Option<i64> {
    let start = text.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Pids of every child the watcher started, in order (from the HA04 lines).
pub fn started_pids(path: &Path) -> Vec<Pid> {
    read_log(path)
        .iter()
        .filter(|line| line.code == "HA04")
        .map(|line| Pid::from_raw(field(&line.text, "pid").expect("HA04 has a pid") as i32))
        .collect()
}

/// Whether `pid` is a live process. A zombie (dead, waiting to be reaped by its parent or, for
/// an orphan, by init) does not count: it runs nothing and holds nothing but its pid.
pub fn process_exists(pid: Pid) -> bool {
    process_state_and_group(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Whether any live process is in group `pgid`.
pub fn process_group_exists(pgid: Pid) -> bool {
    if killpg(pgid, None) == Err(Errno::ESRCH) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true; // no /proc to tell zombies apart: the group exists
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| process_state_and_group(Pid::from_raw(pid)))
        .any(|(state, group)| group == pgid.as_raw() && state != 'Z' && state != 'X')
}

/// (state, process group) from /proc/PID/stat, or `None` if the process is gone.
fn process_state_and_group(pid: Pid) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

/// Whether `pid` is gone within a few seconds: a process killed by SIGKILL dies when the kernel
/// gets to it, so "gone" needs a deadline.
pub fn process_gone_soon(pid: Pid) -> bool {
    wait_until(Duration::from_secs(5), || !process_exists(pid))
}

/// Whether no live process is left in group `pgid` within a few seconds.
pub fn process_group_gone_soon(pgid: Pid) -> bool {
    wait_until(Duration::from_secs(5), || !process_group_exists(pgid))
}

/// `run_watcher` in a forked copy of the test process, so signals sent to it reach only it.
pub struct ForkedWatcher {
    pub pid: Pid,
    exit_code: Option<i32>,
}

impl ForkedWatcher {
    pub fn start(
        settings: HaSettings,
        program: PathBuf,
        args: Vec<OsString>,
        log_path: PathBuf,
    ) -> ForkedWatcher {
        ForkedWatcher::start_with_env(settings, program, args, log_path, &[])
    }

    /// Like [`ForkedWatcher::start`], with `env` set in the watcher's process only.
    pub fn start_with_env(
        settings: HaSettings,
        program: PathBuf,
        args: Vec<OsString>,
        log_path: PathBuf,
        env: &[(&str, &str)],
    ) -> ForkedWatcher {
        // SAFETY: the child only runs the watcher (single-threaded, as it would be in the real
        // binary) and leaves with _exit, never returning into the test harness.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                for (name, value) in env {
                    std::env::set_var(name, value); // the only thread of this process
                }
                let code = std::panic::catch_unwind(|| run_watcher(&settings, &program, &args, &log_path))
                    .unwrap_or(101);
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => ForkedWatcher { pid: child, exit_code: None },
        }
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid, signal).expect("signal the watcher");
    }

    /// Waits for the watcher to exit and returns its exit code, or `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let pid = self.pid;
        let mut exit_code = self.exit_code;
        wait_until(timeout, || {
            if exit_code.is_none() {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => exit_code = Some(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => exit_code = Some(128 + signal as i32),
                    _ => {}
                }
            }
            exit_code.is_some()
        });
        self.exit_code = exit_code;
        exit_code
    }
}

impl Drop for ForkedWatcher {
    fn drop(&mut self) {
        if self.exit_code.is_none() {
            // A failed test: kill the watcher; its children get SIGTERM by PR_SET_PDEATHSIG.
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}
