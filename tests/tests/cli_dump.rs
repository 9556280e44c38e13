//! `nbd dump` against libnbd's `nbddump` on the same servers: the same text,
//! byte for byte, on full exports (every line different) and sparse ones
//! (long runs of zeroes squashed to one `*`), with and without colour, and
//! with `-n`; the windows `-o`/`-n` select; and the zero runs the server's
//! `base:allocation` reports are skipped rather than read.

use std::process::{Command, Output};

use nbd_tests::testkit::{pattern_bytes, run_nbd, Rng};
use nbd_tests::{require_tool, ImageFormat, NbdkitBuilder, QemuNbdBuilder};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nbd dump ARGS URI`, which must succeed silently on stderr.
fn nbd_dump(args: &[&str], uri: &str) -> String {
    let out = run_nbd(["dump"].iter().chain(args).chain([&uri]));
    assert!(
        out.status.success(),
        "nbd dump {args:?}: {}",
        text(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// `nbddump ARGS URI`.
fn nbddump(args: &[&str], uri: &str) -> String {
    let out = Command::new(require_tool("nbddump"))
        .args(args)
        .arg(uri)
        .output()
        .expect("nbddump runs");
    assert!(
        out.status.success(),
        "nbddump {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn assert_same_dump(args: &[&str], uri: &str, what: &str) -> String {
    let ours = nbd_dump(args, uri);
    let theirs = nbddump(args, uri);
    assert!(
        ours == theirs,
        "{what} {args:?}\n--- nbd dump:\n{}\n--- nbddump:\n{}",
        head(&ours),
        head(&theirs)
    );
    ours
}

/// The first lines of a dump, for failure messages.
fn head(dump: &str) -> String {
    dump.lines().take(40).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_full_export_dumps_as_nbddump_dumps_it() {
    let data = Rng::new(14).bytes(300 * KIB as usize);
    let random = NbdkitBuilder::bytes(&data).readonly().start();
    let pattern = NbdkitBuilder::pattern(100_003).start();
    for (server, what) in [(&random, "random bytes"), (&pattern, "pattern")] {
        let uri = server.uri();
        let whole = assert_same_dump(&[], &uri, what);
        assert!(
            !whole.lines().any(|l| l == "*"),
            "no two lines repeat in {what}"
        );
        assert!(!whole.contains('\x1b'), "no colour when piped");
        for args in [
            &["--color"][..],
            &["--colour"][..],
            &["--no-color"][..],
            &["-n", "1"][..],
            &["-n", "100", "--color"][..],
            &["--length=4097"][..],
            &["-n", "100000000"][..],
        ] {
            assert_same_dump(args, &uri, what);
        }
    }
    // The short last line of an export whose size is no multiple of 16.
    let whole = nbd_dump(&[], &pattern.uri());
    assert!(
        whole.ends_with(
            "00000186a0: 00 00 00                                         |...             |\n"
        ),
        "{}",
        &whole[whole.len() - 200..]
    );
}

#[test]
fn a_sparse_export_dumps_as_nbddump_dumps_it_without_reading_the_zeroes() {
    // A mostly empty 1 GiB export with a little data in three places.
    let nbdkit = NbdkitBuilder::data("\"hello, world!\" @0x4000000 1 2 3 @0x3ffffff0 0xff")
        .param("size", "1G")
        .start();
    // A qcow2 image with two written clusters, served by qemu-nbd.
    let mut image = vec![0u8; 8 * MIB as usize];
    image[70_000..70_010].copy_from_slice(b"qcow2 data");
    image[5 * MIB as usize..5 * MIB as usize + 4096].fill(0xa5);
    let qemu = QemuNbdBuilder::from_bytes(ImageFormat::Qcow2, &image)
        .read_only()
        .start();
    for (server, what) in [(&nbdkit, "nbdkit data"), (&qemu, "qemu-nbd qcow2")] {
        let uri = server.uri();
        let ours = assert_same_dump(&[], &uri, what);
        assert!(ours.lines().any(|l| l == "*"), "{what}: {ours}");
        assert_same_dump(&["--color"], &uri, what);
        let lines = ours.lines().count();
        assert!(lines < 40, "{what}: {lines} lines\n{ours}");

        // The trace shows what was read: a few small reads, not the export.
        let out = run_nbd(["-v", "dump", &uri]);
        assert!(out.status.success());
        assert_eq!(
            text(&out.stdout),
            ours,
            "{what}: the trace goes to stderr only"
        );
        let trace = text(&out.stderr);
        let reads: u64 = trace
            .lines()
            .filter(|l| l.contains("send command NBD_CMD_READ"))
            .map(|l| {
                let length = l.split(" length ").nth(1).expect("length");
                length.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum();
        assert!(
            trace.contains("send command NBD_CMD_BLOCK_STATUS"),
            "{what}"
        );
        assert!(
            reads > 0 && reads <= 8 * MIB / 2,
            "{what}: {reads} bytes read"
        );
    }
    assert!(nbd_dump(&[], &nbdkit.uri()).contains("|hello, world!...|"));
    assert!(nbd_dump(&[], &qemu.uri()).contains("qcow2 data"));
}

#[test]
fn offset_and_length_select_a_window() {
    let server = NbdkitBuilder::pattern(MIB).start();
    let uri = server.uri();
    let pattern = pattern_bytes(MIB);
    for (offset, length) in [
        (0u64, 16u64),
        (5, 100),
        (1000, 24),
        (MIB - 5, 5),
        (MIB - 5, 1000),
    ] {
        for (o, n) in [("-o", "-n"), ("--offset", "--length")] {
            let dump = nbd_dump(&[o, &offset.to_string(), n, &length.to_string()], &uri);
            let end = (offset + length).min(MIB);
            let mut bytes = Vec::new();
            let mut at = offset;
            for line in dump.lines() {
                let (address, rest) = line.split_once(": ").expect("a data line");
                assert_eq!(u64::from_str_radix(address, 16).unwrap(), at, "{dump}");
                let hex = &rest[..rest.find('|').unwrap()];
                for byte in hex.split_whitespace() {
                    bytes.push(u8::from_str_radix(byte, 16).unwrap());
                }
                at = offset + bytes.len() as u64;
            }
            assert!(
                bytes == pattern[offset as usize..end as usize],
                "{o} {offset} {n} {length}:\n{dump}"
            );
        }
    }
    // Sizes take suffixes; starting past the end is an error.
    assert_eq!(
        nbd_dump(&["-o", "1K", "-n", "16"], &uri),
        nbd_dump(&["--offset", "1024", "--length", "16"], &uri)
    );
    let out: Output = run_nbd(["dump", "-o", "2M", &uri]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("export size"),
        "{}",
        text(&out.stderr)
    );
    // The last of --color and --no-color wins, as in nbddump.
    assert!(!nbd_dump(&["--color", "--no-color", "-n", "16"], &uri).contains('\x1b'));
    assert!(nbd_dump(&["--no-color", "--color", "-n", "16"], &uri).contains('\x1b'));
}

#[test]
fn an_unknown_export_is_named_with_the_way_to_list() {
    let server = QemuNbdBuilder::raw(MIB)
        .export_name("good")
        .persistent(true)
        .shared(2)
        .start();
    let out = run_nbd(["dump", &server.uri_for("nope")]);
    assert_eq!(out.status.code(), Some(1));
    let message = text(&out.stderr);
    assert!(message.contains("no export \"nope\""), "{message}");
    assert!(message.contains("--list"), "{message}");
}

#[test]
fn without_block_status_everything_is_read_and_dumps_the_same() {
    // No structured replies, so no base:allocation: every byte is read.
    let server = NbdkitBuilder::data("\"start\" @0x30000 \"end\"")
        .param("size", "256K")
        .no_sr()
        .start();
    let uri = server.uri();
    let ours = assert_same_dump(&[], &uri, "no structured replies");
    assert!(ours.lines().any(|l| l == "*"), "{ours}");
    let out = run_nbd(["-v", "dump", &uri]);
    let trace = text(&out.stderr);
    assert!(!trace.contains("NBD_CMD_BLOCK_STATUS"), "{trace}");
    assert!(trace.contains("send command NBD_CMD_READ"), "{trace}");
}

/// On a terminal, colour is the default (as nbddump's); `script` gives the
/// command one. Skipped where util-linux's `script` is missing.
#[test]
fn colour_is_the_default_on_a_terminal() {
    if !nbd_tests::tool_exists("script") {
        return;
    }
    let server = NbdkitBuilder::pattern(64).start();
    let nbd = nbd_tests::testkit::nbd_binary().display().to_string();
    let on_tty = |extra: &str| -> String {
        let line = format!("{nbd} dump {extra} '{}'", server.uri());
        let out = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .output()
            .expect("script runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert!(
        on_tty("").contains("\x1b[22;32m0000000000"),
        "colour by default"
    );
    assert!(
        !on_tty("--no-color").contains('\x1b'),
        "--no-color on a terminal"
    );
}
