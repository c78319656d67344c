//! The harness of the host integration tests: temp dirs, the real binary in dev mode
//! (`berth serve --state-dir DIR --socket DIR/api.sock`), and a tiny HTTP/1.1 client over the
//! Unix socket. What dev mode renders (`DIR/etc`) and records (`DIR/host`, `DIR/actions.log`)
//! is read back with [`Server::file`].

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// How long a test waits for any one answer before it fails instead of hanging.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Temp dirs and the server process

/// A fresh directory, removed again on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("berth-it-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `berth serve` on a state dir; killed on drop. Its log goes to `DIR/server.log` and is
/// printed when a test fails.
pub struct Server {
    pub child: Child,
    pub state: PathBuf,
    pub sock: PathBuf,
}

impl Server {
    pub fn start(dir: &TempDir) -> Server {
        let state = dir.path().to_path_buf();
        let sock = state.join("api.sock");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("server.log"))
            .expect("open server.log");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup server.log"))
            .stderr(log)
            .spawn()
            .expect("start berth serve");
        let mut server = Server { child, state, sock };
        server.wait_ready();
        server
    }

    /// Wait until a whole request is served. The probe connection is read to its end, so its
    /// slot is free again before the test starts (the server frees it before closing).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                panic!("berth serve exited with {status}:\n{}", self.log());
            }
            if let Ok(mut s) = UnixStream::connect(&self.sock) {
                s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
                let probe = s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").and_then(|_| {
                    let mut out = Vec::new();
                    s.read_to_end(&mut out).map(|_| out)
                });
                if matches!(probe, Ok(out) if out.starts_with(b"HTTP/1.1 200")) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the server did not come up:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.state.join("server.log")).unwrap_or_default()
    }

    pub fn file(&self, rel: &str) -> String {
        let p = self.state.join(rel);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    pub fn connect(&self) -> Conn {
        Conn::new(UnixStream::connect(&self.sock).expect("connect to the API socket"))
    }

    /// One request on a connection of its own (`Connection: close`).
    pub fn request(&self, method: &str, uri: &str, body: &str) -> Resp {
        let mut c = self.connect();
        c.send_raw(&request_bytes(method, uri, body.as_bytes(), "Connection: close\r\n"));
        c.read().unwrap_or_else(|e| panic!("{method} {uri}: no answer: {e}"))
    }

    /// A request that must answer `status`.
    pub fn expect(&self, method: &str, uri: &str, body: &str, status: u16) -> Resp {
        let r = self.request(method, uri, body);
        assert_eq!(r.status, status, "{method} {uri} {body}: {}", r.text());
        r
    }

    /// `GET uri`, which must answer 200 with JSON.
    pub fn get(&self, uri: &str) -> Value {
        self.expect("GET", uri, "", 200).json()
    }

    /// PATCH `settings` into transaction `tx`, then commit it; returns the changed keys.
    pub fn commit(&self, tx: &str, settings: Value) -> Value {
        self.expect("PATCH", &format!("/settings?tx={tx}"), &settings.to_string(), 204);
        self.expect("POST", &format!("/tx/commit?tx={tx}"), "", 200).json()
    }

    /// What a refused request must leave as it was.
    pub fn snapshot(&self) -> (Value, Value, Value) {
        (self.get("/settings"), self.get("/tx"), self.get("/tx/list"))
    }

    /// `berth apiclient -s SOCK args...`
    pub fn apiclient(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("apiclient")
            .arg("-s")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run berth apiclient")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- server log ({}):\n{}", self.state.display(), self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The API's error document: `{"status": N, "error": "..."}` whose message holds `needles`.
    pub fn assert_error(&self, status: u16, needles: &[&str]) {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        assert_eq!(v["status"], json!(status), "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
        let e = v["error"].as_str().unwrap_or_else(|| panic!("no error: {v}"));
        for n in needles {
            assert!(e.contains(n), "error {e:?} should mention {n:?}");
        }
    }
}

pub fn request_bytes(method: &str, uri: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut out = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// One client connection; responses are framed by Content-Length.
pub struct Conn {
    pub stream: UnixStream,
    pub reader: BufReader<UnixStream>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        Conn { stream, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send a request");
    }

    /// A keep-alive request on this connection.
    pub fn send(&mut self, method: &str, uri: &str, body: &str) -> Resp {
        self.send_raw(&request_bytes(method, uri, body.as_bytes(), ""));
        self.read().unwrap_or_else(|e| panic!("{method} {uri}: no answer: {e}"))
    }

    pub fn read(&mut self) -> io::Result<Resp> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let (Some("HTTP/1.1"), Some(code)) = (parts.next(), parts.next()) else {
            return Err(bad(format!("bad status line {line:?}")));
        };
        let status = code.parse().map_err(|_| bad(format!("bad status {code:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').ok_or_else(|| bad(format!("bad header {l:?}")))?;
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let len = match headers.iter().find(|(n, _)| n == "content-length") {
            Some((_, v)) => v.parse().map_err(|_| bad(format!("bad Content-Length {v:?}")))?,
            None => 0,
        };
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(Resp { status, headers, body })
    }

    /// Whether the server has sent anything (or closed), without waiting for it. What it sent
    /// stays in the buffer for [`Conn::read`].
    pub fn has_answer(&mut self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        // The reader's stream shares the socket (and its non-blocking flag) with `stream`.
        self.stream.set_nonblocking(true).unwrap();
        let r = self.reader.fill_buf().map(|b| b.len());
        self.stream.set_nonblocking(false).unwrap();
        !matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
