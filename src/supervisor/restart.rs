//! The restart policy, as a plain function of the restart history: restart after a growing
//! backoff, and give up when restarts come too often.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::{backoff::Backoff, settings::SupervisorSettings};

/// How often and how soon crashed children are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RestartPolicy {
    /// The most restarts allowed within `period`.
    pub(crate) max_restarts: u32,
    /// The window restarts are counted over.
    pub(crate) period: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
}

impl RestartPolicy {
    pub(crate) fn from_settings(settings: &SupervisorSettings) -> RestartPolicy {
        RestartPolicy {
            max_restarts: settings.max_restarts,
            period: settings.restart_period,
            backoff_initial: settings.backoff_initial,
            backoff_max: settings.backoff_max,
        }
    }

    /// A fresh backoff for one child.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_initial, self.backoff_max)
    }

    /// Decides what follows a crash at `now` of a child that had run for `ran_for`.
    ///
    /// Restarts are counted over the whole supervisor, as OTP does: a storm in any child
    /// escalates. A child that had run for a whole period before crashing starts its backoff
    /// afresh.
    pub(crate) fn decide(
        &self,
        history: &mut RestartHistory,
        backoff: &mut Backoff,
        ran_for: Duration,
        now: Instant,
    ) -> RestartDecision {
        history.forget_before(now.checked_sub(self.period));
        let recent = history.len();
        if recent >= self.max_restarts {
            return RestartDecision::GiveUp {
                restarts: recent,
                within: self.period,
            };
        }
        if ran_for >= self.period {
            backoff.reset();
        }
        let after = backoff.fail();
        history.record(now);
        RestartDecision::Restart {
            after,
            restarts: recent + 1,
        }
    }
}

/// When the recent restarts happened.
#[derive(Debug, Default)]
pub(crate) struct RestartHistory {
    restarts: VecDeque<Instant>,
}

impl RestartHistory {
    fn forget_before(&mut self, horizon: Option<Instant>) {
        if let Some(horizon) = horizon {
            while self.restarts.front().is_some_and(|&at| at <= horizon) {
                self.restarts.pop_front();
            }
        }
    }

    fn record(&mut self, at: Instant) {
        self.restarts.push_back(at);
    }

    fn len(&self) -> u32 {
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }
}

/// What to do about a crashed child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestartDecision {
    /// Restart it after `after`; this is restart number `restarts` within the period.
    Restart { after: Duration, restarts: u32 },
    /// Too many restarts: `restarts` already happened within `within`.
    GiveUp { restarts: u32, within: Duration },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_restarts: 3,
            period: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }

    #[test]
    fn backs_off_then_gives_up_at_the_intensity_limit() {
        let policy = policy();
        let mut history = RestartHistory::default();
        let mut backoff = policy.backoff();
        let start = Instant::now();
        let brief = Duration::from_millis(5);
        let decisions: Vec<RestartDecision> = (0..4)
            .map(|i| {
                policy.decide(
                    &mut history,
                    &mut backoff,
                    brief,
                    start + Duration::from_secs(i),
                )
            })
            .collect();
        assert_eq!(
            decisions,
            vec![
                RestartDecision::Restart {
                    after: Duration::from_millis(100),
                    restarts: 1
                },
                RestartDecision::Restart {
                    after: Duration::from_millis(200),
                    restarts: 2
                },
                RestartDecision::Restart {
                    after: Duration::from_millis(400),
                    restarts: 3
                },
                RestartDecision::GiveUp {
                    restarts: 3,
                    within: Duration::from_secs(60)
                },
            ]
        );
    }

    #[test]
    fn old_restarts_are_forgotten() {
        let policy = policy();
        let mut history = RestartHistory::default();
        let mut backoff = policy.backoff();
        let start = Instant::now();
        let brief = Duration::from_millis(5);
        for i in 0..3 {
            policy.decide(
                &mut history,
                &mut backoff,
                brief,
                start + Duration::from_secs(i),
            );
        }
        // 60.5 s after the first: the other two are still within the period.
        let later = start + Duration::from_millis(60_500);
        assert!(matches!(
            policy.decide(&mut history, &mut backoff, brief, later),
            RestartDecision::Restart { restarts: 3, .. }
        ));
    }

    #[test]
    fn a_child_that_ran_long_starts_its_backoff_afresh() {
        let policy = policy();
        let mut history = RestartHistory::default();
        let mut backoff = policy.backoff();
        let start = Instant::now();
        policy.decide(&mut history, &mut backoff, Duration::ZERO, start);
        policy.decide(&mut history, &mut backoff, Duration::ZERO, start);
        let decision = policy.decide(&mut history, &mut backoff, Duration::from_secs(120), start);
        assert_eq!(
            decision,
            RestartDecision::Restart {
                after: Duration::from_millis(100),
                restarts: 3
            }
        );
    }
}
