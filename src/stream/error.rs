//! The stream layer's failures, each retryable or permanent.

use super::record::ShardId;
use crate::aws::AwsError;
use crate::retry::Retryable;

/// Failures of the stream layer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("table {0} does not exist (run `cruddur-stream-worker setup`)")]
    TableNotFound(String),
    #[error("table {0} has no stream (enable a stream with NEW_IMAGE)")]
    StreamDisabled(String),
    #[error("stream {0} does not exist")]
    StreamNotFound(String),
    /// The source answers that the shard does not exist (any more): trimmed away after the
    /// retention. Its reader finishes the lease instead of retrying.
    #[error("shard {0} no longer exists")]
    ShardGone(ShardId),
    #[error("shard iterator expired")]
    ExpiredIterator,
    #[error("records were trimmed before they were read: {0}")]
    Trimmed(String),
    #[error("lease on shard {shard} is no longer ours (owner now {owner})")]
    LeaseLost { shard: ShardId, owner: String },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl StreamError {
    /// The stream itself is missing (not one call failing): readiness drops until it is found.
    pub fn is_stream_missing(&self) -> bool {
        matches!(
            self,
            StreamError::TableNotFound(_) | StreamError::StreamDisabled(_) | StreamError::StreamNotFound(_)
        )
    }
}

impl Retryable for StreamError {
    fn is_retryable(&self) -> bool {
        match self {
            // The table or its stream may appear: setup runs beside the worker.
            StreamError::TableNotFound(_) | StreamError::StreamDisabled(_) | StreamError::StreamNotFound(_) => true,
            StreamError::Aws(error) => error.is_retryable(),
            StreamError::ExpiredIterator
            | StreamError::ShardGone(_)
            | StreamError::Trimmed(_)
            | StreamError::LeaseLost { .. }
            | StreamError::Malformed { .. } => false,
        }
    }
}
