//! `logical` capture: a `pgoutput` slot and publication per target, read over a replication
//! connection (`START_REPLICATION`, see [`super::stream`]) or, with `logical_stream = false`,
//! peeked over an ordinary connection with `pg_logical_slot_peek_binary_changes`; applied, and
//! only then advanced: the stream reports the position the target committed, a peek is followed
//! by `pg_replication_slot_advance` (`get_changes` would consume the changes even when the
//! apply fails).
//!
//! Transactions come in commit order; the changes of one step are folded per key (the last
//! change of a key wins) and applied set-based in one target transaction, with the end of the
//! last applied commit as the target's watermark. After a crash between the target's commit and
//! the slot's advance, commits at or below the watermark are skipped.

use std::collections::HashMap;

use indexmap::{map::Entry as Slot, IndexMap};

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use tokio_postgres::types::ToSql;

use super::{
    apply::{Fill, Key, Row, TableChanges, Text},
    catalog::TableInfo,
    install,
    pgoutput::{self, Message, Value},
    run::{
        claim, copy_table, parse_snapshot, snapshot_transaction, target_error, Identity, Progress,
        Session, Step,
    },
    snapshot::Snapshot,
    stream::{self, Frame, ReplicationStream, Wait},
};
use crate::{error::Error, position::Position, settings::ResyncPolicy, sql::quote_ident};

/// How often, at most, a step that passed only changes for other tables records the position
/// it reached on the target (what lets the slot move on).
const QUIET_RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The net change of one key within a step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Upsert(Row),
    Delete,
    /// Only the columns marked present are known (the others are unchanged TOAST values, or
    /// columns added to the table after the change was written).
    Partial(Vec<bool>, Row),
}

/// The net changes of one table, folded in commit order.
#[derive(Debug, Default)]
struct Pending {
    truncate: bool,
    /// Each key's net change, and whether its first change since the target's state was an
    /// INSERT (the key is then not on the target), in the order the keys first changed: the
    /// target then writes its rows in the source's order, which keeps its index and heap
    /// accesses close together (in hash order, upserting 10,000 updated rows took the target
    /// 90 to 150 ms instead of 60 to 100).
    entries: IndexMap<Key, (Entry, bool), foldhash::quality::RandomState>,
    /// Keys inserted by a change written before columns were added that PostgreSQL recorded no
    /// value of the time for, and those columns: read from the source (see `TableChanges::fill`).
    fill: HashMap<Key, Vec<usize>>,
}

impl Pending {
    fn into_changes(self) -> TableChanges {
        let mut changes = TableChanges {
            truncate: self.truncate,
            ..TableChanges::default()
        };
        let mut fill = Fill::default();
        for (key, (entry, inserted)) in self.entries {
            if let (Entry::Upsert(_), Some(columns)) = (&entry, self.fill.get(&key)) {
                let at = if inserted {
                    (false, changes.inserts.len())
                } else {
                    (true, changes.upserts.len())
                };
                fill.rows.push(at);
                for &column in columns {
                    if !fill.columns.contains(&column) {
                        fill.columns.push(column);
                    }
                }
            }
            match entry {
                Entry::Upsert(row) if inserted => changes.inserts.push(row),
                Entry::Upsert(row) => changes.upserts.push(row),
                Entry::Delete => changes.deletes.push(key),
                Entry::Partial(present, row) => {
                    changes.updates.entry(present).or_default().push(row)
                }
            }
        }
        if !fill.rows.is_empty() {
            changes.fill = Some(fill);
        }
        changes
    }
}

/// A primary-key change whose new row misses an unchanged TOAST value: applied on its own, on
/// the row as the target has it, after everything folded before it.
#[derive(Debug)]
struct Move {
    table: usize,
    old_key: Key,
    present: Vec<bool>,
    row: Row,
    /// Written before columns were added: the target's row under the old key may hold, for
    /// them, values read from another row of the source that had that key since.
    older: bool,
}

/// The relations a stream announced, by id. A replication connection sends each one once, so
/// the map lives as long as the connection; a peek sends them again every time.
pub(crate) type Relations = HashMap<u32, Mapping>;

/// How a relation of the stream maps onto a replicated table.
#[derive(Debug)]
pub(crate) struct Mapping {
    table: usize,
    /// For each column of the stream, its position in the table's columns.
    columns: Vec<Option<usize>>,
    /// Every column of the table is in the stream.
    covers_table: bool,
}

impl Mapping {
    /// Whether `tuple` holds a value for every column of the table (no unchanged TOAST value).
    fn whole(&self, tuple: &[Value]) -> bool {
        self.covers_table && !tuple.iter().any(|v| matches!(v, Value::UnchangedToast))
    }
}

/// Places the columns of a `Relation` sent with a change older than the catalogs (`columns`:
/// name and type of the table's columns at the time, in order) onto the table's current
/// columns: by name, and a name the table no longer has belongs to a column dropped or renamed
/// since. Columns keep their numbers and added ones get higher numbers, so every current column
/// numbered below a column of the change existed then and is in it. Between two columns found
/// by name, the unknown names are
/// - renamed columns, in order, when no column was dropped there: the columns there that the
///   change does not name;
/// - dropped columns, when every column there is named.
///
/// After the last one found, current columns not named were added since or renamed: the first
/// ones are the renamed columns when none was dropped there; when some were dropped and no
/// unknown name has the type of a column not named, the unknown ones were dropped.
///
/// Anything else (a rename next to a drop, a column that took another's name) cannot be told
/// apart and is an error, rather than a value written to the wrong column or lost.
fn place_columns(table: &TableInfo, columns: &[(&str, u32)]) -> Result<Vec<Option<usize>>, String> {
    let mut placed: Vec<Option<usize>> = columns
        .iter()
        .map(|(name, _)| table.columns.iter().position(|c| c.name == *name))
        .collect();
    let found: Vec<i16> = placed.iter().flatten().map(|&c| table.attnums[c]).collect();
    if found.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(
            "its columns come in another order than the table's (columns swapped their \
                    names since)"
                .to_owned(),
        );
    }
    let by_name = placed.clone();
    let mut low = 0_i16;
    let mut from = 0;
    loop {
        let next = (from..columns.len()).find(|&i| by_name[i].is_some());
        let high = next.and_then(|i| by_name[i]).map(|c| table.attnums[c]);
        let between = |attnum: i16| attnum > low && high.is_none_or(|high| attnum < high);
        let unknown: Vec<usize> = (from..next.unwrap_or(columns.len())).collect();
        let unnamed: Vec<usize> = (0..table.columns.len())
            .filter(|&c| between(table.attnums[c]) && !by_name.contains(&Some(c)))
            .collect();
        let dropped = table.dropped.iter().filter(|&&a| between(a)).count();
        let renamed = if next.is_some() {
            unknown.len() == unnamed.len() && dropped == 0
        } else {
            unknown.len() <= unnamed.len() && dropped == 0
        };
        let unnamed_type =
            |&at: &usize| unnamed.iter().any(|&c| table.type_oids[c] == columns[at].1);
        let all_dropped = unknown.len() <= dropped
            && (unnamed.is_empty() || next.is_none() && !unknown.iter().any(unnamed_type));
        if unknown.is_empty() && next.is_some() && !unnamed.is_empty() {
            return Err(format!(
                "a column of the change now named otherwise, and `{}` named after it since",
                table.columns[unnamed[0]].name
            ));
        }
        if renamed {
            for (&at, &column) in unknown.iter().zip(&unnamed) {
                placed[at] = Some(column);
            }
        } else if !unknown.is_empty() && !all_dropped {
            let list: Vec<String> = unknown
                .iter()
                .map(|&i| format!("`{}`", columns[i].0))
                .collect();
            return Err(format!(
                "its column(s) {} were renamed or dropped since, next to another rename or \
                 drop, and cannot be told apart",
                list.join(", ")
            ));
        }
        match (next, high) {
            (Some(i), Some(high)) => {
                low = high;
                from = i + 1;
            }
            _ => break,
        }
    }
    Ok(placed)
}

/// Folds decoded changes, table by table.
#[derive(Debug)]
struct Folder<'a> {
    tables: &'a [TableInfo],
    /// Rows of keys first inserted in this step are inserted without a conflict check.
    plain_inserts: bool,
    relations: HashMap<u32, Mapping>,
    pending: Vec<Pending>,
    rows: usize,
    /// The size of the messages folded since the last `take`: folded rows share their bytes,
    /// so this bounds the memory they hold.
    bytes: usize,
    /// The transaction being read committed after the session read the tables' descriptions
    /// from the catalogs.
    recent: bool,
}

impl<'a> Folder<'a> {
    fn new(tables: &'a [TableInfo], plain_inserts: bool) -> Folder<'a> {
        Folder {
            tables,
            plain_inserts,
            relations: HashMap::new(),
            pending: tables.iter().map(|_| Pending::default()).collect(),
            rows: 0,
            bytes: 0,
            recent: true,
        }
    }

    /// Maps a `Relation` message to a replicated table: by oid (a table renamed since, or at the
    /// time of the change, is still the same table), else by name. A column the table's
    /// description lacks is one added since the catalogs were read when the transaction is
    /// `recent` (the session must read them again, or its values would be lost); in an older
    /// transaction, one dropped or renamed since (see [`place_columns`]).
    fn describe(&mut self, relation: pgoutput::Relation) -> Result<(), Error> {
        let table = self
            .tables
            .iter()
            .position(|t| t.oid == relation.id)
            .or_else(|| {
                self.tables
                    .iter()
                    .position(|t| t.schema == relation.namespace && t.name == relation.name)
            });
        let Some(table) = table else {
            self.relations.remove(&relation.id);
            return Ok(());
        };
        let info = &self.tables[table];
        let names: Vec<(&str, u32)> = relation
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_id))
            .collect();
        let columns = if self.recent {
            let columns: Vec<Option<usize>> = names
                .iter()
                .map(|(name, _)| info.columns.iter().position(|t| t.name == *name))
                .collect();
            if let Some(((unknown, _), _)) = names.iter().zip(&columns).find(|(_, at)| at.is_none())
            {
                return Err(Error::mapping(format!(
                    "table {} has a column `{unknown}` that this session did not read from the \
                     primary's catalogs (it was added since): reading them again",
                    info.display(),
                )));
            }
            columns
        } else {
            place_columns(info, &names).map_err(|why| {
                Error::mapping(format!(
                    "a change of table {} written before its columns changed cannot be \
                     replicated: {why}; to go on, take the table out of replicator.tables and \
                     list it again (it is then copied anew)",
                    info.display()
                ))
            })?
        };
        // The WAL holds the old key of an update or delete only for the replica identity's
        // columns: it must hold the primary key (set otherwise since the session started).
        let identified = info.key.iter().all(|k| {
            columns
                .iter()
                .zip(&relation.columns)
                .any(|(at, column)| *at == Some(*k) && column.key)
        });
        if !identified {
            return Err(Error::mapping(format!(
                "table {} was given a replica identity without its primary key (REPLICA \
                 IDENTITY NOTHING, or USING INDEX of other columns): the old keys of its updates \
                 and deletes are not in the WAL; run ALTER TABLE {} REPLICA IDENTITY DEFAULT, \
                 then take the table out of replicator.tables and list it again (it is then \
                 copied anew)",
                info.display(),
                info.qualified()
            )));
        }
        let width = info.columns.len();
        let covers_table = (0..width).all(|i| columns.contains(&Some(i)));
        self.relations.insert(
            relation.id,
            Mapping {
                table,
                columns,
                covers_table,
            },
        );
        Ok(())
    }

    /// A row of the stream in the table's column order; `present`, when given, is set to which
    /// columns came (an unchanged TOAST value does not).
    fn row(
        &self,
        mapping: &Mapping,
        tuple: Vec<Value>,
        mut present: Option<&mut Vec<bool>>,
    ) -> Result<Row, Error> {
        let width = self.tables[mapping.table].columns.len();
        let mut row = vec![None; width];
        if let Some(present) = present.as_deref_mut() {
            present.clear();
            present.resize(width, false);
        }
        for (value, column) in tuple.into_iter().zip(&mapping.columns) {
            let Some(column) = *column else { continue };
            let came = match value {
                Value::Null => true,
                Value::Text(text) => {
                    row[column] = Some(text);
                    true
                }
                Value::UnchangedToast => false,
                Value::Binary(_) => {
                    return Err(Error::mapping(
                        "pgoutput sent a binary value without being asked to",
                    ))
                }
            };
            if let Some(present) = present.as_deref_mut() {
                present[column] = came;
            }
        }
        Ok(row)
    }

    fn key(&self, table: usize, row: &Row) -> Result<Key, Error> {
        self.tables[table]
            .key
            .iter()
            .map(|&i| {
                row[i].clone().ok_or_else(|| {
                    Error::mapping(format!(
                        "a change of {} came without its primary key column `{}`: its replica \
                         identity must be the primary key (the default) or FULL",
                        self.tables[table].display(),
                        self.tables[table].columns[i].name
                    ))
                })
            })
            .collect()
    }

    /// Records `entry` as the net change of `key`; `inserted` when the change is an INSERT.
    fn set(&mut self, table: usize, key: Key, entry: Entry, inserted: bool) {
        match self.pending[table].entries.entry(key) {
            Slot::Occupied(mut occupied) => occupied.get_mut().0 = entry,
            Slot::Vacant(vacant) => {
                vacant.insert((entry, inserted && self.plain_inserts));
                self.rows += 1;
            }
        }
    }

    /// Folds one decoded message of a transaction that is applied. A key change that cannot be
    /// folded is returned instead, to be applied on its own.
    fn fold(&mut self, message: Message) -> Result<Option<Move>, Error> {
        match message {
            Message::Relation(relation) => self.describe(relation)?,
            Message::Insert { relation, new } => {
                let Some(mapping) = self.relations.get(&relation) else {
                    return Ok(None);
                };
                let table = mapping.table;
                let mut row = self.row(mapping, new, None)?;
                let mut unknown = Vec::new();
                if !mapping.covers_table {
                    // Written before these columns were added: on the source the row holds
                    // what the rows of that time got when they were: the default they were
                    // added with, which PostgreSQL records unless the table was rewritten since
                    // (or the default was computed per row); else it is read from the source.
                    let info = &self.tables[table];
                    for (i, value) in row.iter_mut().enumerate() {
                        if !mapping.columns.contains(&Some(i)) {
                            *value = info.missing[i].as_deref().map(Text::from);
                            if value.is_none() {
                                unknown.push(i);
                            }
                        }
                    }
                }
                let key = self.key(table, &row)?;
                if !unknown.is_empty() {
                    let columns = self.pending[table].fill.entry(key.clone()).or_default();
                    for column in unknown {
                        if !columns.contains(&column) {
                            columns.push(column);
                        }
                    }
                }
                self.set(table, key, Entry::Upsert(row), true);
            }
            Message::Update {
                relation,
                old,
                old_is_key_only,
                new,
            } => {
                let Some(mapping) = self.relations.get(&relation) else {
                    return Ok(None);
                };
                let table = mapping.table;
                let older = !mapping.covers_table;
                // Which columns came is tracked only when some did not.
                let whole = mapping.whole(&new);
                let mut present = Vec::new();
                let mut row = self.row(mapping, new, (!whole).then_some(&mut present))?;
                let old = match old {
                    Some(old) => {
                        let mut old_present = Vec::new();
                        let tracked = (!whole && !old_is_key_only).then_some(&mut old_present);
                        Some((self.row(mapping, old, tracked)?, old_present))
                    }
                    None => None,
                };
                // A key column stored out of line and left unchanged comes as an unchanged TOAST
                // value; the server then sends the old key, which always holds it.
                if let Some((old_row, _)) = &old {
                    for &i in &self.tables[table].key {
                        if row[i].is_none() {
                            row[i].clone_from(&old_row[i]);
                            if let Some(came) = present.get_mut(i) {
                                *came = old_row[i].is_some();
                            }
                        }
                    }
                }
                let key = self.key(table, &row)?;
                let old_key = match &old {
                    Some((old_row, _)) => Some(self.key(table, old_row)?).filter(|k| *k != key),
                    None => None,
                };
                // Unchanged TOAST values: take them from the old image when it is the whole row
                // (REPLICA IDENTITY FULL; a key-only image has NULL in the other columns), or
                // from an earlier change of this step.
                let partial = old.as_ref().filter(|_| !whole && !old_is_key_only);
                if let Some((old_row, old_present)) = partial {
                    for i in 0..row.len() {
                        if !present[i] && old_present[i] && !self.tables[table].key.contains(&i) {
                            row[i].clone_from(&old_row[i]);
                            present[i] = true;
                        }
                    }
                }
                if !whole && present.iter().any(|p| !p) {
                    let earlier = self.pending[table]
                        .entries
                        .get(old_key.as_ref().unwrap_or(&key))
                        .map(|(entry, _)| entry);
                    match earlier {
                        Some(Entry::Upsert(previous)) => {
                            for i in 0..row.len() {
                                if !present[i] {
                                    row[i].clone_from(&previous[i]);
                                    present[i] = true;
                                }
                            }
                        }
                        Some(Entry::Partial(previous_present, previous)) => {
                            for i in 0..row.len() {
                                if !present[i] && previous_present[i] {
                                    row[i].clone_from(&previous[i]);
                                    present[i] = true;
                                }
                            }
                        }
                        Some(Entry::Delete) | None => {}
                    }
                }
                let complete = whole || present.iter().all(|p| *p);
                if let Some(old_key) = old_key {
                    if !complete {
                        return Ok(Some(Move {
                            table,
                            old_key,
                            present,
                            row,
                            older,
                        }));
                    }
                    // The row moves to its new key, with what it still lacks.
                    if let Some(columns) = self.pending[table].fill.remove(&old_key) {
                        self.pending[table].fill.insert(key.clone(), columns);
                    }
                    self.set(table, old_key, Entry::Delete, false);
                }
                let entry = if complete {
                    Entry::Upsert(row)
                } else {
                    Entry::Partial(present, row)
                };
                self.set(table, key, entry, false);
            }
            Message::Delete { relation, old, .. } => {
                let Some(mapping) = self.relations.get(&relation) else {
                    return Ok(None);
                };
                let table = mapping.table;
                let row = self.row(mapping, old, None)?;
                let key = self.key(table, &row)?;
                self.set(table, key, Entry::Delete, false);
            }
            Message::Truncate { relations, .. } => {
                for relation in relations {
                    if let Some(mapping) = self.relations.get(&relation) {
                        let pending = &mut self.pending[mapping.table];
                        self.rows -= pending.entries.len();
                        *pending = Pending {
                            truncate: true,
                            ..Pending::default()
                        };
                    }
                }
            }
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Origin { .. }
            | Message::Type { .. }
            | Message::Message { .. } => {}
        }
        Ok(None)
    }

    /// Takes everything folded so far.
    fn take(&mut self) -> Vec<TableChanges> {
        self.rows = 0;
        self.bytes = 0;
        self.pending
            .iter_mut()
            .map(|pending| {
                // A table that filled this chunk likely fills the next: room for as many keys
                // saves growing the map (and hashing every key again) step by step.
                let room = Pending {
                    entries: IndexMap::with_capacity_and_hasher(
                        pending.entries.len(),
                        foldhash::quality::RandomState::default(),
                    ),
                    ..Pending::default()
                };
                std::mem::replace(pending, room).into_changes()
            })
            .collect()
    }
}

/// Where a step's decoded messages come from.
enum Changes<'a, S> {
    /// The rows of a peek.
    Peek(std::pin::Pin<&'a mut S>),
    /// What the replication stream already holds; a transaction that has begun is read to its
    /// commit.
    Stream {
        stream: &'a mut ReplicationStream,
        /// Messages after which the step ends at the next commit.
        limit: usize,
        /// The walsender had sent every commit before this when the step last was between
        /// transactions.
        sent: Option<Position>,
        /// The step ended at `limit`, not because nothing more was there.
        full: bool,
    },
}

impl<S> Changes<'_, S>
where
    S: futures_util::Stream<Item = Result<tokio_postgres::Row, tokio_postgres::Error>>,
{
    async fn next(
        &mut self,
        reading: &Reading,
        source_error: &impl Fn(tokio_postgres::Error) -> Error,
    ) -> Result<Option<Bytes>, Error> {
        match self {
            // One copy per message, which the folded values then share.
            Changes::Peek(rows) => Ok(rows
                .try_next()
                .await
                .map_err(source_error)?
                .map(|row| Bytes::copy_from_slice(row.get(0)))),
            Changes::Stream {
                stream,
                limit,
                sent,
                full,
            } => loop {
                let inside = reading.inside;
                if !inside && reading.changes >= *limit {
                    *full = true;
                    return Ok(None);
                }
                let wait = if inside { Wait::Yes } else { Wait::No };
                match stream.next(wait).await? {
                    None => return Ok(None),
                    Some(Frame::Data(bytes)) => return Ok(Some(bytes)),
                    Some(Frame::Sent(end)) if !inside => {
                        *sent = Some(sent.map_or(end, |sent| sent.max(end)));
                    }
                    Some(Frame::Sent(_)) => {}
                }
            },
        }
    }
}

/// Where a step is in the stream of a peek.
struct Reading {
    /// The end of the last commit the target holds.
    watermark: Position,
    /// Transactions visible in this snapshot and committed before `copy_lsn` came with the copy.
    copy_snapshot: Option<Snapshot>,
    copy_lsn: Position,
    /// `batch_rows` and `batch_bytes`: the size of a chunk.
    limits: (usize, usize),
    /// The current source transaction is already on the target.
    skip: bool,
    /// The end of the last commit read.
    last_commit: Option<Position>,
    /// Messages read.
    changes: usize,
    /// Between the begin and the commit of a transaction.
    inside: bool,
    /// The primary's WAL position before the session read its catalogs.
    catalog_lsn: Position,
}

/// What ended a chunk of the stream.
enum ChunkEnd {
    /// The folded changes reached `batch_rows` or `batch_bytes`.
    Full,
    /// The peek has nothing more.
    Drained,
    /// A key change to apply on its own, after what was folded before it.
    Move(Move),
}

/// Reads and folds the peek's messages until the folded changes fill a chunk, the peek ends,
/// or a key change must be applied on its own.
/// Each message read is a move of the step (see `Shared::moved`): replaying a long stretch the
/// target already has applies nothing, and is not a hang.
async fn fold_chunk<S>(
    changes: &mut Changes<'_, S>,
    folder: &mut Folder<'_>,
    reading: &mut Reading,
    shared: &super::run::Shared,
    source_error: impl Fn(tokio_postgres::Error) -> Error,
) -> Result<ChunkEnd, Error>
where
    S: futures_util::Stream<Item = Result<tokio_postgres::Row, tokio_postgres::Error>>,
{
    let (max_rows, max_bytes) = reading.limits;
    while let Some(data) = changes.next(reading, &source_error).await? {
        shared.moved();
        reading.changes += 1;
        let message = pgoutput::parse(&data).map_err(|e| Error::mapping(e.to_string()))?;
        match &message {
            Message::Begin { final_lsn, xid, .. } => {
                reading.inside = true;
                folder.recent = *final_lsn >= reading.catalog_lsn.lsn();
                let seen = *final_lsn < reading.watermark.lsn();
                let copied = *final_lsn < reading.copy_lsn.lsn()
                    && reading
                        .copy_snapshot
                        .as_ref()
                        .is_some_and(|snapshot| snapshot.visible(snapshot.widen(*xid)));
                reading.skip = seen || copied;
            }
            Message::Commit { end_lsn, .. } => {
                reading.inside = false;
                reading.last_commit = Some(Position::new(*end_lsn));
            }
            // Relations are needed even for skipped transactions: they are sent once.
            Message::Relation(_) => {
                folder.fold(message)?;
            }
            _ if reading.skip => {}
            _ => {
                folder.bytes += data.len();
                if let Some(moved) = folder.fold(message)? {
                    return Ok(ChunkEnd::Move(moved));
                }
            }
        }
        if folder.rows >= max_rows || folder.bytes >= max_bytes {
            return Ok(ChunkEnd::Full);
        }
    }
    Ok(ChunkEnd::Drained)
}

/// The ids of the transactions running on `client`'s server, as text: each holds the lock of
/// its own id until it has ended for every snapshot.
async fn running_xids(
    client: &tokio_postgres::Client,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT coalesce(array_agg(transactionid::text), '{}') FROM pg_catalog.pg_locks \
             WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted",
            &[],
        )
        .await?
        .get(0))
}

/// A new connection to the source for [`fill_from_source`], set up as the session's others.
async fn open_fill_source(s: &Session) -> Result<tokio_postgres::Client, Error> {
    let source_error = |e| Error::from_postgres(e).with_endpoint(&s.source_name);
    let source = s.source_connector.connect().await.map_err(source_error)?;
    source
        .batch_execute(super::run::SESSION_SETTINGS)
        .await
        .map_err(source_error)?;
    Ok(source)
}

/// Reads from the source the values `changes.fill` asks for. The source's current row may be
/// newer than the change: every change after it comes later in the stream and is applied after
/// it, so the target ends up with the source's row all the same. A row the source no longer has
/// under its key is not written (and an older row under that key on the target is deleted): its
/// delete, or the change of its key, comes later. On a connection of its own, kept by the
/// session: the session's may be streaming a peek.
async fn fill_from_source(
    s: &Session,
    table: &TableInfo,
    changes: &mut TableChanges,
) -> Result<(), Error> {
    let Some(fill) = changes.fill.take() else {
        return Ok(());
    };
    let source_error = |e| Error::from_postgres(e).with_endpoint(&s.source_name);
    let kept = s.take_fill_source().filter(|source| !source.is_closed());
    let reused = kept.is_some();
    let source = match kept {
        Some(source) => source,
        None => open_fill_source(s).await?,
    };
    let row_at = |(upsert, i): (bool, usize)| -> &Row {
        if upsert {
            &changes.upserts[i]
        } else {
            &changes.inserts[i]
        }
    };
    // Each key as its values came in the stream, one array per key column, matched back by
    // position (their text may differ from what `::text` gives on the source).
    let keys: Vec<Vec<Option<Text>>> = table
        .key
        .iter()
        .map(|&k| fill.rows.iter().map(|&at| row_at(at)[k].clone()).collect())
        .collect();
    let quoted = |i: usize| quote_ident(&table.columns[i].name);
    let join: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(n, &k)| format!("t.{} = u.c{n}::{}", quoted(k), table.columns[k].type_name))
        .collect();
    let arrays: Vec<String> = (1..=table.key.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..table.key.len()).map(|n| format!("c{n}")).collect();
    let read: Vec<String> = fill
        .columns
        .iter()
        .map(|&i| format!(", t.{}::text", quoted(i)))
        .collect();
    let sql = format!(
        "SELECT u.i{} FROM unnest({}) WITH ORDINALITY AS u({}, i) JOIN ONLY {} AS t ON {}",
        read.concat(),
        arrays.join(", "),
        aliases.join(", "),
        table.qualified(),
        join.join(" AND "),
    );
    let params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
    let mut found = vec![false; fill.rows.len()];
    let read = match source.query(&sql, &params).await {
        Ok(read) => {
            s.keep_fill_source(source);
            read
        }
        // The kept connection was closed meanwhile (by the server, or a firewall's idle
        // timeout): once more on a new one.
        Err(_) if reused && source.is_closed() => {
            let source = open_fill_source(s).await?;
            let read = source.query(&sql, &params).await.map_err(source_error)?;
            s.keep_fill_source(source);
            read
        }
        Err(error) => return Err(source_error(error)),
    };
    for row in read {
        let Some(at) = usize::try_from(row.get::<_, i64>(0) - 1)
            .ok()
            .filter(|&at| at < fill.rows.len())
        else {
            continue;
        };
        found[at] = true;
        let (upsert, i) = fill.rows[at];
        let target = if upsert {
            &mut changes.upserts[i]
        } else {
            &mut changes.inserts[i]
        };
        for (n, &column) in fill.columns.iter().enumerate() {
            target[column] = row.get::<_, Option<String>>(n + 1).map(Text::from);
        }
    }
    let gone: std::collections::HashSet<(bool, usize)> = fill
        .rows
        .iter()
        .zip(&found)
        .filter(|(_, found)| !**found)
        .map(|(&at, _)| at)
        .collect();
    // A row the source no longer has is not written. An upsert's key may be on the target with
    // an older row (a delete folded into the upsert): it is deleted there, as the source has
    // no row under it now; the later changes of the stream (a key change, which then reads the
    // source's row under its new key) bring the rest.
    for &(upsert, i) in &gone {
        if upsert {
            let row = &changes.upserts[i];
            let key: Option<Key> = table.key.iter().map(|&k| row[k].clone()).collect();
            changes.deletes.extend(key);
        }
    }
    for upsert in [false, true] {
        let rows = if upsert {
            &mut changes.upserts
        } else {
            &mut changes.inserts
        };
        let mut index = 0;
        rows.retain(|_| {
            let keep = !gone.contains(&(upsert, index));
            index += 1;
            keep
        });
    }
    Ok(())
}

/// Applies folded changes within the target transaction.
async fn apply_all(s: &Session, changes: Vec<TableChanges>) -> Result<u64, Error> {
    let mut rows = 0;
    for ((plan, table), mut changes) in s.plans.iter().zip(&s.tables).zip(changes) {
        fill_from_source(s, table, &mut changes).await?;
        if !changes.is_empty() {
            rows += plan.apply(&s.target, &changes).await.map_err(|error| {
                s.shared.note_apply_error(&s.spec.target, &changes, &error);
                target_error(error)
            })?;
            s.shared.moved();
        }
    }
    Ok(rows)
}

/// One step: peek what the slot holds (up to the flushed position), apply it in one target
/// transaction, then advance the slot.
pub(crate) async fn step(s: &mut Session) -> Result<Step, Error> {
    let settings = s.spec.settings.clone();
    let slot = install::publication(&settings, &s.spec.target);
    let source_name = s.source_name.clone();
    let source_error =
        |e: tokio_postgres::Error| Error::from_postgres(e).with_endpoint(&source_name);
    let row = s
        .source
        .query_one(
            &format!(
                "SELECT pg_current_wal_flush_lsn()::text, now()::text, {}, \
                 (SELECT wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = $1), \
                 EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1), \
                 (SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots \
                  WHERE slot_name = $1)",
                Identity::SQL
            ),
            &[&slot],
        )
        .await
        .map_err(source_error)?;
    let flushed: Position = row
        .get::<_, String>(0)
        .parse()
        .map_err(|e: crate::PositionParseError| Error::mapping(e.to_string()))?;
    let source_time: String = row.get(1);
    let identity = Identity {
        system_id: row.get(2),
        timeline: row.get(3),
    };
    let wal_status: Option<String> = row.get(4);
    let exists: bool = row.get(5);
    let confirmed: Option<Position> = row
        .get::<_, Option<String>>(6)
        .map(|lsn| lsn.parse())
        .transpose()
        .map_err(|e: crate::PositionParseError| Error::mapping(e.to_string()))?;
    let configured: Vec<String> = s.tables.iter().map(TableInfo::display).collect();
    let new_target = s.progress.mode != "logical" || s.progress.lsn.is_none();
    // A table added is copied with every other one; a changed source is still reported (and
    // stops the target when the policy says so).
    let mut fresh = new_target || configured.iter().any(|t| !s.progress.tables.contains(t));
    if !new_target {
        let slot_problem = if !exists {
            Some(format!(
                "the replication slot `{slot}` is gone (a failover, or it was dropped)"
            ))
        } else if wal_status.as_deref() == Some("lost") {
            Some(format!(
                "the replication slot `{slot}` is invalidated: the WAL it needed was removed \
                 (max_slot_wal_keep_size)"
            ))
        } else if let Some(released) = confirmed.filter(|c| Some(*c) > s.progress.lsn) {
            let holds = s.progress.lsn.unwrap_or_default();
            Some(format!(
                "the target holds the source up to {holds}, but its slot `{slot}` released \
                 the changes up to {released}: the target went back (restored from a backup, \
                 or failed over to a standby that lacked its last commits), and the commits in \
                 between are not on it"
            ))
        } else {
            None
        };
        if let Some(problem) = identity.changed_from(&s.progress).or(slot_problem) {
            match settings.on_source_change {
                ResyncPolicy::Stop => {
                    return Ok(Step::Stop(format!(
                        "{problem}; replicator.on_source_change = \"stop\": check the target, \
                         then set it to \"resync\" to copy again"
                    )))
                }
                ResyncPolicy::Resync => {
                    tracing::warn!(target = %s.spec.target, %problem, "copying every table again");
                    s.shared.warn(format!("{problem}: copied again"));
                    fresh = true;
                }
            }
        }
    }
    if fresh {
        return copy(s, &slot, exists, identity).await;
    }
    let watermark = s.progress.lsn.unwrap_or_default();
    // Transactions that came with the copy: visible in its snapshot, and committed before it.
    let copy_snapshot = s.progress.copy_snapshot.clone();
    let copy_lsn = s.progress.copy_lsn.unwrap_or_default();
    let limit = i32::try_from(settings.batch_rows).unwrap_or(i32::MAX);
    let publication = slot.clone();
    let mut taken = if settings.logical_stream {
        Some(match s.stream.take() {
            Some(stream) => stream,
            None => {
                let endpoint = stream::Endpoint {
                    config: s.source_connector.config_with_password(),
                    tls: s.source_connector.tls().clone(),
                };
                let wake = std::sync::Arc::clone(&s.wake);
                stream::open(endpoint, &slot, &publication, watermark, wake)
                    .await
                    .map_err(|e| e.with_endpoint(&source_name))?
            }
        })
    } else {
        None
    };
    let peek = match taken {
        Some(_) => None,
        None => {
            let flushed_text = flushed.to_string();
            let params: [&(dyn ToSql + Sync); 4] = [&slot, &flushed_text, &limit, &publication];
            let rows = s
                .source
                .query_raw(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes(\
                     $1, $2::text::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)",
                    params,
                )
                .await
                .map_err(source_error)?;
            Some(rows)
        }
    };
    futures_util::pin_mut!(peek);
    let mut folder = Folder::new(&s.tables, !s.shared.always_upsert());
    if let Some(stream) = taken.as_mut() {
        folder.relations = std::mem::take(&mut stream.relations);
    }
    let mut stream = match (taken.as_mut(), peek.as_mut().as_pin_mut()) {
        (Some(stream), _) => Changes::Stream {
            stream,
            limit: settings.batch_rows,
            sent: None,
            full: false,
        },
        (None, Some(rows)) => Changes::Peek(rows),
        (None, None) => return Err(Error::mapping("a logical step with nothing to read")),
    };
    let mut reading = Reading {
        watermark,
        copy_snapshot,
        copy_lsn,
        limits: (settings.batch_rows, settings.batch_bytes),
        skip: false,
        last_commit: None,
        changes: 0,
        inside: false,
        catalog_lsn: s.catalog_lsn,
    };
    let mut claimed = false;
    let mut rows = 0;
    let schema = s.schema();
    let expected = s.progress.batch;
    let mut end = fold_chunk(
        &mut stream,
        &mut folder,
        &mut reading,
        &s.shared,
        source_error,
    )
    .await?;
    loop {
        let chunk = folder.take();
        let moved = matches!(end, ChunkEnd::Move(_));
        if !claimed && (moved || chunk.iter().any(|c| !c.is_empty())) {
            claim(&s.target, &schema, &s.spec.cluster, expected).await?;
            claimed = true;
        }
        match end {
            // The next chunk is read and folded while this one is applied: the primary and this
            // process work while the target does. A source transaction larger than a chunk is
            // applied in several chunks of the same target transaction.
            ChunkEnd::Full => {
                let (applied, next) = futures_util::join!(
                    apply_all(s, chunk),
                    fold_chunk(
                        &mut stream,
                        &mut folder,
                        &mut reading,
                        &s.shared,
                        source_error
                    )
                );
                rows += applied?;
                end = next?;
            }
            ChunkEnd::Move(moved) => {
                rows += apply_all(s, chunk).await?;
                let plan = &s.plans[moved.table];
                let written = plan
                    .move_row(&s.target, &moved.old_key, &moved.present, &moved.row)
                    .await
                    .map_err(target_error)?;
                rows += written;
                if written == 0 || moved.older {
                    // Not on the target under its old key: a row replayed from before columns
                    // were added that the source no longer had under that key was not written
                    // (see `fill_from_source`). Or moved from before columns were added: what
                    // the target's row holds for them may have been read from a row that took
                    // the old key on the source since. The source's row under the new key is
                    // written (one that is gone is deleted: later changes bring the rest).
                    let table = &s.tables[moved.table];
                    let missing: Vec<usize> = (0..moved.present.len())
                        .filter(|&i| !moved.present[i])
                        .collect();
                    let mut changes = TableChanges {
                        upserts: vec![moved.row],
                        fill: Some(Fill {
                            columns: missing,
                            rows: vec![(true, 0)],
                        }),
                        ..TableChanges::default()
                    };
                    fill_from_source(s, table, &mut changes).await?;
                    if !changes.is_empty() {
                        rows += plan
                            .apply(&s.target, &changes)
                            .await
                            .map_err(target_error)?;
                    }
                }
                end = fold_chunk(
                    &mut stream,
                    &mut folder,
                    &mut reading,
                    &s.shared,
                    source_error,
                )
                .await?;
            }
            ChunkEnd::Drained => {
                rows += apply_all(s, chunk).await?;
                break;
            }
        }
    }
    let (sent, full) = match &stream {
        Changes::Stream { sent, full, .. } => (*sent, *full),
        Changes::Peek(_) => (None, false),
    };
    let last_commit = reading.last_commit;
    let drained = match taken {
        Some(_) => !full,
        None => reading.changes < usize::try_from(limit).unwrap_or(usize::MAX),
    };
    let applied = claimed;
    let mut progress = s.progress.clone();
    let past = match (&taken, drained) {
        (Some(_), _) => sent,
        (None, true) => Some(flushed),
        (None, false) => None,
    };
    // A peek that stopped at its limit and applied nothing (transactions the copy already
    // holds, say) peeks the same changes again until the slot moves: it records at once.
    let quiet_due = (taken.is_none() && !drained)
        || s.last_record
            .is_none_or(|at| at.elapsed() >= QUIET_RECORD_INTERVAL);
    let (reached, record) = step_end(watermark, last_commit, past, claimed, quiet_due);
    if record {
        if !claimed {
            claim(&s.target, &schema, &s.spec.cluster, progress.batch).await?;
        }
        progress.lsn = Some(reached);
        progress.batch += 1;
        s.shared.before_commit();
        Session::commit(&schema, &s.spec.cluster, &s.target, &progress, &source_time).await?;
        s.last_record = Some(std::time::Instant::now());
    }
    let held = progress.lsn.unwrap_or_default();
    match taken {
        // The slot moves when the server hears what the target holds.
        Some(mut stream) => {
            stream.relations = std::mem::take(&mut folder.relations);
            stream.hold(held);
            s.stream = Some(stream);
        }
        None => {
            if let Some(to) = confirmed.is_none_or(|c| held > c).then_some(held) {
                s.source
                    .query_one(
                        "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
                        &[&slot, &to.to_string()],
                    )
                    .await
                    .map_err(source_error)?;
            }
        }
    }
    s.progress = progress;
    s.shared.update(|status| {
        status.applied = Some(reached);
        status.lag_bytes = Some(flushed.bytes_after(reached));
    });
    s.spec.routing_feed(&s.source_name, reached);
    Ok(if applied {
        Step::Applied {
            rows,
            more: !drained,
        }
    } else if !drained {
        Step::Applied {
            rows: 0,
            more: true,
        }
    } else {
        Step::Idle
    })
}

/// Where a step leaves the target, and whether the target's progress row records it.
///
/// The target reflects the source up to the last commit read and, past it, up to `past`: the
/// position before which the walsender had sent every commit, or the flushed position a peek
/// that read everything decoded up to (even if no replicated table changed: otherwise a slot
/// whose tables are quiet while the rest of the database is busy would hold back WAL, and make
/// every peek decode it again). Never back from the `watermark`.
///
/// The slot moves only as far as the progress row records (so that a target found holding
/// less than its slot released is known to have gone back): a batch (`claimed`) records where
/// it reached; a step that only passed other tables' changes, when `quiet_due`.
fn step_end(
    watermark: Position,
    last_commit: Option<Position>,
    past: Option<Position>,
    claimed: bool,
    quiet_due: bool,
) -> (Position, bool) {
    let reached = watermark
        .max(last_commit.unwrap_or_default())
        .max(past.unwrap_or_default());
    (reached, claimed || (reached > watermark && quiet_due))
}

/// Drops `slot`, waiting up to 5 s for the walsender of a closed replication connection to let
/// go of it.
async fn drop_slot(
    source: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut tries = 0;
    loop {
        match source
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && tries < 250 =>
            {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            outcome => return outcome.map(drop),
        }
    }
}

/// Creates the slot afresh and copies every table under a snapshot taken after it: decoded
/// transactions visible in that snapshot came with the copy and are skipped.
async fn copy(
    s: &mut Session,
    slot: &str,
    exists: bool,
    identity: Identity,
) -> Result<Step, Error> {
    s.shared
        .update(|status| status.state = super::ReplicationState::Copying);
    let source_name = s.source_name.clone();
    let source_error =
        |e: tokio_postgres::Error| Error::from_postgres(e).with_endpoint(&source_name);
    let schema = s.schema();
    // Until the copy commits, the target must start over from a copy: the new slot will not
    // hold what came between the old watermark and its creation.
    s.target
        .execute(
            &format!("UPDATE {schema}.progress SET lsn = NULL WHERE source = $1"),
            &[&s.spec.cluster.as_ref()],
        )
        .await
        .map_err(target_error)?;
    s.progress.lsn = None;
    // The slot is busy while a replication connection reads it.
    s.stream = None;
    if exists {
        drop_slot(&s.source, slot).await.map_err(source_error)?;
    }
    let created: String = s
        .source
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(|e| {
            let error = source_error(e);
            let detail = format!(
                "cannot create the replication slot `{slot}`: logical mode needs wal_level = \
                 logical, a free slot (max_replication_slots) and a login with the REPLICATION \
                 attribute"
            );
            error.with_detail(detail)
        })?
        .get(0);
    let consistent: Position = created
        .parse()
        .map_err(|e: crate::PositionParseError| Error::mapping(e.to_string()))?;
    // A transaction whose commit record lies before the slot's start can still be shown in
    // progress for a while (a commit waiting for a synchronous standby): the slot will not
    // decode it, and a snapshot taken now would not copy it. Every such transaction holds its
    // own transaction id's lock now (a snapshot would not list the newest of them: it may be
    // past the snapshot's xmax); once all of these have ended, the copy's snapshot sees them.
    // (Those that commit after the slot's start are both decoded and copied; the stream skips
    // them.)
    let running = running_xids(&s.source).await.map_err(source_error)?;
    while !running.is_empty()
        && running_xids(&s.source)
            .await
            .map_err(source_error)?
            .iter()
            .any(|xid| running.contains(xid))
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let transaction = snapshot_transaction(&mut s.source, &s.tables)
        .await
        .map_err(source_error)?;
    let row = transaction
        .query_one(
            "SELECT pg_current_snapshot()::text, now()::text, pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await
        .map_err(source_error)?;
    let snapshot: Snapshot = parse_snapshot(row.get(0))?;
    let source_time: String = row.get(1);
    let copy_lsn: Position = row
        .get::<_, String>(2)
        .parse()
        .map_err(|e: crate::PositionParseError| Error::mapping(e.to_string()))?;
    claim(&s.target, &schema, &s.spec.cluster, s.progress.batch).await?;
    let mut rows = 0;
    for (table, plan) in s.tables.iter().zip(&s.plans) {
        rows += copy_table(&transaction, &s.target, table, plan, &s.shared).await?;
    }
    let progress = Progress {
        batch: s.progress.batch + 1,
        mode: "logical".to_owned(),
        snapshot: None,
        lsn: Some(consistent),
        copy_snapshot: Some(snapshot),
        copy_lsn: Some(copy_lsn),
        system_id: Some(identity.system_id),
        timeline: Some(identity.timeline),
        tables: s.tables.iter().map(TableInfo::display).collect(),
    };
    s.shared.before_commit();
    Session::commit(&schema, &s.spec.cluster, &s.target, &progress, &source_time).await?;
    transaction.commit().await.map_err(source_error)?;
    s.progress = progress;
    Ok(Step::Applied { rows, more: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::{
        apply::Text,
        catalog::ColumnInfo,
        pgoutput::{Column, Relation},
    };

    fn tables() -> Vec<TableInfo> {
        let column = |name: &str| ColumnInfo {
            name: name.to_owned(),
            type_name: "text".to_owned(),
            collation: None,
        };
        vec![TableInfo {
            oid: 0,
            schema: "public".to_owned(),
            name: "docs".to_owned(),
            columns: vec![column("id"), column("title"), column("body")],
            key: vec![0],
            attnums: vec![1, 2, 3],
            dropped: Vec::new(),
            missing: vec![None; 3],
            type_oids: vec![25, 25, 25],
            natts: 0,
        }]
    }

    fn relation() -> Message {
        let column = |name: &str, key| Column {
            key,
            name: name.to_owned(),
            type_id: 25,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            id: 7,
            namespace: "public".to_owned(),
            name: "docs".to_owned(),
            replica_identity: b'd',
            columns: vec![
                column("id", true),
                column("title", false),
                column("body", false),
            ],
        })
    }

    fn text(value: &str) -> Value {
        Value::Text(Text::from(value))
    }

    fn insert(id: &str, title: &str, body: &str) -> Message {
        Message::Insert {
            relation: 7,
            new: vec![text(id), text(title), text(body)],
        }
    }

    fn folded(messages: Vec<Message>) -> (Vec<TableChanges>, Option<Move>) {
        let tables = tables();
        let mut folder = Folder::new(&tables, true);
        let mut moved = None;
        for message in std::iter::once(relation()).chain(messages) {
            if let Some(m) = folder.fold(message).expect("fold") {
                moved = Some(m);
            }
        }
        (folder.take(), moved)
    }

    fn row(values: &[&str]) -> Row {
        values.iter().map(|v| Some(Text::from(*v))).collect()
    }

    #[test]
    fn a_column_unknown_to_the_session_in_a_recent_change_makes_it_read_the_catalogs_again() {
        let tables = tables();
        let mut dropped_since = tables.clone();
        dropped_since[0].dropped = vec![4];
        let Message::Relation(mut widened) = relation() else {
            unreachable!("relation() is a Relation")
        };
        widened.columns.push(Column {
            key: false,
            name: "added".to_owned(),
            type_id: 25,
            type_modifier: -1,
        });
        let mut folder = Folder::new(&tables, true);
        let error = folder
            .fold(Message::Relation(widened.clone()))
            .expect_err("a column added since the catalogs were read");
        assert!(error.to_string().contains("`added`"), "{error}");
        // In a change older than the catalogs, it is a column dropped since: left out.
        folder.tables = &dropped_since;
        folder.recent = false;
        folder.fold(Message::Relation(widened)).expect("older");
        let mut values = vec![text("1"), text("t"), text("b"), text("gone")];
        folder
            .fold(Message::Insert {
                relation: 7,
                new: std::mem::take(&mut values),
            })
            .expect("insert");
        assert_eq!(folder.take()[0].inserts, vec![row(&["1", "t", "b"])]);
    }

    /// The table `docs` with columns `(name, attnum, type)` and the numbers of dropped columns.
    fn shaped(columns: &[(&str, i16, u32)], dropped: &[i16]) -> TableInfo {
        let mut table = tables().remove(0);
        table.columns = columns
            .iter()
            .map(|(name, _, _)| ColumnInfo {
                name: (*name).to_owned(),
                type_name: "text".to_owned(),
                collation: None,
            })
            .collect();
        table.attnums = columns.iter().map(|c| c.1).collect();
        table.type_oids = columns.iter().map(|c| c.2).collect();
        table.missing = vec![None; columns.len()];
        table.dropped = dropped.to_vec();
        table
    }

    #[test]
    fn older_changes_place_renamed_dropped_and_added_columns() {
        const TEXT: u32 = 25;
        const INT: u32 = 23;
        let place = |columns: &[(&str, i16, u32)], dropped: &[i16], names: &[&str]| {
            let named: Vec<(&str, u32)> = names.iter().map(|n| (*n, TEXT)).collect();
            place_columns(&shaped(columns, dropped), &named)
        };
        // Renamed, between two columns or last, with a column added after it.
        let three = [("id", 1, TEXT), ("heading", 2, TEXT), ("body", 3, TEXT)];
        assert_eq!(
            place(&three, &[], &["id", "title", "body"]),
            Ok(vec![Some(0), Some(1), Some(2)])
        );
        let added = [("id", 1, TEXT), ("heading", 2, TEXT), ("extra", 3, TEXT)];
        assert_eq!(
            place(&added, &[], &["id", "title"]),
            Ok(vec![Some(0), Some(1)])
        );
        // Dropped, between two columns, or last with a column of another type added since.
        let two = [("id", 1, TEXT), ("body", 3, TEXT)];
        assert_eq!(
            place(&two, &[2], &["id", "title", "body"]),
            Ok(vec![Some(0), None, Some(1)])
        );
        assert_eq!(
            place(
                &[("id", 1, TEXT), ("extra", 3, INT)],
                &[2],
                &["id", "title"]
            ),
            Ok(vec![Some(0), None])
        );
        // Last, next to a column dropped at some time, with a column of its type after it:
        // renamed (an older drop) or dropped (and one added since) cannot be told apart.
        assert!(place(
            &[("id", 1, TEXT), ("heading", 3, TEXT)],
            &[2],
            &["id", "title"]
        )
        .is_err());
        // A rename next to a drop; names swapped; a column renamed and its name given to a
        // column added since.
        let error = place(
            &[("id", 1, TEXT), ("heading", 3, TEXT), ("body", 4, TEXT)],
            &[2],
            &["id", "x", "title", "body"],
        )
        .expect_err("ambiguous");
        assert!(error.contains("`x`, `title`"), "{error}");
        let swapped = [("id", 1, TEXT), ("b", 2, TEXT), ("a", 3, TEXT)];
        assert!(place(&swapped, &[], &["id", "a", "b"]).is_err());
        let taken = [
            ("id", 1, TEXT),
            ("legacy_status", 2, TEXT),
            ("status", 3, TEXT),
        ];
        assert!(place(&taken, &[], &["id", "status"]).is_err());
    }

    /// A folder of changes older than the catalogs, whose relation lacks the table's last
    /// column (added since).
    fn folder_of_older_changes(tables: &[TableInfo]) -> Folder<'_> {
        let Message::Relation(mut narrow) = relation() else {
            unreachable!("relation() is a Relation")
        };
        narrow.columns.pop();
        let mut folder = Folder::new(tables, true);
        folder.recent = false;
        folder.fold(Message::Relation(narrow)).expect("older");
        folder
    }

    #[test]
    fn a_row_written_before_a_column_was_added_gets_the_value_it_was_added_with() {
        let mut tables = tables();
        tables[0].missing[2] = Some("added with".to_owned());
        let mut folder = folder_of_older_changes(&tables);
        for message in [
            Message::Insert {
                relation: 7,
                new: vec![text("1"), text("t")],
            },
            // Changed again in the same step: still that value.
            Message::Update {
                relation: 7,
                old: None,
                old_is_key_only: false,
                new: vec![text("1"), text("t2")],
            },
            Message::Update {
                relation: 7,
                old: None,
                old_is_key_only: false,
                new: vec![text("2"), text("u")],
            },
        ] {
            assert!(folder.fold(message).expect("fold").is_none());
        }
        let changes = folder.take().remove(0);
        assert_eq!(changes.inserts, vec![row(&["1", "t2", "added with"])]);
        // A row already on the target keeps the value it has there.
        let mut updated = row(&["2", "u"]);
        updated.push(None);
        assert_eq!(
            changes.updates.get(&vec![true, true, false]),
            Some(&vec![updated])
        );
        assert!(changes.upserts.is_empty());
    }

    #[test]
    fn a_row_written_before_a_column_added_without_a_recorded_value_is_read_from_the_source() {
        let tables = tables();
        let mut folder = folder_of_older_changes(&tables);
        for id in ["1", "2", "3"] {
            let insert = Message::Insert {
                relation: 7,
                new: vec![text(id), text("t")],
            };
            assert!(folder.fold(insert).expect("fold").is_none());
        }
        // Deleted later in the step: nothing to read.
        let delete = Message::Delete {
            relation: 7,
            old: vec![text("2"), Value::Null, Value::Null],
            old_is_key_only: true,
        };
        assert!(folder.fold(delete).expect("fold").is_none());
        // Its key changed later in the step: read under the new key.
        let moved = Message::Update {
            relation: 7,
            old: Some(vec![text("3"), Value::Null]),
            old_is_key_only: true,
            new: vec![text("4"), text("t")],
        };
        assert!(folder.fold(moved).expect("fold").is_none());
        let changes = folder.take().remove(0);
        assert_eq!(changes.inserts.len(), 1);
        assert_eq!(changes.upserts.len(), 1);
        assert_eq!(changes.upserts[0][0], Some(Text::from("4")));
        assert_eq!(
            changes.fill,
            Some(Fill {
                columns: vec![2],
                rows: vec![(false, 0), (true, 0)],
            })
        );
        // The next chunk starts with nothing to read.
        assert_eq!(folder.take().remove(0).fill, None);
    }

    #[test]
    fn a_relation_is_matched_by_oid_whatever_its_name_at_the_time() {
        let mut tables = tables();
        tables[0].oid = 7;
        let Message::Relation(mut renamed) = relation() else {
            unreachable!("relation() is a Relation")
        };
        renamed.name = "docs_old".to_owned();
        let mut folder = Folder::new(&tables, true);
        folder.fold(Message::Relation(renamed)).expect("renamed");
        folder.fold(insert("1", "t", "b")).expect("insert");
        assert_eq!(folder.take()[0].rows(), 1);
    }

    #[test]
    fn a_step_reaches_what_was_decoded_and_records_it_before_the_slot_moves() {
        let at = |lsn: u64| Position::new(lsn);
        // Past the last commit read, to what the walsender or a drained peek showed.
        assert_eq!(
            step_end(at(100), None, Some(at(500)), false, true),
            (at(500), true)
        );
        assert_eq!(
            step_end(at(100), Some(at(300)), Some(at(500)), true, false),
            (at(500), true)
        );
        // A commit record that straddles the flushed position was read whole.
        assert_eq!(
            step_end(at(100), Some(at(600)), Some(at(500)), true, false),
            (at(600), true)
        );
        // A peek that did not drain: only past the last commit read.
        assert_eq!(
            step_end(at(100), Some(at(300)), None, true, false),
            (at(300), true)
        );
        // Nothing new: nothing to record; never back from the watermark.
        assert_eq!(
            step_end(at(500), None, Some(at(500)), false, true),
            (at(500), false)
        );
        assert_eq!(
            step_end(at(500), None, Some(at(400)), false, true),
            (at(500), false)
        );
        // Other tables' changes only: recorded once the quiet interval has passed.
        assert_eq!(
            step_end(at(100), None, Some(at(500)), false, false),
            (at(500), false)
        );
    }

    #[test]
    fn the_last_change_of_a_key_wins() {
        let (changes, _) = folded(vec![
            insert("1", "a", "x"),
            insert("2", "b", "y"),
            Message::Delete {
                relation: 7,
                old: vec![text("1"), Value::Null, Value::Null],
                old_is_key_only: true,
            },
        ]);
        assert_eq!(changes[0].deletes, [vec![Text::from("1")]]);
        assert_eq!(changes[0].inserts, [row(&["2", "b", "y"])]);
        assert!(changes[0].upserts.is_empty());
    }

    #[test]
    fn rows_are_applied_in_the_order_their_keys_first_changed() {
        let keys = ["5", "3", "9", "1", "7", "2", "8", "4", "6"];
        let mut messages: Vec<Message> = keys.iter().map(|k| insert(k, "a", "x")).collect();
        messages.push(insert("3", "b", "y"));
        let (changes, _) = folded(messages);
        let order: Vec<Text> = changes[0]
            .inserts
            .iter()
            .filter_map(|row| row[0].clone())
            .collect();
        assert_eq!(order, keys.map(Text::from));
        assert_eq!(changes[0].inserts[1], row(&["3", "b", "y"]));
    }

    #[test]
    fn only_keys_first_inserted_in_the_step_are_inserted_without_a_conflict_check() {
        let update = |id: &str, title: &str| Message::Update {
            relation: 7,
            old: None,
            old_is_key_only: false,
            new: vec![text(id), text(title), text("x")],
        };
        let delete = |id: &str| Message::Delete {
            relation: 7,
            old: vec![text(id), Value::Null, Value::Null],
            old_is_key_only: true,
        };
        let (changes, _) = folded(vec![
            // Inserted, then updated: still not on the target.
            insert("1", "a", "x"),
            update("1", "b"),
            // Updated only: on the target.
            update("2", "c"),
            // Deleted, then inserted again: on the target until the delete is applied, which
            // is not known here.
            delete("3"),
            insert("3", "d", "x"),
        ]);
        assert_eq!(changes[0].inserts, [row(&["1", "b", "x"])]);
        let mut upserts = changes[0].upserts.clone();
        upserts.sort();
        assert_eq!(upserts, [row(&["2", "c", "x"]), row(&["3", "d", "x"])]);
        // A folder told that the target refused a plain insert upserts everything.
        let tables = tables();
        let mut folder = Folder::new(&tables, false);
        for message in [relation(), insert("1", "a", "x")] {
            folder.fold(message).expect("fold");
        }
        let changes = folder.take();
        assert!(changes[0].inserts.is_empty());
        assert_eq!(changes[0].upserts, [row(&["1", "a", "x"])]);
    }

    #[test]
    fn a_key_change_deletes_the_old_key() {
        let (changes, moved) = folded(vec![Message::Update {
            relation: 7,
            old: Some(vec![text("1"), Value::Null, Value::Null]),
            old_is_key_only: true,
            new: vec![text("9"), text("a"), text("x")],
        }]);
        assert!(moved.is_none());
        assert_eq!(changes[0].deletes, [vec![Text::from("1")]]);
        assert_eq!(changes[0].upserts, [row(&["9", "a", "x"])]);
    }

    #[test]
    fn an_unchanged_toast_value_is_never_overwritten() {
        // Alone, the update sets only the columns it carries.
        let update = |title: &str| Message::Update {
            relation: 7,
            old: None,
            old_is_key_only: false,
            new: vec![text("1"), text(title), Value::UnchangedToast],
        };
        let (changes, _) = folded(vec![update("b")]);
        assert!(changes[0].upserts.is_empty());
        let present = vec![true, true, false];
        assert_eq!(
            changes[0].updates.get(&present),
            Some(&vec![vec![
                Some(Text::from("1")),
                Some(Text::from("b")),
                None
            ]])
        );
        // After an insert of the same step, the value comes from the insert.
        let (changes, _) = folded(vec![insert("1", "a", "big"), update("b")]);
        assert_eq!(changes[0].inserts, [row(&["1", "b", "big"])]);
        // A key-only old image carries NULLs, not the value: it is not taken from there.
        let (changes, _) = folded(vec![Message::Update {
            relation: 7,
            old: Some(vec![text("1"), Value::Null, Value::Null]),
            old_is_key_only: true,
            new: vec![text("1"), text("b"), Value::UnchangedToast],
        }]);
        assert!(changes[0].upserts.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_key_change_without_its_toast_value_is_moved_on_its_own() {
        let (_, moved) = folded(vec![Message::Update {
            relation: 7,
            old: Some(vec![text("1"), Value::Null, Value::Null]),
            old_is_key_only: true,
            new: vec![text("2"), text("b"), Value::UnchangedToast],
        }]);
        let moved = moved.expect("a move");
        assert_eq!(moved.old_key, [Text::from("1")]);
        assert_eq!(moved.present, [true, true, false]);
    }

    #[test]
    fn a_truncate_drops_what_came_before_it() {
        let (changes, _) = folded(vec![
            insert("1", "a", "x"),
            Message::Truncate {
                relations: vec![7],
                cascade: false,
                restart_identity: false,
            },
            insert("2", "b", "y"),
        ]);
        assert!(changes[0].truncate);
        assert_eq!(changes[0].inserts, [row(&["2", "b", "y"])]);
        assert!(changes[0].deletes.is_empty());
    }
}
