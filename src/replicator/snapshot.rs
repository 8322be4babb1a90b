//! Transaction snapshots (`pg_snapshot`, written `xmin:xmax:xip,...`): the boundaries of
//! trigger-mode batches and the filter that hands an initial copy over to the stream.
//!
//! A transaction is *visible* in a snapshot when it had finished when the snapshot was taken:
//! its id is below `xmin`, or below `xmax` and not in the in-progress list. A batch is the set of
//! transactions visible in the new snapshot but not in the previous one, so a transaction that
//! commits late with a low id is picked up by the batch after its commit, never skipped.

use std::{fmt, str::FromStr};

/// A `pg_snapshot`, with 64-bit transaction ids (`xid8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Snapshot {
    /// The snapshot in which everything below `xid` is visible and nothing else.
    #[cfg(test)]
    pub(crate) fn before(xid: u64) -> Snapshot {
        Snapshot {
            xmin: xid,
            xmax: xid,
            in_progress: Vec::new(),
        }
    }

    /// The oldest transaction that may not be visible.
    pub(crate) fn xmin(&self) -> u64 {
        self.xmin
    }

    /// Whether transaction `xid` had finished when the snapshot was taken.
    pub(crate) fn visible(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.in_progress.binary_search(&xid).is_err())
    }

    /// The 64-bit id of a 32-bit transaction id (as logical decoding reports it) that is
    /// recent relative to this snapshot: the one nearest below `xmax + 2^31`.
    pub(crate) fn widen(&self, xid: u32) -> u64 {
        let reference = self.xmax.saturating_add(1 << 31);
        let epoch = reference >> 32;
        let candidate = (epoch << 32) | u64::from(xid);
        if candidate > reference && epoch > 0 {
            candidate - (1 << 32)
        } else {
            candidate
        }
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (index, xid) in self.in_progress.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{xid}")?;
        }
        Ok(())
    }
}

/// A snapshot's text could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotParseError(String);

impl fmt::Display for SnapshotParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a pg_snapshot (xmin:xmax:xip,...)", self.0)
    }
}

impl std::error::Error for SnapshotParseError {}

impl FromStr for Snapshot {
    type Err = SnapshotParseError;

    fn from_str(text: &str) -> Result<Snapshot, SnapshotParseError> {
        let error = || SnapshotParseError(text.to_owned());
        let mut parts = text.split(':');
        let (Some(xmin), Some(xmax), Some(list), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(error());
        };
        let xmin: u64 = xmin.parse().map_err(|_| error())?;
        let xmax: u64 = xmax.parse().map_err(|_| error())?;
        let mut in_progress = list
            .split(',')
            .filter(|xid| !xid.is_empty())
            .map(|xid| xid.parse::<u64>().map_err(|_| error()))
            .collect::<Result<Vec<_>, _>>()?;
        in_progress.sort_unstable();
        if xmin > xmax || in_progress.iter().any(|&xid| xid < xmin || xid >= xmax) {
            return Err(error());
        }
        Ok(Snapshot {
            xmin,
            xmax,
            in_progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_follows_xmin_xmax_and_the_in_progress_list() {
        let snapshot: Snapshot = "763:765:763".parse().unwrap();
        assert!(snapshot.visible(762));
        assert!(!snapshot.visible(763), "in progress");
        assert!(snapshot.visible(764), "finished before the snapshot");
        assert!(!snapshot.visible(765), "started after");
        assert_eq!(snapshot.to_string(), "763:765:763");
    }

    #[test]
    fn a_late_commit_with_a_lower_id_falls_into_the_next_batch() {
        // PgQ's example: A (763) is open while B (764) commits.
        let first: Snapshot = "762:762:".parse().unwrap();
        let second: Snapshot = "763:765:763".parse().unwrap();
        let third: Snapshot = "766:766:".parse().unwrap();
        let batch = |from: &Snapshot, to: &Snapshot| {
            (760..770)
                .filter(|&xid| to.visible(xid) && !from.visible(xid))
                .collect::<Vec<_>>()
        };
        assert_eq!(batch(&first, &second), [762, 764]);
        assert_eq!(batch(&second, &third), [763, 765]);
    }

    #[test]
    fn bad_text_is_refused() {
        for text in ["", "1:2", "5:4:", "1:5:7", "1:5:x", "1:2:3:4"] {
            assert!(text.parse::<Snapshot>().is_err(), "{text}");
        }
        assert_eq!(Snapshot::before(9).to_string(), "9:9:");
    }

    #[test]
    fn thirty_two_bit_ids_are_widened_near_the_snapshot() {
        let epoch = 3u64 << 32;
        let snapshot = Snapshot::before(epoch + 100);
        assert_eq!(snapshot.widen(99), epoch + 99);
        assert_eq!(snapshot.widen(150), epoch + 150);
        // An id just below the epoch boundary belongs to the previous epoch.
        assert_eq!(snapshot.widen(u32::MAX), epoch - 1);
        assert_eq!(Snapshot::before(700).widen(690), 690);
    }
}
