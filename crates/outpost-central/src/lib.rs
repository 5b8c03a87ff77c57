//! The central's domain logic, without HTTP: the edge registry, the links edges open (handshake,
//! events, batches, reports, probes), maintenance mode, the operator's "transition to online"
//! trigger and what the centrals of a cluster tell each other. `outpost-api` maps HTTP to these
//! plain methods and [`CentralError`] to statuses; time comes in as `now_ms` arguments (only the
//! background tasks — deferred writes, the link guard's drop — read the clock).
//!
//! # Design
//!
//! - **One hub per central, shared by every request.** [`CentralHub`] holds the edge registry
//!   behind one mutex. It is shared state rather than a task of its own because every request
//!   touches it for a few field updates (link open/close, report, last seen) and answers need the
//!   result at once; the lock is never held across an `.await`.
//! - **A link is a stream that owns its receiver.** `POST /v1/link` registers a bounded
//!   `mpsc::Sender<LinkEvent>` for the edge and answers with an NDJSON stream that owns the
//!   receiver, the ping timer and a [`LinkGuard`]. The stream ends when the client goes away
//!   (hyper drops the body), when a newer link of the same edge replaces it (its sender is dropped)
//!   or at shutdown ([`CentralHub::close_links`]); in every case the guard's `Drop` marks the edge
//!   disconnected.
//! - **Persisted as documents.** `edge:<id>` holds `{"report","version","last_seen_ms"}`;
//!   `central:maintenance` holds `{"enabled","since_ms"}`. Both are loaded by [`CentralHub::start`],
//!   so a restart is just a start. A report is written at once (and announced to the cluster) when
//!   the edge's state changed; the others (backlog, last seen) wait for the group write every
//!   [`REPORT_PERSIST_INTERVAL`]: one commit for every edge that reported meanwhile, no cluster
//!   event (the other centrals' periodic re-read takes them), so ten thousand edges reporting every
//!   few seconds cost one commit per interval, not one (plus a NOTIFY and a read on every other
//!   central) per report. Whether an edge is connected is not persisted: after a restart no edge is.
//! - **The central's own view of each edge** (CONTRACT 5): an edge is `connected` while a link of
//!   it is open here and it gave a sign of life (handshake, report, batch, probe, pull) within
//!   `missed_pings × ping_interval`, or while another central of the cluster says so in its fresh
//!   link-owner document. Otherwise the central shows it `offline` with cause `link_lost`, whatever
//!   it last reported; `outpost_edges{state}` counts that view (module `liveness`).
//! - **One cluster, one registry.** On a PostgreSQL store every central of the cluster reads and
//!   writes the same documents; what one central must learn at once goes through the store's
//!   cluster events ([`outpost_store::Store::publish_cluster_event`], a loopback on SQLite): `edge_updated` after an
//!   edge's document was written at once (link opened or closed, state changed; others reload it,
//!   unless the edge is linked to them),
//!   `edge_linked` when an edge opens a link (others drop a transition request held for its next
//!   probe), `edge_transition_online` when an operator asks for an edge not linked here (the
//!   central it is linked to sends it on the link; the others hold it for its next probe) and
//!   `maintenance` after the maintenance document changed (others switch and tell their edges).
//!   Each hub ignores its own events (they carry its random instance id).
//! - **Ordering of batches** is the store's job (`append_from_origin` refuses gaps); [`CentralHub::store_batch`]
//!   only waits briefly for a predecessor batch still in flight.

mod cluster;
mod downlink;
mod error;
mod hub;
mod link;
mod liveness;

pub use downlink::{
    downlink_queue, downlink_readers, downlink_route, is_downlink_queue, parse_downlink_queue, DownlinkQueue,
    DOWNLINK_QUEUE_PREFIX, DOWNLINK_READER, EXPIRY_INTERVAL, EXPIRY_LEASE,
};
pub use error::{CentralError, SendEventError};
pub use hub::{
    CentralHub, EdgePage, EdgeQuery, EdgeView, TransitionDelivery, CAUSE_LINK_LOST, EDGE_STATES,
    LINK_EVENT_CAPACITY, MAX_KNOWN_EDGES, REPORT_PERSIST_INTERVAL,
};
pub use link::{
    check_report, check_version, silence_limit_ms, BatchStored, LinkGuard, OpenedLink, EDGE_STATES_REPORTED,
    PREDECESSOR_WAIT,
};
pub use liveness::{LINK_OWNER_EXPIRY, LINK_WATCH_INTERVAL};
