//! The central's downlink endpoints (CONTRACT section 9): a message or an NDJSON batch for one edge
//! or for every edge, and what waits for an edge. The bodies, headers and limits are those of
//! section 3's writes; the hub stores them.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_core::time::now_unix_ms;
use serde_json::json;
use std::sync::Arc;

use super::hub;
use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::messages::{idempotency_key, read_batch, read_single, Incoming};
use crate::ApiState;

fn edge_and_queue(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    let Path((edge, queue)) =
        path.map_err(|e| ApiError::invalid_name(format!("bad edge or queue in path: {e}")))?;
    outpost_core::validate_name(&edge).map_err(|e| ApiError::invalid_name(format!("edge id {e}")))?;
    outpost_core::validate_name(&queue).map_err(|e| ApiError::invalid_name(format!("queue {e}")))?;
    Ok((edge, queue))
}

async fn post_for_edge(
    state: Arc<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
    batch: bool,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Client)?;
    let hub = hub(&state)?;
    let (edge, queue) = edge_and_queue(path)?;
    // An edge that is not listed is refused before the body is read.
    hub.check_downlink_target(&edge)?;
    let incoming = read(&state, &headers, body, batch).await?;
    let count = incoming.messages.len();
    let appended = hub.post_downlink(&edge, &queue, incoming.messages, incoming.key).await?;
    let status = if appended.duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
    let body = if batch {
        json!({"edge": edge, "queue": queue, "count": count, "first_seq": appended.first_seq, "last_seq": appended.last_seq})
    } else {
        json!({"id": appended.ids[0], "edge": edge, "queue": queue, "seq": appended.first_seq})
    };
    Ok((status, Json(body)).into_response())
}

async fn read(state: &ApiState, headers: &HeaderMap, body: Body, batch: bool) -> Result<Incoming, ApiError> {
    if batch {
        let key = idempotency_key(headers)?;
        let incoming = read_batch(state, headers, body).await?;
        Ok(Incoming { key, ..incoming })
    } else {
        read_single(state, headers, body).await
    }
}

/// `POST /v1/edges/{id}/queues/{queue}/messages`.
pub(crate) async fn post_message(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    post_for_edge(state, path, headers, body, false).await
}

/// `POST /v1/edges/{id}/queues/{queue}/batch`.
pub(crate) async fn post_batch(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    post_for_edge(state, path, headers, body, true).await
}

async fn broadcast(
    state: Arc<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
    batch: bool,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Client)?;
    let hub = hub(&state)?;
    let queue = crate::messages::queue_name(path)?;
    let incoming = read(&state, &headers, body, batch).await?;
    let messages = incoming.messages.len();
    let edges = hub.broadcast_downlink(&queue, incoming.messages, incoming.key).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"count": edges, "queue": queue, "messages": messages})))
        .into_response())
}

/// `POST /v1/broadcast/queues/{queue}/messages`: answers `{"count": edges}`.
pub(crate) async fn broadcast_message(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    broadcast(state, path, headers, body, false).await
}

/// `POST /v1/broadcast/queues/{queue}/batch`.
pub(crate) async fn broadcast_batch(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    broadcast(state, path, headers, body, true).await
}

/// `GET /v1/edges/{id}/downlink`: `[{"queue","pending","oldest_age_seconds","delivered_seq"}]`.
pub(crate) async fn edge_downlink(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let hub = hub(&state)?;
    let Path(edge) = path.map_err(|e| ApiError::invalid_name(format!("bad edge id in path: {e}")))?;
    outpost_core::validate_name(&edge).map_err(|e| ApiError::invalid_name(format!("edge id {e}")))?;
    let queues = hub.downlink(&edge);
    if queues.is_empty() && hub.edge(&edge).is_none() {
        return Err(ApiError::not_found(format!(
            "no edge {edge:?} is known to this central and nothing waits for it"
        )));
    }
    let now_ms = now_unix_ms();
    let body: Vec<_> = queues
        .iter()
        .map(|q| {
            json!({
                "queue": q.queue,
                "pending": q.pending,
                "oldest_age_seconds": q.oldest_pending_at_ms.map_or(0.0, |at| (now_ms - at).max(0) as f64 / 1000.0),
                "delivered_seq": q.delivered_seq,
                "last_seq": q.last_seq,
            })
        })
        .collect();
    Ok(Json(body).into_response())
}
