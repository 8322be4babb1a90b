//! Connection pool sizes and timeouts: defaults in `[pool]`, overrides per endpoint.

use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// Default for [`PoolSettings::max_size`].
pub const DEFAULT_MAX_SIZE: usize = 16;
/// Default for [`PoolSettings::wait_timeout`].
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for [`PoolSettings::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for [`PoolSettings::recycle_timeout`].
pub const DEFAULT_RECYCLE_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest pool size accepted: beyond it the number is almost surely a typo, and PostgreSQL's
/// own `max_connections` (100 by default) would refuse the connections anyway.
pub const MAX_POOL_SIZE: usize = 10_000;

/// The connection pool of an endpoint, as used by its database actor (`[pool]` in `Settings.toml`).
///
/// Every timeout is always set: a pool without timeouts lets a caller wait forever.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolSettings {
    /// The largest number of connections the pool keeps open to one endpoint.
    ///
    /// Default: `16`.
    pub max_size: usize,
    /// How long a query may wait for a free connection when all of them are busy.
    ///
    /// Default: `"2s"`.
    #[serde(deserialize_with = "duration::required")]
    pub wait_timeout: Duration,
    /// How long opening a new connection (TCP, TLS and authentication) may take.
    ///
    /// Default: `"2s"`.
    #[serde(deserialize_with = "duration::required")]
    pub connect_timeout: Duration,
    /// How long checking an idle connection before reuse may take.
    ///
    /// Default: `"1s"`.
    #[serde(deserialize_with = "duration::required")]
    pub recycle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_size: DEFAULT_MAX_SIZE,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            recycle_timeout: DEFAULT_RECYCLE_TIMEOUT,
        }
    }
}

/// Per-endpoint changes to the `[pool]` defaults (`[endpoints.<name>.pool]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolOverrides {
    /// Replaces [`PoolSettings::max_size`] for this endpoint.
    ///
    /// Default: the `[pool]` value.
    pub max_size: Option<usize>,
    /// Replaces [`PoolSettings::wait_timeout`] for this endpoint.
    ///
    /// Default: the `[pool]` value.
    #[serde(deserialize_with = "duration::optional")]
    pub wait_timeout: Option<Duration>,
    /// Replaces [`PoolSettings::connect_timeout`] for this endpoint.
    ///
    /// Default: the `[pool]` value.
    #[serde(deserialize_with = "duration::optional")]
    pub connect_timeout: Option<Duration>,
    /// Replaces [`PoolSettings::recycle_timeout`] for this endpoint.
    ///
    /// Default: the `[pool]` value.
    #[serde(deserialize_with = "duration::optional")]
    pub recycle_timeout: Option<Duration>,
}

impl PoolSettings {
    /// These settings with an endpoint's overrides applied.
    pub fn with_overrides(&self, overrides: &PoolOverrides) -> PoolSettings {
        PoolSettings {
            max_size: overrides.max_size.unwrap_or(self.max_size),
            wait_timeout: overrides.wait_timeout.unwrap_or(self.wait_timeout),
            connect_timeout: overrides.connect_timeout.unwrap_or(self.connect_timeout),
            recycle_timeout: overrides.recycle_timeout.unwrap_or(self.recycle_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_set() {
        let defaults = PoolSettings::default();
        let overrides = PoolOverrides {
            max_size: Some(4),
            ..PoolOverrides::default()
        };
        let merged = defaults.with_overrides(&overrides);
        assert_eq!(merged.max_size, 4);
        assert_eq!(merged.wait_timeout, DEFAULT_WAIT_TIMEOUT);
    }
}
