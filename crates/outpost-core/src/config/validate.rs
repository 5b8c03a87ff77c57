//! Stage 2 of loading: the raw sections into the typed ones, one function per section, called in
//! the order the file reads so that the first error reported is the first one written. Every
//! error names the key and, through [`Origins`], the file, variable or flag its value came from.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::layer::Origins;
use super::raw::{
    RawAuth, RawConfig, RawConnectivity, RawEdge, RawFailover, RawForwarding, RawHa, RawLimits, RawQueue,
    RawRoute, RawTls, RawUpstream,
};
use super::*;
use crate::names::validate_name;

pub(super) fn validate(role: Role, raw: RawConfig, origins: &Origins) -> Result<Config, ConfigError> {
    let blame = Blame(origins);
    let node_id = node_id(raw.node_id, &blame)?;
    let listen = listen(role, raw.listen, &blame)?;
    let data_dir = data_dir(role, raw.data_dir, &blame)?;
    let tls = tls(raw.tls, &blame)?;
    let auth = auth(raw.auth, &blame)?;
    let limits = limits(raw.limits, &blame)?;
    let upstreams = upstreams(role, raw.upstream, &blame)?;
    let failover = failover(raw.failover, &blame)?;
    let connectivity = connectivity(raw.connectivity, &blame)?;
    let forwarding = forwarding(raw.forwarding, &blame)?;
    let postgres = postgres(raw.postgres, &blame)?;
    let edges = edges(raw.edge, &blame)?;
    sections_fit_the_role(role, &upstreams, postgres.is_some(), &edges, &blame)?;
    let ha = ha(raw.ha, &blame)?;
    let routes = routes(raw.route, &blame)?;
    let queues = queues(raw.queue, &blame)?;
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

const DEFAULT_ROUTE_MAX_ATTEMPTS: NonZeroU32 = NonZeroU32::new(10).unwrap();

/// Makes a problem with a key into a [`ConfigError`] naming where the key's value came from.
struct Blame<'a>(&'a Origins);

impl Blame<'_> {
    fn error(&self, key: &str, problem: String) -> ConfigError {
        ConfigError { origin: self.0.of(key), key: key.to_string(), problem }
    }

    /// For `map_err`: the problem, blamed on `key`.
    fn on<'k>(&'k self, key: &'k str) -> impl Fn(String) -> ConfigError + 'k {
        move |problem| self.error(key, problem)
    }
}

fn node_id(raw: Option<String>, blame: &Blame) -> Result<String, ConfigError> {
    let node_id = raw.unwrap_or_else(host_name);
    validate_name(&node_id).map_err(blame.on("node_id"))?;
    Ok(node_id)
}

fn listen(role: Role, raw: Option<String>, blame: &Blame) -> Result<SocketAddr, ConfigError> {
    let text = raw.unwrap_or_else(|| role.default_listen().to_string());
    text.parse()
        .map_err(|_| blame.error("listen", format!("{text:?} is not an address like \"127.0.0.1:7400\"")))
}

fn data_dir(role: Role, raw: Option<PathBuf>, blame: &Blame) -> Result<PathBuf, ConfigError> {
    let data_dir = raw.unwrap_or_else(|| role.default_data_dir());
    if data_dir.as_os_str().is_empty() {
        return Err(blame.error("data_dir", "must not be empty".into()));
    }
    Ok(data_dir)
}

fn tls(raw: Option<RawTls>, blame: &Blame) -> Result<Option<TlsConfig>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(t) if t.cert_file.is_empty() && t.key_file.is_empty() => {
            if !t.client_ca_file.is_empty() {
                return Err(blame.error("tls.client_ca_file", "needs tls.cert_file and tls.key_file".into()));
            }
            Ok(None)
        }
        Some(t) => {
            if t.cert_file.is_empty() || t.key_file.is_empty() {
                return Err(blame.error("tls", "set both cert_file and key_file, or neither".into()));
            }
            Ok(Some(TlsConfig {
                cert_file: PathBuf::from(t.cert_file),
                key_file: PathBuf::from(t.key_file),
                client_ca_file: (!t.client_ca_file.is_empty()).then(|| PathBuf::from(t.client_ca_file)),
            }))
        }
    }
}

fn auth(raw: Option<RawAuth>, blame: &Blame) -> Result<Option<AuthConfig>, ConfigError> {
    let Some(a) = raw else { return Ok(None) };
    if a.client_tokens.iter().chain(&a.admin_tokens).any(|t| t.trim().is_empty()) {
        return Err(blame.error("auth", "tokens must not be empty strings".into()));
    }
    Ok(Some(AuthConfig { client_tokens: a.client_tokens, admin_tokens: a.admin_tokens }))
}

fn limits(raw: RawLimits, blame: &Blame) -> Result<Limits, ConfigError> {
    let defaults = Limits::default();
    let limits = Limits {
        max_message_bytes: raw.max_message_bytes.unwrap_or(defaults.max_message_bytes),
        max_batch_messages: positive_u32(raw.max_batch_messages, defaults.max_batch_messages)
            .map_err(blame.on("limits.max_batch_messages"))?,
        max_store_bytes: raw.max_store_bytes.unwrap_or(defaults.max_store_bytes),
        message_ttl: raw.message_ttl.filter(|d| !d.is_zero()),
        max_queues: positive_u32(raw.max_queues, defaults.max_queues)
            .map_err(blame.on("limits.max_queues"))?,
        max_connections: positive_u32(raw.max_connections, defaults.max_connections)
            .map_err(blame.on("limits.max_connections"))?,
        request_timeout: nonzero(raw.request_timeout, defaults.request_timeout)
            .map_err(blame.on("limits.request_timeout"))?,
        idempotency_ttl: nonzero(raw.idempotency_ttl, defaults.idempotency_ttl)
            .map_err(blame.on("limits.idempotency_ttl"))?,
    };
    if limits.max_message_bytes == 0 {
        return Err(blame.error("limits.max_message_bytes", "must be at least 1 byte".into()));
    }
    if limits.max_store_bytes < limits.max_message_bytes {
        return Err(blame.error("limits.max_store_bytes", "must be at least limits.max_message_bytes".into()));
    }
    Ok(limits)
}

fn upstreams(role: Role, raw: Option<Vec<RawUpstream>>, blame: &Blame) -> Result<Vec<Upstream>, ConfigError> {
    let raw = match (role, raw) {
        (_, Some(given)) => given,
        (Role::Edge, None) => {
            vec![RawUpstream { url: DEFAULT_CENTRAL_URL.to_string(), ..RawUpstream::default() }]
        }
        (Role::Central, None) => Vec::new(),
    };
    let mut upstreams = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        validate_http_url(&u.url).map_err(blame.on(&format!("upstream[{i}].url")))?;
        upstreams.push(Upstream {
            url: u.url.trim_end_matches('/').to_string(),
            token: u.token,
            trigger: u.trigger.unwrap_or(true),
            tls: ClientTlsFiles::from_raw(u.ca_file, u.cert_file, u.key_file)
                .map_err(blame.on(&format!("upstream[{i}].cert_file")))?,
        });
    }
    Ok(upstreams)
}

fn failover(raw: RawFailover, blame: &Blame) -> Result<FailoverConfig, ConfigError> {
    Ok(FailoverConfig {
        primary_retries: u32::try_from(raw.primary_retries.unwrap_or(0))
            .map_err(|_| blame.error("failover.primary_retries", "too large".into()))?,
        primary_retry_delay: raw.primary_retry_delay.unwrap_or(Duration::from_secs(5)),
        connect_timeout: nonzero(raw.connect_timeout, Duration::from_secs(5))
            .map_err(blame.on("failover.connect_timeout"))?,
        failback_interval: nonzero(raw.failback_interval, Duration::from_secs(60))
            .map_err(blame.on("failover.failback_interval"))?,
    })
}

fn connectivity(raw: RawConnectivity, blame: &Blame) -> Result<ConnectivityConfig, ConfigError> {
    Ok(ConnectivityConfig {
        ping_interval: nonzero(raw.ping_interval, Duration::from_secs(300))
            .map_err(blame.on("connectivity.ping_interval"))?,
        missed_pings: positive_u32(raw.missed_pings, 3).map_err(blame.on("connectivity.missed_pings"))?,
        offline_probe_interval: nonzero(raw.offline_probe_interval, Duration::from_secs(60))
            .map_err(blame.on("connectivity.offline_probe_interval"))?,
        transition_to_offline_wait: raw.transition_to_offline_wait.unwrap_or(Duration::from_secs(10)),
        failed_transition_wait: raw.failed_transition_wait.unwrap_or(Duration::from_secs(3600)),
        block_during_transition: raw.block_during_transition.unwrap_or(false),
    })
}

fn forwarding(raw: RawForwarding, blame: &Blame) -> Result<ForwardingConfig, ConfigError> {
    let forwarding = ForwardingConfig {
        batch_messages: positive_u32(raw.batch_messages, 1000)
            .map_err(blame.on("forwarding.batch_messages"))?,
        batch_bytes: raw.batch_bytes.unwrap_or(4 << 20).max(1),
        in_flight: positive_u32(raw.in_flight, 4).map_err(blame.on("forwarding.in_flight"))?,
        request_timeout: nonzero(raw.request_timeout, Duration::from_secs(30))
            .map_err(blame.on("forwarding.request_timeout"))?,
        compression: match raw.compression.as_deref().map(str::trim) {
            None | Some("zstd") => Compression::Zstd,
            Some("none") => Compression::None,
            Some(other) => {
                return Err(blame
                    .error("forwarding.compression", format!("{other:?}: expected \"zstd\" or \"none\"")))
            }
        },
        max_bandwidth_bytes_per_second: raw.max_bandwidth.unwrap_or(0),
    };
    if forwarding.max_bandwidth_bytes_per_second != 0 && forwarding.max_bandwidth_bytes_per_second < 1024 {
        return Err(
            blame.error("forwarding.max_bandwidth", "at least 1KiB per second, or \"0\" for no cap".into())
        );
    }
    if forwarding.in_flight > 64 {
        return Err(blame.error("forwarding.in_flight", "at most 64 batches in flight".into()));
    }
    Ok(forwarding)
}

fn postgres(raw: Option<String>, blame: &Blame) -> Result<Option<String>, ConfigError> {
    let postgres = raw.filter(|p| !p.trim().is_empty());
    if let Some(url) = &postgres {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                blame.error("postgres", "expected a URL like \"postgres://user@host:5432/db\"".into())
            );
        }
    }
    Ok(postgres)
}

fn edges(raw: Vec<RawEdge>, blame: &Blame) -> Result<Vec<EdgeCredential>, ConfigError> {
    let mut edges: Vec<EdgeCredential> = Vec::new();
    for (i, e) in raw.into_iter().enumerate() {
        let key = format!("edge[{i}].id");
        validate_name(&e.id).map_err(blame.on(&key))?;
        if edges.iter().any(|x| x.id == e.id) {
            return Err(blame.error(&key, format!("edge {:?} is listed twice", e.id)));
        }
        edges.push(EdgeCredential { id: e.id, token: e.token });
    }
    Ok(edges)
}

/// An edge has no PostgreSQL and accepts no edges; a central has no upstream.
fn sections_fit_the_role(
    role: Role,
    upstreams: &[Upstream],
    has_postgres: bool,
    edges: &[EdgeCredential],
    blame: &Blame,
) -> Result<(), ConfigError> {
    match role {
        Role::Edge if has_postgres => Err(blame.error(
            "postgres",
            "only a central uses PostgreSQL; remove it from an edge's configuration".into(),
        )),
        Role::Edge if !edges.is_empty() => Err(blame.error(
            "edge",
            "[[edge]] lists the edges a central accepts; remove it from an edge's configuration".into(),
        )),
        Role::Central if !upstreams.is_empty() => Err(blame
            .error("upstream", "a central has no upstream; [[upstream]] and --central are for edges".into())),
        Role::Edge | Role::Central => Ok(()),
    }
}

fn ha(raw: RawHa, blame: &Blame) -> Result<HaConfig, ConfigError> {
    let ha = HaConfig {
        restart_delay: raw.restart_delay.unwrap_or(Duration::from_secs(2)),
        restart_delay_max: raw.restart_delay_max.unwrap_or(Duration::from_secs(60)),
        min_uptime: raw.min_uptime.unwrap_or(Duration::from_secs(60)),
        max_restarts: u32::try_from(raw.max_restarts.unwrap_or(10))
            .map_err(|_| blame.error("ha.max_restarts", "too large".into()))?,
        restart_window: raw.restart_window.unwrap_or(Duration::from_secs(600)),
        ready_timeout: nonzero(raw.ready_timeout, Duration::from_secs(30))
            .map_err(blame.on("ha.ready_timeout"))?,
    };
    if ha.restart_delay_max < ha.restart_delay {
        return Err(blame.error("ha.restart_delay_max", "must be at least ha.restart_delay".into()));
    }
    Ok(ha)
}

fn routes(raw: Vec<RawRoute>, blame: &Blame) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let route = route(i, r, &routes, blame)?;
        routes.push(route);
    }
    Ok(routes)
}

/// `[[route]]` number `i`; `earlier`: the routes before it (a name is defined once).
fn route(i: usize, r: RawRoute, earlier: &[RouteConfig], blame: &Blame) -> Result<RouteConfig, ConfigError> {
    let key = |field: &str| format!("route[{i}].{field}");
    validate_name(&r.name).map_err(blame.on(&key("name")))?;
    if earlier.iter().any(|x| x.name == r.name) {
        return Err(blame.error(&key("name"), format!("route {:?} is defined twice", r.name)));
    }
    validate_name(&r.queue).map_err(blame.on(&key("queue")))?;
    if r.urls.is_empty() {
        return Err(blame.error(&key("urls"), "list at least one URL".into()));
    }
    for url in &r.urls {
        validate_http_url(url).map_err(blame.on(&key("urls")))?;
    }
    let service_down = match r.service_down {
        None => ErrorClass::DEFAULT_SERVICE_DOWN.to_vec(),
        Some(written) => error_classes(&written).map_err(blame.on(&key("service_down")))?,
    };
    let poison = match r.poison {
        None => ErrorClass::DEFAULT_POISON.to_vec(),
        Some(written) => error_classes(&written).map_err(blame.on(&key("poison")))?,
    };
    let retry_initial =
        nonzero(r.retry_initial, Duration::from_secs(1)).map_err(blame.on(&key("retry_initial")))?;
    let retry_max = nonzero(r.retry_max, Duration::from_secs(300)).map_err(blame.on(&key("retry_max")))?;
    if retry_max < retry_initial {
        return Err(blame.error(&key("retry_max"), "must be at least retry_initial".into()));
    }
    Ok(RouteConfig {
        name: r.name,
        queue: r.queue,
        urls: r.urls,
        timeout: nonzero(r.timeout, Duration::from_secs(10)).map_err(blame.on(&key("timeout")))?,
        max_attempts: positive(r.max_attempts, DEFAULT_ROUTE_MAX_ATTEMPTS)
            .map_err(blame.on(&key("max_attempts")))?,
        retry_initial,
        retry_max,
        service_down,
        poison,
        auto_forward: r.auto_forward.unwrap_or(false),
        probe_interval: nonzero(r.probe_interval, Duration::from_secs(30))
            .map_err(blame.on(&key("probe_interval")))?,
        max_in_flight: bounded_u32(r.max_in_flight, NonZeroU32::MIN, MAX_ROUTE_IN_FLIGHT)
            .map_err(blame.on(&key("max_in_flight")))?,
        batch: bounded_u32(r.batch, NonZeroU32::MIN, MAX_ROUTE_BATCH).map_err(blame.on(&key("batch")))?,
        tls: ClientTlsFiles::from_raw(r.ca_file, r.cert_file, r.key_file)
            .map_err(blame.on(&key("cert_file")))?,
    })
}

fn queues(raw: Vec<RawQueue>, blame: &Blame) -> Result<Vec<QueueConfig>, ConfigError> {
    let mut queues: Vec<QueueConfig> = Vec::new();
    for (i, q) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("queue[{i}].{field}");
        validate_name(&q.name).map_err(blame.on(&key("name")))?;
        if queues.iter().any(|x| x.name == q.name) {
            return Err(blame.error(&key("name"), format!("queue {:?} is listed twice", q.name)));
        }
        let priority = match q.priority {
            None => DEFAULT_QUEUE_PRIORITY,
            Some(p) if p <= u64::from(LOWEST_QUEUE_PRIORITY) => p as u8,
            Some(p) => {
                return Err(blame
                    .error(&key("priority"), format!("{p}: expected 0 (first) to {LOWEST_QUEUE_PRIORITY}")))
            }
        };
        queues.push(QueueConfig { name: q.name, priority, message_ttl: q.message_ttl });
    }
    Ok(queues)
}

/// `value` from 1 to `max`, or `default` if not given.
fn bounded_u32(value: Option<u64>, default: NonZeroU32, max: u32) -> Result<NonZeroU32, String> {
    match value {
        None => Ok(default),
        Some(n) if n <= u64::from(max) => {
            u32::try_from(n).ok().and_then(NonZeroU32::new).ok_or_else(|| format!("{n}: expected 1 to {max}"))
        }
        Some(n) => Err(format!("{n}: expected 1 to {max}")),
    }
}

/// `value` if at least 1 and it fits, or `default` if not given.
fn positive_u32(value: Option<u64>, default: u32) -> Result<u32, String> {
    match value {
        None => Ok(default),
        given => positive(given, NonZeroU32::MIN).map(NonZeroU32::get),
    }
}

/// `value` if at least 1 and it fits, or `default` if not given.
fn positive(value: Option<u64>, default: NonZeroU32) -> Result<NonZeroU32, String> {
    match value {
        None => Ok(default),
        Some(0) => Err("must be at least 1".into()),
        Some(n) => u32::try_from(n).ok().and_then(NonZeroU32::new).ok_or_else(|| format!("{n} is too large")),
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

fn error_classes(written: &[String]) -> Result<Vec<ErrorClass>, String> {
    written.iter().map(|class| class.parse()).collect()
}
