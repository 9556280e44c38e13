//! `nbd copy` never ends in a silent short copy: a server killed on either
//! side, or a destination failing its writes or zeroes, ends the command with
//! exit code 1 and one line naming the side, the offset and the cause.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbd_tests::testkit::{nbd_binary, run_nbd};
use nbd_tests::{NbdkitBuilder, ServerHandle};

/// Long enough for a loaded machine; only turns a hang into a failure.
const LIMIT: Duration = Duration::from_secs(60);
const SIZE: u64 = 1 << 30;

fn spawn_copy(src: &str, dst: &str) -> Child {
    Command::new(nbd_binary())
        .args(["copy", src, dst])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (killing it past [`LIMIT`], which fails the test);
/// returns its exit code and standard error.
fn finish(mut child: Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("nbd copy did not end after its server died");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills `victim` once the copy is well under way (its log filter, writing
/// to `log`, has seen the copy connect, and a moment has passed for requests
/// to be in flight), then checks the copy's end.
fn kill_during_copy(mut victim: ServerHandle, log: &Path, src: &str, dst: &str, side: &str) {
    let child = spawn_copy(src, dst);
    let deadline = Instant::now() + LIMIT;
    while !fs::read_to_string(log).is_ok_and(|l| l.contains(" Connect ")) {
        assert!(
            Instant::now() < deadline,
            "the copy never connected to the {side}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    victim.kill();
    let (code, stderr) = finish(child);
    assert_eq!(code, Some(1), "{side} killed: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{side} killed: {stderr}");
    let line = lines[0];
    assert!(line.starts_with(&format!("nbd: {side}: ")), "{line}");
    assert!(line.contains(" at offset "), "{line}");
}

#[test]
fn a_source_killed_mid_copy_fails_the_copy_naming_the_source() {
    for dst in ["null:", "file"] {
        // Slow reads: the copy is still running when the server dies.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let source = NbdkitBuilder::pattern(SIZE)
            .filter("delay")
            .param("delay-read", "20ms")
            .filter("log")
            .param("logfile", &log)
            .start();
        let file = dir.path().join("out.bin");
        let dst = if dst == "file" {
            file.to_str().unwrap().to_string()
        } else {
            dst.to_string()
        };
        let src = source.uri();
        kill_during_copy(source, &log, &src, &dst, "source");
    }
}

#[test]
fn a_destination_killed_mid_copy_fails_the_copy_naming_the_destination() {
    let source = NbdkitBuilder::pattern(SIZE).start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let destination = NbdkitBuilder::memory(SIZE)
        .filter("delay")
        .param("delay-write", "20ms")
        .filter("log")
        .param("logfile", &log)
        .start();
    let dst = destination.uri();
    kill_during_copy(destination, &log, &source.uri(), &dst, "destination");
}

#[test]
fn a_destination_failing_writes_or_zeroes_fails_the_copy() {
    for (data, filter_params, what) in [
        (
            true,
            [("error-pwrite", "EIO"), ("error-pwrite-rate", "100%")],
            "write",
        ),
        (
            true,
            [("error-pwrite", "ENOSPC"), ("error-pwrite-rate", "5%")],
            "write",
        ),
        // An all-zero source: the copy sends only zero requests.
        (
            false,
            [("error-zero", "EIO"), ("error-zero-rate", "100%")],
            "zero",
        ),
    ] {
        // A source of its own each time: Debian's nbdkit 1.32.5 aborts when
        // a client leaves with reads in flight, as a failing copy does.
        let source = if data {
            NbdkitBuilder::pattern(8 << 20).start()
        } else {
            NbdkitBuilder::memory(8 << 20).start()
        };
        let mut builder = NbdkitBuilder::memory(8 << 20).filter("error");
        for (key, value) in filter_params {
            builder = builder.param(key, value);
        }
        let destination = builder.start();
        // 4 KiB writes: 2048 of them, so that even the 5% rate fails some
        // (all succeeding has a chance of 0.95^2048).
        let out = run_nbd([
            "copy",
            "--request-size",
            "4K",
            &source.uri(),
            &destination.uri(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{filter_params:?}: {stderr}");
        let line = stderr.lines().next().unwrap_or_default();
        let errno = filter_params[0].1;
        assert!(
            line.starts_with(&format!("nbd: destination: {what} at offset "))
                && line.contains(errno),
            "{filter_params:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn an_unreachable_side_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none.sock").display()
    );
    let server = NbdkitBuilder::memory(1 << 20).start();
    for (src, dst, side) in [
        (nowhere.clone(), "null:".to_string(), "source"),
        (server.uri(), nowhere.clone(), "destination"),
    ] {
        let out = run_nbd(["copy", &src, &dst]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with(&format!("nbd: {side}: ")) && stderr.contains("none.sock"),
            "{stderr}"
        );
    }
}
