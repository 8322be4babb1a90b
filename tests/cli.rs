//! The `pgherd` command: `check` and `dev`, run as a real process.
#![cfg(feature = "cli")]

mod support;

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use support::process_alive;

const BIN: &str = env!("CARGO_BIN_EXE_pgherd");
const PASSWORD: &str = "cli-test-password-1234";

fn reference_settings() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Settings.toml")
}

/// Runs `pgherd` with `args`, without any PGHERD_* variable of the caller.
fn pgherd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("PGHERD_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("run pgherd")
}

#[test]
fn check_accepts_the_reference_settings_without_printing_passwords() {
    let output = pgherd(
        &["check", reference_settings().to_str().expect("utf-8")],
        &[],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("valid, 4 endpoints"), "{stdout}");
    assert!(stdout.contains("standby_2"), "{stdout}");
    assert!(!stdout.contains("app-dev-password"), "{stdout}");
    assert!(!stderr.contains("app-dev-password"), "{stderr}");
}

#[test]
fn check_refuses_a_typo_and_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(reference_settings())
        .expect("read")
        .replacen("port = 55432", "prot = 55432", 1);
    let path = dir.path().join("Settings.toml");
    std::fs::write(&path, text).expect("write");
    let output = pgherd(&["check", path.to_str().expect("utf-8")], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`endpoints.primary.prot`"), "{stderr}");
    assert!(!stderr.contains("app-dev-password"), "{stderr}");
}

#[test]
fn check_applies_environment_overrides() {
    let path = reference_settings();
    let path = path.to_str().expect("utf-8");
    let output = pgherd(
        &["check", path],
        &[("PGHERD_ENDPOINTS__PRIMARY__PORT", "70000")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`endpoints.primary.port`"), "{stderr}");
    let output = pgherd(
        &["check", path],
        &[("PGHERD_ENDPOINTS__PRIMARY__PORT", "6000")],
    );
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("127.0.0.1:6000"));
}

/// A settings file for a primary, a standby and a backup on free ports.
fn dev_settings(dir: &Path) -> (PathBuf, [u16; 3]) {
    let ports = [free_port(), free_port(), free_port()];
    let text = format!(
        r#"
[endpoints.main]
role = "primary"
host = "127.0.0.1"
port = {}
dbname = "shop"
user = "shopper"
password = "{PASSWORD}"

[endpoints.mirror]
role = "standby"
host = "127.0.0.1"
port = {}
dbname = "shop"
user = "shopper"
password = "{PASSWORD}"

[endpoints.spare]
role = "backup"
host = "localhost"
port = {}
dbname = "spare"
user = "postgres"
password = "{PASSWORD}"
"#,
        ports[0], ports[1], ports[2]
    );
    let path = dir.join("Settings.toml");
    std::fs::write(&path, text).expect("write settings");
    (path, ports)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `pgherd dev` and waits for its "ready" line; returns the process, its output so far and
/// the postmaster pids it printed.
fn start_dev(settings: &Path) -> (Child, String, Vec<u32>) {
    let mut child = Command::new(BIN)
        .args(["dev", settings.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgherd dev");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut output = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                output.push_str(&line);
                output.push('\n');
                if line.starts_with("ready in") {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                let stderr = child
                    .stderr
                    .take()
                    .map(|s| std::io::read_to_string(s).unwrap_or_default())
                    .unwrap_or_default();
                panic!("pgherd dev did not get ready: {output}{stderr}");
            }
        }
    }
    let pids = output
        .lines()
        .filter_map(|line| {
            let after = line.split(" pid ").nth(1)?;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect();
    (child, output, pids)
}

async fn query_recovery(
    port: u16,
    user: &str,
    dbname: &str,
) -> Result<bool, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(PASSWORD)
        .dbname(dbname);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0))
}

fn wait_dead(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|pid| process_alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "servers {pids:?} still run after pgherd dev ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn data_root(output: &str) -> PathBuf {
    let data = output
        .lines()
        .find_map(|line| line.split(" data ").nth(1))
        .expect("a data directory in the output");
    // <root>/<node>/data
    PathBuf::from(data.trim())
        .parent()
        .and_then(Path::parent)
        .expect("root")
        .to_path_buf()
}

#[tokio::test]
async fn dev_serves_the_settings_and_stops_cleanly_on_interrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (settings, ports) = dev_settings(dir.path());
    let (mut child, output, pids) = start_dev(&settings);
    assert_eq!(pids.len(), 3, "{output}");
    assert!(!output.contains(PASSWORD), "{output}");

    assert!(!query_recovery(ports[0], "shopper", "shop")
        .await
        .expect("primary"));
    assert!(query_recovery(ports[1], "shopper", "shop")
        .await
        .expect("standby"));
    assert!(!query_recovery(ports[2], "postgres", "spare")
        .await
        .expect("backup"));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("interrupt");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    wait_dead(&pids);
    assert!(!data_root(&output).exists(), "files left behind");
}

#[tokio::test]
async fn servers_die_with_a_killed_dev_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (settings, ports) = dev_settings(dir.path());
    let (mut child, output, pids) = start_dev(&settings);
    assert!(query_recovery(ports[1], "shopper", "shop")
        .await
        .expect("standby"));

    // SIGKILL: no destructor runs; the watchdog must clean up.
    child.kill().expect("kill");
    let _ = child.wait();
    wait_dead(&pids);
    let root = data_root(&output);
    let deadline = Instant::now() + Duration::from_secs(10);
    while root.exists() {
        assert!(Instant::now() < deadline, "{} left behind", root.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dev_refuses_a_remote_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (settings, _) = dev_settings(dir.path());
    let text = std::fs::read_to_string(&settings).expect("read").replacen(
        "host = \"localhost\"",
        "host = \"db.example.com\"",
        1,
    );
    std::fs::write(&settings, text).expect("write");
    let output = pgherd(&["dev", settings.to_str().expect("utf-8")], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("db.example.com"), "{stderr}");
}

#[tokio::test]
async fn status_shows_each_endpoint_and_fails_when_one_is_down() {
    let topology = support::start(pgherd::testkit::Topology::builder().standbys(1)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = dir.path().join("Settings.toml");
    topology.write_settings(&settings).expect("write settings");
    let path = settings.to_str().expect("utf-8");

    let output = pgherd(&["status", path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let standby = stdout
        .lines()
        .find(|line| line.starts_with("standby_1"))
        .unwrap_or_else(|| panic!("no standby_1 row: {stdout}"));
    assert!(
        standby.contains("standby  standby") && standby.contains(" up "),
        "{standby}"
    );
    let primary = stdout
        .lines()
        .find(|line| line.starts_with("primary"))
        .unwrap_or_else(|| panic!("no primary row: {stdout}"));
    assert!(primary.contains("primary  primary"), "{primary}");

    topology.primary().kill().expect("kill");
    let output = pgherd(&["status", path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("primary") && l.contains("down")),
        "{stdout}"
    );
    assert!(
        stdout.contains("primary: error connecting"),
        "says why: {stdout}"
    );
}

#[tokio::test]
async fn replicator_install_prepares_both_sides_and_status_shows_the_replica() {
    let topology = support::start(pgherd::testkit::Topology::builder().replica("replica")).await;
    for node in [topology.primary(), topology.node("replica")] {
        node.connect()
            .await
            .expect("connect")
            .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
            .await
            .expect("schema");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = dir.path().join("Settings.toml");
    topology.write_settings(&settings).expect("write settings");
    let mut text = std::fs::read_to_string(&settings).expect("read");
    text.push_str("\n[replicator]\ntables = [\"notes\"]\n");
    std::fs::write(&settings, text).expect("write");
    let path = settings.to_str().expect("utf-8");

    let output = pgherd(&["replicator", "install", path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("capture triggers on 1 table(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("replica: progress table"), "{stdout}");
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO notes VALUES (1, 'logged by the trigger')")
        .await
        .expect("insert");
    let logged: i64 = primary
        .query_one("SELECT count(*) FROM pgherd.\"public.notes\"", &[])
        .await
        .expect("the change table")
        .get(0);
    assert_eq!(logged, 1);

    let output = pgherd(&["status", path], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("lag rows"), "{stdout}");
    assert!(
        stdout.contains("no batch applied yet"),
        "a replica no herd has written to says so: {stdout}"
    );
}
