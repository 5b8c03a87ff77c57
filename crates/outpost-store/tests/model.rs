//! Property test: the store behaves like a simple in-memory model of queues, cursors, edge
//! positions and failed messages, across reopens and crash reopens (see `common::model`).

mod common;

use bytes::Bytes;
use common::model::{action, cases, options, run_case, QUOTA_BYTES};
use outpost_store::{NewMessage, Store, StoreError, StoreOptions};
use proptest::prelude::*;

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreOptions::keep_everything(QUOTA_BYTES, "node-a"), None).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), .. ProptestConfig::default() })]
    #[test]
    fn store_matches_model(actions in prop::collection::vec(action(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let open = || std::future::ready(Store::open(dir.path(), options(), None).unwrap());
        runtime.block_on(run_case(actions, open));
    }
}

#[tokio::test]
async fn second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let second = Store::open(dir.path(), StoreOptions::keep_everything(QUOTA_BYTES, "b"), None);
    assert!(matches!(second, Err(StoreError::DirectoryInUse(_))));
    store.shutdown().await;
    drop(store);
    let third = open(dir.path());
    third.shutdown().await;
}

#[tokio::test]
async fn concurrent_appends_share_commits_and_keep_sequences_gapless() {
    let dir = tempfile::tempdir().unwrap();
    let commits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let observed = commits.clone();
    let store = Store::open(
        dir.path(),
        StoreOptions::keep_everything(1 << 30, "n"),
        Some(std::sync::Arc::new(move |_, _| {
            observed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })),
    )
    .unwrap();
    let mut tasks = Vec::new();
    for task in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..50 {
                let m = NewMessage {
                    payload: Bytes::from(format!("{task}-{i}")),
                    content_type: "text/plain".into(),
                    origin: None,
                    id: None,
                };
                seqs.push(store.append("q", vec![m], None).await.unwrap().first_seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1600).collect::<Vec<u64>>());
    let commit_count = commits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(commit_count < 1600, "group commit: 1600 appends took {commit_count} commits");
    store.shutdown().await;
}
