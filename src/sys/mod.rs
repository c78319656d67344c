//! Every raw system call and ioctl Berth makes, behind small safe functions.
//!
//! This is the only module allowed `unsafe` code. Each wrapper turns the C return convention
//! into `io::Result` and names what it acted on in the error, so callers can add context
//! without re-deriving it. Device-mapper ioctls live in [`dm`].

#![allow(unsafe_code)]

pub mod dm;
pub mod net;
pub mod time;

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub use libc::{
    MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, MS_SHARED,
};

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// mount(2). `source` and `fstype` may be absent (bind, move, remount, propagation changes).
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = source.map(CString::new).transpose()?;
    let fst = fstype.map(CString::new).transpose()?;
    let dat = data.map(CString::new).transpose()?;
    let tgt = cstr(target)?;
    // SAFETY: all pointers are either null or point to NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            tgt.as_ptr(),
            fst.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            dat.as_ref().map_or(std::ptr::null(), |s| s.as_ptr() as *const libc::c_void),
        )
    };
    check(ret).map(drop)
}

/// umount2(2).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let tgt = cstr(target)?;
    // SAFETY: tgt is a valid NUL-terminated string.
    check(unsafe { libc::umount2(tgt.as_ptr(), flags) }).map(drop)
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: p is a valid NUL-terminated string.
    check(unsafe { libc::chroot(p.as_ptr()) }).map(drop)
}

/// mknod(2) for a block device node.
pub fn mknod_block(path: &Path, major: u32, minor: u32, mode: u32) -> io::Result<()> {
    let p = cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: p is a valid NUL-terminated string.
    check(unsafe { libc::mknod(p.as_ptr(), libc::S_IFBLK | mode, dev) }).map(drop)
}

/// What reboot(2) should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    PowerOff,
    Restart,
    Halt,
}

/// reboot(2). Returns only on failure.
pub fn reboot(mode: RebootMode) -> io::Error {
    let cmd = match mode {
        RebootMode::PowerOff => libc::RB_POWER_OFF,
        RebootMode::Restart => libc::RB_AUTOBOOT,
        RebootMode::Halt => libc::RB_HALT_SYSTEM,
    };
    // SAFETY: reboot takes a plain integer command.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Make Ctrl-Alt-Del send SIGINT to PID 1 instead of restarting at once.
pub fn disable_cad() -> io::Result<()> {
    // SAFETY: plain integer command.
    check(unsafe { libc::reboot(libc::RB_DISABLE_CAD) }).map(drop)
}

/// sync(2).
pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() }
}

pub fn getpid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::getpid() }
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe a valid byte slice.
    check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) }).map(drop)
}

/// Send `sig` to `pid` (negative pid: a process group; -1: every process but us).
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
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
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let pid = check(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) })?;
    if pid == 0 {
        return Ok(None);
    }
    let exit = if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else {
        Exit::Signal(libc::WTERMSIG(status))
    };
    Ok(Some((pid, exit)))
}

/// A set of signals, blocked for the whole process and read through a signalfd.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Block `signals` in the calling thread (call before spawning threads, so they inherit the
    /// mask) and open a signalfd for them.
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        // SAFETY: set is initialised by sigemptyset before use; all pointers are valid.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            let fd = check(libc::signalfd(-1, &set, libc::SFD_CLOEXEC))?;
            Ok(SignalFd { fd: OwnedFd::from_raw_fd(fd) })
        }
    }

    /// Wait up to `timeout_ms` (-1: forever) for a signal. `Ok(None)` on timeout.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<Option<libc::c_int>> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is a valid pollfd array of length 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: signalfd_siginfo is plain old data; we read exactly its size into it.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let r = libc::read(self.fd.as_raw_fd(), &mut info as *mut _ as *mut libc::c_void, size);
            if r != size as isize {
                return Err(io::Error::last_os_error());
            }
            Ok(Some(info.ssi_signo as libc::c_int))
        }
    }
}

/// _IOR(0x12, 114, u64)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of a block device (BLKGETSIZE64).
pub fn block_size_bytes(dev: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64 as _, &mut size) })?;
    Ok(size)
}

/// Logical sector size of a block device (BLKSSZGET).
pub fn logical_sector_size(dev: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), libc::BLKSSZGET, &mut size) })?;
    Ok(size as u32)
}

#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: libc::c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

/// Tell the kernel that partition `pno` of the whole-disk device `disk` now spans
/// `start..start+length` bytes (BLKPG_RESIZE_PARTITION); works while it is mounted.
pub fn resize_partition(disk: &File, pno: u32, start: u64, length: u64) -> io::Result<()> {
    let mut part = BlkpgPartition {
        start: start as i64,
        length: length as i64,
        pno: pno as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: &mut part as *mut _ as *mut libc::c_void,
    };
    // SAFETY: arg points to a valid blkpg_ioctl_arg whose data points to a live blkpg_partition.
    check(unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG as _, &mut arg) }).map(drop)
}

/// EXT4_IOC_RESIZE_FS = _IOW('f', 16, __u64)
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grow a mounted ext4 filesystem to `blocks` filesystem blocks (online resize).
pub fn ext4_resize(mountpoint: &File, blocks: u64) -> io::Result<()> {
    let b = blocks;
    // SAFETY: the ioctl reads one u64 through the pointer.
    check(unsafe { libc::ioctl(mountpoint.as_raw_fd(), EXT4_IOC_RESIZE_FS as _, &b) }).map(drop)
}

/// statfs(2): (filesystem type magic, block size, total blocks).
pub fn statfs(path: &Path) -> io::Result<(i64, u64, u64)> {
    let p = cstr(path)?;
    // SAFETY: st is a valid out-pointer; p is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        check(libc::statfs(p.as_ptr(), &mut st))?;
        Ok((st.f_type as i64, st.f_bsize as u64, st.f_blocks as u64))
    }
}

pub const RAMFS_MAGIC: i64 = 0x8584_58f6;
pub const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Make `fd` the process's stdin, stdout and stderr.
pub fn dup_to_stdio(fd: &File) -> io::Result<()> {
    for target in 0..3 {
        // SAFETY: both descriptors are valid; dup2 has no memory effects.
        check(unsafe { libc::dup2(fd.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// execv(2) `path` with `args` (args[0] included). Returns only on failure.
pub fn exec(path: &Path, args: &[&str]) -> io::Error {
    let p = match cstr(path) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let owned: Vec<CString> = match args.iter().map(|a| CString::new(*a)).collect() {
        Ok(v) => v,
        Err(_) => return io::Error::new(io::ErrorKind::InvalidInput, "argument has a NUL byte"),
    };
    let mut ptrs: Vec<*const libc::c_char> = owned.iter().map(|s| s.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: p and every element of ptrs are valid NUL-terminated strings, ptrs ends with null.
    unsafe { libc::execv(p.as_ptr(), ptrs.as_ptr()) };
    io::Error::last_os_error()
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
pub fn join_cgroup_on_exec(cmd: &mut std::process::Command, procs: &File) {
    use std::os::unix::process::CommandExt;
    let fd = procs.as_raw_fd();
    // SAFETY: between fork and exec the closure only calls write(2) on a descriptor opened
    // before the fork: async-signal-safe, no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Make the child of `cmd` drop every capability not in `keep` from its bounding set before it
/// execs. A program run as root then gets only `keep` (its permitted set is the bounding set).
pub fn keep_caps_on_exec(cmd: &mut std::process::Command, keep: &[u32]) {
    use std::os::unix::process::CommandExt;
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    let drop: Vec<u32> = (0..=last).filter(|c| !keep.contains(c)).collect();
    // SAFETY: between fork and exec the closure only calls prctl(2) with integers, over a
    // vector allocated before the fork: async-signal-safe, no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            for &cap in &drop {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The running kernel's release string (uname -r).
pub fn kernel_release() -> String {
    // SAFETY: uts is a valid out-pointer; release is NUL-terminated by the kernel.
    unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) != 0 {
            return String::from("unknown");
        }
        CStr::from_ptr(uts.release.as_ptr()).to_string_lossy().into_owned()
    }
}

/// Drop the clean page cache of `f` (a file or block device), so that what is read next comes
/// from the device itself.
pub fn drop_page_cache(f: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise only takes a valid open fd and plain integers.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Set the realtime clock to `secs` since the epoch (needs CAP_SYS_TIME).
pub fn set_realtime(secs: i64) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: secs as _, tv_nsec: 0 };
    // SAFETY: clock_settime reads the timespec we pass by reference.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// WDIOC_SETTIMEOUT: set a watchdog's timeout in seconds; returns what the driver chose.
pub fn watchdog_set_timeout(dev: &File, secs: i32) -> io::Result<i32> {
    const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;
    let mut t: libc::c_int = secs;
    // SAFETY: the ioctl reads and writes one c_int we own.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut t) })?;
    Ok(t)
}
