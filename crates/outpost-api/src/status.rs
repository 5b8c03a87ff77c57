//! `GET /v1/status` and the backlog gauges: what this node is, its state and what it holds.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_core::metrics::QueueLabel;
use outpost_core::time::{now_unix_ms, rfc3339_from_unix_ms};
use serde_json::json;
use std::sync::Arc;

use outpost_forward::pacing::{
    describe_drain, drain_estimates, drain_seconds, unforwarded_bytes, QueueDrain,
};
use outpost_forward::UPSTREAM_READER;

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::ApiState;

pub async fn status(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let mut link = state.link.borrow().clone();
    if let Some(hub) = state.central.as_ref().filter(|hub| hub.maintenance()) {
        link.state = "maintenance".into();
        link.state_since_ms = hub.maintenance_since_ms();
    }
    let now_ms = now_unix_ms();
    // Downlink messages waiting at a central are shown per edge (`GET /v1/edges`), not as backlog.
    let mut queues = state.store.queue_stats();
    queues.retain(|q| !outpost_central::is_downlink_queue(&q.name));
    let backlog_messages: u64 = queues.iter().map(|q| q.messages).sum();
    let backlog_bytes: u64 = queues.iter().map(|q| q.bytes).sum();
    let oldest = queues.iter().filter_map(|q| q.oldest_accepted_at_ms).min();
    let drain = drain_view(&state, &link);
    Ok(Json(json!({
        "node_id": state.config.node_id,
        "role": state.config.role.as_str(),
        "version": outpost_core::VERSION,
        "state": link.state,
        "state_since": rfc3339_from_unix_ms(link.state_since_ms),
        "upstream": link.upstream,
        "last_ping_at": link.last_ping_at_ms.map(rfc3339_from_unix_ms),
        "backlog": {
            "messages": backlog_messages,
            "bytes": backlog_bytes,
            "oldest_age_seconds": oldest.map(|at| (now_ms - at).max(0) as f64 / 1000.0).unwrap_or(0.0),
            "unforwarded_bytes": drain.as_ref().map(|d| d.unforwarded_bytes),
            "forward_rate_bytes_per_second": link.forward_rate_bytes_per_second,
            "drain_seconds": drain.as_ref().and_then(|d| d.seconds),
            "drain": drain.as_ref().and_then(|d| d.text.clone()),
        },
        "offline_log": link.offline_log,
    }))
    .into_response())
}

/// Copies the store's queue sizes into the backlog gauges; called at every scrape so the gauges
/// cost nothing on the write path.
pub fn refresh_backlog_metrics(state: &ApiState) {
    let now_ms = now_unix_ms();
    let metrics = &state.metrics;
    for q in state.store.queue_stats().into_iter().filter(|q| !outpost_central::is_downlink_queue(&q.name)) {
        let label = QueueLabel { queue: q.name.clone() };
        metrics.backlog_messages.get_or_create(&label).set(q.messages as i64);
        metrics.backlog_bytes.get_or_create(&label).set(q.bytes as i64);
        let age_seconds = q.oldest_accepted_at_ms.map(|at| (now_ms - at).max(0) / 1000).unwrap_or(0);
        metrics.backlog_oldest_age_seconds.get_or_create(&label).set(age_seconds);
    }
    let link = state.link.borrow().clone();
    metrics.set_edge_state(&link.state);
    let rate = link.forward_rate_bytes_per_second.map(|r| r as f64);
    for (queue, seconds) in drain_estimates(&queue_drains(state), rate) {
        if let Some(seconds) = seconds {
            metrics.backlog_drain_seconds.get_or_create(&QueueLabel { queue }).set(seconds);
        }
    }
}

/// An edge's forwarding backlog and when it will be through.
struct DrainView {
    unforwarded_bytes: u64,
    seconds: Option<f64>,
    /// "~4 min at 310 kB/s"
    text: Option<String>,
}

/// Each queue's bytes not yet forwarded (an edge with a central; empty otherwise).
fn queue_drains(state: &ApiState) -> Vec<QueueDrain> {
    if state.config.role != outpost_core::Role::Edge || state.config.upstreams.is_empty() {
        return Vec::new();
    }
    state
        .store
        .queue_stats()
        .into_iter()
        .map(|q| {
            let cursor = state.store.cursor(&q.name, UPSTREAM_READER);
            QueueDrain {
                priority: state.config.queue_priority(&q.name),
                unforwarded_bytes: unforwarded_bytes(q.messages, q.bytes, q.first_seq, q.last_seq, cursor),
                queue: q.name,
            }
        })
        .collect()
}

fn drain_view(state: &ApiState, link: &outpost_core::status::LinkStatus) -> Option<DrainView> {
    if state.config.role != outpost_core::Role::Edge || state.config.upstreams.is_empty() {
        return None;
    }
    let unforwarded_bytes: u64 = queue_drains(state).iter().map(|q| q.unforwarded_bytes).sum();
    let rate = link.forward_rate_bytes_per_second.filter(|r| *r > 0).map(|r| r as f64);
    let seconds = drain_seconds(unforwarded_bytes, rate);
    let text = match (seconds, rate) {
        (Some(s), Some(r)) if unforwarded_bytes > 0 => Some(describe_drain(s, r)),
        _ => None,
    };
    Some(DrainView { unforwarded_bytes, seconds, text })
}

/// `POST /v1/admin/transition-online` (edge): start a transition to online now, ignoring
/// `failed_transition_wait`.
pub async fn transition_online(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let Some(trigger) = &state.edge_trigger else {
        return Err(ApiError::not_found(
            "only an edge with a configured upstream has a transition to online",
        ));
    };
    trigger
        .send(())
        .await
        .map_err(|_| ApiError::unavailable("the connectivity task is not running (shutting down?)", 5))?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(json!({"transition": "requested"}))).into_response())
}
