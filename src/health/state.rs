//! The hysteresis of one endpoint's health: `failures_to_down` failed probes in a row to go down,
//! `successes_to_up` good ones in a row to come back, and an event only when it really flips.

use std::{
    fmt,
    time::{Duration, Instant},
};

/// How an endpoint is doing, as its probes judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthState {
    /// Not probed yet.
    Unknown,
    /// Answering.
    Up,
    /// Up, but the last probes failed; down if enough more fail.
    Suspect,
    /// Not answering: no traffic.
    Down,
    /// Down, but the last probes succeeded; up if enough more do.
    Recovering,
}

impl HealthState {
    /// Whether the endpoint may get traffic: until it is declared down, it does.
    pub fn is_serving(self) -> bool {
        matches!(
            self,
            HealthState::Unknown | HealthState::Up | HealthState::Suspect
        )
    }

    /// The name used in logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Up => "up",
            HealthState::Suspect => "suspect",
            HealthState::Down => "down",
            HealthState::Recovering => "recovering",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A change worth an event: the endpoint stopped or started serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flip {
    pub(crate) from: HealthState,
    pub(crate) to: HealthState,
}

/// The thresholds of the hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Thresholds {
    pub(crate) failures_to_down: u32,
    pub(crate) successes_to_up: u32,
}

/// One endpoint's hysteresis.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    thresholds: Thresholds,
    state: HealthState,
    /// Failures (while up or suspect) or successes (while down or recovering) in a row.
    streak: u32,
    /// The first failure of the current run of failures, for failover timelines.
    first_failure: Option<Instant>,
    /// Failed probes in a row, whatever the state.
    failures: u32,
    since: Option<Instant>,
}

impl Tracker {
    pub(crate) fn new(thresholds: Thresholds) -> Tracker {
        Tracker {
            thresholds: Thresholds {
                failures_to_down: thresholds.failures_to_down.max(1),
                successes_to_up: thresholds.successes_to_up.max(1),
            },
            state: HealthState::Unknown,
            streak: 0,
            first_failure: None,
            failures: 0,
            since: None,
        }
    }

    /// A tracker that continues from `state`, as judged before a restart: a down (or
    /// recovering) endpoint stays down until `successes_to_up` probes succeed; one that was
    /// serving is up.
    pub(crate) fn resume(thresholds: Thresholds, state: Option<HealthState>) -> Tracker {
        let mut tracker = Tracker::new(thresholds);
        tracker.state = match state {
            Some(HealthState::Down | HealthState::Recovering) => HealthState::Down,
            Some(HealthState::Up | HealthState::Suspect) => HealthState::Up,
            Some(HealthState::Unknown) | None => HealthState::Unknown,
        };
        tracker
    }

    pub(crate) fn state(&self) -> HealthState {
        self.state
    }

    /// When the current run of failures began (`None` while probes succeed).
    pub(crate) fn first_failure(&self) -> Option<Instant> {
        self.first_failure
    }

    /// When the current state was entered.
    #[cfg(test)]
    pub(crate) fn since(&self) -> Option<Instant> {
        self.since
    }

    fn enter(&mut self, state: HealthState, now: Instant) -> Option<Flip> {
        let from = self.state;
        self.state = state;
        if from != state {
            self.since = Some(now);
        }
        (from.is_serving() != state.is_serving() || from == HealthState::Unknown && from != state)
            .then_some(Flip { from, to: state })
    }

    /// Records a probe that succeeded at `now`.
    pub(crate) fn success(&mut self, now: Instant) -> Option<Flip> {
        self.first_failure = None;
        self.failures = 0;
        match self.state {
            HealthState::Unknown | HealthState::Up | HealthState::Suspect => {
                self.streak = 0;
                self.enter(HealthState::Up, now)
            }
            HealthState::Down | HealthState::Recovering => {
                self.streak += 1;
                if self.streak >= self.thresholds.successes_to_up {
                    self.streak = 0;
                    self.enter(HealthState::Up, now)
                } else {
                    self.enter(HealthState::Recovering, now)
                }
            }
        }
    }

    /// Records a probe that failed at `now`.
    pub(crate) fn failure(&mut self, now: Instant) -> Option<Flip> {
        self.first_failure.get_or_insert(now);
        self.failures = self.failures.saturating_add(1);
        match self.state {
            HealthState::Unknown | HealthState::Up | HealthState::Suspect => {
                self.streak += 1;
                if self.streak >= self.thresholds.failures_to_down {
                    self.streak = 0;
                    self.enter(HealthState::Down, now)
                } else {
                    self.enter(HealthState::Suspect, now)
                }
            }
            HealthState::Down | HealthState::Recovering => {
                self.streak = 0;
                self.enter(HealthState::Down, now)
            }
        }
    }
}

impl Tracker {
    /// How long to wait before the next probe: `interval` while the endpoint is up (or not
    /// probed yet); `suspect_interval` while it is suspect or recovering, so that a failure is
    /// confirmed, or a return admitted, quickly; and while it is down, a backoff that starts at
    /// `suspect_interval` and doubles with each further failure up to `interval`, so that a
    /// server that stays away is not hammered with connection attempts.
    pub(crate) fn next_probe(&self, interval: Duration, suspect_interval: Duration) -> Duration {
        let fast = suspect_interval.min(interval);
        match self.state {
            HealthState::Unknown | HealthState::Up => interval,
            HealthState::Suspect | HealthState::Recovering => fast,
            HealthState::Down => {
                let beyond = self
                    .failures
                    .saturating_sub(self.thresholds.failures_to_down)
                    .min(16);
                fast.saturating_mul(1 << beyond).min(interval)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn tracker(down: u32, up: u32) -> Tracker {
        Tracker::new(Thresholds {
            failures_to_down: down,
            successes_to_up: up,
        })
    }

    #[test]
    fn the_first_success_brings_it_up() {
        let now = Instant::now();
        let mut t = tracker(3, 2);
        assert_eq!(
            t.success(now),
            Some(Flip {
                from: HealthState::Unknown,
                to: HealthState::Up
            })
        );
        assert_eq!(t.success(now), None, "no event without a change");
    }

    #[test]
    fn it_takes_n_failures_to_go_down() {
        let start = Instant::now();
        let mut t = tracker(3, 2);
        t.success(start);
        let ms = |n| start + Duration::from_millis(n);
        assert_eq!(t.failure(ms(10)), None);
        assert_eq!(t.state(), HealthState::Suspect);
        assert_eq!(t.failure(ms(20)), None);
        assert_eq!(
            t.failure(ms(30)),
            Some(Flip {
                from: HealthState::Suspect,
                to: HealthState::Down
            })
        );
        assert_eq!(
            t.first_failure(),
            Some(ms(10)),
            "the run began with the first failure"
        );
        assert_eq!(t.since(), Some(ms(30)));
    }

    #[test]
    fn a_success_in_between_resets_the_count() {
        let now = Instant::now();
        let mut t = tracker(3, 2);
        t.success(now);
        t.failure(now);
        t.failure(now);
        assert_eq!(t.success(now), None, "suspect to up is not an event");
        assert_eq!(t.first_failure(), None);
        t.failure(now);
        t.failure(now);
        assert_eq!(t.state(), HealthState::Suspect, "the count started again");
    }

    #[test]
    fn it_takes_m_successes_to_come_back_and_one_failure_to_fall_again() {
        let now = Instant::now();
        let mut t = tracker(1, 3);
        t.success(now);
        assert!(t.failure(now).is_some());
        assert_eq!(t.success(now), None);
        assert_eq!(t.state(), HealthState::Recovering);
        assert_eq!(
            t.failure(now),
            None,
            "recovering to down is not an event: it never served"
        );
        assert_eq!(t.state(), HealthState::Down);
        t.success(now);
        t.success(now);
        assert_eq!(
            t.success(now),
            Some(Flip {
                from: HealthState::Recovering,
                to: HealthState::Up
            })
        );
    }

    #[test]
    fn a_flapping_endpoint_raises_no_event_storm() {
        let now = Instant::now();
        let mut t = tracker(3, 2);
        t.success(now);
        let events = (0..100)
            .filter_map(|i| {
                if i % 2 == 0 {
                    t.failure(now)
                } else {
                    t.success(now)
                }
            })
            .count();
        assert_eq!(events, 0, "alternating results never reach a threshold");
        assert_eq!(t.state(), HealthState::Up);
    }

    #[test]
    fn an_endpoint_down_from_the_start() {
        let now = Instant::now();
        let mut t = tracker(2, 2);
        assert_eq!(
            t.failure(now),
            Some(Flip {
                from: HealthState::Unknown,
                to: HealthState::Suspect
            })
        );
        assert_eq!(
            t.failure(now),
            Some(Flip {
                from: HealthState::Suspect,
                to: HealthState::Down
            })
        );
    }

    #[test]
    fn probes_back_off_while_down_and_come_quickly_while_suspect_or_recovering() {
        let now = Instant::now();
        let (interval, fast) = (Duration::from_millis(250), Duration::from_millis(50));
        let mut t = tracker(3, 2);
        assert_eq!(t.next_probe(interval, fast), interval, "not probed yet");
        t.success(now);
        assert_eq!(t.next_probe(interval, fast), interval);
        t.failure(now);
        assert_eq!(t.next_probe(interval, fast), fast, "suspect");
        t.failure(now);
        t.failure(now);
        assert_eq!(t.state(), HealthState::Down);
        let waits: Vec<u128> = (0..5)
            .map(|_| {
                let wait = t.next_probe(interval, fast).as_millis();
                t.failure(now);
                wait
            })
            .collect();
        assert_eq!(
            waits,
            [50, 100, 200, 250, 250],
            "doubling up to the interval"
        );
        t.success(now);
        assert_eq!(t.state(), HealthState::Recovering);
        assert_eq!(
            t.next_probe(interval, fast),
            fast,
            "a return is admitted quickly"
        );
        t.failure(now);
        assert_eq!(
            t.next_probe(interval, fast),
            fast,
            "a new run of failures starts the backoff again"
        );
    }
}
