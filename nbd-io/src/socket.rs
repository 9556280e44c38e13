//! [`Socket`]: a connected stream to an NBD server, whatever reached it.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendFlags};

use crate::server::ServerProcess;

/// A connected stream socket to an NBD server: TCP, Unix, vsock, one end of
/// a socket pair to a server subprocess, or a socket the caller handed over.
///
/// It owns the file descriptor and, for targets that start a server, the
/// server process, which is stopped and reaped when the socket is dropped.
/// Reads and writes go straight to the descriptor; writes never raise
/// `SIGPIPE` (a server that went away is an `EPIPE` error, even in a program
/// that has not ignored the signal). Any event loop can wait on it through
/// [`AsFd`] / [`AsRawFd`].
pub struct Socket {
    fd: OwnedFd,
    /// What was connected to, for error messages.
    peer: String,
    /// Whether `sendmsg` works on the descriptor (false for a caller's fd
    /// that is not a socket, where `writev` is used instead).
    is_socket: bool,
    server: Option<ServerProcess>,
}

impl Socket {
    /// Wraps a connected stream socket the caller already holds (libnbd's
    /// `connect_socket`). `peer` names it in error messages.
    ///
    /// ```no_run
    /// use std::os::unix::net::UnixStream;
    /// let stream = UnixStream::connect("/run/nbd.sock")?;
    /// let socket = nbd_io::Socket::from_fd(stream.into(), "my server");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_fd(fd: OwnedFd, peer: impl Into<String>) -> Socket {
        let is_socket = rustix::net::sockopt::socket_type(&fd).is_ok();
        Socket {
            fd,
            peer: peer.into(),
            is_socket,
            server: None,
        }
    }

    pub(crate) fn with_server(mut self, server: ServerProcess) -> Socket {
        self.server = Some(server);
        self
    }

    /// What this socket is connected to, as error messages name it.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The process id of the server this socket started, if it started one.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(ServerProcess::pid)
    }

    /// Switches the descriptor between blocking and non-blocking mode.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        rustix::io::ioctl_fionbio(&self.fd, nonblocking)?;
        Ok(())
    }

    /// Shuts down both directions, so the server sees end of stream even if
    /// another copy of the descriptor is open.
    pub fn shutdown(&self) -> io::Result<()> {
        if self.is_socket {
            rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Both)?;
        }
        Ok(())
    }

    /// The round-trip time to the server as the kernel measures it: TCP's
    /// smoothed estimate (`TCP_INFO`), zero for a Unix or vsock socket (a
    /// peer on the same machine or its host), `None` where neither applies
    /// (a descriptor that is not a socket, or an unknown family).
    ///
    /// It tells how much must be in flight to keep a link busy (bandwidth
    /// times delay): a program that sizes its request window from it keeps
    /// the window small, and its buffers in the CPU's caches, on local links.
    ///
    /// ```no_run
    /// # fn f(socket: &nbd_io::Socket) {
    /// if let Some(rtt) = socket.round_trip_time() {
    ///     println!("round trip {} µs", rtt.as_micros());
    /// }
    /// # }
    /// ```
    pub fn round_trip_time(&self) -> Option<Duration> {
        use rustix::net::AddressFamily;
        if !self.is_socket {
            return None;
        }
        match rustix::net::sockopt::socket_domain(&self.fd).ok()? {
            AddressFamily::UNIX => Some(Duration::ZERO),
            family if family == AddressFamily::from_raw(libc::AF_VSOCK as _) => {
                Some(Duration::ZERO)
            }
            AddressFamily::INET | AddressFamily::INET6 => tcp_round_trip(&self.fd),
            _ => None,
        }
    }

    /// The socket's pending error (`SO_ERROR`), as after a non-blocking connect.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        if !self.is_socket {
            return Ok(None);
        }
        Ok(rustix::net::sockopt::socket_error(&self.fd)?
            .err()
            .map(io::Error::from))
    }
}

/// TCP's smoothed round-trip estimate of a connected TCP socket.
fn tcp_round_trip(fd: &OwnedFd) -> Option<Duration> {
    // SAFETY: `tcp_info` is plain integers, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes to `info`, which is that
    // large and alive for the call; `len` is updated to what it wrote.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Older kernels fill a shorter struct; the RTT is near its start.
    let filled = std::mem::offset_of!(libc::tcp_info, tcpi_rtt) + std::mem::size_of::<u32>();
    (rc == 0 && len as usize >= filled).then(|| Duration::from_micros(info.tcpi_rtt.into()))
}

impl Drop for Socket {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // The server should see end of stream before it is asked to stop.
            let _ = self.shutdown();
            server.stop();
        }
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.fd.as_raw_fd())
            .field("peer", &self.peer)
            .field("server_pid", &self.server_pid())
            .finish()
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(rustix::io::read(&self.fd, buf)?)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.is_socket {
            // sendmsg with MSG_NOSIGNAL: a closed peer is EPIPE, not a signal.
            let n = rustix::net::sendmsg(
                &self.fd,
                bufs,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )?;
            Ok(n)
        } else {
            Ok(rustix::io::writev(&self.fd, bufs)?)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn round_trip_time_is_zero_locally_measured_over_tcp_and_unknown_otherwise() {
        let (a, _b) = UnixStream::pair().unwrap();
        let unix = Socket::from_fd(a.into(), "pair");
        assert_eq!(unix.round_trip_time(), Some(Duration::ZERO));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let tcp = Socket::from_fd(client.into(), "loopback");
        let rtt = tcp.round_trip_time().expect("TCP reports its round trip");
        // The handshake's own sample: loopback answers well within a second.
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");

        let file = std::fs::File::open("/dev/null").unwrap();
        let not_a_socket = Socket::from_fd(file.into(), "/dev/null");
        assert_eq!(not_a_socket.round_trip_time(), None);
    }

    #[test]
    fn reads_and_vectored_writes_go_through() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Socket::from_fd(a.into(), "pair");
        let n = s
            .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
            .unwrap();
        assert_eq!(n, 4);
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcd");
        b.write_all(b"xyz").unwrap();
        let mut back = [0u8; 3];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"xyz");
    }

    #[test]
    fn writing_to_a_closed_peer_is_epipe_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut s = Socket::from_fd(a.into(), "pair");
        let err = s.write(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn nonblocking_reads_would_block() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Socket::from_fd(a.into(), "pair");
        s.set_nonblocking(true).unwrap();
        let err = s.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(s.take_error().unwrap().map(|e| e.kind()), None);
    }
}
