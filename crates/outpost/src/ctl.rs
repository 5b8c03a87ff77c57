//! `outpost ctl`: the operator's client of CONTRACT section 8. Each command is one (or, for several
//! ids, a few) calls of a node's HTTP API; the answer is shown as a table for people, or as the
//! API's own JSON with `--json` for scripts. Exit codes: 0 done, 1 the node refused or could not be
//! reached, 2 usage.
//!
//! This module knows the API only from its JSON shapes (it shares no types with `outpost-api`), so
//! it keeps working against a node of another version as long as the contract holds; a field it
//! does not find is shown as `-`.

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::exit;

/// Where `ctl` looks for a node when neither `--url` nor `OUTPOST_URL` says: an edge's default.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7400";
/// How long `ctl` waits for a TCP connection to the node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one API call may take in all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Offline-log entries `ctl status` shows (the node keeps up to 100; `--json` shows them all).
const STATUS_OFFLINE_LOG_ENTRIES: usize = 5;
/// Longest free-text cell (error details) in a table; longer ones are cut with `…`.
const MAX_TEXT_CELL_CHARS: usize = 72;
/// Entries `ctl failed` asks for when `--limit` is not given (the API's default too).
const DEFAULT_FAILED_LIMIT: u32 = 100;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The node's API.
    #[arg(long, global = true, env = "OUTPOST_URL", default_value = DEFAULT_URL, value_name = "URL")]
    url: String,
    /// Admin token, sent as `Authorization: Bearer T`.
    #[arg(long, global = true, env = "OUTPOST_TOKEN", hide_env_values = true, value_name = "T")]
    token: Option<String>,
    /// PEM CA certificate(s) to trust for an https:// URL (default: the system's roots).
    #[arg(long, global = true, env = "OUTPOST_CA_FILE", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// This node: id, role, version, state, upstream, last ping, backlog, recent offline log.
    Status,
    /// Edge: start a transition to online now, ignoring failed_transition_wait.
    Online,
    /// Central: every known edge and its last reported state.
    Edges,
    /// Central: tell one edge to start a transition to online.
    EdgeOnline {
        /// The edge's id.
        id: String,
    },
    /// Central: maintenance mode on (every edge goes and stays offline) or off.
    Maintenance {
        #[arg(value_enum)]
        switch: OnOff,
    },
    /// Every route: mode (forward/store), backlog and failed messages.
    Routes,
    /// Switch a route to store mode: keep its messages, deliver nothing.
    Store {
        /// The route's name.
        route: String,
        /// Why, shown in `ctl routes` (default: "store requested through the API").
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Switch a route to forward mode: deliver again.
    Forward {
        /// The route's name.
        route: String,
        /// Why, shown in `ctl routes`.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Failed messages, oldest first.
    Failed {
        /// Only this route's.
        #[arg(long, value_name = "R")]
        route: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = DEFAULT_FAILED_LIMIT)]
        limit: u32,
    },
    /// Put failed messages back on their route: by failed-entry id, or all of one route.
    #[command(group(ArgGroup::new("which").required(true).multiple(false).args(["ids", "route"])))]
    Resubmit {
        /// Failed-entry ids (the ID column of `ctl failed`).
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        /// Every failed message of this route.
        #[arg(long, value_name = "R")]
        route: Option<String>,
    },
    /// Pull consumers: of one queue, or of every queue.
    Consumers {
        /// Only this queue's.
        queue: Option<String>,
    },
    /// Discard failed messages for good.
    Discard {
        /// Failed-entry ids (the ID column of `ctl failed`).
        #[arg(value_name = "ID", required = true)]
        ids: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

pub fn run(args: CtlArgs) -> ExitCode {
    let base_url = args.url.trim().trim_end_matches('/').to_string();
    if !base_url.starts_with("http://") && !base_url.starts_with("https://") {
        eprintln!(
            "outpost ctl: --url / OUTPOST_URL {:?}: expected a URL like http://127.0.0.1:7400 or https://hq.example.com:7401",
            args.url
        );
        return ExitCode::from(exit::USAGE);
    }
    for name in names_to_check(&args.command) {
        if let Err(problem) = outpost_core::validate_name(name) {
            eprintln!("outpost ctl: {name:?}: {problem}");
            return ExitCode::from(exit::USAGE);
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outpost ctl: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let tls = match &args.ca_file {
        None if !base_url.starts_with("https://") => None,
        ca_file => match outpost_tls::ClientTls::load(outpost_tls::ClientFiles {
            section: "ctl".into(),
            ca_file: ca_file.clone(),
            ..Default::default()
        }) {
            Ok(tls) => Some(tls.config()),
            Err(e) => {
                eprintln!("outpost ctl: --ca-file / OUTPOST_CA_FILE: {e}");
                return ExitCode::from(exit::USAGE);
            }
        },
    };
    let api = match Api::new(base_url, args.token.filter(|t| !t.is_empty()), tls) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("outpost ctl: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let output = Output { json: args.json, now_ms: outpost_core::time::now_unix_ms() };
    match runtime.block_on(execute(&api, &output, args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost ctl: {e}");
            ExitCode::from(exit::FATAL)
        }
    }
}

/// The name to check of a failed-entry route: a consumer's without its `consumer:` prefix.
fn consumer_of_route(route: &str) -> &str {
    outpost_store::consumers::consumer_of_route(route).unwrap_or(route)
}

/// Route and edge names go into URL paths: refuse what the API would refuse anyway, before asking.
/// Failed-entry ids are opaque, so they are only checked not to break the path.
fn names_to_check(command: &CtlCommand) -> Vec<&str> {
    match command {
        CtlCommand::EdgeOnline { id } => vec![id],
        CtlCommand::Store { route, .. } | CtlCommand::Forward { route, .. } => vec![route],
        // A pull consumer's failed entries go by `consumer:<name>`.
        CtlCommand::Failed { route: Some(route), .. } => vec![consumer_of_route(route)],
        CtlCommand::Resubmit { ids, route } => {
            ids.iter().map(String::as_str).chain(route.as_deref().map(consumer_of_route)).collect()
        }
        CtlCommand::Consumers { queue: Some(queue) } => vec![queue],
        CtlCommand::Discard { ids } => ids.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    }
}

async fn execute(api: &Api, out: &Output, command: CtlCommand) -> Result<(), CtlError> {
    match command {
        CtlCommand::Status => {
            let status = api.call(Method::GET, "/v1/status", None).await?;
            out.show(&status, render_status)
        }
        CtlCommand::Online => {
            let reply = api.call(Method::POST, "/v1/admin/transition-online", None).await?;
            out.show(&reply, |_, _| {
                format!(
                    "transition to online requested at {}; follow it with `outpost ctl --url {} status`\n",
                    api.base_url, api.base_url
                )
            })
        }
        CtlCommand::Edges => {
            let edges = api.call(Method::GET, "/v1/edges", None).await?;
            out.show(&edges, render_edges)
        }
        CtlCommand::EdgeOnline { id } => {
            let reply = api.call(Method::POST, &format!("/v1/edges/{id}/transition-online"), None).await?;
            out.show(&reply, |_, _| {
                format!("sent \"transition to online\" to edge {id}; follow it with `outpost ctl --url {} edges`\n", api.base_url)
            })
        }
        CtlCommand::Maintenance { switch } => {
            let enabled = switch == OnOff::On;
            let reply =
                api.call(Method::POST, "/v1/admin/maintenance", Some(json!({"enabled": enabled}))).await?;
            out.show(&reply, |_, _| {
                if enabled {
                    "maintenance on: every edge goes offline and stays offline until `outpost ctl maintenance off`\n"
                        .to_string()
                } else {
                    "maintenance off: edges come back online at their next probe\n".to_string()
                }
            })
        }
        CtlCommand::Routes => {
            let routes = api.call(Method::GET, "/v1/routes", None).await?;
            out.show(&routes, render_routes)
        }
        CtlCommand::Store { route, reason } => switch_route(api, out, &route, "store", reason).await,
        CtlCommand::Forward { route, reason } => switch_route(api, out, &route, "forward", reason).await,
        CtlCommand::Failed { route, limit } => {
            let mut path = format!("/v1/failed?limit={limit}");
            if let Some(route) = &route {
                path.push_str(&format!("&route={route}"));
            }
            let failed = api.call(Method::GET, &path, None).await?;
            out.show(&failed, render_failed)
        }
        CtlCommand::Resubmit { ids, route: Some(route) } if ids.is_empty() => {
            let reply = api.call(Method::POST, "/v1/failed/resubmit", Some(json!({"route": route}))).await?;
            out.show(&reply, |reply, _| match count_in(reply) {
                Some(n) => format!("resubmitted {n} failed message(s) of route {route}\n"),
                None => format!("resubmitted the failed messages of route {route}\n"),
            })
        }
        CtlCommand::Resubmit { ids, .. } => {
            each_id(api, out, &ids, Method::POST, |id| format!("/v1/failed/{id}/resubmit"), "resubmitted")
                .await
        }
        CtlCommand::Discard { ids } => {
            each_id(api, out, &ids, Method::DELETE, |id| format!("/v1/failed/{id}"), "discarded").await
        }
        CtlCommand::Consumers { queue } => {
            let queues: Vec<String> = match queue {
                Some(queue) => vec![queue],
                None => {
                    let list = api.call(Method::GET, "/v1/queues", None).await?;
                    let names = list.as_array().into_iter().flatten().filter_map(|q| q["name"].as_str());
                    names.map(str::to_string).collect()
                }
            };
            // Each consumer with its queue: the API's objects plus `queue`.
            let mut all = Vec::new();
            for queue in &queues {
                let consumers = api.call(Method::GET, &format!("/v1/queues/{queue}/consumers"), None).await?;
                for mut consumer in consumers.as_array().cloned().unwrap_or_default() {
                    if let Value::Object(fields) = &mut consumer {
                        fields.insert("queue".to_string(), json!(queue));
                    }
                    all.push(consumer);
                }
            }
            out.show(&Value::Array(all), render_consumers)
        }
    }
}

async fn switch_route(
    api: &Api,
    out: &Output,
    route: &str,
    mode: &str,
    reason: Option<String>,
) -> Result<(), CtlError> {
    let body = reason.map(|reason| json!({"reason": reason}));
    let reply = api.call(Method::POST, &format!("/v1/routes/{route}/{mode}"), body).await?;
    // The reply is the route as `GET /v1/routes` shows it: print it as that table's row.
    out.show(&reply, |reply, now_ms| match reply {
        Value::Object(_) => render_routes(&Value::Array(vec![reply.clone()]), now_ms),
        _ => format!("route {route}: {mode} mode\n"),
    })
}

/// One call per failed-entry id, all of them even when some fail: an operator discarding twenty
/// entries wants the nineteen good ones done and the one bad one named.
async fn each_id(
    api: &Api,
    out: &Output,
    ids: &[String],
    method: Method,
    path: impl Fn(&str) -> String,
    done: &str,
) -> Result<(), CtlError> {
    let mut replies = Vec::with_capacity(ids.len());
    let mut errors = Vec::new();
    for id in ids {
        match api.call(method.clone(), &path(id), None).await {
            Ok(reply) => {
                if !out.json {
                    println!("{done} {id}");
                }
                replies.push(reply);
            }
            Err(e @ CtlError::Unreachable { .. }) => return Err(e),
            Err(e) => {
                eprintln!("outpost ctl: {e}");
                errors.push(id.clone());
            }
        }
    }
    if out.json {
        println!("{}", pretty(&Value::Array(replies)));
    }
    match errors.len() {
        0 => Ok(()),
        n => Err(CtlError::Partial(format!("{n} of {} failed: {}", ids.len(), errors.join(", ")))),
    }
}

/// The number a bulk reply reports, whatever the server calls it.
fn count_in(reply: &Value) -> Option<u64> {
    ["resubmitted", "count"].iter().find_map(|key| reply.get(key).and_then(Value::as_u64))
}

// ---------------------------------------------------------------------------------------------
// The API client.
// ---------------------------------------------------------------------------------------------

struct Api {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
}

/// Why a command did not happen. Each variant names the URL, so an operator with several nodes
/// knows which one answered.
#[derive(Debug)]
enum CtlError {
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
    fn new(
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
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, CtlError> {
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

// ---------------------------------------------------------------------------------------------
// Output.
// ---------------------------------------------------------------------------------------------

struct Output {
    json: bool,
    /// The time ages are measured against, read once so every row of a table agrees.
    now_ms: i64,
}

impl Output {
    fn show(&self, reply: &Value, human: impl FnOnce(&Value, i64) -> String) -> Result<(), CtlError> {
        if self.json {
            if !reply.is_null() {
                println!("{}", pretty(reply));
            }
        } else {
            print!("{}", human(reply, self.now_ms));
        }
        Ok(())
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

fn render_status(status: &Value, now_ms: i64) -> String {
    let role = text(status, "role");
    let mut lines = Table::new(&["", ""]);
    lines.row(vec![
        "node".into(),
        format!("{}  ({role}, outpost {})", text(status, "node_id"), text(status, "version")),
    ]);
    lines.row(vec![
        "state".into(),
        format!("{}  since {}", text(status, "state"), age(status.get("state_since"), now_ms)),
    ]);
    // A central has no upstream and is not pinged; those lines would only ever read "-".
    let is_edge = role != "central";
    let upstream = match status.get("upstream") {
        Some(u) if u.is_object() => {
            let which = if u.get("is_primary").and_then(Value::as_bool) == Some(false) {
                "alternate"
            } else {
                "primary"
            };
            format!("{}  ({which})", text(u, "url"))
        }
        _ => "none".to_string(),
    };
    let last_ping = match status.get("last_ping_at") {
        Some(Value::String(_)) => age(status.get("last_ping_at"), now_ms),
        _ => "never".into(),
    };
    if is_edge {
        lines.row(vec!["upstream".into(), upstream]);
        lines.row(vec!["last ping".into(), last_ping]);
    }
    let backlog = status.get("backlog").cloned().unwrap_or(Value::Null);
    let messages = backlog.get("messages").and_then(Value::as_u64).unwrap_or(0);
    let mut backlog_text = format!(
        "{messages} message{}, {}",
        if messages == 1 { "" } else { "s" },
        bytes_text(backlog.get("bytes").and_then(Value::as_u64).unwrap_or(0))
    );
    if messages > 0 {
        let oldest = backlog.get("oldest_age_seconds").and_then(Value::as_f64).unwrap_or(0.0);
        backlog_text.push_str(&format!(", oldest {}", duration_text((oldest * 1000.0) as i64)));
    }
    lines.row(vec!["backlog".into(), backlog_text]);
    if let Some(drain) = backlog.get("drain").and_then(Value::as_str) {
        lines.row(vec!["drains in".into(), drain.to_string()]);
    }
    let mut out = lines.render_without_header();

    let log = status.get("offline_log").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    if log.is_empty() {
        if is_edge {
            out.push_str("offline log: empty\n");
        }
    } else {
        let shown = &log[log.len().saturating_sub(STATUS_OFFLINE_LOG_ENTRIES)..];
        out.push_str(&format!("offline log (newest last, {} of {}):\n", shown.len(), log.len()));
        let mut table = Table::new(&["AT", "CAUSE", "DETAIL"]);
        for entry in shown {
            table.row(vec![
                age(entry.get("at"), now_ms),
                text(entry, "cause"),
                truncate(&text(entry, "detail"), MAX_TEXT_CELL_CHARS),
            ]);
        }
        for line in table.render().lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

fn render_edges(edges: &Value, now_ms: i64) -> String {
    let Some(edges) = edges.as_array() else { return format!("{}\n", pretty(edges)) };
    if edges.is_empty() {
        return "no edges known to this central yet\n".into();
    }
    let mut table = Table::new(&[
        "EDGE",
        "STATE",
        "LINK",
        "SINCE",
        "LAST SEEN",
        "UPSTREAM",
        "BACKLOG",
        "DOWNLINK",
        "LAST OFFLINE",
    ]);
    for edge in edges {
        let last_offline = edge
            .get("offline_log")
            .and_then(Value::as_array)
            .and_then(|log| log.last())
            .map(|entry| format!("{} {}", age(entry.get("at"), now_ms), text(entry, "cause")))
            .unwrap_or_else(|| "-".into());
        // The central's own view: `offline (link_lost)` for a site that went dark, whatever it
        // last reported.
        let state = match edge.get("cause").and_then(Value::as_str) {
            Some(cause) => format!("{} ({cause})", text(edge, "state")),
            None => text(edge, "state"),
        };
        let link = match edge.get("connected").and_then(Value::as_bool) {
            Some(true) => "connected",
            Some(false) => "-",
            None => "?",
        };
        table.row(vec![
            text(edge, "id"),
            state,
            link.to_string(),
            age(edge.get("state_since"), now_ms),
            age(edge.get("last_seen"), now_ms),
            text(edge, "upstream_url"),
            text(edge, "backlog_messages"),
            text(edge, "downlink_pending"),
            last_offline,
        ]);
    }
    table.render()
}

fn render_routes(routes: &Value, now_ms: i64) -> String {
    let Some(routes) = routes.as_array() else { return format!("{}\n", pretty(routes)) };
    if routes.is_empty() {
        return "no routes: add [[route]] sections to the node's configuration\n".into();
    }
    let mut table =
        Table::new(&["ROUTE", "QUEUE", "MODE", "SINCE", "CHANGED BY", "BACKLOG", "FAILED", "REASON"]);
    for route in routes {
        table.row(vec![
            text(route, "name"),
            text(route, "queue"),
            text(route, "mode"),
            age(route.get("mode_since"), now_ms),
            text(route, "changed_by"),
            text(route, "backlog"),
            text(route, "failed"),
            truncate(&text(route, "reason"), MAX_TEXT_CELL_CHARS),
        ]);
    }
    table.render()
}

fn render_failed(failed: &Value, now_ms: i64) -> String {
    let Some(failed) = failed.as_array() else { return format!("{}\n", pretty(failed)) };
    if failed.is_empty() {
        return "no failed messages\n".into();
    }
    let mut table = Table::new(&[
        "ID",
        "ROUTE",
        "QUEUE",
        "SEQ",
        "ATTEMPTS",
        "REASON",
        "LAST FAILED",
        "MESSAGE",
        "LAST ERROR",
    ]);
    for entry in failed {
        table.row(vec![
            text(entry, "id"),
            text(entry, "route"),
            text(entry, "queue"),
            text(entry, "seq"),
            text(entry, "attempts"),
            text(entry, "reason"),
            age(entry.get("last_failed_at"), now_ms),
            text(entry, "message_id"),
            truncate(&text(entry, "last_error"), MAX_TEXT_CELL_CHARS),
        ]);
    }
    table.render()
}

fn render_consumers(consumers: &Value, now_ms: i64) -> String {
    let Some(consumers) = consumers.as_array() else { return format!("{}\n", pretty(consumers)) };
    if consumers.is_empty() {
        return "no pull consumers: one is created by its first lease \
                (POST /v1/queues/{queue}/consumers/{name}/lease)\n"
            .into();
    }
    let mut table = Table::new(&[
        "QUEUE",
        "CONSUMER",
        "POSITION",
        "LEASED",
        "PENDING",
        "MOST DELIVERIES",
        "CREATED",
        "LAST ACTIVE",
    ]);
    for consumer in consumers {
        table.row(vec![
            text(consumer, "queue"),
            text(consumer, "name"),
            text(consumer, "position"),
            text(consumer, "leased"),
            text(consumer, "pending"),
            text(consumer, "deliveries_max"),
            age(consumer.get("created_at"), now_ms),
            age(consumer.get("last_active_at"), now_ms),
        ]);
    }
    table.render()
}

/// A field as text: strings bare, numbers and booleans as written, missing or null as `-`.
fn text(object: &Value, key: &str) -> String {
    match object.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// An RFC 3339 field as "3m ago"; `-` when missing, the raw text when it is not RFC 3339.
fn age(field: Option<&Value>, now_ms: i64) -> String {
    match field {
        Some(Value::String(at)) => match parse_rfc3339_ms(at) {
            Some(at_ms) => relative_age(at_ms, now_ms),
            None => at.clone(),
        },
        _ => "-".into(),
    }
}

fn relative_age(at_ms: i64, now_ms: i64) -> String {
    let elapsed_ms = now_ms - at_ms;
    if elapsed_ms.abs() < 1000 {
        "just now".into()
    } else if elapsed_ms < 0 {
        // The node's clock is ahead of this one.
        format!("in {}", duration_text(-elapsed_ms))
    } else {
        format!("{} ago", duration_text(elapsed_ms))
    }
}

/// The largest whole unit: `42s`, `3m`, `5h`, `12d`.
fn duration_text(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn truncate(text: &str, max_chars: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max_chars {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` to unix milliseconds. Only what the API writes (and
/// offsets, for a node behind a proxy that rewrites them); no leap seconds.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let number = |from: usize, to: usize| -> Option<i64> {
        let digits = text.get(from..to)?;
        digits.bytes().all(|c| c.is_ascii_digit()).then(|| digits.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first_three = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = first_three.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            let total = hours * 60 + minutes;
            if *sign == b'+' {
                total
            } else {
                -total
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Left-aligned columns two spaces apart; the last column is not padded.
struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len(), "a row has one cell per column");
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        self.render_rows(std::iter::once(&self.headers).chain(&self.rows))
    }

    fn render_without_header(&self) -> String {
        self.render_rows(self.rows.iter())
    }

    fn render_rows<'a>(&'a self, rows: impl Iterator<Item = &'a Vec<String>> + Clone) -> String {
        let mut widths = vec![0; self.headers.len()];
        for row in rows.clone() {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in rows {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_timestamps_the_api_writes() {
        let cases: &[(&str, Option<i64>)] = &[
            ("1970-01-01T00:00:00.000Z", Some(0)),
            ("2000-02-29T00:00:00.000Z", Some(951_782_400_000)),
            ("2026-11-22T05:01:02.123Z", Some(1_795_323_662_123)),
            ("2026-11-22T05:01:02Z", Some(1_795_323_662_000)),
            ("2026-11-22T05:01:02.1Z", Some(1_795_323_662_100)),
            ("2026-11-22T05:01:02.123456789Z", Some(1_795_323_662_123)),
            ("2026-11-22T06:01:02.123+01:00", Some(1_795_323_662_123)),
            ("2026-11-22T04:31:02.123-00:30", Some(1_795_323_662_123)),
            ("2026-11-22 05:01:02Z", Some(1_795_323_662_000)),
            ("2026-11-22T05:01:02", None),
            ("2026-13-22T05:01:02Z", None),
            ("2026-11-22T05:01:02.Z", None),
            ("yesterday", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_rfc3339_ms(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn ages_read_as_the_largest_whole_unit() {
        let now = 1_000_000_000;
        let cases = [
            (now, "just now"),
            (now - 999, "just now"),
            (now - 42_000, "42s ago"),
            (now - 3 * 60_000 - 59_000, "3m ago"),
            (now - 5 * 3_600_000, "5h ago"),
            (now - 12 * 86_400_000, "12d ago"),
            (now + 5_000, "in 5s"),
        ];
        for (at, expected) in cases {
            assert_eq!(relative_age(at, now), expected, "at {at}");
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        for (bytes, expected) in
            [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3_500, "3.4 KiB"), (5 << 30, "5.0 GiB")]
        {
            assert_eq!(bytes_text(bytes), expected);
        }
    }

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let mut table = Table::new(&["EDGE", "STATE", "DETAIL"]);
        table.row(vec!["store-042".into(), "online".into(), "x".into()]);
        table.row(vec!["b".into(), "transition_to_online".into(), "".into()]);
        assert_eq!(
            table.render(),
            "EDGE       STATE                 DETAIL\n\
             store-042  online                x\n\
             b          transition_to_online\n"
        );
    }

    #[test]
    fn status_shows_state_upstream_backlog_and_the_newest_offline_entries() {
        let now = parse_rfc3339_ms("2026-11-22T05:10:00.000Z").unwrap();
        let log: Vec<Value> = (0..7)
            .map(|i| json!({"at": format!("2026-11-22T05:0{i}:00.000Z"), "cause": format!("cause{i}"), "detail": "d"}))
            .collect();
        let status = json!({
            "node_id": "store-042", "role": "edge", "version": "0.1.0", "state": "online",
            "state_since": "2026-11-22T05:07:00.000Z",
            "upstream": {"url": "http://central:7401", "is_primary": false},
            "last_ping_at": "2026-11-22T05:09:58.000Z",
            "backlog": {"messages": 2, "bytes": 2048, "oldest_age_seconds": 75.0, "drain": "~4 min at 310 kB/s"},
            "offline_log": log,
        });
        let text = render_status(&status, now);
        for expected in [
            "store-042  (edge, outpost 0.1.0)",
            "online  since 3m ago",
            "http://central:7401  (alternate)",
            "last ping  2s ago",
            "2 messages, 2.0 KiB, oldest 1m",
            "(newest last, 5 of 7)",
            "drains in  ~4 min at 310 kB/s",
            "cause6",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
        assert!(!text.contains("cause1"), "only the newest five entries:\n{text}");
    }

    #[test]
    fn a_field_that_is_missing_shows_as_a_dash() {
        let table = render_routes(&json!([{"name": "erp", "queue": "orders", "mode": "store"}]), 0);
        assert!(table.lines().nth(1).unwrap().starts_with("erp    orders  store  -"), "{table}");
    }
}
