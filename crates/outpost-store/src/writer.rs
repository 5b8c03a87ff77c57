//! The SQLite backend's single writer thread: owns the write connection and group-commits every
//! operation that is waiting when a commit starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_core::wire::BatchMessage;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::Checkpoints;
use crate::consumers::consumer_reader;
use crate::ops::{self, NewRow, Op, Outcome, QueueTail, Views};
use crate::{
    consumers_sqlite, failed, schema, Appended, CommitObserver, NewMessage, OriginAppended, QueueStats,
    StoreError, StoreOptions,
};

/// The writer's own copy of everything the views show, changed inside a transaction and published
/// only after it commits.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) stats: BTreeMap<String, QueueStats>,
    pub(crate) queue_ids: HashMap<String, i64>,
    origin_positions: BTreeMap<(String, String), u64>,
    pub(crate) cursors: BTreeMap<(String, String), u64>,
    /// The (queue, reader) of every consumer's cursor: required readers of their queue, found by
    /// queue without scanning every cursor.
    pub(crate) consumer_readers: BTreeSet<(String, String)>,
    total_bytes: u64,
    /// Remembered idempotency keys and failed copies: they count against the quota too.
    pub(crate) key_bytes: u64,
    pub(crate) failed_bytes: u64,
    /// Queues with messages every required reader has passed that are not deleted yet: a release
    /// goes in bounded chunks, one transaction each, between client writes.
    pub(crate) releases_due: BTreeSet<String>,
    /// Bytes new messages may still take on the disk: free space on the filesystem plus free pages
    /// inside the database, minus the reserve, less the payloads stored since it was measured
    /// ([`DiskBounds::refresh`]).
    disk_room_bytes: u64,
    /// When `disk_room_bytes` was measured; `None` for a state just loaded (at start, and after a
    /// failed commit), which measures before its first write.
    disk_measured_at: Option<Instant>,
}

impl State {
    /// What counts against the quota: message payloads, remembered keys and failed copies.
    fn used_bytes(&self) -> u64 {
        self.total_bytes + self.key_bytes + self.failed_bytes
    }

    fn load(conn: &Connection, options: &StoreOptions) -> Result<State, StoreError> {
        let stats = schema::load_stats(conn)?;
        let total_bytes = stats.values().map(|q| q.bytes).sum();
        let cursors = schema::load_cursors(conn)?;
        let consumer_readers =
            cursors.keys().filter(|(_, r)| crate::consumers::is_consumer_reader(r)).cloned().collect();
        let mut state = State {
            stats,
            queue_ids: load_queue_ids(conn)?,
            origin_positions: schema::load_origin_positions(conn)?,
            cursors,
            consumer_readers,
            total_bytes,
            key_bytes: conn.query_row(
                "SELECT coalesce(sum(length(key)) + count(*) * ?1, 0) FROM idempotency_keys",
                [crate::IDEMPOTENCY_KEY_OVERHEAD_BYTES as i64],
                |r| r.get::<_, i64>(0),
            )? as u64,
            failed_bytes: conn.query_row("SELECT coalesce(sum(length(payload)), 0) FROM failed", [], |r| {
                r.get::<_, i64>(0)
            })? as u64,
            releases_due: BTreeSet::new(),
            disk_room_bytes: u64::MAX,
            disk_measured_at: None,
        };
        // A release interrupted by a crash or a full disk goes on after a restart.
        let queues: Vec<String> = state.stats.keys().cloned().collect();
        for queue in queues {
            if release_through(options, &state, &queue).is_some() {
                state.releases_due.insert(queue);
            }
        }
        Ok(state)
    }
}

/// How long releases wait after one failed (e.g. the disk is full) before they are tried again.
const RELEASE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// While the disk has [`ROOM_PLENTY_BYTES`] of room or more, its free space is measured at most
/// this often; below that, at the start of every group.
const ROOM_MEASURE_EVERY: Duration = Duration::from_secs(1);
/// Room above which a measurement of the free space may be a second old. Between measurements only
/// the payloads stored are counted off, not their WAL copy, indexes and keys, nor other writers on
/// the filesystem; a second of the fastest ingest (a few hundred MB of payload, about twice that on
/// disk) stays well below this margin, so on a stale figure a write can at worst reach into the
/// reserve by what other programs wrote meanwhile. Measuring costs a `statfs` and a query, about a
/// tenth of the writer's time per commit with single messages.
const ROOM_PLENTY_BYTES: u64 = 1 << 30;
/// How often expired idempotency keys are pruned (at most; a short TTL prunes more often).
const KEY_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// The most expired keys one prune transaction deletes; the rest follow after later commits.
const KEY_PRUNE_CHUNK: i64 = 10_000;

/// How often the writer looks for client writes while it waits to retry a release.
const RELEASE_RETRY_POLL: Duration = Duration::from_millis(20);

/// What one group changed, so only that is published.
#[derive(Default)]
struct Changes {
    queues: BTreeSet<String>,
    origin_positions: BTreeSet<(String, String)>,
    cursors: BTreeSet<(String, String)>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.origin_positions.is_empty() && self.cursors.is_empty()
    }

    /// `reader`'s cursor in `queue` moved, and with it perhaps the queue's release.
    fn cursor_moved(&mut self, queue: &str, reader: &str) {
        self.cursors.insert((queue.to_string(), reader.to_string()));
        self.queues.insert(queue.to_string());
    }
}

/// How the writer keeps a small disk usable (see `sqlite::wal_limit_bytes`).
pub struct DiskBounds {
    /// The data directory, whose filesystem's free space is measured.
    pub data_dir: std::path::PathBuf,
    /// The most payload-page bytes one release transaction deletes (bounds its WAL).
    pub release_chunk_bytes: u64,
    /// Space kept free for checkpoints and releases: new messages get 507 before they would
    /// take it.
    pub reserve_bytes: u64,
}

impl DiskBounds {
    /// Measures the state's room again unless there is plenty and it was measured less than
    /// [`ROOM_MEASURE_EVERY`] ago (it is then the last figure less what was stored since).
    fn refresh(&self, conn: &Connection, state: &mut State) {
        let recent = state.disk_measured_at.is_some_and(|at| at.elapsed() < ROOM_MEASURE_EVERY);
        if recent && state.disk_room_bytes >= ROOM_PLENTY_BYTES {
            return;
        }
        state.disk_room_bytes = self.room_bytes(conn);
        state.disk_measured_at = Some(Instant::now());
    }

    /// Bytes new messages may take now; `u64::MAX` when the free space cannot be read.
    fn room_bytes(&self, conn: &Connection) -> u64 {
        let Some(free) = crate::sqlite::filesystem_free_bytes(&self.data_dir) else { return u64::MAX };
        let free_pages: u64 = conn
            .prepare_cached("SELECT freelist_count * page_size FROM pragma_freelist_count, pragma_page_size")
            .and_then(|mut stmt| stmt.query_row([], |r| r.get::<_, i64>(0)))
            .map_or(0, |b| b.max(0) as u64);
        free.saturating_add(free_pages).saturating_sub(self.reserve_bytes)
    }
}

pub struct Writer {
    /// Declared before `checkpoints`: closed first, since its WAL hook points into them.
    conn: Connection,
    checkpoints: Checkpoints,
    options: StoreOptions,
    views: Arc<Views>,
    commits: watch::Sender<u64>,
    state: State,
    observer: Option<CommitObserver>,
    /// The bounds that keep a small disk usable.
    disk: DiskBounds,
    /// After a failed release: not before this instant again.
    release_retry_at: Option<Instant>,
    /// When expired idempotency keys are pruned next.
    key_prune_at: Instant,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        checkpoints: Checkpoints,
        options: StoreOptions,
        views: Arc<Views>,
        commits: watch::Sender<u64>,
        observer: Option<CommitObserver>,
        disk: DiskBounds,
    ) -> Result<Writer, StoreError> {
        let state = State::load(&conn, &options)?;
        let key_prune_at = Instant::now() + options.idempotency_ttl.min(KEY_PRUNE_INTERVAL);
        let writer = Writer {
            conn,
            checkpoints,
            options,
            views,
            commits,
            state,
            observer,
            disk,
            release_retry_at: None,
            key_prune_at,
        };
        writer.publish(None);
        Ok(writer)
    }

    pub fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        let mut shutdown_reply = None;
        while shutdown_reply.is_none() {
            let first = if self.state.releases_due.is_empty() {
                match ops.blocking_recv() {
                    Some(op) => op,
                    None => break,
                }
            } else {
                // Client writes first; releases go on whenever nothing waits.
                match ops.try_recv() {
                    Ok(op) => op,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        match self.release_retry_at {
                            Some(at) if Instant::now() < at => std::thread::sleep(RELEASE_RETRY_POLL),
                            _ => {
                                self.continue_releases();
                                self.checkpoints.after_commit(&self.conn);
                            }
                        }
                        continue;
                    }
                }
            };
            let group = ops::gather_group(first, &mut ops);
            shutdown_reply = self.commit_group(group);
            if Instant::now() >= self.key_prune_at {
                self.prune_keys();
            }
            // After the group was answered: a checkpoint no longer delays its acknowledgements.
            self.checkpoints.after_commit(&self.conn);
        }
        // Anything still queued after a shutdown request is refused: its sender sees Closed.
        ops.close();
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
        tracing::debug!("store writer stopped");
    }

    /// Copies the writer's state into the views: everything, or only what `changes` names.
    fn publish(&self, changes: Option<&Changes>) {
        let Some(changes) = changes else {
            *self.views.stats.write().expect("views lock poisoned") = self.state.stats.clone();
            *self.views.origin_positions.write().expect("views lock poisoned") =
                self.state.origin_positions.clone();
            *self.views.cursors.write().expect("views lock poisoned") = self.state.cursors.clone();
            return;
        };
        if !changes.queues.is_empty() {
            let mut stats = self.views.stats.write().expect("views lock poisoned");
            for queue in &changes.queues {
                stats.insert(queue.clone(), self.state.stats[queue].clone());
            }
        }
        if !changes.origin_positions.is_empty() {
            let mut positions = self.views.origin_positions.write().expect("views lock poisoned");
            for key in &changes.origin_positions {
                positions.insert(key.clone(), self.state.origin_positions[key]);
            }
        }
        if !changes.cursors.is_empty() {
            let mut cursors = self.views.cursors.write().expect("views lock poisoned");
            for key in &changes.cursors {
                // A deleted consumer's cursor is gone.
                match self.state.cursors.get(key) {
                    Some(seq) => cursors.insert(key.clone(), *seq),
                    None => cursors.remove(key),
                };
            }
        }
    }

    /// Deletes the next chunk of every queue with a release due, in one transaction.
    fn continue_releases(&mut self) {
        let mut changes = Changes::default();
        let outcome = (|| -> Result<(), StoreError> {
            let tx = self.conn.unchecked_transaction().map_err(StoreError::from_sqlite)?;
            let queues: Vec<String> = self.state.releases_due.iter().cloned().collect();
            for queue in queues {
                release_chunk(&tx, &self.options, &mut self.state, &queue, self.disk.release_chunk_bytes)?;
                changes.queues.insert(queue);
            }
            tx.commit().map_err(StoreError::from_sqlite)
        })();
        match outcome {
            Ok(()) => {
                self.release_retry_at = None;
                self.publish(Some(&changes));
                self.commits.send_modify(|generation| *generation += 1);
            }
            Err(error) => {
                tracing::warn!(
                    "cannot release forwarded or delivered messages yet, retrying in {RELEASE_RETRY_DELAY:?}: {error}"
                );
                self.release_retry_at = Some(Instant::now() + RELEASE_RETRY_DELAY);
                self.recover_after_failed_commit(matches!(error, StoreError::DiskFull(_)));
            }
        }
    }

    /// Deletes a chunk of idempotency keys older than `limits.idempotency_ttl` (lookups already
    /// ignore them), in a transaction of its own; another chunk follows after the next commit while
    /// more remain.
    fn prune_keys(&mut self) {
        let cutoff = outpost_core::time::now_unix_ms() - self.options.idempotency_ttl.as_millis() as i64;
        let pruned = (|| -> Result<(u64, u64), StoreError> {
            let tx = self.conn.unchecked_transaction()?;
            let lengths: Vec<i64> = tx
                .prepare_cached(
                    "DELETE FROM idempotency_keys WHERE (queue_id, key) IN
                       (SELECT queue_id, key FROM idempotency_keys WHERE created_at_ms < ?1
                        ORDER BY created_at_ms LIMIT ?2)
                     RETURNING length(key)",
                )?
                .query_map(params![cutoff, KEY_PRUNE_CHUNK], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            tx.commit()?;
            let bytes = lengths.iter().map(|l| *l as u64 + crate::IDEMPOTENCY_KEY_OVERHEAD_BYTES).sum();
            Ok((lengths.len() as u64, bytes))
        })();
        match pruned {
            Ok((count, bytes)) => {
                self.state.key_bytes = self.state.key_bytes.saturating_sub(bytes);
                let more = count as i64 == KEY_PRUNE_CHUNK;
                if count > 0 {
                    tracing::debug!(count, bytes, more, "pruned expired idempotency keys");
                }
                self.key_prune_at = if more {
                    Instant::now()
                } else {
                    Instant::now() + self.options.idempotency_ttl.min(KEY_PRUNE_INTERVAL)
                };
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                tracing::warn!(
                    "cannot prune expired idempotency keys, retrying in {KEY_PRUNE_INTERVAL:?}: {e}"
                );
                self.key_prune_at = Instant::now() + KEY_PRUNE_INTERVAL;
            }
        }
    }

    /// After a failed commit the in-memory state may hold changes that never committed: rebuild
    /// it from disk, the way startup does. A full disk first gets the WAL checkpointed and
    /// truncated, which gives its space back.
    fn recover_after_failed_commit(&mut self, disk_full: bool) {
        let _ = self.conn.execute_batch("ROLLBACK");
        if disk_full {
            self.checkpoints.wait_idle();
            if let Err(e) = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                tracing::warn!("cannot checkpoint the WAL on a full disk: {e}");
            }
        }
        match State::load(&self.conn, &self.options) {
            Ok(state) => {
                self.state = state;
                self.publish(None);
            }
            // The writer cannot know what is on disk: crash loudly; the supervisor restarts the
            // node and startup rebuilds everything from the database.
            Err(e) => panic!("store writer cannot reload its state after a failed commit: {e}"),
        }
    }

    /// Applies a group in one transaction and answers each operation after the commit. Returns the
    /// shutdown reply if the group asked to stop.
    fn commit_group(&mut self, group: Vec<Op>) -> Option<oneshot::Sender<()>> {
        let started = Instant::now();
        self.disk.refresh(&self.conn, &mut self.state);
        match self.apply_group(&group) {
            Ok((outcomes, changes)) => {
                if !changes.is_empty() {
                    self.publish(Some(&changes));
                    self.commits.send_modify(|generation| *generation += 1);
                }
                if let Some(observer) = &self.observer {
                    observer(started.elapsed(), group.len());
                }
                let answers = group.into_iter().zip(outcomes);
                answers.filter_map(|(op, outcome)| op.answer(outcome)).last()
            }
            Err(error) => self.refuse_group(group, error),
        }
    }

    /// The group's operations in order, in one transaction, committed: their outcomes (refusals of
    /// single operations included) and what changed. A database error fails the whole group.
    fn apply_group(&mut self, group: &[Op]) -> Result<(Vec<Outcome>, Changes), StoreError> {
        let tx = self.conn.unchecked_transaction().map_err(StoreError::from_sqlite)?;
        let now_ms = outpost_core::time::now_unix_ms();
        let mut changes = Changes::default();
        let mut outcomes = Vec::with_capacity(group.len());
        for op in group {
            let (options, chunk_bytes) = (&self.options, self.disk.release_chunk_bytes);
            outcomes.push(apply_op(&tx, options, &mut self.state, chunk_bytes, op, now_ms, &mut changes)?);
        }
        // No `queues.last_seq` update here: the highest stored seq is the queue's last seq, and
        // the row is written only when a release empties the queue (see `release_chunk`). One page
        // less per commit: a group of single messages dirties only a few pages, and each is
        // written whole to the WAL.
        tx.commit().map_err(StoreError::from_sqlite)?;
        Ok((outcomes, changes))
    }

    /// The group's commit failed: every operation in it is refused with the cause (so every caller
    /// hears it, e.g. 507 disk full), and the state is rebuilt from disk.
    fn refuse_group(&mut self, group: Vec<Op>, error: StoreError) -> Option<oneshot::Sender<()>> {
        let message = error.to_string();
        let disk_full = matches!(error, StoreError::DiskFull(_));
        tracing::error!(%message, operations = group.len(), "store commit failed; every write in it was refused");
        let failure = || {
            if disk_full {
                StoreError::DiskFull(message.clone())
            } else {
                StoreError::CommitFailed(message.clone())
            }
        };
        let shutdown = group.into_iter().filter_map(|op| op.refuse(&failure)).last();
        self.recover_after_failed_commit(disk_full);
        shutdown
    }
}

/// One operation inside the group's transaction; notes in `changes` what it changed.
fn apply_op(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    chunk_bytes: u64,
    op: &Op,
    now_ms: i64,
    changes: &mut Changes,
) -> Result<Outcome, StoreError> {
    let outcome = match op {
        Op::Append { queue, messages, idempotency_key, .. } => {
            if outpost_core::failpoint::hit("writer_panic") {
                panic!("failpoint writer_panic: a panic inside the store writer");
            }
            let key = idempotency_key.as_deref();
            let result = fatal_or(apply_append(tx, options, state, queue, messages, key, now_ms))?;
            if matches!(&result, Ok(a) if !a.duplicate) {
                changes.queues.insert(queue.clone());
            }
            Outcome::Append(result)
        }
        Op::AppendFromOrigin { queue, origin, messages, .. } => {
            let result = fatal_or(apply_origin_append(tx, options, state, queue, origin, messages, now_ms))?;
            let count = messages.len() as u64;
            if matches!(&result, Ok(a) if a.gap_expected_seq.is_none() && (a.stored > 0 || a.stored + a.duplicates < count))
            {
                changes.origin_positions.insert((origin.clone(), queue.clone()));
                changes.queues.insert(queue.clone());
            }
            Outcome::Origin(result)
        }
        Op::ReleaseFromOrigin { queue, origin, through_seq, .. } => {
            let result = fatal_or(apply_origin_release(tx, options, state, queue, origin, *through_seq))?;
            let key = (origin.clone(), queue.clone());
            if result.is_ok() && state.origin_positions.contains_key(&key) {
                changes.origin_positions.insert(key);
                changes.queues.insert(queue.clone());
            }
            Outcome::Origin(result)
        }
        Op::AdvanceCursor { queue, reader, acked_seq, .. } => {
            let result =
                fatal_or(apply_advance_cursor(tx, options, state, queue, reader, *acked_seq, chunk_bytes))?;
            if result.is_ok() {
                changes.cursor_moved(queue, reader);
            }
            Outcome::Done(result)
        }
        Op::PutDocuments { documents, .. } => {
            let result = tx
                .prepare_cached(
                    "INSERT INTO documents (key, value, updated_at_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                )
                .and_then(|mut stmt| {
                    documents.iter().try_for_each(|(key, value)| stmt.execute(params![key, value, now_ms]).map(drop))
                })
                .map_err(StoreError::from);
            Outcome::Done(fatal_or(result)?)
        }
        Op::FailMessage { failure, .. } => {
            let (queue, reader) = (&failure.message.queue, &failure.reader);
            // The cursor first: if it refuses (non-fatal), nothing has been written.
            let result =
                apply_advance_cursor(tx, options, state, queue, reader, failure.message.seq, chunk_bytes)
                    .and_then(|()| failed::insert(tx, failure, now_ms));
            let result = fatal_or(result)?;
            if result.is_ok() {
                state.failed_bytes += failure.message.payload.len() as u64;
                changes.cursor_moved(queue, reader);
            }
            Outcome::Failed(result.map(failed::FailedOutcome::Inserted))
        }
        Op::ChangeFailed { change, .. } => {
            let mut freed = 0;
            let result = fatal_or(failed::apply_change(tx, change, now_ms, &mut freed))?;
            state.failed_bytes = state.failed_bytes.saturating_sub(freed);
            Outcome::Failed(result)
        }
        Op::ConsumerLease { queue, name, request, .. } => {
            let result =
                consumers_sqlite::lease(tx, options, state, queue, name, *request, now_ms, chunk_bytes);
            let result = fatal_or(result)?;
            if result.is_ok() {
                changes.cursor_moved(queue, &consumer_reader(name));
            }
            Outcome::Leased(result)
        }
        Op::ConsumerSettle { queue, name, lease_ids, settle, .. } => {
            let result = consumers_sqlite::settle(
                tx,
                options,
                state,
                queue,
                name,
                lease_ids,
                *settle,
                now_ms,
                chunk_bytes,
            );
            let result = fatal_or(result)?;
            if matches!(&result, Ok(outcome) if outcome.consumer_exists) {
                changes.cursor_moved(queue, &consumer_reader(name));
            }
            Outcome::Settled(result)
        }
        Op::ConsumerDelete { queue, name, .. } => {
            let result = fatal_or(consumers_sqlite::delete(tx, options, state, queue, name, chunk_bytes))?;
            if matches!(&result, Ok(true)) {
                changes.cursor_moved(queue, &consumer_reader(name));
            }
            Outcome::Deleted(result)
        }
        Op::Ping { .. } | Op::Shutdown { .. } => Outcome::Nothing,
    };
    Ok(outcome)
}

/// A database error leaves the transaction in an unknown state, so it fails the whole group (the
/// outer `Err`); a rejection of this one operation (quota, gap) changed nothing (the inner result).
fn fatal_or<T>(result: Result<T, StoreError>) -> Result<Result<T, StoreError>, StoreError> {
    match result {
        Err(StoreError::Sqlite(e)) => Err(StoreError::from_sqlite(e)),
        Err(e @ StoreError::DiskFull(_)) => Err(e),
        other => Ok(other),
    }
}

/// The id of `queue`, creating it (after a quota check, so a rejected write leaves no empty queue).
pub(crate) fn ensure_queue(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    needed_bytes: u64,
) -> Result<i64, StoreError> {
    if let Some(id) = state.queue_ids.get(queue) {
        return Ok(*id);
    }
    ops::check_queue_count(options, state.queue_ids.len() as u64, queue)?;
    ops::check_quota(options, state.used_bytes(), needed_bytes, state.disk_room_bytes)?;
    tx.execute("INSERT INTO queues (name, last_seq) VALUES (?1, 0)", [queue])?;
    let id = tx.last_insert_rowid();
    state.queue_ids.insert(queue.to_string(), id);
    state.stats.insert(
        queue.to_string(),
        QueueStats { name: queue.to_string(), first_seq: 1, ..Default::default() },
    );
    Ok(id)
}

/// Inserts rows at the end of a queue with consecutive seqs; returns (first_seq, last_seq).
fn insert_rows<'a>(
    tx: &Transaction<'_>,
    state: &mut State,
    queue: &str,
    queue_id: i64,
    rows: impl Iterator<Item = NewRow<'a>>,
    now_ms: i64,
    ids: &mut Vec<String>,
) -> Result<(u64, u64), StoreError> {
    let mut tail =
        QueueTail::new(state.stats.get_mut(queue).expect("stats exist for every known queue"), now_ms);
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages (queue_id, seq, id, origin, origin_seq, content_type, accepted_at_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for row in rows {
        let (seq, origin_seq) = tail.place(&row);
        insert.execute(params![
            queue_id,
            seq as i64,
            row.id,
            row.origin,
            origin_seq as i64,
            row.content_type,
            now_ms,
            &row.payload[..]
        ])?;
        ids.push(row.id);
    }
    let (first_seq, last_seq, bytes) = tail.finish();
    state.total_bytes += bytes;
    state.disk_room_bytes = state.disk_room_bytes.saturating_sub(bytes);
    Ok((first_seq, last_seq))
}

fn apply_append(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    messages: &[NewMessage],
    idempotency_key: Option<&str>,
    now_ms: i64,
) -> Result<Appended, StoreError> {
    // A new queue holds no key yet: its key's bytes are part of what the quota must have room for.
    let (needed, new_key_bytes) = ops::append_bytes(messages, idempotency_key)?;
    let queue_id = ensure_queue(tx, options, state, queue, needed + new_key_bytes)?;

    // A key older than the TTL is forgotten (its row may wait for the next prune): reused, it
    // stores a new message and takes the row over.
    let key_cutoff_ms = now_ms - options.idempotency_ttl.as_millis() as i64;
    let mut key_row_exists = false;
    if let Some(key) = idempotency_key {
        let existing: Option<(i64, String, i64)> = tx
            .prepare_cached(
                "SELECT seq, id, created_at_ms FROM idempotency_keys WHERE queue_id = ?1 AND key = ?2",
            )?
            .query_row(params![queue_id, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        match existing {
            Some((seq, id, created_at_ms)) if created_at_ms >= key_cutoff_ms => {
                return Ok(Appended {
                    first_seq: seq as u64,
                    last_seq: seq as u64,
                    ids: vec![id],
                    duplicate: true,
                });
            }
            Some(_) => key_row_exists = true,
            None => {}
        }
    }
    let key_bytes = if key_row_exists { 0 } else { new_key_bytes };
    ops::check_quota(options, state.used_bytes(), needed + key_bytes, state.disk_room_bytes)?;

    let mut ids = Vec::with_capacity(messages.len());
    let rows = ops::local_rows(messages, &options.node_id);
    let (first_seq, last_seq) = insert_rows(tx, state, queue, queue_id, rows, now_ms, &mut ids)?;
    if let Some(key) = idempotency_key {
        tx.prepare_cached(
            "INSERT INTO idempotency_keys (queue_id, key, seq, id, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (queue_id, key) DO UPDATE
               SET seq = excluded.seq, id = excluded.id, created_at_ms = excluded.created_at_ms",
        )?
        .execute(params![queue_id, key, first_seq as i64, ids[0], now_ms])?;
        state.key_bytes += key_bytes;
    }
    Ok(Appended { first_seq, last_seq, ids, duplicate: false })
}

/// Stores an edge's consecutive messages once each: those at or below the (origin, queue) position
/// are duplicates; a batch starting past position + 1 is refused as a gap.
fn apply_origin_append(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    origin: &str,
    messages: &[BatchMessage],
    now_ms: i64,
) -> Result<OriginAppended, StoreError> {
    let key = (origin.to_string(), queue.to_string());
    let position = state.origin_positions.get(&key).copied().unwrap_or(0);
    let (fresh, duplicates) = match ops::plan_origin_append(position, messages) {
        Ok(plan) => plan,
        Err(answer) => return Ok(answer),
    };
    let needed: u64 = fresh.iter().map(|m| m.payload.len() as u64).sum();
    let queue_id = ensure_queue(tx, options, state, queue, needed)?;
    ops::check_quota(options, state.used_bytes(), needed, state.disk_room_bytes)?;

    let mut ids = Vec::with_capacity(fresh.len());
    let rows = ops::origin_rows(&fresh, origin);
    insert_rows(tx, state, queue, queue_id, rows, now_ms, &mut ids)?;
    let stored_through = fresh.last().expect("not empty").seq;
    tx.prepare_cached(
        "INSERT INTO origin_positions (origin, queue_id, last_origin_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT(origin, queue_id) DO UPDATE SET last_origin_seq = excluded.last_origin_seq",
    )?
    .execute(params![origin, queue_id, stored_through as i64])?;
    state.origin_positions.insert(key, stored_through);
    Ok(OriginAppended { stored_through, stored: ids.len() as u64, duplicates, gap_expected_seq: None })
}

/// Moves (origin, queue)'s position to `through_seq` (never back) with nothing stored: the edge
/// released those messages without forwarding them.
fn apply_origin_release(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    origin: &str,
    through_seq: u64,
) -> Result<OriginAppended, StoreError> {
    let key = (origin.to_string(), queue.to_string());
    let position = state.origin_positions.get(&key).copied().unwrap_or(0);
    let (answer, moved) = ops::plan_origin_release(position, through_seq);
    let Some(through_seq) = moved else { return Ok(answer) };
    let queue_id = ensure_queue(tx, options, state, queue, 0)?;
    tx.prepare_cached(
        "INSERT INTO origin_positions (origin, queue_id, last_origin_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT(origin, queue_id) DO UPDATE SET last_origin_seq = excluded.last_origin_seq",
    )?
    .execute(params![origin, queue_id, through_seq as i64])?;
    state.origin_positions.insert(key, through_seq);
    Ok(answer)
}

/// Records that `reader` is done with `queue` through `acked_seq`, then releases the prefix every
/// required reader is done with.
pub(crate) fn apply_advance_cursor(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    reader: &str,
    acked_seq: u64,
    chunk_bytes: u64,
) -> Result<(), StoreError> {
    let key = (queue.to_string(), reader.to_string());
    let last_seq = state.stats.get(queue).map(|stats| stats.last_seq);
    let current = state.cursors.get(&key).copied().unwrap_or(0);
    if !ops::check_cursor_advance(queue, reader, acked_seq, last_seq, current)? {
        return Ok(());
    }
    let queue_id = state.queue_ids[queue];
    tx.prepare_cached(
        "INSERT INTO cursors (queue_id, reader, acked_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT(queue_id, reader) DO UPDATE SET acked_seq = excluded.acked_seq",
    )?
    .execute(params![queue_id, reader, acked_seq as i64])?;
    state.cursors.insert(key, acked_seq);

    // The first chunk goes in this transaction (usually all of it); the rest follows in its own.
    state.releases_due.insert(queue.to_string());
    release_chunk(tx, options, state, queue, chunk_bytes)
}

/// The seq through which `queue` may be released now: the lowest cursor of its required readers,
/// when that is past the first message still stored. `None`: nothing to release (or nobody is
/// required to read the queue, and everything is kept).
fn release_through(options: &StoreOptions, state: &State, queue: &str) -> Option<u64> {
    let required = (options.readers_of)(queue);
    // Every consumer of the queue is a required reader too (see `consumers`).
    let consumers = state
        .consumer_readers
        .range((queue.to_string(), String::new())..)
        .take_while(|(q, _)| q == queue)
        .map(|key| state.cursors.get(key).copied().unwrap_or(0));
    let required = required
        .iter()
        .map(|r| state.cursors.get(&(queue.to_string(), r.clone())).copied().unwrap_or(0))
        .chain(consumers);
    ops::release_through(required, state.stats.get(queue)?)
}

/// Deletes the oldest messages of `queue` that every required reader has passed, at most
/// `chunk_bytes` of pages (at least one message), so one release never needs more WAL than the
/// bound leaves room for. Keeps the queue in `releases_due` while more remains.
pub(crate) fn release_chunk(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    chunk_bytes: u64,
) -> Result<(), StoreError> {
    let Some(release_through) = release_through(options, state, queue) else {
        state.releases_due.remove(queue);
        return Ok(());
    };
    let queue_id = state.queue_ids[queue];
    // What a deletion rewrites: the row's leaf page (a large payload fills one page by itself)
    // plus a little for the b-tree and the freelist.
    let mut through = state.stats[queue].first_seq - 1;
    let mut rewritten_bytes = 0u64;
    let (mut count, mut bytes) = (0u64, 0u64);
    {
        let mut sizes = tx.prepare_cached(
            "SELECT seq, length(payload) FROM messages WHERE queue_id = ?1 AND seq <= ?2 ORDER BY seq LIMIT 4096",
        )?;
        let mut rows = sizes.query(params![queue_id, release_through as i64])?;
        while let Some(row) = rows.next()? {
            let (seq, length): (i64, i64) = (row.get(0)?, row.get(1)?);
            let cost = (length as u64).min(64 << 10) + 256;
            if count > 0 && rewritten_bytes + cost > chunk_bytes {
                break;
            }
            rewritten_bytes += cost;
            through = seq as u64;
            count += 1;
            bytes += length as u64;
        }
    }
    if count == 0 {
        through = release_through; // nothing stored up to there (cannot happen: queues are contiguous)
    }
    tx.prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND seq <= ?2")?
        .execute(params![queue_id, through as i64])?;
    let oldest: Option<i64> = tx
        .prepare_cached("SELECT accepted_at_ms FROM messages WHERE queue_id = ?1 ORDER BY seq LIMIT 1")?
        .query_row([queue_id], |r| r.get(0))
        .optional()?;
    let queue_stats = state.stats.get_mut(queue).expect("stats exist for every known queue");
    if through >= queue_stats.last_seq {
        // The queue's last message goes: its row keeps the last seq, so seqs never restart.
        tx.prepare_cached("UPDATE queues SET last_seq = ?1 WHERE queue_id = ?2")?
            .execute(params![queue_stats.last_seq as i64, queue_id])?;
    }
    ops::apply_release(queue_stats, through, count, bytes, oldest);
    state.total_bytes -= bytes;
    if through >= release_through || queue_stats.messages == 0 {
        state.releases_due.remove(queue);
    }
    Ok(())
}

fn load_queue_ids(conn: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = conn.prepare("SELECT name, queue_id FROM queues")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<HashMap<_, _>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loaded state and the bounds of a store in a temporary directory.
    fn store() -> (tempfile::TempDir, Connection, DiskBounds, State) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("outpost.db")).unwrap();
        crate::schema::migrate(&mut conn).unwrap();
        let options = StoreOptions::keep_everything(u64::MAX, "test");
        let state = State::load(&conn, &options).unwrap();
        let disk =
            DiskBounds { data_dir: dir.path().to_path_buf(), release_chunk_bytes: 0, reserve_bytes: 0 };
        (dir, conn, disk, state)
    }

    #[test]
    fn free_space_is_measured_each_group_when_room_is_short_and_once_a_second_when_plentiful() {
        let (_dir, conn, disk, mut state) = store();
        let actual = disk.room_bytes(&conn);
        assert!(actual != 0 && actual != u64::MAX);

        // A state just loaded (at start, or rebuilt after a failed commit) measures first, though
        // it says "no limit" until then.
        assert_eq!((state.disk_room_bytes, state.disk_measured_at), (u64::MAX, None));
        disk.refresh(&conn, &mut state);
        assert!(state.disk_room_bytes != u64::MAX && state.disk_measured_at.is_some());

        // Plenty, measured just now: the figure less what was stored since stands.
        state.disk_room_bytes = ROOM_PLENTY_BYTES + 5;
        disk.refresh(&conn, &mut state);
        assert_eq!(state.disk_room_bytes, ROOM_PLENTY_BYTES + 5);

        // Short of room: measured at every group, however recent the last measurement.
        state.disk_room_bytes = ROOM_PLENTY_BYTES - 1;
        disk.refresh(&conn, &mut state);
        assert_ne!(state.disk_room_bytes, ROOM_PLENTY_BYTES - 1);

        // Plenty, but measured a second ago or more: measured again.
        state.disk_room_bytes = ROOM_PLENTY_BYTES + 5;
        state.disk_measured_at = Instant::now().checked_sub(ROOM_MEASURE_EVERY);
        disk.refresh(&conn, &mut state);
        assert_ne!(state.disk_room_bytes, ROOM_PLENTY_BYTES + 5);
    }
}
