//! The byte pump: moves bytes between a socket and an `nbd_proto::Connection`,
//! the same way in every adapter.
//!
//! An adapter decides only when to call these (after poll(2) says the socket
//! is ready, on a mio event, from a tokio task); what happens then is here:
//! writes go out vectored and zero-copy until the socket would block, reads
//! land where the connection says (straight into a caller's read buffer for
//! large payloads), and a failing socket ends the connection so that every
//! pending command completes exactly once.
//!
//! ```no_run
//! use nbd_io::{connect, pump, Target};
//! use nbd_proto::{Config, Connection};
//! let mut socket = connect(&Target::Unix("/run/nbd.sock".into()))?;
//! let mut conn = Connection::new(Config::default());
//! while !conn.is_ready() {
//!     pump::write_pending(&mut conn, &mut socket)?;
//!     pump::read_available(&mut conn, &mut socket, None)?;
//!     if let Some(e) = conn.error() {
//!         return Err(e.clone().into());
//!     }
//! }
//! # Ok::<(), nbd_io::Error>(())
//! ```

use std::io::{self, Read, Write};

use nbd_proto::Connection;

use crate::error::{Error, Result};

/// What [`write_pending`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    /// Some bytes went out.
    pub moved: bool,
    /// The socket would take no more: wait until it is writable.
    pub blocked: bool,
}

/// Writes what the connection has pending until it is all out or the socket
/// would block.
///
/// A socket error ends the connection (see [`socket_failed`]).
pub fn write_pending(conn: &mut Connection, socket: &mut impl Write) -> Result<Written> {
    let mut written = Written::default();
    while conn.wants_write() {
        match conn.write_to(|iov| socket.write_vectored(iov)) {
            // Nothing could be listed: a TLS session holds the bytes back.
            Ok(0) => break,
            Ok(_) => written.moved = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                written.blocked = true;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return fail(conn, e).map(|()| Written {
                    moved: true,
                    ..written
                })
            }
        }
    }
    Ok(written)
}

/// Reads what has arrived, into wherever the connection wants it, and
/// returns whether anything was read (end of stream counts).
///
/// Reading stops when the socket would block, at end of stream, after a read
/// shorter than the space offered (the socket is drained for now: no extra
/// `read` that would only say `EAGAIN`), or after `max_reads` reads, so that
/// a fast server cannot starve the writes. With edge-triggered readiness
/// (mio) pass `None`: an edge is only re-armed once the socket is drained.
///
/// A socket error ends the connection (see [`socket_failed`]).
pub fn read_available(
    conn: &mut Connection,
    socket: &mut impl Read,
    max_reads: Option<usize>,
) -> Result<bool> {
    let mut moved = false;
    let mut reads = 0;
    while conn.direction().is_read() && max_reads.is_none_or(|max| reads < max) {
        let mut offered = 0;
        let result = conn.read_from(|buf| {
            offered = buf.len();
            socket.read(buf)
        });
        reads += 1;
        match result {
            Ok(0) => return Ok(true),
            Ok(n) => {
                moved = true;
                if n < offered {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return fail(conn, e).map(|()| true),
        }
    }
    Ok(moved)
}

/// Sorts an error of `read_from` / `write_to`: the connection's own (sticky
/// or misuse) errors come back as they are; anything else is the socket's.
fn fail(conn: &mut Connection, e: io::Error) -> Result<()> {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<nbd_proto::Error>())
    {
        let inner = e
            .into_inner()
            .and_then(|inner| inner.downcast::<nbd_proto::Error>().ok());
        return match inner {
            Some(nbd) => Err(Error::Nbd(*nbd)),
            None => Err(Error::Io(io::Error::other("connection error"))),
        };
    }
    socket_failed(conn, e)
}

/// A socket that failed ends the connection: the core sees end of stream, so
/// every pending command completes exactly once with an error. If that end
/// was expected (the server hung up after a disconnect or abort, as some
/// servers do without waiting to be read), the connection closed cleanly and
/// this is no error; otherwise the socket's error is returned.
///
/// A TLS session that can say why the server went away (credentials refused
/// in or right after the TLS handshake, which servers often answer with a
/// reset) gives its explanation instead of the bare socket error.
pub fn socket_failed(conn: &mut Connection, e: io::Error) -> Result<()> {
    let _ = conn.notify_read(0);
    match conn.error() {
        None if conn.is_closed() => Ok(()),
        Some(tls @ nbd_proto::Error::Tls(_)) => Err(Error::Nbd(tls.clone())),
        _ => Err(Error::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;
    use std::os::unix::net::UnixStream;

    use nbd_proto::wire::consts::*;
    use nbd_proto::wire::{ExportNameReply, GreetingStart};
    use nbd_proto::Config;

    /// A newstyle (not fixed) greeting: the client answers with its flags
    /// and `NBD_OPT_EXPORT_NAME` at once.
    fn greeting() -> Vec<u8> {
        let mut out = Vec::new();
        GreetingStart::Newstyle.encode(&mut out);
        out.extend_from_slice(&0u16.to_be_bytes());
        out
    }

    #[test]
    fn a_handshake_over_a_socket_pair() {
        let (ours, mut server) = UnixStream::pair().unwrap();
        let mut socket = crate::Socket::from_fd(ours.into(), "pair");
        socket.set_nonblocking(true).unwrap();
        let mut conn = Connection::new(Config::default());
        server.write_all(&greeting()).unwrap();
        // Greeting in; client flags and the export name out.
        assert!(read_available(&mut conn, &mut socket, Some(8)).unwrap());
        let written = write_pending(&mut conn, &mut socket).unwrap();
        assert!(written.moved && !written.blocked);
        let mut sent = [0u8; 4 + 16];
        server.read_exact(&mut sent).unwrap();
        let mut reply = Vec::new();
        ExportNameReply {
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS,
        }
        // The flags asked for no NO_ZEROES: the reply carries its 124 zeroes.
        .encode(true, &mut reply);
        server.write_all(&reply).unwrap();
        // All of the reply is in the socket already, so one pass takes it.
        read_available(&mut conn, &mut socket, None).unwrap();
        assert!(conn.is_ready());
        assert_eq!(conn.size().unwrap(), 1 << 20);
        // Nothing more has arrived: a read pass moves nothing and does not block.
        assert!(!read_available(&mut conn, &mut socket, None).unwrap());
    }

    #[test]
    fn a_failing_socket_ends_the_connection() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
            fn write_vectored(&mut self, _: &[IoSlice<'_>]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut conn = Connection::new(Config::default());
        conn.handle_input(&greeting()).unwrap();
        let err = write_pending(&mut conn, &mut Broken).unwrap_err();
        assert!(
            matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{err:?}"
        );
        assert!(conn.is_dead());
        // Once dead, nothing more is read or written, and nothing fails again.
        assert!(!read_available(&mut conn, &mut io::empty(), None).unwrap());
        assert_eq!(
            write_pending(&mut conn, &mut Broken).unwrap(),
            Written::default()
        );
    }
}
