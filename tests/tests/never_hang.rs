//! Never hang, never lose a write: the adapters' waits against real servers.
//!
//! - `poll` with nothing in flight and nothing to send returns at once;
//! - a refused handshake reaches the documented nbd-mio loop as an error;
//! - the stall timeout of `set_timeout` bounds `poll` and `poll_many` too:
//!   it ends the connection and the read completes once, with the cause;
//! - a graceful shutdown waits for every write in flight, and reports the
//!   ones that failed; `Ok` means the data is on the server.
//!
//! A wait that would hang runs in a thread of its own, bounded by
//! [`HANG_LIMIT`]: a hang fails the test instead of stalling the run. The
//! bound is generous; nothing here measures speed.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mio::{Events, Poll, Token};
use nbd_blocking::{Client, ExportFile};
use nbd_proto::{CmdFlags, Config, Errno};
use nbd_tests::{NbdServerBuilder, NbdkitBuilder, QemuNbdBuilder, ServerHandle};

const KIB: usize = 1 << 10;
const MIB: u64 = 1 << 20;
/// Anything still running after this long is hung.
const HANG_LIMIT: Duration = Duration::from_secs(20);

/// Runs `f` on its own thread and returns its result; panics naming `what`
/// if it has not returned within [`HANG_LIMIT`] (the thread is left behind).
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    nbd_tests::testkit::bounded(what, HANG_LIMIT, f)
}

// ------------------------------------------------------------------ 1: idle poll

/// The blocking bench's trap: one `poll` can complete every command in
/// flight; a loop that takes the completions and polls again before
/// submitting more polls with nothing in flight. That poll (and `poll_many`)
/// returns `Ok(false)` at once instead of waiting for a server that owes
/// nothing.
#[test]
fn blocking_poll_with_nothing_in_flight_returns_at_once() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    let uri = server.uri();
    bounded("poll with nothing in flight", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        // Idle from the start.
        assert!(!client.poll(None).unwrap());
        for i in 0..64u64 {
            client
                .aio_pwrite(Bytes::from(vec![7; 4 * KIB]), i * 4096, CmdFlags::empty())
                .unwrap();
        }
        while client.in_flight() > 0 {
            client.poll(None).unwrap();
        }
        let mut taken = 0;
        while let Some(done) = client.next_completion() {
            done.result.unwrap();
            taken += 1;
        }
        assert_eq!(taken, 64);
        assert!(!client.poll(None).unwrap(), "nothing can have moved");
        assert!(!Client::poll_many(&mut [&mut client], None).unwrap());
        client.shutdown().unwrap();
    });
}

/// `wait_for` a cookie that was already taken is an error, not a wait forever.
#[test]
fn blocking_wait_for_a_taken_cookie_is_an_error() {
    let server = NbdkitBuilder::memory(MIB).start();
    let uri = server.uri();
    bounded("wait_for a taken cookie", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        let cookie = client
            .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        client.wait_for(cookie).unwrap().result.unwrap();
        let err = client.wait_for(cookie).expect_err("already taken");
        assert_eq!(err.errno(), Some(Errno::Inval), "{err}");
        client.shutdown().unwrap();
    });
}

// ------------------------------------------------------------------ 3: refused handshake

/// The loop of `nbd_mio::Client`'s documentation, up to ready.
fn mio_doc_loop(uri: &str) -> nbd_mio::Result<()> {
    let mut poll = Poll::new()?;
    let mut client =
        nbd_mio::Client::connect_uri(uri, Config::default(), poll.registry(), Token(0))?;
    let mut events = Events::with_capacity(16);
    while !client.connection().is_ready() {
        poll.poll(&mut events, None)?;
        for e in events.iter() {
            client.handle_event(e)?;
        }
    }
    Ok(())
}

/// The same loop over a `MultiConn` of two connections.
fn multi_doc_loop(uri: &str) -> nbd_mio::Result<()> {
    let mut poll = Poll::new()?;
    let mut group =
        nbd_mio::MultiConn::connect_uri(uri, 2, Config::default(), poll.registry(), Token(0))?;
    let mut events = Events::with_capacity(16);
    while !group.is_ready()? {
        poll.poll(&mut events, None)?;
        for e in events.iter() {
            group.handle_event(e)?;
        }
    }
    Ok(())
}

fn assert_refused(server: &ServerHandle) {
    let uri = server.uri_for("no-such-export");
    for (name, doc_loop) in [
        ("Client", mio_doc_loop as fn(&str) -> nbd_mio::Result<()>),
        ("MultiConn", multi_doc_loop),
    ] {
        let what = format!("{} {name} loop on {uri}", server.kind());
        let uri = uri.clone();
        let result = bounded(&what, move || doc_loop(&uri));
        let err = result.expect_err(&format!("{what}: ready on an export that does not exist"));
        assert!(
            err.errno().is_some(),
            "{what}: an NBD-level error, not {err:?}"
        );
    }
}

#[test]
fn mio_refused_export_reaches_the_loop_nbdkit() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("exportname")
        .param("exportname", "disk")
        .param("exportname-strict", "true")
        .export_name("disk")
        .start();
    assert_refused(&server);
}

#[test]
fn mio_refused_export_reaches_the_loop_qemu_nbd() {
    let server = QemuNbdBuilder::raw(MIB).export_name("disk").start();
    assert_refused(&server);
}

#[test]
fn mio_refused_export_reaches_the_loop_nbd_server() {
    let server = NbdServerBuilder::new().export("disk", MIB).start();
    assert_refused(&server);
}

/// Once dead, every later `drive` returns the error again: a loop that
/// missed the first one still cannot mistake the connection for alive.
#[test]
fn mio_dead_connection_error_is_sticky() {
    let server = QemuNbdBuilder::raw(MIB).export_name("disk").start();
    let uri = server.uri_for("nope");
    bounded("the sticky error", move || {
        let mut poll = Poll::new().unwrap();
        let mut client =
            nbd_mio::Client::connect_uri(&uri, Config::default(), poll.registry(), Token(3))
                .unwrap();
        let mut events = Events::with_capacity(16);
        let first = loop {
            poll.poll(&mut events, None).unwrap();
            if let Some(err) = events.iter().find_map(|e| client.handle_event(e).err()) {
                break err;
            }
        };
        assert!(client.is_closed(), "{first}");
        for _ in 0..3 {
            let again = client.drive().expect_err("still dead");
            assert_eq!(again.errno(), first.errno(), "{again} after {first}");
            assert!(client.send().is_err());
        }
    });
}

// ------------------------------------------------------------------ 4: timeouts

/// A server that sits on every read for 30 s, so nothing arrives while the test runs.
fn stalling_server() -> ServerHandle {
    NbdkitBuilder::pattern(MIB)
        .filter("delay")
        .param("delay-read", "30")
        .start()
}

/// An aio loop polling with a short timeout gets `ETIMEDOUT` once the server
/// has made no progress for the time of `set_timeout`, instead of spinning;
/// the stalled connection is over and its read completed once.
#[test]
fn blocking_poll_honours_set_timeout() {
    let server = stalling_server();
    let uri = server.uri();
    let err = bounded("poll against a stalled server", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_timeout(Some(Duration::from_millis(500)));
        client
            .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        let err = loop {
            if let Err(e) = client.poll(Some(Duration::from_millis(20))) {
                break e;
            }
        };
        assert_stalled_read_completed_once(&mut client);
        err
    });
    assert_eq!(err.errno(), Some(Errno::TimedOut), "{err:?}");
}

/// The same with `poll(None)`: the timeout is the only limit.
#[test]
fn blocking_poll_none_honours_set_timeout() {
    let server = stalling_server();
    let uri = server.uri();
    let err = bounded("poll(None) against a stalled server", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_timeout(Some(Duration::from_millis(500)));
        client
            .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        let err = loop {
            if let Err(e) = client.poll(None) {
                break e;
            }
        };
        assert_stalled_read_completed_once(&mut client);
        err
    });
    assert_eq!(err.errno(), Some(Errno::TimedOut), "{err:?}");
}

/// `poll_many` over a stalled client and an idle one: `TimedOut` from the
/// stalled client's own timeout.
#[test]
fn blocking_poll_many_honours_set_timeout() {
    let stalled = stalling_server();
    let idle = NbdkitBuilder::memory(MIB).start();
    let (stalled_uri, idle_uri) = (stalled.uri(), idle.uri());
    let err = bounded("poll_many against a stalled server", move || {
        let mut a = Client::connect_uri(&stalled_uri).unwrap();
        let mut b = Client::connect_uri(&idle_uri).unwrap();
        a.set_timeout(Some(Duration::from_millis(500)));
        a.aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        loop {
            if let Err(e) =
                Client::poll_many(&mut [&mut a, &mut b], Some(Duration::from_millis(20)))
            {
                break e;
            }
        }
    });
    assert_eq!(err.errno(), Some(Errno::TimedOut), "{err:?}");
}

/// After a stall ended the connection: nothing is in flight, and the one
/// read completed exactly once, failed by the stall.
fn assert_stalled_read_completed_once(client: &mut Client) {
    assert_eq!(client.in_flight(), 0, "the stall ended the read");
    let done = client.next_completion().expect("the read completed");
    let cause = done.result.expect_err("a stalled read cannot succeed");
    assert!(
        matches!(&cause, nbd_proto::Error::ConnectionLost(c) if c.errno() == Errno::TimedOut),
        "{cause:?}"
    );
    assert!(client.next_completion().is_none(), "completed only once");
}

// ------------------------------------------------------------------ 6: graceful shutdown

const WRITES: u64 = 64;
const WRITE_LEN: usize = 64 * KIB;
/// Each round writes one 4 MiB region; rounds cycle over 16 regions.
const REGION: u64 = WRITES * WRITE_LEN as u64;
const REGIONS: u64 = 16;

/// The byte write `i` of round `round` fills its 64 KiB with: different from
/// the same write 16 rounds earlier, so a lost write shows as stale data.
fn fill(round: u64, i: u64) -> u8 {
    (round.wrapping_mul(37) ^ i.wrapping_mul(101)) as u8 | 1
}

fn round_offset(round: u64) -> u64 {
    (round % REGIONS) * REGION
}

/// Reads a round's region back on a fresh connection and checks every write.
fn assert_round_landed(uri: &str, round: u64) {
    let mut reader = Client::connect_uri(uri).unwrap();
    reader.set_timeout(Some(HANG_LIMIT));
    let data = reader
        .pread(
            BytesMut::zeroed(REGION as usize),
            round_offset(round),
            CmdFlags::empty(),
        )
        .unwrap();
    for i in 0..WRITES {
        let chunk = &data[(i as usize) * WRITE_LEN..][..WRITE_LEN];
        let want = fill(round, i);
        let bad = chunk.iter().filter(|&&b| b != want).count();
        assert_eq!(
            bad, 0,
            "round {round}: write {i} reported done by shutdown is not on the server"
        );
    }
    reader.shutdown().unwrap();
}

/// 64 × 64 KiB `aio_pwrite`, then `shutdown()` at once, for many rounds:
/// shutdown waits for them, so when it says `Ok` a fresh connection reads
/// every byte back.
#[test]
fn blocking_shutdown_waits_for_writes_in_flight() {
    let server = NbdkitBuilder::memory(REGIONS * REGION).start();
    let uri = server.uri();
    bounded("shutdown rounds", move || {
        for round in 0..100 {
            let mut client = Client::connect_uri(&uri).unwrap();
            client.set_timeout(Some(HANG_LIMIT));
            for i in 0..WRITES {
                let data = Bytes::from(vec![fill(round, i); WRITE_LEN]);
                let offset = round_offset(round) + i * WRITE_LEN as u64;
                client.aio_pwrite(data, offset, CmdFlags::empty()).unwrap();
            }
            client
                .shutdown()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_round_landed(&uri, round);
        }
    });
}

/// The same through nbd-mio: `disconnect` with the writes in flight, handle
/// events until closed; every write succeeded (none cut short by an early
/// `NBD_CMD_DISC`) and is on the server.
#[test]
fn mio_disconnect_waits_for_writes_in_flight() {
    let server = NbdkitBuilder::memory(REGIONS * REGION).start();
    let uri = server.uri();
    bounded("mio disconnect rounds", move || {
        for round in 0..30 {
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(64);
            let mut client =
                nbd_mio::Client::connect_uri(&uri, Config::default(), poll.registry(), Token(1))
                    .unwrap();
            while !client.connection().is_ready() {
                poll.poll(&mut events, None).unwrap();
                for e in events.iter() {
                    client.handle_event(e).unwrap();
                }
            }
            for i in 0..WRITES {
                let data = Bytes::from(vec![fill(round, i); WRITE_LEN]);
                let offset = round_offset(round) + i * WRITE_LEN as u64;
                client.aio_pwrite(data, offset, CmdFlags::empty()).unwrap();
            }
            client.send().unwrap();
            client.aio_disconnect().unwrap();
            let refused = client
                .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
                .expect_err("no new command after disconnect");
            assert_eq!(refused.errno(), Some(Errno::Shutdown), "{refused}");
            let mut done = 0;
            while !client.is_closed() {
                poll.poll(&mut events, None).unwrap();
                for e in events.iter() {
                    client.handle_event(e).unwrap();
                }
                while let Some(c) = client.next_completion() {
                    c.result
                        .unwrap_or_else(|e| panic!("round {round}: a write failed: {e}"));
                    done += 1;
                }
            }
            while let Some(c) = client.next_completion() {
                c.result
                    .unwrap_or_else(|e| panic!("round {round}: a write failed: {e}"));
                done += 1;
            }
            assert_eq!(done, WRITES, "round {round}");
            client.close().unwrap();
            assert_round_landed(&uri, round);
        }
    });
}

/// Writes the server fails, whose completions the caller never took: the
/// shutdown must not say `Ok`; it names how many failed and why.
#[test]
fn blocking_shutdown_reports_failed_writes_never_taken() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("error")
        .param("error-pwrite", "EIO")
        .param("error-pwrite-rate", "100%")
        .start();
    let uri = server.uri();
    let err = bounded("shutdown after failed writes", move || {
        let mut client = Client::connect_uri(&uri).unwrap();
        for i in 0..3 {
            client
                .aio_pwrite(Bytes::from(vec![1; 4096]), i * 4096, CmdFlags::empty())
                .unwrap();
        }
        client.shutdown().expect_err("three writes failed")
    });
    match &err {
        nbd_blocking::Error::CommandsFailed { count, first } => {
            assert_eq!(*count, 3, "{err}");
            assert_eq!(first.errno(), Errno::Io, "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains('3'), "{err}");
}

/// nbd-mio's `close` with writes still in flight abandons them: an error,
/// never `Ok`.
#[test]
fn mio_close_with_writes_in_flight_is_an_error() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-write", "5")
        .start();
    let uri = server.uri();
    let err = bounded("close with writes in flight", move || {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(16);
        let mut client =
            nbd_mio::Client::connect_uri(&uri, Config::default(), poll.registry(), Token(0))
                .unwrap();
        while !client.connection().is_ready() {
            poll.poll(&mut events, None).unwrap();
            for e in events.iter() {
                client.handle_event(e).unwrap();
            }
        }
        client
            .aio_pwrite(Bytes::from(vec![1; 4096]), 0, CmdFlags::empty())
            .unwrap();
        client.send().unwrap();
        client.close().expect_err("a write was still in flight")
    });
    match &err {
        nbd_mio::Error::CommandsFailed { count, .. } => assert_eq!(*count, 1, "{err}"),
        other => panic!("{other:?}"),
    }
}

/// `ExportFile::flush` after a write that timed out (still in flight in the
/// server's delay filter): the flush must not report success for it.
#[test]
fn export_file_flush_does_not_pass_a_write_still_in_flight() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-write", "5")
        .start();
    let uri = server.uri();
    bounded("flush after a timed-out write", move || {
        use std::io::Write;
        let mut client = Client::connect_uri(&uri).unwrap();
        client.set_timeout(Some(Duration::from_millis(300)));
        let mut file = ExportFile::new(client).unwrap();
        let err = file.write(&[5; 4096]).expect_err("the write times out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        file.flush()
            .expect_err("the write was never acknowledged: flush must not succeed");
    });
}
