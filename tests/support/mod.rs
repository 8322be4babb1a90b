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

/// Collects the messages of one kind an actor would receive (supervisor, health or failover
/// events), for assertions.
pub struct Log<M>(std::sync::Arc<std::sync::Mutex<Vec<M>>>);

impl<M> Clone for Log<M> {
    fn clone(&self) -> Self {
        Log(std::sync::Arc::clone(&self.0))
    }
}

impl<M> Default for Log<M> {
    fn default() -> Self {
        Log(std::sync::Arc::default())
    }
}

impl<M> Log<M>
where
    M: actix::Message<Result = ()> + Clone + Send + Unpin + 'static,
{
    /// A recipient that records into this log (an actor started on the current arbiter).
    pub fn recipient(&self) -> actix::Recipient<M> {
        use actix::Actor as _;
        Recorder(self.clone()).start().recipient()
    }

    /// Every message so far.
    pub fn events(&self) -> Vec<M> {
        self.0.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Whether a message matches `predicate`.
    pub fn any(&self, predicate: impl Fn(&M) -> bool) -> bool {
        self.events().iter().any(predicate)
    }

    /// The first message that `pick` accepts.
    pub fn find<T>(&self, pick: impl Fn(&M) -> Option<T>) -> Option<T> {
        self.events().iter().find_map(pick)
    }
}

/// The supervisor's events.
pub type EventLog = Log<pgherd::SupervisorEvent>;

struct Recorder<M>(Log<M>);

impl<M: Unpin + 'static> actix::Actor for Recorder<M> {
    type Context = actix::Context<Self>;
}

impl<M> actix::Handler<M> for Recorder<M>
where
    M: actix::Message<Result = ()> + Unpin + 'static,
{
    type Result = ();

    fn handle(&mut self, message: M, _ctx: &mut Self::Context) {
        if let Ok(mut messages) = (self.0).0.lock() {
            messages.push(message);
        }
    }
}

/// Waits until a statement containing `marker` is running on `node`.
pub async fn wait_active(node: &pgherd::testkit::Node, marker: &str) {
    let admin = node.connect_admin().await.expect("admin connection");
    eventually(
        &format!("a statement with `{marker}` to run on `{}`", node.name()),
        Duration::from_secs(10),
        || {
            let admin = &admin;
            async move {
                admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                         AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
                        &[&marker],
                    )
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) > 0)
            }
        },
    )
    .await;
}
