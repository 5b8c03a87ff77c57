//! The store model property test, shared by both backends: random appends (with idempotency keys
//! and a small quota), reads and reopens, checked against a simple in-memory model.

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;
use outpost_store::{NewMessage, Store, StoreError, IDEMPOTENCY_KEY_OVERHEAD_BYTES};
use proptest::prelude::*;

pub const QUOTA_BYTES: u64 = 4_000;
pub const QUEUES: [&str; 3] = ["orders", "sales.v2", "x-y_z"];

#[derive(Debug, Clone)]
pub enum Action {
    Append { queue: usize, sizes: Vec<usize>, key: Option<u8> },
    Read { queue: usize, after_seq: u64, limit: usize },
    Reopen,
}

pub fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0..QUEUES.len(), prop::collection::vec(0usize..700, 1..5), prop::option::of(0u8..4))
            .prop_map(|(queue, sizes, key)| Action::Append { queue, sizes, key }),
        2 => (0..QUEUES.len(), 0u64..12, 1usize..8).prop_map(|(queue, after_seq, limit)| Action::Read { queue, after_seq, limit }),
        1 => Just(Action::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    queues: HashMap<String, Vec<(u64, String, Bytes)>>,
    keys: HashMap<(String, u8), (u64, String)>,
    bytes: u64,
}

fn payload(counter: &mut u32, size: usize) -> Bytes {
    *counter += 1;
    let mut bytes = format!("{counter}:").into_bytes();
    bytes.resize(size.max(bytes.len()), b'p');
    Bytes::from(bytes)
}

/// Runs `actions` against a store from `open` (called again for every reopen) and the model,
/// checking every answer and the statistics after every step.
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
                let queue = QUEUES[queue].to_string();
                let messages: Vec<NewMessage> = sizes
                    .iter()
                    .map(|&size| NewMessage {
                        payload: payload(&mut counter, size),
                        content_type: "text/plain".into(),
                        origin: None,
                        id: None,
                    })
                    .collect();
                let needed: u64 = messages.iter().map(|m| m.payload.len() as u64).sum();
                let key_text = key.map(|k| format!("key-{k}"));
                // Remembered keys count against the quota too.
                let key_bytes =
                    key_text.as_ref().map_or(0, |text| text.len() as u64 + IDEMPOTENCY_KEY_OVERHEAD_BYTES);
                let result = store.append(&queue, messages.clone(), key_text).await;
                if let Some((seq, id)) = key.and_then(|k| model.keys.get(&(queue.clone(), k))) {
                    let appended = result.unwrap();
                    assert!(appended.duplicate);
                    assert_eq!((appended.first_seq, appended.ids[0].as_str()), (*seq, id.as_str()));
                } else if model.bytes + needed + key_bytes > QUOTA_BYTES {
                    assert!(matches!(result, Err(StoreError::QuotaReached { .. })), "{result:?}");
                } else {
                    let appended = result.unwrap();
                    let log = model.queues.entry(queue.clone()).or_default();
                    let expected_first = log.last().map(|m| m.0 + 1).unwrap_or(1);
                    assert!(!appended.duplicate);
                    assert_eq!(appended.first_seq, expected_first);
                    assert_eq!(appended.last_seq, expected_first + messages.len() as u64 - 1);
                    for (i, m) in messages.iter().enumerate() {
                        log.push((expected_first + i as u64, appended.ids[i].clone(), m.payload.clone()));
                    }
                    if let Some(k) = key {
                        model.keys.insert((queue.clone(), k), (expected_first, appended.ids[0].clone()));
                    }
                    model.bytes += needed + key_bytes;
                }
            }
            Action::Read { queue, after_seq, limit } => {
                let queue = QUEUES[queue];
                let got = store.read(queue, after_seq, limit).await.unwrap();
                let want: Vec<_> = model
                    .queues
                    .get(queue)
                    .map(|log| log.iter().filter(|m| m.0 > after_seq).take(limit).cloned().collect())
                    .unwrap_or_default();
                let got: Vec<_> = got
                    .into_iter()
                    .map(|m| {
                        assert_eq!(m.origin, "node-a");
                        assert_eq!(m.origin_seq, m.seq);
                        (m.seq, m.id, m.payload)
                    })
                    .collect();
                assert_eq!(got, want);
            }
            Action::Reopen => {
                store.shutdown().await;
                drop(store);
                store = open().await;
            }
        }
        // Statistics agree with the model after every step.
        for (name, log) in &model.queues {
            let stats = store.queue(name).expect("queue exists");
            assert_eq!(stats.messages, log.len() as u64, "{name}");
            assert_eq!(stats.bytes, log.iter().map(|m| m.2.len() as u64).sum::<u64>(), "{name}");
            assert_eq!(stats.last_seq, log.last().map(|m| m.0).unwrap_or(0), "{name}");
            assert_eq!(stats.first_seq, 1, "{name}");
        }
        assert_eq!(store.queue_stats().len(), model.queues.len(), "a rejected write created no queue");
    }
    store.shutdown().await;
}
