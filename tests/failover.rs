//! Failover against real servers: a primary killed under load, promotion, fencing of the old
//! primary, following an external promotion, moving writes to a backup.

mod support;

use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    rc::Rc,
    time::{Duration, Instant},
};

use pgherd::{
    settings::FailoverMode, testkit::Topology, ErrorKind, FailoverEvent, Herd, Read, Routable,
    Write,
};
use support::{eventually, start, Log};

const ROOMY: Duration = Duration::from_secs(15);

/// What happened to the writes of a workload.
#[derive(Default)]
struct Writes {
    acked: Vec<i64>,
    unknown: Vec<i64>,
    failed: Vec<(i64, pgherd::Error)>,
}

/// Inserts ids `first..` one after another until `stop`, recording every outcome.
async fn writer(herd: Herd, first: i64, stop: Rc<Cell<bool>>, writes: Rc<RefCell<Writes>>) {
    let mut id = first;
    while !stop.get() {
        let result = herd
            .send(
                Write::new("INSERT INTO ledger (id) VALUES ($1)")
                    .bind(id)
                    .timeout(Duration::from_secs(5)),
            )
            .await;
        let mut writes = writes.borrow_mut();
        match result {
            Ok(_) => writes.acked.push(id),
            Err(error) if error.is_commit_unknown() => writes.unknown.push(id),
            Err(error) => writes.failed.push((id, error)),
        }
        id += 1;
    }
}

/// Reads until `stop`, counting failures.
async fn reader(herd: Herd, stop: Rc<Cell<bool>>, failures: Rc<Cell<usize>>) {
    while !stop.get() {
        let read = herd
            .send(Read::new("SELECT count(*) FROM ledger").timeout(Duration::from_secs(2)))
            .await;
        if read.is_err() {
            failures.set(failures.get() + 1);
        }
    }
}

/// The ids present on `node`.
async fn ids_on(node: &pgherd::testkit::Node) -> BTreeSet<i64> {
    let client = node.connect().await.expect("connect");
    client
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("ledger")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn accepted(herd: &Herd) -> Option<String> {
    herd.routes()
        .iter()
        .find(|r| r.primary)
        .map(|r| r.name.to_string())
}

/// A synchronous-standby topology with promote mode, and its herd.
async fn promote_setup(log: &Log<FailoverEvent>) -> (Topology, Herd) {
    let topology = start(
        Topology::builder()
            .standbys(2)
            .synchronous(1)
            .stat_statements(true),
    )
    .await;
    let mut settings = topology.settings();
    settings.failover.mode = FailoverMode::Promote;
    let herd = Herd::builder(settings)
        .subscribe_failover(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    herd.send(Write::new("CREATE TABLE ledger (id bigint PRIMARY KEY)"))
        .await
        .expect("create");
    (topology, herd)
}

#[actix_rt::test]
async fn a_killed_primary_is_replaced_and_no_acknowledged_write_is_lost() {
    let log = Log::<FailoverEvent>::default();
    let (topology, herd) = promote_setup(&log).await;
    let stop = Rc::new(Cell::new(false));
    let writes = Rc::new(RefCell::new(Writes::default()));
    let read_failures = Rc::new(Cell::new(0));
    let mut tasks = Vec::new();
    for worker in 0..4_i64 {
        tasks.push(actix_rt::spawn(writer(
            herd.clone(),
            worker * 1_000_000,
            Rc::clone(&stop),
            Rc::clone(&writes),
        )));
    }
    for _ in 0..2 {
        tasks.push(actix_rt::spawn(reader(
            herd.clone(),
            Rc::clone(&stop),
            Rc::clone(&read_failures),
        )));
    }
    eventually("writes before the kill", ROOMY, || async {
        writes.borrow().acked.len() >= 200
    })
    .await;
    let killed_at = Instant::now();
    topology.primary().kill().expect("kill the primary");
    let acked_at_kill = writes.borrow().acked.len();
    eventually("writes to resume on a new primary", ROOMY, || async {
        writes.borrow().acked.len() >= acked_at_kill + 200
    })
    .await;
    let resumed = killed_at.elapsed();
    stop.set(true);
    for task in tasks {
        task.await.expect("worker");
    }

    let new_primary = accepted(&herd).expect("a primary is accepted");
    assert_ne!(new_primary, "primary", "a standby took over");
    let node = topology.node(&new_primary);
    let present = ids_on(node).await;
    let writes = writes.take();
    let lost: Vec<i64> = writes
        .acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // A write reported failed (not commit-unknown) must not have been committed.
    for (id, error) in &writes.failed {
        assert!(
            !present.contains(id),
            "write {id} was reported failed ({error}) but is committed"
        );
        assert!(
            !matches!(error.kind(), ErrorKind::Sql | ErrorKind::Mapping),
            "unexpected failure: {error}"
        );
    }
    // The failover was reported, with its course.
    let report = log
        .find(|event| match event {
            FailoverEvent::PrimaryAccepted {
                report: Some(report),
                ..
            } => Some(report.clone()),
            _ => None,
        })
        .expect("a failover report");
    assert_eq!(&*report.old_primary, "primary");
    assert_eq!(*report.new_primary, *new_primary);
    assert!(report.promoted.is_some());
    assert!(report.reason.contains("most advanced"), "{}", report.reason);
    eprintln!(
        "acked {} ({} after the kill), commit-unknown {}, failed {}, read failures {}, writes resumed {:?} after the kill, detection {:?}, failover {:?}, possible loss {:?} bytes",
        writes.acked.len(),
        writes.acked.len() - acked_at_kill,
        writes.unknown.len(),
        writes.failed.len(),
        read_failures.get(),
        resumed,
        report.detection(),
        report.duration(),
        report.possible_loss_bytes
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn the_killed_primary_restarted_writable_is_fenced() {
    let log = Log::<FailoverEvent>::default();
    let (topology, herd) = promote_setup(&log).await;
    herd.send(Write::new("INSERT INTO ledger VALUES (1)"))
        .await
        .expect("insert");
    topology.primary().kill().expect("kill the primary");
    eventually("a standby to be accepted as the primary", ROOMY, || async {
        accepted(&herd).is_some_and(|p| p != "primary")
    })
    .await;
    let new_primary = accepted(&herd).expect("accepted");

    // The old primary comes back as it was: writable, on the old timeline.
    topology
        .primary()
        .start()
        .await
        .expect("restart the old primary");
    let old = topology.primary().connect().await.expect("connect");
    let writable: bool = !old
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("probe")
        .get::<_, bool>(0);
    assert!(writable, "the test needs a writable old primary");
    eventually("the old primary to be seen and fenced", ROOMY, || async {
        herd.routes()
            .iter()
            .any(|r| &*r.name == "primary" && r.fenced && r.health == pgherd::HealthState::Up)
    })
    .await;
    assert!(log
        .any(|e| matches!(e, FailoverEvent::Fenced { endpoint, .. } if &**endpoint == "primary")));

    // No traffic reaches it: writes and reads go elsewhere, explicit targets are refused.
    for id in 2..52_i64 {
        herd.send(Write::new("INSERT INTO ledger VALUES ($1)").bind(id))
            .await
            .expect("write on the new primary");
        herd.send(Read::new("SELECT count(*) FROM ledger"))
            .await
            .expect("read");
    }
    let error = herd
        .send(Read::new("SELECT 1").target("primary"))
        .await
        .expect_err("a fenced endpoint is refused even by name");
    assert!(error.to_string().contains("fenced"), "{error}");
    let admin = topology.primary().connect_admin().await.expect("admin");
    let on_old: i64 = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%ledger%'",
            &[],
        )
        .await
        .expect("stats")
        .get(0);
    assert_eq!(on_old, 0, "the fenced old primary got {on_old} statements");
    assert_eq!(ids_on(topology.node(&new_primary)).await.len(), 51);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn follow_mode_finds_an_externally_promoted_standby() {
    let topology = start(Topology::builder().standbys(2).stat_statements(true)).await;
    let log = Log::<FailoverEvent>::default();
    let herd = Herd::builder(topology.settings())
        .subscribe_failover(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    herd.send(Write::new("CREATE TABLE ledger (id bigint PRIMARY KEY)"))
        .await
        .expect("create");

    // An external manager: the primary goes away, standby_2 is promoted.
    topology.primary().kill().expect("kill the primary");
    eventually("the primary to be withdrawn", ROOMY, || async {
        log.any(|e| matches!(e, FailoverEvent::PrimaryLost { .. }))
    })
    .await;
    assert_eq!(
        accepted(&herd),
        None,
        "follow mode promotes nothing by itself"
    );
    topology
        .standby(1)
        .promote()
        .await
        .expect("external promotion");
    let written = herd
        .send(Write::new("INSERT INTO ledger VALUES (1)").timeout(ROOMY))
        .await
        .expect("writes follow the new primary");
    assert_eq!(written.rows_affected, 1);
    assert_eq!(accepted(&herd).as_deref(), Some("standby_2"));

    // The old primary returns: no write is ever sent to it.
    topology
        .primary()
        .start()
        .await
        .expect("restart the old primary");
    eventually("the old primary to be fenced", ROOMY, || async {
        herd.routes()
            .iter()
            .any(|r| &*r.name == "primary" && r.fenced && r.health == pgherd::HealthState::Up)
    })
    .await;
    for id in 2..22_i64 {
        herd.send(Write::new("INSERT INTO ledger VALUES ($1)").bind(id))
            .await
            .expect("write");
    }
    let admin = topology.primary().connect_admin().await.expect("admin");
    let on_old: i64 = admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%INSERT INTO ledger%'",
            &[],
        )
        .await
        .expect("stats")
        .get(0);
    assert_eq!(on_old, 0);
    assert_eq!(ids_on(topology.standby(1)).await.len(), 21);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn backup_mode_moves_writes_to_the_backup() {
    let topology = start(Topology::builder().standbys(1).backup("backup")).await;
    let mut settings = topology.settings();
    settings.failover.mode = FailoverMode::Backup;
    let log = Log::<FailoverEvent>::default();
    let herd = Herd::builder(settings)
        .subscribe_failover(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    for node in ["primary", "backup"] {
        herd.send(Write::new("CREATE TABLE ledger (id bigint PRIMARY KEY)").target(node))
            .await
            .expect("create");
    }
    herd.send(Write::new("INSERT INTO ledger VALUES (1)"))
        .await
        .expect("on the primary");

    topology.primary().kill().expect("kill the primary");
    herd.send(Write::new("INSERT INTO ledger VALUES (2)").timeout(ROOMY))
        .await
        .expect("the write moves to the backup");
    assert_eq!(accepted(&herd).as_deref(), Some("backup"));
    assert_eq!(
        ids_on(topology.node("backup")).await,
        BTreeSet::from([2]),
        "the write went to the backup"
    );
    // Reads follow the writes: the standby follows the lost primary, not the backup.
    let rows = herd
        .send(Read::new("SELECT count(*) FROM ledger"))
        .await
        .expect("read");
    assert_eq!(rows[0].get::<_, i64>(0), 1, "read from the backup");
    assert!(log.any(|e| matches!(
        e,
        FailoverEvent::PrimaryAccepted { endpoint, report: Some(_), .. } if &**endpoint == "backup"
    )));

    // Failback is manual: the restarted primary stays fenced until an operator decides.
    topology.primary().start().await.expect("restart");
    eventually("the primary to be back and fenced", ROOMY, || async {
        herd.routes()
            .iter()
            .any(|r| &*r.name == "primary" && r.fenced && r.health == pgherd::HealthState::Up)
    })
    .await;
    assert_eq!(accepted(&herd).as_deref(), Some("backup"));
    herd.accept_primary("primary")
        .await
        .expect("an operator fails back");
    herd.send(Write::new("INSERT INTO ledger VALUES (3)"))
        .await
        .expect("on the primary again");
    assert_eq!(ids_on(topology.primary()).await, BTreeSet::from([1, 3]));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_hung_primary_that_resumes_after_the_failover_loses_no_acknowledged_write() {
    // The primary hangs (SIGSTOP) with writes in flight, a standby is promoted, and then the old
    // primary resumes and finishes those writes: the other standby still streams from it and
    // acknowledges them as the synchronous one. They are not on the new primary, so they must
    // not be reported acknowledged.
    let log = Log::<FailoverEvent>::default();
    let (topology, herd) = promote_setup(&log).await;
    let stop = Rc::new(Cell::new(false));
    let writes = Rc::new(RefCell::new(Writes::default()));
    let tasks: Vec<_> = (0..4_i64)
        .map(|w| {
            actix_rt::spawn(writer(
                herd.clone(),
                w * 1_000_000,
                Rc::clone(&stop),
                Rc::clone(&writes),
            ))
        })
        .collect();
    eventually("writes to flow", ROOMY, || async {
        writes.borrow().acked.len() >= 100
    })
    .await;
    topology.primary().hang().expect("hang the primary");
    eventually("a standby to be accepted as the primary", ROOMY, || async {
        accepted(&herd).is_some_and(|p| p != "primary")
    })
    .await;
    topology.primary().resume().expect("resume the old primary");
    let acked_at_resume = writes.borrow().acked.len();
    eventually("writes to go on on the new primary", ROOMY, || async {
        writes.borrow().acked.len() >= acked_at_resume + 100
    })
    .await;
    stop.set(true);
    for task in tasks {
        task.await.expect("writer");
    }
    let new_primary = accepted(&herd).expect("accepted");
    let present = ids_on(topology.node(&new_primary)).await;
    let on_old = ids_on(topology.primary()).await;
    let writes = writes.take();
    let lost: Vec<i64> = writes
        .acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The late commits happened, on the old primary only, and were reported commit-unknown.
    let late: Vec<i64> = writes
        .unknown
        .iter()
        .copied()
        .filter(|id| on_old.contains(id) && !present.contains(id))
        .collect();
    eprintln!(
        "acked {}, commit-unknown {} (committed only on the old primary: {}), failed {}",
        writes.acked.len(),
        writes.unknown.len(),
        late.len(),
        writes.failed.len()
    );
    for (id, error) in &writes.failed {
        assert!(
            !present.contains(id),
            "write {id} reported failed ({error}) but committed"
        );
    }
    herd.shutdown().await;
}
