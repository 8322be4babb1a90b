//! `DatabaseActor`: one per endpoint. It owns the endpoint's connection pool, learns whether the
//! endpoint can be reached, and reconnects with backoff when it cannot. An unreachable database
//! is not a crash: the actor stays up.
//!
//! Queries do not pass through this actor's mailbox: the router runs each one as a detached
//! future on the endpoint's pool (see [`Endpoint::execute`]), so any number run at once and a
//! busy endpoint never delays another's messages. The actor hears of connection failures from
//! those futures and probes the endpoint on a connection of its own, never through the pool (a
//! saturated pool is not a dead server).

use std::{sync::Arc, time::Duration};

use actix::{
    Actor, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler, Message, Recipient,
    WrapFuture as _,
};
use tokio::sync::Notify;

mod endpoint;
mod pool;
mod tls;

pub(crate) use endpoint::{Endpoint, EndpointParts};
pub use endpoint::{Reachability, CANCEL_GRACE};
pub use pool::APPLICATION_NAME;
pub(crate) use tls::Tls;

use crate::{
    backoff::Backoff,
    child::{ChildExited, ChildId, ExitGuard, ExitReason, Stop},
    error::Error,
    settings::{EndpointSettings, PoolSettings, Role},
};

/// What a database actor is built from: an endpoint's settings, checked and turned into driver
/// configuration once, when the herd starts.
#[derive(Debug, Clone)]
pub(crate) struct DatabaseSpec {
    pub(crate) name: Arc<str>,
    pub(crate) settings: EndpointSettings,
    pub(crate) pool: PoolSettings,
    tls: Tls,
    mode: tokio_postgres::config::SslMode,
}

impl DatabaseSpec {
    /// Checks what can be checked before connecting (TLS files, the password source).
    pub(crate) fn new(
        name: &str,
        settings: &EndpointSettings,
        pool: &PoolSettings,
    ) -> Result<DatabaseSpec, Error> {
        let (tls, mode) = Tls::for_endpoint(name, settings)?;
        Ok(DatabaseSpec {
            name: Arc::from(name),
            settings: settings.clone(),
            pool: pool.clone(),
            tls,
            mode,
        })
    }
}

/// What a database actor reports to itself from the futures running on its pool.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) enum DatabaseReport {
    /// A query met a connection failure: probe now.
    ConnectionFailed,
    /// Code run for a message panicked: stop, so that the supervisor starts afresh.
    Poisoned {
        /// What happened.
        reason: String,
    },
}

/// Asks a database actor how its endpoint is doing.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "EndpointStatus")]
pub struct GetEndpointStatus;

/// How an endpoint is doing, as its database actor sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The endpoint's name.
    pub name: Arc<str>,
    /// Its role in the settings.
    pub role: Role,
    /// Whether it can be reached.
    pub reachability: Reachability,
    /// Messages running on it now.
    pub outstanding: usize,
    /// The recent average query latency, once there is a sample.
    pub latency: Option<Duration>,
    /// Connections open, idle, and callers waiting for one.
    pub pool: deadpool_postgres::Status,
    /// How many times the actor was started (1 for the first start).
    pub generation: u64,
}

/// The actor that owns one endpoint's pool.
pub struct DatabaseActor {
    endpoint: Endpoint,
    connector: Arc<pool::Connector>,
    backoff: Backoff,
    probe_timeout: Duration,
    probing: bool,
    guard: ExitGuard,
}

impl std::fmt::Debug for DatabaseActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseActor")
            .field("endpoint", &self.endpoint)
            .field("probing", &self.probing)
            .field("failures", &self.backoff.failures())
            .finish_non_exhaustive()
    }
}

impl DatabaseActor {
    /// Builds the endpoint's pool and starts its actor. Returns the actor's address and the
    /// endpoint handle the router uses.
    pub(crate) fn launch(
        spec: &DatabaseSpec,
        generation: u64,
        supervisor: Recipient<ChildExited>,
        changed: Arc<Notify>,
    ) -> Result<(Addr<DatabaseActor>, Endpoint), Error> {
        let (pool, connector) =
            pool::build(&spec.name, &spec.settings, &spec.pool, &spec.tls, spec.mode)?;
        let mut launched = None;
        let address = DatabaseActor::create(|ctx| {
            let endpoint = Endpoint::new(EndpointParts {
                name: Arc::clone(&spec.name),
                role: spec.settings.role,
                cluster: Arc::from(spec.settings.cluster.as_str()),
                weight: spec.settings.weight,
                generation,
                pool,
                tls: spec.tls.clone(),
                reports: ctx.address().recipient(),
                changed,
            });
            launched = Some(endpoint.clone());
            DatabaseActor {
                endpoint,
                connector,
                backoff: Backoff::new(spec.pool.reconnect_backoff, spec.pool.reconnect_backoff_max),
                probe_timeout: spec.pool.connect_timeout,
                probing: false,
                guard: ExitGuard::new(
                    supervisor,
                    ChildId::Database(Arc::clone(&spec.name)),
                    generation,
                ),
            }
        });
        match launched {
            Some(endpoint) => Ok((address, endpoint)),
            None => Err(Error::stopped("the database actor did not start")),
        }
    }

    /// Connects once, outside the pool; on failure the endpoint gets no traffic and the probe
    /// repeats after a growing wait.
    fn probe(&mut self, ctx: &mut Context<Self>) {
        if self.probing {
            return;
        }
        self.probing = true;
        let connector = Arc::clone(&self.connector);
        let timeout = self.probe_timeout;
        let check = async move {
            match tokio::time::timeout(timeout, connector.check()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(describe(&error)),
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )),
            }
        };
        ctx.spawn(check.into_actor(self).map(|result, actor, ctx| {
            actor.probing = false;
            actor.probed(result, ctx);
        }));
    }

    fn probed(&mut self, result: Result<(), String>, ctx: &mut Context<Self>) {
        let name = self.endpoint.name();
        match result {
            Ok(()) => {
                self.backoff.reset();
                if self.endpoint.set_reachability(Reachability::Reachable)
                    == Reachability::Unreachable
                {
                    tracing::info!(endpoint = %name, "reachable again");
                }
            }
            Err(reason) => {
                let wait = self.backoff.fail();
                if self
                    .endpoint
                    .set_reachability(Reachability::Unreachable)
                    .is_available()
                {
                    tracing::warn!(endpoint = %name, %reason, "unreachable; no traffic until it answers");
                }
                tracing::debug!(endpoint = %name, %reason, ?wait, "probe failed");
                // Idle connections to a server that cannot be reached are dead weight.
                self.endpoint.pool().retain(|_, _| false);
                ctx.run_later(wait, |actor, ctx| actor.probe(ctx));
            }
        }
    }
}

/// The server's own message when there is one: the driver's `Display` says only "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

impl Actor for DatabaseActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(endpoint = %self.endpoint.name(), generation = self.guard.generation(), "database actor started");
        self.probe(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Whatever still holds this handle must stop using it; new handles come with the restart.
        self.endpoint.set_reachability(Reachability::Retired);
        self.endpoint.pool().close();
    }
}

impl Handler<DatabaseReport> for DatabaseActor {
    type Result = ();

    fn handle(&mut self, report: DatabaseReport, ctx: &mut Context<Self>) {
        match report {
            DatabaseReport::ConnectionFailed => self.probe(ctx),
            DatabaseReport::Poisoned { reason } => {
                tracing::warn!(endpoint = %self.endpoint.name(), %reason, "stopping to be restarted");
                self.guard.set_reason(ExitReason::Poisoned(reason));
                actix::ActorContext::stop(ctx);
            }
        }
    }
}

impl Handler<GetEndpointStatus> for DatabaseActor {
    type Result = actix::MessageResult<GetEndpointStatus>;

    fn handle(&mut self, _: GetEndpointStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let state = self.endpoint.state();
        actix::MessageResult(EndpointStatus {
            name: Arc::clone(self.endpoint.name()),
            role: self.endpoint.role(),
            reachability: state.reachability(),
            outstanding: state.outstanding(),
            latency: state.latency(),
            pool: self.endpoint.pool().status(),
            generation: self.endpoint.generation(),
        })
    }
}

impl Handler<Stop> for DatabaseActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        actix::ActorContext::stop(ctx);
    }
}
