//! `nbd info`, `nbd copy` and `nbd dump` with `[ CMD ARGS ... ]` in place of
//! a URI: the server is started by socket activation and stopped when the
//! command ends, whether it succeeded or failed. Compared with libnbd's
//! `nbdinfo`, `nbdcopy` and `nbddump` given the same server command.
//!
//! Each server command runs under a one-line shell wrapper that records
//! its pid before `exec`ing the server (the pid stays the same through the
//! `exec`, so socket activation's `LISTEN_PID` still matches); afterwards the
//! test checks that no process has that pid any more.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use nbd_tests::testkit::{pattern_bytes, run_nbd};
use nbd_tests::{create_image, require_tool, ImageFormat, NbdkitBuilder};

const MIB: u64 = 1 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Server commands whose pids are recorded in files of a private directory.
struct Servers {
    dir: tempfile::TempDir,
    count: usize,
}

impl Servers {
    fn new() -> Servers {
        require_tool("nbdkit");
        require_tool("qemu-nbd");
        Servers {
            dir: tempfile::tempdir().unwrap(),
            count: 0,
        }
    }

    /// A scratch path in the private directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `[ sh -c 'echo $$ > PIDFILE; exec "$@"' PIDFILE ARGV... ]`, and the
    /// pid file.
    fn command(&mut self, argv: &[&str]) -> (Vec<String>, PathBuf) {
        self.count += 1;
        let pidfile = self.path(&format!("server-{}.pid", self.count));
        let mut words = vec![
            "[".to_string(),
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0\"; exec \"$@\"".into(),
            pidfile.to_str().unwrap().into(),
        ];
        words.extend(argv.iter().map(|s| s.to_string()));
        words.push("]".into());
        (words, pidfile)
    }
}

/// Asserts that the server whose pid `pidfile` recorded was started and is
/// gone.
fn assert_gone(pidfile: &Path) {
    let pid = fs::read_to_string(pidfile)
        .unwrap_or_else(|e| panic!("{}: the server never started: {e}", pidfile.display()));
    let pid = pid.trim();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "server {pid} is still there after nbd ended"
    );
}

/// `nbd` + `head` + `--` + `server`, plus any `tail`.
fn nbd_with(head: &[&str], servers: &[&[String]], tail: &[&str]) -> Output {
    let mut args: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    args.push("--".into());
    for server in servers {
        args.extend(server.iter().cloned());
    }
    args.extend(tail.iter().map(|s| s.to_string()));
    run_nbd(&args)
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{what}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Fails with exit code 1 and one line on stderr, which it returns.
fn assert_fails(out: &Output, what: &str) -> String {
    assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
    assert!(stderr.starts_with("nbd: "), "{what}: {stderr}");
    stderr
}

/// libnbd's tool with `-- [ argv ]`.
fn libnbd_tool(tool: &str, args: &[&str], argv: &[&str]) -> Output {
    require_tool(tool);
    let out = Command::new(tool)
        .args(args)
        .arg("--")
        .arg("[")
        .args(argv)
        .arg("]")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool}: {}", text(&out.stderr));
    out
}

#[test]
fn info_of_a_server_command_matches_nbdinfo() {
    let mut servers = Servers::new();
    let argv = ["nbdkit", "memory", "1G"];
    let (server, pidfile) = servers.command(&argv);
    let ours = assert_ok(&nbd_with(&["info", "--json"], &[&server], &[]), "info");
    assert_gone(&pidfile);
    let theirs = text(&libnbd_tool("nbdinfo", &["--json"], &argv).stdout);
    let ours: Value = serde_json::from_str(&ours).unwrap();
    let theirs: Value = serde_json::from_str(&theirs).unwrap();
    for key in ["protocol", "TLS", "structured"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let (ours, theirs) = (&ours["exports"][0], &theirs["exports"][0]);
    let fields = ours.as_object().unwrap();
    assert!(fields.len() >= 14, "{ours}");
    // As nbdinfo: a server the command started has no URI to show.
    assert!(!fields.contains_key("uri"), "{ours}");
    for (key, value) in fields {
        assert_eq!(value, &theirs[key], "{key}");
    }
    assert_eq!(ours["export-size"], 1u64 << 30);

    // The text form too, and for qemu-nbd with a named export.
    let image = servers.path("disk.qcow2");
    create_image(&image, ImageFormat::Qcow2, 3 * MIB);
    let image = image.to_str().unwrap();
    let (server, pidfile) = servers.command(&["qemu-nbd", "-f", "qcow2", image]);
    let ours = assert_ok(&nbd_with(&["info"], &[&server], &[]), "info qemu-nbd");
    assert_gone(&pidfile);
    assert!(ours.contains("export-size: 3145728 (3M)"), "{ours}");
    assert!(!ours.contains("uri:"), "{ours}");
    let theirs = text(&libnbd_tool("nbdinfo", &[], &["qemu-nbd", "-f", "qcow2", image]).stdout);
    for line in ours
        .lines()
        .filter(|l| l.contains("can_") || l.contains("is_"))
    {
        assert!(
            theirs.contains(line),
            "{line:?} is not in nbdinfo's:\n{theirs}"
        );
    }
}

#[test]
fn info_size_can_map_and_list_start_and_stop_their_server() {
    let mut servers = Servers::new();
    let (server, pidfile) = servers.command(&["nbdkit", "pattern", "3M"]);
    let out = assert_ok(&nbd_with(&["info", "--size"], &[&server], &[]), "--size");
    assert_eq!(out, format!("{}\n", 3 * MIB));
    assert_gone(&pidfile);

    let (server, pidfile) = servers.command(&["nbdkit", "-r", "memory", "1M"]);
    let out = nbd_with(&["info", "--is", "read-only"], &[&server], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_gone(&pidfile);
    let (server, pidfile) = servers.command(&["nbdkit", "-r", "memory", "1M"]);
    let out = nbd_with(&["info", "--can", "trim"], &[&server], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_gone(&pidfile);

    let data = ["nbdkit", "data", "1 @65536 2 @1048575 3"];
    let (server, pidfile) = servers.command(&data);
    let ours = assert_ok(&nbd_with(&["info", "--map"], &[&server], &[]), "--map");
    assert_gone(&pidfile);
    let theirs = text(&libnbd_tool("nbdinfo", &["--map"], &data).stdout);
    assert_eq!(ours, theirs);
    assert!(ours.lines().count() > 1, "{ours}");

    let (server, pidfile) = servers.command(&["nbdkit", "memory", "1M"]);
    let ours = assert_ok(&nbd_with(&["info", "--list"], &[&server], &[]), "--list");
    assert_gone(&pidfile);
    assert!(ours.contains("export=\"\":"), "{ours}");
    assert!(!ours.contains("uri:"), "{ours}");
}

#[test]
fn copy_from_a_server_command_matches_nbdcopy() {
    let mut servers = Servers::new();
    // nbdkit's pattern plugin.
    let argv = ["nbdkit", "pattern", "1M"];
    let (server, pidfile) = servers.command(&argv);
    let out = servers.path("pattern.raw");
    let out_str = out.to_str().unwrap();
    assert_ok(&nbd_with(&["copy"], &[&server], &[out_str]), "copy");
    assert_gone(&pidfile);
    assert!(fs::read(&out).unwrap() == pattern_bytes(MIB));

    // qemu-nbd serving a qcow2 image with data in it.
    let image = servers.path("disk.qcow2");
    create_image(&image, ImageFormat::Qcow2, 4 * MIB);
    require_tool("qemu-io");
    let io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c"])
        .arg("write -P 0x11 3M 4k")
        .arg(&image)
        .output()
        .unwrap();
    assert!(io.status.success(), "qemu-io: {}", text(&io.stderr));
    let image = image.to_str().unwrap();
    let argv = ["qemu-nbd", "-f", "qcow2", image];
    let (server, pidfile) = servers.command(&argv);
    let ours = servers.path("ours.raw");
    let ours_str = ours.to_str().unwrap();
    assert_ok(&nbd_with(&["copy"], &[&server], &[ours_str]), "copy qcow2");
    assert_gone(&pidfile);
    let theirs = servers.path("theirs.raw");
    require_tool("nbdcopy");
    let status = Command::new("nbdcopy")
        .args(["--", "["])
        .args(argv)
        .args(["]"])
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(status.success(), "nbdcopy");
    let ours = fs::read(&ours).unwrap();
    assert_eq!(ours.len() as u64, 4 * MIB);
    assert!(
        ours == fs::read(&theirs).unwrap(),
        "nbd copy and nbdcopy differ"
    );
    assert!(ours[MIB as usize..][..65536].iter().all(|&b| b == 0x5a));
    assert!(ours[3 * MIB as usize..][..4096].iter().all(|&b| b == 0x11));
    assert!(ours[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn copy_into_server_commands_on_either_side() {
    let mut servers = Servers::new();
    // A file into qemu-nbd serving a raw image.
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 241) as u8).collect();
    let source = servers.path("source.bin");
    fs::write(&source, &data).unwrap();
    let target = servers.path("target.raw");
    fs::write(&target, vec![0xee; 2 * MIB as usize]).unwrap();
    let (server, pidfile) = servers.command(&["qemu-nbd", "-f", "raw", target.to_str().unwrap()]);
    let mut args = vec!["copy".to_string(), source.to_str().unwrap().into()];
    args.push("--".into());
    args.extend(server);
    assert_ok(&run_nbd(&args), "copy into qemu-nbd");
    assert_gone(&pidfile);
    assert!(fs::read(&target).unwrap() == data);

    // Both sides server commands: nbdkit's pattern into qemu-nbd.
    let target = servers.path("both.raw");
    fs::write(&target, vec![0xee; MIB as usize]).unwrap();
    let (src, src_pid) = servers.command(&["nbdkit", "pattern", "1M"]);
    let (dst, dst_pid) = servers.command(&["qemu-nbd", "-f", "raw", target.to_str().unwrap()]);
    assert_ok(
        &nbd_with(&["copy", "--flush"], &[&src, &dst], &[]),
        "copy between server commands",
    );
    assert_gone(&src_pid);
    assert_gone(&dst_pid);
    assert!(fs::read(&target).unwrap() == pattern_bytes(MIB));
}

/// `(offset, bytes)` of a data line of a hex dump in nbddump's layout
/// (which `nbd dump` shares); `None` for any other line.
fn dump_line(line: &str) -> Option<(u64, Vec<u8>)> {
    let (offset, rest) = line.split_once([' ', ':'])?;
    let hex = &rest[..rest.find('|')?];
    let bytes = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    Some((u64::from_str_radix(offset, 16).unwrap(), bytes))
}

/// Every data line of a hex dump.
fn dump_lines(dump: &str) -> Vec<(u64, Vec<u8>)> {
    dump.lines().filter_map(dump_line).collect()
}

/// The bytes a dump of `start..end` shows, with each `*` (lines repeating
/// the one before) expanded, so dumps are compared by what they say.
fn dump_bytes(dump: &str, start: u64, end: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut folded = false;
    let mut last = Vec::new();
    let at = |bytes: &Vec<u8>| start + bytes.len() as u64;
    for line in dump.lines() {
        if line == "*" {
            folded = true;
            continue;
        }
        let Some((offset, data)) = dump_line(line) else {
            continue;
        };
        while folded && at(&bytes) < offset {
            bytes.extend_from_slice(&last);
        }
        folded = false;
        assert_eq!(at(&bytes), offset, "a gap before {line}");
        bytes.extend_from_slice(&data);
        last = data;
    }
    while folded && at(&bytes) < end {
        bytes.extend_from_slice(&last);
    }
    bytes
}

#[test]
fn dump_of_a_server_command_matches_nbddump_and_the_same_server_by_uri() {
    let mut servers = Servers::new();
    let argv = ["nbdkit", "pattern", "4K"];
    let (server, pidfile) = servers.command(&argv);
    let ours = assert_ok(&nbd_with(&["dump"], &[&server], &[]), "dump");
    assert_gone(&pidfile);
    let theirs = text(&libnbd_tool("nbddump", &[], &argv).stdout);
    let lines = dump_lines(&ours);
    assert_eq!(lines.len(), 256, "{ours}");
    assert_eq!(lines, dump_lines(&theirs));
    // The same export reached by URI dumps the same text.
    let by_uri = NbdkitBuilder::pattern(4096).start();
    let out = run_nbd(["dump", by_uri.uri().as_str()]);
    assert_eq!(assert_ok(&out, "dump by URI"), ours);

    // qemu-nbd serving an image with text in it.
    let image = servers.path("text.raw");
    let mut bytes = vec![0u8; 8192];
    bytes[4090..4113].copy_from_slice(b"across a block boundary");
    fs::write(&image, &bytes).unwrap();
    let argv = ["qemu-nbd", "-f", "raw", image.to_str().unwrap()];
    let (server, pidfile) = servers.command(&argv);
    let ours = assert_ok(&nbd_with(&["dump"], &[&server], &[]), "dump qemu-nbd");
    assert_gone(&pidfile);
    assert!(ours.contains("|..........across|"), "{ours}");
    let theirs = text(&libnbd_tool("nbddump", &[], &argv).stdout);
    assert!(dump_bytes(&ours, 0, 8192) == bytes);
    assert!(dump_bytes(&theirs, 0, 8192) == bytes);

    let (server, pidfile) = servers.command(&["nbdkit", "pattern", "1M"]);
    let out = nbd_with(
        &["dump", "--offset", "1000", "--length", "24"],
        &[&server],
        &[],
    );
    let lines = dump_lines(&assert_ok(&out, "dump a window"));
    assert_gone(&pidfile);
    let bytes: Vec<u8> = lines.into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(bytes, pattern_bytes(1024)[1000..1024]);
}

#[test]
fn failures_name_the_server_and_stop_it() {
    let mut servers = Servers::new();
    // A missing program: one line naming it, not the shell's message.
    let out = run_nbd(["info", "--", "[", "/nonexistent/nbd-server", "]"]);
    let message = assert_fails(&out, "missing program");
    assert!(message.contains("/nonexistent/nbd-server"), "{message}");
    // A program that is no NBD server.
    let out = run_nbd(["dump", "--", "[", "true", "]"]);
    let message = assert_fails(&out, "not a server");
    assert!(message.contains("[ true ]"), "{message}");
    // A server that started, then a failure: the server still goes.
    let (server, pidfile) = servers.command(&["nbdkit", "memory", "1M"]);
    let out = nbd_with(&["info", "--map=no:such-context"], &[&server], &[]);
    let message = assert_fails(&out, "unknown context");
    assert!(message.contains("no:such-context"), "{message}");
    assert_gone(&pidfile);
    let (server, pidfile) = servers.command(&["nbdkit", "memory", "1M"]);
    let out = nbd_with(&["dump", "--offset", "2M"], &[&server], &[]);
    assert_fails(&out, "offset past the end");
    assert_gone(&pidfile);
    // A refusal during option negotiation names the server; the server is
    // told goodbye (NBD_OPT_ABORT) before it is stopped, so it has nothing
    // to complain about on stderr.
    let image = servers.path("named.raw");
    fs::write(&image, vec![0; 65536]).unwrap();
    let image = image.to_str().unwrap();
    let (server, pidfile) = servers.command(&["qemu-nbd", "-f", "raw", "-x", "disk", image]);
    let out = nbd_with(&["info"], &[&server], &[]);
    let message = assert_fails(&out, "export name refused");
    assert!(message.contains("[ sh -c"), "{message}");
    assert!(message.contains("not present"), "{message}");
    assert_gone(&pidfile);
    // The destination server is stopped when the source fails, and the
    // other way round.
    let (src, src_pid) = servers.command(&["nbdkit", "memory", "2M"]);
    let (dst, dst_pid) = servers.command(&["nbdkit", "-r", "memory", "2M"]);
    let out = nbd_with(&["copy"], &[&src, &dst], &[]);
    let message = assert_fails(&out, "read-only destination");
    assert!(message.contains("read-only"), "{message}");
    assert_gone(&src_pid);
    assert_gone(&dst_pid);
}

#[test]
fn malformed_server_commands_are_usage_errors() {
    for (args, says) in [
        (
            &["info", "--", "[", "nbdkit", "memory", "1M"][..],
            "without a matching",
        ),
        (
            &["info", "--", "nbdkit", "memory", "1M", "]"][..],
            "without a `[`",
        ),
        (&["dump", "--", "[", "]"][..], "no server command"),
        (&["info", "--", "[", "a", "]", "[", "b", "]"][..], "got 2"),
        (
            &["copy", "--", "[", "nbdkit", "null", "]"][..],
            "SRC and DST",
        ),
    ] {
        let out = run_nbd(args);
        // Usage errors exit 1, as nbdinfo's do (2 is the answer "no").
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn the_command_line_accepts_uris_naming_local_files() {
    // The user's own URI may name a PSK file (refused by the library's
    // default policy); it fails here only because the file is not there,
    // which is found out before connecting.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let uri = format!(
        "nbds+unix:///?socket={}&tls-psk-file=/nonexistent/keys.psk&tls-username=u",
        socket.display()
    );
    let message = assert_fails(&run_nbd(["info", uri.as_str()]), "psk file");
    assert!(message.contains("cannot read PSK file"), "{message}");
    assert!(message.contains("/nonexistent/keys.psk"), "{message}");
    // Unknown parameters are still diagnosed, naming the URI.
    let uri = format!("nbd+unix:///?socket={}&sokcet=x", socket.display());
    let message = assert_fails(&run_nbd(["info", uri.as_str()]), "unknown parameter");
    assert!(message.contains("sokcet"), "{message}");
}
