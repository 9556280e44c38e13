//! Parsing and formatting of NBD URIs.
//!
//! An NBD URI names an export on an NBD server, for example
//! `nbd://example.com/disk` or `nbd+unix:///disk?socket=/run/nbd.sock`.
//! The format is defined by `doc/uri.md` in the NBD project; this module
//! also understands the query parameters that libnbd's `nbd_connect_uri`
//! accepts.
//!
//! This module is pure: it never resolves host names, opens sockets or
//! reads files. It turns a string into an [`NbdUri`] (with [`parse`] or
//! [`str::parse`]) and an [`NbdUri`] back into a canonical string (with
//! its [`Display`](fmt::Display) implementation).
//!
//! # Supported forms
//!
//! | scheme       | transport          | TLS      | authority                  |
//! |--------------|--------------------|----------|----------------------------|
//! | `nbd`        | TCP                | optional | `[user@]host[:port]`       |
//! | `nbds`       | TCP                | required | `[user@]host[:port]`       |
//! | `nbd+unix`   | Unix domain socket | optional | `[user@]` only             |
//! | `nbds+unix`  | Unix domain socket | required | `[user@]` only             |
//! | `nbd+vsock`  | `AF_VSOCK`         | optional | `[user@][cid][:port]`      |
//! | `nbds+vsock` | `AF_VSOCK`         | required | `[user@][cid][:port]`      |
//!
//! The path after the authority, minus its first `/`, is the export name.
//! The query holds `&`-separated `name=value` parameters; see [`NbdUri`]
//! for the ones that are understood.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// The IANA-assigned NBD port, used when a URI gives none.
pub const DEFAULT_PORT: u16 = 10809;

/// The vsock CID used when an `nbd+vsock` URI gives none: 2, the host.
pub const DEFAULT_VSOCK_CID: u32 = 2;

/// The host used when an `nbd` or `nbds` URI has an empty host, as libnbd does.
pub const DEFAULT_HOST: &str = "localhost";

/// The longest export name, in bytes, that the NBD protocol allows (the same
/// limit [`Config::validate`](crate::Config::validate) and
/// [`Connection::set_export_name`](crate::Connection::set_export_name) apply).
pub const MAX_EXPORT_NAME_LEN: usize = crate::wire::consts::MAX_STRING_LEN;

/// A parsed NBD URI.
///
/// Build one with [`parse`] or [`str::parse`], or fill in the fields
/// directly. Its [`Display`](fmt::Display) output is a canonical URI that
/// parses back to an equal value, provided the value is one that parsing
/// could have produced (see the notes on each field).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// How to reach the server.
    pub transport: Transport,
    /// Whether TLS is required (`nbds` schemes). When false, the client may
    /// still negotiate TLS opportunistically.
    pub tls: bool,
    /// The export name, percent-decoded, without the leading `/` of the path.
    ///
    /// Parsing rejects names longer than [`MAX_EXPORT_NAME_LEN`] bytes and
    /// names containing NUL.
    pub export_name: String,
    /// The `tls-certificates` parameter: a directory of certificates and keys.
    pub tls_certificates: Option<String>,
    /// The `tls-verify-peer` parameter: whether to verify the server's identity.
    pub tls_verify_peer: Option<bool>,
    /// The `tls-psk-file` parameter: a file of pre-shared keys.
    pub tls_psk_file: Option<String>,
    /// The `tls-hostname` parameter: the name to check the server's
    /// certificate against.
    pub tls_hostname: Option<String>,
    /// The user name for TLS authentication, from the URI's userinfo
    /// (`user@host`) or from a `tls-username` parameter (not both).
    /// Formatting always puts it in the userinfo.
    pub tls_username: Option<String>,
    /// Query parameters this module does not understand, in the order given,
    /// percent-decoded. A parameter without `=` has an empty value.
    ///
    /// For a round trip through formatting, no name here may be one of the
    /// understood parameter names (`socket`, `tls-certificates`, ...).
    pub unknown_params: Vec<(String, String)>,
}

/// The transport an [`NbdUri`] names, with its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP/IP (`nbd`, `nbds`).
    Tcp {
        /// A DNS name, an IPv4 address, or an IPv6 address without its
        /// brackets (`::1`), percent-decoded. Never resolved here. Parsing
        /// turns an empty host into [`DEFAULT_HOST`], so an empty string
        /// does not survive a round trip.
        host: String,
        /// The TCP port; [`DEFAULT_PORT`] when the URI gives none. Parsing
        /// rejects 0.
        port: u16,
    },
    /// A Unix domain socket (`nbd+unix`, `nbds+unix`).
    Unix {
        /// The `socket` parameter, percent-decoded. A leading NUL names a
        /// socket in the Linux abstract namespace.
        socket: String,
    },
    /// `AF_VSOCK` (`nbd+vsock`, `nbds+vsock`).
    Vsock {
        /// The context ID; [`DEFAULT_VSOCK_CID`] when the URI gives none.
        cid: u32,
        /// The vsock port; [`DEFAULT_PORT`] when the URI gives none. Parsing
        /// rejects 0.
        port: u32,
    },
}

/// The part of a URI an error was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// The userinfo before `@` in the authority.
    Userinfo,
    /// The host in the authority.
    Host,
    /// The path, which holds the export name.
    Path,
    /// The query, which holds the parameters.
    Query,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Userinfo => "userinfo",
            Component::Host => "host",
            Component::Path => "path",
            Component::Query => "query",
        })
    }
}

/// Why a string is not an NBD URI this module accepts.
///
/// Each message is one line; the offending text is quoted with
/// [`str::escape_debug`] so that control characters cannot break it up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// The string does not start with `scheme:`.
    #[error("\"{}\" has no URI scheme (expected e.g. \"nbd://host/export\")", .uri.escape_debug())]
    MissingScheme {
        /// The whole input.
        uri: String,
    },
    /// The scheme is not one of the six NBD schemes.
    #[error(
        "unknown URI scheme \"{}\" (expected nbd, nbds, nbd+unix, nbds+unix, nbd+vsock or nbds+vsock)",
        .scheme.escape_debug()
    )]
    UnknownScheme {
        /// The scheme as written.
        scheme: String,
    },
    /// The scheme is not followed by `//`.
    #[error("URI must start with \"{scheme}://\"")]
    MissingAuthority {
        /// The (lower-case) scheme.
        scheme: &'static str,
    },
    /// The URI has a `#fragment`, which NBD URIs do not use.
    #[error("NBD URIs take no fragment, found \"#{}\" (write '#' as %23)", .fragment.escape_debug())]
    Fragment {
        /// The text after `#`.
        fragment: String,
    },
    /// A character that RFC 3986 does not allow unescaped in this component.
    #[error("character '{}' is not allowed in the URI {component} (percent-encode it)", .ch.escape_debug())]
    InvalidChar {
        /// Where it was found.
        component: Component,
        /// The character.
        ch: char,
    },
    /// A `%` not followed by two hex digits.
    #[error("invalid percent escape \"{}\"", .escape.escape_debug())]
    BadPercentEscape {
        /// The `%` and up to two characters after it.
        escape: String,
    },
    /// Percent-decoding gave bytes that are not UTF-8.
    #[error("percent-decoded {component} \"{}\" is not valid UTF-8", .raw.escape_debug())]
    InvalidUtf8 {
        /// Where it was found.
        component: Component,
        /// The encoded text.
        raw: String,
    },
    /// The userinfo has a `:`, i.e. a password, which is not supported.
    /// The password itself is not kept.
    #[error("userinfo for user \"{}\" contains a password (':'), which NBD URIs do not support", .user.escape_debug())]
    UserinfoPassword {
        /// The encoded text before the `:`.
        user: String,
    },
    /// A bracketed host that is not an IPv6 address (or is unterminated).
    #[error("invalid IPv6 address literal \"{}\"", .literal.escape_debug())]
    BadIpv6 {
        /// The text, brackets included as written.
        literal: String,
    },
    /// The port is not a decimal number from 1 to `max`.
    #[error("invalid port \"{}\" (expected a decimal number from 1 to {max})", .port.escape_debug())]
    BadPort {
        /// The port as written.
        port: String,
        /// The largest port the transport allows.
        max: u32,
    },
    /// The host of a vsock URI is not a decimal CID.
    #[error("invalid vsock CID \"{}\" (expected a decimal number)", .cid.escape_debug())]
    BadCid {
        /// The host as written.
        cid: String,
    },
    /// A Unix-socket URI has a host or port.
    #[error("{scheme} URIs take no host or port, found \"{}\"", .authority.escape_debug())]
    UnexpectedAuthority {
        /// The scheme.
        scheme: &'static str,
        /// The host and port as written.
        authority: String,
    },
    /// A Unix-socket URI has no `socket` parameter.
    #[error("{scheme} URIs need a socket=PATH query parameter")]
    MissingSocket {
        /// The scheme.
        scheme: &'static str,
    },
    /// A parameter that does not fit the scheme, such as `socket` on `nbd://`.
    #[error("query parameter \"{}\" is not allowed with scheme {scheme}", .param.escape_debug())]
    ParamNotAllowed {
        /// The parameter name.
        param: &'static str,
        /// The scheme.
        scheme: &'static str,
    },
    /// A parameter given twice (for `tls-username`, possibly once in the
    /// userinfo and once in the query).
    #[error("query parameter \"{}\" is given more than once", .param.escape_debug())]
    DuplicateParam {
        /// The parameter name.
        param: &'static str,
    },
    /// A boolean parameter whose value is not a boolean.
    #[error(
        "query parameter {param} has invalid value \"{}\" (expected 1/0, true/false, yes/no or on/off)",
        .value.escape_debug()
    )]
    BadBool {
        /// The parameter name.
        param: &'static str,
        /// The decoded value.
        value: String,
    },
    /// The decoded export name is longer than [`MAX_EXPORT_NAME_LEN`] bytes.
    #[error("export name is {len} bytes long, more than the limit of {MAX_EXPORT_NAME_LEN}")]
    ExportNameTooLong {
        /// The decoded length in bytes.
        len: usize,
    },
    /// The decoded export name contains NUL, which NBD export names may not.
    #[error("export name \"{}\" contains a NUL character", .name.escape_debug())]
    NulInExportName {
        /// The decoded export name.
        name: String,
    },
}

/// Parses an NBD URI.
///
/// The same as `uri.parse::<NbdUri>()`. See the [module docs](self) for
/// the accepted forms.
///
/// # Examples
///
/// ```
/// use nbd_proto::uri::{parse, Transport};
///
/// let uri = parse("nbds://alice@example.com:10810/my%20disk?tls-verify-peer=0")?;
/// assert_eq!(
///     uri.transport,
///     Transport::Tcp { host: "example.com".into(), port: 10810 }
/// );
/// assert!(uri.tls);
/// assert_eq!(uri.export_name, "my disk");
/// assert_eq!(uri.tls_username.as_deref(), Some("alice"));
/// assert_eq!(uri.tls_verify_peer, Some(false));
///
/// let unix = parse("nbd+unix:///?socket=/run/nbd.sock")?;
/// assert_eq!(unix.transport, Transport::Unix { socket: "/run/nbd.sock".into() });
/// assert_eq!(unix.export_name, "");
///
/// // Formatting gives a canonical URI that parses back to the same value.
/// assert_eq!(parse(&uri.to_string())?, uri);
///
/// assert!(parse("http://example.com/").is_err());
/// # Ok::<(), nbd_proto::uri::UriError>(())
/// ```
pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
    uri.parse()
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Unix,
    Vsock,
}

fn scheme_name(kind: Kind, tls: bool) -> &'static str {
    match (kind, tls) {
        (Kind::Tcp, false) => "nbd",
        (Kind::Tcp, true) => "nbds",
        (Kind::Unix, false) => "nbd+unix",
        (Kind::Unix, true) => "nbds+unix",
        (Kind::Vsock, false) => "nbd+vsock",
        (Kind::Vsock, true) => "nbds+vsock",
    }
}

impl NbdUri {
    /// The URI scheme for this transport and TLS setting, e.g. `nbds+unix`.
    pub fn scheme(&self) -> &'static str {
        let kind = match self.transport {
            Transport::Tcp { .. } => Kind::Tcp,
            Transport::Unix { .. } => Kind::Unix,
            Transport::Vsock { .. } => Kind::Vsock,
        };
        scheme_name(kind, self.tls)
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// Extra characters RFC 3986 allows unescaped in a path segment or query
/// (beyond unreserved and sub-delims).
const PATH_EXTRA: &[u8] = b":@/";
const QUERY_EXTRA: &[u8] = b":@/?";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Checks that `raw` uses only characters allowed in `component` and
/// percent-decodes it.
fn decode(raw: &str, component: Component, extra: &[u8]) -> Result<String, UriError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let pair = bytes
                .get(i + 1..i + 3)
                .and_then(|h| Some((hex_val(h[0])?, hex_val(h[1])?)));
            match pair {
                Some((hi, lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                None => {
                    return Err(UriError::BadPercentEscape {
                        escape: raw[i..].chars().take(3).collect(),
                    })
                }
            }
        } else if is_unreserved(b) || is_sub_delim(b) || extra.contains(&b) {
            out.push(b);
            i += 1;
        } else {
            // `i` is always on a char boundary: everything consumed so far
            // was ASCII.
            let ch = raw[i..].chars().next().unwrap_or('\u{fffd}');
            return Err(UriError::InvalidChar { component, ch });
        }
    }
    String::from_utf8(out).map_err(|_| UriError::InvalidUtf8 {
        component,
        raw: raw.to_owned(),
    })
}

/// Parses a decimal number from 1 to `max`.
fn parse_nonzero(s: &str, max: u32) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = s.parse().ok()?;
    (1..=max).contains(&n).then_some(n)
}

fn parse_port(s: Option<&str>, max: u32) -> Result<u32, UriError> {
    match s {
        None | Some("") => Ok(u32::from(DEFAULT_PORT)),
        Some(p) => parse_nonzero(p, max).ok_or_else(|| UriError::BadPort {
            port: p.to_owned(),
            max,
        }),
    }
}

fn parse_bool(param: &'static str, value: String) -> Result<bool, UriError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(UriError::BadBool { param, value }),
    }
}

fn set_once<T>(slot: &mut Option<T>, param: &'static str, value: T) -> Result<(), UriError> {
    if slot.is_some() {
        return Err(UriError::DuplicateParam { param });
    }
    *slot = Some(value);
    Ok(())
}

/// A host as written in the authority.
enum RawHost<'a> {
    /// Between `[` and `]`.
    Bracketed(&'a str),
    /// A registered name or IPv4 address, still percent-encoded.
    Name(&'a str),
}

/// Splits `host[:port]` (userinfo already removed).
fn split_host_port(hp: &str) -> Result<(RawHost<'_>, Option<&str>), UriError> {
    if let Some(inner) = hp.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            return Err(UriError::BadIpv6 {
                literal: hp.to_owned(),
            });
        };
        let after = &inner[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None => match after.chars().next() {
                None => None,
                Some(ch) => {
                    return Err(UriError::InvalidChar {
                        component: Component::Host,
                        ch,
                    })
                }
            },
        };
        Ok((RawHost::Bracketed(&inner[..end]), port))
    } else {
        match hp.rsplit_once(':') {
            Some((h, p)) => Ok((RawHost::Name(h), Some(p))),
            None => Ok((RawHost::Name(hp), None)),
        }
    }
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        // Scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":"
        let colon = uri.find(':');
        let scheme_raw = match colon {
            Some(c)
                if uri.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
                    && uri[..c]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
            {
                &uri[..c]
            }
            _ => {
                return Err(UriError::MissingScheme {
                    uri: uri.to_owned(),
                })
            }
        };
        let rest = &uri[scheme_raw.len() + 1..];
        let (kind, tls) = match scheme_raw.to_ascii_lowercase().as_str() {
            "nbd" => (Kind::Tcp, false),
            "nbds" => (Kind::Tcp, true),
            "nbd+unix" => (Kind::Unix, false),
            "nbds+unix" => (Kind::Unix, true),
            "nbd+vsock" => (Kind::Vsock, false),
            "nbds+vsock" => (Kind::Vsock, true),
            _ => {
                return Err(UriError::UnknownScheme {
                    scheme: scheme_raw.to_owned(),
                })
            }
        };
        let scheme = scheme_name(kind, tls);

        let rest = rest
            .strip_prefix("//")
            .ok_or(UriError::MissingAuthority { scheme })?;
        if let Some((_, fragment)) = rest.split_once('#') {
            return Err(UriError::Fragment {
                fragment: fragment.to_owned(),
            });
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(p) => before_query.split_at(p),
            None => (before_query, ""),
        };
        let (userinfo, host_port) = match authority.split_once('@') {
            Some((u, hp)) => (Some(u), hp),
            None => (None, authority),
        };

        // Userinfo: the TLS user name.
        let mut tls_username = None;
        if let Some(u) = userinfo {
            if let Some((user, _password)) = u.split_once(':') {
                return Err(UriError::UserinfoPassword {
                    user: user.to_owned(),
                });
            }
            tls_username = Some(decode(u, Component::Userinfo, b"")?);
        }

        // Host and port, by transport.
        let mut transport = match kind {
            Kind::Tcp => {
                let (raw_host, raw_port) = split_host_port(host_port)?;
                let host = match raw_host {
                    RawHost::Bracketed(inner) => {
                        if inner.parse::<Ipv6Addr>().is_err() {
                            return Err(UriError::BadIpv6 {
                                literal: format!("[{inner}]"),
                            });
                        }
                        inner.to_owned()
                    }
                    RawHost::Name(name) => decode(name, Component::Host, b"")?,
                };
                let host = if host.is_empty() {
                    DEFAULT_HOST.to_owned()
                } else {
                    host
                };
                let port = parse_port(raw_port, u32::from(u16::MAX))?;
                Transport::Tcp {
                    host,
                    // parse_port bounded it by u16::MAX.
                    port: u16::try_from(port).unwrap_or(DEFAULT_PORT),
                }
            }
            Kind::Unix => {
                if !host_port.is_empty() {
                    return Err(UriError::UnexpectedAuthority {
                        scheme,
                        authority: host_port.to_owned(),
                    });
                }
                // Filled in from the socket parameter below.
                Transport::Unix {
                    socket: String::new(),
                }
            }
            Kind::Vsock => {
                let (raw_host, raw_port) = split_host_port(host_port)?;
                let cid = match raw_host {
                    RawHost::Bracketed(inner) => {
                        return Err(UriError::BadCid {
                            cid: format!("[{inner}]"),
                        })
                    }
                    RawHost::Name("") => DEFAULT_VSOCK_CID,
                    RawHost::Name(name) => {
                        if !name.bytes().all(|b| b.is_ascii_digit()) {
                            return Err(UriError::BadCid {
                                cid: name.to_owned(),
                            });
                        }
                        name.parse().map_err(|_| UriError::BadCid {
                            cid: name.to_owned(),
                        })?
                    }
                };
                let port = parse_port(raw_port, u32::MAX)?;
                Transport::Vsock { cid, port }
            }
        };

        // Export name: the path without its first '/'.
        let export_name = match path.strip_prefix('/') {
            Some(p) => decode(p, Component::Path, PATH_EXTRA)?,
            None => String::new(),
        };
        if export_name.len() > MAX_EXPORT_NAME_LEN {
            return Err(UriError::ExportNameTooLong {
                len: export_name.len(),
            });
        }
        if export_name.contains('\0') {
            return Err(UriError::NulInExportName { name: export_name });
        }

        // Query parameters.
        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_verify_peer = None;
        let mut tls_psk_file = None;
        let mut tls_hostname = None;
        let mut username_param = None;
        let mut unknown_params = Vec::new();
        for segment in query.unwrap_or("").split('&') {
            if segment.is_empty() {
                continue;
            }
            let (raw_name, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
            let name = decode(raw_name, Component::Query, QUERY_EXTRA)?;
            let value = decode(raw_value, Component::Query, QUERY_EXTRA)?;
            match name.as_str() {
                "socket" => {
                    if !matches!(kind, Kind::Unix) {
                        return Err(UriError::ParamNotAllowed {
                            param: "socket",
                            scheme,
                        });
                    }
                    set_once(&mut socket, "socket", value)?;
                }
                "tls-certificates" => set_once(&mut tls_certificates, "tls-certificates", value)?,
                "tls-psk-file" => set_once(&mut tls_psk_file, "tls-psk-file", value)?,
                "tls-hostname" => set_once(&mut tls_hostname, "tls-hostname", value)?,
                "tls-username" => set_once(&mut username_param, "tls-username", value)?,
                "tls-verify-peer" => {
                    let b = parse_bool("tls-verify-peer", value)?;
                    set_once(&mut tls_verify_peer, "tls-verify-peer", b)?;
                }
                _ => unknown_params.push((name, value)),
            }
        }
        if let Some(user) = username_param {
            set_once(&mut tls_username, "tls-username", user)?;
        }
        if let Transport::Unix { socket: s } = &mut transport {
            *s = socket.ok_or(UriError::MissingSocket { scheme })?;
        }

        Ok(NbdUri {
            transport,
            tls,
            export_name,
            tls_certificates,
            tls_verify_peer,
            tls_psk_file,
            tls_hostname,
            tls_username,
            unknown_params,
        })
    }
}

/// Writes `s` percent-encoded, leaving unreserved characters and the bytes
/// in `keep` as they are.
fn write_encoded(f: &mut fmt::Formatter<'_>, s: &str, keep: &[u8]) -> fmt::Result {
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if is_unreserved(b) || keep.contains(&b) {
            continue;
        }
        // Bytes start..i are kept ASCII, so both ends are char boundaries.
        if start < i {
            f.write_str(&s[start..i])?;
        }
        write!(f, "%{b:02X}")?;
        start = i + 1;
    }
    if start < s.len() {
        f.write_str(&s[start..])?;
    }
    Ok(())
}

impl fmt::Display for NbdUri {
    /// Formats the canonical URI: lower-case scheme, user name in the
    /// userinfo, default ports left out, export name and parameters
    /// percent-encoded (everything but unreserved characters and `/`),
    /// parameters in a fixed order followed by the unknown ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme())?;
        if let Some(user) = &self.tls_username {
            write_encoded(f, user, b"")?;
            f.write_str("@")?;
        }
        match &self.transport {
            Transport::Tcp { host, port } => {
                if host.parse::<Ipv6Addr>().is_ok() {
                    write!(f, "[{host}]")?;
                } else {
                    write_encoded(f, host, b"")?;
                }
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
            }
            Transport::Unix { .. } => {}
            Transport::Vsock { cid, port } => {
                write!(f, "{cid}")?;
                if *port != u32::from(DEFAULT_PORT) {
                    write!(f, ":{port}")?;
                }
            }
        }

        let mut params: Vec<(&str, &str)> = Vec::new();
        if let Transport::Unix { socket } = &self.transport {
            params.push(("socket", socket));
        }
        let known = [
            ("tls-certificates", &self.tls_certificates),
            ("tls-hostname", &self.tls_hostname),
            ("tls-psk-file", &self.tls_psk_file),
        ];
        for (name, value) in known {
            if let Some(v) = value {
                params.push((name, v));
            }
        }
        if let Some(v) = self.tls_verify_peer {
            params.push(("tls-verify-peer", if v { "1" } else { "0" }));
        }
        for (name, value) in &self.unknown_params {
            params.push((name, value));
        }

        if !self.export_name.is_empty() || !params.is_empty() {
            f.write_str("/")?;
            write_encoded(f, &self.export_name, b"/")?;
        }
        for (i, (name, value)) in params.iter().enumerate() {
            f.write_str(if i == 0 { "?" } else { "&" })?;
            write_encoded(f, name, b"/")?;
            f.write_str("=")?;
            write_encoded(f, value, b"/")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> NbdUri {
        parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> UriError {
        match parse(s) {
            Ok(u) => panic!("{s:?} should not parse, got {u:?}"),
            Err(e) => e,
        }
    }

    fn tcp(host: &str, port: u16) -> Transport {
        Transport::Tcp {
            host: host.into(),
            port,
        }
    }

    fn base(transport: Transport, tls: bool) -> NbdUri {
        NbdUri {
            transport,
            tls,
            export_name: String::new(),
            tls_certificates: None,
            tls_verify_peer: None,
            tls_psk_file: None,
            tls_hostname: None,
            tls_username: None,
            unknown_params: Vec::new(),
        }
    }

    // ---- schemes ----

    #[test]
    fn scheme_nbd() {
        let u = p("nbd://example.com/disk");
        assert_eq!(u.transport, tcp("example.com", 10809));
        assert!(!u.tls);
        assert_eq!(u.export_name, "disk");
        assert_eq!(u.scheme(), "nbd");
    }

    #[test]
    fn scheme_nbds() {
        let u = p("nbds://example.com:10810");
        assert_eq!(u.transport, tcp("example.com", 10810));
        assert!(u.tls);
        assert_eq!(u.scheme(), "nbds");
    }

    #[test]
    fn scheme_nbd_unix() {
        let u = p("nbd+unix:///foo?socket=/tmp/nbd.sock");
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "/tmp/nbd.sock".into()
            }
        );
        assert!(!u.tls);
        assert_eq!(u.export_name, "foo");
        assert_eq!(u.scheme(), "nbd+unix");
    }

    #[test]
    fn scheme_nbds_unix() {
        let u = p("nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs");
        assert!(u.tls);
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "/tmp/nbd.sock".into()
            }
        );
        assert_eq!(u.tls_username.as_deref(), Some("alice"));
        assert_eq!(u.tls_certificates.as_deref(), Some("certs"));
        assert_eq!(u.export_name, "");
        assert_eq!(u.scheme(), "nbds+unix");
    }

    #[test]
    fn scheme_nbd_vsock() {
        let u = p("nbd+vsock:///");
        assert_eq!(
            u.transport,
            Transport::Vsock {
                cid: 2,
                port: 10809
            }
        );
        assert!(!u.tls);
        let u = p("nbd+vsock://3:4000/x");
        assert_eq!(u.transport, Transport::Vsock { cid: 3, port: 4000 });
        assert_eq!(u.export_name, "x");
        let u = p("nbd+vsock://4294967295:4294967295");
        assert_eq!(
            u.transport,
            Transport::Vsock {
                cid: u32::MAX,
                port: u32::MAX
            }
        );
    }

    #[test]
    fn scheme_nbds_vsock() {
        let u = p("nbds+vsock://2");
        assert!(u.tls);
        assert_eq!(
            u.transport,
            Transport::Vsock {
                cid: 2,
                port: 10809
            }
        );
        assert_eq!(u.scheme(), "nbds+vsock");
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let u = p("NBDS+Unix:///?socket=s");
        assert!(u.tls);
        assert_eq!(u.to_string(), "nbds+unix:///?socket=s");
    }

    #[test]
    fn empty_tcp_host_is_localhost() {
        assert_eq!(p("nbd://").transport, tcp("localhost", 10809));
        assert_eq!(p("nbd://:1234/x").transport, tcp("localhost", 1234));
        assert_eq!(p("nbd://h:/x").transport, tcp("h", 10809));
    }

    // ---- hosts ----

    #[test]
    fn ipv4_host() {
        assert_eq!(p("nbd://192.0.2.1:99").transport, tcp("192.0.2.1", 99));
    }

    #[test]
    fn ipv6_literals() {
        assert_eq!(p("nbd://[::1]").transport, tcp("::1", 10809));
        assert_eq!(p("nbd://[::1]:1234/e").transport, tcp("::1", 1234));
        assert_eq!(
            p("nbds://[2001:db8::7]/").transport,
            tcp("2001:db8::7", 10809)
        );
        assert_eq!(
            p("nbd://[::ffff:192.0.2.1]").transport,
            tcp("::ffff:192.0.2.1", 10809)
        );
        assert_eq!(p("nbd://[::1]:1234").to_string(), "nbd://[::1]:1234");
    }

    #[test]
    fn percent_encoded_host() {
        assert_eq!(
            p("nbd://ex%61mple.com").transport,
            tcp("example.com", 10809)
        );
    }

    // ---- export names (the table in doc/uri.md) ----

    #[test]
    fn export_names() {
        for (uri, name) in [
            ("nbd://example.com/disk", "disk"),
            ("nbd+unix:///disk?socket=sock", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
            ("nbd://h/a/b:c@d", "a/b:c@d"),
            ("nbd://h/a%2Fb", "a/b"),
            ("nbd://h/caf%C3%A9", "caf\u{e9}"),
            ("nbd://h?tls-hostname=x", ""),
        ] {
            assert_eq!(p(uri).export_name, name, "{uri}");
        }
    }

    #[test]
    fn export_name_at_limit() {
        let name = "a".repeat(MAX_EXPORT_NAME_LEN);
        assert_eq!(p(&format!("nbd://h/{name}")).export_name, name);
        // Counted after decoding.
        let encoded = "%41".repeat(MAX_EXPORT_NAME_LEN);
        assert_eq!(p(&format!("nbd://h/{encoded}")).export_name.len(), 4096);
    }

    // ---- percent-decoding and query parameters ----

    #[test]
    fn percent_decoding_in_query() {
        let u = p("nbd+unix:///?socket=%00/abstract");
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: "\0/abstract".into()
            }
        );
        assert_eq!(u.to_string(), "nbd+unix:///?socket=%00/abstract");

        let u = p("nbd://h/?x%26y=a%3Db&z=1+2");
        assert_eq!(
            u.unknown_params,
            vec![("x&y".into(), "a=b".into()), ("z".into(), "1+2".into())]
        );
    }

    #[test]
    fn all_known_params() {
        let u = p("nbds://h/e?tls-certificates=/c&tls-verify-peer=false\
             &tls-psk-file=/k&tls-hostname=srv.example&tls-username=bob");
        assert_eq!(u.tls_certificates.as_deref(), Some("/c"));
        assert_eq!(u.tls_verify_peer, Some(false));
        assert_eq!(u.tls_psk_file.as_deref(), Some("/k"));
        assert_eq!(u.tls_hostname.as_deref(), Some("srv.example"));
        assert_eq!(u.tls_username.as_deref(), Some("bob"));
        assert_eq!(
            u.to_string(),
            "nbds://bob@h/e?tls-certificates=/c&tls-hostname=srv.example\
             &tls-psk-file=/k&tls-verify-peer=0"
        );
    }

    #[test]
    fn booleans() {
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("YES", true),
            ("on", true),
            ("0", false),
            ("False", false),
            ("no", false),
            ("off", false),
        ] {
            let u = p(&format!("nbds://h?tls-verify-peer={v}"));
            assert_eq!(u.tls_verify_peer, Some(want), "{v}");
        }
    }

    #[test]
    fn unknown_params_are_kept_in_order() {
        let u = p("nbd://h/?x-foo=1&&tls-type=psk&flag&=v&x-foo=2&");
        assert_eq!(
            u.unknown_params,
            vec![
                ("x-foo".into(), "1".into()),
                ("tls-type".into(), "psk".into()),
                ("flag".into(), String::new()),
                (String::new(), "v".into()),
                ("x-foo".into(), "2".into()),
            ]
        );
        assert_eq!(
            u.to_string(),
            "nbd://h/?x-foo=1&tls-type=psk&flag=&=v&x-foo=2"
        );
    }

    #[test]
    fn tls_params_allowed_on_plain_schemes() {
        let u = p("nbd+vsock://3?tls-psk-file=k");
        assert_eq!(u.tls_psk_file.as_deref(), Some("k"));
    }

    // ---- userinfo ----

    #[test]
    fn userinfo() {
        let u = p("nbds://alice@example.com:1/x");
        assert_eq!(u.tls_username.as_deref(), Some("alice"));
        assert_eq!(u.transport, tcp("example.com", 1));
        let u = p("nbds://al%40ice@[::1]");
        assert_eq!(u.tls_username.as_deref(), Some("al@ice"));
        assert_eq!(u.transport, tcp("::1", 10809));
        let u = p("nbds+vsock://carol@5:6");
        assert_eq!(u.tls_username.as_deref(), Some("carol"));
        assert_eq!(u.transport, Transport::Vsock { cid: 5, port: 6 });
        assert_eq!(u.to_string(), "nbds+vsock://carol@5:6");
    }

    // ---- display ----

    #[test]
    fn display_canonical() {
        let mut u = base(tcp("example.com", 10809), false);
        assert_eq!(u.to_string(), "nbd://example.com");
        u.export_name = "a b/c".into();
        assert_eq!(u.to_string(), "nbd://example.com/a%20b/c");
        u.transport = tcp("::1", 1);
        assert_eq!(u.to_string(), "nbd://[::1]:1/a%20b/c");
        u.transport = tcp("we:ird host", 10809);
        u.export_name = "/x?#%".into();
        assert_eq!(u.to_string(), "nbd://we%3Aird%20host//x%3F%23%25");
        assert_eq!(parse(&u.to_string()), Ok(u));
    }

    // ---- one test per error variant ----

    #[test]
    fn error_missing_scheme() {
        for s in [
            "",
            "example.com",
            "/tmp/sock",
            "1nbd://h",
            "://h",
            "nb d://h",
        ] {
            assert!(
                matches!(err(s), UriError::MissingScheme { .. }),
                "{s:?}: {:?}",
                err(s)
            );
        }
    }

    #[test]
    fn error_unknown_scheme() {
        assert_eq!(
            err("http://example.com/"),
            UriError::UnknownScheme {
                scheme: "http".into()
            }
        );
        assert!(matches!(err("nbd+tcp://h"), UriError::UnknownScheme { .. }));
        // A host:port with no scheme reads as an unknown scheme.
        assert!(matches!(
            err("localhost:10809"),
            UriError::UnknownScheme { .. }
        ));
    }

    #[test]
    fn error_missing_authority() {
        assert_eq!(
            err("nbd:/export"),
            UriError::MissingAuthority { scheme: "nbd" }
        );
        assert_eq!(
            err("nbd+unix:?socket=s"),
            UriError::MissingAuthority { scheme: "nbd+unix" }
        );
    }

    #[test]
    fn error_fragment() {
        assert_eq!(
            err("nbd://h/disk#1"),
            UriError::Fragment {
                fragment: "1".into()
            }
        );
    }

    #[test]
    fn error_invalid_char() {
        assert_eq!(
            err("nbd://h/a b"),
            UriError::InvalidChar {
                component: Component::Path,
                ch: ' '
            }
        );
        assert_eq!(
            err("nbd://h/caf\u{e9}"),
            UriError::InvalidChar {
                component: Component::Path,
                ch: '\u{e9}'
            }
        );
        assert_eq!(
            err("nbd://h/?a=[1]"),
            UriError::InvalidChar {
                component: Component::Query,
                ch: '['
            }
        );
        assert_eq!(
            err("nbd://ho^st/"),
            UriError::InvalidChar {
                component: Component::Host,
                ch: '^'
            }
        );
        // An unbracketed IPv6 address.
        assert_eq!(
            err("nbd://::1/"),
            UriError::InvalidChar {
                component: Component::Host,
                ch: ':'
            }
        );
        assert_eq!(
            err("nbd://[::1]x/"),
            UriError::InvalidChar {
                component: Component::Host,
                ch: 'x'
            }
        );
        assert_eq!(
            err("nbd://a<b@h/"),
            UriError::InvalidChar {
                component: Component::Userinfo,
                ch: '<'
            }
        );
    }

    #[test]
    fn error_bad_percent_escape() {
        for (s, esc) in [
            ("nbd://h/%", "%"),
            ("nbd://h/%4", "%4"),
            ("nbd://h/%4g", "%4g"),
            ("nbd://h/%zz/more", "%zz"),
            ("nbd://h/%\u{e9}x", "%\u{e9}x"),
            ("nbd+unix:///?socket=%2", "%2"),
            ("nbd://%%/", "%%"),
        ] {
            assert_eq!(
                err(s),
                UriError::BadPercentEscape { escape: esc.into() },
                "{s}"
            );
        }
    }

    #[test]
    fn error_invalid_utf8() {
        assert_eq!(
            err("nbd://h/%FF"),
            UriError::InvalidUtf8 {
                component: Component::Path,
                raw: "%FF".into()
            }
        );
        assert!(matches!(
            err("nbd://h/?x=%C3"),
            UriError::InvalidUtf8 {
                component: Component::Query,
                ..
            }
        ));
    }

    #[test]
    fn error_userinfo_password() {
        let e = err("nbds://alice:secret@h/");
        assert_eq!(
            e,
            UriError::UserinfoPassword {
                user: "alice".into()
            }
        );
        assert!(!e.to_string().contains("secret"));
    }

    #[test]
    fn error_bad_ipv6() {
        for s in [
            "nbd://[::1/",
            "nbd://[]/",
            "nbd://[example.com]/",
            "nbd://[fe80::1%25eth0]/",
            "nbd://[v1.x]/",
        ] {
            assert!(matches!(err(s), UriError::BadIpv6 { .. }), "{s}");
        }
    }

    #[test]
    fn error_bad_port() {
        for (s, port) in [
            ("nbd://h:0/", "0"),
            ("nbd://h:65536/", "65536"),
            ("nbd://h:99999999999999999999/", "99999999999999999999"),
            ("nbd://h:abc/", "abc"),
            ("nbd://h:+1/", "+1"),
            ("nbd://h:-1/", "-1"),
            ("nbd://[::1]:x/", "x"),
        ] {
            assert_eq!(
                err(s),
                UriError::BadPort {
                    port: port.into(),
                    max: 65535
                },
                "{s}"
            );
        }
        assert_eq!(
            err("nbd+vsock://2:4294967296"),
            UriError::BadPort {
                port: "4294967296".into(),
                max: u32::MAX
            }
        );
        assert!(matches!(err("nbd+vsock://2:0"), UriError::BadPort { .. }));
        assert_eq!(p("nbd://h:65535").transport, tcp("h", 65535));
    }

    #[test]
    fn error_bad_cid() {
        for s in [
            "nbd+vsock://host/",
            "nbd+vsock://-1/",
            "nbd+vsock://+2/",
            "nbd+vsock://4294967296/",
            "nbd+vsock://[::1]/",
        ] {
            assert!(matches!(err(s), UriError::BadCid { .. }), "{s}");
        }
    }

    #[test]
    fn error_unexpected_authority() {
        assert_eq!(
            err("nbd+unix://localhost/?socket=s"),
            UriError::UnexpectedAuthority {
                scheme: "nbd+unix",
                authority: "localhost".into()
            }
        );
        assert!(matches!(
            err("nbds+unix://:1/?socket=s"),
            UriError::UnexpectedAuthority { .. }
        ));
    }

    #[test]
    fn error_missing_socket() {
        assert_eq!(
            err("nbd+unix:///disk"),
            UriError::MissingSocket { scheme: "nbd+unix" }
        );
        assert_eq!(
            err("nbds+unix:///?Socket=x"),
            UriError::MissingSocket {
                scheme: "nbds+unix"
            }
        );
    }

    #[test]
    fn error_param_not_allowed() {
        assert_eq!(
            err("nbd://h/?socket=/tmp/s"),
            UriError::ParamNotAllowed {
                param: "socket",
                scheme: "nbd"
            }
        );
        assert!(matches!(
            err("nbds+vsock://2?socket=/tmp/s"),
            UriError::ParamNotAllowed { .. }
        ));
    }

    #[test]
    fn error_duplicate_param() {
        for (s, param) in [
            ("nbd+unix:///?socket=a&socket=b", "socket"),
            (
                "nbd://h?tls-certificates=a&tls-certificates=a",
                "tls-certificates",
            ),
            (
                "nbd://h?tls-verify-peer=1&tls-verify-peer=1",
                "tls-verify-peer",
            ),
            ("nbd://h?tls-psk-file=a&tls-psk-file=b", "tls-psk-file"),
            ("nbd://h?tls-hostname=a&tls-hostname=b", "tls-hostname"),
            ("nbd://h?tls-username=a&tls-username=b", "tls-username"),
            ("nbd://a@h?tls-username=a", "tls-username"),
        ] {
            assert_eq!(err(s), UriError::DuplicateParam { param }, "{s}");
        }
    }

    #[test]
    fn error_bad_bool() {
        assert_eq!(
            err("nbds://h?tls-verify-peer=maybe"),
            UriError::BadBool {
                param: "tls-verify-peer",
                value: "maybe".into()
            }
        );
        assert!(matches!(
            err("nbds://h?tls-verify-peer"),
            UriError::BadBool { .. }
        ));
    }

    #[test]
    fn error_export_name_too_long() {
        let name = "a".repeat(MAX_EXPORT_NAME_LEN + 1);
        assert_eq!(
            err(&format!("nbd://h/{name}")),
            UriError::ExportNameTooLong { len: 4097 }
        );
        // Two-byte characters: 2049 * 2 bytes.
        let name = "%C3%A9".repeat(2049);
        assert_eq!(
            err(&format!("nbd://h/{name}")),
            UriError::ExportNameTooLong { len: 4098 }
        );
    }

    #[test]
    fn error_nul_in_export_name() {
        assert_eq!(
            err("nbd://h/a%00b"),
            UriError::NulInExportName {
                name: "a\0b".into()
            }
        );
    }

    #[test]
    fn error_messages_are_one_line_and_escaped() {
        let cases = [
            "x\ny",
            "ht\ntp://h",
            "nbd:\n",
            "nbd://h/#\n",
            "nbd://h/\n",
            "nbd://h/%\n",
            "nbd://h/%FF%0A",
            "nbd://a\n:b@h",
            "nbd://[\n]",
            "nbd://h:\n",
            "nbd+vsock://\n",
            "nbd+unix://\n/?socket=s",
            "nbd+unix:///",
            "nbd://h?socket=s",
            "nbd://h?tls-hostname=a&tls-hostname=b",
            "nbd://h?tls-verify-peer=%0A",
            "nbd://h/a%00%0A",
        ];
        for s in cases {
            let msg = err(s).to_string();
            assert!(!msg.contains('\n'), "{s:?} gave {msg:?}");
            assert!(!msg.is_empty());
        }
        assert_eq!(
            err("bad\tscheme://").to_string(),
            "\"bad\\tscheme://\" has no URI scheme (expected e.g. \"nbd://host/export\")"
        );
        assert_eq!(
            err("nbd://h/%0A%FF").to_string(),
            "percent-decoded path \"%0A%FF\" is not valid UTF-8"
        );
        assert_eq!(
            err("nbd://h/a%0A%00").to_string(),
            "export name \"a\\n\\0\" contains a NUL character"
        );
    }

    #[test]
    fn from_str_matches_parse() {
        let s = "nbds://u@h:1/e?tls-hostname=x&y=z";
        assert_eq!(s.parse::<NbdUri>(), parse(s));
    }

    // ---- property tests ----

    const KNOWN: [&str; 6] = [
        "socket",
        "tls-certificates",
        "tls-verify-peer",
        "tls-psk-file",
        "tls-hostname",
        "tls-username",
    ];

    /// Strings mixing URI delimiters, escapes, non-ASCII and control
    /// characters.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9./_-]{0,12}",
            "[ -~]{0,12}",
            ".{0,8}",
            "[/:@?#&=%\\[\\]+;\\\\ \u{0}\n\u{e9}\u{1f600}]{0,8}",
        ]
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z][a-z0-9.-]{0,20}",
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
            text().prop_filter("non-empty", |s| !s.is_empty()),
        ]
    }

    fn transport() -> impl Strategy<Value = Transport> {
        prop_oneof![
            (host(), 1..=u16::MAX).prop_map(|(host, port)| Transport::Tcp { host, port }),
            text().prop_map(|socket| Transport::Unix { socket }),
            (any::<u32>(), 1..=u32::MAX).prop_map(|(cid, port)| Transport::Vsock { cid, port }),
        ]
    }

    prop_compose! {
        fn nbd_uri()(
            transport in transport(),
            tls in any::<bool>(),
            export_name in prop_oneof![
                text(),
                "[^\u{0}]{0,40}",
                Just("x".repeat(MAX_EXPORT_NAME_LEN)),
            ].prop_filter("no NUL", |s| !s.contains('\0')),
            tls_certificates in proptest::option::of(text()),
            tls_verify_peer in proptest::option::of(any::<bool>()),
            tls_psk_file in proptest::option::of(text()),
            tls_hostname in proptest::option::of(text()),
            tls_username in proptest::option::of(text()),
            unknown_params in proptest::collection::vec(
                (text().prop_filter("not a known name", |n| !KNOWN.contains(&n.as_str())), text()),
                0..4,
            ),
        ) -> NbdUri {
            NbdUri {
                transport,
                tls,
                export_name,
                tls_certificates,
                tls_verify_peer,
                tls_psk_file,
                tls_hostname,
                tls_username,
                unknown_params,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn display_then_parse_round_trips(uri in nbd_uri()) {
            let s = uri.to_string();
            prop_assert!(s.is_ascii(), "{}", s);
            prop_assert_eq!(parse(&s), Ok(uri), "{}", s);
        }

        #[test]
        fn parse_never_panics_and_is_canonical(s in prop_oneof![
            ".{0,40}",
            "(nbds?(\\+unix|\\+vsock)?)://[a-z0-9@:\\[\\]%]{0,12}(/[ -~]{0,20})?",
        ]) {
            if let Ok(uri) = parse(&s) {
                let again = uri.to_string();
                prop_assert_eq!(parse(&again), Ok(uri));
            }
        }
    }
}
