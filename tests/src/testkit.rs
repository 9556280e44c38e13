//! Small helpers shared by the integration tests: a seeded pseudo-random
//! generator, the pattern plugin's bytes, and the `nbd` command-line binary.
//!
//! The `nbd` binary belongs to the `nbd-cli` package. Cargo sets
//! `CARGO_BIN_EXE_nbd` only for tests *inside* that package, and a
//! dev-dependency on `nbd-cli` would not build its binary either, so
//! [`nbd_binary`] runs `cargo build -p nbd-cli` once per test process (guarded
//! by a `OnceLock`, so parallel tests wait for the one build) and returns
//! `target/debug/nbd` of the workspace. Building every time (cargo is quick
//! when nothing changed) keeps the binary in step with the sources even when
//! only the tests were rebuilt.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Errno};

/// The one seeded generator of the tests: reproducible "random" offsets,
/// lengths and data.
pub use nbd_testkit::Rng;

/// What nbdkit's pattern plugin serves for `offset..offset + len`: each
/// 8-byte aligned word holds its own offset, big-endian.
///
/// ```
/// let bytes = nbd_tests::testkit::pattern_at(12, 6);
/// assert_eq!(bytes, [0, 0, 0, 8, 0, 0]);
/// ```
pub fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|at| (at & !7).to_be_bytes()[(at % 8) as usize])
        .collect()
}

/// The pattern plugin's bytes for an export of `len` bytes.
pub fn pattern_bytes(len: u64) -> Vec<u8> {
    pattern_at(0, len as usize)
}

/// The workspace's root directory (the parent of this package).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `nbd` binary of the workspace, built with `cargo build -p nbd-cli` the
/// first time it is asked for in this process (see the module docs).
pub fn nbd_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let root = workspace_root();
        // Cargo exports its own path to the tests it runs; fall back to PATH.
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let output = Command::new(&cargo)
            .args(["build", "--quiet", "-p", "nbd-cli", "--bin", "nbd"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run {cargo:?} build -p nbd-cli: {err}"));
        assert!(
            output.status.success(),
            "cargo build -p nbd-cli failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let binary = target_dir.join("debug").join("nbd");
        assert!(
            binary.is_file(),
            "{} is missing after cargo build -p nbd-cli",
            binary.display()
        );
        binary
    })
}

/// `nbd ARGS...` with stdin from /dev/null; returns its output whatever the
/// exit status.
pub fn run_nbd<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(nbd_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", nbd_binary().display()))
}

/// One step of a [`Workload`], already applied to its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `data` at `offset`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// Write `len` zeroes at `offset` (`NBD_CMD_WRITE_ZEROES`).
    Zero {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// Trim `len` bytes at `offset`; only generated when the workload was
    /// told trimmed bytes read back as zeroes.
    Trim {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// Read `expected.len()` bytes at `offset`; the export must hold `expected`.
    Read {
        /// Where.
        offset: u64,
        /// The model's bytes there when the read was generated.
        expected: Vec<u8>,
    },
}

/// A reproducible random mix of writes, zeroes, trims and reads over an
/// export of known contents, with a local model of what the export must hold.
///
/// Offsets and lengths are multiples of `align` (1 for any), lengths at most
/// `max_len`. Each generated [`Op`] has already been applied to
/// [`model`](Self::model), so a test applies it to the export in order and
/// compares every [`Op::Read`] with its `expected` bytes.
///
/// ```
/// use nbd_tests::testkit::{Op, Workload};
/// let mut work = Workload::new(7, vec![0; 4096], 512, 1024);
/// for _ in 0..20 {
///     if let Op::Read { offset, expected } = work.next_op() {
///         assert_eq!(expected, &work.model[offset as usize..][..expected.len()]);
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Workload {
    rng: Rng,
    align: u64,
    max_len: u64,
    zero: bool,
    trim: bool,
    /// What the export must hold.
    pub model: Vec<u8>,
}

impl Workload {
    /// A workload over an export that holds `initial` now; writes, zeroes and
    /// reads (no trims: see [`with_trim`](Self::with_trim)).
    pub fn new(seed: u64, initial: Vec<u8>, align: u64, max_len: u64) -> Self {
        assert!(align > 0 && max_len >= align && initial.len() as u64 >= align);
        Workload {
            rng: Rng::new(seed),
            align,
            max_len,
            zero: true,
            trim: false,
            model: initial,
        }
    }

    /// Whether to generate zero (write-zeroes) steps (default: yes).
    pub fn with_zero(mut self, on: bool) -> Self {
        self.zero = on;
        self
    }

    /// Whether to generate trims, modelled as zeroing: only for servers that
    /// promise trimmed bytes read back as zeroes (nbdkit's memory plugin).
    pub fn with_trim(mut self, on: bool) -> Self {
        self.trim = on;
        self
    }

    /// A random aligned `(offset, len)` inside the export.
    pub fn extent(&mut self) -> (u64, u64) {
        let size = self.model.len() as u64;
        let blocks = size / self.align;
        let max_blocks = (self.max_len / self.align).min(blocks);
        let len_blocks = self.rng.between(1, max_blocks);
        let offset_blocks = self.rng.below(blocks - len_blocks + 1);
        (offset_blocks * self.align, len_blocks * self.align)
    }

    /// The next step, already applied to the model.
    pub fn next_op(&mut self) -> Op {
        let (offset, len) = self.extent();
        let range = offset as usize..(offset + len) as usize;
        match self.rng.below(10) {
            0 if self.zero => {
                self.model[range].fill(0);
                Op::Zero { offset, len }
            }
            1 if self.trim => {
                self.model[range].fill(0);
                Op::Trim { offset, len }
            }
            0..=4 => {
                let data = self.rng.bytes(len as usize);
                self.model[range].copy_from_slice(&data);
                Op::Write { offset, data }
            }
            _ => Op::Read {
                offset,
                expected: self.model[range].to_vec(),
            },
        }
    }

    /// The generator, for extra choices of the test's own.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

/// What a client learnt in the handshake, to compare with `nbdinfo --json`
/// of the same export (see [`assert_matches_nbdinfo`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `"oldstyle"`, `"newstyle"` or `"newstyle-fixed"`.
    pub protocol: String,
    /// Whether structured replies are in use.
    pub structured: bool,
    /// nbdinfo's flag names (`is_read_only`, `can_flush`, ...) with our values.
    pub flags: Vec<(&'static str, bool)>,
    /// `(minimum, preferred, maximum)`, if the server sent block sizes.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// The export size.
    pub size: u64,
}

/// The flag names nbdinfo prints, in its order.
pub const NBDINFO_FLAGS: [&str; 10] = [
    "is_rotational",
    "is_read_only",
    "can_cache",
    "can_df",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_zero",
];

/// Asserts that `ours` agrees with `nbdinfo --json uri` on the protocol,
/// structured replies, every flag, and the block sizes (present in both or in
/// neither), and with `nbdinfo --size uri` on the size.
///
/// The size is taken from `nbdinfo --size` because `nbdinfo --json` reports
/// what `NBD_OPT_INFO` said, and nbd-server 3.24 answers `NBD_OPT_INFO` with
/// size 0 (only `NBD_OPT_GO` gives the real size).
pub fn assert_matches_nbdinfo(uri: &str, ours: &Negotiated) {
    use crate::clients::{json_value, nbdinfo_json, nbdinfo_size};
    let json = nbdinfo_json(uri);
    let field = |key: &str| {
        json_value(&json, key).unwrap_or_else(|| panic!("nbdinfo --json lacks {key}:\n{json}"))
    };
    assert_eq!(
        field("protocol"),
        ours.protocol,
        "protocol of {uri}\n{json}"
    );
    assert_eq!(
        field("structured"),
        ours.structured.to_string(),
        "structured replies of {uri}\n{json}"
    );
    let names: Vec<&str> = ours.flags.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, NBDINFO_FLAGS, "the caller must give every flag");
    for (name, value) in &ours.flags {
        assert_eq!(field(name), value.to_string(), "{name} of {uri}\n{json}");
    }
    let theirs = json_value(&json, "block_size_minimum").map(|_| {
        let get = |key: &str| field(key).parse::<u32>().expect("a number");
        (
            get("block_size_minimum"),
            get("block_size_preferred"),
            get("block_size_maximum"),
        )
    });
    assert_eq!(ours.block_sizes, theirs, "block sizes of {uri}\n{json}");
    assert_eq!(ours.size, nbdinfo_size(uri), "size of {uri}");
}

// ---------------------------------------------------------------- blocking-client helpers

/// What a client negotiated, in the shape nbdinfo is compared with; works for
/// either adapter through the protocol state they both expose.
pub fn negotiated(c: &nbd_proto::Connection) -> Negotiated {
    Negotiated {
        protocol: c.protocol().expect("the greeting was seen").to_string(),
        structured: c.structured_replies_negotiated(),
        flags: vec![
            ("is_rotational", c.is_rotational().unwrap()),
            ("is_read_only", c.is_read_only().unwrap()),
            ("can_cache", c.can_cache().unwrap()),
            ("can_df", c.can_df().unwrap()),
            ("can_fast_zero", c.can_fast_zero().unwrap()),
            ("can_flush", c.can_flush().unwrap()),
            ("can_fua", c.can_fua().unwrap()),
            ("can_multi_conn", c.can_multi_conn().unwrap()),
            ("can_trim", c.can_trim().unwrap()),
            ("can_zero", c.can_zero().unwrap()),
        ],
        block_sizes: c.block_sizes().map(|b| (b.minimum, b.preferred, b.maximum)),
        size: c.size().unwrap(),
    }
}

/// Reads `len` bytes at `offset`, panicking with the offset on failure.
pub fn read(client: &mut Client, offset: u64, len: u64) -> Vec<u8> {
    client
        .pread(BytesMut::zeroed(len as usize), offset, CmdFlags::empty())
        .unwrap_or_else(|e| panic!("pread of {len} at {offset}: {e}"))
        .to_vec()
}

/// Runs `steps` steps of `work` through a blocking client, checking every read
/// against the workload's model.
pub fn run_workload(client: &mut Client, work: &mut Workload, steps: usize) {
    for step in 0..steps {
        match work.next_op() {
            Op::Write { offset, data } => client
                .pwrite(Bytes::from(data), offset, CmdFlags::empty())
                .unwrap_or_else(|e| panic!("step {step}: write at {offset}: {e}")),
            Op::Zero { offset, len } => client
                .zero(len, offset, CmdFlags::empty())
                .unwrap_or_else(|e| panic!("step {step}: zero {len} at {offset}: {e}")),
            Op::Trim { offset, len } => client
                .trim(len, offset, CmdFlags::empty())
                .unwrap_or_else(|e| panic!("step {step}: trim {len} at {offset}: {e}")),
            Op::Read { offset, expected } => {
                let got = read(client, offset, expected.len() as u64);
                assert!(
                    got == expected,
                    "step {step}: {} bytes at {offset} differ from the model",
                    expected.len()
                );
            }
        }
    }
}

/// Asserts that `result` failed with `errno`, and returns the error.
pub fn assert_errno<T: std::fmt::Debug>(
    result: Result<T, Error>,
    errno: Errno,
    what: &str,
) -> Error {
    let err = result.expect_err(what);
    assert_eq!(err.errno(), Some(errno), "{what}: {err}");
    err
}

/// An nbdkit eval server of `reads` blocks of `block` bytes of the pattern
/// (see [`pattern_bytes`]) whose pread of block `i` sleeps `(reads - i) *
/// step_ms` milliseconds, in parallel threads: reads issued together complete
/// in reverse order.
pub fn nbdkit_reverse_order_reads(reads: u64, block: u64, step_ms: u64) -> crate::ServerHandle {
    let builder = crate::NbdkitBuilder::eval();
    let pattern = builder.dir().join("pattern.bin");
    std::fs::write(&pattern, pattern_bytes(reads * block))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", pattern.display()));
    let pread = format!(
        "ms=$(( ({reads} - $4 / {block}) * {step_ms} ))\n\
         sleep \"$((ms / 1000)).$(printf %03d $((ms % 1000)))\"\n\
         dd if={} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        pattern.display()
    );
    builder
        .method("thread_model", "echo parallel")
        .method("get_size", &format!("echo {}", reads * block))
        .method("pread", &pread)
        .threads(reads as u32)
        .start()
}

/// Runs `f` on its own thread and returns its result; panics naming `what`
/// if it has not returned within `limit` (the thread is left behind). Turns
/// a hang into a test failure; it never measures speed.
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => {
            worker.join().expect("the worker returned");
            value
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still waiting after {limit:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it returns"),
        },
    }
}
