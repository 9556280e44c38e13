//! The blocking client (`nbd-blocking`) against nbd-server, the reference
//! server, with several named exports from one config file.
//!
//! nbd-server 3.24 speaks fixed newstyle without structured replies, so every
//! reply here is a simple reply. Two of its quirks matter below:
//! - it answers `NBD_OPT_INFO` with export size 0 (only `NBD_OPT_GO` gives the
//!   real size), which nbdinfo shows as well; the tests compare with nbdinfo
//!   rather than assume either;
//! - it answers `NBD_OPT_ABORT` by closing the socket without the `ACK` the
//!   protocol asks for (a reset, on a Unix socket).

use std::collections::HashMap;
use std::fs;

use bytes::Bytes;
use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Config, Errno, Strict};
use nbd_tests::testkit::{
    assert_errno, assert_matches_nbdinfo, negotiated, read, run_workload, Rng, Workload,
};
use nbd_tests::{nbdinfo_list_json, read_export, NbdServerBuilder, NbdServerExport, ServerHandle};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn delta_bytes() -> Vec<u8> {
    b"reference server ".repeat(1000)
}

/// alpha: 1 MiB writable, nothing optional; beta: 2 MiB read-only; gamma:
/// 512 KiB with flush, FUA and trim; delta: fixed bytes, read-only.
fn four_exports() -> ServerHandle {
    NbdServerBuilder::new()
        .export("alpha", MIB)
        .export_with(NbdServerExport::new("beta", 2 * MIB).readonly())
        .export_with(
            NbdServerExport::new("gamma", 512 * KIB)
                .option("flush", "true")
                .option("fua", "true")
                .option("trim", "true"),
        )
        .export_with(NbdServerExport::with_bytes("delta", &delta_bytes()).readonly())
        .start()
}

/// `(name, size, is_read_only)` of each export `nbdinfo --list --json` shows.
fn nbdinfo_list(uri: &str) -> Vec<(String, u64, bool)> {
    let text = nbdinfo_list_json(uri);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array:\n{text}"))
        .iter()
        .map(|export| {
            (
                export["export-name"].as_str().unwrap().to_string(),
                export["export-size"].as_u64().unwrap(),
                export["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn opt_mode_lists_every_export_and_goes_to_one() {
    let server = four_exports();
    let config = Config::default().opt_mode(true);
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert!(client.connection().is_negotiating());
    assert_eq!(client.connection().protocol(), Some("newstyle-fixed"));

    let list = client.opt_list().unwrap();
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma", "delta"]);
    let theirs = nbdinfo_list(&server.uri());
    let their_names: Vec<&str> = theirs.iter().map(|(name, _, _)| name.as_str()).collect();
    assert_eq!(names, their_names);

    // opt_info per export: the same answers nbdinfo --list got (see the
    // module docs about the size).
    for (name, size, read_only) in &theirs {
        client.set_export_name(name).unwrap();
        client.opt_info().unwrap();
        assert!(client.connection().is_negotiating());
        assert_eq!(client.size().unwrap(), *size, "{name}");
        assert_eq!(
            client.connection().is_read_only().unwrap(),
            *read_only,
            "{name}"
        );
    }
    // A second list on the same connection gives the same names.
    let again = client.opt_list().unwrap();
    assert_eq!(again, list);

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
    assert!(client.connection().is_negotiating(), "{err}");
    assert!(!client.connection().is_ready());

    client.set_export_name("delta").unwrap();
    client.opt_go().unwrap();
    assert!(client.connection().is_ready());
    assert_eq!(client.size().unwrap(), delta_bytes().len() as u64);
    assert!(client.connection().is_read_only().unwrap());
    assert_eq!(read(&mut client, 0, 17), b"reference server ");
    client.shutdown().unwrap();
}

#[test]
fn handshake_and_flags_of_each_export_match_nbdinfo() {
    let server = four_exports();
    let expected = [
        ("alpha", MIB, false, false, false),
        ("beta", 2 * MIB, true, false, false),
        ("gamma", 512 * KIB, false, true, true),
        ("delta", delta_bytes().len() as u64, true, false, false),
    ];
    for (name, size, read_only, flush, trim) in expected {
        let uri = server.uri_for(name);
        let client = Client::connect_uri(&uri).unwrap();
        let got = negotiated(client.connection());
        assert_eq!(got.protocol, "newstyle-fixed", "{name}");
        assert!(!got.structured, "nbd-server has no structured replies");
        assert_eq!(got.size, size, "{name}");
        let c = client.connection();
        assert_eq!(c.is_read_only().unwrap(), read_only, "{name}");
        assert_eq!(c.can_flush().unwrap(), flush, "{name}");
        assert_eq!(c.can_fua().unwrap(), flush, "{name}");
        assert_eq!(c.can_trim().unwrap(), trim, "{name}");
        assert!(!c.can_df().unwrap(), "{name}: DF needs structured replies");
        assert_matches_nbdinfo(&uri, &got);
        client.shutdown().unwrap();
    }
}

#[test]
fn every_advertised_command_on_gamma() {
    let server = four_exports();
    let backing = server.backing_file_for("gamma").unwrap().to_path_buf();
    let mut client = Client::connect_uri(&server.uri_for("gamma")).unwrap();
    let mut rng = Rng::new(51);
    let data = rng.bytes(100_000);
    client
        .pwrite(Bytes::from(data.clone()), 1234, CmdFlags::empty())
        .unwrap();
    assert_eq!(read(&mut client, 1234, 100_000), data);
    let fua = rng.bytes(4096);
    client
        .pwrite(Bytes::from(fua.clone()), 200 * KIB, CmdFlags::FUA)
        .unwrap();
    assert_eq!(read(&mut client, 200 * KIB, 4096), fua);
    client.flush(CmdFlags::empty()).unwrap();
    // Writes reach the file once flushed.
    let file = fs::read(&backing).unwrap();
    assert_eq!(&file[1234..][..100_000], &data[..]);
    assert_eq!(&file[200 * KIB as usize..][..4096], &fua[..]);

    // Write zeroes reads back as zeroes, with and without NO_HOLE and FUA.
    assert!(client.connection().can_zero().unwrap());
    client.zero(10_000, 2000, CmdFlags::empty()).unwrap();
    client.zero(1000, 50_000, CmdFlags::NO_HOLE).unwrap();
    client.zero(4096, 200 * KIB, CmdFlags::FUA).unwrap();
    let mut expected = data.clone();
    expected[2000 - 1234..][..10_000].fill(0);
    expected[50_000 - 1234..][..1000].fill(0);
    assert_eq!(read(&mut client, 1234, 100_000), expected);
    assert_eq!(read(&mut client, 200 * KIB, 4096), vec![0; 4096]);

    // Trim succeeds (nbd-server does not promise zeroes: not checked).
    client.trim(64 * KIB, 256 * KIB, CmdFlags::empty()).unwrap();
    client.trim(4096, 320 * KIB, CmdFlags::FUA).unwrap();
    // Not advertised: refused by strict mode without a round trip.
    assert!(!client.connection().can_cache().unwrap());
    assert_errno(
        client.cache(4096, 0, CmdFlags::empty()),
        Errno::NotSup,
        "cache",
    );
    assert_errno(
        client.zero(4096, 0, CmdFlags::FAST_ZERO),
        Errno::NotSup,
        "fast zero",
    );
    client.shutdown().unwrap();

    // alpha advertises neither flush nor FUA.
    let mut alpha = Client::connect_uri(&server.uri()).unwrap();
    assert_errno(
        alpha.flush(CmdFlags::empty()),
        Errno::NotSup,
        "flush on alpha",
    );
    assert_errno(
        alpha.pwrite(Bytes::from_static(b"x"), 0, CmdFlags::FUA),
        Errno::NotSup,
        "FUA on alpha",
    );
    alpha
        .pwrite(Bytes::from_static(b"x"), 0, CmdFlags::empty())
        .unwrap();
    assert_eq!(read(&mut alpha, 0, 1), b"x");
    alpha.shutdown().unwrap();
}

#[test]
fn random_io_matches_model_file_and_nbdcopy() {
    let server = NbdServerBuilder::new()
        .export_with(NbdServerExport::new("disk", 2 * MIB).option("flush", "true"))
        .tcp()
        .start();
    let addr = server.tcp_addr().unwrap();
    // connect_tcp asks for the default export "", which this server lacks.
    match Client::connect_tcp(&addr.ip().to_string(), addr.port()) {
        Ok(_) => panic!("nbd-server has no export named \"\""),
        Err(err) => assert_eq!(err.errno(), Some(Errno::NoEnt), "{err}"),
    }
    let config = Config::default().export_name("disk");
    let mut client = Client::connect_tcp_with(&addr.ip().to_string(), addr.port(), config).unwrap();
    assert_eq!(client.size().unwrap(), 2 * MIB);
    let mut work = Workload::new(61, vec![0; 2 * MIB as usize], 1, 200 * KIB);
    run_workload(&mut client, &mut work, 250);

    // A batch of aio writes in flight at once, to disjoint places.
    let mut rng = Rng::new(62);
    let mut cookies = HashMap::new();
    for slot in 0..32u64 {
        let offset = slot * 64 * KIB + rng.below(1000);
        let len = rng.between(1, 60 * KIB) as usize;
        let data = rng.bytes(len);
        work.model[offset as usize..][..len].copy_from_slice(&data);
        let cookie = client
            .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
            .unwrap();
        cookies.insert(cookie, offset);
    }
    for (cookie, offset) in cookies {
        client
            .wait_for(cookie)
            .unwrap()
            .result
            .unwrap_or_else(|e| panic!("aio write at {offset}: {e}"));
    }
    client.flush(CmdFlags::empty()).unwrap();
    assert!(
        fs::read(server.backing_file().unwrap()).unwrap() == work.model,
        "the backing file differs from the model"
    );
    client.shutdown().unwrap();
    assert!(
        read_export(&server.uri()) == work.model,
        "nbdcopy sees other bytes"
    );
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let server = four_exports();
    let mut client = Client::connect_uri(&server.uri_for("beta")).unwrap();
    assert!(client.connection().is_read_only().unwrap());
    let err = assert_errno(
        client.pwrite(Bytes::from(vec![1; 512]), 0, CmdFlags::empty()),
        Errno::Perm,
        "write to a read-only export",
    );
    assert!(
        matches!(err, Error::Nbd(nbd_proto::Error::ReadOnly(_))),
        "{err:?}"
    );
    assert_eq!(read(&mut client, 0, 512), vec![0; 512]);

    // Sent anyway, the server refuses it with EPERM; the connection goes on.
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
    assert!(fs::read(server.backing_file_for("beta").unwrap())
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

/// `opt_abort` must end a negotiation quietly even when the server closes the
/// socket instead of acknowledging `NBD_OPT_ABORT`: the protocol tells clients
/// to expect that from older servers, and libnbd copes (`nbdinfo --list`
/// against nbd-server exits 0).
#[test]

fn opt_abort_tolerates_a_server_that_just_closes() {
    let server = four_exports();
    let config = Config::default().opt_mode(true);
    let client = Client::connect_uri_with(&server.uri(), config.clone()).unwrap();
    if let Err(e) = client.opt_abort() {
        panic!("opt_abort right after the greeting: {e:?}");
    }
    let mut client = Client::connect_uri_with(&server.uri(), config).unwrap();
    assert_eq!(client.opt_list().unwrap().len(), 4);
    if let Err(e) = client.shutdown() {
        panic!("shutdown (which aborts) while negotiating: {e:?}");
    }
}
