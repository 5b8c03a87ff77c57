//! `outpost ctl`: the operator's client of CONTRACT section 8. Each command is one (or, for several
//! ids or queues, a few) calls of a node's HTTP API; the answer is shown as a table for people, or as the
//! API's own JSON with `--json` for scripts. Exit codes: 0 done, 1 the node refused or could not be
//! reached, 2 usage.
//!
//! This module knows the API only from its JSON shapes (it shares no types with `outpost-api`), so
//! it keeps working against a node of another version as long as the contract holds; a field it
//! does not find is shown as `-`.
//!
//! `args`: the command line; `api`: the HTTP client and its errors; `render`: the tables and
//! `--json`; `table`: the table printer. This file runs the commands.

mod api;
mod args;
mod render;
mod table;

use std::process::ExitCode;

use reqwest::Method;
use serde_json::{json, Value};

use crate::exit;
use api::{Api, CtlError};
pub use args::CtlArgs;
use args::{names_to_check, CtlCommand, OnOff};
use render::{pretty, render_consumers, render_edges, render_failed, render_routes, render_status, Output};

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
            let mut results = IdResults::default();
            for chunk in ids.chunks(MAX_IDS_PER_BULK_RESUBMIT) {
                resubmit_in_bulk(api, out, chunk, &mut results).await?;
            }
            results.finish(out, ids.len())
        }
        CtlCommand::Discard { ids } => {
            let mut results = IdResults::default();
            let path = |id: &str| format!("/v1/failed/{id}");
            one_call_per_id(api, out, &ids, Method::DELETE, path, "discarded", &mut results).await?;
            results.finish(out, ids.len())
        }
        CtlCommand::Consumers { queue } => {
            let consumers = consumers_with_their_queue(api, queue).await?;
            out.show(&consumers, render_consumers)
        }
    }
}

/// The consumers of one queue, or of every queue: the API's objects, each with an added `queue`.
async fn consumers_with_their_queue(api: &Api, queue: Option<String>) -> Result<Value, CtlError> {
    let queues: Vec<String> = match queue {
        Some(queue) => vec![queue],
        None => {
            let list = api.call(Method::GET, "/v1/queues", None).await?;
            let names = list.as_array().into_iter().flatten().filter_map(|q| q["name"].as_str());
            names.map(str::to_string).collect()
        }
    };
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
    Ok(Value::Array(all))
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

/// What a command on several failed-entry ids did: an operator discarding twenty entries wants the
/// nineteen good ones done and the one bad one named, so every id is tried and the outcome is
/// collected here, then reported by [`IdResults::finish`].
#[derive(Default)]
struct IdResults {
    /// One JSON object per id done, for `--json`.
    replies: Vec<Value>,
    /// The ids that failed; each was reported on stderr already.
    failed: Vec<String>,
}

impl IdResults {
    /// The id is done: a line for people now, its reply for `--json` at the end.
    fn done(&mut self, out: &Output, done: &str, id: &str, reply: Value) {
        if !out.json {
            println!("{done} {id}");
        }
        self.replies.push(reply);
    }

    /// `--json`'s array of replies; exit 1 when any id failed.
    fn finish(self, out: &Output, asked: usize) -> Result<(), CtlError> {
        if out.json {
            println!("{}", pretty(&Value::Array(self.replies)));
        }
        match self.failed.len() {
            0 => Ok(()),
            n => Err(CtlError::Partial(format!("{n} of {asked} failed: {}", self.failed.join(", ")))),
        }
    }
}

/// Ids per `POST /v1/failed/resubmit` call: well under the node's own bound (10,000) and its body
/// limit, so a long list is a few calls.
const MAX_IDS_PER_BULK_RESUBMIT: usize = 1000;

/// `resubmit ID...`: the ids in one bulk call, `{"ids": [..]}`. The bulk endpoint is all or
/// nothing: when it refuses (an unknown id, one that is not a number, a node without the endpoint),
/// the same ids go one call each (`POST /v1/failed/{id}/resubmit`), so the good ones are done and
/// each bad one is named with the node's own answer, exactly as if they had gone one by one.
async fn resubmit_in_bulk(
    api: &Api,
    out: &Output,
    ids: &[String],
    results: &mut IdResults,
) -> Result<(), CtlError> {
    let numbers: Option<Vec<i64>> = ids.iter().map(|id| id.parse().ok()).collect();
    if let Some(numbers) = numbers {
        match api.call(Method::POST, "/v1/failed/resubmit", Some(json!({"ids": numbers}))).await {
            Ok(_) => {
                for (id, number) in ids.iter().zip(numbers) {
                    // What `POST /v1/failed/{id}/resubmit` answers, so `--json` reads the same.
                    results.done(out, "resubmitted", id, json!({"id": number, "status": "resubmitted"}));
                }
                return Ok(());
            }
            Err(e @ CtlError::Unreachable { .. }) => return Err(e),
            Err(_) => {}
        }
    }
    let path = |id: &str| format!("/v1/failed/{id}/resubmit");
    one_call_per_id(api, out, ids, Method::POST, path, "resubmitted", results).await
}

/// One call per failed-entry id, all of them even when some fail; only a node that cannot be
/// reached stops the list.
async fn one_call_per_id(
    api: &Api,
    out: &Output,
    ids: &[String],
    method: Method,
    path: impl Fn(&str) -> String,
    done: &str,
    results: &mut IdResults,
) -> Result<(), CtlError> {
    for id in ids {
        match api.call(method.clone(), &path(id), None).await {
            Ok(reply) => results.done(out, done, id, reply),
            Err(e @ CtlError::Unreachable { .. }) => return Err(e),
            Err(e) => {
                eprintln!("outpost ctl: {e}");
                results.failed.push(id.clone());
            }
        }
    }
    Ok(())
}

/// The number a bulk reply reports, whatever the server calls it.
fn count_in(reply: &Value) -> Option<u64> {
    ["resubmitted", "count"].iter().find_map(|key| reply.get(key).and_then(Value::as_u64))
}
