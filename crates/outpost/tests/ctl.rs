//! `outpost ctl` (CONTRACT section 8) against real nodes: the tables and `--json` of `status`,
//! `online` with and without an upstream, the error and exit code when nothing listens,
//! `OUTPOST_URL` and `OUTPOST_TOKEN`, and the central's `edges` and `maintenance on|off`.

use std::time::Duration;

use testkit::{free_port, wait_until_async, Node};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
/// How long an edge may take to reach a state after a change at the central.
const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one `outpost ctl …` run printed and how it ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn expect_success(&self) -> &str {
        assert_eq!(self.code, Some(0), "ctl should succeed: {self:#?}");
        &self.stdout
    }

    fn expect_code(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "ctl should exit {code}: {self:#?}");
        &self.stderr
    }
}

/// Runs `outpost ctl ARGS` with only the `OUTPOST_*` variables in `env` (none inherited from the
/// test's environment).
async fn ctl_with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(OUTPOST);
    command.arg("ctl").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OUTPOST_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("ctl finished within 60 s")
        .expect("run outpost ctl");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn ctl(args: &[&str]) -> Run {
    ctl_with_env(args, &[]).await
}

/// An edge with short connectivity intervals, so maintenance shows within seconds.
fn edge_config(central_url: &str) -> String {
    format!(
        r#"
[[upstream]]
url = "{central_url}"

[connectivity]
ping_interval = "1s"
offline_probe_interval = "1s"
transition_to_offline_wait = "0s"
failed_transition_wait = "1s"

[failover]
connect_timeout = "1s"
"#
    )
}

async fn start_central() -> Node {
    Node::builder(OUTPOST).role("central").args(["--node-id", "hq"]).start().await
}

async fn start_edge(central: &Node, id: &str) -> Node {
    Node::builder(OUTPOST).args(["--node-id", id]).config(&edge_config(&central.url())).start().await
}

async fn wait_state(node: &Node, want: &str) {
    wait_until_async(STATE_TIMEOUT, &format!("{} in state {want}", node.url()), || async {
        node.client().status().await["state"] == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_a_table_and_the_api_json() {
    let edge = Node::builder(OUTPOST).args(["--node-id", "store-042"]).start().await;
    edge.client().post_message("orders", "one").await.unwrap().accepted();
    let url = edge.url();

    let table = ctl(&["--url", &url, "status"]).await.expect_success().to_string();
    for expected in [
        "store-042",
        "(edge, outpost ",
        "state      offline  since ",
        "upstream   none",
        "backlog    1 message, 3 B, oldest ",
        "offline log (newest last, 1 of 1):",
        "no_upstream",
    ] {
        assert!(table.contains(expected), "{expected:?} missing from:\n{table}");
    }
    // Columns line up: every value of the key/value block starts at the same column.
    let value_column = |line: &str| {
        let label_end = line.find("  ").unwrap_or_else(|| panic!("no value column in {line:?}"));
        line.len() - line[label_end..].trim_start().len()
    };
    let value_columns: Vec<usize> = table.lines().take(5).map(value_column).collect();
    assert!(value_columns.windows(2).all(|w| w[0] == w[1]), "aligned values:\n{table}");

    // --json is the API's JSON, as a flag before or after the command.
    for args in [vec!["--url", &url, "--json", "status"], vec!["--url", &url, "status", "--json"]] {
        let json: serde_json::Value = serde_json::from_str(ctl(&args).await.expect_success()).expect("JSON");
        assert_eq!(json["node_id"], "store-042");
        assert_eq!(json["role"], "edge");
        assert_eq!(json["backlog"]["messages"], 1);
        assert_eq!(json["offline_log"][0]["cause"], "no_upstream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn online_on_an_edge_without_an_upstream_says_why_it_cannot() {
    let edge = Node::builder(OUTPOST).start().await;
    let url = edge.url();
    let stderr = ctl(&["--url", &url, "online"]).await.expect_code(1).to_string();
    let endpoint = format!("POST {url}/v1/admin/transition-online");
    for expected in [endpoint.as_str(), "HTTP 404", "only an edge with a configured upstream"] {
        assert!(stderr.contains(expected), "{expected:?} missing from: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn online_on_an_edge_with_an_upstream_is_accepted() {
    let central = start_central().await;
    let edge = start_edge(&central, "store-7").await;
    let stdout = ctl(&["--url", &edge.url(), "online"]).await.expect_success().to_string();
    assert!(stdout.contains("transition to online requested"), "{stdout}");
    wait_state(&edge, "online").await;
}

#[tokio::test]
async fn nothing_listening_exits_1_asking_whether_outpost_runs_there() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let run = ctl(&["--url", &url, "status"]).await;
    let stderr = run.expect_code(1);
    assert!(stderr.contains(&format!("is outpost running at {url}?")), "{stderr}");
    assert!(run.stdout.is_empty(), "nothing on stdout: {run:#?}");
}

#[tokio::test]
async fn usage_errors_exit_2() {
    for args in [
        &["maintenance", "maybe"][..],
        &["no-such-command"],
        &["resubmit"],
        &["resubmit", "a", "--route", "r"],
        &["discard"],
        &["--url", "ftp://x", "status"],
        &["store", "bad/name"],
    ] {
        ctl(args).await.expect_code(2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_url_and_token_come_from_the_environment() {
    let edge = Node::builder(OUTPOST)
        .args(["--node-id", "env-edge"])
        .config("[auth]\nadmin_tokens = [\"secret-admin\"]\n")
        .start()
        .await;
    let url = edge.url();

    let stderr = ctl_with_env(&["status"], &[("OUTPOST_URL", &url)]).await.expect_code(1).to_string();
    assert!(stderr.contains("HTTP 401") && stderr.contains("--token"), "{stderr}");

    let run = ctl_with_env(&["status"], &[("OUTPOST_URL", &url), ("OUTPOST_TOKEN", "secret-admin")]).await;
    assert!(run.expect_success().contains("env-edge"), "{run:#?}");
    // --url wins over OUTPOST_URL.
    let elsewhere = format!("http://127.0.0.1:{}", free_port());
    let run =
        ctl_with_env(&["--url", &url, "--token", "secret-admin", "status"], &[("OUTPOST_URL", &elsewhere)])
            .await;
    assert!(run.expect_success().contains("env-edge"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn edges_lists_what_each_edge_reported() {
    let central = start_central().await;
    let edge = start_edge(&central, "store-9").await;
    wait_state(&edge, "online").await;
    let url = central.url();

    wait_until_async(STATE_TIMEOUT, "the central shows store-9 online", || async {
        central
            .client()
            .get("/v1/edges")
            .await
            .unwrap()
            .json()
            .as_array()
            .is_some_and(|edges| edges.iter().any(|e| e["id"] == "store-9" && e["state"] == "online"))
    })
    .await;
    let table = ctl(&["--url", &url, "edges"]).await.expect_success().to_string();
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("EDGE") && header.contains("STATE") && header.contains("LAST SEEN"),
        "{table}"
    );
    let row =
        lines.find(|line| line.starts_with("store-9")).unwrap_or_else(|| panic!("no store-9 row:\n{table}"));
    assert!(row.contains("online") && row.contains(&url), "{row}");
    assert_eq!(header.find("STATE"), row.find("online"), "STATE column aligned:\n{table}");

    let json: serde_json::Value =
        serde_json::from_str(ctl(&["--url", &url, "--json", "edges"]).await.expect_success()).unwrap();
    assert!(json.as_array().unwrap().iter().any(|e| e["id"] == "store-9"), "{json}");

    let stderr = ctl(&["--url", &url, "edge-online", "no-such-edge"]).await.expect_code(1).to_string();
    assert!(stderr.contains("HTTP 404") && stderr.contains("no-such-edge"), "{stderr}");
    ctl(&["--url", &url, "edge-online", "store-9"]).await.expect_success();
}

#[tokio::test(flavor = "multi_thread")]
async fn maintenance_on_takes_edges_offline_and_off_brings_them_back() {
    let central = start_central().await;
    let edge = start_edge(&central, "store-11").await;
    wait_state(&edge, "online").await;
    let url = central.url();

    let stdout = ctl(&["--url", &url, "maintenance", "on"]).await.expect_success().to_string();
    assert!(stdout.contains("maintenance on"), "{stdout}");
    wait_state(&edge, "offline").await;
    let central_status = ctl(&["--url", &url, "status"]).await.expect_success().to_string();
    assert!(
        central_status.lines().any(|line| line.starts_with("state") && line.contains(" maintenance ")),
        "the central shows maintenance:\n{central_status}"
    );
    let status = ctl(&["--url", &edge.url(), "status"]).await.expect_success().to_string();
    assert!(status.contains("maintenance"), "the edge's offline log names the cause:\n{status}");

    let stdout = ctl(&["--url", &url, "maintenance", "off"]).await.expect_success().to_string();
    assert!(stdout.contains("maintenance off"), "{stdout}");
    wait_state(&edge, "online").await;
}

/// A downstream service in the test process that refuses everything with 400, so every message a
/// route delivers to it fails at once (poison).
async fn refusing_downstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/erp", listener.local_addr().unwrap());
    let app =
        axum::Router::new().fallback(|| async { (axum::http::StatusCode::BAD_REQUEST, "no such order") });
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, task)
}

async fn failed_entries(url: &str) -> Vec<serde_json::Value> {
    let run = ctl(&["--url", url, "--json", "failed"]).await;
    serde_json::from_str::<serde_json::Value>(run.expect_success()).unwrap().as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_and_failed_messages() {
    let (downstream_url, _downstream) = refusing_downstream().await;
    let node = Node::builder(OUTPOST)
        .config(&format!(
            "[[route]]\nname = \"erp\"\nqueue = \"orders\"\nurls = [\"{downstream_url}\"]\ntimeout = \"2s\"\n"
        ))
        .start()
        .await;
    let url = node.url();
    for payload in ["first", "second"] {
        node.client().post_message("orders", payload).await.unwrap().accepted();
    }
    wait_until_async(STATE_TIMEOUT, "two failed entries", || async { failed_entries(&url).await.len() == 2 })
        .await;
    let entries = failed_entries(&url).await;
    let id = |entry: &serde_json::Value| entry["id"].to_string();
    let (first, second) = (id(&entries[0]), id(&entries[1]));

    let routes = ctl(&["--url", &url, "routes"]).await.expect_success().to_string();
    assert!(
        routes.starts_with("ROUTE") && routes.lines().nth(1).unwrap().starts_with("erp    orders  forward"),
        "{routes}"
    );
    let failed = ctl(&["--url", &url, "failed", "--route", "erp"]).await.expect_success().to_string();
    assert!(failed.starts_with("ID") && failed.contains("LAST ERROR"), "{failed}");
    assert_eq!(failed.lines().filter(|line| line.contains(" erp ")).count(), 2, "{failed}");

    // Discard: the known id is discarded, the unknown one named, and the exit code says not all worked.
    let run = ctl(&["--url", &url, "discard", &second, "999999"]).await;
    assert!(run.expect_code(1).contains("999999"), "{run:#?}");
    assert!(run.stdout.contains(&format!("discarded {second}")), "{run:#?}");
    assert!(failed_entries(&url).await.iter().all(|e| id(e) != second));

    // Resubmit one: it is delivered again, refused again, and fails again.
    let message_id = entries[0]["message_id"].clone();
    let stdout = ctl(&["--url", &url, "resubmit", &first]).await.expect_success().to_string();
    assert!(stdout.contains(&format!("resubmitted {first}")), "{stdout}");
    wait_until_async(STATE_TIMEOUT, "the resubmitted message failed again", || async {
        failed_entries(&url).await.iter().any(|e| e["message_id"] == message_id)
    })
    .await;
    // Several ids with an unknown one: the bulk call refuses them all, so each goes alone; the known
    // one is resubmitted, the unknown one named, and the exit code says not all worked.
    let attempts_of_first = || async {
        failed_entries(&url)
            .await
            .into_iter()
            .find(|e| e["message_id"] == message_id)
            .map(|e| e["attempts"].clone())
    };
    let attempts_before = attempts_of_first().await.expect("the first message failed again");
    let run = ctl(&["--url", &url, "resubmit", &first, "999999"]).await;
    assert!(run.expect_code(1).contains("999999") && run.stderr.contains("1 of 2 failed"), "{run:#?}");
    assert!(run.stdout.contains(&format!("resubmitted {first}")), "{run:#?}");
    wait_until_async(STATE_TIMEOUT, "the message resubmitted with an unknown id failed again", || async {
        attempts_of_first().await.is_some_and(|attempts| attempts != attempts_before)
    })
    .await;
    let stdout = ctl(&["--url", &url, "resubmit", "--route", "erp"]).await.expect_success().to_string();
    assert!(stdout.contains("of route erp"), "{stdout}");

    // Store and forward, with a reason shown in the routes table.
    let stdout =
        ctl(&["--url", &url, "store", "erp", "--reason", "erp upgrade"]).await.expect_success().to_string();
    assert!(stdout.contains("store") && stdout.contains("erp upgrade"), "{stdout}");
    let routes: serde_json::Value =
        serde_json::from_str(ctl(&["--url", &url, "routes", "--json"]).await.expect_success()).unwrap();
    assert_eq!((&routes[0]["mode"], &routes[0]["reason"]), (&"store".into(), &"erp upgrade".into()));
    let stdout = ctl(&["--url", &url, "forward", "erp"]).await.expect_success().to_string();
    assert!(stdout.contains("forward"), "{stdout}");
    let stderr = ctl(&["--url", &url, "store", "no-such-route"]).await.expect_code(1).to_string();
    assert!(stderr.contains("HTTP 404") && stderr.contains("no-such-route"), "{stderr}");
}

/// A stand-in node that answers only the bulk resubmit and counts every request it gets.
async fn bulk_only_node() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::routing::post;
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    let app = axum::Router::new()
        .route(
            "/v1/failed/resubmit",
            post(|axum::Json(body): axum::Json<serde_json::Value>| async move {
                let ids = body["ids"].clone();
                axum::Json(serde_json::json!({"resubmitted": ids.as_array().unwrap().len(), "ids": ids}))
            }),
        )
        .fallback(|| async {
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "only the bulk call is expected")
        })
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                seen.lock().unwrap().push(format!("{} {}", request.method(), request.uri()));
                next.run(request)
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, requests)
}

#[tokio::test(flavor = "multi_thread")]
async fn resubmitting_several_ids_is_one_bulk_call() {
    let (url, requests) = bulk_only_node().await;
    let stdout = ctl(&["--url", &url, "resubmit", "3", "5", "8"]).await.expect_success().to_string();
    assert_eq!(stdout, "resubmitted 3\nresubmitted 5\nresubmitted 8\n");
    let json: serde_json::Value =
        serde_json::from_str(ctl(&["--url", &url, "--json", "resubmit", "3", "5"]).await.expect_success())
            .unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"id": 3, "status": "resubmitted"}, {"id": 5, "status": "resubmitted"}]),
        "the same array as one call per id would give"
    );
    assert_eq!(*requests.lock().unwrap(), ["POST /v1/failed/resubmit", "POST /v1/failed/resubmit"]);
}
