//! The limits of CONTRACT section 2 that bound what a store holds: `max_queues`, and
//! `max_store_bytes` counting failed copies and idempotency keys besides messages, with keys
//! forgotten after `idempotency_ttl` and pruned (their room given back).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_store::{
    NewFailure, NewMessage, Store, StoreError, StoreOptions, IDEMPOTENCY_KEY_OVERHEAD_BYTES,
};
use testkit::postgres::TestDatabase;

fn message(payload: &[u8]) -> NewMessage {
    NewMessage {
        payload: Bytes::copy_from_slice(payload),
        content_type: "text/plain".into(),
        origin: None,
        id: None,
    }
}

async fn append(store: &Store, queue: &str, payload: &[u8], key: Option<&str>) -> Result<bool, StoreError> {
    store.append(queue, vec![message(payload)], key.map(str::to_string)).await.map(|a| a.duplicate)
}

/// Retries `attempt` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn max_queues_holds(store: &Store) {
    for queue in ["q1", "q2"] {
        append(store, queue, b"x", None).await.unwrap();
    }
    // An edge's release without forwarding (recorded at its handshake) creates its queue too.
    store.record_origin_release("q3", "edge-1", 4).await.unwrap();
    let created = store.queue("q3").expect("the release created its queue");
    assert_eq!((created.last_seq, created.messages), (0, 0));
    assert_eq!(store.queue_stats().len(), 3);
    let refused = append(store, "q4", b"x", None).await;
    match refused {
        Err(StoreError::TooManyQueues { queue, limit: 3 }) => assert_eq!(queue, "q4"),
        other => panic!("a fourth queue must be refused with TooManyQueues, got {other:?}"),
    }
    assert!(store.queue("q4").is_none(), "the refused write created nothing");
    let refused = store.record_origin_release("q4", "edge-1", 4).await;
    assert!(matches!(refused, Err(StoreError::TooManyQueues { limit: 3, .. })), "{refused:?}");
    assert!(store.queue("q4").is_none(), "the refused release created nothing");
    assert_eq!(store.origin_position("edge-1", "q4"), 0, "the refused release moved nothing");
    append(store, "q1", b"y", None).await.expect("existing queues take writes");
    store.record_origin_release("q3", "edge-1", 6).await.expect("existing queues take releases");
    assert_eq!(store.origin_position("edge-1", "q3"), 6);
}

#[tokio::test]
async fn a_write_that_would_create_one_queue_too_many_is_refused_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { max_queues: 3, ..StoreOptions::keep_everything(1 << 30, "node") };
    let store = Store::open(dir.path(), options, None).unwrap();
    max_queues_holds(&store).await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_would_create_one_queue_too_many_is_refused_on_postgres() {
    let database = TestDatabase::create().await;
    let options = StoreOptions { max_queues: 3, ..StoreOptions::keep_everything(1 << 30, "node") };
    let store = Store::open_postgres(&database.url, options, None).await.unwrap();
    max_queues_holds(&store).await;
    store.shutdown().await;
}

/// A 36-byte key: with its row, 100 bytes against the quota.
fn key(i: usize) -> String {
    format!("key-{i:032}")
}

#[tokio::test]
async fn idempotency_keys_count_against_the_quota_until_they_expire_and_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(key(0).len() as u64 + IDEMPOTENCY_KEY_OVERHEAD_BYTES, 100);
    // 10 writes of 100 bytes with a key fill 2,000 bytes; without the keys 20 would fit.
    let ttl = Duration::from_secs(2);
    let options = StoreOptions { idempotency_ttl: ttl, ..StoreOptions::keep_everything(2_000, "node") };
    let store = Store::open(dir.path(), options.clone(), None).unwrap();
    let started = Instant::now();
    for i in 0..10 {
        assert!(!append(&store, "q", &[b'm'; 100], Some(&key(i))).await.unwrap());
    }
    assert!(
        matches!(
            append(&store, "q", &[b'm'; 100], Some(&key(10))).await,
            Err(StoreError::QuotaReached { .. })
        ),
        "a full quota counts the keys"
    );
    // Within the TTL a key still answers as a duplicate, storing nothing.
    assert!(append(&store, "q", &[b'm'; 100], Some(&key(3))).await.unwrap(), "a duplicate");
    assert!(started.elapsed() < ttl, "the machine was too slow for this test's TTL");

    // Past the TTL the keys are forgotten and, once pruned after a commit, give their room back:
    // a write of 1,000 bytes (the keys' share) fits again.
    eventually(Duration::from_secs(10), "expired keys pruned", || async {
        append(&store, "other", &[b'p'; 1_000], None).await.is_ok()
    })
    .await;
    store.shutdown().await;
    drop(store);

    // Reopened, the keys' bytes are counted from disk, not from memory.
    let store = Store::open(dir.path(), options, None).unwrap();
    assert!(
        matches!(append(&store, "q", &[b'm'; 1], Some(&key(50))).await, Err(StoreError::QuotaReached { .. })),
        "after a reopen the store is as full as before"
    );
    store.shutdown().await;
}

#[tokio::test]
async fn a_key_reused_after_its_ttl_stores_a_new_message() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        idempotency_ttl: Duration::from_millis(300),
        ..StoreOptions::keep_everything(1 << 30, "n")
    };
    let store = Store::open(dir.path(), options, None).unwrap();
    let first = store.append("q", vec![message(b"a")], Some("k".into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // the TTL itself is what is tested
    let second = store.append("q", vec![message(b"b")], Some("k".into())).await.unwrap();
    assert!(!second.duplicate, "the key expired");
    assert_eq!(second.first_seq, first.first_seq + 1);
    let third = store.append("q", vec![message(b"c")], Some("k".into())).await.unwrap();
    assert!(third.duplicate && third.first_seq == second.first_seq, "the key now names the new message");
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_after_its_ttl_stores_a_new_message_on_postgres() {
    let database = TestDatabase::create().await;
    let options = StoreOptions {
        idempotency_ttl: Duration::from_millis(300),
        ..StoreOptions::keep_everything(1 << 30, "n")
    };
    let store = Store::open_postgres(&database.url, options, None).await.unwrap();
    let first = store.append("q", vec![message(b"a")], Some("k".into())).await.unwrap();
    assert!(store.append("q", vec![message(b"a")], Some("k".into())).await.unwrap().duplicate);
    tokio::time::sleep(Duration::from_millis(400)).await; // the TTL itself is what is tested
    let second = store.append("q", vec![message(b"b")], Some("k".into())).await.unwrap();
    assert!(!second.duplicate, "the key expired");
    assert_eq!(second.first_seq, first.first_seq + 1);
    // Pruned: after the next commits only the fresh row is left.
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    tokio::time::sleep(Duration::from_millis(400)).await;
    eventually(Duration::from_secs(10), "the expired row pruned", || async {
        store.append("other", vec![message(b"z")], None).await.unwrap();
        let rows: i64 =
            client.query_one("SELECT count(*) FROM outpost_idempotency_keys", &[]).await.unwrap().get(0);
        rows == 0
    })
    .await;
    store.shutdown().await;
}

async fn failed_copies_fill_the_quota_until_discarded(store: &Store) {
    for _ in 0..5 {
        append(store, "q", &[b'f'; 100], None).await.unwrap();
    }
    let messages = store.read("q", 0, 100).await.unwrap();
    let mut failed_ids = Vec::new();
    for m in &messages {
        let failure = NewFailure {
            route: "r".into(),
            reader: "route:r".into(),
            message: m.clone(),
            attempts: 1,
            reason: "poison: http:400".into(),
            last_error: "http:400 from http://x/: bad".into(),
        };
        failed_ids.push(store.fail_message(failure).await.unwrap());
    }
    // The route passed them all: the queue releases them, the failed copies stay.
    eventually(Duration::from_secs(10), "the failed messages released from the queue", || async {
        store.queue("q").is_some_and(|q| q.messages == 0)
    })
    .await;
    for _ in 0..5 {
        append(store, "q", &[b'n'; 100], None).await.unwrap();
    }
    assert!(
        matches!(append(store, "q", &[b'n'; 100], None).await, Err(StoreError::QuotaReached { .. })),
        "500 bytes of messages and 500 of failed copies fill a 1,000-byte quota"
    );
    assert!(store.remove_failed(failed_ids[0]).await.unwrap());
    append(store, "q", &[b'n'; 100], None).await.expect("a discarded copy gives its room back");
}

fn one_route_quota_1000() -> StoreOptions {
    StoreOptions {
        readers_of: Arc::new(|_| vec!["route:r".to_string()]),
        ..StoreOptions::keep_everything(1_000, "node")
    }
}

#[tokio::test]
async fn failed_copies_count_against_the_quota_until_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), one_route_quota_1000(), None).unwrap();
    failed_copies_fill_the_quota_until_discarded(&store).await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_copies_count_against_the_quota_until_discarded_on_postgres() {
    let database = TestDatabase::create().await;
    let store = Store::open_postgres(&database.url, one_route_quota_1000(), None).await.unwrap();
    failed_copies_fill_the_quota_until_discarded(&store).await;
    store.shutdown().await;
}

/// On PostgreSQL too a remembered key takes room, and a pruned one gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_count_against_the_quota_on_postgres() {
    let database = TestDatabase::create().await;
    let ttl = Duration::from_secs(2);
    let options = StoreOptions { idempotency_ttl: ttl, ..StoreOptions::keep_everything(2_000, "node") };
    let store = Store::open_postgres(&database.url, options, None).await.unwrap();
    let started = Instant::now();
    for i in 0..10 {
        assert!(!append(&store, "q", &[b'm'; 100], Some(&key(i))).await.unwrap());
    }
    assert!(
        matches!(
            append(&store, "q", &[b'm'; 100], Some(&key(10))).await,
            Err(StoreError::QuotaReached { .. })
        ),
        "a full quota counts the keys"
    );
    assert!(started.elapsed() < ttl, "the machine was too slow for this test's TTL");
    eventually(Duration::from_secs(15), "expired keys pruned", || async {
        append(&store, "other", &[b'p'; 1_000], None).await.is_ok()
    })
    .await;
    store.shutdown().await;
}

/// The quota of the reuse tests: a 10-byte message under the key `k`, then once `k` expired (its
/// row not pruned yet: a TTL of an hour prunes after a minute) a 25-byte one reusing it; the key's
/// bytes counted once.
const REUSE_QUOTA: u64 = 10 + 25 + 1 + IDEMPOTENCY_KEY_OVERHEAD_BYTES;

fn reuse_options() -> StoreOptions {
    StoreOptions {
        idempotency_ttl: Duration::from_secs(3600),
        ..StoreOptions::keep_everything(REUSE_QUOTA, "n")
    }
}

/// Before: `k` stored with 10 bytes. `expire` makes `k` older than the TTL, its row kept. A new
/// message reusing it takes the key's row over and adds only its own bytes, so it fits the quota
/// exactly; the key still counts, so one more byte does not.
async fn an_expired_key_reused_is_counted_once(store: &Store) {
    let second = store.append("q", vec![message(&[b's'; 25])], Some("k".into())).await;
    let second = second.expect("the reused key's bytes are already counted: 25 more bytes fit");
    assert!(!second.duplicate && second.first_seq == 2, "{second:?}");
    assert!(
        matches!(append(store, "q", b"x", None).await, Err(StoreError::QuotaReached { .. })),
        "the key, stored once, still counts: the quota is full"
    );
}

#[tokio::test]
async fn an_expired_key_reused_counts_its_bytes_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), reuse_options(), None).unwrap();
    assert!(!append(&store, "q", &[b'f'; 10], Some("k")).await.unwrap());
    store.shutdown().await;
    drop(store);
    let db = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
    assert_eq!(db.execute("UPDATE idempotency_keys SET created_at_ms = 0", []).unwrap(), 1);
    drop(db);
    let store = Store::open(dir.path(), reuse_options(), None).unwrap();
    an_expired_key_reused_is_counted_once(&store).await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_reused_counts_its_bytes_once_on_postgres() {
    let database = TestDatabase::create().await;
    let store = Store::open_postgres(&database.url, reuse_options(), None).await.unwrap();
    assert!(!append(&store, "q", &[b'f'; 10], Some("k")).await.unwrap());
    let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let expired = client.execute("UPDATE outpost_idempotency_keys SET created_at_ms = 0", &[]).await.unwrap();
    assert_eq!(expired, 1);
    an_expired_key_reused_is_counted_once(&store).await;
    store.shutdown().await;
}

/// The WAL stays within its bound (1/16 of the quota, at least 1 MiB) under many concurrent writes,
/// with its checkpoints beside the writer instead of inside its commits: never more than the bound
/// plus one group, and every acknowledged message is there to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_within_its_bound_with_checkpoints_beside_the_writer() {
    const WRITERS: usize = 16;
    const WRITES: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    // A 16 MiB quota bounds the WAL to 1 MiB (16 frames of 64 KiB).
    let store = Store::open(dir.path(), StoreOptions::keep_everything(16 << 20, "node"), None).unwrap();
    let wal = dir.path().join("outpost.db-wal");
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (store, wal) = (store.clone(), wal.clone());
        tasks.push(tokio::spawn(async move {
            let mut largest = 0;
            for i in 0..WRITES {
                let payload = format!("{writer}-{i}-{}", "x".repeat(2000));
                append(&store, "q", payload.as_bytes(), None).await.unwrap();
                largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            }
            largest
        }));
    }
    let mut largest = 0;
    for task in tasks {
        largest = largest.max(task.await.unwrap());
    }
    // The bound plus one group of at most WRITERS messages (a few 64 KiB frames), and headers.
    let frame = 24 + (64 << 10);
    let allowed = 32 + (16 + 8) * frame;
    assert!(largest <= allowed, "the WAL grew to {largest} bytes, past {allowed}");
    let stats = store.queue_stats();
    assert_eq!(stats[0].messages, (WRITERS * WRITES) as u64);
    let mut read = 0;
    let mut after = 0;
    loop {
        let batch = store.read("q", after, 1000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.seq;
        read += batch.len();
    }
    assert_eq!(read, WRITERS * WRITES);
}
