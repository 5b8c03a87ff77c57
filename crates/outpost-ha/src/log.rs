//! `outpost_ha.log`: one line per watcher event (`<RFC 3339 time> <CODE> <text>`), bounded by rotation.
//!
//! The log must never be a reason for the watcher to fail: every I/O error is reported on stderr
//! and the next line tries again. Each line is also mirrored to stderr, so an operator running
//! `outpost --ha` in a terminal or under a service manager sees the same events.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::rfc3339::format_utc_millis;

/// File name of the watcher log inside the data directory.
pub const HA_LOG_FILE_NAME: &str = "outpost_ha.log";

/// A log larger than this is renamed to `<name>.1` (replacing the older one) before the next line.
pub const HA_LOG_MAX_BYTES: u64 = 1024 * 1024;

/// The event codes of CONTRACT section 7; the numbers are part of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaCode {
    LogOpened,
    WatcherPid,
    ChildCommandLine,
    ChildStarted,
    WaitingForReadiness,
    ChildReady,
    ChildEnded,
    Restarting,
    RestartLimitReached,
    StopRequested,
}

impl HaCode {
    pub fn as_str(self) -> &'static str {
        match self {
            HaCode::LogOpened => "HA01",
            HaCode::WatcherPid => "HA02",
            HaCode::ChildCommandLine => "HA03",
            HaCode::ChildStarted => "HA04",
            HaCode::WaitingForReadiness => "HA05",
            HaCode::ChildReady => "HA06",
            HaCode::ChildEnded => "HA07",
            HaCode::Restarting => "HA08",
            HaCode::RestartLimitReached => "HA09",
            HaCode::StopRequested => "HA10",
        }
    }
}

/// Appends event lines to the watcher log, rotating it once it would exceed `max_bytes`.
pub struct HaLog {
    path: PathBuf,
    rotated_path: PathBuf,
    max_bytes: u64,
    /// `None` after an I/O error; the next line reopens the file.
    file: Option<File>,
    size_bytes: u64,
}

impl HaLog {
    /// Opens (creating the directory and file if needed) the log at `path` for appending.
    pub fn open(path: &Path) -> HaLog {
        HaLog::open_with_max_bytes(path, HA_LOG_MAX_BYTES)
    }

    pub(crate) fn open_with_max_bytes(path: &Path, max_bytes: u64) -> HaLog {
        let mut rotated_name = path.file_name().unwrap_or_default().to_os_string();
        rotated_name.push(".1");
        let mut log = HaLog {
            path: path.to_path_buf(),
            rotated_path: path.with_file_name(rotated_name),
            max_bytes,
            file: None,
            size_bytes: 0,
        };
        log.reopen();
        log
    }

    /// Writes one event line stamped with the current time.
    pub fn event(&mut self, code: HaCode, text: &str) {
        self.event_at(SystemTime::now(), code, text);
    }

    pub(crate) fn event_at(&mut self, time: SystemTime, code: HaCode, text: &str) {
        // One line per event, whatever the text holds (a command line may contain newlines).
        let text = text.replace(['\n', '\r'], " ");
        let line = format!("{} {} {}\n", format_utc_millis(time), code.as_str(), text);
        eprint!("outpost-ha: {line}");

        if self.size_bytes > 0 && self.size_bytes + line.len() as u64 > self.max_bytes {
            self.rotate();
        }
        if self.file.is_none() {
            self.reopen();
        }
        let Some(file) = self.file.as_mut() else {
            return; // reopen() already said why on stderr
        };
        match file.write_all(line.as_bytes()) {
            Ok(()) => self.size_bytes += line.len() as u64,
            Err(error) => {
                eprintln!("outpost-ha: cannot write {}: {error}", self.path.display());
                self.file = None;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        if let Err(error) = fs::rename(&self.path, &self.rotated_path) {
            eprintln!(
                "outpost-ha: cannot rotate {} to {}: {error}",
                self.path.display(),
                self.rotated_path.display()
            );
        }
        self.reopen();
    }

    fn reopen(&mut self) {
        if let Some(parent) = self.path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            // The data directory may not exist yet: the node creates it, but it has not run yet.
            if let Err(error) = fs::create_dir_all(parent) {
                eprintln!("outpost-ha: cannot create {}: {error}", parent.display());
            }
        }
        match OpenOptions::new().create(true).append(true).open(&self.path) {
            Ok(file) => {
                self.size_bytes = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
                self.file = Some(file);
            }
            Err(error) => {
                eprintln!("outpost-ha: cannot open {}: {error}", self.path.display());
                self.file = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn writes_one_formatted_line_per_event_and_appends_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join(HA_LOG_FILE_NAME);
        let time = UNIX_EPOCH + Duration::from_millis(1_795_323_662_123);

        let mut log = HaLog::open(&path);
        log.event_at(time, HaCode::ChildStarted, "child started pid=1234");
        drop(log);
        let mut log = HaLog::open(&path);
        log.event_at(time, HaCode::ChildEnded, "child ended\nsignal=SIGKILL");

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "2026-11-22T05:01:02.123Z HA04 child started pid=1234\n\
             2026-11-22T05:01:02.123Z HA07 child ended signal=SIGKILL\n"
        );
    }

    #[test]
    fn rotates_to_dot_one_keeping_a_single_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HA_LOG_FILE_NAME);
        let rotated = dir.path().join("outpost_ha.log.1");
        let line_bytes = "1970-01-01T00:00:00.000Z HA02 watcher pid=00001\n".len() as u64;
        let mut log = HaLog::open_with_max_bytes(&path, 3 * line_bytes);

        for pid in 1..=7 {
            log.event_at(UNIX_EPOCH, HaCode::WatcherPid, &format!("watcher pid={pid:05}"));
            let size = fs::metadata(&path).unwrap().len();
            assert!(size <= 3 * line_bytes, "current log grew to {size} bytes");
        }

        // Lines 1-3 went to .1, then were replaced by lines 4-6; line 7 is current.
        let current = fs::read_to_string(&path).unwrap();
        let old = fs::read_to_string(&rotated).unwrap();
        assert!(current.contains("pid=00007") && current.lines().count() == 1, "{current}");
        assert!(old.contains("pid=00004") && old.contains("pid=00006"), "{old}");
        assert!(!old.contains("pid=00001"), "{old}");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 2, "only the log and one old file");
    }

    #[test]
    fn every_code_has_its_contract_number() {
        let codes = [
            HaCode::LogOpened,
            HaCode::WatcherPid,
            HaCode::ChildCommandLine,
            HaCode::ChildStarted,
            HaCode::WaitingForReadiness,
            HaCode::ChildReady,
            HaCode::ChildEnded,
            HaCode::Restarting,
            HaCode::RestartLimitReached,
            HaCode::StopRequested,
        ];
        for (index, code) in codes.into_iter().enumerate() {
            assert_eq!(code.as_str(), format!("HA{:02}", index + 1));
        }
    }
}
