//! The edge's side of the downlink: takes the messages its central holds for it into the local
//! queues of the same names, exactly once and in the central's order.
//!
//! The central says what waits (queue → highest seq posted) in the welcome, in `downlink` events
//! and in pings; the link's stream reader hands that to [`Wanted`]. For each such queue this task
//! pulls the entries after its durable position (the store's origin position of
//! [`DOWNLINK_ORIGIN`]), stores them with `append_from_origin` (one fsync per batch; duplicates
//! dropped, skip entries only move the position) and pulls on. The next request goes out while a
//! batch is being stored (it asks past the batch but acknowledges only what is durable), and a
//! final request acknowledges the last batch, so the central releases what the edge holds.
//! Resuming after any interruption — lost link, kill -9 of either side, another central of the
//! cluster — is the same as starting: pull after the durable position.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use outpost_core::wire::Batch;
use outpost_store::{Store, StoreError};
use tokio::sync::Notify;

use crate::client::{CentralClient, LinkError};
use crate::DOWNLINK_ORIGIN;

/// What the central said waits, merged until this task takes it.
#[derive(Default)]
pub struct Wanted {
    queues: Mutex<BTreeMap<String, u64>>,
    changed: Notify,
}

impl Wanted {
    /// Adds what the central announced (queue → highest seq posted).
    pub fn announce(&self, queues: BTreeMap<String, u64>) {
        if queues.is_empty() {
            return;
        }
        let mut wanted = self.queues.lock().expect("downlink wanted lock poisoned");
        for (queue, seq) in queues {
            let known = wanted.entry(queue).or_default();
            *known = (*known).max(seq);
        }
        self.changed.notify_one();
    }

    async fn take(&self) -> BTreeMap<String, u64> {
        loop {
            let taken = std::mem::take(&mut *self.queues.lock().expect("downlink wanted lock poisoned"));
            if !taken.is_empty() {
                return taken;
            }
            self.changed.notified().await;
        }
    }
}

/// Pulls downlink until a request fails for a reason another try could fix (the link is then
/// lost); returns that error.
pub async fn run(store: Store, client: CentralClient, wanted: Arc<Wanted>, batch_messages: u32) -> LinkError {
    loop {
        let queues = wanted.take().await;
        for queue in queues.into_keys() {
            if let Err(error) = pull_queue(&store, &client, &queue, batch_messages).await {
                match error {
                    PullError::Link(error @ LinkError::Rejected { .. }) => {
                        tracing::error!(%queue, "the central refused this edge's downlink pull: {error}");
                    }
                    PullError::Link(error) => return error,
                    PullError::Store(StoreError::Closed) => {
                        return LinkError::Unreachable {
                            url: client.url().to_string(),
                            detail: "the store closed".into(),
                        }
                    }
                    PullError::Store(error) => {
                        tracing::error!(%queue, "cannot store downlink messages: {error}");
                        return LinkError::Unreachable {
                            url: client.url().to_string(),
                            detail: format!("cannot store downlink messages: {error}"),
                        };
                    }
                }
            }
        }
    }
}

enum PullError {
    Link(LinkError),
    Store(StoreError),
}

/// Pulls and stores `queue` until the central has nothing more and knows what this edge holds.
async fn pull_queue(store: &Store, client: &CentralClient, queue: &str, limit: u32) -> Result<(), PullError> {
    let mut position = store.origin_position(DOWNLINK_ORIGIN, queue);
    let mut acked = position;
    let mut request = spawn_pull(client, queue, position, acked, limit);
    loop {
        let answer = request.await.map_err(|e| {
            PullError::Link(LinkError::Unreachable {
                url: client.url().to_string(),
                detail: format!("pull task: {e}"),
            })
        })?;
        let Some(batch) = answer.map_err(PullError::Link)? else {
            if acked == position {
                return Ok(());
            }
            // The answer came to a request sent before the last batch was stored: acknowledge it.
            acked = position;
            request = spawn_pull(client, queue, position, acked, limit);
            continue;
        };
        let Batch { messages, .. } = batch;
        let last = messages.last().map_or(position, |m| m.seq);
        // Ask for what follows while this batch is being stored.
        request = spawn_pull(client, queue, last, position, limit);
        acked = position;
        let appended =
            store.append_from_origin(queue, DOWNLINK_ORIGIN, messages).await.map_err(PullError::Store)?;
        if let Some(expected) = appended.gap_expected_seq {
            // Not what was asked for (the answer does not follow this edge's position): start over.
            tracing::warn!(%queue, expected, "downlink answer past this edge's position; pulling again");
            request.abort();
            position = store.origin_position(DOWNLINK_ORIGIN, queue);
            acked = position;
            request = spawn_pull(client, queue, position, acked, limit);
            continue;
        }
        position = appended.stored_through;
    }
}

fn spawn_pull(
    client: &CentralClient,
    queue: &str,
    after_seq: u64,
    acked: u64,
    limit: u32,
) -> tokio::task::JoinHandle<Result<Option<Batch>, LinkError>> {
    let (client, queue) = (client.clone(), queue.to_string());
    tokio::spawn(async move { client.pull_downlink(&queue, after_seq, acked, limit).await })
}
