//! The durable message store of a node: per-queue append-only logs with gapless sequence numbers,
//! idempotency keys and a byte quota, on embedded SQLite.
//!
//! # Design constraints
//!
//! - **An acknowledgement means fsynced.** Every append resolves only after the SQLite transaction
//!   holding it has committed with `synchronous=FULL` in WAL mode, i.e. after the WAL was fsynced.
//! - **One writer, group commit.** A single thread ([`writer`]) owns the only write connection. It
//!   blocks for the first pending operation, then takes every operation that arrived meanwhile (up to
//!   [`MAX_OPS_PER_COMMIT`] / [`MAX_BYTES_PER_COMMIT`]) into the same transaction. Writes arriving
//!   while a commit is in flight therefore join the next one, and N concurrent clients cost one fsync
//!   per group, not one each.
//! - **Gapless per-queue sequences.** Only the writer assigns `seq`, always `last_seq + 1`, and a
//!   queue's `last_seq` is stored in the same transaction as its messages, so a crash can neither
//!   leave a gap nor reuse a number. Messages are released only as a prefix of a queue; at open the
//!   store checks that what is left is contiguous and refuses to start if not.
//! - **Several readers per queue.** A reader (the upstream forwarder, a route, a pull consumer) has a
//!   durable cursor row; storage is released up to the lowest cursor.
//! - **Reads never block the writer.** Readers use their own connections (WAL allows readers beside
//!   the writer) from a small pool, on the caller's blocking thread.
//!
//! # On-disk format (schema version 3)
//!
//! `<data_dir>/outpost.db` (SQLite, WAL, `synchronous=FULL`), `<data_dir>/outpost.lock` (held with an
//! exclusive `flock` by the running node: a second node on the same directory exits with code 3).
//!
//! ```text
//! meta(key TEXT PRIMARY KEY, value TEXT)            schema_version, created_at_ms
//! queues(queue_id INTEGER PRIMARY KEY, name TEXT UNIQUE, last_seq INTEGER)
//!                                                   last_seq: the highest seq ever assigned
//! messages(queue_id, seq, id TEXT, origin TEXT, origin_seq INTEGER, content_type TEXT,
//!          accepted_at_ms INTEGER, payload BLOB, PRIMARY KEY(queue_id, seq))
//! idempotency_keys(queue_id, key TEXT, seq, id TEXT, created_at_ms, PRIMARY KEY(queue_id, key))
//! cursors(queue_id, reader TEXT, acked_seq INTEGER, PRIMARY KEY(queue_id, reader))
//! origin_positions(origin TEXT, queue_id, last_origin_seq INTEGER, PRIMARY KEY(origin, queue_id))
//!                                                   central: highest edge seq stored per (edge, queue)
//! documents(key TEXT PRIMARY KEY, value TEXT, updated_at_ms)
//!                                                   small JSON documents: offline log, edge registry,
//!                                                   route modes (`route:<name>`)
//! failed(id INTEGER PRIMARY KEY AUTOINCREMENT, route, queue, seq, message_id, origin, origin_seq,
//!        content_type, accepted_at_ms, payload BLOB, attempts, reason, last_error,
//!        first_failed_at_ms, last_failed_at_ms, status TEXT)   (version 3)
//!                                                   copies of messages a route gave up on; status
//!                                                   `failed` or `resubmitted` (see [`failed`])
//! ```
//!
//! Migrations are numbered; `meta.schema_version` records the last one applied, and a store written
//! by a newer outpost is refused rather than misread.

pub mod failed;
mod schema;
mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot, watch};

pub use failed::{FailedEntry, FailedQuery, FailedSelector, FailedStatus, NewFailure, ResubmitOutcome};
pub use writer::{MAX_BYTES_PER_COMMIT, MAX_OPS_PER_COMMIT};

/// How many write operations may wait for the writer before callers wait to enqueue.
pub const WRITE_QUEUE_CAPACITY: usize = 8192;
/// How many read connections the store keeps open.
pub const READ_POOL_SIZE: usize = 4;
/// The most messages one read returns.
pub const MAX_READ_LIMIT: usize = 10_000;

/// What can go wrong in the store. Variants that decide a client's answer are distinct; the rest is
/// an internal failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {0} is in use by another running outpost node (its lock file is held)")]
    DirectoryInUse(PathBuf),
    #[error(
        "store quota reached: {used_bytes} of {limit_bytes} bytes in use and this write needs \
         {needed_bytes} more; raise limits.max_store_bytes or let the backlog drain"
    )]
    QuotaReached { used_bytes: u64, needed_bytes: u64, limit_bytes: u64 },
    #[error("the disk holding the store is full: {0}")]
    DiskFull(String),
    #[error("the store is shutting down")]
    Closed,
    #[error(
        "the store was written by a newer outpost (schema version {found}, this build knows up to \
         {supported}); run the newer outpost or restore a backup"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("the commit failed and every write in it was refused: {0}")]
    CommitFailed(String),
    #[error("invalid write: {0}")]
    Invalid(String),
    #[error("store corrupted: {0}")]
    Corrupt(String),
    #[error("cannot open the data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    fn from_sqlite(error: rusqlite::Error) -> StoreError {
        match &error {
            rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DiskFull => {
                StoreError::DiskFull(error.to_string())
            }
            _ => StoreError::Sqlite(error),
        }
    }
}

/// A message as a client handed it in.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub payload: Bytes,
    pub content_type: String,
    /// On a central: the edge that accepted the message and its seq there.
    pub origin: Option<(String, u64)>,
    /// A message id given by whoever accepted the message first (the edge); a new one when `None`.
    pub id: Option<String>,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    pub queue: String,
    pub seq: u64,
    pub origin: String,
    pub origin_seq: u64,
    pub content_type: String,
    pub accepted_at_ms: i64,
    pub payload: Bytes,
}

/// The outcome of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The ids of the appended messages, in order.
    pub ids: Vec<String>,
    /// True when the idempotency key was seen before: nothing was stored, the ids and seqs are
    /// those of the original write.
    pub duplicate: bool,
}

/// The outcome of storing an edge's batch on a central.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginAppended {
    /// Highest origin seq of this (origin, queue) now stored.
    pub stored_through: u64,
    pub stored: u64,
    /// Messages already stored before, dropped.
    pub duplicates: u64,
    /// `Some(seq)`: nothing was stored because the batch started after a gap; resend from `seq`.
    pub gap_expected_seq: Option<u64>,
}

/// A queue's current size, as the writer last committed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    /// The seq of the oldest stored message; `last_seq + 1` when the queue is empty.
    pub first_seq: u64,
    /// The highest seq ever assigned in this queue (0: none yet).
    pub last_seq: u64,
    pub oldest_accepted_at_ms: Option<i64>,
}

/// Which readers must be done with a queue's message before it is released.
pub type ReadersOf = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// Settings of a store.
#[derive(Clone)]
pub struct StoreOptions {
    /// Appends that would take the stored payload bytes over this get [`StoreError::QuotaReached`].
    pub max_store_bytes: u64,
    /// This node's id: the `origin` of messages accepted here.
    pub node_id: String,
    /// The readers every message of a queue must reach before its storage is released (on an edge:
    /// the upstream forwarder and the queue's routes). A queue with none keeps its messages.
    pub readers_of: ReadersOf,
}

impl StoreOptions {
    /// Options whose queues have no required readers: nothing is ever released.
    pub fn keep_everything(max_store_bytes: u64, node_id: &str) -> StoreOptions {
        StoreOptions { max_store_bytes, node_id: node_id.to_string(), readers_of: Arc::new(|_| Vec::new()) }
    }
}

/// Called by the writer after each commit with its duration and how many operations it carried.
pub type CommitObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// A handle to an open store. Cheap to clone; every clone talks to the same writer thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    ops: mpsc::Sender<writer::Op>,
    // Written by the writer after each commit. Readers (status, metrics, the queue list, the link)
    // need a consistent, cheap view without querying SQLite.
    views: Arc<writer::Views>,
    commits: watch::Receiver<u64>,
    readers: Mutex<Vec<Connection>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    // Held for the life of the store: the flock on outpost.lock is released when it is dropped.
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`: takes the directory lock, migrates the
    /// schema, checks every queue for gaps and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        options: StoreOptions,
        observer: Option<CommitObserver>,
    ) -> Result<Store, StoreError> {
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
        let mut conn = open_connection(&path, false)?;
        schema::migrate(&mut conn)?;
        let mut readers = Vec::with_capacity(READ_POOL_SIZE);
        for _ in 0..READ_POOL_SIZE {
            readers.push(open_connection(&path, true)?);
        }

        let views = Arc::new(writer::Views::default());
        let (commits_tx, commits) = watch::channel(0);
        let (ops_tx, ops_rx) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let writer = writer::Writer::new(conn, options, views.clone(), commits_tx, observer)?;
        let thread = std::thread::Builder::new()
            .name("outpost-writer".into())
            .spawn(move || writer.run(ops_rx))
            .map_err(io)?;

        Ok(Store {
            inner: Arc::new(Inner {
                path,
                ops: ops_tx,
                views,
                commits,
                readers: Mutex::new(readers),
                writer_thread: Mutex::new(Some(thread)),
                _lock: lock,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends messages to a queue atomically: all are stored, or none. Resolves once they are on
    /// stable storage. With an `idempotency_key` seen before on this queue, stores nothing and returns
    /// the original write's ids and seqs with `duplicate = true`.
    pub async fn append(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
        idempotency_key: Option<String>,
    ) -> Result<Appended, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Op::Append { queue: queue.to_string(), messages, idempotency_key, reply }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores an edge's consecutive messages of one queue on a central, each (origin, queue, seq)
    /// once: already-stored ones are counted as duplicates, and a batch that starts after a gap
    /// stores nothing and says where to resume.
    pub async fn append_from_origin(
        &self,
        queue: &str,
        origin: &str,
        messages: Vec<outpost_core::wire::BatchMessage>,
    ) -> Result<OriginAppended, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Op::AppendFromOrigin {
            queue: queue.to_string(),
            origin: origin.to_string(),
            messages,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Highest seq of `queue` from `origin` stored here (0: none).
    pub fn origin_position(&self, origin: &str, queue: &str) -> u64 {
        let positions = self.inner.views.origin_positions.read().expect("views lock poisoned");
        positions.get(&(origin.to_string(), queue.to_string())).copied().unwrap_or(0)
    }

    /// Every queue's position for `origin`.
    pub fn origin_positions(&self, origin: &str) -> BTreeMap<String, u64> {
        let positions = self.inner.views.origin_positions.read().expect("views lock poisoned");
        positions.iter().filter(|((o, _), _)| o == origin).map(|((_, q), seq)| (q.clone(), *seq)).collect()
    }

    /// Resolves after the next commit that changed data (for waiters on positions or cursors).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.clone()
    }

    /// Records durably that `reader` is done with `queue` through `acked_seq`, and releases the
    /// messages every required reader is done with.
    pub async fn advance_cursor(&self, queue: &str, reader: &str, acked_seq: u64) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Op::AdvanceCursor {
            queue: queue.to_string(),
            reader: reader.to_string(),
            acked_seq,
            reply,
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Where `reader` is in `queue` (0: it has taken nothing yet).
    pub fn cursor(&self, queue: &str, reader: &str) -> u64 {
        let cursors = self.inner.views.cursors.read().expect("views lock poisoned");
        cursors.get(&(queue.to_string(), reader.to_string())).copied().unwrap_or(0)
    }

    /// Stores a small document durably under `key` (replacing any previous value).
    pub async fn put_document(&self, key: &str, value: String) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Op::PutDocument { key: key.to_string(), value, reply }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Every document whose key starts with `prefix`, by key. Blocking, like [`Store::read_blocking`].
    pub fn documents_blocking(&self, prefix: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let conn = self.take_reader()?;
        let result = (|| {
            let mut stmt = conn.prepare_cached(
                "SELECT key, value FROM documents WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key",
            )?;
            let rows = stmt.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<BTreeMap<_, _>, _>>()
        })();
        self.inner.readers.lock().expect("reader pool poisoned").push(conn);
        result.map_err(StoreError::from_sqlite)
    }

    /// Async wrapper of [`Store::documents_blocking`].
    pub async fn documents(&self, prefix: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || store.documents_blocking(&prefix))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Confirms the writer thread is alive and committing: a no-op round trip through it.
    pub async fn ping_writer(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Op::Ping { reply }).await?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    async fn send(&self, op: writer::Op) -> Result<(), StoreError> {
        self.inner.ops.send(op).await.map_err(|_| StoreError::Closed)
    }

    /// Every queue's size as of the last commit, by name.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.inner.views.stats.read().expect("views lock poisoned").values().cloned().collect()
    }

    /// One queue's size, if the queue exists.
    pub fn queue(&self, name: &str) -> Option<QueueStats> {
        self.inner.views.stats.read().expect("views lock poisoned").get(name).cloned()
    }

    /// Reads up to `limit` messages of `queue` with `seq > after_seq`, in order. Blocking: call it
    /// from a blocking thread (e.g. `tokio::task::spawn_blocking`).
    pub fn read_blocking(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let limit = limit.min(MAX_READ_LIMIT);
        let conn = self.take_reader()?;
        let result = read_messages(&conn, queue, after_seq, limit);
        self.inner.readers.lock().expect("reader pool poisoned").push(conn);
        result
    }

    /// Async wrapper of [`Store::read_blocking`].
    pub async fn read(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let store = self.clone();
        let queue = queue.to_string();
        tokio::task::spawn_blocking(move || store.read_blocking(&queue, after_seq, limit))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    fn take_reader(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.inner.readers.lock().expect("reader pool poisoned").pop() {
            return Ok(conn);
        }
        // Every pooled connection is busy: open a temporary one rather than queue behind them.
        open_connection(&self.inner.path, true)
    }

    /// Stops the writer after it has committed every operation already queued, and waits for it.
    /// Operations sent afterwards fail with [`StoreError::Closed`].
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(writer::Op::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.inner.writer_thread.lock().expect("writer handle poisoned").take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(StoreError::from_sqlite)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    if !read_only {
        // WAL + FULL: a commit returns only after the WAL is fsynced, so an acknowledged write
        // survives power loss; readers work beside the writer.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "cannot switch {} to WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA journal_size_limit=67108864;",
        )?;
    }
    Ok(conn)
}

fn read_messages(
    conn: &Connection,
    queue: &str,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.seq, m.id, m.origin, m.origin_seq, m.content_type, m.accepted_at_ms, m.payload
         FROM messages m JOIN queues q ON q.queue_id = m.queue_id
         WHERE q.name = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![queue, after_seq as i64, limit as i64], |row| {
        Ok(StoredMessage {
            seq: row.get::<_, i64>(0)? as u64,
            id: row.get(1)?,
            queue: queue.to_string(),
            origin: row.get(2)?,
            origin_seq: row.get::<_, i64>(3)? as u64,
            content_type: row.get(4)?,
            accepted_at_ms: row.get(5)?,
            payload: Bytes::from(row.get::<_, Vec<u8>>(6)?),
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from_sqlite)
}
