//! Stage 2 types: the validated sections of a [`super::Config`], in the units and types the code
//! uses (`Duration`, bounded integers), with their defaults. Built only by [`super::validate`].

use std::fmt;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// `[tls]`: the listener serves HTTPS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: edges must present a client certificate signed by this CA and naming their id.
    pub client_ca_file: Option<PathBuf>,
}

/// The TLS files of a client section (`[[upstream]]`, `[[route]]`); all empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// `None`: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate for mTLS; set together with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl ClientTlsFiles {
    pub(super) fn from_raw(ca_file: String, cert_file: String, key_file: String) -> Result<Self, String> {
        if cert_file.is_empty() != key_file.is_empty() {
            return Err("set both cert_file and key_file (the client certificate), or neither".into());
        }
        let path = |s: String| (!s.is_empty()).then(|| PathBuf::from(s));
        Ok(ClientTlsFiles { ca_file: path(ca_file), cert_file: path(cert_file), key_file: path(key_file) })
    }

    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none()
    }
}

#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub client_tokens: Vec<String>,
    pub admin_tokens: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: u64,
    pub max_batch_messages: u32,
    pub max_store_bytes: u64,
    /// `None`: messages never expire.
    pub message_ttl: Option<Duration>,
    /// A write that would create one more queue gets 507 (`too_many_queues`).
    pub max_queues: u32,
    /// Connections beyond this are closed at accept; the others are served on.
    pub max_connections: u32,
    /// A request's headers, and then its body, must each arrive within this (else 408).
    pub request_timeout: Duration,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_batch_messages: 1000,
            max_store_bytes: 10 << 30,
            message_ttl: None,
            max_queues: 10_000,
            max_connections: 4096,
            request_timeout: Duration::from_secs(30),
            idempotency_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Limits {
    /// Upper bound of a batch request body: every message at its maximum plus a `\r\n` line ending,
    /// capped so a single request can never make the node buffer more than 64 MiB.
    pub fn max_batch_body_bytes(&self) -> u64 {
        const BATCH_BODY_CAP_BYTES: u64 = 64 << 20;
        (self.max_message_bytes + 2)
            .saturating_mul(u64::from(self.max_batch_messages))
            .min(BATCH_BODY_CAP_BYTES)
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub url: String,
    pub token: String,
    pub trigger: bool,
    pub tls: ClientTlsFiles,
}

#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub primary_retries: u32,
    pub primary_retry_delay: Duration,
    pub connect_timeout: Duration,
    pub failback_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ConnectivityConfig {
    pub ping_interval: Duration,
    pub missed_pings: u32,
    pub offline_probe_interval: Duration,
    pub transition_to_offline_wait: Duration,
    pub failed_transition_wait: Duration,
    pub block_during_transition: bool,
}

/// How an edge sends its backlog to the central (an outpost extension of the contract's keys).
#[derive(Debug, Clone)]
pub struct ForwardingConfig {
    /// Messages per batch (at most `limits.max_batch_messages`).
    pub batch_messages: u32,
    /// Payload bytes per batch (a single larger message still goes alone).
    pub batch_bytes: u64,
    /// Batches in flight per queue.
    pub in_flight: u32,
    /// Time allowed for one batch request.
    pub request_timeout: Duration,
    /// How batch frames travel: the edge offers it in the handshake, a central accepts it only if
    /// its own `compression` is not `none`.
    pub compression: Compression,
    /// Bytes per second of batch frames on the wire; 0: no cap.
    pub max_bandwidth_bytes_per_second: u64,
}

/// `forwarding.compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

/// The default priority of a queue not listed in `[[queue]]`.
pub const DEFAULT_QUEUE_PRIORITY: u8 = 5;
/// The lowest priority (`[[queue]] priority` is 0 ..= this).
pub const LOWEST_QUEUE_PRIORITY: u8 = 9;

/// One `[[queue]]` entry.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: String,
    /// 0 (first) ..= 9; while a backlog drains, lower numbers go first.
    pub priority: u8,
    /// Overrides `limits.message_ttl` for this queue; `Some(ZERO)`: never expire.
    pub message_ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct EdgeCredential {
    pub id: String,
    pub token: String,
}

#[derive(Debug, Clone)]
pub struct HaConfig {
    pub restart_delay: Duration,
    pub restart_delay_max: Duration,
    pub min_uptime: Duration,
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub queue: String,
    pub urls: Vec<String>,
    pub timeout: Duration,
    pub max_attempts: NonZeroU32,
    pub retry_initial: Duration,
    /// At least `retry_initial`.
    pub retry_max: Duration,
    /// Errors that mean the service is down (default [`ErrorClass::DEFAULT_SERVICE_DOWN`]).
    pub service_down: Vec<ErrorClass>,
    /// Errors that mean the message is at fault (default [`ErrorClass::DEFAULT_POISON`]).
    pub poison: Vec<ErrorClass>,
    pub auto_forward: bool,
    pub probe_interval: Duration,
    /// Deliveries in flight at once (1: one per round trip), at most [`MAX_ROUTE_IN_FLIGHT`]; the
    /// cursor still moves only over a contiguous delivered prefix.
    pub max_in_flight: NonZeroU32,
    /// Messages per POST, at most [`MAX_ROUTE_BATCH`]: 1 posts each message as itself, more posts
    /// an NDJSON body.
    pub batch: NonZeroU32,
    /// For https:// urls (an extension of CONTRACT section 2: `ca_file`, `cert_file`, `key_file`).
    pub tls: ClientTlsFiles,
}

/// The most deliveries a route keeps in flight, and the most messages of one route POST.
pub const MAX_ROUTE_IN_FLIGHT: u32 = 256;
pub const MAX_ROUTE_BATCH: u32 = 10_000;

/// A class of delivery errors as written in a route's `service_down` and `poison`: `connect`,
/// `timeout`, `reset`, `http:<status>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    Connect,
    Timeout,
    Reset,
    /// A status from 100 to 599.
    Http(u16),
}

impl ErrorClass {
    /// `service_down` when a route does not say.
    pub const DEFAULT_SERVICE_DOWN: [ErrorClass; 5] = [
        ErrorClass::Connect,
        ErrorClass::Timeout,
        ErrorClass::Http(502),
        ErrorClass::Http(503),
        ErrorClass::Http(504),
    ];
    /// `poison` when a route does not say.
    pub const DEFAULT_POISON: [ErrorClass; 3] =
        [ErrorClass::Http(400), ErrorClass::Http(413), ErrorClass::Http(422)];
}

impl FromStr for ErrorClass {
    type Err = String;

    fn from_str(text: &str) -> Result<ErrorClass, String> {
        match text {
            "connect" => Ok(ErrorClass::Connect),
            "timeout" => Ok(ErrorClass::Timeout),
            "reset" => Ok(ErrorClass::Reset),
            _ => text
                .strip_prefix("http:")
                .and_then(|code| code.parse::<u16>().ok())
                .filter(|code| (100..=599).contains(code))
                .map(ErrorClass::Http)
                .ok_or_else(|| {
                    format!("unknown error class {text:?}: use connect, timeout, reset or http:<status>")
                }),
        }
    }
}

/// As written in the configuration, so `class.to_string().parse()` gives `class` back.
impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorClass::Connect => f.write_str("connect"),
            ErrorClass::Timeout => f.write_str("timeout"),
            ErrorClass::Reset => f.write_str("reset"),
            ErrorClass::Http(status) => write!(f, "http:{status}"),
        }
    }
}
