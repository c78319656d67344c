//! Processes: signals, the one reaper, fork and exec, and what a service's child does between
//! fork and exec (join its cgroup, drop capabilities).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};
use rustix::thread::CapabilitySet;

use super::{check, invalid};

pub fn getpid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// Send `sig` to `pid` (negative pid: a process group; -1: every process but us).
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    let signal = Signal::from_named_raw(sig).ok_or_else(|| invalid(format!("{sig} is not a signal")))?;
    if pid == -1 {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        return check(unsafe { libc::kill(-1, signal.as_raw()) }).map(drop);
    }
    let target = |p: i32| Pid::from_raw(p).ok_or_else(|| invalid(format!("no process {pid}")));
    if pid == 0 {
        rustix::process::kill_current_process_group(signal)?;
    } else if pid > 0 {
        rustix::process::kill_process(target(pid)?, signal)?;
    } else {
        rustix::process::kill_process_group(target(pid.checked_neg().unwrap_or(0))?, signal)?;
    }
    Ok(())
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// Reap one exited child of any kind without blocking: `Ok(None)` when none is waiting,
/// `Err(ECHILD)` when there are no children at all. This is the program's only `waitpid(-1)`.
pub fn reap_one() -> io::Result<Option<(i32, Exit)>> {
    // rustix's `wait` is wait4(-1): any child. (Its `waitpid(None, ..)` is wait4(0), the
    // caller's process group only, which would miss every service and every orphan.)
    let Some((pid, status)) = rustix::process::wait(WaitOptions::NOHANG)? else {
        return Ok(None);
    };
    // Without WUNTRACED/WCONTINUED only exits and deaths by signal are reported.
    let exit = match status.exit_status() {
        Some(code) => Exit::Code(code),
        None => Exit::Signal(status.terminating_signal().unwrap_or(0)),
    };
    Ok(Some((pid.as_raw_nonzero().get(), exit)))
}

// ---- Children a thread of PID 1 waits for itself (mkfs for ephemeral storage) ----------------
// PID 1's event loop reaps every child with wait(-1), so a thread that runs a program and waits
// for it races the reaper (and gets ECHILD when the reaper wins). Such a child is spawned with
// the table locked and entered in it; the reaper hands it its exit through [`deliver`], and
// [`wait_awaited`] takes it from there (or reaps the child itself when no reaper runs).

static AWAITED: std::sync::Mutex<std::collections::BTreeMap<i32, Option<Exit>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
static AWAITED_CV: std::sync::Condvar = std::sync::Condvar::new();

fn awaited() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<i32, Option<Exit>>> {
    AWAITED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawn `cmd` as a child whose exit [`wait_awaited`] returns, whoever reaps it.
pub fn spawn_awaited(cmd: &mut Command) -> io::Result<std::process::Child> {
    let mut table = awaited();
    let child = cmd.spawn()?;
    table.insert(child.id() as i32, None);
    Ok(child)
}

/// The reaper's part: record `pid`'s exit if a thread awaits it; false if none does.
pub fn deliver(pid: i32, exit: Exit) -> bool {
    let mut table = awaited();
    match table.get_mut(&pid) {
        Some(slot) => {
            *slot = Some(exit);
            AWAITED_CV.notify_all();
            true
        }
        None => false,
    }
}

/// Wait for the exit of `pid`, spawned by [`spawn_awaited`].
pub fn wait_awaited(pid: u32) -> io::Result<Exit> {
    let pid_i = pid as i32;
    let mut table = awaited();
    loop {
        if let Some(Some(exit)) = table.get(&pid_i) {
            let exit = *exit;
            table.remove(&pid_i);
            return Ok(exit);
        }
        if !table.contains_key(&pid_i) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid} is not awaited")));
        }
        // No reaper (not PID 1), or it has not come round yet: reap it here if it has exited.
        let p = Pid::from_raw(pid_i).ok_or_else(|| invalid(format!("pid {pid}")))?;
        match rustix::process::waitpid(Some(p), WaitOptions::NOHANG) {
            Ok(Some((_, status))) => {
                table.remove(&pid_i);
                return Ok(match status.exit_status() {
                    Some(code) => Exit::Code(code),
                    None => Exit::Signal(status.terminating_signal().unwrap_or(0)),
                });
            }
            // ECHILD: the reaper took it; its delivery comes under this lock.
            Ok(None) | Err(Errno::CHILD) => {}
            Err(e) => {
                table.remove(&pid_i);
                return Err(e.into());
            }
        }
        table = AWAITED_CV
            .wait_timeout(table, std::time::Duration::from_millis(100))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// The size of `struct signalfd_siginfo`; its first field is `u32 ssi_signo`.
const SIGINFO_SIZE: usize = 128;
const _: () = assert!(std::mem::size_of::<libc::signalfd_siginfo>() == SIGINFO_SIZE);

/// A set of signals, blocked for the whole process and read through a signalfd.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Block `signals` in the calling thread (call before spawning threads, so they inherit the
    /// mask) and open a signalfd for them.
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data and all-zero bits are the empty set (what
        // sigemptyset writes on Linux).
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        for &s in signals {
            // SAFETY: `set` is a live, initialised sigset_t that sigaddset may write.
            check(unsafe { libc::sigaddset(&mut set, s) })?;
        }
        // SAFETY: `set` is a valid sigset_t; the old mask is not asked for (null).
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: -1 asks for a new descriptor; signalfd only reads `set`.
        let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) })?;
        // SAFETY: signalfd just returned `fd`, and nothing else owns it.
        Ok(SignalFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Wait up to `timeout_ms` (-1: forever) for a signal. `Ok(None)` on timeout.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<Option<libc::c_int>> {
        let timeout = u32::try_from(timeout_ms).ok().map(|ms| rustix::time::Timespec {
            tv_sec: (ms / 1000).into(),
            tv_nsec: ((ms % 1000) * 1_000_000).into(),
        });
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(0) | Err(Errno::INTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let mut info = [0u8; SIGINFO_SIZE];
        let n = rustix::io::read(&self.fd, &mut info)?;
        if n != SIGINFO_SIZE {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("signalfd: a {n}-byte read")));
        }
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        Ok(Some(signo as libc::c_int))
    }
}

/// execv(2) `path` with `args` (args[0] included), through std (which also empties the signal
/// mask for the new program). Returns only on failure.
pub fn exec(path: &Path, args: &[&str]) -> io::Error {
    let mut cmd = Command::new(path);
    if let Some((arg0, rest)) = args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.exec()
}

/// fork(2) for the self-tests: returns 0 in the child, the child's pid in the parent.
/// Only call from a single-threaded process.
pub fn fork() -> io::Result<i32> {
    // SAFETY: callers are single-threaded, so the child inherits a consistent address space.
    check(unsafe { libc::fork() })
}

/// _exit(2) without running destructors or atexit handlers (for forked children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Make the child of `cmd` move itself into the cgroup whose `cgroup.procs` is open as `procs`
/// before it execs (so it and everything it forks are accounted there from the start).
/// `procs` must stay open until the spawn returns.
pub fn join_cgroup_on_exec(cmd: &mut Command, procs: &File) {
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // work is allowed: it makes one write(2) system call through rustix (no allocation, no
    // locks). `fd` is open there, because the caller keeps `procs` open until the spawn
    // returns and the child's descriptor table is a copy taken during the spawn.
    unsafe {
        cmd.pre_exec(move || {
            rustix::io::write(BorrowedFd::borrow_raw(fd), b"0")?;
            Ok(())
        });
    }
}

/// Make the child of `cmd` drop every capability not in `keep` from its bounding set before it
/// execs. A program run as root then gets only `keep` (its permitted set is the bounding set).
pub fn keep_caps_on_exec(cmd: &mut Command, keep: CapabilitySet) {
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // work is allowed: it makes prctl(2) system calls through rustix (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || drop_bounding_caps_except(keep));
    }
}

/// Drop every capability but `keep` from this thread's bounding set. The kernel knows
/// capabilities 0..=cap_last_cap and refuses the next number with EINVAL: that is where the
/// loop ends, so a kernel with more capabilities than rustix names loses them too.
fn drop_bounding_caps_except(keep: CapabilitySet) -> io::Result<()> {
    for bit in 0..u64::BITS {
        let cap = CapabilitySet::from_bits_retain(1 << bit);
        if keep.contains(cap) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            Ok(()) => {}
            Err(Errno::INVAL) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    const REAPER_CHILD: &str = "BERTH_REAPER_TEST_CHILD";
    const REAPER_TEST: &str = "sys::process::tests::reaper_in_a_process_of_its_own";

    /// The one reaper reaps children whatever their process group (services run in their own,
    /// and so do the orphans PID 1 adopts). Runs the real check in a test process of its own, so
    /// that it reaps no other test's children.
    #[test]
    fn reap_one_reaps_children_of_any_process_group() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([REAPER_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(REAPER_CHILD, "1")
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    #[test]
    #[ignore = "the child half of reap_one_reaps_children_of_any_process_group"]
    fn reaper_in_a_process_of_its_own() {
        if std::env::var(REAPER_CHILD).is_err() {
            return crate::testing::cannot_run(REAPER_TEST, "it only runs as the child of its caller");
        }
        let reap = |script: &str| {
            // Reaped below by reap_one, not by std's wait.
            let child = Command::new("/bin/sh").args(["-c", script]).process_group(0).spawn().unwrap().id();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some((pid, exit)) = reap_one().unwrap() {
                    assert_eq!(pid, child as i32);
                    return exit;
                }
                assert!(Instant::now() < deadline, "child {child} was never reaped");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        assert_eq!(reap("exit 7"), Exit::Code(7));
        assert_eq!(reap("kill -TERM $$"), Exit::Signal(libc::SIGTERM));
        let e = reap_one().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECHILD), "no children left: {e}");
    }

    #[test]
    fn a_signalfd_reports_its_signals() {
        // SIGWINCH: blocked in this test's thread only, and nobody else sends it.
        let fd = SignalFd::new(&[libc::SIGWINCH]).unwrap();
        assert_eq!(fd.wait(0).unwrap(), None, "nothing pending yet");
        // SAFETY: test-only; raise(3) sends a signal to this thread, where it is blocked.
        assert_eq!(unsafe { libc::raise(libc::SIGWINCH) }, 0);
        assert_eq!(fd.wait(1000).unwrap(), Some(libc::SIGWINCH));
    }
}
