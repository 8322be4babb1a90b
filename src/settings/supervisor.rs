//! How the supervisor restarts failed actors and shuts down (`[supervisor]`).

use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// The supervisor (`[supervisor]` in `Settings.toml`).
///
/// A crashed actor (a panic, or a poisoned state) is restarted after a backoff that doubles with
/// each consecutive failure. When more than `max_restarts` restarts happen within
/// `restart_period`, the supervisor gives up: it stops every actor and the router answers every
/// message with an error that says why. An unreachable database is not a crash and never counts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SupervisorSettings {
    /// The most restarts allowed within `restart_period`.
    ///
    /// Default: `5`.
    pub max_restarts: u32,
    /// The window over which restarts are counted.
    ///
    /// Default: `"60s"`.
    #[serde(deserialize_with = "duration::required")]
    pub restart_period: Duration,
    /// The wait before the first restart of an actor; it doubles for each consecutive one.
    ///
    /// Default: `"100ms"`.
    #[serde(deserialize_with = "duration::required")]
    pub backoff_initial: Duration,
    /// The longest wait before a restart.
    ///
    /// Default: `"10s"`.
    #[serde(deserialize_with = "duration::required")]
    pub backoff_max: Duration,
    /// On shutdown, how long messages in flight may take to finish before connections are closed.
    ///
    /// Default: `"5s"`.
    #[serde(deserialize_with = "duration::required")]
    pub shutdown_grace: Duration,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            restart_period: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}
