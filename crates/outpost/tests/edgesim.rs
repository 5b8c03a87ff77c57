//! The edge simulator's own check at a small size (`testkit::edgesim`): 200 simulated edges for
//! 10 s against one central and against two centrals on one PostgreSQL database (a throwaway one
//! on `OUTPOST_TEST_POSTGRES`). Each edge opens its link, takes pings every second, reports,
//! sends pipelined batches of two queues (some of them twice), and afterwards the central's queues
//! must hold every message of every (edge, queue) exactly once, in order, with the payload sent.
//! Throughput and latency are printed, never asserted (docs/benchmarks.md has the figures).

use std::time::Duration;

use testkit::edgesim::{self, SimConfig, SimReport};
use testkit::postgres::TestDatabase;
use testkit::Node;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const EDGES: usize = 200;
const RATE_PER_EDGE: f64 = 2.0;
const GENERATION: Duration = Duration::from_secs(10);

fn config(centrals: Vec<String>) -> SimConfig {
    SimConfig {
        centrals,
        edges: EDGES,
        rate_per_edge: RATE_PER_EDGE,
        duration: GENERATION,
        ramp: Duration::from_secs(2),
        // Generous: CI runs this on a loaded 2-core machine with a debug build.
        drain_timeout: Duration::from_secs(90),
        request_timeout: Duration::from_secs(60),
        ping_interval: Duration::from_secs(1),
        payload_bytes: 200,
        queues_per_edge: 2,
        queue_names: 4,
        replay_every: 10,
        ..SimConfig::default()
    }
}

fn check(report: &SimReport) {
    let pretty = serde_json::to_string_pretty(report).unwrap();
    eprintln!("{pretty}");
    assert!(report.ok(), "the simulator's check failed: {pretty}");
    // The check must have checked something: every edge linked, generated, was pinged and
    // replayed, and the read-back saw every message generated.
    assert_eq!(report.links_opened, EDGES as u64, "every edge opened exactly one link");
    let per_edge = (RATE_PER_EDGE * GENERATION.as_secs_f64()) as u64;
    assert!(
        report.messages_generated >= EDGES as u64 * (per_edge - 1),
        "{} messages generated, expected about {}",
        report.messages_generated,
        EDGES as u64 * per_edge
    );
    let verification = report.verification.as_ref().expect("the run was verified");
    assert_eq!(verification.messages_checked, report.messages_generated);
    assert_eq!(verification.pairs_checked, EDGES * 2);
    assert!(report.replays > 0 && report.duplicates_reported > 0, "some batches were sent twice");
    assert!(report.pings >= EDGES as u64, "pings arrived: {}", report.pings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_edges_into_one_central_exactly_once_in_order() {
    let central = Node::builder(BIN).role("central").args(["--node-id", "hq"]).start().await;
    let report = edgesim::run(config(vec![central.url()])).await.unwrap();
    check(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_edges_into_two_centrals_on_postgres_exactly_once_in_order() {
    let database = TestDatabase::create().await;
    let a = Node::builder(BIN)
        .role("central")
        .args(["--node-id", "hq-a", "--postgres", &database.url])
        .start()
        .await;
    let b = Node::builder(BIN)
        .role("central")
        .args(["--node-id", "hq-b", "--postgres", &database.url])
        .start()
        .await;
    // Half the edges on each central; the read-back goes through the first.
    let report = edgesim::run(config(vec![a.url(), b.url()])).await.unwrap();
    check(&report);
    // The other central sees the same queues.
    let through_a = a.client().queues().await;
    let through_b = b.client().queues().await;
    let totals = |queues: &[testkit::QueueInfo]| queues.iter().map(|q| q.messages).sum::<u64>();
    assert_eq!(totals(&through_a), report.messages_generated);
    assert_eq!(totals(&through_b), report.messages_generated);
}
