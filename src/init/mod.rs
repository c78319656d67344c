//! Stage 2: PID 1 in the verified root.
//!
//! Runs the boot phases (mounts, data partitions, /etc, propagation, settings and user data,
//! the API), prints the
//! machine-readable `berth: ready ...` line, marks the slot successful, then sits in the event
//! loop: it reaps every child (the program's only `waitpid(-1)`), and turns SIGTERM/SIGINT
//! (reboot) and SIGPWR/SIGUSR2 or the power button (power-off) into an orderly shutdown.
//! PID 1 never exits: fatal errors before "ready" reboot so that boot control can fall back;
//! after "ready", errors are logged and the loop goes on.
//!
//! Staying alive and bounded: a panic in a phase is a fatal boot error, a panic in one turn of
//! the event loop is logged and the loop goes on; PID 1's own threads are supervised
//! ([`tasks`]); the hardware watchdog is fed by the event loop for the life of the system
//! ([`boot::watchdog`]), so a hang of PID 1 resets the machine. A partition or datastore that
//! cannot be used is fatal on a boot on trial (the slot rolls back to the known-good one) and
//! worked around on a known-good slot (memory instead of the partition, settings set aside),
//! with a notice on the console and in `GET /boot`, because a known-good slot that reboots on
//! every boot is a brick.

pub mod bootparams;
pub mod bootstrap;
mod ec2;
mod etc;
mod grow;
mod network;
mod power;
pub mod selftest;
pub mod selinux;
mod services;
mod settings;
mod shutdown;
pub mod tasks;
mod updates;

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::boot::{
    self, cmdline::Cmdline, mounts, partitions, report, watchdog, BootError, Failure, Handoff,
};
use crate::bootctl::{BootControl, GptBootControl};
use crate::supervisor::Supervisor;
use crate::sys::{self, RebootMode, SignalFd};

const SIGNALS: &[libc::c_int] =
    &[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGPWR, libc::SIGUSR1, libc::SIGUSR2, libc::SIGHUP];

const NOSUID_NODEV: libc::c_ulong = sys::MS_NOSUID | sys::MS_NODEV;

/// Stage 2's own mounts, after those stage 1 moved in.
const STAGE2: &[mounts::Mount] = &[
    mounts::Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: sys::MS_NOSUID | sys::MS_NOEXEC,
        data: Some("gid=5,mode=620,ptmxmode=666"),
    },
    mounts::Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    mounts::Mount {
        source: "tmpfs",
        target: "/etc",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=0755,size=16m"),
    },
    mounts::Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: Some("mode=1777"),
    },
    mounts::Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: sys::MS_NOSUID | sys::MS_NODEV | sys::MS_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Where the data partitions go.
pub const LOCAL: &str = "/local";
pub const PRIVATE: &str = "/var/lib/berth";

/// Boot state shared by the phases.
pub struct Ctx {
    pub cmdline: Cmdline,
    pub handoff: Handoff,
    pub parts: Vec<partitions::PartInfo>,
    pub started: Instant,
    /// Open between the datastore and api phases, then owned by the API.
    pub store: Option<crate::settings::Datastore>,
    /// How the first boot's user data went (for the API).
    pub user_data: serde_json::Value,
    pub supervisor: Arc<Mutex<Supervisor>>,
    /// Started just before the API.
    pub updater: Option<Arc<crate::update::Updater>>,
    /// PID 1's own supervised threads.
    pub tasks: tasks::Tasks,
    /// Whether DMI says this is an EC2 instance (see [`ec2`]).
    pub ec2: bool,
    /// Whether the network is up yet (set by the network task).
    pub network: network::Readiness,
}

impl Ctx {
    /// A problem with the machine's state rather than with this version: fatal on a boot on
    /// trial (the known-good slot takes over), a notice on a known-good slot, whose boot goes on
    /// with `fallback` (see the module docs).
    pub fn degrade(&mut self, error: BootError, fallback: &str) -> Result<(), BootError> {
        if self.handoff.on_trial {
            return Err(error);
        }
        report::notice(format!("{error}; {fallback}"));
        Ok(())
    }
}

type Phase = (&'static str, fn(&mut Ctx) -> Result<(), BootError>);

const PHASES: &[Phase] = &[
    ("mounts", |_| mounts::mount_all(STAGE2)),
    ("find-partitions", find_partitions),
    ("data", grow::mount_data),
    ("selinux", selinux::setup),
    ("etc", etc::render),
    ("propagation", make_rshared),
    ("loopback", network::loopback),
    ("datastore", settings::open_datastore),
    ("user-data", settings::apply_user_data),
    ("instance", ec2::instance_settings),
    ("containerd-config", settings::render_containerd_config),
    ("containerd", services::start_containerd),
    ("settings", settings::apply_settings),
    ("reconcile-boot", bootparams::reconcile),
    ("network", network::start),
    ("services", services::declare),
    ("updater", updates::start),
    ("api", settings::start_api),
];

/// Point stdin/stdout/stderr at /dev/console (the kernel may have left them closed).
pub fn console_stdio() {
    if let Ok(c) = OpenOptions::new().read(true).write(true).open("/dev/console") {
        let _ = sys::dup_to_stdio(&c);
    }
}

/// The entry point of PID 1: stage 1 in the initramfs, stage 2 in the real root.
pub fn pid1() -> ! {
    if sys::getpid() != 1 {
        // Mounting, switching roots and reaping are only right for the real PID 1.
        eprintln!("berth: init duties belong to PID 1 only (this is pid {})", sys::getpid());
        std::process::exit(1);
    }
    crate::klog::init(true);
    let in_initramfs = matches!(
        sys::statfs(Path::new("/")),
        Ok((m, _, _)) if m == sys::RAMFS_MAGIC || m == sys::TMPFS_MAGIC
    ) && Path::new("/init").exists();
    if in_initramfs {
        let e = boot::stage1();
        boot::fail_and_reboot(&e);
    }
    stage2()
}

fn stage2() -> ! {
    // Block our signals before any thread exists, so every thread inherits the mask.
    let signals = match SignalFd::new(SIGNALS) {
        Ok(s) => s,
        Err(e) => boot::fail_and_reboot(&BootError::io_on("create", "the signalfd".into())(e)),
    };
    // A few mounts are needed before logging works when booted without stage 1.
    if let Err(e) = mounts::mount_all(mounts::EARLY) {
        boot::fail_and_reboot(&e);
    }
    crate::klog::reopen_kmsg();
    console_stdio();
    let _ = sys::disable_cad();
    std::panic::set_hook(Box::new(|p| error!("panic: {p}")));

    let handoff = match fs::read_to_string(boot::HANDOFF)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str::<Handoff>(&t).map_err(|e| e.to_string()))
    {
        Ok(h) => h,
        Err(error) => boot::fail_and_reboot(&BootError::Handoff {
            path: boot::HANDOFF.into(),
            error: format!("{error} (was stage 1 skipped?)"),
        }),
    };
    info!("stage2 start slot={} version={}", handoff.slot, handoff.version);
    let cmdline = Cmdline::read();
    if !cmdline.init_arguments().is_empty() {
        info!("init arguments (after --): {}", cmdline.init_arguments().join(" "));
    }
    report::adopt(handoff.phases.clone(), handoff.notices.clone());
    // Stage 1 armed the watchdog; it is fed from here on, for the life of the system.
    watchdog::install(watchdog::arm(&cmdline, handoff.on_trial));
    let mut ctx = Ctx {
        cmdline,
        handoff,
        parts: Vec::new(),
        started: Instant::now(),
        store: None,
        user_data: serde_json::Value::Null,
        supervisor: Arc::new(Mutex::new(Supervisor::new(Vec::new()))),
        updater: None,
        tasks: tasks::Tasks::default(),
        ec2: crate::userdata::is_ec2(Path::new("/sys")),
        network: network::Readiness::default(),
    };
    if ctx.ec2 {
        info!("EC2 instance (DMI): the network starts before user data; instance settings from IMDS");
    }
    if ctx.handoff.boot == "uefi" {
        // Every boot-control change from now on (marking the slot good, the updater) also
        // tells the firmware.
        let (disk, sector) = (ctx.handoff.disk.clone(), ctx.handoff.sector_size);
        if let Err(e) = crate::bootctl::install_uefi(&disk, sector, Path::new(crate::bootctl::uefi::EFIVARS))
        {
            if let Err(error) = ctx.degrade(
                BootError::BootControl(e),
                "boot-control changes will reach the firmware only at the next boot",
            ) {
                boot::fail_and_reboot(&Failure { stage: 2, phase: "boot-control", error });
            }
        }
    }
    if let (true, Some(part)) = (ctx.handoff.boot == "rpi", ctx.handoff.autoboot.clone()) {
        // Every boot-control change from now on rewrites autoboot.txt, and restarts are
        // tryboot restarts while a slot is on trial.
        let (disk, sector) = (ctx.handoff.disk.clone(), ctx.handoff.sector_size);
        if let Err(e) =
            crate::bootctl::install_rpi(&disk, sector, crate::bootctl::rpi::Location::Partition(part))
        {
            if let Err(error) = ctx.degrade(
                BootError::BootControl(e),
                "boot-control changes will reach autoboot.txt only at the next boot",
            ) {
                boot::fail_and_reboot(&Failure { stage: 2, phase: "boot-control", error });
            }
        }
    }
    bootparams::register_partitions(&ctx);
    for (name, phase) in ec2::phases(PHASES, ctx.ec2) {
        let (t, start_ms) = (Instant::now(), report::uptime_ms());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| phase(&mut ctx)))
            .unwrap_or_else(|p| Err(BootError::Panic(tasks::panic_text(p.as_ref()))));
        if let Err(error) = result {
            boot::fail_and_reboot(&Failure { stage: 2, phase: name, error });
        }
        watchdog::feed();
        report::phase(2, name, start_ms, t);
        info!("stage2 phase {name} done in {} us", t.elapsed().as_micros());
    }
    power::watch_power_button();
    if ctx.handoff.on_trial && ctx.cmdline.get("fault") == Some("hang-on-trial") {
        // Fault injection for the watchdog test: a boot on trial that hangs before it is
        // healthy. Only the watchdog can end it.
        warn!("fault injection berth.fault=hang-on-trial: PID 1 stops here, the watchdog unfed");
        hang();
    }

    event_loop(ctx, signals)
}

/// Fault injection: stop the main thread for good (only the watchdog ends this).
fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn find_partitions(ctx: &mut Ctx) -> Result<(), BootError> {
    let disk = ctx.handoff.disk.file_name().map(|n| n.to_string_lossy().into_owned());
    ctx.parts =
        partitions::wait_for(&["BERTH-PRIVATE", "BERTH-DATA"], disk.as_deref(), Duration::from_secs(5))?;
    Ok(())
}

fn make_rshared(_: &mut Ctx) -> Result<(), BootError> {
    sys::mount(None, Path::new("/"), None, sys::MS_REC | sys::MS_SHARED, None)
        .map_err(BootError::io_on("make rshared", "/".into()))
}

fn mark_ready(ctx: &Ctx) {
    let h = &ctx.handoff;
    // dm-verity's own verdict so far: "V" verified, "C" corruption seen.
    let verity = crate::sys::dm::status(boot::VERITY_NAME)
        .ok()
        .and_then(|s| s.first().cloned())
        .unwrap_or_else(|| "unknown".into());
    info!(
        "ready version={} variant={} slot={} verity={} boot_ms={} stage1_ms={} stage2_ms={}",
        h.version,
        h.variant,
        h.slot,
        verity,
        report::uptime_ms(),
        h.stage1_ms,
        ctx.started.elapsed().as_millis()
    );
    let mut bc = GptBootControl::new(&h.disk, h.sector_size);
    match bc.mark_successful(h.slot) {
        Ok(marked) => {
            if marked {
                info!("slot {} marked successful", h.slot);
            }
            updates::boot_succeeded(&ctx.updater);
        }
        Err(e) => error!("could not mark slot {} successful: {e}", h.slot),
    }
}

/// A `Name:   123 kB` field of a /proc status-style file, in KiB (0 if absent).
fn kb_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kb() -> u64 {
    kb_field(&fs::read_to_string("/proc/self/status").unwrap_or_default(), "VmRSS:")
}

/// Services that must be ready before the boot counts as healthy (absent ones are skipped).
const HEALTH_SERVICES: &[&str] = &["containerd"];

/// Memory in use by the whole guest: MemTotal - MemAvailable.
fn guest_used_kb() -> u64 {
    let info = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    kb_field(&info, "MemTotal:").saturating_sub(kb_field(&info, "MemAvailable:"))
}

/// Consecutive turns of the event loop that may panic before PID 1 gives up and reboots.
const MAX_PANICKING_TURNS: u32 = 50;

fn event_loop(mut ctx: Ctx, signals: SignalFd) -> ! {
    let health_deadline = Instant::now() + Duration::from_secs(ctx.cmdline.get_u64("health-timeout", 300));
    let mut ready_at: Option<Instant> = None;
    let mut idle_reported = false;
    let mut panicking = 0u32;
    loop {
        watchdog::feed();
        // Wake at least every 200 ms: the supervisor's timers (backoff, readiness) run here.
        let sig = match signals.wait(200) {
            Ok(s) => s,
            Err(e) => {
                warn!("waiting for signals: {e}");
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        };
        let sup = ctx.supervisor.clone();
        match sig {
            Some(libc::SIGCHLD) | None => {}
            Some(libc::SIGTERM) | Some(libc::SIGINT) => shutdown::run(RebootMode::Restart, &signals, &sup),
            Some(libc::SIGPWR) | Some(libc::SIGUSR2) => shutdown::run(RebootMode::PowerOff, &signals, &sup),
            Some(libc::SIGUSR1) => shutdown::run(RebootMode::Halt, &signals, &sup),
            Some(other) => info!("ignoring signal {other}"),
        }
        // One turn's work; a panic in it is logged and the next turn tries again.
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            turn(&mut ctx, &mut ready_at, &mut idle_reported, health_deadline)
        }));
        match turn {
            Ok(()) => panicking = 0,
            Err(p) => {
                panicking += 1;
                error!(
                    "PID 1's event loop panicked ({}; {panicking} in a row)",
                    tasks::panic_text(p.as_ref())
                );
                if panicking >= MAX_PANICKING_TURNS {
                    boot::fail_and_reboot(&"PID 1's event loop keeps panicking");
                }
            }
        }
    }
}

/// One turn of the event loop: reap, run the supervisor's timers, restart dead tasks, and
/// decide whether the boot is healthy.
fn turn(ctx: &mut Ctx, ready_at: &mut Option<Instant>, idle_reported: &mut bool, health_deadline: Instant) {
    let sup = ctx.supervisor.clone();
    reap(&sup);
    lock(&sup).tick();
    ctx.tasks.check();
    match *ready_at {
        None if healthy(ctx, &sup) => {
            mark_ready(ctx);
            *ready_at = Some(Instant::now());
            if ctx.cmdline.get("fault") == Some("hang-after-ready") {
                // Fault injection for the watchdog test: PID 1 hangs after a healthy boot.
                warn!("fault injection berth.fault=hang-after-ready: PID 1 stops here, the watchdog unfed");
                hang();
            }
        }
        None if Instant::now() >= health_deadline => {
            let report = lock(&sup).report();
            if ctx.handoff.on_trial {
                boot::fail_and_reboot(&format!("not healthy in time; services: {report}"));
            }
            error!("not healthy in time (slot already known good, staying up); services: {report}");
            *ready_at = Some(Instant::now());
        }
        Some(t) if !*idle_reported && t.elapsed() >= Duration::from_secs(2) => {
            *idle_reported = true;
            info!(
                "idle rss_kb={} guest_used_kb={} uptime_ms={}",
                rss_kb(),
                guest_used_kb(),
                report::uptime_ms()
            );
        }
        _ => {}
    }
}

/// Whether the boot is healthy: its services are ready and the bootstrap is done.
fn healthy(ctx: &Ctx, sup: &Mutex<Supervisor>) -> bool {
    let sup = lock(sup);
    sup.healthy(HEALTH_SERVICES) && bootstrap::gate(ctx, &sup)
}

pub(crate) fn lock(sup: &Mutex<Supervisor>) -> std::sync::MutexGuard<'_, Supervisor> {
    sup.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reap every exited child (the program's only use of `waitpid(-1)`, through
/// [`sys::reap_one`]) and hand services' exits to the supervisor; returns whether any child,
/// direct or adopted orphan, is still alive.
pub(crate) fn reap(sup: &Mutex<Supervisor>) -> bool {
    loop {
        match sys::reap_one() {
            Ok(Some((pid, exit))) => {
                // A child a thread waits for itself (sys::spawn_awaited) gets its exit there.
                if sys::deliver(pid, exit) {
                    continue;
                }
                if !lock(sup).on_exit(pid, exit) {
                    info!("reaped pid {pid} ({exit})");
                }
            }
            Ok(None) => return true,
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return false,
            Err(e) => {
                warn!("waitpid: {e}");
                return true;
            }
        }
    }
}
