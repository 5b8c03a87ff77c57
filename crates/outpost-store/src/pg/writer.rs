//! The PostgreSQL backend's writer: one task per central that group-commits every operation
//! waiting when a commit starts, like the SQLite writer thread, but safe beside the writers of the
//! other centrals of the cluster.
//!
//! # One transaction per group
//!
//! 1. Lock what the group touches, always in the same order so two centrals cannot deadlock on
//!    it: the `(origin, queue)` rows of `outpost_origin_positions` (created at 0 if new: a row
//!    left at 0 is only that lock, never loaded into the views as a position), sorted,
//!    then the `outpost_queues` rows, sorted by name, all `FOR UPDATE`. A queue created by the group
//!    is locked when created. (A deadlock PostgreSQL still detects, e.g. two centrals creating the
//!    same queues in different orders, retries the whole group.)
//! 2. Apply the operations in order against the locked rows held in memory: seqs are assigned as
//!    `last_seq + 1 …` of the locked queue row (so seqs stay gapless cluster-wide), an edge's batch
//!    is checked against its locked position (so it is stored once cluster-wide), idempotency keys
//!    are looked up under the queue lock.
//! 3. Write everything at once: the messages of the whole group in one multi-row `INSERT … SELECT
//!    FROM unnest(…)`, every touched queue's `last_seq`, `messages`, `bytes`, `first_seq`, oldest
//!    timestamp and `version` in one `UPDATE … FROM unnest(…)`, the positions likewise, the
//!    documents the group puts in one upsert (a central's edges linking by the hundred per second
//!    cost one statement per group, not a round trip each), then
//!    `NOTIFY outpost_commits` naming what changed, and `COMMIT` (durable: `synchronous_commit=on`).
//! 4. Publish to the views and answer every operation.
//!
//! The quota (`max_store_bytes`) is checked against the sum of `outpost_queues.bytes` read at the
//! start of the group: cluster-wide, and exact for one central; concurrent centrals may overshoot
//! it by what their groups in flight carry.

mod consumers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use deadpool_postgres::{Pool, Transaction};
use outpost_core::wire::BatchMessage;
use tokio::sync::{mpsc, oneshot, watch};

use crate::failed::{FailedChange, FailedOutcome, FailedSelector, NewFailure, ResubmitOutcome};
use crate::ops::{self, NewRow, Op, Outcome, QueueTail, Views};
use crate::pg::listen::{self, CommitNotice};
use crate::pg::{self, COMMITS_CHANNEL};
use crate::{Appended, CommitObserver, NewMessage, OriginAppended, QueueStats, StoreError, StoreOptions};

/// How often a group that hit a deadlock or serialization failure is tried again.
const MAX_GROUP_RETRIES: usize = 5;
/// The largest NOTIFY payload sent; a bigger change list becomes "reload everything".
const MAX_NOTICE_BYTES: usize = 7900;

pub(crate) struct PgWriter {
    pool: Pool,
    url: String,
    options: StoreOptions,
    instance: String,
    views: Arc<Views>,
    commits: watch::Sender<u64>,
    observer: Option<CommitObserver>,
}

/// Why one try of a group failed.
enum TryError {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TryError {
    fn from(e: tokio_postgres::Error) -> TryError {
        TryError::Pg(e)
    }
}

struct LockedQueue {
    id: i64,
    stats: QueueStats,
    dirty: bool,
}

/// Message rows of the whole group, column by column, for one `unnest` insert.
#[derive(Default)]
struct Rows {
    queue_ids: Vec<i64>,
    seqs: Vec<i64>,
    ids: Vec<String>,
    origins: Vec<String>,
    origin_seqs: Vec<i64>,
    content_types: Vec<String>,
    accepted_at_ms: Vec<i64>,
    payloads: Vec<Bytes>,
}

#[derive(Default)]
struct Group {
    queues: HashMap<String, LockedQueue>,
    /// (origin, queue) → (position, changed).
    positions: HashMap<(String, String), (u64, bool)>,
    cursors: BTreeMap<(String, String), u64>,
    /// Cursors deleted (a consumer's), taken out of the views after the commit.
    removed_cursors: Vec<(String, String)>,
    total_bytes: u64,
    rows: Rows,
    /// Documents the group's operations put (key → last value), written in one statement.
    documents: BTreeMap<String, String>,
}

/// What a committed group changed, for the views.
struct Committed {
    outcomes: Vec<Outcome>,
    stats: Vec<(QueueStats, i64)>,
    positions: Vec<((String, String), u64)>,
    cursors: Vec<((String, String), u64)>,
    removed_cursors: Vec<(String, String)>,
}

impl PgWriter {
    pub(crate) fn new(
        pool: Pool,
        url: String,
        options: StoreOptions,
        instance: String,
        views: Arc<Views>,
        commits: watch::Sender<u64>,
        observer: Option<CommitObserver>,
    ) -> PgWriter {
        PgWriter { pool, url, options, instance, views, commits, observer }
    }

    pub(crate) async fn run(self, mut ops: mpsc::Receiver<Op>) {
        let mut shutdown_reply = None;
        // Off the commit path: pruning never holds up a write.
        let pruner =
            tokio::spawn(keep_keys_pruned(self.pool.clone(), self.url.clone(), self.options.idempotency_ttl));
        while shutdown_reply.is_none() {
            let Some(first) = ops.recv().await else { break };
            let group = ops::gather_group(first, &mut ops);
            shutdown_reply = self.commit_group(group).await;
        }
        pruner.abort();
        ops.close();
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
        tracing::debug!("PostgreSQL store writer stopped");
    }

    /// Commits a group (tried again after a deadlock or serialization failure with another
    /// central) and answers each operation. Returns the shutdown reply if the group asked to stop.
    async fn commit_group(&self, group: Vec<Op>) -> Option<oneshot::Sender<()>> {
        let started = Instant::now();
        let mut tries = 0;
        let outcome = loop {
            match self.try_group(&group).await {
                Ok(committed) => break Ok(committed),
                Err(TryError::Pg(e)) if pg::is_retryable(&e) && tries < MAX_GROUP_RETRIES => {
                    tries += 1;
                    tracing::debug!(
                        tries,
                        "group commit met a concurrent central's transaction; trying again: {e}"
                    );
                }
                Err(TryError::Pg(e)) => break Err(pg::pg_error(&self.url, e)),
                Err(TryError::Store(e)) => break Err(e),
            }
        };
        match outcome {
            Ok(mut committed) => {
                let outcomes = std::mem::take(&mut committed.outcomes);
                self.publish(committed);
                if let Some(observer) = &self.observer {
                    observer(started.elapsed(), group.len());
                }
                let answers = group.into_iter().zip(outcomes);
                answers.filter_map(|(op, outcome)| op.answer(outcome)).last()
            }
            Err(error) => {
                let message = error.to_string();
                tracing::error!(%message, operations = group.len(), "PostgreSQL commit failed; every write in it was refused");
                let failure = || match &error {
                    StoreError::DiskFull(m) => StoreError::DiskFull(m.clone()),
                    StoreError::Unavailable { url, detail } => {
                        StoreError::Unavailable { url: url.clone(), detail: detail.clone() }
                    }
                    _ => StoreError::CommitFailed(message.clone()),
                };
                group.into_iter().filter_map(|op| op.refuse(&failure)).last()
            }
        }
    }

    /// Takes what a committed group changed into the views, and tells `commits` waiters.
    fn publish(&self, committed: Committed) {
        let changed =
            !(committed.stats.is_empty() && committed.positions.is_empty() && committed.cursors.is_empty());
        listen::merge_stats(&self.views, committed.stats);
        listen::merge_max(&self.views.origin_positions, committed.positions);
        listen::merge_max(&self.views.cursors, committed.cursors);
        if !committed.removed_cursors.is_empty() {
            let mut cursors = self.views.cursors.write().expect("views lock poisoned");
            for key in &committed.removed_cursors {
                cursors.remove(key);
            }
        }
        if changed {
            self.commits.send_modify(|generation| *generation += 1);
        }
    }

    /// One try of a group: everything in one transaction, committed, or nothing.
    async fn try_group(&self, group: &[Op]) -> Result<Committed, TryError> {
        let mut client = self.pool.get().await.map_err(|e| TryError::Store(pg::pool_error(&self.url, e)))?;
        let tx = client.transaction().await?;
        let now_ms = outpost_core::time::now_unix_ms();

        // 1. Locks, in a fixed order: positions, then queues, each sorted.
        let mut state = lock_group(&tx, group).await?;

        // 2. The operations, in order.
        let mut outcomes = Vec::with_capacity(group.len());
        for op in group {
            outcomes.push(self.apply_op(&tx, &mut state, op, now_ms).await?);
        }

        // 3. Batched writes, the notice, the commit.
        flush_rows(&tx, &mut state.rows).await?;
        write_documents(&tx, &state.documents, now_ms).await?;
        let stats = write_queue_rows(&tx, &state).await?;
        let positions = write_positions(&tx, &state).await?;
        let cursors: Vec<((String, String), u64)> = std::mem::take(&mut state.cursors).into_iter().collect();
        if !(stats.is_empty() && positions.is_empty() && cursors.is_empty()) {
            self.notify_commit(&tx, &stats, &positions, &cursors).await?;
        }
        tx.commit().await?;
        Ok(Committed { outcomes, stats, positions, cursors, removed_cursors: state.removed_cursors })
    }

    /// One operation against the locked rows. A refusal of this operation is its outcome; a
    /// database error fails the group.
    async fn apply_op(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        op: &Op,
        now_ms: i64,
    ) -> Result<Outcome, TryError> {
        Ok(match op {
            Op::Append { queue, messages, idempotency_key, .. } => Outcome::Append(per_op(
                self.append(tx, state, queue, messages, idempotency_key.as_deref(), now_ms).await,
            )?),
            Op::AppendFromOrigin { queue, origin, messages, .. } => {
                Outcome::Origin(per_op(self.origin_append(tx, state, queue, origin, messages, now_ms).await)?)
            }
            Op::ReleaseFromOrigin { queue, origin, through_seq, .. } => {
                Outcome::Origin(per_op(self.origin_release(tx, state, queue, origin, *through_seq).await)?)
            }
            Op::AdvanceCursor { queue, reader, acked_seq, .. } => {
                Outcome::Done(per_op(self.advance_cursor(tx, state, queue, reader, *acked_seq).await)?)
            }
            Op::PutDocuments { documents, .. } => {
                // Written with the group's other documents in one statement (step 3): hundreds of
                // edges linking per second must not cost a round trip each.
                state.documents.extend(documents.iter().cloned());
                Outcome::Done(Ok(()))
            }
            Op::FailMessage { failure, .. } => {
                Outcome::Failed(per_op(self.fail_message(tx, state, failure, now_ms).await)?)
            }
            Op::ChangeFailed { change, .. } => {
                Outcome::Failed(per_op(change_failed(tx, change, now_ms).await)?)
            }
            Op::ConsumerLease { queue, name, request, .. } => {
                Outcome::Leased(per_op(self.consumer_lease(tx, state, queue, name, *request, now_ms).await)?)
            }
            Op::ConsumerSettle { queue, name, lease_ids, settle, .. } => Outcome::Settled(per_op(
                self.consumer_settle(tx, state, queue, name, lease_ids, *settle, now_ms).await,
            )?),
            Op::ConsumerDelete { queue, name, .. } => {
                Outcome::Deleted(per_op(self.consumer_delete(tx, state, queue, name).await)?)
            }
            Op::Ping { .. } | Op::Shutdown { .. } => Outcome::Nothing,
        })
    }

    /// Sends `NOTIFY outpost_commits` naming what the group changed (inside the transaction, so it
    /// is delivered only if the commit is); a list too long for a notice says "reload everything".
    async fn notify_commit(
        &self,
        tx: &Transaction<'_>,
        stats: &[(QueueStats, i64)],
        positions: &[((String, String), u64)],
        cursors: &[((String, String), u64)],
    ) -> Result<(), TryError> {
        let mut notice = CommitNotice {
            from: self.instance.clone(),
            queues: stats.iter().map(|(s, _)| s.name.clone()).collect(),
            positions: positions.iter().map(|(k, _)| k.clone()).collect(),
            cursors: cursors.iter().map(|(k, _)| k.clone()).collect(),
            all: false,
        };
        let mut payload = serde_json::to_string(&notice).expect("a commit notice serializes");
        if payload.len() > MAX_NOTICE_BYTES {
            notice = CommitNotice { from: self.instance.clone(), all: true, ..CommitNotice::default() };
            payload = serde_json::to_string(&notice).expect("a commit notice serializes");
        }
        let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
        tx.execute(&notify, &[&COMMITS_CHANNEL, &payload]).await?;
        Ok(())
    }

    /// Creates `queue` if the group has not locked it (after a quota check, so a refused write
    /// leaves no empty queue); the new or concurrently created row is locked either way.
    async fn ensure_queue(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        needed_bytes: u64,
    ) -> Result<(), TryError> {
        if state.queues.contains_key(queue) {
            return Ok(());
        }
        let existing = tx
            .prepare_cached(
                "SELECT queue_id, name, last_seq, messages, bytes, first_seq, oldest_accepted_at_ms
                 FROM outpost_queues WHERE name = $1 FOR UPDATE",
            )
            .await?;
        let row = match tx.query_opt(&existing, &[&queue]).await? {
            Some(row) => row,
            None => {
                let count = tx.prepare_cached("SELECT count(*) FROM outpost_queues").await?;
                let queues = tx.query_one(&count, &[]).await?.get::<_, i64>(0) as u64;
                ops::check_queue_count(&self.options, queues, queue).map_err(TryError::Store)?;
                check_quota(&self.options, state.total_bytes, needed_bytes)?;
                let create = tx
                    .prepare_cached(
                        "INSERT INTO outpost_queues (name) VALUES ($1)
                         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
                         RETURNING queue_id, name, last_seq, messages, bytes, first_seq, oldest_accepted_at_ms",
                    )
                    .await?;
                tx.query_one(&create, &[&queue]).await?
            }
        };
        let (id, stats) = locked_queue_from_row(&row);
        state.queues.insert(queue.to_string(), LockedQueue { id, stats, dirty: false });
        Ok(())
    }

    async fn append(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        messages: &[NewMessage],
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<Appended, TryError> {
        // A remembered key counts against the quota too (outpost_usage, kept by a trigger): a new
        // queue is created only if the whole write fits.
        let (needed, key_bytes) = ops::append_bytes(messages, idempotency_key).map_err(TryError::Store)?;
        self.ensure_queue(tx, state, queue, needed + key_bytes).await?;
        let queue_id = state.queues[queue].id;
        let mut key_row_exists = false;
        if let Some(key) = idempotency_key {
            // A key older than the TTL is forgotten (its row may wait for the next prune): reused,
            // it stores a new message and takes the row over, whose bytes are already counted.
            let key_cutoff_ms = now_ms - self.options.idempotency_ttl.as_millis() as i64;
            let lookup = tx
                .prepare_cached(
                    "SELECT seq, id, created_at_ms FROM outpost_idempotency_keys WHERE queue_id = $1 AND key = $2",
                )
                .await?;
            if let Some(row) = tx.query_opt(&lookup, &[&queue_id, &key]).await? {
                if row.get::<_, i64>(2) >= key_cutoff_ms {
                    let seq = row.get::<_, i64>(0) as u64;
                    return Ok(Appended {
                        first_seq: seq,
                        last_seq: seq,
                        ids: vec![row.get(1)],
                        duplicate: true,
                    });
                }
                key_row_exists = true;
            }
        }
        // The key's bytes count once while its row is stored (the insert trigger adds them to
        // `outpost_usage`; taking an expired row over adds nothing), as on SQLite.
        let key_bytes = if key_row_exists { 0 } else { key_bytes };
        check_quota(&self.options, state.total_bytes, needed + key_bytes)?;
        state.total_bytes += key_bytes;
        let mut ids = Vec::with_capacity(messages.len());
        let rows = ops::local_rows(messages, &self.options.node_id);
        let (first_seq, last_seq) = add_rows(state, queue, rows, now_ms, &mut ids);
        if let Some(key) = idempotency_key {
            let insert = tx
                .prepare_cached(
                    "INSERT INTO outpost_idempotency_keys (queue_id, key, seq, id, created_at_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (queue_id, key) DO UPDATE
                       SET seq = EXCLUDED.seq, id = EXCLUDED.id, created_at_ms = EXCLUDED.created_at_ms",
                )
                .await?;
            tx.execute(&insert, &[&queue_id, &key, &(first_seq as i64), &ids[0], &now_ms]).await?;
        }
        Ok(Appended { first_seq, last_seq, ids, duplicate: false })
    }

    async fn origin_append(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        origin: &str,
        messages: &[BatchMessage],
        now_ms: i64,
    ) -> Result<OriginAppended, TryError> {
        let key = (origin.to_string(), queue.to_string());
        let position = state.positions.get(&key).map(|(seq, _)| *seq).unwrap_or(0);
        let (fresh, duplicates) = match ops::plan_origin_append(position, messages) {
            Ok(plan) => plan,
            Err(answer) => return Ok(answer),
        };
        let needed: u64 = fresh.iter().map(|m| m.payload.len() as u64).sum();
        self.ensure_queue(tx, state, queue, needed).await?;
        check_quota(&self.options, state.total_bytes, needed)?;
        let mut ids = Vec::with_capacity(fresh.len());
        let rows = ops::origin_rows(&fresh, origin);
        add_rows(state, queue, rows, now_ms, &mut ids);
        let stored_through = fresh.last().expect("not empty").seq;
        state.positions.insert(key, (stored_through, true));
        Ok(OriginAppended { stored_through, stored: ids.len() as u64, duplicates, gap_expected_seq: None })
    }

    /// Moves (origin, queue)'s position to `through_seq` (never back) with nothing stored: the edge
    /// released those messages without forwarding them. Like a write, it creates the queue if new
    /// (`max_queues` applies), as the SQLite writer does.
    async fn origin_release(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        origin: &str,
        through_seq: u64,
    ) -> Result<OriginAppended, TryError> {
        // The position row was created and locked with the group's positions.
        let key = (origin.to_string(), queue.to_string());
        let position = state.positions.get(&key).map(|(seq, _)| *seq).unwrap_or(0);
        let (answer, moved) = ops::plan_origin_release(position, through_seq);
        let Some(through_seq) = moved else { return Ok(answer) };
        if !state.queues.contains_key(queue) {
            self.ensure_queue(tx, state, queue, 0).await?;
            // Written and published, so the new (empty) queue shows in every central's views.
            state.queues.get_mut(queue).expect("just created").dirty = true;
        }
        state.positions.insert(key, (through_seq, true));
        Ok(answer)
    }

    async fn advance_cursor(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        reader: &str,
        acked_seq: u64,
    ) -> Result<(), TryError> {
        let key = (queue.to_string(), reader.to_string());
        let last_seq = state.queues.get(queue).map(|locked| locked.stats.last_seq);
        // The view never runs ahead of the database: at or past `acked_seq` there is nothing to do.
        let known = self.views.cursors.read().expect("views lock poisoned").get(&key).copied().unwrap_or(0);
        let current = known.max(state.cursors.get(&key).copied().unwrap_or(0));
        if !ops::check_cursor_advance(queue, reader, acked_seq, last_seq, current).map_err(TryError::Store)? {
            return Ok(());
        }
        self.write_cursor(tx, state, queue, reader, acked_seq).await
    }

    /// Writes `reader`'s cursor at `acked_seq` (a row already past it keeps its seq: a cursor
    /// never moves back) and releases what every reader of `queue` has.
    async fn write_cursor(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        reader: &str,
        acked_seq: u64,
    ) -> Result<(), TryError> {
        let upsert = tx
            .prepare_cached(
                "INSERT INTO outpost_cursors (queue, reader, acked_seq) VALUES ($1, $2, $3)
                 ON CONFLICT (queue, reader) DO UPDATE SET acked_seq = GREATEST(outpost_cursors.acked_seq, EXCLUDED.acked_seq)
                 RETURNING acked_seq",
            )
            .await?;
        let acked: i64 = tx.query_one(&upsert, &[&queue, &reader, &(acked_seq as i64)]).await?.get(0);
        state.cursors.insert((queue.to_string(), reader.to_string()), acked as u64);
        self.release_queue(tx, state, queue).await
    }

    /// Deletes the messages of a locked queue that every required reader (and every consumer of the
    /// queue) is done with.
    async fn release_queue(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
    ) -> Result<(), TryError> {
        let queue_id = state.queues[queue].id;
        let mut required = (self.options.readers_of)(queue);
        let read = tx
            .prepare_cached(
                "SELECT reader, acked_seq FROM outpost_cursors
                 WHERE queue = $1 AND (reader = ANY($2) OR reader LIKE 'consumer:%')",
            )
            .await?;
        let found: HashMap<String, u64> = tx
            .query(&read, &[&queue, &required])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect();
        required.extend(found.keys().filter(|r| crate::consumers::is_consumer_reader(r)).cloned());
        let required = required.iter().map(|r| found.get(r).copied().unwrap_or(0));
        let Some(release_through) = ops::release_through(required, &state.queues[queue].stats) else {
            return Ok(()); // nothing to release, or nobody is required to read the queue
        };
        // Rows of this group not yet written must be in the table before the delete sees them.
        flush_rows(tx, &mut state.rows).await?;
        let delete = tx
            .prepare_cached(
                "WITH gone AS (DELETE FROM outpost_messages WHERE queue_id = $1 AND seq <= $2
                               RETURNING octet_length(payload) AS n)
                 SELECT count(*), coalesce(sum(n), 0)::bigint FROM gone",
            )
            .await?;
        let row = tx.query_one(&delete, &[&queue_id, &(release_through as i64)]).await?;
        let (count, bytes) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        let oldest = tx
            .prepare_cached(
                "SELECT accepted_at_ms FROM outpost_messages WHERE queue_id = $1 ORDER BY seq LIMIT 1",
            )
            .await?;
        let oldest: Option<i64> = tx.query_opt(&oldest, &[&queue_id]).await?.map(|r| r.get(0));
        let locked = state.queues.get_mut(queue).expect("checked above");
        ops::apply_release(&mut locked.stats, release_through, count, bytes, oldest);
        locked.dirty = true;
        // Read only for groups that append (it is the quota's input): saturate for the others.
        state.total_bytes = state.total_bytes.saturating_sub(bytes);
        Ok(())
    }

    async fn fail_message(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        failure: &NewFailure,
        now_ms: i64,
    ) -> Result<FailedOutcome, TryError> {
        // The cursor first: if it refuses (non-fatal), nothing has been written.
        self.advance_cursor(tx, state, &failure.message.queue, &failure.reader, failure.message.seq).await?;
        Ok(FailedOutcome::Inserted(insert_failed(tx, failure, now_ms).await?))
    }
}

/// Which rows a group locks: the (origin, queue) positions and the queues, each sorted, and whether
/// it appends or records an edge's release (then the quota's input is read too: either may create
/// a queue, which is checked against the quota as on SQLite).
fn lock_keys(group: &[Op]) -> (BTreeSet<(&str, &str)>, BTreeSet<&str>, bool) {
    let mut origin_keys = BTreeSet::new();
    let mut queue_names = BTreeSet::new();
    let mut reads_quota = false;
    for op in group {
        match op {
            Op::Append { queue, .. } => {
                queue_names.insert(queue.as_str());
                reads_quota = true;
            }
            Op::AppendFromOrigin { queue, origin, .. } => {
                origin_keys.insert((origin.as_str(), queue.as_str()));
                queue_names.insert(queue.as_str());
                reads_quota = true;
            }
            Op::ReleaseFromOrigin { queue, origin, .. } => {
                origin_keys.insert((origin.as_str(), queue.as_str()));
                queue_names.insert(queue.as_str());
                reads_quota = true;
            }
            Op::AdvanceCursor { queue, .. } => {
                queue_names.insert(queue.as_str());
            }
            Op::FailMessage { failure, .. } => {
                queue_names.insert(failure.message.queue.as_str());
            }
            // A consumer's operations are serialized cluster-wide by its queue's row lock.
            Op::ConsumerLease { queue, .. }
            | Op::ConsumerSettle { queue, .. }
            | Op::ConsumerDelete { queue, .. } => {
                queue_names.insert(queue.as_str());
            }
            _ => {}
        }
    }
    (origin_keys, queue_names, reads_quota)
}

/// Step 1 of a group: locks the rows it touches, always in the same order (positions, created at 0
/// if new, then queues), and reads what the quota is checked against when it appends or records a release.
async fn lock_group(tx: &Transaction<'_>, group: &[Op]) -> Result<Group, TryError> {
    let mut state = Group::default();
    let (origin_keys, queue_names, reads_quota) = lock_keys(group);
    if !origin_keys.is_empty() {
        let (origins, queues): (Vec<&str>, Vec<&str>) = origin_keys.iter().copied().unzip();
        let insert = tx
            .prepare_cached(
                "INSERT INTO outpost_origin_positions (origin, queue, last_origin_seq)
                 SELECT k.origin, k.queue, 0 FROM unnest($1::text[], $2::text[]) AS k(origin, queue)
                 ORDER BY k.origin, k.queue
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&insert, &[&origins, &queues]).await?;
        let lock = tx
            .prepare_cached(
                "SELECT p.origin, p.queue, p.last_origin_seq FROM outpost_origin_positions p
                 JOIN unnest($1::text[], $2::text[]) AS k(origin, queue) ON k.origin = p.origin AND k.queue = p.queue
                 ORDER BY p.origin, p.queue FOR UPDATE OF p",
            )
            .await?;
        for row in tx.query(&lock, &[&origins, &queues]).await? {
            state.positions.insert((row.get(0), row.get(1)), (row.get::<_, i64>(2) as u64, false));
        }
    }
    if !queue_names.is_empty() {
        let names: Vec<&str> = queue_names.iter().copied().collect();
        let lock = tx
            .prepare_cached(
                "SELECT queue_id, name, last_seq, messages, bytes, first_seq, oldest_accepted_at_ms
                 FROM outpost_queues WHERE name = ANY($1) ORDER BY name FOR UPDATE",
            )
            .await?;
        for row in tx.query(&lock, &[&names]).await? {
            let (id, stats) = locked_queue_from_row(&row);
            state.queues.insert(stats.name.clone(), LockedQueue { id, stats, dirty: false });
        }
    }
    if reads_quota {
        // Messages, failed copies and idempotency keys (the last two kept by triggers).
        let total = tx
            .prepare_cached(
                "SELECT ((SELECT coalesce(sum(bytes), 0) FROM outpost_queues)
                       + (SELECT coalesce(sum(key_bytes + failed_bytes), 0) FROM outpost_usage))::bigint",
            )
            .await?;
        state.total_bytes = tx.query_one(&total, &[]).await?.get::<_, i64>(0) as u64;
    }
    Ok(state)
}

/// Step 3: every queue row the group changed, in one `UPDATE … FROM unnest(…)`; returns their
/// stats at the version written.
async fn write_queue_rows(tx: &Transaction<'_>, state: &Group) -> Result<Vec<(QueueStats, i64)>, TryError> {
    let mut stats = Vec::new();
    let dirty: Vec<&LockedQueue> = state.queues.values().filter(|q| q.dirty).collect();
    if !dirty.is_empty() {
        let update = tx
            .prepare_cached(
                "UPDATE outpost_queues AS q
                 SET last_seq = u.last_seq, messages = u.messages, bytes = u.bytes, first_seq = u.first_seq,
                     oldest_accepted_at_ms = u.oldest, version = q.version + 1
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])
                      AS u(queue_id, last_seq, messages, bytes, first_seq, oldest)
                 WHERE q.queue_id = u.queue_id
                 RETURNING q.name, q.version",
            )
            .await?;
        let ids: Vec<i64> = dirty.iter().map(|q| q.id).collect();
        let last: Vec<i64> = dirty.iter().map(|q| q.stats.last_seq as i64).collect();
        let messages: Vec<i64> = dirty.iter().map(|q| q.stats.messages as i64).collect();
        let bytes: Vec<i64> = dirty.iter().map(|q| q.stats.bytes as i64).collect();
        let first: Vec<i64> = dirty.iter().map(|q| q.stats.first_seq as i64).collect();
        let oldest: Vec<Option<i64>> = dirty.iter().map(|q| q.stats.oldest_accepted_at_ms).collect();
        for row in tx.query(&update, &[&ids, &last, &messages, &bytes, &first, &oldest]).await? {
            let name: String = row.get(0);
            stats.push((state.queues[&name].stats.clone(), row.get::<_, i64>(1)));
        }
    }
    Ok(stats)
}

/// Step 3: every position the group moved, in one `UPDATE … FROM unnest(…)`; returns them.
async fn write_positions(
    tx: &Transaction<'_>,
    state: &Group,
) -> Result<Vec<((String, String), u64)>, TryError> {
    let positions: Vec<((String, String), u64)> = state
        .positions
        .iter()
        .filter(|(_, (_, changed))| *changed)
        .map(|(key, (seq, _))| (key.clone(), *seq))
        .collect();
    if !positions.is_empty() {
        let update = tx
            .prepare_cached(
                "UPDATE outpost_origin_positions AS p SET last_origin_seq = u.seq
                 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(origin, queue, seq)
                 WHERE p.origin = u.origin AND p.queue = u.queue",
            )
            .await?;
        let origins: Vec<&str> = positions.iter().map(|((o, _), _)| o.as_str()).collect();
        let queues: Vec<&str> = positions.iter().map(|((_, q), _)| q.as_str()).collect();
        let seqs: Vec<i64> = positions.iter().map(|(_, s)| *s as i64).collect();
        tx.execute(&update, &[&origins, &queues, &seqs]).await?;
    }
    Ok(positions)
}

/// Inserts the copy of a failed message; returns its entry id.
async fn insert_failed(tx: &Transaction<'_>, failure: &NewFailure, now_ms: i64) -> Result<i64, TryError> {
    {
        let m = &failure.message;
        let insert = tx
            .prepare_cached(
                "INSERT INTO outpost_failed (route, queue, seq, message_id, origin, origin_seq, content_type,
                     accepted_at_ms, payload, attempts, reason, last_error, first_failed_at_ms, last_failed_at_ms, status)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, 'failed')
                 RETURNING id",
            )
            .await?;
        let id: i64 = tx
            .query_one(
                &insert,
                &[
                    &failure.route,
                    &m.queue,
                    &(m.seq as i64),
                    &m.id,
                    &m.origin,
                    &(m.origin_seq as i64),
                    &m.content_type,
                    &m.accepted_at_ms,
                    &&m.payload[..],
                    &i64::from(failure.attempts),
                    &failure.reason,
                    &failure.last_error,
                    &now_ms,
                ],
            )
            .await?
            .get(0);
        Ok(id)
    }
}

/// Deletes idempotency keys older than `ttl` (lookups already ignore them), a chunk at a time, every
/// [`KEY_PRUNE_INTERVAL`] (or `ttl`, if shorter) and at once again while chunks come back full.
/// Every central prunes; a chunk another central is deleting at the same moment is skipped, not
/// waited for; a database that does not answer within [`KEY_PRUNE_TIMEOUT`] is tried next time.
async fn keep_keys_pruned(pool: deadpool_postgres::Pool, url: String, ttl: std::time::Duration) {
    let interval = ttl.min(KEY_PRUNE_INTERVAL);
    loop {
        tokio::time::sleep(interval).await;
        loop {
            let cutoff = outpost_core::time::now_unix_ms() - ttl.as_millis() as i64;
            let prune = async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                client
                    .execute(
                        "DELETE FROM outpost_idempotency_keys WHERE ctid IN
                           (SELECT ctid FROM outpost_idempotency_keys WHERE created_at_ms < $1
                            ORDER BY created_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
                        &[&cutoff, &KEY_PRUNE_CHUNK],
                    )
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(KEY_PRUNE_TIMEOUT, prune).await {
                Ok(Ok(count)) if count as i64 == KEY_PRUNE_CHUNK => continue,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(postgres = %url, "cannot prune expired idempotency keys: {e}"),
                Err(_) => tracing::warn!(postgres = %url,
                    "cannot prune expired idempotency keys: no answer within {KEY_PRUNE_TIMEOUT:?}"),
            }
            break;
        }
    }
}

/// How long one prune may take before it is given up until the next interval.
const KEY_PRUNE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often expired idempotency keys are pruned (at most; a short TTL prunes more often).
const KEY_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// The most expired keys one prune deletes; the rest follow after later commits.
const KEY_PRUNE_CHUNK: i64 = 10_000;

/// A refusal of one operation (quota, invalid) is its answer; a database error fails the group.
fn per_op<T>(result: Result<T, TryError>) -> Result<Result<T, StoreError>, TryError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(TryError::Store(e)) => Ok(Err(e)),
        Err(pg) => Err(pg),
    }
}

/// The quota, against the bytes of the whole cluster read when the group started (the disk is the
/// database server's: not measured here).
fn check_quota(options: &StoreOptions, used_bytes: u64, needed_bytes: u64) -> Result<(), TryError> {
    ops::check_quota(options, used_bytes, needed_bytes, u64::MAX).map_err(TryError::Store)
}

fn locked_queue_from_row(row: &tokio_postgres::Row) -> (i64, QueueStats) {
    (
        row.get(0),
        QueueStats {
            name: row.get(1),
            last_seq: row.get::<_, i64>(2) as u64,
            messages: row.get::<_, i64>(3) as u64,
            bytes: row.get::<_, i64>(4) as u64,
            first_seq: row.get::<_, i64>(5) as u64,
            oldest_accepted_at_ms: row.get(6),
        },
    )
}

/// Adds rows at the end of a locked queue with consecutive seqs; returns (first_seq, last_seq).
fn add_rows<'a>(
    state: &mut Group,
    queue: &str,
    rows: impl Iterator<Item = NewRow<'a>>,
    now_ms: i64,
    ids: &mut Vec<String>,
) -> (u64, u64) {
    let locked = state.queues.get_mut(queue).expect("the queue was locked or created");
    let mut tail = QueueTail::new(&mut locked.stats, now_ms);
    let out = &mut state.rows;
    for row in rows {
        let (seq, origin_seq) = tail.place(&row);
        out.queue_ids.push(locked.id);
        out.seqs.push(seq as i64);
        out.ids.push(row.id.clone());
        out.origins.push(row.origin.to_string());
        out.origin_seqs.push(origin_seq as i64);
        out.content_types.push(row.content_type.to_string());
        out.accepted_at_ms.push(now_ms);
        out.payloads.push(row.payload.clone());
        ids.push(row.id);
    }
    let (first_seq, last_seq, bytes) = tail.finish();
    locked.dirty = true;
    state.total_bytes += bytes;
    (first_seq, last_seq)
}

/// Writes the group's documents in one multi-row upsert.
async fn write_documents(
    tx: &Transaction<'_>,
    documents: &BTreeMap<String, String>,
    now_ms: i64,
) -> Result<(), tokio_postgres::Error> {
    if documents.is_empty() {
        return Ok(());
    }
    let upsert = tx
        .prepare_cached(
            "INSERT INTO outpost_documents (key, value, updated_at_ms)
             SELECT key, value, $3 FROM UNNEST($1::text[], $2::text[]) AS d(key, value)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at_ms = EXCLUDED.updated_at_ms",
        )
        .await?;
    let (keys, values): (Vec<&str>, Vec<&str>) =
        documents.iter().map(|(k, v)| (k.as_str(), v.as_str())).unzip();
    tx.execute(&upsert, &[&keys, &values, &now_ms]).await?;
    Ok(())
}

/// Writes the buffered rows in one multi-row insert.
async fn flush_rows(tx: &Transaction<'_>, rows: &mut Rows) -> Result<(), tokio_postgres::Error> {
    if rows.seqs.is_empty() {
        return Ok(());
    }
    let rows = std::mem::take(rows);
    let insert = tx
        .prepare_cached(
            "INSERT INTO outpost_messages (queue_id, seq, id, origin, origin_seq, content_type, accepted_at_ms, payload)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                                  $7::bigint[], $8::bytea[])",
        )
        .await?;
    let payloads: Vec<&[u8]> = rows.payloads.iter().map(|p| &p[..]).collect();
    tx.execute(
        &insert,
        &[
            &rows.queue_ids,
            &rows.seqs,
            &rows.ids,
            &rows.origins,
            &rows.origin_seqs,
            &rows.content_types,
            &rows.accepted_at_ms,
            &payloads,
        ],
    )
    .await?;
    Ok(())
}

/// The PostgreSQL form of [`crate::failed`]'s changes to existing entries.
async fn change_failed(
    tx: &Transaction<'_>,
    change: &FailedChange,
    now_ms: i64,
) -> Result<FailedOutcome, TryError> {
    match change {
        FailedChange::Resubmit(FailedSelector::Route(route)) => {
            let update = tx
                .prepare_cached(
                    "UPDATE outpost_failed SET status = 'resubmitted' WHERE route = $1 AND status = 'failed' RETURNING id",
                )
                .await?;
            let mut ids: Vec<i64> = tx.query(&update, &[route]).await?.iter().map(|r| r.get(0)).collect();
            ids.sort_unstable();
            let resubmitted = ids.into_iter().map(|id| (id, route.clone())).collect();
            Ok(FailedOutcome::Resubmitted(ResubmitOutcome { resubmitted, unknown: Vec::new() }))
        }
        FailedChange::Resubmit(FailedSelector::Ids(ids)) => {
            ops::check_resubmit_ids(ids).map_err(TryError::Store)?;
            let lookup = tx.prepare_cached("SELECT id, route FROM outpost_failed WHERE id = ANY($1)").await?;
            let routes: HashMap<i64, String> =
                tx.query(&lookup, &[ids]).await?.iter().map(|r| (r.get(0), r.get(1))).collect();
            let outcome = ops::plan_resubmit_ids(ids, &routes);
            // No change unless every id exists (then `resubmitted` is empty).
            if !outcome.resubmitted.is_empty() {
                let update = tx
                    .prepare_cached("UPDATE outpost_failed SET status = 'resubmitted' WHERE id = ANY($1)")
                    .await?;
                tx.execute(&update, &[ids]).await?;
            }
            Ok(FailedOutcome::Resubmitted(outcome))
        }
        FailedChange::FailedAgain { id, attempts, reason, last_error } => {
            let update = tx
                .prepare_cached(
                    "UPDATE outpost_failed SET status = 'failed', attempts = attempts + $2, reason = $3, last_error = $4,
                                               last_failed_at_ms = $5
                     WHERE id = $1",
                )
                .await?;
            let changed =
                tx.execute(&update, &[id, &i64::from(*attempts), reason, last_error, &now_ms]).await?;
            Ok(FailedOutcome::Changed(changed > 0))
        }
        FailedChange::Remove { id } => {
            let delete = tx.prepare_cached("DELETE FROM outpost_failed WHERE id = $1").await?;
            Ok(FailedOutcome::Changed(tx.execute(&delete, &[id]).await? > 0))
        }
    }
}
