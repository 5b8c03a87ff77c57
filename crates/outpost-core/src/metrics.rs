//! The Prometheus metrics of CONTRACT section 6, in one registry every task updates directly where
//! the event happens (a state change logs a line and moves its metric in the same place).

use std::sync::atomic::AtomicU64;

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
pub struct EncodingLabel {
    pub encoding: String,
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
    pub node_state: Family<StateLabel, Gauge>,
    /// Edge: batch frame bytes sent to the central, by encoding (`zstd` or `none`).
    pub forward_bytes: Family<EncodingLabel, Counter>,
    /// Edge: estimated seconds to forward each queue's backlog at the recent rate.
    pub backlog_drain_seconds: Family<QueueLabel, Gauge<f64, AtomicU64>>,
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
            node_state: Family::default(),
            forward_bytes: Family::default(),
            backlog_drain_seconds: Family::default(),
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
            "Edges known to this central by the central's own view of their state (offline once the link is lost)",
            m.edges.clone(),
        );
        registry.register(
            "outpost_node_state",
            "1 for the central's current state (online or maintenance)",
            m.node_state.clone(),
        );
        registry.register(
            "outpost_forward_bytes",
            "Batch frame bytes sent to the central, by encoding",
            m.forward_bytes.clone(),
        );
        registry.register(
            "outpost_backlog_drain_seconds",
            "Estimated seconds to forward the queue's backlog at the recent rate (queues before it by priority included)",
            m.backlog_drain_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets `outpost_node_state{state}` (central) to 1 for `current` and 0 for the other state.
    pub fn set_node_state(&self, current: &str) {
        for state in ["online", "maintenance"] {
            self.node_state
                .get_or_create(&StateLabel { state: state.into() })
                .set(i64::from(state == current));
        }
    }

    /// Sets `outpost_edge_state{state}` to 1 for `current` and 0 for every other state.
    pub fn set_edge_state(&self, current: &str) {
        for state in ["offline", "transition_to_online", "online", "transition_to_offline"] {
            self.edge_state
                .get_or_create(&StateLabel { state: state.into() })
                .set(i64::from(state == current));
        }
    }

    /// Every metric in the OpenMetrics 1.0 text format (what `prometheus_client` writes).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Every metric in the Prometheus text exposition format 0.0.4, which every scraper and
    /// `promtool check metrics` read.
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode_openmetrics())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. The two differ, for what this registry
/// writes, only in that OpenMetrics names a counter family without its `_total` suffix in `# HELP`
/// and `# TYPE` (0.0.4 wants the sample name there), has `# UNIT` lines and ends with `# EOF`.
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Families whose `# TYPE` says counter, so their `# HELP` (written before it) is fixed too.
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        match comment {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_with_total_and_has_no_openmetrics_lines() {
        let metrics = Metrics::new();
        metrics.messages_accepted.get_or_create(&QueueLabel { queue: "q".into() }).inc();
        metrics.set_node_state("maintenance");
        metrics.store_commit_seconds.observe(0.001);
        let text = metrics.encode_prometheus_text();
        assert!(text.contains("# TYPE outpost_messages_accepted_total counter\n"), "{text}");
        assert!(text.contains("# HELP outpost_messages_accepted_total "), "{text}");
        assert!(text.contains("outpost_messages_accepted_total{queue=\"q\"} 1\n"), "{text}");
        assert!(text.contains("outpost_node_state{state=\"maintenance\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE outpost_store_commit_seconds histogram\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(metrics.encode_openmetrics().ends_with("# EOF\n"));
    }
}
