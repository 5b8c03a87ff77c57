//! Wall-clock time for the whole workspace: unix milliseconds for stored timestamps, RFC 3339 text
//! for the API (written by the node, read back by `outpost ctl`), and the proleptic Gregorian
//! calendar both rest on (also used by `outpost-tls` for certificate dates). The one exception is
//! `outpost-ha`, which may depend on no other outpost crate and keeps only the formatter its log
//! needs.
//!
//! Hand-written rather than a date crate: outpost needs one format (UTC, `Z`, milliseconds) and its
//! inverse, which is two small functions over Howard Hinnant's calendar algorithms, tested below
//! day by day over eight centuries.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Formats unix milliseconds as RFC 3339 UTC with millisecond precision: `2026-11-22T05:01:02.123Z`.
pub fn rfc3339_from_unix_ms(unix_ms: i64) -> String {
    let seconds = unix_ms.div_euclid(1000);
    let millis = unix_ms.rem_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` to unix milliseconds: what
/// [`rfc3339_from_unix_ms`] writes, plus offsets (for a node behind a proxy that rewrites them) and
/// `t`/space as the separator. Digits past milliseconds are dropped; no leap seconds. `None` for
/// anything else, a missing offset included.
pub fn unix_ms_from_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    // Digits only: `str::parse` alone would take a sign.
    let digits = |digits: &str| -> Option<i64> {
        digits.bytes().all(|c| c.is_ascii_digit()).then(|| digits.parse().ok())?
    };
    let number = |from: usize, to: usize| digits(text.get(from..to)?);
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        millis = format!("{:0<3}", &fraction[..digits.min(3)]).parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let total = digits(rest.get(1..3)?)? * 60 + digits(rest.get(4..6)?)?;
            if *sign == b'+' {
                total
            } else {
                -total
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian (year, month 1..=12, day 1..=31).
///
/// Howard Hinnant's `days_from_civil`: shift the year to start in March so the leap day is the
/// last day of the year, then count whole 400-year eras of exactly 146 097 days.
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400; // [0, 399]
    let month_from_march = (month + 9) % 12; // [0, 11]
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1; // [0, 365]
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year; // [0, 146096]
    era * 146_097 + day_of_era - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): the inverse of
/// [`days_from_civil`] (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32; // [1, 31]
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_from_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_from_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_from_unix_ms(1_795_323_662_123), "2026-11-22T05:01:02.123Z");
        assert_eq!(rfc3339_from_unix_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn parses_the_timestamps_the_api_writes() {
        let cases: &[(&str, Option<i64>)] = &[
            ("1970-01-01T00:00:00.000Z", Some(0)),
            ("2000-02-29T00:00:00.000Z", Some(951_782_400_000)),
            ("2026-11-22T05:01:02.123Z", Some(1_795_323_662_123)),
            ("2026-11-22T05:01:02Z", Some(1_795_323_662_000)),
            ("2026-11-22T05:01:02.1Z", Some(1_795_323_662_100)),
            ("2026-11-22T05:01:02.123456789Z", Some(1_795_323_662_123)),
            ("2026-11-22T06:01:02.123+01:00", Some(1_795_323_662_123)),
            ("2026-11-22T04:31:02.123-00:30", Some(1_795_323_662_123)),
            ("2026-11-22 05:01:02Z", Some(1_795_323_662_000)),
            ("2026-11-22T05:01:02", None),
            ("2026-13-22T05:01:02Z", None),
            ("2026-11-22T05:01:02.Z", None),
            ("2026-11-22T05:01:02+0a:00", None),
            ("2026-11-22T05:01:02+-1:00", None),
            ("yesterday", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(unix_ms_from_rfc3339(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn parsing_what_is_formatted_gives_the_instant_back() {
        for unix_ms in [0, 1, 999, 951_782_400_000, 1_795_323_662_123, 4_107_542_400_000, -86_400_001] {
            assert_eq!(unix_ms_from_rfc3339(&rfc3339_from_unix_ms(unix_ms)), Some(unix_ms), "{unix_ms}");
        }
    }

    #[test]
    fn the_calendar_advances_as_the_gregorian_rules_say_for_eight_centuries() {
        let (mut year, mut month, mut day) = (1970_i64, 1_u32, 1_u32);
        for days in 0..(800 * 366) {
            assert_eq!(civil_from_days(days), (year, month, day), "days={days}");
            assert_eq!(days_from_civil(year, i64::from(month), i64::from(day)), days, "{year}-{month}-{day}");
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let month_length = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            day += 1;
            if day > month_length {
                day = 1;
                month += 1;
                if month > 12 {
                    month = 1;
                    year += 1;
                }
            }
        }
    }
}
