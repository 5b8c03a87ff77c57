//! Routes that keep up with a backlog (issue 12): `[[route]] max_in_flight` (a window of POSTs in
//! flight, acknowledged in queue order only) and `batch = N` (one NDJSON POST of N messages),
//! against a downstream service in the test process, with the real binary.
//!
//! `measure_route_windows` (ignored) measures delivery rates for docs/benchmarks.md.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
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
}

struct Downstream {
    url: String,
    shared: Arc<Shared>,
}

impl Downstream {
    async fn start() -> Downstream {
        let shared = Arc::new(Shared::default());
        let app = Router::new().route("/in", axum::routing::post(receive)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
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

    /// Whether a 2xx was answered to `payload` (alone or as a line of a batch).
    fn accepted(&self, payload: &str) -> bool {
        self.log().iter().any(|r| r.status == 200 && r.lines.iter().any(|l| l == payload.as_bytes()))
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

fn payload(i: usize) -> String {
    format!(r#"{{"order":{i}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_32_stops_at_a_failure_skips_nothing_and_acknowledges_nothing_past_it() {
    const TOTAL: usize = 2_000;
    const FAILING: usize = 1_000; // the payload index that fails; its queue seq is FAILING + 1
    let downstream = Downstream::start().await;
    downstream.fail(&payload(FAILING), 3);
    let node = start_edge(&route_toml(&downstream.url, "max_in_flight = 32")).await;
    let client = node.client();
    switch(&client, "store").await;
    let payloads: Vec<String> = (0..TOTAL).map(payload).collect();
    for chunk in payloads.chunks(500) {
        client.post_batch("orders", chunk).await.unwrap().batch_accepted();
    }
    switch(&client, "forward").await;

    // While the failing message is not delivered, the route's cursor never passes it: read the
    // backlog first, then look whether the message was delivered by then.
    let started = Instant::now();
    let mut checks_while_failing = 0;
    while !downstream.accepted(&payloads[FAILING]) {
        let backlog = route_backlog(&client).await;
        if !downstream.accepted(&payloads[FAILING]) {
            checks_while_failing += 1;
            assert!(
                backlog >= (TOTAL - FAILING) as u64,
                "backlog {backlog} while message {} was not delivered: acknowledged past the failure",
                FAILING + 1
            );
        }
        assert!(started.elapsed() < WAIT, "the failing message was never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checks_while_failing > 0, "the failure window was observed");
    wait_until_async(WAIT, "route backlog 0", || async { route_backlog(&client).await == 0 }).await;

    let log = downstream.log();
    assert!(log
        .iter()
        .all(|r| r.content_type == "application/json" || r.content_type.is_empty() || r.lines.len() == 1));
    let accepted: Vec<&Request> = log.iter().filter(|r| r.status == 200).collect();
    // Nothing skipped: every message delivered at least once.
    for (i, p) in payloads.iter().enumerate() {
        assert!(accepted.iter().any(|r| r.lines[0] == p.as_bytes()), "message {} never delivered", i + 1);
    }
    // The failure was tried 3 times, then delivered; nothing became failed.
    let failing_seq = FAILING as u64 + 1;
    let attempts: Vec<u16> = log.iter().filter(|r| r.seq == failing_seq).map(|r| r.status).collect();
    assert_eq!(attempts, vec![500, 500, 500, 200], "the failing message's attempts");
    let failed = client.get("/v1/failed?route=erp").await.unwrap().json();
    assert_eq!(failed.as_array().map_or(0, Vec::len), 0, "{failed}");
    // After the retry, queue order again: the failing message's delivery comes before the last
    // delivery of every later message (later messages that got through during the failure are
    // delivered again after it, never only before it).
    let position = |seq: u64, last: bool| {
        let mut positions = accepted.iter().enumerate().filter(|(_, r)| r.seq == seq).map(|(i, _)| i);
        if last {
            positions.next_back()
        } else {
            positions.next()
        }
    };
    let failing_at = position(failing_seq, false).unwrap();
    for seq in failing_seq + 1..=TOTAL as u64 {
        let last = position(seq, true).unwrap();
        assert!(
            last > failing_at,
            "message {seq} was last delivered before the failed message {failing_seq}"
        );
    }
    // Before the failure, each message first arrived within one window of its queue position.
    let first_arrivals: Vec<u64> = {
        let mut seen = std::collections::HashSet::new();
        accepted.iter().filter(|r| seen.insert(r.seq)).map(|r| r.seq).collect()
    };
    for (i, seq) in first_arrivals.iter().enumerate().take(FAILING - 32) {
        assert!((*seq as i64 - (i as i64 + 1)).abs() <= 32, "message {seq} arrived {i}th");
    }
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
    // A downstream that takes 5 ms per answer (a service across a network): the window overlaps
    // the waits.
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
