//! Message timestamps as stored by the app: ISO-8601 in mixed forms, ordered by instant.
//!
//! Real tables hold `2023-03-20T22:52:11.123456+00:00`, `2023-04-05T15:50:37.922515` (naive,
//! meaning UTC), `2023-03-22T14:36:25.547845+05:30`, and the same without the fraction when it
//! is zero. String order is wrong across offsets, so every comparison goes through [`parse`].

use chrono::{DateTime, NaiveDateTime, Utc};

/// The instant a stored timestamp denotes; `None` when it is not one of the accepted forms.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(with_offset) = DateTime::parse_from_rfc3339(text) {
        return Some(with_offset.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

/// How the worker's own tools write a timestamp: the app's form (microseconds, explicit UTC).
pub fn format(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
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
    fn formatted_timestamps_parse_back() {
        let now = Utc::now();
        let text = format(now);
        assert!(text.ends_with("+00:00"));
        let back = at(&text);
        assert!((now - back).num_microseconds().is_some_and(|us| us.abs() < 1));
    }
}
