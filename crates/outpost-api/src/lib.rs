//! The HTTP surface of a node: ingest, reads, status, health, metrics and the console. The only
//! crate that knows HTTP and JSON shapes; everything else it calls through typed handles.

pub mod auth;
mod body;
pub mod central;
mod console;
mod consumers;
pub mod error;
pub mod listener;
mod messages;
mod openapi;
mod query;
mod routes;
mod single_write;
mod status;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use outpost_core::metrics::Metrics;
use outpost_core::status::LinkStatus;
use outpost_core::time::now_unix_ms;
use outpost_core::Config;
use outpost_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

pub use error::ApiError;

/// How many write requests may be reading their bodies or waiting for their commit at once. Bounds
/// the memory held by request bodies; further writers wait for a permit.
pub const MAX_CONCURRENT_WRITES: usize = 1024;

/// Everything the handlers reach, shared by every request as one `Arc<ApiState>` (see [`router`]).
#[derive(Clone)]
pub struct ApiState {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub link: watch::Receiver<LinkStatus>,
    /// Set once the listener serves; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
    pub write_permits: Arc<Semaphore>,
    /// Edge: asks the connectivity task to start a transition to online now.
    pub edge_trigger: Option<mpsc::Sender<()>>,
    /// Central: the edge registry, the connected edges' links and maintenance mode.
    pub central: Option<Arc<outpost_central::CentralHub>>,
    /// Both roles: the routes (modes, failed messages); `None` on a node started without them.
    pub routes: Option<Arc<outpost_forward::route::Routes>>,
}

impl ApiState {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        metrics: Arc<Metrics>,
        link: watch::Receiver<LinkStatus>,
    ) -> ApiState {
        ApiState {
            config,
            store,
            metrics,
            link,
            ready: Arc::new(AtomicBool::new(false)),
            write_permits: Arc::new(Semaphore::new(MAX_CONCURRENT_WRITES)),
            edge_trigger: None,
            central: None,
            routes: None,
        }
    }
}

/// The node's routes.
pub fn router(state: ApiState) -> Router {
    router_with(Arc::new(state))
}

/// The node's routes, sharing `state` (a request's `State` is one reference count).
fn router_with(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/v1/status", get(status::status))
        .route("/v1/queues", get(messages::list_queues))
        .route("/v1/queues/{queue}/messages", post(messages::post_message).get(messages::read_messages))
        .route("/v1/queues/{queue}/batch", post(messages::post_batch))
        .route("/v1/admin/transition-online", post(status::transition_online))
        .merge(console::routes())
        .merge(central::routes())
        .merge(routes::routes())
        .merge(consumers::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    tls: Option<Arc<outpost_tls::ServerTls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ready = state.ready.clone();
    let central = state.central.clone();
    let state_limits = state.config.limits.clone();
    let state = Arc::new(state);
    let app = router_with(state.clone());
    ready.store(true, Ordering::SeqCst);
    let limits = listener::ListenerLimits {
        max_connections: state_limits.max_connections,
        request_timeout: state_limits.request_timeout,
    };
    listener::serve(listener, app, Some(state), limits, tls, async move {
        shutdown.await;
        ready.store(false, Ordering::SeqCst);
        // Edge link streams never end by themselves; graceful shutdown waits for them.
        if let Some(hub) = central {
            hub.close_links();
        }
    })
    .await
}

async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(serde_json::json!({"status": "ok"}))).into_response()
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, axum::Json(serde_json::json!({"status": "ready"}))).into_response()
    } else {
        ApiError::unavailable("not ready: starting or shutting down", 1).into_response()
    }
}

/// `GET /metrics`: the Prometheus text format 0.0.4, or OpenMetrics 1.0 when the request's
/// `Accept` names `application/openmetrics-text` (as Prometheus does when it prefers it).
async fn metrics(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    status::refresh_backlog_metrics(&state);
    if let Some(hub) = &state.central {
        hub.refresh_edge_metrics_now(now_unix_ms());
    }
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            state.metrics.encode_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            state.metrics.encode_prometheus_text(),
        )
            .into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see CONTRACT section 3 for the API")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
}
