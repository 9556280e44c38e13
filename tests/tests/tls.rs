//! TLS against real servers: nbdkit and qemu-nbd with X.509 certificates and
//! with pre-shared keys, through the blocking, mio and tokio adapters and the
//! `nbd` command, compared with libnbd's nbdinfo where it can do the same;
//! opt mode's `opt_starttls`, a reconnect through TLS, a plaintext server
//! behind an `nbds` URI; and every refusal (wrong CA, expired or revoked
//! certificate, wrong name, missing client certificate, wrong key, unknown
//! user) as a clear one-line error.
//!
//! Certificates are made by the tests themselves with rcgen, in temporary
//! directories laid out as nbdkit, qemu and libnbd expect them. Each test
//! starts servers of its own (Debian's nbdkit 1.32 aborts when a client goes
//! away with reads in flight, so no server is shared).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nbd_blocking::{Client, Error};
use nbd_proto::{CmdFlags, Config};
use nbd_tests::libnbd_1_14::as_nbdinfo_1_14;
use nbd_tests::testkit::{pattern_bytes, run_nbd};
use nbd_tests::{require_tool, NbdkitBuilder, QemuNbdBuilder, ServerHandle};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedKey, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use serde_json::Value;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- certificates

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate for `names` (DNS names, or IP addresses), with
    /// serial number `serial`.
    fn issue(
        &self,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
        expired: bool,
        serial: u64,
    ) -> CertifiedKey {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            });
        }
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![purpose];
        // GnuTLS (qemu) wants key encipherment allowed too.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        CertifiedKey {
            cert,
            key_pair: key,
        }
    }

    fn server(&self, expired: bool) -> CertifiedKey {
        self.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            expired,
            SERVER_SERIAL,
        )
    }

    fn client(&self) -> CertifiedKey {
        self.issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth, false, 7)
    }
}

/// The serial number of every server certificate.
const SERVER_SERIAL: u64 = 0x5e7e;

/// Writes a directory in the layout of nbdkit and qemu (server side) or
/// libnbd (client side).
fn write_dir(dir: &Path, ca: &Ca, leaf: Option<(&str, &CertifiedKey)>) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("ca-cert.pem"), ca.cert.pem()).unwrap();
    if let Some((role, leaf)) = leaf {
        fs::write(dir.join(format!("{role}-cert.pem")), leaf.cert.pem()).unwrap();
        fs::write(
            dir.join(format!("{role}-key.pem")),
            leaf.key_pair.serialize_pem(),
        )
        .unwrap();
    }
}

/// Certificates for one test: a server directory and a client directory.
struct Pki {
    tmp: TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let tmp = tempfile::Builder::new()
            .prefix("nbd-tls-")
            .tempdir()
            .unwrap();
        let pki = Pki {
            tmp,
            ca: Ca::new("nbd test CA"),
        };
        write_dir(
            &pki.server_dir(),
            &pki.ca,
            Some(("server", &pki.ca.server(false))),
        );
        pki
    }

    fn server_dir(&self) -> PathBuf {
        self.tmp.path().join("server")
    }

    /// A client directory: the CA, and a client certificate if asked.
    fn client_dir(&self, name: &str, with_cert: bool) -> PathBuf {
        let dir = self.tmp.path().join(name);
        let cert = with_cert.then(|| self.ca.client());
        write_dir(&dir, &self.ca, cert.as_ref().map(|c| ("client", c)));
        dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// A psktool key file with one line per user.
fn write_psk(path: &Path, users: &[(&str, &str)]) {
    let text: String = users
        .iter()
        .map(|(user, key)| format!("{user}:{key}\n"))
        .collect();
    fs::write(path, text).unwrap();
}

const ALICE_KEY: &str = "7c3f1a6b2e9d40e58a1f3c7b9d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60";
const OTHER_KEY: &str = "0011223344556677889900112233445566778899001122334455667788990011";

// ---------------------------------------------------------------- servers and URIs

fn nbdkit_x509(pki: &Pki, plugin: NbdkitBuilder, verify_client: bool) -> ServerHandle {
    let mut b = plugin
        .flag("--tls=require")
        .flag(format!("--tls-certificates={}", pki.server_dir().display()));
    if verify_client {
        b = b.flag("--tls-verify-peer");
    }
    b.start()
}

/// The server's URI as `nbds`, with `params` added.
fn tls_uri(server: &ServerHandle, params: &str) -> String {
    let plain = server.uri();
    let uri = plain.replacen("nbd", "nbds", 1);
    let sep = if uri.contains('?') { '&' } else { '?' };
    if params.is_empty() {
        uri
    } else {
        format!("{uri}{sep}{params}")
    }
}

fn certs_param(dir: &Path) -> String {
    format!("tls-certificates={}", dir.display())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `nbd ARGS` succeeded; its stdout.
fn nbd_ok(args: &[&str]) -> Vec<u8> {
    let out = run_nbd(args);
    assert!(
        out.status.success(),
        "nbd {args:?} failed: {}",
        text(&out.stderr)
    );
    out.stdout
}

/// `nbd ARGS` failed with exit code 1 and one line on stderr; that line.
fn nbd_fails(args: &[&str]) -> String {
    let out = run_nbd(args);
    one_line_error(&out, &format!("nbd {args:?}"))
}

fn one_line_error(out: &Output, what: &str) -> String {
    eprintln!("{what}: {}", text(&out.stderr).trim_end());
    assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line:\n{err}"
    );
    assert!(out.stdout.is_empty(), "{what}");
    err.trim_end().to_string()
}

fn nbdinfo_json(uri: &str) -> Value {
    let out = Command::new(require_tool("nbdinfo"))
        .args(["--json", uri])
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdinfo {uri}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `nbd info --json` equals nbdinfo's, apart from the fields `nbd info`
/// leaves out ("content", and "contexts" where it prints none).
fn assert_info_matches_nbdinfo(uri: &str) {
    // Less what the installed nbdinfo (libnbd 1.14) is too old to print.
    let ours = as_nbdinfo_1_14(&text(&nbd_ok(&["info", "--json", uri])));
    let ours: Value = serde_json::from_str(&ours).unwrap();
    let mut theirs = nbdinfo_json(uri);
    for (i, export) in theirs["exports"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        for key in ["content", "contexts"] {
            if ours["exports"][i].get(key).is_none() {
                export.as_object_mut().unwrap().remove(key);
            }
        }
    }
    assert_eq!(ours, theirs, "{uri}\nours: {ours:#}\nnbdinfo: {theirs:#}");
    assert_eq!(ours["TLS"], Value::Bool(true), "{uri}");
}

/// Reads the whole export over the blocking adapter.
fn read_all(uri: &str, size: usize) -> Vec<u8> {
    let mut client = Client::connect_uri(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
    assert!(client.connection().tls_negotiated());
    let mut data = vec![0; size];
    client.read_exact_at(&mut data, 0).unwrap();
    client.shutdown().unwrap();
    data
}

/// The error of connecting to `uri` with the blocking adapter, as one line.
fn connect_error(uri: &str) -> String {
    let err = match Client::connect_uri(uri) {
        Ok(_) => panic!("{uri}: connected"),
        Err(e) => e.to_string(),
    };
    assert_eq!(err.lines().count(), 1, "{err}");
    eprintln!("refused as expected: {err}");
    err
}

// ---------------------------------------------------------------- X.509

#[test]
fn nbdkit_x509_over_unix_and_tcp_with_both_adapters_and_nbdinfo() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", false);
    let unix = nbdkit_x509(&pki, NbdkitBuilder::pattern(MIB), false);
    let tcp = nbdkit_x509(&pki, NbdkitBuilder::pattern(MIB).tcp(), false);
    let expected = pattern_bytes(MIB);
    for server in [&unix, &tcp] {
        let uri = tls_uri(server, &certs_param(&client_dir));
        assert_eq!(read_all(&uri, MIB as usize), expected, "{uri}");
        assert_eq!(
            mio_read(&uri, 4096 * 3, 64 * 1024),
            expected[4096 * 3..][..64 * 1024]
        );
        assert_info_matches_nbdinfo(&uri);
        // nbd info --is tls says yes, as nbdinfo does, and the text form
        // starts with nbdinfo's protocol line.
        assert!(run_nbd(["info", "--is", "tls", uri.as_str()])
            .status
            .success());
        let ours = text(&nbd_ok(&["info", &uri]));
        let theirs = Command::new(require_tool("nbdinfo"))
            .arg(&uri)
            .output()
            .unwrap();
        let first = |s: &str| s.lines().next().unwrap_or_default().to_string();
        assert_eq!(
            first(&as_nbdinfo_1_14(&ours)),
            first(&text(&theirs.stdout)),
            "{uri}"
        );
        assert!(
            ours.starts_with("protocol: newstyle-fixed with TLS"),
            "{ours}"
        );
    }
    // The name checked on TCP is the host of the URI (127.0.0.1, in the
    // certificate); tls-hostname can name another that is in it too.
    let uri = tls_uri(
        &tcp,
        &format!("{}&tls-hostname=localhost", certs_param(&client_dir)),
    );
    assert_eq!(read_all(&uri, 4096), expected[..4096]);
}

#[test]
fn nbdkit_verifying_client_certificates() {
    let pki = Pki::new();
    let with_cert = pki.client_dir("with-cert", true);
    let server = nbdkit_x509(&pki, NbdkitBuilder::pattern(MIB), true);
    let uri = tls_uri(&server, &certs_param(&with_cert));
    assert_eq!(read_all(&uri, MIB as usize), pattern_bytes(MIB));
    assert_info_matches_nbdinfo(&uri);

    // Without a client certificate the server refuses, and the error says
    // what is likely missing.
    let without = pki.client_dir("without-cert", false);
    let server = nbdkit_x509(&pki, NbdkitBuilder::pattern(MIB), true);
    let uri = tls_uri(&server, &certs_param(&without));
    let err = connect_error(&uri);
    assert!(err.contains("TLS"), "{err}");
    assert!(err.contains("client certificate"), "{err}");
}

#[test]
fn copy_both_ways_through_tls_is_byte_identical() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", true);
    let source = nbdkit_x509(&pki, NbdkitBuilder::pattern(2 * MIB), true);
    let target = nbdkit_x509(&pki, NbdkitBuilder::memory(2 * MIB), true);
    let src = tls_uri(&source, &certs_param(&client_dir));
    let dst = tls_uri(&target, &certs_param(&client_dir));
    let down = pki.path("down.img");
    nbd_ok(&["copy", &src, down.to_str().unwrap()]);
    assert_eq!(fs::read(&down).unwrap(), pattern_bytes(2 * MIB));
    nbd_ok(&["copy", down.to_str().unwrap(), &dst]);
    let back = pki.path("back.img");
    nbd_ok(&["copy", &dst, back.to_str().unwrap()]);
    assert_eq!(fs::read(&back).unwrap(), pattern_bytes(2 * MIB));
    // And nbd dump reads through TLS too.
    let dump = text(&nbd_ok(&["dump", "--length", "32", &src]));
    assert!(dump.starts_with("0000000000: 00 00"), "{dump}");
}

#[test]
fn qemu_nbd_with_x509_credentials() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", true);
    let data = pattern_bytes(MIB);
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
        pki.server_dir().display()
    );
    let server = QemuNbdBuilder::from_bytes(nbd_tests::ImageFormat::Raw, &data)
        .arg("--object")
        .arg(&creds)
        .arg("--tls-creds=tls0")
        .shared(4)
        .start();
    let uri = tls_uri(&server, &certs_param(&client_dir));
    assert_eq!(read_all(&uri, MIB as usize), data);
    assert_info_matches_nbdinfo(&uri);
    // Write through TLS, read back byte-identical.
    let mut client = Client::connect_uri(&uri).unwrap();
    client.write_all_at(b"through TLS", 4096).unwrap();
    client.flush(CmdFlags::empty()).unwrap();
    let mut back = [0; 11];
    client.read_exact_at(&mut back, 4096).unwrap();
    assert_eq!(&back, b"through TLS");
    client.shutdown().unwrap();
}

#[test]
fn certificate_refusals_name_the_check_and_the_name() {
    let pki = Pki::new();
    // A client trusting another CA.
    let stranger = Ca::new("some other CA");
    let wrong_ca = pki.path("wrong-ca");
    write_dir(&wrong_ca, &stranger, None);
    let server = nbdkit_x509(&pki, NbdkitBuilder::memory(MIB).tcp(), false);
    let err = connect_error(&tls_uri(&server, &certs_param(&wrong_ca)));
    assert!(
        err.contains("certificate check failed for 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("not signed by"), "{err}");

    // A host name the certificate does not carry.
    let client_dir = pki.client_dir("client", false);
    let uri = tls_uri(
        &server,
        &format!("{}&tls-hostname=wrong.example", certs_param(&client_dir)),
    );
    let err = connect_error(&uri);
    assert!(
        err.contains("certificate check failed for wrong.example"),
        "{err}"
    );
    assert!(err.contains("not valid for that name"), "{err}");

    // An expired server certificate.
    let old = Pki::new();
    write_dir(
        &old.server_dir(),
        &old.ca,
        Some(("server", &old.ca.server(true))),
    );
    let server = nbdkit_x509(&old, NbdkitBuilder::memory(MIB).tcp(), false);
    let uri = tls_uri(&server, &certs_param(&old.client_dir("client", false)));
    let err = connect_error(&uri);
    assert!(
        err.contains("certificate check failed for 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("expired"), "{err}");
    // The same through the command: one line on stderr.
    let line = nbd_fails(&["info", &uri]);
    assert!(line.contains("expired"), "{line}");

    // Verification off: the same server is used, with a warning.
    let out = run_nbd(["info", "--size", &format!("{uri}&tls-verify-peer=false")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), MIB.to_string());
    assert!(
        text(&out.stderr).contains("verification is off"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_certificate_revoked_by_ca_crl_pem_is_refused() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", false);
    let server = nbdkit_x509(&pki, NbdkitBuilder::memory(MIB).tcp(), false);
    let uri = tls_uri(&server, &certs_param(&client_dir));
    // Without a CRL the certificate is good.
    let client = Client::connect_uri(&uri).unwrap();
    client.shutdown().unwrap();
    let revoke = |serial: u64| {
        CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2090, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: rcgen::date_time_ymd(2020, 1, 1),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&pki.ca.cert, &pki.ca.key)
        .unwrap()
        .pem()
        .unwrap()
    };
    // A CRL naming another certificate changes nothing.
    fs::write(client_dir.join("ca-crl.pem"), revoke(SERVER_SERIAL + 1)).unwrap();
    let client = Client::connect_uri(&uri).unwrap();
    client.shutdown().unwrap();
    // One naming the server's is a refusal that says so.
    fs::write(client_dir.join("ca-crl.pem"), revoke(SERVER_SERIAL)).unwrap();
    let err = connect_error(&uri);
    assert!(
        err.contains("certificate check failed for 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("revoked"), "{err}");
}

// ---------------------------------------------------------------- PSK

#[test]
fn nbdkit_and_qemu_with_pre_shared_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys.psk");
    write_psk(&keys, &[("bob", OTHER_KEY), ("alice", ALICE_KEY)]);
    let nbdkit = NbdkitBuilder::pattern(MIB)
        .flag("--tls=require")
        .flag(format!("--tls-psk={}", keys.display()))
        .start();
    let qemu_dir = tmp.path().join("qemu");
    fs::create_dir(&qemu_dir).unwrap();
    fs::copy(&keys, qemu_dir.join("keys.psk")).unwrap();
    let data = pattern_bytes(MIB);
    let qemu = QemuNbdBuilder::from_bytes(nbd_tests::ImageFormat::Raw, &data)
        .arg("--object")
        .arg(format!(
            "tls-creds-psk,id=tls0,dir={},endpoint=server",
            qemu_dir.display()
        ))
        .arg("--tls-creds=tls0")
        .shared(4)
        .start();
    for server in [&nbdkit, &qemu] {
        // The user name in the URI's userinfo, which libnbd 1.14 reads.
        let uri = tls_uri(server, &format!("tls-psk-file={}", keys.display()))
            .replacen(":///", "://alice@/", 1)
            .replacen("://127", "://alice@127", 1);
        assert_eq!(read_all_psk(&uri, MIB as usize), data, "{uri}");
        assert_info_matches_nbdinfo(&uri);
        let copy = tmp.path().join("copy.img");
        nbd_ok(&["copy", &uri, copy.to_str().unwrap()]);
        assert_eq!(fs::read(&copy).unwrap(), data);
    }
}

/// Reads the export with a policy that allows the PSK file.
fn read_all_psk(uri: &str, size: usize) -> Vec<u8> {
    let policy = nbd_io::UriPolicy {
        local_files: true,
        ..nbd_io::UriPolicy::default()
    };
    let mut client = Client::connect_uri_with_policy(uri, Config::default(), &policy)
        .unwrap_or_else(|e| panic!("{uri}: {e}"));
    assert!(client.connection().tls_negotiated());
    let mut data = vec![0; size];
    client.read_exact_at(&mut data, 0).unwrap();
    client.shutdown().unwrap();
    data
}

#[test]
fn psk_refusals_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let server_keys = tmp.path().join("server.psk");
    write_psk(&server_keys, &[("alice", ALICE_KEY)]);
    let wrong = tmp.path().join("wrong.psk");
    write_psk(&wrong, &[("alice", OTHER_KEY), ("mallory", ALICE_KEY)]);
    for (user, says) in [("alice", "alice"), ("mallory", "mallory")] {
        // A server each: a refused client must not take another test's down.
        let server = NbdkitBuilder::memory(MIB)
            .flag("--tls=require")
            .flag(format!("--tls-psk={}", server_keys.display()))
            .start();
        let uri = tls_uri(
            &server,
            &format!("tls-psk-file={}&tls-username={user}", wrong.display()),
        );
        let line = nbd_fails(&["info", &uri]);
        assert!(line.contains("TLS"), "{line}");
        assert!(line.contains(says), "{user}: {line}");
    }
    // A user missing from the client's own file is an error before connecting.
    let line = nbd_fails(&[
        "info",
        &format!(
            "nbds+unix:///?socket=/nonexistent&tls-psk-file={}&tls-username=carol",
            wrong.display()
        ),
    ]);
    assert!(line.contains("no key for user \"carol\""), "{line}");
}

// ---------------------------------------------------------------- the mio adapter

/// Reads `len` bytes at `offset` through the mio adapter.
fn mio_read(uri: &str, offset: u64, len: usize) -> Vec<u8> {
    use mio::{Events, Poll, Token};
    use std::time::{Duration, Instant};
    let mut poll = Poll::new().unwrap();
    let mut client =
        nbd_mio::Client::connect_uri(uri, Config::default(), poll.registry(), Token(0)).unwrap();
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut cookie = None;
    loop {
        assert!(Instant::now() < deadline, "mio client stuck");
        if cookie.is_none() && client.connection().is_ready() {
            assert!(client.connection().tls_negotiated());
            let buf = bytes::BytesMut::zeroed(len);
            cookie = Some(client.aio_pread(buf, offset, CmdFlags::empty()).unwrap());
            client.drive().unwrap();
        }
        if let Some(c) = cookie {
            if let Some(done) = client.next_completion() {
                assert_eq!(done.cookie, c);
                let data = done.buffer.expect("the buffer comes back").to_vec();
                done.result.unwrap();
                return data;
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for event in events.iter() {
            client.handle_event(event).unwrap();
        }
    }
}

#[test]
fn a_tls_failure_is_an_nbd_error_of_kind_tls() {
    let pki = Pki::new();
    let stranger = Ca::new("another CA");
    let wrong = pki.path("wrong");
    write_dir(&wrong, &stranger, None);
    let server = nbdkit_x509(&pki, NbdkitBuilder::memory(MIB), false);
    let uri = tls_uri(
        &server,
        &format!("{}&tls-hostname=localhost", certs_param(&wrong)),
    );
    match Client::connect_uri(&uri) {
        Err(Error::Nbd(nbd_proto::Error::Tls(m))) => {
            assert!(m.contains("certificate check failed for localhost"), "{m}")
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("connected with an untrusted certificate"),
    }
}

// ---------------------------------------------------------------- downgrades

/// An `nbds` URI to a server that cannot or will not speak TLS ends before
/// anything but the client flags and `NBD_OPT_STARTTLS` went out (the exact
/// bytes are asserted against the fake servers of nbd-proto's tests).
#[test]
fn nbds_to_a_plaintext_server_is_refused_not_downgraded() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", false);
    let cases = [
        (NbdkitBuilder::memory(MIB).flag("--tls=off"), "refused it"),
        (NbdkitBuilder::memory(MIB).oldstyle(), "oldstyle"),
    ];
    for (builder, says) in cases {
        let server = builder.start();
        let uri = tls_uri(&server, &certs_param(&client_dir));
        let err = connect_error(&uri);
        assert!(err.contains("TLS is required"), "{err}");
        assert!(err.contains(says), "{err}");
        let line = nbd_fails(&["info", &uri]);
        assert!(line.contains("TLS is required"), "{line}");
    }
}

// ---------------------------------------------------------------- a workload

/// Many reads and writes in flight at once through TLS, against nbdkit with
/// several threads (so replies come out of order), checked against a model
/// of the export: every read returns what the writes before it left.
#[test]
fn a_mixed_workload_in_flight_through_tls_matches_its_model() {
    use bytes::{Bytes, BytesMut};
    use std::collections::HashMap;
    use std::time::Duration;

    let pki = Pki::new();
    let client_dir = pki.client_dir("client", true);
    let size = 4 * MIB;
    let server = nbdkit_x509(&pki, NbdkitBuilder::memory(size).threads(8), true);
    let uri = tls_uri(&server, &certs_param(&client_dir));
    let mut client = Client::connect_uri(&uri).unwrap();
    let seed = nbd_testkit::Rng::seed_from_env(0x715);
    let mut rng = nbd_testkit::Rng::new(seed);
    let mut model = vec![0u8; size as usize];
    for round in 0..8 {
        // A batch of writes to disjoint blocks, then a batch of reads
        // anywhere, each batch in flight at once.
        let mut writes = HashMap::new();
        let mut used = std::collections::HashSet::new();
        for _ in 0..48 {
            let block = rng.below(size / 65536);
            if !used.insert(block) {
                continue;
            }
            let len = rng.range_usize(1..65536);
            let offset = block * 65536 + rng.below((65536 - len) as u64 + 1);
            let mut data = vec![0; len];
            rng.fill_bytes(&mut data);
            model[offset as usize..][..len].copy_from_slice(&data);
            let cookie = client
                .aio_pwrite(Bytes::from(data), offset, CmdFlags::empty())
                .unwrap();
            writes.insert(cookie, offset);
        }
        // The writes complete (in any order) before the reads start, so
        // the model is what the export holds.
        while !writes.is_empty() {
            client.poll(Some(Duration::from_secs(30))).unwrap();
            while let Some(done) = client.next_completion() {
                assert!(writes.remove(&done.cookie).is_some(), "unknown cookie");
                done.result.unwrap();
            }
        }
        let mut reads = HashMap::new();
        for _ in 0..48 {
            let len = rng.range_usize(1..256 * 1024);
            let start = rng.below(size - len as u64 + 1);
            let cookie = client
                .aio_pread(BytesMut::zeroed(len), start, CmdFlags::empty())
                .unwrap();
            reads.insert(cookie, (start, len));
        }
        while !reads.is_empty() {
            client.poll(Some(Duration::from_secs(30))).unwrap();
            while let Some(done) = client.next_completion() {
                let (start, len) = reads.remove(&done.cookie).expect("a read's cookie");
                done.result.unwrap();
                let got = done.buffer.expect("read buffer");
                let want = &model[start as usize..][..len];
                assert!(
                    &got[..] == want,
                    "seed {seed:#x} round {round}: read at {start}"
                );
            }
        }
    }
    client.shutdown().unwrap();
}

// ---------------------------------------------------------------- opt mode

/// Opt mode against a server where TLS is optional: the export list in
/// plaintext, then `opt_starttls`, then the export through TLS; the
/// plaintext negotiation is forgotten at the switch.
#[test]
fn opt_starttls_with_the_blocking_adapter() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", false);
    let server = NbdkitBuilder::pattern(MIB)
        .flag("--tls=on")
        .flag(format!("--tls-certificates={}", pki.server_dir().display()))
        .start();
    let endpoint = nbd_io::UriPolicy::default()
        .resolve(&tls_uri(&server, &certs_param(&client_dir)))
        .unwrap();
    let request = endpoint.tls.clone().expect("an nbds endpoint");
    let mut conn = nbd_proto::Connection::new(Config::default().opt_mode(true));
    conn.set_tls_connector(nbd_io::tls::connector(&request, &endpoint.target).unwrap());
    let socket = nbd_io::connect(&endpoint.target).unwrap();
    let mut client = Client::connect_socket_with(socket, conn).unwrap();
    assert!(client.connection().is_negotiating());
    assert!(!client.connection().tls_negotiated());
    assert!(client.connection().structured_replies_negotiated());
    assert_eq!(client.opt_list().unwrap().len(), 1);
    client.opt_starttls().unwrap();
    assert!(client.connection().tls_negotiated());
    assert!(!client.connection().structured_replies_negotiated());
    // Once on, asking again is refused without a word to the server.
    let again = client.opt_starttls().unwrap_err();
    assert_eq!(again.errno(), Some(nbd_proto::Errno::Inval), "{again}");
    assert!(client.connection().is_negotiating());
    client.opt_structured_reply().unwrap();
    client.opt_go().unwrap();
    let mut head = vec![0; 4096];
    client.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, pattern_bytes(4096));
    client.shutdown().unwrap();
}

// ---------------------------------------------------------------- reconnect

/// nbdkit serving a file over TLS on a fixed socket, killed and started
/// again by the test.
struct RestartableTls {
    socket: PathBuf,
    file: PathBuf,
    certificates: PathBuf,
    child: Option<std::process::Child>,
}

impl RestartableTls {
    fn restart(&mut self) {
        let _ = fs::remove_file(&self.socket);
        let child = Command::new(require_tool("nbdkit"))
            .arg("--foreground")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(&self.socket)
            .arg("--tls=require")
            .arg(format!(
                "--tls-certificates={}",
                self.certificates.display()
            ))
            .arg("file")
            .arg(format!("file={}", self.file.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nbdkit starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdkit did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RestartableTls {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client of an `nbds` URI that reconnects sets up the same TLS again:
/// after the server is restarted, its next command goes through a new TLS
/// session to the same data.
#[test]
fn reconnect_sets_up_tls_again() {
    use std::time::Duration;
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", false);
    let file = pki.path("disk.img");
    fs::write(&file, pattern_bytes(MIB)).unwrap();
    let mut server = RestartableTls {
        socket: pki.path("nbd.sock"),
        file,
        certificates: pki.server_dir(),
        child: None,
    };
    server.restart();
    let uri = format!(
        "nbds+unix:///?socket={}&{}",
        server.socket.display(),
        certs_param(&client_dir)
    );
    let mut client = Client::connect_uri(&uri).unwrap();
    let mut policy = nbd_blocking::ReconnectPolicy::new(50);
    policy.first_delay = Duration::from_millis(20);
    policy.max_delay = Duration::from_millis(200);
    client.set_reconnect(Some(policy)).unwrap();
    client.write_all_at(b"before", 0).unwrap();
    server.kill();
    server.restart();
    let mut back = [0u8; 6];
    client.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"before");
    assert!(client.connection().tls_negotiated());
    let reconnects = client.take_reconnects();
    assert_eq!(reconnects.len(), 1, "{reconnects:?}");
    client.shutdown().unwrap();
}

/// The same with the tokio adapter: its driver task sets TLS up again.
#[test]
fn tokio_reconnect_sets_up_tls_again() {
    use std::time::Duration;
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", false);
    let file = pki.path("disk.img");
    fs::write(&file, pattern_bytes(MIB)).unwrap();
    let mut server = RestartableTls {
        socket: pki.path("nbd.sock"),
        file,
        certificates: pki.server_dir(),
        child: None,
    };
    server.restart();
    let uri = format!(
        "nbds+unix:///?socket={}&{}",
        server.socket.display(),
        certs_param(&client_dir)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        let client = nbd_tokio::Client::connect_uri(&uri).await.unwrap();
        let mut policy = nbd_tokio::ReconnectPolicy::new(50);
        policy.first_delay = Duration::from_millis(20);
        policy.max_delay = Duration::from_millis(200);
        client.set_reconnect(Some(policy)).unwrap();
        client
            .pwrite(bytes::Bytes::from_static(b"before"), 0, CmdFlags::empty())
            .await
            .unwrap();
        client
    });
    server.kill();
    server.restart();
    runtime.block_on(async move {
        tokio::time::timeout(Duration::from_secs(60), async {
            let back = client
                .pread(bytes::BytesMut::zeroed(6), 0, CmdFlags::empty())
                .await
                .unwrap();
            assert_eq!(&back[..], b"before");
            assert!(client.connection().tls_negotiated());
            let reconnects = client.take_reconnects();
            assert_eq!(reconnects.len(), 1, "{reconnects:?}");
            client.shutdown().await.unwrap();
        })
        .await
        .expect("no hang");
    });
}

// ---------------------------------------------------------------- the tokio adapter

/// The tokio adapter reads and writes through TLS, many commands at once
/// from tasks of their own.
#[test]
fn the_tokio_adapter_through_tls() {
    let pki = Pki::new();
    let client_dir = pki.client_dir("client", true);
    let server = nbdkit_x509(&pki, NbdkitBuilder::memory(MIB).threads(4), true);
    let uri = tls_uri(&server, &certs_param(&client_dir));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let limit = std::time::Duration::from_secs(60);
        tokio::time::timeout(limit, async {
            let client = nbd_tokio::Client::connect_uri(&uri).await.unwrap();
            assert!(client.connection().tls_negotiated());
            let mut tasks = Vec::new();
            for i in 0..16u64 {
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let data = bytes::Bytes::from(vec![i as u8 + 1; 4096]);
                    client
                        .pwrite(data, i * 4096, CmdFlags::empty())
                        .await
                        .unwrap();
                    let back = client
                        .pread(bytes::BytesMut::zeroed(4096), i * 4096, CmdFlags::empty())
                        .await
                        .unwrap();
                    assert!(back.iter().all(|&b| b == i as u8 + 1), "block {i}");
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            client.shutdown().await.unwrap();
        })
        .await
        .expect("within the limit");
    });
}
