//! The model property test of `model.rs`, run against the PostgreSQL backend (a throwaway
//! database on `OUTPOST_TEST_POSTGRES`), reopens and crash reopens included.

mod common;

use common::model::{action, cases, options, run_case};
use outpost_store::Store;
use proptest::prelude::*;

async fn open(url: &str) -> Store {
    Store::open_postgres(url, options(), None).await.unwrap()
}

/// Empties every table between cases (creating a database per case would be slow).
async fn truncate(url: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "TRUNCATE outpost_queues, outpost_messages, outpost_idempotency_keys, outpost_cursors,
             outpost_origin_positions, outpost_documents, outpost_failed, outpost_leases, outpost_usage,
             outpost_consumers, outpost_consumer_messages
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
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(16),
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(action(), 1..40), |actions| {
        runtime.block_on(truncate(&database.url));
        // A runtime per case: a crash reopen leaves the dropped store's tasks and connections
        // behind, and dropping the runtime ends them.
        let case_runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        case_runtime.block_on(run_case(actions, || open(&database.url)));
        Ok(())
    });
    drop(database);
    result.unwrap();
}
