//! The blocking client over every way `nbd-io` reaches a server: TCP (by
//! target, host name and URI), Unix sockets by path and in the abstract
//! namespace, `nbdkit -s` as a subprocess, nbdkit and qemu-nbd started by
//! socket activation, and sockets the test opened itself
//! (`Client::connect_socket`). Each writes or reads real data and checks it;
//! where the client started a server, the server is gone afterwards.
//!
//! Also: what the URI policy refuses, and TLS URIs refused until TLS lands.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error, Socket, Target, UriPolicy};
use nbd_io::Transports;
use nbd_proto::{CmdFlags, Config, Errno};
use nbd_tests::testkit::{pattern_at, read};
use nbd_tests::{require_tool, NbdkitBuilder, QemuNbdBuilder};

const MIB: u64 = 1 << 20;
/// Long enough for a loaded machine; a hang is what it catches.
const LIMIT: Duration = Duration::from_secs(30);

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid of the server `client` started; panics if it started none.
fn server_pid(client: &Client) -> u32 {
    let pid = client
        .socket()
        .server_pid()
        .expect("the client started a server");
    assert!(process_exists(pid), "server {pid} is not running");
    pid
}

/// Writes, flushes and reads back through `client`, and checks that bytes
/// it did not write still read as zero (the export starts zeroed).
fn write_flush_read_back(client: &mut Client) {
    let data = Bytes::from(
        (0..4096u32)
            .map(|i| (i * 7 % 256) as u8)
            .collect::<Vec<_>>(),
    );
    client
        .pwrite(data.clone(), 8192, CmdFlags::empty())
        .unwrap();
    client.flush(CmdFlags::empty()).unwrap();
    let back = client
        .pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(read(client, 0, 512), vec![0; 512], "untouched bytes");
}

#[test]
fn tcp_by_target_host_name_and_uri() {
    let server = NbdkitBuilder::pattern(MIB).tcp().start();
    let addr = server.tcp_addr().unwrap();
    let by_target = Client::connect(
        &Target::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        Config::default(),
    )
    .unwrap();
    // "localhost" may resolve to ::1 first, where nothing listens: every
    // address is tried in turn.
    let by_name = Client::connect_tcp("localhost", addr.port()).unwrap();
    let by_uri = Client::connect_uri(&server.uri()).unwrap();
    for mut client in [by_target, by_name, by_uri] {
        assert_eq!(client.size().unwrap(), MIB);
        assert_eq!(read(&mut client, 12_344, 600), pattern_at(12_344, 600));
        assert_eq!(client.socket().server_pid(), None);
        client.shutdown().unwrap();
    }
}

#[test]
fn unix_by_path_and_uri() {
    let server = NbdkitBuilder::memory(MIB).start();
    let path = server.socket_path().unwrap();
    let mut client = Client::connect_unix(path).unwrap();
    assert_eq!(client.socket().peer(), path.display().to_string());
    write_flush_read_back(&mut client);
    client.shutdown().unwrap();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    assert_eq!(read(&mut client, 8192, 3), [0, 7, 14]);
    client.shutdown().unwrap();
}

/// A server on an abstract Unix socket: `systemd-socket-activate` binds the
/// name and hands the listening socket to nbdkit, which cannot bind one itself.
struct AbstractServer {
    child: Child,
}

impl Drop for AbstractServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn unix_abstract_name_by_target_and_uri() {
    require_tool("nbdkit");
    let activate = require_tool("systemd-socket-activate");
    let name = format!("nbd-blocking-test-{}", std::process::id());
    let _server = AbstractServer {
        child: Command::new(activate)
            .arg(format!("--listen=@{name}"))
            .args(["nbdkit", "--exit-with-parent", "pattern", "1M"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let target = Target::UnixAbstract(name.as_bytes().to_vec());
    // The name exists once the activator has bound it.
    let deadline = Instant::now() + LIMIT;
    let mut client = loop {
        match Client::connect(&target, Config::default()) {
            Ok(client) => break client,
            Err(Error::Connect { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{target}: {e}"),
        }
    };
    assert_eq!(client.socket().peer(), format!("@{name}"));
    assert_eq!(read(&mut client, 4096, 512), pattern_at(4096, 512));
    client.shutdown().unwrap();
    let mut client = Client::connect_uri(&format!("nbd+unix:///?socket=%00{name}")).unwrap();
    assert_eq!(read(&mut client, 1000, 24), pattern_at(1000, 24));
    client.shutdown().unwrap();
}

#[test]
fn nbdkit_as_a_subprocess_is_stopped_by_shutdown_and_by_drop() {
    require_tool("nbdkit");
    let target = Target::command(["nbdkit", "-s", "memory", "1M"]);
    let mut client = Client::connect(&target, Config::default()).unwrap();
    let pid = server_pid(&client);
    assert_eq!(client.socket().peer(), "[ nbdkit -s memory 1M ]");
    write_flush_read_back(&mut client);
    // Many commands in flight over the socket pair, driven by poll.
    let cookies: Vec<_> = (0..16u64)
        .map(|i| {
            client
                .aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    for cookie in cookies {
        client.wait_for(cookie).unwrap().result.unwrap();
    }
    client.shutdown().unwrap();
    assert!(!process_exists(pid), "server {pid} outlived shutdown");

    let client = Client::connect(&target, Config::default()).unwrap();
    let pid = server_pid(&client);
    drop(client);
    assert!(!process_exists(pid), "server {pid} outlived drop");
}

#[test]
fn nbdkit_by_socket_activation() {
    require_tool("nbdkit");
    let target = Target::activation(["nbdkit", "memory", "1M"]);
    let mut client = Client::connect(&target, Config::default()).unwrap();
    let pid = server_pid(&client);
    assert_eq!(client.size().unwrap(), MIB);
    write_flush_read_back(&mut client);
    client.shutdown().unwrap();
    assert!(!process_exists(pid), "server {pid} outlived shutdown");
}

#[test]
fn qemu_nbd_by_socket_activation_with_a_named_export() {
    require_tool("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let bytes: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    std::fs::write(&image, &bytes).unwrap();
    let image_arg = image.to_str().unwrap();
    let target = Target::activation(["qemu-nbd", "-f", "raw", "-x", "disk", image_arg]);
    let config = Config::default().export_name("disk");
    let mut client = Client::connect(&target, config).unwrap();
    let pid = server_pid(&client);
    assert_eq!(client.size().unwrap(), MIB);
    assert_eq!(read(&mut client, 70_000, 300), bytes[70_000..70_300]);
    client
        .pwrite(Bytes::from_static(b"written"), 0, CmdFlags::FUA)
        .unwrap();
    client.shutdown().unwrap();
    assert!(!process_exists(pid), "server {pid} outlived shutdown");
    assert_eq!(&std::fs::read(&image).unwrap()[..7], b"written");
}

#[test]
fn connect_socket_with_sockets_the_test_opened() {
    // A Unix stream to a listening server.
    let server = NbdkitBuilder::pattern(MIB).start();
    let stream = UnixStream::connect(server.socket_path().unwrap()).unwrap();
    let socket = Socket::from_fd(stream.into(), "the test's stream");
    let mut client = Client::connect_socket(socket, Config::default()).unwrap();
    assert_eq!(client.socket().peer(), "the test's stream");
    assert_eq!(read(&mut client, 65_536, 64), pattern_at(65_536, 64));
    client.shutdown().unwrap();

    // One end of a socket pair whose other end is an `nbdkit -s` the test
    // started itself.
    require_tool("nbdkit");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let theirs_too = theirs.try_clone().unwrap();
    let mut nbdkit = Command::new("nbdkit")
        .args(["-s", "memory", "1M"])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs_too)))
        .spawn()
        .unwrap();
    let socket = Socket::from_fd(ours.into(), "socket pair");
    let mut client = Client::connect_socket(socket, Config::default()).unwrap();
    assert_eq!(
        client.socket().server_pid(),
        None,
        "the test owns this server"
    );
    write_flush_read_back(&mut client);
    client.shutdown().unwrap();
    // nbdkit -s exits when its client disconnects.
    let status = wait_with_limit(&mut nbdkit);
    assert!(status.success(), "nbdkit -s: {status}");
}

fn wait_with_limit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server {} did not exit within {LIMIT:?}", child.id());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tls_uris_set_up_their_tls_before_anything_is_reached() {
    let cases = [
        (
            "nbds+unix:///?socket=/nonexistent&tls-certificates=/nonexistent-dir",
            "/nonexistent-dir",
        ),
        ("nbds+unix:///?socket=/nonexistent&tls-type=anon", "anon"),
    ];
    for (uri, says) in cases {
        let err = Client::connect_uri(uri).map(drop).unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{uri}: {err:?}");
        assert_eq!(err.errno(), Some(Errno::Inval), "{uri}");
        assert!(err.to_string().contains(says), "{err}");
    }
}

#[test]
fn the_uri_policy_decides_before_anything_is_reached() {
    let server = NbdkitBuilder::pattern(MIB).start();
    let uri = server.uri();
    let tcp_only = UriPolicy {
        transports: Transports::TCP,
        ..UriPolicy::default()
    };
    let err = Client::connect_uri_with_policy(&uri, Config::default(), &tcp_only)
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, Error::UriRefused(_)), "{err:?}");
    assert_eq!(err.errno(), Some(Errno::Inval));
    // The default policy refuses URIs naming local files, and unknown parameters.
    for (uri, says) in [
        (format!("{uri}&tls-psk-file=/k"), "tls-psk-file"),
        (format!("{uri}&sokcet=/x"), "sokcet"),
    ] {
        let err = Client::connect_uri(&uri).map(drop).unwrap_err();
        assert!(err.to_string().contains(says), "{uri}: {err}");
    }
    // What the policy allows connects.
    let unix_only = UriPolicy {
        transports: Transports::UNIX,
        ..UriPolicy::default()
    };
    let mut client = Client::connect_uri_with_policy(&uri, Config::default(), &unix_only).unwrap();
    assert_eq!(read(&mut client, 0, 16), pattern_at(0, 16));
    client.shutdown().unwrap();
}

#[test]
fn errors_name_what_could_not_be_reached() {
    let err = Client::connect_unix("/nonexistent/nbd.sock")
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/nbd.sock"), "{err}");
    let err = Client::connect(&Target::command(["/nonexistent/server"]), Config::default())
        .map(drop)
        .unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/server"), "{err}");
    // A server program that starts but exits without speaking NBD fails
    // the handshake instead of leaving the client waiting.
    let err = Client::connect(&Target::command(["true"]), Config::default())
        .map(drop)
        .unwrap_err();
    assert!(!matches!(err, Error::Spawn { .. }), "{err:?}");
}

#[test]
fn qemu_nbd_over_tcp_by_target() {
    let server = QemuNbdBuilder::raw(MIB).tcp().start();
    let addr = server.tcp_addr().unwrap();
    let config = Config::default().export_name(server.export_name().to_string());
    let mut client = Client::connect_tcp_with(&addr.ip().to_string(), addr.port(), config).unwrap();
    write_flush_read_back(&mut client);
    client.shutdown().unwrap();
}
