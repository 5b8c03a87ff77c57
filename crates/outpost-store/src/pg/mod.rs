//! The PostgreSQL backend: every central opened on the same database is one cluster sharing its
//! queues, dedup positions, cursors, documents and failed messages.
//!
//! # Pieces
//!
//! - **A pool** ([`PG_POOL_SIZE`] connections, `deadpool-postgres`) for the writer and the reads.
//!   Every connection runs with `synchronous_commit=on` (appended to the URL's own `options`), so
//!   a commit returns only once the WAL is flushed: an acknowledgement means durable.
//! - **One writer task** ([`writer`]) with group commit, like the SQLite writer thread.
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
//! # Modules
//!
//! [`schema`]: the tables and their migrations. [`listen`]: the commit notices, the listener and
//! the refresher that keep the views following the cluster, and cluster events. [`lease`]: leases.
//! [`reads`]: the queries that answer reads from the pool. [`writer`]: the writer task.

mod lease;
pub(crate) mod listen;
mod reads;
mod schema;
pub(crate) mod writer;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use outpost_core::redact::redact_url;
use outpost_tls::postgres::PgTls;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;

use crate::ops::{Op, Views};
use crate::{CommitObserver, StoreError, StoreOptions};
use listen::Refresh;

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

/// The connection settings of `url` and its TLS connector (`sslmode`, `sslrootcert`: see
/// `outpost_tls::postgres`).
fn parse_config(url: &str) -> Result<(tokio_postgres::Config, PgTls), StoreError> {
    let (url, tls) = outpost_tls::postgres::prepare(url)
        .map_err(|e| StoreError::Invalid(format!("postgres URL {}: {e}", redact_url(url))))?;
    let url = url.as_str();
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::Invalid(format!("postgres URL {}: {e}", redact_url(url))))?;
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
        let shown_url = redact_url(url);
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
        schema::migrate(&pool, &shown_url).await?;
        let instance = format!("{}/{}", options.node_id, uuid::Uuid::now_v7());

        // Views first, so the node starts with the cluster's state.
        listen::refresh(&pool, &shown_url, &views, &Refresh::everything()).await?;

        let (refresh_tx, refresh_rx) = mpsc::channel(NOTIFICATION_CAPACITY);
        let mut background = Vec::new();
        background.push(tokio::spawn(listen::run_refresher(
            pool.clone(),
            shown_url.clone(),
            views.clone(),
            commits.clone(),
            refresh_rx,
        )));
        let (listening_tx, listening) = oneshot::channel();
        background.push(tokio::spawn(listen::run_listener(
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
        let writer = writer::PgWriter::new(
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

    /// Ends the listener, the refresher and the lease tasks (after the writer stopped).
    pub(crate) fn stop_background(&self) {
        for task in self.background.lock().expect("background tasks poisoned").drain(..) {
            task.abort();
        }
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
