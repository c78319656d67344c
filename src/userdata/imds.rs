//! A minimal IMDSv2 client: EC2 user data over plain HTTP/1.1 on a `TcpStream`.
//!
//! The flow is IMDSv2's: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! gives a session token in the body; `GET /latest/user-data` with `X-aws-ec2-metadata-token`
//! gives the user data (200), or 404 when the instance has none. Any other status is an error
//! naming the step.
//!
//! Why hand-rolled: IMDS is a link-local plain-HTTP endpoint, and one request/response pair per
//! connection (`Connection: close`) is all it takes; an HTTP crate would be most of the binary's
//! growth for two requests.
//!
//! Bounds: each request (connect, send, whole response) must finish within the timeout;
//! response headers are capped at 16 KiB and bodies at [`MAX_BYTES`]. Bodies are framed by
//! `Content-Length`, `Transfer-Encoding: chunked`, or the end of the connection. Failures to
//! connect, and connections closed before any response byte, are retried (3 attempts in all
//! by default, with a short linear backoff); timeouts are not retried, since a metadata service
//! that accepts and stays silent would only cost the timeout again. No redirects, no 1xx
//! responses, no keep-alive, no proxies, no TLS.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use super::{Error, MAX_BYTES};

/// IMDS's address on EC2.
pub const IMDS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80));

/// Time allowed for each request (connect to last body byte).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Session token lifetime asked for, in seconds (IMDS's maximum, 6 hours).
const TOKEN_TTL_SECONDS: u32 = 21600;

/// The most response-header bytes accepted.
const MAX_HEAD: usize = 16 * 1024;

/// The two requests of the IMDSv2 flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImdsStep {
    Token,
    UserData,
}

impl ImdsStep {
    fn method(self) -> &'static str {
        match self {
            ImdsStep::Token => "PUT",
            ImdsStep::UserData => "GET",
        }
    }

    fn path(self) -> &'static str {
        match self {
            ImdsStep::Token => "/latest/api/token",
            ImdsStep::UserData => "/latest/user-data",
        }
    }
}

impl fmt::Display for ImdsStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.path())
    }
}

/// An IMDSv2 client. [`Imds::new`] gives production defaults; the fields are public so tests
/// (and callers with unusual networks) can shorten the backoff or change the attempts.
#[derive(Debug, Clone)]
pub struct Imds {
    pub addr: SocketAddr,
    /// Time allowed for each request, from connect to the last body byte.
    pub timeout: Duration,
    /// Connection attempts per request (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; the n-th retry waits n times this.
    pub backoff: Duration,
}

/// Fetch EC2 user data through IMDSv2 at `base` (production: [`IMDS_ADDR`]).
///
/// `Ok(None)` when IMDS answers 404: the instance has no user data.
pub fn from_imds(base: SocketAddr, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
    Imds::new(base, timeout).user_data()
}

/// A parsed response.
#[derive(Debug)]
struct Response {
    status: u16,
    reason: String,
    body: Vec<u8>,
}

/// How one request attempt failed.
#[derive(Debug)]
enum Failure {
    /// Nothing was received: connecting failed or the connection closed first. Worth retrying.
    Retryable(io::Error),
    Timeout,
    Io(io::Error),
    Malformed(String),
}

impl Imds {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Imds {
        Imds { addr, timeout, attempts: 3, backoff: Duration::from_millis(100) }
    }

    /// Get a session token, then the user data with it.
    pub fn user_data(&self) -> Result<Option<Vec<u8>>, Error> {
        let token = self.token()?;
        let step = ImdsStep::UserData;
        let resp = self.request(step, &[("X-aws-ec2-metadata-token", &token)])?;
        match resp.status {
            200 => Ok(Some(resp.body)),
            404 => Ok(None),
            _ => Err(self.status_error(step, resp)),
        }
    }

    fn token(&self) -> Result<String, Error> {
        let step = ImdsStep::Token;
        let ttl = TOKEN_TTL_SECONDS.to_string();
        let resp = self.request(step, &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)])?;
        if resp.status != 200 {
            return Err(self.status_error(step, resp));
        }
        let problem = match std::str::from_utf8(&resp.body).map(str::trim) {
            Ok("") => "the token in the response is empty",
            Ok(t) if t.bytes().all(|b| b.is_ascii_graphic()) => return Ok(t.to_string()),
            _ => "the token has characters not allowed in an HTTP header",
        };
        Err(Error::ImdsResponse { addr: self.addr, step, problem: problem.to_string() })
    }

    fn status_error(&self, step: ImdsStep, resp: Response) -> Error {
        Error::ImdsStatus { addr: self.addr, step, status: resp.status, reason: resp.reason }
    }

    /// One step's request, retried on connection failures.
    fn request(&self, step: ImdsStep, headers: &[(&str, &str)]) -> Result<Response, Error> {
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        let failure = loop {
            match self.once(step, headers) {
                Ok(resp) => return Ok(resp),
                Err(Failure::Retryable(e)) if attempt < attempts => {
                    log::debug!("IMDS {step}: attempt {attempt} of {attempts} failed: {e}");
                    std::thread::sleep(self.backoff * attempt);
                    attempt += 1;
                }
                Err(failure) => break failure,
            }
        };
        let addr = self.addr;
        Err(match failure {
            Failure::Retryable(cause) => Error::ImdsUnreachable { addr, step, attempts, cause },
            Failure::Timeout => Error::ImdsTimeout { addr, step, after: self.timeout },
            Failure::Io(cause) => Error::ImdsIo { addr, step, cause },
            Failure::Malformed(problem) => Error::ImdsResponse { addr, step, problem },
        })
    }

    /// One connection: send the request, read one whole response, all before the deadline.
    fn once(&self, step: ImdsStep, headers: &[(&str, &str)]) -> Result<Response, Failure> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(Failure::Retryable)?;

        let mut req = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            step.method(),
            step.path(),
            self.addr
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if step.method() == "PUT" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        stream.set_write_timeout(Some(time_left(deadline)?)).map_err(Failure::Io)?;
        stream.write_all(req.as_bytes()).map_err(|e| match e {
            e if is_timeout(&e) => Failure::Timeout,
            e => Failure::Retryable(e),
        })?;

        let mut buf = Vec::new();
        let mut head: Option<Head> = None;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            stream.set_read_timeout(Some(time_left(deadline)?)).map_err(Failure::Io)?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => return Err(Failure::Timeout),
                Err(e) if buf.is_empty() => return Err(Failure::Retryable(e)),
                Err(e) => return Err(Failure::Io(e)),
            };
            let eof = n == 0;
            buf.extend_from_slice(&chunk[..n]);
            if head.is_none() {
                head = parse_head(&buf)?;
            }
            let Some(h) = &head else {
                if !eof {
                    continue;
                }
                return Err(if buf.is_empty() {
                    Failure::Retryable(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before any response",
                    ))
                } else {
                    Failure::Malformed("connection closed inside the response headers".into())
                });
            };
            match body(h.framing, &buf[h.len..], eof)? {
                Some(body) => return Ok(Response { status: h.status, reason: h.reason.clone(), body }),
                None if eof => return Err(Failure::Malformed("response ended early".into())),
                None => {}
            }
        }
    }
}

fn time_left(deadline: Instant) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Failure::Timeout)
    } else {
        Ok(left)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    ToEof,
}

/// A parsed status line and headers; `len` counts the bytes up to the body.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    reason: String,
    framing: Framing,
    len: usize,
}

fn too_large() -> Failure {
    Failure::Malformed(format!("response body is larger than {MAX_BYTES} bytes"))
}

/// Parse the response head once `buf` holds all of it (`Ok(None)` until then).
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Failure> {
    let end = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) if end <= MAX_HEAD => end,
        None if buf.len() <= MAX_HEAD => return Ok(None),
        _ => return Err(Failure::Malformed(format!("response headers are longer than {MAX_HEAD} bytes"))),
    };
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| Failure::Malformed("response headers are not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let bad_status = || {
        let shown: String = status_line.chars().take(80).collect();
        Failure::Malformed(format!("not an HTTP/1.x status line: {shown:?}"))
    };
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(bad_status());
    }
    let status = match parts.next() {
        Some(code) if code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) => {
            code.parse::<u16>().map_err(|_| bad_status())?
        }
        _ => return Err(bad_status()),
    };
    if !(200..=599).contains(&status) {
        return Err(Failure::Malformed(format!("unexpected status {status}")));
    }
    let reason = parts.next().unwrap_or_default().trim().to_string();

    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            let shown: String = line.chars().take(80).collect();
            return Err(Failure::Malformed(format!("bad header line {shown:?}")));
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| Failure::Malformed(format!("bad Content-Length {value:?}")))?;
            if length.is_some_and(|old| old != n) {
                return Err(Failure::Malformed("conflicting Content-Length headers".into()));
            }
            length = Some(n);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            for coding in value.split(',').map(str::trim) {
                if coding.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if !coding.eq_ignore_ascii_case("identity") {
                    return Err(Failure::Malformed(format!("unsupported Transfer-Encoding {value:?}")));
                }
            }
        }
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) if n > MAX_BYTES => return Err(too_large()),
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::ToEof,
    };
    Ok(Some(Head { status, reason, framing, len: end + 4 }))
}

/// The body, once `rest` (everything after the head) holds all of it.
fn body(framing: Framing, rest: &[u8], eof: bool) -> Result<Option<Vec<u8>>, Failure> {
    match framing {
        Framing::Length(n) if rest.len() >= n => Ok(Some(rest[..n].to_vec())),
        Framing::Length(n) if eof => {
            Err(Failure::Malformed(format!("body ended after {} of {n} bytes", rest.len())))
        }
        Framing::Length(_) => Ok(None),
        Framing::ToEof if rest.len() > MAX_BYTES => Err(too_large()),
        Framing::ToEof => Ok(eof.then(|| rest.to_vec())),
        Framing::Chunked => match dechunk(rest)? {
            Some(body) => Ok(Some(body)),
            None if eof => Err(Failure::Malformed("chunked body ended early".into())),
            // Chunk framing costs a few bytes per chunk; a body needing this much is abuse.
            None if rest.len() > 2 * MAX_BYTES + MAX_HEAD => Err(too_large()),
            None => Ok(None),
        },
    }
}

/// Decode a chunked body; `Ok(None)` while incomplete.
fn dechunk(data: &[u8]) -> Result<Option<Vec<u8>>, Failure> {
    let crlf = |from: usize| {
        data.get(from..).and_then(|d| d.windows(2).position(|w| w == b"\r\n")).map(|i| from + i)
    };
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = crlf(pos) else {
            return Ok(None);
        };
        let line = &data[pos..eol];
        let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size_text)
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 8)
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| {
                let shown = String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned();
                Failure::Malformed(format!("bad chunk size line {shown:?}"))
            })?;
        pos = eol + 2;
        if size == 0 {
            // Trailer fields, if any, end with an empty line.
            loop {
                let Some(eol) = crlf(pos) else {
                    return Ok(None);
                };
                if eol == pos {
                    return Ok(Some(out));
                }
                pos = eol + 2;
            }
        }
        if out.len() + size > MAX_BYTES {
            return Err(too_large());
        }
        let Some(chunk) = data.get(pos..pos + size) else {
            return Ok(None);
        };
        match data.get(pos + size..pos + size + 2) {
            None | Some(b"\r") => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err(Failure::Malformed("chunk not followed by CRLF".into())),
        }
        out.extend_from_slice(chunk);
        pos += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userdata::tests::TempDir;
    use crate::userdata::{fetch, Source};
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A request the test server received; header names lowercased.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }
    }

    /// What the test server does with a request.
    enum Reply {
        Send(Vec<u8>),
        /// Keep the connection open and say nothing until the client gives up.
        Hang,
        /// Close the connection without a response.
        Close,
    }

    struct Server {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Server {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("request log").clone()
        }

        fn client(&self, timeout_ms: u64) -> Imds {
            Imds {
                backoff: Duration::from_millis(1),
                ..Imds::new(self.addr, Duration::from_millis(timeout_ms))
            }
        }
    }

    /// A real HTTP server on 127.0.0.1; `handler(connection_index, request)` decides the reply.
    fn serve<F>(handler: F) -> Server
    where
        F: Fn(usize, &Seen) -> Reply + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::Builder::new()
            .name("imds-test-server".into())
            .spawn(move || {
                for (i, conn) in listener.incoming().enumerate() {
                    let Ok(mut stream) = conn else { continue };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let Some(req) = read_request(&stream) else {
                        continue;
                    };
                    let reply = handler(i, &req);
                    log.lock().expect("request log").push(req);
                    match reply {
                        Reply::Send(bytes) => {
                            let _ = stream.write_all(&bytes);
                        }
                        Reply::Hang => {
                            let mut sink = [0u8; 64];
                            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                        }
                        Reply::Close => {}
                    }
                }
            })
            .expect("spawn test server");
        Server { addr, seen }
    }

    fn read_request(stream: &TcpStream) -> Option<Seen> {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let mut words = line.split_whitespace();
        let (method, path) = (words.next()?.to_string(), words.next()?.to_string());
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let Some((name, value)) = line.trim_end().split_once(':') else {
                break;
            };
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        Some(Seen { method, path, headers })
    }

    fn respond(status: u16, reason: &str, body: &[u8]) -> Reply {
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        Reply::Send(out)
    }

    const TOKEN: &str = "AQAEAFtest-token==";

    /// IMDSv2 as EC2 does it: issues `issued` as the token, accepts only [`TOKEN`].
    fn imds_flow(req: &Seen, issued: &str, user_data: Option<&[u8]>) -> Reply {
        match (req.method.as_str(), req.path.as_str()) {
            ("PUT", "/latest/api/token") => {
                let ttl = req.header("x-aws-ec2-metadata-token-ttl-seconds");
                match ttl.and_then(|v| v.parse::<u32>().ok()) {
                    Some(1..=21600) => respond(200, "OK", issued.as_bytes()),
                    _ => respond(400, "Missing or Invalid Parameters", b""),
                }
            }
            ("GET", "/latest/user-data") if req.header("x-aws-ec2-metadata-token") != Some(TOKEN) => {
                respond(401, "Unauthorized", b"")
            }
            ("GET", "/latest/user-data") => match user_data {
                Some(data) => respond(200, "OK", data),
                None => respond(404, "Not Found", b""),
            },
            _ => respond(404, "Not Found", b""),
        }
    }

    const USER_DATA: &[u8] = b"[settings.network]\nhostname = \"node1\"\n";

    fn ec2(user_data: Option<&'static [u8]>) -> Server {
        serve(move |_, req| imds_flow(req, TOKEN, user_data))
    }

    #[test]
    fn user_data_after_token() {
        let server = ec2(Some(USER_DATA));
        let got = server.client(2000).user_data().expect("user data");
        assert_eq!(got.as_deref(), Some(USER_DATA));
        let seen = server.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("PUT", "/latest/api/token"));
        assert_eq!(seen[0].header("x-aws-ec2-metadata-token-ttl-seconds"), Some("21600"));
        assert_eq!(seen[0].header("content-length"), Some("0"));
        assert_eq!((seen[1].method.as_str(), seen[1].path.as_str()), ("GET", "/latest/user-data"));
        assert_eq!(seen[1].header("x-aws-ec2-metadata-token"), Some(TOKEN));
        for req in &seen {
            assert_eq!(req.header("connection"), Some("close"));
            assert_eq!(req.header("host"), Some(server.addr.to_string().as_str()));
        }
    }

    #[test]
    fn not_found_means_no_user_data() {
        let server = ec2(None);
        assert_eq!(from_imds(server.addr, Duration::from_secs(2)).expect("404 is fine"), None);
    }

    #[test]
    fn server_requires_the_issued_token() {
        let server = ec2(Some(USER_DATA));
        let client = server.client(2000);
        let cases: [(&[(&str, &str)], u16); 3] = [
            (&[], 401),
            (&[("X-aws-ec2-metadata-token", "forged")], 401),
            (&[("X-aws-ec2-metadata-token", TOKEN)], 200),
        ];
        for (headers, want) in cases {
            let resp = client.request(ImdsStep::UserData, headers).expect("an HTTP answer");
            assert_eq!(resp.status, want, "{headers:?}");
        }
    }

    type Handler = Box<dyn Fn(usize, &Seen) -> Reply + Send>;

    #[test]
    fn failures_name_step_and_cause() {
        let raw = |bytes: &'static [u8]| -> Handler {
            Box::new(move |_, req: &Seen| match req.method.as_str() {
                "PUT" => respond(200, "OK", TOKEN.as_bytes()),
                _ => Reply::Send(bytes.to_vec()),
            })
        };
        // (name, server behaviour, step, text the message must contain)
        let cases: Vec<(&str, Handler, ImdsStep, &str)> = vec![
            (
                "stale token",
                Box::new(|_, req: &Seen| imds_flow(req, "stale", Some(USER_DATA))),
                ImdsStep::UserData,
                "HTTP 401 Unauthorized (the session token was refused)",
            ),
            (
                "500 everywhere",
                Box::new(|_, _: &Seen| respond(500, "Internal Server Error", b"oops")),
                ImdsStep::Token,
                "PUT /latest/api/token: HTTP 500 Internal Server Error",
            ),
            (
                "503 on user data",
                raw(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"),
                ImdsStep::UserData,
                "GET /latest/user-data: HTTP 503 Service Unavailable",
            ),
            (
                "token refused",
                Box::new(|_, _: &Seen| respond(403, "Forbidden", b"")),
                ImdsStep::Token,
                "HTTP 403 Forbidden (IMDS refused to issue a token",
            ),
            (
                "empty token",
                Box::new(|_, _: &Seen| respond(200, "OK", b"\n")),
                ImdsStep::Token,
                "token in the response is empty",
            ),
            (
                "token that would inject a header",
                Box::new(|_, _: &Seen| respond(200, "OK", b"abc\r\nX-Evil: 1")),
                ImdsStep::Token,
                "not allowed in an HTTP header",
            ),
            (
                "not HTTP",
                raw(b"SSH-2.0-OpenSSH\r\n\r\n"),
                ImdsStep::UserData,
                "not an HTTP/1.x status line: \"SSH-2.0-OpenSSH\"",
            ),
            (
                "closed mid-headers",
                raw(b"HTTP/1.1 200 OK\r\nContent-Le"),
                ImdsStep::UserData,
                "closed inside the response headers",
            ),
            (
                "short body",
                raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
                ImdsStep::UserData,
                "body ended after 3 of 10 bytes",
            ),
            (
                "body over the cap",
                raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2097152\r\n\r\n"),
                ImdsStep::UserData,
                "larger than 1048576 bytes",
            ),
            (
                "compressed transfer",
                raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
                ImdsStep::UserData,
                "unsupported Transfer-Encoding",
            ),
        ];
        for (name, handler, step, want) in cases {
            let server = serve(handler);
            let err = match server.client(2000).user_data() {
                Ok(got) => panic!("{name}: got {got:?}, want an error"),
                Err(e) => e,
            };
            let msg = err.to_string();
            assert!(msg.starts_with("user data from EC2 IMDSv2 at 127.0.0.1:"), "{name}: {msg}");
            assert!(msg.contains(&step.to_string()), "{name}: {msg} lacks step {step}");
            assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn silent_server_times_out_without_retrying() {
        let cases: [(&str, Handler, ImdsStep); 2] = [
            ("silent", Box::new(|_, _: &Seen| Reply::Hang), ImdsStep::Token),
            (
                "silent on user data",
                Box::new(|_, req: &Seen| match req.method.as_str() {
                    "PUT" => respond(200, "OK", TOKEN.as_bytes()),
                    _ => Reply::Hang,
                }),
                ImdsStep::UserData,
            ),
        ];
        for (name, handler, want_step) in cases {
            let server = serve(handler);
            let err = server.client(200).user_data().expect_err("must time out");
            match &err {
                Error::ImdsTimeout { step, after, .. } => {
                    assert_eq!((*step, *after), (want_step, Duration::from_millis(200)), "{name}")
                }
                other => panic!("{name}: want a timeout, got {other:?}"),
            }
            assert!(err.to_string().contains("no complete answer within 200ms"), "{err}");
            let gets = server.seen().iter().filter(|r| r.method == "GET").count();
            assert_eq!(gets, usize::from(want_step == ImdsStep::UserData), "{name}: no retry");
        }
    }

    #[test]
    fn dropped_connections_are_retried() {
        // The first connection is closed unanswered; the retry succeeds.
        let server = serve(|i, req| match i {
            0 => Reply::Close,
            _ => imds_flow(req, TOKEN, Some(USER_DATA)),
        });
        let got = server.client(2000).user_data().expect("second attempt works");
        assert_eq!(got.as_deref(), Some(USER_DATA));
        assert_eq!(server.seen().len(), 3);

        // Always closed: give up after the configured attempts.
        let server = serve(|_, _| Reply::Close);
        let err = server.client(2000).user_data().expect_err("never answers");
        assert!(matches!(err, Error::ImdsUnreachable { step: ImdsStep::Token, attempts: 3, .. }), "{err:?}");
        assert_eq!(server.seen().len(), 3);
    }

    #[test]
    fn refused_connection_is_unreachable() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            listener.local_addr().expect("local addr")
        };
        let client = Imds {
            attempts: 2,
            backoff: Duration::from_millis(1),
            ..Imds::new(addr, Duration::from_secs(2))
        };
        let err = client.user_data().expect_err("nothing listens");
        match &err {
            Error::ImdsUnreachable { step: ImdsStep::Token, attempts: 2, cause, .. } => {
                assert_eq!(cause.kind(), io::ErrorKind::ConnectionRefused)
            }
            other => panic!("want unreachable, got {other:?}"),
        }
        assert!(err.to_string().contains("cannot connect after 2 attempt(s)"), "{err}");
    }

    #[test]
    fn body_framings() {
        let cases: [(&str, &'static [u8]); 4] = [
            ("content-length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            ("to end of stream", b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nhello"),
            (
                "chunked, extension and trailer",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n\
                  2;ext=1\r\nhe\r\n3\r\nllo\r\n0\r\nX-Trailer: 1\r\n\r\n",
            ),
            (
                "chunked with length header too",
                b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
            ),
        ];
        for (name, bytes) in cases {
            let server = serve(move |_, req| match req.method.as_str() {
                "PUT" => respond(200, "OK", TOKEN.as_bytes()),
                _ => Reply::Send(bytes.to_vec()),
            });
            let got = server.client(2000).user_data();
            match got {
                Ok(Some(body)) => assert_eq!(body, b"hello", "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    /// (name, input, expected outcome: complete, incomplete, or an error containing the text).
    type Case<'a, T> = (&'a str, &'a [u8], Result<Option<T>, &'a str>);

    #[test]
    fn dechunk_table() {
        let big = format!("{:x}\r\n", MAX_BYTES + 1);
        let cases: [Case<&[u8]>; 9] = [
            ("empty", b"", Ok(None)),
            ("only size", b"5\r\n", Ok(None)),
            ("data without CRLF", b"5\r\nhello", Ok(None)),
            ("half CRLF", b"5\r\nhello\r", Ok(None)),
            ("no final empty line", b"0\r\n", Ok(None)),
            ("complete", b"5\r\nhello\r\n0\r\n\r\n", Ok(Some(b"hello"))),
            ("bad size", b"zz\r\n", Err("bad chunk size line \"zz\"")),
            ("missing CRLF", b"2\r\nhello\r\n", Err("chunk not followed by CRLF")),
            ("over the cap", big.as_bytes(), Err("larger than 1048576")),
        ];
        for (name, input, want) in cases {
            match (dechunk(input), want) {
                (Ok(got), Ok(want)) => assert_eq!(got.as_deref(), want, "{name}"),
                (Err(Failure::Malformed(msg)), Err(want)) => {
                    assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}")
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn parse_head_table() {
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let cases: [Case<(u16, Framing)>; 9] = [
            ("incomplete", b"HTTP/1.1 200 OK\r\n", Ok(None)),
            ("minimal", b"HTTP/1.1 404 \r\n\r\n", Ok(Some((404, Framing::ToEof)))),
            (
                "length",
                b"HTTP/1.1 200 OK\r\ncontent-length:  7 \r\n\r\nrest",
                Ok(Some((200, Framing::Length(7)))),
            ),
            ("HTTP/2", b"HTTP/2 200 OK\r\n\r\n", Err("not an HTTP/1.x status line")),
            ("bad code", b"HTTP/1.1 2000 OK\r\n\r\n", Err("not an HTTP/1.x status line")),
            ("informational", b"HTTP/1.1 100 Continue\r\n\r\n", Err("unexpected status 100")),
            (
                "conflicting lengths",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                Err("conflicting Content-Length"),
            ),
            ("header without colon", b"HTTP/1.1 200 OK\r\nnonsense\r\n\r\n", Err("bad header line")),
            ("too long", long.as_bytes(), Err("longer than 16384 bytes")),
        ];
        for (name, input, want) in cases {
            match (parse_head(input), want) {
                (Ok(got), Ok(want)) => {
                    assert_eq!(got.map(|h| (h.status, h.framing)), want, "{name}")
                }
                (Err(Failure::Malformed(msg)), Err(want)) => {
                    assert!(msg.contains(want), "{name}: {msg:?} lacks {want:?}")
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn fetch_asks_imds_last() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(USER_DATA).expect("gzip into memory");
        let gz: &'static [u8] = gz.finish().expect("gzip into memory").leak();
        let server = ec2(Some(gz));
        let sys = TempDir::new("imds-sys");

        let got = fetch(&sys.0, None, Some(server.addr)).expect("IMDS data").expect("some");
        assert_eq!((got.source, got.raw_len), (Source::Imds, gz.len()));
        assert_eq!(got.settings, serde_json::json!({"network": {"hostname": "node1"}}));

        // With boot-partition data present, IMDS is not asked at all.
        let boot = TempDir::new("imds-boot");
        boot.write("user-data.toml", b"");
        let asked = server.seen().len();
        let got = fetch(&sys.0, Some(&boot.0), Some(server.addr)).expect("boot").expect("some");
        assert_eq!(got.source, Source::BootPartition);
        assert_eq!(server.seen().len(), asked);

        // An IMDS failure is an error, not "no user data".
        let err =
            fetch(&sys.0, None, Some(serve(|_, _| respond(500, "", b"")).addr)).expect_err("500 is an error");
        assert!(matches!(err, Error::ImdsStatus { status: 500, .. }), "{err:?}");
    }
}
