//! The embedded backend: one SQLite database in the data directory (WAL, `synchronous=FULL`), the
//! directory lock, a small pool of read connections, and the writer thread of [`crate::writer`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::{mpsc, watch};

use crate::ops::{Op, Views};
use crate::{schema, writer, CommitObserver, StoreError, StoreOptions, StoredMessage, READ_POOL_SIZE};

pub(crate) struct Sqlite {
    pub(crate) path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    // Held for the life of the store: the flock on outpost.lock is released when it is dropped.
    _lock: File,
}

impl Sqlite {
    /// Takes the directory lock, migrates, and starts the writer thread on `ops`.
    pub(crate) fn open(
        data_dir: &Path,
        options: StoreOptions,
        views: Arc<Views>,
        commits: watch::Sender<u64>,
        observer: Option<CommitObserver>,
        ops: mpsc::Receiver<Op>,
    ) -> Result<(Sqlite, std::thread::JoinHandle<()>), StoreError> {
        let io = |source| StoreError::Io { path: data_dir.to_path_buf(), source };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(data_dir.join("outpost.lock"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::DirectoryInUse(data_dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }

        let path = data_dir.join("outpost.db");
        let wal_limit_bytes = wal_limit_bytes(data_dir, options.max_store_bytes);
        let mut conn = open_connection(&path, false)?;
        bound_the_wal(&conn, wal_limit_bytes)?;
        schema::migrate(&mut conn)?;
        let mut readers = Vec::with_capacity(READ_POOL_SIZE);
        for _ in 0..READ_POOL_SIZE {
            readers.push(open_connection(&path, true)?);
        }
        // A release deletes at most a quarter of the WAL's bound per transaction, so even a disk
        // with no room left can release what it forwarded (see `writer::release_chunk`).
        // New messages leave twice the WAL's bound free: room for a checkpoint to move the WAL into
        // the database and for releases, so a full disk can always drain.
        let disk = writer::DiskBounds {
            data_dir: data_dir.to_path_buf(),
            release_chunk_bytes: wal_limit_bytes / 4,
            reserve_bytes: 2 * wal_limit_bytes,
        };
        // Checkpoints beside the writer rather than inside its commits, within the same bound.
        let checkpoints = crate::checkpoint::Checkpoints::start(&conn, &path, wal_limit_bytes)?;
        let writer = writer::Writer::new(conn, checkpoints, options, views, commits, observer, disk)?;
        let thread = std::thread::Builder::new()
            .name("outpost-writer".into())
            .spawn(move || writer.run(ops))
            .map_err(io)?;
        Ok((Sqlite { path, readers: Mutex::new(readers), _lock: lock }, thread))
    }

    /// Runs `f` on a pooled read connection (a temporary one when every pooled one is busy).
    pub(crate) fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = match self.readers.lock().expect("reader pool poisoned").pop() {
            Some(conn) => conn,
            // Every pooled connection is busy: open a temporary one rather than queue behind them.
            None => open_connection(&self.path, true)?,
        };
        let result = f(&conn);
        let mut pool = self.readers.lock().expect("reader pool poisoned");
        if pool.len() < READ_POOL_SIZE {
            pool.push(conn);
        }
        result
    }

    pub(crate) fn documents(&self, prefix: &str) -> Result<BTreeMap<String, String>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, value FROM documents WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
            )?;
            let rows = stmt.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<BTreeMap<_, _>, _>>().map_err(StoreError::from_sqlite)
        })
    }

    pub(crate) fn read(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.with_reader(|conn| read_messages(conn, queue, after_seq, limit, max_bytes))
    }
}

pub(crate) fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(StoreError::from_sqlite)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    if !read_only {
        // 64 KiB pages (only a new database takes them; an existing one keeps its page size): a
        // group of thousands of rows dirties far fewer pages, which halved the writer's time per
        // batch in bench/experiments (1.9-2.6x batch ingest, single messages unchanged).
        conn.execute_batch("PRAGMA page_size=65536;")?;
        // WAL + FULL: a commit returns only after the WAL is fsynced, so an acknowledged write
        // survives power loss; readers work beside the writer.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot switch {} to WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF;")?;
    }
    Ok(conn)
}

/// The most the write-ahead log may hold between checkpoints: 1/16 of the smaller of the quota
/// (`limits.max_store_bytes`) and the filesystem holding the data directory, between 1 MiB and
/// 64 MiB. SQLite's default (1,000 pages, 62.5 MiB with 64 KiB pages) filled a 64 MiB disk with
/// WAL alone, and then nothing could be released.
pub(crate) fn wal_limit_bytes(data_dir: &Path, max_store_bytes: u64) -> u64 {
    const MIN_WAL_BYTES: u64 = 1 << 20;
    const MAX_WAL_BYTES: u64 = 64 << 20;
    let filesystem_bytes = filesystem_size_bytes(data_dir).unwrap_or(u64::MAX);
    (max_store_bytes.min(filesystem_bytes) / 16).clamp(MIN_WAL_BYTES, MAX_WAL_BYTES)
}

/// The size of the filesystem holding `path` (`statvfs`); `None` when it cannot be read.
fn filesystem_size_bytes(path: &Path) -> Option<u64> {
    statvfs(path).map(|(size, _)| size)
}

/// The space an unprivileged process may still take on the filesystem holding `path`.
pub(crate) fn filesystem_free_bytes(path: &Path) -> Option<u64> {
    statvfs(path).map(|(_, free)| free)
}

/// (size, available) of the filesystem holding `path`.
fn statvfs(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` writes only into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    let block = stat.f_frsize as u64;
    Some(((stat.f_blocks as u64).saturating_mul(block), (stat.f_bavail as u64).saturating_mul(block)))
}

/// Checkpoints once the WAL holds `wal_limit_bytes`, and truncates it back to that size after
/// each checkpoint (a large transaction may grow it past the bound for its own duration). The
/// writer then replaces the automatic checkpoint with [`crate::checkpoint`], within the same bound.
fn bound_the_wal(conn: &Connection, wal_limit_bytes: u64) -> Result<(), StoreError> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages = (wal_limit_bytes / page_size.max(512) as u64).max(1);
    conn.execute_batch(&format!(
        "PRAGMA wal_autocheckpoint={pages}; PRAGMA journal_size_limit={wal_limit_bytes};"
    ))?;
    Ok(())
}

/// A message of `queue` from the columns `seq, id, origin, origin_seq, content_type, accepted_at_ms,
/// payload`.
pub(crate) fn message_from_row(queue: &str, r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        seq: r.get::<_, i64>(0)? as u64,
        id: r.get(1)?,
        queue: queue.to_string(),
        origin: r.get(2)?,
        origin_seq: r.get::<_, i64>(3)? as u64,
        content_type: r.get(4)?,
        accepted_at_ms: r.get(5)?,
        payload: Bytes::from(r.get::<_, Vec<u8>>(6)?),
    })
}

fn read_messages(
    conn: &Connection,
    queue: &str,
    after_seq: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.seq, m.id, m.origin, m.origin_seq, m.content_type, m.accepted_at_ms, m.payload
         FROM messages m JOIN queues q ON q.queue_id = m.queue_id
         WHERE q.name = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![queue, after_seq as i64, limit as i64])?;
    let (mut messages, mut bytes) = (Vec::new(), 0usize);
    while let Some(row) = rows.next()? {
        let message = message_from_row(queue, row)?;
        bytes = bytes.saturating_add(message.payload.len());
        if bytes > max_bytes && !messages.is_empty() {
            break;
        }
        messages.push(message);
    }
    Ok(messages)
}
