//! Where a shard's reading starts, and how that is stored as a lease's checkpoint.

use std::time::SystemTime;

use super::record::SequenceNumber;

/// Where reading a shard starts. Stored as a lease's checkpoint: `TRIM_HORIZON`,
/// `LATEST@<instant>`, or the sequence number of the newest fully handled record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    TrimHorizon,
    /// `LATEST` resolved once, to the instant it was asked for: read from the horizon, skipping
    /// records created before the instant. Stored so, a handoff before the first checkpoint
    /// skips nothing that arrived since (a stored `LATEST` would be resolved again, later).
    LatestAt(SystemTime),
    /// `LATEST` as rows written by earlier versions hold it: resolved by the reader that meets
    /// it, which stores the result at once.
    Latest,
    After(SequenceNumber),
}

impl Position {
    pub fn encode(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Position::TrimHorizon => "TRIM_HORIZON".into(),
            Position::LatestAt(at) => {
                let at: chrono::DateTime<chrono::Utc> = (*at).into();
                format!("LATEST@{}", at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).into()
            }
            Position::Latest => "LATEST".into(),
            Position::After(sequence) => sequence.to_string().into(),
        }
    }

    pub fn decode(text: &str) -> Option<Self> {
        match text {
            "TRIM_HORIZON" => Some(Position::TrimHorizon),
            "LATEST" => Some(Position::Latest),
            other => match other.strip_prefix("LATEST@") {
                Some(at) => chrono::DateTime::parse_from_rfc3339(at)
                    .ok()
                    .map(|at| Position::LatestAt(at.with_timezone(&chrono::Utc).into())),
                None => SequenceNumber::parse(other).map(Position::After),
            },
        }
    }

    /// `LATEST` resolved now: the instant is cut to the whole minute, since record creation
    /// times may be (DynamoDB Local truncates them to the minute, DynamoDB to the second), so
    /// that no record made after this call is taken for an earlier one.
    pub fn latest_now() -> Self {
        let now = chrono::Utc::now();
        let minute = chrono::DurationRound::duration_trunc(now, chrono::TimeDelta::minutes(1)).unwrap_or(now);
        Position::LatestAt(minute.into())
    }
}

/// Where a consumer with no checkpoint starts (the `starting_position` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingPosition {
    TrimHorizon,
    Latest,
    /// Records created at or after the instant (KCL's `AT_TIMESTAMP`): read from the horizon,
    /// skipping older ones, as a resolved `LATEST` is.
    AtTimestamp(SystemTime),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_stored_form() {
        for text in [
            "TRIM_HORIZON",
            "LATEST",
            "LATEST@2026-12-04T16:50:00.000Z",
            "000000000000000000042",
        ] {
            let position = Position::decode(text).expect("decodes");
            assert_eq!(position.encode(), text);
        }
        assert_eq!(Position::decode("latest"), None);
        assert_eq!(Position::decode("LATEST@yesterday"), None);
        let Position::LatestAt(at) = Position::latest_now() else {
            panic!("resolved")
        };
        let since = at.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        assert_eq!(since.as_secs() % 60, 0, "cut to the minute");
        assert!(at <= SystemTime::now());
    }
}
