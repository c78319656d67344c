//! The kernel's clock discipline: reading and steering CLOCK_REALTIME through clock_adjtime(2).
//!
//! rustix has `clock_settime` but no `clock_adjtime`/`adjtimex`, so these are raw calls on
//! libc's `timex`. Every call names CLOCK_REALTIME; offsets are in nanoseconds (ADJ_NANO), so
//! the kernel's `time.tv_usec` field carries nanoseconds for ADJ_SETOFFSET.

use std::io;

/// What the kernel reports about its clock discipline (`adjtimex` with no modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelClock {
    /// The clock state the call returned (`TIME_OK`, `TIME_INS`, ..., `TIME_ERROR` = 5).
    pub state: i32,
    /// STA_* bits.
    pub status: i32,
    /// The PLL's remaining offset, in ns when STA_NANO is set (we always set it), else µs.
    pub offset: i64,
    /// Frequency correction in ppm with a 16-bit binary fraction (65536 = 1 ppm).
    pub freq: i64,
    /// The kernel's maximum error bound in µs; it grows by 500 µs every second and the
    /// kernel sets STA_UNSYNC once it passes 16 s.
    pub maxerror_us: i64,
    pub esterror_us: i64,
    /// The PLL time constant.
    pub constant: i64,
}

impl KernelClock {
    /// The kernel counts the clock as synchronised (STA_UNSYNC clear).
    pub fn synchronised(&self) -> bool {
        self.status & libc::STA_UNSYNC == 0
    }

    /// The PLL's remaining offset in nanoseconds.
    pub fn offset_ns(&self) -> i64 {
        if self.status & libc::STA_NANO != 0 {
            self.offset
        } else {
            self.offset.saturating_mul(1000)
        }
    }
}

fn zeroed_timex() -> libc::timex {
    // SAFETY: timex is a plain C struct of integers (and a timeval); all-zero is a valid value
    // and means "change nothing" (modes = 0).
    unsafe { std::mem::zeroed() }
}

fn adjtime(tx: &mut libc::timex) -> io::Result<i32> {
    // SAFETY: tx points to a valid, initialised timex that lives across the call; the kernel
    // reads the fields named in `modes` and writes the current values back into it.
    let r = unsafe { libc::clock_adjtime(libc::CLOCK_REALTIME, tx) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Read the kernel's clock discipline state (changes nothing; needs no privilege).
pub fn kernel_clock() -> io::Result<KernelClock> {
    let mut tx = zeroed_timex();
    let state = adjtime(&mut tx)?;
    // c_long is i64 on both targets (x86_64, aarch64).
    Ok(KernelClock {
        state,
        status: tx.status,
        offset: tx.offset,
        freq: tx.freq,
        maxerror_us: tx.maxerror,
        esterror_us: tx.esterror,
        constant: tx.constant,
    })
}

/// Step CLOCK_REALTIME by `offset_ns` at once (ADJ_SETOFFSET: the kernel adds it atomically,
/// so no time passes between reading and writing the clock). The kernel then marks the clock
/// unsynchronised and clears the PLL; [`discipline`] marks it synchronised again.
pub fn step_realtime(offset_ns: i64) -> io::Result<()> {
    let mut tx = zeroed_timex();
    tx.modes = libc::ADJ_SETOFFSET | libc::ADJ_NANO;
    // The kernel wants a normalised value: tv_usec (ns here) in 0..1e9, the sign in tv_sec.
    tx.time.tv_sec = offset_ns.div_euclid(1_000_000_000) as _;
    tx.time.tv_usec = offset_ns.rem_euclid(1_000_000_000) as _;
    adjtime(&mut tx).map(drop)
}

/// Hand the kernel's phase-locked loop a measured offset (ns, positive: the clock is behind)
/// to slew out, with the PLL time constant for the poll interval, and mark the clock
/// synchronised with the given error bounds (µs). The kernel clamps the offset to ±0.5 s.
pub fn discipline(offset_ns: i64, constant: i64, maxerror_us: i64, esterror_us: i64) -> io::Result<()> {
    let mut tx = zeroed_timex();
    tx.modes = libc::ADJ_OFFSET
        | libc::ADJ_STATUS
        | libc::ADJ_NANO
        | libc::ADJ_TIMECONST
        | libc::ADJ_MAXERROR
        | libc::ADJ_ESTERROR;
    // STA_PLL on, STA_UNSYNC (and every other writable bit) off.
    tx.status = libc::STA_PLL;
    tx.offset = offset_ns as libc::c_long;
    tx.constant = constant as libc::c_long;
    tx.maxerror = maxerror_us as libc::c_long;
    tx.esterror = esterror_us as libc::c_long;
    adjtime(&mut tx).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_the_kernel_clock_changes_nothing_and_works_unprivileged() {
        let a = kernel_clock().expect("adjtimex read");
        let b = kernel_clock().expect("adjtimex read");
        assert_eq!(a.status, b.status);
        assert!((0..=5).contains(&a.state), "{a:?}");
        assert!(a.maxerror_us >= 0, "{a:?}");
    }
}
