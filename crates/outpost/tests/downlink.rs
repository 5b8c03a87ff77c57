//! Downlink at the central with the real binary (CONTRACT section 9): posting for one edge (single
//! and NDJSON batch, idempotency keys, limits), broadcast, what waits per edge in
//! `GET /v1/edges/{id}/downlink` and `GET /v1/edges`, durability across kill -9, and the TTL
//! turning a waiting message into a failed one with its edge id.

use std::time::Duration;

use serde_json::Value;
use testkit::{wait_until_async, Client, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const DEADLINE: Duration = Duration::from_secs(20);

fn central_config(extra: &str) -> String {
    format!(
        r#"
[[edge]]
id = "store-1"
token = "t1"

[[edge]]
id = "store-2"
token = "t2"

[limits]
max_message_bytes = 1000
{extra}
"#
    )
}

async fn start_central(extra: &str) -> Node {
    Node::builder(BIN).role("central").arg("--node-id").arg("hq").config(&central_config(extra)).start().await
}

async fn post_downlink(client: &Client, path: &str, payload: &[u8], key: Option<&str>) -> testkit::Response {
    let mut request = client
        .request(reqwest::Method::POST, path)
        .header("content-type", "text/plain")
        .body(payload.to_vec());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    client.send(request).await.expect("post downlink")
}

async fn downlink_of(client: &Client, edge: &str) -> Vec<Value> {
    let response = client.get(&format!("/v1/edges/{edge}/downlink")).await.unwrap();
    response.expect_status(200);
    response.json().as_array().cloned().unwrap_or_default()
}

async fn pending_in_edges(client: &Client) -> Vec<(String, u64)> {
    let edges = client.get("/v1/edges").await.unwrap().json();
    edges
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (e["id"].as_str().unwrap().to_string(), e["downlink_pending"].as_u64().expect("downlink_pending"))
        })
        .collect()
}

#[tokio::test]
async fn downlink_posts_are_durable_idempotent_bounded_and_listed_per_edge() {
    let mut central = start_central("").await;
    let client = central.client();

    // One message, then the same key again: 200 with the original id and seq, nothing stored twice.
    let first = post_downlink(&client, "/v1/edges/store-1/queues/prices/messages", b"p-1", Some("k-1")).await;
    first.expect_status(202);
    let first = first.json();
    assert_eq!(
        (first["edge"].as_str(), first["queue"].as_str(), first["seq"].as_u64()),
        (Some("store-1"), Some("prices"), Some(1))
    );
    let again = post_downlink(&client, "/v1/edges/store-1/queues/prices/messages", b"p-1", Some("k-1")).await;
    again.expect_status(200);
    assert_eq!(again.json()["id"], first["id"]);

    // An NDJSON batch, all or nothing.
    let batch = client
        .post(
            "/v1/edges/store-1/queues/prices/batch",
            Some("application/x-ndjson"),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n",
        )
        .await
        .unwrap();
    batch.expect_status(202);
    assert_eq!((batch.json()["count"].as_u64(), batch.json()["last_seq"].as_u64()), (Some(3), Some(4)));

    // Refusals store nothing: an edge not listed, a bad name, too large, a batch without NDJSON.
    client.post("/v1/edges/store-9/queues/prices/messages", None, "x").await.unwrap().expect_error(404);
    client.post("/v1/edges/store-1/queues/bad%20name/messages", None, "x").await.unwrap().expect_error(400);
    client
        .post("/v1/edges/store-1/queues/prices/messages", None, vec![b'x'; 1001])
        .await
        .unwrap()
        .expect_error(413);
    client
        .post("/v1/edges/store-1/queues/prices/batch", Some("text/plain"), "x\n")
        .await
        .unwrap()
        .expect_error(400);

    // Broadcast: every listed edge gets it.
    let broadcast = client
        .post("/v1/broadcast/queues/config/messages", Some("application/json"), "{\"v\":2}")
        .await
        .unwrap();
    broadcast.expect_status(202);
    assert_eq!(broadcast.json()["count"].as_u64(), Some(2));

    let check = |central: &Node| {
        let client = central.client();
        async move {
            let mut store_1 = downlink_of(&client, "store-1").await;
            store_1.sort_by_key(|q| q["queue"].as_str().unwrap().to_string());
            let summary: Vec<_> = store_1
                .iter()
                .map(|q| {
                    (
                        q["queue"].as_str().unwrap().to_string(),
                        q["pending"].as_u64().unwrap(),
                        q["delivered_seq"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(summary, vec![("config".to_string(), 1, 0), ("prices".to_string(), 4, 0)]);
            assert!(store_1.iter().all(|q| q["oldest_age_seconds"].as_f64().is_some()));
            assert_eq!(downlink_of(&client, "store-2").await.len(), 1);
            assert_eq!(
                pending_in_edges(&client).await,
                vec![("store-1".to_string(), 5), ("store-2".to_string(), 1)]
            );
            // The central's own queues do not show the edges' downlink.
            assert!(
                client.queues().await.iter().all(|q| !q.name.contains("downlink")),
                "{:?}",
                client.queues().await
            );
        }
    };
    check(&central).await;
    client.get("/v1/edges/store-9/downlink").await.unwrap().expect_error(404);

    // Durable before 202: a kill -9 loses none of it.
    central.kill9();
    central.restart().await;
    check(&central).await;
}

#[tokio::test]
async fn a_downlink_message_waiting_past_its_ttl_becomes_failed_with_its_edge() {
    let central = start_central("message_ttl = \"1s\"").await;
    let client = central.client();
    post_downlink(&client, "/v1/edges/store-2/queues/prices/messages", b"old", None).await.expect_status(202);
    wait_until_async(DEADLINE, "the expired downlink message is in /v1/failed", || async {
        let failed = client.get("/v1/failed").await.unwrap().json();
        failed.as_array().is_some_and(|entries| {
            entries.iter().any(|e| {
                e["edge"] == "store-2"
                    && e["queue"] == "prices"
                    && e["reason"] == "expired"
                    && e["route"] == "downlink:store-2"
            })
        })
    })
    .await;
    assert_eq!(pending_in_edges(&client).await, vec![("store-1".to_string(), 0), ("store-2".to_string(), 0)]);
    let waiting = downlink_of(&client, "store-2").await;
    assert_eq!((waiting[0]["pending"].as_u64(), waiting[0]["delivered_seq"].as_u64()), (Some(0), Some(1)));
}

/// Found by schemathesis (scripts/schemathesis.sh): a downlink pull with `after_seq` at u64::MAX
/// overflowed `after_seq + 1` and the panic ended the central; one past i64::MAX wrapped to a
/// negative bound in the store. Both answer 204 now, with a message waiting, and the central serves on.
#[tokio::test]
async fn a_downlink_pull_after_the_largest_seq_answers_nothing_and_the_central_serves_on() {
    let central = start_central("").await;
    let client = central.client();
    post_downlink(&client, "/v1/edges/store-1/queues/prices/messages", b"p-1", None).await.expect_status(202);
    for after_seq in [u64::MAX, u64::MAX - 1, i64::MAX as u64 + 1, i64::MAX as u64] {
        let request = client
            .request(
                reqwest::Method::GET,
                &format!("/v1/link/downlink?queue=prices&after_seq={after_seq}&acked=0"),
            )
            .header("outpost-edge-id", "store-1")
            .header("authorization", "Bearer t1");
        let response = client.send(request).await.expect("pull downlink");
        response.expect_status(204);
    }
    client.get("/healthz").await.expect("the central still serves").expect_status(200);
    // The message still waits, and an ordinary pull gets it.
    let request = client
        .request(reqwest::Method::GET, "/v1/link/downlink?queue=prices&after_seq=0&acked=0")
        .header("outpost-edge-id", "store-1")
        .header("authorization", "Bearer t1");
    client.send(request).await.expect("pull downlink").expect_status(200);
}
