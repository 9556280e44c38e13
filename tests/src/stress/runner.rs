//! The stress loop: issue generated operations at the chosen depth, never
//! two conflicting ones at once, take completions in whatever order they
//! come, and check each against the model.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nbd_proto::{BlockStatus, CmdFlags, Completion, Cookie, Errno};

use super::driver::{Driver, STALL_LIMIT};
use super::model::Model;
use super::ops::{Generator, Kind, Limits, Op, BASE_ALLOCATION};
use super::{Killed, Run, Summary, DEPTH_BUCKETS};
use crate::testkit::Rng;

/// Client memory (read buffers and write payloads) allowed in flight at once.
const MAX_BUFFERED: u64 = 64 << 20;

/// `base:allocation`'s "reads as zeroes" bit.
const STATE_ZERO: u64 = 2;

/// A command on the wire.
struct Pending {
    index: u64,
    cookie: Cookie,
    op: Op,
}

/// One connection under test, the model of its export, and what is in flight.
struct Stress<'a, D: Driver> {
    run: &'a Run,
    client: D,
    model: Model,
    pending: Vec<Pending>,
    buffered: u64,
    /// Picks which finished command to take first (timing-dependent, so kept
    /// apart from the generator's stream).
    order: Rng,
    tally: BTreeMap<Kind, u64>,
    injected_failures: u64,
    max_depth_seen: usize,
    /// Operations by how many commands were in flight once each was issued.
    depths: [u64; DEPTH_BUCKETS.len()],
    /// The index of the operation issued last, for failures not tied to one.
    latest: u64,
    /// The server was killed: failures are expected from now on.
    dying: bool,
    /// Commands that failed after the server was killed.
    lost: u64,
}

/// The name of the test file running now (`stress`, `tokio_stress`, ...), read
/// off the test binary, whose name is the file's with a hash appended.
fn test_binary() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .unwrap_or("stress");
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem.to_owned(),
    }
}

impl<D: Driver> Stress<'_, D> {
    /// Panics with everything needed to find and replay the failure.
    fn fail(&self, index: u64, what: &str) -> ! {
        let run = self.run;
        panic!(
            "stress {test}: {what}\n  at operation {index} of seed {seed} ({adapter} adapter, {server}); \
             {depth} in flight\n  replay: NBD_STRESS_SEED={seed} NBD_STRESS_OPS={ops} \
             cargo test -p nbd-tests --test {binary} {test} -- --exact --include-ignored",
            binary = test_binary(),
            test = run.test,
            seed = run.seed,
            adapter = D::NAME,
            server = run.server,
            depth = self.pending.len(),
            // Enough operations to issue everything that was in flight.
            ops = index.max(self.latest).saturating_add(1).min(run.ops),
        )
    }

    /// Waits until `op` may be issued: below the depth, within the memory
    /// budget, and overlapping no command it conflicts with.
    fn make_room(&mut self, index: u64, op: &Op, depth: usize) {
        loop {
            let full = self.pending.len() >= depth
                || (!self.pending.is_empty() && self.buffered + op.buffer_bytes() > MAX_BUFFERED);
            let blocked = self.pending.iter().any(|p| p.op.conflicts_with(op));
            if !full && !blocked {
                return;
            }
            self.complete_some(index);
        }
    }

    fn issue(&mut self, index: u64, op: Op) {
        if let Err(e) = self.try_issue(index, op) {
            self.fail(index, &e);
        }
    }

    /// Issues `op`, or says why the client refused it.
    fn try_issue(&mut self, index: u64, op: Op) -> Result<(), String> {
        let cookie = self
            .client
            .issue(&op)
            .map_err(|e| format!("{op:?} refused when issued: {e}"))?;
        if self.pending.iter().any(|p| p.cookie == cookie) {
            self.fail(index, &format!("cookie {cookie:?} handed out twice"));
        }
        self.buffered += op.buffer_bytes();
        *self.tally.entry(op.kind).or_default() += 1;
        self.pending.push(Pending { index, cookie, op });
        self.latest = index;
        let depth = self.pending.len();
        self.max_depth_seen = self.max_depth_seen.max(depth);
        let bucket = DEPTH_BUCKETS
            .iter()
            .position(|(_, most)| depth <= *most)
            .expect("at most 256 in flight");
        self.depths[bucket] += 1;
        Ok(())
    }

    /// Sends what is queued, then takes one to four completions (fewer if
    /// fewer have arrived), waiting for the first if none has. Only called
    /// with commands in flight. Taking only a few keeps the queue deep: the
    /// rest wait in the adapter.
    fn complete_some(&mut self, index: u64) {
        assert!(!self.pending.is_empty(), "nothing in flight to wait for");
        self.send(index);
        let started = Instant::now();
        let mut drive_errors = Vec::new();
        let wanted = 1 + self.order.below(4);
        loop {
            let mut took = 0;
            while took < wanted && !self.pending.is_empty() {
                let preferred = match self.order.below(2) {
                    0 => {
                        let at = self.order.below(self.pending.len() as u64) as usize;
                        Some(self.pending[at].cookie)
                    }
                    _ => None,
                };
                let Some(done) = self.client.next_completion(preferred) else {
                    break;
                };
                self.finish(done);
                took += 1;
            }
            if took > 0 {
                return;
            }
            if self.client.is_over() {
                let error = self.client.connection().error().map(ToString::to_string);
                self.fail(
                    index,
                    &format!(
                        "the connection ended ({error:?}) with {} commands never completed, \
                         oldest: operation {} {:?}; drive errors {drive_errors:?}",
                        self.pending.len(),
                        self.pending[0].index,
                        self.pending[0].op
                    ),
                );
            }
            if started.elapsed() >= STALL_LIMIT {
                let oldest = &self.pending[0];
                let conn = self.client.connection();
                self.fail(
                    index,
                    &format!(
                        "no completion within {STALL_LIMIT:?}: {} commands in flight, oldest \
                         operation {} {:?}; the connection counts {} in flight, wants_write {}; \
                         drive errors {drive_errors:?}",
                        self.pending.len(),
                        oldest.index,
                        oldest.op,
                        conn.in_flight(),
                        conn.wants_write(),
                    ),
                );
            }
            if let Err(e) = self.client.wait(Duration::from_millis(500)) {
                drive_errors.push(e);
            }
        }
    }

    /// Checks one completion and applies it to the model.
    fn finish(&mut self, done: Completion) {
        let Some(at) = self.pending.iter().position(|p| p.cookie == done.cookie) else {
            self.fail(
                self.latest,
                &format!(
                    "a completion for {:?}, which is not in flight (never issued, or completed twice)",
                    done.cookie
                ),
            );
        };
        let Pending { index, op, .. } = self.pending.swap_remove(at);
        self.buffered -= op.buffer_bytes();
        match done.result {
            Ok(()) => {}
            Err(e) if op.flags.contains(CmdFlags::FAST_ZERO) && e.errno() == Errno::NotSup => {
                // The server may refuse a fast zero; what it left is unknown.
                self.model.forget(op.offset, op.len);
                return;
            }
            Err(nbd_proto::Error::Server { errno, .. })
                if Some(errno) == self.run.injected_error =>
            {
                // Failed on purpose. A failed change may have half happened;
                // a failed read has nothing to check (its buffer is unspecified).
                self.injected_failures += 1;
                if op.kind.changes_data() {
                    self.model.forget(op.offset, op.len);
                }
                return;
            }
            Err(_) if self.dying => {
                // In flight when the server died: failed, exactly once.
                self.lost += 1;
                if op.kind.changes_data() {
                    self.model.forget(op.offset, op.len);
                }
                return;
            }
            Err(e) => self.fail(index, &format!("{op:?} failed: {e}")),
        }
        match op.kind {
            Kind::Read => {
                let Some(buf) = done.buffer else {
                    self.fail(index, &format!("{op:?} completed without its buffer"));
                };
                if buf.len() as u64 != op.len {
                    self.fail(
                        index,
                        &format!("{op:?} handed back a buffer of {} bytes", buf.len()),
                    );
                }
                if let Err(m) = self.model.check_read(op.offset, &buf) {
                    let again = self.reread(m.offset);
                    self.fail(index, &format!("{op:?} read wrong data: {m}; {again}"));
                }
            }
            Kind::Write => {
                let data = op.data.as_ref().expect("a write carries its payload");
                self.model.write(op.offset, data);
            }
            Kind::Zero => self.model.zero(op.offset, op.len),
            Kind::Trim if self.run.trim_reads_zero => self.model.zero(op.offset, op.len),
            Kind::Trim => self.model.forget(op.offset, op.len),
            Kind::BlockStatus => {
                let reports = self.client.take_block_status(done.cookie);
                if let Err(e) = self.check_block_status(&op, &reports) {
                    self.fail(index, &format!("{op:?}: {e}; reports {reports:?}"));
                }
            }
            Kind::Flush | Kind::Cache => {}
        }
    }

    /// After a wrong read: once everything in flight has finished, reads
    /// the 4 KiB around `offset` again, plainly and (if allowed) with `DF`, and says
    /// whether the server now gives what the model holds. That tells a
    /// client that misplaced bytes from a server that lost them.
    fn reread(&mut self, offset: u64) -> String {
        // What is still in flight completes and is checked first (and may
        // fail on its own account).
        self.drain(self.latest);
        let start = offset / 4096 * 4096;
        let len = 4096.min(self.model.size() - start);
        let mut verdicts = Vec::new();
        let conn = self.client.connection();
        let df = conn.can_df().unwrap_or(false) && conn.structured_replies_negotiated();
        let mut variants = vec![CmdFlags::empty()];
        if df {
            variants.push(CmdFlags::DF);
        }
        for flags in variants {
            let op = Op {
                kind: Kind::Read,
                offset: start,
                len,
                flags,
                data: None,
            };
            let verdict = match self.read_alone(&op) {
                Ok(buf) => match self.model.check_read(start, &buf) {
                    Ok(()) => "matches the model".to_owned(),
                    Err(m) => format!("still differs: {m}"),
                },
                Err(e) => format!("failed: {e}"),
            };
            verdicts.push(format!("{op:?} alone {verdict}"));
        }
        format!("re-read: {}", verdicts.join("; "))
    }

    /// Issues `op` (a read) with nothing else in flight and waits for it.
    fn read_alone(&mut self, op: &Op) -> Result<bytes::BytesMut, String> {
        let cookie = self.client.issue(op)?;
        self.client.send()?;
        let started = Instant::now();
        loop {
            if let Some(done) = self.client.next_completion(Some(cookie)) {
                if done.cookie != cookie {
                    return Err(format!("a completion for {:?} came instead", done.cookie));
                }
                done.result.map_err(|e| e.to_string())?;
                return done
                    .buffer
                    .ok_or_else(|| "no buffer handed back".to_owned());
            }
            if started.elapsed() >= STALL_LIMIT {
                return Err(format!("no reply within {STALL_LIMIT:?}"));
            }
            self.client.wait(Duration::from_millis(500))?;
        }
    }

    /// Puts queued requests on the wire; a failure is one unless the
    /// server was killed.
    fn send(&mut self, index: u64) {
        if let Err(e) = self.client.send() {
            if !self.dying {
                self.fail(index, &format!("sending failed: {e}"));
            }
        }
    }

    /// Issues operations `from..to` of `gen`, each once there is room for
    /// it. Stops early, returning the refusal, if the client refuses one
    /// after the server was killed.
    fn issue_range(&mut self, gen: &mut Generator, from: u64, to: u64) -> Option<(u64, String)> {
        for index in from..to {
            let depth = gen.depth();
            let op = gen.next_op();
            self.make_room(index, &op, depth);
            match self.try_issue(index, op) {
                Ok(()) => {}
                Err(e) if self.dying => return Some((index, e)),
                Err(e) => self.fail(index, &e),
            }
            // Sometimes let requests pile up before they go out, sometimes not.
            if self.pending.len() >= depth || self.order.below(4) == 0 {
                self.send(index);
            }
        }
        None
    }

    /// Waits for every command in flight.
    fn drain(&mut self, index: u64) {
        while !self.pending.is_empty() {
            self.complete_some(index);
        }
    }

    /// Every range the server reports as reading zeroes must be zero in the
    /// model wherever the model knows the bytes.
    fn check_block_status(&self, op: &Op, reports: &[BlockStatus]) -> Result<(), String> {
        let mut base = reports.iter().filter(|r| r.context == BASE_ALLOCATION);
        let (Some(report), None) = (base.next(), base.next()) else {
            return Err(format!(
                "expected one {BASE_ALLOCATION} report, got {}",
                reports
                    .iter()
                    .filter(|r| r.context == BASE_ALLOCATION)
                    .count()
            ));
        };
        if report.extents.is_empty() {
            return Err("a report without extents".into());
        }
        // The protocol: with REQ_ONE, exactly one extent, no longer than
        // the request; without, only the last extent may reach past it.
        if op.flags.contains(CmdFlags::REQ_ONE)
            && (report.extents.len() != 1 || report.extents[0].length > op.len)
        {
            return Err("REQ_ONE answered with other than one extent within the request".into());
        }
        let end = op.offset + op.len;
        let mut at = op.offset;
        for extent in &report.extents {
            if extent.length == 0 {
                return Err("an extent of length 0".into());
            }
            if at >= end {
                // Only the last extent may reach past the request, and
                // nothing beyond the request is checked: it may be changing.
                return Err(format!("an extent starting at {at}, past the request"));
            }
            let length = extent.length.min(end - at);
            if extent.flags & STATE_ZERO != 0 {
                if let Err(m) = self.model.check_zero(at, length) {
                    return Err(format!(
                        "{at}+{length} reported as reading zeroes (flags {:#x}), but the {m}",
                        extent.flags
                    ));
                }
            }
            at += length;
        }
        Ok(())
    }
}

/// Connects for `run` and sets up the model of the export.
fn connect<D: Driver>(run: &Run) -> Stress<'_, D> {
    let config = nbd_proto::Config::default().meta_context(BASE_ALLOCATION);
    let client = D::connect(&run.uri, config).unwrap_or_else(|e| {
        panic!(
            "stress {}: {} cannot connect to {} ({}): {e}",
            run.test,
            D::NAME,
            run.uri,
            run.server
        )
    });
    let limits = Limits::of(client.connection())
        .unwrap_or_else(|e| panic!("stress {}: export information: {e}", run.test));
    Stress {
        run,
        client,
        model: Model::zeroed(limits.size),
        pending: Vec::new(),
        buffered: 0,
        order: Rng::new(super::ops::mix_seed(run.seed ^ 0x5eed)),
        tally: BTreeMap::new(),
        injected_failures: 0,
        max_depth_seen: 0,
        depths: [0; DEPTH_BUCKETS.len()],
        latest: 0,
        dying: false,
        lost: 0,
    }
}

/// Runs `run` through adapter `D`; panics on the first failure.
pub fn run<D: Driver>(run: &Run) -> Summary {
    run_restarted::<D>(run, &[], |_| {}).0
}

/// Like [`run`], with automatic reconnect on: before each operation index of
/// `restart_at` (ascending), once a good number of commands are in flight,
/// `restart(i)` kills the server and starts it again on the same socket
/// with the same data. Every operation must still pass and the sweep must
/// read back every byte the model knows: nothing lost, nothing doubled.
/// Returns the summary and how many reconnects the client reported.
pub fn run_restarted<D: Driver>(
    run: &Run,
    restart_at: &[u64],
    mut restart: impl FnMut(usize),
) -> (Summary, usize) {
    let started = Instant::now();
    let mut stress = connect::<D>(run);
    if !restart_at.is_empty() {
        let mut policy = nbd_io::ReconnectPolicy::new(30);
        policy.first_delay = Duration::from_millis(50);
        policy.max_delay = Duration::from_millis(500);
        // Flushes are 3% of the operations and a write may cover the whole
        // export, so the default budget (64 MiB) is now and then exceeded
        // between two flushes, and the journal then rightly fails the next
        // flush (`WritesLost`: tested on its own). Here every acknowledged
        // write must survive the restarts, so the budget must never run out.
        policy.replay_budget = 1 << 30;
        if let Err(e) = stress.client.set_reconnect(policy) {
            panic!("stress {}: set_reconnect: {e}", run.test);
        }
    }
    let conn = stress.client.connection();
    let structured_replies = conn.structured_replies_negotiated();
    let extended_headers = conn.extended_headers_negotiated();
    let limits = Limits::of(conn).expect("read once already");
    let mut gen = Generator::new(run.seed, limits.clone());
    let mut at = 0;
    for (i, &point) in restart_at.iter().enumerate() {
        let point = point.clamp(at, run.ops);
        stress.issue_range(&mut gen, at, point);
        at = point;
        // Restart with commands in flight, if the depth allows it soon.
        let give_up = point.saturating_add(run.ops / 8).min(run.ops);
        while stress.pending.len() < 16 && at < give_up {
            stress.issue_range(&mut gen, at, at + 1);
            at += 1;
        }
        stress.send(at.saturating_sub(1));
        restart(i);
    }
    stress.issue_range(&mut gen, at, run.ops);
    stress.drain(run.ops);
    let reconnects = stress.client.take_reconnects();
    // Read the whole export back: every byte the model knows must be there.
    let sweep = gen.sweep();
    let swept = sweep.len() as u64;
    for (i, op) in sweep.into_iter().enumerate() {
        let index = run.ops + i as u64;
        stress.make_room(index, &op, 8);
        stress.issue(index, op);
    }
    stress.drain(run.ops + swept);
    let known = stress.model.known_bytes(0, stress.model.size());
    let Stress {
        client,
        tally,
        injected_failures,
        max_depth_seen,
        depths,
        ..
    } = stress;
    if let Err(e) = client.finish() {
        panic!(
            "stress {}: clean disconnect after {} operations of seed {} failed: {e}",
            run.test, run.ops, run.seed
        );
    }
    let summary = Summary {
        operations: run.ops,
        sweep_reads: swept,
        tally,
        injected_failures,
        max_depth: max_depth_seen,
        depths,
        known_bytes: known,
        limits,
        structured_replies,
        extended_headers,
        elapsed: started.elapsed(),
    };
    (summary, reconnects)
}

/// Runs `run` through adapter `D`, calling `kill` (which kills the server)
/// at operation `kill_at` or a little later, once 16 commands are in flight, then going on until the client refuses a
/// command. Every command must complete exactly once (those the server
/// answered before it died still checked against the model), the client
/// must refuse new commands instead of hanging, and the disconnect must
/// return. Panics otherwise.
pub fn run_killed<D: Driver>(run: &Run, kill_at: u64, kill: impl FnOnce()) -> Killed {
    let started = Instant::now();
    let mut stress = connect::<D>(run);
    let limits = Limits::of(stress.client.connection()).expect("read once already");
    let mut gen = Generator::new(run.seed, limits);
    stress.issue_range(&mut gen, 0, kill_at);
    // Kill it with a good number of commands in flight, if the depth
    // allows within a quarter of the run.
    let mut at = kill_at;
    while stress.pending.len() < 16 && at < kill_at + run.ops / 4 {
        stress.issue_range(&mut gen, at, at + 1);
        at += 1;
    }
    let in_flight_at_kill = stress.pending.len();
    kill();
    stress.dying = true;
    let refused = stress.issue_range(&mut gen, at, run.ops);
    let Some((refused_at, refusal)) = refused else {
        stress.fail(
            run.ops,
            &format!(
                "the client still accepted commands {} operations after the server was killed",
                run.ops - at
            ),
        );
    };
    stress.drain(refused_at);
    let lost = stress.lost;
    let issued = stress.tally.values().sum();
    let disconnecting = Instant::now();
    let disconnect = stress.client.finish();
    if disconnecting.elapsed() >= STALL_LIMIT {
        panic!(
            "stress {}: the disconnect from a dead server took {:?} ({disconnect:?})",
            run.test,
            disconnecting.elapsed()
        );
    }
    Killed {
        issued,
        killed_at: at,
        in_flight_at_kill,
        refused_at,
        refusal,
        lost,
        disconnect,
        elapsed: started.elapsed(),
    }
}
