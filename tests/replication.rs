//! The replicator against real servers: tables on `replica` endpoints kept equal to the primary,
//! in both capture modes.

mod support;

use std::time::Duration;

use pgherd::{settings::CaptureMode, testkit::Topology, Herd, ReplicationState};
use support::{eventually, start};

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text, big text, tags int[], doc json, amount numeric);
                      CREATE TABLE pairs (a text, b int, v jsonb, PRIMARY KEY (a, b));";

async fn topology(logical: bool) -> Topology {
    let topology = start(Topology::builder().replica("replica").logical(logical)).await;
    on_both(&topology, SCHEMA).await;
    topology
}

fn herd(topology: &Topology, mode: CaptureMode) -> Herd {
    herd_in_chunks(topology, mode, None, Read::Stream)
}

/// How `logical` mode reads its slot (`replicator.logical_stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Stream,
    Peek,
}

/// A herd whose steps apply at most `batch_rows` rows at a time.
fn herd_in_chunks(
    topology: &Topology,
    mode: CaptureMode,
    batch_rows: Option<usize>,
    read: Read,
) -> Herd {
    let mut settings = topology.settings();
    if let Some(batch_rows) = batch_rows {
        settings.replicator.batch_rows = batch_rows;
    }
    settings.replicator.logical_stream = read == Read::Stream;
    settings.replicator.mode = mode;
    settings.replicator.tables = vec!["items".to_owned(), "public.pairs".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    Herd::start(settings).expect("start")
}

/// Waits until the herd's (first) target has finished its initial copy and streams.
async fn streaming(herd: &Herd) {
    eventually("the replicator streams", Duration::from_secs(30), || {
        let status = herd.replication();
        async move {
            status
                .first()
                .is_some_and(|s| s.state == ReplicationState::Streaming && s.applied.is_some())
        }
    })
    .await;
}

/// Runs `sql` on the primary and on the replica (the same schema on both).
async fn on_both(topology: &Topology, sql: &str) {
    for node in [topology.primary(), topology.node("replica")] {
        node.connect()
            .await
            .expect("connect")
            .batch_execute(sql)
            .await
            .expect("schema");
    }
}

/// A herd that replicates `table` alone in `mode`, once it streams.
async fn streaming_herd(topology: &Topology, mode: CaptureMode, table: &str) -> Herd {
    let mut settings = topology.settings();
    settings.replicator.mode = mode;
    settings.replicator.tables = vec![table.to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    streaming(&herd).await;
    herd
}

/// The count a `SELECT count(*) ...` returns.
async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect("count").get(0)
}

async fn digest(client: &tokio_postgres::Client, table: &str, order: &str) -> String {
    client
        .query_one(
            &format!("SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY {order})), '') FROM {table} t"),
            &[],
        )
        .await
        .expect("digest")
        .get(0)
}

async fn converge(topology: &Topology) {
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    eventually(
        "the replica equals the primary",
        Duration::from_secs(20),
        || {
            let (primary, replica) = (&primary, &replica);
            async move {
                for (table, order) in [("items", "id"), ("pairs", "a, b")] {
                    if digest(primary, table, order).await != digest(replica, table, order).await {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
}

async fn basic_changes(mode: CaptureMode, batch_rows: Option<usize>, read: Read) {
    let topology = topology(mode == CaptureMode::Logical).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name, big, tags) SELECT g, 'n' || g, NULL, ARRAY[g, -g] FROM generate_series(1, 500) g;
             INSERT INTO pairs VALUES ('x', 1, '{\"k\": [1, 2]}'), ('it''s', 2, 'null');",
        )
        .await
        .expect("rows before the herd starts (the initial copy)");
    let herd = herd_in_chunks(&topology, mode, batch_rows, read);
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    converge(&topology).await;
    primary
        .batch_execute(
            "UPDATE items SET name = 'renamed' WHERE id <= 100;
             UPDATE items SET big = repeat(md5('x'), 3000) WHERE id = 7;
             UPDATE items SET name = 'toast kept' WHERE id = 7;
             DELETE FROM items WHERE id BETWEEN 200 AND 250;
             UPDATE items SET id = id + 10000 WHERE id BETWEEN 300 AND 310;
             UPDATE items SET doc = '{\"a\": [1, 2]}', amount = 1.0 WHERE id <= 20;
             UPDATE items SET amount = 1.00 WHERE id <= 20;
             INSERT INTO items (id, name) SELECT g, 'bulk' FROM generate_series(1000, 6000) g;
             UPDATE items SET id = id + 100000, name = 'moved' WHERE id BETWEEN 1000 AND 3000;
             UPDATE items SET name = 'bulk update' WHERE id >= 1000;
             BEGIN; INSERT INTO pairs VALUES ('y', 3, '[]'); UPDATE pairs SET b = 4 WHERE a = 'x'; COMMIT;
             TRUNCATE pairs; INSERT INTO pairs VALUES ('after truncate', 1, '{}');",
        )
        .await
        .expect("changes");
    converge(&topology).await;
    // Only inserts: applied by COPY in both modes, with what its text format reserves.
    primary
        .batch_execute(
            "INSERT INTO items (id, name, big, tags, doc) VALUES
                 (9001, 'tab\there\nnewline\rreturn\\backslash', '\\N', '{1,NULL}', '{\"q\": \"a\\\\tb\"}'),
                 (9002, '\\.', '', NULL, 'null');",
        )
        .await
        .expect("inserts");
    converge(&topology).await;
    let status = herd.replication();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].state, ReplicationState::Streaming, "{status:?}");
    assert!(status[0].applied.is_some(), "{status:?}");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_keeps_the_replica_equal() {
    basic_changes(CaptureMode::Trigger, None, Read::Stream).await;
}

/// The capture triggers run as their owner: an application role with rights on its tables
/// alone writes them, and its writes are replicated.
#[actix_rt::test]
async fn trigger_mode_captures_the_writes_of_a_role_without_rights_on_the_change_tables() {
    let topology = topology(false).await;
    let herd = herd(&topology, CaptureMode::Trigger);
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    streaming(&herd).await;
    topology
        .primary()
        .connect_admin()
        .await
        .expect("admin")
        .batch_execute("CREATE ROLE writer LOGIN PASSWORD 'writer-secret'")
        .await
        .expect("role");
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "GRANT USAGE ON SCHEMA public TO writer;
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON items, pairs TO writer;",
        )
        .await
        .expect("grants");
    let mut config = topology.primary().config();
    config.user("writer").password("writer-secret");
    let (writer, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect as the application's role");
    actix_rt::spawn(connection);
    writer
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'w' || g FROM generate_series(1, 50) g;
             UPDATE items SET name = 'changed' WHERE id <= 10;
             UPDATE items SET id = id + 1000 WHERE id BETWEEN 11 AND 15;
             DELETE FROM items WHERE id BETWEEN 20 AND 25;
             INSERT INTO pairs VALUES ('x', 1, '{}');
             TRUNCATE pairs;
             INSERT INTO pairs VALUES ('y', 2, '[]');",
        )
        .await
        .expect("the application's writes");
    converge(&topology).await;
    herd.shutdown().await;
}

/// A column added while streaming, a table replaced by another under its name, and triggers
/// disabled for a while: the session reads the catalogs again before reading a row, and a
/// table whose writes may have gone unlogged is copied again.
#[actix_rt::test]
async fn trigger_mode_follows_a_column_added_a_table_replaced_and_triggers_disabled() {
    let topology = topology(false).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 100) g",
        )
        .await
        .expect("rows");
    let herd = herd(&topology, CaptureMode::Trigger);
    streaming(&herd).await;
    converge(&topology).await;
    // Replicas first, as docs/replication.md says; then rows changed and inserted with it.
    for node in [topology.node("replica"), topology.primary()] {
        node.connect()
            .await
            .expect("connect")
            .batch_execute("ALTER TABLE items ADD COLUMN extra text DEFAULT 'default'")
            .await
            .expect("a column added");
    }
    primary
        .batch_execute(
            "UPDATE items SET extra = 'changed ' || id WHERE id <= 10;
             INSERT INTO items (id, name, extra) VALUES (1001, 'new', 'given');",
        )
        .await
        .expect("rows with the new column");
    converge(&topology).await;
    // The table replaced by another under its name (an online schema change); the old one
    // emptied afterwards, which must not empty the replica's.
    primary
        .batch_execute(
            "CREATE TABLE public.items_next (LIKE items INCLUDING ALL);
             INSERT INTO public.items_next SELECT id + 5000, name, big, tags, doc, amount, 'next' FROM items;
             BEGIN;
             ALTER TABLE items RENAME TO items_done;
             ALTER TABLE public.items_next RENAME TO items;
             COMMIT;
             INSERT INTO items (id, name) VALUES (9000, 'after the swap');",
        )
        .await
        .expect("the table replaced");
    converge(&topology).await;
    primary
        .batch_execute("TRUNCATE items_done; INSERT INTO items (id) VALUES (9002);")
        .await
        .expect("the old table emptied");
    converge(&topology).await;
    for status in herd.replication() {
        assert!(
            status
                .warnings
                .iter()
                .any(|w| w.contains("capture of public.items was installed again")),
            "{status:?}"
        );
    }
    // Renamed away, emptied and renamed back: the same table, whose TRUNCATE must reach the
    // replica although it ran under another name.
    primary
        .batch_execute(
            "ALTER TABLE items RENAME TO items_aside; TRUNCATE items_aside;
             ALTER TABLE items_aside RENAME TO items; INSERT INTO items (id) VALUES (9003);",
        )
        .await
        .expect("emptied under another name");
    converge(&topology).await;
    primary
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(5001, 5100) g",
        )
        .await
        .expect("rows again");
    converge(&topology).await;
    // Triggers disabled (for a bulk load, say): the writes made meanwhile are not logged. The
    // next step finds them disabled; the table is copied again and its triggers installed.
    primary
        .batch_execute(
            "ALTER TABLE items DISABLE TRIGGER USER;
             UPDATE items SET name = 'unlogged' WHERE id < 5100;
             DELETE FROM items WHERE id = 9000;",
        )
        .await
        .expect("writes without triggers");
    converge(&topology).await;
    let enabled: i64 = count(
        &primary,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.items'::regclass \
         AND tgname LIKE 'pgherd_capture_%' AND tgenabled = 'O'",
    )
    .await;
    assert_eq!(enabled, 5, "the capture triggers are enabled again");
    primary
        .batch_execute("INSERT INTO items (id) VALUES (9001)")
        .await
        .expect("a row after");
    converge(&topology).await;
    herd.shutdown().await;
}

/// A capture function of an earlier version (its TRUNCATE recorded without the table's oid),
/// left by an install that upgraded the shared objects and stopped before that table: a herd
/// that opens replaces it, and the TRUNCATE of a table renamed away and back reaches the replica.
#[actix_rt::test]
async fn trigger_mode_replaces_a_capture_function_of_an_earlier_version() {
    let topology = topology(false).await;
    let primary = topology.primary().connect().await.expect("connect");
    let first = herd(&topology, CaptureMode::Trigger);
    streaming(&first).await;
    first.shutdown().await;
    let function = "pgherd.\"public.items/capture\"()";
    let recording = format!(
        "SELECT (prosrc LIKE '%TG_RELID%')::int::int8 FROM pg_proc WHERE oid = '{function}'::regprocedure"
    );
    primary
        .batch_execute(&format!(
            "DO $$ BEGIN EXECUTE replace(pg_get_functiondef('{function}'::regprocedure), \
             'TG_RELID', 'NULL'); END $$"
        ))
        .await
        .expect("the function as an earlier version wrote it");
    assert_eq!(count(&primary, &recording).await, 0);
    primary
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 20) g",
        )
        .await
        .expect("rows");
    let second = herd(&topology, CaptureMode::Trigger);
    streaming(&second).await;
    assert_eq!(count(&primary, &recording).await, 1, "replaced");
    converge(&topology).await;
    primary
        .batch_execute(
            "ALTER TABLE items RENAME TO items_aside; TRUNCATE items_aside;
             ALTER TABLE items_aside RENAME TO items;",
        )
        .await
        .expect("emptied under another name");
    converge(&topology).await;
    second.shutdown().await;
}

/// Triggers disabled for a load and enabled again in the load's transaction, which holds the
/// table meanwhile: the install that a step starts on seeing them disabled waits for the load,
/// then finds them enabled. The step's finding is kept on the primary, so the table is copied
/// again all the same.
#[actix_rt::test]
async fn trigger_mode_copies_a_table_whose_triggers_were_seen_disabled_and_enabled_again() {
    let topology = topology(false).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 20) g",
        )
        .await
        .expect("rows");
    let herd = herd(&topology, CaptureMode::Trigger);
    streaming(&herd).await;
    converge(&topology).await;
    let errors = herd.replication()[0].errors;
    // Only the table that needs it is installed again: the other's triggers stay as they are.
    let other = "SELECT string_agg(xmin::text, ',' ORDER BY tgname) FROM pg_trigger \
                 WHERE tgrelid = 'public.pairs'::regclass";
    let untouched: String = primary
        .query_one(other, &[])
        .await
        .expect("triggers")
        .get(0);
    let mut load = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute("ALTER TABLE items DISABLE TRIGGER USER")
        .await
        .expect("triggers disabled");
    let transaction = load.transaction().await.expect("begin");
    transaction
        .batch_execute(
            "UPDATE items SET name = 'loaded' WHERE id <= 10;
             INSERT INTO items (id, name) SELECT g, 'loaded' FROM generate_series(100, 120) g;",
        )
        .await
        .expect("the load");
    // The install waits for the load's lock and gives up (lock_timeout): an error of the target.
    eventually(
        "a step to see the triggers disabled",
        Duration::from_secs(20),
        || {
            let failed = herd.replication()[0].errors > errors;
            async move { failed }
        },
    )
    .await;
    transaction
        .batch_execute("ALTER TABLE items ENABLE TRIGGER USER")
        .await
        .expect("triggers enabled again");
    transaction.commit().await.expect("the load committed");
    converge(&topology).await;
    let after: String = primary
        .query_one(other, &[])
        .await
        .expect("triggers")
        .get(0);
    assert_eq!(after, untouched);
    herd.shutdown().await;
}

#[actix_rt::test]
async fn logical_mode_keeps_the_replica_equal() {
    basic_changes(CaptureMode::Logical, None, Read::Stream).await;
}

#[actix_rt::test]
async fn logical_mode_keeps_the_replica_equal_by_peeking() {
    basic_changes(CaptureMode::Logical, None, Read::Peek).await;
}

/// The same changes applied in chunks of 7 rows: source transactions and tables split across
/// chunks of one target transaction (a key changed in several chunks, a TRUNCATE between them).
#[actix_rt::test]
async fn small_chunks_keep_the_replica_equal_in_both_modes() {
    basic_changes(CaptureMode::Trigger, Some(7), Read::Stream).await;
    basic_changes(CaptureMode::Logical, Some(7), Read::Stream).await;
    basic_changes(CaptureMode::Logical, Some(7), Read::Peek).await;
}

/// A step that starts while a table rewrite (`ALTER TABLE ... TYPE`) is in progress on the
/// primary waits for it before taking its snapshot: a snapshot older than the rewrite sees the
/// table empty, which would turn the step's changed keys into deletes that nothing repairs.
#[actix_rt::test]
async fn trigger_mode_reads_a_table_rewritten_while_a_step_waited_for_it() {
    let topology = topology(false).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name, tags) SELECT g, 'n' || g, ARRAY[g] FROM generate_series(1, 50) g",
        )
        .await
        .expect("rows");
    let herd = streaming_herd(&topology, CaptureMode::Trigger, "items").await;
    converge(&topology).await;
    herd.shutdown().await;
    drop(herd);

    // Changes for the next step to read, then a rewrite left open (the replica first, as schema
    // changes go).
    primary
        .batch_execute(
            "UPDATE items SET name = 'changed' WHERE id <= 10;
             INSERT INTO items (id, name, tags) SELECT g, 'n' || g, ARRAY[g] FROM generate_series(51, 60) g",
        )
        .await
        .expect("changes");
    let rewrite_sql = "ALTER TABLE items ALTER COLUMN tags TYPE bigint[]";
    topology
        .node("replica")
        .connect()
        .await
        .expect("connect")
        .batch_execute(rewrite_sql)
        .await
        .expect("the rewrite on the replica");
    let rewrite = topology.primary().connect().await.expect("connect");
    rewrite
        .batch_execute(&format!("BEGIN; {rewrite_sql}"))
        .await
        .expect("the rewrite, left open");

    let mut settings = topology.settings();
    settings.replicator.mode = CaptureMode::Trigger;
    settings.replicator.tables = vec!["items".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    eventually(
        "the replicator waits for the rewritten table",
        Duration::from_secs(20),
        || {
            let primary = &primary;
            async move {
                count(
                    primary,
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'items'::regclass",
                )
                .await
                    > 0
            }
        },
    )
    .await;
    rewrite.batch_execute("COMMIT").await.expect("commit");
    converge(&topology).await;
    herd.shutdown().await;
}

/// A key changed to an equal but different value (`1.0` to `1.00` in a numeric key, `Bob` to
/// `BOB` under a case-insensitive collation): the capture sees no key change (the values are
/// equal), and the target row, found under its old value, gets the new one.
async fn a_key_changed_to_an_equal_value(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    on_both(
        &topology,
        "CREATE TABLE prices (k numeric PRIMARY KEY, v int); CREATE TABLE marks (k numeric PRIMARY KEY);
         CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TABLE names (k text COLLATE ci PRIMARY KEY, v int);",
    )
    .await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    let mut settings = topology.settings();
    settings.replicator.mode = mode;
    settings.replicator.tables = vec!["prices".to_owned(), "marks".to_owned(), "names".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    streaming(&herd).await;
    primary
        .batch_execute(
            "INSERT INTO prices VALUES (1.0, 1), (2.5, 2); INSERT INTO marks VALUES (1.0), (2.5);
             INSERT INTO names VALUES ('Bob', 1), ('ann', 2);",
        )
        .await
        .expect("rows");
    let equal = || async {
        let mut same = true;
        for table in ["prices", "marks", "names"] {
            same &= digest(&primary, table, "k").await == digest(&replica, table, "k").await;
        }
        same
    };
    eventually("the rows to be replicated", Duration::from_secs(20), equal).await;
    primary
        .batch_execute(
            "UPDATE prices SET k = 1.00, v = 10 WHERE k = 1; UPDATE prices SET k = 2.50 WHERE k = 2.5;
             UPDATE marks SET k = 1.000 WHERE k = 1;
             BEGIN; UPDATE names SET v = 10 WHERE k = 'bob'; UPDATE names SET k = upper(k); COMMIT;",
        )
        .await
        .expect("key changes to equal values");
    eventually(
        "the new key values to be replicated",
        Duration::from_secs(20),
        equal,
    )
    .await;
    let keys: String = replica
        .query_one(
            "SELECT string_agg(k::text, ' ' ORDER BY k) FROM prices",
            &[],
        )
        .await
        .expect("keys")
        .get(0);
    assert_eq!(keys, "1.00 2.50");
    let names: String = replica
        .query_one(
            "SELECT string_agg(k || '=' || v, ' ' ORDER BY k) FROM names",
            &[],
        )
        .await
        .expect("names")
        .get(0);
    assert_eq!(names, "ANN=2 BOB=10");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_replicates_a_key_changed_to_an_equal_value() {
    a_key_changed_to_an_equal_value(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_replicates_a_key_changed_to_an_equal_value() {
    a_key_changed_to_an_equal_value(CaptureMode::Logical).await;
}

/// A key column widened on the primary (`integer` to `bigint`), as docs/replication.md says:
/// the key trigger depends on the column, so it is dropped in the migration's transaction;
/// until the capture is installed again the change table refuses keys past `integer` (and
/// fails the write), and installing retypes it.
#[actix_rt::test]
async fn trigger_mode_follows_a_key_column_widened_on_the_primary() {
    let topology = topology(false).await;
    on_both(
        &topology,
        "CREATE TABLE counters (id int PRIMARY KEY, v int)",
    )
    .await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO counters SELECT g, g FROM generate_series(1, 10) g")
        .await
        .expect("rows");
    let herd = streaming_herd(&topology, CaptureMode::Trigger, "counters").await;
    let equal = || async {
        digest(&primary, "counters", "id").await == digest(&replica, "counters", "id").await
    };
    eventually("the copy", Duration::from_secs(20), equal).await;
    herd.shutdown().await;
    drop(herd);

    let widen = "ALTER TABLE counters ALTER COLUMN id TYPE bigint";
    replica
        .batch_execute(widen)
        .await
        .expect("widen on the replica");
    let refused = primary
        .batch_execute(widen)
        .await
        .expect_err("the key trigger depends on the column");
    assert!(
        format!("{refused:?}").contains("pgherd_capture_key"),
        "{refused:?}"
    );
    primary
        .batch_execute(&format!(
            "BEGIN; DROP TRIGGER pgherd_capture_key ON counters; {widen}; COMMIT;"
        ))
        .await
        .expect("widen on the primary");
    let error = primary
        .batch_execute("INSERT INTO counters VALUES (5000000000, 1)")
        .await
        .expect_err("the change table still holds integer keys");
    assert!(format!("{error:?}").contains("out of range"), "{error:?}");

    let mut settings = topology.settings();
    settings.replicator.tables = vec!["counters".to_owned()];
    pgherd::replicator::install(&settings)
        .await
        .expect("install again");
    let herd = streaming_herd(&topology, CaptureMode::Trigger, "counters").await;
    primary
        .batch_execute(
            "INSERT INTO counters VALUES (5000000000, 1), (11, 11);
             UPDATE counters SET v = -v WHERE id <= 3;
             UPDATE counters SET id = 6000000000 WHERE id = 4;",
        )
        .await
        .expect("keys past integer, once the change table follows");
    eventually("the widened keys", Duration::from_secs(20), equal).await;
    herd.shutdown().await;
}

/// The primary key replaced by one of other columns while a herd streams (the replica's
/// first, as docs/replication.md says): the application's writes go on, the change table is
/// made again with the new key's columns, and the table is copied again.
#[actix_rt::test]
async fn trigger_mode_follows_a_primary_key_replaced_on_the_primary() {
    let topology = topology(false).await;
    on_both(
        &topology,
        "CREATE TABLE rekeyed (id int PRIMARY KEY, code text NOT NULL, v int)",
    )
    .await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO rekeyed SELECT g, 'c' || g, g FROM generate_series(1, 10) g")
        .await
        .expect("rows");
    let herd = streaming_herd(&topology, CaptureMode::Trigger, "rekeyed").await;
    let equal = || async {
        digest(&primary, "rekeyed", "code").await == digest(&replica, "rekeyed", "code").await
    };
    eventually("the copy", Duration::from_secs(20), equal).await;
    let rekey = "ALTER TABLE rekeyed DROP CONSTRAINT rekeyed_pkey, ADD PRIMARY KEY (code)";
    replica
        .batch_execute(rekey)
        .await
        .expect("rekey the replica");
    primary
        .batch_execute(rekey)
        .await
        .expect("rekey the primary");
    primary
        .batch_execute(
            "UPDATE rekeyed SET v = -v WHERE id <= 3;
             UPDATE rekeyed SET code = 'moved' WHERE id = 4;
             INSERT INTO rekeyed VALUES (11, 'c11', 11), (11, 'c11b', 12);
             DELETE FROM rekeyed WHERE id = 5;",
        )
        .await
        .expect("writes under the new key");
    eventually("the rows under the new key", Duration::from_secs(20), equal).await;
    primary
        .batch_execute(
            "UPDATE rekeyed SET code = 'again' WHERE code = 'moved'; DELETE FROM rekeyed WHERE id = 6;",
        )
        .await
        .expect("writes after the change table was made again");
    eventually("the rows after", Duration::from_secs(20), equal).await;
    // A key that gains a column, then loses one: the change table follows each time.
    for rekey in [
        "ALTER TABLE rekeyed DROP CONSTRAINT rekeyed_pkey, ADD PRIMARY KEY (code, id)",
        "ALTER TABLE rekeyed DROP CONSTRAINT rekeyed_pkey, ADD PRIMARY KEY (code)",
    ] {
        replica
            .batch_execute(rekey)
            .await
            .expect("rekey the replica");
        primary
            .batch_execute(rekey)
            .await
            .expect("rekey the primary");
        primary
            .batch_execute("UPDATE rekeyed SET v = v + 1 WHERE id <= 8; INSERT INTO rekeyed VALUES (50 + (SELECT count(*) FROM rekeyed), 'n' || random(), 0);")
            .await
            .expect("writes under the new key");
        eventually("the rows under the new key", Duration::from_secs(20), equal).await;
    }
    let logged: i64 = count(
        &primary,
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pgherd.\"public.rekeyed\"'::regclass \
         AND attnum > 0 AND NOT attisdropped AND attname NOT IN ('txid', 'inserted')",
    )
    .await;
    assert_eq!(logged, 1, "the change table holds the key's one column");
    assert!(
        herd.replication()[0]
            .warnings
            .iter()
            .any(|w| w.contains("public.rekeyed")),
        "{:?}",
        herd.replication()
    );
    herd.shutdown().await;
}

/// Values stored out of line (TOAST) and left unchanged by an UPDATE are not in the stream: an
/// UPDATE that changes nothing else (`SET body = body`), and a primary key stored out of line
/// (the server then sends the old key, which holds it).
#[actix_rt::test]
async fn logical_mode_replicates_updates_that_leave_out_of_line_values_unchanged() {
    let topology = topology(true).await;
    on_both(
        &topology,
        "CREATE TABLE docs (id int PRIMARY KEY, body text);
         CREATE TABLE long_keys (k text PRIMARY KEY, v int);",
    )
    .await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    let mut settings = topology.settings();
    settings.replicator.mode = CaptureMode::Logical;
    settings.replicator.tables = vec!["docs".to_owned(), "long_keys".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    streaming(&herd).await;
    primary
        .batch_execute(
            "INSERT INTO docs SELECT 1, string_agg(md5(random()::text), '') FROM generate_series(1, 2000);
             INSERT INTO long_keys SELECT string_agg(md5(g::text), ''), 1 FROM generate_series(1, 78) g;",
        )
        .await
        .expect("rows with values stored out of line");
    let stored_out_of_line: bool = primary
        .query_one(
            "SELECT pg_column_size(k) < octet_length(k) OR pg_column_size(k) > 2000 FROM long_keys",
            &[],
        )
        .await
        .expect("key size")
        .get(0);
    assert!(stored_out_of_line, "the long key is TOASTed");
    let equal = || async {
        let sql = [
            "SELECT string_agg(id || ':' || md5(body), ',' ORDER BY id) FROM docs",
            "SELECT string_agg(md5(k) || ':' || v, ',' ORDER BY k) FROM long_keys",
        ];
        let mut same = true;
        for sql in sql {
            let one: Option<String> = primary.query_one(sql, &[]).await.expect("primary").get(0);
            let other: Option<String> = replica.query_one(sql, &[]).await.expect("replica").get(0);
            same &= one == other;
        }
        same
    };
    eventually("the rows", Duration::from_secs(20), equal).await;
    primary
        .batch_execute(
            "BEGIN; UPDATE docs SET body = body WHERE id = 1; UPDATE long_keys SET v = 2; COMMIT;",
        )
        .await
        .expect("updates that leave out-of-line values unchanged");
    eventually("the updates", Duration::from_secs(20), equal).await;
    primary
        .batch_execute(
            "INSERT INTO docs VALUES (2, 'after'); UPDATE docs SET body = 'short' WHERE id = 1;",
        )
        .await
        .expect("later changes");
    eventually("the later changes", Duration::from_secs(20), equal).await;
    let status = herd.replication();
    assert_eq!(status[0].errors, 0, "{status:?}");
    herd.shutdown().await;
}

/// Schema changes while `logical` mode streams: a column added (on the replica, then on the
/// primary) is replicated from the first change that uses it, and a table renamed and renamed
/// back keeps its changes made under the other name (a table is the same table by oid).
#[actix_rt::test]
async fn logical_mode_follows_columns_added_and_a_table_renamed() {
    let topology = topology(true).await;
    on_both(
        &topology,
        "CREATE TABLE notes (id int PRIMARY KEY, name text)",
    )
    .await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO notes VALUES (1, 'a')")
        .await
        .expect("row");
    let herd = streaming_herd(&topology, CaptureMode::Logical, "notes").await;
    let equal =
        || async { digest(&primary, "notes", "id").await == digest(&replica, "notes", "id").await };
    eventually("the copy", Duration::from_secs(20), equal).await;

    on_both(&topology, "ALTER TABLE notes ADD COLUMN extra text").await;
    primary
        .batch_execute(
            "INSERT INTO notes VALUES (2, 'b', 'extra 2'); UPDATE notes SET extra = 'extra 1' WHERE id = 1;",
        )
        .await
        .expect("changes to the new column");
    eventually("the new column", Duration::from_secs(20), equal).await;

    primary
        .batch_execute(
            "ALTER TABLE notes RENAME TO notes_moved; INSERT INTO notes_moved VALUES (3, 'c', 'while renamed');",
        )
        .await
        .expect("a change under another name");
    primary
        .batch_execute(
            "ALTER TABLE notes_moved RENAME TO notes; INSERT INTO notes VALUES (4, 'd', 'back');",
        )
        .await
        .expect("renamed back");
    eventually(
        "the changes made under the other name",
        Duration::from_secs(20),
        equal,
    )
    .await;
    herd.shutdown().await;

    // Written while no replicator runs, then columns are added (with defaults, one without)
    // and their defaults changed: after the restart these changes come without the columns, and
    // the rows they insert must hold what the primary's rows got when the columns were added (7,
    // NULL and the arrays), not the defaults of now. `box` arrays are delimited by `;`, and the
    // text array's elements need quotes.
    primary
        .batch_execute(
            "INSERT INTO notes VALUES (5, 'e', 'before'); UPDATE notes SET name = 'bb' WHERE id = 2; \
             INSERT INTO notes VALUES (6, 'f', 'x'); UPDATE notes SET name = 'ff' WHERE id = 6;",
        )
        .await
        .expect("changes before the column");
    on_both(
        &topology,
        r#"ALTER TABLE notes ADD COLUMN ranked int DEFAULT 7, ADD COLUMN flag text,
             ADD COLUMN shapes box[] DEFAULT '{(1,1),(0,0);(2,2),(1,1)}',
             ADD COLUMN tags text[] DEFAULT '{"a,b","c\"d",NULL}';
           ALTER TABLE notes ALTER COLUMN ranked SET DEFAULT 8, ALTER COLUMN flag SET DEFAULT 'later',
             ALTER COLUMN shapes SET DEFAULT '{}', ALTER COLUMN tags SET DEFAULT '{}'"#,
    )
    .await;
    let herd = streaming_herd(&topology, CaptureMode::Logical, "notes").await;
    eventually(
        "the rows written before the column was added",
        Duration::from_secs(20),
        equal,
    )
    .await;
    herd.shutdown().await;

    // Written before a column is renamed: after the restart these changes name the column as it
    // was, and their values must still reach it.
    primary
        .batch_execute(
            "UPDATE notes SET name = 'before the rename' WHERE id = 1; \
             INSERT INTO notes VALUES (7, 'g', 'x');",
        )
        .await
        .expect("changes before the rename");
    on_both(&topology, "ALTER TABLE notes RENAME COLUMN name TO label").await;
    let herd = streaming_herd(&topology, CaptureMode::Logical, "notes").await;
    eventually(
        "the rows written before the column was renamed",
        Duration::from_secs(20),
        equal,
    )
    .await;
    herd.shutdown().await;

    // Written before a column is added, after which the primary's table is rewritten: PostgreSQL
    // no longer records what the rows of that time got (the default is stored in them), so the
    // rows these changes insert read it from the primary, not the replica's default of now.
    primary
        .batch_execute(
            "INSERT INTO notes VALUES (8, 'h', 'x'); INSERT INTO notes VALUES (9, 'i', 'y');",
        )
        .await
        .expect("changes before the column");
    on_both(
        &topology,
        "ALTER TABLE notes ADD COLUMN tagged text NOT NULL DEFAULT 'tag'",
    )
    .await;
    replica
        .batch_execute("ALTER TABLE notes ALTER COLUMN tagged SET DEFAULT 'replica'")
        .await
        .expect("another default on the replica");
    primary
        .batch_execute("VACUUM FULL notes")
        .await
        .expect("the primary's table rewritten");
    let herd = streaming_herd(&topology, CaptureMode::Logical, "notes").await;
    eventually(
        "the rows written before the table was rewritten",
        Duration::from_secs(20),
        equal,
    )
    .await;
    assert_eq!(herd.replication()[0].errors, 0);
    herd.shutdown().await;
}

/// Adds `items.tagged` with a default on both servers, gives the replica another default, then
/// rewrites the primary's table: PostgreSQL no longer records what the rows older than the
/// column got, so the replayed changes from before it read the value from the primary.
async fn add_a_column_then_rewrite(topology: &Topology) {
    on_both(
        topology,
        "ALTER TABLE items ADD COLUMN tagged text NOT NULL DEFAULT 'tag'",
    )
    .await;
    topology
        .node("replica")
        .connect()
        .await
        .expect("connect")
        .batch_execute("ALTER TABLE items ALTER COLUMN tagged SET DEFAULT 'replica'")
        .await
        .expect("another default on the replica");
    topology
        .primary()
        .connect()
        .await
        .expect("connect")
        .batch_execute("VACUUM FULL items")
        .await
        .expect("the primary's table rewritten");
}

/// Replayed in chunks of one row: an insert written before a column was added, whose value for
/// it must come from the primary (its table was rewritten since), and a change of its key that
/// leaves that column out. When the insert is applied the primary no longer has the row under
/// its first key; the key change then finds nothing to move on the target, and the primary's row
/// under the new key is written instead.
#[actix_rt::test]
async fn logical_mode_writes_a_replayed_row_whose_key_changed_since() {
    let topology = topology(true).await;
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(1), Read::Stream);
    streaming(&herd).await;
    herd.shutdown().await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name) VALUES (70, 'k'), (80, 'stays');
             UPDATE items SET id = 71 WHERE id = 70;",
        )
        .await
        .expect("changes before the column");
    add_a_column_then_rewrite(&topology).await;
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(1), Read::Stream);
    converge(&topology).await;
    herd.shutdown().await;
}

/// Replayed in chunks of two rows: a row deleted and inserted again under its key (one chunk,
/// folded into one upsert whose value for a column added since must come from the primary,
/// with another row that fills the chunk), then moved to another key leaving its out-of-line
/// value unchanged (the next chunk). The
/// primary has no row under the first key by then: the replica's older row there is deleted,
/// not left for the key change to carry with its old values.
#[actix_rt::test]
async fn logical_mode_deletes_a_replayed_row_the_primary_no_longer_has_under_its_key() {
    let topology = topology(true).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO items (id, name, big) VALUES (90, 'old', 'old')")
        .await
        .expect("a row");
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(2), Read::Stream);
    streaming(&herd).await;
    converge(&topology).await;
    herd.shutdown().await;
    primary
        .batch_execute(
            "DELETE FROM items WHERE id = 90;
             INSERT INTO items (id, name, big)
               SELECT 90, 'new', string_agg(md5(g::text), '') FROM generate_series(1, 2000) g;
             INSERT INTO items (id, name) VALUES (95, 'fills the chunk');
             UPDATE items SET id = 91 WHERE id = 90;",
        )
        .await
        .expect("changes before the column");
    add_a_column_then_rewrite(&topology).await;
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(2), Read::Stream);
    converge(&topology).await;
    herd.shutdown().await;
}

/// Replayed in chunks of two rows, all written before a column was added without a default
/// (whose value for replayed inserts is then read from the primary): a row inserted (its chunk
/// filled by another row), moved to another key, and a second row inserted under the first
/// key and given a value in the new column. The first row's insert reads the second row's
/// value; the key change must not carry it to the first row's new key.
#[actix_rt::test]
async fn logical_mode_moves_a_replayed_row_without_the_values_of_the_row_that_took_its_key() {
    let topology = topology(true).await;
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(2), Read::Stream);
    streaming(&herd).await;
    herd.shutdown().await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name) VALUES (1, 'first');
             INSERT INTO items (id, name) VALUES (95, 'fills the chunk');
             UPDATE items SET id = 2 WHERE id = 1;
             INSERT INTO items (id, name) VALUES (1, 'second');",
        )
        .await
        .expect("changes before the column");
    on_both(&topology, "ALTER TABLE items ADD COLUMN tagged text").await;
    primary
        .batch_execute("UPDATE items SET tagged = 'the second row''s' WHERE id = 1")
        .await
        .expect("a value in the new column");
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(2), Read::Stream);
    converge(&topology).await;
    herd.shutdown().await;
}

/// Replayed in chunks of one row, all needing values read from the primary (written before a
/// column was added, the table rewritten since): the connection those reads use is kept between
/// chunks. Closed by the server while kept (here while the first chunk's apply waits for a lock
/// on the replica), it is replaced, and no step fails.
#[actix_rt::test]
async fn logical_mode_replaces_its_kept_connection_for_reading_rows_once_closed() {
    let topology = topology(true).await;
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(1), Read::Stream);
    streaming(&herd).await;
    herd.shutdown().await;
    topology
        .primary()
        .connect()
        .await
        .expect("connect")
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'row ' || g FROM generate_series(1, 3) g",
        )
        .await
        .expect("rows before the column");
    add_a_column_then_rewrite(&topology).await;
    let mut replica = topology.node("replica").connect().await.expect("connect");
    let lock = replica.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE items IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, Some(1), Read::Stream);
    let admin = topology.primary().connect_admin().await.expect("connect");
    let close =
        "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
                 WHERE state = 'idle' AND query LIKE 'SELECT u.i%'";
    eventually(
        "the kept connection closed",
        Duration::from_secs(20),
        || async { count(&admin, close).await > 0 },
    )
    .await;
    lock.rollback().await.expect("unlock");
    converge(&topology).await;
    let status = herd.replication();
    assert_eq!(status[0].errors, 0, "{status:?}");
    herd.shutdown().await;
}

/// A table taken out of `tables` stops reaching the target's slot: once it is listed again it
/// must be copied, not resumed past the changes made meanwhile. Installing with a shorter list
/// (`pgherd replicator install`) while a herd streams must not take tables from its slot.
#[actix_rt::test]
async fn logical_mode_copies_a_table_taken_out_and_added_back() {
    let topology = topology(true).await;
    let settings = |tables: &[&str]| {
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Logical;
        settings.replicator.tables = tables.iter().map(|t| (*t).to_owned()).collect();
        settings.replicator.retry_interval = Duration::from_millis(200);
        settings
    };
    let started = |tables: &'static [&'static str]| {
        let settings = settings(tables);
        async move {
            let herd = Herd::start(settings).expect("start");
            herd.wait_ready(Duration::from_secs(15))
                .await
                .expect("ready");
            streaming(&herd).await;
            herd
        }
    };
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    let equal = || async {
        digest(&primary, "pairs", "a, b").await == digest(&replica, "pairs", "a, b").await
    };
    let both: &[&str] = &["items", "pairs"];
    let herd = started(both).await;
    pgherd::replicator::install(&settings(&["items"]))
        .await
        .expect("install with one table");
    primary
        .batch_execute("INSERT INTO pairs VALUES ('a', 1, '{}')")
        .await
        .expect("row");
    eventually(
        "a row of the table the install left out",
        Duration::from_secs(20),
        equal,
    )
    .await;
    herd.shutdown().await;

    let herd = started(&["items"]).await;
    primary
        .batch_execute(
            "INSERT INTO pairs VALUES ('b', 2, '[]'); INSERT INTO items (id, name) VALUES (1, 'x')",
        )
        .await
        .expect("rows while pairs is out");
    herd.shutdown().await;
    let herd = started(both).await;
    eventually(
        "the table added back, copied",
        Duration::from_secs(20),
        equal,
    )
    .await;
    herd.shutdown().await;
}

/// The connection that holds a target's lock ends while the source is quiet (its backend is
/// terminated): the replicator notices and takes the lock again, rather than going on as the
/// active one without it while another process may take it.
#[actix_rt::test]
async fn a_replicator_whose_lock_connection_ended_takes_the_lock_again() {
    let topology = topology(false).await;
    let mut settings = topology.settings();
    settings.replicator.mode = CaptureMode::Trigger;
    settings.replicator.tables = vec!["items".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    // Windows without changes for the target are acknowledged soon, not after a minute.
    settings.replicator.idle_ack_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    streaming(&herd).await;
    let admin = topology
        .node("replica")
        .connect_admin()
        .await
        .expect("connect");
    let holder =
        "SELECT coalesce(min(pid), 0) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    let first: i32 = admin.query_one(holder, &[]).await.expect("holder").get(0);
    assert_ne!(first, 0, "the replicator holds the target's lock");
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "CREATE TABLE other (id int); INSERT INTO other VALUES (1); INSERT INTO other VALUES (2)",
        )
        .await
        .expect("writes to another table");
    let written: String = primary
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .expect("snapshot")
        .get(0);
    let acknowledged = format!(
        "SELECT count(*) FROM pgherd.consumers WHERE pg_snapshot_xmin(snapshot) >= '{written}'"
    );
    eventually(
        "the target to acknowledge past the other table's writes",
        Duration::from_secs(10),
        || async { count(&primary, &acknowledged).await > 0 },
    )
    .await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .expect("terminate");
    eventually(
        "the lock taken again by a new session",
        Duration::from_secs(10),
        || async {
            let pid: i32 = admin.query_one(holder, &[]).await.expect("holder").get(0);
            pid != 0 && pid != first
        },
    )
    .await;
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO items (id, name) VALUES (1, 'after')")
        .await
        .expect("row");
    eventually("the row", Duration::from_secs(20), || async {
        digest(&primary, "items", "id").await == digest(&replica, "items", "id").await
    })
    .await;
    // Other tables' writes moved the acknowledged snapshot meanwhile: only as far as the
    // target's progress row records, so the new session finds nothing amiss.
    let status = herd.replication();
    assert!(status[0].warnings.is_empty(), "{status:?}");
    herd.shutdown().await;
}

/// `on_source_change = "stop"`: a slot found gone stops the target even when a table was added
/// at the same time (which copies every table, and would otherwise hide the problem).
#[actix_rt::test]
async fn logical_mode_stops_on_a_lost_slot_when_a_table_is_added_too() {
    let topology = topology(true).await;
    let settings = |tables: &[&str]| {
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Logical;
        settings.replicator.on_source_change = pgherd::settings::ResyncPolicy::Stop;
        settings.replicator.tables = tables.iter().map(|t| (*t).to_owned()).collect();
        settings.replicator.retry_interval = Duration::from_millis(200);
        settings
    };
    let herd = Herd::start(settings(&["items"])).expect("start");
    streaming(&herd).await;
    herd.shutdown().await;
    let admin = topology.primary().connect_admin().await.expect("connect");
    admin
        .batch_execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
        .await
        .expect("drop the slot");
    let herd = Herd::start(settings(&["items", "pairs"])).expect("start");
    eventually("the target to stop", Duration::from_secs(20), || {
        let status = herd.replication();
        async move {
            status.first().is_some_and(|s| {
                matches!(&s.state, ReplicationState::Stopped(reason) if reason.contains("is gone"))
            })
        }
    })
    .await;
    herd.shutdown().await;
}

/// A target that went back in time (restored from a backup: its rows and progress row as they
/// were before its last batch, whose history the primary has since released) holds less than it
/// released on the primary: reported, and copied again (`on_source_change = "resync"`), instead
/// of streaming on past the lost rows.
async fn a_target_that_went_back(mode: CaptureMode) {
    let logical = mode == CaptureMode::Logical;
    let topology = topology(logical).await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    let equal =
        || async { digest(&primary, "items", "id").await == digest(&replica, "items", "id").await };
    let herd = streaming_herd(&topology, mode, "items").await;
    primary
        .batch_execute("INSERT INTO items (id, name) VALUES (1, 'kept')")
        .await
        .expect("row");
    eventually("the first row", Duration::from_secs(20), equal).await;
    // Where the target is: its slot's position, or its snapshot.
    let column = if logical { "lsn" } else { "snapshot" };
    let saved: String = replica
        .query_one(&format!("SELECT {column}::text FROM pgherd.progress"), &[])
        .await
        .expect("progress")
        .get(0);
    primary
        .batch_execute("INSERT INTO items (id, name) VALUES (2, 'lost by the restore')")
        .await
        .expect("row");
    eventually("the second row", Duration::from_secs(20), equal).await;
    let admin = topology.primary().connect_admin().await.expect("connect");
    let (client, released) = if logical {
        let moved = format!(
            "SELECT count(*) FROM pg_replication_slots WHERE confirmed_flush_lsn > '{saved}'"
        );
        (&admin, moved)
    } else {
        let deleted = "SELECT (count(*) = 0)::int::int8 FROM pgherd.\"public.items\"".to_owned();
        (&primary, deleted)
    };
    eventually(
        "the primary to release the second row's history",
        Duration::from_secs(30),
        || async { count(client, &released).await > 0 },
    )
    .await;
    herd.shutdown().await;
    replica
        .batch_execute(&format!(
            "DELETE FROM items WHERE id = 2; UPDATE pgherd.progress SET {column} = '{saved}'"
        ))
        .await
        .expect("the target as it was");
    let herd = streaming_herd(&topology, mode, "items").await;
    eventually("the target copied again", Duration::from_secs(20), equal).await;
    let status = herd.replication();
    assert!(
        status[0].warnings.iter().any(|w| w.contains("went back")),
        "{status:?}"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn logical_mode_copies_again_a_target_that_went_back() {
    a_target_that_went_back(CaptureMode::Logical).await;
}

#[actix_rt::test]
async fn trigger_mode_copies_again_a_target_that_went_back() {
    a_target_that_went_back(CaptureMode::Trigger).await;
}

/// A table that another one references on the replica, by a `DEFERRABLE` foreign key as
/// docs/replication.md asks: `TRUNCATE` refuses to empty it, so it is emptied by a `DELETE`
/// whose key checks wait for the commit, for the first copy, a TRUNCATE of both tables and
/// (`trigger` mode) a copy of it alone. The referencing table, whose checks may be pending when
/// it is emptied, is emptied the same way; so is a table with a deferred unique constraint of
/// its own, whose check a swap of two values leaves pending.
async fn referenced_tables(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    // The primary checks its key at once; the replica, at the commit.
    // Labels are unique at the end of each statement on the primary, at the commit on the replica.
    for (client, key, unique) in [
        (&primary, "", "DEFERRABLE"),
        (
            &replica,
            "DEFERRABLE INITIALLY DEFERRED",
            "DEFERRABLE INITIALLY DEFERRED",
        ),
    ] {
        client
            .batch_execute(&format!(
                "CREATE TABLE parents (id int PRIMARY KEY, name text);
                 CREATE TABLE children (id int PRIMARY KEY, parent int REFERENCES parents {key});
                 CREATE TABLE labels (id int PRIMARY KEY, label text UNIQUE {unique});"
            ))
            .await
            .expect("schema");
    }
    primary
        .batch_execute(
            "INSERT INTO parents SELECT g, 'p' || g FROM generate_series(1, 5) g;
             INSERT INTO children SELECT g, g % 5 + 1 FROM generate_series(1, 10) g;
             INSERT INTO labels VALUES (1, 'a'), (2, 'b');",
        )
        .await
        .expect("rows");
    let mut settings = topology.settings();
    settings.replicator.mode = mode;
    settings.replicator.tables = ["parents", "children", "labels"]
        .map(str::to_owned)
        .to_vec();
    settings.replicator.retry_interval = Duration::from_millis(200);
    // Chunks of two rows: a transaction's changes are applied in several.
    settings.replicator.batch_rows = 2;
    let herd = Herd::start(settings).expect("start");
    streaming(&herd).await;
    let equal = || async {
        digest(&primary, "parents", "id").await == digest(&replica, "parents", "id").await
            && digest(&primary, "children", "id").await == digest(&replica, "children", "id").await
            && digest(&primary, "labels", "id").await == digest(&replica, "labels", "id").await
    };
    eventually("the first copy", Duration::from_secs(20), equal).await;
    primary
        .batch_execute(
            "TRUNCATE parents, children;
             INSERT INTO parents SELECT g, 'q' || g FROM generate_series(10, 12) g;
             INSERT INTO children VALUES (20, 10), (21, 11);",
        )
        .await
        .expect("both emptied");
    eventually("the TRUNCATE", Duration::from_secs(20), equal).await;
    // Rows written, then the table truncated, in one transaction applied in several chunks: the
    // rows' key checks are still pending when the table is emptied.
    primary
        .batch_execute(
            "BEGIN;
             INSERT INTO children VALUES (30, 10), (31, 11), (32, 12), (33, 10);
             TRUNCATE children;
             INSERT INTO children VALUES (40, 12);
             UPDATE labels SET label = CASE id WHEN 1 THEN 'b' ELSE 'a' END;
             TRUNCATE labels;
             INSERT INTO labels VALUES (3, 'c');
             COMMIT;",
        )
        .await
        .expect("written, then emptied");
    eventually(
        "the rows after the TRUNCATE",
        Duration::from_secs(20),
        equal,
    )
    .await;
    if mode == CaptureMode::Trigger {
        primary
            .batch_execute(
                "ALTER TABLE parents DISABLE TRIGGER USER; UPDATE parents SET name = 'unlogged';",
            )
            .await
            .expect("an unlogged write");
        eventually("the copy of one table", Duration::from_secs(20), equal).await;
    }
    streaming(&herd).await;
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_copies_and_empties_a_table_other_tables_reference() {
    referenced_tables(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_copies_and_empties_a_table_other_tables_reference() {
    referenced_tables(CaptureMode::Logical).await;
}

/// A target whose acknowledgement the primary lost (its row of `pgherd.consumers` deleted, as
/// for a target taken out of the settings, and the change rows since cleaned up by the others)
/// is listed again: copied again, not streamed on past the rows deleted meanwhile.
#[actix_rt::test]
async fn trigger_mode_copies_again_a_target_the_primary_has_no_acknowledgement_of() {
    let topology = topology(false).await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    let equal =
        || async { digest(&primary, "items", "id").await == digest(&replica, "items", "id").await };
    let herd = streaming_herd(&topology, CaptureMode::Trigger, "items").await;
    primary
        .batch_execute("INSERT INTO items (id, name) VALUES (1, 'streamed')")
        .await
        .expect("row");
    eventually("the first row", Duration::from_secs(20), equal).await;
    herd.shutdown().await;
    primary
        .batch_execute(
            "DELETE FROM pgherd.consumers;
             INSERT INTO items (id, name) VALUES (2, 'its change row deleted');
             DELETE FROM pgherd.\"public.items\";",
        )
        .await
        .expect("the target forgotten, its history released");
    let herd = streaming_herd(&topology, CaptureMode::Trigger, "items").await;
    eventually("the target copied again", Duration::from_secs(20), equal).await;
    let status = herd.replication();
    assert!(
        status[0]
            .warnings
            .iter()
            .any(|w| w.contains("no acknowledgement")),
        "{status:?}"
    );
    herd.shutdown().await;
}

/// A target whose sessions do not wait for their commits to be flushed (`synchronous_commit =
/// off`) crashes after the slot moved past a batch: the replicator's own commits must have been
/// durable, or that batch is lost for good.
#[actix_rt::test]
async fn a_target_that_commits_asynchronously_loses_nothing_in_a_crash() {
    let topology = topology(true).await;
    let replica = topology.node("replica");
    let replica_admin = replica.connect_admin().await.expect("connect");
    for sql in [
        "ALTER SYSTEM SET synchronous_commit = off",
        "ALTER SYSTEM SET wal_writer_delay = '10s'",
        "SELECT pg_reload_conf()",
    ] {
        replica_admin
            .batch_execute(sql)
            .await
            .expect("a target that commits asynchronously");
    }
    drop(replica_admin);
    let herd = streaming_herd(&topology, CaptureMode::Logical, "items").await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'row ' || g FROM generate_series(1, 100) g",
        )
        .await
        .expect("rows");
    let written: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("position")
        .get(0);
    let admin = topology.primary().connect_admin().await.expect("connect");
    let moved = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE confirmed_flush_lsn >= '{written}'"
    );
    eventually(
        "the slot to move past the rows",
        Duration::from_secs(20),
        || async { count(&admin, &moved).await > 0 },
    )
    .await;
    replica.kill().expect("kill the target");
    replica.start().await.expect("restart the target");
    let target = replica.connect().await.expect("connect");
    eventually(
        "the replica to hold the rows again",
        Duration::from_secs(20),
        || async { digest(&primary, "items", "id").await == digest(&target, "items", "id").await },
    )
    .await;
    herd.shutdown().await;
}

/// The initial copy of `logical` mode against a commit that is written but still shown in
/// progress (it waits for a synchronous standby that never answers) when the slot becomes
/// consistent: the slot does not decode it, so the copy must wait for it to end and include it.
#[actix_rt::test]
async fn logical_mode_copies_a_commit_that_waited_for_a_synchronous_standby() {
    let topology = topology(true).await;
    let admin = topology.primary().connect_admin().await.expect("connect");
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
        "ALTER SYSTEM SET synchronous_commit = 'local'",
        "SELECT pg_reload_conf()",
    ] {
        admin
            .batch_execute(sql)
            .await
            .expect("a synchronous standby that never answers");
    }
    let session = || async { topology.primary().connect().await.expect("connect") };
    let before_the_slot = session().await;
    before_the_slot
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("a transaction the slot waits for");
    let mut settings = topology.settings();
    settings.replicator.mode = CaptureMode::Logical;
    settings.replicator.tables = vec!["items".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    let waiting = |sql: &'static str| {
        let admin = &admin;
        move || async move { count(admin, sql).await > 0 }
    };
    eventually(
        "the replicator's slot to log the transactions running at its start",
        Duration::from_secs(20),
        // The slot's position is set where that list is logged, before it waits for them.
        waiting("SELECT count(*) FROM pg_replication_slots WHERE restart_lsn IS NOT NULL"),
    )
    .await;
    let after_the_slot = session().await;
    after_the_slot
        .batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("a transaction that starts while the slot is built");
    // The slot's builder moves on when a checkpoint logs the running transactions: past the
    // first one now, so that the insert below starts after that point.
    before_the_slot
        .batch_execute("COMMIT")
        .await
        .expect("commit");
    admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let waits = session().await;
    let commit = tokio::spawn(async move {
        waits
            .batch_execute(
                "SET synchronous_commit = on; INSERT INTO items (id, name) VALUES (1, 'waited')",
            )
            .await
    });
    eventually(
        "the insert waits for the standby",
        Duration::from_secs(20),
        waiting("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"),
    )
    .await;
    after_the_slot
        .batch_execute("COMMIT")
        .await
        .expect("commit");
    admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
    // The slot is consistent now, with the insert's commit record behind its start: the copy
    // either ran (and missed the row) or waits for the insert to end.
    eventually(
        "the copy to run or to wait for the insert",
        Duration::from_secs(20),
        || {
            let (admin, herd) = (&admin, &herd);
            async move {
                herd.replication()
                    .first()
                    .is_some_and(|s| s.state == ReplicationState::Streaming && s.applied.is_some())
                    || count(
                        admin,
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE query LIKE '%FROM pg_catalog.pg_locks%' AND pid <> pg_backend_pid()",
                    )
                    .await
                        > 0
            }
        },
    )
    .await;
    admin
        .batch_execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .await
        .expect("stop waiting (the insert stays committed)");
    commit
        .await
        .expect("join")
        .expect("the insert commits locally");
    converge(&topology).await;
    herd.shutdown().await;
}

/// Rows known to be new on the source (a window in which a table only had rows inserted, in
/// `trigger` mode; keys whose first change in the step is an INSERT, in `logical` mode) are
/// applied with plain INSERTs; a row that something else wrote on the target makes that fail
/// once, and the replicator falls back to upserts (the source's row wins) instead of failing
/// forever.
async fn a_row_written_on_the_target_by_something_else_is_overwritten(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    let herd = herd(&topology, mode);
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    streaming(&herd).await;
    topology
        .node("replica")
        .connect()
        .await
        .expect("connect")
        .batch_execute("INSERT INTO items (id, name) VALUES (42, 'written on the replica')")
        .await
        .expect("a row written on the replica");
    topology
        .primary()
        .connect()
        .await
        .expect("connect")
        .batch_execute(
            "INSERT INTO items (id, name) SELECT g, 'from the primary' FROM generate_series(1, 100) g",
        )
        .await
        .expect("inserts on the primary");
    converge(&topology).await;
    let status = herd.replication();
    assert!(
        status[0].errors >= 1,
        "the plain insert failed once: {status:?}"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_overwrites_a_row_written_on_the_target_by_something_else() {
    a_row_written_on_the_target_by_something_else_is_overwritten(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_overwrites_a_row_written_on_the_target_by_something_else() {
    a_row_written_on_the_target_by_something_else_is_overwritten(CaptureMode::Logical).await;
}

/// Starts `builder` (with a short deadlock timeout, for the workload's deadlocks) and creates
/// the workload's tables on every writable server.
async fn workload_topology(builder: pgherd::testkit::TopologyBuilder) -> Topology {
    let topology = start(builder.server_setting("deadlock_timeout", "'20ms'")).await;
    for node in topology
        .nodes()
        .iter()
        .filter(|n| n.role() != pgherd::Role::Standby)
    {
        let client = node.connect().await.expect("connect");
        pgherd::testkit::workload::create_schema(&client)
            .await
            .expect("schema");
    }
    topology
}

/// Settings that replicate the workload's tables in `mode`, retrying fast after a fault.
fn workload_settings(topology: &Topology, mode: CaptureMode) -> pgherd::Settings {
    let mut settings = topology.settings();
    settings.replicator.mode = mode;
    settings.replicator.tables = pgherd::testkit::workload::TABLES
        .iter()
        .map(|t| t.to_string())
        .collect();
    settings.replicator.retry_interval = Duration::from_millis(200);
    settings.replicator.step_timeout = Duration::from_secs(3);
    settings
}

mod convergence {
    //! A randomized concurrent workload over several tables, with faults injected mid-stream;
    //! then every table of the replica must equal the primary's.

    use std::time::Duration;

    use pgherd::{
        settings::CaptureMode,
        testkit::{workload, FaultMode, Topology},
        ChildId, ExitReason, Herd, ReplicationState, Settings, SupervisorEvent,
    };

    use super::{
        streaming,
        support::{eventually, EventLog},
        workload_settings, workload_topology,
    };

    async fn topology(logical: bool) -> Topology {
        workload_topology(
            Topology::builder()
                .replica("replica")
                .proxied("replica")
                .logical(logical),
        )
        .await
    }

    fn settings(topology: &Topology, mode: CaptureMode) -> Settings {
        let mut settings = workload_settings(topology, mode);
        // Small steps, so that batches are applied in several steps within one transaction.
        settings.replicator.batch_rows = 50;
        settings
    }

    async fn converged(topology: &Topology) {
        let primary = topology.primary().connect().await.expect("connect");
        let replica = topology.node("replica").connect().await.expect("connect");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let compared = workload::compare(&primary, &replica, workload::TABLES)
                .await
                .expect("compare");
            let Err(difference) = compared else { return };
            if tokio::time::Instant::now() > deadline {
                panic!("the replica did not converge within 30 s:\n{difference}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn seeds(mode: CaptureMode, logical_stream: bool) {
        let topology = topology(mode == CaptureMode::Logical).await;
        let mut settings = settings(&topology, mode);
        settings.replicator.logical_stream = logical_stream;
        let herd = Herd::start(settings).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        for seed in [11, 12, 13] {
            let spec = workload::WorkloadSpec::new(seed);
            let report = workload::run(&topology.primary().config(), &spec)
                .await
                .expect("workload");
            assert!(report.committed > 400, "{report:?}");
            converged(&topology).await;
        }
        herd.shutdown().await;
    }

    #[actix_rt::test]
    async fn trigger_mode_converges_over_several_seeds() {
        seeds(CaptureMode::Trigger, true).await;
    }

    #[actix_rt::test]
    async fn logical_mode_converges_over_several_seeds() {
        seeds(CaptureMode::Logical, true).await;
    }

    #[actix_rt::test]
    async fn logical_mode_converges_over_several_seeds_by_peeking() {
        seeds(CaptureMode::Logical, false).await;
    }

    /// The primary ends the replication connection (its walsender terminated) several times
    /// while the workload runs: each time the session ends, a new one streams from what the
    /// target committed, and nothing is lost or applied twice.
    #[actix_rt::test]
    async fn logical_mode_converges_when_its_replication_connection_is_cut() {
        let topology = topology(true).await;
        let herd = Herd::start(settings(&topology, CaptureMode::Logical)).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        streaming(&herd).await;
        let config = topology.primary().config();
        let mut spec = workload::WorkloadSpec::new(41);
        spec.transactions = 400;
        let writes = tokio::spawn(async move { workload::run(&config, &spec).await });
        let primary = topology.primary().connect().await.expect("connect");
        let mut cut = 0;
        while cut < 4 && !writes.is_finished() {
            // The spacing of the cuts is the fault under test: each lands mid-workload.
            tokio::time::sleep(Duration::from_millis(300)).await;
            cut += primary
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(active_pid)) \
                     FROM pg_replication_slots WHERE slot_name = 'pgherd_replica' AND active",
                    &[],
                )
                .await
                .expect("terminate the walsender")
                .get::<_, i64>(0);
        }
        let report = writes.await.expect("join").expect("workload");
        assert!(cut >= 2, "the replication connection was cut {cut} times");
        assert!(report.committed > 400, "{report:?}");
        converged(&topology).await;
        let status = herd.replication();
        assert!(
            status[0].errors >= 2,
            "each cut ended a session: {status:?}"
        );
        herd.shutdown().await;
    }

    /// While the workload runs: the target cut off by the proxy, then killed and restarted; a
    /// second herd started (it waits as a standby); the first herd shut down mid-stream, so that
    /// the second takes over.
    async fn faults(mode: CaptureMode) {
        let topology = topology(mode == CaptureMode::Logical).await;
        let first = Herd::start(settings(&topology, mode)).expect("start");
        first
            .wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        let config = topology.primary().config();
        let mut spec = workload::WorkloadSpec::new(21);
        spec.transactions = 400;
        let writes = tokio::spawn(async move { workload::run(&config, &spec).await });
        let proxy = topology.proxy("replica").expect("proxied");
        tokio::time::sleep(Duration::from_millis(700)).await;
        proxy.set_mode(FaultMode::Blackhole);
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.set_mode(FaultMode::Pass);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let replica = topology.node("replica");
        replica.kill().expect("kill the target");
        tokio::time::sleep(Duration::from_millis(500)).await;
        replica.start().await.expect("restart the target");
        let second = Herd::start(settings(&topology, mode)).expect("start a second herd");
        // Exactly one of the two replicates; the other waits for the target's lock.
        let standby = |herd: &Herd| {
            herd.replication()
                .iter()
                .all(|s| s.state == ReplicationState::Standby)
        };
        eventually(
            "one herd replicates, the other waits",
            Duration::from_secs(15),
            || {
                let one = standby(&first) != standby(&second);
                async move { one }
            },
        )
        .await;
        let (leader, follower) = if standby(&second) {
            (first, second)
        } else {
            (second, first)
        };
        let before = follower.replication()[0].batches;
        leader.shutdown().await;
        let report = writes.await.expect("join").expect("workload");
        assert!(report.committed > 1000, "{report:?}");
        converged(&topology).await;
        let status = follower.replication();
        assert!(
            status[0].batches > before,
            "the waiting herd took over: {status:?}"
        );
        follower.shutdown().await;
    }

    /// The replication loop panics mid-stream, just before a batch's commit on the target (as a
    /// bug would): the supervisor restarts the replicator, which applies the batch again from
    /// the target's progress row.
    async fn panic_mid_stream(mode: CaptureMode) {
        let topology = topology(mode == CaptureMode::Logical).await;
        let log = EventLog::default();
        let herd = Herd::builder(settings(&topology, mode))
            .subscribe(log.recipient())
            .start()
            .expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        streaming(&herd).await;
        let config = topology.primary().config();
        let mut spec = workload::WorkloadSpec::new(31);
        spec.transactions = 300;
        let before = herd.replication()[0].batches;
        let writes = tokio::spawn(async move { workload::run(&config, &spec).await });
        eventually(
            "a batch of the workload to be applied",
            Duration::from_secs(15),
            || {
                let applied = herd.replication()[0].batches > before;
                async move { applied }
            },
        )
        .await;
        assert!(!writes.is_finished(), "the workload still runs");
        assert!(herd.inject_replicator_panic("replica"));
        assert!(!herd.inject_replicator_panic("primary"), "not a target");
        let replicator =
            |child: &ChildId| matches!(child, ChildId::Replicator(name) if &**name == "replica");
        eventually(
            "the replicator to be restarted after its panic",
            Duration::from_secs(15),
            || {
                let restarted = log.any(|e| {
                    matches!(e, SupervisorEvent::Exited { child, reason: ExitReason::Poisoned(why), .. }
                        if replicator(child) && why.contains("panicked"))
                }) && log.any(|e| {
                    matches!(e, SupervisorEvent::Started { child, generation }
                        if replicator(child) && *generation > 1)
                });
                async move { restarted }
            },
        )
        .await;
        let report = writes.await.expect("join").expect("workload");
        assert!(report.committed > 500, "{report:?}");
        converged(&topology).await;
        let status = herd.replication();
        assert_eq!(status[0].state, ReplicationState::Streaming, "{status:?}");
        herd.shutdown().await;
    }

    #[actix_rt::test]
    async fn trigger_mode_converges_after_the_replicator_panics_mid_stream() {
        panic_mid_stream(CaptureMode::Trigger).await;
    }

    #[actix_rt::test]
    async fn logical_mode_converges_after_the_replicator_panics_mid_stream() {
        panic_mid_stream(CaptureMode::Logical).await;
    }

    /// While the workload runs, two tables' triggers are disabled in turn (as for a bulk load),
    /// so that the workload's writes and ours go unlogged until a step notices: each table is
    /// installed again, copied by the target in the window of that install while the workload
    /// goes on writing it, and nothing is lost or doubled.
    #[actix_rt::test]
    async fn trigger_mode_converges_when_triggers_are_disabled_mid_workload() {
        let topology = topology(false).await;
        let herd = Herd::start(settings(&topology, CaptureMode::Trigger)).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        streaming(&herd).await;
        let config = topology.primary().config();
        let mut spec = workload::WorkloadSpec::new(51);
        spec.transactions = 400;
        // A TRUNCATE would empty the unlogged rows on both sides.
        spec.truncates = false;
        let writes = tokio::spawn(async move { workload::run(&config, &spec).await });
        let primary = topology.primary().connect().await.expect("connect");
        // The workload's keys are drawn from small ranges (and moved by 100,000): rows far out
        // of them are written by these unlogged statements only.
        for (table, unlogged) in [
            (
                "wl_accounts",
                "INSERT INTO public.wl_accounts (id, owner, balance) \
                 SELECT g, 'unlogged', g FROM generate_series(500000, 500099) g; \
                 UPDATE public.wl_accounts SET owner = owner || '!' WHERE id % 7 = 0",
            ),
            (
                "wl_docs",
                "INSERT INTO public.wl_docs (id, body) \
                 SELECT gen_random_uuid(), 'unlogged' FROM generate_series(1, 50); \
                 DELETE FROM public.wl_docs WHERE body LIKE '%a%'",
            ),
        ] {
            // The spacing of the disables is the fault under test: each lands mid-workload.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(!writes.is_finished(), "the workload still runs");
            primary
                .batch_execute(&format!(
                    "ALTER TABLE public.{table} DISABLE TRIGGER USER; {unlogged};"
                ))
                .await
                .expect("triggers disabled");
            let qualified = format!("public.{table}");
            eventually(
                "the table to be copied again",
                Duration::from_secs(15),
                || {
                    let copied = herd.replication()[0]
                        .warnings
                        .iter()
                        .any(|w| w.contains(&qualified));
                    async move { copied }
                },
            )
            .await;
        }
        let report = writes.await.expect("join").expect("workload");
        assert!(report.committed > 1000, "{report:?}");
        converged(&topology).await;
        let status = herd.replication();
        assert_eq!(status[0].state, ReplicationState::Streaming, "{status:?}");
        herd.shutdown().await;
    }

    #[actix_rt::test]
    async fn trigger_mode_converges_through_faults_and_a_hand_over() {
        faults(CaptureMode::Trigger).await;
    }

    #[actix_rt::test]
    async fn logical_mode_converges_through_faults_and_a_hand_over() {
        faults(CaptureMode::Logical).await;
    }
}

mod edges {
    //! A failover under the replicator, a table without a primary key, and reads after a
    //! position served by a replica.

    use std::time::Duration;

    use pgherd::{
        settings::{CaptureMode, FailoverMode},
        testkit::{workload, Topology},
        ErrorKind, Herd, Read, Routable, Write,
    };

    use super::{
        support::{eventually, start},
        workload_settings, workload_topology,
    };

    #[actix_rt::test]
    async fn trigger_mode_follows_a_promoted_standby_and_reports_the_timeline_change() {
        let topology = workload_topology(Topology::builder().standbys(1).replica("replica")).await;
        let mut settings = workload_settings(&topology, CaptureMode::Trigger);
        settings.failover.mode = FailoverMode::Promote;
        let herd = Herd::start(settings.clone()).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        // The initial copy is done and recorded with the old primary's timeline before the
        // workload starts, so that the failover lands in the middle of streaming.
        super::streaming(&herd).await;
        let mut spec = workload::WorkloadSpec::new(31);
        spec.transactions = 50;
        workload::run(&topology.primary().config(), &spec)
            .await
            .expect("workload");
        topology
            .standby(0)
            .wait_streaming_from(topology.primary())
            .await
            .expect("streaming");
        topology.primary().kill().expect("kill the primary");
        let standby = topology.standby(0).name().to_owned();
        eventually(
            "the standby is promoted and accepted",
            Duration::from_secs(30),
            || {
                let routes = herd.routes();
                let standby = standby.clone();
                async move { routes.iter().any(|r| r.primary && *r.name == *standby) }
            },
        )
        .await;
        herd.send(
            Write::new(
                "INSERT INTO wl_accounts (id, owner, balance) VALUES (999999, 'after failover', 1)",
            )
            .idempotent(),
        )
        .await
        .expect("write on the new primary");
        let primary = topology.standby(0).connect().await.expect("connect");
        let replica = topology.node("replica").connect().await.expect("connect");
        eventually(
            "the replica equals the new primary",
            Duration::from_secs(30),
            || {
                let (primary, replica) = (&primary, &replica);
                async move {
                    matches!(
                        workload::compare(primary, replica, workload::TABLES).await,
                        Ok(Ok(()))
                    )
                }
            },
        )
        .await;
        let status = herd.replication();
        assert_eq!(
            status[0].source.as_deref(),
            Some(standby.as_str()),
            "{status:?}"
        );
        assert!(
            status[0].warnings.iter().any(|w| w.contains("timeline")),
            "the change of timeline is reported: {status:?}"
        );
        // `pgherd status` measures the lag against the promoted standby, not the dead primary.
        let lags = pgherd::replicator::survey(&settings).await.expect("survey");
        assert!(lags[0].problem.is_none(), "{lags:?}");
        assert_eq!(lags[0].lag_rows, Some(0), "{lags:?}");
        herd.shutdown().await;
    }

    /// Installing the triggers while an application transaction writes two replicated tables
    /// (one before the install reaches it, one after) aborts neither: each table's triggers are
    /// installed in their own transaction, so the install never holds one table's lock while
    /// it waits for another's.
    #[actix_rt::test]
    async fn installing_the_triggers_does_not_deadlock_with_a_transaction_on_several_tables() {
        let topology = start(
            Topology::builder()
                .replica("replica")
                .server_setting("deadlock_timeout", "'100ms'"),
        )
        .await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute(
                    "CREATE TABLE first (id bigint PRIMARY KEY, v int);
                     CREATE TABLE second (id bigint PRIMARY KEY, v int);
                     INSERT INTO first VALUES (1, 0); INSERT INTO second VALUES (1, 0);",
                )
                .await
                .expect("schema");
        }
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Trigger;
        settings.replicator.tables = vec!["first".to_owned(), "second".to_owned()];
        let application = topology.primary().connect().await.expect("connect");
        application
            .batch_execute("BEGIN; UPDATE second SET v = v + 1 WHERE id = 1")
            .await
            .expect("the application writes `second`");
        let install = actix_rt::spawn(async move { pgherd::replicator::install(&settings).await });
        let observer = topology.primary().connect().await.expect("connect");
        eventually(
            "the install waits for the lock on `second`",
            Duration::from_secs(10),
            || {
                let observer = &observer;
                async move {
                    let row = observer
                        .query_one(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted \
                             AND relation = 'second'::regclass",
                            &[],
                        )
                        .await
                        .expect("pg_locks");
                    row.get::<_, i64>(0) > 0
                }
            },
        )
        .await;
        application
            .batch_execute("UPDATE first SET v = v + 1 WHERE id = 1; COMMIT")
            .await
            .expect("the application's transaction is not chosen as a deadlock victim");
        install
            .await
            .expect("join")
            .expect("the install completes once the application commits");
        let triggers: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('first'::regclass, 'second'::regclass) \
                 AND tgname LIKE 'pgherd_capture_%'",
                &[],
            )
            .await
            .expect("triggers")
            .get(0);
        assert_eq!(triggers, 10);
    }

    #[actix_rt::test]
    async fn a_table_without_a_primary_key_is_refused_at_install() {
        let topology = start(Topology::builder().replica("replica")).await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute(
                    "CREATE TABLE logbook (at timestamptz, line text);
                     CREATE TABLE ledger (txid bigint PRIMARY KEY, amount numeric);",
                )
                .await
                .expect("schema");
        }
        let mut settings = topology.settings();
        settings.replicator.tables = vec!["logbook".to_owned()];
        let error = pgherd::replicator::install(&settings)
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.to_string().contains("has no primary key"), "{error}");
        assert!(error.to_string().contains("public.logbook"), "{error}");
        // A key column named like a column of the change tables, in `trigger` mode.
        settings.replicator.tables = vec!["ledger".to_owned()];
        let error = pgherd::replicator::install(&settings)
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(
            error
                .to_string()
                .contains("primary key column named `txid`"),
            "{error}"
        );
    }

    /// Statement triggers fire only on the table a statement names: in `trigger` mode a
    /// partition's triggers would miss the writes made through its parent, so partitions and
    /// inheritance parents are refused; `logical` mode replicates a partition.
    #[actix_rt::test]
    async fn trigger_mode_refuses_partitions_and_inheritance_parents() {
        let topology = start(Topology::builder().replica("replica").logical(true)).await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute(
                    "CREATE TABLE measures (id int, at date, v int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
                     CREATE TABLE measures_2026 PARTITION OF measures FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
                     CREATE TABLE animals (id int PRIMARY KEY, name text);
                     CREATE TABLE cats (lives int) INHERITS (animals);",
                )
                .await
                .expect("schema");
        }
        let mut settings = topology.settings();
        for (table, expected) in [
            (
                "measures_2026",
                "is a partition or an inheritance child of measures",
            ),
            ("animals", "has inheritance children"),
        ] {
            settings.replicator.mode = CaptureMode::Trigger;
            settings.replicator.tables = vec![table.to_owned()];
            let error = pgherd::replicator::install(&settings)
                .await
                .expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::Config);
            assert!(error.to_string().contains(expected), "{error}");
            assert!(error.to_string().contains("mode = \"logical\""), "{error}");
        }

        // In logical mode the partition is replicated, whichever table a write names.
        settings.replicator.mode = CaptureMode::Logical;
        settings.replicator.tables = vec!["measures_2026".to_owned()];
        settings.replicator.retry_interval = Duration::from_millis(200);
        let herd = Herd::start(settings).expect("start");
        super::streaming(&herd).await;
        let primary = topology.primary().connect().await.expect("connect");
        primary
            .batch_execute(
                "INSERT INTO measures SELECT g, '2026-03-01', g FROM generate_series(1, 20) g;
                 UPDATE measures SET v = -v WHERE id <= 5;
                 DELETE FROM measures WHERE id > 15;",
            )
            .await
            .expect("writes through the parent");
        let replica = topology.node("replica").connect().await.expect("connect");
        eventually("the partition is replicated", Duration::from_secs(20), || {
            let (primary, replica) = (&primary, &replica);
            async move {
                let sql = "SELECT count(*)::text || ':' || coalesce(sum(v), 0)::text FROM measures_2026";
                let one: String = primary.query_one(sql, &[]).await.expect("primary").get(0);
                let other: String = replica.query_one(sql, &[]).await.expect("replica").get(0);
                one == other
            }
        })
        .await;
        herd.shutdown().await;
    }

    /// A `DEFERRABLE` primary key lets two rows hold the same key within a statement (`UPDATE
    /// ... SET id = id + 1`), which `logical` mode's key-by-key fold cannot follow: refused there,
    /// and on a target (`ON CONFLICT` cannot use it); `trigger` mode reads the committed rows
    /// and replicates such a table.
    #[actix_rt::test]
    async fn a_deferrable_primary_key_is_refused_where_it_cannot_work() {
        let topology = start(Topology::builder().replica("replica").logical(true)).await;
        let primary = topology.primary().connect().await.expect("connect");
        let replica = topology.node("replica").connect().await.expect("connect");
        primary
            .batch_execute("CREATE TABLE ranks (id int PRIMARY KEY DEFERRABLE, name text)")
            .await
            .expect("schema");
        replica
            .batch_execute("CREATE TABLE ranks (id int PRIMARY KEY, name text)")
            .await
            .expect("schema");
        let mut settings = topology.settings();
        settings.replicator.tables = vec!["ranks".to_owned()];
        settings.replicator.retry_interval = Duration::from_millis(200);
        settings.replicator.mode = CaptureMode::Logical;
        let error = pgherd::replicator::install(&settings)
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(
            error.to_string().contains("DEFERRABLE primary key"),
            "{error}"
        );
        assert!(error.to_string().contains("mode = \"trigger\""), "{error}");

        settings.replicator.mode = CaptureMode::Trigger;
        let herd = Herd::start(settings.clone()).expect("start");
        super::streaming(&herd).await;
        primary
            .batch_execute(
                "INSERT INTO ranks SELECT g, 'n' || g FROM generate_series(1, 10) g;
                 UPDATE ranks SET id = id + 1;
                 UPDATE ranks SET id = 12 - id;",
            )
            .await
            .expect("keys shifted");
        eventually("the shifted keys", Duration::from_secs(20), || async {
            super::digest(&primary, "ranks", "id").await
                == super::digest(&replica, "ranks", "id").await
        })
        .await;
        herd.shutdown().await;

        replica
            .batch_execute(
                "ALTER TABLE ranks DROP CONSTRAINT ranks_pkey; \
                 ALTER TABLE ranks ADD PRIMARY KEY (id) DEFERRABLE",
            )
            .await
            .expect("a deferrable key on the target");
        let error = pgherd::replicator::install(&settings)
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(
            error
                .to_string()
                .contains("DEFERRABLE primary key on target"),
            "{error}"
        );
    }

    /// `logical` mode needs the old key of every update and delete in the WAL: a replica
    /// identity without the primary key is refused at install, and reported when set while
    /// streaming, instead of leaving rows behind on the replica.
    #[actix_rt::test]
    async fn a_replica_identity_without_the_primary_key_is_refused_in_logical_mode() {
        let topology = start(Topology::builder().replica("replica").logical(true)).await;
        let schema =
            "CREATE TABLE accounts (id int PRIMARY KEY, email text NOT NULL UNIQUE, v int)";
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute(schema)
                .await
                .expect("schema");
        }
        let primary = topology.primary().connect().await.expect("connect");
        let mut settings = topology.settings();
        settings.replicator.tables = vec!["accounts".to_owned()];
        settings.replicator.retry_interval = Duration::from_millis(200);
        settings.replicator.mode = CaptureMode::Logical;
        for identity in ["USING INDEX accounts_email_key", "NOTHING"] {
            primary
                .batch_execute(&format!("ALTER TABLE accounts REPLICA IDENTITY {identity}"))
                .await
                .expect("identity");
            let error = pgherd::replicator::install(&settings)
                .await
                .expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::Config);
            assert!(error.to_string().contains("REPLICA IDENTITY"), "{error}");
            assert!(error.to_string().contains("mode = \"trigger\""), "{error}");
        }
        primary
            .batch_execute(
                "ALTER TABLE accounts REPLICA IDENTITY DEFAULT;
                 INSERT INTO accounts SELECT g, 'a' || g, g FROM generate_series(1, 10) g;",
            )
            .await
            .expect("identity");
        let herd = Herd::start(settings.clone()).expect("start");
        super::streaming(&herd).await;
        primary
            .batch_execute(
                "ALTER TABLE accounts REPLICA IDENTITY USING INDEX accounts_email_key;
                 UPDATE accounts SET id = id + 100 WHERE id <= 5;",
            )
            .await
            .expect("keys changed under another identity");
        eventually("the error reported", Duration::from_secs(20), || {
            let status = herd.replication();
            async move {
                status[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("replica identity without its primary key"))
            }
        })
        .await;
        herd.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_read_after_a_position_sent_to_a_replica_sees_the_write() {
        for mode in [CaptureMode::Trigger, CaptureMode::Logical] {
            let topology = start(
                Topology::builder()
                    .replica("replica")
                    .logical(mode == CaptureMode::Logical),
            )
            .await;
            for node in [topology.primary(), topology.node("replica")] {
                node.connect()
                    .await
                    .expect("connect")
                    .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY)")
                    .await
                    .expect("schema");
            }
            let mut settings = topology.settings();
            settings.replicator.mode = mode;
            settings.replicator.tables = vec!["notes".to_owned()];
            let herd = Herd::start(settings).expect("start");
            herd.wait_ready(Duration::from_secs(15))
                .await
                .expect("ready");
            for id in 0..50_i64 {
                let written = herd
                    .send(Write::new("INSERT INTO notes VALUES ($1)").bind(id))
                    .await
                    .expect("insert");
                let position = written.position.expect("position");
                let rows = herd
                    .send(
                        Read::new("SELECT count(*) FROM notes WHERE id = $1")
                            .bind(id)
                            .target("replica")
                            .after(position),
                    )
                    .await
                    .expect("read on the replica");
                assert_eq!(
                    rows[0].get::<_, i64>(0),
                    1,
                    "{mode:?}: the read missed write {id}"
                );
            }
            herd.shutdown().await;
        }
    }

    /// A role that may not write WAL messages (`pg_logical_emit_message` revoked): a step on the
    /// quiet primary cannot write the record that lets the replica claim the last commit's
    /// position, and stays idle instead of failing. Reads after a position are served all the
    /// same, once the next acknowledgement writes WAL.
    #[actix_rt::test]
    async fn trigger_mode_serves_reads_after_a_position_without_wal_messages() {
        let topology = start(Topology::builder().replica("replica")).await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY)")
                .await
                .expect("schema");
        }
        let config = topology.primary().config();
        let dbname = config.get_dbname().expect("a database");
        topology
            .primary()
            .admin_execute(
                dbname,
                "REVOKE EXECUTE ON FUNCTION \
                   pg_catalog.pg_logical_emit_message(boolean, text, text), \
                   pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC",
            )
            .await
            .expect("revoke");
        let refused = topology
            .primary()
            .connect()
            .await
            .expect("connect")
            .batch_execute("SELECT pg_catalog.pg_logical_emit_message(false, 'pgherd', '')")
            .await;
        assert!(refused.is_err(), "the role still writes WAL messages");
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Trigger;
        settings.replicator.tables = vec!["notes".to_owned()];
        let herd = Herd::start(settings).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        for id in 0..3_i64 {
            let written = herd
                .send(Write::new("INSERT INTO notes VALUES ($1)").bind(id))
                .await
                .expect("insert");
            let rows = herd
                .send(
                    Read::new("SELECT count(*) FROM notes WHERE id = $1")
                        .bind(id)
                        .target("replica")
                        .after(written.position.expect("position")),
                )
                .await
                .expect("read on the replica");
            assert_eq!(rows[0].get::<_, i64>(0), 1, "the read missed write {id}");
        }
        let status = herd.replication();
        assert_eq!(status[0].errors, 0, "{status:?}");
        assert_eq!(status[0].last_error, None, "{status:?}");
        herd.shutdown().await;
    }

    async fn count_text(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
        client.query_one(sql, &[]).await.ok().map(|row| row.get(0))
    }

    /// `step_timeout` bounds how long a step may go without moving, not how long it takes:
    /// with a step timeout of one second, a batch that takes longer on a slow target (a
    /// trigger there sleeps for each row) is applied chunk by chunk, and not cut and tried
    /// again forever.
    #[actix_rt::test]
    async fn a_batch_longer_than_the_step_timeout_goes_through_while_it_moves() {
        let topology = start(Topology::builder().replica("replica")).await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY, v int)")
                .await
                .expect("schema");
        }
        let replica = topology.node("replica").connect().await.expect("connect");
        replica
            .batch_execute(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN PERFORM pg_sleep(0.0005); RETURN NEW; END $$;
                 CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON notes
                   FOR EACH ROW EXECUTE FUNCTION slow();",
            )
            .await
            .expect("a slow target");
        let primary = topology.primary().connect().await.expect("connect");
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Trigger;
        settings.replicator.tables = vec!["notes".to_owned()];
        settings.replicator.step_timeout = Duration::from_secs(1);
        settings.replicator.batch_rows = 200;
        settings.replicator.retry_interval = Duration::from_millis(200);
        let herd = Herd::start(settings).expect("start");
        let sum = "SELECT count(*)::text || ' ' || coalesce(sum(v), 0)::text FROM notes";
        let equal = || async { count_text(&primary, sum).await == count_text(&replica, sum).await };
        super::streaming(&herd).await;
        // Opening a session is bounded by the step timeout too: on a busy machine a first one
        // may be cut; the batches must not be.
        let errors = herd.replication()[0].errors;
        // Inserted rows, then updated ones: each batch takes two seconds or more.
        for sql in [
            "INSERT INTO notes SELECT g, 0 FROM generate_series(1, 4000) g",
            "UPDATE notes SET v = 1",
        ] {
            primary
                .batch_execute(sql)
                .await
                .expect("a batch of 4000 rows");
            let started = std::time::Instant::now();
            eventually(sql, Duration::from_secs(30), equal).await;
            assert!(
                started.elapsed() > Duration::from_secs(1),
                "the batch took less than the step timeout: the test shows nothing"
            );
        }
        let status = herd.replication();
        assert_eq!(status[0].errors, errors, "{status:?}");
        herd.shutdown().await;
    }

    /// A table whose row-level security policies hide rows from the replicator's role (here its
    /// owner, with `FORCE ROW LEVEL SECURITY`) is not copied without them: the copy fails with
    /// PostgreSQL's error, shown in the status.
    #[actix_rt::test]
    async fn a_table_whose_policies_hide_rows_is_refused_not_copied_in_part() {
        let topology = start(Topology::builder().replica("replica")).await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute("CREATE TABLE secrets (id int PRIMARY KEY, v int)")
                .await
                .expect("schema");
        }
        let primary = topology.primary().connect().await.expect("connect");
        primary
            .batch_execute(
                "INSERT INTO secrets VALUES (1, 1), (2, -1);
                 ALTER TABLE secrets ENABLE ROW LEVEL SECURITY;
                 ALTER TABLE secrets FORCE ROW LEVEL SECURITY;
                 CREATE POLICY visible ON secrets USING (v >= 0);",
            )
            .await
            .expect("a policy that hides a row");
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Trigger;
        settings.replicator.tables = vec!["secrets".to_owned()];
        settings.replicator.retry_interval = Duration::from_millis(200);
        let herd = Herd::start(settings).expect("start");
        eventually("the refusal in the status", Duration::from_secs(20), || {
            let status = herd.replication();
            async move {
                status[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("row-level security"))
            }
        })
        .await;
        let replica = topology.node("replica").connect().await.expect("connect");
        let rows: i64 = replica
            .query_one("SELECT count(*) FROM secrets", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, 0, "part of the table was copied");
        herd.shutdown().await;
    }

    /// A trigger-mode replicator over a primary that nothing writes to writes nothing either:
    /// no acknowledgement on the primary, no record on the target, no WAL record (two targets,
    /// neither of which takes the other's WAL for a commit to pass).
    #[actix_rt::test]
    async fn trigger_mode_leaves_an_idle_primary_idle() {
        let topology = start(Topology::builder().replica("replica").replica("replica_b")).await;
        for node in [
            topology.primary(),
            topology.node("replica"),
            topology.node("replica_b"),
        ] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY)")
                .await
                .expect("schema");
        }
        let mut settings = topology.settings();
        settings.replicator.mode = CaptureMode::Trigger;
        settings.replicator.tables = vec!["notes".to_owned()];
        let herd = Herd::start(settings).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        let written = herd
            .send(Write::new("INSERT INTO notes VALUES (1)"))
            .await
            .expect("insert");
        let position = written.position.expect("position");
        eventually(
            "both targets past the write",
            Duration::from_secs(20),
            || {
                let status = herd.replication();
                async move {
                    status.len() == 2
                        && status
                            .iter()
                            .all(|s| s.applied.is_some_and(|a| a >= position))
                }
            },
        )
        .await;
        let primary = topology.primary().connect().await.expect("connect");
        let replica = topology.node("replica").connect().await.expect("connect");
        let state = || async {
            let acknowledged: String = primary
                .query_one(
                    "SELECT string_agg(target || ' ' || updated_at, ', ' ORDER BY target) FROM pgherd.consumers",
                    &[],
                )
                .await
                .expect("acknowledgements")
                .get(0);
            let recorded: String = replica
                .query_one(
                    "SELECT string_agg(batch || ' ' || applied_at, ', ') FROM pgherd.progress",
                    &[],
                )
                .await
                .expect("progress")
                .get(0);
            let position: String = primary
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .expect("position")
                .get(0);
            (acknowledged, recorded, position)
        };
        // The write's acknowledgements (at most a second after its batch) and records.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (acknowledged, recorded, position) = state().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (acknowledged_after, recorded_after, position_after) = state().await;
        assert_eq!(acknowledged_after, acknowledged, "acknowledgements");
        assert_eq!(recorded_after, recorded, "progress");
        // The server's own records may come meanwhile (the background writer logs the running
        // transactions within 15 s of other WAL; a timed checkpoint): a few hundred bytes. Two
        // targets that answered each other's records wrote several KB in 3 s.
        let moved = position_after
            .parse::<pgherd::Position>()
            .expect("position")
            .bytes_after(position.parse().expect("position"));
        assert!(moved < 1024, "{moved} bytes of WAL written while idle");
        let status = herd.replication();
        assert!(status.iter().all(|s| s.errors == 0), "{status:?}");
        herd.shutdown().await;
    }
}

mod targets {
    //! Several targets with independent progress, and a lost slot.

    use std::time::Duration;

    use pgherd::{
        settings::CaptureMode,
        testkit::{workload, Topology},
        Herd, ReplicationState,
    };

    use super::{support::eventually, workload_settings, workload_topology};

    async fn equal(topology: &Topology, replica: &str) -> bool {
        let primary = topology.primary().connect().await.expect("connect");
        let Ok(replica) = topology.node(replica).connect().await else {
            return false;
        };
        matches!(
            workload::compare(&primary, &replica, workload::TABLES).await,
            Ok(Ok(()))
        )
    }

    #[actix_rt::test]
    async fn a_target_that_is_down_holds_no_other_back_and_catches_up() {
        let topology = workload_topology(
            Topology::builder()
                .replica("replica_a")
                .replica("replica_b"),
        )
        .await;
        let settings = workload_settings(&topology, CaptureMode::Trigger);
        let herd = Herd::start(settings.clone()).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        eventually("both targets stream", Duration::from_secs(15), || {
            let status = herd.replication();
            async move {
                status
                    .iter()
                    .all(|s| s.state == ReplicationState::Streaming)
            }
        })
        .await;
        topology
            .node("replica_a")
            .stop()
            .await
            .expect("stop replica_a");
        let mut spec = workload::WorkloadSpec::new(41);
        spec.transactions = 60;
        workload::run(&topology.primary().config(), &spec)
            .await
            .expect("workload");
        eventually(
            "replica_b converges while replica_a is down",
            Duration::from_secs(30),
            || equal(&topology, "replica_b"),
        )
        .await;
        let a = herd
            .replication()
            .into_iter()
            .find(|s| &*s.target == "replica_a")
            .expect("status of replica_a");
        assert_eq!(a.state, ReplicationState::Retrying, "{a:?}");
        assert!(a.last_error.is_some(), "{a:?}");
        let lags = pgherd::replicator::survey(&settings).await.expect("survey");
        let lag_a = lags
            .iter()
            .find(|l| l.target == "replica_a")
            .expect("replica_a");
        assert!(
            lag_a.problem.is_some(),
            "a target that is down is reported: {lag_a:?}"
        );
        let lag_b = lags
            .iter()
            .find(|l| l.target == "replica_b")
            .expect("replica_b");
        assert_eq!(lag_b.lag_rows, Some(0), "{lag_b:?}");
        topology
            .node("replica_a")
            .start()
            .await
            .expect("start replica_a");
        eventually("replica_a catches up", Duration::from_secs(30), || {
            equal(&topology, "replica_a")
        })
        .await;
        herd.shutdown().await;
    }

    #[actix_rt::test]
    async fn a_lost_slot_is_reported_and_the_target_copied_again() {
        let topology =
            workload_topology(Topology::builder().replica("replica").logical(true)).await;
        let settings = workload_settings(&topology, CaptureMode::Logical);
        let herd = Herd::start(settings).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        let mut spec = workload::WorkloadSpec::new(51);
        spec.transactions = 30;
        workload::run(&topology.primary().config(), &spec)
            .await
            .expect("workload");
        eventually("the replica converges", Duration::from_secs(30), || {
            equal(&topology, "replica")
        })
        .await;
        // The slot disappears (dropped by someone, or lost): the changes it held are gone.
        let admin = topology.primary().connect_admin().await.expect("admin");
        eventually("the slot is dropped", Duration::from_secs(10), || {
            let admin = &admin;
            async move {
                admin
                    .batch_execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = 'pgherd_replica' AND active; \
                         SELECT pg_drop_replication_slot('pgherd_replica')",
                    )
                    .await
                    .is_ok()
            }
        })
        .await;
        spec.seed = 52;
        workload::run(&topology.primary().config(), &spec)
            .await
            .expect("workload");
        eventually(
            "the replica converges again",
            Duration::from_secs(30),
            || equal(&topology, "replica"),
        )
        .await;
        let status = herd.replication();
        assert!(
            status[0].warnings.iter().any(|w| w.contains("slot")),
            "the lost slot is reported: {status:?}"
        );
        herd.shutdown().await;
    }
}

/// A replica whose table has its columns in another order, other (compatible) types and a
/// column of its own: the replicated columns are written by name and the extra one keeps its
/// default.
async fn a_replica_table_shaped_differently(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    topology
        .primary()
        .connect()
        .await
        .expect("connect")
        .batch_execute("CREATE TABLE shaped (id int PRIMARY KEY, name varchar(20), score int)")
        .await
        .expect("schema");
    topology
        .node("replica")
        .connect()
        .await
        .expect("connect")
        .batch_execute(
            "CREATE TABLE shaped (score bigint, note text DEFAULT 'local', name text, \
               id bigint PRIMARY KEY)",
        )
        .await
        .expect("schema");
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO shaped SELECT g, 'n' || g, g * 10 FROM generate_series(1, 5) g")
        .await
        .expect("rows for the copy");
    let herd = streaming_herd(&topology, mode, "shaped").await;
    primary
        .batch_execute(
            "INSERT INTO shaped SELECT g, 'n' || g, g * 10 FROM generate_series(6, 10) g;
             UPDATE shaped SET score = -score WHERE id % 2 = 0; DELETE FROM shaped WHERE id = 3;",
        )
        .await
        .expect("changes");
    let same =
        "SELECT coalesce(string_agg(id || ':' || name || ':' || score, ',' ORDER BY id), '') \
                FROM shaped";
    eventually("the replica to match", Duration::from_secs(20), || async {
        let a: String = primary.query_one(same, &[]).await.expect("primary").get(0);
        let b: String = replica.query_one(same, &[]).await.expect("replica").get(0);
        a == b
    })
    .await;
    let local = count(&replica, "SELECT count(*) FROM shaped WHERE note = 'local'").await;
    assert_eq!(local, 9, "the replica's own column keeps its default");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_writes_a_replica_table_shaped_differently() {
    a_replica_table_shaped_differently(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_writes_a_replica_table_shaped_differently() {
    a_replica_table_shaped_differently(CaptureMode::Logical).await;
}

/// Types with text forms that are hard to carry (enums, composites and their arrays, domains,
/// ranges, network and geometric types, xml, tsvector, multidimensional arrays, NaN and
/// infinities), names that need quoting, and a key of two columns that changes: the replica
/// stays equal through the copy, COPY, upserts, deletes and key changes.
/// Names include quotes, spaces and `$pgherd$` (the capture functions' dollar quote, which
/// must then be another).
async fn exotic_types(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    let schema = r#"CREATE SCHEMA "Shop";
        CREATE TYPE "Shop"."Mood" AS ENUM ('sad', 'ok', 'Happy "Days"');
        CREATE TYPE "Shop".pair AS (n int, label text);
        CREATE DOMAIN "Shop".positive AS int CHECK (VALUE > 0);
        CREATE TABLE "Shop"."Exotic Rows" (
            "Id$pgherd$" uuid, at timestamptz, mood "Shop"."Mood", p "Shop".pair, ps "Shop".pair[],
            pos "Shop".positive, r int4range, tr tstzrange, ip inet, net cidr, mac macaddr,
            bits varbit, doc xml, words tsvector, pt point, bx box, grid int[], f float8,
            n numeric, d date, j jsonb, "Odd ""Name""" text, PRIMARY KEY ("Id$pgherd$", at));"#;
    on_both(&topology, schema).await;
    let rows = |first: i32| {
        format!(
            r#"INSERT INTO "Shop"."Exotic Rows" SELECT
                 md5(g::text)::uuid, timestamptz '2026-03-29 01:30:00+01' + g * interval '1 hour',
                 (enum_range(NULL::"Shop"."Mood"))[1 + g % 3],
                 ROW(g, 'a "quoted", back\slash' || E'\t' || g)::"Shop".pair,
                 ARRAY[ROW(g, 'x,y')::"Shop".pair, ROW(-g, NULL)::"Shop".pair],
                 g, int4range(g, g + 10), tstzrange(now() - interval '1 day', NULL),
                 ('10.0.' || g % 256 || '.1/24')::inet, '192.168.0.0/16', '08:00:2b:01:02:03',
                 B'1011'::varbit, ('<a x="1">' || g || ' &amp; é</a>')::xml,
                 to_tsvector('simple', 'the quick ' || g || ' fox''s'),
                 point(g, -g), box(point(0, 0), point(g, g)), ARRAY[[g, 1], [2, NULL]],
                 (ARRAY['NaN', 'Infinity', '-Infinity', '-0', '1.5e300'])[1 + g % 5]::float8,
                 (ARRAY['NaN', 'Infinity', '-Infinity', '0.000000000000000000001', '123456789012345678901234567890.5'])[1 + g % 5]::numeric,
                 (ARRAY['infinity', '-infinity', '2026-11-21'])[1 + g % 3]::date,
                 jsonb_build_object('é', g, 'nested', jsonb_build_array('a\b', E'line\nbreak')),
                 E'multi\nline\r\n' || repeat('x', g)
               FROM generate_series({first}, {first} + 19) g"#
        )
    };
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute(&rows(1))
        .await
        .expect("rows for the copy");
    let herd = streaming_herd(&topology, mode, "Shop.Exotic Rows").await;
    let table = r#""Shop"."Exotic Rows""#;
    let order = r#""Id$pgherd$", at"#;
    let equal =
        || async { digest(&primary, table, order).await == digest(&replica, table, order).await };
    eventually("the copy", Duration::from_secs(20), equal).await;
    primary.batch_execute(&rows(100)).await.expect("inserts");
    eventually("the inserts", Duration::from_secs(20), equal).await;
    primary
        .batch_execute(
            r#"UPDATE "Shop"."Exotic Rows" SET mood = 'Happy "Days"', p = ROW(0, E'new\\value')
                 WHERE pos % 2 = 0;
               UPDATE "Shop"."Exotic Rows" SET at = at + interval '1 year' WHERE pos % 5 = 0;
               DELETE FROM "Shop"."Exotic Rows" WHERE pos % 7 = 0;"#,
        )
        .await
        .expect("changes");
    eventually("the changes", Duration::from_secs(20), equal).await;
    let rows = count(&replica, r#"SELECT count(*) FROM "Shop"."Exotic Rows""#).await;
    assert_eq!(rows, 35, "40 rows, less pos 7, 14, 105, 112 and 119");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_replicates_exotic_types_and_names() {
    exotic_types(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_replicates_exotic_types_and_names() {
    exotic_types(CaptureMode::Logical).await;
}

/// A primary whose sessions write dates, intervals and floats differently from the replica's
/// (`DateStyle`, `IntervalStyle`, `extra_float_digits`): the values still arrive exactly, by
/// the initial copy and by streaming, because the replicator sets how its own sessions write.
async fn values_cross_servers_configured_differently(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    let table =
        "CREATE TABLE styled (id int PRIMARY KEY, d date, ts timestamp, iv interval, f float8, x xml)";
    let dbname = topology.primary().login().dbname.clone();
    let admin = topology.primary().connect_admin().await.expect("admin");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{dbname}\" SET DateStyle = 'SQL, DMY';
             ALTER DATABASE \"{dbname}\" SET IntervalStyle = 'sql_standard';
             ALTER DATABASE \"{dbname}\" SET extra_float_digits = 0;"
        ))
        .await
        .expect("the primary's defaults");
    // The replica's sessions read XML as whole documents: the primary's fragments would fail.
    let replica_db = topology.node("replica").login().dbname.clone();
    topology
        .node("replica")
        .connect_admin()
        .await
        .expect("admin")
        .batch_execute(&format!(
            "ALTER DATABASE \"{replica_db}\" SET xmloption = document"
        ))
        .await
        .expect("the replica's defaults");
    let rows = |first: i32| {
        format!(
            "INSERT INTO styled SELECT g, date '2026-11-03' + g, timestamp '2026-02-01 04:05:06.789' + g * interval '1 day', \
             interval '-1 day -2:03:04' * g, 0.1::float8 * g + 0.2, \
             xmlparse(content '<a>' || g || '</a><b/> and text') FROM generate_series({first}, {first} + 9) g"
        )
    };
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    // Compared in one way of writing, whatever the servers' defaults.
    let canonical =
        "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3;";
    for client in [&primary, &replica] {
        client
            .batch_execute(&format!("{table}; {canonical}"))
            .await
            .expect("schema");
    }
    let fresh = topology.primary().connect().await.expect("connect");
    let shown: String = fresh
        .query_one("SELECT current_setting('DateStyle')", &[])
        .await
        .expect("setting")
        .get(0);
    assert_eq!(
        shown, "SQL, DMY",
        "the primary's sessions write dates their own way"
    );
    primary
        .batch_execute(&rows(1))
        .await
        .expect("rows for the copy");
    let herd = streaming_herd(&topology, mode, "styled").await;
    primary
        .batch_execute(&rows(100))
        .await
        .expect("rows streamed");
    eventually(
        "the replica to equal the primary",
        Duration::from_secs(20),
        || async {
            digest(&primary, "styled", "id").await == digest(&replica, "styled", "id").await
        },
    )
    .await;
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_values_cross_servers_configured_differently() {
    values_cross_servers_configured_differently(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_values_cross_servers_configured_differently() {
    values_cross_servers_configured_differently(CaptureMode::Logical).await;
}

/// Identity columns (`GENERATED ALWAYS`) take the source's values on the target, and stored
/// generated columns are computed there: by COPY for new rows, by the upsert for the others. A
/// column that is not the key must not be `GENERATED ALWAYS` on the target (an UPDATE could not
/// give it the primary's value): refused with the fix, which is then applied.
async fn identity_and_generated_columns(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    on_both(
        &topology,
        "CREATE TABLE numbered (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
           v text, shout text GENERATED ALWAYS AS (upper(v)) STORED, \
           seq bigint GENERATED ALWAYS AS IDENTITY)",
    )
    .await;
    let mut settings = topology.settings();
    settings.replicator.mode = mode;
    settings.replicator.tables = vec!["numbered".to_owned()];
    let error = pgherd::replicator::install(&settings)
        .await
        .expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("numbered.seq is GENERATED ALWAYS AS IDENTITY on target"),
        "{error}"
    );
    topology
        .node("replica")
        .connect()
        .await
        .expect("connect")
        .batch_execute("ALTER TABLE numbered ALTER COLUMN seq SET GENERATED BY DEFAULT")
        .await
        .expect("the fix the error gives");
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO numbered (v) SELECT 'copied ' || g FROM generate_series(1, 5) g",
        )
        .await
        .expect("rows for the initial copy");
    let herd = streaming_herd(&topology, mode, "numbered").await;
    let replica = topology.node("replica").connect().await.expect("connect");
    let equal = || async {
        digest(&primary, "numbered", "id").await == digest(&replica, "numbered", "id").await
    };
    // Only inserts in a step (COPY), then updates and deletes (upserts).
    primary
        .batch_execute("INSERT INTO numbered (v) SELECT 'new ' || g FROM generate_series(1, 50) g")
        .await
        .expect("inserts");
    eventually(
        "the inserts to be replicated",
        Duration::from_secs(20),
        equal,
    )
    .await;
    primary
        .batch_execute(
            "UPDATE numbered SET v = 'changed' WHERE id % 3 = 0; DELETE FROM numbered WHERE id % 7 = 0;",
        )
        .await
        .expect("updates");
    eventually(
        "the updates to be replicated",
        Duration::from_secs(20),
        equal,
    )
    .await;
    let shouted = count(
        &replica,
        "SELECT count(*) FROM numbered WHERE shout = upper(v)",
    )
    .await;
    assert_eq!(
        shouted,
        55 - 55 / 7,
        "generated values computed on the target"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_replicates_identity_and_generated_columns() {
    identity_and_generated_columns(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_replicates_identity_and_generated_columns() {
    identity_and_generated_columns(CaptureMode::Logical).await;
}

/// While the replicated tables are quiet and another table is written, the slot still moves: it
/// holds no WAL back and its peeks do not decode that WAL again.
#[actix_rt::test]
async fn a_slot_whose_tables_are_quiet_follows_the_rest_of_the_database() {
    quiet_slot(Read::Stream).await;
}

#[actix_rt::test]
async fn a_peeked_slot_whose_tables_are_quiet_follows_the_rest_of_the_database() {
    quiet_slot(Read::Peek).await;
}

/// The slot of a target whose tables do not change still moves with the rest of the database
/// (or it would hold back WAL, and every peek would decode it again).
async fn quiet_slot(read: Read) {
    let topology = topology(true).await;
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, None, read);
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    streaming(&herd).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "CREATE TABLE unreplicated (id bigint PRIMARY KEY, pad text);
             INSERT INTO unreplicated SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
        )
        .await
        .expect("writes to a table that is not replicated");
    let written: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("position")
        .get(0);
    eventually(
        "the slot to pass the other table's writes",
        Duration::from_secs(10),
        || {
            let (primary, written) = (&primary, &written);
            async move {
                primary
                    .query_one(
                        "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
                         WHERE slot_name = 'pgherd_replica'",
                        &[written],
                    )
                    .await
                    .expect("slot")
                    .get::<_, bool>(0)
            }
        },
    )
    .await;
    herd.shutdown().await;
    // The target's progress row records how far the slot went: a new herd finds nothing amiss.
    let herd = herd_in_chunks(&topology, CaptureMode::Logical, None, read);
    streaming(&herd).await;
    let status = herd.replication();
    assert!(status[0].warnings.is_empty(), "{status:?}");
    herd.shutdown().await;
}

mod added {
    //! A table added to the settings later is copied, and the others go on streaming.

    use std::time::Duration;

    use pgherd::{testkit::Topology, Herd};

    use super::{converge, start, SCHEMA};

    #[actix_rt::test]
    async fn a_table_added_later_is_copied_in_trigger_mode() {
        let topology = start(Topology::builder().replica("replica")).await;
        for node in [topology.primary(), topology.node("replica")] {
            node.connect()
                .await
                .expect("connect")
                .batch_execute(SCHEMA)
                .await
                .expect("schema");
        }
        let primary = topology.primary().connect().await.expect("connect");
        primary
            .batch_execute(
                "INSERT INTO items (id, name) SELECT g, 'n' || g FROM generate_series(1, 100) g;
                 INSERT INTO pairs VALUES ('before', 1, '{}'), ('before', 2, '[]');",
            )
            .await
            .expect("rows");
        let mut settings = topology.settings();
        settings.replicator.tables = vec!["items".to_owned()];
        settings.replicator.retry_interval = Duration::from_millis(200);
        let herd = Herd::start(settings.clone()).expect("start");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        let replica = topology.node("replica").connect().await.expect("connect");
        super::support::eventually("items copied", Duration::from_secs(15), || {
            let replica = &replica;
            async move {
                replica
                    .query_one("SELECT count(*) FROM items", &[])
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 100)
            }
        })
        .await;
        herd.shutdown().await;
        let pairs: i64 = replica
            .query_one("SELECT count(*) FROM pairs", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(pairs, 0, "pairs is not replicated yet");
        primary
            .batch_execute("UPDATE items SET name = 'while stopped' WHERE id <= 10")
            .await
            .expect("update");
        settings.replicator.tables.push("pairs".to_owned());
        let herd = Herd::start(settings).expect("start again");
        herd.wait_ready(Duration::from_secs(15))
            .await
            .expect("ready");
        converge(&topology).await;
        herd.shutdown().await;
    }
}

/// Rows only ever inserted, in many small transactions, while the replication loop panics just
/// before a batch's commit on the target, three times: no later change of those rows could
/// repair a lost batch, so the replica holds every row only if the source was told nothing
/// (the stream's report, a peek's slot advance) before the target committed.
async fn inserts_through_panics(read: Read) {
    let topology = start(Topology::builder().replica("replica").logical(true)).await;
    on_both(
        &topology,
        "CREATE TABLE appended (id bigint PRIMARY KEY, at timestamptz DEFAULT now())",
    )
    .await;
    let mut settings = topology.settings();
    settings.replicator.mode = CaptureMode::Logical;
    settings.replicator.logical_stream = read == Read::Stream;
    settings.replicator.tables = vec!["appended".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    herd.wait_ready(Duration::from_secs(15))
        .await
        .expect("ready");
    streaming(&herd).await;
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    for round in 0..3_i64 {
        assert!(herd.inject_replicator_panic("replica"));
        for i in 0..200 {
            primary
                .execute(
                    "INSERT INTO appended (id) VALUES ($1)",
                    &[&(round * 200 + i)],
                )
                .await
                .expect("insert");
        }
        let expected = (round + 1) * 200;
        eventually(
            "every inserted row on the replica",
            Duration::from_secs(20),
            || {
                let replica = &replica;
                async move { count(replica, "SELECT count(*) FROM appended").await == expected }
            },
        )
        .await;
    }
    assert_eq!(
        digest(&primary, "appended", "id").await,
        digest(&replica, "appended", "id").await
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn logical_mode_loses_no_insert_when_the_loop_panics_before_commits() {
    inserts_through_panics(Read::Stream).await;
}

#[actix_rt::test]
async fn logical_mode_by_peeking_loses_no_insert_when_the_loop_panics_before_commits() {
    inserts_through_panics(Read::Peek).await;
}
