//! The write operations both backends' writers take, the rules both apply to them (as pure
//! functions: each backend only reads and writes its rows around them), and the in-memory views
//! the writers publish after each commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use bytes::Bytes;
use outpost_core::wire::BatchMessage;
use tokio::sync::{mpsc, oneshot};

use crate::consumers::{LeasedMessage, SettleOutcome};
use crate::failed::{FailedOutcome, ResubmitOutcome, MAX_RESUBMIT_IDS};
use crate::{
    consumers, failed, Appended, NewMessage, OriginAppended, QueueStats, StoreError, StoreOptions,
    IDEMPOTENCY_KEY_OVERHEAD_BYTES,
};

/// The most operations one commit carries.
pub const MAX_OPS_PER_COMMIT: usize = 4096;
/// The most payload bytes one commit carries (a single larger operation still commits alone).
pub const MAX_BYTES_PER_COMMIT: usize = 32 << 20;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The exactly-once rule for an edge's batch, the same on both backends: given the highest edge
/// seq stored for (edge, queue), either the messages to store (consecutive, starting right after
/// the position) or the answer when there is nothing to store (all duplicates, or a gap).
pub(crate) fn plan_origin_append(
    position: u64,
    messages: &[BatchMessage],
) -> Result<(Vec<&BatchMessage>, u64), OriginAppended> {
    let fresh: Vec<&BatchMessage> = messages.iter().filter(|m| m.seq > position).collect();
    let duplicates = (messages.len() - fresh.len()) as u64;
    let gap_expected_seq = match fresh.first() {
        None => None,
        Some(first) if first.seq == position + 1 => return Ok((fresh, duplicates)),
        Some(_) => Some(position + 1),
    };
    Err(OriginAppended { stored_through: position, stored: 0, duplicates, gap_expected_seq })
}

/// Where an edge's release through `through_seq` leaves its (edge, queue) position: moved there,
/// or kept when it is already at or past it (a position never moves back). The answer, and the
/// new position to write when it moves.
pub(crate) fn plan_origin_release(position: u64, through_seq: u64) -> (OriginAppended, Option<u64>) {
    let moved = (through_seq > position).then_some(through_seq);
    let answer = OriginAppended {
        stored_through: position.max(through_seq),
        stored: 0,
        duplicates: 0,
        gap_expected_seq: None,
    };
    (answer, moved)
}

/// A write of `needed_bytes` fits when the disk has room for it beyond the reserve that checkpoints
/// and releases need (`disk_room_bytes`; `u64::MAX` where the store does not measure it) and the
/// quota (`limits.max_store_bytes`) has room for it beside the `used_bytes` already stored.
pub(crate) fn check_quota(
    options: &StoreOptions,
    used_bytes: u64,
    needed_bytes: u64,
    disk_room_bytes: u64,
) -> Result<(), StoreError> {
    if needed_bytes > disk_room_bytes {
        return Err(StoreError::DiskReserve { room_bytes: disk_room_bytes, needed_bytes });
    }
    if used_bytes.saturating_add(needed_bytes) > options.max_store_bytes {
        return Err(StoreError::QuotaReached {
            used_bytes,
            needed_bytes,
            limit_bytes: options.max_store_bytes,
        });
    }
    Ok(())
}

/// A new queue may be created only below `limits.max_queues`.
pub(crate) fn check_queue_count(options: &StoreOptions, queues: u64, queue: &str) -> Result<(), StoreError> {
    if queues >= options.max_queues {
        return Err(StoreError::TooManyQueues { queue: queue.to_string(), limit: options.max_queues });
    }
    Ok(())
}

/// What an append of `messages` under `idempotency_key` needs from the quota: the payloads' bytes
/// and the bytes its key takes once remembered. Refuses an empty append.
pub(crate) fn append_bytes(
    messages: &[NewMessage],
    idempotency_key: Option<&str>,
) -> Result<(u64, u64), StoreError> {
    if messages.is_empty() {
        return Err(StoreError::Invalid("an append needs at least one message".into()));
    }
    let payload_bytes = messages.iter().map(|m| m.payload.len() as u64).sum();
    let key_bytes = idempotency_key.map_or(0, |key| key.len() as u64 + IDEMPOTENCY_KEY_OVERHEAD_BYTES);
    Ok((payload_bytes, key_bytes))
}

/// One message to store at the end of a queue, as both backends write it.
pub(crate) struct NewRow<'a> {
    pub id: String,
    pub origin: &'a str,
    /// `None`: accepted here, its origin seq is its seq.
    pub origin_seq: Option<u64>,
    pub content_type: &'a str,
    pub payload: &'a Bytes,
}

/// The rows of a client's append on this node: the ids `Store::append` gave them (a new one for
/// any still without).
pub(crate) fn local_rows<'a>(
    messages: &'a [NewMessage],
    node_id: &'a str,
) -> impl Iterator<Item = NewRow<'a>> + 'a {
    messages.iter().map(move |m| NewRow {
        id: m.id.clone().unwrap_or_else(outpost_core::new_message_id),
        origin: node_id,
        origin_seq: None,
        content_type: &m.content_type,
        payload: &m.payload,
    })
}

/// The rows of an edge's batch: the fresh messages but skip entries, which only move the position
/// (see `outpost_core::wire`).
pub(crate) fn origin_rows<'a>(
    fresh: &'a [&'a BatchMessage],
    origin: &'a str,
) -> impl Iterator<Item = NewRow<'a>> + 'a {
    fresh.iter().filter(|m| !m.is_skip()).map(move |m| NewRow {
        id: m.id.clone(),
        origin,
        origin_seq: Some(m.seq),
        content_type: &m.content_type,
        payload: &m.payload,
    })
}

/// Numbers the rows appended to one queue in a transaction: seqs follow `last_seq` without a gap,
/// and the queue's stats take the rows in when the append is finished.
pub(crate) struct QueueTail<'s> {
    stats: &'s mut QueueStats,
    last_seq: u64,
    bytes: u64,
    now_ms: i64,
}

impl<'s> QueueTail<'s> {
    pub(crate) fn new(stats: &'s mut QueueStats, now_ms: i64) -> QueueTail<'s> {
        let last_seq = stats.last_seq;
        QueueTail { stats, last_seq, bytes: 0, now_ms }
    }

    /// The (seq, origin seq) of the next row.
    pub(crate) fn place(&mut self, row: &NewRow<'_>) -> (u64, u64) {
        self.last_seq += 1;
        self.bytes += row.payload.len() as u64;
        (self.last_seq, row.origin_seq.unwrap_or(self.last_seq))
    }

    /// Updates the queue's stats with the rows placed; returns (first_seq, last_seq, bytes).
    pub(crate) fn finish(self) -> (u64, u64, u64) {
        let stats = self.stats;
        let first_seq = stats.last_seq + 1;
        let count = self.last_seq - stats.last_seq;
        if stats.messages == 0 && count > 0 {
            stats.first_seq = first_seq;
            stats.oldest_accepted_at_ms = Some(self.now_ms);
        }
        stats.last_seq = self.last_seq;
        stats.messages += count;
        stats.bytes += self.bytes;
        (first_seq, self.last_seq, self.bytes)
    }
}

/// Whether `reader` may record it is done with `queue` through `acked_seq`: refused past the
/// queue's last seq (`None`: no such queue); `Ok(false)` when its cursor (`current`) is already
/// there, since a cursor never moves back.
pub(crate) fn check_cursor_advance(
    queue: &str,
    reader: &str,
    acked_seq: u64,
    last_seq: Option<u64>,
    current: u64,
) -> Result<bool, StoreError> {
    let Some(last_seq) = last_seq else {
        return Err(StoreError::Invalid(format!("no queue named {queue:?}")));
    };
    if acked_seq > last_seq {
        return Err(StoreError::Invalid(format!(
            "reader {reader:?} cannot be done with seq {acked_seq} of queue {queue:?}: the last seq is {last_seq}"
        )));
    }
    Ok(current < acked_seq)
}

/// The seq through which a queue may be released: the lowest cursor of its required readers (its
/// consumers included), when that is past the first message still stored. `None`: nothing to
/// release, or nobody is required to read the queue and everything is kept.
pub(crate) fn release_through(
    required_cursors: impl IntoIterator<Item = u64>,
    stats: &QueueStats,
) -> Option<u64> {
    let through = required_cursors.into_iter().min()?;
    (through >= stats.first_seq && stats.messages > 0).then_some(through)
}

/// Takes `count` messages of `bytes` released through `through` out of a queue's stats;
/// `oldest_accepted_at_ms` is that of the first message left.
pub(crate) fn apply_release(
    stats: &mut QueueStats,
    through: u64,
    count: u64,
    bytes: u64,
    oldest_accepted_at_ms: Option<i64>,
) {
    stats.messages -= count;
    stats.bytes -= bytes;
    stats.first_seq = through + 1;
    stats.oldest_accepted_at_ms = oldest_accepted_at_ms;
}

/// A resubmit by ids names at most [`MAX_RESUBMIT_IDS`] (checked before any lookup).
pub(crate) fn check_resubmit_ids(ids: &[i64]) -> Result<(), StoreError> {
    if ids.len() > MAX_RESUBMIT_IDS {
        return Err(StoreError::Invalid(format!(
            "a resubmit may name at most {MAX_RESUBMIT_IDS} ids; this one names {}",
            ids.len()
        )));
    }
    Ok(())
}

/// The outcome of resubmitting the entries `ids`, given the route of each that exists: every one
/// to resubmit, sorted and once each, or (when any is unknown) the unknown ones and no change.
pub(crate) fn plan_resubmit_ids(ids: &[i64], routes: &HashMap<i64, String>) -> ResubmitOutcome {
    let unknown: Vec<i64> = ids.iter().copied().filter(|id| !routes.contains_key(id)).collect();
    if !unknown.is_empty() {
        return ResubmitOutcome { resubmitted: Vec::new(), unknown };
    }
    let mut resubmitted: Vec<(i64, String)> = routes.iter().map(|(id, route)| (*id, route.clone())).collect();
    resubmitted.sort_unstable();
    ResubmitOutcome { resubmitted, unknown }
}

pub(crate) enum Op {
    Append {
        queue: String,
        messages: Vec<NewMessage>,
        idempotency_key: Option<String>,
        reply: Reply<Appended>,
    },
    AppendFromOrigin {
        queue: String,
        origin: String,
        messages: Vec<BatchMessage>,
        reply: Reply<OriginAppended>,
    },
    /// An edge released messages of `queue` through `through_seq` without forwarding them: the
    /// position moves there (never back) with nothing stored.
    ReleaseFromOrigin {
        queue: String,
        origin: String,
        through_seq: u64,
        reply: Reply<OriginAppended>,
    },
    AdvanceCursor {
        queue: String,
        reader: String,
        acked_seq: u64,
        reply: Reply<()>,
    },
    /// Documents (key, value) stored in one transaction, each replacing any previous value.
    PutDocuments {
        documents: Vec<(String, String)>,
        reply: Reply<()>,
    },
    /// Copy a message into the failed table and move the route's cursor past it, atomically.
    FailMessage {
        failure: Box<failed::NewFailure>,
        reply: Reply<failed::FailedOutcome>,
    },
    ChangeFailed {
        change: failed::FailedChange,
        reply: Reply<failed::FailedOutcome>,
    },
    /// Lease messages to a consumer (created if new); see [`crate::consumers`].
    ConsumerLease {
        queue: String,
        name: String,
        request: consumers::LeaseRequest,
        reply: Reply<Vec<consumers::LeasedMessage>>,
    },
    /// Acknowledge or give back a consumer's leased messages.
    ConsumerSettle {
        queue: String,
        name: String,
        lease_ids: Vec<String>,
        settle: consumers::Settle,
        reply: Reply<consumers::SettleOutcome>,
    },
    /// Forget a consumer and its hold on storage.
    ConsumerDelete {
        queue: String,
        name: String,
        reply: Reply<bool>,
    },
    Ping {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// The answer to one operation, produced inside the transaction, sent after the commit.
pub(crate) enum Outcome {
    Append(Result<Appended, StoreError>),
    Origin(Result<OriginAppended, StoreError>),
    Done(Result<(), StoreError>),
    Failed(Result<FailedOutcome, StoreError>),
    Leased(Result<Vec<LeasedMessage>, StoreError>),
    Settled(Result<SettleOutcome, StoreError>),
    Deleted(Result<bool, StoreError>),
    /// Ping and shutdown: answered without a result.
    Nothing,
}

impl Op {
    /// Sends the operation's `outcome` after its commit. Returns the reply of a shutdown, which is
    /// answered once the writer has stopped.
    pub(crate) fn answer(self, outcome: Outcome) -> Option<oneshot::Sender<()>> {
        match (self, outcome) {
            (Op::Append { reply, .. }, Outcome::Append(r)) => drop(reply.send(r)),
            (
                Op::AppendFromOrigin { reply, .. } | Op::ReleaseFromOrigin { reply, .. },
                Outcome::Origin(r),
            ) => drop(reply.send(r)),
            (Op::AdvanceCursor { reply, .. } | Op::PutDocuments { reply, .. }, Outcome::Done(r)) => {
                drop(reply.send(r))
            }
            (Op::FailMessage { reply, .. } | Op::ChangeFailed { reply, .. }, Outcome::Failed(r)) => {
                drop(reply.send(r))
            }
            (Op::ConsumerLease { reply, .. }, Outcome::Leased(r)) => drop(reply.send(r)),
            (Op::ConsumerSettle { reply, .. }, Outcome::Settled(r)) => drop(reply.send(r)),
            (Op::ConsumerDelete { reply, .. }, Outcome::Deleted(r)) => drop(reply.send(r)),
            (Op::Ping { reply }, _) => drop(reply.send(())),
            (Op::Shutdown { reply }, _) => return Some(reply),
            _ => unreachable!("every operation has the outcome of its kind"),
        }
        None
    }

    /// Refuses the operation with `failure()`: its commit failed. A ping is still answered (the
    /// writer is alive). Returns the reply of a shutdown, as [`Op::answer`] does.
    pub(crate) fn refuse(self, failure: &dyn Fn() -> StoreError) -> Option<oneshot::Sender<()>> {
        match self {
            Op::Append { reply, .. } => drop(reply.send(Err(failure()))),
            Op::AppendFromOrigin { reply, .. } | Op::ReleaseFromOrigin { reply, .. } => {
                drop(reply.send(Err(failure())))
            }
            Op::AdvanceCursor { reply, .. } | Op::PutDocuments { reply, .. } => {
                drop(reply.send(Err(failure())))
            }
            Op::FailMessage { reply, .. } | Op::ChangeFailed { reply, .. } => {
                drop(reply.send(Err(failure())))
            }
            Op::ConsumerLease { reply, .. } => drop(reply.send(Err(failure()))),
            Op::ConsumerSettle { reply, .. } => drop(reply.send(Err(failure()))),
            Op::ConsumerDelete { reply, .. } => drop(reply.send(Err(failure()))),
            Op::Ping { reply } => drop(reply.send(())),
            Op::Shutdown { reply } => return Some(reply),
        }
        None
    }

    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Op::Append { messages, .. } => messages.iter().map(|m| m.payload.len()).sum(),
            Op::AppendFromOrigin { messages, .. } => messages.iter().map(|m| m.payload.len()).sum(),
            _ => 0,
        }
    }
}

/// The operations one commit carries: `first` and every operation already waiting, up to
/// [`MAX_OPS_PER_COMMIT`] operations or [`MAX_BYTES_PER_COMMIT`] payload bytes.
pub(crate) fn gather_group(first: Op, ops: &mut mpsc::Receiver<Op>) -> Vec<Op> {
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
    group
}

/// What the rest of the node reads without asking the writer: replaced after each commit.
#[derive(Default)]
pub struct Views {
    pub stats: RwLock<BTreeMap<String, QueueStats>>,
    pub origin_positions: RwLock<BTreeMap<(String, String), u64>>,
    pub cursors: RwLock<BTreeMap<(String, String), u64>>,
    /// PostgreSQL only: the `version` column of each queue row the stats were read from, so a
    /// refresh that raced with a newer commit never replaces newer stats with older ones.
    pub stat_versions: RwLock<HashMap<String, i64>>,
}
