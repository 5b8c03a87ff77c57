//! Pull consumers (CONTRACT section 9): readers of a queue that an application drives by leasing
//! messages, acknowledging them and giving them back, next to the queue's routes and the edge's
//! forwarder. Both backends keep everything here in the store itself, so on a cluster a consumer
//! works whichever central it talks to.
//!
//! # Model
//!
//! - **A consumer is a reader** of one queue with the cursor `consumer:<name>`: its position, the
//!   seq through which it has finished every message (acknowledged, or failed after
//!   `max_deliveries`). Storage is released up to the lowest cursor of the queue's required
//!   readers, and every consumer of the queue is one of them ([`is_consumer_reader`]); deleting a
//!   consumer removes its cursor, and with it its hold on storage.
//! - **`head`** is the highest seq the consumer has taken so far. Messages after it are new to it;
//!   a consumer is created by its first lease with `head` (and position) just before the oldest
//!   message still stored. A first lease on a queue that does not exist yet creates the queue
//!   (empty): an application can put its consumer in place before the first message (say, a
//!   downlink message the edge's forwarder passes at once) would otherwise be released unread.
//! - **Outstanding messages** (`consumer_messages`): one row per message between position and head
//!   that is not finished: its delivery count, whether it is leased or was given back, and from when
//!   it is visible again. A lease takes the visible ones first (redeliveries, in seq order) and
//!   then new messages. Acknowledging deletes the row; the position is then the seq before the
//!   lowest outstanding row (or `head` when none is left). Positions only move forward.
//! - **`max_deliveries`.** A visible message that was already delivered `max_deliveries` times is
//!   not delivered again: it is copied to the failed table (route `consumer:<name>`, reason
//!   `max_deliveries`) and finished, in the same transaction.
//! - **Resubmitted failed entries** of the consumer (an operator's `/v1/failed` resubmit) are
//!   adopted by its next lease as outstanding rows with `failed_id` set, delivered from the failed
//!   table's copy before anything else; acknowledged, the entry is removed; failing again, it is
//!   back to `failed`. They do not hold the position.
//! - **Lease ids** are `<consumer id>.<failed id or 0>.<seq>.<delivery>`: they name one delivery of
//!   one message to one incarnation of a consumer, so an acknowledgement of an older delivery (the
//!   message was delivered again since) or of a deleted consumer's lease changes nothing.
//!
//! Every operation is one write through the backend's writer, so a lease, an ack and a nack are
//! each durable when answered; time comes from the writer (`now`), and visibility is evaluated
//! lazily when a consumer leases or is listed, so no task runs per consumer.
//!
//! The rules above are decided here once, as pure code (`position`, `LeaseBatch`, `Settling`,
//! `exhausted`); each backend's writer (`consumers_sqlite`, `pg/writer/consumers`) only reads and
//! writes its rows around them.

use crate::failed::{FailedChange, NewFailure};
use crate::{Store, StoreError, StoredMessage};

/// The cursor name prefix of consumers: `consumer:<name>`.
pub const CONSUMER_READER_PREFIX: &str = "consumer:";
/// The route name of a consumer's failed entries: `consumer:<name>` (the entry's queue says which
/// queue's consumer).
pub const CONSUMER_ROUTE_PREFIX: &str = "consumer:";
/// The failure reason of a message that reached its consumer's `max_deliveries`.
pub const MAX_DELIVERIES_REASON: &str = "max_deliveries";

/// The default and largest `max` of one lease.
pub const DEFAULT_LEASE_MAX: usize = 10;
pub const MAX_LEASE_MAX: usize = 1000;
/// The default and longest visibility of a lease (and the longest nack delay).
pub const DEFAULT_VISIBILITY_MS: i64 = 30_000;
pub const MAX_VISIBILITY_MS: i64 = 12 * 3600 * 1000;
/// The default and largest `max_deliveries`.
pub const DEFAULT_MAX_DELIVERIES: u32 = 10;
pub const MAX_MAX_DELIVERIES: u32 = 1000;
/// About the most payload bytes one lease answers with (always at least one message).
pub const MAX_LEASE_BYTES: u64 = 16 << 20;
/// The most lease ids one ack or nack names.
pub const MAX_SETTLE_IDS: usize = 10_000;

/// The cursor of consumer `name`.
pub fn consumer_reader(name: &str) -> String {
    format!("{CONSUMER_READER_PREFIX}{name}")
}

/// The failed-list route of consumer `name`'s entries.
pub fn consumer_route(name: &str) -> String {
    format!("{CONSUMER_ROUTE_PREFIX}{name}")
}

/// True for a consumer's cursor: consumers are required readers of their queue.
pub fn is_consumer_reader(reader: &str) -> bool {
    reader.starts_with(CONSUMER_READER_PREFIX)
}

/// The consumer name of a failed entry's route, if it is a consumer's.
pub fn consumer_of_route(route: &str) -> Option<&str> {
    route.strip_prefix(CONSUMER_ROUTE_PREFIX)
}

/// What one lease asks for (already within the limits above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRequest {
    pub max: usize,
    pub visibility_ms: i64,
    pub max_deliveries: u32,
}

impl Default for LeaseRequest {
    fn default() -> LeaseRequest {
        LeaseRequest {
            max: DEFAULT_LEASE_MAX,
            visibility_ms: DEFAULT_VISIBILITY_MS,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

/// One leased message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedMessage {
    pub message: StoredMessage,
    pub lease_id: String,
    /// How many times this message has been delivered to this consumer, this one included.
    pub deliveries: u32,
}

/// What to do with leased messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with them.
    Ack,
    /// Give them back, visible again after `delay_ms`.
    Nack { delay_ms: i64 },
}

/// The outcome of an ack or nack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleOutcome {
    /// False when the queue has no consumer of that name (nothing was changed).
    pub consumer_exists: bool,
    /// How many lease ids were applied.
    pub settled: u64,
    /// Lease ids that name no current delivery of this consumer (malformed, of another consumer,
    /// already acknowledged, or superseded by a later delivery); ignored.
    pub stale: Vec<String>,
}

/// A consumer as `GET /v1/queues/{queue}/consumers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerView {
    pub name: String,
    /// The seq through which every message is finished (acknowledged or failed).
    pub position: u64,
    /// Messages leased now (visibility not over).
    pub leased: u64,
    /// Messages still to be delivered to it: new ones after its head, given back (nacked, or whose
    /// lease ran out), and resubmitted failed entries.
    pub pending: u64,
    /// The most deliveries of any message it has not finished (0: none outstanding).
    pub deliveries_max: u32,
    pub created_at_ms: i64,
    pub last_active_at_ms: i64,
}

/// One outstanding row, as a lease id names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseKey {
    pub consumer_id: i64,
    pub failed_id: i64,
    pub seq: u64,
    pub deliveries: u32,
}

impl LeaseKey {
    pub(crate) fn to_lease_id(self) -> String {
        format!("{}.{}.{}.{}", self.consumer_id, self.failed_id, self.seq, self.deliveries)
    }

    pub(crate) fn parse(text: &str) -> Option<LeaseKey> {
        let mut parts = text.split('.');
        let key = LeaseKey {
            consumer_id: parts.next()?.parse().ok()?,
            failed_id: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            deliveries: parts.next()?.parse().ok()?,
        };
        (parts.next().is_none() && key.seq <= i64::MAX as u64 && key.failed_id >= 0).then_some(key)
    }
}

/// What a message delivered `deliveries` times (reaching `max_deliveries`) becomes: a new failed
/// entry of the consumer's route `consumer:<name>`, or, for a resubmitted entry (`failed_id` not
/// 0), that entry failed again. The same decision for both backends.
#[derive(Debug)]
pub(crate) enum Exhausted {
    Insert(NewFailure),
    FailAgain(FailedChange),
}

pub(crate) fn exhausted(
    route: &str,
    name: &str,
    failed_id: i64,
    message: StoredMessage,
    deliveries: u32,
) -> Exhausted {
    let last_error = max_deliveries_error(deliveries);
    let reason = MAX_DELIVERIES_REASON.to_string();
    if failed_id == 0 {
        Exhausted::Insert(NewFailure {
            route: route.to_string(),
            reader: consumer_reader(name),
            message,
            attempts: deliveries,
            reason,
            last_error,
        })
    } else {
        Exhausted::FailAgain(FailedChange::FailedAgain {
            id: failed_id,
            attempts: deliveries,
            reason,
            last_error,
        })
    }
}

/// The head of a consumer created now: just before the oldest message still stored, so it holds
/// every message from there on.
pub(crate) fn new_consumer_head(first_seq: u64) -> u64 {
    first_seq.saturating_sub(1)
}

/// A consumer's position (its cursor `consumer:<name>`): the seq before its lowest outstanding
/// queue message, or its head when none is outstanding. Resubmitted failed entries do not hold it.
pub(crate) fn position(lowest_outstanding_seq: Option<u64>, head: u64) -> u64 {
    lowest_outstanding_seq.map_or(head, |seq| seq - 1)
}

/// An outstanding row whose visibility has ended, as a lease reads it: a redelivery (`failed_id`
/// 0) or a resubmitted failed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DueRow {
    pub failed_id: i64,
    pub seq: u64,
    pub deliveries: u32,
}

/// What a lease does with a [`DueRow`].
#[derive(Debug)]
pub(crate) enum Redelivery {
    /// Its message is gone (a resubmitted entry discarded meanwhile; a queue message is held by
    /// the cursor): the row is deleted.
    Gone,
    /// It was already delivered `max_deliveries` times: failed as [`Exhausted`] says, and the row
    /// deleted.
    Exhausted(Box<Exhausted>),
    /// Leased again: the row takes the key's deliveries and is leased until
    /// [`LeaseBatch::visible_until_ms`].
    Leased(LeaseKey),
}

/// One lease being filled, the same on both backends: visible outstanding rows first (resubmitted
/// entries, then redeliveries in seq order), then messages new to the consumer, up to
/// `request.max` messages or about [`MAX_LEASE_BYTES`] (always at least one message). The backends
/// read and write the rows; this decides what each becomes and builds the answer.
pub(crate) struct LeaseBatch<'a> {
    name: &'a str,
    route: String,
    consumer_id: i64,
    head: u64,
    request: LeaseRequest,
    visible_until_ms: i64,
    bytes: u64,
    leased: Vec<LeasedMessage>,
}

impl<'a> LeaseBatch<'a> {
    pub(crate) fn new(
        name: &'a str,
        consumer: &ConsumerRow,
        request: LeaseRequest,
        now_ms: i64,
    ) -> LeaseBatch<'a> {
        LeaseBatch {
            name,
            route: consumer_route(name),
            consumer_id: consumer.id,
            head: consumer.head,
            request,
            visible_until_ms: now_ms.saturating_add(request.visibility_ms),
            bytes: 0,
            leased: Vec::new(),
        }
    }

    pub(crate) fn consumer_id(&self) -> i64 {
        self.consumer_id
    }

    /// When the messages leased now are visible again unless acknowledged.
    pub(crate) fn visible_until_ms(&self) -> i64 {
        self.visible_until_ms
    }

    /// How many more messages this lease takes at most (the limit of the next read).
    pub(crate) fn room(&self) -> usize {
        self.request.max.saturating_sub(self.leased.len())
    }

    pub(crate) fn is_full(&self) -> bool {
        self.leased.len() >= self.request.max || self.bytes >= MAX_LEASE_BYTES
    }

    /// Decides a due row, given its message (`None`: gone); a leased one joins the answer.
    pub(crate) fn redeliver(&mut self, row: DueRow, message: Option<StoredMessage>) -> Redelivery {
        let Some(message) = message else { return Redelivery::Gone };
        if row.deliveries >= self.request.max_deliveries {
            return Redelivery::Exhausted(Box::new(exhausted(
                &self.route,
                self.name,
                row.failed_id,
                message,
                row.deliveries,
            )));
        }
        let key = LeaseKey {
            consumer_id: self.consumer_id,
            failed_id: row.failed_id,
            seq: row.seq,
            deliveries: row.deliveries + 1,
        };
        self.push(key, message);
        Redelivery::Leased(key)
    }

    /// The seq after which messages new to the consumer are read (never before the oldest message
    /// still stored), or `None` when the lease is full or nothing is new.
    pub(crate) fn new_messages_after(&self, first_seq: u64, last_seq: u64) -> Option<u64> {
        let after = self.head.max(first_seq.saturating_sub(1));
        (!self.is_full() && after < last_seq).then_some(after)
    }

    /// Leases a message new to the consumer (its first delivery): its head moves to it. The row to
    /// insert is the key's, leased until [`LeaseBatch::visible_until_ms`].
    pub(crate) fn lease_new(&mut self, message: StoredMessage) -> LeaseKey {
        let key = LeaseKey { consumer_id: self.consumer_id, failed_id: 0, seq: message.seq, deliveries: 1 };
        self.head = message.seq;
        self.push(key, message);
        key
    }

    fn push(&mut self, key: LeaseKey, message: StoredMessage) {
        self.bytes += message.payload.len() as u64;
        self.leased.push(LeasedMessage { message, lease_id: key.to_lease_id(), deliveries: key.deliveries });
    }

    /// The answer, and the consumer's head after it.
    pub(crate) fn finish(self) -> (Vec<LeasedMessage>, u64) {
        (self.leased, self.head)
    }
}

/// What an ack or nack does to one current delivery.
#[derive(Debug, Clone)]
pub(crate) enum SettleAction {
    /// Acknowledged: the row is deleted, and a resubmitted failed entry's copy removed with it.
    Finish { remove_failed: Option<FailedChange> },
    /// Given back: the row is no longer leased and is visible again at `visible_at_ms`.
    GiveBack { visible_at_ms: i64 },
}

/// An ack or nack being applied to a consumer's lease ids, the same on both backends: which ids
/// name a current delivery (the backend reads the row's deliveries), what to do with each, and
/// the answer.
pub(crate) struct Settling {
    consumer_id: i64,
    settle: Settle,
    now_ms: i64,
    outcome: SettleOutcome,
}

impl Settling {
    pub(crate) fn new(consumer: &ConsumerRow, settle: Settle, now_ms: i64) -> Settling {
        let outcome = SettleOutcome { consumer_exists: true, ..SettleOutcome::default() };
        Settling { consumer_id: consumer.id, settle, now_ms, outcome }
    }

    /// The row `lease_id` names when it is one of this consumer's; else it is stale.
    pub(crate) fn row_of(&mut self, lease_id: &str) -> Option<LeaseKey> {
        match LeaseKey::parse(lease_id) {
            Some(key) if key.consumer_id == self.consumer_id => Some(key),
            _ => self.stale(lease_id),
        }
    }

    /// What to do with the row `key` names, given its stored deliveries (`None`: no such row):
    /// nothing, and `lease_id` is stale, unless it is that very delivery.
    pub(crate) fn action(
        &mut self,
        lease_id: &str,
        key: LeaseKey,
        stored_deliveries: Option<u32>,
    ) -> Option<SettleAction> {
        if stored_deliveries != Some(key.deliveries) {
            return self.stale(lease_id);
        }
        self.outcome.settled += 1;
        Some(match self.settle {
            Settle::Ack => SettleAction::Finish {
                remove_failed: (key.failed_id != 0).then_some(FailedChange::Remove { id: key.failed_id }),
            },
            Settle::Nack { delay_ms } => {
                SettleAction::GiveBack { visible_at_ms: self.now_ms.saturating_add(delay_ms) }
            }
        })
    }

    fn stale<T>(&mut self, lease_id: &str) -> Option<T> {
        self.outcome.stale.push(lease_id.to_string());
        None
    }

    pub(crate) fn finish(self) -> SettleOutcome {
        self.outcome
    }
}

/// The text of a `max_deliveries` failure.
fn max_deliveries_error(deliveries: u32) -> String {
    format!(
        "delivered {deliveries} times to the consumer without an acknowledgement (the lease ran out or \
         was given back each time)"
    )
}

/// A lease request's body fields as the API hands them in: `None` takes the default. Checks the
/// limits.
pub fn lease_request(
    max: Option<u64>,
    visibility_ms: Option<i64>,
    max_deliveries: Option<u64>,
) -> Result<LeaseRequest, String> {
    let mut request = LeaseRequest::default();
    if let Some(max) = max {
        if max == 0 || max > MAX_LEASE_MAX as u64 {
            return Err(format!("max must be 1 to {MAX_LEASE_MAX}"));
        }
        request.max = max as usize;
    }
    if let Some(visibility_ms) = visibility_ms {
        if visibility_ms <= 0 || visibility_ms > MAX_VISIBILITY_MS {
            return Err("visibility must be more than 0 and at most 12h".to_string());
        }
        request.visibility_ms = visibility_ms;
    }
    if let Some(max_deliveries) = max_deliveries {
        if max_deliveries == 0 || max_deliveries > u64::from(MAX_MAX_DELIVERIES) {
            return Err(format!("max_deliveries must be 1 to {MAX_MAX_DELIVERIES}"));
        }
        request.max_deliveries = max_deliveries as u32;
    }
    Ok(request)
}

impl Store {
    /// Leases up to `request.max` messages of `queue` to consumer `name` (created by its first
    /// lease): redeliveries whose visibility ended first, then new messages, in seq order.
    /// Durable when answered. A queue that does not exist yet is created (empty), so a consumer
    /// can be in place before the first message arrives.
    pub async fn consumer_lease(
        &self,
        queue: &str,
        name: &str,
        request: LeaseRequest,
    ) -> Result<Vec<LeasedMessage>, StoreError> {
        self.call(|reply| crate::ops::Op::ConsumerLease {
            queue: queue.to_string(),
            name: name.to_string(),
            request,
            reply,
        })
        .await
    }

    /// Acknowledges (or gives back) leased messages of consumer `name`.
    pub async fn consumer_settle(
        &self,
        queue: &str,
        name: &str,
        lease_ids: Vec<String>,
        settle: Settle,
    ) -> Result<SettleOutcome, StoreError> {
        if lease_ids.len() > MAX_SETTLE_IDS {
            return Err(StoreError::Invalid(format!(
                "at most {MAX_SETTLE_IDS} lease ids per request; this one names {}",
                lease_ids.len()
            )));
        }
        self.call(|reply| crate::ops::Op::ConsumerSettle {
            queue: queue.to_string(),
            name: name.to_string(),
            lease_ids,
            settle,
            reply,
        })
        .await
    }

    /// Forgets consumer `name` of `queue`: its outstanding messages, its cursor and its hold on
    /// storage. False if there was none. Its failed entries stay.
    pub async fn consumer_delete(&self, queue: &str, name: &str) -> Result<bool, StoreError> {
        self.call(|reply| crate::ops::Op::ConsumerDelete {
            queue: queue.to_string(),
            name: name.to_string(),
            reply,
        })
        .await
    }

    /// Every consumer of `queue`, by name, as of `now_ms`.
    pub async fn consumers(&self, queue: &str, now_ms: i64) -> Result<Vec<ConsumerView>, StoreError> {
        let last_seq = self.queue(queue).map(|q| q.last_seq).unwrap_or(0);
        match &self.inner.backend {
            crate::Backend::Postgres(pg) => pg.consumers(queue, now_ms).await,
            crate::Backend::Sqlite(_) => {
                let store = self.clone();
                let queue = queue.to_string();
                tokio::task::spawn_blocking(move || {
                    let crate::Backend::Sqlite(sqlite) = &store.inner.backend else { unreachable!() };
                    sqlite.with_reader(|conn| sqlite_list(conn, &queue, last_seq, now_ms))
                })
                .await
                .map_err(|_| StoreError::Closed)?
            }
        }
    }
}

/// One consumer's row while the writer works on it.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerRow {
    pub id: i64,
    pub head: u64,
}

/// Builds a view from a consumer row and the counts over its outstanding rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn view(
    name: String,
    position: u64,
    head: u64,
    last_seq: u64,
    leased: u64,
    given_back: u64,
    deliveries_max: u32,
    created_at_ms: i64,
    last_active_at_ms: i64,
) -> ConsumerView {
    ConsumerView {
        name,
        position,
        leased,
        pending: last_seq.saturating_sub(head) + given_back,
        deliveries_max,
        created_at_ms,
        last_active_at_ms,
    }
}

fn sqlite_list(
    conn: &rusqlite::Connection,
    queue: &str,
    last_seq: u64,
    now_ms: i64,
) -> Result<Vec<ConsumerView>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.name, coalesce(cu.acked_seq, 0), c.head, c.created_at_ms, c.last_active_at_ms,
                (SELECT count(*) FROM consumer_messages m WHERE m.consumer_id = c.consumer_id
                   AND m.leased = 1 AND m.visible_at_ms > ?2),
                (SELECT count(*) FROM consumer_messages m WHERE m.consumer_id = c.consumer_id
                   AND NOT (m.leased = 1 AND m.visible_at_ms > ?2)),
                (SELECT coalesce(max(deliveries), 0) FROM consumer_messages m WHERE m.consumer_id = c.consumer_id)
         FROM consumers c
         LEFT JOIN queues q ON q.name = c.queue
         LEFT JOIN cursors cu ON cu.queue_id = q.queue_id AND cu.reader = 'consumer:' || c.name
         WHERE c.queue = ?1 ORDER BY c.name",
    )?;
    let rows = stmt.query_map(rusqlite::params![queue, now_ms], |r| {
        Ok(view(
            r.get(0)?,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, i64>(2)? as u64,
            last_seq,
            r.get::<_, i64>(5)? as u64,
            r.get::<_, i64>(6)? as u64,
            r.get::<_, i64>(7)? as u32,
            r.get(3)?,
            r.get(4)?,
        ))
    })?;
    rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from_sqlite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_round_trip_and_reject_garbage() {
        let key = LeaseKey { consumer_id: 7, failed_id: 0, seq: 42, deliveries: 3 };
        assert_eq!(key.to_lease_id(), "7.0.42.3");
        assert_eq!(LeaseKey::parse("7.0.42.3"), Some(key));
        for bad in ["", "7", "7.0.42", "7.0.42.3.1", "a.b.c.d", "7.-1.42.3", "7.0.-42.3", "7.0.42.x"] {
            assert_eq!(LeaseKey::parse(bad), None, "{bad:?}");
        }
    }

    fn message(seq: u64, payload_bytes: usize) -> StoredMessage {
        StoredMessage {
            id: format!("m{seq}"),
            queue: "q".to_string(),
            seq,
            origin: "node".to_string(),
            origin_seq: seq,
            content_type: "text/plain".to_string(),
            accepted_at_ms: 0,
            payload: bytes::Bytes::from(vec![0u8; payload_bytes]),
        }
    }

    fn request(max: usize, max_deliveries: u32) -> LeaseRequest {
        LeaseRequest { max, visibility_ms: 1_000, max_deliveries }
    }

    const CONSUMER: ConsumerRow = ConsumerRow { id: 7, head: 10 };

    #[test]
    fn a_new_consumer_starts_before_the_oldest_message_and_its_position_waits_for_the_lowest_outstanding() {
        assert_eq!(new_consumer_head(1), 0);
        assert_eq!(new_consumer_head(0), 0);
        assert_eq!(new_consumer_head(42), 41);
        assert_eq!(position(None, 10), 10);
        assert_eq!(position(Some(4), 10), 3);
        assert_eq!(position(Some(1), 10), 0);
    }

    #[test]
    fn a_due_row_is_leased_again_failed_at_max_deliveries_or_dropped_when_gone() {
        let mut batch = LeaseBatch::new("c", &CONSUMER, request(10, 3), 5_000);
        assert_eq!(batch.visible_until_ms(), 6_000);
        let row = |failed_id, seq, deliveries| DueRow { failed_id, seq, deliveries };

        assert!(matches!(batch.redeliver(row(0, 4, 1), None), Redelivery::Gone));
        let leased = batch.redeliver(row(0, 5, 2), Some(message(5, 3)));
        let expected = LeaseKey { consumer_id: 7, failed_id: 0, seq: 5, deliveries: 3 };
        assert!(matches!(leased, Redelivery::Leased(key) if key == expected), "{leased:?}");
        match batch.redeliver(row(0, 6, 3), Some(message(6, 3))) {
            Redelivery::Exhausted(exhausted) => match *exhausted {
                Exhausted::Insert(failure) => {
                    assert_eq!(
                        (failure.route.as_str(), failure.reader.as_str()),
                        ("consumer:c", "consumer:c")
                    );
                    assert_eq!((failure.message.seq, failure.attempts), (6, 3));
                    assert_eq!(failure.reason, MAX_DELIVERIES_REASON);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        match batch.redeliver(row(9, 2, 4), Some(message(2, 3))) {
            Redelivery::Exhausted(exhausted) => match *exhausted {
                Exhausted::FailAgain(FailedChange::FailedAgain { id, attempts, .. }) => {
                    assert_eq!((id, attempts), (9, 4))
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // Only the leased one is in the answer, and a redelivery leaves the head where it was.
        let (leased, head) = batch.finish();
        assert_eq!(head, 10);
        assert_eq!(leased.len(), 1);
        assert_eq!(
            (leased[0].message.seq, leased[0].deliveries, leased[0].lease_id.as_str()),
            (5, 3, "7.0.5.3")
        );
    }

    #[test]
    fn new_messages_start_after_the_head_or_the_oldest_stored_and_move_the_head() {
        let batch = LeaseBatch::new("c", &CONSUMER, request(10, 3), 0);
        assert_eq!(batch.new_messages_after(1, 20), Some(10));
        assert_eq!(batch.new_messages_after(15, 20), Some(14), "released past the head");
        assert_eq!(batch.new_messages_after(1, 10), None, "nothing new");
        let mut batch = LeaseBatch::new("c", &CONSUMER, request(10, 3), 0);
        let key = batch.lease_new(message(11, 1));
        assert_eq!(key, LeaseKey { consumer_id: 7, failed_id: 0, seq: 11, deliveries: 1 });
        let (leased, head) = batch.finish();
        assert_eq!((head, leased[0].lease_id.as_str(), leased[0].deliveries), (11, "7.0.11.1", 1));
    }

    #[test]
    fn a_lease_is_full_at_max_messages_or_about_max_bytes_with_at_least_one_message() {
        let mut batch = LeaseBatch::new("c", &CONSUMER, request(2, 3), 0);
        assert_eq!(batch.room(), 2);
        batch.lease_new(message(11, 1));
        assert!(!batch.is_full());
        assert_eq!(batch.room(), 1);
        batch.lease_new(message(12, 1));
        assert!(batch.is_full());
        assert_eq!((batch.room(), batch.new_messages_after(1, 20)), (0, None));

        let mut batch = LeaseBatch::new("c", &CONSUMER, request(10, 3), 0);
        assert!(!batch.is_full());
        batch.lease_new(message(11, MAX_LEASE_BYTES as usize));
        assert!(batch.is_full(), "one message past the byte bound fills it");
        assert_eq!(batch.room(), 9);
    }

    #[test]
    fn settling_applies_only_current_deliveries_of_this_consumer() {
        let mut acking = Settling::new(&CONSUMER, Settle::Ack, 1_000);
        for stale in ["garbage", "8.0.5.1"] {
            assert_eq!(acking.row_of(stale), None, "{stale}");
        }
        let key = acking.row_of("7.0.5.2").unwrap();
        assert!(acking.action("7.0.5.2", key, None).is_none(), "no such row (already acknowledged)");
        assert!(acking.action("7.0.5.2", key, Some(3)).is_none(), "delivered again since");
        let action = acking.action("7.0.5.2", key, Some(2));
        assert!(matches!(action, Some(SettleAction::Finish { remove_failed: None })), "{action:?}");
        let key = acking.row_of("7.9.5.1").unwrap();
        let action = acking.action("7.9.5.1", key, Some(1));
        assert!(
            matches!(
                action,
                Some(SettleAction::Finish { remove_failed: Some(FailedChange::Remove { id: 9 }) })
            ),
            "{action:?}"
        );
        let outcome = acking.finish();
        assert!(outcome.consumer_exists);
        assert_eq!(outcome.settled, 2);
        assert_eq!(outcome.stale, ["garbage", "8.0.5.1", "7.0.5.2", "7.0.5.2"]);

        let mut nacking = Settling::new(&CONSUMER, Settle::Nack { delay_ms: 500 }, 1_000);
        let key = nacking.row_of("7.0.5.2").unwrap();
        let action = nacking.action("7.0.5.2", key, Some(2));
        assert!(matches!(action, Some(SettleAction::GiveBack { visible_at_ms: 1_500 })), "{action:?}");
        let mut nacking = Settling::new(&CONSUMER, Settle::Nack { delay_ms: i64::MAX }, 1_000);
        let action = nacking.action("7.0.5.2", key, Some(2));
        assert!(matches!(action, Some(SettleAction::GiveBack { visible_at_ms: i64::MAX })), "{action:?}");
    }

    #[test]
    fn lease_request_defaults_and_limits() {
        assert_eq!(lease_request(None, None, None).unwrap(), LeaseRequest::default());
        assert!(lease_request(Some(0), None, None).is_err());
        assert!(lease_request(Some(1001), None, None).is_err());
        assert!(lease_request(None, Some(MAX_VISIBILITY_MS + 1), None).is_err());
        assert!(lease_request(None, Some(0), None).is_err());
        assert!(lease_request(None, None, Some(0)).is_err());
        let r = lease_request(Some(5), Some(1000), Some(2)).unwrap();
        assert_eq!((r.max, r.visibility_ms, r.max_deliveries), (5, 1000, 2));
    }
}
