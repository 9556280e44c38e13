//! `-v` / `--verbose` and `LIBNBD_DEBUG=1`: the library's protocol trace on
//! standard error, one line per event, as libnbd's tools print theirs.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

/// Whether the trace was asked for: the flag, or `LIBNBD_DEBUG=1` (the
/// variable libnbd's users already set; any other value leaves it off, as
/// in libnbd).
pub fn wanted(flag: bool) -> bool {
    flag || std::env::var_os("LIBNBD_DEBUG").is_some_and(|v| v == "1")
}

/// Sends every `Debug` record to standard error from now on.
pub fn enable() {
    // Only fails if a logger is set already, which would then print instead.
    if log::set_logger(&STDERR).is_ok() {
        log::set_max_level(LevelFilter::Debug);
    }
}

struct Stderr;

static STDERR: Stderr = Stderr;

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::Level::Debug
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line, so lines from several threads never interleave;
        // a trace that cannot be written is not worth failing the command for.
        let line = format!("nbd: debug: {}: {}\n", record.target(), record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}
