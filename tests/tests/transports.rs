//! Every way `nbd-io` reaches a server, against real servers: TCP, Unix
//! sockets by path and in the abstract namespace, a socket the caller already
//! holds, `nbdkit -s` as a subprocess on a socket pair, nbdkit and qemu-nbd
//! started by socket activation, and vsock where the kernel can loop it back.
//!
//! Each test negotiates over the connected socket with the `nbd-proto` core,
//! reads a block and checks its bytes, and disconnects.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd_io::{connect, pump, Error, Socket, Target, UriPolicy};
use nbd_proto::{CmdFlags, Config, Connection, Event};
use nbd_tests::{require_tool, NbdkitBuilder};

/// Long enough for a loaded machine; a hang is what it catches.
const LIMIT: Duration = Duration::from_secs(30);
const PATTERN_SIZE: u64 = 1 << 20;

/// Drives `conn` over the blocking `socket` with the shared byte pump until
/// `done` holds.
fn drive(conn: &mut Connection, socket: &mut Socket, mut done: impl FnMut(&Connection) -> bool) {
    rustix::net::sockopt::set_socket_timeout(
        socket.as_fd(),
        rustix::net::sockopt::Timeout::Recv,
        Some(LIMIT),
    )
    .ok();
    let deadline = Instant::now() + LIMIT;
    while !done(conn) {
        assert!(Instant::now() < deadline, "no progress within {LIMIT:?}");
        if let Some(e) = conn.error() {
            panic!("connection to {} died: {e}", socket.peer());
        }
        let written = pump::write_pending(conn, socket).expect("write to the server");
        // One blocking read at a time: the socket has no more to give until
        // the server answers what was just written.
        let read = pump::read_available(conn, socket, Some(1)).expect("read from the server");
        if !written.moved && !read && conn.direction() == nbd_proto::Direction::None {
            break;
        }
    }
}

/// Negotiates, reads 512 bytes at `offset`, disconnects; returns the bytes
/// and the export size.
fn read_block(mut socket: Socket, export: &str, offset: u64) -> (Vec<u8>, u64) {
    let config = Config::default().export_name(export.to_string());
    let mut conn = Connection::new(config);
    drive(&mut conn, &mut socket, Connection::is_ready);
    let size = conn.size().unwrap();
    let cookie = conn
        .pread(BytesMut::zeroed(512), offset, CmdFlags::empty())
        .unwrap();
    drive(&mut conn, &mut socket, |c| !c.is_in_flight(cookie));
    let mut data = None;
    while let Some(event) = conn.poll_event() {
        if let Event::Completed(done) = event {
            if done.cookie == cookie {
                done.result.unwrap();
                data = done.buffer.map(|b| b.to_vec());
            }
        }
    }
    conn.disconnect().unwrap();
    drive(&mut conn, &mut socket, |c| c.is_closed());
    (data.expect("the read completed"), size)
}

/// The bytes nbdkit's pattern plugin serves at `offset` (8-aligned).
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset / 8..)
        .flat_map(|word| (word * 8).to_be_bytes())
        .take(len)
        .collect()
}

fn assert_pattern_block(socket: Socket) {
    let (data, size) = read_block(socket, "", 4096);
    assert_eq!(size, PATTERN_SIZE);
    assert_eq!(data, pattern(4096, 512));
}

#[test]
fn tcp_and_unix_paths_from_uris() {
    let tcp = NbdkitBuilder::pattern(PATTERN_SIZE).tcp().start();
    let unix = NbdkitBuilder::pattern(PATTERN_SIZE).start();
    for server in [&tcp, &unix] {
        let endpoint = UriPolicy::default().resolve(&server.uri()).unwrap();
        assert_pattern_block(connect(&endpoint.target).unwrap());
    }
}

#[test]
fn tcp_errors_name_the_target() {
    // Port 1 on loopback: nothing listens there.
    let target = Target::Tcp {
        host: "127.0.0.1".into(),
        port: 1,
    };
    let err = connect(&target).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    let target = Target::Tcp {
        host: "no-such-host.invalid".into(),
        port: 10809,
    };
    let err = connect(&target).unwrap_err();
    assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
    let missing = Target::Unix("/nonexistent/nbd.sock".into());
    let err = connect(&missing).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/nbd.sock"), "{err}");
}

#[test]
fn a_socket_the_caller_holds() {
    let server = NbdkitBuilder::pattern(PATTERN_SIZE).start();
    let stream = UnixStream::connect(server.socket_path().unwrap()).unwrap();
    assert_pattern_block(Socket::from_fd(stream.into(), "caller's socket"));
}

/// Starts `argv` with `listener` as its socket-activation socket, the way a
/// service manager would: this is how the test gets a server listening in
/// the abstract namespace, which nbdkit cannot bind by itself.
fn activate_on(listener: &UnixListener, argv: &[&str]) -> std::process::Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"])
        .args(argv)
        .env("LISTEN_FDS", "1")
        .stdin(Stdio::null());
    // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open across
    // the fork.
    unsafe {
        command.pre_exec(move || {
            // When the listener already is fd 3, dup2 does nothing and leaves
            // close-on-exec set: clear it instead, or the server gets no socket.
            let done = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

#[test]
fn unix_abstract_names_from_code_and_uri() {
    use std::os::linux::net::SocketAddrExt;
    require_tool("nbdkit");
    let name = format!("nbd-io-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    let mut server = activate_on(
        &listener,
        &["nbdkit", "--exit-with-parent", "pattern", "1M"],
    );
    drop(listener);
    let target = Target::UnixAbstract(name.as_bytes().to_vec());
    assert_pattern_block(connect(&target).unwrap());
    let uri = format!("nbd+unix:///?socket=%00{name}");
    let endpoint = UriPolicy::default().resolve(&uri).unwrap();
    assert_eq!(endpoint.target, target);
    assert_pattern_block(connect(&endpoint.target).unwrap());
    server.kill().unwrap();
    server.wait().unwrap();
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn nbdkit_as_a_subprocess_on_a_socket_pair() {
    require_tool("nbdkit");
    let target = Target::command(["nbdkit", "-s", "pattern", "1M"]);
    let socket = connect(&target).unwrap();
    let pid = socket.server_pid().expect("the subprocess pid is known");
    assert!(process_exists(pid));
    assert_eq!(socket.peer(), "[ nbdkit -s pattern 1M ]");
    assert_pattern_block(socket);
    // Dropping the socket stopped and reaped the server: no zombie is left.
    assert!(!process_exists(pid), "server {pid} still exists");
}

#[test]
fn nbdkit_by_socket_activation() {
    require_tool("nbdkit");
    let target = Target::activation(["nbdkit", "pattern", "1M"]);
    let socket = connect(&target).unwrap();
    let pid = socket.server_pid().unwrap();
    assert_pattern_block(socket);
    assert!(!process_exists(pid), "server {pid} still exists");
}

#[test]
fn qemu_nbd_by_socket_activation_with_a_named_export() {
    require_tool("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let bytes: Vec<u8> = (0..PATTERN_SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &bytes).unwrap();
    let target = Target::Activation {
        argv: ["qemu-nbd", "-f", "raw", "-x", "disk"]
            .iter()
            .map(Into::into)
            .chain([image.clone().into_os_string()])
            .collect(),
        name: Some("nbd".into()),
    };
    let socket = connect(&target).unwrap();
    let pid = socket.server_pid().unwrap();
    let (data, size) = read_block(socket, "disk", 8192);
    assert_eq!(size, PATTERN_SIZE);
    assert_eq!(data, bytes[8192..8192 + 512]);
    assert!(!process_exists(pid), "server {pid} still exists");
}

#[test]
fn a_server_that_cannot_start_is_a_clear_error() {
    let target = Target::command(["/nonexistent/nbd-server-program"]);
    let err = connect(&target).unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/nbd-server-program"),
        "{err}"
    );
    let empty = Target::Command { argv: Vec::new() };
    assert_eq!(
        connect(&empty).unwrap_err().errno(),
        Some(nbd_proto::Errno::Inval)
    );
}

/// Whether this kernel can connect a vsock socket to itself.
fn vsock_loopback_works() -> bool {
    // A listener on the local CID and a connect to it; the kernel's own
    // connect timeout (2 s by default) bounds the wait.
    let Ok(listener) = vsock::VsockListener::bind(&vsock::VsockAddr::new(libc::VMADDR_CID_ANY, 0))
    else {
        return false;
    };
    let Ok(addr) = listener.local_addr() else {
        return false;
    };
    vsock::VsockStream::connect(&vsock::VsockAddr::new(1, addr.port())).is_ok()
}

#[test]
fn vsock_where_the_kernel_loops_it_back() {
    if !vsock_loopback_works() {
        println!(
            "vsock: this kernel cannot connect a vsock socket to the local CID \
             (no vsock_loopback); only the error path was tested"
        );
        // The error path still names the target and never hangs.
        let err = connect(&Target::Vsock { cid: 1, port: 1 }).unwrap_err();
        assert!(err.to_string().contains("vsock 1:1"), "{err}");
        return;
    }
    require_tool("nbdkit");
    let port = 10000 + (std::process::id() % 20000);
    let mut server = Command::new("nbdkit")
        .args(["--exit-with-parent", "-f", "--vsock", "-p"])
        .arg(port.to_string())
        .args(["pattern", "1M"])
        .spawn()
        .unwrap();
    let target = Target::Vsock { cid: 1, port };
    let deadline = Instant::now() + LIMIT;
    let socket = loop {
        match connect(&target) {
            Ok(socket) => break socket,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("nbdkit --vsock never listened: {e}"),
        }
    };
    assert_pattern_block(socket);
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn a_missing_activation_program_is_a_spawn_error() {
    let target = Target::activation(["/nonexistent/nbd-server-program", "arg"]);
    let err = connect(&target).unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/nbd-server-program"),
        "{err}"
    );
    let on_path = Target::activation(["no-such-nbd-server-program-on-path"]);
    assert!(matches!(
        connect(&on_path).unwrap_err(),
        Error::Spawn { .. }
    ));
}
