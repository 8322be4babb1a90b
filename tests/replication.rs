//! The replicator against real servers: tables on `replica` endpoints kept equal to the primary,
//! in both capture modes.

mod support;

use std::time::Duration;

use pgherd::{settings::CaptureMode, testkit::Topology, Herd, ReplicationState};
use support::{eventually, start};

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text, big text, tags int[]);
                      CREATE TABLE pairs (a text, b int, v jsonb, PRIMARY KEY (a, b));";

async fn topology(logical: bool) -> Topology {
    let topology = start(Topology::builder().replica("replica").logical(logical)).await;
    for node in [topology.primary(), topology.node("replica")] {
        node.connect()
            .await
            .expect("connect")
            .batch_execute(SCHEMA)
            .await
            .expect("schema");
    }
    topology
}

fn herd(topology: &Topology, mode: CaptureMode) -> Herd {
    let mut settings = topology.settings();
    settings.replicator.mode = mode;
    settings.replicator.tables = vec!["items".to_owned(), "public.pairs".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    Herd::start(settings).expect("start")
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

async fn basic_changes(mode: CaptureMode) {
    let topology = topology(mode == CaptureMode::Logical).await;
    let primary = topology.primary().connect().await.expect("connect");
    primary
        .batch_execute(
            "INSERT INTO items SELECT g, 'n' || g, NULL, ARRAY[g, -g] FROM generate_series(1, 500) g;
             INSERT INTO pairs VALUES ('x', 1, '{\"k\": [1, 2]}'), ('it''s', 2, 'null');",
        )
        .await
        .expect("rows before the herd starts (the initial copy)");
    let herd = herd(&topology, mode);
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
             BEGIN; INSERT INTO pairs VALUES ('y', 3, '[]'); UPDATE pairs SET b = 4 WHERE a = 'x'; COMMIT;
             TRUNCATE pairs; INSERT INTO pairs VALUES ('after truncate', 1, '{}');",
        )
        .await
        .expect("changes");
    converge(&topology).await;
    let status = herd.replication();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].state, ReplicationState::Streaming, "{status:?}");
    assert!(status[0].applied.is_some(), "{status:?}");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn trigger_mode_keeps_the_replica_equal() {
    basic_changes(CaptureMode::Trigger).await;
}

#[actix_rt::test]
async fn logical_mode_keeps_the_replica_equal() {
    basic_changes(CaptureMode::Logical).await;
}
