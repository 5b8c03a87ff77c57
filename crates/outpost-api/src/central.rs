//! Central only: the HTTP side of the edge links and the operator's endpoints. The logic (registry,
//! links, maintenance, triggers, cluster events) lives in `outpost-central`; this module maps
//! requests to its methods and [`CentralError`] to answers.

mod downlink;
mod link;
mod operator;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use outpost_central::{CentralError, CentralHub, SendEventError};
use outpost_core::wire;

use crate::error::ApiError;
use crate::ApiState;

/// How long an edge should wait before sending batches again while the central is in maintenance.
const MAINTENANCE_RETRY_AFTER_SECONDS: u64 = 30;

impl From<CentralError> for ApiError {
    fn from(error: CentralError) -> ApiError {
        let message = error.to_string();
        match error {
            CentralError::EdgeNotAllowed { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "edge_not_allowed", message)
            }
            CentralError::Stopping => ApiError::unavailable(message, 5),
            CentralError::Maintenance => ApiError {
                retry_after_seconds: Some(MAINTENANCE_RETRY_AFTER_SECONDS),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, wire::MAINTENANCE_ERROR_CODE, message)
            },
            CentralError::VersionMismatch { .. } => {
                ApiError::new(StatusCode::CONFLICT, "version_mismatch", message)
            }
            CentralError::Invalid(message) => ApiError::bad_request(message),
            CentralError::Send(
                SendEventError::UnknownEdge(_)
                | SendEventError::NotConnected(_)
                | SendEventError::LinkCongested(_),
            ) => ApiError::not_found(message),
            CentralError::Store(error) => error.into(),
        }
    }
}

/// The hub, or 404 on an edge.
fn hub(state: &ApiState) -> Result<&Arc<CentralHub>, ApiError> {
    state.central.as_ref().ok_or_else(|| {
        ApiError::not_found("this endpoint exists on a central only; this node runs as an edge")
    })
}

/// The central's routes (they answer 404 on an edge).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route(wire::LINK_PATH, post(link::open_link))
        .route(wire::LINK_MESSAGES_PATH, post(link::post_batch))
        .route(wire::LINK_REPORT_PATH, post(link::post_report))
        .route(wire::LINK_PROBE_PATH, get(link::probe))
        .route(wire::LINK_DOWNLINK_PATH, get(link::pull_downlink))
        .route("/v1/edges", get(operator::list_edges))
        .route("/v1/edges/{id}", get(operator::get_edge))
        .route("/v1/edges/{id}/transition-online", post(operator::transition_online))
        .route("/v1/admin/maintenance", post(operator::set_maintenance))
        .route("/v1/edges/{id}/queues/{queue}/messages", post(downlink::post_message))
        .route("/v1/edges/{id}/queues/{queue}/batch", post(downlink::post_batch))
        .route("/v1/edges/{id}/downlink", get(downlink::edge_downlink))
        .route("/v1/broadcast/queues/{queue}/messages", post(downlink::broadcast_message))
        .route("/v1/broadcast/queues/{queue}/batch", post(downlink::broadcast_batch))
}
