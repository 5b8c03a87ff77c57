//! Pull consumers (CONTRACT section 9) against the real binary: lease, ack, nack (with a delay),
//! redelivery once the visibility ends; positions and leases survive kill -9; `max_deliveries`
//! makes a message failed (reason `max_deliveries`) and a resubmit gives it back to the consumer;
//! two consumers each get every message; storage is released only once every consumer and route
//! has a message, and a deleted consumer no longer holds it; on a cluster of two centrals on
//! PostgreSQL a consumer leased on one central is acknowledged on the other.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::{wait_until_async, Client, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const WAIT: Duration = Duration::from_secs(30);

async fn post(client: &Client, queue: &str, payloads: impl IntoIterator<Item = String>) {
    for payload in payloads {
        client.post_message(queue, payload).await.unwrap().accepted();
    }
}

/// `POST …/lease` with `body`; the leased messages (panics unless 200).
async fn lease(client: &Client, queue: &str, name: &str, body: Value) -> Vec<Value> {
    let response = client
        .post(
            &format!("/v1/queues/{queue}/consumers/{name}/lease"),
            Some("application/json"),
            body.to_string(),
        )
        .await
        .unwrap();
    response.expect_status(200);
    let answer = response.json();
    let messages = answer["messages"].as_array().unwrap_or_else(|| panic!("no messages in {answer}")).clone();
    for m in &messages {
        for field in
            ["id", "seq", "origin", "origin_seq", "content_type", "payload_base64", "accepted_at", "lease_id"]
        {
            assert!(m.get(field).is_some(), "leased message without {field}: {m}");
        }
    }
    messages
}

/// Leases again and again (every 100 ms, within [`WAIT`]) until what was leased altogether
/// satisfies `done`; returns it all.
async fn lease_until(
    client: &Client,
    queue: &str,
    name: &str,
    body: Value,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        got.extend(lease(client, queue, name, body.clone()).await);
        if done(&got) {
            return got;
        }
        assert!(tokio::time::Instant::now() < deadline, "leases never gave what was expected: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST …/ack` or `…/nack`; the answer (panics unless 200).
async fn settle(client: &Client, queue: &str, name: &str, what: &str, body: Value) -> Value {
    let response = client
        .post(
            &format!("/v1/queues/{queue}/consumers/{name}/{what}"),
            Some("application/json"),
            body.to_string(),
        )
        .await
        .unwrap();
    response.expect_status(200);
    response.json()
}

async fn ack(client: &Client, queue: &str, name: &str, leased: &[Value]) -> Value {
    let ids: Vec<&Value> = leased.iter().map(|m| &m["lease_id"]).collect();
    settle(client, queue, name, "ack", json!({ "lease_ids": ids })).await
}

async fn consumers(client: &Client, queue: &str) -> Vec<Value> {
    let response = client.get(&format!("/v1/queues/{queue}/consumers")).await.unwrap();
    response.expect_status(200);
    let list = response.json().as_array().unwrap().clone();
    for c in &list {
        let mut keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["created_at", "deliveries_max", "last_active_at", "leased", "name", "pending", "position"],
            "consumer fields: {c}"
        );
    }
    list
}

async fn consumer(client: &Client, queue: &str, name: &str) -> Value {
    consumers(client, queue)
        .await
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no consumer {name} of {queue}"))
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

/// The payload as sent: compared in base64, which [`b64`] makes of the expected text.
fn payload(message: &Value) -> String {
    message["payload_base64"].as_str().unwrap().to_string()
}

fn b64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn stored(client: &Client, queue: &str) -> u64 {
    client.queue(queue).await.map(|q| q.messages).unwrap_or(0)
}

async fn failed(client: &Client, query: &str) -> Vec<Value> {
    let response = client.get(&format!("/v1/failed{query}")).await.unwrap();
    response.expect_status(200);
    response.json().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_ack_nack_and_redelivery_after_the_visibility() {
    let node = Node::builder(BIN).role("edge").start().await;
    let client = node.client();
    post(&client, "q", (1..=5).map(|n| format!("m{n}"))).await;

    let first = lease(&client, "q", "app", json!({"max": 3, "visibility": "2s"})).await;
    assert_eq!(seqs(&first), [1, 2, 3]);
    assert_eq!(payload(&first[0]), b64("m1"));
    assert!(first.iter().all(|m| m["deliveries"] == 1));
    // Leased messages are invisible to the consumer: the next lease takes the rest.
    let second = lease(&client, "q", "app", json!({"max": 10, "visibility": "2s"})).await;
    assert_eq!(seqs(&second), [4, 5]);
    assert!(lease(&client, "q", "app", json!({})).await.is_empty());

    let answer = ack(&client, "q", "app", &first[..2]).await;
    assert_eq!(answer, json!({"acked": 2, "stale": []}));
    // Acknowledging again changes nothing.
    let answer = ack(&client, "q", "app", &first[..1]).await;
    assert_eq!(answer["acked"], 0);
    assert_eq!(answer["stale"], json!([first[0]["lease_id"]]));
    let view = consumer(&client, "q", "app").await;
    assert_eq!((view["position"].as_u64(), view["leased"].as_u64()), (Some(2), Some(3)), "{view}");

    // Given back without a delay: at once, delivered a second time.
    let answer = settle(&client, "q", "app", "nack", json!({"lease_ids": [second[0]["lease_id"]]})).await;
    assert_eq!(answer["nacked"], 1);
    let again = lease(&client, "q", "app", json!({"max": 10, "visibility": "1h"})).await;
    assert_eq!(seqs(&again), [4]);
    assert_eq!(again[0]["deliveries"], 2);
    assert_eq!(again[0]["id"], second[0]["id"]);
    // The first delivery's lease id no longer names it.
    let answer = settle(&client, "q", "app", "ack", json!({"lease_ids": [second[0]["lease_id"]]})).await;
    assert_eq!(answer["acked"], 0);
    ack(&client, "q", "app", &again).await;

    // Given back with a delay: not before it.
    settle(&client, "q", "app", "nack", json!({"lease_ids": [second[1]["lease_id"]], "delay": "3s"})).await;
    let view = consumer(&client, "q", "app").await;
    assert!(view["pending"].as_u64().unwrap() >= 1, "a delayed message is pending: {view}");
    assert!(seqs(&lease(&client, "q", "app", json!({"visibility": "1h"})).await).iter().all(|s| *s != 5));

    // Seq 3 was never acknowledged: it comes back once its 2 s visibility ends, then seq 5 after
    // its delay.
    let redelivered = lease_until(&client, "q", "app", json!({"visibility": "1h"}), |got| {
        seqs(got).into_iter().collect::<BTreeSet<u64>>() == BTreeSet::from([3, 5])
    })
    .await;
    assert!(redelivered.iter().all(|m| m["deliveries"] == 2), "{redelivered:?}");
    ack(&client, "q", "app", &redelivered).await;
    let view = consumer(&client, "q", "app").await;
    assert_eq!(view["position"], 5, "{view}");
    assert_eq!((view["leased"].as_u64(), view["pending"].as_u64()), (Some(0), Some(0)), "{view}");

    // Refusals.
    let path = "/v1/queues/q/consumers/app/lease";
    for body in
        [r#"{"max":0}"#, r#"{"max":1001}"#, r#"{"visibility":"13h"}"#, r#"{"max_deliveries":0}"#, "[1]"]
    {
        client.post(path, Some("application/json"), body).await.unwrap().expect_error(400);
    }
    client.get("/v1/queues/later/consumers").await.unwrap().expect_error(404);
    // A first lease may come before the queue exists: it creates the (empty) queue, and the
    // consumer gets the queue's first message.
    assert!(lease(&client, "later", "app", json!({})).await.is_empty());
    assert_eq!(consumer(&client, "later", "app").await["position"], 0);
    post(&client, "later", ["first".to_string()]).await;
    assert_eq!(seqs(&lease(&client, "later", "app", json!({})).await), [1]);
    client.post("/v1/queues/q/consumers/b%20d/lease", None, "").await.unwrap().expect_error(400);
    client
        .post("/v1/queues/q/consumers/ghost/ack", None, r#"{"lease_ids":[]}"#)
        .await
        .unwrap()
        .expect_error(404);
    client.post("/v1/queues/q/consumers/app/ack", None, r#"{"ids":[]}"#).await.unwrap().expect_error(400);
    client.get("/v1/queues/nope/consumers").await.unwrap().expect_error(404);
    client
        .post("/v1/queues/nope/consumers/app/ack", None, r#"{"lease_ids":[]}"#)
        .await
        .unwrap()
        .expect_error(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_and_leases_survive_kill_9() {
    let mut node = Node::builder(BIN).role("edge").start().await;
    let client = node.client();
    post(&client, "q", (1..=10).map(|n| format!("m{n}"))).await;
    let done = lease(&client, "q", "app", json!({"max": 4})).await;
    ack(&client, "q", "app", &done).await;
    let held = lease(&client, "q", "app", json!({"max": 3, "visibility": "2s"})).await;
    assert_eq!(seqs(&held), [5, 6, 7]);

    node.kill9();
    node.restart().await;
    let client = node.client();
    let view = consumer(&client, "q", "app").await;
    assert_eq!(view["position"], 4, "{view}");
    // What was leased before the crash is still leased; the rest comes next.
    let next = lease(&client, "q", "app", json!({"max": 100})).await;
    assert_eq!(seqs(&next), [8, 9, 10]);
    ack(&client, "q", "app", &next).await;
    // ... and comes back once its visibility ends, a second delivery.
    let back = lease_until(&client, "q", "app", json!({"max": 100}), |got| got.len() >= 3).await;
    assert_eq!(seqs(&back), [5, 6, 7]);
    assert!(back.iter().all(|m| m["deliveries"] == 2));
    ack(&client, "q", "app", &back).await;
    assert_eq!(consumer(&client, "q", "app").await["position"], 10);
    // The consumer was the queue's only reader: everything is released.
    assert_eq!(stored(&client, "q").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_makes_a_message_failed_and_a_resubmit_gives_it_back() {
    let node = Node::builder(BIN).role("edge").start().await;
    let client = node.client();
    post(&client, "q", ["poison-1".to_string(), "poison-2".to_string(), "fine".to_string()]).await;
    let body = json!({"max": 2, "max_deliveries": 2});
    for delivery in 1..=2 {
        let got = lease(&client, "q", "app", body.clone()).await;
        assert_eq!(seqs(&got), [1, 2]);
        assert!(got.iter().all(|m| m["deliveries"] == delivery));
        let ids: Vec<&Value> = got.iter().map(|m| &m["lease_id"]).collect();
        settle(&client, "q", "app", "nack", json!({ "lease_ids": ids })).await;
    }
    // Delivered twice already: both fail, and the lease goes on with the next message.
    let got = lease(&client, "q", "app", body.clone()).await;
    assert_eq!(seqs(&got), [3]);
    ack(&client, "q", "app", &got).await;
    assert_eq!(consumer(&client, "q", "app").await["position"], 3);

    let entries = failed(&client, "?route=consumer:app").await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    for (entry, seq) in entries.iter().zip([1, 2]) {
        assert_eq!(entry["seq"], seq);
        assert_eq!(entry["reason"], "max_deliveries");
        assert_eq!(entry["route"], "consumer:app");
        assert_eq!(entry["consumer"], "app");
        assert_eq!(entry["queue"], "q");
        assert_eq!(entry["attempts"], 2);
    }
    assert_eq!(failed(&client, "").await.len(), 2);
    assert_eq!(failed(&client, "?route=consumer%3Aapp").await.len(), 2);
    wait_until_async(WAIT, "the failed gauge counts the consumer's entries", || async {
        client.metrics().await.contains("outpost_failed_messages{route=\"consumer:app\"} 2")
    })
    .await;

    // One resubmitted: the consumer's next lease gets it, with its original id.
    let id = entries[0]["id"].as_i64().unwrap();
    client.post(&format!("/v1/failed/{id}/resubmit"), None, "").await.unwrap().expect_status(200);
    let back = lease(&client, "q", "app", json!({})).await;
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0]["id"], entries[0]["message_id"]);
    assert_eq!(back[0]["seq"], 1);
    assert_eq!(payload(&back[0]), b64("poison-1"));
    ack(&client, "q", "app", &back).await;
    let left = failed(&client, "").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["seq"], 2);
    wait_until_async(WAIT, "the failed gauge follows", || async {
        client.metrics().await.contains("outpost_failed_messages{route=\"consumer:app\"} 1")
    })
    .await;

    // The other by the consumer's route, then it fails again: back in the list.
    let answer = client
        .post("/v1/failed/resubmit", Some("application/json"), r#"{"route":"consumer:app"}"#)
        .await
        .unwrap();
    answer.expect_status(200);
    for _ in 0..2 {
        let got = lease(&client, "q", "app", json!({"max_deliveries": 2})).await;
        assert_eq!(seqs(&got), [2]);
        let ids: Vec<&Value> = got.iter().map(|m| &m["lease_id"]).collect();
        settle(&client, "q", "app", "nack", json!({ "lease_ids": ids })).await;
    }
    assert!(lease(&client, "q", "app", json!({"max_deliveries": 2})).await.is_empty());
    let left = failed(&client, "").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!((left[0]["seq"].as_u64(), left[0]["reason"].as_str()), (Some(2), Some("max_deliveries")));
    assert_eq!(left[0]["attempts"], 4);
}

/// A downstream that answers 200 to everything, on a port chosen before it starts.
async fn accepting_downstream(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_each_get_every_message_and_storage_waits_for_every_reader() {
    let port = testkit::free_port();
    let config = format!(
        r#"
[[route]]
name = "hook"
queue = "q"
urls = ["http://127.0.0.1:{port}/"]
retry_initial = "100ms"
retry_max = "200ms"
"#
    );
    let node = Node::builder(BIN).role("edge").config(&config).start().await;
    let client = node.client();
    post(&client, "q", (1..=6).map(|n| format!("m{n}"))).await;
    // The downstream is down: the route switches to store and holds every message.
    wait_until_async(WAIT, "the route is stored", || async {
        let routes = client.get("/v1/routes").await.unwrap().json();
        routes[0]["mode"] == "store"
    })
    .await;

    let a = lease(&client, "q", "a", json!({"max": 100})).await;
    let b = lease(&client, "q", "b", json!({"max": 100})).await;
    assert_eq!(seqs(&a), [1, 2, 3, 4, 5, 6]);
    assert_eq!(seqs(&b), [1, 2, 3, 4, 5, 6]);
    ack(&client, "q", "a", &a).await;
    assert_eq!(stored(&client, "q").await, 6, "b and the route still need them");
    ack(&client, "q", "b", &b).await;
    assert_eq!(stored(&client, "q").await, 6, "the route still needs them");

    let _downstream = accepting_downstream(port).await;
    client.post("/v1/routes/hook/forward", None, "").await.unwrap().expect_status(200);
    wait_until_async(WAIT, "every reader has every message: all released", || async {
        stored(&client, "q").await == 0
    })
    .await;

    // A consumer that stops consuming holds storage until it is deleted.
    post(&client, "q", (7..=9).map(|n| format!("m{n}"))).await;
    let a = lease(&client, "q", "a", json!({"max": 100})).await;
    assert_eq!(seqs(&a), [7, 8, 9]);
    ack(&client, "q", "a", &a).await;
    wait_until_async(WAIT, "the route delivered the new messages", || async {
        let routes = client.get("/v1/routes").await.unwrap().json();
        routes[0]["backlog"] == 0
    })
    .await;
    assert_eq!(stored(&client, "q").await, 3, "b has not taken them");
    let listed: Vec<String> =
        consumers(&client, "q").await.iter().map(|c| c["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, ["a", "b"]);
    let view = consumer(&client, "q", "b").await;
    assert_eq!((view["position"].as_u64(), view["pending"].as_u64()), (Some(6), Some(3)), "{view}");

    let response =
        client.send(client.request(reqwest::Method::DELETE, "/v1/queues/q/consumers/b")).await.unwrap();
    response.expect_status(200);
    assert_eq!(stored(&client, "q").await, 0, "a deleted consumer no longer holds storage");
    let response =
        client.send(client.request(reqwest::Method::DELETE, "/v1/queues/q/consumers/b")).await.unwrap();
    response.expect_error(404);
    let listed: Vec<String> =
        consumers(&client, "q").await.iter().map(|c| c["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, ["a"]);
    // A new consumer of the same name starts at the oldest message still stored.
    post(&client, "q", ["m10".to_string()]).await;
    let b = lease(&client, "q", "b", json!({"max": 100})).await;
    assert_eq!(seqs(&b), [10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_a_cluster_works_whichever_central_it_talks_to() {
    let database = testkit::postgres::TestDatabase::create().await;
    let start = |id: &'static str| {
        Node::builder(BIN).role("central").args(["--node-id", id, "--postgres", &database.url]).start()
    };
    let a = start("central-a").await;
    let b = start("central-b").await;
    let (ca, cb) = (a.client(), b.client());
    post(&ca, "q", (1..=4).map(|n| format!("m{n}"))).await;

    // Leased on A, acknowledged on B.
    let got = lease(&ca, "q", "app", json!({"max": 100, "visibility": "2s"})).await;
    assert_eq!(seqs(&got), [1, 2, 3, 4]);
    assert_eq!(ack(&cb, "q", "app", &got[..3]).await["acked"], 3);
    let view = consumer(&cb, "q", "app").await;
    assert_eq!((view["position"].as_u64(), view["leased"].as_u64()), (Some(3), Some(1)), "{view}");
    // Still leased on B too; once its visibility ends B delivers it again.
    assert!(lease(&cb, "q", "app", json!({})).await.is_empty());
    let again = lease_until(&cb, "q", "app", json!({"max_deliveries": 2}), |got| !got.is_empty()).await;
    assert_eq!(seqs(&again), [4]);
    assert_eq!(again[0]["deliveries"], 2);
    // Given back on A, then failed on B after its second delivery.
    settle(&ca, "q", "app", "nack", json!({"lease_ids": [again[0]["lease_id"]]})).await;
    assert!(lease(&cb, "q", "app", json!({"max_deliveries": 2})).await.is_empty());
    let entries = failed(&ca, "?route=consumer:app").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        (entries[0]["seq"].as_u64(), entries[0]["reason"].as_str()),
        (Some(4), Some("max_deliveries"))
    );
    assert_eq!(consumer(&ca, "q", "app").await["position"], 4);
    // The consumer is the queue's only reader: everything it finished is released, cluster-wide.
    wait_until_async(WAIT, "B sees the queue released", || async { stored(&cb, "q").await == 0 }).await;

    // Resubmitted on A, leased and acknowledged on B.
    let id = entries[0]["id"].as_i64().unwrap();
    ca.post(&format!("/v1/failed/{id}/resubmit"), None, "").await.unwrap().expect_status(200);
    let back = lease(&cb, "q", "app", json!({})).await;
    assert_eq!(seqs(&back), [4]);
    ack(&cb, "q", "app", &back).await;
    assert!(failed(&ca, "").await.is_empty());

    // Two consumers each get every message, whichever central they use; a deleted one lets go.
    post(&cb, "q", (5..=7).map(|n| format!("m{n}"))).await;
    let x = lease(&ca, "q", "app", json!({"max": 100})).await;
    let y = lease(&cb, "q", "other", json!({"max": 100})).await;
    assert_eq!(seqs(&x), [5, 6, 7]);
    assert_eq!(seqs(&y), [5, 6, 7]);
    ack(&cb, "q", "app", &x).await;
    assert_eq!(stored(&cb, "q").await, 3, "`other` still holds them");
    let response =
        ca.send(ca.request(reqwest::Method::DELETE, "/v1/queues/q/consumers/other")).await.unwrap();
    response.expect_status(200);
    wait_until_async(WAIT, "both centrals see the queue released", || async {
        stored(&ca, "q").await == 0 && stored(&cb, "q").await == 0
    })
    .await;
    let names: Vec<Value> = consumers(&cb, "q").await.iter().map(|c| c["name"].clone()).collect();
    assert_eq!(names, [json!("app")]);

    // A first lease on one central creates the queue for the cluster; a post on the other comes
    // to the consumer.
    assert!(lease(&cb, "later", "app", json!({})).await.is_empty());
    post(&ca, "later", ["first".to_string()]).await;
    let got = lease(&ca, "later", "app", json!({})).await;
    assert_eq!(seqs(&got), [1]);
    assert_eq!(payload(&got[0]), b64("first"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_edge_storage_also_waits_for_the_forwarder() {
    let mut central = Node::builder(BIN).role("central").args(["--node-id", "hq"]).start().await;
    central.sigterm().await;
    let config = r#"
[connectivity]
ping_interval = "1s"
offline_probe_interval = "1s"
failed_transition_wait = "1s"

[failover]
connect_timeout = "1s"
"#;
    let edge = Node::builder(BIN)
        .role("edge")
        .args(["--node-id", "e1", "--central", &central.url()])
        .config(config)
        .start()
        .await;
    let client = edge.client();
    post(&client, "q", (1..=5).map(|n| format!("m{n}"))).await;
    let got = lease(&client, "q", "app", json!({"max": 100})).await;
    assert_eq!(seqs(&got), [1, 2, 3, 4, 5]);
    ack(&client, "q", "app", &got).await;
    assert_eq!(stored(&client, "q").await, 5, "the central does not have them yet");

    central.restart().await;
    wait_until_async(WAIT, "forwarded and consumed: released at the edge", || async {
        stored(&client, "q").await == 0
    })
    .await;
    assert_eq!(central.client().read_all("q").await.len(), 5);
}

async fn ctl(args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(BIN).arg("ctl").args(args).output().await.unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_consumers_shows_every_queue_or_one() {
    let node = Node::builder(BIN).role("edge").start().await;
    let client = node.client();
    let url = node.url();
    let (code, stdout, stderr) = ctl(&["--url", &url, "consumers"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("no pull consumers"), "{stdout}");

    post(&client, "orders", (1..=3).map(|n| format!("o{n}"))).await;
    post(&client, "prices", ["p1".to_string()]).await;
    lease(&client, "orders", "audit", json!({"max": 2})).await;
    let got = lease(&client, "orders", "erp", json!({"max": 1})).await;
    ack(&client, "orders", "erp", &got).await;
    lease(&client, "prices", "shop", json!({})).await;

    let (code, stdout, stderr) = ctl(&["--url", &url, "consumers"]).await;
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("QUEUE") && lines[0].contains("POSITION"), "{stdout}");
    assert_eq!(lines.len(), 4, "{stdout}");
    let columns = |line: &str| line.split_whitespace().take(5).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(columns(lines[1]), ["orders", "audit", "0", "2", "1"], "{stdout}");
    assert_eq!(columns(lines[2]), ["orders", "erp", "1", "0", "2"], "{stdout}");
    assert_eq!(columns(lines[3]), ["prices", "shop", "0", "1", "0"], "{stdout}");

    let (code, stdout, stderr) = ctl(&["--url", &url, "consumers", "prices", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1, "{json}");
    assert_eq!(
        (&json[0]["queue"], &json[0]["name"], &json[0]["leased"]),
        (&json!("prices"), &json!("shop"), &json!(1))
    );

    let (code, _, stderr) = ctl(&["--url", &url, "consumers", "no-such-queue"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("HTTP 404"), "{stderr}");
    let (code, _, _) = ctl(&["--url", &url, "consumers", "bad name"]).await;
    assert_eq!(code, 2);
    // A consumer's failed entries are named `consumer:<name>`.
    let (code, stdout, stderr) = ctl(&["--url", &url, "failed", "--route", "consumer:erp"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("no failed messages"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_on_an_edge_reads_its_downlink_through_a_consumer() {
    let central = Node::builder(BIN).role("central").args(["--node-id", "hq"]).start().await;
    let config = r#"
[connectivity]
ping_interval = "1s"
offline_probe_interval = "1s"
failed_transition_wait = "1s"
"#;
    let edge = Node::builder(BIN)
        .role("edge")
        .args(["--node-id", "e1", "--central", &central.url()])
        .config(config)
        .start()
        .await;
    let client = edge.client();
    // In place before anything arrives (the forwarder passes downlink messages at once, so they
    // would be released with no reader holding them).
    assert!(lease(&client, "prices", "shop", json!({})).await.is_empty());
    for n in 1..=3 {
        central
            .client()
            .post("/v1/edges/e1/queues/prices/messages", Some("text/plain"), format!("price-{n}"))
            .await
            .unwrap()
            .expect_status(202);
    }
    let got = lease_until(&client, "prices", "shop", json!({}), |got| got.len() >= 3).await;
    assert_eq!(got.iter().map(payload).collect::<Vec<_>>(), ["price-1", "price-2", "price-3"].map(b64));
    assert!(got.iter().all(|m| m["origin"] == "~central"), "{got:?}");
    ack(&client, "prices", "shop", &got).await;
    wait_until_async(WAIT, "read by the consumer and passed by the forwarder: released", || async {
        stored(&client, "prices").await == 0
    })
    .await;
}
