//! `outpost demo`: a whole outpost on loopback for a newcomer, in one command. A central and an
//! edge run as child processes of this executable (embedded storage, configs written into the demo
//! directory, short connectivity intervals so state changes show within seconds); a sample
//! downstream service runs in this process and prints every message a route delivers to it.
//!
//! The banner's address lines (`edge:`, `central:`, `downstream:`, `directory:`) are one per line,
//! label then URL, so tests and scripts can read them from stdout.
//!
//! With `--tls` the central serves HTTPS and requires a client certificate from the edge (mTLS,
//! bound to the edge's id) and the edge's token: the setup of docs/tls.md, with a private CA and
//! certificates made by `scripts/make-certs.sh` (openssl) in `DIR/pki`.
//!
//! The children run in their own process group, so a terminal's Ctrl-C reaches only this process,
//! which then stops them in order (SIGTERM, wait, SIGKILL after [`CHILD_STOP_TIMEOUT`]). On Linux
//! they also get SIGKILL if this process dies without that chance.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use bytes::Bytes;
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::exit;

/// Ports tried first, so `outpost ctl` (default 7400) works without `--url`; taken ones fall back
/// to a free port.
const PREFERRED_EDGE_PORT: u16 = 7400;
const PREFERRED_CENTRAL_PORT: u16 = 7401;
const PREFERRED_DOWNSTREAM_PORT: u16 = 7410;
/// How long a node may take to answer `/readyz` with 200.
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to stop after SIGTERM before it gets SIGKILL.
const CHILD_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts retried on a new port when another process took the chosen one first.
const MAX_START_ATTEMPTS: u32 = 5;
/// How often the edge's state is polled to print its changes.
const STATE_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Lines of a node's log shown when it fails.
const LOG_TAIL_LINES: usize = 20;
/// Payload characters the downstream prints per message.
const MAX_PRINTED_PAYLOAD_CHARS: usize = 200;
/// The queue the demo's route drains, and the route's name.
const DEMO_QUEUE: &str = "orders";
const DEMO_ROUTE: &str = "demo-orders";
/// With `--tls`: the edge's id (its certificate's name) and its token at the central.
const DEMO_EDGE_ID: &str = "demo-edge";
const DEMO_EDGE_TOKEN: &str = "demo-edge-token-change-me";
/// The certificate script, run with bash (it needs openssl).
const MAKE_CERTS_SCRIPT: &str = include_str!("../../../scripts/make-certs.sh");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep configs, data and logs here (and reuse them next time); default: a temporary directory,
    /// removed on exit.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The central serves HTTPS and requires the edge's client certificate (mTLS) and token;
    /// certificates from a private CA are made in DIR/pki with openssl.
    #[arg(long)]
    tls: bool,
}

/// The demo's TLS files (`--tls`), in `DIR/pki`.
struct DemoTls {
    pki: PathBuf,
}

impl DemoTls {
    /// Runs `scripts/make-certs.sh DIR/pki central demo-edge` (the CA is reused if present).
    fn make(dir: &Path) -> Result<DemoTls, String> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(|e| format!("cannot create {}: {e}", pki.display()))?;
        let script = pki.join("make-certs.sh");
        std::fs::write(&script, MAKE_CERTS_SCRIPT)
            .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        let output = std::process::Command::new("bash")
            .arg(&script)
            .arg(&pki)
            .arg("central")
            .arg(DEMO_EDGE_ID)
            .output()
            .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "making the demo's certificates failed (is openssl installed?): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(DemoTls { pki })
    }

    fn file(&self, name: &str) -> String {
        self.pki.join(name).display().to_string()
    }
}

pub fn run(args: DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outpost demo: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    runtime.block_on(demo(args))
}

/// Why the demo ended.
enum Outcome {
    /// SIGINT or SIGTERM: stop everything, exit 0.
    StopRequested(&'static str),
    /// Something broke (a node died or never became ready): stop the rest, exit 1.
    Failed(String),
}

async fn demo(args: DemoArgs) -> ExitCode {
    let (dir, remove_dir_at_exit) = match demo_directory(args.dir) {
        Ok(dir) => dir,
        Err(message) => {
            eprintln!("outpost demo: {message}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let tls = if args.tls {
        match DemoTls::make(&dir) {
            Ok(tls) => Some(tls),
            Err(message) => {
                eprintln!("outpost demo: {message}");
                return ExitCode::from(exit::FATAL);
            }
        }
    } else {
        None
    };
    let (mut sigint, mut sigterm) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(int), Ok(term)) => (int, term),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("outpost demo: cannot install signal handlers: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let started = Instant::now();

    let downstream = match Downstream::start(started).await {
        Ok(downstream) => downstream,
        Err(e) => {
            eprintln!("outpost demo: cannot start the sample downstream service: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let mut nodes = Nodes { central: None, edge: None };

    let outcome = tokio::select! {
        outcome = run_until_stopped(&dir, &downstream, &mut nodes, started, tls.as_ref()) => outcome,
        _ = sigint.recv() => Outcome::StopRequested("SIGINT"),
        _ = sigterm.recv() => Outcome::StopRequested("SIGTERM"),
    };

    match &outcome {
        Outcome::StopRequested(name) => {
            println!("\n{name}: stopping the edge, the central and the downstream service…")
        }
        Outcome::Failed(problem) => eprintln!("\noutpost demo: {problem}\nstopping the rest…"),
    }
    // The nodes first: the central may be delivering to the downstream service right now.
    let clean = stop_all(&mut nodes).await;
    downstream.stop().await;

    match outcome {
        Outcome::StopRequested(_) => {
            if remove_dir_at_exit {
                let _ = std::fs::remove_dir_all(&dir);
            }
            if clean {
                println!("stopped");
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::FATAL)
            }
        }
        Outcome::Failed(_) => {
            eprintln!("kept the demo directory for inspection: {}", dir.display());
            ExitCode::from(exit::FATAL)
        }
    }
}

/// The two node processes; `None` until started (and after being stopped).
struct Nodes {
    central: Option<NodeProcess>,
    edge: Option<NodeProcess>,
}

/// Starts the central and the edge, prints the banner, then waits until one of them exits (which
/// is a failure: only this process may stop them). Cancelled by a stop signal at any point.
async fn run_until_stopped(
    dir: &Path,
    downstream: &Downstream,
    nodes: &mut Nodes,
    started: Instant,
    tls: Option<&DemoTls>,
) -> Outcome {
    let program = match std::env::current_exe() {
        Ok(program) => program,
        Err(e) => return Outcome::Failed(format!("cannot find this executable to run the nodes: {e}")),
    };
    // Each node goes into its slot as soon as it is spawned, so a stop signal during its start
    // still stops it the ordinary way.
    if let Err(problem) =
        NodeProcess::start(&mut nodes.central, &program, Role::Central, dir, None, downstream.addr, tls).await
    {
        return Outcome::Failed(problem);
    }
    let central_url = nodes.central.as_ref().map(|n| n.url.clone()).unwrap_or_default();
    if let Err(problem) = NodeProcess::start(
        &mut nodes.edge,
        &program,
        Role::Edge,
        dir,
        Some(&central_url),
        downstream.addr,
        tls,
    )
    .await
    {
        return Outcome::Failed(problem);
    }
    let edge_url = nodes.edge.as_ref().map(|n| n.url.clone()).unwrap_or_default();
    print_banner(&program, dir, &edge_url, &central_url, downstream.addr, tls);

    // Aborted when this future ends or is cancelled by a stop signal.
    let _watcher = AbortOnDrop(tokio::spawn(print_edge_state_changes(edge_url, started)));
    let (Some(central), Some(edge)) = (nodes.central.as_mut(), nodes.edge.as_mut()) else {
        unreachable!("both nodes were started above");
    };
    tokio::select! {
        status = central.child.wait() => central.died(status),
        status = edge.child.wait() => edge.died(status),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `--dir` (created if missing, kept), or a fresh directory under the system's temporary directory
/// (removed at exit). Returns the directory and whether to remove it.
fn demo_directory(dir: Option<PathBuf>) -> Result<(PathBuf, bool), String> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create --dir {}: {e}", dir.display()))?;
        let dir = dir.canonicalize().map_err(|e| format!("cannot resolve --dir {}: {e}", dir.display()))?;
        return Ok((dir, false));
    }
    let base = std::env::temp_dir();
    for attempt in 0..100 {
        let dir = base.join(format!("outpost-demo-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((dir, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create a directory under {}: {e}", base.display())),
        }
    }
    Err(format!("cannot create a fresh directory under {}; pass --dir DIR", base.display()))
}

/// A loopback port: `preferred` if it is free now, else any free one. Another process may take it
/// before the node binds it; [`NodeProcess::start`] then tries again with a new one.
fn pick_port(preferred: Option<u16>) -> u16 {
    if let Some(port) = preferred {
        if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    StdTcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn print_banner(
    program: &Path,
    dir: &Path,
    edge_url: &str,
    central_url: &str,
    downstream: SocketAddr,
    tls: Option<&DemoTls>,
) {
    let exe = program.display();
    // With --tls, curl and ctl trust the demo's CA for the central.
    let (cacert, ca_file, tls_note) = match tls {
        Some(tls) => (
            format!(" --cacert {}", tls.file("ca.pem")),
            format!(" --ca-file {}", tls.file("ca.pem")),
            format!(
                "tls:        the central serves HTTPS; the edge presents {} (mTLS) and its token;\n            \
                 CA, certificates and keys in {} (see docs/tls.md)\n",
                tls.file(&format!("{DEMO_EDGE_ID}.pem")),
                tls.pki.display()
            ),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let q = DEMO_QUEUE;
    println!(
        "\n\
outpost demo is running: an edge, a central and a sample downstream service on loopback.

edge:       {edge_url}
central:    {central_url}
downstream: http://{downstream}/{q}
console:    {edge_url}/  (edge)   {central_url}/  (central)
directory:  {dir}
logs:       {dir}/edge.log  {dir}/central.log
{tls_note}
Try it (copy and paste):

  # 1. post an order to the edge: it is stored there, forwarded to the central, and delivered by
  #    the central's route \"{DEMO_ROUTE}\" to the downstream service, which prints it here
  curl -i -X POST -H 'Content-Type: application/json' --data '{{\"order\": 1}}' {edge_url}/v1/queues/{q}/messages

  # 2. a delivered message is released at the central; to see one there, hold the route in store
  #    mode, post, read the queue at the central, then forward mode delivers it
  {exe} ctl{ca_file} --url {central_url} store {DEMO_ROUTE}
  curl -i -X POST -H 'Content-Type: application/json' --data '{{\"order\": 2}}' {edge_url}/v1/queues/{q}/messages
  curl -s{cacert} '{central_url}/v1/queues/{q}/messages?after_seq=0'
  {exe} ctl{ca_file} --url {central_url} forward {DEMO_ROUTE}

  # 3. a queue no route drains keeps what arrives: post a note, read it at the central
  curl -i -X POST -H 'Content-Type: text/plain' --data 'hello from the edge' {edge_url}/v1/queues/notes/messages
  curl -s{cacert} '{central_url}/v1/queues/notes/messages?after_seq=0'

  # 4. statuses
  curl -s {edge_url}/v1/status
  {exe} ctl --url {edge_url} status
  {exe} ctl{ca_file} --url {central_url} edges
  {exe} ctl{ca_file} --url {central_url} routes

  # 5. see the edge go offline and back: maintenance on the central, then off
  {exe} ctl{ca_file} --url {central_url} maintenance on
  {exe} ctl{ca_file} --url {central_url} maintenance off

Ctrl-C stops everything.
",
        dir = dir.display(),
    );
}

/// Prints the edge's state whenever it changes, so the newcomer sees offline → online.
async fn print_edge_state_changes(edge_url: String, started: Instant) {
    let Ok(http) = reqwest::Client::builder().timeout(Duration::from_secs(2)).build() else { return };
    let url = format!("{edge_url}/v1/status");
    let mut last_state = String::new();
    let mut ticker = tokio::time::interval(STATE_POLL_INTERVAL);
    loop {
        ticker.tick().await;
        let Ok(response) = http.get(&url).send().await else { continue };
        let Ok(status) = response.json::<serde_json::Value>().await else { continue };
        let Some(state) = status.get("state").and_then(|s| s.as_str()) else { continue };
        if state != last_state {
            let cause = match (state, status["offline_log"].as_array().and_then(|log| log.last())) {
                ("offline", Some(entry)) => format!(
                    " ({}: {})",
                    entry["cause"].as_str().unwrap_or("?"),
                    entry["detail"].as_str().unwrap_or("")
                ),
                _ => String::new(),
            };
            let arrow = if last_state.is_empty() { String::new() } else { format!("{last_state} → ") };
            println!("{} edge state: {arrow}{state}{cause}", stamp(started));
            last_state = state.to_string();
        }
    }
}

/// `[+12.3s]`: time since the demo started, on every event line.
fn stamp(started: Instant) -> String {
    format!("[+{:.1}s]", started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// The node processes.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Central,
    Edge,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Central => "central",
            Role::Edge => "edge",
        }
    }

    fn preferred_port(self) -> u16 {
        match self {
            Role::Central => PREFERRED_CENTRAL_PORT,
            Role::Edge => PREFERRED_EDGE_PORT,
        }
    }
}

struct NodeProcess {
    role: Role,
    child: Child,
    url: String,
    log_path: PathBuf,
    /// The CA to trust for an https `url`.
    ca_file: Option<PathBuf>,
}

impl NodeProcess {
    /// Writes the node's config, runs `outpost ROLE --config …` into `slot` and waits until
    /// `/readyz` is 200. On an error a node that still runs is left in `slot` for the caller to stop.
    async fn start(
        slot: &mut Option<NodeProcess>,
        program: &Path,
        role: Role,
        dir: &Path,
        central_url: Option<&str>,
        downstream: SocketAddr,
        tls: Option<&DemoTls>,
    ) -> Result<(), String> {
        let name = role.name();
        let config_path = dir.join(format!("{name}.toml"));
        let log_path = dir.join(format!("{name}.log"));
        let mut port = pick_port(Some(role.preferred_port()));
        for attempt in 1..=MAX_START_ATTEMPTS {
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            let data_dir = dir.join(name).join("data");
            std::fs::write(&config_path, node_config(role, listen, &data_dir, downstream, tls, central_url))
                .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
            let log_offset = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            // With TLS the edge's upstream (and its certificate) is in its config file.
            let flag_url = if tls.is_some() { None } else { central_url };
            let node = slot.insert(NodeProcess::spawn(
                program,
                role,
                &config_path,
                flag_url,
                &log_path,
                listen,
                tls,
            )?);
            match node.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(Some(status)) if log_since(&log_path, log_offset).contains("cannot listen") => {
                    *slot = None;
                    eprintln!("outpost demo: port {port} for the {name} was taken (attempt {attempt}, {status}); trying another");
                    port = pick_port(None);
                }
                Err(Some(status)) => {
                    *slot = None;
                    return Err(format!(
                        "the {name} exited with {status} while starting; last lines of {}:\n{}",
                        log_path.display(),
                        log_tail(&log_path, LOG_TAIL_LINES)
                    ));
                }
                Err(None) => {
                    return Err(format!(
                        "the {name} was not ready within {CHILD_READY_TIMEOUT:?}; last lines of {}:\n{}",
                        log_path.display(),
                        log_tail(&log_path, LOG_TAIL_LINES)
                    ));
                }
            }
        }
        Err(format!("could not find a free port for the {name} in {MAX_START_ATTEMPTS} attempts"))
    }

    fn spawn(
        program: &Path,
        role: Role,
        config_path: &Path,
        central_url: Option<&str>,
        log_path: &Path,
        listen: SocketAddr,
        tls: Option<&DemoTls>,
    ) -> Result<NodeProcess, String> {
        let name = role.name();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_for_stderr =
            log.try_clone().map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut command = Command::new(program);
        command.arg(name).arg("--config").arg(config_path);
        if let Some(url) = central_url {
            command.arg("--central").arg(url);
        }
        // The nodes take their settings from the generated files only: an OUTPOST_* variable meant
        // for something else (a real node's settings in this shell) must not change the demo.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("OUTPOST_") && key_text != "OUTPOST_LOG" {
                command.env_remove(&key);
            }
        }
        command
            .env_remove("NOTIFY_SOCKET")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            // Own process group: Ctrl-C in the terminal reaches only the demo, which stops the
            // nodes itself, so a node never exits "unexpectedly" before the demo knows it is stopping.
            .process_group(0)
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The "parent" is
        // the spawning thread: this runtime is current-thread, so that is the demo's main thread.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| format!("cannot run {} {name}: {e}", program.display()))?;
        let scheme = if tls.is_some() && role == Role::Central { "https" } else { "http" };
        let ca_file = tls.filter(|_| role == Role::Central).map(|t| PathBuf::from(t.file("ca.pem")));
        Ok(NodeProcess {
            role,
            child,
            url: format!("{scheme}://{listen}"),
            log_path: log_path.to_path_buf(),
            ca_file,
        })
    }

    /// `Ok` once `/readyz` answers 200; `Err(Some(status))` if the process exited first,
    /// `Err(None)` after [`CHILD_READY_TIMEOUT`].
    async fn wait_ready(&mut self) -> Result<(), Option<ExitStatus>> {
        let mut probe = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(2));
        if let Some(ca_file) = &self.ca_file {
            let pem = std::fs::read(ca_file).map_err(|_| None)?;
            probe = probe.add_root_certificate(reqwest::Certificate::from_pem(&pem).map_err(|_| None)?);
        }
        let probe = probe.build().map_err(|_| None)?;
        let url = format!("{}/readyz", self.url);
        let deadline = Instant::now() + CHILD_READY_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Some(status));
            }
            if probe.get(&url).send().await.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn signal_stop(&self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }

    /// Waits for the process to exit after [`NodeProcess::signal_stop`]; SIGKILL after
    /// [`CHILD_STOP_TIMEOUT`]. True if it stopped cleanly (exit 0).
    async fn wait_stopped(&mut self) -> bool {
        let name = self.role.name();
        match tokio::time::timeout(CHILD_STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => true,
            Ok(Ok(status)) => {
                eprintln!("outpost demo: the {name} stopped with {status}; see {}", self.log_path.display());
                false
            }
            Ok(Err(e)) => {
                eprintln!("outpost demo: cannot wait for the {name}: {e}");
                false
            }
            Err(_) => {
                eprintln!("outpost demo: the {name} did not stop within {CHILD_STOP_TIMEOUT:?}; killing it");
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                false
            }
        }
    }

    /// What to say when this node exited while the demo ran.
    fn died(&self, status: std::io::Result<ExitStatus>) -> Outcome {
        let status = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("an unknown status ({e})"),
        };
        Outcome::Failed(format!(
            "the {} ({}) exited unexpectedly with {status}; last lines of {}:\n{}",
            self.role.name(),
            self.url,
            self.log_path.display(),
            log_tail(&self.log_path, LOG_TAIL_LINES)
        ))
    }
}

/// Stops the nodes that are still running: SIGTERM to all first, so they stop side by side, then
/// waits for each. True if every one exited 0.
async fn stop_all(nodes: &mut Nodes) -> bool {
    let mut running: Vec<&mut NodeProcess> = [nodes.edge.as_mut(), nodes.central.as_mut()]
        .into_iter()
        .flatten()
        .filter_map(|node| matches!(node.child.try_wait(), Ok(None)).then_some(node))
        .collect();
    for node in &running {
        node.signal_stop();
    }
    let mut clean = true;
    for node in &mut running {
        clean &= node.wait_stopped().await;
    }
    clean
}

/// The generated configuration of a demo node. The short `[connectivity]` intervals make state
/// changes show within seconds; the route delivers queue `orders` to the in-process downstream.
/// `auto_forward` stays off so that `ctl store` holds messages at the central until `ctl forward`
/// (the banner's second step); the downstream service never fails, so nothing needs probing.
/// With `tls`, the central serves HTTPS, requires the edge's client certificate and lists the
/// edge with its token; the edge's `[[upstream]]` names the central with the CA, its certificate
/// and the token.
fn node_config(
    role: Role,
    listen: SocketAddr,
    data_dir: &Path,
    downstream: SocketAddr,
    tls: Option<&DemoTls>,
    central_url: Option<&str>,
) -> String {
    let mut toml = format!(
        "# Written by `outpost demo`; rewritten at every start.\n\
         node_id = \"demo-{name}\"\n\
         listen = \"{listen}\"\n\
         data_dir = {data_dir:?}\n\
         \n\
         [connectivity]\n\
         ping_interval = \"2s\"\n\
         offline_probe_interval = \"2s\"\n\
         transition_to_offline_wait = \"2s\"\n\
         failed_transition_wait = \"10s\"\n",
        name = role.name(),
        data_dir = data_dir.display().to_string(),
    );
    match (tls, role) {
        (Some(tls), Role::Central) => toml.push_str(&format!(
            "\n[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\n\
             [[edge]]\nid = \"{DEMO_EDGE_ID}\"\ntoken = \"{DEMO_EDGE_TOKEN}\"\n",
            tls.file("central.pem"),
            tls.file("central.key"),
            tls.file("ca.pem"),
        )),
        (Some(tls), Role::Edge) => toml.push_str(&format!(
            "\n[[upstream]]\nurl = \"{}\"\ntoken = \"{DEMO_EDGE_TOKEN}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            central_url.unwrap_or_default(),
            tls.file("ca.pem"),
            tls.file(&format!("{DEMO_EDGE_ID}.pem")),
            tls.file(&format!("{DEMO_EDGE_ID}.key")),
        )),
        (None, _) => {}
    }
    if role == Role::Central {
        toml.push_str(&format!(
            "\n\
             [[route]]\n\
             name = \"{DEMO_ROUTE}\"\n\
             queue = \"{DEMO_QUEUE}\"\n\
             urls = [\"http://{downstream}/{DEMO_QUEUE}\"]\n\
             timeout = \"5s\"\n\
             retry_initial = \"1s\"\n\
             retry_max = \"5s\"\n\
             auto_forward = false\n"
        ));
    }
    toml
}

fn log_since(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(offset as usize..).unwrap_or_default()).into_owned()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = log_since(path, 0);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The sample downstream service.
// ---------------------------------------------------------------------------------------------

/// An HTTP service in this process that accepts every POST and prints what it got: the stand-in
/// for an ERP or a warehouse system that a route delivers to.
struct Downstream {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Downstream {
    async fn start(started: Instant) -> std::io::Result<Downstream> {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", PREFERRED_DOWNSTREAM_PORT)).await {
            Ok(listener) => listener,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let addr = listener.local_addr()?;
        let app =
            axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                receive(started, method, uri, headers, body)
            });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("outpost demo: the downstream service failed: {e}");
            }
        });
        Ok(Downstream { addr, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn receive(started: Instant, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let mut payload: String = String::from_utf8_lossy(&body).replace(['\n', '\r'], " ");
    if payload.chars().count() > MAX_PRINTED_PAYLOAD_CHARS {
        payload = payload.chars().take(MAX_PRINTED_PAYLOAD_CHARS).collect::<String>() + "…";
    }
    println!(
        "{} downstream received {}: id={} queue={} origin={} seq={} content-type={} payload={payload}",
        stamp(started),
        uri.path(),
        header("outpost-message-id"),
        header("outpost-queue"),
        header("outpost-origin"),
        header("outpost-seq"),
        header("content-type"),
    );
    StatusCode::OK
}
