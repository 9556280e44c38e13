//! The driver task: the only code that touches the socket. It moves bytes
//! between the socket and the core with `nbd_io::pump`, hands replies to
//! the commands' slots, passes the time in for the core's timeouts, and
//! ends (closing the socket) once the connection is over.

use std::future::{poll_fn, Future};
use std::io::{self, Read};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use nbd_io::{pump, Result, Socket};
use nbd_proto::{Config, Connection};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Sleep;

use crate::shared::{Shared, State};
use crate::{reactor, reconnect};

/// Most reads in one pass before the writes and the other tasks get a turn.
const READS_PER_PASS: usize = 16;

/// What the driver waits for after a pass.
struct Wait {
    read: bool,
    write: bool,
    deadline: Option<Instant>,
}

/// Runs the connection over `socket` until it is over; with reconnect on,
/// a lost connection is replaced (see `reconnect::recover`) and the run
/// goes on over the new socket.
pub(crate) async fn run(shared: Arc<Shared>, socket: Socket) {
    // However this task ends (the connection is over, or the runtime drops
    // it), the end is recorded and every command still waiting fails once.
    let _end = EndGuard(shared.clone());
    let mut socket = socket;
    loop {
        if let Some(fd) = drive(&shared, socket, |_| false).await {
            // Over: the server sees end of stream even if a copy of the
            // descriptor lives on elsewhere; dropping `fd` deregisters and
            // closes the socket (and stops a server the target started).
            let _ = fd.get_ref().shutdown();
        }
        match reconnect::recover(&shared).await {
            Some(fresh) => socket = fresh,
            None => return,
        }
    }
}

/// Connects `socket` to a fresh connection with `config` and negotiates
/// until it is in transmission, driven as the main connection is; returns
/// it with its socket, or why it failed.
pub(crate) async fn handshake(socket: Socket, conn: Connection) -> Result<(Connection, Socket)> {
    socket.set_nonblocking(true)?;
    let shared = Arc::new(Shared::new(conn));
    let fd = drive(&shared, socket, |state| state.conn.is_ready()).await;
    let mut state = shared.lock();
    if !state.conn.is_ready() {
        let e = state.conn.error().cloned().unwrap_or_else(|| {
            nbd_proto::Error::NotConnected("the server closed during the handshake".into())
        });
        return Err(e.into());
    }
    let Some(fd) = fd else {
        return Err(nbd_proto::Error::NotConnected("the socket was lost".into()).into());
    };
    let conn = std::mem::replace(&mut state.conn, Connection::new(Config::default()));
    Ok((conn, fd.into_inner()))
}

/// Drives the connection of `shared` over `socket` until it is over or
/// `stop` holds; returns the socket, still registered, unless registering
/// it failed (the connection then is dead).
async fn drive(
    shared: &Arc<Shared>,
    socket: Socket,
    stop: impl Fn(&State) -> bool,
) -> Option<AsyncFd<Socket>> {
    let fd = match reactor::register(socket, Interest::READABLE | Interest::WRITABLE) {
        Ok(fd) => fd,
        Err(e) => {
            let mut state = shared.lock();
            let _ = pump::socket_failed(&mut state.conn, e);
            return None;
        }
    };
    let mut driver = Driver {
        shared,
        fd,
        write_blocked: false,
        wake: Vec::new(),
    };
    let mut notified = pin!(shared.wake_driver.notified());
    // Made only when the core first asks for a deadline, so a runtime
    // without a timer works as long as no timeout is configured.
    let mut sleep: Option<Pin<Box<Sleep>>> = None;
    while let Some(wait) = driver.pass(&stop) {
        match (wait.deadline, sleep.as_mut()) {
            (Some(at), Some(s)) => s.as_mut().reset(at.into()),
            (Some(at), None) => sleep = Some(Box::pin(tokio::time::sleep_until(at.into()))),
            (None, _) => {}
        }
        poll_fn(|cx| {
            let mut woke = false;
            if wait.read {
                if let Poll::Ready(ready) = driver.fd.poll_read_ready_mut(cx) {
                    woke = true;
                    match ready {
                        Ok(mut guard) => {
                            let mut watch = Watch {
                                socket: guard.get_inner_mut(),
                                drained: false,
                            };
                            let result = {
                                let mut state = driver.shared.lock();
                                pump::read_available(
                                    &mut state.conn,
                                    &mut watch,
                                    Some(READS_PER_PASS),
                                )
                            };
                            // Drained (or failed): wait for the next edge.
                            if watch.drained || result.is_err() {
                                guard.clear_ready();
                            }
                        }
                        Err(e) => driver.failed(e),
                    }
                }
            }
            if wait.write {
                if let Poll::Ready(ready) = driver.fd.poll_write_ready_mut(cx) {
                    woke = true;
                    match ready {
                        Ok(mut guard) => {
                            let written = {
                                let mut state = driver.shared.lock();
                                pump::write_pending(&mut state.conn, guard.get_inner_mut())
                            };
                            match written {
                                Ok(w) if w.blocked => guard.clear_ready(),
                                _ => driver.write_blocked = false,
                            }
                        }
                        Err(e) => driver.failed(e),
                    }
                }
            }
            if notified.as_mut().poll(cx).is_ready() {
                notified.set(driver.shared.wake_driver.notified());
                woke = true;
            }
            if wait.deadline.is_some() {
                if let Some(s) = sleep.as_mut() {
                    woke |= s.as_mut().poll(cx).is_ready();
                }
            }
            if woke {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
    Some(driver.fd)
}

struct Driver<'a> {
    shared: &'a Arc<Shared>,
    fd: AsyncFd<Socket>,
    /// The last write would have blocked: wait until the socket is writable.
    write_blocked: bool,
    /// Wakers of commands completed in this pass, woken outside the lock.
    wake: Vec<Waker>,
}

impl Driver<'_> {
    /// One pass over the connection: the time, the writes that can go out
    /// now, the events. Returns what to wait for, or `None` once the
    /// connection is over or `stop` holds.
    fn pass(&mut self, stop: &impl Fn(&State) -> bool) -> Option<Wait> {
        let (changed, over, wait) = {
            let mut state = self.shared.lock();
            // Every pass, as the core asks: it starts the deadlines armed
            // since the last one and carries out those that passed.
            state.conn.handle_timeout(Instant::now());
            if !self.write_blocked {
                if let Ok(written) = pump::write_pending(&mut state.conn, self.fd.get_mut()) {
                    self.write_blocked = written.blocked;
                }
            }
            let changed = state.dispatch(&mut self.wake);
            // Commands the journal held back until the writes before them
            // completed: out now, written by the next pass.
            // So is a disconnect that waited for them.
            if state.send_held(&mut self.wake) > 0 || state.finish_closing() {
                self.shared.wake_driver.notify_one();
            }
            let wait = Wait {
                read: state.conn.direction().is_read(),
                write: self.write_blocked && state.conn.wants_write(),
                deadline: state.conn.poll_timeout(),
            };
            (changed, state.is_over() || stop(&state), wait)
        };
        for waker in self.wake.drain(..) {
            waker.wake();
        }
        if changed {
            self.shared.changed.notify_waiters();
        }
        (!over).then_some(wait)
    }

    /// The readiness of the socket itself failed: the connection ends, and
    /// every command pending fails once.
    fn failed(&mut self, e: io::Error) {
        let mut state = self.shared.lock();
        let _ = pump::socket_failed(&mut state.conn, e);
    }
}

/// A read side that notes whether the socket was drained: a read that
/// would block. A short read is not taken as drained: more bytes may
/// already have come, and reading on while they do lets the tasks woken by
/// the replies issue their next commands together, written in one
/// `sendmsg` (one per reply before; a 256 KiB read then cost a `sendmsg`
/// and an `epoll_wait` of its own).
struct Watch<'a> {
    socket: &'a mut Socket,
    drained: bool,
}

impl Read for Watch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.socket.read(buf);
        self.drained = matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        result
    }
}

/// Records the driver's end, however it ends: a connection the core still
/// thinks alive (the task was dropped with the runtime) ends here, so its
/// commands complete with errors instead of waiting for ever.
struct EndGuard(Arc<Shared>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let mut wake = Vec::new();
        {
            let mut state = self.0.lock();
            if !state.is_over() {
                let _ = pump::socket_failed(
                    &mut state.conn,
                    io::Error::new(io::ErrorKind::BrokenPipe, "the driver task ended"),
                );
            }
            state.dispatch(&mut wake);
            state.driver_done = true;
        }
        for waker in wake {
            waker.wake();
        }
        self.0.changed.notify_waiters();
    }
}
