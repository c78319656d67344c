//! Bottlerocket's API contract, on the host in dev mode (docs/compatibility.md): the shapes of
//! the routes' answers against examples of Bottlerocket's documented shapes
//! (tests/data/bottlerocket/), `GET /?prefix=` and the other selections, the keypair route in
//! both body shapes with Bottlerocket's type inference, the routes Berth does not have, and
//! `apiclient` as scripts and operators use it: output, error lines, exit codes.
//!
//! The updater's side of the contract (423/409/404, `/updates/status`) needs A/B slots, which
//! dev mode has not: src/update/tests.rs checks it on a disk image, qemu-tests/update_cases.py
//! in a VM with Bottlerocket's update operator's calls.

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};

use common::server::*;
use common::shape::mismatches;
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/data/bottlerocket/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Settings like those of the fixtures, committed.
fn with_settings(server: &Server) {
    server.commit(
        "default",
        json!({"motd": "hello", "network": {"hostname": "node-1"},
               "kernel": {"sysctl": {"vm.max_map_count": "262144", "vm.swappiness": "10"}}}),
    );
}

fn assert_shape(what: &str, fixture_name: &str, got: &Value, skip: &[&str]) {
    let m = mismatches(&fixture(fixture_name), got, skip);
    assert!(
        m.is_empty(),
        "{what} differs from Bottlerocket's documented shape ({fixture_name}): {m:#?}\n{got:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// Routes

/// Each route Berth shares with Bottlerocket answers in Bottlerocket's documented shape, Berth's
/// own fields beside Bottlerocket's. Where Berth differs on purpose the skipped path says why.
#[test]
fn routes_answer_in_bottlerocket_s_documented_shapes() {
    let dir = TempDir::new("shapes");
    let server = Server::start(&dir);
    with_settings(&server);
    // Berth renders its files in code: no templates, and each file's mode is its own business.
    let no_templates = ["*.template-path", "*.mode"];

    let model = server.get("/");
    assert_eq!(
        model.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["configuration-files", "os", "services", "settings"]
    );
    // Berth's services are supervised processes (dev mode has none), not file metadata.
    assert_shape("GET /", "model.json", &model, &["services", "configuration-files.*.template-path"]);
    assert_shape("GET /settings", "settings.json", &server.get("/settings"), &[]);
    assert_shape("GET /os", "os.json", &server.get("/os"), &[]);
    assert_shape(
        "GET /configuration-files",
        "configuration-files.json",
        &server.get("/configuration-files"),
        &no_templates,
    );
    assert!(server.get("/services").is_object());

    let pending = json!({"motd": "pending", "network": {"hostname": "n3"}, "kernel": {"sysctl": {"vm.max_map_count": "1"}}});
    server.expect("PATCH", "/settings?tx=a", &pending.to_string(), 204);
    assert_shape("GET /tx", "settings.json", &server.get("/tx?tx=a"), &[]);
    server.expect("PATCH", "/settings?tx=b", r#"{"network": {"hostname": "n2"}}"#, 204);
    assert_shape("GET /tx/list", "tx-list.json", &server.get("/tx/list"), &[]);
    assert_eq!(server.get("/tx/list"), json!(["a", "b"]));
    let deleted = server.expect("DELETE", "/tx?tx=a", "", 200).json();
    assert_shape("DELETE /tx", "tx-keys.json", &deleted, &[]);
    assert_eq!(
        deleted,
        json!(["settings.kernel.sysctl.\"vm.max_map_count\"", "settings.motd", "settings.network.hostname"])
    );
    let committed = server.expect("POST", "/tx/commit?tx=b", "", 200).json();
    assert_shape("POST /tx/commit", "tx-keys.json", &committed, &[]);
    server.expect("PATCH", "/settings?tx=c", r#"{"motd": "c"}"#, 204);
    let applied = server.expect("POST", "/tx/commit_and_apply?tx=c", "", 200).json();
    assert_shape("POST /tx/commit_and_apply", "tx-keys.json", &applied, &[]);

    // Actions succeed with no body to parse (Bottlerocket: 204; Berth: 202, the reboot
    // happens after the answer).
    let r = server.expect("POST", "/actions/reboot", "", 202);
    assert!(r.body.is_empty());
    // An empty commit is 422, Bottlerocket's code.
    server.request("POST", "/tx/commit?tx=nothing", "").assert_error(422, &["no pending changes"]);
}

#[test]
fn prefixes_select_as_bottlerocket_s_do() {
    let dir = TempDir::new("prefix");
    let server = Server::start(&dir);
    with_settings(&server);
    let os = server.get("/os");
    let settings = server.get("/settings");
    let cases = [
        ("/?prefix=settings", json!({"settings": settings})),
        ("/?prefix=settings.", json!({"settings": settings})),
        ("/?prefix=settings.motd", json!({"settings": {"motd": "hello"}})),
        ("/?prefix=settings.mot", json!({"settings": {"motd": "hello"}})),
        (
            "/?prefix=settings.kernel.sysctl.%22vm.max",
            json!({"settings": {"kernel": {"sysctl": {"vm.max_map_count": "262144"}}}}),
        ),
        ("/?prefix=settings.nothing", json!({})),
        ("/?prefix=os", json!({"os": os})),
        ("/?prefix=os.", json!({"os": os})),
        ("/?prefix=os.version", json!({"os": {"version_id": os["version_id"]}})),
        ("/?prefix=nothing", json!({})),
        ("/settings?prefix=motd", json!({"motd": "hello"})),
        ("/settings?prefix=settings.network", json!({"network": {"hostname": "node-1"}})),
        ("/settings?prefix=nothing", json!({})),
        (
            "/settings?keys=settings.motd,settings.kernel.sysctl.%22vm.swappiness%22,settings.absent",
            json!({"motd": "hello", "kernel": {"sysctl": {"vm.swappiness": "10"}}}),
        ),
        ("/os?prefix=arch", json!({"arch": os["arch"]})),
        ("/os?prefix=os.variant", json!({"variant_id": os["variant_id"]})),
        ("/os?prefix=nothing", json!({})),
        ("/configuration-files?names=motd", json!({"motd": server.get("/configuration-files")["motd"]})),
    ];
    for (uri, want) in cases {
        assert_eq!(server.get(uri), want, "{uri}");
    }
    let all = server.get("/");
    assert_eq!(all["settings"], settings);
    assert_eq!(all["os"], os);
    // Bottlerocket's apiclient sends the prefix as it is, quotes and all.
    let mut c = server.connect();
    c.send_raw(b"GET /?prefix=settings.kernel.sysctl.\"vm.swap HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"settings": {"kernel": {"sysctl": {"vm.swappiness": "10"}}}}));
    for (uri, status, why) in [
        ("/?prefix=", 400, "'prefix' must not be empty"),
        ("/settings?keys=", 400, "'keys' must not be empty"),
        ("/settings?keys=a..b", 400, "not a valid key"),
        ("/configuration-files?names=motd,nope", 404, "no configuration-files 'nope'"),
    ] {
        server.request("GET", uri, "").assert_error(status, &[why]);
    }
}

/// `PATCH /settings/keypair` with Bottlerocket's body (its values' types inferred from their
/// text) and with Berth's (typed JSON values); key segments holding dots are quoted.
#[test]
fn keypairs_in_both_shapes_with_type_inference() {
    let dir = TempDir::new("keypair");
    let server = Server::start(&dir);
    let body = json!({"request_payload": [
        "motd=hello=world",
        "settings.network.hostname=node-2",
        "updates.seed=42",
        "updates.ignore-waves=true",
        "kubernetes.max-pods=110",
        "kubernetes.node-labels.\"node.kubernetes.io/role\"=worker",
        "kernel.sysctl.\"vm.max_map_count\"=lots",
    ]});
    server.expect("PATCH", "/settings/keypair?tx=br", &body.to_string(), 204);
    assert_eq!(
        server.get("/tx?tx=br"),
        json!({"motd": "hello=world", "network": {"hostname": "node-2"},
               "updates": {"seed": 42, "ignore-waves": true},
               "kubernetes": {"max-pods": 110, "node-labels": {"node.kubernetes.io/role": "worker"}},
               "kernel": {"sysctl": {"vm.max_map_count": "lots"}}})
    );
    server.expect("DELETE", "/tx?tx=br", "", 200);

    // What inference makes of these does not fit the model: refused, as on Bottlerocket, with a
    // pointer to the exact form; nothing is left pending.
    for (pair, key) in [
        ("kernel.sysctl.\"vm.max_map_count\"=262144", "settings.kernel.sysctl.vm.max_map_count"),
        ("motd=42", "settings.motd"),
        ("motd=true", "settings.motd"),
        ("updates.seed=-1", "settings.updates.seed"),
        ("kubernetes.max-pods=1e2", "settings.kubernetes.max-pods"),
        ("kernel.sysctl.vm.max_map_count=1", "settings.kernel.sysctl.vm"),
    ] {
        let body = json!({ "request_payload": [pair] }).to_string();
        server.request("PATCH", "/settings/keypair?tx=bad", &body).assert_error(400, &[key, "--json"]);
    }
    for (body, why) in [
        (json!({"request_payload": ["motd"]}), "not key=value"),
        (json!({"request_payload": ["kernel.sysctl.\"vm=1"]}), "quote is not closed"),
        (json!({"request_payload": [1]}), "strings"),
    ] {
        server.request("PATCH", "/settings/keypair?tx=bad", &body.to_string()).assert_error(400, &[why]);
    }
    assert_eq!(server.get("/tx/list"), json!([]));

    // Berth's shape: typed values, quoted or unquoted map keys.
    let body = json!({"kernel.sysctl.\"vm.max_map_count\"": "262144", "kernel.sysctl.vm.swappiness": "10",
                      "settings.updates.seed": 7});
    server.expect("PATCH", "/settings/keypair?tx=berth", &body.to_string(), 204);
    assert_eq!(
        server.get("/tx?tx=berth"),
        json!({"kernel": {"sysctl": {"vm.max_map_count": "262144", "vm.swappiness": "10"}}, "updates": {"seed": 7}})
    );
    server
        .request("PATCH", "/settings/keypair?tx=berth", r#"{"motd": 1}"#)
        .assert_error(400, &["settings.motd"]);
}

#[test]
fn bottlerocket_routes_berth_lacks_say_so() {
    let dir = TempDir::new("unsupported");
    let server = Server::start(&dir);
    for (method, path, why) in [
        ("GET", "/metadata/affected-services?keys=settings.motd", "not supported on Berth"),
        ("GET", "/metadata/setting-generators", "not supported on Berth"),
        ("GET", "/metadata/templates?keys=settings.motd", "not supported on Berth"),
        ("GET", "/report/fips", "not supported on Berth"),
    ] {
        let path_only = path.split('?').next().unwrap();
        server.request(method, path, "").assert_error(404, &[path_only, why, "docs/compatibility.md"]);
    }
    // Ephemeral storage exists, at both of Bottlerocket's paths, but dev mode touches no disks.
    for (method, path) in [
        ("POST", "/actions/ephemeral-storage/init"),
        ("GET", "/actions/ephemeral-storage/list-disks"),
        ("GET", "/ephemeral-storage/list-dirs"),
    ] {
        server.request(method, path, "").assert_error(503, &["dev mode"]);
    }
    server.request("GET", "/actions/ephemeral-storage/init", "").assert_error(405, &["POST"]);
    server.request("GET", "/no/such/route", "").assert_error(404, &["no route /no/such/route"]);
}

#[test]
fn cis_report_has_a_result_for_every_check_in_both_formats() {
    let dir = TempDir::new("cis");
    let server = Server::start(&dir);
    let out = run(&server, &["report", "cis", "--format", "json", "--level", "2"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = v["results"].as_array().unwrap();
    assert!(results.len() >= 15, "{v}");
    let n = |k: &str| v[k].as_u64().unwrap();
    assert_eq!(n("passed") + n("failed") + n("skipped"), n("total"));
    assert!(results.iter().all(|r| ["PASS", "FAIL", "SKIP"].contains(&r["status"].as_str().unwrap())));
    assert!(results
        .iter()
        .any(|r| r["id"] == "3.1.1" && r["detail"].as_str().unwrap().contains("send_redirects")));
    let out = run(&server, &["report", "cis"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("Total checks:") && text.contains("] 1.4.1 "), "{text}");
    let out = run(&server, &["report", "cis", "-f", "yaml"], None);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("the formats are text and json")
    );
}

// ---------------------------------------------------------------------------------------------
// apiclient

fn run(server: &Server, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .arg("apiclient")
        .args(["--socket-path", server.sock.to_str().unwrap()])
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run berth apiclient");
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(o.status.success(), "exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), stdout(&o), stderr(&o));
    stdout(&o)
}

#[track_caller]
fn json_out(o: Output) -> Value {
    let out = ok(o);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The HTTP status in an error line, found as Bottlerocket's update operator finds it: the
/// first word after the first "Status".
fn operator_status_code(stderr: &str) -> Option<&str> {
    stderr.split("Status").nth(1)?.split_whitespace().next()
}

#[test]
fn apiclient_usage_errors_exit_2_and_failures_exit_1_with_status_lines() {
    let dir = TempDir::new("ac-errors");
    let server = Server::start(&dir);
    for args in [
        &["frobnicate"][..],
        &["raw"],
        &["raw", "-u"],
        &["raw", "-u", "/os", "--bogus"],
        &["get", "-x"],
        &["get", "/os", "settings"],
        &["get", "/os", "/settings"],
        &["set"],
        &["set", "motd"],
        &["set", "--json", "[1"],
        &["set", "--json", "[1]"],
        &["set", "--json", "{}", "--json", "{}"],
        &["set", "--json", "{}", "motd=x"],
        &["apply", "--nope"],
        &["reboot", "now"],
        &["update"],
        &["update", "apply", "--soon"],
        &["--log-level", "loud", "get"],
    ] {
        let o = run(&server, args, None);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}");
        assert!(stderr(&o).contains("\n\nusage: apiclient"), "{args:?}: {}", stderr(&o));
    }
    let help = run(&server, &["--help"], None);
    assert!(help.status.success() && stdout(&help).starts_with("usage: apiclient"), "{}", stderr(&help));

    // A refused request: exit 1, one line holding Bottlerocket's `Status CODE when METHODing URI: BODY`.
    let cases: [(&[&str], &str, &str); 4] = [
        (&["raw", "-u", "/nope"], "404", "Status 404 when GETing /nope: "),
        (
            &["raw", "-m", "POST", "-u", "/tx/commit?tx=empty"],
            "422",
            "Status 422 when POSTing /tx/commit?tx=empty: ",
        ),
        (&["get", "/updates/status"], "503", "Status 503 when GETing /updates/status: "),
        (&["set", "motd=1"], "400", "when PATCHing /settings/keypair?tx=apiclient-set-"),
    ];
    for (args, code, needle) in cases {
        let o = run(&server, args, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert_eq!(operator_status_code(&err), Some(code), "{args:?}: {err}");
    }
    // No API at all: exit 1 and a line that says so.
    let o = Command::new(BIN).args(["apiclient", "-s", "/nonexistent/api.sock", "get"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot connect to /nonexistent/api.sock"), "{}", stderr(&o));
    // `exec` and the others Berth has no routes for yet.
    // exec into a host container that is not running (dev mode runs none): the API's refusal.
    let o = run(&server, &["exec", "admin", "sh", "-c", "exit 3"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Status 404 when POSTing /exec") && stderr(&o).contains("not running"),
        "{}",
        stderr(&o)
    );
    assert_eq!(run(&server, &["exec", "admin"], None).status.code(), Some(2));
    // ephemeral-storage: its usage errors (2), and the dev server's 503 passed on (1).
    for args in [
        &["ephemeral-storage"][..],
        &["ephemeral-storage", "bind"],
        &["ephemeral-storage", "init", "-t", "btrfs"],
    ] {
        let o = run(&server, args, None);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = run(&server, &["ephemeral-storage", "list-disks", "-f", "json"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("Status 503"), "{}", stderr(&o));
    assert_eq!(server.get("/tx/list"), json!([]), "refused commands leave no transaction");
}

#[test]
fn apiclient_get_with_none_one_and_several_prefixes() {
    let dir = TempDir::new("ac-get");
    let server = Server::start(&dir);
    with_settings(&server);
    let os = server.get("/os");
    let settings = server.get("/settings");
    // No argument: the os and settings sections, pretty-printed.
    let o = run(&server, &["get"], None);
    let text = stdout(&o);
    assert!(text.starts_with("{\n  \""), "pretty JSON: {text}");
    assert_eq!(json_out(o), json!({"os": os, "settings": settings}));
    assert_eq!(
        json_out(run(&server, &["get", "settings.motd"], None)),
        json!({"settings": {"motd": "hello"}})
    );
    assert_eq!(json_out(run(&server, &["get", "os"], None)), json!({"os": os}));
    assert_eq!(
        json_out(run(&server, &["get", "settings.motd", "settings.network", "os.arch"], None)),
        json!({"settings": {"motd": "hello", "network": {"hostname": "node-1"}}, "os": {"arch": os["arch"]}})
    );
    assert_eq!(
        json_out(run(&server, &["get", "settings.kernel.sysctl.\"vm.max_map_count\""], None)),
        json!({"settings": {"kernel": {"sysctl": {"vm.max_map_count": "262144"}}}})
    );
    assert_eq!(json_out(run(&server, &["get", "settings.nothing"], None)), json!({}));
    assert_eq!(json_out(run(&server, &["get", "/os"], None)), os);
    // Global options anywhere.
    let o = Command::new(BIN)
        .args(["apiclient", "get", "settings.motd", "-s", server.sock.to_str().unwrap(), "-v"])
        .output()
        .unwrap();
    assert_eq!(json_out(o), json!({"settings": {"motd": "hello"}}));
}

#[test]
fn apiclient_set_pairs_and_json() {
    let dir = TempDir::new("ac-set");
    let server = Server::start(&dir);
    ok(run(&server, &["set", "motd=hi there", "network.hostname=n1", "updates.seed=42"], None));
    assert_eq!(
        server.get("/settings"),
        json!({"motd": "hi there", "network": {"hostname": "n1"}, "updates": {"seed": 42}})
    );
    assert_eq!(server.file("etc/motd"), "hi there\n", "committed and applied");
    ok(run(&server, &["set", "kernel.sysctl.\"vm.swappiness\"=ten"], None));
    assert_eq!(server.get("/settings")["kernel"], json!({"sysctl": {"vm.swappiness": "ten"}}));
    // A number for a sysctl: refused as on Bottlerocket; --json gives the exact type.
    let o = run(&server, &["set", "kernel.sysctl.\"vm.swappiness\"=10"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--json"), "{}", stderr(&o));
    ok(run(&server, &["set", "--json", r#"{"kernel": {"sysctl": {"vm.swappiness": "10"}}}"#], None));
    assert_eq!(server.file("host/sysctl/vm.swappiness"), "10\n");
    ok(run(&server, &["set", "-j", r#"{"settings": {"motd": "wrapped"}}"#], None));
    assert_eq!(server.get("/settings")["motd"], "wrapped");
    assert_eq!(server.get("/tx/list"), json!([]), "no transaction left behind");
    let before = server.get("/settings");
    let o = run(&server, &["set", "motd=after", "network.hostnme=x"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("hostnme"), "{}", stderr(&o));
    assert_eq!(server.get("/settings"), before);
    assert_eq!(server.get("/tx/list"), json!([]));
}

#[test]
fn apiclient_apply_from_stdin_file_and_file_uri() {
    let dir = TempDir::new("ac-apply");
    let server = Server::start(&dir);
    ok(run(&server, &["apply"], Some("[settings]\nmotd = \"from stdin\"\n")));
    assert_eq!(server.get("/settings"), json!({"motd": "from stdin"}));
    ok(run(&server, &["apply", "-"], Some(r#"{"settings": {"network": {"hostname": "json-host"}}}"#)));
    assert_eq!(server.get("/settings")["network"]["hostname"], "json-host");
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.json");
    std::fs::write(
        &a,
        "[settings]\nmotd = \"from a\"\n[settings.kernel.sysctl]\n\"vm.swappiness\" = \"20\"\n",
    )
    .unwrap();
    std::fs::write(&b, r#"{"settings": {"motd": "from b"}, "ignored": true}"#).unwrap();
    // Several documents, in order: the later wins; one transaction, applied.
    ok(run(&server, &["apply", &format!("file://{}", a.display()), b.to_str().unwrap()], None));
    assert_eq!(server.get("/settings")["motd"], "from b");
    assert_eq!(server.get("/settings")["kernel"], json!({"sysctl": {"vm.swappiness": "20"}}));
    assert_eq!(server.file("etc/motd"), "from b\n");
    assert_eq!(server.file("host/sysctl/vm.swappiness"), "20\n");
    // Refused: nothing changes, nothing is left pending.
    let before = server.get("/settings");
    for (args, stdin, why) in [
        (
            vec!["apply"],
            Some("[settings]\nmotd = \"x\"\n[settings.updates]\nseed = 2048\n"),
            "settings.updates.seed",
        ),
        (vec!["apply"], Some("[setings]\nmotd = \"x\"\n"), "no `settings`"),
        (vec!["apply", "file:///nonexistent/x.toml"], None, "/nonexistent/x.toml"),
        (vec!["apply", "s3://bucket/key"], None, "not supported"),
        (vec!["apply"], Some("[settings]\n"), "Status 422"),
    ] {
        let o = run(&server, &args, stdin);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{args:?}: {}", stderr(&o));
        assert_eq!(server.get("/settings"), before);
        assert_eq!(server.get("/tx/list"), json!([]));
    }
}

#[test]
fn apiclient_raw_and_reboot() {
    let dir = TempDir::new("ac-raw");
    let server = Server::start(&dir);
    let out = ok(run(&server, &["raw", "-u", "/os"], None));
    assert!(out.ends_with("}\n") && out.lines().count() == 1, "the body and a newline: {out:?}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), server.get("/os"));
    // No subcommand is raw; -X and -d as Bottlerocket's.
    let out = ok(run(&server, &["-u", "/settings?tx=r", "-X", "PATCH", "-d", r#"{"motd": "raw"}"#], None));
    assert!(out.is_empty(), "a 204 prints nothing: {out:?}");
    assert_eq!(server.get("/tx?tx=r"), json!({"motd": "raw"}));
    let o = run(&server, &["raw", "-v", "-m", "POST", "-u", "/tx/commit_and_apply?tx=r"], None);
    assert_eq!(json_out(o.clone()), json!(["motd"]));
    assert!(stderr(&o).contains("200 OK"), "-v shows the status line: {}", stderr(&o));
    ok(run(&server, &["reboot"], None));
    ok(run(&server, &["raw", "-m", "POST", "-u", "/actions/reboot"], None));
    assert_eq!(server.file("actions.log"), "Reboot\nReboot\n");
}

/// The API going away without answering a reboot request (the reboot it asked for took it
/// down first) is success, for `reboot` and `raw`; for any other request it is a failure.
#[test]
fn apiclient_cut_off_by_the_reboot_it_asked_for_succeeds() {
    let dir = TempDir::new("ac-cut");
    let sock = dir.path().join("cut.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            // Read the request, then close without a word, as a host going down does.
            let mut s = s;
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut s, &mut buf);
        }
    });
    let ac =
        |args: &[&str]| Command::new(BIN).arg("apiclient").arg("-s").arg(&sock).args(args).output().unwrap();
    for args in [&["reboot"][..], &["raw", "-m", "POST", "-u", "/actions/reboot"]] {
        let o = ac(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("reboot is under way"), "{args:?}: {}", stderr(&o));
    }
    let o = ac(&["raw", "-u", "/os"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no answer to GET /os"), "{}", stderr(&o));
}
