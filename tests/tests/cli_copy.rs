//! `nbd copy` with nbdcopy's options, against real servers and against
//! nbdcopy's own result on the same data: every option, multi-conn (counted
//! at the server), progress on a descriptor and on a pseudo-terminal, and a
//! loop block device where the machine allows one.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use nbd_tests::testkit::{nbd_binary, run_nbd, Rng};
use nbd_tests::{nbdcopy, nbdcopy_with, read_export, require_tool, NbdkitBuilder, ServerHandle};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nbd ARGS` must succeed with nothing on stdout or stderr.
fn nbd_quiet(args: &[&str]) {
    let out = run_nbd(args);
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "nbd {args:?} ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Data with runs of zeroes of several lengths between random runs, and
/// data in the last byte.
fn holey_data(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let run = (rng.between(1, 600_000) as usize).min(len - at);
        if rng.chance(0.5) {
            rng.fill_bytes(&mut data[at..at + run]);
        }
        at += run;
    }
    data[len - 1] = 0x5a;
    data
}

/// A multi-conn memory export holding `data`, its zero runs unallocated
/// (so its extents report them as zero), with more `filters` in front.
fn export_of(data: &[u8], filters: &[(&str, &[(&str, &str)])]) -> ServerHandle {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    fs::write(&file, data).unwrap();
    let mut builder = NbdkitBuilder::memory(data.len());
    for (filter, params) in filters {
        builder = builder.filter(filter);
        for (key, value) in *params {
            builder = builder.param(key, value);
        }
    }
    let server = builder.start();
    nbdcopy(&file, server.uri());
    server
}

/// The options nbdcopy documents, each alone or with its usual partners.
const OPTIONS: &[&[&str]] = &[
    &[],
    &["-C", "1"],
    &["--connections", "4", "--threads", "4"],
    &["-T", "1"],
    &["-R", "3", "--request-size", "65536"],
    &["--requests", "2", "--queue-size", "131072"],
    &["-S", "0"],
    &["--sparse", "65536"],
    &["--synchronous"],
    &["--no-extents"],
    &["--allocated"],
    &["--flush"],
    &["-v"],
];

fn with<'a>(options: &[&'a str], src: &'a str, dst: &'a str) -> Vec<&'a str> {
    let mut args = vec!["copy"];
    args.extend_from_slice(options);
    args.extend([src, dst]);
    args
}

#[test]
fn every_option_copies_what_nbdcopy_copies() {
    let data = holey_data(1201, 5 * MIB + 4321);
    let source = export_of(&data, &[]);
    let src = source.uri();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.bin");
    fs::write(&garbage, vec![0xEE; data.len()]).unwrap();
    for options in OPTIONS {
        // nbdcopy with the same options, into a file.
        let theirs = dir.path().join("nbdcopy.out");
        let _ = fs::remove_file(&theirs);
        nbdcopy_with(options.iter().copied(), &src, &theirs);
        let theirs = fs::read(&theirs).unwrap();
        assert!(theirs == data, "{options:?}: nbdcopy itself");

        // Ours into a stale, longer file.
        let ours = dir.path().join("nbd.out");
        fs::write(&ours, vec![0xEE; data.len() + 1000]).unwrap();
        let out = run_nbd(with(options, &src, ours.to_str().unwrap()));
        assert!(out.status.success(), "{options:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty(), "{options:?}: {}", text(&out.stdout));
        let verbose = options.contains(&"-v");
        assert_eq!(
            out.stderr.is_empty(),
            !verbose,
            "{options:?}: {}",
            text(&out.stderr)
        );
        assert!(fs::read(&ours).unwrap() == theirs, "{options:?}: file");

        // Ours into an export full of garbage: zero runs must be zeroed.
        let destination = NbdkitBuilder::memory(data.len()).start();
        nbdcopy(&garbage, destination.uri());
        let out = run_nbd(with(options, &src, &destination.uri()));
        assert!(out.status.success(), "{options:?}: {}", text(&out.stderr));
        assert!(
            read_export(&destination.uri()) == data,
            "{options:?}: export"
        );
    }
}

#[test]
fn destination_is_zero_skips_zero_runs_as_nbdcopy_does() {
    let data = holey_data(1202, 3 * MIB);
    let source = export_of(&data, &[]);
    for flag in ["--destination-is-zero", "--target-is-zero"] {
        // A zero destination comes out equal.
        let destination = NbdkitBuilder::memory(data.len()).start();
        nbd_quiet(&["copy", flag, &source.uri(), &destination.uri()]);
        assert!(read_export(&destination.uri()) == data, "{flag}");
        // Over garbage the zero runs keep the garbage, for both tools: the
        // flag really skips them.
        for tool in ["nbd", "nbdcopy"] {
            let dirty = NbdkitBuilder::memory(data.len()).start();
            let dir = tempfile::tempdir().unwrap();
            let garbage = dir.path().join("g");
            fs::write(&garbage, vec![0xEE; data.len()]).unwrap();
            nbdcopy(&garbage, dirty.uri());
            if tool == "nbd" {
                nbd_quiet(&["copy", flag, &source.uri(), &dirty.uri()]);
            } else {
                nbdcopy_with([flag], source.uri(), dirty.uri());
            }
            let got = read_export(&dirty.uri());
            let kept = got
                .iter()
                .zip(&data)
                .filter(|(g, d)| **g == 0xEE && **d == 0)
                .count();
            assert!(kept > MIB / 2, "{tool} {flag}: zero runs were written");
            let data_equal = got.iter().zip(&data).all(|(g, d)| *d == 0 || g == d);
            assert!(data_equal, "{tool} {flag}: data differs");
        }
    }
}

#[test]
fn allocated_leaves_no_holes_and_sparse_output_has_them() {
    let data = holey_data(1203, 6 * MIB);
    let source = export_of(&data, &[]);
    let dir = tempfile::tempdir().unwrap();
    let blocks = |path: &Path| fs::metadata(path).unwrap().blocks() * 512;
    let theirs = dir.path().join("nbdcopy.out");
    nbdcopy(source.uri(), &theirs);
    let ours = dir.path().join("nbd.out");
    nbd_quiet(&["copy", &source.uri(), ours.to_str().unwrap()]);
    let full = data.len() as u64;
    // Where the file system keeps holes, both leave some.
    if blocks(&theirs) < full {
        assert!(blocks(&ours) < full, "sparse copy allocated everything");
    } else {
        eprintln!("note: this file system keeps no holes; sparseness not checked");
    }
    nbd_quiet(&["copy", "--allocated", &source.uri(), ours.to_str().unwrap()]);
    assert!(blocks(&ours) >= full, "--allocated left holes");
    assert!(fs::read(&ours).unwrap() == data);
}

/// How many connections an nbdkit log filter saw.
fn connections_logged(log: &Path) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" Connect "))
        .count()
}

#[test]
fn connections_follow_multi_conn_on_both_sides() {
    let data = holey_data(1204, 2 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let src_log = dir.path().join("src.log");
    let dst_log = dir.path().join("dst.log");
    let src_log_s = src_log.to_str().unwrap();
    let dst_log_s = dst_log.to_str().unwrap();

    // Both sides multi-conn: four connections each.
    let source = export_of(&data, &[("log", &[("logfile", src_log_s)])]);
    let before = connections_logged(&src_log);
    let destination = NbdkitBuilder::memory(data.len())
        .filter("log")
        .param("logfile", dst_log_s)
        .start();
    nbd_quiet(&[
        "copy",
        "-C",
        "4",
        "-T",
        "4",
        &source.uri(),
        &destination.uri(),
    ]);
    assert_eq!(connections_logged(&src_log) - before, 4);
    assert_eq!(connections_logged(&dst_log), 4);
    assert!(read_export(&destination.uri()) == data);

    // A destination without multi-conn: one connection each side.
    let single_log = dir.path().join("single.log");
    let single = NbdkitBuilder::memory(data.len())
        .filter("multi-conn")
        .param("multi-conn-mode", "disable")
        .filter("log")
        .param("logfile", single_log.to_str().unwrap())
        .start();
    let before = connections_logged(&src_log);
    nbd_quiet(&["copy", "-C", "4", "-T", "4", &source.uri(), &single.uri()]);
    assert_eq!(connections_logged(&src_log) - before, 1);
    assert_eq!(connections_logged(&single_log), 1);
    assert!(read_export(&single.uri()) == data);

    // A server that advertises multi-conn but turns extra clients away:
    // the workers that connected copy everything.
    let limited = NbdkitBuilder::memory(data.len())
        .filter("limit")
        .param("limit", "1")
        .start();
    let out = run_nbd([
        "copy",
        "-v",
        "-C",
        "4",
        "-T",
        "4",
        &source.uri(),
        &limited.uri(),
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("1 worker(s) ran"), "{stderr}");
    assert!(read_export(&limited.uri()) == data);

    // --synchronous: one connection.
    let before = connections_logged(&src_log);
    nbd_quiet(&["copy", "--synchronous", "-C", "4", &source.uri(), "null:"]);
    assert_eq!(connections_logged(&src_log) - before, 1);

    // -C 1 means one, even where both allow more.
    let before = connections_logged(&src_log);
    nbd_quiet(&["copy", "-C", "1", "-T", "4", &source.uri(), "null:"]);
    assert_eq!(connections_logged(&src_log) - before, 1);
}

#[test]
fn progress_lines_on_a_descriptor_match_nbdcopy_format() {
    let data = holey_data(1205, 8 * MIB);
    let source = export_of(
        &data,
        &[("delay", &[("delay-read", "10ms"), ("delay-zero", "10ms")])],
    );
    let src = source.uri();
    for tool in [nbd_binary().to_path_buf(), require_tool("nbdcopy")] {
        let lines = progress_run(&tool, &src, "null:");
        assert!(!lines.is_empty(), "{tool:?}: no progress lines");
        let mut last = 0;
        for line in &lines {
            let n: u64 = line
                .strip_suffix("/100")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{tool:?}: not a progress line: {line:?}"));
            assert!(n >= last && n <= 100, "{tool:?}: {lines:?}");
            last = n;
        }
        assert_eq!(lines.last().unwrap(), "100/100", "{tool:?}");
    }
    // Standard error as the descriptor: it stays open for the error line.
    let out = run_nbd(["copy", "--progress=2", &src, "null:"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stderr).lines().last(), Some("100/100"));
    let out = run_nbd(["copy", "--progress=2", &src, "/nonexistent/dir/out"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("nbd: destination: "),
        "{stderr}"
    );
    // A descriptor that is not open is an error before anything is copied.
    let out = run_nbd(["copy", "--progress=77", &src, "null:"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--progress=77"),
        "{}",
        text(&out.stderr)
    );
}

/// Runs `tool [copy] --progress=3 SRC DST` with descriptor 3 on a file; the lines written there.
fn progress_run(tool: &Path, src: &str, dst: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("progress");
    let sub: &[&str] = if tool == nbd_binary() { &["copy"] } else { &[] };
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"f=$1; shift; exec "$@" 3>"$f""#)
        .arg("sh")
        .arg(&file)
        .arg(tool)
        .args(sub)
        .args(["--progress=3", src, dst])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool:?}: {}", text(&out.stderr));
    fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// `CMD` run on a pseudo-terminal by `script`; what the terminal showed.
fn on_a_terminal(command: &str) -> Output {
    require_tool("script");
    Command::new("script")
        .args(["-q", "-e", "-c", command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn progress_bar_on_a_terminal_and_silence_elsewhere() {
    let data = holey_data(1206, 8 * MIB);
    let source = export_of(&data, &[("delay", &[("delay-read", "20ms")])]);
    let nbd = nbd_binary().to_str().unwrap().to_string();
    let out = on_a_terminal(&format!("{nbd} copy -p '{}' null:", source.uri()));
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("100%"), "no finished bar: {shown:?}");
    assert!(shown.contains("MiB"), "no byte counts: {shown:?}");
    assert!(shown.contains("iB/s"), "no rate: {shown:?}");
    assert!(shown.contains("ETA"), "no time left: {shown:?}");
    // A stream of unknown length: bytes and rate, no percentage.
    let out = on_a_terminal(&format!(
        "head -c 3000000 /dev/zero | {nbd} copy -p - null:"
    ));
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("2.86 MiB") && shown.contains("iB/s"),
        "{shown:?}"
    );
    // Not a terminal: -p draws nothing and the copy still succeeds.
    nbd_quiet(&["copy", "-p", &source.uri(), "null:"]);
}

/// Attaches `image` to a free loop device; `None` (with the reason) where
/// the machine does not allow it.
fn loop_device(image: &Path) -> Result<String, String> {
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!("losetup failed: {}", text(&out.stderr).trim()));
    }
    Ok(text(&out.stdout).trim().to_string())
}

/// Detaches the loop device when the test ends, whatever happens.
struct Detach(String);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_devices_as_source_and_destination() {
    let data = holey_data(1207, 4 * MIB + 8 * KIB);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("device.img");
    // The device is larger than the data and full of garbage.
    fs::write(&image, vec![0xEE; 6 * MIB]).unwrap();
    let device = match loop_device(&image) {
        Ok(device) => device,
        Err(why) => {
            eprintln!("SKIPPED block_devices_as_source_and_destination: {why}");
            return;
        }
    };
    let _detach = Detach(device.clone());
    let source = export_of(&data, &[]);

    // Into the device: its size stays, zero runs become zeroes, the rest stays.
    nbd_quiet(&["copy", "--flush", &source.uri(), &device]);
    let got = fs::read(&device).unwrap();
    assert_eq!(got.len(), 6 * MIB, "the device changed size");
    assert!(got[..data.len()] == data[..], "device content");
    assert!(got[data.len()..].iter().all(|&b| b == 0xEE));

    // From the device: its whole size, as nbdcopy reads it.
    let ours = dir.path().join("nbd.out");
    let theirs = dir.path().join("nbdcopy.out");
    nbd_quiet(&["copy", &device, ours.to_str().unwrap()]);
    nbdcopy(&device, &theirs);
    assert!(fs::read(&ours).unwrap() == fs::read(&theirs).unwrap());
    assert_eq!(fs::metadata(&ours).unwrap().len(), 6 * MIB as u64);

    // A device smaller than the source is refused, naming the side.
    let big = export_of(&holey_data(1208, 7 * MIB), &[]);
    let out = run_nbd(["copy", &big.uri(), &device]);
    assert_eq!(out.status.code(), Some(1));
    let message = text(&out.stderr);
    assert!(
        message.contains("destination") && message.contains("smaller"),
        "{message}"
    );
}

/// Bytes of `path` in the page cache, as fincore(1) counts them.
fn resident_bytes(path: &Path) -> u64 {
    let fincore = require_tool("fincore");
    let out = Command::new(fincore)
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fincore: {}", text(&out.stderr));
    text(&out.stdout)
        .trim()
        .parse()
        .expect("fincore prints a byte count")
}

/// A copy into a file leaves little of it in the page cache: write-back
/// starts as it goes and what is on disk is dropped, so a long copy never
/// fills memory with dirty pages (nor throttles on them). One worker keeps
/// at most 7 regions of 8 MiB cached (3 gathering writes, 4 in write-back);
/// a copy that left the cache alone would keep all 256 MiB.
#[test]
fn a_copy_into_a_file_keeps_the_page_cache_small() {
    const SIZE: usize = 256 * MIB;
    // Not the system's temporary directory, which may be a tmpfs (whose
    // pages are the file's only copy and never leave the cache).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stat = rustix::fs::statfs(dir.path()).unwrap();
    if stat.f_type as i64 == 0x0102_1994 {
        eprintln!("SKIPPED a_copy_into_a_file_keeps_the_page_cache_small: tmpfs");
        return;
    }
    let out = dir.path().join("copy.img");
    let server = NbdkitBuilder::pattern(SIZE).start();
    nbd_quiet(&["copy", "-T", "1", &server.uri(), out.to_str().unwrap()]);
    let resident = resident_bytes(&out);
    assert!(
        resident <= 64 * MIB as u64,
        "{} MiB of the 256 MiB copy stayed in the page cache",
        resident / MIB as u64
    );
    // Every 16th MiB is checked: reading it all would take a while in a
    // debug build, and a misplaced or missing write shows in any of them.
    let copy = fs::read(&out).unwrap();
    assert_eq!(copy.len(), SIZE);
    for at in (0..SIZE).step_by(16 * MIB) {
        let want = nbd_tests::testkit::pattern_at(at as u64, MIB);
        assert!(copy[at..at + MIB] == want[..], "the copy differs at {at}");
    }
}

/// `nbd ARGS` with `input` on standard input; must succeed quietly.
fn nbd_with_stdin(args: &[&str], input: &[u8]) {
    use std::io::Write;
    let mut child = Command::new(nbd_binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "nbd {args:?}: {}",
        text(&out.stderr)
    );
}

#[test]
fn a_stream_of_unknown_length_into_a_file_keeps_its_length() {
    // Ends in zeroes, which the copy makes a hole: the file must still end
    // where the stream did.
    let mut data = holey_data(1209, 3 * MIB + 333);
    let tail = data.len() - 200_000;
    data[tail..].fill(0);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    fs::write(&out, vec![0xEE; 5 * MIB]).unwrap();
    nbd_with_stdin(&["copy", "-", out.to_str().unwrap()], &data);
    assert!(fs::read(&out).unwrap() == data);
}

#[test]
fn a_server_program_gets_one_connection_whatever_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let logfile = format!("logfile={}", log.to_str().unwrap());
    nbd_quiet(&[
        "copy",
        "-C",
        "4",
        "-T",
        "4",
        "--",
        "[",
        "nbdkit",
        "--filter=log",
        "pattern",
        "4M",
        &logfile,
        "]",
        "null:",
    ]);
    assert_eq!(connections_logged(&log), 1);
}

#[test]
fn sparse_detection_follows_the_destination_preferred_block_size() {
    let data = holey_data(1210, 2 * MIB);
    let source = export_of(&data, &[]);
    let prefers_64k = NbdkitBuilder::memory(data.len())
        .filter("blocksize-policy")
        .param("blocksize-preferred", "65536")
        .start();
    let plain = NbdkitBuilder::memory(data.len()).start();
    for (destination, options, block) in [
        (&prefers_64k, &[][..], "sparse 65536"),
        (&plain, &[][..], "sparse 4096"),
        (&prefers_64k, &["-S", "8192"][..], "sparse 8192"),
    ] {
        let mut args = vec!["copy", "-v"];
        args.extend_from_slice(options);
        let (src, dst) = (source.uri(), destination.uri());
        args.extend([src.as_str(), dst.as_str()]);
        let out = run_nbd(&args);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains(block), "{options:?}: {stderr}");
        assert!(read_export(&destination.uri()) == data);
    }
}
