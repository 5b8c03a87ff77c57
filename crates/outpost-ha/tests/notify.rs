//! notify_ready / notify_watchdog against a real unix datagram socket and a real readiness pipe.
//!
//! The environment is process-wide, so every test here holds `ENV_LOCK` while it sets variables
//! (nextest runs each test in its own process anyway; this keeps `cargo test` correct too).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use outpost_ha::{notify_ready, notify_watchdog, try_notify_watchdog, watchdog_interval, READY_FD_ENV};

static ENV_LOCK: Mutex<()> = Mutex::new(());

fn env_lock() -> MutexGuard<'static, ()> {
    let guard = ENV_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", READY_FD_ENV] {
        std::env::remove_var(name);
    }
    guard
}

fn receive(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buffer = [0_u8; 256];
    let length = socket.recv(&mut buffer).expect("a datagram arrives");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

#[test]
fn notify_ready_sends_ready_to_a_path_socket_and_writes_the_readiness_pipe() {
    let _env = env_lock();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &socket_path);
    std::env::set_var(READY_FD_ENV, ready_write.as_raw_fd().to_string());
    // notify_ready takes ownership of the fd (it closes it after the notice).
    std::mem::forget(ready_write);

    notify_ready();

    assert_eq!(receive(&systemd), "READY=1");
    let mut notice = String::new();
    std::fs::File::from(ready_read).read_to_string(&mut notice).unwrap(); // EOF: the fd was closed
    assert_eq!(notice, "READY=1\n");
}

#[test]
fn notify_watchdog_sends_watchdog_to_an_abstract_socket() {
    let _env = env_lock();
    use std::os::linux::net::SocketAddrExt;
    let name = format!("outpost-ha-test-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let systemd = UnixDatagram::bind_addr(&address).unwrap();
    std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));

    notify_watchdog();

    assert_eq!(receive(&systemd), "WATCHDOG=1");
}

#[test]
fn without_notify_socket_notifications_do_nothing() {
    let _env = env_lock();
    notify_ready();
    try_notify_watchdog().expect("no socket is not an error");
}

#[test]
fn a_missing_notify_socket_is_a_reported_error() {
    let _env = env_lock();
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("NOTIFY_SOCKET", dir.path().join("nobody-listens.sock"));
    let error = try_notify_watchdog().unwrap_err();
    assert!(error.to_string().contains("nobody-listens.sock"), "{error}");
}

#[test]
fn watchdog_interval_is_half_of_watchdog_usec_for_our_pid() {
    let _env = env_lock();
    assert_eq!(watchdog_interval(), None);
    std::env::set_var("WATCHDOG_USEC", "30000000");
    assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));
    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
    assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));
    std::env::set_var("WATCHDOG_PID", (std::process::id() + 1).to_string());
    assert_eq!(watchdog_interval(), None, "the watchdog is meant for another process");
}
