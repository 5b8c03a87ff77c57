//! The edge's HTTP client for its central: handshake and event stream, batches, reports, probes.
//! Every failure is classified ([`LinkError`]) so the driver decides on data, not on strings.
//!
//! The link is one connection: HTTP/2 carries the event stream, batches, reports, probes and
//! downlink reads as streams of it ([`LinkHttp`]). To an `http://` central the client speaks
//! HTTP/2 with prior knowledge, to an `https://` one it offers `h2` by ALPN. When a handshake or
//! probe over HTTP/2 fails other than by not connecting (an older central, an HTTP/1.1-only proxy:
//! they answer the HTTP/2 preface with an error, close, never answer, or refuse `h2` in the TLS
//! handshake), the same request goes again over HTTP/1.1 (ALPN `http/1.1`) and, if that is
//! answered, the endpoint is remembered as HTTP/1.1-only.
//! Requests on an open link use what its handshake found; a handshake tries HTTP/2 again
//! [`HTTP1_RECHECK_INTERVAL`] after, so a central upgraded in place is found without a restart.
//! Over HTTP/1.1 the link holds what it always did: the event stream's connection and one pooled
//! connection for the rest.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use outpost_core::config::Upstream;
use outpost_core::wire::{
    decompress_frame, Batch, BatchAck, EdgeReport, ErrorAnswer, Hello, LinkEvent, ProbeAnswer,
    BATCH_CONTENT_TYPE, BATCH_ENCODING_ZSTD, EDGE_ID_HEADER, LINK_DOWNLINK_PATH, LINK_MESSAGES_PATH,
    LINK_PATH, LINK_PROBE_PATH, LINK_REPORT_PATH, MAINTENANCE_ERROR_CODE,
};
use reqwest::StatusCode;

/// The longest line the link stream may send.
const MAX_EVENT_LINE_BYTES: usize = 64 << 10;
/// The largest decompressed downlink frame this edge reads (a central's own bound is 64 MiB).
const MAX_DOWNLINK_FRAME_BYTES: u64 = 64 << 20;

/// How long an endpoint found HTTP/1.1-only stays so before a handshake tries HTTP/2 again.
pub const HTTP1_RECHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// The HTTP clients of one central endpoint and the protocol it speaks.
#[derive(Clone)]
pub struct LinkHttp {
    /// HTTP/2 only: with prior knowledge on `http://`, offering `h2` by ALPN on `https://`. (Not
    /// "whatever ALPN picks": a client that learns the protocol only once connected opens a
    /// connection per request made meanwhile, where an HTTP/2-only one waits for the first.) Its
    /// pool keeps a connection however long it goes unused: the
    /// link's connection carries the event stream all the time, and a pool that dropped it after
    /// a quiet spell would open a second connection for the next request. The central closes a
    /// connection with no request in progress (after `limits.request_timeout`, with a GOAWAY that
    /// tells the client which requests it took, so none is lost to the race).
    preferred: reqwest::Client,
    /// HTTP/1.1 only (ALPN `http/1.1` on `https://`), pooled like the edge's client always was:
    /// one idle connection, closed by the edge before the central's own idle close.
    http1: reqwest::Client,
    /// Since when this endpoint is known not to speak HTTP/2.
    http1_only_since: Arc<Mutex<Option<Instant>>>,
}

/// Which requests may find out the protocol: the ones that start talking to a central.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Discovery {
    /// The link handshake: tries HTTP/2 again once [`HTTP1_RECHECK_INTERVAL`] has passed.
    Handshake,
    /// A probe: tries HTTP/2 unless the endpoint is known not to speak it.
    Probe,
    /// Everything on an open link: the protocol its handshake found.
    None,
}

impl LinkHttp {
    /// The clients for `url`, from `builder` (timeouts, keepalive, pool) and the endpoint's TLS.
    pub fn build(
        url: &str,
        builder: impl Fn() -> reqwest::ClientBuilder,
        tls: Option<&outpost_tls::ClientTls>,
    ) -> Result<LinkHttp, reqwest::Error> {
        let (preferred, http1) = (builder().http2_prior_knowledge(), builder().http1_only());
        let (preferred, http1) = match tls {
            Some(tls) if !url.starts_with("http://") => {
                let alpn = |protocol: &[u8]| {
                    let mut config = tls.config();
                    config.alpn_protocols = vec![protocol.to_vec()];
                    config
                };
                (preferred.use_preconfigured_tls(alpn(b"h2")), http1.use_preconfigured_tls(alpn(b"http/1.1")))
            }
            _ => (preferred, http1),
        };
        Ok(LinkHttp {
            preferred: preferred.pool_idle_timeout(None).build()?,
            http1: http1.build()?,
            http1_only_since: Arc::new(Mutex::new(None)),
        })
    }

    fn http1_only_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.http1_only_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this endpoint is known to speak HTTP/1.1 only.
    pub fn http1_only(&self) -> bool {
        self.http1_only_since().is_some()
    }

    /// Whether a request tries HTTP/2 (else it goes straight over HTTP/1.1).
    fn tries_http2(&self, discovery: Discovery) -> bool {
        match (*self.http1_only_since(), discovery) {
            (None, _) => true,
            (Some(since), Discovery::Handshake) => since.elapsed() >= HTTP1_RECHECK_INTERVAL,
            (Some(_), _) => false,
        }
    }

    /// Notes what the endpoint answered a discovering request with.
    fn learned(&self, speaks_http2: bool, discovery: Discovery, why: impl FnOnce() -> String) {
        let mut since = self.http1_only_since();
        if speaks_http2 {
            *since = None;
        } else if since.is_none() || discovery == Discovery::Handshake {
            tracing::info!("the central does not speak HTTP/2 ({}): HTTP/1.1 to it from now on", why());
            *since = Some(Instant::now());
        }
    }

    /// Sends the request `build` makes on a client, each try answered within `answer_timeout`;
    /// see the module's documentation for when HTTP/1.1 is tried.
    async fn send(
        &self,
        discovery: Discovery,
        answer_timeout: Duration,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SendError> {
        let attempt = |client: &reqwest::Client| {
            let request = build(client).send();
            async move {
                match tokio::time::timeout(answer_timeout, request).await {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(e)) if could_not_connect(&e) => Err((SendError::Request(request_error(e)), true)),
                    Ok(Err(e)) => Err((SendError::Request(request_error(e)), false)),
                    Err(_) => Err((SendError::NoAnswer(answer_timeout), false)),
                }
            }
        };
        if !self.tries_http2(discovery) {
            return attempt(&self.http1).await.map_err(|(e, _)| e);
        }
        let first = attempt(&self.preferred).await;
        if discovery == Discovery::None {
            return first.map_err(|(e, _)| e);
        }
        let first_error = match first {
            Ok(response) => {
                self.learned(true, discovery, String::new);
                return Ok(response);
            }
            // Nothing listens there (or the host is down): HTTP/1.1 would not connect either.
            Err((e, true)) => return Err(e),
            Err((e, false)) => e,
        };
        match attempt(&self.http1).await {
            Ok(response) => {
                self.learned(false, discovery, || first_error.detail());
                Ok(response)
            }
            // Neither answered: HTTP/1.1's failure says what is wrong, as it did before the link
            // spoke HTTP/2 (over HTTP/2 a refused client certificate, say, shows as the connection
            // closing under the request, without the TLS alert).
            Err((error, _)) => Err(error),
        }
    }
}

/// A request that got no answer.
enum SendError {
    /// It failed: what [`request_error`] says of it.
    Request(String),
    NoAnswer(Duration),
}

impl SendError {
    fn detail(&self) -> String {
        match self {
            SendError::Request(detail) => detail.clone(),
            SendError::NoAnswer(timeout) => format!("no answer within {timeout:?}"),
        }
    }
}

/// Why a request to a central failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Not reached, timed out, or a server error: try another endpoint.
    #[error("{url} unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    /// The central refused this edge (token, id, version): another try will not help.
    #[error("{url} rejected this edge: {detail}")]
    Rejected { url: String, detail: String },
    /// The central is in maintenance.
    #[error("{url} is in maintenance")]
    Maintenance { url: String },
    /// The central holds less than the batch assumed; resend from `expected_seq`.
    #[error("{url} expects seq {expected_seq} next")]
    Gap { url: String, expected_seq: u64 },
}

impl LinkError {
    /// What went wrong, without the endpoint's URL (for lists that name each endpoint already).
    pub fn detail(&self) -> String {
        match self {
            LinkError::Unreachable { detail, .. } => detail.clone(),
            LinkError::Rejected { detail, .. } => format!("rejected this edge: {detail}"),
            LinkError::Maintenance { .. } => "in maintenance".to_string(),
            LinkError::Gap { expected_seq, .. } => format!("expects seq {expected_seq} next"),
        }
    }
}

/// One central endpoint as this edge talks to it.
#[derive(Clone)]
pub struct CentralClient {
    http: LinkHttp,
    url: String,
    token: String,
    edge_id: String,
    request_timeout: Duration,
    /// The batch frame encoding this link agreed on (see `Welcome::batch_encoding`).
    batch_encoding: Option<String>,
}

impl CentralClient {
    pub fn new(
        http: LinkHttp,
        upstream: &Upstream,
        edge_id: &str,
        request_timeout: Duration,
    ) -> CentralClient {
        CentralClient {
            http,
            url: upstream.url.clone(),
            token: upstream.token.clone(),
            edge_id: edge_id.to_string(),
            request_timeout,
            batch_encoding: None,
        }
    }

    /// This client for a link that agreed on `encoding` for batch frames.
    pub fn with_batch_encoding(mut self, encoding: Option<String>) -> CentralClient {
        self.batch_encoding = encoding;
        self
    }

    pub fn batch_encoding(&self) -> Option<&str> {
        self.batch_encoding.as_deref()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this endpoint is known to speak HTTP/1.1 only.
    pub fn http1_only(&self) -> bool {
        self.http.http1_only()
    }

    fn request(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut request =
            http.request(method, format!("{}{path}", self.url)).header(EDGE_ID_HEADER, &self.edge_id);
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        request
    }

    /// Sends a request on the link's protocol (`discovery`: whether it may find that out).
    async fn send(
        &self,
        discovery: Discovery,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, LinkError> {
        // Each request carries `request_timeout` itself; the bound here is a backstop.
        let backstop = self.request_timeout + Duration::from_secs(1);
        self.http.send(discovery, backstop, build).await.map_err(|e| self.unreachable(e.detail()))
    }

    fn unreachable(&self, detail: impl ToString) -> LinkError {
        LinkError::Unreachable { url: self.url.clone(), detail: detail.to_string() }
    }

    /// Classifies a non-success answer.
    async fn refusal(&self, response: reqwest::Response) -> LinkError {
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        classify_refusal(&self.url, status, &body)
    }

    /// Opens the link: sends the handshake and reads the welcome. Returns the welcome and the open
    /// event stream.
    pub async fn open_link(&self, hello: &Hello) -> Result<(LinkEvent, EventStream), LinkError> {
        // The stream stays open for the life of the link, so the request as a whole has no
        // timeout; the handshake's answer does: a central (or load balancer, or half-open
        // connection) that takes the request and never answers must not hold the edge's connect
        // round for ever.
        let response = self
            .http
            .send(Discovery::Handshake, self.request_timeout, |http| {
                self.request(http, reqwest::Method::POST, LINK_PATH).json(hello)
            })
            .await
            .map_err(|e| match e {
                SendError::NoAnswer(timeout) => {
                    self.unreachable(format!("no answer to the link handshake within {timeout:?}"))
                }
                e => self.unreachable(e.detail()),
            })?;
        if !response.status().is_success() {
            return Err(self.refusal(response).await);
        }
        let mut stream = EventStream { response, buffer: BytesMut::new(), url: self.url.clone() };
        let welcome = tokio::time::timeout(self.request_timeout, stream.next())
            .await
            .map_err(|_| self.unreachable("no welcome on the link stream"))??;
        match welcome {
            LinkEvent::Welcome { maintenance: true, .. } => {
                Err(LinkError::Maintenance { url: self.url.clone() })
            }
            LinkEvent::Welcome { .. } => Ok((welcome, stream)),
            other => Err(LinkError::Rejected {
                url: self.url.clone(),
                detail: format!("expected a welcome, got {other:?}"),
            }),
        }
    }

    /// Sends one batch; the central stores each message once.
    pub async fn send_batch(&self, batch: &Batch) -> Result<BatchAck, LinkError> {
        self.send_frame(&batch.queue, batch.encode().into(), None, None).await
    }

    /// Sends one encoded batch frame of `queue`, compressed in `encoding` (as agreed in the
    /// welcome) or plain; through `bucket` when forwarding has a bandwidth cap.
    pub async fn send_frame(
        &self,
        queue: &str,
        frame: Bytes,
        encoding: Option<&str>,
        bucket: Option<std::sync::Arc<crate::pacing::TokenBucket>>,
    ) -> Result<BatchAck, LinkError> {
        let build = |http: &reqwest::Client| {
            let mut request = self
                .request(http, reqwest::Method::POST, LINK_MESSAGES_PATH)
                .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
                .header(reqwest::header::CONTENT_LENGTH, frame.len())
                .timeout(self.request_timeout);
            if let Some(encoding) = encoding {
                request = request.header(reqwest::header::CONTENT_ENCODING, encoding);
            }
            match &bucket {
                Some(bucket) => request.body(crate::pacing::paced_body(frame.clone(), bucket.clone())),
                None => request.body(frame.clone()),
            }
        };
        let response = self.send(Discovery::None, build).await?;
        if response.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            // The central took the encoding in the handshake and now refuses it (replaced by an
            // older or differently configured central behind the same URL): a new link renegotiates.
            let detail = format!("refused a batch of queue {queue:?} in encoding {encoding:?} (HTTP 415)");
            return Err(self.unreachable(detail));
        }
        match response.status() {
            StatusCode::OK => {
                response.json::<BatchAck>().await.map_err(|e| self.unreachable(format!("bad ack: {e}")))
            }
            StatusCode::CONFLICT => {
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                match body["expected_seq"].as_u64() {
                    Some(expected_seq) => Err(LinkError::Gap { url: self.url.clone(), expected_seq }),
                    None => Err(LinkError::Rejected {
                        url: self.url.clone(),
                        detail: format!("HTTP 409: {body}"),
                    }),
                }
            }
            _ => Err(self.refusal(response).await),
        }
    }

    /// Downlink: this edge holds `queue` through `acked` (durably); asks for up to `limit` entries
    /// after `after_seq` (at or past `acked`). `None`: nothing more waits.
    pub async fn pull_downlink(
        &self,
        queue: &str,
        after_seq: u64,
        acked: u64,
        limit: u32,
    ) -> Result<Option<Batch>, LinkError> {
        let path =
            format!("{LINK_DOWNLINK_PATH}?queue={queue}&after_seq={after_seq}&acked={acked}&limit={limit}");
        let build = |http: &reqwest::Client| {
            let request = self.request(http, reqwest::Method::GET, &path).timeout(self.request_timeout);
            match &self.batch_encoding {
                Some(encoding) => request.header(reqwest::header::ACCEPT_ENCODING, encoding),
                None => request,
            }
        };
        let response = self.send(Discovery::None, build).await?;
        match response.status() {
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::OK => {
                let compressed = response
                    .headers()
                    .get(reqwest::header::CONTENT_ENCODING)
                    .is_some_and(|v| v.as_bytes() == BATCH_ENCODING_ZSTD.as_bytes());
                let frame = response.bytes().await.map_err(|e| self.unreachable(error_chain(&e)))?;
                let frame = if compressed {
                    decompress_frame(&frame, MAX_DOWNLINK_FRAME_BYTES)
                        .map_err(|e| self.unreachable(format!("bad downlink frame: {e}")))?
                } else {
                    frame
                };
                // The central's limits, not this edge's, bound what it posts: decode generously.
                let batch = Batch::decode(&frame, u64::MAX, u32::MAX)
                    .map_err(|e| self.unreachable(format!("bad downlink frame: {e}")))?;
                if batch.queue != queue {
                    return Err(self.unreachable(format!(
                        "asked for downlink of queue {queue:?}, got {:?}",
                        batch.queue
                    )));
                }
                Ok(Some(batch))
            }
            _ => Err(self.refusal(response).await),
        }
    }

    /// Tells the central this edge's state, backlog and offline log.
    pub async fn report(&self, report: &EdgeReport) -> Result<(), LinkError> {
        let response = self
            .send(Discovery::None, |http| {
                self.request(http, reqwest::Method::POST, LINK_REPORT_PATH)
                    .timeout(self.request_timeout)
                    .json(report)
            })
            .await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.refusal(response).await)
        }
    }

    /// Checks that the central answers and accepts this edge.
    pub async fn probe(&self) -> Result<ProbeAnswer, LinkError> {
        let response = self
            .send(Discovery::Probe, |http| {
                self.request(http, reqwest::Method::GET, LINK_PROBE_PATH).timeout(self.request_timeout)
            })
            .await?;
        if !response.status().is_success() {
            return Err(self.refusal(response).await);
        }
        response.json::<ProbeAnswer>().await.map_err(|e| self.unreachable(format!("bad probe answer: {e}")))
    }
}

/// The NDJSON event stream of an open link.
pub struct EventStream {
    response: reqwest::Response,
    buffer: BytesMut,
    url: String,
}

impl EventStream {
    /// The next event; an error when the stream ends or breaks (the link is lost).
    pub async fn next(&mut self) -> Result<LinkEvent, LinkError> {
        loop {
            if let Some(newline) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Bytes = self.buffer.split_to(newline + 1).freeze();
                let line = &line[..newline];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(line).map_err(|e| LinkError::Rejected {
                    url: self.url.clone(),
                    detail: format!("unreadable link event: {e}"),
                });
            }
            if self.buffer.len() > MAX_EVENT_LINE_BYTES {
                return Err(LinkError::Rejected {
                    url: self.url.clone(),
                    detail: "link event line too long".into(),
                });
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => {
                    return Err(LinkError::Unreachable {
                        url: self.url.clone(),
                        detail: "the central closed the link".into(),
                    })
                }
                Err(e) => {
                    return Err(LinkError::Unreachable { url: self.url.clone(), detail: request_error(e) })
                }
            }
        }
    }
}

/// A request's error with its causes, e.g. "error sending request: connection refused", without
/// the request's URL: the endpoint is named once, by whoever reports the error (`LinkError`'s
/// text, the failover round's list).
fn request_error(error: reqwest::Error) -> String {
    outpost_tls::explain(&error_chain(&error.without_url()))
}

/// Whether `error` is a failure to reach the peer at all (refused, unreachable, connect timeout),
/// where another protocol would fare no better.
fn could_not_connect(error: &reqwest::Error) -> bool {
    use std::io::ErrorKind;
    if !error.is_connect() {
        return false;
    }
    if error.is_timeout() {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
            );
        }
        source = e.source();
    }
    false
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What a non-success answer means for the link: decided on the status and the error body's
/// `code` ([`ErrorAnswer`]), never on the text; the message only goes into the detail.
fn classify_refusal(url: &str, status: StatusCode, body: &[u8]) -> LinkError {
    let error = ErrorAnswer::parse(body).map(|answer| answer.error);
    let message = match &error {
        Some(error) => error.message.clone(),
        None => String::from_utf8_lossy(body).chars().take(200).collect(),
    };
    let detail = format!("HTTP {}: {message}", status.as_u16());
    let url = url.to_string();
    match status {
        StatusCode::SERVICE_UNAVAILABLE
            if error.as_ref().is_some_and(|error| error.code == MAINTENANCE_ERROR_CODE) =>
        {
            LinkError::Maintenance { url }
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::CONFLICT | StatusCode::BAD_REQUEST => {
            LinkError::Rejected { url, detail }
        }
        _ => LinkError::Unreachable { url, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified_on_status_and_error_code() {
        let url = "http://central:7401";
        let maintenance = r#"{"error":{"code":"maintenance","message":"the central is in maintenance"}}"#;
        // A 503 for another reason whose text happens to quote the word.
        let quoting = r#"{"error":{"code":"unavailable","message":"not \"maintenance\", stopping"}}"#;
        let cases: &[(u16, &str, LinkError)] = &[
            (503, maintenance, LinkError::Maintenance { url: url.into() }),
            (
                503,
                quoting,
                LinkError::Unreachable {
                    url: url.into(),
                    detail: r#"HTTP 503: not "maintenance", stopping"#.into(),
                },
            ),
            (
                503,
                r#"<html>"maintenance"</html>"#,
                LinkError::Unreachable {
                    url: url.into(),
                    detail: r#"HTTP 503: <html>"maintenance"</html>"#.into(),
                },
            ),
            (
                401,
                r#"{"error":{"code":"unauthorized","message":"bad token"}}"#,
                LinkError::Rejected { url: url.into(), detail: "HTTP 401: bad token".into() },
            ),
            (
                409,
                r#"{"error":{"code":"version_mismatch","message":"v2"}}"#,
                LinkError::Rejected { url: url.into(), detail: "HTTP 409: v2".into() },
            ),
            (500, "", LinkError::Unreachable { url: url.into(), detail: "HTTP 500: ".into() }),
        ];
        for (status, body, expected) in cases {
            let status = StatusCode::from_u16(*status).unwrap();
            assert_eq!(classify_refusal(url, status, body.as_bytes()), *expected, "{status} {body}");
        }
    }
}
