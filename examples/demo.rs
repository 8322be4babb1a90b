//! The pgherd demo: a throwaway primary with two streaming standbys, a herd in front of them, and
//! a mixed workload; then each server is asked what it ran.
//!
//! `cargo run --example demo` finishes by itself in seconds and exits non-zero if reads did not
//! spread over both standbys or a write reached a standby.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use pgherd::{
    testkit::{Node, Topology},
    Batch, Herd, Intent, Params, Query, QueryResult, Read, Routable, Transact, Write,
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

#[actix::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let started = Instant::now();
    println!("starting a primary and two streaming standbys ...");
    let topology = Topology::builder()
        .standbys(2)
        .stat_statements(true)
        .start()
        .await?;
    for node in topology.nodes() {
        println!(
            "  {:<10} {:<8} 127.0.0.1:{}",
            node.name(),
            node.role(),
            node.port()
        );
    }

    let herd = Herd::start(topology.settings())?;
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
    for standby in topology.standbys() {
        let client = standby.connect().await?;
        while client
            .query_one("SELECT 1 FROM accounts LIMIT 1", &[])
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    println!("running {WORKERS} workers x {ROUNDS} messages through the herd ...");
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
    herd.shutdown().await;
    println!(
        "{}: reads went to the standbys only, writes to the primary only; demo took {} ms",
        if ok { "OK" } else { "UNEXPECTED" },
        started.elapsed().as_millis()
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
