//! How endpoints are probed (`[health]`) and what happens when a primary is lost
//! (`[failover]`).

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

use super::duration;

/// The health actor (`[health]` in `Settings.toml`).
///
/// Every endpoint is probed on a connection of its own (never through the application's pool)
/// every `interval`; each probe reads reachability, round trip, whether it is in recovery, its
/// position and timeline. `failures_to_down` failed probes in a row declare it down,
/// `successes_to_up` good ones bring it back. While an endpoint is suspect (a probe just failed)
/// or recovering, it is probed every `suspect_interval`, so that a dead primary is declared down
/// quickly; while it is down, the wait doubles from `suspect_interval` up to `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HealthSettings {
    /// The time between the end of one probe and the start of the next.
    ///
    /// Default: `"250ms"`.
    #[serde(deserialize_with = "duration::required")]
    pub interval: Duration,
    /// The time between probes of an endpoint that is suspect or recovering; while it is down,
    /// the wait starts here and doubles with each failure up to `interval`.
    ///
    /// Default: `"50ms"`.
    #[serde(deserialize_with = "duration::required")]
    pub suspect_interval: Duration,
    /// How long one probe (connecting included) may take before it counts as failed.
    ///
    /// Default: `"300ms"`.
    #[serde(deserialize_with = "duration::required")]
    pub timeout: Duration,
    /// Failed probes in a row that declare an endpoint down.
    ///
    /// Default: `3`.
    pub failures_to_down: u32,
    /// Successful probes in a row that bring a down endpoint back.
    ///
    /// Default: `2`.
    pub successes_to_up: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            suspect_interval: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            failures_to_down: 3,
            successes_to_up: 2,
        }
    }
}

/// What to do when the primary is declared down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailoverMode {
    /// An external manager (Patroni, pg_auto_failover, an operator) promotes a standby; pgherd
    /// finds the new primary by probing and follows it (`"follow"`).
    Follow,
    /// pgherd promotes the standby that received the most WAL, with `pg_promote()`
    /// (`"promote"`). The login needs `EXECUTE` on `pg_promote`.
    Promote,
    /// Writes move to the cluster's `backup` endpoint (`"backup"`).
    Backup,
    /// Nothing happens until an operator accepts a new primary (`"manual"`).
    Manual,
}

impl FailoverMode {
    /// Every mode.
    pub const ALL: [FailoverMode; 4] = [
        FailoverMode::Follow,
        FailoverMode::Promote,
        FailoverMode::Backup,
        FailoverMode::Manual,
    ];

    /// The name used in settings files.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverMode::Follow => "follow",
            FailoverMode::Promote => "promote",
            FailoverMode::Backup => "backup",
            FailoverMode::Manual => "manual",
        }
    }
}

impl<'de> Deserialize<'de> for FailoverMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        FailoverMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == name)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown failover mode `{name}`: expected \"follow\" (an external manager \
                     promotes), \"promote\" (pgherd promotes), \"backup\" (writes move to the \
                     backup) or \"manual\""
                ))
            })
    }
}

/// What happens when a primary that lost its role comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailbackMode {
    /// It stays fenced (no traffic) until an operator re-admits it or makes it the primary again
    /// (`"manual"`): data written elsewhere meanwhile must not be abandoned silently.
    Manual,
    /// With `mode = "backup"`: writes move back to the configured primary once it is up again
    /// (`"automatic"`). Whatever was written to the backup meanwhile stays there.
    Automatic,
}

impl<'de> Deserialize<'de> for FailbackMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "manual" => Ok(FailbackMode::Manual),
            "automatic" => Ok(FailbackMode::Automatic),
            _ => Err(de::Error::custom(format!(
                "unknown failback mode `{name}`: expected \"manual\" or \"automatic\""
            ))),
        }
    }
}

/// Failover (`[failover]` in `Settings.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct FailoverSettings {
    /// What to do when the primary is declared down: `"follow"`, `"promote"`, `"backup"` or
    /// `"manual"`.
    ///
    /// Default: `"follow"`.
    pub mode: FailoverMode,
    /// What happens when a primary that lost its role comes back: `"manual"` or `"automatic"`.
    ///
    /// Default: `"manual"`.
    pub failback: FailbackMode,
    /// How long a promotion (`pg_promote`) may take.
    ///
    /// Default: `"10s"`.
    #[serde(deserialize_with = "duration::required")]
    pub promote_timeout: Duration,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            mode: FailoverMode::Follow,
            failback: FailbackMode::Manual,
            promote_timeout: Duration::from_secs(10),
        }
    }
}
