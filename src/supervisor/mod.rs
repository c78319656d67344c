//! The service supervisor inside PID 1.
//!
//! Each service is a declared [`ServiceSpec`] (argv, environment, working directory,
//! dependencies, readiness check, restart policy). The supervisor starts services in
//! dependency order once their dependencies are ready, captures stdout and stderr into a
//! bounded [`LogBuf`] per service, and restarts crashed services with backoff: at least 1 s
//! between starts, doubling on a crash loop up to 60 s, back to 1 s after 10 s of healthy
//! running. A spec may name the capabilities its service keeps; the others are dropped from
//! its bounding set before exec. Every service runs in its own process group and, when cgroup2 is mounted, its own
//! cgroup under `/sys/fs/cgroup/berth/NAME`.
//!
//! The supervisor owns its processes but never waits on them: PID 1's reaper (the only
//! `waitpid(-1)`) hands every exit to [`Supervisor::on_exit`]. Nothing here blocks for long,
//! so a crash loop cannot hold up PID 1 or the API.

pub mod host_container;
mod logbuf;
pub mod probe;
pub mod runc;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use serde_json::{json, Value};

use logbuf::LineSplitter;
pub use logbuf::LogBuf;

use crate::sys::{self, CapabilitySet, Exit};

const MIN_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Each service's log: the newest lines within this many bytes (see logbuf.rs).
const LOG_BYTES: usize = 64 * 1024;
/// One read of a service's output; with the splitter's line buffer, what a stream can hold.
const READ_CHUNK: usize = 8 * 1024;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// When a service counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// As soon as it is started.
    Started,
    /// When this Unix socket answers containerd's version call (see [`probe`]). A thread per
    /// start waits for it (inotify, no polling interval) and wakes PID 1's event loop with a
    /// SIGCHLD to itself when it answers.
    ContainerdVersion(PathBuf),
}

/// How long one start's readiness thread waits before giving up (the service then stays
/// "starting"; the boot's health deadline is shorter).
const READY_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Between a start's readiness thread and the supervisor.
#[derive(Default)]
struct Readiness {
    /// When the answer came (uptime, ms).
    at_ms: std::sync::atomic::AtomicU64,
    ready: AtomicBool,
    /// The process it waits for exited or was stopped: the thread gives up.
    cancelled: AtomicBool,
}

/// What happens when a service exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Always,
    /// One-shot tasks.
    Never,
}

#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub deps: Vec<String>,
    pub ready: Ready,
    pub restart: Restart,
    /// Why the service cannot run here (its program is missing, ...), if so.
    pub absent: Option<String>,
    /// Capabilities the service keeps in its bounding set (`CapabilitySet::NET_BIND_SERVICE |
    /// ...`, empty for none); None keeps all.
    pub caps: Option<CapabilitySet>,
}

impl ServiceSpec {
    pub fn new(name: &str, argv: &[&str]) -> ServiceSpec {
        let absent = match argv.first() {
            Some(p) if Path::new(p).exists() => None,
            Some(p) => Some(format!("{p} is not in this image")),
            None => Some("no program given".into()),
        };
        ServiceSpec {
            name: name.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/usr/sbin:/bin:/sbin".into())],
            cwd: None,
            deps: Vec::new(),
            ready: Ready::Started,
            restart: Restart::Always,
            absent,
            caps: None,
        }
    }
}

/// Where a service is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceState {
    /// Waiting for its dependencies to be ready.
    Waiting,
    /// Started, readiness check not passed yet.
    Starting,
    /// Started and ready.
    Running,
    /// Exited; will be started again at the given time.
    Backoff { until: Instant },
    /// Asked to stop; not restarted.
    Stopped,
    /// Exited and its restart policy says not to start it again.
    Exited,
    /// Cannot run on this machine.
    Absent(String),
}

impl ServiceState {
    fn name(&self) -> &'static str {
        match self {
            ServiceState::Waiting => "waiting",
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Backoff { .. } => "backoff",
            ServiceState::Stopped => "stopped",
            ServiceState::Exited => "exited",
            ServiceState::Absent(_) => "absent",
        }
    }
}

struct Service {
    spec: ServiceSpec,
    state: ServiceState,
    pid: Option<i32>,
    restarts: u32,
    starts: Vec<SystemTime>,
    last_exit: Option<(Exit, SystemTime)>,
    started_at: Option<Instant>,
    /// Kernel-relative times (CLOCK_BOOTTIME, ms) of the last start and when it became ready,
    /// for the boot timeline (`GET /boot`).
    started_uptime_ms: Option<u64>,
    ready_uptime_ms: Option<u64>,
    readiness: Option<Arc<Readiness>>,
    delay: Duration,
    log: Arc<Mutex<LogBuf>>,
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Service {
    fn new(spec: ServiceSpec) -> Service {
        Service {
            state: match &spec.absent {
                Some(why) => ServiceState::Absent(why.clone()),
                None => ServiceState::Waiting,
            },
            spec,
            pid: None,
            restarts: 0,
            starts: Vec::new(),
            last_exit: None,
            started_at: None,
            started_uptime_ms: None,
            ready_uptime_ms: None,
            readiness: None,
            delay: MIN_DELAY,
            log: Arc::new(Mutex::new(LogBuf::new(LOG_BYTES))),
        }
    }

    fn report(&self) -> Value {
        let exit = self.last_exit.map(|(e, t)| {
            let (kind, value) = match e {
                Exit::Code(c) => ("code", c),
                Exit::Signal(s) => ("signal", s),
            };
            json!({ kind: value, "at_ms": epoch_ms(t) })
        });
        let mut v = json!({
            "state": self.state.name(),
            "pid": self.pid,
            "ready": self.state == ServiceState::Running,
            "restarts": self.restarts,
            "last_exit": exit,
            // The last starts (at most 10), so spacing between restarts is observable.
            "recent_starts_ms": self.starts.iter().map(|t| epoch_ms(*t)).collect::<Vec<_>>(),
            "argv": self.spec.argv,
            "deps": self.spec.deps,
            "started_uptime_ms": self.started_uptime_ms,
            "ready_uptime_ms": self.ready_uptime_ms,
        });
        if let ServiceState::Absent(why) = &self.state {
            v["reason"] = json!(why);
        }
        if let ServiceState::Backoff { until } = &self.state {
            v["restart_in_ms"] = json!(until.saturating_duration_since(Instant::now()).as_millis() as u64);
        }
        v
    }
}

pub struct Supervisor {
    services: Vec<Service>,
    cgroups: bool,
}

/// A thread that waits for a start of `name` to answer on `socket` (see [`Ready`]).
fn wait_ready(name: &str, socket: PathBuf) -> Arc<Readiness> {
    let r = Arc::new(Readiness::default());
    let theirs = r.clone();
    let who = name.to_string();
    let spawned =
        std::thread::Builder::new().name(format!("ready-{name}")).stack_size(128 * 1024).spawn(move || {
            match probe::wait_answering(&socket, READY_WAIT, &|| theirs.cancelled.load(Ordering::Relaxed)) {
                Ok(v) => {
                    // Logged here, when it is true (the console line's timestamp is the moment).
                    info!("service {who} is ready (version {v})");
                    theirs.at_ms.store(crate::boot::report::uptime_ms(), Ordering::Relaxed);
                    theirs.ready.store(true, Ordering::Release);
                    // Wake PID 1's event loop (its signalfd takes SIGCHLD) to mark it ready now.
                    let _ = sys::kill(sys::getpid(), libc::SIGCHLD);
                }
                Err(e) if !theirs.cancelled.load(Ordering::Relaxed) => warn!("service {who}: not ready: {e}"),
                Err(_) => {}
            }
        });
    if let Err(e) = spawned {
        warn!("service {name}: no thread to wait for its readiness: {e}");
    }
    r
}

/// Copy one output stream of a service into its log buffer, line by line, through a bounded
/// [`LineSplitter`] (see logbuf.rs for why every bound is there).
fn pump(name: String, mut stream: impl Read + Send + 'static, log: Arc<Mutex<LogBuf>>) {
    let spawned =
        std::thread::Builder::new().name(format!("log-{name}")).stack_size(64 * 1024).spawn(move || {
            let mut splitter = LineSplitter::new();
            let mut chunk = vec![0u8; READ_CHUNK];
            loop {
                let n = match stream.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                splitter.feed(&chunk[..n], &mut |line| log.push(line));
            }
            splitter.flush(&mut |line| log.lock().unwrap_or_else(|p| p.into_inner()).push(line));
        });
    if let Err(e) = spawned {
        warn!("service {name}: no thread to capture its output: {e}");
    }
}

impl Supervisor {
    pub fn new(specs: Vec<ServiceSpec>) -> Supervisor {
        let cgroups = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
        if cgroups {
            // Delegate the controllers to our subtree; failures only cost resource control.
            let _ = fs::create_dir_all(Path::new(CGROUP_ROOT).join("berth"));
            for dir in [CGROUP_ROOT.to_string(), format!("{CGROUP_ROOT}/berth")] {
                let _ = fs::write(Path::new(&dir).join("cgroup.subtree_control"), "+cpu +memory +pids +io");
            }
        }
        let services = specs.into_iter().map(Service::new).collect();
        Supervisor { services, cgroups }
    }

    fn is_ready(&self, name: &str) -> bool {
        self.services.iter().any(|s| s.spec.name == name && s.state == ServiceState::Running)
    }

    fn start(&mut self, i: usize) {
        let cgroups = self.cgroups;
        let s = &mut self.services[i];
        let name = s.spec.name.clone();
        let mut cmd = Command::new(&s.spec.argv[0]);
        cmd.args(&s.spec.argv[1..])
            .env_clear()
            .envs(s.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(d) = &s.spec.cwd {
            cmd.current_dir(d);
        }
        let procs = if cgroups {
            let dir = Path::new(CGROUP_ROOT).join("berth").join(&name);
            let _ = fs::create_dir_all(&dir);
            File::options().write(true).open(dir.join("cgroup.procs")).ok()
        } else {
            None
        };
        if let Some(f) = &procs {
            sys::join_cgroup_on_exec(&mut cmd, f);
        }
        if let Some(keep) = s.spec.caps {
            sys::keep_caps_on_exec(&mut cmd, keep);
        }
        let now = Instant::now();
        s.started_at = Some(now);
        s.started_uptime_ms = Some(crate::boot::report::uptime_ms());
        s.ready_uptime_ms = None;
        s.starts.push(SystemTime::now());
        if s.starts.len() > 10 {
            s.starts.remove(0);
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let pid = child.id() as i32;
                if let Some(out) = child.stdout.take() {
                    pump(name.clone(), out, s.log.clone());
                }
                if let Some(err) = child.stderr.take() {
                    pump(name.clone(), err, s.log.clone());
                }
                // The reaper collects the exit; the Child handle is not waited on.
                drop(child);
                s.pid = Some(pid);
                if let Some(r) = s.readiness.take() {
                    r.cancelled.store(true, Ordering::Relaxed);
                }
                s.state = match &s.spec.ready {
                    Ready::Started => {
                        s.ready_uptime_ms = s.started_uptime_ms;
                        ServiceState::Running
                    }
                    Ready::ContainerdVersion(path) => {
                        s.readiness = Some(wait_ready(&name, path.clone()));
                        ServiceState::Starting
                    }
                };
                info!("service {name} started (pid {pid})");
            }
            Err(e) => {
                s.log.lock().unwrap_or_else(|p| p.into_inner()).push(&format!("berth: cannot start: {e}"));
                warn!("service {name}: cannot start {}: {e}", s.spec.argv[0]);
                s.last_exit = Some((Exit::Code(127), SystemTime::now()));
                Self::schedule_restart(s, now);
            }
        }
    }

    fn schedule_restart(s: &mut Service, now: Instant) {
        let healthy = s.started_at.is_some_and(|t| now.duration_since(t) >= HEALTHY_AFTER);
        if healthy {
            s.delay = MIN_DELAY;
        }
        let earliest = s.started_at.map(|t| t + MIN_DELAY).unwrap_or(now);
        let until = (now + s.delay).max(earliest);
        s.delay = (s.delay * 2).min(MAX_DELAY);
        s.state = ServiceState::Backoff { until };
        s.restarts += 1;
    }

    /// Start, check and restart whatever is due. Call often (PID 1 does, every 200 ms).
    pub fn tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.services.len() {
            let due = match &self.services[i].state {
                ServiceState::Waiting => self.services[i].spec.deps.iter().all(|d| self.is_ready(d)),
                ServiceState::Backoff { until } => now >= *until,
                ServiceState::Starting => {
                    let s = &mut self.services[i];
                    if let Some(r) = s.readiness.as_ref().filter(|r| r.ready.load(Ordering::Acquire)) {
                        s.state = ServiceState::Running;
                        s.ready_uptime_ms = Some(r.at_ms.load(Ordering::Relaxed));
                    }
                    false
                }
                _ => false,
            };
            if due {
                self.start(i);
            }
        }
    }

    /// A process exited; returns whether it was one of ours.
    pub fn on_exit(&mut self, pid: i32, exit: Exit) -> bool {
        let Some(s) = self.services.iter_mut().find(|s| s.pid == Some(pid)) else {
            return false;
        };
        let now = Instant::now();
        s.pid = None;
        if let Some(r) = s.readiness.take() {
            r.cancelled.store(true, Ordering::Relaxed);
        }
        s.last_exit = Some((exit, SystemTime::now()));
        info!("service {} exited ({exit})", s.spec.name);
        let again = match (s.spec.restart, exit) {
            _ if s.state == ServiceState::Stopped => false,
            (Restart::Always, _) => true,
            (Restart::Never, _) => false,
        };
        if again {
            Self::schedule_restart(s, now);
        } else if s.state != ServiceState::Stopped {
            s.state = ServiceState::Exited;
        }
        true
    }

    /// Services with a live process, dependents before what they depend on.
    pub fn stop_order(&self) -> Vec<(String, i32)> {
        let mut order: Vec<&Service> = Vec::new();
        let mut pending: Vec<&Service> = self.services.iter().collect();
        // Start order is a topological order; stopping goes the other way.
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|s| {
                let deps_done = s.spec.deps.iter().all(|d| order.iter().any(|o| &o.spec.name == d));
                if deps_done {
                    order.push(s);
                }
                !deps_done
            });
            if pending.len() == before {
                order.append(&mut pending); // a cycle or an unknown dependency
            }
        }
        order.iter().rev().filter_map(|s| s.pid.map(|p| (s.spec.name.clone(), p))).collect()
    }

    /// Mark `name` stopped (it will not be restarted) and return its pid if it is running.
    pub fn stop(&mut self, name: &str) -> Option<i32> {
        let s = self.services.iter_mut().find(|s| s.spec.name == name)?;
        if !matches!(s.state, ServiceState::Absent(_)) {
            s.state = ServiceState::Stopped;
        }
        s.pid
    }

    /// Add a service, or bring an existing one in line with `spec`: a stopped one starts again,
    /// a running one with a different command is restarted with the new one.
    pub fn ensure(&mut self, spec: ServiceSpec) {
        let Some(s) = self.services.iter_mut().find(|s| s.spec.name == spec.name) else {
            self.services.push(Service::new(spec));
            return;
        };
        let changed = s.spec.argv != spec.argv || s.spec.env != spec.env;
        s.spec = spec;
        s.delay = MIN_DELAY;
        match (&s.state, s.pid) {
            (ServiceState::Stopped | ServiceState::Exited, None) => s.state = ServiceState::Waiting,
            (ServiceState::Stopped, Some(_)) => {} // still stopping; started again by a later ensure
            (_, Some(pid)) if changed => {
                info!("restarting service {} for its new command or environment", s.spec.name);
                let _ = sys::kill(-pid, libc::SIGTERM);
            }
            _ => {}
        }
    }

    /// Stop `name` for good: mark it stopped and send SIGTERM to its process group.
    pub fn disable(&mut self, name: &str) {
        if let Some(pid) = self.stop(name) {
            info!("stopping service {name} (pid {pid})");
            let _ = sys::kill(-pid, libc::SIGTERM);
        }
    }

    /// Restart `name` to make it re-read its configuration: SIGTERM to its process group;
    /// the exit is handled as usual (restarted after at least the minimum delay).
    pub fn restart(&mut self, name: &str) {
        if let Some(s) = self.services.iter_mut().find(|s| s.spec.name == name) {
            if let Some(pid) = s.pid {
                info!("restarting service {name} (pid {pid}) for its new configuration");
                s.delay = MIN_DELAY;
                let _ = sys::kill(-pid, libc::SIGTERM);
            }
        }
    }

    /// Whether each named service is ready, or cannot run here at all (absent).
    pub fn healthy(&self, names: &[&str]) -> bool {
        names.iter().all(|n| {
            self.services
                .iter()
                .find(|s| s.spec.name == *n)
                .is_none_or(|s| matches!(s.state, ServiceState::Running | ServiceState::Absent(_)))
        })
    }

    /// The names of the declared services.
    pub fn names(&self) -> Vec<String> {
        self.services.iter().map(|s| s.spec.name.clone()).collect()
    }

    pub fn has_pid(&self, pid: i32) -> bool {
        self.services.iter().any(|s| s.pid == Some(pid))
    }

    pub fn report(&self) -> Value {
        Value::Object(self.services.iter().map(|s| (s.spec.name.clone(), s.report())).collect())
    }

    /// Each service's last start and when it became ready (kernel-relative ms; null if not
    /// yet), in start order, for the boot timeline (`GET /boot`).
    pub fn timeline(&self) -> Value {
        let mut started: Vec<&Service> =
            self.services.iter().filter(|s| s.started_uptime_ms.is_some()).collect();
        started.sort_by_key(|s| s.started_uptime_ms);
        started
            .iter()
            .map(|s| json!({"name": s.spec.name, "start-ms": s.started_uptime_ms, "ready-ms": s.ready_uptime_ms}))
            .collect()
    }

    pub fn report_one(&self, name: &str) -> Option<Value> {
        self.services.iter().find(|s| s.spec.name == name).map(Service::report)
    }

    pub fn logs(&self, name: &str) -> Option<String> {
        self.services
            .iter()
            .find(|s| s.spec.name == name)
            .map(|s| s.log.lock().unwrap_or_else(|p| p.into_inner()).text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, deps: &[&str]) -> ServiceSpec {
        let mut s = ServiceSpec::new(name, &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]);
        s.deps = deps.iter().map(|d| d.to_string()).collect();
        s
    }

    #[test]
    fn missing_programs_are_absent() {
        let s = ServiceSpec::new("kubelet", &["/usr/bin/kubelet-not-here"]);
        let sup = Supervisor::new(vec![s]);
        let r = sup.report();
        assert_eq!(r["kubelet"]["state"], "absent");
        assert!(r["kubelet"]["reason"].as_str().unwrap().contains("not in this image"));
    }

    #[test]
    fn a_service_is_ready_when_its_socket_answers_the_version_call_and_dependents_wait() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("berth-ready-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sock = dir.join("run/containerd.sock");
        let mut c = ServiceSpec::new("containerd", &["/bin/sleep", "30"]);
        c.ready = Ready::ContainerdVersion(sock.clone());
        let mut sup = Supervisor::new(vec![spec("after", &["containerd"]), c]);
        sup.tick();
        assert_eq!(sup.report_one("containerd").unwrap()["state"], "starting");
        // Nothing answers yet: still starting, the dependent waits.
        std::thread::sleep(Duration::from_millis(200));
        sup.tick();
        assert_eq!(sup.report_one("containerd").unwrap()["state"], "starting");
        assert_eq!(sup.report_one("after").unwrap()["state"], "waiting");
        // A stand-in for containerd: the socket appears and answers (the thread sees it through
        // inotify, not by polling).
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = l.accept().unwrap();
            let mut buf = vec![0u8; probe::request().len()];
            conn.read_exact(&mut buf).unwrap();
            assert_eq!(buf, probe::request());
            let msg = [0u8, 0, 0, 0, 7, 0x0a, 5, b'1', b'.', b'6', b'.', b'9'];
            let mut answer = vec![0, 0, 0, 4, 0, 0, 0, 0, 0]; // SETTINGS
            answer.extend_from_slice(&[0, 0, msg.len() as u8, 0, 0, 0, 0, 0, 1]);
            answer.extend_from_slice(&msg);
            conn.write_all(&answer).unwrap();
            let _ = conn.read(&mut [0u8; 64]); // the client's SETTINGS ACK, then it closes
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while sup.report_one("containerd").unwrap()["state"] != "running" {
            assert!(Instant::now() < deadline, "{}", sup.report());
            std::thread::sleep(Duration::from_millis(20));
            sup.tick();
        }
        server.join().unwrap();
        sup.tick();
        assert_eq!(sup.report_one("after").unwrap()["state"], "running", "started once containerd is ready");
        let t = sup.timeline();
        assert_eq!(t[0]["name"], "containerd");
        assert!(t[0]["ready-ms"].as_u64().unwrap() >= t[0]["start-ms"].as_u64().unwrap(), "{t}");
        for (_, pid) in sup.stop_order() {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn dependencies_order_start_and_stop() {
        let mut sup = Supervisor::new(vec![spec("b", &["a"]), spec("a", &[])]);
        sup.tick();
        // a starts first; b waits for a to be ready (Ready::Started: at once) and starts next tick.
        assert!(sup.services[1].pid.is_some());
        sup.tick();
        assert!(sup.services[0].pid.is_some());
        let order: Vec<String> = sup.stop_order().into_iter().map(|(n, _)| n).collect();
        assert_eq!(order, vec!["b", "a"]);
    }

    #[test]
    fn exits_back_off_and_capture_output() {
        let mut sup = Supervisor::new(vec![spec("crash", &[])]);
        sup.tick();
        let pid = sup.services[0].pid.unwrap();
        // Stand in for PID 1's reaper, which hands over the exit.
        std::thread::sleep(Duration::from_millis(200));
        assert!(sup.on_exit(pid, Exit::Code(3)));
        assert!(!sup.on_exit(999_999, Exit::Code(0)), "not ours");
        let r = sup.report_one("crash").unwrap();
        assert_eq!(r["state"], "backoff");
        assert_eq!(r["restarts"], 1);
        assert_eq!(r["last_exit"]["code"], 3);
        assert!(r["restart_in_ms"].as_u64().unwrap() > 500, "at least ~1 s between starts");
        std::thread::sleep(Duration::from_millis(100));
        let logs = sup.logs("crash").unwrap();
        assert!(logs.contains("out") && logs.contains("err"), "{logs:?}");
        // The delay doubles on a crash loop.
        assert_eq!(sup.services[0].delay, Duration::from_secs(2));
    }

    #[test]
    fn services_keep_only_the_capabilities_they_name() {
        if let Some(why) = crate::testing::needs_root() {
            return crate::testing::cannot_run(
                "supervisor::tests::services_keep_only_the_capabilities_they_name",
                &why,
            );
        }
        let grep = ["/bin/sh", "-c", "grep CapBnd /proc/self/status"];
        let mut two = ServiceSpec::new("two", &grep);
        two.caps = Some(CapabilitySet::NET_BIND_SERVICE | CapabilitySet::NET_RAW); // bits 10, 13
        let mut none = ServiceSpec::new("none", &grep);
        none.caps = Some(CapabilitySet::empty());
        let mut sup = Supervisor::new(vec![two, none]);
        sup.tick();
        std::thread::sleep(Duration::from_millis(300));
        let logs = sup.logs("two").unwrap();
        assert!(logs.contains("CapBnd:\t0000000000002400"), "{logs:?}");
        let logs = sup.logs("none").unwrap();
        assert!(logs.contains("CapBnd:\t0000000000000000"), "{logs:?}");
    }

    #[test]
    fn stopped_services_are_not_restarted() {
        let mut sup = Supervisor::new(vec![spec("s", &[])]);
        sup.tick();
        let pid = sup.stop("s").unwrap();
        assert!(sup.on_exit(pid, Exit::Signal(15)));
        assert_eq!(sup.report_one("s").unwrap()["state"], "stopped");
    }
}
