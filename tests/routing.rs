//! Messages go where their intent and options say, as the servers themselves report.

mod support;

use std::time::Duration;

use pgherd::{
    testkit::{Node, Topology},
    Batch, ErrorKind, FromRow, Herd, Intent, Params, Query, QueryResult, Read, Routable, Route,
    RouteRequest, RoutingRule, Write,
};
use support::start;

/// How many times `node` ran statements whose text contains `marker`, per pg_stat_statements
/// (which merges statements that differ only in constants or comments: markers must be SQL).
async fn calls(node: &Node, marker: &str) -> i64 {
    let client = node.connect_admin().await.expect("admin connection");
    client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE '%' || $1 || '%'",
            &[&marker],
        )
        .await
        .expect("pg_stat_statements")
        .get(0)
}

fn start_herd(topology: &Topology) -> Herd {
    Herd::start(topology.settings()).expect("start the herd")
}

struct CountRows {
    marker: &'static str,
}

impl Query for CountRows {
    type Output = i64;
    const INTENT: Intent = Intent::Read;

    fn sql(&self) -> &str {
        self.marker
    }
    fn params(&self) -> Params<'_> {
        Vec::new()
    }
    fn output(result: QueryResult) -> Result<i64, pgherd::Error> {
        Ok(result.one::<(i64,)>()?.0)
    }
}

#[actix_rt::test]
async fn writes_land_on_the_primary_and_reads_on_the_standbys() {
    let topology = start(Topology::builder().standbys(2).stat_statements(true)).await;
    let herd = start_herd(&topology);
    herd.wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");

    herd.send(Write::new(
        "CREATE TABLE routed_items (id bigint PRIMARY KEY, note text)",
    ))
    .await
    .expect("create table");
    for id in 0..20_i64 {
        let written = herd
            .send(
                Write::new("INSERT INTO routed_items VALUES ($1, $2)")
                    .bind(id)
                    .bind(format!("item {id}")),
            )
            .await
            .expect("insert");
        assert_eq!(written.rows_affected, 1);
    }
    // Let the standbys replay the table before reading from them.
    support::eventually(
        "the rows reach both standbys",
        Duration::from_secs(10),
        || async {
            let mut all = true;
            for standby in topology.standbys() {
                let client = standby.connect().await.expect("connect");
                let count: i64 = client
                    .query_one("SELECT count(id) FROM routed_items", &[])
                    .await
                    .map(|row| row.get(0))
                    .unwrap_or(0);
                all &= count == 20;
            }
            all
        },
    )
    .await;
    for _ in 0..40 {
        let rows = herd
            .send(Read::new("SELECT count(*) FROM routed_items"))
            .await
            .expect("read");
        let (count,): (i64,) = FromRow::from_row(&rows[0]).expect("a count");
        assert_eq!(count, 20);
    }
    let typed = herd
        .send(
            CountRows {
                marker: "SELECT count(note) FROM routed_items",
            }
            .routed(),
        )
        .await
        .expect("typed read");
    assert_eq!(typed, 20);

    let primary = topology.primary();
    let (standby_1, standby_2) = (topology.standby(0), topology.standby(1));
    let insert = "INSERT INTO routed_items";
    let read = "SELECT count(*) FROM routed_items";
    let typed_read = "SELECT count(note) FROM routed_items";
    assert_eq!(
        calls(primary, insert).await,
        20,
        "every write on the primary"
    );
    assert_eq!(calls(standby_1, insert).await, 0);
    assert_eq!(calls(primary, read).await, 0, "no read on the primary");
    let (reads_1, reads_2) = (calls(standby_1, read).await, calls(standby_2, read).await);
    assert_eq!(reads_1 + reads_2, 40, "every read on a standby");
    assert_eq!(
        (reads_1, reads_2),
        (20, 20),
        "round robin spreads them evenly"
    );
    assert_eq!(
        calls(standby_1, typed_read).await + calls(standby_2, typed_read).await,
        1
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn explicit_targets_and_unknown_names() {
    let topology = start(
        Topology::builder()
            .standbys(1)
            .backup("backup")
            .stat_statements(true),
    )
    .await;
    let herd = start_herd(&topology);

    let port: String = herd
        .send(Read::new("SHOW port /* to-backup */").target("backup"))
        .await
        .expect("read on the backup")[0]
        .get(0);
    assert_eq!(port, topology.node("backup").port().to_string());
    // An explicit target takes writes whatever its role.
    herd.send(Write::new("CREATE TABLE only_on_backup (v int)").target("backup"))
        .await
        .expect("write on the backup");
    let primary = topology.primary().connect().await.expect("connect");
    let on_primary: i64 = primary
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_on_backup'",
            &[],
        )
        .await
        .expect("catalog")
        .get(0);
    assert_eq!(on_primary, 0);
    // A read may be pinned to the primary.
    herd.send(Read::new("SELECT current_database()").target("primary"))
        .await
        .expect("pinned read");
    assert_eq!(
        calls(topology.primary(), "SELECT current_database()").await,
        1
    );

    let error = herd
        .send(Read::new("SELECT 1").target("standby_9"))
        .await
        .expect_err("an unknown endpoint");
    assert_eq!(error.kind(), ErrorKind::UnknownTarget);
    let text = error.to_string();
    assert!(
        text.contains("`standby_9`") && text.contains("`standby_1`"),
        "{text}"
    );
    let error = herd
        .send(Read::new("SELECT 1").cluster("nope"))
        .await
        .expect_err("an unknown cluster");
    assert_eq!(error.kind(), ErrorKind::UnknownTarget);
    herd.shutdown().await;
}

/// Sends reads that mention `reports.` to the backup.
struct ReportsOnBackup;

impl RoutingRule for ReportsOnBackup {
    fn route(&self, request: &RouteRequest<'_>) -> Route {
        match request.query::<Read>() {
            Some(read) if read.sql().contains("reports.") => Route::Endpoint("backup".into()),
            _ => Route::Default,
        }
    }
}

#[actix_rt::test]
async fn routing_rules_and_clusters() {
    let topology = start(
        Topology::builder()
            .standbys(1)
            .backup("backup")
            .independent("tenant_db", pgherd::Role::Primary)
            .stat_statements(true),
    )
    .await;
    let mut settings = topology.settings();
    settings
        .endpoints
        .get_mut("tenant_db")
        .expect("tenant endpoint")
        .cluster = "tenant".into();
    let herd = Herd::builder(settings)
        .rule(ReportsOnBackup)
        .start()
        .expect("start");

    herd.send(Write::new("CREATE SCHEMA reports").target("backup"))
        .await
        .expect("schema on backup");
    let ruled = "SELECT count(*) FROM pg_namespace WHERE nspname <> 'reports.'";
    herd.send(Read::new(ruled)).await.expect("ruled read");
    let stored = "FROM pg_namespace WHERE nspname <>";
    assert_eq!(
        calls(topology.node("backup"), stored).await,
        1,
        "the rule sent it to the backup"
    );
    assert_eq!(calls(topology.standby(0), stored).await, 0);

    herd.send(
        Batch::new()
            .statement("CREATE TABLE tenant_rows (v int)")
            .statement("INSERT INTO tenant_rows VALUES (7)")
            .cluster("tenant"),
    )
    .await
    .expect("batch in the tenant cluster");
    let tenant = topology.node("tenant_db").connect().await.expect("connect");
    let sum: i64 = tenant
        .query_one("SELECT sum(v)::bigint FROM tenant_rows", &[])
        .await
        .expect("tenant rows")
        .get(0);
    assert_eq!(sum, 7);
    // A read in a cluster without standbys goes to its primary.
    let rows = herd
        .send(Read::new("SELECT v FROM tenant_rows").cluster("tenant"))
        .await
        .expect("tenant read");
    assert_eq!(rows.len(), 1);
    herd.shutdown().await;
}
