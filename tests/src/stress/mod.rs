//! A model-based stress test of the client (the fsx idea): a seeded random
//! mix of reads, writes, trims, zeroes, flushes, caches and block status
//! queries at random offsets and lengths, with 1 to 256 commands in flight
//! and completions taken in any order, checked against an in-memory model of
//! the export.
//!
//! * [`ops`]: the operations and their seeded generator, which respects the
//!   server's size, block sizes and advertised commands and flags.
//! * [`model`]: what the export must hold; every read is compared with it
//!   byte for byte, and every range block status reports as zero must be
//!   zero in it.
//! * [`driver`]: the blocking adapter's aio calls and the mio adapter's poll
//!   loop, behind one small trait.
//!
//! NBD orders nothing between commands in flight, so the runner never has a
//! command in flight that overlaps one changing data; with that, the model is
//! exact. Trimmed bytes are unknown (not checked until rewritten) unless the
//! server promises they read back as zeroes.
//!
//! Two adapter traps the runner keeps clear of: it never waits on the
//! blocking client without a command in flight (a `poll(None)` there would
//! wait for ever) and always with a finite timeout; and it checks the
//! connection's own state after every mio wakeup rather than relying on
//! `handle_event` to report a dead connection.
//!
//! Settings come from the environment ([`Settings::from_env`]):
//! `NBD_STRESS_OPS` (operations per configuration) and `NBD_STRESS_SEED`
//! (replay one seed; otherwise each run picks a new seed and prints it). A
//! failure panics with the seed, the configuration, the operation's index
//! and the command line that replays it.

pub mod driver;
pub mod model;
pub mod ops;
mod runner;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nbd_proto::Errno;

pub use driver::{Blocking, Driver, Mio};
pub use ops::{Kind, Limits};

/// Operations per configuration when `NBD_STRESS_OPS` is not set: enough to
/// reach every depth and kind, small enough for CI.
pub const DEFAULT_OPS: u64 = 3000;

/// Ranges of commands in flight (inclusive) that [`Summary::depths`] counts.
pub const DEPTH_BUCKETS: [(usize, usize); 4] = [(1, 1), (2, 8), (9, 64), (65, 256)];

/// What to stress: the test's name, the server, and what the server
/// promises or is set up to do.
#[derive(Debug, Clone)]
pub struct Target {
    /// The test function's name, for the replay command.
    pub test: String,
    /// The server, for messages (`"nbdkit memory"`).
    pub server: String,
    /// Where to connect.
    pub uri: String,
    /// Whether the server promises that trimmed bytes read back as zeroes.
    pub trim_reads_zero: bool,
    /// The error the server injects into some commands on purpose (nbdkit's
    /// error filter), if any: such failures are expected, counted, and leave
    /// a failed command's range unknown.
    pub injected_error: Option<Errno>,
}

impl Target {
    /// The test `test` against `server` at `uri`, promising nothing about
    /// trims and injecting no errors.
    pub fn new(test: &str, server: &str, uri: &str) -> Self {
        Target {
            test: test.to_owned(),
            server: server.to_owned(),
            uri: uri.to_owned(),
            trim_reads_zero: false,
            injected_error: None,
        }
    }

    /// The server promises that trimmed bytes read back as zeroes.
    pub fn trim_reads_zero(mut self) -> Self {
        self.trim_reads_zero = true;
        self
    }

    /// The server fails some commands with `errno` on purpose.
    pub fn injected_error(mut self, errno: Errno) -> Self {
        self.injected_error = Some(errno);
        self
    }
}

/// One stress run: which test, which server, how long, which seed.
#[derive(Debug, Clone)]
pub struct Run {
    /// The test function's name, for the replay command.
    pub test: String,
    /// The server, for messages (`"nbdkit memory"`).
    pub server: String,
    /// Where to connect.
    pub uri: String,
    /// Whether the server promises that trimmed bytes read back as zeroes.
    pub trim_reads_zero: bool,
    /// The error the server injects on purpose, if any.
    pub injected_error: Option<Errno>,
    /// Operations to run (the final read-back sweep comes on top).
    pub ops: u64,
    /// The generator's seed.
    pub seed: u64,
}

impl Run {
    /// `target` with the operation count and seed of `settings`.
    pub fn new(target: Target, settings: Settings) -> Self {
        let Target {
            test,
            server,
            uri,
            trim_reads_zero,
            injected_error,
        } = target;
        Run {
            test,
            server,
            uri,
            trim_reads_zero,
            injected_error,
            ops: settings.ops,
            seed: settings.seed(),
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Operations issued, checked and passed.
    pub operations: u64,
    /// Reads of the final sweep over the whole export.
    pub sweep_reads: u64,
    /// Operations per kind.
    pub tally: BTreeMap<Kind, u64>,
    /// Operations that failed with the injected error, as expected.
    pub injected_failures: u64,
    /// The most commands in flight at once.
    pub max_depth: usize,
    /// How many operations found a number of commands in flight (themselves
    /// included) in each of [`DEPTH_BUCKETS`] once issued.
    pub depths: [u64; DEPTH_BUCKETS.len()],
    /// Bytes of the export the model knew at the end (the sweep checked them).
    pub known_bytes: u64,
    /// The server's limits the generator kept to.
    pub limits: Limits,
    /// Whether replies were structured (else simple).
    pub structured_replies: bool,
    /// Whether requests and replies used extended (64-bit) headers.
    pub extended_headers: bool,
    /// Wall time of the run (reported, never asserted on).
    pub elapsed: Duration,
}

/// What a run whose server was killed halfway did.
#[derive(Debug, Clone)]
pub struct Killed {
    /// Commands issued in all.
    pub issued: u64,
    /// The operation before which the server was killed.
    pub killed_at: u64,
    /// Commands in flight when it was killed.
    pub in_flight_at_kill: usize,
    /// The operation the client refused.
    pub refused_at: u64,
    /// Why it refused it.
    pub refusal: String,
    /// Commands that failed because the server died (each exactly once).
    pub lost: u64,
    /// What the final disconnect returned.
    pub disconnect: Result<(), String>,
    /// Wall time of the run (reported, never asserted on).
    pub elapsed: Duration,
}

/// `NBD_STRESS_OPS` and `NBD_STRESS_SEED`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Operations per configuration.
    pub ops: u64,
    /// The seed to replay, if one was given.
    pub seed: Option<u64>,
}

impl Settings {
    /// Reads the environment; a malformed value is a test failure, not a
    /// silent default.
    pub fn from_env() -> Self {
        let number = |name: &str| {
            std::env::var(name).ok().map(|text| {
                let text = text.trim().replace('_', "");
                text.parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={text:?} is not a number: {e}"))
            })
        };
        Settings {
            ops: number("NBD_STRESS_OPS").unwrap_or(DEFAULT_OPS),
            seed: number("NBD_STRESS_SEED"),
        }
    }

    /// The seed to use: the one given, or a fresh one from the clock.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("the clock is after 1970");
            ops::mix_seed(now.as_nanos() as u64 ^ u64::from(std::process::id()))
        })
    }
}

/// Like [`stress`], but `kill` kills the server halfway through the
/// operations; the run then goes on until the client refuses a command.
/// Checks that nothing hangs or panics, every command completes exactly
/// once, and what completed before the death was right.
pub fn stress_killed<D: Driver>(target: Target, kill: impl FnOnce()) -> Killed {
    let run = Run::new(target, Settings::from_env());
    eprintln!(
        "stress {}: {} adapter, {}, server killed from operation {} of {}, seed {} \
         (replay: NBD_STRESS_SEED={} NBD_STRESS_OPS={})",
        run.test,
        D::NAME,
        run.server,
        run.ops / 2,
        run.ops,
        run.seed,
        run.seed,
        run.ops
    );
    let killed = runner::run_killed::<D>(&run, run.ops / 2, kill);
    eprintln!("stress {}: {killed:?}", run.test);
    killed
}

/// Like [`stress`], with the client reconnecting while `restart` kills the
/// server and starts it again (same socket, same data) at a third and at two
/// thirds of the operations. Every operation must pass as if nothing
/// happened; returns the summary and the reconnects the client reported.
pub fn stress_restarted<D: Driver>(target: Target, restart: impl FnMut(usize)) -> (Summary, usize) {
    let run = Run::new(target, Settings::from_env());
    eprintln!(
        "stress {}: {} adapter, {}, {} operations, server restarted twice, seed {} \
         (replay: NBD_STRESS_SEED={} NBD_STRESS_OPS={})",
        run.test,
        D::NAME,
        run.server,
        run.ops,
        run.seed,
        run.seed,
        run.ops
    );
    let points = [run.ops / 3, run.ops * 2 / 3];
    let (summary, reconnects) = runner::run_restarted::<D>(&run, &points, restart);
    eprintln!(
        "stress {}: {} operations passed (+{} sweep reads) in {:.1?} across {reconnects} \
         reconnects; per kind {:?}; at most {} in flight; {} of {} bytes known at the end",
        run.test,
        summary.operations,
        summary.sweep_reads,
        summary.elapsed,
        summary.tally,
        summary.max_depth,
        summary.known_bytes,
        summary.limits.size,
    );
    (summary, reconnects)
}

/// Runs the stress test named `test` against `uri` through adapter `D`,
/// with the operation count and seed from the environment; prints the seed
/// first (so a hang killed from outside can still be replayed) and a summary
/// last. Panics on the first failure.
pub fn stress<D: Driver>(target: Target) -> Summary {
    let run = Run::new(target, Settings::from_env());
    let (test, server) = (&run.test, &run.server);
    eprintln!(
        "stress {test}: {} adapter, {server}, {} operations, seed {} \
         (replay: NBD_STRESS_SEED={} NBD_STRESS_OPS={})",
        D::NAME,
        run.ops,
        run.seed,
        run.seed,
        run.ops
    );
    let summary = runner::run::<D>(&run);
    eprintln!(
        "stress {test}: {} operations passed (+{} sweep reads) in {:.1?}; per kind {:?}; \
         {} failed with the injected error; \
         at most {} in flight, operations by depth {:?}: {:?}; {} of {} bytes known at the end; \
         structured replies {}, extended headers {}; limits {:?}",
        summary.operations,
        summary.sweep_reads,
        summary.elapsed,
        summary.tally,
        summary.injected_failures,
        summary.max_depth,
        DEPTH_BUCKETS,
        summary.depths,
        summary.known_bytes,
        summary.limits.size,
        summary.structured_replies,
        summary.extended_headers,
        summary.limits,
    );
    summary
}

/// Runs [`stress`] and checks that the run did what it claims: every
/// operation passed, and with enough of them, reads and writes (and block
/// status and injected failures, where the server has them) were exercised
/// with more than one command in flight.
pub fn stress_checked<D: Driver>(target: Target) -> Summary {
    let test = target.test.clone();
    let injects = target.injected_error.is_some();
    let summary = stress::<D>(target);
    let ops = Settings::from_env().ops;
    assert_eq!(summary.operations, ops, "{test}: operations run");
    assert!(summary.sweep_reads > 0, "{test}: the export was read back");
    if ops >= 1000 {
        let mut kinds = vec![Kind::Read, Kind::Write];
        if summary.limits.block_status {
            kinds.push(Kind::BlockStatus);
        }
        for kind in kinds {
            assert!(
                summary.tally.get(&kind).copied().unwrap_or(0) > 0,
                "{test}: no {kind:?} in {ops} operations: {:?}",
                summary.tally
            );
        }
        assert!(
            summary.max_depth > 1,
            "{test}: never more than one in flight"
        );
        assert_eq!(
            summary.injected_failures > 0,
            injects,
            "{test}: injected failures seen"
        );
    }
    summary
}
