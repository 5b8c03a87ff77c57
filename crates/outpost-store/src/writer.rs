//! The SQLite backend's single writer thread: owns the write connection and group-commits every
//! operation that is waiting when a commit starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use outpost_core::wire::BatchMessage;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot, watch};

use crate::ops::{Op, Reply, Views, MAX_BYTES_PER_COMMIT, MAX_OPS_PER_COMMIT};
use crate::{
    failed, schema, Appended, CommitObserver, NewMessage, OriginAppended, QueueStats, StoreError,
    StoreOptions,
};

/// The writer's own copy of everything the views show, changed inside a transaction and published
/// only after it commits.
#[derive(Clone)]
struct State {
    stats: BTreeMap<String, QueueStats>,
    queue_ids: HashMap<String, i64>,
    origin_positions: HashMap<(String, String), u64>,
    cursors: HashMap<(String, String), u64>,
    total_bytes: u64,
}

impl State {
    fn load(conn: &Connection) -> Result<State, StoreError> {
        let stats = schema::load_stats(conn)?;
        let total_bytes = stats.values().map(|q| q.bytes).sum();
        Ok(State {
            stats,
            queue_ids: load_queue_ids(conn)?,
            origin_positions: schema::load_origin_positions(conn)?,
            cursors: schema::load_cursors(conn)?,
            total_bytes,
        })
    }
}

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
    Ping(oneshot::Sender<()>),
}

pub struct Writer {
    conn: Connection,
    options: StoreOptions,
    views: Arc<Views>,
    commits: watch::Sender<u64>,
    state: State,
    observer: Option<CommitObserver>,
}

impl Writer {
    pub fn new(
        conn: Connection,
        options: StoreOptions,
        views: Arc<Views>,
        commits: watch::Sender<u64>,
        observer: Option<CommitObserver>,
    ) -> Result<Writer, StoreError> {
        let state = State::load(&conn)?;
        let writer = Writer { conn, options, views, commits, state, observer };
        writer.publish(None);
        Ok(writer)
    }

    pub fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        let mut shutdown_reply = None;
        while shutdown_reply.is_none() {
            let Some(first) = ops.blocking_recv() else { break };
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
                cursors.insert(key.clone(), self.state.cursors[key]);
            }
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

        let outcome = (|| -> Result<(), StoreError> {
            let tx = self.conn.unchecked_transaction()?;
            let now_ms = outpost_core::time::now_unix_ms();
            for op in group {
                match op {
                    Op::Append { queue, messages, idempotency_key, reply } => {
                        let result = apply_append(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            messages,
                            idempotency_key,
                            now_ms,
                        );
                        let result = fatal_or(result)?;
                        if matches!(&result, Ok(a) if !a.duplicate) {
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Append(reply, result));
                    }
                    Op::AppendFromOrigin { queue, origin, messages, reply } => {
                        let result = apply_origin_append(
                            &tx,
                            &self.options,
                            &mut self.state,
                            &queue,
                            &origin,
                            messages,
                            now_ms,
                        );
                        let result = fatal_or(result)?;
                        if matches!(&result, Ok(a) if a.stored > 0) {
                            changes.origin_positions.insert((origin, queue.clone()));
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
                        );
                        let result = fatal_or(result)?;
                        if result.is_ok() {
                            changes.cursors.insert((queue.clone(), reader));
                            changes.queues.insert(queue);
                        }
                        pending.push(Pending::Done(reply, result));
                    }
                    Op::PutDocument { key, value, reply } => {
                        tx.prepare_cached(
                            "INSERT INTO documents (key, value, updated_at_ms) VALUES (?1, ?2, ?3)
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                        )?
                        .execute(params![key, value, now_ms])?;
                        pending.push(Pending::Done(reply, Ok(())));
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
                        )
                        .and_then(|()| failed::insert(&tx, &failure, now_ms));
                        let result = fatal_or(result)?;
                        if result.is_ok() {
                            changes.cursors.insert((failure.message.queue.clone(), failure.reader.clone()));
                            changes.queues.insert(failure.message.queue.clone());
                        }
                        pending.push(Pending::Failed(reply, result.map(failed::FailedOutcome::Inserted)));
                    }
                    Op::ChangeFailed { change, reply } => {
                        let result = fatal_or(failed::apply_change(&tx, change, now_ms))?;
                        pending.push(Pending::Failed(reply, result));
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
                        Pending::Ping(reply) => drop(reply.send(())),
                    }
                }
                // The in-memory state may hold changes that never committed: rebuild it from disk,
                // the same way startup does.
                let _ = self.conn.execute_batch("ROLLBACK");
                match State::load(&self.conn) {
                    Ok(state) => {
                        self.state = state;
                        self.publish(None);
                    }
                    // The writer cannot know what is on disk: crash loudly; the supervisor restarts
                    // the node and startup rebuilds everything from the database.
                    Err(e) => panic!("store writer cannot reload its state after a failed commit: {e}"),
                }
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

fn check_quota(options: &StoreOptions, used_bytes: u64, needed_bytes: u64) -> Result<(), StoreError> {
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
fn ensure_queue(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    needed_bytes: u64,
) -> Result<i64, StoreError> {
    if let Some(id) = state.queue_ids.get(queue) {
        return Ok(*id);
    }
    check_quota(options, state.total_bytes, needed_bytes)?;
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
    let queue_id = ensure_queue(tx, options, state, queue, needed)?;

    if let Some(key) = &idempotency_key {
        let existing: Option<(i64, String)> = tx
            .prepare_cached("SELECT seq, id FROM idempotency_keys WHERE queue_id = ?1 AND key = ?2")?
            .query_row(params![queue_id, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((seq, id)) = existing {
            return Ok(Appended {
                first_seq: seq as u64,
                last_seq: seq as u64,
                ids: vec![id],
                duplicate: true,
            });
        }
    }
    check_quota(options, state.total_bytes, needed)?;

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
            "INSERT INTO idempotency_keys (queue_id, key, seq, id, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![queue_id, key, first_seq as i64, ids[0], now_ms])?;
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
    check_quota(options, state.total_bytes, needed)?;

    let mut ids = Vec::with_capacity(fresh.len());
    let rows = fresh.iter().map(|m| Row {
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
    Ok(OriginAppended { stored_through, stored: fresh.len() as u64, duplicates, gap_expected_seq: None })
}

/// Records that `reader` is done with `queue` through `acked_seq`, then releases the prefix every
/// required reader is done with.
fn apply_advance_cursor(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    reader: &str,
    acked_seq: u64,
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

    let required = (options.readers_of)(queue);
    let Some(release_through) = required
        .iter()
        .map(|r| state.cursors.get(&(queue.to_string(), r.clone())).copied().unwrap_or(0))
        .min()
    else {
        return Ok(()); // nobody is required to read this queue: keep everything
    };
    let queue_stats = state.stats.get_mut(queue).expect("stats exist for every known queue");
    if release_through < queue_stats.first_seq {
        return Ok(());
    }
    let (count, bytes): (i64, i64) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages WHERE queue_id = ?1 AND seq <= ?2",
        )?
        .query_row(params![queue_id, release_through as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
    tx.prepare_cached("DELETE FROM messages WHERE queue_id = ?1 AND seq <= ?2")?
        .execute(params![queue_id, release_through as i64])?;
    let oldest: Option<i64> = tx
        .prepare_cached("SELECT accepted_at_ms FROM messages WHERE queue_id = ?1 ORDER BY seq LIMIT 1")?
        .query_row([queue_id], |r| r.get(0))
        .optional()?;
    queue_stats.messages -= count as u64;
    queue_stats.bytes -= bytes as u64;
    queue_stats.first_seq = release_through + 1;
    queue_stats.oldest_accepted_at_ms = oldest;
    state.total_bytes -= bytes as u64;
    Ok(())
}

fn load_queue_ids(conn: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = conn.prepare("SELECT name, queue_id FROM queues")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<HashMap<_, _>, _>>()?)
}
