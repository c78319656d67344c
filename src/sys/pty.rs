//! Pseudo-terminals for `apiclient exec -t`: a pty pair, its window size, a child that makes the
//! pty its controlling terminal, and raw mode for the client's own terminal.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{OptionalActions, Termios, Winsize};

/// A new pty pair: (master, slave), both close-on-exec.
pub fn open() -> io::Result<(OwnedFd, OwnedFd)> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave =
        rustix::fs::open(name.as_c_str(), OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())?;
    Ok((master, slave))
}

/// Set a terminal's window size (on a pty master: the slave's foreground process group gets
/// SIGWINCH).
pub fn set_size(fd: impl AsFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    Ok(rustix::termios::tcsetwinsize(fd, ws)?)
}

/// A terminal's window size (rows, cols), if `fd` is a terminal.
pub fn size(fd: impl AsFd) -> Option<(u16, u16)> {
    rustix::termios::tcgetwinsize(fd).ok().map(|w| (w.ws_row, w.ws_col))
}

/// Put a terminal in raw mode; returns the settings to restore.
pub fn make_raw(fd: impl AsFd) -> io::Result<Termios> {
    let saved = rustix::termios::tcgetattr(&fd)?;
    let mut raw = saved.clone();
    raw.make_raw();
    rustix::termios::tcsetattr(&fd, OptionalActions::Now, &raw)?;
    Ok(saved)
}

pub fn restore(fd: impl AsFd, saved: &Termios) -> io::Result<()> {
    Ok(rustix::termios::tcsetattr(fd, OptionalActions::Now, saved)?)
}

/// Make the child of `cmd` start a session of its own and take its stdin (a pty slave) as its
/// controlling terminal, so the terminal's signals and SIGWINCH reach it.
pub fn controlling_tty_on_exec(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec: it makes two system calls
    // through rustix (setsid, ioctl TIOCSCTTY on fd 0), which allocate nothing and take no lock.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(BorrowedFd::borrow_raw(io::stdin().as_raw_fd()))?;
            Ok(())
        });
    }
}
