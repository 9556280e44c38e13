//! Encoders and decoders for every NBD message, both directions.
//!
//! The client core uses the client-to-server encoders and the server-to-client
//! decoders; tests, fuzzers and fake servers use the other halves. Every decoder
//! takes exactly the bytes of its message and checks lengths before reading, so
//! none of them can panic on any input.
//!
//! Encoders never panic on their values either. A field longer than its length
//! field can describe (a name over 4 GiB, an error message over 64 KiB, more
//! than 65535 info requests) is cut to the longest the field can say, so the
//! message stays well framed; callers that must not lose bytes check first, as
//! [`Connection`](crate::Connection) does for everything it sends. The encoders
//! write to a growable [`BufMut`] (`Vec<u8>`, `BytesMut`); a fixed slice that
//! runs out of room panics as `BufMut` itself does.

pub mod consts;

use bytes::BufMut;
use consts::*;

/// A server message that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer (or more) bytes than the message needs.
    #[error("{what}: expected {need} bytes, got {got}")]
    Length {
        /// Which message.
        what: &'static str,
        /// Bytes it takes.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// A magic number that is not the expected one.
    #[error("{what}: bad magic {found:#x}")]
    Magic {
        /// Which message.
        what: &'static str,
        /// The magic found.
        found: u64,
    },
    /// A field whose value breaks the protocol.
    #[error("{what}: {detail}")]
    Invalid {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

fn exact<'a, const N: usize>(
    what: &'static str,
    buf: &'a [u8],
) -> Result<&'a [u8; N], DecodeError> {
    buf.try_into().map_err(|_| DecodeError::Length {
        what,
        need: N,
        got: buf.len(),
    })
}

// The readers below index directly: every decoder checks its buffer's length
// before reading a field, so the indices are in range.
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// The first `max` items of `items`: what a length field of that range can say.
fn cut<T>(items: &[T], max: u64) -> &[T] {
    let n = usize::try_from(max).unwrap_or(usize::MAX).min(items.len());
    &items[..n]
}

/// `len` as a 32-bit length field (`cut` has made it fit).
fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// `len` as a 16-bit length field (`cut` has made it fit).
fn len16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// Turns server string bytes into a `String`, replacing invalid UTF-8.
///
/// Strings longer than [`MAX_STRING_LEN`] are refused, as the protocol requires.
pub fn decode_string(what: &'static str, bytes: &[u8]) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(DecodeError::Invalid {
            what,
            detail: format!("string of {} bytes exceeds {MAX_STRING_LEN}", bytes.len()),
        });
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

// ---------------------------------------------------------------- handshake

/// The first 16 bytes a server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreetingStart {
    /// Oldstyle: size and flags follow ([`OldstyleRest`]).
    Oldstyle,
    /// Newstyle: 16-bit handshake flags follow.
    Newstyle,
}

impl GreetingStart {
    /// Size of the encoded message.
    pub const LEN: usize = 16;

    /// Decodes `NBDMAGIC` and the second magic.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<16>("greeting", buf)?;
        let magic = be64(b, 0);
        if magic != NBDMAGIC {
            return Err(DecodeError::Magic {
                what: "greeting",
                found: magic,
            });
        }
        match be64(b, 8) {
            OLDSTYLE_MAGIC => Ok(Self::Oldstyle),
            IHAVEOPT => Ok(Self::Newstyle),
            other => Err(DecodeError::Magic {
                what: "greeting second magic",
                found: other,
            }),
        }
    }

    /// Encodes the message (server side).
    pub fn encode(self, out: &mut impl BufMut) {
        out.put_u64(NBDMAGIC);
        out.put_u64(match self {
            Self::Oldstyle => OLDSTYLE_MAGIC,
            Self::Newstyle => IHAVEOPT,
        });
    }
}

/// The rest of an oldstyle greeting: size, flags and 124 zero bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldstyleRest {
    /// Export size.
    pub size: u64,
    /// Flags; the low 16 bits are the transmission flags.
    pub flags: u32,
}

impl OldstyleRest {
    /// Size of the encoded message.
    pub const LEN: usize = 8 + 4 + ZERO_PAD_LEN;

    /// Decodes the message; the padding is not checked, as other clients do not either.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<{ Self::LEN }>("oldstyle greeting", buf)?;
        Ok(Self {
            size: be64(b, 0),
            flags: be32(b, 8),
        })
    }

    /// Encodes the message (server side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(self.size);
        out.put_u32(self.flags);
        out.put_bytes(0, ZERO_PAD_LEN);
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, maybe 124 zero bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Size without the zero padding.
    pub const LEN: usize = 10;

    /// Decodes the 10 bytes before the padding.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<10>("export name reply", buf)?;
        Ok(Self {
            size: be64(b, 0),
            flags: be16(b, 8),
        })
    }

    /// Encodes the message with or without the padding (server side).
    pub fn encode(&self, zeroes: bool, out: &mut impl BufMut) {
        out.put_u64(self.size);
        out.put_u16(self.flags);
        if zeroes {
            out.put_bytes(0, ZERO_PAD_LEN);
        }
    }
}

// ---------------------------------------------------------------- options

/// An option request header; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionRequest {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the data after the header.
    pub length: u32,
}

impl OptionRequest {
    /// Size of the encoded header.
    pub const LEN: usize = 16;

    /// Encodes the header followed by `data` (cut to 4 GiB - 1).
    pub fn encode_with(option: u32, data: &[u8], out: &mut impl BufMut) {
        let data = cut(data, u32::MAX.into());
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(len32(data.len()));
        out.put_slice(data);
    }

    /// Decodes the header (server side).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<16>("option request", buf)?;
        let magic = be64(b, 0);
        if magic != IHAVEOPT {
            return Err(DecodeError::Magic {
                what: "option request",
                found: magic,
            });
        }
        Ok(Self {
            option: be32(b, 8),
            length: be32(b, 12),
        })
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// `INFO_*` types requested.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Encodes the option data.
    pub fn encode(name: &str, requests: &[u16], out: &mut impl BufMut) {
        let name = cut(name.as_bytes(), u32::MAX.into());
        let requests = cut(requests, u16::MAX.into());
        out.put_u32(len32(name.len()));
        out.put_slice(name);
        out.put_u16(len16(requests.len()));
        for r in requests {
            out.put_u16(*r);
        }
    }

    /// Decodes the option data (server side).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "info request";
        let short = || DecodeError::Invalid {
            what: WHAT,
            detail: "truncated".into(),
        };
        if buf.len() < 4 {
            return Err(short());
        }
        let name_len = be32(buf, 0) as usize;
        let rest = &buf[4..];
        if rest.len() < name_len.saturating_add(2) {
            return Err(short());
        }
        let name = decode_string(WHAT, &rest[..name_len])?;
        let count = be16(rest, name_len) as usize;
        let list = &rest[name_len + 2..];
        if list.len() != count * 2 {
            return Err(short());
        }
        let requests = list.chunks_exact(2).map(|c| be16(c, 0)).collect();
        Ok(Self { name, requests })
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: an
/// export name and the context queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Queries, such as `base:allocation` or `qemu:dirty-bitmap:`.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Encodes the option data.
    pub fn encode(name: &str, queries: &[String], out: &mut impl BufMut) {
        let name = cut(name.as_bytes(), u32::MAX.into());
        let queries = cut(queries, u32::MAX.into());
        out.put_u32(len32(name.len()));
        out.put_slice(name);
        out.put_u32(len32(queries.len()));
        for q in queries {
            let q = cut(q.as_bytes(), u32::MAX.into());
            out.put_u32(len32(q.len()));
            out.put_slice(q);
        }
    }

    /// Decodes the option data (server side).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "meta context request";
        let short = || DecodeError::Invalid {
            what: WHAT,
            detail: "truncated".into(),
        };
        let mut rest = buf;
        let string = |rest: &mut &[u8]| -> Result<String, DecodeError> {
            if rest.len() < 4 {
                return Err(short());
            }
            let len = be32(rest, 0) as usize;
            if rest.len() - 4 < len {
                return Err(short());
            }
            let s = decode_string(WHAT, &rest[4..4 + len])?;
            *rest = &rest[4 + len..];
            Ok(s)
        };
        let name = string(&mut rest)?;
        if rest.len() < 4 {
            return Err(short());
        }
        let count = be32(rest, 0);
        rest = &rest[4..];
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(string(&mut rest)?);
        }
        if !rest.is_empty() {
            return Err(DecodeError::Invalid {
                what: WHAT,
                detail: "trailing bytes".into(),
            });
        }
        Ok(Self { name, queries })
    }
}

/// Data of an `NBD_REP_META_CONTEXT` reply: a context id and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    /// Id used in block status replies (0 in a list reply).
    pub id: u32,
    /// Context name.
    pub name: String,
}

impl MetaContextReply {
    /// Decodes the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_REP_META_CONTEXT";
        if buf.len() < 4 {
            return Err(DecodeError::Length {
                what: WHAT,
                need: 4,
                got: buf.len(),
            });
        }
        Ok(Self {
            id: be32(buf, 0),
            name: decode_string(WHAT, &buf[4..])?,
        })
    }

    /// Encodes the reply data (server side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(self.id);
        out.put_slice(self.name.as_bytes());
    }
}

/// One extent of a block status reply: a length and its status flags.
///
/// Compact replies carry 32-bit lengths and flags; extended ones 64-bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Length in bytes (never 0 in a valid reply).
    pub length: u64,
    /// Status flags; their meaning depends on the context.
    pub flags: u64,
}

impl Extent {
    /// The 32-bit view libnbd's `block_status` callback gives, or an overflow
    /// error where the length or flags do not fit: never a truncated value.
    ///
    /// ```
    /// use nbd_proto::wire::Extent;
    /// assert_eq!(Extent { length: 4096, flags: 3 }.to_u32(), Ok((4096, 3)));
    /// assert!(Extent { length: 1 << 32, flags: 0 }.to_u32().is_err());
    /// ```
    pub fn to_u32(self) -> Result<(u32, u32), crate::Error> {
        match (u32::try_from(self.length), u32::try_from(self.flags)) {
            (Ok(l), Ok(f)) => Ok((l, f)),
            _ => Err(crate::Error::Overflow(format!(
                "extent of length {} with flags {:#x} does not fit in 32 bits",
                self.length, self.flags
            ))),
        }
    }
}

/// Payload of a block status chunk: context id and extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusChunk {
    /// Metadata context id.
    pub context_id: u32,
    /// Extents in order from the request's offset.
    pub extents: Vec<Extent>,
}

impl BlockStatusChunk {
    /// Decodes a compact (`BLOCK_STATUS`, 4 + 8n bytes) or extended
    /// (`BLOCK_STATUS_EXT`, 8 + 16n bytes) payload; n must be at least 1.
    pub fn decode(extended: bool, buf: &[u8]) -> Result<Self, DecodeError> {
        let (what, head, each) = if extended {
            ("NBD_REPLY_TYPE_BLOCK_STATUS_EXT", 8, 16)
        } else {
            ("NBD_REPLY_TYPE_BLOCK_STATUS", 4, 8)
        };
        if buf.len() < head + each || (buf.len() - head) % each != 0 {
            return Err(DecodeError::Invalid {
                what,
                detail: format!(
                    "length {} is not {head} + a positive multiple of {each}",
                    buf.len()
                ),
            });
        }
        let count = (buf.len() - head) / each;
        if extended && be32(buf, 4) as usize != count {
            return Err(DecodeError::Invalid {
                what,
                detail: format!(
                    "descriptor count {} but {count} descriptors sent",
                    be32(buf, 4)
                ),
            });
        }
        let extents = buf[head..]
            .chunks_exact(each)
            .map(|d| {
                if extended {
                    Extent {
                        length: be64(d, 0),
                        flags: be64(d, 8),
                    }
                } else {
                    Extent {
                        length: be32(d, 0).into(),
                        flags: be32(d, 4).into(),
                    }
                }
            })
            .collect();
        Ok(Self {
            context_id: be32(buf, 0),
            extents,
        })
    }

    /// Encodes the payload (server side); compact form truncates to 32 bits.
    pub fn encode(&self, extended: bool, out: &mut impl BufMut) {
        let extents = cut(&self.extents, u32::MAX.into());
        out.put_u32(self.context_id);
        if extended {
            out.put_u32(len32(extents.len()));
        }
        for e in extents {
            if extended {
                out.put_u64(e.length);
                out.put_u64(e.flags);
            } else {
                out.put_u32(e.length as u32);
                out.put_u32(e.flags as u32);
            }
        }
    }
}

/// An option reply header; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Length of the data after the header.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Size of the encoded header.
    pub const LEN: usize = 20;

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<20>("option reply", buf)?;
        let magic = be64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(DecodeError::Magic {
                what: "option reply",
                found: magic,
            });
        }
        Ok(Self {
            option: be32(b, 8),
            reply_type: be32(b, 12),
            length: be32(b, 16),
        })
    }

    /// Encodes the header (server side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.length);
    }

    /// Encodes a whole reply: header with the length of `data`, then `data`.
    pub fn encode_with(option: u32, reply_type: u32, data: &[u8], out: &mut impl BufMut) {
        let data = cut(data, u32::MAX.into());
        let length = len32(data.len());
        Self {
            option,
            reply_type,
            length,
        }
        .encode(out);
        out.put_slice(data);
    }
}

/// Data of an `NBD_REP_SERVER` reply: one export of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

impl ServerEntry {
    /// Decodes the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_REP_SERVER";
        if buf.len() < 4 {
            return Err(DecodeError::Length {
                what: WHAT,
                need: 4,
                got: buf.len(),
            });
        }
        let name_len = be32(buf, 0) as usize;
        let rest = &buf[4..];
        if name_len > rest.len() {
            return Err(DecodeError::Invalid {
                what: WHAT,
                detail: format!("name length {name_len} exceeds reply length {}", buf.len()),
            });
        }
        Ok(Self {
            name: decode_string(WHAT, &rest[..name_len])?,
            description: decode_string(WHAT, &rest[name_len..])?,
        })
    }

    /// Encodes the reply data (server side).
    pub fn encode(&self, out: &mut impl BufMut) {
        let name = cut(self.name.as_bytes(), u32::MAX.into());
        out.put_u32(len32(name.len()));
        out.put_slice(name);
        out.put_slice(self.description.as_bytes());
    }
}

/// Data of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`: canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        maximum: u32,
    },
    /// An information type this client does not know; ignored as the protocol says.
    Unknown(u16),
}

impl Info {
    /// Decodes the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "NBD_REP_INFO";
        if buf.len() < 2 {
            return Err(DecodeError::Length {
                what: WHAT,
                need: 2,
                got: buf.len(),
            });
        }
        let body = &buf[2..];
        let fixed = |need: usize| {
            if body.len() == need {
                Ok(())
            } else {
                Err(DecodeError::Length {
                    what: WHAT,
                    need: need + 2,
                    got: buf.len(),
                })
            }
        };
        Ok(match be16(buf, 0) {
            INFO_EXPORT => {
                fixed(10)?;
                Info::Export {
                    size: be64(body, 0),
                    flags: be16(body, 8),
                }
            }
            INFO_NAME => Info::Name(decode_string(WHAT, body)?),
            INFO_DESCRIPTION => Info::Description(decode_string(WHAT, body)?),
            INFO_BLOCK_SIZE => {
                fixed(12)?;
                Info::BlockSize {
                    minimum: be32(body, 0),
                    preferred: be32(body, 4),
                    maximum: be32(body, 8),
                }
            }
            other => Info::Unknown(other),
        })
    }

    /// Encodes the reply data (server side). `Unknown` encodes its type with no body.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Info::Export { size, flags } => {
                out.put_u16(INFO_EXPORT);
                out.put_u64(*size);
                out.put_u16(*flags);
            }
            Info::Name(s) => {
                out.put_u16(INFO_NAME);
                out.put_slice(s.as_bytes());
            }
            Info::Description(s) => {
                out.put_u16(INFO_DESCRIPTION);
                out.put_slice(s.as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.put_u16(INFO_BLOCK_SIZE);
                out.put_u32(*minimum);
                out.put_u32(*preferred);
                out.put_u32(*maximum);
            }
            Info::Unknown(t) => out.put_u16(*t),
        }
    }
}

// ---------------------------------------------------------------- transmission

/// A request header, compact (32-bit length) or extended (64-bit length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub command: u16,
    /// Cookie echoed by the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length; must fit in 32 bits for a compact header.
    pub length: u64,
}

impl RequestHeader {
    /// Encodes a compact header. The caller has checked that `length` fits in 32 bits.
    pub fn encode_compact(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length as u32);
    }

    /// Encodes an extended header.
    pub fn encode_extended(&self, out: &mut impl BufMut) {
        out.put_u32(EXTENDED_REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u64(self.length);
    }

    /// Decodes a compact (28-byte) or extended (32-byte) header (server side).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "request";
        if buf.len() < 4 {
            return Err(DecodeError::Length {
                what: WHAT,
                need: REQUEST_LEN,
                got: buf.len(),
            });
        }
        let (extended, need) = match be32(buf, 0) {
            REQUEST_MAGIC => (false, REQUEST_LEN),
            EXTENDED_REQUEST_MAGIC => (true, EXTENDED_REQUEST_LEN),
            m => {
                return Err(DecodeError::Magic {
                    what: WHAT,
                    found: m.into(),
                })
            }
        };
        if buf.len() != need {
            return Err(DecodeError::Length {
                what: WHAT,
                need,
                got: buf.len(),
            });
        }
        Ok(Self {
            flags: be16(buf, 4),
            command: be16(buf, 6),
            cookie: be64(buf, 8),
            offset: be64(buf, 16),
            length: if extended {
                be64(buf, 24)
            } else {
                be32(buf, 24).into()
            },
        })
    }
}

/// A simple reply header; read data follows it for a successful compact read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error, 0 for success.
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<16>("simple reply", buf)?;
        let magic = be32(b, 0);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(DecodeError::Magic {
                what: "simple reply",
                found: magic.into(),
            });
        }
        Ok(Self {
            error: be32(b, 4),
            cookie: be64(b, 8),
        })
    }

    /// Encodes the header (server side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(self.error);
        out.put_u64(self.cookie);
    }
}

/// A structured (20-byte) or extended (32-byte) reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub chunk_type: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Offset echoed from the request (extended headers only, else 0).
    pub offset: u64,
    /// Payload length.
    pub length: u64,
}

impl ChunkHeader {
    /// Decodes a structured chunk header.
    pub fn decode_structured(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<20>("structured reply", buf)?;
        let magic = be32(b, 0);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(DecodeError::Magic {
                what: "structured reply",
                found: magic.into(),
            });
        }
        Ok(Self {
            flags: be16(b, 4),
            chunk_type: be16(b, 6),
            cookie: be64(b, 8),
            offset: 0,
            length: be32(b, 16).into(),
        })
    }

    /// Decodes an extended chunk header.
    pub fn decode_extended(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<32>("extended reply", buf)?;
        let magic = be32(b, 0);
        if magic != EXTENDED_REPLY_MAGIC {
            return Err(DecodeError::Magic {
                what: "extended reply",
                found: magic.into(),
            });
        }
        Ok(Self {
            flags: be16(b, 4),
            chunk_type: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be64(b, 24),
        })
    }

    /// Encodes a structured chunk header; `length` must fit in 32 bits.
    pub fn encode_structured(&self, out: &mut impl BufMut) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.chunk_type);
        out.put_u64(self.cookie);
        out.put_u32(self.length as u32);
    }

    /// Encodes an extended chunk header.
    pub fn encode_extended(&self, out: &mut impl BufMut) {
        out.put_u32(EXTENDED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.chunk_type);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u64(self.length);
    }
}

/// Payload of an `OFFSET_HOLE` chunk (compact form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoleChunk {
    /// Offset of the hole.
    pub offset: u64,
    /// Length of the hole.
    pub length: u32,
}

impl HoleChunk {
    /// Size of the payload.
    pub const LEN: usize = 12;

    /// Decodes the payload.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let b = exact::<12>("NBD_REPLY_TYPE_OFFSET_HOLE", buf)?;
        Ok(Self {
            offset: be64(b, 0),
            length: be32(b, 8),
        })
    }

    /// Encodes the payload (server side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// Payload of an error chunk (`ERROR`, `ERROR_OFFSET` or an unknown error type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// NBD error value; never 0 in a valid chunk.
    pub error: u32,
    /// Human-readable message (may be empty).
    pub message: String,
    /// Offset of the error, for `ERROR_OFFSET`.
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Decodes the payload of a chunk of type `chunk_type`.
    ///
    /// `ERROR` must be exactly error, message length and message; `ERROR_OFFSET`
    /// has an 8-byte offset after the message; unknown error types may carry more.
    pub fn decode(chunk_type: u16, buf: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "error chunk";
        if buf.len() < 6 {
            return Err(DecodeError::Length {
                what: WHAT,
                need: 6,
                got: buf.len(),
            });
        }
        let error = be32(buf, 0);
        if error == 0 {
            return Err(DecodeError::Invalid {
                what: WHAT,
                detail: "error value 0".into(),
            });
        }
        let msg_len = be16(buf, 4) as usize;
        let rest = &buf[6..];
        if msg_len > rest.len() {
            return Err(DecodeError::Invalid {
                what: WHAT,
                detail: format!(
                    "message length {msg_len} exceeds chunk payload {}",
                    buf.len()
                ),
            });
        }
        let message = decode_string(WHAT, &rest[..msg_len])?;
        let tail = &rest[msg_len..];
        let offset = match chunk_type {
            REPLY_TYPE_ERROR if !tail.is_empty() => {
                return Err(DecodeError::Invalid {
                    what: WHAT,
                    detail: format!("{} bytes after the message", tail.len()),
                })
            }
            REPLY_TYPE_ERROR_OFFSET => {
                if tail.len() != 8 {
                    return Err(DecodeError::Length {
                        what: "NBD_REPLY_TYPE_ERROR_OFFSET",
                        need: 6 + msg_len + 8,
                        got: buf.len(),
                    });
                }
                Some(be64(tail, 0))
            }
            _ => None,
        };
        Ok(Self {
            error,
            message,
            offset,
        })
    }

    /// Encodes the payload (server side); `offset` is written if present.
    pub fn encode(&self, out: &mut impl BufMut) {
        let message = cut(self.message.as_bytes(), u16::MAX.into());
        out.put_u32(self.error);
        out.put_u16(len16(message.len()));
        out.put_slice(message);
        if let Some(offset) = self.offset {
            out.put_u64(offset);
        }
    }
}

#[cfg(test)]
mod tests;
