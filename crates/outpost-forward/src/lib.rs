//! Moving messages on: the edge's link to its central (handshake, ping stream, forwarding,
//! connectivity driver) and route delivery to downstream services.

pub mod client;
pub mod downlink;
pub mod edge;
pub mod forwarder;
pub mod pacing;
pub mod route;

/// The cursor name of the edge's forwarder in every queue.
pub const UPSTREAM_READER: &str = "upstream";

/// The origin of the messages an edge received from its central (downlink) in its local queues. Not
/// a valid node id, so it never collides with one; the forwarder never sends these back up.
pub const DOWNLINK_ORIGIN: &str = "~central";
