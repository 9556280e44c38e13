//! Stopping a server when the test process dies without dropping its handle
//! (killed by a timeout, `abort`, SIGKILL...).
//!
//! The watchdog is a tiny `sh` that blocks reading a pipe whose only write
//! end this process holds (close-on-exec, so no other child inherits it).
//! When this process dies, for any reason, the kernel closes the write end,
//! `read` hits end-of-file, and the watchdog sends SIGTERM to the server.
//! Unlike `PR_SET_PDEATHSIG` (and nbdkit's `--exit-with-parent`, built on
//! it), this follows the whole process, not the thread that spawned the
//! server.

use std::process::{Child, Command, Stdio};

use crate::process::send_signal;

/// A running watchdog for one server; dropping it disarms it (kills the
/// watchdog without touching the server) and reaps it.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Option<Child>,
}

impl Watchdog {
    /// Starts a watchdog that sends SIGTERM to `pid` once this process dies.
    ///
    /// If `sh` cannot be started the server simply runs unwatched (it is
    /// still stopped when its handle drops).
    pub(crate) fn spawn(pid: u32) -> Watchdog {
        let child = Command::new("/bin/sh")
            .args([
                "-c",
                "read _unused; kill -TERM \"$1\" 2>/dev/null",
                "nbd-tests-watchdog",
            ])
            .arg(pid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| eprintln!("nbd-tests: cannot start a watchdog for {pid}: {err}"))
            .ok();
        Watchdog { child }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL first: closing the pipe would make it fire.
            send_signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}
