//! A small HTTP client for a node's API (CONTRACT section 3), typed where the contract fixes a
//! shape. Low-level calls return the transport error so a test can tell "no answer" (the node
//! died mid-request) from an answer; the read helpers panic on anything unexpected.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

/// Every request gives up after this long: a hung node fails the test instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest page `read_all` asks for (the API's maximum `limit`).
pub const READ_PAGE_LIMIT: usize = 1000;

/// A node's API at `base_url`, optionally with a bearer token. Cheap to clone; clones share the
/// connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
}

/// An answer, fully read.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// `202 {"id","queue","seq"}` of a single message (or `200` of a repeated idempotency key).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Accepted {
    pub id: String,
    pub queue: String,
    pub seq: u64,
}

/// `202 {"queue","count","first_seq","last_seq"}` of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BatchAccepted {
    pub queue: String,
    pub count: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// One entry of `GET /v1/queues`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct QueueInfo {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub oldest_age_seconds: f64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// One message of `GET /v1/queues/{queue}/messages`, payload decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    pub seq: u64,
    pub origin: String,
    pub origin_seq: u64,
    pub content_type: String,
    pub payload: Vec<u8>,
    pub accepted_at: String,
}

#[derive(Deserialize)]
struct RawStoredMessage {
    id: String,
    seq: u64,
    origin: String,
    origin_seq: u64,
    content_type: String,
    payload_base64: String,
    accepted_at: String,
}

#[derive(Deserialize)]
struct RawPage {
    messages: Vec<RawStoredMessage>,
    next_after_seq: u64,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (showing the body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{} answered a body that is not JSON ({e}): {:?}", self.status, self.text())
        })
    }

    /// Panics unless the status is `expected`, showing the body.
    pub fn expect_status(&self, expected: u16) -> &Response {
        assert_eq!(self.status.as_u16(), expected, "unexpected status; body: {}", self.text());
        self
    }

    /// The `202` (or `200`) body of a single message; panics on any other answer.
    pub fn accepted(&self) -> Accepted {
        assert!(
            self.status == StatusCode::ACCEPTED || self.status == StatusCode::OK,
            "expected 202 or 200, got {}: {}",
            self.status,
            self.text()
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad accept body ({e}): {}", self.text()))
    }

    /// The `202` body of a batch; panics on any other answer.
    pub fn batch_accepted(&self) -> BatchAccepted {
        self.expect_status(202);
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("bad batch body ({e}): {}", self.text()))
    }

    /// Checks the contract's error shape `{"error":{"code","message"}}` (nothing else at the top,
    /// both strings, non-empty) and the status; returns the code.
    pub fn expect_error(&self, status: u16) -> String {
        self.expect_status(status);
        let content_type = self.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(content_type.starts_with("application/json"), "error with Content-Type {content_type:?}");
        let body = self.json();
        let top = body.as_object().unwrap_or_else(|| panic!("error body is not an object: {body}"));
        assert_eq!(top.keys().collect::<Vec<_>>(), ["error"], "error body has other keys: {body}");
        let error = body["error"].as_object().unwrap_or_else(|| panic!("`error` is not an object: {body}"));
        let mut keys: Vec<_> = error.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "message"], "error object keys: {body}");
        let code = error["code"].as_str().unwrap_or_else(|| panic!("`code` is not a string: {body}"));
        let message =
            error["message"].as_str().unwrap_or_else(|| panic!("`message` is not a string: {body}"));
        assert!(!code.is_empty() && !message.is_empty(), "empty code or message: {body}");
        code.to_string()
    }
}

impl Client {
    pub fn new(base_url: &str) -> Client {
        let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().expect("build an HTTP client");
        Client { http, base_url: base_url.trim_end_matches('/').to_string(), token: None }
    }

    /// A client for an HTTPS node whose certificate is signed by the CA in `ca_file` (PEM).
    pub fn with_ca(base_url: &str, ca_file: &std::path::Path) -> Client {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .add_root_certificate(read_ca(ca_file))
            .build()
            .expect("build an HTTPS client");
        Client { http, base_url: base_url.trim_end_matches('/').to_string(), token: None }
    }

    /// The same client sending `Authorization: Bearer TOKEN`.
    pub fn with_token(&self, token: &str) -> Client {
        Client { token: Some(token.to_string()), ..self.clone() }
    }

    /// The same client without a token.
    pub fn without_token(&self) -> Client {
        Client { token: None, ..self.clone() }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// A request to `path` (starting with `/`) with this client's token; finish it with [`Client::send`].
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base_url));
        match &self.token {
            Some(token) => builder.header(AUTHORIZATION, format!("Bearer {token}")),
            None => builder,
        }
    }

    /// Sends and reads the whole answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Response, reqwest::Error> {
        let response = request.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        Ok(Response { status, headers, body })
    }

    pub async fn get(&self, path: &str) -> Result<Response, reqwest::Error> {
        self.send(self.request(Method::GET, path)).await
    }

    /// `POST path` with `body` and, if given, a `Content-Type`.
    pub async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<Response, reqwest::Error> {
        let mut request = self.request(Method::POST, path).body(body);
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        self.send(request).await
    }

    /// `POST /v1/queues/{queue}/messages` with the payload as `application/octet-stream`.
    pub async fn post_message(
        &self,
        queue: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Response, reqwest::Error> {
        self.post_message_with(queue, payload, Some("application/octet-stream"), None).await
    }

    /// `POST /v1/queues/{queue}/messages` with an optional `Content-Type` and `Idempotency-Key`.
    pub async fn post_message_with(
        &self,
        queue: &str,
        payload: impl Into<Bytes>,
        content_type: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Response, reqwest::Error> {
        let mut request =
            self.request(Method::POST, &format!("/v1/queues/{queue}/messages")).body(payload.into());
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        if let Some(key) = idempotency_key {
            request =
                request.header("idempotency-key", HeaderValue::from_str(key).expect("a header-safe key"));
        }
        self.send(request).await
    }

    /// `POST /v1/queues/{queue}/batch` as NDJSON, one line per payload.
    pub async fn post_batch<L: AsRef<[u8]>>(
        &self,
        queue: &str,
        lines: &[L],
    ) -> Result<Response, reqwest::Error> {
        let mut body = Vec::new();
        for line in lines {
            body.extend_from_slice(line.as_ref());
            body.push(b'\n');
        }
        self.post(&format!("/v1/queues/{queue}/batch"), Some("application/x-ndjson"), body).await
    }

    /// `GET /v1/queues`, sorted by name. Panics unless 200.
    pub async fn queues(&self) -> Vec<QueueInfo> {
        let response = self.get("/v1/queues").await.expect("GET /v1/queues");
        response.expect_status(200);
        let mut queues: Vec<QueueInfo> = serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("bad queue list ({e}): {}", response.text()));
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        queues
    }

    /// One queue's entry of `GET /v1/queues`, if the queue exists.
    pub async fn queue(&self, name: &str) -> Option<QueueInfo> {
        self.queues().await.into_iter().find(|q| q.name == name)
    }

    /// Every message of `queue`, paging with `after_seq` and `limit=1000` until an empty page.
    /// An unknown queue reads as empty. Panics on any other non-200 answer, and if a page is out
    /// of order or `next_after_seq` is not the last seq of the page.
    pub async fn read_all(&self, queue: &str) -> Vec<StoredMessage> {
        let mut messages: Vec<StoredMessage> = Vec::new();
        let mut after_seq = 0;
        loop {
            let path = format!("/v1/queues/{queue}/messages?after_seq={after_seq}&limit={READ_PAGE_LIMIT}");
            let response = self.get(&path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
            if response.status == StatusCode::NOT_FOUND && after_seq == 0 {
                return messages;
            }
            response.expect_status(200);
            let page: RawPage = serde_json::from_slice(&response.body)
                .unwrap_or_else(|e| panic!("bad page ({e}): {}", response.text()));
            let Some(last) = page.messages.last() else {
                assert_eq!(page.next_after_seq, after_seq, "an empty page must keep next_after_seq");
                return messages;
            };
            assert!(page.messages.len() <= READ_PAGE_LIMIT, "page longer than limit");
            assert_eq!(page.next_after_seq, last.seq, "next_after_seq is the last seq of the page");
            for raw in page.messages {
                assert!(raw.seq > after_seq, "seq {} on a page after_seq={after_seq}", raw.seq);
                assert!(
                    messages.last().is_none_or(|m| m.seq < raw.seq),
                    "page not in seq order at {}",
                    raw.seq
                );
                after_seq = raw.seq;
                messages.push(StoredMessage {
                    payload: base64::engine::general_purpose::STANDARD
                        .decode(&raw.payload_base64)
                        .unwrap_or_else(|e| panic!("payload_base64 of seq {} ({e})", raw.seq)),
                    id: raw.id,
                    seq: raw.seq,
                    origin: raw.origin,
                    origin_seq: raw.origin_seq,
                    content_type: raw.content_type,
                    accepted_at: raw.accepted_at,
                });
            }
        }
    }

    /// `GET /v1/status` as JSON. Panics unless 200.
    pub async fn status(&self) -> Value {
        let response = self.get("/v1/status").await.expect("GET /v1/status");
        response.expect_status(200);
        response.json()
    }

    /// `GET /metrics` as text. Panics unless 200.
    pub async fn metrics(&self) -> String {
        let response = self.get("/metrics").await.expect("GET /metrics");
        response.expect_status(200);
        response.text()
    }

    /// True when `GET /healthz` answers 200.
    pub async fn healthy(&self) -> bool {
        self.get("/healthz").await.is_ok_and(|r| r.status == StatusCode::OK)
    }
}

/// A PEM CA certificate for reqwest.
pub fn read_ca(ca_file: &std::path::Path) -> reqwest::Certificate {
    let pem = std::fs::read(ca_file).unwrap_or_else(|e| panic!("read {}: {e}", ca_file.display()));
    reqwest::Certificate::from_pem(&pem)
        .unwrap_or_else(|e| panic!("{} is not a PEM certificate: {e}", ca_file.display()))
}
