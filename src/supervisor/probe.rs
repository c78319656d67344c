//! containerd's readiness: its socket answers a gRPC version call
//! (`containerd.services.version.v1.Version/Version`), the same question `ctr version` asks.
//!
//! A connection alone is not the answer: containerd binds its socket after loading its
//! plugins but serves a moment later, and a stale socket file from an earlier run accepts
//! nothing. The call is one HTTP/2 exchange with prior knowledge over the Unix socket, written
//! out by hand (connection preface, SETTINGS, one HEADERS block in literal HPACK, one DATA
//! frame with an empty request message); the answer's first DATA frame carries the version.
//!
//! [`wait_answering`] waits for the socket with inotify (no polling interval on the path to
//! ready): it asks at once if the socket is there, otherwise when the directory says a file was
//! created. The supervisor runs it in a thread per start of the service; `berth
//! containerd-probe` runs the same code in `scripts/bench compare`'s baseline and floor guests,
//! so all three are measured by the same question.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::inotify;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const PATH: &str = "/containerd.services.version.v1.Version/Version";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const RST_STREAM: u8 = 3;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;
/// The largest frame accepted from the server (its default SETTINGS_MAX_FRAME_SIZE is 16 KiB).
const MAX_FRAME: usize = 64 * 1024;
/// Frames read before giving up on an answer (SETTINGS, WINDOW_UPDATE, PING... then ours).
const MAX_FRAMES: usize = 32;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal, not Huffman-coded (all ours are shorter than 127 bytes).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The client's side of the exchange, all of it, written at once.
pub fn request() -> Vec<u8> {
    let mut hpack = vec![0x83, 0x86]; // :method POST, :scheme http (static table 3 and 6)
    hpack.push(0x04); // :path, literal value, name from the static table (4)
    hpack_str(&mut hpack, PATH);
    hpack.push(0x01); // :authority (1)
    hpack_str(&mut hpack, "containerd");
    hpack.extend_from_slice(&[0x0f, 0x10]); // content-type (31 = 15 + 16)
    hpack_str(&mut hpack, "application/grpc");
    hpack.push(0x00); // a new name: te
    hpack_str(&mut hpack, "te");
    hpack_str(&mut hpack, "trailers");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, 1, &hpack));
    // A gRPC message: not compressed, 0 bytes (VersionRequest is google.protobuf.Empty).
    out.extend(frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    out
}

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The version string (field 1) of a gRPC-framed `VersionResponse`.
pub fn parse_version(message: &[u8]) -> Result<String, String> {
    let body = match message {
        [0, a, b, c, d, rest @ ..] if u32::from_be_bytes([*a, *b, *c, *d]) as usize <= rest.len() => {
            &rest[..u32::from_be_bytes([*a, *b, *c, *d]) as usize]
        }
        _ => return Err("the answer is not one uncompressed gRPC message".into()),
    };
    let mut at = 0;
    while at < body.len() {
        let key = varint(body, &mut at).ok_or("a truncated protobuf key")?;
        match key & 7 {
            0 => {
                varint(body, &mut at).ok_or("a truncated varint")?;
            }
            2 => {
                let n = varint(body, &mut at).ok_or("a truncated length")? as usize;
                let v = body.get(at..at.saturating_add(n)).ok_or("a length past the message's end")?;
                at += n;
                if key >> 3 == 1 {
                    return Ok(String::from_utf8_lossy(v).into_owned());
                }
            }
            _ => return Err(format!("protobuf wire type {} is not expected here", key & 7)),
        }
    }
    Err("the answer has no version".into())
}

/// Read the server's frames until the answer to stream 1; ACKs its SETTINGS on the way.
pub fn read_answer(conn: &mut (impl Read + Write)) -> Result<String, String> {
    let mut data = Vec::new();
    for _ in 0..MAX_FRAMES {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).map_err(|e| format!("reading a frame: {e}"))?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(format!("a {len}-byte frame is larger than {MAX_FRAME}"));
        }
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).map_err(|e| format!("reading a frame: {e}"))?;
        match kind {
            SETTINGS if flags & ACK == 0 => {
                conn.write_all(&frame(SETTINGS, ACK, 0, &[])).map_err(|e| format!("writing: {e}"))?
            }
            GOAWAY => return Err("the server sent GOAWAY".into()),
            RST_STREAM if stream == 1 => return Err("the server reset the call".into()),
            DATA if stream == 1 => {
                data.extend_from_slice(&payload);
                if data.len() > MAX_FRAME {
                    return Err("the answer is too long".into());
                }
                if let Ok(v) = parse_version(&data) {
                    return Ok(v);
                }
                if flags & END_STREAM != 0 {
                    return parse_version(&data);
                }
            }
            HEADERS if stream == 1 && flags & END_STREAM != 0 => {
                return Err("the call ended without an answer (a gRPC error)".into())
            }
            _ => {}
        }
    }
    Err(format!("no answer in {MAX_FRAMES} frames"))
}

/// One version call on `socket`: containerd's version, or why not.
pub fn version_call(socket: &Path, timeout: Duration) -> Result<String, String> {
    let mut conn = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    conn.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    conn.write_all(&request()).map_err(|e| format!("writing: {e}"))?;
    read_answer(&mut conn)
}

/// Wait until `socket` answers a version call; gives up at `timeout` or when `cancelled` says
/// so (checked at least every second). Creates the socket's directory if it is missing, so
/// that it can be watched.
pub fn wait_answering(
    socket: &Path,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let dir = socket.parent().unwrap_or(Path::new("/"));
    let _ = std::fs::create_dir_all(dir);
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .map_err(|e| format!("inotify: {e}"))?;
    inotify::add_watch(&fd, dir, inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO)
        .map_err(|e| format!("watching {}: {e}", dir.display()))?;
    let mut last = format!("{} never appeared", socket.display());
    loop {
        // Ask at once if the socket is there; else sleep until the directory changes.
        let mut wait = Duration::from_secs(1);
        if socket.exists() {
            match version_call(
                socket,
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            ) {
                Ok(v) => return Ok(v),
                // Bound but not yet serving, or a stale file from an earlier run: a new
                // socket file wakes us; the short wait covers bind-before-listen.
                Err(e) => {
                    last = e;
                    wait = Duration::from_millis(20);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || cancelled() {
            return Err(last);
        }
        let t = wait.min(left);
        let ts = rustix::time::Timespec { tv_sec: t.as_secs() as i64, tv_nsec: i64::from(t.subsec_nanos()) };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&ts));
        let mut buf = [0u8; 1024];
        while matches!(rustix::io::read(&fd, &mut buf), Ok(n) if n > 0) {}
    }
}

/// `berth containerd-probe SOCKET`: the bench's probe in the baseline and floor guests. Logs
/// `bench: containerd answers version=V` to the kernel log (so the console line carries the
/// kernel's timestamp) when SOCKET answers, then, 2 s later, `bench: idle pid1_rss_kb=N
/// guest_used_kb=N` (PID 1's RSS and MemTotal - MemAvailable, as Berth's own idle line).
pub fn probe_main(args: &[String]) -> Result<(), String> {
    let socket = args.first().ok_or("usage: berth containerd-probe SOCKET")?;
    let version = wait_answering(Path::new(socket), Duration::from_secs(600), &|| false)?;
    kmsg(&format!("bench: containerd answers version={version}"));
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string("/proc/1/status").unwrap_or_default();
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let used = kb_field(&info, "MemTotal:").saturating_sub(kb_field(&info, "MemAvailable:"));
    kmsg(&format!("bench: idle pid1_rss_kb={} guest_used_kb={used}", kb_field(&status, "VmRSS:")));
    Ok(())
}

fn kb_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn kmsg(line: &str) {
    let wrote = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut f| f.write_all(format!("<5>{line}\n").as_bytes()));
    if wrote.is_err() {
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server side: what it sends, and what the client wrote to it.
    struct Wire {
        input: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }
    impl Read for Wire {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Wire {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn answer(version: &str) -> Vec<u8> {
        let mut msg = vec![0x0a, version.len() as u8];
        msg.extend_from_slice(version.as_bytes());
        msg.extend_from_slice(&[0x12, 3, b'a', b'b', b'c']); // revision
        let mut g = vec![0];
        g.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        g.extend(msg);
        g
    }

    #[test]
    fn the_request_is_a_preface_settings_headers_and_an_empty_message() {
        let r = request();
        assert!(r.starts_with(PREFACE));
        let rest = &r[PREFACE.len()..];
        assert_eq!(&rest[..9], &[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
        let h = &rest[9..];
        let len = usize::from(h[2]);
        assert_eq!((h[3], h[4], h[8]), (HEADERS, END_HEADERS, 1));
        let block = &h[9..9 + len];
        assert!(block.windows(PATH.len()).any(|w| w == PATH.as_bytes()));
        assert_eq!(&h[9 + len..], &[0, 0, 5, DATA, END_STREAM, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn the_version_is_read_from_the_first_data_frame_and_settings_are_acked() {
        let mut input = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        let a = answer("1.6.20~ds1");
        // Split across two DATA frames.
        input.extend(frame(DATA, 0, 1, &a[..4]));
        input.extend(frame(DATA, 0, 1, &a[4..]));
        let mut w = Wire { input: std::io::Cursor::new(input), written: Vec::new() };
        assert_eq!(read_answer(&mut w).unwrap(), "1.6.20~ds1");
        assert_eq!(w.written, frame(SETTINGS, ACK, 0, &[]));
    }

    #[test]
    fn errors_and_garbage_are_refused() {
        // A trailers-only gRPC error.
        let mut w = Wire {
            input: std::io::Cursor::new(frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88])),
            written: vec![],
        };
        assert!(read_answer(&mut w).unwrap_err().contains("gRPC error"));
        let mut w = Wire { input: std::io::Cursor::new(frame(GOAWAY, 0, 0, &[0; 8])), written: vec![] };
        assert!(read_answer(&mut w).unwrap_err().contains("GOAWAY"));
        // An oversized frame is not read.
        let mut w = Wire {
            input: std::io::Cursor::new(vec![0xff, 0xff, 0xff, DATA, 0, 0, 0, 0, 1]),
            written: vec![],
        };
        assert!(read_answer(&mut w).unwrap_err().contains("larger"));
        // The connection closes early.
        let mut w = Wire { input: std::io::Cursor::new(frame(SETTINGS, 0, 0, &[])), written: vec![] };
        assert!(read_answer(&mut w).is_err());
        assert!(parse_version(&[1, 0, 0, 0, 0]).is_err());
        assert!(parse_version(&[0, 0, 0, 0, 9, 0x0a]).is_err());
        assert!(parse_version(&[0, 0, 0, 0, 2, 0x0a, 50]).is_err());
    }

    #[test]
    fn waiting_gives_up_at_its_deadline_when_nothing_answers() {
        let dir = std::env::temp_dir().join(format!("berth-probe-{}", std::process::id()));
        let sock = dir.join("c.sock");
        let t = Instant::now();
        let e = wait_answering(&sock, Duration::from_millis(300), &|| false).unwrap_err();
        assert!(e.contains("never appeared"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // A socket that accepts but never answers HTTP/2 is not ready either.
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut b = [0u8; 64];
                let _ = c.read(&mut b);
                let _ = c.write_all(&frame(GOAWAY, 0, 0, &[0; 8]));
            }
        });
        let e = wait_answering(&sock, Duration::from_millis(300), &|| false).unwrap_err();
        assert!(e.contains("GOAWAY"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
