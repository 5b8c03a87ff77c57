//! The web console in a real headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`, installed by `.ci/run`): every operator action is clicked, its confirmation
//! dialog answered, and its effect checked through the HTTP API; the layout is checked at 800 px
//! wide and screenshots are saved under `target/console-screenshots/`. Without the packages the
//! tests fail under CI (`CI` set) and are skipped with a message elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::webdriver::{self, Browser};
use testkit::{wait_until_async, Client, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const ADMIN_TOKEN: &str = "console-admin-secret";
/// How long a clicked action may take to show in the API (the machine is shared and loaded).
const EFFECT: Duration = Duration::from_secs(20);
/// The narrowest width the console is made for (a tablet).
const WIDTH: u32 = 800;

/// False (after saying why) when the browser packages are missing outside CI.
fn browser_available() -> bool {
    match webdriver::missing() {
        None => true,
        Some(why) => {
            assert!(std::env::var_os("CI").is_none(), "{why}: .ci/run installs chromium and chromium-driver");
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// Where the screenshots go: `target/console-screenshots/` next to the test binaries.
fn screenshot_dir() -> PathBuf {
    let bin = PathBuf::from(BIN);
    bin.parent()
        .and_then(|p| p.parent())
        .map(|target| target.join("console-screenshots"))
        .expect("target dir")
}

/// A downstream service for the route: answers every POST with the status in `status` and keeps
/// the payloads it answered 2xx.
struct Downstream {
    url: String,
    status: Arc<AtomicU16>,
    delivered: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Downstream {
    async fn start(status: u16) -> Downstream {
        let status = Arc::new(AtomicU16::new(status));
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().route(
            "/orders",
            axum::routing::post({
                let (status, delivered) = (status.clone(), delivered.clone());
                move |body: axum::body::Bytes| async move {
                    let code = status.load(Ordering::SeqCst);
                    if (200..300).contains(&code) {
                        delivered.lock().unwrap().push(body.to_vec());
                    }
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Downstream { url: format!("http://{addr}/orders"), status, delivered }
    }

    fn delivered(&self) -> Vec<Vec<u8>> {
        self.delivered.lock().unwrap().clone()
    }
}

/// Edges listed in `[[edge]]` besides the two the test starts: they never connect, and make the
/// edge list long enough to page.
const MORE_EDGES: usize = 12;

fn central_config(downstream: &str) -> String {
    let more_edges: String = (1..=MORE_EDGES)
        .map(|i| format!("\n[[edge]]\nid = \"store-c{i:02}\"\ntoken = \"token-c{i:02}\"\n"))
        .collect();
    format!(
        r#"
[auth]
admin_tokens = ["{ADMIN_TOKEN}"]
client_tokens = ["client-secret"]

[connectivity]
ping_interval = "1s"

[[edge]]
id = "store-a"
token = "token-a"

[[edge]]
id = "store-b"
token = "token-b"
{more_edges}
[[route]]
name = "erp-orders"
queue = "orders"
urls = ["{downstream}"]
max_attempts = 2
retry_initial = "100ms"
retry_max = "200ms"
"#
    )
}

/// An edge whose failed transition holds it offline for an hour unless someone triggers one.
fn edge_config(central_url: &str, token: &str) -> String {
    format!(
        r#"
[auth]
admin_tokens = ["{ADMIN_TOKEN}"]

[[upstream]]
url = "{central_url}"
token = "{token}"

[connectivity]
ping_interval = "1s"
offline_probe_interval = "1s"
transition_to_offline_wait = "0s"
failed_transition_wait = "1h"

[failover]
connect_timeout = "1s"
"#
    )
}

async fn start_edge(central: &Node, id: &str, token: &str) -> Node {
    Node::builder(BIN)
        .role("edge")
        .args(["--node-id", id])
        .config(&edge_config(&central.url(), token))
        .start()
        .await
}

async fn json_of(client: &Client, path: &str) -> Value {
    let response = client.get(path).await.expect("the node answers");
    assert!(response.status.is_success(), "GET {path}: {} {}", response.status, response.text());
    response.json()
}

async fn state_of(client: &Client) -> String {
    json_of(client, "/v1/status").await["state"].as_str().unwrap_or_default().to_string()
}

async fn wait_state(client: &Client, want: &str, what: &str) {
    wait_until_async(EFFECT, what, || async { state_of(client).await == want }).await;
}

async fn failed_entries(central: &Client) -> Vec<Value> {
    json_of(central, "/v1/failed?route=erp-orders").await.as_array().cloned().unwrap_or_default()
}

/// Opens `url`, which asks for the admin token (the node has `[auth]`), gives a wrong one, is
/// asked again, and gives the right one.
async fn open_with_token(browser: &Browser, url: &str) {
    browser.goto(url).await;
    browser.wait_text("#token-why", "needs an admin token", EFFECT).await;
    browser.type_into("#token-input", "not-the-token").await;
    browser.click("#token-save").await;
    browser.wait_text("#token-why", "The token was refused", EFFECT).await;
    browser.type_into("#token-input", ADMIN_TOKEN).await;
    browser.click("#token-save").await;
    let kept = browser.execute("return sessionStorage.getItem('outpost-admin-token')", json!([])).await;
    assert_eq!(kept, json!(ADMIN_TOKEN), "the token is kept for the tab");
}

/// Clicks `css`, waits for the confirmation dialog, optionally types a reason, saves a screenshot
/// named `screenshot` if given, and confirms.
async fn click_and_confirm(browser: &Browser, css: &str, reason: Option<&str>) -> String {
    click_and_confirm_shot(browser, css, reason, None).await
}

async fn click_and_confirm_shot(
    browser: &Browser,
    css: &str,
    reason: Option<&str>,
    screenshot: Option<&str>,
) -> String {
    browser.click(css).await;
    browser.wait_for("#confirm[open] #confirm-ok", EFFECT).await;
    let question = browser.text("#confirm-title").await;
    if let Some(reason) = reason {
        browser.type_into("#confirm-reason", reason).await;
    }
    if let Some(name) = screenshot {
        save_screenshot(browser, name).await;
    }
    browser.click("#confirm-ok").await;
    wait_until_async(EFFECT, "the dialog closed", || async {
        browser.find("#confirm[open]").await.is_none()
    })
    .await;
    question
}

/// The page at 800 px: nothing sticks out to the right, no table needs a scrollbar, and the
/// columns an operator needs most are inside the window.
async fn check_layout(browser: &Browser, important: &[&str]) {
    let report = browser
        .execute(
            r#"
            const width = window.innerWidth;
            const problems = [];
            if (document.documentElement.scrollWidth > width) problems.push('page is ' + document.documentElement.scrollWidth + ' px wide');
            for (const wrap of document.querySelectorAll('.wrap')) {
              if (wrap.offsetParent && wrap.scrollWidth > wrap.clientWidth + 1)
                problems.push(wrap.firstElementChild.id + ' scrolls: ' + wrap.scrollWidth + ' > ' + wrap.clientWidth);
            }
            const seen = [];
            for (const th of document.querySelectorAll('th')) {
              if (!th.offsetParent) continue;
              const name = th.textContent.trim();
              if (!arguments[0].includes(name)) continue;
              seen.push(name);
              const right = th.getBoundingClientRect().right;
              if (right > width) problems.push('column ' + name + ' ends at ' + right);
            }
            for (const name of arguments[0]) if (!seen.includes(name)) problems.push('column ' + name + ' not shown');
            return {width, problems};
            "#,
            json!([important]),
        )
        .await;
    assert_eq!(report["width"], json!(WIDTH), "the viewport is {WIDTH} px wide");
    assert_eq!(report["problems"], json!([]), "layout at {WIDTH} px");
}

async fn save_screenshot(browser: &Browser, name: &str) {
    let path = screenshot_dir().join(name);
    browser.screenshot(&path).await;
    println!("screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_console_action_clicked_has_its_effect() {
    if !browser_available() {
        return;
    }
    let downstream = Downstream::start(422).await;
    let central = Node::builder(BIN)
        .role("central")
        .args(["--node-id", "hq-console"])
        .config(&central_config(&downstream.url))
        .start()
        .await;
    let api = central.client().with_token(ADMIN_TOKEN);
    let browser = Browser::start(WIDTH, 1000).await;

    // The token: asked for because the node answers 401, then kept and sent.
    open_with_token(&browser, &format!("{}/", central.url())).await;
    browser.wait_text("#node", "hq-console (central", EFFECT).await;

    // Maintenance on, confirmed: the central says so.
    let question = click_and_confirm(&browser, "#act-maintenance", None).await;
    assert!(question.contains("maintenance on"), "{question}");
    wait_state(&api, "maintenance", "maintenance on after the click").await;
    browser.wait_text("#act-maintenance", "Turn maintenance off", EFFECT).await;

    // Two edges start during maintenance: their first transition fails and the failed-transition
    // wait (1 h) holds them offline.
    let mut edge_a = start_edge(&central, "store-a", "token-a").await;
    let edge_b = start_edge(&central, "store-b", "token-b").await;
    for edge in [&edge_a, &edge_b] {
        let client = edge.client().with_token(ADMIN_TOKEN);
        wait_until_async(EFFECT, "the first transition fails for maintenance", || async {
            let status = json_of(&client, "/v1/status").await;
            status["state"] == "offline" && !status["offline_log"].as_array().unwrap().is_empty()
        })
        .await;
    }

    // Maintenance off, confirmed.
    let question = click_and_confirm(&browser, "#act-maintenance", None).await;
    assert!(question.contains("maintenance off"), "{question}");
    wait_state(&api, "online", "maintenance off after the click").await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(state_of(&edge_a.client().with_token(ADMIN_TOKEN)).await, "offline", "the wait holds");
    }

    // A downlink message waits for store-b: the edges table shows it pending.
    api.post("/v1/edges/store-b/queues/notes/messages", Some("text/plain"), "for store-b")
        .await
        .unwrap()
        .expect_status(202);
    let row_b = r#"#edges tr[data-edge="store-b"]"#;
    wait_until_async(EFFECT, "store-b's row shows 1 downlink message", || async {
        let cells = browser
            .execute(
                "const r = document.querySelector(arguments[0]); return r ? Array.from(r.cells, c => c.innerText) : [];",
                json!([row_b]),
            )
            .await;
        cells.get(6) == Some(&json!("1"))
    })
    .await;

    // "Send online" to store-a from the central: the edge goes online.
    browser.click(r#"button[data-action="edge-online"][data-edge="store-a"]"#).await;
    browser.wait_text("#notice", "sent \"transition to online\" to edge store-a", EFFECT).await;
    wait_state(
        &edge_a.client().with_token(ADMIN_TOKEN),
        "online",
        "store-a online after the central's trigger",
    )
    .await;

    // The per-edge offline log, from the central.
    browser.click(r#"button[data-action="edge-detail"][data-edge="store-b"]"#).await;
    browser.wait_text(r#"tr[data-edge-detail="store-b"]"#, "maintenance", EFFECT).await;
    browser.wait_text(r#"tr[data-edge-detail="store-b"]"#, "notes", EFFECT).await;

    // The state filter pages the list through the API.
    browser.click(r#"#edges-state option[value="online"]"#).await;
    wait_until_async(EFFECT, "only store-a listed as online", || async {
        let text = browser.text("#edges tbody").await;
        text.contains("store-a") && !text.contains("store-b")
    })
    .await;
    browser.click(r#"#edges-state option[value=""]"#).await;
    browser.wait_text("#edges tbody", "store-b", EFFECT).await;

    // Paging: 14 edges at 10 a page; `next` follows the API's Outpost-Next-After.
    let listed = || async {
        let ids = browser
            .execute(
                "return Array.from(document.querySelectorAll('#edges tr[data-edge]'), r => r.dataset.edge);",
                json!([]),
            )
            .await;
        ids.as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    browser.click(r#"#edges-limit option[value="10"]"#).await;
    wait_until_async(EFFECT, "page 1 of the edges: 10 of them", || async { listed().await.len() == 10 })
        .await;
    assert_eq!(listed().await.first().map(String::as_str), Some("store-a"));
    browser.click("#edges-next").await;
    wait_until_async(EFFECT, "page 2 of the edges: the other 4", || async {
        listed().await == ["store-c09", "store-c10", "store-c11", "store-c12"]
    })
    .await;
    browser.wait_text("#edges-page", "page 2", EFFECT).await;
    assert!(browser.find("#edges-next:disabled").await.is_some(), "no page 3");
    browser.click("#edges-prev").await;
    wait_until_async(EFFECT, "back on page 1", || async {
        listed().await.first().map(String::as_str) == Some("store-a")
    })
    .await;
    browser.click(r#"#edges-limit option[value="50"]"#).await;
    wait_until_async(EFFECT, "all 14 edges on one page", || async { listed().await.len() == 2 + MORE_EDGES })
        .await;

    // Failed messages: the downstream refuses with 422 (poison), so each fails at once.
    let payloads: [(&str, &[u8]); 6] = [
        ("text/plain", b"order-1 first"),
        ("application/octet-stream", &[0x00, 0x01, 0x02, 0xff, 0x10, b'o', b'k']),
        ("text/plain", b"order-3"),
        ("text/plain", b"order-4"),
        ("text/plain", b"order-5 unwanted"),
        ("text/plain", b"order-6 unwanted"),
    ];
    for (content_type, payload) in payloads {
        let response =
            api.post("/v1/queues/orders/messages", Some(content_type), payload.to_vec()).await.unwrap();
        response.expect_status(202);
    }
    wait_until_async(EFFECT, "6 failed entries", || async { failed_entries(&api).await.len() == 6 }).await;
    let ids: Vec<i64> = failed_entries(&api).await.iter().map(|f| f["id"].as_i64().unwrap()).collect();
    browser.wait_text("#failed tbody", "poison", EFFECT).await;
    browser.wait_text("#failed-page", "6 shown", EFFECT).await;

    // The failed-entry endpoint the payload viewer reads.
    let entry = json_of(&api, &format!("/v1/failed/{}", ids[1])).await;
    assert_eq!(entry["payload_base64"], "AAEC/xBvaw==", "{entry}");
    assert_eq!(entry["content_type"], "application/octet-stream", "{entry}");
    assert_eq!(api.get("/v1/failed/999999").await.unwrap().status, 404);

    // Human times: relative text, the ISO time on hover; ages without decimals.
    let times = browser
        .execute(
            "return Array.from(document.querySelectorAll('#failed time'), t => [t.textContent, t.title]);",
            json!([]),
        )
        .await;
    for pair in times.as_array().unwrap() {
        let (text, title) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        assert!(text.ends_with(" ago") || text == "just now", "a relative time: {text:?}");
        assert!(title.contains('T') && title.ends_with('Z'), "the full time on hover: {title:?}");
    }
    let queues = browser.text("#queues tbody").await;
    assert!(!regex_like_three_decimals(&queues), "no ages with three decimals: {queues}");

    save_screenshot(&browser, "central-800.png").await;
    check_layout(
        &browser,
        &["backlog", "failed", "downlink", "last offline cause", "attempts", "reason", "last error"],
    )
    .await;

    // Route to store with a reason, confirmed; then back to forward with another.
    let question = click_and_confirm_shot(
        &browser,
        r#"button[data-action="route-store"][data-route="erp-orders"]"#,
        Some("ERP upgrade tonight"),
        Some("central-800-confirm-store.png"),
    )
    .await;
    assert!(question.contains("Store route erp-orders"), "{question}");
    wait_until_async(EFFECT, "the route in store mode with the reason", || async {
        let route = json_of(&api, "/v1/routes").await[0].clone();
        route["mode"] == "store" && route["reason"] == "ERP upgrade tonight"
    })
    .await;
    browser.wait_text("#routes tbody", "ERP upgrade tonight", EFFECT).await;
    click_and_confirm(
        &browser,
        r#"button[data-action="route-forward"][data-route="erp-orders"]"#,
        Some("upgrade done"),
    )
    .await;
    wait_until_async(EFFECT, "the route forwarding with the reason", || async {
        let route = json_of(&api, "/v1/routes").await[0].clone();
        route["mode"] == "forward" && route["reason"] == "upgrade done"
    })
    .await;

    // Filters: by last error, by attempts, by reason.
    browser.type_into("#failed-error", "no such text").await;
    browser.wait_text("#failed tbody", "no failed message matches", EFFECT).await;
    browser.type_into("#failed-error", "422").await;
    browser.wait_text("#failed-page", "6 shown", EFFECT).await;
    browser.type_into("#failed-attempts", "99").await;
    browser.wait_text("#failed-page", "0 shown, 6 filtered out", EFFECT).await;
    browser.type_into("#failed-attempts", "0").await;
    let reason = failed_entries(&api).await[0]["reason"].as_str().unwrap().to_string();
    browser.click(&format!(r#"#failed-reason option[value="{reason}"]"#)).await;
    browser.wait_text("#failed-page", "6 shown", EFFECT).await;

    // The payload as text and as hex.
    browser.click(&format!(r#"button[data-action="failed-view"][data-id="{}"]"#, ids[0])).await;
    browser.wait_text("#payload-body", "order-1 first", EFFECT).await;
    browser.click("#payload-hex").await;
    browser.wait_text("#payload-body", "6f 72 64 65 72 2d 31", EFFECT).await;
    browser.click(&format!(r#"button[data-action="failed-view"][data-id="{}"]"#, ids[1])).await;
    browser.wait_text("#payload-body", "00 01 02 ff 10 6f 6b", EFFECT).await;
    browser.wait_text("#payload-meta", "application/octet-stream, 7 bytes", EFFECT).await;
    save_screenshot(&browser, "central-800-failed-payload.png").await;

    // Cancel in a dialog does nothing.
    browser.click(&format!(r#"button[data-action="failed-discard"][data-id="{}"]"#, ids[4])).await;
    browser.wait_for("#confirm[open] #confirm-cancel", EFFECT).await;
    browser.click("#confirm-cancel").await;
    wait_until_async(EFFECT, "the dialog closed", || async {
        browser.find("#confirm[open]").await.is_none()
    })
    .await;
    assert_eq!(failed_entries(&api).await.len(), 6, "cancelled: nothing discarded");

    // Tick two rows and discard them together, confirmed.
    for id in [ids[4], ids[5]] {
        browser.click(&format!(r#"input[data-select="{id}"]"#)).await;
    }
    let question = click_and_confirm(&browser, "#failed-discard-selected", None).await;
    assert!(question.contains("Discard 2 failed messages"), "{question}");
    wait_until_async(EFFECT, "the two ticked entries discarded", || async {
        let left = failed_entries(&api).await;
        left.len() == 4 && !left.iter().any(|f| f["id"] == ids[4] || f["id"] == ids[5])
    })
    .await;

    // Resubmit one: it leaves the failed list and reaches the (now healthy) downstream.
    downstream.status.store(200, Ordering::SeqCst);
    browser.click(&format!(r#"button[data-action="failed-resubmit"][data-id="{}"]"#, ids[0])).await;
    wait_until_async(EFFECT, "entry 1 resubmitted and delivered", || async {
        let left = failed_entries(&api).await;
        !left.iter().any(|f| f["id"] == ids[0]) && downstream.delivered().contains(&b"order-1 first".to_vec())
    })
    .await;

    // Discard one, confirmed: gone, never delivered.
    let question = click_and_confirm(
        &browser,
        &format!(r#"button[data-action="failed-discard"][data-id="{}"]"#, ids[1]),
        None,
    )
    .await;
    assert!(question.contains(&format!("Discard failed message {}", ids[1])), "{question}");
    wait_until_async(EFFECT, "entry 2 discarded", || async {
        !failed_entries(&api).await.iter().any(|f| f["id"] == ids[1])
    })
    .await;

    // Resubmit all of the route through the bulk endpoint, confirmed.
    browser.click(r#"#failed-route option[value="erp-orders"]"#).await;
    let question = click_and_confirm(&browser, "#failed-resubmit-route", None).await;
    assert!(question.contains("erp-orders"), "{question}");
    wait_until_async(EFFECT, "every failed entry resubmitted and delivered", || async {
        let delivered = downstream.delivered();
        failed_entries(&api).await.is_empty()
            && delivered.contains(&b"order-3".to_vec())
            && delivered.contains(&b"order-4".to_vec())
    })
    .await;
    browser.wait_text("#notice", "2 failed messages of route erp-orders resubmitted", EFFECT).await;
    let delivered = downstream.delivered();
    assert!(!delivered.iter().any(|p| p.starts_with(&[0, 1, 2])), "the discarded one stays undelivered");
    assert!(!delivered.iter().any(|p| p.ends_with(b"unwanted")), "the discarded ones stay undelivered");

    // A pull consumer: listed with what it holds, offered as a failed-list route, forgotten
    // (confirmed).
    for n in 0..2 {
        api.post("/v1/queues/audit/messages", Some("text/plain"), format!("audit-{n}"))
            .await
            .unwrap()
            .expect_status(202);
    }
    api.post(
        "/v1/queues/audit/consumers/auditor/lease",
        Some("application/json"),
        r#"{"max":1,"visibility":"5m"}"#,
    )
    .await
    .unwrap()
    .expect_status(200);
    let consumer_row = r#"#consumers tr[data-consumer="audit/auditor"]"#;
    browser.wait_text(consumer_row, "auditor", EFFECT).await;
    wait_until_async(EFFECT, "the consumer offered in the failed-list route filter", || async {
        browser.find(r#"#failed-route option[value="consumer:auditor"]"#).await.is_some()
    })
    .await;
    save_screenshot(&browser, "central-800-consumers.png").await;
    check_layout(&browser, &["leased", "pending", "last active"]).await;
    let question =
        click_and_confirm(&browser, r#"button[data-action="consumer-forget"][data-name="auditor"]"#, None)
            .await;
    assert!(question.contains("Forget consumer auditor of queue audit"), "{question}");
    wait_until_async(EFFECT, "the consumer forgotten", || async {
        json_of(&api, "/v1/queues/audit/consumers").await == json!([])
    })
    .await;
    wait_until_async(EFFECT, "the consumers table gone", || async {
        browser.find(consumer_row).await.is_none()
    })
    .await;

    // A site that goes dark: the central's own view shows it offline, cause link_lost.
    edge_a.kill9();
    let row_a = r#"#edges tr[data-edge="store-a"]"#;
    wait_until_async(EFFECT, "store-a offline (link_lost) in the console", || async {
        let text = browser.text(row_a).await;
        text.contains("offline") && text.contains("link_lost") && text.contains("not connected")
    })
    .await;

    // The edge's own console: "Go online now" ends store-b's failed-transition wait.
    let edge_b_api = edge_b.client().with_token(ADMIN_TOKEN);
    assert_eq!(state_of(&edge_b_api).await, "offline");
    let edge_browser = Browser::start(WIDTH, 1000).await;
    open_with_token(&edge_browser, &format!("{}/", edge_b.url())).await;
    edge_browser.wait_text("#node", "store-b (edge", EFFECT).await;
    edge_browser.wait_text("#log tbody", "maintenance", EFFECT).await;
    // A message waiting to be forwarded shows as bytes still to forward.
    edge_b_api
        .post("/v1/queues/orders/messages", Some("text/plain"), "from store-b")
        .await
        .unwrap()
        .expect_status(202);
    edge_browser.wait_text("#status", "to forward", EFFECT).await;
    edge_browser.wait_text("#status", "1 messages, 12 B", EFFECT).await;
    edge_browser.click("#act-online").await;
    wait_state(&edge_b_api, "online", "store-b online after its own trigger").await;
    wait_until_async(EFFECT, "the edge's console shows online", || async {
        edge_browser.text("#state").await == "online"
    })
    .await;
    // Online, it pulls the downlink message the central held for it.
    edge_browser.wait_text("#queues tbody", "notes", EFFECT).await;
    save_screenshot(&edge_browser, "edge-800.png").await;
    check_layout(&edge_browser, &["messages", "oldest", "cause"]).await;

    edge_browser.close().await;
    browser.close().await;
}

/// Without `[auth]` the console asks for no token; the demo's pair of nodes looks like this.
#[tokio::test(flavor = "multi_thread")]
async fn without_auth_the_console_asks_for_no_token() {
    if !browser_available() {
        return;
    }
    let central = Node::builder(BIN).role("central").args(["--node-id", "hq-open"]).start().await;
    let edge = Node::builder(BIN)
        .role("edge")
        .args(["--node-id", "store-open", "--central"])
        .arg(central.url())
        .start()
        .await;
    wait_state(&edge.client(), "online", "the edge online").await;
    edge.client().post_message("orders", "an order").await.unwrap().expect_status(202);
    let browser = Browser::start(WIDTH, 900).await;
    browser.goto(&format!("{}/", edge.url())).await;
    browser.wait_text("#node", "store-open (edge", EFFECT).await;
    browser.wait_text("#status", "(primary)", EFFECT).await;
    browser.wait_text("#queues tbody", "orders", EFFECT).await;
    browser.goto(&format!("{}/", central.url())).await;
    browser.wait_text("#edges tbody", "store-open", EFFECT).await;
    browser.wait_text("#queues tbody", "orders", EFFECT).await;
    assert!(browser.find("#token-bar:not([hidden])").await.is_none(), "no token asked for");
    let token = browser.execute("return sessionStorage.getItem('outpost-admin-token')", json!([])).await;
    assert_eq!(token, Value::Null);
    browser.close().await;
}

/// True if `text` has a number with three decimals (an age like `4.123`).
fn regex_like_three_decimals(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.windows(5).any(|w| w[0].is_ascii_digit() && w[1] == b'.' && w[2..].iter().all(u8::is_ascii_digit))
}
