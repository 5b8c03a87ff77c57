//! The single-write lane (`outpost-api/src/single_write.rs`) against the real binary: a connection
//! may mix single writes (served by the lane) with any other request (handed to hyper and the
//! router with every byte already read), pipelined or dribbled byte by byte; a refusal answers like
//! the router's and keeps the connection when the body is already there; a stopping node closes an
//! idle connection at once.

use std::net::SocketAddr;
use std::time::Duration;

use testkit::{free_port, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const CLIENT_TOKEN: &str = "client-token";
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

async fn edge(config: &str) -> Node {
    Node::builder(BIN)
        .arg("--central")
        .arg(format!("http://127.0.0.1:{}", free_port()))
        .config(config)
        .start()
        .await
}

fn single(queue: &str, body: &str, extra_headers: &str) -> String {
    format!(
        "POST /v1/queues/{queue}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n{extra_headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One answer read off `socket`: status, headers (lower-case names) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("answer body {:?}: {e}", self.body))
    }
}

/// Reads answers off one connection, keeping what arrived past the last one.
struct Reader {
    socket: TcpStream,
    buffer: Vec<u8>,
}

impl Reader {
    async fn connect(addr: SocketAddr) -> Reader {
        Reader { socket: TcpStream::connect(addr).await.expect("connect"), buffer: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("send");
    }

    /// The next whole answer (framed by `content-length`); panics when the node closes first or
    /// nothing comes within [`ANSWER_TIMEOUT`].
    async fn answer(&mut self) -> Answer {
        tokio::time::timeout(ANSWER_TIMEOUT, async {
            loop {
                if let Some(answer) = self.take_answer() {
                    return answer;
                }
                let mut chunk = [0u8; 8192];
                let n = self.socket.read(&mut chunk).await.expect("read an answer");
                assert!(
                    n > 0,
                    "the node closed the connection; read so far: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                self.buffer.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("an answer within the timeout")
    }

    fn take_answer(&mut self) -> Option<Answer> {
        let head_end = self.buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8(self.buffer[..head_end].to_vec()).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().expect("a status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().expect("a length"));
        if self.buffer.len() < head_end + length {
            return None;
        }
        let body = String::from_utf8_lossy(&self.buffer[head_end..head_end + length]).into_owned();
        self.buffer.drain(..head_end + length);
        Some(Answer { status, headers, body })
    }

    /// Whether the node closes the connection (end of input) within `timeout`, with no more bytes.
    async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(timeout, self.socket.read_to_end(&mut rest)).await {
            Ok(Ok(_)) => rest.is_empty(),
            Ok(Err(_)) => true,
            Err(_) => false,
        }
    }
}

/// Single writes, a read (router), an idempotent repeat and a batch (router) pipelined in one
/// write, then a single write after the hand-off: every answer in order, every message stored once.
#[tokio::test]
async fn one_connection_mixes_lane_and_router_requests_in_order() {
    let node = edge("").await;
    let mut connection = Reader::connect(node.addr()).await;
    let mut pipelined = String::new();
    pipelined.push_str(&single("mixed", "one", ""));
    pipelined.push_str(&single("mixed", "two", "Idempotency-Key: k-2\r\n"));
    pipelined.push_str(&single("mixed", "two again", "Idempotency-Key: k-2\r\n"));
    pipelined.push_str("GET /v1/queues/mixed/messages HTTP/1.1\r\nHost: x\r\n\r\n");
    let batch = "{\"n\":3}\n{\"n\":4}\n";
    pipelined.push_str(&format!(
        "POST /v1/queues/mixed/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n\
         Content-Length: {}\r\n\r\n{batch}",
        batch.len()
    ));
    pipelined.push_str(&single("mixed", "five", ""));
    connection.send(pipelined.as_bytes()).await;

    let first = connection.answer().await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert!(first.header("date").is_some_and(|d| d.ends_with(" GMT")), "{:?}", first.headers);
    assert_eq!(first.json()["seq"], 1);
    assert_eq!(first.json()["queue"], "mixed");
    let second = connection.answer().await;
    assert_eq!(second.status, 202);
    let repeat = connection.answer().await;
    assert_eq!(repeat.status, 200, "a repeated idempotency key answers 200: {}", repeat.body);
    assert_eq!(repeat.json()["id"], second.json()["id"]);
    let read = connection.answer().await;
    assert_eq!(read.status, 200, "{}", read.body);
    let seqs: Vec<u64> =
        read.json()["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2], "the read sees the writes before it");
    let batch_answer = connection.answer().await;
    assert_eq!(batch_answer.status, 202, "{}", batch_answer.body);
    assert_eq!(batch_answer.json()["last_seq"], 4);
    let after = connection.answer().await;
    assert_eq!(after.status, 202, "{}", after.body);
    assert_eq!(after.json()["seq"], 5);

    let stats = node.client().queue("mixed").await.expect("queue mixed");
    assert_eq!(stats.messages, 5);
}

/// A write dribbled in a byte at a time (head and body split anywhere) is stored once; so is the
/// next one on the same connection.
#[tokio::test]
async fn a_write_arriving_byte_by_byte_is_served() {
    let node = edge("").await;
    let mut connection = Reader::connect(node.addr()).await;
    let request = single("dribble", "payload in pieces", "Idempotency-Key: d-1\r\n");
    for byte in request.as_bytes() {
        connection.send(std::slice::from_ref(byte)).await;
        tokio::task::yield_now().await;
    }
    let answer = connection.answer().await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    connection.send(single("dribble", "next", "").as_bytes()).await;
    assert_eq!(connection.answer().await.status, 202);
    let payloads: Vec<Vec<u8>> =
        node.client().read_all("dribble").await.into_iter().map(|m| m.payload).collect();
    assert_eq!(payloads, [b"payload in pieces".to_vec(), b"next".to_vec()]);
}

/// Refusals answer as the router does (status, JSON error code, `Retry-After` where it applies);
/// with the body already sent the connection serves on, without it the node closes it.
#[tokio::test]
async fn refusals_answer_like_the_router_and_keep_the_connection_when_the_body_is_here() {
    let node =
        edge(&format!("[auth]\nclient_tokens = [\"{CLIENT_TOKEN}\"]\nadmin_tokens = [\"admin\"]\n")).await;
    let auth = format!("Authorization: Bearer {CLIENT_TOKEN}\r\n");
    let mut connection = Reader::connect(node.addr()).await;
    connection.send(single("guarded", "no token", "").as_bytes()).await;
    let refused = connection.answer().await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "unauthorized");
    assert_eq!(refused.header("content-type"), Some("application/json"));
    connection.send(single("guarded", "wrong", "Authorization: Bearer nope\r\n").as_bytes()).await;
    assert_eq!(connection.answer().await.status, 401);
    connection.send(single("bad!name", "x", &auth).as_bytes()).await;
    let bad_name = connection.answer().await;
    assert_eq!(bad_name.status, 400, "{}", bad_name.body);
    assert_eq!(bad_name.json()["error"]["code"], "invalid_name");
    connection.send(single("guarded", "x", &format!("{auth}Idempotency-Key: \r\n")).as_bytes()).await;
    assert_eq!(connection.answer().await.status, 400, "an empty Idempotency-Key");
    connection.send(single("guarded", "finally", &auth).as_bytes()).await;
    let stored = connection.answer().await;
    assert_eq!(stored.status, 202, "{}", stored.body);
    assert_eq!(stored.json()["seq"], 1, "only the authorized write was stored");

    // Refused before its body arrived: answered, then closed (the rest of the body would
    // otherwise be read as the next request).
    let mut connection = Reader::connect(node.addr()).await;
    connection
        .send(b"POST /v1/queues/guarded/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .await;
    let refused = connection.answer().await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(
        connection.closed_within(ANSWER_TIMEOUT).await,
        "the connection stays open after a refusal mid-body"
    );

    // A body larger than limits.max_message_bytes goes to the router, which answers 413.
    let mut connection = Reader::connect(node.addr()).await;
    let large = "x".repeat(2 << 20);
    connection.send(single("guarded", &large, &auth).as_bytes()).await;
    let too_large = connection.answer().await;
    assert_eq!(too_large.status, 413, "{}", too_large.body);
    assert_eq!(too_large.json()["error"]["code"], "too_large");
}

/// A partial head (here of a request the router serves) does not hold a stopping node for the
/// request timeout: the lane closes it at once, as hyper does an idle connection. Found in review:
/// it held the stop for the whole `request_timeout`.
#[tokio::test]
async fn a_partial_head_does_not_hold_a_stopping_node() {
    let mut node = edge("[limits]\nrequest_timeout = \"60s\"\n").await;
    let mut partial = Reader::connect(node.addr()).await;
    partial.send(b"POST /v1/queues/partial/messages HTTP/1.1\r\nHost: x\r\nContent-Le").await;
    // Another request answered: the node has taken the partial head's bytes by now.
    node.client().get("/healthz").await.unwrap().expect_status(200);
    let started = std::time::Instant::now();
    let status = node.sigterm().await;
    assert!(status.success(), "the node stopped with {status:?}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "a partial head held the stopping node for {took:?}");
    assert!(partial.closed_within(Duration::from_secs(5)).await);
}

/// `Connection: close` is honoured; once the node stops, an idle kept-alive connection is closed
/// at once rather than at the request timeout.
#[tokio::test]
async fn connection_close_and_a_stopping_node_close_lane_connections() {
    let mut node = edge("[limits]\nrequest_timeout = \"60s\"\n").await;
    let mut closing = Reader::connect(node.addr()).await;
    closing.send(single("close", "bye", "Connection: close\r\n").as_bytes()).await;
    let answer = closing.answer().await;
    assert_eq!(answer.status, 202);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(closing.closed_within(ANSWER_TIMEOUT).await, "still open after Connection: close");

    let mut idle = Reader::connect(node.addr()).await;
    idle.send(single("close", "kept alive", "").as_bytes()).await;
    assert_eq!(idle.answer().await.status, 202);
    let status = node.sigterm().await;
    assert!(status.success(), "the node stopped with {status:?}");
    assert!(idle.closed_within(Duration::from_secs(5)).await, "an idle connection held the stopping node");
}
