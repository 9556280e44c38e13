//! TLS with a pre-shared key, through OpenSSL.
//!
//! Why OpenSSL: rustls offers no external pre-shared keys (only resumption
//! tickets), and the pure-Rust alternatives do not either. OpenSSL is the
//! best-kept library that does, it is on every Linux distribution (nbdkit and
//! qemu link GnuTLS, which has no maintained Rust binding), and the `openssl`
//! crate is the long-standing binding to it. It stays behind the
//! `openssl-psk` cargo feature so the default, pure-Rust build links no C
//! TLS library.
//!
//! The key file is psktool's format (as nbdkit's `--tls-psk` and qemu's
//! `tls-creds-psk` read it): one `username:hexkey` per line.
//!
//! OpenSSL drives the TLS handshake over two in-memory buffers (its memory
//! "socket" here), so the session stays sans-IO like the rest of the core.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use nbd_proto::{TlsConnector, TlsSession};
use openssl::error::ErrorStack;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslMode, SslStream, SslVersion};

use super::read_setting_file;
use crate::error::{Error, Result};
use crate::policy::TlsRequest;

/// Most plaintext held before OpenSSL can take it (during the handshake).
const MAX_PENDING_PLAINTEXT: usize = 1 << 20;
/// Most ciphertext held before OpenSSL reads it.
const MAX_PENDING_CIPHERTEXT: usize = 256 * 1024;

/// Makes OpenSSL client sessions that authenticate with one user's key.
pub(crate) struct PskConnector {
    context: SslContext,
    username: Arc<str>,
    file: Arc<str>,
}

impl PskConnector {
    pub(crate) fn new(request: &TlsRequest) -> Result<Self> {
        let Some(file) = &request.psk_file else {
            return Err(Error::Tls("tls-type=psk needs tls-psk-file".into()));
        };
        let username = match &request.username {
            Some(user) => user.clone(),
            None => login_name()?,
        };
        let key = lookup_key(file, &username)?;
        let ssl_error = |e: ErrorStack| Error::Tls(format!("OpenSSL: {e}"));
        let mut builder = SslContext::builder(SslMethod::tls_client()).map_err(ssl_error)?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl_error)?;
        // PSK key exchange only: no certificate is involved.
        builder.set_cipher_list("PSK").map_err(ssl_error)?;
        builder.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
        let identity = username.clone();
        builder.set_psk_client_callback(move |_ssl, _hint, identity_out, psk_out| {
            let id = identity.as_bytes();
            // The identity goes out NUL-terminated; both must fit.
            if id.len() + 1 > identity_out.len() || key.len() > psk_out.len() {
                return Err(ErrorStack::get());
            }
            identity_out[..id.len()].copy_from_slice(id);
            identity_out[id.len()] = 0;
            psk_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        Ok(PskConnector {
            context: builder.build(),
            username: username.into(),
            file: file.display().to_string().into(),
        })
    }
}

impl TlsConnector for PskConnector {
    fn start(&mut self) -> nbd_proto::Result<Box<dyn TlsSession>> {
        let fail = |e: ErrorStack| nbd_proto::Error::Tls(format!("OpenSSL: {e}"));
        let mut ssl = Ssl::new(&self.context).map_err(fail)?;
        ssl.set_connect_state();
        let stream = SslStream::new(ssl, Buffers::default()).map_err(fail)?;
        let mut session = PskSession {
            stream,
            plain_out: Vec::new(),
            heard_from_server: false,
            username: self.username.clone(),
            file: self.file.clone(),
        };
        // The client speaks first: its hello is ready to go at once, so the
        // connection wants to write even with nothing of its own to say.
        match session.stream.do_handshake() {
            Ok(()) => {}
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => {}
            Err(e) => return Err(session.describe(&e)),
        }
        Ok(Box::new(session))
    }
}

/// The local login name, libnbd's default user name.
fn login_name() -> Result<String> {
    for var in ["LOGNAME", "USER"] {
        if let Ok(name) = std::env::var(var) {
            if !name.is_empty() {
                return Ok(name);
            }
        }
    }
    Err(Error::Tls(
        "cannot tell the local login name (LOGNAME and USER are unset): give tls-username".into(),
    ))
}

/// The key of `username` in a psktool file: its first `username:hexkey` line.
fn lookup_key(file: &Path, username: &str) -> Result<Vec<u8>> {
    let text = read_setting_file(file, "PSK file")?;
    let text = String::from_utf8_lossy(&text);
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some((user, hex)) = line.split_once(':') {
            if user == username {
                return decode_hex(hex).ok_or_else(|| {
                    Error::Tls(format!(
                        "PSK file {}: the key of {username:?} is not hexadecimal",
                        file.display()
                    ))
                });
            }
        }
    }
    Err(Error::Tls(format!(
        "PSK file {}: no key for user {username:?}",
        file.display()
    )))
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// OpenSSL's "socket": ciphertext from the server waiting to be read, and
/// ciphertext for the server waiting to be taken.
#[derive(Debug, Default)]
struct Buffers {
    incoming: VecDeque<u8>,
    outgoing: Vec<u8>,
}

impl Read for Buffers {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.incoming.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.incoming.len());
        for (o, b) in buf.iter_mut().zip(self.incoming.drain(..n)) {
            *o = b;
        }
        Ok(n)
    }
}

impl Write for Buffers {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OpenSSL PSK client behind the core's session seam. Plaintext written
/// during the handshake waits here until OpenSSL can take it, so the core
/// never sees a session that refuses output (which would make an event loop
/// spin on a writable socket with nothing to write).
struct PskSession {
    stream: SslStream<Buffers>,
    plain_out: Vec<u8>,
    /// Whether any application data arrived (the server accepted the key).
    heard_from_server: bool,
    username: Arc<str>,
    file: Arc<str>,
}

impl PskSession {
    /// Hands waiting plaintext to OpenSSL as far as it takes it.
    fn flush_plaintext(&mut self) -> nbd_proto::Result<()> {
        while !self.plain_out.is_empty() {
            match self.stream.ssl_write(&self.plain_out) {
                Ok(n) => {
                    self.plain_out.drain(..n);
                }
                Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => {
                    return Ok(())
                }
                Err(e) => return Err(self.describe(&e)),
            }
        }
        Ok(())
    }

    fn describe(&self, e: &openssl::ssl::Error) -> nbd_proto::Error {
        let detail = e
            .ssl_error()
            .map_or_else(|| e.to_string(), ToString::to_string);
        let handshaking = !self.stream.ssl().is_init_finished();
        let what = if handshaking {
            format!(
                "the PSK handshake as user {:?} (key from {}) failed; the server does not \
                 know this user or has another key for it",
                self.username, self.file
            )
        } else {
            "TLS failed".to_string()
        };
        nbd_proto::Error::Tls(format!("{what}: {}", detail.replace('\n', "; ")))
    }
}

impl TlsSession for PskSession {
    fn read_tls(&mut self, ciphertext: &[u8]) -> nbd_proto::Result<usize> {
        let incoming = &mut self.stream.get_mut().incoming;
        let room = MAX_PENDING_CIPHERTEXT.saturating_sub(incoming.len());
        let n = ciphertext.len().min(room);
        incoming.extend(&ciphertext[..n]);
        Ok(n)
    }

    fn read_plaintext(&mut self, out: &mut [u8]) -> nbd_proto::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let result = match self.stream.ssl_read(out) {
            Ok(n) => {
                self.heard_from_server |= n > 0;
                Ok(n)
            }
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => Ok(0),
            // The server's close_notify: the socket's end of stream follows.
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
            Err(e) => Err(self.describe(&e)),
        };
        // Finishing the handshake may let waiting plaintext go.
        self.flush_plaintext()?;
        result
    }

    fn write_plaintext(&mut self, plaintext: &[u8]) -> nbd_proto::Result<usize> {
        let room = MAX_PENDING_PLAINTEXT.saturating_sub(self.plain_out.len());
        let n = plaintext.len().min(room);
        self.plain_out.extend_from_slice(&plaintext[..n]);
        self.flush_plaintext()?;
        Ok(n)
    }

    fn write_tls(&mut self, out: &mut Vec<u8>) -> nbd_proto::Result<()> {
        self.flush_plaintext()?;
        out.append(&mut self.stream.get_mut().outgoing);
        Ok(())
    }

    fn wants_write(&self) -> bool {
        !self.stream.get_ref().outgoing.is_empty()
            || (!self.plain_out.is_empty() && self.stream.ssl().is_init_finished())
    }

    fn explain_end_of_stream(&mut self) -> Option<nbd_proto::Error> {
        let when = if !self.stream.ssl().is_init_finished() {
            "during the TLS handshake"
        } else if !self.heard_from_server {
            "right after the TLS handshake, before any data"
        } else {
            return None;
        };
        Some(nbd_proto::Error::Tls(format!(
            "the server closed the connection {when}: it does not know user {:?} or has \
             another key for it than {} has",
            self.username, self.file
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_user_and_decoded() {
        let dir = std::env::temp_dir().join(format!("nbd-io-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.psk");
        std::fs::write(&file, "bob:00ff\r\nalice:0a0B0c\nbroken\n").unwrap();
        assert_eq!(lookup_key(&file, "alice").unwrap(), [0x0a, 0x0b, 0x0c]);
        assert_eq!(lookup_key(&file, "bob").unwrap(), [0x00, 0xff]);
        let err = lookup_key(&file, "carol").unwrap_err().to_string();
        assert!(err.contains("no key for user \"carol\""), "{err}");
        std::fs::write(&file, "alice:xyz\n").unwrap();
        assert!(lookup_key(&file, "alice").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(lookup_key(&file, "alice")
            .unwrap_err()
            .to_string()
            .contains("cannot read PSK file"));
    }
}
