//! The HTTP side of the edge link (`/v1/link*`, see `outpost_core::wire`): edge authentication,
//! bounded bodies, the NDJSON event stream and the answers; the hub (`outpost-central`) decides.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use outpost_central::{BatchStored, LinkGuard, OpenedLink};
use outpost_core::config::Limits;
use outpost_core::time::now_unix_ms;
use outpost_core::wire::{self, Batch, EdgeReport, Hello, LinkEvent};
use outpost_core::Config;
use outpost_tls::PeerIdentity;
use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use super::hub;
use crate::body::read_bounded as read_body;
use crate::error::ApiError;
use crate::query::{self, QueryPairs};
use crate::ApiState;

/// The largest handshake or report body: a report carries up to 100 offline-log entries.
pub const MAX_REPORT_BODY_BYTES: u64 = 256 << 10;
/// Per-message allowance for the frame's own fields (seq, id, content type, lengths).
pub const BATCH_FRAME_OVERHEAD_BYTES_PER_MESSAGE: u64 = 300;
/// No single batch request may make the central buffer more than this.
pub const MAX_BATCH_FRAME_BYTES: u64 = 64 << 20;
/// Bounds of the ping interval an edge may ask for.
pub const MIN_PING_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_PING_INTERVAL: Duration = Duration::from_secs(24 * 3600);

const NDJSON: &str = "application/x-ndjson";
/// Entries per downlink pull when the edge does not say.
const DEFAULT_PULL_LIMIT: usize = 1000;

/// The largest batch frame this central reads.
pub fn max_batch_frame_bytes(limits: &Limits) -> u64 {
    u64::from(limits.max_batch_messages)
        .saturating_mul(limits.max_message_bytes.saturating_add(BATCH_FRAME_OVERHEAD_BYTES_PER_MESSAGE))
        .min(MAX_BATCH_FRAME_BYTES)
}

/// Identifies and authenticates the edge of a link request: the `outpost-edge-id` header names it;
/// with `[[edge]]` entries configured it must be listed and present its token (an entry with an
/// empty token needs none: the edge's empty `upstream.token` sends none).
///
/// With `tls.client_ca_file` set, the edge must also have presented a client certificate (verified
/// by the listener against that CA) whose DNS name or common name is the edge id it claims.
pub(crate) fn authenticate_edge(
    config: &Config,
    headers: &HeaderMap,
    peer: Option<&PeerIdentity>,
) -> Result<String, ApiError> {
    let edge_id = headers
        .get(wire::EDGE_ID_HEADER)
        .ok_or_else(|| {
            ApiError::bad_request(format!("missing the {} header naming the edge", wire::EDGE_ID_HEADER))
        })?
        .to_str()
        .map_err(|_| {
            ApiError::invalid_name(format!("the {} header is not visible ASCII", wire::EDGE_ID_HEADER))
        })?;
    outpost_core::validate_name(edge_id)
        .map_err(|e| ApiError::invalid_name(format!("edge id in {}: {e}", wire::EDGE_ID_HEADER)))?;
    if config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) {
        check_client_certificate(edge_id, peer)?;
    }
    if config.edges.is_empty() {
        return Ok(edge_id.to_string());
    }
    let Some(credential) = config.edges.iter().find(|e| e.id == edge_id) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "edge_not_allowed",
            format!(
                "edge {edge_id:?} is not listed in this central's [[edge]] section; add it with its token"
            ),
        ));
    };
    if credential.token.is_empty() {
        // Listed without a token (the hub warned at start): the edge sends none either.
        return Ok(edge_id.to_string());
    }
    let token = crate::auth::bearer_token(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!(
                "missing `Authorization: Bearer TOKEN`; edge {edge_id:?} must send the token listed for it \
                     in the central's [[edge]] section (upstream.token on the edge)"
            ),
        )
    })?;
    if !crate::auth::constant_time_eq(credential.token.as_bytes(), token.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("wrong token for edge {edge_id:?}; compare upstream.token on the edge with [[edge]] on the central"),
        ));
    }
    Ok(edge_id.to_string())
}

/// mTLS: the certificate the edge presented must name the edge id the link claims.
fn check_client_certificate(edge_id: &str, peer: Option<&PeerIdentity>) -> Result<(), ApiError> {
    let Some(peer) = peer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client_certificate_required",
            format!(
                "edge {edge_id:?} presented no client certificate; this central requires one signed by its \
                 tls.client_ca_file (set cert_file and key_file in the edge's [[upstream]])"
            ),
        ));
    };
    if peer.names.iter().any(|name| name == edge_id) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "certificate_mismatch",
        format!(
            "the client certificate is issued to {:?}, not to edge {edge_id:?}; each edge needs a certificate \
             whose DNS name or common name is its own id",
            peer.names
        ),
    ))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("{what} is not valid: {e}")))
}

/// `POST /v1/link`: the handshake; answers with the link's event stream.
pub(crate) async fn open_link(
    State(state): State<Arc<ApiState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let hub = hub(&state)?.clone();
    let edge_id = authenticate_edge(&state.config, &headers, peer.as_deref())?;
    let body = read_body(&headers, body, MAX_REPORT_BODY_BYTES, "the handshake").await?;
    let hello: Hello = parse_json(&body, "the handshake (Hello JSON)")?;
    if hello.edge_id != edge_id {
        return Err(ApiError::bad_request(format!(
            "the handshake names edge {:?} but the {} header says {edge_id:?}",
            hello.edge_id,
            wire::EDGE_ID_HEADER
        )));
    }
    let ping_interval =
        Duration::from_millis(hello.ping_interval_ms).clamp(MIN_PING_INTERVAL, MAX_PING_INTERVAL);
    let opened = hub.open_link(&edge_id, hello, now_unix_ms()).await?;
    let stream = LinkStream::new(ping_interval, opened);
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut stream| async move {
        let line = stream.next_line().await?;
        Some((Ok::<_, Infallible>(line), stream))
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Asks buffering reverse proxies to pass each line on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One link's event stream: Welcome, then pings and the events the hub sends, one JSON line each.
struct LinkStream {
    welcome: Option<LinkEvent>,
    pings: tokio::time::Interval,
    events: mpsc::Receiver<LinkEvent>,
    downlink: Arc<Notify>,
    guard: LinkGuard,
}

impl LinkStream {
    fn new(ping_interval: Duration, opened: OpenedLink) -> LinkStream {
        let mut pings = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
        pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
        LinkStream {
            welcome: Some(opened.welcome),
            pings,
            events: opened.events,
            downlink: opened.downlink,
            guard: opened.guard,
        }
    }

    /// The next line, or `None` when the link ends (replaced by a newer link, or the central stops).
    async fn next_line(&mut self) -> Option<Bytes> {
        let event = match self.welcome.take() {
            Some(welcome) => welcome,
            None => loop {
                tokio::select! {
                    biased;
                    event = self.events.recv() => break event?,
                    _ = self.downlink.notified() => {
                        if let Some(event) = self.guard.downlink_event(self.guard.take_announced()) {
                            break event;
                        }
                    }
                    _ = self.pings.tick() => break self.guard.ping(now_unix_ms()),
                }
            },
        };
        let mut line = serde_json::to_vec(&event).expect("a link event always serializes");
        line.push(b'\n');
        Some(Bytes::from(line))
    }
}

/// `POST /v1/link/messages`: one batch of one queue, stored exactly once and in order.
pub(crate) async fn post_batch(
    State(state): State<Arc<ApiState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let hub = hub(&state)?.clone();
    let edge_id = authenticate_edge(&state.config, &headers, peer.as_deref())?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.trim_start().starts_with(wire::BATCH_CONTENT_TYPE) {
        return Err(ApiError::bad_request(format!(
            "a link batch needs `Content-Type: {}`, got {content_type:?}",
            wire::BATCH_CONTENT_TYPE
        )));
    }
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => None,
        Some(value) => {
            let encoding = value.to_str().unwrap_or("").trim().to_string();
            if !hub.accepts_batch_encoding(&encoding) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_encoding",
                    format!(
                        "batch frames in Content-Encoding {encoding:?} were not agreed for this link (this \
                         central's forwarding.compression is {:?}); open a new link",
                        state.config.forwarding.compression.as_str()
                    ),
                ));
            }
            Some(encoding)
        }
    };
    hub.check_accepting_batches()?;
    // A batch arriving is a sign of life, even if a slow line takes long to carry its body.
    hub.touch(&edge_id, now_unix_ms(), false)?;
    let limits = &state.config.limits;
    // A batch still arriving on a slow line is progress: each piece of it is a sign of life.
    let now_ms = now_unix_ms();
    hub.touch(&edge_id, now_ms, false)?;
    let seen = hub.clone();
    let seen_edge = edge_id.clone();
    let body = Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
        let _ = seen.touch(&seen_edge, now_unix_ms(), false);
        frame
    }));
    // The body first, then the write permit: a stalled sender holds none.
    let max_frame_bytes = max_batch_frame_bytes(limits);
    let frame = read_body(&headers, body, max_frame_bytes, "the batch frame").await?;
    let frame = match encoding {
        None => frame,
        // Bounded by the same limit as a plain frame: a zip bomb is refused, not buffered.
        Some(_) => wire::decompress_frame(&frame, max_frame_bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_frame", e.to_string()))?,
    };
    let _permit =
        state.write_permits.acquire().await.map_err(|_| ApiError::unavailable("shutting down", 5))?;
    let batch = Batch::decode(&frame, limits.max_message_bytes, limits.max_batch_messages)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_frame", e.to_string()))?;
    match hub.store_batch(&edge_id, batch, now_unix_ms()).await? {
        BatchStored::Acked(ack) => Ok(Json(ack).into_response()),
        BatchStored::Gap { queue, first_seq, expected_seq } => {
            let body = json!({
                "error": {
                    "code": "gap",
                    "message": format!(
                        "the batch of queue {queue:?} starts at seq {first_seq} but this central holds edge \
                         {edge_id:?}'s messages only through {}; resend from seq {expected_seq}",
                        expected_seq - 1
                    ),
                },
                "expected_seq": expected_seq,
            });
            Ok((StatusCode::CONFLICT, Json(body)).into_response())
        }
    }
}

/// `GET /v1/link/downlink?queue=Q&after_seq=N&acked=A&limit=L`: the edge durably holds its downlink
/// of `Q` through `A` (default `N`); answers the entries after `N` as a batch frame, or 204 when
/// nothing more waits.
pub(crate) async fn pull_downlink(
    State(state): State<Arc<ApiState>>,
    peer: Option<Extension<PeerIdentity>>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hub = hub(&state)?.clone();
    let edge_id = authenticate_edge(&state.config, &headers, peer.as_deref())?;
    let (mut queue, mut after_seq, mut acked, mut limit) = (None, None, None, DEFAULT_PULL_LIMIT);
    for (name, value) in query::pairs(query)? {
        let number =
            || value.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{name} must be a number")));
        match name.as_str() {
            "queue" => queue = Some(value.clone()),
            "after_seq" => after_seq = Some(number()?),
            "acked" => acked = Some(number()?),
            "limit" => limit = number()? as usize,
            other => return Err(query::unknown(other)),
        }
    }
    let queue = queue.ok_or_else(|| ApiError::bad_request("missing `queue`"))?;
    outpost_core::validate_name(&queue).map_err(|e| ApiError::invalid_name(format!("queue {e}")))?;
    let after_seq = after_seq.ok_or_else(|| ApiError::bad_request("missing `after_seq`"))?;
    let acked = acked.unwrap_or(after_seq);
    if acked > after_seq {
        return Err(ApiError::bad_request("`acked` may not be past `after_seq`"));
    }
    hub.touch(&edge_id, now_unix_ms(), false)?;
    let messages = hub.pull_downlink(&edge_id, &queue, after_seq, acked, limit).await?;
    if messages.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let frame = Batch { queue, messages }.encode();
    let wants_zstd = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim() == wire::BATCH_ENCODING_ZSTD));
    if wants_zstd && hub.accepts_batch_encoding(wire::BATCH_ENCODING_ZSTD) {
        let compressed = wire::compress_frame(&frame);
        return Ok((
            [
                (header::CONTENT_TYPE, wire::BATCH_CONTENT_TYPE),
                (header::CONTENT_ENCODING, wire::BATCH_ENCODING_ZSTD),
            ],
            compressed,
        )
            .into_response());
    }
    Ok(([(header::CONTENT_TYPE, wire::BATCH_CONTENT_TYPE)], frame).into_response())
}

/// `POST /v1/link/report`: the edge's state, backlog and offline log.
pub(crate) async fn post_report(
    State(state): State<Arc<ApiState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let hub = hub(&state)?.clone();
    let edge_id = authenticate_edge(&state.config, &headers, peer.as_deref())?;
    let body = read_body(&headers, body, MAX_REPORT_BODY_BYTES, "the report").await?;
    let report: EdgeReport = parse_json(&body, "the report (EdgeReport JSON)")?;
    hub.record_report(&edge_id, report, now_unix_ms()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/link/probe`: is the central there, does it accept this edge, is it in maintenance.
pub(crate) async fn probe(
    State(state): State<Arc<ApiState>>,
    peer: Option<Extension<PeerIdentity>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hub = hub(&state)?;
    let edge_id = authenticate_edge(&state.config, &headers, peer.as_deref())?;
    Ok(Json(hub.probe(&edge_id, now_unix_ms())).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_frame_bound() {
        let limits = Limits { max_message_bytes: 1000, max_batch_messages: 10, ..Limits::default() };
        assert_eq!(max_batch_frame_bytes(&limits), 13_000);
        assert_eq!(max_batch_frame_bytes(&Limits::default()), MAX_BATCH_FRAME_BYTES);
        let huge = Limits { max_message_bytes: u64::MAX, ..Limits::default() };
        assert_eq!(max_batch_frame_bytes(&huge), MAX_BATCH_FRAME_BYTES);
    }

    #[test]
    fn edge_authentication_table() {
        let mut config = Config::load_from(outpost_core::Role::Central, &Default::default(), &[]).unwrap();
        let request = |id: Option<&str>, token: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(id) = id {
                headers.insert(wire::EDGE_ID_HEADER, id.parse().unwrap());
            }
            if let Some(token) = token {
                headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
            }
            headers
        };
        // No [[edge]]: any well-formed id, no token needed.
        assert_eq!(authenticate_edge(&config, &request(Some("store-1"), None), None).unwrap(), "store-1");
        config.edges = vec![
            outpost_core::config::EdgeCredential { id: "store-1".into(), token: "s3cret".into() },
            outpost_core::config::EdgeCredential { id: "open-1".into(), token: String::new() },
        ];
        let cases = [
            (None, None, Some(400)),
            (Some("bad id"), Some("s3cret"), Some(400)),
            (Some("store-1"), None, Some(401)),
            (Some("store-1"), Some("wrong"), Some(401)),
            (Some("store-2"), Some("s3cret"), Some(403)),
            (Some("store-1"), Some("s3cret"), None),
            (Some("open-1"), None, None),
        ];
        for (id, token, expected) in cases {
            let got = authenticate_edge(&config, &request(id, token), None).err().map(|e| e.status.as_u16());
            assert_eq!(got, expected, "{id:?} {token:?}");
        }
    }

    #[test]
    fn client_certificate_binds_the_edge_id() {
        let mut config = Config::load_from(outpost_core::Role::Central, &Default::default(), &[]).unwrap();
        config.tls = Some(outpost_core::config::TlsConfig {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            client_ca_file: Some("ca.pem".into()),
        });
        let mut headers = HeaderMap::new();
        headers.insert(wire::EDGE_ID_HEADER, "store-1".parse().unwrap());
        let of = |names: &[&str]| PeerIdentity { names: names.iter().map(|n| n.to_string()).collect() };
        let status = |config: &Config, peer: Option<&PeerIdentity>| {
            authenticate_edge(config, &headers, peer).err().map(|e| (e.status.as_u16(), e.code))
        };
        assert_eq!(status(&config, None), Some((401, "client_certificate_required")));
        assert_eq!(status(&config, Some(&of(&["store-2"]))), Some((403, "certificate_mismatch")));
        assert_eq!(
            status(&config, Some(&of(&["store-1.example", "store-1x"]))),
            Some((403, "certificate_mismatch"))
        );
        assert_eq!(status(&config, Some(&of(&["other", "store-1"]))), None);
        config.tls.as_mut().unwrap().client_ca_file = None;
        assert_eq!(status(&config, None), None);
    }
}
