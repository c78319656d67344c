//! Reaching the API from the host of a VM: a virtio-serial port named `org.berth.api` (QEMU:
//! `-device virtserialport,name=org.berth.api,chardev=...` with a Unix socket chardev) is
//! bridged to /run/api.sock inside, as the QEMU guest agent uses such a port. vhost-vsock is
//! not available everywhere; a serial port is.
//!
//! The port is one byte stream, so one host client at a time: when the host side connects and
//! sends, the bridge connects to the API and copies both ways until the host disconnects.
//! While no host is connected, reads return 0 at once, so the bridge polls every 100 ms.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{info, warn};

pub const PORT_NAME: &str = "org.berth.api";

/// The /dev node of the virtio-serial port called `name`, if there is one.
pub fn find_port(name: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/class/virtio-ports").ok()?.flatten().find_map(|e| {
        let n = fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim() == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

fn session(port: &mut File, first: &[u8], socket: &Path) -> std::io::Result<()> {
    let mut api = UnixStream::connect(socket)?;
    api.write_all(first)?;
    let mut from_api = api.try_clone()?;
    let mut to_port = port.try_clone()?;
    let back = std::thread::Builder::new().name("api-bridge-out".into()).spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from_api.read(&mut buf) {
            if n == 0 || to_port.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match port.read(&mut buf) {
            Ok(0) | Err(_) => break, // the host disconnected
            Ok(n) => {
                if api.write_all(&buf[..n]).is_err() {
                    // The API closed its side; drain the host's bytes until it disconnects.
                    continue;
                }
            }
        }
    }
    let _ = api.shutdown(Shutdown::Both);
    let _ = back.join();
    Ok(())
}

fn run(dev: PathBuf, socket: PathBuf) {
    let mut port = match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(p) => p,
        Err(e) => return warn!("api bridge: {}: {e}", dev.display()),
    };
    info!("api bridge: {} <-> {}", dev.display(), socket.display());
    let mut buf = [0u8; 16 * 1024];
    loop {
        match port.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(100)),
            Ok(n) => {
                if let Err(e) = session(&mut port, &buf[..n], &socket) {
                    warn!("api bridge: {e}");
                }
            }
            Err(e) => {
                warn!("api bridge: reading {}: {e}", dev.display());
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Start the bridge if the VM has the port; returns whether it did.
pub fn start(socket: &Path) -> bool {
    let Some(dev) = find_port(PORT_NAME) else {
        return false;
    };
    let socket = socket.to_path_buf();
    std::thread::Builder::new()
        .name("api-bridge".into())
        .stack_size(128 * 1024)
        .spawn(move || run(dev, socket))
        .is_ok()
}
