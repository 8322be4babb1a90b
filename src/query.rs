//! Query messages: what an application sends to the router.
//!
//! - A type implementing [`Query`] declares its SQL, parameters, output and [`Intent`], so routing
//!   never parses SQL; send it wrapped in [`Routed`] (`GetUser { id }.routed()`).
//! - [`Read`] and [`Write`] are ready-made messages for plain SQL with bound parameters.
//! - [`Batch`] runs statements atomically; [`Transact`] runs a closure in one transaction on the
//!   primary.
//!
//! Every message carries [`RouteOptions`] set through [`Routable`]: a deadline, an explicit
//! target endpoint, a cluster, an idempotent mark.
//!
//! ```
//! use pgherd::{Error, Intent, Params, Query, QueryResult};
//!
//! /// Looks a user's name up by id.
//! struct UserName {
//!     id: i64,
//! }
//!
//! impl Query for UserName {
//!     type Output = Option<String>;
//!     const INTENT: Intent = Intent::Read;
//!
//!     fn sql(&self) -> &str {
//!         "SELECT name FROM users WHERE id = $1"
//!     }
//!     fn params(&self) -> Params<'_> {
//!         vec![&self.id]
//!     }
//!     fn output(result: QueryResult) -> Result<Option<String>, Error> {
//!         Ok(result.optional::<(String,)>()?.map(|(name,)| name))
//!     }
//! }
//! ```

use std::{any::Any, fmt};

use actix::Message;
use deadpool_postgres::ClientWrapper;
use futures_util::TryStreamExt as _;
use tokio_postgres::{types::ToSql, Row};

mod job;
mod options;
mod plain;
mod row;
mod transaction;

pub(crate) use job::{Job, Progress, Stage};
pub use options::{Routable, RouteOptions};
pub use plain::{Read, Write, Written};
pub use row::{column, FromRow};
pub use transaction::{Batch, Transact, TxFuture};

use crate::error::Error;

/// Whether a message reads or writes. Declared by the message's type, never guessed from SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Intent {
    /// Reads only: may run on a standby or replica that fits, else on the primary.
    Read,
    /// May write: runs on the primary (or the endpoint named explicitly).
    Write,
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Intent::Read => "read",
            Intent::Write => "write",
        })
    }
}

/// A message the router accepts: [`Routed`], [`Read`], [`Write`], [`Batch`] and [`Transact`].
/// Sealed: pgherd's message types are the only ones. Use it to write code generic over them.
pub trait Request: Job + Routable {}

impl<T: Job + Routable> Request for T {}

/// Borrowed query parameters, in `$1, $2, ...` order.
pub type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

/// A typed query: SQL, parameters, intent and how to turn the result into its output.
///
/// See the [module documentation](self) for an example. Send it with
/// `router.send(query.routed())`.
pub trait Query: Send + 'static {
    /// What the query returns.
    type Output: Send + 'static;
    /// Read or write: decides where the query may run.
    const INTENT: Intent;

    /// The SQL text, with `$1, $2, ...` placeholders. Prepared once per connection and cached.
    fn sql(&self) -> &str;

    /// The parameters bound to the placeholders.
    fn params(&self) -> Params<'_>;

    /// Turns the result into the output.
    ///
    /// # Errors
    ///
    /// Typically a [`Mapping`](crate::ErrorKind::Mapping) error when a row does not fit.
    fn output(result: QueryResult) -> Result<Self::Output, Error>;

    /// This query as a message for the router.
    fn routed(self) -> Routed<Self>
    where
        Self: Sized,
    {
        Routed::new(self)
    }
}

/// The rows a statement returned and the number of rows it affected.
#[derive(Debug, Default)]
pub struct QueryResult {
    rows: Vec<Row>,
    rows_affected: u64,
}

impl QueryResult {
    /// The rows, as the driver returned them.
    pub fn rows(self) -> Vec<Row> {
        self.rows
    }

    /// How many rows the statement inserted, updated, deleted or returned.
    pub fn rows_affected(&self) -> u64 {
        self.rows_affected
    }

    /// Every row mapped into `T`.
    ///
    /// # Errors
    ///
    /// When a row does not fit `T`.
    pub fn all<T: FromRow>(self) -> Result<Vec<T>, Error> {
        T::from_rows(&self.rows)
    }

    /// Exactly one row, mapped into `T`.
    ///
    /// # Errors
    ///
    /// When there is not exactly one row, or it does not fit `T`.
    pub fn one<T: FromRow>(self) -> Result<T, Error> {
        match self.rows.as_slice() {
            [row] => T::from_row(row),
            rows => Err(Error::mapping(format!(
                "expected exactly one row, got {}",
                rows.len()
            ))),
        }
    }

    /// At most one row, mapped into `T`.
    ///
    /// # Errors
    ///
    /// When there is more than one row, or it does not fit `T`.
    pub fn optional<T: FromRow>(self) -> Result<Option<T>, Error> {
        match self.rows.as_slice() {
            [] => Ok(None),
            [row] => T::from_row(row).map(Some),
            rows => Err(Error::mapping(format!(
                "expected at most one row, got {}",
                rows.len()
            ))),
        }
    }
}

/// A typed [`Query`] on its way to the router, with its routing options.
///
/// ```no_run
/// # use pgherd::{Routable, Query};
/// # async fn demo<Q: Query>(router: actix::Addr<pgherd::RouterActor>, query: Q)
/// # -> Result<(), pgherd::Error> {
/// let output = router
///     .send(query.routed().timeout(std::time::Duration::from_secs(1)))
///     .await??;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Routed<Q> {
    query: Q,
    options: RouteOptions,
}

impl<Q: Query> Routed<Q> {
    /// Wraps `query` with default options.
    pub fn new(query: Q) -> Self {
        Routed {
            query,
            options: RouteOptions::default(),
        }
    }

    /// The query.
    pub fn query(&self) -> &Q {
        &self.query
    }
}

impl<Q: Query> Message for Routed<Q> {
    type Result = Result<Q::Output, Error>;
}

impl<Q: Query> Routable for Routed<Q> {
    fn options_mut(&mut self) -> &mut RouteOptions {
        &mut self.options
    }

    fn options(&self) -> &RouteOptions {
        &self.options
    }
}

impl<Q: Query> Job for Routed<Q> {
    type Output = Q::Output;

    fn intent(&self) -> Intent {
        Q::INTENT
    }

    fn as_any(&self) -> &dyn Any {
        &self.query
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<Q>()
    }

    async fn run(
        &self,
        client: &mut ClientWrapper,
        progress: &Progress,
    ) -> Result<Q::Output, Error> {
        let params = self.query.params();
        let track = Q::INTENT == Intent::Write;
        let result = statement(client, self.query.sql(), &params, progress, track).await?;
        Q::output(result)
    }
}

/// The position a write reached: read right after its commit, on its connection, with the WAL
/// page and segment sizes that [`Position::from_insert`] needs.
///
/// [`Position::from_insert`]: crate::position::Position::from_insert
pub(crate) const POSITION_SQL: &str = "SELECT pg_current_wal_insert_lsn(), \
     current_setting('wal_block_size')::bigint, \
     pg_size_bytes(current_setting('wal_segment_size'))";

/// The position in a row of [`POSITION_SQL`].
pub(crate) fn position_of(row: &tokio_postgres::Row) -> Option<crate::position::Position> {
    let lsn: tokio_postgres::types::PgLsn = row.try_get(0).ok()?;
    let block: i64 = row.try_get(1).ok()?;
    let segment: i64 = row.try_get(2).ok()?;
    Some(crate::position::Position::from_insert(
        u64::from(lsn),
        u64::try_from(block).unwrap_or(0),
        u64::try_from(segment).unwrap_or(0),
    ))
}

/// Prepares (through the connection's statement cache) and runs one statement outside any
/// explicit transaction, collecting its rows.
///
/// With `track`, the position after its commit is read in the same round trip: the position
/// query is sent right behind the statement, and the server runs it after the statement's
/// commit.
pub(crate) async fn statement(
    client: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    progress: &Progress,
    track: bool,
) -> Result<QueryResult, Error> {
    let prepared = client
        .prepare_cached(sql)
        .await
        .map_err(Error::from_postgres)?;
    // From here on the statement may run, and commits by itself.
    progress.reach(Stage::Committing);
    if !track {
        let result = collect(client.query_raw(&prepared, params.iter().copied()).await).await?;
        progress.reach(Stage::Committed);
        return Ok(result);
    }
    // Both requests go out before either answer is awaited; the server answers in order.
    let run = async { collect(client.query_raw(&prepared, params.iter().copied()).await).await };
    let position = client.query_one(POSITION_SQL, &[]);
    let (result, position) = futures_util::join!(run, position);
    let result = result?;
    progress.reach(Stage::Committed);
    if let Some(position) = position.ok().as_ref().and_then(position_of) {
        progress.committed_at(position);
    }
    Ok(result)
}

/// Reads the position after an explicit transaction's commit.
pub(crate) async fn record_position(client: &tokio_postgres::Client, progress: &Progress) {
    if let Some(position) = client
        .query_one(POSITION_SQL, &[])
        .await
        .ok()
        .as_ref()
        .and_then(position_of)
    {
        progress.committed_at(position);
    }
}

/// Collects a row stream with its affected-row count.
pub(crate) async fn collect(
    stream: Result<tokio_postgres::RowStream, tokio_postgres::Error>,
) -> Result<QueryResult, Error> {
    let stream = stream.map_err(Error::from_postgres)?;
    futures_util::pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await.map_err(Error::from_postgres)? {
        rows.push(row);
    }
    let rows_affected = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok(QueryResult {
        rows,
        rows_affected,
    })
}
