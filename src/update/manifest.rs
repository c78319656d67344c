//! The update manifest (`manifest.json`, a TUF target) in Bottlerocket's shape, and the rules
//! that pick the update a host should take.
//!
//! ```json
//! {"updates": [{"variant": "qemu", "arch": "x86_64", "version": "0.2.0", "max_version": "0.2.0",
//!               "waves": {"1024": "2026-11-22T00:00:00Z", "2048": "2026-11-23T00:00:00Z"},
//!               "images": {"boot": "...boot.img.lz4", "root": "...root.img.lz4", "hash": "...hash.img.lz4"}}]}
//! ```
//! Unknown fields (Bottlerocket's `migrations`, `datastore_versions`) are ignored, so a newer
//! manifest still parses.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The name of the manifest target in the repository.
pub const MANIFEST: &str = "manifest.json";

/// Seeds spread hosts over waves: 0..=2047 (Bottlerocket's range).
pub const MAX_SEED: u32 = 2047;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub updates: Vec<Update>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub variant: String,
    pub arch: String,
    pub version: Version,
    pub max_version: Version,
    /// Wave bound (a seed, as a string key) → the time that wave may start, RFC 3339.
    #[serde(default)]
    pub waves: BTreeMap<u32, jiff::Timestamp>,
    pub images: Images,
}

/// Target names of a version's three slot images (lz4 frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Images {
    pub boot: String,
    pub root: String,
    pub hash: String,
}

/// A `MAJOR.MINOR.PATCH` version (numeric parts only, as Berth's images use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub u64, pub u64, pub u64);

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Version, String> {
        let bad = || format!("'{s}' is not a version (MAJOR.MINOR.PATCH)");
        let mut it = s.trim_start_matches('v').split('.');
        let mut part = || -> Result<u64, String> {
            let p = it.next().ok_or_else(bad)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = Version(part()?, part()?, part()?);
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de)
            .map_err(|e| format!("manifest.json: {}: {}", e.path(), e.inner()))
    }
}

/// What the host is running and how it takes updates (`settings.updates.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub variant: String,
    pub arch: String,
    pub current: Version,
    /// `settings.updates.version-lock`: None for "latest".
    pub version_lock: Option<Version>,
    pub seed: u32,
    pub ignore_waves: bool,
}

/// Why no update was chosen, or which one was and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<'a> {
    Update(&'a Update, &'static str),
    None(String),
}

impl Update {
    /// Whether the wave of a host with `seed` has started at `now`: the first wave whose bound
    /// is at or above the seed decides; past the last bound, the last wave decides; no waves
    /// means everyone at once.
    pub fn wave_started(&self, seed: u32, now: jiff::Timestamp) -> bool {
        match self.waves.range(seed..).next().or_else(|| self.waves.iter().next_back()) {
            Some((_, start)) => *start <= now,
            None => true,
        }
    }
}

impl Manifest {
    /// Every update for this host's variant and arch, newest first.
    pub fn for_host<'a>(&'a self, variant: &str, arch: &str) -> Vec<&'a Update> {
        let mut v: Vec<&Update> =
            self.updates.iter().filter(|u| u.variant == variant && u.arch == arch).collect();
        v.sort_by_key(|u| std::cmp::Reverse(u.version));
        v
    }

    /// The versions offered to this host's variant and arch, newest first: entries above
    /// their own `max_version` are withdrawn (lowering `max_version` below a version is how a
    /// repository withdraws it), like entries that are gone.
    pub fn offered(&self, variant: &str, arch: &str) -> Vec<Version> {
        self.for_host(variant, arch)
            .into_iter()
            .filter(|u| u.version <= u.max_version)
            .map(|u| u.version)
            .collect()
    }

    /// Bottlerocket's rules: variant and arch must match; versions above their `max_version`
    /// are never taken; `version-lock` pins one version (up or down); otherwise the newest
    /// allowed version is taken if it is newer than the running one and this host's wave has
    /// started (unless waves are ignored); a running version above `max_version` (the fleet's
    /// maximum was lowered) makes the newest allowed version a downgrade to take.
    pub fn choose(&self, p: &Policy, now: jiff::Timestamp) -> Choice<'_> {
        let mine = self.for_host(&p.variant, &p.arch);
        if mine.is_empty() {
            return Choice::None(format!(
                "the repository has no update for variant {} on {}",
                p.variant, p.arch
            ));
        }
        let allowed: Vec<&Update> = mine.iter().copied().filter(|u| u.version <= u.max_version).collect();
        if let Some(lock) = p.version_lock {
            return match allowed.iter().find(|u| u.version == lock) {
                Some(u) if u.version == p.current => {
                    Choice::None(format!("locked to {lock}, which is running"))
                }
                Some(u) => Choice::Update(u, "version-lock"),
                None => Choice::None(format!("locked to {lock}, which the repository does not offer")),
            };
        }
        let Some(newest) = allowed.first() else {
            return Choice::None("every update is above its max_version".into());
        };
        let ready = p.ignore_waves || newest.wave_started(p.seed, now);
        if p.current > newest.max_version {
            if newest.version == p.current {
                return Choice::None("running version is the newest allowed".into());
            }
            return if ready {
                Choice::Update(newest, "running version is above max_version: downgrade")
            } else {
                Choice::None(format!("downgrade to {} waits for this host's wave", newest.version))
            };
        }
        if newest.version <= p.current {
            return Choice::None(format!("{} is up to date", p.current));
        }
        if !ready {
            return Choice::None(format!("{} waits for this host's wave (seed {})", newest.version, p.seed));
        }
        Choice::Update(newest, "newer version")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn update(version: &str, max: &str, arch: &str, waves: &[(u32, &str)]) -> Update {
        Update {
            variant: "qemu".into(),
            arch: arch.into(),
            version: v(version),
            max_version: v(max),
            waves: waves.iter().map(|(s, t)| (*s, ts(t))).collect(),
            images: Images { boot: "b".into(), root: "r".into(), hash: "h".into() },
        }
    }

    fn policy(current: &str) -> Policy {
        Policy {
            variant: "qemu".into(),
            arch: "x86_64".into(),
            current: v(current),
            version_lock: None,
            seed: 100,
            ignore_waves: false,
        }
    }

    fn chosen(m: &Manifest, p: &Policy, now: &str) -> Option<String> {
        match m.choose(p, ts(now)) {
            Choice::Update(u, _) => Some(u.version.to_string()),
            Choice::None(_) => None,
        }
    }

    const NOW: &str = "2026-11-22T12:00:00Z";

    #[test]
    fn versions_parse_and_order_numerically() {
        assert!(v("1.10.0") > v("1.9.9"));
        assert_eq!(v("v2.0.1").to_string(), "2.0.1");
        for bad in ["1.2", "1.2.3.4", "1.x.3", "", "1..2", "-1.0.0", "1.2.3-rc1"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_parses_bottlerocket_shape_and_names_bad_fields() {
        let text = r#"{"updates": [{"variant": "qemu", "arch": "x86_64", "version": "0.2.0",
            "max_version": "0.2.0", "waves": {"1024": "2026-11-22T00:00:00Z"},
            "images": {"boot": "b.lz4", "root": "r.lz4", "hash": "h.lz4"}}],
            "migrations": {}, "datastore_versions": {}}"#;
        let m = Manifest::parse(text.as_bytes()).unwrap();
        assert_eq!(m.updates[0].waves.len(), 1);
        let bad = text.replace("\"0.2.0\",\n", "\"zero\",\n");
        let e = Manifest::parse(bad.as_bytes()).unwrap_err();
        assert!(e.contains("updates[0].version"), "{e}");
        assert!(Manifest::parse(b"{\"updates\": 3}").unwrap_err().contains("updates"));
    }

    #[test]
    fn newest_allowed_newer_version_wins_and_arch_variant_must_match() {
        let m = Manifest {
            updates: vec![
                update("0.2.0", "0.3.0", "x86_64", &[]),
                update("0.3.0", "0.3.0", "x86_64", &[]),
                update("0.4.0", "0.4.0", "aarch64", &[]),
            ],
        };
        assert_eq!(chosen(&m, &policy("0.1.0"), NOW).as_deref(), Some("0.3.0"));
        assert_eq!(chosen(&m, &policy("0.3.0"), NOW), None);
        let mut other = policy("0.1.0");
        other.variant = "aws".into();
        assert!(matches!(m.choose(&other, ts(NOW)), Choice::None(e) if e.contains("variant aws")));
        other = policy("0.1.0");
        other.arch = "aarch64".into();
        assert_eq!(chosen(&m, &other, NOW).as_deref(), Some("0.4.0"));
    }

    #[test]
    fn max_version_caps_and_lowering_it_forces_a_downgrade() {
        let m = Manifest {
            updates: vec![update("0.2.0", "0.2.0", "x86_64", &[]), update("0.3.0", "0.2.0", "x86_64", &[])],
        };
        assert_eq!(chosen(&m, &policy("0.1.0"), NOW).as_deref(), Some("0.2.0"));
        assert_eq!(chosen(&m, &policy("0.2.0"), NOW), None);
        // A host already on 0.3.0 when the fleet's maximum drops to 0.2.0 goes back down.
        assert_eq!(chosen(&m, &policy("0.3.0"), NOW).as_deref(), Some("0.2.0"));
    }

    #[test]
    fn version_lock_pins_up_or_down() {
        let m = Manifest {
            updates: vec![update("0.2.0", "0.3.0", "x86_64", &[]), update("0.3.0", "0.3.0", "x86_64", &[])],
        };
        let mut p = policy("0.3.0");
        p.version_lock = Some(v("0.2.0"));
        assert_eq!(chosen(&m, &p, NOW).as_deref(), Some("0.2.0"));
        p.version_lock = Some(v("0.3.0"));
        assert_eq!(chosen(&m, &p, NOW), None);
        p.version_lock = Some(v("0.9.0"));
        assert!(matches!(m.choose(&p, ts(NOW)), Choice::None(e) if e.contains("does not offer")));
    }

    #[test]
    fn waves_spread_hosts_by_seed() {
        let waves =
            [(500, "2026-11-22T00:00:00Z"), (1500, "2026-11-23T00:00:00Z"), (2047, "2026-11-24T00:00:00Z")];
        let m = Manifest { updates: vec![update("0.2.0", "0.2.0", "x86_64", &waves)] };
        let mut p = policy("0.1.0");
        for (seed, now, want) in [
            (100, NOW, true),
            (500, NOW, true),
            (501, NOW, false),
            (501, "2026-11-23T00:00:00Z", true),
            (2000, "2026-11-23T12:00:00Z", false),
            (2000, "2026-11-24T00:00:01Z", true),
        ] {
            p.seed = seed;
            assert_eq!(chosen(&m, &p, now).is_some(), want, "seed {seed} at {now}");
        }
        p.seed = 2000;
        p.ignore_waves = true;
        assert_eq!(chosen(&m, &p, NOW).as_deref(), Some("0.2.0"));
    }
}
