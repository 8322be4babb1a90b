//! Connection failures: reads move on, writes are retried only when that is provably safe, a
//! write whose commit may have happened says so, and an unreachable database is not a crash.

mod support;

use std::time::Duration;

use pgherd::{
    testkit::Topology, Batch, ErrorKind, HealthState, Herd, Read, Routable, SupervisorEvent, Write,
};
use support::{eventually, start, EventLog};

const ROOMY: Duration = Duration::from_secs(10);

async fn health(herd: &Herd, name: &str) -> Option<HealthState> {
    herd.routes()
        .into_iter()
        .find(|r| &*r.name == name)
        .map(|r| r.health)
}

#[actix_rt::test]
async fn reads_keep_working_when_a_standby_dies() {
    let topology = start(Topology::builder().standbys(2)).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    for _ in 0..10 {
        herd.send(Read::new("SELECT 1")).await.expect("read");
    }
    topology.standby(0).kill().expect("kill a standby");
    for round in 0..50 {
        herd.send(Read::new("SELECT 1").timeout(ROOMY))
            .await
            .unwrap_or_else(|e| panic!("read {round} failed after a standby died: {e}"));
    }
    eventually(
        "the dead standby to be marked unreachable",
        ROOMY,
        || async { health(&herd, "standby_1").await == Some(HealthState::Down) },
    )
    .await;
    herd.shutdown().await;
}

#[actix_rt::test]
async fn an_unreachable_database_is_not_a_crash_and_is_reconnected() {
    let topology = start(Topology::builder().standbys(1)).await;
    topology.standby(0).stop().await.expect("stop the standby");
    let log = EventLog::default();
    let herd = Herd::builder(topology.settings())
        .subscribe(log.recipient())
        .start()
        .expect("a herd starts with an endpoint down");
    eventually("the standby to be declared down", ROOMY, || async {
        health(&herd, "standby_1").await == Some(HealthState::Down)
    })
    .await;
    // Reads fall back to the primary meanwhile.
    herd.send(Read::new("SELECT 1")).await.expect("read");
    topology
        .standby(0)
        .start()
        .await
        .expect("start the standby");
    eventually("the standby to be reached again", ROOMY, || async {
        health(&herd, "standby_1").await == Some(HealthState::Up)
    })
    .await;
    assert!(
        !log.any(|e| matches!(e, SupervisorEvent::Exited { .. })),
        "no actor stopped: {:?}",
        log.events()
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_write_sent_while_the_primary_is_down_waits_for_it() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new("CREATE TABLE waited (v int)"))
        .await
        .expect("create");
    topology.primary().stop().await.expect("stop the primary");
    let write = {
        let herd = herd.clone();
        actix_rt::spawn(async move {
            herd.send(Write::new("INSERT INTO waited VALUES (1)").timeout(ROOMY))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !write.is_finished(),
        "the write gave up while the primary was down"
    );
    topology.primary().start().await.expect("start the primary");
    let written = write.await.expect("task").expect("the write went through");
    assert_eq!(written.rows_affected, 1);
    let rows = herd
        .send(Read::new("SELECT count(*) FROM waited"))
        .await
        .expect("count");
    assert_eq!(rows[0].get::<_, i64>(0), 1, "exactly once");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_write_in_flight_when_the_primary_dies_is_commit_unknown() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new("CREATE TABLE doomed (v int)"))
        .await
        .expect("create");
    let write = {
        let herd = herd.clone();
        actix_rt::spawn(async move {
            herd.send(Write::new("INSERT INTO doomed SELECT 1 FROM pg_sleep(5)").timeout(ROOMY))
                .await
        })
    };
    // On the server, past its send: the kill can only cut it while it commits.
    support::wait_active(topology.primary(), "INSERT INTO doomed").await;
    topology.primary().kill().expect("kill the primary");
    let error = write
        .await
        .expect("task")
        .expect_err("the primary died under it");
    assert_eq!(error.kind(), ErrorKind::CommitUnknown, "{error}");
    assert!(!error.is_retryable(), "never retried blindly");
    assert_eq!(error.endpoint(), Some("primary"));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_transaction_cut_before_its_commit_reports_nothing_committed() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new("CREATE TABLE cut (v int)"))
        .await
        .expect("create");
    let batch = {
        let herd = herd.clone();
        actix_rt::spawn(async move {
            herd.send(
                Batch::new()
                    .statement("INSERT INTO cut VALUES (1)")
                    .statement("SELECT pg_sleep(5)")
                    .timeout(ROOMY),
            )
            .await
        })
    };
    support::wait_active(topology.primary(), "SELECT pg_sleep(5)").await;
    topology.primary().kill().expect("kill the primary");
    let error = batch
        .await
        .expect("task")
        .expect_err("the primary died under it");
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(
        error.to_string().contains("nothing was committed"),
        "{error}"
    );
    topology.primary().start().await.expect("restart");
    let rows = herd
        .send(Read::new("SELECT count(*) FROM cut").timeout(ROOMY))
        .await
        .expect("count");
    assert_eq!(
        rows[0].get::<_, i64>(0),
        0,
        "the transaction was rolled back"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn an_idempotent_write_is_retried_after_its_connection_is_lost() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new(
        "CREATE TABLE upserts (k int PRIMARY KEY, v int)",
    ))
    .await
    .expect("create");
    let write = {
        let herd = herd.clone();
        actix_rt::spawn(async move {
            herd.send(
                Write::new(
                    "INSERT INTO upserts SELECT 1, 7 FROM pg_sleep(1) \
                     ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                )
                .idempotent()
                .timeout(Duration::from_secs(20)),
            )
            .await
        })
    };
    eventually("the write to run", ROOMY, || async {
        herd.routes().iter().any(|r| r.outstanding > 0)
    })
    .await;
    topology.primary().kill().expect("kill the primary");
    topology
        .primary()
        .start()
        .await
        .expect("restart the primary");
    let written = write
        .await
        .expect("task")
        .expect("the idempotent write was retried and went through");
    assert_eq!(written.rows_affected, 1);
    let rows = herd
        .send(Read::new("SELECT count(*), max(v) FROM upserts"))
        .await
        .expect("read");
    assert_eq!(rows[0].get::<_, i64>(0), 1);
    assert_eq!(rows[0].get::<_, i32>(1), 7);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn sql_errors_are_reported_with_their_sqlstate_and_do_not_mark_the_endpoint_down() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new("CREATE TABLE unique_things (k int PRIMARY KEY)"))
        .await
        .expect("create");
    herd.send(Write::new("INSERT INTO unique_things VALUES (1)"))
        .await
        .expect("first insert");
    let error = herd
        .send(Write::new("INSERT INTO unique_things VALUES (1)"))
        .await
        .expect_err("duplicate key");
    assert_eq!(error.kind(), ErrorKind::Sql);
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    assert_eq!(error.endpoint(), Some("primary"));
    assert!(error.to_string().contains("23505"), "{error}");
    assert!(!error.is_retryable());
    assert_eq!(health(&herd, "primary").await, Some(HealthState::Up));
    herd.send(Read::new("SELECT 1"))
        .await
        .expect("still serving");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_parameter_of_the_wrong_type_is_a_mapping_error_not_a_connection_failure() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new("CREATE TABLE typed (v int)"))
        .await
        .expect("create");
    let error = herd
        .send(Write::new("INSERT INTO typed VALUES ($1)").bind("not a number"))
        .await
        .expect_err("a text parameter for an int column");
    assert_eq!(error.kind(), ErrorKind::Mapping, "{error}");
    assert!(
        !error.is_commit_unknown() && !error.is_retryable(),
        "{error}"
    );
    assert_eq!(health(&herd, "primary").await, Some(HealthState::Up));
    let rows = herd
        .send(Read::new("SELECT count(*) FROM typed"))
        .await
        .expect("count");
    assert_eq!(rows[0].get::<_, i64>(0), 0);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_transaction_whose_closure_swallowed_an_error_is_not_reported_committed() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.send(Write::new("CREATE TABLE kept (k int PRIMARY KEY)"))
        .await
        .expect("create");
    let outcome = herd
        .send(pgherd::Transact::new(|tx| {
            Box::pin(async move {
                tx.execute("INSERT INTO kept VALUES (1)", &[]).await?;
                // The duplicate fails and aborts the transaction; the closure ignores it.
                let _ = tx.execute("INSERT INTO kept VALUES (1)", &[]).await;
                Ok(())
            })
        }))
        .await;
    let error = outcome.expect_err("an aborted transaction cannot commit");
    assert!(
        error.to_string().contains("nothing was committed"),
        "{error}"
    );
    let rows = herd
        .send(Read::new("SELECT count(*) FROM kept"))
        .await
        .expect("count");
    assert_eq!(rows[0].get::<_, i64>(0), 0);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_caller_that_stops_waiting_has_its_statement_cancelled_on_the_server() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    let task = {
        let herd = herd.clone();
        actix_rt::spawn(async move {
            herd.send(Read::new("SELECT pg_sleep(30) /* abandoned */").timeout(ROOMY))
                .await
        })
    };
    support::wait_active(topology.primary(), "abandoned").await;
    // An actix-web client that hangs up drops its handler's future just like this.
    task.abort();
    let admin = topology.primary().connect_admin().await.expect("admin");
    eventually("the abandoned statement to be cancelled", ROOMY, || {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                     AND query LIKE '%abandoned%' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 0)
        }
    })
    .await;
    herd.send(Read::new("SELECT 1"))
        .await
        .expect("the herd carries on");
    herd.shutdown().await;
}
