//! The ingest surface of an edge (CONTRACT section 3) against the real binary: every status an
//! edge can answer, with the contract's body shapes, and the rule that a rejected write stores
//! nothing. Garbage of every kind must leave the node serving and the store untouched. Also the
//! status of an edge with no upstream and the ingest metrics.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use serde_json::Value;
use testkit::raw::{exchange, Ending};
use testkit::{metrics, Client, Node, NodeBuilder, Rng};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

fn edge() -> NodeBuilder {
    Node::builder(OUTPOST)
}

/// What a rejected write must not change: each queue's name, messages, bytes, first and last seq
/// (`oldest_age_seconds` moves by itself).
async fn stored_state(client: &Client) -> Vec<(String, u64, u64, u64, u64)> {
    client
        .queues()
        .await
        .into_iter()
        .map(|q| (q.name, q.messages, q.bytes, q.first_seq, q.last_seq))
        .collect()
}

fn sorted_keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn accepted_writes_answer_202_with_the_contract_shapes() {
    let node = edge().start().await;
    let client = node.client();

    let response =
        client.post_message_with("orders", "one", Some("text/plain; charset=utf-8"), None).await.unwrap();
    response.expect_status(202);
    let body = response.json();
    assert_eq!(sorted_keys(&body), ["id", "queue", "seq"], "{body}");
    assert_eq!((body["queue"].as_str(), body["seq"].as_u64()), (Some("orders"), Some(1)), "{body}");
    let first_id = body["id"].as_str().expect("id is a string").to_string();
    assert!(!first_id.is_empty());

    let binary = Rng::from_seed(42).bytes(4096);
    let second = client.post_message("orders", binary.clone()).await.unwrap().accepted();
    assert_eq!(second.seq, 2);
    assert_ne!(second.id, first_id, "every message has its own id");
    let empty = client.post_message_with("orders", "", None, None).await.unwrap().accepted();
    assert_eq!(empty.seq, 3, "an empty body is a (zero-byte) payload too");

    let response = client.post_batch("orders", &["{\"n\":4}", "{\"n\":5}", "{\"n\":6}"]).await.unwrap();
    response.expect_status(202);
    let body = response.json();
    assert_eq!(sorted_keys(&body), ["count", "first_seq", "last_seq", "queue"], "{body}");
    assert_eq!(body, serde_json::json!({"queue": "orders", "count": 3, "first_seq": 4, "last_seq": 6}));

    // Blank lines are skipped and `\r\n` endings are allowed.
    let response = client
        .post("/v1/queues/orders/batch", Some("application/x-ndjson"), "\n{\"n\":7}\r\n\r\n   \n{\"n\":8}")
        .await
        .unwrap();
    let batch = response.batch_accepted();
    assert_eq!((batch.count, batch.first_seq, batch.last_seq), (2, 7, 8));

    // A 128-character name is the longest allowed.
    let long_name = "q".repeat(128);
    assert_eq!(client.post_message(&long_name, "x").await.unwrap().accepted().queue, long_name);

    let stored = client.read_all("orders").await;
    let expected: [(&[u8], Option<&str>); 8] = [
        (b"one", Some("text/plain; charset=utf-8")),
        (&binary, Some("application/octet-stream")),
        (b"", None),
        (b"{\"n\":4}", None),
        (b"{\"n\":5}", None),
        (b"{\"n\":6}", None),
        (b"{\"n\":7}", None),
        (b"{\"n\":8}", None),
    ];
    assert_eq!(stored.len(), expected.len());
    for (i, (message, (payload, content_type))) in stored.iter().zip(expected).enumerate() {
        assert_eq!(message.seq, i as u64 + 1);
        assert_eq!(message.payload, payload, "payload of seq {}", message.seq);
        if let Some(content_type) = content_type {
            assert_eq!(message.content_type, content_type, "Content-Type is kept");
        }
        assert!(message.accepted_at.contains('T'), "accepted_at is RFC 3339: {}", message.accepted_at);
        assert!(!message.origin.is_empty());
    }
    assert_eq!(stored[0].id, first_id);
    assert_eq!(stored[1].id, second.id);

    // The raw read shape, one page at a time.
    let page = client.get("/v1/queues/orders/messages?after_seq=2&limit=2").await.unwrap();
    page.expect_status(200);
    let page = page.json();
    assert_eq!(sorted_keys(&page), ["messages", "next_after_seq"]);
    assert_eq!(page["next_after_seq"], 4);
    let message = &page["messages"][0];
    assert_eq!(
        sorted_keys(message),
        ["accepted_at", "content_type", "id", "origin", "origin_seq", "payload_base64", "seq"],
        "{message}"
    );
    assert_eq!((message["seq"].as_u64(), message["payload_base64"].as_str()), (Some(3), Some("")));

    let listing = client.get("/v1/queues").await.unwrap().json();
    let orders = listing.as_array().unwrap().iter().find(|q| q["name"] == "orders").expect("orders listed");
    assert_eq!(
        sorted_keys(orders),
        ["bytes", "first_seq", "last_seq", "messages", "name", "oldest_age_seconds"]
    );
    let bytes: usize = stored.iter().map(|m| m.payload.len()).sum();
    assert_eq!((orders["messages"].as_u64(), orders["bytes"].as_u64()), (Some(8), Some(bytes as u64)));
    assert_eq!((orders["first_seq"].as_u64(), orders["last_seq"].as_u64()), (Some(1), Some(8)));
}

#[tokio::test]
async fn reading_past_the_end_returns_an_empty_page_for_every_after_seq() {
    // Regression: an after_seq above i64::MAX wrapped around inside the node and the read started
    // again at the first message, with next_after_seq going backwards.
    let node = edge().start().await;
    let client = node.client();
    client.post_batch("paged", &["{}", "{}", "{}"]).await.unwrap().expect_status(202);
    for after_seq in [3, 4, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        let page = client.get(&format!("/v1/queues/paged/messages?after_seq={after_seq}")).await.unwrap();
        page.expect_status(200);
        let page = page.json();
        assert_eq!(page["messages"].as_array().map(Vec::len), Some(0), "after_seq={after_seq}: {page}");
        assert_eq!(page["next_after_seq"].as_u64(), Some(after_seq), "after_seq={after_seq}: {page}");
    }
    let page = client.get("/v1/queues/paged/messages?after_seq=1&limit=1").await.unwrap().json();
    assert_eq!((page["messages"][0]["seq"].as_u64(), page["next_after_seq"].as_u64()), (Some(2), Some(2)));
}

/// A page of large messages stops at about 16 MiB of payload (not a thousand 1 MiB messages read
/// into memory and base64-encoded into one answer), and reading on from `next_after_seq` gets the
/// rest.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_of_large_messages_stops_at_about_16_mib() {
    let node = edge().start().await;
    let client = node.client();
    let payload = vec![b'x'; 1_000_000];
    for _ in 0..18 {
        client.post_message("large", payload.clone()).await.unwrap().expect_status(202);
    }
    let page = client.get("/v1/queues/large/messages?limit=1000").await.unwrap();
    page.expect_status(200);
    let page = page.json();
    let seqs: Vec<u64> =
        page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=16).collect::<Vec<u64>>(), "16 x 1 MB fit in 16 MiB, a 17th would not");
    assert_eq!(page["next_after_seq"], 16);
    let rest = client.get("/v1/queues/large/messages?after_seq=16&limit=1000").await.unwrap().json();
    let seqs: Vec<u64> =
        rest["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [17, 18]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_idempotency_key_answers_200_with_the_original_and_stores_nothing_twice() {
    let node = edge().start().await;
    let client = node.client();

    let original = client.post_message_with("pay", "charge 1", None, Some("key-1")).await.unwrap();
    original.expect_status(202);
    let original = original.accepted();
    let other = client.post_message("pay", "charge 2").await.unwrap().accepted();
    for _ in 0..3 {
        let again = client.post_message_with("pay", "charge 1", None, Some("key-1")).await.unwrap();
        again.expect_status(200);
        assert_eq!(sorted_keys(&again.json()), ["id", "queue", "seq"]);
        assert_eq!(again.accepted(), original, "the original id and seq");
    }

    // The same new key sent by many clients at once, landing in one group commit: one 202.
    let mut racers = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        racers.push(tokio::spawn(async move {
            let r = client.post_message_with("pay", "charge 3", None, Some("key-3")).await.unwrap();
            (r.status.as_u16(), r.accepted())
        }));
    }
    let mut answers = Vec::new();
    for racer in racers {
        answers.push(racer.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|(status, _)| *status == 202).count(), 1, "{answers:?}");
    assert!(answers.iter().all(|(status, _)| *status == 202 || *status == 200), "{answers:?}");
    assert!(answers.windows(2).all(|w| w[0].1 == w[1].1), "everyone got the same id and seq: {answers:?}");

    // Invalid keys are refused before anything is stored.
    let before = stored_state(&client).await;
    for bad_key in [String::new(), "k".repeat(257)] {
        let r = client.post_message_with("pay", "charge 4", None, Some(&bad_key)).await.unwrap();
        r.expect_error(400);
        assert_eq!(stored_state(&client).await, before, "a rejected write stores nothing");
    }

    let stored = client.read_all("pay").await;
    let payloads: Vec<&[u8]> = stored.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, [&b"charge 1"[..], b"charge 2", b"charge 3"], "nothing stored twice");
    assert_eq!((stored[0].id.as_str(), stored[0].seq), (original.id.as_str(), original.seq));
    assert_eq!((stored[1].id.as_str(), stored[1].seq), (other.id.as_str(), other.seq));
    let text = client.metrics().await;
    assert_eq!(metrics::value(&text, "outpost_messages_accepted_total", &[("queue", "pay")]), Some(3.0));
}

#[tokio::test]
async fn malformed_requests_get_400_and_store_nothing() {
    let node = edge().start().await;
    let client = node.client();
    client.post_message("existing", "m").await.unwrap().accepted();
    let before = stored_state(&client).await;
    let too_long = "x".repeat(129);

    let writes = [
        ("POST", "/v1/queues/a%20b/messages".to_string(), Some("text/plain"), "x"),
        ("POST", format!("/v1/queues/{too_long}/messages"), Some("text/plain"), "x"),
        ("POST", "/v1/queues/%FF/messages".to_string(), Some("text/plain"), "x"),
        ("POST", "/v1/queues/a%2Fb/messages".to_string(), Some("text/plain"), "x"),
        ("POST", "/v1/queues/caf%C3%A9/messages".to_string(), Some("text/plain"), "x"),
        ("POST", "/v1/queues/a%20b/batch".to_string(), Some("application/x-ndjson"), "{}\n"),
        ("POST", format!("/v1/queues/{too_long}/batch"), Some("application/x-ndjson"), "{}\n"),
        ("POST", "/v1/queues/existing/batch".to_string(), Some("application/json"), "{}\n{}\n"),
        ("POST", "/v1/queues/existing/batch".to_string(), Some("text/plain"), "{}\n"),
        ("POST", "/v1/queues/existing/batch".to_string(), None, "{}\n"),
        ("POST", "/v1/queues/fresh/batch".to_string(), Some("text/plain"), "{}\n"),
        ("POST", "/v1/queues/existing/batch".to_string(), Some("application/x-ndjson"), ""),
        ("POST", "/v1/queues/fresh/batch".to_string(), Some("application/x-ndjson"), "\n \r\n\n"),
    ];
    for (method, path, content_type, body) in writes {
        let mut request = client.request(Method::from_bytes(method.as_bytes()).unwrap(), &path).body(body);
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let response = client.send(request).await.unwrap();
        assert_eq!(response.status, 400, "{method} {path} ({content_type:?}): {}", response.text());
        response.expect_error(400);
        assert_eq!(stored_state(&client).await, before, "{method} {path}: a rejected write stores nothing");
    }

    let reads = [
        "/v1/queues/existing/messages?limit=0",
        "/v1/queues/existing/messages?limit=1001",
        "/v1/queues/existing/messages?limit=abc",
        "/v1/queues/existing/messages?limit=-1",
        "/v1/queues/existing/messages?limit=",
        "/v1/queues/existing/messages?after_seq=x",
        "/v1/queues/existing/messages?after_seq=-1",
        "/v1/queues/existing/messages?colour=blue",
        "/v1/queues/a%20b/messages",
    ];
    for path in reads {
        let response = client.get(path).await.unwrap();
        assert_eq!(response.status, 400, "GET {path}: {}", response.text());
        response.expect_error(400);
    }
    let long_read = format!("/v1/queues/{too_long}/messages");
    client.get(&long_read).await.unwrap().expect_error(400);
    assert_eq!(stored_state(&client).await, before);
}

#[tokio::test]
async fn tokens_401_when_missing_or_unknown_and_403_when_of_the_wrong_kind() {
    let node = edge()
        .config("[auth]\nclient_tokens = [\"client-secret\"]\nadmin_tokens = [\"admin-secret\"]\n")
        .start()
        .await;
    let anonymous = node.client();
    let client = anonymous.with_token("client-secret");
    let admin = anonymous.with_token("admin-secret");
    admin.post_message("existing", "m").await.unwrap().accepted();
    let before = stored_state(&admin).await;

    // No token, an unknown one, or one that is not a bearer token: 401, and nothing stored (not
    // even the new queue a first write would create).
    let unauthenticated =
        [None, Some("Bearer wrong"), Some("Basic client-secret"), Some("Bearer "), Some("client-secret")];
    for authorization in unauthenticated {
        for queue in ["existing", "brand-new"] {
            for path in [format!("/v1/queues/{queue}/messages"), format!("/v1/queues/{queue}/batch")] {
                let mut request = anonymous
                    .request(Method::POST, &path)
                    .header(CONTENT_TYPE, "application/x-ndjson")
                    .body("{}\n");
                if let Some(value) = authorization {
                    request = request.header(AUTHORIZATION, value);
                }
                let response = anonymous.send(request).await.unwrap();
                assert_eq!(response.status, 401, "POST {path} with {authorization:?}: {}", response.text());
                response.expect_error(401);
                assert_eq!(
                    stored_state(&admin).await,
                    before,
                    "POST {path} with {authorization:?} stored something"
                );
            }
        }
        for path in ["/v1/status", "/v1/queues", "/v1/queues/existing/messages"] {
            let mut request = anonymous.request(Method::GET, path);
            if let Some(value) = authorization {
                request = request.header(AUTHORIZATION, value);
            }
            anonymous.send(request).await.unwrap().expect_error(401);
        }
    }

    // A client token may write, but not read state: 403.
    client.post_message("existing", "from a client").await.unwrap().expect_status(202);
    client.post_batch("existing", &["{}"]).await.unwrap().expect_status(202);
    for path in ["/v1/status", "/v1/queues", "/v1/queues/existing/messages"] {
        let response = client.get(path).await.unwrap();
        assert_eq!(response.status, 403, "GET {path} with a client token: {}", response.text());
        response.expect_error(403);
    }

    // An admin token may do everything.
    for path in ["/v1/status", "/v1/queues", "/v1/queues/existing/messages"] {
        admin.get(path).await.unwrap().expect_status(200);
    }
    assert_eq!(admin.read_all("existing").await.len(), 3);
    assert!(anonymous.healthy().await, "/healthz needs no token");
}

#[tokio::test]
async fn unknown_queues_and_paths_get_404() {
    let node = edge().start().await;
    let client = node.client();
    client.post_message("known", "m").await.unwrap().accepted();
    let before = stored_state(&client).await;

    let unknown = [
        (Method::GET, "/v1/queues/unknown/messages"),
        (Method::GET, "/v1/queues/unknown/messages?after_seq=0&limit=10"),
        (Method::GET, "/v1/nothing-here"),
        (Method::GET, "/v2/queues"),
        (Method::GET, "/v1/queues/known/messages/1"),
        (Method::POST, "/v1/queues/known"),
        (Method::POST, "/v1/queues/known/messages/extra"),
        (Method::DELETE, "/v1/unknown"),
    ];
    for (method, path) in unknown {
        let response = client.send(client.request(method.clone(), path).body("x")).await.unwrap();
        assert_eq!(response.status, 404, "{method} {path}: {}", response.text());
        response.expect_error(404);
    }
    assert_eq!(stored_state(&client).await, before, "reading an unknown queue creates none");

    // A known path with a method it does not serve: an error in the same shape.
    let response =
        client.send(client.request(Method::PUT, "/v1/queues/known/messages").body("x")).await.unwrap();
    response.expect_error(405);
    assert_eq!(stored_state(&client).await, before);
}

#[tokio::test]
async fn oversized_messages_and_batches_get_413_and_store_nothing() {
    const MAX_MESSAGE_BYTES: usize = 1024;
    const MAX_BATCH_MESSAGES: usize = 10;
    let node =
        edge().config("[limits]\nmax_message_bytes = \"1KiB\"\nmax_batch_messages = 10\n").start().await;
    let client = node.client();
    let at_limit = vec![b'a'; MAX_MESSAGE_BYTES];
    let over_limit = vec![b'a'; MAX_MESSAGE_BYTES + 1];

    client.post_message("big", at_limit.clone()).await.unwrap().expect_status(202);
    let full_batch: Vec<Vec<u8>> = vec![at_limit.clone(); MAX_BATCH_MESSAGES];
    client.post_batch("big", &full_batch).await.unwrap().expect_status(202);
    let before = stored_state(&client).await;

    for queue in ["big", "new-queue"] {
        let response = client.post_message(queue, over_limit.clone()).await.unwrap();
        assert_eq!(response.expect_error(413), "too_large");
        assert_eq!(stored_state(&client).await, before, "{queue}: an oversized message stores nothing");

        let too_many: Vec<&str> = vec!["{}"; MAX_BATCH_MESSAGES + 1];
        client.post_batch(queue, &too_many).await.unwrap().expect_error(413);
        assert_eq!(stored_state(&client).await, before, "{queue}: a batch of too many stores nothing");

        // All or nothing: the good lines before the oversized one are not stored either.
        let mut one_too_big: Vec<Vec<u8>> = vec![b"{}".to_vec(); 4];
        one_too_big.push(over_limit.clone());
        one_too_big.push(b"{}".to_vec());
        client.post_batch(queue, &one_too_big).await.unwrap().expect_error(413);
        assert_eq!(stored_state(&client).await, before, "{queue}: a batch with a big line stores nothing");
    }

    // Without a Content-Length (chunked), the limit holds while the body streams in.
    let chunked = format!(
        "POST /v1/queues/big/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        over_limit.len(),
        String::from_utf8(over_limit.clone()).unwrap()
    );
    let answer = exchange(node.addr(), chunked.as_bytes(), Ending::ReadAnswer, RAW_TIMEOUT).await;
    assert_eq!(answer.status(), Some(413), "{}", answer.text());
    // A Content-Length announcing a terabyte is refused before any of it is read.
    let huge = "POST /v1/queues/big/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\nabc";
    let answer = exchange(node.addr(), huge.as_bytes(), Ending::ReadAnswer, RAW_TIMEOUT).await;
    assert_eq!(answer.status(), Some(413), "{}", answer.text());
    assert_eq!(stored_state(&client).await, before);
}

/// Regression: a client that sends a body far over `max_message_bytes` without
/// `Expect: 100-continue` (reqwest, most HTTP libraries) got a broken pipe instead of the 413,
/// because the node answered and closed while the client was still writing. The node now reads
/// and drops a bounded amount of an oversized body before it answers.
#[tokio::test]
async fn a_body_far_over_the_limit_still_gets_its_413() {
    let node = edge().config("[limits]\nmax_message_bytes = \"1KiB\"\n").start().await;
    let client = node.client();
    let body = bytes::Bytes::from(vec![b'a'; 20 << 20]);
    for attempt in 1..=10 {
        let response = client
            .post_message("big", body.clone())
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: no answer, the client saw {e:?}"));
        response.expect_error(413);
    }
    assert!(client.queues().await.is_empty());
}

#[tokio::test]
async fn a_full_batch_of_full_messages_with_crlf_line_endings_is_accepted() {
    // NDJSON allows `\r\n` line endings (the node splits on them), so a batch of
    // max_batch_messages messages of max_message_bytes each is within the limits either way.
    let node =
        edge().config("[limits]\nmax_message_bytes = \"1KiB\"\nmax_batch_messages = 10\n").start().await;
    let client = node.client();
    let line = "a".repeat(1024);
    let body = format!("{line}\r\n").repeat(10);
    let response = client.post("/v1/queues/crlf/batch", Some("application/x-ndjson"), body).await.unwrap();
    assert_eq!(response.batch_accepted().count, 10);
}

#[tokio::test]
async fn a_full_store_answers_507_and_stores_nothing() {
    const PAYLOAD_BYTES: usize = 1000;
    const MAX_STORE_BYTES: usize = 64 * 1024;
    let node =
        edge().config("[limits]\nmax_store_bytes = \"64KiB\"\nmax_message_bytes = \"4KiB\"\n").start().await;
    let client = node.client();
    let payload = vec![b'p'; PAYLOAD_BYTES];

    let keyed =
        client.post_message_with("fill", payload.clone(), None, Some("first")).await.unwrap().accepted();
    let mut accepted = 1;
    let refusal = loop {
        let response = client.post_message("fill", payload.clone()).await.unwrap();
        if response.status != 202 {
            break response;
        }
        accepted += 1;
        assert!(
            accepted * PAYLOAD_BYTES <= MAX_STORE_BYTES,
            "accepted more than the quota: {accepted} messages"
        );
    };
    assert_eq!(refusal.expect_error(507), "store_full");
    assert!(accepted * PAYLOAD_BYTES >= MAX_STORE_BYTES / 2, "refused too early: after {accepted} messages");
    let before = stored_state(&client).await;

    client.post_message("fill", payload.clone()).await.unwrap().expect_error(507);
    assert_eq!(stored_state(&client).await, before, "single write while full");
    let lines = vec![vec![b'b'; PAYLOAD_BYTES]; 5];
    client.post_batch("fill", &lines).await.unwrap().expect_error(507);
    assert_eq!(stored_state(&client).await, before, "batch while full");
    client.post_message("another-queue", payload.clone()).await.unwrap().expect_error(507);
    client.post_batch("another-queue", &lines).await.unwrap().expect_error(507);
    assert_eq!(stored_state(&client).await, before, "a refused first write creates no queue");

    // A retry of an acknowledged write stores nothing new, so a full store still answers it.
    let again = client.post_message_with("fill", payload.clone(), None, Some("first")).await.unwrap();
    again.expect_status(200);
    assert_eq!(again.accepted(), keyed);

    assert_eq!(client.read_all("fill").await.len(), accepted);
    assert!(client.healthy().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_never_crashes_the_node_and_stores_nothing() {
    let mut node = edge().start().await;
    let client = node.client();
    let addr = node.addr();
    let mut rng = Rng::from_env_or_time("garbage");
    let post_head =
        |extra: &str| format!("POST /v1/queues/garbage/messages HTTP/1.1\r\nHost: x\r\n{extra}\r\n");

    // (what, bytes, how the client ends)
    let mut cases: Vec<(String, Vec<u8>, Ending)> = vec![
        ("HTTP/2 preface".into(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), Ending::HalfClose),
        ("request line only".into(), b"POST /v1/queues/garbage/messages HTTP/1.1\r\n".to_vec(), Ending::HalfClose),
        ("unknown method".into(), post_head("Content-Length: 1\r\n").replace("POST", "FROB").into_bytes(), Ending::HalfClose),
        (
            "1 MiB header".into(),
            post_head(&format!("X-Big: {}\r\nContent-Length: 1\r\n", "a".repeat(1 << 20))).into_bytes(),
            Ending::ReadAnswer,
        ),
        (
            "500 headers".into(),
            post_head(&(0..500).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()).into_bytes(),
            Ending::ReadAnswer,
        ),
        (
            "100 KiB path".into(),
            format!("POST /v1/queues/{}/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", "g".repeat(100 << 10))
                .into_bytes(),
            Ending::ReadAnswer,
        ),
        ("Content-Length: abc".into(), (post_head("Content-Length: abc\r\n") + "hello").into_bytes(), Ending::HalfClose),
        ("Content-Length: -1".into(), (post_head("Content-Length: -1\r\n") + "hello").into_bytes(), Ending::HalfClose),
        (
            "Content-Length overflowing u64".into(),
            (post_head("Content-Length: 99999999999999999999999\r\n") + "hello").into_bytes(),
            Ending::HalfClose,
        ),
        (
            "two different Content-Lengths".into(),
            (post_head("Content-Length: 5\r\nContent-Length: 6\r\n") + "hello!").into_bytes(),
            Ending::HalfClose,
        ),
        (
            "unknown Transfer-Encoding".into(),
            (post_head("Transfer-Encoding: bogus\r\n") + "hello").into_bytes(),
            Ending::HalfClose,
        ),
        (
            "bad chunk size".into(),
            (post_head("Transfer-Encoding: chunked\r\n") + "zz\r\nhello\r\n0\r\n\r\n").into_bytes(),
            Ending::HalfClose,
        ),
        (
            "truncated body, half-closed".into(),
            (post_head("Content-Length: 1000\r\n") + "only ten b").into_bytes(),
            Ending::HalfClose,
        ),
        (
            "truncated body, client gone".into(),
            (post_head("Content-Length: 1000\r\n") + "only ten b").into_bytes(),
            Ending::Abort,
        ),
        (
            "truncated chunked body, half-closed".into(),
            (post_head("Transfer-Encoding: chunked\r\n") + "64\r\nhello").into_bytes(),
            Ending::HalfClose,
        ),
        (
            "truncated chunked body, client gone".into(),
            (post_head("Transfer-Encoding: chunked\r\n") + "64\r\nhello").into_bytes(),
            Ending::Abort,
        ),
        (
            "truncated batch, client gone".into(),
            "POST /v1/queues/garbage/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: 500\r\n\r\n{\"a\":1}\n{\"b\""
                .as_bytes()
                .to_vec(),
            Ending::Abort,
        ),
        (
            "truncated batch, half-closed".into(),
            "POST /v1/queues/garbage/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: 500\r\n\r\n{\"a\":1}\n{\"b\""
                .as_bytes()
                .to_vec(),
            Ending::HalfClose,
        ),
        ("headers cut short".into(), b"POST /v1/queues/garbage/messages HTTP/1.1\r\nHost: x\r\nContent-Le".to_vec(), Ending::Abort),
        (
            "non-ASCII Content-Type".into(),
            [&b"POST /v1/queues/garbage/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Type: text/\xff\xfe\r\n\r\n"[..], b"x"]
                .concat(),
            Ending::ReadAnswer,
        ),
        (
            "non-ASCII Idempotency-Key".into(),
            [&b"POST /v1/queues/garbage/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nIdempotency-Key: \xff\xfe\r\n\r\n"[..], b"x"]
                .concat(),
            Ending::ReadAnswer,
        ),
    ];
    for i in 0..20 {
        let len = rng.between(1, 8192) as usize;
        cases.push((format!("random bytes #{i} ({len} bytes)"), rng.bytes(len), Ending::HalfClose));
        // The node speaks HTTP/2 too: random frames after the preface.
        cases.push((
            format!("HTTP/2 preface and random bytes #{i} ({len} bytes)"),
            [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &rng.bytes(len)].concat(),
            Ending::HalfClose,
        ));
        // Random bytes after a valid request line and headers: the body decides nothing here
        // because the Content-Type is not NDJSON.
        let body = rng.bytes(len);
        let request = [
            format!(
                "POST /v1/queues/garbage/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
            )
            .as_bytes(),
            &body,
        ]
        .concat();
        cases.push((format!("random batch body #{i}"), request, Ending::ReadAnswer));
    }

    for (what, bytes, ending) in &cases {
        let answer = exchange(addr, bytes, *ending, RAW_TIMEOUT).await;
        if what.starts_with("HTTP/2 preface") {
            // An HTTP/2 connection: the node's first frame is its SETTINGS (type 4).
            assert_eq!(answer.bytes.get(3), Some(&4), "{what}: the node's answer {:?}", answer.text());
        } else if let Some(status) = answer.status() {
            assert!((400..500).contains(&status), "{what}: answered {status}: {}", answer.text());
        } else {
            assert!(
                *ending == Ending::Abort || answer.bytes.is_empty(),
                "{what}: an answer that is not HTTP: {:?}",
                answer.text()
            );
        }
        assert!(node.is_running(), "{what}: the node died\n{}", node.log_tail(40));
        assert!(client.healthy().await, "{what}: /healthz after it");
    }

    // The same garbage from many connections at once.
    let mut tasks = Vec::new();
    for (what, bytes, ending) in cases.clone() {
        tasks.push(tokio::spawn(async move {
            let answer = exchange(addr, &bytes, ending, RAW_TIMEOUT).await;
            if let Some(status) = answer.status() {
                assert!((400..500).contains(&status), "{what} (concurrent): answered {status}");
            }
        }));
    }
    for task in tasks {
        task.await.expect("a concurrent garbage sender failed");
    }

    // Binary payloads are not garbage: any bytes are a message and come back exactly.
    let binary = rng.bytes(70_000);
    let accepted = client.post_message("binary", binary.clone()).await.unwrap().accepted();

    assert!(node.is_running(), "the node died\n{}", node.log_tail(40));
    assert!(client.healthy().await);
    let queues = stored_state(&client).await;
    assert_eq!(queues.len(), 1, "garbage created or filled queues: {queues:?}");
    let stored = client.read_all("binary").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].id.as_str(), stored[0].payload.as_slice()),
        (accepted.id.as_str(), binary.as_slice())
    );
}

#[tokio::test]
async fn the_status_of_an_edge_without_upstream_is_offline_because_there_is_no_upstream() {
    let node = edge().arg("--node-id").arg("store-042").start().await;
    let client = node.client();
    client.post_batch("s", &["{}", "{}", "{}"]).await.unwrap().expect_status(202);

    let status = client.status().await;
    assert_eq!(
        sorted_keys(&status),
        [
            "backlog",
            "last_ping_at",
            "node_id",
            "offline_log",
            "role",
            "state",
            "state_since",
            "upstream",
            "version"
        ],
        "{status}"
    );
    assert_eq!(status["node_id"], "store-042");
    assert_eq!(status["role"], "edge");
    assert_eq!(status["state"], "offline", "{status}");
    assert!(status["state_since"].as_str().is_some_and(|s| s.contains('T')), "{status}");
    assert!(status["version"].as_str().is_some_and(|v| !v.is_empty()));
    // The contract's fields, and the drain estimate the edge adds (docs/api.md).
    let backlog_keys = sorted_keys(&status["backlog"]);
    for key in ["bytes", "messages", "oldest_age_seconds", "drain_seconds"] {
        assert!(backlog_keys.contains(&key), "backlog has {key}: {status}");
    }
    assert_eq!(
        (status["backlog"]["messages"].as_u64(), status["backlog"]["bytes"].as_u64()),
        (Some(3), Some(6))
    );
    let log = status["offline_log"].as_array().unwrap_or_else(|| panic!("offline_log is a list: {status}"));
    let entry = log
        .iter()
        .find(|e| e["cause"] == "no_upstream")
        .unwrap_or_else(|| panic!("no no_upstream entry: {status}"));
    assert_eq!(sorted_keys(entry), ["at", "cause", "detail"]);
    assert!(entry["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

#[tokio::test]
async fn metrics_count_accepted_messages_backlog_and_commit_latency() {
    let node = edge().config("[limits]\nmax_message_bytes = \"1KiB\"\n").start().await;
    let client = node.client();
    for n in 0..3 {
        client.post_message("m1", format!("single {n}")).await.unwrap().expect_status(202);
    }
    client.post_batch("m1", &["{}", "{}", "{}", "{}"]).await.unwrap().expect_status(202);
    client.post_message_with("m2", "a", None, Some("k")).await.unwrap().expect_status(202);
    client.post_message_with("m2", "a", None, Some("k")).await.unwrap().expect_status(200);
    client.post_message("m2", "b").await.unwrap().expect_status(202);
    client.post_message("m2", vec![b'x'; 2000]).await.unwrap().expect_error(413);
    client.post("/v1/queues/m2/batch", Some("text/plain"), "{}").await.unwrap().expect_error(400);

    let text = client.metrics().await;
    let accepted = |queue| metrics::value(&text, "outpost_messages_accepted_total", &[("queue", queue)]);
    assert_eq!(accepted("m1"), Some(7.0), "\n{text}");
    assert_eq!(accepted("m2"), Some(2.0), "duplicates and rejections are not accepted\n{text}");
    let backlog = |queue| metrics::value(&text, "outpost_backlog_messages", &[("queue", queue)]);
    assert_eq!((backlog("m1"), backlog("m2")), (Some(7.0), Some(2.0)), "\n{text}");
    assert!(metrics::has(&text, "outpost_store_commit_seconds_bucket"), "\n{text}");
    let commits = metrics::value(&text, "outpost_store_commit_seconds_bucket", &[("le", "+Inf")]);
    assert!(commits.is_some_and(|n| n >= 1.0), "at least one commit observed\n{text}");
}
