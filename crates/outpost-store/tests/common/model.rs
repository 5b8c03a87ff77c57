//! The store model property test, shared by both backends: random appends (with idempotency keys
//! and a small quota), edge batches (the central's dedup by origin position), an edge's releases
//! without forwarding (the position moved, the queue created), cursors and the
//! release they allow, failed messages (fail, resubmit, fail again, remove), reads, clean reopens
//! and crash reopens (the store dropped without a shutdown), each applied to the store and to a
//! plain in-memory model, answers compared after every step.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use outpost_core::wire::BatchMessage;
use outpost_store::{
    FailedQuery, FailedSelector, FailedStatus, NewFailure, NewMessage, ResubmitOutcome, Store, StoreError,
    StoreOptions, IDEMPOTENCY_KEY_OVERHEAD_BYTES,
};
use proptest::prelude::*;

pub const QUOTA_BYTES: u64 = 4_000;
pub const QUEUES: [&str; 3] = ["orders", "sales.v2", "x-y_z"];
/// The readers of a queue in `READERS[..required_readers(queue)]` must pass a message before it is
/// released: one for `orders`, both for `sales.v2`, none for `x-y_z` (it keeps everything).
pub const READERS: [&str; 2] = ["route:r", "route:s"];
const EDGES: [&str; 2] = ["edge-1", "edge-2"];
const NODE: &str = "node-a";

fn required_readers(queue: &str) -> &'static [&'static str] {
    match queue {
        "orders" => &READERS[..1],
        "sales.v2" => &READERS[..],
        _ => &[],
    }
}

/// The options both backends' stores of the model test are opened with.
pub fn options() -> StoreOptions {
    StoreOptions {
        readers_of: Arc::new(|queue| required_readers(queue).iter().map(|r| r.to_string()).collect()),
        ..StoreOptions::keep_everything(QUOTA_BYTES, NODE)
    }
}

#[derive(Debug, Clone)]
pub enum Action {
    Append {
        queue: usize,
        sizes: Vec<usize>,
        key: Option<u8>,
    },
    /// An edge's batch starting `offset - 2` after its position (duplicates, exact, or a gap);
    /// a size of 0 is a skip entry.
    AppendFromOrigin {
        queue: usize,
        edge: usize,
        offset: u64,
        sizes: Vec<usize>,
    },
    /// The edge released through `delta - 1` past its position without forwarding (back, in
    /// place, or on), as a central records at the edge's handshake.
    ReleaseFromOrigin {
        queue: usize,
        edge: usize,
        delta: u64,
    },
    /// Moves a reader's cursor to `delta - 1` past where it is (back, in place, or on; past the
    /// queue's end is refused).
    AdvanceCursor {
        queue: usize,
        reader: usize,
        delta: u64,
    },
    /// Route `r` gives up on the next message after its cursor.
    Fail {
        queue: usize,
    },
    /// By route, or by ids picked among those handed out (plus one unknown id when `unknown`).
    Resubmit {
        by_route: bool,
        picks: Vec<usize>,
        unknown: bool,
    },
    FailAgain {
        pick: usize,
    },
    Remove {
        pick: usize,
    },
    Read {
        queue: usize,
        after_seq: u64,
        limit: usize,
    },
    Reopen,
    CrashReopen,
}

pub fn action() -> impl Strategy<Value = Action> {
    let queue = 0..QUEUES.len();
    prop_oneof![
        6 => (queue.clone(), prop::collection::vec(1usize..700, 1..5), prop::option::of(0u8..4))
            .prop_map(|(queue, sizes, key)| Action::Append { queue, sizes, key }),
        4 => (queue.clone(), 0..EDGES.len(), 0u64..4, prop::collection::vec(0usize..500, 1..5))
            .prop_map(|(queue, edge, offset, sizes)| Action::AppendFromOrigin { queue, edge, offset, sizes }),
        2 => (queue.clone(), 0..EDGES.len(), 0u64..4)
            .prop_map(|(queue, edge, delta)| Action::ReleaseFromOrigin { queue, edge, delta }),
        4 => (queue.clone(), 0..READERS.len(), 0u64..5)
            .prop_map(|(queue, reader, delta)| Action::AdvanceCursor { queue, reader, delta }),
        2 => queue.clone().prop_map(|queue| Action::Fail { queue }),
        1 => (any::<bool>(), prop::collection::vec(0usize..8, 0..3), any::<bool>())
            .prop_map(|(by_route, picks, unknown)| Action::Resubmit { by_route, picks, unknown }),
        1 => (0usize..8).prop_map(|pick| Action::FailAgain { pick }),
        1 => (0usize..8).prop_map(|pick| Action::Remove { pick }),
        2 => (queue, 0u64..12, 1usize..8).prop_map(|(queue, after_seq, limit)| Action::Read { queue, after_seq, limit }),
        1 => Just(Action::Reopen),
        1 => Just(Action::CrashReopen),
    ]
}

/// A stored message as the model knows it.
#[derive(Debug, Clone, PartialEq)]
struct Message {
    seq: u64,
    id: String,
    origin: String,
    origin_seq: u64,
    payload: Bytes,
}

#[derive(Default)]
struct Queue {
    last_seq: u64,
    messages: Vec<Message>,
}

impl Queue {
    fn first_seq(&self) -> u64 {
        self.messages.first().map_or(self.last_seq + 1, |m| m.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    queue: String,
    seq: u64,
    message_id: String,
    payload: Bytes,
    attempts: u32,
    status: FailedStatus,
}

#[derive(Default)]
struct Model {
    queues: HashMap<String, Queue>,
    keys: HashMap<(String, u8), (u64, String)>,
    /// What counts against the quota: stored payloads, remembered keys and failed copies.
    bytes: u64,
    cursors: HashMap<(String, String), u64>,
    positions: HashMap<(String, String), u64>,
    failed: BTreeMap<i64, Entry>,
    /// Every failed id handed out, removed ones too.
    failed_ids: Vec<i64>,
}

impl Model {
    fn cursor(&self, queue: &str, reader: &str) -> u64 {
        self.cursors.get(&(queue.to_string(), reader.to_string())).copied().unwrap_or(0)
    }

    /// Releases the prefix of `queue` every required reader has passed.
    fn release(&mut self, queue: &str) {
        let Some(through) = required_readers(queue).iter().map(|r| self.cursor(queue, r)).min() else {
            return;
        };
        let log = self.queues.get_mut(queue).expect("a cursor moves only in an existing queue");
        let released: u64 =
            log.messages.iter().filter(|m| m.seq <= through).map(|m| m.payload.len() as u64).sum();
        log.messages.retain(|m| m.seq > through);
        self.bytes -= released;
    }

    fn store(&mut self, queue: &str, message: Message) {
        self.bytes += message.payload.len() as u64;
        let log = self.queues.entry(queue.to_string()).or_default();
        log.last_seq = message.seq;
        log.messages.push(message);
    }
}

fn payload(counter: &mut u32, size: usize) -> Bytes {
    *counter += 1;
    let mut bytes = format!("{counter}:").into_bytes();
    bytes.resize(size.max(bytes.len()), b'p');
    Bytes::from(bytes)
}

fn pick(ids: &[i64], pick: usize) -> Option<i64> {
    (!ids.is_empty()).then(|| ids[pick % ids.len()])
}

/// Runs `actions` against a store from `open` (called again for every reopen) and the model,
/// checking every answer and the store's views after every step.
pub async fn run_case<F, Fut>(actions: Vec<Action>, mut open: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Store>,
{
    let mut store = open().await;
    let mut model = Model::default();
    let mut counter = 0u32;
    for action in actions {
        match action {
            Action::Append { queue, sizes, key } => {
                append(&store, &mut model, &mut counter, QUEUES[queue], &sizes, key).await
            }
            Action::AppendFromOrigin { queue, edge, offset, sizes } => {
                append_from_origin(
                    &store,
                    &mut model,
                    &mut counter,
                    QUEUES[queue],
                    EDGES[edge],
                    offset,
                    &sizes,
                )
                .await
            }
            Action::ReleaseFromOrigin { queue, edge, delta } => {
                release_from_origin(&store, &mut model, QUEUES[queue], EDGES[edge], delta).await
            }
            Action::AdvanceCursor { queue, reader, delta } => {
                let (queue, reader) = (QUEUES[queue], READERS[reader]);
                let acked_seq = (model.cursor(queue, reader) + delta).saturating_sub(1);
                let result = store.advance_cursor(queue, reader, acked_seq).await;
                match model.queues.get(queue) {
                    Some(log) if acked_seq <= log.last_seq => {
                        result.unwrap();
                        let cursor =
                            model.cursors.entry((queue.to_string(), reader.to_string())).or_insert(0);
                        *cursor = (*cursor).max(acked_seq);
                        model.release(queue);
                    }
                    _ => assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}"),
                }
            }
            Action::Fail { queue } => fail(&store, &mut model, QUEUES[queue]).await,
            Action::Resubmit { by_route, picks, unknown } => {
                resubmit(&store, &mut model, by_route, &picks, unknown).await
            }
            Action::FailAgain { pick: index } => {
                let Some(id) = pick(&model.failed_ids, index) else { continue };
                let changed =
                    store.fail_again(id, 2, "max_attempts: http:500".into(), "http:500".into()).await;
                let entry = model.failed.get_mut(&id);
                assert_eq!(changed.unwrap(), entry.is_some(), "fail_again({id})");
                if let Some(entry) = entry {
                    entry.attempts += 2;
                    entry.status = FailedStatus::Failed;
                }
            }
            Action::Remove { pick: index } => {
                let Some(id) = pick(&model.failed_ids, index) else { continue };
                let removed = model.failed.remove(&id);
                assert_eq!(store.remove_failed(id).await.unwrap(), removed.is_some(), "remove_failed({id})");
                model.bytes -= removed.map_or(0, |entry| entry.payload.len() as u64);
            }
            Action::Read { queue, after_seq, limit } => {
                let queue = QUEUES[queue];
                let got = store.read(queue, after_seq, limit).await.unwrap();
                let want: Vec<Message> = model.queues.get(queue).map_or_else(Vec::new, |log| {
                    log.messages.iter().filter(|m| m.seq > after_seq).take(limit).cloned().collect()
                });
                assert_eq!(
                    got.into_iter().map(as_model).collect::<Vec<_>>(),
                    want,
                    "read {queue} after {after_seq}"
                );
            }
            Action::Reopen => {
                store.shutdown().await;
                drop(store);
                store = open().await;
            }
            Action::CrashReopen => {
                // No shutdown: whatever was acknowledged must be there after the next open.
                drop(store);
                store = open().await;
            }
        }
        check_views(&store, &model).await;
    }
    store.shutdown().await;
}

fn as_model(m: outpost_store::StoredMessage) -> Message {
    Message { seq: m.seq, id: m.id, origin: m.origin, origin_seq: m.origin_seq, payload: m.payload }
}

async fn append(
    store: &Store,
    model: &mut Model,
    counter: &mut u32,
    queue: &str,
    sizes: &[usize],
    key: Option<u8>,
) {
    let messages: Vec<NewMessage> = sizes
        .iter()
        .map(|&size| NewMessage {
            payload: payload(counter, size),
            content_type: "text/plain".into(),
            origin: None,
            id: None,
        })
        .collect();
    let needed: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
    let key_text = key.map(|k| format!("key-{k}"));
    // Remembered keys count against the quota too.
    let key_bytes = key_text.as_ref().map_or(0, |text| text.len() as u64 + IDEMPOTENCY_KEY_OVERHEAD_BYTES);
    let result = store.append(queue, messages.clone(), key_text).await;
    if let Some((seq, id)) = key.and_then(|k| model.keys.get(&(queue.to_string(), k))) {
        let appended = result.unwrap();
        assert!(appended.duplicate);
        assert_eq!((appended.first_seq, appended.ids[0].as_str()), (*seq, id.as_str()));
    } else if model.bytes + needed + key_bytes > QUOTA_BYTES {
        assert!(matches!(result, Err(StoreError::QuotaReached { .. })), "{result:?}");
    } else {
        let appended = result.unwrap();
        let expected_first = model.queues.get(queue).map_or(0, |log| log.last_seq) + 1;
        assert!(!appended.duplicate);
        assert_eq!(appended.first_seq, expected_first);
        assert_eq!(appended.last_seq, expected_first + messages.len() as u64 - 1);
        for (i, m) in messages.iter().enumerate() {
            let seq = expected_first + i as u64;
            let message = Message {
                seq,
                id: appended.ids[i].clone(),
                origin: NODE.into(),
                origin_seq: seq,
                payload: m.payload.clone(),
            };
            model.store(queue, message);
        }
        if let Some(k) = key {
            model.keys.insert((queue.to_string(), k), (expected_first, appended.ids[0].clone()));
        }
        model.bytes += key_bytes;
    }
}

async fn append_from_origin(
    store: &Store,
    model: &mut Model,
    counter: &mut u32,
    queue: &str,
    edge: &str,
    offset: u64,
    sizes: &[usize],
) {
    let key = (edge.to_string(), queue.to_string());
    let position = model.positions.get(&key).copied().unwrap_or(0);
    let start = (position + 1 + offset).saturating_sub(2).max(1);
    let batch: Vec<BatchMessage> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let seq = start + i as u64;
            let id = format!("{edge}-{seq}");
            match size {
                0 => BatchMessage::skip(seq, id),
                _ => BatchMessage {
                    seq,
                    id,
                    content_type: "text/plain".into(),
                    payload: payload(counter, size),
                },
            }
        })
        .collect();
    let result = store.append_from_origin(queue, edge, batch.clone()).await;
    let fresh: Vec<&BatchMessage> = batch.iter().filter(|m| m.seq > position).collect();
    let duplicates = (batch.len() - fresh.len()) as u64;
    let needed: u64 = fresh.iter().map(|m| m.payload.len() as u64).sum();
    match fresh.first() {
        None => {
            let answer = result.unwrap();
            assert_eq!((answer.stored_through, answer.stored, answer.duplicates), (position, 0, duplicates));
            assert_eq!(answer.gap_expected_seq, None);
        }
        Some(first) if first.seq != position + 1 => {
            let answer = result.unwrap();
            assert_eq!((answer.stored_through, answer.stored), (position, 0));
            assert_eq!(answer.gap_expected_seq, Some(position + 1));
        }
        Some(_) if model.bytes + needed > QUOTA_BYTES => {
            assert!(matches!(result, Err(StoreError::QuotaReached { .. })), "{result:?}");
        }
        Some(_) => {
            let answer = result.unwrap();
            let stored: Vec<&&BatchMessage> = fresh.iter().filter(|m| !m.is_skip()).collect();
            let through = fresh.last().expect("not empty").seq;
            assert_eq!(
                (answer.stored_through, answer.stored, answer.duplicates),
                (through, stored.len() as u64, duplicates)
            );
            assert_eq!(answer.gap_expected_seq, None);
            // The queue exists from now on, even when every fresh entry was a skip.
            let last_seq = model.queues.entry(queue.to_string()).or_default().last_seq;
            for (seq, m) in (last_seq + 1..).zip(stored) {
                let message = Message {
                    seq,
                    id: m.id.clone(),
                    origin: edge.into(),
                    origin_seq: m.seq,
                    payload: m.payload.clone(),
                };
                model.store(queue, message);
            }
            model.positions.insert(key, through);
        }
    }
}

/// The position moves to the released seq, never back, nothing is stored, and the queue exists
/// from then on: created like by a write that stores nothing (`max_queues` applies, and a store
/// already past its quota, which failed copies can take it, refuses it).
async fn release_from_origin(store: &Store, model: &mut Model, queue: &str, edge: &str, delta: u64) {
    let key = (edge.to_string(), queue.to_string());
    let position = model.positions.get(&key).copied().unwrap_or(0);
    let through_seq = (position + delta).saturating_sub(1);
    let result = store.record_origin_release(queue, edge, through_seq).await;
    let creates_queue = through_seq > position && !model.queues.contains_key(queue);
    if creates_queue && model.bytes > QUOTA_BYTES {
        assert!(matches!(result, Err(StoreError::QuotaReached { .. })), "{result:?}");
        return;
    }
    let answer = result.unwrap();
    assert_eq!(
        (answer.stored_through, answer.stored, answer.duplicates, answer.gap_expected_seq),
        (position.max(through_seq), 0, 0, None),
        "release of {edge} in {queue} through {through_seq}"
    );
    if through_seq > position {
        model.queues.entry(queue.to_string()).or_default();
        model.positions.insert(key, through_seq);
    }
}

async fn fail(store: &Store, model: &mut Model, queue: &str) {
    let cursor = model.cursor(queue, READERS[0]);
    let Some(next) =
        model.queues.get(queue).and_then(|log| log.messages.iter().find(|m| m.seq > cursor)).cloned()
    else {
        return;
    };
    let message = store.read(queue, cursor, 1).await.unwrap().remove(0);
    assert_eq!(as_model(message.clone()), next);
    let failure = NewFailure {
        route: "r".into(),
        reader: READERS[0].into(),
        message,
        attempts: 1,
        reason: "poison: http:400".into(),
        last_error: "http:400 from http://x/: bad".into(),
    };
    let id = store.fail_message(failure).await.unwrap();
    assert!(model.failed_ids.iter().all(|earlier| *earlier < id), "failed ids are never reused: {id}");
    model.failed_ids.push(id);
    model.failed.insert(
        id,
        Entry {
            queue: queue.to_string(),
            seq: next.seq,
            message_id: next.id.clone(),
            payload: next.payload.clone(),
            attempts: 1,
            status: FailedStatus::Failed,
        },
    );
    model.bytes += next.payload.len() as u64;
    model.cursors.insert((queue.to_string(), READERS[0].to_string()), next.seq);
    model.release(queue);
}

async fn resubmit(store: &Store, model: &mut Model, by_route: bool, picks: &[usize], unknown: bool) {
    if by_route {
        let outcome = store.resubmit_failed(FailedSelector::Route("r".into())).await.unwrap();
        let mut resubmitted = Vec::new();
        for (id, entry) in model.failed.iter_mut().filter(|(_, e)| e.status == FailedStatus::Failed) {
            entry.status = FailedStatus::Resubmitted;
            resubmitted.push((*id, "r".to_string()));
        }
        assert_eq!(outcome, ResubmitOutcome { resubmitted, unknown: Vec::new() });
        return;
    }
    let mut ids: Vec<i64> = picks.iter().filter_map(|&index| pick(&model.failed_ids, index)).collect();
    if unknown {
        ids.push(1_000_000);
    }
    let outcome = store.resubmit_failed(FailedSelector::Ids(ids.clone())).await.unwrap();
    let missing: Vec<i64> = ids.iter().copied().filter(|id| !model.failed.contains_key(id)).collect();
    if !missing.is_empty() {
        assert_eq!(outcome, ResubmitOutcome { resubmitted: Vec::new(), unknown: missing });
        return;
    }
    let mut resubmitted: Vec<(i64, String)> = ids.iter().map(|id| (*id, "r".to_string())).collect();
    resubmitted.sort_unstable();
    resubmitted.dedup();
    for id in &ids {
        model.failed.get_mut(id).expect("checked").status = FailedStatus::Resubmitted;
    }
    assert_eq!(outcome, ResubmitOutcome { resubmitted, unknown: Vec::new() });
}

/// The store's views (stats, cursors, positions) and its failed table agree with the model.
async fn check_views(store: &Store, model: &Model) {
    for (name, log) in &model.queues {
        let stats = store.queue(name).expect("queue exists");
        assert_eq!(stats.messages, log.messages.len() as u64, "{name}");
        assert_eq!(stats.bytes, log.messages.iter().map(|m| m.payload.len() as u64).sum::<u64>(), "{name}");
        assert_eq!(stats.last_seq, log.last_seq, "{name}");
        assert_eq!(stats.first_seq, log.first_seq(), "{name}");
    }
    assert_eq!(store.queue_stats().len(), model.queues.len(), "a rejected write created no queue");
    for queue in QUEUES {
        for reader in READERS {
            assert_eq!(
                store.cursor(queue, reader),
                model.cursor(queue, reader),
                "cursor {reader} in {queue}"
            );
        }
        for edge in EDGES {
            let want = model.positions.get(&(edge.to_string(), queue.to_string())).copied().unwrap_or(0);
            assert_eq!(store.origin_position(edge, queue), want, "position of {edge} in {queue}");
        }
    }
    for edge in EDGES {
        let want: BTreeMap<String, u64> = model
            .positions
            .iter()
            .filter(|((e, _), _)| e == edge)
            .map(|((_, queue), seq)| (queue.clone(), *seq))
            .collect();
        assert_eq!(store.origin_positions(edge), want, "positions of {edge}");
    }
    for status in [FailedStatus::Failed, FailedStatus::Resubmitted] {
        let query =
            FailedQuery { route: Some("r".into()), status, after_id: 0, limit: 100, with_payload: true };
        let got: Vec<(i64, Entry)> = store
            .failed(query)
            .await
            .unwrap()
            .into_iter()
            .map(|e| {
                let entry = Entry {
                    queue: e.queue,
                    seq: e.seq,
                    message_id: e.message_id,
                    payload: e.payload.expect("asked for"),
                    attempts: e.attempts,
                    status: e.status,
                };
                (e.id, entry)
            })
            .collect();
        let want: Vec<(i64, Entry)> =
            model.failed.iter().filter(|(_, e)| e.status == status).map(|(id, e)| (*id, e.clone())).collect();
        assert_eq!(got, want, "failed entries with status {status:?}");
    }
}

/// How many cases a model test runs: `default` (a few seconds), or `PROPTEST_CASES` when set.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(default)
}
