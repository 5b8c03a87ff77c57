//! The systemd notify protocol, by hand: `READY=1`, `WATCHDOG=1`, `STOPPING=1` datagrams to `$NOTIFY_SOCKET`.
//!
//! See sd_notify(3): the socket is a unix datagram socket named by `NOTIFY_SOCKET`, either a
//! file system path or, when the value starts with '@', an abstract socket name. The watchdog is
//! on when `WATCHDOG_USEC` is set (and `WATCHDOG_PID`, if set, is our pid); the service must
//! ping at least that often, so we ping at half of it as sd_watchdog_enabled(3) recommends.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Environment variables systemd uses to talk to the main process of a service.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// Why a notification could not be sent. Never fatal to the node: the caller logs it.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={socket:?} is not a usable socket address: {source}")]
    BadSocketAddress { socket: OsString, source: std::io::Error },
    #[error("cannot send {message:?} to NOTIFY_SOCKET={socket:?}: {source}")]
    Send { message: &'static str, socket: OsString, source: std::io::Error },
    #[error("cannot write the readiness notice to fd {fd} (from OUTPOST_HA_READY_FD): {source}")]
    ReadinessPipe { fd: i32, source: std::io::Error },
    #[error("OUTPOST_HA_READY_FD={value:?} is not a file descriptor number of 3 or more")]
    BadReadinessFd { value: OsString },
}

/// Sends `message` to `$NOTIFY_SOCKET`. Returns `Ok(false)` when the variable is not set (not
/// under systemd), `Ok(true)` when the datagram was sent.
pub fn notify(message: &'static str) -> Result<bool, NotifyError> {
    match std::env::var_os(NOTIFY_SOCKET_ENV) {
        None => Ok(false),
        Some(socket) if socket.is_empty() => Ok(false),
        Some(socket) => send_to_notify_socket(&socket, message).map(|()| true),
    }
}

fn send_to_notify_socket(socket: &OsString, message: &'static str) -> Result<(), NotifyError> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::SocketAddr;

    let bytes = socket.as_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name),
        None => SocketAddr::from_pathname(socket),
    }
    .map_err(|source| NotifyError::BadSocketAddress { socket: socket.clone(), source })?;
    let send_error = |source| NotifyError::Send { message, socket: socket.clone(), source };
    let sender = UnixDatagram::unbound().map_err(send_error)?;
    sender.send_to_addr(message.as_bytes(), &address).map_err(send_error)?;
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, or `None` when the watchdog is off
/// or meant for another process (`$WATCHDOG_PID` set to a pid that is not ours).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var(WATCHDOG_USEC_ENV).ok().as_deref(),
        std::env::var(WATCHDOG_PID_ENV).ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_table() {
        let own = 4242;
        let cases: &[(Option<&str>, Option<&str>, Option<Duration>)] = &[
            (None, None, None),
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (Some("30000000"), Some("4242"), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("4243"), None),
            (Some("30000000"), Some("not-a-pid"), None),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("soon"), None, None),
            (Some("3"), None, Some(Duration::from_nanos(1500))),
        ];
        for &(usec, pid, expected) in cases {
            assert_eq!(watchdog_interval_from(usec, pid, own), expected, "usec={usec:?} pid={pid:?}");
        }
    }
}
