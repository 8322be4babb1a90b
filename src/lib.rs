#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]

// Bottom: settings, errors and plain types; the pure decisions.
mod backoff;
mod child;
mod error;
pub mod failover;
mod position;
pub mod query;
pub mod settings;
mod sql;

// Actors.
pub mod database;
pub mod health;
pub mod replicator;
pub mod router;
pub mod supervisor;

// Top: the facade and sessions, and the testkit.
mod herd;
mod session;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use child::{ChildId, ExitReason};
pub use database::DatabaseActor;
pub use error::{Error, ErrorKind};
pub use health::{
    EndpointHealth, FailoverEvent, FailoverReport, HealthActor, HealthState, ObservedRole,
    StateChanged,
};
pub use herd::{Herd, HerdBuilder, Tracked};
pub use position::{Position, PositionParseError};
pub use query::{
    column, Batch, FromRow, Intent, Params, Query, QueryResult, Read, Request, Routable,
    RouteOptions, Routed, Transact, TxFuture, Write, Written,
};
pub use replicator::{ReplicationState, ReplicationStatus, ReplicatorActor};
pub use router::{GetRoutes, Route, RouteEntry, RouteRequest, RouterActor, RoutingRule};
pub use session::Session;
pub use settings::{EndpointSettings, Role, Settings, SettingsError, SettingsProblem};
pub use supervisor::{Shutdown, Subscribe, SupervisorActor, SupervisorEvent};
