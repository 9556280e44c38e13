//! One behavioural suite, run through both I/O adapters of the client: the
//! blocking `nbd_blocking::Client` and the mio `nbd_mio::Client` (driven by
//! `nbd_tests::adapters::MioAdapter`, an ordinary poll loop).
//!
//! Each scenario is a generic function over [`Adapter`]; the `both!` macro at
//! the end makes one `#[test]` per adapter (`blocking::NAME`, `mio::NAME`), so
//! the two adapters must pass exactly the same assertions against the same
//! servers: nbdkit (memory, pattern, eval with delays, error and delay
//! filters) and qemu-nbd (raw and qcow2 images).

use std::collections::HashSet;
use std::fs;
use std::process::Command;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Config, Errno, Strict};
use nbd_tests::adapters::{Adapter, CallResult, Cmd, Done};
use nbd_tests::testkit::{
    assert_matches_nbdinfo, negotiated, pattern_at, pattern_bytes, Op, Workload, XorShift,
};
use nbd_tests::{read_export, ImageFormat, NbdkitBuilder, QemuNbdBuilder, ServerHandle};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------ helpers

fn connect<A: Adapter>(server: &ServerHandle) -> A {
    connect_with(server, Config::default())
}

fn connect_with<A: Adapter>(server: &ServerHandle, config: Config) -> A {
    A::connect(&server.uri(), config)
        .unwrap_or_else(|e| panic!("{}: connect to {}: {e}", A::NAME, server.uri()))
}

fn read<A: Adapter>(client: &mut A, offset: u64, len: u64) -> Vec<u8> {
    client
        .pread(BytesMut::zeroed(len as usize), offset, CmdFlags::empty())
        .unwrap_or_else(|e| panic!("{}: pread of {len} at {offset}: {e}", A::NAME))
        .to_vec()
}

fn assert_errno<T: std::fmt::Debug>(result: CallResult<T>, errno: Errno, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.errno, Some(errno), "{what}: {err}");
}

/// `(major, minor)` of `PROGRAM --version` (the first `N.N` in its output).
fn tool_version(program: &str) -> (u32, u32) {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{program} --version: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| {
            let mut parts = word.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            Some((major, minor))
        })
        .unwrap_or_else(|| panic!("no version in {program} --version: {text}"))
}

/// Applies `steps` operations of `work` with the adapter's waiting calls,
/// checking every read against the model.
fn run_workload<A: Adapter>(client: &mut A, work: &mut Workload, steps: usize) {
    for step in 0..steps {
        let name = A::NAME;
        match work.next_op() {
            Op::Write { offset, data } => client
                .pwrite(Bytes::from(data), offset, CmdFlags::empty())
                .unwrap_or_else(|e| panic!("{name} step {step}: write at {offset}: {e}")),
            Op::Zero { offset, len } => client
                .zero(len, offset, CmdFlags::empty())
                .unwrap_or_else(|e| panic!("{name} step {step}: zero {len} at {offset}: {e}")),
            Op::Trim { offset, len } => client
                .trim(len, offset, CmdFlags::empty())
                .unwrap_or_else(|e| panic!("{name} step {step}: trim {len} at {offset}: {e}")),
            Op::Read { offset, expected } => {
                let got = read(client, offset, expected.len() as u64);
                assert!(
                    got == expected,
                    "{name} step {step}: {} bytes at {offset} differ from the model",
                    expected.len()
                );
            }
        }
    }
}

/// Writes to disjoint random places, all in flight at once, then reads the
/// whole export in 64 KiB pieces, all in flight at once, against the model.
fn batch_writes_then_reads<A: Adapter>(client: &mut A, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let mut rng = XorShift::new(seed);
    let slot = 32 * KIB;
    let mut cmds = Vec::new();
    for i in 0..size / slot {
        let offset = i * slot + rng.below(8 * KIB);
        let len = rng.range(1, 16 * KIB) as usize;
        let data = rng.bytes(len);
        model[offset as usize..][..len].copy_from_slice(&data);
        let flags = if i % 5 == 0 && client.connection().can_fua().unwrap() {
            CmdFlags::FUA
        } else {
            CmdFlags::empty()
        };
        cmds.push(Cmd::Write {
            offset,
            data: Bytes::from(data),
            flags,
        });
    }
    let writes = cmds.len();
    for done in client.submit(cmds) {
        done.result
            .unwrap_or_else(|e| panic!("{}: write {} of the batch: {e}", A::NAME, done.index));
        assert!(done.buffer.is_none());
    }
    assert_eq!(client.in_flight(), 0);
    let piece = 64 * KIB;
    let reads: Vec<(u64, usize)> = (0..size / piece)
        .map(|i| (i * piece, piece as usize))
        .collect();
    let done = client.submit_reads(&reads);
    assert_eq!(done.len(), reads.len());
    for Done {
        index,
        result,
        buffer,
    } in done
    {
        result.unwrap_or_else(|e| panic!("{}: read {index}: {e}", A::NAME));
        let (offset, len) = reads[index];
        assert!(
            buffer.expect("reads return their buffer")[..] == model[offset as usize..][..len],
            "{}: batched read at {offset} after {writes} batched writes differs",
            A::NAME
        );
    }
}

// ------------------------------------------------------------------ handshake

/// Handshake facts against nbdkit's memory plugin agree with nbdinfo, and the
/// client's own choices (no structured replies, no extended headers) are honoured.
fn nbdkit_handshake_facts<A: Adapter>() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    let client: A = connect(&server);
    let c = client.connection();
    assert!(c.is_ready());
    let got = negotiated(client.connection());
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(got.structured, "nbdkit offers structured replies");
    assert_eq!(got.size, 4 * MIB);
    for (name, value) in &got.flags {
        let expected = !matches!(*name, "is_read_only" | "is_rotational");
        assert_eq!(*value, expected, "{}: {name}", A::NAME);
    }
    assert_matches_nbdinfo(&server.uri(), &got);
    // Extended headers came to nbdkit after 1.32 (the libnbd 1.18 release
    // notes still test them against qemu-nbd only).
    if tool_version("nbdkit") <= (1, 32) {
        assert!(!c.extended_headers_negotiated(), "{}", A::NAME);
    }
    client.disconnect().unwrap();

    // Declining structured replies declines extended headers too.
    let config = Config {
        request_structured_replies: false,
        ..Config::default()
    };
    let mut client: A = connect_with(&server, config);
    assert!(!client.connection().structured_replies_negotiated());
    assert!(!client.connection().extended_headers_negotiated());
    assert!(
        !client.connection().can_df().unwrap(),
        "DF needs structured"
    );
    assert_eq!(read(&mut client, 100, 1000), vec![0; 1000]);
    client.disconnect().unwrap();

    // A server without structured replies.
    let server = NbdkitBuilder::pattern(MIB).no_sr().start();
    let mut client: A = connect(&server);
    let got = negotiated(client.connection());
    assert!(!got.structured);
    assert!(!client.connection().extended_headers_negotiated());
    assert_matches_nbdinfo(&server.uri(), &got);
    assert_eq!(read(&mut client, 4000, 5000), pattern_at(4000, 5000));
    client.disconnect().unwrap();
}

/// qemu-nbd: handshake facts, block sizes and extended headers (qemu ≥ 9
/// speaks them), and what happens when the client declines them.
fn qemu_handshake_facts<A: Adapter>() {
    let server = QemuNbdBuilder::qcow2(3 * MIB)
        .export_name("disk")
        .shared(4)
        .start();
    let client: A = connect(&server);
    let got = negotiated(client.connection());
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(got.structured);
    assert_eq!(got.size, 3 * MIB);
    assert_eq!(got.block_sizes, Some((1, 4096, 32 * MIB as u32)));
    assert_matches_nbdinfo(&server.uri(), &got);
    if tool_version("qemu-nbd") >= (9, 0) {
        assert!(
            client.connection().extended_headers_negotiated(),
            "{}: qemu-nbd {:?} speaks extended headers",
            A::NAME,
            tool_version("qemu-nbd")
        );
    }
    client.disconnect().unwrap();

    let config = Config {
        request_extended_headers: false,
        ..Config::default()
    };
    let mut client: A = connect_with(&server, config);
    assert!(!client.connection().extended_headers_negotiated());
    assert!(client.connection().structured_replies_negotiated());
    assert_eq!(read(&mut client, 0, 4096), vec![0; 4096]);
    client.disconnect().unwrap();
}

// ------------------------------------------------------------------ commands

/// Every command with every flag the server advertises, each checked
/// against a local model. `trim_zeroes`: the server promises trimmed bytes
/// read back as zeroes (nbdkit memory); otherwise trimmed ranges are written
/// again before they are compared.
fn every_command<A: Adapter>(server: &ServerHandle, trim_zeroes: bool, seed: u64) {
    let mut client: A = connect(server);
    let size = client.connection().size().unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = XorShift::new(seed);
    let can = |client: &A, what: &str| -> bool {
        let c = client.connection();
        match what {
            "fua" => c.can_fua().unwrap(),
            "df" => c.can_df().unwrap(),
            "flush" => c.can_flush().unwrap(),
            "trim" => c.can_trim().unwrap(),
            "zero" => c.can_zero().unwrap(),
            "fast_zero" => c.can_fast_zero().unwrap(),
            "cache" => c.can_cache().unwrap(),
            _ => unreachable!(),
        }
    };

    // Writes, plain and FUA, and unaligned reads across their edges.
    let mut write_flags = vec![CmdFlags::empty()];
    if can(&client, "fua") {
        write_flags.push(CmdFlags::FUA);
    }
    for (i, flags) in write_flags.into_iter().enumerate() {
        let offset = 4 * KIB + i as u64 * 100 * KIB + 1;
        let data = rng.bytes(64 * KIB as usize + 7);
        model[offset as usize..][..data.len()].copy_from_slice(&data);
        client
            .pwrite(Bytes::from(data.clone()), offset, flags)
            .unwrap_or_else(|e| panic!("{}: write with {flags:?}: {e}", A::NAME));
        assert_eq!(read(&mut client, offset, data.len() as u64), data);
        let around = read(&mut client, offset - 3, 10);
        assert_eq!(around, &model[offset as usize - 3..][..10]);
    }

    // Reads with DF.
    if can(&client, "df") {
        let buf = client
            .pread(BytesMut::zeroed(80 * KIB as usize), 3 * KIB, CmdFlags::DF)
            .unwrap();
        assert!(buf[..] == model[3 * KIB as usize..][..80 * KIB as usize]);
    } else {
        assert_errno(
            client.pread(BytesMut::zeroed(512), 0, CmdFlags::DF),
            Errno::NotSup,
            "DF not advertised",
        );
    }

    if can(&client, "flush") {
        client.flush(CmdFlags::empty()).unwrap();
    }

    // Write zeroes with each flag: zeroes after, the neighbours untouched.
    if can(&client, "zero") {
        let mut zero_flags = vec![CmdFlags::empty(), CmdFlags::NO_HOLE];
        if can(&client, "fua") {
            zero_flags.push(CmdFlags::FUA);
        }
        if can(&client, "fast_zero") {
            zero_flags.push(CmdFlags::FAST_ZERO);
        }
        for (i, flags) in zero_flags.into_iter().enumerate() {
            let offset = MIB + i as u64 * 128 * KIB;
            let fill = Bytes::from(vec![0xEE; 96 * KIB as usize]);
            model[offset as usize..][..fill.len()].copy_from_slice(&fill);
            client.pwrite(fill, offset, CmdFlags::empty()).unwrap();
            let (at, len) = (offset + 8 * KIB + 5, 40 * KIB + 1);
            match client.zero(len, at, flags) {
                Ok(()) => model[at as usize..][..len as usize].fill(0),
                // The protocol lets a server refuse a fast zero it cannot do fast.
                Err(e) if flags == CmdFlags::FAST_ZERO => {
                    assert_eq!(e.errno, Some(Errno::NotSup), "{}: {e}", A::NAME)
                }
                Err(e) => panic!("{}: zero with {flags:?}: {e}", A::NAME),
            }
            assert!(
                read(&mut client, offset, 96 * KIB)
                    == model[offset as usize..][..96 * KIB as usize],
                "{}: zero with {flags:?}",
                A::NAME
            );
        }
    }

    // Trim, plain and FUA.
    if can(&client, "trim") {
        let offset = 2 * MIB;
        let fill = Bytes::from(vec![0x77; 128 * KIB as usize]);
        model[offset as usize..][..fill.len()].copy_from_slice(&fill);
        client.pwrite(fill, offset, CmdFlags::empty()).unwrap();
        client.trim(64 * KIB, offset, CmdFlags::empty()).unwrap();
        if can(&client, "fua") {
            client
                .trim(4 * KIB, offset + 64 * KIB, CmdFlags::FUA)
                .unwrap();
        }
        let trimmed = if can(&client, "fua") { 68 } else { 64 } * KIB as usize;
        if trim_zeroes {
            model[offset as usize..][..trimmed].fill(0);
        } else {
            let again = Bytes::from(model[offset as usize..][..trimmed].to_vec());
            client.pwrite(again, offset, CmdFlags::empty()).unwrap();
        }
        assert!(
            read(&mut client, offset, 128 * KIB) == model[offset as usize..][..128 * KIB as usize],
            "{}: trim",
            A::NAME
        );
    }

    // Cache changes nothing.
    if can(&client, "cache") {
        client.cache(MIB, 0, CmdFlags::empty()).unwrap();
    } else {
        assert_errno(
            client.cache(4096, 0, CmdFlags::empty()),
            Errno::NotSup,
            "cache not advertised",
        );
    }

    // The same commands all in flight at once (on disjoint ranges: the
    // protocol does not order commands in flight).
    let data = rng.bytes(10_000);
    let at = 3 * MIB + 5;
    let mut batch = vec![
        Cmd::write(at, data.clone()),
        Cmd::read(4 * KIB, 4096),
        Cmd::Zero {
            offset: at + 20_000,
            len: 200,
            flags: CmdFlags::empty(),
        },
    ];
    model[at as usize..][..data.len()].copy_from_slice(&data);
    model[at as usize + 20_000..][..200].fill(0);
    if can(&client, "cache") {
        batch.push(Cmd::Cache {
            offset: 0,
            len: 64 * KIB,
            flags: CmdFlags::empty(),
        });
    }
    if can(&client, "flush") {
        batch.push(Cmd::Flush {
            flags: CmdFlags::empty(),
        });
    }
    let n = batch.len();
    let expected_read = model[4 * KIB as usize..][..4096].to_vec();
    let done = client.submit(batch);
    assert_eq!(done.len(), n);
    for d in done {
        d.result
            .unwrap_or_else(|e| panic!("{}: batch command {}: {e}", A::NAME, d.index));
        assert_eq!(
            d.buffer.is_some(),
            d.index == 1,
            "only the read has a buffer"
        );
        if let Some(buf) = d.buffer {
            assert!(buf[..] == expected_read[..], "{}: batched read", A::NAME);
        }
    }

    assert!(
        read(&mut client, 0, size) == model,
        "{}: whole export",
        A::NAME
    );
    client.disconnect().unwrap();
    assert!(
        read_export(&server.uri()) == model,
        "{}: nbdcopy sees other bytes",
        A::NAME
    );
}

fn nbdkit_memory_every_command<A: Adapter>() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    every_command::<A>(&server, true, 1);
}

fn qemu_raw_every_command<A: Adapter>() {
    let server = QemuNbdBuilder::raw(4 * MIB).shared(4).start();
    every_command::<A>(&server, false, 2);
}

fn qemu_qcow2_every_command<A: Adapter>() {
    let server = QemuNbdBuilder::qcow2(4 * MIB).shared(4).start();
    every_command::<A>(&server, false, 3);
}

/// Block status over base:allocation sees written data and holes.
fn nbdkit_block_status<A: Adapter>() {
    let server = NbdkitBuilder::memory(MIB).start();
    let config = Config {
        meta_contexts: vec!["base:allocation".into()],
        ..Config::default()
    };
    let mut client: A = connect_with(&server, config);
    assert!(client.connection().can_meta_context("base:allocation"));
    client
        .pwrite(
            Bytes::from(vec![1; 64 * KIB as usize]),
            128 * KIB,
            CmdFlags::empty(),
        )
        .unwrap();
    let reports = client.block_status(MIB, 0, CmdFlags::empty()).unwrap();
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
    let one = client
        .block_status(MIB - 128 * KIB, 128 * KIB, CmdFlags::REQ_ONE)
        .unwrap();
    assert_eq!(one[0].extents.len(), 1, "{one:?}");
    assert_eq!(one[0].extents[0].flags & 1, 0, "{one:?}");
    client.disconnect().unwrap();
}

// ------------------------------------------------------------------ integrity

/// Random writes, zeroes, trims and reads against a local model, then
/// batches in flight; what nbdcopy reads at the end is the model.
fn random_io<A: Adapter>(server: &ServerHandle, trims: bool, seed: u64) {
    let mut client: A = connect(server);
    let size = client.connection().size().unwrap() as usize;
    let mut work = Workload::new(seed, vec![0; size], 1, 100 * KIB).with_trim(trims);
    run_workload(&mut client, &mut work, 150);
    batch_writes_then_reads(&mut client, &mut work.model, seed + 1);
    client.flush(CmdFlags::empty()).unwrap();
    client.disconnect().unwrap();
    assert!(
        read_export(&server.uri()) == work.model,
        "{}: nbdcopy sees other bytes than the model",
        A::NAME
    );
}

fn nbdkit_memory_random_io<A: Adapter>() {
    random_io::<A>(&NbdkitBuilder::memory(2 * MIB).start(), true, 0x11);
}

fn qemu_raw_random_io<A: Adapter>() {
    random_io::<A>(&QemuNbdBuilder::raw(2 * MIB).shared(4).start(), false, 0x12);
}

fn qemu_qcow2_random_io<A: Adapter>() {
    random_io::<A>(
        &QemuNbdBuilder::qcow2(2 * MIB).shared(4).start(),
        false,
        0x13,
    );
}

/// Reads of the pattern plugin, many in flight, at random unaligned places.
fn nbdkit_pattern_reads_in_flight<A: Adapter>() {
    let server = NbdkitBuilder::pattern(8 * MIB).start();
    let mut client: A = connect(&server);
    assert!(client.connection().is_read_only().unwrap());
    let mut rng = XorShift::new(9);
    let reads: Vec<(u64, usize)> = (0..100)
        .map(|_| {
            let offset = rng.below(8 * MIB - 1);
            let len = rng.range(1, (8 * MIB - offset).min(300 * KIB));
            (offset, len as usize)
        })
        .collect();
    for d in client.submit_reads(&reads) {
        let (offset, len) = reads[d.index];
        d.result.unwrap();
        assert!(
            d.buffer.unwrap()[..] == pattern_at(offset, len)[..],
            "{}: {len} bytes at {offset}",
            A::NAME
        );
    }
    // One large read (the server's maximum is above 4 MiB here).
    let all = read(&mut client, 0, 4 * MIB);
    assert!(all == pattern_bytes(4 * MIB));
    client.disconnect().unwrap();
}

/// Many reads in flight complete out of order (an eval plugin whose pread
/// sleeps longer the lower the offset), each exactly once with its own data.
fn nbdkit_eval_reads_complete_out_of_order<A: Adapter>() {
    const READS: u64 = 24;
    const BLOCK: u64 = 4096;
    let builder = NbdkitBuilder::eval();
    let pattern = builder.dir().join("pattern.bin");
    fs::write(&pattern, pattern_bytes(READS * BLOCK)).unwrap();
    let pread = format!(
        "ms=$(( ({READS} - $4 / {BLOCK}) * 10 ))\n\
         sleep \"$((ms / 1000)).$(printf %03d $((ms % 1000)))\"\n\
         dd if={} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        pattern.display()
    );
    let server = builder
        .method("thread_model", "echo parallel")
        .method("get_size", &format!("echo {}", READS * BLOCK))
        .method("pread", &pread)
        .threads(READS as u32)
        .start();
    let mut client: A = connect(&server);
    let reads: Vec<(u64, usize)> = (0..READS).map(|i| (i * BLOCK, BLOCK as usize)).collect();
    let done = client.submit_reads(&reads);
    let order: Vec<usize> = done
        .into_iter()
        .map(|d| {
            d.result.unwrap();
            assert!(
                d.buffer.unwrap()[..] == pattern_at(d.index as u64 * BLOCK, BLOCK as usize)[..],
                "{}: read {} has another read's data",
                A::NAME,
                d.index
            );
            d.index
        })
        .collect();
    let submitted: Vec<usize> = (0..READS as usize).collect();
    assert_ne!(order, submitted, "{}: completions came in order", A::NAME);
    // The last offsets sleep least: the last read should not be last.
    assert_ne!(order.last(), Some(&(READS as usize - 1)), "{order:?}");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, submitted, "every read completed once");
    assert_eq!(client.in_flight(), 0);
    client.disconnect().unwrap();
}

// ------------------------------------------------------------------ errors

/// A read-only export: strict mode refuses writes with EPERM before sending;
/// without it the server refuses them; the connection carries on.
fn read_only_refuses_writes<A: Adapter>(server: &ServerHandle, server_errno: Errno) {
    let mut client: A = connect(server);
    assert!(client.connection().is_read_only().unwrap());
    let before = read(&mut client, 0, 4096);
    for (what, result) in [
        (
            "pwrite",
            client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        ),
        ("zero", client.zero(512, 0, CmdFlags::empty())),
    ] {
        let err = result.expect_err(what);
        assert_eq!(err.errno, Some(Errno::Perm), "{}: {what}: {err}", A::NAME);
        assert!(
            matches!(err.nbd, Some(nbd_proto::Error::ReadOnly(_))),
            "{}: {err:?}",
            A::NAME
        );
    }
    // Even a trim on a server that can trim is refused: nothing was sent.
    assert!(client.trim(512, 0, CmdFlags::empty()).is_err());
    assert_eq!(client.in_flight(), 0);

    client.connection_mut().set_strict_mode(Strict::empty());
    let err = client
        .pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty())
        .expect_err("a write sent to a read-only export");
    assert_eq!(err.errno, Some(server_errno), "{}: {err}", A::NAME);
    assert!(
        matches!(err.nbd, Some(nbd_proto::Error::Server { .. })),
        "{}: {err:?}",
        A::NAME
    );
    // In a batch, only the write fails.
    let done = client.submit(vec![
        Cmd::read(0, 4096),
        Cmd::write(4096, vec![2; 4096]),
        Cmd::read(8192, 100),
    ]);
    for d in done {
        if d.index == 1 {
            let e = d.result.expect_err("write in a batch");
            assert_eq!(e.errno(), server_errno, "{}: {e}", A::NAME);
        } else {
            d.result.unwrap();
        }
    }
    assert!(client.connection().is_ready());
    assert_eq!(read(&mut client, 0, 4096), before);
    client.disconnect().unwrap();
}

fn nbdkit_read_only_eperm<A: Adapter>() {
    let server = NbdkitBuilder::memory(MIB).readonly().start();
    read_only_refuses_writes::<A>(&server, Errno::Perm);
}

/// qemu-nbd answers a write to a read-only export with EINVAL (and the
/// message "Export is read-only"), not EPERM; libnbd sees the same.
fn qemu_read_only_einval<A: Adapter>() {
    let server = QemuNbdBuilder::raw(MIB).read_only().shared(4).start();
    read_only_refuses_writes::<A>(&server, Errno::Inval);
}

/// nbdkit's error filter fails reads with EIO: only those commands fail,
/// writes in the same batch succeed, and the connection carries on.
fn nbdkit_error_filter_fails_only_the_command<A: Adapter>() {
    let builder = NbdkitBuilder::memory(MIB).filter("error");
    let inject = builder.dir().join("inject");
    let server = builder
        .param("error-pread", "EIO")
        .param("error-pread-rate", "100%")
        .param("error-pread-file", &inject)
        .start();
    let mut client: A = connect(&server);
    client
        .pwrite(Bytes::from(vec![5; 8192]), 0, CmdFlags::empty())
        .unwrap();
    assert_eq!(read(&mut client, 0, 8192), vec![5; 8192]);

    fs::write(&inject, b"").unwrap();
    assert_errno(
        client.pread(BytesMut::zeroed(4096), 0, CmdFlags::empty()),
        Errno::Io,
        "read with errors injected",
    );
    let mut cmds = Vec::new();
    for i in 0..8u64 {
        cmds.push(Cmd::read(i * 4096, 4096));
        cmds.push(Cmd::write(64 * KIB + i * 4096, vec![i as u8 + 1; 4096]));
    }
    let done = client.submit(cmds);
    assert_eq!(done.len(), 16);
    for d in done {
        if d.index % 2 == 0 {
            let e = d.result.expect_err("injected read error");
            assert_eq!(e.errno(), Errno::Io, "{}: {e}", A::NAME);
            assert!(
                matches!(e, nbd_proto::Error::Server { .. }),
                "{}: {e:?}",
                A::NAME
            );
        } else {
            d.result
                .unwrap_or_else(|e| panic!("{}: write {}: {e}", A::NAME, d.index));
        }
    }
    assert!(client.connection().is_ready());
    fs::remove_file(&inject).unwrap();
    for i in 0..8u64 {
        assert_eq!(
            read(&mut client, 64 * KIB + i * 4096, 4096),
            vec![i as u8 + 1; 4096]
        );
    }
    client.disconnect().unwrap();
}

/// Asserts the batch `done` (all issued before the server died) completed
/// each command exactly once; every failure is ENOTCONN; returns how many failed.
fn assert_failed_once_with_enotconn<A: Adapter>(
    done: &[Done],
    issued: usize,
    check: impl Fn(&Done),
) -> usize {
    assert_eq!(done.len(), issued, "{}", A::NAME);
    let indices: HashSet<usize> = done.iter().map(|d| d.index).collect();
    assert_eq!(
        indices.len(),
        issued,
        "{}: a command completed twice",
        A::NAME
    );
    let mut failed = 0;
    for d in done {
        match &d.result {
            Err(e) => {
                assert_eq!(
                    e.errno(),
                    Errno::NotConn,
                    "{}: command {}: {e}",
                    A::NAME,
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
fn assert_dead_after<A: Adapter>(client: &mut A) {
    assert_eq!(client.in_flight(), 0, "{}", A::NAME);
    let _ = client.step(Duration::from_millis(20));
    assert!(
        client.take_completion().is_none(),
        "{}: a completion after all had completed",
        A::NAME
    );
    let err = client
        .pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
        .expect_err("the connection is dead");
    assert_eq!(err.errno, Some(Errno::NotConn), "{}: {err}", A::NAME);
    assert!(!client.connection().is_ready());
}

/// nbdkit killed while reads wait in its delay filter: every pending command
/// fails exactly once with ENOTCONN, promptly.
fn nbdkit_killed_mid_flight<A: Adapter>() {
    let mut server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-read", "20")
        .start();
    let mut client: A = connect(&server);
    client
        .pwrite(Bytes::from(vec![3; 4096]), 0, CmdFlags::empty())
        .unwrap();
    let cmds: Vec<Cmd> = (0..10).map(|i| Cmd::read(i * 512, 512)).collect();
    let cookies = client.start(cmds);
    assert_eq!(client.in_flight(), 10);
    // Let the server take the requests in, then crash it.
    std::thread::sleep(Duration::from_millis(100));
    server.kill();
    // `collect` panics after WAIT_LIMIT: that bound, not a speed, is what
    // turns a hang into a failure.
    let done = client.collect(&cookies);
    let failed = assert_failed_once_with_enotconn::<A>(&done, 10, |d| {
        panic!("{}: read {} succeeded after the kill", A::NAME, d.index)
    });
    assert_eq!(failed, 10);
    assert_dead_after(&mut client);
}

/// qemu-nbd killed with 32 MiB of reads outstanding that the client has not
/// read yet: at most what fits in the socket can have been answered; every
/// command completes once, successes with the right data, the rest ENOTCONN.
fn qemu_killed_mid_flight<A: Adapter>() {
    let data = XorShift::new(77).bytes(8 * MIB as usize);
    let mut server = QemuNbdBuilder::from_bytes(ImageFormat::Raw, &data)
        .shared(4)
        .start();
    let mut client: A = connect(&server);
    let reads: Vec<(u64, usize)> = (0..32).map(|i| ((i % 8) * MIB, MIB as usize)).collect();
    let cookies = client.start(reads.iter().map(|&(o, l)| Cmd::read(o, l)).collect());
    server.kill();
    let done = client.collect(&cookies);
    let failed = assert_failed_once_with_enotconn::<A>(&done, reads.len(), |d| {
        let (offset, len) = reads[d.index];
        assert!(
            d.buffer.as_ref().unwrap()[..] == data[offset as usize..][..len],
            "{}: read {} succeeded with wrong data",
            A::NAME,
            d.index
        );
    });
    assert!(failed >= 16, "{}: only {failed} of 32 failed", A::NAME);
    assert_dead_after(&mut client);
}

// ------------------------------------------------------------------ the tests

/// One `#[test]` per adapter for each scenario: `blocking::NAME` and `mio::NAME`.
macro_rules! both {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod blocking {
            $( $(#[$attr])* #[test] fn $name() { super::$name::<nbd_blocking::Client>() } )*
        }
        mod mio {
            $( $(#[$attr])* #[test] fn $name() { super::$name::<nbd_tests::adapters::MioAdapter>() } )*
        }
    };
}

both!(
    nbdkit_handshake_facts,
    qemu_handshake_facts,
    nbdkit_memory_every_command,
    qemu_raw_every_command,
    qemu_qcow2_every_command,
    nbdkit_block_status,
    nbdkit_memory_random_io,
    qemu_raw_random_io,
    qemu_qcow2_random_io,
    nbdkit_pattern_reads_in_flight,
    nbdkit_eval_reads_complete_out_of_order,
    nbdkit_read_only_eperm,
    qemu_read_only_einval,
    nbdkit_error_filter_fails_only_the_command,
    nbdkit_killed_mid_flight,
    qemu_killed_mid_flight,
);
