//! The reads a central answers from its connection pool (messages, documents, a fresh cursor,
//! failed entries, consumers), never through the writer.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{pg_error, Postgres};
use crate::failed::{FailedEntry, FailedQuery, FailedStatus, ENTRY_COLUMNS, MAX_FAILED_LIST_LIMIT};
use crate::ops::Views;
use crate::{StoreError, StoredMessage};

/// A message of `queue` from the columns `seq, id, origin, origin_seq, content_type, accepted_at_ms,
/// payload`.
pub(crate) fn message_from_row(queue: &str, r: &tokio_postgres::Row) -> StoredMessage {
    StoredMessage {
        seq: r.get::<_, i64>(0) as u64,
        id: r.get(1),
        queue: queue.to_string(),
        origin: r.get(2),
        origin_seq: r.get::<_, i64>(3) as u64,
        content_type: r.get(4),
        accepted_at_ms: r.get(5),
        payload: Bytes::from(r.get::<_, Vec<u8>>(6)),
    }
}

impl Postgres {
    pub(crate) async fn read(
        &self,
        queue: &str,
        after_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let client = self.client().await?;
        // The payloads before a row (`octet_length` reads a stored value's size, not the value)
        // decide whether it is returned: the first always is.
        let statement = client
            .prepare_cached(
                "SELECT seq, id, origin, origin_seq, content_type, accepted_at_ms, payload FROM (
                   SELECT m.seq, m.id, m.origin, m.origin_seq, m.content_type, m.accepted_at_ms, m.payload,
                          sum(octet_length(m.payload)) OVER (ORDER BY m.seq) - octet_length(m.payload) AS before
                   FROM outpost_messages m
                   WHERE m.queue_id = (SELECT queue_id FROM outpost_queues WHERE name = $1) AND m.seq > $2
                   ORDER BY m.seq LIMIT $3
                 ) r
                 WHERE r.before = 0 OR r.before + octet_length(r.payload) <= $4
                 ORDER BY seq",
            )
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&queue, &(after_seq as i64), &(limit as i64), &max_bytes])
            .await
            .map_err(|e| pg_error(&self.url(), e))?;
        Ok(rows.iter().map(|row| message_from_row(queue, row)).collect())
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

/// An entry from its [`ENTRY_COLUMNS`] (and the payload after them when asked for).
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
