//! The `aio_` vocabulary of the other adapters over `nbd_tokio`'s futures,
//! for the tests that drive every adapter the same way (the behavioural
//! suite, the stress runner): each `aio_` call keeps the command's future,
//! and `step` runs a single-threaded tokio runtime of its own, where the
//! client's driver task lives, until something happens.
//!
//! Those tests read the protocol state as a `&Connection` between steps.
//! nbd-tokio keeps it behind a lock shared with its driver task, so this
//! client holds that lock between steps, when nothing else runs (the
//! runtime only runs inside `step`), and lets go of it for every call into
//! the client. Holding it for the client's whole life needs a `'static`
//! client: each one is leaked, a few hundred bytes per connection, in test
//! processes only; its socket still closes when the runtime is dropped.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use ::tokio::runtime::{Builder, Runtime};
use bytes::{Bytes, BytesMut};
use nbd_proto::{BlockStatus, CmdFlags, Completion, Config, Connection, Cookie};
use nbd_tokio::{Client, Command, ConnectionGuard, Reply};

/// An `nbd_tokio::Client` behind the other adapters' `aio_` calls.
pub struct AioClient {
    /// The lock on the protocol state while nothing runs. Declared first:
    /// dropped before the runtime, whose driver task takes the lock as it
    /// ends.
    view: Option<ConnectionGuard<'static>>,
    client: &'static Client,
    /// Commands issued whose replies the test has not taken.
    pending: Vec<(Cookie, Command<Reply>)>,
    done: VecDeque<Completion>,
    statuses: HashMap<Cookie, Vec<BlockStatus>>,
    runtime: Runtime,
}

/// Makes an `AioClient` method that queues one command.
macro_rules! aio {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        pub fn $name(&mut self, $($arg: $ty),*) -> nbd_io::Result<Cookie> {
            self.unlocked(|client| client.$name($($arg),*).map(|command| {
                let cookie = command.cookie();
                (cookie, command.reply())
            }))
            .map(|(cookie, command)| {
                self.pending.push((cookie, command));
                cookie
            })
        }
    };
}

impl AioClient {
    /// Connects to `uri` and negotiates, on a runtime of its own.
    pub fn connect(uri: &str, config: Config) -> nbd_io::Result<Self> {
        let runtime = Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let client = runtime.block_on(Client::connect_uri_with(uri, config))?;
        let client: &'static Client = Box::leak(Box::new(client));
        Ok(AioClient {
            view: Some(client.connection()),
            client,
            pending: Vec::new(),
            done: VecDeque::new(),
            statuses: HashMap::new(),
            runtime,
        })
    }

    /// Runs `call` on the client with the lock let go of.
    fn unlocked<T>(&mut self, call: impl FnOnce(&'static Client) -> T) -> T {
        self.view = None;
        let result = call(self.client);
        self.view = Some(self.client.connection());
        result
    }

    /// The protocol state as of the last call.
    pub fn connection(&self) -> &Connection {
        self.view.as_ref().expect("held between calls")
    }

    /// The protocol state, for settings such as strict mode.
    pub fn connection_mut(&mut self) -> &mut Connection {
        self.view.as_mut().expect("held between calls")
    }

    aio!(
        /// `Client::aio_pread`.
        aio_pread(buf: BytesMut, offset: u64, flags: CmdFlags)
    );
    aio!(
        /// `Client::aio_pwrite`.
        aio_pwrite(data: Bytes, offset: u64, flags: CmdFlags)
    );
    aio!(
        /// `Client::aio_flush`.
        aio_flush(flags: CmdFlags)
    );
    aio!(
        /// `Client::aio_trim`.
        aio_trim(count: u64, offset: u64, flags: CmdFlags)
    );
    aio!(
        /// `Client::aio_zero`.
        aio_zero(count: u64, offset: u64, flags: CmdFlags)
    );
    aio!(
        /// `Client::aio_cache`.
        aio_cache(count: u64, offset: u64, flags: CmdFlags)
    );
    aio!(
        /// `Client::aio_block_status`.
        aio_block_status(count: u64, offset: u64, flags: CmdFlags)
    );

    /// `Client::aio_disconnect`.
    pub fn aio_disconnect(&mut self) -> nbd_io::Result<()> {
        self.unlocked(|client| client.aio_disconnect())
    }

    /// Commands issued whose completion has not been taken off their future.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The oldest completion not yet taken.
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    /// The completion of `cookie`, if it has come.
    pub fn take_completion(&mut self, cookie: Cookie) -> Option<Completion> {
        let at = self.done.iter().position(|c| c.cookie == cookie)?;
        self.done.remove(at)
    }

    /// The block status reports of `cookie`, once it completed.
    pub fn take_block_status(&mut self, cookie: Cookie) -> Vec<BlockStatus> {
        self.statuses.remove(&cookie).unwrap_or_default()
    }

    /// Runs the runtime until a command completes, the connection ends,
    /// the requests queued when it was called have all been written, or
    /// `timeout` passes. The error is the connection's, once it is dead.
    pub fn step(&mut self, timeout: Duration) -> nbd_io::Result<()> {
        self.view = None;
        let client = self.client;
        let (pending, done, statuses) = (&mut self.pending, &mut self.done, &mut self.statuses);
        let had_output = client.connection().wants_write();
        self.runtime.block_on(async {
            // The driver's turn first: it writes what was queued.
            ::tokio::task::yield_now().await;
            let mut closed = pin!(client.closed());
            let event = poll_fn(|cx| {
                let before = pending.len();
                pending.retain_mut(|(_, command)| match Pin::new(command).poll(cx) {
                    Poll::Ready(reply) => {
                        let reply = reply.expect("a command's reply is taken once");
                        if !reply.statuses.is_empty() {
                            statuses.insert(reply.completion.cookie, reply.statuses);
                        }
                        done.push_back(reply.completion);
                        false
                    }
                    Poll::Pending => true,
                });
                let written = had_output && !client.connection().wants_write();
                if pending.len() < before || written || closed.as_mut().poll(cx).is_ready() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            let _ = ::tokio::time::timeout(timeout, event).await;
        });
        self.view = Some(client.connection());
        match self.connection().error() {
            Some(e) => Err(e.clone().into()),
            None => Ok(()),
        }
    }

    /// Disconnects gracefully: `Client::shutdown`, on the runtime.
    pub fn shutdown(mut self) -> nbd_io::Result<()> {
        self.view = None;
        let client = self.client;
        self.runtime.block_on(client.shutdown())
    }
}
