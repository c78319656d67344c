//! `apiclient`: the command line client of Berth's API, speaking Bottlerocket's `apiclient`
//! contract so that scripts and operators written for Bottlerocket work unchanged (what is the
//! same and what differs: docs/compatibility.md). It is the `berth` binary run by the name
//! `apiclient` (`/bin/apiclient`, `/usr/bin/apiclient`), static, so it also runs inside a
//! container that has only it and the API socket mounted, as Bottlerocket's update operator
//! mounts them.
//!
//! - `raw -u URI [-m METHOD] [-d DATA]` (also with no subcommand): one request, the answer's
//!   body on stdout;
//! - `get [PREFIX... | /URI]`: `GET /?prefix=` for each prefix (none: `os.` and `settings.`),
//!   merged, or one GET route; pretty JSON on stdout ([`get`]);
//! - `set KEY=VALUE...` | `set --json JSON`, `apply [URI...]`: settings changed in a
//!   transaction of their own, committed and applied ([`set`]);
//! - `reboot`;
//! - `update check | apply [--check] [--reboot] | cancel` ([`update`]);
//! - `boot [--svg FILE]`: this boot's timeline, a table or a drawing ([`boot`]; Berth's own).
//!
//! Global options, anywhere on the line: `-s/--socket-path PATH`, `-v/--verbose` (debug),
//! `--log-level error|warn|info|debug|trace`, `-h/--help`. Logs go to stderr; stdout carries
//! only answers. Exit codes: 0 done, 1 failed (one line on stderr; a refused request reads
//! `Status CODE when METHODing URI: BODY`, which operators look for), 2 usage (the message and
//! the usage on stderr).
//!
//! Requests go through the shared HTTP client (`src/http`); every answer is bounded (64 MiB)
//! and every wait has a timeout (60 s per read or write).

mod boot;
mod ephemeral;
mod exec;
mod get;
mod set;
mod update;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::http::client::{Connection, Error as HttpError, Options, Request};
use crate::http::head::ResponseHead;

pub const DEFAULT_SOCKET: &str = "/run/api.sock";

/// The longest a request may wait for each read or write (an update command answers at once;
/// the longest request is a commit that restarts services).
const TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read (the biggest is `/logs`, bounded by the service log buffers).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

const USAGE: &str = "usage: apiclient [-s SOCKET] [-v | --log-level LEVEL] SUBCOMMAND [ARGS]

  raw -u URI [-m METHOD] [-d DATA]    one request; the answer's body on stdout (the default)
  get [PREFIX... | /URI]              the model's values under each prefix, merged (default:
                                      os. settings.), or a GET route; pretty JSON
  set KEY=VALUE...                    change settings, commit and apply them; values' types are
                                      inferred (true/false, numbers, else text); quote key
                                      segments with dots: 'kernel.sysctl.\"vm.x\"=1'
  set --json JSON                     the same with exact JSON ({\"motd\": \"hi\"})
  apply [URI...]                      settings documents (TOML or JSON with a settings table)
                                      from stdin (none or -), file:///PATH, PATH, http(s)://URL,
                                      in one transaction
  reboot
  exec [-t | -T] NAME CMD [ARG...]    run CMD in host container NAME (-t: with a TTY, the
                                      default when stdin is a terminal); exits with its status
  report cis [-l 1|2] [-f text|json] the CIS checks that apply to Berth, read from the system
  update check                        refresh the list of updates; the status as JSON
  update apply [--check] [--reboot]   prepare and activate the chosen update (--check: refresh
                                      first and stop if there is none; --reboot: then reboot)
  update cancel                       stop a running prepare, or deactivate an activated update
  boot [--svg FILE]                   this boot's phases and services, longest first (like
                                      systemd-analyze blame); --svg: a timeline drawing (- stdout)
  ephemeral-storage init [-t ext4|xfs] [--disks DISK...]
                                      format spare local disks (striped when several)
  ephemeral-storage bind --dirs DIR...
                                      bind that storage over containerd's or kubelet's dirs
  ephemeral-storage list-disks|list-dirs [-f text|json]

global options: -s/--socket-path PATH (default /run/api.sock), -v/--verbose,
  --log-level error|warn|info|debug|trace (default info), -h/--help
exit status: 0 done, 1 failed, 2 usage";

/// How a run ended badly.
#[derive(Debug)]
pub enum Error {
    /// The command line is wrong: exit 2, the message and the usage on stderr.
    Usage(String),
    /// The command failed: exit 1, the message on stderr.
    Failed(String),
}

type Result<T> = std::result::Result<T, Error>;

fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Usage(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// Logging: to stderr, by level.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Error = 1,
    Warn,
    Info,
    Debug,
    Trace,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

fn log(level: Level, msg: impl fmt::Display) {
    if level as u8 <= LEVEL.load(Ordering::Relaxed) {
        eprintln!("{msg}");
    }
}

fn info(msg: impl fmt::Display) {
    log(Level::Info, msg);
}

fn debug(msg: impl fmt::Display) {
    log(Level::Debug, msg);
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Why a request did not succeed.
#[derive(Debug)]
pub enum CallError {
    /// The API answered with a status other than 2xx.
    Status { code: u16, method: String, uri: String, body: String },
    /// No answer: the socket could not be reached, or the connection broke.
    Transport { method: String, uri: String, error: Box<HttpError> },
}

impl CallError {
    fn code(&self) -> Option<u16> {
        match self {
            CallError::Status { code, .. } => Some(*code),
            CallError::Transport { .. } => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Bottlerocket's words: its update operator finds the code after "Status".
            CallError::Status { code, method, uri, body } => {
                write!(f, "Status {code} when {method}ing {uri}: {}", body.trim_end())
            }
            CallError::Transport { method, uri, error } => {
                write!(f, "no answer to {method} {uri}: {error}")
            }
        }
    }
}

/// A client of the API on one socket.
pub struct Client {
    socket: String,
}

impl Client {
    pub fn new(socket: &str) -> Client {
        Client { socket: socket.to_string() }
    }

    /// Send one request and read the whole answer, whatever its status.
    fn send(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> std::result::Result<(ResponseHead, String), CallError> {
        debug(format!("{method} {uri}{}", body.map(|b| format!(" ({} bytes)", b.len())).unwrap_or_default()));
        let transport =
            |error| CallError::Transport { method: method.into(), uri: uri.into(), error: Box::new(error) };
        let opts = Options { io_timeout: TIMEOUT, ..Options::default() };
        let mut conn = Connection::unix(Path::new(&self.socket), &opts).map_err(transport)?;
        let headers = [("Connection", "close"), ("Content-Type", "application/json")];
        let req = Request {
            method,
            target: uri,
            host: "localhost",
            headers: &headers,
            body: body.unwrap_or("").as_bytes(),
        };
        let (head, body) = conn.exchange(&req, MAX_RESPONSE).map_err(transport)?;
        debug(format!("{} {}", head.status, head.reason));
        Ok((head, String::from_utf8_lossy(&body).into_owned()))
    }

    /// One request that must succeed (2xx); returns the answer's body.
    pub fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> std::result::Result<String, CallError> {
        let (head, text) = self.send(method, uri, body)?;
        if (200..300).contains(&head.status) {
            Ok(text)
        } else {
            Err(CallError::Status { code: head.status, method: method.into(), uri: uri.into(), body: text })
        }
    }
}

/// Whether `e` is the API going away while it answers a reboot request: the reboot it asked
/// for is under way, so the request did what it was for.
fn rebooting(method: &str, uri: &str, e: &CallError) -> bool {
    let path = uri.split('?').next().unwrap_or(uri);
    method == "POST"
        && path == "/actions/reboot"
        && matches!(e, CallError::Transport { error, .. } if matches!(**error, HttpError::NoResponse(_) | HttpError::Io { .. }))
}

// ---------------------------------------------------------------------------------------------
// The command line

/// The subcommands, as Bottlerocket's apiclient names them.
const SUBCOMMANDS: &[&str] =
    &["raw", "apply", "exec", "get", "reboot", "report", "set", "update", "ephemeral-storage", "boot"];
/// Subcommand options followed by a value (which is never taken for a global option).
const VALUE_OPTIONS: &[&str] = &[
    "-u", "--uri", "--svg", "-m", "-X", "--method", "-d", "--data", "-j", "--json", "-f", "--format", "-l",
    "--level",
];

/// A command line, global options taken out.
#[derive(Debug, PartialEq)]
struct Line {
    socket: String,
    level: Level,
    help: bool,
    subcommand: String,
    args: Vec<String>,
}

fn parse_line(args: &[String]) -> Result<Line> {
    let mut line = Line {
        socket: DEFAULT_SOCKET.into(),
        level: Level::Info,
        help: false,
        subcommand: String::new(),
        args: vec![],
    };
    let mut sub = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // After `exec TARGET`, everything is the command's own.
        if sub.as_deref() == Some("exec") && line.args.iter().any(|a| !a.starts_with('-')) {
            line.args.push(a.clone());
            continue;
        }
        match a.as_str() {
            "-s" | "--socket-path" => match it.next() {
                Some(p) => line.socket = p.clone(),
                None => return usage(format!("{a} needs a path")),
            },
            "--log-level" => {
                line.level = match it.next().map(String::as_str) {
                    Some("error") => Level::Error,
                    Some("warn") => Level::Warn,
                    Some("info") => Level::Info,
                    Some("debug") => Level::Debug,
                    Some("trace") => Level::Trace,
                    other => {
                        return usage(format!(
                            "--log-level needs error, warn, info, debug or trace, not {other:?}"
                        ))
                    }
                }
            }
            "-v" | "--verbose" => line.level = Level::Debug,
            "-h" | "--help" => line.help = true,
            opt if VALUE_OPTIONS.contains(&opt) => {
                line.args.push(a.clone());
                if let Some(v) = it.next() {
                    line.args.push(v.clone());
                }
            }
            word if sub.is_none() && !word.starts_with('-') => {
                if !SUBCOMMANDS.contains(&word) {
                    return usage(format!("unknown subcommand '{word}'"));
                }
                sub = Some(word.to_string());
            }
            _ => line.args.push(a.clone()),
        }
    }
    line.subcommand = sub.unwrap_or_else(|| "raw".into());
    Ok(line)
}

pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(Error::Usage(msg)) => {
            eprintln!("apiclient: {msg}\n\n{USAGE}");
            2
        }
        Err(Error::Failed(msg)) => {
            eprintln!("{msg}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let line = parse_line(args)?;
    if line.help {
        println!("{USAGE}");
        return Ok(());
    }
    LEVEL.store(line.level as u8, Ordering::Relaxed);
    let client = Client::new(&line.socket);
    let args = &line.args;
    match line.subcommand.as_str() {
        "raw" => raw(&client, args),
        "get" => get::run(&client, args),
        "set" => set::set(&client, args),
        "apply" => set::apply(&client, args),
        "reboot" => reboot(&client, args),
        "update" => update::run(&client, args),
        "report" => report(&client, args),
        "exec" => {
            let code = exec::run(&line.socket, args)?;
            std::process::exit(code)
        }
        "boot" => boot::run(&client, args),
        "ephemeral-storage" => ephemeral::run(&client, args),
        other => Err(Error::Failed(format!(
            "apiclient {other}: not supported yet on Berth (the API has no such routes yet; see docs/compatibility.md)"
        ))),
    }
}

/// `report cis [-l|--level 1|2] [-f|--format text|json]`: the CIS report, as the API writes it.
fn report(client: &Client, args: &[String]) -> Result<()> {
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("cis") => {}
        Some(other) => return usage(format!("report: unknown report '{other}' (Berth has: cis)")),
        None => return usage("report: which report? (cis)"),
    }
    let (mut level, mut format) = ("1".to_string(), "text".to_string());
    while let Some(o) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| Error::Usage(format!("{o} needs a value")));
        match o.as_str() {
            "-l" | "--level" => level = value()?,
            "-f" | "--format" => format = value()?,
            other => return usage(format!("report cis: unexpected argument '{other}'")),
        }
    }
    let uri = format!("/report/cis?level={level}&format={format}");
    let body = client.call("GET", &uri, None).map_err(|e| Error::Failed(e.to_string()))?;
    print!("{body}");
    if format == "json" {
        println!();
    }
    Ok(())
}

fn raw(client: &Client, args: &[String]) -> Result<()> {
    let (mut method, mut uri, mut data) = ("GET".to_string(), None, None);
    let mut it = args.iter();
    while let Some(o) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| Error::Usage(format!("{o} needs a value")));
        match o.as_str() {
            "-u" | "--uri" => uri = Some(value()?),
            "-m" | "-X" | "--method" => method = value()?,
            "-d" | "--data" => data = Some(value()?),
            other => return usage(format!("raw: unexpected argument '{other}'")),
        }
    }
    let Some(uri) = uri else {
        return usage("raw needs -u URI");
    };
    match client.call(&method, &uri, data.as_deref()) {
        Ok(body) => {
            if !body.is_empty() {
                println!("{body}");
            }
            Ok(())
        }
        Err(e) if rebooting(&method, &uri, &e) => {
            info("the API went away before it answered: the reboot is under way");
            Ok(())
        }
        Err(e) => Err(Error::Failed(format!("Failed {method} request to '{uri}': {e}"))),
    }
}

fn reboot(client: &Client, args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        return usage(format!("reboot takes no arguments, not '{a}'"));
    }
    match client.call("POST", "/actions/reboot", None) {
        Ok(_) => {
            info("Rebooting, goodbye...");
            Ok(())
        }
        Err(e) if rebooting("POST", "/actions/reboot", &e) => {
            info("the API went away before it answered: the reboot is under way");
            Ok(())
        }
        Err(e) => Err(Error::Failed(format!("Failed to reboot: {e}"))),
    }
}

/// A random name for a transaction of ours: `apiclient-KIND-` and 16 letters and digits.
fn transaction_name(kind: &str) -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    // Uniqueness, not secrecy: fall back to the clock and pid if the system has no randomness.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
                ^ u128::from(std::process::id());
        bytes.copy_from_slice(&seed.to_le_bytes());
    }
    let suffix: String = bytes.iter().map(|b| ALNUM[usize::from(*b) % ALNUM.len()] as char).collect();
    format!("apiclient-{kind}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[&str]) -> Result<Line> {
        parse_line(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn global_options_anywhere_and_raw_by_default() {
        let l = line(&["get", "-s", "/x.sock", "settings.motd", "-v"]).unwrap();
        assert_eq!((l.socket.as_str(), l.level, l.subcommand.as_str()), ("/x.sock", Level::Debug, "get"));
        assert_eq!(l.args, ["settings.motd"]);
        let l = line(&["-u", "/os", "--log-level", "warn"]).unwrap();
        assert_eq!((l.subcommand.as_str(), l.level), ("raw", Level::Warn));
        assert_eq!(l.args, ["-u", "/os"]);
        // A value that looks like an option stays the option's value.
        let l = line(&["raw", "-m", "POST", "-u", "/x", "-d", "-v"]).unwrap();
        assert_eq!((l.level, l.args.len()), (Level::Info, 6));
        let l = line(&["set", "--json", "{}", "--help"]).unwrap();
        assert!(l.help);
        for (bad, why) in [
            (&["frobnicate"][..], "unknown subcommand"),
            (&["get", "-s"][..], "needs a path"),
            (&["--log-level", "loud"][..], "--log-level"),
        ] {
            match line(bad) {
                Err(Error::Usage(m)) => assert!(m.contains(why), "{bad:?}: {m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_read_as_bottlerocket_s() {
        let e = CallError::Status {
            code: 423,
            method: "POST".into(),
            uri: "/actions/prepare-update".into(),
            body: "{\"status\":423}\n".into(),
        };
        assert_eq!(e.to_string(), "Status 423 when POSTing /actions/prepare-update: {\"status\":423}");
        let gone = CallError::Transport {
            method: "POST".into(),
            uri: "/actions/reboot".into(),
            error: Box::new(HttpError::NoResponse(std::io::ErrorKind::UnexpectedEof.into())),
        };
        assert!(rebooting("POST", "/actions/reboot", &gone));
        assert!(!rebooting("POST", "/actions/reboot", &e));
        assert!(!rebooting("GET", "/os", &gone));
    }

    #[test]
    fn transaction_names_are_random() {
        let (a, b) = (transaction_name("set"), transaction_name("set"));
        assert!(a.starts_with("apiclient-set-") && a.len() == "apiclient-set-".len() + 16, "{a}");
        assert_ne!(a, b);
        assert!(crate::settings::store::check_tx_name(&a).is_ok());
    }

    #[test]
    fn unreachable_socket_is_a_clear_error() {
        let e = Client::new("/nonexistent/api.sock").call("GET", "/", None).unwrap_err();
        assert!(e.to_string().contains("cannot connect to /nonexistent/api.sock"), "{e}");
        assert_eq!(e.code(), None);
    }
}
