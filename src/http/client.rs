//! Blocking HTTP/1.1 clients: a [`Connection`] over a Unix socket, TCP, or TLS over TCP sends
//! one request at a time and reads the answer's head and body with the shared parser and
//! framing.
//!
//! What a request looks like on the wire: the request line, `Host`, the caller's fields in
//! their order, then `Content-Length` when there is a body (or the method is POST, PUT or
//! PATCH). Field names must be tokens and values free of line breaks: a request that would
//! smuggle a field is refused before anything is sent. 1xx answers are skipped.
//!
//! Bounds: [`Options`] gives each connect attempt `connect_timeout`, each read and write
//! `io_timeout`, and everything together an optional `deadline`. Heads are at most
//! [`MAX_HEAD_BYTES`]; bodies are bounded by whoever reads them ([`Body::read_all`] takes a
//! maximum; the update transport streams). A proxy in [`Options`] tunnels the connections it
//! applies to ([`super::proxy`]). Not supported: content codings, HTTP/2.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use url::{Host, Url};

use super::body::Body;
use super::head::{is_token, parse_response, ResponseHead};
use super::io::{is_timeout, Buffered, Timed, Timeouts};
use super::proxy::Proxy;
use super::tls::{self, TlsError, TlsStream};
use super::MAX_HEAD_BYTES;

/// What a connection runs over.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl Timeouts for Stream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Tls(s) => s.sock.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Tls(s) => s.sock.set_write_timeout(timeout),
        }
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Unix(_) => "Stream::Unix",
            Stream::Tcp(_) => "Stream::Tcp",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

/// How a client connects and how long it may wait.
#[derive(Debug, Clone)]
pub struct Options {
    /// Each attempt to connect to one address.
    pub connect_timeout: Duration,
    /// Each read and each write.
    pub io_timeout: Duration,
    /// Everything (connecting, the TLS handshake, the request, the answer) ends by then.
    pub deadline: Option<Instant>,
    /// The PEM file of trusted CAs for https (`None`: [`tls::default_bundle`]).
    pub trust_bundle: Option<PathBuf>,
    /// The proxy for the URLs it applies to ([`Connection::open`] only).
    pub proxy: Option<Proxy>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connect_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            deadline: None,
            trust_bundle: None,
            proxy: None,
        }
    }
}

impl Options {
    /// `wanted`, but no later than the deadline; an error once the deadline has passed.
    pub(crate) fn bounded(&self, wanted: Duration) -> Result<Duration, Error> {
        match self.deadline {
            None => Ok(wanted),
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if left >= Duration::from_millis(1) => Ok(left.min(wanted)),
                _ => Err(Error::Timeout { during: "connecting" }),
            },
        }
    }
}

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// The URL cannot be fetched (scheme, no host).
    Url(String),
    Resolve {
        host: String,
        cause: io::Error,
    },
    /// No address took the connection; the last attempt's failure.
    Connect {
        addr: String,
        cause: io::Error,
    },
    Tls(TlsError),
    /// A timeout or the deadline passed; `during` says what was going on.
    Timeout {
        during: &'static str,
    },
    /// The connection ended or failed before the first byte of an answer.
    NoResponse(io::Error),
    /// The connection failed after the answer began, or while sending.
    Io {
        during: &'static str,
        cause: io::Error,
    },
    /// The answer (or the request to be sent) breaks HTTP or a limit.
    Malformed(String),
    /// The proxy could not be reached or did not open the tunnel; `retry`: a network failure
    /// rather than a refusal.
    Proxy {
        proxy: String,
        why: String,
        retry: bool,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Url(why) => f.write_str(why),
            Error::Resolve { host, cause } => write!(f, "cannot resolve '{host}': {cause}"),
            Error::Connect { addr, cause } => write!(f, "cannot connect to {addr}: {}", cause_text(cause)),
            Error::Tls(e) => write!(f, "{e}"),
            Error::Timeout { during } => write!(f, "timed out {during}"),
            Error::NoResponse(cause) => write!(f, "no response: {}", cause_text(cause)),
            Error::Io { during, cause } => write!(f, "{during}: {}", cause_text(cause)),
            Error::Malformed(why) => f.write_str(why),
            Error::Proxy { proxy, why, .. } => write!(f, "through the proxy {proxy}: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// An I/O error as a cause, with timeouts said as such.
pub fn cause_text(e: &io::Error) -> String {
    if is_timeout(e) {
        "timed out".to_string()
    } else {
        e.to_string()
    }
}

/// A body read error as a client error: timeouts, malformed framing, broken connections.
pub fn body_error(e: io::Error) -> Error {
    match e.kind() {
        _ if is_timeout(&e) => Error::Timeout { during: "reading the body" },
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => Error::Malformed(e.to_string()),
        _ => Error::Io { during: "reading the body", cause: e },
    }
}

/// One request to send.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The origin-form target: path and query, already escaped.
    pub target: &'a str,
    /// The `Host` field.
    pub host: &'a str,
    /// More fields, in order.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The request's bytes: line, fields, body.
pub fn encode_request(req: &Request<'_>) -> Result<Vec<u8>, Error> {
    let token = |s: &str| is_token(s.as_bytes());
    let clean = |s: &str| !s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
    if !token(req.method) || !req.target.starts_with('/') || !req.target.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::Malformed(format!(
            "cannot send '{} {}': not a method and a path",
            req.method, req.target
        )));
    }
    let mut out = Vec::with_capacity(256 + req.body.len());
    out.extend_from_slice(format!("{} {} HTTP/1.1\r\n", req.method, req.target).as_bytes());
    let length = req.body.len().to_string();
    let needs_length = !req.body.is_empty() || matches!(req.method, "POST" | "PUT" | "PATCH");
    let fields = std::iter::once(("Host", req.host))
        .chain(req.headers.iter().copied())
        .chain(needs_length.then_some(("Content-Length", length.as_str())));
    for (name, value) in fields {
        if !token(name) || !clean(value) {
            return Err(Error::Malformed(format!(
                "cannot send header '{name}': a bad name or a line break in its value"
            )));
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(req.body);
    Ok(out)
}

/// Interim (1xx) answers skipped before a final one; a server that sends more is broken.
const MAX_INTERIM: usize = 8;

/// Read one response head (skipping 1xx answers) from `io`.
pub fn read_response_head<S: Read>(io: &mut Buffered<S>) -> Result<ResponseHead, Error> {
    for _ in 0..=MAX_INTERIM {
        let head = read_one_head(io)?;
        if head.status >= 200 {
            return Ok(head);
        }
    }
    Err(Error::Malformed(format!("more than {MAX_INTERIM} interim (1xx) answers")))
}

fn read_one_head<S: Read>(io: &mut Buffered<S>) -> Result<ResponseHead, Error> {
    let mut seen_any = !io.buffer().is_empty();
    loop {
        if !io.buffer().is_empty() {
            if let Some((head, used)) =
                parse_response(io.buffer(), MAX_HEAD_BYTES).map_err(Error::Malformed)?
            {
                io::BufRead::consume(io, used);
                return Ok(head);
            }
        }
        let got = io.buffer().len();
        match io.fill_more(MAX_HEAD_BYTES) {
            Ok(0) if !seen_any => {
                return Err(Error::NoResponse(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed before any response",
                )))
            }
            Ok(0) => {
                return Err(Error::Io {
                    during: "reading the response head",
                    cause: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the connection closed after {got} bytes of the response head"),
                    ),
                })
            }
            Ok(_) => seen_any = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(Error::Timeout { during: "waiting for the response" }),
            Err(e) if !seen_any => return Err(Error::NoResponse(e)),
            Err(cause) => return Err(Error::Io { during: "reading the response head", cause }),
        }
    }
}

/// The streams a [`Connection`] reads and writes through.
pub type Io = Buffered<Timed<Stream>>;

/// One client connection; see the module docs.
#[derive(Debug)]
pub struct Connection {
    io: Io,
}

/// The read buffer of a client connection (a head fits; bodies may bypass it).
const BUFFER: usize = 16 * 1024;

impl Connection {
    fn new(stream: Stream, opts: &Options) -> Connection {
        let mut timed = Timed::new(stream, opts.io_timeout);
        timed.set_deadline(opts.deadline);
        Connection { io: Buffered::new(timed, BUFFER) }
    }

    /// Connect to the Unix socket at `path`.
    pub fn unix(path: &Path, opts: &Options) -> Result<Connection, Error> {
        let stream = UnixStream::connect(path)
            .map_err(|cause| Error::Connect { addr: path.display().to_string(), cause })?;
        Ok(Connection::new(Stream::Unix(stream), opts))
    }

    /// Connect over TCP to `addr`.
    pub fn tcp(addr: SocketAddr, opts: &Options) -> Result<Connection, Error> {
        let timeout = opts.bounded(opts.connect_timeout)?;
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|cause| Error::Connect { addr: addr.to_string(), cause })?;
        Ok(Connection::new(Stream::Tcp(stream), opts))
    }

    /// Connect to the server of an `http://` or `https://` URL: each address the host resolves
    /// to in turn (or a tunnel through `opts.proxy` when it applies to the URL), then the TLS
    /// handshake for https (SNI and the certificate checked for the URL's host).
    pub fn open(url: &Url, opts: &Options) -> Result<Connection, Error> {
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(Error::Url(format!("'{other}://' is not http:// or https://"))),
        };
        let port = url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
        let name = match url.host() {
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            Some(Host::Domain(name)) => name.to_string(),
            None => return Err(Error::Url(format!("{url} has no host"))),
        };
        let tcp = match opts.proxy.as_ref().filter(|p| p.applies_to(url)) {
            Some(proxy) => proxy.tunnel(&name, port, opts)?,
            None => Connection::direct(&name, port, opts)?,
        };
        if !tls {
            return Ok(Connection::new(Stream::Tcp(tcp), opts));
        }
        let bundle = opts.trust_bundle.clone().unwrap_or_else(tls::default_bundle);
        let config = tls::client_config(&bundle).map_err(Error::Tls)?;
        let budget = opts.bounded(opts.io_timeout)?;
        let timeouts = tcp.set_read_timeout(Some(budget)).and_then(|()| tcp.set_write_timeout(Some(budget)));
        timeouts.map_err(|cause| Error::Io { during: "setting socket timeouts", cause })?;
        let stream = tls::handshake(tcp, &name, config).map_err(|e| match e {
            TlsError::Io { cause, .. } if is_timeout(&cause) => {
                Error::Timeout { during: "in the TLS handshake" }
            }
            other => Error::Tls(other),
        })?;
        Ok(Connection::new(Stream::Tls(Box::new(stream)), opts))
    }

    /// A TCP connection to `name:port`: each address it resolves to in turn.
    fn direct(name: &str, port: u16, opts: &Options) -> Result<TcpStream, Error> {
        let addrs: Vec<SocketAddr> = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![(ip, port).into()],
            Err(_) => (name, port)
                .to_socket_addrs()
                .map_err(|cause| Error::Resolve { host: name.to_string(), cause })?
                .collect(),
        };
        let mut last = None;
        for addr in addrs {
            let timeout = opts.bounded(opts.connect_timeout)?;
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => return Ok(s),
                Err(cause) => last = Some(Error::Connect { addr: addr.to_string(), cause }),
            }
        }
        Err(last.unwrap_or_else(|| Error::Url(format!("'{name}' resolved to no address"))))
    }

    /// Send `req` and read the head of its answer.
    pub fn send(&mut self, req: &Request<'_>) -> Result<ResponseHead, Error> {
        let bytes = encode_request(req)?;
        let sent = self.io.get_mut().write_all(&bytes).and_then(|()| self.io.get_mut().flush());
        sent.map_err(|cause| match cause {
            e if is_timeout(&e) => Error::Timeout { during: "sending the request" },
            cause => Error::NoResponse(cause),
        })?;
        read_response_head(&mut self.io)
    }

    /// The body of the answer `head` (to a request with `method`), read through this connection.
    pub fn body(&mut self, head: &ResponseHead, method: &str) -> Result<Body<&mut Io>, Error> {
        let framing = head.framing(method == "HEAD").map_err(Error::Malformed)?;
        Ok(Body::new(&mut self.io, framing))
    }

    /// The connection's streams, positioned after the head just read (for a body read piece by
    /// piece, with a framing the caller decides: `Body::new(conn.into_io(), framing)`).
    pub fn into_io(self) -> Io {
        self.io
    }

    /// Send `req` and read the whole answer, its body at most `max_body` bytes.
    pub fn exchange(&mut self, req: &Request<'_>, max_body: usize) -> Result<(ResponseHead, Vec<u8>), Error> {
        let head = self.send(req)?;
        let body = self.body(&head, req.method)?.read_all(max_body).map_err(body_error)?;
        Ok((head, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn requests_on_the_wire() {
        let get = Request {
            method: "GET",
            target: "/x?a=b",
            host: "h:1",
            headers: &[("Range", "bytes=5-")],
            body: b"",
        };
        assert_eq!(
            encode_request(&get).unwrap(),
            b"GET /x?a=b HTTP/1.1\r\nHost: h:1\r\nRange: bytes=5-\r\n\r\n"
        );
        let put = Request { method: "PUT", target: "/t", host: "h", headers: &[], body: b"" };
        assert_eq!(encode_request(&put).unwrap(), b"PUT /t HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
        let patch = Request { method: "PATCH", target: "/s", host: "h", headers: &[], body: b"{}" };
        assert_eq!(
            encode_request(&patch).unwrap(),
            b"PATCH /s HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}"
        );
        let bad: [Request<'_>; 4] = [
            Request { headers: &[("X", "a\r\nEvil: 1")], ..get },
            Request { headers: &[("Bad Name", "a")], ..get },
            Request { target: "/a b", ..get },
            Request { host: "h\n", ..get },
        ];
        for req in bad {
            assert!(matches!(encode_request(&req), Err(Error::Malformed(_))), "{req:?}");
        }
    }

    /// Data, then an error where a blocking read would hang (a bridge that never closes).
    struct NoEof(Cursor<Vec<u8>>);

    impl Read for NoEof {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            match self.0.read(b)? {
                0 => Err(io::Error::other("read past the response")),
                n => Ok(n),
            }
        }
    }

    fn answer(bytes: &[u8], method: &str) -> Result<(u16, Vec<u8>), Error> {
        let mut io = Buffered::new(NoEof(Cursor::new(bytes.to_vec())), 64);
        let head = read_response_head(&mut io)?;
        let framing = head.framing(method == "HEAD").map_err(Error::Malformed)?;
        let body = Body::new(&mut io, framing).read_all(1 << 20).map_err(body_error)?;
        Ok((head.status, body))
    }

    #[test]
    fn responses_end_at_their_length_without_eof() {
        let cases: [(&[u8], &str, u16, &[u8]); 5] = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET", 200, b"hello"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", "GET", 200, b"hi"),
            (b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE", 204, b""),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD", 200, b""),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                "PUT",
                201,
                b"ok",
            ),
        ];
        for (bytes, method, status, body) in cases {
            let got = answer(bytes, method).unwrap_or_else(|e| panic!("{bytes:?}: {e}"));
            assert_eq!(got, (status, body.to_vec()), "{bytes:?}");
        }
    }

    #[test]
    fn broken_answers_say_what_broke() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "no response: the connection closed before any response"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Le",
                "reading the response head: the connection closed after 27 bytes",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                "the connection closed after 3 of 10 bytes",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line 'SSH-2.0-OpenSSH'"),
        ];
        for (bytes, text) in cases {
            let mut io = Buffered::new(Cursor::new(bytes.to_vec()), 64);
            let result = read_response_head(&mut io).and_then(|head| {
                let framing = head.framing(false).map_err(Error::Malformed)?;
                Body::new(&mut io, framing).read_all(100).map_err(body_error)
            });
            let err = result.expect_err("must fail");
            assert!(err.to_string().contains(text), "{bytes:?}: {err} lacks {text:?}");
        }
    }
}
