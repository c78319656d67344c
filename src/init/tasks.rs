//! PID 1's own long-running threads (the API's accept loop, the host bridge, the network and
//! its DHCP renewal, ...), supervised like services: a task whose thread panics or returns an
//! error is started again after a backoff (1 s, doubling to 60 s, back to 1 s after 60 s of
//! running), so one bad request or a transient socket error cannot leave PID 1 without its API
//! or its network until the next reboot. A task that returns `Ok(())` is done for good.
//!
//! The main loop calls [`Tasks::check`] on every turn; nothing here blocks.

use std::time::{Duration, Instant};

use log::{error, info, warn};

const MIN_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// What a task's thread returns: `Ok(())` when its work is done for good.
pub type Outcome = Result<(), String>;
type Start = Box<dyn FnMut() -> std::io::Result<std::thread::JoinHandle<Outcome>> + Send>;

struct Task {
    name: &'static str,
    start: Start,
    handle: Option<std::thread::JoinHandle<Outcome>>,
    started_at: Instant,
    next_start: Option<Instant>,
    delay: Duration,
    restarts: u32,
}

#[derive(Default)]
pub struct Tasks {
    tasks: Vec<Task>,
}

/// What a panic carried, as text.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

impl Tasks {
    /// Start a supervised task: `start` spawns its thread (and is called again to restart it).
    pub fn add(
        &mut self,
        name: &'static str,
        start: impl FnMut() -> std::io::Result<std::thread::JoinHandle<Outcome>> + Send + 'static,
    ) {
        let mut t = Task {
            name,
            start: Box::new(start),
            handle: None,
            started_at: Instant::now(),
            next_start: Some(Instant::now()),
            delay: MIN_DELAY,
            restarts: 0,
        };
        Self::try_start(&mut t);
        self.tasks.push(t);
    }

    fn try_start(t: &mut Task) {
        match (t.start)() {
            Ok(h) => {
                t.handle = Some(h);
                t.started_at = Instant::now();
                t.next_start = None;
            }
            Err(e) => {
                error!("task {}: cannot start its thread: {e}; trying again in {:?}", t.name, t.delay);
                Self::back_off(t);
            }
        }
    }

    fn back_off(t: &mut Task) {
        if t.started_at.elapsed() >= HEALTHY_AFTER {
            t.delay = MIN_DELAY;
        }
        t.next_start = Some(Instant::now() + t.delay);
        t.delay = (t.delay * 2).min(MAX_DELAY);
    }

    /// Restart what died, when its backoff has passed. Returns the names restarted.
    pub fn check(&mut self) -> Vec<&'static str> {
        let mut restarted = Vec::new();
        for t in &mut self.tasks {
            if t.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let outcome = t.handle.take().map(|h| h.join());
                match outcome {
                    Some(Ok(Ok(()))) => {
                        info!("task {} finished", t.name);
                        continue;
                    }
                    Some(Ok(Err(e))) => warn!("task {} failed: {e}", t.name),
                    Some(Err(p)) => error!("task {} panicked: {}", t.name, panic_text(p.as_ref())),
                    None => {}
                }
                Self::back_off(t);
                warn!("task {} starts again in {:?}", t.name, t.next_start.map(|n| n - Instant::now()));
            }
            if t.handle.is_none() && t.next_start.is_some_and(|n| Instant::now() >= n) {
                t.restarts += 1;
                info!("task {}: restart {}", t.name, t.restarts);
                Self::try_start(t);
                restarted.push(t.name);
            }
        }
        restarted
    }

    /// (name, running, restarts) of every task.
    #[cfg(test)]
    pub fn report(&self) -> Vec<(&'static str, bool, u32)> {
        self.tasks.iter().map(|t| (t.name, t.handle.is_some(), t.restarts)).collect()
    }
}

/// Spawn a named thread for a task.
pub fn thread(
    name: &str,
    stack: usize,
    f: impl FnOnce() -> Outcome + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Outcome>> {
    std::thread::Builder::new().name(name.into()).stack_size(stack).spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn wait_for(tasks: &mut Tasks, runs: &AtomicU32, want: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(Ordering::SeqCst) < want {
            assert!(
                Instant::now() < deadline,
                "task ran {} times, wanted {want}",
                runs.load(Ordering::SeqCst)
            );
            tasks.check();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_panicking_task_is_restarted_and_a_finished_one_is_not() {
        let mut tasks = Tasks::default();
        let panics = Arc::new(AtomicU32::new(0));
        let p = panics.clone();
        tasks.add("panicky", move || {
            let p = p.clone();
            thread("panicky", 64 * 1024, move || {
                if p.fetch_add(1, Ordering::SeqCst) < 1 {
                    panic!("first run fails");
                }
                Err("second run fails too".into())
            })
        });
        let done = Arc::new(AtomicU32::new(0));
        let d = done.clone();
        tasks.add("once", move || {
            let d = d.clone();
            thread("once", 64 * 1024, move || {
                d.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        });
        wait_for(&mut tasks, &panics, 2); // restarted after its panic, ~1 s later
        std::thread::sleep(Duration::from_millis(100));
        tasks.check();
        assert_eq!(done.load(Ordering::SeqCst), 1, "a task that finished is not restarted");
        let report = tasks.report();
        assert_eq!(report[0].2, 1);
        assert_eq!(report[1], ("once", false, 0));
    }
}
