//! Read-your-writes for one logical session (a user, a request, a job), by position.

use std::{cell::Cell, fmt};

use crate::{
    error::Error,
    herd::Herd,
    position::Position,
    query::{Intent, Request},
};

/// Remembers the position of its last write and sends its reads [`after`](Routable::after) it,
/// so that it reads its own writes wherever the reads run. No time window is guessed: a standby
/// serves the read only once it has replayed the write, else the primary does.
///
/// A session lives on one task (it is not `Send`). To carry read-your-writes across requests,
/// keep [`position`](Self::position) (e.g. in a cookie) and start the next session with
/// [`resume_after`](Self::resume_after).
///
/// ```no_run
/// # async fn demo(herd: pgherd::Herd) -> Result<(), pgherd::Error> {
/// use pgherd::{Read, Write};
/// let session = herd.session();
/// session.send(Write::new("UPDATE users SET name = 'Ada' WHERE id = 1")).await?;
/// // Runs where the update has been replayed: never misses it.
/// let rows = session.send(Read::new("SELECT name FROM users WHERE id = 1")).await?;
/// # Ok(()) }
/// ```
pub struct Session {
    herd: Herd,
    last: Cell<Option<Position>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("last", &self.last.get())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(herd: Herd) -> Session {
        Session {
            herd,
            last: Cell::new(None),
        }
    }

    /// Reads after `position` from now on too (a position kept from an earlier session).
    pub fn resume_after(&self, position: Position) {
        self.last.set(self.last.get().max(Some(position)));
    }

    /// The position of the session's last write, if it made one.
    pub fn position(&self) -> Option<Position> {
        self.last.get()
    }

    /// Sends `message`: a read goes after the session's last write; a write's position is
    /// remembered.
    ///
    /// # Errors
    ///
    /// As [`Herd::send`].
    pub async fn send<M: Request>(&self, message: M) -> Result<M::Output, Error> {
        let message = match (message.intent(), self.last.get()) {
            (Intent::Read, Some(position)) => message.after(position),
            _ => message,
        };
        let tracked = self.herd.send_tracked(message).await?;
        if let Some(position) = tracked.position {
            self.resume_after(position);
        }
        Ok(tracked.value)
    }
}
