//! Failed messages: copies of the messages a route gave up on, kept until an operator resubmits
//! or discards them (CONTRACT section 3, `/v1/failed`).
//!
//! # Invariants
//!
//! - **Failing is atomic with moving on.** [`Store::fail_message`] inserts the copy and advances the
//!   route's cursor past the message in one transaction, so a crash can neither lose the message
//!   (cursor moved, no copy) nor fail it twice (copy kept, cursor not moved).
//! - **Ids are never reused** (`AUTOINCREMENT`): an id an operator saw names that entry or nothing.
//! - **One entry per failure of a message on a route.** A resubmitted entry that fails again is
//!   updated in place (`status` back to `failed`, attempts added, first failure time kept).
//! - For one route, ids increase with the queue's seq (a route fails messages in queue order), so
//!   "resubmitted entries in id order" is queue order.
//!
//! Statuses: `failed` (waiting for an operator) and `resubmitted` (put back on its route, which
//! delivers it before continuing with the queue and then removes the entry).

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use rusqlite::{params, OptionalExtension, Transaction};

use crate::ops::Op;
use crate::{Backend, Store, StoreError, StoredMessage};

/// The most ids one bulk resubmit may name.
pub const MAX_RESUBMIT_IDS: usize = 10_000;
/// The most entries one list returns.
pub const MAX_FAILED_LIST_LIMIT: usize = 1_000;

/// Where a failed entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedStatus {
    /// Waiting for an operator: listed by `GET /v1/failed`.
    Failed,
    /// Put back on its route; leaves the table once delivered.
    Resubmitted,
}

impl FailedStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FailedStatus::Failed => "failed",
            FailedStatus::Resubmitted => "resubmitted",
        }
    }

    pub(crate) fn parse(text: &str) -> Result<FailedStatus, StoreError> {
        match text {
            "failed" => Ok(FailedStatus::Failed),
            "resubmitted" => Ok(FailedStatus::Resubmitted),
            other => Err(StoreError::Corrupt(format!("failed entry with unknown status {other:?}"))),
        }
    }
}

/// A message a route gives up on.
#[derive(Debug, Clone)]
pub struct NewFailure {
    pub route: String,
    /// The route's cursor in the message's queue; moved past the message in the same commit.
    pub reader: String,
    pub message: StoredMessage,
    pub attempts: u32,
    /// What the policy decided (`poison: http:400`, `max_attempts: timeout`, `expired`).
    pub reason: String,
    /// The last error in full (class, endpoint, detail).
    pub last_error: String,
}

/// One entry of the failed table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEntry {
    pub id: i64,
    pub route: String,
    pub queue: String,
    pub seq: u64,
    pub message_id: String,
    pub origin: String,
    pub origin_seq: u64,
    pub content_type: String,
    pub accepted_at_ms: i64,
    /// `None` when the query asked for no payloads (lists).
    pub payload: Option<Bytes>,
    pub attempts: u32,
    pub reason: String,
    pub last_error: String,
    pub first_failed_at_ms: i64,
    pub last_failed_at_ms: i64,
    pub status: FailedStatus,
}

/// Which entries a bulk resubmit names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailedSelector {
    /// Every `failed` entry of the route.
    Route(String),
    /// These entries; if any does not exist, none is changed.
    Ids(Vec<i64>),
}

/// The outcome of a resubmit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResubmitOutcome {
    /// `(id, route)` of each entry now `resubmitted` (including ones that already were).
    pub resubmitted: Vec<(i64, String)>,
    /// Ids that name no entry; when not empty, nothing was changed.
    pub unknown: Vec<i64>,
}

/// A change to existing entries (the writer applies it).
#[derive(Debug, Clone)]
pub(crate) enum FailedChange {
    Resubmit(FailedSelector),
    FailedAgain { id: i64, attempts: u32, reason: String, last_error: String },
    Remove { id: i64 },
}

/// What the writer answers to a failed-table operation.
#[derive(Debug)]
pub(crate) enum FailedOutcome {
    Inserted(i64),
    Changed(bool),
    Resubmitted(ResubmitOutcome),
}

/// What to list.
#[derive(Debug, Clone)]
pub struct FailedQuery {
    pub route: Option<String>,
    pub status: FailedStatus,
    /// Only entries with a larger id (paging).
    pub after_id: i64,
    pub limit: usize,
    pub with_payload: bool,
}

/// Inserts the copy of a failed message; the caller advances the cursor in the same transaction.
pub(crate) fn insert(tx: &Transaction<'_>, failure: &NewFailure, now_ms: i64) -> Result<i64, StoreError> {
    let m = &failure.message;
    tx.prepare_cached(
        "INSERT INTO failed (route, queue, seq, message_id, origin, origin_seq, content_type, accepted_at_ms,
                             payload, attempts, reason, last_error, first_failed_at_ms, last_failed_at_ms, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, 'failed')",
    )?
    .execute(params![
        failure.route,
        m.queue,
        m.seq as i64,
        m.id,
        m.origin,
        m.origin_seq as i64,
        m.content_type,
        m.accepted_at_ms,
        &m.payload[..],
        failure.attempts,
        failure.reason,
        failure.last_error,
        now_ms
    ])?;
    Ok(tx.last_insert_rowid())
}

/// Applies a change to existing entries.
/// `freed_bytes` gets the payload bytes of entries removed (they count against the quota).
pub(crate) fn apply_change(
    tx: &Transaction<'_>,
    change: &FailedChange,
    now_ms: i64,
    freed_bytes: &mut u64,
) -> Result<FailedOutcome, StoreError> {
    match change {
        FailedChange::Resubmit(FailedSelector::Route(route)) => {
            let ids: Vec<i64> = tx
                .prepare_cached("SELECT id FROM failed WHERE route = ?1 AND status = 'failed' ORDER BY id")?
                .query_map([route], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            tx.prepare_cached(
                "UPDATE failed SET status = 'resubmitted' WHERE route = ?1 AND status = 'failed'",
            )?
            .execute([route])?;
            let resubmitted = ids.into_iter().map(|id| (id, route.clone())).collect();
            Ok(FailedOutcome::Resubmitted(ResubmitOutcome { resubmitted, unknown: Vec::new() }))
        }
        FailedChange::Resubmit(FailedSelector::Ids(ids)) => {
            crate::ops::check_resubmit_ids(ids)?;
            let mut routes = HashMap::with_capacity(ids.len());
            {
                let mut lookup = tx.prepare_cached("SELECT route FROM failed WHERE id = ?1")?;
                for id in ids {
                    if let Some(route) = lookup.query_row([id], |r| r.get::<_, String>(0)).optional()? {
                        routes.insert(*id, route);
                    }
                }
            }
            let outcome = crate::ops::plan_resubmit_ids(ids, &routes);
            // No change unless every id exists (then `resubmitted` is empty).
            let mut update = tx.prepare_cached("UPDATE failed SET status = 'resubmitted' WHERE id = ?1")?;
            for (id, _) in &outcome.resubmitted {
                update.execute([id])?;
            }
            Ok(FailedOutcome::Resubmitted(outcome))
        }
        FailedChange::FailedAgain { id, attempts, reason, last_error } => {
            let changed = tx
                .prepare_cached(
                    "UPDATE failed SET status = 'failed', attempts = attempts + ?2, reason = ?3, last_error = ?4,
                                       last_failed_at_ms = ?5
                     WHERE id = ?1",
                )?
                .execute(params![id, attempts, reason, last_error, now_ms])?;
            Ok(FailedOutcome::Changed(changed > 0))
        }
        FailedChange::Remove { id } => {
            let removed: Option<i64> = tx
                .prepare_cached("DELETE FROM failed WHERE id = ?1 RETURNING length(payload)")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            *freed_bytes += removed.unwrap_or(0).max(0) as u64;
            Ok(FailedOutcome::Changed(removed.is_some()))
        }
    }
}

/// The columns an entry is read from, in this order, on both backends (the payload, when asked
/// for, comes after them).
pub(crate) const ENTRY_COLUMNS: &str =
    "id, route, queue, seq, message_id, origin, origin_seq, content_type, accepted_at_ms,
     attempts, reason, last_error, first_failed_at_ms, last_failed_at_ms, status";

fn entry_from_row(row: &rusqlite::Row<'_>, with_payload: bool) -> rusqlite::Result<(FailedEntry, String)> {
    let status: String = row.get(14)?;
    let payload = if with_payload { Some(Bytes::from(row.get::<_, Vec<u8>>(15)?)) } else { None };
    Ok((
        FailedEntry {
            id: row.get(0)?,
            route: row.get(1)?,
            queue: row.get(2)?,
            seq: row.get::<_, i64>(3)? as u64,
            message_id: row.get(4)?,
            origin: row.get(5)?,
            origin_seq: row.get::<_, i64>(6)? as u64,
            content_type: row.get(7)?,
            accepted_at_ms: row.get(8)?,
            payload,
            attempts: row.get(9)?,
            reason: row.get(10)?,
            last_error: row.get(11)?,
            first_failed_at_ms: row.get(12)?,
            last_failed_at_ms: row.get(13)?,
            status: FailedStatus::Failed,
        },
        status,
    ))
}

fn finish(rows: Vec<(FailedEntry, String)>) -> Result<Vec<FailedEntry>, StoreError> {
    rows.into_iter()
        .map(|(mut entry, status)| {
            entry.status = FailedStatus::parse(&status)?;
            Ok(entry)
        })
        .collect()
}

impl Store {
    /// Records that `failure.route` gave up on a message: stores a copy in the failed table and
    /// moves the route's cursor past the message, in one commit. Returns the entry's id.
    pub async fn fail_message(&self, failure: NewFailure) -> Result<i64, StoreError> {
        match self.call(|reply| Op::FailMessage { failure: Box::new(failure), reply }).await? {
            FailedOutcome::Inserted(id) => Ok(id),
            other => unreachable!("fail_message answered {other:?}"),
        }
    }

    async fn change_failed(&self, change: FailedChange) -> Result<FailedOutcome, StoreError> {
        self.call(|reply| Op::ChangeFailed { change, reply }).await
    }

    /// Puts entries back on their routes (`status = resubmitted`). With [`FailedSelector::Ids`],
    /// nothing changes unless every id exists.
    pub async fn resubmit_failed(&self, selector: FailedSelector) -> Result<ResubmitOutcome, StoreError> {
        match self.change_failed(FailedChange::Resubmit(selector)).await? {
            FailedOutcome::Resubmitted(outcome) => Ok(outcome),
            other => unreachable!("resubmit answered {other:?}"),
        }
    }

    /// A resubmitted entry failed again: back to `failed`, `attempts` added to its count. False if
    /// the entry no longer exists (discarded meanwhile).
    pub async fn fail_again(
        &self,
        id: i64,
        attempts: u32,
        reason: String,
        last_error: String,
    ) -> Result<bool, StoreError> {
        match self.change_failed(FailedChange::FailedAgain { id, attempts, reason, last_error }).await? {
            FailedOutcome::Changed(changed) => Ok(changed),
            other => unreachable!("fail_again answered {other:?}"),
        }
    }

    /// Removes an entry (delivered after a resubmit, or discarded). False if there was none.
    pub async fn remove_failed(&self, id: i64) -> Result<bool, StoreError> {
        match self.change_failed(FailedChange::Remove { id }).await? {
            FailedOutcome::Changed(changed) => Ok(changed),
            other => unreachable!("remove_failed answered {other:?}"),
        }
    }

    /// Entries by id. Blocking, like [`Store::read_blocking`].
    pub fn failed_blocking(&self, query: &FailedQuery) -> Result<Vec<FailedEntry>, StoreError> {
        let sqlite = match &self.inner.backend {
            Backend::Sqlite(sqlite) => sqlite,
            Backend::Postgres(pg) => return tokio::runtime::Handle::current().block_on(pg.failed(query)),
        };
        let limit = query.limit.min(MAX_FAILED_LIST_LIMIT) as i64;
        let payload_column = if query.with_payload { ", payload" } else { "" };
        let rows = sqlite.with_reader(|conn| {
            let sql = format!(
                "SELECT {ENTRY_COLUMNS}{payload_column} FROM failed
                 WHERE (?1 IS NULL OR route = ?1) AND status = ?2 AND id > ?3 ORDER BY id LIMIT ?4"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(params![query.route, query.status.as_str(), query.after_id, limit], |row| {
                    entry_from_row(row, query.with_payload)
                })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from_sqlite)
        })?;
        finish(rows)
    }

    /// Entries by id.
    pub async fn failed(&self, query: FailedQuery) -> Result<Vec<FailedEntry>, StoreError> {
        if let Backend::Postgres(pg) = &self.inner.backend {
            return pg.failed(&query).await;
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.failed_blocking(&query))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// One entry without its payload, whatever its status.
    pub async fn failed_entry(&self, id: i64) -> Result<Option<FailedEntry>, StoreError> {
        if let Backend::Postgres(pg) = &self.inner.backend {
            return pg.failed_entry(id).await;
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let Backend::Sqlite(sqlite) = &store.inner.backend else { unreachable!("checked above") };
            let rows = sqlite.with_reader(|conn| {
                conn.prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM failed WHERE id = ?1"))
                    .and_then(|mut stmt| stmt.query_row([id], |row| entry_from_row(row, false)).optional())
                    .map_err(StoreError::from_sqlite)
            })?;
            finish(rows.into_iter().collect()).map(|mut entries| entries.pop())
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// How many entries with `status` each route has (routes with none are absent).
    pub async fn failed_counts(&self, status: FailedStatus) -> Result<BTreeMap<String, u64>, StoreError> {
        if let Backend::Postgres(pg) = &self.inner.backend {
            return pg.failed_counts(status).await;
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let Backend::Sqlite(sqlite) = &store.inner.backend else { unreachable!("checked above") };
            sqlite.with_reader(|conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT route, count(*) FROM failed WHERE status = ?1 GROUP BY route")?;
                let rows =
                    stmt.query_map([status.as_str()], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
                rows.collect::<Result<BTreeMap<_, _>, _>>().map_err(StoreError::from_sqlite)
            })
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewMessage, StoreOptions};
    use std::sync::Arc;

    fn open(dir: &std::path::Path) -> Store {
        let options = StoreOptions {
            readers_of: Arc::new(|_| vec!["route:r".to_string()]),
            ..StoreOptions::keep_everything(1 << 30, "node-a")
        };
        Store::open(dir, options, None).unwrap()
    }

    fn query(route: &str, status: FailedStatus) -> FailedQuery {
        FailedQuery { route: Some(route.into()), status, after_id: 0, limit: 100, with_payload: true }
    }

    async fn append(store: &Store, payloads: &[&str]) -> Vec<StoredMessage> {
        let messages = payloads
            .iter()
            .map(|p| NewMessage {
                payload: Bytes::from(p.to_string()),
                content_type: "text/plain".into(),
                origin: None,
                id: None,
            })
            .collect();
        store.append("q", messages, None).await.unwrap();
        store.read("q", 0, 100).await.unwrap()
    }

    fn failure(message: &StoredMessage) -> NewFailure {
        NewFailure {
            route: "r".into(),
            reader: "route:r".into(),
            message: message.clone(),
            attempts: 1,
            reason: "poison: http:400".into(),
            last_error: "http:400 from http://x/: bad".into(),
        }
    }

    #[tokio::test]
    async fn failing_moves_the_cursor_and_keeps_a_copy_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let messages = append(&store, &["a", "b", "c"]).await;
        let id = store.fail_message(failure(&messages[1])).await.unwrap();
        assert_eq!(store.cursor("q", "route:r"), 2, "the cursor moved past the failed message");
        // The route is the only reader: seqs 1 and 2 are released, the copy stays.
        assert_eq!(store.queue("q").unwrap().messages, 1);
        store.shutdown().await;
        drop(store);

        let store = open(dir.path());
        let entries = store.failed(query("r", FailedStatus::Failed)).await.unwrap();
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!((entry.id, entry.seq, entry.message_id.as_str()), (id, 2, messages[1].id.as_str()));
        assert_eq!(entry.payload.as_deref(), Some(&b"b"[..]));
        assert_eq!(
            (entry.reason.as_str(), entry.attempts, entry.status),
            ("poison: http:400", 1, FailedStatus::Failed)
        );
        assert_eq!(entry.first_failed_at_ms, entry.last_failed_at_ms);
        assert_eq!(store.failed_counts(FailedStatus::Failed).await.unwrap().get("r"), Some(&1));
    }

    #[tokio::test]
    async fn resubmit_fail_again_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let messages = append(&store, &["a", "b", "c"]).await;
        let a = store.fail_message(failure(&messages[0])).await.unwrap();
        let c = store.fail_message(failure(&messages[2])).await.unwrap();
        assert!(c > a);

        // Ids: all or nothing.
        let outcome = store.resubmit_failed(FailedSelector::Ids(vec![a, 999])).await.unwrap();
        assert_eq!((outcome.resubmitted.len(), outcome.unknown), (0, vec![999]));
        assert_eq!(store.failed(query("r", FailedStatus::Failed)).await.unwrap().len(), 2);

        let outcome = store.resubmit_failed(FailedSelector::Ids(vec![a])).await.unwrap();
        assert_eq!(outcome.resubmitted, vec![(a, "r".to_string())]);
        let resubmitted = store.failed(query("r", FailedStatus::Resubmitted)).await.unwrap();
        assert_eq!(resubmitted.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a]);

        assert!(store.fail_again(a, 3, "max_attempts: http:500".into(), "http:500".into()).await.unwrap());
        let entry = store.failed_entry(a).await.unwrap().unwrap();
        assert_eq!((entry.attempts, entry.status, entry.payload), (4, FailedStatus::Failed, None));

        let outcome = store.resubmit_failed(FailedSelector::Route("r".into())).await.unwrap();
        assert_eq!(outcome.resubmitted, vec![(a, "r".to_string()), (c, "r".to_string())]);
        assert!(store.remove_failed(a).await.unwrap());
        assert!(!store.remove_failed(a).await.unwrap(), "a second removal finds nothing");
        assert!(store.failed_entry(a).await.unwrap().is_none());
        assert!(!store.fail_again(a, 1, "x".into(), "y".into()).await.unwrap());
        assert_eq!(store.failed_counts(FailedStatus::Resubmitted).await.unwrap().get("r"), Some(&1));
    }

    #[tokio::test]
    async fn ids_are_not_reused_after_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let messages = append(&store, &["a", "b"]).await;
        let first = store.fail_message(failure(&messages[0])).await.unwrap();
        assert!(store.remove_failed(first).await.unwrap());
        let second = store.fail_message(failure(&messages[1])).await.unwrap();
        assert!(second > first);
    }
}
