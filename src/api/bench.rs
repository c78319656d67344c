//! `berth bench-api`: a load generator for `scripts/bench api`. N client threads each keep one
//! connection to the API socket alive and send requests back to back for a fixed time,
//! recording every request's latency. Prints one line of `key=value` results.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn read_response(r: &mut BufReader<UnixStream>) -> Result<u16, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let mut len = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| "bad content-length")?;
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(status)
}

fn request(
    w: &mut UnixStream,
    r: &mut BufReader<UnixStream>,
    method: &str,
    uri: &str,
    body: &str,
) -> Result<(), String> {
    let req =
        format!("{method} {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    w.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    match read_response(r)? {
        s if (200..300).contains(&s) => Ok(()),
        s => Err(format!("{method} {uri}: HTTP {s}")),
    }
}

fn client(socket: String, mode: String, id: usize, until: Instant) -> Result<Vec<u32>, String> {
    let mut w = UnixStream::connect(&socket).map_err(|e| format!("{socket}: {e}"))?;
    let mut r = BufReader::new(w.try_clone().map_err(|e| e.to_string())?);
    let mut lat = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let t = Instant::now();
        if mode == "get" {
            request(&mut w, &mut r, "GET", "/settings", "")?;
        } else {
            let tx = format!("bench-{id}");
            request(
                &mut w,
                &mut r,
                "PATCH",
                &format!("/settings?tx={tx}"),
                &format!("{{\"motd\":\"bench {id} {n}\"}}"),
            )?;
            request(&mut w, &mut r, "POST", &format!("/tx/commit_and_apply?tx={tx}"), "")?;
        }
        lat.push(t.elapsed().as_micros() as u32);
        n += 1;
    }
    Ok(lat)
}

/// `berth bench-api SOCKET get|commit CLIENTS SECONDS`
pub fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: berth bench-api SOCKET get|commit CLIENTS SECONDS";
    let [socket, mode, clients, secs] = args else {
        return Err(usage.into());
    };
    if mode != "get" && mode != "commit" {
        return Err(usage.into());
    }
    let clients: usize = clients.parse().map_err(|_| usage)?;
    let secs: f64 = secs.parse().map_err(|_| usage)?;
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
