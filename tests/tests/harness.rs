//! Checks of the harness itself: each kind of server starts, serves what it
//! should according to libnbd's `nbdinfo`/`nbdcopy`, and is gone (process,
//! socket, directory) once its handle is dropped.

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nbd_tests::{
    file_bytes, json_value, nbdcopy, nbdinfo, nbdinfo_can, nbdinfo_is, nbdinfo_json,
    nbdinfo_list_json, nbdinfo_size, qemu_img_compare, read_export, require_tool, ImageFormat,
    NbdServerBuilder, NbdServerExport, NbdkitBuilder, QemuNbdBuilder, ServerHandle, ServerKind,
    Transport,
};

const MIB: u64 = 1 << 20;

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Drops `server` and checks that its process and directory are gone.
fn drop_and_check_gone(server: ServerHandle) {
    let pid = server.pid();
    let dir = server.dir().to_path_buf();
    let socket = server.socket_path().map(Path::to_path_buf);
    assert!(proc_exists(pid), "server {pid} should run before the drop");
    drop(server);
    assert!(!proc_exists(pid), "/proc/{pid} still exists after the drop");
    assert!(
        !dir.exists(),
        "{} still exists after the drop",
        dir.display()
    );
    if let Some(socket) = socket {
        assert!(!socket.exists(), "{} still exists", socket.display());
    }
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            rest.split_whitespace().nth(1) == Some(&parent.to_string())
        })
        .collect()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The bytes of nbdkit's pattern plugin: each 8-byte word is its offset, BE.
fn pattern_bytes(len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|word| (word * 8).to_be_bytes())
        .collect()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn nbdkit_memory_on_unix_socket() {
    let server = NbdkitBuilder::memory("1M").start();
    assert_eq!(server.kind(), ServerKind::Nbdkit);
    let socket = server.socket_path().expect("unix socket").to_path_buf();
    assert!(socket.starts_with(server.dir()));
    assert_eq!(server.export_name(), "");
    assert_eq!(
        server.uri(),
        format!("nbd+unix:///?socket={}", socket.display())
    );
    assert!(server.command_line().contains("--exit-with-parent"));
    assert_eq!(nbdinfo_size(&server.uri()), MIB);
    // nbdkit ignores the export name: any name reaches the same disk.
    assert_eq!(nbdinfo_size(&server.uri_for("whatever")), MIB);
    assert!(!nbdinfo_is("read-only", &server.uri()));
    drop_and_check_gone(server);
}

#[test]
fn nbdkit_pattern_on_tcp() {
    let server = NbdkitBuilder::pattern(64 * 1024)
        .tcp()
        .export_name("pat")
        .start();
    let addr = server.tcp_addr().expect("tcp address");
    assert!(addr.ip().is_loopback());
    assert_eq!(server.uri(), format!("nbd://127.0.0.1:{}/pat", addr.port()));
    assert_eq!(read_export(&server.uri()), pattern_bytes(64 * 1024));
    drop_and_check_gone(server);
}

#[test]
fn nbdkit_eval_with_flags_and_block_sizes() {
    let server = NbdkitBuilder::eval()
        .method("get_size", "echo 1M")
        .method(
            "pread",
            "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        )
        .method("block_size", "echo 512 4K 64K")
        .method("can_flush", "exit 0")
        .method("flush", "exit 0")
        .readonly()
        .no_sr()
        .export_name("evaled")
        .start();
    let json = nbdinfo_json(&server.uri());
    assert_eq!(json_value(&json, "export-name"), Some("evaled"), "{json}");
    assert_eq!(json_value(&json, "export-size"), Some("1048576"), "{json}");
    assert_eq!(json_value(&json, "structured"), Some("false"), "{json}");
    assert_eq!(json_value(&json, "is_read_only"), Some("true"), "{json}");
    assert_eq!(json_value(&json, "can_flush"), Some("true"), "{json}");
    assert_eq!(json_value(&json, "can_trim"), Some("false"), "{json}");
    assert_eq!(
        json_value(&json, "block_size_minimum"),
        Some("512"),
        "{json}"
    );
    assert_eq!(
        json_value(&json, "block_size_preferred"),
        Some("4096"),
        "{json}"
    );
    assert_eq!(
        json_value(&json, "block_size_maximum"),
        Some("65536"),
        "{json}"
    );
    assert!(!nbdinfo_can("structured-reply", &server.uri()));
    assert_eq!(read_export(&server.uri()), vec![0; MIB as usize]);
    drop_and_check_gone(server);
}

#[test]
fn nbdkit_sh_script_plugin() {
    let script = r#"#!/bin/sh
case "$1" in
    get_size) echo 64K ;;
    pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none | tr '\0' 'x' ;;
    can_write|can_trim|can_zero) exit 3 ;;
    can_multi_conn) exit 0 ;;
    is_rotational) exit 0 ;;
    *) exit 2 ;;
esac
"#;
    let server = NbdkitBuilder::sh(script).start();
    let json = nbdinfo_json(&server.uri());
    assert_eq!(json_value(&json, "export-size"), Some("65536"), "{json}");
    assert_eq!(json_value(&json, "is_read_only"), Some("true"), "{json}");
    assert_eq!(json_value(&json, "can_multi_conn"), Some("true"), "{json}");
    assert_eq!(json_value(&json, "is_rotational"), Some("true"), "{json}");
    assert_eq!(read_export(&server.uri()), vec![b'x'; 65536]);
    drop_and_check_gone(server);
}

#[test]
fn nbdkit_data_plugin_and_filters() {
    // 512 bytes "1 2 3" then zeroes; the blocksize-policy filter advertises
    // block sizes.
    let server = NbdkitBuilder::data("1 2 3")
        .param("size", "512")
        .filter("blocksize-policy")
        .param("blocksize-minimum", "1")
        .param("blocksize-preferred", "512")
        .param("blocksize-maximum", "4096")
        .start();
    let mut expected = vec![0u8; 512];
    expected[..3].copy_from_slice(&[1, 2, 3]);
    assert_eq!(read_export(&server.uri()), expected);
    let json = nbdinfo_json(&server.uri());
    assert_eq!(
        json_value(&json, "protocol"),
        Some("newstyle-fixed"),
        "{json}"
    );
    assert_eq!(json_value(&json, "structured"), Some("true"), "{json}");
    assert_eq!(
        json_value(&json, "block_size_preferred"),
        Some("512"),
        "{json}"
    );
    assert_eq!(
        json_value(&json, "block_size_maximum"),
        Some("4096"),
        "{json}"
    );
    drop_and_check_gone(server);

    // --mask-handshake=0 drops fixed newstyle: no options, so no structured
    // replies and no block size information either.
    let server = NbdkitBuilder::data("1 2 3")
        .param("size", "512")
        .filter("blocksize-policy")
        .param("blocksize-preferred", "512")
        .mask_handshake(0)
        .start();
    let json = nbdinfo_json(&server.uri());
    assert_eq!(json_value(&json, "protocol"), Some("newstyle"), "{json}");
    assert_eq!(json_value(&json, "structured"), Some("false"), "{json}");
    assert_eq!(json_value(&json, "block_size_preferred"), None, "{json}");
    assert_eq!(read_export(&server.uri()), expected);
    drop_and_check_gone(server);
}

#[test]
fn nbdkit_file_plugin_is_writable() {
    let server = NbdkitBuilder::file_of_size(MIB).start();
    let disk = server.backing_file().expect("backing file").to_path_buf();
    let source = server.dir().join("source.bin");
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    fs::write(&source, &data).unwrap();
    nbdcopy(&source, server.uri());
    assert_eq!(file_bytes(&disk), data);
    let bytes_server = NbdkitBuilder::bytes(b"hello, world").tcp().start();
    assert_eq!(read_export(&bytes_server.uri()), b"hello, world");
    drop_and_check_gone(server);
    drop_and_check_gone(bytes_server);
}

#[test]
fn qemu_nbd_raw_writable_on_unix_socket() {
    let server = QemuNbdBuilder::raw(MIB)
        .export_name("disk")
        .shared(2)
        .cache("writethrough")
        .start();
    assert_eq!(server.kind(), ServerKind::QemuNbd);
    assert_eq!(server.export_name(), "disk");
    assert!(server.uri().starts_with("nbd+unix:///disk?socket="));
    assert_eq!(nbdinfo_size(&server.uri()), MIB);
    assert!(nbdinfo_can("multi-conn", &server.uri()));
    let source = server.dir().join("source.bin");
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 256) as u8).collect();
    fs::write(&source, &data).unwrap();
    nbdcopy(&source, server.uri());
    let image = server.backing_file().unwrap().to_path_buf();
    // qemu-img compare reads the locked image thanks to -U.
    assert!(qemu_img_compare(&image, server.uri()));
    assert!(qemu_img_compare(&source, &image));
    assert_eq!(file_bytes(&image), data);
    drop_and_check_gone(server);
}

#[test]
fn qemu_nbd_qcow2_read_only_on_tcp() {
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 13) as u8).collect();
    let server = QemuNbdBuilder::from_bytes(ImageFormat::Qcow2, &data)
        .read_only()
        .export_name("ro")
        .tcp()
        .start();
    assert!(server.tcp_addr().is_some());
    let json = nbdinfo_json(&server.uri());
    assert_eq!(json_value(&json, "export-name"), Some("ro"), "{json}");
    assert_eq!(json_value(&json, "is_read_only"), Some("true"), "{json}");
    assert_eq!(json_value(&json, "export-size"), Some("262144"), "{json}");
    assert_eq!(read_export(&server.uri()), data);
    let image = server.backing_file().unwrap();
    assert!(image.extension().is_some_and(|ext| ext == "qcow2"));
    assert!(qemu_img_compare(image, server.uri()));
    drop_and_check_gone(server);
}

#[test]
fn qemu_nbd_empty_qcow2_reads_zeroes() {
    let server = QemuNbdBuilder::qcow2(MIB).start();
    assert_eq!(server.uri_for("").as_str(), server.uri());
    assert_eq!(read_export(&server.uri()), vec![0; MIB as usize]);
    drop_and_check_gone(server);
}

#[test]
fn qemu_nbd_not_persistent_exits_after_first_client() {
    // Starting must not connect (a probe would be that first client).
    let mut server = QemuNbdBuilder::raw(64 * 1024).persistent(false).start();
    assert!(server.is_running());
    assert_eq!(nbdinfo_size(&server.uri()), 64 * 1024);
    wait_until("qemu-nbd exits", || !server.is_running());
    let (pid, dir) = (server.pid(), server.dir().to_path_buf());
    drop(server);
    assert!(!proc_exists(pid));
    assert!(!dir.exists());
}

#[test]
fn nbd_server_several_exports_on_tcp() {
    let server = NbdServerBuilder::new()
        .export("alpha", MIB)
        .export_with(NbdServerExport::new("beta", 2 * MIB).readonly())
        .export_with(
            NbdServerExport::new("gamma", 4096)
                .option("flush", "true")
                .option("trim", "true"),
        )
        .tcp()
        .start();
    assert_eq!(server.kind(), ServerKind::NbdServer);
    assert_eq!(server.export_name(), "alpha");
    assert_eq!(server.export_names(), ["alpha", "beta", "gamma"]);
    let addr = server.tcp_addr().expect("tcp address");
    assert_eq!(
        server.uri(),
        format!("nbd://127.0.0.1:{}/alpha", addr.port())
    );

    let list = nbdinfo_list_json(&server.uri());
    for name in ["alpha", "beta", "gamma"] {
        assert!(
            list.contains(&format!("\"export-name\": \"{name}\"")),
            "{list}"
        );
    }
    let text = nbdinfo(["--list", server.uri().as_str()]);
    assert!(text.contains("export=\"beta\""), "{text}");

    assert_eq!(nbdinfo_size(&server.uri()), MIB);
    assert_eq!(nbdinfo_size(&server.uri_for("beta")), 2 * MIB);
    assert!(!nbdinfo_is("read-only", &server.uri()));
    assert!(nbdinfo_is("read-only", &server.uri_for("beta")));
    assert!(nbdinfo_can("flush", &server.uri_for("gamma")));
    assert!(nbdinfo_can("trim", &server.uri_for("gamma")));
    assert!(!nbdinfo_can("trim", &server.uri()));

    // Writes through the server land in the export's backing file.
    let source = server.dir().join("source.bin");
    fs::write(&source, vec![0xa5; 4096]).unwrap();
    nbdcopy(&source, server.uri_for("gamma"));
    assert_eq!(
        file_bytes(server.backing_file_for("gamma").unwrap()),
        vec![0xa5; 4096]
    );
    drop_and_check_gone(server);
}

#[test]
fn nbd_server_on_unix_socket_serves_many_connections() {
    let data = b"reference server".repeat(256);
    let server = NbdServerBuilder::new()
        .export_with(NbdServerExport::with_bytes("ref", &data))
        .start();
    assert!(server.uri().starts_with("nbd+unix:///ref?socket="));
    // Several connections in a row: the server was not started with -d.
    for _ in 0..3 {
        assert_eq!(read_export(&server.uri()), data);
    }
    drop_and_check_gone(server);
}

#[test]
fn nbd_server_drop_reaps_connection_children() {
    let server = NbdServerBuilder::new().export("x", 4096).start();
    let daemon = server.pid();
    // A client that connected but never negotiates keeps a forked child.
    let mut client = UnixStream::connect(server.socket_path().unwrap()).unwrap();
    let mut magic = [0u8; 8];
    client.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"NBDMAGIC");
    let mut children = Vec::new();
    wait_until("nbd-server forks a connection child", || {
        children = children_of(daemon);
        !children.is_empty()
    });
    drop_and_check_gone(server);
    for child in children {
        assert!(!proc_exists(child), "connection child {child} survived");
    }
}

#[test]
fn panicking_test_still_stops_its_server() {
    let mut seen: Option<(u32, PathBuf)> = None;
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        let server = NbdkitBuilder::memory(4096).start();
        seen = Some((server.pid(), server.dir().to_path_buf()));
        panic!("test failure while the server runs");
    }));
    assert!(result.is_err());
    let (pid, dir) = seen.expect("server was started");
    assert!(
        !proc_exists(pid),
        "nbdkit {pid} outlived the panicking test"
    );
    assert!(!dir.exists());
}

#[test]
fn failed_start_panics_with_server_output() {
    let result = panic::catch_unwind(|| {
        NbdkitBuilder::new("no-such-plugin-xyz").start();
    });
    let message = panic_message(result.expect_err("start should fail"));
    assert!(message.contains("nbdkit failed to start"), "{message}");
    assert!(message.contains("no-such-plugin-xyz"), "{message}");
    assert!(message.contains("--- server output"), "{message}");

    let result = panic::catch_unwind(|| {
        QemuNbdBuilder::raw(4096)
            .arg("--no-such-option")
            .tcp()
            .start();
    });
    let message = panic_message(result.expect_err("start should fail"));
    assert!(message.contains("qemu-nbd failed to start"), "{message}");
    assert!(message.contains("no-such-option"), "{message}");
}

#[test]
fn kill_simulates_a_crash() {
    let mut server = NbdkitBuilder::memory(4096)
        .transport(Transport::Unix)
        .start();
    let pid = server.pid();
    server.kill();
    assert!(!server.is_running());
    assert!(!proc_exists(pid));
    // The stale socket file remains until the handle drops; nobody listens.
    let socket = server.socket_path().unwrap();
    assert!(UnixStream::connect(socket).is_err());
}

#[test]
fn missing_tools_fail_with_the_debian_package() {
    assert_eq!(nbd_tests::debian_package("nbdkit"), Some("nbdkit"));
    assert_eq!(nbd_tests::debian_package("qemu-nbd"), Some("qemu-utils"));
    assert_eq!(nbd_tests::debian_package("nbd-server"), Some("nbd-server"));
    assert_eq!(nbd_tests::debian_package("nbdinfo"), Some("libnbd-bin"));
    for tool in [
        "nbdkit",
        "qemu-nbd",
        "qemu-img",
        "nbd-server",
        "nbdinfo",
        "nbdcopy",
    ] {
        require_tool(tool);
    }
    let result = panic::catch_unwind(|| require_tool("nbd-tests-no-such-tool"));
    let message = panic_message(result.expect_err("missing tool must panic"));
    assert!(message.contains("not found on PATH"), "{message}");
}
