//! TLS backends behind `nbd_proto`'s [`TlsSession`](nbd_proto::TlsSession)
//! seam, chosen from what a URI (or a program) asks for.
//!
//! - X.509 certificates through rustls (cargo feature `rustls`, on by
//!   default): pure Rust, no C library to link.
//! - Pre-shared keys through OpenSSL (cargo feature `openssl-psk`, off by
//!   default): rustls has no external PSK; see the `psk` module for why OpenSSL.
//!
//! The settings are libnbd's (`set_tls_certificates`, `set_tls_verify_peer`,
//! `set_tls_hostname`, `set_tls_psk_file`, `set_tls_username`), carried in a
//! [`TlsRequest`]. [`connector`] reads every file at once, so a missing key or
//! a malformed certificate is an error before any socket is opened; the
//! session itself is made when the server acknowledges `NBD_OPT_STARTTLS`.
//!
//! ```no_run
//! use nbd_io::{connect, tls, UriPolicy};
//! let endpoint = UriPolicy::default()
//!     .resolve("nbds://server.example/disk?tls-certificates=/etc/pki/libnbd")?;
//! // Export name, TLS required, and the session source, all from the URI.
//! let conn = tls::connection_for(&endpoint, nbd_proto::Config::default())?;
//! let socket = connect(&endpoint.target)?;
//! // Drive `conn` over `socket` with an adapter or `nbd_io::pump`.
//! # drop((conn, socket));
//! # Ok::<(), nbd_io::Error>(())
//! ```

use std::path::{Path, PathBuf};

use nbd_proto::{Config, Connection, TlsConnector, TlsMode};

use crate::error::{Error, Result};
use crate::policy::{Endpoint, TlsKind, TlsRequest};
use crate::target::Target;

#[cfg(feature = "openssl-psk")]
mod psk;
#[cfg(feature = "rustls")]
mod x509;

/// A connection for what `endpoint` says: its export name replaces
/// `config.export_name`, and for an `nbds` endpoint TLS is required
/// ([`TlsMode::Require`]) with a [`connector`] for its `tls-*` settings.
/// A plaintext endpoint keeps `config.tls` as it is.
pub fn connection_for(endpoint: &Endpoint, mut config: Config) -> Result<Connection> {
    config.export_name = endpoint.export_name.clone();
    let connector = match &endpoint.tls {
        Some(request) => {
            config.tls = TlsMode::Require;
            Some(connector(request, &endpoint.target)?)
        }
        None => None,
    };
    let mut conn = Connection::new(config);
    if let Some(connector) = connector {
        conn.set_tls_connector(connector);
    }
    Ok(conn)
}

/// The session source for `request` on a connection to `target`: PSK when a
/// PSK file is given (or `tls-type=psk`), X.509 otherwise.
///
/// The name checked against the server's certificate is `request.hostname`
/// (`tls-hostname`), else the host of a TCP target. A Unix, vsock or
/// subprocess target has no host name: its certificate chain is checked but
/// not its name, as libnbd does, unless `tls-hostname` names one.
///
/// Errors ([`Error::Tls`]): a file that cannot be read or parsed, a kind of
/// TLS this build does not have (the cargo features), anonymous TLS (no
/// backend offers it).
pub fn connector(request: &TlsRequest, target: &Target) -> Result<Box<dyn TlsConnector>> {
    let kind = match (request.kind, &request.psk_file) {
        (Some(kind), _) => kind,
        (None, Some(_)) => TlsKind::Psk,
        (None, None) => TlsKind::X509,
    };
    match kind {
        TlsKind::Anonymous => Err(Error::Tls(
            "tls-type=anon: anonymous TLS is not supported (no authentication would be done); \
             use x509 or psk"
                .into(),
        )),
        TlsKind::Psk => psk_connector(request),
        TlsKind::X509 => {
            if request.psk_file.is_some() {
                return Err(Error::Tls(
                    "tls-psk-file is given with tls-type=x509: choose one".into(),
                ));
            }
            x509_connector(request, server_name(request, target))
        }
    }
}

/// The name the server's certificate must carry, if there is one.
fn server_name(request: &TlsRequest, target: &Target) -> Option<String> {
    request.hostname.clone().or_else(|| match target {
        Target::Tcp { host, .. } => Some(host.clone()),
        _ => None,
    })
}

#[cfg(feature = "rustls")]
fn x509_connector(request: &TlsRequest, name: Option<String>) -> Result<Box<dyn TlsConnector>> {
    Ok(Box::new(x509::X509Connector::new(request, name)?))
}

#[cfg(not(feature = "rustls"))]
fn x509_connector(_: &TlsRequest, _: Option<String>) -> Result<Box<dyn TlsConnector>> {
    Err(Error::Tls(
        "X.509 TLS needs nbd-io's `rustls` cargo feature, which this build lacks".into(),
    ))
}

#[cfg(feature = "openssl-psk")]
fn psk_connector(request: &TlsRequest) -> Result<Box<dyn TlsConnector>> {
    Ok(Box::new(psk::PskConnector::new(request)?))
}

#[cfg(not(feature = "openssl-psk"))]
fn psk_connector(_: &TlsRequest) -> Result<Box<dyn TlsConnector>> {
    Err(Error::Tls(
        "PSK TLS (tls-psk-file) needs nbd-io's `openssl-psk` cargo feature, which this build lacks"
            .into(),
    ))
}

/// The directories searched for certificates when no `tls-certificates` is
/// given, in libnbd's order: `$HOME/.pki/libnbd` and
/// `$HOME/.config/pki/libnbd` for an ordinary user, `/etc/pki/libnbd` for root.
pub fn default_certificate_dirs() -> Vec<PathBuf> {
    let root = rustix::process::geteuid().is_root();
    match std::env::var_os("HOME") {
        Some(home) if !root => {
            let home = Path::new(&home);
            vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")]
        }
        _ => vec![PathBuf::from("/etc/pki/libnbd")],
    }
}

/// Reads a file for a TLS setting, naming it and the setting in the error.
#[cfg(any(feature = "rustls", feature = "openssl-psk"))]
fn read_setting_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Tls(format!("cannot read {what} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> TlsRequest {
        TlsRequest::default()
    }

    fn error_of(request: &TlsRequest, target: &Target) -> String {
        match connector(request, target) {
            Ok(_) => panic!("{request:?}: a connector was made"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_name_checked_is_tls_hostname_then_the_tcp_host() {
        let tcp = Target::Tcp {
            host: "server.example".into(),
            port: 10809,
        };
        let unix = Target::Unix("/s".into());
        assert_eq!(
            server_name(&request(), &tcp).as_deref(),
            Some("server.example")
        );
        assert_eq!(server_name(&request(), &unix), None);
        let named = TlsRequest {
            hostname: Some("other.example".into()),
            ..request()
        };
        assert_eq!(server_name(&named, &tcp).as_deref(), Some("other.example"));
        assert_eq!(server_name(&named, &unix).as_deref(), Some("other.example"));
    }

    #[test]
    fn settings_that_cannot_work_are_errors_before_connecting() {
        let unix = Target::Unix("/s".into());
        let anon = TlsRequest {
            kind: Some(TlsKind::Anonymous),
            ..request()
        };
        assert!(error_of(&anon, &unix).contains("anonymous TLS is not supported"));
        let both = TlsRequest {
            kind: Some(TlsKind::X509),
            psk_file: Some("/k".into()),
            ..request()
        };
        assert!(error_of(&both, &unix).contains("choose one"));
        let psk_without_file = TlsRequest {
            kind: Some(TlsKind::Psk),
            ..request()
        };
        let err = error_of(&psk_without_file, &unix);
        assert!(
            err.contains("tls-psk-file") || err.contains("openssl-psk"),
            "{err}"
        );
    }

    #[cfg(feature = "rustls")]
    #[test]
    fn a_certificates_directory_is_checked_when_the_connector_is_made() {
        let unix = Target::Unix("/s".into());
        let missing = TlsRequest {
            certificates: Some("/nonexistent/pki".into()),
            ..request()
        };
        assert!(error_of(&missing, &unix).contains("/nonexistent/pki: no such directory"));
        let dir = std::env::temp_dir().join(format!("nbd-io-x509-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), "not a certificate\n").unwrap();
        let garbage = TlsRequest {
            certificates: Some(dir.clone()),
            ..request()
        };
        let err = error_of(&garbage, &unix);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("ca-cert.pem"), "{err}");
        assert!(err.contains("no certificate in it"), "{err}");
    }
}
