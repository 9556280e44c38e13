//! `nbd_tokio` against real servers: what only an async client has (many
//! tasks on one connection, futures that complete out of order or are
//! dropped, graceful shutdown and drop), and the rest of its surface: opt
//! mode, structured reads and block status, `MultiConn`, `ExportFile`,
//! the core's timeouts, and the targets it connects to.
//!
//! Every test runs on a runtime of its own and is bounded by
//! [`WAIT_LIMIT`], which turns a hang into a failure; no test asserts a
//! speed.

use std::future::Future;
use std::io::SeekFrom;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbd_proto::{CmdFlags, Config, Errno, ReadChunk};
use nbd_tests::testkit::{nbdkit_reverse_order_reads, pattern_at, Rng};
use nbd_tests::{read_export, NbdServerBuilder, NbdServerExport, NbdkitBuilder};
use nbd_tokio::{Client, Error, ExportFile, MultiConn, Target};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The longest any test waits for anything.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Runs `test` on a two-thread runtime, failing it if it outlasts [`WAIT_LIMIT`].
fn run<F: Future<Output = ()>>(test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        tokio::time::timeout(WAIT_LIMIT, test)
            .await
            .expect("the test finished within its limit");
    });
}

async fn connect(uri: &str) -> Client {
    Client::connect_uri(uri)
        .await
        .unwrap_or_else(|e| panic!("connect to {uri}: {e}"))
}

/// Asserts that `result` failed with `errno`.
fn assert_errno<T: std::fmt::Debug>(
    result: nbd_tokio::Result<T>,
    errno: Errno,
    what: &str,
) -> Error {
    let err = result.expect_err(what);
    assert_eq!(err.errno(), Some(errno), "{what}: {err}");
    err
}

// ------------------------------------------------------------------ many tasks

/// Sixteen tasks on two threads share one client, each writing and reading
/// back a region of its own with several commands in flight; every byte
/// comes back right, and the server holds what the tasks wrote.
#[test]
fn many_tasks_share_one_client() {
    const TASKS: u64 = 16;
    const REGION: u64 = 256 * KIB;
    let server = NbdkitBuilder::memory(TASKS * REGION).start();
    let uri = server.uri();
    let image = Arc::new(Mutex::new(vec![0u8; (TASKS * REGION) as usize]));
    run(async {
        let client = connect(&uri).await;
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let client = client.clone();
            let image = image.clone();
            tasks.spawn(async move {
                let mut rng = Rng::new(100 + t);
                let base = t * REGION;
                for round in 0..8 {
                    // Four writes in flight at once, on disjoint pieces.
                    let mut writes = Vec::new();
                    for piece in 0..4u64 {
                        let len = rng.between(1, REGION / 4);
                        let at = base + piece * (REGION / 4);
                        let data = rng.bytes(len as usize);
                        image.lock().unwrap()[at as usize..][..data.len()].copy_from_slice(&data);
                        writes.push(
                            client
                                .aio_pwrite(Bytes::from(data), at, CmdFlags::empty())
                                .unwrap(),
                        );
                    }
                    for write in writes {
                        write
                            .await
                            .unwrap_or_else(|e| panic!("task {t} round {round}: {e}"));
                    }
                    let (a, b) = tokio::join!(
                        client.pread(
                            BytesMut::zeroed((REGION / 2) as usize),
                            base,
                            CmdFlags::empty()
                        ),
                        client.pread(
                            BytesMut::zeroed((REGION / 2) as usize),
                            base + REGION / 2,
                            CmdFlags::empty()
                        ),
                    );
                    let mut got = a.unwrap().to_vec();
                    got.extend_from_slice(&b.unwrap());
                    assert!(
                        got[..] == image.lock().unwrap()[base as usize..][..REGION as usize],
                        "task {t} round {round}: its region reads back wrong"
                    );
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a task panicked");
        }
        assert_eq!(client.in_flight(), 0);
        client.shutdown().await.expect("clean shutdown");
    });
    assert!(
        read_export(&server.uri()) == *image.lock().unwrap(),
        "nbdcopy sees other bytes than the tasks wrote"
    );
}

/// Reads whose replies come in reverse order (an eval plugin that sleeps
/// longer for lower offsets) each resolve with their own data, and they
/// resolve out of the order they were issued in.
#[test]
fn replies_out_of_order_reach_their_own_futures() {
    const READS: u64 = 24;
    const BLOCK: u64 = 4096;
    let server = nbdkit_reverse_order_reads(READS, BLOCK, 10);
    run(async {
        let client = connect(&server.uri()).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..READS {
            let read = client
                .aio_pread(
                    BytesMut::zeroed(BLOCK as usize),
                    i * BLOCK,
                    CmdFlags::empty(),
                )
                .unwrap();
            let order = order.clone();
            tasks.spawn(async move {
                let data = read.await.unwrap();
                order.lock().unwrap().push(i);
                assert!(
                    data[..] == pattern_at(i * BLOCK, BLOCK as usize)[..],
                    "read {i} has another read's data"
                );
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a read task panicked");
        }
        let order = order.lock().unwrap().clone();
        let issued: Vec<u64> = (0..READS).collect();
        assert_ne!(order, issued, "completions came in issue order");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, issued, "every read completed once");
        client.shutdown().await.unwrap();
    });
}

// ------------------------------------------------------------------ ending

/// `shutdown` while writes are in flight (held back by a delay filter):
/// the writes complete first, successfully, the server has them, and the
/// client refuses new commands afterwards. A write whose future was
/// dropped is still carried out.
#[test]
fn graceful_shutdown_waits_for_commands_in_flight() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-write", "300ms")
        .start();
    run(async {
        let client = connect(&server.uri()).await;
        let writes: Vec<_> = (0..8u64)
            .map(|i| {
                client
                    .aio_pwrite(
                        Bytes::from(vec![i as u8 + 1; 4096]),
                        i * 4096,
                        CmdFlags::empty(),
                    )
                    .unwrap()
            })
            .collect();
        let dropped = client
            .aio_pwrite(Bytes::from(vec![0xdd; 4096]), 64 * KIB, CmdFlags::empty())
            .unwrap();
        drop(dropped);
        let (ended, results) = tokio::join!(client.shutdown(), async {
            let mut results = Vec::new();
            for write in writes {
                results.push(write.await);
            }
            results
        });
        ended.expect("a clean shutdown");
        for (i, result) in results.into_iter().enumerate() {
            result.unwrap_or_else(|e| panic!("write {i} was cut short: {e}"));
        }
        assert!(client.is_closed());
        assert_eq!(client.in_flight(), 0);
        let err = client
            .pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .await
            .expect_err("a command after shutdown");
        assert!(
            matches!(err.errno(), Some(Errno::Shutdown | Errno::NotConn)),
            "{err}"
        );
        // A second shutdown has nothing to do.
        client.shutdown().await.expect("shutdown again");
    });
    let data = read_export(&server.uri());
    for i in 0..8usize {
        assert_eq!(
            data[i * 4096..][..4096],
            vec![i as u8 + 1; 4096][..],
            "write {i}"
        );
    }
    assert_eq!(
        data[64 * KIB as usize..][..4096],
        [0xdd; 4096][..],
        "the dropped write"
    );
}

/// Whether process `pid` still exists (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

/// Dropping the last clone without `shutdown`: a command still held
/// completes (the goodbye waits for it), then the connection closes: the
/// server the client started (nbdkit -s, which serves one connection) is
/// stopped. Nothing blocks, nothing panics.
#[test]
fn dropping_the_last_clone_closes_after_commands_in_flight() {
    let target = Target::command([
        "nbdkit",
        "-s",
        "--filter=delay",
        "memory",
        "1M",
        "delay-read=200ms",
    ]);
    run(async {
        let socket = nbd_io::connect(&target).expect("start nbdkit -s");
        let pid = socket.server_pid().expect("the target started a server");
        let client = Client::connect_socket(socket, Config::default())
            .await
            .unwrap();
        let other = client.clone();
        let read = client
            .aio_pread(BytesMut::zeroed(4096), 0, CmdFlags::empty())
            .unwrap();
        drop(client);
        // One clone left: nothing is said yet.
        assert!(!other.is_closed());
        let started = Instant::now();
        drop(other);
        assert!(started.elapsed() < Duration::from_secs(1), "drop blocked");
        let data = read.await.expect("the read in flight completes");
        assert_eq!(data[..], [0; 4096][..]);
        while process_alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// A runtime shut down under a connection with commands in flight, their
/// futures dropped with it: no hang and no panic; a future that outlives
/// the runtime resolves with an error instead of waiting for ever.
#[test]
fn a_runtime_shut_down_under_a_connection_ends_it() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-read", "2")
        .start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, read) = runtime.block_on(async {
        let client = connect(&server.uri()).await;
        let read = client
            .aio_pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .unwrap();
        tokio::task::yield_now().await;
        (client, read)
    });
    let started = Instant::now();
    drop(runtime);
    assert!(client.is_closed(), "the driver's end ended the connection");
    let outcome = block_on_without_io(read);
    assert!(outcome.is_err(), "{outcome:?}");
    drop(client);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "dropping blocked"
    );
}

/// Polls `future` to completion on this thread without a runtime (it must
/// not need one: a command's future only waits on its slot).
fn block_on_without_io<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(future)
}

// ------------------------------------------------------------------ opt mode

/// Opt mode: the export list, `opt_info` per export, a refused name leaves
/// the connection negotiating, meta contexts, then `opt_go`; `opt_abort`
/// ends another negotiation cleanly.
#[test]
fn opt_mode_lists_informs_and_goes() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("exportname")
        .param("exportname-list", "explicit")
        .param("exportname", "alpha")
        .param("exportname", "beta")
        .param("exportname-strict", "true")
        .param("exportdesc", "fixed:a memory disk")
        .export_name("alpha")
        .start();
    run(async {
        let config = Config::default().opt_mode(true);
        let client = Client::connect_uri_with(&server.uri(), config)
            .await
            .unwrap();
        assert!(client.connection().is_negotiating());
        let list = client.opt_list().await.unwrap();
        let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["alpha", "beta"]);
        assert!(
            list.iter().all(|e| e.description == "a memory disk"),
            "{list:?}"
        );
        for name in ["alpha", "beta"] {
            client.set_export_name(name).unwrap();
            client.opt_info().await.unwrap();
            assert!(client.connection().is_negotiating());
            assert_eq!(client.size().unwrap(), MIB, "{name}");
        }
        client.set_export_name("nope").unwrap();
        assert_errno(
            client.opt_info().await,
            Errno::NoEnt,
            "opt_info of a missing export",
        );
        assert_errno(
            client.opt_go().await,
            Errno::NoEnt,
            "opt_go of a missing export",
        );
        assert!(client.connection().is_negotiating());

        client.set_export_name("beta").unwrap();
        let listed = client.opt_list_meta_context(&[]).await.unwrap();
        assert!(listed.iter().any(|c| c == "base:allocation"), "{listed:?}");
        let set = client
            .opt_set_meta_context(&["base:allocation".to_string()])
            .await
            .unwrap();
        assert_eq!(set.len(), 1, "{set:?}");
        assert_eq!(set[0].1, "base:allocation");
        client.opt_go().await.unwrap();
        assert!(client.connection().is_ready());
        assert!(client.can_meta_context("base:allocation"));
        client
            .pwrite(Bytes::from_static(b"beta!"), 0, CmdFlags::empty())
            .await
            .unwrap();
        let back = client
            .pread(BytesMut::zeroed(5), 0, CmdFlags::empty())
            .await
            .unwrap();
        assert_eq!(&back[..], b"beta!");
        client.shutdown().await.unwrap();

        let config = Config::default().opt_mode(true);
        let client = Client::connect_uri_with(&server.uri(), config)
            .await
            .unwrap();
        client.opt_abort().await.expect("a clean abort");
        assert!(client.is_closed());
    });
}

/// nbd-server: its export list in opt mode, then one export by name,
/// written and read back with several commands in flight.
#[test]
fn nbd_server_lists_and_serves_exports() {
    let server = NbdServerBuilder::new()
        .export_with(NbdServerExport::new("one", MIB).option("flush", "true"))
        .export_with(NbdServerExport::with_bytes("two", b"reference server bytes").readonly())
        .start();
    run(async {
        let config = Config::default().opt_mode(true);
        let client = Client::connect_uri_with(&server.uri(), config)
            .await
            .unwrap();
        let list = client.opt_list().await.unwrap();
        let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        client.set_export_name("one").unwrap();
        client.opt_go().await.unwrap();
        assert_eq!(client.size().unwrap(), MIB);
        let writes: Vec<_> = (0..16u64)
            .map(|i| {
                client
                    .aio_pwrite(
                        Bytes::from(vec![i as u8; 4096]),
                        i * 8192,
                        CmdFlags::empty(),
                    )
                    .unwrap()
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }
        client.flush(CmdFlags::empty()).await.unwrap();
        let reads: Vec<_> = (0..16u64)
            .map(|i| {
                client
                    .aio_pread(BytesMut::zeroed(8192), i * 8192, CmdFlags::empty())
                    .unwrap()
            })
            .collect();
        for (i, read) in reads.into_iter().enumerate() {
            let data = read.await.unwrap();
            assert_eq!(data[..4096], vec![i as u8; 4096][..], "read {i}");
            assert_eq!(data[4096..], [0; 4096][..], "read {i}");
        }
        client.shutdown().await.unwrap();

        let uri = server.uri_for("two");
        let client = connect(&uri).await;
        assert!(client.is_read_only().unwrap());
        let data = client
            .pread(BytesMut::zeroed(9), 0, CmdFlags::empty())
            .await
            .unwrap();
        assert_eq!(&data[..], b"reference");
        client.shutdown().await.unwrap();
    });
}

// ------------------------------------------------------------------ commands

/// `pread_structured` hands back the chunks of its reply, which tile the
/// request exactly; `block_status` one report per negotiated context.
#[test]
fn structured_reads_and_block_status() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    run(async {
        let config = Config::default().meta_context("base:allocation");
        let client = Client::connect_uri_with(&server.uri(), config)
            .await
            .unwrap();
        assert!(client.connection().structured_replies_negotiated());
        client
            .pwrite(
                Bytes::from(vec![7; 64 * KIB as usize]),
                MIB,
                CmdFlags::empty(),
            )
            .await
            .unwrap();
        let (offset, len) = (MIB - 4 * KIB, 72 * KIB);
        let (buf, chunks) = client
            .pread_structured(BytesMut::zeroed(len as usize), offset, CmdFlags::empty())
            .await
            .unwrap();
        let mut expected = vec![0u8; len as usize];
        expected[4 * KIB as usize..][..64 * KIB as usize].fill(7);
        assert!(buf[..] == expected[..]);
        let mut spans: Vec<(u64, u64)> = chunks
            .iter()
            .map(|c| match c {
                ReadChunk::Data { offset, length, .. } | ReadChunk::Hole { offset, length, .. } => {
                    (*offset, *length)
                }
                other => panic!("an unexpected chunk: {other:?}"),
            })
            .collect();
        spans.sort_unstable();
        let mut at = offset;
        for (o, l) in spans {
            assert_eq!(o, at, "chunks {chunks:?}");
            at += l;
        }
        assert_eq!(at, offset + len, "chunks {chunks:?}");

        let reports = client
            .block_status(2 * MIB, 0, CmdFlags::empty())
            .await
            .unwrap();
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].context, "base:allocation");
        assert!(!reports[0].extents.is_empty());
        client.shutdown().await.unwrap();
    });
}

/// Commands the core refuses fail in the `aio_` call itself, before
/// anything is sent, and the connection carries on.
#[test]
fn refused_commands_fail_at_the_call() {
    let server = NbdkitBuilder::memory(MIB).readonly().start();
    run(async {
        let client = connect(&server.uri()).await;
        assert!(client.is_read_only().unwrap());
        assert_errno(
            client
                .aio_pwrite(Bytes::from_static(b"x"), 0, CmdFlags::empty())
                .map(drop),
            Errno::Perm,
            "write to a read-only export",
        );
        assert_errno(
            client
                .aio_pread(BytesMut::zeroed(4096), MIB - 100, CmdFlags::empty())
                .map(drop),
            Errno::Inval,
            "read past the end",
        );
        assert_eq!(client.in_flight(), 0);
        let data = client
            .pread(BytesMut::zeroed(100), 0, CmdFlags::empty())
            .await
            .unwrap();
        assert_eq!(data[..], [0; 100][..]);
        client.shutdown().await.unwrap();
    });
}

// ------------------------------------------------------------------ MultiConn

/// Four connections used as one: writes spread over them are read back
/// through all of them; an export without multi-conn is refused.
#[test]
fn multi_conn_spreads_commands_over_connections() {
    let server = NbdkitBuilder::memory(4 * MIB).start();
    run(async {
        let multi = MultiConn::connect_uri(&server.uri(), 4, Config::default())
            .await
            .unwrap();
        assert_eq!(multi.clients().len(), 4);
        let mut rng = Rng::new(5);
        let mut image = vec![0u8; 4 * MIB as usize];
        let mut writes = Vec::new();
        for i in 0..16u64 {
            let data = rng.bytes(64 * KIB as usize);
            image[(i * 256 * KIB) as usize..][..data.len()].copy_from_slice(&data);
            writes.push(
                multi
                    .aio_pwrite(Bytes::from(data), i * 256 * KIB, CmdFlags::empty())
                    .unwrap(),
            );
        }
        for write in writes {
            write.await.unwrap();
        }
        multi.flush(CmdFlags::empty()).await.unwrap();
        for i in 0..16u64 {
            let got = multi
                .pread(
                    BytesMut::zeroed(256 * KIB as usize),
                    i * 256 * KIB,
                    CmdFlags::empty(),
                )
                .await
                .unwrap();
            assert!(got[..] == image[(i * 256 * KIB) as usize..][..256 * KIB as usize]);
        }
        multi.shutdown().await.unwrap();
        assert!(multi.clients().iter().all(Client::is_closed));
    });

    let single = NbdkitBuilder::memory(MIB)
        .filter("multi-conn")
        .param("multi-conn-mode", "disable")
        .start();
    run(async {
        let err = MultiConn::connect_uri(&single.uri(), 2, Config::default())
            .await
            .expect_err("no multi-conn advertised");
        assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    });
}

// ------------------------------------------------------------------ ExportFile

/// An export as `AsyncRead + AsyncWrite + AsyncSeek`: a copy in, seeks,
/// reads back, end of export, a write past the end refused.
#[test]
fn export_file_reads_writes_and_seeks() {
    let server = NbdkitBuilder::memory(MIB + 100).start();
    let data = Rng::new(3).bytes(300 * KIB as usize);
    run(async {
        let client = connect(&server.uri()).await;
        let mut file = ExportFile::new(client.clone()).unwrap();
        assert_eq!(file.size(), MIB + 100);
        file.seek(SeekFrom::Start(1000)).await.unwrap();
        tokio::io::copy(&mut &data[..], &mut file).await.unwrap();
        file.flush().await.unwrap();
        assert_eq!(
            file.stream_position().await.unwrap(),
            1000 + data.len() as u64
        );

        file.seek(SeekFrom::Start(1000)).await.unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact(&mut back).await.unwrap();
        assert!(back == data);

        file.seek(SeekFrom::End(-10)).await.unwrap();
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, vec![0; 10]);
        let err = file
            .write_all(b"more")
            .await
            .expect_err("a write past the end");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        assert!(file
            .seek(SeekFrom::Current(-(MIB as i64) * 2))
            .await
            .is_err());
        file.shutdown().await.unwrap();
        client.shutdown().await.unwrap();
    });
    let image = read_export(&server.uri());
    assert!(image[1000..][..data.len()] == data[..]);
}

// ------------------------------------------------------------------ timeouts

/// The core's timeouts work in this adapter: a command timeout fails the
/// slow command alone (ETIMEDOUT) and the connection carries on; a stall
/// timeout ends the connection and fails what was pending once; a
/// handshake timeout fails a connect to a server that never speaks.
#[test]
fn timeouts_of_the_config_apply() {
    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-read", "2")
        .start();
    run(async {
        let config = Config::default().command_timeout(Some(Duration::from_millis(200)));
        let client = Client::connect_uri_with(&server.uri(), config)
            .await
            .unwrap();
        let err = client
            .pread(BytesMut::zeroed(512), 0, CmdFlags::empty())
            .await
            .expect_err("a read slower than its timeout");
        assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");
        client
            .pwrite(Bytes::from_static(b"still here"), 0, CmdFlags::empty())
            .await
            .expect("the connection carries on");
        client
            .shutdown()
            .await
            .expect("the late reply is consumed, then a clean end");
    });

    let server = NbdkitBuilder::memory(MIB)
        .filter("delay")
        .param("delay-read", "3")
        .start();
    run(async {
        let config = Config::default().stall_timeout(Some(Duration::from_millis(300)));
        let client = Client::connect_uri_with(&server.uri(), config)
            .await
            .unwrap();
        let reads: Vec<_> = (0..4)
            .map(|i| {
                client
                    .aio_pread(BytesMut::zeroed(512), i * 512, CmdFlags::empty())
                    .unwrap()
            })
            .collect();
        for read in reads {
            let err = read.await.expect_err("a stalled connection");
            assert_eq!(err.errno(), Some(Errno::NotConn), "{err}");
        }
        assert!(client.is_closed());
        let err = client.closed().await.expect_err("the stall ended it");
        assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");
    });

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    run(async {
        let config = Config::default().handshake_timeout(Some(Duration::from_millis(200)));
        let started = Instant::now();
        let err = Client::connect_uri_with(&format!("nbd://127.0.0.1:{port}/"), config)
            .await
            .expect_err("a server that never speaks");
        assert_eq!(err.errno(), Some(Errno::TimedOut), "{err}");
        assert!(started.elapsed() < WAIT_LIMIT);
    });
    drop(listener);
}

// ------------------------------------------------------------------ targets

/// The connection layer's targets: TCP, socket activation, and failures
/// that name what could not be reached.
#[test]
fn connects_to_every_kind_of_target() {
    let tcp = NbdkitBuilder::memory(MIB).tcp().start();
    run(async {
        let client = connect(&tcp.uri()).await;
        assert_eq!(client.size().unwrap(), MIB);
        client.shutdown().await.unwrap();

        let target = Target::activation(["nbdkit", "memory", "2M"]);
        let client = Client::connect(&target, Config::default()).await.unwrap();
        assert_eq!(client.size().unwrap(), 2 * MIB);
        client.shutdown().await.unwrap();

        let missing = Path::new("/nonexistent/nbd.sock");
        let err = Client::connect(&Target::Unix(missing.into()), Config::default())
            .await
            .expect_err("nobody listens there");
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/nbd.sock"), "{err}");

        // TLS settings are read before anything is reached.
        let err = Client::connect_uri("nbds+unix:///?socket=/tmp/x.sock&tls-type=anon")
            .await
            .expect_err("anonymous TLS is refused");
        assert!(matches!(err, Error::Tls(_)), "{err:?}");
    });
}
