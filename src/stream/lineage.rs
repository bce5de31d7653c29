//! Shard lineage: which shards may be read now, and where a new shard starts.
//!
//! Pure functions over the source's shard list and the lease rows, so the ordering rules are
//! tested without a stream:
//! - a shard is read only once every parent has reached its end (a merge has two parents); a
//!   parent that is no longer listed (trimmed after 24 h) cannot be read and does not block;
//! - `LATEST` and `AT_TIMESTAMP` apply only to a consumer that has never read the stream: with
//!   `LATEST` its closed shards are skipped and its open shards start at the tip; with
//!   `AT_TIMESTAMP` every shard is read from the horizon, records older than the instant skipped
//!   (a closed shard may hold later ones). Every shard discovered later is a child of something
//!   being read and starts at `TRIM_HORIZON`, or records between the parent's end and the
//!   child's first read would be lost.

use std::collections::{HashMap, HashSet};

use super::lease::Lease;
use super::position::{Position, StartingPosition};
use super::record::ShardId;
use super::source::ShardInfo;

/// The checkpoint and shard-end marker a shard's new lease row starts with. `fresh_stream`:
/// no shard of this stream has a lease row yet.
pub(super) fn initial_lease(shard: &ShardInfo, fresh_stream: bool, starting: StartingPosition) -> (Position, bool) {
    match (starting, fresh_stream) {
        (StartingPosition::Latest, true) => (Position::latest_now(), shard.closed),
        (StartingPosition::AtTimestamp(at), true) => (Position::LatestAt(at), false),
        _ => (Position::TrimHorizon, false),
    }
}

/// Lease rows of this stream (rows written before `stream_id` was kept count as this stream's):
/// when there are none, the stream has never been read by this consumer.
pub(super) fn is_fresh(stream_id: &str, leases: &HashMap<ShardId, Lease>) -> bool {
    !leases
        .values()
        .any(|lease| lease.stream_id.as_deref().is_none_or(|id| id == stream_id))
}

/// Unfinished lease rows of this stream whose shard is no longer listed: trimmed away before
/// they were read to the end (a consumer down past the retention). Their records are lost to
/// the stream; the rows can order nothing any more.
pub(super) fn orphans<'a>(
    stream_id: &str,
    shards: &[ShardInfo],
    leases: &'a HashMap<ShardId, Lease>,
) -> Vec<&'a Lease> {
    let listed: HashSet<&ShardId> = shards.iter().map(|shard| &shard.id).collect();
    let mut orphans: Vec<&Lease> = leases
        .values()
        .filter(|lease| !lease.shard_end && !listed.contains(&lease.shard))
        .filter(|lease| lease.stream_id.as_deref().is_none_or(|id| id == stream_id))
        .collect();
    orphans.sort_by(|a, b| a.shard.cmp(&b.shard));
    orphans
}

/// Shards to start reading now, in the source's order: not finished, not `busy`, and every
/// parent finished or gone from the stream.
pub(super) fn readable<'a>(
    shards: &'a [ShardInfo],
    leases: &HashMap<ShardId, Lease>,
    busy: impl Fn(&ShardId) -> bool,
) -> Vec<&'a ShardInfo> {
    let listed: HashSet<&ShardId> = shards.iter().map(|shard| &shard.id).collect();
    let finished = |id: &ShardId| leases.get(id).is_some_and(|lease| lease.shard_end);
    shards
        .iter()
        .filter(|shard| !finished(&shard.id) && !busy(&shard.id))
        .filter(|shard| {
            shard
                .parents
                .iter()
                .all(|parent| finished(parent) || !listed.contains(parent))
        })
        .collect()
}

/// Finished shards that are gone from the stream (trimmed) and whose children have all
/// started: their lease rows are no longer needed to order anything.
pub(super) fn removable<'a>(shards: &[ShardInfo], leases: &'a HashMap<ShardId, Lease>) -> Vec<&'a ShardId> {
    let listed: HashSet<&ShardId> = shards.iter().map(|shard| &shard.id).collect();
    let started = |lease: &Lease| lease.shard_end || matches!(lease.checkpoint, Position::After(_));
    leases
        .values()
        .filter(|lease| lease.shard_end && !listed.contains(&lease.shard))
        .filter(|lease| {
            let mut children = leases
                .values()
                .filter(|child| child.parents.contains(&lease.shard))
                .peekable();
            children.peek().is_some() && children.all(started)
        })
        .map(|lease| &lease.shard)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            id: ShardId(id.into()),
            parents: parents.iter().map(|p| ShardId((*p).into())).collect(),
            closed,
        }
    }

    fn lease(id: &str, shard_end: bool) -> (ShardId, Lease) {
        let lease = Lease {
            shard: ShardId(id.into()),
            checkpoint: Position::TrimHorizon,
            owner: None,
            parents: vec![],
            shard_end,
            counter: 0,
            stream_id: None,
        };
        (ShardId(id.into()), lease)
    }

    fn ids(shards: Vec<&ShardInfo>) -> Vec<&str> {
        shards.into_iter().map(|s| s.id.0.as_str()).collect()
    }

    #[test]
    fn children_wait_for_every_parent() {
        // a splits into b and c; b and c merge into d.
        let shards = vec![
            shard("a", &[], true),
            shard("b", &["a"], true),
            shard("c", &["a"], true),
            shard("d", &["b", "c"], false),
        ];
        let mut leases: HashMap<ShardId, Lease> = shards.iter().map(|s| lease(&s.id.0, false)).collect();
        assert_eq!(ids(readable(&shards, &leases, |_| false)), vec!["a"]);
        leases.extend([lease("a", true)]);
        assert_eq!(ids(readable(&shards, &leases, |_| false)), vec!["b", "c"]);
        leases.extend([lease("b", true)]);
        assert_eq!(
            ids(readable(&shards, &leases, |_| false)),
            vec!["c"],
            "d needs both parents"
        );
        leases.extend([lease("c", true)]);
        assert_eq!(ids(readable(&shards, &leases, |_| false)), vec!["d"]);
    }

    #[test]
    fn busy_and_finished_shards_are_not_started_again() {
        let shards = vec![shard("a", &[], false), shard("b", &[], true)];
        let leases = HashMap::from([lease("b", true)]);
        assert!(readable(&shards, &leases, |id| id.0 == "a").is_empty());
    }

    #[test]
    fn a_trimmed_parent_does_not_block_its_child() {
        let shards = vec![shard("child", &["gone"], false)];
        assert_eq!(ids(readable(&shards, &HashMap::new(), |_| false)), vec!["child"]);
    }

    #[test]
    fn finished_shards_gone_from_the_stream_go_once_their_children_started() {
        let child = |checkpoint: Position| Lease {
            shard: ShardId("child".into()),
            checkpoint,
            owner: None,
            parents: vec![ShardId("gone".into())],
            shard_end: false,
            counter: 0,
            stream_id: None,
        };
        let listed = vec![shard("child", &["gone"], false)];
        let mut leases = HashMap::from([lease("gone", true)]);
        assert!(removable(&listed, &leases).is_empty(), "no child yet");
        leases.insert(ShardId("child".into()), child(Position::TrimHorizon));
        assert!(removable(&listed, &leases).is_empty(), "the child has not started");
        let started = Position::After(crate::stream::SequenceNumber::parse("5").expect("digits"));
        leases.insert(ShardId("child".into()), child(started));
        assert_eq!(removable(&listed, &leases), vec![&ShardId("gone".into())]);
        let still_listed = vec![shard("gone", &[], true), shard("child", &["gone"], false)];
        assert!(removable(&still_listed, &leases).is_empty(), "still in the stream");
    }

    #[test]
    fn a_stream_is_fresh_only_without_rows_of_its_own() {
        let mut leases = HashMap::new();
        assert!(is_fresh("s1", &leases));
        let (id, mut row) = lease("a", false);
        row.stream_id = Some("s0".into());
        leases.insert(id.clone(), row.clone());
        assert!(is_fresh("s1", &leases), "rows of another stream (a table made again)");
        row.stream_id = Some("s1".into());
        leases.insert(id.clone(), row.clone());
        assert!(
            !is_fresh("s1", &leases),
            "even when none of its shards is listed any more"
        );
        row.stream_id = None;
        leases.insert(id, row);
        assert!(!is_fresh("s1", &leases), "rows from before stream ids were kept");
    }

    #[test]
    fn unfinished_rows_of_shards_gone_from_the_stream_are_orphans() {
        // After a day down: every listed shard is new; the rows name shards long trimmed.
        let listed = vec![shard("new", &["gone-2"], false)];
        let mut leases: HashMap<ShardId, Lease> = [lease("gone-1", true), lease("gone-2", false), lease("new", false)]
            .into_iter()
            .collect();
        for row in leases.values_mut() {
            row.stream_id = Some("s1".into());
        }
        let (other_id, mut other) = lease("elsewhere", false);
        other.stream_id = Some("s0".into());
        leases.insert(other_id, other);
        let found: Vec<&str> = orphans("s1", &listed, &leases)
            .iter()
            .map(|lease| lease.shard.0.as_str())
            .collect();
        assert_eq!(
            found,
            vec!["gone-2"],
            "finished, listed and other streams' rows are not"
        );
    }

    #[test]
    fn latest_applies_only_to_a_stream_never_read_and_is_stored_resolved() {
        let open = shard("open", &["closed"], false);
        let closed = shard("closed", &[], true);
        assert!(matches!(
            initial_lease(&open, true, StartingPosition::Latest),
            (Position::LatestAt(_), false)
        ));
        assert!(matches!(
            initial_lease(&closed, true, StartingPosition::Latest),
            (Position::LatestAt(_), true)
        ));
        assert_eq!(
            initial_lease(&open, false, StartingPosition::Latest),
            (Position::TrimHorizon, false)
        );
        assert_eq!(
            initial_lease(&closed, true, StartingPosition::TrimHorizon),
            (Position::TrimHorizon, false)
        );
    }

    /// `AT_TIMESTAMP` reads every shard of a stream never read, closed ones too (they may hold
    /// records after the instant), skipping older records; later shards start at the horizon.
    #[test]
    fn at_timestamp_reads_every_shard_from_the_instant_on_a_stream_never_read() {
        let open = shard("open", &["closed"], false);
        let closed = shard("closed", &[], true);
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        for shard in [&open, &closed] {
            assert_eq!(
                initial_lease(shard, true, StartingPosition::AtTimestamp(at)),
                (Position::LatestAt(at), false)
            );
        }
        assert_eq!(
            initial_lease(&open, false, StartingPosition::AtTimestamp(at)),
            (Position::TrimHorizon, false)
        );
    }
}
