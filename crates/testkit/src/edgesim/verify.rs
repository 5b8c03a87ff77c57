//! The simulator's own check: reads every queue the simulated edges wrote back from the central
//! (`GET /v1/queues/{q}/messages`, pages of 1000) and checks, per (edge, queue), that the central
//! stored seqs 1, 2, 3… exactly once and in the edge's order, with the payload and id sent, and
//! everything the central acknowledged. Messages of other origins are skipped.
//!
//! Memory stays bounded by the number of (edge, queue) pairs: pages are checked as they arrive.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{frame, SimConfig, MAX_PROBLEMS_KEPT};

/// Queues read at the same time.
const PARALLEL_QUEUE_READS: usize = 4;
const PAGE_LIMIT: usize = 1000;
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the read-back found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verification {
    pub queues_read: usize,
    /// Every message in those queues, this run's or not.
    pub messages_read: u64,
    /// Messages of this run's edges.
    pub messages_checked: u64,
    pub pairs_checked: usize,
    /// A seq at or below one already seen for its (edge, queue): stored twice or out of order.
    pub repeated_or_reordered: u64,
    /// A seq more than one past the previous one of its (edge, queue).
    pub gaps: u64,
    /// Acknowledged by the central but not in its queue (summed over pairs).
    pub acknowledged_but_missing: u64,
    /// Stored but never generated, or from a (edge, queue) pair this run did not use.
    pub unexpected: u64,
    pub payload_mismatches: u64,
    /// Could not read a queue (every such queue's pairs count as missing too).
    pub read_failures: u64,
    pub seconds: f64,
    pub problem_samples: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.repeated_or_reordered == 0
            && self.gaps == 0
            && self.acknowledged_but_missing == 0
            && self.unexpected == 0
            && self.payload_mismatches == 0
            && self.read_failures == 0
    }

    fn problem(&mut self, text: String) {
        if self.problem_samples.len() < MAX_PROBLEMS_KEPT {
            self.problem_samples.push(text);
        }
    }

    fn add(&mut self, other: Verification) {
        self.queues_read += other.queues_read;
        self.messages_read += other.messages_read;
        self.messages_checked += other.messages_checked;
        self.pairs_checked += other.pairs_checked;
        self.repeated_or_reordered += other.repeated_or_reordered;
        self.gaps += other.gaps;
        self.acknowledged_but_missing += other.acknowledged_but_missing;
        self.unexpected += other.unexpected;
        self.payload_mismatches += other.payload_mismatches;
        self.read_failures += other.read_failures;
        for text in other.problem_samples {
            self.problem(text);
        }
    }
}

/// Per edge of one queue: (generated, acknowledged, highest seq seen so far).
struct Expected {
    generated: u64,
    acknowledged: u64,
    seen: u64,
}

#[derive(Deserialize)]
struct Page {
    messages: Vec<StoredMessage>,
    next_after_seq: u64,
}

#[derive(Deserialize)]
struct StoredMessage {
    id: String,
    seq: u64,
    origin: String,
    origin_seq: u64,
    content_type: String,
    payload_base64: String,
}

/// Reads back every queue of the run from the first central. `expected` is, per (edge, queue),
/// how many messages were generated and how many the central acknowledged.
pub(super) async fn verify(config: &SimConfig, expected: Vec<((String, String), u64, u64)>) -> Verification {
    let started = Instant::now();
    let mut by_queue: HashMap<String, HashMap<String, Expected>> = HashMap::new();
    for ((edge, queue), generated, acknowledged) in expected {
        by_queue.entry(queue).or_default().insert(edge, Expected { generated, acknowledged, seen: 0 });
    }
    for name in config.all_queue_names() {
        by_queue.entry(name).or_default();
    }
    let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
    let base = config.centrals[0].trim_end_matches('/').to_string();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(PARALLEL_QUEUE_READS));
    let mut reads = tokio::task::JoinSet::new();
    for (queue, edges) in by_queue {
        let (http, base, semaphore) = (http.clone(), base.clone(), semaphore.clone());
        let (edge_prefix, size, token) =
            (config.edge_prefix.clone(), config.payload_bytes, config.admin_token.clone());
        reads.spawn(async move {
            let _permit = semaphore.acquire().await.expect("the semaphore is never closed");
            verify_queue(&http, &base, token.as_deref(), &queue, edges, &edge_prefix, size).await
        });
    }
    let mut total = Verification::default();
    while let Some(joined) = reads.join_next().await {
        match joined {
            Ok(part) => total.add(part),
            Err(e) => {
                total.read_failures += 1;
                total.problem(format!("a queue read task failed: {e}"));
            }
        }
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

async fn verify_queue(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    queue: &str,
    mut edges: HashMap<String, Expected>,
    edge_prefix: &str,
    payload_bytes: usize,
) -> Verification {
    let mut found = Verification { queues_read: 1, pairs_checked: edges.len(), ..Verification::default() };
    let mut after_seq = 0u64;
    loop {
        let url = format!("{base}/v1/queues/{queue}/messages?after_seq={after_seq}&limit={PAGE_LIMIT}");
        let mut request = http.get(&url).timeout(PAGE_TIMEOUT);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let page = match request.send().await {
            Ok(response) if response.status() == reqwest::StatusCode::NOT_FOUND && after_seq == 0 => break,
            Ok(response) if response.status().is_success() => {
                response.json::<Page>().await.map_err(|e| e.to_string())
            }
            Ok(response) => Err(format!("answered {}", response.status())),
            Err(e) => Err(e.to_string()),
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                found.read_failures += 1;
                found.problem(format!("GET {url}: {e}"));
                return found;
            }
        };
        let Some(last) = page.messages.last() else { break };
        let last_seq = last.seq;
        if page.next_after_seq != last_seq || last_seq <= after_seq {
            found.read_failures += 1;
            found.problem(format!(
                "queue {queue}: a page after seq {after_seq} ends at seq {last_seq} with next_after_seq {}",
                page.next_after_seq
            ));
            return found;
        }
        check_messages(&mut found, &mut edges, queue, page.messages, edge_prefix, payload_bytes);
        after_seq = last_seq;
    }
    check_complete(&mut found, &edges, queue);
    found
}

/// Checks messages of `queue` in the order the central stores them against what each edge sent.
fn check_messages(
    found: &mut Verification,
    edges: &mut HashMap<String, Expected>,
    queue: &str,
    messages: Vec<StoredMessage>,
    edge_prefix: &str,
    payload_bytes: usize,
) {
    let base64 = base64::engine::general_purpose::STANDARD;
    for message in messages {
        found.messages_read += 1;
        if !message.origin.starts_with(edge_prefix) {
            continue;
        }
        found.messages_checked += 1;
        let Some(expected) = edges.get_mut(&message.origin) else {
            found.unexpected += 1;
            found.problem(format!(
                "queue {queue} seq {}: origin {} did not write this queue",
                message.seq, message.origin
            ));
            continue;
        };
        let seq = message.origin_seq;
        if seq <= expected.seen {
            found.repeated_or_reordered += 1;
            found.problem(format!(
                "queue {queue} seq {}: edge {} seq {seq} after its seq {} (stored twice or out of order)",
                message.seq, message.origin, expected.seen
            ));
            continue;
        }
        if seq > expected.seen + 1 {
            found.gaps += 1;
            found.problem(format!(
                "queue {queue} seq {}: edge {} seq {seq} follows its seq {}: {} missing",
                message.seq,
                message.origin,
                expected.seen,
                seq - expected.seen - 1
            ));
        }
        if seq > expected.generated {
            found.unexpected += 1;
            found.problem(format!(
                "queue {queue}: edge {} seq {seq} stored, but it generated only {}",
                message.origin, expected.generated
            ));
        }
        expected.seen = seq;
        let payload = base64.decode(message.payload_base64.as_bytes()).unwrap_or_default();
        if payload != frame::payload(&message.origin, queue, seq, payload_bytes)
            || message.id != frame::message_id(&message.origin, queue, seq)
            || message.content_type != frame::CONTENT_TYPE
        {
            found.payload_mismatches += 1;
            found.problem(format!(
                "queue {queue} seq {}: edge {} seq {seq} is not the message sent (id {}, {} payload bytes)",
                message.seq,
                message.origin,
                message.id,
                payload.len()
            ));
        }
    }
}

/// After the last page: everything acknowledged must have been seen.
fn check_complete(found: &mut Verification, edges: &HashMap<String, Expected>, queue: &str) {
    for (edge, expected) in edges {
        if expected.seen < expected.acknowledged {
            found.acknowledged_but_missing += expected.acknowledged - expected.seen;
            found.problem(format!(
                "queue {queue}: edge {edge}: the central acknowledged seq {} but stores only through {}",
                expected.acknowledged, expected.seen
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: u64, origin: &str, origin_seq: u64) -> StoredMessage {
        let payload = frame::payload(origin, "q", origin_seq, 64);
        StoredMessage {
            id: frame::message_id(origin, "q", origin_seq),
            seq,
            origin: origin.into(),
            origin_seq,
            content_type: frame::CONTENT_TYPE.into(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(payload),
        }
    }

    /// Runs the check over `messages` for edges `a` and `b` of run prefix `sim-` that each
    /// generated and had acknowledged 3 messages of queue `q`.
    fn check(messages: Vec<StoredMessage>) -> Verification {
        let mut edges: HashMap<String, Expected> = ["sim-a", "sim-b"]
            .into_iter()
            .map(|e| (e.to_string(), Expected { generated: 3, acknowledged: 3, seen: 0 }))
            .collect();
        let mut found = Verification::default();
        check_messages(&mut found, &mut edges, "q", messages, "sim-", 64);
        check_complete(&mut found, &edges, "q");
        found
    }

    #[test]
    fn interleaved_edges_each_in_order_pass() {
        let found = check(vec![
            stored(1, "sim-a", 1),
            stored(2, "sim-b", 1),
            stored(3, "other-edge", 7),
            stored(4, "sim-a", 2),
            stored(5, "sim-b", 2),
            stored(6, "sim-b", 3),
            stored(7, "sim-a", 3),
        ]);
        assert!(found.ok(), "{found:?}");
        assert_eq!((found.messages_read, found.messages_checked), (7, 6));
    }

    #[test]
    fn finds_duplicates_reordering_gaps_losses_and_foreign_payloads() {
        let all = |edge| (1..=3).map(move |s| stored(s, edge, s));
        let duplicate: Vec<_> = all("sim-a").chain([stored(9, "sim-a", 3)]).chain(all("sim-b")).collect();
        assert_eq!(check(duplicate).repeated_or_reordered, 1);

        let reordered = vec![stored(1, "sim-a", 2), stored(2, "sim-a", 1), stored(3, "sim-a", 3)]
            .into_iter()
            .chain(all("sim-b"))
            .collect();
        let found = check(reordered);
        assert!(found.gaps == 1 && found.repeated_or_reordered == 1, "{found:?}");

        let lost_middle =
            vec![stored(1, "sim-a", 1), stored(2, "sim-a", 3)].into_iter().chain(all("sim-b")).collect();
        assert_eq!(check(lost_middle).gaps, 1);

        let lost_tail = vec![stored(1, "sim-a", 1)].into_iter().chain(all("sim-b")).collect();
        assert_eq!(check(lost_tail).acknowledged_but_missing, 2);

        let mut wrong = stored(2, "sim-a", 2);
        wrong.payload_base64 =
            base64::engine::general_purpose::STANDARD.encode(frame::payload("sim-b", "q", 2, 64));
        let foreign = vec![stored(1, "sim-a", 1), wrong, stored(3, "sim-a", 3)]
            .into_iter()
            .chain(all("sim-b"))
            .collect();
        assert_eq!(check(foreign).payload_mismatches, 1);

        let beyond = all("sim-a")
            .chain([stored(9, "sim-a", 4)])
            .chain(all("sim-b"))
            .chain([stored(10, "sim-c", 1)])
            .collect();
        assert_eq!(check(beyond).unexpected, 2);
    }
}
