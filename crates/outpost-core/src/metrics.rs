//! The Prometheus metrics of CONTRACT section 6, in one registry every task updates directly where
//! the event happens (a state change logs a line and moves its metric in the same place).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteModeLabel {
    pub route: String,
    pub mode: String,
}

/// Every metric a node exports. Cheap to share behind an `Arc`; all fields are atomics inside.
pub struct Metrics {
    pub registry: Registry,
    pub messages_accepted: Family<QueueLabel, Counter>,
    pub messages_forwarded: Family<QueueLabel, Counter>,
    pub messages_delivered: Family<RouteLabel, Counter>,
    pub backlog_messages: Family<QueueLabel, Gauge>,
    pub backlog_bytes: Family<QueueLabel, Gauge>,
    pub backlog_oldest_age_seconds: Family<QueueLabel, Gauge>,
    pub edge_state: Family<StateLabel, Gauge>,
    pub state_transitions: Family<TransitionLabel, Counter>,
    pub failovers: Counter,
    pub route_mode: Family<RouteModeLabel, Gauge>,
    pub failed_messages: Family<RouteLabel, Gauge>,
    pub duplicates_dropped: Counter,
    pub store_commit_seconds: Histogram,
    pub edges: Family<StateLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            messages_accepted: Family::default(),
            messages_forwarded: Family::default(),
            messages_delivered: Family::default(),
            backlog_messages: Family::default(),
            backlog_bytes: Family::default(),
            backlog_oldest_age_seconds: Family::default(),
            edge_state: Family::default(),
            state_transitions: Family::default(),
            failovers: Counter::default(),
            route_mode: Family::default(),
            failed_messages: Family::default(),
            duplicates_dropped: Counter::default(),
            // 50 µs .. ~26 s: fsync latencies of fast NVMe up to a struggling SD card.
            store_commit_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 20)),
            edges: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "outpost_messages_accepted",
            "Messages acknowledged to clients",
            m.messages_accepted.clone(),
        );
        registry.register(
            "outpost_messages_forwarded",
            "Messages confirmed stored by the central",
            m.messages_forwarded.clone(),
        );
        registry.register(
            "outpost_messages_delivered",
            "Messages a route delivered downstream",
            m.messages_delivered.clone(),
        );
        registry.register(
            "outpost_backlog_messages",
            "Messages stored in a queue",
            m.backlog_messages.clone(),
        );
        registry.register(
            "outpost_backlog_bytes",
            "Payload bytes stored in a queue",
            m.backlog_bytes.clone(),
        );
        registry.register(
            "outpost_backlog_oldest_age_seconds",
            "Age of the oldest stored message of a queue",
            m.backlog_oldest_age_seconds.clone(),
        );
        registry.register(
            "outpost_edge_state",
            "1 for the edge's current connectivity state",
            m.edge_state.clone(),
        );
        registry.register(
            "outpost_state_transitions",
            "Connectivity state changes",
            m.state_transitions.clone(),
        );
        registry.register("outpost_failovers", "Switches of the upstream endpoint", m.failovers.clone());
        registry.register("outpost_route_mode", "1 for each route's current mode", m.route_mode.clone());
        registry.register(
            "outpost_failed_messages",
            "Failed messages waiting for an operator",
            m.failed_messages.clone(),
        );
        registry.register(
            "outpost_duplicates_dropped",
            "Messages received again and not stored twice",
            m.duplicates_dropped.clone(),
        );
        registry.register(
            "outpost_store_commit_seconds",
            "Duration of store commits (fsync included)",
            m.store_commit_seconds.clone(),
        );
        registry.register(
            "outpost_edges",
            "Edges known to this central by last reported state",
            m.edges.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets `outpost_edge_state{state}` to 1 for `current` and 0 for every other state.
    pub fn set_edge_state(&self, current: &str) {
        for state in ["offline", "transition_to_online", "online", "transition_to_offline"] {
            self.edge_state
                .get_or_create(&StateLabel { state: state.into() })
                .set(i64::from(state == current));
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
