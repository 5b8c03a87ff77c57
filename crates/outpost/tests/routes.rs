//! Routes against the real binary and a downstream service in the test process (CONTRACT sections
//! 3 and 4): delivery with the contract's headers in queue order; an outage (refused, hanging,
//! 503) switches the route to `store` and nothing is lost or sent meanwhile; `forward` delivers
//! everything in order; poison and exhausted messages end in `/v1/failed` while the rest flows,
//! and a resubmit delivers them again with their original id; `auto_forward`; kill -9 during
//! delivery skips nothing; the mode survives restarts; fan-out to two routes; routes on a central;
//! messages past `limits.message_ttl` fail as `expired`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use reqwest::Method;
use serde_json::Value;
use testkit::{metrics, wait_until_async, Client, Node};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
/// How long a route may take to show what a test waits for.
const WAIT: Duration = Duration::from_secs(30);
/// The route task's bound on deliveries beyond its committed cursor (MAX_UNCOMMITTED_DELIVERIES),
/// plus the one in flight: the most repeats one crash may cause.
const MAX_REPEATS_PER_CRASH: usize = 64 + 1;

// ---------------------------------------------------------------------------------------------
// A downstream service in the test process.
// ---------------------------------------------------------------------------------------------

/// How the downstream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// 200 (or the status chosen for the payload).
    Accept,
    /// Never answers (the route's timeout fires).
    Hang,
    /// 503 to everything.
    Unavailable,
    /// Holds each request until [`Downstream::release`], then answers this status.
    Gate(u16),
}

/// One request the downstream received.
#[derive(Clone, Debug)]
struct Delivery {
    status: u16,
    message_id: String,
    idempotency_key: String,
    queue: String,
    origin: String,
    seq: u64,
    content_type: String,
    body: Vec<u8>,
}

struct DownstreamState {
    behaviour: Behaviour,
    /// Payloads answered with a chosen status (e.g. 400 for poison).
    status_for_payload: HashMap<Vec<u8>, u16>,
    log: Vec<Delivery>,
}

struct Shared {
    state: Mutex<DownstreamState>,
    /// Wakes hanging requests (behaviour change or stop).
    release: Notify,
}

/// An HTTP service on 127.0.0.1 that records every request. It can be stopped (connections are
/// refused) and started again on the same port.
struct Downstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Downstream {
    async fn start() -> Downstream {
        let shared = Arc::new(Shared {
            state: Mutex::new(DownstreamState {
                behaviour: Behaviour::Accept,
                status_for_payload: HashMap::new(),
                log: Vec::new(),
            }),
            release: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut downstream = Downstream { addr, shared, server: None };
        downstream.serve(listener);
        downstream
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new().route("/in", axum::routing::post(receive)).with_state(self.shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
    }

    fn url(&self) -> String {
        format!("http://{}/in", self.addr)
    }

    fn set(&self, behaviour: Behaviour) {
        self.shared.state.lock().unwrap().behaviour = behaviour;
        self.shared.release.notify_waiters();
    }

    /// Lets the requests held by [`Behaviour::Gate`] (and [`Behaviour::Hang`]) answer.
    fn release(&self) {
        self.shared.release.notify_waiters();
    }

    fn answer(&self, payload: &[u8], status: Option<u16>) {
        let mut state = self.shared.state.lock().unwrap();
        match status {
            Some(status) => state.status_for_payload.insert(payload.to_vec(), status),
            None => state.status_for_payload.remove(payload),
        };
    }

    /// Stops listening: connections are refused until [`Downstream::restart`].
    async fn stop(&mut self) {
        let (stop, mut task) = self.server.take().expect("the downstream is running");
        let _ = stop.send(());
        self.shared.release.notify_waiters();
        if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
            task.abort();
        }
    }

    async fn restart(&mut self) {
        assert!(self.server.is_none(), "stop the downstream first");
        let listener =
            tokio::net::TcpListener::bind(self.addr).await.expect("bind the downstream's port again");
        self.serve(listener);
    }

    fn log(&self) -> Vec<Delivery> {
        self.shared.state.lock().unwrap().log.clone()
    }

    /// The requests answered with 2xx, in arrival order.
    fn delivered(&self) -> Vec<Delivery> {
        self.log().into_iter().filter(|d| (200..300).contains(&d.status)).collect()
    }

    fn delivered_count(&self) -> usize {
        self.shared.state.lock().unwrap().log.iter().filter(|d| (200..300).contains(&d.status)).count()
    }

    /// Distinct message ids delivered.
    fn delivered_ids(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.delivered()
            .into_iter()
            .filter(|d| seen.insert(d.message_id.clone()))
            .map(|d| d.message_id)
            .collect()
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (behaviour, status) = {
        let state = shared.state.lock().unwrap();
        let status = match state.behaviour {
            Behaviour::Accept => state.status_for_payload.get(&body[..]).copied().unwrap_or(200),
            Behaviour::Unavailable => 503,
            Behaviour::Hang => 0,
            Behaviour::Gate(status) => status,
        };
        (state.behaviour, status)
    };
    // Registered before the request is logged: a release the test sends once it sees the request
    // in the log reaches it.
    let released = shared.release.notified();
    tokio::pin!(released);
    released.as_mut().enable();
    let delivery = Delivery {
        status,
        message_id: header("outpost-message-id"),
        idempotency_key: header("idempotency-key"),
        queue: header("outpost-queue"),
        origin: header("outpost-origin"),
        seq: header("outpost-seq").parse().unwrap_or(0),
        content_type: header("content-type"),
        body: body.to_vec(),
    };
    shared.state.lock().unwrap().log.push(delivery);
    match behaviour {
        Behaviour::Hang => {
            let _ = tokio::time::timeout(Duration::from_secs(60), released).await;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        Behaviour::Gate(_) => {
            let _ = tokio::time::timeout(Duration::from_secs(60), released).await;
        }
        Behaviour::Accept | Behaviour::Unavailable => {}
    }
    StatusCode::from_u16(status).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// A route section: fast retries, a short timeout.
fn route_toml(name: &str, queue: &str, urls: &[String], extra: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    format!(
        r#"
[[route]]
name = "{name}"
queue = "{queue}"
urls = [{urls}]
timeout = "500ms"
max_attempts = 3
retry_initial = "20ms"
retry_max = "100ms"
{extra}
"#,
        urls = urls.join(", ")
    )
}

async fn start_edge(config: &str) -> Node {
    Node::builder(OUTPOST).config(&format!("node_id = \"edge-1\"\n{config}")).start().await
}

async fn routes(client: &Client) -> BTreeMap<String, Value> {
    let response = client.get("/v1/routes").await.unwrap();
    response.expect_status(200);
    let list = response.json();
    list.as_array()
        .unwrap_or_else(|| panic!("GET /v1/routes is not a list: {list}"))
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

async fn route(client: &Client, name: &str) -> Value {
    routes(client).await.remove(name).unwrap_or_else(|| panic!("no route {name} in GET /v1/routes"))
}

async fn wait_mode(client: &Client, name: &str, mode: &str) -> Value {
    wait_until_async(WAIT, &format!("route {name} in {mode} mode"), || async {
        route(client, name).await["mode"] == mode
    })
    .await;
    route(client, name).await
}

/// The backlog counts from the durable cursor, which follows the deliveries within a commit.
async fn wait_backlog(client: &Client, name: &str, backlog: u64) {
    wait_until_async(WAIT, &format!("route {name} with a backlog of {backlog}"), || async {
        route(client, name).await["backlog"] == backlog
    })
    .await;
}

async fn switch(client: &Client, name: &str, mode: &str) -> Value {
    let response = client.post(&format!("/v1/routes/{name}/{mode}"), None, "").await.unwrap();
    response.expect_status(200);
    response.json()
}

/// A second route on the same queue, named `witness`, always in `forward`, to its own downstream.
/// Once it has delivered a message, the node's routes have all been told of that message: a test
/// proving that a stored route sent nothing waits for the witness instead of sleeping.
fn witness_toml(witness: &Downstream) -> String {
    route_toml("witness", "orders", &[witness.url()], "")
}

async fn wait_delivered(downstream: &Downstream, count: usize) {
    wait_until_async(WAIT, &format!("{count} distinct messages delivered"), || async {
        downstream.delivered_ids().len() >= count
    })
    .await;
}

/// Posts `payloads` one by one; returns (id, seq) of each.
async fn post_all(client: &Client, queue: &str, payloads: &[String]) -> Vec<(String, u64)> {
    let mut accepted = Vec::new();
    for payload in payloads {
        let a = client
            .post_message_with(queue, payload.clone(), Some("text/plain"), None)
            .await
            .unwrap()
            .accepted();
        accepted.push((a.id, a.seq));
    }
    accepted
}

fn payloads(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

async fn failed(client: &Client, route: &str) -> Vec<Value> {
    let response = client.get(&format!("/v1/failed?route={route}&limit=100")).await.unwrap();
    response.expect_status(200);
    response.json().as_array().expect("GET /v1/failed is a list").clone()
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics::value(text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn outages_store_the_route_and_forward_delivers_everything_in_order() {
    let mut downstream = Downstream::start().await;
    let witness = Downstream::start().await;
    let config =
        format!("{}{}", route_toml("erp", "orders", &[downstream.url()], ""), witness_toml(&witness));
    let node = start_edge(&config).await;
    let client = node.client();

    let initial = route(&client, "erp").await;
    assert_eq!(initial["mode"], "forward", "{initial}");
    assert_eq!(initial["queue"], "orders");
    let mut keys: Vec<&str> = initial.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["backlog", "changed_by", "failed", "mode", "mode_since", "name", "queue", "reason"]);

    // Delivery with the contract's request shape.
    let mut all = payloads("m", 0..5);
    let mut accepted = post_all(&client, "orders", &all).await;
    wait_delivered(&downstream, 5).await;
    for (delivery, ((id, seq), payload)) in downstream.delivered().iter().zip(accepted.iter().zip(&all)) {
        assert_eq!(delivery.message_id, *id);
        assert_eq!(delivery.idempotency_key, *id, "Idempotency-Key is the message id");
        assert_eq!((delivery.queue.as_str(), delivery.origin.as_str()), ("orders", "edge-1"));
        assert_eq!(delivery.seq, *seq);
        assert_eq!(delivery.content_type, "text/plain");
        assert_eq!(delivery.body, payload.as_bytes());
    }

    // Three kinds of outage, each: the route stores, nothing is sent meanwhile, forward drains.
    for outage in ["refused", "hang", "503"] {
        match outage {
            "refused" => downstream.stop().await,
            "hang" => downstream.set(Behaviour::Hang),
            _ => downstream.set(Behaviour::Unavailable),
        }
        let batch = payloads(outage, 0..10);
        accepted.extend(post_all(&client, "orders", &batch).await);
        all.extend(batch);
        let stored = wait_mode(&client, "erp", "store").await;
        assert_eq!(stored["changed_by"], "auto:service_down", "{stored}");
        let reason = stored["reason"].as_str().unwrap();
        let class = match outage {
            "refused" => "connect",
            "hang" => "timeout",
            _ => "http:503",
        };
        assert!(reason.starts_with("service_down") && reason.contains(class), "{outage}: {reason}");
        assert!(reason.contains(&downstream.url()), "the reason names the endpoint: {reason}");

        // Fixed, but the route stays stored until an operator says forward.
        match outage {
            "refused" => downstream.restart().await,
            _ => downstream.set(Behaviour::Accept),
        }
        let requests_before = downstream.log().len();
        let more = payloads(&format!("{outage}-after"), 0..3);
        accepted.extend(post_all(&client, "orders", &more).await);
        all.extend(more);
        wait_delivered(&witness, all.len()).await;
        assert_eq!(downstream.log().len(), requests_before, "{outage}: nothing is sent in store mode");
        let stored = route(&client, "erp").await;
        let delivered_so_far = downstream.delivered_ids().len() as u64;
        assert_eq!(stored["backlog"].as_u64().unwrap(), all.len() as u64 - delivered_so_far, "{stored}");

        let forwarded = switch(&client, "erp", "forward").await;
        assert_eq!(
            (forwarded["mode"].as_str(), forwarded["changed_by"].as_str()),
            (Some("forward"), Some("operator"))
        );
        wait_delivered(&downstream, all.len()).await;
        wait_backlog(&client, "erp", 0).await;
    }

    // Everything arrived, in order, each once (a hung request counts as not delivered).
    let delivered = downstream.delivered();
    let bodies: Vec<&[u8]> = delivered.iter().map(|d| &d.body[..]).collect();
    let expected: Vec<&[u8]> = all.iter().map(|p| p.as_bytes()).collect();
    assert_eq!(bodies, expected);
    let ids: Vec<&str> = delivered.iter().map(|d| d.message_id.as_str()).collect();
    assert_eq!(ids, accepted.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>());

    let text = client.metrics().await;
    assert_eq!(metric(&text, "outpost_messages_delivered_total", &[("route", "erp")]), all.len() as f64);
    assert_eq!(metric(&text, "outpost_route_mode", &[("route", "erp"), ("mode", "forward")]), 1.0);
    assert_eq!(metric(&text, "outpost_route_mode", &[("route", "erp"), ("mode", "store")]), 0.0);
    assert_eq!(metric(&text, "outpost_failed_messages", &[("route", "erp")]), 0.0);
    // Delivered and released: the route was the queue's only reader.
    assert_eq!(client.queue("orders").await.unwrap().messages, 0);
}

#[tokio::test]
async fn poison_and_exhausted_messages_fail_while_the_rest_flows_and_resubmit_delivers_them_again() {
    let downstream = Downstream::start().await;
    let node = start_edge(&route_toml("erp", "orders", &[downstream.url()], "")).await;
    let client = node.client();
    downstream.answer(b"bad", Some(400)); // poison: fails at once
    downstream.answer(b"flaky", Some(500)); // neither class: retried, then failed

    let sent = ["a", "bad", "b", "flaky", "c"].map(String::from);
    let accepted = post_all(&client, "orders", &sent).await;
    wait_delivered(&downstream, 3).await;
    wait_until_async(WAIT, "two failed entries", || async { failed(&client, "erp").await.len() == 2 }).await;
    let bodies: Vec<Vec<u8>> = downstream.delivered().into_iter().map(|d| d.body).collect();
    assert_eq!(bodies, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], "the queue kept flowing, in order");
    let log = downstream.log();
    assert_eq!(log.iter().filter(|d| d.body == b"bad").count(), 1, "poison is not retried");
    assert_eq!(log.iter().filter(|d| d.body == b"flaky").count(), 3, "max_attempts = 3");

    let entries = failed(&client, "erp").await;
    let (poison, flaky) = (&entries[0], &entries[1]);
    let mut keys: Vec<&str> = poison.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempts",
            "first_failed_at",
            "id",
            "last_error",
            "last_failed_at",
            "message_id",
            "queue",
            "reason",
            "route",
            "seq"
        ]
    );
    assert_eq!(poison["message_id"], accepted[1].0.as_str());
    assert_eq!(
        (poison["route"].as_str(), poison["queue"].as_str(), poison["seq"].as_u64()),
        (Some("erp"), Some("orders"), Some(2))
    );
    assert_eq!((poison["reason"].as_str(), poison["attempts"].as_u64()), (Some("poison: http:400"), Some(1)));
    assert!(poison["last_error"].as_str().unwrap().contains("http:400 from http://"), "{poison}");
    assert_eq!(
        (flaky["reason"].as_str(), flaky["attempts"].as_u64()),
        (Some("max_attempts: http:500"), Some(3))
    );
    assert_eq!(flaky["message_id"], accepted[3].0.as_str());

    wait_backlog(&client, "erp", 0).await;
    let view = route(&client, "erp").await;
    assert_eq!(
        (view["failed"].as_u64(), view["backlog"].as_u64(), view["mode"].as_str()),
        (Some(2), Some(0), Some("forward"))
    );
    assert!(view["reason"].as_str().unwrap().starts_with("max_attempts: http:500"), "{view}");
    let text = client.metrics().await;
    assert_eq!(metric(&text, "outpost_failed_messages", &[("route", "erp")]), 2.0);

    // The downstream is fixed; resubmit one by id: delivered again with its original id.
    downstream.answer(b"bad", None);
    let poison_id = poison["id"].as_i64().unwrap();
    let response = client.post(&format!("/v1/failed/{poison_id}/resubmit"), None, "").await.unwrap();
    response.expect_status(200);
    wait_delivered(&downstream, 4).await;
    let redelivered = downstream.delivered().pop().unwrap();
    assert_eq!(
        (redelivered.body.as_slice(), redelivered.message_id.as_str()),
        (&b"bad"[..], accepted[1].0.as_str())
    );
    assert_eq!(redelivered.idempotency_key, accepted[1].0);
    assert_eq!(redelivered.seq, 2, "Outpost-Seq is the message's original seq");
    wait_until_async(WAIT, "the delivered entry leaves the failed list", || async {
        failed(&client, "erp").await.len() == 1
    })
    .await;
    assert_eq!(route(&client, "erp").await["failed"], 1);

    // A resubmit that fails again comes back as failed, attempts added, first failure kept.
    let flaky_id = flaky["id"].as_i64().unwrap();
    let response =
        client.post("/v1/failed/resubmit", Some("application/json"), r#"{"route":"erp"}"#).await.unwrap();
    response.expect_status(200);
    assert_eq!(response.json()["ids"], serde_json::json!([flaky_id]));
    wait_until_async(WAIT, "the flaky message fails again", || async {
        failed(&client, "erp").await.first().is_some_and(|e| e["attempts"] == 6)
    })
    .await;
    let again = &failed(&client, "erp").await[0];
    assert_eq!(
        (again["id"].as_i64(), again["first_failed_at"].as_str()),
        (Some(flaky_id), flaky["first_failed_at"].as_str())
    );

    // Bulk by ids, after the fix.
    downstream.answer(b"flaky", None);
    let body = format!(r#"{{"ids":[{flaky_id}]}}"#);
    client.post("/v1/failed/resubmit", Some("application/json"), body).await.unwrap().expect_status(200);
    wait_delivered(&downstream, 5).await;
    assert_eq!(downstream.delivered().pop().unwrap().message_id, accepted[3].0);
    wait_until_async(WAIT, "an empty failed list", || async { failed(&client, "erp").await.is_empty() })
        .await;
    let text = client.metrics().await;
    assert_eq!(metric(&text, "outpost_failed_messages", &[("route", "erp")]), 0.0);
    assert_eq!(metric(&text, "outpost_messages_delivered_total", &[("route", "erp")]), 5.0);
}

#[tokio::test]
async fn discard_unknown_ids_unknown_routes_and_admin_auth() {
    let downstream = Downstream::start().await;
    let config = format!(
        "[auth]\nclient_tokens = [\"client\"]\nadmin_tokens = [\"admin\"]\n{}",
        route_toml("erp", "orders", &[downstream.url()], "")
    );
    let node = start_edge(&config).await;
    let admin = node.client().with_token("admin");
    let sender = node.client().with_token("client");
    downstream.answer(b"bad", Some(422));
    post_all(&sender, "orders", &["bad".to_string()]).await;
    wait_until_async(WAIT, "a failed entry", || async { failed(&admin, "erp").await.len() == 1 }).await;
    let id = failed(&admin, "erp").await[0]["id"].as_i64().unwrap();

    // Every endpoint needs an admin token.
    for (method, path) in [
        (Method::GET, "/v1/routes".to_string()),
        (Method::POST, "/v1/routes/erp/store".to_string()),
        (Method::POST, "/v1/routes/erp/forward".to_string()),
        (Method::GET, "/v1/failed".to_string()),
        (Method::POST, format!("/v1/failed/{id}/resubmit")),
        (Method::POST, "/v1/failed/resubmit".to_string()),
        (Method::DELETE, format!("/v1/failed/{id}")),
    ] {
        let anonymous = node.client().send(node.client().request(method.clone(), &path)).await.unwrap();
        assert_eq!(anonymous.expect_error(401), "unauthorized", "{method} {path}");
        let client_token = sender.send(sender.request(method.clone(), &path)).await.unwrap();
        assert_eq!(client_token.expect_error(403), "forbidden", "{method} {path}");
    }

    // Unknown routes and ids: 404 in the contract's error shape; malformed input: 400.
    let known_and_unknown = format!(r#"{{"ids":[{id},999999]}}"#);
    let cases: Vec<(Method, String, Option<&str>, u16)> = vec![
        (Method::POST, "/v1/routes/nope/store".into(), None, 404),
        (Method::POST, "/v1/routes/nope/forward".into(), None, 404),
        (Method::POST, "/v1/routes/bad%20name/forward".into(), None, 400),
        (Method::GET, "/v1/failed?route=nope".into(), None, 404),
        (Method::GET, "/v1/failed?limit=0".into(), None, 400),
        (Method::GET, "/v1/failed?color=red".into(), None, 400),
        (Method::POST, "/v1/failed/999999/resubmit".into(), None, 404),
        (Method::POST, "/v1/failed/abc/resubmit".into(), None, 404),
        (Method::DELETE, "/v1/failed/999999".into(), None, 404),
        (Method::POST, "/v1/failed/resubmit".into(), Some(r#"{"route":"nope"}"#), 404),
        (Method::POST, "/v1/failed/resubmit".into(), Some(r#"{"ids":[999999]}"#), 404),
        (Method::POST, "/v1/failed/resubmit".into(), Some(&known_and_unknown), 404),
        (Method::POST, "/v1/failed/resubmit".into(), Some(r#"{"ids":["x"]}"#), 400),
        (Method::POST, "/v1/failed/resubmit".into(), Some(r#"{"route":"erp","ids":[1]}"#), 400),
        (Method::POST, "/v1/failed/resubmit".into(), Some("not json"), 400),
        (Method::POST, "/v1/failed/resubmit".into(), None, 400),
        (Method::POST, "/v1/routes/erp/store".into(), Some(r#"{"reason":5}"#), 400),
    ];
    for (method, path, body, status) in cases {
        let mut request = admin.request(method.clone(), &path);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = admin.send(request).await.unwrap();
        response.expect_error(status);
    }
    // The all-or-nothing bulk resubmit above left the entry failed.
    assert_eq!(failed(&admin, "erp").await.len(), 1);

    // An operator's reason is kept.
    let response = admin
        .post("/v1/routes/erp/store", Some("application/json"), r#"{"reason":"ERP maintenance window"}"#)
        .await
        .unwrap();
    response.expect_status(200);
    assert_eq!(response.json()["reason"], "ERP maintenance window");

    // Discard: gone, and a second discard is 404.
    let response = admin.send(admin.request(Method::DELETE, &format!("/v1/failed/{id}"))).await.unwrap();
    response.expect_status(200);
    assert!(failed(&admin, "erp").await.is_empty());
    let again = admin.send(admin.request(Method::DELETE, &format!("/v1/failed/{id}"))).await.unwrap();
    again.expect_error(404);
    assert_eq!(route(&admin, "erp").await["failed"], 0);
}

/// Regression (issue 10): a resubmitted delivery that fails after the operator switched the route
/// to `store` with a reason used to overwrite the operator's reason with its own. The operator's
/// word stands: the route's task records its decisions only if nobody changed the route since the
/// attempt began. The race is forced each time (the downstream holds the request until the
/// operator's switch is done), 50 times.
#[tokio::test]
async fn an_operators_store_during_a_resubmitted_delivery_keeps_the_operators_reason() {
    let downstream = Downstream::start().await;
    downstream.set(Behaviour::Accept);
    downstream.answer(b"refused", Some(400));
    let node = start_edge(&route_toml("erp", "orders", &[downstream.url()], "")).await;
    let client = node.client();
    post_all(&client, "orders", &["refused".to_string()]).await;
    wait_until_async(WAIT, "the refused message failed", || async {
        failed(&client, "erp").await.len() == 1
    })
    .await;
    let id = failed(&client, "erp").await[0]["id"].clone();
    downstream.set(Behaviour::Gate(400));
    let failed_metric =
        || async { metric(&client.metrics().await, "outpost_failed_messages", &[("route", "erp")]) };

    for round in 0..50 {
        switch(&client, "erp", "forward").await;
        let requests_before = downstream.log().len();
        client.post(&format!("/v1/failed/{id}/resubmit"), None, "").await.unwrap().expect_status(200);
        // Refreshed before the resubmit answers: the entry is no longer failed.
        assert_eq!(failed_metric().await, 0.0, "round {round}");
        wait_until_async(WAIT, &format!("round {round}: the resubmitted delivery in flight"), || async {
            downstream.log().len() > requests_before
        })
        .await;

        let reason = format!("erp upgrade, round {round}");
        let body = serde_json::json!({ "reason": reason }).to_string();
        let stored = client.post("/v1/routes/erp/store", Some("application/json"), body).await.unwrap();
        stored.expect_status(200);
        downstream.release();
        // The task counts the failed entries again only after it recorded (or, now, declined to
        // record) its own reason.
        wait_until_async(WAIT, &format!("round {round}: the delivery failed again"), || async {
            failed_metric().await == 1.0
        })
        .await;
        let erp = route(&client, "erp").await;
        assert_eq!(
            (erp["mode"].as_str(), erp["changed_by"].as_str(), erp["reason"].as_str()),
            (Some("store"), Some("operator"), Some(reason.as_str())),
            "round {round}: the operator's store and reason stand: {erp}"
        );
    }
}

#[tokio::test]
async fn auto_forward_returns_the_route_to_forward_by_itself() {
    let mut downstream = Downstream::start().await;
    let extra = "auto_forward = true\nprobe_interval = \"200ms\"";
    let node = start_edge(&route_toml("erp", "orders", &[downstream.url()], extra)).await;
    let client = node.client();

    downstream.stop().await;
    let sent = payloads("p", 0..20);
    post_all(&client, "orders", &sent).await;
    let stored = wait_mode(&client, "erp", "store").await;
    assert_eq!(stored["changed_by"], "auto:service_down");
    // Probes while the service is still down keep the route stored (a failed probe says so in
    // the reason).
    let probed = testkit::wait::poll_until(WAIT, || async {
        let erp = route(&client, "erp").await;
        erp["reason"].as_str().is_some_and(|r| r.ends_with("(probe)")).then_some(erp)
    })
    .await
    .expect("a probe while the service is down");
    assert_eq!(
        (probed["mode"].as_str(), probed["changed_by"].as_str()),
        (Some("store"), Some("auto:service_down"))
    );

    downstream.restart().await;
    let forwarded = wait_mode(&client, "erp", "forward").await;
    assert_eq!(forwarded["changed_by"], "auto:probe", "{forwarded}");
    wait_delivered(&downstream, sent.len()).await;
    let bodies: Vec<Vec<u8>> = downstream.delivered().into_iter().map(|d| d.body).collect();
    assert_eq!(bodies, sent.iter().map(|p| p.as_bytes().to_vec()).collect::<Vec<_>>());
}

#[tokio::test]
async fn kill_9_during_delivery_skips_nothing_and_repeats_little() {
    let downstream = Downstream::start().await;
    let mut node = start_edge(&route_toml("erp", "orders", &[downstream.url()], "")).await;
    let client = node.client();
    // Stored first, so a large backlog is being delivered when the node dies.
    switch(&client, "erp", "store").await;
    const TOTAL: usize = 6000;
    for chunk in 0..(TOTAL / 1000) {
        let lines: Vec<String> = (0..1000).map(|i| format!("{{\"n\":{}}}", chunk * 1000 + i)).collect();
        client.post_batch("orders", &lines).await.unwrap().batch_accepted();
    }
    let ids: Vec<String> = client.read_all("orders").await.into_iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), TOTAL);

    const CRASHES: usize = 3;
    switch(&client, "erp", "forward").await;
    for crash in 1..=CRASHES {
        let target = crash * TOTAL / (CRASHES + 1);
        wait_until_async(WAIT, &format!("{target} deliveries before crash {crash}"), || async {
            downstream.delivered_count() >= target
        })
        .await;
        node.kill9();
        node.restart().await;
    }
    wait_delivered(&downstream, TOTAL).await;

    // Nothing skipped, first deliveries in queue order, few repeats.
    assert_eq!(downstream.delivered_ids(), ids, "every message delivered, first time in queue order");
    let delivered = downstream.delivered_count();
    let repeats = delivered - TOTAL;
    eprintln!("{CRASHES} kill -9 during delivery: {repeats} repeated deliveries of {TOTAL}");
    assert!(repeats <= CRASHES * MAX_REPEATS_PER_CRASH, "{repeats} repeats after {CRASHES} crashes");
    // After a crash the route resumes a little before where it was, never after.
    let seqs: Vec<u64> = downstream.delivered().iter().map(|d| d.seq).collect();
    for pair in seqs.windows(2) {
        assert!(pair[1] == pair[0] + 1 || pair[1] <= pair[0], "a skip from seq {} to {}", pair[0], pair[1]);
    }
    wait_until_async(WAIT, "the delivered backlog released", || async {
        client.queue("orders").await.is_some_and(|q| q.messages == 0)
    })
    .await;
}

#[tokio::test]
async fn the_mode_survives_restarts() {
    let downstream = Downstream::start().await;
    let witness = Downstream::start().await;
    let config =
        format!("{}{}", route_toml("erp", "orders", &[downstream.url()], ""), witness_toml(&witness));
    let mut node = start_edge(&config).await;
    let client = node.client();
    let stored = switch(&client, "erp", "store").await;
    assert_eq!((stored["mode"].as_str(), stored["changed_by"].as_str()), (Some("store"), Some("operator")));
    let text = client.metrics().await;
    assert_eq!(metric(&text, "outpost_route_mode", &[("route", "erp"), ("mode", "store")]), 1.0);
    post_all(&client, "orders", &payloads("x", 0..5)).await;

    node.kill9();
    node.restart().await;
    let after_kill = route(&client, "erp").await;
    assert_eq!(after_kill["mode"], "store");
    for key in ["mode_since", "changed_by", "reason"] {
        assert_eq!(after_kill[key], stored[key], "{key} after kill -9");
    }
    assert_eq!(after_kill["backlog"], 5);

    assert!(node.sigterm().await.success());
    node.restart().await;
    assert_eq!(route(&client, "erp").await["mode_since"], stored["mode_since"]);
    let text = client.metrics().await;
    assert_eq!(metric(&text, "outpost_route_mode", &[("route", "erp"), ("mode", "store")]), 1.0);
    // The stored route would send its backlog as its task starts; the witness delivering a message
    // posted after the restart shows the restarted node's routes are running.
    post_all(&client, "orders", &payloads("after-restart", 0..1)).await;
    wait_delivered(&witness, 6).await;
    assert!(downstream.log().is_empty(), "a stored route sends nothing after a restart either");

    switch(&client, "erp", "forward").await;
    wait_delivered(&downstream, 6).await;
    node.kill9();
    node.restart().await;
    let forwarded = route(&client, "erp").await;
    assert_eq!(
        (forwarded["mode"].as_str(), forwarded["changed_by"].as_str()),
        (Some("forward"), Some("operator"))
    );
}

#[tokio::test]
async fn two_routes_on_one_queue_each_get_every_message() {
    let first = Downstream::start().await;
    let second = Downstream::start().await;
    let config = format!(
        "{}{}",
        route_toml("erp", "orders", &[first.url()], ""),
        route_toml("audit", "orders", &[second.url()], "")
    );
    let node = start_edge(&config).await;
    let client = node.client();
    // One route stored: the other keeps flowing, and the queue keeps what the stored one lacks.
    switch(&client, "audit", "store").await;
    let sent = payloads("f", 0..50);
    post_all(&client, "orders", &sent).await;
    wait_delivered(&first, 50).await;
    assert!(second.log().is_empty());
    wait_backlog(&client, "erp", 0).await;
    assert_eq!(route(&client, "audit").await["backlog"], 50);
    assert_eq!(client.queue("orders").await.unwrap().messages, 50, "kept for the stored route");

    switch(&client, "audit", "forward").await;
    wait_delivered(&second, 50).await;
    for downstream in [&first, &second] {
        let bodies: Vec<Vec<u8>> = downstream.delivered().into_iter().map(|d| d.body).collect();
        assert_eq!(bodies, sent.iter().map(|p| p.as_bytes().to_vec()).collect::<Vec<_>>());
    }
    assert_eq!(first.delivered_ids(), second.delivered_ids(), "the same messages with the same ids");
    wait_until_async(WAIT, "the queue released once both routes passed", || async {
        client.queue("orders").await.is_some_and(|q| q.messages == 0)
    })
    .await;
}

#[tokio::test]
async fn routes_fail_over_across_urls_and_work_on_a_central() {
    let mut down = Downstream::start().await;
    let up = Downstream::start().await;
    down.stop().await;
    let config = format!("node_id = \"hq\"\n{}", route_toml("erp", "orders", &[down.url(), up.url()], ""));
    let node = Node::builder(OUTPOST).role("central").config(&config).start().await;
    let client = node.client();
    let sent = payloads("c", 0..10);
    post_all(&client, "orders", &sent).await;
    wait_delivered(&up, 10).await;
    assert_eq!(route(&client, "erp").await["mode"], "forward", "the second url answered: no outage");
    assert!(up.delivered().iter().all(|d| d.origin == "hq"));
}

#[tokio::test]
async fn messages_past_their_ttl_fail_as_expired_instead_of_being_sent() {
    let downstream = Downstream::start().await;
    let config = format!(
        "[limits]\nmessage_ttl = \"300ms\"\n{}",
        route_toml("erp", "orders", &[downstream.url()], "")
    );
    let node = start_edge(&config).await;
    let client = node.client();
    switch(&client, "erp", "store").await;
    let accepted = post_all(&client, "orders", &payloads("old", 0..3)).await;
    wait_until_async(WAIT, "the stored messages to pass their TTL", || async {
        client.queue("orders").await.is_some_and(|q| q.oldest_age_seconds >= 0.5)
    })
    .await;
    switch(&client, "erp", "forward").await;
    wait_until_async(WAIT, "three expired entries", || async { failed(&client, "erp").await.len() == 3 })
        .await;
    for (entry, (id, seq)) in failed(&client, "erp").await.iter().zip(&accepted) {
        assert_eq!(
            (entry["reason"].as_str(), entry["attempts"].as_u64()),
            (Some("expired"), Some(0)),
            "{entry}"
        );
        assert_eq!((entry["message_id"].as_str(), entry["seq"].as_u64()), (Some(id.as_str()), Some(*seq)));
    }
    assert!(downstream.log().is_empty(), "expired messages are not sent");

    // Fresh messages still flow; a resubmitted expired one is delivered (the operator chose to).
    post_all(&client, "orders", &payloads("new", 0..2)).await;
    wait_delivered(&downstream, 2).await;
    let body = format!(r#"{{"ids":[{}]}}"#, failed(&client, "erp").await[0]["id"]);
    client.post("/v1/failed/resubmit", Some("application/json"), body).await.unwrap().expect_status(200);
    wait_delivered(&downstream, 3).await;
    assert_eq!(downstream.delivered().pop().unwrap().message_id, accepted[0].0);
}

/// Figures for the report (release build):
/// `cargo test --release -p outpost --test routes -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_delivery_throughput() {
    let downstream = Downstream::start().await;
    let node = start_edge(&format!(
        "[limits]\nmax_batch_messages = 1000\n{}",
        route_toml("erp", "orders", &[downstream.url()], "")
    ))
    .await;
    let client = node.client();
    let line = format!("{{\"payload\":\"{}\"}}", "x".repeat(100));

    // Live: the route forwards while messages arrive.
    const LIVE: usize = 50_000;
    let started = Instant::now();
    for _ in 0..(LIVE / 1000) {
        client.post_batch("orders", &vec![line.clone(); 1000]).await.unwrap().batch_accepted();
    }
    let posted = started.elapsed();
    wait_until_async(Duration::from_secs(600), "live deliveries", || async {
        downstream.delivered_count() >= LIVE
    })
    .await;
    let live = started.elapsed();
    eprintln!(
        "live: {LIVE} messages posted in {posted:.2?}, all delivered after {live:.2?}: {:.0} messages/s",
        LIVE as f64 / live.as_secs_f64()
    );

    // A stored backlog of 100,000, then forward.
    const BACKLOG: usize = 100_000;
    switch(&client, "erp", "store").await;
    for _ in 0..(BACKLOG / 1000) {
        client.post_batch("orders", &vec![line.clone(); 1000]).await.unwrap().batch_accepted();
    }
    let before = downstream.delivered_count();
    let started = Instant::now();
    switch(&client, "erp", "forward").await;
    wait_until_async(Duration::from_secs(600), "the backlog delivered", || async {
        downstream.delivered_count() >= before + BACKLOG
    })
    .await;
    let drained = started.elapsed();
    eprintln!(
        "backlog: {BACKLOG} stored messages forwarded in {drained:.2?}: {:.0} messages/s",
        BACKLOG as f64 / drained.as_secs_f64()
    );
}
