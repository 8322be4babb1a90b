//! Positions in the write-ahead log: what read-your-writes is measured in.

use std::{fmt, str::FromStr};

/// A position in a cluster's write-ahead log (an LSN), as PostgreSQL writes it: `16/B374D848`.
///
/// A successful write returns the position it reached; a read sent with
/// [`after`](crate::Routable::after) that position is served only where it has been replayed.
/// Positions of one cluster only grow, across promotions too (a new timeline continues from the
/// point where the old one ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(u64);

impl Position {
    /// The position at `lsn` bytes.
    pub const fn new(lsn: u64) -> Position {
        Position(lsn)
    }

    /// The position as a byte offset.
    pub const fn lsn(self) -> u64 {
        self.0
    }

    /// How many bytes `self` is ahead of `earlier` (0 when it is not ahead).
    pub fn bytes_after(self, earlier: Position) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A position could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a WAL position: expected two hexadecimal numbers like `16/B374D848`")]
pub struct PositionParseError(String);

impl FromStr for Position {
    type Err = PositionParseError;

    fn from_str(text: &str) -> Result<Position, PositionParseError> {
        let failed = || PositionParseError(text.to_owned());
        let (high, low) = text.split_once('/').ok_or_else(failed)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| failed())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| failed())?;
        Ok(Position((u64::from(high) << 32) | u64::from(low)))
    }
}

impl From<tokio_postgres::types::PgLsn> for Position {
    fn from(lsn: tokio_postgres::types::PgLsn) -> Position {
        Position(u64::from(lsn))
    }
}

impl From<Position> for tokio_postgres::types::PgLsn {
    fn from(position: Position) -> tokio_postgres::types::PgLsn {
        tokio_postgres::types::PgLsn::from(position.0)
    }
}

/// The timeline in a WAL file name (`000000020000000000000003` is on timeline 2).
///
/// Right after `pg_promote()`, `pg_control_checkpoint().timeline_id` still shows the old timeline
/// until the next checkpoint, while the name of the WAL file being written already carries the
/// new one: this is the value to fence on.
pub(crate) fn timeline_of_walfile(name: &str) -> Option<u32> {
    name.get(..8)
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_like_postgres() {
        let position: Position = "16/B374D848".parse().expect("valid");
        assert_eq!(position.lsn(), 0x16_B374_D848);
        assert_eq!(position.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Position>(), Ok(Position::new(0)));
        assert!("16B374D848".parse::<Position>().is_err());
        assert!("xx/1".parse::<Position>().is_err());
    }

    #[test]
    fn orders_and_measures() {
        let a = Position::new(100);
        let b = Position::new(250);
        assert!(a < b);
        assert_eq!(b.bytes_after(a), 150);
        assert_eq!(a.bytes_after(b), 0);
    }

    #[test]
    fn reads_the_timeline_of_a_wal_file_name() {
        assert_eq!(timeline_of_walfile("000000020000000000000003"), Some(2));
        assert_eq!(timeline_of_walfile("0000000A0000000000000003"), Some(10));
        assert_eq!(timeline_of_walfile("bogus"), None);
    }
}
