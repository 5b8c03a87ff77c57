//! rabbit-compare: the RabbitMQ side of outpost's benchmark comparison.
//!
//! Publishes `--messages` messages of `--size` bytes to a durable quorum queue
//! (`x-queue-type: quorum`, persistent delivery mode 2) through the default exchange, on channels
//! in publisher-confirm mode, and prints the same figures as `outpost bench` and `nats-compare`:
//! msgs/s, MB/s and p50/p90/p99/max latency from publish to confirm (`--json`: one JSON object on
//! the last line with the same keys). A quorum queue confirms a message once a majority of its
//! members have written it to their log and fsynced it, so every confirm here is durable (one
//! member on this machine: the local fsync).
//!
//! `--concurrency` publishers each own a channel (confirms are per channel); the channels share
//! `--connections` AMQP connections (round-robin; default 1). Two modes:
//! - `--window 1` (default, "single"): a publisher publishes, awaits that message's confirm, then
//!   publishes its next one, exactly like the in-flight requests of `outpost bench` and the
//!   workers of `nats-compare`;
//! - `--window W` ("windowed"): a publisher keeps up to W unconfirmed messages in flight and
//!   publishes the next one as soon as its oldest is confirmed (RabbitMQ confirms in order on a
//!   channel, often several at once with `multiple`), so `concurrency x W` messages are
//!   outstanding, like outpost's batch run with `concurrency` requests of W messages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

#[derive(Parser, Debug)]
#[command(about = "Confirmed publishes to a RabbitMQ quorum queue, measured like `outpost bench`")]
struct Args {
    /// AMQP URL of the broker (vhost "/" is %2f).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Quorum queue to (re)create; it is deleted first if it exists.
    #[arg(long, default_value = "outpost-bench")]
    queue: String,
    /// Messages to publish in total.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Publishers, each with its own channel in confirm mode.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Unconfirmed messages each publisher keeps in flight (1: wait for each confirm).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// AMQP connections the publishers' channels share.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Keep the queue after the run (default: delete it, freeing the disk).
    #[arg(long)]
    keep_queue: bool,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    confirmed: u64,
    errors: u64,
    first_error: Option<String>,
}

impl WorkerResult {
    fn outcome(&mut self, sent: Instant, outcome: Result<(), String>, confirmed: &AtomicU64) {
        match outcome {
            Ok(()) => {
                self.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                self.confirmed += 1;
                confirmed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.concurrency == 0 || args.messages == 0 || args.connections == 0 || args.window == 0 {
        eprintln!("error: --concurrency, --messages, --connections and --window must be at least 1");
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

fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

/// Awaits one publish's confirm: an ack is success, a nack (the broker could not store it) is not.
async fn confirm(pending: lapin::PublisherConfirm) -> Result<(), String> {
    match pending.await {
        Ok(c) if c.is_ack() => Ok(()),
        Ok(c) => Err(format!("not confirmed: {c:?}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn run(args: Args) -> Result<std::process::ExitCode, BoxError> {
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&args.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| format!("connecting to {} timed out after 5 s", args.url))??;
        connections.push(conn);
    }
    let admin = connections[0].create_channel().await?;
    // A queue of the same name with other arguments would make the declaration fail.
    let _ = admin.queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default()).await;
    let admin = if admin.status().connected() { admin } else { connections[0].create_channel().await? };
    admin
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            quorum_arguments(),
        )
        .await?;
    eprintln!(
        "rabbit-compare: {} messages of {} B to quorum queue {} at {} ({} publishers x {} in flight over {} connection(s))",
        args.messages,
        args.size,
        args.queue,
        args.url.rsplit('@').next().unwrap_or(&args.url),
        args.concurrency,
        args.window,
        args.connections
    );

    let mut channels: Vec<Channel> = Vec::with_capacity(args.concurrency);
    for p in 0..args.concurrency {
        let channel = connections[p % connections.len()].create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(channel);
    }

    let payload: Arc<[u8]> = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>().into();
    let next = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let confirmed = confirmed.clone();
        let total = args.messages;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(2));
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let done = confirmed.load(Ordering::Relaxed);
                let rate = done as f64 / started.elapsed().as_secs_f64();
                eprintln!("  … {done}/{total} confirmed ({rate:.0} msgs/s)");
            }
        })
    };

    let mut workers = Vec::with_capacity(args.concurrency);
    for channel in channels {
        let queue = args.queue.clone();
        let payload = payload.clone();
        let next = next.clone();
        let confirmed = confirmed.clone();
        let total = args.messages;
        let window = args.window;
        workers.push(tokio::spawn(async move {
            let mut r = WorkerResult::default();
            let properties = BasicProperties::default().with_delivery_mode(2);
            let mut in_flight: VecDeque<(Instant, lapin::PublisherConfirm)> = VecDeque::with_capacity(window);
            while next.fetch_add(1, Ordering::Relaxed) < total {
                if in_flight.len() == window {
                    let (sent, pending) = in_flight.pop_front().expect("window is not empty");
                    r.outcome(sent, confirm(pending).await, &confirmed);
                }
                let sent = Instant::now();
                let published = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        properties.clone(),
                    )
                    .await;
                match published {
                    Ok(pending) if window == 1 => r.outcome(sent, confirm(pending).await, &confirmed),
                    Ok(pending) => in_flight.push_back((sent, pending)),
                    Err(e) => r.outcome(sent, Err(e.to_string()), &confirmed),
                }
            }
            while let Some((sent, pending)) = in_flight.pop_front() {
                r.outcome(sent, confirm(pending).await, &confirmed);
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
        merged.confirmed += r.confirmed;
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
    let messages = merged.confirmed;
    let rate = messages as f64 / seconds;
    let mb_per_second = rate * args.size as f64 / 1_000_000.0;
    let (p50, p90, p99, max) = (pct(50.0), pct(90.0), pct(99.0), pct(100.0));

    // The queue must hold what was confirmed (a passive declare returns its message count).
    let stored = match admin
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
    {
        Ok(q) => u64::from(q.message_count()),
        Err(_) => 0,
    };

    println!("confirmed:     {messages} messages in {seconds:.2} s (queue holds {stored})");
    println!("throughput:    {rate:.0} msgs/s, {mb_per_second:.1} MB/s");
    println!("latency (ms):  p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
    if merged.errors > 0 {
        println!(
            "errors:        {} publishes failed; first: {}",
            merged.errors,
            merged.first_error.as_deref().unwrap_or("?")
        );
    }
    if !args.keep_queue {
        let _ = admin.queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for conn in connections {
        let _ = conn.close(200, "done".into()).await;
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
                "queue_messages": stored,
                "publishers": args.concurrency,
                "window": args.window,
            })
        );
    }
    Ok(if messages == 0 { std::process::ExitCode::from(1) } else { std::process::ExitCode::SUCCESS })
}
