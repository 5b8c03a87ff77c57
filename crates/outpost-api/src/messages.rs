//! Ingest (`POST …/messages`, `POST …/batch`) and reads (`GET /v1/queues`, `GET …/messages`).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use outpost_core::metrics::QueueLabel;
use outpost_core::time::{now_unix_ms, rfc3339_from_unix_ms};
use outpost_store::NewMessage;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::query::{self, QueryPairs};
use crate::ApiState;

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// The default and the largest `limit` of a message read.
pub const DEFAULT_READ_LIMIT: usize = 100;
pub const MAX_READ_LIMIT: usize = 1000;
/// About the most payload bytes one read answers with (always at least one message): a thousand
/// messages of 1 MiB would otherwise be read into memory, then base64-encoded into one answer.
pub const MAX_READ_BYTES: usize = 16 << 20;

const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

pub(crate) fn queue_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(queue) = path.map_err(|e| ApiError::invalid_name(format!("bad queue name in path: {e}")))?;
    valid_queue_name(&queue)?;
    Ok(queue)
}

pub(crate) fn valid_queue_name(queue: &str) -> Result<(), ApiError> {
    outpost_core::validate_name(queue).map_err(|e| ApiError::invalid_name(format!("queue {e}")))
}

pub(crate) fn check_writes_allowed(state: &ApiState) -> Result<(), ApiError> {
    if let Some(seconds) = state.link.borrow().writes_blocked_retry_after_seconds {
        return Err(ApiError::unavailable(
            "writes are blocked while this edge changes its online state (block_during_transition = true); retry shortly",
            seconds,
        ));
    }
    Ok(())
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key =
        value.to_str().map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?.trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} characters"
        )));
    }
    Ok(Some(key.to_string()))
}

fn content_type(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(DEFAULT_CONTENT_TYPE.to_string()),
        Some(v) => v
            .to_str()
            .map(str::to_string)
            .map_err(|_| ApiError::bad_request("Content-Type must be visible ASCII")),
    }
}

/// A write's messages as read from its request, with the write permit held until it is answered.
pub(crate) struct Incoming {
    pub messages: Vec<NewMessage>,
    pub key: Option<String>,
    pub _permit: OwnedSemaphorePermit,
}

/// A single-message write's headers, checked before its body is read.
pub(crate) struct SingleHead {
    pub key: Option<String>,
    pub content_type: String,
}

/// Reads a single-message write's `Idempotency-Key` and `Content-Type`.
pub(crate) fn single_head(headers: &HeaderMap) -> Result<SingleHead, ApiError> {
    Ok(SingleHead { key: idempotency_key(headers)?, content_type: content_type(headers)? })
}

/// Reads a single-message write: `Idempotency-Key`, `Content-Type` and the payload within
/// `limits.max_message_bytes`.
pub(crate) async fn read_single(
    state: &ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Incoming, ApiError> {
    let head = single_head(headers)?;
    // The body first, then the write permit: a client that stops sending holds no permit (its
    // body has `limits.request_timeout` to arrive), so it cannot starve the other writers.
    let payload =
        crate::body::read_bounded(headers, body, state.config.limits.max_message_bytes, "the message")
            .await?;
    single_incoming(state, head, payload).await
}

/// A single write whose payload is read, once it holds a write permit.
pub(crate) async fn single_incoming(
    state: &ApiState,
    head: SingleHead,
    payload: Bytes,
) -> Result<Incoming, ApiError> {
    let permit = write_permit(state).await?;
    let message = NewMessage { payload, content_type: head.content_type, origin: None, id: None };
    Ok(Incoming { messages: vec![message], key: head.key, _permit: permit })
}

/// Reads an NDJSON batch write (all or nothing: one payload per non-empty line, within the limits);
/// the caller reads an `Idempotency-Key` if it takes one.
pub(crate) async fn read_batch(
    state: &ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Incoming, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.trim_start().starts_with("application/x-ndjson") {
        return Err(ApiError::bad_request(format!(
            "a batch needs `Content-Type: application/x-ndjson` (one message per line), got {content_type:?}"
        )));
    }
    let limits = &state.config.limits;
    // The body first, then the write permit (see `read_single`).
    let body = crate::body::read_bounded(headers, body, limits.max_batch_body_bytes(), "the batch").await?;
    let permit = write_permit(state).await?;

    let mut messages = Vec::new();
    for line in split_lines(&body) {
        if messages.len() as u64 >= u64::from(limits.max_batch_messages) {
            return Err(ApiError::too_large(format!(
                "the batch has more than limits.max_batch_messages = {} messages",
                limits.max_batch_messages
            )));
        }
        if line.len() as u64 > limits.max_message_bytes {
            return Err(ApiError::too_large(format!(
                "message {} of the batch is {} bytes, over limits.max_message_bytes = {}",
                messages.len() + 1,
                line.len(),
                limits.max_message_bytes
            )));
        }
        messages.push(NewMessage {
            payload: line,
            content_type: "application/json".into(),
            origin: None,
            id: None,
        });
    }
    if messages.is_empty() {
        return Err(ApiError::bad_request("the batch holds no message: send one payload per non-empty line"));
    }
    Ok(Incoming { messages, key: None, _permit: permit })
}

async fn write_permit(state: &ApiState) -> Result<OwnedSemaphorePermit, ApiError> {
    state.write_permits.clone().acquire_owned().await.map_err(|_| ApiError::unavailable("shutting down", 5))
}

pub async fn post_message(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Client)?;
    let queue = queue_name(path)?;
    check_writes_allowed(&state)?;
    let incoming = read_single(&state, &headers, body).await?;
    let (status, answer) = store_single(&state, queue, incoming).await?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], answer).into_response())
}

/// Stores a single write's message and counts it: the status (202, or 200 for a repeated
/// idempotency key) and the JSON of the answer. Shared by [`post_message`] and the listener's
/// single-write lane (`crate::single_write`), so both answer alike.
pub(crate) async fn store_single(
    state: &ApiState,
    queue: String,
    incoming: Incoming,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let appended = state.store.append(&queue, incoming.messages, incoming.key).await?;
    let status = if appended.duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
    let answer =
        serde_json::to_vec(&Accepted { id: &appended.ids[0], queue: &queue, seq: appended.first_seq })
            .map_err(|e| ApiError::internal(format!("cannot encode the answer: {e}")))?;
    if !appended.duplicate {
        state.metrics.messages_accepted.get_or_create(&QueueLabel { queue }).inc();
    }
    Ok((status, answer))
}

/// The answer to a single-message write, serialized without building a `serde_json::Value` (one
/// per request adds allocations on the hottest path). Fields in the order `json!` gave them.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    id: &'a str,
    queue: &'a str,
    seq: u64,
}

pub async fn post_batch(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Client)?;
    let queue = queue_name(path)?;
    check_writes_allowed(&state)?;
    let incoming = read_batch(&state, &headers, body).await?;
    let count = incoming.messages.len();
    // An upward batch is all or nothing without idempotency keys (CONTRACT section 3).
    let appended = state.store.append(&queue, incoming.messages, None).await?;
    state.metrics.messages_accepted.get_or_create(&QueueLabel { queue: queue.clone() }).inc_by(count as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "queue": queue, "count": count, "first_seq": appended.first_seq, "last_seq": appended.last_seq })),
    )
        .into_response())
}

/// Splits an NDJSON body into its non-blank lines without copying (`\r\n` endings allowed).
fn split_lines(body: &Bytes) -> Vec<Bytes> {
    let mut lines = Vec::new();
    let mut start = 0;
    while start < body.len() {
        let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |p| start + p);
        let line_end = if end > start && body[end - 1] == b'\r' { end - 1 } else { end };
        if !body[start..line_end].iter().all(u8::is_ascii_whitespace) {
            lines.push(body.slice(start..line_end));
        }
        start = end + 1;
    }
    lines
}

pub async fn list_queues(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let now_ms = now_unix_ms();
    let queues: Vec<_> = state
        .store
        .queue_stats()
        .into_iter()
        .filter(|q| !outpost_central::is_downlink_queue(&q.name))
        .map(|q| {
            json!({
                "name": q.name,
                "messages": q.messages,
                "bytes": q.bytes,
                "oldest_age_seconds": q.oldest_accepted_at_ms.map(|at| (now_ms - at).max(0) as f64 / 1000.0).unwrap_or(0.0),
                "first_seq": q.first_seq,
                "last_seq": q.last_seq,
            })
        })
        .collect();
    Ok(Json(queues).into_response())
}

pub async fn read_messages(
    State(state): State<Arc<ApiState>>,
    path: Result<Path<String>, PathRejection>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(state.config.auth.as_ref(), &headers, Access::Admin)?;
    let queue = queue_name(path)?;
    let mut after_seq = 0u64;
    let mut limit = DEFAULT_READ_LIMIT;
    for (name, value) in query::pairs(query)? {
        match name.as_str() {
            "after_seq" => after_seq = query::number(&name, &value)?,
            "limit" => {
                limit = query::number(&name, &value)?;
                if limit == 0 || limit > MAX_READ_LIMIT {
                    return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_READ_LIMIT}")));
                }
            }
            other => return Err(query::unknown(other)),
        }
    }
    if state.store.queue(&queue).is_none() {
        return Err(ApiError::not_found(format!("no queue named {queue:?}")));
    }
    // Seqs are stored as SQLite integers (i64), so none lies beyond i64::MAX; asking the store
    // for more would wrap around to a negative bound and read again from the first message.
    let messages = if after_seq > i64::MAX as u64 {
        Vec::new()
    } else {
        state.store.read_within(&queue, after_seq, limit, MAX_READ_BYTES).await?
    };
    let next_after_seq = messages.last().map(|m| m.seq).unwrap_or(after_seq);
    let engine = base64::engine::general_purpose::STANDARD;
    let messages: Vec<_> = messages
        .into_iter()
        .map(|m| {
            json!({
                "id": m.id,
                "seq": m.seq,
                "origin": m.origin,
                "origin_seq": m.origin_seq,
                "content_type": m.content_type,
                "payload_base64": engine.encode(&m.payload),
                "accepted_at": rfc3339_from_unix_ms(m.accepted_at_ms),
            })
        })
        .collect();
    Ok(Json(json!({ "messages": messages, "next_after_seq": next_after_seq })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines() {
        let body = Bytes::from_static(b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\n{\"c\":3}");
        let lines = split_lines(&body);
        assert_eq!(
            lines,
            vec![
                Bytes::from_static(b"{\"a\":1}"),
                Bytes::from_static(b"{\"b\":2}"),
                Bytes::from_static(b"{\"c\":3}")
            ]
        );
        assert_eq!(split_lines(&Bytes::from_static(b"\n\n")).len(), 0);
        assert_eq!(split_lines(&Bytes::new()).len(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000),
            failure_persistence: None,
            ..Default::default()
        })]

        /// Fuzzing the NDJSON splitter (issue 11): any body, lines of any bytes and endings, gives
        /// exactly the non-blank lines a plain split finds, without their `\r\n`/`\n` endings.
        #[test]
        fn ndjson_splitting_matches_a_plain_split(
            body in proptest::collection::vec(
                proptest::prop_oneof![4 => proptest::prelude::any::<u8>(), 1 => proptest::strategy::Just(b'\n'), 1 => proptest::strategy::Just(b'\r')],
                0..300,
            )
        ) {
            let expected: Vec<&[u8]> = body
                .split(|b| *b == b'\n')
                .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                .collect();
            let got = split_lines(&Bytes::from(body.clone()));
            let got: Vec<&[u8]> = got.iter().map(|b| &b[..]).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }
}
