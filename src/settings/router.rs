//! How the router picks endpoints and bounds its work (`[router]`).

use std::{fmt, time::Duration};

use serde::{de, Deserialize, Deserializer};

use super::duration;

/// Default for [`RouterSettings::queue_capacity`].
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Default for [`RouterSettings::default_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How reads are spread over the endpoints that may serve them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReadPolicy {
    /// Each in turn (`"round_robin"`).
    RoundRobin,
    /// The one with the fewest queries in flight from this herd (`"least_outstanding"`).
    LeastOutstanding,
    /// The one with the lowest recent query latency, an exponentially weighted moving average
    /// (`"lowest_latency"`).
    LowestLatency,
    /// In proportion to each endpoint's `weight` (`"weighted"`, smooth weighted round robin).
    Weighted,
}

impl ReadPolicy {
    /// Every policy.
    pub const ALL: [ReadPolicy; 4] = [
        ReadPolicy::RoundRobin,
        ReadPolicy::LeastOutstanding,
        ReadPolicy::LowestLatency,
        ReadPolicy::Weighted,
    ];

    /// The name used in settings files.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadPolicy::RoundRobin => "round_robin",
            ReadPolicy::LeastOutstanding => "least_outstanding",
            ReadPolicy::LowestLatency => "lowest_latency",
            ReadPolicy::Weighted => "weighted",
        }
    }
}

impl fmt::Display for ReadPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ReadPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        ReadPolicy::ALL
            .into_iter()
            .find(|policy| policy.as_str() == name)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown read policy `{name}`: expected one of \"round_robin\", \
                     \"least_outstanding\", \"lowest_latency\" or \"weighted\""
                ))
            })
    }
}

/// The router (`[router]` in `Settings.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RouterSettings {
    /// How reads are spread over standbys and replicas.
    ///
    /// Default: `"round_robin"`.
    pub read_policy: ReadPolicy,
    /// Whether a read may go to the primary when no standby or replica can serve it.
    ///
    /// Default: `true`.
    pub fallback_to_primary: bool,
    /// How many messages the router holds at once (waiting for a connection, a target, or
    /// running). Beyond it, new messages get an `Overloaded` error at once, so memory stays bounded.
    ///
    /// Default: `1024`.
    pub queue_capacity: usize,
    /// The deadline of a message that sets none: it covers queueing, connection checkout,
    /// execution and any wait for a target.
    ///
    /// Default: `"5s"`.
    #[serde(deserialize_with = "duration::required")]
    pub default_timeout: Duration,
    /// Standbys lagging behind their primary by more than this get no reads (a message may ask
    /// for less with `max_lag`). Reads then go to fresher standbys, or to the primary.
    ///
    /// Default: `"10s"`.
    #[serde(deserialize_with = "duration::required")]
    pub max_lag: Duration,
}

impl Default for RouterSettings {
    fn default() -> Self {
        Self {
            read_policy: ReadPolicy::RoundRobin,
            fallback_to_primary: true,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            default_timeout: DEFAULT_TIMEOUT,
            max_lag: Duration::from_secs(10),
        }
    }
}
