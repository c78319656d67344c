//! A/B updates from a signed TUF repository (see docs/updates.md).
//!
//! The [`Updater`] owns the update state machine, Idle → Available → Staged → Ready:
//! - refresh: load the repository (tough: signatures, expiry, rollback of metadata versions)
//!   and pick an update from `manifest.json` by Bottlerocket's rules ([`manifest`]); a staged
//!   version the repository no longer offers (withdrawn) is dropped;
//! - prepare: write the chosen version's images into the inactive slot while tough checks
//!   their hashes, then check what landed (slot metadata, dm-verity root hash and tree);
//!   `cancel` stops it between two chunks, leaving the slot unbootable;
//! - activate: give the staged slot priority above the running one with one try;
//! - deactivate: take that back.
//!
//! Which slots it may touch: only the slot it staged (activate, deactivate) and the inactive
//! slot (prepare); never the running slot's partitions, and the running slot's state only to
//! lower its priority below the new one. While the running slot is on trial (booted, not yet
//! marked healthy), the other slot is the fallback boot control returns to, so prepare,
//! activate and deactivate are refused (409) until the boot is marked good.
//!
//! The API side follows Bottlerocket's contract (docs/compatibility.md), which its update
//! operator depends on: each refusal has its status ([`Error::status`]: 423 while another
//! command runs, 409 when the state does not allow the command, 404 when the update or staged
//! image it needs does not exist), `GET /updates/status` answers 423 while a command runs and
//! 404 before the first one ([`Updater::api_status`]), and the status has Bottlerocket's fields
//! (Berth's own are extra fields beside them). How far a running command is: [`Updater::progress`].
//!
//! The state lives in an atomic file on PRIVATE, so it survives restarts and power cuts; at
//! each start it is reconciled with boot control and with the slot that booted ([`Updater::new`]).
//! Long commands (refresh, prepare) run in the updater's own thread, tough on a current-thread
//! tokio runtime.
//!
//! The network path: each refresh and prepare reaches the repository through
//! `settings.network.https-proxy` (a CONNECT tunnel, `no-proxy` bypassing it;
//! [`crate::http::proxy`]) as the settings are when the command is given ([`Network`]), so a
//! settings change applies to the next command. A proxy the updater cannot use is that
//! command's error in `GET /updates/status`.

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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{error, info, warn};
use serde_json::{json, Value};

use crate::bootctl::{self, BootControl, GptBootControl, Slot, SlotState, Slots};
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

    /// The states the command may start from (for messages; [`check`] decides). As in
    /// Bottlerocket, refresh runs in any state (it only changes Idle and Available), and
    /// prepare may run again over a staged update.
    fn allowed_from(self) -> &'static [State] {
        match self {
            Command::Refresh => &[State::Idle, State::Available, State::Staged, State::Ready],
            Command::Prepare => &[State::Available, State::Staged],
            Command::Activate => &[State::Staged],
            Command::Deactivate => &[State::Ready],
            Command::Rollback => &[State::Idle, State::Available, State::Staged],
        }
    }
}

/// How the updater reaches its repository: `settings.network.https-proxy` and `no-proxy` as
/// they are when a command is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    pub https_proxy: Option<String>,
    pub no_proxy: Vec<String>,
}

impl Network {
    pub fn of(settings: &crate::settings::model::Settings) -> Network {
        let n = settings.network.clone().unwrap_or_default();
        Network { https_proxy: n.https_proxy, no_proxy: n.no_proxy.unwrap_or_default() }
    }

    /// The proxy, if one is set; an error names the setting.
    fn proxy(&self) -> Result<Option<crate::http::proxy::Proxy>, Error> {
        let Some(url) = self.https_proxy.as_deref().filter(|u| !u.is_empty()) else { return Ok(None) };
        crate::http::proxy::Proxy::new(url, &self.no_proxy)
            .map(Some)
            .map_err(|e| Error::Settings(format!("settings.network.https-proxy: {e}")))
    }
}

/// Why a command was refused or failed. Each kind has its HTTP status ([`Error::status`]),
/// Bottlerocket's where it has the same case; there is deliberately no conversion from a bare
/// string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not allowed in the current state (409).
    NotAllowed(String),
    /// Another command holds the updater (423 Locked, as Bottlerocket's update lock): also the
    /// answer of `GET /updates/status` while it runs.
    Busy(Command),
    /// The command would change the running slot, or the fallback slot while the running one
    /// is on trial (409).
    Protected(String),
    /// What the command needs does not exist: no update to prepare, nothing staged to
    /// activate, nothing activated to deactivate, no status yet (404).
    Missing(String),
    /// Nothing to act on in this state: no prepare running to cancel, no known-good slot to
    /// roll back to (409).
    Nothing(String),
    /// The settings do not allow it: no repository, a bad version lock or seed (409).
    Settings(String),
    /// The staged version is no longer offered by the repository (404: the update no longer
    /// exists).
    Withdrawn(String),
    /// The prepare was cancelled by `POST /actions/cancel-update` (409 if ever answered).
    Cancelled(String),
    /// The repository could not be reached, or was refused (500).
    Repository(String),
    /// Writing or checking the slot failed (500).
    Stage(String),
    /// Reading or writing boot control failed (500).
    BootControl(String),
    /// The updater thread is gone (503).
    Unavailable(String),
    /// A bug: a panic inside a command (500).
    Internal(String),
}

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::Busy(_) => 423,
            Error::Missing(_) | Error::Withdrawn(_) => 404,
            Error::NotAllowed(_)
            | Error::Protected(_)
            | Error::Nothing(_)
            | Error::Settings(_)
            | Error::Cancelled(_) => 409,
            Error::Unavailable(_) => 503,
            Error::Repository(_) | Error::Stage(_) | Error::BootControl(_) | Error::Internal(_) => 500,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Busy(c) => write!(
                f,
                "update command {} is running (GET /updates/progress shows how far it is); \
                 try again when it has finished",
                c.name()
            ),
            Error::BootControl(m) => write!(f, "boot control: {m}"),
            Error::NotAllowed(m)
            | Error::Protected(m)
            | Error::Missing(m)
            | Error::Nothing(m)
            | Error::Settings(m)
            | Error::Withdrawn(m)
            | Error::Cancelled(m)
            | Error::Repository(m)
            | Error::Stage(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => f.write_str(m),
        }
    }
}

impl From<bootctl::Error> for Error {
    fn from(e: bootctl::Error) -> Error {
        Error::BootControl(e.to_string())
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

/// Progress of a running prepare, for `/updates/status`, and its cancel switch.
#[derive(Default)]
pub struct Progress {
    pub phase: Mutex<String>,
    pub done: AtomicU64,
    pub total: AtomicU64,
    /// Set by [`Updater::cancel`]; the prepare checks it between chunks and stops.
    pub cancel: AtomicBool,
}

impl Progress {
    fn set_phase(&self, phase: &str) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.into();
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

struct Shared {
    p: Persisted,
    running: Option<Command>,
    /// The running slot is on trial: booted, not yet marked successful.
    on_trial: bool,
}

/// How long `POST /actions/cancel-update` waits for the prepare to stop before it answers
/// 202 instead (the prepare notices the cancel at its next chunk; a stalled download only
/// when the transport gives up on it).
pub const CANCEL_WAIT: Duration = Duration::from_secs(10);

pub struct Updater {
    cfg: Config,
    shared: Mutex<Shared>,
    /// Signalled whenever a command finishes.
    finished: Condvar,
    progress: Progress,
    tx: Mutex<Option<mpsc::Sender<(Command, UpdateSettings, Network)>>>,
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
        let on_trial = cfg.on_trial;
        let u = Updater {
            cfg,
            shared: Mutex::new(Shared { p, running: None, on_trial }),
            finished: Condvar::new(),
            progress: Progress::default(),
            tx: Mutex::new(None),
        };
        u.reconcile();
        Arc::new(u)
    }

    /// The updater's state. Lock order: this lock, then boot control's (which is only ever
    /// held inside one boot-control call), never the other way round.
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
        let on_trial = sh.on_trial;
        let p = &mut sh.p;
        let mut bc = self.cfg.disk.boot_control();
        let (active, inactive) = (self.cfg.active, self.cfg.inactive());
        if let Some(slot) = p.writing.take() {
            warn!("a prepare was interrupted while writing slot {slot}; it stays unbootable");
            if slot != active {
                let _ = bc.set_state(slot, SlotState::default());
            }
            p.staged = None;
            p.state = if p.chosen.is_some() { State::Available } else { State::Idle };
            let note = format!(
                "writing slot {slot} was interrupted (restart or power cut); the slot is unbootable until an update is prepared again"
            );
            p.most_recent_command = Some(CommandRecord::finished("prepare", &Err(note.clone())));
            p.note = Some(note);
        }
        if let Some(a) = p.activated.clone() {
            if a.slot == active && on_trial {
                // The trial boot of the update: nothing is staged or activated any more (the
                // staged slot is the one running), and the other slot is the fallback.
                p.state = State::Idle;
                p.staged = None;
                p.chosen = None;
                p.note = Some(format!(
                    "{} is running on trial in slot {active}; it becomes permanent once this boot is healthy. \
                     Until then slot {inactive} ({}) is the fallback and the updater leaves it alone",
                    a.version, a.from_version
                ));
            } else if a.slot == active {
                finish_update(p, &a);
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
        // Ready means an activation waits for its reboot; Staged, a checked slot that is the
        // inactive one. Anything else is left over from another boot.
        if p.state == State::Ready && p.activated.as_ref().is_none_or(|a| a.slot != inactive) {
            p.activated = None;
            p.state = if p.staged.is_some() { State::Staged } else { State::Idle };
        }
        if p.staged.as_ref().is_some_and(|s| s.slot != inactive) {
            p.staged = None;
        }
        if p.state == State::Staged && p.staged.is_none() {
            p.state = if p.chosen.is_some() { State::Available } else { State::Idle };
        }
        self.save(&sh.p);
    }

    /// Called once the running boot was marked successful.
    pub fn boot_succeeded(&self) {
        let mut sh = self.lock();
        sh.on_trial = false;
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
        let (tx, rx) = mpsc::channel::<(Command, UpdateSettings, Network)>();
        let me = self.clone();
        std::thread::Builder::new().name("updater".into()).spawn(move || {
            for (cmd, settings, net) in rx {
                let _ = me.execute(cmd, &settings, &net);
            }
        })?;
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(())
    }

    /// Admit `cmd`: nothing else running, the state allows it, and it would not touch a slot
    /// it must not. Marks it running.
    fn admit(&self, cmd: Command) -> Result<(), Error> {
        let mut sh = self.lock();
        if let Some(r) = sh.running {
            return Err(Error::Busy(r));
        }
        // The slot rules first: their refusal says what to do instead.
        self.guard(cmd, &sh)?;
        check(cmd, sh.p.state)?;
        sh.running = Some(cmd);
        if cmd == Command::Prepare {
            self.progress.cancel.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The slot rules (see the module docs): refuse what would change the running slot, or
    /// the fallback while the running slot is on trial.
    fn guard(&self, cmd: Command, sh: &Shared) -> Result<(), Error> {
        let (active, other) = (self.cfg.active, self.cfg.inactive());
        let touches_other = matches!(cmd, Command::Prepare | Command::Activate | Command::Deactivate);
        if sh.on_trial && touches_other {
            let what = match cmd {
                Command::Deactivate => format!(
                    "there is no activated update to cancel: {} is already running, on trial, in slot {active}",
                    self.cfg.version
                ),
                _ => format!("{} is running on trial in slot {active}", self.cfg.version),
            };
            return Err(Error::Protected(format!(
                "{what}, and slot {other} holds the version this machine falls back to, so the updater \
                 will not {} it until this boot is marked healthy. To keep {}, wait until the boot is \
                 healthy (GET /updates/status shows on_trial false). To go back instead, POST \
                 /actions/rollback and reboot (if {} does not become healthy, the next boot returns to \
                 slot {other} by itself)",
                cmd.name(),
                self.cfg.version,
                self.cfg.version
            )));
        }
        let target = match cmd {
            Command::Activate => sh.p.staged.as_ref().map(|s| s.slot),
            Command::Deactivate => sh.p.activated.as_ref().map(|a| a.slot),
            _ => None,
        };
        if target == Some(active) {
            return Err(Error::Protected(format!(
                "slot {active} is the running slot; the updater {}s only the slot it staged",
                cmd.name()
            )));
        }
        Ok(())
    }

    /// [`Updater::command_via`] without a proxy (the tests).
    #[cfg(test)]
    pub fn command(&self, cmd: Command, settings: &UpdateSettings) -> Result<bool, Error> {
        self.command_via(cmd, settings, &Network::default())
    }

    /// Accept `cmd` if the state allows it: long commands are handed to the updater thread
    /// (Ok(true): accepted, still running), short ones are carried out now (Ok(false)). Refresh
    /// and prepare reach the repository as `net` says.
    pub fn command_via(&self, cmd: Command, settings: &UpdateSettings, net: &Network) -> Result<bool, Error> {
        self.admit(cmd)?;
        if cmd.is_long() {
            let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(tx) = tx {
                if tx.send((cmd, settings.clone(), net.clone())).is_ok() {
                    return Ok(true);
                }
            }
            self.lock().running = None;
            self.finished.notify_all();
            return Err(Error::Unavailable("the updater thread is not running".into()));
        }
        self.execute(cmd, settings, net).map(|()| false)
    }

    /// Admit and run `cmd` now, in this thread (tests). A refusal is recorded as the command's
    /// failure in `most_recent_command`.
    #[cfg(test)]
    pub fn run(&self, cmd: Command, settings: &UpdateSettings) {
        match self.admit(cmd) {
            Ok(()) => {
                let _ = self.execute(cmd, settings, &Network::default());
            }
            Err(e) => {
                error!("update {} refused: {e}", cmd.name());
                self.lock().p.most_recent_command =
                    Some(CommandRecord::finished(cmd.name(), &Err(e.to_string())));
            }
        }
    }

    /// Run an admitted command.
    fn execute(&self, cmd: Command, settings: &UpdateSettings, net: &Network) -> Result<(), Error> {
        // A panic must not leave the updater "running" forever: it becomes this command's error.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cmd {
            Command::Refresh => self.refresh(settings, net),
            Command::Prepare => self.prepare(settings, net),
            Command::Activate => self.activate(),
            Command::Deactivate => self.deactivate(),
            Command::Rollback => self.rollback(),
        }))
        .unwrap_or_else(|_| Err(Error::Internal("internal error (a panic; see the console log)".into())));
        let mut sh = self.lock();
        sh.running = None;
        sh.p.most_recent_command =
            Some(CommandRecord::finished(cmd.name(), &result.clone().map_err(|e| e.to_string())));
        self.save(&sh.p);
        drop(sh);
        self.finished.notify_all();
        match &result {
            Ok(msg) => info!("update {}: {msg}", cmd.name()),
            Err(e) => error!("update {} failed: {e}", cmd.name()),
        }
        result.map(drop)
    }

    /// `POST /actions/cancel-update`: stop the running prepare at its next chunk. Waits up to
    /// `wait` for it to stop: Ok(true) when it has (its outcome is in `most_recent_command`),
    /// Ok(false) when it is still stopping.
    pub fn cancel(&self, wait: Duration) -> Result<bool, Error> {
        let sh = self.lock();
        if sh.running != Some(Command::Prepare) {
            let hint = match sh.p.state {
                State::Ready => "; to take back the activated update, POST /actions/deactivate-update",
                _ => "",
            };
            return Err(Error::Nothing(format!("no prepare is running (state {:?}){hint}", sh.p.state)));
        }
        self.progress.cancel.store(true, Ordering::Relaxed);
        self.progress.set_phase("cancelling");
        warn!("update prepare: cancel requested");
        let (sh, _) = self
            .finished
            .wait_timeout_while(sh, wait, |sh| sh.running == Some(Command::Prepare))
            .unwrap_or_else(|e| e.into_inner());
        Ok(sh.running != Some(Command::Prepare))
    }

    fn policy(&self, s: &UpdateSettings) -> Result<Policy, Error> {
        let version_lock = match s.version_lock.as_deref().map(str::trim) {
            None | Some("") | Some("latest") => None,
            Some(v) => {
                Some(v.parse().map_err(|e| Error::Settings(format!("settings.updates.version-lock: {e}")))?)
            }
        };
        let seed = s.seed.unwrap_or(0);
        if seed > manifest::MAX_SEED {
            return Err(Error::Settings(format!(
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

    fn open_repo(&self, s: &UpdateSettings, net: &Network) -> Result<(stage::Repo, Manifest), Error> {
        let md = s.metadata_base_url.as_deref().filter(|u| !u.is_empty());
        let tg = s.targets_base_url.as_deref().filter(|u| !u.is_empty());
        let (Some(md), Some(tg)) = (md, tg) else {
            return Err(Error::Settings(
                "no update repository configured: set settings.updates.metadata-base-url and \
                 settings.updates.targets-base-url"
                    .into(),
            ));
        };
        let transport = transport::HttpTransport { proxy: net.proxy()?, ..Default::default() };
        self.clock_floor();
        let repo =
            stage::Repo::load(&self.cfg.trusted_root, &self.cfg.state_dir.join("tuf"), md, tg, transport)
                .map_err(Error::Repository)?;
        let manifest = repo.manifest().map_err(Error::Repository)?;
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

    fn refresh(&self, s: &UpdateSettings, net: &Network) -> Result<String, Error> {
        let policy = self.policy(s)?;
        let (_repo, manifest) = self.open_repo(s, net)?;
        let choice = manifest.choose(&policy, now());
        let mut sh = self.lock();
        let mut msg = match &choice {
            Choice::Update(u, why) => format!("{} chosen ({why})", u.version),
            Choice::None(why) => why.clone(),
        };
        if let Some(w) = self.note_offered(&mut sh, &manifest) {
            msg = format!("{w}; {msg}");
        }
        let p = &mut sh.p;
        p.last_refresh = Some(now().to_string());
        match choice {
            Choice::Update(u, _) => {
                p.chosen = Some(UpdateInfo::of(u));
                if p.state == State::Idle {
                    p.state = State::Available;
                }
            }
            Choice::None(_) => {
                p.chosen = None;
                if p.state == State::Available {
                    p.state = State::Idle;
                }
            }
        }
        Ok(msg)
    }

    /// Record what the repository offers this host now; a staged version it no longer offers
    /// (withdrawn) is dropped, its slot left unbootable. Returns a note when that happened.
    fn note_offered(&self, sh: &mut Shared, manifest: &Manifest) -> Option<String> {
        let offered = manifest.offered(&self.cfg.variant, &self.cfg.arch);
        let p = &mut sh.p;
        p.available = offered.iter().map(|v| v.to_string()).collect();
        let staged = p.staged.clone()?;
        if p.state != State::Staged || p.available.contains(&staged.version) {
            return None;
        }
        let note = format!(
            "{} (staged in slot {}) was withdrawn from the repository: it is no longer offered for {} on {}. \
             Dropped it; slot {} stays unbootable",
            staged.version, staged.slot, self.cfg.variant, self.cfg.arch, staged.slot
        );
        warn!("{note}");
        if staged.slot != self.cfg.active {
            if let Err(e) = self.cfg.disk.boot_control().set_state(staged.slot, SlotState::default()) {
                error!("making slot {} unbootable: {e}", staged.slot);
            }
        }
        p.staged = None;
        p.state = State::Idle;
        p.note = Some(note.clone());
        Some(note)
    }

    fn prepare(&self, s: &UpdateSettings, net: &Network) -> Result<String, Error> {
        let policy = self.policy(s)?;
        let (repo, manifest) = self.open_repo(s, net)?;
        let update = {
            let mut sh = self.lock();
            self.note_offered(&mut sh, &manifest);
            match manifest.choose(&policy, now()) {
                Choice::Update(u, _) => u.clone(),
                Choice::None(why) => {
                    sh.p.chosen = None;
                    sh.p.state = State::Idle;
                    return Err(Error::Missing(format!("no update to prepare: {why}")));
                }
            }
        };
        let slot = self.cfg.inactive();
        let version = update.version;
        if self.progress.cancelled() {
            return Err(Error::Cancelled(format!(
                "prepare of {version} cancelled before slot {slot} was touched"
            )));
        }
        // From here the inactive slot is unbootable until the write is complete and checked.
        self.cfg.disk.boot_control().set_state(slot, SlotState::default())?;
        {
            let mut sh = self.lock();
            sh.p.chosen = Some(UpdateInfo::of(&update));
            sh.p.writing = Some(slot);
            sh.p.staged = None;
            sh.p.note = None;
            self.save(&sh.p);
        }
        let mut result = stage::write_slot(&repo, &update, &self.cfg, slot, &self.progress);
        let mut sh = self.lock();
        sh.p.writing = None;
        self.progress.set_phase("");
        // A cancel wins until the prepare reports, even when the last chunk was already in.
        if self.progress.cancelled() && result.is_ok() {
            result = Err(Error::Cancelled("cancelled after the images were written".into()));
        }
        match result {
            Ok(report) => {
                sh.p.staged = Some(Staged { slot, version: version.to_string() });
                sh.p.state = State::Staged;
                Ok(format!("{version} staged in slot {slot}: {report}"))
            }
            Err(Error::Cancelled(how)) => {
                sh.p.state = State::Available;
                let msg = format!(
                    "prepare of {version} cancelled by request ({how}); slot {slot} is left unbootable, \
                     the running slot {} is untouched. Prepare again to stage it",
                    self.cfg.active
                );
                sh.p.note = Some(msg.clone());
                Err(Error::Cancelled(msg))
            }
            Err(e) => {
                sh.p.state = State::Available;
                Err(Error::Stage(format!(
                    "preparing {version} in slot {slot}: {e} (slot {slot} left unbootable; the running slot {} is untouched)",
                    self.cfg.active
                )))
            }
        }
    }

    fn activate(&self) -> Result<String, Error> {
        let mut sh = self.lock();
        let staged = sh.p.staged.clone().ok_or(Error::Missing("nothing is staged".into()))?;
        let slot = staged.slot;
        // The guard refused this already; a staged slot is never the running one.
        if slot == self.cfg.active {
            return Err(Error::Protected(format!("the staged slot {slot} is the running slot")));
        }
        if !sh.p.available.contains(&staged.version) {
            return Err(Error::Withdrawn(format!(
                "{} is not offered by the repository as last refreshed ({}); refresh to drop it",
                staged.version,
                sh.p.last_refresh.as_deref().unwrap_or("never")
            )));
        }
        sh.p.activated = Some(Activated {
            slot,
            version: staged.version.clone(),
            from_version: self.cfg.version.to_string(),
        });
        sh.p.state = State::Ready;
        self.save(&sh.p);
        let active = self.cfg.active;
        let flip = self.cfg.disk.boot_control().modify(|s: &mut Slots| {
            if s[active].priority >= 15 {
                s[active].priority = 14;
            }
            s[slot] = SlotState { priority: s[active].priority.max(1) + 1, tries: 1, successful: false };
            Ok::<_, bootctl::Error>(())
        });
        if let Err(e) = flip {
            sh.p.activated = None;
            sh.p.state = State::Staged;
            return Err(e.into());
        }
        Ok(format!("slot {slot} ({}) boots next, on trial", staged.version))
    }

    fn deactivate(&self) -> Result<String, Error> {
        let mut sh = self.lock();
        let a = sh.p.activated.clone().ok_or(Error::Missing("no update is activated".into()))?;
        if a.slot == self.cfg.active {
            return Err(Error::Protected(format!("the activated slot {} is the running slot", a.slot)));
        }
        self.cfg.disk.boot_control().set_state(a.slot, SlotState::default())?;
        sh.p.activated = None;
        sh.p.state = State::Staged;
        Ok(format!("slot {} no longer boots next; {} stays staged there", a.slot, a.version))
    }

    fn rollback(&self) -> Result<String, Error> {
        let (active, other) = (self.cfg.active, self.cfg.inactive());
        let version = (self.cfg.read_slot_meta)(&self.cfg.disk, other)
            .and_then(|t| crate::bootctl::SlotMeta::parse(&t))
            .map(|m| m.version);
        let mut sh = self.lock();
        self.cfg.disk.boot_control().modify(|s: &mut Slots| {
            let st = s[other];
            if !(st.successful && st.priority > 0) {
                return Err(Error::Nothing(format!(
                    "slot {other} holds no version that booted successfully (state {st:?}); nothing to roll back to"
                )));
            }
            if let Err(e) = &version {
                return Err(Error::Nothing(format!("slot {other} is not readable: {e}")));
            }
            if s[active].priority >= 15 {
                s[active].priority = 14;
            }
            s[other].priority = s[active].priority.max(1) + 1;
            Ok(())
        })?;
        let version = version.unwrap_or_default();
        sh.p.last_rollback = Some(Rollback {
            failed_version: self.cfg.version.to_string(),
            failed_slot: active,
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

    /// The whole status, whatever is running: Bottlerocket's fields (the shape its update
    /// operator parses; see docs/compatibility.md) and Berth's beside them. The partitions
    /// carry `image` and `next_to_boot` as Bottlerocket's do, plus the slot's boot-control
    /// state; `staging_partition` is the inactive slot, its `image` null until an update is
    /// staged there. `GET /updates/status` serves it through [`Updater::api_status`].
    pub fn status(&self) -> Value {
        let sh = self.lock();
        let p = &sh.p;
        let states = self.cfg.disk.boot_control().states().ok();
        let next = states.as_ref().and_then(|s| bootctl::choose(s[Slot::A], s[Slot::B]));
        let image =
            |version: &str| json!({"arch": self.cfg.arch, "version": version, "variant": self.cfg.variant});
        let partition = |slot: Slot, image: Value| {
            let st = states.as_ref().map(|s| s[slot]);
            json!({"image": image, "next_to_boot": next == Some(slot), "slot": slot.letter(),
                   "priority": st.map(|s| s.priority), "tries": st.map(|s| s.tries),
                   "successful": st.map(|s| s.successful), "bootable": st.map(|s| s.bootable())})
        };
        let mut active = partition(self.cfg.active, image(&self.cfg.version.to_string()));
        active["on_trial"] = json!(sh.on_trial);
        let staged = p.staged.as_ref().map(|s| image(&s.version)).unwrap_or(Value::Null);
        let staging = partition(self.cfg.inactive(), staged);
        json!({
            "update_state": p.state,
            "available_updates": p.available,
            "chosen_update": p.chosen,
            "active_partition": active,
            "staging_partition": staging,
            "most_recent_command": p.most_recent_command,
            "last_refresh": p.last_refresh,
            "last_update": p.last_update,
            "last_rollback": p.last_rollback,
            "note": p.note,
        })
    }

    /// `GET /updates/status`, as Bottlerocket answers it: 423 while a command runs (its record
    /// is written when it finishes, so a client waits for the lock, then reads the outcome),
    /// 404 before the first command (`most_recent_command` is never null in an answer).
    pub fn api_status(&self) -> Result<Value, Error> {
        {
            let sh = self.lock();
            if let Some(cmd) = sh.running {
                return Err(Error::Busy(cmd));
            }
            if sh.p.most_recent_command.is_none() {
                return Err(Error::Missing(
                    "update status is not initialized yet: POST /actions/refresh-updates first".into(),
                ));
            }
        }
        Ok(self.status())
    }

    /// `GET /updates/progress` (Berth's): the running command, if any, and how far a prepare
    /// has written.
    pub fn progress(&self) -> Value {
        let sh = self.lock();
        let prepare = sh.running == Some(Command::Prepare);
        let pr = &self.progress;
        json!({
            "running": sh.running.map(Command::name),
            "phase": if prepare { pr.phase.lock().unwrap_or_else(|e| e.into_inner()).clone() } else { String::new() },
            "bytes_done": if prepare { pr.done.load(Ordering::Relaxed) } else { 0 },
            "bytes_total": if prepare { pr.total.load(Ordering::Relaxed) } else { 0 },
            "cancel_requested": prepare && pr.cancelled(),
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
        (Refresh, Idle | Available | Staged | Ready)
        | (Prepare, Available | Staged)
        | (Activate, Staged)
        | (Deactivate, Ready)
        | (Rollback, Idle | Available | Staged) => Ok(()),
        (Prepare | Activate | Deactivate | Rollback, _) => Err(Error::NotAllowed(not_allowed(cmd, state))),
    }
}

fn not_allowed(cmd: Command, state: State) -> String {
    let hint = match (cmd, state) {
        (Command::Prepare, State::Idle) => "; refresh first (no update is chosen)",
        (Command::Prepare, State::Ready) => "; an update is already activated (deactivate it first)",
        (Command::Activate, State::Idle) | (Command::Activate, State::Available) => {
            "; prepare an update first"
        }
        (Command::Activate, State::Ready) => "; it is already active",
        (Command::Rollback, State::Ready) => "; deactivate the update first",
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
