//! A route's cursor commits: the durable position `route:<name>` in its queue, advanced through
//! the store's group commit without waiting for each fsync, one commit at a time, never more than
//! [`MAX_UNCOMMITTED_DELIVERIES`](super::MAX_UNCOMMITTED_DELIVERIES) behind the deliveries.

use outpost_store::{Store, StoreError};
use tokio::sync::oneshot;

/// The route's cursor commits: started without waiting, at most one at a time, never more than
/// [`MAX_UNCOMMITTED_DELIVERIES`](super::MAX_UNCOMMITTED_DELIVERIES) behind the deliveries.
pub(super) struct CursorCommit {
    store: Store,
    queue: String,
    reader: String,
    /// The position known to be committed.
    pub(super) durable: u64,
    wanted: u64,
    /// The seq being committed and where its outcome arrives.
    running: Option<(u64, oneshot::Receiver<Result<(), StoreError>>)>,
}

impl CursorCommit {
    pub(super) fn new(store: &Store, queue: &str, reader: &str) -> CursorCommit {
        let durable = store.cursor(queue, reader);
        CursorCommit {
            store: store.clone(),
            queue: queue.to_string(),
            reader: reader.to_string(),
            durable,
            wanted: durable,
            running: None,
        }
    }

    /// The route is done with the queue through `seq`.
    pub(super) fn want(&mut self, seq: u64) {
        self.wanted = self.wanted.max(seq);
    }

    /// `seq` is already committed (failing a message moves the cursor itself).
    pub(super) fn committed(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
        self.wanted = self.wanted.max(seq);
    }

    /// Collects a finished commit and starts the next one if needed. Never waits.
    pub(super) fn poll(&mut self) {
        self.poll_from(1);
    }

    /// As [`Self::poll`], but starts a commit only once at least `deliveries` positions are
    /// uncommitted: a window delivering thousands a second commits every few dozen, not after
    /// each answer (every commit is a write and an fsync of the store).
    pub(super) fn poll_from(&mut self, deliveries: u64) {
        if let Some((seq, outcome)) = &mut self.running {
            let seq = *seq;
            match outcome.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {}
                Ok(result) => {
                    self.running = None;
                    self.finish(seq, Some(result));
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.running = None;
                    self.finish(seq, None);
                }
            }
        }
        if self.running.is_none() && self.wanted >= self.durable + deliveries.max(1) {
            let (store, queue, reader, seq) =
                (self.store.clone(), self.queue.clone(), self.reader.clone(), self.wanted);
            let (outcome_tx, outcome_rx) = oneshot::channel();
            tokio::spawn(async move {
                let _ = outcome_tx.send(store.advance_cursor(&queue, &reader, seq).await);
            });
            self.running = Some((seq, outcome_rx));
        }
    }

    fn finish(&mut self, seq: u64, result: Option<Result<(), StoreError>>) {
        match result {
            Some(Ok(())) => self.durable = self.durable.max(seq),
            Some(Err(e)) => {
                tracing::warn!(queue = %self.queue, reader = %self.reader, "cannot advance the route cursor: {e}")
            }
            None => {
                tracing::warn!(queue = %self.queue, reader = %self.reader, "a cursor commit task ended abnormally")
            }
        }
    }

    /// Waits for the running commit, if any.
    pub(super) async fn settle(&mut self) {
        if let Some((seq, outcome)) = self.running.take() {
            let result = outcome.await.ok();
            self.finish(seq, result);
        }
    }

    /// Commits everything wanted (one more try if a commit fails).
    pub(super) async fn flush(&mut self) {
        for _ in 0..2 {
            self.settle().await;
            if self.wanted <= self.durable {
                return;
            }
            self.poll();
        }
        self.settle().await;
    }

    pub(super) fn uncommitted(&self) -> u64 {
        self.wanted - self.durable
    }
}
