//! The error every query message can return.
//!
//! [`Error`] is opaque: ask it what happened with [`Error::kind`] and the classifier methods
//! ([`is_retryable`](Error::is_retryable), [`is_connection`](Error::is_connection),
//! [`is_timeout`](Error::is_timeout), [`is_commit_unknown`](Error::is_commit_unknown), ...), and
//! where with [`Error::endpoint`] and [`Error::code`] (the SQLSTATE).

use std::{fmt, sync::Arc, time::Duration};

use tokio_postgres::error::{DbError, SqlState};

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server ran the statement and refused it (a constraint, a syntax error, a permission,
    /// a read-only transaction, ...). [`Error::code`] gives the SQLSTATE. Never retried by pgherd,
    /// never marks an endpoint down. Nothing was committed.
    Sql,
    /// The connection failed or was lost. For a write, nothing was committed: a write whose
    /// commit may have happened is [`CommitUnknown`](Self::CommitUnknown) instead.
    Connection,
    /// The message's deadline passed. Nothing was committed (a write cancelled after its commit
    /// may have happened is [`CommitUnknown`](Self::CommitUnknown)).
    Timeout,
    /// A write was sent, and the connection was lost (or the deadline passed and the server did
    /// not answer the cancel) before its outcome was known: it may or may not have been
    /// committed. pgherd never retries such a write unless it is marked idempotent.
    CommitUnknown,
    /// The router holds as many messages as `router.queue_capacity` allows; retry later.
    Overloaded,
    /// No endpoint can serve the message (none in its cluster fits, or all are unreachable)
    /// before its deadline.
    NoTarget,
    /// The message names an endpoint or cluster that is not configured.
    UnknownTarget,
    /// Code run for the message (a transaction closure) panicked. The connection it used was
    /// discarded and the endpoint's actor restarted.
    Panicked,
    /// The herd is shutting down, or its supervisor gave up after too many restarts (the message
    /// says why).
    Stopped,
    /// The settings or the TLS configuration of an endpoint are unusable.
    Config,
    /// A parameter or a column did not fit its SQL type, or a query returned an unexpected
    /// number of rows: a bug on the client's side, never retried. For a write, the error says
    /// whether it was committed.
    Mapping,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Sql => "the server refused the statement",
            ErrorKind::Connection => "connection failed",
            ErrorKind::Timeout => "deadline passed",
            ErrorKind::CommitUnknown => "commit outcome unknown",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::NoTarget => "no endpoint can serve the message",
            ErrorKind::UnknownTarget => "unknown target",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Stopped => "stopped",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Mapping => "unexpected result",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

struct Inner {
    kind: ErrorKind,
    endpoint: Option<Arc<str>>,
    detail: Option<String>,
    source: Option<Source>,
}

/// A failed query message: what happened, on which endpoint, and what to do about it.
pub struct Error(Box<Inner>);

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Error {
        Error(Box::new(Inner {
            kind,
            endpoint: None,
            detail: None,
            source: None,
        }))
    }

    pub(crate) fn with_endpoint(mut self, endpoint: &Arc<str>) -> Error {
        self.0.endpoint = Some(Arc::clone(endpoint));
        self
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.0.detail = Some(detail.into());
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        self.0.source = Some(source.into());
        self
    }

    /// Changes the kind, keeping everything else (e.g. a connection error that turned out to
    /// hit a write after it was sent becomes [`ErrorKind::CommitUnknown`]).
    pub(crate) fn into_kind(mut self, kind: ErrorKind) -> Error {
        self.0.kind = kind;
        self
    }

    pub(crate) fn overloaded(capacity: usize) -> Error {
        Error::new(ErrorKind::Overloaded).with_detail(format!(
            "{capacity} messages are already queued or running (router.queue_capacity): retry \
             later, or raise the capacity if the databases can take more"
        ))
    }

    pub(crate) fn timeout(after: Duration, doing: &str) -> Error {
        Error::new(ErrorKind::Timeout).with_detail(format!(
            "the deadline of {} passed while {doing}",
            show(after)
        ))
    }

    pub(crate) fn stopped(reason: impl Into<String>) -> Error {
        Error::new(ErrorKind::Stopped).with_detail(reason)
    }

    pub(crate) fn mapping(detail: impl Into<String>) -> Error {
        Error::new(ErrorKind::Mapping).with_detail(detail)
    }

    /// Classifies a driver error: a server-side refusal is [`ErrorKind::Sql`], anything else is a
    /// connection failure. The caller refines a connection failure of a sent write into
    /// [`ErrorKind::CommitUnknown`].
    pub(crate) fn from_postgres(error: tokio_postgres::Error) -> Error {
        let kind = if error.as_db_error().is_some() {
            if is_connection_code(error.code()) {
                ErrorKind::Connection
            } else {
                ErrorKind::Sql
            }
        } else if error.is_closed() || is_io(&error) {
            ErrorKind::Connection
        } else {
            // Raised by the driver itself (a parameter or a column that does not fit its type,
            // a row count): nothing to do with the connection, and never retried.
            ErrorKind::Mapping
        };
        Error::new(kind).with_source(error)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The endpoint the failure happened on, when there was one.
    pub fn endpoint(&self) -> Option<&str> {
        self.0.endpoint.as_deref()
    }

    /// The SQLSTATE the server sent, when it sent one.
    pub fn code(&self) -> Option<&SqlState> {
        self.as_db_error().map(DbError::code)
    }

    /// The server's error report (message, detail, hint, constraint, ...), when there is one.
    pub fn as_db_error(&self) -> Option<&DbError> {
        self.postgres_source()
            .and_then(tokio_postgres::Error::as_db_error)
    }

    fn postgres_source(&self) -> Option<&tokio_postgres::Error> {
        self.0
            .source
            .as_deref()
            .and_then(|source| source.downcast_ref::<tokio_postgres::Error>())
    }

    /// Whether sending the same message again may succeed and cannot do harm: the failure was
    /// about capacity, time or reachability, and nothing was committed. A
    /// [`CommitUnknown`](ErrorKind::CommitUnknown) write is not retryable: check first whether it
    /// took effect (or make it idempotent).
    pub fn is_retryable(&self) -> bool {
        match self.kind() {
            ErrorKind::Connection
            | ErrorKind::Timeout
            | ErrorKind::Overloaded
            | ErrorKind::NoTarget => true,
            ErrorKind::Sql => self.code().is_some_and(is_transient_code),
            _ => false,
        }
    }

    /// Whether the failure was the network or the server process, not the statement.
    pub fn is_connection(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Connection | ErrorKind::CommitUnknown
        )
    }

    /// Whether the message's deadline passed.
    pub fn is_timeout(&self) -> bool {
        self.kind() == ErrorKind::Timeout
    }

    /// Whether a write may or may not have been committed.
    pub fn is_commit_unknown(&self) -> bool {
        self.kind() == ErrorKind::CommitUnknown
    }

    /// Whether the router refused the message because it is full.
    pub fn is_overloaded(&self) -> bool {
        self.kind() == ErrorKind::Overloaded
    }

    /// Whether the server refused the statement (see [`code`](Self::code)).
    pub fn is_sql(&self) -> bool {
        self.kind() == ErrorKind::Sql
    }
}

/// A duration for people: to the millisecond.
pub(crate) fn show(duration: Duration) -> String {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(millis)).to_string()
}

/// Whether the driver error comes from the socket, the connection's set-up, or the protocol.
/// tokio-postgres does not expose its error kinds: the socket's errors carry an `io::Error`
/// source; the few kinds without one are recognised by their fixed text.
fn is_io(error: &tokio_postgres::Error) -> bool {
    const CONNECTION_KINDS: [&str; 5] = [
        "timeout waiting for server",
        "error connecting to server",
        "error performing TLS handshake",
        "unexpected message from server",
        "error communicating with the server",
    ];
    let text = error.to_string();
    if CONNECTION_KINDS.iter().any(|kind| text.starts_with(kind)) {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// SQLSTATEs that mean the session or server went away rather than the statement being wrong.
fn is_connection_code(code: Option<&SqlState>) -> bool {
    code.is_some_and(|code| {
        let class = &code.code()[..2];
        // 08: connection exception; 57P01-57P03: admin/crash shutdown, cannot connect now.
        class == "08"
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
    })
}

/// SQLSTATEs after which the same statement may succeed when sent again.
fn is_transient_code(code: &SqlState) -> bool {
    *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::TOO_MANY_CONNECTIONS
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.kind.describe())?;
        if let Some(endpoint) = &self.0.endpoint {
            write!(f, " on `{endpoint}`")?;
        }
        if let Some(detail) = &self.0.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(db) = self.as_db_error() {
            write!(f, ": {} (SQLSTATE {})", db.message(), db.code().code())?;
        } else if let Some(source) = &self.0.source {
            write!(f, ": {source}")?;
            if let Some(inner) = source.source() {
                write!(f, ": {inner}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("endpoint", &self.0.endpoint)
            .field("detail", &self.0.detail)
            .field("source", &self.0.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl From<tokio_postgres::Error> for Error {
    /// Lets `?` turn driver errors into [`Error`] inside a [`Transact`](crate::Transact) closure.
    fn from(error: tokio_postgres::Error) -> Error {
        Error::from_postgres(error)
    }
}

impl From<actix::MailboxError> for Error {
    fn from(error: actix::MailboxError) -> Error {
        Error::new(ErrorKind::Stopped)
            .with_detail(
                "the router is gone (the herd was shut down, or the address is from a router \
                 that was restarted: get a fresh one from Herd::router)",
            )
            .with_source(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_endpoint_and_detail() {
        let endpoint: Arc<str> = Arc::from("primary");
        let error = Error::new(ErrorKind::CommitUnknown)
            .with_endpoint(&endpoint)
            .with_detail("the connection was lost after the write was sent");
        assert_eq!(
            error.to_string(),
            "commit outcome unknown on `primary`: the connection was lost after the write was sent"
        );
        assert!(error.is_commit_unknown());
        assert!(error.is_connection());
        assert!(!error.is_retryable());
    }

    #[test]
    fn overload_and_timeouts_are_retryable() {
        assert!(Error::overloaded(8).is_retryable());
        assert!(Error::timeout(Duration::from_secs(1), "waiting").is_retryable());
        assert!(!Error::new(ErrorKind::Sql).is_retryable());
    }

    #[test]
    fn connection_codes() {
        assert!(is_connection_code(Some(&SqlState::ADMIN_SHUTDOWN)));
        assert!(is_connection_code(Some(&SqlState::CONNECTION_FAILURE)));
        assert!(!is_connection_code(Some(&SqlState::UNIQUE_VIOLATION)));
        assert!(!is_connection_code(None));
    }
}
