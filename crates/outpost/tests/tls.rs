//! TLS with the real binaries (issue 15): an edge linked to its central over TLS, a route to an
//! https downstream, mTLS refusals in the edge's offline log, certificates replaced on disk and
//! re-read without a restart (a broken file keeps the old one), bad files refused at start, edge
//! tokens bound to their edge and never logged, and PostgreSQL over TLS.
//!
//! Certificates come from `scripts/make-certs.sh` (openssl), the script operators use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::client::Client;
use testkit::{wait_until_async, Node};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const TOKEN_1: &str = "tok-store-1-9f8e7d6c5b4a";
const TOKEN_2: &str = "tok-store-2-1a2b3c4d5e6f";
const WAIT: Duration = Duration::from_secs(30);

/// A private CA with a certificate for `central` and one per edge id, in a fresh directory.
fn make_certs(central: &str, edges: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("outpost-certs-").tempdir().unwrap();
    make_certs_in(dir.path(), central, edges, None);
    dir
}

fn make_certs_in(dir: &Path, central: &str, edges: &[&str], days: Option<&str>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-certs.sh");
    let mut command = Command::new("bash");
    command.arg(&script).arg(dir).arg(central).args(edges);
    if let Some(days) = days {
        command.env("DAYS", days);
    }
    let output = command.output().expect("run scripts/make-certs.sh");
    assert!(output.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&output.stderr));
}

fn file(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

fn central_config(certs: &tempfile::TempDir, client_ca: bool) -> String {
    let mut toml = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        file(certs, "central.pem"),
        file(certs, "central.key")
    );
    if client_ca {
        toml.push_str(&format!("client_ca_file = \"{}\"\n", file(certs, "ca.pem")));
    }
    toml.push_str(&format!(
        "\n[connectivity]\nping_interval = \"1s\"\n\n[[edge]]\nid = \"store-1\"\ntoken = \"{TOKEN_1}\"\n\n\
         [[edge]]\nid = \"store-2\"\ntoken = \"{TOKEN_2}\"\n"
    ));
    toml
}

async fn start_central(certs: &tempfile::TempDir, client_ca: bool) -> Node {
    Node::builder(BIN)
        .role("central")
        .arg("--node-id")
        .arg("hq")
        .env("OUTPOST_LOG", "debug")
        .config(&central_config(certs, client_ca))
        .tls_ca(certs.path().join("ca.pem"))
        .start()
        .await
}

/// An edge config: its upstream over https with `ca_file`, `token` and optionally a client
/// certificate; `extra` is appended (routes).
fn edge_config(
    central: &Node,
    ca_file: &str,
    token: &str,
    client_cert: Option<(&str, &str)>,
    extra: &str,
) -> String {
    let mut upstream =
        format!("[[upstream]]\nurl = \"{}\"\nca_file = \"{ca_file}\"\ntoken = \"{token}\"\n", central.url());
    if let Some((cert, key)) = client_cert {
        upstream.push_str(&format!("cert_file = \"{cert}\"\nkey_file = \"{key}\"\n"));
    }
    format!(
        "{upstream}\n[connectivity]\nping_interval = \"1s\"\nmissed_pings = 3\noffline_probe_interval = \"1s\"\n\
         transition_to_offline_wait = \"1s\"\nfailed_transition_wait = \"2s\"\n\n[failover]\nconnect_timeout = \"2s\"\n\n\
         [forwarding]\nrequest_timeout = \"5s\"\n{extra}"
    )
}

async fn start_edge(id: &str, config: &str) -> Node {
    Node::builder(BIN)
        .role("edge")
        .arg("--node-id")
        .arg(id)
        .env("OUTPOST_LOG", "debug")
        .config(config)
        .start()
        .await
}

async fn status(node: &Node) -> Value {
    node.client().status().await
}

async fn wait_online(edge: &Node) {
    wait_until_async(WAIT, "edge online", || async { status(edge).await["state"] == "online" }).await;
}

/// Waits until the edge's offline log has an entry whose detail contains every one of `needles`;
/// returns that detail.
async fn wait_offline_log(edge: &Node, needles: &[&str]) -> String {
    async fn matching(edge: &Node, needles: &[&str]) -> Option<String> {
        let status = status(edge).await;
        status["offline_log"].as_array().cloned().unwrap_or_default().iter().find_map(|entry| {
            let detail = entry["detail"].as_str().unwrap_or_default();
            needles.iter().all(|n| detail.contains(n)).then(|| detail.to_string())
        })
    }
    wait_until_async(WAIT, &format!("offline log entry with {needles:?}"), || async {
        matching(edge, needles).await.is_some()
    })
    .await;
    matching(edge, needles).await.unwrap()
}

fn assert_no_tokens(nodes: &[&Node]) {
    for node in nodes {
        let log = node.log();
        for token in [TOKEN_1, TOKEN_2] {
            assert!(!log.contains(token), "a token appears in a node's log:\n{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn edge_to_central_over_tls_and_a_route_to_an_https_downstream() {
    let certs = make_certs("central", &["store-1"]);
    // A server certificate (named sink and localhost) from the same CA for the downstream.
    make_certs_in(certs.path(), "sink", &[], None);
    let central = start_central(&certs, false).await;
    assert!(central.url().starts_with("https://"));
    assert!(central.log().contains("TLS on the listener: cert_file="), "{}", central.log());

    // The downstream: another node serving HTTPS with its own certificate from the same CA.
    let sink = Node::builder(BIN)
        .role("edge")
        .arg("--node-id")
        .arg("sink")
        .config(&format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            file(&certs, "sink.pem"),
            file(&certs, "sink.key")
        ))
        .tls_ca(certs.path().join("ca.pem"))
        .start()
        .await;
    // Two routes of the queue: one POST at a time, and a window pipelined on one TLS connection.
    let route = |name: &str, sink_queue: &str, extra: &str| {
        format!(
            "\n[[route]]\nname = \"{name}\"\nqueue = \"orders\"\nurls = [\"https://localhost:{}/v1/queues/{sink_queue}/messages\"]\n\
             ca_file = \"{}\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{extra}",
            sink.addr().port(),
            file(&certs, "ca.pem")
        )
    };
    let route = route("to-sink", "in", "") + &route("to-sink-window", "in-window", "max_in_flight = 8\n");
    let edge =
        start_edge("store-1", &edge_config(&central, &file(&certs, "ca.pem"), TOKEN_1, None, &route)).await;
    wait_online(&edge).await;
    assert_eq!(status(&edge).await["upstream"]["url"], central.url());

    for i in 0..20 {
        edge.client().post_message("orders", format!("order-{i}").into_bytes()).await.unwrap().accepted();
    }
    wait_until_async(WAIT, "the central holds the 20 orders", || async {
        central.client().queue("orders").await.is_some_and(|q| q.last_seq == 20)
    })
    .await;
    wait_until_async(WAIT, "the https downstream holds the 20 orders", || async {
        sink.client().queue("in").await.is_some_and(|q| q.last_seq == 20)
    })
    .await;
    wait_until_async(WAIT, "the https downstream holds the 20 orders of the window route", || async {
        sink.client().queue("in-window").await.is_some_and(|q| q.last_seq == 20)
    })
    .await;
    let sent: Vec<String> = (0..20).map(|i| format!("order-{i}")).collect();
    for queue in ["in", "in-window"] {
        let delivered = sink.client().read_all(queue).await;
        let payloads: Vec<String> =
            delivered.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
        // The window goes over HTTP/2 (the sink, a node, picks h2 by ALPN): a node stores a
        // connection's queue writes in the order their streams arrived, so queue order holds.
        assert_eq!(payloads, sent, "{queue}");
    }

    // Plain HTTP to the TLS listener gets no answer.
    let plain = Client::new(&central.url().replace("https://", "http://"));
    assert!(plain.get("/healthz").await.is_err(), "plain HTTP must not be served on a TLS listener");
    assert_no_tokens(&[&central, &edge, &sink]);
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_binds_the_client_certificate_to_the_edge_id() {
    let certs = make_certs("central", &["store-1", "store-2"]);
    let other_ca = make_certs("central", &["store-1"]);
    let central = start_central(&certs, true).await;
    let ca = file(&certs, "ca.pem");

    // No client certificate.
    let bare = start_edge("store-1", &edge_config(&central, &ca, TOKEN_1, None, "")).await;
    let detail = wait_offline_log(&bare, &["presented no client certificate"]).await;
    assert!(detail.contains("cert_file"), "the refusal says what to set: {detail}");
    drop(bare);

    // A certificate of another edge, with this edge's own token.
    let (cert_2, key_2) = (file(&certs, "store-2.pem"), file(&certs, "store-2.key"));
    let borrowed =
        start_edge("store-1", &edge_config(&central, &ca, TOKEN_1, Some((&cert_2, &key_2)), "")).await;
    let detail = wait_offline_log(&borrowed, &["issued to", "store-2", "not to edge \"store-1\""]).await;
    assert!(detail.contains("rejected"), "{detail}");
    drop(borrowed);

    // A certificate for the right id, signed by a CA the central does not trust.
    let (foreign_cert, foreign_key) = (file(&other_ca, "store-1.pem"), file(&other_ca, "store-1.key"));
    let foreign =
        start_edge("store-1", &edge_config(&central, &ca, TOKEN_1, Some((&foreign_cert, &foreign_key)), ""))
            .await;
    let detail = wait_offline_log(&foreign, &["client certificate"]).await;
    assert!(detail.contains("UnknownCA") || detail.contains("BadCertificate"), "{detail}");
    drop(foreign);

    // The edge trusts another CA than the one that signed the central's certificate.
    let (cert_1, key_1) = (file(&certs, "store-1.pem"), file(&certs, "store-1.key"));
    let wrong_trust = start_edge(
        "store-1",
        &edge_config(&central, &file(&other_ca, "ca.pem"), TOKEN_1, Some((&cert_1, &key_1)), ""),
    )
    .await;
    let detail = wait_offline_log(&wrong_trust, &["UnknownIssuer", "not signed by a trusted CA"]).await;
    assert!(detail.contains("ca_file"), "{detail}");
    drop(wrong_trust);

    // The right certificate: online, and messages arrive.
    let good = start_edge("store-1", &edge_config(&central, &ca, TOKEN_1, Some((&cert_1, &key_1)), "")).await;
    wait_online(&good).await;
    good.client().post_message("orders", b"hello".to_vec()).await.unwrap().accepted();
    wait_until_async(WAIT, "the central holds the message", || async {
        central.client().queue("orders").await.is_some_and(|q| q.last_seq == 1)
    })
    .await;
    // Operator endpoints need no client certificate.
    central.client().get("/v1/edges").await.unwrap().expect_status(200);
    assert_no_tokens(&[&central, &good]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edge_token_opens_links_only_for_its_own_edge_and_tokens_are_never_logged() {
    let certs = make_certs("central", &[]);
    let central = start_central(&certs, false).await;
    let ca = file(&certs, "ca.pem");

    // store-2's token presented by an edge that says it is store-1.
    let impostor = start_edge("store-1", &edge_config(&central, &ca, TOKEN_2, None, "")).await;
    let detail = wait_offline_log(&impostor, &["wrong token for edge \"store-1\""]).await;
    assert!(!detail.contains(TOKEN_2), "{detail}");
    // The same on the wire, without the edge: 401 and nothing opened.
    let hello = serde_json::json!({"edge_id": "store-1"});
    let answer = central
        .client()
        .with_token(TOKEN_2)
        .send(
            central
                .client()
                .with_token(TOKEN_2)
                .request(reqwest::Method::POST, "/v1/link")
                .header("outpost-edge-id", "store-1")
                .json(&hello),
        )
        .await
        .unwrap();
    assert_eq!(answer.status.as_u16(), 401, "{}", answer.text());
    drop(impostor);

    let edge_2 = start_edge("store-2", &edge_config(&central, &ca, TOKEN_2, None, "")).await;
    wait_online(&edge_2).await;
    let edges = central.client().get("/v1/edges").await.unwrap().json();
    let ids: Vec<&str> = edges.as_array().unwrap().iter().filter_map(|e| e["id"].as_str()).collect();
    assert!(ids.contains(&"store-2"), "{edges}");
    assert!(
        !edges.as_array().unwrap().iter().any(|e| e["id"] == "store-1" && e["state"] == "online"),
        "store-1 never went online: {edges}"
    );
    // Debug logs of both ends, the refusals included, never hold a token.
    assert_no_tokens(&[&central, &edge_2]);
}

/// Copies `name`.pem/.key of `from` over the central's files, each by an atomic rename.
fn replace_central_cert(from: &tempfile::TempDir, name: &str, to: &tempfile::TempDir) {
    for ext in ["key", "pem"] {
        let staged: PathBuf = to.path().join(format!("central.{ext}.new"));
        std::fs::copy(from.path().join(format!("{name}.{ext}")), &staged).unwrap();
        std::fs::rename(&staged, to.path().join(format!("central.{ext}"))).unwrap();
    }
}

async fn answers_with_ca(url: &str, ca: &Path) -> bool {
    Client::with_ca(url, ca).get("/healthz").await.is_ok_and(|r| r.status.as_u16() == 200)
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_replaced_on_disk_are_used_without_a_restart_and_a_broken_file_keeps_the_old() {
    let certs = make_certs("central", &["store-1"]);
    let next = make_certs("central", &[]);
    let ca_1 = certs.path().join("ca.pem");
    let ca_2 = next.path().join("ca.pem");
    // Both CAs in one file, so the edge keeps trusting the central across the change.
    let both = certs.path().join("both-cas.pem");
    std::fs::write(&both, [std::fs::read(&ca_1).unwrap(), std::fs::read(&ca_2).unwrap()].concat()).unwrap();

    let mut central = start_central(&certs, false).await;
    let pid = central.pid();
    let edge =
        start_edge("store-1", &edge_config(&central, &both.display().to_string(), TOKEN_1, None, "")).await;
    wait_online(&edge).await;
    let log_entries_before = status(&edge).await["offline_log"].as_array().map(Vec::len);
    assert!(answers_with_ca(&central.url(), &ca_1).await);

    // A new certificate from another CA, written over the old files.
    replace_central_cert(&next, "central", &certs);
    wait_until_async(WAIT, "new connections get the new certificate", || async {
        answers_with_ca(&central.url(), &ca_2).await
    })
    .await;
    assert!(!answers_with_ca(&central.url(), &ca_1).await, "the old certificate is no longer served");
    assert_eq!(central.pid(), pid, "no restart");
    assert!(central.log().contains("TLS files re-read"), "{}", central.log());
    // The open link was not dropped.
    assert_eq!(status(&edge).await["state"], "online");
    assert_eq!(status(&edge).await["offline_log"].as_array().map(Vec::len), log_entries_before);

    // A broken new certificate: ERROR logged, the one in use stays.
    let errors_before = central.log().matches(" ERROR ").count();
    std::fs::write(certs.path().join("central.pem"), "this is not a certificate\n").unwrap();
    wait_until_async(WAIT, "an ERROR about the broken file", || async {
        let log = central.log();
        log.matches(" ERROR ").count() > errors_before
            && log
                .lines()
                .any(|l| l.contains(" ERROR ") && l.contains("tls.cert_file") && l.contains("not a PEM"))
    })
    .await;
    assert!(answers_with_ca(&central.url(), &ca_2).await, "the last good certificate is still served");
    assert!(central.is_running());

    // SIGHUP re-reads at once; a fixed file is taken.
    replace_central_cert(&certs, "central", &certs);
    std::fs::copy(next.path().join("central.pem"), certs.path().join("central.pem")).unwrap();
    std::fs::copy(next.path().join("central.key"), certs.path().join("central.key")).unwrap();
    central.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until_async(WAIT, "SIGHUP re-read", || async {
        central.log().contains("SIGHUP: re-reading the TLS files")
    })
    .await;
    assert!(answers_with_ca(&central.url(), &ca_2).await);
    assert_eq!(status(&edge).await["state"], "online");
    assert!(central.is_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_files_at_start_exit_2_naming_the_file() {
    let certs = make_certs("central", &["store-1"]);
    let dir = certs.path();
    make_certs_in(dir, "expired", &[], Some("-1"));
    std::fs::write(dir.join("garbage.pem"), "hello\n").unwrap();
    let cases = [
        ("missing.pem", "central.key", "tls.cert_file", "cannot read the file"),
        ("garbage.pem", "central.key", "tls.cert_file", "not a PEM certificate file"),
        ("central.pem", "garbage.pem", "tls.key_file", "not a PEM private key"),
        ("expired.pem", "expired.key", "tls.cert_file", "the certificate expired at"),
        ("central.pem", "store-1.key", "tls.key_file", "does not match the certificate"),
    ];
    for (cert, key, config_key, problem) in cases {
        let mut node = Node::builder(BIN)
            .role("central")
            .config(&format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                dir.join(cert).display(),
                dir.join(key).display()
            ))
            .spawn();
        let status = node.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(2), "{cert}/{key}: {}", node.log());
        let log = node.log();
        let named = if config_key == "tls.cert_file" { cert } else { key };
        assert!(
            log.lines().any(|l| l.contains(config_key) && l.contains(named) && l.contains(problem)),
            "{cert}/{key}: expected {config_key} {named}: {problem} in\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_over_tls_with_sslmode() {
    let database = testkit::postgres::TestDatabase::create().await;
    let admin = testkit::postgres::admin_url();
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        eprintln!("the PostgreSQL server at {admin} has ssl=off: sslmode=require cannot be tested here");
        return;
    }
    let separator = if database.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", database.url);
    let central =
        Node::builder(BIN).role("central").args(["--node-id", "hq-tls", "--postgres", &url]).start().await;
    central.client().post_message("orders", b"over tls".to_vec()).await.unwrap().accepted();
    // Every connection the central holds to its database is encrypted.
    let rows = client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
            &[&database.name],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "the central holds connections to {}", database.name);
    assert!(rows.iter().all(|r| r.get::<_, bool>(0)), "every connection uses TLS");
    assert!(
        central.log().contains("sslmode=\"require\"") || central.log().contains("sslmode=require"),
        "{}",
        central.log()
    );

    // verify-full with the server's own (self-signed, "localhost") certificate as the root.
    let snakeoil = Path::new("/etc/ssl/certs/ssl-cert-snakeoil.pem");
    if snakeoil.exists() && database.url.contains("@127.0.0.1:") {
        let verified = format!(
            "{}{separator}sslmode=verify-full&sslrootcert={}",
            database.url.replace("@127.0.0.1:", "@localhost:"),
            snakeoil.display()
        );
        let node = Node::builder(BIN)
            .role("central")
            .args(["--node-id", "hq-verified", "--postgres", &verified])
            .start()
            .await;
        node.client().get("/v1/queues").await.unwrap().expect_status(200);
    }

    // verify-full against a certificate no trusted CA signed (the server's snakeoil one): refused
    // with a clear error.
    let strict = format!("{}{separator}sslmode=verify-full", database.url);
    let mut refused =
        Node::builder(BIN).role("central").args(["--node-id", "hq-strict", "--postgres", &strict]).spawn();
    let exit = refused.wait_exit(WAIT).await;
    assert_eq!(exit.code(), Some(1), "{}", refused.log());
    assert!(refused.log().contains("TLS with PostgreSQL"), "{}", refused.log());
}

/// The client side re-reads its files too: an edge whose `ca_file` does not trust the central
/// goes online once a file that does is written in its place, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn an_edge_uses_a_replaced_ca_file_without_a_restart() {
    let certs = make_certs("central", &[]);
    let other = make_certs("central", &[]);
    let trust = certs.path().join("edge-trust.pem");
    std::fs::copy(other.path().join("ca.pem"), &trust).unwrap();
    let central = start_central(&certs, false).await;
    let edge =
        start_edge("store-1", &edge_config(&central, &trust.display().to_string(), TOKEN_1, None, "")).await;
    wait_offline_log(&edge, &["UnknownIssuer"]).await;
    let pid = edge.pid();

    let staged = certs.path().join("edge-trust.pem.new");
    std::fs::copy(certs.path().join("ca.pem"), &staged).unwrap();
    std::fs::rename(&staged, &trust).unwrap();
    wait_online(&edge).await;
    assert_eq!(edge.pid(), pid, "no restart");
    assert!(edge.log().contains("TLS files re-read"), "{}", edge.log());
}
