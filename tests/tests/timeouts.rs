//! Bounded waits against a real server: nbdkit's delay filter holds replies
//! back, and the core's deadlines (kept by each adapter's wait) end them.
//!
//! - a command deadline completes that command alone with `ETIMEDOUT`; its
//!   late reply is dropped and the next command on the connection works
//!   (blocking and mio);
//! - a stall deadline ends the connection, every pending command once;
//! - waiting costs no CPU: the thread's CPU time over a long wait stays tiny;
//! - `nbd --timeout` ends dump and copy with one line naming the side and
//!   what it waited for.
//!
//! Nothing here asserts on wall-clock speed: the limits below only turn a
//! hang into a failure, and a delayed reply comes seconds after the deadline
//! that must beat it, so a busy machine does not change the order. A test whose client leaves with reads in flight has
//! a server of its own (Debian's nbdkit 1.32 aborts then).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Poll, Token};
use nbd_blocking::Client;
use nbd_proto::{CmdFlags, Config, Errno};
use nbd_tests::testkit::{nbd_binary, pattern_at};
use nbd_tests::{NbdkitBuilder, ServerHandle};

const MIB: u64 = 1 << 20;
/// Anything still running after this long is hung.
const HANG_LIMIT: Duration = Duration::from_secs(30);

/// Runs `f` on its own thread; panics naming `what` if it hangs.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    nbd_tests::testkit::bounded(what, HANG_LIMIT, f)
}

/// A pattern export whose every read is answered after `delay`.
fn slow_reads(delay: &str) -> ServerHandle {
    NbdkitBuilder::pattern(MIB)
        .filter("delay")
        .param("delay-read", delay)
        .start()
}

/// CPU time (user + system) this thread has used so far.
fn thread_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Far below what a loop that spins for a second uses, far above what a
/// few wake-ups cost.
const IDLE_CPU: Duration = Duration::from_millis(150);

#[test]
fn blocking_command_deadline_fires_and_the_connection_goes_on() {
    let server = slow_reads("3");
    let uri = server.uri();
    bounded("a read past its command deadline", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_command_timeout(Some(Duration::from_millis(200)));
        let err = client
            .pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
            .expect_err("the read is slower than its deadline");
        assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");
        assert_eq!(client.in_flight(), 0, "the timed-out read completed");
        assert!(client.connection().is_ready(), "the connection goes on");
        // No deadline now: this read waits for its own reply, which comes
        // after the late reply of the first, and is not mistaken for it.
        client.set_command_timeout(None);
        let buf = client
            .pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
            .unwrap();
        assert_eq!(&buf[..], &pattern_at(8192, 4096)[..]);
        assert!(client.next_completion().is_none(), "no second completion");
        client.shutdown().unwrap();
    });
}

#[test]
fn blocking_stall_deadline_ends_the_connection() {
    let server = slow_reads("10");
    let uri = server.uri();
    bounded("a stalled server", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_timeout(Some(Duration::from_millis(300)));
        for offset in [0, 512] {
            client
                .aio_pread(BytesMut::zeroed(512), offset, CmdFlags::empty())
                .unwrap();
        }
        let err = loop {
            match client.poll(None) {
                Err(e) => break e,
                Ok(_) => assert!(client.next_completion().is_none(), "no read can succeed"),
            }
        };
        assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");
        assert!(client.connection().is_dead(), "a stall ends the connection");
        assert_eq!(client.in_flight(), 0);
        let mut failed = 0;
        while let Some(done) = client.next_completion() {
            let cause = done.result.expect_err("a stalled read fails");
            assert!(
                matches!(&cause, nbd_proto::Error::ConnectionLost(c) if c.errno() == Errno::TimedOut),
                "{cause:?}"
            );
            assert!(done.buffer.is_some(), "the buffer comes back");
            failed += 1;
        }
        assert_eq!(failed, 2, "each read completes once");
        let again = client.pread(BytesMut::zeroed(512), 0, CmdFlags::empty());
        assert!(again.is_err(), "the dead connection refuses new commands");
    });
}

#[test]
fn blocking_wait_uses_no_cpu() {
    let server = slow_reads("1500ms");
    let uri = server.uri();
    bounded("a blocking read of a slow server", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        // Deadlines set but far away: the wait sleeps until them or the reply.
        client.set_timeout(Some(Duration::from_secs(20)));
        client.set_command_timeout(Some(Duration::from_secs(20)));
        let before = thread_cpu();
        let started = Instant::now();
        let buf = client
            .pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
            .unwrap();
        let waited = started.elapsed();
        let used = thread_cpu() - before;
        assert_eq!(&buf[..], &pattern_at(0, 4096)[..]);
        // The delay filter held the reply back, so this was a real wait.
        assert!(waited >= Duration::from_millis(1000), "waited {waited:?}");
        assert!(used < IDLE_CPU, "{used:?} of CPU over a {waited:?} wait");
        client.shutdown().unwrap();
    });
}

#[test]
fn mio_loop_sleeps_until_the_deadline_and_the_connection_goes_on() {
    let server = slow_reads("3");
    let uri = server.uri();
    bounded("a mio read past its command deadline", move || {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(8);
        let config = Config::default().handshake_timeout(Some(Duration::from_secs(20)));
        let mut client =
            nbd_mio::Client::connect_uri(&uri, config, poll.registry(), Token(1)).unwrap();
        while !client.connection().is_ready() {
            poll.poll(&mut events, client.poll_timeout()).unwrap();
            for e in events.iter() {
                client.handle_event(e).unwrap();
            }
            client.handle_timeout(Instant::now()).unwrap();
        }
        let before = thread_cpu();
        client
            .connection_mut()
            .set_command_timeout(Some(Duration::from_millis(500)));
        let late = client
            .aio_pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
            .unwrap();
        client.connection_mut().set_command_timeout(None);
        let on_time = client
            .aio_pread(BytesMut::zeroed(4096), 4096, CmdFlags::empty())
            .unwrap();
        client.send().unwrap();
        let mut done = Vec::new();
        while done.len() < 2 {
            // Without the deadline as poll's timeout, nothing would wake
            // this loop before the first reply.
            let timeout = client.poll_timeout();
            if done.is_empty() {
                assert!(timeout.is_some(), "the loop learns the deadline");
            }
            poll.poll(&mut events, timeout).unwrap();
            for e in events.iter() {
                client.handle_event(e).unwrap();
            }
            client.handle_timeout(Instant::now()).unwrap();
            while let Some(c) = client.next_completion() {
                done.push(c);
            }
        }
        let used = thread_cpu() - before;
        assert_eq!(done[0].cookie, late, "the deadline fired before any reply");
        let err = done[0].result.clone().expect_err("timed out");
        assert_eq!(err.errno(), Errno::TimedOut);
        assert_eq!(done[1].cookie, on_time);
        done[1].result.clone().unwrap();
        assert_eq!(
            &done[1].buffer.as_ref().unwrap()[..],
            &pattern_at(4096, 4096)[..]
        );
        assert!(used < IDLE_CPU, "{used:?} of CPU while the loop waited");
        assert!(
            client.next_completion().is_none(),
            "the late reply was dropped"
        );
    });
}

fn run_nbd(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    bounded("the nbd command", move || {
        Command::new(nbd_binary())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    })
}

/// The one line of standard error, checked to be one line.
fn one_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(text.lines().count(), 1, "{text}");
    text
}

#[test]
fn nbd_dump_timeout_names_the_server_and_the_read() {
    let server = slow_reads("20");
    let out = run_nbd(&["dump", "--timeout", "0.5", "--length", "512", &server.uri()]);
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(
        line.contains("server") && line.contains(&server.uri()),
        "{line}"
    );
    assert!(
        line.contains("--timeout") && line.contains("a read"),
        "{line}"
    );
}

#[test]
fn nbd_copy_timeout_names_the_side() {
    let slow_source = slow_reads("20");
    let out = run_nbd(&["copy", "--timeout", "0.5", &slow_source.uri(), "null:"]);
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(
        line.contains("source") && line.contains("--timeout"),
        "{line}"
    );
    assert!(line.contains("replies to reads"), "{line}");

    let source = NbdkitBuilder::pattern(MIB).start();
    let slow_dest = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-write", "20")
        .start();
    let out = run_nbd(&["copy", "--timeout", "0.5", &source.uri(), &slow_dest.uri()]);
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(
        line.contains("destination") && line.contains("writes"),
        "{line}"
    );
}

#[test]
fn nbd_timeout_bounds_the_handshake_of_a_silent_server() {
    // A listener that accepts nothing: the connect succeeds (the backlog
    // takes it), and the server's greeting never comes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let uri = format!("nbd+unix:///?socket={}", path.display());
    for args in [
        vec!["info", "--timeout", "0.5", &uri],
        vec!["copy", "--timeout", "0.5", &uri, "null:"],
    ] {
        let out = run_nbd(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let line = one_line(&out);
        assert!(
            line.contains("handshake") && line.contains("--timeout"),
            "{line}"
        );
    }
}

#[test]
fn nbd_info_timeout_is_validated() {
    let out = run_nbd(&["info", "--timeout", "0", "nbd://localhost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout"));
}

/// A multi-conn group learns its connections' deadlines the same way.
#[test]
fn mio_multi_conn_passes_deadlines_to_its_connections() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-read", "3")
        .start();
    let uri = server.uri();
    bounded("a multi-conn read past its deadline", move || {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(8);
        let config = Config::default().command_timeout(Some(Duration::from_millis(300)));
        let mut group =
            nbd_mio::MultiConn::connect_uri(&uri, 2, config, poll.registry(), Token(10)).unwrap();
        while !group.is_ready().unwrap() {
            poll.poll(&mut events, group.poll_timeout()).unwrap();
            for e in events.iter() {
                group.handle_event(e).unwrap();
            }
            group.handle_timeout(Instant::now()).unwrap();
        }
        let cookie = group
            .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        group.send().unwrap();
        let done = loop {
            assert!(group.poll_timeout().is_some(), "the deadline is known");
            poll.poll(&mut events, group.poll_timeout()).unwrap();
            for e in events.iter() {
                group.handle_event(e).unwrap();
            }
            group.handle_timeout(Instant::now()).unwrap();
            if let Some(done) = group.next_completion() {
                break done;
            }
        };
        assert_eq!(done.cookie, cookie);
        assert_eq!(done.result.unwrap_err().errno(), Errno::TimedOut);
    });
}

/// A listener that never greets: the handshake deadline ends the connect in
/// both adapters, with `ETIMEDOUT`.
#[test]
fn handshake_deadline_ends_a_silent_server_in_both_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let uri = format!("nbd+unix:///?socket={}", path.display());
    let config = || Config::default().handshake_timeout(Some(Duration::from_millis(300)));
    let blocking_uri = uri.clone();
    let err = bounded("a blocking handshake with a silent server", move || {
        Client::connect_uri_with(&blocking_uri, config()).map(drop)
    })
    .expect_err("no greeting ever comes");
    assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");

    let err = bounded("a mio handshake with a silent server", move || {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(8);
        let mut client =
            nbd_mio::Client::connect_uri(&uri, config(), poll.registry(), Token(5)).unwrap();
        loop {
            assert!(
                client.poll_timeout().is_some(),
                "the loop knows the deadline"
            );
            poll.poll(&mut events, client.poll_timeout()).unwrap();
            for e in events.iter() {
                if let Err(e) = client.handle_event(e) {
                    return e;
                }
            }
            if let Err(e) = client.handle_timeout(Instant::now()) {
                assert!(client.is_closed());
                return e;
            }
        }
    });
    assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");
}
