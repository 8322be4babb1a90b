//! Routing: where each query message runs.
//!
//! The decisions live in [`Routing`], shared by the [`RouterActor`] (applications that send
//! messages to its address) and the [`Herd`](crate::Herd) handle (`herd.send(..)`, which runs the
//! same routing on the caller's task without a hop through the actor; see `BENCHMARKS.md` for
//! why). Either way, a message:
//! - has one deadline covering queueing, connection checkout, execution, retries and any wait
//!   for a target;
//! - is refused with [`Overloaded`](crate::ErrorKind::Overloaded) at once when
//!   `router.queue_capacity` messages are already held;
//! - is retried on another fitting endpoint when it is a read that failed for a connection
//!   reason; a write only when it provably never reached the server, or when it is marked
//!   idempotent;
//! - is answered [`CommitUnknown`](crate::ErrorKind::CommitUnknown) when it is a write whose
//!   commit may have happened, never silently retried.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::Duration,
};

use actix::{Actor, Context, Handler, Message, ResponseFuture};
use tokio::{sync::Notify, time::Instant};

mod balance;
mod decide;
mod rule;

pub(crate) use decide::Directory;
pub use rule::{Route, RouteRequest, RoutingRule};

use self::{
    balance::Balancer,
    decide::{decide, resolve, retry, Ask, Candidate, Decision, Retry, Scope},
};
use crate::{
    child::{ExitGuard, Stop},
    database::{Endpoint, Failure},
    error::{Error, ErrorKind},
    health::{HealthState, HealthView},
    position::Position,
    query::{Batch, Intent, Job, Query, Read, Request, Routed, Stage, Transact, Write, Written},
    settings::{Role, RouterSettings},
};

/// After a write's attempt failed before reaching the server, the first wait before it goes
/// again (doubling, see [`WRITE_RETRY_MAX_WAIT`]), unless the endpoint's state changes first.
const WRITE_RETRY_FIRST_WAIT: Duration = Duration::from_millis(10);
/// The longest wait between two attempts of a write.
const WRITE_RETRY_MAX_WAIT: Duration = Duration::from_millis(250);
/// How often a draining router checks whether its messages have finished.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The routing state and decisions, shared by the router actor, the `Herd` handle and the
/// supervisor (which attaches and detaches endpoints).
pub(crate) struct Routing {
    /// The running endpoints, by name: a snapshot replaced when one attaches or detaches.
    table: RwLock<Arc<Vec<Endpoint>>>,
    balancer: Mutex<Balancer>,
    directory: Directory,
    settings: RouterSettings,
    rules: Arc<[Box<dyn RoutingRule>]>,
    in_flight: AtomicUsize,
    changed: Arc<Notify>,
    halted: RwLock<Option<String>>,
    /// The health actor's latest view (`None` until its first).
    view: RwLock<Option<Arc<HealthView>>>,
    /// The furthest position a write was acknowledged at, per cluster.
    acked: Mutex<BTreeMap<Arc<str>, Position>>,
    /// The source position each replica holds everything up to, reported by the replicator,
    /// with the endpoint it replicates from.
    replicated: Mutex<BTreeMap<Arc<str>, Replicated>>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("endpoints", &self.snapshot().len())
            .field("in_flight", &self.in_flight())
            .field("halted", &*read(&self.halted))
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Routing {
    pub(crate) fn new(
        directory: Directory,
        settings: RouterSettings,
        rules: Arc<[Box<dyn RoutingRule>]>,
        changed: Arc<Notify>,
    ) -> Routing {
        Routing {
            table: RwLock::new(Arc::new(Vec::new())),
            balancer: Mutex::new(Balancer::default()),
            directory,
            settings,
            rules,
            in_flight: AtomicUsize::new(0),
            changed,
            halted: RwLock::new(None),
            view: RwLock::new(None),
            acked: Mutex::new(BTreeMap::new()),
            replicated: Mutex::new(BTreeMap::new()),
        }
    }

    /// The health of `endpoint` in the last view, if there was one: a restarted health actor
    /// starts from it rather than from nothing.
    pub(crate) fn last_health(&self, endpoint: &str) -> Option<HealthState> {
        read(&self.view)
            .as_ref()
            .and_then(|view| view.endpoints.get(endpoint).map(|f| f.state))
    }

    /// Takes the health actor's latest view; wakes every message waiting for a target.
    pub(crate) fn apply_view(&self, view: HealthView) {
        let previous = write(&self.view).replace(Arc::new(view.clone()));
        if previous.as_deref() == Some(&view) {
            return;
        }
        // Idle connections to an endpoint that was just declared down are dead weight.
        for endpoint in self.snapshot().iter() {
            let down = |v: &HealthView| {
                v.endpoints
                    .get(endpoint.name())
                    .is_some_and(|f| f.state == HealthState::Down)
            };
            if down(&view) && !previous.as_deref().is_some_and(down) {
                endpoint.pool().retain(|_, _| false);
            }
        }
        self.changed.notify_waiters();
    }

    /// Why the endpoints of `scope` that are not serving are not, for an error message.
    fn down_reasons(&self, scope: &Scope) -> String {
        let Some(view) = read(&self.view).clone() else {
            return String::new();
        };
        let endpoints = self.snapshot();
        let reasons: Vec<String> = endpoints
            .iter()
            .filter(|e| match scope {
                Scope::Endpoint(name) => e.name() == name,
                Scope::Cluster(cluster) => e.cluster() == &**cluster,
            })
            .filter_map(|e| {
                let facts = view.endpoints.get(e.name())?;
                let error = facts.last_error.as_ref()?;
                Some(format!("`{}` is {}: {error}", e.name(), facts.state))
            })
            .collect();
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join("; "))
        }
    }

    /// Whether `endpoint` is its cluster's accepted primary now (or nothing is known yet).
    fn is_accepted(&self, endpoint: &Endpoint) -> bool {
        read(&self.view).as_ref().is_none_or(|view| {
            view.primaries
                .get(endpoint.cluster())
                .is_some_and(|p| p.as_deref() == Some(&**endpoint.name()))
        })
    }

    /// The furthest position a write was acknowledged at in `cluster`.
    pub(crate) fn acked(&self, cluster: &str) -> Option<Position> {
        self.acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .copied()
    }

    fn record_acked(&self, cluster: &str, position: Position) {
        let mut acked = self.acked.lock().unwrap_or_else(PoisonError::into_inner);
        match acked.get_mut(cluster) {
            Some(furthest) => *furthest = (*furthest).max(position),
            None => {
                acked.insert(Arc::from(cluster), position);
            }
        }
    }

    fn snapshot(&self) -> Arc<Vec<Endpoint>> {
        Arc::clone(&read(&self.table))
    }

    /// How many messages are held now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Puts `endpoint` in the table, replacing an older generation of it.
    pub(crate) fn attach(&self, endpoint: Endpoint) {
        let mut table = write(&self.table);
        let mut endpoints = Vec::clone(&table);
        match endpoints.binary_search_by(|e| e.name().cmp(endpoint.name())) {
            Ok(index) if endpoints[index].generation() < endpoint.generation() => {
                endpoints[index] = endpoint;
            }
            Ok(_) => return,
            Err(index) => endpoints.insert(index, endpoint),
        }
        *table = Arc::new(endpoints);
        drop(table);
        self.changed.notify_waiters();
    }

    /// Takes endpoint `name` out of the table if it is still of `generation`.
    pub(crate) fn detach(&self, name: &str, generation: u64) {
        let mut table = write(&self.table);
        if !table
            .iter()
            .any(|e| &**e.name() == name && e.generation() == generation)
        {
            return;
        }
        let endpoints: Vec<Endpoint> = table
            .iter()
            .filter(|e| !(&**e.name() == name && e.generation() == generation))
            .cloned()
            .collect();
        *table = Arc::new(endpoints);
        drop(table);
        self.changed.notify_waiters();
    }

    /// From now on every new message is answered with a [`Stopped`](ErrorKind::Stopped) error
    /// saying `reason`. The first reason given sticks.
    pub(crate) fn halt(&self, reason: &str) {
        write(&self.halted).get_or_insert_with(|| reason.to_owned());
        self.changed.notify_waiters();
    }

    /// Halts, then waits until the messages held have finished or `grace` passed; returns how
    /// many had not.
    pub(crate) async fn drain(&self, grace: Duration) -> usize {
        self.halt("the herd is shutting down");
        let deadline = Instant::now() + grace;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        self.in_flight()
    }

    /// The view of every running endpoint.
    /// Records that replica `endpoint` holds every write of its cluster up to `position`, as
    /// replicated from `source`.
    pub(crate) fn replicated(&self, endpoint: &Arc<str>, source: &Arc<str>, position: Position) {
        self.replicated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                Arc::clone(endpoint),
                Replicated {
                    source: Arc::clone(source),
                    position,
                },
            );
        self.changed.notify_waiters();
    }

    /// Forgets what replica `endpoint` was said to hold: its replicator's session ended (the
    /// target may come back older, restored or recopied) or reads from another source now.
    pub(crate) fn forget_replicated(&self, endpoint: &str) {
        self.replicated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(endpoint);
    }

    /// The position replica `endpoint` of `cluster` holds everything up to, once the
    /// replicator said, while the source it said it of is the cluster's accepted primary: a
    /// position of another primary (before a failover) is of another history.
    fn replicated_position(&self, endpoint: &str, cluster: &str) -> Option<Position> {
        let primary = self.primary_of(cluster)?;
        self.replicated
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(endpoint)
            .filter(|claim| claim.source == primary)
            .map(|claim| claim.position)
    }

    /// The accepted primary of `cluster`, once there is one.
    pub(crate) fn primary_of(&self, cluster: &str) -> Option<Arc<str>> {
        read(&self.view)
            .as_ref()
            .and_then(|view| view.primaries.get(cluster).cloned().flatten())
    }

    pub(crate) fn routes(&self) -> Vec<RouteEntry> {
        let view = read(&self.view).clone();
        self.snapshot()
            .iter()
            .map(|endpoint| {
                let facts = view.as_ref().and_then(|v| v.endpoints.get(endpoint.name()));
                let primary = view.as_ref().is_some_and(|v| {
                    v.primaries
                        .get(endpoint.cluster())
                        .and_then(Option::as_ref)
                        .is_some_and(|p| p == endpoint.name())
                });
                RouteEntry {
                    name: Arc::clone(endpoint.name()),
                    role: endpoint.role(),
                    cluster: Arc::from(endpoint.cluster()),
                    health: facts.map_or(HealthState::Unknown, |f| f.state),
                    primary,
                    fenced: facts.is_some_and(|f| f.fenced),
                    position: facts.and_then(|f| f.position),
                    lag: facts.and_then(|f| f.lag),
                    outstanding: endpoint.state().outstanding(),
                    latency: endpoint.state().latency(),
                }
            })
            .collect()
    }

    /// Chooses the endpoint for one attempt, and the position to check there first, if any.
    fn choose(&self, ask: Ask<'_>) -> Result<(Endpoint, Option<Position>), Decision> {
        let endpoints = self.snapshot();
        let view = read(&self.view).clone();
        let Some(view) = view else {
            return Err(Decision::Wait(
                "the first health probes have not finished".to_owned(),
            ));
        };
        let candidates: Vec<Candidate<'_>> = endpoints
            .iter()
            .map(|endpoint| {
                let state = endpoint.state();
                let facts = view.endpoints.get(endpoint.name());
                let accepted = view
                    .primaries
                    .get(endpoint.cluster())
                    .and_then(Option::as_ref);
                let standby = facts.is_some_and(|f| f.writable == Some(false));
                // A standby serves reads while it follows the cluster's lineage: the accepted
                // primary's system and newest timeline, or, while failing over, the old
                // primary's. A standby left behind on an older timeline (or another system)
                // serves none.
                let follows = match (facts, view.lineages.get(endpoint.cluster())) {
                    (Some(f), Some(lineage)) => {
                        f.system_id.is_some()
                            && f.system_id == lineage.system_id
                            && (f.timeline.is_none()
                                || lineage.timeline.is_none()
                                || f.timeline == lineage.timeline)
                    }
                    (Some(_), None) => true,
                    _ => false,
                };
                let replica = endpoint.role() == crate::settings::Role::Replica;
                Candidate {
                    name: endpoint.name(),
                    cluster: endpoint.cluster(),
                    replica,
                    serving: !state.is_retired() && facts.is_some_and(|f| f.state.is_serving()),
                    fenced: facts.is_some_and(|f| f.fenced),
                    primary: accepted.is_some_and(|p| p == endpoint.name()),
                    reader: standby && follows,
                    // A replica's own WAL says nothing of its source: its position is the one
                    // the replicator applied.
                    position: if replica {
                        self.replicated_position(endpoint.name(), endpoint.cluster())
                    } else {
                        facts.and_then(|f| f.position)
                    },
                    lag: facts.and_then(|f| f.lag),
                    outstanding: state.outstanding(),
                    latency: state.latency(),
                    weight: endpoint.weight(),
                }
            })
            .collect();
        let decision = {
            let mut balancer = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
            decide(ask, &candidates, &mut balancer)
        };
        match decision {
            Decision::Use(index) => Ok((endpoints[index].clone(), None)),
            Decision::UseChecked(index, position) => Ok((endpoints[index].clone(), Some(position))),
            other => Err(other),
        }
    }

    /// Admits `message` and runs it to its answer: resolves where it may run, then chooses,
    /// runs and retries within its deadline.
    pub(crate) async fn dispatch<J: Job + Request>(
        self: Arc<Self>,
        message: J,
    ) -> Result<J::Output, Error> {
        self.dispatch_tracked(message, None)
            .await
            .map(|(output, _)| output)
    }

    /// Like [`dispatch`](Self::dispatch), also returning the position a write reached. With a
    /// session's positions, a read without its own `after` goes after the session's last write
    /// in the read's cluster, and a write's position is remembered for its cluster.
    pub(crate) async fn dispatch_tracked<J: Job + Request>(
        self: Arc<Self>,
        mut message: J,
        session: Option<&SessionPositions>,
    ) -> Result<(J::Output, Option<Position>), Error> {
        let received = Instant::now();
        if let Some(reason) = read(&self.halted).as_ref() {
            return Err(Error::stopped(reason.clone()));
        }
        let capacity = self.settings.queue_capacity;
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= capacity {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::overloaded(capacity));
        }
        let _permit = Permit(&self.in_flight);
        let options = std::mem::take(message.options_mut());
        let deadline = options
            .deadline
            .map_or(received + self.settings.default_timeout, Instant::from_std);
        let budget = deadline.saturating_duration_since(received);
        if budget.is_zero() {
            return Err(Error::timeout(
                Duration::ZERO,
                "the message waited before reaching the router",
            ));
        }
        let intent = message.intent();
        let rule = if options.target.is_some() || self.rules.is_empty() {
            Route::Default
        } else {
            let request = RouteRequest {
                intent,
                message: message.as_any(),
                type_name: message.type_name(),
                cluster: options.cluster.as_deref(),
            };
            self.rules
                .iter()
                .map(|rule| rule.route(&request))
                .find(|route| *route != Route::Default)
                .unwrap_or(Route::Default)
        };
        let scope = resolve(
            &self.directory,
            options.target.as_deref(),
            rule,
            options.cluster.as_deref(),
        )?;
        let max_lag = match options.max_lag {
            Some(own) => own.min(self.settings.max_lag),
            None => self.settings.max_lag,
        };
        let cluster = self.directory.cluster_of(&scope).cloned();
        let after = match (options.after, session, &cluster) {
            (None, Some(session), Some(cluster)) if intent == Intent::Read => session.get(cluster),
            (after, _, _) => after,
        };
        let outcome = Attempts {
            routing: &self,
            job: std::rc::Rc::new(message),
            scope,
            intent,
            idempotent: options.idempotent,
            after,
            max_lag,
            strict_lag: options.max_lag.is_some(),
            deadline,
            budget,
        }
        .run()
        .await;
        // Only a position on the cluster's accepted primary is of the cluster's history: one
        // of a write sent by name to a replica is of that replica's own.
        if let (Ok((_, Some(position), true)), Some(cluster)) = (&outcome, cluster) {
            self.record_acked(&cluster, *position);
            if let Some(session) = session {
                session.advance(&cluster, *position);
            }
        }
        outcome.map(|(output, position, _)| (output, position))
    }
}

/// What a replicator said a replica holds.
#[derive(Debug, Clone)]
struct Replicated {
    /// The endpoint it replicated from.
    source: Arc<str>,
    position: Position,
}

/// The positions of a session's last writes, per cluster (positions of different clusters do
/// not compare).
#[derive(Debug, Default)]
pub(crate) struct SessionPositions(RefCell<BTreeMap<Arc<str>, Position>>);

impl SessionPositions {
    pub(crate) fn get(&self, cluster: &str) -> Option<Position> {
        self.0.borrow().get(cluster).copied()
    }

    pub(crate) fn advance(&self, cluster: &Arc<str>, position: Position) {
        let mut positions = self.0.borrow_mut();
        let entry = positions.entry(Arc::clone(cluster)).or_insert(position);
        *entry = (*entry).max(position);
    }

    pub(crate) fn all(&self) -> Vec<(Arc<str>, Position)> {
        self.0
            .borrow()
            .iter()
            .map(|(cluster, position)| (Arc::clone(cluster), *position))
            .collect()
    }
}

/// Counts a message as held while it lives.
struct Permit<'a>(&'a AtomicUsize);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One message's way through the herd: choose, run, and retry within the deadline.
struct Attempts<'a, J> {
    routing: &'a Routing,
    job: std::rc::Rc<J>,
    scope: Scope,
    intent: Intent,
    idempotent: bool,
    after: Option<Position>,
    max_lag: Duration,
    strict_lag: bool,
    deadline: Instant,
    budget: Duration,
}

impl<J: Job> Attempts<'_, J> {
    fn ask<'a>(&'a self, excluded: &'a [Arc<str>]) -> Ask<'a> {
        Ask {
            intent: self.intent,
            scope: &self.scope,
            fallback_to_primary: self.routing.settings.fallback_to_primary,
            policy: self.routing.settings.read_policy,
            max_lag: self.max_lag,
            strict_lag: self.strict_lag,
            after: self.after,
            excluded,
        }
    }

    /// The answer, the position a write reached, and whether it ran on the cluster's accepted
    /// primary.
    async fn run(self) -> Result<(J::Output, Option<Position>, bool), Error> {
        let explicit = matches!(self.scope, Scope::Endpoint(_));
        let mut excluded: Vec<Arc<str>> = Vec::new();
        // Whether every exclusion so far is a standby that had not replayed `after` yet: such a
        // standby may have it a moment later, so running out of them means waiting, not failing.
        let mut only_stale = true;
        let mut last_error: Option<Error> = None;
        let mut write_wait = WRITE_RETRY_FIRST_WAIT;
        loop {
            let mut choice = self.routing.choose(self.ask(&excluded));
            // Only a message that must wait listens for changes (the common path skips the
            // registration); it looks again after registering, so that no change is missed.
            let changed = self.routing.changed.notified();
            tokio::pin!(changed);
            if choice.is_err() {
                changed.as_mut().enable();
                if let Some(reason) = read(&self.routing.halted).as_ref() {
                    return Err(Error::stopped(reason.clone()));
                }
                choice = self.routing.choose(self.ask(&excluded));
            }
            match choice {
                Ok((endpoint, replayed)) => {
                    let failure = match endpoint
                        .execute(
                            std::rc::Rc::clone(&self.job),
                            self.deadline,
                            self.budget,
                            replayed,
                        )
                        .await
                    {
                        Ok(_)
                            if self.intent == Intent::Write
                                && !explicit
                                && !self.routing.is_accepted(&endpoint) =>
                        {
                            Failure::new(withdrawn_while_committing(&endpoint), Stage::Committing)
                        }
                        Ok((output, position)) => {
                            // Routed by the cluster: it ran on the accepted primary (checked
                            // above). By name: on the cluster's own history if the endpoint is
                            // its primary or a standby (promoted), even one withdrawn while
                            // the write ran; a replica or a backup is another database.
                            let on_primary = !explicit
                                || matches!(
                                    endpoint.role(),
                                    crate::settings::Role::Primary | crate::settings::Role::Standby
                                );
                            return Ok((output, position, on_primary));
                        }
                        Err(failure) => failure,
                    };
                    if failure.stale {
                        // It had not replayed the position yet: try elsewhere (or the primary).
                        excluded.push(Arc::clone(endpoint.name()));
                        if explicit {
                            changed.as_mut().enable();
                            let pause = write_wait.min(self.deadline - Instant::now());
                            write_wait = (write_wait * 2).min(WRITE_RETRY_MAX_WAIT);
                            let _ = tokio::time::timeout(pause, changed).await;
                            excluded.clear();
                        }
                        last_error = Some(failure.error);
                        continue;
                    }
                    let decision = retry(
                        self.intent,
                        failure.error.kind(),
                        failure.stage,
                        self.idempotent,
                        self.job.rerunnable(),
                        explicit,
                    );
                    if decision == Retry::No || Instant::now() >= self.deadline {
                        return Err(failure.error);
                    }
                    tracing::debug!(endpoint = %endpoint.name(), error = %failure.error, ?decision, "retrying");
                    last_error = Some(failure.error);
                    if decision == Retry::Elsewhere {
                        only_stale = false;
                        excluded.push(Arc::clone(endpoint.name()));
                    } else {
                        changed.as_mut().enable();
                        let pause = write_wait.min(self.deadline - Instant::now());
                        write_wait = (write_wait * 2).min(WRITE_RETRY_MAX_WAIT);
                        let _ = tokio::time::timeout(pause, changed).await;
                    }
                }
                Err(Decision::Wait(why)) => {
                    if tokio::time::timeout_at(self.deadline, changed)
                        .await
                        .is_err()
                    {
                        return Err(last_error.unwrap_or_else(|| {
                            Error::new(ErrorKind::NoTarget).with_detail(format!(
                                "{why}, and nothing changed within the deadline of {}{}",
                                crate::error::show(self.budget),
                                self.routing.down_reasons(&self.scope)
                            ))
                        }));
                    }
                }
                Err(Decision::Refuse(why)) => {
                    return Err(Error::new(ErrorKind::NoTarget).with_detail(why))
                }
                // Every standby was asked and none had replayed the position yet, and the primary
                // may not serve the read (`fallback_to_primary` off): wait for them to catch up.
                Err(Decision::Exhausted) if only_stale && Instant::now() < self.deadline => {
                    changed.as_mut().enable();
                    let pause = write_wait.min(self.deadline - Instant::now());
                    write_wait = (write_wait * 2).min(WRITE_RETRY_MAX_WAIT);
                    let _ = tokio::time::timeout(pause, changed).await;
                    excluded.clear();
                }
                Err(_) => {
                    return Err(last_error.unwrap_or_else(|| {
                        Error::new(ErrorKind::NoTarget).with_detail("every fitting endpoint failed")
                    }))
                }
            }
        }
    }
}

/// A write committed on `endpoint` after it stopped being the accepted primary (declared down,
/// or superseded by a newer one) while the write ran: a hung primary that resumes finishes its
/// writes, and they are not on the new primary unless they were replicated there.
fn withdrawn_while_committing(endpoint: &Endpoint) -> Error {
    Error::new(ErrorKind::CommitUnknown)
        .with_endpoint(endpoint.name())
        .with_detail(format!(
            "the write committed on `{}`, but `{}` stopped being the primary while it ran (it \
             was declared down or superseded): it may be missing from the new primary; check \
             before doing it again",
            endpoint.name(),
            endpoint.name()
        ))
}

/// The actor applications may send query messages to: [`Routed`], [`Read`], [`Write`],
/// [`Batch`], [`Transact`]. Each is answered by a detached future, so many run at once.
///
/// [`Herd::send`](crate::Herd::send) routes the same messages the same way without the hop
/// through this actor's mailbox and the extra task it costs.
pub struct RouterActor {
    routing: Arc<Routing>,
    _guard: ExitGuard,
}

impl std::fmt::Debug for RouterActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterActor")
            .field("routing", &self.routing)
            .finish_non_exhaustive()
    }
}

impl RouterActor {
    pub(crate) fn new(routing: Arc<Routing>, guard: ExitGuard) -> RouterActor {
        RouterActor {
            routing,
            _guard: guard,
        }
    }

    fn dispatch<J: Job + Request>(&self, message: J) -> ResponseFuture<Result<J::Output, Error>> {
        Box::pin(Arc::clone(&self.routing).dispatch(message))
    }
}

impl Actor for RouterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The mailbox only holds cheap decisions; the real bound is `queue_capacity`, enforced
        // on the messages the router holds.
        ctx.set_mailbox_capacity(self.routing.settings.queue_capacity);
    }
}

impl<Q: Query> Handler<Routed<Q>> for RouterActor {
    type Result = ResponseFuture<Result<Q::Output, Error>>;

    fn handle(&mut self, message: Routed<Q>, _ctx: &mut Context<Self>) -> Self::Result {
        self.dispatch(message)
    }
}

impl Handler<Read> for RouterActor {
    type Result = ResponseFuture<Result<Vec<tokio_postgres::Row>, Error>>;

    fn handle(&mut self, message: Read, _ctx: &mut Context<Self>) -> Self::Result {
        self.dispatch(message)
    }
}

impl Handler<Write> for RouterActor {
    type Result = ResponseFuture<Result<Written, Error>>;

    fn handle(&mut self, message: Write, _ctx: &mut Context<Self>) -> Self::Result {
        self.dispatch(message)
    }
}

impl Handler<Batch> for RouterActor {
    type Result = ResponseFuture<Result<Vec<u64>, Error>>;

    fn handle(&mut self, message: Batch, _ctx: &mut Context<Self>) -> Self::Result {
        self.dispatch(message)
    }
}

impl<T: Send + 'static> Handler<Transact<T>> for RouterActor {
    type Result = ResponseFuture<Result<T, Error>>;

    fn handle(&mut self, message: Transact<T>, _ctx: &mut Context<Self>) -> Self::Result {
        self.dispatch(message)
    }
}

/// Asks the router for its view of the endpoints.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Vec<RouteEntry>")]
pub struct GetRoutes;

/// One endpoint as the router sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouteEntry {
    /// The endpoint's name.
    pub name: Arc<str>,
    /// Its role.
    pub role: Role,
    /// Its cluster.
    pub cluster: Arc<str>,
    /// Its health.
    pub health: HealthState,
    /// Whether it is its cluster's accepted primary (writes go to it).
    pub primary: bool,
    /// Whether it gets no traffic (writable, but not the accepted primary).
    pub fenced: bool,
    /// Its last probed position (current on a primary, replayed on a standby).
    pub position: Option<Position>,
    /// A standby's lag behind the accepted primary.
    pub lag: Option<Duration>,
    /// Messages running on it now.
    pub outstanding: usize,
    /// The recent average query latency, once there is a sample.
    pub latency: Option<Duration>,
}

impl Handler<GetRoutes> for RouterActor {
    type Result = actix::MessageResult<GetRoutes>;

    fn handle(&mut self, _: GetRoutes, _ctx: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(self.routing.routes())
    }
}

/// Asks how many messages the router holds now.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct GetInFlight;

impl Handler<GetInFlight> for RouterActor {
    type Result = usize;

    fn handle(&mut self, _: GetInFlight, _ctx: &mut Context<Self>) -> usize {
        self.routing.in_flight()
    }
}

impl Handler<Stop> for RouterActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        actix::ActorContext::stop(ctx);
    }
}
