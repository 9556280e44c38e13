//! Errors that say where a copy failed: which side, what it was doing, at
//! which offset, and why.

use std::fmt;
use std::io;

use nbd_blocking::Error;

/// One end of the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Where the bytes come from.
    Source,
    /// Where they go.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// `side: what at offset N failed: cause`.
pub fn failed(side: Side, what: &str, offset: u64, cause: impl fmt::Display) -> Error {
    Error::Io(io::Error::other(format!(
        "{side}: {what} at offset {offset} failed: {cause}"
    )))
}

/// `side: cause`, for failures that belong to no offset (connecting, flushing).
pub fn named(side: Side, cause: impl fmt::Display) -> Error {
    Error::Io(io::Error::other(format!("{side}: {cause}")))
}

/// A request's failed reply: as [`failed`], except that a `--timeout` that
/// passed is said the way `crate::deadline` says it, naming what was awaited.
pub fn reply_failed(side: Side, what: &str, offset: u64, cause: Error) -> Error {
    if !crate::deadline::timed_out(&cause) {
        return failed(side, what, offset, cause);
    }
    let awaited = match side {
        Side::Source => "replies to reads and extent queries",
        Side::Destination => "replies to writes",
    };
    crate::deadline::explain(cause, &side.to_string(), awaited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_side_offset_and_cause() {
        let e = failed(Side::Destination, "write", 4096, "Broken pipe");
        assert_eq!(
            e.to_string(),
            "destination: write at offset 4096 failed: Broken pipe"
        );
        assert_eq!(named(Side::Source, "gone").to_string(), "source: gone");
    }
}
