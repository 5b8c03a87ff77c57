//! How a central's views follow the cluster: the notice each commit sends, the listener on a
//! dedicated connection, the refresher that re-reads what the notices name, and cluster events.

use std::collections::BTreeSet;
use std::sync::Arc;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use outpost_tls::postgres::PgTls;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::{
    pg_error, pool_error, Postgres, COMMITS_CHANNEL, EVENTS_CHANNEL, LISTEN_RETRY, NOTIFICATION_CAPACITY,
};
use crate::ops::Views;
use crate::{QueueStats, StoreError};

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
    pub(super) fn everything() -> Refresh {
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

impl Postgres {
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
    view: &std::sync::RwLock<std::collections::BTreeMap<(String, String), u64>>,
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
pub(super) async fn refresh(pool: &Pool, url: &str, views: &Views, what: &Refresh) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(|e| pool_error(url, e))?;
    let e = |e| pg_error(url, e);
    if what.all {
        let stats =
            client.query(&format!("SELECT {STATS_COLUMNS} FROM outpost_queues"), &[]).await.map_err(e)?;
        merge_stats(views, stats.iter().map(stats_from_row));
        let positions = client
            // A row at 0 is a lock placeholder (a writer creates one to lock it), not a position.
            .query("SELECT origin, queue, last_origin_seq FROM outpost_origin_positions WHERE last_origin_seq > 0", &[])
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
                 JOIN unnest($1::text[], $2::text[]) AS k(origin, queue) ON k.origin = p.origin AND k.queue = p.queue
                 WHERE p.last_origin_seq > 0",
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
pub(super) async fn run_refresher(
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
pub(super) async fn run_listener(
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
