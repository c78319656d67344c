//! The HTTP/1.1 server of the settings API, on a Unix socket, generic over one handler function.
//!
//! What: [`serve`] accepts connections on a [`UnixListener`] and runs each on its own named
//! thread (`api-conn`, small stack), reading requests with [`parse_request`] (httparse
//! underneath) and bodies with the shared [`Body`] decoder, and answering each with one `write`
//! of a [`Response`] built by the handler. Connections persist (HTTP/1.1 keep-alive;
//! `Connection: close` honoured; HTTP/1.0 only with `Connection: keep-alive`).
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
//! | 431 | request line plus headers over `max_header_bytes`, or more than 64 header fields |
//! | 503 | `max_connections` open and none of them idle: answered and closed at once |
//! | 505 | an HTTP version other than 1.0 and 1.1 |
//! | 500 | the handler panicked (logged; the connection stays usable) |
//!
//! Request bodies are framed by `Content-Length` only. `Transfer-Encoding: chunked` gets 411
//! (Length Required) rather than 501: every client of this API sends a small JSON document whose
//! length it knows, 411 tells it exactly what to do instead, and refusing transfer codings
//! outright leaves no `Transfer-Encoding`/`Content-Length` ambiguity to smuggle requests through.
//! Responses are never chunked either: each carries `Content-Length` (except 204 and 304).
//!
//! Fairness: a connection is *idle* from its accept, and again after each response, until the
//! first byte of its next request; it is *busy* from that byte until its response is written.
//! When all `max_connections` are taken, the connection idle for longest is closed to make room
//! for the new one; only when every connection is busy is the new one refused with 503. So
//! clients that connect and say nothing (or keep-alive connections left open) cannot keep
//! anyone else out, and a client that is partway through a request is never cut off for
//! someone else (the whole-request deadline bounds how long it can hold its slot). A
//! keep-alive client may find its idle connection closed, as HTTP/1.1 allows at any idle
//! moment (RFC 9112 §9.6); if its next request was already on the way it gets no answer and
//! should retry on a new connection. Refused and evicted connections are logged at most once
//! every [`REFUSAL_LOG_INTERVAL`], with the counts since the previous line: a flood of clients
//! must not turn into a flood of console lines.
//!
//! Memory: a body is read into one buffer of exactly its `Content-Length` (read straight from
//! the socket into it, no growing copies); bodies over [`LARGE_BODY`] are handed to the handler
//! one at a time, so the handler's working copies of a large body (a JSON tree is several times
//! the size of its text) exist for one request at once, not for every connection. What bodies
//! can cost is thereby about `max_connections × max_body_bytes` plus one request's handling.
//!
//! Other deliberate limits: only origin-form targets (`/path?query`) are accepted; the path is
//! passed on as sent (not percent-decoded, so `%2F` cannot turn into a path separator); the query
//! is percent-decoded with `+` as space; `Host` is not required (there is no virtual hosting on
//! a Unix socket); the answer to a `HEAD` request is sent without its body (the handler sees
//! the method and decides the rest).
//!
//! Timeouts: idle connections are closed silently after `read_timeout`; a request that has
//! begun must be complete (head and body) within `read_timeout` of its first byte, or gets 408.
//! Both free the connection's slot. After an error answer the server stops writing and reads
//! (and discards) what the client still sends for at most `read_timeout`, so the client reads
//! the answer instead of a reset.
//!
//! Stopping: the `stop` flag is checked only between accepts, so whoever sets it should then
//! connect to the socket once to wake the accept loop. Open connections are not joined: each
//! answers the request it is on with `Connection: close`, and idle ones close within
//! `read_timeout`.

use std::io::{self, BufRead, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::body::Body;
pub use super::head::HttpError;
use super::head::{find, parse_request, Framing, RequestHead};
use super::io::{is_timeout, Buffered, Timed};

/// What serves every request: a pure function of the request, shared by all connections.
pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// Stack of each connection thread. Handlers parse JSON (serde_json stops at depth 128); the
/// test `nested_json_fits_in_connection_stack` checks that this is enough even in debug builds.
const CONN_STACK_BYTES: usize = 256 * 1024;
/// First size of a connection's read buffer; it grows up to `max_header_bytes + 1`.
const INITIAL_BUFFER: usize = 4096;
/// After an error answer, at most this much more is read and discarded before closing.
const LINGER_BYTES: usize = 1024 * 1024;
/// A connection's response buffer is released after a response larger than this.
const KEEP_OUT_BUFFER: usize = 256 * 1024;
/// Requests with a body larger than this are handled one at a time (see the module docs).
pub const LARGE_BODY: usize = 64 * 1024;
/// At most one log line per this interval about refused or evicted connections.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
        find(&self.headers, name)
    }
}

/// What the handler answers. `content_type` empty means no `Content-Type` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Set only by [`Response::upgrade`].
    pub upgrade: Option<Upgrade>,
}

/// A hand-over of the connection after a `101 Switching Protocols` answer (`apiclient exec`):
/// the function gets the socket, its timeouts cleared, and whatever the client sent after its
/// request. It runs on the connection's thread, whose slot is freed when it returns: it should
/// hand the socket on (to a process of its own) rather than serve it there.
#[derive(Clone)]
pub struct Upgrade {
    pub protocol: &'static str,
    pub take: Arc<dyn Fn(UnixStream, Vec<u8>) + Send + Sync>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upgrade({})", self.protocol)
    }
}

impl PartialEq for Upgrade {
    fn eq(&self, other: &Upgrade) -> bool {
        Arc::ptr_eq(&self.take, &other.take)
    }
}

impl Eq for Upgrade {}

impl Response {
    /// A JSON document.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response { status, content_type: "application/json", body, upgrade: None },
            // A `Value` always serializes; this only keeps the server from trusting that.
            Err(e) => Response::error(500, &format!("cannot serialize the response: {e}")),
        }
    }

    /// No body at all (for 204, or an empty answer with any other status).
    pub fn empty(status: u16) -> Response {
        Response { status, content_type: "", body: Vec::new(), upgrade: None }
    }

    /// `101 Switching Protocols` to `protocol`; the connection then belongs to `take`.
    pub fn upgrade(protocol: &'static str, take: Arc<dyn Fn(UnixStream, Vec<u8>) + Send + Sync>) -> Response {
        Response {
            status: 101,
            content_type: "",
            body: Vec::new(),
            upgrade: Some(Upgrade { protocol, take }),
        }
    }

    /// Plain UTF-8 text.
    pub fn text(status: u16, body: String) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into_bytes(), upgrade: None }
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
    /// Connections served at once (idle ones are closed for a new one; 503 when none is idle).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_header_bytes: super::MAX_HEAD_BYTES,
            max_body_bytes: 1024 * 1024,
            read_timeout: Duration::from_secs(5),
            max_connections: 32,
        }
    }
}

/// What the accept loop and the connections share.
struct Shared {
    limits: Limits,
    handler: Handler,
    stop: Arc<AtomicBool>,
    slots: Slots,
    /// Held while the handler serves a body over [`LARGE_BODY`].
    large_body: Mutex<()>,
}

/// The open connections: which are idle since when, and a handle to close each.
struct Slots {
    max: usize,
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    open: Vec<Slot>,
}

struct Slot {
    id: u64,
    /// `Some(since)` while idle; `None` while a request is being read or answered.
    idle_since: Option<Instant>,
    /// The connection's socket (a second descriptor), to shut it down on eviction.
    socket: UnixStream,
}

/// What [`Slots::admit`] decided for a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Admitted(u64),
    /// Admitted after closing the longest-idle connection.
    AdmittedByEviction(u64),
    /// Every slot is busy.
    Refused,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots { max, table: Mutex::new(SlotTable::default()) }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Give `stream` a slot, closing the longest-idle connection if all are taken.
    fn admit(&self, stream: &UnixStream) -> Admission {
        let Ok(socket) = stream.try_clone() else {
            // Out of descriptors: the same answer as out of slots.
            return Admission::Refused;
        };
        let mut table = self.table();
        let mut evicted = false;
        if table.open.len() >= self.max {
            let victim = table
                .open
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| slot.idle_since.map(|since| (since, i)))
                .min();
            let Some((_, i)) = victim else {
                return Admission::Refused;
            };
            let slot = table.open.swap_remove(i);
            // Its thread, blocked reading, sees the end of the stream and exits.
            let _ = slot.socket.shutdown(Shutdown::Both);
            evicted = true;
        }
        let id = table.next_id;
        table.next_id += 1;
        table.open.push(Slot { id, idle_since: Some(Instant::now()), socket });
        if evicted {
            Admission::AdmittedByEviction(id)
        } else {
            Admission::Admitted(id)
        }
    }

    /// Mark connection `id` idle (`true`) or busy (`false`). Returns false if it was evicted.
    /// A connection already idle keeps the time it became idle (its accept, for a new one), so
    /// how soon its thread gets to run does not change who has been idle the longest.
    fn mark(&self, id: u64, idle: bool) -> bool {
        match self.table().open.iter_mut().find(|slot| slot.id == id) {
            Some(slot) => {
                slot.idle_since =
                    if idle { Some(slot.idle_since.unwrap_or_else(Instant::now)) } else { None };
                true
            }
            None => false,
        }
    }

    fn release(&self, id: u64) {
        self.table().open.retain(|slot| slot.id != id);
    }
}

/// Frees a connection's slot when dropped.
struct SlotGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.shared.slots.release(self.id);
    }
}

/// Counts refused and evicted connections and logs them at most once per interval.
struct RefusalLog {
    interval: Duration,
    last: Option<Instant>,
    refused: u64,
    evicted: u64,
}

impl RefusalLog {
    fn new(interval: Duration) -> RefusalLog {
        RefusalLog { interval, last: None, refused: 0, evicted: 0 }
    }

    fn note(&mut self, refused: bool, max: usize) {
        if refused {
            self.refused += 1;
        } else {
            self.evicted += 1;
        }
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.interval) {
            return;
        }
        log::warn!(
            "api: all {max} connections in use: {} new connection(s) refused with 503, {} idle one(s) \
             closed to make room (counts since the last such line; at most one every {} s)",
            self.refused,
            self.evicted,
            self.interval.as_secs()
        );
        (self.last, self.refused, self.evicted) = (Some(now), 0, 0);
    }
}

/// Serve `listener` until `stop` is set; see the module docs.
///
/// Never returns an error: accept failures are logged (rate-limited, and when out of
/// descriptors waited out briefly) and the loop goes on. The flag is checked after each accept,
/// so whoever sets it should connect once to wake this loop. The listener is switched to
/// blocking mode.
pub fn serve(listener: UnixListener, limits: Limits, handler: Handler, stop: Arc<AtomicBool>) {
    if let Err(e) = listener.set_nonblocking(false) {
        log::warn!("api: cannot make the listener blocking: {e}");
    }
    let slots = Slots::new(limits.max_connections);
    let shared = Arc::new(Shared { limits, handler, stop, slots, large_body: Mutex::new(()) });
    let mut refusals = RefusalLog::new(REFUSAL_LOG_INTERVAL);
    let mut last_accept_error: Option<Instant> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                if last_accept_error.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    log::warn!("api: accept failed: {e} (logged at most every {REFUSAL_LOG_INTERVAL:?})");
                    last_accept_error = Some(Instant::now());
                }
                let exhausted = [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM];
                if e.raw_os_error().is_some_and(|n| exhausted.contains(&n)) {
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let max = shared.limits.max_connections;
        let id = match shared.slots.admit(&stream) {
            Admission::Admitted(id) => id,
            Admission::AdmittedByEviction(id) => {
                refusals.note(false, max);
                id
            }
            Admission::Refused => {
                refusals.note(true, max);
                reject_busy(stream);
                continue;
            }
        };
        let guard = SlotGuard { shared: Arc::clone(&shared), id };
        let spawned = thread::Builder::new().name("api-conn".to_string()).stack_size(CONN_STACK_BYTES).spawn(
            move || {
                let shared = Arc::clone(&guard.shared);
                let mut conn = Conn::new(stream, &shared, id);
                conn.run();
                // Free the slot before the client can see the connection close, so a client that
                // reconnects after reading to the end is never refused for its own old slot.
                drop(guard);
                drop(conn);
            },
        );
        if let Err(e) = spawned {
            // The closure (stream and guard) is dropped: the client sees the connection close.
            log::error!("api: cannot start a connection thread: {e}");
        }
    }
}

/// Answer 503 without ever blocking the accept loop: non-blocking write, drain, close.
fn reject_busy(mut stream: UnixStream) {
    let mut out = Vec::new();
    let response = Response::error(503, "too many connections, all busy: retry shortly");
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

/// One connection: its socket behind a buffer, its slot, the output buffer.
struct Conn<'a> {
    io: Buffered<Timed<UnixStream>>,
    shared: &'a Shared,
    id: u64,
    out: Vec<u8>,
}

impl<'a> Conn<'a> {
    fn new(stream: UnixStream, shared: &'a Shared, id: u64) -> Conn<'a> {
        let timed = Timed::new(stream, shared.limits.read_timeout);
        Conn { io: Buffered::new(timed, INITIAL_BUFFER), shared, id, out: Vec::new() }
    }

    fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    fn run(&mut self) {
        loop {
            if self.io.buffer().is_empty() && !self.wait_for_request() {
                return;
            }
            // The request has begun (its first byte is here): it must be complete in time.
            let deadline = Instant::now() + self.limits().read_timeout;
            self.io.get_mut().set_deadline(Some(deadline));
            let head = match self.read_head() {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(e) => return self.fail(&e),
            };
            let body = match self.read_body(&head) {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(e) => return self.fail(&e),
            };
            self.io.get_mut().set_deadline(None);
            let keep_alive = head.keep_alive && !self.shared.stop.load(Ordering::Relaxed);
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
            let response = {
                let _turn = (request.body.len() > LARGE_BODY)
                    .then(|| self.shared.large_body.lock().unwrap_or_else(PoisonError::into_inner));
                call_handler(&self.shared.handler, &request)
            };
            drop(request.body);
            self.out.clear();
            encode_response(&mut self.out, &response, request.method == "HEAD", connection);
            if let Err(e) = self.io.get_mut().write_all(&self.out) {
                log::debug!("api: cannot write a response: {e}");
                return;
            }
            if let Some(up) = response.upgrade {
                let leftover = self.io.buffer().to_vec();
                let stream = self.io.get_ref().get_ref().try_clone();
                match stream.and_then(|s| s.set_read_timeout(None).and(s.set_write_timeout(None)).map(|_| s))
                {
                    Ok(s) => (up.take)(s, leftover),
                    Err(e) => log::warn!("api: cannot hand the connection over to {}: {e}", up.protocol),
                }
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

    /// Idle until the first byte of the next request: false when the connection is over (closed
    /// by the client, idle for `read_timeout`, or evicted to make room for another).
    fn wait_for_request(&mut self) -> bool {
        if !self.shared.slots.mark(self.id, true) {
            return false;
        }
        self.io.get_mut().set_deadline(None);
        let max = self.limits().max_header_bytes.saturating_add(1);
        loop {
            match self.io.fill_more(max) {
                Ok(0) => return false,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.shared.slots.mark(self.id, false)
    }

    /// Answer `error`, then read what the client still sends for a while before closing.
    fn fail(&mut self, error: &HttpError) {
        log::debug!("api: {error}");
        self.io.get_mut().set_deadline(None);
        self.out.clear();
        let response = Response::error(error.status(), &error.to_string());
        encode_response(&mut self.out, &response, false, ConnectionHeader::Close);
        if self.io.get_mut().write_all(&self.out).is_err() || *error == HttpError::Timeout {
            return;
        }
        let _ = self.io.get_ref().get_ref().shutdown(Shutdown::Write);
        let linger_until = Instant::now() + self.limits().read_timeout;
        self.io.get_mut().set_deadline(Some(linger_until));
        let mut budget = LINGER_BYTES;
        let mut scratch = [0u8; 4096];
        while budget > 0 {
            match self.io.read(&mut scratch) {
                Ok(0) => return,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Read the head of a request whose first bytes are buffered. `Ok(None)`: the connection is
    /// over (closed by the client or broken) and gets no answer.
    fn read_head(&mut self) -> Result<Option<RequestHead>, HttpError> {
        let limits = self.limits();
        let (max_head, max_body) = (limits.max_header_bytes, limits.max_body_bytes);
        let mut parse = true;
        loop {
            if parse {
                if let Some((head, used)) = parse_request(self.io.buffer(), max_head, max_body)? {
                    self.io.consume(used);
                    return Ok(Some(head));
                }
            }
            let before = self.io.buffer().len();
            match self.io.fill_more(max_head.saturating_add(1)) {
                Ok(0) => return Ok(None),
                Ok(_) => {
                    // The head can only end, and the request line only be judged, at a newline.
                    let all = self.io.buffer();
                    parse = all[before..].contains(&b'\n') || all.len() > max_head;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => parse = false,
                Err(e) if is_timeout(&e) => return Err(HttpError::Timeout),
                Err(e) => {
                    log::debug!("api: read failed: {e}");
                    return Ok(None);
                }
            }
        }
    }

    /// The body that follows `head`; `Ok(None)` if the client went away.
    fn read_body(&mut self, head: &RequestHead) -> Result<Option<Vec<u8>>, HttpError> {
        let want = head.content_length;
        if want == 0 {
            return Ok(Some(Vec::new()));
        }
        if head.expect_continue
            && self.io.buffer().len() < want
            && self.io.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return Ok(None);
        }
        match Body::new(&mut self.io, Framing::Length(want as u64)).read_all(want) {
            Ok(body) => Ok(Some(body)),
            Err(e) if is_timeout(&e) => Err(HttpError::Timeout),
            Err(e) => {
                log::debug!("api: reading a request body: {e}");
                Ok(None)
            }
        }
    }
}

/// Run the handler; a panic becomes a logged 500, and a status it may not send becomes 500 too.
fn call_handler(handler: &Handler, request: &Request) -> Response {
    match panic::catch_unwind(AssertUnwindSafe(|| handler(request))) {
        Ok(response) if (200..=599).contains(&response.status) => response,
        Ok(response) if response.status == 101 && response.upgrade.is_some() => response,
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
    if let Some(up) = &response.upgrade {
        let _ = write!(out, "Connection: Upgrade\r\nUpgrade: {}\r\n\r\n", up.protocol);
        return;
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
        101 => "Switching Protocols",
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
    use std::io::{BufRead, BufReader};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    #[test]
    fn request_helpers_find_first_match() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
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

    #[test]
    fn eviction_takes_the_longest_idle_and_never_a_busy_one() {
        let slots = Slots::new(2);
        let (a, _a) = UnixStream::pair().unwrap();
        let (b, _b) = UnixStream::pair().unwrap();
        let (c, _c) = UnixStream::pair().unwrap();
        let (d, _d) = UnixStream::pair().unwrap();
        let Admission::Admitted(first) = slots.admit(&a) else { panic!() };
        let Admission::Admitted(second) = slots.admit(&b) else { panic!() };
        assert!(slots.mark(second, false), "second is busy");
        // The first is idle: it makes room.
        let Admission::AdmittedByEviction(third) = slots.admit(&c) else { panic!() };
        assert!(!slots.mark(first, false), "the evicted connection learns it is gone");
        let mut byte = [0u8; 1];
        assert_eq!((&a).read(&mut byte).unwrap(), 0, "its socket was shut down");
        assert!(slots.mark(third, false));
        assert_eq!(slots.admit(&d), Admission::Refused, "all busy");
        slots.release(second);
        assert!(matches!(slots.admit(&d), Admission::Admitted(_)));
    }

    #[test]
    fn refusals_are_logged_once_per_interval() {
        let mut log = RefusalLog::new(Duration::from_secs(3600));
        log.note(true, 32);
        assert_eq!((log.refused, log.evicted), (0, 0), "the first one is logged at once");
        for _ in 0..1000 {
            log.note(true, 32);
        }
        log.note(false, 32);
        assert_eq!((log.refused, log.evicted), (1000, 1), "the rest are counted, not logged");
        log.last = Some(Instant::now() - Duration::from_secs(3600));
        log.note(true, 32);
        assert_eq!((log.refused, log.evicted), (0, 0), "a line with the counts once the interval is over");
    }

    // ---- Real sockets ----

    static NEXT_SERVER: AtomicU32 = AtomicU32::new(0);

    fn test_handler(request: &Request) -> Response {
        match request.path.as_str() {
            "/panic" => panic!("test handler panics on purpose"),
            "/echo" => Response {
                status: 200,
                content_type: "application/octet-stream",
                body: request.body.clone(),
                upgrade: None,
            },
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
            find(&self.headers, name)
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
            let length = find(&headers, "content-length").map_or(0, |v| v.parse().unwrap());
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
    fn extra_connection_gets_503_when_none_is_idle() {
        let server = TestServer::start(TestServer::limits(2000, 1));
        let mut first = server.connect();
        // Partway through a request: busy, so it keeps its slot.
        first.send(b"GET /again HTTP/1.1\r\n");
        thread::sleep(Duration::from_millis(100));
        let mut second = server.connect();
        let reply = second.reply();
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["status"], 503);
        assert!(second.closed());
        // The first connection is unaffected; once it closes, its slot is free.
        first.send(b"Connection: close\r\n\r\n");
        assert_eq!(first.reply().status, 200);
        assert!(first.closed());
        assert_eq!(server.connect().get("/third").status, 200);
    }

    #[test]
    fn an_idle_connection_makes_room_for_a_new_one() {
        let server = TestServer::start(TestServer::limits(2000, 1));
        let mut first = server.connect();
        assert_eq!(first.get("/").status, 200);
        // Idle after its answer: the new connection takes its place. (The server marks a
        // connection idle just after it answers; the sleeps give it that moment.)
        thread::sleep(Duration::from_millis(100));
        let mut second = server.connect();
        assert_eq!(second.get("/second").status, 200);
        assert!(first.closed(), "the idle connection was closed");
        // Never-used connections are idle too.
        thread::sleep(Duration::from_millis(100));
        let mut silent = server.connect();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(server.connect().get("/fourth").status, 200);
        assert!(silent.closed());
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
