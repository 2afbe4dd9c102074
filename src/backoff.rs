//! How long to wait before retrying a failed attempt.

use std::time::Duration;

/// Exponential backoff: the first retry waits `base`, each later one twice the previous,
/// never more than `max`, plus up to `jitter` of that delay at random so that many failures
/// at once do not retry in lockstep.
///
/// Jitter only ever adds: a retry never comes sooner than [`minimum_delay`](Self::minimum_delay).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use root_orchestrator::BackoffPolicy;
///
/// let policy = BackoffPolicy::new(Duration::from_secs(2), Duration::from_secs(60));
/// assert_eq!(policy.minimum_delay(1), Duration::from_secs(2));
/// assert_eq!(policy.minimum_delay(3), Duration::from_secs(8));
/// assert_eq!(policy.minimum_delay(10), Duration::from_secs(60));
///
/// let delay = policy.delay(3);
/// assert!(delay >= Duration::from_secs(8) && delay <= Duration::from_secs_f64(8.0 * 1.1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// Wait before the first retry.
    pub base: Duration,
    /// Longest wait.
    pub max: Duration,
    /// Fraction of the delay (0.0 to 1.0) added at random.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    /// 2 s doubling up to 10 min, with 10 % jitter.
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_secs(2),
            max: Duration::from_secs(600),
            jitter: 0.1,
        }
    }
}

impl BackoffPolicy {
    /// Doubling from `base` up to `max`, with 10 % jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        BackoffPolicy {
            base,
            max,
            ..BackoffPolicy::default()
        }
    }

    /// The same policy with another jitter fraction (clamped to 0.0..=1.0).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The wait before retry number `retry` (1 for the first retry) without jitter.
    pub fn minimum_delay(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1);
        2u32.checked_pow(doublings)
            .and_then(|factor| self.base.checked_mul(factor))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The wait before retry number `retry`, jitter included.
    pub fn delay(&self, retry: u32) -> Duration {
        let minimum = self.minimum_delay(retry);
        if self.jitter <= 0.0 {
            return minimum;
        }
        minimum.mul_f64(1.0 + self.jitter * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_never_shrink_and_stay_within_bounds(
            base_ms in 0u64..10_000,
            max_ms in 0u64..1_000_000,
            retry in 1u32..200,
        ) {
            let policy = BackoffPolicy::new(
                Duration::from_millis(base_ms),
                Duration::from_millis(max_ms),
            );
            let now = policy.minimum_delay(retry);
            let next = policy.minimum_delay(retry + 1);
            prop_assert!(next >= now);
            prop_assert!(now <= Duration::from_millis(max_ms));

            let jittered = policy.delay(retry);
            prop_assert!(jittered >= now);
            prop_assert!(jittered <= now.mul_f64(1.1) + Duration::from_nanos(1));
        }
    }
}
