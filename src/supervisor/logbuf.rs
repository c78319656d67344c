//! Bounded capture of a service's output: [`LineSplitter`] cuts a byte stream into lines of at
//! most [`MAX_LINE`] bytes without ever buffering more than that, and [`LogBuf`] keeps the newest
//! lines within a byte budget that charges every line a fixed overhead, and a line count.
//!
//! Why both bounds: a service (a host container with a `\r` progress bar, containerd, kubelet)
//! controls what it writes, and PID 1 is the one process the OOM killer never picks. A line
//! without a newline must not be buffered whole (200 MB without `\n` would be), and empty lines
//! must not be free (5 M of them cost >100 MB of bookkeeping when only their text is counted).
//! So the memory a service's log can take is `MAX_LINE` per output stream for the line being
//! read plus `cap` bytes of kept lines, whatever the service writes.

use std::collections::VecDeque;

/// The longest line kept; the rest of a longer line is dropped and the cut is marked.
pub const MAX_LINE: usize = 4096;
/// What a kept line costs beyond its text: the boxed string and its ring slot, rounded up.
pub const LINE_OVERHEAD: usize = 32;
/// Appended to a line that was cut at [`MAX_LINE`].
const CUT_MARK: &str = " [line cut]";

/// Splits a byte stream into lines (`\n`, with a trailing `\r` removed), never holding more
/// than [`MAX_LINE`] bytes of an unfinished line.
#[derive(Default)]
pub struct LineSplitter {
    line: Vec<u8>,
    /// Bytes of the current line dropped since it reached `MAX_LINE`.
    dropped: usize,
}

impl LineSplitter {
    pub fn new() -> LineSplitter {
        LineSplitter { line: Vec::with_capacity(256), dropped: 0 }
    }

    /// Take the next bytes of the stream; `emit` gets every line they complete.
    pub fn feed(&mut self, mut bytes: &[u8], emit: &mut dyn FnMut(&str)) {
        while !bytes.is_empty() {
            let (part, done) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            let room = MAX_LINE - self.line.len();
            let take = part.len().min(room);
            self.line.extend_from_slice(&part[..take]);
            self.dropped += part.len() - take;
            match done {
                Some(n) => {
                    self.finish(emit);
                    bytes = &bytes[n..];
                }
                None => bytes = &[],
            }
        }
    }

    /// End of stream: a last line without a newline is still a line.
    pub fn flush(&mut self, emit: &mut dyn FnMut(&str)) {
        if !self.line.is_empty() || self.dropped > 0 {
            self.finish(emit);
        }
    }

    fn finish(&mut self, emit: &mut dyn FnMut(&str)) {
        if self.line.last() == Some(&b'\r') && self.dropped == 0 {
            self.line.pop();
        }
        let text = String::from_utf8_lossy(&self.line);
        if self.dropped > 0 {
            emit(&format!("{text}{CUT_MARK}"));
        } else {
            emit(&text);
        }
        self.line.clear();
        if self.line.capacity() > 4 * 256 {
            self.line.shrink_to(256);
        }
        self.dropped = 0;
    }
}

/// The newest lines of a service's output within `cap` bytes (text plus [`LINE_OVERHEAD`] per
/// line) and at most `cap / LINE_OVERHEAD` lines. When full, the oldest lines go first.
pub struct LogBuf {
    lines: VecDeque<Box<str>>,
    /// Bytes charged for the kept lines.
    cost: usize,
    cap: usize,
    /// Lines dropped to stay under the cap, so readers know the log was cut.
    pub dropped: u64,
}

impl LogBuf {
    pub fn new(cap: usize) -> LogBuf {
        LogBuf { lines: VecDeque::new(), cost: 0, cap: cap.max(LINE_OVERHEAD), dropped: 0 }
    }

    fn charge(line: &str) -> usize {
        line.len() + LINE_OVERHEAD
    }

    pub fn push(&mut self, line: &str) {
        let mut cut = line.len().min(MAX_LINE).min(self.cap - LINE_OVERHEAD);
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        let line: Box<str> = line[..cut].into();
        self.cost += Self::charge(&line);
        self.lines.push_back(line);
        while self.cost > self.cap {
            match self.lines.pop_front() {
                Some(old) => {
                    self.cost -= Self::charge(&old);
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.lines.iter().map(|l| l.len() + 1).sum());
        if self.dropped > 0 {
            out.push_str(&format!("[{} earlier lines dropped]\n", self.dropped));
        }
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lines.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_lines_within_the_cap() {
        let mut b = LogBuf::new(2 * (4 + LINE_OVERHEAD) + 1);
        for l in ["aaaa", "bbbb", "cccc"] {
            b.push(l);
        }
        assert_eq!(b.text(), "[1 earlier lines dropped]\nbbbb\ncccc\n");
        assert_eq!(b.dropped, 1);
        assert!(b.cost <= b.cap);
        b.push(&"é".repeat(100)); // longer than the cap allows: cut on a char boundary
        assert!(b.cost <= b.cap);
        assert!(b.text().lines().last().unwrap().starts_with('é'));
    }

    #[test]
    fn empty_lines_are_not_free() {
        let mut b = LogBuf::new(64 * 1024);
        for _ in 0..1_000_000 {
            b.push("");
        }
        assert!(b.len() <= 64 * 1024 / LINE_OVERHEAD, "{} lines kept", b.len());
        assert_eq!(b.dropped as usize + b.len(), 1_000_000);
    }

    fn split(chunks: &[&[u8]]) -> (Vec<String>, usize) {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        let mut most = 0;
        for c in chunks {
            s.feed(c, &mut |l| out.push(l.to_string()));
            most = most.max(s.line.len());
        }
        s.flush(&mut |l| out.push(l.to_string()));
        (out, most)
    }

    #[test]
    fn splits_lines_across_chunks() {
        let (lines, _) = split(&[b"one\ntw", b"o\r\n\nthr", b"ee"]);
        assert_eq!(lines, ["one", "two", "", "three"]);
    }

    #[test]
    fn a_line_without_newline_is_never_buffered_whole() {
        // 64 MiB of one line, fed in 64 KiB reads as the pump does, then a normal line.
        let chunk = vec![b'x'; 64 * 1024];
        let mut chunks: Vec<&[u8]> = vec![&chunk; 1024];
        chunks.push(b"\r\nnext\n");
        let (lines, most) = split(&chunks);
        assert!(most <= MAX_LINE, "buffered {most} bytes of one line");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE + CUT_MARK.len());
        assert!(lines[0].ends_with(CUT_MARK));
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let (lines, _) = split(&[b"ok \xff\xfe end\n"]);
        assert_eq!(lines, ["ok \u{fffd}\u{fffd} end"]);
    }
}
