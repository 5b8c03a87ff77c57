//! The real binary under `outpost --ha`: kill -9 the node, time its return, and find every acknowledged message.
//!
//! Talks plain HTTP/1.1 over `std::net::TcpStream` so the test needs no async runtime and shares
//! no client code with the node it checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

const MESSAGES_BEFORE_KILL: usize = 50;
const MESSAGES_AFTER_RESTART: usize = 10;
/// The contract's default `restart_delay`; the test runs the watcher with default settings.
const RESTART_DELAY: Duration = Duration::from_secs(2);

#[test]
fn kill_9_under_ha_is_back_within_restart_delay_and_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let log_path = data_dir.join("outpost_ha.log");
    let address = free_loopback_address();
    let mut watcher = Watcher::start(&address, &data_dir, dir.path());

    assert!(
        wait_until(Duration::from_secs(30), || http(address, "GET", "/readyz", b"")
            .is_some_and(|r| r.status == 200)),
        "the node never became ready; watcher log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    let mut acknowledged = Vec::new();
    for index in 0..MESSAGES_BEFORE_KILL {
        acknowledged.push(post_message(address, &format!("before-kill-{index}")));
    }

    let first_child = child_pids(&log_path)[0];
    let killed_at = Instant::now();
    kill(first_child, Signal::SIGKILL).unwrap();
    // Only poll /readyz once the watcher has seen the old child end, so the answer cannot come
    // from the dying process.
    assert!(
        wait_until(Duration::from_secs(10), || log_has(&log_path, "HA07", &format!("pid={first_child}"))),
        "the watcher did not notice the kill"
    );
    assert!(
        wait_until(Duration::from_secs(30), || http(address, "GET", "/readyz", b"")
            .is_some_and(|r| r.status == 200)),
        "the node did not come back; watcher log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let back_after = killed_at.elapsed();
    eprintln!(
        "outpost --ha: kill -9 to /readyz 200 again took {back_after:?} (restart_delay {RESTART_DELAY:?})"
    );
    assert!(back_after >= RESTART_DELAY, "restarted before restart_delay: {back_after:?}");
    assert!(back_after < RESTART_DELAY + Duration::from_secs(10), "took {back_after:?} to serve again");

    let children = child_pids(&log_path);
    assert_eq!(children.len(), 2, "exactly one restart");
    assert_ne!(children[1], first_child);
    assert!(log_has(&log_path, "HA07", &format!("child ended signal=SIGKILL pid={first_child}")));
    assert!(log_has(&log_path, "HA08", "restarting child in 2000ms"));

    for index in 0..MESSAGES_AFTER_RESTART {
        acknowledged.push(post_message(address, &format!("after-restart-{index}")));
    }

    let response =
        http(address, "GET", "/v1/queues/q/messages?after_seq=0&limit=1000", b"").expect("read the queue");
    assert_eq!(response.status, 200, "{}", response.body_text());
    let listing: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    let stored = listing["messages"].as_array().expect("messages array");
    for message in &acknowledged {
        let found = stored.iter().find(|m| m["id"] == message.id.as_str());
        let found = found.unwrap_or_else(|| {
            panic!("acknowledged message {} (seq {}) is missing", message.id, message.seq)
        });
        assert_eq!(found["seq"], message.seq, "{found}");
        assert_eq!(found["payload_base64"], base64_encode(message.payload.as_bytes()), "{found}");
    }
    assert_eq!(stored.len(), acknowledged.len(), "nothing stored twice or out of nowhere");

    watcher.stop_and_expect_clean_exit();
    assert!(log_has(&log_path, "HA10", &format!("stop requested, stopping child pid={}", children[1])));
    assert!(log_has(&log_path, "HA07", &format!("child ended code=0 pid={}", children[1])));
    assert_eq!(killpg(children[1], None), Err(Errno::ESRCH), "the node's process group is gone");
}

struct Acknowledged {
    id: String,
    seq: u64,
    payload: String,
}

fn post_message(address: SocketAddr, payload: &str) -> Acknowledged {
    let response =
        http(address, "POST", "/v1/queues/q/messages", payload.as_bytes()).expect("POST reaches the node");
    assert_eq!(response.status, 202, "{}", response.body_text());
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    Acknowledged {
        id: body["id"].as_str().expect("id").to_string(),
        seq: body["seq"].as_u64().expect("seq"),
        payload: payload.to_string(),
    }
}

/// `outpost --ha edge` as a child of the test, killed (with its node) if the test fails.
struct Watcher {
    process: Child,
    exited: bool,
}

impl Watcher {
    fn start(address: &SocketAddr, data_dir: &Path, output_dir: &Path) -> Watcher {
        let output = std::fs::File::create(output_dir.join("outpost.out")).unwrap();
        let process = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["--ha", "edge", "--listen", &address.to_string(), "--data-dir"])
            .arg(data_dir)
            // No central: by default an edge would try 127.0.0.1:7401.
            .env("OUTPOST_UPSTREAM", "none")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .expect("start outpost --ha");
        Watcher { process, exited: false }
    }

    fn stop_and_expect_clean_exit(&mut self) {
        kill(Pid::from_raw(self.process.id() as i32), Signal::SIGTERM).unwrap();
        let mut status = None;
        wait_until(Duration::from_secs(40), || {
            status = self.process.try_wait().unwrap();
            status.is_some()
        });
        let status = status.expect("the watcher exits after SIGTERM");
        self.exited = true;
        assert_eq!(status.code(), Some(0), "{status}");
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if !self.exited {
            // The node gets SIGTERM from PR_SET_PDEATHSIG when its watcher dies.
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

fn free_loopback_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn child_pids(log_path: &Path) -> Vec<Pid> {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    log.lines()
        .filter_map(|line| line.split_once(" HA04 child started pid="))
        .map(|(_, pid)| Pid::from_raw(pid.trim().parse().expect("HA04 pid")))
        .collect()
}

fn log_has(log_path: &Path, code: &str, text: &str) -> bool {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    log.lines().any(|line| line.split(' ').nth(1) == Some(code) && line.contains(text))
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection; `None` if the node does not answer (not
/// listening, connection reset while it dies).
fn http(address: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<Response> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;

    let header_end = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..header_end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut body = raw[header_end + 4..].to_vec();
    if head.lines().any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked")) {
        body = dechunk(&body)?;
    }
    Some(Response { status, body })
}

fn dechunk(mut chunked: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = chunked.windows(2).position(|window| window == b"\r\n")?;
        let size_text = std::str::from_utf8(&chunked[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        chunked = &chunked[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(chunked.get(..size)?);
        chunked = chunked.get(size + 2..)?;
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in bytes.chunks(3) {
        let triple = u32::from(chunk[0]) << 16
            | u32::from(*chunk.get(1).unwrap_or(&0)) << 8
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for position in 0..4 {
            if position <= chunk.len() {
                encoded.push(ALPHABET[(triple >> (18 - 6 * position) & 0x3f) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

#[test]
fn base64_encode_matches_rfc_4648_vectors() {
    let cases = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (input, expected) in cases {
        assert_eq!(base64_encode(input.as_bytes()), expected);
    }
}
