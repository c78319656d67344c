//! The updater's transport for tough: fetches TUF metadata and image targets over HTTP/1.1 or
//! HTTPS (or from `file://` URLs), through the shared HTTP client (`src/http`), and resumes a
//! large download where a dropped connection left it.
//!
//! Why our own transport: tough's `http` feature brings reqwest and hyper into PID 1 for a job
//! that is one `GET` at a time from one repository. TUF gives integrity (every file is checked
//! against signed lengths and hashes); TLS adds privacy and keeps a network attacker from
//! serving stale-but-signed metadata or wasting downloads. Server certificates are checked
//! against the trust bundle (`/etc/pki/tls/certs/ca-bundle.crt`: the image's CAs plus
//! `settings.pki`); a refused certificate is an error that says why (unknown issuer, expired,
//! wrong name) and is not retried.
//!
//! What a fetch does: `GET` with `Host`, `User-Agent` and `Connection: close`, up to
//! [`MAX_REDIRECTS`] redirects (http and https; https to http is refused), then the body as a
//! stream of [`CHUNK`]-sized pieces, never buffered whole (targets are hundreds of MiB). 404
//! and 410 are [`FileNotFound`], which tough needs to see the end of the `root.json` chain; any
//! other non-2xx is an error naming the status line. Bodies are framed by `Content-Length`,
//! chunked transfer coding, or the end of the connection (the shared framing code).
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
//! Time bounds, per download (one fetch, its redirects and resumes together): it must be
//! complete within `deadline` (default [`DEFAULT_DEADLINE`]), and once its body has begun, every
//! `throughput_window` must bring at least `min_throughput × throughput_window` bytes (default
//! [`DEFAULT_MIN_THROUGHPUT`] over [`DEFAULT_THROUGHPUT_WINDOW`]). So a server that answers one
//! byte every 29 s (each read within the 30 s read timeout) is given up after a minute instead
//! of keeping the updater busy for ever. Both are errors that name the bound, and neither is
//! retried: a new connection to the same server would be no faster.
//!
//! Limits: blocking I/O inside the async API (the updater runs tough on a current-thread runtime
//! in its own thread, so nothing else waits behind it); resolved addresses are tried in turn,
//! each within `connect_timeout`; through `proxy` (a CONNECT tunnel, [`crate::http::proxy`]) for
//! the URLs it applies to; no content codings or keep-alive. A request that
//! fails before its body begins is not retried here: that is the caller's to decide.
//!
//! [`FileNotFound`]: TransportErrorKind::FileNotFound

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;
use tough::{SafeUrlPath, Transport, TransportError, TransportErrorKind, TransportStream};
use url::{Position, Url};

use crate::http::body::Body;
use crate::http::client::{self, Connection, Options, Request};
use crate::http::head::{Framing, ResponseHead};
use crate::http::io::is_timeout;
use crate::http::proxy::Proxy;
use crate::http::tls::TlsError;

/// Redirects followed per request.
pub const MAX_REDIRECTS: usize = 5;
/// The size of the pieces a body is read and delivered in.
pub const CHUNK: usize = 64 * 1024;
/// The longest wait between two attempts to resume.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one download may take, all of it.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60 * 60);
/// The slowest a download may go, in bytes per second over each window.
pub const DEFAULT_MIN_THROUGHPUT: u64 = 16 * 1024;
/// The window the throughput is measured over.
pub const DEFAULT_THROUGHPUT_WINDOW: Duration = Duration::from_secs(60);

const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));
const SCHEMES: &str = "Berth's updater fetches over http://, https:// and file:// only";

/// A [`tough::Transport`] for `http://`, `https://` and `file://` URLs; see the module docs.
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
    /// Each download ends, done or failed, within this.
    pub deadline: Duration,
    /// Bytes per second a download must keep up over each `throughput_window`.
    pub min_throughput: u64,
    pub throughput_window: Duration,
    /// The CAs trusted for https (`None`: the rendered trust bundle, or the image's).
    pub trust_bundle: Option<PathBuf>,
    /// The proxy (`settings.network.https-proxy`, `no-proxy`) for the URLs it applies to.
    pub proxy: Option<Proxy>,
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
            deadline: DEFAULT_DEADLINE,
            min_throughput: DEFAULT_MIN_THROUGHPUT,
            throughput_window: DEFAULT_THROUGHPUT_WINDOW,
            trust_bundle: None,
            proxy: None,
            resumes: Arc::new(AtomicU32::new(0)),
        }
    }
}

#[tough::async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "http" | "https" => self.fetch_http(url),
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
        let deadline = Instant::now() + self.deadline;
        let (source, conn, head) = self.open(&url, &[], deadline).map_err(|f| f.into_error(&url))?;
        let framing = match head.status {
            200..=299 => head.framing(false).map_err(|e| Fault::Fatal(TransportErrorKind::Other, e)),
            404 | 410 => Err(Fault::Fatal(TransportErrorKind::FileNotFound, answered(&head))),
            _ => Err(Fault::Fatal(TransportErrorKind::Other, answered(&head))),
        }
        .map_err(|f| f.into_error(&url))?;
        let total = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let download = Download {
            transport: self.clone(),
            url,
            source,
            body: Body::new(conn.into_io(), framing),
            total,
            delivered: 0,
            etag: head.header("etag").map(str::to_string),
            last_modified: head.header("last-modified").map(str::to_string),
            attempts: 0,
            backoff: self.backoff,
            deadline,
            window: (Instant::now(), 0),
            done: false,
        };
        Ok(Box::pin(Pull(download)))
    }

    /// Send a `GET` for `url` with `extra` headers, following redirects: the URL that answered,
    /// the connection positioned at the body, and the head of the answer.
    fn open(
        &self,
        url: &Url,
        extra: &[(&str, String)],
        deadline: Instant,
    ) -> Result<(Url, Connection, ResponseHead), Fault> {
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let (conn, head) = self.exchange(&url, extra, deadline)?;
            if !matches!(head.status, 301 | 302 | 303 | 307 | 308) {
                return Ok((url, conn, head));
            }
            let fatal = |kind, why: String| Fault::Fatal(kind, format!("{url}: {}: {why}", answered(&head)));
            let location = head
                .header("location")
                .ok_or_else(|| fatal(TransportErrorKind::Other, "no Location header".to_string()))?;
            let next = url
                .join(location)
                .map_err(|e| fatal(TransportErrorKind::Other, format!("bad Location '{location}': {e}")))?;
            match (url.scheme(), next.scheme()) {
                ("https", "http") => {
                    return Err(fatal(
                        TransportErrorKind::Other,
                        format!("redirected to {next}: a redirect from https to http is refused"),
                    ))
                }
                (_, "http" | "https") => {}
                _ => {
                    return Err(fatal(
                        TransportErrorKind::UnsupportedUrlScheme,
                        format!("redirected to {next}: {SCHEMES}"),
                    ))
                }
            }
            url = next;
        }
        Err(Fault::Fatal(
            TransportErrorKind::Other,
            format!("more than {MAX_REDIRECTS} redirects, the last to {url}"),
        ))
    }

    /// One request and the head of its answer.
    fn exchange(
        &self,
        url: &Url,
        extra: &[(&str, String)],
        deadline: Instant,
    ) -> Result<(Connection, ResponseHead), Fault> {
        let opts = Options {
            connect_timeout: self.connect_timeout,
            io_timeout: self.read_timeout,
            deadline: Some(deadline),
            trust_bundle: self.trust_bundle.clone(),
            proxy: self.proxy.clone(),
        };
        let past = |e: client::Error| {
            if Instant::now() >= deadline {
                Fault::Fatal(TransportErrorKind::Other, self.deadline_passed())
            } else {
                fault(e)
            }
        };
        let mut conn = Connection::open(url, &opts).map_err(past)?;
        let (target, host) = target_and_host(url);
        let mut headers = vec![("User-Agent", USER_AGENT), ("Connection", "close")];
        headers.extend(extra.iter().map(|(n, v)| (*n, v.as_str())));
        let req = Request { method: "GET", target: &target, host: &host, headers: &headers, body: b"" };
        let head = conn.send(&req).map_err(past)?;
        Ok((conn, head))
    }

    fn deadline_passed(&self) -> String {
        format!("the download did not finish within its deadline of {} s", self.deadline.as_secs())
    }
}

/// The origin-form target and the `Host` value (with the port when it is not the default).
pub(crate) fn target_and_host(url: &Url) -> (String, String) {
    let target = &url[Position::BeforePath..Position::AfterQuery];
    let target = if target.is_empty() { "/" } else { target };
    let mut host = url.host_str().unwrap_or_default().to_string();
    if let Some(port) = url.port() {
        host = format!("{host}:{port}");
    }
    (target.to_string(), host)
}

/// "the server answered 'HTTP/1.1 500 Internal Server Error'".
fn answered(head: &ResponseHead) -> String {
    format!("the server answered '{}'", head.status_line())
}

/// Why a request failed, before it becomes a [`TransportError`].
#[derive(Debug)]
enum Fault {
    /// The network failed: worth another attempt when resuming.
    Io(String),
    /// The answer rules the request out (status, malformed head, a refused certificate, a
    /// changed file, a bound passed).
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

/// A client error as a fault: network trouble may be retried, the rest may not.
fn fault(e: client::Error) -> Fault {
    match e {
        client::Error::Malformed(_) | client::Error::Url(_) => {
            Fault::Fatal(TransportErrorKind::Other, e.to_string())
        }
        client::Error::Tls(TlsError::Io { .. }) => Fault::Io(e.to_string()),
        client::Error::Tls(_) => Fault::Fatal(TransportErrorKind::Other, e.to_string()),
        client::Error::Proxy { retry: false, .. } => Fault::Fatal(TransportErrorKind::Other, e.to_string()),
        _ => Fault::Io(e.to_string()),
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

/// A blocking pull source as a [`Stream`]: each poll blocks until the next piece is there.
struct Pull<I>(I);

impl<I: Iterator<Item = Result<Bytes, TransportError>> + Unpin> Stream for Pull<I> {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.next())
    }
}

/// Up to `max` bytes from `from`: empty only at its end.
fn read_some(from: &mut impl Read, max: usize) -> io::Result<Bytes> {
    let mut buf = vec![0; max];
    loop {
        match from.read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Bytes::from(buf));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
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
struct Download {
    transport: HttpTransport,
    /// What was asked for (named in errors), and the URL that answered (asked again to resume).
    url: Url,
    source: Url,
    /// The body on the current connection.
    body: Body<client::Io>,
    /// The whole length, for a `Content-Length` body (the only kind that is resumed).
    total: Option<u64>,
    /// Bytes of the whole body delivered so far, over every connection.
    delivered: u64,
    /// The first answer's validators, sent in `If-Range` and compared with a later `200`.
    etag: Option<String>,
    last_modified: Option<String>,
    /// Attempts to resume since the last byte arrived, and the wait before the next.
    attempts: u32,
    backoff: Duration,
    /// The whole download ends by then.
    deadline: Instant,
    /// When the current throughput window began, and the bytes that arrived in it.
    window: (Instant, u64),
    done: bool,
}

impl fmt::Debug for Download {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Download({} at byte {}, of {:?})", self.url, self.delivered, self.total)
    }
}

impl Iterator for Download {
    type Item = Result<Bytes, TransportError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_piece() {
            Ok(Some(piece)) => {
                self.delivered += piece.len() as u64;
                self.window.1 += piece.len() as u64;
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

impl Download {
    fn fatal(&self, why: String) -> TransportError {
        TransportError::new_with_cause(TransportErrorKind::Other, &self.url, why)
    }

    /// The end of the current throughput window.
    fn window_end(&self) -> Instant {
        self.window.0 + self.transport.throughput_window
    }

    /// Give up once the deadline has passed or the last window brought too few bytes; start
    /// the next window when one is over.
    fn check_time(&mut self) -> Result<(), TransportError> {
        let now = Instant::now();
        if now >= self.deadline {
            let why = format!("{}; {} bytes had arrived", self.transport.deadline_passed(), self.delivered);
            return Err(self.fatal(why));
        }
        if now >= self.window_end() {
            let window = self.transport.throughput_window;
            let want = (self.transport.min_throughput as f64 * window.as_secs_f64()) as u64;
            if self.window.1 < want {
                let why = format!(
                    "the download is too slow: {} bytes in the last {} s, below the minimum of {} bytes/s \
                     ({} bytes had arrived)",
                    self.window.1,
                    window.as_secs(),
                    self.transport.min_throughput,
                    self.delivered
                );
                return Err(self.fatal(why));
            }
            self.window = (now, 0);
        }
        Ok(())
    }

    fn next_piece(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            self.check_time()?;
            // No read may block past the deadline or the end of the throughput window.
            let until = self.deadline.min(self.window_end());
            self.body.get_mut().get_mut().set_deadline(Some(until));
            let cause = match read_some(&mut self.body, CHUNK) {
                Ok(piece) if !piece.is_empty() => {
                    self.attempts = 0;
                    self.backoff = self.transport.backoff;
                    return Ok(Some(piece));
                }
                Ok(_) => return Ok(None),
                // Our own bound (the deadline, or the window's end) passed: judge it above.
                // (The stream calls a deadline within a millisecond passed.)
                Err(e) if is_timeout(&e) && Instant::now() + Duration::from_millis(1) >= until => continue,
                Err(e) => e,
            };
            let resumable = !matches!(cause.kind(), io::ErrorKind::InvalidData);
            match self.total {
                Some(total) if resumable => {
                    let why = match cause.kind() {
                        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
                        _ => client::cause_text(&cause),
                    };
                    self.resume(total, why)?;
                }
                _ => {
                    let why = format!(
                        "the download broke after {} bytes: {}",
                        self.delivered,
                        client::cause_text(&cause)
                    );
                    return Err(self.fatal(why));
                }
            }
        }
    }

    /// Connect again and position the new connection at byte `delivered`, or give up.
    fn resume(&mut self, total: u64, mut cause: String) -> Result<(), TransportError> {
        loop {
            if self.attempts >= self.transport.retries {
                let why = format!(
                    "connection dropped after {} of {total} bytes ({} retries without progress): {cause}",
                    self.delivered, self.attempts
                );
                return Err(self.fatal(why));
            }
            self.check_time()?;
            self.attempts += 1;
            log::warn!(
                "{}: connection dropped after {} of {total} bytes ({cause}); resuming in {:?} (retry {} of {})",
                self.url,
                self.delivered,
                self.backoff,
                self.attempts,
                self.transport.retries
            );
            thread::sleep(self.backoff.min(self.deadline.saturating_duration_since(Instant::now())));
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
        let (_, conn, head) = self.transport.open(&self.source, &extra, self.deadline)?;
        let fatal =
            |why: String| Fault::Fatal(TransportErrorKind::Other, format!("resuming at byte {at}: {why}"));
        let framing = head.framing(false).map_err(fatal)?;
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
                if !matches!(framing, Framing::Close) && framing != Framing::Length(total - at) {
                    return Err(fatal(format!("206 with {framing}, not {} bytes", total - at)));
                }
                // The rest of the file, exactly, whatever ends the answer.
                self.body = Body::new(conn.into_io(), Framing::Length(total - at));
            }
            200 => {
                self.check_unchanged(&head, framing, total)?;
                let mut body = Body::new(conn.into_io(), Framing::Length(total));
                let skipped = io::copy(&mut (&mut body).take(at), &mut io::sink()).map_err(|e| {
                    Fault::Io(format!(
                        "skipping {at} bytes the server sent again: {}",
                        client::cause_text(&e)
                    ))
                })?;
                if skipped < at {
                    let why =
                        format!("the connection closed after {skipped} of {at} bytes the server sent again");
                    return Err(Fault::Io(why));
                }
                self.body = body;
            }
            500..=599 => return Err(Fault::Io(answered(&head))),
            _ => return Err(fatal(answered(&head))),
        }
        Ok(())
    }

    /// A `200` to a range request: the same file (the server ignores ranges), or a new one.
    fn check_unchanged(&self, head: &ResponseHead, framing: Framing, total: u64) -> Result<(), Fault> {
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
    use crate::http::testing::{temp_file, ConnectProxy, ProxyMode, Server, TestCa};
    use std::io::Write;
    use tough::IntoVec;

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
        s: &mut dyn Write,
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
    fn send_chunked(s: &mut dyn Write, body: &[u8], cut: Option<usize>) {
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
                "/ftp" => "307 Temporary Redirect\r\nLocation: ftp://example.com/x".to_string(),
                "/none" => "302 Found".to_string(),
                _ => "308 Permanent Redirect\r\nLocation: /loop".to_string(),
            };
            let answer = if answer.contains("\r\n\r\n") { answer } else { answer + "\r\n\r\n" };
            let _ = s.write_all(format!("HTTP/1.1 {answer}").as_bytes());
        });
        assert_eq!(fetch(&transport(), &server.url("/a/x")).unwrap(), b"hello");
        let cases = [
            ("/loop", TransportErrorKind::Other, "more than 5 redirects"),
            ("/ftp", TransportErrorKind::UnsupportedUrlScheme, "redirected to ftp://example.com/x"),
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
        for url in ["ftp://example.com/x", "s3://bucket/x"] {
            let (kind, message) = fetch_err(&transport(), url);
            assert_eq!(kind, TransportErrorKind::UnsupportedUrlScheme, "{url}");
            assert!(message.contains("http://, https:// and file://"), "{message}");
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
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(crate::http::MAX_HEAD_BYTES));
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
    fn request_targets_and_hosts() {
        let cases = [
            ("http://[::1]:8080/a/b?c=d#frag", "/a/b?c=d", "[::1]:8080"),
            ("http://repo.example:80/x", "/x", "repo.example"),
            ("https://repo.example:443/x", "/x", "repo.example"),
            ("https://repo.example:8443/x%20y", "/x%20y", "repo.example:8443"),
            ("http://10.0.2.2:8000", "/", "10.0.2.2:8000"),
        ];
        for (url, target, host) in cases {
            assert_eq!(
                target_and_host(&Url::parse(url).unwrap()),
                (target.to_string(), host.to_string()),
                "{url}"
            );
        }
    }

    // ---- Time bounds ----

    /// A head for `len` bytes, then one byte every `every` until `stop` or the client leaves.
    fn trickle(s: &mut dyn Write, len: usize, every: Duration, stop: usize) {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
        if s.write_all(head.as_bytes()).and_then(|()| s.flush()).is_err() {
            return;
        }
        for _ in 0..stop {
            thread::sleep(every);
            if s.write_all(b"x").and_then(|()| s.flush()).is_err() {
                return;
            }
        }
    }

    #[test]
    fn a_server_that_trickles_within_the_read_timeout_is_given_up_on() {
        // Scaled down from "one byte every 29 s with a 30 s read timeout": every read succeeds
        // in time, so only the throughput bound can end it. (25 bytes/s against a 1 s read
        // timeout: a loaded machine's late wake-ups stay far inside it.)
        let server = Server::start(|_, _, s| trickle(s, 1000, Duration::from_millis(40), 1000));
        let t = HttpTransport {
            read_timeout: Duration::from_secs(1),
            min_throughput: 100,
            throughput_window: Duration::from_millis(500),
            ..transport()
        };
        let (kind, message) = fetch_err(&t, &server.url("/slow"));
        assert_eq!(kind, TransportErrorKind::Other);
        assert!(message.contains("/slow"), "{message}");
        assert!(message.contains("the download is too slow"), "{message}");
        assert!(message.contains("below the minimum of 100 bytes/s"), "{message}");
        assert_eq!(server.requests().len(), 1, "not resumed: a new connection would be no faster");
    }

    #[test]
    fn a_download_past_its_deadline_is_given_up_on() {
        type Script = Box<dyn Fn(usize, &str, &mut dyn Write) + Send + Sync>;
        let cases: [(&str, Script); 3] = [
            // A server that never answers the request: bounded by the deadline, not the 30 s
            // read timeout.
            ("silent", Box::new(|_, _, _| thread::sleep(Duration::from_secs(5)))),
            // A head, then nothing.
            ("stalled", Box::new(|_, _, s| trickle(s, 1000, Duration::from_secs(5), 1))),
            // Steady, fast enough for the throughput bound, but never done.
            ("endless", Box::new(|_, _, s| trickle(s, 1_000_000, Duration::from_millis(10), 10_000))),
        ];
        for (name, script) in cases {
            let server = Server::start(script);
            let t = HttpTransport { deadline: Duration::from_millis(600), min_throughput: 0, ..transport() };
            let (kind, message) = fetch_err(&t, &server.url("/t"));
            assert_eq!(kind, TransportErrorKind::Other, "{name}");
            assert!(message.contains("did not finish within its deadline"), "{name}: {message}");
        }
    }

    // ---- HTTPS ----

    /// A CA, a bundle file trusting it, and a transport that uses that bundle.
    fn trusting(ca: &TestCa) -> HttpTransport {
        let bundle = temp_file("ca.pem", ca.pem().as_bytes());
        HttpTransport { trust_bundle: Some(bundle), ..transport() }
    }

    #[test]
    fn https_downloads_resume_like_http() {
        let ca = TestCa::new("Berth test CA");
        let body = noise(3 * 1024 * 1024, 15);
        let served = body.clone();
        let config = ca.server(&["127.0.0.1"], false).config();
        let server = Server::start_tls(config, move |n, req, s| {
            send_file(s, req, &served, "ETag: \"v1\"", true, (n == 0).then_some(1_000_003))
        });
        let t = trusting(&ca);
        assert!(fetch(&t, &server.url("/t")).unwrap() == *body);
        assert_eq!(t.resumes.load(Ordering::Relaxed), 1);
        assert!(server.requests()[1].contains("\r\nRange: bytes=1000003-\r\n"), "{:?}", server.requests());
    }

    #[test]
    fn bad_certificates_are_refused_with_the_reason() {
        let ca = TestCa::new("Berth test CA");
        let other = TestCa::new("Some other CA");
        let cases = [
            (
                "wrong CA",
                other.server(&["127.0.0.1"], false),
                "not signed by a certificate authority this host trusts (unknown issuer)",
            ),
            (
                "expired",
                ca.server(&["127.0.0.1"], true),
                "the server's certificate has expired: it was valid until 2020-01-01",
            ),
            (
                "wrong name",
                ca.server(&["repo.example"], false),
                "not valid for the name '127.0.0.1' (it is for: repo.example)",
            ),
        ];
        for (name, cert, text) in cases {
            let server = Server::start_tls(cert.config(), |_, _, s| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            });
            let (kind, message) = fetch_err(&trusting(&ca), &server.url("/1.root.json"));
            assert_eq!(kind, TransportErrorKind::Other, "{name}");
            assert!(message.contains("TLS handshake with 127.0.0.1 failed: "), "{name}: {message}");
            assert!(message.contains(text), "{name}: {message}");
            assert_eq!(server.connections(), 1, "{name}: one attempt, not retried");
            assert!(server.requests().iter().all(String::is_empty), "{name}: no request sent");
        }
    }

    #[test]
    fn https_redirects_stay_on_https() {
        let ca = TestCa::new("Berth test CA");
        let plain = Server::start(|_, _, s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain");
        });
        let to_plain = plain.url("/x");
        let server = Server::start_tls(ca.server(&["127.0.0.1"], false).config(), move |_, req, s| {
            let answer = match req.split(' ').nth(1).unwrap_or_default() {
                "/down" => format!("302 Found\r\nLocation: {to_plain}\r\nContent-Length: 0\r\n\r\n"),
                "/moved" => {
                    "301 Moved Permanently\r\nLocation: /here\r\nContent-Length: 0\r\n\r\n".to_string()
                }
                _ => "200 OK\r\nContent-Length: 6\r\n\r\nsecure".to_string(),
            };
            let _ = s.write_all(format!("HTTP/1.1 {answer}").as_bytes());
        });
        let t = trusting(&ca);
        assert_eq!(fetch(&t, &server.url("/moved")).unwrap(), b"secure");
        let (_, message) = fetch_err(&t, &server.url("/down"));
        assert!(message.contains("a redirect from https to http is refused"), "{message}");
        assert!(plain.requests().is_empty());
    }

    // ---- through a proxy ----

    fn via(t: HttpTransport, proxy: &str, no_proxy: &[&str]) -> HttpTransport {
        let np: Vec<String> = no_proxy.iter().map(|s| s.to_string()).collect();
        HttpTransport { proxy: Some(Proxy::new(proxy, &np).unwrap()), ..t }
    }

    #[test]
    fn https_goes_through_a_connect_tunnel_to_the_origin() {
        let ca = TestCa::new("Berth test CA");
        let body = noise(300 * 1024, 7);
        let served = body.clone();
        // The name exists only for the proxy: the client cannot have gone around it.
        let server = Server::start_tls(ca.server(&["repo.test"], false).config(), move |_, req, s| {
            send_file(s, req, &served, "", false, None)
        });
        let origin = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let proxy = ConnectProxy::start(ProxyMode::Tunnel { names: vec![("repo.test".into(), origin)] });
        let with_auth = proxy.url().replace("http://", "http://me:s%3Acret@");
        let t = via(trusting(&ca), &with_auth, &[".example", "10.0.0.0/8"]);
        let url = format!("https://repo.test:{}/targets/t", server.port);
        assert!(fetch(&t, &url).unwrap() == *body);
        let heads = proxy.heads();
        assert_eq!(heads.len(), 1, "{heads:?}");
        let want = format!("CONNECT repo.test:{0} HTTP/1.1\r\nHost: repo.test:{0}\r\n", server.port);
        assert!(heads[0].starts_with(&want), "{heads:?}");
        assert!(heads[0].contains("\r\nProxy-Authorization: Basic bWU6czpjcmV0\r\n"), "me:s:cret: {heads:?}");
        // Inside the tunnel: the origin-form request, TLS with the origin's name.
        let origin_saw = server.requests();
        assert!(origin_saw[0].starts_with("GET /targets/t HTTP/1.1\r\n"), "{origin_saw:?}");
        assert!(origin_saw[0].contains(&format!("Host: repo.test:{}", server.port)), "{origin_saw:?}");
        // Plain http goes through a tunnel as well.
        let plain = Server::start(|_, _, s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain");
        });
        let plain_addr = format!("127.0.0.1:{}", plain.port).parse().unwrap();
        let proxy = ConnectProxy::start(ProxyMode::Tunnel { names: vec![("plain.test".into(), plain_addr)] });
        let t = via(transport(), &proxy.url(), &[]);
        assert_eq!(fetch(&t, &format!("http://plain.test:{}/x", plain.port)).unwrap(), b"plain");
        assert!(proxy.heads()[0].starts_with(&format!("CONNECT plain.test:{} HTTP/1.1", plain.port)));
        // The certificate is checked for the origin's name, not the proxy's.
        let wrong = Server::start_tls(ca.server(&["other.test"], false).config(), |_, _, _| {});
        let wrong_addr = format!("127.0.0.1:{}", wrong.port).parse().unwrap();
        let proxy = ConnectProxy::start(ProxyMode::Tunnel { names: vec![("repo.test".into(), wrong_addr)] });
        let t = via(trusting(&ca), &proxy.url(), &[]);
        let (_, message) = fetch_err(&t, &format!("https://repo.test:{}/x", wrong.port));
        assert!(message.contains("not valid for the name 'repo.test'"), "{message}");
    }

    #[test]
    fn no_proxy_goes_around_the_proxy() {
        let server = Server::start(|_, _, s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ndirect");
        });
        let proxy = ConnectProxy::start(ProxyMode::Refuse("403 Forbidden"));
        // Loopback is always bypassed; `localhost` by name, and an entry of the user's.
        for (url, no_proxy) in [
            (server.url("/x"), &[][..]),
            (format!("http://localhost:{}/x", server.port), &[][..]),
            (server.url("/x"), &["127.0.0.0/8"][..]),
        ] {
            let t = via(transport(), &proxy.url(), no_proxy);
            assert_eq!(fetch(&t, &url).unwrap(), b"direct", "{url}");
        }
        assert!(proxy.heads().is_empty(), "{:?}", proxy.heads());
    }

    #[test]
    fn proxy_failures_are_clear_and_bounded() {
        let p = |mode| ConnectProxy::start(mode);
        let big = format!("HTTP/1.1 200 OK\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000)).into_bytes();
        let cases: [(ConnectProxy, &str); 6] = [
            (
                p(ProxyMode::Refuse("403 Forbidden")),
                "CONNECT repo.test:443 refused: 'HTTP/1.1 403 Forbidden'",
            ),
            (p(ProxyMode::Refuse("407 Proxy Authentication Required")), "it wants credentials"),
            (p(ProxyMode::Raw(Vec::new())), "the proxy closed the connection before answering"),
            (p(ProxyMode::Raw(b"HTTP/1.1 200 OK\r\nX".to_vec())), "closed the connection after 18 bytes"),
            (p(ProxyMode::Raw(big)), "the response head is larger than 8192 bytes"),
            (p(ProxyMode::Silent), "timed out waiting for the proxy's answer (CONNECT repo.test:443)"),
        ];
        for (proxy, text) in cases {
            let t = HttpTransport {
                read_timeout: Duration::from_millis(300),
                ..via(transport(), &proxy.url(), &[])
            };
            let (kind, message) = fetch_err(&t, "https://repo.test/1.root.json");
            assert_eq!(kind, TransportErrorKind::Other, "{text}");
            let want = format!("through the proxy {}: ", proxy.url());
            assert!(message.contains(&want), "{message}");
            assert!(message.contains(text), "{message} lacks {text:?}");
        }
        // Nothing listens there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let t = via(transport(), &format!("127.0.0.1:{closed}"), &[]);
        let (_, message) = fetch_err(&t, "https://repo.test/x");
        assert!(
            message.contains(&format!("through the proxy http://127.0.0.1:{closed}: cannot connect")),
            "{message}"
        );
    }
}
