//! The mode of every route (`forward` or `store`, the service control point of the seed): who
//! changed it, when and why; durable in the store (document `route:<name>`), published through a
//! `watch` per route so the route's task and the API see each change at once.
//!
//! # Why a component of its own
//!
//! A mode has more writers than one task: the operator (API), the route's own task (`service_down`
//! and the auto-forward probe) and, on a PostgreSQL cluster, every other central: the contract says
//! a mode change on one central is followed by all within 1 s. Everything that changes a mode goes
//! through [`RouteModes`], which persists the change first and publishes it second; the watches are
//! the only thing route tasks read.
//!
//! # On a cluster
//!
//! Every change (mode or reason) is followed by the cluster event [`ROUTE_MODE_EVENT`]
//! (`{"route": name}`): it only says "look again", the document is the truth. Each central's
//! follower (`crate::route::cluster`) answers it with [`RouteModes::reload`], which re-reads the
//! document and publishes it with [`RouteModes::adopt`] without persisting it again. Reading the
//! document under the same lock as local changes makes every central converge on the document's
//! last write, whatever order two racing changes (say, operators on two centrals) arrive in. A
//! missed event (a listener reconnecting) is repaired by the follower's periodic reload.
//!
//! Setting the mode a route already has changes nothing (its `mode_since`, `changed_by` and
//! `reason` stay those of the change that put it there), except that an operator's switch to the
//! mode a route already has makes it the operator's: `changed_by = operator` and the operator's
//! reason, `mode_since` kept (so an operator can hold a route the policy stored, and give why).
//!
//! # The operator's word stands
//!
//! The route's task decides on what it saw when a delivery began, and the answer may arrive after
//! an operator acted (say, `store` with a reason while a resubmitted message was on the wire). Its
//! changes therefore go through [`RouteModes::set_mode_if_unchanged`] and
//! [`RouteModes::set_reason_if_unchanged`]: they apply only if the route's state is still the one
//! the task saw, checked under the change lock (and, on a cluster, against the document, which an
//! operator on another central may have written a moment ago). Otherwise the task's decision is
//! dropped: the operator acted later, with more knowledge.

use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_core::metrics::{Metrics, RouteModeLabel};
use outpost_core::time::now_unix_ms;
use outpost_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

/// The prefix of the documents holding route modes.
pub const ROUTE_MODE_DOCUMENT_PREFIX: &str = "route:";
/// `changed_by` of a route nobody has switched yet.
pub const CHANGED_BY_START: &str = "start";
/// `changed_by` of the operator's API calls.
pub const CHANGED_BY_OPERATOR: &str = "operator";
/// The cluster event published after a route's document changed; body `{"route": name}`.
pub const ROUTE_MODE_EVENT: &str = "route_mode";

/// Whether a route delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deliver messages downstream as they come.
    Forward,
    /// Send nothing; messages accumulate until the route is switched back to forward.
    Store,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Forward => "forward",
            Mode::Store => "store",
        }
    }
}

/// A route's mode and how it got there. This is also the persisted document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeState {
    pub mode: Mode,
    pub mode_since_ms: i64,
    /// `start`, `operator`, `auto:service_down`, `auto:probe`, …
    pub changed_by: String,
    /// Why: the operator's words, or what the failure policy last decided.
    pub reason: String,
}

impl ModeState {
    fn initial(now_ms: i64) -> ModeState {
        ModeState {
            mode: Mode::Forward,
            mode_since_ms: now_ms,
            changed_by: CHANGED_BY_START.into(),
            reason: "no mode change recorded yet".into(),
        }
    }
}

/// What can go wrong when changing a route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no route named {0:?} is configured on this node")]
    UnknownRoute(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The modes of every configured route.
pub struct RouteModes {
    store: Store,
    metrics: Arc<Metrics>,
    routes: BTreeMap<String, watch::Sender<ModeState>>,
    // Held across persist-then-publish, so that two changes racing (operator and task) reach the
    // document and the watch in the same order. Changes are rare; contention does not matter.
    change_lock: Mutex<()>,
}

impl RouteModes {
    /// Loads the persisted mode of each of `names` (forward for a route never switched).
    pub async fn load(
        store: Store,
        metrics: Arc<Metrics>,
        names: &[String],
    ) -> Result<RouteModes, StoreError> {
        let documents = store.documents(ROUTE_MODE_DOCUMENT_PREFIX).await?;
        let now_ms = now_unix_ms();
        let mut routes = BTreeMap::new();
        for name in names {
            let key = document_key(name);
            let state = match documents.get(&key).map(|text| serde_json::from_str::<ModeState>(text)) {
                None => ModeState::initial(now_ms),
                Some(Ok(state)) => state,
                Some(Err(e)) => {
                    tracing::warn!(route = %name, "the stored mode document {key} is unreadable ({e}); starting in forward mode");
                    ModeState::initial(now_ms)
                }
            };
            set_mode_metric(&metrics, name, state.mode);
            routes.insert(name.clone(), watch::channel(state).0);
        }
        Ok(RouteModes { store, metrics, routes, change_lock: Mutex::new(()) })
    }

    /// The route names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// Follows one route's mode.
    pub fn subscribe(&self, route: &str) -> Option<watch::Receiver<ModeState>> {
        self.routes.get(route).map(watch::Sender::subscribe)
    }

    pub fn current(&self, route: &str) -> Option<ModeState> {
        self.routes.get(route).map(|sender| sender.borrow().clone())
    }

    /// Switches a route's mode (persisted, then published). The same mode again changes nothing,
    /// unless an operator takes over a route someone else put there (see the module doc).
    /// Returns the state now in force.
    pub async fn set_mode(
        &self,
        route: &str,
        mode: Mode,
        changed_by: &str,
        reason: &str,
    ) -> Result<ModeState, RouteError> {
        let sender = self.sender(route)?;
        let guard = self.change_lock.lock().await;
        let (next, changed) = self.change_mode_locked(route, sender, mode, changed_by, reason).await?;
        drop(guard);
        if changed {
            self.tell_cluster(route).await;
        }
        Ok(next)
    }

    /// The route's task switches the mode, if the route is still in the state `seen` it decided
    /// on (else nothing happens and `None` is returned: someone acted after the task looked).
    pub async fn set_mode_if_unchanged(
        &self,
        route: &str,
        seen: &ModeState,
        mode: Mode,
        changed_by: &str,
        reason: &str,
    ) -> Result<Option<ModeState>, RouteError> {
        let sender = self.sender(route)?;
        let guard = self.change_lock.lock().await;
        if !self.unchanged_since_locked(route, sender, seen).await? {
            tracing::info!(
                route,
                mode = mode.as_str(),
                changed_by,
                reason,
                "the route changed while its task decided; the task's switch is dropped"
            );
            return Ok(None);
        }
        let (next, changed) = self.change_mode_locked(route, sender, mode, changed_by, reason).await?;
        drop(guard);
        if changed {
            self.tell_cluster(route).await;
        }
        Ok(Some(next))
    }

    /// Records what the failure policy last decided without changing the mode.
    pub async fn set_reason(&self, route: &str, reason: &str) -> Result<(), RouteError> {
        let sender = self.sender(route)?;
        let guard = self.change_lock.lock().await;
        let changed = self.change_reason_locked(route, sender, reason).await?;
        drop(guard);
        if changed {
            self.tell_cluster(route).await;
        }
        Ok(())
    }

    /// The route's task records a reason, if the route is still in the state `seen` it decided on.
    /// Returns the state now in force, or `None` when the reason was dropped.
    pub async fn set_reason_if_unchanged(
        &self,
        route: &str,
        seen: &ModeState,
        reason: &str,
    ) -> Result<Option<ModeState>, RouteError> {
        let sender = self.sender(route)?;
        let guard = self.change_lock.lock().await;
        if !self.unchanged_since_locked(route, sender, seen).await? {
            tracing::debug!(route, reason, "the route changed while its task decided; its reason is dropped");
            return Ok(None);
        }
        let changed = self.change_reason_locked(route, sender, reason).await?;
        let now = sender.borrow().clone();
        drop(guard);
        if changed {
            self.tell_cluster(route).await;
        }
        Ok(Some(now))
    }

    fn sender(&self, route: &str) -> Result<&watch::Sender<ModeState>, RouteError> {
        self.routes.get(route).ok_or_else(|| RouteError::UnknownRoute(route.to_string()))
    }

    /// Whether the route's state is still `seen`. On a cluster the document is read first: an
    /// operator on another central may have changed it before this node heard of it.
    /// Call with the change lock held.
    async fn unchanged_since_locked(
        &self,
        route: &str,
        sender: &watch::Sender<ModeState>,
        seen: &ModeState,
    ) -> Result<bool, RouteError> {
        if self.store.is_shared() {
            self.reload_locked(route, sender).await?;
        }
        Ok(*sender.borrow() == *seen)
    }

    /// Call with the change lock held. Returns the state in force and whether it changed.
    async fn change_mode_locked(
        &self,
        route: &str,
        sender: &watch::Sender<ModeState>,
        mode: Mode,
        changed_by: &str,
        reason: &str,
    ) -> Result<(ModeState, bool), RouteError> {
        let current = sender.borrow().clone();
        if current.mode == mode {
            let operator_takes_over = changed_by == CHANGED_BY_OPERATOR
                && (current.changed_by != CHANGED_BY_OPERATOR || current.reason != reason);
            if !operator_takes_over {
                return Ok((current, false));
            }
            let next =
                ModeState { changed_by: changed_by.to_string(), reason: reason.to_string(), ..current };
            self.persist(route, &next).await?;
            tracing::info!(
                route,
                mode = mode.as_str(),
                changed_by,
                reason,
                "route mode confirmed by an operator"
            );
            sender.send_replace(next.clone());
            return Ok((next, true));
        }
        let next = ModeState {
            mode,
            mode_since_ms: now_unix_ms(),
            changed_by: changed_by.to_string(),
            reason: reason.to_string(),
        };
        self.persist(route, &next).await?;
        tracing::info!(
            route,
            mode = mode.as_str(),
            changed_by,
            reason,
            from = current.mode.as_str(),
            "route mode changed"
        );
        set_mode_metric(&self.metrics, route, mode);
        sender.send_replace(next.clone());
        Ok((next, true))
    }

    /// Call with the change lock held. Returns whether anything changed.
    async fn change_reason_locked(
        &self,
        route: &str,
        sender: &watch::Sender<ModeState>,
        reason: &str,
    ) -> Result<bool, RouteError> {
        let mut next = sender.borrow().clone();
        if next.reason == reason {
            return Ok(false);
        }
        next.reason = reason.to_string();
        self.persist(route, &next).await?;
        sender.send_replace(next);
        Ok(true)
    }

    /// Publishes a state another node already persisted (the cluster path; see [`Self::reload`]).
    pub fn adopt(&self, route: &str, state: ModeState) -> Result<(), RouteError> {
        let sender = self.routes.get(route).ok_or_else(|| RouteError::UnknownRoute(route.to_string()))?;
        set_mode_metric(&self.metrics, route, state.mode);
        sender.send_replace(state);
        Ok(())
    }

    /// Re-reads a route's document (another central may have changed it) and adopts it if it
    /// differs from what this node shows. A route not configured here, or without a document, is
    /// left alone. Returns true when the state changed here.
    pub async fn reload(&self, route: &str) -> Result<bool, RouteError> {
        let Some(sender) = self.routes.get(route) else { return Ok(false) };
        // Under the change lock: a local change cannot slip between the read and the adopt, so the
        // last document write is what every node ends up showing.
        let _guard = self.change_lock.lock().await;
        self.reload_locked(route, sender).await
    }

    /// Call with the change lock held.
    async fn reload_locked(
        &self,
        route: &str,
        sender: &watch::Sender<ModeState>,
    ) -> Result<bool, RouteError> {
        let key = document_key(route);
        // `documents` matches a prefix: `route:a` also finds `route:ab`, hence the exact lookup.
        let documents = self.store.documents(&key).await?;
        let Some(text) = documents.get(&key) else { return Ok(false) };
        let state = match serde_json::from_str::<ModeState>(text) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(
                    route,
                    "the stored mode document {key} is unreadable ({e}); keeping the current mode"
                );
                return Ok(false);
            }
        };
        let current = sender.borrow().clone();
        if current == state {
            return Ok(false);
        }
        if current.mode != state.mode {
            tracing::info!(
                route,
                mode = state.mode.as_str(),
                changed_by = %state.changed_by,
                reason = %state.reason,
                from = current.mode.as_str(),
                "route mode changed (followed from another central)"
            );
        }
        self.adopt(route, state)?;
        Ok(true)
    }

    /// Every configured route's document again (after missed events).
    pub async fn reload_all(&self) {
        for route in self.routes.keys() {
            if let Err(e) = self.reload(route).await {
                tracing::warn!(route = %route, "cannot re-read the route's mode document: {e}");
            }
        }
    }

    /// Tells the other centrals to re-read the route's document. Best effort: the document is
    /// durable already, and a missed event is repaired by the periodic reload.
    /// On SQLite the event only loops back to this node's follower, which finds nothing new.
    async fn tell_cluster(&self, route: &str) {
        let body = serde_json::json!({ "route": route }).to_string();
        if let Err(e) = self.store.publish_cluster_event(ROUTE_MODE_EVENT, &body).await {
            tracing::warn!(route, "cannot tell the other centrals about the route's mode: {e}");
        }
    }

    async fn persist(&self, route: &str, state: &ModeState) -> Result<(), StoreError> {
        let text = serde_json::to_string(state).expect("a mode state serialises");
        self.store.put_document(&document_key(route), text).await
    }
}

fn document_key(route: &str) -> String {
    format!("{ROUTE_MODE_DOCUMENT_PREFIX}{route}")
}

/// `outpost_route_mode{route,mode}`: 1 for the current mode, 0 for the other.
fn set_mode_metric(metrics: &Metrics, route: &str, current: Mode) {
    for mode in [Mode::Forward, Mode::Store] {
        metrics
            .route_mode
            .get_or_create(&RouteModeLabel { route: route.to_string(), mode: mode.as_str().to_string() })
            .set(i64::from(mode == current));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_store::StoreOptions;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir, StoreOptions::keep_everything(1 << 20, "n"), None).unwrap()
    }

    #[tokio::test]
    async fn modes_persist_publish_and_ignore_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["a".to_string(), "b".to_string()];
        let store = open(dir.path());
        let metrics = Arc::new(Metrics::new());
        let modes = RouteModes::load(store.clone(), metrics.clone(), &names).await.unwrap();
        assert_eq!(modes.current("a").unwrap().mode, Mode::Forward);
        assert!(matches!(
            modes.set_mode("zz", Mode::Store, "operator", "x").await,
            Err(RouteError::UnknownRoute(_))
        ));

        let mut watch_a = modes.subscribe("a").unwrap();
        let stored = modes.set_mode("a", Mode::Store, "auto:service_down", "connect").await.unwrap();
        assert!(watch_a.has_changed().unwrap());
        assert_eq!(watch_a.borrow_and_update().clone(), stored);
        let again = modes.set_mode("a", Mode::Store, "auto:service_down", "again").await.unwrap();
        assert_eq!(again, stored, "the same mode again changes nothing");
        assert!(!watch_a.has_changed().unwrap());
        modes.set_reason("a", "poison: http:400").await.unwrap();
        let seen = modes.current("a").unwrap();
        // An operator's switch to the same mode makes the route the operator's; mode_since stays.
        let held = modes.set_mode("a", Mode::Store, "operator", "erp upgrade").await.unwrap();
        assert_eq!(
            (held.changed_by.as_str(), held.reason.as_str(), held.mode_since_ms),
            ("operator", "erp upgrade", stored.mode_since_ms)
        );
        // The task decided on `seen`, before the operator acted: its decisions are dropped.
        assert_eq!(modes.set_reason_if_unchanged("a", &seen, "poison: http:400 again").await.unwrap(), None);
        assert_eq!(
            modes.set_mode_if_unchanged("a", &seen, Mode::Forward, "auto:probe", "back").await.unwrap(),
            None
        );
        assert_eq!(modes.current("a").unwrap(), held);
        // Decided on the current state, they apply.
        let recorded = modes.set_reason_if_unchanged("a", &held, "poison: http:400").await.unwrap();
        assert_eq!(recorded.map(|state| state.reason), Some("poison: http:400".to_string()));
        let text = metrics.encode_prometheus_text();
        assert!(text.contains("outpost_route_mode{route=\"a\",mode=\"store\"} 1"), "{text}");
        assert!(text.contains("outpost_route_mode{route=\"a\",mode=\"forward\"} 0"), "{text}");
        store.shutdown().await;
        drop((modes, store));

        let store = open(dir.path());
        let modes = RouteModes::load(store, Arc::new(Metrics::new()), &names).await.unwrap();
        let a = modes.current("a").unwrap();
        assert_eq!(
            (a.mode, a.changed_by.as_str(), a.reason.as_str()),
            (Mode::Store, "operator", "poison: http:400")
        );
        assert_eq!(a.mode_since_ms, stored.mode_since_ms);
        assert_eq!(modes.current("b").unwrap().mode, Mode::Forward);
    }
}
