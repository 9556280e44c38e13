//! The `nbd` command line (`nbd info`, `nbd copy`, `nbd dump`) against real
//! servers, compared with libnbd's `nbdinfo`, `nbdcopy` and `nbddump`
//! (`nbd dump` itself has its own file, cli_dump.rs).
//!
//! The binary is `target/debug/nbd` of this workspace, built once per test
//! process by [`nbd_tests::testkit::nbd_binary`] (`cargo build -p nbd-cli`):
//! `CARGO_BIN_EXE_nbd` exists only for tests inside the nbd-cli package.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use nbd_tests::libnbd_1_14::as_nbdinfo_1_14;
use nbd_tests::testkit::{nbd_binary, run_nbd, Rng};
use nbd_tests::{
    nbdcopy, nbdinfo, nbdinfo_json, nbdinfo_list_json, nbdinfo_size, qemu_img_compare, read_export,
    require_tool, NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder, ServerHandle,
};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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

/// `nbd ARGS` must fail with exit code 1, print nothing on stdout, and one
/// line `nbd: ...` on stderr; returns that line.
fn nbd_fails(args: &[&str]) -> String {
    let out = run_nbd(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nbd {args:?} should fail with exit code 1; stderr:\n{}",
        text(&out.stderr)
    );
    one_line_error(&out, &format!("nbd {args:?}"))
}

fn one_line_error(out: &Output, what: &str) -> String {
    assert!(
        out.stdout.is_empty(),
        "{what}: unexpected stdout:\n{}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want one line on stderr, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("nbd: "), "{what}: {stderr}");
    assert!(lines[0].len() > "nbd: ".len() + 5, "{what}: {stderr}");
    lines[0].to_string()
}

/// `nbd ARGS` with `input` on standard input.
fn nbd_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(nbd_binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // The copy may stop reading early on error: ignore broken pipes.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// `nbdcopy ARGS` with `input` on standard input (must succeed).
fn nbdcopy_with_stdin(args: &[&str], input: &[u8]) {
    require_tool("nbdcopy");
    let mut child = Command::new("nbdcopy")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "nbdcopy {args:?}: {}",
        text(&out.stderr)
    );
}

/// The exit code of `tool ARGS` (stdin from /dev/null).
fn exit_code(tool: &Path, args: &[&str]) -> i32 {
    Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()))
        .status
        .code()
        .expect("exited, not killed")
}

/// Parses JSON, with the text in the panic message when it is not JSON.
fn parse(json: &str, who: &str) -> Value {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{who} printed bad JSON ({e}):\n{json}"))
}

/// Asserts that two JSON objects have the same keys and the same values,
/// naming the first difference.
fn assert_same_object(ours: &Value, theirs: &Value, context: &str) {
    let (ours_map, theirs_map) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    let ours_keys: Vec<&String> = ours_map.keys().collect();
    let theirs_keys: Vec<&String> = theirs_map.keys().collect();
    assert_eq!(ours_keys, theirs_keys, "{context}: key sets differ");
    for (key, value) in theirs_map {
        if key == "exports" {
            continue;
        }
        assert_eq!(&ours_map[key], value, "{context}: {key}");
    }
}

/// Compares `nbd info --json` output with nbdinfo's: the same top-level
/// fields, the same number of exports, each with the same fields and values
/// ("content" and "contexts" included), once what the installed nbdinfo is
/// too old to print is taken out of ours (see [`as_nbdinfo_1_14`]).
fn assert_same_info(ours: &str, theirs: &str, context: &str) {
    let parsed = parse(ours, "nbd info");
    assert!(parsed["extended"].is_boolean(), "{context}: {ours}");
    let ours = parse(&as_nbdinfo_1_14(ours), "nbd info");
    let theirs = parse(theirs, "nbdinfo");
    let context = format!("{context}\n--- nbd info:\n{ours:#}\n--- nbdinfo:\n{theirs:#}");
    assert_same_object(&ours, &theirs, &context);
    let ours_exports = ours["exports"].as_array().expect("exports array");
    let theirs_exports = theirs["exports"].as_array().unwrap();
    assert_eq!(ours_exports.len(), theirs_exports.len(), "{context}");
    for (ours, theirs) in ours_exports.iter().zip(theirs_exports) {
        assert_same_object(ours, theirs, &context);
    }
}

fn info_json(uri: &str) -> String {
    text(&nbd_ok(&["info", "--json", uri]))
}

fn random_data(seed: u64, len: u64) -> Vec<u8> {
    Rng::new(seed).bytes(len as usize)
}

/// What libnbd's nbddump prints for `uri` with `args`.
fn nbddump(args: &[&str], uri: &str) -> String {
    let out = Command::new(require_tool("nbddump"))
        .args(args)
        .arg(uri)
        .output()
        .expect("nbddump runs");
    assert!(out.status.success(), "nbddump: {}", text(&out.stderr));
    text(&out.stdout)
}

// ---------------------------------------------------------------- nbd info

#[test]
fn info_json_matches_nbdinfo_on_nbdkit_configurations() {
    let servers = [
        ("memory", NbdkitBuilder::memory(MIB).start()),
        (
            "pattern, read-only, odd size",
            NbdkitBuilder::pattern(1_000_001).readonly().start(),
        ),
        (
            "no structured replies",
            NbdkitBuilder::memory(MIB).no_sr().start(),
        ),
        (
            "oldstyle",
            NbdkitBuilder::memory(3 * MIB).oldstyle().start(),
        ),
        (
            "plain newstyle",
            NbdkitBuilder::memory(MIB).mask_handshake(0).start(),
        ),
        (
            "eval with flags and block sizes",
            NbdkitBuilder::eval()
                .method("get_size", "echo 2M")
                .method(
                    "pread",
                    "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                )
                .method("block_size", "echo 512 4K 64K")
                .method("can_write", "exit 3")
                .method("is_rotational", "exit 0")
                .method("can_multi_conn", "exit 0")
                .method("can_cache", "echo native")
                .method("cache", "exit 0")
                .export_name("evaled")
                .start(),
        ),
        (
            "blocksize-policy filter",
            NbdkitBuilder::memory(4 * MIB)
                .filter("blocksize-policy")
                .param("blocksize-minimum", "4096")
                .param("blocksize-preferred", "64K")
                .param("blocksize-maximum", "1M")
                .start(),
        ),
        (
            "described export over TCP",
            NbdkitBuilder::memory(MIB)
                .filter("exportname")
                .param("exportdesc", "fixed:a described disk")
                .export_name("named")
                .tcp()
                .start(),
        ),
    ];
    for (what, server) in &servers {
        let uri = server.uri();
        assert_same_info(&info_json(&uri), &nbdinfo_json(&uri), what);
    }
    // Spot checks that the comparison compared something.
    let eval = parse(&info_json(&servers[5].1.uri()), "nbd info");
    assert_eq!(eval["exports"][0]["block_size_maximum"], 65536);
    assert_eq!(eval["exports"][0]["export-name"], "evaled");
    assert_eq!(eval["exports"][0]["is_rotational"], true);
    let described = parse(&info_json(&servers[7].1.uri()), "nbd info");
    assert_eq!(described["exports"][0]["description"], "a described disk");
    let oldstyle = parse(&info_json(&servers[3].1.uri()), "nbd info");
    assert_eq!(oldstyle["protocol"], "oldstyle");
    assert_eq!(oldstyle["exports"][0]["export-size-str"], "3M");
}

#[test]
fn info_json_matches_nbdinfo_on_qemu_nbd() {
    let writable = QemuNbdBuilder::qcow2(MIB)
        .export_name("disk")
        .arg("--description=my disk")
        .shared(4)
        .start();
    let read_only = QemuNbdBuilder::raw(3 * MIB + 512)
        .read_only()
        .shared(4)
        .tcp()
        .start();
    for server in [&writable, &read_only] {
        let uri = server.uri();
        assert_same_info(&info_json(&uri), &nbdinfo_json(&uri), &uri);
    }
    let ours = parse(&info_json(&writable.uri()), "nbd info");
    assert_eq!(ours["exports"][0]["description"], "my disk");
    assert_eq!(ours["exports"][0]["block_size_maximum"], 32 * MIB);
}

#[test]
fn info_json_matches_nbdinfo_on_nbd_server() {
    let server = NbdServerBuilder::new()
        .export("alpha", MIB)
        .export_with(
            NbdServerExport::new("beta", 2 * MIB)
                .readonly()
                .option("flush", "true")
                .option("fua", "true")
                .option("rotational", "true"),
        )
        .export_with(NbdServerExport::new("gamma", 5000).option("trim", "true"))
        .start();
    for name in ["alpha", "beta", "gamma"] {
        let uri = server.uri_for(name);
        let ours = info_json(&uri);
        // nbdinfo --json prints the size NBD_OPT_INFO gave, and nbd-server
        // 3.24 answers NBD_OPT_INFO with size 0; `nbd info` connects with
        // NBD_OPT_GO, which gives the real size, as `nbdinfo --size` shows.
        // So the size fields are compared with nbdinfo --size instead.
        let mut theirs = parse(&nbdinfo_json(&uri), "nbdinfo");
        let size = nbdinfo_size(&uri);
        let export = &mut theirs["exports"][0];
        assert_eq!(export["export-size"], 0, "the nbd-server quirk went away");
        // Believing the size 0, nbdinfo reads nothing, and file(1) calls
        // that "empty"; the exports are zeroes, which file(1) calls "data".
        assert_eq!(export["content"], "empty");
        export["content"] = "data".into();
        export["export-size"] = size.into();
        export["export-size-str"] = match size {
            s if s % MIB == 0 => format!("{}M", s / MIB),
            s => s.to_string(),
        }
        .into();
        assert_same_info(&ours, &theirs.to_string(), name);
    }
}

#[test]
fn info_size_matches_nbdinfo() {
    let nbdkit = NbdkitBuilder::memory(1_234_567).start();
    let qemu = QemuNbdBuilder::qcow2(3 * MIB).shared(2).start();
    let nbd_server = NbdServerBuilder::new().export("x", 5 * MIB + 1).start();
    for (uri, size) in [
        (nbdkit.uri(), 1_234_567u64),
        (qemu.uri(), 3 * MIB),
        (nbd_server.uri(), 5 * MIB + 1),
    ] {
        let out = text(&nbd_ok(&["info", "--size", &uri]));
        assert_eq!(out, format!("{size}\n"), "{uri}");
        assert_eq!(nbdinfo_size(&uri), size, "{uri}");
    }
}

/// The text output, compared line by line with nbdinfo's (content and
/// contexts included), once what the installed nbdinfo is too old to print
/// is taken out of ours (see [`as_nbdinfo_1_14`]).
fn assert_same_text(uri: &str) {
    let ours = as_nbdinfo_1_14(&text(&nbd_ok(&["info", uri])));
    let theirs = nbdinfo([uri]);
    assert!(ours.contains("\n\tcontent: "), "{ours}");
    assert_eq!(ours, theirs, "nbd info {uri}");
}

#[test]
fn info_text_matches_nbdinfo() {
    let memory = NbdkitBuilder::memory(MIB).start();
    assert_same_text(&memory.uri());
    let qemu = QemuNbdBuilder::raw(2 * MIB)
        .export_name("disk")
        .arg("--description=my disk")
        .shared(2)
        .start();
    assert_same_text(&qemu.uri());
}

/// nbdinfo prints the size in words ("export-size: 1048576 (1M)") only when
/// that says something: for a size that is not a multiple of 1 KiB it prints
/// "export-size: 1000" where `nbd info` prints "export-size: 1000 (1000)".
#[test]

fn info_text_matches_nbdinfo_for_odd_sizes() {
    let server = NbdkitBuilder::memory(1000).start();
    assert_same_text(&server.uri());
}

// ---------------------------------------------------------------- nbd info --list

#[test]
fn list_json_matches_nbdinfo_on_nbd_server() {
    let server = NbdServerBuilder::new()
        .export("alpha", MIB)
        .export_with(NbdServerExport::new("beta", 2 * MIB).readonly())
        .export_with(NbdServerExport::with_bytes("gamma", b"tiny"))
        .start();
    // Exit status aside (see list_exits_zero_on_nbd_server): the listing.
    let out = run_nbd(["info", "--list", "--json", server.uri().as_str()]);
    let ours = text(&out.stdout);
    let theirs = nbdinfo_list_json(&server.uri());
    assert_same_info(&ours, &theirs, "nbd-server --list");
    let ours = parse(&ours, "nbd info --list");
    let names: Vec<&str> = ours["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|export| export["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    let theirs = parse(&theirs, "nbdinfo --list");
    for (ours, theirs) in ours["exports"]
        .as_array()
        .unwrap()
        .iter()
        .zip(theirs["exports"].as_array().unwrap())
    {
        assert_eq!(ours["export-size"], theirs["export-size"]);
        assert_eq!(ours["is_read_only"], theirs["is_read_only"]);
    }
}

/// `nbd info --list` ends its negotiation with `NBD_OPT_ABORT`; nbd-server
/// 3.24 closes the socket without acknowledging it, the client reports
/// "Connection reset by peer", and `nbd info --list` exits 1 after printing a
/// complete listing. `nbdinfo --list` exits 0 on the same server.
#[test]

fn list_exits_zero_on_nbd_server() {
    let server = NbdServerBuilder::new()
        .export("alpha", MIB)
        .export("beta", MIB)
        .start();
    let uri = server.uri();
    require_tool("nbdinfo");
    assert_eq!(exit_code(Path::new("nbdinfo"), &["--list", &uri]), 0);
    nbd_ok(&["info", "--list", "--json", &uri]);
    nbd_ok(&["info", "--list", &uri]);
}

#[test]
fn list_json_matches_nbdinfo_on_nbdkit_and_qemu() {
    let nbdkit = NbdkitBuilder::memory(MIB)
        .filter("exportname")
        .param("exportname-list", "explicit")
        .param("exportname", "one")
        .param("exportname", "two")
        .param("exportdesc", "fixed:listed")
        .start();
    let qemu = QemuNbdBuilder::raw(MIB)
        .export_name("disk")
        .arg("--description=qemu disk")
        .shared(2)
        .start();
    for server in [&nbdkit, &qemu] {
        let uri = server.uri();
        let ours = text(&nbd_ok(&["info", "--list", "--json", &uri]));
        assert_same_info(&ours, &nbdinfo_list_json(&uri), &uri);
    }
    let ours = parse(
        &text(&nbd_ok(&["info", "--list", "--json", &nbdkit.uri()])),
        "nbd info --list",
    );
    assert_eq!(ours["exports"].as_array().unwrap().len(), 2);
    assert_eq!(ours["exports"][1]["export-name"], "two");
    assert_eq!(ours["exports"][1]["description"], "listed");

    // Listing needs option negotiation: both tools fail on oldstyle.
    let oldstyle = NbdkitBuilder::memory(MIB).oldstyle().start();
    let message = nbd_fails(&["info", "--list", &oldstyle.uri()]);
    assert!(message.contains("list"), "{message}");
    assert_eq!(
        exit_code(Path::new("nbdinfo"), &["--list", &oldstyle.uri()]),
        1
    );
}

// ---------------------------------------------------------------- --can / --is

#[test]
fn can_and_is_exit_codes_match_nbdinfo() {
    require_tool("nbdinfo");
    let servers = [
        NbdkitBuilder::memory(MIB).start(),
        NbdkitBuilder::pattern(MIB).no_sr().start(),
        NbdkitBuilder::eval()
            .method("get_size", "echo 1M")
            .method(
                "pread",
                "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            )
            .method("pwrite", "cat >/dev/null")
            .method("is_rotational", "exit 0")
            .method("can_flush", "exit 3")
            .method("can_trim", "exit 3")
            .method("can_multi_conn", "exit 3")
            .start(),
        QemuNbdBuilder::raw(MIB).shared(64).start(),
        NbdServerBuilder::new()
            .export("plain", MIB)
            .export_with(
                NbdServerExport::new("full", MIB)
                    .readonly()
                    .option("flush", "true")
                    .option("fua", "true")
                    .option("trim", "true")
                    .option("rotational", "true"),
            )
            .start(),
    ];
    let mut uris: Vec<String> = servers.iter().map(ServerHandle::uri).collect();
    uris.push(servers[4].uri_for("full"));
    let features = [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "cache",
        "multi-conn",
        "structured-reply",
    ];
    let nbd = nbd_binary();
    let nbdinfo = Path::new("nbdinfo");
    let mut answers = [0usize; 3];
    for uri in &uris {
        let questions = features
            .iter()
            .map(|f| ("--can", *f))
            .chain(["read-only", "rotational", "tls"].map(|p| ("--is", p)));
        for (option, what) in questions {
            let ours = exit_code(nbd, &["info", option, what, uri]);
            let theirs = exit_code(nbdinfo, &[option, what, uri]);
            assert_eq!(ours, theirs, "{option} {what} {uri}");
            assert!(ours == 0 || ours == 2, "{option} {what} {uri}: exit {ours}");
            answers[ours as usize] += 1;
        }
    }
    assert!(answers[0] > 10 && answers[2] > 10, "{answers:?}");

    // Errors are exit code 1 for both: no server, or an unknown feature.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("missing.sock").display()
    );
    for (option, what, uri) in [
        ("--can", "flush", nowhere.as_str()),
        ("--is", "read-only", nowhere.as_str()),
        ("--can", "bogus", uris[0].as_str()),
    ] {
        assert_eq!(
            exit_code(nbd, &["info", option, what, uri]),
            1,
            "{what} {uri}"
        );
        assert_eq!(exit_code(nbdinfo, &[option, what, uri]), 1, "{what} {uri}");
    }
}

// ---------------------------------------------------------------- nbd copy

/// The request options each copy test runs with. In each, `--requests` times
/// `--request-size` covers the whole (at most 4 MiB) source, so every request
/// is issued at once: see `copy_with_few_or_small_requests_finishes` for why.
const COPY_VARIANTS: [&[&str]; 4] = [
    &[],
    &["--requests", "16", "--request-size", "256K", "--flush"],
    &["--requests", "1024", "--request-size", "4K"],
    &["--requests", "1000", "--request-size", "5000"],
];

fn copy_args<'a>(variant: &[&'a str], src: &'a str, dst: &'a str) -> Vec<&'a str> {
    let mut args = vec!["copy"];
    args.extend_from_slice(variant);
    args.extend([src, dst]);
    args
}

#[test]
fn copy_export_to_file_matches_nbdcopy() {
    // An odd size: the last request is short.
    let data = random_data(101, 3 * MIB + 12_345);
    let server = NbdkitBuilder::bytes(&data).readonly().start();
    let uri = server.uri();
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("nbdcopy.out");
    nbdcopy(&uri, &reference);
    let reference = fs::read(&reference).unwrap();
    assert!(reference == data, "nbdcopy read other bytes");
    for (i, variant) in COPY_VARIANTS.iter().enumerate() {
        let out = dir.path().join(format!("nbd-{i}.out"));
        // A stale longer file is truncated to the export's size.
        fs::write(&out, vec![0xFF; 4 * MIB as usize]).unwrap();
        let stdout = nbd_ok(&copy_args(variant, &uri, out.to_str().unwrap()));
        assert!(stdout.is_empty());
        assert!(fs::read(&out).unwrap() == reference, "variant {variant:?}");
    }
}

#[test]
fn copy_file_to_export_matches_nbdcopy() {
    let data = random_data(102, 2 * MIB + 100);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.bin");
    fs::write(&source, &data).unwrap();
    let source = source.to_str().unwrap();

    let reference = NbdkitBuilder::memory(2 * MIB + 100).start();
    nbdcopy(source, reference.uri());
    let expected = read_export(&reference.uri());
    assert!(expected == data);
    for variant in COPY_VARIANTS {
        // A larger destination: the part past the source is left alone.
        let server = NbdkitBuilder::memory(3 * MIB).start();
        nbd_ok(&copy_args(variant, source, &server.uri()));
        let got = read_export(&server.uri());
        assert!(got[..data.len()] == expected[..], "variant {variant:?}");
        assert!(
            got[data.len()..].iter().all(|&b| b == 0),
            "variant {variant:?}"
        );
    }
}

#[test]
fn copy_export_to_export_between_two_servers() {
    let data = random_data(103, 2 * MIB);
    let source = NbdkitBuilder::bytes(&data).start();
    let image = source.backing_file().unwrap().to_path_buf();
    let by_nbdcopy = QemuNbdBuilder::raw(2 * MIB).shared(2).start();
    nbdcopy(source.uri(), by_nbdcopy.uri());
    for variant in COPY_VARIANTS {
        let destination = QemuNbdBuilder::qcow2(2 * MIB).shared(2).start();
        nbd_ok(&copy_args(variant, &source.uri(), &destination.uri()));
        assert!(
            qemu_img_compare(&image, destination.uri()),
            "variant {variant:?}: the copy differs from the source"
        );
        assert!(
            qemu_img_compare(by_nbdcopy.uri(), destination.uri()),
            "variant {variant:?}: nbd copy and nbdcopy disagree"
        );
    }
}

#[test]
fn copy_between_exports_and_standard_streams() {
    let data = random_data(104, MIB + 777);
    let source = NbdkitBuilder::bytes(&data).readonly().start();
    let reference = read_export(&source.uri());
    assert!(reference == data);
    // export -> stdout, in order whatever order the replies came in.
    for variant in COPY_VARIANTS {
        let stdout = nbd_ok(&copy_args(variant, &source.uri(), "-"));
        assert!(stdout == reference, "variant {variant:?}");
    }

    // stdin -> export, compared with nbdcopy doing the same.
    let by_nbdcopy = NbdkitBuilder::memory(MIB + 777).start();
    nbdcopy_with_stdin(&["-", &by_nbdcopy.uri()], &data);
    let expected = read_export(&by_nbdcopy.uri());
    assert!(expected == data);
    for variant in COPY_VARIANTS {
        let destination = NbdkitBuilder::memory(MIB + 777).start();
        let out = nbd_with_stdin(&copy_args(variant, "-", &destination.uri()), &data);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "variant {variant:?}: {}",
            text(&out.stderr)
        );
        assert!(
            read_export(&destination.uri()) == expected,
            "variant {variant:?}"
        );
    }
    // Less on stdin than the export holds: the rest stays as it was.
    let destination = NbdkitBuilder::memory(MIB).start();
    let out = nbd_with_stdin(&["copy", "-", &destination.uri()], b"short");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = read_export(&destination.uri());
    assert_eq!(&got[..5], b"short");
    assert!(got[5..].iter().all(|&b| b == 0));
}

#[test]
fn copy_to_null_reads_everything() {
    let source = NbdkitBuilder::pattern(4 * MIB).start();
    for variant in COPY_VARIANTS {
        let stdout = nbd_ok(&copy_args(variant, &source.uri(), "null:"));
        assert!(stdout.is_empty());
    }
    nbdcopy(source.uri(), "null:");
    // null: really reads: a source failing its last bytes fails the copy.
    let failing = NbdkitBuilder::pattern(MIB)
        .filter("error")
        .param("error-pread", "EIO")
        .param("error-pread-rate", "100%")
        .start();
    let message = nbd_fails(&["copy", &failing.uri(), "null:"]);
    assert!(
        message.contains("read") && message.contains("EIO"),
        "{message}"
    );
}

#[test]
fn copy_failures_are_one_line_errors() {
    let data = random_data(105, MIB);
    let source = NbdkitBuilder::bytes(&data).start();
    let failing = NbdkitBuilder::pattern(MIB)
        .filter("error")
        .param("error-pread", "EIO")
        .param("error-pread-rate", "100%")
        .start();
    let read_only = NbdkitBuilder::memory(MIB).readonly().start();
    let smaller = NbdkitBuilder::memory(MIB - 512).start();
    let good = NbdkitBuilder::memory(MIB).start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.bin");
    let file = file.to_str().unwrap();

    for (src, dst, words) in [
        (failing.uri(), good.uri(), &["read", "EIO"][..]),
        (failing.uri(), file.to_string(), &["read", "EIO"][..]),
        (source.uri(), read_only.uri(), &["read-only"][..]),
        (source.uri(), smaller.uri(), &["smaller"][..]),
    ] {
        let message = nbd_fails(&["copy", &src, &dst]);
        for word in words {
            assert!(message.contains(word), "{src} -> {dst}: {message}");
        }
        // nbdcopy refuses the same copies.
        require_tool("nbdcopy");
        assert_ne!(
            exit_code(Path::new("nbdcopy"), &[&src, &dst]),
            0,
            "{src} -> {dst}"
        );
    }
    // The refused copy wrote nothing to the read-only export.
    assert!(read_export(&read_only.uri()).iter().all(|&b| b == 0));
    // A missing source file.
    let missing = dir.path().join("missing.bin");
    let message = nbd_fails(&["copy", missing.to_str().unwrap(), &good.uri()]);
    assert!(message.contains("No such file"), "{message}");
}

/// A source with holes (a qcow2 image whose zero runs are unallocated, so
/// block status reports them as zero) into destinations holding garbage: the
/// zero runs must come out as zeroes however the copy writes them.
#[test]
fn copy_sparse_source_over_garbage() {
    let mut data = vec![0u8; 4 * MIB as usize];
    let mut rng = Rng::new(107);
    for _ in 0..6 {
        let at = rng.below(4 * MIB - 70_000) as usize;
        let len = rng.between(1, 65_536) as usize;
        data[at..at + len].copy_from_slice(&rng.bytes(len));
    }
    data[4 * MIB as usize - 1] = 0x42;
    let source = QemuNbdBuilder::from_bytes(nbd_tests::ImageFormat::Qcow2, &data)
        .read_only()
        .shared(8)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.bin");
    fs::write(&garbage, vec![0xFF; 4 * MIB as usize]).unwrap();

    let by_nbdcopy = NbdkitBuilder::memory(4 * MIB).start();
    nbdcopy(&garbage, by_nbdcopy.uri());
    nbdcopy(source.uri(), by_nbdcopy.uri());
    assert!(read_export(&by_nbdcopy.uri()) == data, "nbdcopy itself");
    for variant in COPY_VARIANTS {
        let destination = NbdkitBuilder::memory(4 * MIB).start();
        nbdcopy(&garbage, destination.uri());
        nbd_ok(&copy_args(variant, &source.uri(), &destination.uri()));
        assert!(
            read_export(&destination.uri()) == data,
            "variant {variant:?}: export destination"
        );
        let file = dir.path().join("out.bin");
        fs::write(&file, vec![0xFF; 5 * MIB as usize]).unwrap();
        nbd_ok(&copy_args(variant, &source.uri(), file.to_str().unwrap()));
        assert!(
            fs::read(&file).unwrap() == data,
            "variant {variant:?}: file"
        );
        let stdout = nbd_ok(&copy_args(variant, &source.uri(), "-"));
        assert!(stdout == data, "variant {variant:?}: stdout");
    }
}

/// Runs `nbd ARGS`, killing it if it has not finished within `limit`;
/// `None` if it had to be killed.
fn nbd_within(args: &[&str], limit: Duration) -> Option<Output> {
    let mut child = Command::new(nbd_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

/// The copy loop waits for the sockets right after collecting completions,
/// without first starting the reads the freed buffers allow. When one poll
/// completes every request in flight (always with `--requests 1`; most of
/// the time with small requests, whose replies arrive many per read), nothing
/// is in flight while it waits: it sleeps until its 60 s timeout and fails
/// with "nbd: timed out". Seen for every kind of source and destination.
#[test]

fn copy_with_few_or_small_requests_finishes() {
    let source = NbdkitBuilder::pattern(3 * MIB).start();
    let destination = NbdkitBuilder::memory(3 * MIB).start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.bin");
    let file = file.to_str().unwrap();
    for variant in [
        &["--requests", "1"][..],
        &["--requests", "2", "--request-size", "1M"][..],
        &["--request-size", "512"][..],
        &["--requests", "7", "--request-size", "3000"][..],
    ] {
        for (src, dst) in [
            (source.uri(), "null:".to_string()),
            (source.uri(), file.to_string()),
            (source.uri(), destination.uri()),
        ] {
            let args = copy_args(variant, &src, &dst);
            let out = nbd_within(&args, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("nbd {args:?} still runs after 10 s"));
            assert!(out.status.success(), "nbd {args:?}: {}", text(&out.stderr));
        }
    }
}

/// `nbd copy` reads and writes `--request-size` (256 KiB) pieces and `nbd
/// dump` 1 MiB pieces whatever maximum block size the server advertises; on
/// a server whose maximum is 64 KiB strict mode refuses every request
/// ("request too large ... exceeds the server's maximum payload 65536").
/// nbdcopy copies from and to the same servers.
#[test]

fn copy_and_dump_respect_the_maximum_block_size() {
    let data = random_data(106, MIB);
    let limited = |builder: NbdkitBuilder| {
        builder
            .filter("blocksize-policy")
            .param("blocksize-minimum", "1")
            .param("blocksize-preferred", "4K")
            .param("blocksize-maximum", "64K")
            .start()
    };
    let source = limited(NbdkitBuilder::bytes(&data));
    let destination = limited(NbdkitBuilder::memory(MIB));
    nbdcopy(source.uri(), "null:");
    nbd_ok(&["copy", &source.uri(), &destination.uri()]);
    assert!(read_export(&destination.uri()) == data);
    let out = text(&nbd_ok(&["dump", "--length", "32", &source.uri()]));
    assert_eq!(out, nbddump(&["-n", "32"], &source.uri()));
    let out = text(&nbd_ok(&["dump", &source.uri()]));
    assert_eq!(out, nbddump(&[], &source.uri()));
}

// ---------------------------------------------------------------- errors

#[test]
fn bad_uris_are_one_line_errors() {
    for uri in ["nbd://[bad", "http://example.com/disk", "nbd+unix:///disk"] {
        for args in [
            vec!["info", uri],
            vec!["info", "--json", uri],
            vec!["dump", uri],
            vec!["copy", uri, "null:"],
        ] {
            let message = nbd_fails(&args);
            assert!(!message.contains("panicked"), "{message}");
        }
    }
    let message = nbd_fails(&["info", "http://example.com/disk"]);
    assert!(message.contains("scheme"), "{message}");
    let message = nbd_fails(&["info", "nbd+unix:///disk"]);
    assert!(message.contains("socket"), "{message}");
}

#[test]
fn refused_connections_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    for args in [
        vec!["info", uri.as_str()],
        vec!["info", "--size", uri.as_str()],
        vec!["info", "--list", uri.as_str()],
        vec!["dump", uri.as_str()],
        vec!["copy", uri.as_str(), "null:"],
    ] {
        let message = nbd_fails(&args);
        assert!(message.contains("No such file or directory"), "{message}");
    }
    // TCP: a port nobody listens on.
    let port = nbd_tests::pick_free_port();
    let message = nbd_fails(&["info", &format!("nbd://127.0.0.1:{port}/")]);
    assert!(message.contains("refused"), "{message}");
}

/// A one-line error should say what it could not reach: "nbd: No such file or
/// directory (os error 2)" does not name the socket (nbdinfo's message does).
#[test]

fn refused_connection_errors_name_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let message = nbd_fails(&["info", &uri]);
    assert!(message.contains(socket.to_str().unwrap()), "{message}");
}

#[test]
fn unknown_export_on_qemu_nbd_shows_the_server_message() {
    let server = QemuNbdBuilder::raw(MIB)
        .export_name("disk")
        .shared(4)
        .start();
    let uri = server.uri_for("nope");
    for args in [
        vec!["info", uri.as_str()],
        vec!["info", "--json", uri.as_str()],
        vec!["dump", uri.as_str()],
        vec!["copy", uri.as_str(), "null:"],
    ] {
        let message = nbd_fails(&args);
        assert!(
            message.contains("NBD_REP_ERR_UNKNOWN") && message.contains("not present"),
            "{args:?}: {message}"
        );
        assert!(message.contains("nope"), "{message}");
    }
    // The good name still works on the same server.
    assert_eq!(
        text(&nbd_ok(&["info", "--size", &server.uri()])),
        format!("{MIB}\n")
    );
}
