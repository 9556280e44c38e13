//! Starting `nbd-server` (the reference server) from a generated config file
//! with several named exports.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Command;

use tempfile::TempDir;

use crate::endpoint::{Endpoint, Transport};
use crate::handle::{ServerHandle, ServerKind};
use crate::launch::{launch, Launch};
use crate::process::become_subreaper;
use crate::tools::require_tool;

/// One export (config section) of an [`NbdServerBuilder`].
#[derive(Debug, Clone)]
pub struct NbdServerExport {
    name: String,
    contents: Contents,
    readonly: bool,
    options: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
enum Contents {
    Size(u64),
    Bytes(Vec<u8>),
}

impl NbdServerExport {
    /// An export named `name` (the section name, which clients request)
    /// backed by a new sparse file of `size` bytes.
    pub fn new(name: &str, size: u64) -> Self {
        NbdServerExport {
            name: name.to_owned(),
            contents: Contents::Size(size),
            readonly: false,
            options: Vec::new(),
        }
    }

    /// An export backed by a new file holding `bytes`.
    pub fn with_bytes(name: &str, bytes: &[u8]) -> Self {
        NbdServerExport {
            contents: Contents::Bytes(bytes.to_vec()),
            ..Self::new(name, 0)
        }
    }

    /// `readonly = true`.
    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    /// Adds an option line `KEY = VALUE` to the section, e.g.
    /// `("flush", "true")`, `("fua", "true")`, `("trim", "true")`,
    /// `("rotational", "true")`, `("maxconnections", "1")`. See
    /// `man 5 nbd-server`. Values are written unquoted.
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// Builder for an `nbd-server` with one or more named exports.
///
/// Writes an INI config (`[generic]` then one section per export, the section
/// name being the export name) and backing files into a fresh temporary
/// directory, and runs `nbd-server -C CONFIG -p PIDFILE`, listening on a Unix
/// socket (`unixsock`) or on `127.0.0.1` (`listenaddr`, `port`).
/// `allowlist = true` is set so clients can list the exports.
///
/// nbd-server's `-d` ("do not fork") mode serves a single connection and then
/// stops listening, so the harness lets it daemonize, reads its pid file, and
/// makes the test process a child subreaper (`PR_SET_CHILD_SUBREAPER`) so the
/// daemon is reparented to it and can be reaped on drop; a watchdog stops it
/// if the test process dies without dropping the handle. Once daemonized,
/// nbd-server's messages go to syslog, not to [`ServerHandle::output`].
///
/// ```no_run
/// use nbd_tests::{NbdServerBuilder, NbdServerExport};
/// let server = NbdServerBuilder::new()
///     .export("alpha", 1 << 20)
///     .export_with(NbdServerExport::new("beta", 2 << 20).readonly())
///     .tcp()
///     .start();
/// assert_eq!(nbd_tests::nbdinfo_size(&server.uri_for("beta")), 2 << 20);
/// ```
#[derive(Debug)]
pub struct NbdServerBuilder {
    dir: TempDir,
    exports: Vec<NbdServerExport>,
    generic: Vec<(String, String)>,
    transport: Transport,
}

impl Default for NbdServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl NbdServerBuilder {
    /// An nbd-server with no exports yet; creates its temporary directory.
    pub fn new() -> Self {
        require_tool("nbd-server");
        let dir = tempfile::Builder::new()
            .prefix("nbd-server-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temporary directory: {err}"));
        NbdServerBuilder {
            dir,
            exports: Vec::new(),
            generic: Vec::new(),
            transport: Transport::Unix,
        }
    }

    /// Adds a writable export `name` on a new sparse file of `size` bytes.
    pub fn export(self, name: &str, size: u64) -> Self {
        self.export_with(NbdServerExport::new(name, size))
    }

    /// Adds an export configured with [`NbdServerExport`]'s options.
    pub fn export_with(mut self, export: NbdServerExport) -> Self {
        let valid = |text: &str| !text.contains(['[', ']', '\n', '\r', '=']);
        assert!(
            !export.name.is_empty() && valid(&export.name),
            "nbd-server export names must be non-empty section names: {:?}",
            export.name
        );
        assert!(
            !self.exports.iter().any(|other| other.name == export.name),
            "duplicate nbd-server export {:?}",
            export.name
        );
        self.exports.push(export);
        self
    }

    /// Adds an option line to the `[generic]` section, e.g.
    /// `("max_threads", "2")`. The harness sets `allowlist`, `listenaddr`,
    /// `port` and `unixsock` itself.
    pub fn generic_option(mut self, key: &str, value: &str) -> Self {
        self.generic.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Listen on a Unix socket or loopback TCP (default: Unix).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Listen on a free port of `127.0.0.1`.
    pub fn tcp(self) -> Self {
        self.transport(Transport::Tcp)
    }

    /// Starts nbd-server; returns once it listens. Panics if it fails to
    /// start within 10 s. The first export is the handle's default export.
    pub fn start(self) -> ServerHandle {
        assert!(
            !self.exports.is_empty(),
            "nbd-server needs at least one export"
        );
        become_subreaper();
        let NbdServerBuilder {
            dir,
            exports,
            generic,
            transport,
        } = self;
        let mut files = Vec::new();
        let mut sections = String::new();
        for (index, export) in exports.iter().enumerate() {
            let path = dir.path().join(format!("export{index}.img"));
            match &export.contents {
                Contents::Size(size) => File::create(&path).and_then(|file| file.set_len(*size)),
                Contents::Bytes(bytes) => fs::write(&path, bytes),
            }
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", path.display()));
            let _ = writeln!(sections, "[{}]", export.name);
            let _ = writeln!(sections, "exportname = {}", path.display());
            let _ = writeln!(sections, "readonly = {}", export.readonly);
            for (key, value) in &export.options {
                let _ = writeln!(sections, "{key} = {value}");
            }
            files.push((export.name.clone(), path));
        }
        let config_path: PathBuf = dir.path().join("nbd-server.conf");
        let pidfile = dir.path().join("nbd-server.pid");
        let (config, pid) = (config_path.clone(), pidfile.clone());
        let command = move |endpoint: &Endpoint| {
            let mut text = String::from("[generic]\nallowlist = true\n");
            match endpoint {
                Endpoint::Unix(path) => {
                    let _ = writeln!(text, "unixsock = {}", path.display());
                }
                Endpoint::Tcp(addr) => {
                    let _ = writeln!(text, "listenaddr = {}", addr.ip());
                    let _ = writeln!(text, "port = {}", addr.port());
                }
            }
            for (key, value) in &generic {
                let _ = writeln!(text, "{key} = {value}");
            }
            text.push_str(&sections);
            fs::write(&config, text)
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", config.display()));
            let _ = fs::remove_file(&pid);
            let mut cmd = Command::new("nbd-server");
            cmd.arg("-C").arg(&config).arg("-p").arg(&pid);
            cmd
        };
        let names: Vec<String> = exports.iter().map(|export| export.name.clone()).collect();
        launch(Launch {
            kind: ServerKind::NbdServer,
            dir,
            transport,
            export_name: names[0].clone(),
            exports: names,
            files,
            daemon_pidfile: Some(pidfile),
            watchdog: true,
            failure_note: "(nbd-server daemonizes: its later errors go to syslog, not below)\n",
            command: Box::new(command),
        })
    }
}
