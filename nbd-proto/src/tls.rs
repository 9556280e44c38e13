//! The seam where TLS joins the byte path.
//!
//! A [`TlsSession`] is a sans-IO TLS client (rustls's `ClientConnection` fits
//! behind it). When the connection owns one, the adapter's bytes are ciphertext:
//! what it reads goes into the session, and what the session decrypts feeds the
//! protocol; protocol output is encrypted before it is offered to the adapter.
//! Without a session the layer costs nothing: the bytes go straight through.
//!
//! # Where a session comes from
//!
//! The core never builds a session itself (it knows no certificates, keys or
//! crypto library). A [`TlsConnector`], given to the connection with
//! [`Connection::set_tls_connector`](crate::Connection::set_tls_connector),
//! makes one at the exact moment the server acknowledges `NBD_OPT_STARTTLS`,
//! inside the call that parsed the acknowledgement. That is why the seam is a
//! connector object and not an event the adapter answers: nothing can happen
//! between the acknowledgement and the switch (no byte parsed or sent in
//! plaintext, no forgotten event leaving the handshake stalled), every adapter
//! gets TLS without code of its own, and the connector stays out of
//! [`Config`](crate::Config), which is plain data that can be compared,
//! printed and built from a URI without holding keys.

use crate::error::{Error, Result};
use crate::output::Output;

/// Whether the connection negotiates TLS (libnbd's `set_tls`).
///
/// ```
/// use nbd_proto::{Config, TlsMode};
/// let config = Config::default().tls(TlsMode::Require);
/// assert_eq!(config.tls, TlsMode::Require);
/// assert_eq!(Config::default().tls, TlsMode::Disable);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsMode {
    /// Never ask for TLS (libnbd's `LIBNBD_TLS_DISABLE`, the default). In
    /// opt mode [`Connection::opt_starttls`](crate::Connection::opt_starttls)
    /// can still ask for it.
    #[default]
    Disable,
    /// Ask for TLS where the server can start it, and go on in plaintext where
    /// it cannot or refuses (`LIBNBD_TLS_ALLOW`).
    /// [`Connection::tls_negotiated`](crate::Connection::tls_negotiated)
    /// says which happened. Open to a man in the middle who refuses for the
    /// server: use `Require` where the connection must be private.
    Allow,
    /// TLS or nothing (`LIBNBD_TLS_REQUIRE`): an oldstyle server, a newstyle
    /// one without the fixed flag, a refused `NBD_OPT_STARTTLS`, a reply no
    /// honest server sends, or a missing [`TlsConnector`] ends the
    /// connection before any other byte is sent.
    Require,
}

/// Makes the [`TlsSession`] a connection switches to when the server
/// acknowledges `NBD_OPT_STARTTLS`. A closure returning a session is one.
///
/// Called at most once per `NBD_OPT_STARTTLS` acknowledgement; an error ends
/// the connection (it is reported as it is, so say what failed).
///
/// ```
/// use nbd_proto::{Config, Connection, TlsConnector, TlsMode, TlsSession};
/// fn connection_with(connector: impl TlsConnector + 'static) -> Connection {
///     let mut conn = Connection::new(Config::default().tls(TlsMode::Require));
///     conn.set_tls_connector(Box::new(connector));
///     conn
/// }
/// // A connector that can only fail: the handshake will end in its error.
/// let conn = connection_with(|| -> nbd_proto::Result<Box<dyn TlsSession>> {
///     Err(nbd_proto::Error::Tls("no certificates configured".into()))
/// });
/// assert!(!conn.tls_negotiated());
/// ```
pub trait TlsConnector: Send {
    /// A new client session, ready to send its first handshake message.
    fn start(&mut self) -> Result<Box<dyn TlsSession>>;
}

impl<F> TlsConnector for F
where
    F: FnMut() -> Result<Box<dyn TlsSession>> + Send,
{
    fn start(&mut self) -> Result<Box<dyn TlsSession>> {
        self()
    }
}

/// A sans-IO TLS client session.
pub trait TlsSession: Send {
    /// Takes ciphertext received from the server; returns how much it took.
    fn read_tls(&mut self, ciphertext: &[u8]) -> Result<usize, Error>;
    /// Moves decrypted plaintext into `out`; returns how much (0 when none is ready).
    fn read_plaintext(&mut self, out: &mut [u8]) -> Result<usize, Error>;
    /// Encrypts plaintext for the server; returns how much it took.
    fn write_plaintext(&mut self, plaintext: &[u8]) -> Result<usize, Error>;
    /// Appends ciphertext waiting to go to the server to `out`.
    fn write_tls(&mut self, out: &mut Vec<u8>) -> Result<(), Error>;
    /// Whether ciphertext is waiting to go out (handshake messages, alerts, data).
    fn wants_write(&self) -> bool;
    /// The server closed the connection when the protocol did not expect it:
    /// the error that explains it, if the session knows one (the handshake
    /// was not over, or the server hung up before any data, as servers do
    /// when they refuse the client's certificate or key). `None` (the
    /// default) leaves the connection's own "server closed the connection".
    fn explain_end_of_stream(&mut self) -> Option<Error> {
        None
    }
}

/// Buffers around a session: ciphertext read from and waiting for the socket.
pub(crate) struct TlsLayer {
    session: Box<dyn TlsSession>,
    /// Where the adapter reads ciphertext to.
    cipher_in: Vec<u8>,
    /// Ciphertext not yet taken by the socket.
    cipher_out: Vec<u8>,
    cipher_out_sent: usize,
    /// Server bytes are refused until the client's first TLS message went
    /// out: in TLS the client speaks first, so anything earlier was injected.
    client_first: bool,
}

impl TlsLayer {
    /// A layer around `session`; with `client_first`, server bytes are
    /// refused until ciphertext has gone out (see [`Self::awaits_client`]).
    pub(crate) fn new(session: Box<dyn TlsSession>, client_first: bool) -> Self {
        TlsLayer {
            session,
            cipher_in: vec![0; 16 * 1024 + 256],
            cipher_out: Vec::new(),
            cipher_out_sent: 0,
            client_first,
        }
    }

    /// Whether the client has not yet sent its first TLS message, so that any
    /// server byte now is an injection (the server cannot answer a hello it
    /// has not seen). Whatever way the injected bytes were cut into reads,
    /// the connection refuses them the same way.
    pub(crate) fn awaits_client(&self) -> bool {
        self.client_first
    }

    /// Where the adapter reads ciphertext to.
    pub(crate) fn cipher_space(&mut self) -> &mut [u8] {
        &mut self.cipher_in[..]
    }

    /// Offers the session the ciphertext read to `cipher_space()[from..to]`;
    /// returns how much it took. Callers keep `from <= to <= cipher_space().len()`.
    pub(crate) fn decrypt_from(&mut self, from: usize, to: usize) -> Result<usize, Error> {
        let offered = to - from;
        match self.session.read_tls(&self.cipher_in[from..to])? {
            k if k > offered => Err(Error::Tls(format!(
                "TLS session claims {k} ciphertext bytes taken of {offered}"
            ))),
            k => Ok(k),
        }
    }

    /// Moves decrypted plaintext into `space`; returns how much.
    pub(crate) fn read_plaintext(&mut self, space: &mut [u8]) -> Result<usize, Error> {
        let room = space.len();
        match self.session.read_plaintext(space)? {
            k if k > room => Err(Error::Tls(format!(
                "TLS session claims {k} plaintext bytes written into {room}"
            ))),
            k => Ok(k),
        }
    }

    /// Encrypts as much of `output` as the session takes, then collects the
    /// ciphertext waiting to go out.
    pub(crate) fn encrypt(&mut self, output: &mut Output) -> Result<(), Error> {
        while !output.is_empty() {
            let offered = output.first().len();
            match self.session.write_plaintext(output.first())? {
                0 => break,
                k if k > offered => {
                    return Err(Error::Tls(format!(
                        "TLS session claims {k} plaintext bytes taken of {offered}"
                    )))
                }
                k => output.consume(k),
            }
        }
        self.session.write_tls(&mut self.cipher_out)
    }

    /// Whether ciphertext is waiting to go out, here or in the session.
    pub(crate) fn wants_write(&self) -> bool {
        !self.pending_cipher().is_empty() || self.session.wants_write()
    }

    /// The session's explanation of an unexpected end of stream, if any.
    pub(crate) fn explain_end_of_stream(&mut self) -> Option<Error> {
        self.session.explain_end_of_stream()
    }

    pub(crate) fn pending_cipher(&self) -> &[u8] {
        &self.cipher_out[self.cipher_out_sent..]
    }

    pub(crate) fn consume_cipher(&mut self, n: usize) {
        if n > 0 {
            self.client_first = false;
        }
        self.cipher_out_sent += n.min(self.cipher_out.len() - self.cipher_out_sent);
        if self.cipher_out_sent == self.cipher_out.len() {
            self.cipher_out.clear();
            self.cipher_out_sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The TLS seam in the byte path, proved with a toy session that XORs every
    //! byte with a key and buffers internally, taking a few bytes per call.

    use std::collections::VecDeque;

    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::wire::consts::*;
    use crate::wire::{
        ChunkHeader, GreetingStart, HoleChunk, Info, OptionReplyHeader, SimpleReply,
    };
    use crate::{CmdFlags, Config, Connection, Errno, Event};

    const KEY: u8 = 0x5a;

    struct XorSession {
        key: u8,
        /// Most bytes taken per `read_tls` / `write_plaintext` call.
        max_take: usize,
        plain_in: VecDeque<u8>,
        cipher_out: Vec<u8>,
        /// Fail `read_tls` once this many ciphertext bytes were taken.
        fail_after: Option<usize>,
        taken: usize,
        /// A buggy session: claims this many bytes more than it really moved
        /// (in `read_tls`, `read_plaintext` and `write_plaintext`).
        overclaim: usize,
    }

    impl XorSession {
        fn new(max_take: usize) -> Self {
            XorSession {
                key: KEY,
                max_take,
                plain_in: VecDeque::new(),
                cipher_out: Vec::new(),
                fail_after: None,
                taken: 0,
                overclaim: 0,
            }
        }
    }

    impl TlsSession for XorSession {
        fn read_tls(&mut self, ciphertext: &[u8]) -> Result<usize, Error> {
            if self.fail_after.is_some_and(|limit| self.taken >= limit) {
                return Err(Error::Tls("bad record MAC".into()));
            }
            let n = ciphertext.len().min(self.max_take);
            self.plain_in
                .extend(ciphertext[..n].iter().map(|b| b ^ self.key));
            self.taken += n;
            Ok(n + self.overclaim)
        }
        fn read_plaintext(&mut self, out: &mut [u8]) -> Result<usize, Error> {
            let n = out.len().min(self.plain_in.len());
            for (o, b) in out.iter_mut().zip(self.plain_in.drain(..n)) {
                *o = b;
            }
            Ok(if n > 0 { n + self.overclaim } else { 0 })
        }
        fn write_plaintext(&mut self, plaintext: &[u8]) -> Result<usize, Error> {
            let n = plaintext.len().min(self.max_take);
            self.cipher_out
                .extend(plaintext[..n].iter().map(|b| b ^ self.key));
            Ok(n + self.overclaim)
        }
        fn write_tls(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
            out.append(&mut self.cipher_out);
            Ok(())
        }
        fn wants_write(&self) -> bool {
            !self.cipher_out.is_empty()
        }
    }

    fn xor(bytes: &[u8]) -> Vec<u8> {
        bytes.iter().map(|b| b ^ KEY).collect()
    }

    fn handshake_script() -> Vec<u8> {
        let mut s = Vec::new();
        GreetingStart::Newstyle.encode(&mut s);
        s.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        // A server without extended headers, as nbdkit 1.32.
        OptionReplyHeader::encode_with(OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, &[], &mut s);
        OptionReplyHeader::encode_with(OPT_STRUCTURED_REPLY, REP_ACK, &[], &mut s);
        let mut info = Vec::new();
        Info::Export {
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA,
        }
        .encode(&mut info);
        OptionReplyHeader::encode_with(OPT_GO, REP_INFO, &info, &mut s);
        OptionReplyHeader::encode_with(OPT_GO, REP_ACK, &[], &mut s);
        s
    }

    fn data_pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Replies to: a 100000-byte read at 0 (data + hole), a write, a flush.
    fn reply_script(read: u64, write: u64, flush: u64) -> Vec<u8> {
        let mut s = Vec::new();
        let data = data_pattern(60_000);
        ChunkHeader {
            flags: 0,
            chunk_type: REPLY_TYPE_OFFSET_DATA,
            cookie: read,
            offset: 0,
            length: 8 + data.len() as u64,
        }
        .encode_structured(&mut s);
        s.extend_from_slice(&0u64.to_be_bytes());
        s.extend_from_slice(&data);
        SimpleReply {
            error: 0,
            cookie: write,
        }
        .encode(&mut s);
        ChunkHeader {
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_OFFSET_HOLE,
            cookie: read,
            offset: 0,
            length: HoleChunk::LEN as u64,
        }
        .encode_structured(&mut s);
        HoleChunk {
            offset: 60_000,
            length: 40_000,
        }
        .encode(&mut s);
        SimpleReply {
            error: 0,
            cookie: flush,
        }
        .encode(&mut s);
        s
    }

    /// Feeds `bytes` through `recv_buf` / `notify_read` in reads of `chunk` bytes.
    fn pump_in(conn: &mut Connection, bytes: &[u8], chunk: usize) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let buf = conn.recv_buf();
            assert!(!buf.is_empty());
            let n = buf.len().min(chunk).min(rest.len());
            buf[..n].copy_from_slice(&rest[..n]);
            conn.notify_read(n).unwrap();
            rest = &rest[n..];
        }
    }

    struct Transcript {
        events: Vec<String>,
        wire_out: Vec<u8>,
        buffer: Vec<u8>,
    }

    /// Runs handshake, read, write, flush and disconnect, with or without TLS;
    /// server bytes are encrypted on the way in when TLS is on.
    fn session(tls: bool, read_chunk: usize) -> Transcript {
        let mut conn = Connection::new(Config::default());
        if tls {
            conn.install_tls(Box::new(XorSession::new(7)));
        }
        let enc = |b: Vec<u8>| if tls { xor(&b) } else { b };
        let mut events = Vec::new();
        let mut wire_out = Vec::new();
        let mut buffer = Vec::new();
        let mut record = |conn: &mut Connection, buffer: &mut Vec<u8>| {
            while let Some(e) = conn.poll_event() {
                events.push(format!("{e:?}"));
                if let Event::Completed(c) = e {
                    if let Some(b) = c.buffer {
                        *buffer = b.to_vec();
                    }
                }
            }
        };
        pump_in(&mut conn, &enc(handshake_script()), read_chunk);
        wire_out.extend(conn.take_output());
        record(&mut conn, &mut buffer);
        assert!(conn.is_ready(), "{:?}", conn.error());
        assert!(conn.structured_replies_negotiated());

        let mut buf = BytesMut::with_capacity(100_000);
        buf.resize(100_000, 0xff);
        let read = conn.pread(buf, 0, CmdFlags::empty()).unwrap();
        let write = conn
            .pwrite(Bytes::from(data_pattern(3000)), 4096, CmdFlags::FUA)
            .unwrap();
        let flush = conn.flush(CmdFlags::empty()).unwrap();
        assert!(conn.wants_write());
        wire_out.extend(conn.take_output());
        assert!(!conn.wants_write());
        pump_in(
            &mut conn,
            &enc(reply_script(read.get(), write.get(), flush.get())),
            read_chunk,
        );
        record(&mut conn, &mut buffer);
        conn.disconnect().unwrap();
        wire_out.extend(conn.take_output());
        record(&mut conn, &mut buffer);
        assert!(conn.is_closed());
        Transcript {
            events,
            wire_out,
            buffer,
        }
    }

    #[test]
    fn tls_session_transforms_every_byte_and_changes_no_result() {
        let plain = session(false, 4096);
        for read_chunk in [1, 13, 4096, 1 << 20] {
            let tls = session(true, read_chunk);
            assert_eq!(tls.events, plain.events, "read size {read_chunk}");
            assert_eq!(tls.buffer, plain.buffer);
            // What went on the wire is the plain stream, transformed.
            assert_eq!(tls.wire_out.len(), plain.wire_out.len());
            assert_ne!(tls.wire_out, plain.wire_out);
            assert_eq!(xor(&tls.wire_out), plain.wire_out);
        }
        // The plain run is right in itself.
        assert_eq!(&plain.buffer[..60_000], &data_pattern(60_000)[..]);
        assert!(plain.buffer[60_000..].iter().all(|&b| b == 0));
        let completed = plain
            .events
            .iter()
            .filter(|e| e.starts_with("Completed"))
            .count();
        assert_eq!(completed, 3);
        assert!(plain
            .events
            .last()
            .unwrap()
            .starts_with("Closed { error: None"));
    }

    #[test]
    fn tls_output_waits_for_the_adapter_and_partial_writes_resume() {
        let mut conn = Connection::new(Config::default());
        conn.install_tls(Box::new(XorSession::new(5)));
        let mut greeting = Vec::new();
        GreetingStart::Newstyle.encode(&mut greeting);
        greeting.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        conn.handle_input(&xor(&greeting)).unwrap();
        assert!(conn.direction().is_write());
        // Write the ciphertext 3 bytes at a time.
        let mut wire = Vec::new();
        loop {
            let mut iov = [std::io::IoSlice::new(&[]); 4];
            let n = conn.output(&mut iov);
            if n == 0 {
                break;
            }
            assert_eq!(n, 1, "ciphertext is one contiguous slice");
            let take = iov[0].len().min(3);
            wire.extend_from_slice(&iov[0][..take]);
            conn.notify_write(take).unwrap();
        }
        assert!(!conn.wants_write());
        let plain = xor(&wire);
        assert_eq!(&plain[..4], &FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        assert_eq!(&plain[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u32::from_be_bytes(plain[12..16].try_into().unwrap()),
            OPT_EXTENDED_HEADERS
        );
    }

    #[test]
    fn tls_failure_kills_the_connection_and_fails_pending_commands() {
        let mut conn = Connection::new(Config::default());
        let script = handshake_script();
        let mut session = XorSession::new(usize::MAX);
        session.fail_after = Some(script.len());
        conn.install_tls(Box::new(session));
        conn.handle_input(&xor(&script)).unwrap();
        let _ = conn.take_output();
        assert!(conn.is_ready());
        while conn.poll_event().is_some() {}
        let cookie = conn.flush(CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        // The session fails inside this call, so the call reports the sticky error.
        assert!(matches!(conn.handle_input(&[0; 16]), Err(Error::Tls(_))));
        let events: Vec<Event> = std::iter::from_fn(|| conn.poll_event()).collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(&events[0], Event::Completed(c)
            if c.cookie == cookie && c.result.as_ref().unwrap_err().errno() == Errno::NotConn));
        assert!(matches!(
            &events[1],
            Event::Closed {
                error: Some(Error::Tls(_))
            }
        ));
        assert!(conn.is_dead());
        assert_eq!(conn.error().unwrap().errno(), Errno::Proto);
        assert!(conn.recv_buf().is_empty());
        assert!(matches!(conn.notify_read(1), Err(Error::Tls(_))));
    }

    #[test]
    fn a_session_that_takes_no_ciphertext_is_an_error_not_a_silent_drop() {
        let mut conn = Connection::new(Config::default());
        conn.install_tls(Box::new(XorSession::new(0)));
        let err = conn.handle_input(&xor(&handshake_script())).unwrap_err();
        assert!(
            matches!(err, Error::Tls(ref m) if m.contains("refused")),
            "{err}"
        );
        assert!(conn.is_dead());
    }

    #[test]
    fn byte_call_misuse_in_tls_mode_is_einval_and_changes_nothing() {
        let mut conn = Connection::new(Config::default());
        conn.install_tls(Box::new(XorSession::new(usize::MAX)));
        let script = xor(&handshake_script());
        // A report with no offer.
        assert_eq!(conn.notify_read(1).unwrap_err().errno(), Errno::Inval);
        // More than the ciphertext buffer offered.
        let offered = conn.recv_buf().len();
        let e = conn.notify_read(offered + 1).unwrap_err();
        assert_eq!(e.errno(), Errno::Inval);
        // Nothing changed: the handshake goes through.
        pump_in(&mut conn, &script, 4096);
        assert!(conn.is_ready(), "{:?}", conn.error());
        // Output: more than the ciphertext listed.
        let _ = conn.take_output();
        let _cookie = conn.flush(CmdFlags::empty()).unwrap();
        let listed = {
            let mut iov = [std::io::IoSlice::new(&[]); 4];
            let n = conn.output(&mut iov);
            iov[..n].iter().map(|s| s.len()).sum::<usize>()
        };
        assert!(listed > 0);
        let e = conn.notify_write(listed + 1).unwrap_err();
        assert_eq!(e.errno(), Errno::Inval);
        let sent = xor(&conn.take_output());
        assert_eq!(sent.len(), listed, "the whole request is still there");
        assert!(conn.is_ready());
    }

    #[test]
    fn a_session_claiming_more_bytes_than_it_was_given_is_a_tls_error_not_a_panic() {
        for stage in 0..2 {
            let mut conn = Connection::new(Config::default());
            let mut session = XorSession::new(usize::MAX);
            session.overclaim = 1;
            conn.install_tls(Box::new(session));
            let result = if stage == 0 {
                // Input: read_tls / read_plaintext overclaim.
                conn.handle_input(&xor(&handshake_script()))
            } else {
                // Output: write_plaintext overclaims on the client flags.
                let mut greeting = Vec::new();
                GreetingStart::Newstyle.encode(&mut greeting);
                greeting.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
                let _ = conn.handle_input(&xor(&greeting));
                let _ = conn.take_output();
                match conn.error() {
                    Some(e) => Err(e.clone()),
                    None => Ok(()),
                }
            };
            let err = result.unwrap_err();
            assert!(
                matches!(err, Error::Tls(ref m) if m.contains("claims")),
                "{err}"
            );
            assert!(conn.is_dead());
        }
    }
}
