//! Where a server listens, how to reach it as an NBD URI, and picking free
//! loopback ports.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// Which kind of socket a server should listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// A Unix domain socket in the server's fresh temporary directory (the
    /// default: no port races, nothing on the network).
    #[default]
    Unix,
    /// TCP on `127.0.0.1`, on a free port the harness picks.
    Tcp,
}

/// The address a running server accepts connections on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP address (always on `127.0.0.1`).
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The NBD URI selecting `export` on this endpoint:
    /// `nbd+unix:///EXPORT?socket=PATH` or `nbd://127.0.0.1:PORT/EXPORT`.
    ///
    /// The export name and socket path are percent-encoded where needed.
    ///
    /// ```
    /// use nbd_tests::Endpoint;
    /// let unix = Endpoint::Unix("/tmp/x/nbd.sock".into());
    /// assert_eq!(unix.uri("disk"), "nbd+unix:///disk?socket=/tmp/x/nbd.sock");
    /// let tcp = Endpoint::Tcp("127.0.0.1:10809".parse().unwrap());
    /// assert_eq!(tcp.uri(""), "nbd://127.0.0.1:10809/");
    /// assert_eq!(tcp.uri("a b"), "nbd://127.0.0.1:10809/a%20b");
    /// ```
    pub fn uri(&self, export: &str) -> String {
        let export = percent_encode(export);
        match self {
            Endpoint::Unix(path) => {
                let socket = percent_encode(&path.to_string_lossy());
                format!("nbd+unix:///{export}?socket={socket}")
            }
            Endpoint::Tcp(addr) => format!("nbd://{addr}/{export}"),
        }
    }

    /// The socket path, for a Unix endpoint.
    pub fn socket_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp(_) => None,
        }
    }

    /// The TCP address, for a TCP endpoint.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp(addr) => Some(*addr),
        }
    }

    /// The transport this endpoint uses.
    pub fn transport(&self) -> Transport {
        match self {
            Endpoint::Unix(_) => Transport::Unix,
            Endpoint::Tcp(_) => Transport::Tcp,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A TCP port on `127.0.0.1` that was free a moment ago.
///
/// Found by binding `127.0.0.1:0` and closing the listener again, so another
/// process may take it before the server binds it: the builders retry with a
/// new port when the server reports `EADDRINUSE`.
pub fn pick_free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|err| panic!("cannot bind 127.0.0.1:0 to find a free port: {err}"));
    listener
        .local_addr()
        .unwrap_or_else(|err| panic!("cannot read the picked port: {err}"))
        .port()
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
