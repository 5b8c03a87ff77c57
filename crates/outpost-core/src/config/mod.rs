//! Node configuration in two stages: a raw TOML tree merged from file, environment and flags, then
//! validated once into typed values that nothing later re-parses.
//!
//! Precedence, lowest first: defaults, the TOML file, `OUTPOST_*` environment variables, then
//! command-line flags. Every error names where the value came from (file, variable or flag), the key, and what
//! is wrong.
//!
//! - [`raw`]: the sections as written (`deny_unknown_fields`), with lenient scalars, since
//!   environment variables always arrive as strings.
//! - [`layer`]: file, environment and flags merged into one tree that remembers each key's origin.
//! - [`validate`]: raw sections into the typed ones of [`sections`], one function per section.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::redact::redact_url;
use crate::units::format_duration;

mod layer;
mod raw;
mod sections;
mod validate;

pub use sections::*;

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

impl Config {
    /// Loads the configuration of a node: the file named by `--config` (if any), the process
    /// environment, then flags.
    pub fn load(role: Role, flags: &Flags) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(role, flags, &env)
    }

    /// Like [`Config::load`] with an explicit environment (tests).
    pub fn load_from(role: Role, flags: &Flags, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let layered = layer::layer(flags, env)?;
        let mut config = validate::validate(role, layered.raw, &layered.origins)?;
        config.sources = layered.sources;
        Ok(config)
    }

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
mod tests;
