//! Transactions: an atomic batch of statements, and a closure run in one transaction.

use std::{any::Any, cell::RefCell, fmt, future::Future, pin::Pin};

use actix::Message;
use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::ToSql;

use super::{collect, Intent, Job, Progress, Routable, RouteOptions, Stage};
use crate::error::Error;

type Param = Box<dyn ToSql + Send + Sync>;

/// Statements run in one transaction on the primary: all of them commit, or none.
/// Answers with the number of rows each statement affected.
///
/// ```no_run
/// # async fn demo(router: actix::Addr<pgherd::RouterActor>) -> Result<(), pgherd::Error> {
/// use pgherd::Batch;
/// let affected = router
///     .send(
///         Batch::new()
///             .statement("UPDATE accounts SET balance = balance - $1 WHERE id = $2").bind(10_i64).bind(1_i64)
///             .statement("UPDATE accounts SET balance = balance + $1 WHERE id = $2").bind(10_i64).bind(2_i64),
///     )
///     .await??;
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct Batch {
    statements: Vec<(String, Vec<Param>)>,
    options: RouteOptions,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Adds a statement; [`bind`](Self::bind) then binds its parameters.
    #[must_use]
    pub fn statement(mut self, sql: impl Into<String>) -> Self {
        self.statements.push((sql.into(), Vec::new()));
        self
    }

    /// Binds the next parameter of the statement added last.
    ///
    /// # Panics
    ///
    /// When no statement was added yet: binding to nothing is a bug in the caller.
    #[must_use]
    pub fn bind(mut self, value: impl ToSql + Send + Sync + 'static) -> Self {
        match self.statements.last_mut() {
            Some((_, params)) => params.push(Box::new(value)),
            None => panic!("Batch::bind called before Batch::statement"),
        }
        self
    }

    /// The statements' SQL texts, in order.
    pub fn sql(&self) -> impl Iterator<Item = &str> {
        self.statements.iter().map(|(sql, _)| sql.as_str())
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("statements", &self.sql().collect::<Vec<_>>())
            .field("options", &self.options)
            .finish()
    }
}

impl Message for Batch {
    type Result = Result<Vec<u64>, Error>;
}

impl Routable for Batch {
    fn options_mut(&mut self) -> &mut RouteOptions {
        &mut self.options
    }

    fn options(&self) -> &RouteOptions {
        &self.options
    }
}

impl Job for Batch {
    type Output = Vec<u64>;

    fn intent(&self) -> Intent {
        Intent::Write
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn run(
        &self,
        client: &mut ClientWrapper,
        progress: &Progress,
    ) -> Result<Vec<u64>, Error> {
        let transaction = client.transaction().await.map_err(Error::from_postgres)?;
        progress.reach(Stage::InTransaction);
        let mut affected = Vec::with_capacity(self.statements.len());
        for (sql, params) in &self.statements {
            let prepared = transaction
                .prepare_cached(sql)
                .await
                .map_err(Error::from_postgres)?;
            let params = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync));
            let result = collect(transaction.query_raw(&prepared, params).await).await?;
            affected.push(result.rows_affected());
        }
        progress.reach(Stage::Committing);
        transaction.commit().await.map_err(Error::from_postgres)?;
        progress.reach(Stage::Committed);
        super::record_position(client, progress).await;
        Ok(affected)
    }
}

/// The future a [`Transact`] closure returns.
pub type TxFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + 't>>;

type TxFn<T> =
    Box<dyn for<'t> FnOnce(&'t tokio_postgres::Transaction<'t>) -> TxFuture<'t, T> + Send>;

/// A closure run in one transaction on the primary (or the endpoint named explicitly): it
/// commits when the closure returns `Ok`, and rolls back when it returns `Err` or panics.
///
/// The closure runs at most once. A panic in it does not take the herd down: the message is
/// answered with a [`Panicked`](crate::ErrorKind::Panicked) error, the connection is discarded
/// and the endpoint's actor is restarted by the supervisor.
///
/// ```no_run
/// # async fn demo(router: actix::Addr<pgherd::RouterActor>) -> Result<(), pgherd::Error> {
/// use pgherd::Transact;
/// let id: i64 = router
///     .send(Transact::new(|tx| {
///         Box::pin(async move {
///             let row = tx.query_one("INSERT INTO users (name) VALUES ('Ada') RETURNING id", &[]).await?;
///             let id: i64 = row.get(0);
///             tx.execute("INSERT INTO audit (user_id) VALUES ($1)", &[&id]).await?;
///             Ok(id)
///         })
///     }))
///     .await??;
/// # Ok(()) }
/// ```
pub struct Transact<T> {
    body: RefCell<Option<TxFn<T>>>,
    options: RouteOptions,
}

impl<T: Send + 'static> Transact<T> {
    /// A transaction running `body`.
    pub fn new<F>(body: F) -> Self
    where
        F: for<'t> FnOnce(&'t tokio_postgres::Transaction<'t>) -> TxFuture<'t, T> + Send + 'static,
    {
        Transact {
            body: RefCell::new(Some(Box::new(body))),
            options: RouteOptions::default(),
        }
    }
}

impl<T> fmt::Debug for Transact<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transact")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Message for Transact<T> {
    type Result = Result<T, Error>;
}

impl<T> Routable for Transact<T> {
    fn options_mut(&mut self) -> &mut RouteOptions {
        &mut self.options
    }

    fn options(&self) -> &RouteOptions {
        &self.options
    }
}

impl<T: Send + 'static> Job for Transact<T> {
    type Output = T;

    fn intent(&self) -> Intent {
        Intent::Write
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn rerunnable(&self) -> bool {
        self.body.borrow().is_some()
    }

    async fn run(&self, client: &mut ClientWrapper, progress: &Progress) -> Result<T, Error> {
        let transaction = client.transaction().await.map_err(Error::from_postgres)?;
        progress.reach(Stage::InTransaction);
        let Some(body) = self.body.borrow_mut().take() else {
            return Err(Error::new(crate::ErrorKind::Config)
                .with_detail("a Transact closure runs at most once, and it already ran"));
        };
        let output = body(&transaction).await?;
        // A closure that swallowed a statement's error leaves an aborted transaction, whose
        // COMMIT would silently roll back: ask before committing.
        if let Err(error) = transaction.simple_query("SELECT 1").await {
            return Err(Error::from_postgres(error).with_detail(
                "the transaction had already failed (an error inside the closure was not \
                 returned): it was rolled back, nothing was committed",
            ));
        }
        progress.reach(Stage::Committing);
        transaction.commit().await.map_err(Error::from_postgres)?;
        progress.reach(Stage::Committed);
        super::record_position(client, progress).await;
        Ok(output)
    }
}
