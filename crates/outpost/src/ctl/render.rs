//! How `outpost ctl` shows a reply: the API's JSON with `--json`, else one renderer per reply
//! shape (status, edges, routes, failed entries, consumers) printing a table, with times as ages.

use outpost_core::time::unix_ms_from_rfc3339;
use serde_json::Value;

use super::api::CtlError;
use super::table::Table;

/// Offline-log entries `ctl status` shows (the node keeps up to 100; `--json` shows them all).
const STATUS_OFFLINE_LOG_ENTRIES: usize = 5;
/// Longest free-text cell (error details) in a table; longer ones are cut with `…`.
const MAX_TEXT_CELL_CHARS: usize = 72;

pub(super) struct Output {
    pub(super) json: bool,
    /// The time ages are measured against, read once so every row of a table agrees.
    pub(super) now_ms: i64,
}

impl Output {
    pub(super) fn show(
        &self,
        reply: &Value,
        human: impl FnOnce(&Value, i64) -> String,
    ) -> Result<(), CtlError> {
        if self.json {
            if !reply.is_null() {
                println!("{}", pretty(reply));
            }
        } else {
            print!("{}", human(reply, self.now_ms));
        }
        Ok(())
    }
}

pub(super) fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

pub(super) fn render_status(status: &Value, now_ms: i64) -> String {
    let role = text(status, "role");
    let mut lines = Table::new(&["", ""]);
    lines.row(vec![
        "node".into(),
        format!("{}  ({role}, outpost {})", text(status, "node_id"), text(status, "version")),
    ]);
    lines.row(vec![
        "state".into(),
        format!("{}  since {}", text(status, "state"), age(status.get("state_since"), now_ms)),
    ]);
    // A central has no upstream and is not pinged; those lines would only ever read "-".
    let is_edge = role != "central";
    let upstream = match status.get("upstream") {
        Some(u) if u.is_object() => {
            let which = if u.get("is_primary").and_then(Value::as_bool) == Some(false) {
                "alternate"
            } else {
                "primary"
            };
            format!("{}  ({which})", text(u, "url"))
        }
        _ => "none".to_string(),
    };
    let last_ping = match status.get("last_ping_at") {
        Some(Value::String(_)) => age(status.get("last_ping_at"), now_ms),
        _ => "never".into(),
    };
    if is_edge {
        lines.row(vec!["upstream".into(), upstream]);
        lines.row(vec!["last ping".into(), last_ping]);
    }
    let backlog = status.get("backlog").cloned().unwrap_or(Value::Null);
    let messages = backlog.get("messages").and_then(Value::as_u64).unwrap_or(0);
    let mut backlog_text = format!(
        "{messages} message{}, {}",
        if messages == 1 { "" } else { "s" },
        bytes_text(backlog.get("bytes").and_then(Value::as_u64).unwrap_or(0))
    );
    if messages > 0 {
        let oldest = backlog.get("oldest_age_seconds").and_then(Value::as_f64).unwrap_or(0.0);
        backlog_text.push_str(&format!(", oldest {}", duration_text((oldest * 1000.0) as i64)));
    }
    lines.row(vec!["backlog".into(), backlog_text]);
    if let Some(drain) = backlog.get("drain").and_then(Value::as_str) {
        lines.row(vec!["drains in".into(), drain.to_string()]);
    }
    let mut out = lines.render_without_header();

    let log = status.get("offline_log").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    if log.is_empty() {
        if is_edge {
            out.push_str("offline log: empty\n");
        }
    } else {
        let shown = &log[log.len().saturating_sub(STATUS_OFFLINE_LOG_ENTRIES)..];
        out.push_str(&format!("offline log (newest last, {} of {}):\n", shown.len(), log.len()));
        let mut table = Table::new(&["AT", "CAUSE", "DETAIL"]);
        for entry in shown {
            table.row(vec![
                age(entry.get("at"), now_ms),
                text(entry, "cause"),
                truncate(&text(entry, "detail"), MAX_TEXT_CELL_CHARS),
            ]);
        }
        for line in table.render().lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

pub(super) fn render_edges(edges: &Value, now_ms: i64) -> String {
    let Some(edges) = edges.as_array() else { return format!("{}\n", pretty(edges)) };
    if edges.is_empty() {
        return "no edges known to this central yet\n".into();
    }
    let mut table = Table::new(&[
        "EDGE",
        "STATE",
        "LINK",
        "SINCE",
        "LAST SEEN",
        "UPSTREAM",
        "BACKLOG",
        "DOWNLINK",
        "LAST OFFLINE",
    ]);
    for edge in edges {
        let last_offline = edge
            .get("offline_log")
            .and_then(Value::as_array)
            .and_then(|log| log.last())
            .map(|entry| format!("{} {}", age(entry.get("at"), now_ms), text(entry, "cause")))
            .unwrap_or_else(|| "-".into());
        // The central's own view: `offline (link_lost)` for a site that went dark, whatever it
        // last reported.
        let state = match edge.get("cause").and_then(Value::as_str) {
            Some(cause) => format!("{} ({cause})", text(edge, "state")),
            None => text(edge, "state"),
        };
        let link = match edge.get("connected").and_then(Value::as_bool) {
            Some(true) => "connected",
            Some(false) => "-",
            None => "?",
        };
        table.row(vec![
            text(edge, "id"),
            state,
            link.to_string(),
            age(edge.get("state_since"), now_ms),
            age(edge.get("last_seen"), now_ms),
            text(edge, "upstream_url"),
            text(edge, "backlog_messages"),
            text(edge, "downlink_pending"),
            last_offline,
        ]);
    }
    table.render()
}

pub(super) fn render_routes(routes: &Value, now_ms: i64) -> String {
    let Some(routes) = routes.as_array() else { return format!("{}\n", pretty(routes)) };
    if routes.is_empty() {
        return "no routes: add [[route]] sections to the node's configuration\n".into();
    }
    let mut table =
        Table::new(&["ROUTE", "QUEUE", "MODE", "SINCE", "CHANGED BY", "BACKLOG", "FAILED", "REASON"]);
    for route in routes {
        table.row(vec![
            text(route, "name"),
            text(route, "queue"),
            text(route, "mode"),
            age(route.get("mode_since"), now_ms),
            text(route, "changed_by"),
            text(route, "backlog"),
            text(route, "failed"),
            truncate(&text(route, "reason"), MAX_TEXT_CELL_CHARS),
        ]);
    }
    table.render()
}

pub(super) fn render_failed(failed: &Value, now_ms: i64) -> String {
    let Some(failed) = failed.as_array() else { return format!("{}\n", pretty(failed)) };
    if failed.is_empty() {
        return "no failed messages\n".into();
    }
    let mut table = Table::new(&[
        "ID",
        "ROUTE",
        "QUEUE",
        "SEQ",
        "ATTEMPTS",
        "REASON",
        "LAST FAILED",
        "MESSAGE",
        "LAST ERROR",
    ]);
    for entry in failed {
        table.row(vec![
            text(entry, "id"),
            text(entry, "route"),
            text(entry, "queue"),
            text(entry, "seq"),
            text(entry, "attempts"),
            text(entry, "reason"),
            age(entry.get("last_failed_at"), now_ms),
            text(entry, "message_id"),
            truncate(&text(entry, "last_error"), MAX_TEXT_CELL_CHARS),
        ]);
    }
    table.render()
}

pub(super) fn render_consumers(consumers: &Value, now_ms: i64) -> String {
    let Some(consumers) = consumers.as_array() else { return format!("{}\n", pretty(consumers)) };
    if consumers.is_empty() {
        return "no pull consumers: one is created by its first lease \
                (POST /v1/queues/{queue}/consumers/{name}/lease)\n"
            .into();
    }
    let mut table = Table::new(&[
        "QUEUE",
        "CONSUMER",
        "POSITION",
        "LEASED",
        "PENDING",
        "MOST DELIVERIES",
        "CREATED",
        "LAST ACTIVE",
    ]);
    for consumer in consumers {
        table.row(vec![
            text(consumer, "queue"),
            text(consumer, "name"),
            text(consumer, "position"),
            text(consumer, "leased"),
            text(consumer, "pending"),
            text(consumer, "deliveries_max"),
            age(consumer.get("created_at"), now_ms),
            age(consumer.get("last_active_at"), now_ms),
        ]);
    }
    table.render()
}

/// A field as text: strings bare, numbers and booleans as written, missing or null as `-`.
fn text(object: &Value, key: &str) -> String {
    match object.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// An RFC 3339 field as "3m ago"; `-` when missing, the raw text when it is not RFC 3339.
fn age(field: Option<&Value>, now_ms: i64) -> String {
    match field {
        Some(Value::String(at)) => match unix_ms_from_rfc3339(at) {
            Some(at_ms) => relative_age(at_ms, now_ms),
            None => at.clone(),
        },
        _ => "-".into(),
    }
}

fn relative_age(at_ms: i64, now_ms: i64) -> String {
    let elapsed_ms = now_ms - at_ms;
    if elapsed_ms.abs() < 1000 {
        "just now".into()
    } else if elapsed_ms < 0 {
        // The node's clock is ahead of this one.
        format!("in {}", duration_text(-elapsed_ms))
    } else {
        format!("{} ago", duration_text(elapsed_ms))
    }
}

/// The largest whole unit: `42s`, `3m`, `5h`, `12d`.
fn duration_text(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub(super) fn truncate(text: &str, max_chars: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max_chars {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn ages_read_as_the_largest_whole_unit() {
        let now = 1_000_000_000;
        let cases = [
            (now, "just now"),
            (now - 999, "just now"),
            (now - 42_000, "42s ago"),
            (now - 3 * 60_000 - 59_000, "3m ago"),
            (now - 5 * 3_600_000, "5h ago"),
            (now - 12 * 86_400_000, "12d ago"),
            (now + 5_000, "in 5s"),
        ];
        for (at, expected) in cases {
            assert_eq!(relative_age(at, now), expected, "at {at}");
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        for (bytes, expected) in
            [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3_500, "3.4 KiB"), (5 << 30, "5.0 GiB")]
        {
            assert_eq!(bytes_text(bytes), expected);
        }
    }

    #[test]
    fn status_shows_state_upstream_backlog_and_the_newest_offline_entries() {
        let now = unix_ms_from_rfc3339("2026-11-22T05:10:00.000Z").unwrap();
        let log: Vec<Value> = (0..7)
            .map(|i| json!({"at": format!("2026-11-22T05:0{i}:00.000Z"), "cause": format!("cause{i}"), "detail": "d"}))
            .collect();
        let status = json!({
            "node_id": "store-042", "role": "edge", "version": "0.1.0", "state": "online",
            "state_since": "2026-11-22T05:07:00.000Z",
            "upstream": {"url": "http://central:7401", "is_primary": false},
            "last_ping_at": "2026-11-22T05:09:58.000Z",
            "backlog": {"messages": 2, "bytes": 2048, "oldest_age_seconds": 75.0, "drain": "~4 min at 310 kB/s"},
            "offline_log": log,
        });
        let text = render_status(&status, now);
        for expected in [
            "store-042  (edge, outpost 0.1.0)",
            "online  since 3m ago",
            "http://central:7401  (alternate)",
            "last ping  2s ago",
            "2 messages, 2.0 KiB, oldest 1m",
            "(newest last, 5 of 7)",
            "drains in  ~4 min at 310 kB/s",
            "cause6",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
        assert!(!text.contains("cause1"), "only the newest five entries:\n{text}");
    }

    #[test]
    fn a_field_that_is_missing_shows_as_a_dash() {
        let table = render_routes(&json!([{"name": "erp", "queue": "orders", "mode": "store"}]), 0);
        assert!(table.lines().nth(1).unwrap().starts_with("erp    orders  store  -"), "{table}");
    }
}
