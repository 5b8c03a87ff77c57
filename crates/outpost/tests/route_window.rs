//! Routes that keep up with a backlog (issue 12): `[[route]] max_in_flight` (a window of POSTs
//! pipelined on one connection, or HTTP/2 streams to an https downstream that speaks it,
//! acknowledged in queue order only) and `batch = N` (one NDJSON POST of N messages), against a
//! downstream service in the test process, with the real binary.
//!
//! `measure_route_windows` and `measure_route_windows_to_a_slow_downstream` (ignored) measure
//! delivery rates for docs/benchmarks.md.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::serve::ListenerExt;
use axum::Router;
use serde_json::Value;
use testkit::{wait_until_async, Client, Node};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
const WAIT: Duration = Duration::from_secs(120);

/// One request the downstream answered.
#[derive(Clone, Debug)]
struct Request {
    status: u16,
    /// `Outpost-Seq` (the first message's, for a batch).
    seq: u64,
    lines: Vec<Vec<u8>>,
    content_type: String,
    batch_count: Option<usize>,
    http2: bool,
}

#[derive(Default)]
struct Shared {
    log: Mutex<Vec<Request>>,
    /// Payload → how many more times to answer it with 500.
    fail_times: Mutex<HashMap<Vec<u8>, u32>>,
    accepted_messages: std::sync::atomic::AtomicUsize,
    /// How long each answer takes (a remote service's latency).
    delay: Mutex<Duration>,
    /// Set: one request at a time, downstream-wide (a serial downstream); the log is the order
    /// the requests were handled in.
    serial: Option<tokio::sync::Mutex<()>>,
    /// The node and the seq of a message failing once: from that failure until the message is
    /// accepted, every request handled first reads the route's backlog into `backlog_checks`.
    watch: Mutex<Option<(Client, u64)>>,
    backlog_checks: Mutex<Vec<u64>>,
    /// Set: Nagle's algorithm stays on for the downstream's connections (hyper's and axum's
    /// default); otherwise they set TCP_NODELAY, as most servers do.
    nagle: bool,
    /// Requests being handled now, and the most handled at once.
    handling: AtomicUsize,
    most_handled_at_once: AtomicUsize,
    /// Set (HTTP/2): the first connection starts a graceful shutdown (GOAWAY) once it has received
    /// that many requests.
    goaway_after: Option<usize>,
    /// How many connections the downstream accepted.
    connections: AtomicUsize,
}

struct Downstream {
    url: String,
    shared: Arc<Shared>,
}

impl Downstream {
    async fn start() -> Downstream {
        Downstream::start_with(Shared::default()).await
    }

    async fn start_serial() -> Downstream {
        Downstream::start_with(Shared { serial: Some(tokio::sync::Mutex::new(())), ..Shared::default() })
            .await
    }

    async fn start_with(shared: Shared) -> Downstream {
        let shared = Arc::new(shared);
        let app = Router::new()
            .route("/in", axum::routing::post(receive))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        // As most servers (Go's, nginx's keep-alive), unless the test asks for Nagle.
        let nagle = shared.nagle;
        let listener = listener.tap_io(move |tcp| {
            let _ = tcp.set_nodelay(!nagle);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Downstream { url, shared }
    }

    /// The downstream over TLS (a certificate for localhost from `certs`), offering `alpn` (its
    /// preference first) and serving each connection in the protocol picked; over HTTP/2 with up
    /// to `max_concurrent_streams` streams at once.
    async fn start_tls(
        shared: Shared,
        certs: &Path,
        alpn: &[&[u8]],
        max_concurrent_streams: u32,
    ) -> Downstream {
        let shared = Arc::new(shared);
        let acceptor = testkit::tls::acceptor(&certs.join("sink.pem"), &certs.join("sink.key"), alpn);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/in", listener.local_addr().unwrap().port());
        let server_shared = shared.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(!server_shared.nagle);
                let (acceptor, shared) = (acceptor.clone(), server_shared.clone());
                tokio::spawn(async move {
                    let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let received = Arc::new(AtomicUsize::new(0));
                    let goaway = Arc::new(tokio::sync::Notify::new());
                    let service = {
                        let (shared, received, goaway) = (shared.clone(), received.clone(), goaway.clone());
                        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let shared = shared.clone();
                            let count = received.fetch_add(1, Ordering::SeqCst) + 1;
                            if number == 1 && shared.goaway_after == Some(count) {
                                goaway.notify_one();
                            }
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
                                let status = handle(&shared, &parts.headers, body, http2).await;
                                let response = hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(Bytes::new()))
                                    .unwrap();
                                Ok::<_, Infallible>(response)
                            }
                        })
                    };
                    let io = hyper_util::rt::TokioIo::new(tls);
                    if !http2 {
                        let _ =
                            hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                        return;
                    }
                    let connection =
                        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .max_concurrent_streams(max_concurrent_streams)
                            .serve_connection(io, service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = &mut connection => return,
                        _ = goaway.notified() => {}
                    }
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                });
            }
        });
        Downstream { url, shared }
    }

    fn fail(&self, payload: &str, times: u32) {
        self.shared.fail_times.lock().unwrap().insert(payload.as_bytes().to_vec(), times);
    }

    fn log(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    fn accepted_messages(&self) -> usize {
        self.shared.accepted_messages.load(Ordering::Relaxed)
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    StatusCode::from_u16(handle(&shared, &headers, body, false).await).unwrap()
}

/// What the downstream makes of one request: its status.
async fn handle(shared: &Shared, headers: &HeaderMap, body: Bytes, http2: bool) -> u16 {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let content_type = header("content-type");
    let lines: Vec<Vec<u8>> = if content_type == "application/x-ndjson" {
        body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
    } else {
        vec![body.to_vec()]
    };
    let _one_at_a_time = match &shared.serial {
        Some(serial) => Some(serial.lock().await),
        None => None,
    };
    let now = shared.handling.fetch_add(1, Ordering::SeqCst) + 1;
    shared.most_handled_at_once.fetch_max(now, Ordering::SeqCst);
    let watch = shared.watch.lock().unwrap().clone();
    if let Some((client, failing_seq)) = watch {
        let failing = || {
            let log = shared.log.lock().unwrap();
            log.iter().any(|r| r.seq == failing_seq && r.status != 200)
                && !log.iter().any(|r| r.seq == failing_seq && r.status == 200)
        };
        if failing() {
            let backlog = route_backlog(&client).await;
            // Still failing after the read (requests may be handled at once): the backlog was
            // read before the failed message was delivered, let alone acknowledged.
            if failing() {
                shared.backlog_checks.lock().unwrap().push(backlog);
            }
        }
    }
    let delay = *shared.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = {
        let mut fail_times = shared.fail_times.lock().unwrap();
        let failing = lines.iter().find(|l| fail_times.get(*l).is_some_and(|n| *n > 0)).cloned();
        match failing {
            Some(line) => {
                *fail_times.get_mut(&line).unwrap() -= 1;
                500
            }
            None => 200,
        }
    };
    if status == 200 {
        shared.accepted_messages.fetch_add(lines.len(), Ordering::Relaxed);
    }
    shared.log.lock().unwrap().push(Request {
        status,
        seq: header("outpost-seq").parse().unwrap_or(0),
        batch_count: header("outpost-batch-count").parse().ok(),
        lines,
        content_type,
        http2,
    });
    shared.handling.fetch_sub(1, Ordering::SeqCst);
    status
}

/// A private CA and a certificate for localhost (`sink.pem`), made by scripts/make-certs.sh.
fn make_certs() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("outpost-certs-").tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-certs.sh");
    let output =
        std::process::Command::new("bash").arg(&script).arg(dir.path()).arg("sink").output().unwrap();
    assert!(output.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&output.stderr));
    dir
}

/// The route's TOML for an https downstream whose CA is in `certs`.
fn tls_route_toml(url: &str, certs: &Path, extra: &str) -> String {
    route_toml(url, &format!("ca_file = \"{}\"\n{extra}", certs.join("ca.pem").display()))
}

fn route_toml(url: &str, extra: &str) -> String {
    format!(
        r#"
[[route]]
name = "erp"
queue = "orders"
urls = ["{url}"]
timeout = "5s"
max_attempts = 10
retry_initial = "300ms"
retry_max = "300ms"
{extra}
"#
    )
}

async fn start_edge(config: &str) -> Node {
    Node::builder(OUTPOST).config(&format!("node_id = \"edge-1\"\n{config}")).start().await
}

async fn switch(client: &Client, mode: &str) {
    client.post(&format!("/v1/routes/erp/{mode}"), None, "").await.unwrap().expect_status(200);
}

async fn route_backlog(client: &Client) -> u64 {
    let routes = client.get("/v1/routes").await.unwrap().json();
    routes.as_array().unwrap().iter().find(|r| r["name"] == "erp").expect("route erp")["backlog"]
        .as_u64()
        .unwrap()
}

/// `got == want`, else a panic naming the first difference (the logs are thousands long).
fn assert_same(got: &[(u64, u16)], want: &[(u64, u16)], what: &str) {
    if let Some(at) = (0..got.len().max(want.len())).find(|i| got.get(*i) != want.get(*i)) {
        let around = |log: &[(u64, u16)]| log[at.saturating_sub(3)..(at + 4).min(log.len())].to_vec();
        panic!(
            "{what}: first difference at {at} (of {} got, {} wanted): got (seq, status) {:?}, wanted {:?}",
            got.len(),
            want.len(),
            around(got),
            around(want)
        );
    }
}

fn payload(i: usize) -> String {
    format!(r#"{{"order":{i}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_32_reaches_a_serial_downstream_in_queue_order_around_a_failure() {
    let downstream = Downstream::start_serial().await;
    let route = route_toml(&downstream.url, "max_in_flight = 32");
    serial_order_around_a_failure(downstream, &route).await;
}

/// Over HTTP/2 a server limited to one stream at a time sees the window's requests in queue order,
/// as a serial HTTP/1.1 server does: streams open in queue order, one once the previous closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_32_over_http2_reaches_a_one_stream_downstream_in_queue_order_around_a_failure() {
    let certs = make_certs();
    let downstream = Downstream::start_tls(Shared::default(), certs.path(), &[b"h2", b"http/1.1"], 1).await;
    let route = tls_route_toml(&downstream.url, certs.path(), "max_in_flight = 32");
    let shared = downstream.shared.clone();
    serial_order_around_a_failure(downstream, &route).await;
    let log = shared.log.lock().unwrap().clone();
    assert_eq!(shared.most_handled_at_once.load(Ordering::SeqCst), 1);
    // The window's requests went over HTTP/2; the failed message's retries alone (the route's
    // one-at-a-time path) over HTTP/1.1.
    assert!(log.iter().filter(|r| !r.http2).all(|r| r.seq == 1_001), "only the retry went over HTTP/1.1");
    assert!(log.iter().filter(|r| r.http2).count() > 1_900);
}

/// 2,000 messages through a window of 32 to `downstream`, which handles one request at a time;
/// message 1,001 fails once. The order the downstream handled them in is queue order around the
/// failure, and nothing was acknowledged past the failure before its retry succeeded.
async fn serial_order_around_a_failure(downstream: Downstream, route: &str) {
    const TOTAL: u64 = 2_000;
    const FAILING: u64 = 1_001; // the queue seq (and payload index + 1) that fails once
    downstream.fail(&payload(FAILING as usize - 1), 1);
    let node = start_edge(route).await;
    let client = node.client();
    *downstream.shared.watch.lock().unwrap() = Some((client.clone(), FAILING));
    switch(&client, "store").await;
    let payloads: Vec<String> = (0..TOTAL as usize).map(payload).collect();
    for chunk in payloads.chunks(500) {
        client.post_batch("orders", chunk).await.unwrap().batch_accepted();
    }
    switch(&client, "forward").await;
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;

    // The downstream's log, in the order it handled the requests: 1..k-1, k failed, the rest of
    // k's window (answered, not acknowledged), then k again and everything after it, in order.
    let log: Vec<(u64, u16)> = downstream.log().iter().map(|r| (r.seq, r.status)).collect();
    let k = FAILING as usize;
    let before: Vec<(u64, u16)> = (1..FAILING).map(|seq| (seq, 200)).collect();
    assert_same(&log[..(k - 1).min(log.len())], &before, "before the failure: queue order, each once");
    assert_eq!(log[k - 1], (FAILING, 500), "then the failing message");
    let rest_of_window = log[k..].iter().take_while(|(seq, _)| *seq != FAILING).count();
    assert!(rest_of_window < 32, "{rest_of_window} requests between the failure and its retry");
    let expected: Vec<(u64, u16)> =
        (FAILING + 1..).take(rest_of_window).chain(FAILING..=TOTAL).map(|seq| (seq, 200)).collect();
    assert_same(&log[k..], &expected, "after the failure: the rest of its window, then from it on in order");
    // Nothing was acknowledged past the failure before its retry succeeded: the downstream read
    // the route's backlog while handling every request from the failure to the retry (included).
    let checks = downstream.shared.backlog_checks.lock().unwrap().clone();
    assert_eq!(checks.len(), rest_of_window + 1, "{checks:?}");
    assert!(checks.iter().all(|backlog| *backlog > TOTAL - FAILING), "backlogs {checks:?}");
    let failed = client.get("/v1/failed?route=erp").await.unwrap().json();
    assert_eq!(failed.as_array().map_or(0, Vec::len), 0, "{failed}");
}

/// Stores `count` messages (payloads 0..count) while the route is in store mode, then switches it
/// to forward; returns when it switched.
async fn backlog_then_forward(client: &Client, count: usize) {
    switch(client, "store").await;
    let payloads: Vec<String> = (0..count).map(payload).collect();
    for chunk in payloads.chunks(500) {
        client.post_batch("orders", chunk).await.unwrap().batch_accepted();
    }
    switch(client, "forward").await;
}

/// How many times the downstream accepted each seq.
fn accepted_seqs(downstream: &Downstream) -> BTreeMap<u64, usize> {
    let mut accepted = BTreeMap::new();
    for request in downstream.log().iter().filter(|r| r.status == 200) {
        *accepted.entry(request.seq).or_insert(0) += 1;
    }
    accepted
}

/// An https downstream that speaks HTTP/2 and takes 50 ms per request, handling many at once: a
/// window of 32 opens 32 streams, so 640 messages take about 640 / 32 x 50 ms = 1 s, where one
/// request at a time (HTTP/1.1 pipelining included: the server handles a connection's requests
/// one after the other) takes at least 32 s. The bound is generous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_32_over_http2_gets_a_concurrent_downstreams_concurrency() {
    const TOTAL: usize = 640;
    let certs = make_certs();
    let shared = Shared { delay: Mutex::new(Duration::from_millis(50)), ..Shared::default() };
    let downstream = Downstream::start_tls(shared, certs.path(), &[b"h2", b"http/1.1"], 100).await;
    let node = start_edge(&tls_route_toml(&downstream.url, certs.path(), "max_in_flight = 32")).await;
    let client = node.client();
    backlog_then_forward(&client, TOTAL).await;
    let started = Instant::now();
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;
    let took = started.elapsed();
    eprintln!("{TOTAL} messages, 32 in flight over HTTP/2, 50 ms per request: {took:.2?}");
    assert!(took < Duration::from_secs(12), "{TOTAL} messages took {took:?}: one request at a time?");
    let accepted = accepted_seqs(&downstream);
    assert_eq!(accepted.keys().copied().collect::<Vec<_>>(), (1..=TOTAL as u64).collect::<Vec<_>>());
    assert!(accepted.values().all(|n| *n == 1), "every message exactly once");
    assert!(downstream.log().iter().all(|r| r.http2), "every request over HTTP/2");
    let at_once = downstream.shared.most_handled_at_once.load(Ordering::SeqCst);
    assert!(at_once > 8, "{at_once} requests handled at once at most");
}

/// The same downstream failing one message in the middle of a window once: the requests after it
/// in the window are handled at the same time, but the route acknowledges nothing past the failure
/// until its retry succeeded, skips nothing and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_a_window_over_http2_acknowledges_nothing_past_it_and_loses_nothing() {
    const TOTAL: u64 = 640;
    const FAILING: u64 = 321;
    let certs = make_certs();
    let shared = Shared { delay: Mutex::new(Duration::from_millis(20)), ..Shared::default() };
    let downstream = Downstream::start_tls(shared, certs.path(), &[b"h2", b"http/1.1"], 100).await;
    downstream.fail(&payload(FAILING as usize - 1), 1);
    let node = start_edge(&tls_route_toml(&downstream.url, certs.path(), "max_in_flight = 32")).await;
    let client = node.client();
    *downstream.shared.watch.lock().unwrap() = Some((client.clone(), FAILING));
    backlog_then_forward(&client, TOTAL as usize).await;
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;

    let accepted = accepted_seqs(&downstream);
    assert_eq!(
        accepted.keys().copied().collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>(),
        "nothing skipped"
    );
    let statuses: Vec<u16> = downstream.log().iter().filter(|r| r.seq == FAILING).map(|r| r.status).collect();
    assert_eq!(statuses, [500, 200]);
    // The window over HTTP/2, handled at once; the failed message's retry alone went through the
    // route's one-at-a-time path (HTTP/1.1).
    assert!(downstream.log().iter().all(|r| r.http2 || r.seq == FAILING));
    assert!(downstream.shared.most_handled_at_once.load(Ordering::SeqCst) > 1);
    // Before the failure each message went once; the repeats are the window's requests after it.
    assert!((1..FAILING).all(|seq| accepted[&seq] == 1), "{accepted:?}");
    assert!(accepted.values().filter(|n| **n > 1).count() < 32, "{accepted:?}");
    // The backlog as read while the failed message was not delivered yet (by every request handled
    // meanwhile, its retry included): never past the failure.
    let checks = downstream.shared.backlog_checks.lock().unwrap().clone();
    assert!(!checks.is_empty());
    assert!(checks.iter().all(|backlog| *backlog > TOTAL - FAILING), "backlogs {checks:?}");
    let failed = client.get("/v1/failed?route=erp").await.unwrap().json();
    assert_eq!(failed.as_array().map_or(0, Vec::len), 0, "{failed}");
}

/// A server that goes away (GOAWAY) in the middle of a window: the streams past its last one were
/// not processed and go again on a new connection; nothing is lost, nothing failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_in_the_middle_of_a_window_loses_nothing() {
    const TOTAL: usize = 320;
    let certs = make_certs();
    let shared =
        Shared { delay: Mutex::new(Duration::from_millis(20)), goaway_after: Some(40), ..Shared::default() };
    // 8 streams at a time: when the GOAWAY comes, requests wait to open behind them.
    let downstream = Downstream::start_tls(shared, certs.path(), &[b"h2", b"http/1.1"], 8).await;
    let node = start_edge(&tls_route_toml(&downstream.url, certs.path(), "max_in_flight = 32")).await;
    let client = node.client();
    backlog_then_forward(&client, TOTAL).await;
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;
    let accepted = accepted_seqs(&downstream);
    assert_eq!(accepted.keys().copied().collect::<Vec<_>>(), (1..=TOTAL as u64).collect::<Vec<_>>());
    assert!(downstream.shared.connections.load(Ordering::SeqCst) >= 2, "a new connection after the GOAWAY");
    assert!(downstream.log().iter().all(|r| r.status == 200 && r.http2));
    let routes = client.get("/v1/routes").await.unwrap().json();
    assert_eq!(routes[0]["mode"], "forward", "not a failure: {routes}");
    let failed = client.get("/v1/failed?route=erp").await.unwrap().json();
    assert_eq!(failed.as_array().map_or(0, Vec::len), 0, "{failed}");
}

/// An https downstream that picks HTTP/1.1 by ALPN gets the window pipelined, as over http://.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_to_an_https_downstream_that_picks_http1_is_pipelined_in_queue_order() {
    const TOTAL: usize = 500;
    let certs = make_certs();
    let shared = Shared { serial: Some(tokio::sync::Mutex::new(())), ..Shared::default() };
    let downstream = Downstream::start_tls(shared, certs.path(), &[b"http/1.1"], 100).await;
    let node = start_edge(&tls_route_toml(&downstream.url, certs.path(), "max_in_flight = 8")).await;
    let client = node.client();
    backlog_then_forward(&client, TOTAL).await;
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;
    let log = downstream.log();
    let seqs: Vec<u64> = log.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=TOTAL as u64).collect::<Vec<_>>(), "queue order, each once");
    assert!(log.iter().all(|r| !r.http2 && r.status == 200));
    assert_eq!(downstream.shared.connections.load(Ordering::SeqCst), 1, "one kept connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_posts_ndjson_in_queue_order_and_a_failed_batch_goes_one_by_one() {
    const TOTAL: usize = 1_000;
    let downstream = Downstream::start().await;
    let mut payloads: Vec<String> = (0..TOTAL).map(payload).collect();
    // A payload with a line break cannot be an NDJSON line: it goes alone.
    payloads[250] = "{\"order\":250,\n\"note\":\"two lines\"}".to_string();
    // One message fails twice: its batch fails, then it is sent alone and retried.
    downstream.fail(&payloads[600], 2);
    let node = start_edge(&route_toml(&downstream.url, "batch = 100")).await;
    let client = node.client();
    switch(&client, "store").await;
    client.post_batch("orders", &payloads[..250]).await.unwrap().batch_accepted();
    client.post_message("orders", payloads[250].clone().into_bytes()).await.unwrap().accepted();
    client.post_batch("orders", &payloads[251..]).await.unwrap().batch_accepted();
    switch(&client, "forward").await;
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;

    let log = downstream.log();
    let accepted: Vec<&Request> = log.iter().filter(|r| r.status == 200).collect();
    // In queue order, each message exactly once among the accepted requests (one window at a
    // time, so nothing is repeated here).
    let lines: Vec<String> =
        accepted.iter().flat_map(|r| r.lines.iter().map(|l| String::from_utf8(l.clone()).unwrap())).collect();
    assert_eq!(lines, payloads, "every message once, in queue order");
    assert!(accepted.iter().any(|r| r.batch_count == Some(100) && r.content_type == "application/x-ndjson"));
    assert!(accepted.iter().all(|r| r.batch_count.is_none_or(|n| n == r.lines.len())));
    let alone = accepted.iter().find(|r| r.lines[0] == payloads[250].as_bytes()).unwrap();
    assert_eq!((alone.lines.len(), alone.batch_count), (1, None), "the two-line payload went alone");
    // The failing message: its batch failed once, it alone failed once more, then it went.
    let failing = payloads[600].as_bytes();
    let statuses: Vec<(u16, usize)> = log
        .iter()
        .filter(|r| r.lines.iter().any(|l| l == failing))
        .map(|r| (r.status, r.lines.len()))
        .collect();
    assert_eq!(statuses[0], (500, 100), "{statuses:?}");
    assert_eq!(statuses[1], (500, 1), "{statuses:?}");
    assert_eq!(statuses[2], (200, 1), "{statuses:?}");
}

/// A downstream that leaves Nagle's algorithm on holds each answer after a window's first until
/// the previous one is acknowledged; the route acknowledges every read at once (TCP_QUICKACK), or a
/// window of 8 waits for the delayed-ACK timer (~40 ms) on many answers: 5,000 messages took 3–28 s
/// that way, against a few tenths of a second. The drain is compared with the same drain to a
/// downstream with `TCP_NODELAY` in the same test (a loaded machine slows both alike).
#[tokio::test(flavor = "multi_thread")]
async fn a_window_to_a_downstream_that_leaves_nagle_on_does_not_wait_for_delayed_acks() {
    let baseline = Downstream::start().await;
    let baseline_route = route_toml(&baseline.url, "max_in_flight = 8");
    let baseline = drain_time(baseline, &baseline_route).await;
    let downstream = Downstream::start_with(Shared { nagle: true, ..Shared::default() }).await;
    let route = route_toml(&downstream.url, "max_in_flight = 8");
    let took = drain_time(downstream, &route).await;
    assert_not_waiting_for_delayed_acks("HTTP/1.1", baseline, took);
}

/// The same over HTTP/2 (TLS): 9.6–12 s rather than 0.7 s before the route acknowledged every read
/// of its HTTP/2 connections at once too.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_over_http2_to_a_downstream_that_leaves_nagle_on_does_not_wait_for_delayed_acks() {
    let certs = make_certs();
    let baseline = Downstream::start_tls(Shared::default(), certs.path(), &[b"h2"], 100).await;
    let baseline_route = tls_route_toml(&baseline.url, certs.path(), "max_in_flight = 8");
    let baseline = drain_time(baseline, &baseline_route).await;
    let shared = Shared { nagle: true, ..Shared::default() };
    let downstream = Downstream::start_tls(shared, certs.path(), &[b"h2"], 100).await;
    let route = tls_route_toml(&downstream.url, certs.path(), "max_in_flight = 8");
    let took = drain_time(downstream, &route).await;
    assert_not_waiting_for_delayed_acks("HTTP/2", baseline, took);
}

/// How long a fresh edge takes to deliver a stored backlog of 5,000 messages through `route`.
async fn drain_time(downstream: Downstream, route: &str) -> Duration {
    const BACKLOG: usize = 5_000;
    let node = start_edge(route).await;
    let client = node.client();
    switch(&client, "store").await;
    for _ in 0..(BACKLOG / 1000) {
        client.post_batch("orders", &vec!["{}".to_string(); 1000]).await.unwrap().batch_accepted();
    }
    let started = Instant::now();
    switch(&client, "forward").await;
    wait_until_async(WAIT, "the backlog delivered", || async { downstream.accepted_messages() >= BACKLOG })
        .await;
    started.elapsed()
}

fn assert_not_waiting_for_delayed_acks(protocol: &str, baseline: Duration, took: Duration) {
    eprintln!("5,000 messages, 8 in flight over {protocol}: {baseline:.2?} with TCP_NODELAY, {took:.2?} with Nagle on");
    let bound = baseline * 3 + Duration::from_secs(1);
    assert!(took < bound, "with Nagle on {took:?}, with TCP_NODELAY {baseline:?}: waiting for delayed ACKs?");
}

/// Large messages and a large `batch`: a POST holds `batch` messages only while its body stays
/// within 4 MiB (`MAX_POST_BYTES`), so 1,000 messages of up to `max_message_bytes` never make one
/// body of a gigabyte; everything still goes once, in queue order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_large_messages_stops_at_four_mib_per_post() {
    const MESSAGES: usize = 24;
    const SIZE: usize = 700 * 1024; // 5 fit in 4 MiB, 6 do not
    const MAX_POST_BYTES: usize = 4 << 20;
    let downstream = Downstream::start().await;
    let node = start_edge(&route_toml(&downstream.url, "batch = 1000\nmax_in_flight = 4")).await;
    let client = node.client();
    switch(&client, "store").await;
    let payloads: Vec<String> =
        (0..MESSAGES).map(|i| format!("{{\"order\":{i},\"lines\":\"{}\"}}", "x".repeat(SIZE))).collect();
    for payload in &payloads {
        client.post_message("orders", payload.clone().into_bytes()).await.unwrap().accepted();
    }
    switch(&client, "forward").await;
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;

    let log = downstream.log();
    assert!(
        log.iter().all(|r| r.status == 200),
        "statuses {:?}",
        log.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let lines: Vec<String> =
        log.iter().flat_map(|r| r.lines.iter().map(|l| String::from_utf8(l.clone()).unwrap())).collect();
    assert!(lines == payloads, "every message once, in queue order");
    let per_post: Vec<usize> = log.iter().map(|r| r.lines.len()).collect();
    for request in &log {
        let body: usize = request.lines.iter().map(|l| l.len() + 1).sum();
        assert!(body <= MAX_POST_BYTES, "a POST of {body} bytes ({per_post:?} messages per POST)");
    }
    assert!(per_post.contains(&5), "batches still fill up to the bound: {per_post:?}");
}

/// Delivery rates for docs/benchmarks.md: `cargo test --release -p outpost --test route_window
/// measure_route_windows -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_route_windows() {
    const BACKLOG: usize = 100_000;
    let line = format!("{{\"payload\":\"{}\"}}", "x".repeat(100));
    for (name, extra) in [
        ("max_in_flight = 1", ""),
        ("max_in_flight = 8", "max_in_flight = 8"),
        ("max_in_flight = 32", "max_in_flight = 32"),
        ("batch = 100", "batch = 100"),
        ("batch = 100, max_in_flight = 8", "batch = 100\nmax_in_flight = 8"),
    ] {
        let downstream = Downstream::start().await;
        let node = start_edge(&format!(
            "[limits]\nmax_batch_messages = 1000\n{}",
            route_toml(&downstream.url, extra)
        ))
        .await;
        let client = node.client();
        switch(&client, "store").await;
        for _ in 0..(BACKLOG / 1000) {
            client.post_batch("orders", &vec![line.clone(); 1000]).await.unwrap().batch_accepted();
        }
        let started = Instant::now();
        switch(&client, "forward").await;
        wait_until_async(Duration::from_secs(900), "the backlog delivered", || async {
            downstream.accepted_messages() >= BACKLOG
        })
        .await;
        let took = started.elapsed();
        eprintln!(
            "{name}: {BACKLOG} stored messages delivered in {took:.2?}: {:.0} messages/s",
            BACKLOG as f64 / took.as_secs_f64()
        );
        let _: Value = client.get("/v1/routes").await.unwrap().json();
    }
}

/// Delivery rates to a downstream that takes 5 ms per answer (a service across a network) and
/// handles many requests at once, over HTTP/1.1 (http://, the window pipelined) and over HTTP/2
/// (https://, ALPN h2: the window as streams), for docs/benchmarks.md: `cargo test --release -p
/// outpost --test route_window measure_route_windows_to_a_slow_downstream -- --ignored
/// --nocapture`. `max_in_flight = 1` goes one POST at a time through the route's HTTP/1.1 client
/// either way.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_route_windows_to_a_slow_downstream() {
    let line = format!("{{\"payload\":\"{}\"}}", "x".repeat(100));
    const SLOW_BACKLOG: usize = 5_000;
    let certs = make_certs();
    for http2 in [false, true] {
        for (name, extra) in [
            ("max_in_flight = 1", ""),
            ("max_in_flight = 8", "max_in_flight = 8"),
            ("max_in_flight = 32", "max_in_flight = 32"),
        ] {
            let shared = Shared { delay: Mutex::new(Duration::from_millis(5)), ..Shared::default() };
            let (downstream, route) = if http2 {
                let downstream =
                    Downstream::start_tls(shared, certs.path(), &[b"h2", b"http/1.1"], 100).await;
                let route = tls_route_toml(&downstream.url, certs.path(), extra);
                (downstream, route)
            } else {
                let downstream = Downstream::start_with(shared).await;
                let route = route_toml(&downstream.url, extra);
                (downstream, route)
            };
            let node = start_edge(&route).await;
            let client = node.client();
            switch(&client, "store").await;
            for _ in 0..(SLOW_BACKLOG / 1000) {
                client.post_batch("orders", &vec![line.clone(); 1000]).await.unwrap().batch_accepted();
            }
            let started = Instant::now();
            switch(&client, "forward").await;
            wait_until_async(Duration::from_secs(900), "the backlog delivered", || async {
                downstream.accepted_messages() >= SLOW_BACKLOG
            })
            .await;
            let took = started.elapsed();
            let protocol = if http2 { "https:// (HTTP/2)" } else { "http:// (HTTP/1.1)" };
            eprintln!(
                "{protocol}, {name}, downstream answering in 5 ms: {SLOW_BACKLOG} stored messages delivered in {took:.2?}: {:.0} messages/s (at most {} handled at once)",
                SLOW_BACKLOG as f64 / took.as_secs_f64(),
                downstream.shared.most_handled_at_once.load(Ordering::SeqCst)
            );
        }
    }
}
