//! The API's routes, compatible with Bottlerocket's where they exist (docs/api.md; what is the
//! same and what differs: docs/compatibility.md).
//!
//! [`Api`] holds the datastore and what applying settings needs; [`Api::handle`] maps one
//! request to one response. Errors are JSON with the right 4xx status and never leave a
//! half-applied change: patches are validated before they are stored, commits are atomic.
//!
//! Bottlerocket's contract as implemented here: `GET /` is the model (`settings`, `services`,
//! `configuration-files`, `os`) selected by `?prefix=` with Bottlerocket's rules ([`keys`]);
//! `PATCH /settings/keypair` takes its `{"request_payload": ["key=value", ...]}` with its type
//! inference; a commit with nothing pending is 422; the updater's refusals are 423 (another
//! command runs), 409 (not in this state) or 404 (nothing to act on). Bottlerocket's routes
//! that Berth does not have answer 404 saying so ([`NOT_SUPPORTED`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::keys;
use crate::http::server::{Request, Response};
use crate::settings::model::Settings;
use crate::settings::{render, store, Datastore};
use crate::supervisor::Supervisor;

/// What `POST /actions/*` asks the system to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reboot,
    Shutdown,
}

/// Facts about the running OS for `GET /os`.
#[derive(Debug, Clone, Default)]
pub struct OsInfo {
    pub version: String,
    pub variant: String,
    pub arch: String,
    pub build_id: String,
    pub slot: String,
}

/// What to do after settings were applied, given them and the changed keys (None: all).
pub type OnApplied = Box<dyn Fn(&Settings, Option<&[String]>) + Send + Sync>;

pub struct Api {
    pub store: Mutex<Datastore>,
    pub etc: PathBuf,
    pub host: Box<dyn render::Host>,
    pub os: OsInfo,
    /// Carries out reboot/shutdown (PID 1) or records them (dev mode).
    pub actions: Box<dyn Fn(Action) + Send + Sync>,
    /// How user data went at first boot, for `GET /user-data`.
    pub user_data: Mutex<Value>,
    /// PID 1's supervisor (None in dev mode, which runs no services).
    pub services: Option<Arc<Mutex<Supervisor>>>,
    /// Called after settings were applied (PID 1: restart or start or stop services).
    pub on_applied: OnApplied,
    /// The A/B updater (None in dev mode, which has no slots).
    pub updater: Option<Arc<crate::update::Updater>>,
}

/// The top-level setting groups (`settings.GROUP...`).
const SETTING_GROUPS: &[&str] = &[
    "motd",
    "network",
    "kernel",
    "ntp",
    "updates",
    "kubernetes",
    "dns",
    "oci-defaults",
    "container-runtime",
    "metrics",
    "host-containers",
    "container-registry",
    "pki",
    "aws",
    "bootstrap-commands",
    "bootstrap-containers",
    "boot",
];

const ROUTES: &[(&str, &[&str])] = &[
    ("/", &["GET"]),
    ("/settings", &["GET", "PATCH"]),
    ("/settings/keypair", &["PATCH"]),
    ("/tx", &["GET", "DELETE"]),
    ("/tx/list", &["GET"]),
    ("/tx/commit", &["POST"]),
    ("/tx/apply", &["POST"]),
    ("/tx/commit_and_apply", &["POST"]),
    ("/os", &["GET"]),
    ("/configuration-files", &["GET"]),
    ("/services", &["GET"]),
    ("/services/NAME", &["GET"]),
    ("/logs", &["GET"]),
    ("/user-data", &["GET"]),
    ("/boot", &["GET"]),
    ("/report", &["GET"]),
    ("/exec", &["POST"]),
    ("/report/cis", &["GET"]),
    ("/selinux", &["GET"]),
    ("/system/state", &["GET"]),
    ("/system/time", &["GET"]),
    ("/actions/reboot", &["POST"]),
    ("/actions/shutdown", &["POST"]),
    ("/updates/status", &["GET"]),
    ("/updates/progress", &["GET"]),
    ("/actions/refresh-updates", &["POST"]),
    ("/actions/prepare-update", &["POST"]),
    ("/actions/activate-update", &["POST"]),
    ("/actions/deactivate-update", &["POST"]),
    ("/actions/cancel-update", &["POST"]),
    ("/actions/rollback", &["POST"]),
    ("/actions/ephemeral-storage/init", &["POST"]),
    ("/actions/ephemeral-storage/bind", &["POST"]),
    ("/actions/ephemeral-storage/list-disks", &["GET"]),
    ("/actions/ephemeral-storage/list-dirs", &["GET"]),
];

/// Bottlerocket's routes that Berth does not serve, with why: any method gets a 404 that says
/// so. A path matches an entry exactly, or lies under one that ends with `/`.
pub const NOT_SUPPORTED: &[(&str, &str)] = &[
    (
        "/metadata/affected-services",
        "not supported on Berth: settings carry no metadata; which services a setting group \
         affects is fixed in Berth's code (GET /configuration-files lists each file's groups)",
    ),
    (
        "/metadata/setting-generators",
        "not supported on Berth: settings carry no metadata, and no setting is produced by a \
         generator program",
    ),
    (
        "/metadata/templates",
        "not supported on Berth: settings carry no metadata; configuration files are rendered \
         by Berth's code, not from templates",
    ),
    ("/report/", "not supported on Berth: the only report is /report/cis (no FIPS report)"),
];

/// `GET /report/cis[?format=text|json][&level=1|2]` (see [`super::report`]).
fn cis_report(req: &Request) -> Response {
    let level = match req.query_get("level").unwrap_or("1") {
        "1" => 1,
        "2" => 2,
        other => return Response::error(400, &format!("level '{other}': the levels are 1 and 2")),
    };
    let results = super::report::cis(&super::report::System { root: "/".into() }, level);
    match req.query_get("format").unwrap_or("text") {
        "text" => Response::text(200, super::report::text(&results, level)),
        "json" => Response::json(200, &super::report::json(&results, level)),
        other => Response::error(400, &format!("format '{other}': the formats are text and json")),
    }
}

fn not_supported(path: &str) -> Option<&'static str> {
    NOT_SUPPORTED
        .iter()
        .find(|(p, _)| path == *p || (p.ends_with('/') && path.starts_with(p)))
        .map(|(_, why)| *why)
}

fn store_error(e: store::Error) -> Response {
    let status = match e {
        store::Error::Invalid(_) | store::Error::BadTxName(_) | store::Error::NotAnObject => 400,
        // Bottlerocket's status for a commit with nothing pending.
        store::Error::EmptyCommit(_) => 422,
        store::Error::NewerFormat(_) => 409,
        store::Error::TooManyTransactions(_) => 429,
        store::Error::Quota { .. } => 413,
        store::Error::Io { .. } | store::Error::Corrupt { .. } => 500,
    };
    Response::error(status, &e.to_string())
}

/// The most JSON values (objects, arrays, strings, numbers, booleans and nulls together) a
/// request body may hold: far more than any settings document needs. A JSON tree takes many
/// times the bytes of its text (a 1 MiB array of numbers is 16 MiB as a `Value`), so the body
/// is counted first, without building anything, and refused before the tree is built.
const MAX_JSON_VALUES: usize = 10_000;

/// `/actions/ephemeral-storage/*` (`crate::ephemeral`): init and bind take Bottlerocket's
/// bodies (`{"filesystem": "Xfs"|"Ext4"|null, "disks": [...]|null}`, `{"targets": [...]}`);
/// the lists take `?format=text|json`.
fn ephemeral_storage(req: &Request, route: &str) -> Response {
    use crate::ephemeral::{self, Error as E};
    let Some(es) = ephemeral::get() else {
        return Response::error(503, "no ephemeral storage here (dev mode touches no disks)");
    };
    let fail = |e: E| match e {
        E::BadInput(m) => Response::error(400, &m),
        E::InUse(m) => Response::error(409, &m),
        E::Failed(m) => Response::error(500, &m),
    };
    let list = |items: Vec<String>| match ephemeral::format_list(&items, req.query_get("format")) {
        Some((body, kind)) => {
            Response { status: 200, content_type: kind, body: body.into_bytes(), upgrade: None }
        }
        None => Response::error(400, "unsupported format (text or json)"),
    };
    let strings = |v: &Value, key: &str| -> Result<Option<Vec<String>>, Response> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                Ok(Some(a.iter().filter_map(|s| s.as_str().map(String::from)).collect()))
            }
            Some(_) => Err(Response::error(400, &format!("'{key}' must be a list of strings"))),
        }
    };
    match route {
        "/actions/ephemeral-storage/list-disks" => list(es.list_disks()),
        "/actions/ephemeral-storage/list-dirs" => list(es.list_dirs()),
        "/actions/ephemeral-storage/init" => {
            let v = if req.body.is_empty() {
                json!({})
            } else {
                match json_body(req) {
                    Ok(v) => v,
                    Err(r) => return r,
                }
            };
            let fs = match v.get("filesystem") {
                None | Some(Value::Null) => None,
                Some(Value::String(f)) => match ephemeral::Fs::parse(f) {
                    Some(f) => Some(f),
                    None => return Response::error(400, &format!("unknown filesystem '{f}' (Xfs or Ext4)")),
                },
                Some(_) => return Response::error(400, "'filesystem' must be a string"),
            };
            let disks = match strings(&v, "disks") {
                Ok(d) => d,
                Err(r) => return r,
            };
            match es.init(fs, disks) {
                Ok(_) => Response::empty(204),
                Err(e) => fail(e),
            }
        }
        "/actions/ephemeral-storage/bind" => {
            let targets = match json_body(req).and_then(|v| strings(&v, "targets")) {
                Ok(Some(t)) => t,
                Ok(None) => return Response::error(400, "missing 'targets'"),
                Err(r) => return r,
            };
            match es.bind(&targets) {
                Ok(_) => Response::empty(204),
                Err(e) => fail(e),
            }
        }
        _ => Response::error(404, &format!("no route {route}")),
    }
}

fn json_body(req: &Request) -> Result<Value, Response> {
    if req.body.is_empty() {
        return Err(Response::error(400, "request body is empty; expected JSON"));
    }
    let malformed = |e: serde_json::Error| Response::error(400, &format!("malformed JSON: {e}"));
    if count_json_values(&req.body, MAX_JSON_VALUES).map_err(malformed)? > MAX_JSON_VALUES {
        return Err(Response::error(
            413,
            &format!(
                "the JSON body holds more than {MAX_JSON_VALUES} values; send the settings in smaller parts"
            ),
        ));
    }
    serde_json::from_slice(&req.body).map_err(malformed)
}

/// The values in the JSON text `bytes`, counted up to `max + 1` without building them. Syntax
/// errors are serde_json's own.
fn count_json_values(bytes: &[u8], max: usize) -> Result<usize, serde_json::Error> {
    use serde::de::{DeserializeSeed, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;

    /// The values seen so far; past `max` the walk stops with this marker error.
    struct Count<'a>(&'a Cell<usize>, usize);
    const OVER: &str = "berth: over the count";

    impl Count<'_> {
        fn one<E: Error>(&self) -> Result<(), E> {
            self.0.set(self.0.get() + 1);
            if self.0.get() > self.1 {
                return Err(E::custom(OVER));
            }
            Ok(())
        }
    }

    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: Error>(self, _: bool) -> Result<(), E> {
            self.one()
        }
        fn visit_i64<E: Error>(self, _: i64) -> Result<(), E> {
            self.one()
        }
        fn visit_u64<E: Error>(self, _: u64) -> Result<(), E> {
            self.one()
        }
        fn visit_f64<E: Error>(self, _: f64) -> Result<(), E> {
            self.one()
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<(), E> {
            self.one()
        }
        fn visit_unit<E: Error>(self) -> Result<(), E> {
            self.one()
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            self.one()?;
            while seq.next_element_seed(Count(self.0, self.1))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            self.one()?;
            while map.next_key::<IgnoredAny>()?.is_some() {
                map.next_value_seed(Count(self.0, self.1))?;
            }
            Ok(())
        }
    }

    let seen = Cell::new(0);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match Count(&seen, max).deserialize(&mut de).and_then(|()| de.end()) {
        Ok(()) => Ok(seen.get()),
        Err(e) if seen.get() > max && e.to_string().starts_with(OVER) => Ok(seen.get()),
        Err(e) => Err(e),
    }
}

/// Strip an optional leading `settings.` from a dotted key.
fn key_path(key: &str) -> Vec<&str> {
    let k = key.strip_prefix("settings.").unwrap_or(if key == "settings" { "" } else { key });
    k.split('.').filter(|s| !s.is_empty()).collect()
}

/// The segments of a setting's dotted name, without a leading `settings`. A name with quotes
/// is Bottlerocket's (`kernel.sysctl."vm.swappiness"`); one without keeps Berth's older rule
/// of two levels then one map key (`kernel.sysctl.vm.swappiness`), since map-valued settings
/// have dotted keys of their own.
fn setting_segments(key: &str) -> Result<Vec<String>, String> {
    let mut segments = if key.contains('"') {
        keys::parse(key)?
    } else {
        let parts = key_path(key);
        let mut path: Vec<String> = parts.iter().take(2).map(|s| s.to_string()).collect();
        if parts.len() > 2 {
            path.push(parts[2..].join("."));
        }
        return Ok(path);
    };
    if segments.first().map(String::as_str) == Some("settings") {
        segments.remove(0);
    }
    Ok(segments)
}

/// A required, non-empty query parameter's value, if given.
fn query_nonempty<'a>(req: &'a Request, name: &str) -> Result<Option<&'a str>, Response> {
    match req.query_get(name) {
        Some("") => Err(Response::error(400, &format!("'{name}' must not be empty"))),
        other => Ok(other),
    }
}

/// `GET /settings`: all live settings, or `?keys=a,b` (each a setting's name; missing ones are
/// left out), or `?prefix=P` (Bottlerocket's prefix, `settings.` implied).
fn get_settings(api: &Api, req: &Request) -> Response {
    let live = api.store.lock().unwrap_or_else(|p| p.into_inner()).live().clone();
    let (wanted, prefix) = match (query_nonempty(req, "keys"), query_nonempty(req, "prefix")) {
        (Err(r), _) | (_, Err(r)) => return r,
        (Ok(k), Ok(p)) => (k, p),
    };
    if let Some(k) = wanted {
        let mut out = Value::Object(Map::new());
        for key in k.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let segments = match keys::parse(key) {
                Ok(mut s) => {
                    if s.first().map(String::as_str) == Some("settings") {
                        s.remove(0);
                    }
                    s
                }
                Err(e) => return Response::error(400, &e),
            };
            if let Some(v) = keys::lookup(&live, &segments) {
                store::merge(&mut out, &v);
            }
        }
        return Response::json(200, &out);
    }
    match prefix {
        Some(p) => {
            let p = if p.starts_with("settings") { p.to_string() } else { format!("settings.{p}") };
            Response::json(200, &keys::filter("settings", &live, &p).unwrap_or_else(|| json!({})))
        }
        None => Response::json(200, &live),
    }
}

fn tx_name(req: &Request) -> Result<String, Response> {
    let tx = req.query_get("tx").unwrap_or(store::DEFAULT_TX).to_string();
    store::check_tx_name(&tx).map_err(store_error)?;
    Ok(tx)
}

/// The body of `PATCH /settings/keypair` as a settings patch, and whether it was Bottlerocket's
/// shape (whose values' types were inferred). Two shapes:
/// - Bottlerocket's: `{"request_payload": ["motd=hi", "kernel.sysctl.\"vm.x\"=1"]}`;
/// - Berth's: `{"settings.motd": "hi", "kernel.sysctl.vm.swappiness": "10"}`, typed JSON values.
fn keypairs_to_patch(body: &Value) -> Result<(Value, bool), Response> {
    let bad = |e: String| Response::error(400, &e);
    let obj = body.as_object().ok_or_else(|| {
        bad("expected {\"request_payload\": [\"key=value\", ...]} or an object of \"dotted.key\": value pairs".into())
    })?;
    if let (1, Some(Value::Array(pairs))) = (obj.len(), obj.get("request_payload")) {
        return keys::pairs_to_patch(pairs).map(|p| (p, true)).map_err(bad);
    }
    let mut patch = Value::Object(Map::new());
    for (k, v) in obj {
        let path = setting_segments(k).map_err(bad)?;
        if path.is_empty() {
            return Err(bad(format!("'{k}' names no setting")));
        }
        store::merge(&mut patch, &keys::wrap(&path, v.clone()));
    }
    Ok((patch, false))
}

/// The hint added to a refused keypair of Bottlerocket's shape: its value's type was a guess.
const INFERRED_HINT: &str = " (the value's type was inferred from its text: true/false are \
    booleans, numbers are numbers, anything else is a string; give exact JSON with \
    `apiclient set --json` or PATCH /settings)";

/// The model's sections as `GET /` shows them, selected by `prefix` with Bottlerocket's rules:
/// a section whose name starts with the prefix is whole; one that the prefix reaches into keeps
/// the values whose names start with it; sections with nothing left are left out.
fn select_sections(sections: Vec<(&str, Value)>, prefix: Option<&str>) -> Value {
    let mut out = Map::new();
    for (name, value) in sections {
        let kept = match prefix {
            None => Some(value),
            Some(p) if format!("{name}.").starts_with(p) => Some(value),
            Some(p) if p.starts_with(&format!("{name}.")) => keys::filter(name, &value, p),
            Some(_) => None,
        };
        if let Some(v) = kept {
            out.insert(name.to_string(), v);
        }
    }
    Value::Object(out)
}

/// `GET /services` and `GET /configuration-files`: all of `section`, `?names=a,b` (each must
/// exist, as in Bottlerocket), or `?prefix=P` (the section's name implied).
fn section_query(name: &str, section: Value, req: &Request) -> Response {
    let (names, prefix) = match (query_nonempty(req, "names"), query_nonempty(req, "prefix")) {
        (Err(r), _) | (_, Err(r)) => return r,
        (Ok(n), Ok(p)) => (n, p),
    };
    if let Some(names) = names {
        let mut out = Map::new();
        for n in names.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match section.get(n) {
                Some(v) => out.insert(n.to_string(), v.clone()),
                None => return Response::error(404, &format!("no {name} '{n}'")),
            };
        }
        return Response::json(200, &Value::Object(out));
    }
    match prefix {
        Some(p) => {
            let p = if p.starts_with(name) { p.to_string() } else { format!("{name}.{p}") };
            Response::json(200, &keys::filter(name, &section, &p).unwrap_or_else(|| json!({})))
        }
        None => Response::json(200, &section),
    }
}

impl Api {
    fn apply(&self, changed: Option<&[String]>) -> Result<Vec<String>, Response> {
        let settings = self.store.lock().unwrap_or_else(|p| p.into_inner()).settings();
        let done = render::apply(&settings, changed, &self.etc, self.host.as_ref())
            .map_err(|e| Response::error(500, &format!("settings committed, but applying failed: {e}")))?;
        (self.on_applied)(&settings, changed);
        Ok(done)
    }

    /// Merge `patch` into the request's transaction. `inferred`: the values' types were
    /// guessed from keypair text, which a refusal then says.
    fn patch(&self, req: &Request, patch: Value, inferred: bool) -> Response {
        let tx = match tx_name(req) {
            Ok(t) => t,
            Err(r) => return r,
        };
        match self.store.lock().unwrap_or_else(|p| p.into_inner()).patch(&tx, &patch) {
            Ok(()) => Response::empty(204),
            Err(store::Error::Invalid(i)) if inferred => Response::error(400, &format!("{i}{INFERRED_HINT}")),
            Err(e) => store_error(e),
        }
    }

    /// `GET /os`: Bottlerocket's five fields and Berth's `slot`, `boot` (backend, Secure Boot)
    /// and `selinux` (mode, denials).
    fn os(&self) -> Value {
        json!({"pretty_name": format!("Berth {}", self.os.version), "variant_id": self.os.variant,
               "version_id": self.os.version, "build_id": self.os.build_id, "arch": self.os.arch,
               "slot": self.os.slot,
               "boot": crate::bootctl::os_summary(), "selinux": crate::init::selinux::summary()})
    }

    /// `GET /configuration-files`: each file Berth renders, its path and the setting groups it
    /// is rendered from.
    fn configuration_files(&self) -> Value {
        let files: Map<String, Value> = render::CONFIG_FILES
            .iter()
            .map(|(n, f)| {
                let path = self.etc.join(f.path).to_string_lossy().into_owned();
                (n.to_string(), json!({"path": path, "settings": f.settings}))
            })
            .collect();
        Value::Object(files)
    }

    fn services_report(&self) -> Value {
        self.supervisor().map(|s| s.report()).unwrap_or_else(|| json!({}))
    }

    /// `GET /[?prefix=P]`: the model's sections (see [`select_sections`]).
    fn model(&self, req: &Request) -> Response {
        let prefix = match query_nonempty(req, "prefix") {
            Ok(p) => p,
            Err(r) => return r,
        };
        let live = self.store.lock().unwrap_or_else(|p| p.into_inner()).live().clone();
        let sections = vec![
            ("settings", live),
            ("services", self.services_report()),
            ("configuration-files", self.configuration_files()),
            ("os", self.os()),
        ];
        Response::json(200, &select_sections(sections, prefix))
    }

    /// `GET /os[?prefix=P]`: with a prefix (`os.` implied), the fields whose names start with
    /// it, as a flat object.
    fn get_os(&self, req: &Request) -> Response {
        match query_nonempty(req, "prefix") {
            Err(r) => r,
            Ok(None) => Response::json(200, &self.os()),
            Ok(Some(p)) => {
                let p = if p.starts_with("os") { p.to_string() } else { format!("os.{p}") };
                Response::json(200, &keys::filter("os", &self.os(), &p).unwrap_or_else(|| json!({})))
            }
        }
    }

    fn commit(&self, req: &Request) -> Result<Vec<String>, Response> {
        let tx = tx_name(req)?;
        self.store.lock().unwrap_or_else(|p| p.into_inner()).commit(&tx).map_err(store_error)
    }

    /// What is in effect on the system now, read back from the kernel and /etc: the hostname,
    /// the current value of every sysctl named in the settings, and the rendered motd.
    fn system_state(&self) -> Response {
        let settings = self.store.lock().unwrap_or_else(|p| p.into_inner()).settings();
        let read = |r: std::io::Result<String>| {
            r.map(Value::String).unwrap_or_else(|e| json!({"error": e.to_string()}))
        };
        let sysctl: Map<String, Value> =
            render::sysctls(&settings).keys().map(|k| (k.clone(), read(self.host.read_sysctl(k)))).collect();
        let motd = std::fs::read_to_string(self.etc.join("motd"));
        // The process serving the API (PID 1 on Berth): its memory now and at its peak.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kb = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        Response::json(
            200,
            &json!({"hostname": read(self.host.hostname()), "sysctl": sysctl, "motd": read(motd),
                    "memory": {"rss_kb": kb("VmRSS:"), "peak_rss_kb": kb("VmHWM:")}}),
        )
    }

    fn update_command(&self, cmd: crate::update::Command) -> Response {
        let Some(u) = &self.updater else {
            return Response::error(503, "no updater here (dev mode has no A/B slots)");
        };
        let settings = self.store.lock().unwrap_or_else(|p| p.into_inner()).settings();
        let net = crate::update::Network::of(&settings);
        match u.command_via(cmd, &settings.updates.unwrap_or_default(), &net) {
            Ok(true) => Response::json(
                202,
                &json!({"accepted": cmd.name(), "status": "/updates/status", "progress": "/updates/progress"}),
            ),
            Ok(false) => Response::json(200, &u.status()),
            Err(e) => Response::error(e.status(), &e.to_string()),
        }
    }

    fn supervisor(&self) -> Option<std::sync::MutexGuard<'_, Supervisor>> {
        self.services.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn service(&self, name: &str) -> Response {
        match self.supervisor().and_then(|s| s.report_one(name)) {
            Some(v) => Response::json(200, &v),
            None => Response::error(404, &format!("no service '{name}'")),
        }
    }

    fn logs(&self, req: &Request) -> Response {
        let Some(name) = req.query_get("service") else {
            return Response::error(400, "name the service: /logs?service=NAME");
        };
        match self.supervisor().and_then(|s| s.logs(name)) {
            Some(text) => Response::text(200, text),
            None => Response::error(404, &format!("no service '{name}'")),
        }
    }

    pub fn handle(&self, req: &Request) -> Response {
        // Bottlerocket's openapi.yaml names the ephemeral-storage routes without `/actions`.
        let alias = req.path.starts_with("/ephemeral-storage/").then(|| format!("/actions{}", req.path));
        let route = if req.path.starts_with("/services/") {
            "/services/NAME"
        } else {
            alias.as_deref().unwrap_or(req.path.as_str())
        };
        let allowed = ROUTES.iter().find(|(p, _)| *p == route).map(|(_, m)| *m);
        let Some(methods) = allowed else {
            if let Some(why) = not_supported(&req.path) {
                return Response::error(404, &format!("{}: {why} (see docs/compatibility.md)", req.path));
            }
            return Response::error(404, &format!("no route {}", req.path));
        };
        if !methods.contains(&req.method.as_str()) {
            return Response::error(
                405,
                &format!("{} does not allow {}; allowed: {}", req.path, req.method, methods.join(", ")),
            );
        }
        match (req.method.as_str(), route) {
            (_, r) if r.starts_with("/actions/ephemeral-storage/") => ephemeral_storage(req, r),
            ("GET", "/") => self.model(req),
            ("GET", "/settings") => get_settings(self, req),
            ("PATCH", "/settings") => match json_body(req) {
                Ok(v) => self.patch(req, v, false),
                Err(r) => r,
            },
            ("PATCH", "/settings/keypair") => match json_body(req).and_then(|b| keypairs_to_patch(&b)) {
                Ok((p, inferred)) => self.patch(req, p, inferred),
                Err(r) => r,
            },
            ("GET", "/tx") => match tx_name(req) {
                Ok(tx) => match self.store.lock().unwrap_or_else(|p| p.into_inner()).pending(&tx) {
                    Ok(v) => Response::json(200, &v),
                    Err(e) => store_error(e),
                },
                Err(r) => r,
            },
            // The names of the pending settings dropped, as Bottlerocket answers.
            ("DELETE", "/tx") => match tx_name(req) {
                Ok(tx) => match self.store.lock().unwrap_or_else(|p| p.into_inner()).delete(&tx) {
                    Ok(v) => Response::json(200, &json!(keys::leaves("settings", &v))),
                    Err(e) => store_error(e),
                },
                Err(r) => r,
            },
            ("GET", "/tx/list") => match self.store.lock().unwrap_or_else(|p| p.into_inner()).list() {
                Ok(l) => Response::json(200, &json!(l)),
                Err(e) => store_error(e),
            },
            ("POST", "/tx/commit") => match self.commit(req) {
                Ok(changed) => Response::json(200, &json!(changed)),
                Err(r) => r,
            },
            ("POST", "/tx/apply") => {
                let keys: Option<Vec<String>> =
                    req.query_get("keys").map(|k| k.split(',').map(|s| key_path(s).join(".")).collect());
                let unknown = keys.iter().flatten().find(|k| {
                    let group = k.split('.').next().unwrap_or("");
                    !SETTING_GROUPS.contains(&group)
                });
                if let Some(k) = unknown {
                    return Response::error(400, &format!("'settings.{k}' is not a setting"));
                }
                match self.apply(keys.as_deref()) {
                    Ok(_) => Response::empty(204),
                    Err(r) => r,
                }
            }
            ("POST", "/tx/commit_and_apply") => match self.commit(req) {
                Ok(changed) => match self.apply(Some(&changed)) {
                    Ok(_) => Response::json(200, &json!(changed)),
                    Err(r) => r,
                },
                Err(r) => r,
            },
            ("GET", "/os") => self.get_os(req),
            ("GET", "/configuration-files") => {
                section_query("configuration-files", self.configuration_files(), req)
            }
            ("GET", "/services") => section_query("services", self.services_report(), req),
            ("GET", "/services/NAME") => self.service(&req.path["/services/".len()..]),
            ("GET", "/logs") => self.logs(req),
            ("GET", "/system/state") => self.system_state(),
            ("GET", "/boot") => {
                let mut v = crate::boot::report::snapshot();
                v["watchdog"] = json!(if crate::boot::watchdog::armed() { "armed" } else { "off" });
                v["firmware"] = crate::bootctl::firmware_report().unwrap_or(Value::Null);
                v["cmdline"] = crate::bootctl::cmdline_report();
                v["services"] = self.supervisor().map(|s| s.timeline()).unwrap_or_else(|| json!([]));
                Response::json(200, &v)
            }
            ("GET", "/report") => Response::json(
                200,
                &json!([{"name": "cis", "description": "CIS Bottlerocket Benchmark (the items that apply to Berth)"}]),
            ),
            ("GET", "/report/cis") => cis_report(req),
            ("POST", "/exec") => super::exec::handle(&req.body, &|name| {
                let svc = format!("host-containers@{name}");
                self.supervisor().and_then(|s| s.report_one(&svc)).is_some_and(|r| r["state"] == "running")
            }),
            ("GET", "/selinux") => Response::json(200, &crate::init::selinux::status()),
            ("GET", "/system/time") => match crate::time::status() {
                Some(v) => Response::json(200, &v),
                None => Response::error(503, "no time keeper here (dev mode never sets the host's clock)"),
            },
            ("GET", "/user-data") => {
                Response::json(200, &self.user_data.lock().unwrap_or_else(|p| p.into_inner()))
            }
            ("POST", "/actions/reboot") => {
                (self.actions)(Action::Reboot);
                Response::empty(202)
            }
            ("POST", "/actions/shutdown") => {
                (self.actions)(Action::Shutdown);
                Response::empty(202)
            }
            ("GET", "/updates/status") => match &self.updater {
                Some(u) => match u.api_status() {
                    Ok(v) => Response::json(200, &v),
                    Err(e) => Response::error(e.status(), &e.to_string()),
                },
                None => Response::error(503, "no updater here (dev mode has no A/B slots)"),
            },
            ("GET", "/updates/progress") => match &self.updater {
                Some(u) => Response::json(200, &u.progress()),
                None => Response::error(503, "no updater here (dev mode has no A/B slots)"),
            },
            ("POST", "/actions/refresh-updates") => self.update_command(crate::update::Command::Refresh),
            ("POST", "/actions/prepare-update") => self.update_command(crate::update::Command::Prepare),
            ("POST", "/actions/activate-update") => self.update_command(crate::update::Command::Activate),
            ("POST", "/actions/deactivate-update") => self.update_command(crate::update::Command::Deactivate),
            ("POST", "/actions/rollback") => self.update_command(crate::update::Command::Rollback),
            ("POST", "/actions/cancel-update") => match &self.updater {
                Some(u) => match u.cancel(crate::update::CANCEL_WAIT) {
                    Ok(true) => Response::json(200, &u.status()),
                    Ok(false) => {
                        Response::json(202, &json!({"accepted": "cancel", "poll": "/updates/status"}))
                    }
                    Err(e) => Response::error(e.status(), &e.to_string()),
                },
                None => Response::error(503, "no updater here (dev mode has no A/B slots)"),
            },
            _ => Response::error(500, "route table and handler disagree"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_selected_by_prefix() {
        let sections = || {
            vec![
                ("settings", json!({"motd": "m", "network": {"hostname": "h"}})),
                ("services", json!({"containerd": {"state": "running"}})),
                ("configuration-files", json!({"motd": {"path": "/etc/motd"}})),
                ("os", json!({"version_id": "0.1.0", "variant_id": "qemu", "arch": "x86_64"})),
            ]
        };
        let all = select_sections(sections(), None);
        assert_eq!(all.as_object().unwrap().len(), 4);
        let cases = [
            ("settings", json!({"settings": all["settings"]})),
            ("settings.", json!({"settings": all["settings"]})),
            ("s", json!({"settings": all["settings"], "services": all["services"]})),
            ("settings.motd", json!({"settings": {"motd": "m"}})),
            ("settings.mo", json!({"settings": {"motd": "m"}})),
            ("settings.nothing", json!({})),
            ("os", json!({"os": all["os"]})),
            ("os.version", json!({"os": {"version_id": "0.1.0"}})),
            (
                "configuration-files.motd.path",
                json!({"configuration-files": {"motd": {"path": "/etc/motd"}}}),
            ),
            ("x", json!({})),
        ];
        for (prefix, want) in cases {
            assert_eq!(select_sections(sections(), Some(prefix)), want, "{prefix}");
        }
    }

    #[test]
    fn not_supported_routes_are_named() {
        for p in ["/report/fips", "/metadata/templates"] {
            assert!(not_supported(p).is_some(), "{p}");
        }
        for p in [
            "/exec",
            "/execute",
            "/reports",
            "/metadata",
            "/actions/reboot",
            "/actions/ephemeral-storage/init",
        ] {
            assert!(not_supported(p).is_none(), "{p}");
        }
    }

    #[test]
    fn setting_groups_match_the_model() {
        use crate::settings::model::*;
        let all = Settings {
            motd: Some(String::new()),
            network: Some(Network::default()),
            kernel: Some(Kernel::default()),
            ntp: Some(Ntp::default()),
            updates: Some(Updates::default()),
            kubernetes: Some(Kubernetes::default()),
            dns: Some(Dns::default()),
            oci_defaults: Some(OciDefaults::default()),
            container_runtime: Some(ContainerRuntime::default()),
            metrics: Some(Metrics::default()),
            host_containers: Some(Default::default()),
            container_registry: Some(ContainerRegistry::default()),
            pki: Some(Default::default()),
            aws: Some(Aws::default()),
            bootstrap_commands: Some(Default::default()),
            bootstrap_containers: Some(Default::default()),
            boot: Some(Default::default()),
        };
        let v = serde_json::to_value(all).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut groups = SETTING_GROUPS.to_vec();
        groups.sort();
        assert_eq!(keys, groups);
    }

    #[test]
    fn json_values_are_counted_without_building_them() {
        // Counted up to one over the maximum of 6.
        let cases: [(&str, Result<usize, &str>); 7] = [
            ("{}", Ok(1)),
            (r#"{"motd": "hi", "kernel": {"sysctl": {"a": "1", "b": "2"}}}"#, Ok(6)),
            ("[1, 2.5, -3, true, null, \"s\\n\", [], {}]", Ok(7)),
            ("[1,1,1,1,1]", Ok(6)),
            ("[1,1,1,1,1,1]", Ok(7)),
            ("[1,", Err("EOF while parsing")),
            ("{} x", Err("trailing characters")),
        ];
        for (text, want) in cases {
            match (count_json_values(text.as_bytes(), 6), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{text}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
        // Deeper than serde_json's recursion limit: its error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(count_json_values(deep.as_bytes(), usize::MAX - 1)
            .unwrap_err()
            .to_string()
            .contains("recursion"));
    }

    #[test]
    fn keypairs_become_nested_patches() {
        let (p, inferred) =
            keypairs_to_patch(&json!({"settings.motd": "hi", "kernel.sysctl.vm.swappiness": "5",
                                      "kernel.sysctl.\"net.ipv4.ip_forward\"": "1"}))
            .unwrap();
        assert!(!inferred);
        assert_eq!(
            p,
            json!({"motd": "hi", "kernel": {"sysctl": {"vm.swappiness": "5", "net.ipv4.ip_forward": "1"}}})
        );
        let (p, inferred) =
            keypairs_to_patch(&json!({"request_payload": ["motd=hi", "updates.seed=7"]})).unwrap();
        assert!(inferred);
        assert_eq!(p, json!({"motd": "hi", "updates": {"seed": 7}}));
        assert!(keypairs_to_patch(&json!([1])).is_err());
        assert!(keypairs_to_patch(&json!({"settings": 1})).is_err());
        assert!(keypairs_to_patch(&json!({"request_payload": ["motd"]})).is_err());
        assert!(keypairs_to_patch(&json!({"a..b": 1})).is_ok(), "Berth's unquoted names are split as before");
        assert!(keypairs_to_patch(&json!({"a.\"b": 1})).is_err());
    }
}
