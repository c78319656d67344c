//! The settings datastore, on the PRIVATE partition.
//!
//! Layout under its directory: `live.json` holds the committed settings; `tx/NAME.json` holds
//! the pending changes (a JSON merge patch) of transaction NAME. Every write is atomic: a temp
//! file is written and fsync'd, renamed over the old one, and the directory fsync'd, so after a
//! power cut a file is the old version or the new one, never a mix or empty. Pending
//! transactions survive restarts until committed or deleted. Patches are checked against the
//! model when they are made, so a commit never fails on content.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::model::{self, Invalid, Settings};

pub const DEFAULT_TX: &str = "default";

#[derive(Debug)]
pub enum Error {
    Io { path: PathBuf, error: io::Error },
    Corrupt { path: PathBuf, error: String },
    Invalid(Invalid),
    BadTxName(String),
    NotAnObject,
    EmptyCommit(String),
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
        }
    }
}

impl std::error::Error for Error {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |error| Error::Io { path: path.to_path_buf(), error }
}

/// Write `data` to `path` atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
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
    live: Value,
}

impl Datastore {
    /// Open (creating if needed) the datastore in `dir`. Leftover temp files of an interrupted
    /// write are removed; a corrupt `live.json` is an error, never silently replaced.
    pub fn open(dir: &Path) -> Result<Datastore, Error> {
        fs::create_dir_all(dir.join("tx")).map_err(io_err(dir))?;
        for d in [dir.to_path_buf(), dir.join("tx")] {
            for e in fs::read_dir(&d).map_err(io_err(&d))?.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let path = dir.join("live.json");
        let live = match fs::read(&path) {
            Ok(bytes) => {
                let v: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Corrupt { path: path.clone(), error: e.to_string() })?;
                model::parse(&v).map_err(|e| Error::Corrupt { path: path.clone(), error: e.to_string() })?;
                v
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Value::Object(Map::new()),
            Err(e) => return Err(Error::Io { path, error: e }),
        };
        Ok(Datastore { dir: dir.to_path_buf(), live })
    }

    /// The committed settings, as JSON.
    pub fn live(&self) -> &Value {
        &self.live
    }

    /// The committed settings, typed.
    pub fn settings(&self) -> Settings {
        model::parse(&self.live).unwrap_or_default()
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
        write_atomic(&path, &serde_json::to_vec(&pending).expect("JSON serializes"))
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
        let path = self.tx_path(tx)?;
        let pending = self.pending(tx)?;
        if pending.as_object().is_some_and(|m| m.is_empty()) {
            let _ = fs::remove_file(&path);
            return Err(Error::EmptyCommit(tx.to_string()));
        }
        let mut new = self.live.clone();
        merge(&mut new, &pending);
        // Normalise through the model, so `live.json` only holds known, valid keys.
        let typed = model::parse(&new).map_err(Error::Invalid)?;
        let new = serde_json::to_value(typed).expect("settings serialize");
        let changed = changed_keys(&self.live, &new);
        let live_path = self.dir.join("live.json");
        write_atomic(&live_path, &serde_json::to_vec_pretty(&new).expect("JSON serializes"))?;
        self.live = new;
        let _ = fs::remove_file(&path);
        Ok(changed)
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
        // A corrupt live file is reported, not replaced.
        fs::write(d.join("live.json"), b"{garbage").unwrap();
        assert!(matches!(Datastore::open(&d), Err(Error::Corrupt { .. })));
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
