//! Leases ([`crate::Store::lease`]): one row per name in `outpost_leases`, claimed and renewed
//! with the database's clock, so clock skew between centrals does not matter.

use std::time::Instant;

use deadpool_postgres::Pool;
use tokio::sync::watch;

use super::{pg_error, pool_error, Postgres, LEASE_CLAIM_TIMEOUT, LEASE_RENEW_INTERVAL, LEASE_TTL};
use crate::{Lease, StoreError};

impl Postgres {
    /// Gives up every lease this store holds, so another central takes them at its next renewal
    /// instead of after [`LEASE_TTL`]. Best effort: an unreachable database lets them expire.
    pub(crate) async fn release_leases(&self) {
        let Ok(client) = self.pool.get().await else { return };
        let _ = client.execute("DELETE FROM outpost_leases WHERE holder = $1", &[&self.instance]).await;
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
