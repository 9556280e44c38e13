//! [`Command`]: the future of one command already on its way to the server.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use nbd_io::{Error, Result};
use nbd_proto::{BlockStatus, Cookie, ReadChunk};

use crate::shared::{Polled, Reply, Shared};

/// A command issued by an `aio_` call, resolving to its result.
///
/// The command is queued when the `aio_` call returns (its [`cookie`]
/// is known at once); awaiting this only waits for the reply. `T` is what
/// the command gives back: the buffer for a read, the chunks too for a
/// structured read, the reports for a block status query, `()` otherwise.
/// [`reply`](Self::reply) turns it into a future of the core's raw
/// [`Reply`], which hands a read's buffer back even when the read failed.
///
/// # Dropping it
///
/// Dropping a `Command` before it resolves abandons only the waiting: NBD
/// has no way to cancel a command, so it still goes to the server, its
/// reply is still read off the socket (into its own buffer) and then
/// dropped, and no other command can ever be given that reply (cookies are
/// never reused while a reply may still arrive). The connection is not
/// disturbed. What the command did on the server is unknown: a dropped
/// write may or may not have happened.
///
/// [`cookie`]: Self::cookie
#[must_use = "a command's result is only known by awaiting it"]
pub struct Command<T> {
    shared: Arc<Shared>,
    cookie: Cookie,
    /// Its reply was taken (or never will be): nothing to abandon on drop.
    finished: bool,
    _output: PhantomData<fn() -> T>,
}

impl<T> Command<T> {
    pub(crate) fn new(shared: Arc<Shared>, cookie: Cookie) -> Self {
        Command {
            shared,
            cookie,
            finished: false,
            _output: PhantomData,
        }
    }

    /// The cookie the core gave the command (its handle on the wire); with
    /// reconnect on, the journal's cookie, the same across connections.
    pub fn cookie(&self) -> Cookie {
        self.cookie
    }

    /// The same command, resolving to the core's raw [`Reply`] instead:
    /// the result as the core gave it, and a read's buffer even on failure.
    pub fn reply(mut self) -> Command<Reply> {
        self.finished = true;
        Command::new(self.shared.clone(), self.cookie)
    }

    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Result<Reply>> {
        if self.finished {
            return Poll::Ready(Err(polled_after_completion()));
        }
        let polled = self.shared.lock().poll_slot(self.cookie, cx.waker());
        match polled {
            Polled::Waiting => Poll::Pending,
            Polled::Done(reply) => {
                self.finished = true;
                Poll::Ready(Ok(reply))
            }
            Polled::Missing => {
                self.finished = true;
                Poll::Ready(Err(polled_after_completion()))
            }
        }
    }
}

fn polled_after_completion() -> Error {
    nbd_proto::Error::InvalidArgument("a command future was polled after it completed".into())
        .into()
}

impl<T> Drop for Command<T> {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.lock().abandon_slot(self.cookie);
        }
    }
}

impl<T> std::fmt::Debug for Command<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("cookie", &self.cookie)
            .field("finished", &self.finished)
            .finish()
    }
}

impl<T: Finish> Future for Command<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // No field is structurally pinned.
        let this = self.get_mut();
        this.poll_reply(cx).map(|reply| reply.and_then(T::finish))
    }
}

/// What a command's future gives back, made from its [`Reply`].
pub trait Finish: Sized + sealed::Sealed {
    /// The command's outcome from its reply.
    fn finish(reply: Reply) -> Result<Self>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for () {}
    impl Sealed for bytes::BytesMut {}
    impl Sealed for (bytes::BytesMut, Vec<nbd_proto::ReadChunk>) {}
    impl Sealed for Vec<nbd_proto::BlockStatus> {}
    impl Sealed for super::Reply {}
}

fn read_buffer(reply: &mut Reply) -> Result<BytesMut> {
    reply.completion.buffer.take().ok_or_else(|| {
        Error::Nbd(nbd_proto::Error::InvalidArgument(
            "a read completed without its buffer".into(),
        ))
    })
}

impl Finish for () {
    fn finish(reply: Reply) -> Result<()> {
        Ok(reply.completion.result?)
    }
}

impl Finish for BytesMut {
    fn finish(mut reply: Reply) -> Result<BytesMut> {
        std::mem::replace(&mut reply.completion.result, Ok(()))?;
        read_buffer(&mut reply)
    }
}

impl Finish for (BytesMut, Vec<ReadChunk>) {
    fn finish(mut reply: Reply) -> Result<Self> {
        std::mem::replace(&mut reply.completion.result, Ok(()))?;
        let buffer = read_buffer(&mut reply)?;
        Ok((buffer, reply.chunks))
    }
}

impl Finish for Vec<BlockStatus> {
    fn finish(reply: Reply) -> Result<Self> {
        reply.completion.result?;
        Ok(reply.statuses)
    }
}

impl Finish for Reply {
    fn finish(reply: Reply) -> Result<Reply> {
        Ok(reply)
    }
}
