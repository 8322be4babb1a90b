//! A randomized, reproducible, concurrent write workload over a few tables, and a table-by-table
//! comparison of two databases: to check that a replica ends up exactly equal to its primary.
//!
//! The workload is a pure function of its [`WorkloadSpec`]: each writer draws its transactions
//! from its own seeded generator, and what it draws never depends on what the server answered,
//! so one writer on an empty schema makes the same database every time. Several writers make
//! the interleavings (conflicts, deadlocks, commits out of transaction-id order) a replicator
//! has to cope with.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pgherd::testkit::{workload::{self, WorkloadSpec}, Topology};
//!
//! let topology = Topology::builder().replica("replica").start().await?;
//! let primary = topology.primary().connect().await?;
//! let replica = topology.node("replica").connect().await?;
//! workload::create_schema(&primary).await?;
//! workload::create_schema(&replica).await?;
//! let report = workload::run(&topology.primary().config(), &WorkloadSpec::new(7)).await?;
//! println!("{} transactions committed", report.committed);
//! // ... replicate from the primary to the replica, then:
//! if let Err(differences) = workload::compare(&primary, &replica, workload::TABLES).await? {
//!     panic!("the replica differs from the primary:\n{differences}");
//! }
//! # Ok(()) }
//! ```

use std::{collections::BTreeMap, fmt::Write as _};

use futures_util::future::try_join_all;
use tokio_postgres::{error::SqlState, types::ToSql, Client, Config, Error, NoTls};

use crate::sql::quote_ident;

/// The tables the workload writes, created by [`create_schema`].
pub const TABLES: &[&str] = &["public.wl_accounts", "public.wl_orders", "public.wl_docs"];

/// Keys are drawn from bounded spaces so that updates, deletes and conflicting inserts hit
/// existing rows. A key that changes moves to `key + 100000`, and back.
const ACCOUNTS: i64 = 600;
const ORDER_NOS: i64 = 120;
const DOCS: i64 = 200;
const REGIONS: &[&str] = &["north", "süd", "o'east", "\"west\"", "中部"];
/// Text values: empty, quotes, backslashes, control characters, unicode, a literal `NULL`.
const WORDS: &[&str] = &[
    "alpha",
    "",
    "it's",
    "\"quoted\"",
    "naïve café",
    "日本語",
    "🐘 elephant",
    "back\\slash",
    "tab\tnew\nline",
    "comma, {brace}",
    "NULL",
    "  spaces  ",
];
/// Every `TRUNCATE` a writer may run, at most.
const TRUNCATES_PER_WRITER: usize = 3;

/// Creates the workload tables (idempotent: `IF NOT EXISTS`) on a database: `wl_accounts` (a
/// `bigint` key), `wl_orders` (a composite key of `text` and `int`, mixed types) and `wl_docs`
/// (a `uuid` key and a `body` that is sometimes over 8 kB, so stored out of line by TOAST).
///
/// # Errors
///
/// When a statement fails.
pub async fn create_schema(client: &Client) -> Result<(), Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS public.wl_accounts (
                 id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL,
                 tags text[], updated timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS public.wl_orders (
                 region text, order_no int, amount double precision, paid boolean, meta jsonb,
                 note varchar(40), PRIMARY KEY (region, order_no));
             CREATE TABLE IF NOT EXISTS public.wl_docs (
                 id uuid PRIMARY KEY, body text, blob bytea, seen date, ratio real,
                 span interval);",
        )
        .await
}

/// What to run.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Seeds every writer's generator (with the writer's index): the same spec draws the same
    /// transactions.
    pub seed: u64,
    /// Concurrent connections, each writing its own stream of transactions. With one writer the
    /// resulting database is reproducible.
    pub writers: usize,
    /// Transactions per writer.
    pub transactions: usize,
    /// Whether about 1 in 10 transactions is long (10 to 40 statements with short pauses), so
    /// that short ones commit meanwhile and commit order differs from transaction-id order.
    pub long_transactions: bool,
    /// Whether about 1 in 200 transactions truncates a table (at most 3 per writer).
    pub truncates: bool,
}

impl WorkloadSpec {
    /// 4 writers of 150 transactions each, long transactions and truncates on.
    pub fn new(seed: u64) -> Self {
        WorkloadSpec {
            seed,
            writers: 4,
            transactions: 150,
            long_transactions: true,
            truncates: true,
        }
    }
}

/// What ran.
#[derive(Debug, Clone, Default)]
pub struct WorkloadReport {
    /// Transactions that committed.
    pub committed: usize,
    /// Transactions rolled back: on purpose (about 1 in 15), or after a deadlock, a
    /// serialization failure or a unique violation.
    pub rolled_back: usize,
    /// Statements that succeeded, in committed and rolled-back transactions alike (the pauses
    /// of long transactions not counted).
    pub statements: usize,
    /// `TRUNCATE`s in committed transactions.
    pub truncates: usize,
}

/// Runs the workload against the database `config` points at, with `spec.writers` concurrent
/// connections, each doing `spec.transactions` transactions. The tables must exist (see
/// [`create_schema`]).
///
/// Concurrent writers deadlock now and then, and the server takes `deadlock_timeout` (1 s by
/// default) to notice each time, which dominates the run time: start servers for it with a
/// shorter one, e.g. `.server_setting("deadlock_timeout", "'50ms'")`.
///
/// # Errors
///
/// When a connection fails, or a statement fails other than by a deadlock, a serialization
/// failure or a unique violation (those roll the transaction back, and the run goes on).
pub async fn run(config: &Config, spec: &WorkloadSpec) -> Result<WorkloadReport, Error> {
    let reports = try_join_all((0..spec.writers).map(|index| writer(config, spec, index))).await?;
    Ok(reports
        .into_iter()
        .fold(WorkloadReport::default(), |total, one| WorkloadReport {
            committed: total.committed + one.committed,
            rolled_back: total.rolled_back + one.rolled_back,
            statements: total.statements + one.statements,
            truncates: total.truncates + one.truncates,
        }))
}

/// An order-independent-of-physical-layout digest of a table: md5 over all rows ordered by primary
/// key, plus the row count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    /// The table, as given to [`digest`].
    pub table: String,
    /// How many rows it has.
    pub rows: i64,
    /// The md5 of the text form of every row (`t::text`), ordered by primary key, joined by
    /// newlines.
    pub md5: String,
}

/// The [`TableDigest`] of `table` (a name as SQL reads it, `schema.name` or `name`), computed on
/// the server. Text forms are pinned (UTC, ISO dates, hex bytea, shortest exact floats; text keys
/// ordered by `COLLATE "C"`), so servers with other settings give equal digests for equal data.
/// A table without a primary key is ordered by whole rows.
///
/// Runs a short read-only transaction of its own on `client`, which must not be inside one.
///
/// # Errors
///
/// When the table does not exist or a query fails.
pub async fn digest(client: &Client, table: &str) -> Result<TableDigest, Error> {
    let shape = Shape::read(client, table).await?;
    let sql = format!(
        "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY {}), '')) FROM {} t",
        shape.order_by, shape.name
    );
    let rows = pinned(client, &sql).await?;
    // An aggregate without GROUP BY returns exactly one row.
    Ok(TableDigest {
        table: table.to_owned(),
        rows: rows[0].get(0),
        md5: rows[0].get(1),
    })
}

/// Compares every table of `tables` on the two databases. `Ok(Ok(()))` when all are equal;
/// `Ok(Err(text))` otherwise, the text listing each differing table with both digests and, for
/// up to 5 differing keys, the key and what each side has there.
///
/// # Errors
///
/// When a table is missing on either side or a query fails.
pub async fn compare(
    primary: &Client,
    replica: &Client,
    tables: &[&str],
) -> Result<Result<(), String>, Error> {
    let mut differences = String::new();
    for table in tables {
        let (ours, theirs) = (digest(primary, table).await?, digest(replica, table).await?);
        if ours == theirs {
            continue;
        }
        let _ = writeln!(
            differences,
            "{table}: primary has {} rows (md5 {}), replica has {} rows (md5 {})",
            ours.rows, ours.md5, theirs.rows, theirs.md5
        );
        let (ours, theirs) = (
            keyed_rows(primary, table).await?,
            keyed_rows(replica, table).await?,
        );
        let mut keys: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
        keys.sort();
        keys.dedup();
        let differing = keys
            .into_iter()
            .filter(|key| ours.get(*key).map(|r| &r.0) != theirs.get(*key).map(|r| &r.0));
        for key in differing.take(5) {
            let side = |rows: &BTreeMap<String, (String, String)>| match rows.get(key) {
                Some((md5, preview)) => format!("{preview} (md5 {md5})"),
                None => "no row".to_owned(),
            };
            let _ = writeln!(
                differences,
                "  key {key}: primary has {}; replica has {}",
                side(&ours),
                side(&theirs)
            );
        }
    }
    Ok(if differences.is_empty() {
        Ok(())
    } else {
        Err(differences)
    })
}

/// A table's quoted name and primary key, from the catalog.
struct Shape {
    /// `"schema"."name"`.
    name: String,
    /// The primary key columns of `t` (`COLLATE "C"` on text-like ones), or the whole row.
    order_by: String,
    /// The key of a row of `t` as text: `ROW(key columns)::text`, or the whole row.
    key: String,
}

impl Shape {
    async fn read(client: &Client, table: &str) -> Result<Shape, Error> {
        let name = client
            .query_one(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::text::regclass",
                &[&table],
            )
            .await?;
        let columns = client
            .query(
                "SELECT a.attname::text, a.attcollation <> 0 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.position",
                &[&table],
            )
            .await?;
        let column = |row: &tokio_postgres::Row| format!("t.{}", quote_ident(row.get(0)));
        let (order_by, key) = if columns.is_empty() {
            ("t::text COLLATE \"C\"".to_owned(), "t::text".to_owned())
        } else {
            let order_by = columns.iter().map(|row| {
                let collate = if row.get(1) { " COLLATE \"C\"" } else { "" };
                format!("{}{collate}", column(row))
            });
            let key = columns.iter().map(column).collect::<Vec<_>>().join(", ");
            (
                order_by.collect::<Vec<_>>().join(", "),
                format!("ROW({key})::text"),
            )
        };
        Ok(Shape {
            name: format!("{}.{}", quote_ident(name.get(0)), quote_ident(name.get(1))),
            order_by,
            key,
        })
    }
}

/// Every row of `table` by key (as text): its md5 and the start of its text form.
async fn keyed_rows(
    client: &Client,
    table: &str,
) -> Result<BTreeMap<String, (String, String)>, Error> {
    let shape = Shape::read(client, table).await?;
    let sql = format!(
        "SELECT {}, md5(t::text), left(t::text, 160) FROM {} t",
        shape.key, shape.name
    );
    let rows = pinned(client, &sql).await?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect())
}

/// Runs a query in a read-only transaction whose text output settings are pinned.
async fn pinned(client: &Client, sql: &str) -> Result<Vec<tokio_postgres::Row>, Error> {
    client
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
             SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD';
             SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 1;
             SET LOCAL bytea_output = 'hex'",
        )
        .await?;
    let rows = client.query(sql, &[]).await;
    let end = client
        .batch_execute(if rows.is_ok() { "COMMIT" } else { "ROLLBACK" })
        .await;
    let rows = rows?;
    end?;
    Ok(rows)
}

/// One writer: its own connection and generator, its transactions one after another.
async fn writer(
    config: &Config,
    spec: &WorkloadSpec,
    index: usize,
) -> Result<WorkloadReport, Error> {
    let (mut client, connection) = config.connect(NoTls).await?;
    let connection = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "workload connection ended");
        }
    });
    let mut rng = Rng::new(spec.seed, index as u64);
    let mut report = WorkloadReport::default();
    let mut truncates_left = if spec.truncates {
        TRUNCATES_PER_WRITER
    } else {
        0
    };
    for _ in 0..spec.transactions {
        let plan = Plan::draw(&mut rng, spec.long_transactions, &mut truncates_left);
        plan.execute(&mut client, &mut report).await?;
    }
    drop(client);
    let _ = connection.await;
    Ok(report)
}

/// A bound parameter.
type Param = Box<dyn ToSql + Sync + Send>;

/// One step of a transaction.
enum Step {
    /// A statement and its parameters.
    Write(String, Vec<Param>),
    /// `pg_sleep` for this many seconds.
    Pause(f64),
}

/// One transaction, drawn before it runs (so that what is drawn never depends on the server).
struct Plan {
    steps: Vec<Step>,
    truncates: usize,
    rollback: bool,
}

impl Plan {
    fn draw(rng: &mut Rng, long_transactions: bool, truncates_left: &mut usize) -> Plan {
        let long = long_transactions && rng.chance(10);
        let count = if long { rng.int(10, 40) } else { rng.int(1, 5) };
        let mut steps = Vec::new();
        for position in 0..count {
            if long && position > 0 && rng.chance(3) {
                steps.push(Step::Pause(0.005 + 0.025 * rng.unit()));
            }
            steps.push(match rng.below(3) {
                0 => accounts(rng),
                1 => orders(rng),
                _ => docs(rng),
            });
        }
        let mut truncates = 0;
        if *truncates_left > 0 && rng.chance(200) {
            *truncates_left -= 1;
            truncates = 1;
            let table = rng.pick(TABLES);
            let at = rng.below(steps.len() as u64 + 1) as usize;
            steps.insert(at, write(format!("TRUNCATE {table}"), vec![]));
        }
        Plan {
            steps,
            truncates,
            rollback: rng.chance(15),
        }
    }

    async fn execute(&self, client: &mut Client, report: &mut WorkloadReport) -> Result<(), Error> {
        let transaction = client.transaction().await?;
        let mut failure = None;
        for step in &self.steps {
            let (sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = match step {
                Step::Write(sql, params) => (sql, params.iter().map(|p| p.as_ref() as _).collect()),
                Step::Pause(seconds) => ("SELECT pg_sleep($1)", vec![seconds]),
            };
            match transaction.execute(sql, &params).await {
                Ok(_) => report.statements += usize::from(matches!(step, Step::Write(..))),
                Err(error) => {
                    failure = Some((error, sql));
                    break;
                }
            }
        }
        let (error, sql) = match failure {
            None if self.rollback => {
                transaction.rollback().await?;
                report.rolled_back += 1;
                return Ok(());
            }
            None => match transaction.commit().await {
                Ok(()) => {
                    report.committed += 1;
                    report.truncates += self.truncates;
                    return Ok(());
                }
                Err(error) => (error, "COMMIT"),
            },
            Some(failure) => failure,
        };
        if is_conflict(&error) {
            // Dropping the unfinished transaction rolls it back.
            let code = error.code().map_or("", SqlState::code);
            tracing::debug!(code, sql, "workload transaction rolled back");
            report.rolled_back += 1;
            Ok(())
        } else {
            tracing::warn!(?error, sql, "workload statement failed");
            Err(error)
        }
    }
}

/// Whether an error is one concurrent writers cause, which rolls back the transaction only.
fn is_conflict(error: &Error) -> bool {
    [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::UNIQUE_VIOLATION,
    ]
    .iter()
    .any(|code| error.code() == Some(code))
}

fn write(sql: impl Into<String>, params: Vec<Param>) -> Step {
    Step::Write(sql.into(), params)
}

/// Adds `value` to `params`, and returns its placeholder (`$n`).
fn bind(params: &mut Vec<Param>, value: impl ToSql + Sync + Send + 'static) -> String {
    params.push(Box::new(value));
    format!("${}", params.len())
}

/// The `updated` timestamp `seconds` (an SQL `int` expression) after a fixed instant, so that
/// runs are reproducible (unlike `now()`).
fn updated(seconds: &str) -> String {
    format!("to_timestamp(1700000000 + {seconds})")
}

/// A statement on `wl_accounts`.
fn accounts(rng: &mut Rng) -> Step {
    let id = rng.int(1, ACCOUNTS);
    match rng.below(100) {
        0..=29 => {
            // One to four rows, at neighbouring keys.
            let mut params = Vec::new();
            let values: Vec<String> = (0..rng.int(1, 4))
                .map(|row| {
                    format!(
                        "({}::bigint, {}::text, {}::text::numeric, {}::text[], {})",
                        bind(&mut params, (id + row).min(ACCOUNTS)),
                        bind(&mut params, rng.text()),
                        bind(&mut params, rng.money()),
                        bind(&mut params, rng.tags()),
                        updated(&format!("{}::int", bind(&mut params, rng.instant())))
                    )
                })
                .collect();
            write(
                format!(
                    "INSERT INTO wl_accounts (id, owner, balance, tags, updated) VALUES {} \
                     ON CONFLICT DO NOTHING",
                    values.join(", ")
                ),
                params,
            )
        }
        30..=49 => write(
            format!(
                "UPDATE wl_accounts SET balance = balance + $2::text::numeric, owner = $3, \
                 updated = {} WHERE id = $1",
                updated("$4::int")
            ),
            vec![
                Box::new(id),
                Box::new(rng.money()),
                Box::new(rng.text()),
                Box::new(rng.instant()),
            ],
        ),
        50..=59 => write(
            "UPDATE wl_accounts SET tags = $3, balance = -balance WHERE id BETWEEN $1 AND $2",
            vec![Box::new(id), Box::new(id + rng.int(0, 6)), Box::new(rng.tags())],
        ),
        // The primary key changes: out to the moved range and back.
        60..=67 => write(
            "UPDATE wl_accounts SET id = id + 100000 WHERE id = $1::bigint \
             AND NOT EXISTS (SELECT 1 FROM wl_accounts WHERE id = $1::bigint + 100000)",
            vec![Box::new(id)],
        ),
        68..=75 => write(
            "UPDATE wl_accounts SET id = id - 100000 WHERE id = $1::bigint + 100000 \
             AND NOT EXISTS (SELECT 1 FROM wl_accounts WHERE id = $1::bigint)",
            vec![Box::new(id)],
        ),
        76..=95 => write(
            "DELETE FROM wl_accounts \
             WHERE id BETWEEN $1::bigint AND $2::bigint OR id - 100000 BETWEEN $1::bigint AND $2::bigint",
            vec![Box::new(id), Box::new(id + rng.int(0, 3))],
        ),
        96..=97 => write(
            format!(
                "INSERT INTO wl_accounts (id, owner, balance, tags, updated) \
                 SELECT g, 'bulk #' || g, g % 997 - 498.75, \
                        CASE WHEN g % 3 = 0 THEN '{{}}'::text[] ELSE ARRAY['bulk', g::text] END, \
                        {} \
                 FROM generate_series($1::int, $2::int) g ON CONFLICT DO NOTHING",
                updated("g")
            ),
            rng.bulk_range(ACCOUNTS),
        ),
        98 => write(
            "UPDATE wl_accounts SET balance = balance + 0.01, tags = tags || 'bulk'::text \
             WHERE id BETWEEN $1::int AND $2::int",
            rng.bulk_range(ACCOUNTS),
        ),
        _ => write(
            "DELETE FROM wl_accounts WHERE id BETWEEN $1::int AND $2::int",
            rng.bulk_range(ACCOUNTS),
        ),
    }
}

/// A statement on `wl_orders` (composite key: region and order number).
fn orders(rng: &mut Rng) -> Step {
    let region = *rng.pick(REGIONS);
    let order_no = rng.int(1, ORDER_NOS) as i32;
    match rng.below(100) {
        0..=29 => {
            let mut params = Vec::new();
            let values: Vec<String> = (0..rng.int(1, 4) as i32)
                .map(|row| {
                    format!(
                        "({}::text, {}::int, {}::float8, {}::boolean, {}::text::jsonb, {}::text)",
                        bind(&mut params, region),
                        bind(&mut params, order_no + row),
                        bind(&mut params, rng.amount()),
                        bind(&mut params, rng.maybe(|rng| rng.chance(2))),
                        bind(&mut params, rng.json()),
                        bind(&mut params, rng.maybe(Rng::text))
                    )
                })
                .collect();
            write(
                format!(
                    "INSERT INTO wl_orders (region, order_no, amount, paid, meta, note) VALUES {} \
                     ON CONFLICT DO NOTHING",
                    values.join(", ")
                ),
                params,
            )
        }
        30..=49 => write(
            "UPDATE wl_orders SET amount = $3, paid = NOT coalesce(paid, false), \
             meta = CASE WHEN jsonb_typeof(meta) = 'object' \
                         THEN jsonb_set(meta, '{step}', to_jsonb($4::int)) \
                         ELSE jsonb_build_object('step', $4::int, 'was', meta) END \
             WHERE region = $1 AND order_no = $2",
            vec![
                Box::new(region),
                Box::new(order_no),
                Box::new(rng.amount()),
                Box::new(rng.int(-50, 50) as i32),
            ],
        ),
        50..=59 => write(
            "UPDATE wl_orders SET note = $4, amount = amount * -1.5 \
             WHERE region = $1 AND order_no BETWEEN $2 AND $3",
            vec![
                Box::new(region),
                Box::new(order_no),
                Box::new(order_no + rng.int(0, 8) as i32),
                Box::new(rng.maybe(Rng::text)),
            ],
        ),
        // The primary key changes: to another region, or out to the moved range and back.
        60..=65 => write(
            "UPDATE wl_orders SET region = $2 WHERE region = $1 AND order_no = $3 \
             AND NOT EXISTS (SELECT 1 FROM wl_orders WHERE region = $2 AND order_no = $3)",
            vec![Box::new(region), Box::new(*rng.pick(REGIONS)), Box::new(order_no)],
        ),
        66..=71 => write(
            "UPDATE wl_orders SET order_no = order_no + 100000 WHERE region = $1 AND order_no = $2 \
             AND NOT EXISTS (SELECT 1 FROM wl_orders WHERE region = $1 AND order_no = $2 + 100000)",
            vec![Box::new(region), Box::new(order_no)],
        ),
        72..=77 => write(
            "UPDATE wl_orders SET order_no = order_no - 100000 \
             WHERE region = $1 AND order_no = $2 + 100000 \
             AND NOT EXISTS (SELECT 1 FROM wl_orders WHERE region = $1 AND order_no = $2)",
            vec![Box::new(region), Box::new(order_no)],
        ),
        78..=95 => write(
            "DELETE FROM wl_orders WHERE region = $1 AND order_no BETWEEN $2 AND $3",
            vec![
                Box::new(region),
                Box::new(order_no),
                Box::new(order_no + rng.int(0, 3) as i32),
            ],
        ),
        96..=98 => {
            let mut params = vec![Box::new(region) as Param];
            params.extend(rng.bulk_range(ORDER_NOS));
            write(
                "INSERT INTO wl_orders (region, order_no, amount, paid, meta, note) \
                 SELECT $1, g, CASE WHEN g % 11 = 0 THEN 'NaN' ELSE g / -4.0 END, \
                        CASE g % 3 WHEN 0 THEN NULL ELSE g % 3 = 1 END, \
                        jsonb_build_object('bulk', g, 'list', jsonb_build_array(g, 'x', NULL)), \
                        'bulk ' || g \
                 FROM generate_series($2::int, $3::int) g ON CONFLICT DO NOTHING",
                params,
            )
        }
        _ => write(
            "UPDATE wl_orders SET paid = NOT paid, \
             meta = CASE WHEN jsonb_typeof(meta) = 'object' THEN meta - 'bulk' ELSE meta END \
             WHERE order_no BETWEEN $1::int AND $2::int",
            rng.bulk_range(ORDER_NOS),
        ),
    }
}

/// A statement on `wl_docs` (`uuid` key, a body that is sometimes TOASTed).
fn docs(rng: &mut Rng) -> Step {
    let id = rng.int(1, DOCS) as i32;
    match rng.below(100) {
        0..=29 => write(
            format!(
                "INSERT INTO wl_docs (id, body, blob, seen, ratio, span) \
                 VALUES ({}, {}, $4, date '2000-01-01' + $5::int, $6, $7::text::interval) \
                 ON CONFLICT DO NOTHING",
                doc_id("$1::int"),
                body("$2", "$3")
            ),
            vec![
                Box::new(id),
                Box::new(rng.maybe(Rng::text)),
                Box::new(rng.body_seed()),
                Box::new(rng.blob()),
                Box::new(rng.maybe(|rng| rng.int(-400, 9000) as i32)),
                Box::new(rng.ratio()),
                Box::new(rng.span()),
            ],
        ),
        // The TOASTed body stays as it is; other columns change.
        30..=49 => write(
            format!(
                "UPDATE wl_docs SET ratio = $2, seen = seen + 1, span = $3::text::interval \
                 WHERE id = {}",
                doc_id("$1::int")
            ),
            vec![Box::new(id), Box::new(rng.ratio()), Box::new(rng.span())],
        ),
        50..=59 => write(
            format!(
                "UPDATE wl_docs SET body = {}, blob = $4 WHERE id = {}",
                body("$2", "$3"),
                doc_id("$1::int")
            ),
            vec![
                Box::new(id),
                Box::new(rng.maybe(Rng::text)),
                Box::new(rng.body_seed()),
                Box::new(rng.blob()),
            ],
        ),
        // The primary key changes: out to the moved range and back.
        60..=67 => write(
            format!(
                "UPDATE wl_docs SET id = {} WHERE id = {} \
                 AND NOT EXISTS (SELECT 1 FROM wl_docs WHERE id = {0})",
                doc_id("$1::int + 100000"),
                doc_id("$1::int")
            ),
            vec![Box::new(id)],
        ),
        68..=75 => write(
            format!(
                "UPDATE wl_docs SET id = {} WHERE id = {} \
                 AND NOT EXISTS (SELECT 1 FROM wl_docs WHERE id = {0})",
                doc_id("$1::int"),
                doc_id("$1::int + 100000")
            ),
            vec![Box::new(id)],
        ),
        76..=95 => write(
            format!(
                "DELETE FROM wl_docs WHERE id BETWEEN {} AND {}",
                doc_id("$1::int"),
                doc_id("$2::int")
            ),
            vec![Box::new(id), Box::new(id + rng.int(0, 3) as i32)],
        ),
        96..=98 => write(
            format!(
                "INSERT INTO wl_docs (id, body, blob, seen, ratio, span) \
                 SELECT {}, 'bulk ' || g, int4send(g), date '2020-02-29' + g, g / 7.0, \
                        g * interval '1 minute' \
                 FROM generate_series($1::int, $2::int) g ON CONFLICT DO NOTHING",
                doc_id("g")
            ),
            rng.bulk_range(DOCS),
        ),
        _ => write(
            format!(
                "UPDATE wl_docs SET ratio = ratio - 0.5, span = -span WHERE id BETWEEN {} AND {}",
                doc_id("$1::int"),
                doc_id("$2::int")
            ),
            rng.bulk_range(DOCS),
        ),
    }
}

/// The `uuid` of document number `number` (an SQL `int` expression); uuids sort like numbers.
fn doc_id(number: &str) -> String {
    format!("('00000000-0000-4000-8000-' || lpad(to_hex({number}), 12, '0'))::uuid")
}

/// A document body: the text parameter `text`, or, when the `int` parameter `seed` is not null,
/// 9600 characters of md5 hex (which barely compresses, so it is stored out of line).
fn body(text: &str, seed: &str) -> String {
    format!(
        "CASE WHEN {seed}::int IS NULL THEN {text}::text ELSE (SELECT string_agg(md5(g || ':' || \
         {seed}::int), '' ORDER BY g) FROM generate_series(1, 300) g) END"
    )
}

/// xorshift64* (Vigna), seeded through splitmix64 so that nearby seeds give unrelated streams.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut z = seed
            .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The state must never be zero.
        Rng(if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (the modulo bias is negligible for the small `n` used here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `low..=high`.
    fn int(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low + 1) as u64) as i64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `None` about 1 time in 6, else a value from `value`.
    fn maybe<T>(&mut self, value: impl FnOnce(&mut Rng) -> T) -> Option<T> {
        if self.chance(6) {
            None
        } else {
            Some(value(self))
        }
    }

    /// At most 40 characters (so that it fits `varchar(40)`).
    fn text(&mut self) -> String {
        let word = self.pick(WORDS);
        match self.below(3) {
            0 => (*word).to_owned(),
            1 => format!("{word} #{}", self.int(-99, 9999)),
            _ => format!("{word} {}", self.pick(WORDS)),
        }
    }

    /// A `numeric(12,2)` value as text: negative, fractional, zero.
    fn money(&mut self) -> String {
        let cents = self.int(-5_000_000, 5_000_000);
        format!(
            "{}{}.{:02}",
            if cents < 0 { "-" } else { "" },
            cents.abs() / 100,
            cents.abs() % 100
        )
    }

    /// `NULL`, empty, or a few elements (some of them `NULL`).
    fn tags(&mut self) -> Option<Vec<Option<String>>> {
        self.maybe(|rng| {
            let count = rng.below(4);
            (0..count).map(|_| rng.maybe(Rng::text)).collect()
        })
    }

    /// `NULL`, `NaN`, infinities, negative and fractional values.
    fn amount(&mut self) -> Option<f64> {
        match self.below(12) {
            0 => None,
            1 => Some(f64::NAN),
            2 => Some(if self.chance(2) {
                f64::INFINITY
            } else {
                f64::NEG_INFINITY
            }),
            _ => Some((self.unit() - 0.3) * 10_000.0),
        }
    }

    fn ratio(&mut self) -> Option<f32> {
        self.maybe(|rng| (rng.int(-1000, 1000) as f32) / 8.0)
    }

    /// `jsonb` text: null, scalars, nested objects and arrays, escapes and unicode.
    fn json(&mut self) -> Option<String> {
        let n = self.int(-1000, 1000);
        match self.below(6) {
            0 => None,
            1 => Some("null".to_owned()),
            2 => Some(format!("{}", n as f64 / 3.0)),
            3 => Some("[]".to_owned()),
            4 => Some(format!(
                r#"{{"n": {n}, "s": "it's \"q\" ü 🐘", "e": {{}}}}"#
            )),
            _ => Some(format!(
                r#"{{"n": {n}, "deep": {{"list": [1, 2.5, null, true, {{"k": [{n}, "\\\n"]}}]}}}}"#
            )),
        }
    }

    /// `NULL`, empty, or bytes with zeros among them.
    fn blob(&mut self) -> Option<Vec<u8>> {
        self.maybe(|rng| {
            let length = rng.below(24);
            (0..length)
                .map(|_| if rng.chance(3) { 0 } else { rng.next() as u8 })
                .collect()
        })
    }

    /// Seconds for [`updated`].
    fn instant(&mut self) -> i32 {
        self.int(0, 1_000_000) as i32
    }

    /// The seed of a TOASTed body (about 1 in 4), or `None` for a short text body.
    fn body_seed(&mut self) -> Option<i32> {
        self.chance(4).then(|| self.int(0, 1_000_000) as i32)
    }

    /// `interval` text: `NULL`, negative, mixed units, fractional seconds.
    fn span(&mut self) -> Option<String> {
        self.maybe(|rng| {
            format!(
                "{} mons {} days {} seconds",
                rng.int(-3, 14),
                rng.int(-40, 40),
                rng.int(-100_000, 100_000) as f64 / 8.0
            )
        })
    }

    /// The bounds of a bulk statement: 50 to 200 consecutive keys within `1..=space`, as `int`s.
    fn bulk_range(&mut self, space: i64) -> Vec<Param> {
        let count = self.int(50, 200).min(space);
        let start = self.int(1, space - count + 1);
        vec![Box::new(start as i32), Box::new((start + count - 1) as i32)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_reproducible_and_streams_differ() {
        let draw = |seed, stream| {
            let mut rng = Rng::new(seed, stream);
            (0..8).map(|_| rng.next()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 0), draw(1, 0));
        assert_ne!(draw(1, 0), draw(1, 1));
        assert_ne!(draw(1, 0), draw(2, 0));
        assert_ne!(Rng::new(0, 0).0, 0);
    }

    #[test]
    fn values_stay_within_their_columns() {
        let mut rng = Rng::new(3, 0);
        for _ in 0..10_000 {
            assert!(rng.text().chars().count() <= 40);
            let x = rng.int(-3, 5);
            assert!((-3..=5).contains(&x));
            let unit = rng.unit();
            assert!((0.0..1.0).contains(&unit));
        }
    }
}
