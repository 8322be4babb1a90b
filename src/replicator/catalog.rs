//! What the replicator knows of a table: its columns, their types and its primary key, read
//! from the catalogs. A table without a primary key is refused: rows could not be matched.

use tokio_postgres::Client;

use crate::sql::quote_ident;

/// A column the replicator moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnInfo {
    pub(crate) name: String,
    /// The type as SQL writes it (`format_type`), e.g. `numeric(12,2)` or `text[]`.
    pub(crate) type_name: String,
    /// The column's collation, qualified and quoted, when it is not the database's default: a
    /// nondeterministic one (case-insensitive, say) makes values equal that differ in text.
    pub(crate) collation: Option<String>,
}

/// A replicated table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableInfo {
    /// The table's `oid` on the source (0 where unknown): what identifies it in a logical
    /// stream, whatever it is named at the time of a change.
    pub(crate) oid: u32,
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Every stored column, in table order (generated and dropped columns are left out).
    pub(crate) columns: Vec<ColumnInfo>,
    /// The positions in `columns` of the primary key's columns, in key order.
    pub(crate) key: Vec<usize>,
    /// Each column's number in the table (`attnum`): columns added later get higher ones.
    pub(crate) attnums: Vec<i16>,
    /// The numbers of the columns dropped so far, in order.
    pub(crate) dropped: Vec<i16>,
    /// Each column's value, as text, in the rows that existed when it was added (PostgreSQL's
    /// `attmissingval`: the default it was added with; `None` for NULL).
    pub(crate) missing: Vec<Option<String>>,
    /// Each column's type (`atttypid`), as a `Relation` message names it.
    pub(crate) type_oids: Vec<u32>,
    /// The table's column count (`relnatts`, dropped and generated columns included): a column
    /// added since this was read makes it grow.
    pub(crate) natts: i16,
}

impl TableInfo {
    /// `"schema"."table"`.
    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `schema.table`, for people.
    pub(crate) fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// What a step compares with the catalogs to notice the table replaced or a column added:
    /// `oid/relnatts`, as [`SHAPE_SQL`] reads it.
    pub(crate) fn shape(&self) -> String {
        format!("{}/{}", self.oid, self.natts)
    }

    pub(crate) fn key_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.key.iter().map(|&index| &self.columns[index])
    }
}

/// An expression of the shape ([`TableInfo::shape`]) of each table named in `$2` (qualified
/// names), in order: `-` where no table has the name.
pub(crate) const SHAPE_SQL: &str = "ARRAY(SELECT coalesce(c.oid::text || '/' || c.relnatts, '-') \
     FROM unnest($2::text[]) WITH ORDINALITY AS d(name, i) \
     LEFT JOIN pg_catalog.pg_class c ON c.oid = to_regclass(d.name) ORDER BY d.i)";

/// Why a table cannot be replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CatalogProblem {
    Missing,
    NoPrimaryKey,
}

/// `attmissingval` is a one-element array of the column's type, and its element's text is taken
/// out of the array's text form by hand rather than by a cast to `text[]`: the cast splits at
/// commas, but the element type sets the delimiter (`box` and `box[]` use `;`). One element is
/// `{text}`, or `{"text"}` with `"` and `\` escaped by a backslash when it holds a delimiter,
/// brace, quote, backslash or space, or reads `NULL`; `chr(92)` is the backslash, spelt so
/// whatever `standard_conforming_strings` says.
const COLUMNS_SQL: &str = "\
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), c.oid, \
       coalesce((SELECT k.n FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n) \
                 WHERE k.att = a.attnum AND k.n <= i.indnkeyatts), 0)::int4, a.attnum, \
       ARRAY(SELECT d.attnum FROM pg_catalog.pg_attribute d WHERE d.attrelid = c.oid \
             AND d.attnum > 0 AND d.attisdropped ORDER BY d.attnum), \
       CASE WHEN NOT a.atthasmissing OR m.v = '{NULL}' THEN NULL \
            WHEN m.v LIKE '{\"%' THEN pg_catalog.regexp_replace(substr(m.v, 3, length(m.v) - 4), \
                                         repeat(chr(92), 2) || '(.)', chr(92) || '1', 'g') \
            ELSE substr(m.v, 2, length(m.v) - 2) END, \
       a.atttypid, \
       (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) \
        FROM pg_catalog.pg_collation co JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
        WHERE co.oid = a.attcollation AND co.oid <> 100), \
       c.relnatts \
FROM pg_catalog.pg_class c \
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
CROSS JOIN LATERAL (SELECT a.attmissingval::text AS v) m \
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary \
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r' AND a.attgenerated = '' \
ORDER BY a.attnum";

/// Reads a table's columns and primary key.
pub(crate) async fn load(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Result<TableInfo, CatalogProblem>, tokio_postgres::Error> {
    let rows = client.query(COLUMNS_SQL, &[&schema, &name]).await?;
    if rows.is_empty() {
        return Ok(Err(CatalogProblem::Missing));
    }
    let mut columns = Vec::with_capacity(rows.len());
    let mut attnums = Vec::with_capacity(rows.len());
    let mut missing = Vec::with_capacity(rows.len());
    let mut type_oids = Vec::with_capacity(rows.len());
    let mut key: Vec<(i32, usize)> = Vec::new();
    for row in &rows {
        let position: i32 = row.get(3);
        if position > 0 {
            key.push((position, columns.len()));
        }
        attnums.push(row.get(4));
        missing.push(row.get(6));
        type_oids.push(row.get(7));
        columns.push(ColumnInfo {
            name: row.get(0),
            type_name: row.get(1),
            collation: row.get(8),
        });
    }
    if key.is_empty() {
        return Ok(Err(CatalogProblem::NoPrimaryKey));
    }
    key.sort_unstable();
    Ok(Ok(TableInfo {
        oid: rows[0].get(2),
        schema: schema.to_owned(),
        name: name.to_owned(),
        columns,
        key: key.into_iter().map(|(_, index)| index).collect(),
        attnums,
        dropped: rows[0].get(5),
        missing,
        type_oids,
        natts: rows[0].get(9),
    }))
}
