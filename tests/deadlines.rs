//! One deadline per message: it covers waiting and running, and a statement past it is cancelled
//! on the server, leaving its connection usable.

mod support;

use std::time::{Duration, Instant};

use pgherd::{testkit::Topology, ErrorKind, Herd, Read, Routable, Write};
use support::{eventually, start};

/// Whether a statement containing `marker` is still running on the server.
async fn running(topology: &Topology, marker: &str) -> bool {
    let admin = topology.primary().connect_admin().await.expect("admin");
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' \
             AND state = 'active' AND pid <> pg_backend_pid()",
            &[&marker],
        )
        .await
        .map(|row| row.get::<_, i64>(0) > 0)
        .unwrap_or(true)
}

/// A herd whose primary has a single connection, so that reusing it proves it was freed.
fn one_connection_herd(topology: &Topology) -> Herd {
    let mut settings = topology.settings();
    settings.pool.max_size = 1;
    Herd::start(settings).expect("start")
}

#[actix_rt::test]
async fn a_read_past_its_deadline_is_cancelled_on_the_server() {
    let topology = start(Topology::builder()).await;
    let herd = one_connection_herd(&topology);
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");

    let deadline = Duration::from_millis(500);
    let started = Instant::now();
    let error = herd
        .send(Read::new("SELECT pg_sleep(30) /* read-deadline */").timeout(deadline))
        .await
        .expect_err("30 s cannot fit in 500 ms");
    let took = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(error.is_retryable());
    assert!(took >= deadline, "answered before the deadline: {took:?}");
    assert!(
        took < deadline + Duration::from_millis(300),
        "answered late: {took:?}"
    );

    eventually(
        "the statement to leave pg_stat_activity",
        Duration::from_secs(3),
        || {
            let topology = &topology;
            async move { !running(topology, "read-deadline").await }
        },
    )
    .await;
    // The single connection is usable again.
    let started = Instant::now();
    let rows = herd
        .send(Read::new("SELECT 41 + 1").timeout(Duration::from_secs(2)))
        .await
        .expect("the connection was freed");
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    assert!(started.elapsed() < Duration::from_secs(1));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_write_past_its_deadline_is_cancelled_and_reported_not_committed() {
    let topology = start(Topology::builder()).await;
    let herd = one_connection_herd(&topology);
    herd.send(Write::new("CREATE TABLE slow_writes (v int)"))
        .await
        .expect("create");

    let deadline = Duration::from_millis(400);
    let started = Instant::now();
    let error = herd
        .send(
            Write::new("INSERT INTO slow_writes SELECT 1 FROM pg_sleep(30) /* write-deadline */")
                .timeout(deadline),
        )
        .await
        .expect_err("30 s cannot fit in 400 ms");
    let took = started.elapsed();
    // The server confirmed the cancel, so the outcome is known: not committed.
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(
        error.to_string().contains("nothing was committed"),
        "{error}"
    );
    assert!(
        took < deadline + pgherd::database::CANCEL_GRACE,
        "answered after the grace: {took:?}"
    );
    assert!(!running(&topology, "write-deadline").await);
    let rows = herd
        .send(Read::new("SELECT count(*) FROM slow_writes").target("primary"))
        .await
        .expect("count");
    assert_eq!(
        rows[0].get::<_, i64>(0),
        0,
        "the cancelled insert left no row"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn the_deadline_covers_waiting_for_a_connection() {
    let topology = start(Topology::builder()).await;
    let herd = one_connection_herd(&topology);
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    let busy = {
        let herd = herd.clone();
        actix_rt::spawn(async move {
            herd.send(Read::new("SELECT pg_sleep(2)").timeout(Duration::from_secs(5)))
                .await
        })
    };
    eventually(
        "the first query to hold the connection",
        Duration::from_secs(5),
        || async { herd.routes().iter().any(|r| r.outstanding > 0) },
    )
    .await;
    let started = Instant::now();
    let error = herd
        .send(Read::new("SELECT 1").timeout(Duration::from_millis(300)))
        .await
        .expect_err("no connection is free in time");
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    busy.await.expect("task").expect("the first query finished");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn the_deadline_covers_waiting_for_a_target() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    topology.primary().stop().await.expect("stop the primary");

    let deadline = Duration::from_millis(700);
    let started = Instant::now();
    let error = herd
        .send(Write::new("SELECT 1").timeout(deadline))
        .await
        .expect_err("no primary within the deadline");
    let took = started.elapsed();
    assert!(
        error.is_connection() || error.kind() == ErrorKind::NoTarget,
        "{error}"
    );
    assert!(!error.is_commit_unknown(), "nothing was sent: {error}");
    assert!(
        took >= deadline - Duration::from_millis(50),
        "gave up early: {took:?}"
    );
    assert!(
        took < deadline + Duration::from_millis(500),
        "gave up late: {took:?}"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn an_expired_deadline_is_answered_at_once() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    let error = herd
        .send(Read::new("SELECT 1").deadline(std::time::Instant::now()))
        .await
        .expect_err("already expired");
    assert_eq!(error.kind(), ErrorKind::Timeout);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_write_whose_wait_for_synchronous_replication_is_cancelled_is_commit_unknown() {
    // The only synchronous standby hangs: commits wait for it. A cancel ends that wait and
    // PostgreSQL answers success ("committed locally, but might not have been replicated"):
    // the write must not be reported acknowledged.
    let topology = start(Topology::builder().standbys(1).synchronous(1)).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    herd.send(Write::new("CREATE TABLE synced (v int)"))
        .await
        .expect("create");
    topology.standby(0).hang().expect("hang the standby");
    let error = herd
        .send(Write::new("INSERT INTO synced VALUES (1)").timeout(Duration::from_millis(500)))
        .await
        .expect_err("the commit cannot be replicated in time");
    topology.standby(0).resume().expect("resume the standby");
    assert_eq!(error.kind(), ErrorKind::CommitUnknown, "{error}");
    assert!(
        error.to_string().contains("synchronous replication"),
        "{error}"
    );
    // It did commit on the primary: "unknown" was the honest answer, "failed" would be a lie.
    let client = topology.primary().connect().await.expect("connect");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM synced", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1);
    herd.shutdown().await;
}
