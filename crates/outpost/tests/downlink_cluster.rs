//! Downlink push across a cluster of two centrals on one PostgreSQL database (a throwaway one on
//! `OUTPOST_TEST_POSTGRES`) with the real binaries: a message posted on central A reaches an edge
//! linked to central B within a second, with pings 300 s apart (so it cannot have ridden on one);
//! then the edge fails over to A and the rest arrives exactly once, in order.

use std::time::{Duration, Instant};

use testkit::postgres::TestDatabase;
use testkit::{wait_until_async, Client, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const DEADLINE: Duration = Duration::from_secs(30);

async fn start_central(database: &TestDatabase, id: &str) -> Node {
    Node::builder(BIN).role("central").args(["--node-id", id, "--postgres", &database.url]).start().await
}

/// B first (the edge links to it), A second; a route to a service that is down keeps the
/// messages stored at the edge so the test can read them.
fn edge_config(first: &Node, second: &Node) -> String {
    let down = format!("http://127.0.0.1:{}/", testkit::free_port());
    format!(
        r#"
[[upstream]]
url = "{}"

[[upstream]]
url = "{}"

[[route]]
name = "hold"
queue = "prices"
urls = ["{down}"]

[connectivity]
ping_interval = "300s"
missed_pings = 3
offline_probe_interval = "1s"
failed_transition_wait = "1s"

[failover]
connect_timeout = "1s"
primary_retries = 0
failback_interval = "1h"
"#,
        first.url(),
        second.url()
    )
}

async fn downlink_at(edge: &Client) -> Vec<String> {
    edge.read_all("prices")
        .await
        .into_iter()
        .filter(|m| m.origin == "~central")
        .map(|m| String::from_utf8(m.payload).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_on_one_central_reaches_an_edge_linked_to_another_at_once() {
    let database = TestDatabase::create().await;
    let a = start_central(&database, "central-a").await;
    let mut b = start_central(&database, "central-b").await;
    let edge =
        Node::builder(BIN).role("edge").args(["--node-id", "e1"]).config(&edge_config(&b, &a)).start().await;
    let client = edge.client();
    wait_until_async(DEADLINE, "the edge is online through B", || async {
        let status = client.status().await;
        status["state"] == "online" && status["upstream"]["url"] == b.url()
    })
    .await;

    let mut took = Vec::new();
    for n in 0..5 {
        let payload = format!("price-{n}");
        let posted = Instant::now();
        a.client()
            .post("/v1/edges/e1/queues/prices/messages", Some("text/plain"), payload.clone())
            .await
            .unwrap()
            .expect_status(202);
        wait_until_async(
            Duration::from_secs(1),
            &format!("{payload} at the edge within 1 s of the post on A"),
            || async { downlink_at(&client).await.contains(&payload) },
        )
        .await;
        took.push(posted.elapsed());
    }
    eprintln!("posted on A, stored at the edge linked to B: {took:?}");

    // B dies: the edge moves to A and what is posted meanwhile arrives once, in order.
    b.kill9();
    for n in 5..10 {
        a.client()
            .post("/v1/edges/e1/queues/prices/messages", Some("text/plain"), format!("price-{n}"))
            .await
            .unwrap()
            .expect_status(202);
    }
    let want: Vec<String> = (0..10).map(|n| format!("price-{n}")).collect();
    wait_until_async(DEADLINE, "all ten at the edge after failover to A", || async {
        downlink_at(&client).await.len() >= 10
    })
    .await;
    assert_eq!(downlink_at(&client).await, want, "exactly once, in the central's order");
    b.restart().await;
}

/// Push latency posted-on-A → stored at the edge linked to B (docs/benchmarks.md), not a check.
/// `cargo test --release -p outpost --test downlink_cluster measure_push_latency -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_push_latency() {
    const SAMPLES: usize = 300;
    let database = TestDatabase::create().await;
    let a = start_central(&database, "central-a").await;
    let b = start_central(&database, "central-b").await;
    let edge =
        Node::builder(BIN).role("edge").args(["--node-id", "e1"]).config(&edge_config(&b, &a)).start().await;
    let client = edge.client();
    wait_until_async(DEADLINE, "the edge is online through B", || async {
        let status = client.status().await;
        status["state"] == "online" && status["upstream"]["url"] == b.url()
    })
    .await;
    let hq = a.client();
    let mut took = Vec::with_capacity(SAMPLES);
    for n in 1..=SAMPLES as u64 {
        let posted = Instant::now();
        hq.post("/v1/edges/e1/queues/prices/messages", Some("text/plain"), "p")
            .await
            .unwrap()
            .expect_status(202);
        loop {
            if client.queue("prices").await.is_some_and(|q| q.last_seq >= n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(posted.elapsed());
    }
    took.sort();
    let at = |p: f64| took[((took.len() as f64 * p) as usize).min(took.len() - 1)];
    eprintln!(
        "push A→B→edge over {SAMPLES} posts: p50 {:?}, p99 {:?}, max {:?}",
        at(0.50),
        at(0.99),
        took[took.len() - 1]
    );
}
