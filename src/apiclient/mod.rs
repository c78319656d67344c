//! `apiclient`: talks HTTP/1.1 to Berth's API over its Unix socket.
//!
//! Commands (each may follow `-s SOCKET`):
//! - `get [PREFIX | /URI]`: settings under a prefix (`settings.network`), or any GET route
//! - `set KEY=VALUE...` | `set -j JSON`: change settings in one transaction, commit and apply
//! - `apply FILE... | -`: TOML (`[settings.x]`, optionally gzip) or JSON files, one transaction
//! - `raw [-m METHOD] -u URI [-d DATA]`, `reboot`
//! - `update check`: refresh the update list and show what would be taken
//! - `update apply [--reboot]`: prepare (with progress) and activate the chosen update
//! - `update cancel`: stop a running prepare; otherwise deactivate an activated update before
//!   its reboot
//!
//! A non-2xx answer prints the server's error and exits non-zero.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/api.sock";

const USAGE: &str = "usage: apiclient [-s SOCKET] get [PREFIX | /URI]
       apiclient [-s SOCKET] set KEY=VALUE... | set -j JSON
       apiclient [-s SOCKET] apply FILE... | apply -
       apiclient [-s SOCKET] raw [-m METHOD] -u URI [-d DATA]
       apiclient [-s SOCKET] reboot
       apiclient [-s SOCKET] update check | apply [--reboot] | cancel";

/// Send one request; returns (status, body).
pub fn request(socket: &str, method: &str, uri: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("cannot connect to {socket}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("sending to {socket}: {e}"))?;
    let resp = read_response(&mut s).map_err(|e| format!("reading from {socket}: {e}"))?;
    parse_response(&resp)
}

/// One response: the head, then a Content-Length body, a chunked body up to its last chunk,
/// or (neither) everything to EOF. Not waiting for EOF when the length is known matters on
/// the host side of a VM's virtio-serial bridge, which cannot close the connection.
fn read_response(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut resp = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut body_len: Option<(usize, usize)> = None; // (head end, content length)
    let mut chunked_from: Option<usize> = None;
    loop {
        if let Some((head, len)) = body_len {
            if resp.len() >= head + len {
                resp.truncate(head + len);
                return Ok(resp);
            }
        }
        if let Some(head) = chunked_from {
            if resp[head..].ends_with(b"\r\n0\r\n\r\n") || &resp[head..] == b"0\r\n\r\n" {
                return Ok(resp);
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(resp);
        }
        resp.extend_from_slice(&buf[..n]);
        if body_len.is_none() && chunked_from.is_none() {
            if let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
                let header = |name: &str| {
                    head.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                };
                let status = head.split_whitespace().nth(1).unwrap_or("");
                if status == "204" || status == "304" {
                    body_len = Some((end + 4, 0));
                } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
                    chunked_from = Some(end + 4);
                } else if let Some(len) = header("content-length:").and_then(|v| v.parse().ok()) {
                    body_len = Some((end + 4, len));
                }
            }
        }
    }
}

fn parse_response(resp: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP response (no header end)")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("malformed HTTP status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_string() };
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
    match rest.as_slice() {
        ["get"] => show(call(&socket, "GET", "/settings", None)?, true),
        ["get", uri] if uri.starts_with('/') => show(call(&socket, "GET", uri, None)?, false),
        ["get", prefix] => {
            show(call(&socket, "GET", &format!("/settings?prefix={}", encode(prefix)), None)?, true)
        }
        ["set", "-j", json] => {
            let v: serde_json::Value =
                serde_json::from_str(json).map_err(|e| format!("-j: malformed JSON: {e}"))?;
            transaction(&socket, "/settings", &unwrap_settings(v))
        }
        ["set", pairs @ ..] if !pairs.is_empty() => {
            let mut body = serde_json::Map::new();
            for p in pairs {
                let (k, v) = p.split_once('=').ok_or_else(|| format!("'{p}' is not KEY=VALUE"))?;
                body.insert(k.to_string(), scalar(k, v));
            }
            transaction(&socket, "/settings/keypair", &serde_json::Value::Object(body))
        }
        ["apply", files @ ..] if !files.is_empty() => {
            let mut patch = serde_json::Value::Object(serde_json::Map::new());
            for f in files {
                let bytes = if *f == "-" {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b).map_err(|e| format!("stdin: {e}"))?;
                    b
                } else {
                    std::fs::read(f).map_err(|e| format!("{f}: {e}"))?
                };
                let v = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) => unwrap_settings(v),
                    Err(_) => crate::userdata::decode(&bytes).map_err(|e| format!("{f}: {e}"))?,
                };
                crate::settings::store::merge(&mut patch, &v);
            }
            transaction(&socket, "/settings", &patch)
        }
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
            let body = call(&socket, &m, &u.ok_or(USAGE)?, d.as_deref())?;
            print!("{body}");
            if !body.is_empty() && !body.ends_with('\n') {
                println!();
            }
            Ok(())
        }
        ["reboot"] => call(&socket, "POST", "/actions/reboot", None).map(drop),
        ["update", "check"] => update_check(&socket),
        ["update", "apply"] => update_apply(&socket, false),
        ["update", "apply", "--reboot"] => update_apply(&socket, true),
        ["update", "cancel"] => {
            // A running prepare is stopped; without one, cancel-update answers 409 and the
            // activated update (if any) is deactivated instead.
            match request(&socket, "POST", "/actions/cancel-update", None)? {
                (200, _) => println!("prepare cancelled: the slot it was writing is left unbootable"),
                (202, _) => {
                    println!("cancel requested: the prepare stops at its next chunk (see /updates/status)")
                }
                (409, _) => {
                    call(&socket, "POST", "/actions/deactivate-update", None)?;
                    println!("update deactivated: the running version boots next");
                }
                (status, text) => {
                    return Err(format!("POST /actions/cancel-update: HTTP {status}: {}", text.trim()))
                }
            }
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn status(socket: &str) -> Result<serde_json::Value, String> {
    let body = call(socket, "GET", "/updates/status", None)?;
    serde_json::from_str(&body).map_err(|e| format!("/updates/status: malformed JSON: {e}"))
}

/// Start a long updater command and wait for it, showing progress on stderr; the command's
/// error is returned as ours.
fn run_update_command(socket: &str, action: &str, cmd: &str) -> Result<serde_json::Value, String> {
    call(socket, "POST", &format!("/actions/{action}"), None)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_pct = None;
    loop {
        let st = status(socket)?;
        let rec = &st["most_recent_command"];
        if rec["cmd_type"] == cmd && rec["cmd_status"] != "Running" {
            if tty && last_pct.is_some() {
                eprintln!();
            }
            return match rec["cmd_status"].as_str() {
                Some("Success") => Ok(st),
                _ => Err(format!("{cmd} failed: {}", rec["error"].as_str().unwrap_or("(no message)"))),
            };
        }
        if let (Some(done), Some(total)) =
            (st["progress"]["bytes_done"].as_u64(), st["progress"]["bytes_total"].as_u64())
        {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            if last_pct != Some(pct) {
                let phase = st["progress"]["phase"].as_str().unwrap_or("");
                let line = format!("{phase}: {pct}% ({} of {} MiB)", done >> 20, total >> 20);
                if tty {
                    eprint!("\r\x1b[K{line}");
                } else if last_pct.is_none_or(|l| pct / 10 != l / 10) {
                    eprintln!("{line}");
                }
                last_pct = Some(pct);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn update_check(socket: &str) -> Result<(), String> {
    let st = run_update_command(socket, "refresh-updates", "refresh")?;
    let current = st["active_partition"]["version"].as_str().unwrap_or("?").to_string();
    match st["chosen_update"]["version"].as_str() {
        Some(v) => println!("update available: {current} -> {v}"),
        None => println!(
            "no update for {current}: {}",
            st["most_recent_command"]["message"].as_str().unwrap_or("none chosen")
        ),
    }
    println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
    Ok(())
}

fn update_apply(socket: &str, reboot: bool) -> Result<(), String> {
    let mut st = status(socket)?;
    if st["update_state"] == "Idle" || st["update_state"] == "Available" {
        st = run_update_command(socket, "refresh-updates", "refresh")?;
        if st["update_state"] != "Available" {
            let why = st["most_recent_command"]["message"].as_str().unwrap_or("none chosen");
            return Err(format!("no update to apply: {why}"));
        }
    }
    if st["update_state"] == "Available" {
        let v = st["chosen_update"]["version"].as_str().unwrap_or("?").to_string();
        eprintln!("preparing {v}");
        run_update_command(socket, "prepare-update", "prepare")?;
    }
    let st = status(socket)?;
    if st["update_state"] == "Staged" {
        call(socket, "POST", "/actions/activate-update", None)?;
    }
    let st = status(socket)?;
    let v = st["staging_partition"]["version"].as_str().unwrap_or("?");
    println!("update {v} is active: it boots next, on trial");
    if reboot {
        call(socket, "POST", "/actions/reboot", None)?;
        println!("rebooting");
    }
    Ok(())
}

/// One request; a non-2xx status is an error carrying the server's message.
fn call(socket: &str, method: &str, uri: &str, body: Option<&str>) -> Result<String, String> {
    let (status, text) = request(socket, method, uri, body)?;
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(format!("{method} {uri}: HTTP {status}: {}", text.trim()))
    }
}

/// Print a JSON answer pretty; settings are shown under a top-level `settings` key.
fn show(body: String, wrap: bool) -> Result<(), String> {
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => {
            let v = if wrap { serde_json::json!({ "settings": v }) } else { v };
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or(body));
        }
        Err(_) => print!("{body}"),
    }
    Ok(())
}

/// PATCH into a transaction of our own, then commit and apply it; the transaction is deleted
/// again if the PATCH is refused, so nothing is left half-done.
fn transaction(socket: &str, route: &str, body: &serde_json::Value) -> Result<(), String> {
    let tx = format!("apiclient-{}", std::process::id());
    let text = body.to_string();
    if let Err(e) = call(socket, "PATCH", &format!("{route}?tx={tx}"), Some(&text)) {
        let _ = call(socket, "DELETE", &format!("/tx?tx={tx}"), None);
        return Err(e);
    }
    call(socket, "POST", &format!("/tx/commit_and_apply?tx={tx}"), None).map(drop)
}

/// `{"settings": {...}}` → `{...}`; anything else as it is.
fn unwrap_settings(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(mut m) if m.len() == 1 && m.contains_key("settings") => {
            m.remove("settings").unwrap_or_default()
        }
        other => other,
    }
}

/// Settings that are maps of strings: values under them always stay strings.
const STRING_MAPS: &[&str] = &["kernel.sysctl.", "kubernetes.node-labels."];

/// `true`, `false` and integers become JSON booleans and numbers, except under the string-valued
/// maps (sysctls, node labels); anything else is a string. (`set -j` takes exact JSON.)
fn scalar(key: &str, v: &str) -> serde_json::Value {
    let key = key.strip_prefix("settings.").unwrap_or(key);
    if STRING_MAPS.iter().any(|m| key.starts_with(m)) {
        return v.into();
    }
    match v {
        "true" => true.into(),
        "false" => false.into(),
        _ => v.parse::<i64>().map(Into::into).unwrap_or_else(|_| v.into()),
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r, (200, "{}".into()));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r, (404, "abcde".into()));
        assert!(parse_response(b"garbage").is_err());
    }

    /// Data, then an error where a blocking read would hang (a bridge that never closes).
    struct NoEof(std::io::Cursor<Vec<u8>>);
    impl Read for NoEof {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(b)? {
                0 => Err(std::io::Error::other("read past the response")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn responses_end_at_their_length_without_eof() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        assert_eq!(read_response(&mut NoEof(std::io::Cursor::new(plain.clone()))).unwrap(), plain);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".to_vec();
        assert_eq!(read_response(&mut NoEof(std::io::Cursor::new(chunked.clone()))).unwrap(), chunked);
        let empty = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        assert_eq!(read_response(&mut NoEof(std::io::Cursor::new(empty.clone()))).unwrap(), empty);
        let to_eof = b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec();
        assert_eq!(read_response(&mut std::io::Cursor::new(to_eof.clone())).unwrap(), to_eof);
    }

    #[test]
    fn values_and_wrappers() {
        assert_eq!(scalar("x.enabled", "true"), serde_json::json!(true));
        assert_eq!(scalar("kubernetes.max-pods", "110"), serde_json::json!(110));
        assert_eq!(scalar("motd", "hi there"), serde_json::json!("hi there"));
        assert_eq!(scalar("settings.kernel.sysctl.vm.swappiness", "10"), serde_json::json!("10"));
        assert_eq!(scalar("kubernetes.node-labels.tier", "1"), serde_json::json!("1"));
        assert_eq!(
            unwrap_settings(serde_json::json!({"settings": {"motd": "x"}})),
            serde_json::json!({"motd": "x"})
        );
        assert_eq!(unwrap_settings(serde_json::json!({"motd": "x"})), serde_json::json!({"motd": "x"}));
        assert_eq!(encode("settings.a b"), "settings.a%20b");
    }

    #[test]
    fn unreachable_socket_is_a_clear_error() {
        let e = request("/nonexistent/api.sock", "GET", "/", None).unwrap_err();
        assert!(e.contains("cannot connect to /nonexistent/api.sock"), "{e}");
    }
}
