//! Reading request bodies with a bound: nothing larger than the limit is ever buffered.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ApiError;

/// How much of an oversized body is read and thrown away before the 413 is sent. A client that is
/// still sending when the server answers and closes sees a broken pipe instead of the 413, and
/// cannot tell "too large, do not retry" from a network failure. Past this the connection is
/// simply closed.
const MAX_DISCARD_BYTES: u64 = 64 << 20;
/// How long discarding may take.
const MAX_DISCARD_TIME: Duration = Duration::from_secs(10);

/// Reads a body of at most `limit_bytes`; 413 (naming `what`) when it is larger.
pub async fn read_bounded(
    headers: &HeaderMap,
    body: Body,
    limit_bytes: u64,
    what: &str,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("{what} is larger than the limit of {limit_bytes} bytes"));
    let declared_length =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = body;
    if declared_length.is_some_and(|length| length > limit_bytes) {
        if declared_length.is_some_and(|length| length <= limit_bytes + MAX_DISCARD_BYTES) {
            discard(&mut body, MAX_DISCARD_BYTES).await;
        }
        return Err(too_large());
    }
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if crate::listener::is_body_deadline(&e) {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", format!("{what}: {e}"))
            } else {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if collected.len() as u64 + data.len() as u64 > limit_bytes {
            discard(&mut body, MAX_DISCARD_BYTES).await;
            return Err(too_large());
        }
        collected.extend_from_slice(&data);
    }
    Ok(collected.freeze())
}

/// Reads and drops up to `max_bytes` more of `body`, for at most [`MAX_DISCARD_TIME`].
async fn discard(body: &mut Body, max_bytes: u64) {
    let deadline = Instant::now() + MAX_DISCARD_TIME;
    let mut discarded = 0u64;
    while discarded <= max_bytes {
        match tokio::time::timeout_at(deadline.into(), body.frame()).await {
            Ok(Some(Ok(frame))) => discarded += frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => return,
        }
    }
}
