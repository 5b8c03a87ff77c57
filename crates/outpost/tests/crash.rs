//! Guarantee 1, durable acknowledgement, against the real binary: an edge under concurrent load
//! (single messages, NDJSON batches, idempotency keys, three queues) is killed with SIGKILL at a
//! random moment, restarted on the same data directory, and every message it acknowledged must be
//! there with the same seq, id and payload; seqs stay gapless, nothing is stored twice, nothing
//! appears that no client sent, and what was stored before stays as it was. Repeated over several
//! kill/restart cycles, with writes continuing after each restart. A client that retries an
//! idempotency key after the restart gets the original id and seq.
//!
//! The kill point is random; the seed is printed so a failure can be replayed with
//! `OUTPOST_TEST_SEED=<seed> cargo test -p outpost --test crash`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::{wait_until, Accepted, Client, Node, Rng, StoredMessage};

const OUTPOST: &str = env!("CARGO_BIN_EXE_outpost");
const QUEUES: [&str; 3] = ["crash-a", "crash-b", "crash-c"];
/// Concurrent clients while the node is killed.
const CLIENT_TASKS: usize = 40;
/// Clients `0..KEYED_TASKS` send every message with an `Idempotency-Key`.
const KEYED_TASKS: usize = 8;
/// Of the other clients' writes, this share are NDJSON batches of 2..=MAX_BATCH_LINES lines.
const BATCH_PERCENT: u64 = 15;
const MAX_BATCH_LINES: u64 = 20;
const KILL_CYCLES: usize = 6;
/// The node is killed this long (random, in ms) after the cycle's first acknowledgement.
const KILL_AFTER_MS: (u64, u64) = (100, 800);
/// How long clients may take to notice that the node died.
const CLIENTS_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A write the node acknowledged (202): where it must be and what it must hold.
#[derive(Clone, PartialEq)]
struct Acked {
    queue: &'static str,
    seq: u64,
    /// Known for single messages; a batch's answer names no ids.
    id: Option<String>,
    payload: Vec<u8>,
    /// As sent; `None` when the node chose (no header, or a batch).
    content_type: Option<String>,
}

impl std::fmt::Debug for Acked {
    // The payload shortened: its tag says which client wrote it when.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.payload[..self.payload.len().min(48)];
        f.debug_struct("Acked")
            .field("queue", &self.queue)
            .field("seq", &self.seq)
            .field("id", &self.id)
            .field("payload", &format!("{} bytes: {:?}…", self.payload.len(), String::from_utf8_lossy(shown)))
            .field("content_type", &self.content_type)
            .finish()
    }
}

/// A write sent with an idempotency key, and the answer to its first attempt (`None`: the
/// request was in flight when the node was killed).
#[derive(Clone, Debug)]
struct KeyedWrite {
    queue: &'static str,
    key: String,
    payload: Vec<u8>,
    answer: Option<Accepted>,
}

#[derive(Default)]
struct ClientOutcome {
    acked: Vec<Acked>,
    keyed: Vec<KeyedWrite>,
    /// Every payload sent, answered or not, by queue.
    sent: Vec<(&'static str, Vec<u8>)>,
}

/// What the node must hold, built from what clients were told.
#[derive(Default)]
struct Expected {
    acked: BTreeMap<&'static str, BTreeMap<u64, Acked>>,
    sent: HashMap<&'static str, HashSet<Vec<u8>>>,
    /// Each queue as read at the previous check: a later check must find it unchanged.
    stored_at_last_check: HashMap<&'static str, Vec<StoredMessage>>,
}

impl Expected {
    fn acknowledge(&mut self, acked: Acked) {
        let queue = self.acked.entry(acked.queue).or_default();
        if let Some(earlier) = queue.get(&acked.seq) {
            assert_eq!(
                (earlier.id.as_ref(), &earlier.payload),
                (acked.id.as_ref(), &acked.payload),
                "queue {}: seq {} was acknowledged for two different writes",
                acked.queue,
                acked.seq
            );
        }
        queue.insert(acked.seq, acked);
    }

    fn acked_count(&self) -> usize {
        self.acked.values().map(BTreeMap::len).sum()
    }

    /// Reads every queue and checks it against everything acknowledged and sent so far.
    async fn check(&mut self, client: &Client, when: &str) -> usize {
        let listing = client.queues().await;
        let mut ids = HashSet::new();
        let mut stored_total = 0;
        for queue in QUEUES {
            let stored = client.read_all(queue).await;
            stored_total += stored.len();
            for (i, message) in stored.iter().enumerate() {
                assert_eq!(
                    message.seq,
                    i as u64 + 1,
                    "{when}: queue {queue}: seqs must be 1..=last without a gap"
                );
                assert!(ids.insert(message.id.clone()), "{when}: id {} stored twice", message.id);
            }
            let listed = listing.iter().find(|q| q.name == queue);
            let (listed_messages, listed_last_seq) = listed.map_or((0, 0), |q| (q.messages, q.last_seq));
            assert_eq!(
                (listed_messages, listed_last_seq),
                (stored.len() as u64, stored.len() as u64),
                "{when}: queue {queue}: GET /v1/queues disagrees with the messages read"
            );

            for earlier in self.stored_at_last_check.get(queue).into_iter().flatten() {
                let now = stored.get(earlier.seq as usize - 1);
                assert_eq!(
                    now,
                    Some(earlier),
                    "{when}: queue {queue}: seq {} changed since the last check",
                    earlier.seq
                );
            }
            for acked in self.acked.get(queue).into_iter().flat_map(BTreeMap::values) {
                let message = stored.get(acked.seq as usize - 1).unwrap_or_else(|| {
                    panic!(
                        "{when}: queue {queue}: acknowledged seq {} is missing (the queue ends at {}): {acked:?}",
                        acked.seq,
                        stored.len()
                    )
                });
                assert_eq!(
                    message.payload, acked.payload,
                    "{when}: queue {queue} seq {}: payload",
                    acked.seq
                );
                if let Some(id) = &acked.id {
                    assert_eq!(&message.id, id, "{when}: queue {queue} seq {}: id", acked.seq);
                }
                if let Some(content_type) = &acked.content_type {
                    assert_eq!(
                        &message.content_type, content_type,
                        "{when}: queue {queue} seq {}",
                        acked.seq
                    );
                }
            }
            let sent = self.sent.get(queue).cloned().unwrap_or_default();
            let mut seen = HashSet::new();
            for message in &stored {
                assert!(
                    sent.contains(&message.payload),
                    "{when}: queue {queue} seq {}: no client sent this",
                    message.seq
                );
                assert!(
                    seen.insert(&message.payload),
                    "{when}: queue {queue} seq {}: payload stored twice",
                    message.seq
                );
            }
            self.stored_at_last_check.insert(queue, stored);
        }
        stored_total
    }
}

/// One client: writes until the node stops answering, then reports what it was told.
async fn run_client(
    client: Client,
    cycle: usize,
    task: usize,
    mut rng: Rng,
    acks: Arc<AtomicU64>,
) -> ClientOutcome {
    let mut outcome = ClientOutcome::default();
    for n in 0.. {
        let queue = QUEUES[rng.index(QUEUES.len())];
        // Unique per write, so a payload found twice is a duplicate, never a coincidence.
        let tag = format!("cycle {cycle} client {task} write {n}");
        if task < KEYED_TASKS {
            let mut payload = tag.clone().into_bytes();
            let padding_bytes = rng.between(0, 300) as usize;
            payload.extend(rng.bytes(padding_bytes));
            let key = format!("key {tag}");
            outcome.sent.push((queue, payload.clone()));
            let mut write = KeyedWrite { queue, key, payload, answer: None };
            match client.post_message_with(queue, write.payload.clone(), None, Some(&write.key)).await {
                Ok(r) if r.status == 202 => {
                    let accepted = r.accepted();
                    outcome.acked.push(Acked {
                        queue,
                        seq: accepted.seq,
                        id: Some(accepted.id.clone()),
                        payload: write.payload.clone(),
                        content_type: None,
                    });
                    write.answer = Some(accepted);
                    acks.fetch_add(1, Ordering::Relaxed);
                    outcome.keyed.push(write);
                }
                Ok(r) => panic!("client {task}: unexpected {} to a keyed write: {}", r.status, r.text()),
                Err(_) => {
                    outcome.keyed.push(write);
                    return outcome;
                }
            }
        } else if rng.percent(BATCH_PERCENT) {
            let lines: Vec<Vec<u8>> = (0..rng.between(2, MAX_BATCH_LINES))
                .map(|line| {
                    let padding: String =
                        (0..rng.between(0, 8)).map(|_| format!("{:016x}", rng.next_u64())).collect();
                    format!("{{\"tag\":\"{tag} line {line}\",\"padding\":\"{padding}\"}}").into_bytes()
                })
                .collect();
            outcome.sent.extend(lines.iter().map(|line| (queue, line.clone())));
            match client.post_batch(queue, &lines).await {
                Ok(r) if r.status == 202 => {
                    let batch = r.batch_accepted();
                    assert_eq!(batch.count, lines.len() as u64, "client {task}: batch count");
                    assert_eq!(
                        batch.last_seq + 1 - batch.first_seq,
                        batch.count,
                        "client {task}: batch seqs"
                    );
                    for (i, line) in lines.into_iter().enumerate() {
                        outcome.acked.push(Acked {
                            queue,
                            seq: batch.first_seq + i as u64,
                            id: None,
                            payload: line,
                            content_type: None,
                        });
                    }
                    acks.fetch_add(batch.count, Ordering::Relaxed);
                }
                Ok(r) => panic!("client {task}: unexpected {} to a batch: {}", r.status, r.text()),
                Err(_) => return outcome,
            }
        } else {
            let mut payload = tag.into_bytes();
            // Mostly small, sometimes large: every check reads back everything stored so far.
            let padding_bytes =
                if rng.percent(2) { rng.between(1024, 8192) } else { rng.between(0, 256) } as usize;
            payload.extend(rng.bytes(padding_bytes));
            let content_type = rng.percent(50).then(|| format!("application/x-client-{task}"));
            outcome.sent.push((queue, payload.clone()));
            match client.post_message_with(queue, payload.clone(), content_type.as_deref(), None).await {
                Ok(r) if r.status == 202 => {
                    let accepted = r.accepted();
                    assert_eq!(accepted.queue, queue);
                    outcome.acked.push(Acked {
                        queue,
                        seq: accepted.seq,
                        id: Some(accepted.id),
                        payload,
                        content_type,
                    });
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => panic!("client {task}: unexpected {} to a write: {}", r.status, r.text()),
                Err(_) => return outcome,
            }
        }
    }
    unreachable!("the loop ends when the node stops answering")
}

/// Sends each keyed write again with the same key and payload. A write acknowledged before must
/// get 200 with its original id and seq; one whose first attempt got no answer gets 200 (it had
/// been committed) or 202 (it had not), and is acknowledged now either way.
async fn retry_keyed(
    client: &Client,
    writes: Vec<KeyedWrite>,
    expected: &mut Expected,
    when: &str,
) -> Vec<KeyedWrite> {
    let mut chunks: Vec<Vec<KeyedWrite>> = vec![Vec::new(); KEYED_TASKS * 2];
    for (i, write) in writes.into_iter().enumerate() {
        chunks[i % (KEYED_TASKS * 2)].push(write);
    }
    let mut retriers = Vec::new();
    for chunk in chunks {
        let client = client.clone();
        let when = when.to_string();
        retriers.push(tokio::spawn(async move {
            let mut done = Vec::with_capacity(chunk.len());
            for mut write in chunk {
                let r = client
                    .post_message_with(write.queue, write.payload.clone(), None, Some(&write.key))
                    .await
                    .unwrap_or_else(|e| panic!("{when}: retrying key {:?}: {e}", write.key));
                match &write.answer {
                    Some(original) => {
                        assert_eq!(
                            r.status,
                            200,
                            "{when}: retry of acknowledged key {:?}: {}",
                            write.key,
                            r.text()
                        );
                        assert_eq!(&r.accepted(), original, "{when}: retry of key {:?}", write.key);
                    }
                    None => {
                        assert!(
                            r.status == 200 || r.status == 202,
                            "{when}: retry of in-flight key {:?}: {} {}",
                            write.key,
                            r.status,
                            r.text()
                        );
                        write.answer = Some(r.accepted());
                    }
                }
                done.push(write);
            }
            done
        }));
    }
    let mut all = Vec::new();
    for retrier in retriers {
        for write in retrier.await.expect("a retrier panicked") {
            let answer = write.answer.clone().expect("answered");
            expected.acknowledge(Acked {
                queue: write.queue,
                seq: answer.seq,
                id: Some(answer.id),
                payload: write.payload.clone(),
                content_type: None,
            });
            all.push(write);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_concurrent_load_loses_no_acknowledged_message() {
    let started = Instant::now();
    let mut rng = Rng::from_env_or_time("kill_9_under_concurrent_load");
    let mut node = Node::builder(OUTPOST).start().await;
    let mut expected = Expected::default();
    let mut keyed_so_far: Vec<KeyedWrite> = Vec::new();

    for cycle in 1..=KILL_CYCLES {
        let client = node.client();
        let acks = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..CLIENT_TASKS)
            .map(|task| tokio::spawn(run_client(client.clone(), cycle, task, rng.fork(), acks.clone())))
            .collect();

        // Kill under load: once writes are being acknowledged, at a random moment.
        wait_until(Duration::from_secs(30), "the first acknowledgement of the cycle", || {
            acks.load(Ordering::Relaxed) > 0
        })
        .await;
        let kill_after = Duration::from_millis(rng.between(KILL_AFTER_MS.0, KILL_AFTER_MS.1));
        tokio::time::sleep(kill_after).await;
        node.kill9();

        let mut outcomes = Vec::new();
        for handle in clients {
            let outcome = tokio::time::timeout(CLIENTS_STOP_TIMEOUT, handle)
                .await
                .expect("a client did not notice the kill")
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
            outcomes.push(outcome);
        }
        let mut keyed_this_cycle = Vec::new();
        let mut in_flight = 0;
        for outcome in outcomes {
            for (queue, payload) in outcome.sent {
                expected.sent.entry(queue).or_default().insert(payload);
            }
            for acked in outcome.acked {
                expected.acknowledge(acked);
            }
            in_flight += outcome.keyed.iter().filter(|w| w.answer.is_none()).count();
            keyed_this_cycle.extend(outcome.keyed);
        }
        let acked_in_cycle = acks.load(Ordering::Relaxed);

        let restart_began = Instant::now();
        node.restart().await;
        let restart_took = restart_began.elapsed();
        let when = format!("after kill #{cycle}");
        let check_began = Instant::now();
        let stored = expected.check(&node.client(), &when).await;
        let check_took = check_began.elapsed();
        let survivors = stored - expected.acked_count();
        keyed_so_far.extend(retry_keyed(&node.client(), keyed_this_cycle, &mut expected, &when).await);
        eprintln!(
            "kill #{cycle}: {kill_after:?} into the load, {acked_in_cycle} writes acknowledged in the cycle, \
             {} in all, {stored} stored ({survivors} unacknowledged survivors), {in_flight} keyed writes in flight retried; \
             restart took {restart_took:?}, the check {check_took:?}",
            expected.acked_count(),
        );
    }

    // Every key ever acknowledged still answers with its original id and seq.
    let total_keys = keyed_so_far.len();
    retry_keyed(&node.client(), keyed_so_far, &mut expected, "final retry of every key").await;
    let stored = expected.check(&node.client(), "at the end").await;
    eprintln!(
        "{KILL_CYCLES} kills, {stored} messages stored, {} acknowledged, {total_keys} keys retried, in {:?}",
        expected.acked_count(),
        started.elapsed()
    );
}
