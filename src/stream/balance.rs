//! Who reads what: the leader's assignment plan, pure, so balancing is tested without a table.
//!
//! Rules (one round, from the leader's copy of the lease table):
//! - every readable lease goes to a live member that is not leaving; shares end within one of
//!   each other in this one round;
//! - a member keeps what it holds up to its quota; the larger quotas go to the members holding
//!   most, so only the excess over the quotas moves (the fewest moves that balance), and it moves
//!   by hand-over from its live owner, never by a take;
//! - leases of dead or departed owners, released and new ones are taken for the members furthest
//!   below their quota;
//! - a lease of an owner that is not a member (a worker of an earlier version) stays with it
//!   while its counter moves ([`Observations`]: judged by this worker's own clock, never by
//!   comparing clocks).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::lease::{Assignment, Lease};
use super::record::ShardId;

/// Why a lease changes hands; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeReason {
    /// Never owned before (a new shard): not a takeover.
    New,
    /// Its owner released it (graceful shutdown).
    Released,
    /// Its owner stopped (heartbeats, or an earlier version's renewals, stood still).
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

/// What the leader does in one assignment round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Leases nobody live holds, each taken for a member, with why.
    pub takes: Vec<(ShardId, String, TakeReason)>,
    /// Every member's assignment: what it reads, and what it hands on to whom.
    pub assignments: BTreeMap<String, Assignment>,
    /// Leases that change hands between live members.
    pub moves: usize,
}

/// One round's assignment of `readable` leases (unfinished, parents done) to `members` (live,
/// not leaving). `leaving` members (live, shutting down) hand everything on. `newcomers` (members
/// that joined within the last lease duration) get free leases and those of leaving members at
/// once, but none moved from a live member yet: in a rolling deploy the old task stops soon after
/// the new one joins, and its shards then go to the newcomer, each moving once. `live_elsewhere`:
/// owners that are not members yet still renew their leases (workers of an earlier version
/// during a rolling deploy): their leases stay theirs.
///
/// Shares end within one of each other in this one round (once no newcomer waits). Each member
/// keeps what it holds up to its quota, and the larger quotas (`total % members` of them) go to
/// the members holding most, so the leases that move are exactly the excess over the quotas:
/// the fewest moves that balance. Every lease goes to the member furthest below its quota.
pub fn plan(
    readable: &[&Lease],
    members: &[String],
    leaving: &[String],
    newcomers: &[String],
    live_elsewhere: impl Fn(&str) -> bool,
) -> Plan {
    let mut plan = Plan::default();
    if members.is_empty() {
        return plan;
    }
    let is_member = |owner: &str| members.iter().any(|m| m == owner);
    let is_leaving = |owner: &str| leaving.iter().any(|m| m == owner);
    let mut held: BTreeMap<&str, Vec<&Lease>> = members.iter().map(|m| (m.as_str(), Vec::new())).collect();
    let mut pool: Vec<&Lease> = Vec::new();
    let mut handed_on: Vec<(&str, &Lease)> = Vec::new();
    for lease in readable {
        match lease.owner.as_deref() {
            Some(owner) if is_member(owner) => held.entry(owner).or_default().push(lease),
            Some(owner) if is_leaving(owner) => handed_on.push((owner, lease)),
            Some(owner) if live_elsewhere(owner) => {}
            _ => pool.push(lease),
        }
    }
    let total: usize = held.values().map(Vec::len).sum::<usize>() + pool.len() + handed_on.len();
    let quotas = quotas(&held, total);
    let mut fill = Fill::default();
    let mut excess: Vec<(&str, &Lease)> = Vec::new();
    for (member, leases) in &held {
        let (keep, over) = leases.split_at(leases.len().min(quotas[member]));
        fill.assigned
            .entry(member)
            .or_default()
            .extend(keep.iter().map(|l| l.shard.clone()));
        fill.missing.insert(member, quotas[member] - keep.len());
        excess.extend(over.iter().map(|lease| (*member, *lease)));
    }
    for lease in pool {
        let Some(target) = fill.place(&lease.shard, |_| true) else {
            break;
        };
        let reason = match (&lease.owner, lease.counter) {
            (None, 0) => TakeReason::New,
            (None, _) => TakeReason::Released,
            (Some(_), _) => TakeReason::Expired,
        };
        plan.takes.push((lease.shard.clone(), target.to_owned(), reason));
    }
    let settled = |member: &str| !newcomers.iter().any(|m| m == member);
    for (from, lease, anyone) in handed_on
        .into_iter()
        .map(|(from, lease)| (from, lease, true))
        .chain(excess.into_iter().map(|(from, lease)| (from, lease, false)))
    {
        match fill.place(&lease.shard, |target| anyone || settled(target)) {
            Some(target) => {
                fill.give
                    .entry(from)
                    .or_default()
                    .insert(lease.shard.clone(), target.to_owned());
                fill.receive
                    .entry(target)
                    .or_default()
                    .insert(lease.shard.clone(), from.to_owned());
                plan.moves += 1;
            }
            // Nowhere to go this round: it stays where it is.
            None => fill.assigned.entry(from).or_default().push(lease.shard.clone()),
        }
    }
    for member in members.iter().chain(leaving) {
        let shards = fill.assigned.remove(member.as_str()).unwrap_or_default();
        let give = fill.give.remove(member.as_str()).unwrap_or_default();
        let receive = fill.receive.remove(member.as_str()).unwrap_or_default();
        plan.assignments
            .insert(member.clone(), Assignment { shards, give, receive });
    }
    plan
}

/// The assignment as it is filled: each member's shards, hand-overs, and what each still misses
/// of its quota.
#[derive(Default)]
struct Fill<'a> {
    assigned: BTreeMap<&'a str, Vec<ShardId>>,
    give: BTreeMap<&'a str, BTreeMap<ShardId, String>>,
    receive: BTreeMap<&'a str, BTreeMap<ShardId, String>>,
    missing: BTreeMap<&'a str, usize>,
}

impl<'a> Fill<'a> {
    /// Gives `shard` to the allowed member furthest below its quota (by name on a tie).
    fn place(&mut self, shard: &ShardId, allowed: impl Fn(&str) -> bool) -> Option<&'a str> {
        let (target, missing) = self
            .missing
            .iter_mut()
            .filter(|(member, missing)| **missing > 0 && allowed(member))
            .max_by(|a, b| (*a.1).cmp(&*b.1).then(b.0.cmp(a.0)))?;
        *missing -= 1;
        let target = *target;
        self.assigned.entry(target).or_default().push(shard.clone());
        Some(target)
    }
}

/// Each member's share of `total`: all get `total / members`, and the `total % members` members
/// holding most get one more.
fn quotas<'a>(held: &BTreeMap<&'a str, Vec<&Lease>>, total: usize) -> BTreeMap<&'a str, usize> {
    let base = total / held.len();
    let mut extra = total % held.len();
    let mut by_load: Vec<(&str, usize)> = held.iter().map(|(m, l)| (*m, l.len())).collect();
    by_load.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    by_load
        .into_iter()
        .map(|(member, _)| {
            let one_more = usize::from(extra > 0);
            extra -= one_more;
            (member, base + one_more)
        })
        .collect()
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

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn owned_by(count: usize, owner: Option<&str>, from: usize) -> Vec<Lease> {
        (from..from + count)
            .map(|i| lease(&format!("s{i:04}"), owner, 3))
            .collect()
    }

    fn shares(plan: &Plan) -> Vec<usize> {
        plan.assignments.values().map(|a| a.shards.len()).collect()
    }

    /// Applies a plan as the workers would: takes, then hand-overs.
    fn apply(leases: &mut [Lease], plan: &Plan) {
        for lease in leases.iter_mut() {
            if let Some((_, to, _)) = plan.takes.iter().find(|(shard, _, _)| *shard == lease.shard) {
                lease.owner = Some(to.clone());
            }
            for assignment in plan.assignments.values() {
                if let Some(to) = assignment.give.get(&lease.shard) {
                    lease.owner = Some(to.clone());
                }
            }
        }
    }

    #[test]
    fn a_lease_is_free_only_after_its_counter_stood_still_for_a_lease_duration() {
        let mut leases = vec![lease("a", Some("old"), 7)];
        let mut seen = Observations::default();
        let start = Instant::now();
        seen.observe(&table(&leases), start);
        assert!(!seen.is_free(&leases[0], start + DURATION - Duration::from_millis(1), DURATION));
        leases[0].counter = 8;
        let later = start + DURATION - Duration::from_millis(1);
        seen.observe(&table(&leases), later);
        assert!(
            !seen.is_free(&leases[0], start + DURATION, DURATION),
            "renewed: the clock starts again"
        );
        assert!(seen.is_free(&leases[0], later + DURATION, DURATION));
        assert!(seen.is_free(&lease("b", None, 3), start, DURATION), "no owner: free");
    }

    #[test]
    fn a_lone_worker_is_assigned_every_lease_with_why() {
        let leases = [lease("a", None, 0), lease("b", None, 3), lease("c", Some("gone"), 3)];
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &members(&["w1"]), &[], &[], |_| false);
        let reasons: Vec<TakeReason> = plan.takes.iter().map(|(_, _, r)| *r).collect();
        assert_eq!(reasons, [TakeReason::New, TakeReason::Released, TakeReason::Expired]);
        assert_eq!(plan.assignments["w1"].shards.len(), 3);
        assert_eq!(plan.moves, 0);
    }

    #[test]
    fn a_joining_worker_gets_its_share_in_one_round_with_the_fewest_moves() {
        // 1,000 leases over 19 workers (53 or 52 each), then a 20th joins with none.
        let names: Vec<String> = (0..20).map(|i| format!("w{i:02}")).collect();
        let mut leases = Vec::new();
        for (index, name) in names.iter().take(19).enumerate() {
            let count = if index < 1000 % 19 { 1000 / 19 + 1 } else { 1000 / 19 };
            leases.extend(owned_by(count, Some(name), leases.len()));
        }
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &names, &[], &[], |_| false);
        assert!(plan.takes.is_empty());
        assert_eq!(shares(&plan), vec![50; 20], "balanced in one round");
        assert_eq!(plan.moves, 50, "exactly the newcomer's share moves");
        apply(&mut leases, &plan);
        let readable: Vec<&Lease> = leases.iter().collect();
        let again = super::plan(&readable, &names, &[], &[], |_| false);
        assert_eq!(again.moves, 0, "and nothing moves the round after");
        assert!(again.takes.is_empty());
    }

    #[test]
    fn a_dead_workers_leases_fill_the_others_within_one() {
        let mut leases = owned_by(10, Some("w1"), 0);
        leases.extend(owned_by(10, Some("w2"), 10));
        leases.extend(owned_by(11, Some("dead"), 20));
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &members(&["w1", "w2"]), &[], &[], |_| false);
        assert_eq!(plan.moves, 0, "no live lease moves");
        assert_eq!(plan.takes.len(), 11);
        assert!(plan.takes.iter().all(|(_, _, r)| *r == TakeReason::Expired));
        let mut counts = shares(&plan);
        counts.sort_unstable();
        assert_eq!(counts, vec![15, 16]);
    }

    #[test]
    fn the_larger_quotas_go_to_the_members_holding_most() {
        // 7 over 3: quotas 3, 2, 2. w1 holds 3, w2 holds 3, w3 none: one moves, not two.
        let mut leases = owned_by(3, Some("w1"), 0);
        leases.extend(owned_by(3, Some("w2"), 3));
        leases.extend(owned_by(1, None, 6));
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &members(&["w1", "w2", "w3"]), &[], &[], |_| false);
        assert_eq!(plan.moves, 1);
        assert_eq!(plan.takes.len(), 1);
        let mut counts = shares(&plan);
        counts.sort_unstable();
        assert_eq!(counts, vec![2, 2, 3]);
    }

    #[test]
    fn leases_of_a_live_previous_version_worker_stay_with_it() {
        let mut leases = owned_by(4, Some("old"), 0);
        leases.extend(owned_by(2, None, 4));
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &members(&["new"]), &[], &[], |owner| owner == "old");
        assert_eq!(plan.assignments["new"].shards.len(), 2);
        assert_eq!(plan.moves, 0);
    }

    #[test]
    fn a_leaving_member_hands_everything_on() {
        let mut leases = owned_by(4, Some("going"), 0);
        leases.extend(owned_by(2, Some("w1"), 4));
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &members(&["w1", "w2"]), &members(&["going"]), &[], |_| false);
        assert_eq!(plan.assignments["going"].shards.len(), 0);
        assert_eq!(plan.assignments["going"].give.len(), 4);
        assert_eq!(plan.moves, 4);
        assert!(plan.takes.is_empty(), "a live leaver's leases are handed on, not taken");
        assert_eq!(shares(&plan), vec![0, 3, 3]);
    }

    #[test]
    fn a_newcomer_gets_free_and_leaving_leases_at_once_but_no_live_one_yet() {
        let mut leases = owned_by(4, Some("w1"), 0);
        leases.extend(owned_by(4, Some("w2"), 4));
        let readable: Vec<&Lease> = leases.iter().collect();
        let waiting = plan(
            &readable,
            &members(&["w1", "w2", "new"]),
            &[],
            &members(&["new"]),
            |_| false,
        );
        assert_eq!(waiting.moves, 0, "no live lease moves to a newcomer");
        assert!(waiting.assignments["new"].shards.is_empty());
        assert_eq!(
            waiting.assignments["w1"].shards.len(),
            4,
            "the excess stays where it is"
        );
        assert!(waiting.assignments["w1"].give.is_empty());

        // A deploy: w2 leaves while the newcomer waits; w2's shards go to the newcomer, once.
        let deploy = plan(
            &readable,
            &members(&["w1", "new"]),
            &members(&["w2"]),
            &members(&["new"]),
            |_| false,
        );
        assert_eq!(deploy.moves, 4);
        assert_eq!(
            deploy.assignments["w2"].give.values().filter(|to| *to == "new").count(),
            4
        );
        assert_eq!(deploy.assignments["w1"].shards.len(), 4, "w1 keeps all it had");

        let mut free = owned_by(2, None, 0);
        free.extend(owned_by(4, Some("w1"), 2));
        let readable: Vec<&Lease> = free.iter().collect();
        let fresh = plan(&readable, &members(&["w1", "new"]), &[], &members(&["new"]), |_| false);
        assert_eq!(
            fresh.assignments["new"].shards.len(),
            2,
            "free leases go to the newcomer first"
        );
        assert_eq!(fresh.moves, 0);
    }

    #[test]
    fn a_lease_is_never_both_taken_and_handed_over_nor_given_to_two() {
        let mut leases = owned_by(9, Some("w1"), 0);
        leases.extend(owned_by(4, None, 9));
        let readable: Vec<&Lease> = leases.iter().collect();
        let plan = plan(&readable, &members(&["w1", "w2", "w3", "w4"]), &[], &[], |_| false);
        let mut seen = std::collections::HashSet::new();
        for assignment in plan.assignments.values() {
            for shard in &assignment.shards {
                assert!(seen.insert(shard.clone()), "{shard} assigned twice");
            }
        }
        assert_eq!(seen.len(), 13);
        let given: usize = plan.assignments.values().map(|a| a.give.len()).sum();
        assert_eq!(given, plan.moves);
        assert_eq!(plan.moves, 9 - 4);
    }
}
