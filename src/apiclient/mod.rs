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
//! A non-2xx answer prints the server's error and exits non-zero. Requests go through the
//! shared HTTP client (`src/http`).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::http::client::{Connection, Options, Request};

pub const DEFAULT_SOCKET: &str = "/run/api.sock";

/// The longest a request may wait for each read or write (an update command answers at once;
/// the longest request is a commit that restarts services).
const TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read (the biggest is `/logs`, bounded by the service log buffers).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

const USAGE: &str = "usage: apiclient [-s SOCKET] get [PREFIX | /URI]
       apiclient [-s SOCKET] set KEY=VALUE... | set -j JSON
       apiclient [-s SOCKET] apply FILE... | apply -
       apiclient [-s SOCKET] raw [-m METHOD] -u URI [-d DATA]
       apiclient [-s SOCKET] reboot
       apiclient [-s SOCKET] update check | apply [--reboot] | cancel";

/// Send one request; returns (status, body). The answer is read to the end of its body (by
/// its length or its last chunk), not to the end of the connection: the host side of a VM's
/// virtio-serial bridge cannot close it.
pub fn request(socket: &str, method: &str, uri: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let opts = Options { io_timeout: TIMEOUT, ..Options::default() };
    let mut conn = Connection::unix(Path::new(socket), &opts).map_err(|e| e.to_string())?;
    let headers = [("Connection", "close"), ("Content-Type", "application/json")];
    let req = Request {
        method,
        target: uri,
        host: "localhost",
        headers: &headers,
        body: body.unwrap_or("").as_bytes(),
    };
    let (head, body) =
        conn.exchange(&req, MAX_RESPONSE).map_err(|e| format!("{method} {uri} on {socket}: {e}"))?;
    Ok((head.status, String::from_utf8_lossy(&body).into_owned()))
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
            let query = crate::http::encode_component(prefix);
            show(call(&socket, "GET", &format!("/settings?prefix={query}"), None)?, true)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn unreachable_socket_is_a_clear_error() {
        let e = request("/nonexistent/api.sock", "GET", "/", None).unwrap_err();
        assert!(e.contains("cannot connect to /nonexistent/api.sock"), "{e}");
    }
}
