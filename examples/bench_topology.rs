//! How long the testkit takes to start a primary with two streaming standbys.
//!
//! `cargo run --release --example bench_topology` prints each run, the median and the maximum,
//! and ends with `result: topology_start_ms=<median>`.

use std::time::{Duration, Instant};

use pgherd::testkit::Topology;

const RUNS: usize = 7;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut times = Vec::with_capacity(RUNS);
    for run in 1..=RUNS {
        let started = Instant::now();
        let topology = Topology::builder().standbys(2).start().await?;
        let elapsed = started.elapsed();
        // Teardown is not part of the figure, but is timed for reference.
        let teardown = Instant::now();
        drop(topology);
        println!(
            "run {run}: start {:>5} ms (primary + 2 streaming standbys), teardown {:>4} ms",
            elapsed.as_millis(),
            teardown.elapsed().as_millis()
        );
        times.push(elapsed);
    }
    times.sort();
    let median = times[times.len() / 2];
    let max = times.last().copied().unwrap_or(Duration::ZERO);
    println!(
        "median {} ms, max {} ms over {RUNS} runs",
        median.as_millis(),
        max.as_millis()
    );
    println!("result: topology_start_ms={}", median.as_millis());
    Ok(())
}
