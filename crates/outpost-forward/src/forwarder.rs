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

use outpost_core::config::{Config, ForwardingConfig};
use outpost_core::metrics::{EncodingLabel, Metrics};
use outpost_core::wire::{Batch, BatchAck, BatchMessage};
use outpost_store::{QueueStats, Store, StoredMessage};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
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

impl QueueProgress {
    /// Where a queue seen for the first time on this link resumes: after what the central holds or
    /// the upstream cursor says, whichever is further, but never past what this edge stored.
    fn resume(stats: &QueueStats, central: u64, local: u64) -> QueueProgress {
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
    }

    /// Messages no batch carries yet, and no room in the pipeline for another batch: queues of a
    /// higher priority number wait.
    fn waits_for_room(&self, last_seq: u64, max_in_flight: u32) -> bool {
        self.next_to_send <= last_seq && self.in_flight >= max_in_flight
    }

    /// The central holds the queue through `stored_through`; returns whether that is news. The next
    /// batch starts after it too: with several batches in flight, one sent before a resend can be
    /// stored after it and carry the central past what the resend went back to, and this edge may
    /// release what the central holds, so it must never read from before that again.
    fn stored_through(&mut self, stored_through: u64) -> bool {
        if stored_through <= self.acked {
            return false;
        }
        self.acked = stored_through;
        self.next_to_send = self.next_to_send.max(stored_through + 1);
        true
    }

    /// The central expects `expected_seq` next, before what a batch assumed: send again from there
    /// (never from before what it already confirmed holding).
    fn resend_from(&mut self, expected_seq: u64) {
        self.acked = self.acked.max(expected_seq.saturating_sub(1));
        self.next_to_send = self.next_to_send.min(expected_seq).max(self.acked + 1);
    }
}

/// Forwards until a request fails for a reason other than a gap; returns that error.
///
/// Each turn fills the pipelines (in priority order), then waits: for a commit when no batch is
/// in flight, else for the next answer, which moves the queue's cursor or sends it back to the
/// seq the central expects.
pub async fn run(
    store: Store,
    client: CentralClient,
    link: LinkSettings,
    central_positions: BTreeMap<String, u64>,
    progress: mpsc::Sender<Forwarded>,
) -> LinkError {
    let mut forwarder = Forwarder::new(store, client, link, central_positions, progress);
    loop {
        if let Err(error) = forwarder.fill_pipelines().await {
            return error;
        }
        let waited = if forwarder.in_flight.is_empty() {
            forwarder.wait_for_commit().await
        } else {
            forwarder.handle_next_answer().await
        };
        if let Err(error) = waited {
            return error;
        }
    }
}

/// One link's forwarder: its queues' progress and the batches in flight. An `Err` from a step ends
/// the link with that error.
struct Forwarder {
    store: Store,
    client: CentralClient,
    config: Arc<Config>,
    settings: ForwardingConfig,
    central_positions: BTreeMap<String, u64>,
    progress: mpsc::Sender<Forwarded>,
    bucket: Option<Arc<TokenBucket>>,
    sizer: BatchSizer,
    bytes_sent: Counter,
    queues: HashMap<String, QueueProgress>,
    in_flight: JoinSet<SentBatch>,
    commits: watch::Receiver<u64>,
}

impl Forwarder {
    fn new(
        store: Store,
        client: CentralClient,
        link: LinkSettings,
        central_positions: BTreeMap<String, u64>,
        progress: mpsc::Sender<Forwarded>,
    ) -> Forwarder {
        let settings = link.config.forwarding.clone();
        let bucket = (settings.max_bandwidth_bytes_per_second > 0)
            .then(|| Arc::new(TokenBucket::new(settings.max_bandwidth_bytes_per_second)));
        let sizer = BatchSizer::new(
            link.config.connectivity.ping_interval,
            settings.request_timeout,
            settings.batch_bytes,
        );
        let encoding_label =
            EncodingLabel { encoding: client.batch_encoding().unwrap_or("none").to_string() };
        let bytes_sent = link.metrics.forward_bytes.get_or_create(&encoding_label).clone();
        let commits = store.commits();
        Forwarder {
            store,
            client,
            config: link.config,
            settings,
            central_positions,
            progress,
            bucket,
            sizer,
            bytes_sent,
            queues: HashMap::new(),
            in_flight: JoinSet::new(),
            commits,
        }
    }

    /// Fills the pipelines, lowest priority number first; a queue waits while one before it still
    /// has messages no batch carries yet.
    async fn fill_pipelines(&mut self) -> Result<(), LinkError> {
        let mut stats_by_priority = self.store.queue_stats();
        stats_by_priority.sort_by_key(|q| self.config.queue_priority(&q.name));
        let mut waiting_priority: Option<u8> = None;
        for stats in stats_by_priority {
            let priority = self.config.queue_priority(&stats.name);
            if waiting_priority.is_some_and(|p| p < priority) {
                break;
            }
            self.catch_up_cursor(&stats).await;
            self.fill_pipeline(&stats).await?;
            if self.queues[&stats.name].waits_for_room(stats.last_seq, self.settings.in_flight) {
                waiting_priority = Some(priority);
            }
        }
        Ok(())
    }

    /// Creates the queue's progress the first time it is seen, and moves the `upstream` cursor up
    /// when the central already holds more than it says (an ack lost in a crash).
    async fn catch_up_cursor(&mut self, stats: &QueueStats) {
        let entry = self.queues.entry(stats.name.clone()).or_insert_with(|| {
            let central = self.central_positions.get(&stats.name).copied().unwrap_or(0);
            QueueProgress::resume(stats, central, self.store.cursor(&stats.name, UPSTREAM_READER))
        });
        if entry.acked > self.store.cursor(&stats.name, UPSTREAM_READER) {
            if let Err(e) = self.store.advance_cursor(&stats.name, UPSTREAM_READER, entry.acked).await {
                tracing::warn!(queue = %stats.name, "cannot advance the upstream cursor: {e}");
            }
        }
    }

    /// Puts batches of one queue in flight until its pipeline is full or every stored message is
    /// in a batch.
    async fn fill_pipeline(&mut self, stats: &QueueStats) -> Result<(), LinkError> {
        let entry = self.queues.get_mut(&stats.name).expect("a queue's progress exists once seen");
        while entry.in_flight < self.settings.in_flight && entry.next_to_send <= stats.last_seq {
            let limit = self.settings.batch_messages as usize;
            let budget_bytes = self.sizer.budget_bytes();
            // The longest run within the batch's budget of payload (at least one message, however
            // large): `batch_messages` of the largest messages would be a gigabyte.
            let read =
                self.store.read_within(&stats.name, entry.next_to_send - 1, limit, budget_bytes as usize);
            let messages = match read.await {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::error!(queue = %stats.name, "cannot read messages to forward: {e}");
                    break;
                }
            };
            let batch_messages: Vec<BatchMessage> = messages.into_iter().map(batch_message).collect();
            let (Some(first), Some(last)) = (batch_messages.first(), batch_messages.last()) else {
                break;
            };
            if first.seq != entry.next_to_send {
                // Released here and never at the central: the handshake declares such ranges
                // (`Hello::released_unforwarded`), so this is a central that did not record it.
                return Err(LinkError::Rejected {
                    url: self.client.url().to_string(),
                    detail: format!(
                        "queue {:?}: the central holds it through seq {}, but this edge released everything \
                         before seq {} without forwarding it, and the central did not record that release",
                        stats.name,
                        entry.next_to_send - 1,
                        first.seq
                    ),
                });
            }
            let last_seq = last.seq;
            entry.next_to_send = last_seq + 1;
            entry.in_flight += 1;
            let batch = Batch { queue: stats.name.clone(), messages: batch_messages };
            self.in_flight.spawn(send_batch(
                self.client.clone(),
                batch,
                last_seq,
                self.bucket.clone(),
                self.bytes_sent.clone(),
            ));
        }
        Ok(())
    }

    /// Nothing in flight: waits for the next commit, or [`IDLE_RECHECK`].
    async fn wait_for_commit(&mut self) -> Result<(), LinkError> {
        tokio::select! {
            changed = self.commits.changed() => if changed.is_err() {
                return Err(LinkError::Unreachable {
                    url: self.client.url().to_string(),
                    detail: "the store closed".into(),
                });
            },
            _ = tokio::time::sleep(IDLE_RECHECK) => {}
        }
        Ok(())
    }

    /// Waits for the next batch's answer: an ack moves the queue on, a gap sends it back, any other
    /// error ends the link.
    async fn handle_next_answer(&mut self) -> Result<(), LinkError> {
        let Some(joined) = self.in_flight.join_next().await else { return Ok(()) };
        let (queue, _last_seq, payload_bytes, elapsed, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                return Err(LinkError::Unreachable {
                    url: self.client.url().to_string(),
                    detail: format!("send task failed: {e}"),
                })
            }
        };
        let entry = self.queues.get_mut(&queue).expect("a queue with a batch in flight has progress");
        entry.in_flight -= 1;
        match result {
            Ok(ack) => {
                self.sizer.observe(payload_bytes, elapsed);
                self.on_ack(queue, ack, payload_bytes).await;
                Ok(())
            }
            Err(LinkError::Gap { url, expected_seq }) => self.go_back(&queue, url, expected_seq),
            Err(error) => Err(error),
        }
    }

    /// Moves the `upstream` cursor to what the central now holds and tells the driver.
    async fn on_ack(&mut self, queue: String, ack: BatchAck, payload_bytes: u64) {
        let entry = self.queues.get_mut(&queue).expect("a queue with a batch in flight has progress");
        if entry.stored_through(ack.stored_through) {
            if let Err(e) = self.store.advance_cursor(&queue, UPSTREAM_READER, entry.acked).await {
                tracing::warn!(%queue, "cannot advance the upstream cursor: {e}");
            }
        }
        let through_seq = entry.acked;
        let _ = self.progress.send(Forwarded { queue, through_seq, stored: ack.stored, payload_bytes }).await;
    }

    /// The central expects an earlier seq than a batch assumed: resend from there, unless this edge
    /// already released it (then the central is not of the cluster this edge forwarded to).
    fn go_back(&mut self, queue: &str, url: String, expected_seq: u64) -> Result<(), LinkError> {
        let released_through = self.store.queue(queue).map(|q| q.first_seq.saturating_sub(1)).unwrap_or(0);
        if expected_seq <= released_through {
            // This edge already gave those messages to a central and released them: the
            // central in use does not share that central's store.
            return Err(LinkError::Rejected {
                url,
                detail: format!(
                    "it expects seq {expected_seq} of queue {queue:?}, but this edge forwarded and released \
                     everything up to seq {released_through} to another central that does not share its store; \
                     failover endpoints must be centrals of one cluster (the same `postgres` URL)"
                ),
            });
        }
        // The central holds less than a batch assumed (its predecessor failed or is late):
        // go back and resend from where it is; it drops what it already has.
        tracing::debug!(%queue, expected_seq, "central asked to resend");
        self.queues
            .get_mut(queue)
            .expect("a queue with a batch in flight has progress")
            .resend_from(expected_seq);
        Ok(())
    }
}

/// A stored message as a batch carries it; downlink as a skip entry without its payload (it is
/// never forwarded back up, but the central still needs the seq).
fn batch_message(m: StoredMessage) -> BatchMessage {
    if m.origin == DOWNLINK_ORIGIN {
        return BatchMessage::skip(m.seq, m.id);
    }
    BatchMessage { seq: m.seq, id: m.id, content_type: m.content_type, payload: m.payload }
}

/// Encodes (and compresses, when the link agreed on an encoding) one batch, sends it through the
/// token bucket, and times the answer.
async fn send_batch(
    client: CentralClient,
    batch: Batch,
    last_seq: u64,
    bucket: Option<Arc<TokenBucket>>,
    bytes_sent: Counter,
) -> SentBatch {
    let payload_bytes: u64 = batch.messages.iter().map(|m| m.payload.len() as u64).sum();
    let encoding = client.batch_encoding().map(str::to_string);
    let frame = batch.encode();
    let frame = match encoding.as_deref() {
        Some(_) => outpost_core::wire::compress_frame(&frame),
        None => frame,
    };
    bytes_sent.inc_by(frame.len() as u64);
    let started = tokio::time::Instant::now();
    let result = client.send_frame(&batch.queue, frame.into(), encoding.as_deref(), bucket).await;
    (batch.queue, last_seq, payload_bytes, started.elapsed(), result)
}

#[cfg(test)]
mod tests {
    use super::QueueProgress;

    fn progress(acked: u64) -> QueueProgress {
        QueueProgress { acked, next_to_send: acked + 1, in_flight: 0 }
    }

    #[test]
    fn a_batch_stored_after_a_resend_moves_the_next_batch_past_it() {
        // Batches 1..=190, 191..=220 and 221..=254 in flight; the last one arrives first and the
        // central asks for 191 (it holds 1..=190 by then).
        let mut queue = progress(0);
        queue.next_to_send = 255;
        queue.resend_from(191);
        assert_eq!((queue.acked, queue.next_to_send), (190, 191));
        // The resend's first batch, 191..=205, goes out.
        queue.next_to_send = 206;
        // Then the old 191..=220 batch, which was still on its way, is stored and acknowledged:
        // this edge releases through 220, so the next batch must start at 221, not 206.
        assert!(queue.stored_through(220));
        assert_eq!((queue.acked, queue.next_to_send), (220, 221));
        // An older, smaller answer changes nothing.
        assert!(!queue.stored_through(205));
        assert_eq!((queue.acked, queue.next_to_send), (220, 221));
    }

    #[test]
    fn a_resend_never_goes_back_before_what_the_central_confirmed() {
        let mut queue = progress(0);
        queue.next_to_send = 300;
        assert!(queue.stored_through(250));
        assert_eq!(queue.next_to_send, 300, "batches already sent past the ack stay sent");
        // A gap answer computed before that ack arrives late.
        queue.resend_from(191);
        assert_eq!((queue.acked, queue.next_to_send), (250, 251));
    }
}
