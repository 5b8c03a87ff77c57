//! The link-shaping proxy as a process, for benchmark scripts:
//!
//! ```text
//! linkproxy --target 127.0.0.1:7401 [--listen 127.0.0.1:0] [--latency 50ms] [--rate 10Mbit]
//!           [--up-rate R] [--down-rate R] [--report-every 100ms]
//! ```
//!
//! Prints `listening on ADDR` once ready, then runs until killed. Rates as `64kbit`, `10Mbit` or
//! bytes per second (`256KiB`); `--rate` sets both directions. With `--report-every`, prints
//! `bytes up U down D connections C` at that interval whenever a count changed: bytes delivered to
//! the target (up) and to clients (down), and connections accepted, since the start.

use std::net::SocketAddr;
use std::time::Duration;

use testkit::proxy::{parse_rate, LinkProxy, LinkShape};

fn main() {
    if let Err(problem) = run() {
        eprintln!("linkproxy: {problem}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let mut target: Option<SocketAddr> = None;
    let mut shape = LinkShape::default();
    let mut report_every: Option<Duration> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--target" => target = Some(value()?.parse().map_err(|e| format!("--target: {e}"))?),
            "--latency" => shape.latency = outpost_core::units::parse_duration(&value()?)?,
            "--rate" => {
                let rate = parse_rate(&value()?)?;
                shape.up_bytes_per_second = rate;
                shape.down_bytes_per_second = rate;
            }
            "--up-rate" => shape.up_bytes_per_second = parse_rate(&value()?)?,
            "--down-rate" => shape.down_bytes_per_second = parse_rate(&value()?)?,
            "--report-every" => report_every = Some(outpost_core::units::parse_duration(&value()?)?),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    let target = target.ok_or("--target ADDR is required")?;
    let proxy =
        LinkProxy::start_on(listen, target, shape).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("listening on {}", proxy.address());
    let Some(interval) = report_every.filter(|interval| !interval.is_zero()) else {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    };
    let mut reported = (0, 0, 0);
    loop {
        std::thread::sleep(interval);
        let now = (proxy.bytes_up(), proxy.bytes_down(), proxy.accepted_connections());
        if now != reported {
            println!("bytes up {} down {} connections {}", now.0, now.1, now.2);
            reported = now;
        }
    }
}
