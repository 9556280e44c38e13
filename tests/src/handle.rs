//! The handle to a running server: how to reach it, and stopping it on drop.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::endpoint::Endpoint;
use crate::launch::read_from;
use crate::process::ServerProcess;
use crate::watchdog::Watchdog;

/// Which server program a [`ServerHandle`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `nbdkit` (Debian package `nbdkit`).
    Nbdkit,
    /// `qemu-nbd` (Debian package `qemu-utils`).
    QemuNbd,
    /// `nbd-server`, the reference server (Debian package `nbd-server`).
    NbdServer,
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Nbdkit => "nbdkit",
            ServerKind::QemuNbd => "qemu-nbd",
            ServerKind::NbdServer => "nbd-server",
        })
    }
}

/// A running NBD server, listening on a socket in its own temporary directory
/// or on a loopback TCP port.
///
/// Built by [`NbdkitBuilder`](crate::NbdkitBuilder),
/// [`QemuNbdBuilder`](crate::QemuNbdBuilder) or
/// [`NbdServerBuilder`](crate::NbdServerBuilder). Dropping it stops the server
/// (SIGTERM, then SIGKILL after 5 s), reaps the process, and deletes the
/// temporary directory with the socket, log and any images in it. This also
/// happens when the test panics, as the handle is dropped while unwinding.
#[derive(Debug)]
pub struct ServerHandle {
    pub(crate) kind: ServerKind,
    pub(crate) endpoint: Endpoint,
    pub(crate) export_name: String,
    pub(crate) exports: Vec<String>,
    pub(crate) files: Vec<(String, PathBuf)>,
    pub(crate) log_path: PathBuf,
    pub(crate) command_line: String,
    pub(crate) watchdog: Option<Watchdog>,
    // Dropped (stopped) before `dir`, which holds the socket and images.
    pub(crate) process: ServerProcess,
    pub(crate) dir: TempDir,
}

impl ServerHandle {
    /// Which server program this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The NBD URI of the default export: `nbd+unix:///EXPORT?socket=PATH`
    /// or `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self) -> String {
        self.endpoint.uri(&self.export_name)
    }

    /// The NBD URI selecting another export name on the same server.
    pub fn uri_for(&self, export: &str) -> String {
        self.endpoint.uri(export)
    }

    /// Where the server listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The Unix socket path, when the server listens on one.
    pub fn socket_path(&self) -> Option<&Path> {
        self.endpoint.socket_path()
    }

    /// The loopback TCP address, when the server listens on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.endpoint.tcp_addr()
    }

    /// The export name clients should request (the one [`uri`](Self::uri) uses).
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// All export names the server was configured with (one for nbdkit and
    /// qemu-nbd, one per section for nbd-server).
    pub fn export_names(&self) -> &[String] {
        &self.exports
    }

    /// The file behind the default export, when the harness created it (the
    /// qemu-nbd image, nbd-server's export file, nbdkit's `file` plugin disk).
    pub fn backing_file(&self) -> Option<&Path> {
        self.backing_file_for(&self.export_name)
    }

    /// The file behind export `name`, when the harness created it.
    pub fn backing_file_for(&self, name: &str) -> Option<&Path> {
        self.files
            .iter()
            .find(|(export, _)| export == name)
            .map(|(_, path)| path.as_path())
    }

    /// The server's process id (for nbd-server, the daemon's).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The server's private temporary directory (deleted on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The command line the server was started with (for messages).
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Everything the server wrote to stdout and stderr so far (nbd-server
    /// writes nothing once it has daemonized: its messages go to syslog).
    pub fn output(&self) -> String {
        read_from(&self.log_path, 0)
    }

    /// Whether the server process still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Kills the server at once with SIGKILL (simulating a crash) and reaps
    /// it; the handle stays usable for its paths. Idempotent.
    pub fn kill(&mut self) {
        self.watchdog = None;
        self.process.kill();
    }

    /// Stops the server gracefully (SIGTERM, SIGKILL after 5 s) and reaps it,
    /// keeping the temporary directory until the handle is dropped: to check
    /// an image after the server has flushed and closed it. Idempotent.
    pub fn stop(&mut self) {
        self.watchdog = None;
        self.process.stop();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
