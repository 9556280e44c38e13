//! Reaching a server without blocking the runtime: `nbd_io::Connecting`,
//! woken by tokio when its socket becomes writable.

use std::os::fd::AsFd;

use nbd_io::{Connecting, Error, Progress, Result, Socket, Target};

use crate::reactor;
use tokio::io::Interest;

/// Starts connecting to `target`. A TCP host name is resolved by tokio's
/// resolver (off the runtime's threads); every other target starts as
/// [`Connecting::start`] does, which for a server program means starting it.
pub(crate) async fn start(target: &Target) -> Result<Connecting> {
    match target {
        Target::Tcp { host, port } => {
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|source| Error::Resolve {
                    host: host.clone(),
                    source,
                })?
                .collect();
            if addrs.is_empty() {
                return Err(Error::Resolve {
                    host: host.clone(),
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
            Connecting::tcp(addrs, target.to_string())
        }
        _ => Connecting::start(target),
    }
}

/// Waits until `connecting` is connected (trying every address in turn)
/// and returns the socket.
pub(crate) async fn finish(mut connecting: Connecting) -> Result<Socket> {
    loop {
        let socket = connecting.socket().ok_or_else(|| {
            nbd_proto::Error::InvalidArgument("the connect's socket was handed out".into())
        })?;
        // A duplicate of the attempt's descriptor, watched for writability:
        // the watch owns what it watches, whatever happens to the attempt.
        let watch = reactor::register(socket.as_fd().try_clone_to_owned()?, Interest::WRITABLE)?;
        loop {
            match connecting.advance()? {
                Progress::Waiting => {
                    let mut ready = watch.writable().await?;
                    // Cleared before `advance` looks, so an edge that comes
                    // after it is not lost.
                    ready.clear_ready();
                }
                Progress::Retrying { abandoned, .. } => {
                    drop(watch);
                    drop(abandoned);
                    break;
                }
                Progress::Connected(socket) => {
                    drop(watch);
                    return Ok(socket);
                }
            }
        }
    }
}
