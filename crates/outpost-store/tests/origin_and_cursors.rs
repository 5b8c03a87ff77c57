//! Central dedup of edge batches and release of messages every required reader has taken.

use std::sync::Arc;

use bytes::Bytes;
use outpost_core::wire::BatchMessage;
use outpost_store::{NewMessage, Store, StoreOptions};

fn batch(range: std::ops::RangeInclusive<u64>) -> Vec<BatchMessage> {
    range
        .map(|seq| BatchMessage {
            seq,
            id: format!("edge-id-{seq}"),
            content_type: "text/plain".into(),
            payload: Bytes::from(format!("m{seq}")),
        })
        .collect()
}

#[tokio::test]
async fn edge_batches_are_stored_once_in_order_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::keep_everything(1 << 30, "central"), None).unwrap();
    let first = store.append_from_origin("orders", "edge-1", batch(1..=3)).await.unwrap();
    assert_eq!(
        (first.stored_through, first.stored, first.duplicates, first.gap_expected_seq),
        (3, 3, 0, None)
    );
    // Overlapping resend: 2..3 are duplicates, 4..5 are new.
    let second = store.append_from_origin("orders", "edge-1", batch(2..=5)).await.unwrap();
    assert_eq!((second.stored_through, second.stored, second.duplicates), (5, 2, 2));
    // A batch past a gap stores nothing and says where to resume.
    let gap = store.append_from_origin("orders", "edge-1", batch(8..=9)).await.unwrap();
    assert_eq!((gap.stored, gap.gap_expected_seq), (0, Some(6)));
    // Another edge has its own positions in the same queue.
    store.append_from_origin("orders", "edge-2", batch(1..=2)).await.unwrap();
    store.shutdown().await;
    drop(store);

    let store = Store::open(dir.path(), StoreOptions::keep_everything(1 << 30, "central"), None).unwrap();
    assert_eq!(store.origin_position("edge-1", "orders"), 5);
    assert_eq!(store.origin_positions("edge-2").get("orders"), Some(&2));
    let again = store.append_from_origin("orders", "edge-1", batch(1..=5)).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 5));
    let stored = store.read("orders", 0, 100).await.unwrap();
    let seen: Vec<(String, u64, u64, String)> =
        stored.iter().map(|m| (m.origin.clone(), m.origin_seq, m.seq, m.id.clone())).collect();
    assert_eq!(seen.len(), 7);
    assert_eq!(seen[..5].iter().map(|s| s.1).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert!(seen[..5].iter().all(|s| s.0 == "edge-1"));
    assert_eq!(seen[0].3, "edge-id-1", "the edge's message id is kept");
    assert_eq!(seen.iter().map(|s| s.2).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    store.shutdown().await;
}

#[tokio::test]
async fn messages_are_released_once_every_required_reader_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        readers_of: Arc::new(|_| vec!["upstream".to_string(), "route:r".to_string()]),
        ..StoreOptions::keep_everything(1 << 30, "edge")
    };
    let store = Store::open(dir.path(), options.clone(), None).unwrap();
    for i in 0..10 {
        let m = NewMessage {
            payload: Bytes::from(format!("{i}")),
            content_type: "text/plain".into(),
            origin: None,
            id: None,
        };
        store.append("q", vec![m], None).await.unwrap();
    }
    store.advance_cursor("q", "upstream", 6).await.unwrap();
    assert_eq!(store.queue("q").unwrap().messages, 10, "the route has taken nothing yet");
    store.advance_cursor("q", "route:r", 4).await.unwrap();
    let stats = store.queue("q").unwrap();
    assert_eq!((stats.messages, stats.first_seq, stats.last_seq), (6, 5, 10));
    assert!(store.advance_cursor("q", "upstream", 11).await.is_err(), "a cursor cannot pass the last seq");
    store.shutdown().await;
    drop(store);

    let store = Store::open(dir.path(), options, None).unwrap();
    assert_eq!((store.cursor("q", "upstream"), store.cursor("q", "route:r")), (6, 4));
    let stats = store.queue("q").unwrap();
    assert_eq!((stats.messages, stats.first_seq, stats.bytes), (6, 5, 6));
    let first = store.read("q", 0, 1).await.unwrap();
    assert_eq!(first[0].seq, 5);
    store.advance_cursor("q", "route:r", 10).await.unwrap();
    store.advance_cursor("q", "upstream", 10).await.unwrap();
    let stats = store.queue("q").unwrap();
    assert_eq!((stats.messages, stats.first_seq, stats.last_seq), (0, 11, 10));
    // Sequences continue after everything was released.
    let m =
        NewMessage { payload: Bytes::from("x"), content_type: "text/plain".into(), origin: None, id: None };
    assert_eq!(store.append("q", vec![m], None).await.unwrap().first_seq, 11);
    store.shutdown().await;
}

/// Skip entries (`outpost_core::wire`) move an origin's position without storing anything: the
/// edge's forwarder sends them for downlink messages, the central for expired downlink ones.
async fn check_skip_entries(store: &Store) {
    let mut messages = batch(1..=4);
    messages[1] = BatchMessage::skip(2, "skipped-2".into());
    messages[2] = BatchMessage::skip(3, "skipped-3".into());
    let appended = store.append_from_origin("orders", "edge-1", messages).await.unwrap();
    assert_eq!((appended.stored_through, appended.stored, appended.gap_expected_seq), (4, 2, None));
    assert_eq!(store.origin_position("edge-1", "orders"), 4);
    // A batch of skips alone still moves the position, and the next batch follows on without a gap.
    let skips = vec![BatchMessage::skip(5, "s5".into()), BatchMessage::skip(6, "s6".into())];
    let appended = store.append_from_origin("orders", "edge-1", skips).await.unwrap();
    assert_eq!((appended.stored_through, appended.stored), (6, 0));
    assert_eq!(store.origin_position("edge-1", "orders"), 6);
    let appended = store.append_from_origin("orders", "edge-1", batch(7..=7)).await.unwrap();
    assert_eq!((appended.stored_through, appended.stored, appended.gap_expected_seq), (7, 1, None));
    let stored = store.read("orders", 0, 100).await.unwrap();
    assert_eq!(stored.iter().map(|m| m.origin_seq).collect::<Vec<_>>(), vec![1, 4, 7]);
    assert_eq!(stored.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3], "no seq is used by a skip");
}

#[tokio::test]
async fn skip_entries_move_the_position_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::keep_everything(1 << 30, "central"), None).unwrap();
    check_skip_entries(&store).await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_entries_move_the_position_and_store_nothing_on_postgres() {
    let database = testkit::postgres::TestDatabase::create().await;
    let store = Store::open_postgres(&database.url, StoreOptions::keep_everything(1 << 30, "central"), None)
        .await
        .unwrap();
    check_skip_entries(&store).await;
    store.shutdown().await;
}

/// `read_within` stops before the message that would take the payloads past its byte budget (the
/// first is read whatever its size), so a reader's count sized for small messages cannot load a
/// thousand large ones; the prefix it returns is contiguous, in order.
async fn check_reads_within_a_byte_budget(store: &Store) {
    let sizes = [10usize, 500, 600, 100, 5000, 1];
    let messages: Vec<NewMessage> = sizes
        .iter()
        .map(|size| NewMessage {
            payload: Bytes::from(vec![b'x'; *size]),
            content_type: "text/plain".into(),
            origin: None,
            id: None,
        })
        .collect();
    store.append("orders", messages, None).await.unwrap();
    let seqs = |read: Vec<outpost_store::StoredMessage>| read.iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.read_within("orders", 0, 100, 1110).await.unwrap()), [1, 2, 3]);
    assert_eq!(seqs(store.read_within("orders", 0, 100, 1109).await.unwrap()), [1, 2]);
    assert_eq!(seqs(store.read_within("orders", 0, 2, usize::MAX).await.unwrap()), [1, 2]);
    // The first message alone when it is larger than the budget; never nothing.
    assert_eq!(seqs(store.read_within("orders", 4, 100, 10).await.unwrap()), [5]);
    assert_eq!(seqs(store.read_within("orders", 3, 100, 5100).await.unwrap()), [4, 5]);
    assert_eq!(seqs(store.read("orders", 0, 100).await.unwrap()), [1, 2, 3, 4, 5, 6]);
}

#[tokio::test]
async fn reads_stay_within_a_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::keep_everything(1 << 30, "edge"), None).unwrap();
    check_reads_within_a_byte_budget(&store).await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stay_within_a_byte_budget_on_postgres() {
    let database = testkit::postgres::TestDatabase::create().await;
    let store = Store::open_postgres(&database.url, StoreOptions::keep_everything(1 << 30, "central"), None)
        .await
        .unwrap();
    check_reads_within_a_byte_budget(&store).await;
    store.shutdown().await;
}
