//! `ReplicatorActor`: keeps tables of writable replicas (endpoints with `role = "replica"`)
//! equal to their cluster's primary, exactly once, in one of two capture modes.
//!
//! - `trigger` (no `wal_level` change, no REPLICATION role): statement-level triggers log the
//!   keys of changed rows with their transaction id; a batch is cut between two transaction
//!   snapshots, and the rows are read again in the newer one.
//! - `logical`: a `pgoutput` slot per target, streamed over a replication connection (or peeked
//!   over an ordinary one), applied, then advanced.
//!
//! Both apply a batch in one target transaction with set-based statements, and move the target's
//! progress row in that same transaction, claiming the batch first: a batch is applied once even
//! when two replicators race. One replicator per target is active (a PostgreSQL advisory lock
//! on the target); a target that is down holds no other back, and catches up when it returns.
//! See `docs/replication.md` for the semantics and what is not replicated.
//!
//! ```no_run
//! # async fn demo(herd: pgherd::Herd) {
//! for status in herd.replication() {
//!     println!("{}: {:?}, {:?} behind", status.target, status.state, status.lag);
//! }
//! # }
//! ```

use std::{sync::Arc, time::Duration};

use actix::{
    Actor, ActorContext as _, ActorFutureExt as _, AsyncContext as _, Context, Handler, Message,
    WrapFuture as _,
};

mod apply;
mod catalog;
mod install;
mod logical;
pub(crate) mod pgoutput;
pub(crate) mod run;
mod snapshot;
mod stream;
mod trigger;

pub use self::setup::{install, survey, InstallReport, TargetLag};
use crate::{
    child::{ExitGuard, ExitReason, Stop},
    position::Position,
    settings::CaptureMode,
};

mod setup;

/// What a target's replicator is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicationState {
    /// Connecting.
    Starting,
    /// Another process holds the target's replication lock and replicates to it; this one
    /// takes over when that one stops.
    Standby,
    /// The cluster has no accepted primary to replicate from.
    WaitingForPrimary,
    /// Copying tables (a new target or table, or a resync).
    Copying,
    /// Applying changes as they come.
    Streaming,
    /// The last step failed (see `last_error`); it is tried again after
    /// `replicator.retry_interval`.
    Retrying,
    /// Replication to this target stopped, for the reason given; an operator decides.
    Stopped(String),
}

/// One target's replication, as [`Herd::replication`](crate::Herd::replication) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicationStatus {
    /// The target endpoint.
    pub target: Arc<str>,
    /// The cluster it replicates from.
    pub cluster: Arc<str>,
    /// The capture mode.
    pub mode: CaptureMode,
    /// What it is doing.
    pub state: ReplicationState,
    /// The primary it reads from, once connected.
    pub source: Option<Arc<str>>,
    /// The target's batch counter (its progress row), as last seen.
    pub batch: i64,
    /// Batches this process applied.
    pub batches: u64,
    /// Rows this process wrote to the target.
    pub rows: u64,
    /// Failed steps so far.
    pub errors: u64,
    /// The source position the target holds everything up to: a read sent to it with
    /// [`after`](crate::Routable::after) a position at or below this one sees that write.
    pub applied: Option<Position>,
    /// How many bytes of the source's WAL the target was behind at the last step.
    pub lag_bytes: Option<u64>,
    /// Changed rows read from the source and not yet committed on the target (those of the
    /// batch being applied; 0 when caught up). `pgherd status` (and [`survey`]) also counts,
    /// in `trigger` mode, what a target that answers has not read yet; one that does not
    /// answer shows its error there instead.
    pub lag_rows: Option<u64>,
    /// How long ago the target last reflected the source completely (0 to `poll_interval`
    /// when it keeps up; growing while it is down or behind).
    pub lag: Option<Duration>,
    /// The last error, until a session starts cleanly.
    pub last_error: Option<String>,
    /// What could not be guaranteed, e.g. a failover to a primary that may lack transactions the
    /// target had applied (and what was done about it). The latest 16, oldest first; a warning
    /// given again moves to the end.
    pub warnings: Vec<String>,
}

impl ReplicationStatus {
    pub(crate) fn new(target: Arc<str>, cluster: Arc<str>, mode: CaptureMode) -> Self {
        ReplicationStatus {
            target,
            cluster,
            mode,
            state: ReplicationState::Starting,
            source: None,
            batch: 0,
            batches: 0,
            rows: 0,
            errors: 0,
            applied: None,
            lag_bytes: None,
            lag_rows: None,
            lag: None,
            last_error: None,
            warnings: Vec::new(),
        }
    }
}

/// Asks a replicator actor for its status.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ReplicationStatus")]
pub struct GetReplication;

/// The actor that replicates to one target. It owns the target's loop, which runs as a task of
/// its own; the supervisor restarts the actor if that task panics.
pub struct ReplicatorActor {
    spec: run::TargetSpec,
    shared: Arc<run::Shared>,
    abort: Option<tokio::task::AbortHandle>,
    guard: ExitGuard,
}

impl std::fmt::Debug for ReplicatorActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatorActor")
            .field("target", &self.spec.target)
            .finish_non_exhaustive()
    }
}

impl ReplicatorActor {
    pub(crate) fn new(spec: run::TargetSpec, shared: Arc<run::Shared>, guard: ExitGuard) -> Self {
        ReplicatorActor {
            spec,
            shared,
            abort: None,
            guard,
        }
    }
}

impl Actor for ReplicatorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let task = tokio::spawn(run::run(self.spec.clone(), Arc::clone(&self.shared)));
        self.abort = Some(task.abort_handle());
        // Learn of a panic in the loop: the actor stops as poisoned, and is restarted.
        ctx.spawn(task.into_actor(self).map(|outcome, actor, ctx| {
            if outcome
                .as_ref()
                .is_err_and(tokio::task::JoinError::is_panic)
            {
                actor.guard.set_reason(ExitReason::Poisoned(
                    "the replication loop panicked".to_owned(),
                ));
                ctx.stop();
            }
        }));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(abort) = self.abort.take() {
            abort.abort();
        }
    }
}

impl Handler<Stop> for ReplicatorActor {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<GetReplication> for ReplicatorActor {
    type Result = actix::MessageResult<GetReplication>;

    fn handle(&mut self, _: GetReplication, _ctx: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(self.shared.status())
    }
}
