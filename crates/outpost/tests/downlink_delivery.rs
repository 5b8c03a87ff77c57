//! Downlink delivery over the edge's own link with the real binaries (CONTRACT section 9): an edge
//! that was offline gets what was posted once it connects, a connected edge has a post in its
//! local queue within a second without waiting for a ping, a broadcast reaches every edge once,
//! downlink messages are never forwarded back up, and kill -9 of either side in the middle of a
//! large downlink neither loses nor repeats a message.

use std::time::{Duration, Instant};

use testkit::{wait_until_async, Client, Node, StoredMessage};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const DEADLINE: Duration = Duration::from_secs(30);

/// Edges listed without tokens, so a broadcast knows them before they ever connect.
fn central_config(edges: &[&str]) -> String {
    edges.iter().map(|id| format!("[[edge]]\nid = \"{id}\"\ntoken = \"\"\n\n")).collect()
}

/// `ping_interval = "300s"`: nothing here may ride on a ping. A route per queue to a service that
/// is down keeps every message stored (otherwise the edge releases a downlink message as soon as
/// its forwarder has passed it), so the tests can read what arrived.
fn edge_config(central_url: &str) -> String {
    let down = format!("http://127.0.0.1:{}/", testkit::free_port());
    let routes: String = ["prices", "config", "catalog"]
        .iter()
        .map(|q| format!("[[route]]\nname = \"hold-{q}\"\nqueue = \"{q}\"\nurls = [\"{down}\"]\n\n"))
        .collect();
    format!(
        r#"{routes}
[[upstream]]
url = "{central_url}"

[connectivity]
ping_interval = "300s"
missed_pings = 3
offline_probe_interval = "1s"
failed_transition_wait = "1s"

[failover]
connect_timeout = "1s"

[forwarding]
request_timeout = "10s"
"#
    )
}

async fn start_central(edges: &[&str]) -> Node {
    Node::builder(BIN).role("central").arg("--node-id").arg("hq").config(&central_config(edges)).start().await
}

async fn start_edge(central: &Node, id: &str) -> Node {
    Node::builder(BIN)
        .role("edge")
        .arg("--node-id")
        .arg(id)
        .config(&edge_config(&central.url()))
        .start()
        .await
}

async fn wait_online(edge: &Node) {
    let client = edge.client();
    wait_until_async(DEADLINE, "the edge is online", || async { client.status().await["state"] == "online" })
        .await;
}

async fn post_for(central: &Client, edge: &str, queue: &str, payload: &str) {
    central
        .post(&format!("/v1/edges/{edge}/queues/{queue}/messages"), Some("text/plain"), payload.to_string())
        .await
        .unwrap()
        .expect_status(202);
}

fn downlink_payloads(messages: &[StoredMessage]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.origin == "~central")
        .map(|m| String::from_utf8(m.payload.clone()).unwrap())
        .collect()
}

async fn wait_for_payloads(edge: &Client, queue: &str, want: &[&str]) {
    wait_until_async(DEADLINE, &format!("{want:?} in the edge's queue {queue}"), || async {
        downlink_payloads(&edge.read_all(queue).await) == want
    })
    .await;
}

async fn pending_at_central(central: &Client, edge: &str) -> u64 {
    let edges = central.get("/v1/edges").await.unwrap().json();
    edges.as_array().unwrap().iter().find(|e| e["id"] == edge).unwrap()["downlink_pending"].as_u64().unwrap()
}

#[tokio::test]
async fn downlink_reaches_offline_and_connected_edges_once_and_never_goes_back_up() {
    let central = start_central(&["e1", "e2", "e3"]).await;
    let hq = central.client();

    // Posted while e1 has never connected: it waits, then arrives once e1 is up.
    post_for(&hq, "e1", "prices", "price-1").await;
    post_for(&hq, "e1", "prices", "price-2").await;
    assert_eq!(pending_at_central(&hq, "e1").await, 2);
    let e1 = start_edge(&central, "e1").await;
    let edge = e1.client();
    // The edge's own messages share the queue with the downlink ones.
    edge.post_message("prices", b"local-1".to_vec()).await.unwrap().expect_status(202);
    wait_for_payloads(&edge, "prices", &["price-1", "price-2"]).await;
    wait_online(&e1).await;
    wait_until_async(DEADLINE, "the central knows e1 has them", || async {
        pending_at_central(&hq, "e1").await == 0
    })
    .await;

    // Connected: in the edge's queue within a second (pings come every 300 s).
    let posted = Instant::now();
    post_for(&hq, "e1", "prices", "price-3").await;
    wait_until_async(Duration::from_secs(1), "price-3 at e1 within 1 s of the post", || async {
        downlink_payloads(&edge.read_all("prices").await).contains(&"price-3".to_string())
    })
    .await;
    let took = posted.elapsed();
    edge.post_message("prices", b"local-2".to_vec()).await.unwrap().expect_status(202);

    // Broadcast to three edges (two of them connect only now): each gets it exactly once.
    let broadcast =
        hq.post("/v1/broadcast/queues/config/messages", Some("application/json"), "{\"v\":1}").await.unwrap();
    broadcast.expect_status(202);
    assert_eq!(broadcast.json()["count"], 3);
    let e2 = start_edge(&central, "e2").await;
    let e3 = start_edge(&central, "e3").await;
    for node in [&e1, &e2, &e3] {
        wait_for_payloads(&node.client(), "config", &["{\"v\":1}"]).await;
    }

    // Never forwarded back up: the central's "prices" holds e1's own two messages, nothing else, and
    // the edge's forwarder passed the downlink ones (its seqs 1..=5 are all accounted for).
    wait_until_async(DEADLINE, "e1's own messages at the central", || async {
        hq.read_all("prices").await.len() == 2
    })
    .await;
    let up = hq.read_all("prices").await;
    assert_eq!(
        up.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
        [b"local-1".as_slice(), b"local-2"]
    );
    assert!(up.iter().all(|m| m.origin == "e1"));
    assert!(
        hq.read_all("config").await.is_empty(),
        "a broadcast came back up: {:?}",
        hq.read_all("config").await
    );
    // Exactly once, in the central's order, after everything settled.
    assert_eq!(downlink_payloads(&edge.read_all("prices").await), ["price-1", "price-2", "price-3"]);
    for node in [&e1, &e2, &e3] {
        assert_eq!(downlink_payloads(&node.client().read_all("config").await), ["{\"v\":1}"]);
    }
    eprintln!("connected edge: post to stored at the edge in {took:?}");
}

/// Posts `count` messages for `edge`'s `queue` in NDJSON batches of 1000: payload `n` is `"m-{n}"`.
async fn post_numbered(central: &Client, edge: &str, queue: &str, count: usize) {
    for chunk_start in (0..count).step_by(1000) {
        let body: String =
            (chunk_start..(chunk_start + 1000).min(count)).map(|n| format!("\"m-{n}\"\n")).collect();
        central
            .post(&format!("/v1/edges/{edge}/queues/{queue}/batch"), Some("application/x-ndjson"), body)
            .await
            .unwrap()
            .expect_status(202);
    }
}

fn assert_exactly_once_in_order(messages: &[StoredMessage], count: usize) {
    let payloads = downlink_payloads(messages);
    assert_eq!(payloads.len(), count, "each downlink message exactly once");
    for (n, payload) in payloads.iter().enumerate() {
        assert_eq!(payload, &format!("\"m-{n}\""), "message {n} in the central's order");
    }
    let origin_seqs: Vec<u64> =
        messages.iter().filter(|m| m.origin == "~central").map(|m| m.origin_seq).collect();
    assert!(origin_seqs.windows(2).all(|w| w[1] == w[0] + 1), "the central's seqs, gapless and in order");
}

async fn downlink_count(edge: &Client, queue: &str) -> usize {
    edge.queue(queue).await.map_or(0, |q| q.last_seq as usize)
}

#[tokio::test]
async fn kill_9_of_the_edge_and_of_the_central_during_a_large_downlink_loses_and_repeats_nothing() {
    const COUNT: usize = 50_000;
    let mut central = start_central(&["e1"]).await;
    let hq = central.client();
    post_numbered(&hq, "e1", "catalog", COUNT).await;
    let mut e1 = start_edge(&central, "e1").await;
    let edge = e1.client();

    // Kill the edge part way through.
    wait_until_async(DEADLINE, "part of the downlink at the edge", || async {
        downlink_count(&edge, "catalog").await > 0
    })
    .await;
    e1.kill9();
    e1.restart().await;
    // Then the central, part way through the rest.
    let before = downlink_count(&edge, "catalog").await;
    wait_until_async(DEADLINE, "more of the downlink at the edge", || async {
        downlink_count(&edge, "catalog").await > before
    })
    .await;
    central.kill9();
    central.restart().await;

    wait_until_async(Duration::from_secs(120), "the whole downlink at the edge", || async {
        downlink_count(&edge, "catalog").await >= COUNT
    })
    .await;
    assert_exactly_once_in_order(&edge.read_all("catalog").await, COUNT);
    wait_until_async(DEADLINE, "the central knows e1 has everything", || async {
        pending_at_central(&hq, "e1").await == 0
    })
    .await;
    // Nothing came back up.
    assert!(hq.read_all("catalog").await.is_empty());
}

/// Downlink throughput to one edge over loopback (docs/benchmarks.md), not a check: 200,000
/// messages of 256 B wait at the central, then the edge connects and takes them.
/// `cargo test --release -p outpost --test downlink_delivery measure_downlink_throughput -- --ignored --nocapture`
#[tokio::test]
#[ignore]
async fn measure_downlink_throughput() {
    const COUNT: usize = 200_000;
    let central = start_central(&["e1"]).await;
    let hq = central.client();
    let line = format!("\"{}\"\n", "x".repeat(254));
    for _ in 0..COUNT / 1000 {
        let body = line.repeat(1000);
        hq.post("/v1/edges/e1/queues/bulk/batch", Some("application/x-ndjson"), body)
            .await
            .unwrap()
            .expect_status(202);
    }
    let started = Instant::now();
    let e1 = Node::builder(BIN)
        .role("edge")
        .args(["--node-id", "e1"])
        .config(
            &edge_config(&central.url())
                .replace("request_timeout = \"10s\"", "request_timeout = \"10s\"\nbatch_messages = 1000"),
        )
        .start()
        .await;
    let edge = e1.client();
    wait_until_async(Duration::from_secs(600), "the whole downlink at the edge", || async {
        downlink_count(&edge, "bulk").await >= COUNT
    })
    .await;
    let took = started.elapsed();
    eprintln!(
        "downlink: {COUNT} messages of 256 B to one edge in {took:.2?} (edge start included): {:.0} msgs/s",
        COUNT as f64 / took.as_secs_f64()
    );
}

/// Time for one broadcast to reach 100 connected edges (docs/benchmarks.md), not a check: 100 real
/// edge processes linked to one central; the clock runs from the broadcast's 202 until the last
/// edge holds the message in its local queue (every edge polled every 5 ms).
/// `cargo test --release -p outpost --test downlink_delivery measure_broadcast_to_100_edges -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_broadcast_to_100_edges() {
    const EDGES: usize = 100;
    let ids: Vec<String> = (0..EDGES).map(|i| format!("b{i:03}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let central = start_central(&id_refs).await;
    let hq = central.client();
    let mut edges = Vec::with_capacity(EDGES);
    for id in &ids {
        edges.push(start_edge(&central, id).await);
    }
    wait_until_async(Duration::from_secs(120), "every edge online", || async {
        let status =
            futures_util::future::join_all(edges.iter().map(|e| async move { e.client().status().await }));
        status.await.iter().all(|s| s["state"] == "online")
    })
    .await;
    let mut reach = Vec::new();
    for round in 1..=5u64 {
        let posted = Instant::now();
        hq.post(
            "/v1/broadcast/queues/prices/messages",
            Some("application/json"),
            format!("{{\"round\":{round}}}"),
        )
        .await
        .unwrap()
        .expect_status(202);
        let mut arrived: Vec<Option<Duration>> = vec![None; EDGES];
        while arrived.iter().any(Option::is_none) {
            let counts = futures_util::future::join_all(
                edges.iter().map(|e| async move { downlink_count(&e.client(), "prices").await }),
            )
            .await;
            for (i, count) in counts.into_iter().enumerate() {
                if arrived[i].is_none() && count as u64 >= round {
                    arrived[i] = Some(posted.elapsed());
                }
            }
            assert!(posted.elapsed() < Duration::from_secs(60), "the broadcast did not reach every edge");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut times: Vec<Duration> = arrived.into_iter().flatten().collect();
        times.sort();
        eprintln!(
            "broadcast round {round} to {EDGES} edges: first {:?}, median {:?}, last {:?}",
            times[0],
            times[EDGES / 2],
            times[EDGES - 1]
        );
        reach.push(times[EDGES - 1]);
    }
    reach.sort();
    eprintln!("broadcast to {EDGES} edges, 5 rounds: last edge reached in {:?} (median of rounds)", reach[2]);
}
