//! The in-memory fake server (`nbd-testkit`) over real sockets: the blocking
//! adapter runs workloads against it, and libnbd's own tools (`nbdinfo`,
//! `nbdcopy`) check that it is a valid server: what they report and copy must
//! match the image it serves.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Socket};
use nbd_proto::{CmdFlags, Config};
use nbd_testkit::{lock, spawn_unix, FakeServer, Image, Rng, Style, UnixServer};
use nbd_tests::require_tool;

/// Bound on any wait here: long enough for a loaded machine, short enough
/// to turn a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(120);

/// A model of the export the workload keeps next to the server's image.
fn random_workload(client: &mut Client, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let mut rng = Rng::new(seed);
    for round in 0..40 {
        // A few blocking calls...
        let len = rng.range(1..32 * 1024);
        let offset = rng.below(size - len);
        let (o, e) = (offset as usize, (offset + len) as usize);
        if rng.chance(0.5) {
            let data = rng.bytes(len as usize);
            model[o..e].copy_from_slice(&data);
            client
                .pwrite(Bytes::from(data), offset, CmdFlags::empty())
                .unwrap_or_else(|err| panic!("seed {seed} round {round}: pwrite: {err}"));
        } else {
            let got = client
                .pread(BytesMut::zeroed(len as usize), offset, CmdFlags::empty())
                .unwrap_or_else(|err| panic!("seed {seed} round {round}: pread: {err}"));
            assert!(got[..] == model[o..e], "seed {seed} round {round}: pread");
        }
        // ...then a batch in flight together, on disjoint ranges.
        let slot = size / 8;
        let mut reads = Vec::new();
        for lane in 0..8u64 {
            let len = rng.range(1..slot.min(16 * 1024));
            let offset = lane * slot + rng.below(slot - len);
            let (o, e) = (offset as usize, (offset + len) as usize);
            if rng.chance(0.5) {
                let data = rng.bytes(len as usize);
                model[o..e].copy_from_slice(&data);
                client
                    .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
                    .unwrap();
            } else {
                let cookie = client
                    .aio_pread(BytesMut::zeroed(len as usize), offset, CmdFlags::empty())
                    .unwrap();
                reads.push((cookie, model[o..e].to_vec()));
            }
        }
        let mut left = 8;
        let deadline = Instant::now() + PATIENCE;
        while left > 0 {
            assert!(
                Instant::now() < deadline,
                "seed {seed}: batch never finished"
            );
            client
                .poll(Some(Duration::from_secs(1)))
                .unwrap_or_else(|err| panic!("seed {seed} round {round}: poll: {err}"));
            while let Some(done) = client.next_completion() {
                left -= 1;
                if let Err(err) = &done.result {
                    panic!("seed {seed} round {round}: command failed: {err}");
                }
                if let Some(at) = reads.iter().position(|(c, _)| *c == done.cookie) {
                    let (_, want) = reads.swap_remove(at);
                    assert!(
                        done.buffer.unwrap()[..] == want[..],
                        "seed {seed} round {round}: aio_pread"
                    );
                }
            }
        }
        assert!(reads.is_empty(), "seed {seed}: a read never completed");
    }
}

#[test]
fn blocking_client_over_a_socketpair_agrees_with_the_image() {
    let base = Rng::seed_from_env(0xb10c);
    let variants = [
        ("extended chaotic", FakeServer::builder().chaotic()),
        (
            "structured",
            FakeServer::builder().extended(false).holes(true),
        ),
        (
            "simple",
            FakeServer::builder().structured(false).extended(false),
        ),
        ("oldstyle", FakeServer::builder().style(Style::Oldstyle)),
    ];
    for (i, (name, builder)) in variants.into_iter().enumerate() {
        let seed = base + i as u64;
        let size = 1 << 20;
        let server = builder.size(size).seed(seed).build();
        let image = server.image();
        let (client_end, thread) = spawn_unix(server).unwrap();
        client_end.set_nonblocking(true).unwrap();
        let mut client =
            Client::connect_socket(Socket::from_fd(client_end.into(), name), Config::default())
                .unwrap_or_else(|err| panic!("{name}: handshake: {err}"));
        let mut model = vec![0u8; size as usize];
        random_workload(&mut client, &mut model, seed);
        client
            .shutdown()
            .unwrap_or_else(|err| panic!("{name}: shutdown: {err}"));
        let server = thread.join().unwrap().unwrap();
        assert!(
            server.closed_cleanly(),
            "{name}: {:?}",
            server.close_reason()
        );
        assert!(
            lock(&image).to_vec() == model,
            "{name}, seed {seed}: the image differs from the model"
        );
    }
}

#[test]
fn blocking_client_connects_to_a_listening_fake_server_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let server = FakeServer::builder()
        .size(1 << 20)
        .multi_conn(true)
        .chaotic()
        .build();
    let image = server.image();
    let listener = UnixServer::bind(&path, server).unwrap();
    // Two connections, one image: what one writes the other reads.
    let mut a = Client::connect_unix(&path).unwrap();
    let mut b = Client::connect_unix(&path).unwrap();
    a.pwrite(Bytes::from_static(b"shared"), 4096, CmdFlags::empty())
        .unwrap();
    let got = b
        .pread(BytesMut::zeroed(6), 4096, CmdFlags::empty())
        .unwrap();
    assert_eq!(&got[..], b"shared");
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    assert_eq!(listener.connections(), 2);
    assert_eq!(lock(&image).read(4096, 6), b"shared");
}

// ---------------------------------------------------------------- libnbd's view

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(require_tool(program))
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let text = run("nbdinfo", args);
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("nbdinfo output: {err}\n{text}"))
}

#[test]
fn nbdinfo_reports_what_the_fake_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (Style::FixedNewstyle, true, "newstyle-fixed"),
        (Style::FixedNewstyle, false, "newstyle-fixed"),
        (Style::Newstyle, false, "newstyle"),
        (Style::Oldstyle, false, "oldstyle"),
    ];
    for (i, (style, structured, protocol)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("info{i}.sock"));
        let server = FakeServer::builder()
            .style(style)
            .structured(structured)
            .size(3 << 20)
            .read_only(i % 2 == 1)
            .multi_conn(i % 2 == 0)
            .build();
        let listener = UnixServer::bind(&path, server).unwrap();
        let json = nbdinfo_json(&["--json", &listener.uri("")]);
        let what = format!("{style:?} structured={structured}: {json}");
        assert_eq!(json["protocol"], protocol, "{what}");
        assert_eq!(json["structured"], structured, "{what}");
        let export = &json["exports"][0];
        assert_eq!(export["export-size"], 3 << 20, "{what}");
        assert_eq!(export["is_read_only"], i % 2 == 1, "{what}");
        assert_eq!(export["can_multi_conn"], i % 2 == 0, "{what}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_cache"] {
            assert_eq!(export[flag], true, "{flag}: {what}");
        }
        let contexts = if structured {
            serde_json::json!(["base:allocation"])
        } else {
            serde_json::json!([])
        };
        if structured || export.get("contexts").is_some() {
            assert_eq!(export["contexts"], contexts, "{what}");
        }
    }
}

#[test]
fn nbdinfo_lists_exports_with_their_descriptions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("list.sock");
    let server = FakeServer::builder()
        .exports([("alpha", "first disk"), ("beta", "second disk")])
        .size(1 << 20)
        .build();
    let listener = UnixServer::bind(&path, server).unwrap();
    let json = nbdinfo_json(&["--json", "--list", &listener.uri("")]);
    let exports = json["exports"].as_array().unwrap();
    let names: Vec<(&str, &str)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap(),
                e["description"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("alpha", "first disk"), ("beta", "second disk")],
        "{json}"
    );
    // nbdinfo asked each export for its details (NBD_OPT_INFO / GO) as well.
    assert!(
        exports.iter().all(|e| e["export-size"] == 1 << 20),
        "{json}"
    );
}

/// A sparse test image: random data in some places, holes elsewhere.
fn sparse_image(size: u64, seed: u64) -> Image {
    let mut rng = Rng::new(seed);
    let mut image = Image::new(size);
    for _ in 0..24 {
        let len = rng.range(1..200_000);
        let offset = rng.below(size - len);
        image.write(offset, &rng.bytes(len as usize));
    }
    image
}

/// nbdcopy with two connections where the server allows several: by
/// default it opens one per core, which would make the count depend on the
/// machine.
fn nbdcopy(args: &[&str]) {
    let mut all = vec!["--connections=2", "--threads=2"];
    all.extend_from_slice(args);
    run("nbdcopy", &all);
}

#[test]
fn nbdcopy_reads_the_image_exactly_from_a_chaotic_server() {
    let dir = tempfile::tempdir().unwrap();
    let base = Rng::seed_from_env(0xc0b1);
    let variants = [
        (
            "chaotic multi-conn",
            FakeServer::builder().chaotic().multi_conn(true),
        ),
        ("chaotic", FakeServer::builder().chaotic()),
        ("simple replies", FakeServer::builder().structured(false)),
    ];
    for (i, (name, builder)) in variants.into_iter().enumerate() {
        let seed = base + i as u64;
        let size = 4 << 20;
        let image = sparse_image(size, seed).shared();
        let want = lock(&image).to_vec();
        let path = dir.path().join(format!("src{i}.sock"));
        let server = builder.image(image.clone()).seed(seed).build();
        let listener = UnixServer::bind(&path, server).unwrap();
        let out = dir.path().join(format!("copy{i}.img"));
        nbdcopy(&[&listener.uri(""), out.to_str().unwrap()]);
        let copied = std::fs::read(&out).unwrap();
        assert!(
            copied == want,
            "{name}, seed {seed}: nbdcopy got other bytes"
        );
        // The multi-conn variant is read over several connections at once.
        let least = if i == 0 { 2 } else { 1 };
        assert!(listener.connections() >= least, "{name}");
        // Reading changed nothing.
        assert!(lock(&image).to_vec() == want);
    }
}

#[test]
fn nbdcopy_writes_the_image_exactly_into_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let base = Rng::seed_from_env(0xc0b2);
    for (i, multi_conn) in [true, false].into_iter().enumerate() {
        let seed = base + i as u64;
        let size: u64 = 4 << 20;
        let source = sparse_image(size, seed).to_vec();
        let input = dir.path().join(format!("in{i}.img"));
        std::fs::write(&input, &source).unwrap();
        // The destination starts full of non-zero bytes, so zeroing must happen.
        let image = Image::from_bytes(&vec![0xa5; size as usize]).shared();
        let path = dir.path().join(format!("dst{i}.sock"));
        let server = FakeServer::builder()
            .image(image.clone())
            .chaotic()
            .multi_conn(multi_conn)
            .seed(seed)
            .build();
        let listener = UnixServer::bind(&path, server).unwrap();
        nbdcopy(&[input.to_str().unwrap(), &listener.uri("")]);
        // nbdcopy exits once every write is acknowledged, and the server
        // applies a write to the image before acknowledging it.
        assert!(
            lock(&image).to_vec() == source,
            "multi_conn={multi_conn}, seed {seed}: the image differs from the source"
        );
        if multi_conn {
            assert!(listener.connections() > 1, "nbdcopy used one connection");
        }
    }
}

#[test]
fn nbdcopy_fails_on_a_bad_region_rather_than_copying_stale_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.sock");
    let server = FakeServer::builder()
        .contents(&vec![0x5a; 1 << 20])
        .fail(300_000..300_512, nbd_proto::wire::consts::EIO)
        .chaotic()
        .build();
    let listener = UnixServer::bind(&path, server).unwrap();
    let out = dir.path().join("bad-copy.img");
    let status = Command::new(require_tool("nbdcopy"))
        .args([&listener.uri(""), out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success(),
        "nbdcopy succeeded over a bad region: {stderr}"
    );
    // It failed for the server's error, not for a protocol violation.
    assert!(stderr.contains("Input/output error"), "{stderr}");
}

#[test]
fn nbdinfo_maps_the_allocation_the_image_has() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.sock");
    let seed = Rng::seed_from_env(0x3a9);
    let size = 8 << 20;
    let mut image = sparse_image(size, seed);
    // Trimmed and zeroed ranges are holes too; zeroes written with NO_HOLE are not.
    image.zero(1 << 20, 100_000, true);
    image.zero(3 << 20, 50_000, false);
    let want: Vec<(u64, u64)> = image
        .allocation_runs(0, size, usize::MAX)
        .into_iter()
        .map(|(len, allocated)| (len, if allocated { 0 } else { 3 }))
        .collect();
    let server = FakeServer::builder()
        .image(image.shared())
        .chaotic()
        .build();
    let listener = UnixServer::bind(&path, server).unwrap();
    let json = nbdinfo_json(&["--map", "--json", &listener.uri("")]);
    // nbdinfo may cut runs where its requests end: join equal neighbours.
    let mut got: Vec<(u64, u64)> = Vec::new();
    let mut next = 0;
    for extent in json.as_array().unwrap_or_else(|| panic!("{json}")) {
        let (offset, length) = (
            extent["offset"].as_u64().unwrap(),
            extent["length"].as_u64().unwrap(),
        );
        let kind = extent["type"].as_u64().unwrap();
        assert_eq!(offset, next, "{json}");
        next += length;
        match got.last_mut() {
            Some((len, k)) if *k == kind => *len += length,
            _ => got.push((length, kind)),
        }
    }
    assert_eq!(next, size);
    assert_eq!(got, want, "seed {seed}");
    assert!(want.len() > 4, "the image should have several runs");
}
