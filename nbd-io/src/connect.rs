//! Reaching a [`Target`]: a blocking connect that names the target in every error.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};

use crate::error::{Error, Result};
use crate::server;
use crate::socket::Socket;
use crate::target::Target;

/// Connects to `target` and returns the connected socket, in blocking mode.
///
/// TCP tries every address the host resolves to, in order, and turns Nagle's
/// algorithm off (NBD requests are small and latency-bound). A
/// [`Target::Command`] or [`Target::Activation`] starts the server first.
///
/// ```no_run
/// use nbd_io::{connect, Target};
/// let socket = connect(&Target::command(["nbdkit", "-s", "memory", "1M"]))?;
/// println!("server pid {:?}", socket.server_pid());
/// # Ok::<(), nbd_io::Error>(())
/// ```
pub fn connect(target: &Target) -> Result<Socket> {
    let connect_error = |source: io::Error| Error::Connect {
        target: target.to_string(),
        source,
    };
    match target {
        Target::Tcp { host, port } => connect_tcp(target, host, *port),
        Target::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(connect_error)?;
            Ok(Socket::from_fd(stream.into(), target.to_string()))
        }
        Target::UnixAbstract(name) => {
            let addr = UnixAddr::from_abstract_name(name).map_err(connect_error)?;
            let stream = UnixStream::connect_addr(&addr).map_err(connect_error)?;
            Ok(Socket::from_fd(stream.into(), target.to_string()))
        }
        Target::Vsock { cid, port } => {
            let addr = vsock::VsockAddr::new(*cid, *port);
            let stream = vsock::VsockStream::connect(&addr).map_err(|e| {
                if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
                    Error::Unsupported(format!(
                        "{target}: this kernel has no vsock support (AF_VSOCK)"
                    ))
                } else {
                    connect_error(e)
                }
            })?;
            Ok(Socket::from_fd(stream.into(), target.to_string()))
        }
        Target::Command { argv } => server::connect_command(target, argv),
        Target::Activation { argv, name } => {
            server::connect_activation(target, argv, name.as_deref())
        }
    }
}

fn connect_tcp(target: &Target, host: &str, port: u16) -> Result<Socket> {
    let addrs = resolve(host, port)?;
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|source| Error::Connect {
                    target: target.to_string(),
                    source,
                })?;
                return Ok(Socket::from_fd(stream.into(), target.to_string()));
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.expect("at least one address was tried");
    let target = if addrs.len() > 1 || addr.ip().to_string() != host {
        format!("{target} ({addr})")
    } else {
        target.to_string()
    };
    Err(Error::Connect { target, source })
}

/// Every address `host` resolves to (this blocks on the resolver); no
/// address at all is an error naming the host.
pub(crate) fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let resolve_error = |source| Error::Resolve {
        host: host.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(resolve_error)?
        .collect();
    if addrs.is_empty() {
        return Err(resolve_error(io::Error::new(
            io::ErrorKind::NotFound,
            "no address",
        )));
    }
    Ok(addrs)
}
