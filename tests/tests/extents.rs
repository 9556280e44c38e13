//! Meta contexts, block status and extended headers against real servers,
//! through the library (`nbd-blocking`) and the command line (`nbd info
//! --map`, extent-aware `nbd copy`).
//!
//! * Extended headers: qemu-nbd 10 negotiates them (64-bit zero, trim and
//!   block status lengths work); nbdkit 1.32 does not, and everything still
//!   works over compact headers.
//! * Block status: extents of `base:allocation` from nbdkit (sparse file, data
//!   plugin, sh/eval plugins reporting extents the test chose) and qemu-nbd
//!   (qcow2), `qemu:allocation-depth` on an overlay, a
//!   `qemu:dirty-bitmap:NAME`, several contexts in one reply, `REQ_ONE`,
//!   context listing compared with `nbdinfo --json`, and `ENOTSUP` without a
//!   negotiated context.
//! * `nbd info --map[=CONTEXT] [--totals] [--json]` compared byte for byte
//!   with `nbdinfo` on the same servers.
//! * `nbd copy` skipping zero runs of a mostly empty 10 GiB image, keeping the
//!   destination sparse, with `--no-extents` and `--sparse 0` as controls.
//!
//! Extents are compared after clipping to the request and merging adjacent
//! runs of one status, since a server may split or join runs as it likes.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use nbd_blocking::{Client, Error};
use nbd_proto::{BlockStatus, CmdFlags, Config, Errno, Extent};
use nbd_tests::clients::run_checked;
use nbd_tests::testkit::{nbd_binary, run_nbd, Rng};
use nbd_tests::{
    nbdinfo, nbdinfo_json, qemu_img_compare, require_tool, ImageFormat, NbdkitBuilder,
    QemuNbdBuilder, ServerHandle,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

const BASE: &str = "base:allocation";
const DEPTH: &str = "qemu:allocation-depth";

/// `base:allocation` flags.
const DATA: u64 = 0;
const HOLE: u64 = 1;
const ZERO: u64 = 2;
const HOLE_ZERO: u64 = 3;

/// One run of bytes with one status: `(offset, length, flags)`.
type Run = (u64, u64, u64);

// ---------------------------------------------------------------- helpers

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A configuration asking for `contexts` (and, by default, extended headers).
fn config_with(contexts: &[&str]) -> Config {
    Config::default().meta_contexts(contexts.iter().copied())
}

fn connect(uri: &str, contexts: &[&str]) -> Client {
    Client::connect_uri_with(uri, config_with(contexts))
        .unwrap_or_else(|e| panic!("connect to {uri} asking for {contexts:?}: {e}"))
}

/// Appends `run` to `runs`, merging it into the last run when adjacent with
/// the same flags.
fn push_merged(runs: &mut Vec<Run>, run: Run) {
    if let Some(last) = runs.last_mut() {
        assert_eq!(
            last.0 + last.1,
            run.0,
            "runs must be contiguous: {last:?} then {run:?}"
        );
        if last.2 == run.2 {
            last.1 += run.1;
            return;
        }
    }
    runs.push(run);
}

/// Merges adjacent runs of the same flags.
fn merged(runs: &[Run]) -> Vec<Run> {
    let mut out = Vec::new();
    for &run in runs {
        push_merged(&mut out, run);
    }
    out
}

/// The extents of one report laid out from `offset`, clipped to
/// `offset..offset + count`, merged. Checks the report is well formed: no
/// empty extent, and at least one byte of the request described.
fn clip(extents: &[Extent], offset: u64, count: u64) -> Vec<Run> {
    assert!(!extents.is_empty(), "a block status report without extents");
    let end = offset + count;
    let mut at = offset;
    let mut runs = Vec::new();
    for e in extents {
        assert!(e.length > 0, "an extent of length 0 in {extents:?}");
        if at >= end {
            break;
        }
        let length = e.length.min(end - at);
        push_merged(&mut runs, (at, length, e.flags));
        at += length;
    }
    runs
}

/// The one report of `context` among `reports`.
fn report_of<'a>(reports: &'a [BlockStatus], context: &str) -> &'a BlockStatus {
    let mine: Vec<&BlockStatus> = reports.iter().filter(|r| r.context == context).collect();
    assert_eq!(
        mine.len(),
        1,
        "want exactly one report of {context}, got {reports:?}"
    );
    mine[0]
}

/// What a query of `count` bytes at `offset` should report, given the
/// export's runs: `runs` clipped to the request.
fn expected_runs(runs: &[Run], offset: u64, count: u64) -> Vec<Run> {
    let end = offset + count;
    let clipped: Vec<Run> = runs
        .iter()
        .filter(|&&(o, l, _)| o < end && offset < o + l)
        .map(|&(o, l, f)| {
            let start = o.max(offset);
            (start, (o + l).min(end) - start, f)
        })
        .collect();
    merged(&clipped)
}

/// One block status query of `count` bytes at `offset`: the runs of
/// `context`, clipped and merged. Checks the report's context id is the one
/// negotiated for that name.
fn status(client: &mut Client, context: &str, offset: u64, count: u64) -> Vec<Run> {
    let reports = client
        .block_status(count, offset, CmdFlags::empty())
        .unwrap_or_else(|e| panic!("block status of {count} at {offset}: {e}"));
    let report = report_of(&reports, context);
    let id = client
        .connection()
        .meta_contexts()
        .iter()
        .find(|(_, name)| name == context)
        .map(|(id, _)| *id);
    assert_eq!(
        Some(report.context_id),
        id,
        "context id of {context} in {report:?}"
    );
    clip(&report.extents, offset, count)
}

/// The runs of `context` over the whole export, walked with as many queries
/// as the server needs, merged.
fn whole_map(client: &mut Client, context: &str) -> Vec<Run> {
    let size = client.size().unwrap();
    let span = if client.connection().extended_headers_negotiated() {
        size
    } else {
        (1 << 32) - (1 << 16)
    };
    let mut runs = Vec::new();
    let mut offset = 0;
    while offset < size {
        let got = status(client, context, offset, (size - offset).min(span));
        for run in got {
            offset = run.0 + run.1;
            push_merged(&mut runs, run);
        }
    }
    runs
}

/// The flags of the run holding `offset`.
fn flags_at(runs: &[Run], offset: u64) -> u64 {
    runs.iter()
        .find(|r| r.0 <= offset && offset < r.0 + r.1)
        .unwrap_or_else(|| panic!("no run holds offset {offset}: {runs:?}"))
        .2
}

fn read(client: &mut Client, offset: u64, len: u64) -> Vec<u8> {
    client
        .pread(BytesMut::zeroed(len as usize), offset, CmdFlags::empty())
        .unwrap_or_else(|e| panic!("pread of {len} at {offset}: {e}"))
        .to_vec()
}

fn write(client: &mut Client, offset: u64, data: &[u8]) {
    client
        .pwrite(Bytes::copy_from_slice(data), offset, CmdFlags::empty())
        .unwrap_or_else(|e| panic!("pwrite of {} at {offset}: {e}", data.len()));
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

fn assert_errno<T: std::fmt::Debug>(result: Result<T, Error>, errno: Errno, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.errno(), Some(errno), "{what}: {err}");
}

/// Runs `qemu-img`/`qemu-io` with `args`, panicking on failure.
fn qemu_tool(tool: &str, args: &[&str]) {
    run_checked(Command::new(tool).args(args));
}

/// `qemu-io -f qcow2 -c CMD ... IMAGE`.
fn qemu_io(image: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    run_checked(cmd.arg(image));
}

/// `nbd ARGS` must succeed with nothing on stderr; returns stdout.
fn nbd_ok(args: &[&str]) -> Vec<u8> {
    let out = run_nbd(args);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "nbd {args:?} failed ({}):\n{}",
        out.status,
        text(&out.stderr)
    );
    out.stdout
}

/// The exit code of `nbd ARGS`.
fn nbd_code(args: &[&str]) -> i32 {
    let out = run_nbd(args);
    out.status
        .code()
        .unwrap_or_else(|| panic!("nbd {args:?} died: {}", out.status))
}

/// `nbd ARGS` with stdout and stderr captured in files, killed after `limit`;
/// returns its output and how long it ran.
fn nbd_timed(args: &[&str], limit: Duration) -> (Output, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let start = Instant::now();
    let mut child = Command::new(nbd_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "nbd {args:?} still runs after {limit:?}; stderr:\n{}",
                text(&fs::read(&err_path).unwrap())
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    let output = Output {
        status,
        stdout: fs::read(&out_path).unwrap(),
        stderr: fs::read(&err_path).unwrap(),
    };
    (output, took)
}

/// Bytes the file takes on disk, after syncing it.
fn allocated(path: &Path) -> u64 {
    File::open(path).unwrap().sync_all().unwrap();
    fs::metadata(path).unwrap().blocks() * 512
}

// ---------------------------------------------------------------- extended headers

/// qemu-nbd 10 negotiates extended headers. With them a zero, a trim and a
/// block status of more than 4 GiB are single requests: the whole range
/// comes back zero, up to the last byte (a length cut to 32 bits would
/// leave the far end untouched), and block status reports one extent
/// longer than 4 GiB.
#[test]
fn extended_headers_with_qemu_nbd() {
    const SIZE: u64 = 6 * GIB;
    let server = QemuNbdBuilder::qcow2(SIZE)
        .arg("--discard=unmap")
        .shared(4)
        .start();
    let mut client = connect(&server.uri(), &[BASE]);
    let c = client.connection();
    assert!(c.extended_headers_negotiated(), "qemu-nbd 10 offers them");
    assert!(
        c.structured_replies_negotiated(),
        "implied by extended headers"
    );
    assert!(c.can_meta_context(BASE));
    assert!(c.can_trim().unwrap() && c.can_zero().unwrap());
    assert_eq!(client.size().unwrap(), SIZE);

    // Data at both ends: the hole between is one extent of almost 6 GiB.
    let mut rng = Rng::new(11);
    let head = rng.bytes(MIB as usize);
    let middle = rng.bytes(64 * KIB as usize);
    let tail = rng.bytes(MIB as usize);
    write(&mut client, 0, &head);
    write(&mut client, SIZE - MIB, &tail);
    let raw = client.block_status(SIZE, 0, CmdFlags::empty()).unwrap();
    let extents = &report_of(&raw, BASE).extents;
    assert_eq!(
        *extents,
        [
            Extent {
                length: MIB,
                flags: DATA
            },
            Extent {
                length: SIZE - 2 * MIB,
                flags: HOLE_ZERO
            },
            Extent {
                length: MIB,
                flags: DATA
            },
        ],
        "one extent longer than 4 GiB"
    );
    let fill = |client: &mut Client| {
        write(client, 0, &head);
        write(client, 3 * GIB, &middle);
        write(client, SIZE - MIB, &tail);
        assert_eq!(read(client, 0, MIB), head);
        assert_eq!(read(client, 3 * GIB, 64 * KIB), middle);
        assert_eq!(read(client, SIZE - MIB, MIB), tail);
    };
    fill(&mut client);
    assert_eq!(
        whole_map(&mut client, BASE),
        [
            (0, MIB, DATA),
            (MIB, 3 * GIB - MIB, HOLE_ZERO),
            (3 * GIB, 64 * KIB, DATA),
            (3 * GIB + 64 * KIB, 3 * GIB - 64 * KIB - MIB, HOLE_ZERO),
            (SIZE - MIB, MIB, DATA),
        ]
    );

    // One zero request of 6 GiB - 1 MiB, from 512 KiB to 512 KiB before the end.
    let (start, count) = (512 * KIB, SIZE - MIB);
    assert!(count > 1 << 32);
    client.zero(count, start, CmdFlags::empty()).unwrap();
    let check_cleared = |client: &mut Client, what: &str| {
        let first = read(client, 0, MIB);
        assert_eq!(
            first[..512 * KIB as usize],
            head[..512 * KIB as usize],
            "{what}"
        );
        assert!(
            is_zero(&first[512 * KIB as usize..]),
            "{what}: start of the range"
        );
        assert!(is_zero(&read(client, 3 * GIB, 64 * KIB)), "{what}: middle");
        let last = read(client, SIZE - MIB, MIB);
        assert!(
            is_zero(&last[..512 * KIB as usize]),
            "{what}: end of the range"
        );
        assert_eq!(
            last[512 * KIB as usize..],
            tail[512 * KIB as usize..],
            "{what}"
        );
    };
    check_cleared(&mut client, "after a 6 GiB zero");
    // One query describes the whole export: data, zeroes, data.
    let check_map = |client: &mut Client, what: &str| {
        let runs = status(client, BASE, 0, SIZE);
        assert_eq!(runs[0], (0, start, DATA), "{what}: {runs:?}");
        let last = runs[runs.len() - 1];
        assert_eq!(
            last,
            (start + count, SIZE - start - count, DATA),
            "{what}: {runs:?}"
        );
        for run in &runs[1..runs.len() - 1] {
            assert_ne!(
                run.2 & ZERO,
                0,
                "{what}: zeroed range reads as zero: {runs:?}"
            );
        }
    };
    check_map(&mut client, "after a 6 GiB zero");

    // Same with one trim (qcow2 discards whole clusters: 512 KiB is aligned).
    fill(&mut client);
    client.trim(count, start, CmdFlags::empty()).unwrap();
    client.flush(CmdFlags::empty()).unwrap();
    check_cleared(&mut client, "after a 6 GiB trim");
    check_map(&mut client, "after a 6 GiB trim");

    // A second client without extended headers cannot send such a request.
    let config = config_with(&[BASE]).request_extended_headers(false);
    let mut compact = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert!(!compact.connection().extended_headers_negotiated());
    assert!(compact.connection().structured_replies_negotiated());
    assert_errno(
        compact.zero(count, start, CmdFlags::empty()),
        Errno::Range,
        "a 6 GiB zero over compact headers",
    );
    // Still usable, and block status walks the export in 32-bit pieces.
    assert!(is_zero(&read(&mut compact, 3 * GIB, 4096)));
    assert_eq!(
        flags_at(&whole_map(&mut compact, BASE), 5 * GIB) & ZERO,
        ZERO
    );
    compact.shutdown().unwrap();
    client.shutdown().unwrap();
}

/// nbdkit 1.32 predates extended headers: the client falls back to compact
/// headers with structured replies and every command still works; requests
/// over 32 bits are refused before anything is sent.
#[test]
fn extended_headers_absent_with_nbdkit() {
    let server = NbdkitBuilder::memory(6 * GIB).start();
    let mut client = connect(&server.uri(), &[BASE]);
    let c = client.connection();
    assert!(!c.extended_headers_negotiated());
    assert!(c.structured_replies_negotiated());
    assert!(c.can_meta_context(BASE));

    let data = Rng::new(5).bytes(256 * KIB as usize);
    write(&mut client, MIB, &data);
    write(&mut client, 5 * GIB, &data);
    assert_eq!(read(&mut client, MIB, 256 * KIB), data);
    // The memory plugin allocates in pages: check the status at offsets
    // well inside each run rather than the exact run boundaries.
    let map = whole_map(&mut client, BASE);
    assert_eq!(flags_at(&map, MIB), DATA);
    assert_eq!(flags_at(&map, 5 * GIB + 128 * KIB), DATA);
    assert_eq!(flags_at(&map, 0), HOLE_ZERO);
    assert_eq!(flags_at(&map, 3 * GIB), HOLE_ZERO);
    assert_eq!(flags_at(&map, 6 * GIB - 1), HOLE_ZERO);

    client.zero(64 * KIB, MIB, CmdFlags::empty()).unwrap();
    client
        .trim(64 * KIB, MIB + 64 * KIB, CmdFlags::empty())
        .unwrap();
    let got = read(&mut client, MIB, 256 * KIB);
    assert!(is_zero(&got[..128 * KIB as usize]));
    assert_eq!(got[128 * KIB as usize..], data[128 * KIB as usize..]);
    let runs = status(&mut client, BASE, MIB, 256 * KIB);
    assert_eq!(
        runs.iter().map(|r| r.2 & ZERO).collect::<Vec<_>>(),
        [ZERO, 0],
        "{runs:?}"
    );
    assert_eq!(runs[0].1, 128 * KIB, "{runs:?}");

    // 32-bit limits: refused locally, the connection unharmed.
    assert_errno(
        client.zero(5 * GIB, 0, CmdFlags::empty()),
        Errno::Range,
        "a 5 GiB zero over compact headers",
    );
    assert_errno(
        client.trim(5 * GIB, 0, CmdFlags::empty()),
        Errno::Range,
        "a 5 GiB trim over compact headers",
    );
    assert_eq!(read(&mut client, 5 * GIB, 256 * KIB), data);
    client.flush(CmdFlags::empty()).unwrap();
    client.shutdown().unwrap();
}

/// `nbd info --can extended-headers`: 0 with qemu-nbd, 2 with nbdkit 1.32.
#[test]
fn can_extended_headers_exit_codes() {
    let qemu = QemuNbdBuilder::raw(MIB).shared(2).start();
    assert_eq!(
        nbd_code(&["info", "--can", "extended-headers", &qemu.uri()]),
        0
    );
    let nbdkit = NbdkitBuilder::memory(MIB).start();
    assert_eq!(
        nbd_code(&["info", "--can", "extended-headers", &nbdkit.uri()]),
        2
    );
    // Structured replies are there in both.
    for uri in [qemu.uri(), nbdkit.uri()] {
        assert_eq!(nbd_code(&["info", "--can", "structured-reply", &uri]), 0);
    }
}

// ---------------------------------------------------------------- nbdkit extents

/// A 4 MiB sparse file with data at 1 MiB (64 KiB) and 3 MiB + 4 KiB
/// (8 KiB): the file plugin reports exactly those runs as data, the rest as
/// hole+zero.
fn sparse_file_server() -> ServerHandle {
    let builder = NbdkitBuilder::file_of_size(4 * MIB);
    let path = builder.dir().join("disk.img");
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0xAA; 64 * KIB as usize], MIB).unwrap();
    file.write_all_at(&[0x55; 8 * KIB as usize], 3 * MIB + 4 * KIB)
        .unwrap();
    file.sync_all().unwrap();
    builder.start()
}

const SPARSE_FILE_MAP: [Run; 5] = [
    (0, MIB, HOLE_ZERO),
    (MIB, 64 * KIB, DATA),
    (MIB + 64 * KIB, 2 * MIB - 60 * KIB, HOLE_ZERO),
    (3 * MIB + 4 * KIB, 8 * KIB, DATA),
    (3 * MIB + 12 * KIB, MIB - 12 * KIB, HOLE_ZERO),
];

#[test]
fn block_status_of_a_sparse_file() {
    let server = sparse_file_server();
    let mut client = connect(&server.uri(), &[BASE]);
    assert_eq!(
        client.connection().meta_contexts().len(),
        1,
        "{:?}",
        client.connection().meta_contexts()
    );
    assert_eq!(whole_map(&mut client, BASE), SPARSE_FILE_MAP);
    // A query from inside a run starts there and stops at the request's end.
    assert_eq!(
        status(&mut client, BASE, MIB + 4 * KIB, 2 * MIB + 4 * KIB),
        [
            (MIB + 4 * KIB, 60 * KIB, DATA),
            (MIB + 64 * KIB, 2 * MIB - 60 * KIB, HOLE_ZERO),
            (3 * MIB + 4 * KIB, 4 * KIB, DATA),
        ]
    );
    // The data is what was written; holes read as zero.
    assert_eq!(
        read(&mut client, MIB, 64 * KIB),
        vec![0xAA; 64 * KIB as usize]
    );
    assert!(is_zero(&read(&mut client, 0, MIB)));
    // Writing into a hole turns it into data.
    write(&mut client, 2 * MIB, &[1; 4096]);
    client.flush(CmdFlags::empty()).unwrap();
    let runs = status(&mut client, BASE, 2 * MIB - 4096, 3 * 4096);
    assert_eq!(
        runs,
        [
            (2 * MIB - 4096, 4096, HOLE_ZERO),
            (2 * MIB, 4096, DATA),
            (2 * MIB + 4096, 4096, HOLE_ZERO),
        ]
    );
    client.shutdown().unwrap();
}

/// The data plugin's sparse allocator: bytes placed with `@OFFSET` make
/// their pages data, the rest is hole+zero.
#[test]
fn block_status_of_the_data_plugin() {
    let server = NbdkitBuilder::data("1 2 3 @1048576 4 5 @3145728 6")
        .param("size", "4M")
        .start();
    let mut client = connect(&server.uri(), &[BASE]);
    let map = whole_map(&mut client, BASE);
    for (offset, flags) in [
        (0, DATA),
        (2, DATA),
        (512 * KIB, HOLE_ZERO),
        (MIB - 1, HOLE_ZERO),
        (MIB, DATA),
        (MIB + 1, DATA),
        (2 * MIB, HOLE_ZERO),
        (3 * MIB, DATA),
        (4 * MIB - 1, HOLE_ZERO),
    ] {
        assert_eq!(flags_at(&map, offset), flags, "at {offset}: {map:?}");
    }
    assert_eq!(map.iter().filter(|r| r.2 == DATA).count(), 3, "{map:?}");
    let data: u64 = map.iter().filter(|r| r.2 == DATA).map(|r| r.1).sum();
    assert!(data <= 3 * 64 * KIB, "pages of data only: {map:?}");
    assert_eq!(read(&mut client, MIB, 3), [4, 5, 0]);
    client.shutdown().unwrap();
}

/// The extents both chosen-extent plugins report for their 1 MiB disk.
const CHOSEN: [Run; 6] = [
    (0, 64 * KIB, DATA),
    (64 * KIB, 128 * KIB, HOLE_ZERO),
    (192 * KIB, 4 * KIB, ZERO),
    (196 * KIB, 60 * KIB, HOLE),
    (256 * KIB, 512 * KIB, DATA),
    (768 * KIB, 256 * KIB, HOLE_ZERO),
];

/// The eval plugin's `extents` method printing [`CHOSEN`].
fn chosen_eval_server() -> ServerHandle {
    NbdkitBuilder::eval()
        .method("get_size", "echo 1M")
        .method(
            "pread",
            "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        )
        .method("can_extents", "exit 0")
        .method(
            "extents",
            "printf '%s\\n' '0 64K' '64K 128K hole,zero' '192K 4K zero' '196K 60K hole' \
             '256K 512K 0' '768K 256K 3'",
        )
        .start()
}

/// The same extents from an sh plugin script, which also checks the
/// arguments it is called with and honours `req_one`.
const CHOSEN_SH: &str = r#"#!/bin/sh
case "$1" in
    get_size) echo 1048576 ;;
    pread) dd if=/dev/zero count="$3" iflag=count_bytes status=none ;;
    can_extents) exit 0 ;;
    extents)
        # extents <handle> <count> <offset> <flags>
        case "$4" in *[!0-9]*|'') echo "bad offset $4" >&2; exit 1 ;; esac
        cat <<'EOF'
0 65536 0
65536 131072 hole,zero
196608 4096 zero
200704 61440 hole
262144 524288
786432 262144 3
EOF
        ;;
    *) exit 2 ;;
esac
"#;

fn assert_chosen_extents(client: &mut Client) {
    assert_eq!(whole_map(client, BASE), CHOSEN);
    // A query inside the runs: clipped to the request.
    assert_eq!(
        status(client, BASE, 100 * KIB, 200 * KIB),
        [
            (100 * KIB, 92 * KIB, HOLE_ZERO),
            (192 * KIB, 4 * KIB, ZERO),
            (196 * KIB, 60 * KIB, HOLE),
            (256 * KIB, 44 * KIB, DATA),
        ]
    );
    // The last run, queried from its middle to the end of the export.
    assert_eq!(
        status(client, BASE, 900 * KIB, 124 * KIB),
        [(900 * KIB, 124 * KIB, HOLE_ZERO)]
    );
    // REQ_ONE: exactly one extent, starting at the offset, with its status.
    for (offset, count, flags) in [
        (0, MIB, DATA),
        (64 * KIB, 900 * KIB, HOLE_ZERO),
        (194 * KIB, 100 * KIB, ZERO),
        (200 * KIB, 4 * KIB, HOLE),
    ] {
        let reports = client
            .block_status(count, offset, CmdFlags::REQ_ONE)
            .unwrap();
        let report = report_of(&reports, BASE);
        assert_eq!(report.extents.len(), 1, "REQ_ONE at {offset}: {report:?}");
        assert_eq!(report.extents[0].flags, flags, "REQ_ONE at {offset}");
        let want_len = CHOSEN
            .iter()
            .find(|r| r.0 <= offset && offset < r.0 + r.1)
            .map(|r| r.0 + r.1 - offset)
            .unwrap()
            .min(count);
        assert_eq!(
            report.extents[0].length, want_len,
            "REQ_ONE at {offset}: {report:?}"
        );
    }
}

#[test]
fn block_status_of_chosen_extents_from_eval_and_sh_plugins() {
    let eval = chosen_eval_server();
    let mut client = connect(&eval.uri(), &[BASE]);
    assert_chosen_extents(&mut client);
    client.shutdown().unwrap();

    let sh = NbdkitBuilder::sh(CHOSEN_SH).start();
    let mut client = connect(&sh.uri(), &[BASE]);
    assert_chosen_extents(&mut client);
    // Many queries in flight at once, each answered for its own range
    // (none ending on an extent boundary: see
    // `block_status_ending_on_an_extent_boundary`).
    let queries: Vec<(u64, u64)> = (0..16)
        .map(|i| (i * 60 * KIB + 4 * KIB, 64 * KIB))
        .collect();
    let cookies: Vec<_> = queries
        .iter()
        .map(|&(offset, count)| {
            client
                .aio_block_status(count, offset, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    for (cookie, (offset, count)) in cookies.into_iter().zip(queries) {
        client.wait_for(cookie).unwrap().result.unwrap();
        let reports = client.take_block_status(cookie);
        let runs = clip(&report_of(&reports, BASE).extents, offset, count);
        let want = expected_runs(&CHOSEN, offset, count);
        assert_eq!(runs, want, "query of {count} at {offset}");
    }
    assert_eq!(client.in_flight(), 0);
    client.shutdown().unwrap();
}

/// nbdkit 1.32 passes on every extent a plugin reports from the request's
/// offset on: a query ending exactly where one of the sh plugin's extents
/// ends gets that extent *and the next one*, which lies wholly past the
/// request (`0 64K data`, `64K 128K hole,zero` for 64 KiB at 0). libnbd
/// (nbdinfo, nbdcopy) accepts such replies and ignores the extra extent; so
/// does this client: only the last extent may run past the request, and here
/// it is the last.
#[test]
fn block_status_ending_on_an_extent_boundary() {
    let sh = NbdkitBuilder::sh(CHOSEN_SH).start();
    let mut client = connect(&sh.uri(), &[BASE]);
    for (offset, count) in [(0, 64 * KIB), (100 * KIB, 92 * KIB), (192 * KIB, 64 * KIB)] {
        let want = expected_runs(&CHOSEN, offset, count);
        let reports = client
            .block_status(count, offset, CmdFlags::empty())
            .unwrap_or_else(|e| panic!("block status of {count} at {offset}: {e}"));
        let runs = clip(&report_of(&reports, BASE).extents, offset, count);
        assert_eq!(runs, want, "query of {count} at {offset}");
    }
    // The connection is still fine.
    assert!(is_zero(&read(&mut client, 0, 4096)));
    client.shutdown().unwrap();
}

/// The same server behaviour with `nbd copy`, which asks for extents 1 GiB at
/// a time: a source whose extent ends at 1 GiB (here a hole up to 1 GiB, then
/// 4 KiB of data) copies as `nbdcopy` copies it.
#[test]
fn copy_of_a_source_with_an_extent_ending_at_1g() {
    let server = NbdkitBuilder::eval()
        .method("get_size", "echo 2G")
        .method(
            "pread",
            "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        )
        .method("can_extents", "exit 0")
        .method(
            "extents",
            "printf '%s\\n' '0 1G 3' '1G 4K 0' '1073745920 1073737728 3'",
        )
        .start();
    let dir = tempfile::tempdir().unwrap();
    let by_nbdcopy = dir.path().join("nbdcopy.raw");
    nbd_tests::nbdcopy(server.uri(), &by_nbdcopy);
    let out = dir.path().join("out.raw");
    nbd_ok(&["copy", &server.uri(), out.to_str().unwrap()]);
    assert_eq!(fs::metadata(&out).unwrap().len(), 2 * GIB);
    assert!(allocated(&out) < MIB, "sparse output");
    assert!(qemu_img_compare(&out, &by_nbdcopy));
}

/// nbdkit's noextents filter: `base:allocation` is still offered, but the
/// whole disk is one data run.
#[test]
fn block_status_through_noextents_is_all_data() {
    let server = NbdkitBuilder::data("1 @1048576 2")
        .param("size", "4M")
        .filter("noextents")
        .start();
    let mut client = connect(&server.uri(), &[BASE]);
    assert_eq!(whole_map(&mut client, BASE), [(0, 4 * MIB, DATA)]);
    client.shutdown().unwrap();
}

// ---------------------------------------------------------------- qemu-nbd contexts

/// A 4 MiB qcow2 overlay over a backing file, with a dirty bitmap `bm0`
/// (64 KiB granularity) added after the first writes:
///
/// * backing: 0x11 at 0..64K, 0x22 at 1M..1M+128K;
/// * overlay: 0x33 at 32K..96K (clusters 0..128K local), zeroes written at
///   2M..2M+64K; then `bm0` added; then 0x44 at 3M..3M+64K (dirty).
fn overlay_builder() -> QemuNbdBuilder {
    let builder = QemuNbdBuilder::qcow2(4 * MIB);
    let top = builder.image_path().to_path_buf();
    let dir = top.parent().unwrap().to_path_buf();
    let base = dir.join("base.qcow2");
    let base_str = base.to_str().unwrap();
    let top_str = top.to_str().unwrap();
    qemu_tool("qemu-img", &["create", "-q", "-f", "qcow2", base_str, "4M"]);
    qemu_io(&base, &["write -P 0x11 0 64k", "write -P 0x22 1M 128k"]);
    qemu_tool(
        "qemu-img",
        &[
            "rebase", "-u", "-f", "qcow2", "-b", base_str, "-F", "qcow2", top_str,
        ],
    );
    qemu_io(&top, &["write -P 0x33 32k 64k", "write -z 2M 64k"]);
    qemu_tool(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", top_str, "bm0"],
    );
    qemu_io(&top, &["write -P 0x44 3M 64k"]);
    builder
}

const OVERLAY_ALLOCATION: [Run; 6] = [
    (0, 128 * KIB, DATA),
    (128 * KIB, 896 * KIB, HOLE_ZERO),
    (MIB, 128 * KIB, DATA),
    (MIB + 128 * KIB, 1920 * KIB, HOLE_ZERO),
    (3 * MIB, 64 * KIB, DATA),
    (3 * MIB + 64 * KIB, 960 * KIB, HOLE_ZERO),
];

const OVERLAY_DEPTH: [Run; 8] = [
    (0, 128 * KIB, 1),
    (128 * KIB, 896 * KIB, 0),
    (MIB, 128 * KIB, 2),
    (MIB + 128 * KIB, 896 * KIB, 0),
    (2 * MIB, 64 * KIB, 1),
    (2 * MIB + 64 * KIB, 960 * KIB, 0),
    (3 * MIB, 64 * KIB, 1),
    (3 * MIB + 64 * KIB, 960 * KIB, 0),
];

const OVERLAY_BITMAP: [Run; 3] = [
    (0, 3 * MIB, 0),
    (3 * MIB, 64 * KIB, 1),
    (3 * MIB + 64 * KIB, 960 * KIB, 0),
];

const BITMAP: &str = "qemu:dirty-bitmap:bm0";

#[test]
fn block_status_of_a_qcow2_image() {
    let mut data = vec![0u8; 4 * MIB as usize];
    let mut rng = Rng::new(3);
    let chunk = rng.bytes(100 * KIB as usize);
    data[1_000_000..1_000_000 + chunk.len()].copy_from_slice(&chunk);
    data[4 * MIB as usize - 10..].fill(9);
    let server = QemuNbdBuilder::from_bytes(ImageFormat::Qcow2, &data)
        .shared(2)
        .start();
    let mut client = connect(&server.uri(), &[BASE]);
    assert!(client.connection().extended_headers_negotiated());
    // qemu-img convert skips zero clusters: data in the 64 KiB clusters
    // touched by the bytes only.
    let first = 1_000_000 / (64 * KIB) * 64 * KIB;
    let last = (1_000_000 + 100 * KIB).div_ceil(64 * KIB) * 64 * KIB;
    assert_eq!(
        whole_map(&mut client, BASE),
        [
            (0, first, HOLE_ZERO),
            (first, last - first, DATA),
            (last, 4 * MIB - 64 * KIB - last, HOLE_ZERO),
            (4 * MIB - 64 * KIB, 64 * KIB, DATA),
        ]
    );
    // Writes and zeroes change the map.
    write(&mut client, 0, &[7; 4096]);
    client.zero(last - first, first, CmdFlags::empty()).unwrap();
    let runs = whole_map(&mut client, BASE);
    assert_eq!(runs[0], (0, 64 * KIB, DATA), "{runs:?}");
    assert_ne!(flags_at(&runs, first) & ZERO, 0, "{runs:?}");
    assert_eq!(flags_at(&runs, 4 * MIB - 1), DATA, "{runs:?}");
    client.shutdown().unwrap();
}

#[test]
fn allocation_depth_of_an_overlay() {
    let server = overlay_builder().arg("-A").shared(2).start();
    let mut client = connect(&server.uri(), &[DEPTH]);
    assert!(client.connection().can_meta_context(DEPTH));
    assert!(!client.connection().can_meta_context(BASE));
    assert_eq!(whole_map(&mut client, DEPTH), OVERLAY_DEPTH);
    // The bytes behind those depths.
    assert_eq!(read(&mut client, 0, 4), [0x11; 4]);
    assert_eq!(read(&mut client, 32 * KIB, 4), [0x33; 4]);
    assert_eq!(read(&mut client, MIB, 4), [0x22; 4]);
    // Writing over a backing run makes it local.
    write(&mut client, MIB, &[1; 512]);
    assert_eq!(
        status(&mut client, DEPTH, MIB - 64 * KIB, 256 * KIB),
        [
            (MIB - 64 * KIB, 64 * KIB, 0),
            (MIB, 64 * KIB, 1),
            (MIB + 64 * KIB, 64 * KIB, 2),
            (MIB + 128 * KIB, 64 * KIB, 0),
        ]
    );
    client.shutdown().unwrap();
}

#[test]
fn dirty_bitmap_runs() {
    let server = overlay_builder().arg("-B").arg("bm0").shared(2).start();
    let mut client = connect(&server.uri(), &[BITMAP]);
    assert_eq!(
        client.connection().meta_contexts().len(),
        1,
        "{:?}",
        client.connection().meta_contexts()
    );
    assert_eq!(whole_map(&mut client, BITMAP), OVERLAY_BITMAP);
    // REQ_ONE on the dirty run.
    let reports = client
        .block_status(512 * KIB, 3 * MIB + 4096, CmdFlags::REQ_ONE)
        .unwrap();
    assert_eq!(
        report_of(&reports, BITMAP).extents,
        [Extent {
            length: 60 * KIB,
            flags: 1
        }]
    );
    // The bitmap is live: a write through NBD dirties its 64 KiB granule.
    write(&mut client, MIB + 4 * KIB, &[9; 100]);
    client.flush(CmdFlags::empty()).unwrap();
    assert_eq!(
        whole_map(&mut client, BITMAP),
        [
            (0, MIB, 0),
            (MIB, 64 * KIB, 1),
            (MIB + 64 * KIB, 2 * MIB - 64 * KIB, 0),
            (3 * MIB, 64 * KIB, 1),
            (3 * MIB + 64 * KIB, 960 * KIB, 0),
        ]
    );
    client.shutdown().unwrap();
}

/// All three contexts in one connection: each block status reply carries
/// one report per context, named, with the id negotiated for it.
#[test]
fn several_contexts_in_one_reply() {
    let server = overlay_builder()
        .arg("-A")
        .arg("-B")
        .arg("bm0")
        .shared(2)
        .start();
    let wanted = [BASE, DEPTH, BITMAP];
    let mut client = connect(&server.uri(), &wanted);
    let negotiated = client.connection().meta_contexts().to_vec();
    let mut names: Vec<&str> = negotiated.iter().map(|(_, n)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, wanted, "{negotiated:?}");
    let mut ids: Vec<u32> = negotiated.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct ids: {negotiated:?}");

    let size = 4 * MIB;
    let reports = client.block_status(size, 0, CmdFlags::empty()).unwrap();
    assert_eq!(reports.len(), 3, "{reports:?}");
    for report in &reports {
        let id = negotiated
            .iter()
            .find(|(_, n)| *n == report.context)
            .map(|(id, _)| *id);
        assert_eq!(Some(report.context_id), id, "{report:?}");
    }
    for (context, want) in [
        (BASE, &OVERLAY_ALLOCATION[..]),
        (DEPTH, &OVERLAY_DEPTH[..]),
        (BITMAP, &OVERLAY_BITMAP[..]),
    ] {
        // One query may stop early; the walk covers the rest.
        let first = clip(&report_of(&reports, context).extents, 0, size);
        assert_eq!(
            first[..first.len() - 1],
            want[..first.len() - 1],
            "{context}"
        );
        assert_eq!(whole_map(&mut client, context), want, "{context}");
    }
    // With REQ_ONE every context still reports, each with one extent.
    let reports = client
        .block_status(2 * MIB, 2 * MIB, CmdFlags::REQ_ONE)
        .unwrap();
    assert_eq!(reports.len(), 3);
    for r in &reports {
        assert_eq!(r.extents.len(), 1, "{r:?}");
    }
    assert_eq!(report_of(&reports, DEPTH).extents[0].flags, 1);
    assert_eq!(report_of(&reports, BITMAP).extents[0].flags, 0);
    assert_ne!(report_of(&reports, BASE).extents[0].flags & ZERO, 0);

    // Asking for a context the server lacks drops only that one.
    let mut partial = connect(&server.uri(), &[BASE, "qemu:dirty-bitmap:nope"]);
    assert_eq!(
        partial
            .connection()
            .meta_contexts()
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>(),
        [BASE]
    );
    assert_eq!(whole_map(&mut partial, BASE), OVERLAY_ALLOCATION);
    partial.shutdown().unwrap();
    client.shutdown().unwrap();
}

/// The `"contexts"` list of `nbdinfo --json`.
fn nbdinfo_contexts(uri: &str) -> Vec<String> {
    let json: Value = serde_json::from_str(&nbdinfo_json(uri)).unwrap();
    json["exports"][0]["contexts"]
        .as_array()
        .unwrap_or_else(|| panic!("nbdinfo --json {uri} has no contexts: {json}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

fn opt_client(uri: &str) -> Client {
    let config = Config::default().opt_mode(true);
    let client = Client::connect_uri_with(uri, config).unwrap();
    assert!(client.connection().is_negotiating());
    client
}

/// `opt_list_meta_context` lists what nbdinfo lists; a query narrows the
/// list; `opt_set_meta_context` selects contexts for the following `opt_go`.
#[test]
fn listed_contexts_match_nbdinfo() {
    let qemu = overlay_builder()
        .arg("-A")
        .arg("-B")
        .arg("bm0")
        .shared(2)
        .start();
    let nbdkit = NbdkitBuilder::memory(MIB).start();
    for (server, want) in [(&qemu, vec![BASE, DEPTH, BITMAP]), (&nbdkit, vec![BASE])] {
        let uri = server.uri();
        let theirs = nbdinfo_contexts(&uri);
        let mut client = opt_client(&uri);
        let ours = client.opt_list_meta_context(&[]).unwrap();
        assert_eq!(ours, theirs, "{uri}");
        let mut sorted = ours.clone();
        sorted.sort();
        assert_eq!(sorted, want, "{uri}");
        client.opt_abort().unwrap();
    }

    let mut client = opt_client(&qemu.uri());
    let qemu_only = client
        .opt_list_meta_context(&["qemu:".to_string()])
        .unwrap();
    let mut qemu_only_sorted = qemu_only.clone();
    qemu_only_sorted.sort();
    assert_eq!(qemu_only_sorted, [DEPTH, BITMAP]);
    assert_eq!(
        client
            .opt_list_meta_context(&["x-none:thing".to_string()])
            .unwrap(),
        Vec::<String>::new()
    );
    let selected = client
        .opt_set_meta_context(&[BITMAP.to_string(), "x-none:thing".to_string()])
        .unwrap();
    assert_eq!(selected.len(), 1, "{selected:?}");
    assert_eq!(selected[0].1, BITMAP);
    client.opt_go().unwrap();
    assert!(client.connection().is_ready());
    assert!(
        client.connection().can_meta_context(BITMAP),
        "selected before GO"
    );
    assert_eq!(whole_map(&mut client, BITMAP), OVERLAY_BITMAP);
    client.shutdown().unwrap();
}

/// Without a negotiated context, block status fails with `ENOTSUP` and
/// nothing breaks: no context asked for, an unknown one asked for, or no
/// structured replies at all.
#[test]
fn block_status_without_a_context_is_enotsup() {
    let nbdkit = NbdkitBuilder::memory(MIB).start();
    let qemu = QemuNbdBuilder::qcow2(MIB).shared(2).start();
    let no_sr = NbdkitBuilder::memory(MIB).no_sr().start();
    for (uri, contexts) in [
        (nbdkit.uri(), &[][..]),
        (nbdkit.uri(), &["x-unknown:ctx"][..]),
        (qemu.uri(), &[][..]),
        (qemu.uri(), &["qemu:dirty-bitmap:missing"][..]),
        (no_sr.uri(), &[BASE][..]),
    ] {
        let mut client = connect(&uri, contexts);
        assert!(
            client.connection().meta_contexts().is_empty(),
            "{uri} {contexts:?}"
        );
        assert!(!client.connection().can_meta_context(BASE));
        assert_errno(
            client.block_status(4096, 0, CmdFlags::empty()),
            Errno::NotSup,
            &format!("block status on {uri} with {contexts:?}"),
        );
        // The connection is fine.
        assert!(is_zero(&read(&mut client, 0, 4096)));
        client.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------- nbd info --map

/// `nbd info MAP [--totals] [--json] URI` equals `nbdinfo` with the same
/// flags, byte for byte, in all four forms; returns our `--map` text.
fn assert_map_matches_nbdinfo(uri: &str, map: &str) -> String {
    let mut plain = String::new();
    for extra in [&[][..], &["--totals"], &["--json"], &["--totals", "--json"]] {
        let mut args = vec!["info", map];
        args.extend_from_slice(extra);
        args.push(uri);
        let ours = text(&nbd_ok(&args));
        let theirs = nbdinfo(&args[1..]);
        assert_eq!(ours, theirs, "nbd {args:?} differs from nbdinfo");
        assert!(!ours.is_empty(), "nbd {args:?} printed nothing");
        if extra.contains(&"--json") {
            let parsed: Value = serde_json::from_str(&ours)
                .unwrap_or_else(|e| panic!("nbd {args:?}: invalid JSON ({e}):\n{ours}"));
            assert!(parsed.as_array().is_some_and(|a| !a.is_empty()), "{ours}");
        }
        if extra.is_empty() {
            plain = ours;
        }
    }
    plain
}

/// The `--map` text lines as runs: offset, length, type.
fn parse_map(map: &str) -> Vec<Run> {
    map.lines()
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .take(3)
                .map(|f| f.parse().unwrap())
                .collect();
            (fields[0], fields[1], fields[2])
        })
        .collect()
}

#[test]
fn map_matches_nbdinfo_on_nbdkit() {
    let file = sparse_file_server();
    let map = assert_map_matches_nbdinfo(&file.uri(), "--map");
    assert_eq!(parse_map(&map), SPARSE_FILE_MAP);
    assert!(
        map.contains("  data\n") && map.contains("  hole,zero\n"),
        "{map}"
    );

    let data = NbdkitBuilder::data("1 @1048576 2 @3145728 3")
        .param("size", "4M")
        .start();
    let map = assert_map_matches_nbdinfo(&data.uri(), "--map");
    assert_eq!(parse_map(&map).len(), 6, "{map}");

    let eval = chosen_eval_server();
    let map = assert_map_matches_nbdinfo(&eval.uri(), "--map");
    assert_eq!(parse_map(&map), CHOSEN);
    let sh = NbdkitBuilder::sh(CHOSEN_SH).start();
    assert_eq!(assert_map_matches_nbdinfo(&sh.uri(), "--map"), map);
    // The totals, as nbdinfo rounds them (6.25% prints as 6.2%).
    let totals = text(&nbd_ok(&["info", "--map", "--totals", &eval.uri()]));
    assert_eq!(
        totals,
        "    589824  56.2%   0 data\n     61440   5.9%   1 hole\n      4096   0.4%   2 zero\n    \
         393216  37.5%   3 hole,zero\n"
    );
}

#[test]
fn map_matches_nbdinfo_on_qemu_nbd() {
    let server = overlay_builder()
        .arg("-A")
        .arg("-B")
        .arg("bm0")
        .shared(4)
        .start();
    let uri = server.uri();
    let map = assert_map_matches_nbdinfo(&uri, "--map");
    assert_eq!(parse_map(&map), OVERLAY_ALLOCATION);
    let explicit = assert_map_matches_nbdinfo(&uri, "--map=base:allocation");
    assert_eq!(explicit, map);
    let depth = assert_map_matches_nbdinfo(&uri, &format!("--map={DEPTH}"));
    assert_eq!(parse_map(&depth), OVERLAY_DEPTH);
    assert!(depth.contains("  backing depth 2\n"), "{depth}");
    assert!(
        depth.contains("  local\n") && depth.contains("  absent\n"),
        "{depth}"
    );
    let bitmap = assert_map_matches_nbdinfo(&uri, &format!("--map={BITMAP}"));
    assert_eq!(parse_map(&bitmap), OVERLAY_BITMAP);
    assert!(
        bitmap.contains("  dirty\n") && bitmap.contains("  clean\n"),
        "{bitmap}"
    );

    // A plain qcow2 image with data spread over it.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("plain.qcow2");
    nbd_tests::create_image(&image, ImageFormat::Qcow2, 64 * MIB);
    qemu_io(
        &image,
        &[
            "write -P 1 0 4k",
            "write -P 2 10M 1M",
            "write -z 20M 64k",
            "write -P 3 63M 1M",
        ],
    );
    let plain = QemuNbdBuilder::existing(&image, ImageFormat::Qcow2)
        .shared(4)
        .start();
    let map = assert_map_matches_nbdinfo(&plain.uri(), "--map");
    assert_eq!(parse_map(&map)[0], (0, 64 * KIB, DATA), "{map}");
}

#[test]
fn map_of_a_missing_context_fails_naming_it() {
    let nbdkit = NbdkitBuilder::memory(MIB).start();
    let qemu = QemuNbdBuilder::qcow2(MIB).shared(2).start();
    for (uri, context) in [
        (nbdkit.uri(), "qemu:allocation-depth"),
        (qemu.uri(), "qemu:dirty-bitmap:nosuch"),
        (qemu.uri(), "x-made-up:context"),
    ] {
        let map = format!("--map={context}");
        let out = run_nbd(["info", &map, &uri]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
        let stderr = text(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(lines[0].starts_with("nbd: "), "{stderr}");
        assert!(lines[0].contains(context), "names {context}: {stderr}");
        // nbdinfo fails too.
        let theirs = Command::new("nbdinfo")
            .args([&map, &uri])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(theirs.status.code(), Some(1));
    }
}

// ---------------------------------------------------------------- nbd copy

/// A mostly empty 10 GiB qcow2 image with a few writes spread over it;
/// returns the image and the writes `(offset, byte, len)`.
fn mostly_empty_image(dir: &Path) -> (PathBuf, Vec<(u64, u8, u64)>) {
    require_tool("qemu-io");
    let image = dir.join("big.qcow2");
    nbd_tests::create_image(&image, ImageFormat::Qcow2, 10 * GIB);
    let writes = vec![
        (0, 0x11, MIB),
        (3 * GIB + 12345, 0x22, 100_000),
        (7 * GIB, 0x33, 64 * KIB),
        (9 * GIB + 4096, 0x44, 4096),
        (10 * GIB - MIB, 0x55, MIB),
    ];
    let commands: Vec<String> = writes
        .iter()
        .map(|(offset, byte, len)| format!("write -P {byte:#x} {offset} {len}"))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&image, &commands);
    (image, writes)
}

/// Checks the bytes around each write, read with `read_at(offset, len)`.
fn check_writes(writes: &[(u64, u8, u64)], mut read_at: impl FnMut(u64, u64) -> Vec<u8>) {
    for &(offset, byte, len) in writes {
        let before = offset.saturating_sub(4096);
        let after = (offset + len + 4096).min(10 * GIB);
        let got = read_at(before, after - before);
        for (i, b) in got.iter().enumerate() {
            let at = before + i as u64;
            let want = if (offset..offset + len).contains(&at) {
                byte
            } else {
                0
            };
            assert_eq!(*b, want, "byte at {at}");
        }
    }
}

#[test]
fn copy_of_a_mostly_empty_10g_image_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (image, writes) = mostly_empty_image(dir.path());
    let source = QemuNbdBuilder::existing(&image, ImageFormat::Qcow2)
        .read_only()
        .shared(2)
        .start();
    let out = dir.path().join("out.raw");
    let (output, took) = nbd_timed(
        &["copy", &source.uri(), out.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "nbd copy failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(fs::metadata(&out).unwrap().len(), 10 * GIB);
    let used = allocated(&out);
    assert!(used < 32 * MIB, "the output should be sparse: {used} bytes");
    assert!(used >= 2 * MIB, "the data is there: {used} bytes");
    let file = File::open(&out).unwrap();
    check_writes(&writes, |offset, len| {
        let mut buf = vec![0; len as usize];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    });
    assert!(qemu_img_compare(&out, &image), "qemu-img compare");
}

#[test]
fn copy_of_a_mostly_empty_10g_image_to_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let (image, writes) = mostly_empty_image(dir.path());
    let source = QemuNbdBuilder::existing(&image, ImageFormat::Qcow2)
        .read_only()
        .shared(2)
        .start();
    // Prefill the destination with garbage where the source has holes, so
    // the zero runs must really be written.
    let dst_builder = QemuNbdBuilder::raw(10 * GIB)
        .arg("--discard=unmap")
        .shared(4);
    {
        let raw = File::options()
            .write(true)
            .open(dst_builder.image_path())
            .unwrap();
        for offset in [MIB, 5 * GIB, 9 * GIB + 8192] {
            raw.write_all_at(&[0xEE; 8192], offset).unwrap();
        }
    }
    let destination = dst_builder.start();
    let (output, took) = nbd_timed(
        &["copy", &source.uri(), &destination.uri()],
        Duration::from_secs(60),
    );
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "nbd copy failed ({}): {}",
        output.status,
        text(&output.stderr)
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let mut client = Client::connect_uri(&destination.uri()).unwrap();
    assert_eq!(client.size().unwrap(), 10 * GIB);
    check_writes(&writes, |offset, len| read(&mut client, offset, len));
    for offset in [MIB, 5 * GIB, 9 * GIB + 8192] {
        assert!(
            is_zero(&read(&mut client, offset, 8192)),
            "garbage at {offset}"
        );
    }
    client.shutdown().unwrap();
    assert!(
        qemu_img_compare(destination.uri(), &image),
        "qemu-img compare"
    );
}

/// A 64 MiB data-plugin disk with bytes at a few offsets, behind nbdkit's
/// stats filter so the test can see what the copy read.
fn stats_server() -> (ServerHandle, Vec<u8>, PathBuf) {
    let builder = NbdkitBuilder::data("1 2 3 @1048576 4 5 6 @33554432 0xff @67108863 7")
        .param("size", "64M")
        .filter("stats");
    let stats = builder.dir().join("stats.txt");
    let server = builder.param("statsfile", &stats).start();
    let mut model = vec![0u8; 64 * MIB as usize];
    model[..3].copy_from_slice(&[1, 2, 3]);
    model[MIB as usize..MIB as usize + 3].copy_from_slice(&[4, 5, 6]);
    model[32 * MIB as usize] = 0xff;
    model[64 * MIB as usize - 1] = 7;
    (server, model, stats)
}

/// Bytes read according to the stats filter's `read:` line (0 if none).
fn stats_read_bytes(stats: &str) -> u64 {
    let Some(line) = stats.lines().find(|l| l.starts_with("read:")) else {
        return 0;
    };
    // "read: 256 ops, 0.002048 s, 64.00 MiB, ..."
    let field = line.split(", ").nth(2).unwrap();
    let (number, unit) = field.split_once(' ').unwrap();
    let number: f64 = number.parse().unwrap();
    let scale = match unit {
        "bytes" => 1.0,
        "KiB" => KIB as f64,
        "MiB" => MIB as f64,
        "GiB" => GIB as f64,
        other => panic!("unit {other} in {line}"),
    };
    (number * scale) as u64
}

/// With extents the copy reads only the data pages; `--no-extents` reads all
/// 64 MiB. Both give the same bytes.
#[test]
fn copy_with_and_without_extents() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, reads_all) in [(&[][..], false), (&["--no-extents"][..], true)] {
        let (mut server, model, stats) = stats_server();
        let out = dir.path().join("out.raw");
        let mut args = vec!["copy"];
        args.extend_from_slice(flags);
        let uri = server.uri();
        args.extend([uri.as_str(), out.to_str().unwrap()]);
        nbd_ok(&args);
        assert!(
            fs::read(&out).unwrap() == model,
            "nbd {args:?}: wrong bytes"
        );
        server.stop();
        let stats = fs::read_to_string(&stats).unwrap();
        let read = stats_read_bytes(&stats);
        if reads_all {
            assert_eq!(read, 64 * MIB, "{stats}");
            assert!(!stats.contains("extents:"), "{stats}");
        } else {
            assert!(read > 0 && read <= MIB, "{stats}");
            assert!(stats.contains("extents:"), "{stats}");
        }
    }
}

/// A fully allocated source whose data holds runs of zeroes: block status
/// says all data, so only `--sparse` (default 4096) keeps the zero blocks
/// out of the destination file; `--sparse 0` writes them. Same bytes.
#[test]
fn copy_sparse_detection_inside_data() {
    let len = 8 * MIB as usize;
    let mut model = Rng::new(21).bytes(len);
    for (at, n) in [
        (MIB as usize, 256 * KIB as usize),
        (3 * MIB as usize + 100, 10_000),
        (5 * MIB as usize, 4096),
        (len - 64 * KIB as usize, 64 * KIB as usize),
    ] {
        model[at..at + n].fill(0);
    }
    let source = NbdkitBuilder::bytes(&model).readonly().start();
    let mut client = connect(&source.uri(), &[BASE]);
    assert_eq!(whole_map(&mut client, BASE), [(0, len as u64, DATA)]);
    client.shutdown().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let default_out = dir.path().join("default.raw");
    let dense_out = dir.path().join("dense.raw");
    nbd_ok(&["copy", &source.uri(), default_out.to_str().unwrap()]);
    nbd_ok(&[
        "copy",
        "--sparse",
        "0",
        &source.uri(),
        dense_out.to_str().unwrap(),
    ]);
    assert!(fs::read(&default_out).unwrap() == model, "default copy");
    assert!(fs::read(&dense_out).unwrap() == model, "--sparse 0 copy");
    let (sparse_used, dense_used) = (allocated(&default_out), allocated(&dense_out));
    // Whole 4 KiB blocks of zeroes: 256K + 4K + 4K + 64K at least.
    assert!(
        sparse_used <= len as u64 - 320 * KIB,
        "default copy allocates {sparse_used}"
    );
    assert!(
        dense_used >= len as u64,
        "--sparse 0 allocates {dense_used}"
    );
    // The same, to a destination export: identical bytes either way.
    for flags in [&[][..], &["--sparse", "0"][..]] {
        let dst = NbdkitBuilder::memory(len).start();
        let mut args = vec!["copy"];
        args.extend_from_slice(flags);
        let (src_uri, dst_uri) = (source.uri(), dst.uri());
        args.extend([src_uri.as_str(), dst_uri.as_str()]);
        nbd_ok(&args);
        let mut client = Client::connect_uri(&dst_uri).unwrap();
        assert!(read(&mut client, 0, len as u64) == model, "nbd {args:?}");
        client.shutdown().unwrap();
    }
}

/// To standard output, zero runs come out as zero bytes, in order.
#[test]
fn copy_of_a_sparse_source_to_stdout() {
    let (server, model, _stats) = stats_server();
    let (output, took) = nbd_timed(&["copy", &server.uri(), "-"], Duration::from_secs(60));
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}",
        text(&output.stderr)
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(output.stdout.len(), model.len());
    assert!(output.stdout == model, "wrong bytes on stdout");

    // A qcow2 source with backing-file holes, whole, likewise.
    let overlay = overlay_builder().shared(2).start();
    let stdout = nbd_ok(&["copy", &overlay.uri(), "-"]);
    let mut client = Client::connect_uri(&overlay.uri()).unwrap();
    let want = read(&mut client, 0, 4 * MIB);
    client.shutdown().unwrap();
    assert_eq!(stdout.len(), want.len());
    assert!(stdout == want, "overlay to stdout");
    assert_eq!(stdout[MIB as usize], 0x22);
    assert_eq!(stdout[3 * MIB as usize], 0x44);
    assert!(is_zero(&stdout[2 * MIB as usize..3 * MIB as usize]));
}
