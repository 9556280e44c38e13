//! The seam where TLS joins the byte path.
//!
//! A [`TlsSession`] is a sans-IO TLS client (rustls's `ClientConnection` fits
//! behind it). When the connection owns one, the adapter's bytes are ciphertext:
//! what it reads goes into the session, and what the session decrypts feeds the
//! protocol; protocol output is encrypted before it is offered to the adapter.
//! Without a session the layer costs nothing: the bytes go straight through.

use crate::error::Error;

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
}

/// Buffers around a session: ciphertext read from and waiting for the socket.
pub(crate) struct TlsLayer {
    pub(crate) session: Box<dyn TlsSession>,
    /// Where the adapter reads ciphertext to.
    pub(crate) cipher_in: Vec<u8>,
    /// Ciphertext not yet taken by the socket.
    pub(crate) cipher_out: Vec<u8>,
    pub(crate) cipher_out_sent: usize,
}

impl TlsLayer {
    pub(crate) fn new(session: Box<dyn TlsSession>) -> Self {
        TlsLayer {
            session,
            cipher_in: vec![0; 16 * 1024 + 256],
            cipher_out: Vec::new(),
            cipher_out_sent: 0,
        }
    }

    pub(crate) fn pending_cipher(&self) -> &[u8] {
        &self.cipher_out[self.cipher_out_sent..]
    }

    pub(crate) fn consume_cipher(&mut self, n: usize) {
        self.cipher_out_sent += n.min(self.cipher_out.len() - self.cipher_out_sent);
        if self.cipher_out_sent == self.cipher_out.len() {
            self.cipher_out.clear();
            self.cipher_out_sent = 0;
        }
    }
}
