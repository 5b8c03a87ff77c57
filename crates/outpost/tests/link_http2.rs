//! The edge's link is one TCP connection (issue 13): HTTP/2 carries the link stream, batches,
//! reports and downlink reads as streams of it, in cleartext (prior knowledge) and over TLS
//! (ALPN), also after a quiet spell; an edge still reaches a central behind an HTTP/1.1-only
//! proxy, in cleartext and over TLS; and the listener's
//! HTTP/2 has the HTTP/1.1 path's protections: a connection that sends nothing is closed, streams
//! past the bound are refused, stalled bodies are answered, and a peer that ignores the goodbye is
//! cut off.
//!
//! Connections are counted from outside, in `/proc` ([`testkit::sockets`]): the established TCP
//! connections the edge process holds to the central's (or proxy's) port.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::sockets::tcp_connections_to;
use testkit::{wait_until_async, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const WAIT: Duration = Duration::from_secs(60);

fn edge_config(upstream: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nurl = \"{upstream}\"\n{extra}\n\n[connectivity]\nping_interval = \"1s\"\nmissed_pings = 3\n\
         offline_probe_interval = \"1s\"\ntransition_to_offline_wait = \"1s\"\nfailed_transition_wait = \"2s\"\n\n\
         [failover]\nconnect_timeout = \"2s\"\n\n[forwarding]\nrequest_timeout = \"5s\"\n"
    )
}

async fn start_edge(id: &str, config: &str) -> Node {
    Node::builder(BIN).role("edge").arg("--node-id").arg(id).config(config).start().await
}

async fn wait_online(edge: &Node) {
    wait_until_async(WAIT, "edge online", || async { edge.client().status().await["state"] == "online" })
        .await;
}

/// Posts `count` messages to each of `queues` on the edge, 100 per queue every 100 ms (so that
/// pings, and the reports answering them, come while batches are in flight), sampling the edge's
/// connections to `port` every 20 ms until the central holds them all; returns the most seen open
/// at once. The central is read with `central_client`.
async fn forward_and_count_connections(
    edge: &Node,
    central_client: &testkit::Client,
    port: u16,
    queues: &[&str],
    count: usize,
) -> usize {
    let pid = edge.pid().expect("the edge runs");
    let sampling = Arc::new(AtomicU64::new(0));
    let sampler = {
        let most = sampling.clone();
        tokio::spawn(async move {
            loop {
                most.fetch_max(tcp_connections_to(pid, port) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for first in (0..count).step_by(100) {
        for queue in queues {
            let lines: Vec<String> = (first..count.min(first + 100))
                .map(|i| format!("{{\"queue\":\"{queue}\",\"i\":{i}}}"))
                .collect();
            edge.client().post_batch(queue, &lines).await.expect("post a batch").batch_accepted();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for queue in queues {
        wait_until_async(WAIT, &format!("{count} messages of {queue} at the central"), || async {
            central_client.queue(queue).await.is_some_and(|q| q.last_seq >= count as u64)
        })
        .await;
    }
    sampler.abort();
    sampling.load(Ordering::Relaxed) as usize
}

/// Waits until the edge holds `count` messages of downlink queue `queue`.
async fn wait_downlink(edge: &Node, queue: &str, count: u64) {
    wait_until_async(WAIT, &format!("{count} downlink messages of {queue} at the edge"), || async {
        edge.client().queue(queue).await.is_some_and(|q| q.last_seq >= count)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_forwards_over_one_cleartext_connection_to_its_central() {
    let central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let edge = start_edge("store-h2", &edge_config(&central.url(), "")).await;
    // Two queues of batches, pings every second each answered by a report, and a downlink
    // message read while batches go up: all of it on the link's one connection.
    assert_everything_on_one_connection(&central, &edge, "store-h2", &["orders", "alarms"]).await;
    assert_eq!(tcp_connections_to(edge.pid().unwrap(), central.addr().port()), 1);
}

/// Waits for `edge` (id `edge_id`) to be online with its link open, posts it a downlink message,
/// forwards 3,000 messages over `queues` and reads the downlink meanwhile, and asserts it never
/// held more than one connection to `central`.
async fn assert_everything_on_one_connection(central: &Node, edge: &Node, edge_id: &str, queues: &[&str]) {
    wait_online(edge).await;
    let port = central.addr().port();
    let pid = edge.pid().unwrap();
    wait_until_async(WAIT, "the edge's link open", || async { tcp_connections_to(pid, port) == 1 }).await;
    central
        .client()
        .post(
            &format!("/v1/edges/{edge_id}/queues/down/messages"),
            Some("text/plain"),
            b"to the edge".to_vec(),
        )
        .await
        .expect("post downlink")
        .expect_status(202);
    let most = forward_and_count_connections(edge, &central.client(), port, queues, 3_000).await;
    wait_downlink(edge, "down", 1).await;
    assert_eq!(most, 1, "connections the edge held to the central at once");
}

/// An edge with nothing to send for longer than its client keeps an unused connection pooled
/// (5 s) still sends its next batch on the link's connection, not on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_edge_sends_on_its_link_connection() {
    let central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let config = edge_config(&central.url(), "").replace("ping_interval = \"1s\"", "ping_interval = \"60s\"");
    let edge = start_edge("store-quiet", &config).await;
    wait_online(&edge).await;
    let port = central.addr().port();
    let pid = edge.pid().unwrap();
    wait_until_async(WAIT, "the edge's link open", || async { tcp_connections_to(pid, port) == 1 }).await;
    // Quiet past two turns of the client's pool reaper (every 5 s).
    let quiet_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < quiet_until {
        assert_eq!(tcp_connections_to(pid, port), 1, "connections while quiet");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let most = forward_and_count_connections(&edge, &central.client(), port, &["orders"], 500).await;
    assert_eq!(most, 1, "connections the edge held to the central at once after a quiet time");
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A private CA with a certificate for `central` and one per edge id (scripts/make-certs.sh).
fn make_certs(central: &str, edges: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("outpost-certs-").tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-certs.sh");
    let output = Command::new("bash").arg(&script).arg(dir.path()).arg(central).args(edges).output().unwrap();
    assert!(output.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&output.stderr));
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_forwards_over_one_mtls_connection_to_its_central() {
    let certs = make_certs("central", &["store-tls"]);
    let file = |name: &str| certs.path().join(name).display().to_string();
    // Client certificates required and bound to the edge id: the identity reaches the handlers
    // over HTTP/2 too, or the link would be refused.
    let central = Node::builder(BIN)
        .role("central")
        .arg("--node-id")
        .arg("hq")
        .config(&format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n\n[[edge]]\nid = \"store-tls\"\n",
            file("central.pem"),
            file("central.key"),
            file("ca.pem")
        ))
        .tls_ca(certs.path().join("ca.pem"))
        .start()
        .await;
    let upstream_tls = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        file("ca.pem"),
        file("store-tls.pem"),
        file("store-tls.key")
    );
    let edge = start_edge("store-tls", &edge_config(&central.url(), &upstream_tls)).await;
    assert_everything_on_one_connection(&central, &edge, "store-tls", &["orders"]).await;
}

// ---------------------------------------------------------------------------------------------
// An HTTP/1.1-only peer
// ---------------------------------------------------------------------------------------------

/// A reverse proxy that speaks only HTTP/1.1 (as an older central, or a proxy without HTTP/2),
/// streaming requests and answers both ways to `target`; over TLS with `tls` (a certificate and
/// key, ALPN `http/1.1` only). Counts the requests it forwarded.
async fn http1_only_proxy(
    target: SocketAddr,
    tls: Option<(&Path, &Path)>,
) -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    use hyper::body::Incoming;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let acceptor = tls.map(|(cert, key)| testkit::tls::acceptor(cert, key, &[b"http/1.1"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let forwarded = Arc::new(AtomicU64::new(0));
    let counter = forwarded.clone();
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build_http();
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let client = client.clone();
            let counter = counter.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    let client = client.clone();
                    counter.fetch_add(1, Ordering::Relaxed);
                    let path = request.uri().path_and_query().map_or("/".to_string(), |p| p.to_string());
                    *request.uri_mut() = format!("http://{target}{path}").parse().unwrap();
                    async move { client.request(request).await }
                });
                let http1 = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    None => {
                        let _ = http1.serve_connection(TokioIo::new(socket), service).await;
                    }
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(socket).await else { return };
                        let _ = http1.serve_connection(TokioIo::new(tls), service).await;
                    }
                }
            });
        }
    });
    (addr, forwarded, task)
}

/// Forwards through an HTTP/1.1-only proxy at `proxy` (`url` is how the edge names it) and checks
/// the edge works as before HTTP/2: online, every message and downlink message through.
async fn check_edge_behind_http1_only_proxy(
    central: &Node,
    proxy: SocketAddr,
    forwarded: &AtomicU64,
    id: &str,
    upstream: &str,
    upstream_extra: &str,
) {
    let edge = start_edge(id, &edge_config(upstream, upstream_extra)).await;
    wait_online(&edge).await;
    let most =
        forward_and_count_connections(&edge, &central.client(), proxy.port(), &["orders"], 2_000).await;
    central
        .client()
        .post(&format!("/v1/edges/{id}/queues/down/messages"), Some("text/plain"), b"to the edge".to_vec())
        .await
        .expect("post downlink")
        .expect_status(202);
    wait_downlink(&edge, "down", 1).await;
    assert!(forwarded.load(Ordering::Relaxed) > 2, "the traffic went through the HTTP/1.1 proxy");
    // HTTP/1.1: the link stream and the batches' connection (and one a report may have opened).
    assert!((2..=3).contains(&most), "{most} connections to the HTTP/1.1 proxy at once");
    assert!(edge.log().contains("does not speak HTTP/2"), "the edge says why it uses HTTP/1.1");
    assert_eq!(edge.client().status().await["state"], "online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reaches_a_central_behind_an_http1_only_proxy() {
    let central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let (proxy, forwarded, _proxy_task) = http1_only_proxy(central.addr(), None).await;
    let url = format!("http://{proxy}");
    check_edge_behind_http1_only_proxy(&central, proxy, &forwarded, "store-h1", &url, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reaches_a_central_behind_an_https_proxy_that_offers_only_http1() {
    let certs = make_certs("central", &[]);
    let central = Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await;
    let tls = (certs.path().join("central.pem"), certs.path().join("central.key"));
    let (proxy, forwarded, _proxy_task) = http1_only_proxy(central.addr(), Some((&tls.0, &tls.1))).await;
    let url = format!("https://localhost:{}", proxy.port());
    let ca = format!("ca_file = \"{}\"", certs.path().join("ca.pem").display());
    check_edge_behind_http1_only_proxy(&central, proxy, &forwarded, "store-h1-tls", &url, &ca).await;
}

// ---------------------------------------------------------------------------------------------
// The listener's HTTP/2 under abuse
// ---------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = payload.len() as u32;
    let mut bytes = vec![(length >> 16) as u8, (length >> 8) as u8, length as u8, kind, flags];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Reads one frame: (type, flags, stream, payload); `None` at the end of the connection.
async fn read_frame(socket: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).await.ok()?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; length];
    socket.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// The header block of `POST path` (HPACK: indexed :method POST and :scheme http, literal
/// :path and :authority without indexing), a request with a body to come.
fn post_headers(path: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'x']);
    block
}

async fn start_node_with_request_timeout() -> Node {
    Node::builder(BIN)
        .role("central")
        .arg("--node-id")
        .arg("hq")
        .config("[limits]\nrequest_timeout = \"1s\"\n")
        .start()
        .await
}

/// Reads until the node closes the connection; how long that took.
async fn time_to_close(socket: &mut TcpStream, bound: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(bound, socket.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the connection was still open after {bound:?}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_stops_after_the_preface_is_closed() {
    let node = start_node_with_request_timeout().await;
    // The preface and nothing else; then the preface and the settings, and nothing else.
    let mut silent = TcpStream::connect(node.addr()).await.unwrap();
    silent.write_all(PREFACE).await.unwrap();
    let mut settled = TcpStream::connect(node.addr()).await.unwrap();
    settled.write_all(PREFACE).await.unwrap();
    settled.write_all(&frame(FRAME_SETTINGS, 0, 0, &[])).await.unwrap();
    // Nothing at all (not even enough to tell the protocol).
    let mut mute = TcpStream::connect(node.addr()).await.unwrap();
    mute.write_all(b"PRI * HT").await.unwrap();
    // request_timeout (1 s) idle, then at most the close grace (5 s) for a peer that never
    // answers the goodbye.
    for socket in [&mut silent, &mut settled, &mut mute] {
        time_to_close(socket, Duration::from_secs(20)).await;
    }
    node.client().get("/healthz").await.unwrap().expect_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_bound_are_refused_and_stalled_bodies_answered() {
    let node = start_node_with_request_timeout().await;
    let mut socket = TcpStream::connect(node.addr()).await.unwrap();
    socket.write_all(PREFACE).await.unwrap();
    socket.write_all(&frame(FRAME_SETTINGS, 0, 0, &[])).await.unwrap();
    // The node's settings: its bounds on streams and on header lists.
    let (mut max_streams, mut max_header_list) = (None, None);
    loop {
        let (kind, flags, _, payload) = read_frame(&mut socket).await.expect("the node's settings");
        if kind == FRAME_SETTINGS && flags & FLAG_ACK == 0 {
            for entry in payload.chunks(6) {
                let id = u16::from_be_bytes([entry[0], entry[1]]);
                let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
                match id {
                    SETTINGS_MAX_CONCURRENT_STREAMS => max_streams = Some(value),
                    SETTINGS_MAX_HEADER_LIST_SIZE => max_header_list = Some(value),
                    _ => {}
                }
            }
            break;
        }
    }
    let max_streams = max_streams.expect("the node bounds concurrent streams");
    assert!(max_streams <= 256, "at most 256 streams per connection, the node allows {max_streams}");
    assert!(max_header_list.is_some_and(|m| m <= 1 << 20), "header lists bounded: {max_header_list:?}");
    socket.write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])).await.unwrap();

    // Every stream a POST whose body never comes; one more than the bound.
    let headers = post_headers("/v1/queues/h2-stalled/messages");
    let streams: Vec<u32> = (0..=max_streams).map(|i| 1 + 2 * i).collect();
    let mut bytes = Vec::new();
    for stream in &streams {
        bytes.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, *stream, &headers));
    }
    socket.write_all(&bytes).await.unwrap();

    let past_bound = *streams.last().unwrap();
    let mut refused = false;
    let mut answered = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(refused && answered.len() == max_streams as usize) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((kind, _, stream, payload))) = tokio::time::timeout(left, read_frame(&mut socket)).await
        else {
            panic!("refused: {refused}, {} of {max_streams} stalled streams answered", answered.len());
        };
        match kind {
            FRAME_RST_STREAM if stream == past_bound => {
                assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), REFUSED_STREAM);
                refused = true;
            }
            FRAME_HEADERS => {
                assert_ne!(stream, past_bound, "the stream past the bound was served");
                answered.insert(stream);
            }
            FRAME_GOAWAY => panic!("the node closed the connection before answering every stream"),
            _ => {}
        }
    }
    // Every stream answered (408: the bodies never came), the connection is idle: closed after
    // request_timeout, at most the close grace later if the peer ignores the goodbye (it does).
    time_to_close(&mut socket, Duration::from_secs(20)).await;
    assert!(node.client().queue("h2-stalled").await.is_none_or(|q| q.messages == 0), "nothing stored");
}
