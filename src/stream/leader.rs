//! The leader's duties: one worker of the fleet (holder of the fleet row's `leader` at its
//! `term`) describes the stream, keeps the shard rows in step ([`ShardSync`]), reads the lease
//! table, evicts dead members and assigns every readable shard ([`balance::plan`]).
//!
//! Cost: the table is scanned when something changed (leadership won, a member joined, left or
//! died, a shard finished, new shard rows) and otherwise once per `shard_sync_interval`, with
//! the stream's listing; a finished shard's children are looked up after the scan that finds it
//! finished ([`ShardSync`]). Between scans the leader works from its own copy, kept current by its own writes.
//! A stale copy costs only a failed condition, never a wrong owner: every take names the owner
//! and counter it saw.
//!
//! Must not: read shards or hold leases (the worker does, as any member); act while its fence
//! has lapsed (the worker checks before calling it).
//!
//! [`ShardSync`]: super::sync::ShardSync
//! [`balance::plan`]: super::balance::plan

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::balance::{self, Observations, TakeReason};
use super::context::ShardContext;
use super::error::StreamError;
use super::fleet::FleetView;
use super::lease::{Assignment, Fleet, Lease, LeaseTable};
use super::lineage;
use super::record::ShardId;
use super::source::{ShardInfo, StreamSource};
use super::sync::ShardSync;
use crate::telemetry::metric;

/// Shard states as the `stream_worker_shards{state}` gauge reports them.
const SHARD_STATES: [&str; 5] = ["reading", "owned_elsewhere", "free", "blocked", "finished"];

/// What the leader keeps between rounds.
pub(super) struct Leadership {
    pub term: u64,
    leases: HashMap<ShardId, Lease>,
    scanned: Option<Instant>,
    changes_seen: u64,
    members_seen: BTreeSet<String>,
    /// Assignments as last written, so that only changes are written.
    written: BTreeMap<String, Assignment>,
    observations: Observations,
    /// Members this leader dropped, with the beat they were dropped at (a rejoin beats anew).
    evicted: BTreeMap<String, u64>,
    /// Every worker seen a member while this worker led, and since when: a lease of one that is
    /// no longer a member is free at once (it left or was dropped), not after a lease duration;
    /// one seen for less than a lease duration is a newcomer ([`balance::plan`]).
    known: BTreeMap<String, Instant>,
    /// Scan at the next round (a condition failed: the copy is stale).
    dirty: bool,
}

impl Leadership {
    pub fn new(term: u64) -> Self {
        Self {
            term,
            leases: HashMap::new(),
            scanned: None,
            changes_seen: 0,
            members_seen: BTreeSet::new(),
            written: BTreeMap::new(),
            observations: Observations::default(),
            known: BTreeMap::new(),
            evicted: BTreeMap::new(),
            dirty: true,
        }
    }

    /// Whether the copy of the table must be read again before assigning.
    fn must_scan(&self, fleet: &Fleet, sync_due: bool, outsiders: bool) -> bool {
        let members: BTreeSet<String> = fleet
            .beats
            .keys()
            .cloned()
            .chain(fleet.leaving.iter().cloned())
            .collect();
        self.dirty
            || sync_due
            || outsiders
            || self.scanned.is_none()
            || self.changes_seen != fleet.changes
            || self.members_seen != members
    }

    /// Records when each member was first seen. Members there when this worker began to lead
    /// count as newcomers too: the leader cannot tell how long they have been members, and one
    /// that just started (often the new leader itself, in a deploy) must not take live shards
    /// that an old task is about to leave it.
    fn note_members(&mut self, fleet: &Fleet, now: Instant) {
        for worker in fleet.beats.keys() {
            self.known.entry(worker.clone()).or_insert(now);
        }
    }

    /// Owners of leases that are not members (workers of an earlier version): while any holds a
    /// lease, the table is read every round to see their renewals.
    fn has_outsiders(&self, fleet: &Fleet) -> bool {
        self.leases.values().any(|lease| {
            !lease.shard_end
                && lease
                    .owner
                    .as_ref()
                    .is_some_and(|owner| !fleet.beats.contains_key(owner))
        })
    }
}

/// One leader round: scan if needed (and then keep the shard rows in step), evict the dead,
/// assign.
pub(super) async fn lead<S: StreamSource, T: LeaseTable>(
    context: &ShardContext<S, T>,
    lead: &mut Leadership,
    sync: &mut ShardSync,
    fleet: &Fleet,
    view: &FleetView,
) -> Result<(), StreamError> {
    let now = Instant::now();
    let duration = context.settings.lease_duration;
    lead.note_members(fleet, now);
    let sync_due = now >= sync.next;
    if lead.must_scan(fleet, sync_due, lead.has_outsiders(fleet)) {
        scan(context, lead, fleet, now).await?;
        if sync.run(context, &lead.leases).await {
            scan(context, lead, fleet, now).await?;
        }
    }
    let me = context.leases.owner();
    let dead: Vec<(String, u64)> = view.dead(now, duration).into_iter().filter(|(w, _)| w != me).collect();
    let undecided = evict(context, lead, &dead).await?;
    lead.evicted
        .retain(|worker, beat| fleet.beats.get(worker) == Some(beat));
    let Some(stream) = sync.stream.clone() else {
        return Ok(());
    };
    let roster = Roster::of(lead, fleet, &dead, now, duration);
    let mut readable: Vec<&Lease> = lineage::readable(&stream.shards, &lead.leases, |_| false)
        .into_iter()
        .filter_map(|shard| lead.leases.get(&shard.id))
        .collect();
    readable.sort_by(|a, b| a.shard.cmp(&b.shard));
    // A member that beat again just as it was found dead keeps its leases this round; so does a
    // worker of an earlier version while it renews them.
    let live_elsewhere = |owner: &str| {
        undecided.contains(owner)
            || !lead.known.contains_key(owner)
                && lead.leases.values().any(|lease| {
                    lease.owner.as_deref() == Some(owner) && !lead.observations.is_free(lease, now, duration)
                })
    };
    let plan = balance::plan(
        &readable,
        &roster.members,
        &roster.leaving,
        &roster.newcomers,
        live_elsewhere,
    );
    let readable: BTreeSet<ShardId> = readable.iter().map(|lease| lease.shard.clone()).collect();
    publish(lead, &stream.shards, &readable, &plan, now, duration);
    apply_takes(context, lead, plan.takes).await;
    write_assignments(context, lead, plan.assignments, &stream.stream_id, fleet).await
}

/// Who shares the shards this round.
struct Roster {
    /// Live, not leaving, not dropped.
    members: Vec<String>,
    /// Live, shutting down: they hand everything on.
    leaving: Vec<String>,
    /// Members for less than a lease duration.
    newcomers: Vec<String>,
}

impl Roster {
    fn of(lead: &Leadership, fleet: &Fleet, dead: &[(String, u64)], now: Instant, duration: Duration) -> Self {
        let gone = |worker: &str| {
            dead.iter().any(|(w, _)| w == worker)
                || lead
                    .evicted
                    .get(worker)
                    .is_some_and(|beat| fleet.beats.get(worker) == Some(beat))
        };
        let members: Vec<String> = fleet
            .beats
            .keys()
            .filter(|worker| !fleet.leaving.contains(*worker) && !gone(worker))
            .cloned()
            .collect();
        let leaving = fleet.leaving.iter().filter(|worker| !gone(worker)).cloned().collect();
        let newcomers = members
            .iter()
            .filter(|member| {
                lead.known
                    .get(*member)
                    .is_some_and(|since| now.duration_since(*since) < duration)
            })
            .cloned()
            .collect();
        Self {
            members,
            leaving,
            newcomers,
        }
    }
}

async fn scan<S: StreamSource, T: LeaseTable>(
    context: &ShardContext<S, T>,
    lead: &mut Leadership,
    fleet: &Fleet,
    now: Instant,
) -> Result<(), StreamError> {
    lead.leases = context.leases.load_all().await?;
    lead.scanned = Some(now);
    lead.changes_seen = fleet.changes;
    lead.members_seen = fleet
        .beats
        .keys()
        .cloned()
        .chain(fleet.leaving.iter().cloned())
        .collect();
    lead.observations.observe(&lead.leases, now);
    // Bounded: a worker is remembered while it is a member or owns a lease.
    let owners: BTreeSet<&str> = lead
        .leases
        .values()
        .filter_map(|lease| lease.owner.as_deref())
        .collect();
    lead.known
        .retain(|worker, _| fleet.beats.contains_key(worker) || owners.contains(worker.as_str()));
    lead.dirty = false;
    Ok(())
}

/// Drops members whose beat stood still a whole lease duration; their assignment is emptied so
/// that a rejoin starts from nothing, and their leases are free from this round on. Only a
/// removal that succeeded frees them: it fails when the member beat meanwhile, and a removed
/// member's every later beat is refused (it then gives up all it holds). Returns the members
/// whose removal failed.
async fn evict<S: StreamSource, T: LeaseTable>(
    context: &ShardContext<S, T>,
    lead: &mut Leadership,
    dead: &[(String, u64)],
) -> Result<BTreeSet<String>, StreamError> {
    let table = context.leases.table();
    let mut undecided = BTreeSet::new();
    for (worker, beat) in dead {
        if lead.evicted.get(worker) == Some(beat) {
            continue;
        }
        if table.remove_member(worker, *beat).await? {
            tracing::info!(worker = %worker, "worker dropped from the fleet: its heartbeats stood still for a lease duration");
            table.put_assignment(worker, &Assignment::default()).await?;
            lead.evicted.insert(worker.clone(), *beat);
            lead.written.remove(worker);
            lead.dirty = true;
        } else {
            undecided.insert(worker.clone());
        }
    }
    Ok(undecided)
}

/// Takes each lease nobody live holds for the member the plan chose.
async fn apply_takes<S: StreamSource, T: LeaseTable>(
    context: &ShardContext<S, T>,
    lead: &mut Leadership,
    takes: Vec<(ShardId, String, TakeReason)>,
) {
    for (shard, target, reason) in takes {
        let Some(seen) = lead.leases.get(&shard) else { continue };
        match context.leases.table().take(seen, &target).await {
            Ok(Some(taken)) => {
                if reason != TakeReason::New {
                    metrics::counter!(metric::LEASE_TAKEOVERS, "reason" => reason.label()).increment(1);
                }
                let from = seen.owner.as_deref().unwrap_or("nobody");
                tracing::info!(shard = %shard, reason = reason.label(), from, to = %target, "lease assigned");
                lead.leases.insert(shard, taken);
            }
            Ok(None) => lead.dirty = true,
            Err(error) => {
                tracing::warn!(shard = %shard, error = %error, "could not assign the lease");
                lead.dirty = true;
            }
        }
    }
}

/// Writes the assignments that changed and tells their members (and everyone the stream).
async fn write_assignments<S: StreamSource, T: LeaseTable>(
    context: &ShardContext<S, T>,
    lead: &mut Leadership,
    assignments: BTreeMap<String, Assignment>,
    stream_id: &str,
    fleet: &Fleet,
) -> Result<(), StreamError> {
    let table = context.leases.table();
    let mut changed = Vec::new();
    for (worker, mut assignment) in assignments {
        // A leader new to this member starts from what the last leader wrote for it, so that
        // the moves that one assigned keep saying where they come from.
        if !lead.written.contains_key(&worker) {
            let stored = table.assignment(&worker).await?;
            lead.written.insert(worker.clone(), stored);
        }
        // A move stays on the receiver's assignment while the shard is assigned there: the
        // receiver may read it only after the hand-over is done, and says where it came from.
        if let Some(before) = lead.written.get(&worker) {
            for (shard, from) in &before.receive {
                if assignment.shards.contains(shard) {
                    assignment.receive.entry(shard.clone()).or_insert_with(|| from.clone());
                }
            }
        }
        if lead.written.get(&worker) == Some(&assignment) {
            continue;
        }
        table.put_assignment(&worker, &assignment).await?;
        lead.written.insert(worker.clone(), assignment);
        changed.push(worker);
    }
    let new_stream = (fleet.stream_id.as_deref() != Some(stream_id)).then_some(stream_id);
    if !changed.is_empty() || new_stream.is_some() {
        table.notify(&changed, new_stream).await?;
    }
    Ok(())
}

/// The shard states gauge, from the leader's copy (the only worker that sets it: summed over the
/// fleet, each shard counts once).
fn publish(
    lead: &Leadership,
    shards: &[ShardInfo],
    readable: &BTreeSet<ShardId>,
    plan: &balance::Plan,
    now: Instant,
    duration: Duration,
) {
    let assigned: BTreeSet<&ShardId> = plan.assignments.values().flat_map(|a| a.shards.iter()).collect();
    let mut counts: HashMap<&str, usize> = SHARD_STATES.iter().map(|state| (*state, 0)).collect();
    for shard in shards {
        let Some(lease) = lead.leases.get(&shard.id) else {
            continue;
        };
        let state = if lease.shard_end {
            "finished"
        } else if !readable.contains(&shard.id) {
            "blocked"
        } else if assigned.contains(&shard.id) && lease.owner.is_some() {
            "reading"
        } else if lead.observations.is_free(lease, now, duration) {
            "free"
        } else {
            "owned_elsewhere"
        };
        *counts.entry(state).or_default() += 1;
    }
    for (state, count) in counts {
        metrics::gauge!(metric::SHARDS, "state" => state).set(count as f64);
    }
}

/// A worker that does not lead reports no shard states (the leader reports them all).
pub(super) fn publish_nothing() {
    for state in SHARD_STATES {
        metrics::gauge!(metric::SHARDS, "state" => state).set(0.0);
    }
}
