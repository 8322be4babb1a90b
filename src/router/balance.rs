//! Read balancing policies: which of several fitting endpoints gets the next read.

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::settings::ReadPolicy;

/// Under `lowest_latency`, one pick in this many goes round robin instead, so that an endpoint
/// that was slow once is measured again rather than starved forever.
pub(crate) const EXPLORE_EVERY: u64 = 16;

/// What a policy knows of one fitting endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Load {
    pub(crate) name: Arc<str>,
    pub(crate) outstanding: usize,
    pub(crate) latency: Option<Duration>,
    pub(crate) weight: u32,
}

/// The memory of the policies between picks.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    turn: u64,
    /// Smooth weighted round robin's current weights, by endpoint.
    current: HashMap<Arc<str>, i64>,
}

impl Balancer {
    /// Picks one of `loads` (not empty) and returns its index.
    pub(crate) fn pick(&mut self, policy: ReadPolicy, loads: &[Load]) -> usize {
        debug_assert!(!loads.is_empty());
        if loads.len() <= 1 {
            return 0;
        }
        let turn = self.turn;
        self.turn = self.turn.wrapping_add(1);
        let rotate = usize::try_from(turn % loads.len() as u64).unwrap_or(0);
        match policy {
            ReadPolicy::RoundRobin => rotate,
            ReadPolicy::LeastOutstanding => {
                let least = loads.iter().map(|l| l.outstanding).min().unwrap_or(0);
                nth_matching(loads, turn, |l| l.outstanding == least)
            }
            ReadPolicy::LowestLatency => {
                if turn % EXPLORE_EVERY == EXPLORE_EVERY - 1 {
                    // Explore in turn, independently of the pick's own rotation.
                    let explored = (turn / EXPLORE_EVERY) % loads.len() as u64;
                    return usize::try_from(explored).unwrap_or(0);
                }
                // Unmeasured endpoints first: they must be measured to be compared.
                if loads.iter().any(|l| l.latency.is_none()) {
                    return nth_matching(loads, turn, |l| l.latency.is_none());
                }
                let best = loads.iter().filter_map(|l| l.latency).min();
                nth_matching(loads, turn, |l| l.latency == best)
            }
            ReadPolicy::Weighted => self.weighted(loads),
        }
    }

    /// Smooth weighted round robin (as in nginx): over any window of `sum(weights)` picks, each
    /// endpoint is picked `weight` times, interleaved rather than in runs.
    fn weighted(&mut self, loads: &[Load]) -> usize {
        let total: i64 = loads.iter().map(|l| i64::from(l.weight)).sum();
        let mut best = 0;
        let mut best_weight = i64::MIN;
        for (index, load) in loads.iter().enumerate() {
            let current = self.current.entry(Arc::clone(&load.name)).or_insert(0);
            *current += i64::from(load.weight);
            if *current > best_weight {
                best_weight = *current;
                best = index;
            }
        }
        if let Some(current) = self.current.get_mut(&loads[best].name) {
            *current -= total;
        }
        // Forget endpoints that left, so their weights do not linger.
        if self.current.len() > loads.len() {
            self.current
                .retain(|name, _| loads.iter().any(|l| &l.name == name));
        }
        best
    }
}

/// Among the loads that match, the one at position `turn` (so ties rotate).
fn nth_matching(loads: &[Load], turn: u64, matches: impl Fn(&Load) -> bool) -> usize {
    let matching: Vec<usize> = (0..loads.len()).filter(|&i| matches(&loads[i])).collect();
    if matching.is_empty() {
        return 0;
    }
    matching[usize::try_from(turn % matching.len() as u64).unwrap_or(0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, outstanding: usize, latency_ms: Option<u64>, weight: u32) -> Load {
        Load {
            name: Arc::from(name),
            outstanding,
            latency: latency_ms.map(Duration::from_millis),
            weight,
        }
    }

    fn picks(policy: ReadPolicy, loads: &[Load], count: usize) -> Vec<usize> {
        let mut balancer = Balancer::default();
        (0..count).map(|_| balancer.pick(policy, loads)).collect()
    }

    #[test]
    fn round_robin_takes_turns() {
        let loads = [
            load("a", 0, None, 1),
            load("b", 0, None, 1),
            load("c", 0, None, 1),
        ];
        assert_eq!(
            picks(ReadPolicy::RoundRobin, &loads, 6),
            vec![0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn least_outstanding_prefers_the_idle_and_rotates_ties() {
        let loads = [
            load("a", 5, None, 1),
            load("b", 1, None, 1),
            load("c", 1, None, 1),
        ];
        let chosen = picks(ReadPolicy::LeastOutstanding, &loads, 4);
        assert!(chosen.iter().all(|&i| i == 1 || i == 2), "{chosen:?}");
        assert!(chosen.contains(&1) && chosen.contains(&2), "{chosen:?}");
    }

    #[test]
    fn lowest_latency_prefers_the_fast_but_explores() {
        let loads = [load("slow", 0, Some(30), 1), load("fast", 0, Some(2), 1)];
        let chosen = picks(ReadPolicy::LowestLatency, &loads, 64);
        let slow = chosen.iter().filter(|&&i| i == 0).count();
        assert!(
            slow >= 1,
            "the slow endpoint is measured again now and then"
        );
        assert!(
            slow <= 64 / EXPLORE_EVERY as usize,
            "{slow} picks of the slow one"
        );
    }

    #[test]
    fn lowest_latency_measures_the_unmeasured_first() {
        let loads = [load("known", 0, Some(1), 1), load("new", 0, None, 1)];
        assert_eq!(picks(ReadPolicy::LowestLatency, &loads, 1), vec![1]);
    }

    #[test]
    fn weighted_follows_the_weights_smoothly() {
        let loads = [
            load("a", 0, None, 5),
            load("b", 0, None, 1),
            load("c", 0, None, 1),
        ];
        let chosen = picks(ReadPolicy::Weighted, &loads, 7);
        assert_eq!(chosen.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(chosen.iter().filter(|&&i| i == 1).count(), 1);
        assert_eq!(chosen.iter().filter(|&&i| i == 2).count(), 1);
        // nginx's sequence for 5:1:1 is a a b a c a a: never more than two a's before a b or c.
        assert_eq!(chosen, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn a_single_endpoint_is_always_picked() {
        for policy in ReadPolicy::ALL {
            assert_eq!(
                picks(policy, &[load("only", 3, Some(9), 2)], 3),
                vec![0, 0, 0]
            );
        }
    }
}
