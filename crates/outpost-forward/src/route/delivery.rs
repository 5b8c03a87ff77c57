//! One delivery of one message to a route's downstream service over HTTP: the request of CONTRACT
//! section 3 (POST of the payload and its Content-Type, `Outpost-*` headers, `Idempotency-Key`),
//! endpoint failover over the route's `urls`, and the classification of every failure into a
//! [`FailureKind`] so the policy decides on data, not on error strings.
//!
//! Endpoint choice: a delivery starts at the endpoint that last answered (the first `url` at start
//! and every time the route returns to `forward`), and moves on in list order (wrapping around)
//! only when an endpoint fails with a `service_down` class. Any other failure is about the message,
//! not the endpoint, and is returned at once.

use std::collections::VecDeque;
use std::error::Error as _;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use outpost_core::config::RouteConfig;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use crate::route::pipeline::{Answer, Pipeline, Request, Window};
use crate::route::policy::{Class, FailureKind, RoutePolicy};

pub const MESSAGE_ID_HEADER: &str = "outpost-message-id";
pub const QUEUE_HEADER: &str = "outpost-queue";
pub const ORIGIN_HEADER: &str = "outpost-origin";
pub const SEQ_HEADER: &str = "outpost-seq";
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// On a batch POST: how many messages (lines) it holds.
pub const BATCH_COUNT_HEADER: &str = "outpost-batch-count";
const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// The most bytes of an error answer's body kept in the error detail.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 512;
/// The `User-Agent` of every delivery.
pub(crate) const USER_AGENT: &str = concat!("outpost/", env!("CARGO_PKG_VERSION"));
/// Content type sent when the stored one cannot be a header value (never expected: ingest checks it).
const FALLBACK_CONTENT_TYPE: &str = "application/octet-stream";

/// A message as a route sends it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub message_id: String,
    pub queue: String,
    /// The node that accepted the message first, and the message's seq there: `(Outpost-Origin,
    /// Outpost-Seq)` names a message the same way on the edge and on every central.
    pub origin: String,
    pub origin_seq: u64,
    pub content_type: String,
    pub payload: Bytes,
}

/// What one POST of a route carries: a message as itself, or several as one NDJSON body
/// (`[[route]] batch`).
#[derive(Debug, Clone)]
pub enum Unit {
    Single(Outgoing),
    Batch(Vec<Outgoing>),
}

impl Unit {
    pub fn len(&self) -> usize {
        match self {
            Unit::Single(_) => 1,
            Unit::Batch(messages) => messages.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One failed attempt at one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    pub url: String,
    pub kind: FailureKind,
    pub detail: String,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {}: {}", self.kind, self.url, self.detail)
    }
}

/// A delivery that did not succeed: the error that decides (the last one) and what every endpoint
/// tried before it said.
#[derive(Debug, Clone)]
pub struct DeliveryFailure {
    pub errors: Vec<DeliveryError>,
}

impl DeliveryFailure {
    pub fn kind(&self) -> FailureKind {
        self.last().kind
    }

    pub fn last(&self) -> &DeliveryError {
        self.errors.last().expect("a failure holds at least one error")
    }
}

impl fmt::Display for DeliveryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Sends a route's messages to its endpoints.
pub struct Deliverer {
    http: reqwest::Client,
    /// With `max_in_flight` > 1: the connection a window's POSTs go on.
    pipeline: Option<Pipeline>,
    urls: Vec<String>,
    timeout: Duration,
    /// Index into `urls` of the endpoint tried first.
    preferred: usize,
}

impl Deliverer {
    /// `tls`: the route's TLS setting for https:// urls (`None`: reqwest's default, no roots).
    pub fn new(
        route: &RouteConfig,
        tls: Option<&outpost_tls::ClientTls>,
    ) -> Result<Deliverer, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            // A redirect would turn the POST into a GET elsewhere: a 3xx is an answer to classify.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(route.timeout)
            // One POST at a time, retries and probes stay HTTP/1.1 (docs/routes.md); the windows
            // of `pipeline` choose by ALPN.
            .http1_only();
        if let Some(tls) = tls {
            let mut config = tls.config();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder = builder.use_preconfigured_tls(config);
        }
        let http = builder.build()?;
        let pipeline = (route.max_in_flight.get() > 1).then(|| Pipeline::new(route.timeout, tls));
        Ok(Deliverer { http, pipeline, urls: route.urls.clone(), timeout: route.timeout, preferred: 0 })
    }

    /// Starts with the first url again (after the route returns to `forward`).
    pub fn prefer_primary(&mut self) {
        self.preferred = 0;
    }

    /// The endpoint the next delivery starts with.
    pub fn preferred_url(&self) -> &str {
        &self.urls[self.preferred]
    }

    /// Delivers `message`, failing over to the next url on `service_down`-class errors.
    pub async fn deliver(&mut self, message: &Outgoing, policy: &RoutePolicy) -> Result<(), DeliveryFailure> {
        let mut errors = Vec::new();
        for step in 0..self.urls.len() {
            let index = (self.preferred + step) % self.urls.len();
            match self.post(&self.urls[index], message).await {
                Ok(()) => {
                    if index != self.preferred {
                        tracing::info!(from = %self.urls[self.preferred], to = %self.urls[index], "route endpoint failover");
                        self.preferred = index;
                    }
                    return Ok(());
                }
                Err(error) => {
                    let moves_on = policy.classify(error.kind) == Class::ServiceDown;
                    errors.push(error);
                    if !moves_on {
                        break;
                    }
                }
            }
        }
        Err(DeliveryFailure { errors })
    }

    /// An empty window of POSTs to the endpoint the route prefers now, without failover (a window
    /// stops at its first failure; the route's single delivery of the head,
    /// [`Deliverer::deliver`], fails over): with `max_in_flight` > 1 sent in order on one
    /// connection ([`Pipeline`]: pipelined over HTTP/1.1, or HTTP/2 streams), else (a window of
    /// one batch at a time) one POST at a time.
    pub fn posts(&self) -> Posts {
        let url = &self.urls[self.preferred];
        let mode = match &self.pipeline {
            Some(pipeline) => PostsMode::Pipelined(Box::new(pipeline.window(url))),
            None => PostsMode::OneAtATime { waiting: VecDeque::new(), ended: false },
        };
        Posts { url: url.clone(), mode }
    }

    /// The answer to the oldest outstanding POST of `posts`, in the order they were pushed.
    pub async fn next_answer(&mut self, posts: &mut Posts) -> Answer {
        match &mut posts.mode {
            PostsMode::Pipelined(window) => {
                let pipeline = self.pipeline.as_mut().expect("a pipelined window has its pipeline");
                pipeline.next_answer(window).await
            }
            PostsMode::OneAtATime { waiting, ended } => {
                let (headers, body) =
                    waiting.pop_front().expect("an answer is awaited only for a pushed POST");
                if *ended {
                    return Answer::Unanswered;
                }
                match self.send(&posts.url, headers, body).await {
                    Ok(()) => Answer::Delivered,
                    Err(error) => {
                        *ended = true;
                        Answer::Failed(error)
                    }
                }
            }
        }
    }

    async fn post(&self, url: &str, message: &Outgoing) -> Result<(), DeliveryError> {
        self.send(url, headers(message), message.payload.clone()).await
    }

    async fn send(&self, url: &str, headers: HeaderMap, body: Bytes) -> Result<(), DeliveryError> {
        let error = |kind, detail: String| DeliveryError { url: url.to_string(), kind, detail };
        let response = self
            .http
            .post(url)
            .headers(headers)
            .body(body)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| error(kind_of(&e), describe(&e)))?;
        let status = response.status();
        if status.is_success() {
            // Delivered once the status line is in; the body is not ours to wait for.
            return Ok(());
        }
        let body = read_excerpt(response).await;
        Err(status_error(url, status.as_u16(), &body))
    }
}

/// The POSTs of a route's window (see [`Deliverer::posts`]): pushed in queue order, answered in
/// that order ([`Deliverer::next_answer`]). After an answer that is not a delivery the route
/// pushes nothing more and takes the answers of what it pushed.
pub struct Posts {
    url: String,
    mode: PostsMode,
}

enum PostsMode {
    /// `max_in_flight` > 1: in order on one connection (HTTP/1.1 pipelined, or HTTP/2 streams).
    Pipelined(Box<Window>),
    /// One POST at a time through the route's client, sent when its answer is asked for; after a
    /// failure the rest are not sent.
    OneAtATime { waiting: VecDeque<Request>, ended: bool },
}

impl Posts {
    /// Appends the POST of `unit`.
    pub fn push(&mut self, unit: &Unit) {
        let request = request_of(unit);
        match &mut self.mode {
            PostsMode::Pipelined(window) => window.push(request),
            PostsMode::OneAtATime { waiting, .. } => waiting.push_back(request),
        }
    }

    /// How many POSTs were pushed and not answered yet.
    pub fn outstanding(&self) -> usize {
        match &self.mode {
            PostsMode::Pipelined(window) => window.outstanding(),
            PostsMode::OneAtATime { waiting, .. } => waiting.len(),
        }
    }
}

/// The headers and body of one POST of `unit`: a message as itself, or several as one NDJSON body,
/// one payload per line (none holds a `\n`), keyed by the first message's id and their count.
pub(crate) fn request_of(unit: &Unit) -> (HeaderMap, Bytes) {
    let messages = match unit {
        Unit::Single(message) => return (headers(message), message.payload.clone()),
        Unit::Batch(messages) => messages,
    };
    let first = messages.first().expect("a batch holds at least one message");
    let mut body = Vec::with_capacity(messages.iter().map(|m| m.payload.len() + 1).sum());
    for message in messages {
        body.extend_from_slice(&message.payload);
        body.push(b'\n');
    }
    let mut headers = headers(first);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON_CONTENT_TYPE));
    let key = format!("{}+{}", first.message_id, messages.len());
    if let Ok(key) = HeaderValue::from_str(&key) {
        headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), key);
    }
    headers.insert(HeaderName::from_static(BATCH_COUNT_HEADER), HeaderValue::from(messages.len()));
    (headers, Bytes::from(body))
}

/// The error of an answer with a status other than 2xx; `body`: up to [`MAX_ERROR_BODY_BYTES`]
/// of its body, as text.
pub(crate) fn status_error(url: &str, status: u16, body: &str) -> DeliveryError {
    let reason = reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    DeliveryError {
        url: url.to_string(),
        kind: FailureKind::Status(status),
        detail: format!("{status} {reason}: {body}"),
    }
}

fn headers(message: &Outgoing) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(6);
    let content_type = HeaderValue::from_str(&message.content_type).unwrap_or_else(|_| {
        tracing::warn!(message_id = %message.message_id, "stored content type is not a header value; sending {FALLBACK_CONTENT_TYPE}");
        HeaderValue::from_static(FALLBACK_CONTENT_TYPE)
    });
    headers.insert(CONTENT_TYPE, content_type);
    let mut put = |name: &'static str, value: &str| {
        // Ids, queue and node names are checked ASCII when accepted; a value that is not would be
        // a broken invariant upstream of here, so it is dropped loudly rather than sent mangled.
        match HeaderValue::from_str(value) {
            Ok(value) => drop(headers.insert(HeaderName::from_static(name), value)),
            Err(_) => tracing::error!(header = name, value, "not a valid header value; header left out"),
        }
    };
    put(MESSAGE_ID_HEADER, &message.message_id);
    put(IDEMPOTENCY_KEY_HEADER, &message.message_id);
    put(QUEUE_HEADER, &message.queue);
    put(ORIGIN_HEADER, &message.origin);
    put(SEQ_HEADER, &message.origin_seq.to_string());
    headers
}

/// Up to [`MAX_ERROR_BODY_BYTES`] of an answer's body, as text.
async fn read_excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).trim().to_string()
}

/// The kind of a transport failure, from the error's type and its typed sources.
fn kind_of(error: &reqwest::Error) -> FailureKind {
    if error.is_timeout() {
        return FailureKind::Timeout;
    }
    if error.is_connect() {
        return FailureKind::Connect;
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(kind) = cause.downcast_ref::<std::io::Error>().and_then(|io| io_error_kind(io.kind())) {
            return kind;
        }
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
            if hyper_error.is_incomplete_message() || hyper_error.is_closed() || hyper_error.is_canceled() {
                return FailureKind::Reset;
            }
            if hyper_error.is_timeout() {
                return FailureKind::Timeout;
            }
        }
        source = cause.source();
    }
    FailureKind::Other
}

/// The kind of a failure from an I/O error's kind, where it tells.
pub(crate) fn io_error_kind(kind: std::io::ErrorKind) -> Option<FailureKind> {
    use std::io::ErrorKind::*;
    match kind {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => Some(FailureKind::Reset),
        TimedOut => Some(FailureKind::Timeout),
        ConnectionRefused | NotConnected | AddrNotAvailable => Some(FailureKind::Connect),
        _ => None,
    }
}

/// The error and its causes on one line (reqwest's own message hides the cause); the url is left
/// out, [`DeliveryError`] prints it once.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(&format!(" for url ({url})"), "");
    }
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use outpost_core::config::ErrorClass;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How a fake endpoint treats every connection.
    #[derive(Clone, Copy, Debug)]
    enum Behaviour {
        Answer(u16),
        Hang,
        CloseAfterRequest,
        ResetAfterRequest,
    }

    /// An endpoint on 127.0.0.1:0; returns its url and a receiver of the requests it read.
    async fn endpoint(behaviour: Behaviour) -> (String, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Read the head and a body of Content-Length bytes.
                    loop {
                        let n = socket.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some(head_end) = text.find("\r\n\r\n") {
                            let length = text[..head_end]
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse::<usize>().unwrap())
                                })
                                .unwrap_or(0);
                            if request.len() >= head_end + 4 + length {
                                break;
                            }
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&request).to_string()).await;
                    match behaviour {
                        Behaviour::Answer(status) => {
                            let body = "nope";
                            let answer = format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = socket.write_all(answer.as_bytes()).await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Behaviour::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
                        Behaviour::CloseAfterRequest => drop(socket),
                        Behaviour::ResetAfterRequest => {
                            // SO_LINGER 0: closing sends RST instead of FIN.
                            socket.set_zero_linger().unwrap();
                            drop(socket);
                        }
                    }
                });
            }
        });
        (url, rx)
    }

    fn refused_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        drop(listener);
        url
    }

    fn route(urls: Vec<String>) -> RouteConfig {
        RouteConfig {
            name: "r".into(),
            queue: "q".into(),
            urls,
            timeout: Duration::from_millis(500),
            max_attempts: NonZeroU32::new(3).unwrap(),
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(100),
            service_down: ErrorClass::DEFAULT_SERVICE_DOWN.to_vec(),
            poison: ErrorClass::DEFAULT_POISON.to_vec(),
            auto_forward: false,
            probe_interval: Duration::from_secs(30),
            max_in_flight: NonZeroU32::MIN,
            batch: NonZeroU32::MIN,
            tls: Default::default(),
        }
    }

    fn message() -> Outgoing {
        Outgoing {
            message_id: "0190-abc".into(),
            queue: "orders".into(),
            origin: "edge-1".into(),
            origin_seq: 42,
            content_type: "application/json".into(),
            payload: Bytes::from_static(b"{\"n\":1}"),
        }
    }

    #[tokio::test]
    async fn each_transport_outcome_has_its_kind() {
        let cases = [
            (Some(Behaviour::Answer(200)), None),
            (Some(Behaviour::Answer(204)), None),
            (Some(Behaviour::Answer(400)), Some(FailureKind::Status(400))),
            (Some(Behaviour::Answer(500)), Some(FailureKind::Status(500))),
            (Some(Behaviour::Answer(302)), Some(FailureKind::Status(302))),
            (Some(Behaviour::Hang), Some(FailureKind::Timeout)),
            (Some(Behaviour::CloseAfterRequest), Some(FailureKind::Reset)),
            (Some(Behaviour::ResetAfterRequest), Some(FailureKind::Reset)),
            (None, Some(FailureKind::Connect)),
        ];
        for (behaviour, want) in cases {
            let url = match behaviour {
                Some(b) => endpoint(b).await.0,
                None => refused_url(),
            };
            let route = route(vec![url]);
            let mut deliverer = Deliverer::new(&route, None).unwrap();
            let got = deliverer.deliver(&message(), &RoutePolicy::from_config(&route)).await;
            assert_eq!(got.as_ref().err().map(DeliveryFailure::kind), want, "{behaviour:?}: {got:?}");
        }
    }

    #[tokio::test]
    async fn the_request_carries_the_contract_headers() {
        let (url, mut requests) = endpoint(Behaviour::Answer(200)).await;
        let route = route(vec![url]);
        Deliverer::new(&route, None)
            .unwrap()
            .deliver(&message(), &RoutePolicy::from_config(&route))
            .await
            .unwrap();
        let request = requests.recv().await.unwrap().to_ascii_lowercase();
        for line in [
            "post /in http/1.1",
            "content-type: application/json",
            "outpost-message-id: 0190-abc",
            "idempotency-key: 0190-abc",
            "outpost-queue: orders",
            "outpost-origin: edge-1",
            "outpost-seq: 42",
        ] {
            assert!(request.contains(line), "{line:?} missing in {request}");
        }
        assert!(request.ends_with("{\"n\":1}"), "{request}");
    }

    #[tokio::test]
    async fn fails_over_only_on_service_down_classes_and_sticks_to_the_one_that_answered() {
        let (ok_url, mut ok_requests) = endpoint(Behaviour::Answer(200)).await;
        let (unavailable, _) = endpoint(Behaviour::Answer(503)).await;
        let route = route(vec![refused_url(), unavailable.clone(), ok_url.clone()]);
        let policy = RoutePolicy::from_config(&route);
        let mut deliverer = Deliverer::new(&route, None).unwrap();
        deliverer.deliver(&message(), &policy).await.unwrap();
        assert_eq!(deliverer.preferred_url(), ok_url);
        assert!(ok_requests.recv().await.is_some());
        deliverer.prefer_primary();
        assert_ne!(deliverer.preferred_url(), ok_url);

        // A poison answer from the first endpoint stops there: it is about the message.
        let (bad_request, _) = endpoint(Behaviour::Answer(400)).await;
        let route = self::route(vec![bad_request, ok_url]);
        let failure = Deliverer::new(&route, None).unwrap().deliver(&message(), &policy).await.unwrap_err();
        assert_eq!((failure.errors.len(), failure.kind()), (1, FailureKind::Status(400)));
        assert!(failure.to_string().contains("http:400 from http://127.0.0.1:"), "{failure}");
        assert!(failure.to_string().contains("nope"), "the answer's body is kept: {failure}");

        // Every endpoint down: one error each, the decision on the last.
        let route = self::route(vec![refused_url(), unavailable]);
        let failure = Deliverer::new(&route, None).unwrap().deliver(&message(), &policy).await.unwrap_err();
        let kinds: Vec<FailureKind> = failure.errors.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [FailureKind::Connect, FailureKind::Status(503)]);
    }
}
