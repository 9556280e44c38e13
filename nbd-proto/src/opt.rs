//! Typed option codes (`NBD_OPT_*`) and option error replies (`NBD_REP_ERR_*`),
//! as [`Event::OptionDone`](crate::Event::OptionDone) and
//! [`Error::OptionRefused`](crate::Error::OptionRefused) report them.
//!
//! The raw numbers stay in [`wire::consts`](crate::wire::consts); these types
//! are what the public API speaks, so a match names the option instead of
//! comparing numbers.
//!
//! ```
//! use nbd_proto::{Errno, NbdOption, OptionReplyError};
//! use nbd_proto::wire::consts;
//!
//! assert_eq!(NbdOption::from_code(consts::OPT_GO), NbdOption::Go);
//! assert_eq!(NbdOption::Go.code(), 7);
//! assert_eq!(NbdOption::Go.to_string(), "NBD_OPT_GO");
//! assert_eq!(NbdOption::from_code(99), NbdOption::Unknown(99));
//!
//! let refusal = OptionReplyError::from_code(consts::REP_ERR_UNKNOWN);
//! assert_eq!(refusal, OptionReplyError::Unknown);
//! assert_eq!(refusal.to_string(), "NBD_REP_ERR_UNKNOWN");
//! assert_eq!(refusal.errno(), Errno::NoEnt);
//! ```

use std::fmt;

use crate::error::Errno;
use crate::wire::consts::*;

/// An NBD option (`NBD_OPT_*`), the request of the handshake phase.
///
/// [`Unknown`](NbdOption::Unknown) holds a code that has no variant of its
/// own; [`from_code`](NbdOption::from_code) never puts a known code there, so
/// comparing with a named variant is reliable for values this crate reports.
/// New options of the protocol may become variants, hence `#[non_exhaustive]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NbdOption {
    /// `NBD_OPT_EXPORT_NAME`: choose an export the old way.
    ExportName,
    /// `NBD_OPT_ABORT`: end the handshake.
    Abort,
    /// `NBD_OPT_LIST`: list the exports.
    List,
    /// `NBD_OPT_PEEK_EXPORT`: withdrawn from the protocol, never sent.
    PeekExport,
    /// `NBD_OPT_STARTTLS`: switch to TLS.
    StartTls,
    /// `NBD_OPT_INFO`: ask about an export.
    Info,
    /// `NBD_OPT_GO`: choose an export and enter transmission.
    Go,
    /// `NBD_OPT_STRUCTURED_REPLY`: enable structured replies.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
    ListMetaContext,
    /// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts.
    SetMetaContext,
    /// `NBD_OPT_EXTENDED_HEADERS`: enable 64-bit headers.
    ExtendedHeaders,
    /// A code this crate does not know.
    Unknown(u32),
}

impl NbdOption {
    /// The option's number on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdOption::ExportName => OPT_EXPORT_NAME,
            NbdOption::Abort => OPT_ABORT,
            NbdOption::List => OPT_LIST,
            NbdOption::PeekExport => OPT_PEEK_EXPORT,
            NbdOption::StartTls => OPT_STARTTLS,
            NbdOption::Info => OPT_INFO,
            NbdOption::Go => OPT_GO,
            NbdOption::StructuredReply => OPT_STRUCTURED_REPLY,
            NbdOption::ListMetaContext => OPT_LIST_META_CONTEXT,
            NbdOption::SetMetaContext => OPT_SET_META_CONTEXT,
            NbdOption::ExtendedHeaders => OPT_EXTENDED_HEADERS,
            NbdOption::Unknown(code) => code,
        }
    }

    /// The option with wire number `code`; [`Unknown`](NbdOption::Unknown)
    /// only for a code without a variant.
    pub fn from_code(code: u32) -> NbdOption {
        match code {
            OPT_EXPORT_NAME => NbdOption::ExportName,
            OPT_ABORT => NbdOption::Abort,
            OPT_LIST => NbdOption::List,
            OPT_PEEK_EXPORT => NbdOption::PeekExport,
            OPT_STARTTLS => NbdOption::StartTls,
            OPT_INFO => NbdOption::Info,
            OPT_GO => NbdOption::Go,
            OPT_STRUCTURED_REPLY => NbdOption::StructuredReply,
            OPT_LIST_META_CONTEXT => NbdOption::ListMetaContext,
            OPT_SET_META_CONTEXT => NbdOption::SetMetaContext,
            OPT_EXTENDED_HEADERS => NbdOption::ExtendedHeaders,
            other => NbdOption::Unknown(other),
        }
    }

    /// The protocol's name, such as `"NBD_OPT_GO"`, or `"unknown option"`.
    pub fn name(self) -> &'static str {
        match self {
            NbdOption::ExportName => "NBD_OPT_EXPORT_NAME",
            NbdOption::Abort => "NBD_OPT_ABORT",
            NbdOption::List => "NBD_OPT_LIST",
            NbdOption::PeekExport => "NBD_OPT_PEEK_EXPORT",
            NbdOption::StartTls => "NBD_OPT_STARTTLS",
            NbdOption::Info => "NBD_OPT_INFO",
            NbdOption::Go => "NBD_OPT_GO",
            NbdOption::StructuredReply => "NBD_OPT_STRUCTURED_REPLY",
            NbdOption::ListMetaContext => "NBD_OPT_LIST_META_CONTEXT",
            NbdOption::SetMetaContext => "NBD_OPT_SET_META_CONTEXT",
            NbdOption::ExtendedHeaders => "NBD_OPT_EXTENDED_HEADERS",
            NbdOption::Unknown(_) => "unknown option",
        }
    }
}

/// The protocol's name (`NBD_OPT_GO`); an unknown code shows its number.
impl fmt::Display for NbdOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdOption::Unknown(code) => write!(f, "unknown option {code}"),
            known => f.write_str(known.name()),
        }
    }
}

/// Why a server refused an option: the error reply type (`NBD_REP_ERR_*`) it sent.
///
/// [`Other`](OptionReplyError::Other) holds an error reply type without a
/// variant of its own (the whole code, error bit included);
/// [`from_code`](OptionReplyError::from_code) never puts a known code there.
/// It is not called `Unknown` because `NBD_REP_ERR_UNKNOWN` (no such export)
/// has that name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OptionReplyError {
    /// `NBD_REP_ERR_UNSUP`: the server does not know the option.
    Unsup,
    /// `NBD_REP_ERR_POLICY`: forbidden by the server's policy.
    Policy,
    /// `NBD_REP_ERR_INVALID`: the option was malformed.
    Invalid,
    /// `NBD_REP_ERR_PLATFORM`: not supported on the server's platform.
    Platform,
    /// `NBD_REP_ERR_TLS_REQD`: TLS must be negotiated first.
    TlsReqd,
    /// `NBD_REP_ERR_UNKNOWN`: the export does not exist.
    Unknown,
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    Shutdown,
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must ask for block sizes.
    BlockSizeReqd,
    /// `NBD_REP_ERR_TOO_BIG`: the request or its reply would be too large.
    TooBig,
    /// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers must be negotiated first.
    ExtHeaderReqd,
    /// An error reply type this crate does not know.
    Other(u32),
}

impl OptionReplyError {
    /// The reply type's number on the wire (with the error bit set).
    pub fn code(self) -> u32 {
        match self {
            OptionReplyError::Unsup => REP_ERR_UNSUP,
            OptionReplyError::Policy => REP_ERR_POLICY,
            OptionReplyError::Invalid => REP_ERR_INVALID,
            OptionReplyError::Platform => REP_ERR_PLATFORM,
            OptionReplyError::TlsReqd => REP_ERR_TLS_REQD,
            OptionReplyError::Unknown => REP_ERR_UNKNOWN,
            OptionReplyError::Shutdown => REP_ERR_SHUTDOWN,
            OptionReplyError::BlockSizeReqd => REP_ERR_BLOCK_SIZE_REQD,
            OptionReplyError::TooBig => REP_ERR_TOO_BIG,
            OptionReplyError::ExtHeaderReqd => REP_ERR_EXT_HEADER_REQD,
            OptionReplyError::Other(code) => code,
        }
    }

    /// The error reply with wire number `code`; [`Other`](OptionReplyError::Other)
    /// only for a code without a variant.
    pub fn from_code(code: u32) -> OptionReplyError {
        match code {
            REP_ERR_UNSUP => OptionReplyError::Unsup,
            REP_ERR_POLICY => OptionReplyError::Policy,
            REP_ERR_INVALID => OptionReplyError::Invalid,
            REP_ERR_PLATFORM => OptionReplyError::Platform,
            REP_ERR_TLS_REQD => OptionReplyError::TlsReqd,
            REP_ERR_UNKNOWN => OptionReplyError::Unknown,
            REP_ERR_SHUTDOWN => OptionReplyError::Shutdown,
            REP_ERR_BLOCK_SIZE_REQD => OptionReplyError::BlockSizeReqd,
            REP_ERR_TOO_BIG => OptionReplyError::TooBig,
            REP_ERR_EXT_HEADER_REQD => OptionReplyError::ExtHeaderReqd,
            other => OptionReplyError::Other(other),
        }
    }

    /// The protocol's name, such as `"NBD_REP_ERR_POLICY"`, or `"unknown error reply"`.
    pub fn name(self) -> &'static str {
        match self {
            OptionReplyError::Unsup => "NBD_REP_ERR_UNSUP",
            OptionReplyError::Policy => "NBD_REP_ERR_POLICY",
            OptionReplyError::Invalid => "NBD_REP_ERR_INVALID",
            OptionReplyError::Platform => "NBD_REP_ERR_PLATFORM",
            OptionReplyError::TlsReqd => "NBD_REP_ERR_TLS_REQD",
            OptionReplyError::Unknown => "NBD_REP_ERR_UNKNOWN",
            OptionReplyError::Shutdown => "NBD_REP_ERR_SHUTDOWN",
            OptionReplyError::BlockSizeReqd => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            OptionReplyError::TooBig => "NBD_REP_ERR_TOO_BIG",
            OptionReplyError::ExtHeaderReqd => "NBD_REP_ERR_EXT_HEADER_REQD",
            OptionReplyError::Other(_) => "unknown error reply",
        }
    }

    /// The errno-like kind libnbd users would see for this refusal
    /// (`EINVAL` for codes without a better match).
    pub fn errno(self) -> Errno {
        match self {
            OptionReplyError::Unsup => Errno::NotSup,
            OptionReplyError::Policy => Errno::Perm,
            OptionReplyError::Unknown => Errno::NoEnt,
            OptionReplyError::Shutdown => Errno::Shutdown,
            OptionReplyError::Platform => Errno::NotSup,
            OptionReplyError::TlsReqd => Errno::NotSup,
            OptionReplyError::ExtHeaderReqd => Errno::NotSup,
            OptionReplyError::TooBig => Errno::Range,
            OptionReplyError::Invalid
            | OptionReplyError::BlockSizeReqd
            | OptionReplyError::Other(_) => Errno::Inval,
        }
    }
}

/// The protocol's name (`NBD_REP_ERR_POLICY`); an unknown code shows its number.
impl fmt::Display for OptionReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionReplyError::Other(code) => write!(f, "unknown error reply {code:#x}"),
            known => f.write_str(known.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_codes_round_trip() {
        for code in 0..64 {
            let option = NbdOption::from_code(code);
            assert_eq!(option.code(), code);
            let known = !matches!(option, NbdOption::Unknown(_));
            assert_eq!(
                known,
                (OPT_EXPORT_NAME..=OPT_EXTENDED_HEADERS).contains(&code)
            );
            assert_eq!(option.name(), option_name(code));
        }
        assert_eq!(NbdOption::from_code(u32::MAX), NbdOption::Unknown(u32::MAX));
        assert_eq!(NbdOption::Unknown(42).to_string(), "unknown option 42");
        assert_eq!(
            NbdOption::ListMetaContext.to_string(),
            "NBD_OPT_LIST_META_CONTEXT"
        );
    }

    #[test]
    fn reply_error_codes_round_trip() {
        for low in 0..64 {
            let code = REP_FLAG_ERROR | low;
            let refusal = OptionReplyError::from_code(code);
            assert_eq!(refusal.code(), code);
            let known = !matches!(refusal, OptionReplyError::Other(_));
            assert_eq!(known, (1..=10).contains(&low));
            assert_eq!(refusal.name(), reply_type_name(code));
        }
        assert_eq!(
            OptionReplyError::Other(REP_FLAG_ERROR | 11).to_string(),
            "unknown error reply 0x8000000b"
        );
        assert_eq!(
            OptionReplyError::TlsReqd.to_string(),
            "NBD_REP_ERR_TLS_REQD"
        );
    }
}
