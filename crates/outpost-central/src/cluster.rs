//! What the centrals of one cluster tell each other through the store's cluster events, and the
//! periodic re-read that repairs any missed event.

use std::collections::BTreeMap;
use std::sync::Weak;

use outpost_core::wire::LinkEvent;
use serde::{Deserialize, Serialize};

use crate::hub::{EdgeDocument, MaintenanceDocument, Registry, EDGE_DOCUMENT_PREFIX, MAINTENANCE_DOCUMENT};
use crate::CentralHub;

/// How often a central of a cluster re-reads the shared registry and maintenance flag, repairing
/// any cluster event it missed.
const CLUSTER_RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// Cluster event kinds (see the crate doc).
pub(crate) const EVENT_EDGE_UPDATED: &str = "edge_updated";
pub(crate) const EVENT_EDGE_LINKED: &str = "edge_linked";
pub(crate) const EVENT_EDGE_TRANSITION_ONLINE: &str = "edge_transition_online";
pub(crate) const EVENT_MAINTENANCE: &str = "maintenance";
/// Downlink was posted for an edge: the central it is linked to tells it at once.
pub(crate) const EVENT_DOWNLINK: &str = "downlink";

/// The body of every cluster event the hub sends.
#[derive(Serialize, Deserialize)]
pub(crate) struct HubEvent {
    from: String,
    #[serde(default)]
    edge: Option<String>,
    #[serde(default)]
    maintenance: Option<MaintenanceDocument>,
    /// `downlink`: queue → highest seq posted for `edge`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    queues: BTreeMap<String, u64>,
}

impl CentralHub {
    /// Tells the other centrals of the cluster (nothing happens on SQLite but a loopback the hub
    /// ignores). Best effort: what must survive is in a document already.
    pub(crate) async fn publish(
        &self,
        kind: &str,
        edge: Option<&str>,
        maintenance: Option<MaintenanceDocument>,
    ) {
        self.publish_with_queues(kind, edge, maintenance, BTreeMap::new()).await
    }

    pub(crate) async fn publish_with_queues(
        &self,
        kind: &str,
        edge: Option<&str>,
        maintenance: Option<MaintenanceDocument>,
        queues: BTreeMap<String, u64>,
    ) {
        let body = serde_json::to_string(&HubEvent {
            from: self.instance.clone(),
            edge: edge.map(str::to_string),
            maintenance,
            queues,
        })
        .expect("a hub event serializes");
        if let Err(e) = self.store.publish_cluster_event(kind, &body).await {
            tracing::warn!(kind, "cannot tell the other centrals: {e}");
        }
    }

    /// Another central's event.
    async fn on_cluster_event(&self, kind: &str, event: HubEvent) {
        match (kind, event.edge, event.maintenance) {
            (EVENT_DOWNLINK, Some(edge_id), _) => {
                for (queue, last_seq) in event.queues {
                    self.announce_downlink(&edge_id, &queue, last_seq);
                }
            }
            (EVENT_EDGE_UPDATED, Some(edge_id), _) => self.reload_edge(&edge_id).await,
            (EVENT_EDGE_LINKED, Some(edge_id), _) => {
                if let Some(entry) = self.registry().edges.get_mut(&edge_id) {
                    entry.transition_requested = false;
                }
                self.linked_elsewhere_now(&edge_id);
            }
            (EVENT_EDGE_TRANSITION_ONLINE, Some(edge_id), _) => {
                if self.send_event(&edge_id, LinkEvent::TransitionOnline).is_ok() {
                    tracing::info!(edge = %edge_id, "transition to online from another central sent on the link");
                } else if let Some(entry) = self.registry().edges.get_mut(&edge_id) {
                    entry.transition_requested = true;
                }
            }
            (EVENT_MAINTENANCE, _, Some(document)) => {
                let _switching = self.maintenance_switch.lock().await;
                self.apply_maintenance(document.enabled, document.since_ms);
            }
            (kind, _, _) => tracing::debug!(kind, "ignoring a cluster event this hub does not handle"),
        }
    }

    /// Re-reads what other centrals may have changed: maintenance and every edge's registry entry.
    async fn resync(&self) {
        match self.store.documents(MAINTENANCE_DOCUMENT).await {
            Ok(documents) => {
                if let Some(document) = documents
                    .get(MAINTENANCE_DOCUMENT)
                    .and_then(|value| serde_json::from_str::<MaintenanceDocument>(value).ok())
                {
                    let _switching = self.maintenance_switch.lock().await;
                    self.apply_maintenance(document.enabled, document.since_ms);
                }
            }
            Err(e) => tracing::warn!("cannot re-read the maintenance document: {e}"),
        }
        // One query for the whole registry, applied under one lock with one metrics refresh: with
        // ten thousand edges a query (and an O(edges) metrics refresh) per edge every 2 s would
        // keep a central and PostgreSQL busy with nothing.
        let documents = match self.store.documents(EDGE_DOCUMENT_PREFIX).await {
            Ok(documents) => documents,
            Err(e) => {
                tracing::warn!("cannot re-read the edge registry: {e}");
                return;
            }
        };
        {
            let mut registry = self.registry();
            let mut changed = false;
            for (key, value) in &documents {
                let Some(edge_id) = key.strip_prefix(EDGE_DOCUMENT_PREFIX) else { continue };
                let Ok(document) = serde_json::from_str::<EdgeDocument>(value) else { continue };
                changed |= self.apply_edge_document(&mut registry, edge_id, document);
            }
            if changed {
                self.refresh_edge_metrics(&registry, outpost_core::time::now_unix_ms());
            }
        }
        self.read_link_owners(outpost_core::time::now_unix_ms()).await;
    }

    /// Takes an edge's document written by another central into the registry, unless the edge
    /// is linked here (then this central's own entry is the newest). Returns whether the edge is
    /// new or its state changed (the edge metrics need a refresh).
    fn apply_edge_document(&self, registry: &mut Registry, edge_id: &str, document: EdgeDocument) -> bool {
        let known = registry.edges.contains_key(edge_id);
        let Ok(entry) = self.entry(registry, edge_id) else { return false };
        if entry.link.is_some() {
            return false;
        }
        let before = entry.report.as_ref().map(|r| r.state.clone());
        entry.report = document.report;
        entry.version = document.version;
        entry.last_seen_ms = document.last_seen_ms.max(entry.last_seen_ms);
        !known || before != entry.report.as_ref().map(|r| r.state.clone())
    }

    /// Takes another central's write of an edge's document into the registry, unless the edge is
    /// linked here (then this central's own entry is the newest).
    async fn reload_edge(&self, edge_id: &str) {
        let key = format!("{EDGE_DOCUMENT_PREFIX}{edge_id}");
        let document = match self.store.documents(&key).await {
            Ok(documents) => documents.get(&key).and_then(|v| serde_json::from_str::<EdgeDocument>(v).ok()),
            Err(e) => {
                tracing::warn!(edge = %edge_id, "cannot reload the edge registry entry: {e}");
                return;
            }
        };
        let Some(document) = document else { return };
        let mut registry = self.registry();
        self.apply_edge_document(&mut registry, edge_id, document);
    }
}

/// Follows the cluster's events for the hub while it exists.
pub(crate) async fn follow_cluster(
    hub: Weak<CentralHub>,
    mut events: tokio::sync::broadcast::Receiver<(String, String)>,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Events are not durable (a listener reconnecting or a lagging receiver misses some): what
    // they announce is always in a document too, so a periodic re-read repairs any miss.
    let mut resync = tokio::time::interval(CLUSTER_RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            received = events.recv() => received,
            _ = resync.tick() => {
                let Some(hub) = hub.upgrade() else { return };
                if hub.store.is_shared() {
                    hub.resync().await;
                }
                continue;
            }
        };
        let (kind, body) = match received {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "the hub fell behind the cluster's events; re-reading the shared state"
                );
                let Some(hub) = hub.upgrade() else { return };
                hub.resync().await;
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(hub) = hub.upgrade() else { return };
        let Ok(event) = serde_json::from_str::<HubEvent>(&body) else { continue };
        if event.from == hub.instance {
            continue;
        }
        hub.on_cluster_event(&kind, event).await;
    }
}
