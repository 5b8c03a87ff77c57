//! RFC 3339 UTC timestamps for `outpost_ha.log`, formatted by hand so the watcher needs no date crate.
//!
//! The workspace's date/time code is `outpost_core::time`; this is the one copy outside it, and only
//! of the formatter, because the watcher may depend on no other outpost crate (ARCHITECTURE.md) and
//! pulling a date crate into the watcher process to replace these lines would be the worse trade.
//! Its output is the same format as `outpost_core::time::rfc3339_from_unix_ms`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Formats `time` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, millisecond precision).
///
/// Times before 1970 cannot come from a sane clock; they are clamped to the epoch rather than
/// failing, because the log line matters more than the timestamp being right.
pub fn format_utc_millis(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let total_seconds = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    let days = (total_seconds / 86_400) as i64;
    let second_of_day = total_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        (second_of_day / 60) % 60,
        second_of_day % 60,
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Howard Hinnant's `civil_from_days`: shift the year to start in March so the leap day is the
/// last day of the year, then split into 400-year eras of exactly 146 097 days.
fn civil_from_days(days_since_epoch: i64) -> (i64, u32, u32) {
    let z = days_since_epoch + 719_468;
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
    use std::time::Duration;

    #[test]
    fn formats_known_instants() {
        let cases: &[(u64, u32, &str)] = &[
            (0, 0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 0, "2000-02-29T00:00:00.000Z"), // leap day in a year divisible by 400
            (951_868_799, 999, "2000-02-29T23:59:59.999Z"),
            (1_709_164_800, 5, "2024-02-29T00:00:00.005Z"),
            (4_107_301_262, 123, "2100-02-26T05:01:02.123Z"), // 2100 is not a leap year
            (4_107_542_400, 0, "2100-03-01T00:00:00.000Z"),
            (1_795_323_662, 123, "2026-11-22T05:01:02.123Z"),
            (1_767_225_599, 0, "2025-12-31T23:59:59.000Z"),
        ];
        for &(seconds, millis, expected) in cases {
            let time = UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_millis(millis.into());
            assert_eq!(format_utc_millis(time), expected, "seconds={seconds}");
        }
    }

    #[test]
    fn civil_from_days_round_trips_every_day_for_eight_centuries() {
        // Walk day by day and check the calendar advances exactly as the Gregorian rules say.
        let (mut year, mut month, mut day) = (1970_i64, 1_u32, 1_u32);
        for days in 0..(800 * 366) {
            assert_eq!(civil_from_days(days), (year, month, day), "days={days}");
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

    #[test]
    fn times_before_the_epoch_clamp_to_it() {
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(format_utc_millis(before), "1970-01-01T00:00:00.000Z");
    }
}
