//! Building an endpoint's deadpool-postgres pool from a `tokio_postgres::Config` of our own
//! (deadpool's own `Config` drops `target_session_attrs` and prints the password in `Debug`).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use deadpool_postgres::{Connect, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, NoTls};

use super::tls::Tls;
use crate::{
    error::{Error, ErrorKind},
    settings::{EndpointSettings, PoolSettings},
};

/// The `application_name` pgherd's connections show in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "pgherd";

/// The driver configuration of an endpoint (without its password, which is read at each
/// connection attempt).
pub(crate) fn driver_config(
    endpoint: &EndpointSettings,
    pool: &PoolSettings,
    mode: tokio_postgres::config::SslMode,
) -> Config {
    let mut config = Config::new();
    config
        .host(&endpoint.host)
        .port(endpoint.port)
        .dbname(&endpoint.dbname)
        .user(&endpoint.user)
        .application_name(APPLICATION_NAME)
        .ssl_mode(mode)
        .connect_timeout(pool.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    config
}

/// Builds the pool of an endpoint over `connector`. Nothing connects yet.
///
/// # Errors
///
/// A [`Config`](ErrorKind::Config) error when the pool cannot be built.
pub(crate) fn build(
    name: &str,
    pool: &PoolSettings,
    connector: &Arc<Connector>,
) -> Result<Pool, Error> {
    let manager = Manager::from_connect(
        connector.config.clone(),
        SharedConnector(Arc::clone(connector)),
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(pool.max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(pool.wait_timeout))
        .create_timeout(Some(pool.connect_timeout))
        .recycle_timeout(Some(pool.recycle_timeout))
        .build()
        .map_err(|e| {
            Error::new(ErrorKind::Config).with_detail(format!("endpoints.{name}: pool: {e}"))
        })
}

/// Opens connections, reading the password at each attempt so that a rotated password file or
/// variable is picked up without a restart.
pub(crate) struct Connector {
    config: Config,
    endpoint: EndpointSettings,
    key: String,
    /// The last password that could be read, used when the source becomes unreadable.
    last_password: Mutex<Option<SecretString>>,
    tls: Tls,
}

impl Connector {
    pub(crate) fn new(
        name: &str,
        endpoint: &EndpointSettings,
        tls: &Tls,
        mode: tokio_postgres::config::SslMode,
        pool: &PoolSettings,
    ) -> Result<Connector, Error> {
        let key = format!("endpoints.{name}");
        let password = endpoint
            .resolve_password(&key)
            .map_err(|problem| Error::new(ErrorKind::Config).with_detail(problem.to_string()))?;
        Ok(Connector {
            config: driver_config(endpoint, pool, mode),
            endpoint: endpoint.clone(),
            key,
            last_password: Mutex::new(password),
            tls: tls.clone(),
        })
    }

    /// How connections are encrypted.
    pub(crate) fn tls(&self) -> &Tls {
        &self.tls
    }

    /// The driver's settings with the current password, for a connection this crate opens
    /// itself (the replication stream).
    pub(crate) fn config_with_password(&self) -> Config {
        let mut config = self.config.clone();
        if let Some(password) = self.password() {
            config.password(password.expose_secret());
        }
        config
    }

    /// Opens one connection outside any pool (for probes and promotions). The connection
    /// closes when the client is dropped.
    pub(crate) async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, _driver) = self.open(&self.config).await?;
        Ok(client)
    }

    /// Opens a connection that listens on `channel` and calls `wake` on every notification
    /// (a pooled connection drops notifications). The listening stops when the client is
    /// dropped.
    pub(crate) async fn listen(
        &self,
        channel: &str,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<Client, tokio_postgres::Error> {
        let mut config = self.config.clone();
        if let Some(password) = self.password() {
            config.password(password.expose_secret());
        }
        let client = match &self.tls {
            Tls::Plain => {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(forward(connection, wake));
                client
            }
            Tls::Rustls(connector) => {
                let (client, connection) = config.connect(connector.clone()).await?;
                tokio::spawn(forward(connection, wake));
                client
            }
        };
        client
            .batch_execute(&format!("LISTEN {}", crate::sql::quote_ident(channel)))
            .await?;
        Ok(client)
    }

    fn open(
        &self,
        pg_config: &Config,
    ) -> BoxFuture<'static, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let mut config = pg_config.clone();
        if let Some(password) = self.password() {
            config.password(password.expose_secret());
        }
        let tls = self.tls.clone();
        Box::pin(async move {
            match tls {
                Tls::Plain => {
                    let (client, connection) = config.connect(NoTls).await?;
                    Ok((client, tokio::spawn(drive(connection))))
                }
                Tls::Rustls(connector) => {
                    let (client, connection) = config.connect(connector).await?;
                    Ok((client, tokio::spawn(drive(connection))))
                }
            }
        })
    }

    fn password(&self) -> Option<SecretString> {
        let mut last = self
            .last_password
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match self.endpoint.resolve_password(&self.key) {
            Ok(password) => {
                last.clone_from(&password);
                password
            }
            Err(problem) => {
                tracing::warn!(
                    %problem,
                    "cannot read the password again; connecting with the previous one"
                );
                last.clone()
            }
        }
    }
}

/// The connector, shared between the pool and the probes.
struct SharedConnector(Arc<Connector>);

impl Connect for SharedConnector {
    fn connect(
        &self,
        pg_config: &Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        self.0.open(pg_config)
    }
}

/// Drives a listening connection, waking the listener on each notification.
async fn forward<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    wake: Arc<tokio::sync::Notify>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt as _;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(_)) => wake.notify_one(),
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, "listening connection ended");
                break;
            }
        }
    }
    // Wake the listener so that it notices the loss and falls back to polling.
    wake.notify_one();
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended");
    }
}
