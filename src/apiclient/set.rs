//! `apiclient set` and `apiclient apply`: settings changed in a transaction of their own
//! (`apiclient-set-…`, `apiclient-apply-…`), then committed and applied with
//! `POST /tx/commit_and_apply`. If a change is refused, the transaction is deleted again, so a
//! refused command leaves nothing pending.
//!
//! - `set KEY=VALUE...`: Bottlerocket's keypair body, `{"request_payload": ["KEY=VALUE", ...]}`
//!   to `PATCH /settings/keypair`; the server infers the values' types (see
//!   `api::keys::infer`).
//! - `set --json JSON`: a JSON object of settings (a top-level `settings` object is unwrapped)
//!   to `PATCH /settings`.
//! - `apply [URI...]`: each document (TOML, else JSON) must hold a `settings` table, whose
//!   value goes to `PATCH /settings` in the order given; other top-level keys are ignored, as
//!   Bottlerocket does. Sources: stdin (no URI, or `-`), `file:///PATH`, a plain path (Berth's
//!   addition), `http://` and `https://` (the shared HTTP client, the system's trust bundle;
//!   10 s to connect, 30 s for the whole fetch, no redirects). Each document is at most
//!   [`MAX_DOCUMENT`] bytes; gzip-compressed TOML is accepted (Berth's addition).

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use url::Url;

use super::{info, transaction_name, usage, Client, Error, Result};
use crate::http::client::{Connection, Options, Request};

/// The largest settings document `apply` reads (Bottlerocket's bound; the API's own bound on
/// a request body, 1 MiB, still applies to what is sent).
pub const MAX_DOCUMENT: usize = 2 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FETCH_DEADLINE: Duration = Duration::from_secs(30);

pub fn set(client: &Client, args: &[String]) -> Result<()> {
    let mut json = None;
    let mut pairs = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-j" | "--json" => {
                if json.is_some() {
                    return usage("set: --json given twice");
                }
                json = Some(it.next().ok_or_else(|| Error::Usage("--json needs a JSON object".into()))?);
            }
            pair if pair.contains('=') && !pair.starts_with('-') => pairs.push(pair.to_string()),
            other => return usage(format!("set: '{other}' is not KEY=VALUE")),
        }
    }
    let change = match (json, pairs.is_empty()) {
        (Some(j), true) => {
            let v: Value =
                serde_json::from_str(j).map_err(|e| Error::Usage(format!("--json: not JSON: {e}")))?;
            let Value::Object(m) = v else {
                return usage("--json needs a JSON object of settings");
            };
            ("/settings", Value::Object(unwrap_settings(m)))
        }
        (None, false) => ("/settings/keypair", serde_json::json!({ "request_payload": pairs })),
        (Some(_), false) => return usage("set takes KEY=VALUE pairs or --json, not both"),
        (None, true) => return usage("set needs KEY=VALUE pairs or --json JSON"),
    };
    transaction(client, "set", &[change])
        .map_err(|e| Error::Failed(format!("Failed to change settings: {e}")))
}

/// `{"settings": {...}, ...}` with the `settings` object's keys moved up beside the others.
fn unwrap_settings(mut m: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(inner)) = m.get("settings").cloned() {
        m.remove("settings");
        m.extend(inner);
    }
    m
}

/// PATCH each (route, body) into a new transaction, then commit and apply it. A refusal
/// deletes the transaction and is the error.
fn transaction(client: &Client, kind: &str, changes: &[(&str, Value)]) -> std::result::Result<(), String> {
    let tx = transaction_name(kind);
    for (route, body) in changes {
        if let Err(e) = client.call("PATCH", &format!("{route}?tx={tx}"), Some(&body.to_string())) {
            let _ = client.call("DELETE", &format!("/tx?tx={tx}"), None);
            return Err(e.to_string());
        }
    }
    client.call("POST", &format!("/tx/commit_and_apply?tx={tx}"), None).map(drop).map_err(|e| {
        let _ = client.call("DELETE", &format!("/tx?tx={tx}"), None);
        e.to_string()
    })
}

pub fn apply(client: &Client, args: &[String]) -> Result<()> {
    if let Some(opt) = args.iter().find(|a| a.starts_with('-') && a.as_str() != "-") {
        return usage(format!("apply: unexpected option '{opt}'"));
    }
    let sources: Vec<&str> =
        if args.is_empty() { vec!["-"] } else { args.iter().map(String::as_str).collect() };
    let mut changes = Vec::new();
    for src in sources {
        let fail = |e: String| Error::Failed(format!("Failed to apply settings from '{src}': {e}"));
        let bytes = fetch(src).map_err(fail)?;
        changes.push(("/settings", settings_of(&bytes).map_err(fail)?));
    }
    transaction(client, "apply", &changes)
        .map_err(|e| Error::Failed(format!("Failed to apply settings: {e}")))?;
    info(format!("applied {} settings document(s)", changes.len()));
    Ok(())
}

/// The bytes of one source, at most [`MAX_DOCUMENT`].
fn fetch(src: &str) -> std::result::Result<Vec<u8>, String> {
    let bounded = |r: &mut dyn Read| {
        let mut out = Vec::new();
        r.take(MAX_DOCUMENT as u64 + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
        if out.len() > MAX_DOCUMENT {
            return Err(format!("more than {MAX_DOCUMENT} bytes"));
        }
        Ok(out)
    };
    if src == "-" {
        return bounded(&mut std::io::stdin().lock());
    }
    let path = if src.contains("://") {
        let url = Url::parse(src).map_err(|e| format!("not a URI: {e}"))?;
        match url.scheme() {
            "file" => url.to_file_path().map_err(|()| "a file:// URI needs an absolute path".to_string())?,
            "http" | "https" => return download(&url, None),
            other => {
                return Err(format!(
                    "'{other}://' is not supported; use file://, http://, https:// or a path"
                ))
            }
        }
    } else {
        std::path::PathBuf::from(src)
    };
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    bounded(&mut f)
}

/// GET an http(s) URL with the shared client, trusting `trust_bundle` (None: the system's).
fn download(url: &Url, trust_bundle: Option<std::path::PathBuf>) -> std::result::Result<Vec<u8>, String> {
    let opts = Options {
        connect_timeout: CONNECT_TIMEOUT,
        io_timeout: FETCH_DEADLINE,
        deadline: Some(Instant::now() + FETCH_DEADLINE),
        trust_bundle,
        proxy: None,
    };
    let (target, host) = crate::update::transport::target_and_host(url);
    let mut conn = Connection::open(url, &opts).map_err(|e| e.to_string())?;
    let req = Request {
        method: "GET",
        target: &target,
        host: &host,
        headers: &[("Connection", "close")],
        body: b"",
    };
    let (head, body) = conn.exchange(&req, MAX_DOCUMENT).map_err(|e| e.to_string())?;
    if !(200..300).contains(&head.status) {
        return Err(format!("the server answered '{}'", head.status_line()));
    }
    Ok(body)
}

/// The `settings` object of a TOML or JSON document.
fn settings_of(bytes: &[u8]) -> std::result::Result<Value, String> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        // gzip: Berth's user-data decoder, which also wants nothing but `settings`.
        return crate::userdata::decode(bytes).map_err(|e| e.to_string());
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let toml_error = match toml::from_str::<toml::Table>(text) {
        Ok(mut doc) => {
            let settings = doc.remove("settings").ok_or("the document has no `settings` table")?;
            // Through the user-data decoder for its TOML-to-JSON rules (datetimes, floats).
            let mut only = toml::Table::new();
            only.insert("settings".into(), settings);
            let only = toml::to_string(&only).map_err(|e| e.to_string())?;
            return crate::userdata::decode(only.as_bytes()).map_err(|e| e.to_string());
        }
        Err(e) => e,
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut doc)) => match doc.remove("settings") {
            Some(s @ Value::Object(_)) => Ok(s),
            Some(_) => Err("`settings` must be an object".into()),
            None => Err("the document has no `settings` object".into()),
        },
        Ok(_) => Err("a JSON document must be an object with a `settings` object".into()),
        Err(json_error) => {
            Err(format!("neither TOML ({}) nor JSON ({json_error})", toml_error.message().trim()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_give_their_settings() {
        let ok: &[(&str, Value)] = &[
            (
                "[settings]\nmotd = \"t\"\n[settings.kernel.sysctl]\n\"vm.x\" = \"1\"\n",
                json!({"motd": "t", "kernel": {"sysctl": {"vm.x": "1"}}}),
            ),
            ("[settings]\nmotd = \"t\"\n[other]\nx = 1\n", json!({"motd": "t"})),
            ("{\"settings\": {\"motd\": \"j\"}, \"other\": 1}", json!({"motd": "j"})),
            ("[settings.updates]\nseed = 5\n", json!({"updates": {"seed": 5}})),
        ];
        for (text, want) in ok {
            assert_eq!(&settings_of(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}")), want);
        }
        let bad = [
            ("[setings]\nmotd = \"t\"\n", "no `settings`"),
            ("{\"motd\": \"j\"}", "no `settings`"),
            ("[1, 2]", "object"),
            ("settings = 1", "`settings` must be a table"),
            ("{nope", "neither TOML"),
        ];
        for (text, why) in bad {
            let e = settings_of(text.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn json_settings_are_unwrapped() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            Value::Object(unwrap_settings(m(json!({"settings": {"motd": "a"}, "ntp": {}})))),
            json!({"motd": "a", "ntp": {}})
        );
        assert_eq!(Value::Object(unwrap_settings(m(json!({"motd": "a"})))), json!({"motd": "a"}));
    }

    #[test]
    fn sources_are_files_uris_or_urls() {
        let dir = std::env::temp_dir().join(format!("berth-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s.toml");
        std::fs::write(&f, "[settings]\nmotd = \"f\"\n").unwrap();
        assert_eq!(fetch(f.to_str().unwrap()).unwrap(), std::fs::read(&f).unwrap());
        assert_eq!(fetch(&format!("file://{}", f.display())).unwrap(), std::fs::read(&f).unwrap());
        std::fs::write(&f, vec![b'#'; MAX_DOCUMENT + 1]).unwrap();
        assert!(fetch(f.to_str().unwrap()).unwrap_err().contains("more than"));
        assert!(fetch("s3://bucket/key").unwrap_err().contains("not supported"));
        assert!(fetch("file://relative/path").is_err());
        assert!(fetch(&dir.join("missing").display().to_string()).unwrap_err().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn documents_come_over_https_from_a_trusted_server_only() {
        use crate::http::testing::{temp_file, Server, TestCa};
        let ca = TestCa::new("apply test CA");
        let doc = "[settings]\nmotd = \"over https\"\n";
        let server = Server::start_tls(ca.server(&["127.0.0.1"], false).config(), move |_, head, out| {
            let (status, body) = if head.starts_with("GET /user-data.toml ") {
                ("200 OK", doc)
            } else {
                ("404 Not Found", "")
            };
            let _ = write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        });
        let bundle = temp_file("ca.pem", ca.pem().as_bytes());
        let url = Url::parse(&server.url("/user-data.toml")).unwrap();
        let got = download(&url, Some(bundle.clone())).unwrap();
        assert_eq!(settings_of(&got).unwrap(), json!({"motd": "over https"}));
        let e = download(&Url::parse(&server.url("/missing")).unwrap(), Some(bundle)).unwrap_err();
        assert!(e.contains("404"), "{e}");
        // A bundle without the server's CA refuses it.
        let other = temp_file("other.pem", TestCa::new("another CA").pem().as_bytes());
        let e = download(&url, Some(other)).unwrap_err();
        assert!(e.contains("unknown issuer"), "{e}");
        assert!(server.requests().iter().any(|r| r.contains("Host: 127.0.0.1:")), "{:?}", server.requests());
    }
}
