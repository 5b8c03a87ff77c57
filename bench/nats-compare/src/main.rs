//! nats-compare: the NATS JetStream side of outpost's benchmark comparison.
//!
//! Publishes `--messages` messages of `--size` bytes to a file-storage stream with `--concurrency`
//! publishes in flight, waits for each JetStream publish ack, and prints the same figures as
//! `outpost bench`: msgs/s, MB/s and p50/p90/p99/max latency of acknowledged publishes
//! (`--json`: one JSON object on the last line with the same keys).
//!
//! Each worker publishes, awaits that publish's ack, then publishes its next message, so
//! `--concurrency` is the number of unacknowledged publishes at any time, exactly like the
//! in-flight requests of `outpost bench`. Workers share `--connections` NATS connections
//! (round-robin; default 1, which is how a NATS client is normally used).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Acknowledged JetStream publishes, measured like `outpost bench`")]
struct Args {
    /// NATS server, e.g. nats://127.0.0.1:14222 (never the system one on 4222 by accident).
    #[arg(long, default_value = "nats://127.0.0.1:14222")]
    url: String,
    /// Stream to (re)create; it is deleted first if it exists.
    #[arg(long, default_value = "BENCH")]
    stream: String,
    /// Subject the stream captures and the publishes go to.
    #[arg(long, default_value = "bench.messages")]
    subject: String,
    /// Messages to publish in total.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Publishes in flight (each waits for its ack before the worker publishes again).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// NATS connections the workers share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Stream storage: file (default; what outpost is compared with) or memory.
    #[arg(long, default_value = "file")]
    storage: String,
    /// Keep the stream after the run (default: delete it, freeing the disk).
    #[arg(long)]
    keep_stream: bool,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    acknowledged: u64,
    errors: u64,
    first_error: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.concurrency == 0 || args.messages == 0 || args.connections == 0 {
        eprintln!("error: --concurrency, --messages and --connections must be at least 1");
        return std::process::ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<std::process::ExitCode, async_nats::Error> {
    let storage = match args.storage.as_str() {
        "file" => stream::StorageType::File,
        "memory" => stream::StorageType::Memory,
        other => return Err(format!("--storage must be file or memory, not {other:?}").into()),
    };
    let mut contexts = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(&args.url)
            .await?;
        let ctx = jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_secs(30))
            // Never the limit: the workers themselves bound what is in flight.
            .max_ack_inflight(args.concurrency.max(1) + 16)
            .backpressure_on_inflight(true)
            .build(client);
        contexts.push(ctx);
    }
    let admin = contexts[0].clone();
    let _ = admin.delete_stream(&args.stream).await;
    let created = admin
        .create_stream(stream::Config {
            name: args.stream.clone(),
            subjects: vec![args.subject.clone()],
            storage,
            num_replicas: 1,
            ..Default::default()
        })
        .await?;
    let info = created.cached_info();
    eprintln!(
        "nats-compare: {} messages of {} B to stream {} ({:?} storage) at {} ({} in flight over {} connection(s))",
        args.messages, args.size, info.config.name, info.config.storage, args.url, args.concurrency, args.connections
    );

    let payload: Bytes = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>().into();
    let next = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let acknowledged = acknowledged.clone();
        let total = args.messages;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(2));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let done = acknowledged.load(Ordering::Relaxed);
                let rate = done as f64 / started.elapsed().as_secs_f64();
                eprintln!("  … {done}/{total} acknowledged ({rate:.0} msgs/s)");
            }
        })
    };

    let mut workers = Vec::with_capacity(args.concurrency);
    for w in 0..args.concurrency {
        let ctx = contexts[w % contexts.len()].clone();
        let subject = args.subject.clone();
        let payload = payload.clone();
        let next = next.clone();
        let acknowledged = acknowledged.clone();
        let total = args.messages;
        workers.push(tokio::spawn(async move {
            let mut r = WorkerResult::default();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let sent = Instant::now();
                let outcome = match ctx.publish(subject.clone(), payload.clone()).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => {
                        r.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        r.acknowledged += 1;
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(e);
                    }
                }
            }
            r
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
        merged.acknowledged += r.acknowledged;
        merged.errors += r.errors;
        merged.first_error = merged.first_error.or(r.first_error);
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();

    let mut lat = merged.latencies_us;
    lat.sort_unstable();
    // Same percentile definition as `outpost bench` (nearest rank).
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    let messages = merged.acknowledged;
    let rate = messages as f64 / seconds;
    let mb_per_second = rate * args.size as f64 / 1_000_000.0;
    let (p50, p90, p99, max) = (pct(50.0), pct(90.0), pct(99.0), pct(100.0));

    // The stream must hold what was acknowledged.
    let stored = match admin.get_stream(&args.stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    };

    println!("acknowledged:  {messages} messages in {seconds:.2} s (stream holds {stored})");
    println!("throughput:    {rate:.0} msgs/s, {mb_per_second:.1} MB/s");
    println!("latency (ms):  p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
    if merged.errors > 0 {
        println!(
            "errors:        {} publishes failed; first: {}",
            merged.errors,
            merged.first_error.as_deref().unwrap_or("?")
        );
    }
    if !args.keep_stream {
        let _ = admin.delete_stream(&args.stream).await;
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
                "stream_messages": stored,
            })
        );
    }
    Ok(if messages == 0 { std::process::ExitCode::from(1) } else { std::process::ExitCode::SUCCESS })
}
