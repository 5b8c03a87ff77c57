//! Routes that keep up with a backlog (issue 12): `[[route]] max_in_flight` (a window of POSTs
//! pipelined on one connection, acknowledged in queue order only) and `batch = N` (one NDJSON POST
//! of N messages), against a downstream service in the test process, with the real binary.
//!
//! `measure_route_windows` (ignored) measures delivery rates for docs/benchmarks.md.

use std::collections::HashMap;
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

    fn fail(&self, payload: &str, times: u32) {
        self.shared.fail_times.lock().unwrap().insert(payload.as_bytes().to_vec(), times);
    }

    fn log(&self) -> Vec<Request> {
        self.shared.log.lock().unwrap().clone()
    }

    fn accepted_messages(&self) -> usize {
        self.shared.accepted_messages.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
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
    let watch = shared.watch.lock().unwrap().clone();
    if let Some((client, failing_seq)) = watch {
        let failing = shared.log.lock().unwrap().iter().any(|r| r.seq == failing_seq && r.status != 200)
            && !shared.log.lock().unwrap().iter().any(|r| r.seq == failing_seq && r.status == 200);
        if failing {
            let backlog = route_backlog(&client).await;
            shared.backlog_checks.lock().unwrap().push(backlog);
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
        shared.accepted_messages.fetch_add(lines.len(), std::sync::atomic::Ordering::Relaxed);
    }
    shared.log.lock().unwrap().push(Request {
        status,
        seq: header("outpost-seq").parse().unwrap_or(0),
        batch_count: header("outpost-batch-count").parse().ok(),
        lines,
        content_type,
    });
    StatusCode::from_u16(status).unwrap()
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
    const TOTAL: u64 = 2_000;
    const FAILING: u64 = 1_001; // the queue seq (and payload index + 1) that fails once
    let downstream = Downstream::start_serial().await;
    downstream.fail(&payload(FAILING as usize - 1), 1);
    let node = start_edge(&route_toml(&downstream.url, "max_in_flight = 32")).await;
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
/// window of 8 would wait for the delayed-ACK timer (~40 ms) per answer: 5,000 messages took about
/// 28 s that way (180 msgs/s), against well under a second. The bound is generous.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_to_a_downstream_that_leaves_nagle_on_does_not_wait_for_delayed_acks() {
    const BACKLOG: usize = 5_000;
    let downstream = Downstream::start_with(Shared { nagle: true, ..Shared::default() }).await;
    let node = start_edge(&route_toml(&downstream.url, "max_in_flight = 8")).await;
    let client = node.client();
    switch(&client, "store").await;
    for _ in 0..(BACKLOG / 1000) {
        client.post_batch("orders", &vec!["{}".to_string(); 1000]).await.unwrap().batch_accepted();
    }
    let started = Instant::now();
    switch(&client, "forward").await;
    wait_until_async(WAIT, "the backlog delivered", || async { downstream.accepted_messages() >= BACKLOG })
        .await;
    let took = started.elapsed();
    eprintln!("{BACKLOG} messages, 8 in flight, to a downstream with Nagle on: {took:.2?}");
    assert!(took < Duration::from_secs(10), "{BACKLOG} messages took {took:?}: waiting for delayed ACKs?");
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

/// Delivery rates to a downstream that takes 5 ms per answer (a service across a network), for
/// docs/benchmarks.md: `cargo test --release -p outpost --test route_window
/// measure_route_windows_to_a_slow_downstream -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_route_windows_to_a_slow_downstream() {
    let line = format!("{{\"payload\":\"{}\"}}", "x".repeat(100));
    const SLOW_BACKLOG: usize = 5_000;
    for (name, extra) in [
        ("max_in_flight = 1", ""),
        ("max_in_flight = 8", "max_in_flight = 8"),
        ("max_in_flight = 32", "max_in_flight = 32"),
    ] {
        let downstream = Downstream::start().await;
        *downstream.shared.delay.lock().unwrap() = Duration::from_millis(5);
        let node = start_edge(&route_toml(&downstream.url, extra)).await;
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
        eprintln!(
            "{name}, downstream answering in 5 ms: {SLOW_BACKLOG} stored messages delivered in {took:.2?}: {:.0} messages/s",
            SLOW_BACKLOG as f64 / took.as_secs_f64()
        );
    }
}
