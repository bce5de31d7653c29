//! What the stream hands its records to: a [`Consumer`] opens one [`ShardLane`] per shard.
//! The stream layer defines these traits and knows nothing of what implements them.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use super::record::{Record, SequenceNumber, ShardId};

/// Since when a lane's oldest submitted record has waited (its creation time, or when it was
/// submitted if the source gave none); `None` when every submitted record is handled. Callable
/// from any task, whatever the lane's reader is doing.
pub type WaitingSince = Arc<dyn Fn() -> Option<SystemTime> + Send + Sync>;

/// What the stream hands its records to.
pub trait Consumer: Send + Sync + 'static {
    type Lane: ShardLane;
    /// A lane for one shard's records; records submitted to it are handled in the lane's
    /// order where the consumer requires order.
    fn open_lane(&self, shard: &ShardId) -> Self::Lane;
}

/// One shard's way into the consumer.
pub trait ShardLane: Send + Sync + 'static {
    /// Takes a batch, in stream order. Waits while the consumer is at its in-flight bound
    /// (backpressure); returns once every record is accepted, not handled.
    fn submit(&mut self, records: Vec<Record>) -> impl Future<Output = ()> + Send;
    /// Takes a batch that more records follow at once (the page was full: the shard is behind).
    /// The lane may hold its work back, within its memory budget, to fold later records of the
    /// same keys into it; the next `submit` or `drain` releases it. By default, `submit`.
    fn submit_ahead(&mut self, records: Vec<Record>) -> impl Future<Output = ()> + Send {
        self.submit(records)
    }
    /// The newest submitted record such that it and every record submitted before it are
    /// fully handled: the only sequence number a checkpoint may name.
    fn handled_through(&self) -> Option<SequenceNumber>;
    /// Waits until every submitted record is fully handled.
    fn drain(&mut self) -> impl Future<Output = ()> + Send;
    /// A probe of the lane's oldest waiting record, for the processing lag. By default the
    /// lane reports none.
    fn waiting_since(&self) -> WaitingSince {
        Arc::new(|| None)
    }
}
