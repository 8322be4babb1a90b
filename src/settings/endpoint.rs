//! One PostgreSQL endpoint: where it is, how to log in, and what role it plays in the herd.

use std::{fmt, path::PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{de, Deserialize, Deserializer};

use super::{error::SettingsProblem, pool::PoolOverrides};

/// The default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;

/// What an endpoint is to the herd. The router and the failover logic start from these roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Role {
    /// The one server that takes writes (`role = "primary"`).
    Primary,
    /// A physical streaming standby of the primary: read-only, serves reads, can be promoted
    /// (`role = "standby"`).
    Standby,
    /// A separate, writable database kept equal to the primary by the replicator
    /// (`role = "replica"`).
    Replica,
    /// A separate, writable database that takes over when the primary is lost (`role = "backup"`).
    Backup,
}

impl Role {
    /// Every role, in the order the settings reference lists them.
    pub const ALL: [Role; 4] = [Role::Primary, Role::Standby, Role::Replica, Role::Backup];

    /// The name used in settings files.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Replica => "replica",
            Role::Backup => "backup",
        }
    }

    /// Parses a settings name (`"primary"`, `"standby"`, `"replica"`, `"backup"`).
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Role::from_name(&name).ok_or_else(|| {
            de::Error::custom(format!(
                "unknown role `{name}`: expected one of \"primary\", \"standby\" (a physical \
                 streaming standby), \"replica\" (a writable logical replica) or \"backup\" \
                 (an independent failover target)"
            ))
        })
    }
}

/// Whether and how a connection uses TLS (`sslmode`, with libpq's meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SslMode {
    /// Never use TLS (`"disable"`).
    Disable,
    /// Use TLS when the server offers it, without checking its certificate; fall back to a plain
    /// connection otherwise (`"prefer"`). Encrypts, but does not authenticate the server.
    Prefer,
    /// Always use TLS, without checking the certificate (`"require"`). Encrypts, but does not
    /// authenticate the server.
    Require,
    /// Always use TLS and check that the certificate chains to a trusted authority
    /// (`"verify-ca"`), without checking the host name.
    VerifyCa,
    /// Always use TLS, check the chain and that the certificate names the host (`"verify-full"`).
    /// The only mode that protects against an impostor server.
    VerifyFull,
}

impl SslMode {
    /// Every mode, weakest first.
    pub const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The name used in settings files.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked against trusted authorities.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SslMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        SslMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == name)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "unknown sslmode `{name}`: expected one of \"disable\", \"prefer\", \"require\", \
                     \"verify-ca\" or \"verify-full\""
                ))
            })
    }
}

/// The cluster an endpoint belongs to when it names none.
pub const DEFAULT_CLUSTER: &str = "main";

/// One PostgreSQL endpoint (`[endpoints.<name>]` in `Settings.toml`).
///
/// At most one of `password`, `password_env` and `password_file` may be given; with none, the
/// server must accept the user without a password (trust, peer or certificate authentication).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EndpointSettings {
    /// What the endpoint is to the herd: `"primary"`, `"standby"`, `"replica"` or `"backup"`.
    ///
    /// Required.
    pub role: Role,
    /// Host name, IP address, or the directory of a Unix socket (starting with `/`).
    ///
    /// Required.
    pub host: String,
    /// TCP port, from 1 to 65535.
    ///
    /// Default: `5432`.
    #[serde(default = "default_port", deserialize_with = "port")]
    pub port: u16,
    /// The database to connect to.
    ///
    /// Required.
    pub dbname: String,
    /// The user to log in as.
    ///
    /// Required.
    pub user: String,
    /// The password, inline. Prefer `password_env` or `password_file` outside development.
    ///
    /// Default: none.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// The name of an environment variable that holds the password, read at each connection
    /// attempt. Do not start its name with `PGHERD_`: those variables are read as settings.
    ///
    /// Default: none.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file that holds the password (one line; a trailing newline is ignored), read at each
    /// connection attempt, so a rotated password is picked up without a restart. A relative path
    /// is relative to the settings file.
    ///
    /// Default: none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The cluster (a primary with its standbys, replicas and backups) this endpoint belongs to.
    /// One herd can serve several clusters, e.g. one per tenant; a message names its cluster, or
    /// goes to `"main"`. Each cluster has exactly one primary.
    ///
    /// Default: `"main"`.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// This endpoint's share of reads under `read_policy = "weighted"`, from 1 to 1000.
    ///
    /// Default: `1`.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// TLS: `"disable"`, `"prefer"`, `"require"`, `"verify-ca"` or `"verify-full"`, as in libpq.
    /// Only `"verify-full"` authenticates the server.
    ///
    /// Default: `"prefer"` (libpq's default).
    #[serde(default = "default_sslmode")]
    pub sslmode: SslMode,
    /// A PEM file of the certificate authorities trusted for `"verify-ca"` and `"verify-full"`.
    /// A relative path is relative to the settings file.
    ///
    /// Default: none (the Mozilla set of public authorities).
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// Changes to the `[pool]` defaults for this endpoint.
    ///
    /// Default: none (the `[pool]` values apply).
    #[serde(default)]
    pub pool: PoolOverrides,
}

fn default_cluster() -> String {
    DEFAULT_CLUSTER.to_owned()
}

fn default_weight() -> u32 {
    1
}

fn default_sslmode() -> SslMode {
    SslMode::Prefer
}

fn default_port() -> u16 {
    DEFAULT_PORT
}

/// Reads a port as a wide integer first, so that `70000` gets a message about ports rather than
/// about 16-bit integers.
fn port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let value = i64::deserialize(deserializer)?;
    u16::try_from(value).map_err(|_| {
        de::Error::custom(format!(
            "{value} is not a TCP port: expected a number from 1 to 65535"
        ))
    })
}

impl EndpointSettings {
    /// An endpoint with the given role and address, the default port and no password.
    pub fn new(
        role: Role,
        host: impl Into<String>,
        dbname: impl Into<String>,
        user: impl Into<String>,
    ) -> Self {
        Self {
            role,
            host: host.into(),
            port: DEFAULT_PORT,
            dbname: dbname.into(),
            user: user.into(),
            password: None,
            password_env: None,
            password_file: None,
            cluster: default_cluster(),
            weight: default_weight(),
            sslmode: default_sslmode(),
            sslrootcert: None,
            pool: PoolOverrides::default(),
        }
    }

    /// This endpoint in another cluster.
    #[must_use]
    pub fn with_cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = cluster.into();
        self
    }

    /// This endpoint with another TLS mode and, optionally, trusted authorities.
    #[must_use]
    pub fn with_tls(mut self, sslmode: SslMode, sslrootcert: Option<PathBuf>) -> Self {
        self.sslmode = sslmode;
        self.sslrootcert = sslrootcert;
        self
    }

    /// This endpoint on another port.
    #[must_use]
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// This endpoint with an inline password (replacing any other password source).
    #[must_use]
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(SecretString::from(password.into()));
        self.password_env = None;
        self.password_file = None;
        self
    }

    /// This endpoint with its password read from a file (replacing any other password source).
    #[must_use]
    pub fn with_password_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.password = None;
        self.password_env = None;
        self.password_file = Some(path.into());
        self
    }

    /// `host:port` for messages and logs (`[host]:port` for an IPv6 address).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the password from whichever source is configured, reading the environment
    /// variable or the file now.
    ///
    /// # Errors
    ///
    /// When more than one source is given, the variable is not set, or the file cannot be read
    /// or is empty. `key` is the endpoint's settings key (`endpoints.<name>`), used in the problem.
    pub fn resolve_password(&self, key: &str) -> Result<Option<SecretString>, SettingsProblem> {
        let given = [
            self.password.is_some().then_some("password"),
            self.password_env.is_some().then_some("password_env"),
            self.password_file.is_some().then_some("password_file"),
        ];
        let given: Vec<&str> = given.into_iter().flatten().collect();
        if given.len() > 1 {
            return Err(SettingsProblem::new(
                format!("{key}.password"),
                format!(
                    "the password is given more than once ({}): keep exactly one of password, \
                     password_env and password_file",
                    given.join(", ")
                ),
            ));
        }
        if let Some(password) = &self.password {
            if password.expose_secret().is_empty() {
                return Err(SettingsProblem::new(
                    format!("{key}.password"),
                    "is empty: give the password, or remove the key for password-less authentication",
                ));
            }
            return Ok(Some(password.clone()));
        }
        if let Some(variable) = &self.password_env {
            return match std::env::var(variable) {
                Ok(value) if !value.is_empty() => Ok(Some(SecretString::from(value))),
                Ok(_) => Err(SettingsProblem::new(
                    format!("{key}.password_env"),
                    format!(
                        "the environment variable `{variable}` is empty: set it to the password"
                    ),
                )),
                Err(_) => Err(SettingsProblem::new(
                    format!("{key}.password_env"),
                    format!(
                        "the environment variable `{variable}` is not set (or not UTF-8): set it \
                         to the password, or use password_file"
                    ),
                )),
            };
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|error| {
                SettingsProblem::new(
                    format!("{key}.password_file"),
                    format!(
                        "cannot read `{}` ({error}): point it at a readable file that holds the password",
                        path.display()
                    ),
                )
            })?;
            let password = text.strip_suffix('\n').unwrap_or(&text);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                return Err(SettingsProblem::new(
                    format!("{key}.password_file"),
                    format!("`{}` is empty: write the password into it", path.display()),
                ));
            }
            return Ok(Some(SecretString::from(password.to_owned())));
        }
        Ok(None)
    }
}

impl fmt::Debug for EndpointSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written by hand so that no password can reach a log through `{:?}`.
        f.debug_struct("EndpointSettings")
            .field("role", &self.role)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("cluster", &self.cluster)
            .field("weight", &self.weight)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("pool", &self.pool)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let endpoint =
            EndpointSettings::new(Role::Primary, "db", "app", "app").with_password("s3cr3t-value");
        let text = format!("{endpoint:?}");
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn password_given_twice_names_both_sources() {
        let mut endpoint =
            EndpointSettings::new(Role::Primary, "db", "app", "app").with_password("x");
        endpoint.password_env = Some("APP_DB_PASSWORD".into());
        let problem = endpoint.resolve_password("endpoints.primary").unwrap_err();
        assert_eq!(problem.key(), "endpoints.primary.password");
        assert!(problem.message().contains("password, password_env"));
    }

    #[test]
    fn roles_parse_by_name() {
        for role in Role::ALL {
            assert_eq!(Role::from_name(role.as_str()), Some(role));
        }
        assert_eq!(Role::from_name("Primary"), None);
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let endpoint = EndpointSettings::new(Role::Primary, "::1", "app", "app").with_port(6000);
        assert_eq!(endpoint.address(), "[::1]:6000");
    }
}
