//! STARTTLS in memory: a toy TLS session, and a fake server that switches to it
//! (or misbehaves when asked to).
//!
//! [`XorSession`] stands in for a real TLS client behind
//! `nbd_proto::TlsSession`: "ciphertext" is plaintext XORed with
//! [`XOR_KEY`], and it takes at most a few bytes per call so that the core's
//! buffering around a session is exercised. [`StartTlsServer`] speaks the
//! greeting and answers `NBD_OPT_STARTTLS` itself as its [`StartTls`] says,
//! then hands the rest of the conversation to a [`FakeServer`], decoding and
//! encoding with the same key once the switch happened. It records every raw
//! byte the client sent, so a test can assert what went on the wire.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nbd_proto::wire::consts::*;
use nbd_proto::wire::{GreetingStart, OptionReplyHeader, OptionRequest};
use nbd_proto::{Error, TlsConnector, TlsSession};

use crate::server::{Builder, FakeServer};

/// The key of the toy cipher.
pub const XOR_KEY: u8 = 0x5a;

/// XORs every byte with [`XOR_KEY`]: the toy cipher both ways.
pub fn xor(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| b ^ XOR_KEY).collect()
}

/// A toy sans-IO "TLS" session: XOR with [`XOR_KEY`], buffered inside, taking
/// at most `max_take` bytes per call.
#[derive(Debug)]
pub struct XorSession {
    max_take: usize,
    plain_in: VecDeque<u8>,
    cipher_out: Vec<u8>,
}

impl XorSession {
    /// A session that takes at most `max_take` bytes per call (at least one).
    pub fn new(max_take: usize) -> Self {
        XorSession {
            max_take: max_take.max(1),
            plain_in: VecDeque::new(),
            cipher_out: Vec::new(),
        }
    }
}

impl TlsSession for XorSession {
    fn read_tls(&mut self, ciphertext: &[u8]) -> Result<usize, Error> {
        let n = ciphertext.len().min(self.max_take);
        self.plain_in
            .extend(ciphertext[..n].iter().map(|b| b ^ XOR_KEY));
        Ok(n)
    }
    fn read_plaintext(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        let n = out.len().min(self.plain_in.len());
        for (o, b) in out.iter_mut().zip(self.plain_in.drain(..n)) {
            *o = b;
        }
        Ok(n)
    }
    fn write_plaintext(&mut self, plaintext: &[u8]) -> Result<usize, Error> {
        let n = plaintext.len().min(self.max_take);
        self.cipher_out
            .extend(plaintext[..n].iter().map(|b| b ^ XOR_KEY));
        Ok(n)
    }
    fn write_tls(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        out.append(&mut self.cipher_out);
        Ok(())
    }
    fn wants_write(&self) -> bool {
        !self.cipher_out.is_empty()
    }
}

/// A connector making [`XorSession`]s of `max_take`, counting them in `made`.
pub fn xor_connector(max_take: usize, made: Arc<AtomicUsize>) -> Box<dyn TlsConnector> {
    Box::new(move || -> nbd_proto::Result<Box<dyn TlsSession>> {
        made.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(XorSession::new(max_take)))
    })
}

/// What a [`StartTlsServer`] answers to `NBD_OPT_STARTTLS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartTls {
    /// Acknowledges, then speaks through the toy cipher: an honest server.
    Ack,
    /// Refuses with this `NBD_REP_ERR_*` and goes on in plaintext.
    Refuse(u32),
    /// Acknowledges, then injects these plaintext bytes at once (the attack
    /// of a man in the middle on STARTTLS).
    AckThenPlaintext(Vec<u8>),
    /// Acknowledges with a payload, which no legal acknowledgement has.
    AckWithPayload,
    /// Answers with an `NBD_REP_SERVER`, which no honest server sends here.
    WrongReplyType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the four bytes of client flags.
    ClientFlags,
    /// Waiting for the first option.
    FirstOption,
    /// The inner server speaks plaintext.
    Plain,
    /// The inner server speaks through the toy cipher.
    Tls,
}

/// A fixed newstyle server that handles `NBD_OPT_STARTTLS` as told, then
/// lets a [`FakeServer`] answer the rest (in plaintext if the first option
/// was something else or STARTTLS was refused).
#[derive(Debug)]
pub struct StartTlsServer {
    behaviour: StartTls,
    settings: Builder,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    client_flags: [u8; 4],
    inner: Option<FakeServer>,
    wire_in: Vec<u8>,
    starttls_seen: usize,
}

impl StartTlsServer {
    /// A server answering STARTTLS as `behaviour` says; `settings` build the
    /// server behind it (its style is ignored: this one is fixed newstyle).
    pub fn new(behaviour: StartTls, settings: Builder) -> Self {
        let mut output = Vec::new();
        GreetingStart::Newstyle.encode(&mut output);
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        StartTlsServer {
            behaviour,
            settings,
            phase: Phase::ClientFlags,
            input: Vec::new(),
            output,
            client_flags: [0; 4],
            inner: None,
            wire_in: Vec::new(),
            starttls_seen: 0,
        }
    }

    /// Every byte the client sent, as it was on the wire.
    pub fn wire_in(&self) -> &[u8] {
        &self.wire_in
    }

    /// How many `NBD_OPT_STARTTLS` options arrived.
    pub fn starttls_seen(&self) -> usize {
        self.starttls_seen
    }

    /// The server behind the STARTTLS exchange, once it took over.
    pub fn inner(&self) -> Option<&FakeServer> {
        self.inner.as_ref()
    }

    /// Whether the conversation switched to the toy cipher.
    pub fn is_tls(&self) -> bool {
        self.phase == Phase::Tls
    }

    /// Whether the server behind it ended the conversation.
    pub fn is_closed(&self) -> bool {
        self.inner.as_ref().is_some_and(FakeServer::is_closed)
    }

    /// Takes every byte the server wants to send.
    pub fn take_output(&mut self) -> Vec<u8> {
        if let Some(inner) = self.inner.as_mut() {
            let more = inner.take_output();
            match self.phase {
                Phase::Tls => self.output.extend(xor(&more)),
                _ => self.output.extend(more),
            }
        }
        std::mem::take(&mut self.output)
    }

    /// Feeds client bytes.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        self.wire_in.extend_from_slice(bytes);
        match self.phase {
            Phase::Tls => {
                if let Some(inner) = self.inner.as_mut() {
                    inner.handle_input(&xor(bytes));
                }
                return;
            }
            Phase::Plain => {
                if let Some(inner) = self.inner.as_mut() {
                    inner.handle_input(bytes);
                }
                return;
            }
            Phase::ClientFlags | Phase::FirstOption => self.input.extend_from_slice(bytes),
        }
        if self.phase == Phase::ClientFlags && self.input.len() >= 4 {
            self.client_flags.copy_from_slice(&self.input[..4]);
            self.input.drain(..4);
            self.phase = Phase::FirstOption;
        }
        if self.phase == Phase::FirstOption && self.input.len() >= OptionRequest::LEN {
            let option =
                u32::from_be_bytes([self.input[8], self.input[9], self.input[10], self.input[11]]);
            if option == OPT_STARTTLS {
                self.starttls_seen += 1;
                self.input.drain(..OptionRequest::LEN);
                self.answer_starttls();
            } else {
                self.hand_over(Phase::Plain);
            }
        }
    }

    /// The client closed its end.
    pub fn handle_eof(&mut self) {
        if let Some(inner) = self.inner.as_mut() {
            inner.handle_eof();
        }
    }

    fn answer_starttls(&mut self) {
        let out = &mut self.output;
        match self.behaviour.clone() {
            StartTls::Ack => {
                OptionReplyHeader::encode_with(OPT_STARTTLS, REP_ACK, &[], out);
                self.hand_over(Phase::Tls);
            }
            StartTls::Refuse(reply) => {
                OptionReplyHeader::encode_with(OPT_STARTTLS, reply, b"not here", out);
                self.hand_over(Phase::Plain);
            }
            StartTls::AckThenPlaintext(bytes) => {
                OptionReplyHeader::encode_with(OPT_STARTTLS, REP_ACK, &[], out);
                out.extend_from_slice(&bytes);
                self.hand_over(Phase::Tls);
            }
            StartTls::AckWithPayload => {
                OptionReplyHeader::encode_with(OPT_STARTTLS, REP_ACK, &[0; 4], out);
                self.hand_over(Phase::Tls);
            }
            StartTls::WrongReplyType => {
                let mut entry = Vec::new();
                entry.extend_from_slice(&0u32.to_be_bytes());
                OptionReplyHeader::encode_with(OPT_STARTTLS, REP_SERVER, &entry, out);
                self.hand_over(Phase::Plain);
            }
        }
    }

    /// The inner server takes over: its greeting is dropped (this one sent
    /// it), it gets the client flags, then whatever input is left.
    fn hand_over(&mut self, phase: Phase) {
        let mut inner = self.settings.clone().build();
        let _greeting = inner.take_output();
        inner.handle_input(&self.client_flags);
        let mut rest = std::mem::take(&mut self.input);
        if phase == Phase::Tls {
            rest = xor(&rest);
        }
        if !rest.is_empty() {
            inner.handle_input(&rest);
        }
        self.inner = Some(inner);
        self.phase = phase;
    }
}
