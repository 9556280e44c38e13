//! Starting `qemu-nbd` on a raw or qcow2 image made with `qemu-img`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::clients::run_checked;
use crate::endpoint::{Endpoint, Transport};
use crate::handle::{ServerHandle, ServerKind};
use crate::launch::{launch, Launch};
use crate::tools::require_tool;

/// A disk image format qemu understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A plain file, byte for byte the disk.
    Raw,
    /// QEMU copy-on-write v2, with its own metadata and allocation map.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu tools use (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Creates an empty image of `size` bytes at `path` with `qemu-img create`.
pub fn create_image(path: &Path, format: ImageFormat, size: u64) {
    require_tool("qemu-img");
    run_checked(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", format.as_str()])
            .arg(path)
            .arg(size.to_string()),
    );
}

/// Creates an image at `path` holding `bytes` (via a raw file and
/// `qemu-img convert` for qcow2).
pub fn create_image_from_bytes(path: &Path, format: ImageFormat, bytes: &[u8]) {
    match format {
        ImageFormat::Raw => fs::write(path, bytes)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display())),
        ImageFormat::Qcow2 => {
            require_tool("qemu-img");
            let raw = path.with_extension("source.raw");
            fs::write(&raw, bytes)
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", raw.display()));
            run_checked(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(path),
            );
            let _ = fs::remove_file(&raw);
        }
    }
}

/// Builder for a `qemu-nbd` server.
///
/// Runs `qemu-nbd -f FORMAT [-r] [-x NAME] [-t] [--shared=N] [--cache=MODE]
/// -k SOCKET|-b 127.0.0.1 -p PORT IMAGE` in the foreground (never `--fork`,
/// so the handle owns the process). A watchdog stops it if the test process
/// dies without dropping the handle. Persistent (`-t`) by default: without it
/// qemu-nbd exits when its first client disconnects.
///
/// While qemu-nbd runs it holds qemu's image lock, so other qemu tools need
/// `-U` (force-share) to read the image; [`qemu_img_compare`](crate::qemu_img_compare)
/// passes it.
///
/// ```no_run
/// use nbd_tests::QemuNbdBuilder;
/// let server = QemuNbdBuilder::qcow2(1 << 20).export_name("disk").read_only().start();
/// assert_eq!(nbd_tests::nbdinfo_size(&server.uri()), 1 << 20);
/// ```
#[derive(Debug)]
pub struct QemuNbdBuilder {
    dir: TempDir,
    image: PathBuf,
    format: ImageFormat,
    read_only: bool,
    export_name: String,
    persistent: bool,
    shared: Option<u32>,
    cache: Option<String>,
    extra: Vec<OsString>,
    transport: Transport,
}

impl QemuNbdBuilder {
    fn with_dir(format: ImageFormat) -> (TempDir, PathBuf) {
        require_tool("qemu-nbd");
        let dir = tempfile::Builder::new()
            .prefix("qemu-nbd-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temporary directory: {err}"));
        let image = dir.path().join(format!("disk.{format}"));
        (dir, image)
    }

    fn from_parts(dir: TempDir, image: PathBuf, format: ImageFormat) -> Self {
        QemuNbdBuilder {
            dir,
            image,
            format,
            read_only: false,
            export_name: String::new(),
            persistent: true,
            shared: None,
            cache: None,
            extra: Vec::new(),
            transport: Transport::Unix,
        }
    }

    /// A new empty image of `size` bytes in `format`, made with `qemu-img
    /// create` in the server's temporary directory.
    pub fn new(format: ImageFormat, size: u64) -> Self {
        let (dir, image) = Self::with_dir(format);
        create_image(&image, format, size);
        Self::from_parts(dir, image, format)
    }

    /// A new empty raw image of `size` bytes.
    pub fn raw(size: u64) -> Self {
        Self::new(ImageFormat::Raw, size)
    }

    /// A new empty qcow2 image of `size` bytes.
    pub fn qcow2(size: u64) -> Self {
        Self::new(ImageFormat::Qcow2, size)
    }

    /// A new image in `format` holding `bytes`.
    pub fn from_bytes(format: ImageFormat, bytes: &[u8]) -> Self {
        let (dir, image) = Self::with_dir(format);
        create_image_from_bytes(&image, format, bytes);
        Self::from_parts(dir, image, format)
    }

    /// Serves an existing image (not copied: writes go to it).
    pub fn existing(path: impl AsRef<Path>, format: ImageFormat) -> Self {
        let (dir, _) = Self::with_dir(format);
        Self::from_parts(dir, path.as_ref().to_path_buf(), format)
    }

    /// The image file (also [`ServerHandle::backing_file`] once started).
    pub fn image_path(&self) -> &Path {
        &self.image
    }

    /// `-r`: export read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// `-x NAME`: the export name (default: empty). qemu-nbd rejects other
    /// names.
    pub fn export_name(mut self, name: &str) -> Self {
        self.export_name = name.to_owned();
        self
    }

    /// `-t`/`--persistent`: keep serving after the last client disconnects
    /// (default: on).
    pub fn persistent(mut self, on: bool) -> Self {
        self.persistent = on;
        self
    }

    /// `--shared=N`: how many clients may be connected at once (qemu-nbd's
    /// default is 1).
    pub fn shared(mut self, clients: u32) -> Self {
        self.shared = Some(clients);
        self
    }

    /// `--cache=MODE`: `none`, `writeback` (default), `writethrough`,
    /// `directsync` or `unsafe`.
    pub fn cache(mut self, mode: &str) -> Self {
        self.cache = Some(mode.to_owned());
        self
    }

    /// Adds a raw qemu-nbd option, e.g. `"--discard=unmap"` or
    /// `"--allocation-depth"`. See `qemu-nbd --help`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.extra.push(arg.as_ref().to_owned());
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

    /// Starts qemu-nbd; returns once it listens. Panics with its output if it
    /// fails to start within 10 s.
    pub fn start(self) -> ServerHandle {
        let QemuNbdBuilder {
            dir,
            image,
            format,
            read_only,
            export_name,
            persistent,
            shared,
            cache,
            extra,
            transport,
        } = self;
        let image_arg = image.clone();
        let name = export_name.clone();
        let command = move |endpoint: &Endpoint| {
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", format.as_str()]);
            if read_only {
                cmd.arg("-r");
            }
            cmd.arg(format!("--export-name={name}"));
            if persistent {
                cmd.arg("--persistent");
            }
            if let Some(clients) = shared {
                cmd.arg(format!("--shared={clients}"));
            }
            if let Some(mode) = &cache {
                cmd.arg(format!("--cache={mode}"));
            }
            match endpoint {
                Endpoint::Unix(path) => {
                    cmd.arg("-k").arg(path);
                }
                Endpoint::Tcp(addr) => {
                    cmd.arg("-b")
                        .arg(addr.ip().to_string())
                        .arg("-p")
                        .arg(addr.port().to_string());
                }
            }
            cmd.args(&extra).arg(&image_arg);
            cmd
        };
        launch(Launch {
            kind: ServerKind::QemuNbd,
            dir,
            transport,
            exports: vec![export_name.clone()],
            files: vec![(export_name.clone(), image)],
            export_name,
            daemon_pidfile: None,
            watchdog: true,
            failure_note: "",
            command: Box::new(command),
        })
    }
}
