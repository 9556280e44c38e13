//! Server programs the client starts itself: over a socket pair on their
//! standard input and output, or by socket activation.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use crate::error::{Error, Result};
use crate::socket::Socket;
use crate::target::Target;

/// How long a server may take to exit after `SIGTERM` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The first descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FD: i32 = 3;

/// A server process started for one connection: stopped (`SIGTERM`, then
/// `SIGKILL` if it lingers) and reaped when the connection ends, with the
/// private directory of its activation socket removed.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    child: Child,
    /// The directory holding the activation socket, removed on stop.
    socket_dir: Option<PathBuf>,
}

impl ServerProcess {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server and waits for it, for at most [`STOP_GRACE`] before
    /// killing it outright.
    pub(crate) fn stop(mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
                let _ = kill_process(pid, Signal::TERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if let Some(dir) = self.socket_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn program_name(argv: &[OsString]) -> String {
    argv.first()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn spawn_error(argv: &[OsString], source: std::io::Error) -> Error {
    Error::Spawn {
        program: program_name(argv),
        source,
    }
}

fn check_argv(argv: &[OsString]) -> Result<()> {
    if argv.is_empty() {
        return Err(nbd_proto::Error::InvalidArgument(
            "a server command needs at least the program name".into(),
        )
        .into());
    }
    Ok(())
}

/// Starts `argv` with one end of a socket pair as its standard input and
/// output; returns the other end.
pub(crate) fn connect_command(target: &Target, argv: &[OsString]) -> Result<Socket> {
    check_argv(argv)?;
    let (ours, theirs) = UnixStream::pair().map_err(|e| spawn_error(argv, e))?;
    let theirs: OwnedFd = theirs.into();
    let theirs_out = theirs.try_clone().map_err(|e| spawn_error(argv, e))?;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::from(theirs_out))
        .spawn()
        .map_err(|e| spawn_error(argv, e))?;
    let server = ServerProcess {
        child,
        socket_dir: None,
    };
    Ok(Socket::from_fd(ours.into(), target.to_string()).with_server(server))
}

/// Starts `argv` by socket activation on a fresh listening socket in a
/// private directory, and connects to it.
pub(crate) fn connect_activation(
    target: &Target,
    argv: &[OsString],
    name: Option<&str>,
) -> Result<Socket> {
    check_argv(argv)?;
    // The shell that sets LISTEN_PID would report a missing program only as
    // its own message and a reset connection: look first.
    if !is_runnable(&argv[0]) {
        return Err(spawn_error(
            argv,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such program"),
        ));
    }
    let dir = private_dir().map_err(|e| spawn_error(argv, e))?;
    let path = dir.join("nbd.sock");
    let started = (|| {
        let listener = UnixListener::bind(&path)?;
        let child = spawn_activated(argv, name, &listener)?;
        // The listener's backlog holds the connection until the server accepts it.
        let stream = UnixStream::connect(&path);
        Ok::<_, std::io::Error>((child, stream))
    })();
    let (child, stream) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(spawn_error(argv, e));
        }
    };
    let server = ServerProcess {
        child,
        socket_dir: Some(dir),
    };
    match stream {
        Ok(stream) => Ok(Socket::from_fd(stream.into(), target.to_string()).with_server(server)),
        Err(source) => {
            server.stop();
            Err(Error::Connect {
                target: target.to_string(),
                source,
            })
        }
    }
}

/// Runs `argv` with `listener` as descriptor 3 and the socket activation
/// variables set.
///
/// `LISTEN_PID` must be the server's own pid, known only after the fork.
/// Setting it there would mean allocating between fork and exec, which is not
/// safe in a threaded program; a shell sets it instead (`$$` is the pid that
/// `exec` hands on to the server).
fn spawn_activated(
    argv: &[OsString],
    name: Option<&str>,
    listener: &UnixListener,
) -> std::io::Result<Child> {
    let listen_fd = listener.as_raw_fd();
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
        .arg("nbd-activation")
        .args(argv)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", name.unwrap_or("unknown"))
        .stdin(Stdio::null());
    // SAFETY: the closure only calls dup2 and fcntl, which are
    // async-signal-safe, on descriptors that stay open across the fork.
    unsafe {
        command.pre_exec(move || {
            if listen_fd == LISTEN_FD {
                // dup2 onto itself would keep close-on-exec set.
                let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
                if flags < 0 || libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(listen_fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Whether `program` names an executable file: as a path if it has a `/`,
/// else somewhere on `PATH`, as the shell's `exec` would look for it.
fn is_runnable(program: &OsString) -> bool {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    let runnable = |path: &Path| {
        path.metadata()
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if program.as_encoded_bytes().contains(&b'/') {
        return runnable(Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))))
}

/// A new directory only this user can enter, for an activation socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("nbd-activation-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}
