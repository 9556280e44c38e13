//! What only the mio adapter (`nbd_mio`) has to get right: resuming partial
//! writes on writable events, several connections sharing one `Poll`, a
//! server dying under one of them, waiting without burning CPU, non-blocking
//! connects (and refused ones), and `MultiConn`.
//!
//! Every loop here is the one an application writes: `poll`, then
//! `handle_event` for each event, then take completions. Nothing calls
//! `drive` on a timer, so a lost edge-triggered wakeup shows up as a
//! time-limit panic, never as a test that passes by polling.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mio::{Events, Poll, Token};
use nbd_io::{Connecting, Target, Transports, UriPolicy};
use nbd_mio::{Client, MultiCompletion, MultiConn, MultiCookie};
use nbd_proto::{CmdFlags, Completion, Config, Cookie, Errno, Event};
use nbd_tests::testkit::{pattern_at, Rng};
use nbd_tests::{NbdkitBuilder, QemuNbdBuilder};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The longest any loop here runs before it panics.
const LIMIT: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ the loop

/// Several [`Client`]s in one `Poll`, client `i` under `Token(i)`.
struct Loop {
    poll: Poll,
    events: Events,
    clients: Vec<Client>,
    /// Errors `handle_event` returned, by client.
    errors: Vec<Vec<nbd_mio::Error>>,
    /// Completions taken from each client, in arrival order.
    done: Vec<Vec<Completion>>,
    /// Other events (`Ready`, `Closed`, ...), by client.
    other: Vec<Vec<Event>>,
    /// Times `poll` returned.
    wakeups: u64,
    /// Events seen per client.
    event_count: Vec<u64>,
}

impl Loop {
    fn new() -> Self {
        Loop {
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(64),
            clients: Vec::new(),
            errors: Vec::new(),
            done: Vec::new(),
            other: Vec::new(),
            wakeups: 0,
            event_count: Vec::new(),
        }
    }

    fn next_token(&self) -> Token {
        Token(self.clients.len())
    }

    fn push(&mut self, client: Client) -> usize {
        assert_eq!(client.token(), self.next_token());
        self.clients.push(client);
        self.errors.push(Vec::new());
        self.done.push(Vec::new());
        self.other.push(Vec::new());
        self.event_count.push(0);
        self.clients.len() - 1
    }

    /// Starts a non-blocking connect to `uri`; returns the client's index.
    fn connect(&mut self, uri: &str) -> usize {
        let token = self.next_token();
        let client = Client::connect_uri(uri, Config::default(), self.poll.registry(), token)
            .unwrap_or_else(|e| panic!("connect_uri {uri}: {e}"));
        self.push(client)
    }

    /// One `poll` (up to `timeout`) and its events.
    fn turn(&mut self, timeout: Duration) {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => panic!("poll: {e}"),
        }
        self.wakeups += 1;
        for event in self.events.iter() {
            let i = event.token().0;
            assert!(
                i < self.clients.len(),
                "event for unknown {:?}",
                event.token()
            );
            self.event_count[i] += 1;
            if let Err(e) = self.clients[i].handle_event(event) {
                self.errors[i].push(e);
            }
        }
        self.absorb();
    }

    fn absorb(&mut self) {
        for (i, c) in self.clients.iter_mut().enumerate() {
            while let Some(done) = c.next_completion() {
                self.done[i].push(done);
            }
            while let Some(e) = c.next_event() {
                self.other[i].push(e);
            }
        }
    }

    /// Turns until `cond` holds; panics with `what` after [`LIMIT`].
    fn run_until(&mut self, what: &str, mut cond: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + LIMIT;
        loop {
            self.absorb();
            if cond(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "waited {LIMIT:?} for {what}: in flight {:?}, closed {:?}, errors {:?}",
                self.clients
                    .iter()
                    .map(Client::in_flight)
                    .collect::<Vec<_>>(),
                self.clients
                    .iter()
                    .map(Client::is_closed)
                    .collect::<Vec<_>>(),
                self.errors
            );
            self.turn(left.min(Duration::from_secs(1)));
        }
    }

    fn ready(&mut self) {
        self.run_until("every handshake", |l| {
            for (i, c) in l.clients.iter().enumerate() {
                assert!(
                    !c.is_closed(),
                    "client {i} closed during the handshake: {:?} {:?}",
                    c.connection().error(),
                    l.errors[i]
                );
            }
            l.clients.iter().all(|c| c.connection().is_ready())
        });
    }

    /// Runs until client `i` has `n` completions, and takes them.
    fn take(&mut self, i: usize, n: usize) -> Vec<Completion> {
        self.run_until(&format!("{n} completions on client {i}"), |l| {
            l.done[i].len() >= n
        });
        std::mem::take(&mut self.done[i])
    }

    fn send(&mut self, i: usize) {
        if let Err(e) = self.clients[i].send() {
            self.errors[i].push(e);
        }
    }
}

/// CPU time (user + system) this thread has used. Per thread, not per
/// process: the test harness runs other tests in parallel threads.
fn thread_cpu_time() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the rusage we own; RUSAGE_THREAD is Linux's.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A loopback TCP port that refuses connections: a socket bound to it but
/// not listening, kept open (the returned fd) so that no server of a test
/// running in parallel can take the port meanwhile, as it could a port that
/// was merely found free.
fn refusing_port() -> (OwnedFd, u16) {
    // SAFETY: plain socket calls on a descriptor this function owns, with
    // a zeroed sockaddr_in of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let rc = libc::getsockname(
            fd.as_raw_fd(),
            (&raw mut addr).cast::<libc::sockaddr>(),
            &mut len,
        );
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        (fd, u16::from_be(addr.sin_port))
    }
}

fn by_cookie(done: Vec<Completion>) -> std::collections::HashMap<Cookie, Completion> {
    let n = done.len();
    let map: std::collections::HashMap<_, _> = done.into_iter().map(|c| (c.cookie, c)).collect();
    assert_eq!(map.len(), n, "a cookie completed twice");
    map
}

// ------------------------------------------------------------------ partial writes

/// 32 MiB of writes in flight (8 × 4 MiB) against nbdkit taking one request
/// at a time and sitting on each for 100 ms: the socket buffer fills, the
/// adapter must stop on `WouldBlock`, wait for writable events and resume
/// exactly where it stopped. Then 32 MiB of reads in flight (replies larger
/// than any socket buffer arrive in pieces) read it all back.
#[test]
fn partial_writes_resume_on_writable_events() {
    const PIECE: usize = 4 * MIB as usize;
    const PIECES: usize = 8;
    let server = NbdkitBuilder::memory(40 * MIB)
        .threads(1)
        .filter("delay")
        .param("delay-write", "100ms")
        .start();
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    let mut rng = Rng::new(4);
    let data: Vec<Bytes> = (0..PIECES).map(|_| Bytes::from(rng.bytes(PIECE))).collect();

    let cpu_before = thread_cpu_time();
    let started = Instant::now();
    let mut cookies = Vec::new();
    for (i, piece) in data.iter().enumerate() {
        let offset = MIB + (i * PIECE) as u64;
        cookies.push(
            l.clients[c]
                .aio_pwrite(piece.clone(), offset, CmdFlags::empty())
                .unwrap(),
        );
    }
    l.send(c);
    assert!(
        l.clients[c].connection().wants_write(),
        "32 MiB cannot fit in a socket buffer: the first send must stop short"
    );
    assert!(l.errors[c].is_empty(), "{:?}", l.errors[c]);
    let done = by_cookie(l.take(c, PIECES));
    let wall = started.elapsed();
    let cpu = thread_cpu_time() - cpu_before;
    for (i, cookie) in cookies.iter().enumerate() {
        done[cookie]
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    assert!(!l.clients[c].connection().wants_write());
    assert!(
        wall >= Duration::from_millis(700),
        "8 writes delayed 100 ms each one after the other took only {wall:?}"
    );
    // The waits between the server's reads are spent in poll, not spinning.
    assert!(
        cpu < wall / 2,
        "writing 32 MiB to a slow reader used {cpu:?} of CPU in {wall:?}"
    );

    // Read it all back, all in flight at once.
    let reads: Vec<Cookie> = (0..PIECES)
        .map(|i| {
            l.clients[c]
                .aio_pread(
                    BytesMut::zeroed(PIECE),
                    MIB + (i * PIECE) as u64,
                    CmdFlags::empty(),
                )
                .unwrap()
        })
        .collect();
    l.send(c);
    let done = by_cookie(l.take(c, PIECES));
    for (i, cookie) in reads.iter().enumerate() {
        let got = &done[cookie];
        got.result.as_ref().unwrap();
        assert!(
            got.buffer.as_ref().unwrap()[..] == data[i][..],
            "4 MiB piece {i} reads back different"
        );
    }
    // The bytes around the written range were not touched.
    let edge = l.clients[c]
        .aio_pread(BytesMut::zeroed(8), MIB - 4, CmdFlags::empty())
        .unwrap();
    l.send(c);
    let done = l.take(c, 1);
    assert_eq!(done[0].cookie, edge);
    assert_eq!(&done[0].buffer.as_ref().unwrap()[..4], &[0; 4]);
    assert_eq!(&done[0].buffer.as_ref().unwrap()[4..], &data[0][..4]);
    l.clients[c].aio_disconnect().unwrap();
    l.run_until("the clean close", |l| l.clients[c].is_closed());
    assert!(l.clients[c].connection().error().is_none());
}

// ------------------------------------------------------------------ a server dies

/// Two connections in one `Poll`; the server of one is killed while 4 MiB
/// replies stream in (after the first completed): every pending command on
/// it completes exactly once (right data, or ENOTCONN), its client closes
/// and produces no more events, and the other connection carries on.
#[test]
fn server_killed_mid_reply_other_connection_carries_on() {
    let mut doomed = NbdkitBuilder::pattern(64 * MIB).start();
    let survivor = NbdkitBuilder::memory(8 * MIB)
        .filter("delay")
        .param("delay-read", "300ms")
        .tcp()
        .start();
    let mut l = Loop::new();
    let a = l.connect(&doomed.uri());
    let b = l.connect(&survivor.uri());
    l.ready();

    // The survivor: data written first, then reads that wait in its delay
    // filter while the other server dies.
    l.clients[b]
        .aio_pwrite(
            Bytes::from(vec![0x5A; 64 * KIB as usize]),
            0,
            CmdFlags::empty(),
        )
        .unwrap();
    l.send(b);
    l.take(b, 1).pop().unwrap().result.unwrap();
    let b_reads: Vec<Cookie> = (0..4)
        .map(|i| {
            l.clients[b]
                .aio_pread(
                    BytesMut::zeroed(16 * KIB as usize),
                    i * 16 * KIB,
                    CmdFlags::empty(),
                )
                .unwrap()
        })
        .collect();
    l.send(b);

    const READS: u64 = 12;
    const LEN: u64 = 4 * MIB;
    let a_reads: Vec<Cookie> = (0..READS)
        .map(|i| {
            l.clients[a]
                .aio_pread(BytesMut::zeroed(LEN as usize), i * LEN, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    l.send(a);
    l.run_until("the first 4 MiB reply", |l| !l.done[a].is_empty());
    doomed.kill();
    l.run_until("every read on the killed server", |l| {
        l.done[a].len() as u64 == READS
    });
    assert!(
        l.clients[a].is_closed(),
        "{:?}",
        l.clients[a].connection().phase()
    );
    assert_eq!(l.clients[a].in_flight(), 0);
    let done = by_cookie(std::mem::take(&mut l.done[a]));
    let mut failed = 0;
    for (i, cookie) in a_reads.iter().enumerate() {
        let got = done.get(cookie).unwrap_or_else(|| panic!("read {i} lost"));
        match &got.result {
            Ok(()) => assert!(
                got.buffer.as_ref().unwrap()[..] == pattern_at(i as u64 * LEN, LEN as usize)[..],
                "read {i} completed with wrong data"
            ),
            Err(e) => {
                assert_eq!(e.errno(), Errno::NotConn, "read {i}: {e}");
                failed += 1;
            }
        }
    }
    assert!(failed >= 6, "only {failed} of {READS} reads failed");
    let closed: Vec<_> = l.other[a]
        .iter()
        .filter(|e| matches!(e, Event::Closed { .. }))
        .collect();
    assert_eq!(closed.len(), 1, "one Closed event: {:?}", l.other[a]);
    assert!(
        matches!(closed[0], Event::Closed { error: Some(e) } if e.errno() == Errno::NotConn),
        "{closed:?}"
    );
    // A later command on the dead connection fails at once.
    let err = l.clients[a]
        .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
        .expect_err("the connection is dead");
    assert_eq!(err.errno(), Some(Errno::NotConn), "{err}");

    // The survivor's reads complete with the right data...
    let done = by_cookie(l.take(b, 4));
    for (i, cookie) in b_reads.iter().enumerate() {
        let got = &done[cookie];
        got.result.as_ref().unwrap();
        assert!(
            got.buffer.as_ref().unwrap().iter().all(|&x| x == 0x5A),
            "read {i}"
        );
    }
    // ...and it keeps working.
    let events_a = l.event_count[a];
    let mut rng = Rng::new(8);
    let more = Bytes::from(rng.bytes(100_000));
    l.clients[b]
        .aio_pwrite(more.clone(), MIB + 3, CmdFlags::FUA)
        .unwrap();
    l.send(b);
    l.take(b, 1).pop().unwrap().result.unwrap();
    let cookie = l.clients[b]
        .aio_pread(BytesMut::zeroed(100_000), MIB + 3, CmdFlags::empty())
        .unwrap();
    l.send(b);
    let got = l.take(b, 1).pop().unwrap();
    assert_eq!(got.cookie, cookie);
    got.result.unwrap();
    assert!(got.buffer.unwrap()[..] == more[..]);
    assert!(l.errors[b].is_empty(), "{:?}", l.errors[b]);
    // The dead socket was deregistered: no event for it since.
    assert_eq!(
        l.event_count[a], events_a,
        "events for the closed connection"
    );
    l.clients[b].aio_disconnect().unwrap();
    l.run_until("the clean close", |l| l.clients[b].is_closed());
}

/// A server that stops reading while 32 MiB of writes are half sent (TCP,
/// one request at a time, each held 10 s), then dies: while stuck the loop
/// sleeps in `poll`; after the kill every write completes exactly once with
/// ENOTCONN, whether its bytes were sent, half sent or still queued.
#[test]
fn server_killed_while_writes_are_stuck_fails_each_once() {
    const PIECE: usize = 4 * MIB as usize;
    let mut server = NbdkitBuilder::memory(64 * MIB)
        .threads(1)
        .filter("delay")
        .param("delay-write", "10")
        .tcp()
        .start();
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    let data = Bytes::from(Rng::new(3).bytes(PIECE));
    let cookies: HashSet<Cookie> = (0..8)
        .map(|i| {
            l.clients[c]
                .aio_pwrite(data.clone(), (i * PIECE) as u64, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    l.send(c);
    let cpu_before = thread_cpu_time();
    let stuck_since = Instant::now();
    while stuck_since.elapsed() < Duration::from_millis(800) {
        l.turn(Duration::from_millis(100));
    }
    let cpu = thread_cpu_time() - cpu_before;
    assert!(
        l.clients[c].connection().wants_write(),
        "the server holds one write for 10 s: the rest cannot all be sent"
    );
    assert!(l.done[c].is_empty(), "{:?}", l.done[c]);
    assert!(
        cpu < stuck_since.elapsed() / 10,
        "stuck writing to a server that does not read used {cpu:?} of CPU"
    );
    server.kill();
    l.run_until("every write to fail", |l| l.done[c].len() >= 8);
    let done = by_cookie(std::mem::take(&mut l.done[c]));
    assert_eq!(done.keys().copied().collect::<HashSet<_>>(), cookies);
    for got in done.values() {
        let e = got.result.as_ref().expect_err("the server died");
        assert_eq!(e.errno(), Errno::NotConn, "{e}");
    }
    assert!(l.clients[c].is_closed());
    assert!(!l.clients[c].connection().wants_write());
    assert_eq!(l.clients[c].in_flight(), 0);
    // No late completion.
    l.turn(Duration::from_millis(50));
    assert!(l.done[c].is_empty());
}

// ------------------------------------------------------------------ no busy loop

/// A read against a server that sits on it for 2 s: the loop waits in
/// `poll`, so this thread uses almost no CPU meanwhile.
///
/// This is a functional assertion, not a benchmark: a correct event loop
/// sleeps in the kernel while nothing can move, so its CPU time is a few
/// milliseconds whatever the machine. A busy loop (an adapter that asks for
/// wakeups it does not need, such as a level-triggered writable interest
/// with nothing to write, or a `poll` that returns at once because an event
/// is never consumed) burns a whole core, tens of percent of the wall time
/// even on a loaded machine. The bound (10 % of the wait) is an order of
/// magnitude away from both. CPU time is taken per thread (`RUSAGE_THREAD`)
/// so parallel tests do not count, and the loop's own wakeups are counted
/// too: with a 1 s poll timeout a correct loop wakes about twice.
#[test]
fn stalled_server_costs_almost_no_cpu() {
    let server = NbdkitBuilder::pattern(MIB)
        .filter("delay")
        .param("delay-read", "2")
        .start();
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    let wakeups_before = l.wakeups;
    let cpu_before = thread_cpu_time();
    let started = Instant::now();
    let cookie = l.clients[c]
        .aio_pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
        .unwrap();
    l.send(c);
    let done = l.take(c, 1);
    let wall = started.elapsed();
    let cpu = thread_cpu_time() - cpu_before;
    let wakeups = l.wakeups - wakeups_before;
    assert_eq!(done[0].cookie, cookie);
    done[0].result.as_ref().unwrap();
    assert_eq!(
        done[0].buffer.as_ref().unwrap()[..],
        pattern_at(8192, 4096)[..]
    );
    assert!(
        wall >= Duration::from_millis(1900),
        "the delay was {wall:?}"
    );
    assert!(
        cpu < wall / 10,
        "waiting {wall:?} for a stalled server used {cpu:?} of CPU (busy loop?)"
    );
    assert!(wakeups <= 10, "{wakeups} wakeups while waiting {wall:?}");
    l.clients[c].aio_disconnect().unwrap();
}

// ------------------------------------------------------------------ many connections

/// Four connections to four different servers (nbdkit and qemu-nbd, Unix and
/// TCP) connect at once, without blocking, in one `Poll`, then carry
/// interleaved commands: each sees only its own replies and data.
#[test]
fn four_servers_interleaved_in_one_poll() {
    let servers = [
        NbdkitBuilder::memory(4 * MIB).start(),
        NbdkitBuilder::memory(4 * MIB).tcp().start(),
        QemuNbdBuilder::raw(4 * MIB).shared(2).start(),
        QemuNbdBuilder::qcow2(4 * MIB).shared(2).tcp().start(),
    ];
    let mut l = Loop::new();
    for s in &servers {
        l.connect(&s.uri());
    }
    // The connects returned before any handshake happened.
    assert!(l.clients.iter().all(|c| !c.connection().is_ready()));
    // Bounded by LIMIT: a connect that never completes fails there.
    l.ready();
    for (i, c) in l.clients.iter().enumerate() {
        assert_eq!(c.connection().size().unwrap(), 4 * MIB, "client {i}");
        assert_eq!(c.token(), Token(i));
    }

    // Rounds: each client writes its own bytes, all four connections'
    // writes in flight together, then each reads its whole export back, all
    // in flight together.
    let mut models = vec![vec![0u8; 4 * MIB as usize]; 4];
    let mut rng = Rng::new(44);
    for round in 0..6u64 {
        let mut pending = Vec::new();
        for (i, model) in models.iter_mut().enumerate() {
            let mut cookies = Vec::new();
            for k in 0..4u64 {
                let offset = (round * 4 + k) * 150 * KIB + rng.below(1000);
                let len = rng.between(1, 140 * KIB) as usize;
                let data = rng.bytes(len);
                model[offset as usize..][..len].copy_from_slice(&data);
                cookies.push(
                    l.clients[i]
                        .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
                        .unwrap(),
                );
            }
            pending.push(cookies);
        }
        for i in 0..4 {
            l.send(i);
        }
        l.run_until("a round on every connection", |l| {
            l.done.iter().all(|d| d.len() >= 4)
        });
        for (i, cookies) in pending.into_iter().enumerate() {
            let done = by_cookie(std::mem::take(&mut l.done[i]));
            assert_eq!(done.len(), 4, "client {i}");
            for cookie in &cookies {
                let got = done
                    .get(cookie)
                    .unwrap_or_else(|| panic!("client {i}: a command of another client"));
                got.result
                    .as_ref()
                    .unwrap_or_else(|e| panic!("client {i} round {round}: {e}"));
            }
        }
        // Read back each client's whole export, in flight together.
        let reads: Vec<Cookie> = (0..4)
            .map(|i| {
                l.clients[i]
                    .aio_pread(BytesMut::zeroed(4 * MIB as usize), 0, CmdFlags::empty())
                    .unwrap()
            })
            .collect();
        for i in 0..4 {
            l.send(i);
        }
        l.run_until("whole-export reads", |l| {
            l.done.iter().all(|d| !d.is_empty())
        });
        for (i, cookie) in reads.iter().enumerate() {
            let got = l.done[i].pop().unwrap();
            assert_eq!(got.cookie, *cookie);
            got.result.unwrap();
            assert!(
                got.buffer.unwrap()[..] == models[i][..],
                "client {i} after round {round}: another client's data, or lost writes"
            );
        }
    }
    for (i, e) in l.errors.iter().enumerate() {
        assert!(e.is_empty(), "client {i}: {e:?}");
    }
    for i in 0..4 {
        l.clients[i].aio_disconnect().unwrap();
    }
    l.run_until("every clean close", |l| {
        l.clients.iter().all(Client::is_closed)
    });
    assert!(l.clients.iter().all(|c| c.connection().error().is_none()));
}

/// A TCP connect tries every address in turn without blocking: the first
/// refuses, the second is an nbdkit (addresses the caller resolved, through
/// `nbd_io::Connecting::tcp`); a Unix socket by path as a `Target`, and a
/// socket the caller connected itself (`connect_socket`), work too.
#[test]
fn connect_falls_back_to_the_next_tcp_address_and_other_ways_in() {
    let server = NbdkitBuilder::pattern(MIB).tcp().start();
    let unix = NbdkitBuilder::pattern(2 * MIB).start();
    let (_reserved, port) = refusing_port();
    let refused = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let good = server.tcp_addr().unwrap();
    let mut l = Loop::new();
    let t = l.next_token();
    let connecting = Connecting::tcp([refused, good], "the test nbdkit").unwrap();
    let c = Client::connect_with(connecting, Config::default(), l.poll.registry(), t).unwrap();
    let a = l.push(c);
    let t = l.next_token();
    let path = unix.socket_path().unwrap().to_path_buf();
    let c = Client::connect(
        &Target::Unix(path.clone()),
        Config::default(),
        l.poll.registry(),
        t,
    )
    .unwrap();
    let b = l.push(c);
    let t = l.next_token();
    let socket = nbd_io::connect(&Target::Unix(path)).unwrap();
    let c = Client::connect_socket(socket, Config::default(), l.poll.registry(), t).unwrap();
    let d = l.push(c);
    l.ready();
    assert!(
        l.errors[a].is_empty(),
        "the fallback is not an error: {:?}",
        l.errors[a]
    );
    assert_eq!(l.clients[a].connection().size().unwrap(), MIB);
    assert_eq!(l.clients[b].connection().size().unwrap(), 2 * MIB);
    assert_eq!(l.clients[d].connection().size().unwrap(), 2 * MIB);
    let ra = l.clients[a]
        .aio_pread(BytesMut::zeroed(1000), 777, CmdFlags::empty())
        .unwrap();
    let rb = l.clients[b]
        .aio_pread(BytesMut::zeroed(1000), MIB + 777, CmdFlags::empty())
        .unwrap();
    let rd = l.clients[d]
        .aio_pread(BytesMut::zeroed(1000), 3, CmdFlags::empty())
        .unwrap();
    l.send(a);
    l.send(b);
    l.send(d);
    let da = l.take(a, 1).pop().unwrap();
    let db = l.take(b, 1).pop().unwrap();
    let dd = l.take(d, 1).pop().unwrap();
    assert_eq!((da.cookie, db.cookie, dd.cookie), (ra, rb, rd));
    assert_eq!(da.buffer.unwrap()[..], pattern_at(777, 1000)[..]);
    assert_eq!(db.buffer.unwrap()[..], pattern_at(MIB + 777, 1000)[..]);
    assert_eq!(dd.buffer.unwrap()[..], pattern_at(3, 1000)[..]);
}

/// `Target::Tcp` by host name and port: resolved, then connected without
/// blocking, in the same loop as everything else.
#[test]
fn connect_a_tcp_target() {
    let server = NbdkitBuilder::pattern(MIB).tcp().start();
    let addr = server.tcp_addr().unwrap();
    let target = Target::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    let mut l = Loop::new();
    let t = l.next_token();
    let c = l.push(Client::connect(&target, Config::default(), l.poll.registry(), t).unwrap());
    l.ready();
    let r = l.clients[c]
        .aio_pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
        .unwrap();
    l.send(c);
    let done = l.take(c, 1).pop().unwrap();
    assert_eq!(done.cookie, r);
    assert_eq!(done.buffer.unwrap()[..], pattern_at(8192, 4096)[..]);
    l.clients[c].aio_disconnect().unwrap();
    l.run_until("the close", |l| l.clients[c].is_closed());
    assert!(l.errors[c].is_empty(), "{:?}", l.errors[c]);
}

/// Server programs the client starts itself: `nbdkit -s` on a socket pair
/// (`Target::Command`) and nbdkit by socket activation
/// (`Target::Activation`), both driven by the loop like any socket; each
/// reads the pattern back, and the graceful close ends cleanly.
#[test]
fn connect_to_servers_the_client_starts() {
    let targets = [
        Target::command(["nbdkit", "-s", "--exit-with-parent", "pattern", "1M"]),
        Target::activation(["nbdkit", "--exit-with-parent", "pattern", "1M"]),
    ];
    let mut l = Loop::new();
    let mut clients = Vec::new();
    for target in &targets {
        let t = l.next_token();
        let client = Client::connect(target, Config::default(), l.poll.registry(), t)
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        clients.push(l.push(client));
    }
    l.ready();
    for &c in &clients {
        assert_eq!(l.clients[c].connection().size().unwrap(), MIB);
        let r = l.clients[c]
            .aio_pread(BytesMut::zeroed(5000), MIB - 5000, CmdFlags::empty())
            .unwrap();
        l.send(c);
        let done = l.take(c, 1).pop().unwrap();
        assert_eq!(done.cookie, r);
        assert_eq!(done.buffer.unwrap()[..], pattern_at(MIB - 5000, 5000)[..]);
        l.clients[c].aio_disconnect().unwrap();
    }
    l.run_until("both closes", |l| {
        clients.iter().all(|&c| l.clients[c].is_closed())
    });
    for &c in &clients {
        assert!(l.errors[c].is_empty(), "{:?}", l.errors[c]);
        assert!(l.clients[c].connection().error().is_none());
    }
    // The group refuses to start one server per connection.
    let err = MultiConn::connect(
        &targets[0],
        2,
        Config::default(),
        l.poll.registry(),
        Token(100),
    )
    .err()
    .expect("two servers cannot be one multi-conn export");
    assert_eq!(err.errno(), Some(Errno::Inval), "{err}");
}

/// A refused connect is reported, through `handle_event` (or at once by the
/// connect call), never by hanging: TCP to a port nobody listens on, a Unix
/// socket nobody listens on, a missing Unix socket.
#[test]
fn refused_connects_report_errors_instead_of_hanging() {
    let (_reserved, port) = refusing_port();
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let missing = dir.path().join("missing.sock");
    // Each URI, and what its errors must name.
    let uris = [
        (
            format!("nbd://127.0.0.1:{port}"),
            format!("127.0.0.1:{port}"),
        ),
        (
            format!("nbd+unix:///?socket={}", stale.display()),
            stale.display().to_string(),
        ),
        (
            format!("nbd+unix:///?socket={}", missing.display()),
            missing.display().to_string(),
        ),
    ];
    for (uri, names) in &uris {
        // Each wait below is bounded by LIMIT, which turns a hang into a failure.
        let mut l = Loop::new();
        let token = l.next_token();
        match Client::connect_uri(uri, Config::default(), l.poll.registry(), token) {
            Err(e) => {
                // Refused synchronously: fine, it is an error, not a hang;
                // it names the socket.
                assert!(matches!(e, nbd_mio::Error::Connect { .. }), "{uri}: {e:?}");
                assert!(e.to_string().contains(names.as_str()), "{uri}: {e}");
            }
            Ok(client) => {
                let c = l.push(client);
                l.run_until(&format!("the refusal of {uri}"), |l| {
                    l.clients[c].is_closed() || !l.errors[c].is_empty()
                });
                assert!(!l.errors[c].is_empty(), "{uri}: no error from handle_event");
                assert!(
                    l.errors[c].iter().any(
                        |e| matches!(e, nbd_mio::Error::Connect { source, target }
                        if source.kind() == std::io::ErrorKind::ConnectionRefused
                            && target.contains(names.as_str()))
                    ),
                    "{uri}: {:?}",
                    l.errors[c]
                );
                assert!(
                    l.clients[c].is_closed(),
                    "{uri}: not closed after the refusal"
                );
                let err = l.clients[c].connection().error().expect("dead");
                assert_eq!(err.errno(), Errno::NotConn, "{uri}: {err}");
                assert!(!l.clients[c].connection().is_ready());
                // Nothing can be issued on it.
                assert!(l.clients[c]
                    .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
                    .is_err());
            }
        }
    }
}

/// URIs go through `nbd_io::UriPolicy`: a TLS URI sets up its TLS before
/// anything is reached (anonymous TLS is refused), an unknown query parameter is
/// diagnosed, a caller's policy is honoured (`connect_endpoint`), and a vsock
/// URI is tried rather than refused: where the kernel has no vsock, or
/// nobody listens, it is an error naming the target, never a hang.
#[test]
fn uris_follow_the_policy_and_vsock_is_tried() {
    let mut l = Loop::new();
    let token = l.next_token();
    let registry = l.poll.registry();
    let tls = Client::connect_uri(
        "nbds+unix:///?socket=/nonexistent.sock&tls-type=anon",
        Config::default(),
        registry,
        token,
    )
    .err()
    .expect("anonymous TLS is refused");
    assert!(matches!(tls, nbd_mio::Error::Tls(_)), "{tls:?}");
    let typo = Client::connect_uri(
        "nbd://localhost/?sokcet=/x",
        Config::default(),
        registry,
        token,
    )
    .err()
    .expect("an unknown parameter is an error");
    assert!(typo.to_string().contains("sokcet"), "{typo}");
    assert_eq!(typo.errno(), Some(Errno::Inval));

    let unix_only = UriPolicy {
        transports: Transports::UNIX,
        ..UriPolicy::default()
    };
    let refused = unix_only
        .resolve("nbd://127.0.0.1:10809/")
        .expect_err("TCP is not allowed by this policy");
    assert!(
        matches!(refused, nbd_mio::Error::UriRefused(_)),
        "{refused:?}"
    );
    let server = NbdkitBuilder::pattern(MIB).start();
    let endpoint = unix_only.resolve(&server.uri()).unwrap();
    let c = Client::connect_endpoint(&endpoint, Config::default(), registry, token).unwrap();
    let c = l.push(c);
    l.ready();
    assert_eq!(l.clients[c].connection().size().unwrap(), MIB);
    l.clients[c].aio_disconnect().unwrap();
    l.run_until("the close", |l| l.clients[c].is_closed());

    let token = l.next_token();
    let uri = "nbd+vsock://1:2147483632/";
    let names_vsock = |e: &nbd_mio::Error| match e {
        nbd_mio::Error::Unsupported(m) => m.contains("vsock"),
        nbd_mio::Error::Connect { target, .. } => target.contains("vsock"),
        _ => false,
    };
    match Client::connect_uri(uri, Config::default(), l.poll.registry(), token) {
        Err(e) => assert!(names_vsock(&e), "{e:?}"),
        Ok(client) => {
            let v = l.push(client);
            l.run_until("the vsock refusal", |l| l.clients[v].is_closed());
            assert!(l.errors[v].iter().any(names_vsock), "{:?}", l.errors[v]);
        }
    }
}

/// `disconnect` with commands in flight: each gets the server's answer first,
/// then the connection closes cleanly (one `Closed` without error); new commands
/// are refused.
#[test]
fn disconnect_lets_commands_in_flight_finish() {
    let server = NbdkitBuilder::pattern(MIB)
        .filter("delay")
        .param("delay-read", "200ms")
        .start();
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    let cookies: HashSet<Cookie> = (0..6)
        .map(|i| {
            l.clients[c]
                .aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    l.clients[c].aio_disconnect().unwrap();
    assert!(l.clients[c]
        .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
        .is_err());
    l.run_until("the close after disconnect", |l| l.clients[c].is_closed());
    let done = by_cookie(std::mem::take(&mut l.done[c]));
    assert_eq!(done.keys().copied().collect::<HashSet<_>>(), cookies);
    // The client waited for every reply rather than dropping the commands
    // (which would be ENOTCONN), and held NBD_CMD_DISC back until the last
    // one: nbdkit, seeing it earlier, would cut short the reads sleeping in
    // its delay filter with ESHUTDOWN.
    for got in done.values() {
        got.result.as_ref().unwrap();
        assert_eq!(got.buffer.as_ref().unwrap().len(), 4096);
    }
    let closed: Vec<_> = l.other[c]
        .iter()
        .filter(|e| matches!(e, Event::Closed { .. }))
        .collect();
    assert!(
        matches!(closed[..], [Event::Closed { error: None }]),
        "{:?}",
        l.other[c]
    );
    assert!(l.errors[c].is_empty(), "{:?}", l.errors[c]);
}

/// Opt mode through the event loop: `Negotiating`, the export list as
/// `Export` events, a refused `opt_go` that leaves the connection
/// negotiating, then a good one that reaches `Ready`.
#[test]
fn opt_mode_list_refusal_and_go_through_events() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("exportname")
        .param("exportname-list", "explicit")
        .param("exportname", "alpha")
        .param("exportname", "beta")
        .param("exportname-strict", "true")
        .export_name("alpha")
        .start();
    let mut l = Loop::new();
    let token = l.next_token();
    let config = Config::default().opt_mode(true);
    let c = l.push(Client::connect_uri(&server.uri(), config, l.poll.registry(), token).unwrap());
    l.run_until("negotiation", |l| {
        l.clients[c].connection().is_negotiating()
    });
    assert!(
        matches!(l.other[c][..], [Event::Negotiating]),
        "{:?}",
        l.other[c]
    );
    l.other[c].clear();

    let option_done = |l: &mut Loop| {
        l.other[c]
            .iter()
            .any(|e| matches!(e, Event::OptionDone { .. }))
    };
    l.clients[c].aio_opt_list().unwrap();
    l.run_until("the export list", option_done);
    let names: Vec<&str> = l.other[c]
        .iter()
        .filter_map(|e| match e {
            Event::Export { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["alpha", "beta"], "{:?}", l.other[c]);
    l.other[c].clear();

    l.clients[c]
        .connection_mut()
        .set_export_name("nope")
        .unwrap();
    l.clients[c].aio_opt_go().unwrap();
    l.run_until("the refusal", option_done);
    match &l.other[c][..] {
        [Event::OptionDone { result: Err(e), .. }] => assert_eq!(e.errno(), Errno::NoEnt, "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(l.clients[c].connection().is_negotiating());
    l.other[c].clear();

    l.clients[c]
        .connection_mut()
        .set_export_name("beta")
        .unwrap();
    l.clients[c].aio_opt_go().unwrap();
    l.run_until("ready", |l| l.clients[c].connection().is_ready());
    assert_eq!(l.clients[c].connection().size().unwrap(), MIB);
    let r = l.clients[c]
        .aio_pread(BytesMut::zeroed(16), 0, CmdFlags::empty())
        .unwrap();
    l.send(c);
    let got = l.take(c, 1).pop().unwrap();
    assert_eq!(got.cookie, r);
    got.result.unwrap();
    assert!(l.errors[c].is_empty(), "{:?}", l.errors[c]);
}

/// `drive` is safe at any time: idle it returns at once, and after issuing
/// commands it sends them like `send`. A structured read reports its chunks
/// through `next_event`, covering exactly the read, before its completion.
#[test]
fn drive_at_any_time_and_read_chunks_as_events() {
    let server = QemuNbdBuilder::from_bytes(nbd_tests::ImageFormat::Qcow2, &{
        let mut disk = vec![0u8; 2 * MIB as usize];
        disk[MIB as usize..][..64 * KIB as usize].fill(0xAB);
        disk
    })
    .shared(2)
    .start();
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    // Idle, a drive finds nothing to read or write: no completion, no event,
    // and (since the socket never blocks) it returns, however loaded the machine.
    l.other[c].clear();
    let cpu_before = thread_cpu_time();
    for _ in 0..10 {
        l.clients[c].drive().unwrap();
    }
    let cpu = thread_cpu_time() - cpu_before;
    assert!(l.clients[c].next_completion().is_none());
    assert!(l.clients[c].next_event().is_none());
    assert_eq!(l.clients[c].in_flight(), 0);
    assert!(
        cpu < Duration::from_secs(1),
        "ten idle drives used {cpu:?} of CPU"
    );

    let cookie = l.clients[c]
        .aio_pread_structured(
            BytesMut::from(&vec![0x11; MIB as usize][..]),
            MIB / 2,
            CmdFlags::empty(),
        )
        .unwrap();
    l.clients[c].drive().unwrap();
    let done = l.take(c, 1).pop().unwrap();
    assert_eq!(done.cookie, cookie);
    done.result.unwrap();
    let buf = done.buffer.unwrap();
    assert!(
        buf[..MIB as usize / 2].iter().all(|&b| b == 0),
        "hole not zeroed"
    );
    assert!(buf[MIB as usize / 2..][..64 * KIB as usize]
        .iter()
        .all(|&b| b == 0xAB));
    assert!(buf[(MIB / 2 + 64 * KIB) as usize..].iter().all(|&b| b == 0));
    // Chunks may come in any order; together they cover the read once.
    let mut chunks: Vec<(u64, u64)> = l.other[c]
        .iter()
        .map(|e| match e {
            Event::ReadChunk(
                nbd_proto::ReadChunk::Data {
                    cookie: k,
                    offset,
                    length,
                }
                | nbd_proto::ReadChunk::Hole {
                    cookie: k,
                    offset,
                    length,
                },
            ) => {
                assert_eq!(*k, cookie);
                (*offset, *length)
            }
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    chunks.sort_unstable();
    let mut covered = MIB / 2;
    for (offset, length) in &chunks {
        assert_eq!(*offset, covered, "{chunks:?}");
        covered += length;
    }
    assert_eq!(covered, MIB / 2 + MIB, "{:?}", l.other[c]);
    l.clients[c].aio_disconnect().unwrap();
}

// ------------------------------------------------------------------ MultiConn

/// Runs `group`'s poll loop until `cond` holds; collects its completions.
fn run_multi(
    poll: &mut Poll,
    group: &mut MultiConn,
    done: &mut Vec<MultiCompletion>,
    what: &str,
    mut cond: impl FnMut(&MultiConn, &[MultiCompletion]) -> bool,
) {
    let deadline = Instant::now() + LIMIT;
    let mut events = Events::with_capacity(64);
    loop {
        while let Some(c) = group.next_completion() {
            done.push(c);
        }
        if cond(group, done) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "waited {LIMIT:?} for {what}");
        poll.poll(&mut events, Some(left.min(Duration::from_secs(1))))
            .unwrap();
        for e in events.iter() {
            assert!(group.owns(e.token()), "{:?}", e.token());
            group
                .handle_event(e)
                .unwrap_or_else(|err| panic!("{what}: handle_event: {err}"));
        }
    }
}

/// Writes spread over 4 connections to a multi-conn export (each write held
/// 300 ms by the server), then one `MultiConn::flush`: the flush is not sent
/// while any earlier write is in flight on any connection, completes after
/// all of them, and the data reads back through other connections.
#[test]
fn multi_conn_flush_waits_for_every_earlier_write() {
    let server = NbdkitBuilder::memory(8 * MIB)
        .filter("delay")
        .param("delay-write", "300ms")
        .start();
    let mut poll = Poll::new().unwrap();
    let mut group = MultiConn::connect_uri(
        &server.uri(),
        4,
        Config::default(),
        poll.registry(),
        Token(10),
    )
    .unwrap();
    let mut done = Vec::new();
    run_multi(&mut poll, &mut group, &mut done, "4 handshakes", |g, _| {
        g.is_ready().expect("memory advertises multi-conn")
    });
    assert!(group.clients()[0].connection().can_multi_conn().unwrap());
    assert!(group.owns(Token(13)) && !group.owns(Token(14)) && !group.owns(Token(9)));

    let mut rng = Rng::new(12);
    let mut model = vec![0u8; 8 * MIB as usize];
    let mut writes = Vec::new();
    for i in 0..8u64 {
        let data = rng.bytes(256 * KIB as usize);
        let offset = i * 512 * KIB + 1;
        model[offset as usize..][..data.len()].copy_from_slice(&data);
        writes.push(
            group
                .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
                .unwrap(),
        );
    }
    // Round-robin: two writes on each connection.
    let per_conn: Vec<usize> = group.clients().iter().map(Client::in_flight).collect();
    assert_eq!(per_conn, [2, 2, 2, 2]);
    let flushed_at = Instant::now();
    let flush = group.aio_flush(CmdFlags::empty()).unwrap();
    group.send().unwrap();
    // The flush is held back: nothing but the 8 writes is on any connection.
    let on_wire: usize = group.clients().iter().map(Client::in_flight).sum();
    assert_eq!(on_wire, 8, "the flush went out before the writes completed");
    assert_eq!(group.in_flight(), 9);

    run_multi(&mut poll, &mut group, &mut done, "the flush", |_, d| {
        d.iter().any(|c| c.cookie == flush)
    });
    assert!(
        flushed_at.elapsed() >= Duration::from_millis(300),
        "the flush completed before the delayed writes could have"
    );
    let order: Vec<MultiCookie> = done.iter().map(|c| c.cookie).collect();
    assert_eq!(order.len(), 9, "{order:?}");
    assert_eq!(
        order.last(),
        Some(&flush),
        "the flush completed before a write"
    );
    assert_eq!(
        order[..8].iter().copied().collect::<HashSet<_>>(),
        writes.iter().copied().collect::<HashSet<_>>()
    );
    for c in done.drain(..) {
        c.result.unwrap();
        assert!(c.buffer.is_none());
    }
    assert_eq!(group.in_flight(), 0);

    // Read each write's range back. Commands go round-robin and the flush
    // took a turn, so write j (connection j % 4) is read through connection
    // (j + 1) % 4: never the one that wrote it.
    let reads: Vec<(MultiCookie, u64)> = (0..8u64)
        .map(|j| {
            let offset = j * 512 * KIB + 1;
            let read = group
                .aio_pread(
                    BytesMut::zeroed(256 * KIB as usize),
                    offset,
                    CmdFlags::empty(),
                )
                .unwrap();
            (read, offset)
        })
        .collect();
    let per_conn: Vec<usize> = group.clients().iter().map(Client::in_flight).collect();
    assert_eq!(per_conn, [2, 2, 2, 2]);
    group.send().unwrap();
    run_multi(&mut poll, &mut group, &mut done, "the reads", |_, d| {
        d.len() == 8
    });
    for c in done.drain(..) {
        let (_, offset) = reads.iter().find(|(id, _)| *id == c.cookie).unwrap();
        c.result.unwrap();
        let buf = c.buffer.unwrap();
        assert!(
            buf[..] == model[*offset as usize..][..buf.len()],
            "read at {offset} through another connection differs"
        );
    }
    group.aio_disconnect().unwrap();
    // A fresh, separate connection sees the same data.
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    l.clients[c]
        .aio_pread(BytesMut::zeroed(8 * MIB as usize), 0, CmdFlags::empty())
        .unwrap();
    l.send(c);
    let got = l.take(c, 1).pop().unwrap();
    assert!(got.buffer.unwrap()[..] == model[..]);
}

/// A flush issued while nothing is in flight goes out at once; one issued
/// with writes pending on some connections waits only for those.
#[test]
fn multi_conn_flush_with_nothing_pending_is_sent_at_once() {
    let server = NbdkitBuilder::memory(MIB).start();
    let mut poll = Poll::new().unwrap();
    let mut group = MultiConn::connect_uri(
        &server.uri(),
        2,
        Config::default(),
        poll.registry(),
        Token(0),
    )
    .unwrap();
    let mut done = Vec::new();
    run_multi(&mut poll, &mut group, &mut done, "handshakes", |g, _| {
        g.is_ready().unwrap()
    });
    let flush = group.aio_flush(CmdFlags::empty()).unwrap();
    let on_wire: usize = group.clients().iter().map(Client::in_flight).sum();
    assert_eq!(
        on_wire, 1,
        "a flush with nothing to wait for is sent at once"
    );
    run_multi(&mut poll, &mut group, &mut done, "the flush", |_, d| {
        d.len() == 1
    });
    assert_eq!(done[0].cookie, flush);
    done.remove(0).result.unwrap();
    group.aio_disconnect().unwrap();
}

/// Against a server that does not advertise multi-conn (nbdkit's multi-conn
/// filter in `disable` mode), a group of 2 refuses to be used; a group of 1
/// is fine.
#[test]
fn multi_conn_refused_without_multi_conn() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("multi-conn")
        .param("multi-conn-mode", "disable")
        .start();
    let mut poll = Poll::new().unwrap();
    let mut group = MultiConn::connect_uri(
        &server.uri(),
        2,
        Config::default(),
        poll.registry(),
        Token(0),
    )
    .unwrap();
    let mut done = Vec::new();
    run_multi(&mut poll, &mut group, &mut done, "handshakes", |g, _| {
        g.clients().iter().all(|c| c.connection().is_ready())
    });
    assert!(!group.clients()[0].connection().can_multi_conn().unwrap());
    match group.is_ready() {
        Err(nbd_mio::Error::Unsupported(msg)) => assert!(msg.contains("multi-conn"), "{msg}"),
        other => panic!("is_ready of 2 connections without multi-conn: {other:?}"),
    }
    group.aio_disconnect().unwrap();

    let mut single = MultiConn::connect_uri(
        &server.uri(),
        1,
        Config::default(),
        poll.registry(),
        Token(5),
    )
    .unwrap();
    run_multi(
        &mut poll,
        &mut single,
        &mut done,
        "one handshake",
        |g, _| g.is_ready().unwrap(),
    );
    let r = single
        .aio_pread(BytesMut::zeroed(10), 0, CmdFlags::empty())
        .unwrap();
    single.send().unwrap();
    run_multi(&mut poll, &mut single, &mut done, "a read", |_, d| {
        !d.is_empty()
    });
    assert_eq!(done[0].cookie, r);
    assert!(MultiConn::connect_uri(
        &server.uri(),
        0,
        Config::default(),
        poll.registry(),
        Token(9)
    )
    .is_err());
}

/// A connection of a group that fails while sending (its server died and
/// the hang-up has not been polled yet, so the write hits `EPIPE`): every
/// command issued through the group must still complete exactly once, with
/// an error, and a flush waiting for those writes must complete too.
#[test]
fn multi_conn_commands_complete_when_a_connection_fails_in_send() {
    let mut server = NbdkitBuilder::memory(MIB).start();
    let mut poll = Poll::new().unwrap();
    let mut group = MultiConn::connect_uri(
        &server.uri(),
        2,
        Config::default(),
        poll.registry(),
        Token(0),
    )
    .unwrap();
    let mut done = Vec::new();
    run_multi(&mut poll, &mut group, &mut done, "handshakes", |g, _| {
        g.is_ready().unwrap()
    });
    server.kill();
    // Not polled since: both connections still look ready.
    assert!(group.clients().iter().all(|c| c.connection().is_ready()));
    let w0 = group
        .aio_pwrite(Bytes::from(vec![1; 4096]), 0, CmdFlags::empty())
        .unwrap();
    let w1 = group
        .aio_pwrite(Bytes::from(vec![2; 4096]), 4096, CmdFlags::empty())
        .unwrap();
    let flush = group.aio_flush(CmdFlags::empty()).unwrap();
    // Writing to the dead Unix socket fails (EPIPE): reported here or
    // through the completions, either is fine; losing them is not.
    let _ = group.send();

    // Poll for a while; handle_event errors are expected (the server is gone).
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut events = Events::with_capacity(16);
    while done.len() < 3 && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for e in events.iter() {
            let _ = group.handle_event(e);
        }
        while let Some(c) = group.next_completion() {
            done.push(c);
        }
    }
    let ids: Vec<MultiCookie> = done.iter().map(|c| c.cookie).collect();
    let per_client: Vec<(bool, usize)> = group
        .clients()
        .iter()
        .map(|c| (c.is_closed(), c.in_flight()))
        .collect();
    assert_eq!(
        ids.iter().copied().collect::<HashSet<_>>(),
        [w0, w1, flush].into_iter().collect::<HashSet<_>>(),
        "completed {ids:?} of writes {w0:?}, {w1:?} and flush {flush:?}; group in flight {}; clients (closed, in flight) {per_client:?}",
        group.in_flight()
    );
    for c in &done {
        let e = c.result.as_ref().expect_err("the server is dead");
        assert_eq!(e.errno(), Errno::NotConn, "{e}");
    }
    assert_eq!(group.in_flight(), 0);
}

/// The server of a group dies while writes wait in its delay filter and a
/// flush waits for them: the writes fail (ENOTCONN) and the flush, released
/// onto a dead connection, must complete too, with an error, rather than be
/// dropped (the caller would wait for it forever).
#[test]
fn multi_conn_flush_completes_when_the_server_dies() {
    let mut server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-write", "10")
        .start();
    let mut poll = Poll::new().unwrap();
    let mut group = MultiConn::connect_uri(
        &server.uri(),
        2,
        Config::default(),
        poll.registry(),
        Token(0),
    )
    .unwrap();
    let mut done = Vec::new();
    run_multi(&mut poll, &mut group, &mut done, "handshakes", |g, _| {
        g.is_ready().unwrap()
    });
    let w0 = group
        .aio_pwrite(Bytes::from(vec![1; 4096]), 0, CmdFlags::empty())
        .unwrap();
    let w1 = group
        .aio_pwrite(Bytes::from(vec![2; 4096]), 4096, CmdFlags::empty())
        .unwrap();
    let flush = group.aio_flush(CmdFlags::empty()).unwrap();
    group.send().unwrap();
    assert_eq!(group.in_flight(), 3);
    std::thread::sleep(Duration::from_millis(100));
    server.kill();

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut events = Events::with_capacity(16);
    let mut errors = Vec::new();
    while done.len() < 3 && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for e in events.iter() {
            if let Err(err) = group.handle_event(e) {
                errors.push(err.to_string());
            }
        }
        while let Some(c) = group.next_completion() {
            done.push(c);
        }
    }
    let ids: HashSet<MultiCookie> = done.iter().map(|c| c.cookie).collect();
    assert_eq!(
        ids,
        [w0, w1, flush].into_iter().collect::<HashSet<_>>(),
        "completed {ids:?} of writes {w0:?}, {w1:?} and flush {flush:?}; group in flight {}; handle_event errors {errors:?}",
        group.in_flight()
    );
    for c in &done {
        let e = c.result.as_ref().expect_err("the server is dead");
        assert_eq!(e.errno(), Errno::NotConn, "{e}");
    }
}

/// `close` after the connection has already closed (a clean disconnect,
/// which deregisters the socket) should succeed: it is the natural last call.
#[test]
fn close_after_a_clean_disconnect_succeeds() {
    let server = NbdkitBuilder::memory(MIB).start();
    let mut l = Loop::new();
    let c = l.connect(&server.uri());
    l.ready();
    l.clients[c].aio_disconnect().unwrap();
    l.run_until("the clean close", |l| l.clients[c].is_closed());
    let client = l.clients.pop().unwrap();
    client
        .close()
        .expect("close of a client whose connection closed cleanly");
}
