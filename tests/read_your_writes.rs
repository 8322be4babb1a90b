//! Read-your-writes by position: a read sent after a write's position sees the write, wherever
//! it runs; without the position, reads on lagging standbys miss writes (so the test can tell).

mod support;

use std::time::Duration;

use pgherd::{testkit::Topology, Herd, Position, Read, Routable, Write};
use support::{eventually, start};

const CYCLES: i64 = 1000;
/// How far behind the standbys replay: enough for a read right after a write to miss it.
const APPLY_DELAY: &str = "'30ms'";

async fn lagging_herd() -> (Topology, Herd) {
    lagging_herd_with(true).await
}

async fn lagging_herd_with(fallback_to_primary: bool) -> (Topology, Herd) {
    let topology = start(
        Topology::builder()
            .standbys(2)
            .stat_statements(true)
            .server_setting("recovery_min_apply_delay", APPLY_DELAY),
    )
    .await;
    let mut settings = topology.settings();
    settings.router.fallback_to_primary = fallback_to_primary;
    let herd = Herd::start(settings).expect("start");
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    herd.send(Write::new("CREATE TABLE notes (id bigint PRIMARY KEY)"))
        .await
        .expect("create");
    // The standbys must know the table before reads go there.
    for standby in topology.standbys() {
        let client = standby.connect().await.expect("connect");
        eventually("the table on the standby", Duration::from_secs(10), || {
            let client = &client;
            async move { client.query("SELECT 1 FROM notes", &[]).await.is_ok() }
        })
        .await;
    }
    (topology, herd)
}

/// Inserts ids and reads each back at once; returns how many reads missed their write.
async fn cycles(herd: &Herd, first: i64, after: bool) -> i64 {
    let mut misses = 0;
    for id in first..first + CYCLES {
        let written = herd
            .send(Write::new("INSERT INTO notes VALUES ($1)").bind(id))
            .await
            .expect("insert");
        let position: Position = written.position.expect("a write reports its position");
        let mut read = Read::new("SELECT count(*) FROM notes WHERE id = $1").bind(id);
        if after {
            read = read.after(position);
        }
        let rows = herd.send(read).await.expect("read");
        if rows[0].get::<_, i64>(0) == 0 {
            misses += 1;
        }
    }
    misses
}

#[actix_rt::test]
async fn reads_after_a_position_never_miss_and_reads_without_it_do() {
    let (_topology, herd) = lagging_herd().await;
    let misses_with = cycles(&herd, 0, true).await;
    let misses_without = cycles(&herd, 1_000_000, false).await;
    eprintln!(
        "{CYCLES} insert-then-read cycles: {misses_with} misses with after(position), \
         {misses_without} without"
    );
    assert_eq!(
        misses_with, 0,
        "reads after the position missed their write"
    );
    assert!(
        misses_without > CYCLES / 2,
        "without the position, reads on standbys lagging {APPLY_DELAY} should miss; only \
         {misses_without} of {CYCLES} did, so the test could not tell"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_session_reads_its_writes_and_standbys_serve_once_they_caught_up() {
    let (topology, herd) = lagging_herd().await;
    let session = herd.session();
    for id in 0..200_i64 {
        session
            .send(Write::new("INSERT INTO notes VALUES ($1)").bind(id))
            .await
            .expect("insert");
        let rows = session
            .send(Read::new("SELECT count(*) FROM notes WHERE id = $1").bind(id))
            .await
            .expect("read");
        assert_eq!(
            rows[0].get::<_, i64>(0),
            1,
            "the session missed its write {id}"
        );
    }
    let position = session.position("main").expect("the session wrote");
    // Once a standby has replayed the position, reads after it go to the standbys again.
    eventually(
        "a standby to report the position",
        Duration::from_secs(10),
        || async {
            herd.routes()
                .iter()
                .any(|r| !r.primary && r.position.is_some_and(|p| p >= position))
        },
    )
    .await;
    let marker = "SELECT count(*) FROM notes WHERE id >= $1";
    for _ in 0..10 {
        herd.send(Read::new(marker).bind(0_i64).after(position))
            .await
            .expect("read");
    }
    let admin = topology.primary().connect_admin().await.expect("admin");
    let on_primary: i64 = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%WHERE id >= $1%'",
            &[],
        )
        .await
        .expect("stats")
        .get(0);
    assert_eq!(
        on_primary, 0,
        "caught-up standbys serve reads after the position"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn without_fallback_to_the_primary_a_read_waits_for_a_standby_to_replay() {
    let (topology, herd) = lagging_herd_with(false).await;
    let marker = "SELECT count(*) FROM notes WHERE id = $1 AND true";
    for id in 0..100_i64 {
        let written = herd
            .send(Write::new("INSERT INTO notes VALUES ($1)").bind(id))
            .await
            .expect("insert");
        let position = written.position.expect("position");
        // The standbys replay 30 ms late: the read waits for one of them, within its deadline.
        let rows = herd
            .send(
                Read::new(marker)
                    .bind(id)
                    .after(position)
                    .timeout(Duration::from_secs(5)),
            )
            .await
            .expect("a standby serves the read once it has replayed the write");
        assert_eq!(rows[0].get::<_, i64>(0), 1, "read {id} missed its write");
    }
    let admin = topology.primary().connect_admin().await.expect("admin");
    let on_primary: i64 = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%AND true%'",
            &[],
        )
        .await
        .expect("stats")
        .get(0);
    assert_eq!(
        on_primary, 0,
        "fallback_to_primary is off: no read on the primary"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_session_keeps_its_positions_per_cluster() {
    // A second cluster whose WAL is far ahead of the first: a session's write there must not
    // make its reads in the first cluster wait for a position that cluster will never reach.
    let topology = start(
        Topology::builder()
            .standbys(1)
            .independent("tenant_db", pgherd::Role::Primary),
    )
    .await;
    let mut settings = topology.settings();
    settings
        .endpoints
        .get_mut("tenant_db")
        .expect("tenant endpoint")
        .cluster = "tenant".into();
    settings.router.fallback_to_primary = false;
    let herd = Herd::start(settings).expect("start");
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    let session = herd.session();
    let main_standby = herd
        .routes()
        .into_iter()
        .find(|r| &*r.name == "standby_1")
        .and_then(|r| r.position)
        .expect("the main standby's position");
    session
        .send(Write::new("CREATE TABLE padding (v text)").cluster("tenant"))
        .await
        .expect("create in the tenant cluster");
    let mut rows_written = 0_i64;
    while session.position("tenant").is_none_or(|p| p <= main_standby) && rows_written < 200_000 {
        session
            .send(
                Write::new(
                    "INSERT INTO padding SELECT repeat('x', 1000) FROM generate_series(1, 10000)",
                )
                .cluster("tenant")
                .timeout(Duration::from_secs(20)),
            )
            .await
            .expect("a big write in the tenant cluster");
        rows_written += 10_000;
    }
    let tenant = session.position("tenant").expect("a tenant position");
    assert!(
        tenant > main_standby,
        "the test needs the tenant's WAL ahead of main's ({tenant} against {main_standby})"
    );
    assert_eq!(session.position("main"), None);
    // A read in `main` is not held to the tenant's position: the standby serves it at once.
    let rows = session
        .send(Read::new("SELECT 1").timeout(Duration::from_secs(2)))
        .await
        .expect("a read in main, served by its standby");
    assert_eq!(rows.len(), 1);
    // And a read in the tenant cluster goes after the tenant write.
    let rows = session
        .send(Read::new("SELECT count(*) FROM padding").cluster("tenant"))
        .await
        .expect("the tenant read sees the write");
    assert_eq!(rows[0].get::<_, i64>(0), rows_written);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_session_write_sent_to_a_replica_by_name_does_not_hold_its_reads() {
    // A logical replica's WAL positions are of its own history, not of its cluster's: a session's
    // write sent there by name must not make the session's reads in the cluster wait for it.
    let topology = start(Topology::builder().standbys(1).replica("reporting")).await;
    let mut settings = topology.settings();
    settings.router.fallback_to_primary = false;
    let herd = Herd::start(settings).expect("start");
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    let main_standby = herd
        .routes()
        .into_iter()
        .find(|r| &*r.name == "standby_1")
        .and_then(|r| r.position)
        .expect("the standby's position");
    let session = herd.session();
    session
        .send(Write::new("CREATE TABLE notes (id bigint PRIMARY KEY)").target("reporting"))
        .await
        .expect("create on the replica");
    let reporting = topology.node("reporting");
    let dbname = reporting
        .config()
        .get_dbname()
        .expect("a database")
        .to_owned();
    let mut written = None;
    for id in 0..20_i64 {
        let write = session
            .send(
                Write::new("INSERT INTO notes VALUES ($1)")
                    .bind(id)
                    .target("reporting"),
            )
            .await
            .expect("a write on the replica");
        written = write.position;
        if written.is_some_and(|p| p > main_standby) {
            break;
        }
        // Its next write starts a new WAL segment: 16 MB further.
        reporting
            .admin_execute(&dbname, "SELECT pg_switch_wal()")
            .await
            .expect("switch the replica's WAL");
    }
    let written = written.expect("a write reports its position");
    assert!(
        written > main_standby,
        "the test needs the replica's WAL ahead of the standby's ({written} against {main_standby})"
    );
    assert_eq!(session.position("main"), None);
    let rows = session
        .send(Read::new("SELECT 1").timeout(Duration::from_secs(2)))
        .await
        .expect("a read in the cluster, served by its standby");
    assert_eq!(rows.len(), 1);
    herd.shutdown().await;
}
