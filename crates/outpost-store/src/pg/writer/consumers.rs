//! The PostgreSQL writer's side of [`crate::consumers`], the same rules as the SQLite writer's
//! (`consumers_sqlite`). Every operation on a consumer runs with its queue's row locked (see the
//! group's lock phase), so two centrals serving the same consumer take turns.

use bytes::Bytes;
use deadpool_postgres::Transaction;

use super::{change_failed, flush_rows, insert_failed, Group, PgWriter, TryError};
use crate::consumers::{
    consumer_reader, consumer_route, exhausted, ConsumerRow, Exhausted, LeaseKey, LeaseRequest,
    LeasedMessage, Settle, SettleOutcome, MAX_LEASE_BYTES,
};
use crate::failed::FailedChange;
use crate::StoredMessage;

async fn find(tx: &Transaction<'_>, queue: &str, name: &str) -> Result<Option<ConsumerRow>, TryError> {
    let select = tx
        .prepare_cached("SELECT consumer_id, head FROM outpost_consumers WHERE queue = $1 AND name = $2")
        .await?;
    Ok(tx
        .query_opt(&select, &[&queue, &name])
        .await?
        .map(|r| ConsumerRow { id: r.get(0), head: r.get::<_, i64>(1) as u64 }))
}

async fn delete_row(
    tx: &Transaction<'_>,
    consumer_id: i64,
    failed_id: i64,
    seq: u64,
) -> Result<(), TryError> {
    let delete = tx
        .prepare_cached(
            "DELETE FROM outpost_consumer_messages WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
        )
        .await?;
    tx.execute(&delete, &[&consumer_id, &failed_id, &(seq as i64)]).await?;
    Ok(())
}

fn message_from_row(queue: &str, r: &tokio_postgres::Row) -> StoredMessage {
    StoredMessage {
        seq: r.get::<_, i64>(0) as u64,
        id: r.get(1),
        queue: queue.to_string(),
        origin: r.get(2),
        origin_seq: r.get::<_, i64>(3) as u64,
        content_type: r.get(4),
        accepted_at_ms: r.get(5),
        payload: Bytes::from(r.get::<_, Vec<u8>>(6)),
    }
}

async fn read_message(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    seq: u64,
) -> Result<Option<StoredMessage>, TryError> {
    let select = tx
        .prepare_cached(
            "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM outpost_messages
             WHERE queue_id = $1 AND seq = $2",
        )
        .await?;
    Ok(tx.query_opt(&select, &[&queue_id, &(seq as i64)]).await?.map(|r| message_from_row(queue, &r)))
}

async fn read_failed_copy(
    tx: &Transaction<'_>,
    queue: &str,
    failed_id: i64,
) -> Result<Option<StoredMessage>, TryError> {
    let select = tx
        .prepare_cached(
            "SELECT seq, message_id, origin, origin_seq, content_type, accepted_at_ms, payload FROM outpost_failed
             WHERE id = $1",
        )
        .await?;
    Ok(tx.query_opt(&select, &[&failed_id]).await?.map(|r| message_from_row(queue, &r)))
}

impl PgWriter {
    /// Moves the consumer's cursor to its position (never back) and releases what every reader has.
    async fn consumer_advance(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        name: &str,
        consumer: &ConsumerRow,
    ) -> Result<(), TryError> {
        let lowest = tx
            .prepare_cached(
                "SELECT min(seq) FROM outpost_consumer_messages WHERE consumer_id = $1 AND failed_id = 0",
            )
            .await?;
        let lowest: Option<i64> = tx.query_one(&lowest, &[&consumer.id]).await?.get(0);
        let position = lowest.map(|seq| seq as u64 - 1).unwrap_or(consumer.head);
        // Not through `advance_cursor`: its shortcut trusts the views, which may still hold the
        // cursor of a deleted consumer of the same name.
        let reader = consumer_reader(name);
        let upsert = tx
            .prepare_cached(
                "INSERT INTO outpost_cursors (queue, reader, acked_seq) VALUES ($1, $2, $3)
                 ON CONFLICT (queue, reader) DO UPDATE SET acked_seq = GREATEST(outpost_cursors.acked_seq, EXCLUDED.acked_seq)
                 RETURNING acked_seq",
            )
            .await?;
        let acked: i64 = tx.query_one(&upsert, &[&queue, &reader, &(position as i64)]).await?.get(0);
        state.cursors.insert((queue.to_string(), reader), acked as u64);
        self.release_queue(tx, state, queue).await
    }

    pub(super) async fn consumer_lease(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        name: &str,
        request: LeaseRequest,
        now_ms: i64,
    ) -> Result<Vec<LeasedMessage>, TryError> {
        if !state.queues.contains_key(queue) {
            // A first lease may come before the queue's first message: the queue is created
            // (empty), so the consumer holds every message from the first on.
            self.ensure_queue(tx, state, queue, 0).await?;
            state.queues.get_mut(queue).expect("just created").dirty = true;
        }
        let locked = &state.queues[queue];
        let (queue_id, first_seq, last_seq) = (locked.id, locked.stats.first_seq, locked.stats.last_seq);
        // Messages this group appended must be in the table before they are read.
        flush_rows(tx, &mut state.rows).await?;
        let mut consumer = match find(tx, queue, name).await? {
            Some(consumer) => consumer,
            None => {
                // New: it starts at the oldest message still stored.
                let head = first_seq.saturating_sub(1);
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO outpost_consumers (queue, name, head, created_at_ms, last_active_at_ms)
                         VALUES ($1, $2, $3, $4, $4) RETURNING consumer_id",
                    )
                    .await?;
                let id: i64 = tx.query_one(&insert, &[&queue, &name, &(head as i64), &now_ms]).await?.get(0);
                ConsumerRow { id, head }
            }
        };
        let route = consumer_route(name);
        let adopt = tx
            .prepare_cached(
                "INSERT INTO outpost_consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
                 SELECT $1, id, seq, 0, false, 0 FROM outpost_failed
                 WHERE route = $2 AND queue = $3 AND status = 'resubmitted'
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&adopt, &[&consumer.id, &route, &queue]).await?;

        let visible_until = now_ms.saturating_add(request.visibility_ms);
        let mut out: Vec<LeasedMessage> = Vec::new();
        let mut bytes = 0u64;
        let full =
            |out: &Vec<LeasedMessage>, bytes: u64| out.len() >= request.max || bytes >= MAX_LEASE_BYTES;

        // Resubmitted entries, then redeliveries in seq order: each query walks the primary key
        // and stops after `max` visible rows.
        let mut due: Vec<(i64, u64, u32)> = Vec::new();
        for sql in [
            "SELECT failed_id, seq, deliveries FROM outpost_consumer_messages
             WHERE consumer_id = $1 AND failed_id > 0 AND visible_at_ms <= $2 ORDER BY failed_id, seq LIMIT $3",
            "SELECT failed_id, seq, deliveries FROM outpost_consumer_messages
             WHERE consumer_id = $1 AND failed_id = 0 AND visible_at_ms <= $2 ORDER BY seq LIMIT $3",
        ] {
            let limit = (request.max - due.len()) as i64;
            let select = tx.prepare_cached(sql).await?;
            let rows = tx.query(&select, &[&consumer.id, &now_ms, &limit]).await?;
            due.extend(rows.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u32)));
        }
        for (failed_id, seq, deliveries) in due {
            if full(&out, bytes) {
                break;
            }
            let message = if failed_id == 0 {
                read_message(tx, queue, queue_id, seq).await?
            } else {
                read_failed_copy(tx, queue, failed_id).await?
            };
            let Some(message) = message else {
                delete_row(tx, consumer.id, failed_id, seq).await?;
                continue;
            };
            if deliveries >= request.max_deliveries {
                match exhausted(&route, name, failed_id, message, deliveries) {
                    Exhausted::Insert(failure) => {
                        insert_failed(tx, &failure, now_ms).await?;
                    }
                    Exhausted::FailAgain(change) => {
                        change_failed(tx, &change, now_ms).await?;
                    }
                }
                delete_row(tx, consumer.id, failed_id, seq).await?;
                continue;
            }
            let deliveries = deliveries + 1;
            let update = tx
                .prepare_cached(
                    "UPDATE outpost_consumer_messages SET deliveries = $4, leased = true, visible_at_ms = $5
                     WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
                )
                .await?;
            tx.execute(
                &update,
                &[&consumer.id, &failed_id, &(seq as i64), &i64::from(deliveries), &visible_until],
            )
            .await?;
            bytes += message.payload.len() as u64;
            let lease_id = LeaseKey { consumer_id: consumer.id, failed_id, seq, deliveries }.to_lease_id();
            out.push(LeasedMessage { message, lease_id, deliveries });
        }

        let after = consumer.head.max(first_seq.saturating_sub(1));
        if !full(&out, bytes) && after < last_seq {
            let select = tx
                .prepare_cached(
                    "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM outpost_messages
                     WHERE queue_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .await?;
            let fresh: Vec<StoredMessage> = tx
                .query(&select, &[&queue_id, &(after as i64), &((request.max - out.len()) as i64)])
                .await?
                .iter()
                .map(|r| message_from_row(queue, r))
                .collect();
            let mut seqs: Vec<i64> = Vec::new();
            for message in fresh {
                if full(&out, bytes) {
                    break;
                }
                seqs.push(message.seq as i64);
                consumer.head = message.seq;
                bytes += message.payload.len() as u64;
                let lease_id =
                    LeaseKey { consumer_id: consumer.id, failed_id: 0, seq: message.seq, deliveries: 1 }
                        .to_lease_id();
                out.push(LeasedMessage { message, lease_id, deliveries: 1 });
            }
            let insert = tx
                .prepare_cached(
                    "INSERT INTO outpost_consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
                     SELECT $1, 0, s, 1, true, $3 FROM unnest($2::bigint[]) AS s",
                )
                .await?;
            tx.execute(&insert, &[&consumer.id, &seqs, &visible_until]).await?;
        }
        let update = tx
            .prepare_cached(
                "UPDATE outpost_consumers SET head = $2, last_active_at_ms = $3 WHERE consumer_id = $1",
            )
            .await?;
        tx.execute(&update, &[&consumer.id, &(consumer.head as i64), &now_ms]).await?;
        self.consumer_advance(tx, state, queue, name, &consumer).await?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn consumer_settle(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        name: &str,
        lease_ids: &[String],
        settle: Settle,
        now_ms: i64,
    ) -> Result<SettleOutcome, TryError> {
        let Some(consumer) = find(tx, queue, name).await? else { return Ok(SettleOutcome::default()) };
        let mut outcome = SettleOutcome { consumer_exists: true, ..SettleOutcome::default() };
        let lookup = tx
            .prepare_cached(
                "SELECT deliveries FROM outpost_consumer_messages WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
            )
            .await?;
        for lease_id in lease_ids {
            let key = match LeaseKey::parse(lease_id) {
                Some(key) if key.consumer_id == consumer.id => key,
                _ => {
                    outcome.stale.push(lease_id.clone());
                    continue;
                }
            };
            let current = tx
                .query_opt(&lookup, &[&consumer.id, &key.failed_id, &(key.seq as i64)])
                .await?
                .is_some_and(|r| r.get::<_, i64>(0) == i64::from(key.deliveries));
            if !current {
                outcome.stale.push(lease_id.clone());
                continue;
            }
            match settle {
                Settle::Ack => {
                    delete_row(tx, consumer.id, key.failed_id, key.seq).await?;
                    if key.failed_id != 0 {
                        change_failed(tx, &FailedChange::Remove { id: key.failed_id }, now_ms).await?;
                    }
                }
                Settle::Nack { delay_ms } => {
                    let update = tx
                        .prepare_cached(
                            "UPDATE outpost_consumer_messages SET leased = false, visible_at_ms = $4
                             WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
                        )
                        .await?;
                    tx.execute(
                        &update,
                        &[&consumer.id, &key.failed_id, &(key.seq as i64), &now_ms.saturating_add(delay_ms)],
                    )
                    .await?;
                }
            }
            outcome.settled += 1;
        }
        let update = tx
            .prepare_cached("UPDATE outpost_consumers SET last_active_at_ms = $2 WHERE consumer_id = $1")
            .await?;
        tx.execute(&update, &[&consumer.id, &now_ms]).await?;
        if state.queues.contains_key(queue) {
            self.consumer_advance(tx, state, queue, name, &consumer).await?;
        }
        Ok(outcome)
    }

    pub(super) async fn consumer_delete(
        &self,
        tx: &Transaction<'_>,
        state: &mut Group,
        queue: &str,
        name: &str,
    ) -> Result<bool, TryError> {
        let Some(consumer) = find(tx, queue, name).await? else { return Ok(false) };
        let delete =
            tx.prepare_cached("DELETE FROM outpost_consumer_messages WHERE consumer_id = $1").await?;
        tx.execute(&delete, &[&consumer.id]).await?;
        let delete = tx.prepare_cached("DELETE FROM outpost_consumers WHERE consumer_id = $1").await?;
        tx.execute(&delete, &[&consumer.id]).await?;
        let reader = consumer_reader(name);
        let delete =
            tx.prepare_cached("DELETE FROM outpost_cursors WHERE queue = $1 AND reader = $2").await?;
        tx.execute(&delete, &[&queue, &reader]).await?;
        state.cursors.remove(&(queue.to_string(), reader.clone()));
        state.removed_cursors.push((queue.to_string(), reader));
        if state.queues.contains_key(queue) {
            // Its hold on storage ends: release what the remaining readers have.
            flush_rows(tx, &mut state.rows).await?;
            self.release_queue(tx, state, queue).await?;
        }
        Ok(true)
    }
}
