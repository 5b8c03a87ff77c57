//! Routes and failed messages over HTTP (CONTRACT section 3): `GET /v1/routes`,
//! `POST /v1/routes/{name}/store|forward`, `GET /v1/failed`, `POST /v1/failed/{id}/resubmit`,
//! `POST /v1/failed/resubmit`, `GET /v1/failed/{id}` (one entry with its payload, an extension the
//! console uses), `DELETE /v1/failed/{id}`. Every endpoint needs an admin token.
//! The work is done by [`outpost_forward::route::Routes`]; this module only speaks JSON.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use outpost_core::time::rfc3339_from_unix_ms;
use outpost_forward::route::modes::{Mode, RouteError};
use outpost_forward::route::{RouteView, Routes};
use outpost_store::{FailedEntry, FailedSelector};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::query::{self, QueryPairs};
use crate::ApiState;

/// The default and the largest `limit` of `GET /v1/failed`.
pub const DEFAULT_FAILED_LIMIT: usize = 100;
pub const MAX_FAILED_LIMIT: usize = outpost_store::failed::MAX_FAILED_LIST_LIMIT;
/// The longest operator reason kept with a mode change.
pub const MAX_REASON_CHARS: usize = 1000;
/// The largest JSON body of the route and failed endpoints (10,000 ids fit comfortably).
const MAX_BODY_BYTES: usize = 256 << 10;

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/routes", get(list_routes))
        .route("/v1/routes/{name}/store", post(store_route))
        .route("/v1/routes/{name}/forward", post(forward_route))
        .route("/v1/failed", get(list_failed))
        .route("/v1/failed/resubmit", post(resubmit_many))
        .route("/v1/failed/{id}/resubmit", post(resubmit_one))
        .route("/v1/failed/{id}", get(show_failed).delete(discard))
}

impl From<RouteError> for ApiError {
    fn from(error: RouteError) -> ApiError {
        match error {
            RouteError::UnknownRoute(_) => ApiError::not_found(format!("{error}; GET /v1/routes lists them")),
            RouteError::Store(e) => ApiError::from(e),
        }
    }
}

/// The node's routes; a node started without them (tests of other parts) has none.
fn routes_of(state: &ApiState) -> Option<&Routes> {
    state.routes.as_deref()
}

fn unknown_route(name: &str) -> ApiError {
    ApiError::from(RouteError::UnknownRoute(name.to_string()))
}

fn route_json(view: &RouteView) -> Value {
    json!({
        "name": view.name,
        "queue": view.queue,
        "mode": view.mode.mode.as_str(),
        "mode_since": rfc3339_from_unix_ms(view.mode.mode_since_ms),
        "changed_by": view.mode.changed_by,
        "reason": view.mode.reason,
        "backlog": view.backlog,
        "failed": view.failed,
    })
}

fn failed_json(entry: &FailedEntry) -> Value {
    // A downlink message that expired at the central: its queue as the client named it, and the edge.
    let (edge, queue) = match outpost_central::parse_downlink_queue(&entry.queue) {
        Some((edge, queue)) => (Some(edge), queue),
        None => (None, entry.queue.as_str()),
    };
    let mut json = json!({
        "id": entry.id,
        "message_id": entry.message_id,
        "route": entry.route,
        "queue": queue,
        "seq": entry.seq,
        "attempts": entry.attempts,
        "reason": entry.reason,
        "last_error": entry.last_error,
        "first_failed_at": rfc3339_from_unix_ms(entry.first_failed_at_ms),
        "last_failed_at": rfc3339_from_unix_ms(entry.last_failed_at_ms),
    });
    if let Some(edge) = edge {
        json["edge"] = json!(edge);
    }
    if let Some(consumer) = outpost_store::consumers::consumer_of_route(&entry.route) {
        json["consumer"] = json!(consumer);
    }
    json
}

async fn list_routes(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let Some(routes) = routes_of(&state) else { return Ok(Json(json!([])).into_response()) };
    let views = routes.list().await?;
    Ok(Json(views.iter().map(route_json).collect::<Vec<_>>()).into_response())
}

async fn store_route(
    state: State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    switch_route(state, path, headers, body, Mode::Store).await
}

async fn forward_route(
    state: State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    switch_route(state, path, headers, body, Mode::Forward).await
}

/// Optional body `{"reason": "…"}`; without one the reason says an operator asked.
async fn switch_route(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let Path(name) = path.map_err(|e| ApiError::invalid_name(format!("bad route name in path: {e}")))?;
    outpost_core::validate_name(&name).map_err(|e| ApiError::invalid_name(format!("route {e}")))?;
    let reason = match json_body(&headers, body).await? {
        None => format!("{} requested through the API", mode.as_str()),
        Some(value) => match value.get("reason") {
            None | Some(Value::Null) => format!("{} requested through the API", mode.as_str()),
            Some(Value::String(reason)) if reason.chars().count() <= MAX_REASON_CHARS => reason.clone(),
            Some(Value::String(_)) => {
                return Err(ApiError::bad_request(format!(
                    "reason is longer than {MAX_REASON_CHARS} characters"
                )))
            }
            Some(_) => return Err(ApiError::bad_request("reason must be a string")),
        },
    };
    let routes = routes_of(&state).ok_or_else(|| unknown_route(&name))?;
    let view = routes.set_mode(&name, mode, &reason).await?;
    Ok(Json(route_json(&view)).into_response())
}

/// `GET /v1/failed?route=R&limit=100&after_id=0` (`after_id` pages by entry id; `R` may be
/// `consumer:<name>`, `:` percent-escaped or not).
async fn list_failed(
    State(state): State<Arc<ApiState>>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let mut route = None;
    let mut limit = DEFAULT_FAILED_LIMIT;
    let mut after_id = 0i64;
    for (name, value) in query::pairs(query)? {
        match name.as_str() {
            "route" => {
                validate_failed_route(&value)?;
                route = Some(value);
            }
            "limit" => {
                limit =
                    value.parse().ok().filter(|l| (1..=MAX_FAILED_LIMIT).contains(l)).ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be 1 to {MAX_FAILED_LIMIT}"))
                    })?;
            }
            "after_id" => after_id = query::number(&name, &value)?,
            other => return Err(query::unknown(other)),
        }
    }
    let Some(routes) = routes_of(&state) else {
        return match route {
            Some(name) => Err(unknown_route(&name)),
            None => Ok(Json(json!([])).into_response()),
        };
    };
    let entries = routes.failed(route.as_deref(), after_id, limit).await?;
    Ok(Json(entries.iter().map(failed_json).collect::<Vec<_>>()).into_response())
}

/// The route a failed-list filter or a bulk resubmit names: a route, or a pull consumer as
/// `consumer:<name>`.
fn validate_failed_route(route: &str) -> Result<(), ApiError> {
    let name = outpost_store::consumers::consumer_of_route(route).unwrap_or(route);
    outpost_core::validate_name(name).map_err(|e| ApiError::invalid_name(format!("route {e}")))
}

/// A failed entry id from the path; one that is not a number names no entry.
fn entry_id(path: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let text = path.map(|Path(id)| id).unwrap_or_default();
    text.parse::<i64>().map_err(|_| ApiError::not_found(format!("no failed entry {text:?}")))
}

async fn resubmit_one(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let id = entry_id(path)?;
    let routes = routes_of(&state).ok_or_else(|| ApiError::not_found(format!("no failed entry {id}")))?;
    let outcome = routes.resubmit(FailedSelector::Ids(vec![id])).await?;
    if !outcome.unknown.is_empty() {
        return Err(ApiError::not_found(format!("no failed entry {id}")));
    }
    Ok(Json(json!({"id": id, "status": "resubmitted"})).into_response())
}

/// Body `{"route": R}` (every failed entry of R) or `{"ids": [..]}` (all of them, or none if one is
/// unknown).
async fn resubmit_many(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let body = json_body(&headers, body)
        .await?
        .ok_or_else(|| ApiError::bad_request(r#"send {"route": "R"} or {"ids": [..]}"#))?;
    let selector = match (body.get("route"), body.get("ids")) {
        (Some(Value::String(route)), None) => {
            validate_failed_route(route)?;
            FailedSelector::Route(route.clone())
        }
        (None, Some(Value::Array(ids))) => {
            if ids.len() > outpost_store::failed::MAX_RESUBMIT_IDS {
                return Err(ApiError::bad_request(format!(
                    "at most {} ids per request",
                    outpost_store::failed::MAX_RESUBMIT_IDS
                )));
            }
            let parsed: Option<Vec<i64>> = ids
                .iter()
                .map(|id| match id {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                })
                .collect();
            FailedSelector::Ids(
                parsed.ok_or_else(|| ApiError::bad_request("ids must be entry ids (numbers)"))?,
            )
        }
        _ => return Err(ApiError::bad_request(r#"send exactly one of {"route": "R"} or {"ids": [..]}"#)),
    };
    let Some(routes) = routes_of(&state) else {
        return Err(match selector {
            FailedSelector::Route(route) => unknown_route(&route),
            FailedSelector::Ids(_) => ApiError::not_found("no failed entries on a node without routes"),
        });
    };
    let outcome = routes.resubmit(selector).await?;
    if !outcome.unknown.is_empty() {
        return Err(ApiError::not_found(format!(
            "no failed entries {:?}; nothing was resubmitted",
            outcome.unknown
        )));
    }
    let ids: Vec<i64> = outcome.resubmitted.iter().map(|(id, _)| *id).collect();
    Ok(Json(json!({"resubmitted": ids.len(), "ids": ids})).into_response())
}

/// `GET /v1/failed/{id}`: one failed entry with the message's origin, content type, acceptance
/// time and payload (`payload_base64`).
async fn show_failed(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let id = entry_id(path)?;
    let routes = routes_of(&state).ok_or_else(|| ApiError::not_found(format!("no failed entry {id}")))?;
    let entry = routes
        .failed_with_payload(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no failed entry {id}")))?;
    let mut json = failed_json(&entry);
    json["origin"] = json!(entry.origin);
    json["origin_seq"] = json!(entry.origin_seq);
    json["content_type"] = json!(entry.content_type);
    json["accepted_at"] = json!(rfc3339_from_unix_ms(entry.accepted_at_ms));
    let payload = entry.payload.as_deref().unwrap_or_default();
    json["payload_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(payload));
    Ok(Json(json).into_response())
}

async fn discard(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let id = entry_id(path)?;
    let routes = routes_of(&state).ok_or_else(|| ApiError::not_found(format!("no failed entry {id}")))?;
    if !routes.discard(id).await? {
        return Err(ApiError::not_found(format!("no failed entry {id}")));
    }
    Ok(Json(json!({"id": id, "discarded": true})).into_response())
}

/// An optional JSON object body of at most [`MAX_BODY_BYTES`]: `None` when empty.
async fn json_body(headers: &HeaderMap, body: Body) -> Result<Option<Value>, ApiError> {
    let body = crate::body::read_bounded(headers, body, MAX_BODY_BYTES as u64, "the body").await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(value @ Value::Object(_)) => Ok(Some(value)),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}
