//! Which leases a worker takes in one round: pure, so balancing is tested without a table.
//!
//! Rules (per round, from this worker's view of the lease table):
//! - a lease is *free* when it has no owner (new or released) or when its counter has not moved
//!   for a whole lease duration as measured by this worker's own clock (expired: its owner
//!   stopped renewing). Clocks of different workers are never compared;
//! - the target share is `ceil(readable leases / workers)`, where workers are the owners of
//!   live leases plus this one;
//! - free leases are taken first, up to the target;
//! - only if this worker is still more than one lease below the most loaded worker does it steal,
//!   at most `max_steals` per round, from that worker. So shares converge to within one of each
//!   other without leases bouncing back and forth.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::lease::Lease;
use super::record::ShardId;

/// Why a lease changes hands; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeReason {
    /// Never owned before (a new shard): not a takeover.
    New,
    /// Its owner released it (graceful shutdown).
    Released,
    /// Its owner stopped renewing it.
    Expired,
    /// Taken from a live owner to even out shares.
    Stolen,
}

impl TakeReason {
    pub fn label(self) -> &'static str {
        match self {
            TakeReason::New => "new",
            TakeReason::Released => "released",
            TakeReason::Expired => "expired",
            TakeReason::Stolen => "stolen",
        }
    }
}

/// What this worker has seen of one lease: the counter and since when it has not moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub counter: u64,
    pub owner: Option<String>,
    pub since: Instant,
}

/// Remembers sightings across rounds; a lease whose counter moves is seen anew.
#[derive(Debug, Default)]
pub struct Observations(HashMap<ShardId, Sighting>);

impl Observations {
    /// Records this round's view; forgets leases that are gone.
    pub fn observe(&mut self, leases: &HashMap<ShardId, Lease>, now: Instant) {
        self.0.retain(|shard, _| leases.contains_key(shard));
        for (shard, lease) in leases {
            let changed = self
                .0
                .get(shard)
                .is_none_or(|seen| seen.counter != lease.counter || seen.owner != lease.owner);
            if changed {
                self.0.insert(
                    shard.clone(),
                    Sighting {
                        counter: lease.counter,
                        owner: lease.owner.clone(),
                        since: now,
                    },
                );
            }
        }
    }

    /// Unowned, or not renewed for `lease_duration` by this worker's clock.
    pub fn is_free(&self, lease: &Lease, now: Instant, lease_duration: Duration) -> bool {
        if lease.owner.is_none() {
            return true;
        }
        self.0
            .get(&lease.shard)
            .is_some_and(|seen| seen.counter == lease.counter && now.duration_since(seen.since) >= lease_duration)
    }
}

/// The leases to try to take this round, with why. `readable`: unfinished leases whose shards
/// may be read now (parents done), in a stable order.
pub fn choose(
    me: &str,
    readable: &[&Lease],
    observations: &Observations,
    now: Instant,
    lease_duration: Duration,
    max_steals: usize,
) -> Vec<(ShardId, TakeReason)> {
    let free = |lease: &Lease| observations.is_free(lease, now, lease_duration);
    let mut load: BTreeMap<&str, usize> = BTreeMap::from([(me, 0)]);
    for lease in readable.iter().filter(|lease| !free(lease)) {
        if let Some(owner) = lease.owner.as_deref() {
            *load.entry(owner).or_default() += 1;
        }
    }
    let target = readable.len().div_ceil(load.len());
    let mut mine = load[me];
    let mut chosen = Vec::new();
    for lease in readable
        .iter()
        .filter(|lease| free(lease) && lease.owner.as_deref() != Some(me))
    {
        if mine >= target {
            break;
        }
        let reason = match (&lease.owner, lease.counter) {
            (None, 0) => TakeReason::New,
            (None, _) => TakeReason::Released,
            (Some(_), _) => TakeReason::Expired,
        };
        chosen.push((lease.shard.clone(), reason));
        mine += 1;
    }
    for _ in 0..max_steals {
        let Some((&victim, &their)) = load
            .iter()
            .filter(|(owner, _)| **owner != me)
            .max_by_key(|(_, count)| **count)
        else {
            break;
        };
        if their <= mine + 1 {
            break;
        }
        let Some(lease) = readable.iter().find(|lease| {
            lease.owner.as_deref() == Some(victim)
                && !free(lease)
                && !chosen.iter().any(|(shard, _)| *shard == lease.shard)
        }) else {
            break;
        };
        chosen.push((lease.shard.clone(), TakeReason::Stolen));
        load.insert(victim, their - 1);
        mine += 1;
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Position;

    const DURATION: Duration = Duration::from_secs(10);

    fn lease(shard: &str, owner: Option<&str>, counter: u64) -> Lease {
        Lease {
            shard: ShardId(shard.into()),
            checkpoint: Position::TrimHorizon,
            owner: owner.map(str::to_owned),
            parents: vec![],
            shard_end: false,
            counter,
            stream_id: None,
        }
    }

    fn table(leases: &[Lease]) -> HashMap<ShardId, Lease> {
        leases.iter().map(|l| (l.shard.clone(), l.clone())).collect()
    }

    fn run(me: &str, leases: &[Lease], observations: &Observations, now: Instant) -> Vec<(String, TakeReason)> {
        let readable: Vec<&Lease> = leases.iter().collect();
        choose(me, &readable, observations, now, DURATION, 1)
            .into_iter()
            .map(|(shard, reason)| (shard.0, reason))
            .collect()
    }

    #[test]
    fn a_lone_worker_takes_every_new_lease() {
        let leases = [lease("a", None, 0), lease("b", None, 0), lease("c", None, 3)];
        let mut seen = Observations::default();
        let now = Instant::now();
        seen.observe(&table(&leases), now);
        let taken = run("w1", &leases, &seen, now);
        assert_eq!(
            taken,
            vec![
                ("a".into(), TakeReason::New),
                ("b".into(), TakeReason::New),
                ("c".into(), TakeReason::Released)
            ]
        );
    }

    #[test]
    fn a_second_worker_takes_half_by_stealing_one_per_round() {
        let mut leases: Vec<Lease> = ["a", "b", "c", "d"].iter().map(|s| lease(s, Some("w1"), 5)).collect();
        let mut seen = Observations::default();
        let now = Instant::now();
        seen.observe(&table(&leases), now);
        let taken = run("w2", &leases, &seen, now);
        assert_eq!(taken, vec![("a".into(), TakeReason::Stolen)], "one steal per round");
        leases[0].owner = Some("w2".into());
        seen.observe(&table(&leases), now);
        assert_eq!(run("w2", &leases, &seen, now), vec![("b".into(), TakeReason::Stolen)]);
        leases[1].owner = Some("w2".into());
        seen.observe(&table(&leases), now);
        assert!(run("w2", &leases, &seen, now).is_empty(), "2 and 2: balanced");
        assert!(run("w1", &leases, &seen, now).is_empty(), "and w1 does not steal back");
    }

    #[test]
    fn shares_within_one_do_not_move() {
        let leases = [
            lease("a", Some("w1"), 1),
            lease("b", Some("w1"), 1),
            lease("c", Some("w2"), 1),
        ];
        let mut seen = Observations::default();
        let now = Instant::now();
        seen.observe(&table(&leases), now);
        assert!(run("w2", &leases, &seen, now).is_empty());
        assert!(run("w1", &leases, &seen, now).is_empty());
    }

    #[test]
    fn a_lease_expires_only_after_its_counter_stood_still_for_a_lease_duration() {
        let mut leases = vec![lease("a", Some("w1"), 7), lease("b", Some("w1"), 7)];
        let mut seen = Observations::default();
        let start = Instant::now();
        seen.observe(&table(&leases), start);
        let later = start + DURATION - Duration::from_millis(1);
        assert!(run("w2", &leases, &seen, later)
            .iter()
            .all(|(_, r)| *r != TakeReason::Expired));
        // A renewal moves the counter: the clock starts again.
        leases[0].counter = 8;
        seen.observe(&table(&leases), later);
        let expired_at = start + DURATION;
        let taken = run("w2", &leases, &seen, expired_at);
        assert_eq!(
            taken,
            vec![("b".into(), TakeReason::Expired)],
            "w1 counts as gone: w2 takes what is free"
        );
        let taken = run("w2", &leases, &seen, later + DURATION);
        assert_eq!(taken.len(), 2, "both expired");
    }

    #[test]
    fn three_workers_converge_within_one() {
        let mut leases: Vec<Lease> = (0..8).map(|i| lease(&format!("s{i}"), Some("w1"), 1)).collect();
        let mut seen = Observations::default();
        let now = Instant::now();
        for _round in 0..20 {
            for me in ["w2", "w3", "w1"] {
                seen.observe(&table(&leases), now);
                for (shard, _) in run(me, &leases, &seen, now) {
                    let lease = leases.iter_mut().find(|l| l.shard.0 == shard).expect("known");
                    lease.owner = Some(me.to_owned());
                    lease.counter += 1;
                }
            }
        }
        let count = |w: &str| leases.iter().filter(|l| l.owner.as_deref() == Some(w)).count();
        let counts = [count("w1"), count("w2"), count("w3")];
        assert_eq!(counts.iter().sum::<usize>(), 8);
        assert!(
            counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0) <= 1,
            "{counts:?}"
        );
    }
}
