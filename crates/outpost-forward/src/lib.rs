//! Moving messages on: the edge's link to its central (handshake, ping stream, forwarding) and,
//! later, route delivery to downstream services.

/// The cursor name of the edge's forwarder in every queue.
pub const UPSTREAM_READER: &str = "upstream";
