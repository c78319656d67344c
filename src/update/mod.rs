//! A/B updates from a signed TUF repository (see docs/updates.md).
//!
//! The [`Updater`] owns the update state machine, Idle → Available → Staged → Ready:
//! - refresh: load the repository (tough: signatures, expiry, rollback of metadata versions)
//!   and pick an update from `manifest.json` by Bottlerocket's rules ([`manifest`]);
//! - prepare: write the chosen version's images into the inactive slot while tough checks
//!   their hashes, then check what landed (slot metadata, dm-verity root hash and tree);
//! - activate: give the inactive slot priority above the active one with one try;
//! - deactivate: take that back.
//!
//! The active slot's partitions are never opened for writing. The state lives in an atomic
//! file on PRIVATE, so it survives restarts and power cuts: an interrupted write leaves the
//! inactive slot unbootable and the state back at Available. Long commands (refresh, prepare)
//! run in the updater's own thread, tough on a current-thread tokio runtime.

pub mod manifest;
pub mod repo;
mod stage;
mod state;
#[cfg(test)]
mod tests;
pub mod transport;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{error, info, warn};
use serde_json::{json, Value};

use crate::bootctl::{BootControl, GptBootControl, Slot, SlotState};
use crate::settings::model::Updates as UpdateSettings;
use manifest::{Choice, Manifest, Policy, Version};
pub use state::State;
use state::{Activated, Applied, CommandRecord, Persisted, Rollback, Staged, UpdateInfo};

/// The trusted root metadata, part of the verified root filesystem.
pub const TRUSTED_ROOT: &str = "/usr/share/berth/updates/root.json";
/// Release facts of the running root filesystem (version, build time).
pub const RELEASE: &str = "/usr/share/berth/release.toml";
/// The last clock reading taken while NTP-synchronised, in the state directory (a floor).
const TRUSTED_TIME: &str = "trusted-time.json";

/// An updater command (`POST /actions/...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Refresh,
    Prepare,
    Activate,
    Deactivate,
    Rollback,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Refresh => "refresh",
            Command::Prepare => "prepare",
            Command::Activate => "activate",
            Command::Deactivate => "deactivate",
            Command::Rollback => "rollback",
        }
    }

    /// Whether the command runs in the updater thread (the API answers 202 and the client
    /// polls `/updates/status`) rather than before the API answers.
    pub fn is_long(self) -> bool {
        matches!(self, Command::Refresh | Command::Prepare)
    }

    /// The states the command may start from (for messages; [`check`] decides).
    fn allowed_from(self) -> &'static [State] {
        match self {
            Command::Refresh => &[State::Idle, State::Available, State::Staged],
            Command::Prepare => &[State::Available],
            Command::Activate => &[State::Staged],
            Command::Deactivate => &[State::Ready],
            Command::Rollback => &[State::Idle, State::Available, State::Staged],
        }
    }
}

/// Why a command was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not allowed in the current state, or nothing to act on (HTTP 409).
    Conflict(String),
    /// The updater thread is gone (HTTP 503).
    Unavailable(String),
    /// The command ran and failed: settings, repository, network, disk (HTTP 500).
    Failed(String),
}

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::Conflict(_) => 409,
            Error::Unavailable(_) => 503,
            Error::Failed(_) => 500,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Conflict(m) | Error::Unavailable(m) | Error::Failed(m) => f.write_str(m),
        }
    }
}

impl From<String> for Error {
    fn from(m: String) -> Error {
        Error::Failed(m)
    }
}

impl From<&str> for Error {
    fn from(m: &str) -> Error {
        Error::Failed(m.into())
    }
}

/// The whole disk holding both slots, with its GPT (a block device in Berth, an image file
/// in tests); slots' partitions are addressed by their offsets in it.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub sector: u64,
}

impl Disk {
    /// Byte offset and length of slot `slot`'s `kind` (BOOT, ROOT, HASH) partition.
    pub fn region(&self, slot: Slot, kind: &str) -> Result<(u64, u64), String> {
        let mut f = fs::File::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let gpt = crate::disk::gpt::Gpt::read(&mut f, self.sector)
            .map_err(|e| format!("partition table of {}: {e}", self.path.display()))?;
        let label = slot.label(kind);
        let p = gpt.by_name(&label).ok_or_else(|| format!("no partition labelled {label}"))?;
        Ok((p.first_lba * self.sector, p.size_bytes(self.sector)))
    }

    pub fn boot_control(&self) -> GptBootControl {
        GptBootControl::new(&self.path, self.sector)
    }
}

/// Reads `slot.toml` of a slot from the disk as it is now.
pub type ReadSlotMeta = Box<dyn Fn(&Disk, Slot) -> Result<String, String> + Send + Sync>;

/// What the updater needs from the system it runs on.
pub struct Config {
    /// Update state and tough's datastore (on PRIVATE).
    pub state_dir: PathBuf,
    pub trusted_root: PathBuf,
    pub disk: Disk,
    pub active: Slot,
    /// The running slot was booted on trial (not yet marked successful).
    pub on_trial: bool,
    pub variant: String,
    pub arch: String,
    pub version: Version,
    /// The clock never goes below this (the image's build time) when checking expiry.
    pub clock_floor: Option<jiff::Timestamp>,
    /// The system clock, read and stepped to its floor ([`crate::time::SystemClock`] in PID 1).
    pub clock: Arc<dyn crate::time::Clock>,
    /// Read `slot.toml` from a slot's BOOT partition as it is on the disk now.
    pub read_slot_meta: ReadSlotMeta,
}

impl Config {
    fn inactive(&self) -> Slot {
        match self.active {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// Progress of a running prepare, for `/updates/status`.
#[derive(Default)]
pub struct Progress {
    pub phase: Mutex<String>,
    pub done: AtomicU64,
    pub total: AtomicU64,
}

struct Shared {
    p: Persisted,
    running: Option<Command>,
}

pub struct Updater {
    cfg: Config,
    shared: Mutex<Shared>,
    progress: Progress,
    tx: Mutex<Option<mpsc::Sender<(Command, UpdateSettings)>>>,
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

impl Updater {
    /// Load the persisted state and reconcile it with boot control: finish an update whose
    /// new version booted, notice one that rolled back, and clean up an interrupted write.
    pub fn new(cfg: Config) -> Arc<Updater> {
        fs::create_dir_all(cfg.state_dir.join("tuf")).unwrap_or_else(|e| warn!("updates state dir: {e}"));
        let p = state::load(&cfg.state_dir);
        let u = Updater {
            cfg,
            shared: Mutex::new(Shared { p, running: None }),
            progress: Progress::default(),
            tx: Mutex::new(None),
        };
        u.reconcile();
        Arc::new(u)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write the state; called with the lock held, so saves land in the order of the changes.
    fn save(&self, p: &Persisted) {
        if let Err(e) = state::save(&self.cfg.state_dir, p) {
            error!("saving update state: {e}");
        }
    }

    fn reconcile(&self) {
        let mut sh = self.lock();
        let p = &mut sh.p;
        let mut bc = self.cfg.disk.boot_control();
        let inactive = self.cfg.inactive();
        if let Some(slot) = p.writing.take() {
            warn!("a prepare was interrupted while writing slot {slot}; it stays unbootable");
            let _ = bc.set_state(slot, SlotState::default());
            p.staged = None;
            p.state = if p.chosen.is_some() { State::Available } else { State::Idle };
            p.note = Some(format!(
                "writing slot {slot} was interrupted (restart or power cut); the slot is unbootable until an update is prepared again"
            ));
        }
        if let Some(a) = p.activated.clone() {
            if a.slot == self.cfg.active {
                if !self.cfg.on_trial {
                    finish_update(p, &a);
                }
            } else {
                match bc.state(a.slot) {
                    Ok(st) if st.priority > 0 && !st.successful && st.tries == 0 => {
                        error!(
                            "update to {} in slot {} failed to boot; running {} again",
                            a.version, a.slot, a.from_version
                        );
                        let _ = bc.set_state(a.slot, SlotState::default());
                        p.last_rollback = Some(Rollback {
                            failed_version: a.version.clone(),
                            failed_slot: a.slot,
                            running_version: self.cfg.version.to_string(),
                            detected_at: now().to_string(),
                            automatic: true,
                        });
                        p.activated = None;
                        p.staged = None;
                        p.chosen = None;
                        p.state = State::Idle;
                        p.note = Some(format!(
                            "version {} did not boot to healthy in slot {}; rolled back to {}",
                            a.version, a.slot, self.cfg.version
                        ));
                    }
                    Ok(st) if st.priority == 0 => {
                        // The flip never reached the disk.
                        p.activated = None;
                        p.state = if p.staged.is_some() { State::Staged } else { State::Idle };
                    }
                    _ => {}
                }
            }
        }
        // A staged slot must still be the inactive one and unbooted.
        if p.state == State::Staged && p.staged.as_ref().is_some_and(|s| s.slot != inactive) {
            p.staged = None;
            p.state = State::Idle;
        }
        self.save(&sh.p);
    }

    /// Called once the running boot was marked successful.
    pub fn boot_succeeded(&self) {
        let mut sh = self.lock();
        if let Some(a) = sh.p.activated.clone() {
            if a.slot == self.cfg.active {
                finish_update(&mut sh.p, &a);
                info!("update to {} complete", a.version);
                self.save(&sh.p);
            }
        }
    }

    /// Start the updater thread; commands sent through [`Updater::command`] run there.
    pub fn spawn(self: &Arc<Updater>) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<(Command, UpdateSettings)>();
        let me = self.clone();
        std::thread::Builder::new().name("updater".into()).spawn(move || {
            for (cmd, settings) in rx {
                me.run(cmd, &settings);
            }
        })?;
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(())
    }

    /// Accept `cmd` if the state allows it: long commands are handed to the updater thread
    /// (Ok(true): accepted, still running), short ones are carried out now (Ok(false)).
    pub fn command(&self, cmd: Command, settings: &UpdateSettings) -> Result<bool, Error> {
        {
            let mut sh = self.lock();
            if let Some(r) = sh.running {
                return Err(Error::Conflict(format!("a {} is in progress; wait for it to finish", r.name())));
            }
            check(cmd, sh.p.state)?;
            sh.running = Some(cmd);
            sh.p.most_recent_command = Some(CommandRecord::running(cmd.name()));
        }
        if cmd.is_long() {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(tx) = tx {
                if tx.send((cmd, settings.clone())).is_ok() {
                    return Ok(true);
                }
            }
            self.lock().running = None;
            return Err(Error::Unavailable("the updater thread is not running".into()));
        }
        self.execute(cmd, settings).map(|()| false)
    }

    /// Run `cmd` now, in this thread (the updater thread, or tests).
    pub fn run(&self, cmd: Command, settings: &UpdateSettings) {
        if let Err(e) = self.execute(cmd, settings) {
            error!("update {}: {e}", cmd.name());
        }
    }

    fn execute(&self, cmd: Command, settings: &UpdateSettings) -> Result<(), Error> {
        {
            let mut sh = self.lock();
            sh.running = Some(cmd);
            sh.p.most_recent_command = Some(CommandRecord::running(cmd.name()));
        }
        // A panic must not leave the updater "running" forever: it becomes this command's error.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cmd {
            Command::Refresh => self.refresh(settings),
            Command::Prepare => self.prepare(settings),
            Command::Activate => self.activate(),
            Command::Deactivate => self.deactivate(),
            Command::Rollback => self.rollback(),
        }))
        .unwrap_or_else(|_| Err(Error::Failed("internal error (a panic; see the console log)".into())));
        let mut sh = self.lock();
        sh.running = None;
        sh.p.most_recent_command =
            Some(CommandRecord::finished(cmd.name(), &result.clone().map_err(|e| e.to_string())));
        self.save(&sh.p);
        drop(sh);
        match &result {
            Ok(msg) => info!("update {}: {msg}", cmd.name()),
            Err(e) => error!("update {} failed: {e}", cmd.name()),
        }
        result.map(drop)
    }

    fn policy(&self, s: &UpdateSettings) -> Result<Policy, Error> {
        let version_lock = match s.version_lock.as_deref().map(str::trim) {
            None | Some("") | Some("latest") => None,
            Some(v) => {
                Some(v.parse().map_err(|e| Error::Conflict(format!("settings.updates.version-lock: {e}")))?)
            }
        };
        let seed = s.seed.unwrap_or(0);
        if seed > manifest::MAX_SEED {
            return Err(Error::Conflict(format!(
                "settings.updates.seed {seed} is above {}",
                manifest::MAX_SEED
            )));
        }
        Ok(Policy {
            variant: self.cfg.variant.clone(),
            arch: self.cfg.arch.clone(),
            current: self.cfg.version,
            version_lock,
            seed,
            ignore_waves: s.ignore_waves.unwrap_or(false),
        })
    }

    fn open_repo(&self, s: &UpdateSettings) -> Result<(stage::Repo, Manifest), Error> {
        let md = s.metadata_base_url.as_deref().filter(|u| !u.is_empty());
        let tg = s.targets_base_url.as_deref().filter(|u| !u.is_empty());
        let (Some(md), Some(tg)) = (md, tg) else {
            return Err(Error::Conflict(
                "no update repository configured: set settings.updates.metadata-base-url and \
                 settings.updates.targets-base-url"
                    .into(),
            ));
        };
        self.clock_floor();
        let repo = stage::Repo::load(&self.cfg.trusted_root, &self.cfg.state_dir.join("tuf"), md, tg)?;
        let manifest = repo.manifest()?;
        Ok((repo, manifest))
    }

    /// Keep the clock at or above a floor that is a lower bound of the true time, and keep
    /// tough's own record of the clock from stopping it (the rule and its reasons:
    /// [`crate::time::floor`], docs/updates.md "Clock policy"). A machine without an RTC boots
    /// in 1970; expiry is then judged against the floor rather than against 1970.
    fn clock_floor(&self) {
        use crate::time::floor;
        let read = |p: &Path| {
            fs::read(p)
                .ok()
                .and_then(|b| serde_json::from_slice::<String>(&b).ok())
                .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        };
        let recorded_path = self.cfg.state_dir.join("tuf/latest_known_time.json");
        let trusted_path = self.cfg.state_dir.join(TRUSTED_TIME);
        let clock = &self.cfg.clock;
        let inputs = floor::Inputs {
            now: clock.now(),
            build: self.cfg.clock_floor,
            trusted: read(&trusted_path),
            recorded: read(&recorded_path),
            sync_error: clock.sync_error(),
        };
        let d = floor::decide(&inputs);
        if let Some(to) = d.step_to {
            warn!(
                "the clock reads {}, before {to}, a time known to have passed; stepping it forward",
                inputs.now
            );
            if let Err(e) = clock.set(to) {
                error!("setting the clock: {e}");
            }
        }
        if d.forget_recorded {
            warn!(
                "tough's latest known time {} is ahead of the clock ({}); it came from a clock that ran ahead, forgetting it",
                inputs.recorded.map(|t| t.to_string()).unwrap_or_default(),
                clock.now()
            );
            if let Err(e) = fs::remove_file(&recorded_path) {
                error!("{}: {e}", recorded_path.display());
            }
        }
        if let Some(t) = d.trust {
            let text = serde_json::to_vec(&t.to_string()).expect("a string serializes");
            if let Err(e) = crate::settings::store::write_atomic(&trusted_path, &text) {
                error!("recording the synchronised time: {e}");
            }
        }
    }

    fn refresh(&self, s: &UpdateSettings) -> Result<String, Error> {
        let policy = self.policy(s)?;
        let (_repo, manifest) = self.open_repo(s)?;
        let available: Vec<String> = manifest
            .for_host(&policy.variant, &policy.arch)
            .iter()
            .filter(|u| u.version <= u.max_version)
            .map(|u| u.version.to_string())
            .collect();
        let choice = manifest.choose(&policy, now());
        let mut sh = self.lock();
        let p = &mut sh.p;
        p.available = available;
        p.last_refresh = Some(now().to_string());
        let msg = match choice {
            Choice::Update(u, why) => {
                p.chosen = Some(UpdateInfo::of(u));
                if p.state == State::Idle {
                    p.state = State::Available;
                }
                format!("{} chosen ({why})", u.version)
            }
            Choice::None(why) => {
                p.chosen = None;
                if p.state == State::Available {
                    p.state = State::Idle;
                }
                why
            }
        };
        Ok(msg)
    }

    fn prepare(&self, s: &UpdateSettings) -> Result<String, Error> {
        let policy = self.policy(s)?;
        let (repo, manifest) = self.open_repo(s)?;
        let update = match manifest.choose(&policy, now()) {
            Choice::Update(u, _) => u.clone(),
            Choice::None(why) => {
                let mut sh = self.lock();
                sh.p.chosen = None;
                sh.p.state = State::Idle;
                return Err(Error::Conflict(format!("no update to prepare: {why}")));
            }
        };
        let slot = self.cfg.inactive();
        // From here the inactive slot is unbootable until the write is complete and checked.
        let mut bc = self.cfg.disk.boot_control();
        bc.set_state(slot, SlotState::default()).map_err(|e| e.to_string())?;
        {
            let mut sh = self.lock();
            sh.p.chosen = Some(UpdateInfo::of(&update));
            sh.p.writing = Some(slot);
            sh.p.staged = None;
            sh.p.note = None;
            self.save(&sh.p);
        }
        let result = stage::write_slot(&repo, &update, &self.cfg, slot, &self.progress);
        let mut sh = self.lock();
        sh.p.writing = None;
        *self.progress.phase.lock().unwrap_or_else(|e| e.into_inner()) = String::new();
        match result {
            Ok(report) => {
                sh.p.staged = Some(Staged { slot, version: update.version.to_string() });
                sh.p.state = State::Staged;
                Ok(format!("{} staged in slot {slot}: {report}", update.version))
            }
            Err(e) => {
                sh.p.state = State::Available;
                Err(Error::Failed(format!(
                    "preparing {} in slot {slot}: {e} (slot {slot} left unbootable; the running slot {} is untouched)",
                    update.version, self.cfg.active
                )))
            }
        }
    }

    fn activate(&self) -> Result<String, Error> {
        let slot = self.cfg.inactive();
        let staged = self.lock().p.staged.clone().ok_or(Error::Conflict("nothing is staged".into()))?;
        let mut bc = self.cfg.disk.boot_control();
        let bce = |e: crate::bootctl::Error| e.to_string();
        let mut active = bc.state(self.cfg.active).map_err(bce)?;
        if active.priority >= 15 {
            active.priority = 14;
            bc.set_state(self.cfg.active, active).map_err(bce)?;
        }
        {
            let mut sh = self.lock();
            sh.p.activated = Some(Activated {
                slot,
                version: staged.version.clone(),
                from_version: self.cfg.version.to_string(),
            });
            sh.p.state = State::Ready;
            self.save(&sh.p);
        }
        let trial = SlotState { priority: active.priority.max(1) + 1, tries: 1, successful: false };
        if let Err(e) = bc.set_state(slot, trial) {
            let mut sh = self.lock();
            sh.p.activated = None;
            sh.p.state = State::Staged;
            return Err(Error::Failed(e.to_string()));
        }
        Ok(format!("slot {slot} ({}) boots next, on trial", staged.version))
    }

    fn deactivate(&self) -> Result<String, Error> {
        let slot = self.cfg.inactive();
        self.cfg.disk.boot_control().set_state(slot, SlotState::default()).map_err(|e| e.to_string())?;
        let mut sh = self.lock();
        sh.p.activated = None;
        sh.p.state = State::Staged;
        Ok(format!("slot {slot} no longer boots next"))
    }

    fn rollback(&self) -> Result<String, Error> {
        let other = self.cfg.inactive();
        let mut bc = self.cfg.disk.boot_control();
        let bce = |e: crate::bootctl::Error| e.to_string();
        let st = bc.state(other).map_err(bce)?;
        if !(st.successful && st.priority > 0) {
            return Err(Error::Conflict(format!(
                "slot {other} holds no version that booted successfully (state {st:?}); nothing to roll back to"
            )));
        }
        let version = (self.cfg.read_slot_meta)(&self.cfg.disk, other)
            .and_then(|t| crate::bootctl::SlotMeta::parse(&t))
            .map(|m| m.version)
            .map_err(|e| Error::Conflict(format!("slot {other} is not readable: {e}")))?;
        let active = bc.state(self.cfg.active).map_err(bce)?;
        let mut active_lowered = active;
        if active.priority >= 15 {
            active_lowered.priority = 14;
            bc.set_state(self.cfg.active, active_lowered).map_err(bce)?;
        }
        bc.set_state(other, SlotState { priority: active_lowered.priority.max(1) + 1, ..st }).map_err(bce)?;
        let mut sh = self.lock();
        sh.p.last_rollback = Some(Rollback {
            failed_version: self.cfg.version.to_string(),
            failed_slot: self.cfg.active,
            running_version: version.clone(),
            detected_at: now().to_string(),
            automatic: false,
        });
        sh.p.staged = None;
        sh.p.activated = None;
        sh.p.chosen = None;
        sh.p.state = State::Idle;
        Ok(format!("slot {other} ({version}) boots next; reboot to roll back"))
    }

    /// `GET /updates/status`.
    pub fn status(&self) -> Value {
        let sh = self.lock();
        let p = &sh.p;
        let mut bc = self.cfg.disk.boot_control();
        let slot_json = |slot: Slot, bc: &mut GptBootControl| {
            let st = bc.state(slot).ok();
            json!({"slot": slot.letter(), "priority": st.map(|s| s.priority),
                   "tries": st.map(|s| s.tries), "successful": st.map(|s| s.successful),
                   "bootable": st.map(|s| s.bootable())})
        };
        let mut active = slot_json(self.cfg.active, &mut bc);
        active["version"] = json!(self.cfg.version.to_string());
        active["variant"] = json!(self.cfg.variant);
        active["arch"] = json!(self.cfg.arch);
        active["on_trial"] = json!(self.cfg.on_trial);
        let mut staging = slot_json(self.cfg.inactive(), &mut bc);
        staging["version"] = json!(p.staged.as_ref().map(|s| s.version.clone()));
        let progress = sh.running.filter(|c| *c == Command::Prepare).map(|_| {
            json!({"phase": self.progress.phase.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                   "bytes_done": self.progress.done.load(Ordering::Relaxed),
                   "bytes_total": self.progress.total.load(Ordering::Relaxed)})
        });
        json!({
            "update_state": p.state,
            "available_updates": p.available,
            "chosen_update": p.chosen,
            "active_partition": active,
            "staging_partition": staging,
            "most_recent_command": p.most_recent_command,
            "progress": progress,
            "last_refresh": p.last_refresh,
            "last_update": p.last_update,
            "last_rollback": p.last_rollback,
            "note": p.note,
        })
    }
}

fn finish_update(p: &mut Persisted, a: &Activated) {
    p.last_update =
        Some(Applied { from: a.from_version.clone(), to: a.version.clone(), at: now().to_string() });
    p.activated = None;
    p.staged = None;
    p.chosen = None;
    p.available.clear();
    p.state = State::Idle;
    p.note = None;
}

/// Whether `cmd` may start in `state`: the state machine's table, refusals spelled out.
fn check(cmd: Command, state: State) -> Result<(), Error> {
    use Command::*;
    use State::*;
    match (cmd, state) {
        (Refresh, Idle | Available | Staged)
        | (Prepare, Available)
        | (Activate, Staged)
        | (Deactivate, Ready)
        | (Rollback, Idle | Available | Staged) => Ok(()),
        (Refresh | Prepare | Activate | Deactivate | Rollback, _) => {
            Err(Error::Conflict(not_allowed(cmd, state)))
        }
    }
}

fn not_allowed(cmd: Command, state: State) -> String {
    let hint = match (cmd, state) {
        (Command::Prepare, State::Idle) => "; refresh first (no update is chosen)",
        (Command::Prepare, State::Staged) | (Command::Prepare, State::Ready) => {
            "; an update is already staged"
        }
        (Command::Activate, State::Idle) | (Command::Activate, State::Available) => {
            "; prepare an update first"
        }
        (Command::Activate, State::Ready) => "; it is already active",
        (Command::Refresh, State::Ready) | (Command::Rollback, State::Ready) => {
            "; deactivate the update first"
        }
        _ => "",
    };
    let allowed: Vec<String> = cmd.allowed_from().iter().map(|s| format!("{s:?}")).collect();
    format!("{} is not allowed in state {state:?} (only in {}){hint}", cmd.name(), allowed.join(", "))
}

/// The running image's build time from [`RELEASE`] (`build-time = "RFC 3339"`).
pub fn build_time(release: &Path) -> Option<jiff::Timestamp> {
    let text = fs::read_to_string(release).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    v.get("build-time")?.as_str()?.parse().ok()
}
