//! `nbd_mio::MultiConn` beyond reads, writes and flushes: trims and zeroes
//! count as writes for a later flush, block status reports come back per
//! query through any connection, and cache goes out as any other command.

use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::{Events, Poll, Token};
use nbd_mio::{Client, MultiCompletion, MultiConn, MultiCookie};
use nbd_proto::{CmdFlags, Config};
use nbd_tests::NbdkitBuilder;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Long enough for a loaded machine; only turns a hang into a failure.
const LIMIT: Duration = Duration::from_secs(30);

/// Drives `group` until `cond` holds, collecting completions in `done`.
fn drive(
    poll: &mut Poll,
    group: &mut MultiConn,
    done: &mut Vec<MultiCompletion>,
    what: &str,
    mut cond: impl FnMut(&MultiConn, &[MultiCompletion]) -> bool,
) {
    let deadline = Instant::now() + LIMIT;
    let mut events = Events::with_capacity(64);
    loop {
        while let Some(c) = group.next_completion() {
            done.push(c);
        }
        if cond(group, done) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "waited {LIMIT:?} for {what}");
        poll.poll(&mut events, Some(left.min(Duration::from_secs(1))))
            .unwrap();
        for e in events.iter() {
            group
                .handle_event(e)
                .unwrap_or_else(|err| panic!("{what}: handle_event: {err}"));
        }
    }
}

fn completed(done: &[MultiCompletion], id: MultiCookie) -> bool {
    done.iter().any(|c| c.cookie == id)
}

#[test]
fn trims_and_zeroes_hold_back_a_flush_and_block_status_reports_come_back() {
    // Zeroes and trims held 300 ms by the server.
    let server = NbdkitBuilder::memory(8 * MIB)
        .filter("delay")
        .param("delay-zero", "300ms")
        .param("delay-trim", "300ms")
        .start();
    let mut poll = Poll::new().unwrap();
    let mut config = Config::default();
    config.meta_contexts.push("base:allocation".into());
    let mut group =
        MultiConn::connect_uri(&server.uri(), 3, config, poll.registry(), Token(0)).unwrap();
    let mut done = Vec::new();
    drive(&mut poll, &mut group, &mut done, "handshakes", |g, _| {
        g.is_ready().expect("memory advertises multi-conn")
    });

    // Data in the first MiB, then a zero and a trim over parts of it.
    let write = group
        .aio_pwrite(Bytes::from(vec![7u8; MIB as usize]), 0, CmdFlags::empty())
        .unwrap();
    group.send().unwrap();
    drive(&mut poll, &mut group, &mut done, "the write", |_, d| {
        completed(d, write)
    });
    let zero = group
        .aio_zero(256 * KIB, 256 * KIB, CmdFlags::empty())
        .unwrap();
    let trim = group
        .aio_trim(256 * KIB, 512 * KIB, CmdFlags::empty())
        .unwrap();
    let flush = group.aio_flush(CmdFlags::empty()).unwrap();
    group.send().unwrap();
    let on_wire: usize = group.clients().iter().map(Client::in_flight).sum();
    assert_eq!(
        on_wire, 2,
        "the flush went out before the zero and trim completed"
    );
    drive(&mut poll, &mut group, &mut done, "the flush", |_, d| {
        completed(d, flush)
    });
    let order: Vec<MultiCookie> = done.iter().map(|c| c.cookie).collect();
    assert_eq!(order.last(), Some(&flush), "{order:?}");
    assert!(completed(&done, zero) && completed(&done, trim));
    for c in done.drain(..) {
        c.result.unwrap();
    }

    // Block status through each connection in turn: every query gets its
    // own reports, from the connection that carried it.
    let queries: Vec<MultiCookie> = (0..3)
        .map(|_| {
            group
                .aio_block_status(8 * MIB, 0, CmdFlags::empty())
                .unwrap()
        })
        .collect();
    group.send().unwrap();
    drive(&mut poll, &mut group, &mut done, "the queries", |_, d| {
        queries.iter().all(|q| completed(d, *q))
    });
    for q in &queries {
        let reports = group.take_block_status(*q);
        assert_eq!(reports.len(), 1, "one context");
        let report = &reports[0];
        assert_eq!(report.context, "base:allocation");
        // The first 256 KiB are data; the zeroed and trimmed parts read as zero.
        let first = report.extents[0];
        assert_eq!(first.length, 256 * KIB, "{:?}", report.extents);
        assert_eq!(first.flags & 2, 0, "{:?}", report.extents);
        let mut at = 0;
        for e in &report.extents {
            if (256 * KIB..768 * KIB).contains(&at) {
                assert_eq!(e.flags & 2, 2, "not zero at {at}: {:?}", report.extents);
            }
            at += e.length;
        }
        assert!(group.take_block_status(*q).is_empty(), "taken twice");
    }
    for c in done.drain(..) {
        c.result.unwrap();
    }

    // Cache: sent where the server offers it, refused where it does not.
    let can_cache = group.clients()[0].connection().can_cache().unwrap();
    match group.aio_cache(MIB, 0, CmdFlags::empty()) {
        Ok(cache) => {
            assert!(can_cache, "cache issued to a server without it");
            group.send().unwrap();
            drive(&mut poll, &mut group, &mut done, "the cache", |_, d| {
                completed(d, cache)
            });
            done.pop().unwrap().result.unwrap();
        }
        Err(e) => assert!(!can_cache, "cache refused: {e}"),
    }
    group.aio_disconnect().unwrap();
}
