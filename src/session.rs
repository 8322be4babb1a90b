//! Read-your-writes for one logical session (a user, a request, a job), by position.

use std::{fmt, sync::Arc};

use crate::{
    error::Error, herd::Herd, position::Position, query::Request, router::SessionPositions,
};

/// Remembers the position of its last write in each cluster and sends its reads
/// [`after`](crate::Routable::after) it, so that it reads its own writes wherever the reads run.
/// No time window is guessed: a standby serves the read only once it has replayed the write,
/// else the primary does.
///
/// Positions are kept per cluster, because positions of different clusters do not compare: a
/// write in cluster `a` does not hold up reads in cluster `b`. A read that names its own
/// `after` keeps it.
///
/// A session lives on one task (it is not `Send`). To carry read-your-writes across requests,
/// keep [`positions`](Self::positions) (e.g. in a cookie; a [`Position`] displays as `0/16B3748`
/// and parses back) and give them to the next session with [`resume_after`](Self::resume_after).
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
    positions: SessionPositions,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("positions", &self.positions.all())
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(herd: Herd) -> Session {
        Session {
            herd,
            positions: SessionPositions::default(),
        }
    }

    /// Reads in `cluster` go after `position` from now on too (a position kept from an earlier
    /// session).
    pub fn resume_after(&self, cluster: &str, position: Position) {
        self.positions.advance(&Arc::from(cluster), position);
    }

    /// The position of the session's last write in `cluster`, if it wrote there.
    pub fn position(&self, cluster: &str) -> Option<Position> {
        self.positions.get(cluster)
    }

    /// The position of the session's last write in every cluster it wrote to.
    pub fn positions(&self) -> Vec<(Arc<str>, Position)> {
        self.positions.all()
    }

    /// Sends `message`: a read goes after the session's last write in its cluster; a write's
    /// position is remembered for its cluster.
    ///
    /// # Errors
    ///
    /// As [`Herd::send`].
    pub async fn send<M: Request>(&self, message: M) -> Result<M::Output, Error> {
        self.herd.send_in_session(message, &self.positions).await
    }
}
