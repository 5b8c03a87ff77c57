//! The central's side of an edge's link, without HTTP: the handshake's checks, opening and closing
//! a link, reports, probes and storing a batch exactly once and in order.
//!
//! Batches of one (edge, queue) may arrive out of order when an edge keeps several in flight: a
//! batch that starts past what the central holds waits up to [`PREDECESSOR_WAIT`] for the batch
//! before it to commit (re-checking after every store commit) and is then submitted; the store
//! answers a remaining gap with `expected_seq`, and the edge resends from there.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use outpost_core::metrics::QueueLabel;
use outpost_core::status::OFFLINE_LOG_CAPACITY;
use outpost_core::time::now_unix_ms;
use outpost_core::wire::{Batch, BatchAck, EdgeReport, Hello, LinkEvent, ProbeAnswer, BATCH_ENCODING_ZSTD};
use outpost_store::Store;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::EVENT_EDGE_LINKED;
use crate::error::CentralError;
use crate::hub::{LinkHandle, LINK_EVENT_CAPACITY};
use crate::CentralHub;

/// How long a batch that starts past what the central holds waits for its predecessor.
pub const PREDECESSOR_WAIT: Duration = Duration::from_secs(2);
/// The states an edge may report.
pub const EDGE_STATES_REPORTED: [&str; 4] =
    ["online", "offline", "transition_to_online", "transition_to_offline"];

/// What [`CentralHub::open_link`] hands the link stream: the first line to send, the receiver of
/// the events the hub sends on the link, and the guard that marks the edge disconnected when the
/// stream is dropped.
pub struct OpenedLink {
    pub welcome: LinkEvent,
    pub events: mpsc::Receiver<LinkEvent>,
    /// Notified when downlink was posted for the edge: send [`LinkGuard::downlink_event`].
    pub downlink: Arc<tokio::sync::Notify>,
    pub guard: LinkGuard,
}

/// Marks the edge disconnected when its link stream is dropped.
pub struct LinkGuard {
    hub: Arc<CentralHub>,
    edge_id: String,
    link_id: u64,
}

impl LinkGuard {
    /// A ping for the edge, carrying what downlink waits for it. Writing it is no sign of life of
    /// the edge (a frozen edge's socket still takes it); the edge's report in answer is.
    pub fn ping(&self, at_ms: i64) -> LinkEvent {
        LinkEvent::Ping { at_ms, downlink: self.hub.downlink_waiting(&self.edge_id) }
    }

    /// The `downlink` event after a post: what waits for the edge now, plus what the post announced
    /// (this central's views may trail another central's commit by a notification).
    pub fn downlink_event(&self, announced: BTreeMap<String, u64>) -> Option<LinkEvent> {
        let mut queues = self.hub.downlink_waiting(&self.edge_id);
        for (queue, seq) in announced {
            let known = queues.entry(queue).or_default();
            *known = (*known).max(seq);
        }
        (!queues.is_empty()).then_some(LinkEvent::Downlink { queues })
    }

    /// Takes what posts announced for this link since the last call.
    pub fn take_announced(&self) -> BTreeMap<String, u64> {
        self.hub.take_announced(&self.edge_id, self.link_id)
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if !self.hub.link_closed(&self.edge_id, self.link_id, now_unix_ms()) {
            return;
        }
        // Persist last_seen; without a runtime (the process is ending) there is nothing to do.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let hub = self.hub.clone();
            let edge_id = std::mem::take(&mut self.edge_id);
            runtime.spawn(async move { hub.persist_edge(&edge_id).await });
        }
    }
}

/// What became of a batch.
#[derive(Debug)]
pub enum BatchStored {
    /// Stored (or found to be all duplicates): the acknowledgement for the edge.
    Acked(BatchAck),
    /// The batch starts past what the central holds; the edge must resend from `expected_seq`.
    Gap { queue: String, first_seq: u64, expected_seq: u64 },
}

/// Refuses an edge whose major version differs from this central's.
pub fn check_version(edge_id: &str, version: &str) -> Result<(), CentralError> {
    let major = |v: &str| v.split('.').next().unwrap_or_default().to_string();
    if version.is_empty() || major(version) != major(outpost_core::VERSION) {
        return Err(CentralError::VersionMismatch {
            edge: edge_id.to_string(),
            version: version.to_string(),
            central: outpost_core::VERSION,
        });
    }
    Ok(())
}

/// Refuses an unknown state; keeps the newest [`OFFLINE_LOG_CAPACITY`] entries of the offline log.
pub fn check_report(report: &mut EdgeReport) -> Result<(), CentralError> {
    if !EDGE_STATES_REPORTED.contains(&report.state.as_str()) {
        return Err(CentralError::Invalid(format!(
            "reported state {:?} is not one of {}",
            report.state,
            EDGE_STATES_REPORTED.join(", ")
        )));
    }
    let excess = report.offline_log.len().saturating_sub(OFFLINE_LOG_CAPACITY);
    report.offline_log.drain(..excess);
    Ok(())
}

/// `missed_pings × ping_interval` of a link, with the ping interval clamped as the link stream
/// clamps it, plus a grace for the edge's report to travel after the last ping.
pub fn silence_limit_ms(ping_interval_ms: u64, missed_pings: u32) -> i64 {
    const MIN_PING_INTERVAL_MS: u64 = 100;
    const MAX_PING_INTERVAL_MS: u64 = 24 * 3600 * 1000;
    const REPORT_GRACE_MS: i64 = 500;
    let ping = ping_interval_ms.clamp(MIN_PING_INTERVAL_MS, MAX_PING_INTERVAL_MS) as i64;
    ping.saturating_mul(i64::from(missed_pings.max(1))) + REPORT_GRACE_MS
}

/// The most queues a handshake may declare released without forwarding.
const MAX_RELEASED_QUEUES: usize = 100_000;

fn check_released(released: &std::collections::BTreeMap<String, u64>) -> Result<(), CentralError> {
    if released.len() > MAX_RELEASED_QUEUES {
        return Err(CentralError::Invalid(format!(
            "the handshake declares {} released queues; at most {MAX_RELEASED_QUEUES}",
            released.len()
        )));
    }
    for queue in released.keys() {
        outpost_core::validate_name(queue)
            .map_err(|e| CentralError::Invalid(format!("released queue {e}")))?;
    }
    Ok(())
}

impl CentralHub {
    /// The handshake of a new link of `edge_id` (already authenticated): checks it, registers the
    /// link (replacing an older one), persists the registry entry and tells the cluster.
    pub async fn open_link(
        self: &Arc<Self>,
        edge_id: &str,
        mut hello: Hello,
        now_ms: i64,
    ) -> Result<OpenedLink, CentralError> {
        if hello.edge_id != edge_id {
            return Err(CentralError::Invalid(format!(
                "the handshake names edge {:?} but the link is edge {edge_id:?}'s",
                hello.edge_id
            )));
        }
        check_version(edge_id, &hello.version)?;
        check_report(&mut hello.report)?;
        check_released(&hello.released_unforwarded)?;
        let silence_limit_ms = silence_limit_ms(
            hello.ping_interval_ms,
            hello.missed_pings.unwrap_or(self.config.connectivity.missed_pings),
        );
        let (guard, events, downlink, maintenance) =
            self.register_link(edge_id, hello.version, hello.report, silence_limit_ms, now_ms)?;
        // The guard marks the edge disconnected if this future is dropped from here on.
        self.persist_edge(edge_id).await;
        self.publish(EVENT_EDGE_LINKED, Some(edge_id), None).await;
        self.record_released_unforwarded(edge_id, &hello.released_unforwarded).await?;
        let welcome = LinkEvent::Welcome {
            central_id: self.config.node_id.clone(),
            maintenance,
            positions: self.store.origin_positions(edge_id),
            downlink: self.downlink_waiting(edge_id),
            batch_encoding: self.agreed_batch_encoding(&hello.batch_encodings),
        };
        Ok(OpenedLink { welcome, events, downlink, guard })
    }

    /// The batch frame encoding for a link whose edge offers `offered`: zstd when both sides
    /// have it (this central's `forwarding.compression` is not `none`), else plain frames.
    pub fn agreed_batch_encoding(&self, offered: &[String]) -> Option<String> {
        let accepts_zstd = self.config.forwarding.compression == outpost_core::config::Compression::Zstd;
        (accepts_zstd && offered.iter().any(|e| e == BATCH_ENCODING_ZSTD))
            .then(|| BATCH_ENCODING_ZSTD.to_string())
    }

    /// Whether batch frames in `encoding` are accepted (415 otherwise).
    pub fn accepts_batch_encoding(&self, encoding: &str) -> bool {
        encoding == BATCH_ENCODING_ZSTD
            && self.config.forwarding.compression == outpost_core::config::Compression::Zstd
    }

    /// The edge released these ranges without ever forwarding them (its routes delivered them
    /// before it had a central): recorded as its explicit release, so its forwarder starts after
    /// them instead of meeting a gap. Nothing is stored; positions never move back.
    async fn record_released_unforwarded(
        &self,
        edge_id: &str,
        released: &std::collections::BTreeMap<String, u64>,
    ) -> Result<(), CentralError> {
        for (queue, through_seq) in released {
            let position = self.store.origin_position(edge_id, queue);
            if *through_seq <= position {
                continue;
            }
            self.store.record_origin_release(queue, edge_id, *through_seq).await?;
            tracing::warn!(
                edge = edge_id, %queue, from_seq = position + 1, through_seq,
                "the edge released these messages without forwarding them (its routes delivered them before it had \
                 a central); recorded as the edge's release, they will not arrive here"
            );
        }
        Ok(())
    }

    /// Registers a new link of `edge_id`, replacing an older one, and records its handshake.
    fn register_link(
        self: &Arc<Self>,
        edge_id: &str,
        version: String,
        report: EdgeReport,
        silence_limit_ms: i64,
        now_ms: i64,
    ) -> Result<(LinkGuard, mpsc::Receiver<LinkEvent>, Arc<tokio::sync::Notify>, bool), CentralError> {
        let mut registry = self.registry();
        if registry.closed {
            return Err(CentralError::Stopping);
        }
        let link_id = self.next_link_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = mpsc::channel(LINK_EVENT_CAPACITY);
        let entry = self.entry(&mut registry, edge_id)?;
        let downlink = Arc::new(tokio::sync::Notify::new());
        let replaced = entry
            .link
            .replace(LinkHandle {
                id: link_id,
                events: events_tx,
                downlink: downlink.clone(),
                announced: BTreeMap::new(),
                silence_limit_ms,
                silent: false,
            })
            .is_some();
        let state = report.state.clone();
        entry.report = Some(report);
        entry.version = Some(version.clone());
        entry.last_seen_ms = Some(now_ms);
        // An edge opens a link only while transitioning to online: a held trigger is moot now.
        entry.transition_requested = false;
        // Read under the same lock as the registration: a switch after this point reaches the new
        // link as an event, so the edge never misses one.
        let maintenance = registry.maintenance;
        drop(registry);
        self.links_changed.notify_one();
        tracing::info!(edge = %edge_id, link = link_id, %version, %state, replaced, "edge link opened");
        Ok((
            LinkGuard { hub: self.clone(), edge_id: edge_id.to_string(), link_id },
            events,
            downlink,
            maintenance,
        ))
    }

    /// Called when a link stream ends. Clears the edge's link unless a newer one replaced it.
    /// Returns whether the edge is known (its entry should be persisted).
    fn link_closed(&self, edge_id: &str, link_id: u64, now_ms: i64) -> bool {
        let mut registry = self.registry();
        let Some(entry) = registry.edges.get_mut(edge_id) else { return false };
        if entry.link.as_ref().is_some_and(|link| link.id == link_id) {
            entry.link = None;
            entry.link_lost_ms = Some(now_ms);
            drop(registry);
            self.links_changed.notify_one();
            tracing::info!(edge = %edge_id, link = link_id, "edge link closed: shown offline (link_lost)");
        } else {
            tracing::debug!(edge = %edge_id, link = link_id, "replaced edge link ended");
        }
        true
    }

    /// Notes a sign of life of the edge (a batch arriving or stored, a downlink pull); `create`
    /// adds an edge not known yet.
    pub fn touch(&self, edge_id: &str, now_ms: i64, create: bool) -> Result<(), CentralError> {
        let mut registry = self.registry();
        let known = registry.edges.contains_key(edge_id);
        if !known && !create {
            return Ok(());
        }
        self.entry(&mut registry, edge_id)?.last_seen_ms = Some(now_ms);
        Ok(())
    }

    /// An edge's probe: is the central in maintenance, is a transition to online waiting for it.
    /// In maintenance the edge stays offline whatever it is asked; the request is kept for later.
    pub fn probe(&self, edge_id: &str, now_ms: i64) -> ProbeAnswer {
        let maintenance = self.maintenance();
        let transition_requested = !maintenance && self.probed(edge_id, now_ms);
        ProbeAnswer { central_id: self.config.node_id.clone(), maintenance, transition_requested }
    }

    /// Notes a probe and takes a held transition-to-online request, if any.
    fn probed(&self, edge_id: &str, now_ms: i64) -> bool {
        let mut registry = self.registry();
        let Some(entry) = registry.edges.get_mut(edge_id) else { return false };
        entry.last_seen_ms = Some(now_ms);
        std::mem::take(&mut entry.transition_requested)
    }

    /// Checks a report, records it in memory and persists it: at once (and announced to the
    /// cluster) when the edge's state changed, otherwise with the next group write of reports
    /// ([`crate::REPORT_PERSIST_INTERVAL`]).
    pub async fn record_report(
        self: &Arc<Self>,
        edge_id: &str,
        mut report: EdgeReport,
        now_ms: i64,
    ) -> Result<(), CentralError> {
        check_report(&mut report)?;
        let state_changed = {
            let mut registry = self.registry();
            let entry = self.entry(&mut registry, edge_id)?;
            let state_changed = entry.persistence.persisted_state.as_ref()
                != Some(&(report.state.clone(), report.state_since_ms));
            entry.report = Some(report);
            entry.last_seen_ms = Some(now_ms);
            if !state_changed {
                registry.unpersisted.insert(edge_id.to_string());
            }
            state_changed
        };
        if state_changed {
            self.persist_edge(edge_id).await;
        }
        Ok(())
    }

    /// Refuses batches while the central is in maintenance.
    pub fn check_accepting_batches(&self) -> Result<(), CentralError> {
        if self.maintenance() {
            return Err(CentralError::Maintenance);
        }
        Ok(())
    }

    /// Stores one batch of `edge_id` exactly once and in order (duplicates dropped, a gap answered
    /// with the seq to resend from).
    pub async fn store_batch(
        &self,
        edge_id: &str,
        batch: Batch,
        now_ms: i64,
    ) -> Result<BatchStored, CentralError> {
        self.touch(edge_id, now_ms, true)?;
        let first_seq = batch.messages[0].seq;
        wait_for_predecessor(&self.store, edge_id, &batch.queue, first_seq).await;
        let queue = batch.queue;
        let outcome = self.store.append_from_origin(&queue, edge_id, batch.messages).await?;
        self.metrics.duplicates_dropped.inc_by(outcome.duplicates);
        if let Some(expected_seq) = outcome.gap_expected_seq {
            tracing::info!(edge = %edge_id, %queue, first_seq, expected_seq, "batch starts after a gap; edge told to resend");
            return Ok(BatchStored::Gap { queue, first_seq, expected_seq });
        }
        if outcome.stored > 0 {
            self.metrics
                .messages_accepted
                .get_or_create(&QueueLabel { queue: queue.clone() })
                .inc_by(outcome.stored);
        }
        Ok(BatchStored::Acked(BatchAck {
            queue,
            stored_through: outcome.stored_through,
            stored: outcome.stored,
            duplicates: outcome.duplicates,
        }))
    }
}

/// Waits up to [`PREDECESSOR_WAIT`] until the central holds the (edge, queue) messages just before
/// `first_seq`, re-checking after each store commit. Returns either way: the store decides.
async fn wait_for_predecessor(store: &Store, edge_id: &str, queue: &str, first_seq: u64) {
    let mut commits = store.commits();
    // Marks the current commit as seen before checking, so a commit after the check wakes us.
    commits.borrow_and_update();
    let deadline = Instant::now() + PREDECESSOR_WAIT;
    while store.origin_position(edge_id, queue).saturating_add(1) < first_seq {
        match tokio::time::timeout_at(deadline, commits.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let major = outpost_core::VERSION.split('.').next().unwrap();
        assert!(check_version("e", outpost_core::VERSION).is_ok());
        assert!(check_version("e", &format!("{major}.999.0")).is_ok());
        for bad in ["", "999.0.0", "garbage"] {
            let error = check_version("e", bad).unwrap_err();
            assert!(matches!(error, CentralError::VersionMismatch { .. }), "{bad:?}");
        }
    }

    #[test]
    fn reports_are_checked_and_bounded() {
        let entry = |n: usize| outpost_core::status::OfflineLogEntry {
            at: format!("t{n}"),
            cause: "c".into(),
            detail: "d".into(),
        };
        let mut report = EdgeReport {
            state: "offline".into(),
            state_since_ms: 1,
            upstream_url: None,
            backlog_messages: 0,
            offline_log: (0..150).map(entry).collect(),
        };
        check_report(&mut report).unwrap();
        assert_eq!(report.offline_log.len(), 100);
        assert_eq!(report.offline_log[0].at, "t50");
        report.state = "unknown".into();
        assert!(matches!(check_report(&mut report).unwrap_err(), CentralError::Invalid(_)));
    }
}
