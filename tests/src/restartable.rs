//! A server that a test can kill and start again on the same Unix socket,
//! serving a file so that the data outlives the process: nbdkit's file
//! plugin (behind its delay filter) or qemu-nbd on a raw image. For
//! reconnect tests.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A server on a fixed socket in a test's directory, which the test can
/// kill and start again.
pub struct Restartable {
    socket: PathBuf,
    file: PathBuf,
    /// nbdkit's delay filter, or `None` for qemu-nbd.
    delay: Option<&'static str>,
    child: Option<Child>,
}

impl Restartable {
    /// nbdkit's file plugin serving `file` on `dir/nbd.sock`, every read and
    /// write held for `delay` (nbdkit's delay filter syntax: `1`, `100ms`).
    pub fn start(dir: &Path, file: PathBuf, delay: &'static str) -> Self {
        Self::start_as(dir, file, Some(delay))
    }

    /// nbdkit (with `delay`) or, without, qemu-nbd serving `file` persistently.
    pub fn start_as(dir: &Path, file: PathBuf, delay: Option<&'static str>) -> Self {
        let mut server = Restartable {
            socket: dir.join("nbd.sock"),
            file,
            delay,
            child: None,
        };
        server.restart();
        server
    }

    /// Changes what the next `restart` starts: nbdkit with this delay, or
    /// qemu-nbd for `None`.
    pub fn set_delay(&mut self, delay: Option<&'static str>) {
        self.delay = delay;
    }

    /// The URI of the socket, the same across restarts.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Starts the server (serving `self.file`) and waits until it listens.
    pub fn restart(&mut self) {
        let _ = fs::remove_file(&self.socket);
        let mut command = match self.delay {
            Some(delay) => {
                let mut nbdkit = Command::new("nbdkit");
                nbdkit
                    .arg("--foreground")
                    .arg("--exit-with-parent")
                    .arg("-U")
                    .arg(&self.socket)
                    .arg("--filter=delay")
                    .arg("file")
                    .arg(format!("file={}", self.file.display()))
                    .arg(format!("delay-read={delay}"))
                    .arg(format!("delay-write={delay}"));
                nbdkit
            }
            None => {
                let mut qemu = Command::new("qemu-nbd");
                qemu.arg("--persistent")
                    .arg("--format=raw")
                    .arg("--socket")
                    .arg(&self.socket)
                    .arg(&self.file);
                qemu
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "the server did not listen");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server at once, as a crash would (restart it with `restart`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.kill();
    }
}
