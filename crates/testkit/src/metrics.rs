//! Reading Prometheus / OpenMetrics text (`GET /metrics`) in tests.

/// One sample line: `name{label="value",…} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample of `text`, comments and blank lines skipped. Panics on a line it cannot read, since
/// a malformed exposition is itself a bug.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_line(line).unwrap_or_else(|| panic!("unreadable metrics line {line:?}")))
        .collect()
}

/// The value of the sample named `name` whose labels include all of `labels`; `None` if there is
/// none. Panics if several samples match (the test should name more labels).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<Sample> = samples(text)
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)))
        .collect();
    assert!(matching.len() <= 1, "several samples of {name} match {labels:?}: {matching:?}");
    matching.first().map(|s| s.value)
}

/// True if any sample is named `name`.
pub fn has(text: &str, name: &str) -> bool {
    samples(text).iter().any(|s| s.name == name)
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..open], parse_labels(&line[open + 1..close])?, &line[close + 1..])
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    // After the value an optional timestamp or exemplar may follow.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.push((key, value));
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim_start();
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_and_without_labels() {
        let text = "# HELP x y\n\
                    outpost_messages_accepted_total{queue=\"a\"} 3\n\
                    outpost_messages_accepted_total{queue=\"b\\\"c\",x=\"1\"} 4.5\n\
                    outpost_failovers_total 0\n\
                    outpost_store_commit_seconds_bucket{le=\"+Inf\"} 2\n\
                    # EOF\n";
        assert_eq!(value(text, "outpost_messages_accepted_total", &[("queue", "a")]), Some(3.0));
        assert_eq!(value(text, "outpost_messages_accepted_total", &[("queue", "b\"c")]), Some(4.5));
        assert_eq!(value(text, "outpost_failovers_total", &[]), Some(0.0));
        assert_eq!(value(text, "outpost_messages_accepted_total", &[("queue", "z")]), None);
        assert!(has(text, "outpost_store_commit_seconds_bucket"));
        assert_eq!(samples(text).len(), 4);
    }
}
