//! Group commit for calls that carry many independent requests (`TransactWriteItems`,
//! `BatchGetItem`): requests that arrive while the allowed calls are busy share the next call.
//!
//! Owns: the queue of waiting requests, the bound on calls in flight, and letting a burst of
//! requests (the updates of one poll, spawned one after another) into the queue before a call
//! is packed.
//!
//! Invariants:
//! - A request never waits for a timer: with a call free it goes at once, with whatever else is
//!   waiting, so packing costs no latency when the service keeps up and saves calls (and CPU)
//!   when it does not.
//! - Every request gets exactly one answer: from the call that carried it, or "abandoned" when
//!   that call's task went away before answering.
//!
//! Must not: know what a call is or how its answer is split ([`Packing`] does), or retry (answers
//! go back to the caller, whose retry policy decides).

use std::collections::VecDeque;
use std::future::Future;

use tokio::sync::{oneshot, Semaphore};

use crate::lock::lock;

/// A request waiting for a call, and where its answer goes.
pub struct Waiting<P: Packing + ?Sized> {
    pub request: P::Request,
    pub reply: oneshot::Sender<P::Answer>,
}

/// What one kind of call packs and how it answers.
pub trait Packing: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;

    /// How much of a call the request fills (actions, keys), against [`Packing::CALL_CAPACITY`].
    fn size(request: &Self::Request) -> usize;

    /// What one call carries at most, in [`Packing::size`] units.
    const CALL_CAPACITY: usize;

    /// Takes, in arrival order, the waiting requests that fit one call; the rest wait.
    fn take_pack(waiting: &mut VecDeque<Waiting<Self>>) -> Vec<Waiting<Self>>;

    /// Makes the call (or calls) for `pack` and answers every request in it.
    fn send(&self, pack: Vec<Waiting<Self>>) -> impl Future<Output = ()> + Send;

    /// The answer of a request whose call went away unanswered.
    fn abandoned() -> Self::Answer;
}

/// Requests of one [`Packing`], at most `max_calls` calls in flight.
pub struct Combiner<P: Packing> {
    packing: P,
    waiting: std::sync::Mutex<VecDeque<Waiting<P>>>,
    calls: Semaphore,
}

impl<P: Packing> std::fmt::Debug for Combiner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("calls_free", &self.calls.available_permits())
            .finish_non_exhaustive()
    }
}

/// Yields to other tasks at most this often before packing, while more requests keep arriving.
const MAX_YIELDS: usize = 8;

impl<P: Packing> Combiner<P> {
    /// At most `max_calls` (at least 1) calls in flight at once.
    pub fn new(packing: P, max_calls: usize) -> Self {
        Self {
            packing,
            waiting: Default::default(),
            calls: Semaphore::new(max_calls.max(1)),
        }
    }

    pub fn packing(&self) -> &P {
        &self.packing
    }

    /// Sends `request` in a call of its own or shared with other waiting requests.
    ///
    /// The caller that gets a free call sends everything waiting that fits, its own request or
    /// not, and answers every request it sent; a caller whose request went in another's call
    /// waits for that answer.
    pub async fn submit(&self, request: P::Request) -> P::Answer {
        let (reply, mut answer) = oneshot::channel();
        lock(&self.waiting).push_back(Waiting { request, reply });
        loop {
            let permit = tokio::select! {
                biased;
                answered = &mut answer => return answered.unwrap_or_else(|_| P::abandoned()),
                permit = self.calls.acquire() => permit,
            };
            let Ok(_permit) = permit else {
                return P::abandoned();
            };
            self.let_the_burst_in().await;
            let pack = P::take_pack(&mut lock(&self.waiting));
            if pack.is_empty() {
                // Ours is in a call another caller is making.
                drop(_permit);
                return answer.await.unwrap_or_else(|_| P::abandoned());
            }
            self.packing.send(pack).await;
        }
    }

    /// Requests that became ready together get into the queue before a call is packed: yield
    /// to the other tasks while the queue still grows and is short of a full call. Yielding
    /// costs microseconds, not a timer's wait.
    async fn let_the_burst_in(&self) {
        let mut seen = 0;
        for _ in 0..MAX_YIELDS {
            tokio::task::yield_now().await;
            let waiting = lock(&self.waiting);
            let filled: usize = waiting.iter().map(|w| P::size(&w.request)).sum();
            if waiting.len() == seen || filled >= P::CALL_CAPACITY {
                return;
            }
            seen = waiting.len();
        }
    }
}
