//! How a connection negotiates, set before it starts (libnbd's `set_*` calls).

use crate::flags::{HandshakeFlags, Strict};

/// Settings of a [`Connection`](crate::Connection).
///
/// The defaults are libnbd's: automatic negotiation of the empty export name with
/// structured replies and block sizes requested, every strict check on.
///
/// ```
/// use nbd_proto::{Config, Connection};
/// let config = Config { export_name: "disk0".into(), full_info: true, ..Config::default() };
/// let conn = Connection::new(config);
/// assert!(!conn.is_ready());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Export to select (`set_export_name`).
    pub export_name: String,
    /// Stop after the greeting and let the caller drive the options (`set_opt_mode`).
    pub opt_mode: bool,
    /// Ask for structured replies automatically (`set_request_structured_replies`).
    pub request_structured_replies: bool,
    /// Ask for extended (64-bit) headers automatically, before structured
    /// replies (`set_request_extended_headers`).
    pub request_extended_headers: bool,
    /// Select [`meta_contexts`](Self::meta_contexts) with `NBD_OPT_SET_META_CONTEXT`
    /// before `NBD_OPT_GO` / `NBD_OPT_INFO` (`set_request_meta_context`).
    pub request_meta_context: bool,
    /// Metadata contexts to request, such as `base:allocation`
    /// (`add_meta_context`).
    pub meta_contexts: Vec<String>,
    /// Ask for block size constraints with `NBD_OPT_GO` / `NBD_OPT_INFO`
    /// (`set_request_block_size`).
    pub request_block_size: bool,
    /// Ask for the canonical name and description too (`set_full_info`).
    pub full_info: bool,
    /// Client handshake flags offered, each sent only where the server offers it
    /// (`set_handshake_flags`).
    pub handshake_flags: HandshakeFlags,
    /// Checks made before a command is sent (`set_strict_mode`).
    pub strict: Strict,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            export_name: String::new(),
            opt_mode: false,
            request_structured_replies: true,
            request_extended_headers: true,
            request_meta_context: true,
            meta_contexts: Vec::new(),
            request_block_size: true,
            full_info: false,
            handshake_flags: HandshakeFlags::default(),
            strict: Strict::default(),
        }
    }
}
