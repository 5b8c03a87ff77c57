//! The PostgreSQL schema and its migrations.
//!
//! # Schema (version 4, [`PG_SCHEMA_VERSION`]; tables prefixed `outpost_`)
//!
//! ```text
//! outpost_meta(key TEXT PRIMARY KEY, value TEXT)          schema_version, created_at_ms
//! outpost_queues(queue_id BIGSERIAL PRIMARY KEY, name TEXT UNIQUE, last_seq, messages, bytes,
//!                first_seq, oldest_accepted_at_ms, version)
//!                             sizes kept in the same transaction as the messages, so stats are one
//!                             cheap SELECT; the row lock serializes seq assignment across centrals
//! outpost_messages(queue_id, seq, id, origin, origin_seq, content_type, accepted_at_ms,
//!                  payload BYTEA, PRIMARY KEY(queue_id, seq))
//! outpost_idempotency_keys(queue_id, key, seq, id, created_at_ms, PRIMARY KEY(queue_id, key))
//!                             index outpost_idempotency_keys_by_age(created_at_ms)   (version 3)
//!                             for pruning the expired ones oldest first
//! outpost_cursors(queue TEXT, reader TEXT, acked_seq, PRIMARY KEY(queue, reader))
//! outpost_origin_positions(origin TEXT, queue TEXT, last_origin_seq, PRIMARY KEY(origin, queue))
//!                             locked FOR UPDATE by the transaction storing that edge's batch or
//!                             release (a row left at 0 is only that lock, not a position)
//! outpost_documents(key TEXT PRIMARY KEY, value TEXT, updated_at_ms)
//! outpost_failed(id BIGSERIAL PRIMARY KEY, route, queue, seq, message_id, origin, origin_seq,
//!                content_type, accepted_at_ms, payload BYTEA, attempts, reason, last_error,
//!                first_failed_at_ms, last_failed_at_ms, status)
//!                             index outpost_failed_by_route(route, status, id)
//! outpost_leases(name TEXT PRIMARY KEY, holder TEXT, expires_at_ms BIGINT)   database clock
//! outpost_consumers(consumer_id BIGSERIAL PRIMARY KEY, queue, name, head, created_at_ms,
//!                   last_active_at_ms, UNIQUE(queue, name))                      (version 2)
//! outpost_consumer_messages(consumer_id, failed_id, seq, deliveries, leased BOOLEAN,
//!                           visible_at_ms, PRIMARY KEY(consumer_id, failed_id, seq))
//!                             pull consumers, as on SQLite (see `crate::consumers`); a consumer's
//!                             operations hold its queue's row lock
//! outpost_usage(holder TEXT PRIMARY KEY, key_bytes, failed_bytes)                (version 4)
//!                             what idempotency keys (text + 64 bytes each) and failed copies
//!                             (payloads) take, for the quota beside outpost_queues.bytes; kept by
//!                             statement-level AFTER INSERT / AFTER DELETE triggers on
//!                             outpost_idempotency_keys and outpost_failed, one row per central
//!                             (its connections' application_name; '' holds what the migration
//!                             found), so centrals never wait on each other's row; the quota reads
//!                             the sum of every row. A key row taken over (an expired key reused,
//!                             ON CONFLICT DO UPDATE) is not re-counted: it counts once while stored
//! ```
//!
//! Migrations run at open inside one transaction holding `pg_advisory_xact_lock`, so centrals
//! starting together apply them once; a database written by a newer outpost is refused.

use deadpool_postgres::Pool;

use super::{pg_error, pool_error};
use crate::StoreError;

/// Key of the advisory lock migrations run under ("outpost" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x006f_7574_706f_7374;

/// Migrations in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE outpost_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE outpost_queues (
        queue_id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        last_seq BIGINT NOT NULL DEFAULT 0,
        messages BIGINT NOT NULL DEFAULT 0,
        bytes BIGINT NOT NULL DEFAULT 0,
        first_seq BIGINT NOT NULL DEFAULT 1,
        oldest_accepted_at_ms BIGINT,
        version BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE outpost_messages (
        queue_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        id TEXT NOT NULL,
        origin TEXT NOT NULL,
        origin_seq BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        accepted_at_ms BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (queue_id, seq)
    );
    CREATE TABLE outpost_idempotency_keys (
        queue_id BIGINT NOT NULL,
        key TEXT NOT NULL,
        seq BIGINT NOT NULL,
        id TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (queue_id, key)
    );
    CREATE TABLE outpost_cursors (
        queue TEXT NOT NULL,
        reader TEXT NOT NULL,
        acked_seq BIGINT NOT NULL,
        PRIMARY KEY (queue, reader)
    );
    CREATE TABLE outpost_origin_positions (
        origin TEXT NOT NULL,
        queue TEXT NOT NULL,
        last_origin_seq BIGINT NOT NULL,
        PRIMARY KEY (origin, queue)
    );
    CREATE TABLE outpost_documents (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at_ms BIGINT NOT NULL);
    CREATE TABLE outpost_failed (
        id BIGSERIAL PRIMARY KEY,
        route TEXT NOT NULL,
        queue TEXT NOT NULL,
        seq BIGINT NOT NULL,
        message_id TEXT NOT NULL,
        origin TEXT NOT NULL,
        origin_seq BIGINT NOT NULL,
        content_type TEXT NOT NULL,
        accepted_at_ms BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        attempts BIGINT NOT NULL,
        reason TEXT NOT NULL,
        last_error TEXT NOT NULL,
        first_failed_at_ms BIGINT NOT NULL,
        last_failed_at_ms BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('failed', 'resubmitted'))
    );
    CREATE INDEX outpost_failed_by_route ON outpost_failed (route, status, id);
    CREATE TABLE outpost_leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at_ms BIGINT NOT NULL);
",
    "
    CREATE TABLE outpost_consumers (
        consumer_id BIGSERIAL PRIMARY KEY,
        queue TEXT NOT NULL,
        name TEXT NOT NULL,
        head BIGINT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        last_active_at_ms BIGINT NOT NULL,
        UNIQUE (queue, name)
    );
    CREATE TABLE outpost_consumer_messages (
        consumer_id BIGINT NOT NULL,
        failed_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        deliveries BIGINT NOT NULL,
        leased BOOLEAN NOT NULL,
        visible_at_ms BIGINT NOT NULL,
        PRIMARY KEY (consumer_id, failed_id, seq)
    );
",
    "
    CREATE INDEX outpost_idempotency_keys_by_age ON outpost_idempotency_keys (created_at_ms);
", "
    -- What failed copies and idempotency keys take, for the quota: kept by triggers, one row per
    -- central (its connections' application_name) so centrals never wait on each other's row.
    CREATE TABLE outpost_usage (
        holder TEXT PRIMARY KEY,
        key_bytes BIGINT NOT NULL DEFAULT 0,
        failed_bytes BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO outpost_usage (holder, key_bytes, failed_bytes) VALUES (
        '',
        (SELECT coalesce(sum(octet_length(key) + 64), 0) FROM outpost_idempotency_keys),
        (SELECT coalesce(sum(octet_length(payload)), 0) FROM outpost_failed)
    );
    CREATE FUNCTION outpost_count_key_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE delta BIGINT;
    BEGIN
        SELECT coalesce(sum(octet_length(key) + 64), 0) INTO delta FROM changed;
        IF TG_OP = 'DELETE' THEN delta := -delta; END IF;
        IF delta <> 0 THEN
            INSERT INTO outpost_usage (holder, key_bytes) VALUES (current_setting('application_name'), delta)
            ON CONFLICT (holder) DO UPDATE SET key_bytes = outpost_usage.key_bytes + EXCLUDED.key_bytes;
        END IF;
        RETURN NULL;
    END $$;
    CREATE FUNCTION outpost_count_failed_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE delta BIGINT;
    BEGIN
        SELECT coalesce(sum(octet_length(payload)), 0) INTO delta FROM changed;
        IF TG_OP = 'DELETE' THEN delta := -delta; END IF;
        IF delta <> 0 THEN
            INSERT INTO outpost_usage (holder, failed_bytes) VALUES (current_setting('application_name'), delta)
            ON CONFLICT (holder) DO UPDATE SET failed_bytes = outpost_usage.failed_bytes + EXCLUDED.failed_bytes;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER outpost_keys_added AFTER INSERT ON outpost_idempotency_keys
        REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION outpost_count_key_bytes();
    CREATE TRIGGER outpost_keys_removed AFTER DELETE ON outpost_idempotency_keys
        REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION outpost_count_key_bytes();
    CREATE TRIGGER outpost_failed_added AFTER INSERT ON outpost_failed
        REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION outpost_count_failed_bytes();
    CREATE TRIGGER outpost_failed_removed AFTER DELETE ON outpost_failed
        REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION outpost_count_failed_bytes();
",
];

/// The schema version this build writes.
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies the migrations this database has not seen, in one transaction under an advisory lock.
pub(super) async fn migrate(pool: &Pool, url: &str) -> Result<(), StoreError> {
    let mut client = pool.get().await.map_err(|e| pool_error(url, e))?;
    let tx = client.transaction().await.map_err(|e| pg_error(url, e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(|e| pg_error(url, e))?;
    let has_meta: bool = tx
        .query_one("SELECT to_regclass('outpost_meta') IS NOT NULL", &[])
        .await
        .map_err(|e| pg_error(url, e))?
        .get(0);
    let mut version: i64 = if has_meta {
        tx.query_opt("SELECT value FROM outpost_meta WHERE key = 'schema_version'", &[])
            .await
            .map_err(|e| pg_error(url, e))?
            .map(|r| r.get::<_, String>(0).parse::<i64>())
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("outpost_meta.schema_version is not a number: {e}")))?
            .unwrap_or(0)
    } else {
        0
    };
    if version > PG_SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found: version, supported: PG_SCHEMA_VERSION });
    }
    let from = version;
    while version < PG_SCHEMA_VERSION {
        tx.batch_execute(MIGRATIONS[version as usize]).await.map_err(|e| pg_error(url, e))?;
        version += 1;
        tx.execute(
            "INSERT INTO outpost_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&version.to_string()],
        )
        .await
        .map_err(|e| pg_error(url, e))?;
        if version == 1 {
            tx.execute(
                "INSERT INTO outpost_meta (key, value) VALUES ('created_at_ms', $1)",
                &[&outpost_core::time::now_unix_ms().to_string()],
            )
            .await
            .map_err(|e| pg_error(url, e))?;
        }
    }
    tx.commit().await.map_err(|e| pg_error(url, e))?;
    if version != from {
        tracing::info!(from, to = version, postgres = %url, "PostgreSQL schema migrated");
    }
    Ok(())
}
