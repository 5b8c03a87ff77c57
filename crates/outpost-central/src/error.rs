//! What the central's domain operations can refuse, without HTTP: `outpost-api` maps each variant to
//! a status and an error code.

use outpost_store::StoreError;

/// Why the central refused or could not do something.
#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    /// The registry is full and the edge is not listed in `[[edge]]`.
    #[error(
        "this central already knows {max} edges and edge {edge:?} is not listed in [[edge]]; list the edges \
         allowed to connect"
    )]
    EdgeNotAllowed { edge: String, max: usize },
    /// The central is stopping: no new link opens.
    #[error("the central is stopping; reconnect in a moment")]
    Stopping,
    /// The central is in maintenance and stores no batches.
    #[error("the central is in maintenance and stores no batches; keep them until it is back online")]
    Maintenance,
    /// The edge's major version differs from this central's.
    #[error(
        "edge {edge:?} runs outpost {version:?} and this central runs {central}: the major versions differ; \
         upgrade one of them"
    )]
    VersionMismatch { edge: String, version: String, central: &'static str },
    /// A handshake or report that is not valid.
    #[error("{0}")]
    Invalid(String),
    /// An event could not reach an edge.
    #[error(transparent)]
    Send(#[from] SendEventError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an event could not be sent to an edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendEventError {
    #[error("no edge {0:?} is known to this central")]
    UnknownEdge(String),
    #[error("edge {0:?} is not connected to this central")]
    NotConnected(String),
    #[error("the link of edge {0:?} is not reading its events; it was closed so the edge reconnects")]
    LinkCongested(String),
}
