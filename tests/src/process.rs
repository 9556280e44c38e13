//! Owning a server process: stopping it (SIGTERM, then SIGKILL) and reaping
//! it so that no zombie is left, for both foreground servers (our direct
//! child) and servers that daemonize (`nbd-server`).

use std::fs;
use std::io;
use std::process::{Child, ExitStatus};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

/// How long a server gets to exit after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Poll interval while waiting for a process to exit.
const POLL: Duration = Duration::from_millis(5);

/// A server process the harness started and must stop.
#[derive(Debug)]
pub(crate) enum ServerProcess {
    /// A server running in the foreground as our direct child.
    Child(Child),
    /// A daemonized server: reparented to this process by
    /// [`become_subreaper`], so `waitpid` works on it.
    Daemon {
        /// The daemon's process id.
        pid: libc::pid_t,
        /// Whether it has been reaped already.
        reaped: bool,
    },
}

impl ServerProcess {
    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        match self {
            ServerProcess::Child(child) => child.id(),
            ServerProcess::Daemon { pid, .. } => pid.unsigned_abs(),
        }
    }

    /// The exit status if the process has exited (and reaps it), else `None`.
    pub(crate) fn try_wait(&mut self) -> Option<ExitStatus> {
        match self {
            ServerProcess::Child(child) => child.try_wait().ok().flatten(),
            ServerProcess::Daemon { pid, reaped } => {
                if *reaped {
                    return Some(exit_status(0));
                }
                match waitpid_nohang(*pid) {
                    Reap::Exited(status) => {
                        *reaped = true;
                        Some(status)
                    }
                    Reap::Running => None,
                    Reap::NotOurChild => {
                        // Not reparented to us (subreaper unavailable): fall
                        // back to watching /proc.
                        if is_gone_or_zombie(*pid) {
                            *reaped = true;
                            Some(exit_status(0))
                        } else {
                            None
                        }
                    }
                }
            }
        }
    }

    /// Whether the process still runs (not exited, not a zombie).
    pub(crate) fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Stops the process: SIGTERM, up to [`STOP_GRACE`] to exit, then SIGKILL;
    /// always reaps it. Idempotent.
    pub(crate) fn stop(&mut self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Kills the process at once with SIGKILL and reaps it. Idempotent.
    pub(crate) fn kill(&mut self) {
        self.stop_with(libc::SIGKILL);
    }

    fn stop_with(&mut self, signal: libc::c_int) {
        if self.try_wait().is_some() {
            return;
        }
        // Children of a daemon (nbd-server forks one per connection) are
        // reparented to us once the daemon exits: note them to reap them.
        let orphans = match self {
            ServerProcess::Daemon { pid, .. } => children_of(*pid),
            ServerProcess::Child(_) => Vec::new(),
        };
        send_signal(self.pid(), signal);
        let deadline = Instant::now() + STOP_GRACE;
        while self.try_wait().is_none() {
            if Instant::now() >= deadline {
                send_signal(self.pid(), libc::SIGKILL);
                let killed_deadline = Instant::now() + STOP_GRACE;
                while self.try_wait().is_none() && Instant::now() < killed_deadline {
                    thread::sleep(POLL);
                }
                break;
            }
            thread::sleep(POLL);
        }
        reap_orphans(&orphans);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes this (test) process a child subreaper, once.
///
/// Daemons such as `nbd-server` fork and let their launcher exit; the daemon
/// is then reparented to the nearest subreaper, or to PID 1, which on some
/// machines (containers, micro-VMs) never reaps it, leaving a zombie. As a
/// subreaper, this process inherits the daemon and `waitpid`s it on stop.
pub(crate) fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers; it only
        // sets a flag on the calling process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            eprintln!(
                "nbd-tests: prctl(PR_SET_CHILD_SUBREAPER) failed: {}; daemonized \
                 servers may be left as zombies",
                io::Error::last_os_error()
            );
        }
    });
}

enum Reap {
    Exited(ExitStatus),
    Running,
    NotOurChild,
}

fn waitpid_nohang(pid: libc::pid_t) -> Reap {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable c_int for the duration of the call.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    match rc {
        0 => Reap::Running,
        rc if rc == pid => Reap::Exited(exit_status(status)),
        _ => Reap::NotOurChild,
    }
}

fn exit_status(raw: libc::c_int) -> ExitStatus {
    std::os::unix::process::ExitStatusExt::from_raw(raw)
}

pub(crate) fn send_signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill() takes no pointers; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The state letter of `/proc/PID/stat`, or `None` if the process is gone.
fn proc_state(pid: libc::pid_t) -> Option<(char, libc::pid_t)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) S PPID ...": COMM may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn own_pid() -> libc::pid_t {
    libc::pid_t::try_from(std::process::id()).unwrap_or(-1)
}

fn is_gone_or_zombie(pid: libc::pid_t) -> bool {
    matches!(proc_state(pid), None | Some(('Z' | 'X', _)))
}

/// Process ids whose parent is `parent`.
fn children_of(parent: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&pid| proc_state(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// Reaps former children of a stopped daemon, which the kernel reparents to
/// this subreaper process; SIGKILLs any that linger.
fn reap_orphans(orphans: &[libc::pid_t]) {
    for &pid in orphans {
        let deadline = Instant::now() + STOP_GRACE;
        let mut killed = false;
        loop {
            match waitpid_nohang(pid) {
                Reap::Exited(_) => break,
                Reap::NotOurChild => {
                    // Reaped by the daemon itself, or someone else's child
                    // (when this process could not become a subreaper).
                    let ours = proc_state(pid).is_some_and(|(_, ppid)| ppid == own_pid());
                    if !ours || Instant::now() >= deadline {
                        break;
                    }
                }
                Reap::Running => {
                    if !killed && Instant::now() >= deadline {
                        send_signal(pid.unsigned_abs(), libc::SIGKILL);
                        killed = true;
                    }
                }
            }
            thread::sleep(POLL);
        }
    }
}
