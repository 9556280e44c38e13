//! The socket under a client: TCP or Unix, non-blocking, waited on with poll(2).

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

/// A connected stream socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP, with Nagle's algorithm off.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
}

impl Stream {
    /// Connects to every address `addr` resolves to in turn, until one answers.
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect(a) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Self::ready(Stream::Tcp(s));
                }
                Err(e) => {
                    last = Some(io::Error::new(
                        e.kind(),
                        format!("cannot connect to {a}: {e}"),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
        }))
    }

    /// Connects to a Unix socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", path.display()),
            )
        })?;
        Self::ready(Stream::Unix(stream))
    }

    fn ready(self) -> io::Result<Self> {
        match &self {
            Stream::Tcp(s) => s.set_nonblocking(true)?,
            Stream::Unix(s) => s.set_nonblocking(true)?,
        }
        Ok(self)
    }

    /// Waits until the socket is readable (`read`) or writable (`write`), or the
    /// timeout passes; returns false on timeout.
    pub fn wait(&self, read: bool, write: bool, timeout: Option<Duration>) -> io::Result<bool> {
        let mut flags = PollFlags::empty();
        if read {
            flags |= PollFlags::IN;
        }
        if write {
            flags |= PollFlags::OUT;
        }
        let mut fds = [PollFd::from_borrowed_fd(self.as_fd(), flags)];
        poll_fds(&mut fds, timeout)
    }

    /// Waits until any of `streams` is ready in its direction, or the timeout
    /// passes; returns false on timeout.
    pub fn wait_many(
        streams: &[(&Stream, nbd_proto::Direction)],
        timeout: Option<Duration>,
    ) -> io::Result<bool> {
        let mut fds: Vec<PollFd<'_>> = streams
            .iter()
            .map(|(s, dir)| {
                let mut flags = PollFlags::empty();
                if dir.is_read() {
                    flags |= PollFlags::IN;
                }
                if dir.is_write() {
                    flags |= PollFlags::OUT;
                }
                PollFd::from_borrowed_fd(s.as_fd(), flags)
            })
            .collect();
        poll_fds(&mut fds, timeout)
    }

    /// Shuts down both directions.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn poll_fds(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<bool> {
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    loop {
        match rustix::event::poll(fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
