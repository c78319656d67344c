//! The updater end to end on the host: a real signed repository (built by `berth update-repo`),
//! served over HTTP by qemu-tests/repo_server.py, written into a GPT disk image file with both
//! slots. Needs sgdisk, mkfs.vfat, mtools and python3 (scripts/setup installs them).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::Arc;

use serde_json::Value;

use super::*;
use crate::bootctl::SlotMeta;
use crate::disk::verity;
use crate::time::fake::{Event, FakeClock};

fn sh(args: &[&str]) -> String {
    let out = Proc::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn repo_tool(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    repo::main(&args).unwrap_or_else(|e| panic!("update-repo {args:?}: {e}"));
}

/// Pseudo-random bytes (xorshift), different per seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Server(Child, u16);

impl Server {
    fn start(dir: &Path) -> Server {
        Server::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Server {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-tests/repo_server.py");
        let mut child = Proc::new("python3")
            .arg(script)
            .arg(dir)
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 repo_server.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening ").expect("listening PORT").parse().unwrap();
        Server(child, port)
    }

    fn control(&self, what: &str) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.1)).unwrap();
        write!(
            s,
            "POST /_control/{what} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = String::new();
        std::io::Read::read_to_string(&mut s, &mut r).unwrap();
        assert!(r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"), "{r}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Fixture {
    dir: PathBuf,
    keys: PathBuf,
    repo: PathBuf,
    disk: PathBuf,
    /// The updater's clock: the host's time, never set (steps are only recorded).
    clock: Arc<FakeClock>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const MIB: u64 = 1 << 20;

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("berth-updtest-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        fs::File::create(&disk).unwrap().set_len(24 * MIB).unwrap();
        let d = disk.to_str().unwrap();
        let mut args = vec!["sgdisk", "-o"];
        let specs: Vec<String> = [("A", 1), ("B", 4)]
            .iter()
            .flat_map(|(s, n)| {
                [("BOOT", 2), ("ROOT", 4), ("HASH", 1)].into_iter().enumerate().flat_map(
                    move |(i, (k, mb))| {
                        let num = n + i;
                        vec![
                            "-n".into(),
                            format!("{num}:0:+{mb}M"),
                            "-c".into(),
                            format!("{num}:BERTH-{k}-{s}"),
                        ]
                    },
                )
            })
            .collect();
        args.extend(specs.iter().map(String::as_str));
        args.extend(["-A", "1:set:48", "-A", "1:set:56", d]);
        sh(&args);
        let f = Fixture {
            keys: dir.join("keys"),
            repo: dir.join("repo"),
            disk,
            dir,
            clock: FakeClock::new(0, None),
        };
        repo_tool(&["keygen", f.keys.to_str().unwrap()]);
        f
    }

    /// Slot images of `version` in a directory, as scripts/build-image leaves them.
    fn slot(&self, version: &str, arch: &str, seed: u64) -> PathBuf {
        let out = self.dir.join(format!("slot-{version}-{arch}-{seed}"));
        fs::create_dir_all(&out).unwrap();
        let data = noise(600 * 4096, seed);
        fs::write(out.join("root.erofs"), &data).unwrap();
        let mut hash = fs::File::create(out.join("hash.img")).unwrap();
        let salt = noise(32, seed + 1);
        let params =
            verity::format(&mut &data[..], data.len() as u64, &mut hash, 4096, &salt, [7; 16]).unwrap();
        let meta =
            SlotMeta { version: version.into(), variant: "qemu".into(), arch: arch.into(), verity: params };
        let toml_text = toml::to_string(&meta).unwrap();
        fs::write(out.join("slot.toml"), &toml_text).unwrap();
        let boot = out.join("boot.img");
        let _ = fs::remove_file(&boot);
        sh(&["mkfs.vfat", "-C", boot.to_str().unwrap(), "2048"]);
        sh(&["mcopy", "-i", boot.to_str().unwrap(), out.join("slot.toml").to_str().unwrap(), "::/slot.toml"]);
        out
    }

    fn add(&self, slot: &Path, extra: &[&str]) {
        let mut args =
            vec!["add", "--keys", self.keys.to_str().unwrap(), "--repo", self.repo.to_str().unwrap()];
        args.extend(extra);
        args.push(slot.to_str().unwrap());
        repo_tool(&args);
    }

    fn updater(&self) -> Arc<Updater> {
        self.updater_with(|_| {})
    }

    /// An updater whose configuration `adjust` changes first (the running slot and version).
    fn updater_with(&self, adjust: impl FnOnce(&mut Config)) -> Arc<Updater> {
        let mut cfg = Config {
            state_dir: self.dir.join("state"),
            trusted_root: self.keys.join("root.json"),
            disk: Disk { path: self.disk.clone(), sector: 512 },
            active: Slot::A,
            on_trial: false,
            variant: "qemu".into(),
            arch: "x86_64".into(),
            version: "0.1.0".parse().unwrap(),
            clock_floor: None,
            clock: self.clock.clone(),
            read_slot_meta: Box::new(|disk, slot| {
                let (off, _) = disk.region(slot, "BOOT")?;
                let img = format!("{}@@{off}", disk.path.display());
                let out = Proc::new("mtype")
                    .args(["-i", &img, "::/slot.toml"])
                    .output()
                    .map_err(|e| e.to_string())?;
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }),
        };
        adjust(&mut cfg);
        Updater::new(cfg)
    }

    fn region(&self, slot: Slot, kind: &str) -> Vec<u8> {
        let (off, len) = Disk { path: self.disk.clone(), sector: 512 }.region(slot, kind).unwrap();
        let all = fs::read(&self.disk).unwrap();
        all[off as usize..(off + len) as usize].to_vec()
    }

    fn slot_state(&self, slot: Slot) -> SlotState {
        Disk { path: self.disk.clone(), sector: 512 }.boot_control().state(slot).unwrap()
    }
}

fn settings(port: u16) -> UpdateSettings {
    UpdateSettings {
        metadata_base_url: Some(format!("http://127.0.0.1:{port}/metadata")),
        targets_base_url: Some(format!("http://127.0.0.1:{port}/targets/")),
        ..Default::default()
    }
}

fn last(u: &Updater) -> (String, String) {
    let st = u.status();
    let rec = &st["most_recent_command"];
    let text = match rec["cmd_status"].as_str() {
        Some("Success") => rec["message"].as_str().unwrap_or(""),
        _ => rec["stderr"].as_str().unwrap_or(""),
    };
    let text = text.to_string();
    (rec["cmd_status"].as_str().unwrap_or("").to_string(), text)
}

fn state(u: &Updater) -> Value {
    u.status()["update_state"].clone()
}

#[test]
fn stages_activates_and_deactivates_without_touching_the_active_slot() {
    let f = Fixture::new("happy");
    f.add(&f.slot("0.2.0", "x86_64", 2), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let a_before: Vec<Vec<u8>> = ["BOOT", "ROOT", "HASH"].iter().map(|k| f.region(Slot::A, k)).collect();
    let u = f.updater();
    assert_eq!(u.command(Command::Prepare, &s).unwrap_err().status(), 409, "prepare before refresh");
    assert_eq!(u.command(Command::Activate, &s).unwrap_err().status(), 409);
    u.run(Command::Refresh, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
    assert_eq!(state(&u), "Available");
    assert_eq!(u.status()["chosen_update"]["version"], "0.2.0");
    u.run(Command::Prepare, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
    assert_eq!(state(&u), "Staged");
    let slot = f.dir.join("slot-0.2.0-x86_64-2");
    let root = fs::read(slot.join("root.erofs")).unwrap();
    assert_eq!(&f.region(Slot::B, "ROOT")[..root.len()], &root[..]);
    let hash = fs::read(slot.join("hash.img")).unwrap();
    assert_eq!(&f.region(Slot::B, "HASH")[..hash.len()], &hash[..]);
    assert!(!f.slot_state(Slot::B).bootable(), "staged but not active: B must not boot");
    assert!(u.command(Command::Activate, &s).is_ok());
    assert_eq!(f.slot_state(Slot::B), SlotState { priority: 2, tries: 1, successful: false });
    assert_eq!(state(&u), "Ready");
    // Refresh runs in Ready too (Bottlerocket's update operator refreshes there) and keeps it.
    u.run(Command::Refresh, &s);
    assert_eq!((last(&u).0.as_str(), state(&u)), ("Success", Value::from("Ready")));
    u.command(Command::Deactivate, &s).unwrap();
    assert_eq!(f.slot_state(Slot::B).priority, 0);
    assert_eq!(state(&u), "Staged");
    // The state survives a restart of the updater.
    drop(u);
    assert_eq!(state(&f.updater()), "Staged");
    let a_after: Vec<Vec<u8>> = ["BOOT", "ROOT", "HASH"].iter().map(|k| f.region(Slot::A, k)).collect();
    assert!(a_before == a_after, "the active slot changed");
    assert_eq!(f.slot_state(Slot::A), SlotState { priority: 1, tries: 0, successful: true });

    // Manual rollback: refused while B has never booted successfully, done once it has.
    let u = f.updater();
    assert_eq!(u.command(Command::Rollback, &s).unwrap_err().status(), 409);
    let mut bc = Disk { path: f.disk.clone(), sector: 512 }.boot_control();
    bc.set_state(Slot::B, SlotState { priority: 1, tries: 0, successful: true }).unwrap();
    u.command(Command::Rollback, &s).unwrap();
    assert_eq!(f.slot_state(Slot::B), SlotState { priority: 2, tries: 0, successful: true });
    let st = u.status();
    assert_eq!(st["last_rollback"]["automatic"], false);
    assert_eq!(st["last_rollback"]["running_version"], "0.2.0");
}

/// Run a prepare expected to fail; check the error, that B is unbootable and A untouched.
fn prepare_fails(f: &Fixture, u: &Updater, s: &UpdateSettings, want: &str) {
    let a_root = f.region(Slot::A, "ROOT");
    u.run(Command::Prepare, s);
    let (status, err) = last(u);
    assert_eq!(status, "Failed");
    assert!(err.to_lowercase().contains(want), "error '{err}' should mention '{want}'");
    assert!(!f.slot_state(Slot::B).bootable());
    assert_eq!(f.region(Slot::A, "ROOT"), a_root);
    assert_eq!(state(u), "Available");
}

fn target_file(f: &Fixture, part: &str) -> PathBuf {
    fs::read_dir(f.repo.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(part))
        .unwrap_or_else(|| panic!("no target named *{part}*"))
}

#[test]
fn tampered_and_truncated_targets_are_refused() {
    let f = Fixture::new("tamper");
    f.add(&f.slot("0.2.0", "x86_64", 3), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let u = f.updater();
    u.run(Command::Refresh, &s);
    let root = target_file(&f, "root.img.lz4");
    let good = fs::read(&root).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    fs::write(&root, &bad).unwrap();
    prepare_fails(&f, &u, &s, "hash");
    fs::write(&root, &good[..good.len() - 1000]).unwrap();
    prepare_fails(&f, &u, &s, "");
    fs::write(&root, &good).unwrap();
    u.run(Command::Prepare, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
}

#[test]
fn tampered_metadata_expired_metadata_and_metadata_rollback_are_refused() {
    let f = Fixture::new("meta");
    f.add(&f.slot("0.2.0", "x86_64", 4), &[]);
    let old = f.dir.join("old-repo");
    sh(&["cp", "-a", f.repo.to_str().unwrap(), old.to_str().unwrap()]);
    f.add(&f.slot("0.3.0", "x86_64", 5), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let u = f.updater();
    u.run(Command::Refresh, &s);
    assert_eq!(u.status()["chosen_update"]["version"], "0.3.0", "{:?}", last(&u));

    // An older, validly signed copy after the newer one was seen: a rollback attack.
    let old_srv = Server::start(&old);
    u.run(Command::Refresh, &settings(old_srv.1));
    let (st, err) = last(&u);
    assert_eq!(st, "Failed");
    assert!(err.contains("version"), "{err}");

    // Metadata changed without re-signing.
    // The newest N.targets.json (the previous one is kept for clients mid-fetch).
    let targets_json = fs::read_dir(f.repo.join("metadata"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".targets.json"))
        .max_by_key(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.split('.').next().unwrap().parse::<u64>().unwrap()
        })
        .unwrap();
    let good = fs::read_to_string(&targets_json).unwrap();
    fs::write(&targets_json, good.replacen("\"length\": ", "\"length\": 1", 1)).unwrap();
    u.run(Command::Refresh, &s);
    assert_eq!(last(&u).0, "Failed", "tampered targets.json accepted");
    fs::write(&targets_json, good).unwrap();

    // Expired metadata, however validly signed.
    repo_tool(&[
        "sign",
        "--keys",
        f.keys.to_str().unwrap(),
        "--repo",
        f.repo.to_str().unwrap(),
        "--expires-days",
        "-1",
    ]);
    u.run(Command::Refresh, &s);
    let (st, err) = last(&u);
    assert_eq!(st, "Failed");
    assert!(err.to_lowercase().contains("expire"), "{err}");
}

#[test]
fn wrong_arch_or_mislabelled_images_are_refused() {
    let f = Fixture::new("arch");
    f.add(&f.slot("0.2.0", "aarch64", 6), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let u = f.updater();
    u.run(Command::Refresh, &s);
    assert_eq!(state(&u), "Idle");
    assert!(last(&u).1.contains("no update for variant qemu on x86_64"), "{:?}", last(&u));

    // A manifest entry whose images are of another version than it says.
    f.add(&f.slot("0.2.0", "x86_64", 7), &[]);
    let manifest = f.repo.join("src/manifest.json");
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(&manifest, text.replace("\"0.2.0\"", "\"0.2.1\"")).unwrap();
    repo_tool(&["sign", "--keys", f.keys.to_str().unwrap(), "--repo", f.repo.to_str().unwrap()]);
    u.run(Command::Refresh, &s);
    assert_eq!(u.status()["chosen_update"]["version"], "0.2.1");
    prepare_fails(&f, &u, &s, "but the manifest says");
}

#[test]
fn a_root_that_does_not_match_its_verity_hash_is_refused() {
    let f = Fixture::new("verity");
    let slot = f.slot("0.2.0", "x86_64", 8);
    // A build gone wrong: the root changed after its hash tree was made, and was signed so.
    let mut root = fs::read(slot.join("root.erofs")).unwrap();
    root[5000] ^= 1;
    fs::write(slot.join("root.erofs"), root).unwrap();
    f.add(&slot, &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let u = f.updater();
    u.run(Command::Refresh, &s);
    prepare_fails(&f, &u, &s, "verity root hash");
}

#[test]
fn a_dropped_connection_resumes_and_a_dead_one_fails_cleanly() {
    let f = Fixture::new("drop");
    f.add(&f.slot("0.2.0", "x86_64", 9), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let u = f.updater();
    u.run(Command::Refresh, &s);
    srv.control("drop?after=300000&times=1");
    u.run(Command::Prepare, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
    // Start again from Available: a network that keeps dropping gives a clear error.
    let u2 = {
        fs::remove_dir_all(f.dir.join("state")).unwrap();
        f.updater()
    };
    u2.run(Command::Refresh, &s);
    // Every connection cut before its first byte: no progress is possible.
    srv.control("drop?after=0&times=1000");
    prepare_fails(&f, &u2, &s, "");
    eprintln!("dead network: {}", last(&u2).1);
    srv.control("drop?after=0&times=0");
    u2.run(Command::Prepare, &s);
    assert_eq!(last(&u2).0, "Success", "{:?}", last(&u2));
}

#[test]
fn an_interrupted_write_leaves_the_slot_unbootable_and_can_be_redone() {
    let f = Fixture::new("powercut");
    f.add(&f.slot("0.2.0", "x86_64", 10), &[]);
    let u = f.updater();
    // What a power cut in the middle of prepare leaves: `writing` recorded, B half-written
    // and (as prepare sets first) unbootable.
    let mut p = state::load(&f.dir.join("state"));
    p.state = State::Available;
    p.writing = Some(Slot::B);
    p.chosen = Some(state::UpdateInfo {
        version: "0.2.0".into(),
        variant: "qemu".into(),
        arch: "x86_64".into(),
        max_version: "0.2.0".into(),
    });
    state::save(&f.dir.join("state"), &p).unwrap();
    drop(u);
    let u = f.updater();
    assert_eq!(state(&u), "Available");
    assert!(u.status()["note"].as_str().unwrap().contains("interrupted"));
    assert!(!f.slot_state(Slot::B).bootable());
    let srv = Server::start(&f.repo);
    u.run(Command::Prepare, &settings(srv.1));
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
}

#[test]
fn a_failed_trial_is_reported_as_a_rollback() {
    let f = Fixture::new("rollback");
    let mut p = state::Persisted {
        state: State::Ready,
        staged: Some(state::Staged { slot: Slot::B, version: "0.2.0".into() }),
        activated: Some(state::Activated {
            slot: Slot::B,
            version: "0.2.0".into(),
            from_version: "0.1.0".into(),
        }),
        ..Default::default()
    };
    fs::create_dir_all(f.dir.join("state")).unwrap();
    state::save(&f.dir.join("state"), &p).unwrap();
    // B was tried (its one try used up) and never marked successful; A booted again.
    let mut bc = Disk { path: f.disk.clone(), sector: 512 }.boot_control();
    bc.set_state(Slot::B, SlotState { priority: 2, tries: 0, successful: false }).unwrap();
    let u = f.updater();
    let st = u.status();
    assert_eq!(st["update_state"], "Idle");
    assert_eq!(st["last_rollback"]["failed_version"], "0.2.0");
    assert_eq!(st["last_rollback"]["automatic"], true);
    // Manual rollback needs a known-good other slot: B is not one.
    assert_eq!(u.command(Command::Rollback, &UpdateSettings::default()).unwrap_err().status(), 409);

    // An activated update that was never booted stays Ready.
    p.state = State::Ready;
    state::save(&f.dir.join("state"), &p).unwrap();
    bc.set_state(Slot::B, SlotState { priority: 2, tries: 1, successful: false }).unwrap();
    assert_eq!(state(&f.updater()), "Ready");
}

#[test]
fn the_state_table_and_its_messages_agree() {
    let cmds =
        [Command::Refresh, Command::Prepare, Command::Activate, Command::Deactivate, Command::Rollback];
    let states = [State::Idle, State::Available, State::Staged, State::Ready];
    for c in cmds {
        for st in states {
            assert_eq!(check(c, st).is_ok(), c.allowed_from().contains(&st), "{c:?} in {st:?}");
            if let Err(e) = check(c, st) {
                assert_eq!(e.status(), 409);
                assert!(e.to_string().contains(&format!("state {st:?}")), "{e}");
            }
        }
    }
}

/// The clock floor never steps to, nor keeps, a time from the future: one reading of a clock
/// that ran ahead (left in tough's record) costs that record and nothing else, refresh after
/// refresh, whether or not the clock is NTP-synchronised. (The old floor stepped the clock to
/// that reading on every refresh.)
#[test]
fn one_reading_from_the_future_never_pushes_the_clock_forward() {
    let f = Fixture::new("future");
    f.add(&f.slot("0.2.0", "x86_64", 11), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let recorded = f.dir.join("state/tuf/latest_known_time.json");
    let trusted = f.dir.join("state/trusted-time.json");
    let read = |p: &Path| -> jiff::Timestamp {
        serde_json::from_slice::<String>(&fs::read(p).unwrap()).unwrap().parse().unwrap()
    };
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(5 * 365 * 24);
    for sync in [None, Some(std::time::Duration::from_millis(10))] {
        *f.clock.sync.lock().unwrap() = sync;
        fs::create_dir_all(recorded.parent().unwrap()).unwrap();
        fs::write(&recorded, serde_json::to_vec(&future.to_string()).unwrap()).unwrap();
        let u = f.updater();
        for round in 0..3 {
            u.run(Command::Refresh, &s);
            assert_eq!(last(&u).0, "Success", "synchronised {sync:?}, refresh {round}: {:?}", last(&u));
            let r = read(&recorded);
            assert!(r < jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1), "tough's record is {r}");
        }
        assert_eq!(f.clock.events(), vec![], "the clock was moved (synchronised {sync:?})");
    }
    // Only a synchronised reading was kept as a floor, and it is not from the future.
    let t = read(&trusted);
    assert!(t <= jiff::Timestamp::now(), "trusted reading {t}");

    // A clock that fell back (a day behind, not synchronised) is stepped forward to that
    // reading: it is known to have passed.
    *f.clock.sync.lock().unwrap() = None;
    *f.clock.skew_ns.lock().unwrap() = -86_400 * 1_000_000_000;
    let u = f.updater();
    u.run(Command::Refresh, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
    assert_eq!(f.clock.events(), vec![Event::Set(t)]);
}

/// The boot after activating v2: slot B runs v2 on trial (stage 1 used its try), slot A holds
/// v1 and is the fallback. `apiclient update cancel` (deactivate) used to zero slot A here,
/// leaving nothing bootable if the trial failed; now every command that would touch A is
/// refused with a message saying what to do, and the state says what is going on.
#[test]
fn on_the_trial_boot_the_fallback_slot_is_left_alone() {
    let f = Fixture::new("trial");
    let dir = f.dir.join("state");
    fs::create_dir_all(&dir).unwrap();
    // What v1 saved when it activated v2 in slot B.
    let p = state::Persisted {
        state: State::Ready,
        available: vec!["0.2.0".into()],
        staged: Some(state::Staged { slot: Slot::B, version: "0.2.0".into() }),
        activated: Some(state::Activated {
            slot: Slot::B,
            version: "0.2.0".into(),
            from_version: "0.1.0".into(),
        }),
        ..Default::default()
    };
    state::save(&dir, &p).unwrap();
    let mut bc = Disk { path: f.disk.clone(), sector: 512 }.boot_control();
    bc.set_state(Slot::B, SlotState { priority: 2, tries: 0, successful: false }).unwrap();
    // Slot A holds v1 (its slot.toml, for the rollback at the end).
    let v1_boot = fs::read(f.slot("0.1.0", "x86_64", 13).join("boot.img")).unwrap();
    let (off, _) = Disk { path: f.disk.clone(), sector: 512 }.region(Slot::A, "BOOT").unwrap();
    let disk = fs::OpenOptions::new().write(true).open(&f.disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&disk, &v1_boot, off).unwrap();
    let good_a = f.slot_state(Slot::A);
    assert!(good_a.bootable() && good_a.successful);
    let u = f.updater_with(|c| {
        c.active = Slot::B;
        c.on_trial = true;
        c.version = "0.2.0".parse().unwrap();
    });

    let none = UpdateSettings::default();
    for cmd in [Command::Deactivate, Command::Activate, Command::Prepare] {
        let e = u.command(cmd, &none).unwrap_err();
        assert_eq!(e.status(), 409, "{cmd:?}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("slot A") && msg.contains("/actions/rollback"), "{cmd:?}: {msg}");
        assert_eq!(f.slot_state(Slot::A), good_a, "{cmd:?} touched the fallback slot");
    }
    assert!(u
        .command(Command::Deactivate, &none)
        .unwrap_err()
        .to_string()
        .contains("no activated update to cancel"));

    let st = u.status();
    assert_eq!(st["update_state"], "Idle", "nothing is staged or activated on the trial boot: {st}");
    assert_eq!(st["active_partition"]["on_trial"], true);
    assert!(st["note"].as_str().unwrap().contains("on trial"), "{st}");
    // Once the boot is healthy the update is complete, and the other slot is fair game.
    u.boot_succeeded();
    let st = u.status();
    assert_eq!(st["active_partition"]["on_trial"], false);
    assert_eq!(st["last_update"]["to"], "0.2.0");
    assert_eq!(
        u.command(Command::Deactivate, &none).unwrap_err(),
        check(Command::Deactivate, State::Idle).unwrap_err()
    );
    // What the refusal suggested works: A boots next.
    u.command(Command::Rollback, &none).unwrap();
    let (a, b) = (f.slot_state(Slot::A), f.slot_state(Slot::B));
    assert_eq!(crate::bootctl::choose(a, b), Some(Slot::A), "{a:?} {b:?}");
}

/// Lowering `max_version` below a staged version (or removing its entry) withdraws it: the
/// next refresh drops it from Staged, and activate refuses it.
#[test]
fn a_withdrawn_version_is_dropped_at_refresh_and_never_activated() {
    let f = Fixture::new("withdrawn");
    f.add(&f.slot("0.2.0", "x86_64", 11), &[]);
    let srv = Server::start(&f.repo);
    let s = settings(srv.1);
    let u = f.updater();
    let stage = |u: &Updater| {
        u.run(Command::Refresh, &s);
        u.run(Command::Prepare, &s);
        assert_eq!(state(u), "Staged", "{:?}", last(u));
    };
    stage(&u);
    let keys = f.keys.to_str().unwrap();
    let repo = f.repo.to_str().unwrap();
    let set_max = |v: &str| {
        repo_tool(&[
            "set-max-version",
            "--keys",
            keys,
            "--repo",
            repo,
            "--variant",
            "qemu",
            "--arch",
            "x86_64",
            v,
        ])
    };
    set_max("0.1.0");
    u.run(Command::Refresh, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
    let st = u.status();
    assert_eq!(st["update_state"], "Idle", "{st}");
    assert!(st["note"].as_str().unwrap().contains("0.2.0 (staged in slot B) was withdrawn"), "{st}");
    assert!(last(&u).1.contains("withdrawn"), "{:?}", last(&u));
    assert_eq!(st["staging_partition"]["image"], Value::Null);
    assert!(!f.slot_state(Slot::B).bootable());
    assert_eq!(u.command(Command::Activate, &s).unwrap_err().status(), 409);
    assert!(!f.slot_state(Slot::B).bootable());

    // Offered again, staged again, then its entry removed from the manifest.
    set_max("0.2.0");
    stage(&u);
    let manifest = f.repo.join("src/manifest.json");
    let mut m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    m.updates.clear();
    fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    repo_tool(&["sign", "--keys", keys, "--repo", repo]);
    u.run(Command::Refresh, &s);
    assert_eq!(state(&u), "Idle");
    assert!(u.status()["note"].as_str().unwrap().contains("withdrawn"));

    // Activate itself checks too: a state whose last refresh did not offer the staged version
    // (as if saved before the drop above) is refused.
    let dir = f.dir.join("state");
    let mut p = state::load(&dir);
    p.state = State::Staged;
    p.staged = Some(state::Staged { slot: Slot::B, version: "0.2.0".into() });
    p.available = vec!["0.1.0".into()];
    state::save(&dir, &p).unwrap();
    drop(u);
    let u = f.updater();
    assert_eq!(state(&u), "Staged");
    let e = u.command(Command::Activate, &s).unwrap_err();
    assert!(matches!(e, Error::Withdrawn(_)), "{e:?}");
    assert!(!f.slot_state(Slot::B).bootable());
}

/// `POST /actions/cancel-update` stops a running prepare at its next chunk: the prepare ends
/// as Failed (cancelled), the slot it was writing stays unbootable, and it can be run again.
#[test]
fn a_running_prepare_can_be_cancelled() {
    let f = Fixture::new("cancel");
    f.add(&f.slot("0.2.0", "x86_64", 12), &[]);
    // 200 kB/s: the images take about 15 s, so the cancel lands mid-write.
    let srv = Server::start_with(&f.repo, &["--rate", "200000"]);
    let s = settings(srv.1);
    let u = f.updater();
    u.spawn().unwrap();
    assert_eq!(u.cancel(CANCEL_WAIT).unwrap_err().status(), 409, "nothing to cancel yet");
    u.run(Command::Refresh, &s);
    assert!(u.command(Command::Prepare, &s).unwrap(), "prepare runs in the updater thread");
    let t0 = std::time::Instant::now();
    while u.progress()["bytes_done"].as_u64().unwrap_or(0) < 100_000 {
        assert!(t0.elapsed().as_secs() < 60, "no progress: {}", u.progress());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(u.cancel(CANCEL_WAIT).unwrap(), "the prepare stopped within {CANCEL_WAIT:?}");
    let st = u.status();
    let rec = &st["most_recent_command"];
    assert_eq!(
        (rec["cmd_type"].as_str(), rec["cmd_status"].as_str()),
        (Some("prepare"), Some("Failed")),
        "{st}"
    );
    assert!(rec["stderr"].as_str().unwrap().contains("cancelled"), "{st}");
    assert!(st["note"].as_str().unwrap().contains("slot B is left unbootable"), "{st}");
    assert_eq!(st["update_state"], "Available");
    assert!(!f.slot_state(Slot::B).bootable());
    assert_eq!(u.cancel(CANCEL_WAIT).unwrap_err().status(), 409, "nothing left to cancel");
    // A new prepare is not cancelled by the old request.
    srv.control("drop?after=0&times=0");
    let fast = Server::start(&f.repo);
    let s = settings(fast.1);
    u.run(Command::Prepare, &s);
    assert_eq!(last(&u).0, "Success", "{:?}", last(&u));
    assert_eq!(state(&u), "Staged");
}

#[path = "../../tests/common/shape.rs"]
mod shape;

/// `/updates/status` as Bottlerocket's update operator (brupop's agent) parses it: these fields
/// required with these types, `most_recent_command` never null, versions semver, unknown
/// fields ignored.
mod operator {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    pub enum UpdateState {
        Idle,
        Available,
        Staged,
        Ready,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    pub enum CmdType {
        Refresh,
        Prepare,
        Activate,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    pub enum CmdStatus {
        Success,
        Failed,
        Unknown,
    }

    /// A semver version, as the operator's `semver::Version` takes it (Berth's are X.Y.Z).
    #[derive(Debug, PartialEq)]
    pub struct SemVer(pub String);

    impl<'de> Deserialize<'de> for SemVer {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SemVer, D::Error> {
            let s = String::deserialize(d)?;
            s.parse::<crate::update::manifest::Version>().map_err(serde::de::Error::custom)?;
            Ok(SemVer(s))
        }
    }

    #[derive(Debug, Deserialize)]
    pub struct Image {
        pub arch: String,
        pub version: SemVer,
        pub variant: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct Partition {
        pub image: Option<Image>,
        pub next_to_boot: bool,
    }

    #[derive(Debug, Deserialize)]
    pub struct Command {
        pub cmd_type: CmdType,
        pub cmd_status: CmdStatus,
        pub timestamp: String,
        pub exit_status: u32,
        pub stderr: String,
    }

    #[derive(Debug, Deserialize)]
    pub struct UpdateStatus {
        pub update_state: UpdateState,
        pub available_updates: Vec<SemVer>,
        pub chosen_update: Option<Image>,
        pub active_partition: Option<Partition>,
        pub staging_partition: Option<Partition>,
        pub most_recent_command: Command,
    }
}

/// Bottlerocket's contract for `/updates/status` and the updater's refusals: 404 before the
/// first command; while a prepare runs, the status and every command answer 423 (a second
/// prepare among them), and how far it is shows in `progress()`; activate from Idle is 409;
/// after activate the status has the documented shape and parses as the operator parses it.
#[test]
fn the_status_and_refusals_follow_bottlerocket() {
    let f = Fixture::new("contract");
    f.add(&f.slot("0.2.0", "x86_64", 21), &[]);
    // 200 kB/s: the images take about 15 s to write, long enough to be seen running.
    let srv = Server::start_with(&f.repo, &["--rate", "200000"]);
    let s = settings(srv.1);
    let u = f.updater();
    u.spawn().unwrap();
    let e = u.api_status().unwrap_err();
    assert_eq!(e.status(), 404, "{e}");
    assert!(e.to_string().contains("refresh-updates"), "{e}");
    let e = u.command(Command::Activate, &s).unwrap_err();
    assert_eq!(e.status(), 409, "activate from Idle: {e}");
    assert!(e.to_string().contains("state Idle"), "{e}");
    assert!(u.api_status().is_err(), "a refusal writes no record");

    u.run(Command::Refresh, &s);
    assert_eq!(u.api_status().unwrap()["update_state"], "Available");
    assert!(u.command(Command::Prepare, &s).unwrap());
    assert_eq!(u.progress()["running"], "prepare");
    for cmd in [Command::Prepare, Command::Refresh, Command::Activate, Command::Deactivate] {
        let e = u.command(cmd, &s).unwrap_err();
        assert_eq!(e.status(), 423, "{cmd:?} while a prepare runs: {e}");
        assert!(e.to_string().contains("prepare is running"), "{e}");
    }
    assert_eq!(u.api_status().unwrap_err().status(), 423, "status while a prepare runs");
    let t0 = std::time::Instant::now();
    while u.progress()["running"] == "prepare" {
        assert!(t0.elapsed().as_secs() < 120, "prepare still running: {}", u.progress());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = u.api_status().unwrap();
    assert_eq!(
        (st["update_state"].as_str(), st["most_recent_command"]["cmd_type"].as_str()),
        (Some("Staged"), Some("prepare"))
    );
    assert_eq!(
        u.progress(),
        serde_json::json!({"running": null, "phase": "", "bytes_done": 0, "bytes_total": 0, "cancel_requested": false})
    );
    // Prepare again over the staged update, as Bottlerocket allows.
    u.run(Command::Prepare, &s);
    assert_eq!((last(&u).0.as_str(), state(&u)), ("Success", Value::from("Staged")), "{:?}", last(&u));
    assert!(!u.command(Command::Activate, &s).unwrap(), "activate runs before the answer");

    let st = u.api_status().unwrap();
    let fixture: Value =
        serde_json::from_str(include_str!("../../tests/data/bottlerocket/update-status.json")).unwrap();
    let m = shape::mismatches(&fixture, &st, &[]);
    assert!(m.is_empty(), "{m:?}\n{st:#}");
    let parsed: operator::UpdateStatus =
        serde_json::from_value(st.clone()).unwrap_or_else(|e| panic!("{e}: {st:#}"));
    assert_eq!(parsed.update_state, operator::UpdateState::Ready);
    assert_eq!(parsed.most_recent_command.cmd_type, operator::CmdType::Activate);
    assert_eq!(parsed.most_recent_command.cmd_status, operator::CmdStatus::Success);
    assert_eq!((parsed.most_recent_command.exit_status, parsed.most_recent_command.stderr.as_str()), (0, ""));
    assert!(parsed.most_recent_command.timestamp.parse::<jiff::Timestamp>().is_ok());
    assert_eq!(parsed.chosen_update.unwrap().version, operator::SemVer("0.2.0".into()));
    let (active, staging) = (parsed.active_partition.unwrap(), parsed.staging_partition.unwrap());
    assert_eq!(active.image.unwrap().version, operator::SemVer("0.1.0".into()));
    assert!(!active.next_to_boot && staging.next_to_boot, "B boots next after activate");
    let staged = staging.image.unwrap();
    assert_eq!(
        (staged.version.0.as_str(), staged.arch.as_str(), staged.variant.as_str()),
        ("0.2.0", "x86_64", "qemu")
    );
    assert_eq!(parsed.available_updates, [operator::SemVer("0.2.0".into())]);
    // A failed command is a record the operator parses too: Failed, exit status 1, its error.
    let e = u.command(Command::Prepare, &s).unwrap_err();
    assert_eq!(e.status(), 409, "prepare in Ready: {e}");
    drop(srv);
    u.run(Command::Refresh, &s);
    let st = u.api_status().unwrap();
    let parsed: operator::UpdateStatus =
        serde_json::from_value(st.clone()).unwrap_or_else(|e| panic!("{e}: {st:#}"));
    assert_eq!(parsed.most_recent_command.cmd_status, operator::CmdStatus::Failed, "{st:#}");
    assert_eq!(parsed.most_recent_command.exit_status, 1);
    assert!(!parsed.most_recent_command.stderr.is_empty());
    assert_eq!(parsed.update_state, operator::UpdateState::Ready, "a failed refresh keeps Ready");
}
