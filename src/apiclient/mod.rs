//! `apiclient`: talks HTTP/1.1 to Berth's API over its Unix socket.
//!
//! Today: `raw [-m METHOD] -u URI [-d DATA]` and `get [URI]`, each with `-s SOCKET`.
//! A non-2xx answer prints the server's error and exits non-zero.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/api.sock";

const USAGE: &str = "usage: apiclient [-s SOCKET] raw [-m METHOD] -u URI [-d DATA]
       apiclient [-s SOCKET] get [URI]";

/// Send one request; returns (status, body).
pub fn request(
    socket: &str,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("sending to {socket}: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| format!("reading from {socket}: {e}"))?;
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response (no header end)")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or("bad chunked body")?;
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| "bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).ok_or("short chunk")?);
        s = rest.get(n + 2..).ok_or("short chunk")?;
    }
}

pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("apiclient: {e}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut socket = DEFAULT_SOCKET.to_string();
    let mut rest: Vec<&str> = args.iter().map(String::as_str).collect();
    if rest.first() == Some(&"-s") || rest.first() == Some(&"--socket-path") {
        socket = rest.get(1).ok_or(USAGE)?.to_string();
        rest.drain(..2);
    }
    let (method, uri, data) = match rest.as_slice() {
        ["get"] => ("GET".to_string(), "/".to_string(), None),
        ["get", uri] => ("GET".to_string(), uri.to_string(), None),
        ["raw", opts @ ..] => {
            let (mut m, mut u, mut d) = ("GET".to_string(), None, None);
            let mut it = opts.iter();
            while let Some(o) = it.next() {
                let v = it.next().ok_or(USAGE)?;
                match *o {
                    "-m" | "--method" => m = v.to_string(),
                    "-u" | "--uri" => u = Some(v.to_string()),
                    "-d" | "--data" => d = Some(v.to_string()),
                    _ => return Err(USAGE.into()),
                }
            }
            (m, u.ok_or(USAGE)?, d)
        }
        _ => return Err(USAGE.into()),
    };
    let (status, body) = request(&socket, &method, &uri, data.as_deref())?;
    if (200..300).contains(&status) {
        print!("{body}");
        if !body.ends_with('\n') && !body.is_empty() {
            println!();
        }
        Ok(())
    } else {
        Err(format!("{method} {uri}: HTTP {status}: {}", body.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r, (200, "{}".into()));
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(r, (404, "abcde".into()));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn unreachable_socket_is_a_clear_error() {
        let e = request("/nonexistent/api.sock", "GET", "/", None).unwrap_err();
        assert!(e.contains("cannot connect to /nonexistent/api.sock"), "{e}");
    }
}
