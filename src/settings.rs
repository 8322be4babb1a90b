//! Settings: a TOML file (`Settings.toml`) layered with `PGHERD_*` environment overrides.
//!
//! ```no_run
//! let settings = pgherd::Settings::load("Settings.toml")?;
//! for (name, endpoint) in &settings.endpoints {
//!     println!("{name}: {} at {}", endpoint.role, endpoint.address());
//! }
//! # Ok::<(), pgherd::SettingsError>(())
//! ```
//!
//! Every key can be overridden from the environment: `PGHERD_` followed by the dotted key with
//! `__` between its parts, e.g. `PGHERD_ENDPOINTS__PRIMARY__PORT=5433` or
//! `PGHERD_POOL__WAIT_TIMEOUT=500ms`. Because of that, every `PGHERD_*` variable must be a setting:
//! a stray one is reported as an unknown key, as a typo in the file is.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

mod duration;
mod endpoint;
mod error;
mod health;
mod pool;
mod replicator;
mod router;
mod supervisor;
mod validate;

pub use endpoint::{EndpointSettings, Role, SslMode, DEFAULT_CLUSTER, DEFAULT_PORT};
pub use error::{SettingsError, SettingsProblem};
pub use health::{FailbackMode, FailoverMode, FailoverSettings, HealthSettings};
pub use pool::{
    PoolOverrides, PoolSettings, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_SIZE,
    DEFAULT_RECYCLE_TIMEOUT, DEFAULT_WAIT_TIMEOUT, MAX_POOL_SIZE,
};
pub(crate) use replicator::split_table;
pub use replicator::{CaptureMode, ReplicatorSettings, ResyncPolicy};
pub use router::{ReadPolicy, RouterSettings, DEFAULT_QUEUE_CAPACITY, DEFAULT_TIMEOUT};
pub use supervisor::SupervisorSettings;
pub use validate::{MAX_DURATION, MAX_ENDPOINT_NAME_LEN, MAX_QUEUE_CAPACITY, MAX_WEIGHT};

/// The prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "PGHERD";

/// Everything pgherd is configured with. See the commented `Settings.toml` for a reference.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// The PostgreSQL endpoints, keyed by a lowercase name (`[endpoints.<name>]`). Exactly one has
    /// `role = "primary"`.
    ///
    /// Default: none (at least one is required).
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointSettings>,
    /// Pool defaults for every endpoint; an endpoint can change them in `[endpoints.<name>.pool]`.
    ///
    /// Default: see [`PoolSettings`].
    #[serde(default)]
    pub pool: PoolSettings,
    /// How the router spreads reads and bounds its work.
    ///
    /// Default: see [`RouterSettings`].
    #[serde(default)]
    pub router: RouterSettings,
    /// How crashed actors are restarted and how the herd shuts down.
    ///
    /// Default: see [`SupervisorSettings`].
    #[serde(default)]
    pub supervisor: SupervisorSettings,
    /// How endpoints are probed.
    ///
    /// Default: see [`HealthSettings`].
    #[serde(default)]
    pub health: HealthSettings,
    /// What happens when a primary is lost.
    ///
    /// Default: see [`FailoverSettings`].
    #[serde(default)]
    pub failover: FailoverSettings,
    /// Which tables are kept equal on the `replica` endpoints, and how.
    ///
    /// Default: see [`ReplicatorSettings`] (off).
    #[serde(default)]
    pub replicator: ReplicatorSettings,
}

impl Settings {
    /// Loads `path` (TOML), applies `PGHERD_*` overrides from the process environment, and
    /// validates the result.
    ///
    /// # Errors
    ///
    /// When the file is missing or is not TOML, a key is unknown or has a bad value, or
    /// [`validate`](Self::validate) finds a problem. Every problem names its key.
    pub fn load(path: impl AsRef<Path>) -> Result<Settings, SettingsError> {
        Self::load_layers(path.as_ref(), None)
    }

    /// Like [`load`](Self::load), but takes the environment overrides from `variables` instead of
    /// the process environment (only the `PGHERD_*` ones are used). Meant for tests and tools.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn load_with_env<K, V>(
        path: impl AsRef<Path>,
        variables: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Settings, SettingsError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let variables = variables
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self::load_layers(path.as_ref(), Some(variables))
    }

    /// Parses settings from TOML text alone (no environment overrides) and validates them.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn from_toml(text: &str) -> Result<Settings, SettingsError> {
        let origin = "the settings text";
        let source = File::from_str(text, FileFormat::Toml);
        let settings = Self::deserialize_layers(origin, source, Some(HashMap::new()))?;
        settings.validated(origin)
    }

    /// Checks the settings as a whole: names, addresses, sizes, timeouts, that exactly one
    /// endpoint is the primary, and that every password source can be read.
    ///
    /// # Errors
    ///
    /// A [`SettingsError`] listing every problem, each naming its key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let problems = validate::problems(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::new("the settings", problems))
        }
    }

    /// The endpoint called `name`.
    pub fn endpoint(&self, name: &str) -> Option<&EndpointSettings> {
        self.endpoints.get(name)
    }

    /// The name and settings of the primary of cluster `"main"`, or of the only cluster.
    pub fn primary(&self) -> Option<(&str, &EndpointSettings)> {
        let primaries = || self.endpoints_with_role(Role::Primary);
        primaries()
            .find(|(_, endpoint)| endpoint.cluster == DEFAULT_CLUSTER)
            .or_else(|| primaries().next())
    }

    /// The clusters the endpoints belong to, in order.
    pub fn clusters(&self) -> std::collections::BTreeSet<&str> {
        self.endpoints
            .values()
            .map(|endpoint| endpoint.cluster.as_str())
            .collect()
    }

    /// The endpoints with `role`, by name.
    pub fn endpoints_with_role(
        &self,
        role: Role,
    ) -> impl Iterator<Item = (&str, &EndpointSettings)> {
        self.endpoints
            .iter()
            .filter(move |(_, endpoint)| endpoint.role == role)
            .map(|(name, endpoint)| (name.as_str(), endpoint))
    }

    /// The replicator's targets: the endpoints named in `replicator.targets`, or every endpoint
    /// with `role = "replica"`. Empty when the replicator is off.
    pub fn replication_targets(&self) -> Vec<(&str, &EndpointSettings)> {
        if !self.replicator.enabled() {
            return Vec::new();
        }
        if self.replicator.targets.is_empty() {
            return self.endpoints_with_role(Role::Replica).collect();
        }
        self.replicator
            .targets
            .iter()
            .filter_map(|name| self.endpoints.get_key_value(name.as_str()))
            .map(|(name, endpoint)| (name.as_str(), endpoint))
            .collect()
    }

    /// The pool settings of endpoint `name`: `[pool]` with the endpoint's overrides applied.
    /// For an unknown name, the `[pool]` defaults.
    pub fn pool_for(&self, name: &str) -> PoolSettings {
        match self.endpoints.get(name) {
            Some(endpoint) => self.pool.with_overrides(&endpoint.pool),
            None => self.pool.clone(),
        }
    }

    fn load_layers(
        path: &Path,
        variables: Option<HashMap<String, String>>,
    ) -> Result<Settings, SettingsError> {
        let origin = path.display().to_string();
        if !path.is_file() {
            let why = if path.exists() {
                "is not a file"
            } else {
                "does not exist"
            };
            return Err(SettingsError::new(
                origin.clone(),
                vec![SettingsProblem::new(
                    "file",
                    format!(
                        "{origin} {why}: give the path of a settings file (see the commented \
                         Settings.toml of the pgherd repository for a reference)"
                    ),
                )],
            ));
        }
        let source = File::from(path).format(FileFormat::Toml).required(true);
        let mut settings = Self::deserialize_layers(&origin, source, variables)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for endpoint in settings.endpoints.values_mut() {
            for file in [&mut endpoint.password_file, &mut endpoint.sslrootcert]
                .into_iter()
                .flatten()
            {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        settings.validated(&origin)
    }

    fn deserialize_layers<S>(
        origin: &str,
        source: S,
        variables: Option<HashMap<String, String>>,
    ) -> Result<Settings, SettingsError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        let environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(variables.map(|vars| {
                vars.into_iter()
                    .filter(|(key, _)| key.starts_with(ENV_PREFIX))
                    .collect()
            }));
        Config::builder()
            .add_source(source)
            .add_source(environment)
            .build()
            .and_then(Config::try_deserialize::<Settings>)
            .map_err(|e| SettingsError::new(origin, vec![error::from_config_error(&e)]))
    }

    fn validated(self, origin: &str) -> Result<Settings, SettingsError> {
        let problems = validate::problems(&self);
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(SettingsError::new(origin, problems))
        }
    }
}
