//! The updater's transport for tough: fetches TUF metadata and image targets over plain HTTP/1.1
//! (or from `file://` URLs) and resumes a large download where a dropped connection left it.
//!
//! Why our own client: tough's `http` feature brings reqwest, hyper and rustls into PID 1, for a
//! job that is one `GET` at a time from one repository. TUF gives integrity (every file is
//! checked against signed lengths and hashes), so plain HTTP is enough for now; HTTPS is not
//! supported.
//!
//! What a fetch does: `GET` with `Host`, `User-Agent` and `Connection: close`, up to
//! [`MAX_REDIRECTS`] redirects (http only), then the body as a stream of [`CHUNK`]-sized pieces,
//! never buffered whole (targets are hundreds of MiB). 404 and 410 are [`FileNotFound`], which
//! tough needs to see the end of the `root.json` chain; any other non-2xx is an error naming the
//! status line. Bodies are framed by `Content-Length`, chunked transfer coding, or the end of
//! the connection.
//!
//! Resuming: when a `Content-Length` body breaks off (I/O error, read timeout, or the end of the
//! connection too early), the stream connects again with `Range: bytes=N-` (N = bytes already
//! delivered) and `If-Range` (the first answer's strong ETag, else its Last-Modified) and goes on
//! where it stopped: a `206` must start exactly at N; a `200` (the server ignores ranges) has its
//! first N bytes skipped, unless its validators or length show the file changed on the server,
//! which is an error rather than a splice of two files. `retries` bounds the attempts in a row
//! that deliver no new byte, with a backoff from `backoff` doubling up to [`MAX_BACKOFF`]; a
//! resumed connection that delivers bytes refills the budget, so a link that drops every few
//! minutes still completes a large image. Chunked and connection-delimited bodies are not
//! resumed: a drop there is an error (for the latter the drop may look like the end, and TUF's
//! length and hash checks catch it).
//!
//! Limits: blocking I/O inside the async API (the updater runs tough on a current-thread runtime
//! in its own thread, so nothing else waits behind it); resolved addresses are tried in turn,
//! each within `connect_timeout`; no HTTPS, proxies, content codings or keep-alive; a response
//! head is at most [`MAX_HEAD`] bytes. A request that fails before its body begins is not
//! retried here: that is the caller's to decide.
//!
//! [`FileNotFound`]: TransportErrorKind::FileNotFound

// The updater's repository client is being written; until it fetches through this, only the
// tests do.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use tough::{SafeUrlPath, Transport, TransportError, TransportErrorKind, TransportStream};
use url::{Host, Position, Url};

/// Redirects followed per request.
pub const MAX_REDIRECTS: usize = 5;
/// The most a response head (status line and headers) may take.
pub const MAX_HEAD: usize = 16 * 1024;
/// The size of the pieces a body is read and delivered in.
pub const CHUNK: usize = 64 * 1024;
/// The longest wait between two attempts to resume.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));
const SCHEMES: &str = "Berth's updater fetches over http:// and file:// only (TUF checks what it fetches)";

/// A [`tough::Transport`] for `http://` and `file://` URLs; see the module docs.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long a read or write may block before the connection counts as dropped.
    pub read_timeout: Duration,
    /// Attempts in a row without a new byte before a broken download is given up.
    pub retries: u32,
    /// The wait before the first attempt to resume; it doubles up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Downloads resumed so far (shared by clones), for logs and tests.
    pub resumes: Arc<AtomicU32>,
}

impl Default for HttpTransport {
    fn default() -> HttpTransport {
        HttpTransport {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            retries: 5,
            backoff: Duration::from_millis(200),
            resumes: Arc::new(AtomicU32::new(0)),
        }
    }
}

#[tough::async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "http" => self.fetch_http(url),
            "file" => fetch_file(url),
            other => {
                let why = format!("'{other}://' is not supported: {SCHEMES}");
                Err(TransportError::new_with_cause(TransportErrorKind::UnsupportedUrlScheme, url, why))
            }
        }
    }
}

impl HttpTransport {
    fn fetch_http(&self, url: Url) -> Result<TransportStream, TransportError> {
        let (source, conn, head) = self.open(&url, &[]).map_err(|f| f.into_error(&url))?;
        let framing = match head.status {
            200..=299 => head.framing().map_err(|e| Fault::Fatal(TransportErrorKind::Other, e)),
            404 | 410 => Err(Fault::Fatal(TransportErrorKind::FileNotFound, head.answered())),
            _ => Err(Fault::Fatal(TransportErrorKind::Other, head.answered())),
        }
        .map_err(|f| f.into_error(&url))?;
        let body = Body {
            transport: self.clone(),
            url,
            source,
            conn,
            framing,
            delivered: 0,
            etag: head.header("etag").map(str::to_string),
            last_modified: head.header("last-modified").map(str::to_string),
            attempts: 0,
            backoff: self.backoff,
            done: false,
        };
        Ok(Box::pin(Pull(body)))
    }

    /// Send a `GET` for `url` with `extra` headers, following redirects: the URL that answered,
    /// the connection positioned at the body, and the head of the answer.
    fn open(&self, url: &Url, extra: &[(&str, String)]) -> Result<(Url, Conn, Head), Fault> {
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let (conn, head) = self.exchange(&url, extra)?;
            if !matches!(head.status, 301 | 302 | 303 | 307 | 308) {
                return Ok((url, conn, head));
            }
            let fatal = |kind, why: String| Fault::Fatal(kind, format!("{url}: {}: {why}", head.answered()));
            let location = head
                .header("location")
                .ok_or_else(|| fatal(TransportErrorKind::Other, "no Location header".to_string()))?;
            let next = url
                .join(location)
                .map_err(|e| fatal(TransportErrorKind::Other, format!("bad Location '{location}': {e}")))?;
            if next.scheme() != "http" {
                return Err(fatal(
                    TransportErrorKind::UnsupportedUrlScheme,
                    format!("redirected to {next}: {SCHEMES}"),
                ));
            }
            url = next;
        }
        Err(Fault::Fatal(
            TransportErrorKind::Other,
            format!("more than {MAX_REDIRECTS} redirects, the last to {url}"),
        ))
    }

    /// One request and the head of its answer.
    fn exchange(&self, url: &Url, extra: &[(&str, String)]) -> Result<(Conn, Head), Fault> {
        let stream = self.connect(url)?;
        let timeouts = stream
            .set_read_timeout(Some(self.read_timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.read_timeout)));
        timeouts.map_err(|e| Fault::Io(format!("cannot set socket timeouts: {e}")))?;
        (&stream)
            .write_all(request_head(url, extra).as_bytes())
            .map_err(|e| Fault::Io(format!("sending the request: {}", io_cause(&e))))?;
        let mut conn = BufReader::with_capacity(CHUNK, stream);
        let head = read_head(&mut conn)?;
        let head = Head::parse(&head).map_err(|e| Fault::Fatal(TransportErrorKind::Other, e))?;
        Ok((conn, head))
    }

    fn connect(&self, url: &Url) -> Result<TcpStream, Fault> {
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = match url.host() {
            Some(Host::Ipv4(ip)) => vec![(ip, port).into()],
            Some(Host::Ipv6(ip)) => vec![(ip, port).into()],
            Some(Host::Domain(name)) => (name, port)
                .to_socket_addrs()
                .map_err(|e| Fault::Io(format!("cannot resolve '{name}': {e}")))?
                .collect(),
            None => return Err(Fault::Fatal(TransportErrorKind::Other, "the URL has no host".to_string())),
        };
        let mut last = Fault::Io(format!("'{}' resolved to no address", url.host_str().unwrap_or_default()));
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Fault::Io(format!("cannot connect to {addr}: {}", io_cause(&e))),
            }
        }
        Err(last)
    }
}

type Conn = BufReader<TcpStream>;

/// Why a request failed, before it becomes a [`TransportError`].
#[derive(Debug)]
enum Fault {
    /// The network failed: worth another attempt when resuming.
    Io(String),
    /// The answer rules the request out (status, malformed head, a changed file).
    Fatal(TransportErrorKind, String),
}

impl Fault {
    fn into_error(self, url: &Url) -> TransportError {
        match self {
            Fault::Io(why) => TransportError::new_with_cause(TransportErrorKind::Other, url, why),
            Fault::Fatal(kind, why) => TransportError::new_with_cause(kind, url, why),
        }
    }
}

/// The request head: origin-form target, `Host` with the port when it is not 80.
fn request_head(url: &Url, extra: &[(&str, String)]) -> String {
    let target = &url[Position::BeforePath..Position::AfterQuery];
    let mut host = url.host_str().unwrap_or_default().to_string();
    if let Some(port) = url.port() {
        host = format!("{host}:{port}");
    }
    let mut head =
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n");
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Read lines up to the empty line that ends a response head, at most [`MAX_HEAD`] bytes.
fn read_head(conn: &mut impl BufRead) -> Result<Vec<u8>, Fault> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let room = (MAX_HEAD - head.len()) as u64;
        let n = (&mut *conn)
            .take(room)
            .read_until(b'\n', &mut head)
            .map_err(|e| Fault::Io(format!("reading the response head: {}", io_cause(&e))))?;
        if n == 0 || !head.ends_with(b"\n") {
            if head.len() >= MAX_HEAD {
                let why = format!("the response head is larger than {MAX_HEAD} bytes");
                return Err(Fault::Fatal(TransportErrorKind::Other, why));
            }
            let why = format!("the connection closed after {} bytes of the response head", head.len());
            return Err(Fault::Io(why));
        }
        if trim_cr(&head[start..start + n - 1]).is_empty() {
            return Ok(head);
        }
    }
}

/// A response head: status and headers (names lowercased, values trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    status: u16,
    status_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// Parse `HTTP/1.x NNN reason` and `name: value` lines up to the empty line.
    fn parse(bytes: &[u8]) -> Result<Head, String> {
        let mut lines = bytes.split(|&b| b == b'\n').map(trim_cr).take_while(|l| !l.is_empty());
        let line = lines.next().unwrap_or_default();
        let status_line = printable(line);
        let status = match line {
            [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor, b' ', a, b, c, rest @ ..]
                if minor.is_ascii_digit()
                    && [a, b, c].iter().all(|d| d.is_ascii_digit())
                    && (rest.is_empty() || rest[0] == b' ') =>
            {
                [a, b, c].iter().fold(0u16, |n, d| n * 10 + u16::from(**d - b'0'))
            }
            _ => {
                return Err(format!("malformed status line '{status_line}': expected 'HTTP/1.1 NNN reason'"))
            }
        };
        let mut headers = Vec::new();
        for line in lines {
            if line.starts_with(b" ") || line.starts_with(b"\t") {
                return Err("obsolete header line folding in the response".to_string());
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(format!("malformed header line '{}'", printable(line)));
            };
            let name = &line[..colon];
            if name.is_empty() || name.iter().any(|b| !b.is_ascii_graphic()) {
                return Err(format!("malformed header name '{}'", printable(name)));
            }
            let value = String::from_utf8_lossy(&line[colon + 1..]).trim_matches([' ', '\t']).to_string();
            headers.push((String::from_utf8_lossy(name).to_ascii_lowercase(), value));
        }
        Ok(Head { status, status_line, headers })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// "the server answered 'HTTP/1.1 500 Internal Server Error'".
    fn answered(&self) -> String {
        format!("the server answered '{}'", self.status_line)
    }

    /// How the body is delimited.
    fn framing(&self) -> Result<Framing, String> {
        if matches!(self.status, 204 | 304) {
            return Ok(Framing::Length(0));
        }
        if let Some(codings) = self.header("transfer-encoding") {
            let last = codings.rsplit(',').next().unwrap_or_default().trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(format!("unsupported Transfer-Encoding '{codings}'"));
            }
            return Ok(Framing::Chunked { left: 0 });
        }
        let mut length = None;
        for (_, value) in self.headers.iter().filter(|(n, _)| n == "content-length") {
            for item in value.split(',').map(str::trim) {
                let n = parse_decimal(item).ok_or_else(|| format!("invalid Content-Length '{item}'"))?;
                if length.is_some_and(|l| l != n) {
                    return Err("Content-Length headers disagree".to_string());
                }
                length = Some(n);
            }
        }
        Ok(length.map_or(Framing::Eof, Framing::Length))
    }
}

/// How a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// After this many bytes in all (resumable).
    Length(u64),
    /// At the zero-size chunk; `left` is what remains of the current chunk.
    Chunked { left: u64 },
    /// When the server closes the connection.
    Eof,
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Framing::Length(n) => write!(f, "{n} bytes"),
            Framing::Chunked { .. } => write!(f, "a chunked body"),
            Framing::Eof => write!(f, "a body without a length"),
        }
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) → (START, END, TOTAL).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (unit, rest) = value.trim().split_once(' ')?;
    let (range, total) = rest.trim().split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let total = if total == "*" { None } else { Some(parse_decimal(total)?) };
    let (start, end) = (parse_decimal(start)?, parse_decimal(end)?);
    (unit.eq_ignore_ascii_case("bytes") && start <= end).then_some((start, end, total))
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// At most 80 characters of `bytes`, for an error message.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(80).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// An I/O error as a cause, with timeouts said as such.
fn io_cause(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => e.to_string(),
    }
}

/// Up to `max` bytes from `conn`: empty only at the end of the stream.
fn read_some(conn: &mut impl Read, max: usize) -> io::Result<Bytes> {
    let mut buf = vec![0; max];
    loop {
        match conn.read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Bytes::from(buf));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One line of a chunked body (size line, the CRLF after data, a trailer): at most 4 KiB.
fn read_line(conn: &mut impl BufRead) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    (&mut *conn).take(4096).read_until(b'\n', &mut line).map_err(|e| io_cause(&e))?;
    match line.strip_suffix(b"\n") {
        Some(line) => Ok(trim_cr(line).to_vec()),
        None if line.len() >= 4096 => Err("a chunked-body line is longer than 4096 bytes".to_string()),
        None => Err("the server closed the connection".to_string()),
    }
}

/// A blocking pull source as a [`Stream`]: each poll blocks until the next piece is there.
struct Pull<I>(I);

impl<I: Iterator<Item = Result<Bytes, TransportError>> + Unpin> Stream for Pull<I> {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.next())
    }
}

fn fetch_file(url: Url) -> Result<TransportStream, TransportError> {
    let path = url.safe_url_filepath();
    let mut file = File::open(&path).map_err(|e| {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => TransportErrorKind::FileNotFound,
            _ => TransportErrorKind::Other,
        };
        TransportError::new_with_cause(kind, &url, format!("cannot open {}: {e}", path.display()))
    })?;
    let mut done = false;
    let pieces = std::iter::from_fn(move || {
        if done {
            return None;
        }
        match read_some(&mut file, CHUNK) {
            Ok(piece) if !piece.is_empty() => Some(Ok(piece)),
            Ok(_) => {
                done = true;
                None
            }
            Err(e) => {
                done = true;
                let why = format!("reading {}: {e}", path.display());
                Some(Err(TransportError::new_with_cause(TransportErrorKind::Other, &url, why)))
            }
        }
    });
    Ok(Box::pin(Pull(pieces)))
}

/// An HTTP body being delivered, resumed when a `Content-Length` body breaks off.
struct Body {
    transport: HttpTransport,
    /// What was asked for (named in errors), and the URL that answered (asked again to resume).
    url: Url,
    source: Url,
    conn: Conn,
    framing: Framing,
    delivered: u64,
    /// The first answer's validators, sent in `If-Range` and compared with a later `200`.
    etag: Option<String>,
    last_modified: Option<String>,
    /// Attempts to resume since the last byte arrived, and the wait before the next.
    attempts: u32,
    backoff: Duration,
    done: bool,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Body({} at byte {}, {})", self.url, self.delivered, self.framing)
    }
}

impl Iterator for Body {
    type Item = Result<Bytes, TransportError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let piece = match self.framing {
            Framing::Length(total) => self.next_counted(total),
            Framing::Chunked { left } => self.next_chunked(left),
            Framing::Eof => self.next_until_eof(),
        };
        match piece {
            Ok(Some(piece)) => {
                self.delivered += piece.len() as u64;
                Some(Ok(piece))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl Body {
    fn next_counted(&mut self, total: u64) -> Result<Option<Bytes>, TransportError> {
        loop {
            let left = total - self.delivered;
            if left == 0 {
                return Ok(None);
            }
            let cause = match read_some(&mut self.conn, CHUNK.min(usize::try_from(left).unwrap_or(CHUNK))) {
                Ok(piece) if !piece.is_empty() => {
                    self.attempts = 0;
                    self.backoff = self.transport.backoff;
                    return Ok(Some(piece));
                }
                Ok(_) => "the server closed the connection".to_string(),
                Err(e) => io_cause(&e),
            };
            self.resume(total, cause)?;
        }
    }

    fn next_chunked(&mut self, left: u64) -> Result<Option<Bytes>, TransportError> {
        let delivered = self.delivered;
        let broken = |why: String| {
            let why = format!("connection dropped after {delivered} bytes of a chunked body: {why}");
            TransportError::new_with_cause(TransportErrorKind::Other, &self.url, why)
        };
        let mut left = left;
        if left == 0 {
            let line = read_line(&mut self.conn).map_err(broken)?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size).ok().map(str::trim).filter(|s| !s.is_empty());
            left = size.and_then(|s| u64::from_str_radix(s, 16).ok()).ok_or_else(|| {
                let why = format!("invalid chunk size line '{}'", printable(&line));
                TransportError::new_with_cause(TransportErrorKind::Other, &self.url, why)
            })?;
            if left == 0 {
                // Trailers, up to the empty line: read and dropped.
                while !read_line(&mut self.conn).map_err(broken)?.is_empty() {}
                return Ok(None);
            }
        }
        let piece = read_some(&mut self.conn, CHUNK.min(usize::try_from(left).unwrap_or(CHUNK)))
            .map_err(|e| broken(io_cause(&e)))?;
        if piece.is_empty() {
            return Err(broken("the server closed the connection".to_string()));
        }
        left -= piece.len() as u64;
        if left == 0 && !read_line(&mut self.conn).map_err(broken)?.is_empty() {
            let why = "a chunk is longer than its size line says";
            return Err(TransportError::new_with_cause(TransportErrorKind::Other, &self.url, why));
        }
        self.framing = Framing::Chunked { left };
        Ok(Some(piece))
    }

    fn next_until_eof(&mut self) -> Result<Option<Bytes>, TransportError> {
        let piece = read_some(&mut self.conn, CHUNK).map_err(|e| {
            let why = format!("connection dropped after {} bytes: {}", self.delivered, io_cause(&e));
            TransportError::new_with_cause(TransportErrorKind::Other, &self.url, why)
        })?;
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// Connect again and position the new connection at byte `delivered`, or give up.
    fn resume(&mut self, total: u64, mut cause: String) -> Result<(), TransportError> {
        loop {
            if self.attempts >= self.transport.retries {
                let why = format!(
                    "connection dropped after {} of {total} bytes ({} retries without progress): {cause}",
                    self.delivered, self.attempts
                );
                return Err(TransportError::new_with_cause(TransportErrorKind::Other, &self.url, why));
            }
            self.attempts += 1;
            log::warn!(
                "{}: connection dropped after {} of {total} bytes ({cause}); resuming in {:?} (retry {} of {})",
                self.url,
                self.delivered,
                self.backoff,
                self.attempts,
                self.transport.retries
            );
            thread::sleep(self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            match self.reopen(total) {
                Ok(()) => {
                    self.transport.resumes.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(Fault::Io(why)) => cause = why,
                Err(fatal) => return Err(fatal.into_error(&self.url)),
            }
        }
    }

    fn reopen(&mut self, total: u64) -> Result<(), Fault> {
        let at = self.delivered;
        let mut extra = vec![("Range", format!("bytes={at}-"))];
        let strong_etag = self.etag.as_ref().filter(|e| !e.starts_with("W/"));
        if let Some(validator) = strong_etag.or(self.last_modified.as_ref()) {
            extra.push(("If-Range", validator.clone()));
        }
        let (_, mut conn, head) = self.transport.open(&self.source, &extra)?;
        let fatal =
            |why: String| Fault::Fatal(TransportErrorKind::Other, format!("resuming at byte {at}: {why}"));
        let framing = head.framing().map_err(fatal)?;
        match head.status {
            206 => {
                let range = head.header("content-range").unwrap_or_default();
                match parse_content_range(range) {
                    Some((start, end, size))
                        if start == at && end + 1 == total && size.unwrap_or(total) == total => {}
                    Some((start, ..)) if start != at => {
                        return Err(fatal(format!(
                            "the server resumed at byte {start} (Content-Range '{range}')"
                        )));
                    }
                    Some(_) => return Err(self.changed(format!("Content-Range '{range}' for {total} bytes"))),
                    None => return Err(fatal(format!("206 with an invalid Content-Range '{range}'"))),
                }
                if !matches!(framing, Framing::Eof) && framing != Framing::Length(total - at) {
                    return Err(fatal(format!("206 with {framing}, not {} bytes", total - at)));
                }
            }
            200 => {
                self.check_unchanged(&head, framing, total)?;
                let skipped = io::copy(&mut (&mut conn).take(at), &mut io::sink()).map_err(|e| {
                    Fault::Io(format!("skipping {at} bytes the server sent again: {}", io_cause(&e)))
                })?;
                if skipped < at {
                    let why =
                        format!("the connection closed after {skipped} of {at} bytes the server sent again");
                    return Err(Fault::Io(why));
                }
            }
            500..=599 => return Err(Fault::Io(head.answered())),
            _ => return Err(fatal(head.answered())),
        }
        self.conn = conn;
        Ok(())
    }

    /// A `200` to a range request: the same file (the server ignores ranges), or a new one.
    fn check_unchanged(&self, head: &Head, framing: Framing, total: u64) -> Result<(), Fault> {
        let pairs = [
            ("ETag", &self.etag, head.header("etag")),
            ("Last-Modified", &self.last_modified, head.header("last-modified")),
        ];
        for (name, was, now) in pairs {
            if let (Some(was), Some(now)) = (was, now) {
                if was != now {
                    return Err(self.changed(format!("{name} '{was}' became '{now}'")));
                }
            }
        }
        match framing {
            Framing::Length(n) if n == total => Ok(()),
            Framing::Length(n) => Err(self.changed(format!("{total} bytes became {n}"))),
            _ => Err(Fault::Fatal(
                TransportErrorKind::Other,
                format!(
                    "resuming: the server sent the whole file again as {framing}, which cannot be checked"
                ),
            )),
        }
    }

    fn changed(&self, how: String) -> Fault {
        let why = format!(
            "the file changed on the server during the download ({how}): not splicing two files; fetch it again"
        );
        Fault::Fatal(TransportErrorKind::Other, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Mutex;
    use tough::IntoVec;

    type Script = dyn Fn(usize, &str, &mut TcpStream) + Send + Sync;

    /// A server on 127.0.0.1 that answers its n-th connection with `script(n, request head)`,
    /// each on its own thread, and keeps every request head it saw.
    struct Server {
        port: u16,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl Server {
        fn start(script: impl Fn(usize, &str, &mut TcpStream) + Send + Sync + 'static) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let log = requests.clone();
            let script: Arc<Script> = Arc::new(script);
            thread::spawn(move || {
                for (n, stream) in listener.incoming().enumerate() {
                    let (Ok(mut stream), log, script) = (stream, log.clone(), script.clone()) else {
                        continue;
                    };
                    thread::spawn(move || {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                            head.push(byte[0]);
                        }
                        let head = String::from_utf8_lossy(&head).into_owned();
                        log.lock().unwrap().push(head.clone());
                        script(n, &head, &mut stream);
                    });
                }
            });
            Server { port, requests }
        }

        fn url(&self, path: &str) -> String {
            format!("http://127.0.0.1:{}{path}", self.port)
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }
    }

    /// Fast retries for tests.
    fn transport() -> HttpTransport {
        HttpTransport { backoff: Duration::from_millis(1), ..HttpTransport::default() }
    }

    fn fetch(transport: &HttpTransport, url: &str) -> Result<Vec<u8>, TransportError> {
        let url = Url::parse(url).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async { transport.fetch(url).await?.into_vec().await })
    }

    fn fetch_err(transport: &HttpTransport, url: &str) -> (TransportErrorKind, String) {
        let Err(e) = fetch(transport, url) else { panic!("fetching {url} should fail") };
        (e.kind(), e.to_string())
    }

    /// `len` bytes of xorshift noise.
    fn noise(len: usize, seed: u64) -> Arc<Vec<u8>> {
        let mut x = seed | 1;
        let bytes = (0..len).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        });
        Arc::new(bytes.collect())
    }

    fn range_start(request: &str) -> Option<usize> {
        let line = request.lines().find(|l| l.to_ascii_lowercase().starts_with("range: bytes="))?;
        line["range: bytes=".len()..].trim_end_matches('-').parse().ok()
    }

    /// Answer like a file server: 206 from `Range: bytes=N-` when `ranges`, else 200, with the
    /// `validator` header line; close the connection after `cut` bytes of body.
    fn send_file(
        s: &mut TcpStream,
        request: &str,
        body: &[u8],
        validator: &str,
        ranges: bool,
        cut: Option<usize>,
    ) {
        let (status, from) = match range_start(request) {
            Some(n) if ranges => (
                format!("206 Partial Content\r\nContent-Range: bytes {n}-{}/{}", body.len() - 1, body.len()),
                n,
            ),
            _ => ("200 OK".to_string(), 0),
        };
        let body = &body[from..];
        let validator = if validator.is_empty() { String::new() } else { format!("{validator}\r\n") };
        let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n{validator}\r\n", body.len());
        let body = &body[..cut.unwrap_or(body.len()).min(body.len())];
        let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body));
    }

    #[test]
    fn a_large_body_arrives_byte_exact() {
        let body = noise(5 * 1024 * 1024 + 7, 1);
        let served = body.clone();
        let server = Server::start(move |_, req, s| send_file(s, req, &served, "ETag: \"v1\"", true, None));
        let t = transport();
        assert!(fetch(&t, &server.url("/targets/root.img?x=1")).unwrap() == *body);
        assert_eq!(t.resumes.load(Ordering::Relaxed), 0);
        let requests = server.requests();
        let want = format!(
            "GET /targets/root.img?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: berth/{}\r\nConnection: close\r\n\r\n",
            server.port,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(requests, [want]);
    }

    #[test]
    fn statuses() {
        let cases = [
            ("404 Not Found", TransportErrorKind::FileNotFound),
            ("410 Gone", TransportErrorKind::FileNotFound),
            ("500 Internal Server Error", TransportErrorKind::Other),
            ("403 Forbidden", TransportErrorKind::Other),
        ];
        for (status, kind) in cases {
            let line = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let server = Server::start(move |_, _, s| {
                let _ = s.write_all(line.as_bytes());
            });
            let (got, message) = fetch_err(&transport(), &server.url("/2.root.json"));
            assert_eq!(got, kind, "{status}");
            assert!(message.contains(&format!("'HTTP/1.1 {status}'")), "{message}");
        }
    }

    #[test]
    fn a_drop_mid_body_is_resumed_with_range() {
        let body = noise(3 * 1024 * 1024, 2);
        let served = body.clone();
        let server = Server::start(move |n, req, s| {
            send_file(s, req, &served, "ETag: \"v1\"", true, (n == 0).then_some(1_000_003))
        });
        let t = transport();
        assert!(fetch(&t, &server.url("/t")).unwrap() == *body);
        assert_eq!(t.resumes.load(Ordering::Relaxed), 1);
        let requests = server.requests();
        assert_eq!(requests.len(), 2);
        assert!(requests[1].contains("\r\nRange: bytes=1000003-\r\nIf-Range: \"v1\"\r\n"), "{}", requests[1]);
    }

    #[test]
    fn a_read_timeout_mid_body_is_resumed() {
        let body = noise(200_000, 3);
        let served = body.clone();
        let server = Server::start(move |n, req, s| {
            if n == 0 {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", served.len());
                let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(&served[..1000]));
                thread::sleep(Duration::from_secs(2));
            } else {
                send_file(s, req, &served, "", true, None);
            }
        });
        let t = HttpTransport { read_timeout: Duration::from_millis(100), ..transport() };
        assert!(fetch(&t, &server.url("/t")).unwrap() == *body);
        assert_eq!(t.resumes.load(Ordering::Relaxed), 1);
        assert_eq!(range_start(&server.requests()[1]), Some(1000));
    }

    #[test]
    fn a_server_that_ignores_range_has_the_repeated_bytes_skipped() {
        let body = noise(2 * 1024 * 1024 + 1, 4);
        let served = body.clone();
        let modified = "Last-Modified: Tue, 03 Mar 2026 10:00:00 GMT";
        let server = Server::start(move |n, req, s| {
            send_file(s, req, &served, modified, false, (n == 0).then_some(777_777))
        });
        let t = transport();
        assert!(fetch(&t, &server.url("/t")).unwrap() == *body);
        assert_eq!(t.resumes.load(Ordering::Relaxed), 1);
        let requests = server.requests();
        assert!(requests[1].contains("If-Range: Tue, 03 Mar 2026 10:00:00 GMT\r\n"), "{}", requests[1]);
    }

    #[test]
    fn a_link_that_drops_often_still_completes_while_each_attempt_makes_progress() {
        let body = noise(5 * 1024 * 1024 + 7, 5);
        let served = body.clone();
        let server =
            Server::start(move |_, req, s| send_file(s, req, &served, "ETag: \"v1\"", true, Some(1 << 20)));
        let t = HttpTransport { retries: 2, ..transport() };
        assert!(fetch(&t, &server.url("/t")).unwrap() == *body);
        assert_eq!(t.resumes.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_server_that_always_drops_is_given_up_on() {
        let body = noise(5678, 6);
        let server = Server::start(move |n, req, s| {
            send_file(s, req, &body, "ETag: \"v1\"", true, Some(if n == 0 { 1234 } else { 0 }))
        });
        let t = transport();
        let (kind, message) = fetch_err(&t, &server.url("/t"));
        assert_eq!(kind, TransportErrorKind::Other);
        assert!(message.contains("/t"), "{message}");
        assert!(
            message.contains("connection dropped after 1234 of 5678 bytes (5 retries without progress): "),
            "{message}"
        );
        assert_eq!(server.requests().len(), 6);
    }

    #[test]
    fn a_file_changed_on_the_server_is_not_spliced() {
        let old = noise(100_000, 7);
        // The whole file the second connection sends after the first dropped at byte 1000.
        let cases = [
            ("a new ETag (If-Range failed)", noise(100_000, 8), "ETag: \"v2\""),
            ("a new length", noise(120_000, 9), "ETag: \"v1\""),
        ];
        for (case, new, validator) in cases {
            let old = old.clone();
            let server = Server::start(move |n, req, s| match n {
                0 => send_file(s, req, &old, "ETag: \"v1\"", true, Some(1000)),
                _ => send_file(s, req, &new, validator, false, None),
            });
            let (kind, message) = fetch_err(&transport(), &server.url("/t"));
            assert_eq!(kind, TransportErrorKind::Other, "{case}");
            assert!(message.contains("changed on the server"), "{case}: {message}");
            assert_eq!(server.requests().len(), 2, "{case}");
        }
    }

    #[test]
    fn a_bad_206_is_an_error() {
        let cases = [
            ("bytes 0-9999/10000", "resuming at byte 1000: the server resumed at byte 0"),
            ("bytes 1000-9999/20000", "changed on the server"),
            ("bytes 1000-9999", "invalid Content-Range"),
        ];
        for (range, text) in cases {
            let body = noise(10_000, 10);
            let server = Server::start(move |n, req, s| match n {
                0 => send_file(s, req, &body, "", true, Some(1000)),
                _ => {
                    let head = format!("HTTP/1.1 206 Partial Content\r\nContent-Range: {range}\r\n\r\n");
                    let _ = s.write_all(head.as_bytes());
                }
            });
            let (_, message) = fetch_err(&transport(), &server.url("/t"));
            assert!(message.contains(text), "{range}: {message}");
            assert_eq!(server.requests().len(), 2, "{range}");
        }
    }

    /// `body` in chunks of growing sizes, with a chunk extension and a trailer; cut after
    /// `cut` bytes of the encoded body.
    fn send_chunked(s: &mut TcpStream, body: &[u8], cut: Option<usize>) {
        let mut encoded = Vec::new();
        let (mut at, mut size) = (0, 1);
        while at < body.len() {
            let piece = &body[at..(at + size).min(body.len())];
            encoded.extend(format!("{:X};name=value\r\n", piece.len()).bytes());
            encoded.extend(piece);
            encoded.extend(b"\r\n");
            (at, size) = (at + piece.len(), size * 3 + 1);
        }
        encoded.extend(b"0\r\nX-Trailer: 1\r\n\r\n");
        let encoded = &encoded[..cut.unwrap_or(encoded.len())];
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(encoded));
    }

    #[test]
    fn a_chunked_body_arrives_byte_exact() {
        let body = noise(1024 * 1024 + 3, 11);
        let served = body.clone();
        let server = Server::start(move |_, _, s| send_chunked(s, &served, None));
        assert!(fetch(&transport(), &server.url("/t")).unwrap() == *body);
    }

    #[test]
    fn a_drop_in_a_chunked_body_is_an_error_without_resume() {
        let body = noise(100_000, 12);
        let server = Server::start(move |_, _, s| send_chunked(s, &body, Some(50_000)));
        let t = transport();
        let (_, message) = fetch_err(&t, &server.url("/t"));
        assert!(message.contains("of a chunked body"), "{message}");
        assert_eq!((t.resumes.load(Ordering::Relaxed), server.requests().len()), (0, 1));
    }

    #[test]
    fn a_body_without_length_runs_to_the_end_of_the_connection() {
        let body = noise(300_000, 13);
        let served = body.clone();
        let server = Server::start(move |_, _, s| {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").and_then(|()| s.write_all(&served));
        });
        assert!(fetch(&transport(), &server.url("/t")).unwrap() == *body);
    }

    #[test]
    fn redirects() {
        let server = Server::start(|_, req, s| {
            let path = req.split(' ').nth(1).unwrap_or_default();
            let port = req.lines().find_map(|l| l.strip_prefix("Host: 127.0.0.1:")).unwrap_or_default();
            let answer = match path {
                "/a/x" => "302 Found\r\nLocation: ../b/x".to_string(),
                "/b/x" => format!("301 Moved Permanently\r\nLocation: http://127.0.0.1:{port}/c"),
                "/c" => "200 OK\r\nContent-Length: 5\r\n\r\nhello".to_string(),
                "/tls" => "307 Temporary Redirect\r\nLocation: https://example.com/x".to_string(),
                "/none" => "302 Found".to_string(),
                _ => "308 Permanent Redirect\r\nLocation: /loop".to_string(),
            };
            let answer = if answer.contains("\r\n\r\n") { answer } else { answer + "\r\n\r\n" };
            let _ = s.write_all(format!("HTTP/1.1 {answer}").as_bytes());
        });
        assert_eq!(fetch(&transport(), &server.url("/a/x")).unwrap(), b"hello");
        let cases = [
            ("/loop", TransportErrorKind::Other, "more than 5 redirects"),
            ("/tls", TransportErrorKind::UnsupportedUrlScheme, "redirected to https://example.com/x"),
            ("/none", TransportErrorKind::Other, "no Location header"),
        ];
        for (path, kind, text) in cases {
            let (got, message) = fetch_err(&transport(), &server.url(path));
            assert_eq!(got, kind, "{path}");
            assert!(message.contains(text), "{path}: {message}");
        }
    }

    #[test]
    fn unsupported_schemes_are_refused() {
        for url in ["https://example.com/root.json", "ftp://example.com/x", "s3://bucket/x"] {
            let (kind, message) = fetch_err(&transport(), url);
            assert_eq!(kind, TransportErrorKind::UnsupportedUrlScheme, "{url}");
            assert!(message.contains("http:// and file://"), "{message}");
        }
    }

    #[test]
    fn file_urls() {
        let dir = std::env::temp_dir().join(format!("berth-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let body = noise(200_001, 14);
        std::fs::write(dir.join("1.root.json"), &*body).unwrap();
        let url = |name: &str| Url::from_file_path(dir.join(name)).unwrap().to_string();
        assert!(fetch(&transport(), &url("1.root.json")).unwrap() == *body);
        assert_eq!(fetch_err(&transport(), &url("2.root.json")).0, TransportErrorKind::FileNotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_response_heads_are_errors() {
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let cases = [
            ("SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed status line 'SSH-2.0-OpenSSH_9.6'"),
            (big.as_str(), "larger than 16384 bytes"),
            ("HTTP/1.1 200 OK\r\nContent-Le", "the connection closed after 27 bytes of the response head"),
            ("HTTP/1.1 200 OK\r\n", "the connection closed after 17 bytes of the response head"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length headers disagree"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding 'gzip'"),
        ];
        for (answer, text) in cases {
            let answer = answer.to_string();
            let server = Server::start(move |_, _, s| {
                let _ = s.write_all(answer.as_bytes());
            });
            let (kind, message) = fetch_err(&transport(), &server.url("/t"));
            assert_eq!(kind, TransportErrorKind::Other, "{text}");
            assert!(message.contains(text), "{text}: {message}");
        }
    }

    #[test]
    fn status_lines_and_headers() {
        let cases: [(&str, Option<(u16, Framing)>); 9] = [
            ("HTTP/1.1 200 OK\r\n\r\n", Some((200, Framing::Eof))),
            ("HTTP/1.0 204\r\n\r\n", Some((204, Framing::Length(0)))),
            ("HTTP/1.1 206 Partial\r\ncontent-LENGTH:  12 \r\n\r\n", Some((206, Framing::Length(12)))),
            (
                "HTTP/1.1 200 OK\r\nTRANSFER-encoding: gzip, Chunked\r\n\r\n",
                Some((200, Framing::Chunked { left: 0 })),
            ),
            ("HTTP/2 200 OK\r\n\r\n", None),
            ("HTTP/1.1 20 OK\r\n\r\n", None),
            ("HTTP/1.1 200OK\r\n\r\n", None),
            ("HTTP/1.1 200 OK\r\nno colon\r\n\r\n", None),
            ("HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n", None),
        ];
        for (head, want) in cases {
            let got = Head::parse(head.as_bytes()).and_then(|h| Ok((h.status, h.framing()?)));
            assert_eq!(got.ok(), want, "{head:?}");
        }
    }

    #[test]
    fn content_ranges() {
        let cases = [
            ("bytes 0-9/10", Some((0, 9, Some(10)))),
            ("bytes 5-9/*", Some((5, 9, None))),
            ("BYTES 5-9/10", Some((5, 9, Some(10)))),
            ("bytes 9-5/10", None),
            ("bytes */10", None),
            ("items 0-9/10", None),
            ("bytes -1-9/10", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_content_range(value), want, "{value}");
        }
    }

    #[test]
    fn request_heads() {
        let cases = [
            ("http://[::1]:8080/a/b?c=d#frag", "GET /a/b?c=d HTTP/1.1\r\nHost: [::1]:8080\r\n"),
            ("http://repo.example:80/x", "GET /x HTTP/1.1\r\nHost: repo.example\r\n"),
            ("http://10.0.2.2:8000", "GET / HTTP/1.1\r\nHost: 10.0.2.2:8000\r\n"),
        ];
        for (url, start) in cases {
            let head = request_head(&Url::parse(url).unwrap(), &[("Range", "bytes=5-".to_string())]);
            assert!(head.starts_with(start), "{url}: {head}");
            assert!(head.ends_with("Connection: close\r\nRange: bytes=5-\r\n\r\n"), "{url}: {head}");
        }
    }
}
