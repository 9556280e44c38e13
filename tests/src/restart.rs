//! A server that a test can kill and start again on the same Unix socket,
//! serving a file so that the data outlives the process: nbdkit's file
//! plugin behind the delay filter, or qemu-nbd. For reconnect tests; each
//! test starts its own (Debian's nbdkit 1.32 aborts when a client leaves
//! with reads in flight).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// nbdkit's file plugin behind the delay filter on a fixed socket, which a
/// test can kill and start again.
pub struct Restartable {
    /// The Unix socket it listens on.
    pub socket: PathBuf,
    /// The file it serves.
    pub file: PathBuf,
    /// nbdkit's delay filter (seconds, taking effect at the next restart),
    /// or `None` for qemu-nbd.
    pub delay: Option<&'static str>,
    child: Option<Child>,
}

impl Restartable {
    /// nbdkit's file plugin serving `file` with the delay filter's
    /// `delay` (seconds) on reads and writes, on a socket in `dir`.
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

    /// The server's NBD URI.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Starts nbdkit (serving `self.file`) and waits until it listens.
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
            .expect("nbdkit starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "nbdkit did not listen");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills nbdkit at once, as a crash would.
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

/// A Unix socket server of fake servers over one image: the first
/// connection negotiates, takes the commands, and sends their replies all
/// but the last byte before hanging up (so a structured read's first
/// chunks arrive and its end never does); every later one serves.
pub fn cut_short_then_serve(path: std::path::PathBuf, template: nbd_testkit::FakeServer) {
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { return };
            let mut server = template.new_connection();
            std::thread::spawn(move || {
                if n > 0 {
                    let _ = nbd_testkit::serve_socket(stream, server);
                    return;
                }
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let out = server.take_output();
                    if stream.write_all(&out).is_err() {
                        return;
                    }
                    let in_transmission = server.in_transmission();
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => server.handle_input(&buf[..k]),
                    }
                    if in_transmission {
                        let out = server.take_output();
                        let _ = stream.write_all(&out[..out.len().saturating_sub(1)]);
                        return;
                    }
                }
            });
        }
    });
}
