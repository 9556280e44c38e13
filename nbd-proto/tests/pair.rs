//! The core against a self-answering fake server (`nbd_testkit::Pair`): whole
//! handshakes and workloads in memory, checked against an independent model
//! of the export, in every handshake style and feature combination, with the
//! byte streams cut at random places.
//!
//! Every randomized test names its seed in its failure message; set
//! `NBD_TEST_SEED` to move the base seed.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use nbd_proto::context::{BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use nbd_proto::wire::consts::*;
use nbd_proto::{
    CmdFlags, Config, Cookie, Errno, Error, Event, OptionReplyError, ReadChunk, Strict,
};
use nbd_testkit::{Builder, FakeServer, Pair, Rng, Style};

fn config_with_allocation() -> Config {
    Config::default().meta_context(BASE_ALLOCATION)
}

fn base_seed() -> u64 {
    Rng::seed_from_env(0x5eed)
}

// ---------------------------------------------------------------- handshakes

#[test]
fn handshake_in_every_style_and_feature_combination() {
    let styles = [Style::Oldstyle, Style::Newstyle, Style::FixedNewstyle];
    let mut combos = 0;
    for style in styles {
        for bits in 0..64u32 {
            let bit = |n: u32| bits & (1 << n) != 0;
            let (srv_structured, srv_extended, cli_structured, cli_extended) =
                (bit(0), bit(1), bit(2), bit(3));
            let (no_zeroes, read_only) = (bit(4), bit(5));
            let what = format!(
                "{style:?} server structured={srv_structured} extended={srv_extended} \
                 no_zeroes={no_zeroes} read_only={read_only}; client structured={cli_structured} \
                 extended={cli_extended}"
            );
            let server = FakeServer::builder()
                .style(style)
                .size(64 * 1024)
                .structured(srv_structured)
                .extended(srv_extended)
                .no_zeroes(no_zeroes)
                .read_only(read_only)
                .multi_conn(bits % 3 == 0)
                .seed(u64::from(bits))
                .build();
            let config = config_with_allocation()
                .request_structured_replies(cli_structured)
                .request_extended_headers(cli_extended);
            // Half the runs deliver the streams in small random pieces.
            let mut pair = Pair::new(config, server);
            if bits % 2 == 1 {
                pair = pair.with_splits(u64::from(bits), 1 + bits as usize % 7);
            }
            pair.handshake().unwrap_or_else(|e| panic!("{what}: {e}"));
            combos += 1;

            let fixed = style == Style::FixedNewstyle;
            let extended = fixed && srv_extended && cli_extended;
            let structured = extended || (fixed && srv_structured && cli_structured);
            let c = &pair.client;
            assert!(c.is_ready(), "{what}");
            assert_eq!(c.extended_headers_negotiated(), extended, "{what}");
            assert_eq!(c.structured_replies_negotiated(), structured, "{what}");
            assert_eq!(pair.server.extended_negotiated(), extended, "{what}");
            assert_eq!(pair.server.structured_negotiated(), structured, "{what}");
            assert_eq!(c.size().unwrap(), 64 * 1024, "{what}");
            assert_eq!(c.is_read_only().unwrap(), read_only, "{what}");
            assert_eq!(c.can_multi_conn().unwrap(), bits % 3 == 0, "{what}");
            assert_eq!(c.can_meta_context(BASE_ALLOCATION), structured, "{what}");
            let protocol = match style {
                Style::Oldstyle => "oldstyle",
                Style::Newstyle => "newstyle",
                Style::FixedNewstyle => "newstyle-fixed",
            };
            assert_eq!(c.protocol(), Some(protocol), "{what}");

            // A round trip, a block status where possible, a clean goodbye.
            if !read_only {
                let w = pair
                    .client
                    .pwrite(Bytes::from_static(b"round trip"), 100, CmdFlags::FUA)
                    .unwrap();
                pair.wait(w).unwrap().result.unwrap();
            }
            let r = pair
                .client
                .pread(BytesMut::zeroed(10), 100, CmdFlags::empty())
                .unwrap();
            let got = pair.wait(r).unwrap().buffer.unwrap();
            let want: &[u8] = if read_only { &[0; 10] } else { b"round trip" };
            assert_eq!(&got[..], want, "{what}");
            if structured {
                let s = pair
                    .client
                    .block_status(64 * 1024, 0, CmdFlags::empty())
                    .unwrap();
                assert!(pair.wait(s).unwrap().result.is_ok(), "{what}");
            }
            pair.client.disconnect().unwrap();
            pair.drive();
            assert!(pair.client.is_closed(), "{what}");
            assert!(
                pair.server.closed_cleanly(),
                "{what}: {:?}",
                pair.server.close_reason()
            );
        }
    }
    assert_eq!(combos, 3 * 64);
}

#[test]
fn go_asks_for_everything_and_gets_it() {
    let server = FakeServer::builder()
        .exports([("disk", "the test disk"), ("other", "")])
        .block_sizes(512, 4096, 1 << 20)
        .build();
    let config = config_with_allocation().export_name("disk").full_info(true);
    let mut pair = Pair::new(config, server);
    pair.handshake().unwrap();
    let c = &pair.client;
    assert_eq!(c.canonical_name(), Some("disk"));
    assert_eq!(c.description(), Some("the test disk"));
    let sizes = c.block_sizes().unwrap();
    assert_eq!(
        (sizes.minimum, sizes.preferred, sizes.maximum),
        (512, 4096, 1 << 20)
    );
    assert!(c.can_df().unwrap() && c.can_fast_zero().unwrap() && c.can_cache().unwrap());
    assert_eq!(pair.server.export().unwrap().name, "disk");
    assert_eq!(pair.server.options_seen().last(), Some(&OPT_GO));
}

#[test]
fn an_unknown_export_is_refused_by_go() {
    let server = FakeServer::builder().exports(["disk"]).build();
    let config = Config::default().export_name("nope");
    let mut pair = Pair::new(config, server);
    let err = pair.handshake().unwrap_err();
    assert!(
        matches!(err, Error::OptionRefused { reply, .. } if reply == OptionReplyError::Unknown),
        "{err:?}"
    );
}

#[test]
fn opt_mode_lists_exports_and_contexts_then_goes() {
    let server = FakeServer::builder()
        .exports([("a", "first"), ("b", "second")])
        .build();
    let config = Config::default().opt_mode(true).export_name("b");
    let mut pair = Pair::new(config, server);
    pair.handshake().unwrap();
    assert!(pair.client.is_negotiating());
    pair.events();

    pair.client.opt_list().unwrap();
    pair.drive();
    let listed: Vec<(String, String)> = pair
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Export { name, description } => Some((name, description)),
            _ => None,
        })
        .collect();
    assert_eq!(
        listed,
        [("a".into(), "first".into()), ("b".into(), "second".into())]
    );

    pair.client.opt_structured_reply().unwrap();
    pair.drive();
    pair.client.opt_list_meta_context().unwrap();
    pair.drive();
    let contexts: Vec<String> = pair
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::MetaContext { name, .. } => Some(name),
            _ => None,
        })
        .collect();
    assert_eq!(contexts, [BASE_ALLOCATION]);

    pair.client
        .opt_set_meta_context_queries(&[BASE_ALLOCATION.into()])
        .unwrap();
    pair.drive();
    pair.client.opt_go().unwrap();
    pair.drive();
    assert!(pair.client.is_ready());
    assert_eq!(pair.server.export().unwrap().name, "b");
    assert!(pair.client.can_meta_context(BASE_ALLOCATION));
}

#[test]
fn opt_abort_ends_cleanly_on_both_sides() {
    let config = Config::default().opt_mode(true);
    let mut pair = Pair::new(config, FakeServer::new());
    pair.handshake().unwrap();
    pair.client.opt_abort().unwrap();
    pair.drive();
    assert!(pair.client.is_closed());
    assert!(pair.server.closed_cleanly());
    assert!(!pair.server.in_transmission());
}

// ---------------------------------------------------------------- workloads

/// An independent model of the export: bytes and allocation per byte.
struct Model {
    bytes: Vec<u8>,
    allocated: Vec<bool>,
}

impl Model {
    fn extents(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = (offset + len).min(self.bytes.len() as u64) as usize;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for a in &self.allocated[offset as usize..end] {
            let flags = if *a { 0 } else { STATE_HOLE | STATE_ZERO };
            match out.last_mut() {
                Some((n, f)) if *f == flags => *n += 1,
                _ => out.push((1, flags)),
            }
        }
        out
    }
}

/// What one operation produced, comparable across runs.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Read(Vec<u8>),
    Status(Vec<(u64, u64)>),
}

struct Workload {
    outcomes: Vec<Outcome>,
    image: Vec<u8>,
    out_of_order: usize,
}

/// Runs `batches` batches of random non-overlapping commands in flight
/// together; checks every result against the model as it goes.
fn run_workload(
    builder: Builder,
    config: Config,
    seed: u64,
    splits: Option<usize>,
    batches: usize,
) -> Workload {
    let size = 256 * 1024u64;
    let server = builder.size(size).build();
    let mut pair = Pair::new(config, server);
    if let Some(max) = splits {
        pair = pair.with_splits(seed, max);
    }
    pair.handshake()
        .unwrap_or_else(|e| panic!("seed {seed}: handshake: {e}"));
    let align = pair
        .client
        .block_sizes()
        .map_or(1, |s| u64::from(s.minimum));
    let max_len = pair
        .client
        .block_sizes()
        .map_or(64 * 1024, |s| u64::from(s.maximum).min(64 * 1024));
    let with_status = !pair.client.meta_contexts().is_empty();

    let mut rng = Rng::new(seed);
    let mut model = Model {
        bytes: vec![0; size as usize],
        allocated: vec![false; size as usize],
    };
    let mut outcomes = Vec::new();
    let mut out_of_order = 0;
    for batch in 0..batches {
        let mut used: Vec<(u64, u64)> = Vec::new();
        // cookie -> (index in outcomes, expected outcome)
        let mut expected: HashMap<Cookie, (usize, Outcome)> = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..rng.range(1..9) {
            let len = (rng.range(1..max_len / align + 1)) * align;
            let offset = rng.below((size - len) / align + 1) * align;
            if used
                .iter()
                .any(|&(o, l)| offset < o + l && o < offset + len)
            {
                continue;
            }
            used.push((offset, len));
            let (o, e) = (offset as usize, (offset + len) as usize);
            let kind = rng.below(if with_status { 8 } else { 7 });
            let (cookie, want) = match kind {
                0 | 1 => {
                    let want = model.bytes[o..e].to_vec();
                    let c = pair.client.pread(
                        BytesMut::zeroed(len as usize),
                        offset,
                        CmdFlags::empty(),
                    );
                    (c, Outcome::Read(want))
                }
                2 | 3 => {
                    let data = rng.bytes(len as usize);
                    model.bytes[o..e].copy_from_slice(&data);
                    model.allocated[o..e].fill(true);
                    let flags = if rng.chance(0.3) {
                        CmdFlags::FUA
                    } else {
                        CmdFlags::empty()
                    };
                    let c = pair.client.pwrite(Bytes::from(data), offset, flags);
                    (c, Outcome::Done)
                }
                4 => {
                    model.bytes[o..e].fill(0);
                    model.allocated[o..e].fill(false);
                    (
                        pair.client.trim(len, offset, CmdFlags::empty()),
                        Outcome::Done,
                    )
                }
                5 => {
                    let no_hole = rng.chance(0.5);
                    model.bytes[o..e].fill(0);
                    model.allocated[o..e].fill(no_hole);
                    let flags = if no_hole {
                        CmdFlags::NO_HOLE
                    } else {
                        CmdFlags::FAST_ZERO
                    };
                    (pair.client.zero(len, offset, flags), Outcome::Done)
                }
                6 => {
                    let c = if rng.chance(0.5) {
                        pair.client.flush(CmdFlags::empty())
                    } else {
                        pair.client.cache(len, offset, CmdFlags::empty())
                    };
                    (c, Outcome::Done)
                }
                _ => {
                    let want = model.extents(offset, len);
                    let c = pair.client.block_status(len, offset, CmdFlags::empty());
                    (c, Outcome::Status(want))
                }
            };
            let cookie = cookie.unwrap_or_else(|e| panic!("seed {seed} batch {batch}: {e}"));
            expected.insert(cookie, (outcomes.len(), want));
            outcomes.push(Outcome::Done);
            order.push(cookie);
        }
        let done = pair.completions();
        let mut statuses: HashMap<Cookie, Vec<(u64, u64)>> = HashMap::new();
        for event in pair.events() {
            if let Event::BlockStatus(s) = event {
                assert_eq!(s.context, BASE_ALLOCATION, "seed {seed}");
                statuses.insert(
                    s.cookie,
                    s.extents.iter().map(|e| (e.length, e.flags)).collect(),
                );
            }
        }
        assert_eq!(
            done.len(),
            order.len(),
            "seed {seed} batch {batch}: completions"
        );
        out_of_order += done
            .iter()
            .zip(&order)
            .filter(|(d, c)| d.cookie != **c)
            .count();
        for completion in done {
            let (index, want) = expected
                .remove(&completion.cookie)
                .unwrap_or_else(|| panic!("seed {seed}: completion for an unknown cookie"));
            if let Err(e) = &completion.result {
                panic!("seed {seed} batch {batch}: command failed: {e}");
            }
            let got = match &want {
                Outcome::Done => Outcome::Done,
                Outcome::Read(_) => Outcome::Read(completion.buffer.unwrap().to_vec()),
                Outcome::Status(_) => Outcome::Status(
                    statuses
                        .remove(&completion.cookie)
                        .unwrap_or_else(|| panic!("seed {seed}: block status without extents")),
                ),
            };
            assert_eq!(got, want, "seed {seed} batch {batch}");
            outcomes[index] = got;
        }
    }
    let image = pair.server.image_bytes();
    assert!(image == model.bytes, "seed {seed}: final image differs");
    pair.client.disconnect().unwrap();
    pair.drive();
    assert!(pair.server.closed_cleanly(), "seed {seed}");
    Workload {
        outcomes,
        image,
        out_of_order,
    }
}

/// Server feature sets a workload runs against, with the client asking for everything.
fn server_variants(seed: u64) -> Vec<(&'static str, Builder)> {
    let b = || FakeServer::builder().seed(seed);
    vec![
        ("oldstyle", b().style(Style::Oldstyle)),
        ("newstyle", b().style(Style::Newstyle)),
        ("simple replies", b().structured(false).extended(false)),
        ("structured", b().extended(false)),
        ("structured chaotic", b().extended(false).chaotic()),
        ("extended", b()),
        ("extended chaotic", b().chaotic()),
        (
            "extended chaotic block sizes",
            b().chaotic().block_sizes(512, 4096, 32 * 1024),
        ),
    ]
}

#[test]
fn workloads_agree_with_the_model_in_every_configuration() {
    let base = base_seed();
    for round in 0..3 {
        let seed = base + round;
        for (name, builder) in server_variants(seed) {
            let w = std::panic::catch_unwind(|| {
                run_workload(builder, config_with_allocation(), seed, None, 30)
            });
            if w.is_err() {
                panic!("{name}, seed {seed} (NBD_TEST_SEED={base})");
            }
        }
    }
}

#[test]
fn random_splits_of_the_streams_give_the_same_results() {
    let base = base_seed();
    for round in 0..3 {
        let seed = base + 100 + round;
        for (name, builder) in server_variants(seed) {
            let whole = run_workload(builder.clone(), config_with_allocation(), seed, None, 15);
            for max_piece in [1, 3, 17, 4096] {
                let split = run_workload(
                    builder.clone(),
                    config_with_allocation(),
                    seed,
                    Some(max_piece),
                    15,
                );
                assert!(
                    split.outcomes == whole.outcomes && split.image == whole.image,
                    "{name}: seed {seed}, pieces of at most {max_piece} bytes"
                );
            }
        }
    }
}

#[test]
fn a_reordering_server_completes_commands_out_of_order() {
    let seed = base_seed() + 200;
    let builder = FakeServer::builder().seed(seed).reorder(true);
    let w = run_workload(builder, config_with_allocation(), seed, None, 30);
    assert!(
        w.out_of_order > 0,
        "seed {seed}: every batch came back in order"
    );
    // Without reordering the same server answers in order.
    let builder = FakeServer::builder().seed(seed);
    let w = run_workload(builder, config_with_allocation(), seed, None, 30);
    assert_eq!(w.out_of_order, 0, "seed {seed}");
}

// ---------------------------------------------------------------- read chunks and holes

#[test]
fn structured_reads_report_holes_where_the_image_has_none_allocated() {
    let server = FakeServer::builder().size(64 * 1024).holes(true).build();
    let mut pair = Pair::new(Config::default(), server);
    pair.handshake().unwrap();
    let w = pair
        .client
        .pwrite(Bytes::from(vec![7u8; 4096]), 8192, CmdFlags::empty())
        .unwrap();
    pair.wait(w).unwrap().result.unwrap();
    let r = pair
        .client
        .pread_structured(BytesMut::from(&[0xffu8; 16384][..]), 0, CmdFlags::empty())
        .unwrap();
    let done = pair.wait(r).unwrap();
    done.result.unwrap();
    let buf = done.buffer.unwrap();
    assert!(buf[..8192].iter().all(|b| *b == 0), "holes are zero-filled");
    assert!(buf[8192..12288].iter().all(|b| *b == 7));
    assert!(buf[12288..].iter().all(|b| *b == 0));
    let mut chunks: Vec<(bool, u64, u64)> = pair
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::ReadChunk(ReadChunk::Hole { offset, length, .. }) => {
                Some((true, offset, length))
            }
            Event::ReadChunk(ReadChunk::Data { offset, length, .. }) => {
                Some((false, offset, length))
            }
            _ => None,
        })
        .collect();
    chunks.sort_by_key(|c| c.1);
    assert_eq!(
        chunks,
        [(true, 0, 8192), (false, 8192, 4096), (true, 12288, 4096)]
    );
}

#[test]
fn df_reads_come_in_one_data_chunk_even_from_a_chaotic_server() {
    let server = FakeServer::builder()
        .size(64 * 1024)
        .chaotic()
        .seed(5)
        .build();
    let mut pair = Pair::new(Config::default(), server);
    pair.handshake().unwrap();
    let r = pair
        .client
        .pread_structured(BytesMut::zeroed(32768), 4096, CmdFlags::DF)
        .unwrap();
    pair.wait(r).unwrap().result.unwrap();
    let chunks: Vec<_> = pair
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::ReadChunk(_)))
        .collect();
    assert_eq!(chunks.len(), 1, "{chunks:?}");
}

#[test]
fn block_status_filter_and_req_one_with_extended_headers() {
    let server = FakeServer::builder().size(1 << 20).build();
    let mut pair = Pair::new(config_with_allocation(), server);
    pair.handshake().unwrap();
    assert!(pair.client.extended_headers_negotiated());
    let w = pair
        .client
        .pwrite(Bytes::from(vec![1u8; 4096]), 4096, CmdFlags::empty())
        .unwrap();
    pair.wait(w).unwrap().result.unwrap();

    let s = pair
        .client
        .block_status_filter(1 << 20, 0, CmdFlags::empty(), &[BASE_ALLOCATION])
        .unwrap();
    pair.wait(s).unwrap().result.unwrap();
    let extents: Vec<(u64, u64)> = pair
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::BlockStatus(b) => Some(b.extents.iter().map(|e| (e.length, e.flags)).collect()),
            _ => None,
        })
        .unwrap();
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(extents, [(4096, hole), (4096, 0), ((1 << 20) - 8192, hole)]);

    let s = pair
        .client
        .block_status(1 << 20, 0, CmdFlags::REQ_ONE)
        .unwrap();
    pair.wait(s).unwrap().result.unwrap();
    let first: Vec<_> = pair
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::BlockStatus(b) => Some(b.extents),
            _ => None,
        })
        .collect();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].len(), 1);
    assert_eq!((first[0][0].length, first[0][0].flags), (4096, hole));
}

#[test]
fn a_huge_sparse_export_works_with_64_bit_lengths() {
    let size = 1u64 << 42;
    let server = FakeServer::builder().size(size).build();
    let mut pair = Pair::new(config_with_allocation(), server);
    pair.handshake().unwrap();
    let far = size - 4096;
    let w = pair
        .client
        .pwrite(Bytes::from_static(b"far away"), far, CmdFlags::empty())
        .unwrap();
    pair.wait(w).unwrap().result.unwrap();
    // One trim and one block status over more than 4 GiB each.
    let t = pair.client.trim(1 << 40, 0, CmdFlags::empty()).unwrap();
    pair.wait(t).unwrap().result.unwrap();
    let s = pair
        .client
        .block_status(size, 0, CmdFlags::empty())
        .unwrap();
    pair.wait(s).unwrap().result.unwrap();
    let extents: Vec<(u64, u64)> = pair
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::BlockStatus(b) => Some(b.extents.iter().map(|e| (e.length, e.flags)).collect()),
            _ => None,
        })
        .unwrap();
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(extents, [(far, hole), (8, 0), (4088, hole)]);
    let r = pair
        .client
        .pread(BytesMut::zeroed(8), far, CmdFlags::empty())
        .unwrap();
    assert_eq!(&pair.wait(r).unwrap().buffer.unwrap()[..], b"far away");
}

// ---------------------------------------------------------------- server errors

#[test]
fn the_servers_refusals_reach_the_caller_as_errors() {
    for structured in [false, true] {
        let server = FakeServer::builder()
            .size(8192)
            .read_only(true)
            .structured(structured)
            .extended(false)
            .block_sizes(512, 4096, 4096)
            .build();
        let config = Config::default().strict(Strict::empty());
        let mut pair = Pair::new(config, server);
        pair.handshake().unwrap();
        let cases: Vec<(Cookie, Errno, &str)> = vec![
            (
                pair.client
                    .pwrite(Bytes::from(vec![0; 512]), 0, CmdFlags::empty())
                    .unwrap(),
                Errno::Perm,
                "write to a read-only export",
            ),
            (
                pair.client
                    .pread(BytesMut::zeroed(512), 8192, CmdFlags::empty())
                    .unwrap(),
                Errno::Inval,
                "read past the end",
            ),
            (
                pair.client
                    .pread(BytesMut::zeroed(100), 0, CmdFlags::empty())
                    .unwrap(),
                Errno::Inval,
                "misaligned read",
            ),
            (
                pair.client
                    .pread(BytesMut::zeroed(8192), 0, CmdFlags::empty())
                    .unwrap(),
                Errno::Inval,
                "read above the maximum block size",
            ),
            (
                pair.client
                    .pwrite(Bytes::from(vec![0; 8192]), 0, CmdFlags::empty())
                    .unwrap(),
                Errno::Inval,
                "write payload above the maximum block size",
            ),
        ];
        for (cookie, errno, what) in cases {
            let done = pair.wait(cookie).unwrap();
            let err = done.result.unwrap_err();
            assert_eq!(err.errno(), errno, "structured={structured}: {what}: {err}");
        }
        // The connection survived every refusal.
        let r = pair
            .client
            .pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        assert!(pair.wait(r).unwrap().result.is_ok());
        assert!(!pair.server.is_closed());
    }
}

#[test]
fn a_bad_region_fails_only_the_commands_that_touch_it() {
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let what = format!("structured={structured} extended={extended}");
        let server = FakeServer::builder()
            .size(64 * 1024)
            .contents(&[0x11; 64 * 1024])
            .structured(structured)
            .extended(extended)
            .fail(20_000..20_100, EIO)
            .build();
        let mut pair = Pair::new(Config::default(), server);
        pair.handshake().unwrap();

        let r = pair
            .client
            .pread_structured(BytesMut::zeroed(8192), 16384, CmdFlags::empty())
            .unwrap();
        let done = pair.wait(r).unwrap();
        let err = done.result.unwrap_err();
        assert_eq!(err.errno(), Errno::Io, "{what}: {err}");
        if structured {
            let offsets: Vec<Option<u64>> = pair
                .events()
                .into_iter()
                .filter_map(|e| match e {
                    Event::ReadChunk(ReadChunk::Error { offset, .. }) => Some(offset),
                    _ => None,
                })
                .collect();
            assert_eq!(offsets, [Some(20_000)], "{what}");
        }

        let w = pair
            .client
            .pwrite(Bytes::from(vec![0x22; 200]), 19_950, CmdFlags::empty())
            .unwrap();
        assert_eq!(
            pair.wait(w).unwrap().result.unwrap_err().errno(),
            Errno::Io,
            "{what}"
        );
        let image = pair.server.image_bytes();
        assert!(
            image.iter().all(|b| *b == 0x11),
            "{what}: a failed write changed the image"
        );

        // Everything around the bad region still works.
        let r = pair
            .client
            .pread(BytesMut::zeroed(4096), 24_000, CmdFlags::empty())
            .unwrap();
        let done = pair.wait(r).unwrap();
        assert!(done.result.is_ok(), "{what}");
        assert!(done.buffer.unwrap().iter().all(|b| *b == 0x11), "{what}");
    }
}

#[test]
fn two_connections_to_one_multi_conn_image_see_each_others_writes() {
    let first = FakeServer::builder().size(1 << 16).multi_conn(true).build();
    let second = first.new_connection();
    let mut a = Pair::new(Config::default(), first);
    let mut b = Pair::new(Config::default(), second).with_splits(1, 5);
    a.handshake().unwrap();
    b.handshake().unwrap();
    assert!(a.client.can_multi_conn().unwrap() && b.client.can_multi_conn().unwrap());
    let w = a
        .client
        .pwrite(Bytes::from_static(b"from a"), 512, CmdFlags::empty())
        .unwrap();
    a.wait(w).unwrap().result.unwrap();
    let f = a.client.flush(CmdFlags::empty()).unwrap();
    a.wait(f).unwrap().result.unwrap();
    let r = b
        .client
        .pread(BytesMut::zeroed(6), 512, CmdFlags::empty())
        .unwrap();
    assert_eq!(&b.wait(r).unwrap().buffer.unwrap()[..], b"from a");
}
