//! Downlink at the central: messages posted for an edge (or broadcast to every edge) wait in the
//! central store until the edge has them (CONTRACT section 9).
//!
//! # Design
//!
//! - **One internal queue per (edge, queue).** A message for edge `E`'s queue `Q` is appended to the
//!   store queue `~downlink/E/Q` ([`downlink_queue`]). The `~` and `/` cannot appear in a queue name
//!   a client may use, so these queues never collide with client queues and are left out of every
//!   queue listing. The store gives them what client queues have: gapless seqs in the central's
//!   order (cluster-wide on PostgreSQL), durability before the answer, idempotency keys (per
//!   edge and queue: a broadcast with a key is stored once per edge however often it is retried).
//! - **The edge's position is a cursor.** The reader [`DOWNLINK_READER`] of `~downlink/E/Q` is how
//!   far edge `E` has durably stored `Q`; it is the queue's only required reader, so a message's
//!   storage is released once the edge has it.
//! - **TTL.** With `limits.message_ttl`, a message still waiting when its TTL ends becomes failed
//!   (reason `expired`, route `downlink:E`) and the cursor moves past it in the same transaction; on a
//!   cluster one central at a time does this (the store lease [`EXPIRY_LEASE`]).
//! - **Push.** After a post, the central the edge is linked to wakes the link's stream (a
//!   `Notify`, so a flood of posts becomes one event), which writes a `downlink` event with what
//!   waits; a post on another central reaches it through the cluster event `downlink`. Every ping
//!   also says what waits, should an event be missed.
//! - **Pull.** The edge asks for the messages after its durable position
//!   ([`CentralHub::pull_downlink`]); that request also moves the edge's cursor here to that
//!   position. Seqs that are gone (expired) come as skip entries so the edge's position moves on.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use outpost_core::time::now_unix_ms;
use outpost_core::wire::BatchMessage;
use outpost_store::{Appended, NewFailure, NewMessage, StoreError};

use crate::cluster::EVENT_DOWNLINK;
use crate::error::{CentralError, SendEventError};
use crate::CentralHub;

/// The most messages one pull answers.
pub const MAX_PULL_MESSAGES: usize = 10_000;
/// The most payload bytes one pull answers (a single larger message still goes alone).
pub const MAX_PULL_BYTES: u64 = 16 << 20;

/// Store queues holding downlink messages start with this.
pub const DOWNLINK_QUEUE_PREFIX: &str = "~downlink/";
/// The reader whose cursor is the edge's durable position in a downlink queue.
pub const DOWNLINK_READER: &str = "downlink";
/// The store lease of the central that expires downlink messages.
pub const EXPIRY_LEASE: &str = "downlink-expiry";
/// How often waiting downlink messages are checked against the TTL.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// The most expired messages looked at per queue and round.
const EXPIRY_BATCH: usize = 1000;
/// About the most payload bytes one expiry pass reads per queue (the rest waits for the next).
const EXPIRY_READ_BYTES: usize = 16 << 20;

/// The store queue holding edge `edge`'s downlink messages of `queue`.
pub fn downlink_queue(edge: &str, queue: &str) -> String {
    format!("{DOWNLINK_QUEUE_PREFIX}{edge}/{queue}")
}

/// `(edge, queue)` of a downlink store queue, `None` for any other queue.
pub fn parse_downlink_queue(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(DOWNLINK_QUEUE_PREFIX)?.split_once('/')
}

/// True for the store queues holding downlink messages (left out of client-facing listings).
pub fn is_downlink_queue(name: &str) -> bool {
    name.starts_with(DOWNLINK_QUEUE_PREFIX)
}

/// The readers every message of a downlink queue must reach before its storage is released;
/// `None` for any other queue.
pub fn downlink_readers(queue: &str) -> Option<Vec<String>> {
    is_downlink_queue(queue).then(|| vec![DOWNLINK_READER.to_string()])
}

/// The failed-list route name of an edge's expired downlink messages.
pub fn downlink_route(edge: &str) -> String {
    format!("downlink:{edge}")
}

/// One queue of an edge's downlink, as `GET /v1/edges/{id}/downlink` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkQueue {
    pub queue: String,
    /// Messages waiting for the edge.
    pub pending: u64,
    /// Accepted time of the oldest waiting message.
    pub oldest_pending_at_ms: Option<i64>,
    /// The highest seq the edge has (or that expired).
    pub delivered_seq: u64,
    /// The highest seq posted.
    pub last_seq: u64,
}

impl CentralHub {
    /// Whether downlink messages may be posted for `edge_id`: with `[[edge]]` listed, only for
    /// those; with no list, for any id (they wait for that edge).
    pub fn check_downlink_target(&self, edge_id: &str) -> Result<(), CentralError> {
        if self.config.edges.is_empty() || self.is_listed(edge_id) {
            return Ok(());
        }
        Err(SendEventError::UnknownEdge(edge_id.to_string()).into())
    }

    /// Stores `messages` for `edge_id`'s `queue`, durably, in order. With an idempotency key seen
    /// before for this edge and queue, nothing is stored and the original write is answered.
    pub async fn post_downlink(
        &self,
        edge_id: &str,
        queue: &str,
        messages: Vec<NewMessage>,
        idempotency_key: Option<String>,
    ) -> Result<Appended, CentralError> {
        self.check_downlink_target(edge_id)?;
        let appended = self.store.append(&downlink_queue(edge_id, queue), messages, idempotency_key).await?;
        self.downlink_posted(edge_id, queue, appended.last_seq).await;
        Ok(appended)
    }

    /// Tells the edge (linked here or to another central of the cluster) that `queue` has
    /// messages through `last_seq`.
    async fn downlink_posted(&self, edge_id: &str, queue: &str, last_seq: u64) {
        self.announce_downlink(edge_id, queue, last_seq);
        let queues = BTreeMap::from([(queue.to_string(), last_seq)]);
        self.publish_with_queues(EVENT_DOWNLINK, Some(edge_id), None, queues).await;
    }

    /// Wakes the edge's link stream if the edge is linked here.
    pub(crate) fn announce_downlink(&self, edge_id: &str, queue: &str, last_seq: u64) {
        let mut registry = self.registry();
        let Some(link) = registry.edges.get_mut(edge_id).and_then(|entry| entry.link.as_mut()) else {
            return;
        };
        let known = link.announced.entry(queue.to_string()).or_default();
        *known = (*known).max(last_seq);
        link.downlink.notify_one();
    }

    /// What posts announced for the link `link_id` of `edge_id` since the last call.
    pub(crate) fn take_announced(&self, edge_id: &str, link_id: u64) -> BTreeMap<String, u64> {
        let mut registry = self.registry();
        match registry.edges.get_mut(edge_id).and_then(|entry| entry.link.as_mut()) {
            Some(link) if link.id == link_id => std::mem::take(&mut link.announced),
            _ => BTreeMap::new(),
        }
    }

    /// Queues with downlink waiting for `edge_id`: queue → highest seq posted.
    pub fn downlink_waiting(&self, edge_id: &str) -> BTreeMap<String, u64> {
        self.downlink(edge_id).into_iter().filter(|q| q.pending > 0).map(|q| (q.queue, q.last_seq)).collect()
    }

    /// The edge's pull: it durably holds `queue` through `acked` (its cursor here moves there) and
    /// gets up to `limit` entries after `after_seq` (≥ `acked`: the edge may ask ahead while it
    /// stores), in order: messages, and skip entries for seqs that are gone (expired). Empty when
    /// nothing more waits.
    pub async fn pull_downlink(
        &self,
        edge_id: &str,
        queue: &str,
        after_seq: u64,
        acked: u64,
        limit: usize,
    ) -> Result<Vec<BatchMessage>, CentralError> {
        let name = downlink_queue(edge_id, queue);
        let limit = limit.clamp(1, MAX_PULL_MESSAGES);
        if acked > self.store.cursor(&name, DOWNLINK_READER) {
            match self.store.advance_cursor(&name, DOWNLINK_READER, acked).await {
                Ok(()) => {}
                Err(StoreError::Invalid(message)) => {
                    return Err(CentralError::Invalid(format!(
                    "edge {edge_id:?} says it holds downlink {queue:?} through seq {acked}, more than was \
                         ever posted for it here: {message}. Was it linked to a central of another cluster?"
                )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Seqs are stored as SQLite integers (i64): nothing lies beyond i64::MAX. Asking the store
        // for more would wrap around to a negative bound (reading from the first entry again), and
        // `after_seq + 1` below would overflow at u64::MAX (a panic, found by schemathesis).
        if after_seq >= i64::MAX as u64 {
            return Ok(Vec::new());
        }
        let messages = self.store.read_within(&name, after_seq, limit, MAX_PULL_BYTES as usize).await?;
        let mut entries = Vec::with_capacity(messages.len());
        let mut next = after_seq + 1;
        let mut bytes = 0u64;
        for message in messages {
            while next < message.seq && entries.len() < limit {
                entries.push(BatchMessage::skip(next, String::new()));
                next += 1;
            }
            bytes += message.payload.len() as u64;
            if entries.len() >= limit || (bytes > MAX_PULL_BYTES && !entries.is_empty()) {
                break;
            }
            next = message.seq + 1;
            entries.push(BatchMessage {
                seq: message.seq,
                id: message.id,
                content_type: message.content_type,
                payload: message.payload,
            });
        }
        Ok(entries)
    }

    /// The edges a broadcast reaches: every edge listed in `[[edge]]` or known to this central.
    pub fn broadcast_targets(&self) -> Vec<String> {
        self.edges().into_iter().map(|edge| edge.id).collect()
    }

    /// Stores `messages` for every edge of [`CentralHub::broadcast_targets`]; answers for how many
    /// edges they were stored (edges where the key was seen before count too: they have them).
    pub async fn broadcast_downlink(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
        idempotency_key: Option<String>,
    ) -> Result<usize, CentralError> {
        let targets = self.broadcast_targets();
        let mut writes = tokio::task::JoinSet::new();
        for edge in &targets {
            let store = self.store.clone();
            let edge = edge.clone();
            let (name, messages, key) =
                (downlink_queue(&edge, queue), messages.clone(), idempotency_key.clone());
            // Concurrent appends share the writer's commits instead of one commit per edge.
            writes.spawn(async move { store.append(&name, messages, key).await.map(|a| (edge, a.last_seq)) });
        }
        let mut stored = Vec::with_capacity(targets.len());
        while let Some(result) = writes.join_next().await {
            stored.push(result.map_err(|e| {
                CentralError::Store(StoreError::Corrupt(format!("a broadcast write panicked: {e}")))
            })??);
        }
        for (edge, last_seq) in stored {
            self.downlink_posted(&edge, queue, last_seq).await;
        }
        Ok(targets.len())
    }

    /// Every downlink queue of `edge_id`.
    pub fn downlink(&self, edge_id: &str) -> Vec<DownlinkQueue> {
        self.store
            .queue_stats()
            .into_iter()
            .filter_map(|stats| {
                let (edge, queue) = parse_downlink_queue(&stats.name)?;
                if edge != edge_id {
                    return None;
                }
                let delivered_seq = self.store.cursor(&stats.name, DOWNLINK_READER).min(stats.last_seq);
                Some(DownlinkQueue {
                    queue: queue.to_string(),
                    pending: stats.last_seq - delivered_seq,
                    oldest_pending_at_ms: if stats.last_seq > delivered_seq {
                        stats.oldest_accepted_at_ms
                    } else {
                        None
                    },
                    delivered_seq,
                    last_seq: stats.last_seq,
                })
            })
            .collect()
    }

    /// Messages waiting for each edge, by edge id (edges with nothing posted are absent).
    pub fn downlink_pending(&self) -> BTreeMap<String, u64> {
        let mut pending = BTreeMap::new();
        for stats in self.store.queue_stats() {
            let Some((edge, _)) = parse_downlink_queue(&stats.name) else { continue };
            let delivered = self.store.cursor(&stats.name, DOWNLINK_READER).min(stats.last_seq);
            *pending.entry(edge.to_string()).or_default() += stats.last_seq - delivered;
        }
        pending
    }

    /// Fails every waiting downlink message older than the TTL; returns how many.
    pub async fn expire_downlink(&self, ttl: Duration, now_ms: i64) -> Result<u64, StoreError> {
        let mut expired = 0;
        for stats in self.store.queue_stats() {
            let Some((edge, _)) = parse_downlink_queue(&stats.name) else { continue };
            if stats.oldest_accepted_at_ms.is_none_or(|at| now_ms - at <= ttl.as_millis() as i64) {
                continue;
            }
            let after = self.store.cursor(&stats.name, DOWNLINK_READER);
            for message in self.store.read_within(&stats.name, after, EXPIRY_BATCH, EXPIRY_READ_BYTES).await?
            {
                if now_ms - message.accepted_at_ms <= ttl.as_millis() as i64 {
                    break;
                }
                let failure = NewFailure {
                    route: downlink_route(edge),
                    reader: DOWNLINK_READER.to_string(),
                    message,
                    attempts: 0,
                    reason: "expired".into(),
                    last_error: format!(
                        "limits.message_ttl = {}s ended before edge {edge:?} took the message",
                        ttl.as_secs()
                    ),
                };
                match self.store.fail_message(failure).await {
                    Ok(_) => expired += 1,
                    // The edge took it meanwhile (its cursor moved): not expired after all.
                    Err(StoreError::Invalid(_)) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(expired)
    }
}

/// Expires downlink messages while the hub exists and this central holds the expiry lease.
pub(crate) async fn expire_loop(hub: Weak<CentralHub>, ttl: Duration) {
    let lease = match hub.upgrade() {
        Some(hub) => hub.store.lease(EXPIRY_LEASE),
        None => return,
    };
    let mut ticks = tokio::time::interval(EXPIRY_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        if !lease.borrow().is_valid() {
            continue;
        }
        match hub.expire_downlink(ttl, now_unix_ms()).await {
            Ok(0) => {}
            Ok(expired) => tracing::warn!(expired, "downlink messages expired before their edge took them"),
            Err(StoreError::Closed) => return,
            Err(e) => tracing::warn!("cannot expire downlink messages: {e}"),
        }
    }
}
