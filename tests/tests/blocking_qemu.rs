//! The blocking client (`nbd-blocking`) against qemu-nbd serving raw and
//! qcow2 images, writable and read-only.
//!
//! Final contents are cross-checked with `qemu-img compare` (the image and the
//! NBD export against a raw file holding the test's model) and with libnbd's
//! `nbdcopy`. qemu-nbd serves one client at a time unless told otherwise, so
//! every server here is started with `--shared` to let nbdinfo and nbdcopy in
//! while the client is connected.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Config, Cookie, Errno, ReadChunk, Strict};
use nbd_tests::testkit::{
    assert_errno, assert_matches_nbdinfo, negotiated, read, run_workload, Rng, Workload,
};
use nbd_tests::{qemu_img_compare, read_export, ImageFormat, QemuNbdBuilder, ServerHandle};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Writes `model` to a raw file next to the server and checks with
/// `qemu-img compare` that the export (over NBD) and, when given, the image
/// file hold the same guest-visible bytes.
fn compare_with_qemu_img(server: &ServerHandle, model: &[u8]) {
    let expected = server.dir().join("model.raw");
    fs::write(&expected, model).unwrap();
    assert!(
        qemu_img_compare(&expected, server.uri()),
        "qemu-img compare: the export differs from the model"
    );
    let image: &Path = server.backing_file().unwrap();
    assert!(
        qemu_img_compare(&expected, image),
        "qemu-img compare: the image file differs from the model"
    );
}

/// Handshake, flags and every advertised command, then a random workload,
/// on a writable image of `format`.
fn writable_image(format: ImageFormat, seed: u64) {
    let server = QemuNbdBuilder::new(format, 4 * MIB)
        .export_name("disk")
        .shared(4)
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert_eq!(got.protocol, "newstyle-fixed");
    assert!(got.structured, "qemu-nbd offers structured replies");
    assert_eq!(got.size, 4 * MIB);
    assert_eq!(got.block_sizes, Some((1, 4096, 32 * MIB as u32)));
    let c = client.connection();
    assert!(!c.is_read_only().unwrap());
    assert!(c.can_flush().unwrap() && c.can_fua().unwrap());
    assert!(c.can_trim().unwrap() && c.can_zero().unwrap());
    assert!(c.can_cache().unwrap() && c.can_df().unwrap());
    assert_matches_nbdinfo(&server.uri(), &got);

    let mut work = Workload::new(seed, vec![0; 4 * MIB as usize], 1, 300 * KIB);
    run_workload(&mut client, &mut work, 150);

    // FUA writes read back.
    let data = Rng::new(seed + 1).bytes(70_000);
    work.model[1_000_003..][..data.len()].copy_from_slice(&data);
    client
        .pwrite(Bytes::from(data.clone()), 1_000_003, CmdFlags::FUA)
        .unwrap();
    assert_eq!(read(&mut client, 1_000_003, data.len() as u64), data);

    // Write zeroes with every flag the server takes: always zeroes after.
    let mut zero_flags = vec![CmdFlags::empty(), CmdFlags::NO_HOLE, CmdFlags::FUA];
    if client.connection().can_fast_zero().unwrap() {
        zero_flags.push(CmdFlags::FAST_ZERO);
    }
    for (i, flags) in zero_flags.into_iter().enumerate() {
        let offset = 2 * MIB + i as u64 * 100 * KIB + 17;
        let len = 64 * KIB + 3;
        // FAST_ZERO may be refused (ENOTSUP) when zeroing would be slow; the
        // protocol lets the server do so, and then nothing changed.
        match client.zero(len, offset, flags) {
            Ok(()) => work.model[offset as usize..][..len as usize].fill(0),
            Err(e) if flags == CmdFlags::FAST_ZERO => {
                assert_eq!(e.errno(), Some(Errno::NotSup), "{e}")
            }
            Err(e) => panic!("zero with {flags:?}: {e}"),
        }
        assert!(
            read(&mut client, offset - 17, len + 40)
                == work.model[(offset - 17) as usize..][..(len + 40) as usize],
            "zero with {flags:?}"
        );
    }

    // Trim succeeds; qemu does not promise zeroes afterwards, so the region is
    // written again and only that is checked.
    client.trim(256 * KIB, 3 * MIB, CmdFlags::empty()).unwrap();
    client.trim(4 * KIB, 3 * MIB, CmdFlags::FUA).unwrap();
    let again = Rng::new(seed + 2).bytes(256 * KIB as usize);
    work.model[3 * MIB as usize..][..again.len()].copy_from_slice(&again);
    client
        .pwrite(Bytes::from(again), 3 * MIB, CmdFlags::empty())
        .unwrap();

    client.cache(MIB, 0, CmdFlags::empty()).unwrap();
    let (buf, _) = client
        .pread_structured(BytesMut::zeroed(64 * KIB as usize), 5, CmdFlags::DF)
        .unwrap();
    assert!(buf[..] == work.model[5..][..64 * KIB as usize]);
    client.flush(CmdFlags::empty()).unwrap();
    client.shutdown().unwrap();

    assert!(
        read_export(&server.uri()) == work.model,
        "nbdcopy sees other bytes"
    );
    compare_with_qemu_img(&server, &work.model);
}

#[test]
fn raw_writable_every_command_and_random_io() {
    writable_image(ImageFormat::Raw, 11);
}

#[test]
fn qcow2_writable_every_command_and_random_io() {
    writable_image(ImageFormat::Qcow2, 12);
}

fn read_only_image(format: ImageFormat) {
    let data = Rng::new(21).bytes(MIB as usize);
    let server = QemuNbdBuilder::from_bytes(format, &data)
        .read_only()
        .export_name("ro")
        .shared(4)
        .start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let got = negotiated(client.connection());
    assert_eq!(got.size, MIB);
    assert!(client.connection().is_read_only().unwrap());
    assert!(!client.connection().can_trim().unwrap());
    assert_matches_nbdinfo(&server.uri(), &got);

    let mut rng = Rng::new(22);
    for _ in 0..40 {
        let offset = rng.below(MIB);
        let len = rng.between(1, (MIB - offset).min(128 * KIB));
        assert!(
            read(&mut client, offset, len) == data[offset as usize..][..len as usize],
            "{len} bytes at {offset}"
        );
    }

    // Strict mode refuses writes before sending them...
    let err = assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        Errno::Perm,
        "write to a read-only export",
    );
    assert!(
        matches!(err, Error::Nbd(nbd_proto::Error::ReadOnly(_))),
        "{err:?}"
    );
    // ...and without it qemu-nbd refuses them itself. qemu 10 answers EINVAL
    // (not EPERM) with the message "Export is read-only" in a structured
    // error chunk; libnbd sees the same EINVAL.
    client.connection_mut().set_strict_mode(Strict::empty());
    let err = assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        Errno::Inval,
        "write sent to a read-only export",
    );
    match &err {
        Error::Nbd(nbd_proto::Error::Server {
            message: Some(message),
            ..
        }) => assert!(message.0.contains("read-only"), "{err}"),
        other => panic!("expected the server's error with its message: {other:?}"),
    }
    assert!(client.connection().is_ready());
    assert_eq!(read(&mut client, 0, 512), &data[..512]);
    client.shutdown().unwrap();

    assert!(read_export(&server.uri()) == data);
    compare_with_qemu_img(&server, &data);
}

#[test]
fn raw_read_only() {
    read_only_image(ImageFormat::Raw);
}

#[test]
fn qcow2_read_only() {
    read_only_image(ImageFormat::Qcow2);
}

#[test]
fn opt_mode_description_missing_export_then_good_one() {
    let server = QemuNbdBuilder::raw(MIB)
        .export_name("disk")
        .arg("--description=my disk")
        .shared(4)
        .start();
    let config = Config::default().opt_mode(true).full_info(true);
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert!(client.connection().is_negotiating());
    let list = client.opt_list().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].name, "disk");
    assert_eq!(list[0].description, "my disk");

    client.set_export_name("nope").unwrap();
    let err = assert_errno(
        client.opt_info(),
        Errno::NoEnt,
        "opt_info of a missing export",
    );
    assert!(client.connection().is_negotiating(), "{err}");
    let err = assert_errno(client.opt_go(), Errno::NoEnt, "opt_go of a missing export");
    assert!(
        matches!(err, Error::Nbd(nbd_proto::Error::OptionRefused { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("nope"),
        "the server's message names the export: {err}"
    );
    assert!(client.connection().is_negotiating());

    client.set_export_name("disk").unwrap();
    client.opt_info().unwrap();
    assert_eq!(client.size().unwrap(), MIB);
    assert_eq!(client.connection().description(), Some("my disk"));
    client.opt_go().unwrap();
    assert!(client.connection().is_ready());
    assert_eq!(client.connection().canonical_name(), Some("disk"));
    assert_eq!(client.connection().description(), Some("my disk"));
    client
        .pwrite(Bytes::from_static(b"after go"), 100, CmdFlags::empty())
        .unwrap();
    assert_eq!(read(&mut client, 100, 8), b"after go");
    client.shutdown().unwrap();

    // Without opt mode, asking for a missing export fails the connection with
    // the same error kind.
    let err = match Client::connect_uri(&server.uri_for("nope")) {
        Ok(_) => panic!("connected to a missing export"),
        Err(err) => err,
    };
    assert_eq!(err.errno(), Some(Errno::NoEnt), "{err}");
}

/// Reads over holes of a sparse qcow2: structured replies may describe them
/// as hole chunks, and the client must zero those parts of the buffer.
#[test]
fn structured_reads_over_holes_are_zero_filled() {
    let server = QemuNbdBuilder::qcow2(2 * MIB).shared(4).start();
    let mut client = Client::connect_uri(&server.uri()).unwrap();
    let data = Rng::new(31).bytes(64 * KIB as usize);
    client
        .pwrite(Bytes::from(data.clone()), 512 * KIB, CmdFlags::empty())
        .unwrap();
    // Garbage in the buffer: every byte must be overwritten by data or zeroes.
    let buf = BytesMut::from(&vec![0xA5; MIB as usize][..]);
    let (buf, chunks) = client.pread_structured(buf, 0, CmdFlags::empty()).unwrap();
    let mut expected = vec![0u8; MIB as usize];
    expected[512 * KIB as usize..][..data.len()].copy_from_slice(&data);
    assert!(
        buf[..] == expected[..],
        "holes not zero-filled or data misplaced"
    );
    let mut covered = vec![false; MIB as usize];
    let mut holes = 0;
    for chunk in &chunks {
        let (offset, length) = match chunk {
            ReadChunk::Data { offset, length, .. } => (*offset, *length),
            ReadChunk::Hole { offset, length, .. } => {
                holes += 1;
                (*offset, *length)
            }
            other => panic!("not a data or hole chunk: {other:?} in {chunks:?}"),
        };
        for at in offset..offset + length {
            assert!(!covered[at as usize], "byte {at} covered twice: {chunks:?}");
            covered[at as usize] = true;
        }
    }
    assert!(
        covered.iter().all(|&c| c),
        "not every byte covered: {chunks:?}"
    );
    assert!(holes > 0, "qemu-nbd sent no hole chunk: {chunks:?}");
    // With DF the whole read comes back as one chunk.
    let (buf, chunks) = client
        .pread_structured(BytesMut::zeroed(MIB as usize), 0, CmdFlags::DF)
        .unwrap();
    assert!(buf[..] == expected[..]);
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    client.shutdown().unwrap();
}

#[test]
fn many_commands_in_flight_over_tcp() {
    let server = QemuNbdBuilder::raw(4 * MIB).tcp().shared(4).start();
    let addr = server.tcp_addr().unwrap();
    let mut client = Client::connect_tcp(&addr.ip().to_string(), addr.port()).unwrap();
    assert_eq!(client.size().unwrap(), 4 * MIB);
    let mut rng = Rng::new(41);
    let mut model = vec![0u8; 4 * MIB as usize];
    let mut writes = HashMap::new();
    for slot in 0..64u64 {
        let offset = slot * 64 * KIB + rng.below(1000);
        let len = rng.between(1, 60 * KIB) as usize;
        let data = rng.bytes(len);
        model[offset as usize..][..len].copy_from_slice(&data);
        let flags = if slot % 4 == 0 {
            CmdFlags::FUA
        } else {
            CmdFlags::empty()
        };
        let cookie = client.aio_pwrite(Bytes::from(data), offset, flags).unwrap();
        writes.insert(cookie, offset);
    }
    let flush = client.aio_flush(CmdFlags::empty()).unwrap();
    assert_eq!(client.in_flight(), 65);
    // wait_for picks the flush out, whatever order the rest completes in.
    client.wait_for(flush).unwrap().result.unwrap();
    while !writes.is_empty() {
        match client.next_completion() {
            Some(done) => {
                assert!(writes.remove(&done.cookie).is_some());
                done.result.unwrap();
            }
            None => {
                client.poll(Some(Duration::from_secs(10))).unwrap();
            }
        }
    }
    let reads: Vec<(Cookie, u64)> = (0..64u64)
        .map(|part| {
            let offset = part * 64 * KIB;
            let cookie = client
                .aio_pread(
                    BytesMut::zeroed(64 * KIB as usize),
                    offset,
                    CmdFlags::empty(),
                )
                .unwrap();
            (cookie, offset)
        })
        .collect();
    // Taken in reverse submission order with wait_for.
    for (cookie, offset) in reads.into_iter().rev() {
        let done = client.wait_for(cookie).unwrap();
        done.result.unwrap();
        assert!(
            done.buffer.unwrap()[..] == model[offset as usize..][..64 * KIB as usize],
            "read at {offset}"
        );
    }
    assert_eq!(client.in_flight(), 0);
    client.shutdown().unwrap();
    assert!(read_export(&server.uri()) == model);
}
