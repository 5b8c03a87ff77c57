//! The web console in a real headless Chromium: the page's script reads the API and renders the
//! node's state, queues, edges and routes. Chromium comes from Debian's `chromium` package
//! (`.ci/run` installs it); without it the test fails under CI and is skipped elsewhere.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::{wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const CHROMIUM: &str = "/usr/bin/chromium";

/// The page's DOM after its script ran, as Chromium renders it.
fn rendered_dom(url: &str, profile_dir: &Path) -> String {
    let output = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile_dir.display()))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_state_queues_edges_and_routes() {
    if !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{CHROMIUM} is missing: .ci/run installs Debian's chromium"
        );
        eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
        return;
    }
    let central = Node::builder(BIN)
        .role("central")
        .arg("--node-id")
        .arg("hq-console")
        .config(
            "[[route]]\nname = \"erp-orders\"\nqueue = \"orders\"\nurls = [\"http://127.0.0.1:9/orders\"]\n",
        )
        .start()
        .await;
    let edge = Node::builder(BIN)
        .role("edge")
        .arg("--node-id")
        .arg("store-console")
        .arg("--central")
        .arg(central.url())
        .start()
        .await;
    wait_until_async(Duration::from_secs(20), "the edge online", || async {
        edge.client().status().await["state"] == "online"
    })
    .await;
    edge.client().post_message("orders", "an order").await.unwrap().expect_status(202);
    wait_until_async(
        Duration::from_secs(20),
        "the route in store mode (nothing listens on its url)",
        || async {
            let routes = central.client().get("/v1/routes").await.unwrap().json();
            routes[0]["mode"] == "store"
        },
    )
    .await;

    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::task::spawn_blocking({
        let url = format!("{}/", central.url());
        let dir = profile.path().to_path_buf();
        move || rendered_dom(&url, &dir)
    })
    .await
    .unwrap();
    for expected in ["hq-console (central 0.1.0)", "store-console", "erp-orders", ">store<", ">orders<"] {
        assert!(dom.contains(expected), "the central's console shows {expected:?}:\n{dom}");
    }

    let dom = tokio::task::spawn_blocking({
        let url = format!("{}/", edge.url());
        let dir = profile.path().to_path_buf();
        move || rendered_dom(&url, &dir)
    })
    .await
    .unwrap();
    for expected in ["store-console (edge 0.1.0)", ">online<", &central.url(), "(primary)"] {
        assert!(dom.contains(expected), "the edge's console shows {expected:?}:\n{dom}");
    }
}
