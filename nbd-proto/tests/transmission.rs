//! Transmission: every command's request on the wire, simple and structured
//! replies, many commands in flight, and the zero-copy paths in both directions.

mod support;

use std::collections::HashSet;
use std::io::IoSlice;

use bytes::Bytes;
use nbd_proto::wire::consts::*;
use nbd_proto::wire::RequestHeader;
use nbd_proto::{CmdFlags, Cookie, Direction, Errno, Error, Event, ReadChunk, ServerText, Strict};
use support::*;

fn header(flags: u16, command: u16, cookie: Cookie, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        command,
        cookie: cookie.get(),
        offset,
        length,
    }
}

#[test]
fn pread_sends_the_exact_request_and_a_simple_reply_fills_the_buffer() {
    let mut conn = ready(Export::simple());
    assert_eq!(conn.direction(), Direction::Read);
    let cookie = conn
        .pread(buffer(4096, 0xff), 8192, CmdFlags::empty())
        .unwrap();
    assert_ne!(cookie.get(), 0);
    assert_eq!(conn.direction(), Direction::Both);
    assert_eq!(conn.in_flight(), 1);
    assert!(conn.is_in_flight(cookie));
    let req = sent_request(&mut conn);
    assert_eq!(req.header, header(0, CMD_READ, cookie, 8192, 4096));
    assert!(req.payload.is_empty());
    assert_eq!(conn.direction(), Direction::Read);

    let data = pattern(4096, 1);
    feed(&mut conn, &Script::new().simple(cookie, 0, &data).take());
    let c = one_completion(&mut conn);
    assert_eq!(c.cookie, cookie);
    assert!(c.result.is_ok());
    assert_eq!(&c.buffer.unwrap()[..], &data[..]);
    assert_eq!(conn.in_flight(), 0);
    assert!(!conn.is_in_flight(cookie));
}

#[test]
fn pread_with_df_sets_the_flag_on_the_wire() {
    let mut conn = ready(Export::default());
    assert!(conn.can_df().unwrap());
    let cookie = conn.pread(buffer(512, 0), 0, CmdFlags::DF).unwrap();
    let req = sent_request(&mut conn);
    assert_eq!(req.header, header(CMD_FLAG_DF, CMD_READ, cookie, 0, 512));
}

#[test]
fn pwrite_sends_header_then_payload_with_fua() {
    let mut conn = ready(Export::default());
    let data = pattern(1000, 9);
    let cookie = conn
        .pwrite(Bytes::from(data.clone()), 24, CmdFlags::FUA)
        .unwrap();
    let req = sent_request(&mut conn);
    assert_eq!(
        req.header,
        header(CMD_FLAG_FUA, CMD_WRITE, cookie, 24, 1000)
    );
    assert_eq!(req.payload, data);
    feed(&mut conn, &Script::new().simple(cookie, 0, &[]).take());
    let c = one_completion(&mut conn);
    assert!(c.result.is_ok());
    assert!(c.buffer.is_none());
}

#[test]
fn write_payload_goes_out_as_the_callers_memory() {
    let mut conn = ready(Export::default());
    let payload = Bytes::from(pattern(64 * 1024, 3));
    let first = conn.pwrite(payload.clone(), 0, CmdFlags::empty()).unwrap();
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    let second = Bytes::from(pattern(100, 4));
    let third = conn
        .pwrite(second.clone(), 65536, CmdFlags::empty())
        .unwrap();
    {
        let mut iov = [IoSlice::new(&[]); 8];
        let n = conn.output(&mut iov);
        // header | payload | flush header + write header | payload
        assert_eq!(n, 4);
        assert_eq!(iov[0].len(), REQUEST_LEN);
        assert_eq!(iov[1].as_ptr(), payload.as_ptr(), "zero-copy payload");
        assert_eq!(iov[1].len(), payload.len());
        assert_eq!(iov[2].len(), 2 * REQUEST_LEN);
        assert_eq!(iov[3].as_ptr(), second.as_ptr(), "zero-copy payload");
    }
    // A partial write keeps the rest in place: the unsent part of the payload is
    // still the caller's memory.
    conn.notify_write(REQUEST_LEN + 10).unwrap();
    {
        let mut iov = [IoSlice::new(&[]); 8];
        let n = conn.output(&mut iov);
        assert_eq!(n, 3);
        assert_eq!(iov[0].as_ptr(), payload[10..].as_ptr());
    }
    let rest = conn.take_output();
    // Rebuild the whole stream: the first header and 10 payload bytes went out above.
    let mut stream = Vec::new();
    header(0, CMD_WRITE, first, 0, payload.len() as u64).encode_compact(&mut stream);
    stream.extend_from_slice(&payload[..10]);
    stream.extend_from_slice(&rest);
    let reqs = parse_requests(&stream);
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].payload, payload.to_vec());
    assert_eq!(reqs[1].header, header(0, CMD_FLUSH, flush, 0, 0));
    assert_eq!(reqs[2].header, header(0, CMD_WRITE, third, 65536, 100));
    assert_eq!(reqs[2].payload, second.to_vec());
    assert!(!conn.wants_write());
}

#[test]
fn flush_trim_cache_and_zero_send_their_exact_requests() {
    let mut conn = ready(Export::default());
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    let trim = conn.trim(4096, 512, CmdFlags::FUA).unwrap();
    let cache = conn.cache(65536, 0, CmdFlags::empty()).unwrap();
    let zero = conn
        .zero(1024, 2048, CmdFlags::FUA | CmdFlags::NO_HOLE)
        .unwrap();
    let fast = conn.zero(512, 0, CmdFlags::FAST_ZERO).unwrap();
    let cookies: HashSet<_> = [flush, trim, cache, zero, fast].into_iter().collect();
    assert_eq!(cookies.len(), 5, "cookies are distinct");
    assert_eq!(conn.in_flight(), 5);
    let reqs = sent_requests(&mut conn);
    let headers: Vec<_> = reqs.iter().map(|r| r.header).collect();
    assert_eq!(
        headers,
        vec![
            header(0, CMD_FLUSH, flush, 0, 0),
            header(CMD_FLAG_FUA, CMD_TRIM, trim, 512, 4096),
            header(0, CMD_CACHE, cache, 0, 65536),
            header(
                CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
                CMD_WRITE_ZEROES,
                zero,
                2048,
                1024
            ),
            header(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, fast, 0, 512),
        ]
    );
    let mut s = Script::new();
    for c in [fast, zero, cache, trim, flush] {
        s.simple(c, 0, &[]);
    }
    feed(&mut conn, &s.take());
    let done: Vec<_> = completions(drain(&mut conn))
        .into_iter()
        .map(|c| {
            assert!(c.result.is_ok());
            c.cookie
        })
        .collect();
    assert_eq!(done, vec![fast, zero, cache, trim, flush]);
}

#[test]
fn disconnect_sends_nbd_cmd_disc() {
    let mut conn = ready(Export::default());
    conn.disconnect().unwrap();
    conn.disconnect().unwrap(); // idempotent: one DISC
    let mut out = Vec::new();
    {
        let mut iov = [IoSlice::new(&[]); 4];
        let n = conn.output(&mut iov);
        for s in &iov[..n] {
            out.extend_from_slice(s);
        }
    }
    let reqs = parse_requests(&out);
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].header,
        RequestHeader {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0
        }
    );
    assert!(!conn.is_closed(), "closed only once DISC is written");
    conn.notify_write(out.len()).unwrap();
    assert!(matches!(
        drain(&mut conn).as_slice(),
        [Event::Closed { error: None }]
    ));
    assert!(conn.is_closed());
    assert_eq!(conn.direction(), Direction::None);
}

#[test]
fn simple_error_replies_map_to_errno() {
    let table = [
        (EPERM, Errno::Perm),
        (EIO, Errno::Io),
        (ENOMEM, Errno::NoMem),
        (EINVAL, Errno::Inval),
        (ENOSPC, Errno::NoSpc),
        (EOVERFLOW, Errno::Overflow),
        (ENOTSUP, Errno::NotSup),
        (9999, Errno::Inval),
    ];
    let mut conn = ready(Export::simple());
    for (nbd, errno) in table {
        let read = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
        let write = conn
            .pwrite(Bytes::from_static(&[1; 512]), 0, CmdFlags::empty())
            .unwrap();
        let _ = conn.take_output();
        // An error reply to a read carries no data.
        feed(
            &mut conn,
            &Script::new()
                .simple(read, nbd, &[])
                .simple(write, nbd, &[])
                .take(),
        );
        let done = completions(drain(&mut conn));
        assert_eq!(done.len(), 2);
        for c in done {
            assert_eq!(
                c.result,
                Err(Error::Server {
                    errno,
                    message: None
                })
            );
        }
        assert!(conn.is_ready());
    }
}

#[test]
fn structured_data_and_holes_fill_the_buffer_in_any_order() {
    let mut conn = ready(Export::default());
    let cookie = conn
        .pread(buffer(4096, 0xff), 4096, CmdFlags::empty())
        .unwrap();
    let _ = conn.take_output();
    let a = pattern(1024, 1);
    let c = pattern(1024, 2);
    let mut s = Script::new();
    s.data(cookie, 4096 + 3072, &c, false)
        .hole(cookie, 4096 + 1024, 2048, false)
        .data(cookie, 4096, &a, false)
        .none(cookie);
    feed(&mut conn, &s.take());
    let done = one_completion(&mut conn);
    assert!(done.result.is_ok(), "{:?}", done.result);
    let buf = done.buffer.unwrap();
    assert_eq!(&buf[..1024], &a[..]);
    assert!(buf[1024..3072].iter().all(|&b| b == 0), "hole zero-filled");
    assert_eq!(&buf[3072..], &c[..]);
}

#[test]
fn structured_read_may_end_with_done_on_a_data_or_hole_chunk() {
    let mut conn = ready(Export::default());
    let r1 = conn.pread(buffer(100, 0xff), 0, CmdFlags::empty()).unwrap();
    let r2 = conn
        .pread(buffer(100, 0xff), 200, CmdFlags::empty())
        .unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .data(r1, 0, &pattern(100, 5), true)
            .hole(r2, 200, 100, true)
            .take(),
    );
    let done = completions_by_cookie(drain(&mut conn));
    assert_eq!(
        &done[&r1].buffer.as_ref().unwrap()[..],
        &pattern(100, 5)[..]
    );
    assert!(done[&r2].buffer.as_ref().unwrap().iter().all(|&b| b == 0));
    assert!(done[&r1].result.is_ok() && done[&r2].result.is_ok());
}

#[test]
fn pread_structured_reports_each_chunk_in_order_before_the_completion() {
    let mut conn = ready(Export::default());
    let cookie = conn
        .pread_structured(buffer(3000, 0xff), 1000, CmdFlags::empty())
        .unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .hole(cookie, 2000, 1000, false)
            .data(cookie, 1000, &pattern(1000, 7), false)
            .data(cookie, 3000, &pattern(1000, 8), false)
            .none(cookie)
            .take(),
    );
    let events = drain(&mut conn);
    assert_eq!(events.len(), 4, "{events:?}");
    let chunks: Vec<ReadChunk> = events[..3]
        .iter()
        .map(|e| match e {
            Event::ReadChunk(c) => c.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        chunks,
        vec![
            ReadChunk::Hole {
                cookie,
                offset: 2000,
                length: 1000
            },
            ReadChunk::Data {
                cookie,
                offset: 1000,
                length: 1000
            },
            ReadChunk::Data {
                cookie,
                offset: 3000,
                length: 1000
            },
        ]
    );
    match &events[3] {
        Event::Completed(c) => {
            assert_eq!(c.cookie, cookie);
            assert!(c.result.is_ok());
            let buf = c.buffer.as_ref().unwrap();
            assert_eq!(&buf[..1000], &pattern(1000, 7)[..]);
            assert!(buf[1000..2000].iter().all(|&b| b == 0));
            assert_eq!(&buf[2000..], &pattern(1000, 8)[..]);
        }
        other => panic!("{other:?}"),
    }

    // A simple-reply read through pread_structured is one data chunk.
    let mut conn = ready(Export::simple());
    let cookie = conn
        .pread_structured(buffer(10, 0), 0, CmdFlags::empty())
        .unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &Script::new().simple(cookie, 0, &[7; 10]).take());
    let events = drain(&mut conn);
    assert!(matches!(
        events.as_slice(),
        [
            Event::ReadChunk(ReadChunk::Data {
                offset: 0,
                length: 10,
                ..
            }),
            Event::Completed(_)
        ]
    ));
}

#[test]
fn plain_pread_reports_no_chunk_events() {
    let mut conn = ready(Export::default());
    let cookie = conn.pread(buffer(100, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .hole(cookie, 0, 50, false)
            .data(cookie, 50, &[1; 50], true)
            .take(),
    );
    let events = drain(&mut conn);
    assert!(matches!(events.as_slice(), [Event::Completed(c)] if c.result.is_ok()));
}

#[test]
fn error_chunks_fail_the_command_with_the_server_errno_and_message() {
    let mut conn = ready(Export::default());
    let read = conn
        .pread_structured(buffer(1024, 0), 0, CmdFlags::empty())
        .unwrap();
    let write = conn
        .pwrite(Bytes::from_static(&[0; 512]), 0, CmdFlags::empty())
        .unwrap();
    let trim = conn.trim(512, 512, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .data(read, 0, &[1; 512], false)
            .error_chunk(read, EIO, "bad sector", Some(700), false)
            .hole(read, 512, 512, false)
            .none(read)
            .error_chunk(write, ENOSPC, "", None, true)
            .error_chunk(trim, EPERM, "ro", Some(512), true)
            .take(),
    );
    let events = drain(&mut conn);
    let summary: Vec<_> = events.iter().map(|e| format!("{e:?}")).collect();
    assert_eq!(events.len(), 6, "{summary:#?}");
    assert!(matches!(
        &events[0],
        Event::ReadChunk(ReadChunk::Data {
            offset: 0,
            length: 512,
            ..
        })
    ));
    let bad_sector = Error::Server {
        errno: Errno::Io,
        message: Some(ServerText("bad sector".into())),
    };
    assert_eq!(
        match &events[1] {
            Event::ReadChunk(c) => c.clone(),
            other => panic!("{other:?}"),
        },
        ReadChunk::Error {
            cookie: read,
            offset: Some(700),
            error: bad_sector.clone()
        }
    );
    assert!(matches!(
        &events[2],
        Event::ReadChunk(ReadChunk::Hole { offset: 512, .. })
    ));
    let done = completions_by_cookie(events);
    assert_eq!(done[&read].result, Err(bad_sector));
    assert_eq!(
        done[&write].result,
        Err(Error::Server {
            errno: Errno::NoSpc,
            message: None
        })
    );
    assert_eq!(
        done[&trim].result,
        Err(Error::Server {
            errno: Errno::Perm,
            message: Some(ServerText("ro".into()))
        })
    );
    assert!(conn.is_ready());
    assert_eq!(conn.in_flight(), 0);
}

#[test]
fn the_first_error_of_a_reply_wins() {
    let mut conn = ready(Export::default());
    let read = conn.pread(buffer(1024, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(
        &mut conn,
        &Script::new()
            .error_chunk(read, EPERM, "first", None, false)
            .error_chunk(read, EIO, "second", Some(0), false)
            .none(read)
            .take(),
    );
    let c = one_completion(&mut conn);
    assert_eq!(
        c.result,
        Err(Error::Server {
            errno: Errno::Perm,
            message: Some(ServerText("first".into()))
        })
    );
}

#[test]
fn unknown_error_chunk_types_are_errors_with_their_errno() {
    let mut conn = ready(Export::default());
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    // An error type this client does not know, with extra bytes after the message.
    let mut payload = Vec::new();
    payload.extend_from_slice(&ENOMEM.to_be_bytes());
    payload.extend_from_slice(&2u16.to_be_bytes());
    payload.extend_from_slice(b"hi");
    payload.extend_from_slice(&[9; 7]);
    feed(
        &mut conn,
        &Script::new()
            .chunk(flush, true, REPLY_TYPE_FLAG_ERROR | 77, &payload)
            .take(),
    );
    let c = one_completion(&mut conn);
    assert_eq!(
        c.result,
        Err(Error::Server {
            errno: Errno::NoMem,
            message: Some(ServerText("hi".into()))
        })
    );
}

#[test]
fn many_commands_in_flight_answered_in_reverse_and_random_order() {
    for (round, structured) in [(0u64, false), (1, true), (2, false), (3, true)] {
        let mut conn = ready(if structured {
            Export::default()
        } else {
            Export::simple()
        });
        let mut issued = Vec::new();
        for i in 0..64u64 {
            let cookie = if i % 3 == 0 {
                conn.flush(CmdFlags::empty()).unwrap()
            } else {
                conn.pread(buffer(512, 0xff), i * 512, CmdFlags::empty())
                    .unwrap()
            };
            issued.push((cookie, i));
            assert_eq!(conn.in_flight(), issued.len());
        }
        let sent = sent_requests(&mut conn);
        assert_eq!(sent.len(), 64);
        for (req, (cookie, i)) in sent.iter().zip(&issued) {
            assert_eq!(req.cookie(), *cookie);
            if i % 3 != 0 {
                assert_eq!(req.header.offset, i * 512);
            }
        }
        let mut order = issued.clone();
        if round < 2 {
            order.reverse();
        } else {
            nbd_testkit::Rng::new(round).shuffle(&mut order);
        }
        for (n, (cookie, i)) in order.iter().enumerate() {
            let mut s = Script::new();
            let data = pattern(512, *i as u8);
            match (i % 3 == 0, structured) {
                (true, false) => s.simple(*cookie, 0, &[]),
                (true, true) => s.none(*cookie),
                (false, false) => s.simple(*cookie, 0, &data),
                (false, true) => s.data(*cookie, i * 512, &data, true),
            };
            feed(&mut conn, &s.take());
            let c = one_completion(&mut conn);
            assert_eq!(c.cookie, *cookie);
            assert!(c.result.is_ok(), "{:?}", c.result);
            if i % 3 != 0 {
                assert_eq!(&c.buffer.unwrap()[..], &data[..]);
            }
            assert!(!conn.is_in_flight(*cookie));
            assert_eq!(conn.in_flight(), 64 - n - 1);
            for (other, _) in &order[n + 1..] {
                assert!(conn.is_in_flight(*other));
            }
        }
    }
}

#[test]
fn cookies_are_not_reused_for_a_stale_reply() {
    let mut conn = ready(Export::simple());
    let first = conn.flush(CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &Script::new().simple(first, 0, &[]).take());
    one_completion(&mut conn);
    let second = conn.flush(CmdFlags::empty()).unwrap();
    assert_ne!(first, second, "a retired cookie is not handed out again");
    assert!(!conn.is_in_flight(first));
    assert!(conn.is_in_flight(second));
}

fn large_read_transcript(cookie: Cookie, len: usize, structured: bool) -> (Vec<u8>, usize) {
    let data = pattern(len, 11);
    let mut s = Script::new();
    if structured {
        s.data(cookie, 0, &data, true);
        (s.take(), 20 + 8)
    } else {
        s.simple(cookie, 0, &data);
        (s.take(), 16)
    }
}

#[test]
fn recv_buf_points_into_the_callers_read_buffer_during_a_large_payload() {
    const LEN: usize = 1 << 20;
    for structured in [false, true] {
        let export = if structured {
            Export::default()
        } else {
            Export::simple()
        };

        // Zero-copy path.
        let mut conn = ready(export);
        let buf = buffer(LEN, 0);
        let base = buf.as_ptr() as usize;
        let cookie = conn.pread(buf, 0, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let (bytes, header_len) = large_read_transcript(cookie, LEN, structured);
        // The header and 10 data bytes through the connection's own buffer.
        conn.handle_input(&bytes[..header_len + 10]).unwrap();
        let mut pos = header_len + 10;
        while pos < bytes.len() {
            let region = conn.recv_buf();
            let at = pos - header_len;
            assert_eq!(region.as_ptr() as usize, base + at, "caller memory at {at}");
            assert_eq!(region.len(), LEN - at);
            let n = region.len().min(100_003);
            region[..n].copy_from_slice(&bytes[pos..pos + n]);
            conn.notify_read(n).unwrap();
            pos += n;
        }
        let zero_copy = one_completion(&mut conn);
        assert!(zero_copy.result.is_ok());
        let zero_copy_buf = zero_copy.buffer.unwrap();
        assert_eq!(
            zero_copy_buf.as_ptr() as usize,
            base,
            "the same memory comes back"
        );

        // Copying path: same result.
        let mut conn = ready(export);
        let cookie = conn.pread(buffer(LEN, 0), 0, CmdFlags::empty()).unwrap();
        let _ = conn.take_output();
        let (bytes, _) = large_read_transcript(cookie, LEN, structured);
        feed(&mut conn, &bytes);
        let copied = one_completion(&mut conn);
        assert!(copied.result.is_ok());
        assert_eq!(copied.buffer.unwrap(), zero_copy_buf);
        assert_eq!(&zero_copy_buf[..], &pattern(LEN, 11)[..]);
    }
}

#[test]
fn recv_buf_targets_the_chunk_offset_inside_the_buffer() {
    let mut conn = ready(Export::default());
    let buf = buffer(8192, 0xff);
    let base = buf.as_ptr() as usize;
    let cookie = conn.pread(buf, 4096, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    let mut s = Script::new();
    let bytes = s.data(cookie, 4096 + 5000, &pattern(3192, 1), false).take();
    conn.handle_input(&bytes[..28]).unwrap();
    let region = conn.recv_buf();
    assert_eq!(region.as_ptr() as usize, base + 5000);
    assert_eq!(region.len(), 3192);
    region.copy_from_slice(&bytes[28..]);
    conn.notify_read(3192).unwrap();
    // Outside a payload the connection reads into its own buffer.
    let region = conn.recv_buf();
    assert!(
        (region.as_ptr() as usize) < base || region.as_ptr() as usize >= base + 8192,
        "not the caller's buffer"
    );
    feed(
        &mut conn,
        &s.data(cookie, 4096, &pattern(5000, 2), true).take(),
    );
    let c = one_completion(&mut conn);
    assert!(c.result.is_ok());
    let buf = c.buffer.unwrap();
    assert_eq!(&buf[..5000], &pattern(5000, 2)[..]);
    assert_eq!(&buf[5000..], &pattern(3192, 1)[..]);
}

#[test]
fn several_small_replies_in_one_input_are_all_parsed() {
    let mut conn = ready(Export::default());
    let mut cookies = Vec::new();
    for i in 0..200u64 {
        cookies.push(
            conn.pread(buffer(100, 0), i * 100, CmdFlags::empty())
                .unwrap(),
        );
    }
    let _ = conn.take_output();
    let mut s = Script::new();
    for (i, c) in cookies.iter().enumerate() {
        s.data(*c, i as u64 * 100, &pattern(100, i as u8), true);
    }
    // About 27 KB: crosses the connection's read-ahead buffer boundaries.
    feed(&mut conn, &s.take());
    let done = completions(drain(&mut conn));
    assert_eq!(done.len(), 200);
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.cookie, cookies[i]);
        assert_eq!(&c.buffer.as_ref().unwrap()[..], &pattern(100, i as u8)[..]);
    }
}

#[test]
fn zero_length_commands_complete_when_zero_size_checks_are_off() {
    let mut conn = ready_strict(Export::simple(), Strict::all() - Strict::ZERO_SIZE);
    let read = conn.pread(buffer(0, 0), 0, CmdFlags::empty()).unwrap();
    let trim = conn.trim(0, 0, CmdFlags::empty()).unwrap();
    let reqs = sent_requests(&mut conn);
    assert_eq!(reqs[0].header.length, 0);
    assert_eq!(reqs[1].header.length, 0);
    feed(
        &mut conn,
        &Script::new()
            .simple(read, 0, &[])
            .simple(trim, 0, &[])
            .take(),
    );
    let done = completions(drain(&mut conn));
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|c| c.result.is_ok()));

    // Structured: a NONE chunk covers an empty read.
    let mut conn = ready_strict(Export::default(), Strict::all() - Strict::ZERO_SIZE);
    let read = conn.pread(buffer(0, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    feed(&mut conn, &Script::new().none(read).take());
    assert!(one_completion(&mut conn).result.is_ok());
}

/// Reads `bytes` in through `recv_buf` / `notify_read`, as much as offered each time.
fn pump_in(conn: &mut nbd_proto::Connection, mut bytes: &[u8]) -> usize {
    let mut reads = 0;
    while !bytes.is_empty() {
        let buf = conn.recv_buf();
        assert!(!buf.is_empty(), "input expected");
        let n = buf.len().min(bytes.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        conn.notify_read(n).unwrap();
        bytes = &bytes[n..];
        reads += 1;
    }
    reads
}

#[test]
fn read_ahead_shrinks_after_a_large_payload_without_stalling_buffered_chunks() {
    let mut conn = ready(Export::default());
    assert!(
        conn.recv_buf().len() > 4096,
        "small replies: the whole stage"
    );
    let big = conn
        .pread(buffer(1 << 20, 0), 0, CmdFlags::empty())
        .unwrap();
    let flush = conn.flush(CmdFlags::empty()).unwrap();
    let small = conn.pread(buffer(512, 0), 0, CmdFlags::empty()).unwrap();
    let _ = conn.take_output();
    pump_in(
        &mut conn,
        &Script::new()
            .data(big, 0, &pattern(1 << 20, 1), true)
            .take(),
    );
    assert!(one_completion(&mut conn).result.is_ok());
    // After a large payload little is read past the next header.
    let ahead = conn.recv_buf().len();
    assert!(ahead > 0 && ahead <= 4096, "read-ahead {ahead}");
    // A 16 KiB chunk payload that must be buffered whole still gets through.
    let mut payload = EIO.to_be_bytes().to_vec();
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.resize(16 * 1024, 0x33);
    let reads = pump_in(
        &mut conn,
        &Script::new()
            .chunk(flush, true, REPLY_TYPE_FLAG_ERROR | 3, &payload)
            .take(),
    );
    assert!(reads >= 4, "taken in small reads: {reads}");
    let c = one_completion(&mut conn);
    assert_eq!(c.cookie, flush);
    assert_eq!(c.result.unwrap_err().errno(), Errno::Io);
    // After a small payload the whole stage is offered again.
    pump_in(
        &mut conn,
        &Script::new().data(small, 0, &[5; 512], true).take(),
    );
    assert!(one_completion(&mut conn).result.is_ok());
    assert!(conn.recv_buf().len() > 4096);
}
