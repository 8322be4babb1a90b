//! `Read` and `Write`: ready-made messages for plain SQL with bound parameters.

use std::{any::Any, fmt};

use actix::Message;
use deadpool_postgres::ClientWrapper;
use tokio_postgres::{types::ToSql, Row};

use super::{statement, Intent, Job, Progress, Routable, RouteOptions};
use crate::error::Error;

type Param = Box<dyn ToSql + Send + Sync>;

/// SQL text with owned parameters.
struct Sql {
    text: String,
    params: Vec<Param>,
}

impl Sql {
    fn new(text: impl Into<String>) -> Self {
        Sql {
            text: text.into(),
            params: Vec::new(),
        }
    }

    async fn run(
        &self,
        client: &ClientWrapper,
        progress: &Progress,
        track: bool,
    ) -> Result<super::QueryResult, Error> {
        let params: Vec<&(dyn ToSql + Sync)> = self
            .params
            .iter()
            .map(|param| param.as_ref() as &(dyn ToSql + Sync))
            .collect();
        statement(client, &self.text, &params, progress, track).await
    }
}

impl fmt::Debug for Sql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parameter values may be secrets: show how many, not what.
        f.debug_struct("Sql")
            .field("text", &self.text)
            .field("params", &self.params.len())
            .finish()
    }
}

/// A read: plain SQL that may run on a standby or replica. Answers with the rows.
///
/// ```no_run
/// # async fn demo(router: actix::Addr<pgherd::RouterActor>) -> Result<(), pgherd::Error> {
/// use pgherd::{FromRow, Read, Routable};
/// let rows = router
///     .send(Read::new("SELECT id, name FROM users WHERE id > $1").bind(10_i64))
///     .await??;
/// let users: Vec<(i64, String)> = FromRow::from_rows(&rows)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Read {
    sql: Sql,
    options: RouteOptions,
}

impl Read {
    /// A read of `sql`, with `$1, $2, ...` placeholders for [`bind`](Self::bind).
    pub fn new(sql: impl Into<String>) -> Self {
        Read {
            sql: Sql::new(sql),
            options: RouteOptions::default(),
        }
    }

    /// Binds the next parameter.
    #[must_use]
    pub fn bind(mut self, value: impl ToSql + Send + Sync + 'static) -> Self {
        self.sql.params.push(Box::new(value));
        self
    }

    /// The SQL text (routing rules may look at it).
    pub fn sql(&self) -> &str {
        &self.sql.text
    }
}

impl Message for Read {
    type Result = Result<Vec<Row>, Error>;
}

impl Routable for Read {
    fn options_mut(&mut self) -> &mut RouteOptions {
        &mut self.options
    }

    fn options(&self) -> &RouteOptions {
        &self.options
    }
}

impl Job for Read {
    type Output = Vec<Row>;

    fn intent(&self) -> Intent {
        Intent::Read
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn run(
        &self,
        client: &mut ClientWrapper,
        progress: &Progress,
    ) -> Result<Vec<Row>, Error> {
        Ok(self.sql.run(client, progress, false).await?.rows())
    }
}

/// A write: plain SQL that runs on the primary (or the endpoint named with
/// [`target`](Routable::target)). Answers with [`Written`].
///
/// ```no_run
/// # async fn demo(router: actix::Addr<pgherd::RouterActor>) -> Result<(), pgherd::Error> {
/// use pgherd::{Routable, Write};
/// let written = router
///     .send(Write::new("INSERT INTO users (name) VALUES ($1) RETURNING id").bind("Ada"))
///     .await??;
/// let id: i64 = written.rows[0].get(0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Write {
    sql: Sql,
    options: RouteOptions,
}

impl Write {
    /// A write of `sql`, with `$1, $2, ...` placeholders for [`bind`](Self::bind).
    pub fn new(sql: impl Into<String>) -> Self {
        Write {
            sql: Sql::new(sql),
            options: RouteOptions::default(),
        }
    }

    /// Binds the next parameter.
    #[must_use]
    pub fn bind(mut self, value: impl ToSql + Send + Sync + 'static) -> Self {
        self.sql.params.push(Box::new(value));
        self
    }

    /// The SQL text (routing rules may look at it).
    pub fn sql(&self) -> &str {
        &self.sql.text
    }
}

/// What a [`Write`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct Written {
    /// How many rows it inserted, updated or deleted.
    pub rows_affected: u64,
    /// The rows of a `RETURNING` clause (empty without one).
    pub rows: Vec<Row>,
    /// The position the write reached: a read sent with [`after`](Routable::after) it sees the
    /// write, wherever it runs. `None` if it could not be read (the write itself succeeded).
    pub position: Option<crate::Position>,
}

impl Message for Write {
    type Result = Result<Written, Error>;
}

impl Routable for Write {
    fn options_mut(&mut self) -> &mut RouteOptions {
        &mut self.options
    }

    fn options(&self) -> &RouteOptions {
        &self.options
    }
}

impl Job for Write {
    type Output = Written;

    fn intent(&self) -> Intent {
        Intent::Write
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn run(&self, client: &mut ClientWrapper, progress: &Progress) -> Result<Written, Error> {
        let result = self.sql.run(client, progress, true).await?;
        Ok(Written {
            rows_affected: result.rows_affected(),
            rows: result.rows(),
            position: progress.position(),
        })
    }
}
