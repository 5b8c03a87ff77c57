//! The SQLite writer's side of [`crate::consumers`]: each function runs inside the writer's group
//! transaction and keeps the writer's state (cursors, releases) in step with what it writes.

use rusqlite::{params, OptionalExtension, Transaction};

use crate::consumers::{
    self, consumer_reader, consumer_route, ConsumerRow, DueRow, Exhausted, LeaseBatch, LeaseKey,
    LeaseRequest, LeasedMessage, Redelivery, Settle, SettleAction, SettleOutcome, Settling,
};
use crate::failed;
use crate::sqlite::message_from_row;
use crate::writer::{apply_advance_cursor, ensure_queue, release_chunk, State};
use crate::{StoreError, StoreOptions, StoredMessage};

fn find(tx: &Transaction<'_>, queue: &str, name: &str) -> Result<Option<ConsumerRow>, StoreError> {
    Ok(tx
        .prepare_cached("SELECT consumer_id, head FROM consumers WHERE queue = ?1 AND name = ?2")?
        .query_row(params![queue, name], |r| {
            Ok(ConsumerRow { id: r.get(0)?, head: r.get::<_, i64>(1)? as u64 })
        })
        .optional()?)
}

/// The consumer's position (see [`consumers::position`]).
fn position(tx: &Transaction<'_>, consumer: &ConsumerRow) -> Result<u64, StoreError> {
    let lowest: Option<i64> = tx
        .prepare_cached("SELECT min(seq) FROM consumer_messages WHERE consumer_id = ?1 AND failed_id = 0")?
        .query_row([consumer.id], |r| r.get(0))?;
    Ok(consumers::position(lowest.map(|seq| seq as u64), consumer.head))
}

/// The message a due row names: the queue's (`failed_id` 0) or a resubmitted entry's copy.
fn read_due_message(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    row: &DueRow,
) -> Result<Option<StoredMessage>, StoreError> {
    let found = if row.failed_id == 0 {
        tx.prepare_cached(
            "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM messages
             WHERE queue_id = ?1 AND seq = ?2",
        )?
        .query_row(params![queue_id, row.seq as i64], |r| message_from_row(queue, r))
    } else {
        tx.prepare_cached(
            "SELECT seq, message_id, origin, origin_seq, content_type, accepted_at_ms, payload FROM failed
             WHERE id = ?1",
        )?
        .query_row([row.failed_id], |r| message_from_row(queue, r))
    };
    Ok(found.optional()?)
}

fn delete_row(tx: &Transaction<'_>, consumer_id: i64, failed_id: i64, seq: u64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "DELETE FROM consumer_messages WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
    )?
    .execute(params![consumer_id, failed_id, seq as i64])?;
    Ok(())
}

/// Moves the consumer's cursor to its position (never back) and releases what every reader has.
fn advance(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    name: &str,
    consumer: &ConsumerRow,
    chunk_bytes: u64,
) -> Result<(), StoreError> {
    let position = position(tx, consumer)?;
    let reader = consumer_reader(name);
    state.consumer_readers.insert((queue.to_string(), reader.clone()));
    apply_advance_cursor(tx, options, state, queue, &reader, position, chunk_bytes)
}

/// Leases messages to consumer `name` (created by its first lease); see [`LeaseBatch`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn lease(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    name: &str,
    request: LeaseRequest,
    now_ms: i64,
    chunk_bytes: u64,
) -> Result<Vec<LeasedMessage>, StoreError> {
    // A first lease may come before the queue's first message: the queue is created (empty), so
    // the consumer holds every message from the first on.
    let queue_id = ensure_queue(tx, options, state, queue, 0)?;
    let (first_seq, last_seq) = {
        let stats = &state.stats[queue];
        (stats.first_seq, stats.last_seq)
    };
    let mut consumer = find_or_create(tx, queue, name, first_seq, now_ms)?;
    adopt_resubmitted(tx, queue, name, &consumer)?;
    let mut batch = LeaseBatch::new(name, &consumer, request, now_ms);
    redeliver_due(tx, state, queue, queue_id, &mut batch, now_ms)?;
    lease_new(tx, queue, queue_id, &mut batch, first_seq, last_seq)?;
    let (leased, head) = batch.finish();
    consumer.head = head;
    tx.prepare_cached("UPDATE consumers SET head = ?2, last_active_at_ms = ?3 WHERE consumer_id = ?1")?
        .execute(params![consumer.id, consumer.head as i64, now_ms])?;
    advance(tx, options, state, queue, name, &consumer, chunk_bytes)?;
    Ok(leased)
}

/// Consumer `name` of `queue`; a new one starts at the oldest message still stored.
fn find_or_create(
    tx: &Transaction<'_>,
    queue: &str,
    name: &str,
    first_seq: u64,
    now_ms: i64,
) -> Result<ConsumerRow, StoreError> {
    if let Some(consumer) = find(tx, queue, name)? {
        return Ok(consumer);
    }
    let head = consumers::new_consumer_head(first_seq);
    tx.prepare_cached(
        "INSERT INTO consumers (queue, name, head, created_at_ms, last_active_at_ms) VALUES (?1, ?2, ?3, ?4, ?4)",
    )?
    .execute(params![queue, name, head as i64, now_ms])?;
    Ok(ConsumerRow { id: tx.last_insert_rowid(), head })
}

/// Resubmitted failed entries of the consumer come back as outstanding rows, visible at once.
fn adopt_resubmitted(
    tx: &Transaction<'_>,
    queue: &str,
    name: &str,
    consumer: &ConsumerRow,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
         SELECT ?1, id, seq, 0, 0, 0 FROM failed WHERE route = ?2 AND queue = ?3 AND status = 'resubmitted'
         ON CONFLICT DO NOTHING",
    )?
    .execute(params![consumer.id, consumer_route(name), queue])?;
    Ok(())
}

/// The visible outstanding rows, up to what the lease takes: resubmitted entries, then
/// redeliveries in seq order. Two queries, each walking the primary key in order and stopping
/// after the rows wanted, so a consumer with many messages leased does not cost a scan of them all.
fn due_rows(
    tx: &Transaction<'_>,
    consumer_id: i64,
    room: usize,
    now_ms: i64,
) -> Result<Vec<DueRow>, StoreError> {
    let mut due: Vec<DueRow> = Vec::new();
    for sql in [
        "SELECT failed_id, seq, deliveries FROM consumer_messages
         WHERE consumer_id = ?1 AND failed_id > 0 AND visible_at_ms <= ?2 ORDER BY failed_id, seq LIMIT ?3",
        "SELECT failed_id, seq, deliveries FROM consumer_messages
         WHERE consumer_id = ?1 AND failed_id = 0 AND visible_at_ms <= ?2 ORDER BY seq LIMIT ?3",
    ] {
        let limit = (room - due.len()) as i64;
        let rows = tx
            .prepare_cached(sql)?
            .query_map(params![consumer_id, now_ms, limit], |r| {
                Ok(DueRow { failed_id: r.get(0)?, seq: r.get::<_, i64>(1)? as u64, deliveries: r.get(2)? })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        due.extend(rows);
    }
    Ok(due)
}

/// Leases the visible outstanding rows again, fails those at `max_deliveries`, drops those whose
/// message is gone.
fn redeliver_due(
    tx: &Transaction<'_>,
    state: &mut State,
    queue: &str,
    queue_id: i64,
    batch: &mut LeaseBatch<'_>,
    now_ms: i64,
) -> Result<(), StoreError> {
    for row in due_rows(tx, batch.consumer_id(), batch.room(), now_ms)? {
        if batch.is_full() {
            break;
        }
        let message = read_due_message(tx, queue, queue_id, &row)?;
        match batch.redeliver(row, message) {
            Redelivery::Gone => delete_row(tx, batch.consumer_id(), row.failed_id, row.seq)?,
            Redelivery::Exhausted(exhausted) => {
                record_exhausted(tx, state, *exhausted, now_ms)?;
                delete_row(tx, batch.consumer_id(), row.failed_id, row.seq)?;
            }
            Redelivery::Leased(key) => {
                tx.prepare_cached(
                    "UPDATE consumer_messages SET deliveries = ?4, leased = 1, visible_at_ms = ?5
                     WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
                )?
                .execute(params![
                    key.consumer_id,
                    key.failed_id,
                    key.seq as i64,
                    key.deliveries,
                    batch.visible_until_ms()
                ])?;
            }
        }
    }
    Ok(())
}

/// A message delivered `max_deliveries` times goes to the failed table.
fn record_exhausted(
    tx: &Transaction<'_>,
    state: &mut State,
    exhausted: Exhausted,
    now_ms: i64,
) -> Result<(), StoreError> {
    match exhausted {
        Exhausted::Insert(failure) => {
            failed::insert(tx, &failure, now_ms)?;
            state.failed_bytes += failure.message.payload.len() as u64;
        }
        Exhausted::FailAgain(change) => {
            failed::apply_change(tx, &change, now_ms, &mut 0)?;
        }
    }
    Ok(())
}

/// Leases messages new to the consumer, as many as the lease still takes.
fn lease_new(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    batch: &mut LeaseBatch<'_>,
    first_seq: u64,
    last_seq: u64,
) -> Result<(), StoreError> {
    let Some(after) = batch.new_messages_after(first_seq, last_seq) else { return Ok(()) };
    let fresh: Vec<StoredMessage> = tx
        .prepare_cached(
            "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM messages
             WHERE queue_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?
        .query_map(params![queue_id, after as i64, batch.room() as i64], |r| message_from_row(queue, r))?
        .collect::<Result<_, _>>()?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
         VALUES (?1, ?2, ?3, ?4, 1, ?5)",
    )?;
    for message in fresh {
        if batch.is_full() {
            break;
        }
        let key = batch.lease_new(message);
        insert.execute(params![
            key.consumer_id,
            key.failed_id,
            key.seq as i64,
            key.deliveries,
            batch.visible_until_ms()
        ])?;
    }
    Ok(())
}

/// Acknowledges or gives back leased messages of consumer `name`; see [`Settling`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    name: &str,
    lease_ids: &[String],
    settle: Settle,
    now_ms: i64,
    chunk_bytes: u64,
) -> Result<SettleOutcome, StoreError> {
    let Some(consumer) = find(tx, queue, name)? else { return Ok(SettleOutcome::default()) };
    let mut settling = Settling::new(&consumer, settle, now_ms);
    for lease_id in lease_ids {
        let Some(key) = settling.row_of(lease_id) else { continue };
        let stored_deliveries = tx
            .prepare_cached(
                "SELECT deliveries FROM consumer_messages WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
            )?
            .query_row(params![key.consumer_id, key.failed_id, key.seq as i64], |r| r.get::<_, u32>(0))
            .optional()?;
        if let Some(action) = settling.action(lease_id, key, stored_deliveries) {
            apply_settle(tx, state, key, action, now_ms)?;
        }
    }
    tx.prepare_cached("UPDATE consumers SET last_active_at_ms = ?2 WHERE consumer_id = ?1")?
        .execute(params![consumer.id, now_ms])?;
    if state.queue_ids.contains_key(queue) {
        advance(tx, options, state, queue, name, &consumer, chunk_bytes)?;
    }
    Ok(settling.finish())
}

fn apply_settle(
    tx: &Transaction<'_>,
    state: &mut State,
    key: LeaseKey,
    action: SettleAction,
    now_ms: i64,
) -> Result<(), StoreError> {
    match action {
        SettleAction::Finish { remove_failed } => {
            delete_row(tx, key.consumer_id, key.failed_id, key.seq)?;
            if let Some(change) = remove_failed {
                let mut freed = 0;
                failed::apply_change(tx, &change, now_ms, &mut freed)?;
                state.failed_bytes = state.failed_bytes.saturating_sub(freed);
            }
        }
        SettleAction::GiveBack { visible_at_ms } => {
            tx.prepare_cached(
                "UPDATE consumer_messages SET leased = 0, visible_at_ms = ?4
                 WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
            )?
            .execute(params![key.consumer_id, key.failed_id, key.seq as i64, visible_at_ms])?;
        }
    }
    Ok(())
}

pub(crate) fn delete(
    tx: &Transaction<'_>,
    options: &StoreOptions,
    state: &mut State,
    queue: &str,
    name: &str,
    chunk_bytes: u64,
) -> Result<bool, StoreError> {
    let Some(consumer) = find(tx, queue, name)? else { return Ok(false) };
    tx.prepare_cached("DELETE FROM consumer_messages WHERE consumer_id = ?1")?.execute([consumer.id])?;
    tx.prepare_cached("DELETE FROM consumers WHERE consumer_id = ?1")?.execute([consumer.id])?;
    let reader = consumer_reader(name);
    if let Some(&queue_id) = state.queue_ids.get(queue) {
        tx.prepare_cached("DELETE FROM cursors WHERE queue_id = ?1 AND reader = ?2")?
            .execute(params![queue_id, reader])?;
        let key = (queue.to_string(), reader);
        state.cursors.remove(&key);
        state.consumer_readers.remove(&key);
        // Its hold on storage ends: release what the remaining readers have.
        state.releases_due.insert(queue.to_string());
        release_chunk(tx, options, state, queue, chunk_bytes)?;
    }
    Ok(true)
}
