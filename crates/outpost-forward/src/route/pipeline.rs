//! A route's window (`[[route]] max_in_flight` > 1) on one connection to the endpoint: the window's
//! POSTs go out in queue order and their answers are taken in the same order, whatever the
//! protocol:
//!
//! - **HTTP/1.1 pipelining** (`http://` endpoints, and `https://` ones whose server does not pick
//!   `h2` by ALPN): the POSTs are written in queue order on one keep-alive connection and their
//!   answers read in order. An HTTP/1.1 server handles the requests of a connection one after the
//!   other, so the downstream sees them in queue order; the gain is that no request waits for the
//!   previous answer before it is sent.
//! - **HTTP/2 streams** (`https://` endpoints whose server picks `h2`, [`crate::route::http2`]):
//!   each POST is a stream, opened in queue order (up to the server's stream limit), and the
//!   server may handle them at once: a downstream that is slow per request but handles many
//!   together gets the window's concurrency. Answers are still taken in push order, the oldest
//!   first, even when later streams finished before it.
//!
//! The window slides ([`Window`]): the route pushes requests and takes answers one at a time, in
//! order, and pushes the next request as each answer comes, so the connection never drains while
//! there is more to send. Over HTTP/1.1, bytes pushed are written while the next answer is read
//! (the server may answer the first requests before it reads the last ones); requests pushed while
//! an answer is being parsed from what was already read go out together with the next write. Over
//! HTTP/2 a request pushed opens its stream at once (once the window is on its connection).
//!
//! The requests are those of the route's one-at-a-time path ([`crate::route::delivery`]: the same
//! headers and bodies) and failures are classified the same way ([`FailureKind`]):
//!
//! - no connection (refused, unresolved, TLS handshake failed) → `Connect`; none within the
//!   route's `timeout` (TCP, TLS and HTTP/2 handshakes included) → `Timeout`;
//! - no complete answer within `timeout` of the previous one (or of the start) → `Timeout`;
//! - the connection broken, or closed in the middle of an answer → `Reset`; an HTTP/2 stream reset
//!   by the server (other than `REFUSED_STREAM`) → `Reset`;
//! - a status other than 2xx → `Status`, with up to 512 bytes of its body in the detail. 1xx
//!   answers are skipped; a 3xx is an answer like any other (no redirect is followed).
//!
//! HTTP/1.1 answers are framed by `Content-Length`, chunked transfer coding, or the end of the
//! connection. A status other than 2xx does not end the window here: the caller stops pushing and
//! still takes the answers of what it pushed, so the downstream is done with them before the route
//! sends anything else; it acknowledges nothing past the first answer that is not
//! [`Answer::Delivered`].
//!
//! The connection is kept for the next window when every request pushed was answered and the
//! connection is healthy (HTTP/1.1: no answer said `Connection: close`; HTTP/2: no GOAWAY, no
//! error); an error or a timeout drops it, and the next window connects again. A request left
//! without an answer is [`Answer::Unanswered`] (not a failure, just not delivered yet) when an
//! earlier request of the window was answered on the connection and then: the server ended the
//! HTTP/1.1 connection cleanly (and everything pushed to the window after that is never sent, so
//! it cannot overtake them), or the HTTP/2 connection broke, or the server refused the stream
//! (`REFUSED_STREAM`) or went away past it (GOAWAY). Without an earlier answer it is a `Reset`
//! failure, so a server that takes nothing gets the policy's backoff rather than a busy loop. A
//! kept connection that the server closed while it was idle (no answer at all) is replaced and
//! what was sent on it sent once more.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use reqwest::header::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::route::delivery::{io_error_kind, status_error, DeliveryError, MAX_ERROR_BODY_BYTES, USER_AGENT};
use crate::route::http2::{Http2Connection, StreamFailure, Streams};
use crate::route::policy::FailureKind;

/// The most bytes of an answer's status line and headers.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers an answer may have.
const MAX_HEADERS: usize = 100;
/// The most bytes of a chunk-size line or a trailer line.
const MAX_LINE_BYTES: usize = 4 * 1024;
/// How much the read buffer grows by when it is full.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// The ALPN protocols a window's TLS client offers, preferred first.
const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What became of one request of a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Answered with a 2xx.
    Delivered,
    Failed(DeliveryError),
    /// Not answered: after a failure, the connection ended after an earlier answer, or (HTTP/2)
    /// the server refused the stream or went away past it after an earlier answer. Not a judgment
    /// on the message; it is simply sent again. Never the first answer of a window.
    Unanswered,
}

/// One request of a window: the headers and body of [`crate::route::delivery::request_of`].
pub type Request = (HeaderMap, Bytes);

/// A route's connection to one endpoint at a time, for its windows.
pub struct Pipeline {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
    /// The kept connection, taken out by a window and put back only when every request the window
    /// pushed was answered on it (so a window abandoned half-way, dropped, never leaves one behind).
    connection: Option<Connection>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// A connection to an endpoint, in the protocol its server chose.
enum Connection {
    Http1(Http1Connection),
    Http2(Http2Connection),
}

impl Connection {
    fn url(&self) -> &str {
        match self {
            Connection::Http1(connection) => &connection.url,
            Connection::Http2(connection) => &connection.url,
        }
    }
}

struct Http1Connection {
    /// The endpoint's url, as configured.
    url: String,
    /// Over a [`QuickAckTcp`], plain or TLS.
    stream: Box<dyn Io>,
    /// Bytes read and not yet parsed; empty between windows.
    buffer: BytesMut,
}

/// Where a url's requests go.
struct Target {
    https: bool,
    /// Without the brackets of an IPv6 literal.
    host: String,
    port: u16,
    /// The `Host` header: host, and the port when it is not the scheme's default.
    authority: String,
    /// Path and query.
    path: String,
    /// The url of an HTTP/2 request (scheme, `:authority` and path).
    uri: hyper::Uri,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a url: {e}"))?;
        let https = match parsed.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let host_str = parsed.host_str().ok_or("the url has no host")?;
        let port = parsed.port_or_known_default().ok_or("the url has no port")?;
        let authority = match parsed.port() {
            Some(port) => format!("{host_str}:{port}"),
            None => host_str.to_string(),
        };
        let host = host_str.trim_start_matches('[').trim_end_matches(']').to_string();
        let mut path = parsed.path().to_string();
        if let Some(query) = parsed.query() {
            path.push('?');
            path.push_str(query);
        }
        let uri = format!("{}://{authority}{path}", parsed.scheme())
            .parse()
            .map_err(|e| format!("not a request url: {e}"))?;
        Ok(Target { https, host, port, authority, path, uri })
    }
}

/// The requests of one window to one endpoint, in the order they were pushed, and where their
/// answers stand. Owned by the route's task; [`Pipeline::next_answer`] does the I/O.
pub struct Window {
    url: String,
    target: Result<Target, String>,
    /// The connection the window is on, taken from the pipeline or made for the window.
    open: Option<Open>,
    /// Requests pushed and not answered yet.
    outstanding: usize,
    /// Pushed requests not yet on the connection: serialized at the next answer (HTTP/1.1), sent
    /// as streams as soon as the window is on its connection (HTTP/2).
    unsent: VecDeque<Request>,
    /// HTTP/1.1: pushed requests as bytes on the wire, not written yet.
    pending: BytesMut,
    /// The connection ended (or never came) with requests outstanding: they and everything pushed
    /// after them are [`Answer::Unanswered`], so nothing overtakes a request that was not handled.
    ended: bool,
}

/// A window's connection.
enum Open {
    Http1(Http1Open),
    Http2(Streams),
}

/// A window's HTTP/1.1 connection, split so that it writes while it reads.
struct Http1Open {
    url: String,
    reader: ReadHalf<Box<dyn Io>>,
    writer: WriteHalf<Box<dyn Io>>,
    buffer: BytesMut,
    /// How many answers were read on this connection in this window.
    answered: usize,
    /// Kept from an earlier window and nothing answered on it yet: the requests put on it so far,
    /// to be sent again on a new connection if the server had closed it while it was idle.
    replay: Option<Vec<Request>>,
    /// Bytes were written and not flushed since (TLS holds records until flushed).
    unflushed: bool,
    /// A write failed: the connection is not kept, whatever its answers say.
    write_failed: bool,
}

impl Window {
    /// How many requests were pushed and are not answered yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Appends a request; its answer comes after those of every request pushed before it.
    pub fn push(&mut self, request: Request) {
        self.outstanding += 1;
        if self.ended || self.target.is_err() {
            return;
        }
        self.unsent.push_back(request);
        if let (Some(Open::Http2(streams)), Ok(target)) = (&mut self.open, &self.target) {
            streams.open(&mut self.unsent, &target.uri);
        }
    }

    /// The rest of the window will not be answered: nothing more is sent.
    fn end(&mut self) {
        self.ended = true;
        self.open = None;
        self.unsent.clear();
        self.pending.clear();
    }
}

impl Pipeline {
    /// `tls`: the route's TLS setting for https:// urls (`None`: no roots, as the route's client).
    /// Its client offers `h2` and `http/1.1` by ALPN; the server's choice sets the protocol.
    pub fn new(timeout: Duration, tls: Option<&outpost_tls::ClientTls>) -> Pipeline {
        let mut config = match tls {
            Some(tls) => tls.config(),
            None => rustls::ClientConfig::builder_with_provider(outpost_tls::provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        Pipeline { tls: tokio_rustls::TlsConnector::from(Arc::new(config)), timeout, connection: None }
    }

    /// An empty window to `url`; it takes the kept connection (or connects) at its first answer.
    pub fn window(&self, url: &str) -> Window {
        Window {
            url: url.to_string(),
            target: Target::parse(url),
            open: None,
            outstanding: 0,
            unsent: VecDeque::new(),
            pending: BytesMut::new(),
            ended: false,
        }
    }

    /// Sends `requests` in order on one connection to `url` and takes their answers in order: one
    /// [`Answer`] per request, in the same order (a window pushed all at once).
    pub async fn send(&mut self, url: &str, requests: &[Request]) -> Vec<Answer> {
        let mut window = self.window(url);
        for request in requests {
            window.push(request.clone());
        }
        let mut answers = Vec::with_capacity(requests.len());
        while window.outstanding() > 0 {
            answers.push(self.next_answer(&mut window).await);
        }
        answers
    }

    /// The answer to the window's oldest outstanding request, sending what was pushed meanwhile.
    /// Dropping the future abandons the window's connection (it is never kept half-read).
    pub async fn next_answer(&mut self, window: &mut Window) -> Answer {
        assert!(window.outstanding > 0, "an answer is awaited only for a pushed request");
        window.outstanding -= 1;
        if window.ended {
            return Answer::Unanswered;
        }
        let target = match &window.target {
            Ok(target) => target,
            Err(detail) => {
                let error = DeliveryError {
                    url: window.url.clone(),
                    kind: FailureKind::Other,
                    detail: detail.clone(),
                };
                window.end();
                return Answer::Failed(error);
            }
        };
        loop {
            if window.open.is_none() {
                let (connection, reused) = match self.connection.take() {
                    Some(connection) if connection.url() == window.url => (connection, true),
                    _ => match self.connect(&window.url, target).await {
                        Ok(connection) => (connection, false),
                        Err(error) => {
                            window.end();
                            return Answer::Failed(error);
                        }
                    },
                };
                window.open = Some(match connection {
                    Connection::Http1(connection) => Open::Http1(Http1Open::new(connection, reused)),
                    Connection::Http2(connection) => Open::Http2(Streams::new(connection, reused)),
                });
            }
            let outcome = match window.open.as_mut().expect("opened above") {
                Open::Http1(open) => {
                    for request in window.unsent.drain(..) {
                        serialize(&mut window.pending, target, &request);
                        if let Some(replay) = &mut open.replay {
                            replay.push(request);
                        }
                    }
                    Self::answer_http1(open, &mut window.pending, &window.url, self.timeout).await
                }
                Open::Http2(streams) => {
                    streams.open(&mut window.unsent, &target.uri);
                    Self::answer_http2(streams, &window.url, self.timeout).await
                }
            };
            match outcome {
                Outcome::Answer(answer) => {
                    if window.outstanding == 0 {
                        // Every request answered: the connection waits for the next window (or
                        // for more of this one), if it may.
                        self.connection = window.open.take().and_then(Open::keep);
                    }
                    return answer;
                }
                Outcome::AnswerAndClose(answer) => {
                    if window.outstanding > 0 {
                        window.end();
                    } else {
                        window.open = None;
                    }
                    return answer;
                }
                Outcome::End(answer) => {
                    window.end();
                    return answer;
                }
                Outcome::Replay => {
                    // Closed while idle between windows: once more, on a new connection.
                    tracing::debug!(url = %window.url, "the kept connection was closed by the server; connecting again");
                    let replay = match window.open.take() {
                        Some(Open::Http1(open)) => open.replay,
                        Some(Open::Http2(streams)) => streams.into_replay(),
                        None => None,
                    };
                    let mut again: VecDeque<Request> = replay.unwrap_or_default().into();
                    again.append(&mut window.unsent);
                    window.unsent = again;
                    window.pending.clear();
                    continue;
                }
            }
        }
    }

    /// The next HTTP/1.1 answer on `open`, writing `pending` meanwhile.
    async fn answer_http1(
        open: &mut Http1Open,
        pending: &mut BytesMut,
        url: &str,
        timeout: Duration,
    ) -> Outcome {
        match open.answer(pending, timeout).await {
            Ok(read) => {
                open.answered += 1;
                open.replay = None;
                let answer = if (200..300).contains(&read.status) {
                    Answer::Delivered
                } else {
                    let body = String::from_utf8_lossy(&read.excerpt).trim().to_string();
                    Answer::Failed(status_error(url, read.status, &body))
                };
                if read.close {
                    Outcome::AnswerAndClose(answer)
                } else {
                    Outcome::Answer(answer)
                }
            }
            Err(error) => {
                let (kind, detail) = error.failure(timeout);
                if error.at_boundary && !matches!(error.cause, Cause::Timeout) {
                    if open.replay.is_some() {
                        return Outcome::Replay;
                    }
                    if open.answered > 0 {
                        // Closed after an answer: what was not answered was not handled.
                        tracing::debug!(%url, "the connection ended after an answer: {detail}");
                        return Outcome::End(Answer::Unanswered);
                    }
                }
                Outcome::End(Answer::Failed(DeliveryError { url: url.to_string(), kind, detail }))
            }
        }
    }

    /// The answer of the oldest stream of `streams`.
    async fn answer_http2(streams: &mut Streams, url: &str, timeout: Duration) -> Outcome {
        let failed = |kind, detail| Answer::Failed(DeliveryError { url: url.to_string(), kind, detail });
        let failure = match streams.answer(Instant::now() + timeout).await {
            Ok(answered) if (200..300).contains(&answered.status) => {
                return Outcome::Answer(Answer::Delivered)
            }
            Ok(answered) => {
                let body = String::from_utf8_lossy(&answered.excerpt).trim().to_string();
                return Outcome::Answer(Answer::Failed(status_error(url, answered.status, &body)));
            }
            Err(failure) => failure,
        };
        match failure {
            StreamFailure::Timeout => {
                Outcome::End(failed(FailureKind::Timeout, format!("no complete answer within {timeout:?}")))
            }
            StreamFailure::Stream(kind, detail) => {
                streams.answered_with_failure();
                Outcome::Answer(failed(kind, detail))
            }
            StreamFailure::NotProcessed(_) | StreamFailure::Broken(..) if streams.replay.is_some() => {
                Outcome::Replay
            }
            StreamFailure::NotProcessed(detail) if streams.answered > 0 => {
                // Sent again later; the streams after it go on (the caller takes their answers).
                tracing::debug!(%url, "an HTTP/2 stream was not processed: {detail}");
                Outcome::Answer(Answer::Unanswered)
            }
            StreamFailure::Broken(_, detail) if streams.answered > 0 => {
                tracing::debug!(%url, "the HTTP/2 connection ended after an answer: {detail}");
                Outcome::End(Answer::Unanswered)
            }
            StreamFailure::NotProcessed(detail) => Outcome::Answer(failed(FailureKind::Reset, detail)),
            StreamFailure::Broken(kind, detail) => Outcome::End(failed(kind, detail)),
        }
    }

    async fn connect(&self, url: &str, target: &Target) -> Result<Connection, DeliveryError> {
        let connecting = async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            // As reqwest's: a request is not held back waiting for the previous one's ACK.
            tcp.set_nodelay(true).map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
            let tcp = QuickAckTcp(tcp);
            let http1 = |stream: Box<dyn Io>| {
                Connection::Http1(Http1Connection {
                    url: url.to_string(),
                    stream,
                    buffer: BytesMut::with_capacity(READ_BUFFER_BYTES),
                })
            };
            if !target.https {
                return Ok(http1(Box::new(tcp)));
            }
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{:?} is not a TLS server name: {e}", target.host))?;
            let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                return Ok(Connection::Http2(Http2Connection::handshake(url, tls).await?));
            }
            Ok(http1(Box::new(tls)))
        };
        let error = |kind, detail| DeliveryError { url: url.to_string(), kind, detail };
        match tokio::time::timeout(self.timeout, connecting).await {
            Err(_) => Err(error(FailureKind::Timeout, format!("no connection within {:?}", self.timeout))),
            Ok(Err(detail)) => Err(error(FailureKind::Connect, detail)),
            Ok(Ok(connection)) => Ok(connection),
        }
    }
}

/// What an answer on a window's connection means for the window.
enum Outcome {
    /// The answer; the connection goes on.
    Answer(Answer),
    /// The answer, and the server ends the connection after it.
    AnswerAndClose(Answer),
    /// The answer, and the connection is done: the rest of the window is not answered.
    End(Answer),
    /// The kept connection was closed while idle: connect again and send what was sent on it.
    Replay,
}

impl Open {
    /// The connection to keep for later, if it may be.
    fn keep(self) -> Option<Connection> {
        match self {
            Open::Http1(open) => open.keep().map(Connection::Http1),
            Open::Http2(streams) => streams.keep().map(Connection::Http2),
        }
    }
}

impl Http1Open {
    fn new(connection: Http1Connection, reused: bool) -> Http1Open {
        let Http1Connection { url, stream, buffer } = connection;
        let (reader, writer) = tokio::io::split(stream);
        Http1Open {
            url,
            reader,
            writer,
            buffer,
            answered: 0,
            replay: reused.then(Vec::new),
            unflushed: false,
            write_failed: false,
        }
    }

    /// The connection to keep for later, if it may be: every write went through and nothing was
    /// read beyond the last answer.
    fn keep(self) -> Option<Http1Connection> {
        let Http1Open { url, reader, writer, buffer, write_failed, .. } = self;
        (!write_failed && buffer.is_empty()).then(|| Http1Connection {
            url,
            stream: reader.unsplit(writer),
            buffer,
        })
    }

    /// Reads the next answer while writing `pending` (and flushing it), reading first: an answer
    /// already in the buffer returns at once and leaves what was pushed meanwhile to go out with
    /// the next write.
    async fn answer(&mut self, pending: &mut BytesMut, timeout: Duration) -> Result<Read, ReadError> {
        let Http1Open { reader, writer, buffer, unflushed, write_failed, .. } = self;
        let mut answers = AnswerReader { io: reader, buffer, deadline: Instant::now() + timeout };
        let read = answers.read_answer();
        tokio::pin!(read);
        loop {
            let writing = !*write_failed && (!pending.is_empty() || *unflushed);
            tokio::select! {
                biased;
                read = &mut read => return read,
                written = write_some(writer, pending, unflushed), if writing => {
                    if let Err(e) = written {
                        // The answers tell what the server made of it.
                        tracing::debug!("writing a window's requests failed: {e}");
                        *write_failed = true;
                    }
                }
            }
        }
    }
}

/// Writes some of `pending`, or flushes once it is all written.
/// Cancel-safe: nothing is taken from `pending` unless the write took it.
async fn write_some(
    writer: &mut WriteHalf<Box<dyn Io>>,
    pending: &mut BytesMut,
    unflushed: &mut bool,
) -> io::Result<()> {
    if pending.is_empty() {
        writer.flush().await?;
        *unflushed = false;
        return Ok(());
    }
    let written = writer.write(pending).await?;
    if written == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    pending.advance(written);
    *unflushed = true;
    Ok(())
}

/// A window's TCP connection, acknowledging every read at once ([`quick_ack`]), under TLS too.
pub(super) struct QuickAckTcp(TcpStream);

impl AsyncRead for QuickAckTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            quick_ack(self.0.as_raw_fd());
        }
        read
    }
}

impl AsyncWrite for QuickAckTcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Asks the kernel to acknowledge what arrived at once rather than after the delayed-ACK timer.
/// A window's requests are sent ahead of its answers, so the route often has nothing to send
/// that would carry the ACK; a server that leaves Nagle's algorithm on (hyper's and axum's default)
/// holds each answer after the first until the previous one is acknowledged, which cost a window
/// ~40 ms per answer (180 msgs/s with 8 in flight over HTTP/1.1; over HTTP/2, 5,000 messages with 8
/// in flight took 12 s instead of 0.7 s). Linux clears the flag again by itself, hence once per
/// read; elsewhere, or if it fails, nothing is lost but time.
fn quick_ack(socket: RawFd) {
    #[cfg(target_os = "linux")]
    {
        let on: libc::c_int = 1;
        // SAFETY: `socket` is the open TCP socket under the connection being read (the caller
        // holds the stream); setsockopt reads only the `c_int` it is given.
        unsafe {
            libc::setsockopt(
                socket,
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Appends a request as bytes on the wire.
fn serialize(out: &mut BytesMut, target: &Target, (headers, body): &Request) {
    out.reserve(256 + headers.len() * 64 + body.len());
    out.put_slice(b"POST ");
    out.put_slice(target.path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\nhost: ");
    out.put_slice(target.authority.as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"user-agent: ");
    out.put_slice(USER_AGENT.as_bytes());
    out.put_slice(b"\r\naccept: */*\r\ncontent-length: ");
    out.put_slice(body.len().to_string().as_bytes());
    out.put_slice(b"\r\n\r\n");
    out.put_slice(body);
}

/// One answer as read.
struct Read {
    status: u16,
    /// Up to [`MAX_ERROR_BODY_BYTES`] of the body of an answer other than 2xx.
    excerpt: Vec<u8>,
    /// The connection ends after this answer.
    close: bool,
}

/// How an answer's body ends.
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

enum Cause {
    Eof,
    Io(io::Error),
    Timeout,
    Invalid(String),
}

struct ReadError {
    cause: Cause,
    /// No byte of this answer had been read.
    at_boundary: bool,
}

impl ReadError {
    fn failure(&self, timeout: Duration) -> (FailureKind, String) {
        match &self.cause {
            Cause::Eof if self.at_boundary => {
                (FailureKind::Reset, "the connection was closed before an answer".to_string())
            }
            Cause::Eof => {
                (FailureKind::Reset, "the connection was closed in the middle of an answer".to_string())
            }
            Cause::Io(e) => {
                (io_error_kind(e.kind()).unwrap_or(FailureKind::Other), format!("reading the answer: {e}"))
            }
            Cause::Timeout => (FailureKind::Timeout, format!("no complete answer within {timeout:?}")),
            Cause::Invalid(detail) => (FailureKind::Other, format!("invalid answer: {detail}")),
        }
    }
}

struct AnswerReader<'a, R> {
    io: &'a mut R,
    buffer: &'a mut BytesMut,
    deadline: Instant,
}

impl<R: AsyncRead + Unpin> AnswerReader<'_, R> {
    /// Reads more bytes into the buffer.
    async fn fill(&mut self) -> Result<(), Cause> {
        if self.buffer.capacity() - self.buffer.len() < READ_BUFFER_BYTES / 4 {
            self.buffer.reserve(READ_BUFFER_BYTES);
        }
        match tokio::time::timeout_at(self.deadline, self.io.read_buf(self.buffer)).await {
            Err(_) => Err(Cause::Timeout),
            Ok(Ok(0)) => Err(Cause::Eof),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Cause::Io(e)),
        }
    }

    async fn read_answer(&mut self) -> Result<Read, ReadError> {
        let mut started = false;
        loop {
            let head = self.read_head(started).await?;
            started = true;
            let error = |cause| ReadError { cause, at_boundary: false };
            // 1xx: an interim answer, the final one follows (101 would switch protocols: not an
            // answer to a POST).
            if (100..200).contains(&head.status) {
                if head.status == 101 {
                    return Err(error(Cause::Invalid("101 Switching Protocols".into())));
                }
                continue;
            }
            let keep = if (200..300).contains(&head.status) { 0 } else { MAX_ERROR_BODY_BYTES };
            let mut excerpt = Vec::new();
            let ended_by_close = match head.framing {
                Framing::Empty => false,
                Framing::Length(length) => {
                    self.read_body(length, &mut excerpt, keep).await.map_err(error)?;
                    false
                }
                Framing::Chunked => {
                    self.read_chunked(&mut excerpt, keep).await.map_err(error)?;
                    false
                }
                Framing::UntilClose => {
                    self.read_until_close(&mut excerpt, keep).await.map_err(error)?;
                    true
                }
            };
            return Ok(Read { status: head.status, excerpt, close: head.close || ended_by_close });
        }
    }

    async fn read_head(&mut self, started: bool) -> Result<Head, ReadError> {
        loop {
            if !self.buffer.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut response = httparse::Response::new(&mut headers);
                let invalid =
                    |detail: String| ReadError { cause: Cause::Invalid(detail), at_boundary: false };
                match response.parse(self.buffer) {
                    Ok(httparse::Status::Complete(length)) => {
                        let head = Head::of(&response).map_err(invalid)?;
                        self.buffer.advance(length);
                        return Ok(head);
                    }
                    Ok(httparse::Status::Partial) if self.buffer.len() > MAX_HEAD_BYTES => {
                        return Err(invalid(format!("a status line and headers over {MAX_HEAD_BYTES} bytes")))
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(invalid(e.to_string())),
                }
            }
            let at_boundary = !started && self.buffer.is_empty();
            self.fill().await.map_err(|cause| ReadError { cause, at_boundary })?;
        }
    }

    /// Consumes `length` bytes of body, keeping up to `keep` of them in `excerpt`.
    async fn read_body(&mut self, mut length: u64, excerpt: &mut Vec<u8>, keep: usize) -> Result<(), Cause> {
        loop {
            let take = self.buffer.len().min(usize::try_from(length).unwrap_or(usize::MAX));
            let room = keep.saturating_sub(excerpt.len()).min(take);
            excerpt.extend_from_slice(&self.buffer[..room]);
            self.buffer.advance(take);
            length -= take as u64;
            if length == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn read_chunked(&mut self, excerpt: &mut Vec<u8>, keep: usize) -> Result<(), Cause> {
        loop {
            let size = loop {
                match httparse::parse_chunk_size(self.buffer) {
                    Ok(httparse::Status::Complete((consumed, size))) => {
                        self.buffer.advance(consumed);
                        break size;
                    }
                    Ok(httparse::Status::Partial) if self.buffer.len() > MAX_LINE_BYTES => {
                        return Err(Cause::Invalid("a chunk-size line too long".into()))
                    }
                    Ok(httparse::Status::Partial) => self.fill().await?,
                    Err(_) => return Err(Cause::Invalid("an invalid chunk size".into())),
                }
            };
            if size == 0 {
                return self.skip_trailers().await;
            }
            self.read_body(size, excerpt, keep).await?;
            while self.buffer.len() < 2 {
                self.fill().await?;
            }
            if &self.buffer[..2] != b"\r\n" {
                return Err(Cause::Invalid("a chunk not ended by CRLF".into()));
            }
            self.buffer.advance(2);
        }
    }

    /// The trailer section after the last chunk: lines up to an empty one.
    async fn skip_trailers(&mut self) -> Result<(), Cause> {
        loop {
            match self.buffer.windows(2).position(|w| w == b"\r\n") {
                Some(end) => {
                    self.buffer.advance(end + 2);
                    if end == 0 {
                        return Ok(());
                    }
                }
                None if self.buffer.len() > MAX_LINE_BYTES => {
                    return Err(Cause::Invalid("a trailer line too long".into()))
                }
                None => self.fill().await?,
            }
        }
    }

    async fn read_until_close(&mut self, excerpt: &mut Vec<u8>, keep: usize) -> Result<(), Cause> {
        loop {
            let room = keep.saturating_sub(excerpt.len()).min(self.buffer.len());
            excerpt.extend_from_slice(&self.buffer[..room]);
            self.buffer.clear();
            match self.fill().await {
                Ok(()) => {}
                Err(Cause::Eof) => return Ok(()),
                Err(cause) => return Err(cause),
            }
        }
    }
}

/// What an answer's head says about its status, body and connection.
struct Head {
    status: u16,
    framing: Framing,
    close: bool,
}

impl Head {
    fn of(response: &httparse::Response<'_, '_>) -> Result<Head, String> {
        let status = response.code.ok_or("no status")?;
        let http_10 = response.version == Some(0);
        let mut close = http_10;
        let mut chunked = None;
        let mut length: Option<u64> = None;
        for header in response.headers.iter() {
            let value = std::str::from_utf8(header.value).unwrap_or("");
            let tokens = || value.split(',').map(|t| t.trim().to_ascii_lowercase());
            if header.name.eq_ignore_ascii_case("connection") {
                if tokens().any(|t| t == "close") {
                    close = true;
                } else if http_10 && tokens().any(|t| t == "keep-alive") {
                    close = false;
                }
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = Some(tokens().next_back().is_some_and(|t| t == "chunked"));
            } else if header.name.eq_ignore_ascii_case("content-length") {
                let parsed: u64 = value.trim().parse().map_err(|_| format!("Content-Length {value:?}"))?;
                if length.is_some_and(|l| l != parsed) {
                    return Err("two different Content-Length values".into());
                }
                length = Some(parsed);
            }
        }
        let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked,
                (Some(false), _) | (None, None) => Framing::UntilClose,
                (None, Some(0)) => Framing::Empty,
                (None, Some(length)) => Framing::Length(length),
            }
        };
        Ok(Head { status, framing, close })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use axum::extract::{ConnectInfo, State};
    use axum::http::{HeaderMap as AxumHeaders, StatusCode};
    use axum::response::{IntoResponse, Response};
    use reqwest::header::{HeaderName, HeaderValue};
    use tokio::net::TcpListener;

    use crate::route::delivery::{request_of, Outgoing, Unit};

    const TIMEOUT: Duration = Duration::from_millis(500);

    /// What a test server records of each request, in the order it handled them.
    #[derive(Default)]
    struct Log {
        requests: Mutex<Vec<(u64, SocketAddr)>>,
        /// One request at a time, server-wide: the order handled is the order recorded.
        serial: tokio::sync::Mutex<()>,
    }

    impl Log {
        fn seqs(&self) -> Vec<u64> {
            self.requests.lock().unwrap().iter().map(|(seq, _)| *seq).collect()
        }

        fn peers(&self) -> std::collections::BTreeSet<SocketAddr> {
            self.requests.lock().unwrap().iter().map(|(_, peer)| *peer).collect()
        }
    }

    /// An axum server on 127.0.0.1:0 answering by `Outpost-Seq`: seq 1000 + s answers status s
    /// with a chunked body "status s"; 2000 sleeps past the timeout; 3000 answers 200 with
    /// `Connection: close`; anything else 200 with a chunked body.
    async fn server() -> (String, Arc<Log>) {
        async fn handle(
            State(log): State<Arc<Log>>,
            ConnectInfo(peer): ConnectInfo<SocketAddr>,
            headers: AxumHeaders,
            body: axum::body::Bytes,
        ) -> Response {
            let one_at_a_time = log.serial.lock().await;
            let seq: u64 = headers["outpost-seq"].to_str().unwrap().parse().unwrap();
            assert_eq!(headers["content-length"].to_str().unwrap(), body.len().to_string());
            log.requests.lock().unwrap().push((seq, peer));
            let chunked = |text: String| {
                let chunks = vec![Ok::<_, io::Error>(text.into_bytes()), Ok(b" and more".to_vec())];
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            };
            match seq {
                1000..=1999 => {
                    let status = StatusCode::from_u16((seq - 1000) as u16).unwrap();
                    (status, chunked(format!("status {}", status.as_u16()))).into_response()
                }
                2000 => {
                    // Hangs, letting other connections be served meanwhile.
                    drop(one_at_a_time);
                    tokio::time::sleep(TIMEOUT * 4).await;
                    StatusCode::OK.into_response()
                }
                3000 => ([("connection", "close")], "bye").into_response(),
                _ => chunked(format!("ok {seq}")).into_response(),
            }
        }
        let log = Arc::new(Log::default());
        let app = axum::Router::new().route("/in", axum::routing::post(handle)).with_state(log.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in?x=1", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap();
        });
        (url, log)
    }

    /// The request of message `seq` of queue `orders` (body `{"n":seq}`).
    pub(in crate::route) fn request(seq: u64) -> Request {
        request_of(&Unit::Single(Outgoing {
            message_id: format!("m-{seq}"),
            queue: "orders".into(),
            origin: "edge-1".into(),
            origin_seq: seq,
            content_type: "application/json".into(),
            payload: Bytes::from(format!("{{\"n\":{seq}}}")),
        }))
    }

    pub(in crate::route) fn requests(seqs: impl IntoIterator<Item = u64>) -> Vec<Request> {
        seqs.into_iter().map(request).collect()
    }

    fn kinds(answers: &[Answer]) -> Vec<Option<FailureKind>> {
        answers
            .iter()
            .map(|a| match a {
                Answer::Delivered => None,
                Answer::Failed(e) => Some(e.kind),
                Answer::Unanswered => Some(FailureKind::Other),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_window_is_handled_in_order_on_one_kept_connection() {
        let (url, log) = server().await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        for window in 0..3u64 {
            let seqs = window * 32 + 1..=window * 32 + 32;
            let answers = pipeline.send(&url, &requests(seqs)).await;
            assert_eq!(answers, vec![Answer::Delivered; 32]);
        }
        assert_eq!(log.seqs(), (1..=96).collect::<Vec<_>>());
        assert_eq!(log.peers().len(), 1, "one connection for every window");
    }

    #[tokio::test]
    async fn a_sliding_window_pushes_as_answers_come_and_stays_in_order_on_one_connection() {
        let (url, log) = server().await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let mut window = pipeline.window(&url);
        let mut next_seq = 1u64;
        while next_seq <= 8 {
            window.push(request(next_seq));
            next_seq += 1;
        }
        let mut answered = 0;
        while window.outstanding() > 0 {
            assert_eq!(pipeline.next_answer(&mut window).await, Answer::Delivered);
            answered += 1;
            // One more for each answer, up to 100.
            if next_seq <= 100 {
                window.push(request(next_seq));
                next_seq += 1;
            }
            assert_eq!(window.outstanding(), (100 - answered).min(8));
        }
        assert_eq!(answered, 100);
        assert_eq!(log.seqs(), (1..=100).collect::<Vec<_>>());
        assert_eq!(log.peers().len(), 1, "one connection");
        assert!(pipeline.connection.is_some(), "kept once every request was answered");
    }

    #[tokio::test]
    async fn after_a_connection_closed_mid_window_nothing_pushed_later_is_sent() {
        let (url, log) = server().await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let mut window = pipeline.window(&url);
        for seq in [1, 3000, 3, 4] {
            window.push(request(seq));
        }
        assert_eq!(pipeline.next_answer(&mut window).await, Answer::Delivered);
        assert_eq!(pipeline.next_answer(&mut window).await, Answer::Delivered);
        // Pushed after the close: it would overtake 3 and 4, which the server did not handle.
        window.push(request(5));
        for _ in 0..3 {
            assert_eq!(pipeline.next_answer(&mut window).await, Answer::Unanswered);
        }
        assert_eq!(log.seqs(), [1, 3000]);
    }

    #[tokio::test]
    async fn a_failure_in_the_middle_is_reported_and_the_answers_after_it_are_read() {
        let (url, log) = server().await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let seqs: Vec<u64> = (1..=5).chain([1503]).chain(7..=10).collect();
        let answers = pipeline.send(&url, &requests(seqs.clone())).await;
        let Answer::Failed(error) = &answers[5] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Status(503));
        assert_eq!(error.url, url);
        assert_eq!(error.detail, "503 Service Unavailable: status 503 and more", "the chunked body is kept");
        assert!(answers.iter().enumerate().all(|(i, a)| i == 5 || *a == Answer::Delivered), "{answers:?}");
        // The connection is kept: the next window goes on it.
        assert_eq!(pipeline.send(&url, &requests([11, 12])).await, vec![Answer::Delivered; 2]);
        assert_eq!(log.seqs(), seqs.into_iter().chain([11, 12]).collect::<Vec<_>>());
        assert_eq!(log.peers().len(), 1);
        // A redirect is an answer, not followed.
        let answers = pipeline.send(&url, &requests([1302])).await;
        assert_eq!(kinds(&answers), [Some(FailureKind::Status(302))]);
    }

    #[tokio::test]
    async fn a_connection_closed_after_an_answer_leaves_the_rest_unanswered_and_the_next_window_reconnects() {
        let (url, log) = server().await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let answers = pipeline.send(&url, &requests([1, 2, 3000, 4, 5])).await;
        assert_eq!(
            answers,
            [Answer::Delivered, Answer::Delivered, Answer::Delivered, Answer::Unanswered, Answer::Unanswered]
        );
        assert_eq!(pipeline.send(&url, &requests([4, 5])).await, vec![Answer::Delivered; 2]);
        assert_eq!(log.seqs(), [1, 2, 3000, 4, 5]);
        assert_eq!(log.peers().len(), 2);
    }

    #[tokio::test]
    async fn no_answer_within_the_timeout_fails_that_request_and_drops_the_connection() {
        let (url, log) = server().await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let answers = pipeline.send(&url, &requests([1, 2000, 3])).await;
        assert_eq!(answers[0], Answer::Delivered);
        let Answer::Failed(error) = &answers[1] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Timeout, "{error}");
        assert_eq!(answers[2], Answer::Unanswered);
        assert_eq!(pipeline.send(&url, &requests([4])).await, [Answer::Delivered]);
        assert_eq!(log.peers().len(), 2, "a new connection after the timeout");
    }

    #[tokio::test]
    async fn connect_failures_fail_the_first_request() {
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/in", listener.local_addr().unwrap())
        };
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let answers = pipeline.send(&refused, &requests([1, 2])).await;
        assert_eq!(kinds(&answers)[0], Some(FailureKind::Connect));
        assert_eq!(answers[1], Answer::Unanswered);
        // https without roots: the handshake fails, as with the route's client.
        let (url, _log) = server().await;
        let answers = pipeline.send(&url.replace("http://", "https://"), &requests([1])).await;
        assert_eq!(kinds(&answers), [Some(FailureKind::Connect)]);
    }

    /// A server on 127.0.0.1:0 that answers each connection with the next of `scripts` (raw
    /// bytes) once the first bytes of a request came, then closes it.
    async fn raw_server(scripts: Vec<Vec<u8>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/in", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for script in scripts {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket.write_all(&script).await;
                    let _ = socket.shutdown().await;
                    // Read on until the client is done, so the close is a FIN, not a reset.
                    while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn answers_framed_every_way_are_told_apart() {
        let script = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc\
            HTTP/1.1 204 No Content\r\n\r\n\
            HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n\
            4;ext=1\r\noops\r\n0\r\ntrailer: x\r\n\r\n\
            HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
            HTTP/1.0 422 Unprocessable\r\n\r\nuntil the end"
            .to_vec();
        let url = raw_server(vec![script]).await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        let answers = pipeline.send(&url, &requests(1..=6)).await;
        assert_eq!(
            kinds(&answers),
            [
                None,
                None,
                Some(FailureKind::Status(500)),
                None,
                Some(FailureKind::Status(422)),
                Some(FailureKind::Other)
            ],
            "{answers:?}"
        );
        let Answer::Failed(error) = &answers[2] else { unreachable!() };
        assert_eq!(error.detail, "500 Internal Server Error: oops");
        let Answer::Failed(error) = &answers[4] else { unreachable!() };
        assert_eq!(error.detail, "422 Unprocessable Entity: until the end");
        assert_eq!(answers[5], Answer::Unanswered, "the connection ended with the body");
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_a_reset_and_an_error_body_is_cut_at_512_bytes() {
        let long = "x".repeat(2000);
        let cut = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec();
        let garbage = b"HTTP/1.1 OK\r\n\r\n".to_vec();
        let big = format!("HTTP/1.1 500 X\r\ncontent-length: {}\r\n\r\n{long}", long.len()).into_bytes();
        let url = raw_server(vec![cut, garbage, big]).await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        assert_eq!(kinds(&pipeline.send(&url, &requests([1, 2])).await)[0], Some(FailureKind::Reset));
        assert_eq!(kinds(&pipeline.send(&url, &requests([1])).await)[0], Some(FailureKind::Other));
        let answers = pipeline.send(&url, &requests([1])).await;
        let Answer::Failed(error) = &answers[0] else { panic!("{answers:?}") };
        assert_eq!(error.detail, format!("500 Internal Server Error: {}", &long[..512]));
    }

    #[tokio::test]
    async fn a_kept_connection_closed_while_idle_is_replaced_without_a_failure() {
        // The first connection answers one request and then closes (without saying so); the
        // second answers the next window.
        let one = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec();
        let url = raw_server(vec![one.clone(), one.repeat(2)]).await;
        let mut pipeline = Pipeline::new(TIMEOUT, None);
        assert_eq!(pipeline.send(&url, &requests([1])).await, [Answer::Delivered]);
        // The raw server closes its side once the client is done writing; wait until it did.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let Some(Connection::Http1(connection)) = pipeline.connection.as_mut() else { panic!("kept") };
            let mut probe = [0u8; 1];
            let closed =
                tokio::time::timeout(Duration::from_millis(10), connection.stream.read(&mut probe)).await;
            if let Ok(read) = closed {
                assert_eq!(read.unwrap(), 0, "nothing but the close");
                break;
            }
            assert!(Instant::now() < deadline, "the server did not close the idle connection");
        }
        assert_eq!(pipeline.send(&url, &requests([2, 3])).await, vec![Answer::Delivered; 2]);
    }

    #[test]
    fn the_request_line_and_host_follow_the_url() {
        let target = Target::parse("http://[::1]:8080/a/b?c=d").unwrap();
        assert_eq!(
            (target.host.as_str(), target.port, target.authority.as_str()),
            ("::1", 8080, "[::1]:8080")
        );
        let mut headers = HeaderMap::new();
        headers.insert(HeaderName::from_static("outpost-seq"), HeaderValue::from_static("7"));
        let mut bytes = BytesMut::new();
        serialize(&mut bytes, &target, &(headers, Bytes::from_static(b"{}")));
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        assert!(
            text.starts_with("POST /a/b?c=d HTTP/1.1\r\nhost: [::1]:8080\r\noutpost-seq: 7\r\n"),
            "{text}"
        );
        assert!(text.ends_with("content-length: 2\r\n\r\n{}"), "{text}");
        let target = Target::parse("https://example.com/in").unwrap();
        assert_eq!((target.port, target.authority.as_str(), target.https), (443, "example.com", true));
        assert!(Target::parse("ftp://example.com/").is_err());
    }
}
