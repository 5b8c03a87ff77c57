//! A route's window over HTTP/2 (an `https://` endpoint whose server picks `h2` by ALPN): each
//! request of the window is a stream, opened in the order the requests were pushed (stream ids
//! rise in that order, so the server sees the HEADERS in queue order), and the server may handle
//! them at once. [`crate::route::pipeline`] owns the window and takes the answers in push order;
//! this module holds the connection, opens the streams and says what became of each one.
//!
//! - Streams open up to the server's `SETTINGS_MAX_CONCURRENT_STREAMS`; the rest wait, in order,
//!   in the HTTP/2 layer (h2's pending-open queue). Until the server's SETTINGS arrive only one
//!   stream opens, so a server allowing fewer streams than the window never refuses the excess.
//! - The connection's I/O runs in tasks of its own (the HTTP/2 driver, and one per request body so
//!   a large batch body flows as the server's flow-control windows open, whatever answer the
//!   route awaits). Dropping [`Http2Connection`] ends every one of them and closes the socket.
//! - A stream with no answer is classified ([`StreamFailure`]): not processed (never sent, refused
//!   with `REFUSED_STREAM`, or above the last stream id of the server's GOAWAY), the connection
//!   broken, or the stream alone reset or invalid.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::client::conn::TrySendError;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, USER_AGENT as USER_AGENT_HEADER};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::route::delivery::{io_error_kind, MAX_ERROR_BODY_BYTES, USER_AGENT};
use crate::route::pipeline::{QuickAckTcp, Request};
use crate::route::policy::FailureKind;

type Body = Full<Bytes>;

/// The most request-body bytes a window keeps in streams behind its oldest one (see
/// [`Streams::may_send`]): half the smallest connection window a server may have.
const BODY_BYTES_BEHIND_OLDEST: usize = 32 * 1024;
type ResponseResult = Result<hyper::Response<hyper::body::Incoming>, TrySendError<hyper::Request<Body>>>;
type ResponseFuture = Pin<Box<dyn Future<Output = ResponseResult> + Send>>;

/// An HTTP/2 connection to one endpoint, its I/O driven by tasks that end when it is dropped.
pub(super) struct Http2Connection {
    /// The endpoint's url, as configured.
    pub(super) url: String,
    sender: SendRequest<Body>,
    /// Dropped with the connection: every task of the connection sees it and ends.
    _tasks_end: watch::Sender<()>,
}

/// Spawns the connection's tasks so that they end when the connection is dropped.
#[derive(Clone)]
struct Spawner {
    connection_dropped: watch::Receiver<()>,
}

impl<F> hyper::rt::Executor<F> for Spawner
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let mut dropped = self.connection_dropped.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = future => {}
                _ = dropped.changed() => {}
            }
        });
    }
}

impl Http2Connection {
    /// Starts HTTP/2 on a TLS connection whose ALPN said `h2`.
    pub(super) async fn handshake(
        url: &str,
        tls: tokio_rustls::client::TlsStream<QuickAckTcp>,
    ) -> Result<Http2Connection, String> {
        let (tasks_end, connection_dropped) = watch::channel(());
        let spawner = Spawner { connection_dropped };
        let (sender, connection) = hyper::client::conn::http2::Builder::new(spawner.clone())
            // The server's SETTINGS raise it (or set its limit) within a round trip.
            .initial_max_send_streams(1)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
        let url_for_log = url.to_string();
        hyper::rt::Executor::execute(&spawner, async move {
            if let Err(e) = connection.await {
                tracing::debug!(url = %url_for_log, "HTTP/2 connection ended: {e}");
            }
        });
        Ok(Http2Connection { url: url.to_string(), sender, _tasks_end: tasks_end })
    }

    /// Closed, or going away: no stream can open on it any more.
    pub(super) fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// A window's streams on one connection, oldest first.
pub(super) struct Streams {
    connection: Http2Connection,
    in_flight: VecDeque<ResponseFuture>,
    /// The body length of each stream in `in_flight`, in the same order.
    body_bytes: VecDeque<usize>,
    /// How many answers were taken on this connection in this window.
    pub(super) answered: usize,
    /// Kept from an earlier window and nothing answered on it yet: the requests sent on it so far,
    /// to be sent again on a new connection if the server had closed it while it was idle.
    pub(super) replay: Option<Vec<Request>>,
}

/// An answer's status and, for a status other than 2xx, up to [`MAX_ERROR_BODY_BYTES`] of its
/// body.
pub(super) struct Answered {
    pub(super) status: u16,
    pub(super) excerpt: Vec<u8>,
}

/// Why a stream has no answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StreamFailure {
    /// The server did not process it: never sent, refused (`REFUSED_STREAM`), or above the last
    /// stream id of its GOAWAY. Sending it again is safe.
    NotProcessed(String),
    /// The connection broke (or closed) before the answer.
    Broken(FailureKind, String),
    /// The stream alone: reset by the server, or an invalid answer. The connection goes on.
    Stream(FailureKind, String),
    /// No answer by the deadline.
    Timeout,
}

impl Streams {
    pub(super) fn new(connection: Http2Connection, reused: bool) -> Streams {
        Streams {
            connection,
            in_flight: VecDeque::new(),
            body_bytes: VecDeque::new(),
            answered: 0,
            replay: reused.then(Vec::new),
        }
    }

    /// Opens the stream of `request` (or queues it, in order, behind the streams the server's
    /// limit holds back). Connection-specific headers are not sent (HTTP/2 forbids them): the
    /// requests carry none, and `Host` is the `:authority` of `uri`.
    fn send(&mut self, uri: &hyper::Uri, request: Request) {
        if let Some(replay) = &mut self.replay {
            replay.push(request.clone());
        }
        let (headers, body) = request;
        let length = body.len();
        let mut http = hyper::Request::new(Full::new(body));
        *http.method_mut() = hyper::Method::POST;
        *http.uri_mut() = uri.clone();
        *http.version_mut() = hyper::Version::HTTP_2;
        let sent = http.headers_mut();
        sent.reserve(headers.len() + 3);
        sent.extend(headers);
        sent.insert(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT));
        sent.insert(ACCEPT, HeaderValue::from_static("*/*"));
        sent.insert(CONTENT_LENGTH, HeaderValue::from(length));
        self.in_flight.push_back(Box::pin(self.connection.sender.try_send_request(http)));
        self.body_bytes.push_back(length);
    }

    /// Opens the streams of the requests waiting in `unsent`, in order, as far as
    /// [`Self::may_send`] lets them; the rest wait for an answer.
    pub(super) fn open(&mut self, unsent: &mut VecDeque<Request>, uri: &hyper::Uri) {
        while unsent.front().is_some_and(|request| self.may_send(request.1.len())) {
            let request = unsent.pop_front().expect("a front request");
            self.send(uri, request);
        }
    }

    /// Whether a request with a body of `length` bytes may open its stream now: when no stream is
    /// open, or when the bodies of the streams behind the oldest one, with it, stay within
    /// [`BODY_BYTES_BEHIND_OLDEST`]. Every stream's body shares the connection's flow-control
    /// window, which the server gives back only as its handlers read; a server that handles one
    /// stream at a time reads the oldest, so the bodies behind it must leave room for it in the
    /// smallest window a server may have (the spec's 65,535 bytes), or the oldest never finishes.
    /// Small messages still go many at once; bodies larger than that go one after another.
    fn may_send(&self, length: usize) -> bool {
        let behind_oldest: usize = self.body_bytes.iter().skip(1).sum();
        self.in_flight.is_empty() || behind_oldest + length <= BODY_BYTES_BEHIND_OLDEST
    }

    /// A failure of the oldest stream alone was taken as its answer: the connection is known to
    /// work, as after any answer.
    pub(super) fn answered_with_failure(&mut self) {
        self.answered += 1;
        self.replay = None;
    }

    /// The answer to the oldest stream, by `deadline`; the streams after it go on meanwhile.
    pub(super) async fn answer(&mut self, deadline: Instant) -> Result<Answered, StreamFailure> {
        let oldest = self.in_flight.pop_front().expect("an answer is awaited only for a sent request");
        self.body_bytes.pop_front();
        let response = match tokio::time::timeout_at(deadline, oldest).await {
            Err(_) => return Err(StreamFailure::Timeout),
            Ok(Err(error)) => return Err(classify(error)),
            Ok(Ok(response)) => response,
        };
        self.answered += 1;
        self.replay = None;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            // Delivered once the status is in; the body is not ours to wait for (dropping it
            // cancels the rest of the stream, not the connection).
            return Ok(Answered { status, excerpt: Vec::new() });
        }
        let mut body = response.into_body();
        let mut excerpt = Vec::new();
        while excerpt.len() < MAX_ERROR_BODY_BYTES {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        excerpt.extend_from_slice(data);
                    }
                }
                // The status is the answer; a body cut short only shortens its excerpt.
                _ => break,
            }
        }
        excerpt.truncate(MAX_ERROR_BODY_BYTES);
        Ok(Answered { status, excerpt })
    }

    /// The connection to keep for the next window, if it may be: every stream answered and the
    /// connection open (no GOAWAY, no error).
    pub(super) fn keep(self) -> Option<Http2Connection> {
        (self.in_flight.is_empty() && !self.connection.is_closed()).then_some(self.connection)
    }

    /// The requests to send again on a new connection (see [`Streams::replay`]), and the
    /// connection dropped with its streams.
    pub(super) fn into_replay(self) -> Option<Vec<Request>> {
        self.replay
    }
}

/// What a failed stream says, from the error's types (never its text).
fn classify(error: TrySendError<hyper::Request<Body>>) -> StreamFailure {
    if error.message().is_some() {
        return StreamFailure::NotProcessed("not sent: the connection was closing".to_string());
    }
    let error = error.into_error();
    if error.is_canceled() {
        return StreamFailure::NotProcessed(format!("not sent: {error}"));
    }
    let mut h2 = None;
    let mut io = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = source {
        h2 = h2.or(cause.downcast_ref::<h2::Error>());
        io = io.or(cause.downcast_ref::<std::io::Error>());
        source = cause.source();
    }
    let Some(h2) = h2 else {
        // The connection's own I/O (the socket, TLS) failed under it.
        let kind = io.and_then(|io| io_error_kind(io.kind())).unwrap_or(FailureKind::Reset);
        let detail = match io {
            Some(io) => format!("the connection broke before an answer: {io}"),
            None => format!("the connection broke before an answer: {error}"),
        };
        return StreamFailure::Broken(kind, detail);
    };
    let reason = h2.reason().map_or_else(|| "no reason".to_string(), |r| format!("{r:?}"));
    if let Some(io) = h2.get_io() {
        let kind = io_error_kind(io.kind()).unwrap_or(FailureKind::Reset);
        return StreamFailure::Broken(kind, format!("the connection broke before an answer: {io}"));
    }
    if h2.is_remote() && h2.is_go_away() {
        return StreamFailure::NotProcessed(format!("the server is going away (GOAWAY, {reason})"));
    }
    if h2.is_remote() && h2.is_reset() {
        if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
            return StreamFailure::NotProcessed("refused by the server (REFUSED_STREAM)".to_string());
        }
        return StreamFailure::Stream(FailureKind::Reset, format!("the server reset the stream ({reason})"));
    }
    if h2.is_go_away() {
        // Ours: the server broke the protocol.
        return StreamFailure::Broken(FailureKind::Other, format!("invalid answer: {h2}"));
    }
    StreamFailure::Stream(FailureKind::Other, format!("invalid answer: {h2}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use crate::route::pipeline::tests::{request, requests};
    use crate::route::pipeline::{Answer, Pipeline, Request};
    use crate::route::policy::FailureKind;

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// What the test server saw, in the order the streams arrived (accepted: stream id order).
    #[derive(Default)]
    struct Log {
        /// (seq, connection number)
        requests: Mutex<Vec<(u64, usize)>>,
        connections: AtomicUsize,
        handling: AtomicUsize,
        most_handled_at_once: AtomicUsize,
    }

    impl Log {
        fn seqs(&self) -> Vec<u64> {
            self.requests.lock().unwrap().iter().map(|(seq, _)| *seq).collect()
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    /// A private CA and a certificate for localhost (scripts/make-certs.sh, as operators make them).
    fn certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-certs.sh");
        let output =
            std::process::Command::new("bash").arg(script).arg(dir.path()).arg("sink").output().unwrap();
        assert!(output.status.success(), "make-certs.sh: {}", String::from_utf8_lossy(&output.stderr));
        dir
    }

    fn client_tls(certs: &tempfile::TempDir) -> Arc<outpost_tls::ClientTls> {
        outpost_tls::ClientTls::load(outpost_tls::ClientFiles {
            section: "route[test]".into(),
            ca_file: Some(certs.path().join("ca.pem")),
            ..Default::default()
        })
        .unwrap()
    }

    fn acceptor(certs: &tempfile::TempDir, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        testkit::tls::acceptor(&certs.path().join("sink.pem"), &certs.path().join("sink.key"), alpn)
    }

    /// An HTTP/2 server over TLS on 127.0.0.1:0, each stream handled in a task of its own (at
    /// once), answering by `Outpost-Seq` after reading the whole body: 1 takes 300 ms, anything
    /// else below 1000 answers 200 at once (body length in an `x-length` header); 1000 + s answers
    /// status s with a body; 2000 never answers; 3000 answers 200 and starts a graceful shutdown
    /// (GOAWAY); 4000 is refused (REFUSED_STREAM); 5000 closes the connection at once; 6000 answers
    /// 200 and closes the connection (with GOAWAY) once its streams are done.
    async fn server(certs: &tempfile::TempDir, max_concurrent_streams: u32) -> (String, Arc<Log>) {
        let acceptor = acceptor(certs, &[b"h2"]);
        let log = Arc::new(Log::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/in?x=1", listener.local_addr().unwrap().port());
        let server_log = log.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, log) = (acceptor.clone(), server_log.clone());
                tokio::spawn(async move {
                    let connection_number = log.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let mut connection = h2::server::Builder::new()
                        .max_concurrent_streams(max_concurrent_streams)
                        .handshake::<_, Bytes>(tls)
                        .await
                        .unwrap();
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        let seq: u64 = request.headers()["outpost-seq"].to_str().unwrap().parse().unwrap();
                        assert_eq!(request.uri().path(), "/in");
                        assert_eq!(request.uri().authority().unwrap().host(), "localhost");
                        assert!(request.headers().get("connection").is_none());
                        log.requests.lock().unwrap().push((seq, connection_number));
                        match seq {
                            4000 => respond.send_reset(h2::Reason::REFUSED_STREAM),
                            // Reset on the first connection only, answered on the others.
                            7000 if connection_number == 1 => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                            5000 => return,
                            3000 | 6000 => {
                                answer(request, respond, seq, log.clone()).await;
                                connection.graceful_shutdown();
                            }
                            _ => drop(tokio::spawn(answer(request, respond, seq, log.clone()))),
                        }
                    }
                });
            }
        });
        (url, log)
    }

    async fn answer(
        request: hyper::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        seq: u64,
        log: Arc<Log>,
    ) {
        let now = log.handling.fetch_add(1, Ordering::SeqCst) + 1;
        log.most_handled_at_once.fetch_max(now, Ordering::SeqCst);
        let mut body = request.into_body();
        let mut length = 0;
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            length += data.len();
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        match seq {
            1 => tokio::time::sleep(Duration::from_millis(300)).await,
            2000 => tokio::time::sleep(TIMEOUT * 4).await,
            _ => {}
        }
        log.handling.fetch_sub(1, Ordering::SeqCst);
        let status = if (1000..2000).contains(&seq) { (seq - 1000) as u16 } else { 200 };
        let response = hyper::Response::builder().status(status).header("x-length", length).body(()).unwrap();
        let Ok(mut stream) = respond.send_response(response, false) else { return };
        let _ = stream.send_data(Bytes::from(format!("status {status} and more")), true);
    }

    #[tokio::test]
    async fn streams_open_in_push_order_are_handled_at_once_and_answered_in_push_order() {
        let certs = certs();
        let (url, log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        // 1 takes 300 ms; the 31 after it are answered first, and wait their turn.
        let answers = pipeline.send(&url, &requests(1..=32)).await;
        assert_eq!(answers, vec![Answer::Delivered; 32]);
        assert_eq!(log.seqs(), (1..=32).collect::<Vec<_>>(), "the server saw them in push order");
        assert!(log.most_handled_at_once.load(Ordering::SeqCst) > 1, "handled at once");
        // The connection is kept for the next window.
        assert_eq!(pipeline.send(&url, &requests(33..=40)).await, vec![Answer::Delivered; 8]);
        assert_eq!(log.connections(), 1);
    }

    #[tokio::test]
    async fn a_server_allowing_one_stream_gets_them_one_at_a_time_in_order_none_refused() {
        let certs = certs();
        let (url, log) = server(&certs, 1).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        let mut window = pipeline.window(&url);
        let mut next_seq = 2u64;
        for seq in 2..=9 {
            window.push(request(seq));
        }
        let mut answered = 0;
        while window.outstanding() > 0 {
            assert_eq!(pipeline.next_answer(&mut window).await, Answer::Delivered);
            answered += 1;
            if next_seq + 8 <= 50 {
                window.push(request(next_seq + 8));
            }
            next_seq += 1;
        }
        assert_eq!(answered, 49);
        assert_eq!(log.seqs(), (2..=50).collect::<Vec<_>>());
        assert_eq!(log.most_handled_at_once.load(Ordering::SeqCst), 1);
        assert_eq!(log.connections(), 1);
    }

    #[tokio::test]
    async fn a_failure_in_the_middle_is_reported_and_the_answers_after_it_are_taken() {
        let certs = certs();
        let (url, log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        let seqs: Vec<u64> = (2..=5).chain([1503]).chain(7..=10).collect();
        let answers = pipeline.send(&url, &requests(seqs.clone())).await;
        let Answer::Failed(error) = &answers[4] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Status(503));
        assert_eq!(error.url, url);
        assert_eq!(error.detail, "503 Service Unavailable: status 503 and more");
        assert!(answers.iter().enumerate().all(|(i, a)| i == 4 || *a == Answer::Delivered), "{answers:?}");
        assert_eq!(pipeline.send(&url, &requests([11, 12])).await, vec![Answer::Delivered; 2]);
        assert_eq!(log.seqs(), seqs.into_iter().chain([11, 12]).collect::<Vec<_>>());
        assert_eq!(log.connections(), 1, "a status is an answer: the connection is kept");
    }

    #[tokio::test]
    async fn a_refused_stream_is_unanswered_after_an_answer_and_a_reset_failure_first() {
        let certs = certs();
        let (url, _log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        let answers = pipeline.send(&url, &requests([2, 4000, 3])).await;
        assert_eq!(answers, [Answer::Delivered, Answer::Unanswered, Answer::Delivered]);
        // First in its window: a failure, so that a server refusing everything gets a backoff.
        let answers = pipeline.send(&url, &requests([4000, 5])).await;
        let Answer::Failed(error) = &answers[0] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Reset);
        assert!(error.detail.contains("REFUSED_STREAM"), "{error}");
        assert_eq!(answers[1], Answer::Delivered);
    }

    #[tokio::test]
    async fn a_goaway_mid_window_leaves_the_streams_past_it_unanswered_and_the_next_window_reconnects() {
        let certs = certs();
        // Two streams at a time: the GOAWAY comes while later requests wait to open.
        let (url, log) = server(&certs, 2).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        let seqs: Vec<u64> = [2, 3, 3000].into_iter().chain(4..=12).collect();
        let answers = pipeline.send(&url, &requests(seqs.clone())).await;
        let delivered = answers.iter().take_while(|a| **a == Answer::Delivered).count();
        assert!(delivered >= 3, "{answers:?}");
        assert!(answers[delivered..].iter().all(|a| *a == Answer::Unanswered), "{answers:?}");
        assert!(delivered < seqs.len(), "some streams were past the GOAWAY: {answers:?}");
        let seen: BTreeSet<u64> = log.seqs().into_iter().collect();
        assert!(seqs[..delivered].iter().all(|seq| seen.contains(seq)), "delivered means handled");
        // The rest, on a new connection.
        let rest = pipeline.send(&url, &requests(seqs[delivered..].to_vec())).await;
        assert_eq!(rest, vec![Answer::Delivered; seqs.len() - delivered]);
        assert_eq!(log.connections(), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_mid_window_leaves_the_rest_unanswered_or_fails_the_first_answer() {
        let certs = certs();
        // One stream at a time: 2 and 3 are answered before 5000 opens.
        let (url, log) = server(&certs, 1).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        let answers = pipeline.send(&url, &requests([2, 3, 5000, 4, 5])).await;
        assert_eq!(
            answers,
            [
                Answer::Delivered,
                Answer::Delivered,
                Answer::Unanswered,
                Answer::Unanswered,
                Answer::Unanswered
            ]
        );
        assert_eq!(log.seqs(), [2, 3, 5000], "nothing was sent after the close");
        let answers = pipeline.send(&url, &requests([5000, 4])).await;
        let Answer::Failed(error) = &answers[0] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Reset, "{error}");
        assert_eq!(answers[1], Answer::Unanswered);
        assert_eq!(pipeline.send(&url, &requests([4, 5])).await, vec![Answer::Delivered; 2]);
        assert_eq!(log.connections(), 3);
    }

    #[tokio::test]
    async fn a_stalled_stream_times_out_and_the_connection_is_dropped() {
        let certs = certs();
        let (url, log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        let answers = pipeline.send(&url, &requests([2, 2000, 3])).await;
        assert_eq!(answers[0], Answer::Delivered);
        let Answer::Failed(error) = &answers[1] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Timeout, "{error}");
        assert_eq!(answers[2], Answer::Unanswered);
        assert_eq!(pipeline.send(&url, &requests([4])).await, [Answer::Delivered]);
        assert_eq!(log.connections(), 2, "a new connection after the timeout");
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_while_idle_is_replaced_without_a_failure() {
        let certs = certs();
        let (url, log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        // 6000: answered, then the server closes the connection (GOAWAY) once it is idle.
        assert_eq!(pipeline.send(&url, &requests([6000])).await, [Answer::Delivered]);
        assert_eq!(pipeline.send(&url, &requests([2, 3])).await, vec![Answer::Delivered; 2]);
        assert_eq!(log.seqs(), [6000, 2, 3]);
        assert_eq!(log.connections(), 2);
    }

    #[tokio::test]
    async fn large_bodies_flow_through_the_servers_flow_control_windows() {
        let certs = certs();
        // The spec's 64 KiB windows: 8 bodies of 1 MiB need the server's WINDOW_UPDATEs while the
        // route awaits the first answer.
        let (url, _log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT * 5, Some(&client_tls(&certs)));
        let big: Vec<Request> = (2..=9)
            .map(|seq| {
                let (headers, _) = request(seq);
                (headers, Bytes::from(vec![b'x'; 1024 * 1024]))
            })
            .collect();
        assert_eq!(pipeline.send(&url, &big).await, vec![Answer::Delivered; 8]);
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_completes_hits_the_timeout() {
        let certs = certs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/in", listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            // Reads the ClientHello and says nothing.
            let mut buffer = vec![0u8; 64 * 1024];
            while tcp.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        });
        let mut pipeline = Pipeline::new(Duration::from_millis(300), Some(&client_tls(&certs)));
        let started = tokio::time::Instant::now();
        let answers = pipeline.send(&url, &requests([1, 2])).await;
        let Answer::Failed(error) = &answers[0] else { panic!("{answers:?}") };
        assert_eq!(error.kind, FailureKind::Timeout, "{error}");
        assert_eq!(answers[1], Answer::Unanswered);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_server_that_picks_http1_gets_the_window_pipelined() {
        let certs = certs();
        let acceptor = acceptor(&certs, &[b"http/1.1"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/in", listener.local_addr().unwrap().port());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server_seen = seen.clone();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            // Reads until it holds three requests, then answers them at once.
            let mut read = Vec::new();
            let mut buffer = vec![0u8; 64 * 1024];
            while String::from_utf8_lossy(&read).matches("POST /in HTTP/1.1").count() < 3 {
                let n = tls.read(&mut buffer).await.unwrap();
                assert!(n > 0);
                read.extend_from_slice(&buffer[..n]);
            }
            server_seen.lock().unwrap().push(String::from_utf8_lossy(&read).into_owned());
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".repeat(3);
            tokio::io::AsyncWriteExt::write_all(&mut tls, &answer).await.unwrap();
            tokio::io::AsyncWriteExt::flush(&mut tls).await.unwrap();
            while tls.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        });
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        assert_eq!(pipeline.send(&url, &requests([1, 2, 3])).await, vec![Answer::Delivered; 3]);
        let text = seen.lock().unwrap()[0].clone();
        assert!(text.starts_with("POST /in HTTP/1.1\r\nhost: localhost:"), "{text}");
        assert!(text.find("\"n\":1").unwrap() < text.find("\"n\":2").unwrap());
    }

    /// A stream the server reset is that request's answer: on a kept connection it proves the
    /// connection alive, so a stream refused after it is sent again alone later, not the whole
    /// window on a new connection (which sent the reset request twice and gave every later
    /// answer to the request before it: a refused request came back `Delivered`).
    #[tokio::test]
    async fn a_reset_stream_is_its_requests_answer_and_the_answers_after_it_stay_in_place() {
        let certs = certs();
        let (url, log) = server(&certs, 100).await;
        let mut pipeline = Pipeline::new(TIMEOUT, Some(&client_tls(&certs)));
        assert_eq!(pipeline.send(&url, &requests([2])).await, [Answer::Delivered]);
        // On the kept connection: 7000 is reset (its answer), 4000 refused, 5 answered.
        let answers = pipeline.send(&url, &requests([7000, 4000, 5])).await;
        let seen = log.requests.lock().unwrap().clone();
        assert!(
            matches!(&answers[..], [Answer::Failed(e), Answer::Unanswered, Answer::Delivered] if e.kind == FailureKind::Reset),
            "{answers:?}; the server saw {seen:?}"
        );
        assert_eq!(
            seen,
            vec![(2, 1), (7000, 1), (4000, 1), (5, 1)],
            "each request once, on the kept connection"
        );
    }

    /// An HTTP/2 server that handles one stream at a time (a lock taken before the body is read),
    /// with the spec's default connection window (65,535 bytes).
    async fn sequential_server(certs: &tempfile::TempDir) -> String {
        let acceptor = acceptor(certs, &[b"h2"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://localhost:{}/in", listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let mut connection = h2::server::handshake(tls).await.unwrap();
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        let lock = lock.clone();
                        tokio::spawn(async move {
                            let _one_at_a_time = lock.lock().await;
                            let mut body = request.into_body();
                            while let Some(data) = body.data().await {
                                let data = data.unwrap();
                                body.flow_control().release_capacity(data.len()).unwrap();
                            }
                            let response = hyper::Response::builder().status(200).body(()).unwrap();
                            let _ = respond.send_response(response, true);
                        });
                    }
                });
            }
        });
        url
    }

    /// Bodies larger than the connection window to a server that handles one stream at a time:
    /// sent all at once, the later bodies filled the window and the first never finished (a
    /// timeout, and the route in store mode); held back behind the oldest stream, all go through.
    #[tokio::test]
    async fn large_bodies_reach_a_server_that_handles_one_stream_at_a_time() {
        assert_eq!(four_bodies_to_a_sequential_server(1024 * 1024).await, vec![Answer::Delivered; 4]);
    }

    /// Small bodies, whose streams are not held back, reach it too.
    #[tokio::test]
    async fn small_bodies_reach_a_server_that_handles_one_stream_at_a_time() {
        assert_eq!(four_bodies_to_a_sequential_server(8 * 1024).await, vec![Answer::Delivered; 4]);
    }

    /// The answers to a window of four bodies of `size` bytes to [`sequential_server`].
    async fn four_bodies_to_a_sequential_server(size: usize) -> Vec<Answer> {
        let certs = certs();
        let url = sequential_server(&certs).await;
        let mut pipeline = Pipeline::new(Duration::from_secs(5), Some(&client_tls(&certs)));
        let bodies: Vec<Request> = (2..=5)
            .map(|seq| {
                let (headers, _) = request(seq);
                (headers, Bytes::from(vec![b'x'; size]))
            })
            .collect();
        pipeline.send(&url, &bodies).await
    }
}
