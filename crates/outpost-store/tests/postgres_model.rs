//! The model property test of `model.rs`, run against the PostgreSQL backend (a throwaway
//! database on `OUTPOST_TEST_POSTGRES`), reopen included.

mod common;

use common::model::{action, run_case, QUOTA_BYTES};
use outpost_store::{Store, StoreOptions};
use proptest::prelude::*;

async fn open(url: &str) -> Store {
    Store::open_postgres(url, StoreOptions::keep_everything(QUOTA_BYTES, "node-a"), None).await.unwrap()
}

/// Empties every table between cases (creating a database per case would be slow).
async fn truncate(url: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "TRUNCATE outpost_queues, outpost_messages, outpost_idempotency_keys, outpost_cursors,
             outpost_origin_positions, outpost_documents, outpost_failed, outpost_leases, outpost_usage
             RESTART IDENTITY",
        )
        .await
        .unwrap();
}

#[test]
fn postgres_store_matches_model() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let database = runtime.block_on(testkit::postgres::TestDatabase::create());
    // The first open migrates; every case then starts from empty tables.
    runtime.block_on(async { open(&database.url).await.shutdown().await });
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 16, ..ProptestConfig::default() });
    let result = runner.run(&prop::collection::vec(action(), 1..40), |actions| {
        runtime.block_on(async {
            truncate(&database.url).await;
            run_case(actions, || open(&database.url)).await
        });
        Ok(())
    });
    drop(database);
    result.unwrap();
}
