//! A node whose open-file limit is below `limits.max_connections` (a central for thousands of
//! edges under a default `ulimit -n`): it accepts only what the limit leaves room for, closes the
//! rest at accept at once instead of leaving them in the listen queue, says so in its log, and keeps
//! serving and storing (issue 13: 5,000 edges used to end in resets once the central ran out of
//! descriptors).

use std::time::{Duration, Instant};

use testkit::{wait_until_async, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
/// The node's open-file limit here: room for 192 connections once 64 are kept for its own files.
const OPEN_FILES: u64 = 256;

/// Sends a health check; returns the answer, or `None` when none came within 3 s (the connection
/// waits in the listen queue): a closed connection answers at once with nothing.
async fn health_answer(stream: &mut TcpStream) -> Option<String> {
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: outpost\r\nConnection: close\r\n\r\n").await;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_open_file_limit_are_closed_at_accept_and_the_node_serves_on() {
    let edge = Node::builder(BIN)
        .role("edge")
        .config("upstream = \"none\"\n\n[limits]\nrequest_timeout = \"30s\"\n")
        .open_file_limit(OPEN_FILES)
        .start()
        .await;
    let log = edge.log();
    assert!(
        log.contains("open-file limit")
            && log.contains("max_connections=4096")
            && log.contains("accepted=192"),
        "the node says how many connections its open-file limit allows:\n{}",
        edge.log_tail(20)
    );

    // Hold more idle connections than the limit allows.
    let mut held = Vec::new();
    for _ in 0..OPEN_FILES + 64 {
        held.push(TcpStream::connect(edge.addr()).await.unwrap());
    }
    // Once the node has accepted its share, one more is closed at once, not left waiting.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut extra = TcpStream::connect(edge.addr()).await.unwrap();
        match health_answer(&mut extra).await {
            Some(answer) if answer.is_empty() => break,
            answer => assert!(
                Instant::now() < deadline,
                "a connection past the open-file limit was not closed at accept: {answer:?}\n{}",
                edge.log_tail(10)
            ),
        }
    }
    // An open connection is served, and the store still takes writes.
    let answer = health_answer(&mut held[0]).await.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "an open connection is served: {answer:?}");
    let body = "one message";
    let request = format!(
        "POST /v1/queues/orders/messages HTTP/1.1\r\nHost: outpost\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    held[1].write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), held[1].read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 202"), "a write is acknowledged: {answer}");

    // Freed slots take new connections.
    held.clear();
    wait_until_async(Duration::from_secs(10), "a new connection served once slots are free", || async {
        let mut fresh = TcpStream::connect(edge.addr()).await.unwrap();
        health_answer(&mut fresh).await.is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert_eq!(edge.client().queue("orders").await.map(|q| q.messages), Some(1));
}
