//! What this boot did and what went wrong without stopping it: the phases of both stages with
//! their start (milliseconds since the kernel started) and duration, and the notices — problems
//! the boot worked around (settings set aside, a partition that could not be grown or mounted
//! and was replaced by memory, ...). Notices also go to the console as they happen.
//! `GET /boot` returns [`snapshot`].

use std::sync::Mutex;
use std::time::Instant;

use log::error;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One phase of stage 1 or stage 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PhaseTime {
    pub stage: u8,
    pub name: String,
    /// Milliseconds since the kernel started (CLOCK_BOOTTIME) when the phase began.
    pub start_ms: u64,
    pub duration_us: u64,
}

#[derive(Default)]
struct Report {
    phases: Vec<PhaseTime>,
    notices: Vec<String>,
}

static REPORT: Mutex<Report> = Mutex::new(Report { phases: Vec::new(), notices: Vec::new() });

/// The most notices kept (a loop that keeps noting must not grow PID 1).
const MAX_NOTICES: usize = 64;

fn report() -> std::sync::MutexGuard<'static, Report> {
    REPORT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the kernel started.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// Record a finished phase that began at `began` (uptime `start_ms`).
pub fn phase(stage: u8, name: &str, start_ms: u64, began: Instant) {
    let p = PhaseTime { stage, name: name.into(), start_ms, duration_us: began.elapsed().as_micros() as u64 };
    report().phases.push(p);
}

/// Phases recorded so far (stage 1 hands its own to stage 2).
pub fn phases() -> Vec<PhaseTime> {
    report().phases.clone()
}

/// Notices made so far (stage 1 hands its own to stage 2).
pub fn notices() -> Vec<String> {
    report().notices.clone()
}

/// Take over the phases and notices of an earlier stage (they come first).
pub fn adopt(phases: Vec<PhaseTime>, notices: Vec<String>) {
    let mut r = report();
    let mine = std::mem::take(&mut r.phases);
    r.phases = phases;
    r.phases.extend(mine);
    let mine = std::mem::take(&mut r.notices);
    r.notices = notices;
    r.notices.truncate(MAX_NOTICES);
    r.notices.extend(mine);
    r.notices.truncate(MAX_NOTICES);
}

/// A problem the boot worked around: logged at once, kept for `GET /boot`.
pub fn notice(text: impl Into<String>) {
    let text = text.into();
    error!("NOTICE: {text}");
    let mut r = report();
    if r.notices.len() < MAX_NOTICES {
        r.notices.push(text);
    }
}

/// The report as JSON.
pub fn snapshot() -> Value {
    let r = report();
    json!({ "phases": r.phases, "notices": r.notices })
}
