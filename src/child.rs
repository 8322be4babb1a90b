//! What a supervised actor carries so that its supervisor learns when and why it ended, a panic
//! included (actix's own `Supervisor` never learns of a panic: the actor is simply dropped).

use std::{fmt, sync::Arc};

use actix::{Message, Recipient};

/// Which child of the supervisor an actor is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ChildId {
    /// The database actor of the endpoint with this name.
    Database(Arc<str>),
    /// The health actor.
    Health,
    /// The router.
    Router,
    /// The replicator of the target endpoint with this name.
    Replicator(Arc<str>),
}

impl fmt::Display for ChildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildId::Database(name) => write!(f, "database `{name}`"),
            ChildId::Health => f.write_str("health"),
            ChildId::Router => f.write_str("router"),
            ChildId::Replicator(name) => write!(f, "replicator of `{name}`"),
        }
    }
}

/// Why a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// It was stopped on purpose (shutdown).
    Stopped,
    /// It panicked.
    Panicked,
    /// It stopped itself because its state could no longer be trusted (e.g. code it ran for a
    /// message panicked).
    Poisoned(String),
}

impl ExitReason {
    /// Whether the child ended on purpose, which calls for no restart.
    pub fn is_normal(&self) -> bool {
        matches!(self, ExitReason::Stopped)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Stopped => f.write_str("stopped"),
            ExitReason::Panicked => f.write_str("panicked"),
            ExitReason::Poisoned(reason) => write!(f, "poisoned: {reason}"),
        }
    }
}

/// Sent to the supervisor when a child ends, whatever the cause.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub(crate) struct ChildExited {
    pub(crate) child: ChildId,
    pub(crate) generation: u64,
    pub(crate) reason: ExitReason,
}

/// A field of every supervised actor: when the actor is dropped (stopped, or unwound by a panic)
/// it tells the supervisor.
pub(crate) struct ExitGuard {
    supervisor: Recipient<ChildExited>,
    child: ChildId,
    generation: u64,
    reason: Option<ExitReason>,
}

impl ExitGuard {
    pub(crate) fn new(supervisor: Recipient<ChildExited>, child: ChildId, generation: u64) -> Self {
        ExitGuard {
            supervisor,
            child,
            generation,
            reason: None,
        }
    }

    /// Records why the actor is about to stop itself.
    pub(crate) fn set_reason(&mut self, reason: ExitReason) {
        self.reason = Some(reason);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

impl fmt::Debug for ExitGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitGuard")
            .field("child", &self.child)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            ExitReason::Panicked
        } else {
            self.reason.take().unwrap_or(ExitReason::Stopped)
        };
        // Rare and must not be lost to a full mailbox: `do_send` queues regardless of capacity.
        self.supervisor.do_send(ChildExited {
            child: self.child.clone(),
            generation: self.generation,
            reason,
        });
    }
}

/// Asks a child to stop (shutdown, or the supervisor giving up). Its exit reason is
/// [`ExitReason::Stopped`].
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub(crate) struct Stop;
