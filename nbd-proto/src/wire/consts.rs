//! Numbers of the NBD wire protocol (doc/proto.md of the NBD project).
//!
//! Grouped by the message they appear in. Names follow the specification with
//! the `NBD_` prefix dropped, so `NBD_OPT_GO` is [`OPT_GO`].

/// First eight bytes of every server greeting: `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second magic of an oldstyle greeting.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Second magic of a newstyle greeting, and the magic of every option request: `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Size of the zero padding after an oldstyle greeting or an `EXPORT_NAME` reply.
pub const ZERO_PAD_LEN: usize = 124;

// Handshake flags (server) and client flags.
/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants the 124 zero bytes left out.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
/// Choose an export and enter transmission (old way, no error reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End negotiation without entering transmission.
pub const OPT_ABORT: u32 = 2;
/// List the server's exports.
pub const OPT_LIST: u32 = 3;
/// Peek at an export (withdrawn, never sent by this client).
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Switch to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Ask about an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Choose an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Enable extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// Option succeeded; last reply to it.
pub const REP_ACK: u32 = 1;
/// One export of an `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of export information for `OPT_INFO` / `OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// The option was malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must ask for block size information.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request or reply would be too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// The client must negotiate extended headers first.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// Information types inside REP_INFO and requested by OPT_INFO / OPT_GO.
/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
/// Always set when the other flags are meaningful.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export is on rotational media.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `CMD_FLAG_DF` is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections see one consistent export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `CMD_RESIZE` is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Block status requests may carry a payload.
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// Requests.
/// Magic of a compact request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

// Commands.
/// Read.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize.
pub const CMD_RESIZE: u16 = 8;

// Command flags.
/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Do not punch holes when writing zeroes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes only if it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// The length field is the payload length (extended headers).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Replies.
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

// Structured reply chunk types.
/// No payload; only valid with `REPLY_FLAG_DONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Read data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A run of zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status with 32-bit extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit extents.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// An error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// An error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// Error values sent by servers.
/// Operation not permitted.
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, description, error message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Name of an option number, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of an option reply type, for messages.
pub fn reply_type_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        r if r & REP_FLAG_ERROR != 0 => "unknown error reply",
        _ => "unknown reply",
    }
}

/// Name of a command type, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        CMD_RESIZE => "NBD_CMD_RESIZE",
        _ => "unknown command",
    }
}
