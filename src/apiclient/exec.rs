//! `apiclient exec [-t|--tty | -T|--no-tty] NAME CMD [ARG...]`: run a command in host container
//! NAME over the API socket (`POST /exec`, then the frames of `api::exec`). Without either
//! option a TTY is used when stdin is a terminal. With a TTY the local terminal is put in raw
//! mode for the session (Ctrl-C and the other keys go to the command as keystrokes) and its
//! window size is sent at the start and on every SIGWINCH; without one, SIGINT, SIGTERM, SIGHUP
//! and SIGQUIT are passed on to the command. apiclient exits with the command's exit status.
//! With a TTY but no terminal on stdin, the size comes from `LINES` and `COLUMNS` if set.
//! The socket may be the guest's /run/api.sock or, from the host of a VM, the serial bridge's
//! Unix socket (`apiclient -s VM-API-SOCKET exec ...`; see `api::bridge`).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use super::{usage, Error, Result};
use crate::api::exec::{
    read_frame, write_frame, END, EXIT, MAX_FRAME, RESIZE, SIGNAL, STDERR, STDIN, STDIN_EOF, STDOUT,
};
use crate::sys::SignalFd;

/// The longest answer head read before the upgrade.
const MAX_HEAD: usize = 16 * 1024;

struct Line {
    tty: Option<bool>,
    target: String,
    command: Vec<String>,
}

fn parse(args: &[String]) -> Result<Line> {
    let mut tty = None;
    let mut it = args.iter();
    let target = loop {
        match it.next().map(String::as_str) {
            Some("-t") | Some("--tty") => tty = Some(true),
            Some("-T") | Some("--no-tty") => tty = Some(false),
            Some(o) if o.starts_with('-') => return usage(format!("exec: unknown option '{o}'")),
            Some(t) => break t.to_string(),
            None => return usage("exec: which host container? (apiclient exec NAME CMD...)"),
        }
    };
    let command: Vec<String> = it.cloned().collect();
    if command.is_empty() {
        return usage("exec: which command? (apiclient exec NAME CMD...)");
    }
    Ok(Line { tty, target, command })
}

fn size() -> Option<(u16, u16)> {
    crate::sys::pty::size(io::stdin()).filter(|(r, c)| *r > 0 && *c > 0).or_else(|| {
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u16>().ok());
        Some((env("LINES")?, env("COLUMNS")?))
    })
}

/// Send the request and read the answer's head: Ok on 101, the API's refusal otherwise.
fn upgrade(stream: &mut UnixStream, body: &str) -> Result<()> {
    let req = format!(
        "POST /exec HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let failed = |e: io::Error| Error::Failed(format!("exec: the API socket: {e}"));
    stream.write_all(req.as_bytes()).map_err(failed)?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD || stream.read(&mut byte).map_err(failed)? == 0 {
            return Err(Error::Failed("exec: the API closed the connection without an answer".into()));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let code: u16 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if code == 101 {
        return Ok(());
    }
    let len: usize = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(MAX_HEAD);
    let mut answer = vec![0u8; len];
    let _ = stream.read_exact(&mut answer);
    Err(Error::Failed(format!(
        "Status {code} when POSTing /exec: {}",
        String::from_utf8_lossy(&answer).trim_end()
    )))
}

/// Run the session; returns the command's exit status.
pub fn run(socket: &str, args: &[String]) -> Result<i32> {
    let line = parse(args)?;
    let tty = line.tty.unwrap_or_else(|| crate::sys::is_tty(&io::stdin()));
    let (rows, cols) = match size() {
        Some((r, c)) if tty => (Some(r), Some(c)),
        _ => (None, None),
    };
    let body = serde_json::json!({"target": line.target, "command": line.command, "tty": tty, "rows": rows, "cols": cols});
    // Blocked before any thread starts, so that every thread has them blocked.
    let signals = SignalFd::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGWINCH])
        .map_err(|e| Error::Failed(format!("exec: signalfd: {e}")))?;
    let mut stream =
        UnixStream::connect(socket).map_err(|e| Error::Failed(format!("cannot connect to {socket}: {e}")))?;
    upgrade(&mut stream, &body.to_string())?;
    let writer = Arc::new(Mutex::new(stream.try_clone().map_err(|e| Error::Failed(e.to_string()))?));
    let raw = if tty && crate::sys::is_tty(&io::stdin()) {
        crate::sys::pty::make_raw(io::stdin()).ok()
    } else {
        None
    };
    let send = |w: &Arc<Mutex<UnixStream>>, kind: u8, data: &[u8]| {
        let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *s, kind, data)
    };
    let w = writer.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut stdin = io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = send(&w, STDIN_EOF, &[]);
                    return;
                }
                Ok(n) => {
                    if send(&w, STDIN, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let w = writer.clone();
    std::thread::spawn(move || loop {
        match signals.wait(1000) {
            Ok(Some(libc::SIGWINCH)) => {
                if let Some((r, c)) = crate::sys::pty::size(io::stdin()) {
                    let mut d = r.to_be_bytes().to_vec();
                    d.extend_from_slice(&c.to_be_bytes());
                    let _ = send(&w, RESIZE, &d);
                }
            }
            Ok(Some(sig)) => {
                let _ = send(&w, SIGNAL, &sig.to_be_bytes());
            }
            Ok(None) => {}
            Err(_) => return,
        }
    });
    let mut code = None;
    let (mut out, mut err) = (io::stdout(), io::stderr());
    while let Ok(Some((kind, data))) = read_frame(&mut stream) {
        match kind {
            STDOUT => {
                let _ = out.write_all(&data).and_then(|_| out.flush());
            }
            STDERR => {
                let _ = err.write_all(&data).and_then(|_| err.flush());
            }
            EXIT if data.len() == 4 => {
                code = Some(i32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                break;
            }
            _ => {}
        }
    }
    // The session's last frame: on the host's serial bridge it marks where the next request
    // begins, so nothing may follow it (the other threads wait on the lock until the exit).
    let _last = code.map(|_| {
        let mut s = writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = write_frame(&mut *s, END, &[]);
        s
    });
    if let Some(saved) = raw {
        let _ = crate::sys::pty::restore(io::stdin(), &saved);
    }
    code.ok_or_else(|| Error::Failed("exec: the session ended without an exit status".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_target_then_command() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let l = parse(&a(&["-t", "admin", "sh", "-c", "echo ok; exit 3"])).unwrap();
        assert_eq!((l.tty, l.target.as_str(), l.command.len()), (Some(true), "admin", 3));
        let l = parse(&a(&["--no-tty", "admin", "ls", "-l"])).unwrap();
        assert_eq!(
            (l.tty, l.command),
            (Some(false), a(&["ls", "-l"])),
            "options after NAME are the command's"
        );
        assert!(matches!(parse(&a(&["admin"])), Err(Error::Usage(_))));
        assert!(matches!(parse(&a(&[])), Err(Error::Usage(_))));
        assert!(matches!(parse(&a(&["-x", "admin", "sh"])), Err(Error::Usage(_))));
    }
}
