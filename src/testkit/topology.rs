//! A set of throwaway servers started together: a primary, its physical standbys, and
//! independent databases, plus the [`Settings`] that point at them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use secrecy::{ExposeSecret, SecretString};

use super::{
    binaries::Binaries,
    node::{random_password, Login, Node, ServerConf, Workspace, ADMIN_USER},
    proxy::FaultProxy,
    reaper::Reaper,
    server_user::ServerUser,
    TestkitError,
};
use crate::{
    settings::{Role, Settings},
    sql::{quote_ident, quote_literal},
};

/// The prefix of every topology's temporary directory (and so of every server's data directory),
/// which is how leftover servers of a test run can be recognised: `pgrep -f pgherd-testkit-`.
pub const ROOT_PREFIX: &str = "pgherd-testkit-";
/// The free space `/dev/shm` must have to be used for topologies.
const SCRATCH_MIN_FREE: u64 = 4 << 30;
/// How many times a node whose port was taken moves to another port before giving up.
const PORT_ATTEMPTS: usize = 5;

#[derive(Debug, Clone)]
struct NodeSpec {
    name: String,
    role: Role,
    port: Option<u16>,
    login: Option<Login>,
}

/// Describes a topology to start. Start from [`Topology::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), pgherd::testkit::TestkitError> {
/// use pgherd::testkit::Topology;
/// let topology = Topology::builder().standbys(2).backup("backup").start().await?;
/// let settings = topology.settings(); // endpoints primary, standby_1, standby_2, backup
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is awaited"]
pub struct TopologyBuilder {
    primary: NodeSpec,
    standbys: Vec<NodeSpec>,
    independents: Vec<NodeSpec>,
    synchronous: usize,
    conf: ServerConf,
    tls: bool,
    login: Option<Login>,
    proxied: BTreeSet<String>,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        Self {
            primary: NodeSpec {
                name: "primary".to_owned(),
                role: Role::Primary,
                port: None,
                login: None,
            },
            standbys: Vec::new(),
            independents: Vec::new(),
            synchronous: 0,
            conf: ServerConf::default(),
            tls: false,
            login: None,
            proxied: BTreeSet::new(),
        }
    }
}

impl TopologyBuilder {
    /// Names the primary (default `primary`).
    pub fn primary(mut self, name: impl Into<String>) -> Self {
        self.primary.name = name.into();
        self
    }

    /// Adds `count` physical standbys named `standby_1`, `standby_2`, ...
    pub fn standbys(mut self, count: usize) -> Self {
        let first = self.standbys.len() + 1;
        for number in first..first + count {
            self = self.standby(format!("standby_{number}"));
        }
        self
    }

    /// Adds a physical standby of the primary called `name`.
    pub fn standby(mut self, name: impl Into<String>) -> Self {
        self.standbys.push(NodeSpec {
            name: name.into(),
            role: Role::Standby,
            port: None,
            login: None,
        });
        self
    }

    /// Adds an independent server (its own `initdb`) with role `backup`.
    pub fn backup(self, name: impl Into<String>) -> Self {
        self.independent(name, Role::Backup)
    }

    /// Adds an independent server (its own `initdb`) with role `replica`.
    pub fn replica(self, name: impl Into<String>) -> Self {
        self.independent(name, Role::Replica)
    }

    /// Adds an independent server (its own `initdb`, so its own system identifier) with `role`
    /// in the rendered settings.
    pub fn independent(mut self, name: impl Into<String>, role: Role) -> Self {
        self.independents.push(NodeSpec {
            name: name.into(),
            role,
            port: None,
            login: None,
        });
        self
    }

    /// Makes the first `count` standbys synchronous: the primary waits for `count` of them to
    /// flush each commit (`synchronous_standby_names = 'ANY count (...)'` over all standbys).
    pub fn synchronous(mut self, count: usize) -> Self {
        self.synchronous = count;
        self
    }

    /// Starts every server with `wal_level = logical` (for logical decoding and native logical
    /// replication).
    pub fn logical(mut self, logical: bool) -> Self {
        self.conf.logical = logical;
        self
    }

    /// Turns `fsync` on. It is off by default: the testkit kills processes, never the machine,
    /// so the page cache survives every fault it can inject.
    pub fn durable(mut self, durable: bool) -> Self {
        self.conf.durable = durable;
        self
    }

    /// Loads `pg_stat_statements` (and creates the extension in the login's database), so tests
    /// can ask each server which statements it ran.
    pub fn stat_statements(mut self, enabled: bool) -> Self {
        self.conf.stat_statements = enabled;
        self
    }

    /// Turns TLS on for every server, with a certificate for `localhost` signed by a throwaway
    /// authority (see [`Topology::tls`]). Plain connections are still accepted.
    pub fn tls(mut self, enabled: bool) -> Self {
        self.tls = enabled;
        self
    }

    /// Adds a `postgresql.conf` line to every server, e.g. `.server_setting("max_connections", "50")`.
    /// The value is written as is, so quote strings: `"'on'"`.
    pub fn server_setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.conf.extra.push((key.into(), value.into()));
        self
    }

    /// The login (user, password, database) every server gets and the settings use. Default: user
    /// and database `pgherd` with a random password.
    pub fn login(mut self, login: Login) -> Self {
        self.login = Some(login);
        self
    }

    /// Puts node `name` on a fixed port instead of a free one.
    pub fn port(mut self, name: &str, port: u16) -> Self {
        for spec in self.specs_mut() {
            if spec.name == name {
                spec.port = Some(port);
            }
        }
        self
    }

    /// Gives node `name` its own login.
    pub fn node_login(mut self, name: &str, login: Login) -> Self {
        for spec in self.specs_mut() {
            if spec.name == name {
                spec.login = Some(login.clone());
            }
        }
        self
    }

    /// Puts a [`FaultProxy`] in front of node `name`; the rendered settings point at the proxy.
    pub fn proxied(mut self, name: impl Into<String>) -> Self {
        self.proxied.insert(name.into());
        self
    }

    /// A topology matching the endpoints of `settings`: the primary, a physical standby of it for
    /// every `standby` endpoint, and an independent server for every `replica` and `backup`, each
    /// on its endpoint's port with its endpoint's user, password and database.
    ///
    /// # Errors
    ///
    /// When an endpoint is not on this machine (`127.0.0.1` or `localhost`), has no password, or
    /// the settings have no primary.
    pub fn from_settings(settings: &Settings) -> Result<TopologyBuilder, TestkitError> {
        let (primary_name, _) = settings
            .primary()
            .ok_or_else(|| TestkitError::Invalid("the settings have no primary".into()))?;
        let mut builder = TopologyBuilder::default().primary(primary_name);
        for (name, endpoint) in &settings.endpoints {
            if endpoint.host != "127.0.0.1" && endpoint.host != "localhost" {
                return Err(TestkitError::Invalid(format!(
                    "endpoint `{name}` is on host `{}`: local servers can only serve \
                     127.0.0.1 or localhost",
                    endpoint.host
                )));
            }
            let password = endpoint
                .resolve_password(&format!("endpoints.{name}"))
                .map_err(|problem| TestkitError::Invalid(problem.to_string()))?
                .ok_or_else(|| {
                    TestkitError::Invalid(format!(
                        "endpoint `{name}` has no password: the local servers use password \
                         authentication, so give one"
                    ))
                })?;
            let login = Login {
                user: endpoint.user.clone(),
                password,
                dbname: endpoint.dbname.clone(),
            };
            builder = match endpoint.role {
                Role::Primary => builder,
                Role::Standby => builder.standby(name.clone()),
                role => builder.independent(name.clone(), role),
            };
            builder = builder.port(name, endpoint.port).node_login(name, login);
        }
        Ok(builder)
    }

    fn specs_mut(&mut self) -> impl Iterator<Item = &mut NodeSpec> {
        std::iter::once(&mut self.primary)
            .chain(self.standbys.iter_mut())
            .chain(self.independents.iter_mut())
    }

    fn specs(&self) -> impl Iterator<Item = &NodeSpec> {
        std::iter::once(&self.primary)
            .chain(self.standbys.iter())
            .chain(self.independents.iter())
    }

    fn check(&self) -> Result<(), TestkitError> {
        let mut names = BTreeSet::new();
        for spec in self.specs() {
            let mut chars = spec.name.chars();
            let well_formed = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !well_formed {
                return Err(TestkitError::Invalid(format!(
                    "node name `{}`: expected lowercase letters, digits and `_`",
                    spec.name
                )));
            }
            if spec.name == "tls" {
                return Err(TestkitError::Invalid(
                    "`tls` is reserved for the certificate directory: pick another node name"
                        .to_owned(),
                ));
            }
            if !names.insert(spec.name.as_str()) {
                return Err(TestkitError::Invalid(format!(
                    "two nodes are called `{}`",
                    spec.name
                )));
            }
        }
        for name in &self.proxied {
            if !names.contains(name.as_str()) {
                return Err(TestkitError::Invalid(format!(
                    "cannot proxy `{name}`: there is no such node"
                )));
            }
        }
        if self.synchronous > self.standbys.len() {
            return Err(TestkitError::Invalid(format!(
                "{} synchronous standbys asked for, but there are {} standbys",
                self.synchronous,
                self.standbys.len()
            )));
        }
        Ok(())
    }

    /// Starts every server, and returns once the primary and the independent servers accept
    /// connections and every standby streams from the primary.
    ///
    /// # Errors
    ///
    /// When the binaries are missing (the error says how to install them), a server does not
    /// start (the error quotes its log), or a fixed port is taken.
    pub async fn start(self) -> Result<Topology, TestkitError> {
        self.check()?;
        let started = Instant::now();
        let binaries = Binaries::find()?;
        let server_user = ServerUser::detect()?;
        let root = tempfile::Builder::new()
            .prefix(ROOT_PREFIX)
            .tempdir_in(scratch_dir())
            .map_err(TestkitError::io("creating the topology directory"))?;
        server_user.give(root.path())?;
        let reaper = Reaper::watch(root.path())?;
        let mut conf = self.conf.clone();
        if self.tls {
            conf.tls = Some(super::tls::generate(
                &root.path().join("tls"),
                &server_user,
            )?);
        }
        let tls = conf.tls.clone();
        let workspace = Arc::new(Workspace {
            root: root.path().to_path_buf(),
            binaries,
            server_user,
            conf,
        });
        let default_login = self.login.clone().unwrap_or_else(Login::generated);
        let login_of =
            |spec: &NodeSpec| spec.login.clone().unwrap_or_else(|| default_login.clone());

        // The primary's cluster (the primary and its standbys) shares roles and databases, so every
        // login any of them uses is created on the primary before the standbys are cloned.
        let cluster_logins: Vec<Login> = std::iter::once(&self.primary)
            .chain(self.standbys.iter())
            .map(&login_of)
            .collect();

        let primary_init = Node::initdb(
            Arc::clone(&workspace),
            &self.primary.name,
            Role::Primary,
            self.primary.port,
            login_of(&self.primary),
            admin_password_for(&cluster_logins)?,
        );
        let independent_inits = self.independents.iter().map(|spec| {
            let login = login_of(spec);
            let workspace = Arc::clone(&workspace);
            async move {
                let admin = admin_password_for(std::slice::from_ref(&login))?;
                Node::initdb(workspace, &spec.name, spec.role, spec.port, login, admin).await
            }
        });
        let (primary, independents) = tokio::join!(primary_init, join_all(independent_inits));
        let mut primary = primary?;
        let mut independents = independents.into_iter().collect::<Result<Vec<_>, _>>()?;

        start_on_free_port(&mut primary, self.primary.port.is_some()).await?;
        prepare_logins(&primary, &cluster_logins, self.conf.stat_statements).await?;

        let clones = self.standbys.iter().map(|spec| {
            Node::base_backup(
                Arc::clone(&workspace),
                &spec.name,
                spec.port,
                login_of(spec),
                &primary,
            )
        });
        let mut standbys = join_all(clones)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let starts = standbys
            .iter_mut()
            .zip(&self.standbys)
            .map(|(standby, spec)| start_on_free_port(standby, spec.port.is_some()));
        join_all(starts)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for standby in &standbys {
            standby.wait_streaming_from(&primary).await?;
        }
        if self.synchronous > 0 {
            make_synchronous(&primary, &standbys, self.synchronous).await?;
        }
        for (node, spec) in independents.iter_mut().zip(&self.independents) {
            start_on_free_port(node, spec.port.is_some()).await?;
            prepare_logins(node, &[login_of(spec)], self.conf.stat_statements).await?;
        }

        let standby_count = standbys.len();
        let mut nodes = vec![primary];
        nodes.append(&mut standbys);
        nodes.append(&mut independents);
        let mut proxies = BTreeMap::new();
        for name in &self.proxied {
            if let Some(node) = nodes.iter().find(|n| n.name() == name) {
                proxies.insert(name.clone(), FaultProxy::start(node.address())?);
            }
        }
        let topology = Topology {
            proxies,
            nodes,
            standby_count,
            tls,
            root,
            _reaper: reaper,
            startup: started.elapsed(),
        };
        tracing::debug!(?topology, "test topology started");
        Ok(topology)
    }
}

/// Where topologies live: `/dev/shm` when it is a memory file system with room to spare (file
/// creation and copying there are several times faster than on a disk, which makes `initdb` and
/// `pg_basebackup` fast), else the system's temporary directory.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let roomy = nix::sys::statvfs::statvfs(shm).is_ok_and(|stats| {
        let free = stats
            .blocks_available()
            .saturating_mul(stats.fragment_size());
        free >= SCRATCH_MIN_FREE
    });
    if roomy && nix::unistd::access(shm, nix::unistd::AccessFlags::W_OK).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The superuser password of a cluster: the one its logins give for user `postgres` (so that a
/// settings file using `postgres` works), or a random one.
fn admin_password_for(logins: &[Login]) -> Result<SecretString, TestkitError> {
    let mut chosen: Option<&SecretString> = None;
    for login in logins.iter().filter(|l| l.user == ADMIN_USER) {
        match chosen {
            Some(password) if password.expose_secret() != login.password.expose_secret() => {
                return Err(TestkitError::Invalid(format!(
                    "user `{ADMIN_USER}` is given two different passwords in one cluster"
                )));
            }
            _ => chosen = Some(&login.password),
        }
    }
    Ok(chosen
        .cloned()
        .unwrap_or_else(|| SecretString::from(random_password())))
}

/// Starts a node, moving it to another free port when its port turns out to be taken (unless the
/// port was asked for).
async fn start_on_free_port(node: &mut Node, fixed_port: bool) -> Result<(), TestkitError> {
    for _ in 0..PORT_ATTEMPTS {
        match node.start().await {
            Err(TestkitError::PortInUse { .. }) if !fixed_port => node.move_to_free_port()?,
            other => return other,
        }
    }
    node.start().await
}

/// Creates the login roles and databases on a freshly started server.
async fn prepare_logins(
    node: &Node,
    logins: &[Login],
    stat_statements: bool,
) -> Result<(), TestkitError> {
    let client = node.connect_admin().await?;
    let mut users = BTreeMap::new();
    for login in logins {
        match users.get(&login.user) {
            Some(password) if password != login.password.expose_secret() => {
                return Err(TestkitError::Invalid(format!(
                    "user `{}` is given two different passwords in one cluster",
                    login.user
                )));
            }
            _ => {
                users.insert(
                    login.user.clone(),
                    login.password.expose_secret().to_owned(),
                );
            }
        }
    }
    for (user, password) in &users {
        if user != ADMIN_USER {
            // Not a superuser: the database's owner, able to read monitoring views, to replicate
            // and to promote a standby, which is what pgherd needs.
            client
                .batch_execute(&format!(
                    "CREATE ROLE {user_ident} LOGIN REPLICATION PASSWORD {password_literal};
                     GRANT pg_monitor TO {user_ident};",
                    user_ident = quote_ident(user),
                    password_literal = quote_literal(password),
                ))
                .await
                .map_err(TestkitError::postgres(node.name()))?;
        }
    }
    let existing: Vec<String> = client
        .query("SELECT datname FROM pg_database", &[])
        .await
        .map_err(TestkitError::postgres(node.name()))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let databases: BTreeMap<&str, &str> = logins
        .iter()
        .map(|l| (l.dbname.as_str(), l.user.as_str()))
        .collect();
    for (dbname, owner) in databases {
        if !existing.iter().any(|e| e == dbname) {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {} OWNER {}",
                    quote_ident(dbname),
                    quote_ident(owner)
                ))
                .await
                .map_err(TestkitError::postgres(node.name()))?;
        }
        // Function privileges live in each database's catalog.
        let grants: Vec<String> = logins
            .iter()
            .filter(|l| l.dbname == dbname && l.user != ADMIN_USER)
            .map(|l| {
                format!(
                    "GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO {};",
                    quote_ident(&l.user)
                )
            })
            .collect();
        if !grants.is_empty() {
            node.admin_execute(dbname, &grants.join("\n")).await?;
        }
        if stat_statements {
            node.admin_execute(dbname, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
        }
    }
    if stat_statements {
        // Also where the superuser connects, so `connect_admin` can read the view.
        node.admin_execute(
            "postgres",
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        )
        .await?;
    }
    Ok(())
}

async fn make_synchronous(
    primary: &Node,
    standbys: &[Node],
    count: usize,
) -> Result<(), TestkitError> {
    let names: Vec<String> = standbys.iter().map(|s| quote_ident(s.name())).collect();
    let value = format!("ANY {count} ({})", names.join(", "));
    let client = primary.connect_admin().await?;
    // Two statements: ALTER SYSTEM refuses to run in the implicit transaction of a batch.
    for statement in [
        format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            quote_literal(&value)
        ),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        client
            .batch_execute(&statement)
            .await
            .map_err(TestkitError::postgres(primary.name()))?;
    }
    let started = Instant::now();
    let timeout = Duration::from_secs(30);
    loop {
        let synchronous: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
                &[],
            )
            .await
            .map_err(TestkitError::postgres(primary.name()))?
            .get(0);
        if usize::try_from(synchronous).unwrap_or(0) >= count {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(TestkitError::Timeout {
                what: format!("{count} synchronous standbys"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Running throwaway PostgreSQL servers. Dropping the topology kills them and removes their files,
/// also when a test panics; if this process dies without dropping it, a watchdog process does it.
pub struct Topology {
    proxies: BTreeMap<String, FaultProxy>,
    nodes: Vec<Node>,
    standby_count: usize,
    tls: Option<super::TlsFiles>,
    root: tempfile::TempDir,
    _reaper: Reaper,
    startup: Duration,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("root", &self.root.path())
            .field("nodes", &self.nodes)
            .field("proxies", &self.proxies)
            .field("startup", &self.startup)
            .finish()
    }
}

impl Topology {
    /// A builder for a topology; with nothing added, it is a lone primary.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// The node that was started as the primary.
    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    /// Every node: the primary, then the standbys, then the independent servers.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes started as physical standbys (a promoted one included), in start order.
    pub fn standbys(&self) -> &[Node] {
        &self.nodes[1..=self.standby_count]
    }

    /// The `index`-th standby (from 0).
    ///
    /// # Panics
    ///
    /// When there are not that many standbys.
    pub fn standby(&self, index: usize) -> &Node {
        &self.standbys()[index]
    }

    /// The independent servers (backups and replicas), in the order they were added.
    pub fn independents(&self) -> &[Node] {
        &self.nodes[1 + self.standby_count..]
    }

    /// The node called `name`, if there is one.
    pub fn try_node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.name() == name)
    }

    /// The node called `name`.
    ///
    /// # Panics
    ///
    /// When there is none: a test asking for a node it did not build is a bug in the test.
    pub fn node(&self, name: &str) -> &Node {
        self.try_node(name).unwrap_or_else(|| {
            let names: Vec<&str> = self.nodes.iter().map(Node::name).collect();
            panic!("no node `{name}` in this topology; it has {names:?}")
        })
    }

    /// The fault proxy in front of node `name`, if one was asked for with
    /// [`TopologyBuilder::proxied`].
    pub fn proxy(&self, name: &str) -> Option<&FaultProxy> {
        self.proxies.get(name)
    }

    /// Settings whose endpoints are these nodes (through their proxies where there are some), with
    /// the roles they were started with and the default pool settings.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        for node in &self.nodes {
            let mut endpoint = node.endpoint_settings();
            if let Some(proxy) = self.proxies.get(node.name()) {
                endpoint.port = proxy.port();
            }
            settings.endpoints.insert(node.name().to_owned(), endpoint);
        }
        settings
    }

    /// The certificate files, when the topology was started with [`TopologyBuilder::tls`].
    pub fn tls(&self) -> Option<&super::TlsFiles> {
        self.tls.as_ref()
    }

    /// Writes the [`settings`](Self::settings) as a TOML file at `path` (for the `pgherd`
    /// command, or an application under test). Passwords go to files next to the servers, named
    /// in `password_file`, not into the TOML.
    ///
    /// # Errors
    ///
    /// When a file cannot be written.
    pub fn write_settings(&self, path: &Path) -> Result<(), TestkitError> {
        let mut toml = String::from("# Written by the pgherd testkit for a throwaway topology.\n");
        for node in &self.nodes {
            let login = node.login();
            let password_file = self.root.path().join(format!("{}.password", node.name()));
            std::fs::write(&password_file, login.password.expose_secret())
                .map_err(TestkitError::io("writing a password file"))?;
            let port = self
                .proxies
                .get(node.name())
                .map_or(node.port(), FaultProxy::port);
            toml.push_str(&format!(
                "\n[endpoints.{name}]\nrole = \"{role}\"\nhost = \"{host}\"\nport = {port}\n\
                 dbname = {dbname:?}\nuser = {user:?}\npassword_file = {file:?}\n",
                name = node.name(),
                role = node.role(),
                host = node.host(),
                dbname = login.dbname,
                user = login.user,
                file = password_file.display().to_string(),
            ));
        }
        std::fs::write(path, toml).map_err(TestkitError::io(format!("writing {}", path.display())))
    }

    /// The directory holding every server's data and log.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// How long [`TopologyBuilder::start`] took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.proxies.clear();
        for node in &self.nodes {
            let _ = node.kill();
        }
    }
}
