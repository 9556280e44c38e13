//! Every benchmark mode finishes: the side-by-side bench clients (nbd-blocking's
//! `bench`, nbd-mio's `mio_bench` and nbd-tokio's `tokio_bench`, the last two
//! with one and four connections) run each mode
//! (read and write with 4 KiB and 256 KiB requests, 64 in flight, and qd1)
//! against a small nbdkit memory export, and each must exit successfully
//! within a generous bound, printing the one line `shared/bench/side-by-side.sh`
//! parses. Speed is never asserted: the bound only turns a hang into a failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nbd_tests::NbdkitBuilder;

/// Export size: small, so a run takes moments, yet enough rounds of 64
/// requests that a loop which can wait with nothing in flight (the old write
/// bench did, in most runs at this size) gets caught.
const EXPORT_SIZE: u64 = 64 << 20;
/// A run that has not finished by then is hung.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The workspace root (this package lives in `tests/`).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// Builds the bench examples once (the same profile as these tests, so
/// an up-to-date build is a no-op) and returns their paths by name.
fn examples() -> &'static [(String, PathBuf)] {
    static BUILT: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let output = Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args([
                "build",
                "--message-format=json-render-diagnostics",
                "-p",
                "nbd-blocking",
                "--example",
                "bench",
                "-p",
                "nbd-mio",
                "--example",
                "mio_bench",
                "-p",
                "nbd-tokio",
                "--example",
                "tokio_bench",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build for the bench examples");
        assert!(
            output.status.success(),
            "building the bench examples failed"
        );
        let mut found = Vec::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" {
                continue;
            }
            let name = msg["target"]["name"].as_str().unwrap_or_default();
            if let Some(exe) = msg["executable"].as_str() {
                if matches!(name, "bench" | "mio_bench" | "tokio_bench") {
                    found.push((name.to_owned(), PathBuf::from(exe)));
                }
            }
        }
        assert_eq!(found.len(), 3, "bench executables found: {found:?}");
        found
    })
}

fn example(name: &str) -> &'static Path {
    examples()
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.as_path())
        .unwrap_or_else(|| panic!("no example {name}"))
}

/// Waits for `child` up to [`RUN_LIMIT`]; kills it and panics if it runs longer.
fn wait_bounded(mut child: Child, what: &str) -> (std::process::ExitStatus, String, String) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the bench") {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut s) = child.stdout.take() {
                s.read_to_string(&mut out).expect("bench stdout");
            }
            if let Some(mut s) = child.stderr.take() {
                s.read_to_string(&mut err).expect("bench stderr");
            }
            return (status, out, err);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {RUN_LIMIT:?}: hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks the output line's shape, as side-by-side.sh and libnbd_bench.c
/// have it: `MODE bytes N seconds S GB_per_s X` or `qd1 ops N seconds S ops_per_s X`.
fn assert_line_shape(line: &str, mode: &str, what: &str) {
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words.len(), 7, "{what}: {line:?}");
    assert_eq!(words[0], mode, "{what}: {line:?}");
    let is_decimal = |w: &str, places: usize| {
        let (int, frac) = w.split_once('.').unwrap_or((w, ""));
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.len() == places
            && frac.bytes().all(|b| b.is_ascii_digit())
    };
    if mode == "qd1" {
        assert_eq!(
            (words[1], words[3], words[5]),
            ("ops", "seconds", "ops_per_s"),
            "{what}: {line:?}"
        );
        assert!(is_decimal(words[2], 0), "{what}: {line:?}");
        assert!(words[2].parse::<u64>().unwrap() > 0, "{what}: no op done");
        assert!(is_decimal(words[6], 0), "{what}: {line:?}");
    } else {
        assert_eq!(
            (words[1], words[3], words[5]),
            ("bytes", "seconds", "GB_per_s"),
            "{what}: {line:?}"
        );
        assert_eq!(
            words[2],
            EXPORT_SIZE.to_string(),
            "{what}: the whole export"
        );
        assert!(is_decimal(words[6], 3), "{what}: {line:?}");
    }
    assert!(is_decimal(words[4], 3), "{what}: {line:?}");
}

/// Runs one bench invocation against a fresh export and checks it finished
/// with one well-formed line.
fn run(bench: &str, prefix: &[&str], mode: &str, req: Option<usize>) {
    let server = NbdkitBuilder::memory(EXPORT_SIZE).start();
    let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    args.push(server.uri());
    args.push(mode.to_owned());
    if let Some(req) = req {
        args.push(req.to_string());
        args.push("64".to_owned());
    }
    let what = format!("{bench} {}", args.join(" "));
    let child = Command::new(example(bench))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let (status, out, err) = wait_bounded(child, &what);
    assert!(status.success(), "{what}: {status}; stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: output {out:?}");
    assert_line_shape(lines[0], mode, &what);
}

/// Each mode of one bench: read and write at 4 KiB and 256 KiB with 64 in
/// flight, then qd1 (which runs its fixed 3 s).
fn every_mode(bench: &str, prefix: &[&str]) {
    for mode in ["write", "read"] {
        for req in [4096, 256 * 1024] {
            run(bench, prefix, mode, Some(req));
        }
    }
    run(bench, prefix, "qd1", None);
}

#[test]
fn blocking_bench_every_mode_finishes() {
    every_mode("bench", &[]);
}

#[test]
fn mio_bench_every_mode_finishes() {
    every_mode("mio_bench", &[]);
}

#[test]
fn mio_bench_four_connections_every_mode_finishes() {
    every_mode("mio_bench", &["--connections", "4"]);
}

#[test]
fn tokio_bench_every_mode_finishes() {
    every_mode("tokio_bench", &[]);
}

#[test]
fn tokio_bench_four_connections_every_mode_finishes() {
    every_mode("tokio_bench", &["--connections", "4"]);
}

/// The line shape check itself rejects what side-by-side.sh could not parse.
#[test]
fn line_shape_check_rejects_other_lines() {
    let good = format!("read bytes {EXPORT_SIZE} seconds 0.135 GB_per_s 0.497");
    assert_line_shape(&good, "read", "good");
    for bad in [
        format!("read bytes {EXPORT_SIZE} seconds 0.135 GB/s 0.497"),
        format!("read bytes {EXPORT_SIZE} seconds 0.1 GB_per_s 0.497"),
        "read bytes 1 seconds 0.135 GB_per_s 0.497".to_owned(),
        "qd1 ops 10 seconds 3.000 ops_per_s 3.3".to_owned(),
    ] {
        let mode = bad.split(' ').next().unwrap().to_owned();
        let result = std::panic::catch_unwind(|| assert_line_shape(&bad, &mode, "bad"));
        assert!(result.is_err(), "accepted {bad:?}");
    }
}
