//! The cluster follower of a node's routes: what other centrals do to routes (a mode changed,
//! entries resubmitted) reaches this node's [`RouteModes`](super::modes::RouteModes) and route
//! tasks through cluster events, with a periodic re-read that repairs a missed event.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::modes::ROUTE_MODE_EVENT;
use super::{Routes, ROUTE_RESUBMITTED_EVENT};

/// How often the cluster follower re-reads every route's mode document and looks for resubmitted
/// entries, whatever the events said (an event is lost while a central's listener reconnects).
const CLUSTER_RESYNC_INTERVAL: Duration = Duration::from_secs(5);

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
pub(super) async fn follow_cluster(
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
