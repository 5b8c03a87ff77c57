//! Human units in configuration: durations (`"500ms"`, `"5s"`, `"1h30m"`) and sizes (`"1MiB"`, `4096`).

use std::time::Duration;

/// Parses a duration written as one or more `<number><unit>` pairs, units `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: write a number with a unit, e.g. \"5s\"".into());
    }
    let mut total_ms: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(format!("invalid duration {text:?}: expected a number, e.g. \"5s\""));
        }
        let number: u128 =
            rest[..digits_end].parse().map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        rest = &rest[digits_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_ms: u128 = match &rest[..unit_end] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit (ms, s, m, h or d), e.g. \"{number}s\""
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ))
            }
        };
        rest = &rest[unit_end..];
        total_ms = total_ms
            .checked_add(number.saturating_mul(unit_ms))
            .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
    }
    let total_ms = u64::try_from(total_ms).map_err(|_| format!("invalid duration {text:?}: too large"))?;
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration the way configuration writes it (`"1h"`, `"1500ms"`).
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms != 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Parses a size: a plain number of bytes or a number with a unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`,
/// `KB`, `MB`, `GB`, `TB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    if digits_end == 0 {
        return Err(format!("invalid size {text:?}: expected a number of bytes or e.g. \"64KiB\""));
    }
    let number: u64 =
        text[..digits_end].parse().map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let multiplier: u64 = match text[digits_end..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
            ))
        }
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Formats a byte count with the largest binary unit that divides it (`"1MiB"`, `"1500"`).
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes != 0 && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("500ms", Ok(500)),
            ("5s", Ok(5_000)),
            ("1h", Ok(3_600_000)),
            ("1h30m", Ok(5_400_000)),
            ("0s", Ok(0)),
            ("2d", Ok(172_800_000)),
            ("5", Err("missing unit")),
            ("5x", Err("unknown unit")),
            ("", Err("empty")),
            ("s", Err("expected a number")),
        ];
        for (input, expected) in cases {
            match (parse_duration(input), expected) {
                (Ok(d), Ok(ms)) => assert_eq!(d, Duration::from_millis(ms), "{input}"),
                (Err(e), Err(fragment)) => assert!(e.contains(fragment), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn sizes() {
        let cases = [
            ("4096", Ok(4096)),
            ("1MiB", Ok(1 << 20)),
            ("64KiB", Ok(64 << 10)),
            ("10GiB", Ok(10 << 30)),
            ("1MB", Ok(1_000_000)),
            ("12 KiB", Ok(12 << 10)),
            ("1XB", Err("unknown unit")),
            ("MiB", Err("expected a number")),
        ];
        for (input, expected) in cases {
            match (parse_size(input), expected) {
                (Ok(n), Ok(want)) => assert_eq!(n, want, "{input}"),
                (Err(e), Err(fragment)) => assert!(e.contains(fragment), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(format_size(1 << 20), "1MiB");
    }
}
