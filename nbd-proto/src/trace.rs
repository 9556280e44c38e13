//! Debug tracing of the protocol: every option sent and reply received,
//! every command and reply with its cookie, offset, length and flags, and
//! every change of phase.
//!
//! Lines go to the [`log`] facade at `Debug` level with the target
//! `nbd_proto`, so they cost nothing until the program installs a logger and
//! enables that level: each call site is then one relaxed atomic load and a
//! compare, and no argument is formatted. `log` was chosen over `tracing`
//! because a sans-IO state machine has no spans worth entering (a command's
//! life is its cookie, printed on every line), `log` has no dependencies of
//! its own, and any `tracing` subscriber can take `log` records too
//! (`tracing-log`), while the reverse needs the heavier crate everywhere.
//!
//! The functions here are the only place the core formats a trace line, so
//! the wording stays consistent and the call sites stay one line each.

use log::debug;

use crate::transmit::chunk_type_name;
use crate::wire::consts::{command_name, option_name, reply_type_name};
use crate::wire::{ChunkHeader, OptionReplyHeader, RequestHeader, SimpleReply};

const TARGET: &str = "nbd_proto";

/// The phase of the connection changed.
#[inline]
pub(crate) fn phase(to: &str) {
    debug!(target: TARGET, "state: {to}");
}

/// The server's greeting arrived.
#[inline]
pub(crate) fn greeting(style: &str) {
    debug!(target: TARGET, "recv greeting: {style}");
}

/// The server's handshake flags, and the client flags sent in answer.
#[inline]
pub(crate) fn handshake_flags(server: u16, client: u32) {
    debug!(target: TARGET, "recv handshake flags {server:#06x}, send client flags {client:#010x}");
}

/// An option request was queued.
#[inline]
pub(crate) fn option_sent(option: u32, data_len: usize) {
    debug!(
        target: TARGET,
        "send option {} ({option}), {data_len} bytes of data",
        option_name(option)
    );
}

/// An option reply header arrived.
#[inline]
pub(crate) fn option_reply(header: &OptionReplyHeader) {
    debug!(
        target: TARGET,
        "recv option reply {} ({:#x}) to {}, {} bytes of data",
        reply_type_name(header.reply_type),
        header.reply_type,
        option_name(header.option),
        header.length
    );
}

/// The answer to `NBD_OPT_EXPORT_NAME` (or the oldstyle greeting's export) arrived.
#[inline]
pub(crate) fn export(size: u64, flags: u16) {
    debug!(target: TARGET, "recv export: size {size}, transmission flags {flags:#06x}");
}

/// A command request was queued.
#[inline]
pub(crate) fn request(header: &RequestHeader) {
    debug!(
        target: TARGET,
        "send command {} cookie {:#x} offset {} length {} flags {:#06x}",
        command_name(header.command),
        header.cookie,
        header.offset,
        header.length,
        header.flags
    );
}

/// A simple reply arrived.
#[inline]
pub(crate) fn simple_reply(reply: &SimpleReply) {
    debug!(
        target: TARGET,
        "recv simple reply cookie {:#x} error {}",
        reply.cookie,
        reply.error
    );
}

/// A structured or extended reply chunk header arrived.
#[inline]
pub(crate) fn chunk(header: &ChunkHeader) {
    debug!(
        target: TARGET,
        "recv reply chunk {} cookie {:#x} offset {} length {} flags {:#06x}",
        chunk_type_name(header.chunk_type),
        header.cookie,
        header.offset,
        header.length,
        header.flags
    );
}

/// The connection died.
#[inline]
pub(crate) fn dead(error: &crate::Error) {
    debug!(target: TARGET, "state: dead: {error}");
}
