//! Re-reading TLS files without a restart: on SIGHUP, and when a file's modification time, size or
//! inode changes (checked every `interval`). A setting whose new files fail to load keeps the old
//! one and logs an ERROR once per change; open connections are never touched, new ones use the new
//! setting.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::TlsError;

/// A TLS setting read from files.
pub trait Reloadable: Send + Sync {
    /// The files it reads.
    fn files(&self) -> Vec<PathBuf>;
    /// Reads the files again; on an error the setting in use stays.
    fn reload(&self) -> Result<(), TlsError>;
    /// Its configuration section, for the log.
    fn name(&self) -> String;
}

/// What identifies a file's version without reading it.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(file: &PathBuf) -> Stamp {
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// Watches `settings` until the runtime ends.
pub fn spawn_reloader(settings: Vec<Arc<dyn Reloadable>>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(
                    "cannot install a SIGHUP handler, TLS files are re-read only when they change: {e}"
                );
                None
            }
        };
        let mut stamps: Vec<Vec<Stamp>> =
            settings.iter().map(|s| s.files().iter().map(stamp).collect()).collect();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = ticker.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            };
            if forced {
                tracing::info!("SIGHUP: re-reading the TLS files");
            }
            for (setting, old) in settings.iter().zip(stamps.iter_mut()) {
                let now: Vec<Stamp> = setting.files().iter().map(stamp).collect();
                if !forced && now == *old {
                    continue;
                }
                *old = now;
                match setting.reload() {
                    Ok(()) => tracing::info!(
                        section = %setting.name(),
                        "TLS files re-read: new connections use them (open ones are kept)"
                    ),
                    Err(e) => tracing::error!(
                        section = %setting.name(),
                        "{e}; keeping the certificates in use until the file is fixed"
                    ),
                }
            }
        }
    })
}
