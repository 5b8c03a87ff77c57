//! Catch-up over thin WAN lines (issue 12, CONTRACT sections 2, 5 and 6), real binaries with the
//! link-shaping proxy between edge and central: a 64 kbit/s, 300 ms line never flaps and drains
//! exactly once; `max_bandwidth` holds over every 2 s window; priority-0 queues overtake a
//! priority-9 backlog, each queue in order; zstd compression stores the same messages with fewer
//! bytes on the wire, and an edge with compression works with a central without it; live traffic
//! over a slow line keeps one connection (HTTP/2), and idle ones close (descriptors at the central).
//!
//! Throughput is measured in `bench/wan.sh` (docs/benchmarks.md), never asserted here; the bounds
//! below are generous because the machine running them is shared.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use testkit::proxy::{LinkProxy, LinkShape};
use testkit::{metrics, wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// A realistic order document of about 600 bytes: what a shop sends, compressible like real JSON
/// (repeated keys, similar values) but different in every message.
fn order_document(i: u64) -> String {
    let skus = ["SKU-10042-BLK", "SKU-20077-WHT", "SKU-31415-RED", "SKU-27182-GRN", "SKU-16180-BLU"];
    let lines: Vec<String> = (0..3)
        .map(|l| {
            let sku = skus[((i + l) % 5) as usize];
            format!(
                r#"{{"sku":"{sku}","qty":{},"unit_price":{}.{:02},"vat_rate":0.19}}"#,
                1 + (i * 7 + l) % 4,
                3 + (i * 13 + l * 5) % 90,
                (i * 31 + l) % 100
            )
        })
        .collect();
    format!(
        r#"{{"type":"order.created","order_id":"ORD-2026-{i:08}","store":"store-042","register":{},"cashier":"C{:04}","created_at":"2026-11-26T{:02}:{:02}:{:02}.{:03}Z","currency":"EUR","customer":{{"loyalty_id":"LY{:09}","segment":"{}"}},"lines":[{}],"payment":{{"method":"{}","status":"captured","terminal":"T-{:03}"}},"total":{}.{:02}}}"#,
        1 + i % 6,
        (i * 17) % 9000,
        (i / 3600) % 24,
        (i / 60) % 60,
        i % 60,
        (i * 37) % 1000,
        (i * 7919) % 1_000_000_000,
        ["regular", "gold", "staff"][(i % 3) as usize],
        lines.join(","),
        ["card", "cash", "voucher"][(i % 3) as usize],
        i % 40,
        10 + (i * 29) % 400,
        (i * 11) % 100
    )
}

fn edge_config(upstream_url: &str, extra: &str) -> String {
    edge_config_with(upstream_url, "", extra)
}

/// `connectivity`: more lines of the `[connectivity]` section.
fn edge_config_with(upstream_url: &str, connectivity: &str, extra: &str) -> String {
    format!(
        r#"
[[upstream]]
url = "{upstream_url}"

[connectivity]
{connectivity}
offline_probe_interval = "1s"
transition_to_offline_wait = "2s"
failed_transition_wait = "2s"

[failover]
connect_timeout = "5s"

{extra}
"#
    )
}

async fn start_central(id: &str, config: &str) -> Node {
    Node::builder(BIN).role("central").arg("--node-id").arg(id).config(config).start().await
}

async fn start_edge(id: &str, config: &str) -> Node {
    Node::builder(BIN).role("edge").arg("--node-id").arg(id).config(config).start().await
}

/// Posts `docs` to `queue` in NDJSON batches of 500.
async fn post_documents(edge: &Node, queue: &str, docs: &[String]) {
    let client = edge.client();
    for chunk in docs.chunks(500) {
        client.post_batch(queue, chunk).await.expect("post a batch").batch_accepted();
    }
}

/// What the central holds of `queue` from `edge_id`, as (edge seq, payload) in the central's order.
async fn held_from(central: &Node, queue: &str, edge_id: &str) -> Vec<(u64, Vec<u8>)> {
    central
        .client()
        .read_all(queue)
        .await
        .into_iter()
        .filter(|m| m.origin == edge_id)
        .map(|m| (m.origin_seq, m.payload))
        .collect()
}

/// Waits until the central holds `count` messages of `queue` (any origin).
async fn wait_central_count(central: &Node, queue: &str, count: u64, timeout: Duration) {
    wait_until_async(timeout, &format!("{count} messages of {queue} at the central"), || async {
        central.client().queue(queue).await.is_some_and(|q| q.last_seq >= count)
    })
    .await;
}

/// Checks the central holds exactly `docs` of `queue` from `edge_id`: once each, in order.
async fn assert_holds_exactly(central: &Node, queue: &str, edge_id: &str, docs: &[String]) {
    let held = held_from(central, queue, edge_id).await;
    let seqs: Vec<u64> = held.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=docs.len() as u64).collect::<Vec<_>>(),
        "{queue} from {edge_id}: once each, in order"
    );
    for ((seq, payload), doc) in held.iter().zip(docs) {
        assert_eq!(payload, doc.as_bytes(), "payload of {queue} seq {seq} from {edge_id}");
    }
}

async fn edge_state(edge: &Node) -> (String, usize) {
    let status = edge.client().status().await;
    let state = status["state"].as_str().unwrap_or_default().to_string();
    (state, status["offline_log"].as_array().map_or(0, Vec::len))
}

async fn wait_online(edge: &Node, timeout: Duration) {
    wait_until_async(timeout, "edge online", || async { edge_state(edge).await.0 == "online" }).await;
}

// ---------------------------------------------------------------------------------------------
// Slow links never flap.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_mb_backlog_over_64_kbit_300_ms_stays_online_and_drains_exactly_once() {
    let central = start_central("hq", "").await;
    let proxy = LinkProxy::start(central.addr(), LinkShape::default());
    let edge = start_edge(
        "store-slow",
        &edge_config_with(&proxy.url(), "ping_interval = \"2s\"\nmissed_pings = 3", ""),
    )
    .await;
    wait_online(&edge, Duration::from_secs(60)).await;
    assert_eq!(edge_state(&edge).await.1, 0, "no offline entry before the test");

    // The line turns thin, then a 5 MB backlog arrives faster than it can carry.
    proxy.set_shape(LinkShape::line(Duration::from_millis(300), 64_000));
    let docs: Vec<String> = (0..10_000).map(order_document).collect();
    let total_bytes: usize = docs.iter().map(String::len).sum();
    assert!(total_bytes >= 5_000_000, "a 5 MB backlog ({total_bytes} B)");
    post_documents(&edge, "orders", &docs).await;

    // Online the whole time, sampled twice a second until the central holds everything.
    let started = Instant::now();
    let deadline = Duration::from_secs(900);
    let mut samples = 0u32;
    loop {
        let (state, offline_entries) = edge_state(&edge).await;
        assert_eq!(state, "online", "the edge left online after {:?} ({samples} samples)", started.elapsed());
        assert_eq!(offline_entries, 0, "an offline-log entry appeared after {:?}", started.elapsed());
        samples += 1;
        if central.client().queue("orders").await.is_some_and(|q| q.last_seq >= docs.len() as u64) {
            break;
        }
        assert!(started.elapsed() < deadline, "not drained within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "5 MB over 64 kbit/s 300 ms drained in {:?}, {} B on the wire",
        started.elapsed(),
        proxy.bytes_up()
    );
    assert_holds_exactly(&central, "orders", "store-slow", &docs).await;
    let (state, offline_entries) = edge_state(&edge).await;
    assert_eq!((state.as_str(), offline_entries), ("online", 0));
    // The central's own view never lost the edge either.
    let edges = central.client().get("/v1/edges").await.unwrap().json();
    let entry =
        edges.as_array().unwrap().iter().find(|e| e["id"] == "store-slow").expect("edge listed").clone();
    assert_eq!(entry["state"], "online", "{entry}");
    assert_eq!(entry["offline_log"].as_array().map_or(0, Vec::len), 0, "{entry}");
}

// ---------------------------------------------------------------------------------------------
// Connections per edge.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_traffic_over_a_slow_line_holds_one_batch_connection_and_idle_ones_close() {
    let central = start_central("hq", "").await;
    // 100 ms one way: a batch is answered 200 ms after it left, while messages keep coming.
    let proxy = LinkProxy::start(central.addr(), LinkShape::line(Duration::from_millis(100), 0));
    let edge = start_edge("store-live", &edge_config(&proxy.url(), "")).await;
    wait_online(&edge, Duration::from_secs(60)).await;

    // A message every 10 ms for 2 s, each its own commit: with several partial batches in flight
    // each would hold its own connection at the central; what arrives while a batch is in flight
    // goes in the next one.
    let docs: Vec<String> = (0..200).map(order_document).collect();
    let client = edge.client();
    let mut most_open = 0;
    for doc in &docs {
        client.post_message("orders", doc.clone()).await.expect("post").expect_status(202);
        most_open = most_open.max(proxy.open_connections());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_central_count(&central, "orders", docs.len() as u64, Duration::from_secs(60)).await;
    assert_holds_exactly(&central, "orders", "store-live", &docs).await;
    // One connection: the link stream, the batches and the reports answering pings are streams of
    // it (HTTP/2; over HTTP/1.1 it was the link stream, a batch connection and one a report opened
    // meanwhile).
    assert_eq!(most_open, 1, "connections open at once through the proxy");
    eprintln!(
        "live traffic: at most {most_open} connections open, {} accepted",
        proxy.accepted_connections()
    );

    // Traffic over, the batch (and control) connections close once idle: only the link stays.
    // The edge closes them 5 to 10 s after their last use (its pool checks every 5 s), before the
    // central would (after its request_timeout, 30 s).
    wait_until_async(Duration::from_secs(25), "only the link open through the proxy", || async {
        proxy.open_connections() == 1
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The bandwidth cap.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bandwidth_holds_over_every_2_s_window() {
    const CAP_BYTES_PER_SECOND: f64 = 256.0 * 1024.0;
    let central = start_central("hq", "").await;
    // An unshaped proxy: it only counts what the edge sends toward the central.
    let proxy = LinkProxy::start(central.addr(), LinkShape::default());
    proxy.refuse_connections(true);
    let edge = start_edge(
        "store-capped",
        &edge_config(&proxy.url(), "[forwarding]\nmax_bandwidth = \"256KiB\"\ncompression = \"none\"\n"),
    )
    .await;
    // About 15 s of backlog at the cap, stored while the central is out of reach.
    let docs: Vec<String> = (0..6_500).map(order_document).collect();
    post_documents(&edge, "orders", &docs).await;

    proxy.refuse_connections(false);
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut drain_estimate_seen = None;
    loop {
        samples.push((Instant::now(), proxy.bytes_up()));
        if central.client().queue("orders").await.is_some_and(|q| q.last_seq >= docs.len() as u64) {
            break;
        }
        if drain_estimate_seen.is_none() && samples.len().is_multiple_of(10) {
            // The catch-up is visible: /v1/status and the metric estimate when it drains.
            let status = edge.client().status().await;
            let backlog = &status["backlog"];
            if backlog["drain_seconds"].as_f64().is_some_and(|s| s > 0.0) {
                let text = edge.client().metrics().await;
                let metric = metrics::value(&text, "outpost_backlog_drain_seconds", &[("queue", "orders")]);
                assert!(metric.is_some_and(|s| s > 0.0), "outpost_backlog_drain_seconds: {metric:?}");
                assert!(
                    backlog["forward_rate_bytes_per_second"].as_u64().is_some_and(|r| r > 0),
                    "{backlog}"
                );
                drain_estimate_seen = Some(backlog["drain"].as_str().expect("drain text").to_string());
            }
        }
        assert!(Instant::now() < deadline, "not drained within 300 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_holds_exactly(&central, "orders", "store-capped", &docs).await;
    let drain = drain_estimate_seen.expect("a drain estimate while the backlog drained");
    assert!(drain.starts_with('~') && drain.contains(" at ") && drain.contains("B/s"), "{drain}");

    // Every window of at least 2 s between two samples, from 2 s after the first batch bytes
    // (warm-up: the handshake and the first batches) to the end.
    let first_bytes_at = samples.iter().find(|(_, bytes)| *bytes > 64 << 10).expect("bytes moved").0;
    let measured: Vec<&(Instant, u64)> =
        samples.iter().filter(|(at, _)| *at >= first_bytes_at + Duration::from_secs(2)).collect();
    let mut windows = 0;
    let mut highest = 0.0f64;
    for (i, (start_at, start_bytes)) in measured.iter().enumerate() {
        let Some((end_at, end_bytes)) =
            measured[i..].iter().find(|(at, _)| at.duration_since(*start_at) >= Duration::from_secs(2))
        else {
            break;
        };
        let rate = (end_bytes - start_bytes) as f64 / end_at.duration_since(*start_at).as_secs_f64();
        highest = highest.max(rate);
        windows += 1;
        assert!(
            rate <= CAP_BYTES_PER_SECOND * 1.10,
            "{rate:.0} B/s over a 2 s window, cap {CAP_BYTES_PER_SECOND} B/s (+10 %)"
        );
    }
    assert!(windows >= 10, "at least 10 windows measured ({windows})");
    eprintln!("max_bandwidth 256KiB: highest 2 s window {highest:.0} B/s over {windows} windows; drain estimate {drain}");
}

// ---------------------------------------------------------------------------------------------
// Priorities.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_0_overtakes_a_priority_9_backlog_and_each_queue_stays_in_order() {
    let central = start_central("hq", "").await;
    // 2 Mbit/s: the backlog takes several seconds, so the order of arrival is visible.
    let proxy = LinkProxy::start(central.addr(), LinkShape::line(Duration::from_millis(20), 2_000_000));
    proxy.refuse_connections(true);
    let edge = start_edge(
        "store-prio",
        &edge_config(
            &proxy.url(),
            r#"
[forwarding]
compression = "none"

[[queue]]
name = "alarms"
priority = 0

[[queue]]
name = "sales"
priority = 9
"#,
        ),
    )
    .await;
    // The sales history first, then the alarms: the alarms must still go first.
    let sales: Vec<String> = (0..3_000).map(order_document).collect();
    let alarms: Vec<String> = (0..1_000)
        .map(|i| format!(r#"{{"alarm":{i},"kind":"freezer_temperature","celsius":-{}}}"#, i % 30))
        .collect();
    post_documents(&edge, "sales", &sales).await;
    post_documents(&edge, "alarms", &alarms).await;

    proxy.refuse_connections(false);
    wait_central_count(&central, "sales", sales.len() as u64, Duration::from_secs(300)).await;
    wait_central_count(&central, "alarms", alarms.len() as u64, Duration::from_secs(300)).await;
    assert_holds_exactly(&central, "sales", "store-prio", &sales).await;
    assert_holds_exactly(&central, "alarms", "store-prio", &alarms).await;

    // When the central stored them: every alarm before the last of the sales backlog.
    let accepted = |messages: Vec<testkit::StoredMessage>| -> Vec<String> {
        messages.into_iter().map(|m| m.accepted_at).collect()
    };
    let sales_at = accepted(central.client().read_all("sales").await);
    let alarms_at = accepted(central.client().read_all("alarms").await);
    let last_alarm = alarms_at.iter().max().unwrap();
    let last_sale = sales_at.iter().max().unwrap();
    assert!(
        last_alarm < last_sale,
        "every priority-0 message reached the central ({last_alarm}) before the priority-9 backlog finished ({last_sale})"
    );
    // And most of the sales backlog came after the alarms.
    let sales_after = sales_at.iter().filter(|at| *at > last_alarm).count();
    assert!(sales_after * 2 > sales.len(), "{sales_after} of {} sales after the last alarm", sales.len());
}

// ---------------------------------------------------------------------------------------------
// Compression.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_stores_the_same_messages_with_fewer_bytes_and_works_with_a_central_without_it() {
    let docs: Vec<String> = (0..3_000).map(order_document).collect();
    let central = start_central("hq", "").await;
    let mut wire_bytes = BTreeMap::new();
    for (edge_id, compression) in [("store-zstd", "zstd"), ("store-plain", "none")] {
        let proxy = LinkProxy::start(central.addr(), LinkShape::default());
        proxy.refuse_connections(true);
        let edge = start_edge(
            edge_id,
            &edge_config(&proxy.url(), &format!("[forwarding]\ncompression = \"{compression}\"\n")),
        )
        .await;
        post_documents(&edge, "orders", &docs).await;
        proxy.refuse_connections(false);
        wait_until_async(Duration::from_secs(120), &format!("{edge_id} drained"), || async {
            held_from(&central, "orders", edge_id).await.len() == docs.len()
        })
        .await;
        assert_holds_exactly(&central, "orders", edge_id, &docs).await;
        let text = edge.client().metrics().await;
        let sent = metrics::value(&text, "outpost_forward_bytes_total", &[("encoding", compression)])
            .unwrap_or_else(|| {
                panic!("outpost_forward_bytes_total{{encoding={compression:?}}} missing:\n{text}")
            });
        assert!(sent > 0.0);
        wire_bytes.insert(compression, (proxy.bytes_up(), sent));
    }
    let (zstd_wire, zstd_frames) = wire_bytes["zstd"];
    let (plain_wire, plain_frames) = wire_bytes["none"];
    eprintln!("3,000 orders: {plain_wire} B on the wire plain ({plain_frames} B of frames), {zstd_wire} B with zstd ({zstd_frames} B)");
    assert!(zstd_wire * 2 < plain_wire, "zstd sends fewer bytes: {zstd_wire} vs {plain_wire}");
    assert!(zstd_frames * 2.0 < plain_frames);

    // A central configured without compression: the edge offers zstd, gets plain frames.
    let plain_central = start_central("hq-plain", "[forwarding]\ncompression = \"none\"\n").await;
    let edge = start_edge("store-offers-zstd", &edge_config(&plain_central.url(), "")).await;
    post_documents(&edge, "orders", &docs[..500]).await;
    wait_central_count(&plain_central, "orders", 500, Duration::from_secs(120)).await;
    assert_holds_exactly(&plain_central, "orders", "store-offers-zstd", &docs[..500]).await;
    let text = edge.client().metrics().await;
    assert!(
        metrics::value(&text, "outpost_forward_bytes_total", &[("encoding", "none")]).unwrap_or(0.0) > 0.0
    );
    assert!(
        metrics::value(&text, "outpost_forward_bytes_total", &[("encoding", "zstd")]).unwrap_or(0.0) == 0.0
    );
    wait_online(&edge, Duration::from_secs(30)).await;
}

/// A central answers 415 to a batch in an encoding it did not agree to, and refuses a zstd frame
/// that would decompress past its frame limit (a zip bomb) with 400 instead of buffering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_refuses_unagreed_encodings_and_zip_bombs() {
    use outpost_core::wire::{compress_frame, BATCH_CONTENT_TYPE, EDGE_ID_HEADER, LINK_MESSAGES_PATH};
    let plain = start_central("hq-plain", "[forwarding]\ncompression = \"none\"\n").await;
    let zstd =
        start_central("hq-zstd", "[limits]\nmax_message_bytes = \"1KiB\"\nmax_batch_messages = 10\n").await;
    let post = |node: &Node, encoding: &'static str, body: Vec<u8>| {
        let request = node
            .client()
            .request(reqwest::Method::POST, LINK_MESSAGES_PATH)
            .header(EDGE_ID_HEADER, "store-x")
            .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .header(reqwest::header::CONTENT_ENCODING, encoding)
            .body(body);
        async move { request.send().await.expect("post").status().as_u16() }
    };
    let bomb = compress_frame(&vec![b'x'; 32 << 20]);
    assert_eq!(post(&plain, "zstd", bomb.clone()).await, 415);
    assert_eq!(post(&zstd, "br", b"whatever".to_vec()).await, 415);
    assert_eq!(post(&zstd, "zstd", bomb).await, 400);
    assert!(zstd.client().healthy().await);
}
