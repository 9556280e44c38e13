//! [`connect_within`]: a blocking connect that gives up at a deadline.

use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::error::{Error, Result};
use crate::nonblocking::{Connecting, Progress};
use crate::socket::Socket;
use crate::target::Target;

/// Connects to `target` like [`connect`](crate::connect), but gives up with
/// [`Error::TimedOut`] once `deadline` passes (`None`: no limit, the same as
/// `connect`). The socket comes back in blocking mode.
///
/// The wait is poll(2) on the socket being connected, so a server that never
/// answers the SYN costs no CPU. Two steps are not bounded, as
/// [`Connecting::start`] explains: resolving a host name, and starting a
/// local server program.
///
/// ```no_run
/// use std::time::{Duration, Instant};
/// use nbd_io::{connect_within, Target};
/// let target = Target::Tcp { host: "192.0.2.1".into(), port: 10809 };
/// let deadline = Instant::now() + Duration::from_secs(5);
/// let socket = connect_within(&target, Some(deadline))?;
/// # Ok::<(), nbd_io::Error>(())
/// ```
pub fn connect_within(target: &Target, deadline: Option<Instant>) -> Result<Socket> {
    let Some(deadline) = deadline else {
        return crate::connect(target);
    };
    let mut connecting = Connecting::start(target)?;
    loop {
        match connecting.advance()? {
            Progress::Connected(socket) => {
                socket.set_nonblocking(false)?;
                return Ok(socket);
            }
            // The next address has a socket of its own: watch that one.
            Progress::Retrying { .. } | Progress::Waiting => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::TimedOut);
        }
        let Some(socket) = connecting.socket() else {
            return Err(Error::TimedOut);
        };
        wait_writable(socket, left)?;
    }
}

/// Waits until `socket` is writable (or failed), or `left` passes.
fn wait_writable(socket: &Socket, left: std::time::Duration) -> io::Result<()> {
    let ts = Timespec {
        tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: left.subsec_nanos().into(),
    };
    let mut fds = [PollFd::from_borrowed_fd(socket.as_fd(), PollFlags::OUT)];
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_listening_unix_socket_connects_before_the_deadline() {
        let dir = std::env::temp_dir().join(format!("nbd-io-within-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let _listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let target = Target::Unix(dir.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        connect_within(&target, Some(deadline)).unwrap();
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn a_passed_deadline_is_a_timeout_not_a_wait() {
        // A TCP connect to a port nobody listens on is refused at once on
        // loopback; only a deadline already passed can end it first, so
        // either way the call returns at once and never succeeds.
        let target = Target::Tcp {
            host: "127.0.0.1".into(),
            port: 9,
        };
        let err = connect_within(&target, Some(Instant::now())).unwrap_err();
        assert!(
            matches!(err, Error::TimedOut | Error::Connect { .. }),
            "{err:?}"
        );
    }
}
