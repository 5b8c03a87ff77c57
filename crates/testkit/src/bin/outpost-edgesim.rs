//! `outpost-edgesim`: many simulated edges against one central or a cluster, then the
//! exactly-once-and-in-order check (see `testkit::edgesim`). Used by `bench/edges.sh`.
//!
//! ```text
//! outpost-edgesim --central http://127.0.0.1:7401 [--central URL]... --edges 1000 --rate 1 \
//!     --duration 60s [--ping-interval 5s] [--json]
//! ```
//! Exit code 0 when the check passed, 1 when it did not, 2 on a usage error.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use testkit::edgesim::{self, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "outpost-edgesim",
    about = "Simulated edges against an outpost central; checks exactly once and order"
)]
struct Args {
    /// A central's base URL; repeat for a cluster (edge i uses central i mod count).
    #[arg(long = "central", required = true)]
    centrals: Vec<String>,
    #[arg(long, default_value_t = 100)]
    edges: usize,
    /// Messages per second per edge.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// How long messages are generated, e.g. 60s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Links open over this long before generation starts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    ramp: Duration,
    /// After generation, how long every message may take to be acknowledged.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// The ping interval each edge asks for.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    ping_interval: Duration,
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    queues_per_edge: usize,
    /// Queue names in use (edge i's queue j is sim{(i + j) % N}).
    #[arg(long, default_value_t = 8)]
    queue_names: usize,
    #[arg(long, default_value = "sim")]
    queue_prefix: String,
    /// Edge ids are PREFIX00000, PREFIX00001, …; default: sim + a random tag + "-".
    #[arg(long)]
    edge_prefix: Option<String>,
    /// Edge id X sends `Authorization: Bearer {PREFIX}X` (for a central with `[[edge]]` entries).
    #[arg(long)]
    token_prefix: Option<String>,
    /// Admin token for reading the queues back.
    #[arg(long, env = "OUTPOST_TOKEN")]
    admin_token: Option<String>,
    #[arg(long, default_value_t = 4)]
    in_flight: u32,
    #[arg(long, default_value_t = 1000)]
    batch_messages: u64,
    /// Every N-th acknowledged batch is sent again (0: never).
    #[arg(long, default_value_t = 50)]
    replay_every: u64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Edges per loopback source address (0: one address, the kernel's choice).
    #[arg(long, default_value_t = 4000)]
    edges_per_source_ip: usize,
    /// Skip reading the queues back.
    #[arg(long)]
    no_verify: bool,
    /// Speak HTTP/1.1 only, as edges before the link was one HTTP/2 connection.
    #[arg(long)]
    http1: bool,
    /// Print progress to stderr this often.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    progress: Duration,
    /// Print the report as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 =
        number.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 10s or 2m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = SimConfig {
        centrals: args.centrals,
        edges: args.edges,
        token_prefix: args.token_prefix,
        admin_token: args.admin_token,
        queues_per_edge: args.queues_per_edge,
        queue_names: args.queue_names,
        queue_prefix: args.queue_prefix,
        rate_per_edge: args.rate,
        duration: args.duration,
        ramp: args.ramp,
        drain_timeout: args.drain_timeout,
        payload_bytes: args.size,
        ping_interval: args.ping_interval,
        in_flight: args.in_flight,
        batch_messages: args.batch_messages,
        replay_every: args.replay_every,
        request_timeout: args.request_timeout,
        edges_per_source_ip: args.edges_per_source_ip,
        verify: !args.no_verify,
        progress_every: Some(args.progress),
        http1: args.http1,
        ..SimConfig::default()
    };
    if let Some(prefix) = args.edge_prefix {
        config.edge_prefix = prefix;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let report = match runtime.block_on(edgesim::run(config)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("outpost-edgesim: {e}");
            return ExitCode::from(2);
        }
    };
    let pretty = serde_json::to_string_pretty(&report).expect("the report serializes");
    eprintln!("{pretty}");
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("the report serializes"));
    }
    if report.ok() {
        eprintln!("outpost-edgesim: OK: every message stored exactly once and in order");
        ExitCode::SUCCESS
    } else {
        eprintln!("outpost-edgesim: CHECK FAILED (see problems above)");
        ExitCode::from(1)
    }
}
