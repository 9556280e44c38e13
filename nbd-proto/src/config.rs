//! How a connection negotiates, set before it starts (libnbd's `set_*` calls).

use std::time::Duration;

use crate::error::{Error, Result};
use crate::flags::{HandshakeFlags, Strict};
use crate::tls::TlsMode;
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
/// # Building one
///
/// More settings may be added, so a `Config` is not built with a struct
/// literal: start from [`Config::default`] and chain the builder methods.
/// Each builder method has the name of the field it sets, which is libnbd's
/// setter without `set_` (`export_name` for `set_export_name`, `opt_mode` for
/// `set_opt_mode`); [`meta_context`](Config::meta_context) adds one context
/// as libnbd's `add_meta_context` does. The fields stay public, so reading
/// them and assigning them works as before.
///
/// ```
/// use nbd_proto::{context, Config, Connection, Strict};
/// let config = Config::default()
///     .export_name("disk0")
///     .opt_mode(true)
///     .meta_context(context::BASE_ALLOCATION)
///     .full_info(true)
///     .strict(Strict::default() - Strict::BOUNDS);
/// assert_eq!(config.export_name, "disk0");
/// assert_eq!(config.meta_contexts, [context::BASE_ALLOCATION]);
///
/// // Fields may still be set one by one.
/// let mut other = Config::default();
/// other.opt_mode = true;
/// assert!(other.opt_mode);
///
/// let conn = Connection::new(config);
/// assert!(!conn.is_ready());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Longest the whole handshake may take, from its start until transmission
    /// (opt mode's waits for the caller included); when it passes the connection
    /// dies with [`Error::TimedOut`]. `None` (the default): no limit. See
    /// [`Connection::handle_timeout`](crate::Connection::handle_timeout) for when
    /// the clock starts.
    pub handshake_timeout: Option<Duration>,
    /// Longest one command may wait for its reply; when it passes the command
    /// alone completes with [`Error::TimedOut`] (ETIMEDOUT) and its buffer, and
    /// the connection goes on (the late reply is consumed and dropped). `None`
    /// (the default): no limit.
    pub command_timeout: Option<Duration>,
    /// Longest the connection may wait for any server byte while commands are in
    /// flight (the late replies of timed-out commands included); when it passes
    /// the connection dies with [`Error::TimedOut`] and every pending command
    /// fails once. `None` (the default): no limit.
    pub stall_timeout: Option<Duration>,
    /// Whether to negotiate TLS with `NBD_OPT_STARTTLS` (libnbd's `set_tls`).
    /// Anything but [`TlsMode::Disable`] needs a session source:
    /// [`Connection::set_tls_connector`](crate::Connection::set_tls_connector).
    pub tls: TlsMode,
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
    /// let config = Config::default().export_name("x".repeat(5000));
    /// assert_eq!(config.validate().unwrap_err().errno(), Errno::Inval);
    /// assert!(Config::default().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_export_name(&self.export_name)?;
        check_meta_queries(&self.export_name, &self.meta_contexts)
    }
}

/// Builder methods: each sets one field and returns the configuration, so calls
/// chain. None of them checks its value; [`Config::validate`] does.
impl Config {
    /// Sets [`export_name`](Self::export_name) (libnbd's `set_export_name`).
    #[must_use]
    pub fn export_name(mut self, name: impl Into<String>) -> Self {
        self.export_name = name.into();
        self
    }

    /// Sets [`opt_mode`](Self::opt_mode) (libnbd's `set_opt_mode`).
    #[must_use]
    pub fn opt_mode(mut self, on: bool) -> Self {
        self.opt_mode = on;
        self
    }

    /// Sets [`request_structured_replies`](Self::request_structured_replies)
    /// (libnbd's `set_request_structured_replies`).
    #[must_use]
    pub fn request_structured_replies(mut self, on: bool) -> Self {
        self.request_structured_replies = on;
        self
    }

    /// Sets [`request_extended_headers`](Self::request_extended_headers)
    /// (libnbd's `set_request_extended_headers`).
    #[must_use]
    pub fn request_extended_headers(mut self, on: bool) -> Self {
        self.request_extended_headers = on;
        self
    }

    /// Sets [`request_meta_context`](Self::request_meta_context)
    /// (libnbd's `set_request_meta_context`).
    #[must_use]
    pub fn request_meta_context(mut self, on: bool) -> Self {
        self.request_meta_context = on;
        self
    }

    /// Adds one context to [`meta_contexts`](Self::meta_contexts) (libnbd's
    /// `add_meta_context`), after those already there.
    #[must_use]
    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }

    /// Replaces [`meta_contexts`](Self::meta_contexts) with `names`, in order.
    ///
    /// ```
    /// use nbd_proto::{context, Config};
    /// let config = Config::default()
    ///     .meta_context("dropped")
    ///     .meta_contexts([context::BASE_ALLOCATION, context::QEMU_ALLOCATION_DEPTH]);
    /// assert_eq!(config.meta_contexts, ["base:allocation", "qemu:allocation-depth"]);
    /// ```
    #[must_use]
    pub fn meta_contexts<I>(mut self, names: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.meta_contexts = names.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`request_block_size`](Self::request_block_size)
    /// (libnbd's `set_request_block_size`).
    #[must_use]
    pub fn request_block_size(mut self, on: bool) -> Self {
        self.request_block_size = on;
        self
    }

    /// Sets [`full_info`](Self::full_info) (libnbd's `set_full_info`).
    #[must_use]
    pub fn full_info(mut self, on: bool) -> Self {
        self.full_info = on;
        self
    }

    /// Sets [`handshake_flags`](Self::handshake_flags)
    /// (libnbd's `set_handshake_flags`).
    #[must_use]
    pub fn handshake_flags(mut self, flags: HandshakeFlags) -> Self {
        self.handshake_flags = flags;
        self
    }

    /// Sets [`strict`](Self::strict) (libnbd's `set_strict_mode`).
    #[must_use]
    pub fn strict(mut self, strict: Strict) -> Self {
        self.strict = strict;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`command_timeout`](Self::command_timeout).
    #[must_use]
    pub fn command_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`stall_timeout`](Self::stall_timeout).
    #[must_use]
    pub fn stall_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`tls`](Self::tls) (libnbd's `set_tls`).
    #[must_use]
    pub fn tls(mut self, mode: TlsMode) -> Self {
        self.tls = mode;
        self
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
            handshake_timeout: None,
            command_timeout: None,
            stall_timeout: None,
            tls: TlsMode::Disable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each builder method changes its own field to the value given, and
    /// nothing else: the result equals the default with that one field assigned.
    #[test]
    fn each_builder_method_sets_its_field_only() {
        let base = Config::default();
        let with = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            assert_ne!(c, base, "the case must change something");
            c
        };
        let flags = HandshakeFlags::FIXED_NEWSTYLE;
        let strict = Strict::BOUNDS | Strict::ALIGN;
        let cases = [
            (
                base.clone().export_name("disk"),
                with(|c| c.export_name = "disk".into()),
            ),
            (base.clone().opt_mode(true), with(|c| c.opt_mode = true)),
            (
                base.clone().request_structured_replies(false),
                with(|c| c.request_structured_replies = false),
            ),
            (
                base.clone().request_extended_headers(false),
                with(|c| c.request_extended_headers = false),
            ),
            (
                base.clone().request_meta_context(false),
                with(|c| c.request_meta_context = false),
            ),
            (
                base.clone().meta_context("base:allocation"),
                with(|c| c.meta_contexts = vec!["base:allocation".into()]),
            ),
            (
                base.clone().meta_contexts(["a", "b"]),
                with(|c| c.meta_contexts = vec!["a".into(), "b".into()]),
            ),
            (
                base.clone().request_block_size(false),
                with(|c| c.request_block_size = false),
            ),
            (base.clone().full_info(true), with(|c| c.full_info = true)),
            (
                base.clone().handshake_flags(flags),
                with(|c| c.handshake_flags = HandshakeFlags::FIXED_NEWSTYLE),
            ),
            (
                base.clone().strict(strict),
                with(|c| c.strict = Strict::BOUNDS | Strict::ALIGN),
            ),
            (
                base.clone().tls(TlsMode::Allow),
                with(|c| c.tls = TlsMode::Allow),
            ),
        ];
        for (i, (built, assigned)) in cases.into_iter().enumerate() {
            assert_eq!(built, assigned, "case {i}");
        }
    }

    #[test]
    fn builder_calls_chain_and_accumulate() {
        let config = Config::default()
            .export_name(String::from("disk"))
            .meta_context("one")
            .meta_context(String::from("two"))
            .opt_mode(true)
            .opt_mode(false);
        assert_eq!(config.export_name, "disk");
        assert_eq!(config.meta_contexts, ["one", "two"]);
        assert!(!config.opt_mode, "the last call wins");
        let replaced = config.clone().meta_contexts(Vec::<String>::new());
        assert!(replaced.meta_contexts.is_empty());
        assert_eq!(replaced.export_name, config.export_name);
    }
}
