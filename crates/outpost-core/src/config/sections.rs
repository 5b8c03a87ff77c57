//! Stage 2 types: the validated sections of a [`super::Config`], in the units and types the code
//! uses (`Duration`, bounded integers), with their defaults. Built only by [`super::validate`].

use std::path::PathBuf;
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
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub service_down: Vec<String>,
    pub poison: Vec<String>,
    pub auto_forward: bool,
    pub probe_interval: Duration,
    /// Deliveries in flight at once (1: one per round trip); the cursor still moves only over a
    /// contiguous delivered prefix.
    pub max_in_flight: u32,
    /// Messages per POST: 1 posts each message as itself, more posts an NDJSON body.
    pub batch: u32,
    /// For https:// urls (an extension of CONTRACT section 2: `ca_file`, `cert_file`, `key_file`).
    pub tls: ClientTlsFiles,
}

/// The most deliveries a route keeps in flight, and the most messages of one route POST.
pub const MAX_ROUTE_IN_FLIGHT: u32 = 256;
pub const MAX_ROUTE_BATCH: u32 = 10_000;
