//! An IMDSv2 client for EC2's instance metadata service, through the shared HTTP client
//! (`src/http`): user data, and the instance facts of [`super::ec2`].
//!
//! The flow is IMDSv2's only: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
//! gives a session token in the body; every `GET` carries it in `X-aws-ec2-metadata-token`. A
//! `GET` answers 200 with the item, or 404 when the instance has no such item (no user data, no
//! key pair). Any other status is an error naming the step. Berth never sends an IMDSv1 request
//! (a `GET` without a token), so instances launched with `HttpTokens=required` work.
//!
//! Plain HTTP only: IMDS is a link-local endpoint (169.254.169.254) that EC2 serves over HTTP
//! alone; TLS would have no certificate to check. One request per connection
//! (`Connection: close`). No redirects, no proxies.
//!
//! **Hop limit.** IMDS sends its token answer with an IP TTL of the instance's
//! `HttpPutResponseHopLimit` (1 by default), so the token reaches only callers that many hops
//! away. Berth asks from the host's own network namespace, one hop, which every setting allows;
//! it does not try to get around a lower limit. A token answer that never arrives looks like a
//! silent IMDS: a timeout, whose message names the hop limit.
//!
//! **Retries.** IMDS may not answer yet right after the interface came up: failures to connect,
//! connections closed before any response byte, and the statuses 429, 500, 502, 503 and 504 are
//! retried with a backoff that doubles from [`Imds::backoff`] up to [`MAX_BACKOFF`], at most
//! [`Imds::attempts`] times per request. A timeout is not retried: a service that accepts and
//! stays silent would only cost the timeout again.
//!
//! **Bounds.** Each request (connect, send, whole response) must finish within
//! [`Imds::timeout`]; a [`Session`] (the token and every request made with it) within
//! [`Imds::budget`], so a broken or hostile IMDS delays the boot by at most that much. Response
//! heads are capped by the HTTP module (16 KiB); bodies at [`MAX_BYTES`] for user data and
//! [`MAX_METADATA_BYTES`] for everything else. What the answers *mean* is checked by their
//! readers (`decode`, [`super::ec2`]), never trusted.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::MAX_BYTES;
use crate::http::client::{self, Connection, Options, Request};

/// IMDS's address on EC2.
pub const IMDS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80));

/// Time allowed for each request (connect to last body byte).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Time allowed for a whole session: the token and every request made with it. Each boot phase
/// that asks IMDS opens one session, so this bounds how long IMDS can hold up the boot (and
/// keeps a phase well inside the watchdog's 60 s).
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(20);

/// The longest wait between two attempts of one request.
pub const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// The most bytes of a metadata answer other than user data (an identity document is < 1 KiB,
/// an SSH public key < 4 KiB).
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// Session token lifetime asked for, in seconds (IMDS's maximum, 6 hours).
const TOKEN_TTL_SECONDS: u32 = 21600;

/// A request of the IMDSv2 flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImdsStep {
    /// `PUT /latest/api/token`.
    Token,
    /// `GET /latest/user-data`.
    UserData,
    /// `GET /latest/meta-data/<path>`.
    MetaData(&'static str),
    /// `GET /latest/dynamic/instance-identity/document`.
    Identity,
    /// `GET /latest/meta-data/public-keys/<n>/openssh-key`.
    PublicKey(u16),
}

impl ImdsStep {
    fn method(self) -> &'static str {
        match self {
            ImdsStep::Token => "PUT",
            _ => "GET",
        }
    }

    /// The request target.
    pub fn path(self) -> String {
        match self {
            ImdsStep::Token => "/latest/api/token".into(),
            ImdsStep::UserData => "/latest/user-data".into(),
            ImdsStep::MetaData(p) => format!("/latest/meta-data/{p}"),
            ImdsStep::Identity => "/latest/dynamic/instance-identity/document".into(),
            ImdsStep::PublicKey(n) => format!("/latest/meta-data/public-keys/{n}/openssh-key"),
        }
    }

    fn max_body(self) -> usize {
        match self {
            ImdsStep::UserData => MAX_BYTES,
            _ => MAX_METADATA_BYTES,
        }
    }
}

impl fmt::Display for ImdsStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.path())
    }
}

/// Why an IMDS request failed. The text names the service, its address and the step.
#[derive(Debug)]
pub enum ImdsError {
    /// IMDS could not be reached (connection refused, reset, no route), even after retries.
    Unreachable { addr: SocketAddr, step: ImdsStep, attempts: u32, cause: io::Error },
    /// IMDS accepted the connection but did not answer in time.
    Timeout { addr: SocketAddr, step: ImdsStep, after: Duration },
    /// The session's time budget ran out before or during this step.
    OutOfTime { addr: SocketAddr, step: ImdsStep, budget: Duration },
    /// The connection to IMDS failed partway through a response.
    Io { addr: SocketAddr, step: ImdsStep, cause: io::Error },
    /// IMDS answered with a status this step does not accept.
    Status { addr: SocketAddr, step: ImdsStep, status: u16, reason: String },
    /// IMDS answered something that is not a usable HTTP response, or a token that is not one.
    Response { addr: SocketAddr, step: ImdsStep, problem: String },
}

impl fmt::Display for ImdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (addr, step) = match self {
            ImdsError::Unreachable { addr, step, .. }
            | ImdsError::Timeout { addr, step, .. }
            | ImdsError::OutOfTime { addr, step, .. }
            | ImdsError::Io { addr, step, .. }
            | ImdsError::Status { addr, step, .. }
            | ImdsError::Response { addr, step, .. } => (addr, step),
        };
        write!(f, "EC2 IMDSv2 at {addr}: {step}: ")?;
        match self {
            ImdsError::Unreachable { attempts, cause, .. } => {
                write!(f, "cannot connect after {attempts} attempt(s): {cause}")
            }
            ImdsError::Timeout { after, .. } => write!(
                f,
                "no complete answer within {after:?}; check that the instance metadata service is \
                 enabled and its hop limit allows this host"
            ),
            ImdsError::OutOfTime { budget, .. } => {
                write!(f, "IMDS used up the {budget:?} it is given at boot; not asked")
            }
            ImdsError::Io { cause, .. } => write!(f, "{cause}"),
            ImdsError::Status { status, reason, .. } => {
                write!(f, "HTTP {status}")?;
                if !reason.is_empty() {
                    write!(f, " {}", reason.escape_debug())?;
                }
                match (step, status) {
                    (ImdsStep::Token, 403) => {
                        f.write_str(" (IMDS refused to issue a token; is it disabled?)")
                    }
                    (ImdsStep::Token, _) => Ok(()),
                    (_, 401) => f.write_str(" (the session token was refused)"),
                    _ => Ok(()),
                }
            }
            ImdsError::Response { problem, .. } => f.write_str(problem),
        }
    }
}

impl std::error::Error for ImdsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImdsError::Unreachable { cause, .. } | ImdsError::Io { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// An IMDSv2 client. [`Imds::new`] gives production defaults; the fields are public so tests
/// (and callers with unusual networks) can shorten the backoff or change the attempts.
#[derive(Debug, Clone)]
pub struct Imds {
    pub addr: SocketAddr,
    /// Time allowed for each request, from connect to the last body byte.
    pub timeout: Duration,
    /// Attempts per request (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; each further wait doubles, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Time allowed for a whole [`Session`].
    pub budget: Duration,
}

/// Fetch EC2 user data through IMDSv2 at `base` (production: [`IMDS_ADDR`]).
///
/// `Ok(None)` when IMDS answers 404: the instance has no user data.
pub fn from_imds(base: SocketAddr, timeout: Duration) -> Result<Option<Vec<u8>>, ImdsError> {
    Imds::new(base, timeout).user_data()
}

/// A response: status, reason phrase, body.
#[derive(Debug)]
pub(super) struct Response {
    pub(super) status: u16,
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

impl From<client::Error> for Failure {
    fn from(e: client::Error) -> Failure {
        match e {
            client::Error::Connect { cause, .. } | client::Error::NoResponse(cause) => {
                Failure::Retryable(cause)
            }
            client::Error::Timeout { .. } => Failure::Timeout,
            client::Error::Io { cause, .. } => Failure::Io(cause),
            client::Error::Malformed(problem) => Failure::Malformed(problem),
            other => Failure::Malformed(other.to_string()),
        }
    }
}

/// Statuses that mean "not now": IMDS throttling or still starting.
fn retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
}

/// A token and the deadline of everything asked with it.
pub struct Session<'a> {
    imds: &'a Imds,
    token: String,
    deadline: Instant,
}

impl Session<'_> {
    /// One item: `Some` on 200, `None` on 404, an error otherwise.
    pub fn get(&self, step: ImdsStep) -> Result<Option<Vec<u8>>, ImdsError> {
        let resp = self.imds.request(step, &[("X-aws-ec2-metadata-token", &self.token)], self.deadline)?;
        match resp.status {
            200 => Ok(Some(resp.body)),
            404 => Ok(None),
            _ => Err(self.imds.status_error(step, resp)),
        }
    }
}

impl Imds {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Imds {
        Imds { addr, timeout, attempts: 6, backoff: Duration::from_millis(250), budget: DEFAULT_BUDGET }
    }

    /// Get a session token; the session's requests must all end within [`Imds::budget`].
    pub fn session(&self) -> Result<Session<'_>, ImdsError> {
        let deadline = Instant::now() + self.budget;
        let step = ImdsStep::Token;
        let ttl = TOKEN_TTL_SECONDS.to_string();
        let resp = self.request(step, &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)], deadline)?;
        if resp.status != 200 {
            return Err(self.status_error(step, resp));
        }
        let problem = match std::str::from_utf8(&resp.body).map(str::trim) {
            Ok("") => "the token in the response is empty",
            Ok(t) if t.len() > 1024 => "the token is longer than 1024 bytes",
            Ok(t) if t.bytes().all(|b| b.is_ascii_graphic()) => {
                return Ok(Session { imds: self, token: t.to_string(), deadline })
            }
            _ => "the token has characters not allowed in an HTTP header",
        };
        Err(ImdsError::Response { addr: self.addr, step, problem: problem.to_string() })
    }

    /// Get a session token, then the user data with it.
    pub fn user_data(&self) -> Result<Option<Vec<u8>>, ImdsError> {
        self.session()?.get(ImdsStep::UserData)
    }

    fn status_error(&self, step: ImdsStep, resp: Response) -> ImdsError {
        ImdsError::Status { addr: self.addr, step, status: resp.status, reason: resp.reason }
    }

    /// One step's request, retried while IMDS is not (yet) answering, until `deadline`.
    fn request(
        &self,
        step: ImdsStep,
        headers: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<Response, ImdsError> {
        let attempts = self.attempts.max(1);
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            if Instant::now() >= deadline {
                return Err(ImdsError::OutOfTime { addr: self.addr, step, budget: self.budget });
            }
            let last = match self.once(step, headers, deadline) {
                Ok(resp) if !retryable_status(resp.status) => return Ok(resp),
                Ok(resp) => Ok(resp),
                Err(Failure::Retryable(e)) => Err(Failure::Retryable(e)),
                Err(f) => return Err(self.failure(step, attempt, f, deadline)),
            };
            if attempt >= attempts || Instant::now() + wait >= deadline {
                // Out of attempts or time: the last answer (a status the caller reports) or
                // failure stands.
                return last.map_err(|f| self.failure(step, attempt, f, deadline));
            }
            let why = match &last {
                Ok(resp) => format!("HTTP {}", resp.status),
                Err(f) => format!("{f:?}"),
            };
            log::info!("IMDS {step}: attempt {attempt} of {attempts}: {why}; trying again in {wait:?}");
            std::thread::sleep(wait);
            wait = (wait * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    fn failure(&self, step: ImdsStep, attempts: u32, failure: Failure, deadline: Instant) -> ImdsError {
        let addr = self.addr;
        match failure {
            Failure::Retryable(cause) => ImdsError::Unreachable { addr, step, attempts, cause },
            // The request's time was cut short by the session's.
            Failure::Timeout if Instant::now() + Duration::from_millis(5) >= deadline => {
                ImdsError::OutOfTime { addr, step, budget: self.budget }
            }
            Failure::Timeout => ImdsError::Timeout { addr, step, after: self.timeout },
            Failure::Io(cause) => ImdsError::Io { addr, step, cause },
            Failure::Malformed(problem) => ImdsError::Response { addr, step, problem },
        }
    }

    /// One connection: send the request, read one whole response, all before the earlier of
    /// the request's timeout and the session's deadline.
    fn once(&self, step: ImdsStep, headers: &[(&str, &str)], deadline: Instant) -> Result<Response, Failure> {
        let opts = Options {
            connect_timeout: self.timeout,
            io_timeout: self.timeout,
            deadline: Some((Instant::now() + self.timeout).min(deadline)),
            trust_bundle: None,
            proxy: None,
        };
        let mut conn = Connection::tcp(self.addr, &opts)?;
        let host = self.addr.to_string();
        let fields: Vec<(&str, &str)> =
            std::iter::once(("Connection", "close")).chain(headers.iter().copied()).collect();
        let target = step.path();
        let req =
            Request { method: step.method(), target: &target, host: &host, headers: &fields, body: b"" };
        let (head, body) = conn.exchange(&req, step.max_body())?;
        Ok(Response { status: head.status, reason: head.reason, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::userdata::tests::TempDir;
    use crate::userdata::{fetch, Error, Source};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
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
            let deadline = Instant::now() + Duration::from_secs(5);
            let resp = client.request(ImdsStep::UserData, headers, deadline).expect("an HTTP answer");
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
                "malformed status line 'SSH-2.0-OpenSSH'",
            ),
            (
                "closed mid-headers",
                raw(b"HTTP/1.1 200 OK\r\nContent-Le"),
                ImdsStep::UserData,
                "the connection closed after 27 bytes of the response head",
            ),
            (
                "short body",
                raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
                ImdsStep::UserData,
                "the connection closed after 3 of 10 bytes",
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
            assert!(msg.starts_with("EC2 IMDSv2 at 127.0.0.1:"), "{name}: {msg}");
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
                ImdsError::Timeout { step, after, .. } => {
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
        assert!(matches!(err, ImdsError::Unreachable { step: ImdsStep::Token, attempts: 6, .. }), "{err:?}");
        assert_eq!(server.seen().len(), 6);
    }

    #[test]
    fn not_ready_statuses_are_retried_with_backoff_and_others_are_not() {
        // IMDS still starting: 503 twice, then the real answers.
        let server = serve(|i, req| match i {
            0 | 1 => respond(503, "Service Unavailable", b""),
            _ => imds_flow(req, TOKEN, Some(USER_DATA)),
        });
        let client = Imds { backoff: Duration::from_millis(20), ..server.client(2000) };
        let t = Instant::now();
        assert_eq!(client.user_data().expect("third attempt works").as_deref(), Some(USER_DATA));
        assert!(t.elapsed() >= Duration::from_millis(60), "waited 20 ms, then 40 ms");
        assert_eq!(server.seen().len(), 4);

        // A 404 on the token, a 401, a 400: answers, not "not yet".
        for status in [400, 401, 403, 404] {
            let server = serve(move |_, _| respond(status, "", b""));
            let err = server.client(2000).user_data().expect_err("an error status");
            assert!(matches!(err, ImdsError::Status { status: s, .. } if s == status), "{err:?}");
            assert_eq!(server.seen().len(), 1, "HTTP {status} is not retried");
        }
    }

    #[test]
    fn a_session_is_bounded_in_time_and_reuses_its_token() {
        // Every GET is slow (150 ms); a budget of 400 ms allows two, then refuses to ask.
        let server = serve(|_, req| {
            if req.method == "GET" {
                std::thread::sleep(Duration::from_millis(150));
            }
            imds_flow(req, TOKEN, Some(USER_DATA))
        });
        let client = Imds { budget: Duration::from_millis(400), ..server.client(2000) };
        let session = client.session().expect("a token");
        let mut outcomes = Vec::new();
        for _ in 0..4 {
            outcomes.push(session.get(ImdsStep::UserData));
        }
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
        let err = outcomes.pop().unwrap().expect_err("out of time");
        assert!(matches!(err, ImdsError::OutOfTime { .. }), "{err:?}");
        assert!(err.to_string().contains("IMDS used up the 400ms it is given at boot"), "{err}");
        let puts = server.seen().iter().filter(|r| r.method == "PUT").count();
        assert_eq!(puts, 1, "one token for the session");
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
            ImdsError::Unreachable { step: ImdsStep::Token, attempts: 2, cause, .. } => {
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
            fetch(&sys.0, None, Some(serve(|_, _| respond(403, "", b"")).addr)).expect_err("403 is an error");
        assert!(matches!(err, Error::Imds(ImdsError::Status { status: 403, .. })), "{err:?}");
        assert!(err.to_string().starts_with("user data from EC2 IMDSv2 at 127.0.0.1:"), "{err}");
    }
}
