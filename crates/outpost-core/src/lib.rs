//! Domain vocabulary shared by every outpost crate: configuration, names, units and ids.
//! No I/O beyond reading the configuration file; no async.

pub mod config;
pub mod failpoint;
pub mod metrics;
pub mod names;
pub mod redact;
pub mod status;
pub mod time;
pub mod units;
pub mod wire;

pub use config::{Config, ConfigError, Flags, Role};
pub use names::validate_name;

/// The version every node reports and sends in its handshake.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A new message id: a UUIDv7, so ids sort roughly by acceptance time and stay unique across nodes.
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
