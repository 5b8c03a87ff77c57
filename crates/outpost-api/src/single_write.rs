//! The single-write lane: `POST /v1/queues/{queue}/messages`, the request every point-of-sale
//! terminal sends for every sale, served straight off an HTTP/1.1 connection without hyper's
//! request machinery or axum's router.
//!
//! Each connection starts in this lane. A request is parsed in place (`httparse`) from the
//! connection's read buffer; when it is a plain single write (HTTP/1.1, `Content-Length` framing
//! within `limits.max_message_bytes`, no `Expect`, `Transfer-Encoding` or upgrade, a queue name
//! without escapes), the lane checks and stores it with the same functions as the router's handler
//! ([`crate::messages`]) and writes the answer with one `write`. Anything else (another endpoint,
//! an oversized or chunked body, HTTP/1.0, an HTTP/2 preface, a head the parser refuses) ends the
//! lane: the connection, with every byte read and not yet served, goes to hyper and the router for
//! the rest of its life, so every other request is served exactly as before.
//!
//! What it saves per write, against hyper + axum (docs/benchmarks.md): the request's `HeaderMap`
//! of every header, the router's match and path extraction, two boxed timers (hyper's head
//! timeout and the body deadline, each registered and removed per request: here one timer per
//! connection is re-armed only when it fires), the body's copy, and the response's `HeaderMap`.
//!
//! The same limits hold as on hyper's path: a head must arrive within `limits.request_timeout`
//! of the connection becoming idle (an idle keep-alive connection is closed then), its body within
//! `request_timeout` of the head (else 408 and the connection is closed), an answer must be taken
//! within `request_timeout` (a client that pipelines and never reads is closed), and once the node
//! stops a connection between requests or in the middle of a head is closed, one in a body or a
//! commit after its answer. A request whose first line shows it is not a single write goes to hyper
//! at once, so hyper's own head timeout starts about at its first byte; only a single write's head
//! trickled past 16 KiB can have its deadline twice (the lane's, then hyper's). The body's buffer
//! grows as the body arrives, not to its declared length at once, so a head alone cannot make the
//! node allocate `max_message_bytes`. A connection the lane closes is shut down (a TLS
//! `close_notify`) within a second.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::auth::{authorize, Access};
use crate::error::ApiError;
use crate::listener::BodyDeadlineElapsed;
use crate::messages::{check_writes_allowed, single_head, single_incoming, store_single, valid_queue_name};
use crate::ApiState;

/// A request head larger than this is left to hyper (which allows more, and answers 431 past
/// its own bound); a point-of-sale write's head is a few hundred bytes.
const MAX_LANE_HEAD_BYTES: usize = 16 << 10;
/// The most header lines the lane parses; more go to hyper.
const MAX_LANE_HEADERS: usize = 48;
/// What the read buffer grows by before each read.
const READ_CHUNK: usize = 8 << 10;
/// The longest error answer body the lane writes (they are a few hundred bytes).
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// The most the body's buffer grows by before each read: it follows what arrives, so a head that
/// declares `max_message_bytes` and sends nothing costs no more than this.
const MAX_BODY_RESERVE: usize = 256 << 10;

/// How the lane left a connection.
pub(crate) enum LaneEnd {
    /// The connection is done: closed by the client, timed out, failed, or closed because the node
    /// stops.
    Closed,
    /// A request the lane does not serve begins at the first byte of `unread` (everything read and
    /// not yet served): hyper serves the connection from there.
    Handoff(Bytes),
}

/// A plain single write, as recognized in a parsed head.
struct SingleWrite {
    queue: String,
    content_length: usize,
    /// The headers the handler reads (`Authorization`, `Content-Type`, `Idempotency-Key`), so it
    /// checks them with the router's own functions.
    headers: HeaderMap,
    /// `Connection: close`: answer, then close.
    close: bool,
}

/// Serves single writes on `io` until the connection ends or a request that is not one arrives.
pub(crate) async fn serve<IO>(
    io: &mut IO,
    state: &ApiState,
    request_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> LaneEnd
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let max_body = usize::try_from(state.config.limits.max_message_bytes).unwrap_or(usize::MAX);
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    let mut answer = Vec::with_capacity(512);
    let mut deadline = Deadline::new(Instant::now() + request_timeout);
    loop {
        // The head: from what is buffered, reading more while it is incomplete.
        deadline.set(Instant::now() + request_timeout);
        let (head_bytes, write) = loop {
            match recognize(&buffer, max_body) {
                Parsed::Write(head_bytes, write) => break (head_bytes, write),
                Parsed::Other => return LaneEnd::Handoff(buffer.freeze()),
                Parsed::Partial if buffer.len() >= MAX_LANE_HEAD_BYTES => {
                    return LaneEnd::Handoff(buffer.freeze())
                }
                Parsed::Partial => {}
            }
            // A stopping node closes a connection between requests and in a head alike (as hyper
            // does): a partial head must not hold the stop for `request_timeout`.
            match read_more(io, &mut buffer, &mut deadline, Some(&mut *stop)).await {
                Read::Data => {}
                Read::Eof | Read::TimedOut | Read::Failed | Read::Stopping => return LaneEnd::Closed,
            }
        };

        // The checks that need no body, in the handler's order; on a refusal the body is skipped
        // when it is already here, otherwise the connection closes after the answer.
        let SingleWrite { queue, content_length, headers, close } = write;
        let request_bytes = head_bytes + content_length;
        let checked = authorize(state.config.auth.as_ref(), &headers, Access::Client)
            .and_then(|()| valid_queue_name(&queue))
            .and_then(|()| check_writes_allowed(state))
            .and_then(|()| single_head(&headers));
        let head = match checked {
            Ok(head) => head,
            Err(refusal) => {
                let whole = buffer.len() >= request_bytes;
                let close = close || !whole || *stop.borrow();
                if whole {
                    let _ = buffer.split_to(request_bytes);
                }
                if !send_error(io, &mut answer, refusal, close, request_timeout).await || close {
                    return LaneEnd::Closed;
                }
                continue;
            }
        };

        // The body: `request_timeout` from the end of the head.
        deadline.set(Instant::now() + request_timeout);
        while buffer.len() < request_bytes {
            buffer.reserve((request_bytes - buffer.len()).min(MAX_BODY_RESERVE));
            match read_more(io, &mut buffer, &mut deadline, None).await {
                Read::Data => {}
                Read::TimedOut => {
                    let late = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        format!("the message: {}", BodyDeadlineElapsed(request_timeout)),
                    );
                    send_error(io, &mut answer, late, true, request_timeout).await;
                    return LaneEnd::Closed;
                }
                Read::Eof | Read::Failed | Read::Stopping => return LaneEnd::Closed,
            }
        }
        let payload = buffer.split_to(request_bytes).freeze().slice(head_bytes..);

        let stored = match single_incoming(state, head, payload).await {
            Ok(incoming) => store_single(state, queue, incoming).await,
            Err(refusal) => Err(refusal),
        };
        let close = close || *stop.borrow();
        let sent = match stored {
            Ok((status, json)) => {
                write_head(
                    &mut answer,
                    status,
                    &[(header::CONTENT_TYPE, application_json())],
                    json.len(),
                    close,
                );
                answer.extend_from_slice(&json);
                send(io, &answer, request_timeout).await
            }
            Err(refusal) => send_error(io, &mut answer, refusal, close, request_timeout).await,
        };
        if !sent || close {
            return LaneEnd::Closed;
        }
    }
}

fn application_json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// What the buffered bytes hold.
enum Parsed {
    /// A single write whose head is the first `usize` bytes.
    Write(usize, SingleWrite),
    /// Not all of a head yet.
    Partial,
    /// Something the lane leaves to hyper.
    Other,
}

fn recognize(buffer: &[u8], max_body: usize) -> Parsed {
    let mut lines = [httparse::EMPTY_HEADER; MAX_LANE_HEADERS];
    let mut request = httparse::Request::new(&mut lines);
    let head_bytes = match request.parse(buffer) {
        Ok(httparse::Status::Complete(n)) => n,
        // What the first line already shows: a request that is not a single write goes to hyper
        // now, so hyper's head timeout starts about at its first byte.
        Ok(httparse::Status::Partial)
            if request.method.is_some_and(|method| method != "POST")
                || request.path.is_some_and(|path| lane_queue(path).is_none()) =>
        {
            return Parsed::Other
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    match single_write(&request, max_body) {
        Some(write) => Parsed::Write(head_bytes, write),
        None => Parsed::Other,
    }
}

/// The single write `request` is, or `None` when hyper should serve it.
fn single_write(request: &httparse::Request<'_, '_>, max_body: usize) -> Option<SingleWrite> {
    if request.method != Some("POST") || request.version != Some(1) {
        return None;
    }
    let queue = lane_queue(request.path?)?;
    let mut content_length = None;
    let mut close = false;
    let mut headers = HeaderMap::new();
    for line in request.headers.iter() {
        let name = line.name;
        if name.eq_ignore_ascii_case("content-length") {
            let digits = line.value;
            if content_length.is_some() || digits.is_empty() || digits.len() > 19 {
                return None;
            }
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            content_length = std::str::from_utf8(digits).ok()?.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            for token in std::str::from_utf8(line.value).ok()?.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case("keep-alive") && !token.is_empty() {
                    return None;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        } else {
            let name =
                [header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("idempotency-key")]
                    .into_iter()
                    .find(|known| name.eq_ignore_ascii_case(known.as_str()));
            if let Some(name) = name {
                // Repeated, or not a valid header value: the router decides.
                if headers.contains_key(&name) {
                    return None;
                }
                headers.insert(name, HeaderValue::from_bytes(line.value).ok()?);
            }
        }
    }
    let content_length = content_length.filter(|length| *length <= max_body)?;
    Some(SingleWrite { queue: queue.to_string(), content_length, headers, close })
}

/// The queue of a single write's path (`/v1/queues/{queue}/messages`); `None` for any other path,
/// and for escapes, queries and further segments, which are the router's to decode.
fn lane_queue(path: &str) -> Option<&str> {
    let queue = path.strip_prefix("/v1/queues/")?.strip_suffix("/messages")?;
    if queue.is_empty() || queue.bytes().any(|b| matches!(b, b'/' | b'%' | b'?' | b'#')) {
        return None;
    }
    Some(queue)
}

/// The outcome of one read.
enum Read {
    Data,
    Eof,
    TimedOut,
    Failed,
    /// The node stops (watched while a head is read, not while a body is).
    Stopping,
}

/// Reads what the connection has into `buffer`, waiting until `deadline`, and while `stop` is
/// given until the node stops.
async fn read_more<IO>(
    io: &mut IO,
    buffer: &mut BytesMut,
    deadline: &mut Deadline,
    stop: Option<&mut watch::Receiver<bool>>,
) -> Read
where
    IO: AsyncRead + Unpin,
{
    if buffer.capacity() - buffer.len() < READ_CHUNK / 2 {
        buffer.reserve(READ_CHUNK);
    }
    let stopping = async {
        match stop {
            Some(stop) => {
                let _ = stop.wait_for(|stopping| *stopping).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        read = io.read_buf(buffer) => match read {
            Ok(0) => Read::Eof,
            Ok(_) => Read::Data,
            Err(_) => Read::Failed,
        },
        () = stopping => Read::Stopping,
        () = deadline.elapsed() => Read::TimedOut,
    }
}

/// A connection's one timer. Setting a later deadline does not touch the timer: when it fires
/// before the deadline it is re-armed then, so a request costs no timer registration.
struct Deadline {
    at: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new(at: Instant) -> Deadline {
        Deadline { at, timer: Box::pin(tokio::time::sleep_until(at)) }
    }

    /// Moves the deadline; only ever later (each request's deadlines follow the last one's).
    fn set(&mut self, at: Instant) {
        self.at = self.at.max(at);
    }

    async fn elapsed(&mut self) {
        loop {
            self.timer.as_mut().await;
            if Instant::now() >= self.at {
                return;
            }
            let at = self.at;
            self.timer.as_mut().reset(at);
        }
    }
}

/// Writes the status line and headers of an answer with a `content_length` body into `out`.
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &[(HeaderName, HeaderValue)],
    content_length: usize,
    close: bool,
) {
    use std::io::Write;
    out.clear();
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "content-length: {content_length}\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"date: ");
    http_date(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Writes `refusal` as the router would answer it; false when the connection failed.
async fn send_error<IO>(
    io: &mut IO,
    out: &mut Vec<u8>,
    refusal: ApiError,
    close: bool,
    timeout: Duration,
) -> bool
where
    IO: AsyncWrite + Unpin,
{
    let (parts, body) = refusal.into_response().into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_ERROR_BODY_BYTES).await else { return false };
    let headers: Vec<(HeaderName, HeaderValue)> =
        parts.headers.iter().map(|(name, value)| (name.clone(), value.clone())).collect();
    write_head(out, parts.status, &headers, body.len(), close);
    out.extend_from_slice(&body);
    send(io, out, timeout).await
}

/// Writes an answer; false when the connection failed or the client did not take it within
/// `timeout` (a client that pipelines requests and never reads would otherwise hold the
/// connection, and a stopping node, for ever).
async fn send<IO>(io: &mut IO, bytes: &[u8], timeout: Duration) -> bool
where
    IO: AsyncWrite + Unpin,
{
    let written = async { io.write_all(bytes).await.is_ok() && io.flush().await.is_ok() };
    tokio::time::timeout(timeout, written).await.unwrap_or(false)
}

/// Appends the `Date` header's value for now (RFC 9110 IMF-fixdate), formatted once a second per
/// thread as hyper does.
fn http_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Option<SingleWrite> {
        match recognize(head.as_bytes(), 1024) {
            Parsed::Write(n, write) => {
                assert_eq!(n, head.len());
                Some(write)
            }
            Parsed::Partial => panic!("partial: {head:?}"),
            Parsed::Other => None,
        }
    }

    #[test]
    fn plain_single_writes_take_the_lane() {
        let write = parse(
            "POST /v1/queues/sales/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
             Content-Type: text/plain\r\nAuthorization: Bearer t\r\nIdempotency-Key: k1\r\n\r\n",
        )
        .expect("a single write");
        assert_eq!(write.queue, "sales");
        assert_eq!(write.content_length, 3);
        assert!(!write.close);
        assert_eq!(write.headers.len(), 3);
        assert_eq!(write.headers[header::CONTENT_TYPE], "text/plain");
        let write =
            parse("POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 0\r\nconnection: keep-alive, close\r\n\r\n")
                .expect("a single write");
        assert!(write.close);
    }

    #[test]
    fn everything_else_goes_to_the_router() {
        for head in [
            "GET /v1/queues/q/messages HTTP/1.1\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.0\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/queues/q/batch HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/queues/q/messages?x=1 HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/queues/a%20b/messages HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/queues/a/b/messages HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/queues//messages HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            // no length, a chunked body, two lengths, a signed length, too large
            "POST /v1/queues/q/messages HTTP/1.1\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 1025\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 1\r\nexpect: 100-continue\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 1\r\nconnection: upgrade\r\n\r\n",
            "POST /v1/queues/q/messages HTTP/1.1\r\ncontent-length: 1\r\nidempotency-key: a\r\nIdempotency-Key: b\r\n\r\n",
        ] {
            assert!(parse(head).is_none(), "{head:?}");
        }
        // An HTTP/2 preface and garbage are the router's (hyper's) too.
        assert!(matches!(recognize(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 1024), Parsed::Other));
        assert!(matches!(recognize(b"\x16\x03\x01\x02\x00", 1024), Parsed::Other));
        assert!(matches!(recognize(b"POST /v1/queues/q/mess", 1024), Parsed::Partial));
        // The first line alone decides: hyper takes other requests before their heads are done.
        assert!(matches!(recognize(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n", 1024), Parsed::Other));
        assert!(matches!(recognize(b"POST /v1/queues/q/batch HTTP/1.1\r\n", 1024), Parsed::Other));
        assert!(matches!(recognize(b"POST /v1/queues/q/messages HTTP/1.1\r\nHost", 1024), Parsed::Partial));
    }

    #[test]
    fn answers_carry_length_date_and_close() {
        let mut out = Vec::new();
        write_head(&mut out, StatusCode::ACCEPTED, &[(header::CONTENT_TYPE, application_json())], 12, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(
            "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 12\r\n"
        ));
        assert!(text.contains("\r\nconnection: close\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
    }
}
