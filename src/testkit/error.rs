//! Why a test topology could not be started or controlled.

use std::{io, path::PathBuf, time::Duration};

/// An error of the testkit. Each says what failed and, where it can, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked for initdb, postgres and pg_basebackup in {}): \
         install the server, e.g. `apt-get update && apt-get install -y postgresql` on Debian or \
         Ubuntu, or put its bin directory first on PATH",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    BinariesNotFound {
        /// The directories that were searched.
        searched: Vec<PathBuf>,
    },
    /// Running as root, but there is no unprivileged OS user to run the servers as.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` OS user \
         to run the servers as: create one (`useradd --system postgres`) or run as a normal user"
    )]
    NoServerUser,
    /// A command (initdb, pg_basebackup, ...) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line, without secrets.
        command: String,
        /// How it ended.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// A server did not come up, or exited.
    #[error("server `{node}` {what}; the end of its log ({log}):\n{log_tail}")]
    Server {
        /// The node's name.
        node: String,
        /// What went wrong.
        what: String,
        /// Where its log is.
        log: PathBuf,
        /// The last lines of the log.
        log_tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        after: Duration,
    },
    /// A port asked for is taken.
    #[error(
        "port {port} for `{node}` is already in use: stop what listens there or pick another port"
    )]
    PortInUse {
        /// The node's name.
        node: String,
        /// The port.
        port: u16,
    },
    /// The requested topology is not possible.
    #[error("invalid topology: {0}")]
    Invalid(String),
    /// A query on a test server failed.
    #[error("query on `{node}` failed: {}", describe(source))]
    Postgres {
        /// The node's name.
        node: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The server's own message and SQLSTATE when there is one: the driver's `Display` says only
/// "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> TestkitError {
        let what = what.into();
        move |source| TestkitError::Io { what, source }
    }

    pub(crate) fn postgres(node: &str) -> impl FnOnce(tokio_postgres::Error) -> TestkitError + '_ {
        move |source| TestkitError::Postgres {
            node: node.to_owned(),
            source,
        }
    }
}
