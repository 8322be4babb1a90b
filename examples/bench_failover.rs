//! Failover under load, measured: the primary of a throwaway topology (two standbys, one of them
//! synchronous) is killed with SIGKILL while writers and readers run through the herd, in
//! `promote` mode with the default health settings, ten times.
//!
//! `cargo run --release --example bench_failover` prints, per run and as median/max: detection
//! (kill to the primary being declared down); time from the kill to the first acknowledged write
//! among those sent after the kill (so it can only have committed on the new primary); reads
//! failed; writes failed; writes reported commit-unknown and how many of them did commit; and
//! acknowledged writes lost (every acknowledged id is looked for on the new primary). It ends
//! with `result: first_write_median_ms=... first_write_max_ms=... acked_lost=...`.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    rc::Rc,
    time::{Duration, Instant, SystemTime},
};

use pgherd::{
    settings::FailoverMode, testkit::Topology, FailoverEvent, Herd, Read, Routable, Write,
};

const RUNS: usize = 10;
const WRITERS: i64 = 4;
const READERS: usize = 2;
const WARM_UP_WRITES: usize = 300;
const AFTER_WRITES: usize = 300;

/// Collects failover events.
#[derive(Default, Clone)]
struct Events(Rc<RefCell<Vec<FailoverEvent>>>);

struct Recorder(Events);

impl actix::Actor for Recorder {
    type Context = actix::Context<Self>;
}

impl actix::Handler<FailoverEvent> for Recorder {
    type Result = ();
    fn handle(&mut self, event: FailoverEvent, _: &mut Self::Context) {
        self.0 .0.borrow_mut().push(event);
    }
}

#[derive(Default)]
struct Tally {
    /// Acknowledged ids, with when each write was sent and when it was acknowledged.
    acked: Vec<(i64, Instant, Instant)>,
    /// Ids whose writes were reported commit-unknown.
    unknown: Vec<i64>,
    failed: usize,
    read_failures: usize,
}

struct Run {
    detection: Duration,
    first_write: Duration,
    reads_failed: usize,
    writes_failed: usize,
    unknown: usize,
    /// Commit-unknown writes found committed on the new primary.
    unknown_committed: usize,
    lost: usize,
}

async fn one_run() -> Result<Run, Box<dyn std::error::Error>> {
    let topology = Topology::builder()
        .standbys(2)
        .synchronous(1)
        .start()
        .await?;
    let mut settings = topology.settings();
    settings.failover.mode = FailoverMode::Promote;
    let events = Events::default();
    let recipient = actix::Actor::start(Recorder(events.clone())).recipient();
    let herd = Herd::builder(settings)
        .subscribe_failover(recipient)
        .start()?;
    herd.wait_ready(Duration::from_secs(10)).await?;
    herd.send(Write::new("CREATE TABLE ledger (id bigint PRIMARY KEY)"))
        .await?;

    let stop = Rc::new(Cell::new(false));
    let tally = Rc::new(RefCell::new(Tally::default()));
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (herd, stop, tally) = (herd.clone(), Rc::clone(&stop), Rc::clone(&tally));
        tasks.push(actix_rt::spawn(async move {
            let mut id = writer * 10_000_000;
            while !stop.get() {
                let sent = Instant::now();
                let result = herd
                    .send(
                        Write::new("INSERT INTO ledger (id) VALUES ($1)")
                            .bind(id)
                            .timeout(Duration::from_secs(5)),
                    )
                    .await;
                let mut tally = tally.borrow_mut();
                match result {
                    Ok(_) => tally.acked.push((id, sent, Instant::now())),
                    Err(error) if error.is_commit_unknown() => tally.unknown.push(id),
                    Err(_) => tally.failed += 1,
                }
                id += 1;
            }
        }));
    }
    for _ in 0..READERS {
        let (herd, stop, tally) = (herd.clone(), Rc::clone(&stop), Rc::clone(&tally));
        tasks.push(actix_rt::spawn(async move {
            while !stop.get() {
                let read = herd
                    .send(Read::new("SELECT count(*) FROM ledger").timeout(Duration::from_secs(2)))
                    .await;
                if read.is_err() {
                    tally.borrow_mut().read_failures += 1;
                }
            }
        }));
    }
    while tally.borrow().acked.len() < WARM_UP_WRITES {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_wall = SystemTime::now();
    let killed = Instant::now();
    topology.primary().kill()?;
    let acked_before = tally.borrow().acked.len();
    let deadline = killed + Duration::from_secs(30);
    while tally.borrow().acked.len() < acked_before + AFTER_WRITES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.set(true);
    for task in tasks {
        let _ = task.await;
    }

    let new_primary = herd
        .routes()
        .into_iter()
        .find(|r| r.primary)
        .map(|r| r.name.to_string())
        .ok_or("no primary was accepted")?;
    let client = topology.node(&new_primary).connect().await?;
    let present: BTreeSet<i64> = client
        .query("SELECT id FROM ledger", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let tally = tally.take();
    let lost = tally
        .acked
        .iter()
        .filter(|(id, _, _)| !present.contains(id))
        .count();
    let first_write = tally
        .acked
        .iter()
        .filter(|(_, sent, _)| *sent > killed)
        .map(|(_, _, acked)| *acked)
        .min()
        .map_or(Duration::MAX, |at| at - killed);
    let declared = events
        .0
        .borrow()
        .iter()
        .find_map(|event| match event {
            FailoverEvent::PrimaryLost { at, .. } => Some(*at),
            _ => None,
        })
        .ok_or("no PrimaryLost event")?;
    herd.shutdown().await;
    Ok(Run {
        detection: declared.duration_since(killed_wall).unwrap_or_default(),
        first_write,
        reads_failed: tally.read_failures,
        writes_failed: tally.failed,
        unknown: tally.unknown.len(),
        unknown_committed: tally
            .unknown
            .iter()
            .filter(|id| present.contains(id))
            .count(),
        lost,
    })
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "SIGKILL of the primary under load ({WRITERS} writers, {READERS} readers), promote mode, \
         2 standbys (1 synchronous), default health settings, {RUNS} runs"
    );
    println!(
        "{:>3} | {:>12} | {:>14} | {:>12} | {:>13} | {:>14} | {:>16} | {:>10}",
        "run",
        "detection ms",
        "first write ms",
        "reads failed",
        "writes failed",
        "commit-unknown",
        "of them committed",
        "acked lost"
    );
    let mut runs = Vec::with_capacity(RUNS);
    for number in 1..=RUNS {
        let run = one_run().await?;
        println!(
            "{:>3} | {:>12} | {:>14} | {:>12} | {:>13} | {:>14} | {:>16} | {:>10}",
            number,
            run.detection.as_millis(),
            run.first_write.as_millis(),
            run.reads_failed,
            run.writes_failed,
            run.unknown,
            run.unknown_committed,
            run.lost
        );
        runs.push(run);
    }
    let detection: Vec<Duration> = runs.iter().map(|r| r.detection).collect();
    let first: Vec<Duration> = runs.iter().map(|r| r.first_write).collect();
    let lost: usize = runs.iter().map(|r| r.lost).sum();
    println!(
        "detection median {} ms, max {} ms; first write median {} ms, max {} ms; reads failed {}, \
         writes failed {}, commit-unknown {} (of them committed {}), acknowledged writes lost {}",
        median(detection.clone()).as_millis(),
        detection
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_millis(),
        median(first.clone()).as_millis(),
        first.iter().max().copied().unwrap_or_default().as_millis(),
        runs.iter().map(|r| r.reads_failed).sum::<usize>(),
        runs.iter().map(|r| r.writes_failed).sum::<usize>(),
        runs.iter().map(|r| r.unknown).sum::<usize>(),
        runs.iter().map(|r| r.unknown_committed).sum::<usize>(),
        lost
    );
    println!(
        "result: first_write_median_ms={} first_write_max_ms={} acked_lost={}",
        median(first.clone()).as_millis(),
        first.iter().max().copied().unwrap_or_default().as_millis(),
        lost
    );
    Ok(())
}
