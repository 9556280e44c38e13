//! The `nbd` command always comes to an end: against a server whose framing
//! cannot be trusted, and when its own standard output goes away or fills up.
//!
//! The hostile server here is a few lines over a Unix socket: it negotiates
//! structured replies like any fixed-newstyle server, then answers every read
//! with a data chunk whose length field no read could allow, sends a few
//! bytes of it, and goes quiet while keeping the socket open. A client that
//! tried to skip the payload would wait forever; it must fail at once.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BufMut;
use nbd_proto::wire::consts::*;
use nbd_proto::wire::{ChunkHeader, GreetingStart, Info, OptionReplyHeader, RequestHeader};
use nbd_tests::testkit::nbd_binary;
use nbd_tests::NbdkitBuilder;

/// Long enough for a loaded machine; a hang is what this bound catches.
const LIMIT: Duration = Duration::from_secs(30);
const EXPORT_SIZE: u64 = 1 << 20;

/// A server listening on a private socket; each connection is served by
/// `serve` on a thread of its own. The socket file goes with the handle.
struct FakeServer {
    dir: PathBuf,
}

impl FakeServer {
    fn start(serve: fn(UnixStream)) -> FakeServer {
        let dir =
            std::env::temp_dir().join(format!("nbd-hostile-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("sock")).unwrap();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || serve(stream));
            }
        });
        FakeServer { dir }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.dir.join("sock").display())
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The handshake of a fixed-newstyle server with structured replies and one
/// writable 1 MiB export; every other option is unsupported. Returns once GO
/// was answered, or `None` if the client went away.
fn handshake(s: &mut UnixStream) -> Option<()> {
    let mut out = Vec::new();
    GreetingStart::Newstyle.encode(&mut out);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&out).ok()?;
    let mut client_flags = [0u8; 4];
    s.read_exact(&mut client_flags).ok()?;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).ok()?;
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).ok()?;
        let mut reply = Vec::new();
        match option {
            OPT_STRUCTURED_REPLY => {
                OptionReplyHeader::encode_with(option, REP_ACK, &[], &mut reply)
            }
            OPT_GO | OPT_INFO => {
                let mut info = Vec::new();
                Info::Export {
                    size: EXPORT_SIZE,
                    flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                }
                .encode(&mut info);
                OptionReplyHeader::encode_with(option, REP_INFO, &info, &mut reply);
                OptionReplyHeader::encode_with(option, REP_ACK, &[], &mut reply);
            }
            _ => OptionReplyHeader::encode_with(option, REP_ERR_UNSUP, &[], &mut reply),
        }
        s.write_all(&reply).ok()?;
        if option == OPT_GO {
            return Some(());
        }
    }
}

/// Answers the first read with an OFFSET_DATA chunk of almost 4 GiB, sends
/// its offset and 100 bytes of data, then keeps the socket open in silence.
fn serve_oversized_chunk(mut s: UnixStream) {
    if handshake(&mut s).is_none() {
        return;
    }
    let mut request = [0u8; 28];
    while s.read_exact(&mut request).is_ok() {
        let Ok(header) = RequestHeader::decode(&request) else {
            return;
        };
        if header.command != CMD_READ {
            continue;
        }
        let mut reply = Vec::new();
        ChunkHeader {
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_OFFSET_DATA,
            cookie: header.cookie,
            offset: 0,
            length: 0xFFFF_FFF0,
        }
        .encode_structured(&mut reply);
        reply.put_u64(header.offset);
        reply.extend_from_slice(&[0xAB; 100]);
        if s.write_all(&reply).is_err() {
            return;
        }
        // Quiet, with the socket open, until the client goes away.
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        return;
    }
}

/// Waits for `child` for at most [`LIMIT`]; kills it and panics if it is
/// still running then.
fn finish_within_limit(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what} did not finish within {LIMIT:?}: it hangs");
}

fn spawn_nbd(args: &[&str], stdout: Stdio) -> Child {
    Command::new(nbd_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stderr_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim_end().to_string()
}

#[test]
fn an_oversized_reply_chunk_ends_dump_and_copy_at_once() {
    let server = FakeServer::start(serve_oversized_chunk);
    let uri = server.uri();
    let runs: [(&str, Vec<&str>); 2] = [
        ("nbd dump", vec!["dump", "--length", "512", &uri]),
        ("nbd copy", vec!["copy", &uri, "null:"]),
    ];
    for (what, args) in runs {
        let out = finish_within_limit(spawn_nbd(&args, Stdio::null()), what);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr_line(&out));
        let err = stderr_line(&out);
        assert!(
            err.starts_with("nbd: ") && !err.contains('\n'),
            "{what}: want one error line, got {err:?}"
        );
        assert!(
            err.contains("chunk") || err.contains("length"),
            "{what}: the error should say what was wrong with the reply: {err:?}"
        );
    }
}

/// Runs `nbd ARGS` with its standard output a pipe whose reader has already
/// gone away.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let child = spawn_nbd(args, Stdio::piped());
    // Dropping the read end before the command writes makes every write EPIPE.
    let mut child = child;
    drop(child.stdout.take());
    finish_within_limit(child, &format!("nbd {args:?}"))
}

fn run_into(path: &Path, args: &[&str]) -> Output {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    finish_within_limit(spawn_nbd(args, Stdio::from(file)), &format!("nbd {args:?}"))
}

#[test]
fn a_closed_standard_output_ends_quietly() {
    let server = NbdkitBuilder::memory("1M").start();
    let uri = server.uri();
    let cases: [&[&str]; 5] = [
        &["info", &uri],
        &["info", "--json", &uri],
        &["info", "--size", &uri],
        &["info", "--map", &uri],
        &["dump", &uri],
    ];
    for args in cases {
        for _ in 0..5 {
            let out = run_into_closed_pipe(args);
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "nbd {args:?} into a closed pipe: {} {:?}",
                out.status,
                stderr_line(&out)
            );
        }
    }
}

#[test]
fn a_full_standard_output_is_one_line_and_exit_1() {
    let full = Path::new("/dev/full");
    assert!(full.exists(), "/dev/full is missing on this machine");
    let server = NbdkitBuilder::memory("1M").start();
    let uri = server.uri();
    let cases: [&[&str]; 4] = [
        &["info", &uri],
        &["info", "--json", &uri],
        &["info", "--size", &uri],
        &["dump", &uri],
    ];
    for args in cases {
        let out = run_into(full, args);
        assert_eq!(out.status.code(), Some(1), "nbd {args:?} into /dev/full");
        let err = stderr_line(&out);
        assert!(
            err.starts_with("nbd: error writing to standard output:") && !err.contains('\n'),
            "nbd {args:?} into /dev/full: {err:?}"
        );
    }
}
