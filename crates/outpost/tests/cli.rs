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
    // Only --listen and --data-dir (the builder adds those two and nothing else), no OUTPOST_*
    // variables, the working directory empty: every other setting is a default.
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
