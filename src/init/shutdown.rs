//! Orderly shutdown: stop the services in reverse dependency order (SIGTERM to each one's
//! process group, a grace period, then SIGKILL), then every other process the same way,
//! unmount the
//! block-backed filesystems in reverse mount order (remounting read-only what stays busy),
//! sync with a time bound, and reboot(2). Never returns: if reboot(2) fails, PID 1 exits and
//! the kernel panics and reboots. The watchdog is fed while waiting, so a shutdown that hangs
//! somewhere unbounded (a wedged unmount) is ended by a reset.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::boot::{self, watchdog};
use crate::supervisor::Supervisor;
use crate::sys::{self, RebootMode, SignalFd};

const GRACE: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(2);
const SYNC_BOUND: Duration = Duration::from_secs(10);

/// Wait until `done` says so (checked after each reap) or `limit` passes; true when done.
fn wait_until(
    signals: &SignalFd,
    sup: &Mutex<Supervisor>,
    limit: Duration,
    done: &dyn Fn(bool) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        watchdog::feed();
        let children_left = super::reap(sup);
        if done(children_left) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // SIGCHLD (or anything else) wakes us; other requests are ignored while shutting down.
        let _ = signals.wait(left.as_millis().min(200) as i32);
    }
}

/// Mount points backed by block devices, most recent first, from mountinfo text.
fn block_mounts(mountinfo: &str) -> Vec<String> {
    let mut out: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|&x| x == "-")?;
            let source = f.get(sep + 2)?;
            let target = f.get(4)?;
            (source.starts_with("/dev/") && *target != "/").then(|| crate::sys::unescape_mountinfo(target))
        })
        .collect();
    out.reverse();
    out
}

fn unmount_all() {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for target in block_mounts(&info) {
        let p = Path::new(&target);
        match sys::umount(p, 0) {
            Ok(()) => info!("unmounted {target}"),
            Err(e) => {
                let ro = sys::mount(None, p, None, sys::MS_REMOUNT | sys::MS_RDONLY, None);
                match ro {
                    Ok(()) => warn!("{target} busy ({e}); remounted read-only"),
                    Err(e2) => {
                        error!("{target}: unmount failed ({e}), read-only remount failed ({e2})")
                    }
                }
            }
        }
    }
}

/// Stop the services, dependents first, each with its own grace period.
fn stop_services(signals: &SignalFd, sup: &Mutex<Supervisor>) {
    let order = super::lock(sup).stop_order();
    for (name, pid) in order {
        super::lock(sup).stop(&name);
        let _ = sys::kill(-pid, libc::SIGTERM);
        let gone = |_| !super::lock(sup).has_pid(pid);
        if !wait_until(signals, sup, GRACE, &gone) {
            warn!("service {name} still running after {}s; sending SIGKILL", GRACE.as_secs());
            let _ = sys::kill(-pid, libc::SIGKILL);
            wait_until(signals, sup, KILL_WAIT, &gone);
        }
        info!("service {name} stopped");
    }
}

pub fn run(mode: RebootMode, signals: &SignalFd, sup: &Mutex<Supervisor>) -> ! {
    let t = Instant::now();
    info!("shutdown requested: {mode:?}");
    stop_services(signals, sup);
    let _ = sys::kill(-1, libc::SIGTERM);
    let none_left = |children_left: bool| !children_left;
    if !wait_until(signals, sup, GRACE, &none_left) {
        warn!("processes left after {}s; sending SIGKILL", GRACE.as_secs());
        let _ = sys::kill(-1, libc::SIGKILL);
        wait_until(signals, sup, KILL_WAIT, &none_left);
    }
    unmount_all();
    if !boot::bounded_sync(SYNC_BOUND) {
        warn!("sync did not finish within {}s; going on", SYNC_BOUND.as_secs());
    }
    info!("shutdown done in {} ms; {mode:?} now", t.elapsed().as_millis());
    boot::reboot_or_panic(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_mounts_newest_first() {
        let mi = "\
22 1 254:0 / / ro,relatime shared:1 - erofs /dev/mapper/root ro
23 22 0:5 / /dev rw shared:2 - devtmpfs devtmpfs rw
30 22 254:8 / /local rw shared:9 - ext4 /dev/vda8 rw
31 22 254:8 /var /var rw shared:9 - ext4 /dev/vda8 rw
32 31 254:7 / /var/lib/berth rw - ext4 /dev/vda7 rw
33 22 254:8 /x /with\\040space rw - ext4 /dev/vda8 rw
";
        assert_eq!(block_mounts(mi), vec!["/with space", "/var/lib/berth", "/var", "/local"]);
    }
}
