//! `pgherd`: check a settings file, or start local servers that match it.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod check;
mod dev;
mod replicator;
mod status;

/// The settings file used when none is given.
const DEFAULT_SETTINGS: &str = "Settings.toml";

#[derive(Debug, Parser)]
#[command(
    name = "pgherd",
    version,
    about = "Supervise a herd of PostgreSQL servers as one database"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a settings file and print its endpoints (passwords are never printed).
    /// Exits 0 when it is valid, 1 with every problem when it is not.
    Check {
        /// The settings file; `PGHERD_*` environment variables override it.
        #[arg(default_value = DEFAULT_SETTINGS)]
        settings: PathBuf,
    },
    /// Probe the endpoints of a settings file once and print a table: role configured and seen,
    /// state, round trip, lag, position, timeline. Exits 1 if an endpoint does not answer.
    Status {
        /// The settings file; `PGHERD_*` environment variables override it.
        #[arg(default_value = DEFAULT_SETTINGS)]
        settings: PathBuf,
        /// Probe again every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Manage the replicator's objects.
    Replicator {
        #[command(subcommand)]
        command: ReplicatorCommand,
    },
    /// Start throwaway local servers matching the endpoints of a settings file (standbys stream
    /// from the primary) and keep them until Ctrl-C, for pointing an application at.
    Dev {
        /// The settings file; every endpoint must be on 127.0.0.1 or localhost.
        #[arg(default_value = DEFAULT_SETTINGS)]
        settings: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ReplicatorCommand {
    /// Install (idempotently) what the replicator needs: the change tables and capture triggers
    /// (trigger mode) or the publications (logical mode) on the primary, and the progress table
    /// on each target; checks that every replicated table has a primary key and exists on every
    /// target. Exits 1 with the reason when something is missing.
    Install {
        /// The settings file; `PGHERD_*` environment variables override it.
        #[arg(default_value = DEFAULT_SETTINGS)]
        settings: PathBuf,
    },
}

#[actix_rt::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // RUST_LOG, not a PGHERD_ variable: every PGHERD_* variable is read as a setting.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgherd=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { settings } => check::run(&settings),
        Command::Status { settings, watch } => status::run(&settings, watch).await,
        Command::Dev { settings } => dev::run(&settings).await,
        Command::Replicator {
            command: ReplicatorCommand::Install { settings },
        } => replicator::install(&settings).await,
    }
}
