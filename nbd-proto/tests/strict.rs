//! Strict mode: every check made before a command is sent, each bit on and off.
//! On a violation the call fails at once and nothing reaches the output.

mod support;

use bytes::{Bytes, BytesMut};
use nbd_proto::wire::consts::*;
use nbd_proto::{CmdFlags, Connection, Errno, Error, Strict, MAX_REQUEST_SIZE};
use support::*;

const SIZE: u64 = 1 << 20;

fn export(flags: u16) -> Export {
    Export {
        size: SIZE,
        flags,
        block_sizes: None,
        structured: true,
        extended: false,
    }
}

/// Asserts `result` failed with `errno` and nothing was queued for the server.
#[track_caller]
fn refused<T: std::fmt::Debug>(
    conn: &mut Connection,
    call: impl FnOnce(&mut Connection) -> Result<T, Error>,
    errno: Errno,
) -> Error {
    let in_flight = conn.in_flight();
    let e = call(conn).expect_err("the call should be refused");
    assert_eq!(e.errno(), errno, "{e:?}");
    assert!(!conn.wants_write(), "nothing may be sent on a violation");
    assert!(conn.take_output().is_empty());
    assert_eq!(conn.in_flight(), in_flight);
    assert!(
        conn.is_ready(),
        "a refused call does not hurt the connection"
    );
    e
}

/// Asserts `result` succeeded and the one request sent has this command and flags.
#[track_caller]
fn sent<T: std::fmt::Debug>(
    conn: &mut Connection,
    call: impl FnOnce(&mut Connection) -> Result<T, Error>,
    command: u16,
    flags: u16,
) {
    call(conn).expect("the call should go through");
    let req = sent_request(conn);
    assert_eq!(req.header.command, command);
    assert_eq!(req.header.flags, flags);
}

fn data(len: usize) -> Bytes {
    Bytes::from(vec![0x5a; len])
}

#[test]
fn strict_commands_refuses_commands_the_server_did_not_advertise() {
    let mut conn = ready(export(FLAG_HAS_FLAGS));
    assert_eq!(conn.strict_mode(), Strict::all());
    let e = refused(&mut conn, |c| c.flush(CmdFlags::empty()), Errno::NotSup);
    assert!(matches!(e, Error::NotSupported(_)));
    refused(
        &mut conn,
        |c| c.trim(512, 0, CmdFlags::empty()),
        Errno::NotSup,
    );
    refused(
        &mut conn,
        |c| c.zero(512, 0, CmdFlags::empty()),
        Errno::NotSup,
    );
    refused(
        &mut conn,
        |c| c.cache(512, 0, CmdFlags::empty()),
        Errno::NotSup,
    );
    // Reads and writes need no flag.
    sent(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::empty()),
        CMD_WRITE,
        0,
    );
}

#[test]
fn strict_commands_off_sends_unadvertised_commands() {
    let mut conn = ready_strict(export(FLAG_HAS_FLAGS), Strict::all() - Strict::COMMANDS);
    sent(&mut conn, |c| c.flush(CmdFlags::empty()), CMD_FLUSH, 0);
    sent(
        &mut conn,
        |c| c.trim(512, 0, CmdFlags::empty()),
        CMD_TRIM,
        0,
    );
    sent(
        &mut conn,
        |c| c.zero(512, 0, CmdFlags::empty()),
        CMD_WRITE_ZEROES,
        0,
    );
    sent(
        &mut conn,
        |c| c.cache(512, 0, CmdFlags::empty()),
        CMD_CACHE,
        0,
    );
}

#[test]
fn strict_commands_refuses_writes_to_a_read_only_export() {
    let mut conn = ready(export(ALL_FLAGS | FLAG_READ_ONLY));
    let e = refused(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::empty()),
        Errno::Perm,
    );
    assert!(matches!(e, Error::ReadOnly(_)));
    refused(
        &mut conn,
        |c| c.trim(512, 0, CmdFlags::empty()),
        Errno::Perm,
    );
    refused(
        &mut conn,
        |c| c.zero(512, 0, CmdFlags::empty()),
        Errno::Perm,
    );
    // Reads, flush and cache are fine.
    sent(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(&mut conn, |c| c.flush(CmdFlags::empty()), CMD_FLUSH, 0);
    sent(
        &mut conn,
        |c| c.cache(512, 0, CmdFlags::empty()),
        CMD_CACHE,
        0,
    );

    let mut conn = ready_strict(
        export(ALL_FLAGS | FLAG_READ_ONLY),
        Strict::all() - Strict::COMMANDS,
    );
    sent(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::empty()),
        CMD_WRITE,
        0,
    );
    sent(
        &mut conn,
        |c| c.trim(512, 0, CmdFlags::empty()),
        CMD_TRIM,
        0,
    );
}

#[test]
fn strict_flags_refuses_flags_invalid_for_the_command() {
    let mut conn = ready(export(ALL_FLAGS));
    let e = refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::FUA),
        Errno::Inval,
    );
    assert!(matches!(e, Error::InvalidArgument(_)));
    refused(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::DF),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::NO_HOLE),
        Errno::Inval,
    );
    refused(&mut conn, |c| c.flush(CmdFlags::FUA), Errno::Inval);
    refused(
        &mut conn,
        |c| c.trim(512, 0, CmdFlags::NO_HOLE),
        Errno::Inval,
    );
    refused(&mut conn, |c| c.cache(512, 0, CmdFlags::FUA), Errno::Inval);
    refused(&mut conn, |c| c.zero(512, 0, CmdFlags::DF), Errno::Inval);
    refused(
        &mut conn,
        |c| c.zero(512, 0, CmdFlags::REQ_ONE),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::from_bits_retain(1 << 12)),
        Errno::Inval,
    );
    // Every allowed combination goes through with its bits on the wire.
    sent(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::DF),
        CMD_READ,
        CMD_FLAG_DF,
    );
    sent(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::FUA),
        CMD_WRITE,
        CMD_FLAG_FUA,
    );
    sent(
        &mut conn,
        |c| c.trim(512, 0, CmdFlags::FUA),
        CMD_TRIM,
        CMD_FLAG_FUA,
    );
    let all_zero = CmdFlags::FUA | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO;
    sent(
        &mut conn,
        |c| c.zero(512, 0, all_zero),
        CMD_WRITE_ZEROES,
        all_zero.bits(),
    );
}

#[test]
fn strict_flags_refuses_flags_the_server_did_not_advertise() {
    let mut conn = ready(export(
        FLAG_HAS_FLAGS | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_TRIM,
    ));
    refused(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::FUA),
        Errno::NotSup,
    );
    refused(&mut conn, |c| c.trim(512, 0, CmdFlags::FUA), Errno::NotSup);
    refused(
        &mut conn,
        |c| c.zero(512, 0, CmdFlags::FAST_ZERO),
        Errno::NotSup,
    );
    refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::DF),
        Errno::NotSup,
    );
    // DF needs structured replies as well as SEND_DF.
    let mut conn = ready(Export {
        structured: false,
        ..export(ALL_FLAGS)
    });
    let e = refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::DF),
        Errno::NotSup,
    );
    assert!(matches!(e, Error::NotSupported(_)));
}

#[test]
fn strict_flags_off_sends_any_flags() {
    let mut conn = ready_strict(
        Export {
            structured: false,
            ..export(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)
        },
        Strict::all() - Strict::FLAGS,
    );
    sent(
        &mut conn,
        |c| c.pread(buffer(512, 0), 0, CmdFlags::FUA | CmdFlags::DF),
        CMD_READ,
        CMD_FLAG_FUA | CMD_FLAG_DF,
    );
    sent(
        &mut conn,
        |c| c.flush(CmdFlags::FUA),
        CMD_FLUSH,
        CMD_FLAG_FUA,
    );
    sent(
        &mut conn,
        |c| c.pwrite(data(512), 0, CmdFlags::from_bits_retain(0x8000)),
        CMD_WRITE,
        0x8000,
    );
}

#[test]
fn strict_bounds_refuses_requests_beyond_the_export() {
    let mut conn = ready(export(ALL_FLAGS));
    refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), SIZE - 256, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pread(buffer(1, 0), SIZE, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pwrite(data(1), SIZE + 512, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.trim(1024, SIZE - 512, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.zero(1, u64::MAX, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.cache(u64::from(u32::MAX), SIZE, CmdFlags::empty()),
        Errno::Inval,
    );
    // offset + length overflowing u64.
    let e = refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), u64::MAX - 100, CmdFlags::empty()),
        Errno::Inval,
    );
    assert!(matches!(e, Error::InvalidArgument(_)));
    refused(
        &mut conn,
        |c| c.trim(512, u64::MAX - 100, CmdFlags::empty()),
        Errno::Inval,
    );
    // Up to the very end is fine.
    sent(
        &mut conn,
        |c| c.pread(buffer(512, 0), SIZE - 512, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(
        &mut conn,
        |c| c.trim(SIZE, 0, CmdFlags::empty()),
        CMD_TRIM,
        0,
    );
    // Flush has no range.
    sent(&mut conn, |c| c.flush(CmdFlags::empty()), CMD_FLUSH, 0);
}

#[test]
fn strict_bounds_off_sends_requests_beyond_the_export() {
    let mut conn = ready_strict(export(ALL_FLAGS), Strict::all() - Strict::BOUNDS);
    let cookie = conn.pread(buffer(512, 0), SIZE, CmdFlags::empty()).unwrap();
    let req = sent_request(&mut conn);
    assert_eq!((req.header.offset, req.header.length), (SIZE, 512));
    sent(
        &mut conn,
        |c| c.trim(4096, SIZE * 2, CmdFlags::empty()),
        CMD_TRIM,
        0,
    );
    // The server's answer is still checked against the request.
    feed(
        &mut conn,
        &Script::new()
            .error_chunk(cookie, EINVAL, "beyond", Some(SIZE), true)
            .take(),
    );
    let c = one_completion(&mut conn);
    assert_eq!(c.result.unwrap_err().errno(), Errno::Inval);
}

#[test]
fn requests_whose_range_overflows_u64_are_refused_even_without_strict_bounds() {
    let mut conn = ready_strict(export(ALL_FLAGS), Strict::empty());
    refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), u64::MAX - 100, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pwrite(data(512), u64::MAX - 100, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.trim(512, u64::MAX - 100, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.zero(512, u64::MAX, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.cache(2, u64::MAX, CmdFlags::empty()),
        Errno::Inval,
    );
    // Ending exactly at 2^64 does not overflow the range.
    sent(
        &mut conn,
        |c| c.pread(buffer(100, 0), u64::MAX - 100, CmdFlags::empty()),
        CMD_READ,
        0,
    );
}

#[test]
fn read_at_the_top_of_the_offset_space_without_strict_checks_completes() {
    // Zero-length at u64::MAX and a read ending at 2^64: replies are still checked
    // without arithmetic overflow.
    let mut conn = ready_strict(export(ALL_FLAGS), Strict::empty());
    let empty = conn
        .pread(buffer(0, 0), u64::MAX, CmdFlags::empty())
        .unwrap();
    let top = conn
        .pread(buffer(100, 0xff), u64::MAX - 100, CmdFlags::empty())
        .unwrap();
    let trim = conn.trim(0, u64::MAX, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .error_chunk(empty, EIO, "", Some(u64::MAX), true)
            .hole(top, u64::MAX - 100, 100, true)
            .error_chunk(trim, EIO, "", Some(u64::MAX), true)
            .take(),
    );
    let done = completions_by_cookie(drain(&mut conn));
    assert_eq!(done.len(), 3);
    assert!(done[&top].result.is_ok());
    assert!(done[&top].buffer.as_ref().unwrap().iter().all(|&b| b == 0));
    // The error offsets are inside the (empty) requests: the server's error stands.
    for cookie in [empty, trim] {
        assert_eq!(
            done[&cookie].result,
            Err(Error::Server {
                errno: Errno::Io,
                message: None
            })
        );
    }
    assert!(conn.is_ready());
}

#[test]
fn strict_zero_size_refuses_empty_requests() {
    let mut conn = ready(export(ALL_FLAGS));
    refused(
        &mut conn,
        |c| c.pread(BytesMut::new(), 0, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pwrite(Bytes::new(), 0, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(&mut conn, |c| c.trim(0, 0, CmdFlags::empty()), Errno::Inval);
    refused(&mut conn, |c| c.zero(0, 0, CmdFlags::empty()), Errno::Inval);
    refused(
        &mut conn,
        |c| c.cache(0, 0, CmdFlags::empty()),
        Errno::Inval,
    );
    // Flush is always zero-sized.
    sent(&mut conn, |c| c.flush(CmdFlags::empty()), CMD_FLUSH, 0);

    let mut conn = ready_strict(export(ALL_FLAGS), Strict::all() - Strict::ZERO_SIZE);
    sent(
        &mut conn,
        |c| c.pread(BytesMut::new(), 0, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(
        &mut conn,
        |c| c.pwrite(Bytes::new(), 0, CmdFlags::empty()),
        CMD_WRITE,
        0,
    );
    sent(&mut conn, |c| c.trim(0, 0, CmdFlags::empty()), CMD_TRIM, 0);
}

fn blocky() -> Export {
    Export {
        block_sizes: Some((512, 4096, 64 * 1024)),
        ..export(ALL_FLAGS)
    }
}

#[test]
fn strict_align_refuses_requests_not_aligned_to_the_minimum_block_size() {
    let mut conn = ready(blocky());
    assert!(conn.block_sizes().is_some());
    refused(
        &mut conn,
        |c| c.pread(buffer(512, 0), 100, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pread(buffer(100, 0), 512, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.pwrite(data(513), 0, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.trim(512, 1, CmdFlags::empty()),
        Errno::Inval,
    );
    refused(
        &mut conn,
        |c| c.zero(1000, 0, CmdFlags::empty()),
        Errno::Inval,
    );
    sent(
        &mut conn,
        |c| c.pread(buffer(1024, 0), 512, CmdFlags::empty()),
        CMD_READ,
        0,
    );

    let mut conn = ready_strict(blocky(), Strict::all() - Strict::ALIGN);
    sent(
        &mut conn,
        |c| c.pread(buffer(100, 0), 3, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(&mut conn, |c| c.trim(1, 1, CmdFlags::empty()), CMD_TRIM, 0);
}

#[test]
fn strict_payload_refuses_reads_and_writes_above_the_maximum_block_size() {
    let mut conn = ready(blocky());
    let e = refused(
        &mut conn,
        |c| c.pread(buffer(128 * 1024, 0), 0, CmdFlags::empty()),
        Errno::Range,
    );
    assert!(matches!(e, Error::TooLarge(_)));
    refused(
        &mut conn,
        |c| c.pwrite(data(64 * 1024 + 512), 0, CmdFlags::empty()),
        Errno::Range,
    );
    // The maximum itself is fine, and commands without a payload are not limited.
    sent(
        &mut conn,
        |c| c.pread(buffer(64 * 1024, 0), 0, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(
        &mut conn,
        |c| c.trim(512 * 1024, 0, CmdFlags::empty()),
        CMD_TRIM,
        0,
    );
    sent(
        &mut conn,
        |c| c.zero(512 * 1024, 0, CmdFlags::empty()),
        CMD_WRITE_ZEROES,
        0,
    );

    let mut conn = ready_strict(blocky(), Strict::all() - Strict::PAYLOAD);
    sent(
        &mut conn,
        |c| c.pread(buffer(128 * 1024, 0), 0, CmdFlags::empty()),
        CMD_READ,
        0,
    );
    sent(
        &mut conn,
        |c| c.pwrite(data(128 * 1024), 0, CmdFlags::empty()),
        CMD_WRITE,
        0,
    );
}

#[test]
fn requests_over_64_mib_are_always_refused() {
    assert_eq!(MAX_REQUEST_SIZE, 64 << 20);
    let big = Export {
        size: 1 << 40,
        ..export(ALL_FLAGS)
    };
    let mut conn = ready_strict(big, Strict::empty());
    let over = (MAX_REQUEST_SIZE + 1) as usize;
    let e = refused(
        &mut conn,
        |c| c.pread(buffer(over, 0), 0, CmdFlags::empty()),
        Errno::Range,
    );
    assert!(matches!(e, Error::TooLarge(_)));
    refused(
        &mut conn,
        |c| c.pwrite(Bytes::from(vec![0; over]), 0, CmdFlags::empty()),
        Errno::Range,
    );
    // Commands without payload go up to the 32-bit length field.
    sent(
        &mut conn,
        |c| c.trim(u64::from(u32::MAX), 0, CmdFlags::empty()),
        CMD_TRIM,
        0,
    );
    refused(
        &mut conn,
        |c| c.trim(1 << 32, 0, CmdFlags::empty()),
        Errno::Range,
    );
    refused(
        &mut conn,
        |c| c.zero(1 << 32, 0, CmdFlags::empty()),
        Errno::Range,
    );
    // 64 MiB itself is allowed.
    let exact = MAX_REQUEST_SIZE as usize;
    let cookie = conn.pread(buffer(exact, 0), 0, CmdFlags::empty()).unwrap();
    let req = sent_request(&mut conn);
    assert_eq!(req.header.length, MAX_REQUEST_SIZE);
    assert_eq!(req.cookie(), cookie);
}

#[test]
fn strict_mode_can_change_at_any_time() {
    let mut conn = ready(export(FLAG_HAS_FLAGS));
    refused(&mut conn, |c| c.flush(CmdFlags::empty()), Errno::NotSup);
    conn.set_strict_mode(Strict::empty());
    assert_eq!(conn.strict_mode(), Strict::empty());
    sent(&mut conn, |c| c.flush(CmdFlags::empty()), CMD_FLUSH, 0);
    conn.set_strict_mode(Strict::COMMANDS);
    refused(&mut conn, |c| c.flush(CmdFlags::empty()), Errno::NotSup);
}
