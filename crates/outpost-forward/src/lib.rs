//! Moving messages on: the edge's link to its central (handshake, ping stream, forwarding,
//! connectivity driver) and, later, route delivery to downstream services.

pub mod client;
pub mod edge;
pub mod forwarder;

/// The cursor name of the edge's forwarder in every queue.
pub const UPSTREAM_READER: &str = "upstream";
