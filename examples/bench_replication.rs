//! pgherd's row replicator against PostgreSQL's own logical replication (publication and
//! subscription), on the same machine, in the same run.
//!
//! `cargo run --release --example bench_replication` starts one throwaway topology with
//! `wal_level = logical` everywhere: a primary and three independent servers with role `replica`
//! (one target for `trigger` mode, one for `logical` mode, one native subscriber). Only one
//! replication path runs at a time; each works on tables of its own.
//!
//! - (a) Bulk: from the commit of a single-statement 200,000-row INSERT (then UPDATE) on the
//!   primary until the replica holds the result (polled every 5 ms: a probe of the last row, then
//!   a full count), median of 3, per path: pgherd `trigger`, pgherd `logical`, native
//!   publication/subscription. Ratios are `native_ms / mode_ms` (>= 1.00: pgherd at least as
//!   fast). Each replica's table is checked against the primary's (count and md5) at the end.
//! - (b) Lag under load: a writer commits single-row transactions at 1,000 per second for 20 s
//!   while the replica is polled every 2 ms for `max(id)`; lag is when an id is first seen minus
//!   when its commit returned (p50, p99, max), for `trigger` mode (with `notify`) and `logical`
//!   mode.
//! - (c) Capture overhead: a 200,000-row INSERT and UPDATE, and 5,000 single-row INSERT
//!   transactions, on a table with pgherd's capture triggers against the same table without.
//!
//! Load and checks run on threads of their own, apart from the herd's (actix) thread. It ends
//! with `result: trigger_vs_native=... logical_vs_native=... lag_p99_ms=...
//! trigger_overhead_bulk=...` (`lag_p99_ms`: the larger p99 of the two modes in (b)).
//!
//! While investigating: `BENCH_ROWS` (default 200000), `BENCH_SECONDS` (default 20) and
//! `BENCH_REPEATS` (default 3; section (c) runs two more) shrink a run; `BENCH_SECTIONS=c` runs only some sections (default
//! `abc`; the `result:` line needs all three); `BENCH_DIAGNOSE=1` loads `pg_stat_statements` and
//! prints, per path of (a), the statements the primary and the replica spent the most time on.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use pgherd::{
    settings::{CaptureMode, ReplicatorSettings},
    testkit::{Node, Topology},
    Herd, ReplicationState,
};
use tokio_postgres::{Client, Config, NoTls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Outcome<T> = Result<T, BoxError>;

/// How long a replica may take to reflect a change before the benchmark gives up.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
const BULK_POLL: Duration = Duration::from_millis(5);
const LAG_POLL: Duration = Duration::from_millis(2);
/// Single-row transactions per second the writer of (b) aims at.
const WRITE_RATE: u32 = 1_000;
/// Single-row INSERT transactions per run in (c).
const SINGLE_ROW_TRANSACTIONS: i64 = 5_000;

const TRIGGER_TARGET: &str = "replica_trigger";
const LOGICAL_TARGET: &str = "replica_logical";
const SUBSCRIBER: &str = "subscriber";
const PUBLICATION: &str = "bench_pub";
const SUBSCRIPTION: &str = "bench_sub";

const BULK_TABLE: &str = "(id bigint PRIMARY KEY, v int, pad text)";
const LAG_TABLE: &str = "(id bigint PRIMARY KEY, at timestamptz)";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .filter(|&value| value > 0)
        .unwrap_or(default)
}

/// The three replication paths of (a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Native,
    Trigger,
    Logical,
}

impl Path {
    const ALL: [Path; 3] = [Path::Native, Path::Trigger, Path::Logical];

    fn name(self) -> &'static str {
        match self {
            Path::Native => "native",
            Path::Trigger => "trigger",
            Path::Logical => "logical",
        }
    }

    fn target(self) -> &'static str {
        match self {
            Path::Native => SUBSCRIBER,
            Path::Trigger => TRIGGER_TARGET,
            Path::Logical => LOGICAL_TARGET,
        }
    }

    fn mode(self) -> Option<CaptureMode> {
        match self {
            Path::Native => None,
            Path::Trigger => Some(CaptureMode::Trigger),
            Path::Logical => Some(CaptureMode::Logical),
        }
    }

    /// The bulk table of this path (its own schema, so paths never share a table).
    fn table(self) -> String {
        format!("bulk_{}.bench_rows", self.name())
    }
}

/// A running replication path.
enum Running {
    Herd { herd: Herd, schema: String },
    Subscription,
}

/// Runs `make()` to completion on a thread of its own with its own runtime, so that load and
/// checks do not share (or slow) the herd's thread.
async fn off_thread<F, Fut, T>(make: F) -> Outcome<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Outcome<T>>,
    T: Send + 'static,
{
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(BoxError::from)
            .and_then(|runtime| runtime.block_on(make()));
        let _ = sender.send(outcome);
    });
    receiver.await.map_err(|_| "a benchmark thread panicked")?
}

async fn connect(config: &Config) -> Outcome<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The superuser, on the database of the node's login (where the tables are).
fn admin_config(node: &Node) -> Config {
    let mut config = node.admin_config();
    config.dbname(&node.login().dbname);
    config
}

fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn conninfo_value(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Polls `probe` (a cheap boolean query) until it is true, then confirms with `full` (polled
/// from then on until it is true too). Returns the time from `since` to convergence.
async fn converge(
    client: &Client,
    since: Instant,
    probe: &str,
    full: &str,
    what: &str,
) -> Outcome<Duration> {
    let probe = client.prepare(probe).await?;
    let full = client.prepare(full).await?;
    let mut confirming = false;
    loop {
        let statement = if confirming { &full } else { &probe };
        let true_now: bool = client.query_one(statement, &[]).await?.get(0);
        if true_now {
            let at = Instant::now();
            if confirming || client.query_one(&full, &[]).await?.get::<_, bool>(0) {
                return Ok(at - since);
            }
            confirming = true;
        }
        if since.elapsed() > CONVERGE_TIMEOUT {
            return Err(format!(
                "{what} did not converge within {} s",
                CONVERGE_TIMEOUT.as_secs()
            )
            .into());
        }
        tokio::time::sleep(BULK_POLL).await;
    }
}

/// Creates `schema.table` on the primary and on `target`, with autovacuum off on both (it
/// would run at random moments of the measurements).
async fn create_table(
    topology: &Topology,
    target: &str,
    table: &str,
    definition: &str,
) -> Outcome<()> {
    let schema = table.split('.').next().unwrap_or("public");
    for node in [topology.primary(), topology.node(target)] {
        connect(&node.config())
            .await?
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE {table} {definition} WITH (autovacuum_enabled = false);"
            ))
            .await?;
    }
    Ok(())
}

/// Starts a herd replicating `table` to `target` only, with its own replicator schema, and
/// waits until that target streams.
async fn start_herd(
    topology: &Topology,
    mode: CaptureMode,
    target: &str,
    table: &str,
    schema: &str,
) -> Outcome<Herd> {
    let mut settings = topology.settings();
    let primary = topology.primary().name().to_owned();
    settings
        .endpoints
        .retain(|name, _| *name == primary || name == target);
    settings.replicator.mode = mode;
    settings.replicator.tables = vec![table.to_owned()];
    settings.replicator.targets = vec![target.to_owned()];
    settings.replicator.schema = schema.to_owned();
    let herd = Herd::start(settings)?;
    herd.wait_ready(Duration::from_secs(30)).await?;
    let started = Instant::now();
    loop {
        let status = herd.replication();
        if status
            .iter()
            .any(|s| s.state == ReplicationState::Streaming)
        {
            return Ok(herd);
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            herd.shutdown().await;
            return Err(format!(
                "pgherd's {} replicator to `{target}` did not start streaming within {} s: \
                 {status:?}",
                mode.as_str(),
                CONVERGE_TIMEOUT.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `table` on the primary and subscribes `subscriber` to it (no initial copy), as the
/// superuser, and waits until the apply worker runs.
async fn start_subscription(topology: &Topology, subscriber: &str, table: &str) -> Outcome<()> {
    let primary = topology.primary();
    connect(&admin_config(primary))
        .await?
        .batch_execute(&format!(
            "CREATE PUBLICATION {PUBLICATION} FOR TABLE {table}"
        ))
        .await?;
    let admin = primary.admin_config();
    let password = String::from_utf8_lossy(admin.get_password().unwrap_or_default());
    let conninfo = format!(
        "host={} port={} dbname={} user={} password={}",
        conninfo_value(primary.host()),
        primary.port(),
        conninfo_value(&primary.login().dbname),
        conninfo_value(admin.get_user().unwrap_or_default()),
        conninfo_value(&password),
    );
    let client = connect(&admin_config(topology.node(subscriber))).await?;
    client
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {SUBSCRIPTION} CONNECTION {} PUBLICATION {PUBLICATION} \
             WITH (copy_data = false)",
            sql_literal(&conninfo)
        ))
        .await?;
    let started = Instant::now();
    loop {
        let running = client
            .query_opt(
                "SELECT 1 FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL \
                 AND pid IS NOT NULL",
                &[&SUBSCRIPTION],
            )
            .await?
            .is_some();
        if running {
            return Ok(());
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            return Err(format!(
                "the subscription on `{subscriber}` has no apply worker after {} s",
                CONVERGE_TIMEOUT.as_secs()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the replication of `table` to `target` along `path`.
async fn start_path(
    topology: &Topology,
    path: Path,
    target: &str,
    table: &str,
    schema: &str,
) -> Outcome<Running> {
    let running = match path.mode() {
        None => {
            start_subscription(topology, target, table).await?;
            Running::Subscription
        }
        Some(mode) => Running::Herd {
            herd: start_herd(topology, mode, target, table, schema).await?,
            schema: schema.to_owned(),
        },
    };
    // A row must arrive (and its delete after it) before anything is measured.
    let primary = connect(&topology.primary().config()).await?;
    let replica = connect(&topology.node(target).config()).await?;
    primary
        .batch_execute(&format!("INSERT INTO {table} (id) VALUES (0)"))
        .await?;
    let what = format!("the first row on `{target}` ({})", path.name());
    converge(
        &replica,
        Instant::now(),
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE id = 0)"),
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE id = 0)"),
        &what,
    )
    .await?;
    primary
        .batch_execute(&format!("DELETE FROM {table} WHERE id = 0"))
        .await?;
    converge(
        &replica,
        Instant::now(),
        &format!("SELECT NOT EXISTS (SELECT 1 FROM {table} WHERE id = 0)"),
        &format!("SELECT NOT EXISTS (SELECT 1 FROM {table} WHERE id = 0)"),
        &what,
    )
    .await?;
    Ok(running)
}

/// Stops a path and removes what would keep working or keep WAL after it: the subscription and
/// its slot, the publication, the herd, a `logical` mode slot.
async fn stop_path(topology: &Topology, running: Running, target: &str) -> Outcome<()> {
    let primary = connect(&admin_config(topology.primary())).await?;
    let replica = connect(&admin_config(topology.node(target))).await?;
    match running {
        Running::Subscription => {
            replica
                .batch_execute(&format!("DROP SUBSCRIPTION {SUBSCRIPTION}"))
                .await?;
            primary
                .batch_execute(&format!("DROP PUBLICATION {PUBLICATION}"))
                .await?;
        }
        Running::Herd { herd, schema } => {
            herd.shutdown().await;
            drop(herd);
            // The replicator holds an advisory lock on its target while it runs.
            let started = Instant::now();
            loop {
                let locks: i64 = replica
                    .query_one(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                        &[],
                    )
                    .await?
                    .get(0);
                primary
                    .query(
                        "SELECT pg_drop_replication_slot(slot_name) \
                         FROM pg_replication_slots WHERE NOT active AND slot_name LIKE $1",
                        &[&format!("{schema}\\_%")],
                    )
                    .await?;
                let left: i64 = primary
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1",
                        &[&format!("{schema}\\_%")],
                    )
                    .await?
                    .get(0);
                if locks == 0 && left == 0 {
                    break;
                }
                if started.elapsed() > Duration::from_secs(15) {
                    return Err(format!(
                        "the herd replicating to `{target}` did not let go of it after shutdown \
                         ({locks} advisory lock(s), {left} slot(s) left)"
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Ok(())
}

/// What a node's connection parameters are, for a measurement thread.
#[derive(Clone)]
struct Endpoints {
    primary: Config,
    primary_admin: Config,
    replica: Config,
    replica_admin: Config,
    /// The postmasters of the primary and the replica, for their CPU use.
    primary_pid: Option<u32>,
    replica_pid: Option<u32>,
}

impl Endpoints {
    fn of(topology: &Topology, target: &str) -> Endpoints {
        Endpoints {
            primary: topology.primary().config(),
            primary_admin: admin_config(topology.primary()),
            replica: topology.node(target).config(),
            replica_admin: admin_config(topology.node(target)),
            primary_pid: topology.primary().pid(),
            replica_pid: topology.node(target).pid(),
        }
    }
}

/// CPU time (user + system) of process `pid` and, with `children`, of its child processes
/// (a postmaster's backends and workers), from `/proc`. Processes that ended are not counted.
fn cpu_time(pid: u32, children: bool) -> Duration {
    // Linux reports these times in USER_HZ, which is 100 on every architecture it runs on.
    const TICKS_PER_SECOND: u64 = 100;
    let ticks = |stat: &str| -> Option<(u32, u64)> {
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        let parent = fields.get(1)?.parse().ok()?;
        let user: u64 = fields.get(11)?.parse().ok()?;
        let system: u64 = fields.get(12)?.parse().ok()?;
        Some((parent, user + system))
    };
    let mut total = 0;
    let entries: Vec<u32> = if children {
        std::fs::read_dir("/proc")
            .map(|dir| {
                dir.flatten()
                    .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        vec![pid]
    };
    for process in entries {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{process}/stat")) else {
            continue;
        };
        if let Some((parent, used)) = ticks(&stat) {
            if process == pid || (children && parent == pid) {
                total += used;
            }
        }
    }
    Duration::from_millis(total * 1000 / TICKS_PER_SECOND)
}

/// CPU used by the primary's server processes, the replica's, and this process (the herd's
/// replicator, and the probes).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    primary: Duration,
    replica: Duration,
    bench: Duration,
}

impl Cpu {
    fn now(endpoints: &Endpoints) -> Cpu {
        let server = |pid: Option<u32>| pid.map_or(Duration::ZERO, |pid| cpu_time(pid, true));
        Cpu {
            primary: server(endpoints.primary_pid),
            replica: server(endpoints.replica_pid),
            bench: cpu_time(std::process::id(), false),
        }
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            primary: self.primary.saturating_sub(earlier.primary),
            replica: self.replica.saturating_sub(earlier.replica),
            bench: self.bench.saturating_sub(earlier.bench),
        }
    }

    fn add(self, other: Cpu) -> Cpu {
        Cpu {
            primary: self.primary + other.primary,
            replica: self.replica + other.replica,
            bench: self.bench + other.bench,
        }
    }
}

/// One bulk round of (a).
#[derive(Debug, Clone, Copy)]
struct BulkRound {
    insert: Duration,
    update: Duration,
    insert_statement: Duration,
    update_statement: Duration,
    /// CPU used from each commit until the replica converged (INSERT and UPDATE together).
    cpu: Cpu,
}

async fn bulk_round(
    endpoints: Endpoints,
    table: String,
    rows: i64,
    what: String,
) -> Outcome<BulkRound> {
    let primary = connect(&endpoints.primary).await?;
    let primary_admin = connect(&endpoints.primary_admin).await?;
    let replica = connect(&endpoints.replica).await?;
    let replica_admin = connect(&endpoints.replica_admin).await?;
    let checkpoint = || async {
        primary_admin.batch_execute("CHECKPOINT").await?;
        replica_admin.batch_execute("CHECKPOINT").await?;
        Ok::<_, BoxError>(())
    };

    primary.batch_execute(&format!("TRUNCATE {table}")).await?;
    let empty = format!("SELECT NOT EXISTS (SELECT 1 FROM {table})");
    converge(
        &replica,
        Instant::now(),
        &empty,
        &empty,
        &format!("{what}: TRUNCATE"),
    )
    .await?;

    checkpoint().await?;
    let begun = Instant::now();
    primary
        .batch_execute(&format!(
            "INSERT INTO {table} SELECT g, g, md5(g::text) FROM generate_series(1, {rows}) g"
        ))
        .await?;
    let committed = Instant::now();
    let cpu_before = Cpu::now(&endpoints);
    let insert = converge(
        &replica,
        committed,
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE id = {rows})"),
        &format!("SELECT count(*) = {rows} FROM {table}"),
        &format!("{what}: {rows}-row INSERT"),
    )
    .await?;
    let insert_statement = committed - begun;
    let insert_cpu = Cpu::now(&endpoints).since(cpu_before);

    checkpoint().await?;
    let begun = Instant::now();
    primary
        .batch_execute(&format!("UPDATE {table} SET v = -id"))
        .await?;
    let committed = Instant::now();
    let cpu_before = Cpu::now(&endpoints);
    let update = converge(
        &replica,
        committed,
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE id = {rows} AND v = -id)"),
        &format!("SELECT count(*) = {rows} FROM {table} WHERE v = -id"),
        &format!("{what}: {rows}-row UPDATE"),
    )
    .await?;
    let update_cpu = Cpu::now(&endpoints).since(cpu_before);
    Ok(BulkRound {
        insert,
        update,
        insert_statement,
        update_statement: committed - begun,
        cpu: insert_cpu.add(update_cpu),
    })
}

/// Row count and md5 of a table's rows in key order.
async fn digest(config: &Config, table: &str) -> Outcome<(i64, String)> {
    let row = connect(config)
        .await?
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '' ORDER BY id)), '') \
                 FROM {table} t"
            ),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Medians of (a) for one path.
#[derive(Debug, Clone)]
struct BulkResult {
    path: Path,
    rounds: Vec<BulkRound>,
}

impl BulkResult {
    fn insert(&self) -> Duration {
        median(&self.rounds.iter().map(|r| r.insert).collect::<Vec<_>>())
    }
    fn update(&self) -> Duration {
        median(&self.rounds.iter().map(|r| r.update).collect::<Vec<_>>())
    }
    fn insert_statement(&self) -> Duration {
        median(
            &self
                .rounds
                .iter()
                .map(|r| r.insert_statement)
                .collect::<Vec<_>>(),
        )
    }
    fn update_statement(&self) -> Duration {
        median(
            &self
                .rounds
                .iter()
                .map(|r| r.update_statement)
                .collect::<Vec<_>>(),
        )
    }
    fn total(&self) -> Duration {
        self.insert() + self.update()
    }
    fn cpu(&self) -> Cpu {
        let part = |pick: fn(&Cpu) -> Duration| {
            median(&self.rounds.iter().map(|r| pick(&r.cpu)).collect::<Vec<_>>())
        };
        Cpu {
            primary: part(|c| c.primary),
            replica: part(|c| c.replica),
            bench: part(|c| c.bench),
        }
    }
}

/// Prints the statements `node` spent the most time on (`BENCH_DIAGNOSE=1`).
async fn top_statements(node: &Node, path: Path) -> Outcome<()> {
    let rows = connect(&admin_config(node))
        .await?
        .query(
            "SELECT calls, total_exec_time, rows, \
             regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements \
             ORDER BY total_exec_time DESC LIMIT 8",
            &[],
        )
        .await?;
    println!("    {} on `{}`: top statements", path.name(), node.name());
    for row in rows {
        let query: String = row.get(3);
        let short: String = query.chars().take(110).collect();
        println!(
            "    {:>8} calls {:>9.0} ms {:>9} rows  {short}",
            row.get::<_, i64>(0),
            row.get::<_, f64>(1),
            row.get::<_, i64>(2),
        );
    }
    Ok(())
}

async fn bulk(
    topology: &Topology,
    rows: i64,
    repeats: usize,
    diagnose: bool,
) -> Outcome<Vec<BulkResult>> {
    let mut results = Vec::new();
    for path in Path::ALL {
        let table = path.table();
        create_table(topology, path.target(), &table, BULK_TABLE).await?;
        let schema = format!("pgherd_bulk_{}", path.name());
        let running = start_path(topology, path, path.target(), &table, &schema).await?;
        if diagnose {
            for node in [topology.primary(), topology.node(path.target())] {
                connect(&admin_config(node))
                    .await?
                    .batch_execute("SELECT pg_stat_statements_reset()")
                    .await?;
            }
        }
        let mut rounds = Vec::new();
        let mut failure = None;
        for round in 1..=repeats {
            let endpoints = Endpoints::of(topology, path.target());
            let what = format!("`{}` ({}, round {round})", path.target(), path.name());
            let table = table.clone();
            match off_thread(move || bulk_round(endpoints, table, rows, what)).await {
                Ok(result) => {
                    println!(
                        "  {:<8} round {round}: insert {:>6.0} ms, update {:>6.0} ms; statements \
                         on the primary {:>5.0} / {:>5.0} ms; CPU while replicating: primary \
                         {:>5.0} ms, replica {:>5.0} ms, bench process {:>5.0} ms",
                        path.name(),
                        ms(result.insert),
                        ms(result.update),
                        ms(result.insert_statement),
                        ms(result.update_statement),
                        ms(result.cpu.primary),
                        ms(result.cpu.replica),
                        ms(result.cpu.bench),
                    );
                    rounds.push(result);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        if diagnose {
            for node in [topology.primary(), topology.node(path.target())] {
                top_statements(node, path).await?;
            }
        }
        let stopped = stop_path(topology, running, path.target()).await;
        if let Some(error) = failure {
            return Err(error);
        }
        stopped?;
        results.push(BulkResult { path, rounds });
    }
    for path in Path::ALL {
        let table = path.table();
        let primary = digest(&topology.primary().config(), &table).await?;
        let replica = digest(&topology.node(path.target()).config(), &table).await?;
        if primary != replica {
            return Err(format!(
                "`{}` ({}) differs from the primary: {} rows, md5 {} there; {} rows, md5 {} on \
                 the primary",
                path.target(),
                path.name(),
                replica.0,
                replica.1,
                primary.0,
                primary.1
            )
            .into());
        }
        println!(
            "  verified {:<8} `{}` equals the primary: {} rows, md5 {}",
            path.name(),
            path.target(),
            replica.0,
            replica.1
        );
    }
    Ok(results)
}

/// (b) for one mode.
#[derive(Debug, Clone)]
struct LagResult {
    mode: CaptureMode,
    transactions: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// CPU of the primary's and the replica's server processes while the load ran.
    cpu: Cpu,
}

/// The writer has not finished.
const WRITING: i64 = -2;
/// The writer failed.
const WRITER_FAILED: i64 = -1;

/// Commits single-row transactions at `WRITE_RATE` per second for `duration`; returns when
/// each commit returned (index `i` is id `i + 1`) and how long it wrote.
async fn write_load(
    primary: Config,
    table: String,
    duration: Duration,
) -> Outcome<(Vec<Instant>, Duration)> {
    let client = connect(&primary).await?;
    let insert = client
        .prepare(&format!(
            "INSERT INTO {table} (id, at) VALUES ($1, clock_timestamp())"
        ))
        .await?;
    let mut commits = Vec::with_capacity(duration.as_secs() as usize * WRITE_RATE as usize + 16);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / WRITE_RATE);
    let started = Instant::now();
    let mut id: i64 = 0;
    while started.elapsed() < duration {
        ticker.tick().await;
        id += 1;
        client.execute(&insert, &[&id]).await?;
        commits.push(Instant::now());
    }
    Ok((commits, started.elapsed()))
}

/// Polls `max(id)` on the replica until it reaches the writer's last id; returns when each id
/// was first seen (index `i` is id `i + 1`).
async fn watch_lag(
    replica: Config,
    table: String,
    written: Arc<AtomicI64>,
    what: String,
) -> Outcome<Vec<Instant>> {
    let client = connect(&replica).await?;
    let max = client
        .prepare(&format!("SELECT coalesce(max(id), 0) FROM {table}"))
        .await?;
    let mut seen: Vec<Instant> = Vec::new();
    let mut deadline = None;
    loop {
        let now_max: i64 = client.query_one(&max, &[]).await?.get(0);
        let now = Instant::now();
        while (seen.len() as i64) < now_max {
            seen.push(now);
        }
        match written.load(Ordering::SeqCst) {
            WRITING => {}
            WRITER_FAILED => return Err("the writer failed".into()),
            last if now_max >= last => return Ok(seen),
            _ => {
                if now > *deadline.get_or_insert(now + CONVERGE_TIMEOUT) {
                    return Err(format!(
                        "{what} did not converge within {} s of the last write (it has id \
                         {now_max})",
                        CONVERGE_TIMEOUT.as_secs()
                    )
                    .into());
                }
            }
        }
        tokio::time::sleep(LAG_POLL).await;
    }
}

async fn lag(topology: &Topology, mode: CaptureMode, duration: Duration) -> Outcome<LagResult> {
    let (path, target) = match mode {
        CaptureMode::Logical => (Path::Logical, LOGICAL_TARGET),
        _ => (Path::Trigger, TRIGGER_TARGET),
    };
    let table = format!("lag_{}.lag_rows", mode.as_str());
    create_table(topology, target, &table, LAG_TABLE).await?;
    let schema = format!("pgherd_lag_{}", mode.as_str());
    let running = start_path(topology, path, target, &table, &schema).await?;
    let endpoints = Endpoints::of(topology, target);
    let cpu_before = Cpu::now(&endpoints);
    let written = Arc::new(AtomicI64::new(WRITING));
    let writer = {
        let (primary, table, written) = (
            topology.primary().config(),
            table.clone(),
            Arc::clone(&written),
        );
        off_thread(move || async move {
            let outcome = write_load(primary, table, duration).await;
            written.store(
                match &outcome {
                    Ok((commits, _)) => commits.len() as i64,
                    Err(_) => WRITER_FAILED,
                },
                Ordering::SeqCst,
            );
            outcome
        })
    };
    let checker = {
        let (replica, table, written) = (
            topology.node(target).config(),
            table.clone(),
            Arc::clone(&written),
        );
        let what = format!("`{target}` ({})", mode.as_str());
        off_thread(move || watch_lag(replica, table, written, what))
    };
    let (writer, checker) = tokio::join!(writer, checker);
    let cpu = Cpu::now(&endpoints).since(cpu_before);
    let stopped = stop_path(topology, running, target).await;
    let (commits, elapsed) = writer?;
    let seen = checker?;
    stopped?;
    let mut lags: Vec<Duration> = commits
        .iter()
        .zip(&seen)
        .map(|(commit, seen)| seen.saturating_duration_since(*commit))
        .collect();
    lags.sort();
    Ok(LagResult {
        mode,
        transactions: commits.len(),
        rate: commits.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&lags, 0.50),
        p99: percentile(&lags, 0.99),
        max: lags.last().copied().unwrap_or_default(),
        cpu,
    })
}

/// (c): medians without and with the capture triggers.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    insert: Duration,
    update: Duration,
    single: Duration,
}

/// Single-row INSERT transactions of (c): each run alternates blocks of this many between the
/// two tables, so that drift on a shared machine hits both alike.
const SINGLE_ROW_BLOCK: i64 = 500;

/// One run of (c)'s bulk statements on `table`: a bulk INSERT and a bulk UPDATE, on an emptied
/// table (`truncate`), each after a checkpoint.
async fn bulk_cost(
    client: &Client,
    admin: &Client,
    table: &str,
    truncate: &str,
    rows: i64,
) -> Outcome<(Duration, Duration)> {
    client.batch_execute(truncate).await?;
    admin.batch_execute("CHECKPOINT").await?;
    let begun = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO {table} SELECT g, g, md5(g::text) FROM generate_series(1, {rows}) g"
        ))
        .await?;
    let insert = begun.elapsed();
    admin.batch_execute("CHECKPOINT").await?;
    let begun = Instant::now();
    client
        .batch_execute(&format!("UPDATE {table} SET v = -id"))
        .await?;
    Ok((insert, begun.elapsed()))
}

/// One run of (c)'s single-row INSERT transactions: `SINGLE_ROW_TRANSACTIONS` into each table
/// (emptied first), in alternating blocks, on one connection. Returns the time per table.
async fn single_row_cost(
    client: &Client,
    admin: &Client,
    tables: [&str; 2],
    truncate: &str,
    run: usize,
) -> Outcome<[Duration; 2]> {
    client.batch_execute(truncate).await?;
    admin.batch_execute("CHECKPOINT").await?;
    let mut statements = Vec::new();
    for table in tables {
        statements.push(
            client
                .prepare(&format!(
                    "INSERT INTO {table} (id, v, pad) \
                     VALUES ($1::bigint, $1::bigint::int, md5($1::bigint::text))"
                ))
                .await?,
        );
    }
    let mut spent = [Duration::ZERO; 2];
    let blocks = (SINGLE_ROW_TRANSACTIONS / SINGLE_ROW_BLOCK) as usize;
    for block in 0..blocks {
        for turn in 0..2 {
            let side = (turn + block + run) % 2;
            let first = block as i64 * SINGLE_ROW_BLOCK + 1;
            let begun = Instant::now();
            for id in first..first + SINGLE_ROW_BLOCK {
                client.execute(&statements[side], &[&id]).await?;
            }
            spent[side] += begun.elapsed();
        }
    }
    Ok(spent)
}

async fn overhead(topology: &Topology, rows: i64, repeats: usize) -> Outcome<[Cost; 2]> {
    let plain = "cost_plain.bench_rows";
    let captured = "cost_trigger.bench_rows";
    let schema = "pgherd_cost";
    create_table(topology, TRIGGER_TARGET, plain, BULK_TABLE).await?;
    create_table(topology, TRIGGER_TARGET, captured, BULK_TABLE).await?;
    let mut settings = topology.settings();
    let primary_name = topology.primary().name().to_owned();
    settings
        .endpoints
        .retain(|name, _| *name == primary_name || name == TRIGGER_TARGET);
    settings.replicator.mode = CaptureMode::Trigger;
    settings.replicator.tables = vec![captured.to_owned()];
    settings.replicator.targets = vec![TRIGGER_TARGET.to_owned()];
    settings.replicator.schema = schema.to_owned();
    pgherd::replicator::install(&settings).await?;

    let client = connect(&topology.primary().config()).await?;
    let admin = connect(&admin_config(topology.primary())).await?;
    // The change tables of pgherd's schema are emptied with the table: as when cleanup keeps up.
    let logs: Vec<String> = admin
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = $1",
            &[&schema],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let tables = [plain, captured];
    let truncate = |sides: &[usize]| {
        let mut names: Vec<&str> = sides.iter().map(|&side| tables[side]).collect();
        if sides.contains(&1) {
            names.extend(logs.iter().map(String::as_str));
        }
        format!("TRUNCATE {}", names.join(", "))
    };
    let both = truncate(&[0, 1]);
    // A first, untimed pass on each side: plans cached, buffers and WAL segments in use.
    for (side, table) in tables.iter().enumerate() {
        bulk_cost(&client, &admin, table, &truncate(&[side]), rows).await?;
    }
    single_row_cost(&client, &admin, tables, &both, 0).await?;
    let mut runs: [Vec<Cost>; 2] = [Vec::new(), Vec::new()];
    for run in 0..repeats {
        let mut bulk = [(Duration::ZERO, Duration::ZERO); 2];
        for turn in 0..2 {
            // Alternate which side goes first, so that drift hits both alike.
            let side = (turn + run) % 2;
            let sql = truncate(&[side]);
            bulk[side] = bulk_cost(&client, &admin, tables[side], &sql, rows).await?;
        }
        let single = single_row_cost(&client, &admin, tables, &both, run).await?;
        for (side, costs) in runs.iter_mut().enumerate() {
            costs.push(Cost {
                insert: bulk[side].0,
                update: bulk[side].1,
                single: single[side],
            });
        }
    }
    let summary = |costs: &[Cost]| Cost {
        insert: median(&costs.iter().map(|c| c.insert).collect::<Vec<_>>()),
        update: median(&costs.iter().map(|c| c.update).collect::<Vec<_>>()),
        single: median(&costs.iter().map(|c| c.single).collect::<Vec<_>>()),
    };
    Ok([summary(&runs[0]), summary(&runs[1])])
}

/// (a): prints its tables; returns the throughput ratios of `trigger` and `logical` mode.
async fn section_a(
    topology: &Topology,
    rows: i64,
    repeats: usize,
    diagnose: bool,
) -> Outcome<(f64, f64)> {
    println!(
        "(a) bulk: commit of one {rows}-row statement on the primary until the replica \
         converged (polled every {} ms), median of {repeats}",
        BULK_POLL.as_millis()
    );
    let bulk = bulk(topology, rows, repeats, diagnose).await?;
    let native = bulk
        .iter()
        .find(|r| r.path == Path::Native)
        .ok_or("no native result")?
        .clone();
    println!(
        "{:<8} | {:>9} | {:>9} | {:>9} | {:>6} | {:>6} | {:>12} | {:>15}",
        "path",
        "insert ms",
        "update ms",
        "total ms",
        "ins x",
        "upd x",
        "throughput x",
        "primary stmt ms"
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    for result in &bulk {
        println!(
            "{:<8} | {:>9.0} | {:>9.0} | {:>9.0} | {:>6.2} | {:>6.2} | {:>12.2} | {:>15}",
            result.path.name(),
            ms(result.insert()),
            ms(result.update()),
            ms(result.total()),
            ratio(native.insert(), result.insert()),
            ratio(native.update(), result.update()),
            ratio(native.total(), result.total()),
            format!(
                "{:.0} / {:.0}",
                ms(result.insert_statement()),
                ms(result.update_statement())
            ),
        );
    }
    println!(
        "(x = native ms / path ms, >= 1.00: at least as fast as native; throughput x on insert + \
         update; primary stmt = the INSERT / UPDATE statement itself on the primary)"
    );
    println!(
        "CPU from commit to convergence (insert + update, median): primary's server processes \
         / the replica's / this process (the herd's replicator; probes)"
    );
    for result in &bulk {
        let cpu = result.cpu();
        println!(
            "{:<8} | primary {:>6.0} ms | replica {:>6.0} ms | bench process {:>6.0} ms",
            result.path.name(),
            ms(cpu.primary),
            ms(cpu.replica),
            ms(cpu.bench)
        );
    }
    let vs_native = |path: Path| {
        bulk.iter()
            .find(|r| r.path == path)
            .map_or(0.0, |r| ratio(native.total(), r.total()))
    };

    Ok((vs_native(Path::Trigger), vs_native(Path::Logical)))
}

/// (b): prints its table; returns trigger mode's p99 lag.
async fn section_b(topology: &Topology, seconds: u64) -> Outcome<Duration> {
    let duration = Duration::from_secs(seconds);
    println!(
        "(b) lag under load: single-row INSERT transactions at {WRITE_RATE}/s for {seconds} s; \
         the replica polled every {} ms for max(id); lag = first seen - commit returned",
        LAG_POLL.as_millis()
    );
    let mut lags = Vec::new();
    for mode in [CaptureMode::Trigger, CaptureMode::Logical] {
        lags.push(lag(topology, mode, duration).await?);
    }
    println!(
        "{:<8} | {:>12} | {:>8} | {:>8} | {:>8} | {:>8} | {:>15} | {:>15}",
        "mode",
        "transactions",
        "tx/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "primary CPU ms",
        "replica CPU ms"
    );
    for result in &lags {
        println!(
            "{:<8} | {:>12} | {:>8.0} | {:>8.1} | {:>8.1} | {:>8.1} | {:>15.0} | {:>15.0}",
            result.mode.as_str(),
            result.transactions,
            result.rate,
            ms(result.p50),
            ms(result.p99),
            ms(result.max),
            ms(result.cpu.primary),
            ms(result.cpu.replica),
        );
    }
    let defaults = ReplicatorSettings::default();
    println!(
        "(idle waits end early on a trigger-mode notification (notify {}) or on changes \
         arriving over logical mode's replication connection (logical_stream {}); both modes: \
         a pause of poll_after_changes {} ms after a step that applied changes, waits doubling \
         up to poll_interval {} ms after idle steps; CPU from the start of the load to its \
         end, the writes included)",
        if defaults.notify { "on" } else { "off" },
        if defaults.logical_stream { "on" } else { "off" },
        defaults.poll_after_changes.as_millis(),
        defaults.poll_interval.as_millis(),
    );

    // The goal holds for pgherd only if it holds in both modes.
    Ok(lags.iter().map(|r| r.p99).max().ok_or("no lag measured")?)
}

/// (c): prints its table; returns `trigger_overhead_bulk`.
async fn section_c(topology: &Topology, rows: i64, repeats: usize) -> Outcome<f64> {
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "(c) capture overhead on the primary: the same table without and with pgherd's capture \
         triggers (notify on), median of {repeats}"
    );
    let [without, with] = overhead(topology, rows, repeats).await?;
    println!(
        "{:<32} | {:>10} | {:>10} | {:>6}",
        "", "without ms", "with ms", "ratio"
    );
    let lines = [
        (format!("{rows}-row INSERT"), without.insert, with.insert),
        (format!("{rows}-row UPDATE"), without.update, with.update),
        (
            format!("{SINGLE_ROW_TRANSACTIONS} single-row INSERT txns"),
            without.single,
            with.single,
        ),
    ];
    for (what, without, with) in &lines {
        println!(
            "{what:<32} | {:>10.0} | {:>10.0} | {:>6.2}",
            ms(*without),
            ms(*with),
            ratio(*with, *without)
        );
    }
    let overhead_bulk = ratio(with.insert, without.insert).max(ratio(with.update, without.update));
    let overhead_single = (ratio(with.single, without.single) - 1.0) * 100.0;
    println!(
        "trigger_overhead_bulk = {overhead_bulk:.2} (the larger of the INSERT and UPDATE ratios); \
         trigger_overhead_single = {overhead_single:+.1}% per single-row transaction \
         ({:.0} µs -> {:.0} µs)",
        without.single.as_secs_f64() * 1e6 / SINGLE_ROW_TRANSACTIONS as f64,
        with.single.as_secs_f64() * 1e6 / SINGLE_ROW_TRANSACTIONS as f64,
    );
    Ok(overhead_bulk)
}

async fn run() -> Outcome<()> {
    let rows = env_number("BENCH_ROWS", 200_000) as i64;
    let seconds = env_number("BENCH_SECONDS", 20);
    let repeats = env_number("BENCH_REPEATS", 3) as usize;
    let diagnose = std::env::var("BENCH_DIAGNOSE").is_ok_and(|v| v == "1");
    let sections = std::env::var("BENCH_SECTIONS").unwrap_or_else(|_| "abc".to_owned());
    let started = Instant::now();
    let topology = Topology::builder()
        .logical(true)
        .stat_statements(diagnose)
        .replica(TRIGGER_TARGET)
        .replica(LOGICAL_TARGET)
        .replica(SUBSCRIBER)
        .start()
        .await?;
    let version: String = connect(&topology.primary().config())
        .await?
        .query_one("SELECT version()", &[])
        .await?
        .get(0);
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "pgherd's row replicator against native logical replication (publication/subscription)"
    );
    println!("machine: {cpus} CPUs; {version}");
    println!(
        "topology: a primary and 3 independent replicas (one per path), wal_level = logical, \
         fsync off (testkit); autovacuum off on the benchmark tables"
    );
    println!();

    let mut figures = (None, None, None);
    if sections.contains('a') {
        figures.0 = Some(section_a(&topology, rows, repeats, diagnose).await?);
        println!();
    }
    if sections.contains('b') {
        figures.1 = Some(section_b(&topology, seconds).await?);
        println!();
    }
    if sections.contains('c') {
        // (c)'s statements vary by 20 to 30% from one run to the next on a shared machine: two
        // more rounds than (a) steady its medians.
        figures.2 = Some(section_c(&topology, rows, repeats + 2).await?);
        println!();
    }
    println!("total time {:.0} s", started.elapsed().as_secs_f64());
    drop(topology);
    match figures {
        (Some((trigger, logical)), Some(lag_p99), Some(overhead_bulk)) => println!(
            "result: trigger_vs_native={trigger:.2} logical_vs_native={logical:.2} \
             lag_p99_ms={:.0} trigger_overhead_bulk={overhead_bulk:.2}",
            ms(lag_p99)
        ),
        _ => println!("(no result line: only sections {sections:?} ran)"),
    }
    Ok(())
}

#[actix::main]
async fn main() {
    if let Err(error) = run().await {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        eprintln!("bench_replication failed: {message}");
        std::process::exit(1);
    }
}
