//! One throwaway PostgreSQL server and its controls: start, stop, kill, hang, resume, promote.

use std::{
    fmt,
    fs::OpenOptions,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use rand::Rng as _;
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::NoTls;

use super::{binaries::Binaries, server_user::ServerUser, TestkitError};
use crate::settings::{EndpointSettings, Role};

/// The host every test server listens on.
pub const HOST: &str = "127.0.0.1";
/// The superuser that the testkit itself uses to control the servers.
pub const ADMIN_USER: &str = "postgres";
/// How long a server may take to accept connections after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long killed processes may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);
/// The configuration file, included from `postgresql.conf`, that the testkit owns.
const CONF_FILE: &str = "pgherd-testkit.conf";

/// A database login: user, password and database.
#[derive(Clone)]
pub struct Login {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: SecretString,
    /// The database.
    pub dbname: String,
}

impl Login {
    /// A login with the given user, password and database.
    pub fn new(
        user: impl Into<String>,
        password: impl Into<String>,
        dbname: impl Into<String>,
    ) -> Login {
        Login {
            user: user.into(),
            password: SecretString::from(password.into()),
            dbname: dbname.into(),
        }
    }

    /// A login for user `pgherd` on database `pgherd` with a random password.
    pub(crate) fn generated() -> Login {
        Login::new("pgherd", random_password(), "pgherd")
    }
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("dbname", &self.dbname)
            .finish()
    }
}

/// A random password of 24 letters and digits.
pub(crate) fn random_password() -> String {
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// What every server of one topology shares: where it lives, its binaries, its settings.
#[derive(Debug)]
pub(crate) struct Workspace {
    pub(crate) root: PathBuf,
    pub(crate) binaries: Binaries,
    pub(crate) server_user: ServerUser,
    pub(crate) conf: ServerConf,
}

/// The `postgresql.conf` lines every server of a topology gets.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerConf {
    pub(crate) logical: bool,
    pub(crate) durable: bool,
    pub(crate) stat_statements: bool,
    pub(crate) tls: Option<super::TlsFiles>,
    pub(crate) extra: Vec<(String, String)>,
}

impl ServerConf {
    fn render(&self, port: u16, socket_dir: &Path) -> String {
        let mut lines = vec![
            format!("listen_addresses = '{HOST}'"),
            format!("port = {port}"),
            format!(
                "unix_socket_directories = '{}'",
                socket_dir.display().to_string().replace('\'', "''")
            ),
            "max_connections = 200".to_owned(),
            "shared_buffers = '32MB'".to_owned(),
            format!(
                "wal_level = {}",
                if self.logical { "logical" } else { "replica" }
            ),
            "max_wal_senders = 16".to_owned(),
            "max_replication_slots = 16".to_owned(),
            "wal_keep_size = '64MB'".to_owned(),
            "max_wal_size = '512MB'".to_owned(),
            "hot_standby = on".to_owned(),
            "hot_standby_feedback = on".to_owned(),
            // Only the processes are ever killed, never the machine: the page cache survives, so
            // skipping fsync loses nothing the tests can observe and keeps them fast.
            format!("fsync = {}", if self.durable { "on" } else { "off" }),
            "jit = off".to_owned(),
            // Dynamic shared memory in files under the data directory, removed with it: with the
            // default (`posix`), every killed server leaves its segments in /dev/shm for good.
            "dynamic_shared_memory_type = mmap".to_owned(),
            "timezone = 'UTC'".to_owned(),
            "log_line_prefix = '%m [%p] %q%a '".to_owned(),
            "log_min_messages = warning".to_owned(),
        ];
        if self.stat_statements {
            lines.push("shared_preload_libraries = 'pg_stat_statements'".to_owned());
            lines.push("pg_stat_statements.track = all".to_owned());
        }
        if let Some(tls) = &self.tls {
            let quoted =
                |path: &Path| format!("'{}'", path.display().to_string().replace('\'', "''"));
            lines.push("ssl = on".to_owned());
            lines.push(format!("ssl_cert_file = {}", quoted(&tls.certificate)));
            lines.push(format!("ssl_key_file = {}", quoted(&tls.key)));
        }
        for (key, value) in &self.extra {
            lines.push(format!("{key} = {value}"));
        }
        lines.push(String::new());
        lines.join("\n")
    }
}

/// One PostgreSQL server of a [`Topology`](super::Topology).
///
/// Controls act on the real server process: [`kill`](Self::kill) sends SIGKILL to the postmaster
/// and all of its processes, [`hang`](Self::hang) freezes them with SIGSTOP, and so on. Dropping
/// the node kills its server.
pub struct Node {
    name: String,
    role: Mutex<Role>,
    dir: PathBuf,
    port: u16,
    login: Login,
    admin_password: SecretString,
    workspace: Arc<Workspace>,
    process: Mutex<Option<Child>>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("role", &self.role())
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("login", &self.login)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Node {
    /// Creates a new, stopped server with `initdb`.
    pub(crate) async fn initdb(
        workspace: Arc<Workspace>,
        name: &str,
        role: Role,
        port: Option<u16>,
        login: Login,
        admin_password: SecretString,
    ) -> Result<Node, TestkitError> {
        let node = Node::new(workspace, name, role, port, login, admin_password)?;
        let password_file = node.dir.join("admin.password");
        std::fs::write(&password_file, node.admin_password.expose_secret())
            .map_err(TestkitError::io("writing the initdb password file"))?;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))
            .map_err(TestkitError::io("protecting the initdb password file"))?;
        node.workspace.server_user.give(&password_file)?;
        let mut command = Command::new(node.workspace.binaries.program("initdb"));
        node.workspace.server_user.prepare(&mut command);
        command
            .arg("--pgdata")
            .arg(node.data_dir())
            .arg("--username")
            .arg(ADMIN_USER)
            .arg(format!("--pwfile={}", password_file.display()))
            .args([
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]);
        let result = run(command, "initdb").await;
        let _ = std::fs::remove_file(&password_file);
        result?;
        let mut conf = OpenOptions::new()
            .append(true)
            .open(node.data_dir().join("postgresql.conf"))
            .map_err(TestkitError::io("opening postgresql.conf"))?;
        writeln!(conf, "include '{CONF_FILE}'")
            .map_err(TestkitError::io("extending postgresql.conf"))?;
        node.write_config()?;
        Ok(node)
    }

    /// Creates a new, stopped physical standby of `primary` with `pg_basebackup -R`, streaming
    /// through a replication slot named after the standby.
    pub(crate) async fn base_backup(
        workspace: Arc<Workspace>,
        name: &str,
        port: Option<u16>,
        login: Login,
        primary: &Node,
    ) -> Result<Node, TestkitError> {
        let node = Node::new(
            workspace,
            name,
            Role::Standby,
            port,
            login,
            primary.admin_password.clone(),
        )?;
        let mut command = Command::new(node.workspace.binaries.program("pg_basebackup"));
        node.workspace.server_user.prepare(&mut command);
        command
            .env("PGPASSWORD", node.admin_password.expose_secret())
            .arg("--pgdata")
            .arg(node.data_dir())
            .args([
                "--wal-method=stream",
                "--checkpoint=fast",
                "--create-slot",
                "--write-recovery-conf",
            ])
            .arg(format!("--slot={name}"))
            .arg(format!(
                "--dbname=host={HOST} port={} user={ADMIN_USER} application_name={name}",
                primary.port
            ));
        run(command, "pg_basebackup").await?;
        node.write_config()?;
        Ok(node)
    }

    fn new(
        workspace: Arc<Workspace>,
        name: &str,
        role: Role,
        port: Option<u16>,
        login: Login,
        admin_password: SecretString,
    ) -> Result<Node, TestkitError> {
        let dir = workspace.root.join(name);
        std::fs::create_dir(&dir)
            .map_err(TestkitError::io(format!("creating {}", dir.display())))?;
        workspace.server_user.give(&dir)?;
        Ok(Node {
            name: name.to_owned(),
            role: Mutex::new(role),
            dir,
            port: port.unwrap_or_else(free_port),
            login,
            admin_password,
            workspace,
            process: Mutex::new(None),
        })
    }

    /// Moves a node that could not bind its port to another free port.
    pub(crate) fn move_to_free_port(&mut self) -> Result<(), TestkitError> {
        self.port = free_port();
        self.write_config()
    }

    fn write_config(&self) -> Result<(), TestkitError> {
        let path = self.data_dir().join(CONF_FILE);
        std::fs::write(&path, self.workspace.conf.render(self.port, &self.dir))
            .map_err(TestkitError::io(format!("writing {}", path.display())))?;
        self.workspace.server_user.give(&path)
    }

    /// The node's name, which is also its endpoint name in the rendered settings.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's role now: a promoted standby is a primary.
    pub fn role(&self) -> Role {
        *lock(&self.role)
    }

    /// The host the server listens on (always a loopback address).
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's socket address.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The login the rendered settings use for this node.
    pub fn login(&self) -> &Login {
        &self.login
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory of the server's Unix socket (for `psql -h <dir> -p <port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// This node as a settings endpoint (its current role, its login).
    pub fn endpoint_settings(&self) -> EndpointSettings {
        EndpointSettings::new(
            self.role(),
            HOST,
            self.login.dbname.clone(),
            self.login.user.clone(),
        )
        .with_port(self.port)
        .with_password(self.login.password.expose_secret())
    }

    /// Connection parameters for the node's login.
    pub fn config(&self) -> tokio_postgres::Config {
        self.config_at(self.port)
    }

    /// Connection parameters for the node's login, on another port of the loopback address
    /// (a [`FaultProxy`](super::FaultProxy) in front of the node, say).
    pub fn config_at(&self, port: u16) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(port)
            .user(&self.login.user)
            .password(self.login.password.expose_secret())
            .dbname(&self.login.dbname)
            .application_name("pgherd-testkit")
            .connect_timeout(Duration::from_secs(5));
        config
    }

    /// Connection parameters for the superuser the testkit controls the server with.
    pub fn admin_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(ADMIN_USER)
            .password(self.admin_password.expose_secret())
            .dbname("postgres")
            .application_name("pgherd-testkit")
            .connect_timeout(Duration::from_secs(5));
        config
    }

    /// Connects with the node's login. The connection runs on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// When the server does not accept the connection.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, TestkitError> {
        connect(&self.name, &self.config()).await
    }

    /// Connects as the superuser, to database `postgres`.
    ///
    /// # Errors
    ///
    /// When the server does not accept the connection.
    pub async fn connect_admin(&self) -> Result<tokio_postgres::Client, TestkitError> {
        connect(&self.name, &self.admin_config()).await
    }

    /// Runs `sql` (one or more statements) as the superuser on database `dbname`.
    ///
    /// # Errors
    ///
    /// When the connection or a statement fails.
    pub async fn admin_execute(&self, dbname: &str, sql: &str) -> Result<(), TestkitError> {
        let mut config = self.admin_config();
        config.dbname(dbname);
        let client = connect(&self.name, &config).await?;
        client
            .batch_execute(sql)
            .await
            .map_err(TestkitError::postgres(&self.name))
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut process = lock(&self.process);
        let child = process.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Whether the postmaster process is alive (it may be hung).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Starts the server (again) and waits until it accepts connections. Does nothing if it runs.
    ///
    /// # Errors
    ///
    /// When the server exits during start-up or does not accept connections within a minute;
    /// the error carries the end of its log.
    pub async fn start(&self) -> Result<(), TestkitError> {
        if self.is_running() {
            return Ok(());
        }
        let child = self.spawn()?;
        *lock(&self.process) = Some(child);
        self.wait_ready().await
    }

    fn spawn(&self) -> Result<Child, TestkitError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(TestkitError::io("opening the server log"))?;
        let log_err = log
            .try_clone()
            .map_err(TestkitError::io("opening the server log"))?;
        let mut command = Command::new(self.workspace.binaries.program("postgres"));
        self.workspace.server_user.prepare(&mut command);
        command
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C in the terminal reaches this process, which then
            // stops the servers in order, instead of reaching every server at once.
            .process_group(0);
        command
            .spawn()
            .map_err(TestkitError::io(format!("starting server `{}`", self.name)))
    }

    async fn wait_ready(&self) -> Result<(), TestkitError> {
        let started = Instant::now();
        let mut config = self.admin_config();
        config.connect_timeout(Duration::from_secs(1));
        loop {
            if !self.is_running() {
                let tail = self.log_tail(20);
                if tail.contains("could not bind") || tail.contains("Address already in use") {
                    return Err(TestkitError::PortInUse {
                        node: self.name.clone(),
                        port: self.port,
                    });
                }
                return Err(self.server_error("exited during start-up"));
            }
            let attempt = tokio::time::timeout(Duration::from_secs(2), config.connect(NoTls)).await;
            if let Ok(Ok((client, connection))) = attempt {
                drop(client);
                let _ = connection.await;
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(self.server_error(&format!(
                    "did not accept connections within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub(crate) fn server_error(&self, what: &str) -> TestkitError {
        TestkitError::Server {
            node: self.name.clone(),
            what: what.to_owned(),
            log: self.log_path(),
            log_tail: self.log_tail(20),
        }
    }

    /// Stops the server with a fast shutdown (SIGINT: sessions are ended, nothing is lost) and
    /// waits for it to exit; a server that does not exit in 30 s is killed. A hung server is
    /// resumed first.
    ///
    /// # Errors
    ///
    /// When signalling fails.
    pub async fn stop(&self) -> Result<(), TestkitError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        self.resume()?;
        signal(pid, Signal::SIGINT)?;
        let started = Instant::now();
        while self.is_running() {
            if started.elapsed() > STOP_TIMEOUT {
                return self.kill();
            }
            tokio::time::sleep(POLL).await;
        }
        let _ = lock(&self.process).take();
        Ok(())
    }

    /// Kills the server like a machine crash: SIGKILL to the postmaster and every one of its
    /// processes, so no session can finish anything. [`start`](Self::start) runs crash recovery.
    ///
    /// # Errors
    ///
    /// When signalling fails.
    pub fn kill(&self) -> Result<(), TestkitError> {
        let mut process = lock(&self.process);
        let Some(mut child) = process.take() else {
            return Ok(());
        };
        let pid = child.id();
        // Freeze the postmaster first (and wait until it is frozen: signals are delivered
        // asynchronously) so that it cannot fork while its children are killed; then kill the
        // children until none is left alive, and only then the postmaster, whose death would
        // hand orphans to init, out of sight.
        let _ = signal(pid, Signal::SIGSTOP);
        let deadline = Instant::now() + KILL_TIMEOUT;
        wait_until(deadline, || is_stopped(pid) || !is_alive(pid));
        loop {
            let alive: Vec<u32> = children_of(pid)
                .into_iter()
                .filter(|c| is_alive(*c))
                .collect();
            if alive.is_empty() || Instant::now() >= deadline {
                break;
            }
            for child_pid in &alive {
                let _ = signal(*child_pid, Signal::SIGKILL);
            }
            wait_until(deadline, || alive.iter().all(|c| !is_alive(*c)));
        }
        let _ = signal(pid, Signal::SIGKILL);
        child
            .wait()
            .map_err(TestkitError::io(format!("reaping server `{}`", self.name)))?;
        remove_sysv_segment(&self.data_dir());
        Ok(())
    }

    /// Freezes the server (SIGSTOP to the postmaster and all of its processes): connections stay
    /// open but nothing answers, like a stalled machine. Undo with [`resume`](Self::resume).
    ///
    /// # Errors
    ///
    /// When the server is not running, or signalling fails.
    pub fn hang(&self) -> Result<(), TestkitError> {
        let pid = self
            .pid()
            .ok_or_else(|| self.server_error("cannot be hung: it is not running"))?;
        signal(pid, Signal::SIGSTOP)?;
        // Frozen before its children are listed, so that none is forked after the listing.
        let deadline = Instant::now() + KILL_TIMEOUT;
        wait_until(deadline, || is_stopped(pid));
        for child_pid in children_of(pid) {
            let _ = signal(child_pid, Signal::SIGSTOP);
        }
        Ok(())
    }

    /// Resumes a hung server (SIGCONT). Does nothing to a server that is not hung.
    ///
    /// # Errors
    ///
    /// When signalling fails.
    pub fn resume(&self) -> Result<(), TestkitError> {
        if let Some(pid) = self.pid() {
            for child_pid in children_of(pid) {
                let _ = signal(child_pid, Signal::SIGCONT);
            }
            signal(pid, Signal::SIGCONT)?;
        }
        Ok(())
    }

    /// Promotes a standby to a primary with `pg_promote()` and waits until it accepts writes.
    ///
    /// # Errors
    ///
    /// When the node is not a running standby or the promotion does not finish within a minute.
    pub async fn promote(&self) -> Result<(), TestkitError> {
        let client = self.connect_admin().await?;
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(TestkitError::postgres(&self.name))?
            .get(0);
        if !promoted {
            return Err(self.server_error("did not finish its promotion within 60 s"));
        }
        *lock(&self.role) = Role::Primary;
        Ok(())
    }

    /// Waits until this standby streams from `primary` (as seen in `pg_stat_replication`).
    ///
    /// # Errors
    ///
    /// When it does not stream within a minute.
    pub async fn wait_streaming_from(&self, primary: &Node) -> Result<(), TestkitError> {
        let client = primary.connect_admin().await?;
        let started = Instant::now();
        loop {
            let streaming: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication \
                     WHERE application_name = $1 AND state = 'streaming'",
                    &[&self.name],
                )
                .await
                .map_err(TestkitError::postgres(&primary.name))?
                .get(0);
            if streaming > 0 {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(TestkitError::Timeout {
                    what: format!("`{}` to stream from `{}`", self.name, primary.name),
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Removes the System V shared memory segment of a killed server. A server that exits removes
/// its own, but one killed keeps it until a server starts again in the same data directory; the
/// testkit deletes the directory, so killed servers used to leave one segment each, and the
/// kernel allows only 4096 (`kernel.shmmni`): then no server can start. The segment's id is in
/// the last line of `postmaster.pid` ("key id"); `ipcrm` removes it (at once, since no process is
/// attached any more).
fn remove_sysv_segment(data_dir: &Path) {
    let Ok(pid_file) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return;
    };
    let Some(id) = sysv_segment_id(&pid_file) else {
        return;
    };
    let _ = Command::new("ipcrm")
        .arg("-m")
        .arg(id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The shared memory id recorded in a `postmaster.pid` file (its seventh line: key, then id).
fn sysv_segment_id(pid_file: &str) -> Option<u64> {
    let line = pid_file.lines().nth(6)?;
    let mut fields = line.split_whitespace();
    let _key: u64 = fields.next()?.parse().ok()?;
    fields.next()?.parse().ok()
}

async fn connect(
    node: &str,
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, TestkitError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(TestkitError::postgres(node))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs a setup command to completion off the async thread, turning a failure into an error that
/// quotes the end of its output.
async fn run(mut command: Command, name: &str) -> Result<(), TestkitError> {
    command.stdin(Stdio::null());
    let name = name.to_owned();
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| TestkitError::Io {
            what: format!("running {name}"),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(TestkitError::io(format!("running {name}")))?;
    if output.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    Err(TestkitError::Command {
        command: name,
        status: output.status.to_string(),
        output: lines[lines.len().saturating_sub(15)..].join("\n"),
    })
}

fn signal(pid: u32, signal: Signal) -> Result<(), TestkitError> {
    let raw = i32::try_from(pid).map_err(|_| TestkitError::Invalid(format!("pid {pid}")))?;
    kill(Pid::from_raw(raw), signal).map_err(|errno| TestkitError::Io {
        what: format!("sending {signal} to process {pid}"),
        source: std::io::Error::from(errno),
    })
}

/// The processes whose parent is `pid` (PostgreSQL's backends and auxiliary processes each lead
/// their own process group, so a group signal would miss them).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| parent_of(*candidate) == Some(pid))
        .collect()
}

/// The state letter and the parent of process `pid`, from `/proc/<pid>/stat`.
fn stat_of(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields follow the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_of(pid).map(|(_, parent)| parent)
}

/// Whether `pid` is a live process (a zombie is dead: it only waits to be reaped).
fn is_alive(pid: u32) -> bool {
    stat_of(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// Whether `pid` is stopped by a signal.
fn is_stopped(pid: u32) -> bool {
    stat_of(pid).is_some_and(|(state, _)| state == 'T')
}

/// Polls `condition` every millisecond until it holds or `deadline` passes.
fn wait_until(deadline: Instant, condition: impl Fn() -> bool) {
    while !condition() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A free TCP port on the loopback address, below the kernel's range of ephemeral ports so that
/// outgoing connections do not take it between a server's stop and its restart.
pub(crate) fn free_port() -> u16 {
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(20_000..32_000);
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_reads_the_proc_stat_format() {
        let me = std::process::id();
        let parent = parent_of(me).expect("a parent");
        assert!(parent > 0);
        assert!(children_of(parent).contains(&me));
    }

    #[test]
    fn the_shared_memory_id_is_read_from_the_pid_file() {
        let pid_file = "29314\n/tmp/exp/d\n1795293353\n5499\n/tmp/exp\nlocalhost\n \
                        10321994    922793\nready   \n";
        assert_eq!(sysv_segment_id(pid_file), Some(922_793));
        assert_eq!(
            sysv_segment_id("29314\n/tmp/exp/d\n"),
            None,
            "still starting"
        );
    }

    #[test]
    fn free_ports_are_in_the_quiet_range() {
        let port = free_port();
        assert!((20_000..32_000).contains(&port), "{port}");
    }
}
