//! The one place this crate registers a descriptor with tokio's reactor.
//!
//! `AsyncFd::register_with_interest` is `unsafe`: the descriptor must stay
//! open, and be the same one, for as long as the `AsyncFd` lives. Only types
//! that own their descriptor for their whole life are accepted here, which
//! is exactly that promise.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nbd_io::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A type that owns one descriptor from creation to drop and whose
/// `as_raw_fd` always returns it.
pub(crate) trait OwnsFd: AsRawFd {}

/// `OwnedFd` closes its descriptor only when dropped and never changes it.
impl OwnsFd for OwnedFd {}

/// `nbd_io::Socket` holds an `OwnedFd` it never replaces.
impl OwnsFd for Socket {}

/// Registers `io` for `interest`; the `AsyncFd` owns it from now on.
#[allow(unsafe_code)]
pub(crate) fn register<T: OwnsFd>(io: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T: OwnsFd` owns its descriptor until it is dropped, and the
    // `AsyncFd` owns `T`, so the descriptor stays open and the same until
    // the registration ends with the `AsyncFd`.
    unsafe { AsyncFd::register_with_interest(io, interest) }.map_err(|e| e.into())
}
