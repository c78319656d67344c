//! Test certificate authorities and TLS servers for the tests of the HTTP clients, made fresh in
//! each test with rcgen: a CA, and server certificates it signs (for chosen names, valid or
//! expired).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// A certificate authority of a test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server's certificate and key.
pub struct ServerCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses); `expired`: valid in 2019
    /// only.
    pub fn server(&self, names: &[&str], expired: bool) -> ServerCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "berth test server");
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        ServerCert { chain: vec![cert.der().clone()], key }
    }
}

impl ServerCert {
    pub fn config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .unwrap();
        Arc::new(config)
    }
}

/// `contents` in a new file under the temp directory.
pub fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "berth-tls-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

type Script = dyn Fn(usize, &str, &mut dyn Write) + Send + Sync;

/// A server on 127.0.0.1, plain or TLS, that answers its n-th connection with
/// `script(n, request head, stream)` on a thread of its own, and keeps every request head it
/// saw (a TLS connection whose handshake the client refused leaves an empty one).
pub struct Server {
    pub port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    /// Connections accepted (counted before the handshake, so a client's failure follows it).
    accepted: Arc<AtomicU32>,
    scheme: &'static str,
}

impl Server {
    pub fn start(script: impl Fn(usize, &str, &mut dyn Write) + Send + Sync + 'static) -> Server {
        Server::spawn(None, Arc::new(script))
    }

    pub fn start_tls(
        config: Arc<ServerConfig>,
        script: impl Fn(usize, &str, &mut dyn Write) + Send + Sync + 'static,
    ) -> Server {
        Server::spawn(Some(config), Arc::new(script))
    }

    fn spawn(tls: Option<Arc<ServerConfig>>, script: Arc<Script>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                count.fetch_add(1, Ordering::SeqCst);
                let (Ok(stream), log, script, tls) = (stream, log.clone(), script.clone(), tls.clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let mut stream: Box<dyn ReadWrite> = match tls {
                        None => Box::new(stream),
                        Some(config) => {
                            Box::new(StreamOwned::new(ServerConnection::new(config).unwrap(), stream))
                        }
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    log.lock().unwrap().push(head.clone());
                    script(n, &head, &mut stream);
                    stream.close();
                });
            }
        });
        Server { port, requests, accepted, scheme }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    pub fn connections(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A server-side stream, plain or TLS.
trait ReadWrite: Read + Write + Send {
    /// End the stream cleanly (TLS: with close_notify).
    fn close(&mut self) {}
}

impl ReadWrite for std::net::TcpStream {}

impl ReadWrite for StreamOwned<ServerConnection, std::net::TcpStream> {
    fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
    }
}

/// Standard base64 with padding, as `settings.pki.NAME.data` takes it.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What a [`ConnectProxy`] does with a CONNECT.
#[derive(Debug, Clone)]
pub enum ProxyMode {
    /// Open the tunnel; a host named in `names` is reached at that address instead of resolved.
    Tunnel { names: Vec<(String, std::net::SocketAddr)> },
    /// Answer this status line (e.g. "403 Forbidden") and close.
    Refuse(&'static str),
    /// Answer with these raw bytes and close.
    Raw(Vec<u8>),
    /// Read the request, then hold the connection open without a word.
    Silent,
}

/// An HTTP CONNECT proxy on 127.0.0.1 for tests: it keeps every request head it saw.
pub struct ConnectProxy {
    pub port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub fn start(mode: ProxyMode) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = heads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let (Ok(mut client), log, mode) = (stream, log.clone(), mode.clone()) else { continue };
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).is_ok_and(|n| n == 1) {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    log.lock().unwrap().push(head.clone());
                    let target =
                        head.strip_prefix("CONNECT ").and_then(|r| r.split(' ').next()).unwrap_or("");
                    match mode {
                        ProxyMode::Refuse(status) => {
                            let _ = write!(client, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                        }
                        ProxyMode::Raw(bytes) => {
                            let _ = client.write_all(&bytes);
                        }
                        ProxyMode::Silent => std::thread::sleep(std::time::Duration::from_secs(30)),
                        ProxyMode::Tunnel { names } => {
                            let (host, port) = target.rsplit_once(':').unwrap_or((target, "443"));
                            let addr = names.iter().find(|(n, _)| n == host).map(|(_, a)| *a);
                            let origin = match addr {
                                Some(a) => std::net::TcpStream::connect(a),
                                None => std::net::TcpStream::connect(format!("{host}:{port}")),
                            };
                            let Ok(origin) = origin else {
                                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                                return;
                            };
                            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                            let (mut c2, mut o2) = (client.try_clone().unwrap(), origin.try_clone().unwrap());
                            let up = std::thread::spawn(move || {
                                let _ = std::io::copy(&mut c2, &mut o2);
                                let _ = o2.shutdown(std::net::Shutdown::Write);
                            });
                            let (mut o, mut c) = (origin, client);
                            let _ = std::io::copy(&mut o, &mut c);
                            let _ = c.shutdown(std::net::Shutdown::Write);
                            let _ = up.join();
                        }
                    }
                });
            }
        });
        ConnectProxy { port, heads }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The request heads it was sent, in order.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}
