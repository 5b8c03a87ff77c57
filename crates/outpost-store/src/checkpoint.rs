//! WAL checkpoints beside the SQLite writer instead of inside its commits.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses `wal_autocheckpoint`: that
//! commit's writes are acknowledged only after every page in the WAL was copied into the database
//! and the database fsynced, and no other group commits meanwhile. Here the writer connection has
//! no automatic checkpoint (its WAL hook, which SQLite calls after each commit, only records how
//! many frames the WAL holds), and:
//!
//! - once the WAL holds half its bound, a thread with a connection of its own runs a PASSIVE
//!   checkpoint, which copies what is committed into the database while the writer goes on
//!   committing (again, while frames written meanwhile are many);
//! - when that pass is done and only a few frames came after it, the writer checkpoints those
//!   itself between two groups. The WAL is then wholly in the database, and SQLite starts it over
//!   from its beginning at the next commit (the writer's `journal_size_limit` truncates it);
//! - the bound still holds as before: a commit that leaves the WAL at or past the bound (e.g. the
//!   checkpoints fell behind, or a reader keeps old frames in use) is followed by a checkpoint on
//!   the writer, which first waits for a running background pass. That is what the automatic
//!   checkpoint did, one commit later; the WAL never holds more than the bound plus one group.
//!
//! A commit is still acknowledged only after SQLite fsynced its WAL frames (`synchronous=FULL`):
//! checkpoints only move what is already durable in the WAL into the database file.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;

use crate::StoreError;

/// How often a writer waiting for a background pass checks that the checkpoint thread still lives.
const DEAD_THREAD_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// What the background checkpointer is doing, shared with the writer.
enum Pass {
    Idle,
    /// The writer asked for a pass.
    Wanted,
    Running,
    /// A pass finished: it copied the WAL through this frame (0: it could not run).
    Done {
        checkpointed: u64,
    },
    Stop,
}

struct Shared {
    pass: Mutex<Pass>,
    changed: Condvar,
}

/// The writer's side: the frame count its WAL hook keeps, and the background checkpointer.
pub(crate) struct Checkpoints {
    /// The WAL's bound, in frames (pages).
    limit_frames: u64,
    /// Frames in the WAL after the writer connection's last commit, set by its WAL hook.
    frames: Arc<AtomicU64>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpoints {
    /// Replaces the automatic checkpoint of `writer` (the write connection of the database at
    /// `path`, whose WAL is bounded to `wal_limit_bytes`) and starts the background checkpointer.
    /// The returned value must be dropped after `writer` is closed (the WAL hook points into it).
    pub(crate) fn start(
        writer: &Connection,
        path: &Path,
        wal_limit_bytes: u64,
    ) -> Result<Checkpoints, StoreError> {
        let page_size: i64 = writer.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let limit_frames = (wal_limit_bytes / page_size.max(512) as u64).max(1);
        let checkpointer = crate::sqlite::open_connection(path, false)?;
        let shared = Arc::new(Shared { pass: Mutex::new(Pass::Idle), changed: Condvar::new() });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("outpost-checkpoint".into())
                .spawn(move || run_checkpointer(checkpointer, &shared))
                .map_err(|source| StoreError::Io { path: path.to_path_buf(), source })?
        };
        let frames = Arc::new(AtomicU64::new(0));
        // SAFETY: the hook only reads the `AtomicU64` behind the pointer, which lives as long as
        // `self.frames` (the caller drops the connection first, see above); the hook runs on the
        // thread that commits, and stores only.
        unsafe {
            rusqlite::ffi::sqlite3_wal_hook(
                writer.handle(),
                Some(record_frames),
                Arc::as_ptr(&frames) as *mut std::ffi::c_void,
            );
        }
        Ok(Checkpoints { limit_frames, frames, shared, thread: Some(thread) })
    }

    /// Called by the writer after each of its commits, between groups.
    pub(crate) fn after_commit(&mut self, writer: &Connection) {
        let frames = self.frames.load(Ordering::Relaxed);
        if frames >= self.limit_frames {
            // The bound: as the automatic checkpoint did, but after the group was answered.
            self.wait_idle();
            self.checkpoint_here(writer);
            return;
        }
        let mut pass = self.shared.pass.lock().expect("checkpoint lock poisoned");
        match *pass {
            Pass::Wanted | Pass::Running | Pass::Stop => {}
            Pass::Done { checkpointed } => {
                *pass = Pass::Idle;
                drop(pass);
                if frames.saturating_sub(checkpointed) <= self.limit_frames / 8 {
                    // Only what came during the pass is left: copy it here, so the WAL restarts.
                    self.checkpoint_here(writer);
                } else {
                    self.want_pass();
                }
            }
            Pass::Idle => {
                if frames >= self.limit_frames / 2 {
                    *pass = Pass::Wanted;
                    self.shared.changed.notify_all();
                }
            }
        }
    }

    /// Waits until no background pass runs (e.g. before a TRUNCATE checkpoint on a full disk).
    /// A checkpointer thread that died (it never should) counts as idle, so the writer never waits
    /// on it for good: the checkpoint at the bound then runs on the writer alone.
    pub(crate) fn wait_idle(&self) {
        let mut pass = self.shared.pass.lock().expect("checkpoint lock poisoned");
        while matches!(*pass, Pass::Wanted | Pass::Running) {
            if self.thread.as_ref().is_none_or(|thread| thread.is_finished()) {
                tracing::error!("the WAL checkpoint thread is gone: checkpoints run on the writer only");
                *pass = Pass::Stop;
                return;
            }
            pass = self
                .shared
                .changed
                .wait_timeout(pass, DEAD_THREAD_CHECK)
                .expect("checkpoint lock poisoned")
                .0;
        }
        if matches!(*pass, Pass::Done { .. }) {
            *pass = Pass::Idle;
        }
    }

    fn want_pass(&self) {
        let mut pass = self.shared.pass.lock().expect("checkpoint lock poisoned");
        if matches!(*pass, Pass::Idle) {
            *pass = Pass::Wanted;
            self.shared.changed.notify_all();
        }
    }

    /// A PASSIVE checkpoint on the writer connection: with no other writer and no background pass
    /// it copies every frame no reader still needs, as the automatic checkpoint did.
    fn checkpoint_here(&self, writer: &Connection) {
        if let Err(e) = writer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("WAL checkpoint failed: {e}");
        }
        // Until the next commit tells (the WAL starts over then, or goes on if a reader still
        // needed frames), nothing more is due.
        self.frames.store(0, Ordering::Relaxed);
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        *self.shared.pass.lock().expect("checkpoint lock poisoned") = Pass::Stop;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer connection's WAL hook: SQLite calls it after each commit with the WAL's frame count.
unsafe extern "C" fn record_frames(
    frames: *mut std::ffi::c_void,
    _db: *mut rusqlite::ffi::sqlite3,
    _name: *const std::ffi::c_char,
    count: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: `frames` is the `AtomicU64` given in `Checkpoints::start`, alive while the hook is.
    let frames = unsafe { &*(frames as *const AtomicU64) };
    frames.store(count.max(0) as u64, Ordering::Relaxed);
    rusqlite::ffi::SQLITE_OK
}

/// The background checkpointer: one PASSIVE checkpoint per request, on its own connection.
fn run_checkpointer(conn: Connection, shared: &Shared) {
    loop {
        {
            let mut pass = shared.pass.lock().expect("checkpoint lock poisoned");
            loop {
                match *pass {
                    Pass::Wanted => break,
                    Pass::Stop => return,
                    _ => pass = shared.changed.wait(pass).expect("checkpoint lock poisoned"),
                }
            }
            *pass = Pass::Running;
        }
        // (busy, frames in the WAL, frames copied into the database)
        let checkpointed = match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(2))
        {
            Ok(frames) => frames.max(0) as u64,
            Err(e) => {
                tracing::warn!("background WAL checkpoint failed: {e}");
                0
            }
        };
        let mut pass = shared.pass.lock().expect("checkpoint lock poisoned");
        if matches!(*pass, Pass::Stop) {
            return;
        }
        *pass = Pass::Done { checkpointed };
        shared.changed.notify_all();
    }
}
