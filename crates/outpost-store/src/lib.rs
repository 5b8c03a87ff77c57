//! The durable message store of a node: per-queue append-only logs with gapless sequence numbers,
//! idempotency keys, reader cursors, a byte quota, small documents and failed messages, behind one
//! [`Store`] API over two backends: embedded SQLite (every edge, and a central by default) and
//! PostgreSQL (a central with `postgres = "postgres://…"`: every central on the same database is
//! one cluster). Nothing above the store knows which backend it has.
//!
//! # Design constraints
//!
//! - **An acknowledgement means durable.** Every write resolves only after the transaction holding
//!   it has committed: SQLite in WAL mode with `synchronous=FULL` (the WAL was fsynced), PostgreSQL
//!   with `synchronous_commit=on` (the server flushed its WAL).
//! - **One writer per node, group commit.** A single writer owns the writes: on SQLite a thread
//!   ([`writer`]) with the only write connection, on PostgreSQL a task ([`pg::writer`]). It waits
//!   for the first pending operation ([`ops::Op`]), then takes every operation that arrived meanwhile
//!   (up to [`MAX_OPS_PER_COMMIT`] / [`MAX_BYTES_PER_COMMIT`]) into the same transaction. Writes
//!   arriving while a commit is in flight join the next one, and N concurrent clients cost one
//!   fsync per group, not one each.
//! - **Gapless per-queue sequences.** Only a writer assigns `seq`, always `last_seq + 1`, and a
//!   queue's `last_seq` is stored in the same transaction as its messages, so a crash can neither
//!   leave a gap nor reuse a number. On PostgreSQL the queue's row is locked `FOR UPDATE` for the
//!   transaction, which serializes the writers of all centrals on that queue. Messages are
//!   released only as a prefix of a queue; at open the SQLite store checks that what is left is
//!   contiguous and refuses to start if not.
//! - **Exactly once from each edge.** A central stores an edge's batch against the edge's position
//!   `(origin, queue)` in the same transaction; on PostgreSQL that row is locked `FOR UPDATE`, so an
//!   edge that sends the same batch to two centrals (failover mid-batch) gets it stored once.
//!   A skip entry of a batch (`outpost_core::wire::SKIP_CONTENT_TYPE`) moves the position and
//!   stores nothing (an edge's downlink message; a downlink message that expired at the central).
//! - **Several readers per queue.** A reader (the upstream forwarder, a route, a pull consumer) has
//!   a durable cursor; storage is released up to the lowest cursor of the queue's required readers.
//!   A cursor never moves back.
//! - **Cheap sync reads from views.** `queue_stats`, `queue`, `cursor`, `origin_position(s)` read
//!   in-memory views the writer replaces after each commit. On PostgreSQL they also follow the other
//!   centrals' commits through `LISTEN/NOTIFY`; the staleness bound is in [`pg`]: they may trail
//!   another central by a notification round trip, never run ahead of the database.
//! - **Reads never block the writer.** SQLite readers use their own connections (WAL) from a small
//!   pool on the caller's blocking thread; PostgreSQL reads use the connection pool.
//! - **The cluster talks through the store.** [`Store::publish_cluster_event`] /
//!   [`Store::cluster_events`] (NOTIFY `outpost_events`; a loopback on SQLite) tell every central
//!   what one did at once; [`Store::lease`] lets exactly one central of the cluster do a job (a
//!   node alone always holds its leases).
//!
//! # On-disk format, SQLite (schema version 6)
//!
//! `<data_dir>/outpost.db` (SQLite, WAL, `synchronous=FULL`, 64 KiB pages when created), `<data_dir>/outpost.lock` (held with an
//! exclusive `flock` by the running node: a second node on the same directory exits with code 3).
//!
//! ```text
//! meta(key TEXT PRIMARY KEY, value TEXT)            schema_version, created_at_ms
//! queues(queue_id INTEGER PRIMARY KEY, name TEXT UNIQUE, last_seq INTEGER)
//!                                                   the queue's last seq is the larger of last_seq
//!                                                   and its highest stored seq: last_seq is
//!                                                   written when a release empties the queue, not
//!                                                   by every commit (version 6)
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
//! consumers(consumer_id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, name TEXT, head INTEGER,
//!           created_at_ms, last_active_at_ms, UNIQUE(queue, name))          (version 4)
//! consumer_messages(consumer_id, failed_id, seq, deliveries, leased, visible_at_ms,
//!                   PRIMARY KEY(consumer_id, failed_id, seq))               (version 4)
//!                                                   pull consumers and their outstanding messages;
//!                                                   the position is the cursor `consumer:<name>`
//!                                                   (see [`consumers`])
//! ```
//!
//! # PostgreSQL schema
//!
//! The same tables prefixed `outpost_`, with queue sizes (`messages`, `bytes`, `first_seq`, oldest
//! timestamp, a `version`) kept in `outpost_queues` in the same transaction as the messages, cursors
//! and positions keyed by queue name, and `outpost_leases`; see [`pg`]. A PostgreSQL central keeps
//! nothing in its data directory (the HA watcher's log goes there) and takes no directory lock.
//!
//! Migrations are numbered on both backends; `meta.schema_version` (`outpost_meta` on PostgreSQL)
//! records the last one applied, and a store written by a newer outpost is refused rather than
//! misread. On PostgreSQL they run in one transaction under an advisory lock.

mod checkpoint;
pub mod consumers;
mod consumers_sqlite;
pub mod failed;
mod ops;
mod pg;
mod schema;
mod sqlite;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use consumers::{ConsumerView, LeaseRequest, LeasedMessage, Settle, SettleOutcome};
pub use failed::{FailedEntry, FailedQuery, FailedSelector, FailedStatus, NewFailure, ResubmitOutcome};
pub use ops::{MAX_BYTES_PER_COMMIT, MAX_OPS_PER_COMMIT};
pub use pg::{LEASE_RENEW_INTERVAL, LEASE_TTL, MAX_CLUSTER_EVENT_BYTES, PG_POOL_SIZE};

/// `limits.max_queues` when nothing else is said.
pub const DEFAULT_MAX_QUEUES: u64 = 10_000;
/// `limits.idempotency_ttl` when nothing else is said.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// What one remembered idempotency key counts against the quota besides its text (its row).
pub const IDEMPOTENCY_KEY_OVERHEAD_BYTES: u64 = 64;

/// How many write operations may wait for the writer before callers wait to enqueue.
pub const WRITE_QUEUE_CAPACITY: usize = 8192;
/// How many read connections the store keeps open.
pub const READ_POOL_SIZE: usize = 4;
/// The most messages one read returns.
pub const MAX_READ_LIMIT: usize = 10_000;
/// How many cluster events may wait for a slow subscriber before it misses the oldest.
pub const CLUSTER_EVENT_CAPACITY: usize = 1024;

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
    /// Refused: the write would create a queue beyond `limits.max_queues`. Nothing was written.
    #[error(
        "too many queues: this write would create queue {queue:?} and the store already holds \
         {limit} (limits.max_queues); write to an existing queue or raise the limit"
    )]
    TooManyQueues { queue: String, limit: u64 },
    #[error("the disk holding the store is full: {0}")]
    DiskFull(String),
    /// Refused before the disk filled: what is left is kept for checkpoints and releases, so the
    /// node can still drain. Nothing was written.
    #[error(
        "the disk holding the store is nearly full: {room_bytes} bytes are free for messages beyond \
         the reserve kept for checkpoints and releases, and this write needs {needed_bytes}"
    )]
    DiskReserve { room_bytes: u64, needed_bytes: u64 },
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
    #[error("PostgreSQL at {url} cannot be reached: {detail}")]
    Unavailable { url: String, detail: String },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
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
    /// Appends that would take the stored bytes over this get [`StoreError::QuotaReached`]: message
    /// payloads, failed copies and idempotency keys.
    pub max_store_bytes: u64,
    /// Appends that would create a queue beyond this many get [`StoreError::TooManyQueues`].
    pub max_queues: u64,
    /// How long an idempotency key is remembered; older keys are forgotten and pruned.
    pub idempotency_ttl: Duration,
    /// This node's id: the `origin` of messages accepted here.
    pub node_id: String,
    /// The readers every message of a queue must reach before its storage is released (on an edge:
    /// the upstream forwarder and the queue's routes). A queue with none keeps its messages.
    pub readers_of: ReadersOf,
}

impl StoreOptions {
    /// Options whose queues have no required readers: nothing is ever released.
    pub fn keep_everything(max_store_bytes: u64, node_id: &str) -> StoreOptions {
        StoreOptions {
            max_store_bytes,
            max_queues: DEFAULT_MAX_QUEUES,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            node_id: node_id.to_string(),
            readers_of: Arc::new(|_| Vec::new()),
        }
    }
}

/// A lease as its holder sees it (see [`Store::lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Whether this node's last claim succeeded and has not run out since.
    pub held: bool,
    /// When the last successful claim stops counting, by this node's monotonic clock: a renew
    /// interval before another central may take the lease over (`None`: never, on SQLite).
    pub valid_until: Option<Instant>,
}

impl Lease {
    /// The lease of a node that is alone: always held.
    pub const ALWAYS: Lease = Lease { held: true, valid_until: None };
    /// Not held.
    pub const NOT_HELD: Lease = Lease { held: false, valid_until: None };

    /// Held, and not past its end by this node's clock. Checked before anything is done under the
    /// lease, since the receiver is only told about the change a moment later.
    pub fn is_valid(&self) -> bool {
        self.held && self.valid_until.is_none_or(|until| Instant::now() < until)
    }
}

/// Called by the writer after each commit with its duration and how many operations it carried.
pub type CommitObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// A handle to an open store. Cheap to clone; every clone talks to the same writer.
///
/// The same API over two backends: the embedded SQLite store ([`Store::open`]) and PostgreSQL
/// ([`Store::open_postgres`]). Writes go to the backend's single writer as [`ops::Op`]s; the sync
/// reads (`queue_stats`, `cursor`, `origin_position`) are served from in-memory views the writer
/// publishes after each commit (and, on PostgreSQL, the listener refreshes when another central
/// commits); the other reads query the backend.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    ops: mpsc::Sender<ops::Op>,
    // Written by the writer after each commit. Readers (status, metrics, the queue list, the link)
    // need a consistent, cheap view without querying the database.
    views: Arc<ops::Views>,
    commits: watch::Receiver<u64>,
    events: broadcast::Sender<(String, String)>,
    writer_task: std::sync::Mutex<Option<WriterHandle>>,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(pg::Postgres),
}

enum WriterHandle {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl Store {
    /// Opens (creating if needed) the embedded store in `data_dir`: takes the directory lock,
    /// migrates the schema, checks every queue for gaps and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        options: StoreOptions,
        observer: Option<CommitObserver>,
    ) -> Result<Store, StoreError> {
        let views = Arc::new(ops::Views::default());
        let (commits_tx, commits) = watch::channel(0);
        let (ops_tx, ops_rx) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let (backend, thread) =
            sqlite::Sqlite::open(data_dir, options, views.clone(), commits_tx, observer, ops_rx)?;
        Ok(Store {
            inner: Arc::new(Inner {
                backend: Backend::Sqlite(backend),
                ops: ops_tx,
                views,
                commits,
                events: broadcast::channel(CLUSTER_EVENT_CAPACITY).0,
                writer_task: std::sync::Mutex::new(Some(WriterHandle::Thread(thread))),
            }),
        })
    }

    /// Opens the store in the PostgreSQL database at `url` (a central of a cluster: every central
    /// opened on the same database shares its queues, positions, cursors, documents and failed
    /// messages). Runs the migrations (under an advisory lock, so centrals starting together do not
    /// race), loads the views, starts the writer task and the listener that follows the other
    /// centrals' commits and cluster events.
    pub async fn open_postgres(
        url: &str,
        options: StoreOptions,
        observer: Option<CommitObserver>,
    ) -> Result<Store, StoreError> {
        let views = Arc::new(ops::Views::default());
        let (commits_tx, commits) = watch::channel(0);
        let (ops_tx, ops_rx) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        let events = broadcast::channel(CLUSTER_EVENT_CAPACITY).0;
        let (backend, task) =
            pg::Postgres::open(url, options, views.clone(), commits_tx, events.clone(), observer, ops_rx)
                .await?;
        Ok(Store {
            inner: Arc::new(Inner {
                backend: Backend::Postgres(backend),
                ops: ops_tx,
                views,
                commits,
                events,
                writer_task: std::sync::Mutex::new(Some(WriterHandle::Task(task))),
            }),
        })
    }

    /// The database file (SQLite), or an empty path (PostgreSQL).
    pub fn path(&self) -> &Path {
        match &self.inner.backend {
            Backend::Sqlite(sqlite) => &sqlite.path,
            Backend::Postgres(_) => Path::new(""),
        }
    }

    /// True when the store is a PostgreSQL cluster's (for logs and status only: nothing above the
    /// store behaves differently).
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres(_))
    }

    /// Appends messages to a queue atomically: all are stored, or none. Resolves once they are on
    /// stable storage. With an `idempotency_key` seen before on this queue, stores nothing and returns
    /// the original write's ids and seqs with `duplicate = true`.
    pub async fn append(
        &self,
        queue: &str,
        mut messages: Vec<NewMessage>,
        idempotency_key: Option<String>,
    ) -> Result<Appended, StoreError> {
        // New ids here, on the caller's thread (the HTTP handlers run on every core), not on the
        // single writer thread every commit waits for. A duplicate write's ids go unused.
        for message in &mut messages {
            message.id.get_or_insert_with(outpost_core::new_message_id);
        }
        self.call(|reply| ops::Op::Append { queue: queue.to_string(), messages, idempotency_key, reply })
            .await
    }

    /// Stores an edge's consecutive messages of one queue on a central, each (origin, queue, seq)
    /// once: already-stored ones are counted as duplicates, and a batch that starts after a gap
    /// stores nothing and says where to resume. On PostgreSQL this holds cluster-wide.
    pub async fn append_from_origin(
        &self,
        queue: &str,
        origin: &str,
        messages: Vec<outpost_core::wire::BatchMessage>,
    ) -> Result<OriginAppended, StoreError> {
        self.call(|reply| ops::Op::AppendFromOrigin {
            queue: queue.to_string(),
            origin: origin.to_string(),
            messages,
            reply,
        })
        .await
    }

    /// Records that `origin` released `queue` through `through_seq` without forwarding it (its
    /// routes took those messages before it had a central): the position moves there, never back,
    /// and nothing is stored. A queue not seen before is created (empty) like by a write, so
    /// `max_queues` (and a store already past its quota) refuse it, changing nothing. The same on
    /// both backends. Answers the position now held.
    pub async fn record_origin_release(
        &self,
        queue: &str,
        origin: &str,
        through_seq: u64,
    ) -> Result<OriginAppended, StoreError> {
        self.call(|reply| ops::Op::ReleaseFromOrigin {
            queue: queue.to_string(),
            origin: origin.to_string(),
            through_seq,
            reply,
        })
        .await
    }

    /// Highest seq of `queue` from `origin` stored here (0: none). From the views: on PostgreSQL it
    /// may trail another central's commit by the staleness bound of [`pg`]; it never runs ahead.
    pub fn origin_position(&self, origin: &str, queue: &str) -> u64 {
        let positions = self.inner.views.origin_positions.read().expect("views lock poisoned");
        positions.get(&(origin.to_string(), queue.to_string())).copied().unwrap_or(0)
    }

    /// Every queue's position for `origin`.
    pub fn origin_positions(&self, origin: &str) -> BTreeMap<String, u64> {
        let positions = self.inner.views.origin_positions.read().expect("views lock poisoned");
        // Keyed by (origin, queue): one origin's positions are one range, read without going over
        // every edge's (each handshake asks; a central may know 10,000 edges and their queues).
        positions
            .range((origin.to_string(), String::new())..)
            .take_while(|((o, _), _)| o == origin)
            .map(|((_, q), seq)| (q.clone(), *seq))
            .collect()
    }

    /// Resolves after the next commit that changed data (for waiters on positions or cursors); on
    /// PostgreSQL also after another central's commit was taken into the views.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.clone()
    }

    /// Records durably that `reader` is done with `queue` through `acked_seq`, and releases the
    /// messages every required reader is done with. A cursor never moves back.
    pub async fn advance_cursor(&self, queue: &str, reader: &str, acked_seq: u64) -> Result<(), StoreError> {
        self.call(|reply| ops::Op::AdvanceCursor {
            queue: queue.to_string(),
            reader: reader.to_string(),
            acked_seq,
            reply,
        })
        .await
    }

    /// Where `reader` is in `queue` (0: it has taken nothing yet), from the views.
    pub fn cursor(&self, queue: &str, reader: &str) -> u64 {
        let cursors = self.inner.views.cursors.read().expect("views lock poisoned");
        cursors.get(&(queue.to_string(), reader.to_string())).copied().unwrap_or(0)
    }

    /// Where `reader` is in `queue`, read from the database itself (PostgreSQL: not subject to the
    /// views' staleness; use it when taking over a reader another central ran). The views are
    /// updated with what was read.
    pub async fn fresh_cursor(&self, queue: &str, reader: &str) -> Result<u64, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(_) => Ok(self.cursor(queue, reader)),
            Backend::Postgres(pg) => pg.fresh_cursor(&self.inner.views, queue, reader).await,
        }
    }

    /// Stores a small document durably under `key` (replacing any previous value).
    pub async fn put_document(&self, key: &str, value: String) -> Result<(), StoreError> {
        self.put_documents(vec![(key.to_string(), value)]).await
    }

    /// Stores several small documents durably in one commit, each (key, value) replacing any
    /// previous value of its key.
    pub async fn put_documents(&self, documents: Vec<(String, String)>) -> Result<(), StoreError> {
        if documents.is_empty() {
            return Ok(());
        }
        // A key given twice keeps its last value (one statement may not upsert a row twice).
        let documents: Vec<(String, String)> =
            documents.into_iter().collect::<BTreeMap<_, _>>().into_iter().collect();
        self.call(|reply| ops::Op::PutDocuments { documents, reply }).await
    }

    /// Every document whose key starts with `prefix`, by key. Blocking: call it from a blocking
    /// thread (on PostgreSQL it blocks on the async query, so never from an async task).
    pub fn documents_blocking(&self, prefix: &str) -> Result<BTreeMap<String, String>, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(sqlite) => sqlite.documents(prefix),
            Backend::Postgres(pg) => tokio::runtime::Handle::current().block_on(pg.documents(prefix)),
        }
    }

    /// Every document whose key starts with `prefix`, by key.
    pub async fn documents(&self, prefix: &str) -> Result<BTreeMap<String, String>, StoreError> {
        if let Backend::Postgres(pg) = &self.inner.backend {
            return pg.documents(prefix).await;
        }
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || store.documents_blocking(&prefix))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Confirms the writer is alive and committing: a no-op round trip through it.
    pub async fn ping_writer(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(ops::Op::Ping { reply }).await?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Sends an operation to the writer and waits for its answer (after its commit).
    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> ops::Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(op(reply)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn send(&self, op: ops::Op) -> Result<(), StoreError> {
        self.inner.ops.send(op).await.map_err(|_| StoreError::Closed)
    }

    /// Every queue's size as of the last commit seen, by name.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.inner.views.stats.read().expect("views lock poisoned").values().cloned().collect()
    }

    /// One queue's size, if the queue exists.
    pub fn queue(&self, name: &str) -> Option<QueueStats> {
        self.inner.views.stats.read().expect("views lock poisoned").get(name).cloned()
    }

    /// Reads up to `limit` messages of `queue` with `seq > after_seq`, in order. Blocking: call it
    /// from a blocking thread (e.g. `tokio::task::spawn_blocking`), never from an async task.
    pub fn read_blocking(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read_blocking_within(queue, after_seq, limit, usize::MAX)
    }

    fn read_blocking_within(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let limit = limit.min(MAX_READ_LIMIT);
        match &self.inner.backend {
            Backend::Sqlite(sqlite) => sqlite.read(queue, after_seq, limit, max_bytes),
            Backend::Postgres(pg) => {
                tokio::runtime::Handle::current().block_on(pg.read(queue, after_seq, limit, max_bytes))
            }
        }
    }

    /// Reads up to `limit` messages of `queue` with `seq > after_seq`, in order.
    pub async fn read(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read_within(queue, after_seq, limit, usize::MAX).await
    }

    /// As [`Store::read`], but stops before the message that would take the payloads read past
    /// `max_bytes` (the first message is read whatever its size): what a reader that holds its
    /// reads in memory asks for, so a count sized for small messages cannot load a thousand large
    /// ones.
    pub async fn read_within(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if let Backend::Postgres(pg) = &self.inner.backend {
            return pg.read(queue, after_seq, limit.min(MAX_READ_LIMIT), max_bytes).await;
        }
        let store = self.clone();
        let queue = queue.to_string();
        tokio::task::spawn_blocking(move || store.read_blocking_within(&queue, after_seq, limit, max_bytes))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Tells every node sharing this store (on PostgreSQL: every central of the cluster, through
    /// `NOTIFY outpost_events`; on SQLite: only this node) that `kind` happened, with a small JSON
    /// `body` (at most [`MAX_CLUSTER_EVENT_BYTES`]). This node's own subscribers get it at once;
    /// the others within a NOTIFY round trip. Not durable: a central that is down misses it, so
    /// whatever must survive goes into a document first and the event only says "look again".
    pub async fn publish_cluster_event(&self, kind: &str, body: &str) -> Result<(), StoreError> {
        if kind.len() + body.len() > MAX_CLUSTER_EVENT_BYTES {
            return Err(StoreError::Invalid(format!(
                "a cluster event may carry at most {MAX_CLUSTER_EVENT_BYTES} bytes; {kind:?} carries {}",
                kind.len() + body.len()
            )));
        }
        if let Backend::Postgres(pg) = &self.inner.backend {
            pg.publish_event(kind, body).await?;
        }
        // No subscriber is not an error.
        let _ = self.inner.events.send((kind.to_string(), body.to_string()));
        Ok(())
    }

    /// Every cluster event from now on, this node's own included: `(kind, body)`. A subscriber more
    /// than [`CLUSTER_EVENT_CAPACITY`] events behind misses the oldest (`RecvError::Lagged`).
    pub fn cluster_events(&self) -> broadcast::Receiver<(String, String)> {
        self.inner.events.subscribe()
    }

    /// A lease named `name` for this node: the receiver says whether this node holds it now. On
    /// SQLite the node is alone and always holds it. On PostgreSQL at most one central of the
    /// cluster holds a lease at a time: each central renews its claim every
    /// [`LEASE_RENEW_INTERVAL`]; a claim not renewed for [`LEASE_TTL`] (central dead or cut off from
    /// the database) may be taken by another, and a holder that could not renew within the TTL
    /// reports `false` before anyone else can take it. Dropping every receiver gives the lease up.
    ///
    /// Receivers are told when the lease changes hands; [`Lease::is_valid`] also goes by this
    /// node's own clock, so a holder that was frozen or starved (and has not heard from its renewal
    /// task yet) still knows when to stop.
    pub fn lease(&self, name: &str) -> watch::Receiver<Lease> {
        match &self.inner.backend {
            Backend::Sqlite(_) => watch::channel(Lease::ALWAYS).1,
            Backend::Postgres(pg) => pg.lease(name),
        }
    }

    /// Stops the writer after it has committed every operation already queued, and waits for it.
    /// Operations sent afterwards fail with [`StoreError::Closed`].
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(ops::Op::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.inner.writer_task.lock().expect("writer handle poisoned").take();
        match handle {
            Some(WriterHandle::Thread(handle)) => {
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
            }
            Some(WriterHandle::Task(handle)) => {
                let _ = handle.await;
            }
            None => {}
        }
        if let Backend::Postgres(pg) = &self.inner.backend {
            pg.stop_background();
            pg.release_leases().await;
        }
    }
}
