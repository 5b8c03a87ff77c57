//! The PostgreSQL backend: every central opened on the same database is one cluster sharing its
//! queues, dedup positions, cursors, documents and failed messages.
//!
//! # Pieces
//!
//! - **A pool** ([`PG_POOL_SIZE`] connections, `deadpool-postgres`) for the writer and the reads.
//!   Every connection runs with `synchronous_commit=on` (appended to the URL's own `options`), so
//!   a commit returns only once the WAL is flushed: an acknowledgement means durable.
//! - **One writer task** ([`crate::pg_writer`]) with group commit, like the SQLite writer thread.
//! - **A listener** on a dedicated connection: `LISTEN outpost_commits, outpost_events`. Each
//!   commit that changed data sends `NOTIFY outpost_commits` (inside its transaction, so it is
//!   delivered only if and when the commit is) naming the queues, origin positions and cursors it
//!   changed; the listener of every other central re-reads exactly those rows into its views and
//!   bumps [`crate::Store::commits`]. The connection is re-opened after a loss (every
//!   [`LISTEN_RETRY`]) and everything is reloaded then, since notifications sent meanwhile are lost.
//!   `outpost_events` carries [`crate::Store::publish_cluster_event`].
//! - **Leases** ([`crate::Store::lease`]): one row per name in `outpost_leases`, claimed and renewed
//!   with the database's clock, so clock skew between centrals does not matter.
//!
//! # Staleness of the sync reads
//!
//! `queue_stats`, `queue`, `cursor`, `origin_position(s)` are answered from the views. A commit of
//! this central is in them before its writes are acknowledged. Another central's commit is in them
//! one NOTIFY delivery plus one refresh query later (about a millisecond on a LAN); while the
//! listen connection is down, until it is back and has reloaded (up to [`LISTEN_RETRY`] after the
//! database answers again), and in any case at the next full reload every [`FULL_REFRESH`]. The
//! views only move forward (queue rows carry a version; positions and cursors only grow), so a
//! stale view is an old view, never a wrong one: a stale origin position makes an edge resend what
//! the store then drops as duplicates; a stale queue size is a stale number on a status page.
//!
//! # Schema (version 2; tables prefixed `outpost_`)
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
//! outpost_cursors(queue TEXT, reader TEXT, acked_seq, PRIMARY KEY(queue, reader))
//! outpost_origin_positions(origin TEXT, queue TEXT, last_origin_seq, PRIMARY KEY(origin, queue))
//!                             locked FOR UPDATE by the transaction storing that edge's batch
//! outpost_documents(key TEXT PRIMARY KEY, value TEXT, updated_at_ms)
//! outpost_failed(id BIGSERIAL PRIMARY KEY, route, queue, seq, message_id, origin, origin_seq,
//!                content_type, accepted_at_ms, payload BYTEA, attempts, reason, last_error,
//!                first_failed_at_ms, last_failed_at_ms, status)
//! outpost_leases(name TEXT PRIMARY KEY, holder TEXT, expires_at_ms BIGINT)   database clock
//! outpost_consumers(consumer_id BIGSERIAL PRIMARY KEY, queue, name, head, created_at_ms,
//!                   last_active_at_ms, UNIQUE(queue, name))                      (version 2)
//! outpost_consumer_messages(consumer_id, failed_id, seq, deliveries, leased BOOLEAN,
//!                           visible_at_ms, PRIMARY KEY(consumer_id, failed_id, seq))
//!                             pull consumers, as on SQLite (see `crate::consumers`); a consumer's
//!                             operations hold its queue's row lock
//! ```
//!
//! Migrations run at open inside one transaction holding `pg_advisory_xact_lock`, so centrals
//! starting together apply them once; a database written by a newer outpost is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use outpost_tls::postgres::PgTls;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::AsyncMessage;

use crate::failed::{FailedEntry, FailedQuery, FailedStatus, MAX_FAILED_LIST_LIMIT};
use crate::ops::{Op, Views};
use crate::{pg_writer, CommitObserver, Lease, QueueStats, StoreError, StoreOptions, StoredMessage};

/// Connections of a central's pool (the writer takes one per commit; reads take the others).
pub const PG_POOL_SIZE: usize = 6;
/// The largest `kind` + `body` of a cluster event (a NOTIFY payload holds at most 8000 bytes).
pub const MAX_CLUSTER_EVENT_BYTES: usize = 6000;
/// A lease not renewed for this long may be taken by another central.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often a central renews (or tries to take) each lease it wants.
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// How long one claim or renewal may take before it counts as failed.
pub const LEASE_CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the listener waits before re-opening a lost connection.
pub const LISTEN_RETRY: Duration = Duration::from_secs(1);
/// How often the views are reloaded whole, whatever the notifications said.
pub const FULL_REFRESH: Duration = Duration::from_secs(30);
/// How long a request waits for a pooled connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// How long opening one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of the listener's and refresher's channels.
const NOTIFICATION_CAPACITY: usize = 4096;

pub(crate) const COMMITS_CHANNEL: &str = "outpost_commits";
pub(crate) const EVENTS_CHANNEL: &str = "outpost_events";
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

/// The payload of `NOTIFY outpost_commits`: what one commit changed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct CommitNotice {
    /// The store instance that committed (its own notices are skipped: its views already have it).
    pub from: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cursors: Vec<(String, String)>,
    /// Too much to name: reload everything.
    #[serde(default)]
    pub all: bool,
}

/// The payload of `NOTIFY outpost_events`.
#[derive(Serialize, Deserialize)]
struct EventNotice {
    from: String,
    kind: String,
    body: String,
}

/// What the refresher re-reads.
#[derive(Debug, Default)]
pub(crate) struct Refresh {
    all: bool,
    queues: BTreeSet<String>,
    positions: BTreeSet<(String, String)>,
    cursors: BTreeSet<(String, String)>,
}

impl Refresh {
    fn everything() -> Refresh {
        Refresh { all: true, ..Refresh::default() }
    }

    fn merge(&mut self, other: Refresh) {
        self.all |= other.all;
        if self.all {
            self.queues.clear();
            self.positions.clear();
            self.cursors.clear();
            return;
        }
        self.queues.extend(other.queues);
        self.positions.extend(other.positions);
        self.cursors.extend(other.cursors);
    }
}

pub(crate) struct Postgres {
    pub(crate) pool: Pool,
    /// Unique per open store: `<node_id>/<uuid>`. Lease holder and NOTIFY sender.
    pub(crate) instance: String,
    background: Mutex<Vec<JoinHandle<()>>>,
}

/// Classifies a PostgreSQL error: the database out of disk, unreachable, or anything else.
pub(crate) fn pg_error(url: &str, error: tokio_postgres::Error) -> StoreError {
    if let Some(db) = error.as_db_error() {
        if db.code() == &SqlState::DISK_FULL {
            return StoreError::DiskFull(db.to_string());
        }
        return StoreError::Postgres(db.to_string());
    }
    if error.is_closed() || error.code().is_none() {
        return StoreError::Unavailable { url: url.to_string(), detail: with_causes(&error) };
    }
    StoreError::Postgres(error.to_string())
}

/// "error performing TLS handshake: TLS with PostgreSQL: invalid peer certificate: …".
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Whether retrying the same transaction may succeed (deadlock between centrals, serialization).
pub(crate) fn is_retryable(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(c) if c == &SqlState::T_R_DEADLOCK_DETECTED || c == &SqlState::T_R_SERIALIZATION_FAILURE
    )
}

pub(crate) fn pool_error(url: &str, error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(e) => pg_error(url, e),
        other => StoreError::Unavailable { url: url.to_string(), detail: other.to_string() },
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => {
                    format!("{}{}:***{}", &url[..scheme_end + 3], &credentials[..colon], &url[at..])
                }
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The connection settings of `url` and its TLS connector (`sslmode`, `sslrootcert`: see
/// `outpost_tls::postgres`).
fn parse_config(url: &str) -> Result<(tokio_postgres::Config, PgTls), StoreError> {
    let (url, tls) = outpost_tls::postgres::prepare(url)
        .map_err(|e| StoreError::Invalid(format!("postgres URL {}: {e}", redact(url))))?;
    let url = url.as_str();
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::Invalid(format!("postgres URL {}: {e}", redact(url))))?;
    // An acknowledgement means durable, whatever the server's default or the URL's `options` say:
    // the setting goes last, and PostgreSQL applies a repeated `-c` in order.
    let options = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} -c synchronous_commit=on"),
        _ => "-c synchronous_commit=on".to_string(),
    };
    config.options(&options);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("outpost");
    Ok((config, tls))
}

impl Postgres {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open(
        url: &str,
        options: StoreOptions,
        views: Arc<Views>,
        commits: watch::Sender<u64>,
        events: broadcast::Sender<(String, String)>,
        observer: Option<CommitObserver>,
        ops: mpsc::Receiver<Op>,
    ) -> Result<(Postgres, JoinHandle<()>), StoreError> {
        let shown_url = redact(url);
        let (mut config, tls) = parse_config(url)?;
        // Names this central's row in outpost_usage (see the migrations' triggers).
        config.application_name(format!("outpost {}", options.node_id));
        tracing::info!(postgres = %shown_url, sslmode = tls.mode.as_str(), sslrootcert = ?tls.root_file, "PostgreSQL TLS");
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(PG_POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot build the connection pool: {e}")))?;
        migrate(&pool, &shown_url).await?;
        let instance = format!("{}/{}", options.node_id, uuid::Uuid::now_v7());

        // Views first, so the node starts with the cluster's state.
        refresh(&pool, &shown_url, &views, &Refresh::everything()).await?;

        let (refresh_tx, refresh_rx) = mpsc::channel(NOTIFICATION_CAPACITY);
        let mut background = Vec::new();
        background.push(tokio::spawn(run_refresher(
            pool.clone(),
            shown_url.clone(),
            views.clone(),
            commits.clone(),
            refresh_rx,
        )));
        let (listening_tx, listening) = oneshot::channel();
        background.push(tokio::spawn(run_listener(
            config,
            tls,
            shown_url.clone(),
            instance.clone(),
            refresh_tx.clone(),
            events,
            listening_tx,
        )));
        // Commits of other centrals from now on are followed: the listener reloads everything once
        // it listens, so nothing committed between the load above and its LISTEN is missed, and
        // this store does not answer before it follows the cluster.
        if tokio::time::timeout(CONNECT_TIMEOUT, listening).await.is_err() {
            tracing::warn!(postgres = %shown_url, "the cluster listener is not connected yet; views follow other centrals once it is");
        }
        background.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(FULL_REFRESH);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if refresh_tx.send(Refresh::everything()).await.is_err() {
                    return;
                }
            }
        }));
        let writer = pg_writer::PgWriter::new(
            pool.clone(),
            shown_url.clone(),
            options,
            instance.clone(),
            views,
            commits,
            observer,
        );
        let writer_task = tokio::spawn(writer.run(ops));
        tracing::info!(postgres = %shown_url, %instance, "store opened on PostgreSQL");
        Ok((Postgres { pool, instance, background: Mutex::new(background) }, writer_task))
    }

    fn url(&self) -> String {
        // The pool's manager knows the URL only as a parsed config; keep messages short.
        "the cluster's database".to_string()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| pool_error(&self.url(), e))
    }

    /// Gives up every lease this store holds, so another central takes them at its next renewal
    /// instead of after [`LEASE_TTL`]. Best effort: an unreachable database lets them expire.
    pub(crate) async fn release_leases(&self) {
        let Ok(client) = self.pool.get().await else { return };
        let _ = client.execute("DELETE FROM outpost_leases WHERE holder = $1", &[&self.instance]).await;
    }

    /// Ends the listener, the refresher and the lease tasks (after the writer stopped).
    pub(crate) fn stop_background(&self) {
        for task in self.background.lock().expect("background tasks poisoned").drain(..) {
            task.abort();
        }
    }

    pub(crate) async fn read(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT m.seq, m.id, m.origin, m.origin_seq, m.content_type, m.accepted_at_ms, m.payload
                 FROM outpost_messages m
                 WHERE m.queue_id = (SELECT queue_id FROM outpost_queues WHERE name = $1) AND m.seq > $2
                 ORDER BY m.seq LIMIT $3",
            )
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        let rows = client
            .query(&statement, &[&queue, &(after_seq as i64), &(limit as i64)])
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        Ok(rows
            .iter()
            .map(|row| StoredMessage {
                seq: row.get::<_, i64>(0) as u64,
                id: row.get(1),
                queue: queue.to_string(),
                origin: row.get(2),
                origin_seq: row.get::<_, i64>(3) as u64,
                content_type: row.get(4),
                accepted_at_ms: row.get(5),
                payload: Bytes::from(row.get::<_, Vec<u8>>(6)),
            })
            .collect())
    }

    pub(crate) async fn documents(&self, prefix: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key, value FROM outpost_documents WHERE starts_with(key, $1) ORDER BY key",
                &[&prefix],
            )
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub(crate) async fn fresh_cursor(
        &self,
        views: &Views,
        queue: &str,
        reader: &str,
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT acked_seq FROM outpost_cursors WHERE queue = $1 AND reader = $2",
                &[&queue, &reader],
            )
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        let acked = row.map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0);
        let mut cursors = views.cursors.write().expect("views lock poisoned");
        let entry = cursors.entry((queue.to_string(), reader.to_string())).or_insert(0);
        *entry = (*entry).max(acked);
        Ok(*entry)
    }

    pub(crate) async fn publish_event(&self, kind: &str, body: &str) -> Result<(), StoreError> {
        let payload = serde_json::to_string(&EventNotice {
            from: self.instance.clone(),
            kind: kind.to_string(),
            body: body.to_string(),
        })
        .expect("an event notice serializes");
        if payload.len() >= 7900 {
            return Err(StoreError::Invalid(format!(
                "cluster event {kind:?} is {} bytes once escaped; NOTIFY carries at most 7999",
                payload.len()
            )));
        }
        let client = self.client().await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&EVENTS_CHANNEL, &payload])
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        Ok(())
    }

    pub(crate) fn lease(&self, name: &str) -> watch::Receiver<Lease> {
        let (lease_tx, lease) = watch::channel(Lease::NOT_HELD);
        let pool = self.pool.clone();
        let name = name.to_string();
        let holder = self.instance.clone();
        let task = tokio::spawn(async move {
            keep_lease(&pool, &name, &holder, &lease_tx).await;
            if lease_tx.borrow().held {
                if let Ok(client) = pool.get().await {
                    let _ = client
                        .execute(
                            "DELETE FROM outpost_leases WHERE name = $1 AND holder = $2",
                            &[&name, &holder],
                        )
                        .await;
                }
            }
        });
        let mut background = self.background.lock().expect("background tasks poisoned");
        background.retain(|task| !task.is_finished());
        background.push(task);
        lease
    }

    pub(crate) async fn failed(&self, query: &FailedQuery) -> Result<Vec<FailedEntry>, StoreError> {
        let limit = query.limit.min(MAX_FAILED_LIST_LIMIT) as i64;
        let payload_column = if query.with_payload { ", payload" } else { "" };
        let sql = format!(
            "SELECT {ENTRY_COLUMNS}{payload_column} FROM outpost_failed
             WHERE ($1::text IS NULL OR route = $1) AND status = $2 AND id > $3 ORDER BY id LIMIT $4"
        );
        let client = self.client().await?;
        let rows = client
            .query(&sql, &[&query.route, &query.status.as_str(), &query.after_id, &limit])
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        rows.iter().map(|row| entry_from_row(row, query.with_payload)).collect()
    }

    pub(crate) async fn consumers(
        &self,
        queue: &str,
        now_ms: i64,
    ) -> Result<Vec<crate::consumers::ConsumerView>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT c.name, coalesce(cu.acked_seq, 0), c.head, c.created_at_ms, c.last_active_at_ms,
                        (SELECT count(*) FROM outpost_consumer_messages m WHERE m.consumer_id = c.consumer_id
                           AND m.leased AND m.visible_at_ms > $2),
                        (SELECT count(*) FROM outpost_consumer_messages m WHERE m.consumer_id = c.consumer_id
                           AND NOT (m.leased AND m.visible_at_ms > $2)),
                        (SELECT coalesce(max(deliveries), 0) FROM outpost_consumer_messages m
                           WHERE m.consumer_id = c.consumer_id),
                        coalesce(q.last_seq, 0)
                 FROM outpost_consumers c
                 LEFT JOIN outpost_queues q ON q.name = c.queue
                 LEFT JOIN outpost_cursors cu ON cu.queue = c.queue AND cu.reader = 'consumer:' || c.name
                 WHERE c.queue = $1 ORDER BY c.name",
                &[&queue, &now_ms],
            )
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        Ok(rows
            .iter()
            .map(|r| {
                crate::consumers::view(
                    r.get(0),
                    r.get::<_, i64>(1) as u64,
                    r.get::<_, i64>(2) as u64,
                    r.get::<_, i64>(8) as u64,
                    r.get::<_, i64>(5) as u64,
                    r.get::<_, i64>(6) as u64,
                    r.get::<_, i64>(7) as u32,
                    r.get(3),
                    r.get(4),
                )
            })
            .collect())
    }

    pub(crate) async fn failed_entry(&self, id: i64) -> Result<Option<FailedEntry>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {ENTRY_COLUMNS} FROM outpost_failed WHERE id = $1"), &[&id])
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        row.map(|row| entry_from_row(&row, false)).transpose()
    }

    pub(crate) async fn failed_counts(
        &self,
        status: FailedStatus,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT route, count(*) FROM outpost_failed WHERE status = $1 GROUP BY route",
                &[&status.as_str()],
            )
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect())
    }
}

const ENTRY_COLUMNS: &str =
    "id, route, queue, seq, message_id, origin, origin_seq, content_type, accepted_at_ms,
     attempts, reason, last_error, first_failed_at_ms, last_failed_at_ms, status";

fn entry_from_row(row: &tokio_postgres::Row, with_payload: bool) -> Result<FailedEntry, StoreError> {
    Ok(FailedEntry {
        id: row.get(0),
        route: row.get(1),
        queue: row.get(2),
        seq: row.get::<_, i64>(3) as u64,
        message_id: row.get(4),
        origin: row.get(5),
        origin_seq: row.get::<_, i64>(6) as u64,
        content_type: row.get(7),
        accepted_at_ms: row.get(8),
        payload: with_payload.then(|| Bytes::from(row.get::<_, Vec<u8>>(15))),
        attempts: row.get::<_, i64>(9) as u32,
        reason: row.get(10),
        last_error: row.get(11),
        first_failed_at_ms: row.get(12),
        last_failed_at_ms: row.get(13),
        status: FailedStatus::parse(row.get(14))?,
    })
}

/// Claims and renews `name` for `holder` every [`LEASE_RENEW_INTERVAL`] until every receiver is
/// gone, publishing what this node may believe. A claim counts from the moment it was sent, by this
/// node's monotonic clock, until a renew interval before the TTL the other centrals go by; a claim
/// that takes longer than [`LEASE_CLAIM_TIMEOUT`] failed. When the validity runs out before a
/// renewal came back (a slow database, a starved or frozen process), the lease is published as lost
/// at that moment, not when the renewal finally answers.
async fn keep_lease(pool: &Pool, name: &str, holder: &str, lease_tx: &watch::Sender<Lease>) {
    let publish = |lease: Lease| {
        lease_tx.send_if_modified(|current| {
            // Receivers wake only when the lease changes hands; a renewal just moves its end.
            let changed = current.held != lease.held;
            if changed {
                tracing::info!(lease = %name, held = lease.held, "lease changed hands");
            }
            *current = lease;
            changed
        });
    };
    let mut ticker = tokio::time::interval(LEASE_RENEW_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut current = *lease_tx.borrow();
        tokio::select! {
            biased;
            _ = lease_tx.closed() => return,
            _ = sleep_until_end(current), if current.held => {
                tracing::warn!(lease = %name, "the lease ran out before it could be renewed");
                publish(Lease::NOT_HELD);
                continue;
            }
            _ = ticker.tick() => {}
        }
        let sent_at = Instant::now();
        let claim = tokio::time::timeout(LEASE_CLAIM_TIMEOUT, claim_lease(pool, name, holder));
        tokio::pin!(claim);
        let answer = loop {
            current = *lease_tx.borrow();
            tokio::select! {
                biased;
                _ = sleep_until_end(current), if current.held => {
                    tracing::warn!(lease = %name, "the lease ran out while its renewal was waiting for the database");
                    publish(Lease::NOT_HELD);
                }
                answer = &mut claim => break answer,
            }
        };
        match answer {
            Ok(Ok(true)) => {
                publish(Lease { held: true, valid_until: Some(sent_at + LEASE_TTL - LEASE_RENEW_INTERVAL) })
            }
            Ok(Ok(false)) => publish(Lease::NOT_HELD),
            Ok(Err(e)) => {
                // Kept only until its end: the loop's timer gives it up then.
                tracing::warn!(lease = %name, held = lease_tx.borrow().is_valid(), "cannot renew the lease: {e}");
            }
            Err(_) => {
                tracing::warn!(lease = %name, held = lease_tx.borrow().is_valid(),
                    "cannot renew the lease: the database did not answer within {LEASE_CLAIM_TIMEOUT:?}");
            }
        }
    }
}

/// Resolves at the end of a held lease's validity.
async fn sleep_until_end(lease: Lease) {
    match lease.valid_until {
        Some(until) => tokio::time::sleep_until(until.into()).await,
        None => std::future::pending().await,
    }
}

/// Claims or renews `name` for `holder`: true when `holder` holds it now.
async fn claim_lease(pool: &Pool, name: &str, holder: &str) -> Result<bool, StoreError> {
    let client = pool.get().await.map_err(|e| pool_error("the cluster's database", e))?;
    let row = client
        .query_opt(
            "INSERT INTO outpost_leases (name, holder, expires_at_ms)
             VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3)
             ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at_ms = EXCLUDED.expires_at_ms
             WHERE outpost_leases.holder = EXCLUDED.holder
                OR outpost_leases.expires_at_ms < (extract(epoch FROM clock_timestamp()) * 1000)::bigint
             RETURNING holder",
            &[&name, &holder, &(LEASE_TTL.as_millis() as i64)],
        )
        .await
        .map_err(|e| pg_error("the cluster's database", e))?;
    Ok(row.is_some())
}

/// Applies the migrations this database has not seen, in one transaction under an advisory lock.
async fn migrate(pool: &Pool, url: &str) -> Result<(), StoreError> {
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

/// Merges queue stats read at `version` into the views, unless they already hold a newer version.
pub(crate) fn merge_stats(views: &Views, rows: impl IntoIterator<Item = (QueueStats, i64)>) {
    let mut stats = views.stats.write().expect("views lock poisoned");
    let mut versions = views.stat_versions.write().expect("views lock poisoned");
    for (queue, version) in rows {
        let known = versions.get(&queue.name).copied();
        if known.is_none_or(|known| version >= known) {
            versions.insert(queue.name.clone(), version);
            stats.insert(queue.name.clone(), queue);
        }
    }
}

/// Merges positions or cursors (both only grow) into a view.
pub(crate) fn merge_max(
    view: &std::sync::RwLock<std::collections::HashMap<(String, String), u64>>,
    rows: impl IntoIterator<Item = ((String, String), u64)>,
) {
    let mut view = view.write().expect("views lock poisoned");
    for (key, value) in rows {
        let entry = view.entry(key).or_insert(0);
        *entry = (*entry).max(value);
    }
}

fn stats_from_row(row: &tokio_postgres::Row) -> (QueueStats, i64) {
    (
        QueueStats {
            name: row.get(0),
            last_seq: row.get::<_, i64>(1) as u64,
            messages: row.get::<_, i64>(2) as u64,
            bytes: row.get::<_, i64>(3) as u64,
            first_seq: row.get::<_, i64>(4) as u64,
            oldest_accepted_at_ms: row.get(5),
        },
        row.get(6),
    )
}

const STATS_COLUMNS: &str = "name, last_seq, messages, bytes, first_seq, oldest_accepted_at_ms, version";

/// Re-reads what `what` names into the views.
async fn refresh(pool: &Pool, url: &str, views: &Views, what: &Refresh) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(|e| pool_error(url, e))?;
    let e = |e| pg_error(url, e);
    if what.all {
        let stats =
            client.query(&format!("SELECT {STATS_COLUMNS} FROM outpost_queues"), &[]).await.map_err(e)?;
        merge_stats(views, stats.iter().map(stats_from_row));
        let positions = client
            .query("SELECT origin, queue, last_origin_seq FROM outpost_origin_positions", &[])
            .await
            .map_err(e)?;
        merge_max(
            &views.origin_positions,
            positions.iter().map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u64)),
        );
        let cursors =
            client.query("SELECT queue, reader, acked_seq FROM outpost_cursors", &[]).await.map_err(e)?;
        merge_max(&views.cursors, cursors.iter().map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u64)));
        return Ok(());
    }
    if !what.queues.is_empty() {
        let names: Vec<&str> = what.queues.iter().map(String::as_str).collect();
        let stats = client
            .query(&format!("SELECT {STATS_COLUMNS} FROM outpost_queues WHERE name = ANY($1)"), &[&names])
            .await
            .map_err(e)?;
        merge_stats(views, stats.iter().map(stats_from_row));
    }
    if !what.positions.is_empty() {
        let (origins, queues): (Vec<&str>, Vec<&str>) =
            what.positions.iter().map(|(o, q)| (o.as_str(), q.as_str())).unzip();
        let rows = client
            .query(
                "SELECT p.origin, p.queue, p.last_origin_seq FROM outpost_origin_positions p
                 JOIN unnest($1::text[], $2::text[]) AS k(origin, queue) ON k.origin = p.origin AND k.queue = p.queue",
                &[&origins, &queues],
            )
            .await
            .map_err(e)?;
        merge_max(
            &views.origin_positions,
            rows.iter().map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u64)),
        );
    }
    if !what.cursors.is_empty() {
        let (queues, readers): (Vec<&str>, Vec<&str>) =
            what.cursors.iter().map(|(q, r)| (q.as_str(), r.as_str())).unzip();
        let rows = client
            .query(
                "SELECT c.queue, c.reader, c.acked_seq FROM outpost_cursors c
                 JOIN unnest($1::text[], $2::text[]) AS k(queue, reader) ON k.queue = c.queue AND k.reader = c.reader",
                &[&queues, &readers],
            )
            .await
            .map_err(e)?;
        merge_max(&views.cursors, rows.iter().map(|r| ((r.get(0), r.get(1)), r.get::<_, i64>(2) as u64)));
    }
    Ok(())
}

/// Takes every waiting refresh request into one set of queries, then tells `commits` waiters.
async fn run_refresher(
    pool: Pool,
    url: String,
    views: Arc<Views>,
    commits: watch::Sender<u64>,
    mut requests: mpsc::Receiver<Refresh>,
) {
    while let Some(first) = requests.recv().await {
        let mut what = first;
        while let Ok(more) = requests.try_recv() {
            what.merge(more);
        }
        loop {
            match refresh(&pool, &url, &views, &what).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(
                        "cannot refresh the views from PostgreSQL, retrying in {LISTEN_RETRY:?}: {e}"
                    );
                    tokio::time::sleep(LISTEN_RETRY).await;
                    while let Ok(more) = requests.try_recv() {
                        what.merge(more);
                    }
                }
            }
        }
        commits.send_modify(|generation| *generation += 1);
    }
}

/// Follows `outpost_commits` and `outpost_events` on a dedicated connection, reconnecting after a
/// loss (and then reloading everything: notifications sent meanwhile are lost).
async fn run_listener(
    config: tokio_postgres::Config,
    tls: PgTls,
    url: String,
    instance: String,
    refresh: mpsc::Sender<Refresh>,
    events: broadcast::Sender<(String, String)>,
    listening: oneshot::Sender<()>,
) {
    let mut listening = Some(listening);
    loop {
        match listen_once(&config, &tls, &instance, &refresh, &events, &mut listening).await {
            Ok(()) => return, // the refresher is gone: the store is closing
            Err(e) => {
                tracing::warn!(postgres = %url, "the cluster listener lost its connection, reconnecting in {LISTEN_RETRY:?}: {e}");
            }
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &PgTls,
    instance: &str,
    refresh: &mpsc::Sender<Refresh>,
    events: &broadcast::Sender<(String, String)>,
    listening: &mut Option<oneshot::Sender<()>>,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(tls.clone()).await.map_err(|e| e.to_string())?;
    let (notifications_tx, mut notifications) = mpsc::channel(NOTIFICATION_CAPACITY);
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if notifications_tx.send(n).await.is_err() {
                        return "listener stopped".to_string();
                    }
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "connection closed".to_string()
    });
    let guard = AbortOnDrop(driver);
    client
        .batch_execute(&format!("LISTEN {COMMITS_CHANNEL}; LISTEN {EVENTS_CHANNEL}"))
        .await
        .map_err(|e| e.to_string())?;
    // Whatever was committed before the LISTEN took effect (at startup, or while the connection
    // was lost) came with no notification: reload it all once.
    if refresh.send(Refresh::everything()).await.is_err() {
        return Ok(());
    }
    if let Some(listening) = listening.take() {
        let _ = listening.send(());
    }
    while let Some(notification) = notifications.recv().await {
        match notification.channel() {
            COMMITS_CHANNEL => {
                let notice: CommitNotice = match serde_json::from_str(notification.payload()) {
                    Ok(notice) => notice,
                    Err(e) => {
                        tracing::warn!("unreadable commit notice, reloading everything: {e}");
                        CommitNotice { all: true, ..CommitNotice::default() }
                    }
                };
                if notice.from == instance {
                    continue;
                }
                let request = Refresh {
                    all: notice.all,
                    queues: notice.queues.into_iter().collect(),
                    positions: notice.positions.into_iter().collect(),
                    cursors: notice.cursors.into_iter().collect(),
                };
                if refresh.send(request).await.is_err() {
                    return Ok(());
                }
            }
            EVENTS_CHANNEL => match serde_json::from_str::<EventNotice>(notification.payload()) {
                Ok(notice) if notice.from != instance => {
                    let _ = events.send((notice.kind, notice.body));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("unreadable cluster event skipped: {e}"),
            },
            _ => {}
        }
    }
    let reason = match guard.0.is_finished() {
        true => "connection ended".to_string(),
        false => "notification channel closed".to_string(),
    };
    drop(client);
    Err(reason)
}

struct AbortOnDrop(JoinHandle<String>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_config;

    /// Regression (issue 11): `synchronous_commit` was forced only when the URL had no `options`,
    /// so `?options=-c synchronous_commit=off` switched durability off. Checked on a real server.
    #[tokio::test]
    async fn synchronous_commit_is_on_whatever_the_url_says() {
        let admin = std::env::var("OUTPOST_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let separator = if admin.contains('?') { '&' } else { '?' };
        let url = format!("{admin}{separator}options=-c%20synchronous_commit%3Doff%20-c%20work_mem%3D8MB");
        let (config, tls) = parse_config(&url).unwrap();
        let (client, connection) = config.connect(tls).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} (OUTPOST_TEST_POSTGRES) does not answer: {e}; run scripts/ensure-postgres.sh")
        });
        tokio::spawn(connection);
        let setting: String = client.query_one("SHOW synchronous_commit", &[]).await.unwrap().get(0);
        assert_eq!(setting, "on");
        // The URL's other options still apply.
        let work_mem: String = client.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(work_mem, "8MB");
    }
}
