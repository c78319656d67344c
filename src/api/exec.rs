//! `POST /exec` (`apiclient exec [-t] NAME CMD...`): a command run in host container NAME, its
//! input, output, exit status, window size and signals carried over the API socket.
//!
//! The request is a JSON body `{"target": NAME, "command": [ARG...], "tty": bool, "rows": N,
//! "cols": N}`; the answer is `101 Switching Protocols` (`Upgrade: berth-exec`), after which the
//! connection carries frames of Berth's own: one byte of kind, four bytes of length (big
//! endian), the payload (at most [`MAX_FRAME`] bytes). Bottlerocket upgrades to a WebSocket
//! instead; `apiclient exec` behaves the same for the user.
//!
//! | kind | direction | payload |
//! | --- | --- | --- |
//! | [`STDIN`] | client → server | input bytes (with a TTY: keystrokes, Ctrl-C included) |
//! | [`STDIN_EOF`] | client → server | none: the input is closed |
//! | [`RESIZE`] | client → server | rows, cols (u16 each, big endian) |
//! | [`SIGNAL`] | client → server | a signal number (i32, big endian) for the command |
//! | [`STDOUT`], [`STDERR`] | server → client | output bytes (with a TTY everything is STDOUT) |
//! | [`EXIT`] | server → client | the exit status (i32; 128+N for death by signal N); last frame |
//! | [`END`] | client → server | none: the client's last frame, sent once it has `EXIT` (or to give up the session) |
//!
//! `END` matters on the host's serial bridge (`api::bridge`), a byte stream with no
//! connection boundaries: it tells the bridge where the session's input ends and the next
//! request begins. A session process that gets it (a direct client that gives up) ends the
//! command as when the client goes away.
//!
//! Off PID 1's event loop and out of PID 1 altogether: the API's connection thread checks the
//! request, answers 101 and hands the socket to a process of its own, `berth exec-session`
//! (its stdin and stdout are the socket), and is done. That process runs `ctr tasks exec` in
//! the container (with a pty pair when a TTY is asked for: the pty's slave is ctr's terminal,
//! resizes set the pty's size, which ctr passes on), relays frames, and sends the exit status.
//! A client that stops reading or sending stalls only its own session process; a client that
//! goes away ends the command (SIGTERM, then SIGKILL after [`GRACE`]). At most [`MAX_SESSIONS`]
//! sessions run at once (more get 429).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::http::server::Response;

pub const STDIN: u8 = 0;
pub const STDIN_EOF: u8 = 1;
pub const RESIZE: u8 = 2;
pub const SIGNAL: u8 = 3;
pub const STDOUT: u8 = 4;
pub const STDERR: u8 = 5;
pub const EXIT: u8 = 6;
pub const END: u8 = 7;

pub const PROTOCOL: &str = "berth-exec";
/// The largest frame payload (a read of output or input is cut to this).
pub const MAX_FRAME: usize = 64 * 1024;
/// Sessions that may run at once.
pub const MAX_SESSIONS: usize = 8;
/// How long a command whose client went away has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);
/// The most arguments, and bytes of arguments, in a command.
const MAX_ARGS: usize = 256;
const MAX_ARG_BYTES: usize = 64 * 1024;

pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame payload too large"))?;
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// The next frame, or None at a clean end of the stream (between frames).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// The body of `POST /exec`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub target: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub cols: Option<u16>,
}

impl ExecRequest {
    pub fn check(&self) -> Result<(), String> {
        let t = &self.target;
        if t.is_empty()
            || t.len() > 63
            || !t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!("target '{t}' is not a host container name (1-63 of [a-z0-9-])"));
        }
        if self.command.is_empty() {
            return Err("no command given".into());
        }
        let bytes: usize = self.command.iter().map(String::len).sum();
        if self.command.len() > MAX_ARGS
            || bytes > MAX_ARG_BYTES
            || self.command.iter().any(|a| a.contains('\0'))
        {
            return Err(format!(
                "the command has more than {MAX_ARGS} arguments or {} KiB, or a NUL",
                MAX_ARG_BYTES / 1024
            ));
        }
        Ok(())
    }

    /// The `ctr` command line that runs the command in the container.
    pub fn ctr_argv(&self, exec_id: &str) -> Vec<String> {
        let mut a: Vec<String> =
            ["/usr/bin/ctr", "--namespace", "berth", "tasks", "exec", "--exec-id", exec_id]
                .iter()
                .map(|s| s.to_string())
                .collect();
        if self.tty {
            a.push("--tty".into());
        }
        a.push(self.target.clone());
        a.extend(self.command.iter().cloned());
        a
    }
}

/// Pids of the running session processes.
static SESSIONS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn live_sessions() -> usize {
    let mut s = SESSIONS.lock().unwrap_or_else(|p| p.into_inner());
    // A reaped session's pid no longer exists (PID 1's reaper collects it).
    s.retain(|&pid| crate::sys::kill(pid, 0).is_ok());
    s.len()
}

/// Answer `POST /exec`: `running(NAME)` says whether host container NAME is running.
pub fn handle(body: &[u8], running: &dyn Fn(&str) -> bool) -> Response {
    let req: ExecRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, &format!("the exec request: {e}")),
    };
    if let Err(e) = req.check() {
        return Response::error(400, &e);
    }
    if !running(&req.target) {
        return Response::error(404, &format!("host container '{}' is not running", req.target));
    }
    if live_sessions() >= MAX_SESSIONS {
        return Response::error(429, &format!("{MAX_SESSIONS} exec sessions are running already"));
    }
    let req = Arc::new(req);
    Response::upgrade(
        PROTOCOL,
        Arc::new(move |stream: UnixStream, leftover: Vec<u8>| {
            if !leftover.is_empty() {
                // The client sends frames only after it has read the 101.
                log::warn!("exec: the client sent {} bytes before the upgrade; closing", leftover.len());
                return;
            }
            if let Err(e) = spawn_session(stream, &req) {
                log::warn!("exec: cannot start the session: {e}");
            }
        }),
    )
}

fn spawn_session(stream: UnixStream, req: &ExecRequest) -> io::Result<()> {
    let out = stream.try_clone()?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("exec-session")
        .arg(if req.tty { "1" } else { "0" })
        .arg(req.rows.unwrap_or(24).to_string())
        .arg(req.cols.unwrap_or(80).to_string())
        .arg(&req.target)
        .arg("--")
        .args(&req.command)
        .env_clear()
        .env("PATH", "/usr/bin:/usr/sbin:/bin:/sbin")
        .stdin(Stdio::from(OwnedFd::from(stream)))
        .stdout(Stdio::from(OwnedFd::from(out)))
        .stderr(Stdio::null());
    let child = cmd.spawn()?;
    // PID 1's reaper collects it; the Child handle is not waited on.
    SESSIONS.lock().unwrap_or_else(|p| p.into_inner()).push(child.id() as i32);
    Ok(())
}

/// `berth exec-session TTY ROWS COLS TARGET -- CMD...`: the session process (see the module
/// docs); stdin and stdout are the client's connection.
pub fn session_main(args: &[String]) -> i32 {
    let (tty, rows, cols, target, command) = match args {
        [tty, rows, cols, target, dashes, command @ ..] if dashes == "--" => (
            tty == "1",
            rows.parse().unwrap_or(24),
            cols.parse().unwrap_or(80),
            target.clone(),
            command.to_vec(),
        ),
        _ => {
            eprintln!("usage: berth exec-session TTY ROWS COLS TARGET -- CMD...");
            return 2;
        }
    };
    let req = ExecRequest { target, command, tty, rows: Some(rows), cols: Some(cols) };
    let code = match run_session(&req) {
        Ok(code) => code,
        Err(e) => {
            let _ = write_frame(&mut io::stdout().lock(), STDERR, format!("berth exec: {e}\n").as_bytes());
            126
        }
    };
    let _ = write_frame(&mut io::stdout().lock(), EXIT, &code.to_be_bytes());
    0
}

fn run_session(req: &ExecRequest) -> io::Result<i32> {
    let exec_id = format!("berth-exec-{}", std::process::id());
    let argv = req.ctr_argv(&exec_id);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let out: Arc<Mutex<io::Stdout>> = Arc::new(Mutex::new(io::stdout()));
    let mut pumps = Vec::new();
    let pump = |kind: u8, mut from: Box<dyn Read + Send>, out: Arc<Mutex<io::Stdout>>| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                        if write_frame(&mut *o, kind, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    // Where input goes: the pty master with a TTY, the command's stdin pipe without.
    let (mut child, input, master): (std::process::Child, Box<dyn Write + Send>, Option<OwnedFd>) = if req.tty
    {
        let (master, slave) = crate::sys::pty::open()?;
        crate::sys::pty::set_size(&master, req.rows.unwrap_or(24), req.cols.unwrap_or(80))?;
        // This pty only carries the client's terminal to ctr; the line discipline that matters
        // (echo, Ctrl-C as SIGINT) is the container's own pty. Raw here (ctr makes it raw too
        // once it runs), so no keystroke is acted on before ctr has it.
        crate::sys::pty::make_raw(&slave)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        crate::sys::pty::controlling_tty_on_exec(&mut cmd);
        let child = cmd.spawn()?;
        let reader = std::fs::File::from(master.try_clone()?);
        pumps.push(pump(STDOUT, Box::new(reader), out.clone()));
        (child, Box::new(std::fs::File::from(master.try_clone()?)), Some(master))
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(o) = child.stdout.take() {
            pumps.push(pump(STDOUT, Box::new(o), out.clone()));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(pump(STDERR, Box::new(e), out.clone()));
        }
        let stdin = child.stdin.take().ok_or_else(|| io::Error::other("no stdin pipe"))?;
        (child, Box::new(stdin), None)
    };
    // The command's copies of the pty slave or the pipes go now, so the output ends with it.
    drop(cmd);
    let pid = child.id() as i32;
    // Signals go to ctr only while it has not been reaped (its pid cannot have been reused):
    // the flag is set, under this lock, before the wait below reaps it, and each signal is
    // sent holding the lock.
    let reaped = std::sync::Arc::new(std::sync::Mutex::new(false));
    let signal = {
        let reaped = reaped.clone();
        move |sig: i32| {
            let gone = reaped.lock().unwrap_or_else(|p| p.into_inner());
            if !*gone {
                let _ = crate::sys::kill(pid, sig);
            }
        }
    };
    // The client's frames: input, resizes, signals; its going away ends the command.
    std::thread::spawn(move || {
        let mut input = Some(input);
        let mut from = io::stdin().lock();
        loop {
            match read_frame(&mut from) {
                Ok(Some((STDIN, data))) => {
                    if let Some(i) = input.as_mut() {
                        if i.write_all(&data).and_then(|_| i.flush()).is_err() {
                            input = None;
                        }
                    }
                }
                Ok(Some((STDIN_EOF, _))) => {
                    // Without a TTY the pipe closes; with one, the terminal's EOF key is sent.
                    match (&master, input.as_mut()) {
                        (Some(_), Some(i)) => {
                            let _ = i.write_all(&[4]);
                        }
                        _ => input = None,
                    }
                }
                Ok(Some((RESIZE, d))) if d.len() == 4 => {
                    if let Some(m) = &master {
                        let _ = crate::sys::pty::set_size(
                            m.as_fd(),
                            u16::from_be_bytes([d[0], d[1]]),
                            u16::from_be_bytes([d[2], d[3]]),
                        );
                    }
                }
                Ok(Some((SIGNAL, d))) if d.len() == 4 => {
                    let sig = i32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                    // ctr passes signals on to the command in the container.
                    signal(sig);
                }
                Ok(Some((kind, _))) if kind != END => {} // unknown kinds are ignored
                Ok(Some(_)) | Ok(None) | Err(_) => {
                    signal(libc::SIGTERM);
                    std::thread::sleep(GRACE);
                    signal(libc::SIGKILL);
                    return;
                }
            }
        }
    });
    // Wait for ctr to exit without reaping it (WNOWAIT), mark it gone, then reap it.
    let rpid = rustix::process::Pid::from_raw(pid).ok_or_else(|| io::Error::other("ctr has no pid"))?;
    let exited = rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT;
    loop {
        match rustix::process::waitid(rustix::process::WaitId::Pid(rpid), exited) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => break,
        }
    }
    *reaped.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let status = child.wait()?;
    // The output that is left (a pty master reads EIO once its slave is closed everywhere).
    for p in pumps {
        let _ = p.join();
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_are_bounded() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, b"ok\n").unwrap();
        write_frame(&mut buf, EXIT, &3i32.to_be_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((STDOUT, b"ok\n".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((EXIT, vec![0, 0, 0, 3])));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        assert!(write_frame(&mut Vec::new(), STDIN, &vec![0; MAX_FRAME + 1]).is_err());
        let huge = [STDIN, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..]).unwrap_err().to_string().contains("at most"));
        assert!(read_frame(&mut &[STDIN, 0, 0][..]).is_err(), "a cut frame is an error");
    }

    #[test]
    fn requests_are_checked_and_become_ctr_command_lines() {
        let r = |v: serde_json::Value| serde_json::from_value::<ExecRequest>(v).unwrap();
        let ok = r(serde_json::json!({"target": "admin", "command": ["sh", "-c", "echo ok; exit 3"]}));
        ok.check().unwrap();
        assert_eq!(
            ok.ctr_argv("e1").join(" "),
            "/usr/bin/ctr --namespace berth tasks exec --exec-id e1 admin sh -c echo ok; exit 3"
        );
        let t = r(
            serde_json::json!({"target": "admin", "command": ["sh"], "tty": true, "rows": 30, "cols": 100}),
        );
        assert!(t.ctr_argv("e2").contains(&"--tty".to_string()));
        for bad in [
            serde_json::json!({"target": "Admin", "command": ["sh"]}),
            serde_json::json!({"target": "admin", "command": []}),
            serde_json::json!({"target": "admin", "command": ["a\u{0}b"]}),
            serde_json::json!({"target": "admin", "command": vec!["x"; MAX_ARGS + 1]}),
        ] {
            assert!(r(bad.clone()).check().is_err(), "{bad}");
        }
        assert!(matches!(handle(br#"{"target": "admin"}"#, &|_| true).status, 400));
        assert!(matches!(handle(br#"{"target": "admin", "command": ["sh"]}"#, &|_| false).status, 404));
        let up = handle(br#"{"target": "admin", "command": ["sh"]}"#, &|n| n == "admin");
        assert_eq!((up.status, up.upgrade.map(|u| u.protocol)), (101, Some(PROTOCOL)));
    }
}
