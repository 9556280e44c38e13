//! Split invariance: however the server's bytes are cut up on their way in, the
//! connection reports the same events, returns the same buffers and sends the
//! same bytes.
//!
//! A transcript (handshake, then replies to many commands: simple and structured,
//! out of order, interleaved chunks, data, holes and errors) is fed four ways:
//! whole, in random pieces, one byte at a time, and through the zero-copy
//! `recv_buf` / `notify_read` path with random read sizes.

mod support;

use bytes::Bytes;
use nbd_proto::wire::consts::*;
use nbd_proto::wire::Info;
use nbd_proto::{CmdFlags, Connection, Cookie, Event};
use proptest::prelude::*;
use support::Rng;
use support::*;

const EXPORT_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        offset: u64,
        len: usize,
        chunk_events: bool,
    },
    Write {
        offset: u64,
        len: usize,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let small = 1usize..4096;
    let large = 32 * 1024usize..100 * 1024;
    let len = prop_oneof![6 => small, 1 => large];
    prop_oneof![
        5 => (0..EXPORT_SIZE / 2, len, any::<bool>()).prop_map(|(offset, len, chunk_events)| Op::Read { offset, len, chunk_events }),
        2 => (0..EXPORT_SIZE / 2, 1usize..2048).prop_map(|(offset, len)| Op::Write { offset, len }),
        1 => Just(Op::Flush),
        1 => (0..EXPORT_SIZE / 2, 1u64..65536).prop_map(|(offset, len)| Op::Trim { offset, len }),
        1 => (0..EXPORT_SIZE / 2, 1u64..65536).prop_map(|(offset, len)| Op::Zero { offset, len }),
    ]
}

fn handshake_bytes(structured: bool) -> Vec<u8> {
    let mut s = Script::new();
    s.newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    if structured {
        s.ack(OPT_STRUCTURED_REPLY);
    } else {
        s.opt_error(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, "no");
    }
    s.info_export(OPT_GO, EXPORT_SIZE, ALL_FLAGS)
        .info(
            OPT_GO,
            &Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20,
            },
        )
        .info(OPT_GO, &Info::Description("split test".into()))
        .ack(OPT_GO);
    s.take()
}

fn issue(conn: &mut Connection, ops: &[Op]) -> Vec<Cookie> {
    ops.iter()
        .enumerate()
        .map(|(i, op)| {
            match *op {
                Op::Read {
                    offset,
                    len,
                    chunk_events,
                } => {
                    let buf = buffer(len, 0xa5);
                    if chunk_events {
                        conn.pread_structured(buf, offset, CmdFlags::empty())
                    } else {
                        conn.pread(buf, offset, CmdFlags::empty())
                    }
                }
                Op::Write { offset, len } => {
                    conn.pwrite(Bytes::from(pattern(len, i as u8)), offset, CmdFlags::FUA)
                }
                Op::Flush => conn.flush(CmdFlags::empty()),
                Op::Trim { offset, len } => conn.trim(len, offset, CmdFlags::empty()),
                Op::Zero { offset, len } => conn.zero(len, offset, CmdFlags::NO_HOLE),
            }
            .expect("valid command")
        })
        .collect()
}

/// What a command's reply should give: success (with the read's bytes) or failure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Ok(Option<Vec<u8>>),
    Err,
}

/// The server's replies: each command's messages in order, commands interleaved;
/// and what each command should end with.
fn replies(
    ops: &[Op],
    cookies: &[Cookie],
    structured: bool,
    rng: &mut Rng,
) -> (Vec<u8>, Vec<Expect>) {
    let mut per_command: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut expect = Vec::new();
    for (i, (op, cookie)) in ops.iter().zip(cookies).enumerate() {
        let mut msgs = Vec::new();
        let mut s = Script::new();
        match *op {
            Op::Read { offset, len, .. } => {
                let data = pattern(len, (i as u8).wrapping_mul(7));
                if !structured {
                    if rng.chance(0.15) {
                        s.simple(*cookie, EIO, &[]);
                        expect.push(Expect::Err);
                    } else {
                        s.simple(*cookie, 0, &data);
                        expect.push(Expect::Ok(Some(data)));
                    }
                    msgs.push(s.take());
                } else {
                    // Cut the range into pieces, each data or hole, sent in any order.
                    let pieces = rng.between(1, 4) as usize;
                    let mut cuts: Vec<usize> = (1..pieces)
                        .map(|_| rng.between(1, len.max(2) as u64 - 1) as usize)
                        .filter(|&c| c < len)
                        .collect();
                    cuts.push(0);
                    cuts.push(len);
                    cuts.sort_unstable();
                    cuts.dedup();
                    let mut ranges: Vec<(usize, usize)> =
                        cuts.windows(2).map(|w| (w[0], w[1])).collect();
                    for k in (1..ranges.len()).rev() {
                        let j = rng.below(k as u64 + 1) as usize;
                        ranges.swap(k, j);
                    }
                    let error_at = rng
                        .chance(0.2)
                        .then(|| rng.below(ranges.len() as u64 + 1) as usize);
                    let end_with_none = rng.chance(0.3);
                    let mut content = data.clone();
                    for (k, &(a, b)) in ranges.iter().enumerate() {
                        if error_at == Some(k) {
                            let at = offset + rng.below(len as u64);
                            s.error_chunk(*cookie, EIO, "bad block", Some(at), false);
                            msgs.push(s.take());
                        }
                        let last = k + 1 == ranges.len()
                            && error_at != Some(ranges.len())
                            && !end_with_none;
                        if rng.chance(0.3) {
                            s.hole(*cookie, offset + a as u64, (b - a) as u32, last);
                            content[a..b].fill(0);
                        } else {
                            s.data(*cookie, offset + a as u64, &data[a..b], last);
                        }
                        msgs.push(s.take());
                    }
                    if error_at == Some(ranges.len()) {
                        s.error_chunk(*cookie, ENOMEM, "", None, !end_with_none);
                        msgs.push(s.take());
                    }
                    if end_with_none {
                        s.none(*cookie);
                        msgs.push(s.take());
                    }
                    expect.push(match error_at {
                        Some(_) => Expect::Err,
                        None => Expect::Ok(Some(content)),
                    });
                }
            }
            _ => {
                let ok = match (structured, rng.below(4)) {
                    (_, 0) => {
                        s.simple(*cookie, ENOSPC, &[]);
                        false
                    }
                    (true, 1) => {
                        s.none(*cookie);
                        true
                    }
                    (true, 2) => {
                        s.error_chunk(*cookie, EPERM, "denied", None, true);
                        false
                    }
                    _ => {
                        s.simple(*cookie, 0, &[]);
                        true
                    }
                };
                expect.push(if ok { Expect::Ok(None) } else { Expect::Err });
                msgs.push(s.take());
            }
        }
        msgs.reverse(); // popped from the back
        per_command.push(msgs);
    }
    // Interleave: pick a random command with messages left, send its next one.
    let mut out = Vec::new();
    loop {
        let live: Vec<usize> = (0..per_command.len())
            .filter(|&i| !per_command[i].is_empty())
            .collect();
        if live.is_empty() {
            break;
        }
        let pick = live[rng.below(live.len() as u64) as usize];
        out.extend(per_command[pick].pop().unwrap());
    }
    (out, expect)
}

/// Everything observable from one run.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    events: Vec<String>,
    /// Each completion: cookie, whether it succeeded, the buffer handed back.
    buffers: Vec<(Cookie, bool, Option<Vec<u8>>)>,
    sent: Vec<u8>,
}

fn run(
    structured: bool,
    ops: &[Op],
    handshake: &[u8],
    reply_bytes: &[u8],
    cookies: &[Cookie],
    mode: Mode,
    feed_seed: u64,
) -> Run {
    let mut rng = Rng::new(feed_seed);
    let mut conn = Connection::new(compact());
    let mut events = Vec::new();
    let mut buffers = Vec::new();
    let mut record = |conn: &mut Connection| {
        while let Some(e) = conn.poll_event() {
            events.push(format!("{e:?}"));
            if let Event::Completed(c) = e {
                buffers.push((c.cookie, c.result.is_ok(), c.buffer.map(|b| b.to_vec())));
            }
        }
    };
    feed_with(&mut conn, handshake, mode, &mut rng);
    let mut sent = conn.take_output();
    record(&mut conn);
    assert!(conn.is_ready(), "{mode:?}: {:?}", conn.error());
    assert_eq!(conn.structured_replies_negotiated(), structured);
    let issued = issue(&mut conn, ops);
    assert_eq!(issued, cookies, "cookies are deterministic");
    sent.extend(conn.take_output());
    feed_with(&mut conn, reply_bytes, mode, &mut rng);
    record(&mut conn);
    assert!(conn.is_ready(), "{mode:?}: {:?}", conn.error());
    assert_eq!(conn.in_flight(), 0);
    conn.handle_input(&[]).unwrap();
    record(&mut conn);
    assert!(conn.is_dead());
    Run {
        events,
        buffers,
        sent,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn events_buffers_and_output_do_not_depend_on_how_input_is_split(
        structured in any::<bool>(),
        ops in prop::collection::vec(op_strategy(), 1..14),
        reply_seed in any::<u64>(),
        feed_seed in any::<u64>(),
    ) {
        let handshake = handshake_bytes(structured);
        // Learn the cookies from a first connection; they are deterministic.
        let mut probe = Connection::new(compact());
        probe.handle_input(&handshake).unwrap();
        let _ = probe.take_output();
        let cookies = issue(&mut probe, &ops);
        let (reply_bytes, expect) = replies(&ops, &cookies, structured, &mut Rng::new(reply_seed));

        let whole = run(structured, &ops, &handshake, &reply_bytes, &cookies, Mode::Whole, feed_seed);
        // Every command completed exactly once, successful reads with the right bytes.
        prop_assert_eq!(whole.buffers.len(), ops.len());
        for (cookie, ok, buf) in &whole.buffers {
            let i = cookies.iter().position(|c| c == cookie).unwrap();
            let is_read = matches!(ops[i], Op::Read { .. });
            prop_assert_eq!(is_read, buf.is_some());
            match &expect[i] {
                Expect::Err => prop_assert!(!ok, "command {} should fail", i),
                Expect::Ok(content) => {
                    prop_assert!(ok, "command {} should succeed", i);
                    if let Some(content) = content {
                        prop_assert_eq!(buf.as_ref().unwrap(), content, "read {} content", i);
                    }
                }
            }
        }
        for mode in [Mode::RandomSplits, Mode::ByteAtATime, Mode::ZeroCopy] {
            let other = run(structured, &ops, &handshake, &reply_bytes, &cookies, mode, feed_seed);
            prop_assert_eq!(&whole.sent, &other.sent, "{:?}: bytes sent differ", mode);
            prop_assert_eq!(&whole.buffers, &other.buffers, "{:?}: buffers differ", mode);
            prop_assert_eq!(&whole.events, &other.events, "{:?}: events differ", mode);
        }
    }
}

#[test]
fn successful_reads_hold_exactly_the_data_and_zeroed_holes() {
    // A fixed transcript checked against the expected buffer contents, so the
    // invariance above is not merely "equally wrong".
    let mut rng = Rng::new(7);
    let ops = [
        Op::Read {
            offset: 100,
            len: 70_000,
            chunk_events: true,
        },
        Op::Read {
            offset: 0,
            len: 3000,
            chunk_events: false,
        },
        Op::Flush,
    ];
    let handshake = handshake_bytes(true);
    let mut probe = Connection::new(compact());
    probe.handle_input(&handshake).unwrap();
    let _ = probe.take_output();
    let cookies = issue(&mut probe, &ops);
    let mut s = Script::new();
    let d0 = pattern(70_000, 1);
    let d1 = pattern(3000, 2);
    s.data(cookies[0], 100 + 40_000, &d0[40_000..], false)
        .hole(cookies[1], 1000, 1000, false)
        .hole(cookies[0], 100, 40_000, true)
        .data(cookies[1], 2000, &d1[2000..], false)
        .simple(cookies[2], 0, &[])
        .data(cookies[1], 0, &d1[..1000], true);
    let bytes = s.take();
    for mode in [
        Mode::Whole,
        Mode::RandomSplits,
        Mode::ByteAtATime,
        Mode::ZeroCopy,
    ] {
        let r = run(
            true,
            &ops,
            &handshake,
            &bytes,
            &cookies,
            mode,
            rng.next_u64(),
        );
        let find = |c: Cookie| r.buffers.iter().find(|b| b.0 == c).unwrap().2.clone();
        let b0 = find(cookies[0]).unwrap();
        assert!(b0[..40_000].iter().all(|&b| b == 0));
        assert_eq!(&b0[40_000..], &d0[40_000..]);
        let b1 = find(cookies[1]).unwrap();
        assert_eq!(&b1[..1000], &d1[..1000]);
        assert!(b1[1000..2000].iter().all(|&b| b == 0));
        assert_eq!(&b1[2000..], &d1[2000..]);
        assert!(r
            .events
            .iter()
            .filter(|e| e.starts_with("Completed"))
            .all(|e| e.contains("result: Ok")));
    }
}
