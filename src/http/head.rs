//! Message heads: requests (for the server) and responses (for the clients), parsed with
//! `httparse`, and what a head says about its body ([`Framing`]).
//!
//! httparse checks the syntax (tokens, the request target's characters, field names and
//! values, line ends; bare LF is accepted, obsolete line folding is not); this module adds
//! the rules it leaves to its caller: the size of the head, `Content-Length` (digits only,
//! repeated values must agree), transfer codings (only `chunked`), `Connection`, `Expect`,
//! the query's percent escapes, and the mapping of each failure to a status and a message
//! that names the offending line.

use std::fmt;

use super::{decode_component, printable, MAX_HEADERS};

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding, up to the zero-size chunk and the trailer.
    Chunked,
    /// Everything up to the end of the connection (responses only).
    Close,
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Framing::Length(n) => write!(f, "{n} bytes"),
            Framing::Chunked => write!(f, "a chunked body"),
            Framing::Close => write!(f, "a body without a length"),
        }
    }
}

/// Whether `s` is an RFC 9110 token (a method or a field name).
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// Header fields in order: names lowercased, values trimmed.
pub type Fields = Vec<(String, String)>;

/// The value of the first field called `name` (any case).
pub fn find<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The body length from every `Content-Length` field (each may be a list): all digits, all
/// equal. `None` without one.
pub fn content_length(fields: &[(String, String)]) -> Result<Option<u64>, String> {
    let mut length: Option<u64> = None;
    for (_, value) in fields.iter().filter(|(n, _)| n == "content-length") {
        for item in value.split(',').map(|v| v.trim_matches([' ', '\t'])) {
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("invalid Content-Length '{}'", printable(item.as_bytes())));
            }
            // All digits: it only fails to parse when it overflows, which is over any limit.
            let n = item.parse::<u64>().unwrap_or(u64::MAX);
            if length.is_some_and(|l| l != n) {
                return Err("Content-Length headers disagree".to_string());
            }
            length = Some(n);
        }
    }
    Ok(length)
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
    /// 431: the head is over the size limit or has too many fields.
    HeadersTooLarge { max: usize },
    /// 505: an HTTP version other than 1.0 and 1.1.
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
            HttpError::HeadersTooLarge { max } => write!(
                f,
                "the request line and headers are larger than the limit of {max} bytes or {MAX_HEADERS} fields"
            ),
            HttpError::VersionNotSupported(v) => {
                write!(f, "HTTP version '{v}' is not supported: use HTTP/1.1")
            }
        }
    }
}

impl std::error::Error for HttpError {}

/// A parsed request head: everything but the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path, without the query, not percent-decoded.
    pub path: String,
    /// The query's `name=value` pairs in order, percent-decoded, `+` as space.
    pub query: Vec<(String, String)>,
    pub headers: Fields,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub http_minor: u8,
    /// Body length from `Content-Length` (0 without one); at most the limit given.
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// Parse a request head from the start of `buf`: `Ok(None)` while more bytes are needed,
/// `Ok(Some((head, n)))` when the head is `buf[..n]` (the body starts at `buf[n]`).
///
/// A malformed request line is refused as soon as it is seen, before the head is complete.
/// Empty lines before the request line are skipped (RFC 9112 §2.2) but count toward
/// `max_head`. Only origin-form targets (`/path?query`) of visible ASCII are accepted.
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    max_body: usize,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let too_large = HttpError::HeadersTooLarge { max: max_head };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Complete(_)) => return Err(too_large),
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(too_large),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large),
        Err(e) => return Err(explain_request_error(buf, e)),
    };
    let (Some(method), Some(target), Some(http_minor)) = (req.method, req.path, req.version) else {
        return Err(HttpError::bad("incomplete request line"));
    };
    if !target.starts_with('/') || !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(HttpError::bad(
            "malformed request line: the target must be a path starting with '/' without spaces or control characters",
        ));
    }
    let mut headers = Vec::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let name = field.name.to_ascii_lowercase();
        let Ok(value) = std::str::from_utf8(field.value) else {
            return Err(HttpError::bad(format!("the value of header '{name}' is not valid UTF-8")));
        };
        headers.push((name, value.trim_matches([' ', '\t']).to_string()));
    }

    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, parse_query(query)?),
        None => (target, Vec::new()),
    };
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(HttpError::LengthRequired);
    }
    let content_length = match content_length(&headers).map_err(HttpError::BadRequest)? {
        None => 0,
        Some(n) => match usize::try_from(n) {
            Ok(n) if n <= max_body => n,
            _ => return Err(HttpError::BodyTooLarge { max: max_body }),
        },
    };

    let (mut close, mut keep) = (false, false);
    for (_, value) in headers.iter().filter(|(n, _)| n == "connection") {
        for token in value.split(',').map(|t| t.trim_matches([' ', '\t'])) {
            close |= token.eq_ignore_ascii_case("close");
            keep |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    let keep_alive = !close && (http_minor >= 1 || keep);
    let expect_continue = match find(&headers, "expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("100-continue") => http_minor >= 1,
        Some(v) => return Err(HttpError::ExpectationFailed(v.to_string())),
    };

    let head = RequestHead {
        method: method.to_string(),
        path: path.to_string(),
        query,
        headers,
        http_minor,
        content_length,
        keep_alive,
        expect_continue,
    };
    Ok(Some((head, used)))
}

/// `a=1&b=x+y&c` → [("a","1"), ("b","x y"), ("c","")].
fn parse_query(query: &str) -> Result<Vec<(String, String)>, HttpError> {
    let decode = |s: &str| {
        decode_component(s)
            .map_err(|why| HttpError::bad(format!("query '{}': {why}", printable(query.as_bytes()))))
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The lines of `buf` after skipped empty ones: the start line first.
fn lines(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    buf.split(|&b| b == b'\n').map(trim_cr).skip_while(|l| l.is_empty())
}

/// Turn httparse's error into the status and a message that names the line at fault.
fn explain_request_error(buf: &[u8], e: httparse::Error) -> HttpError {
    let mut lines = lines(buf);
    let request_line = lines.next().unwrap_or_default();
    match e {
        httparse::Error::Version => {
            let version = request_line.rsplit(|&b| b == b' ').next().unwrap_or_default();
            match version {
                [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
                    if major.is_ascii_digit() && minor.is_ascii_digit() =>
                {
                    HttpError::VersionNotSupported(printable(version))
                }
                _ => HttpError::bad("malformed request line: invalid HTTP version"),
            }
        }
        httparse::Error::Token => {
            HttpError::bad(format!("malformed request line '{}': {e}", printable(request_line)))
        }
        _ => match lines.take_while(|l| !l.is_empty()).find_map(field_problem) {
            Some(problem) => HttpError::bad(problem),
            None => HttpError::bad(format!("malformed request line '{}': {e}", printable(request_line))),
        },
    }
}

/// What is wrong with one header line, if anything.
fn field_problem(line: &[u8]) -> Option<String> {
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return Some("obsolete header line folding is not supported".to_string());
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Some(format!("malformed header line without a colon: '{}'", printable(line)));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Some(format!("invalid header name '{}'", printable(name)));
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Some(format!(
            "control character in the value of header '{}'",
            String::from_utf8_lossy(name).to_ascii_lowercase()
        ));
    }
    None
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub http_minor: u8,
    pub headers: Fields,
}

impl ResponseHead {
    /// The value of the first field called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }

    /// `HTTP/1.1 404 Not Found`, for messages.
    pub fn status_line(&self) -> String {
        format!("HTTP/1.{} {} {}", self.http_minor, self.status, self.reason).trim_end().to_string()
    }

    /// How the body of this response is delimited (RFC 9112 §6.3); `head_request`: it answers
    /// a `HEAD`, so it has none. Only the `chunked` transfer coding is understood.
    pub fn framing(&self, head_request: bool) -> Result<Framing, String> {
        if head_request || self.status < 200 || self.status == 204 || self.status == 304 {
            return Ok(Framing::Length(0));
        }
        let te: Vec<&str> =
            self.headers.iter().filter(|(n, _)| n == "transfer-encoding").map(|(_, v)| v.as_str()).collect();
        if !te.is_empty() {
            let codings: Vec<&str> = te
                .iter()
                .flat_map(|v| v.split(','))
                .map(|c| c.trim_matches([' ', '\t']))
                .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
                .collect();
            match codings.as_slice() {
                [] => {}
                [only] if only.eq_ignore_ascii_case("chunked") => return Ok(Framing::Chunked),
                _ => return Err(format!("unsupported Transfer-Encoding '{}'", te.join(", "))),
            }
        }
        Ok(content_length(&self.headers)?.map_or(Framing::Close, Framing::Length))
    }
}

/// Parse a response head from the start of `buf`: `Ok(None)` while more bytes are needed;
/// the head is at most `max_head` bytes.
pub fn parse_response(buf: &[u8], max_head: usize) -> Result<Option<(ResponseHead, usize)>, String> {
    let too_large = || format!("the response head is larger than {max_head} bytes");
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Complete(_)) => return Err(too_large()),
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!("the response has more than {MAX_HEADERS} header fields"))
        }
        Err(httparse::Error::Version | httparse::Error::Status) => {
            let line = lines(buf).next().unwrap_or_default();
            return Err(format!(
                "malformed status line '{}': expected 'HTTP/1.1 NNN reason'",
                printable(line)
            ));
        }
        Err(e) => {
            let problem = lines(buf).skip(1).take_while(|l| !l.is_empty()).find_map(field_problem);
            return Err(format!("malformed response head: {}", problem.unwrap_or_else(|| e.to_string())));
        }
    };
    let (Some(status), Some(http_minor)) = (resp.code, resp.version) else {
        return Err("incomplete status line".to_string());
    };
    if !(100..=599).contains(&status) {
        return Err(format!("invalid status code {status}"));
    }
    let headers = resp
        .headers
        .iter()
        .map(|f| {
            let value = String::from_utf8_lossy(f.value).trim_matches([' ', '\t']).to_string();
            (f.name.to_ascii_lowercase(), value)
        })
        .collect();
    let reason = resp.reason.unwrap_or_default().to_string();
    Ok(Some((ResponseHead { status, reason, http_minor, headers }, used)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::MAX_HEAD_BYTES;
    use proptest::prelude::*;

    const MAX_BODY: usize = 1024 * 1024;

    fn parse(input: &str) -> Result<Option<(RequestHead, usize)>, HttpError> {
        parse_request(input.as_bytes(), MAX_HEAD_BYTES, MAX_BODY)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn parses_good_requests() {
        // (input, method, path, query, headers, content length, keep-alive)
        type Case = (
            &'static str,
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
            &'static [(&'static str, &'static str)],
            usize,
            bool,
        );
        let cases: [Case; 7] = [
            ("GET / HTTP/1.1\r\n\r\n", "GET", "/", &[], &[], 0, true),
            (
                "GET /v1/settings?keys=motd&x=a+b%2Fc&flag HTTP/1.1\r\nHost: localhost\r\nAccept:application/json \r\n\r\n",
                "GET",
                "/v1/settings",
                &[("keys", "motd"), ("x", "a b/c"), ("flag", "")],
                &[("host", "localhost"), ("accept", "application/json")],
                0,
                true,
            ),
            (
                "PATCH /v1/settings HTTP/1.1\r\nContent-Type: application/json\r\nCONTENT-LENGTH: 12\r\n\r\n{\"motd\":\"x\"}",
                "PATCH",
                "/v1/settings",
                &[],
                &[("content-type", "application/json"), ("content-length", "12")],
                12,
                true,
            ),
            ("GET /a HTTP/1.1\r\nConnection: Close\r\n\r\n", "GET", "/a", &[], &[("connection", "Close")], 0, false),
            ("GET /a HTTP/1.0\r\n\r\n", "GET", "/a", &[], &[], 0, false),
            (
                "GET /a HTTP/1.0\r\nConnection: foo, keep-alive\r\n\r\n",
                "GET",
                "/a",
                &[],
                &[("connection", "foo, keep-alive")],
                0,
                true,
            ),
            // Leading empty lines, bare LF line ends, an odd method token, a repeated length.
            (
                "\r\n\nM-SEARCH /?%E2%9C%93=%20 HTTP/1.1\nX-Empty:\nContent-Length: 3, 3\n\nabc",
                "M-SEARCH",
                "/",
                &[("\u{2713}", " ")],
                &[("x-empty", ""), ("content-length", "3, 3")],
                3,
                true,
            ),
        ];
        for (input, method, path, query, headers, content_length, keep_alive) in cases {
            let (head, used) = match parse(input) {
                Ok(Some(parsed)) => parsed,
                other => panic!("{input:?}: {other:?}"),
            };
            assert_eq!(head.method, method, "{input:?}");
            assert_eq!(head.path, path, "{input:?}");
            assert_eq!(head.query, pairs(query), "{input:?}");
            assert_eq!(head.headers, pairs(headers), "{input:?}");
            assert_eq!(head.content_length, content_length, "{input:?}");
            assert_eq!(head.keep_alive, keep_alive, "{input:?}");
            assert_eq!(input.len() - used, content_length, "{input:?}: the body starts right after the head");
        }
    }

    #[test]
    fn rejects_bad_requests_with_their_status_and_a_reason() {
        let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(17000));
        let long_unfinished = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(17000));
        let many_fields = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        let cases: Vec<(&str, u16, &str)> = vec![
            ("GET /\r\n\r\n", 400, "request line"),
            ("GET  / HTTP/1.1\r\n\r\n", 400, "request line"),
            ("GET / HTTP/1.1 \r\n\r\n", 400, "request line"),
            ("G(T / HTTP/1.1\r\n\r\n", 400, "request line"),
            ("GET x HTTP/1.1\r\n\r\n", 400, "starting with '/'"),
            ("GET /\x01 HTTP/1.1\r\n\r\n", 400, "request line"),
            ("GET /\u{e9} HTTP/1.1\r\n\r\n", 400, "starting with '/'"),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", 400, "header line without a colon: 'no colon'"),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, "invalid header name 'Bad Name'"),
            ("GET / HTTP/1.1\r\nBad(Name: x\r\n\r\n", 400, "invalid header name 'Bad(Name'"),
            ("GET / HTTP/1.1\r\nName : x\r\n\r\n", 400, "invalid header name 'Name '"),
            ("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400, "folding"),
            ("GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400, "control character in the value of header 'a'"),
            ("GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400, ""),
            ("GET / HTTP/1.1\r\nA: \u{e9}\u{ff}\r\n\r\n", 200, ""),
            ("GET /?a=%zz HTTP/1.1\r\n\r\n", 400, "invalid percent escape"),
            ("GET /?a=%4 HTTP/1.1\r\n\r\n", 400, "invalid percent escape"),
            ("GET /?a=%ff HTTP/1.1\r\n\r\n", 400, "UTF-8"),
            ("POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400, "invalid Content-Length '1x'"),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
            ("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400, "Content-Length"),
            ("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "disagree"),
            ("POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400, "disagree"),
            ("GET / HTTP/1.x\r\n\r\n", 400, "invalid HTTP version"),
            ("GET / HTTPS/1.1\r\n\r\n", 400, "invalid HTTP version"),
            ("GET / HTTP/2.0\r\n\r\n", 505, "'HTTP/2.0'"),
            ("GET / HTTP/0.9\r\n\r\n", 505, "'HTTP/0.9'"),
            ("GET / HTTP/1.2\r\n\r\n", 505, "'HTTP/1.2'"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411, "Content-Length"),
            ("POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", 413, "1048576 bytes"),
            ("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 413, ""),
            ("POST / HTTP/1.1\r\nExpect: something\r\n\r\n", 417, "'something'"),
            (&long_header, 431, "16384 bytes"),
            (&long_unfinished, 431, ""),
            (&many_fields, 431, "64 fields"),
        ];
        for (input, status, reason) in cases {
            match parse(input) {
                Ok(Some(_)) if status == 200 => {}
                Err(e) => {
                    assert_eq!(e.status(), status, "{input:?}: {e}");
                    assert!(e.to_string().contains(reason), "{input:?}: {e} lacks {reason:?}");
                }
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

    fn response(input: &str) -> Result<(u16, Framing), String> {
        let (head, _) = parse_response(input.as_bytes(), MAX_HEAD_BYTES)?.ok_or("incomplete")?;
        Ok((head.status, head.framing(false)?))
    }

    #[test]
    fn response_heads_and_their_framing() {
        let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        type Case<'a> = (&'a str, Result<(u16, Framing), &'a str>);
        let cases: Vec<Case<'_>> = vec![
            ("HTTP/1.1 200 OK\r\n\r\n", Ok((200, Framing::Close))),
            ("HTTP/1.0 204\r\n\r\n", Ok((204, Framing::Length(0)))),
            ("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", Ok((304, Framing::Length(0)))),
            ("HTTP/1.1 206 Partial\r\ncontent-LENGTH:  12 \r\n\r\n", Ok((206, Framing::Length(12)))),
            (
                "HTTP/1.1 200 OK\r\nTRANSFER-encoding: Chunked\r\nContent-Length: 5\r\n\r\n",
                Ok((200, Framing::Chunked)),
            ),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: identity, chunked\r\n\r\n", Ok((200, Framing::Chunked))),
            ("HTTP/1.1 404 \r\n\r\n", Ok((404, Framing::Close))),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err("unsupported Transfer-Encoding 'gzip, chunked'"),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Err("unsupported Transfer-Encoding 'gzip'"),
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", Err("Content-Length headers disagree")),
            ("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Err("invalid Content-Length 'x'")),
            ("HTTP/2 200 OK\r\n\r\n", Err("malformed status line 'HTTP/2 200 OK'")),
            ("SSH-2.0-OpenSSH_9.6\r\n\r\n", Err("malformed status line 'SSH-2.0-OpenSSH_9.6'")),
            ("HTTP/1.1 20 OK\r\n\r\n", Err("malformed status line")),
            ("HTTP/1.1 200OK\r\n\r\n", Err("malformed status line")),
            ("HTTP/1.1 099 Odd\r\n\r\n", Err("invalid status code 99")),
            ("HTTP/1.1 200 OK\r\nno colon\r\n\r\n", Err("header line without a colon: 'no colon'")),
            ("HTTP/1.1 200 OK\r\nA: 1\r\n folded\r\n\r\n", Err("folding")),
            (&big, Err("larger than 16384 bytes")),
        ];
        for (input, want) in cases {
            match (response(input), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{input:?}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{input:?}: {got:?} lacks {want:?}"),
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
        let (head, _) = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", MAX_HEAD_BYTES).unwrap().unwrap();
        assert_eq!(head.framing(true), Ok(Framing::Length(0)), "the answer to HEAD has no body");
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n", MAX_HEAD_BYTES), Ok(None));
    }

    fn query_encode(s: &str) -> String {
        crate::http::encode_component(s)
    }

    fn any_string() -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..8).prop_map(String::from_iter)
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..1024),
            max_head in 0usize..2048,
            max_body in 0usize..2048,
        ) {
            let _ = parse_request(&bytes, max_head, max_body);
            let _ = parse_response(&bytes, max_head);
        }

        #[test]
        fn parse_request_never_panics_on_mangled_requests(
            at in any::<prop::sample::Index>(),
            junk in prop::collection::vec(any::<u8>(), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = b"POST /a?b=%41+c HTTP/1.1\r\nContent-Length: 3\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\nabc".to_vec();
            let at = at.index(bytes.len());
            bytes.splice(at..at, junk);
            let cut = cut.index(bytes.len() + 1);
            let _ = parse_request(&bytes[..cut], MAX_HEAD_BYTES, MAX_BODY);
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

            let (head, used) = parse_request(&bytes, MAX_HEAD_BYTES, MAX_BODY)
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
            prop_assert_eq!(parse_request(&bytes[..cut.index(head_len)], MAX_HEAD_BYTES, MAX_BODY), Ok(None));
        }
    }
}
