//! Two centrals on one PostgreSQL database (a throwaway one on `OUTPOST_TEST_POSTGRES`) with the
//! real binaries: an edge lists both; kill -9 of the primary under steady load moves the edge to
//! the alternate and the cluster holds every message exactly once, in order; the primary's return
//! brings the edge back (failback); the edge registry, maintenance and an operator's transition
//! trigger work from either central.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::postgres::TestDatabase;
use testkit::{wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

async fn start_central(database: &TestDatabase, id: &str) -> Node {
    Node::builder(BIN).role("central").args(["--node-id", id, "--postgres", &database.url]).start().await
}

fn edge_config(centrals: &[&Node], failback_interval: &str) -> String {
    let upstreams: String =
        centrals.iter().map(|c| format!("[[upstream]]\nurl = \"{}\"\n\n", c.url())).collect();
    format!(
        r#"
{upstreams}
[connectivity]
ping_interval = "1s"
missed_pings = 3
offline_probe_interval = "1s"
transition_to_offline_wait = "1s"
failed_transition_wait = "1h"

[failover]
connect_timeout = "1s"
primary_retries = 0
failback_interval = "{failback_interval}"

[forwarding]
batch_messages = 200
request_timeout = "2s"
"#
    )
}

async fn start_edge(id: &str, config: &str) -> Node {
    Node::builder(BIN).role("edge").args(["--node-id", id]).config(config).start().await
}

async fn status_of(node: &Node) -> serde_json::Value {
    node.client().status().await
}

async fn wait_state(node: &Node, want: &str, timeout: Duration) {
    wait_until_async(timeout, &format!("edge state {want}"), || async {
        status_of(node).await["state"] == want
    })
    .await;
}

async fn queue_messages(node: &Node, queue: &str) -> u64 {
    node.client().queue(queue).await.map_or(0, |q| q.messages)
}

/// The cluster (read through `central`) holds exactly `expected` (edge seq → payload) from
/// `edge_id`, once each and in the edge's order.
async fn assert_cluster_holds(central: &Node, queue: &str, edge_id: &str, expected: &BTreeMap<u64, Vec<u8>>) {
    let stored = central.client().read_all(queue).await;
    let from_edge: Vec<_> = stored.iter().filter(|m| m.origin == edge_id).collect();
    let origin_seqs: Vec<u64> = from_edge.iter().map(|m| m.origin_seq).collect();
    let expected_seqs: Vec<u64> = expected.keys().copied().collect();
    assert_eq!(
        origin_seqs.len(),
        expected_seqs.len(),
        "as many messages as acknowledged, read at {}",
        central.url()
    );
    assert_eq!(
        origin_seqs,
        expected_seqs,
        "each message once, in the edge's order, read at {}",
        central.url()
    );
    for m in from_edge {
        assert_eq!(&m.payload, &expected[&m.origin_seq], "payload of edge seq {}", m.origin_seq);
    }
}

/// Posts batches of 10 to the edge until `stop`, recording every acknowledged (seq → payload).
fn steady_load(edge: &Node, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<BTreeMap<u64, Vec<u8>>> {
    let client = edge.client();
    tokio::spawn(async move {
        let mut acknowledged = BTreeMap::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let lines: Vec<String> = (0..10).map(|i| format!("load-{}", n + i)).collect();
            n += 10;
            let accepted = client.post_batch("q", &lines).await.expect("post to the edge").batch_accepted();
            for (seq, line) in (accepted.first_seq..=accepted.last_seq).zip(lines) {
                acknowledged.insert(seq, line.into_bytes());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acknowledged
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_of_the_primary_under_load_fails_over_exactly_once_and_fails_back() {
    let database = TestDatabase::create().await;
    let mut primary = start_central(&database, "hq-a").await;
    let alternate = start_central(&database, "hq-b").await;
    let edge = start_edge("store-1", &edge_config(&[&primary, &alternate], "2s")).await;
    wait_state(&edge, "online", Duration::from_secs(20)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&edge, stop.clone());
    wait_until_async(Duration::from_secs(20), "messages flow through the primary", || async {
        queue_messages(&primary, "q").await >= 300
    })
    .await;

    // kill -9 the primary; from then on, messages the edge accepts must reach the cluster through
    // the alternate.
    let accepted_before_kill = edge.client().queue("q").await.unwrap().last_seq;
    primary.kill9();
    let killed_at = Instant::now();
    wait_until_async(
        Duration::from_secs(30),
        "messages accepted after the kill arrive through the alternate",
        || async {
            let stored = alternate.client().read_all("q").await;
            stored.iter().any(|m| m.origin_seq > accepted_before_kill)
        },
    )
    .await;
    let failover = killed_at.elapsed();
    eprintln!("failover: primary killed -> messages flowing through the alternate in {failover:?}");
    let status = status_of(&edge).await;
    assert_eq!(status["upstream"]["url"], alternate.url(), "{status}");
    assert_eq!(status["upstream"]["is_primary"], false, "{status}");

    // The load goes on through the alternate for a while (200 more messages) before it stops.
    let through_alternate = queue_messages(&alternate, "q").await;
    wait_until_async(Duration::from_secs(30), "200 more messages through the alternate", || async {
        queue_messages(&alternate, "q").await >= through_alternate + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = load.await.unwrap();
    let total = acknowledged.len() as u64;
    wait_until_async(Duration::from_secs(30), "the cluster holds every acknowledged message", || async {
        queue_messages(&alternate, "q").await == total
    })
    .await;
    assert_cluster_holds(&alternate, "q", "store-1", &acknowledged).await;

    // The primary comes back: the edge fails back to it within failback_interval (2 s here).
    primary.restart().await;
    let back_at = Instant::now();
    wait_until_async(Duration::from_secs(30), "the edge is on the primary again", || async {
        let status = status_of(&edge).await;
        status["upstream"]["is_primary"] == true && status["upstream"]["url"] == primary.url()
    })
    .await;
    eprintln!("failback: primary restarted -> edge on the primary in {:?}", back_at.elapsed());
    let more: Vec<String> = (0..50).map(|i| format!("after-failback-{i}")).collect();
    let accepted = edge.client().post_batch("q", &more).await.unwrap().batch_accepted();
    for (seq, line) in (accepted.first_seq..=accepted.last_seq).zip(more) {
        acknowledged.insert(seq, line.into_bytes());
    }
    let total = acknowledged.len() as u64;
    wait_until_async(Duration::from_secs(30), "messages after failback are stored", || async {
        queue_messages(&primary, "q").await == total
    })
    .await;
    // Either central reads the same, complete, duplicate-free log.
    assert_cluster_holds(&primary, "q", "store-1", &acknowledged).await;
    assert_cluster_holds(&alternate, "q", "store-1", &acknowledged).await;
    assert_eq!(primary.client().read_all("q").await, alternate.client().read_all("q").await);

    // Both centrals know the edge, as it last reported.
    for central in [&primary, &alternate] {
        wait_until_async(Duration::from_secs(10), "the edge is listed online on both centrals", || async {
            let edges = central.client().get("/v1/edges").await.unwrap().json();
            edges
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["id"] == "store-1" && e["state"] == "online" && e["upstream_url"] == primary.url())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_registry_and_transition_trigger_work_from_either_central() {
    let database = TestDatabase::create().await;
    let a = start_central(&database, "hq-a").await;
    let b = start_central(&database, "hq-b").await;
    // Maintenance switched on one central holds on the other.
    a.client()
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":true}"#)
        .await
        .unwrap()
        .expect_status(200);
    wait_until_async(Duration::from_secs(5), "the other central is in maintenance too", || async {
        status_of(&b).await["state"] == "maintenance"
    })
    .await;

    // The edge's first transition fails (maintenance); failed_transition_wait = 1h holds it offline.
    let edge = start_edge("store-2", &edge_config(&[&a, &b], "60s")).await;
    wait_until_async(Duration::from_secs(15), "the first transition fails", || async {
        let status = status_of(&edge).await;
        status["state"] == "offline" && !status["offline_log"].as_array().unwrap().is_empty()
    })
    .await;
    // Both centrals show the edge with its offline log, whichever one it talked to.
    let edge_log = status_of(&edge).await["offline_log"].clone();
    for central in [&a, &b] {
        wait_until_async(
            Duration::from_secs(10),
            "the edge and its offline log on both centrals",
            || async {
                let edges = central.client().get("/v1/edges").await.unwrap().json();
                edges
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["id"] == "store-2" && e["state"] == "offline" && e["offline_log"] == edge_log)
            },
        )
        .await;
    }

    // Maintenance off on the other central: both leave it.
    b.client()
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":false}"#)
        .await
        .unwrap()
        .expect_status(200);
    wait_until_async(Duration::from_secs(5), "the first central leaves maintenance too", || async {
        status_of(&a).await["state"] == "online"
    })
    .await;
    // Probes reach the primary again, but the wait holds the edge offline.
    a.wait_probes_from("store-2", 2).await;
    assert_eq!(status_of(&edge).await["state"], "offline", "failed_transition_wait holds");

    // The trigger goes to the central the edge does not probe (it probes its primary, a).
    let response = b.client().post("/v1/edges/store-2/transition-online", None, "").await.unwrap();
    assert!(response.status.is_success(), "trigger accepted: {}", response.text());
    wait_state(&edge, "online", Duration::from_secs(15)).await;
    assert_eq!(status_of(&edge).await["upstream"]["url"], a.url());
}
