//! `nbd copy --retries N`: reconnect to a server that went away, up to N
//! attempts each time, and send the unfinished requests again (see
//! `nbd_blocking::Client::set_reconnect`).

use std::sync::OnceLock;

use nbd_blocking::{Client, Error, ReconnectPolicy};

/// The `--retries` option.
#[derive(Debug, Clone, clap::Args)]
pub struct RetriesArg {
    /// When a server closes the connection or stops answering (see
    /// --timeout), connect to it again, up to N attempts with a growing
    /// pause (0.1 s, doubling, at most 5 s), and send again every request
    /// not yet done. The export must be the same (size and features).
    /// Each reconnect is reported on standard error. Default 0: a lost
    /// connection fails the copy.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: u32,
}

static RETRIES: OnceLock<u32> = OnceLock::new();

/// Sets the attempts of this run (`--retries`); later calls change nothing.
pub fn set(arg: &RetriesArg) {
    let _ = RETRIES.set(arg.retries);
}

/// Whether `--retries` asked for reconnects.
pub fn enabled() -> bool {
    RETRIES.get().copied().unwrap_or(0) > 0
}

/// Turns reconnect on for `client` if `--retries` asked for it.
pub fn enable(client: &mut Client) -> Result<(), Error> {
    match RETRIES.get().copied().unwrap_or(0) {
        0 => Ok(()),
        attempts => client.set_reconnect(Some(ReconnectPolicy::new(attempts))),
    }
}

/// Tells the user, one line each on standard error, of the reconnects
/// `client` (the `side` of a copy) made since the last call.
pub fn report(side: &str, client: &mut Client) {
    for r in client.take_reconnects() {
        eprintln!(
            "nbd: {side}: connection lost ({}); reconnected on attempt {}, {} request(s) sent again",
            r.cause, r.attempt, r.resent
        );
    }
}
