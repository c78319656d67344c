//! Host integration tests of the settings API: each test starts the real binary in dev mode
//! (`berth serve --state-dir DIR --socket DIR/api.sock`) in a temp dir of its own and talks raw
//! HTTP/1.1 to it over a real Unix socket, with the tiny client of tests/common/server.rs.
//! What dev mode renders (`DIR/etc`) and records (`DIR/host`, `DIR/actions.log`) is checked
//! on disk.
//!
//! Limits: the server's timeouts and connection bound are its defaults (5 s, 32), so the
//! stalled-client test takes about 5 s; timing bounds are generous, since they only tell "served
//! meanwhile" from "served after the 5 s deadline".

mod common;

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::server::*;
use serde_json::{json, Value};
// ---------------------------------------------------------------------------------------------
// Routes

/// The routes of docs/api.md and their methods: each answers 405 to a method it does not
/// take, naming the ones it does.
#[test]
fn every_route_refuses_other_methods() {
    let dir = TempDir::new("routes");
    let server = Server::start(&dir);
    let routes = [
        ("/", "GET"),
        ("/settings", "GET, PATCH"),
        ("/settings/keypair", "PATCH"),
        ("/tx", "GET, DELETE"),
        ("/tx/list", "GET"),
        ("/tx/commit", "POST"),
        ("/tx/apply", "POST"),
        ("/tx/commit_and_apply", "POST"),
        ("/os", "GET"),
        ("/configuration-files", "GET"),
        ("/services", "GET"),
        ("/logs", "GET"),
        ("/user-data", "GET"),
        ("/boot", "GET"),
        ("/system/state", "GET"),
        ("/system/time", "GET"),
        ("/actions/reboot", "POST"),
        ("/actions/shutdown", "POST"),
        ("/updates/status", "GET"),
        ("/updates/progress", "GET"),
        ("/actions/refresh-updates", "POST"),
        ("/actions/prepare-update", "POST"),
        ("/actions/activate-update", "POST"),
        ("/actions/deactivate-update", "POST"),
        ("/actions/cancel-update", "POST"),
        ("/actions/rollback", "POST"),
    ];
    for (path, methods) in routes {
        server.request("PUT", path, "").assert_error(405, &[path, methods]);
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

    // DELETE answers the names of the dropped settings, as Bottlerocket's does.
    let dropped = server.expect("DELETE", "/tx?tx=kp", "", 200).json();
    assert_eq!(
        dropped,
        json!(["settings.kernel.sysctl.\"vm.swappiness\"", "settings.motd", "settings.network.hostname"])
    );
    assert_eq!(server.expect("DELETE", "/tx?tx=kp", "", 200).json(), json!([]), "nothing left to drop");
    assert_eq!(server.get("/tx?tx=kp"), json!({}));
    assert_eq!(server.get("/tx/list"), json!([]));
    assert_eq!(server.get("/settings"), json!({}));
    server.request("POST", "/tx/commit?tx=kp", "").assert_error(422, &["kp"]);

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
    server.request("POST", "/tx/commit_and_apply?tx=ca", "").assert_error(422, &["ca", "no pending changes"]);
}

#[test]
fn os_files_services_and_user_data() {
    let dir = TempDir::new("info");
    let server = Server::start(&dir);
    let os = server.get("/os");
    let keys: Vec<&str> = os.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["arch", "build_id", "pretty_name", "slot", "variant_id", "version_id"]);
    assert_eq!(os["variant_id"], "dev");
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
    assert!(server.get("/os")["version_id"].is_string(), "still serving");
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
        ("POST", "/tx/commit?tx=other".into(), "", 422, &["other", "no pending changes"]),
        ("POST", "/tx/commit_and_apply?tx=other".into(), "", 422, &["other"]),
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
/// as pending nor commit as if it had changes (docs/api.md: 422 for nothing pending).
#[test]
fn an_empty_patch_leaves_nothing_pending() {
    let dir = TempDir::new("emptypatch");
    let server = Server::start(&dir);
    let r = server.request("PATCH", "/settings?tx=e", "{}");
    assert!(r.status == 204 || r.status == 400, "{}", r.text());
    assert_eq!(server.get("/tx?tx=e"), json!({}));
    assert_eq!(server.get("/tx/list"), json!([]));
    server.request("POST", "/tx/commit?tx=e", "").assert_error(422, &["e"]);
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
    // Reads so far (API, disk): the readers are stopped only once each has read.
    let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let mut api_reader = server.connect();
    let api = {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || {
            let (mut last, mut reads) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                let r = api_reader.send("GET", "/settings", "");
                assert_eq!(r.status, 200, "{}", r.text());
                let n = round(&r.json());
                assert!(n >= last, "went back from {last} to {n}");
                (last, reads) = (n, reads + 1);
                counts[0].fetch_add(1, Ordering::SeqCst);
            }
            reads
        })
    };
    let live = dir.path().join("datastore/live.json");
    let disk = {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) {
                let bytes = fs::read(&live).expect("live.json is always there");
                let v: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("live.json torn ({e}): {bytes:?}"));
                round(&v);
                reads += 1;
                counts[1].fetch_add(1, Ordering::SeqCst);
            }
            reads
        })
    };
    for k in 1..=20 {
        let changed = server.commit("w", state(k));
        assert_eq!(changed, json!(["motd", "network.hostname"]));
    }
    // On a loaded machine the 20 commits can be over before a reader ran at all.
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while counts.iter().any(|c| c.load(Ordering::SeqCst) == 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
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
