//! Pull consumers at the store's API, the same script on both backends: lease order (resubmitted
//! entries, given-back messages by seq, then new ones), stale lease ids, positions and release,
//! `max_deliveries` into the failed table and back by a resubmit, delete letting go of storage.

use bytes::Bytes;
use outpost_store::consumers::{consumer_route, LeaseRequest, Settle};
use outpost_store::{
    FailedQuery, FailedSelector, FailedStatus, LeasedMessage, NewMessage, Store, StoreOptions,
};

fn message(text: &str) -> NewMessage {
    NewMessage {
        payload: Bytes::from(text.to_string()),
        content_type: "text/plain".into(),
        origin: None,
        id: None,
    }
}

async fn append(store: &Store, queue: &str, texts: &[&str]) {
    store.append(queue, texts.iter().map(|t| message(t)).collect(), None).await.unwrap();
}

fn request(max: usize, max_deliveries: u32) -> LeaseRequest {
    LeaseRequest { max, max_deliveries, ..LeaseRequest::default() }
}

fn seqs_and_deliveries(leased: &[LeasedMessage]) -> Vec<(u64, u32)> {
    leased.iter().map(|l| (l.message.seq, l.deliveries)).collect()
}

fn ids(leased: &[&LeasedMessage]) -> Vec<String> {
    leased.iter().map(|l| l.lease_id.clone()).collect()
}

async fn position(store: &Store, queue: &str, name: &str) -> u64 {
    let views = store.consumers(queue, outpost_core::time::now_unix_ms()).await.unwrap();
    views.into_iter().find(|v| v.name == name).map(|v| v.position).expect("the consumer is listed")
}

async fn check(store: &Store) {
    append(store, "q", &["m1", "m2", "m3", "m4", "m5"]).await;
    let first = store.consumer_lease("q", "a", request(3, 10)).await.unwrap();
    assert_eq!(seqs_and_deliveries(&first), [(1, 1), (2, 1), (3, 1)]);
    // `b` holds storage from the start.
    assert!(store.consumer_lease("q", "b", request(1, 10)).await.unwrap().len() == 1);

    // Given back: 3, then 1; the next lease takes them by seq, then the new ones.
    let back = store
        .consumer_settle("q", "a", ids(&[&first[2], &first[0]]), Settle::Nack { delay_ms: 0 })
        .await
        .unwrap();
    assert_eq!((back.consumer_exists, back.settled), (true, 2));
    let second = store.consumer_lease("q", "a", request(10, 10)).await.unwrap();
    assert_eq!(seqs_and_deliveries(&second), [(1, 2), (3, 2), (4, 1), (5, 1)]);

    // The first delivery's id of seq 1 is stale; the current ones apply.
    let stale = store.consumer_settle("q", "a", ids(&[&first[0]]), Settle::Ack).await.unwrap();
    assert_eq!((stale.settled, stale.stale.len()), (0, 1));
    let garbage = vec!["x".to_string(), "1.2.3".to_string()];
    assert_eq!(store.consumer_settle("q", "a", garbage, Settle::Ack).await.unwrap().stale.len(), 2);
    let done =
        store.consumer_settle("q", "a", ids(&second.iter().collect::<Vec<_>>()), Settle::Ack).await.unwrap();
    assert_eq!(done.settled, 4);
    assert_eq!(position(store, "q", "a").await, 1, "seq 2 is still outstanding");
    store.consumer_settle("q", "a", ids(&[&first[1]]), Settle::Ack).await.unwrap();
    assert_eq!(position(store, "q", "a").await, 5);
    assert_eq!(store.queue("q").unwrap().messages, 5, "b has not finished them");

    // Deleting b lets go of them.
    assert!(store.consumer_delete("q", "b").await.unwrap());
    assert!(!store.consumer_delete("q", "b").await.unwrap());
    assert_eq!(store.queue("q").unwrap().messages, 0);
    let unknown = store.consumer_settle("q", "b", vec![], Settle::Ack).await.unwrap();
    assert!(!unknown.consumer_exists);

    // max_deliveries: delivered once already, the next lease fails it instead.
    append(store, "q", &["poison"]).await;
    let got = store.consumer_lease("q", "a", request(10, 1)).await.unwrap();
    assert_eq!(seqs_and_deliveries(&got), [(6, 1)]);
    store.consumer_settle("q", "a", ids(&[&got[0]]), Settle::Nack { delay_ms: 0 }).await.unwrap();
    assert!(store.consumer_lease("q", "a", request(10, 1)).await.unwrap().is_empty());
    assert_eq!(position(store, "q", "a").await, 6);
    let query = FailedQuery {
        route: Some(consumer_route("a")),
        status: FailedStatus::Failed,
        after_id: 0,
        limit: 10,
        with_payload: false,
    };
    let failed = store.failed(query.clone()).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].seq, failed[0].reason.as_str(), failed[0].attempts), (6, "max_deliveries", 1));

    // Resubmitted, it comes back first, with its payload and id, ahead of a newer message.
    store.resubmit_failed(FailedSelector::Ids(vec![failed[0].id])).await.unwrap();
    append(store, "q", &["fine"]).await;
    let got = store.consumer_lease("q", "a", request(10, 10)).await.unwrap();
    assert_eq!(seqs_and_deliveries(&got), [(6, 1), (7, 1)]);
    assert_eq!(
        (got[0].message.payload.as_ref(), got[0].message.id.as_str()),
        (&b"poison"[..], failed[0].message_id.as_str())
    );
    store.consumer_settle("q", "a", ids(&got.iter().collect::<Vec<_>>()), Settle::Ack).await.unwrap();
    assert!(store.failed_entry(failed[0].id).await.unwrap().is_none(), "acknowledged: the entry is gone");
    assert_eq!(position(store, "q", "a").await, 7);
    assert_eq!(store.queue("q").unwrap().messages, 0);
}

#[tokio::test]
async fn consumers_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::keep_everything(1 << 30, "n"), None).unwrap();
    check(&store).await;
    store.shutdown().await;
    drop(store);
    // Positions are durable.
    let store = Store::open(dir.path(), StoreOptions::keep_everything(1 << 30, "n"), None).unwrap();
    assert_eq!(position(&store, "q", "a").await, 7);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_on_postgres() {
    let database = testkit::postgres::TestDatabase::create().await;
    let store =
        Store::open_postgres(&database.url, StoreOptions::keep_everything(1 << 30, "n"), None).await.unwrap();
    check(&store).await;
    store.shutdown().await;
}
