//! Starting `nbdkit` with a plugin, its arguments, filters and server flags.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::endpoint::{Endpoint, Transport};
use crate::handle::{ServerHandle, ServerKind};
use crate::launch::{launch, Launch};
use crate::tools::require_tool;

/// Builder for an `nbdkit` server.
///
/// Runs `nbdkit --exit-with-parent [FLAGS] [--filter=F ...] -U SOCKET|-i
/// 127.0.0.1 -p PORT PLUGIN [ARGS]` in the foreground. `--exit-with-parent`
/// makes nbdkit exit if the test process dies without dropping the handle.
/// Linux ties this to the *thread* that spawned nbdkit: a handle must not
/// outlive the test (thread) that started it, e.g. in a `static`; use
/// [`exit_with_parent(false)`](Self::exit_with_parent) for that, which puts a
/// process-wide watchdog in its place.
///
/// nbdkit serves the same data whatever export name a client asks for
/// (unless the plugin or a filter such as `exportname` tells names apart), so
/// [`export_name`](Self::export_name) only sets the name the handle's URI uses.
///
/// ```no_run
/// use nbd_tests::NbdkitBuilder;
/// let server = NbdkitBuilder::memory("1M").filter("delay").arg("rdelay=10ms").start();
/// assert_eq!(nbd_tests::nbdinfo_size(&server.uri()), 1 << 20);
/// ```
#[derive(Debug)]
pub struct NbdkitBuilder {
    dir: TempDir,
    plugin: OsString,
    plugin_args: Vec<OsString>,
    filters: Vec<String>,
    flags: Vec<OsString>,
    transport: Transport,
    export_name: String,
    exit_with_parent: bool,
    backing_file: Option<PathBuf>,
}

impl NbdkitBuilder {
    /// nbdkit with plugin `plugin` (a name such as `memory`, or a path) and no
    /// arguments yet; creates the server's temporary directory.
    pub fn new(plugin: impl AsRef<OsStr>) -> Self {
        require_tool("nbdkit");
        let dir = tempfile::Builder::new()
            .prefix("nbdkit-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temporary directory: {err}"));
        NbdkitBuilder {
            dir,
            plugin: plugin.as_ref().to_owned(),
            plugin_args: Vec::new(),
            filters: Vec::new(),
            flags: Vec::new(),
            transport: Transport::Unix,
            export_name: String::new(),
            exit_with_parent: true,
            backing_file: None,
        }
    }

    /// `nbdkit memory SIZE`: a writable RAM disk (`size` in bytes or with a
    /// suffix such as `"1M"`).
    pub fn memory(size: impl ToString) -> Self {
        Self::new("memory").param("size", size.to_string())
    }

    /// `nbdkit pattern SIZE`: read-only, each 8-byte word holds its own
    /// big-endian offset.
    pub fn pattern(size: impl ToString) -> Self {
        Self::new("pattern").param("size", size.to_string())
    }

    /// `nbdkit data data=EXPR`: a disk built from the data plugin's
    /// expression language, e.g. `"1 2 3 @0x1000 'hello'"`. Add
    /// `.param("size", ...)` to set the size.
    pub fn data(expr: &str) -> Self {
        Self::new("data").param("data", expr)
    }

    /// `nbdkit data raw=BYTES` is unusable for arbitrary bytes on a command
    /// line, so this writes `bytes` to a file in the temporary directory and
    /// serves it with the `file` plugin (writable; see
    /// [`ServerHandle::backing_file`]).
    pub fn bytes(bytes: &[u8]) -> Self {
        let builder = Self::new("file");
        let path = builder.dir.path().join("disk.img");
        fs::write(&path, bytes)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        builder.with_backing_file(path)
    }

    /// `nbdkit file FILE`: serves an existing file.
    pub fn file(path: impl AsRef<Path>) -> Self {
        Self::new("file").param("file", path.as_ref())
    }

    /// `nbdkit file` on a new sparse file of `size` bytes in the temporary
    /// directory (see [`ServerHandle::backing_file`]).
    pub fn file_of_size(size: u64) -> Self {
        let builder = Self::new("file");
        let path = builder.dir.path().join("disk.img");
        File::create(&path)
            .and_then(|file| file.set_len(size))
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", path.display()));
        builder.with_backing_file(path)
    }

    /// `nbdkit sh SCRIPT`: writes `script` (which should start with a `#!`
    /// line) to an executable file in the temporary directory and uses it as
    /// the sh plugin's script. See `man nbdkit-sh-plugin`.
    pub fn sh(script: &str) -> Self {
        let builder = Self::new("sh");
        let path = builder.dir.path().join("plugin.sh");
        fs::write(&path, script)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        builder.arg(path)
    }

    /// `nbdkit eval`: add shell snippets per method with
    /// [`method`](Self::method), e.g. `.method("get_size", "echo 1M")`.
    /// See `man nbdkit-eval-plugin`.
    pub fn eval() -> Self {
        Self::new("eval")
    }

    /// Sets an eval plugin method to a shell snippet: passes
    /// `NAME=SCRIPT` (no shell quoting is needed: arguments are passed as is).
    pub fn method(self, name: &str, script: &str) -> Self {
        self.param(name, script)
    }

    /// Adds a plugin (or filter) argument, passed after the plugin name.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.plugin_args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds several plugin (or filter) arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.plugin_args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Adds a `KEY=VALUE` plugin (or filter) argument.
    pub fn param(self, key: &str, value: impl AsRef<OsStr>) -> Self {
        let mut arg = OsString::from(key);
        arg.push("=");
        arg.push(value);
        self.arg(arg)
    }

    /// Adds `--filter=NAME`; filters stack in the order added, the first
    /// being closest to the client. Their parameters go in [`arg`](Self::arg).
    pub fn filter(mut self, name: &str) -> Self {
        self.filters.push(name.to_owned());
        self
    }

    /// Adds a raw nbdkit server option (before the plugin name), e.g.
    /// `"--threads=4"`. See `nbdkit --help`.
    pub fn flag(mut self, flag: impl AsRef<OsStr>) -> Self {
        self.flags.push(flag.as_ref().to_owned());
        self
    }

    /// `-r`: the export is read-only.
    pub fn readonly(self) -> Self {
        self.flag("-r")
    }

    /// `--no-sr`: do not advertise structured replies.
    pub fn no_sr(self) -> Self {
        self.flag("--no-sr")
    }

    /// `--mask-handshake=MASK`: clear global handshake flags not in `mask`
    /// (bit 0: fixed newstyle, bit 1: no zeroes). `0` makes nbdkit speak
    /// plain (unfixed) newstyle.
    pub fn mask_handshake(self, mask: u32) -> Self {
        self.flag(format!("--mask-handshake={mask}"))
    }

    /// `--oldstyle`: the oldstyle handshake (no export names, no options).
    pub fn oldstyle(self) -> Self {
        self.flag("--oldstyle")
    }

    /// `--threads=N`.
    pub fn threads(self, threads: u32) -> Self {
        self.flag(format!("--threads={threads}"))
    }

    /// `-v`: verbose debug messages, in [`ServerHandle::output`].
    pub fn verbose(self) -> Self {
        self.flag("-v")
    }

    /// The export name the handle's URI uses (default: empty).
    pub fn export_name(mut self, name: &str) -> Self {
        self.export_name = name.to_owned();
        self
    }

    /// Whether to pass `--exit-with-parent` (default: yes). Without it, a
    /// watchdog process stops nbdkit when the test process dies.
    pub fn exit_with_parent(mut self, on: bool) -> Self {
        self.exit_with_parent = on;
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

    /// The server's temporary directory, to put files in before starting.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn with_backing_file(mut self, path: PathBuf) -> Self {
        self = self.param("file", &path);
        self.backing_file = Some(path);
        self
    }

    /// Starts nbdkit; returns once it listens. Panics with nbdkit's output if
    /// it fails to start within 10 s.
    pub fn start(self) -> ServerHandle {
        let NbdkitBuilder {
            dir,
            plugin,
            plugin_args,
            filters,
            flags,
            transport,
            export_name,
            exit_with_parent,
            backing_file,
        } = self;
        let command = move |endpoint: &Endpoint| {
            let mut cmd = Command::new("nbdkit");
            if exit_with_parent {
                cmd.arg("--exit-with-parent");
            } else {
                cmd.arg("--foreground");
            }
            match endpoint {
                Endpoint::Unix(path) => {
                    cmd.arg("-U").arg(path);
                }
                Endpoint::Tcp(addr) => {
                    cmd.arg("-i")
                        .arg(addr.ip().to_string())
                        .arg("-p")
                        .arg(addr.port().to_string());
                }
            }
            cmd.args(&flags);
            cmd.args(filters.iter().map(|filter| format!("--filter={filter}")));
            cmd.arg(&plugin).args(&plugin_args);
            cmd
        };
        let files = backing_file
            .map(|path| vec![(export_name.clone(), path)])
            .unwrap_or_default();
        launch(Launch {
            kind: ServerKind::Nbdkit,
            dir,
            transport,
            exports: vec![export_name.clone()],
            export_name,
            files,
            daemon_pidfile: None,
            watchdog: !exit_with_parent,
            failure_note: "",
            command: Box::new(command),
        })
    }
}
