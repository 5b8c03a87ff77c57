//! `outpost bench`: a load generator that measures acknowledged writes, so an operator can size
//! hardware. Each worker holds one keep-alive HTTP/1.1 connection and sends its next request only
//! after the previous one was acknowledged, so `--concurrency` is the number of writes in flight.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper_util::rt::TokioIo;

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
    /// `host:port` to connect to; also the `Host` header.
    authority: String,
    host: String,
    path: String,
    token: Option<String>,
    body: Bytes,
    content_type: &'static str,
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
    Target {
        host: authority.clone(),
        authority,
        path,
        token: args.token.clone(),
        body,
        content_type,
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
fn refusal_advice(status: hyper::StatusCode, args_hint: &str) -> Option<String> {
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
    let mut sender = None;
    while !refused.stopped() && next_request.fetch_add(1, Ordering::Relaxed) < requests_total {
        if sender.is_none() {
            match connect(&target.authority).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    result.errors += 1;
                    result.first_error.get_or_insert(format!("connect to {}: {e}", target.authority));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected above");
        let mut request = hyper::Request::post(&target.path)
            .header(header::HOST, &target.host)
            .header(header::CONTENT_TYPE, target.content_type);
        if let Some(token) = &target.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(target.body.clone())).expect("valid request");
        let sent = Instant::now();
        match s.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                if status.is_success() {
                    result.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    result.acknowledged_messages += batch;
                    acknowledged.fetch_add(batch, Ordering::Relaxed);
                } else {
                    result.errors += 1;
                    result
                        .first_error
                        .get_or_insert(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
                    if let Some(why) = refusal_advice(status, &target.size_hint) {
                        refused.refuse(format!("HTTP {status}: {why}"));
                    }
                }
            }
            Err(e) => {
                result.errors += 1;
                result.first_error.get_or_insert(format!("request failed: {e}"));
                sender = None;
            }
        }
    }
    result
}

async fn connect(authority: &str) -> std::io::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
