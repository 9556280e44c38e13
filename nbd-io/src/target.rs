//! [`Target`]: where an NBD server is, and how to reach it.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// Where an NBD server is: an address to connect to, or a program to start.
///
/// Build one in code, or from a URI with
/// [`UriPolicy::resolve`](crate::UriPolicy::resolve). A target is a plain
/// value that can be reached again (for a reconnect); a socket the caller
/// already holds is not a target but a [`Socket`](crate::Socket) of its own
/// ([`Socket::from_fd`](crate::Socket::from_fd)).
///
/// ```
/// use nbd_io::Target;
/// let tcp = Target::Tcp { host: "example.com".into(), port: 10809 };
/// assert_eq!(tcp.to_string(), "example.com:10809");
/// let cmd = Target::command(["nbdkit", "-s", "memory", "1G"]);
/// assert_eq!(cmd.to_string(), "[ nbdkit -s memory 1G ]");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Target {
    /// TCP: every address the host resolves to is tried in turn.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket bound to a path.
    Unix(PathBuf),
    /// A Unix domain socket in Linux's abstract namespace: the name without
    /// its leading NUL byte.
    UnixAbstract(Vec<u8>),
    /// `AF_VSOCK`: a virtual machine socket.
    Vsock {
        /// Context ID (2 is the host, 1 the local machine).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A server program speaking NBD on its standard input and output, as
    /// `nbdkit -s` or `qemu-nbd` over a pipe (libnbd's `connect_command`).
    /// The program is stopped and reaped when the connection ends.
    Command {
        /// The program and its arguments.
        argv: Vec<OsString>,
    },
    /// A server program started by systemd-style socket activation (libnbd's
    /// `connect_systemd_socket_activation`): the client makes a listening
    /// Unix socket, passes it as file descriptor 3 with `LISTEN_PID`,
    /// `LISTEN_FDS` and `LISTEN_FDNAMES` set, and connects to it. The program
    /// is stopped and reaped when the connection ends.
    Activation {
        /// The program and its arguments.
        argv: Vec<OsString>,
        /// The name passed in `LISTEN_FDNAMES`; `None` passes `unknown`, the
        /// name systemd gives a socket without one.
        name: Option<String>,
    },
}

impl Target {
    /// A [`Target::Command`] from a program and its arguments.
    pub fn command<I, S>(argv: I) -> Target
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Target::Command {
            argv: argv.into_iter().map(Into::into).collect(),
        }
    }

    /// A [`Target::Activation`] from a program and its arguments, with the
    /// default socket name.
    pub fn activation<I, S>(argv: I) -> Target
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Target::Activation {
            argv: argv.into_iter().map(Into::into).collect(),
            name: None,
        }
    }

    /// Whether the target starts a server program of its own.
    pub fn starts_server(&self) -> bool {
        matches!(self, Target::Command { .. } | Target::Activation { .. })
    }
}

impl fmt::Display for Target {
    /// The target as error messages name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "{}", path.display()),
            Target::UnixAbstract(name) => {
                write!(f, "@{}", String::from_utf8_lossy(name).escape_debug())
            }
            Target::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Target::Command { argv } | Target::Activation { argv, .. } => {
                f.write_str("[")?;
                for arg in argv {
                    write!(f, " {}", arg.to_string_lossy().escape_debug())?;
                }
                f.write_str(" ]")
            }
        }
    }
}
