//! The behavioural suite, mounted once under each adapter's harness module.
//!
//! Commands are issued with the adapter's own `aio_` calls on `h.client`;
//! only waiting goes through the harness, and every wait here is built on
//! its `step` and bounded by [`WAIT_LIMIT`]: a command that never completes,
//! completes twice, or a completion nobody asked for fails the test with a
//! message saying what was awaited.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Config, Cookie, Errno, Phase, Strict};
use nbd_tests::testkit::{
    assert_matches_nbdinfo, negotiated, pattern_at, pattern_bytes, Op, Rng, Workload,
};
use nbd_tests::{
    read_export, ImageFormat, NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder,
    ServerHandle,
};

use super::{Client, Harness, NAME};
use crate::{assert_errno, tool_version, Done, KIB, MIB, WAIT_LIMIT};

// ------------------------------------------------------------------ waiting

/// How long one `step` may wait before a loop looks at its deadline again.
const STEP: Duration = Duration::from_secs(1);

impl Harness {
    /// Whether the connection has ended (cleanly or not): no byte moves again.
    fn is_over(&self) -> bool {
        matches!(
            self.client.connection().phase(),
            Phase::Closed | Phase::Dead
        )
    }

    /// Sends what is queued and drives until every queued byte is on the
    /// socket, or the connection ended. Replies that arrive meanwhile wait in
    /// the client's completion queue. Errors seen here only go into the
    /// message of a timeout: one that ends the connection completes its
    /// commands with errors, which the callers check.
    fn send_all(&mut self) {
        let mut errors = Vec::new();
        if let Err(e) = self.send() {
            errors.push(e.to_string());
        }
        let deadline = Instant::now() + WAIT_LIMIT;
        while self.client.connection().wants_write() && !self.is_over() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{NAME}: requests still unsent after {WAIT_LIMIT:?}; errors: {errors:?}"
            );
            if let Err(e) = self.step(left.min(STEP)) {
                errors.push(e.to_string());
            }
        }
    }

    /// Drives until every command of `cookies` completed; returns them in
    /// completion order with their index in `cookies`. Panics if one
    /// completes twice, a cookie not in `cookies` completes, nothing is left
    /// in flight while some never completed, or [`WAIT_LIMIT`] passes.
    fn collect(&mut self, cookies: &[Cookie]) -> Vec<Done> {
        let index: HashMap<Cookie, usize> =
            cookies.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        assert_eq!(index.len(), cookies.len(), "{NAME}: duplicate cookies");
        self.send_all();
        let mut seen = vec![false; cookies.len()];
        let mut done = Vec::with_capacity(cookies.len());
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut drive_errors = Vec::new();
        loop {
            while let Some(c) = self.client.next_completion() {
                let i = *index.get(&c.cookie).unwrap_or_else(|| {
                    panic!("{NAME}: a completion of a cookie not awaited: {c:?}")
                });
                assert!(!seen[i], "{NAME}: command {i} completed twice");
                seen[i] = true;
                done.push(Done {
                    index: i,
                    result: c.result,
                    buffer: c.buffer,
                });
            }
            if done.len() == cookies.len() {
                return done;
            }
            let missing: Vec<usize> = (0..seen.len()).filter(|i| !seen[*i]).collect();
            let conn = self.client.connection();
            // A command leaves `in_flight` only by completing: with nothing in
            // flight, the missing ones are lost.
            assert!(
                self.client.in_flight() > 0,
                "{NAME}: nothing in flight (phase {:?}, error {:?}) but commands {missing:?} of {} never completed; drive errors: {drive_errors:?}",
                conn.phase(),
                conn.error(),
                cookies.len()
            );
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{NAME}: waited {WAIT_LIMIT:?} and commands {missing:?} of {} never completed (in flight {}, phase {:?}); drive errors: {drive_errors:?}",
                cookies.len(),
                self.client.in_flight(),
                conn.phase()
            );
            if let Err(e) = self.step(left.min(STEP)) {
                drive_errors.push(e.to_string());
            }
        }
    }

    /// Drives until `cookie` completed (see [`Harness::collect`]).
    fn wait_for(&mut self, cookie: Cookie) -> Done {
        let mut done = self.collect(&[cookie]);
        done.pop().expect("collect returns every cookie")
    }

    /// Issues one command with `issue` (an `aio_` call of the client) and
    /// waits for it: the call's refusal, or the command's result and buffer.
    fn run(
        &mut self,
        issue: impl FnOnce(&mut Client) -> nbd_io::Result<Cookie>,
    ) -> nbd_io::Result<Option<BytesMut>> {
        let cookie = issue(&mut self.client)?;
        let done = self.wait_for(cookie);
        done.result?;
        Ok(done.buffer)
    }

    /// Reads `len` bytes at `offset`, panicking on failure.
    fn read(&mut self, offset: u64, len: u64) -> Vec<u8> {
        self.run(|c| c.aio_pread(BytesMut::zeroed(len as usize), offset, CmdFlags::empty()))
            .unwrap_or_else(|e| panic!("{NAME}: pread of {len} at {offset}: {e}"))
            .expect("a read hands its buffer back")
            .to_vec()
    }

    /// Plain reads of `(offset, len)`, all in flight at once; results in
    /// completion order.
    fn read_batch(&mut self, reads: &[(u64, usize)]) -> Vec<Done> {
        let cookies: Vec<Cookie> = reads
            .iter()
            .map(|&(offset, len)| {
                let read = self
                    .client
                    .aio_pread(BytesMut::zeroed(len), offset, CmdFlags::empty());
                issued(read, &format!("pread of {len} at {offset}"))
            })
            .collect();
        self.collect(&cookies)
    }

    /// Disconnects cleanly: nothing is left in flight or untaken, then
    /// `aio_disconnect` and the loop until the server has closed.
    fn disconnect(mut self) {
        assert_eq!(self.client.in_flight(), 0, "{NAME}: disconnect in flight");
        if let Some(c) = self.client.next_completion() {
            panic!("{NAME}: a completion nobody took: {c:?}");
        }
        self.client
            .aio_disconnect()
            .unwrap_or_else(|e| panic!("{NAME}: aio_disconnect: {e}"));
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut errors = Vec::new();
        while !self.client.connection().is_closed() {
            let conn = self.client.connection();
            assert!(
                conn.error().is_none(),
                "{NAME}: died instead of closing: {:?}; errors: {errors:?}",
                conn.error()
            );
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{NAME}: waited {WAIT_LIMIT:?} for the server to close after NBD_CMD_DISC (phase {:?}); errors: {errors:?}",
                conn.phase()
            );
            if let Err(e) = self.step(left.min(STEP)) {
                errors.push(e.to_string());
            }
        }
        assert!(errors.is_empty(), "{NAME}: disconnecting: {errors:?}");
    }
}

/// Unwraps the cookie of an `aio_` call that must be accepted.
fn issued(result: nbd_io::Result<Cookie>, what: &str) -> Cookie {
    result.unwrap_or_else(|e| panic!("{NAME}: {what}: {e}"))
}

fn connect(server: &ServerHandle) -> Harness {
    connect_with(server, Config::default())
}

fn connect_with(server: &ServerHandle, config: Config) -> Harness {
    Harness::connect(&server.uri(), config)
        .unwrap_or_else(|e| panic!("{NAME}: connect to {}: {e}", server.uri()))
}

// ------------------------------------------------------------------ helpers

/// Applies `steps` operations of `work`, each waited for, checking every
/// read against the model.
fn run_workload(h: &mut Harness, work: &mut Workload, steps: usize) {
    for step in 0..steps {
        match work.next_op() {
            Op::Write { offset, data } => {
                h.run(|c| c.aio_pwrite(Bytes::from(data), offset, CmdFlags::empty()))
                    .unwrap_or_else(|e| panic!("{NAME} step {step}: write at {offset}: {e}"));
            }
            Op::Zero { offset, len } => {
                h.run(|c| c.aio_zero(len, offset, CmdFlags::empty()))
                    .unwrap_or_else(|e| panic!("{NAME} step {step}: zero {len} at {offset}: {e}"));
            }
            Op::Trim { offset, len } => {
                h.run(|c| c.aio_trim(len, offset, CmdFlags::empty()))
                    .unwrap_or_else(|e| panic!("{NAME} step {step}: trim {len} at {offset}: {e}"));
            }
            Op::Read { offset, expected } => {
                let got = h.read(offset, expected.len() as u64);
                assert!(
                    got == expected,
                    "{NAME} step {step}: {} bytes at {offset} differ from the model",
                    expected.len()
                );
            }
        }
    }
}

/// Writes to disjoint random places, all in flight at once, then reads the
/// whole export in 64 KiB pieces, all in flight at once, against the model.
fn batch_writes_then_reads(h: &mut Harness, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    let slot = 32 * KIB;
    let mut cookies = Vec::new();
    for i in 0..size / slot {
        let offset = i * slot + rng.below(8 * KIB);
        let len = rng.between(1, 16 * KIB) as usize;
        let data = rng.bytes(len);
        model[offset as usize..][..len].copy_from_slice(&data);
        let flags = if i % 5 == 0 && h.client.connection().can_fua().unwrap() {
            CmdFlags::FUA
        } else {
            CmdFlags::empty()
        };
        let write = h.client.aio_pwrite(Bytes::from(data), offset, flags);
        cookies.push(issued(write, &format!("write {i} of the batch")));
    }
    let writes = cookies.len();
    for done in h.collect(&cookies) {
        done.result
            .unwrap_or_else(|e| panic!("{NAME}: write {} of the batch: {e}", done.index));
        assert!(done.buffer.is_none());
    }
    assert_eq!(h.client.in_flight(), 0);
    let piece = 64 * KIB;
    let reads: Vec<(u64, usize)> = (0..size / piece)
        .map(|i| (i * piece, piece as usize))
        .collect();
    let done = h.read_batch(&reads);
    assert_eq!(done.len(), reads.len());
    for Done {
        index,
        result,
        buffer,
    } in done
    {
        result.unwrap_or_else(|e| panic!("{NAME}: read {index}: {e}"));
        let (offset, len) = reads[index];
        assert!(
            buffer.expect("reads return their buffer")[..] == model[offset as usize..][..len],
            "{NAME}: batched read at {offset} after {writes} batched writes differs"
        );
    }
}

// ------------------------------------------------------------------ handshake

/// Handshake facts against nbdkit's memory plugin agree with nbdinfo, and the
/// client's own choices (no structured replies, no extended headers) are honoured.
#[test]
fn nbdkit_handshake_facts() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    let h = connect(&server);
    let c = h.client.connection();
    assert!(c.is_ready());
    let got = negotiated(c);
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(got.structured, "nbdkit offers structured replies");
    assert_eq!(got.size, 4 * MIB);
    for (name, value) in &got.flags {
        let expected = !matches!(*name, "is_read_only" | "is_rotational");
        assert_eq!(*value, expected, "{NAME}: {name}");
    }
    assert_matches_nbdinfo(&server.uri(), &got);
    // Extended headers came to nbdkit after 1.32 (the libnbd 1.18 release
    // notes still test them against qemu-nbd only).
    if tool_version("nbdkit") <= (1, 32) {
        assert!(!c.extended_headers_negotiated(), "{NAME}");
    }
    h.disconnect();

    // Declining structured replies declines extended headers too.
    let config = Config::default().request_structured_replies(false);
    let mut h = connect_with(&server, config);
    assert!(!h.client.connection().structured_replies_negotiated());
    assert!(!h.client.connection().extended_headers_negotiated());
    assert!(
        !h.client.connection().can_df().unwrap(),
        "DF needs structured"
    );
    assert_eq!(h.read(100, 1000), vec![0; 1000]);
    h.disconnect();

    // A server without structured replies.
    let server = NbdkitBuilder::pattern(MIB).no_sr().start();
    let mut h = connect(&server);
    let got = negotiated(h.client.connection());
    assert!(!got.structured);
    assert!(!h.client.connection().extended_headers_negotiated());
    assert_matches_nbdinfo(&server.uri(), &got);
    assert_eq!(h.read(4000, 5000), pattern_at(4000, 5000));
    h.disconnect();
}

/// qemu-nbd: handshake facts, block sizes and extended headers (qemu ≥ 9
/// speaks them), and what happens when the client declines them.
#[test]
fn qemu_handshake_facts() {
    let server = QemuNbdBuilder::qcow2(3 * MIB)
        .export_name("disk")
        .shared(4)
        .start();
    let h = connect(&server);
    let got = negotiated(h.client.connection());
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(got.structured);
    assert_eq!(got.size, 3 * MIB);
    assert_eq!(got.block_sizes, Some((1, 4096, 32 * MIB as u32)));
    assert_matches_nbdinfo(&server.uri(), &got);
    if tool_version("qemu-nbd") >= (9, 0) {
        assert!(
            h.client.connection().extended_headers_negotiated(),
            "{NAME}: qemu-nbd {:?} speaks extended headers",
            tool_version("qemu-nbd")
        );
    }
    h.disconnect();

    let config = Config::default().request_extended_headers(false);
    let mut h = connect_with(&server, config);
    assert!(!h.client.connection().extended_headers_negotiated());
    assert!(h.client.connection().structured_replies_negotiated());
    assert_eq!(h.read(0, 4096), vec![0; 4096]);
    h.disconnect();
}

// ------------------------------------------------------------------ commands

/// What the export advertises, read once after the handshake.
struct Can {
    fua: bool,
    df: bool,
    flush: bool,
    trim: bool,
    zero: bool,
    fast_zero: bool,
    cache: bool,
}

impl Can {
    fn of(h: &Harness) -> Self {
        let c = h.client.connection();
        Can {
            fua: c.can_fua().unwrap(),
            df: c.can_df().unwrap(),
            flush: c.can_flush().unwrap(),
            trim: c.can_trim().unwrap(),
            zero: c.can_zero().unwrap(),
            fast_zero: c.can_fast_zero().unwrap(),
            cache: c.can_cache().unwrap(),
        }
    }
}

/// Every command with every flag the server advertises, each checked
/// against a local model. `trim_zeroes`: the server promises trimmed bytes
/// read back as zeroes (nbdkit memory); otherwise trimmed ranges are written
/// again before they are compared.
fn every_command(server: &ServerHandle, trim_zeroes: bool, seed: u64) {
    let mut h = connect(server);
    let size = h.client.connection().size().unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    let can = Can::of(&h);

    // Writes, plain and FUA, and unaligned reads across their edges.
    let mut write_flags = vec![CmdFlags::empty()];
    if can.fua {
        write_flags.push(CmdFlags::FUA);
    }
    for (i, flags) in write_flags.into_iter().enumerate() {
        let offset = 4 * KIB + i as u64 * 100 * KIB + 1;
        let data = rng.bytes(64 * KIB as usize + 7);
        model[offset as usize..][..data.len()].copy_from_slice(&data);
        h.run(|c| c.aio_pwrite(Bytes::from(data.clone()), offset, flags))
            .unwrap_or_else(|e| panic!("{NAME}: write with {flags:?}: {e}"));
        assert_eq!(h.read(offset, data.len() as u64), data);
        let around = h.read(offset - 3, 10);
        assert_eq!(around, &model[offset as usize - 3..][..10]);
    }

    // Reads with DF.
    if can.df {
        let buf = h
            .run(|c| c.aio_pread(BytesMut::zeroed(80 * KIB as usize), 3 * KIB, CmdFlags::DF))
            .unwrap()
            .expect("a read hands its buffer back");
        assert!(buf[..] == model[3 * KIB as usize..][..80 * KIB as usize]);
    } else {
        assert_errno(
            h.run(|c| c.aio_pread(BytesMut::zeroed(512), 0, CmdFlags::DF)),
            Errno::NotSup,
            "DF not advertised",
        );
    }

    if can.flush {
        h.run(|c| c.aio_flush(CmdFlags::empty())).unwrap();
    }

    // Write zeroes with each flag: zeroes after, the neighbours untouched.
    if can.zero {
        let mut zero_flags = vec![CmdFlags::empty(), CmdFlags::NO_HOLE];
        if can.fua {
            zero_flags.push(CmdFlags::FUA);
        }
        if can.fast_zero {
            zero_flags.push(CmdFlags::FAST_ZERO);
        }
        for (i, flags) in zero_flags.into_iter().enumerate() {
            let offset = MIB + i as u64 * 128 * KIB;
            let fill = Bytes::from(vec![0xEE; 96 * KIB as usize]);
            model[offset as usize..][..fill.len()].copy_from_slice(&fill);
            h.run(|c| c.aio_pwrite(fill, offset, CmdFlags::empty()))
                .unwrap();
            let (at, len) = (offset + 8 * KIB + 5, 40 * KIB + 1);
            match h.run(|c| c.aio_zero(len, at, flags)) {
                Ok(_) => model[at as usize..][..len as usize].fill(0),
                // The protocol lets a server refuse a fast zero it cannot do fast.
                Err(e) if flags == CmdFlags::FAST_ZERO => {
                    assert_eq!(e.errno(), Some(Errno::NotSup), "{NAME}: {e}")
                }
                Err(e) => panic!("{NAME}: zero with {flags:?}: {e}"),
            }
            assert!(
                h.read(offset, 96 * KIB) == model[offset as usize..][..96 * KIB as usize],
                "{NAME}: zero with {flags:?}"
            );
        }
    }

    // Trim, plain and FUA.
    if can.trim {
        let offset = 2 * MIB;
        let fill = Bytes::from(vec![0x77; 128 * KIB as usize]);
        model[offset as usize..][..fill.len()].copy_from_slice(&fill);
        h.run(|c| c.aio_pwrite(fill, offset, CmdFlags::empty()))
            .unwrap();
        h.run(|c| c.aio_trim(64 * KIB, offset, CmdFlags::empty()))
            .unwrap();
        if can.fua {
            h.run(|c| c.aio_trim(4 * KIB, offset + 64 * KIB, CmdFlags::FUA))
                .unwrap();
        }
        let trimmed = if can.fua { 68 } else { 64 } * KIB as usize;
        if trim_zeroes {
            model[offset as usize..][..trimmed].fill(0);
        } else {
            let again = Bytes::from(model[offset as usize..][..trimmed].to_vec());
            h.run(|c| c.aio_pwrite(again, offset, CmdFlags::empty()))
                .unwrap();
        }
        assert!(
            h.read(offset, 128 * KIB) == model[offset as usize..][..128 * KIB as usize],
            "{NAME}: trim"
        );
    }

    // Cache changes nothing.
    if can.cache {
        h.run(|c| c.aio_cache(MIB, 0, CmdFlags::empty())).unwrap();
    } else {
        assert_errno(
            h.run(|c| c.aio_cache(4096, 0, CmdFlags::empty())),
            Errno::NotSup,
            "cache not advertised",
        );
    }

    // The same commands all in flight at once (on disjoint ranges: the
    // protocol does not order commands in flight).
    let data = rng.bytes(10_000);
    let at = 3 * MIB + 5;
    let c = &mut h.client;
    let mut batch = vec![
        issued(
            c.aio_pwrite(Bytes::from(data.clone()), at, CmdFlags::empty()),
            "batched write",
        ),
        issued(
            c.aio_pread(BytesMut::zeroed(4096), 4 * KIB, CmdFlags::empty()),
            "batched read",
        ),
        issued(
            c.aio_zero(200, at + 20_000, CmdFlags::empty()),
            "batched zero",
        ),
    ];
    model[at as usize..][..data.len()].copy_from_slice(&data);
    model[at as usize + 20_000..][..200].fill(0);
    if can.cache {
        batch.push(issued(
            c.aio_cache(64 * KIB, 0, CmdFlags::empty()),
            "batched cache",
        ));
    }
    if can.flush {
        batch.push(issued(c.aio_flush(CmdFlags::empty()), "batched flush"));
    }
    let n = batch.len();
    let expected_read = model[4 * KIB as usize..][..4096].to_vec();
    let done = h.collect(&batch);
    assert_eq!(done.len(), n);
    for d in done {
        d.result
            .unwrap_or_else(|e| panic!("{NAME}: batch command {}: {e}", d.index));
        assert_eq!(
            d.buffer.is_some(),
            d.index == 1,
            "only the read has a buffer"
        );
        if let Some(buf) = d.buffer {
            assert!(buf[..] == expected_read[..], "{NAME}: batched read");
        }
    }

    assert!(h.read(0, size) == model, "{NAME}: whole export");
    h.disconnect();
    assert!(
        read_export(&server.uri()) == model,
        "{NAME}: nbdcopy sees other bytes"
    );
}

#[test]
fn nbdkit_memory_every_command() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    every_command(&server, true, 1);
}

#[test]
fn qemu_raw_every_command() {
    let server = QemuNbdBuilder::raw(4 * MIB).shared(4).start();
    every_command(&server, false, 2);
}

#[test]
fn qemu_qcow2_every_command() {
    let server = QemuNbdBuilder::qcow2(4 * MIB).shared(4).start();
    every_command(&server, false, 3);
}

/// nbd-server (simple replies only: no structured replies, no block status)
/// serving a file with trim, flush and FUA.
fn nbd_server(size: u64) -> ServerHandle {
    NbdServerBuilder::new()
        .export_with(
            NbdServerExport::new("suite", size)
                .option("trim", "true")
                .option("flush", "true")
                .option("fua", "true"),
        )
        .start()
}

#[test]
fn nbd_server_every_command() {
    every_command(&nbd_server(4 * MIB), false, 4);
}

/// Block status over base:allocation sees written data and holes.
#[test]
fn nbdkit_block_status() {
    let server = NbdkitBuilder::memory(MIB).start();
    let config = Config::default().meta_context(nbd_proto::context::BASE_ALLOCATION);
    let mut h = connect_with(&server, config);
    assert!(h.client.connection().can_meta_context("base:allocation"));
    h.run(|c| {
        c.aio_pwrite(
            Bytes::from(vec![1; 64 * KIB as usize]),
            128 * KIB,
            CmdFlags::empty(),
        )
    })
    .unwrap();
    let cookie = issued(
        h.client.aio_block_status(MIB, 0, CmdFlags::empty()),
        "block status",
    );
    h.wait_for(cookie).result.unwrap();
    let reports = h.take_block_status(cookie);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].context, "base:allocation");
    let mut at = 0;
    let mut data_at = Vec::new();
    for e in &reports[0].extents {
        if e.flags & 1 == 0 {
            data_at.push((at, at + e.length));
        }
        at += e.length;
    }
    assert!(
        data_at
            .iter()
            .any(|&(s, e)| s <= 128 * KIB && e >= 192 * KIB),
        "the written range is not reported as data: {reports:?}"
    );
    assert!(
        !data_at.iter().any(|&(s, _)| s == 0),
        "offset 0 was never written yet is reported as data: {reports:?}"
    );
    // REQ_ONE: a single extent.
    let cookie = issued(
        h.client
            .aio_block_status(MIB - 128 * KIB, 128 * KIB, CmdFlags::REQ_ONE),
        "block status with REQ_ONE",
    );
    h.wait_for(cookie).result.unwrap();
    let one = h.take_block_status(cookie);
    assert_eq!(one[0].extents.len(), 1, "{one:?}");
    assert_eq!(one[0].extents[0].flags & 1, 0, "{one:?}");
    h.disconnect();
}

// ------------------------------------------------------------------ integrity

/// Random writes, zeroes, trims and reads against a local model, then
/// batches in flight; what nbdcopy reads at the end is the model.
fn random_io(server: &ServerHandle, trims: bool, seed: u64) {
    let mut h = connect(server);
    let size = h.client.connection().size().unwrap() as usize;
    let mut work = Workload::new(seed, vec![0; size], 1, 100 * KIB).with_trim(trims);
    run_workload(&mut h, &mut work, 150);
    batch_writes_then_reads(&mut h, &mut work.model, seed + 1);
    h.run(|c| c.aio_flush(CmdFlags::empty())).unwrap();
    h.disconnect();
    assert!(
        read_export(&server.uri()) == work.model,
        "{NAME}: nbdcopy sees other bytes than the model"
    );
}

#[test]
fn nbdkit_memory_random_io() {
    random_io(&NbdkitBuilder::memory(2 * MIB).start(), true, 0x11);
}

#[test]
fn qemu_raw_random_io() {
    random_io(&QemuNbdBuilder::raw(2 * MIB).shared(4).start(), false, 0x12);
}

#[test]
fn qemu_qcow2_random_io() {
    random_io(
        &QemuNbdBuilder::qcow2(2 * MIB).shared(4).start(),
        false,
        0x13,
    );
}

#[test]
fn nbd_server_random_io() {
    random_io(&nbd_server(2 * MIB), false, 0x14);
}

/// Reads of the pattern plugin, many in flight, at random unaligned places.
#[test]
fn nbdkit_pattern_reads_in_flight() {
    let server = NbdkitBuilder::pattern(8 * MIB).start();
    let mut h = connect(&server);
    assert!(h.client.connection().is_read_only().unwrap());
    let mut rng = Rng::new(9);
    let reads: Vec<(u64, usize)> = (0..100)
        .map(|_| {
            let offset = rng.below(8 * MIB - 1);
            let len = rng.between(1, (8 * MIB - offset).min(300 * KIB));
            (offset, len as usize)
        })
        .collect();
    for d in h.read_batch(&reads) {
        let (offset, len) = reads[d.index];
        d.result.unwrap();
        assert!(
            d.buffer.unwrap()[..] == pattern_at(offset, len)[..],
            "{NAME}: {len} bytes at {offset}"
        );
    }
    // One large read (the server's maximum is above 4 MiB here).
    let all = h.read(0, 4 * MIB);
    assert!(all == pattern_bytes(4 * MIB));
    h.disconnect();
}

/// Many reads in flight complete out of order (an eval plugin whose pread
/// sleeps longer the lower the offset), each exactly once with its own data.
#[test]
fn nbdkit_eval_reads_complete_out_of_order() {
    const READS: u64 = 24;
    const BLOCK: u64 = 4096;
    let server = nbd_tests::testkit::nbdkit_reverse_order_reads(READS, BLOCK, 10);
    let mut h = connect(&server);
    let reads: Vec<(u64, usize)> = (0..READS).map(|i| (i * BLOCK, BLOCK as usize)).collect();
    let done = h.read_batch(&reads);
    let order: Vec<usize> = done
        .into_iter()
        .map(|d| {
            d.result.unwrap();
            assert!(
                d.buffer.unwrap()[..] == pattern_at(d.index as u64 * BLOCK, BLOCK as usize)[..],
                "{NAME}: read {} has another read's data",
                d.index
            );
            d.index
        })
        .collect();
    let submitted: Vec<usize> = (0..READS as usize).collect();
    assert_ne!(order, submitted, "{NAME}: completions came in order");
    // The last offsets sleep least: the last read should not be last.
    assert_ne!(order.last(), Some(&(READS as usize - 1)), "{order:?}");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, submitted, "every read completed once");
    assert_eq!(h.client.in_flight(), 0);
    h.disconnect();
}

// ------------------------------------------------------------------ errors

/// A read-only export: strict mode refuses writes with EPERM before sending;
/// without it the server refuses them; the connection carries on.
fn read_only_refuses_writes(server: &ServerHandle, server_errno: Errno) {
    let mut h = connect(server);
    assert!(h.client.connection().is_read_only().unwrap());
    let before = h.read(0, 4096);
    for (what, result) in [
        (
            "pwrite",
            h.run(|c| c.aio_pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty())),
        ),
        ("zero", h.run(|c| c.aio_zero(512, 0, CmdFlags::empty()))),
    ] {
        let err = result.expect_err(what);
        assert_eq!(err.errno(), Some(Errno::Perm), "{NAME}: {what}: {err}");
        assert!(
            matches!(err, nbd_io::Error::Nbd(nbd_proto::Error::ReadOnly(_))),
            "{NAME}: {err:?}"
        );
    }
    // Even a trim on a server that can trim is refused: nothing was sent.
    assert!(h.run(|c| c.aio_trim(512, 0, CmdFlags::empty())).is_err());
    assert_eq!(h.client.in_flight(), 0);

    h.client.connection_mut().set_strict_mode(Strict::empty());
    let err = h
        .run(|c| c.aio_pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()))
        .expect_err("a write sent to a read-only export");
    assert_eq!(err.errno(), Some(server_errno), "{NAME}: {err}");
    assert!(
        matches!(err, nbd_io::Error::Nbd(nbd_proto::Error::Server { .. })),
        "{NAME}: {err:?}"
    );
    // In a batch, only the write fails.
    let c = &mut h.client;
    let batch = [
        issued(
            c.aio_pread(BytesMut::zeroed(4096), 0, CmdFlags::empty()),
            "read",
        ),
        issued(
            c.aio_pwrite(Bytes::from(vec![2; 4096]), 4096, CmdFlags::empty()),
            "write",
        ),
        issued(
            c.aio_pread(BytesMut::zeroed(100), 8192, CmdFlags::empty()),
            "read",
        ),
    ];
    for d in h.collect(&batch) {
        if d.index == 1 {
            let e = d.result.expect_err("write in a batch");
            assert_eq!(e.errno(), server_errno, "{NAME}: {e}");
        } else {
            d.result.unwrap();
        }
    }
    assert!(h.client.connection().is_ready());
    assert_eq!(h.read(0, 4096), before);
    h.disconnect();
}

#[test]
fn nbdkit_read_only_eperm() {
    let server = NbdkitBuilder::memory(MIB).readonly().start();
    read_only_refuses_writes(&server, Errno::Perm);
}

/// qemu-nbd answers a write to a read-only export with EINVAL (and the
/// message "Export is read-only"), not EPERM; libnbd sees the same.
#[test]
fn qemu_read_only_einval() {
    let server = QemuNbdBuilder::raw(MIB).read_only().shared(4).start();
    read_only_refuses_writes(&server, Errno::Inval);
}

/// nbdkit's error filter fails reads with EIO: only those commands fail,
/// writes in the same batch succeed, and the connection carries on.
#[test]
fn nbdkit_error_filter_fails_only_the_command() {
    let builder = NbdkitBuilder::memory(MIB).filter("error");
    let inject = builder.dir().join("inject");
    let server = builder
        .param("error-pread", "EIO")
        .param("error-pread-rate", "100%")
        .param("error-pread-file", &inject)
        .start();
    let mut h = connect(&server);
    h.run(|c| c.aio_pwrite(Bytes::from(vec![5; 8192]), 0, CmdFlags::empty()))
        .unwrap();
    assert_eq!(h.read(0, 8192), vec![5; 8192]);

    fs::write(&inject, b"").unwrap();
    assert_errno(
        h.run(|c| c.aio_pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())),
        Errno::Io,
        "read with errors injected",
    );
    let mut batch = Vec::new();
    for i in 0..8u64 {
        let read = h
            .client
            .aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty());
        batch.push(issued(read, &format!("read {i}")));
        let data = Bytes::from(vec![i as u8 + 1; 4096]);
        let write = h
            .client
            .aio_pwrite(data, 64 * KIB + i * 4096, CmdFlags::empty());
        batch.push(issued(write, &format!("write {i}")));
    }
    let done = h.collect(&batch);
    assert_eq!(done.len(), 16);
    for d in done {
        if d.index % 2 == 0 {
            let e = d.result.expect_err("injected read error");
            assert_eq!(e.errno(), Errno::Io, "{NAME}: {e}");
            assert!(
                matches!(e, nbd_proto::Error::Server { .. }),
                "{NAME}: {e:?}"
            );
        } else {
            d.result
                .unwrap_or_else(|e| panic!("{NAME}: write {}: {e}", d.index));
        }
    }
    assert!(h.client.connection().is_ready());
    fs::remove_file(&inject).unwrap();
    for i in 0..8u64 {
        assert_eq!(h.read(64 * KIB + i * 4096, 4096), vec![i as u8 + 1; 4096]);
    }
    h.disconnect();
}

/// Asserts the batch `done` (all issued before the server died) completed
/// each command exactly once; every failure is ENOTCONN; returns how many failed.
fn assert_failed_once_with_enotconn(done: &[Done], issued: usize, check: impl Fn(&Done)) -> usize {
    assert_eq!(done.len(), issued, "{NAME}");
    let indices: HashSet<usize> = done.iter().map(|d| d.index).collect();
    assert_eq!(indices.len(), issued, "{NAME}: a command completed twice");
    let mut failed = 0;
    for d in done {
        match &d.result {
            Err(e) => {
                assert_eq!(
                    e.errno(),
                    Errno::NotConn,
                    "{NAME}: command {}: {e}",
                    d.index
                );
                failed += 1;
            }
            Ok(()) => check(d),
        }
    }
    failed
}

/// After the death: later commands fail at once with ENOTCONN, and driving
/// again produces no late completion.
fn assert_dead_after(h: &mut Harness) {
    assert_eq!(h.client.in_flight(), 0, "{NAME}");
    let _ = h.step(Duration::from_millis(20));
    assert!(
        h.client.next_completion().is_none(),
        "{NAME}: a completion after all had completed"
    );
    let err = h
        .run(|c| c.aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty()))
        .expect_err("the connection is dead");
    assert_eq!(err.errno(), Some(Errno::NotConn), "{NAME}: {err}");
    assert!(!h.client.connection().is_ready());
}

/// nbdkit killed while reads wait in its delay filter: every pending command
/// fails exactly once with ENOTCONN, promptly.
#[test]
fn nbdkit_killed_mid_flight() {
    let mut server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-read", "20")
        .start();
    let mut h = connect(&server);
    h.run(|c| c.aio_pwrite(Bytes::from(vec![3; 4096]), 0, CmdFlags::empty()))
        .unwrap();
    let cookies: Vec<Cookie> = (0..10)
        .map(|i| {
            let read = h
                .client
                .aio_pread(BytesMut::zeroed(512), i * 512, CmdFlags::empty());
            issued(read, &format!("read {i}"))
        })
        .collect();
    h.send_all();
    assert_eq!(h.client.in_flight(), 10);
    // Let the server take the requests in, then crash it.
    std::thread::sleep(Duration::from_millis(100));
    server.kill();
    // `collect` panics after WAIT_LIMIT: that bound, not a speed, is what
    // turns a hang into a failure.
    let done = h.collect(&cookies);
    let failed = assert_failed_once_with_enotconn(&done, 10, |d| {
        panic!("{NAME}: read {} succeeded after the kill", d.index)
    });
    assert_eq!(failed, 10);
    assert_dead_after(&mut h);
}

/// qemu-nbd killed with 32 MiB of reads outstanding that the client has not
/// read yet: at most what fits in the socket can have been answered; every
/// command completes once, successes with the right data, the rest ENOTCONN.
#[test]
fn qemu_killed_mid_flight() {
    let data = Rng::new(77).bytes(8 * MIB as usize);
    let mut server = QemuNbdBuilder::from_bytes(ImageFormat::Raw, &data)
        .shared(4)
        .start();
    let mut h = connect(&server);
    let reads: Vec<(u64, usize)> = (0..32).map(|i| ((i % 8) * MIB, MIB as usize)).collect();
    let cookies: Vec<Cookie> = reads
        .iter()
        .map(|&(offset, len)| {
            let read = h
                .client
                .aio_pread(BytesMut::zeroed(len), offset, CmdFlags::empty());
            issued(read, &format!("read at {offset}"))
        })
        .collect();
    h.send_all();
    server.kill();
    let done = h.collect(&cookies);
    let failed = assert_failed_once_with_enotconn(&done, reads.len(), |d| {
        let (offset, len) = reads[d.index];
        assert!(
            d.buffer.as_ref().unwrap()[..] == data[offset as usize..][..len],
            "{NAME}: read {} succeeded with wrong data",
            d.index
        );
    });
    assert!(failed >= 16, "{NAME}: only {failed} of 32 failed");
    assert_dead_after(&mut h);
}
