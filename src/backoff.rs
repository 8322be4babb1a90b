//! Exponential backoff: how long to wait before the next attempt after consecutive failures.

use std::time::Duration;

/// Doubling waits between `initial` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// Records a failure and returns the wait before the next attempt: `initial` after the first
    /// failure, doubling with each further one, never above `max`.
    pub(crate) fn fail(&mut self) -> Duration {
        let wait = self.peek();
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// The wait [`fail`](Self::fail) would return now.
    pub(crate) fn peek(&self) -> Duration {
        let factor = 2_u32.saturating_pow(self.failures.min(31));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// How many failures in a row were recorded.
    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Forgets the failures after a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let waits: Vec<u128> = (0..5).map(|_| backoff.fail().as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 700, 700]);
        assert_eq!(backoff.failures(), 5);
        backoff.reset();
        assert_eq!(backoff.fail(), Duration::from_millis(100));
    }

    #[test]
    fn survives_many_failures() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        for _ in 0..1000 {
            backoff.fail();
        }
        assert_eq!(backoff.peek(), Duration::from_secs(10));
    }
}
