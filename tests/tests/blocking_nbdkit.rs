//! The blocking client (`nbd-blocking`) against real nbdkit servers: the
//! memory, pattern, file, eval and sh plugins and several filters.
//!
//! Every test compares what the client sees with what libnbd's `nbdinfo` /
//! `nbdcopy` see on the same server, or with a local model of the export.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error, ExportFile};
use nbd_proto::{CmdFlags, Config, Cookie, Errno, HandshakeFlags, ReadChunk, Strict};
use nbd_tests::testkit::{
    assert_errno, assert_matches_nbdinfo, negotiated, pattern_at, pattern_bytes, read,
    run_workload, Negotiated, Rng, Workload,
};
use nbd_tests::{json_value, nbdinfo_json, nbdinfo_list_json, read_export, NbdkitBuilder};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn flag(got: &Negotiated, name: &str) -> bool {
    got.flags
        .iter()
        .find(|(flag, _)| *flag == name)
        .unwrap_or_else(|| panic!("no flag {name}"))
        .1
}

/// Polls until every cookie in `pending` completed; returns the completions in
/// the order they arrived.
fn collect_all(client: &mut Client, count: usize) -> Vec<nbd_proto::Completion> {
    let mut done = Vec::new();
    while done.len() < count {
        while let Some(completion) = client.next_completion() {
            done.push(completion);
        }
        if done.len() < count {
            client.poll(Some(Duration::from_secs(10))).unwrap();
        }
    }
    assert_eq!(client.in_flight(), 0);
    done
}

#[test]
fn memory_plugin_handshake_and_every_command() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    assert!(client.connection().is_ready());
    let got = negotiated(client.connection());
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(got.structured, "nbdkit offers structured replies");
    assert_eq!(got.size, 4 * MIB);
    assert!(!flag(&got, "is_read_only"));
    for name in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_multi_conn",
    ] {
        assert!(flag(&got, name), "memory plugin should advertise {name}");
    }
    assert_matches_nbdinfo(&server.uri(), &got);

    let mut rng = Rng::new(1);
    let data = rng.bytes(64 * KIB as usize);
    client
        .pwrite(Bytes::from(data.clone()), 4 * KIB, CmdFlags::empty())
        .unwrap();
    assert_eq!(read(&mut client, 4 * KIB, 64 * KIB), data);
    // Unaligned reads straddle what was written.
    let around = read(&mut client, 4 * KIB - 3, 10);
    assert_eq!(&around[..3], &[0, 0, 0]);
    assert_eq!(&around[3..], &data[..7]);

    // FUA write, then flush.
    let fua = rng.bytes(5000);
    client
        .pwrite(Bytes::from(fua.clone()), MIB + 1, CmdFlags::FUA)
        .unwrap();
    client.flush(CmdFlags::empty()).unwrap();
    assert_eq!(read(&mut client, MIB + 1, 5000), fua);

    // Write zeroes, with each of its flags: always reads back as zeroes.
    for (i, flags) in [
        CmdFlags::empty(),
        CmdFlags::NO_HOLE,
        CmdFlags::FUA,
        CmdFlags::FAST_ZERO,
    ]
    .into_iter()
    .enumerate()
    {
        let offset = 2 * MIB + i as u64 * 64 * KIB;
        client
            .pwrite(
                Bytes::from(vec![0xEE; 64 * KIB as usize]),
                offset,
                CmdFlags::empty(),
            )
            .unwrap();
        client.zero(32 * KIB, offset + 8 * KIB, flags).unwrap();
        let back = read(&mut client, offset, 64 * KIB);
        assert!(back[..8 * KIB as usize].iter().all(|&b| b == 0xEE));
        assert!(
            back[8 * KIB as usize..40 * KIB as usize]
                .iter()
                .all(|&b| b == 0),
            "zero with {flags:?} did not read back as zeroes"
        );
        assert!(back[40 * KIB as usize..].iter().all(|&b| b == 0xEE));
    }

    // The memory plugin trims to zeroes (it frees the pages).
    client
        .pwrite(
            Bytes::from(vec![0x77; 128 * KIB as usize]),
            3 * MIB,
            CmdFlags::empty(),
        )
        .unwrap();
    client.trim(64 * KIB, 3 * MIB, CmdFlags::empty()).unwrap();
    client
        .trim(4 * KIB, 3 * MIB + 64 * KIB, CmdFlags::FUA)
        .unwrap();
    let back = read(&mut client, 3 * MIB, 128 * KIB);
    assert!(back[..68 * KIB as usize].iter().all(|&b| b == 0));
    assert!(back[68 * KIB as usize..].iter().all(|&b| b == 0x77));

    // Cache (prefetch) succeeds and changes nothing.
    client.cache(MIB, 0, CmdFlags::empty()).unwrap();
    assert_eq!(read(&mut client, 4 * KIB, 64 * KIB), data);

    // DF: the reply comes in one piece, which pread_structured shows.
    let (buf, chunks) = client
        .pread_structured(BytesMut::zeroed(64 * KIB as usize), 4 * KIB, CmdFlags::DF)
        .unwrap();
    assert_eq!(&buf[..], &data[..]);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert!(
        matches!(chunks[0], ReadChunk::Data { offset, length, .. } if offset == 4 * KIB && length == 64 * KIB),
        "{chunks:?}"
    );

    client.shutdown().unwrap();
    // What the client wrote is what libnbd reads.
    let export = read_export(&server.uri());
    assert_eq!(&export[4 * KIB as usize..][..64 * KIB as usize], &data[..]);
    assert_eq!(&export[(MIB + 1) as usize..][..5000], &fua[..]);
}

#[test]
fn memory_plugin_random_io_matches_model_and_nbdcopy() {
    let server = NbdkitBuilder::memory(2 * MIB).start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    // Unaligned offsets and lengths; trims read back as zeroes here.
    let mut work = Workload::new(0x5eed, vec![0; 2 * MIB as usize], 1, 100 * KIB).with_trim(true);
    run_workload(&mut client, &mut work, 300);

    // Then one batch of aio writes to disjoint places, all in flight at once,
    // and reads of everything.
    let mut rng = Rng::new(99);
    let mut cookies = HashMap::new();
    for slot in 0..64u64 {
        let offset = slot * 32 * KIB + rng.below(16 * KIB);
        let len = rng.between(1, 16 * KIB) as usize;
        let data = rng.bytes(len);
        work.model[offset as usize..][..data.len()].copy_from_slice(&data);
        let cookie = client
            .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
            .unwrap();
        cookies.insert(cookie, offset);
    }
    assert!(client.in_flight() > 0);
    for done in collect_all(&mut client, 64) {
        assert!(cookies.remove(&done.cookie).is_some(), "unknown cookie");
        done.result.unwrap();
        assert!(done.buffer.is_none());
    }
    let mut reads: HashMap<Cookie, u64> = HashMap::new();
    for part in 0..32u64 {
        let cookie = client
            .aio_pread(
                BytesMut::zeroed(64 * KIB as usize),
                part * 64 * KIB,
                CmdFlags::empty(),
            )
            .unwrap();
        reads.insert(cookie, part * 64 * KIB);
    }
    for done in collect_all(&mut client, 32) {
        let offset = reads.remove(&done.cookie).expect("a read we issued");
        done.result.unwrap();
        let buf = done.buffer.expect("reads return their buffer");
        assert!(
            buf[..] == work.model[offset as usize..][..64 * KIB as usize],
            "aio read at {offset} differs"
        );
    }
    client.flush(CmdFlags::empty()).unwrap();
    client.shutdown().unwrap();
    assert!(
        read_export(&server.uri()) == work.model,
        "nbdcopy sees other bytes"
    );
}

#[test]
fn unix_tcp_and_uri_connections_agree() {
    let server = NbdkitBuilder::pattern(MIB).tcp().export_name("pat").start();
    let addr = server.tcp_addr().unwrap();
    let mut by_uri = Client::connect_uri(&server.uri()).unwrap();
    let mut by_addr = Client::connect_tcp(&addr.ip().to_string(), addr.port()).unwrap();
    assert_eq!(by_uri.size().unwrap(), MIB);
    assert_eq!(by_addr.size().unwrap(), MIB);
    assert_eq!(by_uri.connection().export_name(), "pat");
    assert_eq!(by_addr.connection().export_name(), "");
    assert_eq!(read(&mut by_uri, 8000, 100), pattern_at(8000, 100));
    assert_eq!(read(&mut by_addr, 8000, 100), pattern_at(8000, 100));
    by_uri.shutdown().unwrap();
    by_addr.shutdown().unwrap();

    let unix = NbdkitBuilder::pattern(64 * KIB).start();
    let mut client = Client::connect_unix(unix.socket_path().unwrap()).unwrap();
    assert_eq!(client.size().unwrap(), 64 * KIB);
    assert_eq!(read(&mut client, 0, 64 * KIB), pattern_bytes(64 * KIB));
    client.shutdown().unwrap();
}

#[test]
fn pattern_plugin_reads_its_pattern() {
    let server = NbdkitBuilder::pattern(3 * MIB).start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert_eq!(got.size, 3 * MIB);
    assert!(
        flag(&got, "is_read_only"),
        "the pattern plugin is read-only"
    );
    assert!(!flag(&got, "can_trim"));
    assert_matches_nbdinfo(&server.uri(), &got);

    let mut rng = Rng::new(3);
    for _ in 0..50 {
        let offset = rng.below(3 * MIB - 1);
        let len = rng.between(1, (3 * MIB - offset).min(200 * KIB));
        assert_eq!(
            read(&mut client, offset, len),
            pattern_at(offset, len as usize),
            "{len} bytes at {offset}"
        );
    }
    // read_exact_at splits the 3 MiB read into pieces the server accepts.
    let mut all = vec![0u8; 3 * MIB as usize];
    client.read_exact_at(&mut all, 0).unwrap();
    assert!(all == pattern_bytes(3 * MIB));
    assert!(all == read_export(&server.uri()));

    // A structured read reports chunks covering exactly what was asked.
    let (buf, chunks) = client
        .pread_structured(BytesMut::zeroed(100_000), 12_345, CmdFlags::empty())
        .unwrap();
    assert_eq!(&buf[..], &pattern_at(12_345, 100_000)[..]);
    let mut covered = 12_345;
    for chunk in &chunks {
        match chunk {
            ReadChunk::Data { offset, length, .. } | ReadChunk::Hole { offset, length, .. } => {
                assert_eq!(*offset, covered, "{chunks:?}");
                covered += length;
            }
            other => panic!("not a data or hole chunk: {other:?} in {chunks:?}"),
        }
    }
    assert_eq!(covered, 12_345 + 100_000, "{chunks:?}");
    client.shutdown().unwrap();
}

#[test]
fn file_plugin_random_io_lands_in_the_file() {
    let server = NbdkitBuilder::file_of_size(2 * MIB).start();
    let disk = server.backing_file().unwrap().to_path_buf();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert!(!flag(&got, "is_read_only"));
    assert!(flag(&got, "can_flush"));
    assert!(flag(&got, "can_zero"));
    assert_matches_nbdinfo(&server.uri(), &got);

    let mut work = Workload::new(77, vec![0; 2 * MIB as usize], 512, 256 * KIB);
    run_workload(&mut client, &mut work, 200);
    // FUA where advertised.
    if client.connection().can_fua().unwrap() {
        let data = work.rng().bytes(4096);
        work.model[8192..][..4096].copy_from_slice(&data);
        client
            .pwrite(Bytes::from(data), 8192, CmdFlags::FUA)
            .unwrap();
    }
    client.flush(CmdFlags::empty()).unwrap();
    assert!(
        fs::read(&disk).unwrap() == work.model,
        "the file differs from the model"
    );
    client.shutdown().unwrap();
    assert!(read_export(&server.uri()) == work.model);
}

/// An eval plugin serving 1 MiB of `e` bytes, read-only, rotational, without
/// flush or trim, with block sizes 512 / 4K / 64K and no structured replies.
#[test]
fn eval_plugin_read_only_with_block_sizes() {
    let server = NbdkitBuilder::eval()
        .method("get_size", "echo 1M")
        .method(
            "pread",
            "dd if=/dev/zero count=$3 iflag=count_bytes status=none | tr '\\0' e",
        )
        .method("can_write", "exit 3")
        .method("can_flush", "exit 3")
        .method("can_trim", "exit 3")
        .method("is_rotational", "exit 0")
        .method("can_multi_conn", "exit 0")
        .method("block_size", "echo 512 4K 64K")
        .no_sr()
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(!got.structured, "--no-sr: no structured replies");
    assert_eq!(got.block_sizes, Some((512, 4096, 65536)));
    assert!(flag(&got, "is_read_only"));
    assert!(flag(&got, "is_rotational"));
    assert!(flag(&got, "can_multi_conn"));
    assert!(!flag(&got, "can_flush"));
    assert!(!flag(&got, "can_trim"));
    assert!(!flag(&got, "can_df"), "DF needs structured replies");
    assert_matches_nbdinfo(&server.uri(), &got);

    assert_eq!(read(&mut client, 512, 4096), vec![b'e'; 4096]);
    // Strict mode checks each request against what the server advertised,
    // sending nothing when it fails.
    assert_errno(
        client.pread(BytesMut::zeroed(512), 100, CmdFlags::empty()),
        Errno::Inval,
        "unaligned read",
    );
    assert_errno(
        client.pread(BytesMut::zeroed(128 * KIB as usize), 0, CmdFlags::empty()),
        Errno::Range,
        "read above the maximum block size",
    );
    assert_errno(
        client.flush(CmdFlags::empty()),
        Errno::NotSup,
        "flush not advertised",
    );
    assert_errno(
        client.pread(BytesMut::zeroed(512), 0, CmdFlags::DF),
        Errno::NotSup,
        "DF without structured replies",
    );
    assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        Errno::Perm,
        "write to a read-only export",
    );
    assert_errno(
        client.pread(BytesMut::zeroed(512), MIB, CmdFlags::empty()),
        Errno::Inval,
        "read past the end",
    );
    // None of that reached the server or hurt the connection.
    assert_eq!(client.in_flight(), 0);
    assert_eq!(
        read(&mut client, MIB - 64 * KIB, 64 * KIB),
        vec![b'e'; 65536]
    );
    client.shutdown().unwrap();
}

/// The convenience calls split large requests, but at a fixed 4 MiB: a server
/// advertising a smaller maximum block size gets requests that strict mode
/// refuses (`ERANGE`), so `read_exact_at`, `write_all_at` and `ExportFile`
/// fail on such servers (nbdkit's blocksize-policy filter here; qemu-nbd with
/// a small `--image-opts` limit or any plugin with a `block_size` method alike).
#[test]

fn convenience_calls_respect_the_maximum_block_size() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("blocksize-policy")
        .param("blocksize-minimum", "1")
        .param("blocksize-preferred", "4K")
        .param("blocksize-maximum", "64K")
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    assert_eq!(client.connection().block_sizes().unwrap().maximum, 65536);
    let data = Rng::new(64).bytes(300 * KIB as usize);
    if let Err(e) = client.write_all_at(&data, 1000) {
        panic!("write_all_at of 300 KiB with a 64 KiB maximum block size: {e}");
    }
    let mut back = vec![0u8; data.len()];
    if let Err(e) = client.read_exact_at(&mut back, 1000) {
        panic!("read_exact_at of 300 KiB with a 64 KiB maximum block size: {e}");
    }
    assert!(back == data);
    let mut export = ExportFile::new(client).unwrap();
    let mut all = Vec::new();
    export
        .read_to_end(&mut all)
        .expect("ExportFile::read with a 64 KiB maximum block size");
    assert_eq!(&all[1000..][..data.len()], &data[..]);
    export.into_inner().shutdown().unwrap();
}

/// A writable sh plugin with flush, FUA and trim but no zero or cache: the
/// client sends what it advertises and refuses the rest.
#[test]
fn sh_plugin_writable_with_chosen_commands() {
    let script = r#"#!/bin/sh
case "$1" in
    get_size) echo 256K ;;
    pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    pwrite) cat >/dev/null ;;
    can_write|can_flush|can_trim) exit 0 ;;
    can_fua) echo native ;;
    can_cache) echo none ;;
    can_zero|can_fast_zero|can_multi_conn|is_rotational) exit 3 ;;
    flush|trim) exit 0 ;;
    *) exit 2 ;;
esac
"#;
    let server = NbdkitBuilder::sh(script).start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert!(!flag(&got, "is_read_only"));
    assert!(flag(&got, "can_flush"));
    assert!(flag(&got, "can_fua"));
    assert!(flag(&got, "can_trim"));
    assert!(!flag(&got, "can_cache"));
    assert!(!flag(&got, "is_rotational"));
    assert!(!flag(&got, "can_multi_conn"));
    assert_matches_nbdinfo(&server.uri(), &got);

    client
        .pwrite(Bytes::from(vec![9; 4096]), 0, CmdFlags::FUA)
        .unwrap();
    client
        .pwrite(Bytes::from(vec![9; 100]), 5, CmdFlags::empty())
        .unwrap();
    client.flush(CmdFlags::empty()).unwrap();
    client.trim(4096, 8192, CmdFlags::empty()).unwrap();
    client.trim(4096, 8192, CmdFlags::FUA).unwrap();
    assert_eq!(read(&mut client, 0, 4096), vec![0; 4096]);
    // nbdkit emulates write zeroes with writes when the plugin cannot zero,
    // so can_zero is what nbdinfo said; cache is refused by strict mode.
    if client.connection().can_zero().unwrap() {
        client.zero(4096, 0, CmdFlags::empty()).unwrap();
    } else {
        assert_errno(
            client.zero(4096, 0, CmdFlags::empty()),
            Errno::NotSup,
            "zero",
        );
    }
    assert_errno(
        client.cache(4096, 0, CmdFlags::empty()),
        Errno::NotSup,
        "cache",
    );
    client.shutdown().unwrap();
}

#[test]
fn blocksize_policy_filter_alignment_enforced_both_sides() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("blocksize-policy")
        .param("blocksize-minimum", "4096")
        .param("blocksize-preferred", "64K")
        .param("blocksize-maximum", "256K")
        .param("blocksize-error-policy", "error")
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert_eq!(got.block_sizes, Some((4096, 65536, 262144)));
    assert_matches_nbdinfo(&server.uri(), &got);

    let mut work = Workload::new(4096, vec![0; MIB as usize], 4096, 256 * KIB);
    run_workload(&mut client, &mut work, 100);

    // Strict mode refuses an unaligned write without sending it...
    assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 512, CmdFlags::empty()),
        Errno::Inval,
        "unaligned write in strict mode",
    );
    // ...and with the checks off the server refuses it (EINVAL), and the
    // connection carries on.
    client
        .connection_mut()
        .set_strict_mode(Strict::all() - Strict::ALIGN);
    let err = assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 512, CmdFlags::empty()),
        Errno::Inval,
        "unaligned write refused by the server",
    );
    assert!(
        matches!(err, Error::Nbd(nbd_proto::Error::Server { .. })),
        "{err:?}"
    );
    assert_eq!(read(&mut client, 0, 4096), &work.model[..4096]);
    client.shutdown().unwrap();
    assert!(read_export(&server.uri()) == work.model);
}

/// Many reads in flight complete out of order: an eval plugin whose pread
/// sleeps longer the lower the offset, serving the pattern from a file.
#[test]
fn reads_in_flight_complete_out_of_order() {
    const READS: u64 = 40;
    const BLOCK: u64 = 4096;
    let server = nbd_tests::testkit::nbdkit_reverse_order_reads(READS, BLOCK, 8);
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let mut index = HashMap::new();
    for i in 0..READS {
        let cookie = client
            .aio_pread(
                BytesMut::zeroed(BLOCK as usize),
                i * BLOCK,
                CmdFlags::empty(),
            )
            .unwrap();
        index.insert(cookie, i);
    }
    assert_eq!(client.in_flight(), READS as usize);
    let order: Vec<u64> = collect_all(&mut client, READS as usize)
        .into_iter()
        .map(|done| {
            let i = index[&done.cookie];
            done.result.unwrap();
            let buf = done.buffer.unwrap();
            assert_eq!(
                &buf[..],
                &pattern_at(i * BLOCK, BLOCK as usize)[..],
                "read {i}"
            );
            i
        })
        .collect();
    let submitted: Vec<u64> = (0..READS).collect();
    assert_ne!(order, submitted, "completions arrived in submission order");
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, submitted, "every read completed once");
    client.shutdown().unwrap();
}

#[test]
fn handshake_styles_and_structured_reply_choices() {
    let data = nbd_tests::testkit::pattern_bytes(64 * KIB);
    for (style, structured) in [
        ("oldstyle", false),
        ("newstyle", false),
        ("no-sr", false),
        ("default", true),
    ] {
        let mut builder = NbdkitBuilder::pattern(64 * KIB);
        builder = match style {
            "oldstyle" => builder.oldstyle(),
            "newstyle" => builder.mask_handshake(0),
            "no-sr" => builder.no_sr(),
            _ => builder,
        };
        let server = builder.start();
        let mut client = Client::connect_uri(&server.uri()).unwrap();
        let got = negotiated(client.connection());
        let protocol = match style {
            "oldstyle" | "newstyle" => style,
            _ => "newstyle-fixed",
        };
        assert_eq!(got.protocol, protocol, "{style}");
        assert_eq!(got.structured, structured, "{style}");
        assert_matches_nbdinfo(&server.uri(), &got);
        assert_eq!(read(&mut client, 0, 64 * KIB), data, "{style}");
        client.shutdown().unwrap();
    }

    // The client may decline structured replies, or fixed newstyle altogether.
    let server = NbdkitBuilder::pattern(64 * KIB).start();
    let config = Config::default().request_structured_replies(false);
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert!(!client.connection().structured_replies_negotiated());
    assert_eq!(client.connection().protocol(), Some("newstyle-fixed"));
    assert_eq!(read(&mut client, 100, 1000), pattern_at(100, 1000));
    client.shutdown().unwrap();

    let config = Config::default().handshake_flags(HandshakeFlags::empty());
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert_eq!(client.connection().handshake_flags_sent(), Some(0));
    assert!(!client.connection().structured_replies_negotiated());
    assert_eq!(client.size().unwrap(), 64 * KIB);
    assert_eq!(read(&mut client, 100, 1000), pattern_at(100, 1000));
    client.shutdown().unwrap();
}

#[test]
fn opt_mode_list_info_and_go_with_named_exports() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("exportname")
        .param("exportname-list", "explicit")
        .param("exportname", "alpha")
        .param("exportname", "beta")
        .param("exportname-strict", "true")
        .param("exportdesc", "fixed:a memory disk")
        .export_name("alpha")
        .start();
    let config = Config::default().opt_mode(true).full_info(true);
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert!(client.connection().is_negotiating());
    assert!(!client.connection().is_ready());

    let list = client.opt_list().unwrap();
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    for entry in &list {
        assert_eq!(entry.description, "a memory disk");
    }
    let theirs = nbdinfo_list_json(&server.uri());
    for name in &names {
        assert!(
            theirs.contains(&format!("\"export-name\": \"{name}\"")),
            "{theirs}"
        );
    }

    for name in ["alpha", "beta"] {
        client.set_export_name(name).unwrap();
        client.opt_info().unwrap();
        assert!(client.connection().is_negotiating());
        assert_eq!(client.size().unwrap(), MIB, "{name}");
        assert_eq!(client.connection().description(), Some("a memory disk"));
        assert!(!client.connection().is_read_only().unwrap());
    }

    // A name the filter does not allow is refused; the connection stays in
    // negotiation and a good name then works.
    client.set_export_name("nope").unwrap();
    let err = client.opt_info().expect_err("opt_info of a missing export");
    assert_eq!(err.errno(), Some(Errno::NoEnt), "{err}");
    assert!(client.connection().is_negotiating(), "{err}");
    let err = client.opt_go().expect_err("opt_go of a missing export");
    assert_eq!(err.errno(), Some(Errno::NoEnt), "{err}");
    assert!(
        matches!(err, Error::Nbd(nbd_proto::Error::OptionRefused { .. })),
        "{err:?}"
    );
    assert!(client.connection().is_negotiating(), "{err}");
    assert!(!client.connection().is_ready());

    client.set_export_name("beta").unwrap();
    client.opt_go().unwrap();
    assert!(client.connection().is_ready());
    assert_eq!(client.size().unwrap(), MIB);
    client
        .pwrite(Bytes::from_static(b"beta!"), 0, CmdFlags::empty())
        .unwrap();
    assert_eq!(read(&mut client, 0, 5), b"beta!");
    client.shutdown().unwrap();

    // opt_abort ends a negotiation cleanly.
    let config = Config::default().opt_mode(true);
    let client = Client::connect_uri_with(&server.uri(), config).unwrap();
    client.opt_abort().unwrap();
}

#[test]
fn opt_list_default_export_matches_nbdinfo() {
    let server = NbdkitBuilder::memory(MIB).start();
    let config = Config::default().opt_mode(true);
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    let list = client.opt_list().unwrap();
    let theirs = nbdinfo_list_json(&server.uri());
    assert_eq!(
        list.len(),
        theirs.matches("\"export-name\"").count(),
        "{theirs}"
    );
    assert_eq!(
        Some(list[0].name.as_str()),
        json_value(&theirs, "export-name"),
        "{theirs}"
    );
    client.opt_info().unwrap();
    assert_eq!(client.size().unwrap(), MIB);
    client.opt_go().unwrap();
    assert_eq!(read(&mut client, 0, 16), vec![0; 16]);
    client.shutdown().unwrap();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let server = NbdkitBuilder::memory(MIB).readonly().start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert!(flag(&got, "is_read_only"));
    assert_matches_nbdinfo(&server.uri(), &got);

    // Strict mode (the default): refused before sending.
    for (what, result) in [
        (
            "pwrite",
            client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        ),
        ("trim", client.trim(512, 0, CmdFlags::empty())),
        ("zero", client.zero(512, 0, CmdFlags::empty())),
    ] {
        let err = assert_errno(result, Errno::Perm, what);
        assert!(
            matches!(err, Error::Nbd(nbd_proto::Error::ReadOnly(_))),
            "{err:?}"
        );
    }
    assert_eq!(read(&mut client, 0, 512), vec![0; 512]);

    // Without strict checks the write is sent and the server refuses it with
    // EPERM; the connection survives.
    client.connection_mut().set_strict_mode(Strict::empty());
    let err = assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        Errno::Perm,
        "write sent to a read-only export",
    );
    assert!(
        matches!(err, Error::Nbd(nbd_proto::Error::Server { .. })),
        "{err:?}"
    );
    assert!(client.connection().is_ready());
    assert_eq!(read(&mut client, 0, 512), vec![0; 512]);
    client.shutdown().unwrap();
}

#[test]
fn server_read_errors_fail_the_command_not_the_connection() {
    let builder = NbdkitBuilder::pattern(MIB).filter("error");
    let inject = builder.dir().join("inject");
    let server = builder
        .param("error-pread", "EIO")
        .param("error-pread-rate", "100%")
        .param("error-pread-file", &inject)
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    assert_eq!(read(&mut client, 0, 4096), pattern_at(0, 4096));

    fs::write(&inject, b"").unwrap();
    assert_errno(
        client.pread(BytesMut::zeroed(4096), 0, CmdFlags::empty()),
        Errno::Io,
        "read with errors injected",
    );
    let cookies: Vec<Cookie> = (0..8)
        .map(|i| {
            client
                .aio_pread(BytesMut::zeroed(4096), i * 4096, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    for done in collect_all(&mut client, cookies.len()) {
        assert!(cookies.contains(&done.cookie));
        let err = done.result.expect_err("injected error");
        assert_eq!(err.errno(), Errno::Io, "{err}");
    }
    assert!(client.connection().is_ready());

    fs::remove_file(&inject).unwrap();
    assert_eq!(read(&mut client, 4096, 4096), pattern_at(4096, 4096));
    client.shutdown().unwrap();
}

#[test]
fn export_file_copy_in_and_out_and_seek() {
    let server = NbdkitBuilder::memory(MIB).start();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.bin");
    let data = Rng::new(5).bytes(700_001);
    fs::write(&source, &data).unwrap();

    let client = Client::connect_uri(&server.uri()).unwrap();
    let mut export = ExportFile::new(client).unwrap();
    assert_eq!(export.len(), MIB);
    assert!(!export.is_empty());
    let copied = io::copy(&mut fs::File::open(&source).unwrap(), &mut export).unwrap();
    assert_eq!(copied, data.len() as u64);
    export.flush().unwrap();
    assert_eq!(export.stream_position().unwrap(), data.len() as u64);

    export.seek(SeekFrom::Start(0)).unwrap();
    let back = dir.path().join("back.bin");
    let mut out = fs::File::create(&back).unwrap();
    assert_eq!(io::copy(&mut export, &mut out).unwrap(), MIB);
    drop(out);
    let back = fs::read(&back).unwrap();
    assert_eq!(&back[..data.len()], &data[..]);
    assert!(back[data.len()..].iter().all(|&b| b == 0));

    // Seek from the end and from the current position.
    assert_eq!(export.seek(SeekFrom::End(-10)).unwrap(), MIB - 10);
    let mut tail = Vec::new();
    export.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, vec![0; 10]);
    assert_eq!(export.seek(SeekFrom::End(-(MIB as i64))).unwrap(), 0);
    assert_eq!(export.seek(SeekFrom::Current(5)).unwrap(), 5);
    let mut five = [0u8; 5];
    export.read_exact(&mut five).unwrap();
    assert_eq!(five, data[5..10]);
    assert!(export.seek(SeekFrom::End(-(MIB as i64) - 1)).is_err());
    // Writes stop at the end of the export.
    export.seek(SeekFrom::End(-3)).unwrap();
    let err = export.write_all(b"abcdef").expect_err("write past the end");
    assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    export.seek(SeekFrom::End(-3)).unwrap();
    let mut end = Vec::new();
    export.read_to_end(&mut end).unwrap();
    assert_eq!(end, b"abc");

    export.into_inner().shutdown().unwrap();
    let whole = read_export(&server.uri());
    assert_eq!(&whole[..data.len()], &data[..]);
    assert_eq!(&whole[MIB as usize - 3..], b"abc");
}

#[test]
fn nbdinfo_json_of_eval_plugin_is_what_the_client_saw() {
    // A second look at flags nbdkit derives: a plugin that can zero quickly
    // but not cache, with FUA emulated by flush.
    let server = NbdkitBuilder::eval()
        .method("get_size", "echo 128K")
        .method(
            "pread",
            "dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        )
        .method("pwrite", "cat >/dev/null")
        .method("zero", "exit 0")
        .method("flush", "exit 0")
        .method("can_fua", "echo emulate")
        .method("can_fast_zero", "exit 0")
        .method("can_cache", "echo none")
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    let json = nbdinfo_json(&server.uri());
    assert_eq!(json_value(&json, "can_cache"), Some("false"), "{json}");
    assert!(flag(&got, "can_fua"));
    assert!(flag(&got, "can_fast_zero"));
    assert!(!flag(&got, "can_cache"));
    assert_matches_nbdinfo(&server.uri(), &got);
    client
        .pwrite(Bytes::from(vec![3; 1000]), 77, CmdFlags::FUA)
        .unwrap();
    client.zero(4096, 0, CmdFlags::FAST_ZERO).unwrap();
    client
        .zero(4096, 0, CmdFlags::FUA | CmdFlags::NO_HOLE)
        .unwrap();
    assert_errno(
        client.cache(4096, 0, CmdFlags::empty()),
        Errno::NotSup,
        "cache",
    );
    client.shutdown().unwrap();
}

/// A command timeout ends the blocking call with `ETIMEDOUT`; the late reply
/// is dropped when it comes (never matched to another command), so the
/// connection stays usable and in step.
#[test]
fn timeout_leaves_the_connection_usable() {
    let server = NbdkitBuilder::pattern(MIB)
        .filter("delay")
        .param("delay-read", "400ms")
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    client.set_command_timeout(Some(Duration::from_millis(50)));
    let err = client
        .pread(BytesMut::zeroed(4096), 8192, CmdFlags::empty())
        .expect_err("a read slower than the timeout");
    assert_eq!(err.errno(), Some(Errno::TimedOut), "{err:?}");
    assert_eq!(client.in_flight(), 0, "the timed-out read completed");
    client.set_command_timeout(None);
    assert_eq!(read(&mut client, 4096, 4096), pattern_at(4096, 4096));
    assert_eq!(read(&mut client, 0, 16), pattern_at(0, 16));
    client.shutdown().unwrap();
}

/// A server that dies fails the commands in flight and every later call,
/// without hanging.
#[test]
fn server_crash_fails_commands_without_hanging() {
    let mut server = NbdkitBuilder::pattern(MIB)
        .filter("delay")
        .param("delay-read", "10")
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    client.set_timeout(Some(Duration::from_secs(20)));
    let cookies: Vec<Cookie> = (0..4)
        .map(|i| {
            client
                .aio_pread(BytesMut::zeroed(512), i * 512, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    // Send them, then kill the server while they wait in its delay filter.
    while client.poll(Some(Duration::from_millis(10))).unwrap() {}
    server.kill();
    // Each wait must end with the connection's death, not with the 20 s
    // stall timeout (which `wait_for` would return as an error).
    for cookie in cookies {
        let done = client.wait_for(cookie).unwrap();
        let err = done.result.expect_err("the server died");
        assert_eq!(err.errno(), Errno::NotConn, "{err}");
    }
    assert_eq!(client.in_flight(), 0);
    let err = client
        .pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
        .expect_err("the connection is dead");
    assert_eq!(err.errno(), Some(Errno::NotConn), "{err}");
}
