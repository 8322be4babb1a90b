//! The testkit's workload writes what it promises, the same seed makes the same database, and
//! `compare` finds a single changed row.

mod support;

use pgherd::testkit::{
    workload::{self, WorkloadSpec},
    Topology,
};
use support::start;

/// A small spec: `writers` writers of `transactions` transactions.
fn small(seed: u64, writers: usize, transactions: usize) -> WorkloadSpec {
    WorkloadSpec {
        writers,
        transactions,
        ..WorkloadSpec::new(seed)
    }
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test]
async fn a_concurrent_workload_fills_every_table_and_digests_tell_databases_apart() {
    // Concurrent writers deadlock now and then: find out fast.
    let topology = start(
        Topology::builder()
            .replica("replica")
            .server_setting("deadlock_timeout", "'50ms'"),
    )
    .await;
    let primary = topology.primary().connect().await.expect("connect primary");
    let empty = topology
        .node("replica")
        .connect()
        .await
        .expect("connect replica");
    workload::create_schema(&primary).await.expect("schema");
    workload::create_schema(&primary)
        .await
        .expect("the schema again");
    workload::create_schema(&empty).await.expect("schema");

    let spec = small(1, 3, 40);
    let report = workload::run(&topology.primary().config(), &spec)
        .await
        .expect("the workload runs");
    assert_eq!(report.committed + report.rolled_back, 3 * 40, "{report:?}");
    assert!(report.committed > 0 && report.rolled_back > 0, "{report:?}");
    assert!(report.statements > report.committed, "{report:?}");

    for table in workload::TABLES {
        let first = workload::digest(&primary, table).await.expect("digest");
        let again = workload::digest(&primary, table).await.expect("digest");
        assert_eq!(first, again, "the digest of {table} is not stable");
        let other = workload::digest(&empty, table).await.expect("digest");
        assert_eq!(other.rows, 0);
        if first.rows > 0 {
            assert_ne!(first, other, "{table} has rows on one side only");
        }
    }
    let differences = workload::compare(&primary, &empty, workload::TABLES)
        .await
        .expect("compare")
        .expect_err("the databases differ");
    assert!(differences.contains("replica has no row"), "{differences}");
}

#[tokio::test]
async fn one_writer_with_the_same_seed_makes_the_same_database_anywhere() {
    let topology = start(Topology::builder().replica("replica")).await;
    let primary = topology.primary().connect().await.expect("connect primary");
    let replica = topology
        .node("replica")
        .connect()
        .await
        .expect("connect replica");
    let spec = small(7, 1, 80);
    let mut reports = Vec::new();
    for (node, client) in [
        (topology.primary(), &primary),
        (topology.node("replica"), &replica),
    ] {
        workload::create_schema(client).await.expect("schema");
        reports.push(
            workload::run(&node.config(), &spec)
                .await
                .expect("the workload runs"),
        );
    }
    assert_eq!(format!("{:?}", reports[0]), format!("{:?}", reports[1]));

    for table in workload::TABLES {
        let ours = workload::digest(&primary, table).await.expect("digest");
        let theirs = workload::digest(&replica, table).await.expect("digest");
        assert_eq!(ours, theirs);
    }
    for table in workload::TABLES {
        let rows = count(&primary, &format!("SELECT count(*) FROM {table}")).await;
        assert!(rows > 0, "the workload left {table} empty");
    }
    // Some bodies are stored out of line, not compressed to something small.
    let toasted = count(
        &primary,
        "SELECT count(*) FROM wl_docs WHERE length(body) > 8000 AND pg_column_size(body) > 4000",
    )
    .await;
    assert!(toasted > 0, "no TOASTed document body");
    let compared = workload::compare(&primary, &replica, workload::TABLES)
        .await
        .expect("compare");
    assert_eq!(compared, Ok(()));
}

#[tokio::test]
async fn compare_names_the_table_and_key_of_a_changed_row() {
    let topology = start(Topology::builder().replica("replica")).await;
    let primary = topology.primary().connect().await.expect("connect primary");
    let replica = topology
        .node("replica")
        .connect()
        .await
        .expect("connect replica");
    let spec = small(3, 1, 40);
    for (node, client) in [
        (topology.primary(), &primary),
        (topology.node("replica"), &replica),
    ] {
        workload::create_schema(client).await.expect("schema");
        workload::run(&node.config(), &spec)
            .await
            .expect("the workload runs");
    }
    assert_eq!(
        workload::compare(&primary, &replica, workload::TABLES)
            .await
            .expect("compare"),
        Ok(())
    );

    // One order changes on the replica (a composite key with a text part).
    let changed = replica
        .query_one(
            "UPDATE wl_orders SET paid = NOT coalesce(paid, false) \
             WHERE (region, order_no) = (SELECT region, order_no FROM wl_orders \
                                         ORDER BY region COLLATE \"C\", order_no LIMIT 1) \
             RETURNING ROW(region, order_no)::text",
            &[],
        )
        .await
        .expect("change one row");
    let key: String = changed.get(0);
    let differences = workload::compare(&primary, &replica, workload::TABLES)
        .await
        .expect("compare")
        .expect_err("the row differs");
    assert!(differences.contains("public.wl_orders:"), "{differences}");
    assert!(
        differences.contains(&format!("key {key}:")),
        "{differences}"
    );
    assert!(!differences.contains("wl_accounts"), "{differences}");
    assert!(!differences.contains("wl_docs"), "{differences}");
    assert_eq!(differences.matches("  key ").count(), 1, "{differences}");
}

#[tokio::test]
async fn digests_quote_names_and_ignore_physical_order() {
    let topology = start(Topology::builder().replica("replica")).await;
    let primary = topology.primary().connect().await.expect("connect primary");
    let replica = topology
        .node("replica")
        .connect()
        .await
        .expect("connect replica");
    // The same rows, inserted in opposite orders (so stored in opposite orders), in a table with
    // an awkward name and a text key, and in a table without a primary key.
    for (client, order) in [(&primary, "ASC"), (&replica, "DESC")] {
        client
            .batch_execute(&format!(
                r#"CREATE TABLE "Odd ""name"" " (k text PRIMARY KEY, v int);
                   INSERT INTO "Odd ""name"" " SELECT 'key ' || g, g FROM generate_series(1, 50) g
                       ORDER BY g {order};
                   CREATE TABLE no_key (v text);
                   INSERT INTO no_key SELECT 'v' || g % 7 FROM generate_series(1, 30) g
                       ORDER BY g {order};"#
            ))
            .await
            .expect("tables");
    }
    let tables = [r#""Odd ""name"" ""#, "no_key"];
    let compared = workload::compare(&primary, &replica, &tables)
        .await
        .expect("compare");
    assert_eq!(compared, Ok(()));
    let odd = workload::digest(&primary, tables[0]).await.expect("digest");
    assert_eq!(odd.rows, 50);

    replica
        .batch_execute(r#"DELETE FROM "Odd ""name"" " WHERE k = 'key 7'"#)
        .await
        .expect("delete");
    let differences = workload::compare(&primary, &replica, &tables)
        .await
        .expect("compare")
        .expect_err("a row is missing");
    assert!(
        differences.contains(r#"key ("key 7"): primary has ("key 7",7)"#)
            && differences.contains("replica has no row"),
        "{differences}"
    );
}
