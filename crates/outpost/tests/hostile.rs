//! Hostile conditions against the real binary (issue 11, CONTRACT sections 2 and 4): a panic ends
//! the node; a hung central's handshake does not wedge the edge; stalled uploads do not starve
//! other writers; slow clients get 408; a small disk answers 507 and drains by itself when the
//! central returns; an edge whose routes released messages before it had a central forwards the
//! rest once it gets one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::{free_port, wait_until_async, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Short intervals so state changes happen within seconds.
fn edge_config(upstreams: &[String], extra: &str) -> String {
    let mut toml = String::new();
    for url in upstreams {
        toml.push_str(&format!("[[upstream]]\nurl = \"{url}\"\n\n"));
    }
    toml.push_str(
        r#"
[connectivity]
ping_interval = "1s"
missed_pings = 3
offline_probe_interval = "1s"
transition_to_offline_wait = "1s"
failed_transition_wait = "1s"

[failover]
connect_timeout = "1s"
failback_interval = "1s"

[forwarding]
request_timeout = "3s"
"#,
    );
    toml.push_str(extra);
    toml
}

async fn state_of(node: &Node) -> String {
    node.client().status().await["state"].as_str().unwrap_or_default().to_string()
}

async fn backlog_of(node: &Node) -> u64 {
    node.client().status().await["backlog"]["messages"].as_u64().unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Fail loudly (CONTRACT 4.6)
// ---------------------------------------------------------------------------------------------

/// A panic in the writer thread used to end that thread only: every write then got 503 while
/// `/readyz` still said ready. The failpoint (debug builds only) panics inside the writer.
#[tokio::test]
async fn a_panic_in_the_writer_ends_the_node_with_a_non_zero_code() {
    let mut edge = Node::builder(BIN)
        .arg("--central")
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .env("OUTPOST_TEST_FAILPOINTS", "writer_panic")
        .start()
        .await;
    let answer = edge.client().post_message("orders", &b"boom"[..]).await;
    if let Ok(response) = &answer {
        assert!(!response.status.is_success(), "a write whose writer panicked got {}", response.status);
    }
    let status = edge.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the node must exit with a non-zero code, got {status:?}");
    assert!(edge.log().contains("panic"), "the log names the panic:\n{}", edge.log_tail(20));
}

// ---------------------------------------------------------------------------------------------
// A hung central
// ---------------------------------------------------------------------------------------------

/// A "central" that accepts connections and reads whatever comes, and never answers: a hung
/// process or load balancer, or a half-open connection.
async fn hung_central() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            held.push(tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while matches!(socket.read(&mut buffer).await, Ok(n) if n > 0) {}
                std::future::pending::<()>().await;
            }));
        }
    });
    (addr, task)
}

/// The primary accepts the handshake and never answers: the edge must give up on it within its
/// deadline, fail over to the alternate, go online and forward; and failback tries of the hung
/// primary must not stop the edge from working.
#[tokio::test]
async fn a_hung_handshake_does_not_wedge_the_edge() {
    let (hung_addr, _hung) = hung_central().await;
    let central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let edge = Node::builder(BIN)
        .arg("--node-id")
        .arg("store-1")
        .config(&edge_config(&[format!("http://{hung_addr}"), central.url()], ""))
        .start()
        .await;
    for i in 0..20 {
        edge.client().post_message("orders", format!("m{i}").into_bytes()).await.unwrap().expect_status(202);
    }
    wait_until_async(Duration::from_secs(60), "the edge online through the alternate", || async {
        state_of(&edge).await == "online"
    })
    .await;
    wait_until_async(Duration::from_secs(30), "the central holding all 20 messages", || async {
        central.client().queue("orders").await.is_some_and(|q| q.last_seq == 20)
    })
    .await;
    // Failback tries of the hung primary run every second meanwhile; the edge keeps forwarding.
    for i in 20..40 {
        edge.client().post_message("orders", format!("m{i}").into_bytes()).await.unwrap().expect_status(202);
    }
    wait_until_async(Duration::from_secs(30), "the central holding all 40 messages", || async {
        central.client().queue("orders").await.is_some_and(|q| q.last_seq == 40)
    })
    .await;
    assert_eq!(state_of(&edge).await, "online");
}

// ---------------------------------------------------------------------------------------------
// Stalled and slow clients
// ---------------------------------------------------------------------------------------------

const CLIENT_TOKEN: &str = "client-secret";

fn auth_config(extra: &str) -> String {
    format!("[auth]\nclient_tokens = [\"{CLIENT_TOKEN}\"]\nadmin_tokens = [\"admin\"]\n\n{extra}")
}

/// Opens a connection and sends an authenticated upload's headers and the first bytes of its
/// body, then stops sending (the socket is held open by the caller).
async fn stalled_upload(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut socket = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /v1/queues/stalled/messages HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {CLIENT_TOKEN}\r\n\
         Content-Type: text/plain\r\nContent-Length: 1000\r\n\r\nfirst bytes"
    );
    socket.write_all(head.as_bytes()).await?;
    Ok(socket)
}

/// 1,100 authenticated uploads that stop sending used to hold every write permit (they were taken
/// before the body was read): a normal client got 8 requests through in 20 s.
///
/// The data directory is on a tmpfs when the test may mount one (CI runs as root): the bound is
/// about the server's fairness, and a shared machine's fsync latency alone can pass 100 ms.
#[tokio::test]
async fn stalled_uploads_do_not_starve_other_writers() {
    let memory_disk = SmallDisk::mount("256m");
    let mut builder = Node::builder(BIN);
    if let Some(disk) = &memory_disk {
        builder = builder.data_dir(disk.path().join("edge"));
    }
    let edge = builder
        .arg("--central")
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .config(&auth_config(""))
        .start()
        .await;
    let mut stalled = Vec::new();
    for _ in 0..1100 {
        stalled.push(stalled_upload(edge.addr()).await.expect("open a stalled upload"));
    }
    // Let the node read every stalled request's headers.
    let client = edge.client().with_token(CLIENT_TOKEN);
    client.post_message("warmup", &b"x"[..]).await.unwrap().expect_status(202);

    let mut latencies = Vec::new();
    let started = Instant::now();
    for i in 0..200 {
        let sent = Instant::now();
        let response = client.post_message("normal", format!("n{i}").into_bytes()).await.unwrap();
        latencies.push(sent.elapsed());
        response.expect_status(202);
        assert!(started.elapsed() < Duration::from_secs(60), "200 writes took over a minute");
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!("normal client with 1,100 stalled uploads: p50 {:?}, p99 {p99:?}", latencies[100]);
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?} with 1,100 stalled uploads");
    drop(stalled);
}

/// Headers and body must arrive within `limits.request_timeout`: a body that stops gets 408, a
/// head that never completes is closed.
#[tokio::test]
async fn slow_clients_get_408_after_the_request_timeout() {
    let edge = Node::builder(BIN)
        .arg("--central")
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .config(&auth_config("[limits]\nrequest_timeout = \"1s\"\n"))
        .start()
        .await;
    let mut socket = stalled_upload(edge.addr()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a stalled body was still open after 15 s (request_timeout = 1s)");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "a stalled body gets 408, got {answer:?}");

    let mut socket = TcpStream::connect(edge.addr()).await.unwrap();
    socket.write_all(b"POST /v1/queues/slow/messages HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "an unfinished head was still open after 15 s (request_timeout = 1s)");
    // Nothing stalled was stored.
    assert!(edge.client().with_token("admin").queue("stalled").await.is_none_or(|q| q.messages == 0));
}

// ---------------------------------------------------------------------------------------------
// A small disk
// ---------------------------------------------------------------------------------------------

/// A tmpfs of a fixed size mounted on a temporary directory; unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with the reason printed) only where mounting is impossible: not root.
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::Builder::new().prefix("outpost-small-disk-").tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(SmallDisk { path: dir.path().to_path_buf(), _dir: dir }),
            other => {
                let root = unsafe { libc::geteuid() } == 0;
                assert!(!root, "running as root but `mount -t tmpfs` failed: {other:?}");
                eprintln!("SKIPPED: mounting a {size} tmpfs needs root ({other:?}); CI runs this as root");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// An edge on a 64 MiB filesystem with its central down: writes fill the disk and then get 507
/// (never 503 "shutting down", never a 2xx that was not stored); when the central comes back,
/// the edge forwards and releases everything on that same small disk, and writes resume.
#[tokio::test]
async fn a_small_disk_answers_507_and_drains_when_the_central_returns() {
    let Some(disk) = SmallDisk::mount("64m") else { return };
    let mut central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let central_url = central.url();
    central.sigterm().await;
    let edge = Node::builder(BIN)
        .arg("--node-id")
        .arg("small")
        .data_dir(disk.path().join("edge"))
        .config(&edge_config(&[central_url], ""))
        .start()
        .await;
    let client = edge.client();
    // Batches of 4 MiB: a write that large spills SQLite's page cache mid-transaction, so the disk
    // fills inside the write (not only at its commit), the case that used to answer 503.
    let line = vec![b'x'; 256 << 10];
    let batch: Vec<Vec<u8>> = vec![line.clone(); 16];
    let mut accepted = 0u64;
    let mut full_answers = 0;
    for _ in 0..200 {
        let response = client.post_batch("bulk", &batch).await.unwrap();
        match response.status.as_u16() {
            202 => accepted += 16,
            507 => {
                full_answers += 1;
                if full_answers == 5 {
                    break;
                }
            }
            other => panic!("a write on a full disk got {other}: {}", response.text()),
        }
    }
    assert_eq!(full_answers, 5, "64 MiB never filled after 200 writes of 4 MiB");
    // Smaller writes fill what is left; they get 507 too once nothing fits.
    for _ in 0..200 {
        let response = client.post_message("bulk", line.clone()).await.unwrap();
        match response.status.as_u16() {
            202 => accepted += 1,
            507 => break,
            other => panic!("a write on a full disk got {other}: {}", response.text()),
        }
    }
    assert!(accepted > 16, "only {accepted} messages fitted on 64 MiB");
    eprintln!("small disk: {accepted} messages of 256 KiB accepted before 507");
    let payload = line;

    central.restart().await;
    wait_until_async(Duration::from_secs(120), "the edge's backlog drained to the central", || async {
        backlog_of(&edge).await == 0
    })
    .await;
    wait_until_async(Duration::from_secs(60), "the edge released what it forwarded", || async {
        client.queue("bulk").await.is_some_and(|q| q.messages == 0)
    })
    .await;
    let at_central = central.client().read_all("bulk").await;
    assert_eq!(at_central.len() as u64, accepted, "every acknowledged message at the central once");
    for (i, m) in at_central.iter().enumerate() {
        assert_eq!(m.origin_seq, i as u64 + 1, "in the edge's order");
    }
    // Writes resume by themselves on the same disk.
    wait_until_async(Duration::from_secs(60), "writes accepted again", || async {
        client.post_message("bulk", payload.clone()).await.is_ok_and(|r| r.status.as_u16() == 202)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The forwarder's gap: routes released messages before the edge had a central
// ---------------------------------------------------------------------------------------------

/// A downstream that answers 200 to everything.
async fn accepting_downstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().fallback(|| async { "ok" });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

/// An edge without a central whose route delivered (and released) messages, given a central
/// later: the first message it still holds is past what the central ever had. That used to fire
/// an `assert_eq!` in the forwarder task (the edge showed online, nothing moved); now the edge
/// declares the released range at handshake and the central records it as the edge's release.
#[tokio::test]
async fn an_edge_whose_routes_released_messages_forwards_the_rest_to_a_later_central() {
    let (downstream, _server) = accepting_downstream().await;
    let route = format!(
        "[[route]]\nname = \"local\"\nqueue = \"orders\"\nurls = [\"http://{downstream}/in\"]\nretry_initial = \"100ms\"\n"
    );
    let mut alone = Node::builder(BIN)
        .arg("--node-id")
        .arg("late")
        // A central that is never there: the upstream reader does not hold messages back.
        .config(&route)
        .start()
        .await;
    for i in 0..10 {
        alone
            .client()
            .post_message("orders", format!("early{i}").into_bytes())
            .await
            .unwrap()
            .expect_status(202);
    }
    wait_until_async(
        Duration::from_secs(30),
        "the route to deliver and release the early messages",
        || async {
            alone.client().queue("orders").await.is_some_and(|q| q.messages == 0 && q.last_seq == 10)
        },
    )
    .await;
    let data_dir = alone.data_dir().to_path_buf();
    alone.sigterm().await;

    let central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let mut edge = Node::builder(BIN)
        .arg("--node-id")
        .arg("late")
        .data_dir(&data_dir)
        .config(&format!("{}\n{route}", edge_config(&[central.url()], "")))
        .start()
        .await;
    for i in 0..5 {
        edge.client()
            .post_message("orders", format!("late{i}").into_bytes())
            .await
            .unwrap()
            .expect_status(202);
    }
    wait_until_async(Duration::from_secs(60), "the later messages at the central", || async {
        central.client().queue("orders").await.is_some_and(|q| q.messages == 5)
    })
    .await;
    let at_central = central.client().read_all("orders").await;
    let seqs: Vec<u64> = at_central.iter().map(|m| m.origin_seq).collect();
    assert_eq!(seqs, vec![11, 12, 13, 14, 15]);
    wait_until_async(Duration::from_secs(30), "the edge online with no backlog", || async {
        state_of(&edge).await == "online" && backlog_of(&edge).await == 0
    })
    .await;
    assert!(edge.is_running(), "the edge is still running");
}

/// CONTRACT section 2, `limits.max_queues`: a write that would create one queue too many gets 507
/// with code `too_many_queues` and creates nothing; the existing queues go on taking writes, and the
/// limit holds after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_that_would_create_one_queue_too_many_gets_507_too_many_queues() {
    let mut edge = Node::builder(BIN).role("edge").config("[limits]\nmax_queues = 2\n").start().await;
    let client = edge.client();
    for queue in ["a", "b"] {
        client.post_message(queue, "x").await.unwrap().accepted();
    }
    let refused = client.post_message("c", "x").await.unwrap();
    assert_eq!(refused.expect_error(507), "too_many_queues", "{}", refused.text());
    assert!(refused.text().contains("limits.max_queues"), "the message says which limit: {}", refused.text());
    let refused = client.post("/v1/queues/c/batch", Some("application/x-ndjson"), "1\n2\n").await.unwrap();
    assert_eq!(refused.expect_error(507), "too_many_queues");
    client.post_message("a", "y").await.unwrap().accepted();
    edge.sigterm().await;
    edge.restart().await;
    let refused = edge.client().post_message("c", "x").await.unwrap();
    assert_eq!(refused.expect_error(507), "too_many_queues");
    let queues = edge.client().get("/v1/queues").await.unwrap().json();
    let names: Vec<&str> = queues.as_array().unwrap().iter().filter_map(|q| q["name"].as_str()).collect();
    assert!(!names.contains(&"c"), "the refused writes created no queue: {names:?}");
}

/// Sends a health check on `stream` and reads what comes back until the server closes or 3 s pass.
async fn health_answer(stream: &mut TcpStream) -> String {
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: outpost\r\nConnection: close\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// CONTRACT section 2, `limits.max_connections`, enforced at accept: with that many connections
/// open, one more is closed at once without an answer (and logged), the open ones are still served,
/// and a slot freed by a closed connection takes a new one.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_max_connections_are_closed_at_accept_and_the_rest_served() {
    const MAX: usize = 8;
    let edge = Node::builder(BIN)
        .role("edge")
        .config(&format!(
            "upstream = \"none\"\n\n[limits]\nmax_connections = {MAX}\nrequest_timeout = \"30s\"\n"
        ))
        .start()
        .await;
    // Readiness checks of the test kit are over; hold every slot with idle connections.
    let mut held = Vec::new();
    for _ in 0..MAX {
        held.push(TcpStream::connect(edge.addr()).await.unwrap());
    }
    // The listener takes a slot when it accepts: wait until it has accepted all of them, seen as
    // one more connection being turned away.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut extra = TcpStream::connect(edge.addr()).await.unwrap();
        let answer = health_answer(&mut extra).await;
        if answer.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "a connection past max_connections was still served: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(edge.log().contains("limits.max_connections"), "the refusal is logged:\n{}", edge.log_tail(20));
    // A connection that was already open is served.
    let answer = health_answer(&mut held[0]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "an open connection is served: {answer:?}");
    // Its slot (closed by `Connection: close`) and those of dropped connections take new ones.
    held.truncate(MAX / 2);
    wait_until_async(Duration::from_secs(10), "a new connection served once slots are free", || async {
        let mut fresh = TcpStream::connect(edge.addr()).await.unwrap();
        health_answer(&mut fresh).await.starts_with("HTTP/1.1 200")
    })
    .await;
}
