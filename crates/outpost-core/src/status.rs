//! The connectivity snapshot a node publishes for its API: state, upstream, pings, offline log.

use serde::{Deserialize, Serialize};

/// How many offline-log entries are kept (newest first out when full).
pub const OFFLINE_LOG_CAPACITY: usize = 100;

/// One entry of the offline log: why the edge went offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineLogEntry {
    /// RFC 3339 time.
    pub at: String,
    /// Short machine-friendly cause, e.g. `central_unreachable`, `missed_pings`, `maintenance`.
    pub cause: String,
    /// Human text naming the endpoint and the error.
    pub detail: String,
}

/// The upstream an edge currently uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamInfo {
    pub url: String,
    pub is_primary: bool,
}

/// What `/v1/status` shows about connectivity, published by whichever task owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// `online`, `offline`, `transition_to_online`, `transition_to_offline`; a central: `online` or
    /// `maintenance`.
    pub state: String,
    pub state_since_ms: i64,
    pub upstream: Option<UpstreamInfo>,
    pub last_ping_at_ms: Option<i64>,
    /// Newest last.
    pub offline_log: Vec<OfflineLogEntry>,
    /// `Some(seconds)`: client writes get 503 with this `Retry-After`.
    pub writes_blocked_retry_after_seconds: Option<u64>,
    /// Edge: payload bytes per second the central acknowledged recently (smoothed; kept while
    /// offline as the last rate seen); `None` before the first batches.
    pub forward_rate_bytes_per_second: Option<u64>,
}

impl LinkStatus {
    pub fn new(state: &str, since_ms: i64) -> LinkStatus {
        LinkStatus {
            state: state.to_string(),
            state_since_ms: since_ms,
            upstream: None,
            last_ping_at_ms: None,
            offline_log: Vec::new(),
            writes_blocked_retry_after_seconds: None,
            forward_rate_bytes_per_second: None,
        }
    }
}
