//! `apiclient update check | apply [--check] [--reboot] | cancel`.
//!
//! Each updater command is waited for as Bottlerocket's apiclient waits: note the timestamp of
//! `most_recent_command` (a 404 means no command yet), issue the action, then poll
//! `GET /updates/status` until it answers (423 means the command still holds the updater) with
//! a record of this command newer than the one noted; that record must say `Success`. While it
//! waits, Berth's `GET /updates/progress` shows how far a prepare has written (on stderr).
//! Polls that fail otherwise are retried, five at most in a row.
//!
//! What is printed: `update check` prints the final status as JSON on stdout; everything else
//! goes to stderr, so stdout stays machine-readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{info, reboot, usage, Client, Error, Result};

const STATUS: &str = "/updates/status";
/// Failed polls in a row before giving up.
const MAX_FAILED_POLLS: u32 = 5;

/// One updater command and how long to wait for it. Berth's bounds are longer than
/// Bottlerocket's (10 s for a refresh, 10 min for a prepare): a refresh loads signed metadata
/// over the network, and a prepare writes a whole slot, on slow links and slow disks alike.
struct Wait {
    action: &'static str,
    cmd: &'static str,
    interval: Duration,
    limit: Duration,
}

const REFRESH: Wait = Wait {
    action: "refresh-updates",
    cmd: "refresh",
    interval: Duration::from_millis(250),
    limit: Duration::from_secs(120),
};
const PREPARE: Wait = Wait {
    action: "prepare-update",
    cmd: "prepare",
    interval: Duration::from_millis(500),
    limit: Duration::from_secs(1800),
};
const ACTIVATE: Wait = Wait {
    action: "activate-update",
    cmd: "activate",
    interval: Duration::from_millis(100),
    limit: Duration::from_secs(30),
};
const DEACTIVATE: Wait = Wait {
    action: "deactivate-update",
    cmd: "deactivate",
    interval: Duration::from_millis(100),
    limit: Duration::from_secs(30),
};

pub fn run(client: &Client, args: &[String]) -> Result<()> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["check"] => {
            let st = wait(client, &REFRESH)?;
            let current = st["active_partition"]["image"]["version"].as_str().unwrap_or("?");
            match st["chosen_update"]["version"].as_str() {
                Some(v) => info(format!("update available: {current} -> {v}")),
                None => info(format!("no update available for {current}")),
            }
            println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
            Ok(())
        }
        ["apply", opts @ ..] => {
            let (mut check, mut reboot) = (false, false);
            for o in opts {
                match *o {
                    "-c" | "--check" => check = true,
                    "-r" | "--reboot" => reboot = true,
                    other => return usage(format!("update apply: unexpected argument '{other}'")),
                }
            }
            apply(client, check, reboot)
        }
        ["cancel"] => cancel(client),
        _ => usage("update needs check, apply [--check] [--reboot] or cancel"),
    }
}

/// The status, or None before the first command (404).
fn status(client: &Client) -> Result<Option<Value>> {
    match client.call("GET", STATUS, None) {
        Ok(body) => serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| Error::Failed(format!("the answer to GET {STATUS} is not JSON: {e}"))),
        Err(e) if e.code() == Some(404) => Ok(None),
        Err(e) => Err(Error::Failed(format!("Failed to read the update status: {e}"))),
    }
}

/// Issue `w`'s action and wait for its outcome; returns the status it left.
fn wait(client: &Client, w: &Wait) -> Result<Value> {
    let before = status(client)?.map(|st| st["most_recent_command"]["timestamp"].clone());
    client
        .call("POST", &format!("/actions/{}", w.action), None)
        .map_err(|e| Error::Failed(format!("Failed to {}: {e}", w.cmd)))?;
    let start = Instant::now();
    let mut progress = Progress::default();
    let mut failed = 0;
    while start.elapsed() < w.limit {
        std::thread::sleep(w.interval);
        let st = match client.call("GET", STATUS, None) {
            Ok(body) => serde_json::from_str::<Value>(&body).map_err(|e| e.to_string()),
            Err(e) if e.code() == Some(423) => {
                progress.show(client);
                continue;
            }
            Err(e) => Err(e.to_string()),
        };
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                failed += 1;
                if failed >= MAX_FAILED_POLLS {
                    return Err(Error::Failed(format!(
                        "Failed to read the update status {failed} times: {e}"
                    )));
                }
                continue;
            }
        };
        failed = 0;
        let rec = &st["most_recent_command"];
        if rec["cmd_type"] != w.cmd || Some(&rec["timestamp"]) == before.as_ref() {
            continue;
        }
        progress.done();
        return match rec["cmd_status"].as_str() {
            Some("Success") => Ok(st),
            other => Err(Error::Failed(format!(
                "{} attempt failed with status '{}' ({}): {}",
                w.cmd,
                other.unwrap_or("?"),
                rec["exit_status"],
                rec["stderr"].as_str().unwrap_or("")
            ))),
        };
    }
    Err(Error::Failed(format!(
        "Timed out after waiting {} s for the {} to finish; GET {STATUS} tells how it ends",
        w.limit.as_secs(),
        w.cmd
    )))
}

/// How far a running prepare is, on stderr: one line rewritten on a terminal, a line per
/// 10 % otherwise.
#[derive(Default)]
struct Progress {
    last: Option<u64>,
}

impl Progress {
    fn show(&mut self, client: &Client) {
        let Ok(body) = client.call("GET", "/updates/progress", None) else { return };
        let Ok(p) = serde_json::from_str::<Value>(&body) else { return };
        let (Some(done), Some(total)) = (p["bytes_done"].as_u64(), p["bytes_total"].as_u64()) else { return };
        if total == 0 {
            return;
        }
        let pct = done * 100 / total;
        if self.last == Some(pct) {
            return;
        }
        let line =
            format!("{}: {pct}% ({} of {} MiB)", p["phase"].as_str().unwrap_or(""), done >> 20, total >> 20);
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[K{line}");
        } else if self.last.is_none_or(|l| pct / 10 != l / 10) {
            eprintln!("{line}");
        }
        self.last = Some(pct);
    }

    fn done(&self) {
        if self.last.is_some() && std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}

fn apply(client: &Client, check: bool, reboot_after: bool) -> Result<()> {
    let mut st = status(client)?;
    let state = |st: &Option<Value>| st.as_ref().and_then(|s| s["update_state"].as_str().map(String::from));
    if check || matches!(state(&st).as_deref(), None | Some("Idle")) {
        st = Some(wait(client, &REFRESH)?);
    }
    let version = |st: &Option<Value>, part: &str| {
        st.as_ref().and_then(|s| {
            s[part]["version"].as_str().or(s[part]["image"]["version"].as_str()).map(String::from)
        })
    };
    match state(&st).as_deref() {
        Some("Idle") if check => {
            info("No updates available.");
            return Ok(());
        }
        Some("Idle") => {
            return Err(Error::Failed("No update to apply: the repository offers none for this host".into()))
        }
        Some("Ready") => {
            let v = version(&st, "staging_partition").unwrap_or_default();
            info(format!("Update {v} is already activated; it boots at the next reboot."));
            if check || !reboot_after {
                return Ok(());
            }
        }
        Some("Available") => {
            info(format!("preparing {}", version(&st, "chosen_update").unwrap_or_default()));
            wait(client, &PREPARE)?;
            st = Some(wait(client, &ACTIVATE)?);
        }
        Some("Staged") => st = Some(wait(client, &ACTIVATE)?),
        other => return Err(Error::Failed(format!("unexpected update state {other:?}"))),
    }
    let v = version(&st, "staging_partition").unwrap_or_default();
    info(format!("update {v} is active: it boots next, on trial"));
    if reboot_after {
        reboot(client, &[])
    } else {
        info("reboot to start it (apiclient reboot)");
        Ok(())
    }
}

/// Stop a running prepare; with none running (409), deactivate an activated update.
fn cancel(client: &Client) -> Result<()> {
    match client.call("POST", "/actions/cancel-update", None) {
        Ok(body) => {
            let still = serde_json::from_str::<Value>(&body).is_ok_and(|v| v["accepted"] == "cancel");
            if still {
                info("cancel requested: the prepare stops at its next chunk (see /updates/progress)");
            } else {
                info("prepare cancelled: the slot it was writing is left unbootable");
            }
            Ok(())
        }
        Err(e) if e.code() == Some(409) => {
            wait(client, &DEACTIVATE)?;
            info("update deactivated: the running version boots next");
            Ok(())
        }
        Err(e) => Err(Error::Failed(format!("Failed to cancel the update: {e}"))),
    }
}
