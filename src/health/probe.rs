//! One probe of one endpoint: a single round trip on a connection of its own.

use std::time::{Duration, Instant};

use crate::position::{timeline_of_walfile, Position};

/// Everything one probe reads, in one statement. Readable by a non-superuser member of
/// `pg_monitor`. A standby's timeline is the one it streams (`pg_stat_wal_receiver`), or that of
/// its last restart point when it streams nothing; a primary's is read from the name of the WAL
/// file it writes, which changes at promotion (the checkpoint's timeline changes only at the
/// next checkpoint).
pub(crate) const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     pg_last_wal_receive_lsn(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
     coalesce((SELECT received_tli FROM pg_stat_wal_receiver), \
              (SELECT timeline_id FROM pg_control_checkpoint())), \
     (SELECT system_identifier FROM pg_control_system()), \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8";

/// Reads a standby's positions, fresh, before choosing whom to promote.
pub(crate) const POSITIONS_SQL: &str = "SELECT pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()";

/// What one probe saw.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProbeReport {
    pub(crate) at: Instant,
    pub(crate) rtt: Duration,
    pub(crate) in_recovery: bool,
    /// A primary's current position, or a standby's replayed one.
    pub(crate) position: Option<Position>,
    /// A standby's received position.
    pub(crate) received: Option<Position>,
    pub(crate) timeline: Option<u32>,
    pub(crate) system_id: Option<u64>,
    /// A standby's age of the last transaction it replayed.
    pub(crate) replay_age: Option<Duration>,
}

impl ProbeReport {
    /// Reads the row of [`PROBE_SQL`].
    pub(crate) fn from_row(
        row: &tokio_postgres::Row,
        at: Instant,
        rtt: Duration,
    ) -> Result<ProbeReport, tokio_postgres::Error> {
        let in_recovery: bool = row.try_get(0)?;
        let position: Option<tokio_postgres::types::PgLsn> = row.try_get(1)?;
        let received: Option<tokio_postgres::types::PgLsn> = row.try_get(2)?;
        let walfile: Option<String> = row.try_get(3)?;
        let standby_timeline: Option<i32> = row.try_get(4)?;
        let system_id: Option<i64> = row.try_get(5)?;
        let replay_age: Option<f64> = row.try_get(6)?;
        let timeline = match walfile.as_deref() {
            Some(name) => timeline_of_walfile(name),
            None => standby_timeline.and_then(|t| u32::try_from(t).ok()),
        };
        Ok(ProbeReport {
            at,
            rtt,
            in_recovery,
            position: position.map(Position::from),
            received: received.map(Position::from),
            timeline,
            // The identifier is unsigned in the control file; PostgreSQL shows it as bigint.
            system_id: system_id.map(|id| u64::from_ne_bytes(id.to_ne_bytes())),
            replay_age: replay_age
                .filter(|age| age.is_finite() && *age >= 0.0)
                .map(Duration::from_secs_f64),
        })
    }
}

/// The replication lag of a standby that replayed `replayed`, while its primary is at
/// `primary`: in bytes, and in time (zero when it replayed everything; otherwise the age of the
/// last transaction it replayed, which is how far behind the primary's clock it is at most).
pub(crate) fn lag(
    replayed: Option<Position>,
    replay_age: Option<Duration>,
    primary: Option<Position>,
) -> (Option<u64>, Option<Duration>) {
    match (replayed, primary) {
        (Some(replayed), Some(primary)) => {
            let bytes = primary.bytes_after(replayed);
            let time = if bytes == 0 {
                Some(Duration::ZERO)
            } else {
                replay_age
            };
            (Some(bytes), time)
        }
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_up_standby_has_no_lag_whatever_its_replay_age() {
        let at = Some(Position::new(1000));
        assert_eq!(
            lag(at, Some(Duration::from_secs(3600)), at),
            (Some(0), Some(Duration::ZERO))
        );
    }

    #[test]
    fn a_behind_standby_lags_by_bytes_and_replay_age() {
        let age = Some(Duration::from_millis(250));
        assert_eq!(
            lag(Some(Position::new(900)), age, Some(Position::new(1000))),
            (Some(100), age)
        );
        assert_eq!(lag(None, age, Some(Position::new(1000))), (None, None));
    }
}
