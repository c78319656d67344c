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

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::http::head::parse_request;
use crate::http::server::Limits;

pub const PORT_NAME: &str = "org.berth.api";
const STALE: Duration = Duration::from_secs(5);
const API_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Send one request on a fresh API connection and copy the whole answer to the port.
fn forward(request: &[u8], socket: &Path, port: &mut File) -> std::io::Result<()> {
    let mut api = UnixStream::connect(socket)?;
    api.set_read_timeout(Some(API_TIMEOUT))?;
    api.write_all(request)?;
    // Half-close: the server answers this request, then sees the end and closes.
    api.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    api.read_to_end(&mut answer)?;
    port.write_all(&answer)
}

/// Open the port, waiting for its node: a USB serial adapter (`ttyUSB0`) appears only once USB
/// has enumerated it, which can be after the bridge starts.
fn open_port(dev: &Path) -> std::io::Result<File> {
    let mut waited = false;
    loop {
        match OpenOptions::new().read(true).write(true).open(dev) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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
    if crate::sys::is_tty(&port) {
        if let Err(e) = crate::sys::make_raw(&port) {
            return warn!("api bridge: raw mode on {}: {e}", dev.display());
        }
    }
    info!("api bridge: {} <-> {}", dev.display(), socket.display());
    let limits = Limits::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut last_bytes = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(n) = next_request(&pending, &limits) {
            let request: Vec<u8> = pending.drain(..n).collect();
            if let Err(e) = forward(&request, &socket, &mut port) {
                warn!("api bridge: {e}");
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
                warn!("api bridge: reading {}: {e}", dev.display());
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
    let dev = port()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no port {PORT_NAME}")))?;
    std::thread::Builder::new().name("api-bridge".into()).stack_size(256 * 1024).spawn(move || {
        run(dev, socket);
        Err("the bridge loop ended".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::server as http;

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
