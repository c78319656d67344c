//! Client connections through an HTTP proxy (`settings.network.https-proxy`, `no-proxy`), for
//! Berth's own HTTP clients (the updater).
//!
//! How: the client connects to the proxy and asks for a tunnel with `CONNECT HOST:PORT
//! HTTP/1.1`; a 2xx answer opens it, and the client then speaks to the origin inside the
//! tunnel exactly as over a direct connection: for https the TLS handshake is with the origin
//! (SNI and the certificate's name are the URL's host, checked against the trust bundle; the
//! proxy sees only ciphertext). Plain `http://` URLs go through a tunnel as well, rather than as
//! absolute-form requests to the proxy: one code path, the request on the wire is the same as
//! without a proxy, and a proxy that allows CONNECT only to port 443 says so in a clear refusal.
//!
//! The proxy URL: `http://HOST[:PORT]` or `HOST[:PORT]` (port 80 by default, as curl and Go
//! have it). Credentials in it (`http://user:pass@host:port`, percent-encoded where needed) are
//! sent as `Proxy-Authorization: Basic`; Bottlerocket's setting is a URL and allows them.
//! Not supported here: `https://` proxies (TLS to the proxy itself): a clear error when used.
//! Error texts never show the credentials.
//!
//! `no-proxy` (as Go's `NO_PROXY`, which containerd and kubelet read from the same setting):
//! `*` bypasses the proxy for every host; an IP address matches itself and a CIDR
//! (`10.0.0.0/8`, `fd00::/8`) its network, both for hosts given as addresses in the URL (names
//! are not resolved to check); `example.com` matches that name and every name under it;
//! `.example.com` only names under it; an entry with `:PORT` matches only that port. Berth adds
//! `localhost`, `127.0.0.1` and `::1`, as it does for the services.
//!
//! Bounds: connecting to the proxy takes the client's `connect_timeout`, each read and write of
//! the CONNECT exchange its `io_timeout`, all within its deadline; the proxy's answer head is at
//! most [`MAX_CONNECT_HEAD`] bytes. A non-2xx answer (407: credentials refused), a proxy that
//! closes without answering, or one that is too slow are errors that name the proxy.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};

use url::{Host, Url};

use super::client::{cause_text, Error, Options};
use super::head::parse_response;
use super::io::is_timeout;

/// The largest answer head to a CONNECT that is read.
pub const MAX_CONNECT_HEAD: usize = 8 * 1024;
/// The most `no-proxy` entries (as the setting's validation allows).
pub const MAX_NO_PROXY: usize = 256;

/// A proxy and the hosts that bypass it; see the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `Basic base64(user:password)`.
    authorization: Option<String>,
    bypass: Vec<Bypass>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({}, bypass {:?})", self.name(), self.bypass)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    All,
    /// A name and the names under it (`sub` false), or only those under it (`sub` true).
    Domain {
        name: String,
        sub: bool,
        port: Option<u16>,
    },
    Net {
        addr: IpAddr,
        len: u8,
        port: Option<u16>,
    },
}

impl Proxy {
    /// The proxy at `url` (see the module docs) with `no_proxy` (plus the loopback names).
    pub fn new(url: &str, no_proxy: &[String]) -> Result<Proxy, String> {
        let shown = url.split_once('@').map_or(url.to_string(), |(_, h)| format!("…@{h}"));
        let bad = |why: &str| format!("proxy '{shown}': {why}");
        let full = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        let parsed = Url::parse(&full).map_err(|e| bad(&format!("not a URL ({e})")))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err(bad(
                    "an https:// proxy (TLS to the proxy) is not supported by Berth's updater; give the proxy as http://HOST:PORT",
                ))
            }
            other => return Err(bad(&format!("'{other}://' is not an HTTP proxy (http://HOST:PORT)"))),
        }
        let host = match parsed.host() {
            Some(Host::Domain(d)) => d.to_string(),
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(bad("no host")),
        };
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("a proxy URL has no path, query or fragment (http://HOST:PORT)"));
        }
        let authorization = if parsed.username().is_empty() && parsed.password().is_none() {
            None
        } else {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| bad("its credentials are not UTF-8 once percent-decoded"))
            };
            let user = decode(parsed.username())?;
            let pass = decode(parsed.password().unwrap_or_default())?;
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            Some(format!("Basic {token}"))
        };
        if no_proxy.len() > MAX_NO_PROXY {
            return Err(format!("no-proxy: more than {MAX_NO_PROXY} entries"));
        }
        let loopback = ["localhost", "127.0.0.1", "::1"].map(String::from);
        let bypass = no_proxy.iter().chain(&loopback).map(|e| bypass(e)).collect::<Result<_, _>>()?;
        Ok(Proxy { host, port: parsed.port().unwrap_or(80), authorization, bypass })
    }

    /// `http://HOST:PORT`, without credentials.
    pub fn name(&self) -> String {
        format!("http://{}", authority(&self.host, self.port))
    }

    /// Whether a request to `url` goes through this proxy (false: `no-proxy` bypasses it).
    pub fn applies_to(&self, url: &Url) -> bool {
        let port = url.port_or_known_default().unwrap_or(0);
        let (name, ip) = match url.host() {
            Some(Host::Domain(d)) => (d.to_ascii_lowercase(), d.parse::<IpAddr>().ok()),
            Some(Host::Ipv4(ip)) => (ip.to_string(), Some(IpAddr::V4(ip))),
            Some(Host::Ipv6(ip)) => (ip.to_string(), Some(IpAddr::V6(ip))),
            None => return false,
        };
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        !self.bypass.iter().any(|b| match b {
            Bypass::All => true,
            Bypass::Domain { name: d, sub, port } => {
                port_ok(port)
                    && ((!sub && name == *d)
                        || name.strip_suffix(d.as_str()).is_some_and(|h| h.ends_with('.')))
            }
            Bypass::Net { addr, len, port } => port_ok(port) && ip.is_some_and(|ip| in_net(ip, *addr, *len)),
        })
    }

    /// A TCP connection to `host:port` through the proxy: connect to it, ask for the tunnel,
    /// and hand back the stream once the proxy has opened it.
    pub fn tunnel(&self, host: &str, port: u16, opts: &Options) -> Result<TcpStream, Error> {
        let fail = |why: String, retry: bool| Error::Proxy { proxy: self.name(), why, retry };
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve '{}': {e}", self.host), true))?
            .collect();
        let mut last = fail(format!("'{}' resolved to no address", self.host), true);
        let mut tcp = None;
        for addr in addrs {
            let timeout = opts.bounded(opts.connect_timeout)?;
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = fail(format!("cannot connect to {addr}: {}", cause_text(&e)), true),
            }
        }
        let Some(mut tcp) = tcp else { return Err(last) };
        let target = authority(host, port);
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = &self.authorization {
            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        if req.bytes().any(|b| b == 0) || host.contains(['\r', '\n', ' ', '/']) {
            return Err(fail(format!("cannot ask for a tunnel to '{target}'"), false));
        }
        let budget = opts.bounded(opts.io_timeout)?;
        let set = tcp.set_read_timeout(Some(budget)).and_then(|()| tcp.set_write_timeout(Some(budget)));
        set.map_err(|e| fail(format!("setting socket timeouts: {e}"), true))?;
        let io_fail = |what: &str, e: io::Error| {
            if is_timeout(&e) {
                fail(format!("timed out {what} (CONNECT {target})"), true)
            } else {
                fail(format!("{what} (CONNECT {target}): {}", cause_text(&e)), true)
            }
        };
        tcp.write_all(req.as_bytes()).map_err(|e| io_fail("sending CONNECT", e))?;
        let mut buf = Vec::with_capacity(1024);
        let mut piece = [0u8; 1024];
        let (head, used) = loop {
            if let Some(done) = parse_response(&buf, MAX_CONNECT_HEAD)
                .map_err(|e| fail(format!("its answer to CONNECT {target}: {e}"), false))?
            {
                break done;
            }
            if buf.len() >= MAX_CONNECT_HEAD {
                return Err(fail(
                    format!("its answer to CONNECT {target} is longer than {MAX_CONNECT_HEAD} bytes"),
                    false,
                ));
            }
            // Only as much as the head may still take.
            let room = (MAX_CONNECT_HEAD - buf.len()).min(piece.len());
            let budget = opts.bounded(opts.io_timeout)?;
            tcp.set_read_timeout(Some(budget))
                .map_err(|e| fail(format!("setting socket timeouts: {e}"), true))?;
            match tcp.read(&mut piece[..room]) {
                Ok(0) => {
                    let when = if buf.is_empty() {
                        "before answering".to_string()
                    } else {
                        format!("after {} bytes of its answer", buf.len())
                    };
                    return Err(fail(
                        format!("the proxy closed the connection {when} (CONNECT {target})"),
                        true,
                    ));
                }
                Ok(n) => buf.extend_from_slice(&piece[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_fail("waiting for the proxy's answer", e)),
            }
        };
        if !(200..300).contains(&head.status) {
            let hint = if head.status == 407 {
                if self.authorization.is_some() {
                    ": it refused the credentials in settings.network.https-proxy"
                } else {
                    ": it wants credentials (http://USER:PASSWORD@HOST:PORT in settings.network.https-proxy)"
                }
            } else {
                ""
            };
            return Err(fail(format!("CONNECT {target} refused: '{}'{hint}", head.status_line()), false));
        }
        if used != buf.len() {
            return Err(fail(
                format!(
                    "{} bytes came after its answer to CONNECT {target}, before the client spoke",
                    buf.len() - used
                ),
                false,
            ));
        }
        Ok(tcp)
    }
}

/// `host:port`, with brackets for an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One `no-proxy` entry.
fn bypass(entry: &str) -> Result<Bypass, String> {
    let e = entry.trim().to_ascii_lowercase();
    let bad = || format!("no-proxy entry '{entry}' is not a host, .domain, IP address, CIDR or *");
    if e == "*" {
        return Ok(Bypass::All);
    }
    if let Some((a, l)) = e.split_once('/') {
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l.parse().ok().filter(|&l| l <= max).ok_or_else(bad)?;
        return Ok(Bypass::Net { addr, len, port: None });
    }
    if let Ok(addr) = e.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        return Ok(Bypass::Net { addr, len, port: None });
    }
    let (host, port) = match e.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
        None => (e.as_str(), None),
    };
    if let Ok(addr) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        return Ok(Bypass::Net { addr, len, port });
    }
    let (name, sub) = match host.strip_prefix('.') {
        Some(rest) => (rest, true),
        None => (host.strip_prefix("*.").unwrap_or(host), host.starts_with("*.")),
    };
    let label_ok =
        |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad());
    }
    Ok(Bypass::Domain { name: name.to_string(), sub, port })
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn goes(p: &Proxy, url: &str) -> bool {
        p.applies_to(&Url::parse(url).unwrap())
    }

    #[test]
    fn proxy_urls_are_parsed_and_checked() {
        let p = Proxy::new("proxy.example:3128", &[]).unwrap();
        assert_eq!(p.name(), "http://proxy.example:3128");
        assert_eq!(p.authorization, None);
        assert_eq!(Proxy::new("http://10.0.0.1", &[]).unwrap().name(), "http://10.0.0.1:80");
        let p = Proxy::new("http://me:p%40ss@[fd00::1]:8080/", &[]).unwrap();
        assert_eq!(p.name(), "http://[fd00::1]:8080");
        assert_eq!(p.authorization.as_deref(), Some("Basic bWU6cEBzcw=="), "me:p@ss");
        assert!(!format!("{p:?}").contains("bWU"), "no credentials in Debug");
        let cases = [
            ("https://p:443", "https:// proxy"),
            ("socks5://p:1080", "not an HTTP proxy"),
            ("http://p:3128/path", "no path"),
            ("http://u:secret@p:99999", "not a URL"),
        ];
        for (url, text) in cases {
            let e = Proxy::new(url, &[]).unwrap_err();
            assert!(e.contains(text), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: credentials shown: {e}");
        }
        let e = Proxy::new("p:1", &["a b".into()]).unwrap_err();
        assert!(e.contains("no-proxy entry 'a b'"), "{e}");
    }

    #[test]
    fn no_proxy_matches_hosts_domains_and_networks() {
        let np: Vec<String> =
            ["repo.example", ".internal", "10.0.0.0/8", "fd00::/8", "192.168.1.5", "only.port:8443"]
                .map(String::from)
                .to_vec();
        let p = Proxy::new("http://p:3128", &np).unwrap();
        let cases = [
            ("https://repo.example/x", false),
            ("https://REPO.example/x", false),
            ("https://a.repo.example/x", false),
            ("https://notrepo.example/x", true),
            ("https://internal/x", true),
            ("https://a.internal/x", false),
            ("https://10.1.2.3/x", false),
            ("https://11.1.2.3/x", true),
            ("https://[fd12::1]/x", false),
            ("https://[fe80::1]/x", true),
            ("http://192.168.1.5:8080/x", false),
            ("https://only.port:8443/", false),
            ("https://only.port/", true),
            ("https://localhost:1/", false),
            ("https://127.0.0.1:1/", false),
            ("https://[::1]:1/", false),
            ("https://updates.example/", true),
        ];
        for (url, proxied) in cases {
            assert_eq!(goes(&p, url), proxied, "{url}");
        }
        let all = Proxy::new("p:1", &["*".into()]).unwrap();
        assert!(!goes(&all, "https://anything.example/"));
    }
}
