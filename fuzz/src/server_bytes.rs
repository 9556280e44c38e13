//! Target `server_bytes`: arbitrary bytes are the server's side of the stream.
//!
//! Layout of an input (missing bytes read as 0):
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 0 | config bits, see [`cfg`](mod@cfg) |
//! | 1 | bits 0-5: [`Strict`] bits; bit 6: lockstep (see below) |
//! | 2 | low nibble: A's chunk size cap, high nibble: B's read size cap (index into [`SPLIT_SIZES`]) |
//! | 3 | seed of the chunk sizes |
//! | 4 | number of script ops, modulo [`MAX_OPS`]` + 1` |
//! | 5 | more config bits, see [`cfg2`] |
//! | 6.. | the ops, [`RawOp::LEN`] bytes each |
//! | rest | the server's byte stream |
//!
//! The stream is fed in chunks; after each chunk the script's ops that are due
//! run (see [`RawOp`]). With lockstep, while the next op waits the stream is fed
//! one byte at a time, so a command is issued right when the connection
//! becomes ready and replies later in the stream find their cookie in flight.
//! Cookies are `1 << 32 | slot`, slots counting from 0 (see [`cookie`]).

use std::collections::VecDeque;

use nbd_proto::{Config, HandshakeFlags, Phase, Strict, TlsMode};

use crate::driver::{is_terminal, Driver, Op, OpKind, Report};
use crate::rng::{Splitter, SPLIT_SIZES};

/// Bits of byte 0 of an input.
pub mod cfg {
    /// `Config::opt_mode`.
    pub const OPT_MODE: u8 = 1 << 0;
    /// `Config::request_structured_replies`.
    pub const STRUCTURED: u8 = 1 << 1;
    /// `Config::request_block_size`.
    pub const BLOCK_SIZE: u8 = 1 << 2;
    /// `Config::full_info`.
    pub const FULL_INFO: u8 = 1 << 3;
    /// Offer `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u8 = 1 << 4;
    /// Offer `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u8 = 1 << 5;
    /// Deliver end of stream after the last byte.
    pub const EOF: u8 = 1 << 6;
    /// Use export name `"disk"` instead of the empty name.
    pub const NAMED: u8 = 1 << 7;
    /// libnbd's defaults with EOF at the end.
    pub const DEFAULT: u8 = STRUCTURED | BLOCK_SIZE | FIXED_NEWSTYLE | NO_ZEROES | EOF;
}

/// Bits of byte 5 of an input.
pub mod cfg2 {
    /// `Config::request_extended_headers`.
    pub const EXTENDED: u8 = 1 << 0;
    /// `Config::request_meta_context`.
    pub const META: u8 = 1 << 1;
    /// Add `base:allocation` to `Config::meta_contexts`.
    pub const BASE_ALLOCATION: u8 = 1 << 2;
    /// Add `qemu:dirty-bitmap:b0` to `Config::meta_contexts`.
    pub const DIRTY_BITMAP: u8 = 1 << 3;
    /// `Config::tls` allow, with the testkit's toy session behind STARTTLS
    /// (the server's bytes after the acknowledgement are XORed with its key).
    pub const TLS_ALLOW: u8 = 1 << 4;
    /// `Config::tls` require (wins over [`TLS_ALLOW`]).
    pub const TLS_REQUIRE: u8 = 1 << 5;
    /// libnbd's defaults, asking for `base:allocation`.
    pub const DEFAULT: u8 = EXTENDED | META | BASE_ALLOCATION;
}

/// Bit 6 of byte 1: feed byte by byte while the next op waits.
pub const LOCKSTEP: u8 = 1 << 6;
/// Length of the fixed header before the ops.
pub const HEADER_LEN: usize = 6;
/// Most ops in a script.
pub const MAX_OPS: usize = 8;

/// The wire value of the cookie of the command in `slot`, first use of the slot.
pub fn cookie(slot: u32) -> u64 {
    1 << 32 | u64::from(slot)
}

/// One scripted call as it appears in the input.
///
/// `kind % 19` indexes [`OpKind::ALL`]. Bit 0 of `when` makes the op wait
/// until it can apply (commands: transmission; options: negotiation; either:
/// the connection is over); otherwise it runs at the next step whatever the
/// phase. `modes` bits 0-1 pick how `offset` is scaled (as is, ×512,
/// `u64::MAX - offset`, `offset << 32`), bits 2-3 how `length` is
/// (as is, ×512, `u32::MAX - length`, `1 << 32 + length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawOp {
    /// Which call.
    pub kind: u8,
    /// Command flags (or strict bits).
    pub flags: u8,
    /// Bit 0: wait until the op can apply; bits 1-7: payload seed.
    pub when: u8,
    /// Offset and length scaling.
    pub modes: u8,
    /// Offset before scaling.
    pub offset: u16,
    /// Length before scaling.
    pub length: u16,
}

impl RawOp {
    /// Encoded size.
    pub const LEN: usize = 8;

    /// A waiting op of `kind` at `offset` for `length` bytes, no flags, no scaling.
    pub fn wait(kind: OpKind, offset: u16, length: u16) -> Self {
        RawOp {
            kind: OpKind::ALL.iter().position(|k| *k == kind).expect("listed") as u8,
            when: 1,
            offset,
            length,
            ..RawOp::default()
        }
    }

    /// Decodes 8 bytes.
    pub fn decode(b: &[u8; 8]) -> Self {
        RawOp {
            kind: b[0],
            flags: b[1],
            when: b[2],
            modes: b[3],
            offset: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// Encodes 8 bytes.
    pub fn encode(&self) -> [u8; 8] {
        let [o0, o1] = self.offset.to_le_bytes();
        let [l0, l1] = self.length.to_le_bytes();
        [self.kind, self.flags, self.when, self.modes, o0, o1, l0, l1]
    }

    /// Whether the op waits for its phase.
    pub fn waits(&self) -> bool {
        self.when & 1 != 0
    }

    /// The call it stands for.
    pub fn op(&self) -> Op {
        let kind = OpKind::ALL[usize::from(self.kind) % OpKind::ALL.len()];
        let off = u64::from(self.offset);
        let len = u64::from(self.length);
        let offset = match self.modes & 3 {
            0 => off,
            1 => off * 512,
            2 => u64::MAX - off,
            _ => off << 32,
        };
        let length = match (self.modes >> 2) & 3 {
            0 => len,
            1 => len * 512,
            2 => u64::from(u32::MAX) - len,
            _ => (1 << 32) + len,
        };
        Op {
            kind,
            offset,
            length,
            flags: u16::from(self.flags),
            fill: self.when >> 1,
        }
    }
}

/// A parsed `server_bytes` input.
#[derive(Debug, Clone)]
pub struct ServerBytesInput<'a> {
    /// Client configuration.
    pub config: Config,
    /// Deliver EOF after the stream.
    pub eof: bool,
    /// Feed byte by byte while an op waits.
    pub lockstep: bool,
    /// Cap of A's chunk sizes.
    pub a_max: usize,
    /// Cap of B's read sizes.
    pub b_max: usize,
    /// Seed of the sizes.
    pub seed: u8,
    /// The script.
    pub ops: Vec<RawOp>,
    /// The server's bytes.
    pub stream: &'a [u8],
}

impl<'a> ServerBytesInput<'a> {
    /// Splits `data` as the module documentation says. Never fails.
    pub fn parse(data: &'a [u8]) -> Self {
        let at = |i: usize| data.get(i).copied().unwrap_or(0);
        let (c, s, split, seed, c2) = (at(0), at(1), at(2), at(3), at(5));
        let n_ops = usize::from(at(4)) % (MAX_OPS + 1);
        let mut rest = data.get(HEADER_LEN..).unwrap_or(&[]);
        let mut ops = Vec::with_capacity(n_ops);
        for _ in 0..n_ops {
            let mut b = [0u8; RawOp::LEN];
            let n = rest.len().min(RawOp::LEN);
            b[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            ops.push(RawOp::decode(&b));
        }
        let mut handshake_flags = HandshakeFlags::empty();
        if c & cfg::FIXED_NEWSTYLE != 0 {
            handshake_flags |= HandshakeFlags::FIXED_NEWSTYLE;
        }
        if c & cfg::NO_ZEROES != 0 {
            handshake_flags |= HandshakeFlags::NO_ZEROES;
        }
        let mut meta_contexts = Vec::new();
        if c2 & cfg2::BASE_ALLOCATION != 0 {
            meta_contexts.push("base:allocation".to_string());
        }
        if c2 & cfg2::DIRTY_BITMAP != 0 {
            meta_contexts.push("qemu:dirty-bitmap:b0".to_string());
        }
        let config = Config::default()
            .export_name(if c & cfg::NAMED != 0 { "disk" } else { "" })
            .opt_mode(c & cfg::OPT_MODE != 0)
            .request_structured_replies(c & cfg::STRUCTURED != 0)
            .request_extended_headers(c2 & cfg2::EXTENDED != 0)
            .request_meta_context(c2 & cfg2::META != 0)
            .meta_contexts(meta_contexts)
            .request_block_size(c & cfg::BLOCK_SIZE != 0)
            .full_info(c & cfg::FULL_INFO != 0)
            .handshake_flags(handshake_flags)
            .strict(Strict::from_bits_truncate(u32::from(s & 0x3f)))
            .tls(if c2 & cfg2::TLS_REQUIRE != 0 {
                TlsMode::Require
            } else if c2 & cfg2::TLS_ALLOW != 0 {
                TlsMode::Allow
            } else {
                TlsMode::Disable
            });
        ServerBytesInput {
            config,
            eof: c & cfg::EOF != 0,
            lockstep: s & LOCKSTEP != 0,
            a_max: SPLIT_SIZES[usize::from(split & 15)],
            b_max: SPLIT_SIZES[usize::from(split >> 4)],
            seed,
            ops,
            stream: rest,
        }
    }
}

/// The header bytes of an input (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Byte 0: [`cfg`](mod@cfg) bits.
    pub config: u8,
    /// Byte 1: strict bits and [`LOCKSTEP`].
    pub strict: u8,
    /// Byte 2: split size selectors.
    pub split: u8,
    /// Byte 3: split seed.
    pub seed: u8,
    /// Byte 5: [`cfg2`] bits.
    pub config2: u8,
}

/// Builds an input from its parts (the inverse of [`ServerBytesInput::parse`]).
pub fn encode(header: Header, ops: &[RawOp], stream: &[u8]) -> Vec<u8> {
    assert!(ops.len() <= MAX_OPS);
    let mut out = vec![
        header.config,
        header.strict,
        header.split,
        header.seed,
        ops.len() as u8,
        header.config2,
    ];
    for op in ops {
        out.extend_from_slice(&op.encode());
    }
    out.extend_from_slice(stream);
    out
}

fn due(op: &RawOp, phase: Phase) -> bool {
    if !op.waits() || is_terminal(phase) {
        return true;
    }
    let kind = op.op().kind;
    if kind.is_option() {
        matches!(phase, Phase::Negotiating | Phase::Ready)
    } else if kind == OpKind::SetStrict {
        true
    } else {
        phase == Phase::Ready
    }
}

fn run_due(driver: &mut Driver, queue: &mut VecDeque<RawOp>) {
    while let Some(op) = queue.front() {
        if !due(op, driver.phase()) {
            break;
        }
        let op = queue.pop_front().expect("front exists").op();
        let _ = driver.issue(&op);
    }
}

/// Runs one `server_bytes` input; panics if an invariant breaks.
pub fn run(data: &[u8]) -> Report {
    let input = ServerBytesInput::parse(data);
    let seed = u64::from(input.seed);
    let mut driver = Driver::new(input.config.clone(), input.b_max, seed ^ 0xb0b);
    let mut queue: VecDeque<RawOp> = input.ops.iter().copied().collect();
    let mut split = Splitter::new(seed, input.a_max);

    run_due(&mut driver, &mut queue);
    let mut rest = input.stream;
    while !rest.is_empty() {
        let waiting = queue.front().is_some_and(|op| !due(op, driver.phase()));
        let n = if input.lockstep && waiting {
            1
        } else {
            split.next_size(rest.len())
        };
        driver.feed(&rest[..n]);
        rest = &rest[n..];
        run_due(&mut driver, &mut queue);
    }
    // Ops still waiting run now, whatever the phase: they must fail cleanly if
    // they cannot apply.
    while let Some(op) = queue.pop_front() {
        let _ = driver.issue(&op.op());
    }
    if input.eof {
        driver.eof();
    }
    driver.finish()
}
