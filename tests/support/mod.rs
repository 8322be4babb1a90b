//! Shared helpers for the integration tests: tracing, polling for a condition, starting
//! topologies with a loud error.
#![allow(dead_code)]

use std::{future::Future, time::Duration};

use pgherd::testkit::{Topology, TopologyBuilder};
use tokio::time::Instant;

/// Sends `tracing` output to the test harness (shown for failing tests). Call at the start of a
/// test; calling it again is harmless.
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgherd=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts `builder`, failing the test loudly (with the install hint when PostgreSQL is missing).
pub async fn start(builder: TopologyBuilder) -> Topology {
    trace_init();
    match builder.start().await {
        Ok(topology) => topology,
        Err(error) => panic!("could not start a test topology: {error}"),
    }
}

/// Polls `condition` every 20 ms until it is true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process with this pid exists (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
