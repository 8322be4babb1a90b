//! The supervisor restarts what crashes, gives up loudly when crashes come too fast, and shuts
//! down in order.

mod support;

use std::time::Duration;

use pgherd::{
    testkit::Topology, ChildId, ErrorKind, ExitReason, Herd, Read, Routable, SupervisorEvent,
    Transact, Write,
};
use support::{eventually, start, EventLog};

fn panicking_transaction() -> Transact<i64> {
    Transact::new(|tx| {
        Box::pin(async move {
            tx.execute("INSERT INTO ledger VALUES (1)", &[]).await?;
            panic!("boom in a transaction closure");
        })
    })
}

fn is_primary(child: &ChildId) -> bool {
    matches!(child, ChildId::Database(name) if &**name == "primary")
}

#[actix_rt::test]
async fn a_panic_in_a_transaction_closure_restarts_the_endpoint_and_the_herd_carries_on() {
    let topology = start(Topology::builder()).await;
    let log = EventLog::default();
    let herd = Herd::builder(topology.settings())
        .subscribe(log.recipient())
        .start()
        .expect("start");
    herd.send(Write::new("CREATE TABLE ledger (v int)"))
        .await
        .expect("create");

    let error = herd
        .send(panicking_transaction())
        .await
        .expect_err("the closure panicked");
    assert_eq!(error.kind(), ErrorKind::Panicked, "{error}");
    assert!(
        error.to_string().contains("boom in a transaction closure"),
        "{error}"
    );

    // The next message succeeds (it waits for the restarted endpoint within its deadline).
    let written = herd
        .send(Write::new("INSERT INTO ledger VALUES (2)").timeout(Duration::from_secs(5)))
        .await
        .expect("the herd carries on");
    assert_eq!(written.rows_affected, 1);
    // The panicked transaction was rolled back: only the second row exists.
    let rows = herd
        .send(Read::new("SELECT v FROM ledger").target("primary"))
        .await
        .expect("read");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 2);

    // The restart is visible in the events.
    eventually("the restart events", Duration::from_secs(5), || async {
        log.any(|e| matches!(e, SupervisorEvent::Exited { child, reason: ExitReason::Poisoned(why), .. } if is_primary(child) && why.contains("boom")))
            && log.any(|e| matches!(e, SupervisorEvent::RestartScheduled { child, restarts: 1, .. } if is_primary(child)))
            && log.any(|e| matches!(e, SupervisorEvent::Started { child, generation, .. } if is_primary(child) && *generation > 1))
    })
    .await;
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_restart_storm_stops_at_the_intensity_limit_with_a_clear_error() {
    let topology = start(Topology::builder()).await;
    let mut settings = topology.settings();
    settings.supervisor.max_restarts = 2;
    settings.supervisor.backoff_initial = Duration::from_millis(10);
    let log = EventLog::default();
    let herd = Herd::builder(settings)
        .subscribe(log.recipient())
        .start()
        .expect("start");
    herd.send(Write::new("CREATE TABLE ledger (v int)"))
        .await
        .expect("create");

    for crash in 1..=3 {
        let error = herd
            .send(panicking_transaction().timeout(Duration::from_secs(5)))
            .await
            .expect_err("the closure panicked");
        assert_eq!(error.kind(), ErrorKind::Panicked, "crash {crash}: {error}");
    }
    eventually(
        "the supervisor to give up",
        Duration::from_secs(5),
        || async { log.any(|e| matches!(e, SupervisorEvent::GaveUp { .. })) },
    )
    .await;
    let error = herd
        .send(Read::new("SELECT 1"))
        .await
        .expect_err("a herd that gave up answers with an error");
    assert_eq!(error.kind(), ErrorKind::Stopped);
    let text = error.to_string();
    assert!(text.contains("gave up after 2 restarts"), "{text}");
    assert!(text.contains("max_restarts = 2"), "{text}");
    assert!(text.contains("boom in a transaction closure"), "{text}");
    assert_eq!(
        herd.failure().as_deref(),
        Some(text.trim_start_matches("stopped: "))
    );
    // The actor path says the same.
    let error = herd
        .router()
        .send(Read::new("SELECT 1"))
        .await
        .expect("the router still answers")
        .expect_err("with an error");
    assert_eq!(error.kind(), ErrorKind::Stopped);
}

#[actix_rt::test]
async fn shutdown_lets_messages_in_flight_finish_then_refuses_new_ones() {
    let topology = start(Topology::builder()).await;
    let mut settings = topology.settings();
    settings.supervisor.shutdown_grace = Duration::from_secs(5);
    let log = EventLog::default();
    let herd = Herd::builder(settings)
        .subscribe(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");

    let slow = {
        let herd = herd.clone();
        actix_rt::spawn(async move { herd.send(Read::new("SELECT pg_sleep(0.5)")).await })
    };
    eventually(
        "the slow query to start",
        Duration::from_secs(5),
        || async { herd.routes().iter().any(|r| r.outstanding > 0) },
    )
    .await;
    let unfinished = herd.shutdown().await;
    assert_eq!(unfinished, 0, "the grace period covers the slow query");
    slow.await
        .expect("task")
        .expect("the query in flight finished normally");

    let error = herd.send(Read::new("SELECT 1")).await.expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Stopped);
    assert!(error.to_string().contains("shut"), "{error}");
    eventually("the shutdown event", Duration::from_secs(5), || async {
        log.any(|e| matches!(e, SupervisorEvent::ShutDown))
    })
    .await;
    // Every pool is closed: no pgherd connection is left on the server.
    let admin = topology.primary().connect_admin().await.expect("admin");
    eventually(
        "pgherd's connections to close",
        Duration::from_secs(5),
        || {
            let admin = &admin;
            async move {
                admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgherd'",
                        &[],
                    )
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 0)
            }
        },
    )
    .await;
}

#[actix_rt::test]
async fn herd_start_outside_an_actix_system_is_a_clear_error() {
    // `actix_rt::test` runs a System; a plain thread has none.
    let settings = pgherd::Settings::from_toml(
        "[endpoints.primary]\nrole = \"primary\"\nhost = \"127.0.0.1\"\ndbname = \"d\"\nuser = \"u\"\n",
    )
    .expect("settings");
    let outcome = std::thread::spawn(move || Herd::start(settings).map(|_| ()))
        .join()
        .expect("thread");
    let error = outcome.expect_err("no System");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("actix_web::main"), "{error}");
}

/// How many connections pgherd holds to `node` (application and probes).
async fn herd_connections(node: &pgherd::testkit::Node) -> i64 {
    let admin = node.connect_admin().await.expect("admin");
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgherd'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

#[actix_rt::test]
async fn dropping_the_last_handle_shuts_the_herd_down() {
    let topology = start(Topology::builder()).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    let clone = herd.clone();
    clone.send(Read::new("SELECT 1")).await.expect("read");
    drop(herd);
    assert!(
        herd_connections(topology.primary()).await >= 2,
        "a clone keeps the herd running (pool and probe connections)"
    );
    drop(clone);
    eventually(
        "every pgherd connection to close",
        Duration::from_secs(10),
        || async { herd_connections(topology.primary()).await == 0 },
    )
    .await;
}
