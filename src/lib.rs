#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod settings;

pub use settings::{EndpointSettings, Role, Settings, SettingsError, SettingsProblem};
mod sql;
#[cfg(feature = "testkit")]
pub mod testkit;
