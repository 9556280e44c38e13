//! How the blocking client waits: poll(2) on one socket or on several.
//!
//! This is all that is the adapter's own; connecting, the byte pump and the
//! errors are `nbd-io`'s.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use nbd_proto::Direction;
use rustix::event::{PollFd, PollFlags, Timespec};

/// Waits until any of `sockets` is ready in its direction, or `timeout`
/// passes (`None`: no limit). Returns false on timeout.
///
/// An interrupted poll is retried; the remaining time is not recomputed, as
/// the callers bound the overall wait themselves.
pub(crate) fn any_ready(
    sockets: &[(BorrowedFd<'_>, Direction)],
    timeout: Option<Duration>,
) -> io::Result<bool> {
    match sockets {
        [one] => poll(&mut [interest(one)], timeout),
        many => poll(&mut many.iter().map(interest).collect::<Vec<_>>(), timeout),
    }
}

fn interest<'a>(&(fd, dir): &(BorrowedFd<'a>, Direction)) -> PollFd<'a> {
    let mut flags = PollFlags::empty();
    if dir.is_read() {
        flags |= PollFlags::IN;
    }
    if dir.is_write() {
        flags |= PollFlags::OUT;
    }
    PollFd::from_borrowed_fd(fd, flags)
}

fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<bool> {
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    loop {
        match rustix::event::poll(fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn times_out_when_nothing_arrives_and_wakes_when_something_does() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let short = Some(Duration::from_millis(1));
        assert!(!any_ready(&[(a.as_fd(), Direction::Read)], short).unwrap());
        b.write_all(b"x").unwrap();
        assert!(any_ready(&[(a.as_fd(), Direction::Read)], None).unwrap());
        // One ready socket among several is enough.
        let both = [(c.as_fd(), Direction::Read), (a.as_fd(), Direction::Read)];
        assert!(any_ready(&both, None).unwrap());
        // A socket with room to write is ready for writing at once.
        assert!(any_ready(&[(c.as_fd(), Direction::Write)], None).unwrap());
    }
}
