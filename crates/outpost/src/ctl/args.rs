//! `outpost ctl`'s command line: the options every command shares, the commands, and the check of
//! the names a command puts into a URL path.

use clap::{ArgGroup, Args, Subcommand, ValueEnum};

/// Where `ctl` looks for a node when neither `--url` nor `OUTPOST_URL` says: an edge's default.
const DEFAULT_URL: &str = "http://127.0.0.1:7400";
/// Entries `ctl failed` asks for when `--limit` is not given (the API's default too).
const DEFAULT_FAILED_LIMIT: u32 = 100;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The node's API.
    #[arg(long, global = true, env = "OUTPOST_URL", default_value = DEFAULT_URL, value_name = "URL")]
    pub(super) url: String,
    /// Admin token, sent as `Authorization: Bearer T`.
    #[arg(long, global = true, env = "OUTPOST_TOKEN", hide_env_values = true, value_name = "T")]
    pub(super) token: Option<String>,
    /// PEM CA certificate(s) to trust for an https:// URL (default: the system's roots).
    #[arg(long, global = true, env = "OUTPOST_CA_FILE", value_name = "FILE")]
    pub(super) ca_file: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub(super) json: bool,
    #[command(subcommand)]
    pub(super) command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub(super) enum CtlCommand {
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
pub(super) enum OnOff {
    On,
    Off,
}

/// The name to check of a failed-entry route: a consumer's without its `consumer:` prefix.
fn consumer_of_route(route: &str) -> &str {
    outpost_store::consumers::consumer_of_route(route).unwrap_or(route)
}

/// Route and edge names go into URL paths: refuse what the API would refuse anyway, before asking.
/// Failed-entry ids are opaque, so they are only checked not to break the path.
pub(super) fn names_to_check(command: &CtlCommand) -> Vec<&str> {
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
