//! How a connection negotiates, set before it starts (libnbd's `set_*` calls).

use crate::error::{Error, Result};
use crate::flags::{HandshakeFlags, Strict};
use crate::wire::consts::MAX_STRING_LEN;

/// Settings of a [`Connection`](crate::Connection).
///
/// The defaults are libnbd's: automatic negotiation of the empty export name with
/// structured replies and block sizes requested, every strict check on.
///
/// Values with a wire limit (the export name, the meta context names) are
/// checked by [`Config::validate`], by the setters of
/// [`Connection`](crate::Connection) and by the URI parser alike. A connection
/// built from a configuration that fails validation is dead from the start with
/// that error (EINVAL) and sends nothing; call `validate` first to find out
/// before connecting a socket.
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

impl Config {
    /// Checks every value that has a wire limit, the same checks the setters
    /// and the URI parser make: names of at most 4096 bytes
    /// ([`MAX_STRING_LEN`](crate::wire::consts::MAX_STRING_LEN)) without NUL, and
    /// option data that fits the protocol's 32-bit length field. The error is
    /// an [`Error::InvalidArgument`] (EINVAL).
    ///
    /// ```
    /// use nbd_proto::{Config, Errno};
    /// let config = Config { export_name: "x".repeat(5000), ..Config::default() };
    /// assert_eq!(config.validate().unwrap_err().errno(), Errno::Inval);
    /// assert!(Config::default().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_export_name(&self.export_name)?;
        check_meta_queries(&self.export_name, &self.meta_contexts)
    }
}

/// Checks one protocol string: at most `MAX_STRING_LEN` bytes, no NUL.
fn check_string(what: &str, s: &str) -> Result<()> {
    if s.len() > MAX_STRING_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} of {} bytes exceeds {MAX_STRING_LEN}",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(Error::InvalidArgument(format!("{what} contains NUL")));
    }
    Ok(())
}

/// Checks an export name against the protocol's limits.
pub(crate) fn check_export_name(name: &str) -> Result<()> {
    check_string("export name", name)
}

/// Checks a meta context name or query against the protocol's limits.
pub(crate) fn check_meta_context(name: &str) -> Result<()> {
    check_string("meta context name", name)
}

/// Checks the queries of a meta context option for `export`: each one, and the
/// whole option data (name, count, queries) against the 32-bit length field.
pub(crate) fn check_meta_queries(export: &str, queries: &[String]) -> Result<()> {
    let mut total = 8u64.saturating_add(export.len() as u64);
    for q in queries {
        check_meta_context(q)?;
        total = total.saturating_add(4 + q.len() as u64);
    }
    if total > u64::from(u32::MAX) {
        return Err(Error::InvalidArgument(format!(
            "{} meta context queries make an option of {total} bytes, beyond the 32-bit length field",
            queries.len()
        )));
    }
    Ok(())
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
