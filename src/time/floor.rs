//! The clock floor: the earliest the clock may read when the updater judges metadata expiry.
//!
//! A floor must be a lower bound of the true time, or it pushes the clock into the future and,
//! once persisted, keeps pushing it there. Only two things are such bounds:
//! - the image's build time (part of the verified root), and
//! - a reading of the clock taken while the kernel counted it synchronised by NTP with a
//!   maximum error of at most [`MAX_TRUSTED_ERROR`] (the kernel grows that bound by 0.5 ms every
//!   second since the last NTP update, so this is "synchronised within about the last hour").
//!
//! The rule, applied before each repository load ([`decide`]):
//! 1. The floor is the build time, and while the clock is not so synchronised also the last
//!    trusted reading. If the clock is behind the floor it is stepped forward to it.
//! 2. While the clock is synchronised it is never stepped: NTP is the authority, and the
//!    current reading becomes the trusted reading (so a trusted reading that is ahead of NTP,
//!    which NTP itself must have caused, lasts only until the next synchronised load).
//! 3. tough's own record (`latest_known_time.json`, the clock at its last load, synchronised
//!    or not) is never a floor. When it is ahead of the clock, tough would refuse to load
//!    ("system time stepped backward"); it is then forgotten, since it came from a clock that
//!    ran ahead of the one we now trust.
//!
//! So one reading from the future (an RTC that was ahead, a wrong step) is never stepped to
//! and never persisted as a floor; the most it costs is tough's record, which is dropped.

use std::time::Duration;

use jiff::Timestamp;

/// The kernel's maximum-error bound below which a reading counts as synchronised.
pub const MAX_TRUSTED_ERROR: Duration = Duration::from_secs(2);

/// What [`decide`] is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    pub now: Timestamp,
    /// The image's build time.
    pub build: Option<Timestamp>,
    /// The last reading taken while synchronised (persisted by the updater).
    pub trusted: Option<Timestamp>,
    /// tough's `latest_known_time`.
    pub recorded: Option<Timestamp>,
    /// The kernel's maximum error while it counts the clock synchronised; None when not.
    pub sync_error: Option<Duration>,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// Step the clock forward to this.
    pub step_to: Option<Timestamp>,
    /// Remove tough's record: it is ahead of the clock we trust.
    pub forget_recorded: bool,
    /// Persist this as the trusted reading.
    pub trust: Option<Timestamp>,
}

pub fn synchronised(sync_error: Option<Duration>) -> bool {
    sync_error.is_some_and(|e| e <= MAX_TRUSTED_ERROR)
}

pub fn decide(i: &Inputs) -> Decision {
    let synced = synchronised(i.sync_error);
    let floor = [i.build, if synced { None } else { i.trusted }].into_iter().flatten().max();
    let step_to = floor.filter(|f| i.now < *f);
    let now = step_to.unwrap_or(i.now);
    Decision { step_to, forget_recorded: i.recorded.is_some_and(|r| r > now), trust: synced.then_some(now) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn the_floor_rule_case_by_case() {
        let build = Some(t("2026-01-01T00:00:00Z"));
        let now = t("2026-11-30T00:00:00Z");
        let future = t("2031-01-01T00:00:00Z");
        let synced = Some(Duration::from_millis(20));
        let base = Inputs { now, build, trusted: None, recorded: None, sync_error: None };
        let table: Vec<(&str, Inputs, Decision)> = vec![
            ("nothing known", base, Decision::default()),
            (
                "a clock in 1970 goes to the build time",
                Inputs { now: t("1970-01-01T00:00:10Z"), ..base },
                Decision { step_to: build, ..Default::default() },
            ),
            (
                "unsynchronised and behind a trusted reading: forward to it",
                Inputs { now: t("2026-02-01T00:00:00Z"), trusted: Some(now), ..base },
                Decision { step_to: Some(now), ..Default::default() },
            ),
            (
                "unsynchronised, tough's record from the future: forgotten, never stepped to",
                Inputs { recorded: Some(future), ..base },
                Decision { forget_recorded: true, ..Default::default() },
            ),
            (
                "synchronised, tough's record from the future: forgotten; the clock is trusted",
                Inputs { recorded: Some(future), sync_error: synced, ..base },
                Decision { forget_recorded: true, trust: Some(now), ..Default::default() },
            ),
            (
                "synchronised and behind a trusted reading: NTP wins, no step, reading replaced",
                Inputs { trusted: Some(future), sync_error: synced, ..base },
                Decision { trust: Some(now), ..Default::default() },
            ),
            (
                "synchronised but the build time is later still: the build time is a hard floor",
                Inputs { now: t("2025-06-01T00:00:00Z"), sync_error: synced, ..base },
                Decision { step_to: build, trust: build, ..Default::default() },
            ),
            (
                "synchronised long ago (error above the bound) counts as unsynchronised",
                Inputs { sync_error: Some(Duration::from_secs(9)), recorded: Some(future), ..base },
                Decision { forget_recorded: true, ..Default::default() },
            ),
            (
                "tough's record behind the clock: kept",
                Inputs { recorded: Some(t("2026-11-29T00:00:00Z")), ..base },
                Decision::default(),
            ),
            (
                "tough's record between the clock and the floor it is stepped to: kept",
                Inputs { now: t("2025-01-01T00:00:00Z"), recorded: Some(t("2025-12-01T00:00:00Z")), ..base },
                Decision { step_to: build, ..Default::default() },
            ),
        ];
        for (what, inputs, want) in table {
            assert_eq!(decide(&inputs), want, "{what}");
        }
    }
}
