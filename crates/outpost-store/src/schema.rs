//! Schema migrations and the consistency check run at every open (startup and crash recovery alike).

use std::collections::BTreeMap;

use rusqlite::Connection;

use crate::{QueueStats, StoreError};

/// Migrations in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: queues, messages, idempotency keys, reader cursors, central dedup positions.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE queues (
         queue_id INTEGER PRIMARY KEY,
         name TEXT NOT NULL UNIQUE,
         last_seq INTEGER NOT NULL
     );
     CREATE TABLE messages (
         queue_id INTEGER NOT NULL,
         seq INTEGER NOT NULL,
         id TEXT NOT NULL,
         origin TEXT NOT NULL,
         origin_seq INTEGER NOT NULL,
         content_type TEXT NOT NULL,
         accepted_at_ms INTEGER NOT NULL,
         payload BLOB NOT NULL,
         PRIMARY KEY (queue_id, seq)
     );
     CREATE TABLE idempotency_keys (
         queue_id INTEGER NOT NULL,
         key TEXT NOT NULL,
         seq INTEGER NOT NULL,
         id TEXT NOT NULL,
         created_at_ms INTEGER NOT NULL,
         PRIMARY KEY (queue_id, key)
     ) WITHOUT ROWID;
     CREATE TABLE cursors (
         queue_id INTEGER NOT NULL,
         reader TEXT NOT NULL,
         acked_seq INTEGER NOT NULL,
         PRIMARY KEY (queue_id, reader)
     ) WITHOUT ROWID;
     CREATE TABLE origin_positions (
         origin TEXT NOT NULL,
         queue_id INTEGER NOT NULL,
         last_origin_seq INTEGER NOT NULL,
         PRIMARY KEY (origin, queue_id)
     ) WITHOUT ROWID;",
    // 2: small durable documents: the offline log, the edge registry, route modes.
    "CREATE TABLE documents (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at_ms INTEGER NOT NULL);",
    // 3: failed messages of routes (see failed.rs); AUTOINCREMENT so an id is never reused.
    "CREATE TABLE failed (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         route TEXT NOT NULL,
         queue TEXT NOT NULL,
         seq INTEGER NOT NULL,
         message_id TEXT NOT NULL,
         origin TEXT NOT NULL,
         origin_seq INTEGER NOT NULL,
         content_type TEXT NOT NULL,
         accepted_at_ms INTEGER NOT NULL,
         payload BLOB NOT NULL,
         attempts INTEGER NOT NULL,
         reason TEXT NOT NULL,
         last_error TEXT NOT NULL,
         first_failed_at_ms INTEGER NOT NULL,
         last_failed_at_ms INTEGER NOT NULL,
         status TEXT NOT NULL CHECK (status IN ('failed', 'resubmitted'))
     );
     CREATE INDEX failed_by_route ON failed (route, status, id);",
    // 4: pull consumers (see consumers.rs); a consumer's position is its cursor `consumer:<name>`.
    "CREATE TABLE consumers (
         consumer_id INTEGER PRIMARY KEY AUTOINCREMENT,
         queue TEXT NOT NULL,
         name TEXT NOT NULL,
         head INTEGER NOT NULL,
         created_at_ms INTEGER NOT NULL,
         last_active_at_ms INTEGER NOT NULL,
         UNIQUE (queue, name)
     );
     CREATE TABLE consumer_messages (
         consumer_id INTEGER NOT NULL,
         failed_id INTEGER NOT NULL,
         seq INTEGER NOT NULL,
         deliveries INTEGER NOT NULL,
         leased INTEGER NOT NULL,
         visible_at_ms INTEGER NOT NULL,
         PRIMARY KEY (consumer_id, failed_id, seq)
     ) WITHOUT ROWID;",
    // 5: expired idempotency keys are pruned oldest first.
    "CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_ms);",
    // 6: no change to the tables, a change of meaning: `queues.last_seq` is written only when a
    // release empties the queue, so a queue's last seq is the larger of it and its highest stored
    // seq (see `load_stats`). An older outpost, which reads the row as the last seq itself and
    // would call the queue overrun, refuses the store as too new instead.
    "SELECT 1;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies every migration the database has not seen yet, each in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let has_meta: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    let mut version: i64 = if has_meta {
        conn.query_row("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'schema_version'", [], |r| {
            r.get(0)
        })?
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: version, supported: SCHEMA_VERSION });
    }
    while version < SCHEMA_VERSION {
        let tx = conn.transaction()?;
        tx.execute_batch(MIGRATIONS[version as usize])?;
        version += 1;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [version.to_string()],
        )?;
        if version == 1 {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('created_at_ms', ?1)",
                [outpost_core::time::now_unix_ms().to_string()],
            )?;
        }
        tx.commit()?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

/// Every (origin, queue) → highest origin seq stored.
pub fn load_origin_positions(conn: &Connection) -> Result<BTreeMap<(String, String), u64>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT p.origin, q.name, p.last_origin_seq FROM origin_positions p JOIN queues q ON q.queue_id = p.queue_id",
    )?;
    let rows = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get::<_, i64>(2)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every (queue, reader) → highest seq the reader is done with.
pub fn load_cursors(conn: &Connection) -> Result<BTreeMap<(String, String), u64>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT q.name, c.reader, c.acked_seq FROM cursors c JOIN queues q ON q.queue_id = c.queue_id",
    )?;
    let rows = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get::<_, i64>(2)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Rebuilds every queue's statistics from disk and checks that each queue's stored messages are a
/// contiguous run. A gap is a broken invariant: refuse to start. A queue's last seq is its highest
/// stored seq, or (when a release emptied it, or it is new) the `last_seq` of its row, which the
/// writer updates only then (schema version 6).
pub fn load_stats(conn: &Connection) -> Result<BTreeMap<String, QueueStats>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT q.name, q.last_seq, count(m.seq), coalesce(sum(length(m.payload)), 0), min(m.seq), max(m.seq),
                (SELECT accepted_at_ms FROM messages WHERE queue_id = q.queue_id ORDER BY seq LIMIT 1)
         FROM queues q LEFT JOIN messages m ON m.queue_id = q.queue_id
         GROUP BY q.queue_id",
    )?;
    let mut stats = BTreeMap::new();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        let recorded_last_seq = row.get::<_, i64>(1)? as u64;
        let messages = row.get::<_, i64>(2)? as u64;
        let bytes = row.get::<_, i64>(3)? as u64;
        let min_seq: Option<i64> = row.get(4)?;
        let max_seq: Option<i64> = row.get(5)?;
        let last_seq = recorded_last_seq.max(max_seq.map_or(0, |s| s as u64));
        if let (Some(min), Some(max)) = (min_seq, max_seq) {
            let (min, max) = (min as u64, max as u64);
            if max - min + 1 != messages {
                return Err(StoreError::Corrupt(format!(
                    "queue {name:?} holds {messages} messages with seqs {min}..={max}: a sequence gap. \
                     Stop writing to this data directory and keep a copy of it for analysis"
                )));
            }
        }
        let first_seq = min_seq.map(|s| s as u64).unwrap_or(last_seq + 1);
        let oldest_accepted_at_ms: Option<i64> = row.get(6)?;
        stats.insert(
            name.clone(),
            QueueStats { name, messages, bytes, first_seq, last_seq, oldest_accepted_at_ms },
        );
    }
    Ok(stats)
}
