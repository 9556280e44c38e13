//! Starting a server synchronously: pick the endpoint, spawn, wait (bounded)
//! until it listens, retry on a taken TCP port, and panic with the server's
//! output when it does not come up.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::endpoint::{pick_free_port, Endpoint, Transport};
use crate::handle::{ServerHandle, ServerKind};
use crate::process::ServerProcess;
use crate::ready::is_listening;
use crate::watchdog::Watchdog;

/// How long a server gets to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports are tried before giving up on TCP.
const TCP_ATTEMPTS: usize = 5;
/// Poll interval while waiting for a server to listen.
const POLL: Duration = Duration::from_millis(5);

/// Builds the command line for one attempt, given the endpoint to listen on.
pub(crate) type CommandFor<'a> = dyn FnMut(&Endpoint) -> Command + 'a;

/// Everything [`launch`] needs to start one server.
pub(crate) struct Launch<'a> {
    /// Which server program this is (for messages and the handle).
    pub kind: ServerKind,
    /// The server's private temporary directory (socket, log, images, ...).
    pub dir: TempDir,
    /// Unix socket or loopback TCP.
    pub transport: Transport,
    /// The export name the handle's [`ServerHandle::uri`] selects.
    pub export_name: String,
    /// Every export name the server offers (for multi-export servers).
    pub exports: Vec<String>,
    /// Backing files by export name, when the harness created them.
    pub files: Vec<(String, PathBuf)>,
    /// For servers that daemonize: the pid file the daemon writes.
    pub daemon_pidfile: Option<PathBuf>,
    /// Whether to start a [`Watchdog`] that stops the server if the test
    /// process dies without dropping the handle.
    pub watchdog: bool,
    /// Extra text for the failure message.
    pub failure_note: &'static str,
    /// The command line for an endpoint.
    pub command: Box<CommandFor<'a>>,
}

enum Outcome {
    Ready(ServerProcess),
    PortTaken,
    Failed(String),
}

/// Starts the server described by `launch`; returns once it listens.
///
/// Panics (with the server's output) if it exits early or does not listen
/// within [`START_TIMEOUT`].
pub(crate) fn launch(mut launch: Launch<'_>) -> ServerHandle {
    let log_path = launch.dir.path().join("server.log");
    let attempts = match launch.transport {
        Transport::Unix => 1,
        Transport::Tcp => TCP_ATTEMPTS,
    };
    let mut last_failure = String::new();
    for attempt in 1..=attempts {
        let endpoint = match launch.transport {
            Transport::Unix => Endpoint::Unix(launch.dir.path().join("nbd.sock")),
            Transport::Tcp => {
                Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, pick_free_port())))
            }
        };
        let mut command = (launch.command)(&endpoint);
        let command_line = format!("{command:?}");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", log_path.display()));
        let _ = writeln!(log, "--- nbd-tests attempt {attempt}: {command_line}");
        let log_start = log.metadata().map(|meta| meta.len()).unwrap_or(0);
        let out = log
            .try_clone()
            .unwrap_or_else(|err| panic!("cannot clone a log file handle: {err}"));
        command.stdin(Stdio::null()).stdout(out).stderr(log);
        let child = command.spawn().unwrap_or_else(|err| {
            panic!(
                "{} failed to spawn: {err}\ncommand: {command_line}",
                launch.kind
            )
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let outcome = match &launch.daemon_pidfile {
            None => wait_listening(
                ServerProcess::Child(child),
                &endpoint,
                deadline,
                &log_path,
                log_start,
            ),
            Some(pidfile) => wait_daemon(child, pidfile, &endpoint, deadline, &log_path, log_start),
        };
        match outcome {
            Outcome::Ready(process) => {
                let watchdog = launch.watchdog.then(|| Watchdog::spawn(process.pid()));
                return ServerHandle {
                    kind: launch.kind,
                    endpoint,
                    export_name: launch.export_name,
                    exports: launch.exports,
                    files: launch.files,
                    log_path,
                    command_line,
                    watchdog,
                    process,
                    dir: launch.dir,
                };
            }
            Outcome::PortTaken => {
                last_failure = format!("port of {endpoint} was taken (attempt {attempt})");
            }
            Outcome::Failed(reason) => {
                panic!(
                    "{kind} failed to start: {reason}\ncommand: {command_line}\n{note}\
                     --- server output ({log}) ---\n{output}",
                    kind = launch.kind,
                    note = launch.failure_note,
                    log = log_path.display(),
                    output = read_from(&log_path, log_start),
                );
            }
        }
    }
    panic!(
        "{} failed to start: no free TCP port after {attempts} attempts ({last_failure})\n\
         --- server output ---\n{}",
        launch.kind,
        read_from(&log_path, 0)
    );
}

/// Waits for a running process to listen on `endpoint`.
fn wait_listening(
    mut process: ServerProcess,
    endpoint: &Endpoint,
    deadline: Instant,
    log_path: &Path,
    log_start: u64,
) -> Outcome {
    loop {
        if let Some(status) = process.try_wait() {
            let output = read_from(log_path, log_start);
            let daemon = matches!(process, ServerProcess::Daemon { .. });
            // A daemon's errors go to syslog: on TCP, assume the port was
            // taken (the likeliest cause) and retry with another.
            if endpoint.transport() == Transport::Tcp
                && (daemon || output.contains("Address already in use"))
            {
                return Outcome::PortTaken;
            }
            return Outcome::Failed(format!(
                "it exited ({status}) before listening on {endpoint}"
            ));
        }
        if is_listening(process.pid(), endpoint) {
            return Outcome::Ready(process);
        }
        if Instant::now() >= deadline {
            process.kill();
            return Outcome::Failed(format!(
                "it did not listen on {endpoint} within {} s",
                START_TIMEOUT.as_secs()
            ));
        }
        thread::sleep(POLL);
    }
}

/// Waits for a daemonizing launcher to exit, reads the daemon's pid file, and
/// waits for the daemon to listen.
fn wait_daemon(
    launcher: std::process::Child,
    pidfile: &Path,
    endpoint: &Endpoint,
    deadline: Instant,
    log_path: &Path,
    log_start: u64,
) -> Outcome {
    let mut launcher = ServerProcess::Child(launcher);
    let status = loop {
        if let Some(status) = launcher.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            launcher.kill();
            return Outcome::Failed("it did not daemonize within the timeout".into());
        }
        thread::sleep(POLL);
    };
    if !status.success() {
        return Outcome::Failed(format!("it exited ({status}) before daemonizing"));
    }
    let pid = loop {
        if let Some(pid) = read_pidfile(pidfile) {
            break pid;
        }
        if Instant::now() >= deadline {
            return Outcome::Failed(format!(
                "its daemon did not write the pid file {}",
                pidfile.display()
            ));
        }
        thread::sleep(POLL);
    };
    let daemon = ServerProcess::Daemon { pid, reaped: false };
    wait_listening(daemon, endpoint, deadline, log_path, log_start)
}

/// The pid in a complete (newline-terminated) pid file.
fn read_pidfile(path: &Path) -> Option<libc::pid_t> {
    let text = fs::read_to_string(path).ok()?;
    if !text.ends_with('\n') {
        return None;
    }
    text.trim().parse().ok()
}

/// The text of `path` from byte `start` on (lossy UTF-8), or a note why not.
pub(crate) fn read_from(path: &Path, start: u64) -> String {
    let mut text = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(start))?;
        file.read_to_end(&mut text)
    });
    match read {
        Ok(_) => String::from_utf8_lossy(&text).into_owned(),
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}
