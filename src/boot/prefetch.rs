//! Reading ahead the programs the boot runs next, from the moment the verified root is mounted.
//!
//! The first read of every page of the root costs CPU: dm-verity hashes its blocks and EROFS
//! decompresses its lz4 clusters. Demand paging pays that one page fault at a time, each
//! waiting for the last; containerd (a ~47 MB Go program) started that way took 13.7–17.8 s
//! from exec to answering under QEMU TCG, against 6.9–9.0 s with the program read ahead
//! (measured on a loaded host, docs/performance.md).
//!
//! Right after `mount-root`, stage 1 forks a child that reads, in order, stage 2's program
//! (`/sbin/init`, exec'd ~0.5 s later) and containerd's, sequentially, into the page cache,
//! and exits. A child process rather than a thread, because the page cache outlives PID 1's
//! exec into stage 2 and so does a process, while a thread would end at the exec; stage 2
//! reaps it like any other child (`reaped pid N`). It logs how long each read took. Reading
//! ahead only warms the cache: if it fails or is slow, the boot reads the same pages itself.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use log::{info, warn};

use super::{Ctx, SYSROOT};
use crate::sys;

/// What the child reads, in this order, relative to the new root.
const PROGRAMS: &[&str] = &["sbin/init", "usr/bin/containerd"];

/// The size of each read (the page cache's readahead grows its own window behind it).
const CHUNK: usize = 128 * 1024;

/// The stage 1 phase: fork the reader. Never fails the boot.
pub fn start(ctx: &mut Ctx) -> Result<(), super::BootError> {
    // Stage 1 is single-threaded here: the child gets a consistent copy of it.
    match sys::fork() {
        Ok(0) => {
            // The child must not keep the watchdog open: stage 2 opens it again, and it can
            // be open only once. Closing this copy leaves it armed (PID 1 holds its own).
            drop(ctx.watchdog.take());
            read_ahead(Path::new(SYSROOT));
            sys::exit_now(0)
        }
        Ok(pid) => info!("reading ahead {} (pid {pid})", PROGRAMS.join(", ")),
        Err(e) => warn!("no process to read ahead the programs ({e}); they are paged in on use"),
    }
    Ok(())
}

/// Read each of [`PROGRAMS`] under `root` whole, logging each. All are opened first: stage 1
/// switches root meanwhile, and this process's `root` path stops leading to them then.
fn read_ahead(root: &Path) {
    let opened: Vec<_> = PROGRAMS.iter().map(|p| (p, File::open(root.join(p)))).collect();
    let mut buf = vec![0u8; CHUNK];
    for (program, file) in opened {
        let t = Instant::now();
        let read = file.and_then(|mut f| {
            let mut total = 0u64;
            loop {
                match f.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        });
        match read {
            Ok(n) => info!("read ahead /{program} ({} KiB) in {} ms", n / 1024, t.elapsed().as_millis()),
            Err(e) => warn!("reading ahead /{program}: {e}"),
        }
    }
}
