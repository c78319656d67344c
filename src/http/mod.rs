//! Berth's one HTTP/1.1 stack: the API server and every client (apiclient, the IMDS client, the
//! update transport, the API load generator) share the code that reads and writes messages.
//!
//! - [`head`]: request and response heads, parsed by the `httparse` crate, and what they say
//!   about the body ([`head::Framing`]).
//! - [`body`]: the one body-framing implementation: `Content-Length`, chunked transfer coding,
//!   and read-to-close, behind one [`std::io::Read`].
//! - [`io`]: a buffered stream that can hold a whole head ([`io::Buffered`]) and a stream
//!   wrapper that enforces a per-read timeout and an overall deadline ([`io::Timed`]).
//! - [`server`]: the API's server on a Unix socket (accept loop, connection bounds, eviction
//!   of idle connections, timeouts).
//! - [`client`]: blocking connections over a Unix socket, TCP, or TLS.
//! - [`tls`]: TLS for the client with rustls (aws-lc-rs provider) and the trust bundle built
//!   from the image's CA bundle and `settings.pki`.
//!
//! Why our own code rather than a framework: the server is PID 1's settings API and must bound
//! what any client can cost it (connections, head and body sizes, a whole-request deadline,
//! idle clients evicted before new ones are refused); tiny_http cannot time out slow or
//! half-open clients nor bound connections on a Unix socket. The clients make one blocking
//! request at a time from threads that have nothing else to do, which hyper/reqwest (and an
//! async runtime in PID 1 for them) would not make simpler, only larger. What a crate does
//! well is taken from it: heads from httparse, escapes from percent-encoding, TLS from rustls.
//!
//! Limits that hold for every message, server or client side: a head (start line, fields,
//! blank line) is at most [`MAX_HEAD_BYTES`] with at most [`MAX_HEADERS`] fields; a line of a
//! chunked body at most [`MAX_CHUNK_LINE`] bytes and its trailer at most [`MAX_HEAD_BYTES`].
//! Body sizes, timeouts and deadlines are each caller's (the server's [`server::Limits`], the
//! clients' [`client::Options`]).

pub mod body;
pub mod client;
pub mod head;
pub mod io;
pub mod proxy;
pub mod server;
#[cfg(test)]
pub mod testing;
pub mod tls;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// The most a head may take: start line, header fields and the blank line.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The most header fields in one head.
pub const MAX_HEADERS: usize = 64;
/// The most a line of a chunked body (a chunk-size line or a trailer field) may take.
pub const MAX_CHUNK_LINE: usize = 4096;

/// What stays as it is in a query component: RFC 3986's unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `s` percent-encoded for a query component (`settings.a b` → `settings.a%20b`).
pub fn encode_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

/// A query component decoded: `%XX` escapes, and `+` as a space. Every `%` must start a
/// two-digit hex escape and the result must be UTF-8; the error says which rule `s` breaks.
pub fn decode_component(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
        if !(hex(i + 1) && hex(i + 2)) {
            return Err("invalid percent escape");
        }
    }
    let plus_as_space = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| "not valid UTF-8 once decoded")
}

/// At most 40 characters of `bytes`, control characters shown as `?`, for error messages.
pub fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().take(40).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_round_trip() {
        let cases = [
            ("settings.a b", "settings.a%20b"),
            ("x=y&z", "x%3Dy%26z"),
            ("-._~", "-._~"),
            ("\u{2713}/", "%E2%9C%93%2F"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(encode_component(plain), encoded);
            assert_eq!(decode_component(encoded).as_deref(), Ok(plain));
        }
    }

    #[test]
    fn decoding_is_strict() {
        assert_eq!(decode_component("a+b%2B").as_deref(), Ok("a b+"));
        assert_eq!(decode_component("%zz"), Err("invalid percent escape"));
        assert_eq!(decode_component("%4"), Err("invalid percent escape"));
        assert_eq!(decode_component("%"), Err("invalid percent escape"));
        assert_eq!(decode_component("%ff"), Err("not valid UTF-8 once decoded"));
    }
}
