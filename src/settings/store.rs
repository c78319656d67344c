//! The settings datastore, on the PRIVATE partition.
//!
//! Layout under its directory: `live.json` holds the committed settings; `tx/NAME.json` holds
//! the pending changes (a JSON merge patch) of transaction NAME. Every write is atomic: a temp
//! file is written and fsync'd, renamed over the old one, and the directory fsync'd, so after a
//! power cut a file is the old version or the new one, never a mix or empty. Pending
//! transactions survive restarts until committed or deleted. Patches are checked against the
//! model when they are made, so a commit never fails on content.
//!
//! Reading is tolerant, because a datastore that cannot be read must never keep a host from
//! booting (a known-good slot would otherwise reboot forever):
//! - a `live.json` that is not JSON (a torn file, a disk error) is set aside as
//!   `live.json.unreadable-SECONDS`, and the settings start empty;
//! - settings this version's model does not accept (written by a newer version before a
//!   rollback, or no longer valid) are kept aside key by key, at the granularity of two levels
//!   (`kubernetes.ids-per-pod`, `host-containers.admin`): they stay in `live.json` untouched,
//!   are not applied, and come back when a version that knows them boots. A commit that
//!   changes such a key replaces the kept-aside value.
//!
//! What was set aside is in [`Datastore::notices`] (console, `GET /boot`).
//!
//! **Versions.** `format.json` records the datastore's layout version ([`FORMAT`]) and the
//! Berth version that last opened it for writing. The rule between versions:
//! - the *model* grows without a format change: a key once accepted is never removed or
//!   narrowed by a later version (a changed meaning gets a new key name), so a newer version
//!   reads an older datastore as it is, and an older version reads a newer one tolerantly
//!   (above) — no migration runs in either direction, and a rollback keeps every setting;
//! - the *layout* (file names, the shape of `live.json` and `tx/`) changes only with a new
//!   [`FORMAT`]. A version meeting a newer format reads what it can but writes nothing
//!   (commits fail with [`Error::NewerFormat`]), so a rollback never damages a layout it does
//!   not know; a newer version converts an older format when it opens it (none exists yet:
//!   format 1 is the first). A datastore without `format.json` is format 1.
//!
//! Bounds: at most [`MAX_PENDING`] pending transactions, and all files together at most
//! [`QUOTA_BYTES`], so the API can never fill PRIVATE (which also holds the update state).

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::model::{self, Invalid, Settings};

pub const DEFAULT_TX: &str = "default";
/// Pending transactions at most (each is a file on PRIVATE).
pub const MAX_PENDING: usize = 64;
/// The datastore's files together at most (PRIVATE is 16 MiB and holds the update state too).
pub const QUOTA_BYTES: u64 = 4 << 20;
const LIVE: &str = "live.json";
/// The datastore layout this version reads and writes (see the module docs).
pub const FORMAT: u64 = 1;
const FORMAT_FILE: &str = "format.json";

#[derive(Debug)]
pub enum Error {
    Io {
        path: PathBuf,
        error: io::Error,
    },
    Corrupt {
        path: PathBuf,
        error: String,
    },
    Invalid(Invalid),
    BadTxName(String),
    NotAnObject,
    EmptyCommit(String),
    /// The datastore's layout is newer than this version's [`FORMAT`]: read-only here.
    NewerFormat(u64),
    /// Creating another pending transaction would exceed [`MAX_PENDING`].
    TooManyTransactions(usize),
    /// The write would take the datastore over [`QUOTA_BYTES`].
    Quota {
        needed: u64,
        limit: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Error::Corrupt { path, error } => write!(f, "{} is corrupt: {error}", path.display()),
            Error::Invalid(i) => write!(f, "{i}"),
            Error::BadTxName(n) => {
                write!(f, "transaction name '{n}' must be 1-64 of [A-Za-z0-9_-]")
            }
            Error::NotAnObject => write!(f, "settings must be a JSON object"),
            Error::EmptyCommit(tx) => {
                write!(f, "transaction '{tx}' has no pending changes to commit")
            }
            Error::NewerFormat(n) => write!(
                f,
                "the settings datastore has format {n}, newer than this version's {FORMAT} (written \
                 by a newer Berth before a rollback); it is read-only here, update to change settings"
            ),
            Error::TooManyTransactions(n) => write!(
                f,
                "{n} transactions are already pending (the limit); commit or delete one first (GET /tx/list)"
            ),
            Error::Quota { needed, limit } => write!(
                f,
                "the settings datastore would grow to {needed} bytes, over its quota of {limit}; \
                 delete pending transactions (GET /tx/list) or send smaller settings"
            ),
        }
    }
}

impl std::error::Error for Error {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |error| Error::Io { path: path.to_path_buf(), error }
}

/// Whether `path` is a file that already holds exactly `data` with permission bits `mode`
/// (so writing it again would change nothing).
pub fn holds(path: &Path, data: &[u8], mode: u32) -> bool {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == data.len() as u64 && m.permissions().mode() & 0o7777 == mode => {
            fs::read(path).is_ok_and(|now| now == data)
        }
        _ => false,
    }
}

/// Write `data` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    write_atomic_mode(path, data, 0o666)
}

/// [`write_atomic`] with the file created with `mode` (less the umask), e.g. 0o600 for a file
/// only its owner may read.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The dotted keys (two levels deep at most: `motd`, `network.hostname`, `kernel.sysctl`)
/// whose values differ between `old` and `new`.
pub fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    fn walk(prefix: &str, old: &Value, new: &Value, depth: usize, out: &mut BTreeSet<String>) {
        let empty = Value::Object(Map::new());
        // A group that appears or disappears is compared with an empty one, key by key.
        let (old, new) = match (old, new) {
            (Value::Null, b @ Value::Object(_)) => (&empty, b),
            (a @ Value::Object(_), Value::Null) => (a, &empty),
            other => other,
        };
        match (old, new) {
            (Value::Object(a), Value::Object(b)) if depth < 2 => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(
                        &key,
                        a.get(k).unwrap_or(&Value::Null),
                        b.get(k).unwrap_or(&Value::Null),
                        depth + 1,
                        out,
                    );
                }
            }
            (a, b) if a != b => {
                out.insert(prefix.to_string());
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk("", old, new, 0, &mut out);
    out.into_iter().collect()
}

pub fn check_tx_name(tx: &str) -> Result<(), Error> {
    if tx.is_empty()
        || tx.len() > 64
        || !tx.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::BadTxName(tx.to_string()));
    }
    Ok(())
}

pub struct Datastore {
    dir: PathBuf,
    /// The settings this version accepts (what is applied and what `GET /settings` shows).
    live: Value,
    /// Stored settings this version does not accept, by two-level key; kept in `live.json`.
    aside: Vec<(Vec<String>, Value)>,
    /// What had to be set aside when the datastore was opened.
    notices: Vec<String>,
    /// Set when the datastore's format is newer than [`FORMAT`]: nothing is written.
    newer_format: Option<u64>,
}

/// Read `format.json` (format 1 when absent), and record this version as its writer when the
/// format is this version's. Returns the format found.
fn check_format(dir: &Path, notices: &mut Vec<String>) -> Result<u64, Error> {
    let path = dir.join(FORMAT_FILE);
    let found = match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| v["format"].as_u64()) {
            Some(n) => Some((n, serde_json::from_slice::<Value>(&bytes).unwrap_or_default())),
            None => {
                notices.push(format!("{} is unreadable; taken as format {FORMAT}", path.display()));
                None
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::Io { path, error: e }),
    };
    let format = found.as_ref().map_or(FORMAT, |(n, _)| *n);
    if format > FORMAT {
        notices.push(format!(
            "the settings datastore has format {format}, newer than this version's {FORMAT}: \
             its settings are read where they can be and nothing is written"
        ));
        return Ok(format);
    }
    let record = serde_json::json!({"format": FORMAT, "written-by": crate::VERSION});
    if found.map(|(_, v)| v) != Some(record.clone()) {
        // Not fatal: the settings are still readable; the next open tries again.
        if let Err(e) = write_atomic(&path, record.to_string().as_bytes()) {
            notices.push(format!("recording the datastore's format: {e}"));
        }
    }
    Ok(format)
}

/// Split stored settings into what the model accepts and what it does not, at two levels
/// (see the module docs). Each refusal names the key and why.
pub fn split_known(stored: &Value) -> (Value, Vec<(Vec<String>, Value, String)>) {
    let mut known = stored.clone();
    let mut aside = Vec::new();
    if !known.is_object() {
        return (Value::Object(Map::new()), vec![(Vec::new(), stored.clone(), "not an object".into())]);
    }
    // Each round removes one key, so this ends; the bound is only a guard.
    for _ in 0..10_000 {
        let Err(bad) = model::parse(&known) else { break };
        let rest = bad.key.strip_prefix("settings.").unwrap_or("");
        let first = rest.split(['.', '[']).next().unwrap_or("");
        let mut path = vec![first.to_string()];
        let second = rest.get(first.len() + 1..).filter(|_| rest.as_bytes().get(first.len()) == Some(&b'.'));
        if let Some(second) = second.and_then(|r| r.split(['.', '[']).next()) {
            if known.get(first).and_then(|g| g.get(second)).is_some() {
                path.push(second.to_string());
            }
        }
        let removed = match path.as_slice() {
            [g] => known.as_object_mut().and_then(|m| m.remove(g)),
            [g, k] => known.get_mut(g).and_then(Value::as_object_mut).and_then(|m| m.remove(k)),
            _ => None,
        };
        match removed {
            Some(v) => aside.push((path, v, bad.message.clone())),
            // The model refuses something that is not a stored key: nothing can be kept.
            None => return (Value::Object(Map::new()), vec![(Vec::new(), stored.clone(), bad.to_string())]),
        }
    }
    (known, aside)
}

fn dir_usage(dir: &Path) -> u64 {
    [dir.to_path_buf(), dir.join("tx")]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

impl Datastore {
    /// Open (creating if needed) the datastore in `dir`. Leftover temp files of an interrupted
    /// write are removed. A `live.json` that cannot be read is set aside and settings this
    /// version does not accept are kept aside (see the module docs); only a datastore directory
    /// that cannot be read or written at all is an error.
    pub fn open(dir: &Path) -> Result<Datastore, Error> {
        fs::create_dir_all(dir.join("tx")).map_err(io_err(dir))?;
        for d in [dir.to_path_buf(), dir.join("tx")] {
            for e in fs::read_dir(&d).map_err(io_err(&d))?.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let path = dir.join(LIVE);
        let mut notices = Vec::new();
        let format = check_format(dir, &mut notices)?;
        let newer_format = Some(format).filter(|&f| f > FORMAT);
        let stored = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let kept = dir.join(format!("{LIVE}.unreadable-{secs}"));
                    fs::rename(&path, &kept).map_err(io_err(&path))?;
                    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))?;
                    notices.push(format!(
                        "{} could not be read ({e}); it was set aside as {} and the settings start \
                         empty (defaults)",
                        path.display(),
                        kept.display()
                    ));
                    Value::Object(Map::new())
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Value::Object(Map::new()),
            Err(e) => return Err(Error::Io { path, error: e }),
        };
        let (live, aside) = split_known(&stored);
        let aside = aside
            .into_iter()
            .map(|(key, value, why)| {
                let shown = if key.is_empty() { "all settings".to_string() } else { key.join(".") };
                notices.push(format!(
                    "settings.{shown} kept aside, not applied: {why} (written by another version? \
                     it is kept and applied again by a version that accepts it)"
                ));
                (key, value)
            })
            .collect();
        Ok(Datastore { dir: dir.to_path_buf(), live, aside, notices, newer_format })
    }

    /// What had to be set aside when the datastore was opened (empty when all was well).
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// The committed settings this version accepts, as JSON.
    pub fn live(&self) -> &Value {
        &self.live
    }

    /// The committed settings, typed.
    pub fn settings(&self) -> Settings {
        model::parse(&self.live).unwrap_or_default()
    }

    /// Refuse a write that would take the datastore over its quota: `path` becomes
    /// `new_len` bytes, and `freed` bytes of other files go away with it.
    fn check_quota(&self, path: &Path, new_len: u64, freed: u64) -> Result<(), Error> {
        let needed = (dir_usage(&self.dir) + new_len).saturating_sub(file_len(path) + freed);
        if needed > QUOTA_BYTES {
            return Err(Error::Quota { needed, limit: QUOTA_BYTES });
        }
        Ok(())
    }

    fn tx_path(&self, tx: &str) -> Result<PathBuf, Error> {
        check_tx_name(tx)?;
        Ok(self.dir.join("tx").join(format!("{tx}.json")))
    }

    /// The pending changes of `tx` (an empty object when there are none).
    pub fn pending(&self, tx: &str) -> Result<Value, Error> {
        let path = self.tx_path(tx)?;
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt { path, error: e.to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Value::Object(Map::new())),
            Err(e) => Err(Error::Io { path, error: e }),
        }
    }

    /// Names of the transactions with pending changes.
    pub fn list(&self) -> Result<Vec<String>, Error> {
        let d = self.dir.join("tx");
        let mut out: Vec<String> = fs::read_dir(&d)
            .map_err(io_err(&d))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Merge `patch` into the pending changes of `tx`. The result of applying them to the live
    /// settings must be valid, or nothing is stored.
    pub fn patch(&mut self, tx: &str, patch: &Value) -> Result<(), Error> {
        if !patch.is_object() {
            return Err(Error::NotAnObject);
        }
        let path = self.tx_path(tx)?;
        if patch.as_object().is_some_and(|m| m.is_empty()) {
            return Ok(()); // nothing to change: no pending transaction is created
        }
        let mut pending = self.pending(tx)?;
        merge_patch_into_patch(&mut pending, patch);
        let mut candidate = self.live.clone();
        merge(&mut candidate, &pending);
        model::parse(&candidate).map_err(Error::Invalid)?;
        if !path.exists() && self.list()?.len() >= MAX_PENDING {
            return Err(Error::TooManyTransactions(MAX_PENDING));
        }
        let bytes = serde_json::to_vec(&pending).expect("JSON serializes");
        self.check_quota(&path, bytes.len() as u64, 0)?;
        write_atomic(&path, &bytes)
    }

    /// Drop the pending changes of `tx`; returns what they were.
    pub fn delete(&mut self, tx: &str) -> Result<Value, Error> {
        let pending = self.pending(tx)?;
        let path = self.tx_path(tx)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io { path, error: e }),
        }
        Ok(pending)
    }

    /// Commit `tx`: the live settings become live + pending, atomically. Returns the keys that
    /// changed (possibly none, when the pending changes equal what is live).
    pub fn commit(&mut self, tx: &str) -> Result<Vec<String>, Error> {
        if let Some(f) = self.newer_format {
            return Err(Error::NewerFormat(f));
        }
        let path = self.tx_path(tx)?;
        let pending = self.pending(tx)?;
        if pending.as_object().is_some_and(|m| m.is_empty()) {
            let _ = fs::remove_file(&path);
            return Err(Error::EmptyCommit(tx.to_string()));
        }
        let mut new = self.live.clone();
        merge(&mut new, &pending);
        // Normalise through the model, so `live.json` only holds known, valid keys, plus what
        // is kept aside for other versions (unless this commit changed that key).
        let typed = model::parse(&new).map_err(Error::Invalid)?;
        let new = serde_json::to_value(typed).expect("settings serialize");
        let changed = changed_keys(&self.live, &new);
        let aside: Vec<(Vec<String>, Value)> =
            self.aside.iter().filter(|(k, _)| !touches(&pending, k)).cloned().collect();
        let mut stored = new.clone();
        for (key, value) in &aside {
            put(&mut stored, key, value.clone());
        }
        let live_path = self.dir.join(LIVE);
        let bytes = serde_json::to_vec_pretty(&stored).expect("JSON serializes");
        self.check_quota(&live_path, bytes.len() as u64, file_len(&path))?;
        write_atomic(&live_path, &bytes)?;
        self.live = new;
        self.aside = aside;
        let _ = fs::remove_file(&path);
        Ok(changed)
    }
}

/// Whether `patch` sets or removes anything at or under two-level `key`.
fn touches(patch: &Value, key: &[String]) -> bool {
    let mut v = patch;
    for k in key {
        match v.get(k) {
            Some(inner) => v = inner,
            None => return false,
        }
    }
    true
}

/// Put `value` at `key` (one or two levels; none: the whole document) in `doc`.
fn put(doc: &mut Value, key: &[String], value: Value) {
    match key {
        [] => *doc = value,
        [g] => {
            if let Some(m) = doc.as_object_mut() {
                m.insert(g.clone(), value);
            }
        }
        [g, k, ..] => {
            if let Some(m) = doc.as_object_mut() {
                let group = m.entry(g.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !group.is_object() {
                    *group = Value::Object(Map::new());
                }
                if let Some(gm) = group.as_object_mut() {
                    gm.insert(k.clone(), value);
                }
            }
        }
    }
}

/// Merging two patches keeps `null`s (they must still delete at commit time).
fn merge_patch_into_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch) {
        (Some(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_patch_into_patch(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("berth-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn patch_commit_and_reopen() {
        let d = tmp("basic");
        let mut s = Datastore::open(&d).unwrap();
        s.patch("default", &json!({"motd": "hi", "network": {"hostname": "a"}})).unwrap();
        assert_eq!(s.live(), &json!({}), "nothing live before commit");
        assert_eq!(s.list().unwrap(), vec!["default"]);
        let changed = s.commit("default").unwrap();
        assert_eq!(changed, vec!["motd", "network.hostname"]);
        assert!(s.list().unwrap().is_empty());
        let s = Datastore::open(&d).unwrap();
        assert_eq!(s.live(), &json!({"motd": "hi", "network": {"hostname": "a"}}));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pending_transactions_survive_a_restart_and_null_deletes() {
        let d = tmp("pending");
        let mut s = Datastore::open(&d).unwrap();
        s.patch("default", &json!({"motd": "hi", "kernel": {"sysctl": {"vm.a": "1", "vm.b": "2"}}})).unwrap();
        s.commit("default").unwrap();
        s.patch("t1", &json!({"kernel": {"sysctl": {"vm.a": null}}})).unwrap();
        s.patch("t1", &json!({"motd": "bye"})).unwrap();
        drop(s);
        let mut s = Datastore::open(&d).unwrap();
        assert_eq!(s.pending("t1").unwrap(), json!({"kernel": {"sysctl": {"vm.a": null}}, "motd": "bye"}));
        let changed = s.commit("t1").unwrap();
        assert_eq!(changed, vec!["kernel.sysctl", "motd"]);
        assert_eq!(s.live(), &json!({"motd": "bye", "kernel": {"sysctl": {"vm.b": "2"}}}));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_input_stores_nothing() {
        let d = tmp("bad");
        let mut s = Datastore::open(&d).unwrap();
        s.patch("default", &json!({"motd": "ok"})).unwrap();
        for bad in
            [json!({"motd": 1}), json!({"nope": 1}), json!("str"), json!({"network": {"hostname": "a b"}})]
        {
            assert!(s.patch("default", &bad).is_err(), "{bad}");
        }
        assert_eq!(s.pending("default").unwrap(), json!({"motd": "ok"}));
        assert!(matches!(s.patch("../x", &json!({})), Err(Error::BadTxName(_))));
        assert!(matches!(s.commit("other"), Err(Error::EmptyCommit(_))));
        s.patch("empty", &json!({})).unwrap();
        assert_eq!(s.list().unwrap(), vec!["default"], "an empty patch leaves nothing pending");
        assert!(matches!(s.commit("empty"), Err(Error::EmptyCommit(_))));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn interrupted_writes_leave_old_or_new() {
        let d = tmp("atomic");
        let mut s = Datastore::open(&d).unwrap();
        s.patch("default", &json!({"motd": "old"})).unwrap();
        s.commit("default").unwrap();
        // A power cut after the temp file was written but before the rename:
        fs::write(d.join(".live.json.tmp"), b"{\"motd\": \"new, half wri").unwrap();
        let s = Datastore::open(&d).unwrap();
        assert_eq!(s.live(), &json!({"motd": "old"}));
        assert!(!d.join(".live.json.tmp").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unreadable_live_file_is_set_aside_not_fatal() {
        let d = tmp("unreadable");
        let mut s = Datastore::open(&d).unwrap();
        s.patch("default", &json!({"motd": "old"})).unwrap();
        s.commit("default").unwrap();
        fs::write(d.join("live.json"), b"{\"motd\": \"torn").unwrap();
        let s = Datastore::open(&d).unwrap();
        assert_eq!(s.live(), &json!({}), "defaults");
        assert_eq!(s.notices().len(), 1);
        assert!(s.notices()[0].contains("set aside"), "{:?}", s.notices());
        let kept: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("live.json.unreadable-"))
            .collect();
        assert_eq!(kept.len(), 1, "the torn file is kept for inspection");
        assert_eq!(fs::read(kept[0].path()).unwrap(), b"{\"motd\": \"torn");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_format_is_recorded_and_a_newer_one_is_never_written() {
        let d = tmp("format");
        let mut s = Datastore::open(&d).unwrap();
        let f: Value = serde_json::from_slice(&fs::read(d.join("format.json")).unwrap()).unwrap();
        assert_eq!(f, json!({"format": FORMAT, "written-by": crate::VERSION}));
        s.patch("default", &json!({"motd": "old"})).unwrap();
        s.commit("default").unwrap();
        // A newer version changed the layout; this one reads what it can and writes nothing.
        fs::write(d.join("format.json"), json!({"format": FORMAT + 1, "written-by": "9.9.9"}).to_string())
            .unwrap();
        let mut s = Datastore::open(&d).unwrap();
        assert_eq!(s.live()["motd"], "old");
        assert!(s.notices().iter().any(|n| n.contains("newer than this version's")), "{:?}", s.notices());
        s.patch("default", &json!({"motd": "new"})).unwrap();
        let e = s.commit("default").unwrap_err();
        assert!(matches!(e, Error::NewerFormat(2)), "{e}");
        assert!(e.to_string().contains("read-only here"), "{e}");
        let live: Value = serde_json::from_slice(&fs::read(d.join("live.json")).unwrap()).unwrap();
        assert_eq!(live["motd"], "old");
        let f: Value = serde_json::from_slice(&fs::read(d.join("format.json")).unwrap()).unwrap();
        assert_eq!(f["written-by"], "9.9.9", "not rewritten");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn settings_of_a_newer_version_are_kept_aside_and_survive_commits() {
        let d = tmp("newer");
        fs::create_dir_all(&d).unwrap();
        // What a newer version wrote: a group and a key this version does not know, and a
        // known key of a wrong type (a changed meaning).
        let stored = json!({
            "motd": "hello",
            "future-group": {"x": 1},
            "kubernetes": {"cluster-name": "c", "ids-per-pod": 65536},
            "network": {"hostname": 5}
        });
        fs::write(d.join("live.json"), stored.to_string()).unwrap();
        let mut s = Datastore::open(&d).unwrap();
        assert_eq!(s.live(), &json!({"motd": "hello", "kubernetes": {"cluster-name": "c"}, "network": {}}));
        let notes = s.notices().join("\n");
        for key in ["settings.future-group", "settings.kubernetes.ids-per-pod", "settings.network.hostname"] {
            assert!(notes.contains(key), "{key} not reported in {notes}");
        }
        // The older version commits a change; what it does not know is still on disk.
        s.patch("default", &json!({"motd": "changed", "network": {"hostname": "h"}})).unwrap();
        s.commit("default").unwrap();
        let on_disk: Value = serde_json::from_slice(&fs::read(d.join("live.json")).unwrap()).unwrap();
        assert_eq!(on_disk["future-group"], json!({"x": 1}));
        assert_eq!(on_disk["kubernetes"]["ids-per-pod"], 65536);
        assert_eq!(on_disk["motd"], "changed");
        assert_eq!(on_disk["network"]["hostname"], "h", "the commit's own value replaces the kept-aside one");
        // Reopened, the same split happens again, minus what the commit replaced.
        let s = Datastore::open(&d).unwrap();
        assert_eq!(s.notices().len(), 2, "{:?}", s.notices());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pending_transactions_and_size_are_bounded() {
        let d = tmp("quota");
        let mut s = Datastore::open(&d).unwrap();
        for i in 0..MAX_PENDING {
            s.patch(&format!("t{i}"), &json!({"motd": "x"})).unwrap();
        }
        assert!(matches!(s.patch("one-more", &json!({"motd": "x"})), Err(Error::TooManyTransactions(_))));
        s.patch("t0", &json!({"motd": "y"})).unwrap();
        // 16 KB patches fill the quota long before PRIVATE fills.
        for i in 0..MAX_PENDING {
            s.delete(&format!("t{i}")).unwrap();
        }
        // ~200 KB per transaction: 50 sysctls of 4 KB each.
        let sysctls: Map<String, Value> =
            (0..50).map(|i| (format!("vm.k{i}"), Value::String("1".repeat(4000)))).collect();
        let big = json!({"kernel": {"sysctl": sysctls}});
        let mut refused = None;
        for i in 0..MAX_PENDING {
            if let Err(e) = s.patch(&format!("b{i}"), &big) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(refused, Some(Error::Quota { .. })), "{refused:?}");
        assert!(dir_usage(&d) <= QUOTA_BYTES);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn changed_keys_table() {
        let cases = [
            (json!({}), json!({"motd": "x"}), vec!["motd"]),
            (json!({"motd": "x"}), json!({"motd": "x"}), vec![]),
            (
                json!({"network": {"hostname": "a"}}),
                json!({"network": {"hostname": "b"}}),
                vec!["network.hostname"],
            ),
            (
                json!({"kernel": {"sysctl": {"a": "1"}}}),
                json!({"kernel": {"sysctl": {"a": "2"}}}),
                vec!["kernel.sysctl"],
            ),
            (json!({"motd": "x"}), json!({}), vec!["motd"]),
            (json!({}), json!({"network": {"hostname": "a"}}), vec!["network.hostname"]),
            (json!({"kernel": {"sysctl": {"a": "1"}}}), json!({}), vec!["kernel.sysctl"]),
        ];
        for (old, new, want) in cases {
            assert_eq!(changed_keys(&old, &new), want, "{old} -> {new}");
        }
    }
}
