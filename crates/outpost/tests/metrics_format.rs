//! `GET /metrics` of CONTRACT section 6 on both roles: the Prometheus text format 0.0.4 by default,
//! checked by `promtool check metrics` (Debian's `prometheus` package; .ci/run installs it),
//! OpenMetrics when the `Accept` header asks for it, and the central's `outpost_node_state`
//! following maintenance.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{metrics, wait_until_async, Client, Node};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
const PROMTOOL: &str = "promtool";

/// `promtool check metrics` on `text`: `Err` with promtool's words when it finds a problem.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {said}", output.status))
    }
}

fn promtool_available() -> bool {
    Command::new(PROMTOOL).arg("--version").output().is_ok_and(|o| o.status.success())
}

async fn scrape(client: &Client, accept: Option<&str>) -> (String, String) {
    let mut request = client.request(reqwest::Method::GET, "/metrics");
    if let Some(accept) = accept {
        request = request.header(reqwest::header::ACCEPT, accept);
    }
    let response = client.send(request).await.expect("GET /metrics");
    response.expect_status(200);
    let content_type = response
        .headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (content_type, response.text())
}

#[tokio::test]
async fn metrics_of_both_roles_pass_promtool_and_openmetrics_comes_on_request() {
    if !promtool_available() {
        // CI installs promtool, so there a missing one is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed but CI is set: .ci/run installs it"
        );
        eprintln!(
            "SKIPPED: promtool is not installed (apt-get install prometheus); the format is not checked"
        );
        return;
    }
    let central = Node::builder(OUTPOST)
        .role("central")
        .config(
            "[[route]]\nname = \"erp\"\nqueue = \"orders\"\nurls = [\"http://127.0.0.1:9/\"]\nmax_attempts = 1\n",
        )
        .start()
        .await;
    let edge = Node::builder(OUTPOST)
        .arg("--central")
        .arg(central.url())
        .config("[connectivity]\noffline_probe_interval = \"1s\"\n")
        .start()
        .await;
    // Give every family samples: accepted, forwarded, routes, edges, transitions, commits.
    edge.client().post_message("orders", "one").await.unwrap().accepted();
    edge.client().post_batch("orders", &["two", "three"]).await.unwrap().batch_accepted();
    let central_client = central.client();
    wait_until_async(Duration::from_secs(60), "three messages at the central", || async {
        central_client.queue("orders").await.is_some_and(|q| q.last_seq >= 3)
    })
    .await;

    for (role, node) in [("edge", &edge), ("central", &central)] {
        let (content_type, text) = scrape(&node.client(), None).await;
        assert!(
            content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
            "{role}: {content_type}"
        );
        if let Err(problems) = promtool_check(&text) {
            panic!("{role}: promtool check metrics failed: {problems}\n{text}");
        }
        assert!(metrics::has(&text, "outpost_messages_accepted_total"), "{role}:\n{text}");

        let (content_type, text) = scrape(
            &node.client(),
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        )
        .await;
        assert!(content_type.starts_with("application/openmetrics-text"), "{role}: {content_type}");
        assert!(text.ends_with("# EOF\n"), "{role}: OpenMetrics ends with # EOF:\n{text}");
    }

    // Maintenance is visible in the central's metrics.
    let (_, text) = scrape(&central_client, None).await;
    assert_eq!(metrics::value(&text, "outpost_node_state", &[("state", "online")]), Some(1.0), "{text}");
    assert_eq!(metrics::value(&text, "outpost_node_state", &[("state", "maintenance")]), Some(0.0), "{text}");
    let response = central_client
        .post("/v1/admin/maintenance", Some("application/json"), r#"{"enabled":true}"#)
        .await
        .unwrap();
    response.expect_status(200);
    let (_, text) = scrape(&central_client, None).await;
    assert_eq!(metrics::value(&text, "outpost_node_state", &[("state", "maintenance")]), Some(1.0), "{text}");
    assert_eq!(metrics::value(&text, "outpost_node_state", &[("state", "online")]), Some(0.0), "{text}");
    promtool_check(&text).unwrap_or_else(|problems| panic!("central in maintenance: {problems}\n{text}"));
}
