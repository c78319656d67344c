//! A small HTTP/1.1 server on a Unix socket, generic over one handler function.
//!
//! What: [`serve`] accepts connections on a [`UnixListener`] and runs each on its own named
//! thread (`api-conn`, small stack), reading requests with [`parse_head`] (a pure, incremental
//! parser) and answering each with one `write` of a [`Response`] built by the handler.
//! Connections persist (HTTP/1.1 keep-alive; `Connection: close` honoured; HTTP/1.0 only with
//! `Connection: keep-alive`).
//!
//! Why not tiny_http: it cannot time out slow or half-open clients nor bound the number of
//! connections on a Unix socket, and the API server of PID 1 must do both: one stuck client
//! must never hold the settings API hostage.
//!
//! Limits ([`Limits`]), and what a client gets when it breaks one (the JSON body is
//! `{"status": N, "error": "..."}`; the connection is closed after each of these but 500):
//!
//! | status | when |
//! | --- | --- |
//! | 400 | malformed request line or header line, obsolete line folding, a non-numeric or disagreeing `Content-Length`, a bad `%` escape or non-UTF-8 in the query or a header value |
//! | 408 | a request started but not complete within `read_timeout` (whole-request deadline) |
//! | 411 | any `Transfer-Encoding` in a request |
//! | 413 | `Content-Length` over `max_body_bytes`: answered before any of the body is read |
//! | 417 | an `Expect` other than `100-continue` |
//! | 431 | request line plus headers over `max_header_bytes` |
//! | 503 | `max_connections` already open: the new connection is answered and closed at once |
//! | 505 | an HTTP version other than 1.x |
//! | 500 | the handler panicked (logged; the connection stays usable) |
//!
//! Request bodies are framed by `Content-Length` only. `Transfer-Encoding: chunked` gets 411
//! (Length Required) rather than 501: every client of this API sends a small JSON document whose
//! length it knows, 411 tells it exactly what to do instead, and refusing transfer codings
//! outright leaves no `Transfer-Encoding`/`Content-Length` ambiguity to smuggle requests through.
//! Responses are never chunked either: each carries `Content-Length` (except 204 and 304).
//!
//! Other deliberate limits: only origin-form targets (`/path?query`) are accepted; the path is
//! passed on as sent (not percent-decoded, so `%2F` cannot turn into a path separator); the query
//! is percent-decoded with `+` as space; `Host` is not required (there is no virtual hosting on
//! a Unix socket); the answer to a `HEAD` request is sent without its body (the handler sees
//! the method and decides the rest).
//!
//! Idle keep-alive connections are closed silently after `read_timeout`; a request that has
//! begun must be complete (head and body) within `read_timeout` of its first byte, or gets 408.
//! Both free the connection's slot. After an error answer the server stops writing and reads
//! (and discards) what the client still sends for at most `read_timeout`, so the client reads
//! the answer instead of a reset.
//!
//! Stopping: the `stop` flag is checked only between accepts, so whoever sets it should then
//! connect to the socket once to wake the accept loop. Open connections are not joined: each
//! answers the request it is on with `Connection: close`, and idle ones close within
//! `read_timeout`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// What serves every request: a pure function of the request, shared by all connections.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Stack of each connection thread. Handlers parse JSON (serde_json stops at depth 128); the
/// test `nested_json_fits_in_connection_stack` checks that this is enough even in debug builds.
const CONN_STACK_BYTES: usize = 256 * 1024;
/// First size of a connection's read buffer; it grows up to `max_header_bytes + 1`.
const INITIAL_BUFFER: usize = 4096;
/// Bodies are read in pieces of at most this size, so a client that only announces a large
/// body does not make the server allocate all of it.
const BODY_CHUNK: usize = 64 * 1024;
/// After an error answer, at most this much more is read and discarded before closing.
const LINGER_BYTES: usize = 1024 * 1024;
/// A connection's response buffer is released after a response larger than this.
const KEEP_OUT_BUFFER: usize = 256 * 1024;

/// A complete request, as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// The method token, as sent (methods are case-sensitive).
    pub method: String,
    /// The path, without the query, not percent-decoded.
    pub path: String,
    /// The query's `name=value` pairs in order, percent-decoded, `+` as space.
    pub query: Vec<(String, String)>,
    /// The headers in order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes; empty without one).
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the first query parameter called `name`.
    pub fn query_get(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of the first header called `name` (any case).
    // Part of the handler's API; no route reads a header yet.
    #[allow(dead_code)]
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// What the handler answers. `content_type` empty means no `Content-Type` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON document.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response { status, content_type: "application/json", body },
            // A `Value` always serializes; this only keeps the server from trusting that.
            Err(e) => Response::error(500, &format!("cannot serialize the response: {e}")),
        }
    }

    /// No body at all (for 204, or an empty answer with any other status).
    pub fn empty(status: u16) -> Response {
        Response { status, content_type: "", body: Vec::new() }
    }

    /// Plain UTF-8 text.
    // Part of the handler's API; no route answers with text yet.
    #[allow(dead_code)]
    pub fn text(status: u16, body: String) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into_bytes() }
    }

    /// The API's error document: `{"status": <status>, "error": "<message>"}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "status": status, "error": message }))
    }
}

/// Bounds on what one client may cost the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus headers plus the blank line, in bytes (431 over it).
    pub max_header_bytes: usize,
    /// `Content-Length` of a request body (413 over it).
    pub max_body_bytes: usize,
    /// Whole-request deadline from the request's first byte (408 past it), and how long an idle
    /// keep-alive connection is kept (closed silently past it). Also the write timeout.
    pub read_timeout: Duration,
    /// Connections served at once (503 for the next one).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            read_timeout: Duration::from_secs(5),
            max_connections: 32,
        }
    }
}

/// Why a request cannot be served; each maps to one status ([`HttpError::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// 400: the request is malformed; the text says where.
    BadRequest(String),
    /// 408: the request was not complete within the deadline.
    Timeout,
    /// 411: the request uses a `Transfer-Encoding` (only `Content-Length` is supported).
    LengthRequired,
    /// 413: `Content-Length` is over the limit.
    BodyTooLarge { max: usize },
    /// 417: an `Expect` other than `100-continue`.
    ExpectationFailed(String),
    /// 431: the header section is over the limit.
    HeadersTooLarge { max: usize },
    /// 505: an HTTP version other than 1.x.
    VersionNotSupported(String),
}

impl HttpError {
    /// The status code answered for this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::Timeout => 408,
            HttpError::LengthRequired => 411,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::ExpectationFailed(_) => 417,
            HttpError::HeadersTooLarge { .. } => 431,
            HttpError::VersionNotSupported(_) => 505,
        }
    }

    fn bad(message: impl Into<String>) -> HttpError {
        HttpError::BadRequest(message.into())
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadRequest(m) => write!(f, "bad request: {m}"),
            HttpError::Timeout => write!(f, "the request was not complete in time"),
            HttpError::LengthRequired => {
                write!(f, "Transfer-Encoding is not supported: send the body with a Content-Length")
            }
            HttpError::BodyTooLarge { max } => {
                write!(f, "the request body is larger than the limit of {max} bytes")
            }
            HttpError::ExpectationFailed(v) => {
                write!(f, "unsupported Expect '{v}': only 100-continue is supported")
            }
            HttpError::HeadersTooLarge { max } => {
                write!(f, "the request line and headers are larger than the limit of {max} bytes")
            }
            HttpError::VersionNotSupported(v) => {
                write!(f, "HTTP version '{v}' is not supported: use HTTP/1.1")
            }
        }
    }
}

impl std::error::Error for HttpError {}

/// A parsed request head: everything but the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1 (and later 1.x, answered as 1.1).
    pub http_minor: u8,
    /// Body length from `Content-Length` (0 without one); at most `max_body_bytes`.
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// Parse a request head from the start of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((head, n)))`: the head is `buf[..n]` and the body
/// (`head.content_length` bytes) starts at `buf[n]`. A malformed request line is rejected as soon
/// as it is complete, without waiting for the headers. Empty lines before the request line are
/// skipped (RFC 9112 §2.2) but count toward `max_header_bytes`; lines may end in CRLF or LF.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(Head, usize)>, HttpError> {
    let max = limits.max_header_bytes;
    let too_large = HttpError::HeadersTooLarge { max };
    let mut start = 0;
    loop {
        let rest = &buf[start..];
        if rest.starts_with(b"\r\n") {
            start += 2;
        } else if rest.starts_with(b"\n") {
            start += 1;
        } else {
            break;
        }
    }
    let Some(end) = head_end(buf, start) else {
        // Incomplete: reject what is already certain to be wrong.
        if let Some(nl) = find_newline(buf, start) {
            parse_request_line(trim_cr(&buf[start..nl]))?;
        }
        return if buf.len() > max { Err(too_large) } else { Ok(None) };
    };
    if end > max {
        return Err(too_large);
    }

    let mut lines = buf[start..end].split(|&b| b == b'\n').map(trim_cr).take_while(|line| !line.is_empty());
    let (method, target, http_minor) = parse_request_line(lines.next().unwrap_or_default())?;
    let mut headers = Vec::new();
    for line in lines {
        headers.push(parse_header_line(line)?);
    }

    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, parse_query(query)?),
        None => (target, Vec::new()),
    };

    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(HttpError::LengthRequired);
    }
    let content_length = content_length(&headers, limits.max_body_bytes)?;

    let mut close = false;
    let mut keep = false;
    for (_, value) in headers.iter().filter(|(n, _)| n == "connection") {
        for token in value.split(',').map(|t| t.trim_matches([' ', '\t'])) {
            close |= token.eq_ignore_ascii_case("close");
            keep |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    let keep_alive = !close && (http_minor >= 1 || keep);

    let expect_continue = match find_header(&headers, "expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => http_minor >= 1,
        Some(v) => return Err(HttpError::ExpectationFailed(v.to_string())),
    };

    let head = Head {
        method: method.to_string(),
        path: path.to_string(),
        query,
        headers,
        http_minor,
        content_length,
        keep_alive,
        expect_continue,
    };
    Ok(Some((head, end)))
}

/// Index just past the first empty line at or after `from`, if the buffer holds one.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(nl) = find_newline(buf, at) {
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => at = nl + 1,
        }
    }
    None
}

fn find_newline(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.iter().position(|&b| b == b'\n').map(|i| from + i)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// RFC 9110 `tchar`: what methods and header names are made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// `METHOD SP /target SP HTTP/1.x` → (method, target, minor version).
fn parse_request_line(line: &[u8]) -> Result<(&str, &str, u8), HttpError> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(HttpError::bad("malformed request line: expected 'METHOD /path HTTP/1.1'"));
    };
    if !is_token(method) {
        return Err(HttpError::bad("malformed request line: invalid method token"));
    }
    if !target.starts_with(b"/") || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(HttpError::bad(
            "malformed request line: the target must be a path starting with '/' without spaces or control characters",
        ));
    }
    let minor = match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if *major != b'1' {
                return Err(HttpError::VersionNotSupported(String::from_utf8_lossy(version).into_owned()));
            }
            (minor - b'0').min(1)
        }
        _ => return Err(HttpError::bad("malformed request line: invalid HTTP version")),
    };
    // Both parts were checked to be ASCII above.
    let method = std::str::from_utf8(method).map_err(|_| HttpError::bad("invalid method"))?;
    let target = std::str::from_utf8(target).map_err(|_| HttpError::bad("invalid target"))?;
    Ok((method, target, minor))
}

/// `name: value` → (lowercased name, trimmed value).
fn parse_header_line(line: &[u8]) -> Result<(String, String), HttpError> {
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return Err(HttpError::bad("obsolete header line folding is not supported"));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(HttpError::bad(format!("malformed header line without a colon: '{}'", printable(line))));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(HttpError::bad(format!("invalid header name '{}'", printable(name))));
    }
    let name = String::from_utf8_lossy(name).to_ascii_lowercase();
    let value = trim_ows(value);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(HttpError::bad(format!("control character in the value of header '{name}'")));
    }
    let Ok(value) = std::str::from_utf8(value) else {
        return Err(HttpError::bad(format!("the value of header '{name}' is not valid UTF-8")));
    };
    Ok((name, value.to_string()))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// At most 40 characters of `bytes`, for an error message.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(40).map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The body length: every `Content-Length` (each maybe a list) must be digits and agree.
fn content_length(headers: &[(String, String)], max: usize) -> Result<usize, HttpError> {
    let mut length: Option<u64> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        for item in value.split(',').map(|v| v.trim_matches([' ', '\t'])) {
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::bad(format!("invalid Content-Length '{item}'")));
            }
            // All digits: it only fails to parse when it overflows, which is over any limit.
            let n = item.parse::<u64>().unwrap_or(u64::MAX);
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::bad("Content-Length headers disagree"));
            }
            length = Some(n);
        }
    }
    match length {
        None => Ok(0),
        Some(n) => match usize::try_from(n) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(HttpError::BodyTooLarge { max }),
        },
    }
}

/// `a=1&b=x+y&c` → [("a","1"), ("b","x y"), ("c","")].
fn parse_query(query: &str) -> Result<Vec<(String, String)>, HttpError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

/// Decode `%XX` escapes and `+` (space); the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, HttpError> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex);
                let lo = bytes.get(i + 2).copied().and_then(hex);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(HttpError::bad(format!(
                        "invalid percent escape in query '{}'",
                        printable(bytes)
                    )));
                };
                out.push(hi << 4 | lo);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| HttpError::bad(format!("query '{}' is not valid UTF-8 once decoded", printable(bytes))))
}

/// Serve `listener` until `stop` is set; see the module docs.
///
/// Never returns an error: accept failures are logged (and, when out of descriptors, waited out
/// briefly) and the loop goes on. The flag is checked after each accept, so whoever sets it should
/// connect once to wake this loop. The listener is switched to blocking mode.
pub fn serve(listener: UnixListener, limits: Limits, handler: Handler, stop: Arc<AtomicBool>) {
    if let Err(e) = listener.set_nonblocking(false) {
        log::warn!("api: cannot make the listener blocking: {e}");
    }
    let limits = Arc::new(limits);
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                log::warn!("api: accept failed: {e}");
                let exhausted = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
                if e.raw_os_error().is_some_and(|n| exhausted.contains(&n)) {
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            reject_busy(stream);
            continue;
        }
        let slot = Slot(Arc::clone(&active));
        let (limits, handler, stop) = (Arc::clone(&limits), Arc::clone(&handler), Arc::clone(&stop));
        let spawned = thread::Builder::new().name("api-conn".to_string()).stack_size(CONN_STACK_BYTES).spawn(
            move || {
                let mut conn = Conn::new(stream, &limits);
                conn.run(&handler, &stop);
                // Free the slot before the client can see the connection close, so a client that
                // reconnects after reading to the end is never refused for its own old slot.
                drop(slot);
                drop(conn);
            },
        );
        if let Err(e) = spawned {
            // The closure (stream and slot) is dropped: the client sees the connection close.
            log::error!("api: cannot start a connection thread: {e}");
        }
    }
}

/// One counted connection; dropping it frees the place.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answer 503 without ever blocking the accept loop: non-blocking write, drain, close.
fn reject_busy(mut stream: UnixStream) {
    log::warn!("api: too many connections, refusing one with 503");
    let mut out = Vec::new();
    let response = Response::error(503, "too many connections: retry shortly");
    encode_response(&mut out, &response, false, ConnectionHeader::Close);
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = stream.write(&out);
    let _ = stream.shutdown(Shutdown::Write);
    // Consume what the client already sent, so the close does not reset the connection.
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionHeader {
    /// No `Connection` header (HTTP/1.1 keep-alive).
    None,
    Close,
    /// `Connection: keep-alive`, for an HTTP/1.0 client that asked for it.
    KeepAlive,
}

/// One connection's state: its socket, the bytes read but not yet used, the output buffer.
struct Conn<'a> {
    stream: UnixStream,
    limits: &'a Limits,
    buf: Vec<u8>,
    filled: usize,
    out: Vec<u8>,
    /// The socket's read timeout as last set, to skip setting it again.
    timeout: Option<Duration>,
}

impl<'a> Conn<'a> {
    fn new(stream: UnixStream, limits: &'a Limits) -> Conn<'a> {
        Conn { stream, limits, buf: vec![0; INITIAL_BUFFER], filled: 0, out: Vec::new(), timeout: None }
    }

    /// `read_timeout`, but never zero (a zero socket timeout is an error).
    fn read_timeout(&self) -> Duration {
        self.limits.read_timeout.max(Duration::from_millis(1))
    }

    fn run(&mut self, handler: &Handler, stop: &AtomicBool) {
        if let Err(e) = self.stream.set_write_timeout(Some(self.read_timeout())) {
            log::warn!("api: cannot set a write timeout: {e}");
            return;
        }
        loop {
            let (head, body) = match self.read_request() {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(e) => return self.fail(&e),
            };
            let keep_alive = head.keep_alive && !stop.load(Ordering::Relaxed);
            let connection = match (keep_alive, head.http_minor) {
                (false, _) => ConnectionHeader::Close,
                (true, 0) => ConnectionHeader::KeepAlive,
                (true, _) => ConnectionHeader::None,
            };
            let request = Request {
                method: head.method,
                path: head.path,
                query: head.query,
                headers: head.headers,
                body,
            };
            let response = call_handler(handler, &request);
            self.out.clear();
            encode_response(&mut self.out, &response, request.method == "HEAD", connection);
            if let Err(e) = self.stream.write_all(&self.out) {
                log::debug!("api: cannot write a response: {e}");
                return;
            }
            if self.out.capacity() > KEEP_OUT_BUFFER {
                self.out = Vec::new();
            }
            if !keep_alive {
                return;
            }
        }
    }

    /// Answer `error`, then read what the client still sends for a while before closing.
    fn fail(&mut self, error: &HttpError) {
        log::debug!("api: {error}");
        self.out.clear();
        let response = Response::error(error.status(), &error.to_string());
        encode_response(&mut self.out, &response, false, ConnectionHeader::Close);
        if self.stream.write_all(&self.out).is_err() || *error == HttpError::Timeout {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + self.read_timeout();
        let mut budget = LINGER_BYTES;
        while budget > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.set_read_timeout(left).is_err() {
                return;
            }
            match self.stream.read(&mut self.buf) {
                Ok(0) => return,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        if self.timeout != Some(timeout) {
            self.stream.set_read_timeout(Some(timeout))?;
            self.timeout = Some(timeout);
        }
        Ok(())
    }

    /// Read the next request. `Ok(None)`: the connection is over (closed by the client, idle too
    /// long, or broken) and gets no answer.
    fn read_request(&mut self) -> Result<Option<(Head, Vec<u8>)>, HttpError> {
        let full = self.read_timeout();
        // Bytes of this request already here (pipelined): its deadline runs from now.
        let mut deadline = (self.filled > 0).then(|| Instant::now() + full);
        let mut parse = self.filled > 0;
        loop {
            if parse {
                if let Some((head, used)) = parse_head(&self.buf[..self.filled], self.limits)? {
                    let deadline = deadline.unwrap_or_else(|| Instant::now() + full);
                    return Ok(self.read_body(&head, used, deadline)?.map(|body| (head, body)));
                }
            }
            if self.filled == self.buf.len() {
                let cap = self.limits.max_header_bytes.saturating_add(1);
                if self.buf.len() >= cap {
                    return Err(HttpError::HeadersTooLarge { max: self.limits.max_header_bytes });
                }
                let grown = self.buf.len().saturating_mul(2).min(cap);
                self.buf.resize(grown, 0);
            }
            let wait = match deadline {
                None => full,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(HttpError::Timeout);
                    }
                    left
                }
            };
            if self.set_read_timeout(wait).is_err() {
                return Ok(None);
            }
            match self.stream.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    deadline.get_or_insert_with(|| Instant::now() + full);
                    let new = &self.buf[self.filled..self.filled + n];
                    // The head can only end, and the request line only be judged, at a newline.
                    parse = new.contains(&b'\n') || self.filled + n > self.limits.max_header_bytes;
                    self.filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => parse = false,
                Err(e) if is_timeout(&e) => {
                    return match deadline {
                        Some(_) => Err(HttpError::Timeout),
                        None => Ok(None),
                    }
                }
                Err(e) => {
                    log::debug!("api: read failed: {e}");
                    return Ok(None);
                }
            }
        }
    }

    /// Take the body that follows a head of `used` bytes; `Ok(None)` if the client went away.
    fn read_body(
        &mut self,
        head: &Head,
        used: usize,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, HttpError> {
        let want = head.content_length;
        let here = (self.filled - used).min(want);
        let mut body = Vec::with_capacity(here);
        body.extend_from_slice(&self.buf[used..used + here]);
        self.buf.copy_within(used + here..self.filled, 0);
        self.filled -= used + here;
        if body.len() == want {
            return Ok(Some(body));
        }
        if head.expect_continue && self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return Ok(None);
        }
        let mut got = body.len();
        while got < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HttpError::Timeout);
            }
            if self.set_read_timeout(left).is_err() {
                return Ok(None);
            }
            body.resize(want.min(got + BODY_CHUNK), 0);
            match self.stream.read(&mut body[got..]) {
                Ok(0) => return Ok(None),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(HttpError::Timeout),
                Err(e) => {
                    log::debug!("api: read failed: {e}");
                    return Ok(None);
                }
            }
        }
        body.truncate(got);
        Ok(Some(body))
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Run the handler; a panic becomes a logged 500, and a status it may not send becomes 500 too.
fn call_handler(handler: &Handler, request: &Request) -> Response {
    match panic::catch_unwind(AssertUnwindSafe(|| handler(request))) {
        Ok(response) if (200..=599).contains(&response.status) => response,
        Ok(response) => {
            log::error!(
                "api: handler answered {} {} with invalid status {}",
                request.method,
                request.path,
                response.status
            );
            Response::error(500, "internal error: invalid response status")
        }
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            log::error!("api: handler panicked on {} {}: {message}", request.method, request.path);
            Response::error(500, "internal error: the request handler failed")
        }
    }
}

/// Append the whole response (status line, headers, body) to `out`.
fn encode_response(out: &mut Vec<u8>, response: &Response, head_only: bool, connection: ConnectionHeader) {
    let status = response.status;
    let bodiless = status == 204 || status == 304 || status < 200;
    out.reserve(160 + response.body.len());
    // Writing to a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    if !bodiless {
        if !response.content_type.is_empty() {
            let _ = write!(out, "Content-Type: {}\r\n", response.content_type);
        }
        let _ = write!(out, "Content-Length: {}\r\n", response.body.len());
    }
    match connection {
        ConnectionHeader::None => {}
        ConnectionHeader::Close => out.extend_from_slice(b"Connection: close\r\n"),
        ConnectionHeader::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless && !head_only {
        out.extend_from_slice(&response.body);
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        423 => "Locked",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{BufRead, BufReader};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    fn parse(input: &str) -> Result<Option<(Head, usize)>, HttpError> {
        parse_head(input.as_bytes(), &Limits::default())
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn parses_good_requests() {
        struct Case {
            input: &'static str,
            method: &'static str,
            path: &'static str,
            query: &'static [(&'static str, &'static str)],
            headers: &'static [(&'static str, &'static str)],
            content_length: usize,
            keep_alive: bool,
        }
        let cases = [
            Case {
                input: "GET / HTTP/1.1\r\n\r\n",
                method: "GET",
                path: "/",
                query: &[],
                headers: &[],
                content_length: 0,
                keep_alive: true,
            },
            Case {
                input: "GET /v1/settings?keys=motd&x=a+b%2Fc&flag HTTP/1.1\r\nHost: localhost\r\nAccept:application/json \r\n\r\n",
                method: "GET",
                path: "/v1/settings",
                query: &[("keys", "motd"), ("x", "a b/c"), ("flag", "")],
                headers: &[("host", "localhost"), ("accept", "application/json")],
                content_length: 0,
                keep_alive: true,
            },
            Case {
                input: "PATCH /v1/settings HTTP/1.1\r\nContent-Type: application/json\r\nCONTENT-LENGTH: 12\r\n\r\n{\"motd\":\"x\"}",
                method: "PATCH",
                path: "/v1/settings",
                query: &[],
                headers: &[("content-type", "application/json"), ("content-length", "12")],
                content_length: 12,
                keep_alive: true,
            },
            Case {
                input: "GET /a HTTP/1.1\r\nConnection: Close\r\n\r\n",
                method: "GET",
                path: "/a",
                query: &[],
                headers: &[("connection", "Close")],
                content_length: 0,
                keep_alive: false,
            },
            Case {
                input: "GET /a HTTP/1.0\r\n\r\n",
                method: "GET",
                path: "/a",
                query: &[],
                headers: &[],
                content_length: 0,
                keep_alive: false,
            },
            Case {
                input: "GET /a HTTP/1.0\r\nConnection: foo, keep-alive\r\n\r\n",
                method: "GET",
                path: "/a",
                query: &[],
                headers: &[("connection", "foo, keep-alive")],
                content_length: 0,
                keep_alive: true,
            },
            // Leading empty lines, bare LF line ends, HTTP/1.2 served as 1.1, odd method token.
            Case {
                input: "\r\n\nM-SEARCH /?%E2%9C%93=%20 HTTP/1.2\nX-Empty:\nContent-Length: 3, 3\n\nabc",
                method: "M-SEARCH",
                path: "/",
                query: &[("\u{2713}", " ")],
                headers: &[("x-empty", ""), ("content-length", "3, 3")],
                content_length: 3,
                keep_alive: true,
            },
        ];
        for case in cases {
            let (head, used) = match parse(case.input) {
                Ok(Some(parsed)) => parsed,
                other => panic!("{:?}: {other:?}", case.input),
            };
            assert_eq!(head.method, case.method, "{:?}", case.input);
            assert_eq!(head.path, case.path, "{:?}", case.input);
            assert_eq!(head.query, pairs(case.query), "{:?}", case.input);
            assert_eq!(head.headers, pairs(case.headers), "{:?}", case.input);
            assert_eq!(head.content_length, case.content_length, "{:?}", case.input);
            assert_eq!(head.keep_alive, case.keep_alive, "{:?}", case.input);
            assert_eq!(
                case.input.len() - used,
                case.content_length,
                "{:?}: the body starts right after the head",
                case.input
            );
        }
    }

    #[test]
    fn rejects_bad_requests_with_their_status() {
        let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(17000));
        let long_unfinished = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(17000));
        let cases: Vec<(&str, u16)> = vec![
            ("GET /\r\n\r\n", 400),
            ("GET  / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1 \r\n\r\n", 400),
            ("G(T / HTTP/1.1\r\n\r\n", 400),
            ("GET x HTTP/1.1\r\n\r\n", 400),
            ("GET /\x01 HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nName : x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400),
            ("GET /?a=%zz HTTP/1.1\r\n\r\n", 400),
            ("GET /?a=%4 HTTP/1.1\r\n\r\n", 400),
            ("GET /?a=%ff HTTP/1.1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
            ("GET / HTTP/1.x\r\n\r\n", 400),
            ("GET / HTTPS/1.1\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\n\r\n", 505),
            ("GET / HTTP/0.9\r\n\r\n", 505),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
            ("POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", 413),
            ("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 413),
            ("POST / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
            (&long_header, 431),
            (&long_unfinished, 431),
        ];
        for (input, status) in cases {
            match parse(input) {
                Err(e) => assert_eq!(e.status(), status, "{input:?}: {e}"),
                other => panic!("{input:?}: expected {status}, got {other:?}"),
            }
        }
    }

    #[test]
    fn incomplete_heads_need_more_bytes() {
        let full = "POST /x?a=b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        let head_len = full.len() - 2;
        for cut in 0..head_len {
            assert_eq!(parse(&full[..cut]), Ok(None), "{:?}", &full[..cut]);
        }
        let (head, used) = parse(&full[..head_len]).unwrap().unwrap();
        assert_eq!((head.content_length, used), (2, head_len));
    }

    #[test]
    fn bad_request_line_is_rejected_before_the_headers_end() {
        let err = parse("GET / HTTP/1.1 junk\r\nHost: a\r\n").unwrap_err();
        assert_eq!(err.status(), 400);
        let err = parse("GET / HTTP/3.0\r\n").unwrap_err();
        assert_eq!(err.status(), 505);
    }

    #[test]
    fn expect_continue_only_for_http11() {
        let (head, _) =
            parse("PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").unwrap().unwrap();
        assert!(head.expect_continue);
        let (head, _) =
            parse("PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n").unwrap().unwrap();
        assert!(!head.expect_continue);
    }

    #[test]
    fn request_helpers_find_first_match() {
        let request = Request {
            query: pairs(&[("a", "1"), ("a", "2")]),
            headers: pairs(&[("content-type", "application/json")]),
            ..Request::default()
        };
        assert_eq!(request.query_get("a"), Some("1"));
        assert_eq!(request.query_get("b"), None);
        assert_eq!(request.header("Content-Type"), Some("application/json"));
        assert_eq!(request.header("accept"), None);
    }

    fn encoded(response: &Response, head_only: bool, connection: ConnectionHeader) -> String {
        let mut out = Vec::new();
        encode_response(&mut out, response, head_only, connection);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encodes_responses() {
        let cases = [
            (
                encoded(&Response::text(200, "hi".into()), false, ConnectionHeader::None),
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nhi",
            ),
            (
                encoded(&Response::empty(204), false, ConnectionHeader::Close),
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            ),
            (
                encoded(&Response::empty(200), false, ConnectionHeader::KeepAlive),
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
            ),
            (
                encoded(&Response::text(200, "hi".into()), true, ConnectionHeader::None),
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\n",
            ),
            (
                encoded(&Response::error(404, "no \"x\""), false, ConnectionHeader::None),
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 33\r\n\r\n{\"error\":\"no \\\"x\\\"\",\"status\":404}",
            ),
            (
                encoded(&Response::empty(299), false, ConnectionHeader::None),
                "HTTP/1.1 299 \r\nContent-Length: 0\r\n\r\n",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn error_body_is_status_and_message() {
        let response = Response::error(400, "bad thing");
        let value: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(value, serde_json::json!({"status": 400, "error": "bad thing"}));
        assert_eq!(response.content_type, "application/json");
    }

    fn query_encode(s: &str) -> String {
        let mut out = String::new();
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    out.push(char::from(b))
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    }

    fn any_string() -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter)
    }

    fn small_limits() -> impl Strategy<Value = Limits> {
        (0usize..2048, 0usize..2048).prop_map(|(h, b)| Limits {
            max_header_bytes: h,
            max_body_bytes: b,
            ..Limits::default()
        })
    }

    proptest! {
        #[test]
        fn parse_head_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..1024),
            limits in small_limits(),
        ) {
            let _ = parse_head(&bytes, &limits);
        }

        #[test]
        fn parse_head_never_panics_on_mangled_requests(
            at in any::<prop::sample::Index>(),
            junk in prop::collection::vec(any::<u8>(), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = b"POST /a?b=%41+c HTTP/1.1\r\nContent-Length: 3\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\nabc".to_vec();
            let at = at.index(bytes.len());
            bytes.splice(at..at, junk);
            let cut = cut.index(bytes.len() + 1);
            let _ = parse_head(&bytes[..cut], &Limits::default());
        }

        #[test]
        fn valid_requests_round_trip(
            method in "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}",
            path in "/[!-><@-~]{0,30}",
            query in prop::collection::vec((any_string(), any_string()), 0..4),
            headers in prop::collection::vec(("X-[0-9A-Za-z]{1,10}", "([!-~]([ \t!-~]{0,20}[!-~])?)?"), 0..4),
            body in prop::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut text = format!("{method} {path}");
            let encoded: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{}={}", query_encode(k), query_encode(v)))
                .collect();
            if !encoded.is_empty() {
                text.push('?');
                text.push_str(&encoded.join("&"));
            }
            text.push_str(" HTTP/1.1\r\n");
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {value}\r\n"));
            }
            text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let mut bytes = text.into_bytes();
            let head_len = bytes.len();
            bytes.extend_from_slice(&body);

            let (head, used) = parse_head(&bytes, &Limits::default())
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .ok_or_else(|| TestCaseError::fail("incomplete"))?;
            let mut want_headers: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect();
            want_headers.push(("content-length".to_string(), body.len().to_string()));
            prop_assert_eq!(&head.method, &method);
            prop_assert_eq!(&head.path, &path);
            prop_assert_eq!(&head.query, &query);
            prop_assert_eq!(&head.headers, &want_headers);
            prop_assert_eq!(head.content_length, body.len());
            prop_assert_eq!(used, head_len);
            prop_assert_eq!(&bytes[used..], &body[..]);
            prop_assert_eq!(parse_head(&bytes[..cut.index(head_len)], &Limits::default()), Ok(None));
        }
    }

    // ---- Real sockets ----

    static NEXT_SERVER: AtomicU32 = AtomicU32::new(0);

    fn test_handler(request: &Request) -> Response {
        match request.path.as_str() {
            "/panic" => panic!("test handler panics on purpose"),
            "/echo" => {
                Response { status: 200, content_type: "application/octet-stream", body: request.body.clone() }
            }
            "/nested" => match serde_json::from_slice::<serde_json::Value>(&request.body) {
                Ok(_) => Response::empty(204),
                Err(e) => Response::error(400, &e.to_string()),
            },
            _ => Response::json(
                200,
                &serde_json::json!({
                    "method": request.method,
                    "path": request.path,
                    "query": request.query,
                }),
            ),
        }
    }

    struct TestServer {
        dir: PathBuf,
        socket: PathBuf,
        stop: Arc<AtomicBool>,
        done: mpsc::Receiver<()>,
    }

    impl TestServer {
        fn start(limits: Limits) -> TestServer {
            let n = NEXT_SERVER.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("berth-http-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let socket = dir.join("api.sock");
            let listener = UnixListener::bind(&socket).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, done) = mpsc::channel();
            let server_stop = Arc::clone(&stop);
            thread::spawn(move || {
                serve(listener, limits, Arc::new(test_handler), server_stop);
                let _ = tx.send(());
            });
            TestServer { dir, socket, stop, done }
        }

        fn connect(&self) -> Client {
            let stream = UnixStream::connect(&self.socket).unwrap();
            // Bounds every test: a server that never answers fails the test instead of hanging it.
            stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            Client { stream, reader }
        }

        fn limits(read_timeout_ms: u64, max_connections: usize) -> Limits {
            Limits {
                read_timeout: Duration::from_millis(read_timeout_ms),
                max_connections,
                ..Limits::default()
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = UnixStream::connect(&self.socket);
            let stopped = self.done.recv_timeout(Duration::from_secs(3));
            let _ = std::fs::remove_dir_all(&self.dir);
            if !thread::panicking() {
                assert!(stopped.is_ok(), "serve did not return after stop");
            }
        }
    }

    struct Client {
        stream: UnixStream,
        reader: BufReader<UnixStream>,
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            find_header(&self.headers, name)
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    impl Client {
        fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).unwrap();
        }

        fn line(&mut self) -> String {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            line.trim_end_matches("\r\n").to_string()
        }

        /// Read one response; a body only if `Content-Length` says so.
        fn reply(&mut self) -> Reply {
            let status_line = self.line();
            let status = status_line
                .strip_prefix("HTTP/1.1 ")
                .and_then(|s| s.get(..3))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let mut headers = Vec::new();
            loop {
                let line = self.line();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(": ").unwrap();
                headers.push((name.to_ascii_lowercase(), value.to_string()));
            }
            let length = find_header(&headers, "content-length").map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0; length];
            self.reader.read_exact(&mut body).unwrap();
            Reply { status, headers, body }
        }

        fn get(&mut self, path: &str) -> Reply {
            self.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
            self.reply()
        }

        /// True if the server closed the connection (EOF with nothing more to read).
        fn closed(&mut self) -> bool {
            let mut rest = Vec::new();
            matches!(self.reader.read_to_end(&mut rest), Ok(0))
        }
    }

    #[test]
    fn keep_alive_serves_requests_in_turn_and_pipelined() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        let first = client.get("/one?a=b+c");
        assert_eq!(first.status, 200);
        assert_eq!(first.header("connection"), None);
        assert_eq!(
            first.json(),
            serde_json::json!({"method": "GET", "path": "/one", "query": [["a", "b c"]]})
        );
        assert_eq!(client.get("/two").json()["path"], "/two");
        client.send(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /three HTTP/1.1\r\n\r\n");
        assert_eq!(client.reply().body, b"hello");
        assert_eq!(client.reply().json()["path"], "/three");
        client.send(b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n");
        let last = client.reply();
        assert_eq!(last.header("connection"), Some("close"));
        assert!(client.closed());
    }

    #[test]
    fn http10_closes_unless_keep_alive_asked() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        client.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let reply = client.reply();
        assert_eq!(reply.header("connection"), Some("keep-alive"));
        client.send(b"GET /b HTTP/1.0\r\n\r\n");
        let reply = client.reply();
        assert_eq!(reply.json()["path"], "/b");
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(client.closed());
    }

    #[test]
    fn head_gets_headers_only() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        client.send(b"HEAD /x HTTP/1.1\r\n\r\n");
        let status_line = client.line();
        assert_eq!(status_line, "HTTP/1.1 200 OK");
        let mut length = None;
        loop {
            let line = client.line();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = Some(v.to_string());
            }
        }
        assert!(length.is_some_and(|l| l != "0"), "HEAD tells the GET length");
        // No body came: the next reply starts right here.
        assert_eq!(client.get("/after").json()["path"], "/after");
    }

    #[test]
    fn expect_100_continue_is_answered_before_the_body() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        client.send(b"PUT /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(client.line(), "HTTP/1.1 100 Continue");
        assert_eq!(client.line(), "");
        client.send(b"data");
        let reply = client.reply();
        assert_eq!((reply.status, reply.body.as_slice()), (200, &b"data"[..]));
    }

    #[test]
    fn oversized_body_gets_413_before_the_body_is_sent() {
        let limits = Limits { max_body_bytes: 100, ..Limits::default() };
        let server = TestServer::start(limits);
        let mut client = server.connect();
        client.send(b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n");
        client.send(&[b'x'; 100]);
        assert_eq!(client.reply().body.len(), 100);
        // Only the head: the answer must come without the body.
        client.send(b"POST /echo HTTP/1.1\r\nContent-Length: 101\r\n\r\n");
        let reply = client.reply();
        assert_eq!(reply.status, 413);
        assert_eq!(reply.header("connection"), Some("close"));
        assert_eq!(reply.json()["status"], 413);
        assert!(client.closed());
    }

    #[test]
    fn oversized_headers_get_431() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20 * 1024));
        client.send(big.as_bytes());
        let reply = client.reply();
        assert_eq!(reply.status, 431);
        assert_eq!(reply.json()["status"], 431);
        assert!(client.closed());
    }

    #[test]
    fn malformed_request_gets_400_naming_the_problem() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        client.send(b"GET / HTTP/1.1\r\nthis is not a header\r\n\r\n");
        let reply = client.reply();
        assert_eq!(reply.status, 400);
        let body = reply.json();
        assert_eq!(body["status"], 400);
        let message = body["error"].as_str().unwrap();
        assert!(message.contains("header line without a colon"), "{message}");
        assert!(client.closed());
    }

    #[test]
    fn chunked_request_gets_411() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        client.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(client.reply().status, 411);
        assert!(client.closed());
    }

    #[test]
    fn stalled_request_gets_408_and_frees_its_slot() {
        let server = TestServer::start(TestServer::limits(300, 1));
        let mut client = server.connect();
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n");
        let reply = client.reply();
        assert_eq!(reply.status, 408);
        assert_eq!(reply.json()["status"], 408);
        assert!(client.closed());
        // The only slot is free again.
        assert_eq!(server.connect().get("/").status, 200);
    }

    #[test]
    fn dribbling_client_cannot_outlast_the_request_deadline() {
        let server = TestServer::start(TestServer::limits(300, 4));
        let mut client = server.connect();
        client.stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let request =
            b"GET /slow HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut answer = Vec::new();
        let mut scratch = [0u8; 512];
        // One byte every ~100 ms: never idle for a whole read_timeout, yet never done in time.
        // The answer must come while the client is still sending (by ~3 of the 20 bytes).
        let mut answered_while_sending = false;
        for byte in request.iter().take(20) {
            if client.stream.write_all(&[*byte]).is_err() {
                answered_while_sending = true;
                break;
            }
            match client.stream.read(&mut scratch) {
                Ok(n) => {
                    answer.extend_from_slice(&scratch[..n]);
                    answered_while_sending = true;
                    break;
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            answered_while_sending,
            "the server kept waiting for a client that sends a byte every 100 ms"
        );
        client.stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = client.stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    }

    #[test]
    fn idle_connection_is_closed_silently() {
        let server = TestServer::start(TestServer::limits(300, 4));
        let mut idle = server.connect();
        assert!(idle.closed(), "a connection that never sends is closed");
        let mut kept = server.connect();
        assert_eq!(kept.get("/").status, 200);
        assert!(kept.closed(), "an idle keep-alive connection is closed");
    }

    #[test]
    fn extra_connection_gets_503() {
        let server = TestServer::start(TestServer::limits(2000, 1));
        let mut first = server.connect();
        assert_eq!(first.get("/").status, 200);
        let mut second = server.connect();
        let reply = second.reply();
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["status"], 503);
        assert!(second.closed());
        // The first connection is unaffected; once it closes, its slot is free.
        first.send(b"GET /again HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(first.reply().status, 200);
        assert!(first.closed());
        assert_eq!(server.connect().get("/third").status, 200);
    }

    #[test]
    fn handler_panic_gets_500_and_the_server_keeps_serving() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        let reply = client.get("/panic");
        assert_eq!(reply.status, 500);
        assert_eq!(reply.json()["status"], 500);
        assert_eq!(client.get("/fine").status, 200);
        assert_eq!(server.connect().get("/fine").status, 200);
    }

    #[test]
    fn nested_json_fits_in_connection_stack() {
        let server = TestServer::start(Limits::default());
        let mut client = server.connect();
        // serde_json's recursion limit is 128; this is as deep as it goes.
        let body = format!("{}{}", "[".repeat(127), "]".repeat(127));
        client.send(
            format!("POST /nested HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        );
        assert_eq!(client.reply().status, 204);
    }
}
