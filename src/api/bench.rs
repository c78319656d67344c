//! `berth bench-api`: a load generator for `scripts/bench api`, speaking through the shared HTTP
//! client (`src/http`).
//!
//! - `get|commit CLIENTS SECONDS`: CLIENTS threads each keep one connection to the API socket
//!   alive and send requests back to back for SECONDS, recording every request's latency.
//! - `burst CLIENTS SHAPE`: CLIENTS connections each send one 1 MiB `PATCH /settings` body at
//!   the same moment (SHAPE: `string`, one long string; `array`, half a million numbers;
//!   `object`, eighty thousand small members), for the caller to read the server's peak memory.
//!
//! Prints one line of `key=value` results.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::http::client::{Connection, Options, Request};

/// Answers are small; anything larger is a fault of the server under test.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;
const BURST_BODY: usize = 1024 * 1024;

fn connect(socket: &str) -> Result<Connection, String> {
    let opts = Options { io_timeout: Duration::from_secs(60), ..Options::default() };
    Connection::unix(Path::new(socket), &opts).map_err(|e| e.to_string())
}

fn request(conn: &mut Connection, method: &str, uri: &str, body: &[u8]) -> Result<u16, String> {
    let req = Request { method, target: uri, host: "localhost", headers: &[], body };
    let (head, _) = conn.exchange(&req, MAX_RESPONSE).map_err(|e| format!("{method} {uri}: {e}"))?;
    Ok(head.status)
}

fn succeed(conn: &mut Connection, method: &str, uri: &str, body: &str) -> Result<(), String> {
    match request(conn, method, uri, body.as_bytes())? {
        s if (200..300).contains(&s) => Ok(()),
        s => Err(format!("{method} {uri}: HTTP {s}")),
    }
}

fn client(socket: String, mode: String, id: usize, until: Instant) -> Result<Vec<u32>, String> {
    let mut conn = connect(&socket)?;
    let mut lat = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let t = Instant::now();
        if mode == "get" {
            succeed(&mut conn, "GET", "/settings", "")?;
        } else {
            let tx = format!("bench-{id}");
            let body = format!("{{\"motd\":\"bench {id} {n}\"}}");
            succeed(&mut conn, "PATCH", &format!("/settings?tx={tx}"), &body)?;
            succeed(&mut conn, "POST", &format!("/tx/commit_and_apply?tx={tx}"), "")?;
        }
        lat.push(t.elapsed().as_micros() as u32);
        n += 1;
    }
    Ok(lat)
}

/// A JSON body of exactly `size` bytes in `shape`, for `PATCH /settings`.
fn burst_body(shape: &str, size: usize) -> Option<Vec<u8>> {
    let (open, close) = match shape {
        "string" => ("{\"motd\": \"", "\"}"),
        "array" => ("{\"motd\": [", "]}"),
        "object" => ("{\"motd\": {", "}}"),
        _ => return None,
    };
    let room = size - open.len() - close.len();
    let mut body = open.as_bytes().to_vec();
    match shape {
        "string" => body.resize(open.len() + room, b'x'),
        "array" => {
            body.extend(b"1,".repeat(room / 2 - 1));
            body.push(b'1');
        }
        _ => {
            let mut i = 0;
            while body.len() + 14 <= open.len() + room {
                body.extend(format!("\"k{i:07}\":1,").as_bytes());
                i += 1;
            }
            body.pop();
        }
    }
    body.resize(open.len() + room, b' ');
    body.extend(close.as_bytes());
    Some(body)
}

fn burst(socket: &str, clients: usize, shape: &str) -> Result<(), String> {
    let body = Arc::new(burst_body(shape, BURST_BODY).ok_or(USAGE)?);
    let barrier = Arc::new(Barrier::new(clients));
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, body, barrier) = (socket.to_string(), Arc::clone(&body), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let conn = connect(&socket);
                barrier.wait();
                request(&mut conn?, "PATCH", "/settings?tx=burst", &body)
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for h in handles {
        let status = h.join().map_err(|_| "client thread panicked")??;
        *statuses.entry(status).or_insert(0) += 1;
    }
    let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}x{n}")).collect();
    println!(
        "mode=burst clients={clients} shape={shape} body_bytes={} statuses={} ms={}",
        body.len(),
        statuses.join(","),
        start.elapsed().as_millis()
    );
    Ok(())
}

const USAGE: &str = "usage: berth bench-api SOCKET get|commit CLIENTS SECONDS\n       \
                     berth bench-api SOCKET burst CLIENTS string|array|object";

/// `berth bench-api SOCKET get|commit CLIENTS SECONDS` or `SOCKET burst CLIENTS SHAPE`
pub fn run(args: &[String]) -> Result<(), String> {
    let [socket, mode, clients, last] = args else {
        return Err(USAGE.into());
    };
    let clients: usize = clients.parse().map_err(|_| USAGE)?;
    match mode.as_str() {
        "burst" if clients > 0 => return burst(socket, clients, last),
        "get" | "commit" => {}
        _ => return Err(USAGE.into()),
    }
    let secs: f64 = last.parse().map_err(|_| USAGE)?;
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (s, m) = (socket.clone(), mode.clone());
            std::thread::spawn(move || client(s, m, i, until))
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| "client thread panicked")??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0)
    };
    println!(
        "mode={mode} clients={clients} ops={} ops_per_s={:.0} p50_us={} p99_us={} max_us={}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_bodies_are_json_of_the_size_asked() {
        for shape in ["string", "array", "object"] {
            let body = burst_body(shape, BURST_BODY).unwrap();
            assert_eq!(body.len(), BURST_BODY, "{shape}");
            let v: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{shape}: {e}"));
            assert!(v["motd"].is_string() || v["motd"].is_array() || v["motd"].is_object(), "{shape}");
        }
        assert!(burst_body("nope", 100).is_none());
    }
}
