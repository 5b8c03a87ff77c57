//! `outpost bench`: a load generator that measures acknowledged writes, so an operator can size
//! hardware. Each worker holds one keep-alive HTTP/1.1 connection and sends its next request only
//! after the previous one was acknowledged, so `--concurrency` is the number of writes in flight.
//!
//! The load generator usually shares the machine with the node it measures, so its own CPU per
//! request is kept small: each worker drives its connection in its own task (the request written
//! with one `write`, the answer parsed in place with `httparse`), where hyper's client runs every
//! connection as a task of its own and passes each request and answer between the two.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Args;
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::exit;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Node to load, e.g. http://127.0.0.1:7400.
    #[arg(long)]
    url: String,
    /// Queue to write to.
    #[arg(long, default_value = "bench")]
    queue: String,
    /// Messages to send in total.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Writes in flight (one connection each).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Messages per request: 1 posts single messages, more posts NDJSON batches.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Client token, if the node requires one.
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

struct Target {
    /// `host:port` to connect to.
    authority: String,
    path: String,
    /// The whole request, head and body, sent as is for every write.
    request: Bytes,
    /// "--size N --batch B", for the advice after a 413.
    size_hint: String,
}

pub fn run(args: BenchArgs) -> ExitCode {
    if args.concurrency == 0 || args.batch == 0 || args.messages == 0 {
        eprintln!("error: --concurrency, --batch and --messages must be at least 1");
        return ExitCode::from(exit::USAGE);
    }
    if let Err(problem) = outpost_core::validate_name(&args.queue) {
        eprintln!("error: --queue: {problem}");
        return ExitCode::from(exit::USAGE);
    }
    let Some(authority) = args.url.strip_prefix("http://").map(|rest| rest.trim_end_matches('/').to_string())
    else {
        eprintln!("error: --url must be an http:// URL such as http://127.0.0.1:7400");
        return ExitCode::from(exit::USAGE);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(bench(args, authority))
}

fn make_target(args: &BenchArgs, authority: String) -> Target {
    let (path, body, content_type) = if args.batch == 1 {
        let payload: Vec<u8> = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect();
        (format!("/v1/queues/{}/messages", args.queue), Bytes::from(payload), "application/octet-stream")
    } else {
        // One JSON document per line, padded to --size bytes each.
        let filler = args.size.saturating_sub(8).max(1);
        let line = format!("{{\"p\":\"{}\"}}\n", "x".repeat(filler));
        (
            format!("/v1/queues/{}/batch", args.queue),
            Bytes::from(line.repeat(args.batch)),
            "application/x-ndjson",
        )
    };
    let authority = authority.split('/').next().unwrap_or_default().to_string();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(token) = &args.token {
        head.push_str(&format!("authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = BytesMut::with_capacity(head.len() + body.len());
    request.extend_from_slice(head.as_bytes());
    request.extend_from_slice(&body);
    Target {
        authority,
        path,
        request: request.freeze(),
        size_hint: format!("--size {} --batch {}", args.size, args.batch),
    }
}

#[derive(Default)]
struct WorkerResult {
    /// Latency of each acknowledged request, in microseconds.
    latencies_us: Vec<u32>,
    acknowledged_messages: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Set by the first worker whose request the node refused for good: every request of a run is the
/// same (token, size, batch), so once one gets 401, 403 or 413 every other one would too, and
/// sending on only loads the node with refusals.
#[derive(Default)]
struct Refused {
    stop: AtomicBool,
    why: Mutex<Option<String>>,
}

impl Refused {
    fn refuse(&self, why: String) {
        self.why.lock().expect("refusal lock").get_or_insert(why);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What to tell the operator when the node refuses every request with `status`, or `None` when
/// the status may pass (a full store, a transition) and the run goes on.
fn refusal_advice(status: StatusCode, args_hint: &str) -> Option<String> {
    match status.as_u16() {
        401 => Some("the node requires a client token: pass --token T or set OUTPOST_TOKEN".into()),
        403 => {
            Some("the token is not a client token of the node: pass one of its [auth] client_tokens".into())
        }
        413 => Some(format!(
            "the messages are larger than the node accepts ({args_hint}): lower --size or --batch, or raise \
             the node's limits.max_message_bytes / limits.max_batch_messages"
        )),
        _ => None,
    }
}

/// Runs the workers until every request is answered (or the node refused them for good), then
/// prints the throughput and latency of the acknowledged writes.
async fn bench(args: BenchArgs, authority: String) -> ExitCode {
    let target = Arc::new(make_target(&args, authority));
    let requests_total = args.messages.div_ceil(args.batch as u64);
    let messages_total = requests_total * args.batch as u64;
    let acknowledged = Arc::new(AtomicU64::new(0));
    eprintln!(
        "outpost bench: {} messages of {} B to {}{} ({} in flight, {} per request)",
        messages_total,
        args.size,
        args.url.trim_end_matches('/'),
        target.path,
        args.concurrency,
        args.batch
    );

    let started = Instant::now();
    let progress = tokio::spawn(report_progress(acknowledged.clone(), messages_total, started));
    let refused = Arc::new(Refused::default());
    let merged = run_workers(&args, &target, requests_total, &acknowledged, &refused).await;
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    if let Some(why) = refused.why.lock().expect("refusal lock").take() {
        eprintln!("outpost bench: stopped: {why}");
        eprintln!("  first refusal: {}", merged.first_error.as_deref().unwrap_or("?"));
        return ExitCode::from(exit::FATAL);
    }

    print_summary(&merged, &args, seconds);
    if merged.acknowledged_messages == 0 {
        return ExitCode::from(exit::FATAL);
    }
    ExitCode::SUCCESS
}

/// Every 2 s after the first, how many messages are acknowledged so far and at what rate.
async fn report_progress(acknowledged: Arc<AtomicU64>, messages_total: u64, started: Instant) {
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let done = acknowledged.load(Ordering::Relaxed);
        let rate = done as f64 / started.elapsed().as_secs_f64();
        eprintln!("  … {done}/{messages_total} acknowledged ({rate:.0} msgs/s)");
    }
}

/// Starts `--concurrency` workers sharing the requests, and merges what they report.
async fn run_workers(
    args: &BenchArgs,
    target: &Arc<Target>,
    requests_total: u64,
    acknowledged: &Arc<AtomicU64>,
    refused: &Arc<Refused>,
) -> WorkerResult {
    let next_request = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let target = target.clone();
        let next_request = next_request.clone();
        let acknowledged = acknowledged.clone();
        let refused = refused.clone();
        let batch = args.batch as u64;
        workers.push(tokio::spawn(async move {
            worker(&target, &next_request, requests_total, batch, &acknowledged, &refused).await
        }));
    }
    let mut merged = WorkerResult::default();
    for w in workers {
        let r = w.await.unwrap_or_else(|e| WorkerResult {
            errors: 1,
            first_error: Some(e.to_string()),
            ..Default::default()
        });
        merged.latencies_us.extend(r.latencies_us);
        merged.acknowledged_messages += r.acknowledged_messages;
        merged.errors += r.errors;
        merged.first_error = merged.first_error.or(r.first_error);
    }
    merged
}

/// Latency percentiles in milliseconds, each request's latency counted once per message in it.
struct LatencyPercentilesMs {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl LatencyPercentilesMs {
    fn per_message(latencies_us: &[u32], batch: usize) -> LatencyPercentilesMs {
        let mut per_message: Vec<u32> = Vec::with_capacity(latencies_us.len() * batch);
        for l in latencies_us {
            per_message.extend(std::iter::repeat_n(*l, batch));
        }
        per_message.sort_unstable();
        let pct = |p: f64| -> f64 {
            if per_message.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * per_message.len() as f64).ceil() as usize;
            per_message[rank.clamp(1, per_message.len()) - 1] as f64 / 1000.0
        };
        LatencyPercentilesMs { p50: pct(50.0), p90: pct(90.0), p99: pct(99.0), max: pct(100.0) }
    }
}

/// The result on stdout: three lines (four with errors), and with `--json` one JSON object last.
fn print_summary(merged: &WorkerResult, args: &BenchArgs, seconds: f64) {
    let LatencyPercentilesMs { p50, p90, p99, max } =
        LatencyPercentilesMs::per_message(&merged.latencies_us, args.batch);
    let messages = merged.acknowledged_messages;
    let rate = messages as f64 / seconds;
    let mb_per_second = rate * args.size as f64 / 1_000_000.0;

    println!("acknowledged:  {messages} messages in {seconds:.2} s");
    println!("throughput:    {rate:.0} msgs/s, {mb_per_second:.1} MB/s");
    println!("latency (ms):  p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
    if merged.errors > 0 {
        println!(
            "errors:        {} requests failed; first: {}",
            merged.errors,
            merged.first_error.as_deref().unwrap_or("?")
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "messages": messages,
                "seconds": seconds,
                "messages_per_second": rate,
                "mb_per_second": mb_per_second,
                "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "max": max},
                "errors": merged.errors,
            })
        );
    }
}

async fn worker(
    target: &Target,
    next_request: &AtomicU64,
    requests_total: u64,
    batch: u64,
    acknowledged: &AtomicU64,
    refused: &Refused,
) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut connection = None;
    while !refused.stopped() && next_request.fetch_add(1, Ordering::Relaxed) < requests_total {
        if connection.is_none() {
            match Connection::open(&target.authority).await {
                Ok(c) => connection = Some(c),
                Err(e) => {
                    result.errors += 1;
                    result.first_error.get_or_insert(format!("connect to {}: {e}", target.authority));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let c = connection.as_mut().expect("connected above");
        let sent = Instant::now();
        match c.exchange(&target.request).await {
            Ok(answer) => {
                if answer.status.is_success() {
                    result.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    result.acknowledged_messages += batch;
                    acknowledged.fetch_add(batch, Ordering::Relaxed);
                } else {
                    let status = answer.status;
                    result.errors += 1;
                    result
                        .first_error
                        .get_or_insert(format!("HTTP {status}: {}", String::from_utf8_lossy(&answer.body)));
                    if let Some(why) = refusal_advice(status, &target.size_hint) {
                        refused.refuse(format!("HTTP {status}: {why}"));
                    }
                }
                if answer.close {
                    connection = None;
                }
            }
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert(format!("request failed: {e}"));
                connection = None;
            }
        }
    }
    result
}

/// The most header lines an answer of the node may have.
const MAX_ANSWER_HEADERS: usize = 32;
/// The longest answer (head and body) read; the node's answers to writes are far smaller.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// One keep-alive HTTP/1.1 connection to the node, one request at a time.
struct Connection {
    stream: TcpStream,
    /// What was read of the current answer.
    buffer: BytesMut,
}

/// The node's answer to one request.
struct Answer {
    status: StatusCode,
    body: Bytes,
    /// The node closes the connection after this answer (`connection: close`).
    close: bool,
}

impl Connection {
    async fn open(authority: &str) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, buffer: BytesMut::with_capacity(4096) })
    }

    /// Sends `request` (head and body) and reads the answer, whose body must be framed by
    /// `content-length` (as all of the node's answers to writes are).
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<Answer> {
        use std::io::{Error, ErrorKind};
        self.stream.write_all(request).await?;
        self.buffer.clear();
        let (status, head_bytes, body_bytes, close) = loop {
            if self.buffer.len() >= MAX_ANSWER_BYTES {
                return Err(Error::new(ErrorKind::InvalidData, "the answer's head is too long"));
            }
            self.buffer.reserve(4096);
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "the node closed the connection"));
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
            let mut answer = httparse::Response::new(&mut headers);
            let head_bytes = match answer.parse(&self.buffer) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(Error::new(ErrorKind::InvalidData, format!("bad answer: {e}"))),
            };
            let header = |name: &str| {
                answer.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
            };
            let body_bytes = header("content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
                .filter(|length| *length <= MAX_ANSWER_BYTES)
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "an answer without a content-length"))?;
            let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
            let status = StatusCode::from_u16(answer.code.unwrap_or(0))
                .map_err(|_| Error::new(ErrorKind::InvalidData, "an answer without a valid status"))?;
            break (status, head_bytes, body_bytes, close);
        };
        while self.buffer.len() < head_bytes + body_bytes {
            self.buffer.reserve(head_bytes + body_bytes - self.buffer.len());
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the node closed the connection mid-answer",
                ));
            }
        }
        let body = Bytes::copy_from_slice(&self.buffer[head_bytes..head_bytes + body_bytes]);
        Ok(Answer { status, body, close })
    }
}
