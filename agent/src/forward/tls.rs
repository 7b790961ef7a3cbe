//! TLS for both upstreams: one rustls `ClientConfig`, built here from `[upstream.tls]`, serves
//! HTTPS (reqwest, `tls_backend_preconfigured`) and MQTT over TLS (rumqttc,
//! `TlsConfiguration::Rustls`).
//!
//! # Crypto provider
//!
//! The config is built with `ClientConfig::builder_with_provider(ring)`: it never depends on a
//! process-wide default provider, and the tree holds no aws-lc-rs, which needs CMake (and
//! bindgen) to cross-compile for 32-bit ARM (dependency notes §7.1).
//!
//! # Trust
//!
//! - `ca_file` set: the CA certificates in that PEM file, and only those, are trusted (a
//!   private CA; the system's roots are *not* added, so a public CA cannot vouch for a
//!   private upstream).
//! - Otherwise the system's roots, read through `rustls-native-certs` (on Linux the
//!   `ca-certificates` bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR`). No roots at all is an
//!   error at start that says to install `ca-certificates` or set `ca_file`.
//! - `server_name` replaces the name the server's certificate must carry (connecting to an IP
//!   address, through a tunnel or a load balancer). The certificate is still verified in full
//!   against the trusted roots; only the expected name differs. SNI still carries the host we
//!   connect to (none for an IP address).
//! - There is no switch to skip verification (see [`TlsConfig`]).
//!
//! # Client certificate (mutual TLS)
//!
//! `client_cert_file` (the certificate, optionally followed by intermediates) and
//! `client_key_file` (PKCS#8, PKCS#1 or SEC1 PEM) go together; rustls checks at start that
//! the key belongs to the certificate.
//!
//! All files are read once, when the sink is built (and by `edgewise check`), each bounded
//! by [`MAX_PEM_BYTES`]. Errors name the key and the file, so `config.rs` can report them at
//! `file:line:column`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::TlsConfig;

/// Largest PEM file read: a system CA bundle is about 200 KiB, a certificate chain or a key
/// a few KiB; anything bigger is the wrong file.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why a TLS client configuration cannot be built. [`TlsError::key`] names the
/// `[upstream.tls]` key at fault, for `file:line:column` reports.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_PEM_BYTES`].
    #[error("{path} is larger than {MAX_PEM_BYTES} bytes; is it the right file?")]
    TooLarge {
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file is not PEM, or its PEM is damaged.
    #[error("{path} is not valid PEM: {reason}")]
    Pem {
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's report.
        reason: String,
    },
    /// A file that should hold certificates holds none.
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificates {
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("a CA certificate in {path} cannot be used: {source}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// rustls' report.
        #[source]
        source: rustls::Error,
    },
    /// The key file holds no private key.
    #[error("{path} holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// Only one of `client_cert_file` and `client_key_file` is set.
    #[error("client_cert_file and client_key_file go together; {missing} is not set")]
    HalfClientAuth {
        /// The key that is missing.
        missing: &'static str,
    },
    /// The client certificate and key cannot be used together.
    #[error("the client certificate and key cannot be used: {source}")]
    ClientAuth {
        /// rustls' report (e.g. the key does not match the certificate).
        #[source]
        source: rustls::Error,
    },
    /// No `ca_file` and the system has no trusted roots.
    #[error("no trusted root certificates found on this system{detail}")]
    NoSystemRoots {
        /// What `rustls-native-certs` reported, if anything.
        detail: String,
    },
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("`{name}` is not a DNS name or an IP address")]
    ServerName {
        /// The configured name.
        name: String,
    },
    /// rustls refused the configuration (should not happen with the ring provider).
    #[error("cannot set up TLS: {source}")]
    Setup {
        /// rustls' report.
        #[source]
        source: rustls::Error,
    },
}

impl TlsError {
    /// The `[upstream.tls]` key at fault; `None` for the table as a whole.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            TlsError::Read { key, .. }
            | TlsError::TooLarge { key, .. }
            | TlsError::Pem { key, .. }
            | TlsError::NoCertificates { key, .. } => Some(key),
            TlsError::BadCa { .. } => Some("ca_file"),
            TlsError::NoKey { .. } | TlsError::ClientAuth { .. } => Some("client_key_file"),
            TlsError::HalfClientAuth { missing } => Some(missing),
            TlsError::ServerName { .. } => Some("server_name"),
            TlsError::NoSystemRoots { .. } | TlsError::Setup { .. } => None,
        }
    }

    /// How a technician fixes it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TlsError::NoSystemRoots { .. } => Some(
                "install the ca-certificates package, or give the upstream's CA in \
                 upstream.tls.ca_file",
            ),
            TlsError::HalfClientAuth { .. } => {
                Some("mutual TLS needs both files; leave both out for no client certificate")
            }
            TlsError::ClientAuth { .. } => {
                Some("check that client_key_file is the key of client_cert_file")
            }
            _ => None,
        }
    }
}

/// The ring provider, shared by every config built here.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client configuration of `[upstream.tls]`; see the module docs.
pub(crate) fn client_config(tls: &TlsConfig) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(match &tls.ca_file {
        Some(path) => ca_roots(path)?,
        None => system_roots()?,
    });
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Setup { source: rustls::Error::General(e.to_string()) })?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Setup { source })?;
    let builder = match &tls.server_name {
        Some(name) => {
            let expected = ServerName::try_from(name.clone())
                .map_err(|_| TlsError::ServerName { name: name.clone() })?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ExpectedName {
                inner: webpki,
                expected,
            }))
        }
        None => builder.with_webpki_verifier(webpki),
    };
    match (&tls.client_cert_file, &tls.client_key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(TlsError::HalfClientAuth { missing: "client_key_file" }),
        (None, Some(_)) => Err(TlsError::HalfClientAuth { missing: "client_cert_file" }),
        (Some(cert), Some(key)) => {
            let chain = certificates("client_cert_file", cert)?;
            let key = private_key(key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::ClientAuth { source })
        }
    }
}

/// A hint for a TLS failure seen while connecting, matched on the error's text (reqwest and
/// rumqttc wrap rustls' errors in their own types, but keep rustls' words); `None` when the
/// error says enough.
pub(crate) fn explain(error: &str) -> Option<&'static str> {
    // BadSignature: issued by a CA of the same name as one we trust, but not by it.
    if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        Some("the server's certificate is not signed by a CA we trust: check upstream.tls.ca_file")
    } else if error.contains("NotValidForName") || error.contains("not valid for name") {
        Some(
            "the server's certificate does not carry the name we connect to: check the host, \
             or set upstream.tls.server_name",
        )
    } else if error.contains("CertificateRequired") {
        Some(
            "the server requires a client certificate: set upstream.tls.client_cert_file and \
             client_key_file",
        )
    } else if ["BadCertificate", "UnknownCA", "CertificateUnknown", "AccessDenied"]
        .iter()
        .any(|alert| error.contains(alert))
    {
        Some("the server refused our client certificate: is it signed by a CA the server trusts?")
    } else if error.contains("expired") || error.contains("Expired") {
        Some("a certificate has expired, or the gateway's clock is wrong")
    } else {
        None
    }
}

/// The trust anchors of a `ca_file`.
fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("ca_file", path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa { path: path.to_path_buf(), source })?;
    }
    Ok(roots)
}

/// The system's trusted roots; certificates the system holds but rustls cannot parse are
/// skipped (a bundle often carries a few odd ones), an empty result is an error.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let detail = found.errors.iter().map(|e| format!(": {e}")).collect::<String>();
        return Err(TlsError::NoSystemRoots { detail });
    }
    Ok(roots)
}

/// Every certificate in a PEM file; at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { key, path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { key, path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = "client_key_file";
    let pem = read_pem(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.to_path_buf() },
        other => TlsError::Pem { key, path: path.to_path_buf(), reason: other.to_string() },
    })
}

/// Reads a PEM file, at most [`MAX_PEM_BYTES`].
fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read { key, path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge { key, path: path.to_path_buf() });
    }
    Ok(bytes)
}

/// Full webpki verification, against `expected` instead of the name we connected to
/// (`server_name`).
#[derive(Debug)]
struct ExpectedName {
    inner: Arc<WebPkiServerVerifier>,
    expected: ServerName<'static>,
}

impl ServerCertVerifier for ExpectedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.expected, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const NOT_PEM: &str = "this is not a certificate\n";

    #[test]
    fn the_default_uses_the_system_roots_or_says_how_to_get_some() {
        match client_config(&TlsConfig::default()) {
            Ok(config) => assert!(!config.client_auth_cert_resolver.has_certs()),
            Err(e) => {
                assert!(matches!(e, TlsError::NoSystemRoots { .. }), "{e}");
                assert!(e.hint().unwrap().contains("ca-certificates"));
            }
        }
    }

    #[test]
    fn a_missing_ca_file_names_the_key_and_the_path() {
        let tls = TlsConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let e = client_config(&tls).unwrap_err();
        assert_eq!(e.key(), Some("ca_file"));
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tls =
            TlsConfig { ca_file: Some(write(dir.path(), "ca.pem", NOT_PEM)), ..Default::default() };
        let e = client_config(&tls).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificates { key: "ca_file", .. }), "{e}");
    }

    #[test]
    fn an_oversized_file_is_not_read_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(MAX_PEM_BYTES as usize + 1);
        let tls =
            TlsConfig { ca_file: Some(write(dir.path(), "ca.pem", &big)), ..Default::default() };
        assert!(matches!(client_config(&tls).unwrap_err(), TlsError::TooLarge { .. }));
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_other_way_round() {
        let only_cert =
            TlsConfig { client_cert_file: Some("/x/cert.pem".into()), ..Default::default() };
        let only_key =
            TlsConfig { client_key_file: Some("/x/key.pem".into()), ..Default::default() };
        for (tls, missing) in [(only_cert, "client_key_file"), (only_key, "client_cert_file")] {
            // The system roots may be missing on a bare machine; give a CA-less error a pass
            // only if it is about the roots, which are checked first.
            match client_config(&tls) {
                Err(TlsError::NoSystemRoots { .. }) => {}
                Err(e) => assert_eq!(e.key(), Some(missing), "{e}"),
                Ok(_) => panic!("half a client identity was accepted"),
            }
        }
    }

    #[test]
    fn a_bad_server_name_is_refused() {
        let tls = TlsConfig { server_name: Some("not a name!".into()), ..Default::default() };
        match client_config(&tls) {
            Err(TlsError::NoSystemRoots { .. }) => {}
            Err(e) => assert_eq!(e.key(), Some("server_name"), "{e}"),
            Ok(_) => panic!("a bad server name was accepted"),
        }
    }

    #[test]
    fn connection_errors_get_a_hint_naming_the_setting() {
        let unknown = "TLS: I/O: invalid peer certificate: UnknownIssuer";
        assert!(explain(unknown).unwrap().contains("ca_file"));
        let impostor = "TLS: I/O: invalid peer certificate: BadSignature";
        assert!(explain(impostor).unwrap().contains("ca_file"));
        let required = "I/O: received fatal alert: CertificateRequired";
        assert!(explain(required).unwrap().contains("client_cert_file"));
        let name = "invalid peer certificate: NotValidForName";
        assert!(explain(name).unwrap().contains("server_name"));
        assert_eq!(explain("connection refused"), None);
    }

    /// A CA, a server certificate for `names`, and a client certificate, as PEM files.
    struct Pki {
        dir: tempfile::TempDir,
        server_chain: Vec<CertificateDer<'static>>,
        server_key: PrivateKeyDer<'static>,
        ca: CertificateDer<'static>,
    }

    impl Pki {
        fn new(server_names: &[&str]) -> Pki {
            use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
            let dir = tempfile::tempdir().unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            // Unique names: two `Pki`s are unrelated CAs, as a wrong CA would be.
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ca_params.distinguished_name.push(DnType::CommonName, format!("edgewise test CA {n}"));
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca_params, ca_key);
            let leaf = |names: Vec<String>| {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
                (cert, key)
            };
            let (server, server_key) = leaf(server_names.iter().map(|n| n.to_string()).collect());
            let (client, client_key) = leaf(vec!["gw-1".into()]);
            let (_, other_key) = leaf(vec!["other".into()]);
            write(dir.path(), "ca.pem", &ca.pem());
            write(dir.path(), "client.pem", &client.pem());
            write(dir.path(), "client.key", &client_key.serialize_pem());
            write(dir.path(), "other.key", &other_key.serialize_pem());
            Pki {
                server_chain: vec![server.der().clone()],
                server_key: PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
                ca: ca.der().clone(),
                dir,
            }
        }

        fn path(&self, name: &str) -> Option<PathBuf> {
            Some(self.dir.path().join(name))
        }

        fn client(&self) -> TlsConfig {
            TlsConfig {
                ca_file: self.path("ca.pem"),
                client_cert_file: self.path("client.pem"),
                client_key_file: self.path("client.key"),
                server_name: None,
            }
        }

        /// A server that requires a client certificate from our CA.
        fn server(&self) -> rustls::ServerConfig {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .unwrap();
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())
                .unwrap()
        }
    }

    /// Runs a TLS handshake in memory, connecting to `name`; the first error of either side.
    fn handshake(
        client: ClientConfig,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<(), String> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut wire.as_slice()).unwrap();
            let server_error = s.process_new_packets().err();
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut wire.as_slice()).unwrap();
            if let Err(e) = c.process_new_packets() {
                return Err(format!("client: {e}"));
            }
            if let Some(e) = server_error {
                return Err(format!("server: {e}"));
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("the handshake did not finish".into())
    }

    #[test]
    fn mutual_tls_with_our_ca_and_client_certificate_succeeds() {
        let pki = Pki::new(&["localhost", "127.0.0.1"]);
        let client = client_config(&pki.client()).unwrap();
        handshake(client.clone(), pki.server(), "127.0.0.1").unwrap();
        handshake(client, pki.server(), "localhost").unwrap();
    }

    #[test]
    fn a_server_from_another_ca_is_an_unknown_issuer() {
        let pki = Pki::new(&["localhost"]);
        let other = Pki::new(&["localhost"]);
        let mut tls = pki.client();
        tls.ca_file = other.path("ca.pem");
        let error = handshake(client_config(&tls).unwrap(), pki.server(), "localhost").unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");
        assert!(explain(&error).unwrap().contains("ca_file"));
    }

    #[test]
    fn without_a_client_certificate_the_server_refuses() {
        let pki = Pki::new(&["localhost"]);
        let mut tls = pki.client();
        tls.client_cert_file = None;
        tls.client_key_file = None;
        let error = handshake(client_config(&tls).unwrap(), pki.server(), "localhost").unwrap_err();
        assert!(error.contains("CertificateRequired"), "{error}");
        assert!(explain(&error).unwrap().contains("client_cert_file"));
    }

    #[test]
    fn server_name_replaces_the_name_the_certificate_must_carry() {
        let pki = Pki::new(&["broker.example"]);
        let plain = client_config(&pki.client()).unwrap();
        let error = handshake(plain, pki.server(), "127.0.0.1").unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
        assert!(explain(&error).unwrap().contains("server_name"));
        let mut tls = pki.client();
        tls.server_name = Some("broker.example".into());
        handshake(client_config(&tls).unwrap(), pki.server(), "127.0.0.1").unwrap();
        // The override still verifies the chain: another CA's certificate stays refused.
        let other = Pki::new(&["broker.example"]);
        let error =
            handshake(client_config(&tls).unwrap(), other.server(), "127.0.0.1").unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused_at_start() {
        let pki = Pki::new(&["localhost"]);
        let mut tls = pki.client();
        tls.client_key_file = pki.path("other.key");
        let error = client_config(&tls).unwrap_err();
        assert!(matches!(error, TlsError::ClientAuth { .. }), "{error}");
        assert_eq!(error.key(), Some("client_key_file"));
    }

    #[test]
    fn a_certificate_file_given_as_the_key_has_no_key() {
        let pki = Pki::new(&["localhost"]);
        let mut tls = pki.client();
        tls.client_key_file = pki.path("client.pem");
        assert!(matches!(client_config(&tls).unwrap_err(), TlsError::NoKey { .. }));
    }
}
