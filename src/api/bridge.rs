//! Reaching the API from the host of a VM: a virtio-serial port named `org.berth.api` (QEMU:
//! `-device virtserialport,name=org.berth.api,chardev=...` with a Unix socket chardev) is
//! bridged to /run/api.sock inside, as the QEMU guest agent uses such a port. vhost-vsock is
//! not available everywhere; a serial port is. A machine with no virtio at all (QEMU's
//! `raspi4b`) names a plain serial port instead, `berth.api-serial=ttyS1` (or `ttyUSB0`, a USB
//! serial adapter such as QEMU's `usb-serial`) on the kernel command line; the bridge waits for
//! its node to appear, puts it in raw mode (no echo, no line editing, no CR/LF translation) and
//! bridges it the same way.
//!
//! The port is one byte stream with no reliable connection boundaries: the guest learns of a
//! host disconnect through a control message that can arrive after the next client's first
//! bytes. So the bridge does not follow connections at all; it cuts the stream into HTTP
//! requests (head plus Content-Length body, with the API's own parser), sends each on a fresh
//! API connection, and copies the complete answer back. One host client at a time; answers
//! are delimited by Content-Length. An incomplete request that gets no more bytes for 5 s (its
//! client went away) is dropped.
//!
//! **Upgraded connections (`apiclient exec` from the host).** An answer `101 Switching
//! Protocols` with `Upgrade: berth-exec` (see [`super::exec`]) turns the bridge from request
//! mode into a session: bytes from the API connection are copied to the port as they come, and
//! the host's bytes are cut into exec frames and written to the API connection, until the
//! session ends; then the bridge is back in request mode. The stream has no connection
//! boundaries, so both ends of the session are marked in the exec protocol itself:
//!
//! - guest → host: the `EXIT` frame is the session's last; the session process then closes the
//!   API connection, and the bridge sees the end of it.
//! - host → guest: the client answers `EXIT` with an `END` frame (no payload) and sends nothing
//!   more in the session. Frames it sent before `END` (a keystroke typed as the command ended)
//!   go to the session, or nowhere once it has closed; the bytes after `END` are the next
//!   request. The bridge reads every frame's header (kind and length) for this.
//!
//! How a session ends, and what the bridge does (each with a log line):
//!
//! | event | bridge |
//! | --- | --- |
//! | `END` from the host | closes the API connection (a command still running gets SIGTERM, see [`super::exec`]); request mode with the bytes after `END` |
//! | the host disconnects (the virtio port reads as closed) | closes the API connection; request mode, nothing pending |
//! | bytes that are not a client frame (an unknown kind or a length over `MAX_FRAME`: an HTTP request is neither) | the client that owned the session is gone and the next one is talking: closes the API connection; request mode with those bytes, which are answered as requests |
//! | the session closed, but no `END` within [`END_WAIT`] | request mode; a late `END` arriving there is skipped |
//!
//! So a host client that vanishes cannot hold the bridge: its disconnect, or the next client's
//! first request, ends the session. A session whose client is connected and silent (an idle
//! shell) lasts as long as the client keeps it. While the session's input is not being taken
//! (the command does not read), at most [`MAX_TO_API`] bytes of it wait in the bridge and the
//! bridge stops reading the port (the host's writes block, not the bridge's memory).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};
use rustix::event::{PollFd, PollFlags};

use super::exec::{END, MAX_FRAME, PROTOCOL, RESIZE, SIGNAL, STDIN, STDIN_EOF};
use crate::http::head::parse_request;
use crate::http::server::Limits;

pub const PORT_NAME: &str = "org.berth.api";
const STALE: Duration = Duration::from_secs(5);
const API_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a session whose command has ended waits for the host's `END` frame.
pub const END_WAIT: Duration = Duration::from_secs(10);
/// The most bytes of session input held while the session does not take them.
pub const MAX_TO_API: usize = 256 * 1024;
/// The longest answer head read to tell an upgrade from an ordinary answer.
const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// The `END` frame, as it comes after a session that ended without it.
const END_FRAME: [u8; 5] = [END, 0, 0, 0, 0];

/// The /dev node of the virtio-serial port called `name`, if there is one.
pub fn find_port(name: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/class/virtio-ports").ok()?.flatten().find_map(|e| {
        let n = fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// The length of the first complete request in `buf`: `Some(n)` when one is there, `Some(all)`
/// when the bytes are not HTTP (the API answers them with its error), `None` when more are due.
fn next_request(buf: &[u8], limits: &Limits) -> Option<usize> {
    match parse_request(buf, limits.max_header_bytes, limits.max_body_bytes) {
        Ok(Some((head, len))) => {
            (buf.len() >= len + head.content_length).then_some(len + head.content_length)
        }
        Ok(None) => None,
        Err(_) => Some(buf.len()),
    }
}

/// Whether an answer head is the exec protocol's upgrade (`101` with `Upgrade: berth-exec`).
fn is_exec_upgrade(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or("");
    status.split(' ').nth(1) == Some("101")
        && lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("upgrade") && v.trim().eq_ignore_ascii_case(PROTOCOL)
            })
        })
}

/// Send one request on a fresh API connection and copy its answer to the port. An ordinary
/// answer is copied whole (the connection is half-closed once its head is in, so the server
/// closes after it); an exec upgrade's head is copied and its connection returned, for
/// [`session`].
fn forward(request: &[u8], socket: &Path, port: &mut impl Write) -> std::io::Result<Option<UnixStream>> {
    let mut api = UnixStream::connect(socket)?;
    api.set_read_timeout(Some(API_TIMEOUT))?;
    api.write_all(request)?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i + 4);
        }
        if answer.len() > MAX_ANSWER_HEAD {
            break None;
        }
        match api.read(&mut buf)? {
            0 => break None,
            n => answer.extend_from_slice(&buf[..n]),
        }
    };
    if head_end.is_some_and(|end| is_exec_upgrade(&answer[..end])) {
        // The head, and whatever frames came with it.
        port.write_all(&answer)?;
        return Ok(Some(api));
    }
    // Half-close: the server has answered this request; it sees the end and closes.
    let _ = api.shutdown(Shutdown::Write);
    api.read_to_end(&mut answer)?;
    port.write_all(&answer)?;
    Ok(None)
}

/// What the first bytes of a session's host input are.
#[derive(Debug, PartialEq)]
enum ClientFrame {
    /// More bytes are due.
    Incomplete,
    /// A whole frame of this kind and total length (header included).
    Frame(u8, usize),
    /// Not a frame a client sends: the session's client is no longer the one talking.
    NotAFrame,
}

fn client_frame(buf: &[u8]) -> ClientFrame {
    let Some(head) = buf.get(..5) else {
        // A kind byte alone is already telling.
        return match buf.first() {
            Some(k) if !matches!(*k, STDIN | STDIN_EOF | RESIZE | SIGNAL | END) => ClientFrame::NotAFrame,
            _ => ClientFrame::Incomplete,
        };
    };
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let fits = match head[0] {
        STDIN => len <= MAX_FRAME,
        STDIN_EOF | END => len == 0,
        RESIZE | SIGNAL => len == 4,
        _ => false,
    };
    match (fits, buf.len() >= 5 + len) {
        (false, _) => ClientFrame::NotAFrame,
        (true, true) => ClientFrame::Frame(head[0], 5 + len),
        (true, false) => ClientFrame::Incomplete,
    }
}

/// How a session ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The host sent `END`.
    Done,
    /// The host disconnected.
    HostLeft,
    /// The host's bytes stopped being frames (its client is gone; the next one is talking).
    NotFrames,
    /// The session closed and no `END` came within the wait.
    NoEnd,
    /// The port could not be read or written.
    PortFailed,
}

/// Relay an upgraded connection: `api` to the port as it comes, the host's frames (starting
/// with those already in `from_host`) to `api`, until the session ends (see the module docs).
/// On return `from_host` holds the bytes for request mode. `zero_is_hangup`: a read of 0 from
/// the port means the host disconnected (a virtio port, a socket), not "no bytes yet" (a tty
/// in raw mode with a read timeout).
fn session<P: Read + Write + AsFd>(
    port: &mut P,
    mut api: UnixStream,
    from_host: &mut Vec<u8>,
    zero_is_hangup: bool,
    end_wait: Duration,
) -> Ended {
    let _ = api.set_nonblocking(true);
    let mut to_api: Vec<u8> = Vec::new();
    let mut closed_at: Option<Instant> = None;
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        loop {
            match client_frame(from_host) {
                ClientFrame::Incomplete => break,
                ClientFrame::NotAFrame => return Ended::NotFrames,
                ClientFrame::Frame(kind, n) => {
                    let frame: Vec<u8> = from_host.drain(..n).collect();
                    if kind == END {
                        return Ended::Done;
                    }
                    if closed_at.is_none() {
                        to_api.extend_from_slice(&frame);
                    }
                }
            }
        }
        let mut wait = Duration::from_secs(1);
        if let Some(t) = closed_at {
            match end_wait.checked_sub(t.elapsed()) {
                Some(left) if !left.is_zero() => wait = wait.min(left),
                _ => return Ended::NoEnd,
            }
        }
        let port_events = if to_api.len() < MAX_TO_API { PollFlags::IN } else { PollFlags::empty() };
        let mut api_events = PollFlags::IN;
        if !to_api.is_empty() {
            api_events |= PollFlags::OUT;
        }
        let (port_ready, api_ready) = {
            // Once the session has closed, only the port: a closed socket is always "ready".
            let mut fds = vec![PollFd::from_borrowed_fd(port.as_fd(), port_events)];
            if closed_at.is_none() {
                fds.push(PollFd::from_borrowed_fd(api.as_fd(), api_events));
            }
            let timeout =
                rustix::time::Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: wait.subsec_nanos().into() };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    warn!("api bridge: poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            (fds[0].revents(), fds.get(1).map_or(PollFlags::empty(), PollFd::revents))
        };
        if closed_at.is_none() && api_ready.intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP) {
            match api.write(&to_api) {
                Ok(n) => drop(to_api.drain(..n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // The session process is gone: what it did not take goes nowhere.
                Err(_) => to_api.clear(),
            }
        }
        if closed_at.is_none() && api_ready.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) {
            match api.read(&mut buf) {
                Ok(n) if n > 0 => {
                    if let Err(e) = port.write_all(&buf[..n]) {
                        warn!("api bridge: writing an exec session's output to the port: {e}");
                        return Ended::PortFailed;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                // The end of the session (after its EXIT frame), or a broken one.
                _ => {
                    closed_at = Some(Instant::now());
                    to_api.clear();
                }
            }
        }
        // Readable, or hung up (reported even while input is held back).
        if !port_ready.is_empty() {
            match port.read(&mut buf) {
                Ok(0) if zero_is_hangup => return Ended::HostLeft,
                Ok(0) => {}
                Ok(n) => from_host.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("api bridge: reading the port in an exec session: {e}");
                    return Ended::PortFailed;
                }
            }
        }
    }
}

/// Open the port, waiting for its node: a USB serial adapter (`ttyUSB0`) appears only once USB
/// has enumerated it, which can be after the bridge starts.
fn open_port(dev: &Path) -> std::io::Result<File> {
    let mut waited = false;
    loop {
        match OpenOptions::new().read(true).write(true).open(dev) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !waited {
                    info!("api bridge: waiting for {}", dev.display());
                    waited = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

fn run(dev: PathBuf, socket: PathBuf) {
    let mut port = match open_port(&dev) {
        Ok(p) => p,
        Err(e) => return warn!("api bridge: {}: {e}", dev.display()),
    };
    let tty = crate::sys::is_tty(&port);
    if tty {
        if let Err(e) = crate::sys::make_raw(&port) {
            return warn!("api bridge: raw mode on {}: {e}", dev.display());
        }
    }
    info!("api bridge: {} <-> {}", dev.display(), socket.display());
    serve(&mut port, &socket, !tty, END_WAIT)
}

/// The bridge's loop: request mode, with exec sessions as they are upgraded to. Returns only
/// when the port fails in a session.
fn serve<P: Read + Write + AsFd>(port: &mut P, socket: &Path, zero_is_hangup: bool, end_wait: Duration) {
    let limits = Limits::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut last_bytes = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A session that ended without the host's `END` can see it arrive late.
        while pending.starts_with(&END_FRAME) {
            pending.drain(..END_FRAME.len());
        }
        while let Some(n) = next_request(&pending, &limits) {
            let request: Vec<u8> = pending.drain(..n).collect();
            let api = match forward(&request, socket, port) {
                Ok(Some(api)) => api,
                Ok(None) => continue,
                Err(e) => {
                    warn!("api bridge: {e}");
                    continue;
                }
            };
            info!("api bridge: an exec session from the host");
            let ended = session(port, api, &mut pending, zero_is_hangup, end_wait);
            match ended {
                Ended::Done => info!("api bridge: the exec session ended"),
                Ended::HostLeft => {
                    warn!("api bridge: the host client left during an exec session; the session is closed");
                    pending.clear();
                }
                Ended::NotFrames => warn!(
                    "api bridge: the host sent a request during an exec session (its client left); \
                     the session is closed and the request answered"
                ),
                Ended::NoEnd => warn!(
                    "api bridge: no end of the exec session from the host within {} s; back to requests",
                    end_wait.as_secs()
                ),
                Ended::PortFailed => return,
            }
            last_bytes = Instant::now();
            while pending.starts_with(&END_FRAME) {
                pending.drain(..END_FRAME.len());
            }
        }
        match port.read(&mut buf) {
            // No host connected (or it just left): nothing to read now.
            Ok(0) => {
                if !pending.is_empty() && last_bytes.elapsed() > STALE {
                    warn!("api bridge: dropping {} bytes of an incomplete request", pending.len());
                    pending.clear();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                last_bytes = Instant::now();
            }
            Err(e) => {
                warn!("api bridge: reading the port: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// The serial port `berth.api-serial=NAME` names (a /dev node without slashes), if any.
fn serial_port() -> Option<PathBuf> {
    let cmdline = crate::boot::cmdline::Cmdline::read();
    let name = cmdline.get("api-serial")?;
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        warn!("api bridge: berth.api-serial={name} is not a device name (like ttyS1)");
        return None;
    }
    Some(Path::new("/dev").join(name))
}

/// The bridge's port: the virtio-serial port, else the serial port the command line names.
fn port() -> Option<PathBuf> {
    find_port(PORT_NAME).or_else(serial_port)
}

/// Whether the machine has the host bridge's port.
pub fn available() -> bool {
    port().is_some()
}

/// Run the bridge to `socket` in a thread named `api-bridge` (PID 1 supervises it).
pub fn spawn(socket: PathBuf) -> std::io::Result<std::thread::JoinHandle<Result<(), String>>> {
    let dev =
        port().ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, format!("no port {PORT_NAME}")))?;
    std::thread::Builder::new().name("api-bridge".into()).stack_size(256 * 1024).spawn(move || {
        run(dev, socket);
        Err("the bridge loop ended".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::server as http;
    use std::sync::Arc;

    #[test]
    fn cuts_the_stream_into_requests() {
        let l = Limits::default();
        let get = b"GET /settings HTTP/1.1\r\nHost: x\r\n\r\n";
        let patch = b"PATCH /settings HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}\r\n";
        assert_eq!(next_request(get, &l), Some(get.len()));
        let mut two = get.to_vec();
        two.extend_from_slice(patch);
        assert_eq!(next_request(&two, &l), Some(get.len()));
        assert_eq!(next_request(&patch[..patch.len() - 2], &l), None, "body not complete");
        assert_eq!(next_request(b"GET /sett", &l), None, "head not complete");
        assert_eq!(next_request(b"\x00\x01garbage\r\n\r\n", &l), Some(13), "not HTTP: the API answers it");
    }

    #[test]
    fn client_frames_are_told_from_requests() {
        assert_eq!(client_frame(&[]), ClientFrame::Incomplete);
        assert_eq!(client_frame(&[STDIN, 0, 0]), ClientFrame::Incomplete);
        assert_eq!(client_frame(&[STDIN, 0, 0, 0, 2, b'h']), ClientFrame::Incomplete);
        assert_eq!(client_frame(&[STDIN, 0, 0, 0, 2, b'h', b'i', END]), ClientFrame::Frame(STDIN, 7));
        assert_eq!(client_frame(&[RESIZE, 0, 0, 0, 4, 0, 33, 0, 101]), ClientFrame::Frame(RESIZE, 9));
        assert_eq!(client_frame(&END_FRAME), ClientFrame::Frame(END, 5));
        assert_eq!(client_frame(b"G"), ClientFrame::NotAFrame, "an HTTP request is not a frame");
        assert_eq!(client_frame(b"POST /exec"), ClientFrame::NotAFrame);
        assert_eq!(client_frame(&[STDIN, 0xff, 0, 0, 0]), ClientFrame::NotAFrame, "over MAX_FRAME");
        assert_eq!(client_frame(&[RESIZE, 0, 0, 0, 3]), ClientFrame::NotAFrame);
        assert!(is_exec_upgrade(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: berth-exec\r\n\r\n"
        ));
        assert!(!is_exec_upgrade(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!is_exec_upgrade(b"HTTP/1.1 404 Not Found\r\nX: Upgrade: berth-exec\r\n\r\n"));
    }

    /// An API whose `/exec` upgrades to a fake session: it echoes STDIN frames as STDOUT, and
    /// answers the input `exit` with EXIT 3 and closes; it reports how it ended on `ended`.
    /// Other paths answer `{"path": PATH}`.
    fn fake_api(dir: &Path, ended: std::sync::mpsc::Sender<&'static str>) -> PathBuf {
        use crate::api::exec::{read_frame, write_frame, EXIT, STDOUT};
        let sock = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let ended = std::sync::Mutex::new(ended);
        let take: Arc<dyn Fn(UnixStream, Vec<u8>) + Send + Sync> = Arc::new(move |mut s, leftover| {
            assert!(leftover.is_empty());
            let ended = ended.lock().unwrap().clone();
            std::thread::spawn(move || loop {
                match read_frame(&mut s) {
                    Ok(Some((STDIN, d))) if d == b"exit" => {
                        write_frame(&mut s, EXIT, &3i32.to_be_bytes()).unwrap();
                        return ended.send("exited").unwrap();
                    }
                    Ok(Some((STDIN, d))) => write_frame(&mut s, STDOUT, &d).unwrap(),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return ended.send("client gone").unwrap(),
                }
            });
        });
        let handler: http::Handler = Arc::new(move |r: &http::Request| {
            if r.path == "/exec" {
                http::Response::upgrade(PROTOCOL, take.clone())
            } else {
                http::Response::json(200, &serde_json::json!({"path": r.path}))
            }
        });
        std::thread::spawn(move || {
            http::serve(listener, Limits::default(), handler, Arc::new(Default::default()))
        });
        sock
    }

    /// The host's end of the port: requests out, answers and frames in.
    struct Host(UnixStream);

    impl Host {
        fn head(&mut self) -> String {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(self.0.read(&mut b).unwrap(), 1, "the port closed in {head:?}");
                head.push(b[0]);
            }
            String::from_utf8(head).unwrap()
        }

        /// An ordinary answer: status and body.
        fn answer(&mut self) -> (u16, String) {
            let head = self.head();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0u8; len];
            self.0.read_exact(&mut body).unwrap();
            (head[9..12].parse().unwrap(), String::from_utf8(body).unwrap())
        }

        fn exec(&mut self) {
            self.0.write_all(b"POST /exec HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").unwrap();
            let head = self.head();
            assert!(head.starts_with("HTTP/1.1 101") && head.contains("Upgrade: berth-exec"), "{head}");
        }

        fn frame(&mut self) -> (u8, Vec<u8>) {
            crate::api::exec::read_frame(&mut self.0).unwrap().expect("a frame")
        }
    }

    fn frame(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        crate::api::exec::write_frame(&mut v, kind, data).unwrap();
        v
    }

    #[test]
    fn relays_an_exec_session_then_is_back_to_requests() {
        use crate::api::exec::{EXIT, STDOUT};
        let dir = crate::testing::TempDir::new("bridge-session");
        let (tx, ended) = std::sync::mpsc::channel();
        let sock = fake_api(dir.path(), tx);
        let (mut port, host) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let end_wait = Duration::from_millis(300);
        std::thread::spawn(move || serve(&mut port, &sock, true, end_wait));
        let mut host = Host(host);
        let gone = || ended.recv_timeout(Duration::from_secs(20)).unwrap();

        // Request mode.
        host.0.write_all(b"GET /before HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(host.answer(), (200, r#"{"path":"/before"}"#.into()));

        // A session that ends cleanly: EXIT from the guest, END from the host, and the bytes
        // right after END (in the same write) are the next request.
        host.exec();
        host.0.write_all(&frame(STDIN, b"hi")).unwrap();
        assert_eq!(host.frame(), (STDOUT, b"hi".to_vec()));
        host.0.write_all(&[frame(RESIZE, &[0, 33, 0, 101]), frame(STDIN, b"exit")].concat()).unwrap();
        assert_eq!(host.frame(), (EXIT, 3i32.to_be_bytes().to_vec()));
        assert_eq!(gone(), "exited");
        let mut end_then_request = END_FRAME.to_vec();
        end_then_request.extend_from_slice(b"GET /after-end HTTP/1.1\r\n\r\n");
        host.0.write_all(&end_then_request).unwrap();
        assert_eq!(host.answer(), (200, r#"{"path":"/after-end"}"#.into()));

        // The session's client vanished without a word: the next client's request ends the
        // session (the command's end of it sees the connection close) and is answered.
        host.exec();
        host.0.write_all(&frame(STDIN, b"x")).unwrap();
        assert_eq!(host.frame(), (STDOUT, b"x".to_vec()));
        host.0.write_all(b"GET /next-client HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(gone(), "client gone");
        assert_eq!(host.answer(), (200, r#"{"path":"/next-client"}"#.into()));

        // The session closed and END is late (past the wait): back to requests anyway, and the
        // late END is skipped rather than answered as a bad request.
        host.exec();
        host.0.write_all(&frame(STDIN, b"exit")).unwrap();
        assert_eq!(host.frame(), (EXIT, 3i32.to_be_bytes().to_vec()));
        assert_eq!(gone(), "exited");
        std::thread::sleep(end_wait * 3);
        host.0.write_all(&END_FRAME).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        host.0.write_all(b"GET /late HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(host.answer(), (200, r#"{"path":"/late"}"#.into()));

        // A refused exec (not an upgrade) is an ordinary answer.
        host.0.write_all(b"GET /exec-refused HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(host.answer().0, 200);
    }

    #[test]
    fn a_host_that_disconnects_ends_its_session() {
        let (mut port, mut host) = UnixStream::pair().unwrap();
        let (api, mut session_end) = UnixStream::pair().unwrap();
        session_end.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        host.write_all(&frame(STDIN, b"typed")).unwrap();
        drop(host);
        let mut pending = Vec::new();
        let ended = session(&mut port, api, &mut pending, true, END_WAIT);
        assert_eq!(ended, Ended::HostLeft);
        // The session got the input sent before, then the end of its connection.
        let mut got = Vec::new();
        session_end.read_to_end(&mut got).unwrap();
        assert_eq!(got, frame(STDIN, b"typed"));
    }

    #[test]
    fn input_a_session_does_not_take_is_bounded() {
        let (mut port, mut host) = UnixStream::pair().unwrap();
        let (api, session_end) = UnixStream::pair().unwrap();
        // The host floods input nobody reads; the bridge holds at most MAX_TO_API (plus one
        // read) and leaves the rest in the port, where the host's writes block.
        let flood = std::thread::spawn(move || {
            let chunk = frame(STDIN, &vec![b'x'; MAX_FRAME]);
            let mut sent = 0usize;
            host.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            while host.write_all(&chunk).is_ok() {
                sent += chunk.len();
                assert!(sent < 64 * 1024 * 1024, "the bridge took everything");
            }
            drop(host);
            sent
        });
        let mut pending = Vec::new();
        let r = session(&mut port, api, &mut pending, true, END_WAIT);
        let sent = flood.join().unwrap();
        assert!(sent > MAX_TO_API, "{sent}");
        assert_eq!(r, Ended::HostLeft);
        drop(session_end);
    }

    #[test]
    fn forwards_one_request_and_its_whole_answer() {
        let dir = std::env::temp_dir().join(format!("berth-bridge-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let handler: http::Handler = std::sync::Arc::new(|r: &http::Request| {
            http::Response::json(200, &serde_json::json!({"path": r.path}))
        });
        std::thread::spawn(move || {
            http::serve(listener, Limits::default(), handler, std::sync::Arc::new(Default::default()))
        });
        let out_path = dir.join("port");
        let mut out = File::create(&out_path).unwrap();
        forward(b"GET /os HTTP/1.1\r\n\r\n", &sock, &mut out).unwrap();
        let text = fs::read_to_string(&out_path).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("{\"path\":\"/os\"}"), "{text}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
