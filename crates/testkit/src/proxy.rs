//! A link-shaping TCP proxy: puts a slow, distant or broken line between a node and its peer
//! (latency, a bandwidth cap per direction, dropped connections, a blackhole that holds sockets
//! open), changeable while traffic flows.
//!
//! # Model
//!
//! - **One line per proxy, one per direction.** Every connection through a proxy shares its
//!   *up* line (client → target) and its *down* line (target → client), like the connections of one
//!   site sharing one DSL line. A line carries one chunk at a time at `bytes_per_second`; a
//!   connection reads its next chunk only once its previous one has left the line, so connections
//!   take turns chunk by chunk (per-flow fairness, like a modern router's queue) and a connection
//!   that sends little (a ping) waits for at most one chunk of each busy connection. What a sender
//!   writes faster than the line carries waits in its own socket buffers, as on a real modem.
//! - **Latency is one-way, per direction.** A chunk arrives `latency` after it has left the line;
//!   a request-answer round trip therefore takes at least `2 × latency`.
//! - **Blackhole**: nothing is read, nothing is delivered, no connection is closed; new connections
//!   are accepted and held the same way. When it ends, held bytes flow on in order (as TCP would
//!   retransmit them). A peer sees a line that went silent, not one that broke.
//! - **Dropped connections**: [`LinkProxy::drop_connections`] resets every open connection at
//!   once (both sides see a reset); [`LinkProxy::refuse_connections`] resets new ones as soon as
//!   they are accepted.
//! - Changes ([`LinkProxy::set_shape`]) apply to the next chunk of every connection.
//!
//! The proxy runs on its own thread and runtime, so a busy test runtime cannot disturb its timing
//! and it works from synchronous code too. `cargo run -p testkit --bin linkproxy` runs it as a
//! process (for `bench/wan.sh`).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The largest chunk a connection moves at once.
const MAX_CHUNK_BYTES: usize = 16 << 10;
/// The smallest chunk on a capped line (below this, per-chunk overhead dominates).
const MIN_CHUNK_BYTES: usize = 256;
/// On a capped line a chunk takes about this long to send, so turns between connections are short.
const CHUNK_TIME: Duration = Duration::from_millis(5);
/// Chunks on their way (sent, not yet delivered) per connection and direction; bounds memory when
/// the receiver does not read (its bytes then wait in the proxy's socket buffers).
const CHUNKS_IN_TRANSIT: usize = 4096;

/// How the line behaves. [`LinkShape::default`] is a perfect line: no delay, no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkShape {
    /// One-way delay, each direction.
    pub latency: Duration,
    /// Client → target, bytes per second; 0: no cap.
    pub up_bytes_per_second: u64,
    /// Target → client, bytes per second; 0: no cap.
    pub down_bytes_per_second: u64,
    /// Nothing moves, nothing closes (see the module doc).
    pub blackhole: bool,
}

impl LinkShape {
    /// A symmetric line: `latency` one way, `bits_per_second` each direction (0: no cap).
    pub fn line(latency: Duration, bits_per_second: u64) -> LinkShape {
        LinkShape {
            latency,
            up_bytes_per_second: bits_per_second / 8,
            down_bytes_per_second: bits_per_second / 8,
            blackhole: false,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

struct Shared {
    target: SocketAddr,
    shape: watch::Sender<LinkShape>,
    /// When each line (up, down) is free again.
    line_free_at: [Mutex<Instant>; 2],
    delivered_bytes: [AtomicU64; 2],
    refuse: AtomicBool,
    connections: Mutex<HashMap<u64, Vec<AbortHandle>>>,
    next_connection: AtomicU64,
    accepted: AtomicU64,
}

impl Shared {
    fn index(direction: Direction) -> usize {
        match direction {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// A running proxy; dropping it stops it and closes every connection.
pub struct LinkProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LinkProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr, shape: LinkShape) -> LinkProxy {
        LinkProxy::start_on("127.0.0.1:0".parse().expect("an address"), target, shape)
            .expect("bind a loopback port for the link proxy")
    }

    /// Like [`LinkProxy::start`] on a given listen address.
    pub fn start_on(listen: SocketAddr, target: SocketAddr, shape: LinkShape) -> std::io::Result<LinkProxy> {
        let listener = StdTcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            target,
            shape: watch::Sender::new(shape),
            line_free_at: [Mutex::new(now), Mutex::new(now)],
            delivered_bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            refuse: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        let thread =
            std::thread::Builder::new().name(format!("linkproxy-{}", address.port())).spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the link proxy's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("a tokio listener");
                    tokio::select! {
                        _ = accept_loop(listener, thread_shared) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime ends every connection task, closing its sockets.
            })?;
        Ok(LinkProxy { address, shared, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`, for a node's `[[upstream]] url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn shape(&self) -> LinkShape {
        *self.shared.shape.borrow()
    }

    /// Changes the line for the next chunk of every connection.
    pub fn set_shape(&self, shape: LinkShape) {
        self.shared.shape.send_replace(shape);
    }

    /// Starts or ends a blackhole, keeping the rest of the shape.
    pub fn blackhole(&self, on: bool) {
        self.shared.shape.send_modify(|shape| shape.blackhole = on);
    }

    /// Resets every open connection; returns how many there were.
    pub fn drop_connections(&self) -> usize {
        let connections: Vec<Vec<AbortHandle>> =
            self.shared.connections.lock().expect("proxy lock").drain().map(|(_, tasks)| tasks).collect();
        for task in connections.iter().flatten() {
            task.abort();
        }
        connections.len()
    }

    /// While on, every new connection is reset as soon as it is accepted (open ones stay).
    pub fn refuse_connections(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Bytes delivered to the target so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.delivered_bytes[0].load(Ordering::SeqCst)
    }

    /// Bytes delivered to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.delivered_bytes[1].load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.connections.lock().expect("proxy lock").len()
    }

    /// Connections accepted since the start.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refuse.load(Ordering::SeqCst) {
            let _ = client.set_zero_linger();
            continue;
        }
        let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
        let connection_shared = shared.clone();
        let task = tokio::spawn(async move {
            connect(client, &connection_shared, id).await;
            connection_shared.connections.lock().expect("proxy lock").remove(&id);
        });
        shared.connections.lock().expect("proxy lock").insert(id, vec![task.abort_handle()]);
    }
}

/// Connects to the target and moves bytes both ways until both directions have ended.
async fn connect(client: TcpStream, shared: &Arc<Shared>, id: u64) {
    let _ = client.set_nodelay(true);
    // Reset, not FIN, when the proxy drops the connection: a dropped line is not a clean close.
    let _ = client.set_zero_linger();
    // During a blackhole the connection to the target waits too: nothing gets through.
    wait_for_light(&mut shared.shape.subscribe()).await;
    let Ok(target) = TcpStream::connect(shared.target).await else { return };
    let _ = target.set_nodelay(true);
    let _ = target.set_zero_linger();
    let (client_read, client_write) = client.into_split();
    let (target_read, target_write) = target.into_split();
    let up = tokio::spawn(pump(client_read, target_write, Direction::Up, shared.clone()));
    let down = tokio::spawn(pump(target_read, client_write, Direction::Down, shared.clone()));
    if let Some(tasks) = shared.connections.lock().expect("proxy lock").get_mut(&id) {
        tasks.push(up.abort_handle());
        tasks.push(down.abort_handle());
    } else {
        // Dropped while connecting.
        up.abort();
        down.abort();
        return;
    }
    let _ = up.await;
    let _ = down.await;
}

/// Returns once no blackhole is on.
async fn wait_for_light(shape: &mut watch::Receiver<LinkShape>) {
    let _ = shape.wait_for(|s| !s.blackhole).await;
}

/// One direction of one connection: reads chunks as fast as the line carries them and delivers
/// each `latency` after it left the line.
async fn pump(mut from: OwnedReadHalf, to: OwnedWriteHalf, direction: Direction, shared: Arc<Shared>) {
    let mut to = ResetOnDrop(Some(to));
    let (transit_tx, mut transit_rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(CHUNKS_IN_TRANSIT);
    let delivery_shared = shared.clone();
    let deliver = async move {
        let mut shape = delivery_shared.shape.subscribe();
        while let Some((due, chunk)) = transit_rx.recv().await {
            tokio::time::sleep_until(due).await;
            wait_for_light(&mut shape).await;
            let to = to.0.as_mut().expect("the write half is held until drop");
            let Some(chunk) = chunk else {
                let _ = to.shutdown().await;
                return;
            };
            // Counted before the write so that an answer to these bytes never beats the count.
            delivery_shared.delivered_bytes[Shared::index(direction)]
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let read = async move {
        let mut shape_rx = shared.shape.subscribe();
        let mut buffer = vec![0u8; MAX_CHUNK_BYTES];
        loop {
            wait_for_light(&mut shape_rx).await;
            let chunk_limit = chunk_bytes(rate_of(&shape_rx.borrow(), direction));
            let n = match from.read(&mut buffer[..chunk_limit]).await {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            // The shape when the bytes arrived, not when the read began.
            let shape = *shape_rx.borrow_and_update();
            let rate = rate_of(&shape, direction);
            if n == 0 {
                let _ = transit_tx.send((Instant::now() + shape.latency, None)).await;
                return;
            }
            let left_line_at = if rate == 0 {
                Instant::now()
            } else {
                let mut free_at = shared.line_free_at[Shared::index(direction)].lock().expect("line lock");
                let start = (*free_at).max(Instant::now());
                let end = start + Duration::from_secs_f64(n as f64 / rate as f64);
                *free_at = end;
                end
            };
            if transit_tx.send((left_line_at + shape.latency, Some(buffer[..n].to_vec()))).await.is_err() {
                return;
            }
            // The next chunk of this connection waits its turn on the line.
            tokio::time::sleep_until(left_line_at).await;
        }
    };
    tokio::join!(read, deliver);
}

/// A write half that, when dropped without a clean end (the connection was dropped), sends no
/// FIN: the socket closes with the read half, by reset (zero linger).
struct ResetOnDrop(Option<OwnedWriteHalf>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(half) = self.0.take() {
            half.forget();
        }
    }
}

fn rate_of(shape: &LinkShape, direction: Direction) -> u64 {
    match direction {
        Direction::Up => shape.up_bytes_per_second,
        Direction::Down => shape.down_bytes_per_second,
    }
}

/// The chunk size for a line of `rate` bytes/s: about [`CHUNK_TIME`] of sending.
fn chunk_bytes(rate: u64) -> usize {
    if rate == 0 {
        return MAX_CHUNK_BYTES;
    }
    let per_chunk = (rate as f64 * CHUNK_TIME.as_secs_f64()) as usize;
    per_chunk.clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
}

/// Parses a line rate: `"64kbit"`, `"10Mbit"`, `"1Gbit"` (bits per second, decimal) or a size per
/// second as config writes it (`"256KiB"`, `"1MB"`, bytes per second). Returns bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number: u64 = text[..digits_end].parse().map_err(|_| format!("invalid rate {text:?}"))?;
    let bits = match text[digits_end..].trim() {
        "bit" => Some(1),
        "kbit" => Some(1_000),
        "Mbit" => Some(1_000_000),
        "Gbit" => Some(1_000_000_000),
        _ => None,
    };
    match bits {
        Some(multiplier) => Ok(number * multiplier / 8),
        None => outpost_core::units::parse_size(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_chunks() {
        assert_eq!(parse_rate("64kbit").unwrap(), 8_000);
        assert_eq!(parse_rate("10Mbit").unwrap(), 1_250_000);
        assert_eq!(parse_rate("256KiB").unwrap(), 262_144);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
        assert_eq!(chunk_bytes(0), MAX_CHUNK_BYTES);
        assert_eq!(chunk_bytes(8_000), MIN_CHUNK_BYTES);
        assert_eq!(chunk_bytes(1_250_000), 6_250);
    }
}
