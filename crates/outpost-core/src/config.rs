//! Node configuration in two stages: a raw TOML tree merged from file, environment and flags, then
//! validated once into typed values that nothing later re-parses.
//!
//! Precedence, lowest first: defaults, the TOML file, `OUTPOST_*` environment variables, then
//! command-line flags. Every error names where the value came from (file, variable or flag), the key, and what
//! is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::names::validate_name;
use crate::units::{format_duration, parse_duration, parse_size};

/// Which kind of node this configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Edge,
    Central,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Central => "central",
        }
    }

    /// `./outpost-data/edge` or `./outpost-data/central`, so both roles start side by side.
    pub fn default_data_dir(self) -> PathBuf {
        Path::new("./outpost-data").join(self.as_str())
    }

    pub fn default_listen(self) -> &'static str {
        match self {
            Role::Edge => "127.0.0.1:7400",
            Role::Central => "127.0.0.1:7401",
        }
    }
}

/// A configuration problem: where the value came from, which key, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "configuration error in {}: {}", self.origin, self.problem)
        } else {
            write!(f, "configuration error in {}: key `{}`: {}", self.origin, self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Values given on the command line; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub config_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub node_id: Option<String>,
    pub centrals: Vec<String>,
    pub postgres: Option<String>,
}

/// The central an edge uses when neither `[[upstream]]` nor `--central` names one (CONTRACT 1).
pub const DEFAULT_CENTRAL_URL: &str = "http://127.0.0.1:7401";

/// The value of `upstream` (key or `OUTPOST_UPSTREAM`) that says "this edge has no central".
pub const NO_UPSTREAM: &str = "none";

/// Environment variables with the `OUTPOST_` prefix that belong to clients or tests, not to a node.
const NON_CONFIG_ENV: &[&str] = &["URL", "TOKEN", "LOG", "LOG_FORMAT", "HA_READY_FD", "CHILD"];

// ---------------------------------------------------------------------------------------------
// Stage 1: raw, as written.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: Option<String>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    tls: Option<RawTls>,
    auth: Option<RawAuth>,
    #[serde(default)]
    limits: RawLimits,
    /// `None`: not given (an edge then uses [`DEFAULT_CENTRAL_URL`]); `Some(empty)`: explicitly none.
    #[serde(default, deserialize_with = "de_upstreams")]
    upstream: Option<Vec<RawUpstream>>,
    #[serde(default)]
    failover: RawFailover,
    #[serde(default)]
    connectivity: RawConnectivity,
    #[serde(default)]
    forwarding: RawForwarding,
    postgres: Option<String>,
    #[serde(default)]
    edge: Vec<RawEdge>,
    #[serde(default)]
    ha: RawHa,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    queue: Vec<RawQueue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: String,
    #[serde(default, deserialize_with = "de_number")]
    priority: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    message_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
    #[serde(default)]
    client_ca_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default, deserialize_with = "de_string_list")]
    client_tokens: Vec<String>,
    #[serde(default, deserialize_with = "de_string_list")]
    admin_tokens: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default, deserialize_with = "de_size")]
    max_message_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    max_batch_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_size")]
    max_store_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    message_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    max_queues: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    max_connections: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    idempotency_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    #[serde(default)]
    token: String,
    #[serde(default, deserialize_with = "de_bool")]
    trigger: Option<bool>,
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    #[serde(default, deserialize_with = "de_number")]
    primary_retries: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    primary_retry_delay: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    failback_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnectivity {
    #[serde(default, deserialize_with = "de_duration")]
    ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    missed_pings: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    offline_probe_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    transition_to_offline_wait: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    failed_transition_wait: Option<Duration>,
    #[serde(default, deserialize_with = "de_bool")]
    block_during_transition: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwarding {
    #[serde(default, deserialize_with = "de_number")]
    batch_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_size")]
    batch_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    in_flight: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    request_timeout: Option<Duration>,
    #[serde(default)]
    compression: Option<String>,
    #[serde(default, deserialize_with = "de_size")]
    max_bandwidth: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    id: String,
    #[serde(default)]
    token: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHa {
    #[serde(default, deserialize_with = "de_duration")]
    restart_delay: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    restart_delay_max: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    min_uptime: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    max_restarts: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    restart_window: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    ready_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    queue: String,
    #[serde(deserialize_with = "de_string_list_required")]
    urls: Vec<String>,
    #[serde(default, deserialize_with = "de_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    max_attempts: Option<u64>,
    #[serde(default, deserialize_with = "de_duration")]
    retry_initial: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    retry_max: Option<Duration>,
    #[serde(default, deserialize_with = "de_string_list_opt")]
    service_down: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_string_list_opt")]
    poison: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_bool")]
    auto_forward: Option<bool>,
    #[serde(default, deserialize_with = "de_duration")]
    probe_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_number")]
    max_in_flight: Option<u64>,
    #[serde(default, deserialize_with = "de_number")]
    batch: Option<u64>,
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    cert_file: String,
    #[serde(default)]
    key_file: String,
}

// Lenient deserializers: environment variables always arrive as strings, so every scalar accepts
// its native TOML type or a string holding it.

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    Num(u64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrBool {
    Bool(bool),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrList {
    List(Vec<String>),
    Str(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map(Some).map_err(de::Error::custom)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match StrOrNum::deserialize(d)
        .map_err(|_| de::Error::custom("expected a size such as \"1MiB\" or a number of bytes"))?
    {
        StrOrNum::Num(n) => Ok(Some(n)),
        StrOrNum::Str(s) => parse_size(&s).map(Some).map_err(de::Error::custom),
    }
}

fn de_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match StrOrNum::deserialize(d).map_err(|_| de::Error::custom("expected a non-negative whole number"))? {
        StrOrNum::Num(n) => Ok(Some(n)),
        StrOrNum::Str(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("expected a non-negative whole number, got {s:?}"))),
    }
}

fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match StrOrBool::deserialize(d).map_err(|_| de::Error::custom("expected true or false"))? {
        StrOrBool::Bool(b) => Ok(Some(b)),
        StrOrBool::Str(s) => match s.trim() {
            "true" | "1" | "yes" => Ok(Some(true)),
            "false" | "0" | "no" => Ok(Some(false)),
            other => Err(de::Error::custom(format!("expected true or false, got {other:?}"))),
        },
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// `[[upstream]]` tables, or the string `"none"` (an edge without a central, e.g. from
/// `OUTPOST_UPSTREAM=none`).
fn de_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RawUpstream>>, D::Error> {
    struct UpstreamsVisitor;
    impl<'de> de::Visitor<'de> for UpstreamsVisitor {
        type Value = Option<Vec<RawUpstream>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(
                f,
                "[[upstream]] tables each with a `url`, or \"{NO_UPSTREAM}\" for an edge without a central"
            )
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            if s.trim() == NO_UPSTREAM {
                Ok(Some(Vec::new()))
            } else {
                Err(E::custom(format!("expected [[upstream]] tables or \"{NO_UPSTREAM}\", got {s:?}")))
            }
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            // Deserialized through the given access, so errors keep their path (upstream[0].url).
            Vec::<RawUpstream>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Some)
        }
    }
    d.deserialize_any(UpstreamsVisitor)
}

fn de_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match StrOrList::deserialize(d)
        .map_err(|_| de::Error::custom("expected a list of strings (or a comma-separated string)"))?
    {
        StrOrList::List(v) => Ok(v),
        StrOrList::Str(s) => Ok(split_list(&s)),
    }
}

fn de_string_list_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    de_string_list(d).map(Some)
}

fn de_string_list_required<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    de_string_list(d)
}

// ---------------------------------------------------------------------------------------------
// Stage 2: typed and validated.
// ---------------------------------------------------------------------------------------------

/// The validated configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub node_id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: Option<TlsConfig>,
    /// `None`: no `[auth]` section, every request is allowed.
    pub auth: Option<AuthConfig>,
    pub limits: Limits,
    pub upstreams: Vec<Upstream>,
    pub failover: FailoverConfig,
    pub connectivity: ConnectivityConfig,
    pub forwarding: ForwardingConfig,
    /// `None`: the embedded store.
    pub postgres: Option<String>,
    pub edges: Vec<EdgeCredential>,
    pub ha: HaConfig,
    pub routes: Vec<RouteConfig>,
    /// `[[queue]]`: per-queue settings; a queue not listed has the defaults.
    pub queues: Vec<QueueConfig>,
    /// Where the configuration came from, for the startup log line.
    pub sources: Vec<String>,
}

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
    fn from_raw(ca_file: String, cert_file: String, key_file: String) -> Result<Self, String> {
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

impl Config {
    /// The priority of `queue` (`[[queue]] priority`, default 5).
    pub fn queue_priority(&self, queue: &str) -> u8 {
        self.queues.iter().find(|q| q.name == queue).map_or(DEFAULT_QUEUE_PRIORITY, |q| q.priority)
    }

    /// The TTL of `queue`'s messages: its `[[queue]] message_ttl`, else `limits.message_ttl`;
    /// `None`: never expire.
    pub fn queue_message_ttl(&self, queue: &str) -> Option<Duration> {
        match self.queues.iter().find(|q| q.name == queue).and_then(|q| q.message_ttl) {
            Some(ttl) if ttl.is_zero() => None,
            Some(ttl) => Some(ttl),
            None => self.limits.message_ttl,
        }
    }
}

impl Config {
    /// Loads the configuration of a node: the file named by `--config` (if any), the process
    /// environment, then flags.
    pub fn load(role: Role, flags: &Flags) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(role, flags, &env)
    }

    /// Like [`Config::load`] with an explicit environment (tests).
    pub fn load_from(role: Role, flags: &Flags, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut tree = toml::Table::new();
        let mut origins = Origins::default();
        let mut sources = Vec::new();

        if let Some(path) = &flags.config_file {
            let origin = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                origin: origin.clone(),
                key: String::new(),
                problem: format!("cannot read the file: {e}"),
            })?;
            tree = text.parse::<toml::Table>().map_err(|e| ConfigError {
                origin: origin.clone(),
                key: String::new(),
                problem: format!("not valid TOML: {}", e.to_string().trim()),
            })?;
            origins.default_origin = origin.clone();
            sources.push(format!("file {origin}"));
        }

        for (name, value) in env {
            let Some(rest) = name.strip_prefix("OUTPOST_") else { continue };
            if NON_CONFIG_ENV.contains(&rest) || rest.starts_with("TEST_") {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            set_path(&mut tree, &path, toml::Value::String(value.clone())).map_err(|problem| {
                ConfigError { origin: format!("environment variable {name}"), key: path.join("."), problem }
            })?;
            origins.by_key.insert(path.join("."), format!("environment variable {name}"));
            sources.push(format!("env {name}"));
        }
        apply_flags(&mut tree, &mut origins, flags);

        let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            ConfigError {
                origin: origins.of(&key),
                key,
                problem: without_type_names(&e.into_inner().to_string()),
            }
        })?;
        let mut config = validate(role, raw, &origins)?;
        config.sources = sources;
        Ok(config)
    }

    /// The configuration as TOML-like lines for the startup log, with every secret redacted.
    pub fn redacted_summary(&self) -> String {
        let redact = |v: &[String]| format!("[{} redacted]", v.len());
        let upstreams: Vec<String> = self
            .upstreams
            .iter()
            .map(|u| {
                format!(
                    "{}(trigger={},token={})",
                    u.url,
                    u.trigger,
                    if u.token.is_empty() { "none" } else { "redacted" }
                )
            })
            .collect();
        format!(
            "role={} node_id={} listen={} data_dir={} tls={} auth={} max_message_bytes={} \
             max_batch_messages={} max_store_bytes={} message_ttl={} upstreams=[{}] \
             ping_interval={} missed_pings={} postgres={} edges={} routes=[{}]",
            self.role.as_str(),
            self.node_id,
            self.listen,
            self.data_dir.display(),
            match &self.tls {
                None => "off".to_string(),
                Some(t) => format!(
                    "(cert_file={} key_file={} client_ca_file={})",
                    t.cert_file.display(),
                    t.key_file.display(),
                    t.client_ca_file.as_ref().map_or("none".to_string(), |f| f.display().to_string())
                ),
            },
            match &self.auth {
                None => "off".to_string(),
                Some(a) => format!(
                    "client_tokens={} admin_tokens={}",
                    redact(&a.client_tokens),
                    redact(&a.admin_tokens)
                ),
            },
            self.limits.max_message_bytes,
            self.limits.max_batch_messages,
            self.limits.max_store_bytes,
            self.limits.message_ttl.map(format_duration).unwrap_or_else(|| "0s".into()),
            upstreams.join(", "),
            format_duration(self.connectivity.ping_interval),
            self.connectivity.missed_pings,
            match &self.postgres {
                None => "embedded".to_string(),
                Some(url) => redact_url(url),
            },
            self.edges.len(),
            self.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
        )
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let after = &url[scheme_end + 3..];
    let Some(at) = after.find('@') else { return url.to_string() };
    let userinfo = &after[..at];
    match userinfo.find(':') {
        Some(colon) => format!("{}://{}:***{}", &url[..scheme_end], &userinfo[..colon], &after[at..]),
        None => url.to_string(),
    }
}

#[derive(Default)]
struct Origins {
    default_origin: String,
    by_key: BTreeMap<String, String>,
}

impl Origins {
    fn of(&self, key: &str) -> String {
        // The most specific recorded prefix of the key wins: "connectivity.ping_interval" may have
        // come from an environment variable while the rest of "connectivity" came from the file.
        let mut best: Option<&String> = None;
        for (recorded, origin) in &self.by_key {
            if key == recorded
                || key.starts_with(&format!("{recorded}."))
                || key.starts_with(&format!("{recorded}["))
            {
                best = Some(origin);
            }
        }
        match best {
            Some(origin) => origin.clone(),
            None if self.default_origin.is_empty() => "the defaults".to_string(),
            None => self.default_origin.clone(),
        }
    }
}

fn apply_flags(tree: &mut toml::Table, origins: &mut Origins, flags: &Flags) {
    let previous_upstreams: Vec<toml::Value> = match tree.get("upstream") {
        Some(toml::Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let mut set = |key: &str, flag: &str, value: toml::Value| {
        tree.insert(key.to_string(), value);
        origins.by_key.insert(key.to_string(), format!("flag {flag}"));
    };
    if let Some(listen) = &flags.listen {
        set("listen", "--listen", toml::Value::String(listen.clone()));
    }
    if let Some(dir) = &flags.data_dir {
        set("data_dir", "--data-dir", toml::Value::String(dir.display().to_string()));
    }
    if let Some(id) = &flags.node_id {
        set("node_id", "--node-id", toml::Value::String(id.clone()));
    }
    if let Some(url) = &flags.postgres {
        set("postgres", "--postgres", toml::Value::String(url.clone()));
    }
    if !flags.centrals.is_empty() {
        // --central replaces the file's upstream list; a token for it can still come from the
        // environment (OUTPOST_UPSTREAM__0__TOKEN is not supported, so tokens ride in the file).
        let upstreams = flags
            .centrals
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let mut table = match previous_upstreams.get(i) {
                    Some(toml::Value::Table(t)) => t.clone(),
                    _ => toml::Table::new(),
                };
                table.insert("url".into(), toml::Value::String(url.clone()));
                toml::Value::Table(table)
            })
            .collect();
        set("upstream", "--central", toml::Value::Array(upstreams));
    }
}

/// serde names the Rust type it expected ("expected struct RawLimits"); an operator wrote TOML, so
/// say what that is in TOML instead.
fn without_type_names(problem: &str) -> String {
    let mut out = String::with_capacity(problem.len());
    let mut rest = problem;
    while let Some(at) = rest.find("struct Raw") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "struct Raw".len()..];
        let name_len = after.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(after.len());
        out.push_str("a table (a [section] of keys)");
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

fn set_path(tree: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut table = tree;
    for part in parents {
        let entry = table.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("`{part}` is not a section, so it cannot have sub-keys")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

fn validate(role: Role, raw: RawConfig, origins: &Origins) -> Result<Config, ConfigError> {
    let err =
        |key: &str, problem: String| ConfigError { origin: origins.of(key), key: key.to_string(), problem };

    let node_id = match raw.node_id {
        Some(id) => id,
        None => host_name(),
    };
    validate_name(&node_id).map_err(|p| err("node_id", p))?;

    let listen_text = raw.listen.unwrap_or_else(|| role.default_listen().to_string());
    let listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| err("listen", format!("{listen_text:?} is not an address like \"127.0.0.1:7400\"")))?;

    let data_dir = raw.data_dir.unwrap_or_else(|| role.default_data_dir());
    if data_dir.as_os_str().is_empty() {
        return Err(err("data_dir", "must not be empty".into()));
    }

    let tls = match raw.tls {
        None => None,
        Some(t) if t.cert_file.is_empty() && t.key_file.is_empty() => {
            if !t.client_ca_file.is_empty() {
                return Err(err("tls.client_ca_file", "needs tls.cert_file and tls.key_file".into()));
            }
            None
        }
        Some(t) => {
            if t.cert_file.is_empty() || t.key_file.is_empty() {
                return Err(err("tls", "set both cert_file and key_file, or neither".into()));
            }
            Some(TlsConfig {
                cert_file: PathBuf::from(t.cert_file),
                key_file: PathBuf::from(t.key_file),
                client_ca_file: (!t.client_ca_file.is_empty()).then(|| PathBuf::from(t.client_ca_file)),
            })
        }
    };

    let auth = raw.auth.map(|a| AuthConfig { client_tokens: a.client_tokens, admin_tokens: a.admin_tokens });
    if let Some(a) = &auth {
        if a.client_tokens.iter().chain(&a.admin_tokens).any(|t| t.trim().is_empty()) {
            return Err(err("auth", "tokens must not be empty strings".into()));
        }
    }

    let defaults = Limits::default();
    let limits = Limits {
        max_message_bytes: raw.limits.max_message_bytes.unwrap_or(defaults.max_message_bytes),
        max_batch_messages: positive_u32(raw.limits.max_batch_messages, defaults.max_batch_messages)
            .map_err(|p| err("limits.max_batch_messages", p))?,
        max_store_bytes: raw.limits.max_store_bytes.unwrap_or(defaults.max_store_bytes),
        message_ttl: raw.limits.message_ttl.filter(|d| !d.is_zero()),
        max_queues: positive_u32(raw.limits.max_queues, defaults.max_queues)
            .map_err(|p| err("limits.max_queues", p))?,
        max_connections: positive_u32(raw.limits.max_connections, defaults.max_connections)
            .map_err(|p| err("limits.max_connections", p))?,
        request_timeout: nonzero(raw.limits.request_timeout, defaults.request_timeout)
            .map_err(|p| err("limits.request_timeout", p))?,
        idempotency_ttl: nonzero(raw.limits.idempotency_ttl, defaults.idempotency_ttl)
            .map_err(|p| err("limits.idempotency_ttl", p))?,
    };
    if limits.max_message_bytes == 0 {
        return Err(err("limits.max_message_bytes", "must be at least 1 byte".into()));
    }
    if limits.max_store_bytes < limits.max_message_bytes {
        return Err(err("limits.max_store_bytes", "must be at least limits.max_message_bytes".into()));
    }

    let raw_upstreams = match (role, raw.upstream) {
        (_, Some(given)) => given,
        (Role::Edge, None) => {
            vec![RawUpstream { url: DEFAULT_CENTRAL_URL.to_string(), ..RawUpstream::default() }]
        }
        (Role::Central, None) => Vec::new(),
    };
    let mut upstreams = Vec::new();
    for (i, u) in raw_upstreams.into_iter().enumerate() {
        let key = format!("upstream[{i}].url");
        validate_http_url(&u.url).map_err(|p| err(&key, p))?;
        upstreams.push(Upstream {
            url: u.url.trim_end_matches('/').to_string(),
            token: u.token,
            trigger: u.trigger.unwrap_or(true),
            tls: ClientTlsFiles::from_raw(u.ca_file, u.cert_file, u.key_file)
                .map_err(|p| err(&format!("upstream[{i}].cert_file"), p))?,
        });
    }

    let failover = FailoverConfig {
        primary_retries: u32::try_from(raw.failover.primary_retries.unwrap_or(0))
            .map_err(|_| err("failover.primary_retries", "too large".into()))?,
        primary_retry_delay: raw.failover.primary_retry_delay.unwrap_or(Duration::from_secs(5)),
        connect_timeout: nonzero(raw.failover.connect_timeout, Duration::from_secs(5))
            .map_err(|p| err("failover.connect_timeout", p))?,
        failback_interval: nonzero(raw.failover.failback_interval, Duration::from_secs(60))
            .map_err(|p| err("failover.failback_interval", p))?,
    };

    let c = raw.connectivity;
    let connectivity = ConnectivityConfig {
        ping_interval: nonzero(c.ping_interval, Duration::from_secs(300))
            .map_err(|p| err("connectivity.ping_interval", p))?,
        missed_pings: positive_u32(c.missed_pings, 3).map_err(|p| err("connectivity.missed_pings", p))?,
        offline_probe_interval: nonzero(c.offline_probe_interval, Duration::from_secs(60))
            .map_err(|p| err("connectivity.offline_probe_interval", p))?,
        transition_to_offline_wait: c.transition_to_offline_wait.unwrap_or(Duration::from_secs(10)),
        failed_transition_wait: c.failed_transition_wait.unwrap_or(Duration::from_secs(3600)),
        block_during_transition: c.block_during_transition.unwrap_or(false),
    };

    let fw = raw.forwarding;
    let forwarding = ForwardingConfig {
        batch_messages: positive_u32(fw.batch_messages, 1000)
            .map_err(|p| err("forwarding.batch_messages", p))?,
        batch_bytes: fw.batch_bytes.unwrap_or(4 << 20).max(1),
        in_flight: positive_u32(fw.in_flight, 4).map_err(|p| err("forwarding.in_flight", p))?,
        request_timeout: nonzero(fw.request_timeout, Duration::from_secs(30))
            .map_err(|p| err("forwarding.request_timeout", p))?,
        compression: match fw.compression.as_deref().map(str::trim) {
            None | Some("zstd") => Compression::Zstd,
            Some("none") => Compression::None,
            Some(other) => {
                return Err(err(
                    "forwarding.compression",
                    format!("{other:?}: expected \"zstd\" or \"none\""),
                ))
            }
        },
        max_bandwidth_bytes_per_second: fw.max_bandwidth.unwrap_or(0),
    };
    if forwarding.max_bandwidth_bytes_per_second != 0 && forwarding.max_bandwidth_bytes_per_second < 1024 {
        return Err(err("forwarding.max_bandwidth", "at least 1KiB per second, or \"0\" for no cap".into()));
    }
    if forwarding.in_flight > 64 {
        return Err(err("forwarding.in_flight", "at most 64 batches in flight".into()));
    }

    let postgres = raw.postgres.filter(|p| !p.trim().is_empty());
    if let Some(url) = &postgres {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(err("postgres", "expected a URL like \"postgres://user@host:5432/db\"".into()));
        }
    }

    let mut edges = Vec::new();
    for (i, e) in raw.edge.into_iter().enumerate() {
        validate_name(&e.id).map_err(|p| err(&format!("edge[{i}].id"), p))?;
        if edges.iter().any(|x: &EdgeCredential| x.id == e.id) {
            return Err(err(&format!("edge[{i}].id"), format!("edge {:?} is listed twice", e.id)));
        }
        edges.push(EdgeCredential { id: e.id, token: e.token });
    }

    match role {
        Role::Edge => {
            if postgres.is_some() {
                return Err(err(
                    "postgres",
                    "only a central uses PostgreSQL; remove it from an edge's configuration".into(),
                ));
            }
            if !edges.is_empty() {
                return Err(err(
                    "edge",
                    "[[edge]] lists the edges a central accepts; remove it from an edge's configuration"
                        .into(),
                ));
            }
        }
        Role::Central => {
            if !upstreams.is_empty() {
                return Err(err(
                    "upstream",
                    "a central has no upstream; [[upstream]] and --central are for edges".into(),
                ));
            }
        }
    }

    let h = raw.ha;
    let ha = HaConfig {
        restart_delay: h.restart_delay.unwrap_or(Duration::from_secs(2)),
        restart_delay_max: h.restart_delay_max.unwrap_or(Duration::from_secs(60)),
        min_uptime: h.min_uptime.unwrap_or(Duration::from_secs(60)),
        max_restarts: u32::try_from(h.max_restarts.unwrap_or(10))
            .map_err(|_| err("ha.max_restarts", "too large".into()))?,
        restart_window: h.restart_window.unwrap_or(Duration::from_secs(600)),
        ready_timeout: nonzero(h.ready_timeout, Duration::from_secs(30))
            .map_err(|p| err("ha.ready_timeout", p))?,
    };
    if ha.restart_delay_max < ha.restart_delay {
        return Err(err("ha.restart_delay_max", "must be at least ha.restart_delay".into()));
    }

    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.route.into_iter().enumerate() {
        let key = |field: &str| format!("route[{i}].{field}");
        validate_name(&r.name).map_err(|p| err(&key("name"), p))?;
        if routes.iter().any(|x| x.name == r.name) {
            return Err(err(&key("name"), format!("route {:?} is defined twice", r.name)));
        }
        validate_name(&r.queue).map_err(|p| err(&key("queue"), p))?;
        if r.urls.is_empty() {
            return Err(err(&key("urls"), "list at least one URL".into()));
        }
        for url in &r.urls {
            validate_http_url(url).map_err(|p| err(&key("urls"), p))?;
        }
        let service_down = r.service_down.unwrap_or_else(|| {
            ["connect", "timeout", "http:502", "http:503", "http:504"].map(String::from).to_vec()
        });
        let poison =
            r.poison.unwrap_or_else(|| ["http:400", "http:413", "http:422"].map(String::from).to_vec());
        for class in service_down.iter().chain(&poison) {
            validate_error_class(class).map_err(|p| err(&key("service_down"), p))?;
        }
        let retry_initial =
            nonzero(r.retry_initial, Duration::from_secs(1)).map_err(|p| err(&key("retry_initial"), p))?;
        let retry_max =
            nonzero(r.retry_max, Duration::from_secs(300)).map_err(|p| err(&key("retry_max"), p))?;
        if retry_max < retry_initial {
            return Err(err(&key("retry_max"), "must be at least retry_initial".into()));
        }
        routes.push(RouteConfig {
            name: r.name,
            queue: r.queue,
            urls: r.urls,
            timeout: nonzero(r.timeout, Duration::from_secs(10)).map_err(|p| err(&key("timeout"), p))?,
            max_attempts: positive_u32(r.max_attempts, 10).map_err(|p| err(&key("max_attempts"), p))?,
            retry_initial,
            retry_max,
            service_down,
            poison,
            auto_forward: r.auto_forward.unwrap_or(false),
            probe_interval: nonzero(r.probe_interval, Duration::from_secs(30))
                .map_err(|p| err(&key("probe_interval"), p))?,
            max_in_flight: bounded_u32(r.max_in_flight, 1, MAX_ROUTE_IN_FLIGHT)
                .map_err(|p| err(&key("max_in_flight"), p))?,
            batch: bounded_u32(r.batch, 1, MAX_ROUTE_BATCH).map_err(|p| err(&key("batch"), p))?,
            tls: ClientTlsFiles::from_raw(r.ca_file, r.cert_file, r.key_file)
                .map_err(|p| err(&key("cert_file"), p))?,
        });
    }

    let mut queues: Vec<QueueConfig> = Vec::new();
    for (i, q) in raw.queue.into_iter().enumerate() {
        let key = |field: &str| format!("queue[{i}].{field}");
        validate_name(&q.name).map_err(|p| err(&key("name"), p))?;
        if queues.iter().any(|x| x.name == q.name) {
            return Err(err(&key("name"), format!("queue {:?} is listed twice", q.name)));
        }
        let priority = match q.priority {
            None => DEFAULT_QUEUE_PRIORITY,
            Some(p) if p <= u64::from(LOWEST_QUEUE_PRIORITY) => p as u8,
            Some(p) => {
                return Err(err(
                    &key("priority"),
                    format!("{p}: expected 0 (first) to {LOWEST_QUEUE_PRIORITY}"),
                ))
            }
        };
        queues.push(QueueConfig { name: q.name, priority, message_ttl: q.message_ttl });
    }

    Ok(Config {
        role,
        node_id,
        listen,
        data_dir,
        tls,
        auth,
        limits,
        upstreams,
        failover,
        connectivity,
        forwarding,
        postgres,
        edges,
        ha,
        routes,
        queues,
        sources: Vec::new(),
    })
}

fn bounded_u32(value: Option<u64>, default: u32, max: u32) -> Result<u32, String> {
    match value {
        None => Ok(default),
        Some(n) if n >= 1 && n <= u64::from(max) => Ok(n as u32),
        Some(n) => Err(format!("{n}: expected 1 to {max}")),
    }
}

fn positive_u32(value: Option<u64>, default: u32) -> Result<u32, String> {
    match value {
        None => Ok(default),
        Some(0) => Err("must be at least 1".into()),
        Some(n) => u32::try_from(n).map_err(|_| format!("{n} is too large")),
    }
}

fn nonzero(value: Option<Duration>, default: Duration) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        Some(d) if d.is_zero() => Err("must be longer than 0s".into()),
        Some(d) => Ok(d),
    }
}

fn validate_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}

fn validate_error_class(class: &str) -> Result<(), String> {
    match class {
        "connect" | "timeout" | "reset" => Ok(()),
        _ => match class.strip_prefix("http:") {
            Some(code) if code.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)) => Ok(()),
            _ => Err(format!("unknown error class {class:?}: use connect, timeout, reset or http:<status>")),
        },
    }
}

/// The machine's host name, reduced to the characters a node id may hold.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "outpost".into());
    let cleaned: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(128)
        .collect();
    if cleaned.is_empty() {
        "outpost".into()
    } else {
        cleaned
    }
}

/// The path of a file inside the data directory.
pub fn data_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile_path::TempPath, Flags) {
        let path = tempfile_path::TempPath::new(text);
        let flags = Flags { config_file: Some(path.0.clone()), ..Flags::default() };
        (path, flags)
    }

    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path =
                    std::env::temp_dir().join(format!("outpost-config-test-{}-{n}.toml", std::process::id()));
                std::fs::write(&path, text).unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_without_any_config() {
        let c = Config::load_from(Role::Edge, &Flags::default(), &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7400");
        assert_eq!(c.data_dir, PathBuf::from("./outpost-data/edge"));
        let urls: Vec<_> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(urls, [DEFAULT_CENTRAL_URL], "an edge with no upstream uses the default central");
        assert_eq!(c.connectivity.ping_interval, Duration::from_secs(300));
        assert_eq!(c.limits.max_message_bytes, 1 << 20);
        assert!(c.auth.is_none());
        let c = Config::load_from(Role::Central, &Flags::default(), &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7401");
        assert_eq!(c.data_dir, PathBuf::from("./outpost-data/central"));
        assert!(c.upstreams.is_empty());
    }

    #[test]
    fn an_edge_can_say_it_has_no_upstream() {
        let env = vec![("OUTPOST_UPSTREAM".to_string(), "none".to_string())];
        let c = Config::load_from(Role::Edge, &Flags::default(), &env).unwrap();
        assert!(c.upstreams.is_empty());
        let (_f, flags) = write("upstream = \"none\"\n");
        assert!(Config::load_from(Role::Edge, &flags, &[]).unwrap().upstreams.is_empty());
        let e = Config::load_from(Role::Edge, &flags.clone(), &[("OUTPOST_UPSTREAM".into(), "nope".into())])
            .unwrap_err();
        assert_eq!(e.key, "upstream", "{e}");
        // --central wins over "none" from the environment.
        let flags = Flags { centrals: vec!["http://a:1".into()], ..Flags::default() };
        assert_eq!(Config::load_from(Role::Edge, &flags, &env).unwrap().upstreams.len(), 1);
    }

    #[test]
    fn wan_keys_forwarding_queues_and_route_windows() {
        let c = Config::load_from(Role::Edge, &Flags::default(), &[]).unwrap();
        assert_eq!(c.forwarding.compression, Compression::Zstd);
        assert_eq!(c.forwarding.max_bandwidth_bytes_per_second, 0);
        assert_eq!(c.queue_priority("anything"), DEFAULT_QUEUE_PRIORITY);
        assert_eq!(c.queue_message_ttl("anything"), None);
        let (_f, flags) = write(
            "[limits]\nmessage_ttl = \"1h\"\n[forwarding]\ncompression = \"none\"\nmax_bandwidth = \"256KiB\"\n\
             [[queue]]\nname = \"alarms\"\npriority = 0\nmessage_ttl = \"5m\"\n\
             [[queue]]\nname = \"audit\"\nmessage_ttl = \"0s\"\n\
             [[route]]\nname = \"r\"\nqueue = \"alarms\"\nurls = [\"http://x/\"]\nmax_in_flight = 32\nbatch = 100\n",
        );
        let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
        assert_eq!(c.forwarding.compression, Compression::None);
        assert_eq!(c.forwarding.max_bandwidth_bytes_per_second, 256 << 10);
        assert_eq!(c.queue_priority("alarms"), 0);
        assert_eq!(c.queue_priority("audit"), DEFAULT_QUEUE_PRIORITY);
        assert_eq!(c.queue_message_ttl("alarms"), Some(Duration::from_secs(300)));
        assert_eq!(c.queue_message_ttl("audit"), None, "0s: never, whatever limits says");
        assert_eq!(c.queue_message_ttl("other"), Some(Duration::from_secs(3600)));
        assert_eq!((c.routes[0].max_in_flight, c.routes[0].batch), (32, 100));
        for (text, key) in [
            ("[forwarding]\ncompression = \"gzip\"\n", "forwarding.compression"),
            ("[forwarding]\nmax_bandwidth = 100\n", "forwarding.max_bandwidth"),
            ("[[queue]]\nname = \"q\"\npriority = 10\n", "queue[0].priority"),
            ("[[queue]]\nname = \"q\"\n[[queue]]\nname = \"q\"\n", "queue[1].name"),
            (
                "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\nmax_in_flight = 0\n",
                "route[0].max_in_flight",
            ),
            (
                "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\nbatch = 100000\n",
                "route[0].batch",
            ),
        ] {
            let (_f, flags) = write(text);
            let error = Config::load_from(Role::Edge, &flags, &[]).unwrap_err();
            assert_eq!(error.key, key, "{text}: {error}");
        }
    }

    #[test]
    fn precedence_file_then_env_then_flags() {
        let (_f, mut flags) =
            write("listen = \"127.0.0.1:9000\"\n[connectivity]\nping_interval = \"10s\"\nmissed_pings = 5\n");
        let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.connectivity.missed_pings, 5);
        flags.listen = Some("127.0.0.1:9001".into());
        let env = vec![
            ("OUTPOST_LISTEN".to_string(), "127.0.0.1:9002".to_string()),
            ("OUTPOST_CONNECTIVITY__PING_INTERVAL".to_string(), "2s".to_string()),
            ("OUTPOST_CONNECTIVITY__MISSED_PINGS".to_string(), "7".to_string()),
            ("OUTPOST_URL".to_string(), "ignored by nodes".to_string()),
        ];
        let c = Config::load_from(Role::Edge, &flags, &env).unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.connectivity.ping_interval, Duration::from_secs(2));
        assert_eq!(c.connectivity.missed_pings, 7);
    }

    #[test]
    fn errors_name_origin_key_and_problem() {
        type Case<'a> = (&'a str, Vec<(String, String)>, &'a str, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (
                "[connectivity]\nping_interval = \"5x\"\n",
                vec![],
                ".toml",
                "connectivity.ping_interval",
                "unknown unit",
            ),
            ("bogus = 1\n", vec![], ".toml", "", "unknown field `bogus`"),
            (
                "[limits]\nmax_batch_messages = 0\n",
                vec![],
                ".toml",
                "limits.max_batch_messages",
                "at least 1",
            ),
            ("listen = \"nowhere\"\n", vec![], ".toml", "listen", "not an address"),
            (
                "",
                vec![("OUTPOST_LIMITS__MAX_STORE_BYTES".into(), "lots".into())],
                "OUTPOST_LIMITS__MAX_STORE_BYTES",
                "limits.max_store_bytes",
                "invalid size",
            ),
            ("", vec![("OUTPOST_NOPE".into(), "1".into())], "OUTPOST_NOPE", "nope", "unknown field `nope`"),
            (
                "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"ftp://x\"]\n",
                vec![],
                ".toml",
                "route[0].urls",
                "not an http",
            ),
            (
                "[[upstream]]\nurl = \"http://x\"\ntrigger = \"maybe\"\n",
                vec![],
                ".toml",
                "upstream[0].trigger",
                "true or false",
            ),
        ];
        for (file, env, origin, key, problem) in cases {
            let (_f, flags) = write(file);
            let e = Config::load_from(Role::Edge, &flags, &env).unwrap_err();
            assert!(e.origin.contains(origin), "{file}: origin {e}");
            if !key.is_empty() {
                assert_eq!(e.key, key, "{file}: {e}");
            }
            assert!(e.to_string().contains(problem), "{file}: {e}");
        }
    }

    #[test]
    fn errors_never_name_internal_types() {
        for text in
            ["limits = 5\n", "failover = \"x\"\n", "[[route]]\nname = 1\n", "upstream = [1]\n", "tls = 3\n"]
        {
            let (_f, flags) = write(text);
            let e = Config::load_from(Role::Edge, &flags, &[]).unwrap_err().to_string();
            assert!(!e.contains("Raw") && !e.contains("struct"), "{text:?}: {e}");
        }
    }

    #[test]
    fn centrals_flag_sets_ordered_upstreams() {
        let flags = Flags { centrals: vec!["http://a:1".into(), "http://b:2/".into()], ..Flags::default() };
        let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
        let urls: Vec<_> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(urls, ["http://a:1", "http://b:2"]);
        assert!(c.upstreams.iter().all(|u| u.trigger));
    }

    #[test]
    fn role_specific_sections_are_checked() {
        let (_f, flags) = write("[[upstream]]\nurl = \"http://x:1\"\n");
        assert!(Config::load_from(Role::Central, &flags, &[])
            .unwrap_err()
            .to_string()
            .contains("a central has no upstream"));
        let (_f, flags) = write("postgres = \"postgres://x@y/z\"\n");
        assert!(Config::load_from(Role::Edge, &flags, &[]).is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let (_f, flags) = write("[auth]\nclient_tokens = [\"sekrit1\"]\nadmin_tokens = [\"sekrit2\"]\n");
        let c = Config::load_from(
            Role::Central,
            &Flags { postgres: Some("postgres://u:pw@h/db".into()), ..flags },
            &[],
        )
        .unwrap();
        let summary = c.redacted_summary();
        assert!(!summary.contains("sekrit") && !summary.contains(":pw@"), "{summary}");
        assert!(summary.contains("postgres://u:***@h/db"));
    }
}
