//! The replicator (`[replicator]`): which tables are kept equal on the `replica` endpoints, and
//! how changes are captured on the primary.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

use super::duration;

/// How changes are captured on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CaptureMode {
    /// Statement-level triggers log the keys of changed rows into a change table; batches are
    /// cut at transaction snapshots and rows are re-read in the batch's snapshot (`"trigger"`).
    /// Needs no `wal_level` change and no REPLICATION role; works on managed PostgreSQL.
    Trigger,
    /// A `pgoutput` slot and publication per target, read over a replication connection (or
    /// peeked, see [`ReplicatorSettings::logical_stream`]) (`"logical"`). Needs `wal_level = logical` and a
    /// login with the REPLICATION attribute; no trigger on the application's tables.
    Logical,
}

impl CaptureMode {
    /// The name used in settings files.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Trigger => "trigger",
            CaptureMode::Logical => "logical",
        }
    }
}

impl<'de> Deserialize<'de> for CaptureMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "trigger" => Ok(CaptureMode::Trigger),
            "logical" => Ok(CaptureMode::Logical),
            _ => Err(de::Error::custom(format!(
                "unknown capture mode `{name}`: expected \"trigger\" (change table filled by \
                 triggers; no wal_level change) or \"logical\" (a pgoutput slot; needs \
                 wal_level = logical and a REPLICATION login)"
            ))),
        }
    }
}

/// What a target does when what it replicates from can no longer be trusted: a different source
/// system or timeline (a failover to a standby that may have lost transactions), or, in
/// `logical` mode, a slot that is gone or invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResyncPolicy {
    /// Copy every table again under a fresh snapshot, then stream from there (`"resync"`).
    Resync,
    /// Stop replicating to that target and report why; an operator decides (`"stop"`).
    Stop,
}

impl<'de> Deserialize<'de> for ResyncPolicy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        match name.as_str() {
            "resync" => Ok(ResyncPolicy::Resync),
            "stop" => Ok(ResyncPolicy::Stop),
            _ => Err(de::Error::custom(format!(
                "unknown policy `{name}`: expected \"resync\" (copy every table again) or \
                 \"stop\" (stop that target and report)"
            ))),
        }
    }
}

/// The replicator (`[replicator]` in `Settings.toml`). It is on when `tables` is not empty: every
/// endpoint with `role = "replica"` (or those named in `targets`) is then kept equal to its
/// cluster's primary, table by table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReplicatorSettings {
    /// How changes are captured: `"trigger"` or `"logical"`.
    ///
    /// Default: `"trigger"`.
    pub mode: CaptureMode,
    /// The tables to replicate, as `"schema.table"` or `"table"` (schema `public`). Each needs a
    /// primary key. The same tables must exist on every target (extra columns on a target are
    /// fine: schema changes go to the replicas first). A list: it can only be set in the file.
    ///
    /// Default: none (the replicator is off).
    pub tables: Vec<String>,
    /// The endpoints to replicate to, by name; each must have `role = "replica"`.
    ///
    /// Default: every endpoint with `role = "replica"`.
    pub targets: Vec<String>,
    /// The schema pgherd keeps its own objects in, on the primary (change tables, triggers) and
    /// on the targets (the progress table).
    ///
    /// Default: `"pgherd"`.
    pub schema: String,
    /// The most rows in one chunk of a batch; a larger batch is applied in chunks within the
    /// same target transaction, and a step holds at most two chunks (one applied while the
    /// next is read), so memory stays bounded.
    ///
    /// Default: `10000`.
    pub batch_rows: usize,
    /// The most bytes of row data in one chunk of a batch (in `logical` mode: of the decoded
    /// messages folded into the chunk, whose bytes its rows share).
    ///
    /// Default: `8388608` (8 MiB).
    pub batch_bytes: usize,
    /// The longest wait between checks for changes while the last steps found none (the wait
    /// doubles from `poll_after_changes` after each such step). A notification of the capture
    /// triggers (`trigger` mode) ends the wait at once.
    ///
    /// Default: `"50ms"`.
    #[serde(deserialize_with = "duration::required")]
    pub poll_interval: Duration,
    /// The pause after a step that applied changes, before the next step; notifications do not
    /// shorten it. Under a steady load it sets how often steps run: changes that arrive in the
    /// meantime are gathered into the next batch instead of costing a step each. Shorter means
    /// less lag and more CPU on the primary (in `logical` mode each check also decodes WAL
    /// again); `"0ms"` starts the next step at once. BENCHMARKS.md has the lag and CPU of
    /// several values.
    ///
    /// Default: `"10ms"`; a value above `poll_interval` counts as `poll_interval`.
    #[serde(deserialize_with = "duration::required")]
    pub poll_after_changes: Duration,
    /// Whether the capture triggers send a notification that wakes the replicator at once
    /// (`trigger` mode; polling remains the fallback).
    ///
    /// Default: `true`.
    pub notify: bool,
    /// How `logical` mode reads its slot. `true`: over a replication connection
    /// (`START_REPLICATION`, the protocol native subscribers use): the primary decodes the WAL
    /// while it is written and sends each transaction as it commits, and the slot moves when the
    /// target reports what it holds. `false`: a peek over a normal connection at every step
    /// (`pg_logical_slot_peek_binary_changes`), which decodes from the slot's restart position
    /// each time and materializes a whole transaction before its first row; for a primary that
    /// is only reachable through something that refuses replication connections (a pooler).
    /// Both apply each batch in one target transaction with the same exactly-once guard.
    ///
    /// Default: `true`.
    pub logical_stream: bool,
    /// How long a target waits before trying again after an error (an unreachable target or
    /// primary, a failed batch).
    ///
    /// Default: `"1s"`.
    #[serde(deserialize_with = "duration::required")]
    pub retry_interval: Duration,
    /// The longest a step (one batch, or the copy of every table for a new target) may go
    /// without moving: without a chunk of changes applied or a row copied. A step that keeps
    /// moving is not cut, however long its batch or copy. One that stalls longer (a connection
    /// that stopped answering, a network cut, one statement that runs longer) ends the
    /// session, which starts again after `retry_interval`.
    ///
    /// Default: `"60s"`.
    #[serde(deserialize_with = "duration::required")]
    pub step_timeout: Duration,
    /// `trigger` mode: how often a target whose batches found no changes for it tells the
    /// primary how far it got (after changes, once a second). Telling it then frees no change
    /// row, and each time is a write on the primary and one on the target: an idle primary
    /// stays idle between them (as PgQ's idle tick).
    ///
    /// Default: `"60s"`.
    #[serde(deserialize_with = "duration::required")]
    pub idle_ack_interval: Duration,
    /// What a target does when its source changed (another system or timeline) or its slot is
    /// lost: `"resync"` or `"stop"`.
    ///
    /// Default: `"resync"`.
    pub on_source_change: ResyncPolicy,
}

impl Default for ReplicatorSettings {
    fn default() -> Self {
        Self {
            mode: CaptureMode::Trigger,
            tables: Vec::new(),
            targets: Vec::new(),
            schema: "pgherd".to_owned(),
            batch_rows: 10_000,
            batch_bytes: 8 << 20,
            poll_interval: Duration::from_millis(50),
            poll_after_changes: Duration::from_millis(10),
            notify: true,
            logical_stream: true,
            retry_interval: Duration::from_secs(1),
            step_timeout: Duration::from_secs(60),
            idle_ack_interval: Duration::from_secs(60),
            on_source_change: ResyncPolicy::Resync,
        }
    }
}

impl ReplicatorSettings {
    /// Whether the replicator runs (some table is configured).
    pub fn enabled(&self) -> bool {
        !self.tables.is_empty()
    }
}

/// A configured table name split into schema and table (`"orders"` is `public.orders`).
///
/// Returns `None` for an empty part or more than one dot; quotes are not interpreted (names are
/// taken literally and always quoted in SQL).
pub(crate) fn split_table(name: &str) -> Option<(&str, &str)> {
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    let valid = |part: &str| !part.is_empty() && !part.contains('.') && !part.contains('\0');
    (valid(schema) && valid(table)).then_some((schema, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_default_to_public() {
        assert_eq!(split_table("orders"), Some(("public", "orders")));
        assert_eq!(split_table("shop.Orders"), Some(("shop", "Orders")));
        assert_eq!(split_table("a.b.c"), None);
        assert_eq!(split_table(".b"), None);
        assert_eq!(split_table(""), None);
    }
}
