//! Logging for PID 1 and the tools: records go to /dev/kmsg with a `berth: ` prefix (so they
//! carry the kernel's timestamps and reach the console), or to stderr when /dev/kmsg cannot be
//! opened (host tools, dev mode).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    kmsg: Mutex<Option<File>>,
}

static LOGGER: Logger = Logger { kmsg: Mutex::new(None) };

impl Log for Logger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let prio = match record.level() {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug | Level::Trace => 7,
        };
        let mut guard = self.kmsg.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(f) => {
                // One write is one kmsg record; keep it well under the kernel's limit.
                let mut line = format!("<{prio}>berth: {}", record.args());
                clip(&mut line, 900);
                line.push('\n');
                let _ = f.write_all(line.as_bytes());
            }
            None => eprintln!("berth: {}", record.args()),
        }
    }

    fn flush(&self) {}
}

/// Cut `line` to at most `max` bytes, at a character boundary (`String::truncate` panics
/// inside a character, and a panic in the logger of PID 1 would take the system down).
fn clip(line: &mut String, max: usize) {
    if line.len() > max {
        let end = (0..=max).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
        line.truncate(end);
    }
}

/// Install the logger; `kmsg` chooses /dev/kmsg (falls back to stderr if it cannot be opened).
pub fn init(kmsg: bool) {
    if kmsg {
        reopen_kmsg();
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// (Re)open /dev/kmsg, e.g. after /dev was mounted or moved.
pub fn reopen_kmsg() {
    let f = OpenOptions::new().write(true).open("/dev/kmsg").ok();
    *LOGGER.kmsg.lock().unwrap_or_else(|p| p.into_inner()) = f;
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn long_lines_are_clipped_at_a_character_boundary() {
        for (text, max, want) in [
            ("abcdef", 4, "abcd"),
            ("ab→cd", 3, "ab"),
            ("ab→cd", 4, "ab"),
            ("ab→cd", 5, "ab→"),
            ("ab", 9, "ab"),
        ] {
            let mut s = text.to_string();
            clip(&mut s, max);
            assert_eq!(s, want, "{text} at {max}");
        }
    }
}
