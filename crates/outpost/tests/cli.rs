//! The command line of CONTRACT section 1 against the real binary: exit codes 0, 2 and 3 with
//! messages an operator can act on, a clean stop that keeps every acknowledged message, and an
//! edge that works with no configuration at all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::{wait_until, Accepted, Node, NodeBuilder};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
/// How long a node that must refuse to start may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

fn edge() -> NodeBuilder {
    Node::builder(OUTPOST)
}

#[tokio::test]
async fn a_second_node_on_a_data_dir_in_use_exits_3_and_says_why() {
    let first = edge().start().await;
    let accepted = first.client().post_message("q", "kept").await.unwrap().accepted();

    let mut second = edge().data_dir(first.data_dir()).spawn();
    let status = second.wait_exit(EXIT_TIMEOUT).await;
    let log = second.stderr_since_start();
    assert_eq!(status.code(), Some(3), "{status}; output:\n{}", second.log_since_start());
    assert!(log.contains("in use"), "the second node should say the data directory is in use:\n{log}");
    assert!(log.contains(&first.data_dir().display().to_string()), "and name the directory:\n{log}");

    // The refused node touched nothing: the first one still serves its data.
    let stored = first.client().read_all("q").await;
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].id.as_str(), stored[0].seq), (accepted.id.as_str(), accepted.seq));
    assert!(first.client().healthy().await);
}

/// One bad configuration and the words its message must contain: where (file or variable), the
/// key, and the problem.
struct BadConfig {
    name: &'static str,
    config_toml: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    args: &'static [&'static str],
    /// `"{config}"` stands for the config file's path.
    must_mention: &'static [&'static str],
}

#[tokio::test]
async fn a_bad_configuration_exits_2_naming_the_file_the_key_and_the_problem() {
    let cases = [
        BadConfig {
            name: "duration with an unknown unit",
            config_toml: Some("[connectivity]\nping_interval = \"5x\"\n"),
            env: &[],
            args: &[],
            must_mention: &["{config}", "connectivity.ping_interval", "5x", "unit"],
        },
        BadConfig {
            name: "unknown key in a section",
            config_toml: Some("[limits]\nmax_mesage_bytes = \"1KiB\"\n"),
            env: &[],
            args: &[],
            must_mention: &["{config}", "max_mesage_bytes", "unknown"],
        },
        BadConfig {
            name: "unknown top-level key",
            config_toml: Some("listen_address = \"127.0.0.1:1\"\n"),
            env: &[],
            args: &[],
            must_mention: &["{config}", "listen_address", "unknown"],
        },
        BadConfig {
            name: "size from the environment",
            config_toml: None,
            env: &[("OUTPOST_LIMITS__MAX_STORE_BYTES", "lots")],
            args: &[],
            must_mention: &["OUTPOST_LIMITS__MAX_STORE_BYTES", "limits.max_store_bytes", "lots"],
        },
        BadConfig {
            name: "environment overrides a good file with a bad value",
            config_toml: Some("[connectivity]\nping_interval = \"5s\"\n"),
            env: &[("OUTPOST_CONNECTIVITY__PING_INTERVAL", "soon")],
            args: &[],
            must_mention: &["OUTPOST_CONNECTIVITY__PING_INTERVAL", "connectivity.ping_interval", "soon"],
        },
        BadConfig {
            name: "not TOML at all",
            config_toml: Some("[limits\nmax_message_bytes = \n"),
            env: &[],
            args: &[],
            must_mention: &["{config}", "TOML"],
        },
        BadConfig {
            name: "missing config file",
            config_toml: None,
            env: &[],
            args: &["--config", "/nonexistent/outpost-test.toml"],
            must_mention: &["/nonexistent/outpost-test.toml"],
        },
        BadConfig {
            name: "a section given as a plain value",
            config_toml: Some("limits = 5\n"),
            env: &[],
            args: &[],
            must_mention: &["{config}", "limits", "table"],
        },
        BadConfig {
            name: "an upstream that is neither tables nor none",
            config_toml: None,
            env: &[("OUTPOST_UPSTREAM", "central-a")],
            args: &[],
            must_mention: &["OUTPOST_UPSTREAM", "upstream", "none"],
        },
        BadConfig {
            name: "unknown flag",
            config_toml: None,
            env: &[],
            args: &["--no-such-flag"],
            must_mention: &["--no-such-flag"],
        },
    ];

    for case in cases {
        let mut builder = edge().args(case.args.iter().copied());
        if let Some(toml) = case.config_toml {
            builder = builder.config(toml);
        }
        for (name, value) in case.env {
            builder = builder.env(name, value);
        }
        let mut node = builder.spawn();
        let status = node.wait_exit(EXIT_TIMEOUT).await;
        let output = node.stderr_since_start();
        assert_eq!(status.code(), Some(2), "{}: {status}; output:\n{}", case.name, node.log_since_start());
        let config_path = node.config_path().map(|p| p.display().to_string()).unwrap_or_default();
        for word in case.must_mention {
            let word = word.replace("{config}", &config_path);
            assert!(output.contains(&word), "{}: stderr should mention {word:?}:\n{output}", case.name);
        }
        // Operators wrote TOML; the names of outpost's Rust types mean nothing to them.
        for internal in ["Raw", "struct "] {
            assert!(
                !output.contains(internal),
                "{}: stderr names an internal type ({internal:?}):\n{output}",
                case.name
            );
        }
        assert!(
            !node.data_dir().join("outpost.db").exists(),
            "{}: a node with a bad configuration must not create a store",
            case.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_0_and_keeps_every_message_acknowledged_before_it() {
    const WRITERS: usize = 16;
    const ACKS_BEFORE_SIGNAL: usize = 300;
    let mut node = edge().start().await;
    let client = node.client();
    let acks: Arc<std::sync::Mutex<Vec<(Accepted, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (client, acks, stop) = (client.clone(), acks.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let payload = format!("writer {writer} message {n}");
                let queue = if n % 2 == 0 { "even" } else { "odd" };
                match client.post_message(queue, payload.clone()).await {
                    Ok(r) if r.status == 202 => acks.lock().unwrap().push((r.accepted(), payload)),
                    // Stopping: the store refuses new writes once it closed (503), then the
                    // listener is gone (connection refused). Neither was acknowledged.
                    Ok(r) if r.status == 503 => return,
                    Ok(r) => panic!("unexpected answer while stopping: {} {}", r.status, r.text()),
                    Err(_) => return,
                }
            }
        }));
    }
    wait_until(Duration::from_secs(30), "300 acknowledged writes", || {
        acks.lock().unwrap().len() >= ACKS_BEFORE_SIGNAL
    })
    .await;

    // SIGTERM in the middle of the writes: requests in flight finish, then the node exits 0.
    let status = node.sigterm().await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("a writer panicked");
    }
    assert_eq!(status.code(), Some(0), "{status}\n{}", node.log_tail(30));
    assert!(node.log_since_start().contains("stopped cleanly"), "{}", node.log_tail(30));

    node.restart().await;
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    eprintln!("{} writes acknowledged before the node stopped", acks.len());
    let mut by_queue: BTreeMap<String, Vec<(Accepted, String)>> = BTreeMap::new();
    for (accepted, payload) in acks {
        by_queue.entry(accepted.queue.clone()).or_default().push((accepted, payload));
    }
    for (queue, acks) in by_queue {
        let stored = node.client().read_all(&queue).await;
        for (i, message) in stored.iter().enumerate() {
            assert_eq!(message.seq, i as u64 + 1, "queue {queue}: seqs 1..=n without a gap");
        }
        for (accepted, payload) in &acks {
            let message = stored.get(accepted.seq as usize - 1).unwrap_or_else(|| {
                panic!("queue {queue}: acknowledged seq {} is missing after the clean stop", accepted.seq)
            });
            assert_eq!(message.id, accepted.id, "queue {queue} seq {}", accepted.seq);
            assert_eq!(message.payload, payload.as_bytes(), "queue {queue} seq {}", accepted.seq);
        }
    }

    // SIGINT stops cleanly too.
    node.signal(Signal::SIGINT);
    let status = node.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "SIGINT: {status}\n{}", node.log_tail(30));
}

#[tokio::test]
async fn an_edge_with_no_configuration_at_all_starts_and_works() {
    // Only --listen and --data-dir (the builder adds those two), and OUTPOST_UPSTREAM=none (the
    // builder's way of keeping an edge away from whatever listens on 127.0.0.1:7401), the working
    // directory empty: every other setting is a default.
    let node = edge().start().await;
    assert!(node.config_path().is_none());
    let client = node.client();

    let accepted = client.post_message("orders", "first order").await.unwrap().accepted();
    assert_eq!((accepted.queue.as_str(), accepted.seq), ("orders", 1));
    let batch = client.post_batch("orders", &["{\"n\":2}", "{\"n\":3}"]).await.unwrap().batch_accepted();
    assert_eq!((batch.first_seq, batch.last_seq), (2, 3));

    let stored = client.read_all("orders").await;
    let payloads: Vec<&[u8]> = stored.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, [&b"first order"[..], b"{\"n\":2}", b"{\"n\":3}"]);
    let status = client.status().await;
    assert_eq!(status["role"], "edge");
    assert_eq!(status["backlog"]["messages"], 3);
    assert!(client.healthy().await);
    assert!(node.log().contains("ready"), "{}", node.log());
}

/// A node run without testkit's builder, which always passes `--data-dir` and `NO_COLOR`: for the
/// defaults of CONTRACT section 1. Killed when dropped.
struct Bare {
    child: std::process::Child,
    stderr_path: std::path::PathBuf,
}

impl Bare {
    fn spawn(cwd: &std::path::Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Bare {
        let stderr_path = cwd.join(format!("{name}.stderr"));
        let mut command = std::process::Command::new(OUTPOST);
        command.args(args).current_dir(cwd).stdin(std::process::Stdio::null());
        command.stdout(std::fs::File::create(cwd.join(format!("{name}.stdout"))).unwrap());
        command.stderr(std::fs::File::create(&stderr_path).unwrap());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OUTPOST_") || name == "NO_COLOR" {
                command.env_remove(name);
            }
        }
        command.env_remove("NOTIFY_SOCKET").envs(env.iter().copied());
        Bare { child: command.spawn().expect("start outpost"), stderr_path }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "outpost did not exit:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(url: &str, node: &mut Bare) {
    let client = testkit::Client::new(url);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !client.get("/readyz").await.is_ok_and(|r| r.status == reqwest::StatusCode::OK) {
        if let Some(status) = node.child.try_wait().unwrap() {
            panic!("outpost exited with {status} before it was ready:\n{}", node.stderr());
        }
        assert!(std::time::Instant::now() < deadline, "not ready in 60 s:\n{}", node.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_central_and_an_edge_started_from_one_folder_form_a_pair_without_colour_codes() {
    // No --data-dir and no config: both roles must find their own default data directory under
    // ./outpost-data. The ports are free ones (the defaults may be taken by other tests), so the
    // edge is told where its central is; the default central URL is checked below.
    let folder = tempfile::tempdir().unwrap();
    let (central_port, edge_port) = (testkit::free_port(), testkit::free_port());
    let central_url = format!("http://127.0.0.1:{central_port}");
    let edge_url = format!("http://127.0.0.1:{edge_port}");
    let mut central = Bare::spawn(
        folder.path(),
        "central",
        &["central", "--listen", &format!("127.0.0.1:{central_port}")],
        &[],
    );
    wait_ready(&central_url, &mut central).await;
    let mut edge = Bare::spawn(
        folder.path(),
        "edge",
        &["edge", "--listen", &format!("127.0.0.1:{edge_port}"), "--central", &central_url],
        &[],
    );
    wait_ready(&edge_url, &mut edge).await;
    assert!(folder.path().join("outpost-data/central").is_dir());
    assert!(folder.path().join("outpost-data/edge").is_dir());

    let accepted = testkit::Client::new(&edge_url).post_message("orders", "paired").await.unwrap().accepted();
    let at_central = testkit::Client::new(&central_url);
    testkit::wait_until_async(Duration::from_secs(60), "the message at the central", || {
        let at_central = at_central.clone();
        async move { at_central.queue("orders").await.is_some_and(|q| q.last_seq >= 1) }
    })
    .await;
    assert_eq!(at_central.read_all("orders").await[0].origin_seq, accepted.seq);

    // stderr is a file here, not a terminal: no ANSI escape codes, although NO_COLOR is unset.
    for node in [&central, &edge] {
        let log = node.stderr();
        assert!(log.contains("ready"), "{log}");
        assert!(!log.contains('\u{1b}'), "colour codes in a log file:\n{log}");
    }
}

#[tokio::test]
async fn an_edge_with_no_upstream_configured_tries_the_default_central() {
    let folder = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut edge =
        Bare::spawn(folder.path(), "edge", &["edge", "--listen", &format!("127.0.0.1:{port}")], &[]);
    wait_ready(&url, &mut edge).await;
    let client = testkit::Client::new(&url);
    // Whatever answers on 127.0.0.1:7401 (usually nothing), the edge names it as its upstream:
    // in its offline log when it is refused, in `upstream` when it got through.
    testkit::wait_until_async(Duration::from_secs(60), "the edge to try http://127.0.0.1:7401", || {
        let client = client.clone();
        async move { client.status().await.to_string().contains("127.0.0.1:7401") }
    })
    .await;
    assert!(!client.status().await.to_string().contains("no_upstream"));
}

#[tokio::test]
async fn a_port_in_use_fails_before_any_store_is_created() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let folder = tempfile::tempdir().unwrap();
    for role in ["edge", "central"] {
        let data_dir = folder.path().join(format!("{role}-data"));
        let mut node = Bare::spawn(
            folder.path(),
            role,
            &[role, "--listen", &address, "--data-dir", data_dir.to_str().unwrap()],
            if role == "edge" { &[("OUTPOST_UPSTREAM", "none")] } else { &[] },
        );
        let status = node.wait_exit(EXIT_TIMEOUT).await;
        let log = node.stderr();
        assert_eq!(status.code(), Some(1), "{role}: {status}\n{log}");
        assert!(log.contains("cannot listen") && log.contains(&address), "{role}: {log}");
        assert!(
            !data_dir.exists(),
            "{role}: the data directory was created although the port is taken:\n{log}"
        );
    }
}

/// Runs `outpost bench ARGS` and returns (exit code, stderr + stdout); fails the test if it takes
/// longer than `timeout` (a bench that keeps sending after refusals would).
async fn bench(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new(OUTPOST);
    command.arg("bench").args(args).env_remove("OUTPOST_TOKEN").kill_on_drop(true);
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .unwrap_or_else(|_| panic!("outpost bench {args:?} still running after {timeout:?}"))
        .expect("run outpost bench");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout));
    (output.status.code(), text)
}

#[tokio::test]
async fn bench_stops_with_a_clear_message_when_every_request_is_refused() {
    let node = edge()
        .config("[auth]\nclient_tokens = [\"c1\"]\nadmin_tokens = [\"a1\"]\n[limits]\nmax_message_bytes = \"1KiB\"\n")
        .start()
        .await;
    let url = node.url();
    // Ten million messages would take many minutes; a refused run must stop at once.
    let many = "10000000";
    let (code, output) =
        bench(&["--url", &url, "--messages", many, "--concurrency", "4"], Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("401") && output.contains("--token"), "no token: {output}");

    let (code, output) = bench(
        &["--url", &url, "--messages", many, "--concurrency", "4", "--token", "c1", "--size", "4096"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("413") && output.contains("--size"), "too large: {output}");

    // Nothing was stored by the refused runs, and an accepted run still works.
    assert!(node.client().with_token("a1").queue("bench").await.is_none());
    let (code, output) = bench(
        &["--url", &url, "--messages", "20", "--token", "c1", "--size", "100"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(code, Some(0), "{output}");
}
