//! The end of a copy: the destination flushed if asked (once, after every
//! worker has finished), every connection closed cleanly, a stream's file
//! cut to the stream's length, and the workers' byte counts summed.

use nbd_blocking::Error;
use nbd_proto::CmdFlags;

use super::side::{self, Side};
use super::worker::{Destination, Done, Source, Stats};

/// Flushes the destination if asked, closes every connection cleanly, and
/// sums what the workers moved.
pub fn finish(done: Vec<Done>, flush: bool, size: Option<u64>) -> Result<Stats, Error> {
    let mut stats = Stats::default();
    let mut flushed = false;
    for worker in done {
        stats += worker.stats;
        if let Source::Nbd(client) = worker.src {
            client
                .shutdown()
                .map_err(|e| side::named(Side::Source, e))?;
        }
        match worker.dst {
            Destination::Nbd { mut client, .. } => {
                // Every worker has finished, so one flush covers all the
                // connections' writes (the multi-conn promise).
                if flush && !flushed && client.connection().can_flush()? {
                    client.flush(CmdFlags::empty()).map_err(
                        |e| match crate::deadline::timed_out(&e) {
                            true => crate::deadline::explain(e, "destination", "the flush"),
                            false => side::named(Side::Destination, format!("flush: {e}")),
                        },
                    )?;
                    flushed = true;
                }
                client
                    .shutdown()
                    .map_err(|e| side::named(Side::Destination, e))?;
            }
            Destination::Local(file, _) => {
                if size.is_none() {
                    // A stream of unknown length: the file is as long as it was.
                    file.set_len(stats.read)
                        .map_err(|e| side::named(Side::Destination, e))?;
                }
                if flush && !flushed {
                    file.sync()
                        .map_err(|e| side::named(Side::Destination, format!("flush: {e}")))?;
                    flushed = true;
                }
            }
            Destination::Stream(mut out) => out
                .finish()
                .map_err(|e| side::named(Side::Destination, e))?,
            Destination::Null => {}
        }
    }
    Ok(stats)
}
