//! The central's operator endpoints: the edge list, "send transition to online" and maintenance.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_core::time::rfc3339_from_unix_ms;
use serde::Deserialize;
use serde_json::json;

use outpost_central::EdgeView;
use outpost_core::time::now_unix_ms;

use super::hub;
use crate::auth::{authorize, Access};
use crate::body::read_bounded as read_body;
use crate::error::ApiError;
use crate::ApiState;

/// The largest `POST /v1/admin/maintenance` body.
const MAX_MAINTENANCE_BODY_BYTES: u64 = 1024;

fn edge_json(edge: &EdgeView, downlink_pending: u64) -> serde_json::Value {
    let report = edge.report.as_ref();
    json!({
        "id": edge.id,
        "state": edge.state(),
        "state_since": report.map(|r| rfc3339_from_unix_ms(r.state_since_ms)),
        "last_seen": edge.last_seen_ms.map(rfc3339_from_unix_ms),
        "upstream_url": report.and_then(|r| r.upstream_url.clone()),
        "backlog_messages": report.map_or(0, |r| r.backlog_messages),
        "offline_log": report.map(|r| r.offline_log.clone()).unwrap_or_default(),
        "connected": edge.connected,
        "version": edge.version,
        "downlink_pending": downlink_pending,
    })
}

/// `GET /v1/edges`: every known or listed edge as it last reported.
pub(crate) async fn list_edges(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let hub = hub(&state)?;
    let pending = hub.downlink_pending();
    let edges: Vec<_> =
        hub.edges().iter().map(|edge| edge_json(edge, pending.get(&edge.id).copied().unwrap_or(0))).collect();
    Ok(Json(edges).into_response())
}

/// `POST /v1/edges/{id}/transition-online`: "send transition to online" to a known edge: 202 with
/// `delivery: "link"` when sent on its open link, `"next_probe"` when held for its next probe.
pub(crate) async fn transition_online(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let hub = hub(&state)?;
    let Path(edge_id) = path.map_err(|e| ApiError::invalid_name(format!("bad edge id in path: {e}")))?;
    outpost_core::validate_name(&edge_id).map_err(|e| ApiError::invalid_name(format!("edge id {e}")))?;
    match hub.request_transition_online(&edge_id).await {
        Ok(delivery) => {
            tracing::info!(edge = %edge_id, delivery = delivery.as_str(), "operator sent transition to online");
            let body = json!({"edge": edge_id, "transition": "requested", "delivery": delivery.as_str()});
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Err(e) => Err(ApiError::not_found(e.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceRequest {
    enabled: bool,
}

/// `POST /v1/admin/maintenance` with `{"enabled": bool}`.
pub(crate) async fn set_maintenance(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let hub = hub(&state)?;
    let body = read_body(&headers, body, MAX_MAINTENANCE_BODY_BYTES, "the request").await?;
    let request: MaintenanceRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"enabled\": true|false}}: {e}")))?;
    hub.set_maintenance(request.enabled, now_unix_ms()).await?;
    Ok(Json(json!({ "maintenance": request.enabled })).into_response())
}
