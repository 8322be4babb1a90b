//! What every message to the router may say besides its SQL: deadline, target, cluster,
//! idempotence.

use std::time::{Duration, Instant};

use crate::position::Position;

/// The longest timeout a message may set: about a year.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Routing options carried by every message to the router. Set them with the [`Routable`]
/// methods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteOptions {
    /// When the message must be answered by. Default: `router.default_timeout` after the router
    /// receives it.
    pub deadline: Option<Instant>,
    /// The endpoint that must run the message, whatever its intent and role.
    pub target: Option<String>,
    /// The cluster (tenant) whose endpoints may run the message. Default: `"main"`.
    pub cluster: Option<String>,
    /// Whether running the message twice is harmless, so that a write may be retried after a
    /// connection failure whose commit outcome is unknown.
    pub idempotent: bool,
    /// A read runs only where this position has been replayed (read-your-writes).
    pub after: Option<Position>,
    /// A read runs only on a standby lagging at most this much (or on the primary).
    pub max_lag: Option<Duration>,
}

/// Builder methods for the routing options of a message: `msg.timeout(..).target(..)`.
pub trait Routable: Sized {
    /// The message's routing options.
    fn options_mut(&mut self) -> &mut RouteOptions;

    /// The message's routing options.
    fn options(&self) -> &RouteOptions;

    /// Answers by `timeout` from now. One deadline covers queueing, connection checkout,
    /// execution, retries and any wait for a target.
    #[must_use]
    fn timeout(mut self, timeout: Duration) -> Self {
        // A timeout too large to add is no deadline worth keeping: a year stands in for it.
        let now = Instant::now();
        let deadline = now.checked_add(timeout.min(LONGEST_TIMEOUT)).unwrap_or(now);
        self.options_mut().deadline = Some(deadline);
        self
    }

    /// Answers by `deadline`.
    #[must_use]
    fn deadline(mut self, deadline: Instant) -> Self {
        self.options_mut().deadline = Some(deadline);
        self
    }

    /// Runs on the endpoint called `endpoint`, whatever the message's intent and the endpoint's
    /// role (explicit selection, e.g. to write to a backup or read from one standby).
    #[must_use]
    fn target(mut self, endpoint: impl Into<String>) -> Self {
        self.options_mut().target = Some(endpoint.into());
        self
    }

    /// Runs on an endpoint of cluster `cluster` (a tenant's database), instead of `"main"`.
    #[must_use]
    fn cluster(mut self, cluster: impl Into<String>) -> Self {
        self.options_mut().cluster = Some(cluster.into());
        self
    }

    /// Reads only where `position` has been replayed, so that the read sees the write that
    /// returned it: on a standby known (or checked, on the same connection) to have replayed it,
    /// else on the primary. No time window is guessed. A later position replaces an earlier one.
    #[must_use]
    fn after(mut self, position: Position) -> Self {
        let options = self.options_mut();
        options.after = options.after.max(Some(position));
        self
    }

    /// Reads only on a standby whose lag behind the primary is known to be at most `lag` (else
    /// on the primary, when `router.fallback_to_primary` allows it).
    #[must_use]
    fn max_lag(mut self, lag: Duration) -> Self {
        self.options_mut().max_lag = Some(lag);
        self
    }

    /// Declares that running the message twice does no harm (an upsert, a delete by key...), so
    /// that a write may be retried even when its first attempt's outcome is unknown.
    #[must_use]
    fn idempotent(mut self) -> Self {
        self.options_mut().idempotent = true;
        self
    }
}
