//! What readiness knows of the stream: was it found, did a read or a lease round succeed lately.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::lock::lock;

/// What readiness needs to know: was the stream found, and did a read succeed recently.
#[derive(Debug, Default)]
pub struct StreamHealth {
    stream_id: Mutex<Option<String>>,
    last_read: Mutex<Option<Instant>>,
    /// When the lease table was last read, and whether this worker held leases then.
    last_lease_round: Mutex<Option<(Instant, bool)>>,
}

impl StreamHealth {
    pub(crate) fn stream_found(&self, stream_id: &str) {
        let mut current = lock(&self.stream_id);
        if current.as_deref() != Some(stream_id) {
            tracing::info!(stream = stream_id, "reading stream");
            *current = Some(stream_id.to_owned());
        }
    }

    pub(crate) fn stream_lost(&self) {
        *lock(&self.stream_id) = None;
    }

    pub(crate) fn read_succeeded(&self) {
        *lock(&self.last_read) = Some(Instant::now());
    }

    pub(crate) fn lease_round_succeeded(&self, holding: bool) {
        *lock(&self.last_lease_round) = Some((Instant::now(), holding));
    }

    /// `Ok` when the stream is found and a read succeeded within `max_age`, or, for a worker
    /// standing by with no leases, the lease table was read within `max_age`; otherwise why not.
    pub fn readiness(&self, max_age: Duration) -> Result<(), String> {
        if lock(&self.stream_id).is_none() {
            return Err("stream not found yet".to_owned());
        }
        if let Some((at, false)) = *lock(&self.last_lease_round) {
            if at.elapsed() <= max_age {
                return Ok(());
            }
        }
        match *lock(&self.last_read) {
            None => Err("no successful read yet".to_owned()),
            Some(at) if at.elapsed() > max_age => {
                Err(format!("no successful read for {} ms", at.elapsed().as_millis()))
            }
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_stream_and_a_recent_read() {
        let health = StreamHealth::default();
        assert!(health.readiness(Duration::from_secs(10)).is_err());
        health.stream_found("arn:stream");
        assert!(health.readiness(Duration::from_secs(10)).is_err());
        health.read_succeeded();
        assert!(health.readiness(Duration::from_secs(10)).is_ok());
        std::thread::sleep(Duration::from_millis(5));
        assert!(health.readiness(Duration::from_millis(1)).is_err());
        health.stream_lost();
        assert!(health.readiness(Duration::from_secs(10)).is_err());
    }
}
