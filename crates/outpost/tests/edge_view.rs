//! The central's own view of each edge (CONTRACT 5) with the real binaries: a site that went dark
//! never shows `online`. kill -9 of an edge → `offline` with cause `link_lost` within 2 s (also in
//! `outpost_edges{state}`, `ctl edges` and after a central restart); a frozen edge (SIGSTOP) →
//! `offline` within `missed_pings × ping_interval` + 2 s, and back when it thaws; on a cluster of
//! two centrals on PostgreSQL, an edge linked to B is `connected` on A, and stops being so when B
//! dies.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use testkit::postgres::TestDatabase;
use testkit::{metrics, wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
/// Generous: the machine is shared by several builds.
const SETTLE: Duration = Duration::from_secs(60);

fn edge_config(ping_interval: &str, missed_pings: u32) -> String {
    format!(
        "[connectivity]\nping_interval = \"{ping_interval}\"\nmissed_pings = {missed_pings}\n\
         offline_probe_interval = \"1s\"\ntransition_to_offline_wait = \"0s\"\nfailed_transition_wait = \"1s\"\n"
    )
}

async fn start_edge(id: &str, central: &Node, config: &str) -> Node {
    Node::builder(BIN).args(["--node-id", id, "--central", &central.url()]).config(config).start().await
}

/// `GET /v1/edges/{id}` on `central`; `null` while the central does not know the edge (404).
async fn edge_view(central: &Node, id: &str) -> Value {
    let response = central.client().get(&format!("/v1/edges/{id}")).await.expect("GET /v1/edges/{id}");
    if response.status == reqwest::StatusCode::NOT_FOUND {
        return Value::Null;
    }
    response.expect_status(200);
    response.json()
}

async fn wait_view(central: &Node, id: &str, what: &str, timeout: Duration, want: impl Fn(&Value) -> bool) {
    wait_until_async(timeout, what, || async { want(&edge_view(central, id).await) }).await;
}

fn online_and_connected(view: &Value) -> bool {
    view["state"] == "online" && view["connected"] == true && view["cause"].is_null()
}

fn lost(view: &Value) -> bool {
    view["state"] == "offline" && view["cause"] == "link_lost" && view["connected"] == false
}

/// Polls until `lost`, returning how long it took from `since`; fails past `limit` (plus slack
/// for the poll itself, which is asserted separately against `limit`).
async fn time_until_lost(central: &Node, id: &str, since: Instant, limit: Duration) -> Duration {
    loop {
        let view = edge_view(central, id).await;
        if lost(&view) {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit + Duration::from_secs(30), "{id} never shown lost: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_edge_killed_with_sigkill_is_offline_at_the_central_within_2_s_and_stays_so_after_a_restart() {
    let mut central = Node::builder(BIN).role("central").start().await;
    // Pings every 5 minutes: only the closed link can tell the central.
    let mut edge = start_edge("store-1", &central, &edge_config("300s", 3)).await;
    wait_view(&central, "store-1", "store-1 online at the central", SETTLE, online_and_connected).await;
    let text = central.client().metrics().await;
    assert_eq!(metrics::value(&text, "outpost_edges", &[("state", "online")]), Some(1.0), "{text}");

    let killed = Instant::now();
    edge.kill9();
    let took = time_until_lost(&central, "store-1", killed, Duration::from_secs(2)).await;
    eprintln!("kill -9 → offline (link_lost) at the central after {took:?}");
    assert!(took <= Duration::from_secs(2), "shown offline only after {took:?}");

    let view = edge_view(&central, "store-1").await;
    assert_eq!(view["reported_state"], "online", "{view}");
    let text = central.client().metrics().await;
    assert_eq!(metrics::value(&text, "outpost_edges", &[("state", "online")]), Some(0.0), "{text}");
    assert_eq!(metrics::value(&text, "outpost_edges", &[("state", "offline")]), Some(1.0), "{text}");
    let table = ctl(&["--url", &central.url(), "edges"]).await;
    let row = table.lines().find(|l| l.starts_with("store-1")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("offline (link_lost)"), "{table}");
    let listed: Value = central.client().get("/v1/edges?state=online").await.unwrap().json();
    assert_eq!(listed, serde_json::json!([]), "no edge listed online");

    // A restarted central does not believe the stale "online" it persisted (the edge's last report).
    central.kill9();
    central.restart().await;
    let view = edge_view(&central, "store-1").await;
    assert!(lost(&view), "after a restart: {view}");
    let text = central.client().metrics().await;
    assert_eq!(metrics::value(&text, "outpost_edges", &[("state", "online")]), Some(0.0), "{text}");
}

#[tokio::test]
async fn a_frozen_edge_is_offline_within_missed_pings_times_ping_interval_plus_2_s() {
    let central = Node::builder(BIN).role("central").start().await;
    let (ping_interval, missed_pings) = (Duration::from_secs(1), 2u32);
    let edge = start_edge("store-2", &central, &edge_config("1s", missed_pings)).await;
    wait_view(&central, "store-2", "store-2 online at the central", SETTLE, online_and_connected).await;
    // A live edge stays connected across several ping intervals (it answers each ping).
    let steady = Instant::now();
    while steady.elapsed() < ping_interval * (missed_pings + 2) {
        let view = edge_view(&central, "store-2").await;
        assert!(online_and_connected(&view), "a live edge flapped: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let limit = ping_interval * missed_pings + Duration::from_secs(2);
    let frozen = Instant::now();
    edge.signal(Signal::SIGSTOP);
    let took = time_until_lost(&central, "store-2", frozen, limit).await;
    eprintln!("SIGSTOP → offline (link_lost) at the central after {took:?} (limit {limit:?})");
    edge.signal(Signal::SIGCONT);
    assert!(took <= limit, "shown offline only after {took:?}, more than {limit:?}");

    // Thawed, it is heard from again and comes back.
    wait_view(&central, "store-2", "store-2 back online after SIGCONT", SETTLE, online_and_connected).await;
}

#[tokio::test]
async fn on_a_cluster_an_edge_linked_to_one_central_is_connected_on_the_other() {
    let database = TestDatabase::create().await;
    let central_a = Node::builder(BIN)
        .role("central")
        .args(["--node-id", "central-a", "--postgres", &database.url])
        .start()
        .await;
    let mut central_b = Node::builder(BIN)
        .role("central")
        .args(["--node-id", "central-b", "--postgres", &database.url])
        .start()
        .await;
    let _edge = start_edge("store-3", &central_b, &edge_config("1s", 3)).await;
    wait_view(&central_b, "store-3", "store-3 online on central B", SETTLE, online_and_connected).await;
    wait_view(&central_a, "store-3", "store-3 connected on central A", SETTLE, online_and_connected).await;
    let text = central_a.client().metrics().await;
    assert_eq!(metrics::value(&text, "outpost_edges", &[("state", "online")]), Some(1.0), "{text}");

    // Central B dies: its link-owner document stops beating and A stops counting the edge (the
    // edge knows only B, so it is really gone).
    central_b.kill9();
    wait_view(&central_a, "store-3", "store-3 lost on central A after B died", SETTLE, lost).await;
    let text = central_a.client().metrics().await;
    assert_eq!(metrics::value(&text, "outpost_edges", &[("state", "online")]), Some(0.0), "{text}");
}

async fn ctl(args: &[&str]) -> String {
    let output = tokio::process::Command::new(BIN)
        .arg("ctl")
        .args(args)
        .env_remove("OUTPOST_URL")
        .env_remove("OUTPOST_TOKEN")
        .output()
        .await
        .expect("run outpost ctl");
    assert!(output.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}
