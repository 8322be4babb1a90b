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

/// The size of a WAL page header on a page that starts a segment, and on any other page
/// (`SizeOfXLogLongPHD`, `SizeOfXLogShortPHD` on 64-bit builds).
const LONG_PAGE_HEADER: u64 = 40;
const SHORT_PAGE_HEADER: u64 = 24;

impl Position {
    /// The end of everything inserted so far, from `pg_current_wal_insert_lsn()`.
    ///
    /// When the last record ended exactly at a page boundary, the insert position points past
    /// the next page's header, where the next record will go, while a standby's replayed
    /// position stops at the boundary itself: it would never reach the insert position until
    /// more WAL is written. Such a position is mapped back to the boundary. (No record can end
    /// inside a page header, so nothing is lost by it.)
    pub(crate) fn from_insert(lsn: u64, block_size: u64, segment_size: u64) -> Position {
        if block_size == 0 || segment_size == 0 {
            return Position(lsn);
        }
        let in_page = lsn % block_size;
        let page = lsn - in_page;
        let header = if page % segment_size == 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        Position(if in_page == header { page } else { lsn })
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

    #[test]
    fn an_insert_position_past_a_page_header_is_the_page_boundary() {
        const BLOCK: u64 = 8192;
        const SEGMENT: u64 = 16 * 1024 * 1024;
        // Past the short header of a page inside a segment: the boundary.
        let page = 5 * SEGMENT + 3 * BLOCK;
        assert_eq!(
            Position::from_insert(page + 24, BLOCK, SEGMENT),
            Position::new(page)
        );
        // Past the long header of a segment's first page.
        let segment = 6 * SEGMENT;
        assert_eq!(
            Position::from_insert(segment + 40, BLOCK, SEGMENT),
            Position::new(segment)
        );
        // Anything else is a record's end, kept as it is.
        for lsn in [
            page + 48,
            page + 40,
            segment + 24,
            segment + 48,
            page + 8000,
        ] {
            assert_eq!(
                Position::from_insert(lsn, BLOCK, SEGMENT),
                Position::new(lsn)
            );
        }
        assert_eq!(
            Position::from_insert(page + 24, 0, 0),
            Position::new(page + 24)
        );
    }
}
