//! The work a message asks of one connection, and how far it got: what the executor runs.
//!
//! The items are `pub` in a private module: nameable inside the crate, sealed outside it
//! (applications use the message types and the public [`Request`](super::Request) trait).

use std::{any::Any, cell::Cell};

use deadpool_postgres::ClientWrapper;

use super::Intent;
use crate::{error::Error, position::Position};

/// How far a job got on its connection, which decides what a connection failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    /// Nothing that can change data was sent: a failure leaves no trace, retrying is safe.
    NotSent,
    /// An explicit transaction is open and its COMMIT was not sent: a failure rolls it back.
    InTransaction,
    /// A statement that commits on its own, or a COMMIT, was sent: after a failure, whether it
    /// was committed is unknown.
    Committing,
    /// The commit was confirmed: whatever fails afterwards, the write took effect.
    Committed,
}

/// Records a job's [`Stage`] as it runs, and the position a write reached.
#[derive(Debug, Default)]
pub struct Progress {
    stage: Cell<Option<Stage>>,
    position: Cell<Option<Position>>,
}

impl Progress {
    pub(crate) fn stage(&self) -> Stage {
        self.stage.get().unwrap_or(Stage::NotSent)
    }

    pub(crate) fn reach(&self, stage: Stage) {
        self.stage.set(Some(stage));
    }

    /// The position a committed write reached, once known.
    pub(crate) fn position(&self) -> Option<Position> {
        self.position.get()
    }

    pub(crate) fn committed_at(&self, position: Position) {
        self.position.set(Some(position));
    }
}

/// Work for one connection. Every message to the router becomes a job.
pub trait Job: 'static {
    /// What a successful run produces.
    type Output: 'static;

    /// Read or write.
    fn intent(&self) -> Intent;

    /// The message itself, for user routing rules to inspect.
    fn as_any(&self) -> &dyn Any;

    /// The message's query type, for user routing rules.
    fn type_name(&self) -> &'static str {
        std::any::type_name::<Self>()
    }

    /// Whether [`run`](Self::run) can be called again (a closure that already ran cannot).
    fn rerunnable(&self) -> bool {
        true
    }

    /// Runs on `client`, recording its progress. May be called again after a failure at
    /// [`Stage::NotSent`], or after any connection failure for an idempotent message.
    // Sealed, and its futures run on the caller's thread: no `Send` bound is wanted.
    #[allow(async_fn_in_trait)]
    async fn run(
        &self,
        client: &mut ClientWrapper,
        progress: &Progress,
    ) -> Result<Self::Output, Error>;
}
