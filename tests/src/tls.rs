//! TLS fixtures: a throwaway PKI made at test time, and an HTTPS upstream that requires a
//! client certificate and a bearer token.
//!
//! - [`Pki`]: a CA, a server certificate for `localhost` and `127.0.0.1`, and a client
//!   certificate, written as PEM files into a temp directory (rcgen with ring: nothing in the
//!   test tree pulls aws-lc). Two `Pki`s have unrelated CAs: one's files make a "wrong CA"
//!   for the other's servers.
//! - [`HttpsReceiver`]: axum behind tokio-rustls on 127.0.0.1. It refuses handshakes without
//!   a client certificate from its CA (and records why), answers 401 to a missing or wrong
//!   `Authorization: Bearer`, and otherwise decodes (`sensors::wire`, as a backend would) and
//!   keeps every batch it answers 200.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sensors::record::Batch;
use tokio::sync::oneshot;

use crate::receiver::INGEST_PATH;

/// How long the receiver waits for a client to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A CA with a server and a client certificate, as PEM files; removed on drop.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates a fresh CA, a server certificate (SAN `localhost`, `127.0.0.1`) and a client
    /// certificate (CN `edgewise-gateway`), both signed by the CA.
    pub fn generate() -> Pki {
        let dir = tempfile::Builder::new().prefix("pki-").tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: two `Pki`s are unrelated CAs, as a wrong CA in the field would be
        // (a CA of the same name but another key fails as `BadSignature` instead).
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "edgewise test CA {}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = ca_params.self_signed(&ca_key).expect("self-signed CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, common_name: &str| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &issuer).expect("signed leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "edgewise test broker");
        let (client, client_key) = leaf(Vec::new(), "edgewise-gateway");
        let pki = Pki { dir };
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server.key", server_key),
            ("client.pem", client),
            ("client.key", client_key),
        ] {
            std::fs::write(pki.dir.path().join(name), pem).expect("write PEM file");
        }
        pki
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server's certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The client's certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// A Mosquitto TLS listener with this PKI's server certificate, trusting its CA for
    /// client certificates.
    pub fn mosquitto_listener(&self, require_certificate: bool) -> crate::mosquitto::TlsListener {
        crate::mosquitto::TlsListener {
            ca_file: self.ca(),
            cert_file: self.server_cert(),
            key_file: self.server_key(),
            require_certificate,
        }
    }

    /// A rustls server configuration (ring) with the server certificate that requires a
    /// client certificate from this CA.
    fn server_config(&self) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(self.ca()).expect("CA PEM")).expect("CA root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let chain = vec![CertificateDer::from_pem_file(self.server_cert()).expect("server PEM")];
        let key = PrivateKeyDer::from_pem_file(self.server_key()).expect("server key PEM");
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server certificate")
    }
}

#[derive(Debug)]
struct Shared {
    token: Mutex<String>,
    accepted: Mutex<Vec<Batch>>,
    unauthorized: AtomicU64,
    handshake_errors: Mutex<Vec<String>>,
    protocol_errors: Mutex<Vec<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTPS upstream with mutual TLS and a bearer token; stops on drop.
#[derive(Debug)]
pub struct HttpsReceiver {
    /// Runs the server; dropping it stops everything.
    _rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl HttpsReceiver {
    /// Listens on a free port of 127.0.0.1 with `pki`'s server certificate, requiring a
    /// client certificate from `pki`'s CA and `Authorization: Bearer <token>`.
    pub fn start(pki: &Pki, token: &str) -> HttpsReceiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let tcp =
            rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind 127.0.0.1:0");
        let addr = tcp.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            token: Mutex::new(token.to_string()),
            accepted: Mutex::new(Vec::new()),
            unauthorized: AtomicU64::new(0),
            handshake_errors: Mutex::new(Vec::new()),
            protocol_errors: Mutex::new(Vec::new()),
        });
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(pki.server_config())),
            shared: shared.clone(),
        };
        let app = Router::new()
            .route(INGEST_PATH, post(ingest))
            .layer(DefaultBodyLimit::disable())
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        rt.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        HttpsReceiver { _rt: rt, addr, shared, stop: Some(stop) }
    }

    /// `https://127.0.0.1:<port>/ingest` (the server certificate names `127.0.0.1`).
    pub fn url(&self) -> String {
        format!("https://{}{INGEST_PATH}", self.addr)
    }

    /// Accepts `token` from now on.
    pub fn set_token(&self, token: &str) {
        *lock(&self.shared.token) = token.to_string();
    }

    /// Batches answered 200, in arrival order.
    pub fn accepted(&self) -> Vec<Batch> {
        lock(&self.shared.accepted).clone()
    }

    /// Requests answered 401.
    pub fn unauthorized(&self) -> u64 {
        self.shared.unauthorized.load(Ordering::SeqCst)
    }

    /// Why handshakes failed (no or a wrong client certificate), in order.
    pub fn handshake_errors(&self) -> Vec<String> {
        lock(&self.shared.handshake_errors).clone()
    }

    /// Bodies that did not decode to a batch.
    pub fn protocol_errors(&self) -> Vec<String> {
        lock(&self.shared.protocol_errors).clone()
    }
}

impl Drop for HttpsReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if std::thread::panicking() {
            eprintln!(
                "----- https receiver on {}: {} accepted, {} unauthorized, handshake errors {:?}, \
                 protocol errors {:?} -----",
                self.addr,
                self.accepted().len(),
                self.unauthorized(),
                self.handshake_errors(),
                self.protocol_errors(),
            );
        }
    }
}

/// TCP + TLS handshake as an axum listener; failed handshakes are recorded and skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => lock(&self.shared.handshake_errors).push(e.to_string()),
                Err(_) => lock(&self.shared.handshake_errors).push("handshake timed out".into()),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn ingest(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let expected = format!("Bearer {}", lock(&shared.token));
    let given = headers.get("authorization").and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        shared.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::UNAUTHORIZED, "bad or missing bearer token\n".into());
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let content_type = header("content-type").unwrap_or("application/json");
    let batch = sensors::wire::decode(&body, content_type, header("content-encoding"))
        .map_err(|e| e.to_string());
    match batch {
        Ok(batch) => {
            lock(&shared.accepted).push(batch);
            (StatusCode::OK, "ok\n".into())
        }
        Err(e) => {
            lock(&shared.protocol_errors).push(e.clone());
            (StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}
