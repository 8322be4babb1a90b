//! `Herd`: the handle an application keeps. It starts the supervisor (which starts everything
//! else) and gives access to the router.

use std::{fmt, sync::Arc, time::Duration};

use actix::{Addr, Recipient};
use tokio::time::Instant;

use crate::{
    database::DatabaseSpec,
    error::{Error, ErrorKind},
    health::{
        AcceptPrimary, EndpointHealth, FailoverEvent, GetHealth, HealthState, Readmit,
        StateChanged, SubscribeFailover, SubscribeState,
    },
    position::Position,
    query::Request,
    router::{Directory, RouteEntry, RouterActor, RoutingRule, SessionPositions},
    session::Session,
    settings::Settings,
    supervisor::{Shared, Shutdown, Subscribe, SupervisorActor, SupervisorEvent, SupervisorParts},
};

/// How often [`Herd::wait_ready`] looks.
const READY_POLL: Duration = Duration::from_millis(20);

/// A running herd: cheap to clone, safe to share (e.g. as `web::Data<Herd>`).
///
/// Start it once, inside an actix `System` (`#[actix_web::main]` or `#[actix::main]`), before
/// `HttpServer::new`: a herd started inside the server factory would be started once per worker.
///
/// ```no_run
/// use pgherd::{Herd, Read, Settings};
///
/// #[actix::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let herd = Herd::start(Settings::load("Settings.toml")?)?;
///     let rows = herd.send(Read::new("SELECT 1")).await?;
///     herd.shutdown().await;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Herd {
    supervisor: Addr<SupervisorActor>,
    shared: Arc<Shared>,
    endpoints: Arc<[Arc<str>]>,
    clusters: Arc<[Arc<str>]>,
    _last: Arc<LastHandle>,
}

/// Shuts the herd down when the last handle is dropped without [`Herd::shutdown`]: its actors,
/// pools, probes and health thread would otherwise run on with nobody to use them.
struct LastHandle(Addr<SupervisorActor>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        self.0.do_send(Shutdown);
    }
}

/// An answer with the position its write reached.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Tracked<T> {
    /// The message's answer.
    pub value: T,
    /// The position the write reached; `None` for a read, or if it could not be read.
    pub position: Option<Position>,
}

impl fmt::Debug for Herd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Herd")
            .field("endpoints", &self.endpoints)
            .field("failure", &self.shared.failure())
            .finish_non_exhaustive()
    }
}

impl Herd {
    /// Validates `settings` and starts the herd: one database actor per endpoint, then the router,
    /// under a supervisor. Connections are opened on demand; see [`wait_ready`](Self::wait_ready).
    ///
    /// # Errors
    ///
    /// A [`Config`](ErrorKind::Config) error when the settings are invalid, a TLS file cannot be
    /// used, or no actix `System` is running.
    pub fn start(settings: Settings) -> Result<Herd, Error> {
        Herd::builder(settings).start()
    }

    /// A builder, to add routing rules or event subscribers before starting.
    pub fn builder(settings: Settings) -> HerdBuilder {
        HerdBuilder {
            settings,
            rules: Vec::new(),
            subscribers: Vec::new(),
            state_subscribers: Vec::new(),
            failover_subscribers: Vec::new(),
        }
    }

    /// The router's address: send it [`Routed`](crate::Routed), [`Read`](crate::Read),
    /// [`Write`](crate::Write), [`Batch`](crate::Batch) or [`Transact`](crate::Transact).
    ///
    /// If the router crashes (a bug) it is restarted with a new address: keep the `Herd`, and
    /// call this (or [`send`](Self::send)) when you need the router.
    pub fn router(&self) -> Addr<RouterActor> {
        self.shared.router()
    }

    /// Routes `message` ([`Routed`](crate::Routed), [`Read`](crate::Read),
    /// [`Write`](crate::Write), [`Batch`](crate::Batch) or [`Transact`](crate::Transact)) and
    /// waits for its answer.
    ///
    /// Exactly what sending it to [`router`](Self::router) does, run on the caller's task: it
    /// saves the hop through the router's mailbox and the task that answers there. The future
    /// is not `Send`: await it in an actix handler or task, not in `tokio::spawn`.
    ///
    /// # Errors
    ///
    /// The message's own error, or a [`Stopped`](ErrorKind::Stopped) error saying why the herd
    /// stopped.
    pub async fn send<M: Request>(&self, message: M) -> Result<M::Output, Error> {
        Arc::clone(&self.shared.routing).dispatch(message).await
    }

    /// Like [`send`](Self::send), also returning the position a write reached (for a read,
    /// `None`): send a later read [`after`](crate::Routable::after) it to read your write.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub async fn send_tracked<M: Request>(&self, message: M) -> Result<Tracked<M::Output>, Error> {
        let (value, position) = Arc::clone(&self.shared.routing)
            .dispatch_tracked(message, None)
            .await?;
        Ok(Tracked { value, position })
    }

    /// Sends `message` within a session: see [`Session::send`].
    pub(crate) async fn send_in_session<M: Request>(
        &self,
        message: M,
        session: &SessionPositions,
    ) -> Result<M::Output, Error> {
        Arc::clone(&self.shared.routing)
            .dispatch_tracked(message, Some(session))
            .await
            .map(|(output, _)| output)
    }

    /// A session: it remembers the position of its last write and sends its reads after it, so
    /// that it reads its own writes wherever the reads run, without a time window.
    pub fn session(&self) -> Session {
        Session::new(self.clone())
    }

    /// The health of every endpoint, as the health actor sees it now.
    ///
    /// # Errors
    ///
    /// A [`Stopped`](ErrorKind::Stopped) error when the health actor is gone.
    pub async fn health(&self) -> Result<Vec<EndpointHealth>, Error> {
        Ok(self.shared.health().send(GetHealth).await?)
    }

    /// Makes `endpoint` the primary of its cluster: an operator's decision, e.g. a failback after
    /// a backup took the writes (with `failback = "manual"`). It must be up and out of recovery;
    /// every other writable endpoint of its cluster is fenced.
    ///
    /// # Errors
    ///
    /// When the endpoint is unknown, not up, or in recovery.
    pub async fn accept_primary(&self, endpoint: &str) -> Result<(), Error> {
        self.shared
            .health()
            .send(AcceptPrimary {
                endpoint: endpoint.to_owned(),
            })
            .await?
    }

    /// Lets a fenced endpoint have traffic again: an operator's decision, once its data has been
    /// reconciled (or it was turned into a standby).
    ///
    /// # Errors
    ///
    /// When the endpoint is unknown or not fenced.
    pub async fn readmit(&self, endpoint: &str) -> Result<(), Error> {
        self.shared
            .health()
            .send(Readmit {
                endpoint: endpoint.to_owned(),
            })
            .await?
    }

    /// Subscribes `recipient` to [`StateChanged`] events.
    pub fn subscribe_state(&self, recipient: Recipient<StateChanged>) {
        self.supervisor.do_send(SubscribeState(recipient));
    }

    /// Subscribes `recipient` to [`FailoverEvent`]s.
    pub fn subscribe_failover(&self, recipient: Recipient<FailoverEvent>) {
        self.supervisor.do_send(SubscribeFailover(recipient));
    }

    /// The status of replication to each target (empty when the replicator is off): state,
    /// applied position, lag. See [`ReplicationStatus`](crate::ReplicationStatus).
    pub fn replication(&self) -> Vec<crate::ReplicationStatus> {
        self.shared
            .replication
            .values()
            .map(|status| status.status())
            .collect()
    }

    /// Fault injection for tests (feature `testkit`): the replication loop of `target` panics
    /// once, just before its next commit on the target (a batch, or an initial copy), as a bug
    /// would. The supervisor restarts the replicator, and the batch is applied again from the
    /// target's progress row. Returns `false` when `target` is not a replication target.
    #[cfg(feature = "testkit")]
    pub fn inject_replicator_panic(&self, target: &str) -> bool {
        self.shared
            .replication
            .get(target)
            .map(|shared| {
                shared
                    .panic_before_commit
                    .store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .is_some()
    }

    /// Why the herd stopped (shut down, or its supervisor gave up), once it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// The router's view of every running endpoint.
    pub fn routes(&self) -> Vec<RouteEntry> {
        self.shared.routing.routes()
    }

    /// Waits until every endpoint is up and every cluster has an accepted primary, for at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// A [`NoTarget`](ErrorKind::NoTarget) error naming what was not ready in time.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let routes = self.routes();
            let mut waiting: Vec<String> = self
                .endpoints
                .iter()
                .filter(|name| {
                    !routes
                        .iter()
                        .any(|r| &r.name == *name && r.health == HealthState::Up)
                })
                .map(|name| format!("`{name}`"))
                .collect();
            for cluster in self.clusters.iter() {
                if !routes.iter().any(|r| &r.cluster == cluster && r.primary) {
                    waiting.push(format!("a primary for cluster `{cluster}`"));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::new(ErrorKind::NoTarget).with_detail(format!(
                    "not reached within {}: {}",
                    humantime::format_duration(timeout),
                    waiting.join(", ")
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Subscribes `recipient` to the supervisor's events (restarts, giving up, shutdown).
    pub fn subscribe(&self, recipient: Recipient<SupervisorEvent>) {
        self.supervisor.do_send(Subscribe(recipient));
    }

    /// The supervisor's address.
    pub fn supervisor(&self) -> &Addr<SupervisorActor> {
        &self.supervisor
    }

    /// Shuts the herd down: new messages are refused, messages in flight may finish within
    /// `supervisor.shutdown_grace`, then pools are closed and the actors stop. Returns how many
    /// messages had not finished in time.
    pub async fn shutdown(&self) -> usize {
        self.supervisor.send(Shutdown).await.unwrap_or(0)
    }
}

/// Starts a [`Herd`] with routing rules or event subscribers.
#[must_use = "a builder does nothing until `start` is called"]
pub struct HerdBuilder {
    settings: Settings,
    rules: Vec<Box<dyn RoutingRule>>,
    subscribers: Vec<Recipient<SupervisorEvent>>,
    state_subscribers: Vec<Recipient<StateChanged>>,
    failover_subscribers: Vec<Recipient<FailoverEvent>>,
}

impl fmt::Debug for HerdBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HerdBuilder")
            .field("settings", &self.settings)
            .field("rules", &self.rules.len())
            .field("subscribers", &self.subscribers.len())
            .finish_non_exhaustive()
    }
}

impl HerdBuilder {
    /// Adds a routing rule; rules are consulted in the order added, for messages without an
    /// explicit target, and the first with an opinion wins.
    pub fn rule(mut self, rule: impl RoutingRule) -> Self {
        self.rules.push(Box::new(rule));
        self
    }

    /// Subscribes `recipient` to the supervisor's events from the very start.
    pub fn subscribe(mut self, recipient: Recipient<SupervisorEvent>) -> Self {
        self.subscribers.push(recipient);
        self
    }

    /// Subscribes `recipient` to the endpoints' [`StateChanged`] events from the very start.
    pub fn subscribe_state(mut self, recipient: Recipient<StateChanged>) -> Self {
        self.state_subscribers.push(recipient);
        self
    }

    /// Subscribes `recipient` to [`FailoverEvent`]s from the very start.
    pub fn subscribe_failover(mut self, recipient: Recipient<FailoverEvent>) -> Self {
        self.failover_subscribers.push(recipient);
        self
    }

    /// Starts the herd. See [`Herd::start`].
    ///
    /// # Errors
    ///
    /// As [`Herd::start`].
    pub fn start(self) -> Result<Herd, Error> {
        if actix::System::try_current().is_none() {
            return Err(Error::new(ErrorKind::Config).with_detail(
                "no actix System is running: start the herd inside #[actix_web::main] or \
                 #[actix::main] (a plain #[tokio::main] has no System)",
            ));
        }
        self.settings
            .validate()
            .map_err(|error| Error::new(ErrorKind::Config).with_detail(error.to_string()))?;
        let specs = self
            .settings
            .endpoints
            .iter()
            .map(|(name, endpoint)| {
                DatabaseSpec::new(name, endpoint, &self.settings.pool_for(name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = specs.iter().map(|spec| Arc::clone(&spec.name)).collect();
        let clusters = self
            .settings
            .clusters()
            .into_iter()
            .map(Arc::from)
            .collect();
        let (supervisor, shared) = SupervisorActor::launch(SupervisorParts {
            specs,
            directory: Directory::from_settings(&self.settings),
            router: self.settings.router.clone(),
            supervisor: self.settings.supervisor.clone(),
            health: self.settings.health.clone(),
            failover: self.settings.failover.clone(),
            replicator: self.settings.replicator.clone(),
            targets: self
                .settings
                .replication_targets()
                .into_iter()
                .map(|(name, _)| Arc::from(name))
                .collect(),
            rules: self.rules.into(),
            subscribers: self.subscribers,
            state_subscribers: self.state_subscribers,
            failover_subscribers: self.failover_subscribers,
        })?;
        Ok(Herd {
            _last: Arc::new(LastHandle(supervisor.clone())),
            supervisor,
            shared,
            endpoints,
            clusters,
        })
    }
}
