//! Budget and rate windows: fixed windows aligned to UTC (N seconds, minute, hour, day, calendar
//! month), and the time formats rate-limit response headers use (Go durations, RFC 3339,
//! `retry-after` seconds).
//!
//! Every instant is milliseconds since the Unix epoch, UTC, as the host clock gives it. Windows
//! are fixed, not sliding, so every replica computes the same boundaries from the clock alone and
//! a counter keyed by the window start needs no coordination. Calendar dates use Howard Hinnant's
//! `days_from_civil` / `civil_from_days` (<https://howardhinnant.github.io/date_algorithms.html>)
//! in unsigned arithmetic: instants before 1970 cannot occur.

use std::fmt::Write as _;

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// The longest `<N>s` window `parse` accepts: 365 days.
pub const MAX_WINDOW_SECONDS: u64 = 31_536_000;

/// A fixed window aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// N seconds, aligned to multiples of N seconds since the epoch. `Seconds(0)` (never produced
    /// by [`parse`]) behaves as `Seconds(1)`.
    Seconds(u64),
    Minute,
    Hour,
    Day,
    /// The calendar month in UTC.
    Month,
}

/// Parses "minute", "hour", "day", "month" or "<N>s" with 1 ≤ N ≤ 31_536_000 (e.g. "10s").
pub fn parse(s: &str) -> Result<Window, String> {
    match s {
        "minute" => return Ok(Window::Minute),
        "hour" => return Ok(Window::Hour),
        "day" => return Ok(Window::Day),
        "month" => return Ok(Window::Month),
        _ => {}
    }
    let expected = "expected \"minute\", \"hour\", \"day\", \"month\" or a number of seconds \
                    such as \"10s\"";
    let digits = match s.strip_suffix('s') {
        Some(d) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) => d,
        _ => {
            let mut shown: String = s.chars().take(32).collect();
            if shown.len() < s.len() {
                shown.push('…');
            }
            return Err(format!("unknown window {shown:?}: {expected}"));
        }
    };
    match digits.parse::<u64>() {
        Ok(n) if (1..=MAX_WINDOW_SECONDS).contains(&n) => Ok(Window::Seconds(n)),
        Ok(0) => Err("a window of 0 seconds is empty: use at least \"1s\"".to_string()),
        _ => Err(format!(
            "a window of more than {MAX_WINDOW_SECONDS} seconds (365 days): use \"month\" or a \
             shorter window"
        )),
    }
}

impl Window {
    /// The start of the window holding `now_ms`.
    pub fn start(&self, now_ms: u64) -> u64 {
        match self.fixed_length_ms() {
            Some(len) => now_ms - now_ms % len,
            None => {
                let (year, month, _) = civil_from_days(now_ms / DAY_MS);
                days_from_civil(year, month, 1) * DAY_MS
            }
        }
    }

    /// The end of the window holding `now_ms` (exclusive): the start of the next window.
    /// Saturates at `u64::MAX` for instants within one window of it (half a billion years away).
    pub fn end(&self, now_ms: u64) -> u64 {
        match self.fixed_length_ms() {
            Some(len) => self.start(now_ms).saturating_add(len),
            None => {
                let (year, month, _) = civil_from_days(now_ms / DAY_MS);
                let (year, month) = if month == 12 {
                    (year + 1, 1)
                } else {
                    (year, month + 1)
                };
                days_from_civil(year, month, 1).saturating_mul(DAY_MS)
            }
        }
    }

    /// The name used in the configuration, logs, metrics and views: "minute", "10s", …
    pub fn as_str(&self) -> String {
        match self {
            Window::Seconds(n) => format!("{n}s"),
            Window::Minute => "minute".to_string(),
            Window::Hour => "hour".to_string(),
            Window::Day => "day".to_string(),
            Window::Month => "month".to_string(),
        }
    }

    /// The window's id for a global counter: its start in UTC at the window's own precision,
    /// so every replica names the same window the same way whatever the rate-limit service's
    /// own unit: "2026-11" (month), "2026-11-28" (day), "2026-11-28T07" (hour),
    /// "2026-11-28T07:05" (minute), "2026-11-28T07:05:30/90s" (N seconds).
    pub fn id(&self, now_ms: u64) -> String {
        let stamp = rfc3339(self.start(now_ms));
        let cut = |n: usize| stamp.get(..n).unwrap_or(&stamp).to_string();
        match self {
            Window::Month => cut(7),
            Window::Day => cut(10),
            Window::Hour => cut(13),
            Window::Minute => cut(16),
            Window::Seconds(n) => format!("{}/{n}s", cut(19)),
        }
    }

    /// The longest this window can be, in seconds (a calendar month: 31 days).
    pub fn max_seconds(&self) -> u64 {
        match self.fixed_length_ms() {
            Some(len) => len / SECOND_MS,
            None => 31 * DAY_MS / SECOND_MS,
        }
    }

    /// The length of a fixed window (never 0), `None` for the calendar month.
    fn fixed_length_ms(&self) -> Option<u64> {
        match self {
            Window::Seconds(n) => Some(n.saturating_mul(SECOND_MS).max(SECOND_MS)),
            Window::Minute => Some(MINUTE_MS),
            Window::Hour => Some(HOUR_MS),
            Window::Day => Some(DAY_MS),
            Window::Month => None,
        }
    }
}

/// A duration the way OpenAI's `x-ratelimit-reset-*` headers write it, which is Go's
/// `time.Duration.String()` at millisecond resolution: "0s", "12ms", "1s", "1.5s", "59.999s",
/// "6m0s", "1h2m3s". Units above hours are not used ("49h0m0s").
pub fn openai_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < SECOND_MS {
        return format!("{ms}ms");
    }
    let total_secs = ms / SECOND_MS;
    let (hours, minutes, secs) = (total_secs / 3600, total_secs / 60 % 60, total_secs % 60);
    let mut out = String::new();
    // Writing to a String cannot fail.
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    // Go prints the minutes whenever the duration reaches a minute: "1h0m5s".
    if total_secs >= 60 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    let frac = ms % SECOND_MS;
    if frac > 0 {
        let digits = format!("{frac:03}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// A UTC timestamp in RFC 3339 at second precision, "2026-11-24T01:02:03Z", for Anthropic's
/// `anthropic-ratelimit-*-reset` headers.
///
/// Sub-second parts are dropped (floor). Window boundaries are whole seconds, so a reset time is
/// exact; flooring anything else can only make a client retry a moment early, never tell it a
/// later time than the truth. Years past 9999 (not reachable from a real clock) print with more
/// digits rather than fail.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / SECOND_MS;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// The `retry-after` value in whole seconds: the time left until `reset_ms`, rounded up so the
/// client does not come back before the reset, and at least 1 (0 would invite a tight loop).
pub fn retry_after_secs(now_ms: u64, reset_ms: u64) -> u64 {
    reset_ms.saturating_sub(now_ms).div_ceil(SECOND_MS).max(1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year ≥ 1970, month 1..=12, day 1..=31).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    // The year starts in March so that the leap day is the last day of the "year".
    let year = if month <= 2 {
        year.saturating_sub(1)
    } else {
        year
    };
    let era = year / 400;
    let year_of_era = year - era * 400; // [0, 399]
    let month_from_march = if month > 2 { month - 3 } else { month + 9 }; // [0, 11]
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1; // [0, 365]
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719_468 days from 0000-03-01 to 1970-01-01; every caller's date is on or after 1970.
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}

/// The (year, month 1..=12, day 1..=31) of a number of days since 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // `days` ≤ u64::MAX / DAY_MS for every caller, far from overflowing.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097; // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let mp = (5 * day_of_year + 2) / 153; // [0, 11], March = 0
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FEB_2024: u64 = 1_706_745_600_000;
    const MAR_2024: u64 = 1_709_251_200_000;
    const FEB_2100: u64 = 4_105_123_200_000;
    const MAR_2100: u64 = 4_107_542_400_000;
    const FEB_2000: u64 = 949_363_200_000;
    const MAR_2000: u64 = 951_868_800_000;
    const DEC_2025: u64 = 1_764_547_200_000;
    const JAN_2026: u64 = 1_767_225_600_000;

    #[test]
    fn parses_windows() {
        assert_eq!(parse("minute"), Ok(Window::Minute));
        assert_eq!(parse("hour"), Ok(Window::Hour));
        assert_eq!(parse("day"), Ok(Window::Day));
        assert_eq!(parse("month"), Ok(Window::Month));
        assert_eq!(parse("10s"), Ok(Window::Seconds(10)));
        assert_eq!(parse("1s"), Ok(Window::Seconds(1)));
        assert_eq!(parse("31536000s"), Ok(Window::Seconds(31_536_000)));
        assert_eq!(parse("0010s"), Ok(Window::Seconds(10)));
    }

    #[test]
    fn bad_windows_are_refused_with_a_reason() {
        let cases: [(&str, &str); 13] = [
            ("", "unknown window"),
            ("s", "unknown window"),
            ("week", "unknown window"),
            ("Minute", "unknown window"),
            ("10", "unknown window"),
            ("10m", "unknown window"),
            ("+10s", "unknown window"),
            ("-10s", "unknown window"),
            (" 10s", "unknown window"),
            ("1.5s", "unknown window"),
            ("0s", "0 seconds"),
            ("31536001s", "more than 31536000 seconds"),
            ("99999999999999999999999999s", "more than 31536000 seconds"),
        ];
        for (s, want) in cases {
            let err = parse(s).unwrap_err();
            assert!(err.contains(want), "{s}: {err}");
        }
        let err = parse(&"é".repeat(100)).unwrap_err();
        assert!(err.chars().count() < 150, "{err}");
    }

    #[test]
    fn names_round_trip() {
        for w in [
            Window::Seconds(10),
            Window::Minute,
            Window::Hour,
            Window::Day,
            Window::Month,
        ] {
            assert_eq!(parse(&w.as_str()), Ok(w));
        }
        assert_eq!(Window::Seconds(10).as_str(), "10s");
    }

    #[test]
    fn month_boundaries_and_leap_years() {
        let m = Window::Month;
        // 2024 is a leap year: 2024-02-29T12:00Z is still February.
        let leap_day_noon = 1_709_208_000_000;
        assert_eq!(m.start(leap_day_noon), FEB_2024);
        assert_eq!(m.end(leap_day_noon), MAR_2024);
        assert_eq!(MAR_2024 - FEB_2024, 29 * DAY_MS);
        assert_eq!(m.start(MAR_2024 - 1), FEB_2024);
        assert_eq!(m.start(MAR_2024), MAR_2024);
        // 2100 is not a leap year (divisible by 100), 2000 is (divisible by 400).
        assert_eq!(m.start(FEB_2100 + 27 * DAY_MS + 12 * HOUR_MS), FEB_2100);
        assert_eq!(m.end(FEB_2100), MAR_2100);
        assert_eq!(MAR_2100 - FEB_2100, 28 * DAY_MS);
        assert_eq!(m.end(FEB_2000 + 28 * DAY_MS), MAR_2000);
        assert_eq!(MAR_2000 - FEB_2000, 29 * DAY_MS);
        // December rolls over into January of the next year.
        let new_years_eve = 1_767_225_599_000;
        assert_eq!(m.start(new_years_eve), DEC_2025);
        assert_eq!(m.end(new_years_eve), JAN_2026);
        assert_eq!(m.start(JAN_2026), JAN_2026);
        // The epoch itself.
        assert_eq!(m.start(0), 0);
        assert_eq!(m.end(0), 31 * DAY_MS);
    }

    #[test]
    fn calendar_agrees_with_counting_days() {
        // Walk day by day from 1970 to 2500 with a naive calendar and compare.
        let leap =
            |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
        let month_len = |y: u64, m: u64| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970, 1, 1);
        let mut month_start = 0u64;
        for days in 0..(530 * 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            assert_eq!(days_from_civil(y, m, d), days);
            let now = days * DAY_MS + 12 * HOUR_MS;
            assert_eq!(Window::Month.start(now), month_start * DAY_MS);
            assert_eq!(
                Window::Month.end(now),
                (month_start + month_len(y, m)) * DAY_MS
            );
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                month_start = days + 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn fixed_windows_align_to_the_epoch() {
        let now = 1_700_000_123_456; // 2023-11-14T22:15:23.456Z
        assert_eq!(Window::Seconds(10).start(now), 1_700_000_120_000);
        assert_eq!(Window::Seconds(10).end(now), 1_700_000_130_000);
        assert_eq!(Window::Minute.start(now), 1_700_000_100_000);
        assert_eq!(Window::Minute.end(now), 1_700_000_160_000);
        assert_eq!(Window::Hour.start(now), 1_699_999_200_000); // 22:00:00
        assert_eq!(Window::Hour.end(now), 1_700_002_800_000);
        assert_eq!(Window::Day.start(now), 1_699_920_000_000); // 2023-11-14T00:00Z
        assert_eq!(Window::Day.end(now), 1_700_006_400_000);
        assert_eq!(rfc3339(Window::Day.start(now)), "2023-11-14T00:00:00Z");
        assert_eq!(Window::Month.start(now), 1_698_796_800_000); // 2023-11-01
        assert_eq!(rfc3339(Window::Month.end(now)), "2023-12-01T00:00:00Z");
        // Exactly on a boundary, the window starts there.
        assert_eq!(
            Window::Seconds(10).start(1_700_000_120_000),
            1_700_000_120_000
        );
    }

    #[test]
    fn degenerate_and_extreme_inputs_do_not_panic() {
        assert_eq!(Window::Seconds(0).start(1_234), 1_000);
        assert_eq!(Window::Seconds(0).end(1_234), 2_000);
        assert_eq!(Window::Seconds(u64::MAX).start(u64::MAX - 1), 0);
        assert_eq!(Window::Seconds(u64::MAX).end(u64::MAX - 1), u64::MAX);
        for w in [
            Window::Seconds(7),
            Window::Minute,
            Window::Hour,
            Window::Day,
            Window::Month,
        ] {
            let _ = w.start(u64::MAX);
            assert_eq!(w.end(u64::MAX), u64::MAX);
        }
        assert!(rfc3339(u64::MAX).ends_with('Z'));
        assert_eq!(openai_duration(u64::MAX), "5124095576030h25m51.615s");
    }

    #[test]
    fn openai_durations_match_go() {
        let cases: [(u64, &str); 14] = [
            (0, "0s"),
            (1, "1ms"),
            (12, "12ms"),
            (999, "999ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (1_050, "1.05s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (61_500, "1m1.5s"),
            (3_600_000, "1h0m0s"),
            (3_723_000, "1h2m3s"),
            (176_400_000, "49h0m0s"),
        ];
        for (ms, want) in cases {
            assert_eq!(openai_duration(ms), want, "{ms}");
        }
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(1_795_482_123_000), "2026-11-24T01:02:03Z");
        assert_eq!(rfc3339(1_795_482_123_999), "2026-11-24T01:02:03Z");
        assert_eq!(rfc3339(946_684_799_000), "1999-12-31T23:59:59Z");
        assert_eq!(rfc3339(1_709_208_000_000), "2024-02-29T12:00:00Z");
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        assert_eq!(retry_after_secs(1_000, 1_000), 1);
        assert_eq!(retry_after_secs(5_000, 1_000), 1);
        assert_eq!(retry_after_secs(1_000, 1_001), 1);
        assert_eq!(retry_after_secs(1_000, 3_000), 2);
        assert_eq!(retry_after_secs(1_000, 3_001), 3);
        assert_eq!(retry_after_secs(0, u64::MAX), u64::MAX.div_ceil(1000));
    }

    /// Named so that `cargo test --lib proptest` (the Makefile's fallback fuzzing) selects them.
    mod proptests {
        use super::*;

        fn window() -> impl Strategy<Value = Window> {
            prop_oneof![
                (1..=MAX_WINDOW_SECONDS).prop_map(Window::Seconds),
                (1u64..=120).prop_map(Window::Seconds),
                Just(Window::Minute),
                Just(Window::Hour),
                Just(Window::Day),
                Just(Window::Month),
            ]
        }

        proptest! {
            #[test]
            fn now_is_inside_its_window(w in window(), now in 0u64..(1 << 45)) {
                let (start, end) = (w.start(now), w.end(now));
                prop_assert!(start <= now && now < end, "{:?} {} {} {}", w, start, now, end);
                // The next window starts where this one ends, and the previous ends at start.
                prop_assert_eq!(w.start(end), end);
                prop_assert_eq!(w.start(end - 1), start);
                prop_assert_eq!(w.end(start), end);
                if start > 0 {
                    prop_assert_eq!(w.end(start - 1), start);
                }
                // Windows are whole seconds, so reset headers are exact.
                prop_assert_eq!(start % 1000, 0);
                prop_assert_eq!(end % 1000, 0);
            }

            #[test]
            fn any_instant_formats_without_panicking(ms in any::<u64>(), now in any::<u64>()) {
                let _ = rfc3339(ms);
                let _ = openai_duration(ms);
                prop_assert!(retry_after_secs(now, ms) >= 1);
                for w in [Window::Seconds(ms), Window::Minute, Window::Hour, Window::Day, Window::Month] {
                    prop_assert!(w.start(now) <= now);
                    prop_assert!(w.end(now) >= w.start(now));
                }
            }

            #[test]
            fn rfc3339_round_trips_through_the_calendar(secs in 0u64..(1 << 35)) {
                let s = rfc3339(secs * 1000);
                let year: u64 = s[0..4].parse().unwrap();
                let month: u64 = s[5..7].parse().unwrap();
                let day: u64 = s[8..10].parse().unwrap();
                let h: u64 = s[11..13].parse().unwrap();
                let m: u64 = s[14..16].parse().unwrap();
                let sec: u64 = s[17..19].parse().unwrap();
                let back = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec;
                prop_assert_eq!(back, secs, "{}", s);
            }

            #[test]
            fn arbitrary_strings_never_panic(s in ".{0,40}") {
                let _ = parse(&s);
            }
        }
    }
    #[test]
    fn window_ids_name_the_window_at_its_precision() {
        // 2026-11-28T07:05:42.123Z
        let now = 1_795_849_542_123;
        assert_eq!(rfc3339(now), "2026-11-28T07:05:42Z");
        assert_eq!(Window::Month.id(now), "2026-11");
        assert_eq!(Window::Day.id(now), "2026-11-28");
        assert_eq!(Window::Hour.id(now), "2026-11-28T07");
        assert_eq!(Window::Minute.id(now), "2026-11-28T07:05");
        assert_eq!(Window::Seconds(90).id(now), "2026-11-28T07:04:30/90s");
        assert_eq!(Window::Seconds(1).id(now), "2026-11-28T07:05:42/1s");
        // Every instant of a window gives its id; the next window another.
        let minute = Window::Minute;
        assert_eq!(minute.id(minute.start(now)), minute.id(minute.end(now) - 1));
        assert_ne!(minute.id(now), minute.id(minute.end(now)));
        assert_eq!(Window::Month.max_seconds(), 2_678_400);
        assert_eq!(Window::Seconds(90).max_seconds(), 90);
        assert_eq!(Window::Hour.max_seconds(), 3600);
    }
}
