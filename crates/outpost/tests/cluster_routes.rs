//! Routes on a central cluster (CONTRACT section 3): two centrals with the real binary on one
//! PostgreSQL database (a throwaway one on `OUTPOST_TEST_POSTGRES`), both configured with route `r`
//! on queue `orders` to one downstream service in the test process. Each central sends to its own
//! path (`/hq-a`, `/hq-b`), so the downstream knows which central delivered what.
//!
//! Checked: a mode change on one central (operator or `service_down`) shows on the other within
//! 1 s (the time is printed); while stored nothing is sent by either; back in forward every message
//! is delivered once, by one central, in queue order; an entry resubmitted on the central that does
//! not deliver is delivered by the one that does; kill -9 of the delivering central hands delivery
//! to the other within the lease's TTL and skips nothing; a delivering central frozen (SIGSTOP) past
//! the lease's TTL sends nothing more once it runs again (CONTRACT 4.5).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use serde_json::Value;
use testkit::postgres::TestDatabase;
use testkit::{metrics, wait_until, wait_until_async, Client, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const WAIT: Duration = Duration::from_secs(30);
/// What the contract allows a mode change to take to reach every central.
const PROPAGATION_BOUND: Duration = Duration::from_secs(1);
/// LEASE_TTL (5 s) + LEASE_RENEW_INTERVAL (1 s), and some slack for a loaded test machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(9);
/// MAX_UNCOMMITTED_DELIVERIES + the one in flight: what a kill -9 may make the next holder repeat.
const MAX_REPEATS_PER_CRASH: usize = 64 + 1;

// ---------------------------------------------------------------------------------------------
// The downstream service.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Delivery {
    /// The path the request came in on: the central that sent it.
    central: String,
    message_id: String,
    body: Vec<u8>,
    status: u16,
}

#[derive(Default)]
struct DownstreamState {
    unavailable: bool,
    status_for_payload: HashMap<Vec<u8>, u16>,
    delay: Duration,
    log: Vec<Delivery>,
    /// (central, when) of every request as it arrives, before any delay or answer.
    arrivals: Vec<(String, Instant)>,
}

struct Downstream {
    addr: SocketAddr,
    state: Arc<Mutex<DownstreamState>>,
}

impl Downstream {
    async fn start() -> Downstream {
        let state = Arc::new(Mutex::new(DownstreamState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/{central}", axum::routing::post(receive)).with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Downstream { addr, state }
    }

    fn url_for(&self, central: &str) -> String {
        format!("http://{}/{central}", self.addr)
    }

    fn set_unavailable(&self, unavailable: bool) {
        self.state.lock().unwrap().unavailable = unavailable;
    }

    fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    fn answer(&self, payload: &str, status: Option<u16>) {
        let mut state = self.state.lock().unwrap();
        match status {
            Some(status) => state.status_for_payload.insert(payload.as_bytes().to_vec(), status),
            None => state.status_for_payload.remove(payload.as_bytes()),
        };
    }

    /// When each central's requests arrived, in arrival order.
    fn arrivals_from(&self, central: &str) -> Vec<Instant> {
        let state = self.state.lock().unwrap();
        state.arrivals.iter().filter(|(from, _)| from == central).map(|(_, at)| *at).collect()
    }

    fn log(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().log.clone()
    }

    /// The 2xx-answered requests, in arrival order.
    fn delivered(&self) -> Vec<Delivery> {
        self.log().into_iter().filter(|d| (200..300).contains(&d.status)).collect()
    }

    /// Which centrals delivered each message id.
    fn deliverers(&self) -> BTreeMap<String, Vec<String>> {
        let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in self.delivered() {
            by_id.entry(d.message_id).or_default().push(d.central);
        }
        by_id
    }
}

async fn receive(
    State(state): State<Arc<Mutex<DownstreamState>>>,
    Path(central): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let (status, delay) = {
        let mut state = state.lock().unwrap();
        state.arrivals.push((central.clone(), Instant::now()));
        let status = if state.unavailable {
            503
        } else {
            state.status_for_payload.get(&body[..]).copied().unwrap_or(200)
        };
        (status, state.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let message_id =
        headers.get("outpost-message-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    state.lock().unwrap().log.push(Delivery { central, message_id, body: body.to_vec(), status });
    StatusCode::from_u16(status).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

fn route_toml(url: &str) -> String {
    format!(
        r#"
[[route]]
name = "r"
queue = "orders"
urls = ["{url}"]
timeout = "500ms"
max_attempts = 3
retry_initial = "20ms"
retry_max = "100ms"
"#
    )
}

async fn start_central(database: &TestDatabase, id: &str, downstream: &Downstream) -> Node {
    start_central_with(database, id, downstream, "").await
}

/// `extra`: more configuration after route r.
async fn start_central_with(database: &TestDatabase, id: &str, downstream: &Downstream, extra: &str) -> Node {
    Node::builder(BIN)
        .role("central")
        .args(["--node-id", id, "--postgres", &database.url])
        .config(&format!("{}{extra}", route_toml(&downstream.url_for(id))))
        .start()
        .await
}

/// A second route on queue `orders`, named `witness`, always in `forward`, to its own downstream:
/// once it has delivered a message, the cluster's routes have all been told of that message. A test
/// proving that a stored route sent nothing waits for the witness instead of sleeping.
fn witness_toml(witness: &Downstream, central: &str) -> String {
    route_toml(&witness.url_for(central)).replace("name = \"r\"", "name = \"witness\"")
}

async fn route_r(client: &Client) -> Value {
    let response = client.get("/v1/routes").await.unwrap();
    response.expect_status(200);
    let list = response.json();
    list.as_array().unwrap().iter().find(|r| r["name"] == "r").cloned().expect("route r listed")
}

async fn switch(client: &Client, mode: &str, reason: &str) -> Value {
    let body = serde_json::json!({ "reason": reason }).to_string();
    let response =
        client.post(&format!("/v1/routes/r/{mode}"), Some("application/json"), body).await.unwrap();
    response.expect_status(200);
    response.json()
}

/// Polls `client` until route r is in `mode`; returns how long after `since` it showed.
async fn time_until_mode(client: &Client, mode: &str, since: Instant) -> Duration {
    let deadline = Instant::now() + WAIT;
    loop {
        if route_r(client).await["mode"] == mode {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "route r never showed {mode} at {}", client.base_url());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The fields a mode change sets are the same on both centrals.
fn same_mode(a: &Value, b: &Value) {
    for field in ["mode", "mode_since", "changed_by", "reason"] {
        assert_eq!(a[field], b[field], "{field} differs between the centrals:\n{a}\n{b}");
    }
}

/// Posts `prefix-i` for each i, alternating between the centrals; records seq → payload.
async fn post_alternating(
    centrals: [&Client; 2],
    prefix: &str,
    count: usize,
    acknowledged: &mut BTreeMap<u64, String>,
) {
    for i in 0..count {
        let payload = format!("{prefix}-{i}");
        let accepted = centrals[i % 2]
            .post_message_with("orders", payload.clone(), Some("text/plain"), None)
            .await
            .unwrap()
            .accepted();
        acknowledged.insert(accepted.seq, payload);
    }
}

/// Waits until every acknowledged payload was delivered (2xx) at least once.
async fn wait_all_delivered(downstream: &Downstream, acknowledged: &BTreeMap<u64, String>) {
    wait_until_async(WAIT, &format!("{} messages delivered", acknowledged.len()), || async {
        let delivered: std::collections::HashSet<Vec<u8>> =
            downstream.delivered().into_iter().map(|d| d.body).collect();
        acknowledged.values().all(|p| delivered.contains(p.as_bytes()))
    })
    .await;
}

/// Each message delivered exactly once, by one central; returns that central.
fn assert_once_by_one_central(downstream: &Downstream) -> String {
    let deliverers = downstream.deliverers();
    let twice: Vec<_> = deliverers.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let centrals: std::collections::BTreeSet<String> = deliverers.into_values().flatten().collect();
    assert_eq!(centrals.len(), 1, "one central delivers the route: {centrals:?}");
    centrals.into_iter().next().unwrap()
}

/// Posts `count` lines `backlog-i` as one batch; records seq → payload.
async fn post_backlog(central: &Client, count: usize, acknowledged: &mut BTreeMap<u64, String>) {
    let lines: Vec<String> = (0..count).map(|i| format!("backlog-{i}")).collect();
    let batch = central.post_batch("orders", &lines).await.unwrap().batch_accepted();
    for (seq, line) in (batch.first_seq..=batch.last_seq).zip(lines) {
        acknowledged.insert(seq, line);
    }
}

/// After a takeover, `central` delivered in queue order from where it started, skipping nothing.
fn assert_continues_in_order(downstream: &Downstream, central: &str, acknowledged: &BTreeMap<u64, String>) {
    let bodies: Vec<Vec<u8>> =
        downstream.delivered().into_iter().filter(|d| d.central == central).map(|d| d.body).collect();
    let first = acknowledged.values().position(|p| p.as_bytes() == bodies[0]).unwrap();
    let expected: Vec<Vec<u8>> = acknowledged.values().skip(first).map(|p| p.as_bytes().to_vec()).collect();
    assert_eq!(bodies, expected, "the new holder continues in queue order, skipping nothing");
}

fn route_mode_metric(text: &str, mode: &str) -> f64 {
    metrics::value(text, "outpost_route_mode", &[("route", "r"), ("mode", mode)])
        .unwrap_or_else(|| panic!("no outpost_route_mode{{route=r,mode={mode}}} in\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn mode_changes_follow_on_every_central_and_one_central_delivers_each_message_once() {
    let database = TestDatabase::create().await;
    let downstream = Downstream::start().await;
    let witness = Downstream::start().await;
    let a = start_central_with(&database, "hq-a", &downstream, &witness_toml(&witness, "hq-a")).await;
    let b = start_central_with(&database, "hq-b", &downstream, &witness_toml(&witness, "hq-b")).await;
    let (ca, cb) = (a.client(), b.client());
    let mut acknowledged = BTreeMap::new();

    post_alternating([&ca, &cb], "first", 20, &mut acknowledged).await;
    wait_all_delivered(&downstream, &acknowledged).await;
    let holder = assert_once_by_one_central(&downstream);

    // (a) store on A: B shows it within 1 s; neither central sends anything meanwhile.
    let switched_at = Instant::now();
    let on_a = switch(&ca, "store", "ERP maintenance").await;
    let to_b = time_until_mode(&cb, "store", switched_at).await;
    eprintln!("propagation: POST store on A -> GET /v1/routes on B shows store in {to_b:?}");
    assert!(to_b < PROPAGATION_BOUND, "store took {to_b:?} to reach B");
    let on_b = route_r(&cb).await;
    same_mode(&on_a, &on_b);
    assert_eq!(
        (on_b["changed_by"].as_str(), on_b["reason"].as_str()),
        (Some("operator"), Some("ERP maintenance"))
    );
    let text = cb.metrics().await;
    assert_eq!((route_mode_metric(&text, "store"), route_mode_metric(&text, "forward")), (1.0, 0.0));

    let requests_before = downstream.log().len();
    post_alternating([&ca, &cb], "stored", 10, &mut acknowledged).await;
    for client in [&ca, &cb] {
        wait_until_async(WAIT, "a backlog of 10 on both centrals", || async {
            route_r(client).await["backlog"] == 10
        })
        .await;
    }
    wait_until(WAIT, "the witness route delivered every message", || {
        witness.deliverers().len() >= acknowledged.len()
    })
    .await;
    assert_eq!(downstream.log().len(), requests_before, "nothing is sent while the route is stored");

    // (b) forward on B: A follows, both resume, every message once, in queue order.
    let switched_at = Instant::now();
    let on_b = switch(&cb, "forward", "maintenance over").await;
    let to_a = time_until_mode(&ca, "forward", switched_at).await;
    eprintln!("propagation: POST forward on B -> GET /v1/routes on A shows forward in {to_a:?}");
    assert!(to_a < PROPAGATION_BOUND, "forward took {to_a:?} to reach A");
    same_mode(&on_b, &route_r(&ca).await);
    wait_all_delivered(&downstream, &acknowledged).await;
    assert_eq!(assert_once_by_one_central(&downstream), holder, "the lease holder kept delivering");
    let bodies: Vec<Vec<u8>> = downstream.delivered().into_iter().map(|d| d.body).collect();
    let in_queue_order: Vec<Vec<u8>> = acknowledged.values().map(|p| p.as_bytes().to_vec()).collect();
    assert_eq!(bodies, in_queue_order, "delivered in queue order");
    let text = ca.metrics().await;
    assert_eq!((route_mode_metric(&text, "store"), route_mode_metric(&text, "forward")), (0.0, 1.0));

    // (c) the service goes down: the holder switches to store, the other central follows.
    downstream.set_unavailable(true);
    post_alternating([&ca, &cb], "outage", 5, &mut acknowledged).await;
    let outage_at = Instant::now();
    let (mut seen_a, mut seen_b) = (None, None);
    while seen_a.is_none() || seen_b.is_none() {
        assert!(outage_at.elapsed() < WAIT, "the route never stored on both centrals");
        if seen_a.is_none() && route_r(&ca).await["mode"] == "store" {
            seen_a = Some(outage_at.elapsed());
        }
        if seen_b.is_none() && route_r(&cb).await["mode"] == "store" {
            seen_b = Some(outage_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (seen_a, seen_b) = (seen_a.unwrap(), seen_b.unwrap());
    let gap = seen_a.max(seen_b) - seen_a.min(seen_b);
    eprintln!("propagation: service_down on the holder ({holder}) -> store on both centrals {gap:?} apart");
    assert!(gap < PROPAGATION_BOUND, "automatic store took {gap:?} to reach the other central");
    let (on_a, on_b) = (route_r(&ca).await, route_r(&cb).await);
    same_mode(&on_a, &on_b);
    assert_eq!(on_a["changed_by"], "auto:service_down", "{on_a}");
    assert!(on_a["reason"].as_str().unwrap().contains(&downstream.url_for(&holder)), "{on_a}");

    downstream.set_unavailable(false);
    switch(&ca, "forward", "service back").await;
    wait_all_delivered(&downstream, &acknowledged).await;
    assert_eq!(assert_once_by_one_central(&downstream), holder);

    // A failed entry resubmitted on the central that does not deliver is delivered by the holder.
    let (holder_client, other_client) = if holder == "hq-a" { (&ca, &cb) } else { (&cb, &ca) };
    downstream.answer("poison", Some(400));
    let poison = other_client
        .post_message_with("orders", "poison", Some("text/plain"), None)
        .await
        .unwrap()
        .accepted();
    let failed_on_other = || async {
        let response = other_client.get("/v1/failed?route=r").await.unwrap();
        response.json().as_array().unwrap().clone()
    };
    wait_until_async(WAIT, "the poison message failed, listed on the other central", || async {
        failed_on_other().await.len() == 1
    })
    .await;
    assert_eq!(failed_on_other().await[0]["message_id"], poison.id.as_str());
    downstream.answer("poison", None);
    let resubmitted_at = Instant::now();
    other_client
        .post("/v1/failed/resubmit", Some("application/json"), r#"{"route":"r"}"#)
        .await
        .unwrap()
        .expect_status(200);
    wait_until_async(WAIT, "the resubmitted message delivered", || async {
        downstream.deliverers().contains_key(&poison.id)
    })
    .await;
    eprintln!("resubmit on the other central -> delivered by the holder in {:?}", resubmitted_at.elapsed());
    assert_eq!(downstream.deliverers()[&poison.id], std::slice::from_ref(&holder));
    assert_eq!(assert_once_by_one_central(&downstream), holder);
    wait_until_async(WAIT, "failed counts agree", || async {
        failed_on_other().await.is_empty() && route_r(holder_client).await["failed"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_of_the_delivering_central_hands_the_route_over_without_skipping() {
    let database = TestDatabase::create().await;
    let downstream = Downstream::start().await;
    let mut a = start_central(&database, "hq-a", &downstream).await;
    let mut b = start_central(&database, "hq-b", &downstream).await;
    let mut acknowledged = BTreeMap::new();
    post_alternating([&a.client(), &b.client()], "warm", 10, &mut acknowledged).await;
    wait_all_delivered(&downstream, &acknowledged).await;
    let holder_id = assert_once_by_one_central(&downstream);
    let (holder, survivor) = if holder_id == "hq-a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let survivor_id = if holder_id == "hq-a" { "hq-b" } else { "hq-a" };

    // A backlog that takes a few seconds to deliver, so the kill lands mid-delivery.
    downstream.set_delay(Duration::from_millis(10));
    post_backlog(&survivor.client(), 300, &mut acknowledged).await;
    wait_until_async(WAIT, "the holder is delivering the backlog", || async {
        downstream.delivered().iter().filter(|d| d.body.starts_with(b"backlog-")).count() >= 50
    })
    .await;
    holder.kill9();
    let killed_at = Instant::now();
    let delivered_at_kill = downstream.delivered().len();
    wait_until_async(WAIT, "the other central delivers", || async {
        downstream.delivered().iter().any(|d| d.central == survivor_id)
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover: holder killed -> the other central delivers in {takeover:?}");
    assert!(takeover < TAKEOVER_BOUND, "takeover took {takeover:?}");
    assert!(delivered_at_kill < acknowledged.len(), "the kill landed before the backlog was done");

    post_alternating([&survivor.client(), &survivor.client()], "after", 10, &mut acknowledged).await;
    wait_all_delivered(&downstream, &acknowledged).await;
    let deliverers = downstream.deliverers();
    let by_both = deliverers.values().filter(|by| by.len() > 1).count();
    eprintln!("takeover: {by_both} message(s) delivered by both centrals (the killed one's uncommitted)");
    assert!(by_both <= MAX_REPEATS_PER_CRASH, "{by_both} repeats");
    assert!(deliverers.values().all(|by| by.len() <= 2), "no message more than once per central");
    // After the takeover the survivor delivers in queue order, from where the cursor was.
    assert_continues_in_order(&downstream, survivor_id, &acknowledged);
    let text = survivor.client().metrics().await;
    assert_eq!(route_mode_metric(&text, "forward"), 1.0);
}

/// CONTRACT 4.5: the delivering central frozen mid-delivery (SIGSTOP) for longer than the lease's
/// TTL loses the route to the other central, and once it runs again it sends nothing more: its
/// lease ran out by its own clock, whatever its renewal task has or has not noticed yet. The
/// message it had in flight is delivered again by the new holder, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_holder_sends_nothing_once_its_lease_ran_out() {
    let database = TestDatabase::create().await;
    let downstream = Downstream::start().await;
    let mut a = start_central(&database, "hq-a", &downstream).await;
    let mut b = start_central(&database, "hq-b", &downstream).await;
    let mut acknowledged = BTreeMap::new();
    post_alternating([&a.client(), &b.client()], "warm", 10, &mut acknowledged).await;
    wait_all_delivered(&downstream, &acknowledged).await;
    let holder_id = assert_once_by_one_central(&downstream);
    let (holder, survivor) = if holder_id == "hq-a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let survivor_id = if holder_id == "hq-a" { "hq-b" } else { "hq-a" };

    // Slow answers, so the holder is always waiting on one when it is frozen.
    downstream.set_delay(Duration::from_millis(200));
    post_backlog(&survivor.client(), 200, &mut acknowledged).await;
    let before = downstream.arrivals_from(&holder_id).len();
    wait_until_async(WAIT, "the holder is delivering the backlog", || async {
        downstream.arrivals_from(&holder_id).len() >= before + 3
    })
    .await;
    holder.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen_at = Instant::now();
    wait_until_async(WAIT, "the other central takes the route over", || async {
        !downstream.arrivals_from(survivor_id).is_empty()
    })
    .await;
    eprintln!("frozen holder: the other central delivers {:?} after the freeze", frozen_at.elapsed());
    // The frozen holder's lease has ended by its own clock too (LEASE_TTL - LEASE_RENEW_INTERVAL
    // after its last renewal, which came before the freeze); let the new holder get ahead.
    wait_until_async(WAIT, "the new holder gets ahead", || async {
        downstream.arrivals_from(survivor_id).len() >= 5
    })
    .await;

    let resumed_at = Instant::now();
    holder.signal(nix::sys::signal::Signal::SIGCONT);
    // Time for a holder that still believed its lease to answer its buffered response and send
    // the next message (a few ms), many times over.
    let seen = downstream.arrivals_from(survivor_id).len();
    wait_until_async(WAIT, "the new holder delivers on after the resume", || async {
        downstream.arrivals_from(survivor_id).len() >= seen + 10
    })
    .await;
    let after_resume = downstream.arrivals_from(&holder_id).into_iter().filter(|at| *at > resumed_at).count();
    assert_eq!(after_resume, 0, "the resumed holder sent {after_resume} request(s) after its lease ran out");

    downstream.set_delay(Duration::ZERO);
    wait_all_delivered(&downstream, &acknowledged).await;
    assert_continues_in_order(&downstream, survivor_id, &acknowledged);
    assert!(
        holder.log().contains("lease ran out"),
        "the resumed holder says why it stopped:\n{}",
        holder.log_tail(40)
    );
}
