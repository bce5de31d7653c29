//! Retry with capped exponential backoff and full jitter, for every layer.
//!
//! Owns the one retry loop the worker uses: callers say which operation they retry (a metric
//! label), and their error type says whether a failure is worth another attempt
//! ([`Retryable`]). Permanent errors return at once; retryable ones wait
//! `random(0, min(max_delay, base_delay * 2^attempt))` (AWS's "full jitter"), so that many
//! tasks failing together do not retry together.
//!
//! backon drives the loop (sleeping, stopping on a permanent error, reporting each retry); its
//! own jitter adds `random(0, delay)` on top of the delay, which is not full jitter, so the
//! delays come from [`FullJitter`] here.
//!
//! Must not: retry anything that is not idempotent at the caller's level, or swallow the final
//! error (the caller decides what a failure means for its record or shard).

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use backon::Retryable as _;

use crate::telemetry::metric;

/// Whether another attempt may succeed where this one failed.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

/// How long and how often to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Ceiling of the first delay; it doubles with every attempt.
    pub base_delay: Duration,
    /// No delay exceeds this.
    pub max_delay: Duration,
    /// Total attempts, the first included; `None` retries until the error turns permanent or
    /// the caller gives up (shutdown).
    pub max_attempts: Option<u32>,
}

impl RetryPolicy {
    /// A fresh sequence of delays for one operation.
    pub fn delays(&self) -> FullJitter {
        FullJitter {
            policy: self.clone(),
            attempt: 0,
        }
    }
}

/// Delays for successive retries: uniform in `[0, min(max_delay, base_delay * 2^n)]`.
#[derive(Debug, Clone)]
pub struct FullJitter {
    policy: RetryPolicy,
    attempt: u32,
}

impl FullJitter {
    /// The upper bound of the next delay, before jitter.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.policy.base_delay.saturating_mul(factor).min(self.policy.max_delay)
    }
}

impl Iterator for FullJitter {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if let Some(max) = self.policy.max_attempts {
            // `attempt` retries have been handed out; attempts made so far = attempt + 1.
            if self.attempt.saturating_add(1) >= max {
                return None;
            }
        }
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(fastrand::u64(0..=nanos)))
    }
}

/// Why a retry loop stopped without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaveUp {
    /// The error said another attempt cannot help.
    Permanent,
    /// The policy's attempts ran out.
    Attempts,
    /// The deadline passed (checked after each failed attempt).
    Deadline,
}

/// The last error of a retry loop that gave up, with how many attempts were made and why.
#[derive(Debug)]
pub struct Failure<E> {
    pub error: E,
    pub attempts: u32,
    pub gave_up: GaveUp,
}

/// Runs `attempt` until it succeeds, fails permanently, or the policy runs out of attempts.
/// Every retry is counted in `stream_worker_retries_total{operation}` and logged.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, operation: &'static str, attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Retryable + Display,
{
    retry_until(policy, operation, None, attempt)
        .await
        .map_err(|failure| failure.error)
}

/// [`retry`], also giving up once `deadline` has passed, and saying how the loop ended.
pub async fn retry_until<T, E, F, Fut>(
    policy: &RetryPolicy,
    operation: &'static str,
    deadline: Option<SystemTime>,
    mut attempt: F,
) -> Result<T, Failure<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Retryable + Display,
{
    let attempts = AtomicU32::new(0);
    let past_deadline = || deadline.is_some_and(|deadline| SystemTime::now() >= deadline);
    let counted = || {
        attempts.fetch_add(1, Ordering::Relaxed);
        attempt()
    };
    counted
        .retry(policy.delays())
        .when(|error: &E| error.is_retryable() && !past_deadline())
        .notify(|error: &E, delay: Duration| {
            metrics::counter!(metric::RETRIES, "operation" => operation).increment(1);
            tracing::warn!(operation, error = %error, delay_ms = delay.as_millis() as u64, "retrying");
        })
        .await
        .map_err(|error| {
            let gave_up = if !error.is_retryable() {
                GaveUp::Permanent
            } else if past_deadline() {
                GaveUp::Deadline
            } else {
                GaveUp::Attempts
            };
            Failure {
                error,
                attempts: attempts.load(Ordering::Relaxed),
                gave_up,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(80),
            max_attempts,
        }
    }

    #[test]
    fn delays_stay_under_a_doubling_capped_ceiling() {
        for _ in 0..200 {
            let ceilings = [10, 20, 40, 80, 80, 80];
            for (delay, ceiling) in policy(None).delays().zip(ceilings) {
                assert!(delay <= Duration::from_millis(ceiling), "{delay:?} > {ceiling} ms");
            }
        }
    }

    #[test]
    fn delays_are_jittered_from_zero() {
        // Full jitter: small delays occur even late in the sequence.
        let late: Vec<Duration> = (0..500).filter_map(|_| policy(None).delays().nth(5)).collect();
        assert!(late.iter().any(|d| *d < Duration::from_millis(20)));
        assert!(late.iter().any(|d| *d > Duration::from_millis(60)));
    }

    #[test]
    fn attempts_are_bounded_when_asked() {
        assert_eq!(policy(Some(4)).delays().count(), 3);
        assert_eq!(policy(Some(1)).delays().count(), 0);
        assert_eq!(policy(None).delays().take(1000).count(), 1000);
    }

    #[derive(Debug)]
    struct TestError(bool);
    impl Retryable for TestError {
        fn is_retryable(&self) -> bool {
            self.0
        }
    }
    impl Display for TestError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure(retryable={})", self.0)
        }
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let result = retry(&policy(None), "test", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(TestError(true))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(result.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_return_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), TestError> = retry(&policy(None), "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(TestError(false))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failure_says_how_many_attempts_and_why() {
        let failure = retry_until(&policy(Some(3)), "test", None, || async {
            Err::<(), _>(TestError(true))
        })
        .await
        .expect_err("always fails");
        assert_eq!((failure.attempts, failure.gave_up), (3, GaveUp::Attempts));

        let failure = retry_until(&policy(Some(3)), "test", None, || async {
            Err::<(), _>(TestError(false))
        })
        .await
        .expect_err("always fails");
        assert_eq!((failure.attempts, failure.gave_up), (1, GaveUp::Permanent));
    }

    #[tokio::test]
    async fn a_passed_deadline_stops_retrying() {
        let deadline = SystemTime::now() + Duration::from_millis(100);
        let failure = retry_until(&policy(None), "test", Some(deadline), || async {
            Err::<(), _>(TestError(true))
        })
        .await
        .expect_err("always fails");
        assert_eq!(failure.gave_up, GaveUp::Deadline);
        assert!(failure.attempts > 1, "retried until the deadline: {}", failure.attempts);
        assert!(SystemTime::now() >= deadline);
    }
}
