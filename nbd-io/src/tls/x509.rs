//! X.509 TLS through rustls: certificates laid out as libnbd, nbdkit and qemu
//! lay them out, the system trust store otherwise, and an error that names
//! the check that failed and the name it failed for.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_proto::{TlsConnector, TlsSession};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    RootCertStore, SignatureScheme,
};

use super::{default_certificate_dirs, read_setting_file};
use crate::error::{Error, Result};
use crate::policy::TlsRequest;

/// Makes rustls client sessions for one configuration.
pub(crate) struct X509Connector {
    config: Arc<ClientConfig>,
    /// What rustls is told the server is called (a placeholder without a name).
    server_name: ServerName<'static>,
    context: Arc<Context>,
}

/// What an error message needs to say where a check failed.
#[derive(Debug)]
struct Context {
    /// The name checked, or `None` when only the chain is checked.
    name: Option<String>,
    /// Where the trusted CAs came from.
    trust: String,
    /// Whether a client certificate is offered.
    client_cert: bool,
}

impl Context {
    /// The server as a message names it: by the name checked, if any.
    fn shown_name(&self) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => "the server".into(),
        }
    }
}

/// The files of a certificates directory (libnbd's layout).
struct Files {
    dir: PathBuf,
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    crl: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Files {
        Files {
            dir: dir.to_path_buf(),
            ca: dir.join("ca-cert.pem"),
            client_cert: dir.join("client-cert.pem"),
            client_key: dir.join("client-key.pem"),
            crl: dir.join("ca-crl.pem"),
        }
    }
}

impl X509Connector {
    pub(crate) fn new(request: &TlsRequest, name: Option<String>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verify = request.verify_peer.unwrap_or(true);
        // libnbd's rule: the given directory, or the default ones, are used
        // when they hold ca-cert.pem; otherwise the system trust store.
        let files = match &request.certificates {
            Some(dir) => Some(Files::in_dir(dir)).filter(|f| f.ca.exists()),
            None => default_certificate_dirs()
                .iter()
                .map(|d| Files::in_dir(d))
                .find(|f| f.ca.exists()),
        };
        if let (Some(dir), None) = (&request.certificates, &files) {
            if !dir.is_dir() {
                return Err(Error::Tls(format!(
                    "tls-certificates {}: no such directory",
                    dir.display()
                )));
            }
        }
        let (roots, trust) = match &files {
            Some(f) => (load_roots(&f.ca)?, format!("the CA of {}", f.ca.display())),
            None => (system_roots()?, "the system trust store".to_string()),
        };
        let crls = match &files {
            Some(f) if f.crl.exists() => load_crls(&f.crl)?,
            _ => Vec::new(),
        };
        let webpki = if roots.is_empty() {
            None
        } else {
            let builder =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if crls.is_empty() {
                builder
            } else {
                builder.with_crls(crls).allow_unknown_revocation_status()
            };
            Some(
                builder
                    .build()
                    .map_err(|e| Error::Tls(format!("cannot use {trust}: {e}")))?,
            )
        };
        if webpki.is_none() && verify {
            return Err(Error::Tls(format!(
                "{trust} holds no CA certificate, so the server cannot be verified \
                 (give tls-certificates, or tls-verify-peer=false to connect unverified)"
            )));
        }
        if !verify {
            eprintln!(
                "warning: TLS peer verification is off (tls-verify-peer=false): the server's \
                 identity is not checked, so a man in the middle can read and change the data"
            );
        }
        let client_auth = match &files {
            Some(f) => load_client_auth(f)?,
            None => None,
        };
        let context = Arc::new(Context {
            name: name.clone(),
            trust,
            client_cert: client_auth.is_some(),
        });
        let verifier = Arc::new(Verifier {
            webpki,
            verify,
            check_name: name.is_some(),
            provider: provider.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(format!("rustls: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_auth {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(format!("the client certificate and key: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        // Without a name there is nothing to tell the server either.
        config.enable_sni = name.is_some();
        let server_name = match &name {
            Some(n) => ServerName::try_from(n.clone())
                .map_err(|e| Error::Tls(format!("{n:?} is no host name for TLS: {e}")))?,
            // A placeholder rustls needs; the verifier ignores the name.
            None => {
                ServerName::try_from("localhost").map_err(|e| Error::Tls(format!("rustls: {e}")))?
            }
        };
        Ok(X509Connector {
            config: Arc::new(config),
            server_name,
            context,
        })
    }
}

impl TlsConnector for X509Connector {
    fn start(&mut self) -> nbd_proto::Result<Box<dyn TlsSession>> {
        let conn = ClientConnection::new(self.config.clone(), self.server_name.clone())
            .map_err(|e| nbd_proto::Error::Tls(format!("cannot start a TLS session: {e}")))?;
        Ok(Box::new(RustlsSession {
            conn,
            context: self.context.clone(),
            heard_from_server: false,
        }))
    }
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let certs = load_certs(path, "CA certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("CA certificate {}: {e}", path.display())))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    // Unparsable system certificates are skipped, as every TLS client does.
    let _ = roots.add_parsable_certificates(found.certs);
    Ok(roots)
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_setting_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{what} {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let pem = read_setting_file(path, "certificate revocation list")?;
    CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            Error::Tls(format!(
                "certificate revocation list {}: {e}",
                path.display()
            ))
        })
}

/// The client certificate and key, when both are there (one without the
/// other is a mistake worth an error, not a silent anonymous client).
fn load_client_auth(
    files: &Files,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
    match (files.client_cert.exists(), files.client_key.exists()) {
        (false, false) => Ok(None),
        (true, true) => {
            let chain = load_certs(&files.client_cert, "client certificate")?;
            let pem = read_setting_file(&files.client_key, "client key")?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                Error::Tls(format!("client key {}: {e}", files.client_key.display()))
            })?;
            Ok(Some((chain, key)))
        }
        (cert, _) => Err(Error::Tls(format!(
            "{}: {} without {}",
            files.dir.display(),
            if cert {
                "client-cert.pem"
            } else {
                "client-key.pem"
            },
            if cert {
                "client-key.pem"
            } else {
                "client-cert.pem"
            },
        ))),
    }
}

/// Verifies the server's certificate with webpki, as configured: off
/// entirely with `tls-verify-peer=false`, and without the name check where
/// there is no name. Handshake signatures are always verified.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    verify: bool,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if !self.verify {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(webpki) = &self.webpki else {
            // Refused when the connector was made; kept as a refusal here.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client behind the core's session seam.
struct RustlsSession {
    conn: ClientConnection,
    context: Arc<Context>,
    /// Whether any application data arrived (the server accepted us).
    heard_from_server: bool,
}

impl TlsSession for RustlsSession {
    fn read_tls(&mut self, mut ciphertext: &[u8]) -> nbd_proto::Result<usize> {
        let n = self
            .conn
            .read_tls(&mut ciphertext)
            .map_err(|e| nbd_proto::Error::Tls(format!("TLS record layer: {e}")))?;
        self.conn
            .process_new_packets()
            .map_err(|e| nbd_proto::Error::Tls(describe(&e, &self.context)))?;
        Ok(n)
    }

    fn read_plaintext(&mut self, out: &mut [u8]) -> nbd_proto::Result<usize> {
        match self.conn.reader().read(out) {
            Ok(n) => {
                self.heard_from_server |= n > 0;
                Ok(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(nbd_proto::Error::Tls(format!("TLS: {e}"))),
        }
    }

    fn write_plaintext(&mut self, plaintext: &[u8]) -> nbd_proto::Result<usize> {
        self.conn
            .writer()
            .write(plaintext)
            .map_err(|e| nbd_proto::Error::Tls(format!("TLS: {e}")))
    }

    fn write_tls(&mut self, out: &mut Vec<u8>) -> nbd_proto::Result<()> {
        while self.conn.wants_write() {
            self.conn
                .write_tls(out)
                .map_err(|e| nbd_proto::Error::Tls(format!("TLS: {e}")))?;
        }
        Ok(())
    }

    fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    fn explain_end_of_stream(&mut self) -> Option<nbd_proto::Error> {
        let name = self.context.shown_name();
        let when = if self.conn.is_handshaking() {
            "during the TLS handshake"
        } else if !self.heard_from_server {
            "right after the TLS handshake, before any data"
        } else {
            return None;
        };
        let hint = if self.context.client_cert {
            "it may not accept our client certificate"
        } else {
            "it may want a client certificate: client-cert.pem and client-key.pem in the \
             certificates directory"
        };
        Some(nbd_proto::Error::Tls(format!(
            "{name} closed the connection {when} ({hint})"
        )))
    }
}

/// One line that says which check failed, and for which name.
fn describe(error: &rustls::Error, context: &Context) -> String {
    let name = context.shown_name();
    match error {
        rustls::Error::InvalidCertificate(cert) => {
            let what = match cert {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the certificate has expired".to_string()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the certificate is not valid yet".to_string()
                }
                CertificateError::UnknownIssuer => {
                    format!("the certificate is not signed by {}", context.trust)
                }
                CertificateError::NotValidForName => {
                    "the certificate is not valid for that name".to_string()
                }
                CertificateError::NotValidForNameContext { presented, .. } => format!(
                    "the certificate is not valid for that name (it names {})",
                    presented.join(", ")
                ),
                CertificateError::Revoked => "the certificate is revoked by ca-crl.pem".to_string(),
                CertificateError::BadSignature => {
                    "the certificate's signature does not verify".to_string()
                }
                other => format!("{other:?}"),
            };
            format!("certificate check failed for {name}: {what}")
        }
        rustls::Error::AlertReceived(alert) => {
            let hint = match alert {
                AlertDescription::CertificateRequired
                | AlertDescription::HandshakeFailure
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied
                    if !context.client_cert =>
                {
                    " (it may want a client certificate: client-cert.pem and client-key.pem \
                     in the certificates directory)"
                }
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError => " (it did not accept the client certificate)",
                _ => "",
            };
            format!("{name} refused the TLS handshake with alert {alert:?}{hint}")
        }
        other => format!("TLS with {name} failed: {other}"),
    }
}
