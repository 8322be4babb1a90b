//! The objects the replicator keeps: on the primary, a change table and capture triggers per
//! replicated table (`trigger` mode) or a publication per target (`logical` mode); on each
//! target, the progress table. Every step is idempotent: installing again changes nothing.

use tokio_postgres::Client;

use super::catalog::{self, CatalogProblem, TableInfo};
use crate::{
    error::{Error, ErrorKind},
    settings::{split_table, CaptureMode, ReplicatorSettings},
    sql::{quote_ident, quote_literal},
};

/// Reads every configured table from the catalogs of `client`'s database; a missing table or
/// one without a primary key is a configuration error that says what to do.
pub(crate) async fn tables(
    client: &Client,
    settings: &ReplicatorSettings,
    endpoint: &str,
) -> Result<Vec<TableInfo>, Error> {
    let mut tables = Vec::with_capacity(settings.tables.len());
    for name in &settings.tables {
        let Some((schema, table)) = split_table(name) else {
            return Err(config(format!(
                "replicator.tables: `{name}` is not a table name"
            )));
        };
        match catalog::load(client, schema, table)
            .await
            .map_err(Error::from_postgres)?
        {
            Ok(info) => tables.push(info),
            Err(CatalogProblem::Missing) => {
                return Err(config(format!(
                    "table {schema}.{table} (replicator.tables) does not exist on `{endpoint}`, or is \
                     not a plain table (a partitioned table is not supported: in `logical` mode, \
                     list its partitions): create it there, or remove it from replicator.tables"
                )))
            }
            Err(CatalogProblem::NoPrimaryKey) => {
                return Err(config(format!(
                    "table {schema}.{table} has no primary key on `{endpoint}`: the replicator \
                     matches rows by primary key; add one (ALTER TABLE {} ADD PRIMARY KEY (...)) or \
                     remove the table from replicator.tables",
                    quote_ident(schema) + "." + &quote_ident(table)
                )))
            }
        }
    }
    for table in &tables {
        match settings.mode {
            CaptureMode::Trigger => {
                if let Some(column) = reserved_key_column(table) {
                    return Err(config(format!(
                        "table {} on `{endpoint}` has a primary key column named `{column}`, \
                         which `trigger` mode's change tables use for their own column: rename \
                         the column, or replicate the table with mode = \"logical\"",
                        table.display(),
                    )));
                }
                refuse_inheritance(client, table, endpoint).await?;
            }
            CaptureMode::Logical => {
                refuse_identity_without_key(client, table, endpoint).await?;
                if deferrable_key(client, table).await? {
                    return Err(config(format!(
                        "table {} on `{endpoint}` has a DEFERRABLE primary key: `logical` mode \
                         folds the decoded changes key by key, and two rows can hold the same \
                         key until the check; give it a primary key that is not DEFERRABLE \
                         ({RECREATE_KEY}), or replicate the table with mode = \"trigger\", \
                         which reads the committed rows",
                        table.display(),
                    )));
                }
            }
        }
    }
    Ok(tables)
}

/// The change table's own columns, which no key column may be named.
const CHANGE_TABLE_COLUMNS: [&str; 2] = ["txid", "inserted"];

/// [`CHANGE_TABLE_COLUMNS`] as an SQL list: `'txid', 'inserted'`.
pub(crate) fn change_table_columns_sql() -> String {
    CHANGE_TABLE_COLUMNS.map(quote_literal).join(", ")
}

/// A key column of `table` named like a column of its change table, if any.
fn reserved_key_column(table: &TableInfo) -> Option<&str> {
    table
        .key_columns()
        .map(|c| c.name.as_str())
        .find(|name| CHANGE_TABLE_COLUMNS.contains(name))
}

/// Refuses, in `logical` mode, a table whose replica identity does not hold its primary key:
/// the WAL then lacks the old key of an update that changes the key, and of every delete (with
/// `NOTHING`, the primary even refuses the application's updates and deletes once the table is
/// in a publication).
async fn refuse_identity_without_key(
    client: &Client,
    table: &TableInfo,
    endpoint: &str,
) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT c.relreplident::text, c.relreplident IN ('d', 'f') OR EXISTS ( \
               SELECT 1 FROM pg_catalog.pg_index ri JOIN pg_catalog.pg_index pk \
                 ON pk.indrelid = ri.indrelid AND pk.indisprimary \
               WHERE ri.indrelid = c.oid AND ri.indisreplident AND c.relreplident = 'i' \
                 AND (pk.indkey::int2[])[0:pk.indnkeyatts - 1] \
                     <@ (ri.indkey::int2[])[0:ri.indnkeyatts - 1]) \
             FROM pg_catalog.pg_class c WHERE c.oid = $1::text::regclass",
            &[&table.qualified()],
        )
        .await
        .map_err(Error::from_postgres)?;
    let (identity, holds_key): (String, bool) = (row.get(0), row.get(1));
    if holds_key {
        return Ok(());
    }
    let what = if identity == "n" {
        "REPLICA IDENTITY NOTHING"
    } else {
        "a REPLICA IDENTITY index without its primary key"
    };
    Err(config(format!(
        "table {} on `{endpoint}` has {what}: `logical` mode needs the old primary key of every \
         update and delete in the WAL; run ALTER TABLE {} REPLICA IDENTITY DEFAULT (or FULL), or \
         replicate the table with mode = \"trigger\"",
        table.display(),
        table.qualified()
    )))
}

/// How to replace a `DEFERRABLE` primary key (PostgreSQL cannot alter its deferrability).
const RECREATE_KEY: &str = "CREATE UNIQUE INDEX CONCURRENTLY new_key ON ... (key columns), then \
     ALTER TABLE ... DROP CONSTRAINT old_key, ADD PRIMARY KEY USING INDEX new_key";

/// Whether `table`'s primary key is `DEFERRABLE` (checked at the end of the statement or the
/// transaction, so that two rows can hold the same key until then).
async fn deferrable_key(client: &Client, table: &TableInfo) -> Result<bool, Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index WHERE indrelid = $1::text::regclass \
             AND indisprimary AND NOT indimmediate)",
            &[&table.qualified()],
        )
        .await
        .map_err(Error::from_postgres)?
        .get(0))
}

/// Refuses, in `trigger` mode, a table with an inheritance parent (a partition included) or
/// children: statement triggers fire only on the table a statement names, so the capture
/// triggers of a partition never see the writes made through its parent, and those of a parent
/// would log its children's keys as its own.
async fn refuse_inheritance(
    client: &Client,
    table: &TableInfo,
    endpoint: &str,
) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT (SELECT string_agg(format('%s', i.inhparent::regclass), ', ') \
                     FROM pg_catalog.pg_inherits i WHERE i.inhrelid = $1::text::regclass), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = $1::text::regclass)",
            &[&table.qualified()],
        )
        .await
        .map_err(Error::from_postgres)?;
    let (parents, children): (Option<String>, bool) = (row.get(0), row.get(1));
    let why = match (parents, children) {
        (Some(parents), _) => format!(
            "is a partition or an inheritance child of {parents}: its capture triggers would \
             miss every write made through {parents}"
        ),
        (None, true) => "has inheritance children: writes through it to its children would be \
                         captured as its own rows"
            .to_owned(),
        (None, false) => return Ok(()),
    };
    Err(config(format!(
        "table {} on `{endpoint}` {why} (statement triggers fire only on the table a statement \
         names); replicate it with mode = \"logical\", which sees every row where it is stored, \
         or remove it from replicator.tables",
        table.display()
    )))
}

/// How `table` is emptied on the target (before a copy, or for a TRUNCATE of the source):
/// `TRUNCATE`, unless foreign keys tie it to other tables there.
/// - Other tables' keys that reference it make `TRUNCATE` refuse it. When every such key is
///   `DEFERRABLE` and `ON DELETE NO ACTION` (as docs/replication.md asks of keys between
///   replicated tables), its rows are deleted with the checks deferred to the commit, by when
///   the copy (or the other tables' changes) put back what they reference. Any other key would
///   change or refuse the referencing rows: `TRUNCATE` then reports it.
/// - Its own deferrable checks (of its `DEFERRABLE` foreign, unique or exclusion keys, or
///   constraint triggers) may be pending for the rows a batch wrote to it, and `TRUNCATE`
///   refuses a table with pending checks (a source transaction that wrote rows, then truncated
///   the table, applied in several chunks; once a table is emptied this way, every deferrable
///   check is deferred for the rest of the target transaction): its rows are deleted.
///
/// `SET CONSTRAINTS ALL`, since a constraint's name is unique only per table, and naming one
/// also names any other of that name in its schema.
pub(crate) async fn emptying(client: &Client, table: &TableInfo) -> Result<String, Error> {
    let row = client
        .query_one(
            "SELECT count(c.oid), bool_and(c.condeferrable AND c.confdeltype = 'a'), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g \
                            WHERE g.tgrelid = t.oid AND g.tgdeferrable) \
             FROM (SELECT $1::text::regclass::oid AS oid) t \
             LEFT JOIN pg_catalog.pg_constraint c ON c.contype = 'f' AND c.confrelid = t.oid \
               AND c.conrelid <> t.oid \
             GROUP BY t.oid",
            &[&table.qualified()],
        )
        .await
        .map_err(Error::from_postgres)?;
    let (referenced, deferrable, pending): (i64, Option<bool>, bool) =
        (row.get(0), row.get(1), row.get(2));
    let delete = if referenced > 0 {
        deferrable == Some(true)
    } else {
        pending
    };
    Ok(if delete {
        format!(
            "SET CONSTRAINTS ALL DEFERRED; DELETE FROM ONLY {}",
            table.qualified()
        )
    } else {
        format!("TRUNCATE {}", table.qualified())
    })
}

/// The types of `table`'s columns on a target, checking that the target has every column.
pub(crate) async fn target_types(
    client: &Client,
    table: &TableInfo,
    endpoint: &str,
) -> Result<Vec<String>, Error> {
    let fix = "create it there (schema changes go to the replicas first)";
    let on_target = match catalog::load(client, &table.schema, &table.name)
        .await
        .map_err(Error::from_postgres)?
    {
        Ok(info) => info,
        Err(CatalogProblem::Missing) => {
            return Err(config(format!(
                "table {} does not exist on target `{endpoint}`: {fix}",
                table.display()
            )))
        }
        Err(CatalogProblem::NoPrimaryKey) => {
            return Err(config(format!(
                "table {} has no primary key on target `{endpoint}`: give it the primary key it \
                 has on the primary",
                table.display()
            )))
        }
    };
    let same_key = on_target
        .key_columns()
        .map(|c| &c.name)
        .eq(table.key_columns().map(|c| &c.name));
    if !same_key {
        return Err(config(format!(
            "table {} has another primary key on target `{endpoint}`: give it the primary key it \
             has on the primary",
            table.display()
        )));
    }
    if deferrable_key(client, table).await? {
        return Err(config(format!(
            "table {} has a DEFERRABLE primary key on target `{endpoint}`: the replicator \
             upserts with ON CONFLICT, which cannot use it; give it one that is not DEFERRABLE \
             there ({RECREATE_KEY})",
            table.display()
        )));
    }
    // An UPDATE can set a `GENERATED ALWAYS` identity column only to its default: the upsert of
    // a row whose value for it came from the primary would fail (a key column is never set).
    let always: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass \
             AND attnum > 0 AND NOT attisdropped AND attidentity = 'a'",
            &[&table.qualified()],
        )
        .await
        .map_err(Error::from_postgres)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if let Some(column) = table
        .columns
        .iter()
        .enumerate()
        .find(|(i, c)| !table.key.contains(i) && always.contains(&c.name))
        .map(|(_, c)| c)
    {
        return Err(config(format!(
            "column {}.{} is GENERATED ALWAYS AS IDENTITY on target `{endpoint}`: the replicator \
             writes the primary's values, which an UPDATE cannot give such a column; run ALTER \
             TABLE {} ALTER COLUMN {} SET GENERATED BY DEFAULT there (its sequence is not used \
             on a replica)",
            table.display(),
            column.name,
            table.qualified(),
            quote_ident(&column.name)
        )));
    }
    table
        .columns
        .iter()
        .map(|column| {
            on_target
                .columns
                .iter()
                .find(|c| c.name == column.name)
                .map(|c| c.type_name.clone())
                .ok_or_else(|| {
                    config(format!(
                        "column {}.{} does not exist on target `{endpoint}`: {fix}",
                        table.display(),
                        column.name
                    ))
                })
        })
        .collect()
}

/// The change table of `table` in `schema` (quoted), named after the table.
pub(crate) fn change_table(schema: &str, table: &TableInfo) -> String {
    format!(
        "{}.{}",
        quote_ident(schema),
        quote_ident(&object_name(table, ""))
    )
}

/// The name of a per-table object: `schema.table` with a suffix, shortened with a hash when it
/// would pass PostgreSQL's 63-byte limit.
fn object_name(table: &TableInfo, suffix: &str) -> String {
    let full = format!("{}.{}", table.schema, table.name);
    if full.len() + suffix.len() <= 63 {
        return format!("{full}{suffix}");
    }
    // FNV-1a: stable across builds and platforms.
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut cut = 63 - suffix.len() - 17;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{hash:016x}{suffix}", &full[..cut])
}

/// The capture functions of `table`: the statement trigger's, and the row trigger's that logs
/// the old key of a row whose key changed.
pub(crate) fn capture_functions(schema: &str, table: &TableInfo) -> [String; 2] {
    ["/capture", "/capture_key"].map(|suffix| {
        format!(
            "{}.{}",
            quote_ident(schema),
            quote_ident(&object_name(table, suffix))
        )
    })
}

/// The suffixes of the capture triggers' names (`<schema>_capture_<event>`), one trigger each
/// per table.
pub(crate) const TRIGGER_EVENTS: [&str; 5] = ["insert", "update", "key", "delete", "truncate"];

/// The notification channel the capture triggers signal.
pub(crate) fn channel(schema: &str) -> String {
    format!("{schema}_changes")
}

/// How long installing a table's triggers waits for the table's lock. While it waits, every
/// new write to the table queues behind it, so a long transaction holding the table makes the
/// install fail (and be retried) rather than stall the application's writes.
const INSTALL_LOCK_TIMEOUT: &str = "5s";

/// The SQL that installs trigger capture for `tables`: one transaction for the shared objects,
/// then one per table. A table's transaction holds only that table's lock, so installing
/// never deadlocks with application transactions that write several of the tables; a write
/// made before a table's triggers existed has ended before they commit (creating a trigger
/// waits for the table's writers), so a copy taken after the install sees it.
pub(crate) fn trigger_sql(settings: &ReplicatorSettings, tables: &[TableInfo]) -> String {
    let schema = quote_ident(&settings.schema);
    // The truncated table's oid: a table renamed away and back is still the same one.
    let truncated_oid = add_column(&format!("{schema}.truncations"), "relid", "oid");
    // One install at a time (the targets of a herd start together, and so do herds): `IF NOT
    // EXISTS` does not keep two concurrent `CREATE`s of one object from failing.
    let begin = format!(
        "BEGIN;\nSET LOCAL lock_timeout = '{INSTALL_LOCK_TIMEOUT}';\n\
         SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({}));\n",
        quote_literal(&format!("{} install", settings.schema))
    );
    // Literals are written for `standard_conforming_strings = on` (the default since 9.1).
    let mut sql = format!(
        "SET standard_conforming_strings = on;\n\
         {begin}\
         CREATE SCHEMA IF NOT EXISTS {schema};\n\
         CREATE TABLE IF NOT EXISTS {schema}.truncations (tbl text NOT NULL, \
           txid xid8 NOT NULL DEFAULT pg_current_xact_id());\n\
         {truncated_oid}\
         CREATE INDEX IF NOT EXISTS truncations_txid ON {schema}.truncations (txid);\n\
         CREATE TABLE IF NOT EXISTS {schema}.consumers (target text PRIMARY KEY, \
           snapshot pg_snapshot NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());\n\
         CREATE TABLE IF NOT EXISTS {schema}.recopies (tbl text NOT NULL, \
           txid xid8 NOT NULL DEFAULT pg_current_xact_id());\n\
         CREATE INDEX IF NOT EXISTS recopies_txid ON {schema}.recopies (txid);\n\
         CREATE TABLE IF NOT EXISTS {schema}.captured (tbl text PRIMARY KEY, relid oid NOT NULL);\n\
         COMMIT;\n"
    );
    let trigger_names: Vec<String> = TRIGGER_EVENTS
        .iter()
        .map(|event| quote_literal(&format!("{}_capture_{event}", settings.schema)))
        .collect();
    let trigger_names = format!("ARRAY[{}]", trigger_names.join(", "));
    let notify = if settings.notify {
        format!(
            "PERFORM pg_catalog.pg_notify({}, '');",
            quote_literal(&channel(&settings.schema))
        )
    } else {
        String::new()
    };
    for table in tables {
        let log = change_table(&settings.schema, table);
        let [function, key_function] = capture_functions(&settings.schema, table);
        let keys: Vec<String> = table.key_columns().map(|c| quote_ident(&c.name)).collect();
        let keys = keys.join(", ");
        // One row per statement, holding the statement's keys in one array per key column: a
        // bulk statement writes one row, not one per changed row.
        let key_defs: Vec<String> = table
            .key_columns()
            .map(|c| format!("{} {}[] NOT NULL", quote_ident(&c.name), c.type_name))
            .collect();
        let aggregate = |rows: &str| -> String {
            let arrays: Vec<String> = table
                .key_columns()
                .map(|c| format!("pg_catalog.array_agg({})", quote_ident(&c.name)))
                .collect();
            format!(
                "SELECT {} FROM {rows} HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>) 0",
                arrays.join(", ")
            )
        };
        let inserted = aggregate("new_rows");
        let updated = inserted.clone();
        let deleted = aggregate("old_rows");
        // An UPDATE logs the new keys; the old key of a row whose key changed is logged by a
        // row-level trigger that fires only for such rows (its WHEN clause is evaluated without
        // calling the function). Capturing the old rows of every UPDATE in a transition table
        // would cost every UPDATE a second copy of its rows.
        let key_changed: Vec<String> = table
            .key_columns()
            .map(|c| {
                let column = quote_ident(&c.name);
                format!("OLD.{column} IS DISTINCT FROM NEW.{column}")
            })
            .collect();
        let old_key: Vec<String> = table
            .key_columns()
            .map(|c| format!("ARRAY[OLD.{}]", quote_ident(&c.name)))
            .collect();
        // A key column whose type changed on the primary (`integer` to `bigint`) gets the new
        // type in the change table too: the old one could refuse the new values, and the
        // capture trigger would fail the application's writes.
        let retype: String = table
            .key_columns()
            .map(|c| {
                let column = quote_ident(&c.name);
                let wanted = format!("{}[]", c.type_name);
                let body = format!(
                    "BEGIN IF (SELECT format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute \
                     WHERE attrelid = {}::regclass AND attname = {}) IS DISTINCT FROM {} THEN \
                     ALTER TABLE {log} ALTER COLUMN {column} TYPE {wanted} USING {column}::text::{wanted}; \
                     END IF; END",
                    quote_literal(&log),
                    quote_literal(&c.name),
                    quote_literal(&wanted),
                );
                let tag = dollar_tag(&[&body]);
                format!("DO {tag}{body}{tag};\n")
            })
            .collect();
        // Large arrays stay uncompressed: compressing the keys of a bulk statement costs the
        // statement more than the space is worth (the rows live until every target applied them).
        let storage: String = table
            .key_columns()
            .map(|c| {
                let body = format!(
                    "BEGIN IF (SELECT attstorage FROM pg_catalog.pg_attribute WHERE attrelid = \
                     {}::regclass AND attname = {}) IS DISTINCT FROM 'e' THEN \
                     ALTER TABLE {log} ALTER COLUMN {} SET STORAGE EXTERNAL; END IF; END",
                    quote_literal(&log),
                    quote_literal(&c.name),
                    quote_ident(&c.name)
                );
                let tag = dollar_tag(&[&body]);
                format!("DO {tag}{body}{tag};\n")
            })
            .collect();
        let inserted_column = add_column(&log, "inserted", "boolean NOT NULL DEFAULT false");
        // An INSERT's keys are marked: a window in which a table only had rows inserted can
        // insert them on the target without looking for conflicts (see `TableChanges::fresh`).
        let inserted_rows = inserted.replacen("SELECT ", "SELECT true, ", 1);
        let index = quote_ident(&object_name(table, "/txid"));
        let name = table.qualified();
        let trigger = |event: &str| quote_ident(&format!("{}_capture_{event}", settings.schema));
        // The functions run as their owner (`SECURITY DEFINER`): the application's roles need
        // no privilege on the change tables. They run with the caller's `search_path`, so every
        // name in them is qualified: an object of the caller's schemas is never used instead.
        // A TRUNCATE is recorded under the name the table has when it runs: a table renamed
        // away (replaced by another under its name) keeps its triggers, and its TRUNCATE must
        // not empty its successor on the targets.
        let capture_body = format!(
            "\n\
             BEGIN\n\
               IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN\n\
                 INSERT INTO {log} (inserted, {keys}) {inserted_rows};\n\
               ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN\n\
                 INSERT INTO {log} ({keys}) {deleted};\n\
               ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN\n\
                 INSERT INTO {log} ({keys}) {updated};\n\
               ELSE\n\
                 INSERT INTO {schema}.truncations (tbl, relid) \
                   VALUES (pg_catalog.format('%s.%s', TG_TABLE_SCHEMA, TG_TABLE_NAME), TG_RELID);\n\
               END IF;\n\
               {notify}\n\
               RETURN NULL;\n\
             END\n"
        );
        let key_body = format!(
            "\n\
             BEGIN\n\
               INSERT INTO {log} ({keys}) VALUES ({});\n\
               RETURN NULL;\n\
             END\n",
            old_key.join(", ")
        );
        // The key's columns changed (a new primary key): the change table is made again with
        // the new ones, and the table copied again, since its rows logged under the old key
        // name no row of the new one. Left as it is, its old key columns (`NOT NULL`) would
        // refuse every row the capture functions log.
        let mut wanted: Vec<&str> = table.key_columns().map(|c| c.name.as_str()).collect();
        wanted.sort_unstable();
        let wanted: Vec<String> = wanted.into_iter().map(quote_literal).collect();
        let rekey_body = format!(
            "BEGIN IF to_regclass({log_literal}) IS NOT NULL AND ARRAY(SELECT a.attname::text \
             FROM pg_catalog.pg_attribute a WHERE a.attrelid = to_regclass({log_literal}) \
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attname NOT IN ({own}) \
             ORDER BY a.attname::text COLLATE \"C\") IS DISTINCT FROM ARRAY[{}]::text[] THEN \
             DROP TABLE {log}; INSERT INTO {schema}.recopies (tbl) VALUES ({}); END IF; END",
            wanted.join(", "),
            quote_literal(&table.display()),
            log_literal = quote_literal(&log),
            own = change_table_columns_sql(),
        );
        let rekey_tag = dollar_tag(&[&rekey_body]);
        let rekey = format!("DO {rekey_tag}{rekey_body}{rekey_tag};\n");
        let tag = dollar_tag(&[&capture_body, &key_body]);
        // A table captured before whose triggers are missing or not firing, or that is another
        // table now (created again, restored, swapped by renames), may have had writes that
        // were never logged: every target copies it again when its window reaches this
        // record (see `trigger::step`).
        let display = quote_literal(&table.display());
        let relid = format!("{}::regclass", quote_literal(&name));
        // Captured before: its change table exists (also under versions without
        // `pgherd.captured`), or `captured` has it. Its `captured` row is locked first: a
        // step's not-captured mark (see `trigger::step`) made meanwhile waits for this install,
        // then finds the row as the install left it, instead of being overwritten by it.
        let recopy = format!(
            "INSERT INTO {schema}.recopies (tbl) SELECT {display} \
               WHERE (to_regclass({}) IS NOT NULL \
                 OR EXISTS (SELECT 1 FROM {schema}.captured WHERE tbl = {display})) \
               AND ((SELECT relid FROM {schema}.captured WHERE tbl = {display}) <> {relid} \
                 OR (SELECT count(*) FROM pg_catalog.pg_trigger t WHERE t.tgrelid = {relid} \
                   AND t.tgname = ANY({trigger_names}) AND t.tgenabled IN ('O', 'A')) <> {});\n",
            quote_literal(&log),
            TRIGGER_EVENTS.len()
        );
        sql.push_str(&format!(
            "{begin}\
             LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE;\n\
             SELECT 1 FROM {schema}.captured WHERE tbl = {display} FOR UPDATE;\n\
             {recopy}\
             {rekey}\
             CREATE TABLE IF NOT EXISTS {log} (txid xid8 NOT NULL DEFAULT pg_current_xact_id(), \
               inserted boolean NOT NULL DEFAULT false, {});\n\
             {inserted_column}\
             {retype}\
             {storage}\
             CREATE INDEX IF NOT EXISTS {index} ON {log} (txid);\n\
             CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql \
               SECURITY DEFINER AS {tag}{capture_body}{tag};\n\
             CREATE OR REPLACE FUNCTION {key_function}() RETURNS trigger LANGUAGE plpgsql \
               SECURITY DEFINER AS {tag}{key_body}{tag};\n\
             CREATE OR REPLACE TRIGGER {} AFTER INSERT ON {name} REFERENCING NEW TABLE AS new_rows \
               FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
             CREATE OR REPLACE TRIGGER {} AFTER UPDATE ON {name} REFERENCING NEW TABLE AS new_rows \
               FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
             CREATE OR REPLACE TRIGGER {} AFTER UPDATE ON {name} FOR EACH ROW WHEN ({}) \
               EXECUTE FUNCTION {key_function}();\n\
             CREATE OR REPLACE TRIGGER {} AFTER DELETE ON {name} REFERENCING OLD TABLE AS old_rows \
               FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
             CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {name} \
               FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
             REVOKE ALL ON FUNCTION {function}(), {key_function}() FROM PUBLIC;\n\
             INSERT INTO {schema}.captured (tbl, relid) VALUES ({display}, {relid}) \
               ON CONFLICT (tbl) DO UPDATE SET relid = EXCLUDED.relid;\n\
             COMMIT;\n",
            key_defs.join(", "),
            trigger("insert"),
            trigger("update"),
            trigger("key"),
            key_changed.join(" OR "),
            trigger("delete"),
            trigger("truncate"),
        ));
    }
    sql
}

/// Adds `column` to `table` (a quoted name) unless it has it. Checked first, since `ALTER TABLE`
/// takes its `ACCESS EXCLUSIVE` lock before it looks, and waits for every step that reads the
/// table (`IF NOT EXISTS` does not spare the wait).
fn add_column(table: &str, column: &str, definition: &str) -> String {
    let body = format!(
        "BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = {}::regclass \
         AND attname = {} AND NOT attisdropped) THEN ALTER TABLE {table} ADD COLUMN {} {definition}; \
         END IF; END",
        quote_literal(table),
        quote_literal(column),
        quote_ident(column),
    );
    let tag = dollar_tag(&[&body]);
    format!("DO {tag}{body}{tag};\n")
}

/// A dollar-quote tag that occurs in none of `bodies` (which hold quoted names, and a name may
/// contain anything): `$pgherd$`, or `$pgherd1$`, `$pgherd2$`, ...
fn dollar_tag(bodies: &[&str]) -> String {
    let mut tag = "$pgherd$".to_owned();
    let mut n = 0;
    while bodies.iter().any(|body| body.contains(&tag)) {
        n += 1;
        tag = format!("$pgherd{n}$");
    }
    tag
}

/// Installs (or re-applies) trigger capture for `tables` on `client`, the primary.
pub(crate) async fn install_triggers(
    client: &Client,
    settings: &ReplicatorSettings,
    tables: &[TableInfo],
) -> Result<(), tokio_postgres::Error> {
    let result = client.batch_execute(&trigger_sql(settings, tables)).await;
    if result.is_err() {
        // A failed statement leaves its transaction open and aborted: end it, so that the
        // connection can be used again. The error that matters is the first one.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// The publication of `target` in `logical` mode.
pub(crate) fn publication(settings: &ReplicatorSettings, target: &str) -> String {
    format!("{}_{target}", settings.schema)
}

/// Creates the target's publication on the primary for `tables`. When it exists, `exact` sets
/// its table list to `tables`; otherwise only the tables it lacks are added. Only the target's
/// active replicator removes tables (after the target's progress row stopped listing them, see
/// `run::forget_tables`): a table that leaves the publication stops reaching the slot, and
/// adding it back must copy it.
pub(crate) async fn install_publication(
    client: &Client,
    settings: &ReplicatorSettings,
    target: &str,
    tables: &[TableInfo],
    exact: bool,
) -> Result<(), tokio_postgres::Error> {
    let name = publication(settings, target);
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .is_some();
    let mut listed: Vec<&TableInfo> = tables.iter().collect();
    if exists && !exact {
        let published: Vec<(String, String)> = client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables \
                 WHERE pubname = $1",
                &[&name],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        listed.retain(|t| !published.contains(&(t.schema.clone(), t.name.clone())));
        if listed.is_empty() {
            return Ok(());
        }
    }
    // ONLY: an inheritance parent's children are not replicated through it.
    let list: Vec<String> = listed
        .iter()
        .map(|table| format!("ONLY {}", table.qualified()))
        .collect();
    let (verb, clause) = match (exists, exact) {
        (false, _) => ("CREATE", "FOR TABLE"),
        (true, true) => ("ALTER", "SET TABLE"),
        (true, false) => ("ALTER", "ADD TABLE"),
    };
    client
        .batch_execute(&format!(
            "{verb} PUBLICATION {} {clause} {}",
            quote_ident(&name),
            list.join(", ")
        ))
        .await
}

/// The SQL that creates the progress table on a target.
pub(crate) fn progress_sql(schema: &str) -> String {
    let lock = quote_literal(&format!("{schema} install"));
    let schema = quote_ident(schema);
    // One at a time (herds start together): see `trigger_sql`. A batch of statements is one
    // transaction, to whose end the lock is held.
    format!(
        "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({lock}));\n\
         CREATE SCHEMA IF NOT EXISTS {schema};\n\
         CREATE TABLE IF NOT EXISTS {schema}.progress (\n\
           source text PRIMARY KEY,\n\
           mode text NOT NULL,\n\
           batch bigint NOT NULL,\n\
           snapshot pg_snapshot,\n\
           lsn pg_lsn,\n\
           copy_snapshot pg_snapshot,\n\
           copy_lsn pg_lsn,\n\
           system_id text,\n\
           timeline integer,\n\
           tables text[] NOT NULL DEFAULT '{{}}',\n\
           source_time timestamptz,\n\
           applied_at timestamptz NOT NULL DEFAULT now());"
    )
}

fn config(detail: String) -> Error {
    Error::new(ErrorKind::Config).with_detail(detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::catalog::ColumnInfo;

    fn table(schema: &str, name: &str) -> TableInfo {
        TableInfo {
            oid: 0,
            schema: schema.to_owned(),
            name: name.to_owned(),
            columns: vec![ColumnInfo {
                name: "id".to_owned(),
                type_name: "bigint".to_owned(),
                collation: None,
            }],
            key: vec![0],
            attnums: vec![1],
            dropped: Vec::new(),
            missing: vec![None; 1],
            type_oids: vec![20],
            natts: 0,
        }
    }

    #[test]
    fn object_names_fit_postgres_limit() {
        assert_eq!(
            object_name(&table("public", "orders"), "/txid"),
            "public.orders/txid"
        );
        let long = table("public", &"x".repeat(70));
        let name = object_name(&long, "/capture");
        assert!(name.len() <= 63, "{name}");
        assert!(name.ends_with("/capture"));
        assert_ne!(
            name,
            object_name(&table("public", &"x".repeat(71)), "/capture")
        );
    }

    #[test]
    fn trigger_sql_quotes_names_and_logs_the_old_key_of_a_key_change() {
        let settings = ReplicatorSettings::default();
        let sql = trigger_sql(&settings, &[table("shop", "Or\"ders")]);
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS \"pgherd\".\"shop.Or\"\"ders\""),
            "{sql}"
        );
        assert!(
            sql.contains(
                "AFTER UPDATE ON \"shop\".\"Or\"\"ders\" FOR EACH ROW WHEN (OLD.\"id\" IS DISTINCT FROM \
                 NEW.\"id\") EXECUTE FUNCTION \"pgherd\".\"shop.Or\"\"ders/capture_key\"()"
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                "INSERT INTO \"pgherd\".\"shop.Or\"\"ders\" (\"id\") VALUES (ARRAY[OLD.\"id\"])"
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                "INSERT INTO \"pgherd\".\"shop.Or\"\"ders\" (inserted, \"id\") SELECT true, \
                 pg_catalog.array_agg(\"id\") FROM new_rows HAVING pg_catalog.count(*) \
                 OPERATOR(pg_catalog.>) 0"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("ALTER COLUMN \"id\" SET STORAGE EXTERNAL"),
            "{sql}"
        );
        // Each table's objects in a transaction of their own that locks the table first (after
        // the lock that keeps installs one at a time).
        assert!(
            sql.contains(
                "BEGIN;\nSET LOCAL lock_timeout = '5s';\n\
                 SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgherd install'));\n\
                 LOCK TABLE \"shop\".\"Or\"\"ders\" IN SHARE ROW EXCLUSIVE MODE;"
            ),
            "{sql}"
        );
        assert!(sql.contains("AFTER TRUNCATE ON \"shop\".\"Or\"\"ders\""));
        assert!(sql.contains("pg_notify('pgherd_changes', '')"));
        assert!(
            sql.contains("LANGUAGE plpgsql SECURITY DEFINER AS $pgherd$\nBEGIN"),
            "{sql}"
        );
    }

    #[test]
    fn function_bodies_are_quoted_with_a_tag_they_do_not_contain() {
        assert_eq!(dollar_tag(&["BEGIN x END"]), "$pgherd$");
        assert_eq!(dollar_tag(&["a", "\"t$pgherd$\" $pgherd1$"]), "$pgherd2$");
        let sql = trigger_sql(
            &ReplicatorSettings::default(),
            &[table("shop", "t$pgherd$; DROP TABLE x; $pgherd$")],
        );
        assert!(
            sql.contains("LANGUAGE plpgsql SECURITY DEFINER AS $pgherd1$\nBEGIN"),
            "{sql}"
        );
        assert!(!sql.contains("SECURITY DEFINER AS $pgherd$"), "{sql}");
    }
}
