//! What a unit test does when it cannot run here (not root, a tool missing, no namespaces).
//!
//! `scripts/test` runs as root with everything installed and exports `BERTH_REQUIRE_ALL_TESTS=1`:
//! there such a test fails, saying why, so a suite that silently stopped testing something
//! cannot pass. A developer's plain `cargo test` (say, not as root) gets a skip instead, printed
//! loudly on stderr.

/// The variable `scripts/test` sets; `1` makes [`cannot_run`] fail the test.
pub const REQUIRE_ALL: &str = "BERTH_REQUIRE_ALL_TESTS";

/// Report that `test` cannot run here because `why`: panics under `scripts/test`, otherwise
/// prints a SKIPPED line and returns, and the caller returns too. The line goes straight to
/// stderr, past the test harness's capture, so it shows even though the test "passes".
#[track_caller]
pub fn cannot_run(test: &str, why: &str) {
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run here: {why} ({REQUIRE_ALL}=1: a test that cannot run fails)");
    }
    let line =
        format!("SKIPPED {test}: {why} (scripts/test sets {REQUIRE_ALL}=1, which makes this a failure)\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// `Some(why)` when the test process is not root.
pub fn needs_root() -> Option<String> {
    (!crate::sys::is_root()).then(|| "needs root".to_string())
}

/// A directory of its own under the system's temp dir for one test, removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `berth-NAME-PID-N`: unique per test process and call, made empty.
    pub fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("berth-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
