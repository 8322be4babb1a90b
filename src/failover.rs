//! Failover and fencing decisions, as plain functions of what the probes observed.
//!
//! One [`ClusterFailover`] per cluster keeps the *accepted* primary: the one endpoint writes go
//! to. Its rules:
//! - A primary is accepted only when it is out of recovery and, for the servers of one cluster
//!   (one system identifier), on a timeline not older than any seen: a stale primary that comes
//!   back on an old timeline is never accepted again by itself.
//! - While a primary is accepted, every other writable endpoint of the cluster is fenced (no
//!   traffic at all) until an operator re-admits it, or it comes back as a standby of the
//!   accepted primary. There are never two write targets.
//! - When the accepted primary is declared down, no endpoint takes writes until a new one is
//!   accepted, by the mode: `follow` waits for an external manager's promotion, `promote` asks
//!   for the most advanced standby to be promoted, `backup` moves writes to the backup endpoint,
//!   `manual` waits for an operator.

use std::{collections::BTreeSet, fmt, sync::Arc, time::Instant};

use crate::{health::HealthState, position::Position, settings::Role};

pub use crate::settings::{FailbackMode, FailoverMode};

/// What the probes last observed of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) name: Arc<str>,
    pub(crate) role: Role,
    pub(crate) state: HealthState,
    /// When the current run of failed probes began.
    pub(crate) first_failure: Option<Instant>,
    /// Out of recovery, as last seen (`None` before the first successful probe).
    pub(crate) writable: Option<bool>,
    pub(crate) system_id: Option<u64>,
    pub(crate) timeline: Option<u32>,
    pub(crate) position: Option<Position>,
}

impl Observed {
    /// Declared up: not unknown, suspect, down or recovering.
    fn up(&self) -> bool {
        self.state == HealthState::Up
    }
}

/// A standby's positions, read just before choosing whom to promote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) name: Arc<str>,
    pub(crate) received: Option<Position>,
    pub(crate) replayed: Option<Position>,
}

/// Picks the standby to promote: the one that received the most WAL (it replays all of it before
/// its promotion completes, so it loses the least), then the one that replayed the most, then the
/// first by name. Returns it and why.
pub(crate) fn choose_new_primary(candidates: &[Candidate]) -> Option<(Arc<str>, String)> {
    let best = candidates
        .iter()
        .filter(|c| c.received.is_some() || c.replayed.is_some())
        .max_by(|a, b| {
            let key = |c: &Candidate| (c.received.or(c.replayed), c.replayed);
            key(a).cmp(&key(b)).then_with(|| b.name.cmp(&a.name))
        })?;
    let show = |p: Option<Position>| p.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let others: Vec<String> = candidates
        .iter()
        .filter(|c| c.name != best.name)
        .map(|c| format!("`{}` received {}", c.name, show(c.received)))
        .collect();
    let reason = format!(
        "the most advanced standby: received {}, replayed {}{}",
        show(best.received),
        show(best.replayed),
        if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join(", "))
        }
    );
    Some((Arc::clone(&best.name), reason))
}

/// What the health actor must do after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Writes go to `endpoint` from now on.
    Accept { endpoint: Arc<str>, reason: String },
    /// Writes go nowhere until a primary is accepted.
    Withdraw { endpoint: Arc<str>, reason: String },
    /// Read the positions of these standbys and promote the most advanced one.
    Promote { candidates: Vec<Arc<str>> },
    /// No traffic at all to `endpoint`.
    Fence { endpoint: Arc<str>, reason: String },
    /// `endpoint` may get traffic again.
    Unfence { endpoint: Arc<str>, reason: String },
    /// Something an operator should know.
    Warn(String),
}

/// The course of one failover, for its report.
#[derive(Debug, Clone)]
pub(crate) struct Failing {
    pub(crate) old: Arc<str>,
    pub(crate) first_failure: Instant,
    pub(crate) declared: Instant,
    pub(crate) old_position: Option<Position>,
    pub(crate) promotion: Option<(Arc<str>, String, Instant)>,
    warned: bool,
}

/// The accepted primary of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub(crate) name: Arc<str>,
    pub(crate) system_id: Option<u64>,
    pub(crate) timeline: Option<u32>,
}

/// A finished failover, for its report.
#[derive(Debug, Clone)]
pub(crate) struct Completed {
    pub(crate) failing: Failing,
    pub(crate) new: Arc<str>,
    pub(crate) reason: String,
    pub(crate) new_position: Option<Position>,
}

/// The failover state of one cluster.
#[derive(Debug, Clone)]
pub(crate) struct ClusterFailover {
    mode: FailoverMode,
    failback: FailbackMode,
    configured_primary: Arc<str>,
    accepted: Option<Accepted>,
    /// The newest timeline seen per system identifier.
    newest_timeline: Vec<(u64, u32)>,
    fenced: BTreeSet<Arc<str>>,
    failing: Option<Failing>,
    /// A failover finished at the last step, waiting to be reported.
    completed: Option<Completed>,
}

impl ClusterFailover {
    pub(crate) fn new(
        mode: FailoverMode,
        failback: FailbackMode,
        configured_primary: Arc<str>,
    ) -> Self {
        ClusterFailover {
            mode,
            failback,
            configured_primary,
            accepted: None,
            newest_timeline: Vec::new(),
            fenced: BTreeSet::new(),
            failing: None,
            completed: None,
        }
    }

    pub(crate) fn accepted(&self) -> Option<&Accepted> {
        self.accepted.as_ref()
    }

    /// The primary being failed over from, if a failover is under way.
    pub(crate) fn failing_primary(&self) -> Option<Arc<str>> {
        self.failing.as_ref().map(|f| Arc::clone(&f.old))
    }

    pub(crate) fn is_fenced(&self, name: &str) -> bool {
        self.fenced.iter().any(|f| &**f == name)
    }

    /// The failover that finished at the last step, once.
    pub(crate) fn take_completed(&mut self) -> Option<Completed> {
        self.completed.take()
    }

    fn newest_timeline(&self, system_id: Option<u64>) -> Option<u32> {
        let system_id = system_id?;
        self.newest_timeline
            .iter()
            .find(|(id, _)| *id == system_id)
            .map(|(_, timeline)| *timeline)
    }

    fn learn_timelines(&mut self, observed: &[Observed]) {
        for o in observed {
            if let (Some(id), Some(timeline)) = (o.system_id, o.timeline) {
                match self.newest_timeline.iter_mut().find(|(i, _)| *i == id) {
                    Some((_, newest)) => *newest = (*newest).max(timeline),
                    None => self.newest_timeline.push((id, timeline)),
                }
            }
        }
    }

    /// Whether `o` may be accepted as a primary: up, out of recovery, and not on a timeline older
    /// than the newest seen for its system.
    fn acceptable(&self, o: &Observed) -> bool {
        o.up()
            && o.writable == Some(true)
            && match (o.timeline, self.newest_timeline(o.system_id)) {
                (Some(timeline), Some(newest)) => timeline >= newest,
                _ => true,
            }
    }

    fn accept(&mut self, o: &Observed, reason: String, actions: &mut Vec<Action>) {
        self.fenced.remove(&o.name);
        self.accepted = Some(Accepted {
            name: Arc::clone(&o.name),
            system_id: o.system_id,
            timeline: o.timeline,
        });
        if let Some(failing) = self.failing.take() {
            self.completed = Some(Completed {
                failing,
                new: Arc::clone(&o.name),
                reason: reason.clone(),
                new_position: o.position,
            });
        }
        actions.push(Action::Accept {
            endpoint: Arc::clone(&o.name),
            reason,
        });
    }

    /// Decides from the latest observations at `now`. `last_acked` is the furthest position a
    /// write was acknowledged at, for the loss window of a failover report.
    pub(crate) fn step(
        &mut self,
        observed: &[Observed],
        last_acked: Option<Position>,
        now: Instant,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        self.learn_timelines(observed);
        let find = |name: &str| observed.iter().find(|o| &*o.name == name);

        // 1. Is the accepted primary still one?
        if let Some(accepted) = self.accepted.clone() {
            let current = find(&accepted.name);
            let lost = current.is_none_or(|o| {
                o.state == HealthState::Down || (o.up() && o.writable == Some(false))
            });
            let stale = current.is_some_and(|o| {
                o.timeline
                    .zip(self.newest_timeline(o.system_id))
                    .is_some_and(|(timeline, newest)| timeline < newest)
            });
            if lost || stale {
                let why = match current {
                    Some(o) if o.writable == Some(false) => "is back in recovery (a standby now)",
                    _ if stale => "is on an older timeline than another server of its cluster",
                    _ => "is down",
                };
                self.accepted = None;
                let old_position = current.and_then(|o| o.position).max(last_acked);
                self.failing = Some(Failing {
                    old: Arc::clone(&accepted.name),
                    first_failure: current.and_then(|o| o.first_failure).unwrap_or(now),
                    declared: now,
                    old_position,
                    promotion: None,
                    warned: false,
                });
                actions.push(Action::Withdraw {
                    endpoint: Arc::clone(&accepted.name),
                    reason: format!("the primary `{}` {why}", accepted.name),
                });
            }
        }

        // 2. Without an accepted primary, find one by the mode.
        if self.accepted.is_none() {
            self.elect(observed, &mut actions);
        }

        // 3. Fence every other writable endpoint; let fenced ones that became standbys of the
        //    accepted primary back in.
        if let Some(accepted) = self.accepted.clone() {
            for o in observed {
                if o.name == accepted.name || o.writable.is_none() {
                    continue;
                }
                let same_system = o.system_id.is_some() && o.system_id == accepted.system_id;
                let writable = o.writable == Some(true);
                let fenced = self.fenced.contains(&o.name);
                if writable && !fenced && (same_system || o.name == self.configured_primary) {
                    self.fenced.insert(Arc::clone(&o.name));
                    actions.push(Action::Fence {
                        endpoint: Arc::clone(&o.name),
                        reason: format!(
                            "`{}` {}, but `{}` is the accepted primary{}",
                            o.name,
                            if o.up() {
                                "is writable"
                            } else {
                                "was a primary"
                            },
                            accepted.name,
                            match (o.timeline, accepted.timeline) {
                                (Some(t), Some(a)) if same_system => {
                                    format!(" (timeline {t} against {a})")
                                }
                                _ => String::new(),
                            }
                        ),
                    });
                } else if fenced
                    && !writable
                    && same_system
                    && o.timeline.is_some()
                    && o.timeline == accepted.timeline
                {
                    self.fenced.remove(&o.name);
                    actions.push(Action::Unfence {
                        endpoint: Arc::clone(&o.name),
                        reason: format!(
                            "`{}` came back as a standby on the accepted primary's timeline",
                            o.name
                        ),
                    });
                }
            }
            // Failback to the configured primary, when the policy allows it.
            if self.failback == FailbackMode::Automatic && accepted.name != self.configured_primary
            {
                if let Some(original) = find(&self.configured_primary) {
                    if self.acceptable(original) && original.system_id != accepted.system_id {
                        let reason = format!(
                            "failback: the configured primary `{}` is up again (failback = \"automatic\")",
                            original.name
                        );
                        let original = original.clone();
                        self.accept(&original, reason, &mut actions);
                        self.fenced.remove(&original.name);
                    }
                }
            }
        }
        actions
    }

    fn elect(&mut self, observed: &[Observed], actions: &mut Vec<Action>) {
        let failing_old = self.failing.as_ref().map(|f| Arc::clone(&f.old));
        // The first decision, or the old primary back before anything else happened: accept the
        // configured primary (or the failed one) if it is a fine primary.
        let promotion_started = self.failing.as_ref().is_some_and(|f| f.promotion.is_some());
        let home = failing_old
            .clone()
            .unwrap_or_else(|| Arc::clone(&self.configured_primary));
        if !promotion_started && !self.fenced.contains(&home) {
            if let Some(o) = observed.iter().find(|o| o.name == home) {
                if self.acceptable(o) && self.writable_rivals(observed, o).is_empty() {
                    let reason = if failing_old.is_some() {
                        format!(
                            "`{}` is up again before any other primary was accepted",
                            o.name
                        )
                    } else {
                        format!("`{}` is up and out of recovery", o.name)
                    };
                    let o = o.clone();
                    self.accept(&o, reason, actions);
                    return;
                }
            }
        }
        // A primary promoted by someone else (or by us) on the newest timeline.
        let system_id = self.known_system(observed);
        let promoted = observed
            .iter()
            .filter(|o| o.name != home || failing_old.is_none())
            .filter(|o| !self.fenced.contains(&o.name))
            .filter(|o| system_id.is_none() || o.system_id == system_id)
            .filter(|o| o.role != Role::Backup && o.role != Role::Replica)
            .filter(|o| self.acceptable(o))
            .max_by_key(|o| (o.timeline, o.position));
        let follows = matches!(self.mode, FailoverMode::Follow | FailoverMode::Promote);
        if let (true, Some(o)) = (follows, promoted) {
            let reason = match self.failing.as_ref().and_then(|f| f.promotion.as_ref()) {
                Some((name, why, _)) if *name == o.name => format!("promoted `{}`: {why}", o.name),
                _ => format!(
                    "`{}` is out of recovery on timeline {}, the newest",
                    o.name,
                    o.timeline.map_or_else(|| "?".to_owned(), |t| t.to_string())
                ),
            };
            let o = o.clone();
            self.accept(&o, reason, actions);
            return;
        }
        // The old primary answered its last probe as a primary: it is coming back (it was slow,
        // not dead). Promoting a standby or moving writes to the backup now would make a second
        // writable server; wait for it to be accepted again, or to fail again.
        let old_answers = failing_old.as_ref().is_some_and(|old| {
            observed
                .iter()
                .any(|o| o.name == *old && o.first_failure.is_none() && o.writable == Some(true))
        });
        let Some(failing) = self.failing.as_mut() else {
            return;
        };
        match self.mode {
            FailoverMode::Promote | FailoverMode::Backup if old_answers => {}
            FailoverMode::Promote if failing.promotion.is_none() => {
                let candidates: Vec<Arc<str>> = observed
                    .iter()
                    .filter(|o| o.up() && o.writable == Some(false) && o.role == Role::Standby)
                    .filter(|o| system_id.is_none() || o.system_id == system_id)
                    .map(|o| Arc::clone(&o.name))
                    .collect();
                if candidates.is_empty() {
                    if !failing.warned {
                        failing.warned = true;
                        actions.push(Action::Warn(format!(
                            "the primary `{}` is down and no standby is up to promote",
                            failing.old
                        )));
                    }
                } else {
                    actions.push(Action::Promote { candidates });
                }
            }
            FailoverMode::Backup => {
                let backup = observed
                    .iter()
                    .find(|o| o.role == Role::Backup && o.up() && o.writable == Some(true));
                match backup {
                    Some(o) => {
                        let reason = format!(
                            "the primary `{}` is down; writes move to the backup `{}` (failover = \"backup\")",
                            failing.old, o.name
                        );
                        let o = o.clone();
                        self.accept(&o, reason, actions);
                    }
                    None if !failing.warned => {
                        failing.warned = true;
                        actions.push(Action::Warn(format!(
                            "the primary `{}` is down and no backup is up to take its writes",
                            failing.old
                        )));
                    }
                    None => {}
                }
            }
            FailoverMode::Manual if !failing.warned => {
                failing.warned = true;
                actions.push(Action::Warn(format!(
                    "the primary `{}` is down; failover = \"manual\": accept a new primary with \
                     Herd::accept_primary",
                    failing.old
                )));
            }
            FailoverMode::Follow if !failing.warned => {
                failing.warned = true;
                actions.push(Action::Warn(format!(
                    "the primary `{}` is down; failover = \"follow\": waiting for another endpoint \
                     to be promoted",
                    failing.old
                )));
            }
            _ => {}
        }
    }

    /// The system identifier of the cluster: the accepted primary's, the old one's, or the
    /// configured primary's.
    fn known_system(&self, observed: &[Observed]) -> Option<u64> {
        let name = self.failing.as_ref().map_or_else(
            || Arc::clone(&self.configured_primary),
            |f| Arc::clone(&f.old),
        );
        observed
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.system_id)
    }

    /// Other writable endpoints of the same system as `o`, on a newer timeline.
    fn writable_rivals<'a>(&self, observed: &'a [Observed], o: &Observed) -> Vec<&'a Observed> {
        observed
            .iter()
            .filter(|r| r.name != o.name && r.writable == Some(true) && r.up())
            .filter(|r| r.system_id.is_some() && r.system_id == o.system_id)
            .filter(|r| r.timeline > o.timeline)
            .collect()
    }

    /// A promotion of `endpoint` was started, chosen for `reason`.
    pub(crate) fn promotion_started(&mut self, endpoint: Arc<str>, reason: String, at: Instant) {
        if let Some(failing) = self.failing.as_mut() {
            failing.promotion = Some((endpoint, reason, at));
        }
    }

    /// A promotion failed: the next step may choose again.
    pub(crate) fn promotion_failed(&mut self) {
        if let Some(failing) = self.failing.as_mut() {
            failing.promotion = None;
        }
    }

    /// An operator makes `endpoint` the primary: it is accepted (if it is writable) and every
    /// other writable endpoint of the cluster fenced at the next step.
    pub(crate) fn accept_manually(
        &mut self,
        endpoint: &str,
        observed: &[Observed],
    ) -> Result<Vec<Action>, String> {
        let o = observed
            .iter()
            .find(|o| &*o.name == endpoint)
            .ok_or_else(|| format!("`{endpoint}` is not an endpoint of this cluster"))?;
        if o.writable != Some(true) || !o.up() {
            return Err(format!(
                "`{endpoint}` cannot be the primary: it is {}",
                if o.up() { "in recovery" } else { "not up" }
            ));
        }
        let mut actions = Vec::new();
        if let Some(accepted) = self.accepted.take() {
            if accepted.name != o.name {
                actions.push(Action::Withdraw {
                    endpoint: accepted.name,
                    reason: format!("an operator made `{endpoint}` the primary"),
                });
            }
        }
        let o = o.clone();
        self.accept(
            &o,
            format!("an operator made `{endpoint}` the primary"),
            &mut actions,
        );
        Ok(actions)
    }

    /// An operator lets a fenced endpoint have traffic again.
    pub(crate) fn readmit(&mut self, endpoint: &str) -> Option<Action> {
        let name = self.fenced.iter().find(|f| &***f == endpoint).cloned()?;
        self.fenced.remove(&name);
        Some(Action::Unfence {
            endpoint: name,
            reason: format!("an operator re-admitted `{endpoint}`"),
        })
    }
}

impl fmt::Display for FailoverMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSTEM: u64 = 7;
    const OTHER_SYSTEM: u64 = 9;

    fn node(name: &str, role: Role, writable: bool, timeline: u32) -> Observed {
        Observed {
            name: Arc::from(name),
            role,
            state: HealthState::Up,
            first_failure: None,
            writable: Some(writable),
            system_id: Some(if role == Role::Backup {
                OTHER_SYSTEM
            } else {
                SYSTEM
            }),
            timeline: Some(timeline),
            position: Some(Position::new(1000)),
        }
    }

    fn herd() -> Vec<Observed> {
        vec![
            node("primary", Role::Primary, true, 1),
            node("standby_1", Role::Standby, false, 1),
            node("standby_2", Role::Standby, false, 1),
            node("backup", Role::Backup, true, 1),
        ]
    }

    fn cluster(mode: FailoverMode) -> ClusterFailover {
        ClusterFailover::new(mode, FailbackMode::Manual, Arc::from("primary"))
    }

    fn set(nodes: &mut [Observed], name: &str, change: impl FnOnce(&mut Observed)) {
        if let Some(n) = nodes.iter_mut().find(|n| &*n.name == name) {
            change(n);
        }
    }

    fn down(nodes: &mut [Observed], name: &str, first_failure: Instant) {
        set(nodes, name, |n| {
            n.state = HealthState::Down;
            n.first_failure = Some(first_failure);
        });
    }

    fn accepted(c: &ClusterFailover) -> Option<String> {
        c.accepted().map(|a| a.name.to_string())
    }

    fn names(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Accept { endpoint, .. } => format!("accept {endpoint}"),
                Action::Withdraw { endpoint, .. } => format!("withdraw {endpoint}"),
                Action::Promote { candidates } => format!(
                    "promote one of {}",
                    candidates
                        .iter()
                        .map(|c| &**c)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Action::Fence { endpoint, .. } => format!("fence {endpoint}"),
                Action::Unfence { endpoint, .. } => format!("unfence {endpoint}"),
                Action::Warn(_) => "warn".to_owned(),
            })
            .collect()
    }

    #[test]
    fn the_configured_primary_is_accepted_once_probed() {
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        set(&mut nodes, "primary", |n| n.state = HealthState::Unknown);
        assert_eq!(
            names(&c.step(&nodes, None, Instant::now())),
            Vec::<String>::new()
        );
        set(&mut nodes, "primary", |n| n.state = HealthState::Up);
        assert_eq!(
            names(&c.step(&nodes, None, Instant::now())),
            ["accept primary"]
        );
        assert_eq!(c.step(&nodes, None, Instant::now()), vec![], "no repeat");
    }

    #[test]
    fn promote_mode_withdraws_promotes_accepts_and_fences_the_old_primary() {
        let mut c = cluster(FailoverMode::Promote);
        let mut nodes = herd();
        let start = Instant::now();
        c.step(&nodes, None, start);
        down(&mut nodes, "primary", start);
        let actions = c.step(&nodes, Some(Position::new(1200)), start);
        assert_eq!(
            names(&actions),
            ["withdraw primary", "promote one of standby_1,standby_2"]
        );
        assert_eq!(accepted(&c), None, "no write target while failing over");
        c.promotion_started(Arc::from("standby_1"), "the most advanced".into(), start);
        // The promoted standby is out of recovery on a new timeline.
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        let actions = c.step(&nodes, None, start);
        assert_eq!(
            names(&actions),
            ["accept standby_1", "fence primary"],
            "the old primary is fenced as soon as another is accepted, before it comes back"
        );
        let report = c.take_completed().expect("a completed failover");
        assert_eq!(&*report.failing.old, "primary");
        assert_eq!(report.failing.old_position, Some(Position::new(1200)));
        assert!(
            report.reason.contains("promoted `standby_1`"),
            "{}",
            report.reason
        );
        // The old primary comes back writable on the old timeline: still fenced, never accepted.
        set(&mut nodes, "primary", |n| n.state = HealthState::Up);
        assert_eq!(names(&c.step(&nodes, None, start)), Vec::<String>::new());
        assert_eq!(accepted(&c).as_deref(), Some("standby_1"));
        assert!(c.is_fenced("primary"));
    }

    #[test]
    fn no_promotion_or_move_while_the_old_primary_answers_again() {
        for mode in [FailoverMode::Promote, FailoverMode::Backup] {
            let mut c = cluster(mode);
            let mut nodes = herd();
            let now = Instant::now();
            c.step(&nodes, None, now);
            // Every endpoint timed out at once (a stall), and the standbys recovered first.
            set(&mut nodes, "backup", |n| n.state = HealthState::Down);
            for name in ["standby_1", "standby_2"] {
                set(&mut nodes, name, |n| n.state = HealthState::Down);
            }
            down(&mut nodes, "primary", now);
            assert_eq!(
                names(&c.step(&nodes, None, now)),
                ["withdraw primary", "warn"],
                "{mode:?}: nothing to fail over to yet"
            );
            // The primary answers again (recovering), then the others are up.
            set(&mut nodes, "primary", |n| {
                n.state = HealthState::Recovering;
                n.first_failure = None;
            });
            for name in ["standby_1", "standby_2", "backup"] {
                set(&mut nodes, name, |n| n.state = HealthState::Up);
            }
            assert_eq!(
                names(&c.step(&nodes, None, now)),
                Vec::<String>::new(),
                "{mode:?}: the primary answers: no second writable server"
            );
            // It comes back up: accepted again.
            set(&mut nodes, "primary", |n| n.state = HealthState::Up);
            assert_eq!(names(&c.step(&nodes, None, now)), ["accept primary"]);
        }
        // But a primary that fails again after answering once is failed over.
        let mut c = cluster(FailoverMode::Promote);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        c.step(&nodes, None, now);
        c.promotion_failed();
        set(&mut nodes, "primary", |n| {
            n.state = HealthState::Recovering;
            n.first_failure = None;
        });
        assert_eq!(names(&c.step(&nodes, None, now)), Vec::<String>::new());
        down(&mut nodes, "primary", now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["promote one of standby_1,standby_2"]
        );
    }

    #[test]
    fn the_old_primary_on_an_older_timeline_is_never_accepted_again() {
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        // Someone promoted standby_1 while the primary still runs: two writable servers.
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        let actions = names(&c.step(&nodes, None, now));
        assert_eq!(
            actions,
            ["withdraw primary", "accept standby_1", "fence primary"],
            "the newer timeline wins, and the old primary is fenced in the same step"
        );
    }

    #[test]
    fn follow_mode_waits_for_an_external_promotion() {
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["withdraw primary", "warn"]
        );
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            Vec::<String>::new(),
            "warned once"
        );
        set(&mut nodes, "standby_2", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["accept standby_2", "fence primary"]
        );
    }

    #[test]
    fn a_primary_back_before_anything_else_happened_is_accepted_again() {
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        c.step(&nodes, None, now);
        set(&mut nodes, "primary", |n| n.state = HealthState::Up);
        assert_eq!(names(&c.step(&nodes, None, now)), ["accept primary"]);
    }

    #[test]
    fn backup_mode_moves_writes_to_the_backup_and_fences_the_returning_primary() {
        let mut c = cluster(FailoverMode::Backup);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["withdraw primary", "accept backup", "fence primary"]
        );
        set(&mut nodes, "primary", |n| n.state = HealthState::Up);
        assert_eq!(names(&c.step(&nodes, None, now)), Vec::<String>::new());
        assert!(c.is_fenced("primary"));
        // Failback is manual: an operator makes the primary the primary again.
        let actions = c
            .accept_manually("primary", &nodes)
            .expect("writable and up");
        assert_eq!(names(&actions), ["withdraw backup", "accept primary"]);
        assert!(!c.is_fenced("primary"));
    }

    #[test]
    fn backup_mode_with_automatic_failback() {
        let mut c = ClusterFailover::new(
            FailoverMode::Backup,
            FailbackMode::Automatic,
            Arc::from("primary"),
        );
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        c.step(&nodes, None, now);
        assert_eq!(accepted(&c).as_deref(), Some("backup"));
        set(&mut nodes, "primary", |n| n.state = HealthState::Up);
        let actions = names(&c.step(&nodes, None, now));
        assert!(
            actions.contains(&"accept primary".to_owned()),
            "{actions:?}"
        );
        assert_eq!(accepted(&c).as_deref(), Some("primary"));
        assert!(!c.is_fenced("primary"));
    }

    #[test]
    fn manual_mode_only_warns_and_refuses_a_standby() {
        let mut c = cluster(FailoverMode::Manual);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["withdraw primary", "warn"]
        );
        assert!(
            c.accept_manually("standby_1", &nodes).is_err(),
            "in recovery"
        );
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        // In manual mode an external promotion is not followed by itself...
        assert_eq!(names(&c.step(&nodes, None, now)), Vec::<String>::new());
        // ...but an operator can accept it.
        let actions = c.accept_manually("standby_1", &nodes).expect("writable");
        assert_eq!(names(&actions), ["accept standby_1"]);
    }

    #[test]
    fn a_fenced_server_that_comes_back_as_a_standby_is_let_in_and_readmit_works() {
        let mut c = cluster(FailoverMode::Promote);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        c.step(&nodes, None, now);
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        assert!(names(&c.step(&nodes, None, now)).contains(&"fence primary".to_owned()));
        set(&mut nodes, "primary", |n| n.state = HealthState::Up);
        assert!(c.is_fenced("primary"));
        // Rewound and restarted as a standby of the new primary.
        set(&mut nodes, "primary", |n| {
            n.writable = Some(false);
            n.timeline = Some(2);
        });
        assert_eq!(names(&c.step(&nodes, None, now)), ["unfence primary"]);
        // An operator may also re-admit a fenced server.
        set(&mut nodes, "standby_2", |n| {
            n.writable = Some(true);
            n.timeline = Some(1);
        });
        assert_eq!(names(&c.step(&nodes, None, now)), ["fence standby_2"]);
        assert!(c.readmit("standby_2").is_some());
        assert!(c.readmit("standby_2").is_none(), "not fenced any more");
    }

    #[test]
    fn there_is_never_more_than_one_write_target() {
        // Whatever the sequence of observations, at most one endpoint is accepted, and every
        // other writable endpoint of the same system is fenced once one is.
        let now = Instant::now();
        for mode in FailoverMode::ALL {
            let mut c = cluster(mode);
            let mut nodes = herd();
            type Change<'a> = Box<dyn Fn(&mut Vec<Observed>) + 'a>;
            let script: Vec<Change<'_>> = vec![
                Box::new(|n| down(n, "primary", now)),
                Box::new(|n| {
                    set(n, "standby_1", |o| {
                        o.writable = Some(true);
                        o.timeline = Some(2)
                    })
                }),
                Box::new(|n| set(n, "primary", |o| o.state = HealthState::Up)),
                Box::new(|n| {
                    set(n, "standby_2", |o| {
                        o.writable = Some(true);
                        o.timeline = Some(3)
                    })
                }),
                Box::new(|n| down(n, "standby_2", now)),
            ];
            for change in script {
                change(&mut nodes);
                c.step(&nodes, None, now);
                if let Some(accepted) = c.accepted() {
                    for o in &nodes {
                        let rival = o.name != accepted.name
                            && o.writable == Some(true)
                            && o.system_id == accepted.system_id
                            && o.state != HealthState::Down;
                        assert!(
                            !rival || c.is_fenced(&o.name),
                            "{mode}: `{}` is a second write target",
                            o.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_most_advanced_standby_is_chosen() {
        let candidate = |name: &str, received: u64, replayed: u64| Candidate {
            name: Arc::from(name),
            received: Some(Position::new(received)),
            replayed: Some(Position::new(replayed)),
        };
        let (chosen, reason) = choose_new_primary(&[
            candidate("standby_1", 900, 900),
            candidate("standby_2", 1000, 800),
        ])
        .expect("a choice");
        assert_eq!(
            &*chosen, "standby_2",
            "it received more, and replays it before promoting"
        );
        assert!(reason.contains("`standby_1` received 0/384"), "{reason}");
        let (chosen, _) = choose_new_primary(&[
            candidate("standby_1", 1000, 1000),
            candidate("standby_2", 1000, 800),
        ])
        .expect("a choice");
        assert_eq!(&*chosen, "standby_1", "then the one that replayed more");
        assert_eq!(choose_new_primary(&[]), None);
    }
}
