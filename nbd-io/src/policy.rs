//! [`UriPolicy`]: which NBD URIs a program accepts, and what an accepted one asks for.
//!
//! A URI can come from somewhere the program does not control (a user, a
//! configuration file, a management API), so what it may ask for is the
//! program's decision, as libnbd's `set_uri_allow_transports`,
//! `set_uri_allow_tls` and `set_uri_allow_local_file` make it. Every query
//! parameter of the NBD URI specification is recognised here; any other is
//! an error, never silently ignored (the specification says an unknown
//! parameter should be diagnosed).

use std::path::PathBuf;

use bitflags::bitflags;
use nbd_proto::uri::{NbdUri, Transport};

use crate::error::{Error, Result};
use crate::target::Target;

bitflags! {
    /// Transports a URI may name (libnbd's `LIBNBD_ALLOW_TRANSPORT_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Transports: u32 {
        /// `nbd://`, `nbds://`.
        const TCP = 1 << 0;
        /// `nbd+unix://`, `nbds+unix://`.
        const UNIX = 1 << 1;
        /// `nbd+vsock://`, `nbds+vsock://`.
        const VSOCK = 1 << 2;
    }
}

/// Whether a URI may ask for TLS (libnbd's `set_uri_allow_tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UriTls {
    /// `nbds` schemes are refused.
    Disable,
    /// Either kind of scheme (the default).
    #[default]
    Allow,
    /// Only `nbds` schemes.
    Require,
}

/// The TLS authentication a URI asks for with `tls-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsKind {
    /// `anon`: anonymous Diffie-Hellman, no authentication.
    Anonymous,
    /// `x509`: certificates.
    X509,
    /// `psk`: a pre-shared key.
    Psk,
}

/// What an `nbds` URI asks of TLS: the settings of its `tls-*` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsRequest {
    /// `tls-type`, if given.
    pub kind: Option<TlsKind>,
    /// `tls-certificates`: the directory of `ca-cert.pem`, `client-cert.pem`, ...
    pub certificates: Option<PathBuf>,
    /// `tls-psk-file`: a file of `username:hexkey` lines.
    pub psk_file: Option<PathBuf>,
    /// The user name from the userinfo or `tls-username`.
    pub username: Option<String>,
    /// `tls-hostname`: the name to check the server's certificate against.
    pub hostname: Option<String>,
    /// `tls-verify-peer`; `None` means the default (verify).
    pub verify_peer: Option<bool>,
}

/// Everything an accepted URI says: where the server is, which export, and
/// what TLS it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where the server is.
    pub target: Target,
    /// The export name from the URI's path.
    pub export_name: String,
    /// `Some` for the `nbds` schemes, which require TLS.
    pub tls: Option<TlsRequest>,
}

/// Which URIs are accepted. The default accepts every transport and either
/// kind of scheme, and refuses URIs that name local files (`tls-psk-file`),
/// as libnbd does; programs run by the user whose files they are (such as the
/// `nbd` command) allow them.
///
/// ```
/// use nbd_io::{Target, Transports, UriPolicy};
/// let policy = UriPolicy::default();
/// let endpoint = policy.resolve("nbd+unix:///disk?socket=/run/nbd.sock")?;
/// assert_eq!(endpoint.target, Target::Unix("/run/nbd.sock".into()));
/// assert_eq!(endpoint.export_name, "disk");
///
/// // An unknown query parameter is an error, never ignored.
/// assert!(policy.resolve("nbd://h/?sokcet=/x").is_err());
///
/// // A program that only talks to local servers.
/// let local_only = UriPolicy { transports: Transports::UNIX, ..UriPolicy::default() };
/// assert!(local_only.resolve("nbd://example.com/").is_err());
/// # Ok::<(), nbd_io::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UriPolicy {
    /// Transports a URI may name.
    pub transports: Transports,
    /// Whether a URI may, or must, ask for TLS.
    pub tls: UriTls,
    /// Whether a URI may name local files (`tls-psk-file`).
    pub local_files: bool,
}

impl Default for UriPolicy {
    fn default() -> Self {
        UriPolicy {
            transports: Transports::all(),
            tls: UriTls::Allow,
            local_files: false,
        }
    }
}

impl UriPolicy {
    /// Parses `uri` and checks it against the policy.
    pub fn resolve(&self, uri: &str) -> Result<Endpoint> {
        let parsed: NbdUri = uri.parse()?;
        self.check(&parsed)
    }

    /// Checks a parsed URI against the policy and says what it asks for.
    pub fn check(&self, uri: &NbdUri) -> Result<Endpoint> {
        let (transport, target) = match &uri.transport {
            Transport::Tcp { host, port } => (
                Transports::TCP,
                Target::Tcp {
                    host: host.clone(),
                    port: *port,
                },
            ),
            Transport::Unix { socket } => (Transports::UNIX, unix_target(socket)),
            Transport::Vsock { cid, port } => (
                Transports::VSOCK,
                Target::Vsock {
                    cid: *cid,
                    port: *port,
                },
            ),
        };
        if !self.transports.contains(transport) {
            return Err(Error::UriRefused(format!(
                "{}: the {} transport is not allowed here",
                uri.scheme(),
                transport_name(transport)
            )));
        }
        match (self.tls, uri.tls) {
            (UriTls::Disable, true) => {
                return Err(Error::UriRefused(format!(
                    "{}: TLS URIs are not allowed here",
                    uri.scheme()
                )))
            }
            (UriTls::Require, false) => {
                return Err(Error::UriRefused(format!(
                    "{}: only TLS URIs (nbds) are allowed here",
                    uri.scheme()
                )))
            }
            _ => {}
        }
        if uri.tls_psk_file.is_some() && !self.local_files {
            return Err(Error::UriRefused(
                "tls-psk-file names a local file, which is not allowed here".into(),
            ));
        }
        let kind = tls_kind(&uri.unknown_params)?;
        if let Some((name, _)) = uri
            .unknown_params
            .iter()
            .find(|(name, _)| name != "tls-type")
        {
            return Err(Error::UriRefused(format!(
                "unknown query parameter {:?} (known: socket, tls-type, tls-certificates, \
                 tls-psk-file, tls-username, tls-hostname, tls-verify-peer)",
                name.escape_debug().to_string()
            )));
        }
        if !uri.tls {
            check_no_tls_params(uri, kind)?;
        }
        let tls = uri.tls.then(|| TlsRequest {
            kind,
            certificates: uri.tls_certificates.as_ref().map(PathBuf::from),
            psk_file: uri.tls_psk_file.as_ref().map(PathBuf::from),
            username: uri.tls_username.clone(),
            hostname: uri.tls_hostname.clone(),
            verify_peer: uri.tls_verify_peer,
        });
        Ok(Endpoint {
            target,
            export_name: uri.export_name.clone(),
            tls,
        })
    }
}

/// A plaintext URI with TLS settings is a mistake (most likely `nbd` written
/// for `nbds`): diagnosed rather than silently connecting without TLS.
fn check_no_tls_params(uri: &NbdUri, kind: Option<TlsKind>) -> Result<()> {
    let given = [
        ("tls-type", kind.is_some()),
        ("tls-certificates", uri.tls_certificates.is_some()),
        ("tls-psk-file", uri.tls_psk_file.is_some()),
        ("tls-hostname", uri.tls_hostname.is_some()),
        ("tls-verify-peer", uri.tls_verify_peer.is_some()),
        (
            "a TLS user name (user@ or tls-username)",
            uri.tls_username.is_some(),
        ),
    ];
    match given.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(Error::UriRefused(format!(
            "{name} is given, but {}:// does not use TLS (did you mean {}://?)",
            uri.scheme(),
            uri.scheme().replacen("nbd", "nbds", 1)
        ))),
        None => Ok(()),
    }
}

/// A `socket` parameter starting with NUL names the abstract namespace.
fn unix_target(socket: &str) -> Target {
    match socket.strip_prefix('\0') {
        Some(name) => Target::UnixAbstract(name.as_bytes().to_vec()),
        None => Target::Unix(PathBuf::from(socket)),
    }
}

fn transport_name(t: Transports) -> &'static str {
    if t == Transports::TCP {
        "TCP"
    } else if t == Transports::UNIX {
        "Unix socket"
    } else {
        "vsock"
    }
}

/// The `tls-type` parameter, given at most once.
fn tls_kind(params: &[(String, String)]) -> Result<Option<TlsKind>> {
    let mut kinds = params.iter().filter(|(name, _)| name == "tls-type");
    let Some((_, value)) = kinds.next() else {
        return Ok(None);
    };
    if kinds.next().is_some() {
        return Err(Error::UriRefused("tls-type is given more than once".into()));
    }
    match value.as_str() {
        "anon" => Ok(Some(TlsKind::Anonymous)),
        "x509" => Ok(Some(TlsKind::X509)),
        "psk" => Ok(Some(TlsKind::Psk)),
        other => Err(Error::UriRefused(format!(
            "tls-type {:?} is not one of anon, x509, psk",
            other.escape_debug().to_string()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_becomes_its_target() {
        let p = UriPolicy::default();
        let cases = [
            (
                "nbd://example.com:10810/a",
                Target::Tcp {
                    host: "example.com".into(),
                    port: 10810,
                },
            ),
            ("nbd+unix:///a?socket=/s", Target::Unix("/s".into())),
            (
                "nbd+unix:///a?socket=%00/abstract",
                Target::UnixAbstract(b"/abstract".to_vec()),
            ),
            ("nbd+vsock://3:4000/a", Target::Vsock { cid: 3, port: 4000 }),
        ];
        for (uri, target) in cases {
            let e = p.resolve(uri).unwrap();
            assert_eq!(e.target, target, "{uri}");
            assert_eq!(e.export_name, "a", "{uri}");
            assert_eq!(e.tls, None, "{uri}");
        }
    }

    #[test]
    fn transports_outside_the_policy_are_refused() {
        let p = UriPolicy {
            transports: Transports::UNIX | Transports::VSOCK,
            ..UriPolicy::default()
        };
        let err = p.resolve("nbd://example.com/").unwrap_err();
        assert!(
            err.to_string().contains("TCP transport is not allowed"),
            "{err}"
        );
        assert!(p.resolve("nbd+unix:///?socket=/s").is_ok());
        let p = UriPolicy {
            transports: Transports::TCP,
            ..UriPolicy::default()
        };
        assert!(p.resolve("nbd+vsock://3").is_err());
        assert!(p.resolve("nbd+unix:///?socket=/s").is_err());
    }

    #[test]
    fn tls_policy_is_enforced_both_ways() {
        let disable = UriPolicy {
            tls: UriTls::Disable,
            ..UriPolicy::default()
        };
        assert!(disable.resolve("nbds://h/").is_err());
        assert!(disable.resolve("nbd://h/").is_ok());
        let require = UriPolicy {
            tls: UriTls::Require,
            ..UriPolicy::default()
        };
        assert!(require.resolve("nbd://h/").is_err());
        assert!(require.resolve("nbds://h/").is_ok());
    }

    #[test]
    fn tls_parameters_are_carried_and_local_files_need_permission() {
        let uri =
            "nbds://alice@h/x?tls-type=psk&tls-psk-file=/k&tls-verify-peer=0&tls-hostname=srv";
        let err = UriPolicy::default().resolve(uri).unwrap_err();
        assert!(err.to_string().contains("tls-psk-file"), "{err}");
        let p = UriPolicy {
            local_files: true,
            ..UriPolicy::default()
        };
        let tls = p.resolve(uri).unwrap().tls.unwrap();
        assert_eq!(tls.kind, Some(TlsKind::Psk));
        assert_eq!(tls.psk_file, Some(PathBuf::from("/k")));
        assert_eq!(tls.username.as_deref(), Some("alice"));
        assert_eq!(tls.hostname.as_deref(), Some("srv"));
        assert_eq!(tls.verify_peer, Some(false));
        let certs = UriPolicy::default()
            .resolve("nbds+unix:///?socket=/s&tls-certificates=/etc/pki/nbd&tls-type=x509")
            .unwrap();
        let tls = certs.tls.unwrap();
        assert_eq!(tls.kind, Some(TlsKind::X509));
        assert_eq!(tls.certificates, Some(PathBuf::from("/etc/pki/nbd")));
    }

    #[test]
    fn every_tls_parameter_is_carried_for_every_tls_scheme() {
        let p = UriPolicy {
            local_files: true,
            ..UriPolicy::default()
        };
        let params = "tls-type=x509&tls-certificates=/pki&tls-psk-file=/k&tls-username=u\
                      &tls-hostname=h.example&tls-verify-peer=false";
        for base in [
            "nbds://host/e?",
            "nbds+unix:///e?socket=/s&",
            "nbds+vsock://3/e?",
        ] {
            let uri = format!("{base}{params}");
            let tls = p.resolve(&uri).unwrap().tls.expect("TLS required");
            assert_eq!(
                tls,
                TlsRequest {
                    kind: Some(TlsKind::X509),
                    certificates: Some("/pki".into()),
                    psk_file: Some("/k".into()),
                    username: Some("u".into()),
                    hostname: Some("h.example".into()),
                    verify_peer: Some(false),
                },
                "{uri}"
            );
        }
    }

    #[test]
    fn tls_settings_on_a_plaintext_uri_are_diagnosed() {
        let p = UriPolicy {
            local_files: true,
            ..UriPolicy::default()
        };
        for (uri, says) in [
            ("nbd://h/?tls-certificates=/c", "tls-certificates"),
            (
                "nbd+unix:///?socket=/s&tls-verify-peer=0",
                "tls-verify-peer",
            ),
            ("nbd+vsock://3/?tls-hostname=x", "tls-hostname"),
            ("nbd://h/?tls-type=x509", "tls-type"),
            ("nbd://h/?tls-psk-file=/k", "tls-psk-file"),
            ("nbd://alice@h/", "user name"),
        ] {
            let err = p.resolve(uri).unwrap_err().to_string();
            assert!(err.contains(says), "{uri}: {err}");
            assert!(err.contains("nbds"), "{uri}: {err}");
            let tls = uri.replacen("nbd", "nbds", 1);
            assert!(p.resolve(&tls).is_ok(), "{tls}");
        }
    }

    #[test]
    fn unknown_or_malformed_parameters_are_diagnosed() {
        let p = UriPolicy::default();
        for (uri, says) in [
            ("nbd://h/?sokcet=/x", "sokcet"),
            ("nbd://h/?x-experimental=1", "x-experimental"),
            ("nbds://h/?tls-type=rsa", "rsa"),
            ("nbds://h/?tls-type=psk&tls-type=x509", "more than once"),
        ] {
            let err = p.resolve(uri).unwrap_err();
            assert!(err.to_string().contains(says), "{uri}: {err}");
            assert_eq!(err.errno(), Some(nbd_proto::Errno::Inval), "{uri}");
        }
    }
}
