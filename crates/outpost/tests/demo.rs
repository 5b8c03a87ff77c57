//! `outpost demo` end to end, as a newcomer runs it: start it, read the URLs from its banner, hold
//! the route, post an order to the edge, read it at the central, let the route deliver it to the
//! sample downstream service, Ctrl-C, and nothing is left running.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::{wait_until_async, Client};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
/// From start to the banner: two nodes starting on a loaded machine.
const BANNER_TIMEOUT: Duration = Duration::from_secs(60);
/// From the edge's 202 to the message at the central.
const TRAVEL_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The demo process; SIGKILLed if the test ends without stopping it (its nodes die with it).
struct Demo {
    child: Child,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn start(dir: &std::path::Path, tls: bool) -> (Demo, mpsc::Receiver<String>) {
        let mut command = Command::new(OUTPOST);
        command.arg("demo").arg("--dir").arg(dir);
        if tls {
            command.arg("--tls");
        }
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OUTPOST_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run outpost demo");
        let (lines_tx, lines_rx) = mpsc::channel();
        let stdout_lines = collect_lines(child.stdout.take().unwrap(), Some(lines_tx));
        let stderr_lines = collect_lines(child.stderr.take().unwrap(), None);
        (Demo { child, stdout_lines, stderr_lines }, lines_rx)
    }

    fn output(&self) -> String {
        format!(
            "--- demo stdout ---\n{}\n--- demo stderr ---\n{}",
            self.stdout_lines.lock().unwrap().join("\n"),
            self.stderr_lines.lock().unwrap().join("\n")
        )
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

/// Reads `stream` line by line on a thread into the returned list, also sending each line to `tx`.
fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
    tx: Option<mpsc::Sender<String>>,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line.clone());
            if let Some(tx) = &tx {
                let _ = tx.send(line);
            }
        }
    });
    lines
}

/// The value of a banner line `label:   http://…`.
fn banner_url(line: &str, label: &str) -> Option<String> {
    let rest = line.strip_prefix(label)?.strip_prefix(':')?;
    let url = rest.split_whitespace().next()?;
    (url.starts_with("http://") || url.starts_with("https://")).then(|| url.to_string())
}

/// The processes whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(child_pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after its closing paren.
        let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if after_comm.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            children.push(child_pid);
        }
    }
    children
}

/// Runs `outpost ctl ARGS`, which must succeed.
fn ctl(args: &[&str]) {
    let output = Command::new(OUTPOST).arg("ctl").args(args).output().expect("run outpost ctl");
    assert!(output.status.success(), "outpost ctl {args:?}: {output:?}");
}

fn process_exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_travels_from_the_edge_to_the_central_and_ctrl_c_stops_everything() {
    run_demo(false).await;
}

/// `outpost demo --tls`: the central serves HTTPS and the edge links with its client certificate
/// (mTLS) and token; curl and ctl reach the central with the demo's CA.
#[tokio::test(flavor = "multi_thread")]
async fn the_tls_demo_links_the_edge_over_mtls() {
    run_demo(true).await;
}

async fn run_demo(tls: bool) {
    let dir = tempfile::Builder::new().prefix("outpost-demo-test-").tempdir().unwrap();
    let (mut demo, lines) = Demo::start(dir.path(), tls);
    let ca_file = dir.path().join("pki").join("ca.pem");
    let ca_arg = ca_file.display().to_string();
    let ctl = |args: &[&str]| {
        let mut all: Vec<&str> = Vec::new();
        if tls {
            all.extend(["--ca-file", ca_arg.as_str()]);
        }
        all.extend(args);
        ctl(&all);
    };

    let deadline = Instant::now() + BANNER_TIMEOUT;
    let (mut edge_url, mut central_url) = (None, None);
    // The banner ends with the line saying how to stop.
    let mut banner_complete = false;
    while !banner_complete {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                edge_url = edge_url.or_else(|| banner_url(&line, "edge"));
                central_url = central_url.or_else(|| banner_url(&line, "central"));
                banner_complete = line.contains("Ctrl-C");
            }
            Err(_) => panic!("no complete banner within {BANNER_TIMEOUT:?}\n{}", demo.output()),
        }
    }
    let (Some(edge_url), Some(central_url)) = (edge_url, central_url) else {
        panic!("the banner has no edge:/central: URL lines\n{}", demo.output());
    };
    assert_ne!(edge_url, central_url);
    assert_eq!(central_url.starts_with("https://"), tls, "{central_url}");
    let banner = demo.output();
    if tls {
        assert!(banner.contains("--cacert") && banner.contains("--ca-file"), "{banner}");
    }
    for expected in ["curl ", "/v1/queues/orders/messages", "ctl --url ", "Ctrl-C"] {
        assert!(banner.contains(expected), "banner should show {expected:?}:\n{banner}");
    }

    // The banner's second step: hold the route, so the order stays at the central to be read.
    ctl(&["--url", &central_url, "store", "demo-orders"]);
    let payload = b"{\"order\": 42}".to_vec();
    let accepted = Client::new(&edge_url).post_message("orders", payload.clone()).await.unwrap().accepted();
    let central = if tls { Client::with_ca(&central_url, &ca_file) } else { Client::new(&central_url) };
    wait_until_async(TRAVEL_TIMEOUT, "the order at the central", || async {
        central.read_all("orders").await.iter().any(|m| m.payload == payload)
    })
    .await;
    let at_central = central.read_all("orders").await;
    let message = at_central.iter().find(|m| m.payload == payload).unwrap();
    assert_eq!(
        (message.id.as_str(), message.origin.as_str(), message.origin_seq),
        (accepted.id.as_str(), "demo-edge", accepted.seq)
    );

    // Forward mode delivers it to the sample downstream service, which prints it.
    ctl(&["--url", &central_url, "forward", "demo-orders"]);
    let delivered = format!("id={}", accepted.id);
    wait_until_async(TRAVEL_TIMEOUT, "the downstream service printing the order", || {
        let printed = demo.stdout_lines.lock().unwrap().iter().any(|line| {
            line.contains("downstream received")
                && line.contains(&delivered)
                && line.contains("payload={\"order\": 42}")
        });
        std::future::ready(printed)
    })
    .await;

    let demo_pid = demo.child.id();
    let nodes = children_of(demo_pid);
    assert_eq!(nodes.len(), 2, "the demo runs a central and an edge as its children: {nodes:?}");

    kill(Pid::from_raw(demo_pid as i32), Signal::SIGINT).unwrap();
    let stop_deadline = Instant::now() + STOP_TIMEOUT;
    let status = loop {
        if let Some(status) = demo.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < stop_deadline,
            "the demo did not exit within {STOP_TIMEOUT:?}\n{}",
            demo.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "Ctrl-C is a clean stop: {status}\n{}", demo.output());
    for pid in nodes {
        assert!(!process_exists(pid), "node process {pid} outlived the demo\n{}", demo.output());
    }
    // The nodes' logs and data stay in --dir.
    for file in ["edge.log", "central.log", "edge.toml", "central.toml"] {
        assert!(dir.path().join(file).is_file(), "{file} in the demo directory");
    }
    if tls {
        let central_log = std::fs::read_to_string(dir.path().join("central.log")).unwrap();
        assert!(central_log.contains("client_ca_file="), "{central_log}");
        let central_config = std::fs::read_to_string(dir.path().join("central.toml")).unwrap();
        let token =
            central_config.lines().find_map(|l| l.strip_prefix("token = ")).unwrap().trim_matches('"');
        for log in ["edge.log", "central.log"] {
            let text = std::fs::read_to_string(dir.path().join(log)).unwrap();
            assert!(!text.contains(token), "the edge's token in {log}");
        }
    }
}
