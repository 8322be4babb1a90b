//! Point-select reads through the router against the same reads on a bare deadpool-postgres pool
//! of the same size, on one throwaway server, in the same run.
//!
//! `cargo run --release --example bench_router` prints, per concurrency (1, 8, 64), throughput and
//! p50/p99 latency of three sides and their throughput ratios to the bare pool:
//! - `direct`: a bare deadpool-postgres pool (the anchor);
//! - `herd`: `herd.send(query)`, the routing run on the caller's task;
//! - `actor`: `router.send(query)`, the same routing through the router actor's mailbox.
//!
//! It ends with `result: ratio_c1=... ratio_c8=... ratio_c64=... actor_ratio_c1=...`, where
//! `ratio_*` is herd/direct and `actor_ratio_*` is actor/direct.
//!
//! All sides run on the same single-threaded actix runtime and use the same pool settings
//! (`Verified` recycling, 16 connections, prepared-statement cache). They run in cycles of one
//! short round each, in rotating order; a ratio is the median of the per-cycle ratios, so that
//! drift on a noisy machine, which hits neighbouring rounds alike, cancels out.

use std::{
    cell::RefCell,
    rc::Rc,
    time::{Duration, Instant},
};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use pgherd::{
    router::GetInFlight, testkit::Topology, Herd, Intent, Params, Query, QueryResult, RouterActor,
};

const ROWS: i32 = 10_000;
const POOL_SIZE: usize = 16;
const ROUND: Duration = Duration::from_millis(400);
const CYCLES: usize = 15;
const CONCURRENCY: [usize; 3] = [1, 8, 64];

/// `BENCH_CONCURRENCY=8,64` and `BENCH_CYCLES=5` shorten a run while investigating.
fn concurrency_levels() -> Vec<usize> {
    std::env::var("BENCH_CONCURRENCY")
        .ok()
        .map(|list| {
            list.split(',')
                .filter_map(|c| c.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| CONCURRENCY.to_vec())
}

fn cycles() -> usize {
    std::env::var("BENCH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CYCLES)
}
const SQL: &str = "SELECT v FROM bench WHERE id = $1";

/// The typed query the router side sends.
struct PointSelect {
    id: i32,
}

impl Query for PointSelect {
    type Output = String;
    const INTENT: Intent = Intent::Read;

    fn sql(&self) -> &str {
        SQL
    }
    fn params(&self) -> Params<'_> {
        vec![&self.id]
    }
    fn output(result: QueryResult) -> Result<String, pgherd::Error> {
        Ok(result.one::<(String,)>()?.0)
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// CPU time of the runtime's thread, which runs both the callers and the connections.
    cpu: Duration,
}

impl Tally {
    fn absorb(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
    }

    /// Client-side CPU per query, in microseconds.
    fn cpu_per_query(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.latencies.len() as f64
    }

    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }
}

/// CPU time used by this thread so far.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| Duration::new(t.tv_sec().unsigned_abs(), t.tv_nsec().unsigned_abs() as u32))
        .unwrap_or_default()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `concurrency` loops of `one` for `ROUND`, adding to `tally`.
async fn round<F, Fut>(concurrency: usize, tally: &mut Tally, one: F)
where
    F: Fn(i32) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let latencies = Rc::new(RefCell::new(Vec::new()));
    let started = Instant::now();
    let cpu_started = thread_cpu();
    let stop = started + ROUND;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let one = one.clone();
        let latencies = Rc::clone(&latencies);
        tasks.push(actix_rt::spawn(async move {
            let mut id = (worker as i32 * 7919) % ROWS;
            while Instant::now() < stop {
                id = (id * 48271 + 11) % ROWS;
                let begun = Instant::now();
                one(id + 1).await;
                latencies.borrow_mut().push(begun.elapsed());
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    tally.elapsed += started.elapsed();
    tally.cpu += thread_cpu().saturating_sub(cpu_started);
    tally.latencies.extend(latencies.borrow().iter().copied());
}

fn direct_pool(topology: &Topology) -> Pool {
    let manager = Manager::from_config(
        topology.primary().config(),
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(2)))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(1)))
        .build()
        .expect("direct pool")
}

async fn direct_select(pool: Pool, id: i32) {
    let client = pool.get().await.expect("checkout");
    let statement = client.prepare_cached(SQL).await.expect("prepare");
    let row = client.query_one(&statement, &[&id]).await.expect("query");
    let _: String = row.get(0);
}

async fn herd_select(herd: Herd, id: i32) {
    let _ = herd.send(PointSelect { id }.routed()).await.expect("query");
}

async fn actor_select(router: actix::Addr<RouterActor>, id: i32) {
    let _ = router
        .send(PointSelect { id }.routed())
        .await
        .expect("mailbox")
        .expect("query");
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topology = Topology::builder().start().await?;
    let mut settings = topology.settings();
    settings.pool.max_size = POOL_SIZE;
    let herd = Herd::start(settings)?;
    herd.wait_ready(Duration::from_secs(10)).await?;
    let setup = topology.primary().connect().await?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE bench (id int PRIMARY KEY, v text NOT NULL);
             INSERT INTO bench SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;
             ANALYZE bench;"
        ))
        .await?;
    let pool = direct_pool(&topology);
    let router = herd.router();

    // Warm up: connections opened, statements prepared.
    let mut scratch = Tally::default();
    round(POOL_SIZE, &mut scratch, {
        let pool = pool.clone();
        move |id| direct_select(pool.clone(), id)
    })
    .await;
    round(POOL_SIZE, &mut scratch, {
        let herd = herd.clone();
        move |id| herd_select(herd.clone(), id)
    })
    .await;

    println!(
        "point selects on one server, pool of {POOL_SIZE}, {} cycles of one {} ms round per side; ratio = median of per-cycle ratios",
        cycles(),
        ROUND.as_millis()
    );
    println!(
        "{:>4} | {:>8} {:>6} {:>6} | {:>8} {:>6} {:>6} {:>6} | {:>8} {:>6} {:>6} {:>6}",
        "conc",
        "direct/s",
        "p50µs",
        "p99µs",
        "herd/s",
        "p50µs",
        "p99µs",
        "ratio",
        "actor/s",
        "p50µs",
        "p99µs",
        "ratio"
    );
    let mut ratios = Vec::new();
    let mut cpu_lines = Vec::new();
    for concurrency in concurrency_levels() {
        let mut direct = Tally::default();
        let mut handle = Tally::default();
        let mut actor = Tally::default();
        let mut herd_ratios = Vec::new();
        let mut actor_ratios = Vec::new();
        for cycle in 0..cycles() {
            let mut cycle_direct = Tally::default();
            let mut cycle_handle = Tally::default();
            let mut cycle_actor = Tally::default();
            for side in 0..3 {
                match (side + cycle) % 3 {
                    0 => {
                        round(concurrency, &mut cycle_direct, {
                            let pool = pool.clone();
                            move |id| direct_select(pool.clone(), id)
                        })
                        .await
                    }
                    1 => {
                        round(concurrency, &mut cycle_handle, {
                            let herd = herd.clone();
                            move |id| herd_select(herd.clone(), id)
                        })
                        .await
                    }
                    _ => {
                        round(concurrency, &mut cycle_actor, {
                            let router = router.clone();
                            move |id| actor_select(router.clone(), id)
                        })
                        .await
                    }
                }
            }
            herd_ratios.push(cycle_handle.throughput() / cycle_direct.throughput());
            actor_ratios.push(cycle_actor.throughput() / cycle_direct.throughput());
            direct.absorb(cycle_direct);
            handle.absorb(cycle_handle);
            actor.absorb(cycle_actor);
        }
        let herd_ratio = median(&mut herd_ratios);
        let actor_ratio = median(&mut actor_ratios);
        println!(
            "{:>4} | {:>8.0} {:>6} {:>6} | {:>8.0} {:>6} {:>6} {:>6.3} | {:>8.0} {:>6} {:>6} {:>6.3}",
            concurrency,
            direct.throughput(),
            direct.percentile(0.5).as_micros(),
            direct.percentile(0.99).as_micros(),
            handle.throughput(),
            handle.percentile(0.5).as_micros(),
            handle.percentile(0.99).as_micros(),
            herd_ratio,
            actor.throughput(),
            actor.percentile(0.5).as_micros(),
            actor.percentile(0.99).as_micros(),
            actor_ratio,
        );
        ratios.push((concurrency, herd_ratio, actor_ratio));
        cpu_lines.push(format!(
            "{concurrency:>4} | client CPU per query: direct {:.1} µs, herd {:.1} µs, actor {:.1} µs",
            direct.cpu_per_query(),
            handle.cpu_per_query(),
            actor.cpu_per_query()
        ));
    }
    for line in &cpu_lines {
        println!("{line}");
    }
    // The cost of one trip through the router's mailbox alone (a message answered at once).
    let trips = 100_000;
    let started = Instant::now();
    for _ in 0..trips {
        router.send(GetInFlight).await?;
    }
    println!(
        "router mailbox round trip (GetInFlight, sequential): {:.2} µs",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(trips)
    );
    herd.shutdown().await;
    let herd_line = ratios.iter().map(|(c, r, _)| format!("ratio_c{c}={r:.3}"));
    let actor_line = ratios
        .iter()
        .map(|(c, _, a)| format!("actor_ratio_c{c}={a:.3}"));
    let line: Vec<String> = herd_line.chain(actor_line).collect();
    println!("result: {}", line.join(" "));
    Ok(())
}
