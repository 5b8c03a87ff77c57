//! Routes: delivery of each queue's messages to downstream HTTP services (CONTRACT sections 2-4),
//! on edges and centrals alike. One task per route owns that route's delivery state and runs one
//! loop; [`Routes`] is the handle the API uses (list, switch modes, resubmit and discard failed
//! messages); [`RouteTasks`] stops the tasks.
//!
//! This module is the facade; under it: `task` (the route task's loop), `wait` (every wait of a
//! task: one `wait(until) -> Wake` over the stop, the lease, the mode, new work and a deadline),
//! `cursor` (its cursor commits), `cluster` (the follower of other centrals' changes), [`policy`]
//! (the pure failure policy), [`modes`] (durable route modes), [`delivery`] (one HTTP delivery
//! with endpoint failover), [`pipeline`] (a window's POSTs sent in order on one connection,
//! pipelined over HTTP/1.1) and [`http2`] (the same window as HTTP/2 streams, when an https
//! endpoint speaks HTTP/2).
//!
//! # How a route moves through its queue
//!
//! - **One message at a time, in queue order.** The next message is sent only after the previous
//!   one was delivered (2xx), failed, or the route was switched to `store`. Failed messages that an
//!   operator resubmitted go first, ahead of the queue, with their original message id.
//! - **A window, when configured** (`[[route]] max_in_flight` > 1 or `batch` > 1, see
//!   [`task::RouteTask::forward_window`]): up to `max_in_flight` POSTs outstanding, each of one
//!   message or of an NDJSON body of up to `batch`, sent in queue order on one connection
//!   ([`pipeline`]: pipelined on one HTTP/1.1 keep-alive connection, so the downstream receives and
//!   handles them in queue order; or as HTTP/2 streams opened in queue order, [`http2`], which the
//!   downstream may handle at once); the answers are taken in that order, the cursor moves over
//!   the delivered prefix only and the next POST is sent as each answer comes (a sliding window),
//!   and the first failure stops the window: nothing more is sent, the answers of what was are
//!   taken but not acknowledged, and everything from the failed
//!   POST on is sent again (later POSTs that succeeded are repeats the downstream drops by
//!   `Idempotency-Key`). The failed message then goes through the policy alone, as with the
//!   default window of one; a failed batch's messages go one by one. `max_in_flight = 1` (the
//!   default) keeps one POST at a time through the route's HTTP client.
//! - **Cursor `route:<name>`.** The route's durable position in its queue; storage is released once
//!   every reader passed a message. Deliveries advance it through the store's group commit without
//!   waiting for each fsync, but never more than [`MAX_UNCOMMITTED_DELIVERIES`] ahead of what is on
//!   disk: after a crash a route repeats at most that many deliveries (plus the one in flight),
//!   which the downstream drops by `Idempotency-Key`. Failing a message moves the cursor past it in
//!   the same commit that stores the failed copy ([`Store::fail_message`]).
//! - **Failure policy** ([`crate::route::policy`]): a `service_down` class switches the route to
//!   `store` and the message stays first in line; `poison` fails it at once; anything else is
//!   retried after `retry_initial` doubling to `retry_max` (with jitter) until `max_attempts`.
//! - **Store mode** sends nothing. With `auto_forward`, every `probe_interval` the task tries to
//!   deliver the first waiting message (the probe is a real delivery): delivered, or answered with
//!   a status that is not `service_down`, means the service is back, and the route returns to
//!   `forward` (`changed_by = auto:probe`). With nothing waiting there is nothing to probe with and
//!   the route waits for a message. A route an operator put (or held) in `store` is not probed:
//!   it stays stored until an operator's `forward`.
//! - **The operator's word stands.** The task's own switches and reasons are decisions about what
//!   it saw when an attempt began; they are recorded only if nobody changed the route since
//!   ([`RouteModes::set_mode_if_unchanged`]). An answer arriving after an operator's `store
//!   --reason` leaves the operator's mode and reason alone.
//! - **Message TTL** (`limits.message_ttl`): a queue message older than the TTL when the route
//!   reaches it is failed with reason `expired` instead of being sent.
//!
//! Startup and recovery are the same path: the position comes from the durable cursor, resubmitted
//! entries from the failed table and the mode from the route's document.
//!
//! # On a cluster (centrals sharing PostgreSQL)
//!
//! - **One deliverer per route.** A task delivers only while it holds the store lease
//!   `route:<name>` ([`Store::lease`]; on SQLite always held, so a node alone behaves as above).
//!   Gaining it, the task starts over from the cursor as the database has it
//!   ([`Store::fresh_cursor`]), with no read-ahead and a new commit pipeline: the previous holder may
//!   have delivered further than this node's views show. Losing it, the task starts nothing new (a
//!   delivery in flight may complete) and commits what it delivered. The store's holder gives a
//!   lease up before another central can take it, so two centrals never deliver at once; after a
//!   kill -9 the next holder repeats at most the previous holder's uncommitted deliveries.
//! - **Modes follow cluster-wide** through [`RouteModes`]: every change is persisted, then announced
//!   with a cluster event; [`cluster::follow_cluster`] re-reads the document on every central. Only the
//!   holder delivers, so only it switches automatically (`service_down`, probe); operators may
//!   switch from any central.
//! - **Resubmits** are announced the same way ([`ROUTE_RESUBMITTED_EVENT`]), so the holder picks
//!   up entries resubmitted on another central; a periodic look repairs a missed event.

mod cluster;
mod cursor;
pub mod delivery;
pub mod http2;
pub mod modes;
pub mod pipeline;
pub mod policy;
mod task;
mod wait;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use outpost_core::config::RouteConfig;
use outpost_core::metrics::{Metrics, RouteLabel};
use outpost_core::time::now_unix_ms;
use outpost_core::Config;
use outpost_link::Jitter;
use outpost_store::{
    FailedEntry, FailedQuery, FailedSelector, FailedStatus, ResubmitOutcome, Store, StoreError,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use delivery::Deliverer;
use modes::{Mode, ModeState, RouteError, RouteModes, CHANGED_BY_OPERATOR};
use policy::RoutePolicy;
use task::RouteTask;

/// The most deliveries a route makes beyond its last committed cursor (the bound on repeats after
/// a crash).
pub const MAX_UNCOMMITTED_DELIVERIES: u64 = 64;
/// The most queue messages a route reads ahead at once.
pub const READ_AHEAD_MESSAGES: usize = 256;
/// The most payload bytes of one read of a route ([`outpost_store::Store::read_within`]), so 1 MiB
/// messages are read a few at a time and small ones 256 at a time.
pub const READ_AHEAD_BYTES: usize = 4 << 20;
/// The most payload bytes of one batch POST (`[[route]] batch`): a batch of `batch` messages
/// stops short of it (a message larger than it goes alone), so a downstream never gets a body
/// of `batch` × `limits.max_message_bytes`.
pub const MAX_POST_BYTES: usize = 4 << 20;
/// About the most a window (`[[route]] max_in_flight`) holds in flight, counted as payload bytes
/// plus [`MESSAGE_FOOTPRINT`] per message: it pushes no further POST beyond it while one is
/// outstanding, so 256 POSTs of 10,000 messages cannot hold gigabytes.
pub const MAX_WINDOW_BYTES: usize = 16 << 20;
/// What a message read ahead or in flight costs besides its payload (its id, queue, origin and
/// content type, and the request's headers), for [`MAX_WINDOW_BYTES`].
pub const MESSAGE_FOOTPRINT: usize = 256;
/// How long [`RouteTasks::stop`] lets a task finish its cursor commit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The cluster event published after entries of a route were resubmitted; body `{"route": name}`.
pub const ROUTE_RESUBMITTED_EVENT: &str = "route_resubmitted";

/// The cursor name of route `name` in its queue.
pub fn reader_name(route: &str) -> String {
    format!("route:{route}")
}

/// A route as `GET /v1/routes` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub name: String,
    pub queue: String,
    pub mode: ModeState,
    /// Messages of the queue after the route's cursor.
    pub backlog: u64,
    /// Entries of the route in the failed table with status `failed`.
    pub failed: u64,
}

/// The routes of a node, for the API.
pub struct Routes {
    routes: BTreeMap<String, RouteConfig>,
    store: Store,
    metrics: Arc<Metrics>,
    modes: Arc<RouteModes>,
    /// Tells a route's task that entries were resubmitted (capacity 1: one pending notice is enough).
    resubmit_notices: BTreeMap<String, mpsc::Sender<()>>,
    /// The pull consumers' failed-entry routes (`consumer:<name>`) seen in the failed table, so
    /// their gauge goes back to 0 once their entries are gone.
    consumer_routes: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The running route tasks.
pub struct RouteTasks {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RouteTasks {
    /// Asks every task to stop (an in-flight delivery is abandoned and repeated after the restart),
    /// and waits for each to commit its cursor.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for mut task in self.tasks {
            if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
                tracing::warn!("a route task did not stop within {STOP_TIMEOUT:?}; aborting it");
                task.abort();
            }
        }
    }
}

/// Loads the routes' modes and starts one task per configured route.
pub async fn start(
    config: Arc<Config>,
    store: Store,
    metrics: Arc<Metrics>,
    tls: &[Arc<outpost_tls::ClientTls>],
) -> Result<(Arc<Routes>, RouteTasks), String> {
    let names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let modes = Arc::new(
        RouteModes::load(store.clone(), metrics.clone(), &names)
            .await
            .map_err(|e| format!("cannot load the route modes: {e}"))?,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    // Subscribed before any task runs, so no change made from now on is missed.
    let cluster_events = store.cluster_events();
    let mut resubmit_notices = BTreeMap::new();
    let mut tasks = Vec::new();
    // Seeded per node and start, so routes of many nodes do not retry in lockstep.
    let seed = config.node_id.bytes().fold(now_unix_ms() as u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    for (i, route) in config.routes.iter().enumerate() {
        let deliverer = Deliverer::new(route, tls.get(i).map(|t| &**t))
            .map_err(|e| format!("route {:?}: cannot build its HTTP client: {e}", route.name))?;
        // Present from the start, at 0, rather than appearing with the first delivery.
        metrics.messages_delivered.get_or_create(&RouteLabel { route: route.name.clone() }).inc_by(0);
        let (notice_tx, notice_rx) = mpsc::channel(1);
        resubmit_notices.insert(route.name.clone(), notice_tx);
        let policy = RoutePolicy::from_config(route);
        let jitter = Jitter::with_default_spread(seed.wrapping_add(i as u64));
        let message_ttl = config.queue_message_ttl(&route.queue);
        let task = RouteTask::new(
            route,
            message_ttl,
            policy,
            deliverer,
            &store,
            &metrics,
            &modes,
            notice_rx,
            stop_rx.clone(),
            jitter,
        );
        tasks.push(tokio::spawn(task.run()));
    }
    let routes = Arc::new(Routes {
        routes: config.routes.iter().map(|r| (r.name.clone(), r.clone())).collect(),
        store,
        metrics,
        modes,
        resubmit_notices,
        consumer_routes: std::sync::Mutex::default(),
    });
    routes.refresh_failed_metric().await;
    tasks.push(tokio::spawn(cluster::follow_cluster(routes.clone(), cluster_events, stop_rx)));
    Ok((routes, RouteTasks { stop: stop_tx, tasks }))
}

impl Routes {
    /// The component that owns the modes (a cluster backend hooks in here).
    pub fn modes(&self) -> &Arc<RouteModes> {
        &self.modes
    }

    pub fn is_route(&self, name: &str) -> bool {
        self.routes.contains_key(name)
    }

    /// A configured route, or a pull consumer's failed entries (`consumer:<name>`, see
    /// [`outpost_store::consumers`]): what failed entries may name and be resubmitted to.
    pub fn takes_failed(&self, route: &str) -> bool {
        self.is_route(route) || outpost_store::consumers::consumer_of_route(route).is_some()
    }

    /// Every route with its mode, backlog and failed count, by name.
    pub async fn list(&self) -> Result<Vec<RouteView>, StoreError> {
        let failed = self.store.failed_counts(FailedStatus::Failed).await?;
        Ok(self.routes.keys().filter_map(|name| self.view(name, &failed)).collect())
    }

    /// One route's view.
    pub async fn get(&self, name: &str) -> Result<RouteView, RouteError> {
        let failed = self.store.failed_counts(FailedStatus::Failed).await?;
        self.view(name, &failed).ok_or_else(|| RouteError::UnknownRoute(name.to_string()))
    }

    fn view(&self, name: &str, failed: &BTreeMap<String, u64>) -> Option<RouteView> {
        let route = self.routes.get(name)?;
        let mode = self.modes.current(name)?;
        let backlog = match self.store.queue(&route.queue) {
            Some(stats) => {
                let position = self
                    .store
                    .cursor(&route.queue, &reader_name(name))
                    .max(stats.first_seq.saturating_sub(1));
                stats.last_seq.saturating_sub(position)
            }
            None => 0,
        };
        Some(RouteView {
            name: name.to_string(),
            queue: route.queue.clone(),
            mode,
            backlog,
            failed: failed.get(name).copied().unwrap_or(0),
        })
    }

    /// The operator switches a route (`POST /v1/routes/{name}/store|forward`).
    pub async fn set_mode(&self, name: &str, mode: Mode, reason: &str) -> Result<RouteView, RouteError> {
        self.modes.set_mode(name, mode, CHANGED_BY_OPERATOR, reason).await?;
        self.get(name).await
    }

    /// Failed entries (status `failed`), optionally of one route, by id.
    pub async fn failed(
        &self,
        route: Option<&str>,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<FailedEntry>, RouteError> {
        if let Some(route) = route {
            if !self.takes_failed(route) {
                return Err(RouteError::UnknownRoute(route.to_string()));
            }
        }
        let query = FailedQuery {
            route: route.map(str::to_string),
            status: FailedStatus::Failed,
            after_id,
            limit,
            with_payload: false,
        };
        Ok(self.store.failed(query).await?)
    }

    /// Puts failed entries back on their routes; each route delivers them before continuing with
    /// its queue (a consumer's entries go to its next lease). Entries of routes no longer
    /// configured are refused like unknown ids.
    pub async fn resubmit(&self, selector: FailedSelector) -> Result<ResubmitOutcome, RouteError> {
        match &selector {
            FailedSelector::Route(route) if !self.takes_failed(route) => {
                return Err(RouteError::UnknownRoute(route.clone()))
            }
            FailedSelector::Ids(ids) => {
                let mut orphaned = Vec::new();
                for id in ids {
                    if let Some(entry) = self.store.failed_entry(*id).await? {
                        if !self.takes_failed(&entry.route) {
                            orphaned.push(entry.route);
                        }
                    }
                }
                if let Some(route) = orphaned.pop() {
                    return Err(RouteError::UnknownRoute(route));
                }
            }
            FailedSelector::Route(_) => {}
        }
        let outcome = self.store.resubmit_failed(selector).await?;
        let routes: std::collections::BTreeSet<&String> =
            outcome.resubmitted.iter().map(|(_, r)| r).collect();
        for route in routes {
            self.notify_resubmitted(route);
            // The route's lease holder may be another central.
            let body = serde_json::json!({ "route": route }).to_string();
            if let Err(e) = self.store.publish_cluster_event(ROUTE_RESUBMITTED_EVENT, &body).await {
                tracing::warn!(route = %route, "cannot tell the other centrals about resubmitted entries: {e}");
            }
        }
        if !outcome.resubmitted.is_empty() {
            tracing::info!(entries = outcome.resubmitted.len(), "failed messages resubmitted");
        }
        self.refresh_failed_metric().await;
        Ok(outcome)
    }

    /// Tells the route's task (here) that resubmitted entries may be waiting.
    fn notify_resubmitted(&self, route: &str) {
        if let Some(notice) = self.resubmit_notices.get(route) {
            // Full: a notice is already pending, which is all the task needs.
            let _ = notice.try_send(());
        }
    }

    /// Discards a failed entry. False if there was none.
    pub async fn discard(&self, id: i64) -> Result<bool, RouteError> {
        let removed = self.store.remove_failed(id).await?;
        if removed {
            tracing::info!(id, "failed message discarded by an operator");
            self.refresh_failed_metric().await;
        }
        Ok(removed)
    }

    /// One failed entry (status `failed`) with its payload, for an operator to look at.
    pub async fn failed_with_payload(&self, id: i64) -> Result<Option<FailedEntry>, RouteError> {
        if id < 1 {
            return Ok(None);
        }
        let query = FailedQuery {
            route: None,
            status: FailedStatus::Failed,
            after_id: id - 1,
            limit: 1,
            with_payload: true,
        };
        Ok(self.store.failed(query).await?.into_iter().find(|entry| entry.id == id))
    }

    /// One failed entry, whatever its status.
    pub async fn failed_entry(&self, id: i64) -> Result<Option<FailedEntry>, RouteError> {
        Ok(self.store.failed_entry(id).await?)
    }

    /// Sets `outpost_failed_messages{route}` for every configured route from the store, and for
    /// every pull consumer with failed entries (`route="consumer:<name>"`; the cluster follower's
    /// periodic refresh picks up what a lease failed).
    pub async fn refresh_failed_metric(&self) {
        let counts = match self.store.failed_counts(FailedStatus::Failed).await {
            Ok(counts) => counts,
            Err(e) => return tracing::warn!("cannot count failed messages for the metrics: {e}"),
        };
        let mut consumers = self.consumer_routes.lock().expect("consumer routes lock poisoned");
        consumers.extend(
            counts.keys().filter(|r| outpost_store::consumers::consumer_of_route(r).is_some()).cloned(),
        );
        for route in self.routes.keys().chain(consumers.iter()) {
            let count = counts.get(route).copied().unwrap_or(0);
            self.metrics
                .failed_messages
                .get_or_create(&RouteLabel { route: route.clone() })
                .set(count as i64);
        }
    }
}
