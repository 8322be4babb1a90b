//! `pgherd dev`: local servers matching a settings file, kept until Ctrl-C.

use std::{path::Path, process::ExitCode};

use pgherd::{
    testkit::{Topology, TopologyBuilder},
    Settings,
};

/// Starts the servers, prints where they are, and waits for Ctrl-C (or SIGTERM).
pub(crate) async fn run(path: &Path) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "starting {} local servers for {} ...",
        settings.endpoints.len(),
        path.display()
    );
    let topology = match start(&settings).await {
        Ok(topology) => topology,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", describe(&topology));
    println!(
        "ready in {} ms; press Ctrl-C to stop the servers and remove their files",
        topology.startup_time().as_millis()
    );
    wait_for_shutdown().await;
    eprintln!("stopping ...");
    drop(topology);
    eprintln!("stopped; files removed");
    ExitCode::SUCCESS
}

async fn start(settings: &Settings) -> Result<Topology, pgherd::testkit::TestkitError> {
    TopologyBuilder::from_settings(settings)?.start().await
}

fn describe(topology: &Topology) -> String {
    let mut out = String::new();
    for node in topology.nodes() {
        out.push_str(&format!(
            "  {:<12} {:<8} {}:{:<6} pid {:<8} data {}\n",
            node.name(),
            node.role().to_string(),
            node.host(),
            node.port(),
            node.pid().map(|p| p.to_string()).unwrap_or_default(),
            node.data_dir().display(),
        ));
    }
    out
}

async fn wait_for_shutdown() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
