//! Two stores on one PostgreSQL database behave as one cluster: each edge message stored once
//! whichever store takes it, gapless seqs, views and `commits()` that follow the other store,
//! cluster events, leases held by one store at a time, documents, cursors and failed messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outpost_core::wire::BatchMessage;
use outpost_store::{
    FailedQuery, FailedSelector, FailedStatus, NewFailure, NewMessage, Store, StoreOptions, StoredMessage,
    LEASE_RENEW_INTERVAL, LEASE_TTL,
};
use testkit::postgres::TestDatabase;

async fn open(url: &str, node: &str) -> Store {
    Store::open_postgres(url, StoreOptions::keep_everything(1 << 30, node), None).await.unwrap()
}

fn batch(origin: &str, range: std::ops::RangeInclusive<u64>) -> Vec<BatchMessage> {
    range
        .map(|seq| BatchMessage {
            seq,
            id: format!("{origin}-id-{seq}"),
            content_type: "text/plain".into(),
            payload: Bytes::from(format!("{origin}:{seq}")),
        })
        .collect()
}

fn text(payload: &str) -> NewMessage {
    NewMessage {
        payload: Bytes::from(payload.to_string()),
        content_type: "text/plain".into(),
        origin: None,
        id: None,
    }
}

/// Waits until `check` holds, re-checking after each commit the store sees (at most `within`).
async fn eventually(store: &Store, within: Duration, what: &str, check: impl Fn(&Store) -> bool) {
    let mut commits = store.commits();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        commits.borrow_and_update();
        if check(store) {
            return;
        }
        if tokio::time::timeout_at(deadline, commits.changed()).await.is_err() {
            panic!("{what}: not within {within:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_batches_sent_to_both_stores_are_stored_once_in_order() {
    let database = TestDatabase::create().await;
    let (a, b) = (open(&database.url, "central-a").await, open(&database.url, "central-b").await);
    let mut tasks = Vec::new();
    for edge in 0..4 {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let origin = format!("edge-{edge}");
            let mut next = 1u64;
            let mut round = 0u64;
            while next <= 400 {
                // Each batch goes to both stores at once (an edge that switched centrals while a
                // batch was in flight), overlapping the previous batch by a few messages.
                let from = next.saturating_sub(3).max(1);
                let to = (next + 19).min(400);
                let (first, second) = if round.is_multiple_of(2) { (&a, &b) } else { (&b, &a) };
                let (x, y) = tokio::join!(
                    first.append_from_origin("q", &origin, batch(&origin, from..=to)),
                    second.append_from_origin("q", &origin, batch(&origin, from..=to)),
                );
                let (x, y) = (x.unwrap(), y.unwrap());
                assert_eq!((x.gap_expected_seq, y.gap_expected_seq), (None, None));
                assert_eq!((x.stored_through, y.stored_through), (to, to));
                assert_eq!(x.stored + y.stored, to + 1 - next, "stored once between the two");
                next = to + 1;
                round += 1;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for store in [&a, &b] {
        eventually(store, Duration::from_secs(5), "both stores see 1600 messages", |s| {
            s.queue("q").is_some_and(|q| q.last_seq == 1600 && q.messages == 1600)
        })
        .await;
        let mut messages: Vec<StoredMessage> = Vec::new();
        while messages.len() < 1600 {
            let after = messages.last().map_or(0, |m| m.seq);
            messages.extend(store.read("q", after, 1000).await.unwrap());
        }
        assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=1600).collect::<Vec<_>>());
        let mut per_origin: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for m in &messages {
            per_origin.entry(m.origin.clone()).or_default().push(m.origin_seq);
            assert_eq!(m.id, format!("{}-id-{}", m.origin, m.origin_seq));
        }
        for (origin, seqs) in per_origin {
            assert_eq!(seqs, (1..=400).collect::<Vec<_>>(), "{origin}: once each, in order");
            assert_eq!(store.origin_position(&origin, "q"), 400);
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_two_stores_keep_sequences_gapless() {
    let database = TestDatabase::create().await;
    let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let observed = commits.clone();
    let a = Store::open_postgres(
        &database.url,
        StoreOptions::keep_everything(1 << 30, "a"),
        Some(Arc::new(move |_, _| {
            observed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })),
    )
    .await
    .unwrap();
    let b = open(&database.url, "b").await;
    let mut tasks = Vec::new();
    for task in 0..32u32 {
        let store = if task.is_multiple_of(2) { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                seqs.push(
                    store.append("q", vec![text(&format!("{task}-{i}"))], None).await.unwrap().first_seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=800).collect::<Vec<u64>>());
    let commit_count = commits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(commit_count < 400, "group commit: 400 appends on store a took {commit_count} commits");
    // The same idempotency key through either store: stored once.
    let first = a.append("q", vec![text("k")], Some("key-1".into())).await.unwrap();
    let again = b.append("q", vec![text("k")], Some("key-1".into())).await.unwrap();
    assert!(again.duplicate);
    assert_eq!((again.first_seq, &again.ids), (first.first_seq, &first.ids));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_documents_and_events_follow_the_other_store() {
    let database = TestDatabase::create().await;
    let (a, b) = (open(&database.url, "a").await, open(&database.url, "b").await);
    let mut b_commits = b.commits();
    b_commits.borrow_and_update();
    let started = std::time::Instant::now();
    a.append_from_origin("orders", "edge-1", batch("edge-1", 1..=5)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), b_commits.changed()).await.unwrap().unwrap();
    eventually(&b, Duration::from_secs(10), "b sees a's commit", |s| {
        s.origin_position("edge-1", "orders") == 5 && s.queue("orders").is_some_and(|q| q.messages == 5)
    })
    .await;
    eprintln!("a commit on one store reached the other's views in {:?}", started.elapsed());

    a.put_document("edge:edge-1", "{\"x\":1}".into()).await.unwrap();
    assert_eq!(b.documents("edge:").await.unwrap().get("edge:edge-1").map(String::as_str), Some("{\"x\":1}"));

    let mut on_a = a.cluster_events();
    let mut on_b = b.cluster_events();
    a.publish_cluster_event("route_mode", "{\"route\":\"r\"}").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), on_b.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("route_mode".to_string(), "{\"route\":\"r\"}".to_string()));
    assert_eq!(on_a.recv().await.unwrap().0, "route_mode", "the publisher's own subscribers hear it");
    b.publish_cluster_event("second", "{}").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), on_a.recv()).await.unwrap().unwrap();
    assert_eq!(next.0, "second", "and only once: the NOTIFY of its own event is not delivered again");
    assert!(a.publish_cluster_event("big", &"x".repeat(10_000)).await.is_err());

    // A cursor advanced on one store is what the other reads, fresh or from its views.
    a.advance_cursor("orders", "route:r", 3).await.unwrap();
    assert_eq!(b.fresh_cursor("orders", "route:r").await.unwrap(), 3);
    eventually(&b, Duration::from_secs(10), "b's view of the cursor", |s| s.cursor("orders", "route:r") == 3)
        .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_held_by_one_store_at_a_time_and_passes_on_release() {
    let database = TestDatabase::create().await;
    let (a, b) = (open(&database.url, "a").await, open(&database.url, "b").await);
    let mut on_a = a.lease("route:r");
    tokio::time::timeout(Duration::from_secs(3), on_a.wait_for(|lease| lease.is_valid()))
        .await
        .unwrap()
        .unwrap();
    let mut on_b = b.lease("route:r");
    // b asks every renew interval while a renews: two renewals of a (its lease's end moved twice)
    // take at least one interval, and b must not have got it meanwhile.
    let mut renewals = 0;
    let mut end = on_a.borrow().valid_until;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while renewals < 2 {
        assert!(!on_b.borrow().held, "one holder");
        let now = on_a.borrow().valid_until;
        if now != end {
            (renewals, end) = (renewals + 1, now);
        }
        assert!(std::time::Instant::now() < deadline, "a renewed its lease {renewals} times in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(on_a.borrow().is_valid() && !on_b.borrow().held, "one holder");
    drop(on_a); // a gives the lease up
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(4), on_b.wait_for(|lease| lease.is_valid()))
        .await
        .unwrap()
        .unwrap();
    eprintln!("the lease passed to the other store in {:?}", started.elapsed());
    // A store that shuts down gives its leases up too (not only when they expire).
    let c = open(&database.url, "c").await;
    let mut on_c = c.lease("route:r");
    b.shutdown().await;
    tokio::time::timeout(LEASE_TTL - Duration::from_millis(500), on_c.wait_for(|lease| lease.is_valid()))
        .await
        .unwrap()
        .unwrap();
    drop(on_b);
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_release_and_failed_messages_work_on_postgres() {
    let database = TestDatabase::create().await;
    let options = StoreOptions {
        readers_of: Arc::new(|_| vec!["route:r".to_string()]),
        ..StoreOptions::keep_everything(1 << 30, "node-a")
    };
    let store = Store::open_postgres(&database.url, options.clone(), None).await.unwrap();
    store.append("q", ["a", "b", "c"].map(text).to_vec(), None).await.unwrap();
    let messages = store.read("q", 0, 100).await.unwrap();
    let failure = |m: &StoredMessage| NewFailure {
        route: "r".into(),
        reader: "route:r".into(),
        message: m.clone(),
        attempts: 1,
        reason: "poison: http:400".into(),
        last_error: "http:400 from http://x/: bad".into(),
    };
    let a = store.fail_message(failure(&messages[0])).await.unwrap();
    assert_eq!(store.cursor("q", "route:r"), 1);
    store.advance_cursor("q", "route:r", 2).await.unwrap();
    let c = store.fail_message(failure(&messages[2])).await.unwrap();
    assert!(c > a);
    let stats = store.queue("q").unwrap();
    assert_eq!((stats.messages, stats.bytes, stats.first_seq, stats.last_seq), (0, 0, 4, 3), "all released");
    store.advance_cursor("q", "route:r", 1).await.unwrap();
    assert_eq!(store.cursor("q", "route:r"), 3, "a cursor never moves back");
    store.shutdown().await;
    drop(store);

    let store = Store::open_postgres(&database.url, options, None).await.unwrap();
    assert_eq!(store.queue("q").unwrap().first_seq, 4);
    let query =
        |status| FailedQuery { route: Some("r".into()), status, after_id: 0, limit: 100, with_payload: true };
    let entries = store.failed(query(FailedStatus::Failed)).await.unwrap();
    assert_eq!(entries.iter().map(|e| (e.id, e.seq)).collect::<Vec<_>>(), vec![(a, 1), (c, 3)]);
    assert_eq!(entries[0].payload.as_deref(), Some(&b"a"[..]));
    assert_eq!(store.failed_counts(FailedStatus::Failed).await.unwrap().get("r"), Some(&2));

    let outcome = store.resubmit_failed(FailedSelector::Ids(vec![a, 999])).await.unwrap();
    assert_eq!((outcome.resubmitted.len(), outcome.unknown), (0, vec![999]));
    let outcome = store.resubmit_failed(FailedSelector::Ids(vec![a])).await.unwrap();
    assert_eq!(outcome.resubmitted, vec![(a, "r".to_string())]);
    assert!(store.fail_again(a, 3, "max_attempts: http:500".into(), "http:500".into()).await.unwrap());
    let entry = store.failed_entry(a).await.unwrap().unwrap();
    assert_eq!((entry.attempts, entry.status, entry.payload), (4, FailedStatus::Failed, None));
    let outcome = store.resubmit_failed(FailedSelector::Route("r".into())).await.unwrap();
    assert_eq!(outcome.resubmitted, vec![(a, "r".to_string()), (c, "r".to_string())]);
    assert!(store.remove_failed(a).await.unwrap());
    assert!(!store.remove_failed(a).await.unwrap());
    assert!(store.failed_entry(a).await.unwrap().is_none());
    assert_eq!(store.failed_counts(FailedStatus::Resubmitted).await.unwrap().get("r"), Some(&1));
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_starting_together_migrate_once() {
    let database = TestDatabase::create().await;
    let (a, b) = tokio::join!(open(&database.url, "a"), open(&database.url, "b"));
    a.append("q", vec![text("x")], None).await.unwrap();
    b.shutdown().await;
    a.shutdown().await;
}

/// CONTRACT 4.5: a holder whose database stops answering (a hung connection: nothing moves, nothing
/// closes) stops believing its lease before any other central may take it over, whatever its
/// pending renewal is doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_renewal_hangs_ends_before_another_store_may_take_it() {
    let database = TestDatabase::create().await;
    let postgres: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = testkit::proxy::LinkProxy::start(postgres, testkit::proxy::LinkShape::default());
    let through_proxy = database.url.replace("127.0.0.1:5432", &proxy.address().to_string());
    assert_ne!(through_proxy, database.url, "the test database is on 127.0.0.1:5432");
    let a = open(&through_proxy, "a").await;
    let mut on_a = a.lease("route:r");
    tokio::time::timeout(Duration::from_secs(3), on_a.wait_for(|lease| lease.is_valid()))
        .await
        .unwrap()
        .unwrap();

    proxy.blackhole(true);
    let hung_at = std::time::Instant::now();
    // The last renewal was sent before the hang, so by this node's own clock the lease ends at most
    // LEASE_TTL - LEASE_RENEW_INTERVAL later: before the others may claim it (LEASE_TTL).
    let believed_until = on_a.borrow().valid_until.expect("a lease held on PostgreSQL has an end");
    assert!(
        believed_until <= hung_at + LEASE_TTL - LEASE_RENEW_INTERVAL,
        "the lease is believed {:?} into the hang",
        believed_until - hung_at
    );
    // Nothing the hung renewals do moves that end: receivers are told the lease is gone by then.
    let told_by = tokio::time::Instant::from_std(hung_at + LEASE_TTL);
    tokio::time::timeout_at(told_by, on_a.wait_for(|lease| !lease.held))
        .await
        .expect("receivers are told the lease is gone before another store may take it")
        .unwrap();
    eprintln!("a hung renewal: the lease was given up {:?} into the hang", hung_at.elapsed());

    // Another store takes it once it has expired in the database, and the first does not get it
    // back while its connection hangs.
    let b = open(&database.url, "b").await;
    let mut on_b = b.lease("route:r");
    tokio::time::timeout(LEASE_TTL + Duration::from_secs(3), on_b.wait_for(|lease| lease.is_valid()))
        .await
        .unwrap()
        .unwrap();
    assert!(!on_a.borrow().held, "one holder");
    proxy.blackhole(false);
    drop(on_a);
    drop(on_b);
    b.shutdown().await;
    a.shutdown().await;
}
