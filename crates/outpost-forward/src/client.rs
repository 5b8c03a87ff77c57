//! The edge's HTTP client for its central: handshake and event stream, batches, reports, probes.
//! Every failure is classified ([`LinkError`]) so the driver decides on data, not on strings.

use std::time::Duration;

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
    http: reqwest::Client,
    url: String,
    token: String,
    edge_id: String,
    request_timeout: Duration,
    /// The batch frame encoding this link agreed on (see `Welcome::batch_encoding`).
    batch_encoding: Option<String>,
}

impl CentralClient {
    pub fn new(
        http: reqwest::Client,
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

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request =
            self.http.request(method, format!("{}{path}", self.url)).header(EDGE_ID_HEADER, &self.edge_id);
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        request
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
        let response = tokio::time::timeout(
            self.request_timeout,
            self.request(reqwest::Method::POST, LINK_PATH).json(hello).send(),
        )
        .await
        .map_err(|_| {
            self.unreachable(format!("no answer to the link handshake within {:?}", self.request_timeout))
        })?
        .map_err(|e| self.unreachable(request_error(e)))?;
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
        let mut request = self
            .request(reqwest::Method::POST, LINK_MESSAGES_PATH)
            .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .header(reqwest::header::CONTENT_LENGTH, frame.len())
            .timeout(self.request_timeout);
        if let Some(encoding) = encoding {
            request = request.header(reqwest::header::CONTENT_ENCODING, encoding);
        }
        request = match bucket {
            Some(bucket) => request.body(crate::pacing::paced_body(frame, bucket)),
            None => request.body(frame),
        };
        let response = request.send().await.map_err(|e| self.unreachable(request_error(e)))?;
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
        let mut request = self.request(reqwest::Method::GET, &path).timeout(self.request_timeout);
        if let Some(encoding) = &self.batch_encoding {
            request = request.header(reqwest::header::ACCEPT_ENCODING, encoding);
        }
        let response = request.send().await.map_err(|e| self.unreachable(request_error(e)))?;
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
            .request(reqwest::Method::POST, LINK_REPORT_PATH)
            .timeout(self.request_timeout)
            .json(report)
            .send()
            .await
            .map_err(|e| self.unreachable(request_error(e)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(self.refusal(response).await)
        }
    }

    /// Checks that the central answers and accepts this edge.
    pub async fn probe(&self) -> Result<ProbeAnswer, LinkError> {
        let response = self
            .request(reqwest::Method::GET, LINK_PROBE_PATH)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(request_error(e)))?;
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

/// An error with its causes, e.g. "error sending request: connection refused".
/// A request's error with its causes, without the request's URL: the endpoint is named once, by
/// whoever reports the error (`LinkError`'s text, the failover round's list).
fn request_error(error: reqwest::Error) -> String {
    outpost_tls::explain(&error_chain(&error.without_url()))
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
