//! `outpost ctl`'s HTTP client: one call of the node's API, its JSON on success, and on failure a
//! [`CtlError`] that names the URL and says whether the node answered at all.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::render::truncate;

/// How long `ctl` waits for a TCP connection to the node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one API call may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct Api {
    http: reqwest::Client,
    pub(super) base_url: String,
    token: Option<String>,
}

/// Why a command did not happen. Each variant names the URL, so an operator with several nodes
/// knows which one answered.
#[derive(Debug)]
pub(super) enum CtlError {
    /// No TCP connection: nothing listens there, or a firewall refuses.
    Unreachable { base_url: String, detail: String },
    /// The node answered with an error.
    Api { method: Method, url: String, status: StatusCode, code: String, message: String },
    /// Connected, but the exchange failed (timeout, reset, a reply that is not the API's JSON).
    Exchange { method: Method, url: String, detail: String },
    /// Some of several calls failed; each was reported already.
    Partial(String),
    /// The HTTP client could not be built.
    Client(String),
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::Unreachable { base_url, detail } => {
                write!(f, "cannot connect to {base_url} ({detail}): is outpost running at {base_url}?")
            }
            CtlError::Api { method, url, status, code, message } => {
                write!(f, "{method} {url}: HTTP {status}: {message}")?;
                if !code.is_empty() {
                    write!(f, " [{code}]")?;
                }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN {
                    write!(f, "; pass an admin token with --token or OUTPOST_TOKEN")?;
                }
                Ok(())
            }
            CtlError::Exchange { method, url, detail } => write!(f, "{method} {url}: {detail}"),
            CtlError::Partial(text) | CtlError::Client(text) => f.write_str(text),
        }
    }
}

impl Api {
    pub(super) fn new(
        base_url: String,
        token: Option<String>,
        tls: Option<outpost_tls::rustls::ClientConfig>,
    ) -> Result<Api, CtlError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("outpost-ctl/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(tls);
        }
        let http =
            builder.build().map_err(|e| CtlError::Client(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api { http, base_url, token })
    }

    /// One call; the reply's JSON on 2xx (`null` for an empty body), a [`CtlError`] otherwise.
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let exchange =
            |detail: String| CtlError::Exchange { method: method.clone(), url: url.clone(), detail };
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                CtlError::Unreachable { base_url: self.base_url.clone(), detail: root_cause(&e) }
            } else if e.is_timeout() {
                exchange(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))
            } else {
                exchange(root_cause(&e))
            }
        })?;
        let status = response.status();
        let bytes =
            response.bytes().await.map_err(|e| exchange(format!("reading the reply: {}", root_cause(&e))))?;
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return match parsed {
                Some(value) => Ok(value),
                None if bytes.iter().all(u8::is_ascii_whitespace) => Ok(Value::Null),
                None => {
                    Err(exchange(format!("HTTP {status} with a reply that is not JSON: {}", snippet(&bytes))))
                }
            };
        }
        let error = parsed.as_ref().and_then(|v| v.get("error"));
        let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Value::as_str).map(str::to_string);
        Err(CtlError::Api {
            method,
            url,
            status,
            code: field("code").unwrap_or_default(),
            // Not the API's error shape: most likely not an outpost node, or one too old for this
            // endpoint; the body says which.
            message: field("message").unwrap_or_else(|| match snippet(&bytes) {
                text if text.is_empty() => "(empty reply)".to_string(),
                text => text,
            }),
        })
    }
}

/// The innermost error: "Connection refused (os error 111)" rather than reqwest's outer wrapper.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn snippet(bytes: &[u8]) -> String {
    truncate(String::from_utf8_lossy(bytes).trim(), 200)
}
