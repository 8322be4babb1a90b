//! What every message to the router may say besides its SQL: deadline, target, cluster,
//! idempotence.

use std::time::{Duration, Instant};

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
        self.options_mut().deadline = Some(Instant::now() + timeout);
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

    /// Declares that running the message twice does no harm (an upsert, a delete by key...), so
    /// that a write may be retried even when its first attempt's outcome is unknown.
    #[must_use]
    fn idempotent(mut self) -> Self {
        self.options_mut().idempotent = true;
        self
    }
}
