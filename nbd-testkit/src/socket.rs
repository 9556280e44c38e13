//! Running a [`FakeServer`] over real sockets, for adapter tests and for
//! checking it against other clients (libnbd's tools).

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::server::FakeServer;

/// Serves one connection on a blocking `stream` until the conversation ends
/// (the client disconnects, aborts, hangs up or breaks the protocol), and
/// hands the server back for inspection. The last replies are written
/// before it returns; dropping the stream then closes it.
pub fn serve_socket<S: Read + Write>(
    mut stream: S,
    mut server: FakeServer,
) -> io::Result<FakeServer> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let out = server.take_output();
        if !out.is_empty() {
            match stream.write_all(&out).and_then(|()| stream.flush()) {
                Ok(()) => {}
                // The client went away without reading its replies.
                Err(e) if is_hang_up(&e) => {
                    server.handle_eof();
                    return Ok(server);
                }
                Err(e) => return Err(e),
            }
        }
        if server.is_closed() {
            return Ok(server);
        }
        match stream.read(&mut buf) {
            Ok(0) => server.handle_eof(),
            Ok(n) => server.handle_input(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_hang_up(&e) => server.handle_eof(),
            Err(e) => return Err(e),
        }
    }
}

fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

/// Runs `server` on a thread over one end of a fresh `UnixStream::pair()`;
/// returns the other end (blocking, for the client to use) and the thread,
/// which yields the server once the conversation is over.
///
/// ```
/// use std::io::Read;
/// let (mut client_end, thread) = nbd_testkit::spawn_unix(nbd_testkit::FakeServer::new()).unwrap();
/// let mut magic = [0u8; 8];
/// client_end.read_exact(&mut magic).unwrap();
/// assert_eq!(&magic, b"NBDMAGIC");
/// drop(client_end);
/// let server = thread.join().unwrap().unwrap();
/// assert!(!server.closed_cleanly());
/// ```
pub fn spawn_unix(
    server: FakeServer,
) -> io::Result<(UnixStream, JoinHandle<io::Result<FakeServer>>)> {
    let (client_end, server_end) = UnixStream::pair()?;
    let thread = thread::Builder::new()
        .name("fake-nbd-server".into())
        .spawn(move || serve_socket(server_end, server))?;
    Ok((client_end, thread))
}

/// A fake server listening on a Unix socket: every accepted connection is
/// served on its own thread by [`FakeServer::new_connection`] of a template,
/// so all of them share one image. Dropping it stops accepting (connections
/// already served run until their clients leave) and removes the socket.
#[derive(Debug)]
pub struct UnixServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl UnixServer {
    /// Binds `path` (which must not exist yet) and starts accepting.
    pub fn bind(path: impl AsRef<Path>, template: FakeServer) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::Builder::new()
                .name("fake-nbd-listener".into())
                .spawn(move || accept_loop(listener, template, &stop, &accepted))?
        };
        Ok(UnixServer {
            path,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An NBD URI for `export` on this socket (`nbd+unix:///export?socket=...`).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.path.display())
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn accept_loop(
    listener: UnixListener,
    template: FakeServer,
    stop: &AtomicBool,
    accepted: &AtomicUsize,
) {
    let mut next = template;
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        accepted.fetch_add(1, Ordering::SeqCst);
        let following = next.new_connection();
        let server = std::mem::replace(&mut next, following);
        // Detached: the thread ends when its client leaves.
        let _ = thread::Builder::new()
            .name("fake-nbd-conn".into())
            .spawn(move || serve_socket(stream, server));
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept so the loop sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
