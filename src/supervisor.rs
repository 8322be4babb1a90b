//! `SupervisorActor`: starts one database actor per endpoint, then the router; restarts a child
//! that stopped or panicked, after a backoff and within a restart-intensity limit; gives up
//! loudly when restarts come too often; shuts down in reverse order.
//!
//! A database that cannot be reached is not a crash: its actor stays up and reconnects by
//! itself. Restarts are for crashes: a panic, or a state that can no longer be trusted.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant},
};

use actix::{
    Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler,
    Message, Recipient, ResponseActFuture, WrapFuture as _,
};
use tokio::sync::Notify;

mod restart;

use self::restart::{RestartDecision, RestartHistory, RestartPolicy};
use crate::{
    backoff::Backoff,
    child::{ChildExited, ChildId, ExitGuard, ExitReason, Stop},
    database::{DatabaseActor, DatabaseSpec, Endpoint},
    error::Error,
    health::{
        failover_state, FailoverEvent, FailoverState, HealthActor, HealthArbiter, HealthParts,
        ProbeRequests, StateChanged, SubscribeFailover, SubscribeState,
    },
    replicator::{run as replication, ReplicationStatus, ReplicatorActor},
    router::{Directory, RouterActor, Routing, RoutingRule},
    settings::{
        FailoverSettings, HealthSettings, ReplicatorSettings, Role, RouterSettings,
        SupervisorSettings,
    },
};

/// Something that happened to the supervisor's children. Subscribe with [`Subscribe`] (or
/// `HerdBuilder::subscribe`); every event is also logged.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
#[non_exhaustive]
pub enum SupervisorEvent {
    /// A child started (`generation` 1 is its first start).
    Started {
        /// Which child.
        child: ChildId,
        /// How many times it was started.
        generation: u64,
    },
    /// A child ended.
    Exited {
        /// Which child.
        child: ChildId,
        /// Its generation.
        generation: u64,
        /// Why.
        reason: ExitReason,
    },
    /// A crashed child will be restarted.
    RestartScheduled {
        /// Which child.
        child: ChildId,
        /// After how long.
        after: Duration,
        /// How many restarts happened within `supervisor.restart_period`, this one included.
        restarts: u32,
    },
    /// Restarts came too often: every child was stopped and the router answers every message
    /// with a [`Stopped`](crate::ErrorKind::Stopped) error carrying `reason`.
    GaveUp {
        /// Why, for people.
        reason: String,
    },
    /// The herd shut down.
    ShutDown,
}

/// Subscribes a recipient to [`SupervisorEvent`]s.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Subscribe(pub Recipient<SupervisorEvent>);

/// Shuts the herd down: the router stops taking messages and lets those it holds finish within
/// `supervisor.shutdown_grace`, then the database actors close their pools, then the router
/// and the supervisor stop. Answers how many messages had not finished in time.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

/// The state the supervisor shares with the `Herd` handle.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The routing state, which outlives router restarts.
    pub(crate) routing: Arc<Routing>,
    /// The current router (a restarted router has a new address).
    pub(crate) router: RwLock<Addr<RouterActor>>,
    /// The current health actor.
    pub(crate) health: RwLock<Addr<HealthActor>>,
    /// Why the herd stopped, once it did.
    pub(crate) failure: Mutex<Option<String>>,
    /// The status of each replication target, by target name.
    pub(crate) replication: BTreeMap<Arc<str>, Arc<replication::Shared>>,
}

impl Shared {
    pub(crate) fn router(&self) -> Addr<RouterActor> {
        self.router
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn health(&self) -> Addr<HealthActor> {
        self.health
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_failure(&self, reason: &str) {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| reason.to_owned());
    }
}

/// What the supervisor is started with.
pub(crate) struct SupervisorParts {
    pub(crate) specs: Vec<DatabaseSpec>,
    pub(crate) directory: Directory,
    pub(crate) router: RouterSettings,
    pub(crate) supervisor: SupervisorSettings,
    pub(crate) health: HealthSettings,
    pub(crate) failover: FailoverSettings,
    pub(crate) replicator: ReplicatorSettings,
    /// The endpoints the replicator writes to.
    pub(crate) targets: Vec<Arc<str>>,
    pub(crate) rules: Arc<[Box<dyn RoutingRule>]>,
    pub(crate) subscribers: Vec<Recipient<SupervisorEvent>>,
    pub(crate) state_subscribers: Vec<Recipient<StateChanged>>,
    pub(crate) failover_subscribers: Vec<Recipient<FailoverEvent>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Running,
    ShuttingDown,
    GaveUp(String),
}

#[derive(Debug)]
enum Running {
    Database(Addr<DatabaseActor>),
    Health(Addr<HealthActor>),
    Router(Addr<RouterActor>),
    Replicator(Addr<ReplicatorActor>),
}

#[derive(Debug)]
struct Child {
    generation: u64,
    started: Instant,
    backoff: Backoff,
    running: Option<Running>,
}

/// The actor at the top of the herd. Start it through [`Herd`](crate::Herd).
pub struct SupervisorActor {
    specs: BTreeMap<Arc<str>, DatabaseSpec>,
    routing: Arc<Routing>,
    probes: Arc<ProbeRequests>,
    /// The thread the health actor runs on.
    health_arbiter: HealthArbiter,
    health_settings: HealthSettings,
    failover_settings: FailoverSettings,
    failover: FailoverState,
    state_subscribers: Vec<Recipient<StateChanged>>,
    failover_subscribers: Vec<Recipient<FailoverEvent>>,
    policy: RestartPolicy,
    shutdown_grace: Duration,
    history: RestartHistory,
    children: BTreeMap<ChildId, Child>,
    endpoints: BTreeMap<Arc<str>, Endpoint>,
    subscribers: Vec<Recipient<SupervisorEvent>>,
    phase: Phase,
    shared: Arc<Shared>,
    /// What each replicator is started with.
    replication: BTreeMap<Arc<str>, replication::TargetSpec>,
}

impl std::fmt::Debug for SupervisorActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorActor")
            .field("children", &self.children)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl SupervisorActor {
    /// Starts the supervisor and, synchronously, its children: every database actor, then the
    /// router. Returns the supervisor's address and the state shared with the handle.
    pub(crate) fn launch(
        parts: SupervisorParts,
    ) -> Result<(Addr<SupervisorActor>, Arc<Shared>), Error> {
        let mut outcome: Result<Arc<Shared>, Error> = Err(Error::stopped("not started"));
        let address = SupervisorActor::create(|ctx| {
            let changed = Arc::new(Notify::new());
            let probes = Arc::new(ProbeRequests::default());
            let supervisor = ctx.address().recipient::<ChildExited>();
            let policy = RestartPolicy::from_settings(&parts.supervisor);
            let mut children = BTreeMap::new();
            let mut endpoints = BTreeMap::new();
            // Each child counts its own starts: 1 is the first.
            let generation = 1;
            let mut failed = None;
            let child = |generation, running| Child {
                generation,
                started: Instant::now(),
                backoff: policy.backoff(),
                running: Some(running),
            };
            for spec in &parts.specs {
                match DatabaseActor::launch(
                    spec,
                    generation,
                    supervisor.clone(),
                    Arc::clone(&probes),
                ) {
                    Ok((address, endpoint)) => {
                        endpoints.insert(Arc::clone(&spec.name), endpoint);
                        children.insert(
                            ChildId::Database(Arc::clone(&spec.name)),
                            child(generation, Running::Database(address)),
                        );
                    }
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            let routing = Arc::new(Routing::new(
                parts.directory,
                parts.router,
                parts.rules,
                changed,
            ));
            for endpoint in endpoints.values() {
                routing.attach(Endpoint::clone(endpoint));
            }
            let failover = failover_state(&parts.specs, &parts.failover);
            let health_arbiter = HealthArbiter::new();
            let health = health_arbiter.start(HealthParts {
                specs: parts.specs.clone(),
                settings: parts.health.clone(),
                failover: parts.failover.clone(),
                state: Arc::clone(&failover),
                routing: Arc::clone(&routing),
                requests: Arc::clone(&probes),
                state_subscribers: parts.state_subscribers.clone(),
                failover_subscribers: parts.failover_subscribers.clone(),
                guard: ExitGuard::new(supervisor.clone(), ChildId::Health, generation),
            });
            children.insert(
                ChildId::Health,
                child(generation, Running::Health(health.clone())),
            );
            let router = RouterActor::new(
                Arc::clone(&routing),
                ExitGuard::new(supervisor.clone(), ChildId::Router, generation),
            )
            .start();
            children.insert(
                ChildId::Router,
                child(generation, Running::Router(router.clone())),
            );
            let replication =
                target_specs(&parts.specs, &parts.targets, &parts.replicator, &routing);
            let mut statuses = BTreeMap::new();
            for (name, spec) in &replication {
                let status = Arc::new(replication::Shared::new(ReplicationStatus::new(
                    Arc::clone(name),
                    Arc::clone(&spec.cluster),
                    spec.settings.mode,
                )));
                let child_id = ChildId::Replicator(Arc::clone(name));
                let address = ReplicatorActor::new(
                    spec.clone(),
                    Arc::clone(&status),
                    ExitGuard::new(supervisor.clone(), child_id.clone(), generation),
                )
                .start();
                statuses.insert(Arc::clone(name), status);
                children.insert(child_id, child(generation, Running::Replicator(address)));
            }
            let shared = Arc::new(Shared {
                routing: Arc::clone(&routing),
                router: RwLock::new(router),
                health: RwLock::new(health),
                failure: Mutex::new(None),
                replication: statuses,
            });
            outcome = match failed {
                Some(error) => Err(error),
                None => Ok(Arc::clone(&shared)),
            };
            SupervisorActor {
                specs: parts
                    .specs
                    .iter()
                    .map(|spec| (Arc::clone(&spec.name), spec.clone()))
                    .collect(),
                routing,
                probes,
                health_arbiter,
                health_settings: parts.health,
                failover_settings: parts.failover,
                failover,
                state_subscribers: parts.state_subscribers,
                failover_subscribers: parts.failover_subscribers,
                policy,
                shutdown_grace: parts.supervisor.shutdown_grace,
                history: RestartHistory::default(),
                children,
                endpoints,
                subscribers: parts.subscribers,
                phase: Phase::Running,
                shared,
                replication,
            }
        });
        match outcome {
            Ok(shared) => Ok((address, shared)),
            Err(error) => {
                address.do_send(Shutdown);
                Err(error)
            }
        }
    }

    fn emit(&self, event: SupervisorEvent) {
        match &event {
            SupervisorEvent::Started { child, generation } if *generation > 1 => {
                tracing::info!(%child, generation, "restarted");
            }
            SupervisorEvent::Started { child, generation } => {
                tracing::debug!(%child, generation, "started");
            }
            SupervisorEvent::Exited {
                child,
                generation,
                reason,
            } if reason.is_normal() => {
                tracing::debug!(%child, generation, %reason, "exited");
            }
            SupervisorEvent::Exited {
                child,
                generation,
                reason,
            } => {
                tracing::warn!(%child, generation, %reason, "crashed");
            }
            SupervisorEvent::RestartScheduled {
                child,
                after,
                restarts,
            } => {
                tracing::warn!(%child, ?after, restarts, "restart scheduled");
            }
            SupervisorEvent::GaveUp { reason } => tracing::error!(%reason, "supervisor gave up"),
            SupervisorEvent::ShutDown => tracing::info!("herd shut down"),
        }
        for subscriber in &self.subscribers {
            subscriber.do_send(event.clone());
        }
    }

    /// Starts `child` again, with a new generation.
    fn restart(&mut self, child: ChildId, ctx: &mut Context<Self>) {
        if self.phase != Phase::Running {
            return;
        }
        let Some(generation) = self.children.get(&child).map(|state| state.generation + 1) else {
            return;
        };
        let supervisor = ctx.address().recipient::<ChildExited>();
        let running = match &child {
            ChildId::Database(name) => {
                let Some(spec) = self.specs.get(name) else {
                    return;
                };
                match DatabaseActor::launch(spec, generation, supervisor, Arc::clone(&self.probes))
                {
                    Ok((address, endpoint)) => {
                        self.endpoints.insert(Arc::clone(name), endpoint.clone());
                        self.routing.attach(endpoint);
                        Running::Database(address)
                    }
                    Err(error) => {
                        tracing::error!(%child, %error, "cannot restart");
                        self.crashed(
                            child,
                            ExitReason::Poisoned(error.to_string()),
                            Duration::ZERO,
                            ctx,
                        );
                        return;
                    }
                }
            }
            ChildId::Health => {
                let address = self.health_arbiter.start(HealthParts {
                    specs: self.specs.values().cloned().collect(),
                    settings: self.health_settings.clone(),
                    failover: self.failover_settings.clone(),
                    state: Arc::clone(&self.failover),
                    routing: Arc::clone(&self.routing),
                    requests: Arc::clone(&self.probes),
                    state_subscribers: self.state_subscribers.clone(),
                    failover_subscribers: self.failover_subscribers.clone(),
                    guard: ExitGuard::new(supervisor, ChildId::Health, generation),
                });
                *self
                    .shared
                    .health
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = address.clone();
                Running::Health(address)
            }
            ChildId::Replicator(name) => {
                let (Some(spec), Some(status)) = (
                    self.replication.get(name),
                    self.shared.replication.get(name),
                ) else {
                    return;
                };
                Running::Replicator(
                    ReplicatorActor::new(
                        spec.clone(),
                        Arc::clone(status),
                        ExitGuard::new(supervisor, child.clone(), generation),
                    )
                    .start(),
                )
            }
            ChildId::Router => {
                let address = RouterActor::new(
                    Arc::clone(&self.routing),
                    ExitGuard::new(supervisor, ChildId::Router, generation),
                )
                .start();
                *self
                    .shared
                    .router
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = address.clone();
                Running::Router(address)
            }
        };
        if let Some(state) = self.children.get_mut(&child) {
            state.generation = generation;
            state.started = Instant::now();
            state.running = Some(running);
        }
        self.emit(SupervisorEvent::Started { child, generation });
    }

    /// Applies the restart policy to a crashed child.
    fn crashed(
        &mut self,
        child: ChildId,
        reason: ExitReason,
        ran_for: Duration,
        ctx: &mut Context<Self>,
    ) {
        let Some(state) = self.children.get_mut(&child) else {
            return;
        };
        let decision = self.policy.decide(
            &mut self.history,
            &mut state.backoff,
            ran_for,
            Instant::now(),
        );
        match decision {
            RestartDecision::Restart { after, restarts } => {
                self.emit(SupervisorEvent::RestartScheduled {
                    child: child.clone(),
                    after,
                    restarts,
                });
                ctx.run_later(after, move |supervisor, ctx| supervisor.restart(child, ctx));
            }
            RestartDecision::GiveUp { restarts, within } => {
                let reason = format!(
                    "the supervisor gave up after {restarts} restarts within {} \
                     (supervisor.max_restarts = {}); the last crash was {child}: {reason}",
                    humantime::format_duration(within),
                    self.policy.max_restarts
                );
                self.give_up(reason);
            }
        }
    }

    /// Stops every child; the router (or the handle, if the router is gone) answers every
    /// message with `reason`.
    fn give_up(&mut self, reason: String) {
        self.phase = Phase::GaveUp(reason.clone());
        self.shared.set_failure(&reason);
        self.routing.halt(&reason);
        for state in self.children.values_mut().rev() {
            match state.running.take() {
                Some(Running::Database(address)) => address.do_send(Stop),
                // No failover decision may follow a give-up.
                Some(Running::Health(address)) => address.do_send(Stop),
                Some(Running::Replicator(address)) => address.do_send(Stop),
                other => state.running = other,
            }
        }
        self.emit(SupervisorEvent::GaveUp { reason });
    }
}

/// What each replication target's loop is started with.
fn target_specs(
    databases: &[DatabaseSpec],
    targets: &[Arc<str>],
    settings: &ReplicatorSettings,
    routing: &Arc<Routing>,
) -> BTreeMap<Arc<str>, replication::TargetSpec> {
    let mut specs = BTreeMap::new();
    for name in targets {
        let Some(target) = databases.iter().find(|spec| spec.name == *name) else {
            continue;
        };
        let cluster: Arc<str> = Arc::from(target.settings.cluster.as_str());
        let sources = databases
            .iter()
            .filter(|spec| {
                spec.settings.cluster == target.settings.cluster
                    && matches!(
                        spec.settings.role,
                        Role::Primary | Role::Standby | Role::Backup
                    )
            })
            .map(|spec| (Arc::clone(&spec.name), spec.connector()))
            .collect();
        specs.insert(
            Arc::clone(name),
            replication::TargetSpec {
                target: Arc::clone(name),
                cluster,
                connector: target.connector(),
                sources,
                settings: settings.clone(),
                routing: Arc::clone(routing),
            },
        );
    }
    specs
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.health_arbiter.stop();
    }

    fn started(&mut self, _ctx: &mut Context<Self>) {
        let started: Vec<(ChildId, u64)> = self
            .children
            .iter()
            .map(|(child, state)| (child.clone(), state.generation))
            .collect();
        for (child, generation) in started {
            self.emit(SupervisorEvent::Started { child, generation });
        }
    }
}

impl Handler<ChildExited> for SupervisorActor {
    type Result = ();

    fn handle(&mut self, exited: ChildExited, ctx: &mut Context<Self>) {
        let ChildExited {
            child,
            generation,
            reason,
        } = exited;
        let Some(state) = self.children.get_mut(&child) else {
            return;
        };
        if state.generation != generation {
            tracing::debug!(%child, generation, current = state.generation, "stale exit ignored");
            return;
        }
        state.running = None;
        let ran_for = state.started.elapsed();
        if let ChildId::Database(name) = &child {
            self.endpoints.remove(name);
            self.routing.detach(name, generation);
        }
        self.emit(SupervisorEvent::Exited {
            child: child.clone(),
            generation,
            reason: reason.clone(),
        });
        if self.phase == Phase::Running && !reason.is_normal() {
            self.crashed(child, reason, ran_for, ctx);
        }
    }
}

impl Handler<Subscribe> for SupervisorActor {
    type Result = ();

    fn handle(&mut self, Subscribe(recipient): Subscribe, _ctx: &mut Context<Self>) {
        self.subscribers.push(recipient);
    }
}

impl Handler<SubscribeState> for SupervisorActor {
    type Result = ();

    fn handle(&mut self, SubscribeState(recipient): SubscribeState, _ctx: &mut Context<Self>) {
        // Kept here too, so that a restarted health actor keeps its subscribers.
        self.state_subscribers.push(recipient.clone());
        self.shared.health().do_send(SubscribeState(recipient));
    }
}

impl Handler<SubscribeFailover> for SupervisorActor {
    type Result = ();

    fn handle(
        &mut self,
        SubscribeFailover(recipient): SubscribeFailover,
        _ctx: &mut Context<Self>,
    ) {
        self.failover_subscribers.push(recipient.clone());
        self.shared.health().do_send(SubscribeFailover(recipient));
    }
}

impl Handler<Shutdown> for SupervisorActor {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, _: Shutdown, _ctx: &mut Context<Self>) -> Self::Result {
        if self.phase == Phase::Running {
            self.phase = Phase::ShuttingDown;
        }
        self.shared.set_failure("the herd was shut down");
        // Connections close once the messages in flight have finished (or the grace passed),
        // before the shutdown is answered.
        let endpoints: Vec<Endpoint> = self.endpoints.values().cloned().collect();
        let routing = Arc::clone(&self.routing);
        let grace = self.shutdown_grace;
        let drain = async move {
            let unfinished = routing.drain(grace).await;
            for endpoint in &endpoints {
                endpoint.retire();
                endpoint.pool().close();
            }
            unfinished
        };
        Box::pin(drain.into_actor(self).map(|unfinished, supervisor, ctx| {
            // Reverse start order: the databases were started first, so they stop last.
            for state in supervisor.children.values_mut() {
                if let Some(Running::Replicator(address)) = state.running.take() {
                    address.do_send(Stop);
                }
            }
            for child in [ChildId::Router, ChildId::Health] {
                match supervisor
                    .children
                    .get_mut(&child)
                    .and_then(|state| state.running.take())
                {
                    Some(Running::Router(router)) => router.do_send(Stop),
                    Some(Running::Health(health)) => health.do_send(Stop),
                    _ => {}
                }
            }
            for state in supervisor.children.values_mut().rev() {
                if let Some(Running::Database(address)) = state.running.take() {
                    address.do_send(Stop);
                }
            }
            supervisor.emit(SupervisorEvent::ShutDown);
            ctx.stop();
            unfinished
        }))
    }
}
