//! The one error shape of the HTTP API: `{"error": {"code", "message"}}` with the status it implies.
//! The shape itself is `outpost_core::wire::ErrorAnswer`, which edges parse to decide on `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use outpost_core::wire::{ErrorAnswer, ErrorDetail};
use outpost_store::StoreError;

/// An error answer. `code` is stable and machine-readable; `message` says what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after_seconds: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn invalid_name(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after_seconds: u64) -> ApiError {
        ApiError {
            retry_after_seconds: Some(retry_after_seconds),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::QuotaReached { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "store_full", error.to_string())
            }
            StoreError::TooManyQueues { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "too_many_queues", error.to_string())
            }
            StoreError::DiskFull(_) | StoreError::DiskReserve { .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "store_full",
                format!("{error}; free disk space on the data directory's file system"),
            ),
            StoreError::Closed => {
                ApiError::unavailable("the node is shutting down; retry against it later", 5)
            }
            StoreError::Invalid(message) => ApiError::bad_request(message),
            StoreError::Unavailable { .. } => {
                tracing::warn!(error = %error, "store unavailable while serving a request");
                ApiError::unavailable(format!("{error}; retry in a moment"), 5)
            }
            other => {
                tracing::error!(error = %other, "store error while serving a request");
                ApiError::internal(format!("store error: {other}"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorAnswer { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
