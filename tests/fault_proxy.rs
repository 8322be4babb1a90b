//! The fault proxy, driven by a real tokio-postgres client against a real server, in each mode.

mod support;

use std::time::{Duration, Instant};

use pgherd::testkit::{FaultMode, FaultProxy, Node, Topology};
use support::start;
use tokio_postgres::Client;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(10);

/// Connects to `node` through `proxy`.
async fn connect_via(node: &Node, proxy: &FaultProxy) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = node
        .config_at(proxy.port())
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn select_one(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

#[tokio::test]
async fn pass_forwards_queries() {
    let topology = start(Topology::builder()).await;
    let proxy = FaultProxy::start(topology.primary().address()).expect("proxy");
    assert_ne!(proxy.port(), topology.primary().port());
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect");
    let port: String = client
        .query_one("SHOW port", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(port, topology.primary().port().to_string());
}

#[tokio::test]
async fn latency_delays_each_round_trip() {
    let topology = start(Topology::builder()).await;
    let proxy = FaultProxy::start(topology.primary().address()).expect("proxy");
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect");
    select_one(&client).await.expect("warm up");

    let delay = Duration::from_millis(150);
    proxy.set_mode(FaultMode::Latency(delay));
    let started = Instant::now();
    assert_eq!(select_one(&client).await.expect("query"), 1);
    let slow = started.elapsed();
    // The request and the answer are each held for `delay`.
    assert!(slow >= delay * 2, "a round trip took only {slow:?}");

    proxy.set_mode(FaultMode::Pass);
    let started = Instant::now();
    select_one(&client).await.expect("query");
    let fast = started.elapsed();
    assert!(
        fast < slow,
        "Pass ({fast:?}) is not faster than Latency ({slow:?})"
    );
}

#[tokio::test]
async fn blackhole_holds_traffic_and_heals_without_loss() {
    let topology = start(Topology::builder()).await;
    let proxy = FaultProxy::start(topology.primary().address()).expect("proxy");
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect");
    select_one(&client).await.expect("before the fault");

    proxy.set_mode(FaultMode::Blackhole);
    let query = tokio::spawn(async move {
        let answer = client
            .query_one("SELECT 2", &[])
            .await
            .map(|row| row.get::<_, i32>(0));
        (client, answer)
    });
    tokio::time::sleep(SHORT).await;
    assert!(!query.is_finished(), "a query got through a blackhole");
    let connecting = tokio::time::timeout(SHORT, connect_via(topology.primary(), &proxy)).await;
    assert!(connecting.is_err(), "a connection got through a blackhole");

    proxy.set_mode(FaultMode::Pass);
    let (client, answer) = tokio::time::timeout(LONG, query)
        .await
        .expect("the held query finishes after the network heals")
        .expect("task");
    assert_eq!(answer.expect("the held query succeeds"), 2);
    assert_eq!(
        select_one(&client)
            .await
            .expect("the connection still works"),
        1
    );
}

#[tokio::test]
async fn reset_closes_open_connections_and_new_ones() {
    let topology = start(Topology::builder()).await;
    let proxy = FaultProxy::start(topology.primary().address()).expect("proxy");
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect");
    select_one(&client).await.expect("before the fault");

    proxy.set_mode(FaultMode::Reset);
    let failed = tokio::time::timeout(LONG, select_one(&client))
        .await
        .expect("a reset connection fails at once, it does not hang");
    assert!(failed.is_err(), "a query succeeded over a reset connection");
    assert!(client.is_closed());
    let refused = tokio::time::timeout(LONG, connect_via(topology.primary(), &proxy))
        .await
        .expect("a new connection fails at once");
    assert!(refused.is_err(), "a new connection got through a reset");

    proxy.set_mode(FaultMode::Pass);
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect after");
    select_one(&client).await.expect("query after");
}

#[tokio::test]
async fn refuse_stops_listening_and_listens_again_on_the_same_port() {
    let topology = start(Topology::builder()).await;
    let proxy = FaultProxy::start(topology.primary().address()).expect("proxy");
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect");
    select_one(&client).await.expect("before the fault");

    proxy.set_mode(FaultMode::Refuse);
    let refused = std::net::TcpStream::connect(proxy.address());
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the proxy still listens"
    );
    let failed = tokio::time::timeout(LONG, select_one(&client))
        .await
        .expect("an open connection fails at once");
    assert!(failed.is_err(), "an open connection survived Refuse");

    proxy.set_mode(FaultMode::Pass);
    let client = connect_via(topology.primary(), &proxy)
        .await
        .expect("connect after");
    select_one(&client).await.expect("query after");
}

#[tokio::test]
async fn topology_can_put_a_proxy_in_front_of_a_node() {
    let topology = start(Topology::builder().standbys(1).proxied("standby_1")).await;
    let proxy = topology.proxy("standby_1").expect("a proxy");
    let settings = topology.settings();
    assert_eq!(
        settings.endpoint("standby_1").map(|e| e.port),
        Some(proxy.port()),
        "the settings point at the proxy"
    );
    assert_eq!(
        settings.endpoint("primary").map(|e| e.port),
        Some(topology.primary().port())
    );
    let client = connect_via(topology.standby(0), proxy)
        .await
        .expect("connect");
    select_one(&client).await.expect("query");
    proxy.set_mode(FaultMode::Reset);
    assert!(tokio::time::timeout(LONG, select_one(&client))
        .await
        .expect("fails fast")
        .is_err());
}
