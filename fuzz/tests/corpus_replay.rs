//! Replays both corpora through the harnesses as ordinary tests, checks the
//! seeds, and runs a few thousand pseudo-random inputs from a fixed seed so
//! the harness is exercised broadly without libFuzzer.
//!
//! Files named `crash-*` reproduce bugs fuzzing found (now fixed): each also
//! has its own named test below.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use nbd_fuzz::rng::Rng;
use nbd_fuzz::seeds::{server_bytes_seeds, structured_seeds};
use nbd_fuzz::structured::StructuredInput;
use nbd_fuzz::Report;
use nbd_proto::Phase;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Every corpus file of `target`, sorted.
fn corpus_files(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(corpus(target))
        .unwrap_or_else(|e| panic!("corpus/{target}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, fs::read(&p).expect("readable corpus file"))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input, collecting the names of those that panic.
fn replay(target: &str, run: impl Fn(&[u8])) {
    let files = corpus_files(target);
    assert!(!files.is_empty(), "corpus/{target} is empty");
    let failed: Vec<&str> = files
        .iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| run(data))).is_err())
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "corpus/{target}: {} of {} inputs failed: {failed:?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn server_bytes_corpus_replays() {
    replay("server_bytes", |data| {
        nbd_fuzz::server_bytes(data);
    });
}

#[test]
fn structured_corpus_replays() {
    replay("structured", |data| {
        nbd_fuzz::structured(data);
    });
}

fn seed_files() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for (name, data) in server_bytes_seeds() {
        files.push((corpus("server_bytes").join(format!("seed-{name}")), data));
    }
    for (name, input) in structured_seeds() {
        files.push((
            corpus("structured").join(format!("seed-{name}")),
            input.to_bytes(),
        ));
    }
    files
}

/// Regenerates the seed files: `cargo test -p nbd-fuzz --test corpus_replay -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus/*/seed-*; run by hand after changing the seeds"]
fn write_seed_corpus() {
    for (path, data) in seed_files() {
        fs::create_dir_all(path.parent().expect("parent")).expect("corpus dir");
        fs::write(&path, data).expect("seed written");
    }
}

#[test]
fn seed_files_are_up_to_date() {
    for (path, data) in seed_files() {
        let on_disk = fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == data,
            "{} is missing or stale: run `cargo test -p nbd-fuzz --test corpus_replay -- --ignored write_seed_corpus`",
            path.display()
        );
    }
}

#[test]
fn structured_seeds_round_trip_through_arbitrary() {
    for (name, input) in structured_seeds() {
        let decoded = StructuredInput::decode(&input.to_bytes()).expect("decodes");
        assert_eq!(decoded, input, "seed {name} does not decode to itself");
    }
}

fn server_bytes_report(name: &str) -> Report {
    let (_, data) = server_bytes_seeds()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("seed exists");
    nbd_fuzz::server_bytes(&data)
}

fn structured_report(name: &str) -> Report {
    let (_, input) = structured_seeds()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("seed exists");
    nbd_fuzz::structured::run(&input)
}

/// The seeds reach the states they were written for, so the corpus keeps the
/// fuzzers starting deep in the protocol.
#[test]
fn seeds_reach_their_goals() {
    let r = server_bytes_report("oldstyle-read-write-flush-disconnect");
    assert_eq!(
        (r.cookies, r.ok_completions, r.final_phase),
        (3, 3, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = server_bytes_report("newstyle-export-name-reads");
    assert_eq!(
        (r.cookies, r.ok_completions, r.err_completions),
        (3, 2, 1),
        "{r:?}"
    );

    for name in [
        "fixed-go-structured-reads",
        "fixed-go-structured-reads-bytewise",
    ] {
        let r = server_bytes_report(name);
        assert_eq!(
            (r.cookies, r.ok_completions, r.read_chunks),
            (4, 4, 3),
            "{name}: {r:?}"
        );
        assert_eq!(r.final_phase, Some(Phase::Closed), "{name}: {r:?}");
    }

    let r = server_bytes_report("fixed-go-error-chunks");
    assert_eq!(
        (r.cookies, r.ok_completions, r.err_completions),
        (6, 1, 5),
        "{r:?}"
    );

    let r = server_bytes_report("opt-mode-list-info-go");
    assert_eq!(
        (r.exports, r.ok_options, r.ok_completions),
        (2, 3, 1),
        "{r:?}"
    );

    let r = server_bytes_report("opt-mode-refusals-abort");
    assert_eq!(
        (r.ok_options, r.final_phase),
        (1, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = server_bytes_report("fixed-unsup-fallback-export-name");
    assert_eq!(r.ok_completions, 2, "{r:?}");

    let r = server_bytes_report("soft-shutdown-eshutdown");
    assert_eq!(
        (r.ok_completions, r.err_completions, r.final_phase),
        (1, 1, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = server_bytes_report("rep-err-shutdown-during-go");
    assert_eq!(r.final_phase, Some(Phase::Dead), "{r:?}");

    let r = server_bytes_report("starttls-required-go-read");
    assert_eq!(
        (r.cookies, r.ok_completions, r.final_phase),
        (1, 1, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = server_bytes_report("strict-off-odd-commands");
    assert_eq!((r.cookies, r.ok_completions), (4, 3), "{r:?}");

    let r = server_bytes_report("extended-meta-block-status");
    assert_eq!(
        (r.cookies, r.ok_completions, r.block_statuses, r.read_chunks),
        (4, 4, 2, 2),
        "{r:?}"
    );
    assert_eq!(r.final_phase, Some(Phase::Closed), "{r:?}");

    let r = server_bytes_report("opt-mode-meta-contexts");
    assert_eq!(
        (
            r.meta_contexts,
            r.ok_options,
            r.block_statuses,
            r.ok_completions
        ),
        (4, 3, 2, 1),
        "{r:?}"
    );

    let r = server_bytes_report("stale-cookie-after-completion");
    assert_eq!(
        (r.ok_completions, r.final_phase),
        (2, Some(Phase::Dead)),
        "{r:?}"
    );

    let r = structured_report("go-structured-data-holes");
    assert_eq!(
        (r.verified_reads, r.ok_completions, r.final_phase),
        (2, 4, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = structured_report("oldstyle-simple-replies");
    assert_eq!((r.verified_reads, r.err_completions), (2, 2), "{r:?}");

    let r = structured_report("go-structured-errors");
    assert_eq!((r.ok_completions, r.err_completions), (0, 4), "{r:?}");

    let r = structured_report("newstyle-no-zeroes");
    assert_eq!(
        (r.verified_reads, r.final_phase),
        (1, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = structured_report("export-name-fallback-structured");
    assert_eq!(r.verified_reads, 1, "{r:?}");

    let r = structured_report("soft-shutdown");
    assert_eq!(
        (r.verified_reads, r.final_phase),
        (1, Some(Phase::Closed)),
        "{r:?}"
    );

    let r = structured_report("extended-block-status-reads");
    assert_eq!(
        (r.verified_reads, r.block_statuses, r.ok_completions),
        (1, 2, 4),
        "{r:?}"
    );
    assert_eq!(r.final_phase, Some(Phase::Closed), "{r:?}");

    let r = structured_report("plain-go-no-structured");
    assert_eq!((r.verified_reads, r.ok_completions), (2, 3), "{r:?}");
}

/// Applies a few random edits to `data`.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        let len = data.len() as u64;
        match rng.below(6) {
            0 | 1 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                let i = rng.below(len) as usize;
                data[i] = rng.next_u64() as u8;
            }
            3 => {
                let i = rng.below(len + 1) as usize;
                let n = rng.size(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len) as usize;
                let n = (rng.size(16)).min(data.len() - i);
                data.drain(i..i + n);
            }
            _ if len > 0 => {
                // Copy a slice over another place, like libFuzzer's CopyPart.
                let from = rng.below(len) as usize;
                let to = rng.below(len) as usize;
                let n = rng.size(32).min(data.len() - from).min(data.len() - to);
                let part = data[from..from + n].to_vec();
                data[to..to + n].copy_from_slice(&part);
            }
            _ => data.push(rng.next_u64() as u8),
        }
    }
}

/// A few thousand inputs from a fixed seed: mutated corpus files of both
/// targets, and random bytes for the structured target (any bytes decode).
#[test]
fn pseudo_random_inputs() {
    const RUNS: usize = 3000;
    let server = corpus_files("server_bytes");
    let structured = corpus_files("structured");
    let mut rng = Rng::new(0x6e62_645f_6675_7a7a);
    let mut failures = Vec::new();
    for i in 0..RUNS {
        let mut a = server[rng.below(server.len() as u64) as usize].1.clone();
        mutate(&mut rng, &mut a);
        if catch_unwind(AssertUnwindSafe(|| nbd_fuzz::server_bytes(&a))).is_err() {
            failures.push(format!("server_bytes #{i}: {a:02x?}"));
        }
        let b = if i % 2 == 0 {
            let mut b = structured[rng.below(structured.len() as u64) as usize]
                .1
                .clone();
            mutate(&mut rng, &mut b);
            b
        } else {
            let n = rng.below(512) as usize;
            (0..n).map(|_| rng.next_u64() as u8).collect()
        };
        if catch_unwind(AssertUnwindSafe(|| nbd_fuzz::structured(&b))).is_err() {
            failures.push(format!("structured #{i}: {b:02x?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing inputs, first: {}",
        failures.len(),
        failures[0]
    );
}

/// Runs the corpus files named in `NBD_FUZZ_FILES` (space-separated paths);
/// with `NBD_FUZZ_TRACE=1` every event is printed. For debugging.
#[test]
#[ignore = "debugging aid: NBD_FUZZ_FILES=path... cargo test -p nbd-fuzz --test corpus_replay -- --ignored run_named_files --nocapture"]
fn run_named_files() {
    let files = std::env::var("NBD_FUZZ_FILES").unwrap_or_default();
    for path in files.split_whitespace() {
        let data = fs::read(path).expect("readable file");
        let structured = path.contains("structured");
        eprintln!(
            "== {path} ({} bytes, {})",
            data.len(),
            if structured {
                "structured"
            } else {
                "server_bytes"
            }
        );
        if structured {
            eprintln!("{:#?}", StructuredInput::decode(&data));
            eprintln!("{:?}", nbd_fuzz::structured(&data));
        } else {
            eprintln!("{:?}", nbd_fuzz::server_bytes(&data));
        }
    }
}

fn reproducer(target: &str, name: &str) -> Vec<u8> {
    fs::read(corpus(target).join(name)).expect("reproducer file")
}

/// A bug nbd-proto had, found by `server_bytes`: a plain newstyle server
/// (no fixed-newstyle flag) hangs up after the client's automatic
/// `NBD_OPT_EXPORT_NAME`. The connection reports
/// `OptionDone { option: NBD_OPT_EXPORT_NAME, result: Err(NotConnected(..)) }`
/// before `Closed`, although no caller's option is in flight: `kill` skips
/// only `PendingOpt::is_auto()` options, and that excludes `ExportName`.
/// Automatic steps are meant to report nothing but `Closed`. Fixed: this
/// input now replays cleanly.
#[test]
fn crash_option_done_for_automatic_export_name() {
    let data = reproducer(
        "server_bytes",
        "crash-option-done-for-automatic-export-name",
    );
    nbd_fuzz::server_bytes::run(&data);
}

/// A bug nbd-proto had, found by `server_bytes`: the server refuses the
/// automatic `NBD_OPT_STRUCTURED_REPLY` with `NBD_REP_ERR_SHUTDOWN`, the
/// client sends `NBD_OPT_ABORT` by itself, and the server's next 20 bytes are
/// not an option reply (bad magic). The connection reports
/// `OptionDone { option: NBD_OPT_ABORT, result: Err(Protocol("option reply:
/// bad magic 0x0")) }` before `Closed`, for an abort no caller asked for:
/// `kill` reports every pending option that is not `is_auto()`, and the
/// post-shutdown `PendingOpt::Abort` is not. (The clean path, where the
/// server acknowledges the abort, reports nothing, as intended.) Fixed: this
/// input now replays cleanly.
#[test]
fn crash_option_done_for_post_shutdown_abort() {
    let data = reproducer("server_bytes", "crash-option-done-for-post-shutdown-abort");
    nbd_fuzz::server_bytes::run(&data);
}
