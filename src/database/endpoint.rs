//! An endpoint's handle: its pool, its live state, and how a job runs on it (deadline, cancel on
//! the server, classification of failures).

use std::{
    any::Any,
    cell::Cell,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::Recipient;
use deadpool_postgres::{ClientWrapper, Object, Pool, PoolError};
use futures_util::FutureExt as _;
use tokio::time::Instant;
use tokio_postgres::{error::SqlState, types::PgLsn, CancelToken, NoTls};

use super::{pool::Connector, tls::Tls, DatabaseReport};
use crate::{
    error::{Error, ErrorKind},
    health::ProbeRequests,
    position::Position,
    query::{Intent, Job, Progress, Stage},
    settings::Role,
};

/// Whether an endpoint has replayed a position (on a primary: reached it), asked on the
/// connection that then runs the read, so the answer holds for the read.
const REPLAYED_SQL: &str = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
     ELSE pg_current_wal_lsn() END >= $1";

/// After a deadline, how long a write waits for the server to confirm the cancel before its
/// outcome is reported unknown, and how long a read's connection may take to become free.
pub const CANCEL_GRACE: Duration = Duration::from_millis(500);
/// The weight of the newest sample in the latency average.
const LATENCY_ALPHA: f64 = 0.2;

/// The live, shared state of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    /// Set when the endpoint's actor stopped (or is about to, after a panic): final.
    retired: AtomicBool,
    outstanding: AtomicUsize,
    /// Microseconds; 0 until the first sample.
    latency: AtomicU64,
}

impl EndpointState {
    /// Whether the handle was retired: no traffic ever again through it.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub(crate) fn latency(&self) -> Option<Duration> {
        match self.latency.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    fn record_latency(&self, sample: Duration) {
        let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.latency.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            // Precision is not the point: a rough, cheap average of recent latency.
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let mixed =
                (old as f64).mul_add(1.0 - LATENCY_ALPHA, sample as f64 * LATENCY_ALPHA) as u64;
            mixed.max(1)
        };
        self.latency.store(new, Ordering::Relaxed);
    }
}

/// Counts a job as outstanding for as long as it lives.
struct Outstanding<'a>(&'a EndpointState);

impl<'a> Outstanding<'a> {
    fn new(state: &'a EndpointState) -> Self {
        state.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(state)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A failed attempt: the error, and how far the job got (which decides whether it may be retried).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) stage: Stage,
    /// The endpoint had not replayed the position a read asked for: nothing ran.
    pub(crate) stale: bool,
}

impl Failure {
    pub(crate) fn new(error: Error, stage: Stage) -> Failure {
        Failure {
            error,
            stage,
            stale: false,
        }
    }
}

struct Inner {
    name: Arc<str>,
    role: Role,
    cluster: Arc<str>,
    weight: u32,
    generation: u64,
    pool: Pool,
    connector: Arc<Connector>,
    state: EndpointState,
    reports: Recipient<DatabaseReport>,
    probes: Arc<ProbeRequests>,
}

/// One endpoint as the router sees it: cheap to clone, shared with its database actor.
#[derive(Clone)]
pub(crate) struct Endpoint(Arc<Inner>);

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.0.name)
            .field("role", &self.0.role)
            .field("cluster", &self.0.cluster)
            .field("generation", &self.0.generation)
            .field("retired", &self.0.state.is_retired())
            .field("outstanding", &self.0.state.outstanding())
            .finish()
    }
}

/// What an endpoint is made of.
pub(crate) struct EndpointParts {
    pub(crate) name: Arc<str>,
    pub(crate) role: Role,
    pub(crate) cluster: Arc<str>,
    pub(crate) weight: u32,
    pub(crate) generation: u64,
    pub(crate) pool: Pool,
    pub(crate) connector: Arc<Connector>,
    pub(crate) reports: Recipient<DatabaseReport>,
    pub(crate) probes: Arc<ProbeRequests>,
}

impl Endpoint {
    pub(crate) fn new(parts: EndpointParts) -> Endpoint {
        Endpoint(Arc::new(Inner {
            name: parts.name,
            role: parts.role,
            cluster: parts.cluster,
            weight: parts.weight,
            generation: parts.generation,
            pool: parts.pool,
            connector: parts.connector,
            state: EndpointState::default(),
            reports: parts.reports,
            probes: parts.probes,
        }))
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.0.name
    }

    pub(crate) fn role(&self) -> Role {
        self.0.role
    }

    pub(crate) fn cluster(&self) -> &str {
        &self.0.cluster
    }

    pub(crate) fn weight(&self) -> u32 {
        self.0.weight
    }

    pub(crate) fn generation(&self) -> u64 {
        self.0.generation
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.0.pool
    }

    pub(crate) fn state(&self) -> &EndpointState {
        &self.0.state
    }

    /// Retires the handle: no message may use it any more (its actor stops; a restart brings a
    /// new one).
    pub(crate) fn retire(&self) {
        self.0.state.retired.store(true, Ordering::Release);
    }

    /// Asks the health actor to probe this endpoint at once.
    fn suspect(&self) {
        self.0.probes.request(&self.0.name);
    }

    /// Runs `job` on a connection of this endpoint, by `deadline`.
    ///
    /// On the deadline the statement is cancelled on the server. A read is answered at once
    /// while its connection is dealt with in the background; a write waits up to
    /// [`CANCEL_GRACE`] to learn whether the cancel stopped it, and is reported
    /// [`CommitUnknown`](ErrorKind::CommitUnknown) when its commit may have happened. A
    /// connection a cancel was sent on is never reused (a late cancel could hit its next
    /// statement). If the caller stops waiting (its future is dropped), the statement is
    /// cancelled on the server too.
    ///
    /// With `replayed`, the endpoint is first asked, on the same connection, whether it has
    /// replayed that position; if not, nothing runs and the failure is marked stale.
    pub(crate) async fn execute<J: Job>(
        &self,
        job: Rc<J>,
        deadline: Instant,
        budget: Duration,
        replayed: Option<Position>,
    ) -> Result<(J::Output, Option<Position>), Failure> {
        let _outstanding = Outstanding::new(&self.0.state);
        let started = Instant::now();
        // One timer for the whole attempt: checkout and execution.
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        let timed_out = |doing: &str| {
            Err(Failure::new(
                self.tag(Error::timeout(budget, doing)),
                Stage::NotSent,
            ))
        };
        let object = tokio::select! {
            biased;
            checkout = self.0.pool.get() => match checkout {
                Ok(object) => object,
                Err(error) => return Err(Failure::new(self.pool_error(error), Stage::NotSent)),
            },
            () = &mut expiry => return timed_out("waiting for a connection"),
        };
        // Never start a statement after the deadline, even with a connection in hand.
        if Instant::now() >= deadline {
            return timed_out("waiting for a connection");
        }
        if let Some(position) = replayed {
            let lsn = PgLsn::from(position);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lsn];
            let check = tokio::select! {
                biased;
                check = object.query_one(REPLAYED_SQL, &params) => check,
                () = &mut expiry => {
                    // The connection has a request in flight: it is not reused.
                    drop(Object::take(object));
                    return timed_out("asking whether a position was replayed");
                }
            };
            match check.map(|row| row.get::<_, Option<bool>>(0)) {
                Ok(Some(true)) => {}
                Ok(_) => {
                    let mut failure =
                        Failure::new(
                            self.tag(Error::new(ErrorKind::NoTarget).with_detail(format!(
                                "it has not replayed position {position} yet"
                            ))),
                            Stage::NotSent,
                        );
                    failure.stale = true;
                    return Err(failure);
                }
                Err(error) => {
                    return Err(self.failed(
                        Error::from_postgres(error),
                        Stage::NotSent,
                        Intent::Read,
                    ))
                }
            }
        }
        let progress = Rc::new(Progress::default());
        let intent = job.intent();
        let mut in_flight = InFlight::new(
            object.cancel_token(),
            self.0.connector.tls().clone(),
            |discard| {
                Box::pin(
                    AssertUnwindSafe(attempt(
                        Rc::clone(&job),
                        Lease::new(object, discard),
                        Rc::clone(&progress),
                    ))
                    .catch_unwind(),
                )
            },
        );
        let finished = tokio::select! {
            biased;
            finished = in_flight.attempt() => finished,
            () = &mut expiry => {
                return self.after_deadline(in_flight, &progress, intent, budget).await;
            }
        };
        in_flight.finished();
        match finished {
            Ok(Ok(output)) => {
                self.0.state.record_latency(started.elapsed());
                Ok((output, progress.position()))
            }
            Ok(Err(error)) => Err(self.failed(error, progress.stage(), intent)),
            Err(panic) => Err(self.panicked(panic.as_ref(), progress.stage(), intent)),
        }
    }

    /// The deadline passed with the statement running: cancel it on the server.
    async fn after_deadline<T: 'static>(
        &self,
        mut in_flight: InFlight<T>,
        progress: &Progress,
        intent: Intent,
        budget: Duration,
    ) -> Result<(T, Option<Position>), Failure> {
        // A statement past its deadline may mean a hung server: have it probed now.
        self.suspect();
        if intent == Intent::Read {
            // The caller gets its answer at the deadline; dropping the guard cancels the
            // statement and lets it end in the background.
            drop(in_flight);
            return Err(Failure::new(
                self.tag(Error::timeout(budget, "the statement ran")),
                progress.stage(),
            ));
        }
        // Whether the commit was already confirmed when the cancel went out: then nothing the
        // cancel does can change the write's outcome.
        let committed_at_cancel = progress.stage() == Stage::Committed;
        in_flight.cancel();
        let outcome = tokio::time::timeout(CANCEL_GRACE, in_flight.attempt()).await;
        let stage = progress.stage();
        match outcome {
            // The commit was confirmed before the cancel: a plain success, if slightly after
            // the deadline.
            Ok(Ok(Ok(output))) if committed_at_cancel => {
                in_flight.finished();
                Ok((output, progress.position()))
            }
            // Otherwise the commit ran while the cancel was on its way, and a cancel that reaches
            // a commit waiting for synchronous replication ends the wait with success:
            // committed locally, perhaps on no standby.
            Ok(Ok(Ok(_))) => {
                in_flight.finished();
                Err(Failure::new(
                    self.tag(Error::new(ErrorKind::CommitUnknown).with_detail(format!(
                        "the deadline of {} passed while the write was committing; it committed \
                         after the cancel was sent, and a cancel ends a wait for synchronous \
                         replication with success: it may not have reached any standby",
                        crate::error::show(budget)
                    ))),
                    Stage::Committed,
                ))
            }
            Ok(Ok(Err(error))) if error.code() == Some(&SqlState::QUERY_CANCELED) => {
                in_flight.finished();
                Err(Failure::new(
                    self.tag(Error::timeout(
                        budget,
                        "the write ran; it was cancelled on the server and nothing was committed",
                    )),
                    stage,
                ))
            }
            Ok(Ok(Err(error))) => {
                in_flight.finished();
                Err(self.failed(error, stage, intent))
            }
            Ok(Err(panic)) => {
                in_flight.finished();
                Err(self.panicked(panic.as_ref(), stage, intent))
            }
            // The server did not confirm in time: the attempt is dropped here (not left to run
            // on), which closes its connection and rolls back anything not yet committed.
            Err(_) => {
                in_flight.forget();
                if stage == Stage::Committed {
                    Err(Failure::new(
                        self.tag(Error::new(ErrorKind::CommitUnknown).with_detail(format!(
                            "the write was committed (the server confirmed it), but the server \
                             stopped answering before the write's position was read, and the \
                             deadline of {} passed: do not do it again",
                            crate::error::show(budget)
                        ))),
                        stage,
                    ))
                } else if stage == Stage::Committing {
                    Err(Failure::new(
                        self.tag(Error::new(ErrorKind::CommitUnknown).with_detail(format!(
                            "the deadline of {} passed while the write was committing, and the \
                             server did not confirm the cancel within {}: it may or may not have \
                             taken effect",
                            crate::error::show(budget),
                            humantime::format_duration(CANCEL_GRACE)
                        ))),
                        stage,
                    ))
                } else {
                    Err(Failure::new(
                        self.tag(Error::timeout(
                            budget,
                            "the write ran; its connection was closed and nothing was committed",
                        )),
                        stage,
                    ))
                }
            }
        }
    }

    /// Classifies a job's error by how far it got, and reports connection failures.
    fn failed(&self, error: Error, stage: Stage, intent: Intent) -> Failure {
        let error = self.tag(error);
        if intent == Intent::Write && stage == Stage::Committed {
            // Whatever failed after the commit was confirmed (mapping the result, say), the
            // write itself took effect, and the caller must know.
            return Failure::new(
                error.with_detail("the write was committed; only what came after it failed"),
                stage,
            );
        }
        if error.kind() != ErrorKind::Connection {
            return Failure::new(error, stage);
        }
        self.suspect();
        let error = match (intent, stage) {
            (Intent::Write, Stage::Committing) => error.into_kind(ErrorKind::CommitUnknown).with_detail(
                "the connection was lost after the write was sent: it may or may not have been committed",
            ),
            (Intent::Write, Stage::InTransaction) => error.with_detail(
                "the connection was lost during the transaction, before its commit: nothing was committed",
            ),
            (Intent::Write, _) => error.with_detail("the connection failed before the write was sent"),
            (Intent::Read, _) => error,
        };
        Failure::new(error, stage)
    }

    fn panicked(&self, panic: &(dyn Any + Send), stage: Stage, intent: Intent) -> Failure {
        let message = panic_message(panic);
        tracing::error!(endpoint = %self.0.name, %message, "code run for a message panicked");
        // No further message may use this handle: the actor is about to stop and be replaced.
        self.retire();
        // Not a hint: the actor must learn of it, so that it is restarted.
        self.0.reports.do_send(DatabaseReport::Poisoned {
            reason: format!("panic in code run for a message: {message}"),
        });
        let outcome = match (intent, stage) {
            (Intent::Write, Stage::Committed) => "the write had been committed",
            (Intent::Write, Stage::Committing) => "the write may or may not have been committed",
            (Intent::Write, _) => "nothing was committed",
            (Intent::Read, _) => "it was a read",
        };
        let kind = if intent == Intent::Write && stage == Stage::Committing {
            ErrorKind::CommitUnknown
        } else {
            ErrorKind::Panicked
        };
        Failure::new(
            self.tag(Error::new(kind).with_detail(format!(
                "panic: {message}; {outcome}; the connection was discarded and the endpoint's \
                 actor is restarted"
            ))),
            stage,
        )
    }

    fn pool_error(&self, error: PoolError) -> Error {
        let error = match error {
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                Error::new(ErrorKind::Timeout).with_detail(format!(
                    "no free connection within wait_timeout (all {} are busy)",
                    self.0.pool.status().max_size
                ))
            }
            PoolError::Closed => {
                Error::stopped("the endpoint's pool was closed (restart or shutdown)")
            }
            PoolError::Timeout(_) => {
                // A connection that cannot be made or checked in time: a hung server, perhaps.
                self.suspect();
                Error::new(ErrorKind::Connection).with_detail(format!("cannot connect: {error}"))
            }
            PoolError::Backend(error) => {
                self.suspect();
                Error::from_postgres(error)
                    .into_kind(ErrorKind::Connection)
                    .with_detail("cannot connect")
            }
            other => {
                self.suspect();
                Error::new(ErrorKind::Connection).with_detail(format!("cannot connect: {other}"))
            }
        };
        self.tag(error)
    }

    fn tag(&self, error: Error) -> Error {
        error.with_endpoint(&self.0.name)
    }
}

/// A running attempt, panics caught; boxed once so that it can be handed to a background task.
type AttemptFuture<T> =
    std::pin::Pin<Box<dyn Future<Output = std::thread::Result<Result<T, Error>>>>>;

/// An attempt in flight. Dropped before it finished (the caller gave up, or a read's deadline
/// passed), it cancels the statement on the server and lets it end in the background, within
/// [`CANCEL_GRACE`], its connection discarded.
struct InFlight<T: 'static> {
    attempt: Option<AttemptFuture<T>>,
    token: Option<CancelToken>,
    tls: Tls,
    discard: Rc<Cell<bool>>,
}

impl<T: 'static> InFlight<T> {
    fn new(
        token: CancelToken,
        tls: Tls,
        attempt: impl FnOnce(Rc<Cell<bool>>) -> AttemptFuture<T>,
    ) -> Self {
        let discard = Rc::new(Cell::new(false));
        InFlight {
            attempt: Some(attempt(Rc::clone(&discard))),
            token: Some(token),
            tls,
            discard,
        }
    }

    /// The attempt, to be awaited.
    fn attempt(&mut self) -> impl Future<Output = std::thread::Result<Result<T, Error>>> + '_ {
        futures_util::future::poll_fn(move |cx| match self.attempt.as_mut() {
            Some(attempt) => attempt.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        })
    }

    /// The attempt ended: nothing left to clean up.
    fn finished(&mut self) {
        self.attempt = None;
        self.token = None;
    }

    /// Drops the attempt where it stands, discarding its connection.
    fn forget(&mut self) {
        self.discard.set(true);
        self.finished();
    }

    /// Sends the cancel (in the background, bounded by [`CANCEL_GRACE`]); the connection will be
    /// discarded.
    fn cancel(&mut self) {
        self.discard.set(true);
        if let Some(token) = self.token.take() {
            let tls = self.tls.clone();
            spawn_local_if_possible(async move {
                let _ = tokio::time::timeout(CANCEL_GRACE, cancel(token, tls)).await;
            });
        }
    }
}

impl<T: 'static> Drop for InFlight<T> {
    fn drop(&mut self) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        self.cancel();
        if std::thread::panicking() {
            return;
        }
        spawn_local_if_possible(async move {
            let _ = tokio::time::timeout(CANCEL_GRACE, attempt).await;
        });
    }
}

/// Spawns on the current actix arbiter; outside one (a runtime shutting down), the work is
/// dropped, which still closes the connection.
fn spawn_local_if_possible(work: impl Future<Output = ()> + 'static) {
    let spawned =
        std::panic::catch_unwind(AssertUnwindSafe(|| drop(tokio::task::spawn_local(work))));
    if spawned.is_err() {
        tracing::debug!("no local task set to finish a cancelled statement in");
    }
}

/// One run of a job on a leased connection, owning everything it needs, so that it can outlive
/// the caller's wait (to free the connection after a cancel).
async fn attempt<J: Job>(
    job: Rc<J>,
    mut lease: Lease,
    progress: Rc<Progress>,
) -> Result<J::Output, Error> {
    let result = match lease.client() {
        Some(client) => job.run(client, &progress).await,
        None => Err(Error::new(ErrorKind::Connection).with_detail("lease without a connection")),
    };
    lease.finished();
    result
}

/// A pooled connection that goes back to the pool only when its job finished and no cancel was
/// sent on it; otherwise it is discarded, so that no one inherits a connection in an unknown
/// state (or a late cancel).
struct Lease {
    object: Option<Object>,
    finished: bool,
    discard: Rc<Cell<bool>>,
}

impl Lease {
    fn new(object: Object, discard: Rc<Cell<bool>>) -> Lease {
        Lease {
            object: Some(object),
            finished: false,
            discard,
        }
    }

    fn client(&mut self) -> Option<&mut ClientWrapper> {
        self.object.as_deref_mut()
    }

    fn finished(&mut self) {
        self.finished = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            if !self.finished || self.discard.get() || std::thread::panicking() {
                // Taken out of the pool and dropped: the connection closes.
                drop(Object::take(object));
            }
        }
    }
}

/// Asks the server to cancel the statement running on the connection of `token`.
async fn cancel(token: CancelToken, tls: Tls) {
    let result = match tls {
        Tls::Plain => token.cancel_query(NoTls).await,
        Tls::Rustls(connector) => token.cancel_query(connector).await,
    };
    if let Err(error) = result {
        tracing::debug!(%error, "cancel request failed");
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
