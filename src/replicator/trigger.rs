//! `trigger` capture: statement-level triggers log the keys of changed rows, with their
//! transaction id, into a change table per replicated table; a batch is every key logged by a
//! transaction visible in the new snapshot and not in the previous one (PgQ's method), and the
//! rows are read again in the new snapshot, so that after the batch each table on the target is
//! exactly the primary's table as of that snapshot. A key whose row is gone becomes a delete.

use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use tokio_postgres::Client;

use super::{
    apply::{Key, Row, TableChanges, Text},
    catalog::{TableInfo, SHAPE_SQL},
    install::{self, TRIGGER_EVENTS},
    run::{
        claim, copy_table, parse_snapshot, snapshot_transaction, target_error, Identity, Progress,
        Session, Step,
    },
    snapshot::Snapshot,
};
use crate::{
    error::Error,
    position::Position,
    query::{position_of, POSITION_SQL},
    settings::{ReplicatorSettings, ResyncPolicy},
    sql::{quote_ident, quote_literal},
};

/// How often a target tells the primary how far it got (what cleanup may delete) after windows
/// with changes for it; after windows without, every `replicator.idle_ack_interval`.
const ACK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a target deletes change rows every target has applied.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// The names of the capture triggers.
fn trigger_names(settings: &ReplicatorSettings) -> Vec<String> {
    TRIGGER_EVENTS
        .iter()
        .map(|event| format!("{}_capture_{event}", settings.schema))
        .collect()
}

/// An expression of the tables named in `tables` (a `text[]` of qualified names) that lack one
/// of the enabled capture triggers named in `triggers`.
fn uncaptured_sql(tables: &str, triggers: &str) -> String {
    format!(
        "ARRAY(SELECT d.name FROM unnest({tables}::text[]) AS d(name) \
         WHERE (SELECT count(*) FROM pg_catalog.pg_trigger t WHERE t.tgrelid = to_regclass(d.name) \
         AND t.tgname = ANY({triggers}::text[]) AND t.tgenabled IN ('O', 'A')) <> {})",
        TRIGGER_EVENTS.len()
    )
}

/// The positions in `tables` of those whose trigger capture is not installed as it should be:
/// its five capture triggers, enabled; recorded as captured under its current oid; its change
/// table, with its key columns (no others: a key that lost columns is installed again) of the
/// types the keys have now; its capture functions running as their owner, and recording a
/// TRUNCATE's oid (functions of earlier versions are replaced, even after an install that
/// stopped part-way). Every table when the shared objects are missing. Only these are installed
/// again: installing locks each table against writes for a moment.
pub(crate) async fn uninstalled(
    source: &Client,
    settings: &ReplicatorSettings,
    tables: &[TableInfo],
) -> Result<Vec<usize>, tokio_postgres::Error> {
    let schema = quote_ident(&settings.schema);
    let shared = ["recopies", "captured", "truncations"].map(|t| format!("{schema}.{t}"));
    let complete: bool = source
        .query_one(
            "SELECT (SELECT count(to_regclass(t)) FROM unnest($1::text[]) AS t) = 3 \
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass($1[3]) \
               AND attname = 'relid' AND NOT attisdropped)",
            &[&shared.to_vec()],
        )
        .await?
        .get(0);
    if !complete {
        return Ok((0..tables.len()).collect());
    }
    let names: Vec<String> = tables.iter().map(TableInfo::qualified).collect();
    let displays: Vec<String> = tables.iter().map(TableInfo::display).collect();
    let logs: Vec<String> = tables
        .iter()
        .map(|table| install::change_table(&settings.schema, table))
        .collect();
    let [mut inserts, mut keys] = [Vec::new(), Vec::new()];
    for table in tables {
        let [insert, key] = install::capture_functions(&settings.schema, table);
        inserts.push(format!("{insert}()"));
        keys.push(format!("{key}()"));
    }
    // The change tables' key columns, with the types the keys have now, by table (from 1).
    let (mut key_tables, mut key_columns, mut key_types) = (Vec::new(), Vec::new(), Vec::new());
    for (i, table) in (1_i64..).zip(tables) {
        for column in table.key_columns() {
            key_tables.push(i);
            key_columns.push(column.name.clone());
            key_types.push(format!("{}[]", column.type_name));
        }
    }
    let rows = source
        .query(
            &format!(
                "SELECT d.i FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                   WITH ORDINALITY AS d(name, display, log, f1, f2, i) \
                 WHERE (SELECT count(*) FROM pg_catalog.pg_trigger t \
                     WHERE t.tgrelid = to_regclass(d.name) AND t.tgname = ANY($6::text[]) \
                     AND t.tgenabled IN ('O', 'A')) <> {events} \
                   OR to_regclass(d.log) IS NULL \
                   OR NOT EXISTS (SELECT 1 FROM {schema}.captured c \
                     WHERE c.tbl = d.display AND c.relid = to_regclass(d.name)) \
                   OR (SELECT count(*) FROM pg_catalog.pg_proc p WHERE p.prosecdef \
                     AND (p.oid = to_regprocedure(d.f2) OR p.oid = to_regprocedure(d.f1) \
                       AND p.prosrc LIKE '%TG_RELID%')) <> 2 \
                   OR (SELECT count(*) FROM unnest($7::int8[], $8::text[], $9::text[]) AS k(t, col, typ) \
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = to_regclass(d.log) \
                       AND a.attname = k.col AND NOT a.attisdropped \
                     WHERE k.t = d.i AND format_type(a.atttypid, a.atttypmod) = k.typ) \
                     <> (SELECT count(*) FROM unnest($7::int8[]) AS k(t) WHERE k.t = d.i) \
                   OR (SELECT count(*) FROM pg_catalog.pg_attribute a \
                     WHERE a.attrelid = to_regclass(d.log) AND a.attnum > 0 AND NOT a.attisdropped \
                       AND a.attname NOT IN ({own})) \
                     <> (SELECT count(*) FROM unnest($7::int8[]) AS k(t) WHERE k.t = d.i) \
                 ORDER BY d.i",
                events = TRIGGER_EVENTS.len(),
                own = install::change_table_columns_sql(),
            ),
            &[
                &names,
                &displays,
                &logs,
                &inserts,
                &keys,
                &trigger_names(settings),
                &key_tables,
                &key_columns,
                &key_types,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| usize::try_from(row.get::<_, i64>(0) - 1).ok())
        .collect())
}

/// Whether `txid` is of a transaction the previous snapshot (parameter `$1`) does not see: one
/// that began after it (at or above its xmax) or was running then (in its xip). Both branches
/// are index conditions, so a transaction left open for hours does not make every step read
/// every change row logged since it began.
fn unseen(txid: &str) -> String {
    unseen_by(txid, "$1")
}

/// [`unseen`], by the snapshot (as text) in parameter `snapshot`.
fn unseen_by(txid: &str, snapshot: &str) -> String {
    format!(
        "({txid} >= pg_snapshot_xmax({snapshot}::text::pg_snapshot) \
         OR {txid} = ANY(ARRAY(SELECT pg_snapshot_xip({snapshot}::text::pg_snapshot))))"
    )
}

/// The tables a step found replaced (`shape`, as [`SHAPE_SQL`] reads it, names another oid) or
/// without their capture triggers firing (`uncaptured`, qualified names): their writes may have
/// gone unlogged.
fn lost_capture<'a>(
    tables: &'a [TableInfo],
    shape: &[String],
    uncaptured: &[String],
) -> Vec<&'a TableInfo> {
    tables
        .iter()
        .zip(shape)
        .filter(|(table, shape)| {
            shape.split('/').next() != Some(table.oid.to_string().as_str())
                || uncaptured.contains(&table.qualified())
        })
        .map(|(table, _)| table)
        .collect()
}

/// A row of `truncations` or `recopies`: the table's name, and (`truncations`, since it records
/// it) its oid when the row was logged.
type Logged = (String, Option<u32>);

/// The rows `log` (`truncations` or `recopies` in `schema`, quoted) holds for the window after
/// `previous`.
async fn logged_tables(
    transaction: &tokio_postgres::Transaction<'_>,
    schema: &str,
    log: &str,
    previous: &Snapshot,
) -> Result<Vec<Logged>, tokio_postgres::Error> {
    let relid = if log == "truncations" {
        "relid"
    } else {
        "NULL::oid"
    };
    let sql = format!(
        "SELECT DISTINCT tbl, {relid} FROM {schema}.{log} WHERE {}",
        unseen("txid")
    );
    let rows = transaction.query(&sql, &[&previous.to_string()]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Whether `logged` names `table`: by oid where the row has one (a table renamed away and back
/// is the same table; another one under its name is not), else by name.
fn names(logged: &[Logged], table: &TableInfo) -> bool {
    logged.iter().any(|(name, relid)| match relid {
        Some(relid) => *relid == table.oid,
        None => *name == table.display(),
    })
}

/// The query that reads one table's changed keys and their rows as of the batch's snapshot:
/// the parameter is the previous snapshot.
fn dirty_sql(schema: &str, table: &TableInfo) -> String {
    let log = install::change_table(schema, table);
    let keys: Vec<String> = table.key_columns().map(|c| quote_ident(&c.name)).collect();
    let join: Vec<String> = keys.iter().map(|k| format!("t.{k} = k.{k}")).collect();
    let key_text: Vec<String> = keys.iter().map(|k| format!("k.{k}::text")).collect();
    let row_text: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(&c.name)))
        .collect();
    let arrays: Vec<String> = keys.iter().map(|k| format!("log.{k}")).collect();
    // Keys equal under the key's collation (a case-insensitive one) are one key: the join
    // below matches them to the same row, which the upsert could not take twice.
    let distinct: Vec<String> = table
        .key_columns()
        .zip(&keys)
        .map(|(column, k)| match &column.collation {
            Some(collation) => format!("k.{k} COLLATE {collation} AS {k}"),
            None => format!("k.{k}"),
        })
        .collect();
    format!(
        "SELECT t.{first} IS NULL, {}, {} FROM (SELECT DISTINCT {} FROM {log} AS log, unnest({}) AS k({}) \
         WHERE {}) AS k LEFT JOIN ONLY {} AS t ON {}",
        key_text.join(", "),
        row_text.join(", "),
        distinct.join(", "),
        arrays.join(", "),
        keys.join(", "),
        unseen("log.txid"),
        table.qualified(),
        join.join(" AND "),
        first = keys[0],
    )
}

/// Below this many changed keys a table's rows are always looked up through its primary key.
const SCAN_MIN_KEYS: i64 = 1_000;
/// A table is scanned (hash join) instead of probed key by key when it is at most this many
/// bytes per changed key: on this hardware one index probe costs about as much as scanning
/// 2–3 kB of table, so 1 kB leaves a margin for a table that is not cached.
const SCAN_BYTES_PER_KEY: i64 = 1_024;
/// The source session's `work_mem` for a step with many keys: the step de-duplicates them in
/// a hash table (per session, freed at the end of the step).
const STEP_WORK_MEM: &str = "64MB";

/// Whether a step that read `keys` changed keys of a table of `bytes` should read the rows by
/// scanning the table rather than by looking each key up. The planner cannot tell: it assumes
/// ten elements per unnested array, so without help it probes the index once per key even for
/// a bulk statement that changed the whole table (measured: 200,000 probes 0.9 s, a scan 0.4 s).
pub(crate) fn scan_the_table(keys: i64, bytes: i64) -> bool {
    keys >= SCAN_MIN_KEYS && bytes <= keys.saturating_mul(SCAN_BYTES_PER_KEY)
}

/// The query that reads, for each of `tables`, the number of keys logged in the window,
/// whether every one of them was logged by an INSERT, and the table's size in bytes (three
/// columns per table, one row). The parameter is as for [`dirty_sql`].
fn keys_sql(schema: &str, tables: &[&TableInfo]) -> String {
    let mut columns = Vec::with_capacity(tables.len());
    let mut windows = Vec::with_capacity(tables.len());
    for (index, table) in tables.iter().enumerate() {
        let log = install::change_table(schema, table);
        let first = quote_ident(&table.columns[table.key[0]].name);
        columns.push(format!(
            "w{index}.keys, w{index}.inserted, pg_relation_size({}::regclass)",
            quote_literal(&table.qualified())
        ));
        windows.push(format!(
            "(SELECT coalesce(sum(cardinality(log.{first})), 0)::int8 AS keys, \
             coalesce(bool_and(log.inserted), false) AS inserted FROM {log} AS log \
             WHERE {}) AS w{index}",
            unseen("log.txid")
        ));
    }
    format!("SELECT {} FROM {}", columns.join(", "), windows.join(", "))
}

/// How a step reads and applies one table's changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ReadPlan {
    /// Read the rows by scanning the table (see [`scan_the_table`]).
    scan: bool,
    /// Every key in the window was inserted by it, so none is on the target (which equals the
    /// source as of the previous snapshot): the rows are inserted without conflict checks.
    fresh: bool,
}

/// One step: read what changed since the target's snapshot and apply it in one target
/// transaction (or copy the tables the target does not have yet).
pub(crate) async fn step(s: &mut Session) -> Result<Step, Error> {
    let source_name = s.source_name.clone();
    let source_error =
        |e: tokio_postgres::Error| Error::from_postgres(e).with_endpoint(&source_name);
    let position = s
        .source
        .query_one(POSITION_SQL, &[])
        .await
        .map_err(source_error)?;
    let position = position_of(&position);
    let schema = s.schema();
    let transaction = snapshot_transaction(&mut s.source, &s.tables)
        .await
        .map_err(source_error)?;
    let row = transaction
        .query_one(
            &format!(
                "SELECT pg_current_snapshot()::text, now()::text, {}, \
                 (SELECT pg_snapshot_xmin(snapshot)::text FROM {schema}.consumers \
                  WHERE target = $1), {SHAPE_SQL}, {}",
                Identity::SQL,
                uncaptured_sql("$2", "$3"),
            ),
            &[
                &s.spec.target.as_ref(),
                &s.tables
                    .iter()
                    .map(TableInfo::qualified)
                    .collect::<Vec<_>>(),
                &trigger_names(&s.spec.settings),
            ],
        )
        .await
        .map_err(source_error)?;
    // Read under the tables' locks: a column added, or a table replaced, since the session read
    // the catalogs has committed, and the session reads them again before a row is read. Rows
    // changed since a column was added are read with it; a table replaced, or whose triggers
    // were dropped or disabled, is copied again.
    let shape: Vec<String> = row.get(5);
    let uncaptured: Vec<String> = row.get(6);
    let expected: Vec<String> = s.tables.iter().map(TableInfo::shape).collect();
    if shape != expected || !uncaptured.is_empty() {
        transaction.rollback().await.map_err(source_error)?;
        // A table replaced, or whose triggers were seen missing or not firing, is marked as
        // not captured: the install that follows records it to be copied again even if its
        // triggers are back by then (enabled again after a bulk load). Not when another
        // session's install has already recorded that since this step's snapshot (which
        // covers what went unlogged before it), or recorded the table under another oid.
        let lost = lost_capture(&s.tables, &shape, &uncaptured);
        if !lost.is_empty() {
            let names: Vec<String> = lost.iter().map(|table| table.display()).collect();
            let oids: Vec<u32> = lost.iter().map(|table| table.oid).collect();
            s.source
                .execute(
                    &format!(
                        "UPDATE {schema}.captured c SET relid = 0 \
                         FROM unnest($1::text[], $2::oid[]) AS d(tbl, relid) \
                         WHERE c.tbl = d.tbl AND c.relid = d.relid AND NOT EXISTS ( \
                           SELECT 1 FROM {schema}.recopies r WHERE r.tbl = d.tbl AND {})",
                        unseen_by("r.txid", "$3")
                    ),
                    &[&names, &oids, &row.get::<_, String>(0)],
                )
                .await
                .map_err(source_error)?;
        }
        return Ok(Step::Reopen(
            "a replicated table was altered, replaced, or lost its capture triggers".to_owned(),
        ));
    }
    let current: Snapshot = parse_snapshot(row.get(0))?;
    let source_time: String = row.get(1);
    let identity = Identity {
        system_id: row.get(2),
        timeline: row.get(3),
    };
    let settings = &s.spec.settings;
    let mut fresh = s.progress.mode != "trigger" || s.progress.snapshot.is_none();
    if fresh && !s.registered {
        transaction.rollback().await.map_err(source_error)?;
        register(s).await?;
        return Ok(Step::Again);
    }
    if !fresh {
        let went_back = went_back(s.progress.snapshot.as_ref(), row.get(4));
        if let Some(change) = identity.changed_from(&s.progress).or(went_back) {
            match settings.on_source_change {
                ResyncPolicy::Stop => {
                    return Ok(Step::Stop(format!(
                        "{change}; replicator.on_source_change = \"stop\": check the target, then \
                         set it to \"resync\" (or empty the target's progress row) to copy again"
                    )))
                }
                ResyncPolicy::Resync if !s.registered => {
                    tracing::warn!(target = %s.spec.target, %change, "copying every table again");
                    s.shared.warn(format!("{change}: copied again"));
                    transaction.rollback().await.map_err(source_error)?;
                    register(s).await?;
                    return Ok(Step::Again);
                }
                ResyncPolicy::Resync => fresh = true,
            }
        }
    }
    // Tables whose capture was installed again (triggers missing or not firing, or another
    // table under the name) in this window: their writes may not all have been logged.
    let recopied = match (&s.progress.snapshot, fresh) {
        (Some(previous), false) => logged_tables(&transaction, &schema, "recopies", previous)
            .await
            .map_err(source_error)?,
        _ => Vec::new(),
    };
    for table in &s.tables {
        if names(&recopied, table) && s.progress.tables.contains(&table.display()) {
            let table = table.display();
            let warning = format!(
                "the capture of {table} was installed again (its triggers were missing or not \
                 firing, another table took its name, or its primary key changed): writes may \
                 have gone unlogged or been logged under another key; copied again"
            );
            tracing::warn!(target = %s.spec.target, %warning);
            s.shared.warn(warning);
        }
    }
    let copy: Vec<usize> = (0..s.tables.len())
        .filter(|&i| {
            let table = &s.tables[i];
            fresh || !s.progress.tables.contains(&table.display()) || names(&recopied, table)
        })
        .collect();
    let previous = if fresh {
        None
    } else {
        s.progress.snapshot.clone()
    };
    if copy.is_empty() && previous.as_ref() == Some(&current) {
        transaction.commit().await.map_err(source_error)?;
        caught_up(s, position);
        acknowledge(s, &source_time).await?;
        // The target holds everything, but may claim only one byte less than `position` (see
        // `caught_up`): on a quiet primary whose last commit ends there, a read waiting for
        // that commit would wait until something else writes WAL. A record is written after
        // it (a logical message: no privilege, any `wal_level`, nothing to flush), and the
        // next step, at once, claims past it. Once per snapshot, which only a commit moves:
        // not again while quiet, nor for WAL that others write (another target's record, a
        // long index build). Only a help: where it fails (the function revoked), reads wait
        // for the next write.
        if position.is_some() && s.nudged.as_ref() != Some(&current) {
            let nudged = s
                .source
                .execute(
                    "SELECT pg_catalog.pg_logical_emit_message(false, 'pgherd', '')",
                    &[],
                )
                .await;
            s.nudged = Some(current);
            if let Err(error) = nudged {
                tracing::debug!(target = %s.spec.target, %error, "could not write a WAL record");
                return Ok(Step::Idle);
            }
            return Ok(Step::Again);
        }
        return Ok(Step::Idle);
    }
    if !copy.is_empty() {
        s.shared
            .update(|status| status.state = super::ReplicationState::Copying);
    }
    let truncated = match &previous {
        Some(previous) => logged_tables(&transaction, &schema, "truncations", previous)
            .await
            .map_err(source_error)?,
        None => Vec::new(),
    };
    let read_plans = match &previous {
        Some(previous) => {
            let streamed: Vec<&TableInfo> = s
                .tables
                .iter()
                .enumerate()
                .filter(|(i, _)| !copy.contains(i))
                .map(|(_, table)| table)
                .collect();
            let mut plans = plan_reads(&transaction, &settings.schema, &streamed, previous)
                .await
                .map_err(source_error)?;
            if s.shared.always_upsert() {
                plans.iter_mut().for_each(|(_, plan)| plan.fresh = false);
            }
            plans
        }
        None => Vec::new(),
    };
    // This window's rows are counted from nothing (a failed attempt's are not counted twice),
    // and the bytes from where the target's last window ended.
    let behind = position
        .zip(s.progress.lsn)
        .map(|(position, applied)| position.bytes_after(applied));
    s.shared.update(|status| {
        status.lag_rows = Some(0);
        status.lag_bytes = behind.or(status.lag_bytes);
    });
    let mut scanning = false;
    let mut claimed = false;
    let mut rows = 0;
    let expected = s.progress.batch;
    for (index, table) in s.tables.iter().enumerate() {
        let plan = &s.plans[index];
        if copy.contains(&index) {
            if !claimed {
                claim(&s.target, &schema, &s.spec.cluster, expected).await?;
                claimed = true;
            }
            rows += copy_table(&transaction, &s.target, table, plan, &s.shared).await?;
            continue;
        }
        let Some(previous) = &previous else { continue };
        let name = table.display();
        let read = read_plans
            .iter()
            .find(|(table, _)| *table == name)
            .map_or_else(ReadPlan::default, |(_, plan)| *plan);
        let scan = read.scan;
        if scan != scanning {
            let toggle = if scan { "off" } else { "on" };
            transaction
                .batch_execute(&format!("SET LOCAL enable_nestloop = {toggle}"))
                .await
                .map_err(source_error)?;
            scanning = scan;
        }
        let statement = dirty_sql(&settings.schema, table);
        let stream = transaction
            .query_raw(&statement, [previous.to_string()])
            .await
            .map_err(source_error)?;
        futures_util::pin_mut!(stream);
        let limits = (settings.batch_rows, settings.batch_bytes);
        let mut chunk = read_chunk(&mut stream, table, read.fresh, limits)
            .await
            .map_err(source_error)?;
        chunk.changes.truncate = names(&truncated, table);
        loop {
            s.shared.update(|status| {
                *status.lag_rows.get_or_insert(0) += chunk.changes.rows() as u64;
            });
            if chunk.changes.is_empty() {
                break;
            }
            if !claimed {
                claim(&s.target, &schema, &s.spec.cluster, expected).await?;
                claimed = true;
            }
            // The next chunk is read (and converted) while this one is applied: the primary
            // and this process work while the target does.
            let (applied, next) = if chunk.last {
                (plan.apply(&s.target, &chunk.changes).await, None)
            } else {
                let (applied, next) = futures_util::join!(
                    plan.apply(&s.target, &chunk.changes),
                    read_chunk(&mut stream, table, read.fresh, limits)
                );
                (applied, Some(next))
            };
            rows += applied.map_err(|error| {
                s.shared
                    .note_apply_error(&s.spec.target, &chunk.changes, &error);
                target_error(error)
            })?;
            s.shared.moved();
            match next {
                Some(next) => chunk = next.map_err(source_error)?,
                None => break,
            }
        }
    }
    let progress = Progress {
        batch: expected + i64::from(claimed),
        mode: "trigger".to_owned(),
        snapshot: Some(current),
        lsn: position.map(|p| Position::new(p.lsn().saturating_sub(1))),
        copy_snapshot: None,
        copy_lsn: None,
        system_id: Some(identity.system_id),
        timeline: Some(identity.timeline),
        tables: s.tables.iter().map(TableInfo::display).collect(),
    };
    if claimed {
        s.shared.before_commit();
        Session::commit(&schema, &s.spec.cluster, &s.target, &progress, &source_time).await?;
    }
    transaction.commit().await.map_err(source_error)?;
    // Nothing changed in the window: the target already equals the source at the new snapshot.
    s.progress = progress;
    s.unrecorded = !claimed;
    s.unacknowledged |= claimed;
    caught_up(s, position);
    acknowledge(s, &source_time).await?;
    Ok(if claimed {
        Step::Applied { rows, more: false }
    } else {
        Step::Idle
    })
}

/// One chunk of a table's changed rows, bounded in rows and bytes.
struct Chunk {
    changes: TableChanges,
    /// The table has no more changed rows in this step.
    last: bool,
}

/// Reads the next chunk of the dirty query's rows (see [`dirty_sql`]): a row whose key is
/// gone is a delete, any other an insert when the table's window only inserted (`fresh`),
/// else an upsert. At most `limits` rows and bytes.
async fn read_chunk<S>(
    stream: &mut std::pin::Pin<&mut S>,
    table: &TableInfo,
    fresh: bool,
    (max_rows, max_bytes): (usize, usize),
) -> Result<Chunk, tokio_postgres::Error>
where
    S: futures_util::Stream<Item = Result<tokio_postgres::Row, tokio_postgres::Error>>,
{
    let width = table.key.len();
    let mut changes = TableChanges::default();
    let mut bytes = 0;
    while changes.rows() < max_rows && bytes < max_bytes {
        let Some(row) = stream.try_next().await? else {
            return Ok(Chunk {
                changes,
                last: true,
            });
        };
        let gone: bool = row.get(0);
        if gone {
            let key: Key = (1..=width)
                .map(|i| Text::from(row.get::<_, String>(i)))
                .collect();
            bytes += key.iter().map(Text::len).sum::<usize>();
            changes.deletes.push(key);
        } else {
            let values: Row = (1 + width..row.len())
                .map(|i| row.get::<_, Option<String>>(i).map(Text::from))
                .collect();
            bytes += values.iter().flatten().map(Text::len).sum::<usize>();
            if fresh {
                changes.inserts.push(values);
            } else {
                changes.upserts.push(values);
            }
        }
    }
    Ok(Chunk {
        changes,
        last: false,
    })
}

/// Reads how many keys each of `tables` logged in the window and plans how each is read and
/// applied; raises the step's `work_mem` when any table has many keys.
async fn plan_reads(
    transaction: &tokio_postgres::Transaction<'_>,
    schema: &str,
    tables: &[&TableInfo],
    previous: &Snapshot,
) -> Result<Vec<(String, ReadPlan)>, tokio_postgres::Error> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let row = transaction
        .query_one(&keys_sql(schema, tables), &[&previous.to_string()])
        .await?;
    let mut plans = Vec::with_capacity(tables.len());
    let mut many = false;
    for (index, table) in tables.iter().enumerate() {
        let keys: i64 = row.get(3 * index);
        let inserted: bool = row.get(3 * index + 1);
        let bytes: i64 = row.get(3 * index + 2);
        many |= keys >= SCAN_MIN_KEYS;
        let plan = ReadPlan {
            scan: scan_the_table(keys, bytes),
            fresh: inserted,
        };
        if plan.scan {
            tracing::debug!(table = %table.display(), keys, bytes, "reading the changed rows by scanning the table");
        }
        plans.push((table.display(), plan));
    }
    if many {
        transaction
            .batch_execute(&format!("SET LOCAL work_mem = '{STEP_WORK_MEM}'"))
            .await?;
    }
    Ok(plans)
}

/// The target now holds every commit that was visible before `position` was read.
fn caught_up(s: &Session, position: Option<Position>) {
    if let Some(position) = position {
        // A write that read exactly this position may have become visible just after the
        // batch's snapshot: claim one byte less.
        let applied = Position::new(position.lsn().saturating_sub(1));
        s.shared.update(|status| {
            status.applied = Some(applied);
            status.lag_bytes = Some(0);
            status.lag_rows = Some(0);
        });
        s.spec.routing_feed(&s.source_name, applied);
    }
}

/// Before a copy: records on the primary a snapshot taken before the copy's, so that another
/// target's cleanup keeps every change the copy will not contain.
async fn register(s: &mut Session) -> Result<(), Error> {
    let schema = s.schema();
    s.source
        .execute(
            &format!(
                "INSERT INTO {schema}.consumers (target, snapshot) VALUES ($1, pg_current_snapshot()) \
                 ON CONFLICT (target) DO UPDATE SET snapshot = EXCLUDED.snapshot, updated_at = now()"
            ),
            &[&s.spec.target.as_ref()],
        )
        .await
        .map_err(|e| Error::from_postgres(e).with_endpoint(&s.source_name))?;
    s.registered = true;
    Ok(())
}

/// What a target whose progress row holds `recorded` lost, if its acknowledgement on the
/// primary (`acknowledged`, the xmin of the snapshot it last acknowledged) is past it: the
/// change rows below that were deleted, so the target went back in time (restored from a
/// backup, or failed over to a standby that lacked its last commits).
/// A target the primary has no acknowledgement of (`None`: its row deleted, as when a target
/// taken out of the settings is cleaned up, then listed again) went back too: the change rows
/// past its snapshot may have been deleted meanwhile.
fn went_back(recorded: Option<&Snapshot>, acknowledged: Option<String>) -> Option<String> {
    let recorded = recorded?;
    let Some(acknowledged) = acknowledged else {
        return Some(format!(
            "the target holds the source as of snapshot {recorded}, but the primary has no \
             acknowledgement of it (its row of the consumers table was deleted): the change rows \
             it needs may be deleted"
        ));
    };
    let acknowledged: u64 = acknowledged.parse().ok()?;
    (acknowledged > recorded.xmin()).then(|| {
        format!(
            "the target holds the source as of snapshot {recorded}, but it acknowledged one past \
             transaction {acknowledged}, whose change rows may be deleted: the target went back \
             (restored from a backup, or failed over to a standby that lacked its last commits)"
        )
    })
}

/// Tells the primary how far this target got, and deletes change rows every target has
/// applied (each at most every few seconds). A position reached without a batch is recorded on
/// the target first: the primary never hears of more than the target records, so that a target
/// found behind its acknowledgement is known to have gone back.
async fn acknowledge(s: &mut Session, source_time: &str) -> Result<(), Error> {
    let Some(snapshot) = s.progress.snapshot.as_ref().map(Snapshot::to_string) else {
        return Ok(());
    };
    let interval = if s.unacknowledged {
        ACK_INTERVAL
    } else {
        s.spec.settings.idle_ack_interval
    };
    let schema = s.schema();
    let source_name = s.source_name.clone();
    let source_error =
        |e: tokio_postgres::Error| Error::from_postgres(e).with_endpoint(&source_name);
    if s.last_ack.is_none_or(|at| at.elapsed() >= interval) {
        if s.unrecorded {
            claim(&s.target, &schema, &s.spec.cluster, s.progress.batch).await?;
            s.progress.batch += 1;
            Session::commit(
                &schema,
                &s.spec.cluster,
                &s.target,
                &s.progress,
                source_time,
            )
            .await?;
            s.unrecorded = false;
        }
        s.source
            .execute(
                &format!(
                    "INSERT INTO {schema}.consumers (target, snapshot) \
                     VALUES ($1, $2::text::pg_snapshot) ON CONFLICT (target) \
                     DO UPDATE SET snapshot = EXCLUDED.snapshot, updated_at = now()"
                ),
                &[&s.spec.target.as_ref(), &snapshot],
            )
            .await
            .map_err(source_error)?;
        s.last_ack = Some(Instant::now());
        s.unacknowledged = false;
        s.uncleaned = true;
    }
    // After an acknowledgement, once cleanup is due (deleting nothing writes nothing).
    if !s.uncleaned
        || s.last_cleanup
            .is_some_and(|at| at.elapsed() < CLEANUP_INTERVAL)
    {
        return Ok(());
    }
    let horizon = format!("(SELECT min(pg_snapshot_xmin(snapshot)) FROM {schema}.consumers)");
    let mut sql = format!(
        "DELETE FROM {schema}.truncations WHERE txid < {horizon};\
         DELETE FROM {schema}.recopies WHERE txid < {horizon};"
    );
    for table in &s.tables {
        let log = install::change_table(&s.spec.settings.schema, table);
        sql.push_str(&format!("DELETE FROM {log} WHERE txid < {horizon};"));
    }
    s.source.batch_execute(&sql).await.map_err(source_error)?;
    s.last_cleanup = Some(Instant::now());
    s.uncleaned = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::catalog::ColumnInfo;

    #[test]
    fn a_target_behind_its_acknowledgement_went_back() {
        let recorded = Snapshot::before(100);
        assert!(went_back(Some(&recorded), Some("120".to_owned())).is_some());
        assert!(went_back(Some(&recorded), Some("100".to_owned())).is_none());
        assert!(went_back(Some(&recorded), Some("90".to_owned())).is_none());
        // Nothing recorded: a first copy.
        assert!(went_back(None, Some("120".to_owned())).is_none());
        assert!(went_back(None, None).is_none());
        // Recorded, but no acknowledgement on the primary.
        assert!(went_back(Some(&recorded), None).is_some());
    }

    #[test]
    fn a_bulk_change_scans_the_table_and_a_few_keys_use_the_index() {
        // A bulk statement that changed a whole 15 MB table of 200,000 rows.
        assert!(scan_the_table(200_000, 15 << 20));
        // The same keys in a 10 GB table: probing stays cheaper.
        assert!(!scan_the_table(200_000, 10 << 30));
        // A few keys never scan, however small the table.
        assert!(!scan_the_table(10, 8_192));
        assert!(!scan_the_table(SCAN_MIN_KEYS - 1, 0));
        assert!(scan_the_table(
            SCAN_MIN_KEYS,
            SCAN_MIN_KEYS * SCAN_BYTES_PER_KEY
        ));
        assert!(!scan_the_table(
            SCAN_MIN_KEYS,
            SCAN_MIN_KEYS * SCAN_BYTES_PER_KEY + 1
        ));
        // No overflow for absurd counts.
        assert!(scan_the_table(i64::MAX, i64::MAX));
    }

    #[test]
    fn a_table_replaced_or_without_its_triggers_firing_lost_its_capture() {
        let table = |oid, name: &str| TableInfo {
            oid,
            schema: "public".to_owned(),
            name: name.to_owned(),
            columns: Vec::new(),
            key: Vec::new(),
            attnums: Vec::new(),
            dropped: Vec::new(),
            missing: Vec::new(),
            type_oids: Vec::new(),
            natts: 2,
        };
        let tables = [
            table(10, "a"),
            table(20, "b"),
            table(30, "c"),
            table(40, "d"),
        ];
        let shape = ["10/3", "21/2", "30/2", "-"].map(str::to_owned);
        // Qualified as the step passes them: `"public"."c"`.
        let uncaptured = [tables[2].qualified()];
        // A column added (`a`) is no loss; another oid (`b`), triggers not firing (`c`) and a
        // table gone (`d`) are.
        let lost: Vec<&str> = lost_capture(&tables, &shape, &uncaptured)
            .iter()
            .map(|table| table.name.as_str())
            .collect();
        assert_eq!(lost, ["b", "c", "d"]);
    }

    #[test]
    fn dirty_rows_are_read_by_key_in_the_batch_snapshot() {
        let table = TableInfo {
            oid: 0,
            schema: "public".to_owned(),
            name: "orders".to_owned(),
            columns: vec![
                ColumnInfo {
                    name: "region".to_owned(),
                    type_name: "text".to_owned(),
                    collation: None,
                },
                ColumnInfo {
                    name: "no".to_owned(),
                    type_name: "integer".to_owned(),
                    collation: None,
                },
                ColumnInfo {
                    name: "note".to_owned(),
                    type_name: "text".to_owned(),
                    collation: None,
                },
            ],
            key: vec![0, 1],
            attnums: vec![1, 2, 3],
            dropped: Vec::new(),
            missing: vec![None; 3],
            type_oids: vec![25, 23, 25],
            natts: 0,
        };
        assert_eq!(
            dirty_sql("pgherd", &table),
            "SELECT t.\"region\" IS NULL, k.\"region\"::text, k.\"no\"::text, t.\"region\"::text, \
             t.\"no\"::text, t.\"note\"::text FROM (SELECT DISTINCT k.\"region\", k.\"no\" FROM \
             \"pgherd\".\"public.orders\" AS log, unnest(log.\"region\", log.\"no\") AS k(\"region\", \"no\") \
             WHERE (log.txid >= pg_snapshot_xmax($1::text::pg_snapshot) OR log.txid = \
             ANY(ARRAY(SELECT pg_snapshot_xip($1::text::pg_snapshot))))) AS k LEFT JOIN ONLY \"public\".\"orders\" AS t ON t.\"region\" = k.\"region\" AND t.\"no\" = k.\"no\""
        );
    }
}
