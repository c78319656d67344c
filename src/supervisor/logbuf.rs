//! A bounded log buffer per service: the newest bytes of its stdout and stderr, whole lines
//! where possible. When full, the oldest lines go first.

use std::collections::VecDeque;

pub struct LogBuf {
    lines: VecDeque<String>,
    bytes: usize,
    cap: usize,
    /// Lines dropped to stay under the cap, so readers know the log was cut.
    pub dropped: u64,
}

impl LogBuf {
    pub fn new(cap: usize) -> LogBuf {
        LogBuf { lines: VecDeque::new(), bytes: 0, cap, dropped: 0 }
    }

    pub fn push(&mut self, line: &str) {
        let mut line = line.to_string();
        if line.len() > self.cap {
            let mut cut = self.cap;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.bytes > self.cap {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len();
                self.dropped += 1;
            }
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.bytes + self.lines.len());
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_lines_within_the_cap() {
        let mut b = LogBuf::new(10);
        for l in ["aaaa", "bbbb", "cccc"] {
            b.push(l);
        }
        assert_eq!(b.text(), "bbbb\ncccc\n");
        assert_eq!(b.dropped, 1);
        assert!(b.bytes <= 10);
        b.push(&"é".repeat(20)); // longer than the cap: cut on a char boundary
        assert!(b.bytes <= 10);
        assert!(b.text().starts_with('é'));
    }
}
