//! The write operations both backends' writers take, and the in-memory views they publish after
//! each commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use outpost_core::wire::BatchMessage;
use tokio::sync::oneshot;

use crate::{consumers, failed, Appended, NewMessage, OriginAppended, QueueStats, StoreError};

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
    PutDocument {
        key: String,
        value: String,
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

impl Op {
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Op::Append { messages, .. } => messages.iter().map(|m| m.payload.len()).sum(),
            Op::AppendFromOrigin { messages, .. } => messages.iter().map(|m| m.payload.len()).sum(),
            _ => 0,
        }
    }
}

/// What the rest of the node reads without asking the writer: replaced after each commit.
#[derive(Default)]
pub struct Views {
    pub stats: RwLock<BTreeMap<String, QueueStats>>,
    pub origin_positions: RwLock<HashMap<(String, String), u64>>,
    pub cursors: RwLock<HashMap<(String, String), u64>>,
    /// PostgreSQL only: the `version` column of each queue row the stats were read from, so a
    /// refresh that raced with a newer commit never replaces newer stats with older ones.
    pub stat_versions: RwLock<HashMap<String, i64>>,
}
