//! Membership: this worker's heartbeat in the fleet row, what each beat tells it (who is alive,
//! who leads, its own assignment epoch), and the fence on everything it holds.
//!
//! Invariants:
//! - a worker's leases are valid only until `lease_duration` after the *sending* of its last
//!   successful beat ([`Fence`]). The leader declares a worker dead only after seeing its beat
//!   stand still for a whole `lease_duration` by the leader's own clock, which starts no earlier
//!   than that beat was written; so by then the worker has stopped reading on its own;
//! - while the fence is down (a pause, a partition) no reader hands records on;
//! - the leader frees a member's leases only once its removal of the member's entry succeeded,
//!   which fails if the member beat meanwhile; every later beat of a removed member is refused,
//!   and a refused beat (entry gone, or written by another process: a twin with this worker's
//!   id) gives up every held lease. So the fence comes back up only for a worker that still holds
//!   what it held.
//!
//! Must not: read or write shard rows; deciding who reads what is the leader's
//! ([`super::balance`]) and the worker's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{BeatRefused, Fleet, HeldLease, LeaseStore, LeaseTable};
use crate::lock::lock;

/// Until when this worker may act on what it holds.
#[derive(Debug, Default)]
pub(super) struct Fence(Mutex<Option<Instant>>);

impl Fence {
    pub fn valid(&self) -> bool {
        lock(&self.0).is_some_and(|until| Instant::now() < until)
    }

    fn extend(&self, until: Instant) {
        *lock(&self.0) = Some(until);
    }

    fn clear(&self) {
        *lock(&self.0) = None;
    }
}

/// What the beats told this worker, shared by the beat task and the worker's rounds.
#[derive(Debug, Default)]
pub(super) struct FleetView {
    /// The fleet row as the last successful beat returned it.
    pub fleet: Option<Fleet>,
    /// Each member's beat and since when it has not moved.
    seen: HashMap<String, (u64, Instant)>,
    /// Set by the worker on shutdown: beats mark it leaving.
    pub leaving: bool,
    /// This worker's own beat as last written.
    pub own_beat: Option<u64>,
}

impl FleetView {
    /// A copy for a round to work from without holding the lock across awaits.
    pub fn snapshot(&self) -> FleetView {
        FleetView {
            fleet: self.fleet.clone(),
            seen: self.seen.clone(),
            leaving: self.leaving,
            own_beat: self.own_beat,
        }
    }

    fn observe(&mut self, fleet: Fleet, now: Instant) {
        self.seen.retain(|worker, _| fleet.beats.contains_key(worker));
        for (worker, beat) in &fleet.beats {
            if self.seen.get(worker).is_none_or(|(seen, _)| seen != beat) {
                self.seen.insert(worker.clone(), (*beat, now));
            }
        }
        self.fleet = Some(fleet);
    }

    /// Whether `worker` is a member whose beat moved within `duration`.
    pub fn alive(&self, worker: &str, now: Instant, duration: Duration) -> bool {
        self.seen
            .get(worker)
            .is_some_and(|(_, since)| now.duration_since(*since) < duration)
    }

    /// Members whose beat stood still for `duration`, with the beat seen.
    pub fn dead(&self, now: Instant, duration: Duration) -> Vec<(String, u64)> {
        self.seen
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= duration)
            .map(|(worker, (beat, _))| (worker.clone(), *beat))
            .collect()
    }
}

/// What the beat task is given.
pub(super) struct Beating<T> {
    pub leases: LeaseStore<T>,
    pub view: Arc<Mutex<FleetView>>,
    pub fence: Arc<Fence>,
    pub held: watch::Receiver<Vec<Arc<HeldLease>>>,
    pub interval: Duration,
    pub lease_duration: Duration,
    /// Beat at once (shutdown: mark leaving without waiting).
    pub now: Arc<Notify>,
    /// Told after each successful beat.
    pub joined: Arc<Notify>,
}

/// Gives up every lease this worker holds (their readers stop without a final checkpoint).
fn lose_all(held: &watch::Receiver<Vec<Arc<HeldLease>>>) {
    for lease in held.borrow().iter() {
        lease.mark_lost();
    }
}

/// Beats every `interval` until `stop` fires or the worker is gone (its state dropped).
pub(super) async fn beat_loop<T: LeaseTable>(beating: Beating<T>, stop: CancellationToken) {
    let mut every = tokio::time::interval(beating.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A value no earlier run of this worker id wrote, so that observers see a restart move.
    let mut value = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_micros()),
    )
    .unwrap_or(1);
    let mut standby_until: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
            () = beating.now.notified() => {}
        }
        if beating.held.has_changed().is_err() {
            return;
        }
        let sent = Instant::now();
        if standby_until.is_some_and(|until| sent < until) {
            continue;
        }
        value += 1;
        match beat_once(&beating, value).await {
            Ok(()) => standby_until = None,
            Err(Some(BeatRefused::Twin)) => standby_until = Some(sent + beating.lease_duration * 6),
            Err(_) => {}
        }
    }
}

/// One beat: on success the fence moves and the view is updated; on a refusal every held lease
/// is given up.
async fn beat_once<T: LeaseTable>(beating: &Beating<T>, value: u64) -> Result<(), Option<BeatRefused>> {
    let (previous, leaving) = {
        let view = lock(&beating.view);
        (view.own_beat, view.leaving)
    };
    let sent = Instant::now();
    let me = beating.leases.owner();
    match beating.leases.table().beat(me, previous, value, leaving).await {
        Ok(Ok(fleet)) => {
            beating.fence.extend(sent + beating.lease_duration);
            let mut view = lock(&beating.view);
            view.own_beat = Some(value);
            view.observe(fleet, Instant::now());
            beating.joined.notify_one();
            Ok(())
        }
        Ok(Err(refused)) => {
            match refused {
                BeatRefused::Evicted => {
                    tracing::info!("this worker was dropped from the fleet (heartbeats stood still); rejoining")
                }
                BeatRefused::Twin => beating.leases.twin_found(None),
            }
            lose_all(&beating.held);
            beating.fence.clear();
            let mut view = lock(&beating.view);
            view.own_beat = None;
            view.fleet = None;
            Err(Some(refused))
        }
        Err(error) => {
            tracing::warn!(error = %error, "heartbeat failed; retrying at the next beat");
            Err(None)
        }
    }
}
