//! The central's side of the edge link, end to end over HTTP: a real store in a temporary directory,
//! the API served on 127.0.0.1:0, and a plain HTTP client playing the edge and the operator.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_api::ApiState;
use outpost_central::CentralHub;
use outpost_core::config::{AuthConfig, EdgeCredential};
use outpost_core::metrics::Metrics;
use outpost_core::status::{LinkStatus, OfflineLogEntry};
use outpost_core::wire::{
    Batch, BatchAck, BatchMessage, EdgeReport, Hello, LinkEvent, ProbeAnswer, BATCH_CONTENT_TYPE,
    EDGE_ID_HEADER,
};
use outpost_core::{Config, Flags, Role};
use outpost_store::{Store, StoreError, StoreOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);
const ADMIN_TOKEN: &str = "admin-token";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

struct Central {
    url: String,
    http: reqwest::Client,
    store: Store,
    hub: Arc<CentralHub>,
    /// The token each listed edge presents.
    edge_tokens: BTreeMap<String, String>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

fn central_config(data_dir: &Path) -> Config {
    let mut config = Config::load_from(Role::Central, &Flags::default(), &[]).unwrap();
    config.node_id = "central-test".into();
    config.data_dir = data_dir.to_path_buf();
    config
}

async fn open_store(config: &Config) -> Store {
    let deadline = Instant::now() + DEADLINE;
    loop {
        // A previous central on this directory may still be letting go of its store handles.
        match Store::open(&config.data_dir, StoreOptions::keep_everything(1 << 30, &config.node_id), None) {
            Ok(store) => return store,
            Err(StoreError::DirectoryInUse(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("cannot open the store: {e}"),
        }
    }
}

impl Central {
    async fn start(config: Config) -> Central {
        let config = Arc::new(config);
        let store = open_store(&config).await;
        let metrics = Arc::new(Metrics::new());
        let hub = CentralHub::start(
            store.clone(),
            config.clone(),
            metrics.clone(),
            outpost_core::time::now_unix_ms(),
        )
        .await
        .unwrap();
        let (_link_tx, link_rx) = watch::channel(LinkStatus::new("online", 0));
        let mut state = ApiState::new(config, store.clone(), metrics, link_rx);
        state.central = Some(hub.clone());
        Central::serve(state, store, hub).await
    }

    async fn serve(state: ApiState, store: Store, hub: Arc<CentralHub>) -> Central {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let edge_tokens = state.config.edges.iter().map(|e| (e.id.clone(), e.token.clone())).collect();
        let server = tokio::spawn(outpost_api::serve(listener, state, None, async {
            let _ = stopped.await;
        }));
        Central {
            url,
            http: reqwest::Client::new(),
            store,
            hub,
            edge_tokens,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops serving (gracefully, as on SIGTERM) and closes the store.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let server = self.server.take().unwrap();
        tokio::time::timeout(DEADLINE, server)
            .await
            .expect("the server stops within the deadline even with links open")
            .unwrap()
            .unwrap();
        self.store.shutdown().await;
    }

    /// A link request as `edge` sends it, with the token listed for it (if any).
    fn edge_call(&self, method: reqwest::Method, path: &str, edge: &str) -> reqwest::RequestBuilder {
        let token = self.edge_tokens.get(edge).filter(|t| !t.is_empty()).cloned();
        self.edge_request(method, path, edge, token.as_deref())
    }

    fn edge_request(
        &self,
        method: reqwest::Method,
        path: &str,
        edge: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut request =
            self.http.request(method, format!("{}{path}", self.url)).header(EDGE_ID_HEADER, edge);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
    }

    async fn handshake(&self, edge: &str, token: Option<&str>, hello: &Hello) -> reqwest::Response {
        self.edge_request(reqwest::Method::POST, "/v1/link", edge, token).json(hello).send().await.unwrap()
    }

    async fn open_link(&self, edge: &str, ping_interval_ms: u64) -> EventReader {
        let hello = hello(edge, ping_interval_ms, report("transition_to_online"));
        let response =
            self.edge_call(reqwest::Method::POST, "/v1/link", edge).json(&hello).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        EventReader { response, buffer: Vec::new() }
    }

    async fn send_batch(
        &self,
        edge: &str,
        queue: &str,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> reqwest::Response {
        self.edge_call(reqwest::Method::POST, "/v1/link/messages", edge)
            .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .body(batch(queue, seqs).encode())
            .send()
            .await
            .unwrap()
    }

    async fn probe(&self, edge: &str) -> ProbeAnswer {
        let response = self.edge_call(reqwest::Method::GET, "/v1/link/probe", edge).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut request = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    async fn edges(&self) -> Vec<Value> {
        let response = self.admin(reqwest::Method::GET, "/v1/edges", None).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    async fn edge(&self, id: &str) -> Value {
        self.edges()
            .await
            .into_iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("edge {id} not listed"))
    }

    async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap()
    }

    /// The edge seqs stored in `queue`, in the central's order.
    async fn stored_origin_seqs(&self, queue: &str) -> Vec<(String, u64)> {
        let messages = self.store.read(queue, 0, 10_000).await.unwrap();
        messages.into_iter().map(|m| (m.origin, m.origin_seq)).collect()
    }
}

/// Reads a link's NDJSON event stream.
struct EventReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl EventReader {
    /// The next event, or `None` when the central ended the stream.
    async fn try_next(&mut self) -> Option<LinkEvent> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(newline) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=newline).collect();
                return Some(
                    serde_json::from_slice(&line[..newline]).expect("each line is one JSON link event"),
                );
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no link event within {DEADLINE:?}"),
            }
        }
    }

    async fn next(&mut self) -> LinkEvent {
        self.try_next().await.expect("the link stream ended")
    }

    /// The next event that is not a ping.
    async fn next_event(&mut self) -> LinkEvent {
        loop {
            match self.next().await {
                LinkEvent::Ping { .. } => continue,
                other => return other,
            }
        }
    }
}

fn report(state: &str) -> EdgeReport {
    EdgeReport {
        state: state.into(),
        state_since_ms: 1_795_323_662_123,
        upstream_url: Some("http://central-test:7401".into()),
        backlog_messages: 42,
        offline_log: Vec::new(),
    }
}

fn hello(edge: &str, ping_interval_ms: u64, report: EdgeReport) -> Hello {
    Hello {
        edge_id: edge.into(),
        version: outpost_core::VERSION.into(),
        ping_interval_ms,
        missed_pings: None,
        report,
        released_unforwarded: Default::default(),
        batch_encodings: Vec::new(),
    }
}

fn batch(queue: &str, seqs: std::ops::RangeInclusive<u64>) -> Batch {
    Batch {
        queue: queue.into(),
        messages: seqs
            .map(|seq| BatchMessage {
                seq,
                id: format!("edge-message-{seq}"),
                content_type: "application/json".into(),
                payload: Bytes::from(format!("{{\"n\":{seq}}}")),
            })
            .collect(),
    }
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap_or_default().to_string())
}

async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The link stream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn handshake_answers_welcome_then_pings_at_the_requested_interval() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    let mut link = central.open_link("store-1", 100).await;
    assert_eq!(link.response.headers()[reqwest::header::CONTENT_TYPE], "application/x-ndjson");
    assert_eq!(
        link.next().await,
        LinkEvent::Welcome {
            central_id: "central-test".into(),
            maintenance: false,
            positions: BTreeMap::new(),
            downlink: BTreeMap::new(),
            batch_encoding: None,
        }
    );
    let started = Instant::now();
    let mut pings = Vec::new();
    while pings.len() < 3 {
        match link.next().await {
            LinkEvent::Ping { at_ms, downlink } if downlink.is_empty() => pings.push(at_ms),
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(280), "3 pings at 100 ms came after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "3 pings at 100 ms took {elapsed:?}");
    assert!(pings.windows(2).all(|w| w[1] >= w[0] + 90), "ping times {pings:?}");

    // An interval below the floor is clamped to 100 ms rather than flooding the link.
    let mut fast = central.open_link("store-2", 1).await;
    fast.next().await;
    let started = Instant::now();
    fast.next().await;
    fast.next().await;
    assert!(started.elapsed() >= Duration::from_millis(180));
    drop((link, fast));
    central.stop().await;
}

#[tokio::test]
async fn welcome_carries_the_positions_the_central_holds() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    assert_eq!(central.send_batch("store-1", "orders", 1..=5).await.status(), StatusCode::OK);
    assert_eq!(central.send_batch("store-1", "audit", 1..=2).await.status(), StatusCode::OK);
    assert_eq!(central.send_batch("store-2", "orders", 1..=7).await.status(), StatusCode::OK);
    let mut link = central.open_link("store-1", 60_000).await;
    let LinkEvent::Welcome { positions, .. } = link.next().await else { panic!("no welcome") };
    assert_eq!(positions, BTreeMap::from([("audit".to_string(), 2), ("orders".to_string(), 5)]));
    drop(link);
    central.stop().await;
}

#[tokio::test]
async fn handshake_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    let mut other_major = hello("store-1", 1000, report("offline"));
    other_major.version = "999.0.0".into();
    let answer = central.handshake("store-1", None, &other_major).await;
    assert_eq!(error_code(answer).await, (StatusCode::CONFLICT, "version_mismatch".into()));
    let answer = central.handshake("store-2", None, &hello("store-1", 1000, report("offline"))).await;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "edge id in the body differs from the header");
    let answer = central.handshake("store-1", None, &hello("store-1", 1000, report("sleeping"))).await;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "unknown state");
    let answer = central
        .edge_request(reqwest::Method::POST, "/v1/link", "store-1", None)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    let answer = central
        .edge_request(reqwest::Method::POST, "/v1/link", "store-1", None)
        .body(vec![b' '; 300 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    central.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn batches_are_stored_once_and_a_gap_answers_expected_seq() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;

    let answer = central.send_batch("store-1", "orders", 1..=3).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let ack: BatchAck = answer.json().await.unwrap();
    assert_eq!(ack, BatchAck { queue: "orders".into(), stored_through: 3, stored: 3, duplicates: 0 });

    // A resend (the edge never saw the ack) stores nothing twice.
    let ack: BatchAck = central.send_batch("store-1", "orders", 1..=3).await.json().await.unwrap();
    assert_eq!((ack.stored_through, ack.stored, ack.duplicates), (3, 0, 3));
    let ack: BatchAck = central.send_batch("store-1", "orders", 2..=5).await.json().await.unwrap();
    assert_eq!((ack.stored_through, ack.stored, ack.duplicates), (5, 2, 2));

    // Past a gap: after waiting for a predecessor that never comes, 409 with where to resume.
    let started = Instant::now();
    let answer = central.send_batch("store-1", "orders", 8..=9).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "waited {:?} for a predecessor",
        started.elapsed()
    );
    assert_eq!(answer.status(), StatusCode::CONFLICT);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["expected_seq"], 6);
    assert_eq!(body["error"]["code"], "gap");

    let stored = central.stored_origin_seqs("orders").await;
    assert_eq!(stored, (1..=5).map(|seq| ("store-1".to_string(), seq)).collect::<Vec<_>>());
    let metrics = central.metrics().await;
    assert_eq!(metric_value(&metrics, "outpost_duplicates_dropped_total"), Some(5.0));
    assert_eq!(metric_value(&metrics, "outpost_messages_accepted_total{queue=\"orders\"}"), Some(5.0));
    central.stop().await;
}

#[tokio::test]
async fn malformed_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = central_config(dir.path());
    config.limits.max_message_bytes = 1000;
    config.limits.max_batch_messages = 4;
    let central = Central::start(config).await;
    let send = |body: Vec<u8>, content_type: &'static str| {
        central
            .edge_request(reqwest::Method::POST, "/v1/link/messages", "store-1", None)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
    };
    let answer = send(b"OPB1garbage".to_vec(), BATCH_CONTENT_TYPE).await.unwrap();
    assert_eq!(error_code(answer).await, (StatusCode::BAD_REQUEST, "bad_frame".into()));
    let answer = send(batch("orders", 1..=5).encode(), BATCH_CONTENT_TYPE).await.unwrap();
    assert_eq!(
        error_code(answer).await,
        (StatusCode::BAD_REQUEST, "bad_frame".into()),
        "over max_batch_messages"
    );
    let answer = send(batch("orders", 1..=2).encode(), "application/json").await.unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    // 4 × (1000 + 300) bytes is the most a frame may be.
    let answer = send(vec![0; 5201], BATCH_CONTENT_TYPE).await.unwrap();
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(central.store.queue("orders").is_none(), "a refused batch stores nothing");
    central.stop().await;
}

#[tokio::test]
async fn out_of_order_batches_in_flight_are_stored_in_edge_order() {
    let dir = tempfile::tempdir().unwrap();
    let central = Arc::new(Central::start(central_config(dir.path())).await);
    // The second batch overtakes the first: it reaches the central first and waits for it.
    let second = {
        let central = central.clone();
        tokio::spawn(async move { central.send_batch("store-1", "orders", 4..=6).await })
    };
    // The central notes the edge as seen before the batch waits for its predecessor.
    wait_until("the overtaking batch reached the central", || async {
        central.admin(reqwest::Method::GET, "/v1/edges/store-1", None).await.status() == StatusCode::OK
    })
    .await;
    assert!(!second.is_finished(), "the overtaking batch waits for its predecessor");
    let started = Instant::now();
    let first = central.send_batch("store-1", "orders", 1..=3).await;
    let second = second.await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(1500), "the waiting batch went on at the commit");
    let ack: BatchAck = second.json().await.unwrap();
    assert_eq!((ack.stored_through, ack.stored), (6, 3));
    let stored = central.stored_origin_seqs("orders").await;
    assert_eq!(stored, (1..=6).map(|seq| ("store-1".to_string(), seq)).collect::<Vec<_>>());
    Arc::into_inner(central).unwrap().stop().await;
}

// ---------------------------------------------------------------------------------------------
// Authentication and roles
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn listed_edges_must_present_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = central_config(dir.path());
    config.edges = vec![EdgeCredential { id: "store-1".into(), token: "store-1-token".into() }];
    config.auth = Some(AuthConfig {
        client_tokens: vec!["client-token".into()],
        admin_tokens: vec![ADMIN_TOKEN.into()],
    });
    let central = Central::start(config).await;
    let probe = |edge: &'static str, token: Option<&'static str>| {
        central.edge_request(reqwest::Method::GET, "/v1/link/probe", edge, token).send()
    };
    assert_eq!(
        error_code(probe("store-1", None).await.unwrap()).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    assert_eq!(
        error_code(probe("store-1", Some("wrong")).await.unwrap()).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    assert_eq!(
        error_code(probe("store-1", Some(ADMIN_TOKEN)).await.unwrap()).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        error_code(probe("store-9", Some("store-1-token")).await.unwrap()).await,
        (StatusCode::FORBIDDEN, "edge_not_allowed".into())
    );
    let no_id = central.http.get(format!("{}/v1/link/probe", central.url)).send().await.unwrap();
    assert_eq!(no_id.status(), StatusCode::BAD_REQUEST);
    let answer = probe("store-1", Some("store-1-token")).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: ProbeAnswer = answer.json().await.unwrap();
    assert_eq!(
        answer,
        ProbeAnswer { central_id: "central-test".into(), maintenance: false, transition_requested: false }
    );

    // Every link endpoint checks the edge, not only the probe.
    let link = central.handshake("store-1", Some("wrong"), &hello("store-1", 1000, report("offline"))).await;
    assert_eq!(link.status(), StatusCode::UNAUTHORIZED);
    let link =
        central.handshake("store-1", Some("store-1-token"), &hello("store-1", 1000, report("offline"))).await;
    assert_eq!(link.status(), StatusCode::OK);
    let unauthenticated_batch = central
        .edge_request(reqwest::Method::POST, "/v1/link/messages", "store-1", None)
        .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
        .body(batch("orders", 1..=1).encode())
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated_batch.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(central.send_batch("store-1", "orders", 1..=1).await.status(), StatusCode::OK);
    let report_answer = central
        .edge_request(reqwest::Method::POST, "/v1/link/report", "store-9", None)
        .json(&report("online"))
        .send()
        .await
        .unwrap();
    assert_eq!(report_answer.status(), StatusCode::FORBIDDEN);

    // Operator endpoints need an admin token.
    let edges = central.http.get(format!("{}/v1/edges", central.url)).send().await.unwrap();
    assert_eq!(edges.status(), StatusCode::UNAUTHORIZED);
    let edges = central
        .http
        .get(format!("{}/v1/edges", central.url))
        .bearer_auth("client-token")
        .send()
        .await
        .unwrap();
    assert_eq!(edges.status(), StatusCode::FORBIDDEN);
    drop(link);
    central.stop().await;
}

#[tokio::test]
async fn an_edge_node_has_no_central_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = central_config(dir.path());
    config.role = Role::Edge;
    let config = Arc::new(config);
    let store = open_store(&config).await;
    let (_link_tx, link_rx) = watch::channel(LinkStatus::new("offline", 0));
    let state = ApiState::new(config, store.clone(), Arc::new(Metrics::new()), link_rx);
    // A hub is needed only to build the harness; the edge's state has none.
    let hub_dir = tempfile::tempdir().unwrap();
    let hub_store = open_store(&central_config(hub_dir.path())).await;
    let hub = CentralHub::start(
        hub_store,
        Arc::new(central_config(hub_dir.path())),
        Arc::new(Metrics::new()),
        outpost_core::time::now_unix_ms(),
    )
    .await
    .unwrap();
    let edge = Central::serve(state, store, hub).await;
    for (method, path) in [
        (reqwest::Method::POST, "/v1/link"),
        (reqwest::Method::POST, "/v1/link/messages"),
        (reqwest::Method::POST, "/v1/link/report"),
        (reqwest::Method::GET, "/v1/link/probe"),
        (reqwest::Method::GET, "/v1/edges"),
        (reqwest::Method::POST, "/v1/edges/store-1/transition-online"),
        (reqwest::Method::POST, "/v1/admin/maintenance"),
    ] {
        let answer = edge.edge_request(method.clone(), path, "store-1", None).send().await.unwrap();
        let status = answer.status();
        let body: Value = answer.json().await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "{method} {path}"
        );
        assert!(body["error"]["message"].as_str().unwrap().contains("central only"), "{body}");
    }
    edge.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Operator: maintenance, transition to online, the edge list
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn maintenance_reaches_open_links_new_handshakes_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    let mut link = central.open_link("store-1", 60_000).await;
    assert!(matches!(link.next().await, LinkEvent::Welcome { maintenance: false, .. }));

    let answer =
        central.admin(reqwest::Method::POST, "/v1/admin/maintenance", Some(json!({"enabled": true}))).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.json::<Value>().await.unwrap(), json!({"maintenance": true}));
    assert_eq!(link.next_event().await, LinkEvent::Maintenance { enabled: true });
    assert!(central.hub.maintenance());

    let mut second = central.open_link("store-2", 60_000).await;
    assert!(matches!(second.next().await, LinkEvent::Welcome { maintenance: true, .. }));
    let answer = central.send_batch("store-1", "orders", 1..=2).await;
    assert!(answer.headers().contains_key(reqwest::header::RETRY_AFTER));
    assert_eq!(error_code(answer).await, (StatusCode::SERVICE_UNAVAILABLE, "maintenance".into()));
    assert!(central.probe("store-1").await.maintenance);

    let answer =
        central.admin(reqwest::Method::POST, "/v1/admin/maintenance", Some(json!({"enabled": false}))).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(link.next_event().await, LinkEvent::Maintenance { enabled: false });
    assert_eq!(second.next_event().await, LinkEvent::Maintenance { enabled: false });
    assert_eq!(central.send_batch("store-1", "orders", 1..=2).await.status(), StatusCode::OK);

    let bad =
        central.admin(reqwest::Method::POST, "/v1/admin/maintenance", Some(json!({"enabled": "yes"}))).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    drop((link, second));
    central.stop().await;
}

#[tokio::test]
async fn transition_online_goes_on_the_link_or_waits_for_the_next_probe() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = central_config(dir.path());
    config.edges = vec![
        EdgeCredential { id: "store-1".into(), token: "store-1-token".into() },
        EdgeCredential { id: "store-2".into(), token: String::new() },
    ];
    let central = Central::start(config).await;
    let operator = &central;
    let transition = |edge: &str| {
        let path = format!("/v1/edges/{edge}/transition-online");
        async move { operator.admin(reqwest::Method::POST, &path, None).await }
    };
    let mut link = central.open_link("store-1", 60_000).await;
    link.next().await;

    let answer = transition("store-1").await;
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    assert_eq!(answer.json::<Value>().await.unwrap()["delivery"], "link");
    assert_eq!(link.next_event().await, LinkEvent::TransitionOnline);
    assert!(!central.probe("store-1").await.transition_requested, "delivered on the link, not again");

    assert_eq!(error_code(transition("store-9").await).await, (StatusCode::NOT_FOUND, "not_found".into()));
    assert_eq!(transition("bad%20id").await.status(), StatusCode::BAD_REQUEST);

    // Known (listed) but not connected: held for the edge's next probe, answered once.
    let answer = transition("store-2").await;
    assert_eq!(answer.status(), StatusCode::ACCEPTED);
    assert_eq!(answer.json::<Value>().await.unwrap()["delivery"], "next_probe");
    assert!(central.probe("store-2").await.transition_requested);
    assert!(!central.probe("store-2").await.transition_requested);

    // Seen before, now disconnected.
    drop(link);
    wait_until("store-1 is disconnected", || async { !central.hub.edge("store-1").unwrap().connected }).await;
    let answer = transition("store-1").await;
    assert_eq!(answer.json::<Value>().await.unwrap()["delivery"], "next_probe");
    assert!(central.probe("store-1").await.transition_requested);
    central.stop().await;
}

#[tokio::test]
async fn edges_show_reports_offline_logs_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = central_config(dir.path());
    config.edges = vec![
        EdgeCredential { id: "store-1".into(), token: "store-1-token".into() },
        EdgeCredential { id: "store-2".into(), token: "store-2-token".into() },
    ];
    let central = Central::start(config).await;
    let mut handshake_report = report("transition_to_online");
    handshake_report.offline_log = vec![OfflineLogEntry {
        at: "2026-11-22T05:01:02.123Z".into(),
        cause: "central_unreachable".into(),
        detail: "http://central-test:7401: connection refused".into(),
    }];
    let mut link = central
        .handshake("store-1", Some("store-1-token"), &hello("store-1", 60_000, handshake_report.clone()))
        .await;
    assert_eq!(link.status(), StatusCode::OK);
    let _ = link.chunk().await;

    let mut online = handshake_report.clone();
    online.state = "online".into();
    online.state_since_ms += 5000;
    online.backlog_messages = 0;
    let answer = central
        .edge_call(reqwest::Method::POST, "/v1/link/report", "store-1")
        .json(&online)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);

    let edges = central.edges().await;
    assert_eq!(edges.len(), 2);
    let store_1 = &edges[0];
    assert_eq!(store_1["id"], "store-1");
    assert_eq!(store_1["state"], "online");
    assert_eq!(store_1["state_since"], "2026-11-22T05:01:07.123Z");
    assert_eq!(store_1["upstream_url"], "http://central-test:7401");
    assert_eq!(store_1["backlog_messages"], 0);
    assert_eq!(store_1["connected"], true);
    assert!(store_1["last_seen"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        store_1["offline_log"],
        json!([{"at": "2026-11-22T05:01:02.123Z", "cause": "central_unreachable",
                "detail": "http://central-test:7401: connection refused"}])
    );
    let store_2 = &edges[1];
    assert_eq!(
        (store_2["id"].as_str(), store_2["state"].as_str(), store_2["connected"].as_bool()),
        (Some("store-2"), Some("unknown"), Some(false))
    );
    assert!(store_2["last_seen"].is_null() && store_2["state_since"].is_null());

    let metrics = central.metrics().await;
    assert_eq!(metric_value(&metrics, "outpost_edges{state=\"online\"}"), Some(1.0));
    assert_eq!(metric_value(&metrics, "outpost_edges{state=\"unknown\"}"), Some(1.0));
    assert_eq!(metric_value(&metrics, "outpost_edges{state=\"transition_to_online\"}"), Some(0.0));
    drop(link);
    central.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Link lifetime, persistence and shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_closed_or_replaced_link_marks_the_edge_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    let mut first = central.open_link("store-1", 60_000).await;
    first.next().await;
    assert_eq!(central.edge("store-1").await["connected"], true);

    // A newer link of the same edge replaces the older one, whose stream ends.
    let mut second = central.open_link("store-1", 60_000).await;
    second.next().await;
    assert_eq!(first.try_next().await, None, "the replaced link's stream ends");
    drop(first);
    assert_eq!(central.edge("store-1").await["connected"], true, "the newer link is still open");

    // The edge going away (the client closes its connection) marks it disconnected.
    drop(second);
    wait_until("the edge is marked disconnected", || async {
        central.edge("store-1").await["connected"] == false
    })
    .await;
    central.stop().await;
}

#[tokio::test]
async fn the_registry_and_maintenance_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    let link = central.handshake("store-1", None, &hello("store-1", 60_000, report("offline"))).await;
    assert_eq!(link.status(), StatusCode::OK);
    // A flood of reports that change nothing but the backlog: the last one is persisted (deferred).
    for backlog_messages in 1..=50 {
        let report = EdgeReport { backlog_messages, ..report("offline") };
        let answer = central
            .edge_request(reqwest::Method::POST, "/v1/link/report", "store-1", None)
            .json(&report)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    }
    // The reports after the handshake's write are held back (checked well inside the 2 s window),
    // then the newest is written once.
    let document = || async {
        let documents = central.store.documents("edge:store-1").await.unwrap();
        serde_json::from_str::<Value>(&documents["edge:store-1"]).unwrap()
    };
    assert_eq!(document().await["report"]["backlog_messages"], 42, "held back, not written per report");
    central.admin(reqwest::Method::POST, "/v1/admin/maintenance", Some(json!({"enabled": true}))).await;
    wait_until("the newest report is persisted", || async {
        document().await["report"]["backlog_messages"] == 50
    })
    .await;
    drop(link);
    let hub = central.hub.clone();
    central.stop().await;
    drop(hub);

    let central = Central::start(central_config(dir.path())).await;
    assert!(central.hub.maintenance());
    let store_1 = central.edge("store-1").await;
    assert_eq!(
        (store_1["state"].as_str(), store_1["backlog_messages"].as_u64()),
        (Some("offline"), Some(50))
    );
    assert_eq!(store_1["connected"], false);
    central.stop().await;
}

#[tokio::test]
async fn stopping_the_central_ends_open_links() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(central_config(dir.path())).await;
    let mut link = central.open_link("store-1", 60_000).await;
    link.next().await;
    let hub = central.hub.clone();
    // `stop` fails if graceful shutdown waits for the open stream.
    central.stop().await;
    assert_eq!(link.try_next().await, None);
    assert!(!hub.edge("store-1").unwrap().connected);
}
