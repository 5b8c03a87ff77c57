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
use std::sync::Arc;

use outpost_central::{EdgeQuery, EdgeView, EDGE_STATES};
use outpost_core::time::now_unix_ms;

use super::hub;
use crate::auth::{authorize, Access};
use crate::body::read_bounded as read_body;
use crate::error::ApiError;
use crate::query::{self, QueryPairs};
use crate::ApiState;

/// The largest `limit` of `GET /v1/edges`.
pub const MAX_EDGES_LIMIT: usize = 1000;
/// The header naming the `after` of the next page when more edges match.
pub const NEXT_AFTER_HEADER: &str = "outpost-next-after";

/// The largest `POST /v1/admin/maintenance` body.
const MAX_MAINTENANCE_BODY_BYTES: u64 = 1024;

/// One edge as the central sees it (CONTRACT 5): `state` is the reported state while `connected`,
/// otherwise `offline` with `cause: "link_lost"`; `reported_state` is what the edge last said.
fn edge_json(edge: &EdgeView, downlink_pending: u64) -> serde_json::Value {
    let report = edge.report.as_ref();
    json!({
        "id": edge.id,
        "state": edge.state(),
        "reported_state": edge.reported_state,
        "cause": edge.cause,
        "state_since": edge.state_since_ms.map(rfc3339_from_unix_ms),
        "reported_state_since": report.map(|r| rfc3339_from_unix_ms(r.state_since_ms)),
        "last_seen": edge.last_seen_ms.map(rfc3339_from_unix_ms),
        "upstream_url": report.and_then(|r| r.upstream_url.clone()),
        "backlog_messages": report.map_or(0, |r| r.backlog_messages),
        "offline_log": report.map(|r| r.offline_log.clone()).unwrap_or_default(),
        "connected": edge.connected,
        "version": edge.version,
        "downlink_pending": downlink_pending,
    })
}

/// `GET /v1/edges[?state=S][&limit=N][&after=ID]`: the known or listed edges as they last
/// reported, by id. Without a query, every edge (the answer older clients expect). `state` keeps
/// the edges in that state, `after` starts after that id, `limit` (1 to [`MAX_EDGES_LIMIT`]) cuts
/// the page; when more edges match after it, the answer carries the header `Outpost-Next-After`
/// with the `after` of the next page.
pub(crate) async fn list_edges(
    State(state): State<Arc<ApiState>>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let hub = hub(&state)?;
    let query = parse_edge_query(query::pairs(query)?)?;
    let page = hub.edges_matching_at(&query, now_unix_ms());
    let pending = hub.downlink_pending();
    let edges: Vec<_> =
        page.edges.iter().map(|edge| edge_json(edge, pending.get(&edge.id).copied().unwrap_or(0))).collect();
    let next_after = page.more.then(|| page.edges.last().map(|e| e.id.clone())).flatten();
    let mut response = Json(edges).into_response();
    if let Some(next_after) = next_after {
        let value = axum::http::HeaderValue::from_str(&next_after).expect("edge ids are visible ASCII");
        response.headers_mut().insert(NEXT_AFTER_HEADER, value);
    }
    Ok(response)
}

fn parse_edge_query(pairs: Vec<(String, String)>) -> Result<EdgeQuery, ApiError> {
    let mut parsed = EdgeQuery::default();
    for (name, value) in pairs {
        match name.as_str() {
            "state" => {
                if !EDGE_STATES.contains(&value.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "state={value:?} is not one of {}",
                        EDGE_STATES.join(", ")
                    )));
                }
                parsed.state = Some(value);
            }
            "after" => {
                outpost_core::validate_name(&value)
                    .map_err(|e| ApiError::invalid_name(format!("after={value:?}: edge id {e}")))?;
                parsed.after = Some(value);
            }
            "limit" => {
                let limit: usize = query::number(&name, &value)?;
                if limit == 0 || limit > MAX_EDGES_LIMIT {
                    return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_EDGES_LIMIT}")));
                }
                parsed.limit = Some(limit);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}; GET /v1/edges takes state, after and limit"
                )))
            }
        }
    }
    Ok(parsed)
}

/// `GET /v1/edges/{id}`: one edge, shaped as in the list; 404 if it is neither known nor listed.
pub(crate) async fn get_edge(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let hub = hub(&state)?;
    let Path(edge_id) = path.map_err(|e| ApiError::invalid_name(format!("bad edge id in path: {e}")))?;
    outpost_core::validate_name(&edge_id).map_err(|e| ApiError::invalid_name(format!("edge id {e}")))?;
    let edge = hub.edge_at(&edge_id, now_unix_ms()).ok_or_else(|| {
        ApiError::not_found(format!(
            "edge {edge_id:?} is neither known to this central nor listed in [[edge]]"
        ))
    })?;
    let pending = hub.downlink_pending().get(&edge_id).copied().unwrap_or(0);
    Ok(Json(edge_json(&edge, pending)).into_response())
}

/// `POST /v1/edges/{id}/transition-online`: "send transition to online" to a known edge: 202 with
/// `delivery: "link"` when sent on its open link, `"next_probe"` when held for its next probe.
pub(crate) async fn transition_online(
    State(state): State<Arc<ApiState>>,
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
    State(state): State<Arc<ApiState>>,
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
