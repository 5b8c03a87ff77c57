//! The real `outpost` binary as a child of the test: its own temporary directory (data, config,
//! log), a free loopback port, readiness by `/readyz`, and kill -9 / SIGTERM / restart on the same
//! data directory and port.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client::Client;

/// How long a node may take to answer `/readyz` with 200 after it was started.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Node::sigterm`] waits for the node to exit.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a start is retried when the port turned out to be taken (another process grabbed it
/// between [`free_port`] and the node's bind).
const MAX_BIND_ATTEMPTS: u32 = 20;
/// Lines of the node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// A loopback TCP port that was free a moment ago. Another process may take it before the node
/// binds it; [`NodeBuilder::start`] retries with a new port when that happens.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind a loopback port").port()
}

/// How to start a node. From [`Node::builder`]; an edge with no config file unless told otherwise.
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    binary: PathBuf,
    role: String,
    args: Vec<OsString>,
    config_toml: Option<String>,
    env: Vec<(OsString, OsString)>,
    data_dir: Option<PathBuf>,
    ready_timeout: Duration,
    tls_ca: Option<PathBuf>,
    open_file_limit: Option<u64>,
}

impl NodeBuilder {
    /// The node serves HTTPS (its config has `[tls]`) with a certificate signed by the CA in
    /// `ca_file`: [`Node::url`] is `https://…` and [`Node::client`] trusts that CA.
    pub fn tls_ca(mut self, ca_file: impl Into<PathBuf>) -> NodeBuilder {
        self.tls_ca = Some(ca_file.into());
        self
    }

    /// `"edge"` (the default) or `"central"`.
    /// The node runs with this open-file limit, soft and hard (`ulimit -n`).
    pub fn open_file_limit(mut self, limit: u64) -> NodeBuilder {
        self.open_file_limit = Some(limit);
        self
    }

    pub fn role(mut self, role: &str) -> NodeBuilder {
        self.role = role.to_string();
        self
    }

    /// An argument after `outpost ROLE --listen … --data-dir … [--config …]`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> NodeBuilder {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> NodeBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// A TOML configuration, written to `outpost.toml` in the node's directory and passed with
    /// `--config`.
    pub fn config(mut self, toml: &str) -> NodeBuilder {
        self.config_toml = Some(toml.to_string());
        self
    }

    /// An environment variable for the node. The node inherits no `OUTPOST_*` variable from the
    /// test process, only the ones set here.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> NodeBuilder {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Use this data directory instead of a fresh one (e.g. another node's, to see it refused).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> NodeBuilder {
        self.data_dir = Some(dir.into());
        self
    }

    /// The config file or an environment variable names the edge's upstream (flags always win).
    fn names_an_upstream(&self) -> bool {
        self.config_toml.as_deref().is_some_and(|toml| toml.contains("upstream"))
            || self.env.iter().any(|(name, _)| name.to_string_lossy().starts_with("OUTPOST_UPSTREAM"))
    }

    pub fn ready_timeout(mut self, timeout: Duration) -> NodeBuilder {
        self.ready_timeout = timeout;
        self
    }

    /// Starts the node and waits until `/readyz` answers 200. Panics with the node's log if it
    /// exits first or is not ready within the ready timeout.
    pub async fn start(self) -> Node {
        let mut node = self.prepare();
        node.start_until_ready(true).await;
        node
    }

    /// Starts the node without waiting for it: for nodes expected to exit (bad config, data
    /// directory in use). Use [`Node::wait_exit`] and [`Node::log`].
    pub fn spawn(self) -> Node {
        let mut node = self.prepare();
        node.spawn_child();
        node
    }

    fn prepare(self) -> Node {
        let dir =
            tempfile::Builder::new().prefix("outpost-test-").tempdir().expect("create a temporary directory");
        let dir_path = dir.path().to_path_buf();
        let config_path = self.config_toml.as_ref().map(|toml| {
            let path = dir_path.join("outpost.toml");
            std::fs::write(&path, toml).expect("write the node's config file");
            path
        });
        Node {
            data_dir: self.data_dir.clone().unwrap_or_else(|| dir_path.join("data")),
            stdout: Capture::new(dir_path.join("stdout.log")),
            stderr: Capture::new(dir_path.join("stderr.log")),
            config_path,
            dir_path,
            dir: Some(dir),
            port: free_port(),
            child: None,
            starts: 0,
            spec: self,
        }
    }
}

/// A running (or stopped) `outpost` process. Dropping it kills the process; if the test is
/// panicking, the log tail is printed and the node's directory is kept for inspection.
pub struct Node {
    spec: NodeBuilder,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    data_dir: PathBuf,
    config_path: Option<PathBuf>,
    stdout: Capture,
    stderr: Capture,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

/// One output stream of the node, appended to a file across restarts.
struct Capture {
    path: PathBuf,
    /// Where the current start's output begins.
    offset_of_this_start: u64,
}

impl Capture {
    fn new(path: PathBuf) -> Capture {
        Capture { path, offset_of_this_start: 0 }
    }

    /// Writes a line saying which start follows, and returns a handle for the child.
    fn begin_start(&mut self, marker: &str) -> File {
        let mut file = File::options().create(true).append(true).open(&self.path).expect("open a node log");
        writeln!(file, "{marker}").expect("write a node log");
        self.offset_of_this_start = file.metadata().map(|m| m.len()).unwrap_or(0);
        file
    }

    fn read_from(&self, offset: u64) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = File::open(&self.path) {
            if file.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = file.read_to_end(&mut text);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    fn all(&self) -> String {
        self.read_from(0)
    }

    fn since_start(&self) -> String {
        self.read_from(self.offset_of_this_start)
    }
}

/// Marker lines the harness writes between starts.
const START_MARKER: &str = "=== testkit: start #";

enum Readiness {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

impl Node {
    /// A builder for an edge node run from `binary` (pass `env!("CARGO_BIN_EXE_outpost")`).
    pub fn builder(binary: impl Into<PathBuf>) -> NodeBuilder {
        NodeBuilder {
            binary: binary.into(),
            role: "edge".to_string(),
            args: Vec::new(),
            config_toml: None,
            env: Vec::new(),
            data_dir: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            tls_ca: None,
            open_file_limit: None,
        }
    }

    /// Starts a `role` node with `extra_args` and an optional TOML config, and waits until ready.
    pub async fn start(
        binary: impl Into<PathBuf>,
        role: &str,
        extra_args: &[&str],
        config_toml: Option<&str>,
    ) -> Node {
        let mut builder = Node::builder(binary).role(role).args(extra_args.iter().copied());
        if let Some(toml) = config_toml {
            builder = builder.config(toml);
        }
        builder.start().await
    }

    /// `http://127.0.0.1:PORT` (`https://` for a node built with [`NodeBuilder::tls_ca`]).
    pub fn url(&self) -> String {
        let scheme = if self.spec.tls_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A client for this node without a token.
    /// On a central: waits until `edge_id`'s probes reached it `count` more times (its
    /// `last_seen` there changed that often; a probe in maintenance does not count as seen).
    /// Proof that the edge talked to the central, where a pause would only hope so.
    pub async fn wait_probes_from(&self, edge_id: &str, count: usize) {
        let client = self.client();
        let path = format!("/v1/edges/{edge_id}");
        let last_seen = || async { client.get(&path).await.unwrap().json()["last_seen"].clone() };
        let mut seen = last_seen().await;
        for _ in 0..count {
            let before = seen;
            seen = crate::wait::poll_until(Duration::from_secs(10), || async {
                let now = last_seen().await;
                (now != before).then_some(now)
            })
            .await
            .unwrap_or_else(|| panic!("no probe of {edge_id} reached {} within 10 s", self.url()));
        }
    }

    pub fn client(&self) -> Client {
        match &self.spec.tls_ca {
            Some(ca) => Client::with_ca(&self.url(), ca),
            None => Client::new(&self.url()),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The node's own temporary directory (log, config, and the data directory unless one was given).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// The running process's id; `None` once it has been killed or stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the node wrote to stderr (its log) since it was last started.
    pub fn stderr_since_start(&self) -> String {
        self.stderr.since_start()
    }

    /// What the node wrote to stdout since it was last started.
    pub fn stdout_since_start(&self) -> String {
        self.stdout.since_start()
    }

    /// Everything the node wrote, across every start: stderr, then stdout if it wrote any.
    pub fn log(&self) -> String {
        join_outputs(self.stderr.all(), self.stdout.all())
    }

    /// What the node wrote since it was last started: stderr, then stdout if it wrote any.
    pub fn log_since_start(&self) -> String {
        join_outputs(self.stderr.since_start(), self.stdout.since_start())
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// True while the process runs (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(child) => match child.try_wait().expect("poll the node process") {
                None => true,
                Some(_) => {
                    self.child = None;
                    false
                }
            },
        }
    }

    /// SIGKILL, then reap. Panics (with the log) if the node had already exited by itself, since
    /// a test that kills a node expects it to be running.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: the node is not running");
        if let Some(status) = child.try_wait().expect("poll the node process") {
            panic!(
                "kill9: the node had already exited by itself with {status}\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let status = child.wait().expect("reap the killed node");
        if status.code().is_some() {
            panic!(
                "kill9: the node exited by itself with {status} before SIGKILL\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Sends `signal` to the running node.
    pub fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("signal: the node is not running");
        kill(Pid::from_raw(pid as i32), signal).expect("send a signal to the node");
    }

    /// SIGTERM, then waits for the node to exit; returns its exit status.
    pub async fn sigterm(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(DEFAULT_STOP_TIMEOUT).await
    }

    /// Waits until the process exits and returns its status; panics (with the log) after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let child = self.child.as_mut().expect("wait_exit: the node is not running");
            if let Some(status) = child.try_wait().expect("poll the node process") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!("the node did not exit within {timeout:?}\n{}", self.log_tail(LOG_TAIL_LINES));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Starts the node again on the same data directory and port, and waits until it is ready.
    /// The previous process must have ended ([`Node::kill9`], [`Node::sigterm`]).
    pub async fn restart(&mut self) {
        assert!(!self.is_running(), "restart: the node is still running; kill9() or sigterm() it first");
        self.start_until_ready(false).await;
    }

    async fn start_until_ready(&mut self, may_change_port: bool) {
        for attempt in 1..=MAX_BIND_ATTEMPTS {
            let started = Instant::now();
            self.spawn_child();
            match self.wait_ready().await {
                Readiness::Ready => return,
                Readiness::Exited(status) if self.log_since_start().contains("cannot listen") => {
                    // The port was taken after free_port() released it (or, on a restart, by
                    // whatever grabbed it while the node was down).
                    eprintln!("testkit: port {} was taken (attempt {attempt}, {status})", self.port);
                    if may_change_port {
                        self.port = free_port();
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Readiness::Exited(status) => panic!(
                    "the node exited with {status} before it was ready\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                ),
                Readiness::TimedOut => {
                    let _ = self.child.as_mut().map(Child::kill);
                    panic!(
                        "the node was not ready within {:?} (started {:?} ago)\n{}",
                        self.spec.ready_timeout,
                        started.elapsed(),
                        self.log_tail(LOG_TAIL_LINES)
                    )
                }
            }
        }
        panic!(
            "could not start the node on a free port in {MAX_BIND_ATTEMPTS} attempts\n{}",
            self.log_tail(LOG_TAIL_LINES)
        );
    }

    async fn wait_ready(&mut self) -> Readiness {
        // No pooled connections: a connection to a previous process must never answer for this one.
        let mut probe = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(2));
        if let Some(ca) = &self.spec.tls_ca {
            probe = probe.add_root_certificate(crate::client::read_ca(ca));
        }
        let probe = probe.build().expect("build the readiness client");
        let url = format!("{}/readyz", self.url());
        let deadline = Instant::now() + self.spec.ready_timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let child = self.child.as_mut().expect("a started node");
            if let Some(status) = child.try_wait().expect("poll the node process") {
                self.child = None;
                return Readiness::Exited(status);
            }
            if probe.get(&url).send().await.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                return Readiness::Ready;
            }
            if Instant::now() >= deadline {
                return Readiness::TimedOut;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn spawn_child(&mut self) {
        assert!(self.child.is_none(), "a node process is already running");
        self.starts += 1;
        let mut command = Command::new(&self.spec.binary);
        command
            .arg(&self.spec.role)
            .arg("--listen")
            .arg(self.addr().to_string())
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(path) = &self.config_path {
            command.arg("--config").arg(path);
        }
        command.args(&self.spec.args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OUTPOST_") {
                command.env_remove(name);
            }
        }
        // An edge the test gave no central to has none (by default an edge tries the central on
        // 127.0.0.1:7401, which may be another test's node). `--central` flags win over this.
        if self.spec.role == "edge" && !self.spec.names_an_upstream() {
            command.env("OUTPOST_UPSTREAM", "none");
        }
        // Plain text in the log file (no ANSI colours), no systemd notifications; then the
        // test's own variables, which may override both.
        command
            .env_remove("NOTIFY_SOCKET")
            .env("NO_COLOR", "1")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        command.current_dir(&self.dir_path);

        let marker = format!("{START_MARKER}{} of {command:?} ===", self.starts);
        command
            .stdin(Stdio::null())
            .stdout(self.stdout.begin_start(&marker))
            .stderr(self.stderr.begin_start(&marker));
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // If the test process dies without running Drop (killed, aborted), take the node with
            // it rather than leave it serving. The "parent" here is the spawning *thread*: start
            // nodes from the test's own thread or a runtime worker, not from spawn_blocking.
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            let open_file_limit = self.spec.open_file_limit;
            // SAFETY: as above; setrlimit is async-signal-safe too.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(limit) = open_file_limit {
                        let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(
            command.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.spec.binary.display())),
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- outpost {} node at {} (started {} times), last {LOG_TAIL_LINES} log lines -----\n{}\n-----",
                self.spec.role,
                self.url(),
                self.starts,
                self.log_tail(LOG_TAIL_LINES)
            );
            if let Some(dir) = self.dir.take() {
                eprintln!("kept the node's directory for inspection: {}", dir.keep().display());
            }
        }
    }
}

/// A node's stderr followed by its stdout, the latter only if the node wrote to it.
fn join_outputs(stderr: String, stdout: String) -> String {
    let wrote_stdout = stdout.lines().any(|line| !line.starts_with(START_MARKER));
    if wrote_stdout {
        format!("{stderr}----- stdout -----\n{stdout}")
    } else {
        stderr
    }
}
