//! Sends every queue's messages to the central in order, several batches in flight per queue, and
//! advances the durable `upstream` cursor from what the central says it holds. Resuming after any
//! interruption is the same as starting: begin after the central's position. Messages the edge got
//! from its central (downlink, origin [`DOWNLINK_ORIGIN`]) go as skip entries: their seq, never
//! their payload.
//!
//! **On thin lines** (see [`crate::pacing`]): batch frames are compressed when the link agreed on
//! an encoding; every batch body passes through the link's token bucket when
//! `forwarding.max_bandwidth` is set (nothing else does); a batch carries at most the sizer's
//! budget of payload bytes, so one batch crosses the measured line in a fraction of the ping
//! interval; and queues are filled in `[[queue]] priority` order: a queue gets a new batch only
//! when no queue of a lower number still has messages waiting for a batch. Order within a queue
//! never changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use outpost_core::config::Config;
use outpost_core::metrics::{EncodingLabel, Metrics};
use outpost_core::wire::{Batch, BatchAck, BatchMessage};
use outpost_store::Store;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{CentralClient, LinkError};
use crate::pacing::{BatchSizer, TokenBucket};
use crate::{DOWNLINK_ORIGIN, UPSTREAM_READER};

/// How long an idle forwarder waits before looking at the queues again when no commit woke it.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Progress the driver hears about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub queue: String,
    /// The central holds this queue through this seq.
    pub through_seq: u64,
    /// Messages newly stored by the central in this step.
    pub stored: u64,
    /// Payload bytes of the acknowledged batch (the forwarding rate behind the drain estimate).
    pub payload_bytes: u64,
}

/// What one link's forwarder works with besides the store.
pub struct LinkSettings {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
}

/// A batch's queue, last seq, payload bytes, time from send to answer, and the answer.
type SentBatch = (String, u64, u64, Duration, Result<BatchAck, LinkError>);

struct QueueProgress {
    /// Highest seq the central confirmed holding.
    acked: u64,
    /// Next seq to put in a batch.
    next_to_send: u64,
    in_flight: u32,
}

/// Forwards until a request fails for a reason other than a gap; returns that error.
pub async fn run(
    store: Store,
    client: CentralClient,
    link: LinkSettings,
    central_positions: BTreeMap<String, u64>,
    progress: mpsc::Sender<Forwarded>,
) -> LinkError {
    let settings = link.config.forwarding.clone();
    let bucket = (settings.max_bandwidth_bytes_per_second > 0)
        .then(|| Arc::new(TokenBucket::new(settings.max_bandwidth_bytes_per_second)));
    let mut sizer = BatchSizer::new(
        link.config.connectivity.ping_interval,
        settings.request_timeout,
        settings.batch_bytes,
    );
    let encoding_label = EncodingLabel { encoding: client.batch_encoding().unwrap_or("none").to_string() };
    let bytes_sent = link.metrics.forward_bytes.get_or_create(&encoding_label).clone();
    let mut queues: HashMap<String, QueueProgress> = HashMap::new();
    let mut in_flight: JoinSet<SentBatch> = JoinSet::new();
    let mut commits = store.commits();

    loop {
        // Fill the pipelines, lowest priority number first; a queue waits while one before it
        // still has messages no batch carries yet.
        let mut stats_by_priority = store.queue_stats();
        stats_by_priority.sort_by_key(|q| link.config.queue_priority(&q.name));
        let mut waiting_priority: Option<u8> = None;
        for stats in stats_by_priority {
            let priority = link.config.queue_priority(&stats.name);
            if waiting_priority.is_some_and(|p| p < priority) {
                break;
            }
            let entry = queues.entry(stats.name.clone()).or_insert_with(|| {
                let central = central_positions.get(&stats.name).copied().unwrap_or(0);
                let local = store.cursor(&stats.name, UPSTREAM_READER);
                if central > stats.last_seq {
                    tracing::error!(
                        queue = %stats.name, central_holds = central, local_last_seq = stats.last_seq,
                        "the central holds more of this queue than this edge ever stored: was the edge's data \
                         directory replaced while keeping its node id? New messages up to the central's position \
                         will be taken for duplicates"
                    );
                }
                let acked = central.max(local).min(stats.last_seq);
                QueueProgress { acked, next_to_send: acked + 1, in_flight: 0 }
            });
            if entry.acked > store.cursor(&stats.name, UPSTREAM_READER) {
                // The central already holds more than the cursor says (an ack lost in a crash).
                if let Err(e) = store.advance_cursor(&stats.name, UPSTREAM_READER, entry.acked).await {
                    tracing::warn!(queue = %stats.name, "cannot advance the upstream cursor: {e}");
                }
            }
            if entry.next_to_send <= stats.last_seq && entry.in_flight >= settings.in_flight {
                waiting_priority = Some(priority);
            }
            while entry.in_flight < settings.in_flight && entry.next_to_send <= stats.last_seq {
                let limit = settings.batch_messages as usize;
                let budget_bytes = sizer.budget_bytes();
                let messages = match store.read(&stats.name, entry.next_to_send - 1, limit).await {
                    Ok(messages) => messages,
                    Err(e) => {
                        tracing::error!(queue = %stats.name, "cannot read messages to forward: {e}");
                        break;
                    }
                };
                let mut bytes = 0u64;
                let batch_messages: Vec<BatchMessage> = messages
                    .into_iter()
                    .take_while(|m| {
                        if m.origin == DOWNLINK_ORIGIN {
                            return true; // sent as a skip entry, without its payload
                        }
                        bytes += m.payload.len() as u64;
                        bytes <= budget_bytes || bytes == m.payload.len() as u64
                    })
                    .map(|m| {
                        if m.origin == DOWNLINK_ORIGIN {
                            // Downlink is never forwarded back up; the central still needs the seq.
                            return BatchMessage::skip(m.seq, m.id);
                        }
                        BatchMessage {
                            seq: m.seq,
                            id: m.id,
                            content_type: m.content_type,
                            payload: m.payload,
                        }
                    })
                    .collect();
                let (Some(first), Some(last)) = (batch_messages.first(), batch_messages.last()) else {
                    break;
                };
                if first.seq != entry.next_to_send {
                    // Released here and never at the central: the handshake declares such ranges
                    // (`Hello::released_unforwarded`), so this is a central that did not record it.
                    return LinkError::Rejected {
                        url: client.url().to_string(),
                        detail: format!(
                            "queue {:?}: the central holds it through seq {}, but this edge released everything \
                             before seq {} without forwarding it, and the central did not record that release",
                            stats.name,
                            entry.next_to_send - 1,
                            first.seq
                        ),
                    };
                }
                let last_seq = last.seq;
                entry.next_to_send = last_seq + 1;
                entry.in_flight += 1;
                if entry.next_to_send <= stats.last_seq && entry.in_flight >= settings.in_flight {
                    waiting_priority = Some(priority);
                }
                let payload_bytes: u64 = batch_messages.iter().map(|m| m.payload.len() as u64).sum();
                let batch = Batch { queue: stats.name.clone(), messages: batch_messages };
                let client = client.clone();
                let encoding = client.batch_encoding().map(str::to_string);
                let bucket = bucket.clone();
                let bytes_sent = bytes_sent.clone();
                in_flight.spawn(async move {
                    let frame = batch.encode();
                    let frame = match encoding.as_deref() {
                        Some(_) => outpost_core::wire::compress_frame(&frame),
                        None => frame,
                    };
                    bytes_sent.inc_by(frame.len() as u64);
                    let started = tokio::time::Instant::now();
                    let result =
                        client.send_frame(&batch.queue, frame.into(), encoding.as_deref(), bucket).await;
                    (batch.queue, last_seq, payload_bytes, started.elapsed(), result)
                });
            }
        }

        if in_flight.is_empty() {
            tokio::select! {
                changed = commits.changed() => if changed.is_err() {
                    return LinkError::Unreachable { url: client.url().to_string(), detail: "the store closed".into() };
                },
                _ = tokio::time::sleep(IDLE_RECHECK) => {}
            }
            continue;
        }

        let Some(joined) = in_flight.join_next().await else { continue };
        let (queue, _last_seq, payload_bytes, elapsed, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                return LinkError::Unreachable {
                    url: client.url().to_string(),
                    detail: format!("send task failed: {e}"),
                }
            }
        };
        let entry = queues.get_mut(&queue).expect("a queue with a batch in flight has progress");
        entry.in_flight -= 1;
        match result {
            Ok(ack) => {
                sizer.observe(payload_bytes, elapsed);
                if ack.stored_through > entry.acked {
                    entry.acked = ack.stored_through;
                    if let Err(e) = store.advance_cursor(&queue, UPSTREAM_READER, entry.acked).await {
                        tracing::warn!(%queue, "cannot advance the upstream cursor: {e}");
                    }
                }
                let _ = progress
                    .send(Forwarded { queue, through_seq: entry.acked, stored: ack.stored, payload_bytes })
                    .await;
            }
            Err(LinkError::Gap { url, expected_seq }) => {
                let released_through =
                    store.queue(&queue).map(|q| q.first_seq.saturating_sub(1)).unwrap_or(0);
                if expected_seq <= released_through {
                    // This edge already gave those messages to a central and released them: the
                    // central in use does not share that central's store.
                    return LinkError::Rejected {
                        url,
                        detail: format!(
                            "it expects seq {expected_seq} of queue {queue:?}, but this edge forwarded and released \
                             everything up to seq {released_through} to another central that does not share its store; \
                             failover endpoints must be centrals of one cluster (the same `postgres` URL)"
                        ),
                    };
                }
                // The central holds less than a batch assumed (its predecessor failed or is late):
                // go back and resend from where it is; it drops what it already has.
                tracing::debug!(%queue, expected_seq, "central asked to resend");
                entry.acked = entry.acked.max(expected_seq.saturating_sub(1));
                entry.next_to_send = entry.next_to_send.min(expected_seq).max(entry.acked + 1);
            }
            Err(error) => return error,
        }
    }
}
