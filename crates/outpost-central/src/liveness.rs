//! Which edges are really there: the silence watch over the links open here, and, on a cluster,
//! the link-owner documents through which each central tells the others which edges it holds.
//!
//! An edge answers every ping with a report, so a live edge is heard from at least once per ping
//! interval; one silent for `missed_pings × ping_interval` (a frozen process, a cable pulled
//! without a TCP reset) is shown `offline` (cause `link_lost`) although its socket is still open.
//!
//! On PostgreSQL every central writes `central-links:<instance>` = `{"beat","at_ms","edges"}`
//! every [`LINK_WATCH_INTERVAL`] and soon after a link opens or closes (at most four times a
//! second, however many links change), listing the edges whose links are live here. The others
//! take an edge as `connected` while such a document is fresh: its
//! `beat` changed within [`LINK_OWNER_EXPIRY`] by the reader's own clock (so clock skew between
//! centrals does not matter), or, seen for the first time, its `at_ms` is that recent. A central
//! that died stops beating and its edges stop counting; one that restarts gets a new instance id
//! and believes nothing it did not see beat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::Duration;

use outpost_core::time::now_unix_ms;
use serde::{Deserialize, Serialize};

use crate::CentralHub;

/// How often the central checks its links for silence and, on a cluster, beats its link-owner
/// document.
pub const LINK_WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// The least time between two runs of the watch: links opening or closing by the thousand (a
/// central's restart, the morning's ramp) are taken a few times a second, not once per link, since
/// each run goes over every edge and, on a cluster, writes a document listing them all.
const MIN_WATCH_SPACING: Duration = Duration::from_millis(250);
/// A link-owner document whose beat did not change for this long is stale: its central is gone.
pub const LINK_OWNER_EXPIRY: Duration = Duration::from_secs(5);

pub(crate) const LINK_OWNER_DOCUMENT_PREFIX: &str = "central-links:";

/// The document `central-links:<instance>`.
#[derive(Serialize, Deserialize)]
struct LinkOwnerDocument {
    /// Counts up with every write.
    beat: u64,
    /// The writer's clock at the write (used only for a document seen the first time).
    at_ms: i64,
    /// The edges with a live link to the writer.
    edges: BTreeSet<String>,
}

/// What a central remembers of the other centrals' link-owner documents.
#[derive(Default)]
pub(crate) struct LinkOwners {
    /// instance → (last beat seen, local time it was first seen).
    beats: BTreeMap<String, (u64, i64)>,
    /// This central's own beat.
    own_beat: u64,
}

impl LinkOwners {
    /// Notes a document's beat; returns whether the document is fresh at `now_ms`.
    fn observe(&mut self, instance: &str, beat: u64, at_ms: i64, now_ms: i64) -> bool {
        let expiry_ms = LINK_OWNER_EXPIRY.as_millis() as i64;
        let changed_ms = match self.beats.get(instance) {
            Some((seen_beat, seen_ms)) if *seen_beat == beat => *seen_ms,
            Some(_) => now_ms,
            // First sight: trust the writer's clock once, else count it stale until it beats.
            None if now_ms.abs_diff(at_ms) <= expiry_ms as u64 => now_ms,
            None => now_ms - expiry_ms - 1,
        };
        self.beats.insert(instance.to_string(), (beat, changed_ms));
        now_ms - changed_ms <= expiry_ms
    }
}

impl CentralHub {
    /// Logs links that went silent (or spoke again) and brings `outpost_edges{state}` up to date.
    /// Returns the edges whose links are live here.
    fn check_links(&self, now_ms: i64) -> BTreeSet<String> {
        let mut registry = self.registry();
        let mut live = BTreeSet::new();
        for (id, entry) in registry.edges.iter_mut() {
            let alive = entry.local_link_alive(now_ms);
            let Some(link) = entry.link.as_mut() else { continue };
            if alive {
                live.insert(id.clone());
            }
            if !alive && !link.silent {
                link.silent = true;
                tracing::warn!(
                    edge = %id,
                    silent_ms = entry.last_seen_ms.map(|seen| now_ms - seen),
                    limit_ms = link.silence_limit_ms,
                    "edge silent for missed_pings × ping_interval: shown offline (link_lost)"
                );
            } else if alive && link.silent {
                link.silent = false;
                tracing::info!(edge = %id, "edge heard from again on its link");
            }
        }
        self.refresh_edge_metrics(&registry, now_ms);
        live
    }

    /// Writes this central's link-owner document (cluster only).
    async fn beat(&self, live: BTreeSet<String>, now_ms: i64) {
        let beat = {
            let mut owners = self.link_owners.lock().expect("link owners lock poisoned");
            owners.own_beat += 1;
            owners.own_beat
        };
        let document = serde_json::to_string(&LinkOwnerDocument { beat, at_ms: now_ms, edges: live })
            .expect("a link-owner document serializes");
        let key = format!("{LINK_OWNER_DOCUMENT_PREFIX}{}", self.instance);
        if let Err(e) = self.store.put_document(&key, document).await {
            tracing::warn!("cannot tell the cluster which edges are linked here: {e}");
        }
    }

    /// Reads the other centrals' link-owner documents and marks the edges their fresh documents
    /// list as linked elsewhere (part of the cluster re-read).
    pub(crate) async fn read_link_owners(&self, now_ms: i64) {
        let documents = match self.store.documents(LINK_OWNER_DOCUMENT_PREFIX).await {
            Ok(documents) => documents,
            Err(e) => {
                tracing::warn!("cannot read which edges the other centrals hold: {e}");
                return;
            }
        };
        let mut elsewhere = BTreeSet::new();
        {
            let mut owners = self.link_owners.lock().expect("link owners lock poisoned");
            for (key, value) in &documents {
                let Some(instance) = key.strip_prefix(LINK_OWNER_DOCUMENT_PREFIX) else { continue };
                if instance == self.instance {
                    continue;
                }
                let Ok(document) = serde_json::from_str::<LinkOwnerDocument>(value) else { continue };
                if owners.observe(instance, document.beat, document.at_ms, now_ms) {
                    elsewhere.extend(document.edges);
                }
            }
        }
        let mut registry = self.registry();
        let mut changed = false;
        for (id, entry) in registry.edges.iter_mut() {
            let linked = elsewhere.remove(id);
            changed |= entry.linked_elsewhere != linked;
            entry.linked_elsewhere = linked;
        }
        // Edges this central never heard of (their registry documents come with the next re-read).
        for id in elsewhere {
            if let Ok(entry) = self.entry(&mut registry, &id) {
                entry.linked_elsewhere = true;
                changed = true;
            }
        }
        if changed {
            self.refresh_edge_metrics(&registry, now_ms);
        }
    }

    /// Another central announced a new link of `edge_id`: count it as connected until that
    /// central's link-owner document says otherwise.
    pub(crate) fn linked_elsewhere_now(&self, edge_id: &str) {
        let mut registry = self.registry();
        if let Ok(entry) = self.entry(&mut registry, edge_id) {
            entry.linked_elsewhere = true;
        }
    }
}

/// Watches the links while the hub exists: every [`LINK_WATCH_INTERVAL`], and soon when a link
/// opens or closes (to tell the cluster without delay), at most once per [`MIN_WATCH_SPACING`].
pub(crate) async fn watch_links(hub: Weak<CentralHub>) {
    let mut ticker = tokio::time::interval(LINK_WATCH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_run = tokio::time::Instant::now();
    loop {
        let Some(strong) = hub.upgrade() else { return };
        let shared = strong.store.is_shared();
        // Wait without holding the hub, so a dropped hub ends this task.
        let links_changed = strong.links_changed.clone();
        drop(strong);
        tokio::select! {
            _ = ticker.tick() => {}
            _ = links_changed.notified() => {}
        }
        // Changes arriving meanwhile are taken by this run.
        tokio::time::sleep_until(last_run + MIN_WATCH_SPACING).await;
        last_run = tokio::time::Instant::now();
        let Some(hub) = hub.upgrade() else { return };
        let now_ms = now_unix_ms();
        let live = hub.check_links(now_ms);
        if shared {
            hub.beat(live, now_ms).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_owner_document_is_fresh_while_it_beats() {
        let mut owners = LinkOwners::default();
        let expiry = LINK_OWNER_EXPIRY.as_millis() as i64;
        // First sight, written just now (even by a clock 2 s ahead): fresh.
        assert!(owners.observe("b", 7, 12_000, 10_000));
        // The same beat until the expiry: still fresh; past it: stale.
        assert!(owners.observe("b", 7, 12_000, 10_000 + expiry));
        assert!(!owners.observe("b", 7, 12_000, 10_001 + expiry));
        // It beats again: fresh, whatever its clock says.
        assert!(owners.observe("b", 8, 0, 20_000));
        // A document first seen long after it was written (its central died): stale until it beats.
        assert!(!owners.observe("c", 3, 1_000, 10_000 + 2 * expiry));
        assert!(!owners.observe("c", 3, 1_000, 10_000 + 3 * expiry));
        assert!(owners.observe("c", 4, 1_000, 10_000 + 3 * expiry));
    }
}
