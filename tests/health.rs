//! The health actor: probes on connections of their own, hysteresis, events, and traffic that
//! follows health (a cut-off standby loses its reads and gets them back; a hung primary is
//! detected through probe timeouts).

mod support;

use std::time::{Duration, Instant};

use pgherd::{
    testkit::{FaultMode, Node, Topology},
    HealthState, Herd, ObservedRole, Read, Routable, StateChanged, Write,
};
use support::{eventually, start, Log};

const ROOMY: Duration = Duration::from_secs(15);

fn state(herd: &Herd, name: &str) -> Option<HealthState> {
    herd.routes()
        .into_iter()
        .find(|r| &*r.name == name)
        .map(|r| r.health)
}

/// How many reads of `marker` reached `node`.
async fn reads_on(node: &Node, marker: &str) -> i64 {
    let admin = node.connect_admin().await.expect("admin");
    admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%' || $1 || '%'",
            &[&marker],
        )
        .await
        .expect("pg_stat_statements")
        .get(0)
}

#[actix_rt::test]
async fn a_standby_cut_off_loses_its_reads_within_the_health_window_and_gets_them_back() {
    let topology = start(
        Topology::builder()
            .standbys(2)
            .proxied("standby_1")
            .stat_statements(true),
    )
    .await;
    let log = Log::<StateChanged>::default();
    let herd = Herd::builder(topology.settings())
        .subscribe_state(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    let proxy = topology.proxy("standby_1").expect("proxy");
    let marker = "SELECT count(*) FROM pg_class";
    for _ in 0..20 {
        herd.send(Read::new(marker)).await.expect("read");
    }
    let before = reads_on(topology.standby(0), marker).await;
    assert!(before > 0, "reads reach standby_1 through its proxy");

    // The network to standby_1 goes silent.
    let cut = Instant::now();
    proxy.set_mode(FaultMode::Blackhole);
    let settings = pgherd::settings::HealthSettings::default();
    let window = settings.interval
        + (settings.timeout + settings.suspect_interval) * settings.failures_to_down;
    eventually("standby_1 to be declared down", window * 3, || async {
        state(&herd, "standby_1") == Some(HealthState::Down)
    })
    .await;
    let detected = cut.elapsed();
    assert!(
        detected <= window * 2,
        "declared down after {detected:?}, window {window:?}"
    );
    let down = log
        .find(|e| {
            (&*e.endpoint == "standby_1" && e.to == HealthState::Down).then(|| e.reason.clone())
        })
        .expect("a StateChanged event");
    assert!(down.contains("no answer within"), "{down}");
    // Reads go to standby_2 only now, and succeed.
    for _ in 0..20 {
        herd.send(Read::new(marker).timeout(Duration::from_secs(2)))
            .await
            .expect("reads avoid the cut-off standby");
    }
    // Back on the network: re-admitted after `successes_to_up` good probes.
    proxy.set_mode(FaultMode::Pass);
    eventually("standby_1 to come back", ROOMY, || async {
        state(&herd, "standby_1") == Some(HealthState::Up)
    })
    .await;
    assert!(log.any(|e| &*e.endpoint == "standby_1"
        && e.to == HealthState::Up
        && e.from != HealthState::Unknown));
    let again = reads_on(topology.standby(0), marker).await;
    for _ in 0..20 {
        herd.send(Read::new(marker)).await.expect("read");
    }
    assert!(
        reads_on(topology.standby(0), marker).await > again,
        "reads reach standby_1 again"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_hung_primary_is_detected_through_probe_timeouts() {
    let topology = start(Topology::builder().standbys(1)).await;
    let log = Log::<StateChanged>::default();
    let herd = Herd::builder(topology.settings())
        .subscribe_state(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    let hung = Instant::now();
    topology.primary().hang().expect("SIGSTOP the primary");
    eventually("the hung primary to be declared down", ROOMY, || async {
        state(&herd, "primary") == Some(HealthState::Down)
    })
    .await;
    let detected = hung.elapsed();
    // The event reaches the subscriber on its own thread, possibly just after the state.
    eventually("the down event", ROOMY, || {
        let seen = log.any(|e| &*e.endpoint == "primary" && e.to == HealthState::Down);
        async move { seen }
    })
    .await;
    let reason = log
        .find(|e| {
            (&*e.endpoint == "primary" && e.to == HealthState::Down).then(|| e.reason.clone())
        })
        .expect("an event");
    assert!(
        reason.contains("no answer within"),
        "detected by timeouts: {reason}"
    );
    assert!(detected < Duration::from_secs(3), "took {detected:?}");
    // Writes wait for a primary; reads still go to the standby.
    herd.send(Read::new("SELECT 1").timeout(Duration::from_secs(2)))
        .await
        .expect("reads carry on");
    topology.primary().resume().expect("SIGCONT");
    eventually("the primary to come back", ROOMY, || async {
        herd.routes()
            .iter()
            .any(|r| &*r.name == "primary" && r.primary && r.health == HealthState::Up)
    })
    .await;
    herd.send(Write::new("SELECT 1").timeout(Duration::from_secs(5)))
        .await
        .expect("writes resume on the same primary (nothing else was accepted)");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn the_snapshot_reports_roles_positions_timelines_and_lag() {
    let topology = start(Topology::builder().standbys(1)).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    herd.send(Write::new("CREATE TABLE t (v int)"))
        .await
        .expect("create");
    herd.send(Write::new("INSERT INTO t VALUES (1)"))
        .await
        .expect("insert");
    eventually("both endpoints probed with positions", ROOMY, || async {
        herd.health().await.is_ok_and(|all| {
            all.iter()
                .all(|e| e.position.is_some() && e.timeline.is_some())
        })
    })
    .await;
    let health = herd.health().await.expect("snapshot");
    let primary = health
        .iter()
        .find(|e| &*e.name == "primary")
        .expect("primary");
    let standby = health
        .iter()
        .find(|e| &*e.name == "standby_1")
        .expect("standby");
    assert_eq!(primary.observed_role, Some(ObservedRole::Primary));
    assert!(primary.accepted_primary);
    assert_eq!(primary.timeline, Some(1));
    assert_eq!(standby.observed_role, Some(ObservedRole::Standby));
    assert!(!standby.accepted_primary);
    assert!(standby.rtt.is_some());
    assert!(standby.lag_bytes.is_some(), "a standby's lag is measured");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn probes_do_not_go_through_the_application_pool() {
    // A saturated pool is not a dead server: with every pooled connection busy, the endpoint
    // stays up.
    let topology = start(Topology::builder()).await;
    let mut settings = topology.settings();
    settings.pool.max_size = 2;
    let log = Log::<StateChanged>::default();
    let herd = Herd::builder(settings)
        .subscribe_state(log.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let herd = herd.clone();
            actix_rt::spawn(async move {
                herd.send(Write::new("SELECT pg_sleep(2)").timeout(Duration::from_secs(5)))
                    .await
            })
        })
        .collect();
    eventually("both connections to be busy", ROOMY, || async {
        herd.routes().iter().any(|r| r.outstanding == 2)
    })
    .await;
    // While both pooled connections sleep (two seconds, several probe intervals), a read
    // waits for the pool and times out, yet the endpoint is not declared down.
    let starved = herd
        .send(
            Read::new("SELECT 1")
                .target("primary")
                .timeout(Duration::from_millis(800)),
        )
        .await
        .expect_err("the pool is saturated");
    assert!(starved.is_timeout(), "{starved}");
    for task in busy {
        task.await.expect("task").expect("the slow writes finish");
    }
    assert!(
        !log.any(|e| e.to == HealthState::Down || e.to == HealthState::Suspect),
        "a saturated pool was taken for a dead server: {:?}",
        log.events()
    );
    assert_eq!(state(&herd, "primary"), Some(HealthState::Up));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_stalled_application_thread_is_not_taken_for_dead_servers() {
    let topology = start(Topology::builder().standbys(1)).await;
    let mut settings = topology.settings();
    settings.failover.mode = pgherd::settings::FailoverMode::Promote;
    let changes = Log::<StateChanged>::default();
    let failovers = Log::<pgherd::FailoverEvent>::default();
    let herd = Herd::builder(settings)
        .subscribe_state(changes.recipient())
        .subscribe_failover(failovers.recipient())
        .start()
        .expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    // Subscribers hear of the first primary asynchronously: wait for it before counting.
    eventually("the first primary to be reported", ROOMY, || async {
        !failovers.events().is_empty()
    })
    .await;
    let accepted = failovers.events().len();
    // The application's thread is saturated for three seconds: a hundred tasks burn the CPU in
    // 5 ms slices, so each task waits about half a second for its turn, longer than the probe
    // timeout (300 ms). Probes that ran on this thread would time out and the servers be taken
    // for dead.
    let until = Instant::now() + Duration::from_secs(3);
    let busy: Vec<_> = (0..100)
        .map(|_| {
            actix_rt::spawn(async move {
                while Instant::now() < until {
                    let slice = Instant::now() + Duration::from_millis(5);
                    while Instant::now() < slice {
                        std::hint::spin_loop();
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for task in busy {
        task.await.expect("busy task");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["primary", "standby_1"] {
        assert_eq!(state(&herd, name), Some(HealthState::Up), "{name}");
    }
    assert!(
        !changes.any(|c| c.to != HealthState::Up),
        "no endpoint was declared down: {:?}",
        changes.events()
    );
    assert_eq!(
        failovers.events().len(),
        accepted,
        "no failover: {:?}",
        failovers.events()
    );
    herd.send(Write::new("SELECT 1"))
        .await
        .expect("the primary takes writes");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_server_that_stays_down_is_probed_with_backoff_and_readmitted_when_back() {
    let topology = start(Topology::builder().standbys(1).proxied("standby_1")).await;
    let herd = Herd::start(topology.settings()).expect("start");
    herd.wait_ready(ROOMY).await.expect("ready");
    let proxy = topology.proxy("standby_1").expect("proxy");
    // Every connection is closed at once: probes fail fast, so only the wait between them
    // limits how often they connect.
    proxy.set_mode(FaultMode::Reset);
    eventually("standby_1 to be declared down", ROOMY, || async {
        state(&herd, "standby_1") == Some(HealthState::Down)
    })
    .await;
    let before = proxy.connections();
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let attempts = proxy.connections() - before;
    // Backing off from 50 ms up to the 250 ms interval: about 8 to 11 in two seconds. Probing
    // every 50 ms would make about 40.
    assert!(
        attempts <= 15,
        "{attempts} connection attempts to a down server in {window:?}: no backoff"
    );
    assert!(
        attempts >= 4,
        "{attempts} attempts: the server is still probed"
    );
    proxy.set_mode(FaultMode::Pass);
    let back = Instant::now();
    eventually("standby_1 to be up again", ROOMY, || async {
        state(&herd, "standby_1") == Some(HealthState::Up)
    })
    .await;
    eprintln!(
        "{attempts} probe connections in {window:?} while down; up again {:?} after the fault ended",
        back.elapsed()
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn standby_lag_is_measured_against_the_primary_not_a_replica() {
    // A logical replica (another system, its WAL far ahead of the primary's) whose name sorts
    // after the primary's: the standby's lag is still the primary's position less its own.
    let topology = start(Topology::builder().standbys(1).replica("reporting")).await;
    let reporting = topology.node("reporting");
    let config = reporting.config();
    let dbname = config.get_dbname().expect("a database");
    for _ in 0..3 {
        reporting
            .admin_execute(
                dbname,
                "CREATE TABLE IF NOT EXISTS pad (v int); INSERT INTO pad VALUES (1); \
                 SELECT pg_switch_wal()",
            )
            .await
            .expect("the replica's WAL moved on");
    }
    topology
        .standby(0)
        .wait_streaming_from(topology.primary())
        .await
        .expect("streaming");
    let health = pgherd::health::survey(&topology.settings(), Duration::from_secs(5))
        .await
        .expect("survey");
    let replica = health
        .iter()
        .find(|h| &*h.name == "reporting")
        .expect("the replica");
    let standby = health
        .iter()
        .find(|h| &*h.name == topology.standby(0).name())
        .expect("the standby");
    assert!(
        replica.position > standby.position,
        "the test needs the replica's WAL ahead: {health:?}"
    );
    assert!(
        standby.lag_bytes.is_some_and(|lag| lag < 1 << 20),
        "{health:?}"
    );
}
