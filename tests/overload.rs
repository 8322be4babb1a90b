//! A burst far beyond the router's capacity is refused at once, and every accepted message still
//! completes.

mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use pgherd::{testkit::Topology, ErrorKind, Herd, Read, Routable};
use support::start;

const CAPACITY: usize = 8;
const BURST: usize = 400;

fn small_herd(topology: &Topology) -> Herd {
    let mut settings = topology.settings();
    settings.router.queue_capacity = CAPACITY;
    settings.pool.max_size = 4;
    Herd::start(settings).expect("start")
}

struct Outcome {
    ok: usize,
    overloaded: usize,
    slowest_refusal: Duration,
}

fn tally(results: Vec<(Result<(), pgherd::Error>, Duration)>) -> Outcome {
    let mut outcome = Outcome {
        ok: 0,
        overloaded: 0,
        slowest_refusal: Duration::ZERO,
    };
    for (result, took) in results {
        match result {
            Ok(()) => outcome.ok += 1,
            Err(error) if error.kind() == ErrorKind::Overloaded => {
                assert!(error.is_retryable());
                outcome.overloaded += 1;
                outcome.slowest_refusal = outcome.slowest_refusal.max(took);
            }
            Err(error) => panic!("an accepted message failed: {error}"),
        }
    }
    outcome
}

fn check(outcome: &Outcome) {
    assert_eq!(outcome.ok + outcome.overloaded, BURST);
    assert!(outcome.ok >= CAPACITY, "{} accepted", outcome.ok);
    assert!(
        outcome.overloaded >= BURST - 4 * CAPACITY,
        "only {} of {BURST} refused with a capacity of {CAPACITY}",
        outcome.overloaded
    );
    // Refused at once: not after waiting for the slow queries (200 ms each).
    assert!(
        outcome.slowest_refusal < Duration::from_millis(100),
        "a refusal took {:?}",
        outcome.slowest_refusal
    );
}

#[actix_rt::test]
async fn a_burst_through_the_handle_is_refused_quickly_and_accepted_work_completes() {
    let topology = start(Topology::builder()).await;
    let herd = small_herd(&topology);
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    let sends = (0..BURST).map(|_| {
        let herd = herd.clone();
        async move {
            let started = Instant::now();
            let result = herd
                .send(Read::new("SELECT pg_sleep(0.2)").timeout(Duration::from_secs(10)))
                .await
                .map(drop);
            (result, started.elapsed())
        }
    });
    let outcome = tally(join_all(sends).await);
    check(&outcome);
    assert_eq!(herd.routes()[0].outstanding, 0);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn a_burst_through_the_router_actor_is_refused_quickly_too() {
    let topology = start(Topology::builder()).await;
    let herd = small_herd(&topology);
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    let router = herd.router();
    let sends = (0..BURST).map(|_| {
        let router = router.clone();
        async move {
            let started = Instant::now();
            let result = router
                .send(Read::new("SELECT pg_sleep(0.2)").timeout(Duration::from_secs(10)))
                .await
                .expect("the router answers")
                .map(drop);
            (result, started.elapsed())
        }
    });
    let outcome = tally(join_all(sends).await);
    check(&outcome);
    herd.shutdown().await;
}
