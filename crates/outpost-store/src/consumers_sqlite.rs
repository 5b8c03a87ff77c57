//! The SQLite writer's side of [`crate::consumers`]: each function runs inside the writer's group
//! transaction and keeps the writer's state (cursors, releases) in step with what it writes.

use bytes::Bytes;
use rusqlite::{params, OptionalExtension, Transaction};

use crate::consumers::{
    consumer_reader, consumer_route, exhausted, ConsumerRow, Exhausted, LeaseKey, LeaseRequest,
    LeasedMessage, Settle, SettleOutcome, MAX_LEASE_BYTES,
};
use crate::failed::{self, FailedChange};
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

/// The consumer's position: just before its lowest outstanding queue message, or its head.
fn position(tx: &Transaction<'_>, consumer: &ConsumerRow) -> Result<u64, StoreError> {
    let lowest: Option<i64> = tx
        .prepare_cached("SELECT min(seq) FROM consumer_messages WHERE consumer_id = ?1 AND failed_id = 0")?
        .query_row([consumer.id], |r| r.get(0))?;
    Ok(lowest.map(|seq| seq as u64 - 1).unwrap_or(consumer.head))
}

fn read_message(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    seq: u64,
) -> Result<Option<StoredMessage>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT id, origin, origin_seq, content_type, accepted_at_ms, payload FROM messages
             WHERE queue_id = ?1 AND seq = ?2",
        )?
        .query_row(params![queue_id, seq as i64], |r| {
            Ok(StoredMessage {
                id: r.get(0)?,
                queue: queue.to_string(),
                seq,
                origin: r.get(1)?,
                origin_seq: r.get::<_, i64>(2)? as u64,
                content_type: r.get(3)?,
                accepted_at_ms: r.get(4)?,
                payload: Bytes::from(r.get::<_, Vec<u8>>(5)?),
            })
        })
        .optional()?)
}

fn read_failed_copy(
    tx: &Transaction<'_>,
    queue: &str,
    failed_id: i64,
) -> Result<Option<StoredMessage>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT seq, message_id, origin, origin_seq, content_type, accepted_at_ms, payload FROM failed
             WHERE id = ?1",
        )?
        .query_row([failed_id], |r| {
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
        })
        .optional()?)
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
    let mut consumer = match find(tx, queue, name)? {
        Some(consumer) => consumer,
        None => {
            // New: it starts at the oldest message still stored.
            let head = first_seq.saturating_sub(1);
            tx.prepare_cached(
                "INSERT INTO consumers (queue, name, head, created_at_ms, last_active_at_ms) VALUES (?1, ?2, ?3, ?4, ?4)",
            )?
            .execute(params![queue, name, head as i64, now_ms])?;
            ConsumerRow { id: tx.last_insert_rowid(), head }
        }
    };
    let route = consumer_route(name);
    // Resubmitted failed entries come back as outstanding rows, visible at once.
    tx.prepare_cached(
        "INSERT INTO consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
         SELECT ?1, id, seq, 0, 0, 0 FROM failed WHERE route = ?2 AND queue = ?3 AND status = 'resubmitted'
         ON CONFLICT DO NOTHING",
    )?
    .execute(params![consumer.id, route, queue])?;

    let visible_until = now_ms.saturating_add(request.visibility_ms);
    let mut out: Vec<LeasedMessage> = Vec::new();
    let mut bytes = 0u64;
    let full = |out: &Vec<LeasedMessage>, bytes: u64| out.len() >= request.max || bytes >= MAX_LEASE_BYTES;

    // Visible outstanding rows first: resubmitted entries, then redeliveries in seq order. Two
    // queries, each walking the primary key in order and stopping after `max` visible rows, so a
    // consumer with many messages leased does not cost a scan of all of them.
    let mut due: Vec<(i64, u64, u32)> = Vec::new();
    for sql in [
        "SELECT failed_id, seq, deliveries FROM consumer_messages
         WHERE consumer_id = ?1 AND failed_id > 0 AND visible_at_ms <= ?2 ORDER BY failed_id, seq LIMIT ?3",
        "SELECT failed_id, seq, deliveries FROM consumer_messages
         WHERE consumer_id = ?1 AND failed_id = 0 AND visible_at_ms <= ?2 ORDER BY seq LIMIT ?3",
    ] {
        let limit = (request.max - due.len()) as i64;
        let rows = tx
            .prepare_cached(sql)?
            .query_map(params![consumer.id, now_ms, limit], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        due.extend(rows);
    }
    for (failed_id, seq, deliveries) in due {
        if full(&out, bytes) {
            break;
        }
        let message = if failed_id == 0 {
            read_message(tx, queue, queue_id, seq)?
        } else {
            read_failed_copy(tx, queue, failed_id)?
        };
        let Some(message) = message else {
            // A resubmitted entry discarded meanwhile (a queue message is held by the cursor).
            delete_row(tx, consumer.id, failed_id, seq)?;
            continue;
        };
        if deliveries >= request.max_deliveries {
            match exhausted(&route, name, failed_id, message, deliveries) {
                Exhausted::Insert(failure) => {
                    failed::insert(tx, &failure, now_ms)?;
                    state.failed_bytes += failure.message.payload.len() as u64;
                }
                Exhausted::FailAgain(change) => {
                    failed::apply_change(tx, &change, now_ms, &mut 0)?;
                }
            }
            delete_row(tx, consumer.id, failed_id, seq)?;
            continue;
        }
        let deliveries = deliveries + 1;
        tx.prepare_cached(
            "UPDATE consumer_messages SET deliveries = ?4, leased = 1, visible_at_ms = ?5
             WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
        )?
        .execute(params![consumer.id, failed_id, seq as i64, deliveries, visible_until])?;
        bytes += message.payload.len() as u64;
        let lease_id = LeaseKey { consumer_id: consumer.id, failed_id, seq, deliveries }.to_lease_id();
        out.push(LeasedMessage { message, lease_id, deliveries });
    }

    // Then messages new to it.
    let after = consumer.head.max(first_seq.saturating_sub(1));
    if !full(&out, bytes) && after < last_seq {
        let fresh: Vec<StoredMessage> = tx
            .prepare_cached(
                "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM messages
                 WHERE queue_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?
            .query_map(params![queue_id, after as i64, (request.max - out.len()) as i64], |r| {
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
            })?
            .collect::<Result<_, _>>()?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
             VALUES (?1, 0, ?2, 1, 1, ?3)",
        )?;
        for message in fresh {
            if full(&out, bytes) {
                break;
            }
            insert.execute(params![consumer.id, message.seq as i64, visible_until])?;
            consumer.head = message.seq;
            bytes += message.payload.len() as u64;
            let lease_id =
                LeaseKey { consumer_id: consumer.id, failed_id: 0, seq: message.seq, deliveries: 1 }
                    .to_lease_id();
            out.push(LeasedMessage { message, lease_id, deliveries: 1 });
        }
    }
    tx.prepare_cached("UPDATE consumers SET head = ?2, last_active_at_ms = ?3 WHERE consumer_id = ?1")?
        .execute(params![consumer.id, consumer.head as i64, now_ms])?;
    advance(tx, options, state, queue, name, &consumer, chunk_bytes)?;
    Ok(out)
}

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
    let mut outcome = SettleOutcome { consumer_exists: true, ..SettleOutcome::default() };
    for lease_id in lease_ids {
        let current = match LeaseKey::parse(lease_id) {
            Some(key) if key.consumer_id == consumer.id => tx
                .prepare_cached(
                    "SELECT deliveries FROM consumer_messages WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
                )?
                .query_row(params![consumer.id, key.failed_id, key.seq as i64], |r| r.get::<_, u32>(0))
                .optional()?
                .filter(|deliveries| *deliveries == key.deliveries)
                .map(|_| key),
            _ => None,
        };
        let Some(key) = current else {
            outcome.stale.push(lease_id.clone());
            continue;
        };
        match settle {
            Settle::Ack => {
                delete_row(tx, consumer.id, key.failed_id, key.seq)?;
                if key.failed_id != 0 {
                    let mut freed = 0;
                    failed::apply_change(
                        tx,
                        &FailedChange::Remove { id: key.failed_id },
                        now_ms,
                        &mut freed,
                    )?;
                    state.failed_bytes = state.failed_bytes.saturating_sub(freed);
                }
            }
            Settle::Nack { delay_ms } => {
                tx.prepare_cached(
                    "UPDATE consumer_messages SET leased = 0, visible_at_ms = ?4
                     WHERE consumer_id = ?1 AND failed_id = ?2 AND seq = ?3",
                )?
                .execute(params![
                    consumer.id,
                    key.failed_id,
                    key.seq as i64,
                    now_ms.saturating_add(delay_ms)
                ])?;
            }
        }
        outcome.settled += 1;
    }
    tx.prepare_cached("UPDATE consumers SET last_active_at_ms = ?2 WHERE consumer_id = ?1")?
        .execute(params![consumer.id, now_ms])?;
    if state.queue_ids.contains_key(queue) {
        advance(tx, options, state, queue, name, &consumer, chunk_bytes)?;
    }
    Ok(outcome)
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
