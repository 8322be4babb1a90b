//! `Herd`: the handle an application keeps. It starts the supervisor (which starts everything
//! else) and gives access to the router.

use std::{fmt, sync::Arc, time::Duration};

use actix::{Addr, Recipient};
use tokio::time::Instant;

use crate::{
    database::{DatabaseSpec, Reachability},
    error::{Error, ErrorKind},
    query::Request,
    router::{Directory, RouteEntry, RouterActor, RoutingRule},
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

    /// Why the herd stopped (shut down, or its supervisor gave up), once it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// The router's view of every running endpoint.
    pub fn routes(&self) -> Vec<RouteEntry> {
        self.shared.routing.routes()
    }

    /// Waits until every endpoint was reached at least once, for at most `timeout`.
    ///
    /// # Errors
    ///
    /// A [`NoTarget`](ErrorKind::NoTarget) error naming the endpoints not reached in time.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let routes = self.routes();
            let waiting: Vec<String> = self
                .endpoints
                .iter()
                .filter(|name| {
                    !routes
                        .iter()
                        .any(|r| &r.name == *name && r.reachability == Reachability::Reachable)
                })
                .map(|name| format!("`{name}`"))
                .collect();
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
}

impl fmt::Debug for HerdBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HerdBuilder")
            .field("settings", &self.settings)
            .field("rules", &self.rules.len())
            .field("subscribers", &self.subscribers.len())
            .finish()
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
        let (supervisor, shared) = SupervisorActor::launch(SupervisorParts {
            specs,
            directory: Directory::from_settings(&self.settings),
            router: self.settings.router.clone(),
            supervisor: self.settings.supervisor.clone(),
            rules: self.rules.into(),
            subscribers: self.subscribers,
        })?;
        Ok(Herd {
            supervisor,
            shared,
            endpoints,
        })
    }
}
