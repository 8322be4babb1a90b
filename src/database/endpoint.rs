//! An endpoint's handle: its pool, its live state, and how a job runs on it (deadline, cancel on
//! the server, classification of failures).

use std::{
    any::Any,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use actix::Recipient;
use deadpool_postgres::{ClientWrapper, Object, Pool, PoolError};
use futures_util::FutureExt as _;
use tokio::{sync::Notify, time::Instant};
use tokio_postgres::{error::SqlState, CancelToken, NoTls};

use super::{tls::Tls, DatabaseReport};
use crate::{
    error::{Error, ErrorKind},
    query::{Intent, Job, Progress, Stage},
    settings::Role,
};

/// After a deadline, how long a write waits for the server to confirm the cancel before its
/// outcome is reported unknown, and how long a read's connection may take to become free.
pub const CANCEL_GRACE: Duration = Duration::from_millis(500);
/// The weight of the newest sample in the latency average.
const LATENCY_ALPHA: f64 = 0.2;

/// Whether an endpoint can be reached, as last seen by its database actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Not probed yet: traffic is allowed.
    Unknown,
    /// The last probe or query connected.
    Reachable,
    /// The last probe failed: no traffic until a probe succeeds.
    Unreachable,
    /// The endpoint's actor stopped (or is about to, after a panic): no traffic ever again
    /// through this handle; its restart brings a new one.
    Retired,
}

impl Reachability {
    /// Whether the endpoint may get traffic.
    pub fn is_available(self) -> bool {
        matches!(self, Reachability::Unknown | Reachability::Reachable)
    }

    fn to_raw(self) -> u8 {
        match self {
            Reachability::Unknown => 0,
            Reachability::Reachable => 1,
            Reachability::Unreachable => 2,
            Reachability::Retired => 3,
        }
    }

    fn from_raw(raw: u8) -> Reachability {
        match raw {
            1 => Reachability::Reachable,
            2 => Reachability::Unreachable,
            3 => Reachability::Retired,
            _ => Reachability::Unknown,
        }
    }
}

/// The live, shared state of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    reachability: AtomicU8,
    outstanding: AtomicUsize,
    /// Microseconds; 0 until the first sample.
    latency: AtomicU64,
}

impl EndpointState {
    pub(crate) fn reachability(&self) -> Reachability {
        Reachability::from_raw(self.reachability.load(Ordering::Acquire))
    }

    /// Sets the reachability, unless the endpoint is retired (which is final); returns the
    /// previous one.
    pub(crate) fn set_reachability(&self, reachability: Reachability) -> Reachability {
        let retired = Reachability::Retired.to_raw();
        let previous = self
            .reachability
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |raw| {
                (raw != retired).then_some(reachability.to_raw())
            })
            .unwrap_or(retired);
        Reachability::from_raw(previous)
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
}

impl Failure {
    fn new(error: Error, stage: Stage) -> Failure {
        Failure { error, stage }
    }
}

struct Inner {
    name: Arc<str>,
    role: Role,
    cluster: Arc<str>,
    weight: u32,
    generation: u64,
    pool: Pool,
    tls: Tls,
    state: EndpointState,
    reports: Recipient<DatabaseReport>,
    changed: Arc<Notify>,
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
            .field("reachability", &self.0.state.reachability())
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
    pub(crate) tls: Tls,
    pub(crate) reports: Recipient<DatabaseReport>,
    pub(crate) changed: Arc<Notify>,
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
            tls: parts.tls,
            state: EndpointState::default(),
            reports: parts.reports,
            changed: parts.changed,
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

    /// Sets the reachability and, when it changed, wakes every message waiting for a target.
    pub(crate) fn set_reachability(&self, reachability: Reachability) -> Reachability {
        let before = self.0.state.set_reachability(reachability);
        if before != reachability {
            self.0.changed.notify_waiters();
        }
        before
    }

    fn report(&self, report: DatabaseReport) {
        // A report is a hint; when the actor's mailbox is full it already has work to do.
        let _ = self.0.reports.try_send(report);
    }

    /// Runs `job` on a connection of this endpoint, by `deadline`.
    ///
    /// On the deadline the statement is cancelled on the server. A read is answered at once
    /// while its connection is freed in the background; a write waits up to [`CANCEL_GRACE`] to
    /// learn whether the cancel stopped it, and is reported
    /// [`CommitUnknown`](ErrorKind::CommitUnknown) when its commit may have happened.
    pub(crate) async fn execute<J: Job>(
        &self,
        job: Rc<J>,
        deadline: Instant,
        budget: Duration,
    ) -> Result<J::Output, Failure> {
        let _outstanding = Outstanding::new(&self.0.state);
        let started = Instant::now();
        // One timer for the whole attempt: checkout and execution.
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        let object = tokio::select! {
            biased;
            checkout = self.0.pool.get() => match checkout {
                Ok(object) => object,
                Err(error) => return Err(Failure::new(self.pool_error(error), Stage::NotSent)),
            },
            () = &mut expiry => {
                return Err(Failure::new(
                    self.tag(Error::timeout(budget, "waiting for a connection")),
                    Stage::NotSent,
                ))
            }
        };
        let token = object.cancel_token();
        let progress = Rc::new(Progress::default());
        let intent = job.intent();
        let mut attempt = Box::pin(
            AssertUnwindSafe(attempt(
                Rc::clone(&job),
                Lease::new(object),
                Rc::clone(&progress),
            ))
            .catch_unwind(),
        );
        let finished = tokio::select! {
            biased;
            finished = &mut attempt => finished,
            () = &mut expiry => {
                return self.after_deadline(attempt, token, &progress, intent, budget).await;
            }
        };
        match finished {
            Ok(Ok(output)) => {
                self.0.state.record_latency(started.elapsed());
                Ok(output)
            }
            Ok(Err(error)) => Err(self.failed(error, progress.stage(), intent)),
            Err(panic) => Err(self.panicked(panic.as_ref(), progress.stage())),
        }
    }

    /// The deadline passed with the statement running: cancel it on the server.
    async fn after_deadline<T: 'static>(
        &self,
        mut attempt: AttemptFuture<T>,
        token: CancelToken,
        progress: &Progress,
        intent: Intent,
        budget: Duration,
    ) -> Result<T, Failure> {
        let cancel = cancel(token, self.0.tls.clone());
        if intent == Intent::Read {
            // The caller gets its answer at the deadline; the connection is freed (or, if the
            // server does not answer, discarded) in the background.
            actix_rt::spawn(async move {
                cancel.await;
                let _ = tokio::time::timeout(CANCEL_GRACE, attempt).await;
            });
            return Err(Failure::new(
                self.tag(Error::timeout(budget, "the statement ran")),
                progress.stage(),
            ));
        }
        let outcome = tokio::time::timeout(CANCEL_GRACE, async {
            cancel.await;
            (&mut attempt).await
        })
        .await;
        let stage = progress.stage();
        match outcome {
            // The write finished while the cancel was on its way: its outcome is known, and it
            // is reported, if slightly after the deadline.
            Ok(Ok(Ok(output))) => Ok(output),
            Ok(Ok(Err(error))) if error.code() == Some(&SqlState::QUERY_CANCELED) => {
                Err(Failure::new(
                    self.tag(Error::timeout(
                        budget,
                        "the write ran; it was cancelled on the server and nothing was committed",
                    )),
                    stage,
                ))
            }
            Ok(Ok(Err(error))) => Err(self.failed(error, stage, intent)),
            Ok(Err(panic)) => Err(self.panicked(panic.as_ref(), stage)),
            // The server did not confirm in time: the attempt is dropped, which discards its
            // connection (rolling back anything not yet committed).
            Err(_) if stage == Stage::Committing => Err(Failure::new(
                self.tag(Error::new(ErrorKind::CommitUnknown).with_detail(format!(
                    "the deadline of {} passed while the write was committing, and the server did \
                     not confirm the cancel within {}: it may or may not have taken effect",
                    humantime::format_duration(budget),
                    humantime::format_duration(CANCEL_GRACE)
                ))),
                stage,
            )),
            Err(_) => Err(Failure::new(
                self.tag(Error::timeout(
                    budget,
                    "the write ran; its connection was closed and nothing was committed",
                )),
                stage,
            )),
        }
    }

    /// Classifies a job's error by how far it got, and reports connection failures.
    fn failed(&self, error: Error, stage: Stage, intent: Intent) -> Failure {
        let error = self.tag(error);
        if error.kind() != ErrorKind::Connection {
            return Failure::new(error, stage);
        }
        self.report(DatabaseReport::ConnectionFailed);
        let error = match (intent, stage) {
            (Intent::Write, Stage::Committing) => error.into_kind(ErrorKind::CommitUnknown).with_detail(
                "the connection was lost after the write was sent: it may or may not have been committed",
            ),
            (Intent::Write, Stage::InTransaction) => error.with_detail(
                "the connection was lost during the transaction, before its commit: nothing was committed",
            ),
            (Intent::Write, Stage::NotSent) => {
                error.with_detail("the connection failed before the write was sent")
            }
            (Intent::Read, _) => error,
        };
        Failure::new(error, stage)
    }

    fn panicked(&self, panic: &(dyn Any + Send), stage: Stage) -> Failure {
        let message = panic_message(panic);
        tracing::error!(endpoint = %self.0.name, %message, "code run for a message panicked");
        // No further message may use this handle: the actor is about to stop and be replaced.
        self.set_reachability(Reachability::Retired);
        // Not a hint: the actor must learn of it, so that it is restarted.
        self.0.reports.do_send(DatabaseReport::Poisoned {
            reason: format!("panic in code run for a message: {message}"),
        });
        Failure::new(
            self.tag(Error::new(ErrorKind::Panicked).with_detail(format!(
                "{message} (the connection was discarded and the endpoint's actor is restarted)"
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
            PoolError::Backend(error) => {
                self.report(DatabaseReport::ConnectionFailed);
                Error::from_postgres(error)
                    .into_kind(ErrorKind::Connection)
                    .with_detail("cannot connect")
            }
            other => {
                self.report(DatabaseReport::ConnectionFailed);
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

/// A pooled connection that goes back to the pool only when its job finished; dropped half-way
/// (a deadline, a panic), it is discarded instead, so no one inherits a connection in an
/// unknown state.
struct Lease {
    object: Option<Object>,
    finished: bool,
}

impl Lease {
    fn new(object: Object) -> Lease {
        Lease {
            object: Some(object),
            finished: false,
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
            if !self.finished || std::thread::panicking() {
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
