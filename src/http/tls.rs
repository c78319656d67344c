//! TLS for Berth's HTTP clients, and the trust bundle they (and containerd) use.
//!
//! rustls with the aws-lc-rs provider (already linked: tough and the updater use aws-lc-rs), TLS
//! 1.2 and 1.3, no OpenSSL. Server certificates are checked by webpki against the roots in the
//! trust bundle, for the host name or IP address of the URL; there is no way to turn the check
//! off. Handshake failures are explained in words (unknown issuer, expired, wrong name) rather
//! than rustls's enum names, since they end up in `/updates/status` for an operator to act on.
//!
//! The trust bundle: the image ships Debian's CA bundle at [`IMAGE_BUNDLE`]; `settings.pki.NAME`
//! adds bundles of its own (`data`: base64 of PEM certificates; `trusted`: whether they are
//! trusted, default false, as in Bottlerocket). At every settings apply [`trust_bundle`] renders
//! one PEM file, [`TRUST_BUNDLE`] (Bottlerocket's path): the image's certificates and those of
//! every trusted bundle, minus any certificate that an untrusted bundle names (a way to
//! distrust a root the image ships). containerd reads it through `SSL_CERT_FILE`; Berth's own
//! clients read it when they connect ([`default_bundle`]), so a change applies to the next
//! connection.

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// The CA bundle in the image (Debian's ca-certificates, Mozilla's roots).
pub const IMAGE_BUNDLE: &str = "/usr/share/berth/ca-certificates.crt";
/// The rendered trust bundle, relative to /etc.
pub const TRUST_BUNDLE_IN_ETC: &str = "pki/tls/certs/ca-bundle.crt";
/// The rendered trust bundle.
pub const TRUST_BUNDLE: &str = "/etc/pki/tls/certs/ca-bundle.crt";

/// The bundle a client trusts by default: the rendered one, or the image's before the first
/// render (and on a developer machine).
pub fn default_bundle() -> PathBuf {
    if Path::new(TRUST_BUNDLE).exists() {
        PathBuf::from(TRUST_BUNDLE)
    } else {
        PathBuf::from(IMAGE_BUNDLE)
    }
}

/// Why a TLS connection could not be made.
#[derive(Debug)]
pub enum TlsError {
    /// The trust bundle cannot be read or holds no usable certificate.
    Bundle { path: PathBuf, why: String },
    /// The host cannot be a TLS server name.
    Name(String),
    /// The handshake failed: the server's certificate was refused, or the peer broke off.
    Handshake { host: String, cause: rustls::Error },
    /// The connection failed or timed out during the handshake.
    Io { host: String, cause: io::Error },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Bundle { path, why } => write!(f, "trust bundle {}: {why}", path.display()),
            TlsError::Name(host) => write!(f, "'{host}' is not a host name or IP address TLS can check"),
            TlsError::Handshake { host, cause } => {
                write!(f, "TLS handshake with {host} failed: {}", explain(cause, host))
            }
            TlsError::Io { host, cause } => write!(f, "TLS handshake with {host} failed: {cause}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// What a rustls error means, for an operator.
fn explain(e: &rustls::Error, host: &str) -> String {
    let time = |t: &UnixTime| {
        jiff::Timestamp::from_second(t.as_secs() as i64)
            .map_or_else(|_| format!("{}s", t.as_secs()), |t| t.to_string())
    };
    let rustls::Error::InvalidCertificate(cert) = e else {
        return match e {
            rustls::Error::AlertReceived(alert) => format!("the server sent the alert {alert:?}"),
            other => other.to_string(),
        };
    };
    match cert {
        CertificateError::UnknownIssuer => "the server's certificate is not signed by a certificate authority \
            this host trusts (unknown issuer): if the server uses a private CA, add it as settings.pki.NAME.data \
            with settings.pki.NAME.trusted = true"
            .to_string(),
        CertificateError::Expired => "the server's certificate has expired".to_string(),
        CertificateError::ExpiredContext { time: now, not_after } => format!(
            "the server's certificate has expired: it was valid until {}, and the time here is {}",
            time(not_after),
            time(now)
        ),
        CertificateError::NotValidYet => {
            "the server's certificate is not valid yet (is this host's clock right?)".to_string()
        }
        CertificateError::NotValidYetContext { time: now, not_before } => format!(
            "the server's certificate is not valid yet: it is valid from {}, and the time here is {} \
             (is this host's clock right?)",
            time(not_before),
            time(now)
        ),
        CertificateError::NotValidForName => format!("the server's certificate is not valid for the name '{host}'"),
        CertificateError::NotValidForNameContext { presented, .. } => {
            // webpki gives `DnsName("a.example")`, `IpAddress(10.0.0.1)`: keep the names.
            let names: Vec<&str> = presented
                .iter()
                .map(|p| {
                    let inner = p.split_once('(').and_then(|(_, r)| r.strip_suffix(')')).unwrap_or(p);
                    inner.trim_matches('"')
                })
                .collect();
            format!("the server's certificate is not valid for the name '{host}' (it is for: {})", names.join(", "))
        }
        CertificateError::BadSignature => "the server's certificate has a bad signature".to_string(),
        CertificateError::Revoked => "the server's certificate has been revoked".to_string(),
        other => format!("the server's certificate was refused: {other:?}"),
    }
}

/// The `-----BEGIN CERTIFICATE-----` blocks of a PEM text, each as its text and its DER bytes.
/// Anything else (other PEM sections, comments between blocks) is skipped; a block whose base64
/// is damaged is an error naming its position.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<(String, CertificateDer<'static>)>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = std::str::from_utf8(pem).map_err(|_| "the PEM text is not UTF-8".to_string())?;
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start..];
        let Some(end) = after.find(END) else {
            return Err(format!("certificate {} has no '{END}' line", out.len() + 1));
        };
        let block = &after[..end + END.len()];
        let der = CertificateDer::from_pem_slice(block.as_bytes())
            .map_err(|e| format!("certificate {} is not valid PEM: {e}", out.len() + 1))?;
        out.push((format!("{block}\n"), der));
        rest = &after[end + END.len()..];
    }
    Ok(out)
}

/// Check that `pem` holds at least one certificate and that each can be a trust anchor.
pub fn check_bundle(pem: &[u8]) -> Result<usize, String> {
    let certs = pem_certificates(pem)?;
    if certs.is_empty() {
        return Err("no '-----BEGIN CERTIFICATE-----' block in the PEM text".to_string());
    }
    for (i, (_, der)) in certs.iter().enumerate() {
        RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| format!("certificate {} cannot be a trust anchor: {e}", i + 1))?;
    }
    Ok(certs.len())
}

/// One `settings.pki` bundle: its name, its PEM text, and whether it is trusted.
pub struct PkiBundle<'a> {
    pub name: &'a str,
    pub pem: Vec<u8>,
    pub trusted: bool,
}

/// The rendered trust bundle: the image's certificates (`image`, PEM) and those of the trusted
/// bundles, each once, minus every certificate an untrusted bundle holds. Certificates that
/// cannot be read are left out (the settings model refuses them before they get here).
pub fn trust_bundle(image: &[u8], pki: &[PkiBundle<'_>]) -> String {
    let read = |pem: &[u8]| pem_certificates(pem).unwrap_or_default();
    let distrusted: Vec<CertificateDer<'static>> =
        pki.iter().filter(|b| !b.trusted).flat_map(|b| read(&b.pem)).map(|(_, der)| der).collect();
    let mut seen: Vec<CertificateDer<'static>> = Vec::new();
    let mut out = String::from("# Rendered by berth: the image's CA bundle and settings.pki.\n");
    let sources = std::iter::once(("image", image))
        .chain(pki.iter().filter(|b| b.trusted).map(|b| (b.name, &b.pem[..])));
    for (source, pem) in sources {
        for (text, der) in read(pem) {
            if distrusted.contains(&der) || seen.contains(&der) {
                continue;
            }
            if source != "image" {
                out.push_str(&format!("# settings.pki.{source}\n"));
            }
            out.push_str(&text);
            seen.push(der);
        }
    }
    out
}

/// A client configuration that trusts the certificates in the PEM file `bundle`.
pub fn client_config(bundle: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let fail = |why: String| TlsError::Bundle { path: bundle.to_path_buf(), why };
    let pem = std::fs::read(bundle).map_err(|e| fail(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots
        .add_parsable_certificates(pem_certificates(&pem).map_err(fail)?.into_iter().map(|(_, der)| der));
    if added == 0 {
        return Err(fail("no usable certificate in it".to_string()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(format!("no TLS version available: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS stream a client speaks HTTP over.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Make the TLS handshake on `tcp` for `host` (a DNS name or an IP address, as in the URL),
/// within the socket timeouts `tcp` has.
pub fn handshake(mut tcp: TcpStream, host: &str, config: Arc<ClientConfig>) -> Result<TlsStream, TlsError> {
    let name = ServerName::try_from(host.to_string()).map_err(|_| TlsError::Name(host.to_string()))?;
    let mut conn = ClientConnection::new(config, name)
        .map_err(|cause| TlsError::Handshake { host: host.to_string(), cause })?;
    while conn.is_handshaking() {
        if let Err(cause) = conn.complete_io(&mut tcp) {
            let tls = cause.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
            return Err(match tls {
                Some(cause) => TlsError::Handshake { host: host.to_string(), cause },
                None => TlsError::Io { host: host.to_string(), cause },
            });
        }
    }
    Ok(StreamOwned::new(conn, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing::TestCa;

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        pem_certificates(pem.as_bytes()).unwrap().into_iter().map(|(_, der)| der).collect()
    }

    #[test]
    fn the_bundle_adds_trusted_and_removes_distrusted_certificates() {
        let (a, b, c) = (TestCa::new("A"), TestCa::new("B"), TestCa::new("C"));
        let image = format!("# image bundle\n{}\n{}", a.pem(), b.pem());
        let pki = [
            PkiBundle { name: "mine", pem: format!("{}{}", c.pem(), a.pem()).into_bytes(), trusted: true },
            PkiBundle { name: "nope", pem: b.pem().into_bytes(), trusted: false },
        ];
        let out = trust_bundle(image.as_bytes(), &pki);
        assert_eq!(
            ders(&out),
            [ders(&a.pem()), ders(&c.pem())].concat(),
            "A from the image, C added once, B removed"
        );
        assert!(out.contains("# settings.pki.mine\n-----BEGIN CERTIFICATE-----"), "{out}");
        // Without an image bundle (a developer machine): only what settings.pki trusts.
        assert_eq!(ders(&trust_bundle(b"", &pki)), [ders(&c.pem()), ders(&a.pem())].concat());
    }

    #[test]
    fn bundles_are_checked() {
        let ca = TestCa::new("A");
        assert_eq!(check_bundle(format!("{}{}", ca.pem(), TestCa::new("B").pem()).as_bytes()), Ok(2));
        let cut = ca.pem().replace("-----END CERTIFICATE-----", "");
        let damaged = ca.pem().replacen('M', "*", 1);
        let cases: [(&[u8], &str); 5] = [
            (b"", "no '-----BEGIN CERTIFICATE-----' block"),
            (b"\xff\xfe", "not UTF-8"),
            (cut.as_bytes(), "certificate 1 has no '-----END CERTIFICATE-----' line"),
            (damaged.as_bytes(), "certificate 1 is not valid PEM"),
            (
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "certificate 1 cannot be a trust anchor",
            ),
        ];
        for (pem, text) in cases {
            let e = check_bundle(pem).unwrap_err();
            assert!(e.contains(text), "{e:?} lacks {text:?}");
        }
    }

    #[test]
    fn a_bundle_without_certificates_is_a_clear_error() {
        let path = crate::http::testing::temp_file("empty.pem", b"# nothing\n");
        let e = client_config(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("trust bundle {}: ", path.display())), "{e}");
        assert!(e.contains("no usable certificate"), "{e}");
        let e = client_config(Path::new("/nonexistent/ca.pem")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem: No such file"), "{e}");
    }
}
