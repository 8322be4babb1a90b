//! Throwaway local PostgreSQL topologies and a fault-injecting proxy, for tests, demos and
//! benchmarks (cargo feature `testkit`).
//!
//! A [`Topology`] is real servers started from the system's PostgreSQL binaries on free loopback
//! ports, in a temporary directory: a primary, physical standbys streaming from it (optionally
//! synchronous), and independent servers. Each [`Node`] can be stopped, killed, hung, resumed,
//! restarted and promoted. The topology renders the [`Settings`](crate::Settings) that point at
//! it, so tests load the same type users do.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pgherd::testkit::Topology;
//!
//! let topology = Topology::builder().standbys(2).synchronous(1).start().await?;
//! let primary = topology.primary().connect().await?;
//! primary.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await?;
//! topology.primary().kill()?;             // SIGKILL, like a crash
//! topology.standby(0).promote().await?;   // pg_promote()
//! # Ok(()) }
//! ```
//!
//! When running as root the servers run as the `postgres` OS user, since PostgreSQL refuses root.
//! Servers and files are removed when the topology is dropped, also when a test panics; a
//! watchdog process removes them if this process dies without dropping it.

mod binaries;
mod error;
mod node;
mod proxy;
mod reaper;
mod server_user;
mod tls;
mod topology;
pub mod workload;

pub use binaries::Binaries;
pub use error::TestkitError;
pub use node::{Login, Node, ADMIN_USER, HOST};
pub use proxy::{FaultMode, FaultProxy};
pub use tls::{unrelated_ca_pem, TlsFiles, SERVER_NAMES};
pub use topology::{Topology, TopologyBuilder, ROOT_PREFIX};
