//! Routes: delivery of each queue's messages to downstream HTTP services (CONTRACT sections 2-4),
//! on edges and centrals alike. One task per route owns that route's delivery state and runs one
//! loop; [`Routes`] is the handle the API uses (list, switch modes, resubmit and discard failed
//! messages); [`RouteTasks`] stops the tasks.
//!
//! Under it: [`policy`] (the pure failure policy), [`modes`] (durable route modes) and [`delivery`]
//! (one HTTP delivery with endpoint failover).
//!
//! # How a route moves through its queue
//!
//! - **One message at a time, in queue order.** The next message is sent only after the previous
//!   one was delivered (2xx), failed, or the route was switched to `store`. Failed messages that an
//!   operator resubmitted go first, ahead of the queue, with their original message id.
//! - **A window, when configured** (`[[route]] max_in_flight` > 1 or `batch` > 1, see
//!   [`RouteTask::forward_window`]): up to `max_in_flight` POSTs start at once in queue order,
//!   each of one message or of an NDJSON body of up to `batch`; the answers are taken in queue
//!   order, the cursor moves over the delivered prefix only, and the first failure stops the
//!   window: everything from the failed POST on is sent again (later POSTs that succeeded are
//!   repeats the downstream drops by `Idempotency-Key`). The failed message then goes through the
//!   policy alone, as with the default window of one; a failed batch's messages go one by one.
//!   Concurrent POSTs travel on separate connections, so a downstream may see them arrive out of
//!   order by up to the window; `max_in_flight = 1` (the default) keeps one POST at a time.
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
//!   with a cluster event; [`follow_cluster`] re-reads the document on every central. Only the
//!   holder delivers, so only it switches automatically (`service_down`, probe); operators may
//!   switch from any central.
//! - **Resubmits** are announced the same way ([`ROUTE_RESUBMITTED_EVENT`]), so the holder picks
//!   up entries resubmitted on another central; a periodic look repairs a missed event.

pub mod delivery;
pub mod modes;
pub mod policy;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use outpost_core::config::RouteConfig;
use outpost_core::metrics::{Metrics, RouteLabel};
use outpost_core::time::now_unix_ms;
use outpost_core::Config;
use outpost_link::Jitter;
use outpost_store::{
    FailedEntry, FailedQuery, FailedSelector, FailedStatus, Lease, NewFailure, ResubmitOutcome, Store,
    StoreError, StoredMessage,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use delivery::{Deliverer, DeliveryFailure, Outgoing, Unit};
use modes::{Mode, ModeState, RouteError, RouteModes, CHANGED_BY_OPERATOR, ROUTE_MODE_EVENT};
use policy::{Class, RoutePolicy, Verdict};

/// The most deliveries a route makes beyond its last committed cursor (the bound on repeats after
/// a crash).
pub const MAX_UNCOMMITTED_DELIVERIES: u64 = 64;
/// The most queue messages a route reads ahead at once.
pub const READ_AHEAD_MESSAGES: usize = 256;
/// About how many payload bytes a route holds read ahead: the count of the next read is this
/// divided by the average payload of the last one (at least 1), so 1 MiB messages are read a few
/// at a time and small ones 256 at a time.
pub const READ_AHEAD_BYTES: usize = 4 << 20;
/// The count of a route's first read, before it knows the payload sizes.
const FIRST_READ_MESSAGES: usize = 16;
/// How long an idle route waits before looking again when no commit or notice woke it.
const IDLE_RECHECK: Duration = Duration::from_secs(1);
/// Pause before trying again after the store refused an operation (disk full, shutting down).
const STORE_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long [`RouteTasks::stop`] lets a task finish its cursor commit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the cluster follower re-reads every route's mode document and looks for resubmitted
/// entries, whatever the events said (an event is lost while a central's listener reconnects).
const CLUSTER_RESYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long a task that lost its lease waits for its cursor commit before letting go of it.
const LEASE_LOST_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The cluster event published after entries of a route were resubmitted; body `{"route": name}`.
pub const ROUTE_RESUBMITTED_EVENT: &str = "route_resubmitted";
/// `changed_by` of the task's own switches.
const CHANGED_BY_SERVICE_DOWN: &str = "auto:service_down";
const CHANGED_BY_PROBE: &str = "auto:probe";

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
        let task = RouteTask {
            name: route.name.clone(),
            queue: route.queue.clone(),
            reader: reader_name(&route.name),
            auto_forward: route.auto_forward,
            probe_interval: route.probe_interval,
            message_ttl: config.queue_message_ttl(&route.queue),
            max_in_flight: route.max_in_flight.get() as usize,
            batch: route.batch.get() as usize,
            singles_after_failed_batch: 0,
            policy: RoutePolicy::from_config(route),
            deliverer,
            store: store.clone(),
            metrics: metrics.clone(),
            modes: modes.clone(),
            mode: modes.subscribe(&route.name).expect("modes were loaded for every route"),
            lease: store.lease(&reader_name(&route.name)),
            holding: false,
            commits: store.commits(),
            resubmit_notices: notice_rx,
            stop: stop_rx.clone(),
            jitter: Jitter::with_default_spread(seed.wrapping_add(i as u64)),
            delivered_through: store.cursor(&route.queue, &reader_name(&route.name)),
            read_ahead: VecDeque::new(),
            read_ahead_limit: FIRST_READ_MESSAGES,
            cursor: CursorCommit::new(&store, &route.queue, &reader_name(&route.name)),
            resubmits_pending: true,
            head: None,
            retry_at: None,
            seen: modes.current(&route.name).expect("modes were loaded for every route"),
        };
        tracing::info!(
            route = %route.name, queue = %route.queue, urls = ?route.urls,
            mode = modes.current(&route.name).map(|m| m.mode.as_str()).unwrap_or("?"),
            position = task.delivered_through, "route starting"
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
    tasks.push(tokio::spawn(follow_cluster(routes.clone(), cluster_events, stop_rx)));
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

async fn refresh_failed_metric<'a>(
    store: &Store,
    metrics: &Metrics,
    routes: impl Iterator<Item = &'a String>,
) {
    match store.failed_counts(FailedStatus::Failed).await {
        Ok(counts) => {
            for route in routes {
                let count = counts.get(route).copied().unwrap_or(0);
                metrics.failed_messages.get_or_create(&RouteLabel { route: route.clone() }).set(count as i64);
            }
        }
        Err(e) => tracing::warn!("cannot count failed messages for the metrics: {e}"),
    }
}

/// The body of the routes' cluster events.
#[derive(serde::Deserialize)]
struct RouteEvent {
    route: String,
}

/// Follows what other centrals do to routes: a mode document changed ([`ROUTE_MODE_EVENT`]) is
/// re-read and adopted, resubmitted entries ([`ROUTE_RESUBMITTED_EVENT`]) wake the route's task.
/// Every [`CLUSTER_RESYNC_INTERVAL`], and after missing events, it does both for every route and
/// refreshes the failed-messages metric (another central may have failed or discarded entries).
/// On SQLite the events are this node's own, and the re-reads find nothing new.
async fn follow_cluster(
    routes: Arc<Routes>,
    mut events: tokio::sync::broadcast::Receiver<(String, String)>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut resync = tokio::time::interval(CLUSTER_RESYNC_INTERVAL);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is immediate, and everything was just loaded
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok((kind, body)) if kind == ROUTE_MODE_EVENT || kind == ROUTE_RESUBMITTED_EVENT => {
                    let Ok(RouteEvent { route }) = serde_json::from_str(&body) else {
                        tracing::warn!(kind, body, "ignoring a malformed route event");
                        continue;
                    };
                    if kind == ROUTE_MODE_EVENT {
                        if let Err(e) = routes.modes.reload(&route).await {
                            tracing::warn!(route = %route, "cannot follow the route's mode change: {e}");
                        }
                    } else {
                        routes.notify_resubmitted(&route);
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "route follower missed cluster events; re-reading every route");
                    resync_routes(&routes).await;
                }
                Err(RecvError::Closed) => return,
            },
            _ = resync.tick() => resync_routes(&routes).await,
            _ = stop.changed() => return,
        }
    }
}

async fn resync_routes(routes: &Routes) {
    routes.modes.reload_all().await;
    for route in routes.routes.keys() {
        routes.notify_resubmitted(route);
    }
    routes.refresh_failed_metric().await;
}

/// Resolves when the lease changes hands; never when its sender is gone (SQLite's lease is a
/// constant: always held).
async fn lease_changed(lease: &mut watch::Receiver<Lease>) {
    if lease.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when a held lease's validity ends by this node's clock; never for one without an end.
async fn lease_end(lease: Lease) {
    match lease.valid_until {
        Some(until) if lease.held => tokio::time::sleep_until(until.into()).await,
        _ => std::future::pending().await,
    }
}

/// What a route delivers next.
#[derive(Debug, Clone)]
enum Head {
    Queued(StoredMessage),
    Resubmitted(FailedEntry),
}

impl Head {
    fn outgoing(&self) -> Outgoing {
        match self {
            Head::Queued(m) => Outgoing {
                message_id: m.id.clone(),
                queue: m.queue.clone(),
                origin: m.origin.clone(),
                origin_seq: m.origin_seq,
                content_type: m.content_type.clone(),
                payload: m.payload.clone(),
            },
            Head::Resubmitted(e) => Outgoing {
                message_id: e.message_id.clone(),
                queue: e.queue.clone(),
                origin: e.origin.clone(),
                origin_seq: e.origin_seq,
                content_type: e.content_type.clone(),
                payload: e.payload.clone().unwrap_or_default(),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Head::Queued(m) => format!("message {} (seq {})", m.id, m.seq),
            Head::Resubmitted(e) => {
                format!("resubmitted message {} (seq {}, failed entry {})", e.message_id, e.seq, e.id)
            }
        }
    }
}

/// The head and how often it was tried.
struct Current {
    head: Head,
    attempts: u32,
}

/// The route's cursor commits: started without waiting, at most one at a time, never more than
/// [`MAX_UNCOMMITTED_DELIVERIES`] behind the deliveries.
struct CursorCommit {
    store: Store,
    queue: String,
    reader: String,
    durable: u64,
    wanted: u64,
    /// The seq being committed and where its outcome arrives.
    running: Option<(u64, oneshot::Receiver<Result<(), StoreError>>)>,
}

impl CursorCommit {
    fn new(store: &Store, queue: &str, reader: &str) -> CursorCommit {
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
    fn want(&mut self, seq: u64) {
        self.wanted = self.wanted.max(seq);
    }

    /// `seq` is already committed (failing a message moves the cursor itself).
    fn committed(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
        self.wanted = self.wanted.max(seq);
    }

    /// Collects a finished commit and starts the next one if needed. Never waits.
    fn poll(&mut self) {
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
        if self.running.is_none() && self.wanted > self.durable {
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
    async fn settle(&mut self) {
        if let Some((seq, outcome)) = self.running.take() {
            let result = outcome.await.ok();
            self.finish(seq, result);
        }
    }

    /// Commits everything wanted (one more try if a commit fails).
    async fn flush(&mut self) {
        for _ in 0..2 {
            self.settle().await;
            if self.wanted <= self.durable {
                return;
            }
            self.poll();
        }
        self.settle().await;
    }

    fn uncommitted(&self) -> u64 {
        self.wanted - self.durable
    }
}

/// What a delivery attempt led to.
enum Attempt {
    Delivered,
    Failed(DeliveryFailure),
    /// The node is stopping; the attempt was abandoned.
    Stopped,
}

/// One route's task: the only owner of its delivery state.
struct RouteTask {
    name: String,
    queue: String,
    reader: String,
    auto_forward: bool,
    probe_interval: Duration,
    message_ttl: Option<Duration>,
    /// `[[route]] max_in_flight` and `batch`: a window of up to `max_in_flight` POSTs of up to
    /// `batch` messages each (see [`RouteTask::forward_window`]).
    max_in_flight: usize,
    batch: usize,
    /// After a batch POST failed, its messages go one by one: how many are left to go so.
    singles_after_failed_batch: usize,
    policy: RoutePolicy,
    deliverer: Deliverer,
    store: Store,
    metrics: Arc<Metrics>,
    modes: Arc<RouteModes>,
    mode: watch::Receiver<ModeState>,
    /// Whether this node may deliver the route (store lease `route:<name>`).
    lease: watch::Receiver<Lease>,
    /// Whether the task has taken over the route under the lease (see [`RouteTask::gain_lease`]).
    holding: bool,
    commits: watch::Receiver<u64>,
    resubmit_notices: mpsc::Receiver<()>,
    stop: watch::Receiver<bool>,
    jitter: Jitter,
    /// Highest queue seq delivered or failed; ahead of the durable cursor by the commits in flight.
    delivered_through: u64,
    read_ahead: VecDeque<StoredMessage>,
    /// How many messages the next read asks for (see [`READ_AHEAD_BYTES`]).
    read_ahead_limit: usize,
    cursor: CursorCommit,
    /// Resubmitted entries may be waiting (set at start and by every notice).
    resubmits_pending: bool,
    /// The message being delivered; it stays first in line through retries and store mode.
    head: Option<Current>,
    retry_at: Option<Instant>,
    /// The route's mode state when the current decision began (an attempt, or an expiry): the
    /// task's switches and reasons apply only if it is still in force.
    seen: ModeState,
}

impl RouteTask {
    async fn run(mut self) {
        let mut last_mode = self.mode.borrow().mode;
        while !*self.stop.borrow() {
            let held = self.lease.borrow_and_update().is_valid();
            if !held {
                if self.holding {
                    self.lose_lease().await;
                }
                tokio::select! {
                    _ = lease_changed(&mut self.lease) => {}
                    _ = self.stop.changed() => {}
                }
                continue;
            }
            if !self.holding {
                if let Err(e) = self.gain_lease().await {
                    if matches!(e, StoreError::Closed) {
                        break;
                    }
                    tracing::warn!(route = %self.name, "cannot read the route's cursor after taking it over, retrying in {STORE_RETRY_PAUSE:?}: {e}");
                    self.pause(STORE_RETRY_PAUSE).await;
                    continue;
                }
            }
            let mode = self.mode.borrow_and_update().mode;
            if mode == Mode::Forward && last_mode == Mode::Store {
                // Back in service: primary endpoint first, no leftover backoff.
                self.deliverer.prefer_primary();
                self.retry_at = None;
            }
            last_mode = mode;
            let outcome = match mode {
                Mode::Forward => self.forward_step().await,
                Mode::Store => self.store_step().await,
            };
            match outcome {
                Ok(()) => {}
                Err(StoreError::Closed) => break,
                Err(e) => {
                    tracing::warn!(route = %self.name, "store error, retrying in {STORE_RETRY_PAUSE:?}: {e}");
                    self.pause(STORE_RETRY_PAUSE).await;
                }
            }
        }
        self.cursor.flush().await;
        tracing::debug!(route = %self.name, position = self.cursor.durable, "route stopped");
    }

    /// This node now delivers the route: start from the cursor as the database has it (another
    /// central may have delivered since this node last looked), with nothing read ahead.
    async fn gain_lease(&mut self) -> Result<(), StoreError> {
        let position = self.store.fresh_cursor(&self.queue, &self.reader).await?;
        self.delivered_through = position;
        self.read_ahead.clear();
        self.read_ahead_limit = FIRST_READ_MESSAGES;
        self.cursor = CursorCommit::new(&self.store, &self.queue, &self.reader);
        self.singles_after_failed_batch = 0;
        self.head = None;
        self.retry_at = None;
        self.resubmits_pending = true;
        self.deliverer.prefer_primary();
        self.holding = true;
        if self.store.is_shared() {
            tracing::info!(route = %self.name, position, "this central now delivers the route (lease taken)");
        }
        Ok(())
    }

    /// Another central delivers the route now (or may, soon): start nothing new and commit what was
    /// delivered, so the next holder repeats as little as possible.
    async fn lose_lease(&mut self) {
        self.holding = false;
        self.head = None;
        self.retry_at = None;
        self.read_ahead.clear();
        if tokio::time::timeout(LEASE_LOST_FLUSH_TIMEOUT, self.cursor.flush()).await.is_err() {
            tracing::warn!(route = %self.name, "the cursor commit did not finish within {LEASE_LOST_FLUSH_TIMEOUT:?} after losing the lease; the next holder may repeat those deliveries");
        }
        tracing::info!(route = %self.name, position = self.cursor.durable, "this central stopped delivering the route (lease lost)");
    }

    /// Sleeps, waking early for a stop, a mode change or the lease changing hands.
    async fn pause(&mut self, duration: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = self.stop.changed() => {}
            _ = self.mode.changed() => {}
            _ = lease_changed(&mut self.lease) => {}
        }
    }

    fn take_notices(&mut self) {
        while self.resubmit_notices.try_recv().is_ok() {
            self.resubmits_pending = true;
        }
    }

    /// Forward mode: deliver the head, or wait for work.
    async fn forward_step(&mut self) -> Result<(), StoreError> {
        self.take_notices();
        self.cursor.poll();
        // Seen before looking, so a commit after the look wakes the wait below.
        self.commits.borrow_and_update();
        if self.head.is_none() {
            self.head = self.next_head().await?;
        }
        let Some(current) = &self.head else {
            self.cursor.flush().await;
            tokio::select! {
                _ = self.commits.changed() => {}
                _ = self.resubmit_notices.recv() => self.resubmits_pending = true,
                _ = self.mode.changed() => {}
                _ = self.stop.changed() => {}
                _ = lease_changed(&mut self.lease) => {}
                _ = tokio::time::sleep(IDLE_RECHECK) => {}
            }
            return Ok(());
        };
        let expired = matches!(&current.head, Head::Queued(message) if self.expired(message));
        if expired {
            self.seen = self.mode.borrow().clone();
            return self.fail_head(Verdict::FailExhausted, None).await;
        }
        if let Some(at) = self.retry_at {
            if at > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = self.stop.changed() => return Ok(()),
                    _ = self.mode.changed() => return Ok(()),
                    _ = lease_changed(&mut self.lease) => return Ok(()),
                }
            }
            self.retry_at = None;
        }
        if self.cursor.uncommitted() >= MAX_UNCOMMITTED_DELIVERIES {
            self.cursor.settle().await;
            self.cursor.poll();
        }
        let fresh_queued = matches!(&current.head, Head::Queued(_)) && current.attempts == 0;
        if fresh_queued && self.singles_after_failed_batch == 0 && (self.max_in_flight > 1 || self.batch > 1)
        {
            return self.forward_window().await;
        }
        match self.attempt().await {
            Attempt::Delivered => self.delivered().await,
            Attempt::Failed(failure) => self.failed(failure, false).await,
            Attempt::Stopped => Ok(()),
        }
    }

    /// Delivers the head and the messages after it as a window: up to `max_in_flight` POSTs at
    /// once, each of one message or (`batch` > 1) an NDJSON body of up to `batch`, started in queue
    /// order. The answers are taken in queue order too: the cursor moves over the delivered prefix
    /// only, and the first failure stops the window there. Everything from the failed POST on goes
    /// back in line (POSTs after it that succeeded are sent again later: repeats, which the
    /// downstream drops by `Idempotency-Key`, never a skip). A failed single message is judged by
    /// the policy as a single delivery would be; a failed batch sends its first message alone next,
    /// so the policy judges messages, not batches.
    async fn forward_window(&mut self) -> Result<(), StoreError> {
        if !self.lease.borrow().is_valid() {
            return Ok(());
        }
        self.seen = self.mode.borrow().clone();
        let Some(Current { head: Head::Queued(first), .. }) = self.head.take() else {
            unreachable!("a window starts at a fresh queued head")
        };
        let wanted = self.max_in_flight * self.batch;
        if self.read_ahead.len() + 1 < wanted {
            self.top_up_read_ahead(wanted - 1).await?;
        }
        // The window's messages: the head, then what follows, stopping before an expired one
        // (it is failed as the head of a later step).
        let mut messages = vec![first];
        while messages.len() < wanted {
            match self.read_ahead.front() {
                Some(next) if !self.expired(next) => {
                    messages.push(self.read_ahead.pop_front().expect("front"))
                }
                _ => break,
            }
        }
        let units = self.units_of(&messages);
        let outgoing: Vec<Unit> = units
            .iter()
            .map(|range| match range.len() {
                1 => Unit::Single(Head::Queued(messages[range.start].clone()).outgoing()),
                _ => Unit::Batch(
                    messages[range.clone()].iter().map(|m| Head::Queued(m.clone()).outgoing()).collect(),
                ),
            })
            .collect();
        // Stopping, or the lease running out (as in `attempt`): nothing of the window counts, the
        // cursor has not moved over it, and the next holder starts from the cursor.
        let results = {
            let deliverer = &self.deliverer;
            let posts = futures_util::future::join_all(outgoing.iter().map(|unit| deliverer.post_unit(unit)));
            tokio::pin!(posts);
            loop {
                let lease = *self.lease.borrow();
                if !lease.is_valid() {
                    tracing::warn!(route = %self.name, "the route's lease ran out during a window of deliveries: abandoning it to the next holder");
                    return Ok(());
                }
                tokio::select! {
                    biased;
                    _ = lease_end(lease) => {}
                    _ = lease_changed(&mut self.lease) => {}
                    _ = self.stop.changed() => return Ok(()),
                    results = &mut posts => {
                        if !self.lease.borrow().is_valid() {
                            return Ok(());
                        }
                        break results;
                    }
                }
            }
        };
        let mut delivered = 0usize;
        let mut failure = None;
        for (range, result) in units.iter().zip(results) {
            match result {
                Ok(()) => {
                    let last = &messages[range.end - 1];
                    self.delivered_through = last.seq;
                    self.cursor.want(last.seq);
                    delivered += range.len();
                }
                Err(error) => {
                    failure = Some((range.len(), error));
                    break;
                }
            }
        }
        self.metrics
            .messages_delivered
            .get_or_create(&RouteLabel { route: self.name.clone() })
            .inc_by(delivered as u64);
        self.cursor.poll();
        // Everything not delivered goes back in line, in order.
        for message in messages.drain(delivered..).rev() {
            self.read_ahead.push_front(message);
        }
        let Some((unit_len, error)) = failure else { return Ok(()) };
        let head = self.read_ahead.pop_front().expect("the failed POST's messages went back in line");
        self.head = Some(Current { head: Head::Queued(head), attempts: 0 });
        if unit_len == 1 {
            return self.failed(error, false).await;
        }
        // A batch failed: its messages go one by one (the first one now), so the policy judges the
        // message that fails, not the batch; then batches resume.
        tracing::debug!(route = %self.name, "a batch POST failed, delivering its messages one by one: {error}");
        self.singles_after_failed_batch = unit_len;
        if self.policy.classify(error.kind()) == Class::ServiceDown {
            return self.failed(error, false).await;
        }
        Ok(())
    }

    /// The POSTs of a window: ranges of `messages`, each of up to `batch` messages; a payload with a
    /// line break cannot be an NDJSON line and goes alone.
    fn units_of(&self, messages: &[StoredMessage]) -> Vec<std::ops::Range<usize>> {
        let mut units: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let alone = self.batch == 1 || message.payload.contains(&b'\n');
            match units.last_mut() {
                Some(unit)
                    if !alone
                        && unit.len() < self.batch
                        && !messages[unit.start].payload.contains(&b'\n') =>
                {
                    unit.end = i + 1
                }
                _ => units.push(i..i + 1),
            }
            if units.len() > self.max_in_flight {
                units.pop();
                break;
            }
        }
        units
    }

    /// Reads more of the queue into the read-ahead until it holds `count` messages or the queue
    /// has no more.
    async fn top_up_read_ahead(&mut self, count: usize) -> Result<(), StoreError> {
        while self.read_ahead.len() < count {
            let after = self.read_ahead.back().map_or(self.delivered_through, |m| m.seq);
            let has_more = self.store.queue(&self.queue).is_some_and(|stats| stats.last_seq > after);
            if !has_more {
                break;
            }
            let limit = (count - self.read_ahead.len()).min(READ_AHEAD_MESSAGES * 4);
            let messages = self.store.read(&self.queue, after, limit).await?;
            if messages.is_empty() {
                break;
            }
            self.read_ahead.extend(messages);
        }
        Ok(())
    }

    /// Store mode: send nothing; with `auto_forward`, probe every `probe_interval`.
    async fn store_step(&mut self) -> Result<(), StoreError> {
        self.cursor.flush().await;
        let held_by_operator = self.mode.borrow().changed_by == CHANGED_BY_OPERATOR;
        if !self.auto_forward || held_by_operator {
            tokio::select! {
                _ = self.mode.changed() => {}
                _ = self.stop.changed() => {}
                _ = lease_changed(&mut self.lease) => {}
            }
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(self.probe_interval) => {}
            _ = self.mode.changed() => return Ok(()),
            _ = self.stop.changed() => return Ok(()),
            _ = lease_changed(&mut self.lease) => return Ok(()),
        }
        self.take_notices();
        if self.head.is_none() {
            self.head = self.next_head().await?;
        }
        let Some(current) = &self.head else { return Ok(()) };
        let what = current.head.describe();
        match self.attempt().await {
            Attempt::Delivered => {
                let url = self.deliverer.preferred_url().to_string();
                self.set_mode(Mode::Forward, CHANGED_BY_PROBE, &format!("probe delivered {what} to {url}"))
                    .await;
                self.delivered().await
            }
            Attempt::Failed(failure) => self.failed(failure, true).await,
            Attempt::Stopped => Ok(()),
        }
    }

    /// The next thing to deliver: a resubmitted entry first, then the queue.
    async fn next_head(&mut self) -> Result<Option<Current>, StoreError> {
        if self.resubmits_pending {
            let query = FailedQuery {
                route: Some(self.name.clone()),
                status: FailedStatus::Resubmitted,
                after_id: 0,
                limit: 1,
                with_payload: true,
            };
            if let Some(entry) = self.store.failed(query).await?.pop() {
                return Ok(Some(Current { head: Head::Resubmitted(entry), attempts: 0 }));
            }
            self.resubmits_pending = false;
        }
        if self.read_ahead.is_empty() {
            let has_more =
                self.store.queue(&self.queue).is_some_and(|stats| stats.last_seq > self.delivered_through);
            if !has_more {
                return Ok(None);
            }
            let messages =
                self.store.read(&self.queue, self.delivered_through, self.read_ahead_limit).await?;
            if !messages.is_empty() {
                let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
                let average_bytes = (bytes / messages.len()).max(1);
                self.read_ahead_limit = (READ_AHEAD_BYTES / average_bytes).clamp(1, READ_AHEAD_MESSAGES);
            }
            if let Some(first) = messages.first() {
                if first.seq != self.delivered_through + 1 && self.delivered_through != 0 {
                    // Only a route added after messages were released starts past a gap.
                    tracing::warn!(route = %self.name, expected = self.delivered_through + 1, found = first.seq,
                        "route position is behind the oldest stored message; continuing from there");
                }
            }
            self.read_ahead.extend(messages);
        }
        Ok(self.read_ahead.pop_front().map(|m| Current { head: Head::Queued(m), attempts: 0 }))
    }

    fn expired(&self, message: &StoredMessage) -> bool {
        self.message_ttl
            .is_some_and(|ttl| now_unix_ms().saturating_sub(message.accepted_at_ms) > ttl.as_millis() as i64)
    }

    /// One delivery attempt of the head, abandoned if the node stops or the lease runs out first
    /// (CONTRACT 4.5: another central may deliver from then on). Nothing is started once the lease
    /// is gone, even if the loop has not seen it yet, and an outcome that arrives after the lease's
    /// end by this node's clock (say, after the process was frozen) is not acted on: the next
    /// holder delivers that message again, in order.
    async fn attempt(&mut self) -> Attempt {
        if !self.lease.borrow().is_valid() {
            return Attempt::Stopped;
        }
        self.seen = self.mode.borrow().clone();
        let current = self.head.as_ref().expect("attempt needs a head");
        let outgoing = current.head.outgoing();
        let delivery = self.deliverer.deliver(&outgoing, &self.policy);
        tokio::pin!(delivery);
        loop {
            // Renewals move the end while the delivery waits; only a lease that really ran out
            // stops it.
            let lease = *self.lease.borrow();
            if !lease.is_valid() {
                tracing::warn!(route = %self.name, what = %current.head.describe(),
                    "the route's lease ran out during a delivery: abandoning it to the next holder");
                return Attempt::Stopped;
            }
            tokio::select! {
                biased;
                _ = lease_end(lease) => {}
                _ = lease_changed(&mut self.lease) => {}
                _ = self.stop.changed() => return Attempt::Stopped,
                result = &mut delivery => {
                    if !self.lease.borrow().is_valid() {
                        tracing::warn!(route = %self.name, what = %current.head.describe(),
                            "a delivery finished after the route's lease ran out: leaving it to the next holder");
                        return Attempt::Stopped;
                    }
                    return match result {
                        Ok(()) => Attempt::Delivered,
                        Err(failure) => Attempt::Failed(failure),
                    };
                }
            }
        }
    }

    async fn delivered(&mut self) -> Result<(), StoreError> {
        let current = self.head.take().expect("delivered needs a head");
        self.metrics.messages_delivered.get_or_create(&RouteLabel { route: self.name.clone() }).inc();
        match current.head {
            Head::Queued(message) => {
                self.delivered_through = message.seq;
                self.cursor.want(message.seq);
                self.cursor.poll();
                self.singles_after_failed_batch = self.singles_after_failed_batch.saturating_sub(1);
            }
            Head::Resubmitted(entry) => {
                tracing::info!(route = %self.name, id = entry.id, message_id = %entry.message_id, "resubmitted message delivered");
                if let Err(e) = self.store.remove_failed(entry.id).await {
                    // It stays `resubmitted` and is delivered once more later: a repeat, not a loss.
                    tracing::warn!(route = %self.name, id = entry.id, "cannot remove a delivered failed entry: {e}");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Applies the policy to a failed attempt. `probing`: the route is in store mode and this was
    /// the auto-forward probe.
    async fn failed(&mut self, failure: DeliveryFailure, probing: bool) -> Result<(), StoreError> {
        let kind = failure.kind();
        let what = self.head.as_ref().expect("failed needs a head").head.describe();
        if self.policy.classify(kind) == Class::ServiceDown {
            let reason = format!("service_down: {failure}");
            if probing {
                tracing::info!(route = %self.name, "probe: service still down: {failure}");
                self.set_reason(&format!("{reason} (probe)")).await;
            } else {
                tracing::warn!(route = %self.name, %what, "service down, route switches to store mode: {failure}");
                self.set_mode(Mode::Store, CHANGED_BY_SERVICE_DOWN, &reason).await;
            }
            return Ok(());
        }
        if probing {
            // It answered: the service is back, whatever it thinks of this message.
            self.set_mode(
                Mode::Forward,
                CHANGED_BY_PROBE,
                &format!("probe: the service answered ({failure})"),
            )
            .await;
        }
        let current = self.head.as_mut().expect("failed needs a head");
        current.attempts += 1;
        match self.policy.decide(kind, current.attempts, &mut self.jitter) {
            Verdict::RetryAfter(delay) => {
                tracing::debug!(route = %self.name, %what, attempts = current.attempts, ?delay, "delivery failed, retrying: {failure}");
                self.retry_at = Some(Instant::now() + delay);
                Ok(())
            }
            verdict @ (Verdict::FailPoison | Verdict::FailExhausted) => {
                self.fail_head(verdict, Some(failure)).await
            }
            Verdict::StoreRoute => unreachable!("service_down was handled above"),
        }
    }

    /// Moves the head to the failed table. `failure: None` means it expired.
    async fn fail_head(
        &mut self,
        verdict: Verdict,
        failure: Option<DeliveryFailure>,
    ) -> Result<(), StoreError> {
        let current = self.head.as_ref().expect("fail_head needs a head");
        let (reason, last_error) = match &failure {
            Some(failure) => (
                verdict.failure_reason(failure.kind()).expect("a failing verdict has a reason"),
                failure.to_string(),
            ),
            None => (
                "expired".to_string(),
                format!(
                    "the message_ttl of {:?} (limits or [[queue]]) passed before the route reached the message",
                    self.message_ttl.unwrap_or_default()
                ),
            ),
        };
        let what = current.head.describe();
        let attempts = current.attempts;
        match &current.head {
            Head::Queued(message) => {
                let failure = NewFailure {
                    route: self.name.clone(),
                    reader: self.reader.clone(),
                    message: message.clone(),
                    attempts: current.attempts,
                    reason: reason.clone(),
                    last_error: last_error.clone(),
                };
                let id = self.store.fail_message(failure).await?;
                self.singles_after_failed_batch = self.singles_after_failed_batch.saturating_sub(1);
                self.delivered_through = message.seq;
                self.cursor.committed(message.seq);
                tracing::error!(route = %self.name, %what, failed_id = id, attempts = current.attempts, %reason, %last_error,
                    "message failed: it is in /v1/failed until an operator resubmits or discards it");
            }
            Head::Resubmitted(entry) => {
                let still_there = self
                    .store
                    .fail_again(entry.id, current.attempts, reason.clone(), last_error.clone())
                    .await?;
                if still_there {
                    tracing::error!(route = %self.name, %what, attempts = current.attempts, %reason, %last_error,
                        "resubmitted message failed again");
                }
            }
        }
        self.head = None;
        self.retry_at = None;
        self.set_reason(&format!("{reason}: {what} failed after {attempts} attempt(s)")).await;
        refresh_failed_metric(&self.store, &self.metrics, std::iter::once(&self.name)).await;
        Ok(())
    }

    /// Switches the mode, unless someone changed the route since [`Self::seen`].
    async fn set_mode(&mut self, mode: Mode, changed_by: &str, reason: &str) {
        match self.modes.set_mode_if_unchanged(&self.name, &self.seen, mode, changed_by, reason).await {
            Ok(Some(now)) => self.seen = now,
            Ok(None) => {}
            Err(e) => tracing::warn!(route = %self.name, "cannot record the route's mode change: {e}"),
        }
    }

    /// Records the policy's decision, unless someone changed the route since [`Self::seen`].
    async fn set_reason(&mut self, reason: &str) {
        match self.modes.set_reason_if_unchanged(&self.name, &self.seen, reason).await {
            Ok(Some(now)) => self.seen = now,
            Ok(None) => {}
            Err(e) => tracing::warn!(route = %self.name, "cannot record the route's reason: {e}"),
        }
    }
}
