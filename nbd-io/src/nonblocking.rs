//! [`Connecting`]: reaching a [`Target`] without blocking, for adapters that
//! drive their sockets from an event loop (mio, tokio, a hand-written
//! poll(2) loop).
//!
//! The adapter starts a connect, watches [`Connecting::socket`] for
//! writability (and errors), and calls [`Connecting::advance`] whenever it
//! wakes up for that socket. `advance` says whether the socket is connected,
//! whether the attempt failed and the next address is being tried on a new
//! socket, or whether the connect failed for good, with an error naming the
//! target. Nothing here waits, with two exceptions that are documented on
//! [`Connecting::start`]: name resolution, and targets that start a local
//! server program.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::connect::resolve;
use crate::error::{Error, Result};
use crate::socket::Socket;
use crate::target::Target;

/// A connect under way that never blocks the caller.
///
/// The adapter starts it ([`start`](Self::start) from a [`Target`], or
/// [`tcp`](Self::tcp) over addresses it resolved), watches
/// [`socket`](Self::socket) for writability (and errors), and calls
/// [`advance`](Self::advance) whenever it wakes up for that socket. `advance`
/// says whether the socket is connected, whether the attempt failed and the
/// next address is being tried on a new socket, or, as an error naming the
/// target, that the connect failed for good.
///
/// TCP tries every resolved address in turn: an address that refuses, or is
/// unreachable, moves on to the next without the caller waiting for it.
/// Unix sockets (paths and abstract names) and vsock connect the same way.
///
/// ```no_run
/// use nbd_io::{Connecting, Progress, Target};
/// let target = Target::Tcp { host: "localhost".into(), port: 10809 };
/// let mut connecting = Connecting::start(&target)?;
/// let socket = loop {
///     // An event loop waits here until `connecting.socket()` is writable.
///     match connecting.advance()? {
///         Progress::Waiting => continue,
///         // Stop watching `abandoned`; watch `connecting.socket()` instead.
///         Progress::Retrying { abandoned, .. } => drop(abandoned),
///         Progress::Connected(socket) => break socket,
///     }
/// };
/// # Ok::<(), nbd_io::Error>(())
/// ```
#[derive(Debug)]
pub struct Connecting {
    /// What is being connected to, as errors name it.
    target: String,
    /// The attempt under way, or the last one once the connect failed for
    /// good (so the adapter can still stop watching it); `None` once handed
    /// out by [`Progress::Connected`].
    socket: Option<Socket>,
    state: State,
    /// The TCP address of the attempt under way.
    addr: Option<SocketAddr>,
    /// TCP addresses not tried yet.
    spare: VecDeque<SocketAddr>,
    /// Whether errors name the address tried besides the target (several
    /// addresses, or one that differs from the name given).
    name_addr: bool,
}

/// What [`Connecting::advance`] found.
#[derive(Debug)]
pub enum Progress {
    /// The connect is still under way: wait until the socket is writable.
    Waiting,
    /// That attempt failed and the next address is being tried, on a new
    /// socket: stop watching `abandoned` (then drop it) and watch
    /// [`Connecting::socket`] instead, for writability as before.
    Retrying {
        /// The socket of the attempt that failed.
        abandoned: Socket,
        /// Why it failed (for a log; it is not the caller's error).
        cause: Error,
    },
    /// Connected: the socket, in non-blocking mode. The connector is spent;
    /// a later `advance` is an error.
    Connected(Socket),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InProgress,
    Connected,
    /// Failed for good; the OS error (or kind) to report again.
    Failed(Option<i32>, io::ErrorKind),
    Spent,
}

impl Connecting {
    /// Starts connecting to `target`.
    ///
    /// Two steps may block: resolving a TCP host name (the system resolver
    /// has no non-blocking interface; pass addresses to [`Connecting::tcp`]
    /// to resolve elsewhere), and for [`Target::Command`] and
    /// [`Target::Activation`] starting the server program, which is local;
    /// such a target is connected when this returns.
    ///
    /// An error that is known at once (a Unix socket nobody listens on, a
    /// program that cannot be started, every TCP address failing at once) is
    /// returned here.
    pub fn start(target: &Target) -> Result<Connecting> {
        let name = target.to_string();
        let connect_error = |source: io::Error| Error::Connect {
            target: name.clone(),
            source,
        };
        let local = match target {
            Target::Tcp { host, port } => {
                let addrs = resolve(host, *port)?;
                let name_addr = addrs.len() > 1 || addrs[0].ip().to_string() != *host;
                return Connecting::over(name, addrs, name_addr);
            }
            Target::Unix(path) => LocalAddr::Unix(
                SocketAddrUnix::new(path.as_path()).map_err(|e| connect_error(e.into()))?,
            ),
            Target::UnixAbstract(bytes) => LocalAddr::Unix(
                SocketAddrUnix::new_abstract_name(bytes).map_err(|e| connect_error(e.into()))?,
            ),
            Target::Vsock { cid, port } => LocalAddr::Vsock(*cid, *port),
            Target::Command { .. } | Target::Activation { .. } => {
                let socket = crate::connect(target)?;
                socket.set_nonblocking(true).map_err(connect_error)?;
                return Ok(Connecting {
                    target: name,
                    socket: Some(socket),
                    state: State::Connected,
                    addr: None,
                    spare: VecDeque::new(),
                    name_addr: false,
                });
            }
        };
        let fd = new_socket(local.family()).map_err(|e| {
            if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
                Error::Unsupported(format!(
                    "{target}: this kernel does not support the address family"
                ))
            } else {
                connect_error(e)
            }
        })?;
        let state = begin(&fd, |fd| local.connect(fd)).map_err(connect_error)?;
        Ok(Connecting {
            socket: Some(Socket::from_fd(fd, name.clone())),
            target: name,
            state,
            addr: None,
            spare: VecDeque::new(),
            name_addr: false,
        })
    }

    /// Starts connecting over TCP to each of `addrs` in turn, for a caller
    /// that resolved the name itself. `name` names the server in errors,
    /// which also name the address tried.
    pub fn tcp(
        addrs: impl IntoIterator<Item = SocketAddr>,
        name: impl Into<String>,
    ) -> Result<Connecting> {
        let addrs: Vec<SocketAddr> = addrs.into_iter().collect();
        if addrs.is_empty() {
            return Err(nbd_proto::Error::InvalidArgument(
                "a TCP connect needs at least one address".into(),
            )
            .into());
        }
        Connecting::over(name.into(), addrs, true)
    }

    fn over(target: String, addrs: Vec<SocketAddr>, name_addr: bool) -> Result<Connecting> {
        let mut connecting = Connecting {
            target,
            socket: None,
            state: State::InProgress,
            addr: None,
            spare: addrs.into(),
            name_addr,
        };
        match connecting.next_address() {
            Ok(()) => Ok(connecting),
            Err(e) => Err(connecting.failed(e)),
        }
    }

    /// The socket to watch: the attempt under way. `None` once the connected
    /// socket was handed out.
    pub fn socket(&self) -> Option<&Socket> {
        self.socket.as_ref()
    }

    /// What is being connected to, as errors name it.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Finds out how the connect is going; call it whenever the socket is
    /// ready (writable, or with an error), and at any other time.
    ///
    /// An error means the connect failed for good (every address tried); it
    /// names the target, and the address tried last. The socket of that
    /// last attempt stays in [`socket`](Self::socket), so the caller can stop
    /// watching it, and later calls return the same error.
    pub fn advance(&mut self) -> Result<Progress> {
        match self.state {
            State::Spent => return Err(spent()),
            State::Failed(os, kind) => {
                let source = os.map_or_else(|| kind.into(), io::Error::from_raw_os_error);
                return Err(self.connect_error(source));
            }
            State::Connected => return self.hand_out(),
            State::InProgress => {}
        }
        let Some(socket) = &self.socket else {
            return Err(spent());
        };
        let outcome = match socket.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match rustix::net::getpeername(socket) {
                Ok(_) => Ok(true),
                // Neither failed nor connected: still under way.
                Err(Errno::NOTCONN) => Ok(false),
                Err(e) => Err(e.into()),
            },
        };
        match outcome {
            Ok(true) => self.hand_out(),
            Ok(false) => Ok(Progress::Waiting),
            Err(e) => self.attempt_failed(e),
        }
    }

    fn hand_out(&mut self) -> Result<Progress> {
        self.state = State::Spent;
        self.socket
            .take()
            .map(Progress::Connected)
            .ok_or_else(spent)
    }

    /// The attempt under way failed: on to the next address, if any.
    fn attempt_failed(&mut self, e: io::Error) -> Result<Progress> {
        if self.spare.is_empty() {
            return Err(self.failed(e));
        }
        let cause = self.connect_error(e);
        let Some(abandoned) = self.socket.take() else {
            return Err(spent());
        };
        match self.next_address() {
            Ok(()) => Ok(Progress::Retrying { abandoned, cause }),
            Err(e) => {
                // Every further address failed at once: keep the socket the
                // caller watches, so that it can stop watching it.
                self.socket = Some(abandoned);
                Err(self.failed(e))
            }
        }
    }

    /// Starts the first of the spare addresses that does not fail at once;
    /// the error of the last one if all do.
    fn next_address(&mut self) -> io::Result<()> {
        let mut last = io::Error::from(io::ErrorKind::NotFound);
        while let Some(addr) = self.spare.pop_front() {
            self.addr = Some(addr);
            match begin_tcp(addr) {
                Ok((fd, state)) => {
                    self.socket = Some(Socket::from_fd(fd, self.target.clone()));
                    self.state = state;
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Records a failure for good and returns its error.
    fn failed(&mut self, e: io::Error) -> Error {
        self.state = State::Failed(e.raw_os_error(), e.kind());
        self.connect_error(e)
    }

    fn connect_error(&self, source: io::Error) -> Error {
        let target = match self.addr {
            Some(addr) if self.name_addr => format!("{} ({addr})", self.target),
            _ => self.target.clone(),
        };
        Error::Connect { target, source }
    }
}

/// The address of a target on this machine or its host (no resolution,
/// one attempt).
enum LocalAddr {
    Unix(SocketAddrUnix),
    /// Context ID and port.
    Vsock(u32, u32),
}

impl LocalAddr {
    fn family(&self) -> AddressFamily {
        match self {
            LocalAddr::Unix(_) => AddressFamily::UNIX,
            LocalAddr::Vsock(..) => AddressFamily::VSOCK,
        }
    }

    fn connect(&self, fd: &OwnedFd) -> rustix::io::Result<()> {
        match self {
            LocalAddr::Unix(addr) => rustix::net::connect(fd, addr),
            LocalAddr::Vsock(cid, port) => connect_vsock(fd, *cid, *port),
        }
    }
}

/// The error of a connector whose socket was handed out already.
fn spent() -> Error {
    nbd_proto::Error::InvalidArgument("the connect is over: its socket was handed out".into())
        .into()
}

/// Resolves a host name; this blocks (see [`Connecting::start`]).
fn new_socket(family: AddressFamily) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Starts a non-blocking connect: done at once, or under way.
fn begin(
    fd: &OwnedFd,
    connect: impl FnOnce(&OwnedFd) -> rustix::io::Result<()>,
) -> io::Result<State> {
    match connect(fd) {
        Ok(()) => Ok(State::Connected),
        // An interrupted connect goes on in the background, as one in progress.
        Err(Errno::INPROGRESS | Errno::INTR) => Ok(State::InProgress),
        // For a Unix socket, EAGAIN means the server's backlog is full: an
        // error, as for a blocking connect that gave up.
        Err(e) => Err(e.into()),
    }
}

fn begin_tcp(addr: SocketAddr) -> io::Result<(OwnedFd, State)> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = new_socket(family)?;
    // NBD requests are small and latency-bound: no Nagle.
    rustix::net::sockopt::set_tcp_nodelay(&fd, true)?;
    let state = begin(&fd, |fd| rustix::net::connect(fd, &addr))?;
    Ok((fd, state))
}

/// `connect(2)` to an `AF_VSOCK` address, which rustix has no type for.
fn connect_vsock(fd: &OwnedFd, cid: u32, port: u32) -> rustix::io::Result<()> {
    // SAFETY: sockaddr_vm is plain data, for which all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: the address is a live sockaddr_vm of the length given, and
    // the descriptor is open for the duration of the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::IO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::UnixListener;
    use std::time::{Duration, Instant};

    /// Calls `advance` until it is no longer `Waiting`, waiting on poll(2)
    /// for the socket to become writable in between.
    fn settle(connecting: &mut Connecting) -> Result<Progress> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match connecting.advance()? {
                Progress::Waiting => {
                    assert!(Instant::now() < deadline, "the connect never settled");
                    let socket = connecting.socket().expect("a socket under way");
                    let mut fds = [rustix::event::PollFd::new(
                        socket,
                        rustix::event::PollFlags::OUT,
                    )];
                    let timeout = rustix::event::Timespec {
                        tv_sec: 1,
                        tv_nsec: 0,
                    };
                    rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
                }
                other => return Ok(other),
            }
        }
    }

    /// A loopback address that refuses: a port bound (so no one else takes
    /// it) but not listening.
    fn refusing() -> (OwnedFd, SocketAddr) {
        let fd = new_socket(AddressFamily::INET).unwrap();
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        rustix::net::bind(&fd, &any).unwrap();
        let local = rustix::net::getsockname(&fd).unwrap();
        let addr = SocketAddr::try_from(local).unwrap();
        (fd, addr)
    }

    fn echo_works(mut socket: Socket, peer: &mut impl Read) {
        socket.set_nonblocking(false).unwrap();
        socket.write_all(b"nbd").unwrap();
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"nbd");
    }

    #[test]
    fn tcp_moves_past_a_refusing_address_to_one_that_listens() {
        let (_reserved, refused) = refusing();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let good = listener.local_addr().unwrap();
        let mut connecting = Connecting::tcp([refused, good], "test server").unwrap();
        let mut retried = 0;
        let socket = loop {
            match settle(&mut connecting).unwrap() {
                Progress::Retrying { abandoned, cause } => {
                    retried += 1;
                    assert_ne!(
                        abandoned.as_raw_fd(),
                        connecting.socket().unwrap().as_raw_fd()
                    );
                    let text = cause.to_string();
                    assert!(text.contains(&refused.to_string()), "{text}");
                    assert_eq!(
                        cause.os_error().map(io::Error::kind),
                        Some(io::ErrorKind::ConnectionRefused)
                    );
                }
                Progress::Connected(socket) => break socket,
                Progress::Waiting => unreachable!("settle waits"),
            }
        };
        assert_eq!(retried, 1);
        let (mut peer, _) = listener.accept().unwrap();
        echo_works(socket, &mut peer);
        // Spent: a further advance is an error, not a second socket.
        let err = connecting.advance().unwrap_err();
        assert_eq!(err.errno(), Some(nbd_proto::Errno::Inval), "{err}");
    }

    #[test]
    fn every_address_refusing_fails_for_good_naming_target_and_address() {
        let (_a, first) = refusing();
        let (_b, second) = refusing();
        let mut connecting = Connecting::tcp([first, second], "nowhere").unwrap();
        let err = loop {
            match settle(&mut connecting) {
                Ok(Progress::Retrying { .. }) => {}
                Ok(other) => panic!("connected to a refusing port: {other:?}"),
                Err(e) => break e,
            }
        };
        let text = err.to_string();
        assert!(
            text.contains("nowhere") && text.contains(&second.to_string()),
            "{text}"
        );
        assert!(matches!(&err, Error::Connect { source, .. }
            if source.kind() == io::ErrorKind::ConnectionRefused));
        // The last socket stays for the caller to stop watching, and the
        // error is sticky.
        assert!(connecting.socket().is_some());
        let again = connecting.advance().unwrap_err();
        assert_eq!(again.to_string(), text);
    }

    #[test]
    fn a_tcp_target_by_name() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let mut connecting = Connecting::start(&target).unwrap();
        assert_eq!(connecting.target(), target.to_string());
        let Progress::Connected(socket) = settle(&mut connecting).unwrap() else {
            panic!("no connect");
        };
        assert_eq!(socket.peer(), target.to_string());
        // Nagle is off, as for a blocking connect.
        assert!(rustix::net::sockopt::tcp_nodelay(&socket).unwrap());
        let (mut peer, _) = listener.accept().unwrap();
        echo_works(socket, &mut peer);
    }

    #[test]
    fn unix_paths_and_abstract_names() {
        let dir = std::env::temp_dir().join(format!("nbd-io-nonblocking-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let by_path = UnixListener::bind(&path).unwrap();
        let name = format!("nbd-io-test-{}", std::process::id()).into_bytes();
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let by_name = UnixListener::bind_addr(&addr).unwrap();
        for (target, listener) in [
            (Target::Unix(path.clone()), &by_path),
            (Target::UnixAbstract(name.clone()), &by_name),
        ] {
            let mut connecting = Connecting::start(&target).unwrap();
            let Progress::Connected(socket) = settle(&mut connecting).unwrap() else {
                panic!("{target}: no connect");
            };
            let (mut peer, _) = listener.accept().unwrap();
            echo_works(socket, &mut peer);
        }
        // Nobody listening: refused at once, naming the socket.
        drop(by_path);
        let err = Connecting::start(&Target::Unix(path.clone())).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn vsock_fails_cleanly_where_nothing_listens() {
        // cid 1 is this machine; port 0x7fff_fff0 has no listener (and many
        // kernels have no vsock at all). Either way: an error or a refused
        // connect, never a hang or a panic.
        let target = Target::Vsock {
            cid: 1,
            port: 0x7fff_fff0,
        };
        let result = Connecting::start(&target).and_then(|mut c| settle(&mut c));
        match result {
            Err(Error::Unsupported(msg)) => assert!(msg.contains("vsock"), "{msg}"),
            Err(Error::Connect { target: t, .. }) => assert_eq!(t, target.to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_command_target_is_connected_at_once_and_non_blocking() {
        let target = Target::command(["sh", "-c", "cat; sleep 1"]);
        let mut connecting = Connecting::start(&target).unwrap();
        let Progress::Connected(mut socket) = connecting.advance().unwrap() else {
            panic!("a local server is connected at once");
        };
        assert!(socket.server_pid().is_some());
        let err = socket.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn no_address_is_a_caller_error() {
        let err = Connecting::tcp([], "nothing").unwrap_err();
        assert_eq!(err.errno(), Some(nbd_proto::Errno::Inval), "{err}");
    }
}
