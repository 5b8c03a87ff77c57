//! The HTTP listener: accepts connections up to `limits.max_connections` (more are closed at
//! accept while the others are served on), sets TCP keepalive, gives every request
//! `limits.request_timeout` for its headers and again for its body (a body that stops gets 408),
//! closes a connection that has no request in progress for `request_timeout`, and stops
//! gracefully: no new connections, in-flight requests finish. With TLS (`[tls]`) each
//! connection's handshake must also finish within `request_timeout`, takes the certificates in use
//! at that moment (so reloaded files reach new connections), and a verified client certificate
//! reaches the handlers as a [`PeerIdentity`] request extension. Each HTTP/1.1 connection starts in
//! the single-write lane ([`crate::single_write`]), which serves `POST /v1/queues/{q}/messages`
//! itself and hands the connection to hyper and the router at the first other request (an HTTP/2
//! preface included; a TLS connection that picked `h2` by ALPN skips the lane).
//!
//! Every connection speaks HTTP/1.1 or HTTP/2 on the same port: cleartext by the HTTP/2 preface
//! (prior knowledge), TLS by ALPN (`h2`, `http/1.1`). An edge's link (its event stream, batches,
//! reports, probes and downlink reads) is then one TCP connection at its central. The limits hold
//! for both: `max_connections` counts TCP connections; HTTP/2 adds a bound on concurrent streams
//! and on the header list of each, keepalive PINGs that close the connection of a peer that stopped
//! answering, and a GOAWAY on shutdown and idle close (a peer that ignores it is cut off after
//! `CLOSE_GRACE`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use outpost_tls::{PeerIdentity, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::time::Sleep;
use tower_service::Service;

use crate::single_write::{self, LaneEnd};
use crate::ApiState;

/// Idle time before TCP keepalive probes on accepted connections (edge links are long-lived).
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a connection the single-write lane closes may take to shut down (TLS `close_notify`).
const LANE_SHUTDOWN: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// HTTP/2 streams one connection may have open at once (a stream past it is refused). An edge uses
/// one for its link stream, one per batch in flight (`forwarding.in_flight` per queue), one per
/// report, probe and downlink read; a client that wants more waits for a stream to end. Each stream
/// may hold a request body of its own, so this also bounds what one connection can make the node
/// buffer.
const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 64;
/// The largest header list (HPACK-decoded) of one HTTP/2 request; HTTP/1.1 headers are bounded by
/// hyper's read buffer (about 400 KiB, at most 100 headers).
const HTTP2_MAX_HEADER_LIST_BYTES: u32 = 64 << 10;
/// A connection whose peer sent nothing for this long gets an HTTP/2 PING...
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and is closed if the answer has not come within this. An edge on a thin line may have a
/// whole receive window (1 MiB) of batch data queued ahead of its answer in its socket: 1 MiB at
/// 64 kbit/s is 131 s, so anything shorter would cut off slow, live edges (CONTRACT section 5).
const HTTP2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a closing connection (shutdown, or idle for `request_timeout`) with no request in
/// progress may take to say goodbye before it is dropped: an HTTP/2 peer that never answers the
/// GOAWAY's PING would otherwise hold it open.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What `serve` needs from the limits.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    pub max_connections: u32,
    pub request_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then closes the listener and waits for
/// open connections to finish their requests. With `lane` (the state `app` was built with), single
/// writes are served by the single-write lane.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    lane: Option<Arc<ApiState>>,
    limits: ListenerLimits,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a receiver; `closed()` resolves when the last one ends.
    let (open_tx, open_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused_so_far = refused,
                    "connection refused: limits.max_connections are open"
                );
            }
            drop(stream);
            continue;
        };
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let request_timeout = limits.request_timeout;
        let stop = stop_rx.clone();
        let open = open_rx.clone();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let lane = lane.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = open;
            let Some(acceptor) = acceptor else {
                return serve_connection(stream, app, lane, None, request_timeout, stop).await;
            };
            match tokio::time::timeout(request_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let identity = stream.get_ref().1.peer_certificates().and_then(PeerIdentity::from_chain);
                    // HTTP/2 by ALPN: no HTTP/1.1 request will come for the lane to serve.
                    let lane = lane.filter(|_| stream.get_ref().1.alpn_protocol() != Some(b"h2"));
                    serve_connection(stream, app, lane, identity, request_timeout, stop).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, "TLS handshake failed: {e}"),
                Err(_) => tracing::info!(%peer, "TLS handshake not finished within limits.request_timeout"),
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// Serves one connection until it ends: in the single-write lane while it has `lane` and the
/// requests are single writes, then with hyper (HTTP/1.1 or HTTP/2) and `app`; gracefully once
/// `stop` turns true or once it has had no request in progress for `request_timeout`, and at the
/// latest [`CLOSE_GRACE`] after that with no request in progress.
async fn serve_connection<IO>(
    mut io: IO,
    app: Router,
    lane: Option<Arc<ApiState>>,
    identity: Option<PeerIdentity>,
    request_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let unread = match &lane {
        Some(state) => match single_write::serve(&mut io, state, request_timeout, &mut stop).await {
            LaneEnd::Closed => {
                // As hyper does: a TLS connection ends with `close_notify`, not a bare close
                // (bounded: a peer that reads nothing cannot hold the connection).
                let _ =
                    tokio::time::timeout(LANE_SHUTDOWN, tokio::io::AsyncWriteExt::shutdown(&mut io)).await;
                return;
            }
            LaneEnd::Handoff(unread) => unread,
        },
        None => Bytes::new(),
    };
    let io = TokioIo::new(Prefixed { unread, io });
    let (activity_tx, mut activity) = watch::channel(Activity { in_progress: 0, idle_since: Instant::now() });
    let activity_tx = Arc::new(activity_tx);
    let write_order = Arc::new(WriteOrder::default());
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut app = app.clone();
        let guard = InProgress::start(activity_tx.clone());
        // Taken here, as the request arrives (hyper calls the service in stream order), not when
        // its task first runs.
        let turn = is_queue_write(&request).then(|| write_order.take_turn());
        let mut request = request.map(|body| Body::new(DeadlineBody::new(body, request_timeout)));
        if let Some(identity) = &identity {
            request.extensions_mut().insert(identity.clone());
        }
        async move {
            let _answered = match turn {
                Some((before, answered)) => {
                    // Until the write before it on this connection has been answered: its sender
                    // is dropped unsent then (or when that write is cancelled).
                    if let Some(before) = before {
                        let _ = before.await;
                    }
                    Some(answered)
                }
                None => None,
            };
            let response = app.call(request).await.unwrap_or_else(|never| match never {});
            // The request is in progress until its answer has been sent (for an edge's link
            // stream: until the link closes).
            Ok::<_, Infallible>(response.map(|body| TrackedBody { inner: body, _guard: guard }))
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(request_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(HTTP2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE_TIMEOUT);
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut closing_since: Option<Instant> = None;
    if *stop.borrow() {
        closing_since = Some(Instant::now());
        connection.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = {
            let now = activity.borrow_and_update();
            match (now.in_progress, closing_since) {
                (0, None) => Some(now.idle_since + request_timeout),
                (0, Some(since)) => Some(since.max(now.idle_since) + CLOSE_GRACE),
                _ => None,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                break;
            }
            changed = stop.changed(), if closing_since.is_none() => {
                if changed.is_err() || *stop.borrow() {
                    closing_since = Some(Instant::now());
                    connection.as_mut().graceful_shutdown();
                }
            }
            _ = activity.changed() => {}
            () = sleep_until_option(deadline) => {
                if closing_since.is_some() {
                    tracing::debug!("connection did not close within {CLOSE_GRACE:?} of its goodbye; dropped");
                    break;
                }
                closing_since = Some(Instant::now());
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The order of a connection's queue writes (`POST /v1/queues/{q}/messages` and `…/batch`): each
/// is handled once the one before it on the same connection has been answered. Over HTTP/1.1 that
/// is how hyper serves a connection anyway; over HTTP/2 a connection's streams are served at once,
/// and a route's window to this node sends its POSTs as streams in queue order, which the node
/// must store in that order (CONTRACT section 4, order).
#[derive(Default)]
struct WriteOrder {
    /// Resolves when the last write taken a turn has been answered.
    last: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
}

impl WriteOrder {
    /// A new write's turn: the answer of the write before (if any) to wait for, and what to drop
    /// once this one is answered.
    fn take_turn(&self) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (answered, next) = oneshot::channel();
        let before = self.last.lock().unwrap_or_else(|p| p.into_inner()).replace(next);
        (before, answered)
    }
}

fn is_queue_write<B>(request: &hyper::Request<B>) -> bool {
    let path = request.uri().path();
    request.method() == hyper::Method::POST
        && path.starts_with("/v1/queues/")
        && (path.ends_with("/messages") || path.ends_with("/batch"))
}

/// A connection whose first bytes were already read (by the single-write lane): reads return
/// `unread` first, then what the connection brings.
struct Prefixed<IO> {
    unread: Bytes,
    io: IO,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            if self.unread.is_empty() {
                // An empty slice still holds the lane's whole read buffer: let it go (a link
                // connection lives for days).
                self.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Requests of one connection whose answers are not sent yet, and since when there were none.
#[derive(Clone, Copy, Debug)]
struct Activity {
    in_progress: usize,
    idle_since: Instant,
}

/// Counts one request as in progress from its headers until it is dropped: with its answer's body
/// once that is sent, or with the request's future when the peer gives up first.
struct InProgress(Arc<watch::Sender<Activity>>);

impl InProgress {
    fn start(activity: Arc<watch::Sender<Activity>>) -> InProgress {
        activity.send_modify(|a| a.in_progress += 1);
        InProgress(activity)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_progress -= 1;
            if a.in_progress == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// An answer's body that keeps its request counted as in progress until it is dropped.
struct TrackedBody {
    inner: Body,
    _guard: InProgress,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body did not arrive within `limits.request_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within limits.request_timeout ({0:?})")]
pub struct BodyDeadlineElapsed(pub Duration);

/// A request body that fails with [`BodyDeadlineElapsed`] when it is still arriving
/// `request_timeout` after the request's headers.
struct DeadlineBody {
    inner: Incoming,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        DeadlineBody { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyDeadlineElapsed(self.timeout))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `error` (from reading a request body) is the body deadline.
pub(crate) fn is_body_deadline(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<BodyDeadlineElapsed>() {
            return true;
        }
        current = e.source();
    }
    false
}
