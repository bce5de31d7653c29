//! Message timestamps as stored by the app: ISO-8601 in mixed forms, ordered by instant.
//!
//! Real tables hold `2023-03-20T22:52:11.123456+00:00`, `2023-04-05T15:50:37.922515` (naive,
//! meaning UTC), `2023-03-22T14:36:25.547845+05:30`, and the same without the fraction when it
//! is zero. String order is wrong across offsets, so every comparison goes through [`parse`].
//!
//! Group rows are written in one [canonical] form — UTC, `+00:00`, six fractional digits, what
//! the app itself writes when its clock is UTC — because the app lists a user's conversations
//! by the raw string order of their `sk`: only one form makes string order the order of
//! instants. Instants are kept to the microsecond (the app's precision; extra digits are cut),
//! so that a timestamp and its canonical form always denote the same instant.

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};

/// The instant a stored timestamp denotes, to the microsecond; `None` when it is not one of the
/// accepted forms.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    let at = if let Ok(with_offset) = DateTime::parse_from_rfc3339(text) {
        with_offset.with_timezone(&Utc)
    } else {
        ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())?
            .and_utc()
    };
    Some(at.trunc_subsecs(6))
}

/// How the worker writes a timestamp: the app's form at UTC (microseconds, `+00:00`).
pub fn format(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// The one form a group row's `sk` takes: `text`'s instant in [`format`]; `None` when `text` is
/// not a timestamp.
pub fn canonical(text: &str) -> Option<String> {
    parse(text).map(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse(text).unwrap_or_else(|| panic!("{text} should parse"))
    }

    #[test]
    fn every_form_in_real_tables_parses() {
        for text in [
            "2023-03-20T22:52:11.123456+00:00",
            "2023-04-05T15:50:37.922515",
            "2023-03-22T14:36:25.547845+05:30",
            "2023-03-22T14:36:25+05:30",
            "2023-03-22T14:36:25",
            "2023-03-22T14:36:25Z",
            "2023-03-22 14:36:25.5",
        ] {
            assert!(parse(text).is_some(), "{text}");
        }
        for text in [
            "",
            "yesterday",
            "2023-13-01T00:00:00",
            "2023-03-22",
            "2023-03-22T14:36:25+5",
        ] {
            assert!(parse(text).is_none(), "{text}");
        }
    }

    #[test]
    fn ordering_is_by_instant_not_by_string() {
        // Later as a string, earlier as an instant: 14:36 at +05:30 is 09:06 UTC.
        assert!(at("2023-03-22T14:36:25.547845+05:30") < at("2023-03-22T10:00:00"));
        assert!("2023-03-22T14:36:25.547845+05:30" > "2023-03-22T10:00:00");
        // Naive means UTC.
        assert_eq!(at("2023-04-05T15:50:37.922515"), at("2023-04-05T15:50:37.922515+00:00"));
        // No fraction equals a zero fraction.
        assert_eq!(at("2023-04-05T15:50:37"), at("2023-04-05T15:50:37.000000+00:00"));
        assert!(at("2023-04-05T15:50:37.000001") > at("2023-04-05T15:50:37"));
    }

    #[test]
    fn every_form_has_one_canonical_form_whose_string_order_is_instant_order() {
        let cases = [
            ("2026-12-04T20:29:47.558988+05:30", "2026-12-04T14:59:47.558988+00:00"),
            ("2026-12-04T09:59:47-05:00", "2026-12-04T14:59:47.000000+00:00"),
            ("2026-12-04T14:59:47.5Z", "2026-12-04T14:59:47.500000+00:00"),
            (
                "2026-12-04T14:59:47.123456789+00:00",
                "2026-12-04T14:59:47.123456+00:00",
            ),
            ("2026-12-04T14:59:47.1234567", "2026-12-04T14:59:47.123456+00:00"),
            ("2027-01-01T01:29:00+10:30", "2026-12-31T14:59:00.000000+00:00"),
        ];
        for (text, expected) in cases {
            assert_eq!(canonical(text).as_deref(), Some(expected), "{text}");
            assert_eq!(canonical(expected).as_deref(), Some(expected), "canonical already");
            assert_ne!(canonical(text).as_deref(), Some(text), "{text} is not");
            assert_eq!(parse(text), parse(expected), "one instant, to the microsecond");
        }
        assert_eq!(canonical("yesterday"), None);
        let mut texts: Vec<&str> = cases.iter().map(|(text, _)| *text).collect();
        texts.sort_by_key(|text| canonical(text));
        let instants: Vec<_> = texts.iter().map(|text| at(text)).collect();
        assert!(instants.windows(2).all(|pair| pair[0] <= pair[1]));
    }

    #[test]
    fn formatted_timestamps_parse_back() {
        let now = Utc::now();
        let text = format(now);
        assert!(text.ends_with("+00:00"));
        let back = at(&text);
        assert!((now - back).num_microseconds().is_some_and(|us| us.abs() < 1));
    }
}
