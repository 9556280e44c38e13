//! [`Pair`]: a client [`Connection`] wired to a [`FakeServer`] in memory.
//!
//! The NBD counterpart of quinn-proto's test `Pair`: no socket, no thread, no
//! clock. [`Pair::drive`] moves bytes both ways until neither side has
//! anything to say, optionally cutting each direction's stream into pieces
//! of seeded random sizes, so a whole workload runs in one test function and
//! any failure replays from its seed.

use std::collections::VecDeque;

use nbd_proto::{Completion, Config, Connection, Cookie, Error, Event};

use crate::rng::Rng;
use crate::server::FakeServer;

/// Most drive rounds before [`Pair::drive`] gives up: a conversation that
/// never goes quiet is a bug in the client or the server, not a workload.
const MAX_ROUNDS: usize = 1_000_000;

/// A client connection and a fake server, connected by memory.
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use nbd_proto::{CmdFlags, Config};
/// use nbd_testkit::{FakeServer, Pair};
///
/// let mut pair = Pair::new(Config::default(), FakeServer::builder().size(8192).build());
/// pair.handshake().unwrap();
/// let cookie = pair.client.pwrite(Bytes::from_static(b"abc"), 10, CmdFlags::empty()).unwrap();
/// pair.wait(cookie).unwrap().result.unwrap();
/// let cookie = pair.client.pread(BytesMut::zeroed(3), 10, CmdFlags::empty()).unwrap();
/// let done = pair.wait(cookie).unwrap();
/// assert_eq!(&done.buffer.unwrap()[..], b"abc");
/// ```
#[derive(Debug)]
pub struct Pair {
    /// The client side: call its commands directly.
    pub client: Connection,
    /// The server side: inspect its image and what it saw.
    pub server: FakeServer,
    splits: Option<(Rng, usize)>,
    stash: VecDeque<Event>,
    client_saw_eof: bool,
    server_saw_eof: bool,
    bytes_to_server: u64,
    bytes_to_client: u64,
}

impl Pair {
    /// A client configured by `config` facing `server`; nothing moves until
    /// [`Pair::drive`].
    pub fn new(config: Config, server: FakeServer) -> Self {
        Pair {
            client: Connection::new(config),
            server,
            splits: None,
            stash: VecDeque::new(),
            client_saw_eof: false,
            server_saw_eof: false,
            bytes_to_server: 0,
            bytes_to_client: 0,
        }
    }

    /// Delivers both streams in pieces of random sizes in `1..=max_piece`
    /// drawn from `seed` (`max_piece` 1 is byte at a time).
    pub fn with_splits(mut self, seed: u64, max_piece: usize) -> Self {
        self.splits = Some((Rng::new(seed), max_piece.max(1)));
        self
    }

    /// Bytes delivered so far: `(client to server, server to client)`.
    pub fn bytes_moved(&self) -> (u64, u64) {
        (self.bytes_to_server, self.bytes_to_client)
    }

    /// Moves bytes both ways until neither side has anything left to send;
    /// returns whether anything moved. A side that closed gets end of
    /// stream on the other once its last bytes are delivered.
    ///
    /// Panics if the two never go quiet (a livelock is a bug to report, not
    /// a result).
    pub fn drive(&mut self) -> bool {
        let mut moved = false;
        for _ in 0..MAX_ROUNDS {
            let mut round = false;
            let out = self.client.take_output();
            if !out.is_empty() {
                round = true;
                self.bytes_to_server += out.len() as u64;
                let server = &mut self.server;
                feed(&mut self.splits, &out, |piece| server.handle_input(piece));
            }
            let out = self.server.take_output();
            if !out.is_empty() {
                round = true;
                self.bytes_to_client += out.len() as u64;
                let client = &mut self.client;
                feed(&mut self.splits, &out, |piece| {
                    // A dead client reports why in its events.
                    let _ = client.handle_input(piece);
                });
            }
            if self.server.is_closed() && !self.server.has_output() && !self.client_saw_eof {
                self.client_saw_eof = true;
                round = true;
                let _ = self.client.handle_input(&[]);
            }
            let client_over = self.client.is_closed() || self.client.is_dead();
            if client_over && !self.client.wants_write() && !self.server_saw_eof {
                self.server_saw_eof = true;
                round = true;
                self.server.handle_eof();
            }
            if !round {
                return moved;
            }
            moved = true;
        }
        panic!("the client and the fake server never went quiet");
    }

    /// Drives until the client is ready for commands (or waits for options
    /// in opt mode). Returns the reason the connection closed instead, if it
    /// did; the events seen on the way stay available to [`Pair::poll_event`].
    pub fn handshake(&mut self) -> Result<(), Error> {
        self.drive();
        self.collect();
        if self.client.is_ready() || self.client.is_negotiating() {
            return Ok(());
        }
        let closed = self.stash.iter().find_map(|e| match e {
            Event::Closed { error } => Some(error.clone()),
            _ => None,
        });
        Err(match closed {
            Some(Some(error)) => error,
            _ => self
                .client
                .error()
                .cloned()
                .unwrap_or_else(|| Error::InvalidState("handshake did not finish".into())),
        })
    }

    /// The next client event, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.stash.pop_front().or_else(|| self.client.poll_event())
    }

    /// Every client event so far, in order.
    pub fn events(&mut self) -> Vec<Event> {
        self.collect();
        self.stash.drain(..).collect()
    }

    /// Drives, then takes the completion of `cookie` if it arrived; other
    /// events stay queued for [`Pair::poll_event`].
    pub fn wait(&mut self, cookie: Cookie) -> Option<Completion> {
        self.drive();
        self.collect();
        let at = self
            .stash
            .iter()
            .position(|e| matches!(e, Event::Completed(c) if c.cookie == cookie))?;
        match self.stash.remove(at) {
            Some(Event::Completed(done)) => Some(done),
            _ => None,
        }
    }

    /// Drives and takes every completion that arrived, in order.
    pub fn completions(&mut self) -> Vec<Completion> {
        self.drive();
        self.collect();
        let mut done = Vec::new();
        let mut rest = VecDeque::new();
        for event in self.stash.drain(..) {
            match event {
                Event::Completed(c) => done.push(c),
                other => rest.push_back(other),
            }
        }
        self.stash = rest;
        done
    }

    fn collect(&mut self) {
        while let Some(event) = self.client.poll_event() {
            self.stash.push_back(event);
        }
    }
}

/// Hands `bytes` to `sink` whole, or in random pieces.
fn feed(splits: &mut Option<(Rng, usize)>, bytes: &[u8], mut sink: impl FnMut(&[u8])) {
    let Some((rng, max)) = splits else {
        sink(bytes);
        return;
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rng.range_usize(1..(*max).min(rest.len()) + 1);
        sink(&rest[..n]);
        rest = &rest[n..];
    }
}
