//! Central only: the edge registry, the links edges open (handshake, ping stream, batches,
//! reports), maintenance mode and the operator's "transition to online" trigger.

use std::sync::Arc;

use axum::Router;
use outpost_core::metrics::Metrics;
use outpost_core::Config;
use outpost_store::Store;

use crate::ApiState;

/// Shared state of a central's edge links.
pub struct CentralHub {}

impl CentralHub {
    /// Loads the edge registry and maintenance mode from the store.
    pub async fn start(
        _store: Store,
        _config: Arc<Config>,
        _metrics: Arc<Metrics>,
    ) -> Result<Arc<CentralHub>, outpost_store::StoreError> {
        Ok(Arc::new(CentralHub {}))
    }
}

/// The central's routes (they answer 404 on an edge).
pub fn routes() -> Router<ApiState> {
    Router::new()
}
