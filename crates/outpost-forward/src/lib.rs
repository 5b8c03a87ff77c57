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

/// The readers this crate runs in a node's queues, each of which must take a message before the
/// store may release it: on an edge with a central, the forwarder ([`UPSTREAM_READER`]); and every
/// route draining the queue ([`route::reader_name`]). Built once from the config; the store asks
/// per queue.
#[derive(Debug, Clone)]
pub struct RequiredReaders {
    /// Whether this node forwards its queues to a central.
    forwards: bool,
    /// (queue, reader) of every route.
    routes: Vec<(String, String)>,
}

impl RequiredReaders {
    pub fn new(config: &outpost_core::Config) -> RequiredReaders {
        RequiredReaders {
            forwards: config.role == outpost_core::Role::Edge && !config.upstreams.is_empty(),
            routes: config.routes.iter().map(|r| (r.queue.clone(), route::reader_name(&r.name))).collect(),
        }
    }

    /// The readers of `queue`, the forwarder first.
    pub fn of_queue(&self, queue: &str) -> Vec<String> {
        let upstream = self.forwards.then(|| UPSTREAM_READER.to_string());
        let routes = self.routes.iter().filter(|(q, _)| q == queue).map(|(_, reader)| reader.clone());
        upstream.into_iter().chain(routes).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_read_by_the_forwarder_and_the_routes_draining_it() {
        let routes = vec![
            ("orders".to_string(), route::reader_name("erp")),
            ("notes".to_string(), route::reader_name("archive")),
            ("orders".to_string(), route::reader_name("audit")),
        ];
        let edge = RequiredReaders { forwards: true, routes: routes.clone() };
        assert_eq!(edge.of_queue("orders"), ["upstream", "route:erp", "route:audit"]);
        assert_eq!(edge.of_queue("other"), ["upstream"]);
        let central = RequiredReaders { forwards: false, routes };
        assert_eq!(central.of_queue("notes"), ["route:archive"]);
        assert!(central.of_queue("other").is_empty());
    }
}
