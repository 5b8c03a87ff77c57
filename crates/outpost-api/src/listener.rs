//! The HTTP listener: accepts connections up to `limits.max_connections` (more are closed at
//! accept while the others are served on), sets TCP keepalive, gives every request
//! `limits.request_timeout` for its headers and again for its body (a body that stops gets 408),
//! and stops gracefully: no new connections, in-flight requests finish. With TLS (`[tls]`) each
//! connection's handshake must also finish within `request_timeout`, takes the certificates in use
//! at that moment (so reloaded files reach new connections), and a verified client certificate
//! reaches the handlers as a [`PeerIdentity`] request extension. Each HTTP/1.1 connection starts in
//! the single-write lane ([`crate::single_write`]), which serves `POST /v1/queues/{q}/messages`
//! itself and hands the connection to hyper and the router at the first other request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use outpost_tls::{PeerIdentity, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tower_service::Service;

use crate::single_write::{self, LaneEnd};
use crate::ApiState;

/// Idle time before TCP keepalive probes on accepted connections (edge links are long-lived).
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// Pause after a failed accept (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

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

/// Serves one connection until it ends, or gracefully once `stop` turns true: in the single-write
/// lane while it has `lane` and the requests are single writes, then with hyper and `app`.
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
            LaneEnd::Closed => return,
            LaneEnd::Handoff(unread) => unread,
        },
        None => Bytes::new(),
    };
    let io = TokioIo::new(Prefixed { unread, io });
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut app = app.clone();
        let mut request = request.map(|body| Body::new(DeadlineBody::new(body, request_timeout)));
        if let Some(identity) = &identity {
            request.extensions_mut().insert(identity.clone());
        }
        async move { Ok::<_, Infallible>(app.call(request).await.unwrap_or_else(|never| match never {})) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(request_timeout);
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut stopping = *stop.borrow();
    if stopping {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                break;
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
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
