//! Host integration tests of the settings API: each test starts the real binary in dev mode
//! (`berth serve --state-dir DIR --socket DIR/api.sock`) in a temp dir of its own and talks raw
//! HTTP/1.1 to it over a real Unix socket, with the tiny client below. What dev mode renders
//! (`DIR/etc`) and records (`DIR/host`, `DIR/actions.log`) is checked on disk.
//!
//! Limits: the server's timeouts and connection bound are its defaults (5 s, 32), so the
//! stalled-client test takes about 5 s; timing bounds are generous, since they only tell "served
//! meanwhile" from "served after the 5 s deadline".

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_berth");
/// How long a test waits for any one answer before it fails instead of hanging.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Temp dirs and the server process

/// A fresh directory, removed again on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("berth-it-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
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
struct Server {
    child: Child,
    state: PathBuf,
    sock: PathBuf,
}

impl Server {
    fn start(dir: &TempDir) -> Server {
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
    fn wait_ready(&mut self) {
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

    fn log(&self) -> String {
        fs::read_to_string(self.state.join("server.log")).unwrap_or_default()
    }

    fn file(&self, rel: &str) -> String {
        let p = self.state.join(rel);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn connect(&self) -> Conn {
        Conn::new(UnixStream::connect(&self.sock).expect("connect to the API socket"))
    }

    /// One request on a connection of its own (`Connection: close`).
    fn request(&self, method: &str, uri: &str, body: &str) -> Resp {
        let mut c = self.connect();
        c.send_raw(&request_bytes(method, uri, body.as_bytes(), "Connection: close\r\n"));
        c.read().unwrap_or_else(|e| panic!("{method} {uri}: no answer: {e}"))
    }

    /// A request that must answer `status`.
    fn expect(&self, method: &str, uri: &str, body: &str, status: u16) -> Resp {
        let r = self.request(method, uri, body);
        assert_eq!(r.status, status, "{method} {uri} {body}: {}", r.text());
        r
    }

    /// `GET uri`, which must answer 200 with JSON.
    fn get(&self, uri: &str) -> Value {
        self.expect("GET", uri, "", 200).json()
    }

    /// PATCH `settings` into transaction `tx`, then commit it; returns the changed keys.
    fn commit(&self, tx: &str, settings: Value) -> Value {
        self.expect("PATCH", &format!("/settings?tx={tx}"), &settings.to_string(), 204);
        self.expect("POST", &format!("/tx/commit?tx={tx}"), "", 200).json()
    }

    /// What a refused request must leave as it was.
    fn snapshot(&self) -> (Value, Value, Value) {
        (self.get("/settings"), self.get("/tx"), self.get("/tx/list"))
    }

    /// `berth apiclient -s SOCK args...`
    fn apiclient(&self, args: &[&str]) -> Output {
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
struct Resp {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        assert_eq!(self.header("content-type"), Some("application/json"), "{self:?}");
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The API's error document: `{"status": N, "error": "..."}` whose message holds `needles`.
    fn assert_error(&self, status: u16, needles: &[&str]) {
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

fn request_bytes(method: &str, uri: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut out = format!(
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// One client connection; responses are framed by Content-Length.
struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        let reader = BufReader::new(stream.try_clone().expect("clone the stream"));
        Conn { stream, reader }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send a request");
    }

    /// A keep-alive request on this connection.
    fn send(&mut self, method: &str, uri: &str, body: &str) -> Resp {
        self.send_raw(&request_bytes(method, uri, body.as_bytes(), ""));
        self.read().unwrap_or_else(|e| panic!("{method} {uri}: no answer: {e}"))
    }

    fn read(&mut self) -> io::Result<Resp> {
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
    fn has_answer(&mut self) -> bool {
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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Routes

#[test]
fn root_lists_every_route() {
    let dir = TempDir::new("root");
    let server = Server::start(&dir);
    let v = server.get("/");
    assert_eq!(v["name"], "berth");
    assert_eq!(v["version"], server.get("/os")["version_id"]);
    let routes: Vec<(String, Vec<String>)> = v["routes"]
        .as_array()
        .expect("routes is a list")
        .iter()
        .map(|r| {
            let methods = r["methods"].as_array().expect("methods is a list");
            let m: Vec<String> = methods.iter().map(|m| m.as_str().unwrap().into()).collect();
            (r["path"].as_str().expect("path").to_string(), m)
        })
        .collect();
    // The routes of docs/api.md.
    let want: Vec<(String, Vec<String>)> = [
        ("/", "GET"),
        ("/settings", "GET PATCH"),
        ("/settings/keypair", "PATCH"),
        ("/tx", "DELETE GET"),
        ("/tx/list", "GET"),
        ("/tx/commit", "POST"),
        ("/tx/apply", "POST"),
        ("/tx/commit_and_apply", "POST"),
        ("/os", "GET"),
        ("/configuration-files", "GET"),
        ("/services", "GET"),
        ("/user-data", "GET"),
        ("/selinux", "GET"),
        ("/system/state", "GET"),
        ("/actions/reboot", "POST"),
        ("/actions/shutdown", "POST"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.split(' ').map(String::from).collect()))
    .collect();
    // Every documented route is listed with its methods (routes added later may be listed too).
    for (path, methods) in &want {
        let listed = routes.iter().find(|(p, _)| p == path);
        let mut listed = listed.unwrap_or_else(|| panic!("{path} not in {routes:?}")).1.clone();
        listed.sort();
        assert_eq!(&listed, methods, "{path}");
    }
    // Every listed route is known to the router, which refuses a method it does not list.
    for (path, methods) in &routes {
        if path.contains(|c: char| c.is_ascii_uppercase()) {
            continue; // a template such as /services/NAME
        }
        server.request("PUT", path, "").assert_error(405, &[path, &methods.join(", ")]);
    }
}

#[test]
fn settings_start_empty_and_show_what_was_committed() {
    let dir = TempDir::new("settings");
    let server = Server::start(&dir);
    assert_eq!(server.get("/settings"), json!({}));
    assert_eq!(server.get("/tx"), json!({}));
    assert_eq!(server.get("/tx/list"), json!([]));

    let all = json!({
        "motd": "m",
        "network": {"hostname": "h1"},
        "kernel": {"sysctl": {"net.ipv4.ip_forward": "1", "vm.swappiness": "10"}},
        "updates": {"seed": 5},
    });
    server.expect("PATCH", "/settings", &all.to_string(), 204);
    assert_eq!(server.get("/settings"), json!({}), "nothing live before commit");
    assert_eq!(server.get("/tx"), all);
    assert_eq!(server.get("/tx?tx=default"), all);
    assert_eq!(server.get("/tx/list"), json!(["default"]));

    let changed = server.expect("POST", "/tx/commit", "", 200).json();
    assert_eq!(changed, json!(["kernel.sysctl", "motd", "network.hostname", "updates.seed"]));
    assert_eq!(server.get("/settings"), all);
    assert_eq!(server.get("/tx"), json!({}));
    assert_eq!(server.get("/tx/list"), json!([]));

    let cases = [
        (
            "/settings?keys=settings.motd,settings.kernel.sysctl.net.ipv4.ip_forward,updates.seed",
            json!({"motd": "m", "kernel": {"sysctl": {"net.ipv4.ip_forward": "1"}}, "updates": {"seed": 5}}),
        ),
        (
            "/settings?keys=settings.network.hostname,settings.kernel.sysctl.vm.swappiness",
            json!({"network": {"hostname": "h1"}, "kernel": {"sysctl": {"vm.swappiness": "10"}}}),
        ),
        ("/settings?keys=settings.motd,settings.ntp", json!({"motd": "m"})),
        ("/settings?keys=settings.nothing", json!({})),
        ("/settings?prefix=settings.network", json!({"network": {"hostname": "h1"}})),
        ("/settings?prefix=kernel", json!({"kernel": all["kernel"]})),
        ("/settings?prefix=settings.ntp", json!({})),
    ];
    for (uri, want) in cases {
        assert_eq!(server.get(uri), want, "{uri}");
    }
}

#[test]
fn keypair_patches_and_deleting_a_transaction() {
    let dir = TempDir::new("keypair");
    let server = Server::start(&dir);
    let body = json!({"settings.motd": "hi", "kernel.sysctl.vm.swappiness": "10",
                      "settings.network.hostname": "kp"});
    server.expect("PATCH", "/settings/keypair?tx=kp", &body.to_string(), 204);
    let pending = json!({"motd": "hi", "kernel": {"sysctl": {"vm.swappiness": "10"}},
                         "network": {"hostname": "kp"}});
    assert_eq!(server.get("/tx?tx=kp"), pending);
    assert_eq!(server.get("/tx"), json!({}), "the default tx is untouched");
    assert_eq!(server.get("/tx/list"), json!(["kp"]));

    let dropped = server.expect("DELETE", "/tx?tx=kp", "", 200).json();
    assert_eq!(dropped, pending);
    assert_eq!(server.get("/tx?tx=kp"), json!({}));
    assert_eq!(server.get("/tx/list"), json!([]));
    assert_eq!(server.get("/settings"), json!({}));
    server.request("POST", "/tx/commit?tx=kp", "").assert_error(409, &["kp"]);

    // Keypairs merge into what is pending; committing makes them live.
    server.expect("PATCH", "/settings/keypair", r#"{"settings.motd": "one"}"#, 204);
    server.expect("PATCH", "/settings/keypair", r#"{"network.hostname": "two"}"#, 204);
    assert_eq!(server.expect("POST", "/tx/commit", "", 200).json(), json!(["motd", "network.hostname"]));
    assert_eq!(server.get("/settings"), json!({"motd": "one", "network": {"hostname": "two"}}));
}

#[test]
fn apply_renders_files_and_records_host_effects() {
    let dir = TempDir::new("apply");
    let server = Server::start(&dir);
    // Dev mode renders the defaults at start.
    assert_eq!(server.file("etc/hostname"), "berth\n");
    assert_eq!(server.file("host/hostname"), "berth\n");
    assert_eq!(server.file("etc/motd"), "");

    let changed = server.commit(
        "default",
        json!({"motd": "hello", "network": {"hostname": "node-1"},
               "kernel": {"sysctl": {"vm.swappiness": "10", "net.ipv4.ip_forward": "1"}}}),
    );
    assert_eq!(changed, json!(["kernel.sysctl", "motd", "network.hostname"]));
    assert_eq!(server.file("etc/motd"), "", "a commit alone applies nothing");
    assert_eq!(server.get("/system/state")["hostname"], "berth");

    // Only the keys asked for.
    server.expect("POST", "/tx/apply?keys=settings.motd", "", 204);
    assert_eq!(server.file("etc/motd"), "hello\n");
    assert_eq!(server.file("etc/hostname"), "berth\n");
    assert_eq!(server.file("host/hostname"), "berth\n");

    // Everything.
    let r = server.expect("POST", "/tx/apply", "", 204);
    assert!(r.body.is_empty());
    assert_eq!(server.file("etc/motd"), "hello\n");
    assert_eq!(server.file("etc/hostname"), "node-1\n");
    assert!(server.file("etc/hosts").contains("127.0.1.1 node-1\n"), "{}", server.file("etc/hosts"));
    assert_eq!(server.file("etc/sysctl.d/90-berth.conf"), "net.ipv4.ip_forward = 1\nvm.swappiness = 10\n");
    assert_eq!(server.file("host/hostname"), "node-1\n");
    assert_eq!(server.file("host/sysctl/vm.swappiness"), "10\n");
    assert_eq!(server.file("host/sysctl/net.ipv4.ip_forward"), "1\n");
    assert_eq!(
        system_state(&server),
        json!({"hostname": "node-1", "motd": "hello\n",
               "sysctl": {"net.ipv4.ip_forward": "1", "vm.swappiness": "10"}})
    );
}

#[test]
fn commit_and_apply_reapplies_only_what_changed() {
    let dir = TempDir::new("cna");
    let server = Server::start(&dir);
    server.expect("PATCH", "/settings?tx=ca", r#"{"motd": "one"}"#, 204);
    // Remove what start-up recorded: a motd change must not touch the hostname again.
    fs::remove_file(dir.path().join("host/hostname")).unwrap();
    let changed = server.expect("POST", "/tx/commit_and_apply?tx=ca", "", 200).json();
    assert_eq!(changed, json!(["motd"]));
    assert_eq!(server.file("etc/motd"), "one\n");
    assert!(!dir.path().join("host/hostname").exists());
    assert_eq!(server.get("/tx/list"), json!([]));

    server.expect(
        "PATCH",
        "/settings/keypair?tx=ca",
        r#"{"settings.network.hostname": "ca-host", "kernel.sysctl.kernel.pid_max": "4096"}"#,
        204,
    );
    let changed = server.expect("POST", "/tx/commit_and_apply?tx=ca", "", 200).json();
    assert_eq!(changed, json!(["kernel.sysctl", "network.hostname"]));
    assert_eq!(server.file("host/hostname"), "ca-host\n");
    assert_eq!(server.file("etc/hostname"), "ca-host\n");
    assert_eq!(server.file("host/sysctl/kernel.pid_max"), "4096\n");
    assert_eq!(
        system_state(&server),
        json!({"hostname": "ca-host", "motd": "one\n", "sysctl": {"kernel.pid_max": "4096"}})
    );
    server.request("POST", "/tx/commit_and_apply?tx=ca", "").assert_error(409, &["ca", "no pending changes"]);
}

#[test]
fn os_files_services_and_user_data() {
    let dir = TempDir::new("info");
    let server = Server::start(&dir);
    let os = server.get("/os");
    let keys: Vec<&str> = os.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["arch", "build_id", "pretty_name", "selinux", "slot", "variant_id", "version_id"]);
    assert_eq!(os["variant_id"], "dev");
    // Dev mode has no stage 1: no policy was loaded, nothing is counted.
    assert_eq!(os["selinux"], json!({"mode": "off", "denials": 0}));
    let selinux = server.get("/selinux");
    assert_eq!(selinux["mode"], "off");
    assert_eq!(selinux["denials"], 0);
    assert!(selinux["recent_denials"].as_array().unwrap().is_empty(), "{selinux}");
    assert_eq!(os["slot"], "none");
    assert_eq!(os["arch"], std::env::consts::ARCH);
    let version = os["version_id"].as_str().unwrap();
    assert!(!version.is_empty());
    assert_eq!(os["pretty_name"], format!("Berth {version}"));

    let files = server.get("/configuration-files");
    let etc = dir.path().join("etc");
    for (name, path, groups) in [
        ("motd", "motd", json!(["motd"])),
        ("hostname", "hostname", json!(["network"])),
        ("hosts", "hosts", json!(["network"])),
        ("sysctl", "sysctl.d/90-berth.conf", json!(["kernel"])),
        ("ntp", "ntp.conf", json!(["ntp"])),
    ] {
        let f = &files[name];
        assert_eq!(f["path"], etc.join(path).to_str().unwrap(), "{name}: {f}");
        assert_eq!(f["settings"], groups, "{name}: {f}");
        assert!(etc.join(path).exists(), "{path} rendered at start");
    }
    // Files added later must be rendered too and name their groups.
    for (name, f) in files.as_object().unwrap() {
        let path = Path::new(f["path"].as_str().unwrap_or_else(|| panic!("{name}: {f}")));
        assert!(path.starts_with(&etc), "{name}: {f}");
        assert!(path.exists(), "{name}: {} rendered at start", path.display());
        let groups = f["settings"].as_array().unwrap_or_else(|| panic!("{name}: {f}"));
        assert!(!groups.is_empty() && groups.iter().all(Value::is_string), "{name}: {f}");
    }

    // `{}` until the services issue; an object of services after it.
    assert!(server.get("/services").is_object());
    assert_eq!(server.get("/user-data"), json!({"source": null, "applied": false}));
    assert_eq!(system_state(&server), json!({"hostname": "berth", "motd": "", "sysctl": {}}));
}

#[test]
fn actions_are_recorded_and_the_server_keeps_running() {
    let dir = TempDir::new("actions");
    let server = Server::start(&dir);
    assert!(!dir.path().join("actions.log").exists());
    let r = server.expect("POST", "/actions/reboot", "", 202);
    assert!(r.body.is_empty());
    assert_eq!(server.file("actions.log"), "Reboot\n");
    server.expect("POST", "/actions/shutdown", "", 202);
    assert_eq!(server.file("actions.log"), "Reboot\nShutdown\n");
    server.request("GET", "/actions/reboot", "").assert_error(405, &["POST"]);
    assert_eq!(server.file("actions.log"), "Reboot\nShutdown\n");
    assert_eq!(server.get("/")["name"], "berth", "still serving");
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_input_is_refused_with_its_status_and_changes_nothing() {
    let dir = TempDir::new("bad");
    let server = Server::start(&dir);
    server.commit("default", json!({"motd": "live"}));
    server.expect("PATCH", "/settings", r#"{"motd": "pending"}"#, 204);
    let before = server.snapshot();
    let long_tx = "t".repeat(65);
    let cases: Vec<(&str, String, &str, u16, &[&str])> = vec![
        ("PATCH", "/settings".into(), r#"{"motd": "x""#, 400, &["malformed JSON"]),
        ("PATCH", "/settings".into(), "{motd: x}", 400, &["malformed JSON"]),
        ("PATCH", "/settings".into(), r#"{"motd": 1}"#, 400, &["settings.motd", "string"]),
        (
            "PATCH",
            "/settings".into(),
            r#"{"kubernetes": {"max-pods": "many"}}"#,
            400,
            &["settings.kubernetes.max-pods"],
        ),
        ("PATCH", "/settings".into(), r#"{"bogus": 1}"#, 400, &["bogus"]),
        (
            "PATCH",
            "/settings".into(),
            r#"{"network": {"hostnme": "x"}}"#,
            400,
            &["settings.network", "hostnme"],
        ),
        // Valid and invalid parts together: none of it is taken.
        (
            "PATCH",
            "/settings".into(),
            r#"{"motd": "new", "network": {"hostname": "a b"}}"#,
            400,
            &["settings.network.hostname", "a b"],
        ),
        (
            "PATCH",
            "/settings".into(),
            r#"{"kernel": {"sysctl": {"net..ipv4": "1"}}}"#,
            400,
            &["settings.kernel.sysctl.net..ipv4"],
        ),
        (
            "PATCH",
            "/settings".into(),
            r#"{"kernel": {"sysctl": {"../../etc/passwd": "1"}}}"#,
            400,
            &["settings.kernel.sysctl"],
        ),
        (
            "PATCH",
            "/settings".into(),
            r#"{"updates": {"seed": 2048}}"#,
            400,
            &["settings.updates.seed", "2047"],
        ),
        ("PATCH", "/settings".into(), "", 400, &["empty"]),
        ("PATCH", "/settings".into(), "[1, 2]", 400, &["object"]),
        ("PATCH", "/settings".into(), r#""motd""#, 400, &["object"]),
        ("PATCH", "/settings".into(), "null", 400, &["object"]),
        ("PATCH", "/settings/keypair".into(), "", 400, &["empty"]),
        ("PATCH", "/settings/keypair".into(), "[1]", 400, &["object"]),
        ("PATCH", "/settings/keypair".into(), r#"{"settings.motd": 1}"#, 400, &["settings.motd"]),
        (
            "PATCH",
            "/settings/keypair".into(),
            r#"{"settings.motd": "ok", "settings.network.hostnme": "x"}"#,
            400,
            &["hostnme"],
        ),
        ("PATCH", "/settings?tx=../x".into(), r#"{"motd": "x"}"#, 400, &["../x"]),
        ("PATCH", "/settings?tx=".into(), r#"{"motd": "x"}"#, 400, &["transaction name"]),
        ("PATCH", format!("/settings?tx={long_tx}"), r#"{"motd": "x"}"#, 400, &["transaction name"]),
        ("GET", "/tx?tx=../x".into(), "", 400, &["../x"]),
        ("DELETE", "/tx?tx=a%2Fb".into(), "", 400, &["a/b"]),
        ("POST", "/tx/commit?tx=../x".into(), "", 400, &["../x"]),
        ("GET", "/nope".into(), "", 404, &["/nope"]),
        ("GET", "/settings/".into(), "", 404, &["/settings/"]),
        ("DELETE", "/settings".into(), "", 405, &["DELETE", "GET, PATCH"]),
        ("POST", "/settings".into(), r#"{"motd": "x"}"#, 405, &["GET, PATCH"]),
        ("GET", "/tx/commit".into(), "", 405, &["POST"]),
        ("PUT", "/tx".into(), "", 405, &["GET, DELETE"]),
        ("POST", "/tx/commit?tx=other".into(), "", 409, &["other", "no pending changes"]),
        ("POST", "/tx/commit_and_apply?tx=other".into(), "", 409, &["other"]),
    ];
    for (method, uri, body, status, needles) in cases {
        let r = server.request(method, &uri, body);
        assert_eq!(r.status, status, "{method} {uri} {body}: {}", r.text());
        r.assert_error(status, needles);
        assert_eq!(server.snapshot(), before, "{method} {uri} {body} changed something");
    }
    // Generated bodies: nesting past serde_json's limit, deep nesting within it (parsed on the
    // connection thread's small stack), and bytes that are not UTF-8.
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(120), "}".repeat(120));
    let generated: Vec<(Vec<u8>, &[&str])> = vec![
        ("[".repeat(100_000).into_bytes(), &["malformed JSON", "recursion"]),
        (deep_object.into_bytes(), &["settings", "unknown field `a`"]),
        (b"{\"motd\": \"\xff\xfe\"}".to_vec(), &["malformed JSON"]),
    ];
    for (body, needles) in generated {
        let what = String::from_utf8_lossy(&body[..body.len().min(20)]).into_owned();
        let mut c = server.connect();
        c.send_raw(&request_bytes("PATCH", "/settings", &body, ""));
        let r = c.read().unwrap_or_else(|e| panic!("{what}...: no answer: {e}"));
        r.assert_error(400, needles);
        assert_eq!(server.snapshot(), before, "{what}... changed something");
    }
    assert!(!dir.path().join("datastore/tx/other.json").exists());
    assert_eq!(server.file("etc/motd"), "", "nothing was applied");
}

/// Requests the HTTP layer refuses before any route sees them.
#[test]
fn protocol_errors_get_their_status_and_change_nothing() {
    let dir = TempDir::new("proto");
    let server = Server::start(&dir);
    server.expect("PATCH", "/settings", r#"{"motd": "pending"}"#, 204);
    let before = server.snapshot();

    let big_header = format!("X-Big: {}\r\n", "a".repeat(17 * 1024));
    let mut over_limit =
        Vec::from(&b"PATCH /settings HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n{\"motd\": \""[..]);
    over_limit.resize(64 * 1024, b'a');
    let cases: Vec<(Vec<u8>, u16, &[&str])> = vec![
        // 413 is answered from the head, before the body is read.
        (over_limit, 413, &["1048576"]),
        (request_bytes("GET", "/settings", b"", &big_header), 431, &["16384"]),
        (
            b"PATCH /settings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              10\r\n{\"motd\": \"chunk\"}\r\n0\r\n\r\n"
                .to_vec(),
            411,
            &["Content-Length"],
        ),
        (b"GET / HTTP/2.0\r\n\r\n".to_vec(), 505, &["HTTP/2.0"]),
        (b"GET /settings\r\n\r\n".to_vec(), 400, &["request line"]),
        (request_bytes("PATCH", "/settings?tx=%zz", b"{\"motd\": \"x\"}", ""), 400, &["%"]),
        (b"PATCH /settings HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec(), 400, &["Content-Length"]),
    ];
    for (raw, status, needles) in cases {
        let head = String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned();
        let mut c = server.connect();
        c.send_raw(&raw);
        let r = c.read().unwrap_or_else(|e| panic!("{head:?}: no answer: {e}"));
        assert_eq!(r.status, status, "{head:?}: {}", r.text());
        r.assert_error(status, needles);
        assert_eq!(r.header("connection"), Some("close"), "{head:?}");
        assert_eq!(server.snapshot(), before, "{head:?} changed something");
    }

    // A body of exactly 1 MiB is read and judged by the model: 400 for the motd, not 413.
    let prefix = br#"{"motd": ""#;
    let mut body = prefix.to_vec();
    body.resize(1024 * 1024 - 2, b'a');
    body.extend_from_slice(b"\"}");
    let mut c = server.connect();
    c.send_raw(&request_bytes("PATCH", "/settings", &body, ""));
    let r = c.read().expect("an answer to a 1 MiB body");
    r.assert_error(400, &["settings.motd", "16 KiB"]);
    assert_eq!(server.snapshot(), before);
}

#[test]
fn a_stalled_client_times_out_while_others_are_served() {
    let dir = TempDir::new("stall");
    let server = Server::start(&dir);
    // One stalls in its head, one in its body.
    let mut in_head = server.connect();
    in_head.send_raw(b"PATCH /settings HTTP/1.1\r\nContent-Le");
    let mut in_body = server.connect();
    in_body.send_raw(b"PATCH /settings HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"motd\": \"ha");
    let t0 = Instant::now();

    for i in 0..5 {
        let mut c = server.connect();
        let r = c.send("GET", "/settings", "");
        assert_eq!(r.status, 200, "{i}: {}", r.text());
        let r = c.send("PATCH", "/settings?tx=other", &json!({"motd": format!("m{i}")}).to_string());
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let served = t0.elapsed();
    assert!(
        !in_head.has_answer() && !in_body.has_answer(),
        "the stalled clients were answered before the others were served ({served:?})"
    );
    assert!(
        served < Duration::from_secs(4),
        "others waited {served:?}, as long as the stalled clients' deadline"
    );

    for (name, c) in [("head", &mut in_head), ("body", &mut in_body)] {
        match c.read() {
            Ok(r) => r.assert_error(408, &["not complete in time"]),
            Err(e) => assert!(
                matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset),
                "stalled in {name}: {e}"
            ),
        }
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(4500) && waited < Duration::from_secs(9),
            "stalled in {name}: cut off after {waited:?}, want about 5 s"
        );
        let mut rest = Vec::new();
        assert_eq!(
            c.reader.read_to_end(&mut rest).ok(),
            Some(0),
            "stalled in {name}: the connection is closed"
        );
    }
    assert_eq!(server.get("/tx"), json!({}), "the half request stored nothing");
    assert_eq!(server.get("/tx?tx=other"), json!({"motd": "m4"}));
}

/// Connections that are partway through a request: busy, so they keep their slots.
fn busy_connections(server: &Server, n: usize) -> Vec<Conn> {
    let conns: Vec<Conn> = (0..n)
        .map(|_| {
            let mut c = server.connect();
            c.send_raw(b"GET /os HTTP/1.1\r\nHost: x\r\n");
            c
        })
        .collect();
    // The server marks a connection busy when it reads the first byte; give it that moment.
    thread::sleep(Duration::from_millis(500));
    conns
}

/// A new connection, which the server refuses at once: its answer, read without sending
/// anything (a request could meet the closed socket).
fn refused(server: &Server) -> Resp {
    server.connect().read().expect("an answer to a refused connection")
}

/// Wait until every slot is free again (the server frees them as it sees the closes).
fn wait_all_slots_free(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = busy_connections(server, 31);
        let mut c = server.connect();
        thread::sleep(Duration::from_millis(50));
        if !c.has_answer() {
            assert_eq!(c.send("GET", "/os", "").status, 200);
            return;
        }
        c.read().expect("a 503").assert_error(503, &[]);
        drop(held);
        assert!(Instant::now() < deadline, "slots not freed after the closes");
    }
}

#[test]
fn idle_connections_make_room_for_new_clients() {
    let dir = TempDir::new("idle");
    let server = Server::start(&dir);
    // 40 clients connect and say nothing: the server takes 32 at a time, closing the longest
    // idle for each newcomer, so nobody is refused...
    let mut idle: Vec<Conn> = (0..40).map(|_| server.connect()).collect();
    thread::sleep(Duration::from_millis(300));
    // ...and a client with a request is served.
    let r = server.request("GET", "/settings", "");
    assert_eq!(r.status, 200, "{}", r.text());
    // The first 9 were closed (without an answer) to make room, the longest idle first.
    for (i, c) in idle.iter_mut().enumerate().take(9) {
        let mut rest = Vec::new();
        assert_eq!(c.reader.read_to_end(&mut rest).ok(), Some(0), "{i} closed without an answer");
    }
    // An idle keep-alive connection is idle too, and still usable while it has its slot.
    let r = idle[39].send("GET", "/os", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(server.log().contains("idle one(s) closed to make room"), "{}", server.log());
}

#[test]
fn busy_connections_keep_their_slots_and_newcomers_get_503() {
    let dir = TempDir::new("busy");
    let server = Server::start(&dir);
    let mut busy = busy_connections(&server, 32);
    refused(&server).assert_error(503, &["too many connections, all busy"]);
    // The busy ones are unaffected: each finishes its request.
    for (i, c) in busy.iter_mut().enumerate() {
        c.send_raw(b"Connection: close\r\n\r\n");
        let r = c.read().unwrap_or_else(|e| panic!("busy connection {i}: {e}"));
        assert_eq!(r.status, 200, "{i}: {}", r.text());
    }
    drop(busy);
    wait_all_slots_free(&server);
}

#[test]
fn refusals_are_logged_at_most_once_per_interval() {
    let dir = TempDir::new("refusals");
    let server = Server::start(&dir);
    let _busy = busy_connections(&server, 32);
    for i in 0..300 {
        let r = refused(&server);
        assert_eq!(r.status, 503, "{i}: {}", r.text());
    }
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("503")).count();
    assert!(lines <= 2, "{lines} log lines for 300 refusals:\n{log}");
    assert!(log.contains("all 32 connections in use: 1 new connection(s) refused with 503"), "{log}");
}

/// The server's peak resident memory so far, in KiB.
fn peak_rss_kib(server: &Server) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", server.child.id())).expect("server status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM in kB")
}

#[test]
fn a_burst_of_large_bodies_stays_bounded_in_memory() {
    let dir = TempDir::new("burst");
    let server = Server::start(&dir);
    let before = server.snapshot();
    let mib = 1024 * 1024;
    // 1 MiB each: a long string (valid JSON, but too long a motd), and half a million numbers
    // or 80,000 members, which as a JSON tree take 16 and 8 times their text.
    let members: Vec<String> = (0..80_000).map(|i| format!("\"k{i:07}\":1")).collect();
    let shapes: [(String, u16, &str); 3] = [
        (json!({"motd": "x".repeat(mib - 14)}).to_string(), 400, "16 KiB"),
        (format!("{{\"motd\": [{}1]}}", "1,".repeat(mib / 2 - 7)), 413, "more than 10000 values"),
        (format!("{{\"motd\": {{{}}}}}", members.join(",")), 413, "more than 10000 values"),
    ];
    let mut answers = Vec::new();
    for (body, status, text) in &shapes {
        assert!(body.len() <= mib && body.len() > mib - 100_000, "{}", body.len());
        let barrier = Arc::new(std::sync::Barrier::new(32));
        let clients: Vec<_> = (0..32)
            .map(|_| {
                let (mut c, body, barrier) = (server.connect(), body.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    c.send_raw(&request_bytes(
                        "PATCH",
                        "/settings",
                        body.as_bytes(),
                        "Connection: close\r\n",
                    ));
                    c.read().expect("an answer")
                })
            })
            .collect();
        answers.extend(clients.into_iter().map(|c| (c.join().expect("client thread"), *status, *text)));
    }
    // 32 bodies of 1 MiB are held at once (that much is the bound); the JSON trees are not:
    // before, this burst took the server to 400-600 MiB.
    let peak = peak_rss_kib(&server);
    eprintln!("peak RSS under the bursts: {peak} KiB");
    assert!(peak < 120 * 1024, "peak RSS {peak} KiB under 32 concurrent 1 MiB bodies");
    for (answer, status, text) in answers {
        answer.assert_error(status, &[text]);
    }
    assert_eq!(server.snapshot(), before);
}

#[test]
fn a_keep_alive_connection_serves_100_requests() {
    let dir = TempDir::new("keepalive");
    let server = Server::start(&dir);
    let mut c = server.connect();
    for i in 0..100 {
        let r = match i % 4 {
            0 => c.send("GET", "/", ""),
            1 => c.send("PATCH", "/settings?tx=ka", &json!({"motd": format!("n{i}")}).to_string()),
            2 => {
                let r = c.send("GET", "/tx?tx=ka", "");
                assert_eq!(r.json(), json!({"motd": format!("n{}", i - 1)}), "{i}");
                r
            }
            _ => c.send("GET", "/settings", ""),
        };
        assert!(r.status == 200 || r.status == 204, "{i}: {}", r.text());
        assert_eq!(r.header("connection"), None, "{i}: kept alive");
    }
    // An error answer on a keep-alive connection keeps it usable too.
    let r = c.send("GET", "/nope", "");
    r.assert_error(404, &["/nope"]);
    assert_eq!(c.send("GET", "/tx/list", "").json(), json!(["ka"]));
}

/// A self-signed CA certificate (PEM), as a private CA's would be.
fn test_ca_pem(name: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().expect("CA key");
    params.self_signed(&key).expect("CA certificate").pem()
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn pki_bundles_render_the_trust_bundle() {
    let dir = TempDir::new("pki");
    let server = Server::start(&dir);
    let bundle = "etc/pki/tls/certs/ca-bundle.crt";
    assert!(!server.file(bundle).contains("BEGIN CERTIFICATE"), "dev mode has no image bundle");
    let (mine, other) = (test_ca_pem("Mine"), test_ca_pem("Other"));
    let both = base64(format!("{mine}{other}").as_bytes());
    server.commit("pki", json!({"pki": {"private": {"data": both, "trusted": true}}}));
    server.expect("POST", "/tx/apply", "", 204);
    let rendered = server.file(bundle);
    assert!(rendered.contains(mine.trim()) && rendered.contains(other.trim()), "{rendered}");
    // A bundle that is not trusted takes its certificates out again.
    server.expect(
        "PATCH",
        "/settings",
        &json!({"pki": {"no": {"data": base64(other.as_bytes())}}}).to_string(),
        204,
    );
    server.expect("POST", "/tx/commit_and_apply", "", 200);
    let rendered = server.file(bundle);
    assert!(rendered.contains(mine.trim()) && !rendered.contains(other.trim()), "{rendered}");

    let before = server.snapshot();
    let cases = [
        (json!({"pki": {"x": {"data": "not base64!"}}}), "settings.pki.x.data", "not base64"),
        (json!({"pki": {"x": {"data": base64(b"no PEM here")}}}), "settings.pki.x.data", "BEGIN CERTIFICATE"),
        (json!({"pki": {"x y": {"trusted": true}}}), "settings.pki.x y", "[A-Za-z0-9_-]"),
        (json!({"pki": {"x": {"trusted": 1}}}), "settings.pki.x.trusted", "boolean"),
    ];
    for (patch, key, text) in cases {
        server.request("PATCH", "/settings", &patch.to_string()).assert_error(400, &[key, text]);
    }
    assert_eq!(server.snapshot(), before);
    let files = server.get("/configuration-files");
    assert_eq!(files["ca-bundle"]["settings"], json!(["pki"]), "{files}");
}

// ---------------------------------------------------------------------------------------------
// Transactions

#[test]
fn two_transactions_pending_at_once() {
    let dir = TempDir::new("twotx");
    let server = Server::start(&dir);
    server.commit("default", json!({"motd": "base", "kernel": {"sysctl": {"vm.a": "1", "vm.b": "2"}}}));
    server.expect("PATCH", "/settings?tx=a", r#"{"motd": "from a"}"#, 204);
    server.expect(
        "PATCH",
        "/settings?tx=b",
        r#"{"network": {"hostname": "from-b"}, "kernel": {"sysctl": {"vm.a": null}}}"#,
        204,
    );
    assert_eq!(server.get("/tx/list"), json!(["a", "b"]));
    assert_eq!(server.get("/tx?tx=a"), json!({"motd": "from a"}));
    assert_eq!(
        server.get("/tx?tx=b"),
        json!({"network": {"hostname": "from-b"}, "kernel": {"sysctl": {"vm.a": null}}})
    );
    assert_eq!(server.get("/tx"), json!({}));

    let changed = server.expect("POST", "/tx/commit?tx=a", "", 200).json();
    assert_eq!(changed, json!(["motd"]));
    assert_eq!(server.get("/tx/list"), json!(["b"]));
    assert_eq!(
        server.get("/settings"),
        json!({"motd": "from a", "kernel": {"sysctl": {"vm.a": "1", "vm.b": "2"}}})
    );
    let changed = server.expect("POST", "/tx/commit?tx=b", "", 200).json();
    assert_eq!(changed, json!(["kernel.sysctl", "network.hostname"]));
    assert_eq!(server.get("/tx/list"), json!([]));
    assert_eq!(
        server.get("/settings"),
        json!({"motd": "from a", "network": {"hostname": "from-b"},
               "kernel": {"sysctl": {"vm.b": "2"}}}),
        "null removed vm.a"
    );
}

/// `GET /tx` shows `{}` for "nothing pending", so a transaction holding `{}` must not be listed
/// as pending nor commit as if it had changes (docs/api.md: 409 for nothing pending).
#[test]
fn an_empty_patch_leaves_nothing_pending() {
    let dir = TempDir::new("emptypatch");
    let server = Server::start(&dir);
    let r = server.request("PATCH", "/settings?tx=e", "{}");
    assert!(r.status == 204 || r.status == 400, "{}", r.text());
    assert_eq!(server.get("/tx?tx=e"), json!({}));
    assert_eq!(server.get("/tx/list"), json!([]));
    server.request("POST", "/tx/commit?tx=e", "").assert_error(409, &["e"]);
}

#[test]
fn a_pending_transaction_survives_a_restart() {
    let dir = TempDir::new("restart");
    let server = Server::start(&dir);
    server.commit("default", json!({"motd": "kept"}));
    server.expect("PATCH", "/settings?tx=later", r#"{"network": {"hostname": "after-restart"}}"#, 204);
    drop(server);

    let server = Server::start(&dir);
    assert_eq!(server.get("/settings"), json!({"motd": "kept"}));
    assert_eq!(server.file("etc/motd"), "kept\n", "rendered again at start");
    assert_eq!(server.get("/tx/list"), json!(["later"]));
    assert_eq!(server.get("/tx?tx=later"), json!({"network": {"hostname": "after-restart"}}));
    let changed = server.expect("POST", "/tx/commit_and_apply?tx=later", "", 200).json();
    assert_eq!(changed, json!(["network.hostname"]));
    assert_eq!(server.get("/settings"), json!({"motd": "kept", "network": {"hostname": "after-restart"}}));
    assert_eq!(server.file("host/hostname"), "after-restart\n");
    assert_eq!(server.get("/tx/list"), json!([]));
}

/// Every read of the live settings, over the API and of `live.json` on disk, sees one whole
/// commit: motd `mN` goes with hostname `hN`, and N never goes back.
#[test]
fn commits_are_atomic_for_readers() {
    let dir = TempDir::new("atomic");
    let server = Server::start(&dir);
    fn state(k: usize) -> Value {
        json!({"motd": format!("m{k}"), "network": {"hostname": format!("h{k}")}})
    }
    /// The commit that `v` shows, checking that it is whole.
    fn round(v: &Value) -> usize {
        let m: usize = v["motd"]
            .as_str()
            .and_then(|s| s.strip_prefix('m')?.parse().ok())
            .unwrap_or_else(|| panic!("torn read: {v}"));
        assert_eq!(v, &state(m), "torn read");
        m
    }
    server.commit("default", state(0));

    let stop = Arc::new(AtomicBool::new(false));
    let mut api_reader = server.connect();
    let api = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let (mut last, mut reads) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                let r = api_reader.send("GET", "/settings", "");
                assert_eq!(r.status, 200, "{}", r.text());
                let n = round(&r.json());
                assert!(n >= last, "went back from {last} to {n}");
                (last, reads) = (n, reads + 1);
            }
            reads
        })
    };
    let live = dir.path().join("datastore/live.json");
    let disk = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) {
                let bytes = fs::read(&live).expect("live.json is always there");
                let v: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("live.json torn ({e}): {bytes:?}"));
                round(&v);
                reads += 1;
            }
            reads
        })
    };
    for k in 1..=20 {
        let changed = server.commit("w", state(k));
        assert_eq!(changed, json!(["motd", "network.hostname"]));
    }
    stop.store(true, Ordering::SeqCst);
    let api_reads = api.join().expect("API reader");
    let disk_reads = disk.join().expect("disk reader");
    assert!(api_reads > 0 && disk_reads > 0);
    assert_eq!(server.get("/settings"), state(20));
}

// ---------------------------------------------------------------------------------------------
// apiclient

#[test]
fn apiclient_set_get_apply_and_raw() {
    let dir = TempDir::new("apiclient");
    let server = Server::start(&dir);
    let ok = |o: Output| {
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        o
    };

    ok(server.apiclient(&["set", "motd=hi"]));
    assert_eq!(server.get("/settings"), json!({"motd": "hi"}));
    assert_eq!(server.file("etc/motd"), "hi\n", "set commits and applies");
    assert_eq!(server.get("/tx/list"), json!([]));

    let out = ok(server.apiclient(&["get", "settings.motd"]));
    let v: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("get printed no JSON ({e}): {}", stdout(&out)));
    assert_eq!(v, json!({"settings": {"motd": "hi"}}));

    let toml = dir.path().join("settings.toml");
    fs::write(
        &toml,
        "[settings]\nmotd = \"from toml\"\n\
         [settings.network]\nhostname = \"toml-host\"\n\
         [settings.kernel.sysctl]\n\"vm.swappiness\" = \"20\"\n",
    )
    .unwrap();
    ok(server.apiclient(&["apply", toml.to_str().unwrap()]));
    assert_eq!(
        server.get("/settings"),
        json!({"motd": "from toml", "network": {"hostname": "toml-host"},
               "kernel": {"sysctl": {"vm.swappiness": "20"}}})
    );
    assert_eq!(server.file("host/hostname"), "toml-host\n");
    assert_eq!(server.file("host/sysctl/vm.swappiness"), "20\n");
    assert_eq!(server.get("/tx/list"), json!([]));

    let out = ok(server.apiclient(&["raw", "-u", "/os"]));
    let v: Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("raw printed no JSON ({e}): {}", stdout(&out)));
    assert_eq!(v, server.get("/os"));

    let out = ok(server.apiclient(&["get", "/system/state"]));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["hostname"], "toml-host");

    ok(server.apiclient(&["reboot"]));
    assert_eq!(server.file("actions.log"), "Reboot\n");
}

#[test]
fn apiclient_refused_changes_exit_nonzero_and_leave_no_transaction() {
    let dir = TempDir::new("apiclient-bad");
    let server = Server::start(&dir);
    server.commit("default", json!({"motd": "before"}));
    let before = server.snapshot();

    let o = server.apiclient(&["set", "motd=after", "network.hostnme=x"]);
    assert!(!o.status.success(), "set of an unknown key succeeded");
    let err = stderr(&o);
    assert!(err.contains("400") && err.contains("hostnme"), "stderr: {err}");
    assert_eq!(server.snapshot(), before);

    let toml = dir.path().join("bad.toml");
    fs::write(&toml, "[settings]\nmotd = \"after\"\n[settings.updates]\nseed = 2048\n").unwrap();
    let o = server.apiclient(&["apply", toml.to_str().unwrap()]);
    assert!(!o.status.success(), "apply of an invalid seed succeeded");
    let err = stderr(&o);
    assert!(err.contains("settings.updates.seed"), "stderr: {err}");
    assert_eq!(server.snapshot(), before);

    let o = server.apiclient(&["raw", "-u", "/nope"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("404"), "stderr: {}", stderr(&o));
    assert_eq!(server.get("/tx/list"), json!([]));
    assert_eq!(server.file("etc/motd"), "", "nothing was applied");
}

/// sysctl values are strings: `apiclient set kernel.sysctl.vm.swappiness=10` must send "10".
#[test]
fn apiclient_sets_a_numeric_sysctl() {
    let dir = TempDir::new("apiclient-sysctl");
    let server = Server::start(&dir);
    let o = server.apiclient(&["set", "kernel.sysctl.vm.swappiness=10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.get("/settings"), json!({"kernel": {"sysctl": {"vm.swappiness": "10"}}}));
    assert_eq!(server.file("host/sysctl/vm.swappiness"), "10\n");
}

/// `GET /system/state` without its `memory` part (which differs run to run), after checking it.
fn system_state(server: &Server) -> Value {
    let mut state = server.get("/system/state");
    let memory = state.as_object_mut().unwrap().remove("memory").expect("memory in /system/state");
    assert!(
        memory["rss_kb"].as_u64().unwrap() > 0 && memory["peak_rss_kb"].as_u64().unwrap() > 0,
        "{memory}"
    );
    state
}

#[test]
fn pending_transactions_and_datastore_size_have_quotas() {
    let dir = TempDir::new("quota");
    let server = Server::start(&dir);
    for i in 0..64 {
        server.expect("PATCH", &format!("/settings?tx=t{i}"), r#"{"motd": "x"}"#, 204);
    }
    server
        .request("PATCH", "/settings?tx=one-more", r#"{"motd": "x"}"#)
        .assert_error(429, &["64 transactions", "commit or delete"]);
    // Changing a pending transaction is still allowed.
    server.expect("PATCH", "/settings?tx=t0", r#"{"motd": "y"}"#, 204);
    for i in 0..64 {
        server.expect("DELETE", &format!("/tx?tx=t{i}"), "", 200);
    }
    // ~200 KB transactions run into the 4 MiB quota well before PRIVATE would fill.
    let sysctls: Vec<String> = (0..50).map(|i| format!(r#""vm.k{i}": "{}""#, "1".repeat(4000))).collect();
    let big = format!(r#"{{"kernel": {{"sysctl": {{{}}}}}}}"#, sysctls.join(","));
    let mut refused = false;
    for i in 0..30 {
        let r = server.request("PATCH", &format!("/settings?tx=b{i}"), &big);
        if r.status == 413 {
            r.assert_error(413, &["quota"]);
            refused = true;
            break;
        }
        assert_eq!(r.status, 204, "{}", r.text());
    }
    assert!(refused, "the datastore quota never applied");
    // What is live still works.
    server.expect("PATCH", "/settings?tx=small", r#"{"motd": "fine"}"#, 204);
}
