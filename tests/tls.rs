//! TLS per endpoint: `verify-full` connects with the right authority and host name, and refuses
//! a wrong host name or an unknown authority; the weaker modes behave as in libpq.

mod support;

use std::{path::PathBuf, time::Duration};

use pgherd::{
    settings::SslMode,
    testkit::{unrelated_ca_pem, Topology},
    ErrorKind, Herd, Read, Routable, Settings,
};
use support::start;

const SHORT: Duration = Duration::from_secs(3);

/// The settings of `topology` with the primary reached as `host`, in `mode`, trusting `ca`.
fn settings(topology: &Topology, host: &str, mode: SslMode, ca: Option<PathBuf>) -> Settings {
    let mut settings = topology.settings();
    let primary = settings.endpoints.get_mut("primary").expect("primary");
    primary.host = host.to_owned();
    primary.sslmode = mode;
    primary.sslrootcert = ca;
    settings
}

/// Whether the query ran over TLS, as the server reports it.
async fn uses_tls(herd: &Herd) -> Result<bool, pgherd::Error> {
    let rows = herd
        .send(Read::new("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").timeout(SHORT))
        .await?;
    Ok(rows[0].get(0))
}

#[actix_rt::test]
async fn verify_full_connects_with_the_right_authority_and_name() {
    let topology = start(Topology::builder().tls(true)).await;
    let ca = topology.tls().expect("tls files").ca.clone();
    let herd = Herd::start(settings(
        &topology,
        "localhost",
        SslMode::VerifyFull,
        Some(ca),
    ))
    .expect("start");
    assert!(uses_tls(&herd).await.expect("query over verified TLS"));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn verify_full_refuses_a_wrong_host_name() {
    let topology = start(Topology::builder().tls(true)).await;
    let ca = topology.tls().expect("tls files").ca.clone();
    // The certificate names `localhost` only; 127.0.0.1 is the same server under another name.
    let herd = Herd::start(settings(
        &topology,
        "127.0.0.1",
        SslMode::VerifyFull,
        Some(ca),
    ))
    .expect("start");
    let error = uses_tls(&herd).await.expect_err("the name does not match");
    // The endpoint never answers a probe: no primary is accepted, and the error says why.
    assert_eq!(error.kind(), ErrorKind::NoTarget, "{error}");
    assert!(
        error.to_string().contains("certificate not valid for name"),
        "{error}"
    );
    herd.shutdown().await;
}

#[actix_rt::test]
async fn verify_full_refuses_an_unknown_authority() {
    let topology = start(Topology::builder().tls(true)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let unrelated = dir.path().join("unrelated.pem");
    std::fs::write(&unrelated, unrelated_ca_pem().expect("a CA")).expect("write");
    let herd = Herd::start(settings(
        &topology,
        "localhost",
        SslMode::VerifyFull,
        Some(unrelated),
    ))
    .expect("start");
    let error = uses_tls(&herd).await.expect_err("the authority is unknown");
    assert_eq!(error.kind(), ErrorKind::NoTarget, "{error}");
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    herd.shutdown().await;
}

#[actix_rt::test]
async fn verify_ca_ignores_the_name_but_checks_the_authority() {
    let topology = start(Topology::builder().tls(true)).await;
    let ca = topology.tls().expect("tls files").ca.clone();
    let herd = Herd::start(settings(
        &topology,
        "127.0.0.1",
        SslMode::VerifyCa,
        Some(ca),
    ))
    .expect("start");
    assert!(uses_tls(&herd)
        .await
        .expect("verify-ca accepts the IP address"));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn require_and_prefer_encrypt_and_disable_does_not() {
    let topology = start(Topology::builder().tls(true)).await;
    for (mode, encrypted) in [
        (SslMode::Require, true),
        (SslMode::Prefer, true),
        (SslMode::Disable, false),
    ] {
        let herd = Herd::start(settings(&topology, "127.0.0.1", mode, None)).expect("start");
        assert_eq!(uses_tls(&herd).await.expect("query"), encrypted, "{mode}");
        herd.shutdown().await;
    }
}

#[actix_rt::test]
async fn require_refuses_a_server_without_tls_and_prefer_falls_back() {
    let topology = start(Topology::builder()).await;
    let herd =
        Herd::start(settings(&topology, "127.0.0.1", SslMode::Require, None)).expect("start");
    let error = uses_tls(&herd).await.expect_err("the server has no TLS");
    assert_eq!(error.kind(), ErrorKind::NoTarget, "{error}");
    assert!(error.to_string().contains("TLS"), "{error}");
    herd.shutdown().await;
    let herd = Herd::start(settings(&topology, "127.0.0.1", SslMode::Prefer, None)).expect("start");
    assert!(!uses_tls(&herd).await.expect("plain fallback"));
    herd.shutdown().await;
}

#[actix_rt::test]
async fn an_unreadable_authority_file_is_a_settings_error() {
    let topology = start(Topology::builder()).await;
    let settings = settings(
        &topology,
        "localhost",
        SslMode::VerifyFull,
        Some(PathBuf::from("/nonexistent/ca.pem")),
    );
    let error = Herd::start(settings).expect_err("refused");
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(
        error.to_string().contains("endpoints.primary.sslrootcert"),
        "{error}"
    );
}

/// `logical` mode's replication connection (which this crate opens itself) is encrypted and
/// verified like the others, and streams over TLS.
#[actix_rt::test]
async fn the_replication_stream_uses_tls() {
    let topology = start(
        Topology::builder()
            .tls(true)
            .logical(true)
            .replica("replica"),
    )
    .await;
    let table = "CREATE TABLE streamed (id bigint PRIMARY KEY, v text)";
    for node in [topology.primary(), topology.node("replica")] {
        let client = node.connect().await.expect("connect");
        client.batch_execute(table).await.expect("table");
    }
    let ca = topology.tls().expect("tls files").ca.clone();
    let mut settings = settings(&topology, "localhost", SslMode::VerifyFull, Some(ca));
    settings.replicator.mode = pgherd::settings::CaptureMode::Logical;
    settings.replicator.tables = vec!["streamed".to_owned()];
    settings.replicator.retry_interval = Duration::from_millis(200);
    let herd = Herd::start(settings).expect("start");
    let primary = topology.primary().connect().await.expect("connect");
    let replica = topology.node("replica").connect().await.expect("connect");
    primary
        .batch_execute("INSERT INTO streamed SELECT g, md5(g::text) FROM generate_series(1, 100) g")
        .await
        .expect("rows");
    support::eventually(
        "the rows streamed to the replica",
        Duration::from_secs(20),
        || {
            let replica = &replica;
            async move {
                replica
                    .query_one("SELECT count(*) FROM streamed", &[])
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 100)
            }
        },
    )
    .await;
    // The stream opens in the step after the copy.
    support::eventually(
        "the replicator's walsender, over TLS",
        Duration::from_secs(10),
        || {
            let primary = &primary;
            async move {
                let walsenders: Vec<(String, bool)> = primary
                    .query(
                        "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                         JOIN pg_stat_ssl s USING (pid) WHERE a.backend_type = 'walsender'",
                        &[],
                    )
                    .await
                    .expect("the walsenders")
                    .iter()
                    .map(|row| (row.get(0), row.get(1)))
                    .collect();
                walsenders == [("pgherd replicator".to_owned(), true)]
            }
        },
    )
    .await;
    primary
        .batch_execute("INSERT INTO streamed SELECT g, 'streamed' FROM generate_series(101, 200) g")
        .await
        .expect("rows");
    support::eventually(
        "the rows streamed over TLS",
        Duration::from_secs(20),
        || {
            let replica = &replica;
            async move {
                replica
                    .query_one("SELECT count(*) FROM streamed WHERE v = 'streamed'", &[])
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 100)
            }
        },
    )
    .await;
    herd.shutdown().await;
}
