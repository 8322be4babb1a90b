//! The testkit's topologies are real servers, and each control really acts on them.

mod support;

use std::time::Duration;

use pgherd::{settings::Role, testkit::Topology};
use support::{eventually, process_alive, start};

const SHORT: Duration = Duration::from_millis(700);

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test]
async fn primary_two_standbys_and_an_independent_database() {
    let topology = start(Topology::builder().standbys(2).backup("backup")).await;
    assert_eq!(topology.nodes().len(), 4);
    assert_eq!(topology.standbys().len(), 2);

    let primary = topology.primary().connect().await.expect("connect primary");
    primary
        .batch_execute("CREATE TABLE herd (id int PRIMARY KEY); INSERT INTO herd VALUES (1), (2)")
        .await
        .expect("write on the primary");

    // Rows written on the primary appear on both standbys, which really are standbys.
    for standby in topology.standbys() {
        let client = standby.connect().await.expect("connect standby");
        let recovering: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("probe")
            .get(0);
        assert!(recovering, "{} is not in recovery", standby.name());
        eventually(
            "the rows to reach the standby",
            Duration::from_secs(10),
            || {
                let client = &client;
                async move {
                    client
                        .query_one("SELECT count(*) FROM herd", &[])
                        .await
                        .is_ok_and(|row| row.get::<_, i64>(0) == 2)
                }
            },
        )
        .await;
        let write = client.batch_execute("INSERT INTO herd VALUES (3)").await;
        assert!(write.is_err(), "a standby accepted a write");
    }

    // The independent server is a separate cluster: its own system identifier, none of the rows.
    let backup = topology
        .node("backup")
        .connect()
        .await
        .expect("connect backup");
    let has_table = count(
        &backup,
        "SELECT count(*) FROM pg_tables WHERE tablename = 'herd'",
    )
    .await;
    assert_eq!(has_table, 0);
    let system_id = "SELECT system_identifier::text FROM pg_control_system()";
    let admin_primary = topology.primary().connect_admin().await.expect("admin");
    let admin_backup = topology
        .node("backup")
        .connect_admin()
        .await
        .expect("admin");
    let primary_id: String = admin_primary
        .query_one(system_id, &[])
        .await
        .expect("id")
        .get(0);
    let backup_id: String = admin_backup
        .query_one(system_id, &[])
        .await
        .expect("id")
        .get(0);
    assert_ne!(primary_id, backup_id);

    // The login is not a superuser, but can read the monitoring views pgherd needs.
    let superuser: bool = primary
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("role")
        .get(0);
    assert!(!superuser);
    let senders = count(
        &primary,
        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
    )
    .await;
    assert_eq!(senders, 2);
}

#[tokio::test]
async fn rendered_settings_point_at_the_servers() {
    let topology = start(Topology::builder().standbys(1).replica("reporting")).await;
    let settings = topology.settings();
    settings
        .validate()
        .expect("the rendered settings are valid");
    assert_eq!(settings.primary().map(|(name, _)| name), Some("primary"));
    assert_eq!(
        settings.endpoint("standby_1").map(|e| e.role),
        Some(Role::Standby)
    );
    assert_eq!(
        settings.endpoint("reporting").map(|e| e.role),
        Some(Role::Replica)
    );
    assert!(
        !format!("{settings:?}").contains(secrecy::ExposeSecret::expose_secret(
            &topology.primary().login().password
        ))
    );
    // Connecting with what the settings say reaches the right server.
    for (name, endpoint) in &settings.endpoints {
        let password = endpoint
            .resolve_password(name)
            .expect("password")
            .expect("some password");
        let mut config = tokio_postgres::Config::new();
        config
            .host(&endpoint.host)
            .port(endpoint.port)
            .user(&endpoint.user)
            .dbname(&endpoint.dbname)
            .password(secrecy::ExposeSecret::expose_secret(&password));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {name}: {e}"));
        tokio::spawn(connection);
        let port: String = client
            .query_one("SHOW port", &[])
            .await
            .expect("port")
            .get(0);
        assert_eq!(port, endpoint.port.to_string(), "{name}");
    }
}

#[tokio::test]
async fn kill_stops_every_process_and_start_recovers_the_data() {
    let topology = start(Topology::builder()).await;
    let node = topology.primary();
    let client = node.connect().await.expect("connect");
    client
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .await
        .expect("write");
    let pid = node.pid().expect("running");
    let backends = pgherd_children(pid);
    assert!(!backends.is_empty(), "a running server has child processes");

    node.kill().expect("kill");
    assert!(!node.is_running());
    assert!(!process_alive(pid), "the postmaster survived");
    for child in backends {
        assert!(!process_alive(child), "child process {child} survived");
    }
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    assert!(
        node.connect().await.is_err(),
        "a killed server accepted a connection"
    );

    node.start().await.expect("start again");
    let client = node.connect().await.expect("connect after restart");
    assert_eq!(count(&client, "SELECT sum(v)::bigint FROM kept").await, 42);
}

#[tokio::test]
async fn hang_freezes_the_server_and_resume_thaws_it() {
    let topology = start(Topology::builder()).await;
    let node = topology.primary();
    let client = node.connect().await.expect("connect");
    node.hang().expect("hang");

    let frozen = tokio::time::timeout(SHORT, client.query_one("SELECT 1", &[])).await;
    assert!(frozen.is_err(), "a hung server answered a query");
    let connecting = tokio::time::timeout(SHORT, node.connect()).await;
    assert!(connecting.is_err(), "a hung server accepted a connection");

    node.resume().expect("resume");
    let answer = tokio::time::timeout(Duration::from_secs(10), client.query_one("SELECT 7", &[]))
        .await
        .expect("answers after resume")
        .expect("query");
    assert_eq!(answer.get::<_, i32>(0), 7);
}

#[tokio::test]
async fn stop_and_start_again() {
    let topology = start(Topology::builder()).await;
    let node = topology.primary();
    node.stop().await.expect("stop");
    assert!(!node.is_running());
    assert!(node.connect().await.is_err());
    node.start().await.expect("start");
    node.connect().await.expect("connect after start");
}

#[tokio::test]
async fn promote_turns_a_standby_into_a_writable_primary() {
    let topology = start(Topology::builder().standbys(1)).await;
    let standby = topology.standby(0);
    assert_eq!(standby.role(), Role::Standby);
    topology.primary().kill().expect("kill the primary");

    standby.promote().await.expect("promote");
    assert_eq!(standby.role(), Role::Primary);
    let client = standby.connect().await.expect("connect");
    let recovering: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("probe")
        .get(0);
    assert!(!recovering);
    client
        .batch_execute(
            "CREATE TABLE after_promotion (v int); INSERT INTO after_promotion VALUES (1)",
        )
        .await
        .expect("the promoted standby takes writes");
}

#[tokio::test]
async fn synchronous_standby_holds_commits_while_it_is_hung() {
    let topology = start(Topology::builder().standbys(1).synchronous(1)).await;
    let primary = topology.primary().connect().await.expect("connect");
    let sync_state: String = primary
        .query_one("SELECT sync_state FROM pg_stat_replication", &[])
        .await
        .expect("replication state")
        .get(0);
    assert!(
        sync_state == "quorum" || sync_state == "sync",
        "{sync_state}"
    );
    primary
        .batch_execute("CREATE TABLE synced (v int)")
        .await
        .expect("commit with the standby up");

    topology.standby(0).hang().expect("hang the standby");
    let held = tokio::time::timeout(
        SHORT,
        primary.batch_execute("INSERT INTO synced VALUES (1)"),
    )
    .await;
    assert!(
        held.is_err(),
        "a commit finished without its synchronous standby"
    );
    topology.standby(0).resume().expect("resume");
    let other = topology.primary().connect().await.expect("connect");
    eventually("the held commit to finish", Duration::from_secs(10), || {
        let other = &other;
        async move {
            other
                .query_one("SELECT count(*) FROM synced", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        }
    })
    .await;
}

#[tokio::test]
async fn logical_wal_level_on_request() {
    let topology = start(Topology::builder().logical(true)).await;
    let client = topology.primary().connect().await.expect("connect");
    let level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(level, "logical");
}

#[tokio::test]
async fn dropping_a_topology_during_a_panic_removes_servers_and_files() {
    let (sender, receiver) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let topology = start(Topology::builder().standbys(1)).await;
            let pids: Vec<u32> = topology.nodes().iter().filter_map(|n| n.pid()).collect();
            sender
                .send((pids, topology.root().to_path_buf()))
                .expect("report");
            panic!("a test failing with a topology in scope");
        });
    });
    assert!(thread.join().is_err(), "the thread was meant to panic");
    let (pids, root) = receiver.recv().expect("the topology started");
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert!(!process_alive(pid), "server {pid} outlived the panic");
    }
    assert!(!root.exists(), "{} outlived the panic", root.display());
}

/// The direct children of `pid`.
fn pgherd_children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
