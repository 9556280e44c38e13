//! Reading an export's extents for one meta context, and describing them as
//! nbdinfo does.

use nbd_blocking::{Client, Error};
use nbd_proto::CmdFlags;

/// The context `--map` and `nbd copy` use by default.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u64 = 2;

/// One run of bytes with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Export offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Status flags in the context.
    pub flags: u64,
}

/// Largest block status request: bounded to what the headers can carry.
fn query_span(client: &Client) -> u64 {
    if client.connection().extended_headers_negotiated() {
        1 << 40
    } else {
        // Keep within 32 bits and aligned to any block size up to 64 KiB.
        (1 << 32) - (1 << 16)
    }
}

/// The runs of `context` from `offset` on, covering at least one byte and at
/// most `limit` bytes, clamped to the request: one block status query.
pub fn query(
    client: &mut Client,
    context: &str,
    offset: u64,
    limit: u64,
) -> Result<Vec<Run>, Error> {
    let mut each = query_each(client, &[context], offset, limit)?;
    Ok(each.pop().unwrap_or_default())
}

/// The runs of each of `contexts` (all negotiated) from `offset` on, each
/// list covering at least one byte and at most `limit` bytes, clamped to the
/// request: one block status query answers them all.
pub fn query_each(
    client: &mut Client,
    contexts: &[&str],
    offset: u64,
    limit: u64,
) -> Result<Vec<Vec<Run>>, Error> {
    let count = limit.min(query_span(client));
    let mut reports = client.block_status(count, offset, CmdFlags::empty())?;
    let end = offset + count;
    contexts
        .iter()
        .map(|context| {
            let at = reports
                .iter()
                .position(|r| r.context == *context)
                .ok_or_else(|| {
                    nbd_proto::Error::Protocol(format!(
                        "block status reply without context {context:?}"
                    ))
                })?;
            let report = reports.swap_remove(at);
            let mut runs = Vec::with_capacity(report.extents.len());
            let mut at = offset;
            for e in report.extents {
                if at >= end {
                    break;
                }
                let length = e.length.min(end - at);
                if length == 0 {
                    continue;
                }
                runs.push(Run {
                    offset: at,
                    length,
                    flags: e.flags,
                });
                at += length;
            }
            Ok(runs)
        })
        .collect()
}

/// Every run of `context` over the whole export, adjacent runs of one status merged.
pub fn map(client: &mut Client, context: &str) -> Result<Vec<Run>, Error> {
    let size = client.size()?;
    let mut runs: Vec<Run> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let got = query(client, context, offset, size - offset)?;
        for run in got {
            offset = run.offset + run.length;
            match runs.last_mut() {
                Some(last)
                    if last.flags == run.flags && last.offset + last.length == run.offset =>
                {
                    last.length += run.length;
                }
                _ => runs.push(run),
            }
        }
    }
    Ok(runs)
}

/// What nbdinfo prints for a status in a known context; `None` for unknown ones.
pub fn describe(context: &str, flags: u64) -> Option<String> {
    if context == BASE_ALLOCATION {
        return match flags {
            0 => Some("data".into()),
            1 => Some("hole".into()),
            2 => Some("zero".into()),
            3 => Some("hole,zero".into()),
            _ => None,
        };
    }
    if context.starts_with("qemu:dirty-bitmap:") {
        return match flags {
            0 => Some("clean".into()),
            1 => Some("dirty".into()),
            _ => None,
        };
    }
    if context == "qemu:allocation-depth" {
        return Some(match flags {
            0 => "absent".into(),
            1 => "local".into(),
            n => format!("backing depth {n}"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_match_nbdinfo() {
        assert_eq!(describe(BASE_ALLOCATION, 3).as_deref(), Some("hole,zero"));
        assert_eq!(describe(BASE_ALLOCATION, 0).as_deref(), Some("data"));
        assert_eq!(describe(BASE_ALLOCATION, 8), None);
        assert_eq!(
            describe("qemu:dirty-bitmap:bm0", 1).as_deref(),
            Some("dirty")
        );
        assert_eq!(
            describe("qemu:allocation-depth", 2).as_deref(),
            Some("backing depth 2")
        );
        assert_eq!(
            describe("qemu:allocation-depth", 0).as_deref(),
            Some("absent")
        );
        assert_eq!(describe("x-other:thing", 0), None);
    }
}
