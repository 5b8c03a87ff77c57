//! The PostgreSQL writer's side of [`crate::consumers`], the same rules as the SQLite writer's
//! (`consumers_sqlite`). Every operation on a consumer runs with its queue's row locked (see the
//! group's lock phase), so two centrals serving the same consumer take turns.

use deadpool_postgres::Transaction;

use super::{change_failed, flush_rows, insert_failed, Group, PgWriter, TryError};
use crate::consumers::{
    self, consumer_reader, consumer_route, ConsumerRow, DueRow, Exhausted, LeaseBatch, LeaseKey,
    LeaseRequest, LeasedMessage, Redelivery, Settle, SettleAction, SettleOutcome, Settling,
};
use crate::pg::reads::message_from_row;
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

/// The message a due row names: the queue's (`failed_id` 0) or a resubmitted entry's copy.
async fn read_due_message(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    row: &DueRow,
) -> Result<Option<StoredMessage>, TryError> {
    let found = if row.failed_id == 0 {
        let select = tx
            .prepare_cached(
                "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM outpost_messages
                 WHERE queue_id = $1 AND seq = $2",
            )
            .await?;
        tx.query_opt(&select, &[&queue_id, &(row.seq as i64)]).await?
    } else {
        let select = tx
            .prepare_cached(
                "SELECT seq, message_id, origin, origin_seq, content_type, accepted_at_ms, payload FROM outpost_failed
                 WHERE id = $1",
            )
            .await?;
        tx.query_opt(&select, &[&row.failed_id]).await?
    };
    Ok(found.map(|r| message_from_row(queue, &r)))
}

/// Consumer `name` of `queue`; a new one starts at the oldest message still stored.
async fn find_or_create(
    tx: &Transaction<'_>,
    queue: &str,
    name: &str,
    first_seq: u64,
    now_ms: i64,
) -> Result<ConsumerRow, TryError> {
    if let Some(consumer) = find(tx, queue, name).await? {
        return Ok(consumer);
    }
    let head = consumers::new_consumer_head(first_seq);
    let insert = tx
        .prepare_cached(
            "INSERT INTO outpost_consumers (queue, name, head, created_at_ms, last_active_at_ms)
             VALUES ($1, $2, $3, $4, $4) RETURNING consumer_id",
        )
        .await?;
    let id: i64 = tx.query_one(&insert, &[&queue, &name, &(head as i64), &now_ms]).await?.get(0);
    Ok(ConsumerRow { id, head })
}

/// Resubmitted failed entries of the consumer come back as outstanding rows, visible at once.
async fn adopt_resubmitted(
    tx: &Transaction<'_>,
    queue: &str,
    name: &str,
    consumer: &ConsumerRow,
) -> Result<(), TryError> {
    let adopt = tx
        .prepare_cached(
            "INSERT INTO outpost_consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
             SELECT $1, id, seq, 0, false, 0 FROM outpost_failed
             WHERE route = $2 AND queue = $3 AND status = 'resubmitted'
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&adopt, &[&consumer.id, &consumer_route(name), &queue]).await?;
    Ok(())
}

/// The visible outstanding rows, up to what the lease takes: resubmitted entries, then
/// redeliveries in seq order; each query walks the primary key and stops after the rows wanted.
async fn due_rows(
    tx: &Transaction<'_>,
    consumer_id: i64,
    room: usize,
    now_ms: i64,
) -> Result<Vec<DueRow>, TryError> {
    let mut due: Vec<DueRow> = Vec::new();
    for sql in [
        "SELECT failed_id, seq, deliveries FROM outpost_consumer_messages
         WHERE consumer_id = $1 AND failed_id > 0 AND visible_at_ms <= $2 ORDER BY failed_id, seq LIMIT $3",
        "SELECT failed_id, seq, deliveries FROM outpost_consumer_messages
         WHERE consumer_id = $1 AND failed_id = 0 AND visible_at_ms <= $2 ORDER BY seq LIMIT $3",
    ] {
        let limit = (room - due.len()) as i64;
        let select = tx.prepare_cached(sql).await?;
        let rows = tx.query(&select, &[&consumer_id, &now_ms, &limit]).await?;
        due.extend(rows.iter().map(|r| DueRow {
            failed_id: r.get(0),
            seq: r.get::<_, i64>(1) as u64,
            deliveries: r.get::<_, i64>(2) as u32,
        }));
    }
    Ok(due)
}

/// A message delivered `max_deliveries` times goes to the failed table.
async fn record_exhausted(tx: &Transaction<'_>, exhausted: Exhausted, now_ms: i64) -> Result<(), TryError> {
    match exhausted {
        Exhausted::Insert(failure) => {
            insert_failed(tx, &failure, now_ms).await?;
        }
        Exhausted::FailAgain(change) => {
            change_failed(tx, &change, now_ms).await?;
        }
    }
    Ok(())
}

/// Leases the visible outstanding rows again, fails those at `max_deliveries`, drops those whose
/// message is gone.
async fn redeliver_due(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    batch: &mut LeaseBatch<'_>,
    now_ms: i64,
) -> Result<(), TryError> {
    for row in due_rows(tx, batch.consumer_id(), batch.room(), now_ms).await? {
        if batch.is_full() {
            break;
        }
        let message = read_due_message(tx, queue, queue_id, &row).await?;
        match batch.redeliver(row, message) {
            Redelivery::Gone => delete_row(tx, batch.consumer_id(), row.failed_id, row.seq).await?,
            Redelivery::Exhausted(exhausted) => {
                record_exhausted(tx, *exhausted, now_ms).await?;
                delete_row(tx, batch.consumer_id(), row.failed_id, row.seq).await?;
            }
            Redelivery::Leased(key) => {
                let update = tx
                    .prepare_cached(
                        "UPDATE outpost_consumer_messages SET deliveries = $4, leased = true, visible_at_ms = $5
                         WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
                    )
                    .await?;
                let (seq, deliveries) = (key.seq as i64, i64::from(key.deliveries));
                tx.execute(
                    &update,
                    &[&key.consumer_id, &key.failed_id, &seq, &deliveries, &batch.visible_until_ms()],
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// Leases messages new to the consumer, as many as the lease still takes.
async fn lease_new(
    tx: &Transaction<'_>,
    queue: &str,
    queue_id: i64,
    batch: &mut LeaseBatch<'_>,
    first_seq: u64,
    last_seq: u64,
) -> Result<(), TryError> {
    let Some(after) = batch.new_messages_after(first_seq, last_seq) else { return Ok(()) };
    let select = tx
        .prepare_cached(
            "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM outpost_messages
             WHERE queue_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .await?;
    let fresh = tx.query(&select, &[&queue_id, &(after as i64), &(batch.room() as i64)]).await?;
    let mut seqs: Vec<i64> = Vec::new();
    for row in &fresh {
        if batch.is_full() {
            break;
        }
        let key = batch.lease_new(message_from_row(queue, row));
        seqs.push(key.seq as i64);
    }
    // Every new row is a first delivery (`LeaseBatch::lease_new`).
    let insert = tx
        .prepare_cached(
            "INSERT INTO outpost_consumer_messages (consumer_id, failed_id, seq, deliveries, leased, visible_at_ms)
             SELECT $1, 0, s, 1, true, $3 FROM unnest($2::bigint[]) AS s",
        )
        .await?;
    tx.execute(&insert, &[&batch.consumer_id(), &seqs, &batch.visible_until_ms()]).await?;
    Ok(())
}

/// Acknowledges a leased message (with a resubmitted entry's copy) or gives it back.
async fn apply_settle(
    tx: &Transaction<'_>,
    key: LeaseKey,
    action: SettleAction,
    now_ms: i64,
) -> Result<(), TryError> {
    match action {
        SettleAction::Finish { remove_failed } => {
            delete_row(tx, key.consumer_id, key.failed_id, key.seq).await?;
            if let Some(change) = remove_failed {
                change_failed(tx, &change, now_ms).await?;
            }
        }
        SettleAction::GiveBack { visible_at_ms } => {
            let update = tx
                .prepare_cached(
                    "UPDATE outpost_consumer_messages SET leased = false, visible_at_ms = $4
                     WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
                )
                .await?;
            tx.execute(&update, &[&key.consumer_id, &key.failed_id, &(key.seq as i64), &visible_at_ms])
                .await?;
        }
    }
    Ok(())
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
        let position = consumers::position(lowest.map(|seq| seq as u64), consumer.head);
        // Not through `advance_cursor`: its shortcut trusts the views, which may still hold the
        // cursor of a deleted consumer of the same name.
        let reader = consumer_reader(name);
        self.write_cursor(tx, state, queue, &reader, position).await
    }

    /// Leases messages to consumer `name` (created by its first lease); see [`LeaseBatch`].
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
        let mut consumer = find_or_create(tx, queue, name, first_seq, now_ms).await?;
        adopt_resubmitted(tx, queue, name, &consumer).await?;
        let mut batch = LeaseBatch::new(name, &consumer, request, now_ms);
        redeliver_due(tx, queue, queue_id, &mut batch, now_ms).await?;
        lease_new(tx, queue, queue_id, &mut batch, first_seq, last_seq).await?;
        let (leased, head) = batch.finish();
        consumer.head = head;
        let update = tx
            .prepare_cached(
                "UPDATE outpost_consumers SET head = $2, last_active_at_ms = $3 WHERE consumer_id = $1",
            )
            .await?;
        tx.execute(&update, &[&consumer.id, &(consumer.head as i64), &now_ms]).await?;
        self.consumer_advance(tx, state, queue, name, &consumer).await?;
        Ok(leased)
    }

    /// Acknowledges or gives back leased messages of consumer `name`; see [`Settling`].
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
        let mut settling = Settling::new(&consumer, settle, now_ms);
        let lookup = tx
            .prepare_cached(
                "SELECT deliveries FROM outpost_consumer_messages WHERE consumer_id = $1 AND failed_id = $2 AND seq = $3",
            )
            .await?;
        for lease_id in lease_ids {
            let Some(key) = settling.row_of(lease_id) else { continue };
            let stored_deliveries = tx
                .query_opt(&lookup, &[&key.consumer_id, &key.failed_id, &(key.seq as i64)])
                .await?
                .and_then(|r| u32::try_from(r.get::<_, i64>(0)).ok());
            if let Some(action) = settling.action(lease_id, key, stored_deliveries) {
                apply_settle(tx, key, action, now_ms).await?;
            }
        }
        let update = tx
            .prepare_cached("UPDATE outpost_consumers SET last_active_at_ms = $2 WHERE consumer_id = $1")
            .await?;
        tx.execute(&update, &[&consumer.id, &now_ms]).await?;
        if state.queues.contains_key(queue) {
            self.consumer_advance(tx, state, queue, name, &consumer).await?;
        }
        Ok(settling.finish())
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
