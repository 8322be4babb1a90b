//! One target's replication loop: leadership, the connection to the cluster's accepted primary,
//! the progress row, and the steps of the capture mode.
//!
//! A session lasts as long as both connections and the same primary: any error ends it, and the
//! loop starts a new one after `retry_interval`. Everything a session knows is re-read from the
//! target's progress row, so a new session (or another process) continues exactly where the last
//! committed batch ended.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tokio_postgres::{Client, Transaction};

use super::{
    apply::{TableChanges, TableSql},
    catalog::TableInfo,
    install, logical,
    snapshot::Snapshot,
    trigger, ReplicationState, ReplicationStatus,
};
use crate::{
    database::pool::Connector,
    error::{Error, ErrorKind},
    position::Position,
    router::Routing,
    settings::{CaptureMode, ReplicatorSettings},
    sql::quote_ident,
};

/// How the replicator's connections write and read values as text, whatever the server's
/// defaults (a `DateStyle` of `SQL, DMY` on one side would turn 04/03 into 3 April on the other,
/// an `lc_monetary` of `de_DE` would read `$1,234.56` as 1.23, an `xmloption` of `document`
/// would refuse an XML fragment the other side stored).
///
/// Row-level security off (as `pg_dump` does): a table whose policies hide rows from the
/// replicator's role makes its reads and writes fail, with PostgreSQL's error naming the table,
/// instead of copying and applying only the rows the policies let through.
pub(crate) const SESSION_SETTINGS: &str =
    "SET DateStyle = ISO, YMD; SET IntervalStyle = postgres; \
     SET extra_float_digits = 3; SET bytea_output = hex; SET lc_monetary = 'C'; \
     SET xmloption = content; SET standard_conforming_strings = on; SET row_security = off";

/// The source's history is released once the target's commit returns (the slot moves, change
/// rows are deleted), so that commit must survive a crash of the target. A target whose
/// sessions do not wait for their commits to be flushed (`synchronous_commit = off`, common on
/// replicas) would lose it and the rows before it for good: the replicator's session waits for
/// the local flush there; a stricter setting (`on`, `remote_apply`) is kept.
const DURABLE_COMMITS: &str = "SELECT set_config('synchronous_commit', 'local', false) \
     WHERE current_setting('synchronous_commit') = 'off'";

/// How many warnings a target's status keeps (the latest).
const WARNINGS_KEPT: usize = 16;

/// What one target's loop is started with.
#[derive(Clone)]
pub(crate) struct TargetSpec {
    pub(crate) target: Arc<str>,
    pub(crate) cluster: Arc<str>,
    pub(crate) connector: Arc<Connector>,
    /// Every endpoint of the cluster that may become its primary.
    pub(crate) sources: Vec<(Arc<str>, Arc<Connector>)>,
    pub(crate) settings: ReplicatorSettings,
    pub(crate) routing: Arc<Routing>,
}

impl std::fmt::Debug for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetSpec")
            .field("target", &self.target)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl TargetSpec {
    /// Tells the router how far the target got from `source`, for reads sent after a position.
    pub(crate) fn routing_feed(&self, source: &Arc<str>, applied: Position) {
        self.routing.replicated(&self.target, source, applied);
    }

    /// Takes back what the router was told: the session ended, and the target may come back
    /// older (restored, recopied) or fed from another source. Until a new session applies
    /// again, reads after a position wait for it, or go elsewhere.
    fn forget_applied(&self, shared: &Shared) {
        self.routing.forget_replicated(&self.target);
        shared.update(|status| status.applied = None);
    }
}

/// The target's progress row: what the target holds, committed with the rows themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Batches applied; each apply moves it by one, and only from the value it read.
    pub(crate) batch: i64,
    pub(crate) mode: String,
    /// `trigger` mode: the snapshot the target is equal to.
    pub(crate) snapshot: Option<Snapshot>,
    /// `logical` mode: the end of the last applied commit.
    pub(crate) lsn: Option<Position>,
    /// `logical` mode: transactions visible here came with the initial copy.
    pub(crate) copy_snapshot: Option<Snapshot>,
    /// `logical` mode: the primary's insert position right after the copy's snapshot; only
    /// commits before it can be in the copy.
    pub(crate) copy_lsn: Option<Position>,
    pub(crate) system_id: Option<String>,
    pub(crate) timeline: Option<i32>,
    pub(crate) tables: Vec<String>,
}

/// Where the source is, read at every batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) system_id: String,
    pub(crate) timeline: i32,
}

impl Identity {
    pub(crate) const SQL: &'static str = "(pg_control_system()).system_identifier::text, \
        ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int4";

    /// What changed between the source the target was filled from and this one, if anything.
    pub(crate) fn changed_from(&self, progress: &Progress) -> Option<String> {
        match (&progress.system_id, progress.timeline) {
            (Some(system), _) if *system != self.system_id => Some(format!(
                "the primary is another system (identifier {} instead of {system})",
                self.system_id
            )),
            (_, Some(timeline)) if timeline != self.timeline => Some(format!(
                "the primary is on timeline {} instead of {timeline} (a failover): transactions \
                 the target holds may be missing on the new primary",
                self.timeline
            )),
            _ => None,
        }
    }
}

/// The outcome of one step.
#[derive(Debug)]
pub(crate) enum Step {
    /// A batch was applied.
    Applied { rows: u64, more: bool },
    /// Nothing new.
    Idle,
    /// Nothing applied, but more to do at once.
    Again,
    /// The target must stop (the policy said so).
    Stop(String),
    /// The session must read the catalogs again (why): a new one is opened at once.
    Reopen(String),
}

/// An open session: both connections, the plan for every table, and the progress.
pub(crate) struct Session {
    pub(crate) spec: TargetSpec,
    pub(crate) target: Client,
    pub(crate) source: Client,
    pub(crate) source_name: Arc<str>,
    pub(crate) tables: Vec<TableInfo>,
    /// The primary's WAL position just before `tables` were read from its catalogs.
    pub(crate) catalog_lsn: Position,
    pub(crate) plans: Vec<TableSql>,
    pub(crate) progress: Progress,
    pub(crate) shared: Arc<Shared>,
    /// When the source was last read by trigger mode's cleanup and acknowledgement.
    pub(crate) last_ack: Option<Instant>,
    pub(crate) last_cleanup: Option<Instant>,
    /// `logical` mode: when the target's progress row last recorded a position reached
    /// without a batch (changes for other tables only).
    pub(crate) last_record: Option<Instant>,
    /// `trigger` mode: `progress` moved past what the target's progress row records (windows
    /// without changes for the target); recorded there before it is acknowledged.
    pub(crate) unrecorded: bool,
    /// `trigger` mode: this session registered the target on the primary before a copy.
    pub(crate) registered: bool,
    /// The connection that listens for the capture triggers' notifications, kept open with
    /// the session.
    _listener: Option<Client>,
    /// How to reach the source again (`logical` mode's replication connection).
    pub(crate) source_connector: Arc<Connector>,
    /// Woken when changes arrive (notifications, or the replication stream).
    pub(crate) wake: Arc<Notify>,
    /// `logical` mode with `logical_stream`: the open replication stream.
    pub(crate) stream: Option<super::stream::ReplicationStream>,
    /// `logical` mode: the connection that reads rows from the source for replayed changes that
    /// lack columns (see `TableChanges::fill`), opened when first needed and kept meanwhile.
    /// Not `source`, which may be streaming a peek while a chunk is applied.
    /// (A lock held only to take it out or put it back, never across an await.)
    fill_source: std::sync::Mutex<Option<Client>>,
    /// `trigger` mode: the snapshot at which the last idle step wrote a record so that the
    /// target's applied position can pass the last commit (see `trigger::step`): once per
    /// snapshot, which only a commit moves.
    pub(crate) nudged: Option<super::snapshot::Snapshot>,
    /// `trigger` mode: a window with changes for the target (or a copy) was applied since the
    /// last acknowledgement.
    pub(crate) unacknowledged: bool,
    /// `trigger` mode: acknowledged since the last cleanup of the change tables.
    pub(crate) uncleaned: bool,
}

impl Session {
    pub(crate) fn schema(&self) -> String {
        quote_ident(&self.spec.settings.schema)
    }

    /// The kept connection for reading rows to fill, if any (see `fill_source`).
    pub(crate) fn take_fill_source(&self) -> Option<Client> {
        self.fill_source
            .lock()
            .ok()
            .and_then(|mut kept| kept.take())
    }

    /// Keeps `client` for the next rows to fill.
    pub(crate) fn keep_fill_source(&self, client: Client) {
        if let Ok(mut kept) = self.fill_source.lock() {
            *kept = Some(client);
        }
    }

    /// Records the new progress in the batch's transaction and commits it.
    pub(crate) async fn commit(
        schema: &str,
        source: &str,
        transaction: &Client,
        progress: &Progress,
        source_time: &str,
    ) -> Result<(), Error> {
        let sql = format!(
            "UPDATE {schema}.progress SET mode = $2, snapshot = $3::text::pg_snapshot, \
             lsn = $4::text::pg_lsn, copy_snapshot = $5::text::pg_snapshot, system_id = $6, \
             timeline = $7, tables = $8, source_time = $9::text::timestamptz, \
             copy_lsn = $10::text::pg_lsn, applied_at = now() \
             WHERE source = $1"
        );
        let snapshot = progress.snapshot.as_ref().map(Snapshot::to_string);
        let lsn = progress.lsn.map(|p| p.to_string());
        let copy = progress.copy_snapshot.as_ref().map(Snapshot::to_string);
        let copy_lsn = progress.copy_lsn.map(|p| p.to_string());
        transaction
            .execute(
                &sql,
                &[
                    &source,
                    &progress.mode,
                    &snapshot,
                    &lsn,
                    &copy,
                    &progress.system_id,
                    &progress.timeline,
                    &progress.tables,
                    &source_time,
                    &copy_lsn,
                ],
            )
            .await
            .map_err(target_error)?;
        transaction
            .batch_execute("COMMIT")
            .await
            .map_err(target_error)
    }
}

/// Opens the target transaction of a batch and claims the batch: the progress row moves from
/// the batch this session read (`expected`) to the next, or another replicator got there first
/// and nothing is applied. The transaction stays open on `target` until [`Session::commit`]; if
/// anything fails before, the session ends and the connection's end rolls it back.
pub(crate) async fn claim(
    target: &Client,
    schema: &str,
    source: &str,
    expected: i64,
) -> Result<(), Error> {
    let sql =
        format!("UPDATE {schema}.progress SET batch = batch + 1 WHERE source = $1 AND batch = $2");
    target.batch_execute("BEGIN").await.map_err(target_error)?;
    let claimed = target
        .execute(&sql, &[&source, &expected])
        .await
        .map_err(target_error)?;
    if claimed != 1 {
        return Err(Error::new(ErrorKind::Sql).with_detail(format!(
            "another replicator applied batch {expected} to this target first; continuing from \
             what it applied"
        )));
    }
    Ok(())
}

/// Removes from the target's progress row the tables no longer configured, before the source
/// stops capturing them for this target (`logical` mode takes them out of the publication): a
/// table added back must be copied again, not resumed past the changes made while it was out.
/// Done as a claimed batch, so that a replicator still running with the old list cannot write
/// the old list back.
async fn forget_tables(
    target: &Client,
    schema: &str,
    source: &str,
    tables: &[TableInfo],
) -> Result<(), Error> {
    let progress = load_progress(target, schema, source).await?;
    let configured: Vec<String> = tables.iter().map(TableInfo::display).collect();
    let kept: Vec<&String> = progress
        .tables
        .iter()
        .filter(|t| configured.contains(t))
        .collect();
    if kept.len() == progress.tables.len() {
        return Ok(());
    }
    let schema = quote_ident(schema);
    claim(target, &schema, source, progress.batch).await?;
    target
        .execute(
            &format!("UPDATE {schema}.progress SET tables = $2 WHERE source = $1"),
            &[&source, &kept],
        )
        .await
        .map_err(target_error)?;
    target.batch_execute("COMMIT").await.map_err(target_error)
}

/// Reads the progress row, creating it (batch 0, nothing copied) for a new target.
pub(crate) async fn load_progress(
    target: &Client,
    schema: &str,
    source: &str,
) -> Result<Progress, Error> {
    let schema = quote_ident(schema);
    target
        .execute(
            &format!(
                "INSERT INTO {schema}.progress (source, mode, batch) VALUES ($1, '', 0) \
                 ON CONFLICT (source) DO NOTHING"
            ),
            &[&source],
        )
        .await
        .map_err(target_error)?;
    let row = target
        .query_one(
            &format!(
                "SELECT batch, mode, snapshot::text, lsn::text, copy_snapshot::text, system_id, \
                 timeline, tables, copy_lsn::text FROM {schema}.progress WHERE source = $1"
            ),
            &[&source],
        )
        .await
        .map_err(target_error)?;
    let snapshot = |text: Option<String>| text.as_deref().map(parse_snapshot).transpose();
    Ok(Progress {
        batch: row.get(0),
        mode: row.get(1),
        snapshot: snapshot(row.get(2))?,
        lsn: row
            .get::<_, Option<String>>(3)
            .map(|t| {
                t.parse::<Position>()
                    .map_err(|e| Error::mapping(e.to_string()))
            })
            .transpose()?,
        copy_snapshot: snapshot(row.get(4))?,
        system_id: row.get(5),
        timeline: row.get(6),
        tables: row.get(7),
        copy_lsn: row
            .get::<_, Option<String>>(8)
            .map(|t| {
                t.parse::<Position>()
                    .map_err(|e| Error::mapping(e.to_string()))
            })
            .transpose()?,
    })
}

/// What the loop shares with the actor: the status it reports.
#[derive(Debug)]
pub(crate) struct Shared {
    status: Mutex<ReplicationStatus>,
    /// When the target last reflected the source as it was (the start of the last batch that
    /// left nothing behind).
    pub(crate) reflects: Mutex<Option<Instant>>,
    /// The target refused a row inserted without looking for a conflict (somebody else wrote
    /// it there): every later batch upserts.
    pub(crate) always_upsert: AtomicBool,
    /// Fault injection for tests: the loop panics before its next commit on the target.
    #[cfg(feature = "testkit")]
    pub(crate) panic_before_commit: AtomicBool,
    /// When the running step last moved (see [`Shared::moved`]), in milliseconds since `born`.
    moved_at: AtomicU64,
    born: Instant,
}

impl Shared {
    pub(crate) fn new(status: ReplicationStatus) -> Shared {
        Shared {
            status: Mutex::new(status),
            reflects: Mutex::new(None),
            always_upsert: AtomicBool::new(false),
            moved_at: AtomicU64::new(0),
            born: Instant::now(),
            #[cfg(feature = "testkit")]
            panic_before_commit: AtomicBool::new(false),
        }
    }

    /// The running step moved: a chunk was applied, a copied row sent. A step that keeps
    /// moving is not hung, however long it takes (see [`watched`]).
    pub(crate) fn moved(&self) {
        let at = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved_at.store(at, Ordering::Relaxed);
    }

    /// How long since the running step last moved.
    fn still_for(&self) -> Duration {
        let moved = Duration::from_millis(self.moved_at.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(moved)
    }

    /// Called where a batch (or a copy) is about to commit on the target: panics there once
    /// when a test asked for it ([`Herd::inject_replicator_panic`](crate::Herd)).
    pub(crate) fn before_commit(&self) {
        #[cfg(feature = "testkit")]
        if self.panic_before_commit.swap(false, Ordering::SeqCst) {
            panic!("a panic injected before a batch's commit on the target (testkit)");
        }
    }

    /// Whether every later batch must upsert (see [`Shared::note_apply_error`]).
    pub(crate) fn always_upsert(&self) -> bool {
        self.always_upsert.load(Ordering::Relaxed)
    }

    /// Looks at an error of applying `changes` to `target`: when a row inserted without a
    /// conflict check was already there, later batches upsert.
    pub(crate) fn note_apply_error(
        &self,
        target: &str,
        changes: &TableChanges,
        error: &tokio_postgres::Error,
    ) {
        if changes.insert_refused(error) {
            tracing::warn!(
                target, %error,
                "a row inserted on the source is already on the target (written there by \
                 something else): upserting from now on"
            );
            self.always_upsert.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut ReplicationStatus)) {
        change(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Records what could not be guaranteed as the latest warning: once however often the step
    /// that found it runs again (it moves to the end), and only the latest [`WARNINGS_KEPT`].
    pub(crate) fn warn(&self, warning: String) {
        self.update(|status| {
            status.warnings.retain(|kept| *kept != warning);
            status.warnings.push(warning);
            let excess = status.warnings.len().saturating_sub(WARNINGS_KEPT);
            status.warnings.drain(..excess);
        });
    }

    pub(crate) fn status(&self) -> ReplicationStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        status.lag = self
            .reflects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|at| at.elapsed());
        status
    }

    pub(crate) fn reflects_from(&self, at: Instant) {
        *self.reflects.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
    }
}

/// Runs the target's loop until it is stopped by the policy (the actor's task is aborted to
/// stop it otherwise).
pub(crate) async fn run(spec: TargetSpec, shared: Arc<Shared>) {
    let wake = Arc::new(Notify::new());
    loop {
        let outcome = session(&spec, &shared, &wake).await;
        spec.forget_applied(&shared);
        match outcome {
            Ok(Ended::Stopped(reason)) => {
                tracing::error!(target = %spec.target, %reason, "replication to this target stopped");
                shared.update(|s| s.state = ReplicationState::Stopped(reason));
                return;
            }
            Ok(Ended::SourceMoved) => continue,
            // A pause, so that a table altered again and again cannot make sessions spin.
            Ok(Ended::Reopen) => tokio::time::sleep(spec.settings.poll_interval).await,
            Ok(Ended::Standby) => {
                shared.update(|s| s.state = ReplicationState::Standby);
                tokio::time::sleep(spec.settings.retry_interval).await;
            }
            Ok(Ended::NoPrimary) => {
                shared.update(|s| s.state = ReplicationState::WaitingForPrimary);
                tokio::time::sleep(spec.settings.poll_interval.max(Duration::from_millis(100)))
                    .await;
            }
            Err(error) => {
                tracing::warn!(target = %spec.target, %error, "replication step failed; retrying");
                shared.update(|s| {
                    s.state = ReplicationState::Retrying;
                    s.last_error = Some(error.to_string());
                    s.errors += 1;
                });
                tokio::time::sleep(spec.settings.retry_interval).await;
            }
        }
    }
}

#[derive(Debug)]
enum Ended {
    Stopped(String),
    /// Another replicator holds the target's lock.
    Standby,
    SourceMoved,
    /// The catalogs must be read again.
    Reopen,
    NoPrimary,
}

async fn session(
    spec: &TargetSpec,
    shared: &Arc<Shared>,
    wake: &Arc<Notify>,
) -> Result<Ended, Error> {
    let settings = &spec.settings;
    let opening = tokio::time::timeout(settings.step_timeout, open(spec, shared, wake));
    let mut session = match opening.await {
        Ok(Ok(Ok(session))) => session,
        Ok(Ok(Err(ended))) => return Ok(ended),
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return Err(Error::timeout(
                settings.step_timeout,
                "connecting and reading the catalogs (replicator.step_timeout)",
            ))
        }
    };
    let source_name = Arc::clone(&session.source_name);
    let mut wait = settings.poll_interval;
    loop {
        if spec.routing.primary_of(&spec.cluster).as_ref() != Some(&source_name) {
            tracing::info!(target = %spec.target, "the primary changed; following it");
            return Ok(Ended::SourceMoved);
        }
        // The target's lock lives as long as this connection. Once it is gone (the target
        // restarted, the backend was terminated; a network cut once TCP notices) another
        // replicator may hold the lock: this session must not go on acknowledging and
        // reporting as the active one, even while its steps find nothing to write there.
        if session.target.is_closed() {
            return Err(Error::new(ErrorKind::Connection)
                .with_endpoint(&spec.target)
                .with_detail(
                    "the connection to the target, which held the replicator's lock, ended; \
                 taking the lock again",
                ));
        }
        let started = Instant::now();
        let step = async {
            match settings.mode {
                CaptureMode::Trigger => trigger::step(&mut session).await,
                CaptureMode::Logical => logical::step(&mut session).await,
            }
        };
        let step = watched(settings.step_timeout, shared, step)
            .await
            .ok_or_else(|| {
                Error::timeout(
                    settings.step_timeout,
                    "a replication step waited for one statement on the primary or the target \
                     (replicator.step_timeout: how long a step may go without applying or \
                     copying anything)",
                )
            })?;
        // On an error the session ends: a new one re-reads the progress row (another replicator
        // may have applied the batch first) and the dropped connection rolls back what was begun.
        let applied = matches!(step, Ok(Step::Applied { rows, .. }) if rows > 0);
        match step? {
            Step::Stop(reason) => return Ok(Ended::Stopped(reason)),
            Step::Reopen(reason) => {
                tracing::info!(target = %spec.target, %reason, "opening a new session");
                return Ok(Ended::Reopen);
            }
            Step::Applied { rows, more } => {
                shared.update(|s| {
                    s.state = ReplicationState::Streaming;
                    s.batches += 1;
                    s.rows += rows;
                    s.batch = session.progress.batch;
                });
                if !more {
                    shared.reflects_from(started);
                }
                if more {
                    continue;
                }
            }
            Step::Again => continue,
            Step::Idle => {
                shared.update(|s| s.state = ReplicationState::Streaming);
                shared.reflects_from(started);
            }
        }
        let pause = next_pause(wait, applied, settings);
        wait = pause.length;
        if pause.interruptible {
            let _ = tokio::time::timeout(pause.length, wake.notified()).await;
        } else {
            tokio::time::sleep(pause.length).await;
        }
    }
}

/// How a session waits before its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pause {
    length: Duration,
    /// Whether a wake-up ends it early: a notification of the capture triggers, or changes
    /// arriving over `logical` mode's replication connection.
    interruptible: bool,
}

/// The pause before the next step, after a pause of `previous` before a step that `applied`
/// changes or did not.
///
/// After changes: `poll_after_changes`, which notifications do not shorten. More changes tend to
/// follow, and they are better gathered into the next batch than fetched by a step per
/// notification: in the replication benchmark at 1,000 transactions/s, `trigger` mode's primary
/// used a third of the CPU for a lag p99 of 19 ms instead of 10. This is also what keeps
/// `logical` mode's lag low when it peeks, with nothing to wake it.
///
/// After a step that found nothing: twice the previous pause, from `poll_after_changes` up to
/// `poll_interval`, and a wake-up ends it at once.
fn next_pause(previous: Duration, applied: bool, settings: &ReplicatorSettings) -> Pause {
    let soon = settings.poll_after_changes.min(settings.poll_interval);
    if applied {
        Pause {
            length: soon,
            interruptible: false,
        }
    } else {
        // From at least 1 ms, so that a `poll_after_changes` of 0 still backs off.
        let shortest = soon
            .max(Duration::from_millis(1))
            .min(settings.poll_interval);
        Pause {
            length: (previous * 2).clamp(shortest, settings.poll_interval),
            interruptible: true,
        }
    }
}

/// Connects to the target and takes its lock, then to the primary, and reads what the steps
/// need. Returns how it ended instead when there is nothing to do yet.
async fn open(
    spec: &TargetSpec,
    shared: &Arc<Shared>,
    wake: &Arc<Notify>,
) -> Result<Result<Session, Ended>, Error> {
    let settings = &spec.settings;
    let target = spec.connector.connect().await.map_err(target_error)?;
    target
        .batch_execute(&install::progress_sql(&settings.schema))
        .await
        .map_err(target_error)?;
    // One active replicator per target: the holder of this session lock, released when its
    // connection ends.
    {
        let locked: bool = target
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))",
                &[
                    &format!("{} replicator", settings.schema),
                    &spec.cluster.as_ref(),
                ],
            )
            .await
            .map_err(target_error)?
            .get(0);
        if !locked {
            return Ok(Err(Ended::Standby));
        }
    }
    let Some(source_name) = spec.routing.primary_of(&spec.cluster) else {
        return Ok(Err(Ended::NoPrimary));
    };
    let Some((_, connector)) = spec.sources.iter().find(|(name, _)| *name == source_name) else {
        return Ok(Err(Ended::NoPrimary));
    };
    let source = connector
        .connect()
        .await
        .map_err(|e| Error::from_postgres(e).with_endpoint(&source_name))?;
    // Values travel as text: both sides must write and read them the same way.
    for (client, endpoint) in [(&source, &source_name), (&target, &spec.target)] {
        client
            .batch_execute(SESSION_SETTINGS)
            .await
            .map_err(|e| Error::from_postgres(e).with_endpoint(endpoint))?;
    }
    target
        .batch_execute(DURABLE_COMMITS)
        .await
        .map_err(target_error)?;
    // Positions of another source mean nothing for this one: reads after a position wait
    // until a batch from this source is applied.
    spec.routing.forget_replicated(&spec.target);
    // Read before the catalogs: a change committed after it may use a column they do not show.
    let catalog_lsn: Position = source
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| Error::from_postgres(e).with_endpoint(&source_name))?
        .get::<_, String>(0)
        .parse()
        .map_err(|e: crate::PositionParseError| Error::mapping(e.to_string()))?;
    let tables = install::tables(&source, settings, &source_name).await?;
    forget_tables(&target, &settings.schema, &spec.cluster, &tables).await?;
    match settings.mode {
        CaptureMode::Trigger => {
            let uninstalled: Vec<TableInfo> = trigger::uninstalled(&source, settings, &tables)
                .await
                .map_err(|e| Error::from_postgres(e).with_endpoint(&source_name))?
                .into_iter()
                .map(|i| tables[i].clone())
                .collect();
            if !uninstalled.is_empty() {
                let names: Vec<String> = uninstalled.iter().map(TableInfo::display).collect();
                tracing::info!(target = %spec.target, tables = %names.join(", "),
                    "installing the capture triggers");
                install::install_triggers(&source, settings, &uninstalled)
                    .await
                    .map_err(|e| Error::from_postgres(e).with_endpoint(&source_name))?;
            }
        }
        CaptureMode::Logical => {
            install::install_publication(&source, settings, &spec.target, &tables, true)
                .await
                .map_err(|e| Error::from_postgres(e).with_endpoint(&source_name))?;
            // This process holds the target's lock, so whoever still reads the target's slot is
            // a session that lost its connection (or a replicator that lost the lock): end it,
            // or the slot stays busy until the server notices the dead client.
            let slot = install::publication(settings, &spec.target);
            source
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_catalog.pg_replication_slots \
                     WHERE slot_name = $1 AND active AND active_pid <> pg_backend_pid()",
                    &[&slot],
                )
                .await
                .map_err(|e| Error::from_postgres(e).with_endpoint(&source_name))?;
        }
    }
    let mut plans = Vec::with_capacity(tables.len());
    for table in &tables {
        let types = install::target_types(&target, table, &spec.target).await?;
        let mut plan = TableSql::new(table, &types);
        plan.truncate = install::emptying(&target, table).await?;
        plans.push(plan);
    }
    let progress = load_progress(&target, &settings.schema, &spec.cluster).await?;
    let listener = match (settings.mode, settings.notify) {
        (CaptureMode::Trigger, true) => connector
            .listen(&install::channel(&settings.schema), Arc::clone(wake))
            .await
            .ok(),
        _ => None,
    };
    shared.update(|s| {
        s.source = Some(Arc::clone(&source_name));
        s.last_error = None;
    });
    let session = Session {
        spec: spec.clone(),
        target,
        source,
        source_name: Arc::clone(&source_name),
        tables,
        catalog_lsn,
        plans,
        progress,
        shared: Arc::clone(shared),
        last_ack: None,
        last_cleanup: None,
        last_record: None,
        unrecorded: false,
        registered: false,
        _listener: listener,
        source_connector: Arc::clone(connector),
        fill_source: std::sync::Mutex::new(None),
        nudged: None,
        unacknowledged: false,
        uncleaned: false,
        wake: Arc::clone(wake),
        stream: None,
    };
    Ok(Ok(session))
}

/// Starts the read-only, repeatable-read transaction a batch or a copy reads the source in: its
/// snapshot is the one `pg_current_snapshot()` reports inside it.
///
/// `tables` are locked (`ACCESS SHARE`) before the snapshot is taken, as `pg_dump` does: a
/// table rewrite (`ALTER TABLE ... TYPE`, a `DEFAULT` computed per row) is not MVCC-safe, and
/// a snapshot taken before it commits sees the rewritten table empty. Read under such a
/// snapshot, a batch's keys would all become deletes and a copy would be empty, and the rewrite
/// fires no trigger and decodes to no change that would repair them. The lock waits for a
/// rewrite in progress to commit, and holds off the next one until the transaction ends.
pub(crate) async fn snapshot_transaction<'a>(
    source: &'a mut Client,
    tables: &[TableInfo],
) -> Result<Transaction<'a>, tokio_postgres::Error> {
    let transaction = source
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    if !tables.is_empty() {
        let names: Vec<String> = tables
            .iter()
            .map(|table| format!("ONLY {}", table.qualified()))
            .collect();
        transaction
            .batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                names.join(", ")
            ))
            .await?;
    }
    Ok(transaction)
}

/// A snapshot read from the server as text.
pub(crate) fn parse_snapshot(text: &str) -> Result<Snapshot, Error> {
    text.parse()
        .map_err(|e: super::snapshot::SnapshotParseError| Error::mapping(e.to_string()))
}

/// A failure on the target connection.
pub(crate) fn target_error(error: tokio_postgres::Error) -> Error {
    Error::from_postgres(error)
}

/// Runs `step` to its end, or until it has not moved (see [`Shared::moved`]) for `limit`
/// (`None`): a hung server is given up on, a long copy or backlog is not.
async fn watched<F: std::future::Future>(
    limit: Duration,
    shared: &Shared,
    step: F,
) -> Option<F::Output> {
    shared.moved();
    tokio::pin!(step);
    loop {
        let left = limit.saturating_sub(shared.still_for());
        if left.is_zero() {
            return None;
        }
        if let Ok(output) = tokio::time::timeout(left, step.as_mut()).await {
            return Some(output);
        }
    }
}

/// `COPY`s every row of `table` from the source transaction into the target transaction (after
/// emptying it there); every row sent is a move of the step (see [`Shared::moved`]).
pub(crate) async fn copy_table(
    source: &Transaction<'_>,
    target: &Client,
    table: &TableInfo,
    plan: &TableSql,
    shared: &Shared,
) -> Result<u64, Error> {
    use futures_util::{SinkExt as _, StreamExt as _};
    let columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let columns = columns.join(", ");
    target
        .batch_execute(&plan.truncate)
        .await
        .map_err(target_error)?;
    let out = source
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM ONLY {}) TO STDOUT",
            table.qualified()
        ))
        .await
        .map_err(Error::from_postgres)?;
    let sink = target
        .copy_in(&format!(
            "COPY {} ({columns}) FROM STDIN",
            table.qualified()
        ))
        .await
        .map_err(target_error)?;
    futures_util::pin_mut!(out);
    futures_util::pin_mut!(sink);
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(Error::from_postgres)?;
        sink.send(chunk).await.map_err(target_error)?;
        shared.moved();
    }
    sink.as_mut().finish().await.map_err(target_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_keep_the_latest_once_each() {
        let shared = Shared::new(ReplicationStatus::new(
            "reporting".into(),
            "main".into(),
            CaptureMode::Trigger,
        ));
        shared.warn("a".into());
        shared.warn("b".into());
        shared.warn("a".into());
        assert_eq!(shared.status().warnings, ["b", "a"]);
        for i in 0..WARNINGS_KEPT {
            shared.warn(i.to_string());
        }
        let warnings = shared.status().warnings;
        assert_eq!(warnings.len(), WARNINGS_KEPT);
        assert_eq!(warnings.first().map(String::as_str), Some("0"));
    }

    #[test]
    fn steps_come_soon_after_changes_and_back_off_to_the_poll_interval_when_idle() {
        let ms = Duration::from_millis;
        let mut settings = ReplicatorSettings {
            poll_interval: ms(50),
            poll_after_changes: ms(5),
            ..ReplicatorSettings::default()
        };
        // After changes: a short pause that notifications do not cut.
        let after_changes = Pause {
            length: ms(5),
            interruptible: false,
        };
        assert_eq!(next_pause(ms(50), true, &settings), after_changes);
        assert_eq!(next_pause(ms(5), true, &settings), after_changes);
        // While idle: doubling up to the poll interval, and a notification ends it.
        let mut wait = ms(5);
        let mut idle = Vec::new();
        for _ in 0..5 {
            let pause = next_pause(wait, false, &settings);
            assert!(pause.interruptible);
            wait = pause.length;
            idle.push(wait.as_millis());
        }
        assert_eq!(idle, [10, 20, 40, 50, 50]);
        // Equal intervals: a fixed poll.
        settings.poll_after_changes = ms(50);
        assert_eq!(next_pause(ms(50), true, &settings).length, ms(50));
        assert_eq!(next_pause(ms(50), false, &settings).length, ms(50));
    }
}
