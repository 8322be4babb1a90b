//! `pgherd replicator install`: install the replicator's objects ahead of time.

use std::{path::Path, process::ExitCode};

use pgherd::Settings;

/// Installs, printing each step; exits 1 with the reason when something is missing.
pub(crate) async fn install(path: &Path) -> ExitCode {
    let settings = match Settings::load(path) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    match pgherd::replicator::install(&settings).await {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
