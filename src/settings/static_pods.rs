//! `settings.kubernetes.static-pods.NAME.{manifest, enabled}` (Bottlerocket's keys): pod
//! manifests (base64 of YAML or JSON) that kubelet runs without an API server. Each enabled one
//! with a manifest is written to kubelet's `staticPodPath` (`/etc/kubernetes/static-pods`, see
//! [`super::kubelet`]) as a file named NAME; a disabled or deleted one is removed from there.
//! The directory belongs to this setting: files in it that no enabled static pod names are
//! removed. Files are written whole (a temporary dotfile, which kubelet ignores, then a rename),
//! so kubelet never reads half a manifest.
//!
//! Bounds: names as host containers' (1-63 of `[a-z0-9-]`), at most [`MAX_PODS`] pods, at most
//! [`MAX_MANIFEST`] bytes of base64 each. The manifest is only checked to be base64: kubelet
//! judges the pod itself (and logs what it refuses), as on Bottlerocket.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::model::{Invalid, Settings};

/// kubelet's `staticPodPath`, relative to /etc.
pub const DIR: &str = "kubernetes/static-pods";
/// The most static pods.
pub const MAX_PODS: usize = 64;
/// The most base64 text one manifest may hold.
pub const MAX_MANIFEST: usize = 256 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct StaticPod {
    /// Base64 of the pod manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

fn pods(s: &Settings) -> Option<&BTreeMap<String, StaticPod>> {
    s.kubernetes.as_ref()?.static_pods.as_ref()
}

/// Check `settings.kubernetes.static-pods` (called from `Settings::validate`).
pub fn validate(s: &Settings) -> Result<(), Invalid> {
    let Some(pods) = pods(s) else { return Ok(()) };
    let invalid = |key: String, message: &str| Invalid { key, message: message.into() };
    if pods.len() > MAX_PODS {
        return Err(invalid("settings.kubernetes.static-pods".into(), "more than 64 static pods"));
    }
    for (name, pod) in pods {
        let key = format!("settings.kubernetes.static-pods.{name}");
        if name.is_empty()
            || name.len() > 63
            || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid(key, "name must be 1-63 of [a-z0-9-]"));
        }
        if let Some(m) = &pod.manifest {
            if m.len() > MAX_MANIFEST {
                return Err(invalid(format!("{key}.manifest"), "longer than 256 KiB"));
            }
            if super::kubelet::base64_decode(m).is_none() {
                return Err(invalid(format!("{key}.manifest"), "not base64 (of a pod manifest)"));
            }
        }
    }
    Ok(())
}

/// The manifests that should be in the directory: (file name, contents).
pub fn wanted(s: &Settings) -> BTreeMap<String, Vec<u8>> {
    pods(s)
        .into_iter()
        .flatten()
        .filter(|(_, p)| p.enabled.unwrap_or(false))
        .filter_map(|(name, p)| Some((name.clone(), super::kubelet::base64_decode(p.manifest.as_deref()?)?)))
        .collect()
}

/// Bring `dir` in line with the settings; returns what was done.
pub fn sync(s: &Settings, dir: &Path) -> Result<Vec<String>, String> {
    let want = wanted(s);
    let mut done = Vec::new();
    if want.is_empty() && !dir.exists() {
        return Ok(done);
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !want.contains_key(&name) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            done.push(format!("removed static pod {}", path.display()));
        }
    }
    for (name, data) in &want {
        let path = dir.join(name);
        if super::store::holds(&path, data, 0o644) {
            continue;
        }
        super::store::write_atomic_mode(&path, data, 0o644).map_err(|e| e.to_string())?;
        done.push(format!("wrote static pod {}", path.display()));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::model::parse;
    use serde_json::json;

    #[test]
    fn manifests_follow_their_settings() {
        let dir = std::env::temp_dir().join(format!("berth-static-pods-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // "a: 1\n" and "b: 2\n"
        let s = parse(&json!({"kubernetes": {"static-pods": {
            "web": {"manifest": "YTogMQo=", "enabled": true},
            "off": {"manifest": "YjogMgo=", "enabled": false},
            "nomanifest": {"enabled": true},
        }}}))
        .unwrap();
        assert!(sync(&s, &dir).unwrap().iter().any(|d| d.contains("wrote static pod")));
        assert_eq!(fs::read_to_string(dir.join("web")).unwrap(), "a: 1\n");
        assert!(!dir.join("off").exists() && !dir.join("nomanifest").exists());
        assert!(sync(&s, &dir).unwrap().is_empty(), "nothing to do the second time");
        fs::write(dir.join("stray"), "x").unwrap();
        let s = parse(
            &json!({"kubernetes": {"static-pods": {"web": {"manifest": "YTogMQo=", "enabled": false}}}}),
        )
        .unwrap();
        sync(&s, &dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "disabled and stray manifests removed");
        let gone = std::env::temp_dir().join(format!("berth-static-pods-none-{}", std::process::id()));
        sync(&Settings::default(), &gone).unwrap();
        assert!(!gone.exists(), "no directory made for no pods");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_static_pods_are_refused() {
        for (v, key) in [
            (json!({"web": {"manifest": "%%"}}), "settings.kubernetes.static-pods.web.manifest"),
            (json!({"Web": {}}), "settings.kubernetes.static-pods.Web"),
            (
                json!({"web": {"manifest": "QUFB".repeat(MAX_MANIFEST / 4 + 1)}}),
                "settings.kubernetes.static-pods.web.manifest",
            ),
        ] {
            let e = parse(&json!({"kubernetes": {"static-pods": v}})).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }
}
