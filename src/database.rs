//! `DatabaseActor`: one per endpoint. It owns the endpoint's connection pool for the lifetime of
//! its generation, and stops (to be restarted afresh by the supervisor) when its state can no
//! longer be trusted. An unreachable database is not a crash: the actor stays up, the health
//! actor probes the endpoint, and the pool reconnects when it answers again.
//!
//! Queries do not pass through this actor's mailbox: the routing core runs each one as a future
//! on the endpoint's pool (see [`Endpoint::execute`]), so any number run at once and a busy
//! endpoint never delays another's messages.

use std::sync::Arc;

use actix::{Actor, Addr, AsyncContext as _, Context, Handler, Message, Recipient};

mod endpoint;
pub(crate) mod pool;
mod tls;

pub use endpoint::CANCEL_GRACE;
pub(crate) use endpoint::{Endpoint, EndpointParts, Failure};
pub(crate) use pool::Connector;
pub use pool::APPLICATION_NAME;
pub(crate) use tls::Tls;

use crate::{
    child::{ChildExited, ChildId, ExitGuard, ExitReason, Stop},
    error::Error,
    health::ProbeRequests,
    settings::{EndpointSettings, PoolSettings},
};

/// What a database actor is built from: an endpoint's settings, checked and turned into driver
/// configuration once, when the herd starts.
#[derive(Clone)]
pub(crate) struct DatabaseSpec {
    pub(crate) name: Arc<str>,
    pub(crate) settings: EndpointSettings,
    pub(crate) pool: PoolSettings,
    connector: Arc<Connector>,
}

impl std::fmt::Debug for DatabaseSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSpec")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl DatabaseSpec {
    /// Checks what can be checked before connecting (TLS files, the password source).
    pub(crate) fn new(
        name: &str,
        settings: &EndpointSettings,
        pool: &PoolSettings,
    ) -> Result<DatabaseSpec, Error> {
        let (tls, mode) = Tls::for_endpoint(name, settings)?;
        let connector = Arc::new(Connector::new(name, settings, &tls, mode, pool)?);
        Ok(DatabaseSpec {
            name: Arc::from(name),
            settings: settings.clone(),
            pool: pool.clone(),
            connector,
        })
    }

    /// How to open connections to this endpoint outside its pool.
    pub(crate) fn connector(&self) -> Arc<Connector> {
        Arc::clone(&self.connector)
    }
}

/// What a database actor hears from the futures running on its pool.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) enum DatabaseReport {
    /// Code run for a message panicked: stop, so that the supervisor starts afresh.
    Poisoned {
        /// What happened.
        reason: String,
    },
}

/// The actor that owns one endpoint's pool.
pub struct DatabaseActor {
    endpoint: Endpoint,
    guard: ExitGuard,
}

impl std::fmt::Debug for DatabaseActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseActor")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl DatabaseActor {
    /// Builds the endpoint's pool and starts its actor. Returns the actor's address and the
    /// endpoint handle the routing core uses.
    pub(crate) fn launch(
        spec: &DatabaseSpec,
        generation: u64,
        supervisor: Recipient<ChildExited>,
        probes: Arc<ProbeRequests>,
    ) -> Result<(Addr<DatabaseActor>, Endpoint), Error> {
        let pool = pool::build(&spec.name, &spec.pool, &spec.connector)?;
        let mut launched = None;
        let address = DatabaseActor::create(|ctx| {
            let endpoint = Endpoint::new(EndpointParts {
                name: Arc::clone(&spec.name),
                role: spec.settings.role,
                cluster: Arc::from(spec.settings.cluster.as_str()),
                weight: spec.settings.weight,
                generation,
                pool,
                connector: Arc::clone(&spec.connector),
                reports: ctx.address().recipient(),
                probes,
            });
            launched = Some(endpoint.clone());
            DatabaseActor {
                endpoint,
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
}

/// The server's own message when there is one: the driver's `Display` says only "db error".
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
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

    fn started(&mut self, _ctx: &mut Context<Self>) {
        tracing::debug!(endpoint = %self.endpoint.name(), generation = self.guard.generation(), "database actor started");
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Whatever still holds this handle must stop using it; a restart brings a new one.
        self.endpoint.retire();
        self.endpoint.pool().close();
    }
}

impl Handler<DatabaseReport> for DatabaseActor {
    type Result = ();

    fn handle(&mut self, report: DatabaseReport, ctx: &mut Context<Self>) {
        match report {
            DatabaseReport::Poisoned { reason } => {
                tracing::warn!(endpoint = %self.endpoint.name(), %reason, "stopping to be restarted");
                self.guard.set_reason(ExitReason::Poisoned(reason));
                actix::ActorContext::stop(ctx);
            }
        }
    }
}

impl Handler<Stop> for DatabaseActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        actix::ActorContext::stop(ctx);
    }
}
