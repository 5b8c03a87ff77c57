//! Edge ↔ central with the real binaries: exactly-once forwarding in order, going offline when the
//! central dies and draining the backlog when it returns, kill -9 of the edge mid-drain,
//! maintenance, and the central's transition trigger reaching an edge in `failed_transition_wait`.

use std::collections::BTreeMap;
use std::time::Duration;

use testkit::{wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Short intervals so state changes happen within seconds.
fn edge_config(central_url: &str) -> String {
    format!(
        r#"
[[upstream]]
url = "{central_url}"

[connectivity]
ping_interval = "1s"
missed_pings = 3
offline_probe_interval = "1s"
transition_to_offline_wait = "1s"
failed_transition_wait = "1h"

[failover]
connect_timeout = "1s"

[forwarding]
batch_messages = 200
request_timeout = "5s"
"#
    )
}

async fn start_central() -> Node {
    Node::builder(BIN).role("central").arg("--node-id").arg("hq").start().await
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

async fn state_of(node: &Node) -> String {
    node.client().status().await["state"].as_str().unwrap_or_default().to_string()
}

async fn wait_state(node: &Node, want: &str, timeout: Duration) {
    wait_until_async(timeout, &format!("edge state {want}"), || async { state_of(node).await == want }).await;
}

/// Posts `count` single messages to `queue`, returning the acknowledged (seq, payload) pairs.
async fn post_many(edge: &Node, queue: &str, prefix: &str, count: usize) -> Vec<(u64, Vec<u8>)> {
    let client = edge.client();
    let mut acknowledged = Vec::with_capacity(count);
    for i in 0..count {
        let payload = format!("{prefix}-{i}").into_bytes();
        let response = client.post_message(queue, payload.clone()).await.expect("post");
        acknowledged.push((response.accepted().seq, payload));
    }
    acknowledged
}

/// Checks the central holds exactly `expected` (edge seq → payload) for `queue` from `edge_id`,
/// once each and in the edge's order.
async fn assert_central_holds(central: &Node, queue: &str, edge_id: &str, expected: &BTreeMap<u64, Vec<u8>>) {
    let stored = central.client().read_all(queue).await;
    let from_edge: Vec<_> = stored.iter().filter(|m| m.origin == edge_id).collect();
    let origin_seqs: Vec<u64> = from_edge.iter().map(|m| m.origin_seq).collect();
    let expected_seqs: Vec<u64> = expected.keys().copied().collect();
    assert_eq!(origin_seqs, expected_seqs, "central holds each message of {queue} once, in the edge's order");
    for m in from_edge {
        assert_eq!(&m.payload, &expected[&m.origin_seq], "payload of edge seq {}", m.origin_seq);
    }
}

async fn central_count(central: &Node, queue: &str) -> u64 {
    central.client().queue(queue).await.map(|q| q.last_seq).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_reach_the_central_exactly_once_in_order() {
    let central = start_central().await;
    let edge = start_edge(&central, "store-1").await;
    wait_state(&edge, "online", Duration::from_secs(20)).await;

    let mut orders: BTreeMap<u64, Vec<u8>> = post_many(&edge, "orders", "o", 300).await.into_iter().collect();
    let batch: Vec<String> = (0..400).map(|i| format!("{{\"sale\":{i}}}")).collect();
    let accepted = edge.client().post_batch("sales", &batch).await.unwrap().batch_accepted();
    let sales: BTreeMap<u64, Vec<u8>> =
        (accepted.first_seq..=accepted.last_seq).zip(batch.iter().map(|l| l.clone().into_bytes())).collect();
    orders.extend(post_many(&edge, "orders", "p", 50).await);

    wait_until_async(Duration::from_secs(30), "central holds every message", || async {
        central_count(&central, "orders").await == 350 && central_count(&central, "sales").await == 400
    })
    .await;
    assert_central_holds(&central, "orders", "store-1", &orders).await;
    assert_central_holds(&central, "sales", "store-1", &sales).await;

    // Forwarded messages are released at the edge, and the central knows the edge.
    wait_until_async(Duration::from_secs(10), "edge backlog released", || async {
        edge.client().queues().await.iter().all(|q| q.messages == 0)
    })
    .await;
    let status = edge.client().status().await;
    assert_eq!(status["upstream"]["url"], central.url());
    assert_eq!(status["upstream"]["is_primary"], true);
    wait_until_async(Duration::from_secs(10), "a ping from the central", || async {
        edge.client().status().await["last_ping_at"].is_string()
    })
    .await;
    let edges = central.client().get("/v1/edges").await.unwrap().json();
    assert!(edges.as_array().unwrap().iter().any(|e| e["id"] == "store-1"), "{edges}");
    let metrics = edge.client().metrics().await;
    assert_eq!(
        testkit::metrics::value(&metrics, "outpost_messages_forwarded_total", &[("queue", "orders")]),
        Some(350.0)
    );
    assert_eq!(testkit::metrics::value(&metrics, "outpost_edge_state", &[("state", "online")]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn central_death_takes_the_edge_offline_and_its_return_drains_the_backlog() {
    let mut central = start_central().await;
    let edge = start_edge(&central, "store-2").await;
    wait_state(&edge, "online", Duration::from_secs(20)).await;
    let mut expected: BTreeMap<u64, Vec<u8>> =
        post_many(&edge, "orders", "before", 100).await.into_iter().collect();
    wait_until_async(Duration::from_secs(20), "first messages forwarded", || async {
        central_count(&central, "orders").await == 100
    })
    .await;

    central.kill9();
    wait_state(&edge, "offline", Duration::from_secs(15)).await;
    let status = edge.client().status().await;
    let log = status["offline_log"].as_array().unwrap();
    let last = log.last().expect("an offline-log entry");
    assert!(
        ["connection_lost", "central_unreachable", "missed_pings"].contains(&last["cause"].as_str().unwrap()),
        "cause: {last}"
    );
    let detail = last["detail"].as_str().unwrap();
    // Once for the failure, at most once more for re-checks that failed differently.
    let named = detail.matches(&central.url()).count();
    assert!((1..=2).contains(&named), "detail names the endpoint, without repeating it: {last}");

    // Writes keep being accepted while offline.
    expected.extend(post_many(&edge, "orders", "offline", 2000).await);
    assert_eq!(edge.client().status().await["backlog"]["messages"], 2000);

    central.restart().await;
    wait_state(&edge, "online", Duration::from_secs(30)).await;
    // Online means the backlog held when the transition began has been forwarded.
    assert!(central_count(&central, "orders").await >= 2100, "online only after the backlog drained");
    assert_central_holds(&central, "orders", "store-2", &expected).await;
    let edges = central.client().get("/v1/edges").await.unwrap().json();
    let entry = edges.as_array().unwrap().iter().find(|e| e["id"] == "store-2").expect("edge known").clone();
    wait_until_async(Duration::from_secs(10), "the central shows the edge's offline log", || async {
        let edges = central.client().get("/v1/edges").await.unwrap().json();
        edges
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == "store-2" && !e["offline_log"].as_array().unwrap().is_empty())
    })
    .await;
    drop(entry);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_edge_while_draining_loses_and_duplicates_nothing() {
    let mut central = start_central().await;
    let mut edge = start_edge(&central, "store-3").await;
    wait_state(&edge, "online", Duration::from_secs(20)).await;
    central.kill9();
    wait_state(&edge, "offline", Duration::from_secs(15)).await;

    // A backlog of 20,000 messages in batches of 500.
    let mut expected = BTreeMap::new();
    for b in 0..40 {
        let lines: Vec<String> = (0..500).map(|i| format!("{{\"b\":{b},\"i\":{i}}}")).collect();
        let accepted = edge.client().post_batch("orders", &lines).await.unwrap().batch_accepted();
        expected
            .extend((accepted.first_seq..=accepted.last_seq).zip(lines.into_iter().map(String::into_bytes)));
    }
    central.restart().await;
    // Kill the edge twice while it drains, at different points.
    for threshold in [3_000, 9_000] {
        wait_until_async(Duration::from_secs(30), "draining under way", || async {
            central_count(&central, "orders").await >= threshold
        })
        .await;
        edge.kill9();
        edge.restart().await;
    }
    wait_until_async(Duration::from_secs(60), "the central holds the whole backlog", || async {
        central_count(&central, "orders").await >= 20_000
    })
    .await;
    assert_central_holds(&central, "orders", "store-3", &expected).await;
    assert_eq!(central_count(&central, "orders").await, 20_000, "nothing stored twice");
    wait_state(&edge, "online", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_takes_edges_offline_and_back() {
    let central = start_central().await;
    let edge = start_edge(&central, "store-4").await;
    wait_state(&edge, "online", Duration::from_secs(20)).await;

    central
        .client()
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":true}"#)
        .await
        .unwrap()
        .expect_status(200);
    wait_state(&edge, "offline", Duration::from_secs(10)).await;
    let status = edge.client().status().await;
    assert_eq!(status["offline_log"].as_array().unwrap().last().unwrap()["cause"], "maintenance");
    assert_eq!(central.client().status().await["state"], "maintenance");
    // The edge reports its new state even though the central closed its link.
    wait_until_async(Duration::from_secs(10), "the central shows the edge offline", || async {
        let edges = central.client().get("/v1/edges").await.unwrap().json();
        edges.as_array().unwrap().iter().any(|e| e["id"] == "store-4" && e["state"] == "offline")
    })
    .await;
    // Writes are still accepted and wait for the central.
    edge.client().post_message("orders", "during maintenance").await.unwrap().expect_status(202);

    central
        .client()
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":false}"#)
        .await
        .unwrap()
        .expect_status(200);
    // A transition that failed for maintenance waits out failed_transition_wait (1h here), so an
    // operator triggers it; maintenance going off does not fail the transition in the first place.
    edge.client().post("/v1/admin/transition-online", None, "").await.unwrap().expect_status(202);
    wait_state(&edge, "online", Duration::from_secs(15)).await;
    wait_until_async(Duration::from_secs(10), "message forwarded after maintenance", || async {
        central_count(&central, "orders").await == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_from_the_central_ends_the_failed_transition_wait() {
    let central = start_central().await;
    // Maintenance from the start: the edge's first transition fails, and with
    // failed_transition_wait = 1h it would not try again on its own.
    central
        .client()
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":true}"#)
        .await
        .unwrap()
        .expect_status(200);
    let edge = start_edge(&central, "store-5").await;
    wait_until_async(Duration::from_secs(15), "the first transition fails", || async {
        let status = edge.client().status().await;
        status["state"] == "offline" && !status["offline_log"].as_array().unwrap().is_empty()
    })
    .await;
    central
        .client()
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":false}"#)
        .await
        .unwrap()
        .expect_status(200);
    // Probes reach the central again, but the wait holds the edge offline.
    central.wait_probes_from("store-5", 2).await;
    assert_eq!(state_of(&edge).await, "offline", "failed_transition_wait holds");

    let response = central.client().post("/v1/edges/store-5/transition-online", None, "").await.unwrap();
    assert!(response.status.is_success(), "trigger accepted: {}", response.text());
    wait_state(&edge, "online", Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_central_is_noticed_by_missed_pings() {
    // SIGSTOP freezes the central: its sockets stay open and nothing answers, as when a cable is
    // cut between two routers. Only the missing pings can tell.
    let central = start_central().await;
    let edge = start_edge(&central, "store-6").await;
    wait_state(&edge, "online", Duration::from_secs(20)).await;
    wait_until_async(Duration::from_secs(10), "a first ping", || async {
        edge.client().status().await["last_ping_at"].is_string()
    })
    .await;
    central.signal(nix::sys::signal::Signal::SIGSTOP);
    // missed_pings (3) × ping_interval (1 s) + transition_to_offline_wait (1 s) + probe timeouts.
    wait_state(&edge, "offline", Duration::from_secs(20)).await;
    let status = edge.client().status().await;
    let last = status["offline_log"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cause"], "missed_pings", "{last}");
    central.signal(nix::sys::signal::Signal::SIGCONT);
    wait_state(&edge, "online", Duration::from_secs(20)).await;
}

/// CONTRACT section 5 (issue 10): an edge that boots before its central is reachable does not sit
/// out `failed_transition_wait` (1 h here): no upstream answered, so that was no failed
/// transition, and the edge keeps probing every `offline_probe_interval` (1 s). Central started
/// 3 s after the edge: the edge is online within 5 s, its backlog drained.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_started_before_its_central_goes_online_soon_after_the_central_starts() {
    let mut central = start_central().await;
    central.sigterm().await;
    let edge = start_edge(&central, "store-early").await;
    let expected: BTreeMap<u64, Vec<u8>> =
        post_many(&edge, "orders", "early", 200).await.into_iter().collect();
    wait_until_async(Duration::from_secs(10), "the first transition ends offline", || async {
        let status = edge.client().status().await;
        status["state"] == "offline" && !status["offline_log"].as_array().unwrap().is_empty()
    })
    .await;
    let status = edge.client().status().await;
    let last = status["offline_log"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cause"], "central_unreachable", "{last}");
    let detail = last["detail"].as_str().unwrap();
    assert!(detail.starts_with("no upstream answered (probing every 1s): "), "{last}");
    assert_eq!(detail.matches(&central.url()).count(), 1, "the detail names the endpoint once: {detail}");

    // The scenario: the central comes up 3 s after the edge.
    tokio::time::sleep(Duration::from_secs(3)).await;
    central.restart().await;
    let central_started = std::time::Instant::now();
    wait_state(&edge, "online", Duration::from_secs(5)).await;
    eprintln!("edge online {:?} after the central was ready", central_started.elapsed());
    assert_central_holds(&central, "orders", "store-early", &expected).await;
    let status = edge.client().status().await;
    assert_eq!(status["backlog"]["messages"], 0, "backlog drained: {status}");
}
