//! The pgherd demo, in three acts, on a throwaway primary with two streaming standbys (one of them
//! synchronous), an independent `reporting` database kept equal by the replicator, and a herd in
//! front of them.
//!
//! 1. A mixed workload; then each server is asked what it ran: reads on the standbys, writes on
//!    the primary.
//! 2. A randomized write workload on three tables (inserts, updates, deletes, key changes,
//!    TRUNCATE, long and short transactions) while the replicator keeps `reporting` equal; the
//!    lag is shown as it goes, and the tables are compared at the end.
//! 3. The primary is SIGKILLed mid-workload. The herd (`failover.mode = "promote"`) promotes the
//!    most advanced standby and reports the failover; the old primary is restarted, comes back
//!    writable on its old timeline and is fenced; the workload goes on throughout.
//!
//! `cargo run --example demo` finishes by itself in seconds and exits non-zero if anything
//! unexpected happened: reads not spread over both standbys, a write on a standby, an
//! acknowledged write missing after the failover, a failed read or write, traffic reaching the
//! fenced old primary, or a replica table that differs from the primary's.

use std::{
    cell::{Cell, RefCell},
    collections::BTreeSet,
    process::ExitCode,
    rc::Rc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::future::join_all;
use pgherd::{
    settings::FailoverMode,
    testkit::{workload, Node, Topology},
    Batch, FailoverEvent, Herd, Intent, Params, Query, QueryResult, Read, Routable, Transact,
    Write,
};

const WORKERS: usize = 16;
const ROUNDS: usize = 60;

/// A typed read: how many orders a customer has.
struct OrdersOf {
    customer: i64,
}

impl Query for OrdersOf {
    type Output = i64;
    const INTENT: Intent = Intent::Read;

    fn sql(&self) -> &str {
        "SELECT count(*) FROM orders WHERE customer = $1"
    }
    fn params(&self) -> Params<'_> {
        vec![&self.customer]
    }
    fn output(result: QueryResult) -> Result<i64, pgherd::Error> {
        Ok(result.one::<(i64,)>()?.0)
    }
}

/// How many times `node` ran statements containing `text`, from `pg_stat_statements`.
async fn calls(node: &Node, text: &str) -> Result<i64, Box<dyn std::error::Error>> {
    let client = node.connect_admin().await?;
    let row = client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query LIKE '%' || $1 || '%'",
            &[&text],
        )
        .await?;
    Ok(row.get(0))
}

/// One worker's share of the workload: mostly reads, some writes, a batch and a transaction.
async fn worker(herd: Herd, worker: usize) -> Result<(usize, usize), pgherd::Error> {
    let (mut reads, mut writes) = (0, 0);
    let customer = i64::try_from(worker % 4).unwrap_or(0);
    for round in 0..ROUNDS {
        match round % 10 {
            0 | 5 => {
                herd.send(
                    Write::new("INSERT INTO orders (customer, amount) VALUES ($1, $2)")
                        .bind(customer)
                        .bind(i64::try_from(round).unwrap_or(0)),
                )
                .await?;
                writes += 1;
            }
            9 if round % 20 == 9 => {
                herd.send(
                    Batch::new()
                        .statement("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                        .statement("UPDATE accounts SET balance = balance + 1 WHERE id = 2"),
                )
                .await?;
                writes += 1;
            }
            9 => {
                let customer_copy = customer;
                herd.send(Transact::new(move |tx| {
                    Box::pin(async move {
                        let row = tx
                            .query_one(
                                "INSERT INTO orders (customer, amount) VALUES ($1, 0) RETURNING id",
                                &[&customer_copy],
                            )
                            .await?;
                        Ok(row.get::<_, i64>(0))
                    })
                }))
                .await?;
                writes += 1;
            }
            even if even % 2 == 0 => {
                herd.send(OrdersOf { customer }.routed()).await?;
                reads += 1;
            }
            _ => {
                herd.send(
                    Read::new("SELECT sum(amount) FROM orders").timeout(Duration::from_secs(2)),
                )
                .await?;
                reads += 1;
            }
        }
    }
    Ok((reads, writes))
}

/// Prints failover events as they arrive, timed from the kill, and keeps them.
struct Narrator {
    killed: Rc<Cell<Option<SystemTime>>>,
    events: Rc<RefCell<Vec<FailoverEvent>>>,
}

impl actix::Actor for Narrator {
    type Context = actix::Context<Self>;
}

impl actix::Handler<FailoverEvent> for Narrator {
    type Result = ();

    fn handle(&mut self, event: FailoverEvent, _: &mut Self::Context) {
        let since = |at: SystemTime| match self.killed.get() {
            Some(killed) => format!(
                "+{:>4} ms",
                at.duration_since(killed).unwrap_or_default().as_millis()
            ),
            None => "   start".to_owned(),
        };
        let line = match &event {
            FailoverEvent::PrimaryLost {
                endpoint,
                reason,
                at,
                ..
            } => format!("{} primary lost: {endpoint} ({reason})", since(*at)),
            FailoverEvent::Promoting {
                endpoint,
                reason,
                at,
                ..
            } => format!("{} promoting {endpoint} ({reason})", since(*at)),
            FailoverEvent::PrimaryAccepted { endpoint, at, .. } => {
                format!("{} writes go to {endpoint}", since(*at))
            }
            FailoverEvent::Fenced {
                endpoint,
                reason,
                at,
                ..
            } => format!("{} fenced {endpoint} ({reason})", since(*at)),
            FailoverEvent::Unfenced { endpoint, at, .. } => {
                format!("{} unfenced {endpoint}", since(*at))
            }
            FailoverEvent::Warning { message, at, .. } => {
                format!("{} warning: {message}", since(*at))
            }
            other => format!("{other:?}"),
        };
        println!("  event {line}");
        self.events.borrow_mut().push(event);
    }
}

/// What the workload of the third act saw.
#[derive(Default)]
struct Outcomes {
    acked: Vec<i64>,
    commit_unknown: Vec<i64>,
    writes_failed: usize,
    reads: usize,
    reads_failed: usize,
}

/// Runs writers and readers until `stop` is set; every write inserts a unique id.
fn start_workload(
    herd: &Herd,
    stop: &Rc<Cell<bool>>,
    outcomes: &Rc<RefCell<Outcomes>>,
) -> Vec<actix_rt::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for writer in 0..4_i64 {
        let (herd, stop, outcomes) = (herd.clone(), Rc::clone(stop), Rc::clone(outcomes));
        tasks.push(actix_rt::spawn(async move {
            let mut id = writer * 1_000_000;
            while !stop.get() {
                let result = herd
                    .send(
                        Write::new("INSERT INTO ledger (id) VALUES ($1)")
                            .bind(id)
                            .timeout(Duration::from_secs(5)),
                    )
                    .await;
                let mut outcomes = outcomes.borrow_mut();
                match result {
                    Ok(_) => outcomes.acked.push(id),
                    Err(error) if error.is_commit_unknown() => {
                        println!("  write {id}: {error}");
                        outcomes.commit_unknown.push(id);
                    }
                    Err(error) => {
                        println!("  write {id} FAILED: {error}");
                        outcomes.writes_failed += 1;
                    }
                }
                id += 1;
            }
        }));
    }
    for _ in 0..2 {
        let (herd, stop, outcomes) = (herd.clone(), Rc::clone(stop), Rc::clone(outcomes));
        tasks.push(actix_rt::spawn(async move {
            while !stop.get() {
                let result = herd
                    .send(Read::new("SELECT count(*) FROM ledger").timeout(Duration::from_secs(2)))
                    .await;
                let mut outcomes = outcomes.borrow_mut();
                outcomes.reads += 1;
                if let Err(error) = result {
                    println!("  read FAILED: {error}");
                    outcomes.reads_failed += 1;
                }
            }
        }));
    }
    tasks
}

/// Waits until `more` writes beyond those acknowledged now are acknowledged (at most `limit`).
async fn acknowledged(outcomes: &Rc<RefCell<Outcomes>>, more: usize, limit: Duration) {
    let target = outcomes.borrow().acked.len() + more;
    let deadline = Instant::now() + limit;
    while outcomes.borrow().acked.len() < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `found` holds for one of the recorded events (at most `limit`).
async fn event(
    events: &Rc<RefCell<Vec<FailoverEvent>>>,
    limit: Duration,
    found: impl Fn(&FailoverEvent) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if events.borrow().iter().any(&found) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every standby has replayed the creation of `table`.
async fn standbys_have(topology: &Topology, table: &str) -> Result<(), Box<dyn std::error::Error>> {
    for standby in topology.standbys() {
        let client = standby.connect().await?;
        let probe = format!("SELECT 1 FROM {table} LIMIT 1");
        while client.query_opt(&probe, &[]).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// The second act: a randomized write workload straight on the primary while the replicator
/// keeps `reporting` equal; the lag is sampled as it goes. True when the tables end up equal.
async fn replication_act(
    topology: &Topology,
    herd: &Herd,
) -> Result<bool, Box<dyn std::error::Error>> {
    println!(
        "act 2: a randomized write workload on 3 tables; the replicator keeps `reporting` equal"
    );
    let config = topology.primary().config();
    let spec = workload::WorkloadSpec::new(2026);
    let started = Instant::now();
    let writes = actix_rt::spawn(async move { workload::run(&config, &spec).await });
    let mut samples = 0;
    while !writes.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(status) = herd.replication().first() {
            samples += 1;
            if samples <= 8 {
                println!(
                    "  t={:>5} ms  {:?}: {} batches, {} rows applied, lag {} ms / {} B",
                    started.elapsed().as_millis(),
                    status.state,
                    status.batches,
                    status.rows,
                    status.lag.map_or(0, |lag| lag.as_millis()),
                    status.lag_bytes.unwrap_or(0),
                );
            }
        }
    }
    let report = writes.await??;
    let committed_at = Instant::now();
    println!(
        "  the workload committed {} transactions ({} rolled back, {} truncates) in {} ms",
        report.committed,
        report.rolled_back,
        report.truncates,
        started.elapsed().as_millis()
    );
    let primary = topology.primary().connect().await?;
    let reporting = topology.node("reporting").connect().await?;
    loop {
        match workload::compare(&primary, &reporting, workload::TABLES).await? {
            Ok(()) => break,
            Err(difference) if committed_at.elapsed() > Duration::from_secs(20) => {
                println!("  the replica still differs after 20 s:\n{difference}");
                return Ok(false);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    println!(
        "  equal {} ms after the last commit:",
        committed_at.elapsed().as_millis()
    );
    for table in workload::TABLES {
        let digest = workload::digest(&reporting, table).await?;
        println!(
            "    {:<20} {:>5} rows  md5 {}",
            digest.table, digest.rows, digest.md5
        );
    }
    Ok(true)
}

/// The third act: the primary dies mid-workload, a standby is promoted, the old primary comes
/// back and is fenced. Returns whether everything went as expected.
async fn failover_act(
    topology: &Topology,
    herd: &Herd,
    killed: &Rc<Cell<Option<SystemTime>>>,
    events: &Rc<RefCell<Vec<FailoverEvent>>>,
) -> Result<bool, Box<dyn std::error::Error>> {
    let limit = Duration::from_secs(15);
    herd.send(Write::new("CREATE TABLE ledger (id bigint PRIMARY KEY)"))
        .await?;
    standbys_have(topology, "ledger").await?;
    let stop = Rc::new(Cell::new(false));
    let outcomes = Rc::new(RefCell::new(Outcomes::default()));
    println!("act 3: 4 writers and 2 readers; the primary is killed mid-workload");
    let tasks = start_workload(herd, &stop, &outcomes);
    acknowledged(&outcomes, 200, limit).await;

    println!(
        "  SIGKILL of the primary after {} acknowledged writes",
        outcomes.borrow().acked.len()
    );
    killed.set(Some(SystemTime::now()));
    topology.primary().kill()?;
    let mut ok = event(events, limit, |e| {
        matches!(
            e,
            FailoverEvent::PrimaryAccepted {
                report: Some(_),
                ..
            }
        )
    })
    .await;
    acknowledged(&outcomes, 200, limit).await;
    let report = events.borrow().iter().rev().find_map(|e| match e {
        FailoverEvent::PrimaryAccepted {
            report: Some(report),
            ..
        } => Some(report.clone()),
        _ => None,
    });
    if let Some(report) = &report {
        let since = |at: SystemTime| {
            at.duration_since(report.first_failure)
                .unwrap_or_default()
                .as_millis()
        };
        println!(
            "  failover report: {} -> {} ({}); declared down {} ms after the first failed probe, \
             accepted after {} ms; old primary last at {}, new primary started at {}, possible \
             loss {} bytes",
            report.old_primary,
            report.new_primary,
            report.reason,
            since(report.declared_down),
            since(report.accepted),
            report
                .old_position
                .map_or_else(|| "?".to_owned(), |p| p.to_string()),
            report
                .new_position
                .map_or_else(|| "?".to_owned(), |p| p.to_string()),
            report
                .possible_loss_bytes
                .map_or_else(|| "unknown".to_owned(), |b| b.to_string()),
        );
    }

    println!("  restarting the old primary: it comes back writable, on its old timeline");
    topology.primary().start().await?;
    let back = Instant::now() + limit;
    let fenced_and_up = || {
        herd.routes()
            .iter()
            .any(|r| &*r.name == "primary" && r.fenced && r.health == pgherd::HealthState::Up)
    };
    while !fenced_and_up() && Instant::now() < back {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ok &= fenced_and_up();
    println!("  the old primary is up again, and fenced: the workload goes on without it");
    acknowledged(&outcomes, 200, limit).await;
    stop.set(true);
    for task in tasks {
        task.await?;
    }
    let refused = herd
        .send(Read::new("SELECT 1").target("primary"))
        .await
        .err();
    println!(
        "  a read sent to it by name: {}",
        refused
            .as_ref()
            .map_or_else(|| "SERVED (unexpected)".to_owned(), ToString::to_string)
    );
    ok &= refused.is_some();

    println!(
        "  {:<10} {:<10} {:<7} {:>6} {:>17}",
        "endpoint", "health", "primary", "fenced", "ledger statements"
    );
    for route in herd.routes() {
        let node = topology.node(&route.name);
        let statements = if node.is_running() {
            calls(node, "ledger").await?.to_string()
        } else {
            "-".to_owned()
        };
        println!(
            "  {:<10} {:<10} {:<7} {:>6} {:>17}",
            route.name, route.health, route.primary, route.fenced, statements
        );
    }
    // pg_stat_statements starts empty after a crash: whatever the old primary shows ran after
    // its restart.
    ok &= calls(topology.primary(), "ledger").await? == 0;

    let new_primary = report.map_or_else(String::new, |r| r.new_primary.to_string());
    ok &= !new_primary.is_empty() && new_primary != "primary";
    let present: BTreeSet<i64> = match topology.try_node(&new_primary) {
        Some(node) => node
            .connect()
            .await?
            .query("SELECT id FROM ledger", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect(),
        None => BTreeSet::new(),
    };
    let outcomes = outcomes.borrow();
    let lost = outcomes
        .acked
        .iter()
        .filter(|id| !present.contains(id))
        .count();
    let unknown_committed = outcomes
        .commit_unknown
        .iter()
        .filter(|id| present.contains(id))
        .count();
    println!(
        "  {} writes acknowledged, {} of them missing on {new_primary}; {} commit-unknown ({} of \
         them committed); {} writes failed; {} reads, {} failed",
        outcomes.acked.len(),
        lost,
        outcomes.commit_unknown.len(),
        unknown_committed,
        outcomes.writes_failed,
        outcomes.reads,
        outcomes.reads_failed
    );
    ok &= lost == 0 && outcomes.writes_failed == 0 && outcomes.reads_failed == 0;
    Ok(ok)
}

#[actix::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    // `RUST_LOG=pgherd=debug cargo run --example demo` shows what the herd does.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let started = Instant::now();
    println!(
        "starting a primary, two streaming standbys (one synchronous) and a reporting replica ..."
    );
    let topology = Topology::builder()
        .standbys(2)
        .synchronous(1)
        .replica("reporting")
        .stat_statements(true)
        .server_setting("deadlock_timeout", "'50ms'")
        .start()
        .await?;
    for node in [topology.primary(), topology.node("reporting")] {
        workload::create_schema(&node.connect().await?).await?;
    }
    for node in topology.nodes() {
        println!(
            "  {:<10} {:<8} 127.0.0.1:{}",
            node.name(),
            node.role(),
            node.port()
        );
    }

    let mut settings = topology.settings();
    settings.failover.mode = FailoverMode::Promote;
    settings.replicator.tables = workload::TABLES.iter().map(|t| t.to_string()).collect();
    let killed = Rc::new(Cell::new(None));
    let events = Rc::new(RefCell::new(Vec::new()));
    let narrator = actix::Actor::start(Narrator {
        killed: Rc::clone(&killed),
        events: Rc::clone(&events),
    });
    let herd = Herd::builder(settings)
        .subscribe_failover(narrator.recipient())
        .start()?;
    herd.wait_ready(Duration::from_secs(10)).await?;
    herd.send(Write::new(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer bigint NOT NULL, amount bigint NOT NULL)",
    ))
    .await?;
    herd.send(
        Batch::new()
            .statement("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint)")
            .statement("INSERT INTO accounts VALUES (1, 1000), (2, 1000)"),
    )
    .await?;
    // Let the standbys replay the tables before reading from them.
    standbys_have(&topology, "accounts").await?;

    println!("act 1: {WORKERS} workers x {ROUNDS} messages through the herd ...");
    let workload = Instant::now();
    let results = join_all((0..WORKERS).map(|w| worker(herd.clone(), w))).await;
    let mut reads = 0;
    let mut writes = 0;
    for result in results {
        let (r, w) = result?;
        reads += r;
        writes += w;
    }
    println!(
        "  {reads} reads and {writes} writes answered in {} ms",
        workload.elapsed().as_millis()
    );

    println!("what each server says it ran (pg_stat_statements):");
    println!(
        "  {:<10} {:<8} {:>6} {:>7} {:>8} {:>12}",
        "endpoint", "role", "reads", "inserts", "updates", "transactions"
    );
    let mut ok = true;
    let mut standby_reads = Vec::new();
    for node in topology.nodes() {
        let node_reads = calls(node, "FROM orders WHERE customer").await?
            + calls(node, "SELECT sum(amount) FROM orders").await?;
        let inserts = calls(node, "INSERT INTO orders").await?;
        let updates = calls(node, "UPDATE accounts").await?;
        let transactions = calls(node, "RETURNING id").await?;
        println!(
            "  {:<10} {:<8} {:>6} {:>7} {:>8} {:>12}",
            node.name(),
            node.role(),
            node_reads,
            inserts,
            updates,
            transactions
        );
        if node.role() == pgherd::Role::Standby {
            standby_reads.push(node_reads);
            ok &= inserts + updates == 0;
        }
    }
    let primary_inserts = calls(topology.primary(), "INSERT INTO orders").await?;
    ok &= standby_reads.len() == 2 && standby_reads.iter().all(|&r| r > 0);
    ok &= standby_reads.iter().sum::<i64>() == i64::try_from(reads).unwrap_or(-1);
    ok &= primary_inserts > 0;

    let rows = herd
        .send(Read::new("SELECT sum(balance)::bigint FROM accounts").target("primary"))
        .await?;
    println!(
        "  accounts still hold {} in total (transfers are atomic batches)",
        rows[0].get::<_, i64>(0)
    );
    println!(
        "{}: reads went to the standbys only, writes to the primary only",
        if ok { "OK" } else { "UNEXPECTED" },
    );

    let replication_ok = replication_act(&topology, &herd).await?;
    println!(
        "{}: the reporting replica equals the primary, table by table",
        if replication_ok { "OK" } else { "UNEXPECTED" },
    );
    ok &= replication_ok;

    let failover_ok = failover_act(&topology, &herd, &killed, &events).await?;
    herd.shutdown().await;
    println!(
        "{}: the primary was replaced with no acknowledged write lost and the old one fenced",
        if failover_ok { "OK" } else { "UNEXPECTED" },
    );
    ok &= failover_ok;
    println!("demo took {} ms", started.elapsed().as_millis());
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
