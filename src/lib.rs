#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]

// Bottom: settings, errors and plain types.
mod backoff;
mod child;
mod error;
pub mod query;
pub mod settings;
mod sql;

// Actors.
pub mod database;
pub mod router;
pub mod supervisor;

// Top: the facade, and the testkit.
mod herd;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use child::{ChildId, ExitReason};
pub use database::{DatabaseActor, EndpointStatus, GetEndpointStatus, Reachability};
pub use error::{Error, ErrorKind};
pub use herd::{Herd, HerdBuilder};
pub use query::{
    column, Batch, FromRow, Intent, Params, Query, QueryResult, Read, Request, Routable,
    RouteOptions, Routed, Transact, TxFuture, Write, Written,
};
pub use router::{GetRoutes, Route, RouteEntry, RouteRequest, RouterActor, RoutingRule};
pub use settings::{EndpointSettings, Role, Settings, SettingsError, SettingsProblem};
pub use supervisor::{Shutdown, Subscribe, SupervisorActor, SupervisorEvent};
