//! Moving messages on: the edge's link to its central (handshake, ping stream, forwarding,
//! connectivity driver) and route delivery to downstream services.

pub mod client;
pub mod edge;
pub mod forwarder;
pub mod route;
pub mod route_delivery;
pub mod route_modes;
pub mod route_policy;

/// The cursor name of the edge's forwarder in every queue.
pub const UPSTREAM_READER: &str = "upstream";
