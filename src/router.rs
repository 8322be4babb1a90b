//! `RouterActor`: where applications send query messages. It picks a fitting endpoint for each
//! message and runs it there as a detached future, so its own mailbox only ever holds cheap
//! decisions.
//!
//! What a message may expect (see `docs/runtime-semantics.md`):
//! - one deadline covers queueing, connection checkout, execution, retries and any wait for a
//!   target;
//! - when the router already holds `router.queue_capacity` messages, a new one gets
//!   [`Overloaded`](crate::ErrorKind::Overloaded) at once;
//! - a read that fails for a connection reason is retried on another fitting endpoint; a write
//!   only when it provably never reached the server, or when it is marked idempotent;
//! - a write whose commit may have happened is answered
//!   [`CommitUnknown`](crate::ErrorKind::CommitUnknown), never silently retried.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::Arc,
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
    database::{Endpoint, Reachability},
    error::{Error, ErrorKind},
    query::{Batch, Intent, Job, Query, Read, Routable, Routed, Transact, Write},
    settings::{Role, RouterSettings},
};

/// After a write's attempt failed before reaching the server, the first wait before it goes
/// again (doubling, see [`WRITE_RETRY_MAX_WAIT`]), unless the endpoint's state changes first.
const WRITE_RETRY_FIRST_WAIT: Duration = Duration::from_millis(10);
/// The longest wait between two attempts of a write.
const WRITE_RETRY_MAX_WAIT: Duration = Duration::from_millis(250);
/// How often a draining router checks whether its messages have finished.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The state shared between the router and the futures running its messages (all on the
/// router's thread).
struct Core {
    /// The running endpoints, by name.
    endpoints: Vec<Endpoint>,
    directory: Directory,
    balancer: Balancer,
    settings: RouterSettings,
    rules: Arc<[Box<dyn RoutingRule>]>,
}

impl Core {
    /// Chooses the endpoint for one attempt.
    fn choose(
        &mut self,
        intent: Intent,
        scope: &Scope,
        excluded: &[Arc<str>],
    ) -> Result<Endpoint, Decision> {
        let candidates: Vec<Candidate<'_>> = self
            .endpoints
            .iter()
            .map(|endpoint| {
                let state = endpoint.state();
                Candidate {
                    name: endpoint.name(),
                    role: endpoint.role(),
                    cluster: endpoint.cluster(),
                    available: state.reachability() != Reachability::Unreachable,
                    outstanding: state.outstanding(),
                    latency: state.latency(),
                    weight: endpoint.weight(),
                }
            })
            .collect();
        let ask = Ask {
            intent,
            scope,
            fallback_to_primary: self.settings.fallback_to_primary,
            policy: self.settings.read_policy,
            excluded,
        };
        match decide(ask, &candidates, &mut self.balancer) {
            Decision::Use(index) => Ok(self.endpoints[index].clone()),
            other => Err(other),
        }
    }

    /// Puts `endpoint` in the table, replacing an older generation of it.
    fn attach(&mut self, endpoint: Endpoint) -> bool {
        match self
            .endpoints
            .binary_search_by(|e| e.name().cmp(endpoint.name()))
        {
            Ok(index) if self.endpoints[index].generation() < endpoint.generation() => {
                self.endpoints[index] = endpoint;
                true
            }
            Ok(_) => false,
            Err(index) => {
                self.endpoints.insert(index, endpoint);
                true
            }
        }
    }

    /// Takes endpoint `name` out of the table if it is still of `generation`.
    fn detach(&mut self, name: &str, generation: u64) -> bool {
        let before = self.endpoints.len();
        self.endpoints
            .retain(|e| !(&**e.name() == name && e.generation() == generation));
        self.endpoints.len() != before
    }
}

/// The actor applications send query messages to: [`Routed`], [`Read`], [`Write`], [`Batch`],
/// [`Transact`].
pub struct RouterActor {
    core: Rc<RefCell<Core>>,
    in_flight: Rc<Cell<usize>>,
    changed: Arc<Notify>,
    stopped: Option<String>,
    _guard: ExitGuard,
}

impl std::fmt::Debug for RouterActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterActor")
            .field("endpoints", &self.core.borrow().endpoints.len())
            .field("in_flight", &self.in_flight.get())
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// What the router is started with.
pub(crate) struct RouterParts {
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) directory: Directory,
    pub(crate) settings: RouterSettings,
    pub(crate) rules: Arc<[Box<dyn RoutingRule>]>,
    pub(crate) changed: Arc<Notify>,
    pub(crate) guard: ExitGuard,
    pub(crate) stopped: Option<String>,
}

impl RouterActor {
    pub(crate) fn new(parts: RouterParts) -> RouterActor {
        let mut endpoints = parts.endpoints;
        endpoints.sort_by(|a, b| a.name().cmp(b.name()));
        RouterActor {
            core: Rc::new(RefCell::new(Core {
                endpoints,
                directory: parts.directory,
                balancer: Balancer::default(),
                settings: parts.settings,
                rules: parts.rules,
            })),
            in_flight: Rc::new(Cell::new(0)),
            changed: parts.changed,
            stopped: parts.stopped,
            _guard: parts.guard,
        }
    }

    /// Admits a message and returns the future that answers it.
    fn dispatch<J>(&mut self, mut message: J) -> ResponseFuture<Result<J::Output, Error>>
    where
        J: Job + Routable,
    {
        let received = Instant::now();
        if let Some(reason) = &self.stopped {
            return ready(Err(Error::stopped(reason.clone())));
        }
        let (capacity, default_timeout) = {
            let core = self.core.borrow();
            (core.settings.queue_capacity, core.settings.default_timeout)
        };
        if self.in_flight.get() >= capacity {
            return ready(Err(Error::overloaded(capacity)));
        }
        let options = std::mem::take(message.options_mut());
        let deadline = options
            .deadline
            .map_or(received + default_timeout, Instant::from_std);
        let budget = deadline.saturating_duration_since(received);
        if budget.is_zero() {
            return ready(Err(Error::timeout(
                Duration::ZERO,
                "the message waited in the router's mailbox",
            )));
        }
        let intent = message.intent();
        let scope = {
            let core = self.core.borrow();
            let rule = if options.target.is_some() {
                Route::Default
            } else {
                let request = RouteRequest {
                    intent,
                    message: message.as_any(),
                    type_name: message.type_name(),
                    cluster: options.cluster.as_deref(),
                };
                core.rules
                    .iter()
                    .map(|rule| rule.route(&request))
                    .find(|route| *route != Route::Default)
                    .unwrap_or(Route::Default)
            };
            resolve(
                &core.directory,
                options.target.as_deref(),
                rule,
                options.cluster.as_deref(),
            )
        };
        let scope = match scope {
            Ok(scope) => scope,
            Err(error) => return ready(Err(error)),
        };
        let permit = Permit::new(&self.in_flight);
        let attempt = Attempts {
            core: Rc::clone(&self.core),
            changed: Arc::clone(&self.changed),
            job: Rc::new(message),
            scope,
            intent,
            idempotent: options.idempotent,
            deadline,
            budget,
        };
        Box::pin(async move {
            let result = attempt.run().await;
            drop(permit);
            result
        })
    }
}

fn ready<T: 'static>(value: T) -> ResponseFuture<T> {
    Box::pin(std::future::ready(value))
}

/// Counts a message as held by the router while it lives.
struct Permit(Rc<Cell<usize>>);

impl Permit {
    fn new(count: &Rc<Cell<usize>>) -> Permit {
        count.set(count.get() + 1);
        Permit(Rc::clone(count))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// One message's way through the herd: choose, run, and retry within the deadline.
struct Attempts<J> {
    core: Rc<RefCell<Core>>,
    changed: Arc<Notify>,
    job: Rc<J>,
    scope: Scope,
    intent: Intent,
    idempotent: bool,
    deadline: Instant,
    budget: Duration,
}

impl<J: Job> Attempts<J> {
    async fn run(self) -> Result<J::Output, Error> {
        let explicit = matches!(self.scope, Scope::Endpoint(_));
        let mut excluded: Vec<Arc<str>> = Vec::new();
        let mut last_error: Option<Error> = None;
        let mut write_wait = WRITE_RETRY_FIRST_WAIT;
        loop {
            // Listen for changes before looking, so that none is missed in between.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let choice = self
                .core
                .borrow_mut()
                .choose(self.intent, &self.scope, &excluded);
            match choice {
                Ok(endpoint) => {
                    let failure = match endpoint
                        .execute(Rc::clone(&self.job), self.deadline, self.budget)
                        .await
                    {
                        Ok(output) => return Ok(output),
                        Err(failure) => failure,
                    };
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
                    match decision {
                        Retry::Elsewhere => excluded.push(Arc::clone(endpoint.name())),
                        _ => {
                            let pause = write_wait.min(self.deadline - Instant::now());
                            write_wait = (write_wait * 2).min(WRITE_RETRY_MAX_WAIT);
                            let _ = tokio::time::timeout(pause, changed).await;
                        }
                    }
                }
                Err(Decision::Wait(why)) => {
                    if tokio::time::timeout_at(self.deadline, changed)
                        .await
                        .is_err()
                    {
                        return Err(last_error.unwrap_or_else(|| {
                            Error::new(ErrorKind::NoTarget).with_detail(format!(
                                "{why}, and nothing changed within the deadline of {}",
                                humantime::format_duration(self.budget)
                            ))
                        }));
                    }
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

impl Actor for RouterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The mailbox only holds cheap decisions; the real bound is `queue_capacity`, enforced
        // on the messages the router holds.
        let capacity = self.core.borrow().settings.queue_capacity;
        ctx.set_mailbox_capacity(capacity);
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
    type Result = ResponseFuture<Result<crate::query::Written, Error>>;

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

/// A (re)started database actor's endpoint replaces the previous one of that name.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Attach(pub(crate) Endpoint);

impl Handler<Attach> for RouterActor {
    type Result = ();

    fn handle(&mut self, Attach(endpoint): Attach, _ctx: &mut Context<Self>) {
        if self.core.borrow_mut().attach(endpoint) {
            self.changed.notify_waiters();
        }
    }
}

/// A database actor ended: its endpoint leaves the table, unless a newer one replaced it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Detach {
    pub(crate) name: Arc<str>,
    pub(crate) generation: u64,
}

impl Handler<Detach> for RouterActor {
    type Result = ();

    fn handle(&mut self, detach: Detach, _ctx: &mut Context<Self>) {
        if self
            .core
            .borrow_mut()
            .detach(&detach.name, detach.generation)
        {
            self.changed.notify_waiters();
        }
    }
}

/// From now on, every new message is answered with a [`Stopped`](ErrorKind::Stopped) error
/// saying `reason`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Halt {
    pub(crate) reason: String,
}

impl Handler<Halt> for RouterActor {
    type Result = ();

    fn handle(&mut self, halt: Halt, _ctx: &mut Context<Self>) {
        self.stopped = Some(halt.reason);
    }
}

/// Stops taking messages and answers once those it holds have finished, or `grace` passed.
/// Answers how many were still running.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub(crate) struct Drain {
    pub(crate) grace: Duration,
}

impl Handler<Drain> for RouterActor {
    type Result = ResponseFuture<usize>;

    fn handle(&mut self, drain: Drain, _ctx: &mut Context<Self>) -> Self::Result {
        self.stopped
            .get_or_insert_with(|| "the herd is shutting down".to_owned());
        let in_flight = Rc::clone(&self.in_flight);
        let deadline = Instant::now() + drain.grace;
        Box::pin(async move {
            while in_flight.get() > 0 && Instant::now() < deadline {
                tokio::time::sleep(DRAIN_POLL).await;
            }
            in_flight.get()
        })
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
    /// Whether it can be reached.
    pub reachability: Reachability,
    /// Messages running on it now.
    pub outstanding: usize,
    /// The recent average query latency, once there is a sample.
    pub latency: Option<Duration>,
}

impl Handler<GetRoutes> for RouterActor {
    type Result = actix::MessageResult<GetRoutes>;

    fn handle(&mut self, _: GetRoutes, _ctx: &mut Context<Self>) -> Self::Result {
        let core = self.core.borrow();
        actix::MessageResult(
            core.endpoints
                .iter()
                .map(|endpoint| RouteEntry {
                    name: Arc::clone(endpoint.name()),
                    role: endpoint.role(),
                    cluster: Arc::from(endpoint.cluster()),
                    reachability: endpoint.state().reachability(),
                    outstanding: endpoint.state().outstanding(),
                    latency: endpoint.state().latency(),
                })
                .collect(),
        )
    }
}

/// Asks how many messages the router holds now.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "usize")]
pub struct GetInFlight;

impl Handler<GetInFlight> for RouterActor {
    type Result = usize;

    fn handle(&mut self, _: GetInFlight, _ctx: &mut Context<Self>) -> usize {
        self.in_flight.get()
    }
}

impl Handler<Stop> for RouterActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        actix::ActorContext::stop(ctx);
    }
}
