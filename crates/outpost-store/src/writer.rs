//! The single writer thread: owns the write connection and group-commits every operation that is
//! waiting when a commit starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::{schema, Appended, CommitObserver, NewMessage, QueueStats, StoreError, StoreOptions};

/// The most operations one commit carries.
pub const MAX_OPS_PER_COMMIT: usize = 4096;
/// The most payload bytes one commit carries (a single larger operation still commits alone).
pub const MAX_BYTES_PER_COMMIT: usize = 32 << 20;

pub enum Op {
    Append {
        queue: String,
        messages: Vec<NewMessage>,
        idempotency_key: Option<String>,
        reply: oneshot::Sender<Result<Appended, StoreError>>,
    },
    Ping {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Op {
    fn payload_bytes(&self) -> usize {
        match self {
            Op::Append { messages, .. } => messages.iter().map(|m| m.payload.len()).sum(),
            Op::Ping { .. } | Op::Shutdown { .. } => 0,
        }
    }
}

/// A reply waiting for its commit.
enum Pending {
    Append(oneshot::Sender<Result<Appended, StoreError>>, Result<Appended, StoreError>),
    Ping(oneshot::Sender<()>),
}

pub struct Writer {
    conn: Connection,
    options: StoreOptions,
    shared_stats: Arc<RwLock<BTreeMap<String, QueueStats>>>,
    stats: BTreeMap<String, QueueStats>,
    queue_ids: HashMap<String, i64>,
    total_bytes: u64,
    observer: Option<CommitObserver>,
}

impl Writer {
    pub fn new(
        conn: Connection,
        options: StoreOptions,
        shared_stats: Arc<RwLock<BTreeMap<String, QueueStats>>>,
        total_bytes: u64,
        observer: Option<CommitObserver>,
    ) -> Result<Writer, StoreError> {
        let stats = shared_stats.read().expect("stats lock poisoned").clone();
        let queue_ids = load_queue_ids(&conn)?;
        Ok(Writer { conn, options, shared_stats, stats, queue_ids, total_bytes, observer })
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

    /// Applies a group in one transaction and answers each operation after the commit. Returns the
    /// shutdown reply if the group asked to stop.
    fn commit_group(&mut self, group: Vec<Op>) -> Option<oneshot::Sender<()>> {
        let started = Instant::now();
        let op_count = group.len();
        let mut pending = Vec::with_capacity(group.len());
        let mut shutdown = None;
        let mut touched = BTreeSet::new();

        let outcome = (|| -> Result<(), StoreError> {
            let tx = self.conn.unchecked_transaction()?;
            for op in group {
                match op {
                    Op::Append { queue, messages, idempotency_key, reply } => {
                        let result = apply_append(
                            &tx,
                            &self.options,
                            &mut self.stats,
                            &mut self.queue_ids,
                            &mut self.total_bytes,
                            &queue,
                            messages,
                            idempotency_key,
                        );
                        match result {
                            // A rejected write (quota) changed nothing; a database error leaves the
                            // transaction in an unknown state, so the whole group fails.
                            Err(StoreError::Sqlite(e)) => return Err(StoreError::from_sqlite(e)),
                            Err(e @ StoreError::DiskFull(_)) => return Err(e),
                            other => {
                                if matches!(&other, Ok(a) if !a.duplicate) {
                                    touched.insert(queue);
                                }
                                pending.push(Pending::Append(reply, other));
                            }
                        }
                    }
                    Op::Ping { reply } => pending.push(Pending::Ping(reply)),
                    Op::Shutdown { reply } => shutdown = Some(reply),
                }
            }
            for queue in &touched {
                let last_seq = self.stats[queue].last_seq;
                tx.execute(
                    "UPDATE queues SET last_seq = ?1 WHERE queue_id = ?2",
                    params![last_seq as i64, self.queue_ids[queue]],
                )?;
            }
            tx.commit().map_err(StoreError::from_sqlite)
        })();

        match outcome {
            Ok(()) => {
                if !touched.is_empty() {
                    let mut shared = self.shared_stats.write().expect("stats lock poisoned");
                    for queue in &touched {
                        shared.insert(queue.clone(), self.stats[queue].clone());
                    }
                }
                if let Some(observer) = &self.observer {
                    observer(started.elapsed(), op_count);
                }
                for p in pending {
                    match p {
                        Pending::Append(reply, result) => {
                            let _ = reply.send(result);
                        }
                        Pending::Ping(reply) => {
                            let _ = reply.send(());
                        }
                    }
                }
            }
            Err(error) => {
                let message = error.to_string();
                let disk_full = matches!(error, StoreError::DiskFull(_));
                tracing::error!(%message, operations = op_count, "store commit failed; every write in it was refused");
                for p in pending {
                    if let Pending::Append(reply, _) = p {
                        let e = if disk_full {
                            StoreError::DiskFull(message.clone())
                        } else {
                            StoreError::Corrupt(format!("commit failed: {message}"))
                        };
                        let _ = reply.send(Err(e));
                    }
                }
                // The in-memory view may hold changes that never committed: rebuild it from disk,
                // the same way startup does.
                self.reload();
            }
        }
        shutdown
    }

    fn reload(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
        match (schema::load_stats(&self.conn), load_queue_ids(&self.conn)) {
            (Ok(stats), Ok(ids)) => {
                self.total_bytes = stats.values().map(|q| q.bytes).sum();
                self.stats = stats.clone();
                self.queue_ids = ids;
                *self.shared_stats.write().expect("stats lock poisoned") = stats;
            }
            (Err(e), _) | (_, Err(e)) => {
                // The writer cannot know what is on disk: crash loudly; the supervisor restarts the
                // node and startup rebuilds everything from the database.
                panic!("store writer cannot reload its state after a failed commit: {e}");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_append(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    stats: &mut BTreeMap<String, QueueStats>,
    queue_ids: &mut HashMap<String, i64>,
    total_bytes: &mut u64,
    queue: &str,
    messages: Vec<NewMessage>,
    idempotency_key: Option<String>,
) -> Result<Appended, StoreError> {
    if messages.is_empty() {
        return Err(StoreError::Invalid("an append needs at least one message".into()));
    }
    let needed: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
    let queue_id = match queue_ids.get(queue) {
        Some(id) => *id,
        None => {
            // Checked before the queue is created, so a rejected write leaves no empty queue behind.
            check_quota(options, *total_bytes, needed)?;
            tx.execute("INSERT INTO queues (name, last_seq) VALUES (?1, 0)", [queue])?;
            let id = tx.last_insert_rowid();
            queue_ids.insert(queue.to_string(), id);
            stats.insert(
                queue.to_string(),
                QueueStats { name: queue.to_string(), first_seq: 1, ..Default::default() },
            );
            id
        }
    };

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

    check_quota(options, *total_bytes, needed)?;

    let now_ms = outpost_core::time::now_unix_ms();
    let queue_stats = stats.get_mut(queue).expect("stats exist for every known queue");
    let first_seq = queue_stats.last_seq + 1;
    let mut ids = Vec::with_capacity(messages.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (queue_id, seq, id, origin, origin_seq, content_type, accepted_at_ms, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for (i, message) in messages.iter().enumerate() {
            let seq = first_seq + i as u64;
            let id = message.id.clone().unwrap_or_else(outpost_core::new_message_id);
            let (origin, origin_seq) = match &message.origin {
                Some((origin, origin_seq)) => (origin.as_str(), *origin_seq),
                None => (options.node_id.as_str(), seq),
            };
            insert.execute(params![
                queue_id,
                seq as i64,
                id,
                origin,
                origin_seq as i64,
                message.content_type,
                now_ms,
                &message.payload[..]
            ])?;
            ids.push(id);
        }
    }
    let last_seq = first_seq + messages.len() as u64 - 1;
    if let Some(key) = &idempotency_key {
        tx.prepare_cached(
            "INSERT INTO idempotency_keys (queue_id, key, seq, id, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![queue_id, key, first_seq as i64, ids[0], now_ms])?;
    }

    if queue_stats.messages == 0 {
        queue_stats.first_seq = first_seq;
        queue_stats.oldest_accepted_at_ms = Some(now_ms);
    }
    queue_stats.last_seq = last_seq;
    queue_stats.messages += messages.len() as u64;
    queue_stats.bytes += needed;
    *total_bytes += needed;
    Ok(Appended { first_seq, last_seq, ids, duplicate: false })
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

fn load_queue_ids(conn: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = conn.prepare("SELECT name, queue_id FROM queues")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<HashMap<_, _>, _>>()?)
}
