//! What outpost's system tests share: start the real `outpost` binary on a free loopback port with
//! its own data directory, kill or stop it, talk to it over HTTP (typed and raw), read its metrics,
//! wait on conditions with deadlines instead of sleeping, and put a slow or broken line between
//! nodes ([`proxy::LinkProxy`]).
//!
//! Tests pass the binary in, because `CARGO_BIN_EXE_outpost` exists only while the `outpost`
//! package's own integration tests compile:
//!
//! ```ignore
//! let mut node = testkit::Node::builder(env!("CARGO_BIN_EXE_outpost")).start().await;
//! let client = node.client();
//! let accepted = client.post_message("orders", b"hello").await.unwrap().accepted();
//! node.kill9();
//! node.restart().await;
//! assert_eq!(client.read_all("orders").await[0].id, accepted.id);
//! ```
//!
//! # Must not
//!
//! - Share code with the node it checks (no `outpost-api`, no `outpost-store`): the tests see the
//!   node only from the outside, the way a client does, so a wrong shared helper cannot hide a bug.
//! - Synchronise with sleeps: everything that waits polls a condition until a deadline and says
//!   what it waited for when the deadline passes.

pub mod client;
pub mod edgesim;
pub mod metrics;
pub mod node;
pub mod postgres;
pub mod proxy;
pub mod raw;
pub mod rng;
pub mod sockets;
pub mod tls;
pub mod wait;
pub mod webdriver;

pub use client::{Accepted, BatchAccepted, Client, QueueInfo, Response, StoredMessage};
pub use node::{free_port, Node, NodeBuilder};
pub use proxy::{LinkProxy, LinkShape};
pub use rng::Rng;
pub use wait::{wait_until, wait_until_async};
