//! Pull consumers over HTTP (CONTRACT section 9): `POST /v1/queues/{queue}/consumers/{name}/lease`,
//! `…/ack`, `…/nack`, `GET /v1/queues/{queue}/consumers`, `DELETE /v1/queues/{queue}/consumers/{name}`.
//! Leasing, acknowledging and giving back take a client token (applications consume); listing and
//! deleting take an admin token. The work is the store's ([`outpost_store::consumers`]); this module
//! only speaks JSON.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use outpost_core::time::{now_unix_ms, rfc3339_from_unix_ms};
use outpost_store::consumers::{self, ConsumerView, Settle, MAX_SETTLE_IDS, MAX_VISIBILITY_MS};
use serde_json::{json, Value};
use std::sync::Arc;

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::messages::queue_name;
use crate::ApiState;

/// The largest JSON body of the consumer endpoints (10,000 lease ids fit).
const MAX_BODY_BYTES: u64 = 1 << 20;

pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/queues/{queue}/consumers", get(list))
        .route("/v1/queues/{queue}/consumers/{name}", axum::routing::delete(delete))
        .route("/v1/queues/{queue}/consumers/{name}/lease", post(lease))
        .route("/v1/queues/{queue}/consumers/{name}/ack", post(ack))
        .route("/v1/queues/{queue}/consumers/{name}/nack", post(nack))
}

fn names(path: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    let Path((queue, name)) = path.map_err(|e| ApiError::invalid_name(format!("bad name in path: {e}")))?;
    outpost_core::validate_name(&queue).map_err(|e| ApiError::invalid_name(format!("queue {e}")))?;
    outpost_core::validate_name(&name).map_err(|e| ApiError::invalid_name(format!("consumer {e}")))?;
    Ok((queue, name))
}

fn known_queue(state: &ApiState, queue: &str) -> Result<(), ApiError> {
    match state.store.queue(queue) {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found(format!(
            "no queue named {queue:?}; a queue exists once a message was posted to it"
        ))),
    }
}

/// An optional JSON object body: `Value::Null` when empty.
async fn json_body(headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let body = crate::body::read_bounded(headers, body, MAX_BODY_BYTES, "the body").await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}

/// A duration field: `"30s"`, `"5m"`, `"1500ms"`, or a number of seconds. `None` when absent.
fn duration_ms(body: &Value, field: &str) -> Result<Option<i64>, ApiError> {
    let bad = || ApiError::bad_request(format!("{field} must be a duration such as \"30s\" (at most 12h)"));
    let ms = match body.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => {
            outpost_core::units::parse_duration(text).map_err(|_| bad())?.as_millis().min(i64::MAX as u128)
                as i64
        }
        Some(Value::Number(n)) => {
            let seconds = n.as_f64().filter(|s| s.is_finite() && *s >= 0.0).ok_or_else(bad)?;
            (seconds * 1000.0).min(i64::MAX as f64) as i64
        }
        Some(_) => return Err(bad()),
    };
    Ok(Some(ms))
}

fn count(body: &Value, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{field} must be a positive whole number"))),
    }
}

/// `POST /v1/queues/{queue}/consumers/{name}/lease`, body `{"max":100,"visibility":"30s","max_deliveries":10}`
/// (every field optional).
async fn lease(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Client)?;
    let (queue, name) = names(path)?;
    let body = json_body(&headers, body).await?;
    let request = consumers::lease_request(
        count(&body, "max")?,
        duration_ms(&body, "visibility")?,
        count(&body, "max_deliveries")?,
    )
    .map_err(ApiError::bad_request)?;
    // No queue check: a first lease creates the queue, so the consumer is in place before the
    // first message arrives.
    let leased = state.store.consumer_lease(&queue, &name, request).await?;
    let engine = base64::engine::general_purpose::STANDARD;
    let messages: Vec<Value> = leased
        .into_iter()
        .map(|l| {
            let m = l.message;
            json!({
                "id": m.id,
                "seq": m.seq,
                "origin": m.origin,
                "origin_seq": m.origin_seq,
                "content_type": m.content_type,
                "payload_base64": engine.encode(&m.payload),
                "accepted_at": rfc3339_from_unix_ms(m.accepted_at_ms),
                "lease_id": l.lease_id,
                "deliveries": l.deliveries,
            })
        })
        .collect();
    Ok(Json(json!({ "messages": messages })).into_response())
}

fn lease_ids(body: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::bad_request(r#"send {"lease_ids": ["…", …]} with the lease ids of a lease"#);
    let ids = body.get("lease_ids").and_then(Value::as_array).ok_or_else(bad)?;
    if ids.len() > MAX_SETTLE_IDS {
        return Err(ApiError::bad_request(format!("at most {MAX_SETTLE_IDS} lease ids per request")));
    }
    ids.iter().map(|id| id.as_str().map(str::to_string).ok_or_else(bad)).collect()
}

async fn settle(
    state: Arc<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
    nack: bool,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Client)?;
    let (queue, name) = names(path)?;
    let body = json_body(&headers, body).await?;
    let ids = lease_ids(&body)?;
    let settle = if nack {
        let delay_ms = duration_ms(&body, "delay")?.unwrap_or(0);
        if delay_ms > MAX_VISIBILITY_MS {
            return Err(ApiError::bad_request("delay must be at most 12h"));
        }
        Settle::Nack { delay_ms }
    } else {
        Settle::Ack
    };
    let outcome = state.store.consumer_settle(&queue, &name, ids, settle).await?;
    if !outcome.consumer_exists {
        return Err(ApiError::not_found(format!("queue {queue:?} has no consumer named {name:?}")));
    }
    let mut answer = serde_json::Map::new();
    answer.insert(if nack { "nacked" } else { "acked" }.to_string(), json!(outcome.settled));
    answer.insert("stale".to_string(), json!(outcome.stale));
    Ok(Json(Value::Object(answer)).into_response())
}

/// `POST …/ack`, body `{"lease_ids":[…]}`.
async fn ack(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    settle(state, path, headers, body, false).await
}

/// `POST …/nack`, body `{"lease_ids":[…],"delay":"5s"}` (no delay: visible again at once).
async fn nack(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    settle(state, path, headers, body, true).await
}

pub(crate) fn consumer_json(view: &ConsumerView) -> Value {
    json!({
        "name": view.name,
        "position": view.position,
        "leased": view.leased,
        "pending": view.pending,
        "deliveries_max": view.deliveries_max,
        "created_at": rfc3339_from_unix_ms(view.created_at_ms),
        "last_active_at": rfc3339_from_unix_ms(view.last_active_at_ms),
    })
}

/// `GET /v1/queues/{queue}/consumers`.
async fn list(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let queue = queue_name(path)?;
    known_queue(&state, &queue)?;
    let views = state.store.consumers(&queue, now_unix_ms()).await?;
    Ok(Json(views.iter().map(consumer_json).collect::<Vec<_>>()).into_response())
}

/// `DELETE /v1/queues/{queue}/consumers/{name}`.
async fn delete(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let (queue, name) = names(path)?;
    if !state.store.consumer_delete(&queue, &name).await? {
        return Err(ApiError::not_found(format!("queue {queue:?} has no consumer named {name:?}")));
    }
    tracing::info!(queue = %queue, consumer = %name, "consumer deleted");
    Ok(Json(json!({ "queue": queue, "name": name, "deleted": true })).into_response())
}
