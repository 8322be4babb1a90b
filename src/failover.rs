//! Failover and fencing decisions, as plain functions of what the probes observed.
//!
//! One [`ClusterFailover`] per cluster keeps the *accepted* primary: the one endpoint writes go
//! to. Its rules:
//! - The first primary is accepted once every endpoint of the cluster has been probed, so that a
//!   stale primary answering first cannot be taken while a newer one exists.
//! - A primary is accepted only when it is out of recovery and, for the servers of one cluster
//!   (one system identifier), on a timeline not older than any seen: a stale primary that comes
//!   back on an old timeline is never accepted again by itself.
//! - While a primary is accepted, every other writable server of the physical cluster (roles
//!   `primary` and `standby`) is fenced (no traffic at all) until an operator re-admits it, or it
//!   comes back as a standby of the accepted primary. There are never two write targets.
//! - When the accepted primary is lost, no endpoint takes writes until a new one is accepted, by
//!   the mode: `follow` waits for an external manager's promotion, `promote` asks for the most
//!   advanced standby of the current timeline to be promoted, `backup` moves writes to the backup
//!   endpoint, `manual` waits for an operator. `promote` and `backup` wait while the old primary
//!   still answers as a primary.
//! - Once `pg_promote` may have reached a standby, that failover is committed to it: no other
//!   standby is promoted and the old primary is not taken back, whatever the answer said (a
//!   promotion that timed out goes on in the server). Only that standby can be accepted, or an
//!   operator decides.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{backoff::Backoff, health::HealthState, position::Position, settings::Role};

pub use crate::settings::{FailbackMode, FailoverMode};

/// After a promotion that could not start, the wait before the next attempt (doubling).
const PROMOTE_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two promotion attempts.
const PROMOTE_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the probes last observed of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) name: Arc<str>,
    pub(crate) role: Role,
    pub(crate) state: HealthState,
    /// When the current run of failed probes began (`None` when the last probe succeeded).
    pub(crate) first_failure: Option<Instant>,
    /// Out of recovery, as last seen (`None` before the first successful probe).
    pub(crate) writable: Option<bool>,
    pub(crate) system_id: Option<u64>,
    pub(crate) timeline: Option<u32>,
    /// Current on a primary, replayed on a standby.
    pub(crate) position: Option<Position>,
    /// Received, on a standby.
    pub(crate) received: Option<Position>,
}

impl Observed {
    /// Declared up: not unknown, suspect, down or recovering.
    fn up(&self) -> bool {
        self.state == HealthState::Up
    }

    /// A member of the physical cluster: the configured primary or a streaming standby.
    fn physical(&self) -> bool {
        matches!(self.role, Role::Primary | Role::Standby)
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
    /// Read the positions of these standbys, check once more that `old` does not answer as a
    /// primary, and promote the most advanced standby.
    Promote {
        old: Arc<str>,
        candidates: Vec<Arc<str>>,
    },
    /// Send `pg_promote` again to the standby this failover is committed to: it is still in
    /// recovery (an earlier request timed out, or its answer was lost).
    PromoteAgain { endpoint: Arc<str> },
    /// No traffic at all to `endpoint`.
    Fence { endpoint: Arc<str>, reason: String },
    /// `endpoint` may get traffic again.
    Unfence { endpoint: Arc<str>, reason: String },
    /// Something an operator should know.
    Warn(String),
}

/// A promotion under way.
#[derive(Debug, Clone)]
pub(crate) struct Promotion {
    /// The standby chosen (`None` while the positions are read).
    pub(crate) endpoint: Option<Arc<str>>,
    /// Why it was chosen.
    pub(crate) reason: String,
    /// When `pg_promote` was last sent (or may have been): from then on the failover is
    /// committed to `endpoint`.
    pub(crate) requested: Option<Instant>,
    /// How many `pg_promote` requests may have reached `endpoint`.
    requests: u32,
    /// Work in flight in the health actor: choosing, or a `pg_promote` running.
    pub(crate) in_flight: bool,
}

/// How a promotion attempt ended, as the health actor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PromoteOutcome {
    /// `pg_promote` returned true: the standby is out of recovery.
    Promoted,
    /// Nothing reached the standby: no standby could be read, the old primary answered, or the
    /// connection could not be opened.
    NotSent(String),
    /// The standby refused the request with an error: nothing was started by this request.
    Refused(String),
    /// The request went out but its outcome is not known (it timed out, returned false, or the
    /// connection was lost): the promotion may complete.
    Unknown(String),
}

/// The course of one failover, for its report.
#[derive(Debug, Clone)]
pub(crate) struct Failing {
    pub(crate) old: Arc<str>,
    /// The old primary's system identifier: the cluster's lineage while no primary is accepted.
    pub(crate) system_id: Option<u64>,
    pub(crate) first_failure: Instant,
    pub(crate) declared: Instant,
    pub(crate) old_position: Option<Position>,
    pub(crate) promotion: Option<Promotion>,
    /// How far each standby had received while in recovery during this failover: where a
    /// standby promoted now starts from, for the loss window.
    starts: BTreeMap<Arc<str>, Position>,
    warned: bool,
    warned_stuck: bool,
}

impl Failing {
    /// When pgherd asked for the promotion of the primary it ended on, if it did.
    pub(crate) fn promoted_at(&self) -> Option<Instant> {
        self.promotion.as_ref().and_then(|p| p.requested)
    }
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
    /// Where the new primary's history starts: what it had received while still a standby, or
    /// its position when accepted if it was never seen in recovery during the failover.
    pub(crate) new_position: Option<Position>,
    /// Whether the new primary is of the old one's system (positions compare only then).
    pub(crate) same_system: bool,
}

/// Which servers may serve a cluster's reads: those of this system on this timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lineage {
    pub(crate) system_id: Option<u64>,
    pub(crate) timeline: Option<u32>,
}

/// The failover state of one cluster.
#[derive(Debug, Clone)]
pub(crate) struct ClusterFailover {
    mode: FailoverMode,
    failback: FailbackMode,
    /// How long `pg_promote` may take (`failover.promote_timeout`): a standby still in recovery
    /// that long after a request gets it again.
    promote_timeout: Duration,
    configured_primary: Arc<str>,
    accepted: Option<Accepted>,
    /// The newest timeline seen per system identifier.
    newest_timeline: Vec<(u64, u32)>,
    fenced: BTreeSet<Arc<str>>,
    /// Writable endpoints an operator re-admitted: not fenced again while they stay writable.
    admitted: BTreeSet<Arc<str>>,
    failing: Option<Failing>,
    /// A failover finished at the last step, waiting to be reported.
    completed: Option<Completed>,
    /// After a promotion attempt that could not start, none before this.
    retry_not_before: Option<Instant>,
    retry: Backoff,
}

impl ClusterFailover {
    pub(crate) fn new(
        mode: FailoverMode,
        failback: FailbackMode,
        promote_timeout: Duration,
        configured_primary: Arc<str>,
    ) -> Self {
        ClusterFailover {
            mode,
            failback,
            promote_timeout,
            configured_primary,
            accepted: None,
            newest_timeline: Vec::new(),
            fenced: BTreeSet::new(),
            admitted: BTreeSet::new(),
            failing: None,
            completed: None,
            retry_not_before: None,
            retry: Backoff::new(PROMOTE_RETRY_FIRST, PROMOTE_RETRY_MAX),
        }
    }

    pub(crate) fn accepted(&self) -> Option<&Accepted> {
        self.accepted.as_ref()
    }

    pub(crate) fn is_fenced(&self, name: &str) -> bool {
        self.fenced.iter().any(|f| &**f == name)
    }

    /// The failover that finished at the last step, once.
    pub(crate) fn take_completed(&mut self) -> Option<Completed> {
        self.completed.take()
    }

    /// The servers whose standbys may serve reads: the accepted primary's system on the newest
    /// timeline; while failing over, the old primary's. `None` before anything is known.
    pub(crate) fn lineage(&self) -> Option<Lineage> {
        let system_id = match (&self.accepted, &self.failing) {
            (Some(accepted), _) => accepted.system_id,
            (None, Some(failing)) => failing.system_id,
            (None, None) => return None,
        };
        Some(Lineage {
            system_id,
            timeline: self.newest_timeline(system_id),
        })
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

    /// Whether `o` is on a timeline older than the newest seen for its system.
    fn stale(&self, o: &Observed) -> bool {
        o.timeline
            .zip(self.newest_timeline(o.system_id))
            .is_some_and(|(timeline, newest)| timeline < newest)
    }

    /// Whether `o` may be accepted as a primary: up, out of recovery, and not on a timeline older
    /// than the newest seen for its system.
    fn acceptable(&self, o: &Observed) -> bool {
        o.up() && o.writable == Some(true) && !self.stale(o)
    }

    fn accept(&mut self, o: &Observed, reason: String, actions: &mut Vec<Action>) {
        self.fenced.remove(&o.name);
        self.admitted.remove(&o.name);
        self.accepted = Some(Accepted {
            name: Arc::clone(&o.name),
            system_id: o.system_id,
            timeline: o.timeline,
        });
        self.retry.reset();
        self.retry_not_before = None;
        if let Some(failing) = self.failing.take() {
            let new_position = failing.starts.get(&o.name).copied().or(o.position);
            let same_system = failing.system_id.is_some() && failing.system_id == o.system_id;
            self.completed = Some(Completed {
                failing,
                new: Arc::clone(&o.name),
                reason: reason.clone(),
                new_position,
                same_system,
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
            let stale = current.is_some_and(|o| self.stale(o));
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
                    system_id: accepted.system_id,
                    first_failure: current.and_then(|o| o.first_failure).unwrap_or(now),
                    declared: now,
                    old_position,
                    promotion: None,
                    starts: BTreeMap::new(),
                    warned: false,
                    warned_stuck: false,
                });
                actions.push(Action::Withdraw {
                    endpoint: Arc::clone(&accepted.name),
                    reason: format!("the primary `{}` {why}", accepted.name),
                });
            }
        }

        // 2. Without an accepted primary, find one by the mode.
        if self.accepted.is_none() {
            if let Some(failing) = self.failing.as_mut() {
                for o in observed {
                    if o.writable == Some(false) {
                        if let Some(at) = o.received.max(o.position) {
                            let start = failing.starts.entry(Arc::clone(&o.name)).or_insert(at);
                            *start = (*start).max(at);
                        }
                    }
                }
            }
            self.elect(observed, now, &mut actions);
        }

        // 3. Fence every other writable server of the physical cluster; let fenced ones that
        //    became standbys of the accepted primary back in.
        if let Some(accepted) = self.accepted.clone() {
            for o in observed {
                if o.name == accepted.name || o.writable.is_none() {
                    continue;
                }
                let same_system = o.system_id.is_some() && o.system_id == accepted.system_id;
                let writable = o.writable == Some(true);
                let fenced = self.fenced.contains(&o.name);
                if !writable {
                    self.admitted.remove(&o.name);
                }
                if writable && !fenced && o.physical() && !self.admitted.contains(&o.name) {
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
                    }
                }
            }
        }
        actions
    }

    fn elect(&mut self, observed: &[Observed], now: Instant, actions: &mut Vec<Action>) {
        let Some(failing) = self.failing.as_ref() else {
            // The first decision waits for every endpoint's first probe (by this actor: one
            // restarted before the first decision starts from nothing): a stale primary that
            // answers first must not be taken while a newer one exists.
            if observed
                .iter()
                .all(|o| o.writable.is_some() || o.first_failure.is_some())
            {
                self.first_election(observed, actions);
            }
            return;
        };
        let old = Arc::clone(&failing.old);
        let promotion = failing.promotion.clone();
        let committed_to = promotion
            .as_ref()
            .filter(|p| p.requested.is_some())
            .and_then(|p| p.endpoint.clone());
        let system_id = failing.system_id;

        // A failover committed to a promotion ends with that standby, or an operator.
        if let Some(chosen) = committed_to {
            let Some(o) = observed.iter().find(|o| o.name == chosen) else {
                return;
            };
            if self.acceptable(o) {
                let why = promotion.map_or_else(String::new, |p| p.reason);
                let o = o.clone();
                self.accept(&o, format!("promoted `{chosen}`: {why}"), actions);
                return;
            }
            let in_flight = promotion_in_flight(self.failing.as_ref());
            let Some(failing) = self.failing.as_mut() else {
                return;
            };
            let requested = failing
                .promotion
                .as_ref()
                .and_then(|p| p.requested)
                .unwrap_or(now);
            if o.up() && o.writable == Some(false) {
                // Still in recovery: ask again once the last request had all its time.
                if !in_flight && now.duration_since(requested) >= self.promote_timeout {
                    actions.push(Action::PromoteAgain { endpoint: chosen });
                }
            } else if !o.up() && !failing.warned_stuck {
                failing.warned_stuck = true;
                actions.push(Action::Warn(format!(
                    "`pg_promote` was sent to `{chosen}`, which no longer answers: no other \
                     standby is promoted and the old primary `{old}` is not taken back while \
                     `{chosen}` may still finish its promotion; decide with Herd::accept_primary"
                )));
            }
            return;
        }

        // The old primary back before anything else happened: accept it again.
        if promotion.is_none() && !self.fenced.contains(&old) {
            if let Some(o) = observed.iter().find(|o| o.name == old) {
                if self.acceptable(o) && self.writable_rivals(observed, o).is_empty() {
                    let reason = format!(
                        "`{}` is up again before any other primary was accepted",
                        o.name
                    );
                    let o = o.clone();
                    self.accept(&o, reason, actions);
                    return;
                }
            }
        }
        // While a promotion is being chosen, nothing else is decided.
        if promotion.is_some() {
            return;
        }
        // A primary promoted by someone else, on the newest timeline.
        let follows = matches!(self.mode, FailoverMode::Follow | FailoverMode::Promote);
        if follows {
            if let Some(o) = self.promoted_elsewhere(observed, Some(&old), system_id) {
                let reason = format!(
                    "`{}` is out of recovery on timeline {}, the newest",
                    o.name,
                    o.timeline.map_or_else(|| "?".to_owned(), |t| t.to_string())
                );
                let o = o.clone();
                self.accept(&o, reason, actions);
                return;
            }
        }
        // The old primary answered its last probe as a primary (and is not stale): it is coming
        // back (it was slow, not dead). Promoting a standby or moving writes to the backup now
        // would make a second writable server; wait for it to be accepted again, or to fail.
        let old_answers = observed.iter().any(|o| {
            o.name == old && o.first_failure.is_none() && o.writable == Some(true) && !self.stale(o)
        });
        let newest = self.newest_timeline(system_id);
        let retry_blocked = self.retry_not_before.is_some_and(|t| now < t);
        let Some(failing) = self.failing.as_mut() else {
            return;
        };
        match self.mode {
            FailoverMode::Promote | FailoverMode::Backup if old_answers => {}
            FailoverMode::Promote if retry_blocked => {}
            FailoverMode::Promote => {
                // Standbys of the current timeline only: one left behind by an earlier failover
                // lacks everything written since.
                let candidates: Vec<Arc<str>> = observed
                    .iter()
                    .filter(|o| o.up() && o.writable == Some(false) && o.role == Role::Standby)
                    .filter(|o| system_id.is_none() || o.system_id == system_id)
                    .filter(|o| newest.is_none() || o.timeline.is_none() || o.timeline == newest)
                    .filter(|o| !self.fenced.contains(&o.name))
                    .map(|o| Arc::clone(&o.name))
                    .collect();
                if candidates.is_empty() {
                    if !failing.warned {
                        failing.warned = true;
                        actions.push(Action::Warn(format!(
                            "the primary `{}` is down and no standby of its timeline is up to \
                             promote",
                            failing.old
                        )));
                    }
                } else {
                    failing.promotion = Some(Promotion {
                        endpoint: None,
                        reason: "choosing".to_owned(),
                        requested: None,
                        requests: 0,
                        in_flight: true,
                    });
                    actions.push(Action::Promote { old, candidates });
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

    /// The very first decision: the configured primary if it is a fine primary and no server
    /// of its system is writable on a newer timeline; else (in `follow` and `promote` modes) the
    /// writable server on the newest timeline.
    fn first_election(&mut self, observed: &[Observed], actions: &mut Vec<Action>) {
        if let Some(o) = observed.iter().find(|o| o.name == self.configured_primary) {
            if !self.fenced.contains(&o.name)
                && self.acceptable(o)
                && self.writable_rivals(observed, o).is_empty()
            {
                let o = o.clone();
                self.accept(
                    &o,
                    format!("`{}` is up and out of recovery", o.name),
                    actions,
                );
                return;
            }
        }
        if matches!(self.mode, FailoverMode::Follow | FailoverMode::Promote) {
            let system_id = self.known_system(observed);
            if let Some(o) = self.promoted_elsewhere(observed, None, system_id) {
                let reason = format!(
                    "`{}` is out of recovery on timeline {}, the newest (the configured primary is \
                     not)",
                    o.name,
                    o.timeline.map_or_else(|| "?".to_owned(), |t| t.to_string())
                );
                let o = o.clone();
                self.accept(&o, reason, actions);
            }
        }
    }

    /// A writable physical server of `system_id` on the newest timeline, other than `old`.
    fn promoted_elsewhere<'a>(
        &self,
        observed: &'a [Observed],
        old: Option<&Arc<str>>,
        system_id: Option<u64>,
    ) -> Option<&'a Observed> {
        observed
            .iter()
            .filter(|o| old != Some(&o.name))
            .filter(|o| !self.fenced.contains(&o.name))
            .filter(|o| system_id.is_none() || o.system_id == system_id)
            .filter(|o| o.physical())
            .filter(|o| self.acceptable(o))
            .max_by_key(|o| (o.timeline, o.position))
    }

    /// The system identifier of the configured primary, as probed.
    fn known_system(&self, observed: &[Observed]) -> Option<u64> {
        observed
            .iter()
            .find(|o| o.name == self.configured_primary)
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

    /// The standby chosen for the promotion being chosen, with the positions read from it.
    /// Returns whether that promotion is still wanted: not when the failover ended meanwhile
    /// (an operator accepted a primary) or the choice was dropped; then nothing is sent.
    pub(crate) fn promotion_chosen(
        &mut self,
        endpoint: &Arc<str>,
        reason: String,
        received: Option<Position>,
    ) -> bool {
        let Some(failing) = self.failing.as_mut() else {
            return false;
        };
        let Some(promotion) = failing
            .promotion
            .as_mut()
            .filter(|p| p.in_flight && p.requests == 0)
        else {
            return false;
        };
        promotion.endpoint = Some(Arc::clone(endpoint));
        promotion.reason = reason;
        if let Some(at) = received {
            let start = failing.starts.entry(Arc::clone(endpoint)).or_insert(at);
            *start = (*start).max(at);
        }
        true
    }

    /// `pg_promote` is about to be sent to `endpoint`: from now on, the failover is committed to
    /// it (a request that times out still promotes).
    pub(crate) fn promotion_requested(&mut self, endpoint: &Arc<str>, now: Instant) {
        if let Some(failing) = self.failing.as_mut() {
            let promotion = failing.promotion.get_or_insert_with(|| Promotion {
                endpoint: None,
                reason: "asked again".to_owned(),
                requested: None,
                requests: 0,
                in_flight: true,
            });
            promotion.endpoint = Some(Arc::clone(endpoint));
            promotion.requested = Some(now);
            promotion.requests += 1;
            promotion.in_flight = true;
        }
    }

    /// The promotion attempt ended. Returns the wait before the next attempt when it could not
    /// start (the next step may choose again after it).
    pub(crate) fn promotion_ended(
        &mut self,
        outcome: &PromoteOutcome,
        now: Instant,
    ) -> Option<Duration> {
        let failing = self.failing.as_mut()?;
        let promotion = failing.promotion.as_mut()?;
        promotion.in_flight = false;
        match outcome {
            PromoteOutcome::Promoted | PromoteOutcome::Unknown(_) => None,
            // Nothing started by this attempt, but an earlier request may still promote: stay
            // committed, and ask again only after the full wait.
            PromoteOutcome::NotSent(_) | PromoteOutcome::Refused(_) if promotion.requests > 1 => {
                promotion.requests -= 1;
                promotion.requested = Some(now);
                None
            }
            PromoteOutcome::NotSent(_) | PromoteOutcome::Refused(_) => {
                failing.promotion = None;
                let wait = self.retry.fail();
                self.retry_not_before = Some(now + wait);
                Some(wait)
            }
        }
    }

    /// A new health actor took over: whatever the previous one had in flight is gone. A
    /// promotion still being chosen is forgotten; one whose `pg_promote` may have been sent
    /// stays committed.
    pub(crate) fn restarted(&mut self, now: Instant) {
        if let Some(failing) = self.failing.as_mut() {
            if let Some(promotion) = failing.promotion.as_mut() {
                if promotion.in_flight {
                    promotion.in_flight = false;
                    if promotion.requested.is_none() {
                        failing.promotion = None;
                    } else {
                        promotion.requested = Some(now);
                    }
                }
            }
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
        if self.stale(o) {
            return Err(format!(
                "`{endpoint}` cannot be the primary: it is on timeline {}, older than timeline {} \
                 seen on another server of its cluster, so it lacks what was written there \
                 (rebuild it as a standby of the newer primary, or accept that one)",
                o.timeline.map_or_else(|| "?".to_owned(), |t| t.to_string()),
                self.newest_timeline(o.system_id)
                    .map_or_else(|| "?".to_owned(), |t| t.to_string())
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

    /// An operator lets a fenced endpoint have traffic again. A writable one gets only the
    /// messages that name it (e.g. to reconcile its data); it is not fenced again while it stays
    /// writable, and never takes routed writes unless it is accepted.
    pub(crate) fn readmit(&mut self, endpoint: &str) -> Option<Action> {
        let name = self.fenced.iter().find(|f| &***f == endpoint).cloned()?;
        self.fenced.remove(&name);
        self.admitted.insert(Arc::clone(&name));
        Some(Action::Unfence {
            endpoint: name,
            reason: format!("an operator re-admitted `{endpoint}`"),
        })
    }
}

fn promotion_in_flight(failing: Option<&Failing>) -> bool {
    failing
        .and_then(|f| f.promotion.as_ref())
        .is_some_and(|p| p.in_flight)
}

impl fmt::Display for FailoverMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMOTE_TIMEOUT: Duration = Duration::from_secs(10);
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
            received: None,
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
        ClusterFailover::new(
            mode,
            FailbackMode::Manual,
            PROMOTE_TIMEOUT,
            Arc::from("primary"),
        )
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

    /// The health actor chose `name`, sent `pg_promote` and got true.
    fn promoted(c: &mut ClusterFailover, name: &str, at: Instant) {
        let name: Arc<str> = Arc::from(name);
        c.promotion_chosen(&name, "the most advanced".into(), Some(Position::new(1100)));
        c.promotion_requested(&name, at);
        assert_eq!(c.promotion_ended(&PromoteOutcome::Promoted, at), None);
    }

    /// A cluster in `mode` whose accepted primary was just declared down (and withdrawn).
    fn primary_lost(mode: FailoverMode) -> (ClusterFailover, Vec<Observed>, Instant) {
        let mut c = cluster(mode);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        c.step(&nodes, None, now);
        (c, nodes, now)
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
                Action::PromoteAgain { endpoint } => format!("promote {endpoint} again"),
                Action::Promote { candidates, .. } => format!(
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
        promoted(&mut c, "standby_1", start);
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
        let (mut c, mut nodes, now) = primary_lost(FailoverMode::Promote);
        let retry = c.promotion_ended(
            &PromoteOutcome::NotSent("the old primary answered".into()),
            now,
        );
        assert_eq!(retry, Some(Duration::from_secs(1)));
        set(&mut nodes, "primary", |n| {
            n.state = HealthState::Recovering;
            n.first_failure = None;
        });
        assert_eq!(names(&c.step(&nodes, None, now)), Vec::<String>::new());
        down(&mut nodes, "primary", now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            Vec::<String>::new(),
            "not before the retry wait"
        );
        assert_eq!(
            names(&c.step(&nodes, None, now + Duration::from_secs(1))),
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
        let (mut c, mut nodes, now) = primary_lost(FailoverMode::Follow);
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
            PROMOTE_TIMEOUT,
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
        let (mut c, mut nodes, now) = primary_lost(FailoverMode::Promote);
        promoted(&mut c, "standby_1", now);
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
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            Vec::<String>::new(),
            "a re-admitted writable server is not fenced again"
        );
        assert_eq!(accepted(&c).as_deref(), Some("standby_1"), "nor accepted");
        // Once it is a standby again, a later return as a writable server is fenced again.
        set(&mut nodes, "standby_2", |n| n.writable = Some(false));
        c.step(&nodes, None, now);
        set(&mut nodes, "standby_2", |n| n.writable = Some(true));
        assert_eq!(names(&c.step(&nodes, None, now)), ["fence standby_2"]);
    }

    #[test]
    fn a_promotion_whose_outcome_is_unknown_commits_the_failover_to_its_standby() {
        let mut c = cluster(FailoverMode::Promote);
        let mut nodes = herd();
        let start = Instant::now();
        c.step(&nodes, None, start);
        down(&mut nodes, "primary", start);
        c.step(&nodes, None, start);
        let chosen: Arc<str> = Arc::from("standby_1");
        c.promotion_chosen(&chosen, "the most advanced".into(), None);
        c.promotion_requested(&chosen, start);
        let lost = PromoteOutcome::Unknown("pg_promote timed out".into());
        assert_eq!(
            c.promotion_ended(&lost, start),
            None,
            "no retry of another choice"
        );
        // The old primary comes back writable before standby_1 is seen promoted: not taken back.
        set(&mut nodes, "primary", |n| {
            n.state = HealthState::Up;
            n.first_failure = None;
        });
        assert_eq!(names(&c.step(&nodes, None, start)), Vec::<String>::new());
        // standby_1 is still in recovery a promote_timeout later: asked again, only it.
        let later = start + PROMOTE_TIMEOUT;
        assert_eq!(
            names(&c.step(&nodes, None, later)),
            ["promote standby_1 again"]
        );
        c.promotion_requested(&chosen, later);
        c.promotion_ended(&lost, later);
        // It stops answering: a warning, once, and still nothing else.
        down(&mut nodes, "standby_1", later);
        assert_eq!(names(&c.step(&nodes, None, later)), ["warn"]);
        assert_eq!(names(&c.step(&nodes, None, later)), Vec::<String>::new());
        // It finishes its promotion after all: accepted, and the old primary fenced.
        set(&mut nodes, "standby_1", |n| {
            n.state = HealthState::Up;
            n.first_failure = None;
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        assert_eq!(
            names(&c.step(&nodes, None, later)),
            ["accept standby_1", "fence primary"]
        );
    }

    #[test]
    fn a_refused_or_unsent_promotion_lets_the_next_attempt_choose_again() {
        let (mut c, nodes, now) = primary_lost(FailoverMode::Promote);
        let chosen: Arc<str> = Arc::from("standby_1");
        c.promotion_chosen(&chosen, "the most advanced".into(), None);
        c.promotion_requested(&chosen, now);
        let refused = PromoteOutcome::Refused("permission denied".into());
        assert_eq!(
            c.promotion_ended(&refused, now),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            names(&c.step(&nodes, None, now + Duration::from_secs(1))),
            ["promote one of standby_1,standby_2"]
        );
    }

    #[test]
    fn a_restarted_health_actor_forgets_a_choice_but_not_a_request() {
        let (mut c, nodes, now) = primary_lost(FailoverMode::Promote);
        // The actor died while reading the standbys' positions: the next one chooses again.
        c.restarted(now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["promote one of standby_1,standby_2"]
        );
        // It died while pg_promote ran: committed to that standby.
        let chosen: Arc<str> = Arc::from("standby_2");
        c.promotion_chosen(&chosen, "the most advanced".into(), None);
        c.promotion_requested(&chosen, now);
        c.restarted(now);
        assert_eq!(names(&c.step(&nodes, None, now)), Vec::<String>::new());
        assert_eq!(
            names(&c.step(&nodes, None, now + PROMOTE_TIMEOUT)),
            ["promote standby_2 again"]
        );
    }

    #[test]
    fn a_standby_left_on_an_older_timeline_is_neither_promoted_nor_a_reader() {
        let (mut c, mut nodes, now) = primary_lost(FailoverMode::Promote);
        promoted(&mut c, "standby_1", now);
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        c.step(&nodes, None, now);
        assert_eq!(
            c.lineage(),
            Some(Lineage {
                system_id: Some(SYSTEM),
                timeline: Some(2)
            }),
            "standby_2, still on timeline 1, does not serve reads"
        );
        // The new primary dies too; standby_2 lacks everything written on timeline 2.
        down(&mut nodes, "standby_1", now);
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["withdraw standby_1", "warn"]
        );
        assert_eq!(c.lineage().and_then(|l| l.timeline), Some(2));
    }

    #[test]
    fn the_first_primary_is_chosen_once_every_endpoint_was_probed() {
        // A restart of the application after a failover: the old primary is back writable on
        // timeline 1, standby_1 is the primary on timeline 2.
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        set(&mut nodes, "standby_1", |n| {
            n.state = HealthState::Unknown;
            n.writable = None;
        });
        let now = Instant::now();
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            Vec::<String>::new(),
            "standby_1 not probed yet: no decision"
        );
        set(&mut nodes, "standby_1", |n| {
            n.state = HealthState::Up;
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        assert_eq!(
            names(&c.step(&nodes, None, now)),
            ["accept standby_1", "fence primary"]
        );
    }

    #[test]
    fn backup_mode_is_not_held_up_by_a_stale_old_primary_and_fences_the_physical_cluster() {
        let mut c = cluster(FailoverMode::Backup);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        // Someone promotes standby_1 while the primary runs: the primary is stale, and answers.
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
        });
        let actions = names(&c.step(&nodes, None, now));
        assert_eq!(
            actions,
            [
                "withdraw primary",
                "accept backup",
                "fence primary",
                "fence standby_1"
            ]
        );
    }

    #[test]
    fn the_loss_window_counts_from_what_the_new_primary_had_received_as_a_standby() {
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        let now = Instant::now();
        c.step(&nodes, None, now);
        down(&mut nodes, "primary", now);
        set(&mut nodes, "standby_1", |n| {
            n.received = Some(Position::new(1100))
        });
        c.step(&nodes, Some(Position::new(1200)), now);
        // Promoted: by the time it is accepted, it has written past the old primary's end.
        set(&mut nodes, "standby_1", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
            n.position = Some(Position::new(1300));
        });
        c.step(&nodes, None, now);
        let report = c.take_completed().expect("completed");
        assert_eq!(report.new_position, Some(Position::new(1100)));
        assert_eq!(
            report
                .failing
                .old_position
                .map(|old| old.bytes_after(Position::new(1100))),
            Some(100),
            "the 100 bytes it never received may be lost"
        );
    }

    #[test]
    fn an_operator_cannot_accept_a_stale_server_and_a_choice_made_meanwhile_is_dropped() {
        let (mut c, mut nodes, now) = primary_lost(FailoverMode::Promote);
        // standby_2 was promoted by someone else meanwhile; the old primary is back writable.
        set(&mut nodes, "standby_2", |n| {
            n.writable = Some(true);
            n.timeline = Some(2);
            n.state = HealthState::Down;
        });
        set(&mut nodes, "primary", |n| {
            n.state = HealthState::Up;
            n.first_failure = None;
        });
        c.step(&nodes, None, now);
        let refused = c
            .accept_manually("primary", &nodes)
            .expect_err("timeline 1 is older than 2");
        assert!(
            refused.contains("timeline 1, older than timeline 2"),
            "{refused}"
        );
        // An operator accepts standby_2 (up again) while a choice is being read: the choice
        // is dropped, and no pg_promote follows.
        set(&mut nodes, "standby_2", |n| n.state = HealthState::Up);
        c.accept_manually("standby_2", &nodes)
            .expect("the newest primary");
        assert!(!c.promotion_chosen(&Arc::from("standby_1"), "late".into(), None));
    }

    #[test]
    fn a_restarted_actor_waits_for_its_own_first_probes_before_the_first_choice() {
        let mut c = cluster(FailoverMode::Follow);
        let mut nodes = herd();
        // Health judgements carried over (up), but no probe answered this actor yet.
        for n in &mut nodes {
            n.writable = None;
        }
        set(&mut nodes, "primary", |n| n.writable = Some(true));
        let now = Instant::now();
        assert_eq!(names(&c.step(&nodes, None, now)), Vec::<String>::new());
        for n in &mut nodes {
            let writable = n.role != Role::Standby;
            n.writable = Some(writable);
        }
        assert_eq!(names(&c.step(&nodes, None, now)), ["accept primary"]);
    }

    /// A tiny deterministic generator for the model test below.
    struct Dice(u64);

    impl Dice {
        fn roll(&mut self, sides: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            usize::try_from(self.0 % sides as u64).unwrap_or(0)
        }
    }

    #[test]
    fn there_is_never_more_than_one_write_target() {
        // Random runs of failures, returns, external promotions, demotions and promotion
        // outcomes (including requests whose outcome is lost and that complete later), in every
        // mode. After every step: every writable server of the physical cluster other than the
        // accepted primary is fenced; the accepted primary is on the newest timeline; and once
        // `pg_promote` may have reached a standby, nothing else is accepted in that failover.
        let names = ["primary", "standby_1", "standby_2", "backup"];
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        for mode in FailoverMode::ALL {
            for _run in 0..300 {
                let mut c = cluster(mode);
                let mut nodes = herd();
                let mut now = Instant::now();
                // A promotion request whose outcome is unknown, completing (or not) later.
                let mut pending: Option<Arc<str>> = None;
                let mut committed: Option<Arc<str>> = None;
                for _event in 0..40 {
                    let name = names[dice.roll(names.len())];
                    match dice.roll(8) {
                        0 => down(&mut nodes, name, now),
                        1 | 2 => set(&mut nodes, name, |o| {
                            o.state = HealthState::Up;
                            o.first_failure = None;
                        }),
                        3 => set(&mut nodes, name, |o| {
                            o.state = HealthState::Recovering;
                            o.first_failure = None;
                        }),
                        // An external manager promotes a standby (no shared archive: the next
                        // timeline of its own).
                        4 if name.starts_with("standby") && mode == FailoverMode::Follow => {
                            set(&mut nodes, name, |o| {
                                if o.writable == Some(false) {
                                    o.writable = Some(true);
                                    o.timeline = o.timeline.map(|t| t + 1);
                                }
                            });
                        }
                        5 => {
                            if let Some(p) = pending.take() {
                                if dice.roll(2) == 0 {
                                    set(&mut nodes, &p, |o| {
                                        o.writable = Some(true);
                                        o.timeline = o.timeline.map(|t| t + 1);
                                    });
                                }
                            }
                        }
                        _ => now += Duration::from_secs(u64::try_from(dice.roll(15)).unwrap_or(0)),
                    }
                    let actions = c.step(&nodes, None, now);
                    for action in &actions {
                        match action {
                            Action::Accept { endpoint, .. } => {
                                if let Some(chosen) = committed.take() {
                                    assert_eq!(
                                        *endpoint, chosen,
                                        "{mode}: `{endpoint}` accepted while `pg_promote` may \
                                         still complete on `{chosen}`"
                                    );
                                }
                            }
                            Action::Promote { candidates, .. } => {
                                let chosen = Arc::clone(&candidates[dice.roll(candidates.len())]);
                                if let Some(earlier) = &committed {
                                    panic!("{mode}: promoting `{chosen}` after `{earlier}`");
                                }
                                if dice.roll(4) == 0 {
                                    c.promotion_ended(&PromoteOutcome::NotSent("no".into()), now);
                                    continue;
                                }
                                c.promotion_chosen(&chosen, "model".into(), None);
                                c.promotion_requested(&chosen, now);
                                committed = Some(Arc::clone(&chosen));
                                if !outcome(
                                    &mut c,
                                    &mut nodes,
                                    &mut pending,
                                    &chosen,
                                    now,
                                    &mut dice,
                                ) {
                                    committed = None;
                                }
                            }
                            Action::PromoteAgain { endpoint } => {
                                assert_eq!(Some(endpoint), committed.as_ref(), "{mode}");
                                c.promotion_requested(endpoint, now);
                                let endpoint = Arc::clone(endpoint);
                                if !outcome(
                                    &mut c,
                                    &mut nodes,
                                    &mut pending,
                                    &endpoint,
                                    now,
                                    &mut dice,
                                ) {
                                    committed = None;
                                }
                            }
                            _ => {}
                        }
                    }
                    if let Some(accepted) = c.accepted() {
                        let primary = nodes.iter().find(|o| o.name == accepted.name);
                        assert!(
                            primary.is_some_and(|p| !c.stale(p)),
                            "{mode}: the accepted `{}` is on an older timeline",
                            accepted.name
                        );
                        for o in &nodes {
                            let rival = o.name != accepted.name
                                && o.writable == Some(true)
                                && o.physical()
                                && o.state != HealthState::Down;
                            assert!(
                                !rival || c.is_fenced(&o.name),
                                "{mode}: `{}` is a second write target beside `{}`: {nodes:?}",
                                o.name,
                                accepted.name
                            );
                        }
                    }
                }
            }
        }
    }

    /// The outcome of a `pg_promote` request in the model: done, refused, or unknown (and then
    /// perhaps completed later). Returns whether the failover is still committed to `chosen`.
    fn outcome(
        c: &mut ClusterFailover,
        nodes: &mut [Observed],
        pending: &mut Option<Arc<str>>,
        chosen: &Arc<str>,
        now: Instant,
        dice: &mut Dice,
    ) -> bool {
        match dice.roll(3) {
            0 => {
                set(nodes, chosen, |o| {
                    if o.writable == Some(false) {
                        o.writable = Some(true);
                        o.timeline = o.timeline.map(|t| t + 1);
                    }
                });
                c.promotion_ended(&PromoteOutcome::Promoted, now);
                true
            }
            // Refused: nothing started by this request; committed only if an earlier one may
            // still complete.
            1 => c
                .promotion_ended(&PromoteOutcome::Refused("no".into()), now)
                .is_none(),
            _ => {
                *pending = Some(Arc::clone(chosen));
                c.promotion_ended(&PromoteOutcome::Unknown("lost".into()), now);
                true
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
