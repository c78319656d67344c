//! Every system call and ioctl Berth makes, behind small safe functions.
//!
//! The calls go through [`rustix`] wherever it has them: it makes the Linux system calls
//! directly (its `linux_raw` backend, no libc in between) with typed arguments and `io::Result`
//! returns. This module keeps Berth's own narrow API on top (what the callers need, in the
//! callers' terms: `MS_*` flags, signal numbers), so the rest of the code calls `sys::mount`,
//! `sys::kill`, `sys::reap_one`, uses libc only for its constants and rustix not at all, and
//! one place decides how each call is made.
//!
//! It is also the only module allowed `unsafe` code: `unsafe_code` is denied for the crate in
//! Cargo.toml and allowed here, and clippy's `undocumented_unsafe_blocks` makes every `unsafe`
//! block carry a `// SAFETY:` comment. What stays raw (libc or an `unsafe` rustix interface),
//! and why:
//!
//! - **signalfd(2) and pthread_sigmask(3)** ([`SignalFd`]): rustix has no signalfd, and its
//!   sigprocmask lives in its hidden, unstable `runtime` module.
//! - **fork(2) and _exit(2)** ([`fork`], [`exit_now`], for the PID 1 self-tests): rustix keeps
//!   these in the same `runtime` module; libc's fork also runs musl's atfork handlers, which
//!   keep its own locks usable in the child.
//! - **reboot(2) with an argument** ([`restart_with`], the Raspberry Pi's `"0 tryboot"`):
//!   rustix's reboot takes no argument (LINUX_REBOOT_CMD_RESTART2).
//! - **kill(-1, sig)** (every process but us, at shutdown): rustix's kill functions take a
//!   process or group id, never -1.
//! - **setsockopt for SO_BINDTODEVICE, NETLINK_EXT_ACK and NETLINK_CAP_ACK** ([`net`]): rustix
//!   has no setter for these options.
//! - **The ioctls BLKGETSIZE64, BLKPG, WDIOC_SETTIMEOUT** ([`ioctl`]) **and the device-mapper
//!   ioctls** ([`dm`]): rustix wraps only a few ioctls as safe functions (BLKSSZGET and
//!   EXT4_IOC_RESIZE_FS, which are used); these go through its typed `rustix::ioctl` interface,
//!   which computes the request number from the argument's type, but the call is `unsafe`.
//! - **madvise(2)** ([`page_out`]): rustix has it only behind its `mm` feature, as an `unsafe`
//!   function all the same.
//! - **`Command::pre_exec`** ([`join_cgroup_on_exec`], [`keep_caps_on_exec`]): std marks it
//!   `unsafe` because the closure runs between fork and exec; ours make only rustix system
//!   calls (no allocation, no locks).
//!
//! Not used: `nix` (a second, libc-based wrapper of the same calls, not in the dependency tree)
//! and `caps` (the bounding set is all Berth touches, and rustix has it); see
//! docs/dependencies.md.

#![allow(unsafe_code)]

pub mod dm;
mod ioctl;
pub mod net;
mod process;
pub mod pty;
pub mod time;

use std::ffi::CString;
use std::io;
use std::path::Path;

use rustix::fs::{FileType, Mode, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::system::RebootCommand;

pub use ioctl::{block_size_bytes, ext4_resize, logical_sector_size, resize_partition, watchdog_set_timeout};
pub use libc::{
    MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_RELATIME, MS_REMOUNT, MS_SHARED,
};
pub use process::{
    deliver, exec, exit_now, fork, getpid, join_cgroup_on_exec, keep_caps_on_exec, kill, reap_one,
    spawn_awaited, wait_awaited, Exit, SignalFd,
};
pub use rustix::thread::CapabilitySet;

/// A C return value: negative means failure, with the reason in errno.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

const PROPAGATION: libc::c_ulong = libc::MS_SHARED | libc::MS_PRIVATE | libc::MS_SLAVE | libc::MS_UNBINDABLE;

/// mount(2), with the flags of the C call (`MS_*`). What the flags ask for picks the call, in
/// the kernel's own order: a remount, a bind (recursive with `MS_REC`), a propagation change,
/// a move, or else a new mount, which needs `source` and `fstype`.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let bits = u32::try_from(flags).map_err(|_| invalid(format!("mount flags {flags:#x} out of range")))?;
    let data = data.map(CString::new).transpose()?;
    let source_of =
        |what: &str| source.ok_or_else(|| invalid(format!("{what} of {} needs a source", target.display())));
    if flags & MS_REMOUNT != 0 {
        let flags = MountFlags::from_bits_retain(bits & !(MS_REMOUNT as u32));
        rustix::mount::mount_remount(target, flags, data.as_deref().unwrap_or_default())?;
    } else if flags & MS_BIND != 0 {
        let source = source_of("a bind mount")?;
        if flags & MS_REC != 0 {
            rustix::mount::mount_bind_recursive(source, target)?;
        } else {
            rustix::mount::mount_bind(source, target)?;
        }
    } else if flags & PROPAGATION != 0 {
        rustix::mount::mount_change(target, MountPropagationFlags::from_bits_retain(bits))?;
    } else if flags & MS_MOVE != 0 {
        rustix::mount::mount_move(source_of("a move")?, target)?;
    } else {
        let fstype = fstype
            .ok_or_else(|| invalid(format!("mounting {} needs a filesystem type", target.display())))?;
        let source = source_of("a new mount")?;
        rustix::mount::mount(source, target, fstype, MountFlags::from_bits_retain(bits), data.as_deref())?;
    }
    Ok(())
}

/// umount2(2) with `MNT_*` flags.
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let flags = UnmountFlags::from_bits_retain(flags as u32);
    Ok(rustix::mount::unmount(target, flags)?)
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    Ok(rustix::process::chroot(path)?)
}

/// mknod(2) for a block device node.
pub fn mknod_block(path: &Path, major: u32, minor: u32, mode: u32) -> io::Result<()> {
    let dev = rustix::fs::makedev(major, minor);
    Ok(rustix::fs::mknodat(CWD, path, FileType::BlockDevice, Mode::from_bits_truncate(mode), dev)?)
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
        RebootMode::PowerOff => RebootCommand::PowerOff,
        RebootMode::Restart => RebootCommand::Restart,
        RebootMode::Halt => RebootCommand::Halt,
    };
    match rustix::system::reboot(cmd) {
        Err(e) => e.into(),
        Ok(()) => io::Error::other("reboot(2) returned"),
    }
}

/// reboot(2) with LINUX_REBOOT_CMD_RESTART2 and `arg` (the kernel passes it to the reboot
/// notifiers and the restart handler). Returns only on failure.
pub fn restart_with(arg: &str) -> io::Error {
    let arg = match CString::new(arg) {
        Ok(a) => a,
        Err(e) => return invalid(format!("restart argument: {e}")),
    };
    // SAFETY: reboot(2) with the magic numbers and a command that reads `arg` as a
    // NUL-terminated string, which the CString keeps alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            libc::LINUX_REBOOT_CMD_RESTART2,
            arg.as_ptr(),
        )
    };
    if r < 0 {
        io::Error::last_os_error()
    } else {
        io::Error::other("reboot(2) returned")
    }
}

/// Whether `f` is a terminal.
pub fn is_tty(f: &impl std::os::fd::AsFd) -> bool {
    rustix::termios::isatty(f)
}

/// Put the terminal `f` in raw mode (cfmakeraw): bytes pass unchanged, nothing is echoed. A
/// read returns what has arrived, or nothing (0) after a second without bytes, as a
/// virtio-serial port with no host connected does.
pub fn make_raw(f: &impl std::os::fd::AsFd) -> io::Result<()> {
    use rustix::termios::SpecialCodeIndex;
    let mut t = rustix::termios::tcgetattr(f)?;
    t.make_raw();
    t.special_codes[SpecialCodeIndex::VMIN] = 0;
    t.special_codes[SpecialCodeIndex::VTIME] = 10;
    Ok(rustix::termios::tcsetattr(f, rustix::termios::OptionalActions::Now, &t)?)
}

/// Make Ctrl-Alt-Del send SIGINT to PID 1 instead of restarting at once.
pub fn disable_cad() -> io::Result<()> {
    Ok(rustix::system::reboot(RebootCommand::CadOff)?)
}

/// madvise(2) `MADV_PAGEOUT` over `len` bytes at `addr` (page-aligned) of this process's own
/// address space: reclaim those pages now. Clean file pages only this process maps leave the
/// page cache; everything stays mapped as it was, and what is used again is read back in.
pub fn page_out(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_PAGEOUT changes no mapping, protection or content (a page it reclaims is
    // read back on its next use with the same data), so no reference into the range is
    // invalidated; the kernel checks the range itself (ENOMEM when part of it is not mapped).
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_PAGEOUT) }).map(|_| ())
}

/// sync(2).
pub fn sync() {
    rustix::fs::sync()
}

pub fn sethostname(name: &str) -> io::Result<()> {
    Ok(rustix::system::sethostname(name.as_bytes())?)
}

/// statfs(2): (filesystem type magic, block size, total blocks).
pub fn statfs(path: &Path) -> io::Result<(i64, u64, u64)> {
    let st = rustix::fs::statfs(path)?;
    Ok((st.f_type as i64, st.f_bsize as u64, st.f_blocks))
}

pub const RAMFS_MAGIC: i64 = 0x8584_58f6;
pub const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Make `fd` the process's stdin, stdout and stderr.
pub fn dup_to_stdio(fd: &std::fs::File) -> io::Result<()> {
    rustix::stdio::dup2_stdin(fd)?;
    rustix::stdio::dup2_stdout(fd)?;
    Ok(rustix::stdio::dup2_stderr(fd)?)
}

/// The running kernel's release string (uname -r).
pub fn kernel_release() -> String {
    rustix::system::uname().release().to_string_lossy().into_owned()
}

/// Drop the clean page cache of `f` (a file or block device), so that what is read next comes
/// from the device itself.
pub fn drop_page_cache(f: &std::fs::File) -> io::Result<()> {
    Ok(rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed)?)
}

/// Set the realtime clock to `secs` since the epoch (needs CAP_SYS_TIME).
pub fn set_realtime(secs: i64) -> io::Result<()> {
    let ts = rustix::time::Timespec { tv_sec: secs, tv_nsec: 0 };
    Ok(rustix::time::clock_settime(rustix::time::ClockId::Realtime, ts)?)
}

/// Whether this process runs as root (effective uid 0); tests that need root ask this.
/// A path field of /proc/*/mountinfo with its octal escapes decoded (the kernel writes space,
/// tab, newline and backslash as `\040`, `\011`, `\012`, `\134`).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Clear the immutable attribute of `path` if it is set (efivarfs sets it on every variable;
/// it must be cleared before the variable is written or deleted). A file that does not exist
/// or a filesystem without attributes (a test directory on tmpfs) is not an error.
pub fn clear_immutable(path: &Path) -> io::Result<()> {
    use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let flags = match ioctl_getflags(&f) {
        Ok(flags) => flags,
        Err(rustix::io::Errno::NOTTY) | Err(rustix::io::Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if flags.contains(IFlags::IMMUTABLE) {
        ioctl_setflags(&f, flags - IFlags::IMMUTABLE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn a_new_mount_needs_a_source_and_a_type() {
        let e = mount(None, Path::new("/nonexistent"), Some("tmpfs"), MS_NOSUID, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = mount(Some("tmpfs"), Path::new("/nonexistent"), None, 0, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = mount(None, Path::new("/nonexistent"), None, MS_MOVE, None).unwrap_err();
        assert!(e.to_string().contains("a move of /nonexistent needs a source"), "{e}");
    }

    /// Each kind of mount against the kernel, in a mount namespace of this test's own thread
    /// (gone with the thread, and private, so nothing reaches the host's mounts): a new tmpfs
    /// with options, a block device node in it, a bind, a read-only remount of the bind, a
    /// propagation change, a move and the unmounts.
    #[test]
    fn mounts_in_a_private_namespace() {
        if let Some(why) = crate::testing::needs_root() {
            return crate::testing::cannot_run("sys::tests::mounts_in_a_private_namespace", &why);
        }
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        // SAFETY: only CLONE_NEWNS (and the CLONE_FS it implies): this thread gets its own
        // mount namespace, root and working directory; its descriptor table stays shared.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.unwrap();
        mount(None, Path::new("/"), None, MS_REC | libc::MS_PRIVATE, None).unwrap();
        let top = std::env::temp_dir().join(format!("berth-sys-mounts-{}", getpid()));
        let (a, b, c) = (top.join("a"), top.join("b"), top.join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mountinfo = |dir: &Path| {
            let text = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            let dir = dir.to_str().unwrap();
            text.lines().filter(|l| l.split(' ').nth(4) == Some(dir)).map(String::from).collect::<Vec<_>>()
        };

        mount(Some("tmpfs"), &a, Some("tmpfs"), MS_NOSUID, Some("size=1m,mode=0700")).unwrap();
        assert_eq!(statfs(&a).unwrap().0, TMPFS_MAGIC);
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
            0o700,
            "options reached tmpfs"
        );
        mknod_block(&a.join("loop0"), 7, 0, 0o600).unwrap();
        let md = std::fs::metadata(a.join("loop0")).unwrap();
        assert!(md.file_type().is_block_device());
        assert_eq!(md.rdev(), rustix::fs::makedev(7, 0));
        std::fs::write(a.join("f"), "x").unwrap();

        mount(Some(a.to_str().unwrap()), &b, None, MS_BIND, None).unwrap();
        assert!(b.join("f").exists(), "bind shows a's files");
        mount(None, &b, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None).unwrap();
        let e = std::fs::write(b.join("g"), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        std::fs::write(a.join("g"), "x").expect("only the bind is read-only");

        assert!(!mountinfo(&a)[0].contains("shared:"), "{:?}", mountinfo(&a));
        mount(None, &a, None, MS_REC | MS_SHARED, None).unwrap();
        assert!(mountinfo(&a)[0].contains("shared:"), "{:?}", mountinfo(&a));

        mount(Some(b.to_str().unwrap()), &c, None, MS_MOVE, None).unwrap();
        assert!(mountinfo(&b).is_empty() && c.join("f").exists(), "moved");

        umount(&c, 0).unwrap();
        umount(&a, libc::MNT_DETACH).unwrap();
        assert!(mountinfo(&a).is_empty() && mountinfo(&c).is_empty());
        let e = umount(&a, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "not a mount point any more: {e}");
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn the_kernel_release_is_known() {
        let r = kernel_release();
        assert!(r.chars().next().is_some_and(|c| c.is_ascii_digit()), "{r}");
    }

    #[test]
    fn statfs_reports_the_filesystem() {
        let (magic, bsize, blocks) = statfs(Path::new("/proc")).unwrap();
        assert_eq!(magic, 0x9fa0, "procfs magic");
        assert!(bsize > 0);
        assert_eq!(blocks, 0, "procfs has no blocks");
    }

    /// The crate denies `unsafe_code` (Cargo.toml); only `src/sys/` may allow it again.
    #[test]
    fn only_sys_allows_unsafe_code() {
        fn walk(dir: &Path, found: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, found);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    if text.contains(concat!("allow(", "unsafe_code)")) {
                        found.push(p.display().to_string());
                    }
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        walk(&src, &mut found);
        let outside: Vec<_> = found.iter().filter(|p| !Path::new(p).starts_with(src.join("sys"))).collect();
        assert!(outside.is_empty(), "unsafe code allowed outside src/sys: {outside:?}");
        assert!(!found.is_empty(), "src/sys itself allows unsafe code");
    }
}
