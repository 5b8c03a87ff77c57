//! The SQLite backend's single writer thread: owns the write connection and group-commits every
//! operation that is waiting when a commit starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_core::wire::BatchMessage;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::consumers::{LeasedMessage, SettleOutcome};
use crate::ops::{Op, Reply, Views, MAX_BYTES_PER_COMMIT, MAX_OPS_PER_COMMIT};
use crate::{
    failed, schema, Appended, CommitObserver, NewMessage, OriginAppended, QueueStats, StoreError,
    StoreOptions,
};

/// The writer's own copy of everything the views show, changed inside a transaction and published
/// only after it commits.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) stats: BTreeMap<String, QueueStats>,
    pub(crate) queue_ids: HashMap<String, i64>,
    origin_positions: HashMap<(String, String), u64>,
    pub(crate) cursors: HashMap<(String, String), u64>,
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
    /// Bytes new messages may still take on the disk in this group: free space on the filesystem
    /// plus free pages inside the database, minus the reserve. Measured at the start of a group.
    disk_room_bytes: u64,
}

impl State {
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
}

/// A reply waiting for its commit.
enum Pending {
    Append(Reply<Appended>, Result<Appended, StoreError>),
    Origin(Reply<OriginAppended>, Result<OriginAppended, StoreError>),
    Done(Reply<()>, Result<(), StoreError>),
    Failed(Reply<failed::FailedOutcome>, Result<failed::FailedOutcome, StoreError>),
    Leased(Reply<Vec<LeasedMessage>>, Result<Vec<LeasedMessage>, StoreError>),
    Settled(Reply<SettleOutcome>, Result<SettleOutcome, StoreError>),
    Deleted(Reply<bool>, Result<bool, StoreError>),
    Ping(oneshot::Sender<()>),
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
    /// Bytes new messages may take now; `u64::MAX` when the free space cannot be read.
    fn room_bytes(&self, conn: &Connection) -> u64 {
        let Some(free) = crate::sqlite::filesystem_free_bytes(&self.data_dir) else { return u64::MAX };
        let free_pages: u64 = conn
            .query_row(
                "SELECT freelist_count * page_size FROM pragma_freelist_count, pragma_page_size",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_or(0, |b| b.max(0) as u64);
        free.saturating_add(free_pages).saturating_sub(self.reserve_bytes)
    }
}

pub struct Writer {
    conn: Connection,
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
    pub fn new(
        conn: Connection,
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
                            _ => self.continue_releases(),
                        }
                        continue;
                    }
                }
            };
            let mut group_bytes = first.payload_bytes();
            let mut group = vec![first];
            while group.len() < MAX_OPS_PER_COMMIT && group_bytes < MAX_BYTES_PER_COMMIT {
                match ops.try_recv() {
                    Ok(op) => {
                        group_bytes += op.payload_bytes();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            shutdown_reply = self.commit_group(group);
            if Instant::now() >= self.key_prune_at {
                self.prune_keys();
            }
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
        let op_count = group.len();
        let mut pending = Vec::with_capacity(group.len());
        let mut shutdown = None;
        let mut changes = Changes::default();

        // Operations still to apply; on a failed commit the ones never reached are refused with
        // the same error as the others, so every caller hears the real cause (e.g. 507 disk full).
        let mut ops = group.into_iter();
        self.state.disk_room_bytes = self.disk.room_bytes(&self.conn);
        let outcome = (|| -> Result<(), StoreError> {
            let tx = self.conn.unchecked_transaction().map_err(StoreError::from_sqlite)?;
            let now_ms = outpost_core::time::now_unix_ms();
            // A database error leaves the transaction in an unknown state and fails the whole
            // group; the operation it happened in is answered with the others.
            macro_rules! settle {
                ($result:expr, $variant:path, $reply:expr) => {
                    match fatal_or($result) {
                        Ok(result) => result,
                        Err(error) => {
                            pending.push($variant($reply, Err(StoreError::Closed)));
                            return Err(error);
                        }
                    }
                };
            }
            for op in ops.by_ref() {
                match op {
                    Op::Append { queue, messages, idempotency_key, reply } => {
                        if outpost_core::failpoint::hit("writer_panic") {
                            panic!("failpoint writer_panic: a panic inside the store writer");
                        }
                        let result = apply_append(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            messages,
                            idempotency_key,
                            now_ms,
                        );
                        let result = settle!(result, Pending::Append, reply);
                        if matches!(&result, Ok(a) if !a.duplicate) {
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Append(reply, result));
                    }
                    Op::AppendFromOrigin { queue, origin, messages, reply } => {
                        let message_count = messages.len() as u64;
                        let result = apply_origin_append(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &origin,
                            messages,
                            now_ms,
                        );
                        let result = settle!(result, Pending::Origin, reply);
                        if matches!(&result, Ok(a) if a.gap_expected_seq.is_none() && (a.stored > 0 || a.stored + a.duplicates < message_count))
                        {
                            changes.origin_positions.insert((origin, queue.clone()));
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Origin(reply, result));
                    }
                    Op::ReleaseFromOrigin { queue, origin, through_seq, reply } => {
                        let result = apply_origin_release(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &origin,
                            through_seq,
                        );
                        let result = settle!(result, Pending::Origin, reply);
                        let key = (origin, queue.clone());
                        if result.is_ok() && self.state.origin_positions.contains_key(&key) {
                            changes.origin_positions.insert(key);
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Origin(reply, result));
                    }
                    Op::AdvanceCursor { queue, reader, acked_seq, reply } => {
                        let result = apply_advance_cursor(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &reader,
                            acked_seq,
                            self.disk.release_chunk_bytes,
                        );
                        let result = settle!(result, Pending::Done, reply);
                        if result.is_ok() {
                            changes.cursors.insert((queue.clone(), reader));
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Done(reply, result));
                    }
                    Op::PutDocument { key, value, reply } => {
                        let result = tx
                            .prepare_cached(
                                "INSERT INTO documents (key, value, updated_at_ms) VALUES (?1, ?2, ?3)
                                 ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                            )
                            .and_then(|mut stmt| stmt.execute(params![key, value, now_ms]))
                            .map(|_| ())
                            .map_err(StoreError::from);
                        let result = settle!(result, Pending::Done, reply);
                        pending.push(Pending::Done(reply, result));
                    }
                    Op::FailMessage { failure, reply } => {
                        // The cursor first: if it refuses (non-fatal), nothing has been written.
                        let result = apply_advance_cursor(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &failure.message.queue,
                            &failure.reader,
                            failure.message.seq,
                            self.disk.release_chunk_bytes,
                        )
                        .and_then(|()| failed::insert(&tx, &failure, now_ms));
                        let result = settle!(result, Pending::Failed, reply);
                        if result.is_ok() {
                            self.state.failed_bytes += failure.message.payload.len() as u64;
                            changes.cursors.insert((failure.message.queue.clone(), failure.reader.clone()));
                            changes.queues.insert(failure.message.queue.clone());
                        }
                        pending.push(Pending::Failed(reply, result.map(failed::FailedOutcome::Inserted)));
                    }
                    Op::ChangeFailed { change, reply } => {
                        let mut freed = 0;
                        let result = settle!(
                            failed::apply_change(&tx, change, now_ms, &mut freed),
                            Pending::Failed,
                            reply
                        );
                        self.state.failed_bytes = self.state.failed_bytes.saturating_sub(freed);
                        pending.push(Pending::Failed(reply, result));
                    }
                    Op::ConsumerLease { queue, name, request, reply } => {
                        let result = crate::consumers_sqlite::lease(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &name,
                            request,
                            now_ms,
                            self.disk.release_chunk_bytes,
                        );
                        let result = settle!(result, Pending::Leased, reply);
                        if result.is_ok() {
                            changes.cursors.insert((queue.clone(), crate::consumers::consumer_reader(&name)));
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Leased(reply, result));
                    }
                    Op::ConsumerSettle { queue, name, lease_ids, settle, reply } => {
                        let result = crate::consumers_sqlite::settle(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &name,
                            &lease_ids,
                            settle,
                            now_ms,
                            self.disk.release_chunk_bytes,
                        );
                        let result = settle!(result, Pending::Settled, reply);
                        if matches!(&result, Ok(outcome) if outcome.consumer_exists) {
                            changes.cursors.insert((queue.clone(), crate::consumers::consumer_reader(&name)));
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Settled(reply, result));
                    }
                    Op::ConsumerDelete { queue, name, reply } => {
                        let result = crate::consumers_sqlite::delete(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &name,
                            self.disk.release_chunk_bytes,
                        );
                        let result = settle!(result, Pending::Deleted, reply);
                        if matches!(&result, Ok(true)) {
                            changes.cursors.insert((queue.clone(), crate::consumers::consumer_reader(&name)));
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Deleted(reply, result));
                    }
                    Op::Ping { reply } => pending.push(Pending::Ping(reply)),
                    Op::Shutdown { reply } => shutdown = Some(reply),
                }
            }
            for queue in &changes.queues {
                let last_seq = self.state.stats[queue].last_seq;
                tx.prepare_cached("UPDATE queues SET last_seq = ?1 WHERE queue_id = ?2")?
                    .execute(params![last_seq as i64, self.state.queue_ids[queue]])?;
            }
            tx.commit().map_err(StoreError::from_sqlite)
        })();
        if outcome.is_err() {
            for op in ops {
                match op {
                    Op::Append { reply, .. } => pending.push(Pending::Append(reply, Err(StoreError::Closed))),
                    Op::AppendFromOrigin { reply, .. } | Op::ReleaseFromOrigin { reply, .. } => {
                        pending.push(Pending::Origin(reply, Err(StoreError::Closed)))
                    }
                    Op::AdvanceCursor { reply, .. } | Op::PutDocument { reply, .. } => {
                        pending.push(Pending::Done(reply, Err(StoreError::Closed)))
                    }
                    Op::FailMessage { reply, .. } | Op::ChangeFailed { reply, .. } => {
                        pending.push(Pending::Failed(reply, Err(StoreError::Closed)))
                    }
                    Op::ConsumerLease { reply, .. } => {
                        pending.push(Pending::Leased(reply, Err(StoreError::Closed)))
                    }
                    Op::ConsumerSettle { reply, .. } => {
                        pending.push(Pending::Settled(reply, Err(StoreError::Closed)))
                    }
                    Op::ConsumerDelete { reply, .. } => {
                        pending.push(Pending::Deleted(reply, Err(StoreError::Closed)))
                    }
                    Op::Ping { reply } => pending.push(Pending::Ping(reply)),
                    Op::Shutdown { reply } => shutdown = Some(reply),
                }
            }
        }

        match outcome {
            Ok(()) => {
                if !changes.is_empty() {
                    self.publish(Some(&changes));
                    self.commits.send_modify(|generation| *generation += 1);
                }
                if let Some(observer) = &self.observer {
                    observer(started.elapsed(), op_count);
                }
                for p in pending {
                    match p {
                        Pending::Append(reply, result) => drop(reply.send(result)),
                        Pending::Origin(reply, result) => drop(reply.send(result)),
                        Pending::Done(reply, result) => drop(reply.send(result)),
                        Pending::Failed(reply, result) => drop(reply.send(result)),
                        Pending::Leased(reply, result) => drop(reply.send(result)),
                        Pending::Settled(reply, result) => drop(reply.send(result)),
                        Pending::Deleted(reply, result) => drop(reply.send(result)),
                        Pending::Ping(reply) => drop(reply.send(())),
                    }
                }
            }
            Err(error) => {
                let message = error.to_string();
                let disk_full = matches!(error, StoreError::DiskFull(_));
                tracing::error!(%message, operations = op_count, "store commit failed; every write in it was refused");
                let failure = || {
                    if disk_full {
                        StoreError::DiskFull(message.clone())
                    } else {
                        StoreError::CommitFailed(message.clone())
                    }
                };
                for p in pending {
                    match p {
                        Pending::Append(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Origin(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Done(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Failed(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Leased(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Settled(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Deleted(reply, _) => drop(reply.send(Err(failure()))),
                        Pending::Ping(reply) => drop(reply.send(())),
                    }
                }
                self.recover_after_failed_commit(disk_full);
            }
        }
        shutdown
    }
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

/// A write fits when the quota (`limits.max_store_bytes`) has room for it and the disk has room for
/// it beyond the reserve that checkpoints and releases need.
fn check_quota(options: &StoreOptions, state: &State, needed_bytes: u64) -> Result<(), StoreError> {
    if needed_bytes > state.disk_room_bytes {
        return Err(StoreError::DiskReserve { room_bytes: state.disk_room_bytes, needed_bytes });
    }
    let used_bytes = state.total_bytes + state.key_bytes + state.failed_bytes;
    if used_bytes.saturating_add(needed_bytes) > options.max_store_bytes {
        return Err(StoreError::QuotaReached {
            used_bytes,
            needed_bytes,
            limit_bytes: options.max_store_bytes,
        });
    }
    Ok(())
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
    if state.queue_ids.len() as u64 >= options.max_queues {
        return Err(StoreError::TooManyQueues { queue: queue.to_string(), limit: options.max_queues });
    }
    check_quota(options, state, needed_bytes)?;
    tx.execute("INSERT INTO queues (name, last_seq) VALUES (?1, 0)", [queue])?;
    let id = tx.last_insert_rowid();
    state.queue_ids.insert(queue.to_string(), id);
    state.stats.insert(
        queue.to_string(),
        QueueStats { name: queue.to_string(), first_seq: 1, ..Default::default() },
    );
    Ok(id)
}

/// One message row to insert.
struct Row<'a> {
    id: String,
    origin: &'a str,
    origin_seq: Option<u64>,
    content_type: &'a str,
    payload: &'a [u8],
}

/// Inserts rows at the end of a queue with consecutive seqs; returns (first_seq, last_seq).
fn insert_rows<'a>(
    tx: &Transaction<'_>,
    state: &mut State,
    queue: &str,
    queue_id: i64,
    rows: impl Iterator<Item = Row<'a>>,
    now_ms: i64,
    ids: &mut Vec<String>,
) -> Result<(u64, u64), StoreError> {
    let queue_stats = state.stats.get_mut(queue).expect("stats exist for every known queue");
    let first_seq = queue_stats.last_seq + 1;
    let mut seq = queue_stats.last_seq;
    let mut bytes = 0u64;
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages (queue_id, seq, id, origin, origin_seq, content_type, accepted_at_ms, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for row in rows {
        seq += 1;
        insert.execute(params![
            queue_id,
            seq as i64,
            row.id,
            row.origin,
            row.origin_seq.unwrap_or(seq) as i64,
            row.content_type,
            now_ms,
            row.payload
        ])?;
        bytes += row.payload.len() as u64;
        ids.push(row.id);
    }
    let count = seq - queue_stats.last_seq;
    if queue_stats.messages == 0 && count > 0 {
        queue_stats.first_seq = first_seq;
        queue_stats.oldest_accepted_at_ms = Some(now_ms);
    }
    queue_stats.last_seq = seq;
    queue_stats.messages += count;
    queue_stats.bytes += bytes;
    state.total_bytes += bytes;
    state.disk_room_bytes = state.disk_room_bytes.saturating_sub(bytes);
    Ok((first_seq, seq))
}

fn apply_append(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    messages: Vec<NewMessage>,
    idempotency_key: Option<String>,
    now_ms: i64,
) -> Result<Appended, StoreError> {
    if messages.is_empty() {
        return Err(StoreError::Invalid("an append needs at least one message".into()));
    }
    let needed: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
    // A new queue holds no key yet: its key's bytes are part of what the quota must have room for.
    let new_key_bytes =
        idempotency_key.as_ref().map_or(0, |key| key.len() as u64 + crate::IDEMPOTENCY_KEY_OVERHEAD_BYTES);
    let queue_id = ensure_queue(tx, options, state, queue, needed + new_key_bytes)?;

    // A key older than the TTL is forgotten (its row may wait for the next prune): reused, it
    // stores a new message and takes the row over.
    let key_cutoff_ms = now_ms - options.idempotency_ttl.as_millis() as i64;
    let mut key_row_exists = false;
    if let Some(key) = &idempotency_key {
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
    check_quota(options, state, needed + key_bytes)?;

    let mut ids = Vec::with_capacity(messages.len());
    let rows = messages.iter().map(|m| Row {
        id: m.id.clone().unwrap_or_else(outpost_core::new_message_id),
        origin: &options.node_id,
        origin_seq: None,
        content_type: &m.content_type,
        payload: &m.payload,
    });
    let (first_seq, last_seq) = insert_rows(tx, state, queue, queue_id, rows, now_ms, &mut ids)?;
    if let Some(key) = &idempotency_key {
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
    messages: Vec<BatchMessage>,
    now_ms: i64,
) -> Result<OriginAppended, StoreError> {
    let key = (origin.to_string(), queue.to_string());
    let position = state.origin_positions.get(&key).copied().unwrap_or(0);
    let (fresh, duplicates) = match crate::ops::plan_origin_append(position, &messages) {
        Ok(plan) => plan,
        Err(answer) => return Ok(answer),
    };
    let needed: u64 = fresh.iter().map(|m| m.payload.len() as u64).sum();
    let queue_id = ensure_queue(tx, options, state, queue, needed)?;
    check_quota(options, state, needed)?;

    let mut ids = Vec::with_capacity(fresh.len());
    // Skip entries only move the position (see `outpost_core::wire`).
    let rows = fresh.iter().filter(|m| !m.is_skip()).map(|m| Row {
        id: m.id.clone(),
        origin,
        origin_seq: Some(m.seq),
        content_type: &m.content_type,
        payload: &m.payload,
    });
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
    let answer =
        |stored_through| OriginAppended { stored_through, stored: 0, duplicates: 0, gap_expected_seq: None };
    if through_seq <= position {
        return Ok(answer(position));
    }
    let queue_id = ensure_queue(tx, options, state, queue, 0)?;
    tx.prepare_cached(
        "INSERT INTO origin_positions (origin, queue_id, last_origin_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT(origin, queue_id) DO UPDATE SET last_origin_seq = excluded.last_origin_seq",
    )?
    .execute(params![origin, queue_id, through_seq as i64])?;
    state.origin_positions.insert(key, through_seq);
    Ok(answer(through_seq))
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
    let Some(&queue_id) = state.queue_ids.get(queue) else {
        return Err(StoreError::Invalid(format!("no queue named {queue:?}")));
    };
    let last_seq = state.stats[queue].last_seq;
    if acked_seq > last_seq {
        return Err(StoreError::Invalid(format!(
            "reader {reader:?} cannot be done with seq {acked_seq} of queue {queue:?}: the last seq is {last_seq}"
        )));
    }
    let key = (queue.to_string(), reader.to_string());
    if state.cursors.get(&key).is_some_and(|current| *current >= acked_seq) {
        return Ok(());
    }
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
    let through = required
        .iter()
        .map(|r| state.cursors.get(&(queue.to_string(), r.clone())).copied().unwrap_or(0))
        .chain(consumers)
        .min()?;
    let stats = state.stats.get(queue)?;
    (through >= stats.first_seq && stats.messages > 0).then_some(through)
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
    queue_stats.messages -= count;
    queue_stats.bytes -= bytes;
    queue_stats.first_seq = through + 1;
    queue_stats.oldest_accepted_at_ms = oldest;
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
