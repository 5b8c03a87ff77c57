//! The `outpost` binary: command-line parsing and wiring only. Each subcommand lives in its module.

mod bench;
mod ctl;
mod demo;
mod fds;
mod node;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: each request on the ingest path allocates and frees a
/// handful of small buffers (headers, body, id, answer) on the tokio workers, and glibc's
/// malloc/free took ~7 % of their time under `outpost bench` (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes of CONTRACT section 1.
pub mod exit {
    pub const FATAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const DATA_DIR_IN_USE: u8 = 3;
}

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "Store-and-forward messaging for sites that must keep working offline"
)]
struct Cli {
    /// Run the node under a watcher process that restarts it when it dies (see docs/ha.md).
    #[arg(long, global = false)]
    ha: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an edge node: accepts local clients' messages and forwards them to a central.
    Edge(NodeArgs),
    /// Run a central node: stores what edges send and delivers it downstream.
    Central(NodeArgs),
    /// Load generator: sends messages and reports acknowledged throughput and latency.
    Bench(bench::BenchArgs),
    /// Admin client: status, edges, maintenance, routes and failed messages of a running node.
    Ctl(ctl::CtlArgs),
    /// A central, an edge and a sample downstream service on loopback; Ctrl-C stops all.
    Demo(demo::DemoArgs),
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7400 for an edge, :7401 for a central).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Data directory (default ./outpost-data/edge or ./outpost-data/central).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Node id (default: the host name).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Central URL; repeat for failover order, the first is the primary (edge only; default
    /// http://127.0.0.1:7401, or none with OUTPOST_UPSTREAM=none).
    #[arg(long = "central", value_name = "URL")]
    centrals: Vec<String>,
    /// PostgreSQL URL: keep the central's data there; centrals with the same URL form a cluster.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// Set by the --ha watcher on the node it runs.
    #[arg(long, hide = true)]
    child: bool,
}

impl NodeArgs {
    fn flags(&self) -> outpost_core::Flags {
        outpost_core::Flags {
            config_file: self.config.clone(),
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            node_id: self.node_id.clone(),
            centrals: self.centrals.clone(),
            postgres: self.postgres.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Edge(_) | Command::Central(_) | Command::Demo(_)) {
        exit_on_panic();
    }
    match cli.command {
        Command::Edge(args) => run_node(outpost_core::Role::Edge, args, cli.ha),
        Command::Central(args) => run_node(outpost_core::Role::Central, args, cli.ha),
        Command::Bench(args) if !cli.ha => bench::run(args),
        Command::Ctl(args) if !cli.ha => ctl::run(args),
        Command::Demo(args) if !cli.ha => demo::run(args),
        Command::Bench(_) | Command::Ctl(_) | Command::Demo(_) => {
            usage_error("--ha applies to `edge` and `central` only")
        }
    }
}

/// CONTRACT 4.6: a panic in any thread or task ends the whole process with code 1, so the watcher
/// or systemd restarts it. Without this a panic ends only its thread or task (tokio catches it)
/// and the node goes on answering with a dead writer, forwarder or route inside. The default
/// hook prints the panic first; `_exit` skips destructors and atexit handlers, which could block
/// on state the panicking thread left behind. Every acknowledged write is already fsynced.
fn exit_on_panic() {
    let print_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print_panic(info);
        eprintln!(
            "outpost: a panic is a bug and ends the node (exit code {}); restart it to recover",
            exit::FATAL
        );
        // SAFETY: `_exit` only ends the process; it touches no Rust state.
        unsafe { libc::_exit(i32::from(exit::FATAL)) }
    }));
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(exit::USAGE)
}

fn run_node(role: outpost_core::Role, args: NodeArgs, ha: bool) -> ExitCode {
    let config = match outpost_core::Config::load(role, &args.flags()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outpost {}: {e}", role.as_str());
            return ExitCode::from(exit::USAGE);
        }
    };
    if role == outpost_core::Role::Edge && args.postgres.is_some() {
        return usage_error("--postgres is for `outpost central`");
    }
    if role == outpost_core::Role::Central && !args.centrals.is_empty() {
        return usage_error("--central is for `outpost edge`");
    }
    if ha {
        return run_watcher(role, &config);
    }
    node::run(config)
}

/// `outpost --ha edge|central ARGS`: re-runs this same executable with `ARGS --child` under the
/// watcher. The watcher owns no store and no sockets, so it cannot fail the ways the node can.
fn run_watcher(role: outpost_core::Role, config: &outpost_core::Config) -> ExitCode {
    let program = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("outpost --ha: cannot find this executable to run the node: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let mut child_args: Vec<OsString> = vec![role.as_str().into()];
    let mut seen_ha = false;
    for arg in std::env::args_os().skip(1) {
        if !seen_ha && arg == "--ha" {
            seen_ha = true;
            continue;
        }
        if arg == role.as_str() && child_args.len() == 1 {
            continue;
        }
        child_args.push(arg);
    }
    child_args.push("--child".into());
    if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
        eprintln!("outpost --ha: cannot create the data directory {}: {e}", config.data_dir.display());
        return ExitCode::from(exit::FATAL);
    }
    let h = &config.ha;
    let settings = outpost_ha::HaSettings {
        restart_delay: h.restart_delay,
        restart_delay_max: h.restart_delay_max,
        min_uptime: h.min_uptime,
        max_restarts: h.max_restarts,
        restart_window: h.restart_window,
        ready_timeout: h.ready_timeout,
    };
    let code =
        outpost_ha::run_watcher(&settings, &program, &child_args, &config.data_dir.join("outpost_ha.log"));
    ExitCode::from(u8::try_from(code).unwrap_or(exit::FATAL))
}
