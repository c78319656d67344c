//! `berth update-repo`: builds and keeps the signed TUF repository that Berth hosts update from
//! (the host side of docs/updates.md). A repository directory holds:
//!
//! - `metadata/`: TUF metadata as served: `root.json` (= `1.root.json`), `N.targets.json`,
//!   `N.snapshot.json` and `timestamp.json` (consistent snapshots);
//! - `targets/`: the targets as served, named `SHA256.NAME`;
//! - `src/`: the unsigned working copy, `manifest.json` and the lz4 images. Every command edits
//!   `src/` and then signs the whole repository again from it.
//!
//! Signing bumps the targets, snapshot and timestamp versions past those found in `metadata/`,
//! so a host that saw the previous metadata takes the new (and TUF refuses a rollback). New
//! target files go in first under new, hash-prefixed names (nothing served changes), then the
//! metadata, `timestamp.json` last by one rename: a client sees the old repository or the new one.
//! Then targets no longer listed are removed, and metadata older than the previous version (kept
//! for a client in the middle of a fetch).
//!
//! Limits: development keys only. `keygen` makes one unencrypted Ed25519 key for all four roles;
//! a production repository keeps the root key offline and a key per role (tuftool does that).
//! The root is never rotated (it stays version 1), so a repository signed with other keys is
//! refused rather than re-rooted. One writer at a time: there is no lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::num::NonZeroU64;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use tough::editor::signed::SignedRole;
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::decoded::Decoded;
use tough::schema::{Hashes, KeyHolder, RoleKeys, RoleType, Root, Target};
use tough::sign::Sign;

use super::manifest::{Images, Manifest, Update, Version, MANIFEST, MAX_SEED};
use crate::bootctl::SlotMeta;
use crate::settings::store::write_atomic;

const USAGE: &str = "usage:
  berth update-repo keygen KEYDIR
  berth update-repo add --keys KEYDIR --repo REPO [--max-version V] [--wave SEED=WHEN]...
                        [--expires-days N] SLOTDIR
  berth update-repo set-max-version --keys KEYDIR --repo REPO --variant VARIANT --arch ARCH VERSION
  berth update-repo sign --keys KEYDIR --repo REPO [--expires-days N]
SLOTDIR is an image build directory (slot.toml, boot.img, root.erofs, hash.img). SEED is 0..=2047;
WHEN is RFC 3339 (2026-11-22T00:00:00Z) or relative to now (+6h, -1h, +2d). Metadata expires in
7 days (timestamp) and 30 days (snapshot, targets), or in N days (may be negative) for all three.";

const KEY_FILE: &str = "key.pk8";
const ROOT_JSON: &str = "root.json";
const FIRST_ROOT: &str = "1.root.json";
const TIMESTAMP_JSON: &str = "timestamp.json";
const ROOT_EXPIRES_DAYS: i64 = 3652;
const TIMESTAMP_EXPIRES_DAYS: i64 = 7;
const EXPIRES_DAYS: i64 = 30;
/// The slot files of an image build directory, by image kind.
const SLOT_FILES: [(&str, &str); 3] = [("boot", "boot.img"), ("root", "root.erofs"), ("hash", "hash.img")];

/// `berth update-repo ...` (see [`USAGE`]).
pub fn main(args: &[String]) -> Result<(), String> {
    let Some((cmd, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    let summary = match cmd.as_str() {
        "keygen" => match rest {
            [dir] => keygen(Path::new(dir))?,
            _ => return Err(USAGE.into()),
        },
        "add" => {
            let a = Args::parse(rest, &["keys", "repo", "max-version", "wave", "expires-days"])?;
            let [slot_dir] = a.positional.as_slice() else {
                return Err(format!("add takes one SLOTDIR\n\n{USAGE}"));
            };
            let now = now();
            let opts = AddOpts {
                max_version: a.one("max-version")?.map(|v| parse_version("--max-version", v)).transpose()?,
                waves: parse_waves(&a.all("wave"), now)?,
                expires_days: expires_days(&a)?,
            };
            add(&Ctx::open(&a)?, Path::new(slot_dir), &opts)?
        }
        "set-max-version" => {
            let a = Args::parse(rest, &["keys", "repo", "variant", "arch", "expires-days"])?;
            let [version] = a.positional.as_slice() else {
                return Err(format!("set-max-version takes one VERSION\n\n{USAGE}"));
            };
            let version = parse_version("VERSION", version)?;
            let (variant, arch) = (a.required("variant")?, a.required("arch")?);
            set_max_version(&Ctx::open(&a)?, variant, arch, version, expires_days(&a)?)?
        }
        "sign" => {
            let a = Args::parse(rest, &["keys", "repo", "expires-days"])?;
            if !a.positional.is_empty() {
                return Err(format!("sign takes no arguments besides its flags\n\n{USAGE}"));
            }
            let ctx = Ctx::open(&a)?;
            format!("signed {}: {}", ctx.repo.display(), sign(&ctx, expires_days(&a)?)?)
        }
        "help" | "--help" | "-h" => USAGE.to_string(),
        other => return Err(format!("unknown update-repo command '{other}'\n\n{USAGE}")),
    };
    println!("{summary}");
    Ok(())
}

/// `keygen KEYDIR`: one Ed25519 key (`key.pk8`, PKCS#8 DER) for every role and the signed
/// `root.json` naming it. Development keys: see the module docs. Keeps existing keys.
fn keygen(dir: &Path) -> Result<String, String> {
    let root_path = dir.join(ROOT_JSON);
    if root_path.exists() {
        return Ok(format!("{} exists: keeping these keys", root_path.display()));
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(at(dir))?;
    let key_path = dir.join(KEY_FILE);
    if !key_path.exists() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pk8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "generating an Ed25519 key failed".to_string())?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(at(&key_path))?;
        f.write_all(pk8.as_ref()).and_then(|()| f.sync_all()).map_err(at(&key_path))?;
    }
    let pk8 = fs::read(&key_path).map_err(at(&key_path))?;
    let key = tough::sign::parse_keypair(&pk8).map_err(at(&key_path))?.tuf_key();
    let id = key.key_id().map_err(at(&key_path))?;
    let role = || RoleKeys { keyids: vec![id.clone()], threshold: NonZeroU64::MIN, _extra: HashMap::new() };
    let root = Root {
        spec_version: "1.0.0".into(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        expires: days_after(now(), ROOT_EXPIRES_DAYS)?,
        keys: HashMap::from([(id.clone(), key)]),
        roles: [RoleType::Root, RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp]
            .into_iter()
            .map(|r| (r, role()))
            .collect(),
        _extra: HashMap::new(),
    };
    let holder = KeyHolder::Root(root.clone());
    let sources = key_sources(&key_path);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signed = block_on(SignedRole::new(root, &holder, &sources, &rng))?.map_err(at(&key_path))?;
    write_atomic(&root_path, signed.buffer()).map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} and {} (one Ed25519 key for every role: for development only)",
        key_path.display(),
        root_path.display()
    ))
}

/// The keys and repository a signing command works on.
struct Ctx {
    keys: PathBuf,
    repo: PathBuf,
}

impl Ctx {
    /// From `--keys` and `--repo`: the keys must exist and be the ones the repository (if it
    /// exists yet) was made with, since the root is never rotated.
    fn open(a: &Args) -> Result<Ctx, String> {
        let ctx = Ctx { keys: a.required("keys")?.into(), repo: a.required("repo")?.into() };
        for f in [ctx.root(), ctx.key()] {
            if !f.is_file() {
                return Err(format!(
                    "missing keys: {} not found (make them with `berth update-repo keygen {}`)",
                    f.display(),
                    ctx.keys.display()
                ));
            }
        }
        let served = ctx.metadata().join(FIRST_ROOT);
        if served.exists() {
            let ours = fs::read(ctx.root()).map_err(at(&ctx.root()))?;
            if fs::read(&served).map_err(at(&served))? != ours {
                return Err(format!(
                    "{} differs from {}: the repository was made with other keys (root rotation \
                     is not supported); use its keys or a new --repo",
                    served.display(),
                    ctx.root().display()
                ));
            }
        }
        Ok(ctx)
    }

    fn root(&self) -> PathBuf {
        self.keys.join(ROOT_JSON)
    }
    fn key(&self) -> PathBuf {
        self.keys.join(KEY_FILE)
    }
    fn metadata(&self) -> PathBuf {
        self.repo.join("metadata")
    }
    fn targets(&self) -> PathBuf {
        self.repo.join("targets")
    }
    fn src(&self) -> PathBuf {
        self.repo.join("src")
    }

    fn read_manifest(&self) -> Result<Option<Manifest>, String> {
        let path = self.src().join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => Manifest::parse(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn write_manifest(&self, m: &Manifest) -> Result<(), String> {
        let mut json = serde_json::to_vec_pretty(m).map_err(|e| format!("manifest.json: {e}"))?;
        json.push(b'\n');
        write_atomic(&self.src().join(MANIFEST), &json).map_err(|e| e.to_string())
    }
}

struct AddOpts {
    max_version: Option<Version>,
    waves: BTreeMap<u32, Timestamp>,
    expires_days: Option<i64>,
}

/// `add`: compress SLOTDIR's images into `src/`, put its entry in the manifest, sign.
fn add(ctx: &Ctx, slot_dir: &Path, opts: &AddOpts) -> Result<String, String> {
    let meta_path = slot_dir.join(SlotMeta::FILE);
    let text = fs::read_to_string(&meta_path)
        .map_err(|e| format!("{}: {e} (SLOTDIR must be an image build directory)", meta_path.display()))?;
    let meta = SlotMeta::parse(&text).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    let version =
        parse_version("version", &meta.version).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    for (what, value) in [("variant", &meta.variant), ("arch", &meta.arch)] {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(format!(
                "{}: {what} '{value}' must be letters, digits, '-', '_' or '.'",
                meta_path.display()
            ));
        }
    }
    for (_, file) in SLOT_FILES {
        let path = slot_dir.join(file);
        if !path.is_file() {
            return Err(format!(
                "{}: missing (SLOTDIR must hold boot.img, root.erofs and hash.img)",
                path.display()
            ));
        }
    }
    let src = ctx.src();
    fs::create_dir_all(&src).map_err(at(&src))?;
    let names =
        SLOT_FILES.map(|(kind, _)| format!("berth-{}-{}-{version}-{kind}.img.lz4", meta.arch, meta.variant));
    for ((_, file), name) in SLOT_FILES.iter().zip(&names) {
        compress(&slot_dir.join(file), &src.join(name))?;
    }
    let [boot, root, hash] = names;
    let mut manifest = ctx.read_manifest()?.unwrap_or_default();
    let entry = Update {
        variant: meta.variant.clone(),
        arch: meta.arch.clone(),
        version,
        max_version: version,
        waves: opts.waves.clone(),
        images: Images { boot, root, hash },
    };
    let max = upsert(&mut manifest, entry, opts.max_version);
    ctx.write_manifest(&manifest)?;
    remove_unreferenced(&src, &manifest)?;
    let signed = sign(ctx, opts.expires_days)?;
    Ok(format!(
        "added {} {} {version} (max_version {max}, waves: {}): {signed}",
        meta.variant,
        meta.arch,
        opts.waves.len()
    ))
}

/// Insert or replace `entry` (by variant, arch and version) and set the max_version of its
/// variant and arch: `max_version` if given, else the highest version present. Returns it.
fn upsert(m: &mut Manifest, entry: Update, max_version: Option<Version>) -> Version {
    let same = |u: &Update| u.variant == entry.variant && u.arch == entry.arch;
    m.updates.retain(|u| !(same(u) && u.version == entry.version));
    let highest = m.updates.iter().filter(|u| same(u)).map(|u| u.version).fold(entry.version, Ord::max);
    let max = max_version.unwrap_or(highest);
    let (variant, arch) = (entry.variant.clone(), entry.arch.clone());
    m.updates.push(entry);
    set_max(m, &variant, &arch, max);
    m.updates.sort_by(|a, b| (&a.variant, &a.arch, a.version).cmp(&(&b.variant, &b.arch, b.version)));
    max
}

/// Set max_version on every entry of (variant, arch); returns how many there are.
fn set_max(m: &mut Manifest, variant: &str, arch: &str, max: Version) -> usize {
    let mut n = 0;
    for u in m.updates.iter_mut().filter(|u| u.variant == variant && u.arch == arch) {
        u.max_version = max;
        n += 1;
    }
    n
}

/// `set-max-version`: lowering it below what hosts run makes them go back to it.
fn set_max_version(
    ctx: &Ctx,
    variant: &str,
    arch: &str,
    max: Version,
    expires_days: Option<i64>,
) -> Result<String, String> {
    let path = ctx.src().join(MANIFEST);
    let mut manifest =
        ctx.read_manifest()?.ok_or_else(|| format!("{}: not found (add a version first)", path.display()))?;
    match set_max(&mut manifest, variant, arch, max) {
        0 => Err(format!("{}: no entry for variant '{variant}' arch '{arch}'", path.display())),
        n => {
            ctx.write_manifest(&manifest)?;
            let signed = sign(ctx, expires_days)?;
            Ok(format!("max_version of {variant} {arch} is now {max} ({n} entries): {signed}"))
        }
    }
}

/// What [`sign`] did, for the summary line.
struct Signed {
    targets: usize,
    versions: [u64; 3],
    expires: Timestamp,
}

impl fmt::Display for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [t, s, ts] = self.versions;
        write!(
            f,
            "{} targets; metadata targets v{t}, snapshot v{s}, timestamp v{ts} (expires {})",
            self.targets, self.expires
        )
    }
}

/// Sign the repository again from `src/` (see the module docs for the order of the writes).
fn sign(ctx: &Ctx, expires_days: Option<i64>) -> Result<Signed, String> {
    let src = ctx.src();
    let manifest = ctx.read_manifest()?.ok_or_else(|| {
        format!("{}: not found (nothing to sign: add a version first)", src.join(MANIFEST).display())
    })?;
    let mut names = vec![MANIFEST.to_string()];
    for u in &manifest.updates {
        for name in [&u.images.boot, &u.images.root, &u.images.hash] {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    let mut targets = Vec::new();
    for name in names {
        let (length, sha256) = sha256_file(&src.join(&name))?;
        let hashes = Hashes { sha256: Decoded::from(sha256), _extra: HashMap::new() };
        targets.push((name, Target { length, hashes, custom: HashMap::new(), _extra: HashMap::new() }));
    }

    let meta_dir = ctx.metadata();
    let versions = previous_versions(&meta_dir)?.map(|v| v + 1);
    let now = now();
    let (short, long) = match expires_days {
        Some(n) => (days_after(now, n)?, days_after(now, n)?),
        None => (days_after(now, TIMESTAMP_EXPIRES_DAYS)?, days_after(now, EXPIRES_DAYS)?),
    };
    let staging = ctx.repo.join(".signing");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(at(&staging))?;
    }
    let nz = |v: u64| NonZeroU64::new(v).unwrap_or(NonZeroU64::MIN);
    let sources = key_sources(&ctx.key());
    let written = block_on(async {
        let mut editor = RepositoryEditor::new(ctx.root()).await?;
        for (name, target) in &targets {
            editor.add_target(name.as_str(), target.clone())?;
        }
        editor.targets_version(nz(versions[0]))?.targets_expires(long)?;
        editor.snapshot_version(nz(versions[1])).snapshot_expires(long);
        editor.timestamp_version(nz(versions[2])).timestamp_expires(short);
        editor.sign(&sources).await?.write(&staging).await
    })?;
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(format!("signing with {}: {e}", ctx.keys.display()));
    }

    let targets_dir = ctx.targets();
    fs::create_dir_all(&targets_dir).map_err(at(&targets_dir))?;
    let mut served = BTreeSet::new();
    for (name, target) in &targets {
        let file = format!("{}.{name}", hex::encode(&target.hashes.sha256));
        place_target(&src.join(name), &targets_dir.join(&file), &target.hashes.sha256)?;
        served.insert(file);
    }

    fs::create_dir_all(&meta_dir).map_err(at(&meta_dir))?;
    let root = fs::read(ctx.root()).map_err(at(&ctx.root()))?;
    write_atomic(&meta_dir.join(ROOT_JSON), &root).map_err(|e| e.to_string())?;
    let [t, s, _] = versions;
    for file in [
        FIRST_ROOT.to_string(),
        format!("{t}.targets.json"),
        format!("{s}.snapshot.json"),
        TIMESTAMP_JSON.into(),
    ] {
        let (from, to) = (staging.join(&file), meta_dir.join(&file));
        fs::rename(&from, &to).map_err(|e| format!("moving {} to {}: {e}", from.display(), to.display()))?;
    }
    File::open(&meta_dir).and_then(|d| d.sync_all()).map_err(at(&meta_dir))?;
    fs::remove_dir_all(&staging).map_err(at(&staging))?;

    for entry in read_dir(&targets_dir)? {
        if entry.is_file() && !served.contains(&file_name(&entry)) {
            fs::remove_file(&entry).map_err(at(&entry))?;
        }
    }
    for entry in read_dir(&meta_dir)? {
        if let Some((role, v)) = versioned_metadata(&file_name(&entry)) {
            let current = if role == "targets" { t } else { s };
            if v + 1 < current {
                fs::remove_file(&entry).map_err(at(&entry))?;
            }
        }
    }
    Ok(Signed { targets: targets.len(), versions, expires: short })
}

/// The versions of targets, snapshot and timestamp already in `metadata/` (0 when absent).
fn previous_versions(meta_dir: &Path) -> Result<[u64; 3], String> {
    if !meta_dir.exists() {
        return Ok([0; 3]);
    }
    let (mut targets, mut snapshot) = (0, 0);
    for entry in read_dir(meta_dir)? {
        match versioned_metadata(&file_name(&entry)) {
            Some(("targets", v)) => targets = targets.max(v),
            Some((_, v)) => snapshot = snapshot.max(v),
            None => {}
        }
    }
    let path = meta_dir.join(TIMESTAMP_JSON);
    let timestamp = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["signed"]["version"].as_u64())
            .ok_or_else(|| format!("{}: no signed.version in it (repair or remove it)", path.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    Ok([targets, snapshot, timestamp])
}

/// `N.targets.json` → ("targets", N), `N.snapshot.json` → ("snapshot", N).
fn versioned_metadata(name: &str) -> Option<(&'static str, u64)> {
    let (v, role) = name.split_once('.')?;
    let role = match role {
        "targets.json" => "targets",
        "snapshot.json" => "snapshot",
        _ => return None,
    };
    Some((role, v.parse().ok()?))
}

/// Put `src` at `dest` (a content-addressed name) unless a good copy is there already; a
/// damaged one is replaced. Copy to a temporary name, then rename: no half file is served.
fn place_target(src: &Path, dest: &Path, sha256: &[u8]) -> Result<(), String> {
    if dest.is_file() && sha256_file(dest)?.1 == sha256 {
        return Ok(());
    }
    let tmp = dest.with_file_name(format!(".{}.tmp", file_name(dest)));
    fs::copy(src, &tmp).map_err(|e| format!("copying {} to {}: {e}", src.display(), tmp.display()))?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(at(&tmp))?;
    fs::rename(&tmp, dest).map_err(at(dest))
}

/// Remove images in `src/` that no manifest entry names, and temporaries left by a failed run.
fn remove_unreferenced(src: &Path, m: &Manifest) -> Result<(), String> {
    let used: BTreeSet<&str> = m
        .updates
        .iter()
        .flat_map(|u| [&u.images.boot, &u.images.root, &u.images.hash])
        .map(String::as_str)
        .collect();
    for entry in read_dir(src)? {
        let name = file_name(&entry);
        let stale_image = name.ends_with(".img.lz4") && !used.contains(name.as_str());
        if entry.is_file() && (stale_image || (name.starts_with('.') && name.ends_with(".tmp"))) {
            fs::remove_file(&entry).map_err(at(&entry))?;
        }
    }
    Ok(())
}

/// Compress `from` into the lz4 frame `to`, streaming (images are hundreds of MiB).
fn compress(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_file_name(format!(".{}.tmp", file_name(to)));
    let input = File::open(from).map_err(at(from))?;
    let out = File::create(&tmp).map_err(at(&tmp))?;
    let mut enc = lz4_flex::frame::FrameEncoder::new(BufWriter::with_capacity(1 << 20, out));
    io::copy(&mut BufReader::with_capacity(1 << 20, input), &mut enc)
        .map_err(|e| format!("compressing {} into {}: {e}", from.display(), tmp.display()))?;
    let out = enc
        .finish()
        .map_err(at(&tmp))?
        .into_inner()
        .map_err(|e| format!("{}: {}", tmp.display(), e.error()))?;
    out.sync_all().map_err(at(&tmp))?;
    fs::rename(&tmp, to).map_err(at(to))
}

/// Length and SHA-256 of a file, read in 1 MiB pieces.
fn sha256_file(path: &Path) -> Result<(u64, Vec<u8>), String> {
    let mut f = File::open(path).map_err(at(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0; 1 << 20];
    let mut len = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok((len, ctx.finish().as_ref().to_vec()))
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, String> {
    fs::read_dir(dir).and_then(|it| it.map(|e| e.map(|e| e.path())).collect()).map_err(at(dir))
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn key_sources(key: &Path) -> Vec<Box<dyn KeySource>> {
    vec![Box::new(LocalKeySource { path: key.to_path_buf() })]
}

/// Run tough's async API on a current-thread runtime (STYLE: no multi-threaded runtime).
fn block_on<F: Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("starting a tokio runtime: {e}"))?;
    Ok(rt.block_on(f))
}

/// Now, to the second (metadata and summaries read better without nanoseconds).
fn now() -> Timestamp {
    let t = Timestamp::now();
    t.round(jiff::Unit::Second).unwrap_or(t)
}

fn at<E: fmt::Display>(path: &Path) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn parse_version(what: &str, s: &str) -> Result<Version, String> {
    s.parse().map_err(|e| format!("{what}: {e}"))
}

/// Days are bounded so that the arithmetic below cannot overflow.
const MAX_DAYS: i64 = 100_000;

fn days_after(t: Timestamp, days: i64) -> Result<Timestamp, String> {
    let hours = days.clamp(-MAX_DAYS, MAX_DAYS) * 24;
    t.checked_add(SignedDuration::from_hours(hours)).map_err(|e| format!("{days} days from {t}: {e}"))
}

fn expires_days(a: &Args) -> Result<Option<i64>, String> {
    let Some(s) = a.one("expires-days")? else { return Ok(None) };
    match s.parse::<i64>() {
        Ok(n) if n.abs() <= MAX_DAYS => Ok(Some(n)),
        _ => Err(format!("--expires-days '{s}' is not a number of days (-{MAX_DAYS}..={MAX_DAYS})")),
    }
}

/// `--wave SEED=WHEN` flags → the manifest's waves.
fn parse_waves(flags: &[&str], now: Timestamp) -> Result<BTreeMap<u32, Timestamp>, String> {
    let mut waves = BTreeMap::new();
    for flag in flags {
        let bad = |why: String| format!("--wave {flag}: {why}");
        let (seed, when) = flag.split_once('=').ok_or_else(|| bad("expected SEED=WHEN".into()))?;
        let seed = seed
            .parse::<u32>()
            .ok()
            .filter(|&s| s <= MAX_SEED)
            .ok_or_else(|| bad(format!("seed '{seed}' is out of range 0..={MAX_SEED}")))?;
        if waves.insert(seed, parse_when(when, now).map_err(bad)?).is_some() {
            return Err(bad(format!("seed {seed} is given twice")));
        }
    }
    Ok(waves)
}

/// RFC 3339, or `+Nh`, `-Nh`, `+Nd`, `-Nd` from `now`.
fn parse_when(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    let bad =
        || format!("'{s}' is not a time (RFC 3339 like 2026-11-22T00:00:00Z, or +6h, -1h, +2d from now)");
    let relative = match s.as_bytes().first() {
        Some(b'+') => Some(1),
        Some(b'-') => Some(-1),
        _ => None,
    };
    let Some(sign) = relative else {
        return s.parse::<Timestamp>().map_err(|_| bad());
    };
    let (num, per) = match (s[1..].strip_suffix('h'), s[1..].strip_suffix('d')) {
        (Some(n), _) => (n, 1),
        (_, Some(n)) => (n, 24),
        _ => return Err(bad()),
    };
    if num.is_empty() || num.len() > 6 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let hours: i64 = num.parse().map_err(|_| bad())?;
    now.checked_add(SignedDuration::from_hours(sign * hours * per)).map_err(|e| format!("'{s}': {e}"))
}

/// Flags (`--name VALUE` or `--name=VALUE`) and positional arguments.
struct Args {
    flags: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(args: &[String], known: &[&str]) -> Result<Args, String> {
        let mut parsed = Args { flags: Vec::new(), positional: Vec::new() };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                parsed.positional.push(arg.clone());
                continue;
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name, value.to_string()),
                None => (flag, it.next().ok_or_else(|| format!("--{flag} needs a value"))?.clone()),
            };
            if !known.contains(&name) {
                return Err(format!("unknown flag --{name}\n\n{USAGE}"));
            }
            parsed.flags.push((name.to_string(), value));
        }
        Ok(parsed)
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.flags.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }

    fn one(&self, name: &str) -> Result<Option<&str>, String> {
        match self.all(name)[..] {
            [] => Ok(None),
            [value] => Ok(Some(value)),
            _ => Err(format!("--{name} is given more than once")),
        }
    }

    fn required(&self, name: &str) -> Result<&str, String> {
        self.one(name)?.ok_or_else(|| format!("--{name} is required\n\n{USAGE}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tough::{IntoVec, RepositoryLoader, TargetName};
    use url::Url;

    /// A temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(what: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("berth-repo-{what}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self, rel: &str) -> PathBuf {
            self.0.join(rel)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn run(args: &[&str]) -> Result<(), String> {
        main(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    /// A fake image build directory: slot.toml plus small, distinct boot/root/hash files (the
    /// root is larger than one 64 KiB lz4 block).
    fn slot(t: &TempDir, name: &str, version: &str, arch: &str, fill: u8) -> PathBuf {
        let dir = t.path(name);
        fs::create_dir_all(&dir).unwrap();
        let meta = crate::bootctl::SlotMeta {
            version: version.into(),
            variant: "qemu".into(),
            arch: arch.into(),
            verity: crate::disk::verity::VerityParams {
                algorithm: "sha256".into(),
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: 10,
                hash_start_block: 1,
                salt: "00ff".into(),
                root_hash: "0".repeat(64),
            },
        };
        fs::write(dir.join("slot.toml"), toml::to_string(&meta).unwrap()).unwrap();
        let data = |len: usize, k: u8| -> Vec<u8> {
            (0..len).map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ k ^ fill).collect()
        };
        fs::write(dir.join("boot.img"), data(5000, 1)).unwrap();
        fs::write(dir.join("root.erofs"), data(300_000, 2)).unwrap();
        fs::write(dir.join("hash.img"), data(4096, 3)).unwrap();
        dir
    }

    struct Fixture {
        t: TempDir,
        keys: PathBuf,
        repo: PathBuf,
    }

    impl Fixture {
        fn new(what: &str) -> Fixture {
            let t = TempDir::new(what);
            let (keys, repo) = (t.path("keys"), t.path("repo"));
            run(&["keygen", p(&keys)]).unwrap();
            Fixture { t, keys, repo }
        }

        fn cmd(&self, cmd: &str, extra: &[&str]) -> Result<(), String> {
            let mut args = vec![cmd, "--keys", p(&self.keys), "--repo", p(&self.repo)];
            args.extend_from_slice(extra);
            run(&args)
        }

        /// Load the repository through tough, as a host would (optionally remembering what it
        /// saw in `datastore`, for rollback checks).
        fn load(&self, metadata: &Path, datastore: Option<&Path>) -> Result<tough::Repository, String> {
            let root = fs::read(self.keys.join(ROOT_JSON)).unwrap();
            let meta_url = Url::from_directory_path(metadata).unwrap();
            let targets_url = Url::from_directory_path(self.repo.join("targets")).unwrap();
            let mut loader = RepositoryLoader::new(&root, meta_url, targets_url);
            if let Some(d) = datastore {
                loader = loader.datastore(d);
            }
            block_on(loader.load()).unwrap().map_err(|e| e.to_string())
        }

        fn repo(&self) -> tough::Repository {
            self.load(&self.repo.join("metadata"), None).unwrap()
        }
    }

    fn read(repo: &tough::Repository, name: &str) -> Result<Vec<u8>, String> {
        let name = TargetName::new(name).unwrap();
        block_on(async {
            let stream = repo.read_target(&name).await?.expect("target is listed");
            stream.into_vec().await
        })
        .unwrap()
        .map_err(|e| e.to_string())
    }

    fn manifest(repo: &tough::Repository) -> Manifest {
        Manifest::parse(&read(repo, MANIFEST).unwrap()).unwrap()
    }

    fn unlz4(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        lz4_flex::frame::FrameDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    }

    fn versions(repo: &tough::Repository) -> [u64; 3] {
        [
            repo.targets().signed.version.get(),
            repo.snapshot().signed.version.get(),
            repo.timestamp().signed.version.get(),
        ]
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn ls(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = read_dir(dir).unwrap().iter().map(|e| file_name(e)).collect();
        names.sort();
        names
    }

    #[test]
    fn keygen_add_and_read_back_through_tough() {
        let f = Fixture::new("roundtrip");
        let root_before = fs::read(f.keys.join(ROOT_JSON)).unwrap();
        run(&["keygen", p(&f.keys)]).unwrap();
        assert_eq!(fs::read(f.keys.join(ROOT_JSON)).unwrap(), root_before, "a second keygen keeps the keys");
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&f.keys), 0o700);
        assert_eq!(mode(&f.keys.join(KEY_FILE)), 0o600);

        let slot_dir = slot(&f.t, "x86_64", "1.0.0", "x86_64", 0);
        let before = Timestamp::now();
        f.cmd("add", &["--wave", "1024=+1h", "--wave", "2047=2030-01-02T03:04:05Z", p(&slot_dir)]).unwrap();

        let repo = f.repo();
        let m = manifest(&repo);
        assert_eq!(m.updates.len(), 1);
        let u = &m.updates[0];
        assert_eq!(
            (u.variant.as_str(), u.arch.as_str(), u.version, u.max_version),
            ("qemu", "x86_64", v("1.0.0"), v("1.0.0"))
        );
        assert_eq!(u.images.boot, "berth-x86_64-qemu-1.0.0-boot.img.lz4");
        assert_eq!(u.waves[&2047], "2030-01-02T03:04:05Z".parse::<Timestamp>().unwrap());
        let in_an_hour = u.waves[&1024].duration_since(before);
        assert!((SignedDuration::from_mins(59)..SignedDuration::from_mins(61)).contains(&in_an_hour));
        for (name, file) in
            [(&u.images.boot, "boot.img"), (&u.images.root, "root.erofs"), (&u.images.hash, "hash.img")]
        {
            assert_eq!(unlz4(&read(&repo, name).unwrap()), fs::read(slot_dir.join(file)).unwrap(), "{name}");
        }
        assert_eq!(repo.all_targets().count(), 4);
        assert_eq!(versions(&repo), [1, 1, 1]);
        let meta = ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json", "timestamp.json"];
        assert_eq!(ls(&f.repo.join("metadata")), meta);
        let targets = ls(&f.repo.join("targets"));
        assert_eq!(targets.len(), 4);
        assert!(targets.iter().all(|n| n.len() > 65 && n.as_bytes()[64] == b'.'), "{targets:?}");
        assert!(!f.repo.join(".signing").exists());
    }

    #[test]
    fn max_version_rules_and_pruning() {
        let f = Fixture::new("maxver");
        let maxes = |f: &Fixture| -> Vec<(String, Version, Version)> {
            manifest(&f.repo()).updates.iter().map(|u| (u.arch.clone(), u.version, u.max_version)).collect()
        };
        let x = |ver, max| ("x86_64".to_string(), v(ver), v(max));
        let a = |ver, max| ("arm64".to_string(), v(ver), v(max));
        f.cmd("add", &[p(&slot(&f.t, "s1", "1.0.0", "x86_64", 0))]).unwrap();
        f.cmd("add", &[p(&slot(&f.t, "s2", "1.1.0", "x86_64", 0))]).unwrap();
        assert_eq!(maxes(&f), [x("1.0.0", "1.1.0"), x("1.1.0", "1.1.0")]);
        f.cmd("add", &[p(&slot(&f.t, "s3", "2.0.0", "arm64", 0))]).unwrap();
        assert_eq!(maxes(&f), [a("2.0.0", "2.0.0"), x("1.0.0", "1.1.0"), x("1.1.0", "1.1.0")]);

        f.cmd("set-max-version", &["--variant", "qemu", "--arch", "x86_64", "1.0.0"]).unwrap();
        assert_eq!(maxes(&f), [a("2.0.0", "2.0.0"), x("1.0.0", "1.0.0"), x("1.1.0", "1.0.0")]);

        f.cmd("add", &["--max-version", "1.0.0", p(&slot(&f.t, "s4", "1.2.0", "x86_64", 0))]).unwrap();
        assert_eq!(
            maxes(&f),
            [a("2.0.0", "2.0.0"), x("1.0.0", "1.0.0"), x("1.1.0", "1.0.0"), x("1.2.0", "1.0.0")]
        );

        // Re-adding a version replaces it: new bytes served, the old target file pruned, and a
        // stray image in src/ removed.
        fs::write(f.repo.join("src/berth-x86_64-qemu-0.9.0-boot.img.lz4"), b"stray").unwrap();
        let targets_before = ls(&f.repo.join("targets"));
        let again = slot(&f.t, "s5", "1.1.0", "x86_64", 7);
        f.cmd("add", &[p(&again)]).unwrap();
        assert_eq!(
            maxes(&f),
            [a("2.0.0", "2.0.0"), x("1.0.0", "1.2.0"), x("1.1.0", "1.2.0"), x("1.2.0", "1.2.0")]
        );
        let repo = f.repo();
        let root = read(&repo, "berth-x86_64-qemu-1.1.0-root.img.lz4").unwrap();
        assert_eq!(unlz4(&root), fs::read(again.join("root.erofs")).unwrap());
        let targets = ls(&f.repo.join("targets"));
        assert_eq!(targets.len(), 1 + 4 * 3, "manifest + 4 versions × 3 images: {targets:?}");
        let gone: Vec<_> = targets_before.iter().filter(|n| !targets.contains(n)).collect();
        assert_eq!(gone.len(), 4, "old manifest and the three replaced images: {gone:?}");
        assert!(!ls(&f.repo.join("src")).iter().any(|n| n.contains("0.9.0")));
        assert_eq!(ls(&f.repo.join("src")).len(), 1 + 4 * 3);
    }

    #[test]
    fn versions_go_up_and_hosts_follow_but_refuse_a_rollback() {
        let f = Fixture::new("versions");
        let store = f.t.path("datastore");
        fs::create_dir_all(&store).unwrap();
        f.cmd("add", &[p(&slot(&f.t, "s1", "1.0.0", "x86_64", 0))]).unwrap();
        let meta = f.repo.join("metadata");
        assert_eq!(versions(&f.load(&meta, Some(&store)).unwrap()), [1, 1, 1]);
        let old = f.t.path("old-metadata");
        fs::create_dir_all(&old).unwrap();
        for name in ls(&meta) {
            fs::copy(meta.join(&name), old.join(&name)).unwrap();
        }

        f.cmd("add", &[p(&slot(&f.t, "s2", "1.1.0", "x86_64", 0))]).unwrap();
        f.cmd("sign", &[]).unwrap();
        assert_eq!(versions(&f.load(&meta, Some(&store)).unwrap()), [3, 3, 3]);
        let err = f.load(&old, Some(&store)).unwrap_err();
        assert!(err.contains("version"), "old metadata is a rollback: {err}");
        assert!(f.load(&old, None).is_ok(), "the old metadata is itself valid");
        let expected =
            ["1.root.json", "2.snapshot.json", "2.targets.json", "3.snapshot.json", "3.targets.json"];
        assert_eq!(ls(&meta)[..5], expected, "the previous version is kept, older ones pruned");
    }

    #[test]
    fn expired_metadata_fails_to_load() {
        let f = Fixture::new("expired");
        f.cmd("add", &["--expires-days", "-1", p(&slot(&f.t, "s1", "1.0.0", "x86_64", 0))]).unwrap();
        let err = f.load(&f.repo.join("metadata"), None).unwrap_err();
        assert!(err.contains("expired"), "{err}");
        f.cmd("sign", &[]).unwrap();
        assert_eq!(versions(&f.repo()), [2, 2, 2]);
        f.cmd("sign", &["--expires-days=-1"]).unwrap();
        let err = f.load(&f.repo.join("metadata"), None).unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn tampered_target_is_refused_and_signing_repairs_it() {
        let f = Fixture::new("tamper");
        f.cmd("add", &[p(&slot(&f.t, "s1", "1.0.0", "x86_64", 0))]).unwrap();
        let name = "berth-x86_64-qemu-1.0.0-root.img.lz4";
        let good = read(&f.repo(), name).unwrap();
        let targets = f.repo.join("targets");
        let file = ls(&targets).into_iter().find(|n| n.ends_with(name)).unwrap();
        let mut bytes = fs::read(targets.join(&file)).unwrap();
        bytes[1000] ^= 0x01;
        fs::write(targets.join(&file), &bytes).unwrap();
        let err = read(&f.repo(), name).unwrap_err();
        assert!(err.contains("Hash mismatch"), "{err}");
        f.cmd("sign", &[]).unwrap();
        assert_eq!(read(&f.repo(), name).unwrap(), good);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let f = Fixture::new("errors");
        let good = slot(&f.t, "good", "1.0.0", "x86_64", 0);
        let empty = f.t.path("empty");
        fs::create_dir_all(&empty).unwrap();
        let bad_version = slot(&f.t, "badver", "1.0", "x86_64", 0);
        let no_root = slot(&f.t, "noroot", "1.0.0", "x86_64", 0);
        fs::remove_file(no_root.join("root.erofs")).unwrap();
        let (keys, repo) = (p(&f.keys), p(&f.repo));
        let other_keys = f.t.path("other-keys");
        run(&["keygen", p(&other_keys)]).unwrap();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["add", "--keys", keys, "--repo", repo, p(&empty)], "empty/slot.toml"),
            (vec!["add", "--keys", keys, "--repo", repo, p(&bad_version)], "'1.0' is not a version"),
            (vec!["add", "--keys", keys, "--repo", repo, p(&no_root)], "noroot/root.erofs: missing"),
            (vec!["add", "--keys", p(&empty), "--repo", repo, p(&good)], "missing keys"),
            (vec!["add", "--repo", repo, p(&good)], "--keys is required"),
            (
                vec!["add", "--keys", keys, "--repo", repo, "--wave", "2048=+1h", p(&good)],
                "out of range 0..=2047",
            ),
            (
                vec!["add", "--keys", keys, "--repo", repo, "--wave", "1=soon", p(&good)],
                "'soon' is not a time",
            ),
            (vec!["add", "--keys", keys, "--repo", repo, "--wave", "7", p(&good)], "SEED=WHEN"),
            (
                vec!["add", "--keys", keys, "--repo", repo, "--max-version", "x", p(&good)],
                "--max-version: 'x'",
            ),
            (
                vec!["add", "--keys", keys, "--repo", repo, "--expires-days", "z", p(&good)],
                "--expires-days 'z'",
            ),
            (vec!["add", "--keys", keys, "--repo", repo, "--bogus", "1", p(&good)], "unknown flag --bogus"),
            (vec!["sign", "--keys", keys, "--repo", repo], "nothing to sign"),
            (vec!["frobnicate"], "unknown update-repo command"),
        ];
        for (args, want) in &cases {
            let err = run(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
        assert!(!f.repo.join("metadata").exists(), "no failed command signed anything");

        f.cmd("add", &[p(&good)]).unwrap();
        let set = |arch| {
            vec!["set-max-version", "--keys", keys, "--repo", repo, "--variant", "qemu", "--arch", arch]
        };
        let err = run(&[set("arm64"), vec!["1.0.0"]].concat()).unwrap_err();
        assert!(err.contains("no entry for variant 'qemu' arch 'arm64'"), "{err}");
        let err = run(&[set("x86_64"), vec!["one"]].concat()).unwrap_err();
        assert!(err.contains("VERSION: 'one'"), "{err}");
        let err = run(&["sign", "--keys", p(&other_keys), "--repo", repo]).unwrap_err();
        assert!(err.contains("made with other keys"), "{err}");
    }

    #[test]
    fn when_parses_absolute_and_relative_times() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let ok = [
            ("+2h", "2026-01-01T02:00:00Z"),
            ("-1h", "2025-12-31T23:00:00Z"),
            ("+3d", "2026-01-04T00:00:00Z"),
            ("-0d", "2026-01-01T00:00:00Z"),
            ("2026-11-22T00:00:00Z", "2026-11-22T00:00:00Z"),
            ("2026-11-22T01:00:00+01:00", "2026-11-22T00:00:00Z"),
        ];
        for (s, want) in ok {
            assert_eq!(parse_when(s, now).unwrap(), want.parse::<Timestamp>().unwrap(), "{s}");
        }
        for s in ["2h", "+h", "+2w", "++2h", "+-2h", "tomorrow", "", "+9999999h", "2026-11-22"] {
            assert!(parse_when(s, now).is_err(), "{s}");
        }
    }
}
