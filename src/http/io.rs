//! The streams HTTP messages are read from and written to.
//!
//! [`Buffered`] reads ahead into a buffer that grows (up to a bound its caller gives) until it
//! holds a whole head, and serves the bytes after the head as a [`BufRead`], so a body decoder
//! never reads past its message (pipelined requests and keep-alive responses stay intact).
//! [`Timed`] gives every read and write a timeout and, optionally, an overall deadline: the
//! socket timeout is set to whichever is nearer before each operation.

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Sockets whose blocking reads and writes can time out.
pub trait Timeouts {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Timeouts for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl Timeouts for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// Whether `e` is a socket timeout (`EAGAIN` from `SO_RCVTIMEO`, or our deadline).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A socket whose every read and write is bounded by `per_op` and by the deadline, if set.
#[derive(Debug)]
pub struct Timed<S> {
    inner: S,
    per_op: Duration,
    deadline: Option<Instant>,
    /// The socket timeouts as last set (read, write), to skip setting them again.
    read_set: Option<Duration>,
    write_set: Option<Duration>,
}

/// The error a read or write gets once the deadline has passed.
pub fn deadline_passed() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the deadline passed")
}

impl<S: Timeouts> Timed<S> {
    pub fn new(inner: S, per_op: Duration) -> Timed<S> {
        Timed { inner, per_op, deadline: None, read_set: None, write_set: None }
    }

    /// Bound every later operation by `deadline` too (`None`: by `per_op` only).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Whether the deadline is set and has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How long the next operation may block: never zero (a zero socket timeout is an error).
    fn budget(&self) -> io::Result<Duration> {
        let per_op = self.per_op.max(Duration::from_millis(1));
        match self.deadline {
            None => Ok(per_op),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left < Duration::from_millis(1) {
                    Err(deadline_passed())
                } else {
                    Ok(left.min(per_op))
                }
            }
        }
    }
}

impl<S: Read + Timeouts> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let budget = self.budget()?;
        if self.read_set != Some(budget) {
            self.inner.set_read_timeout(Some(budget))?;
            self.read_set = Some(budget);
        }
        match self.inner.read(buf) {
            Err(e) if is_timeout(&e) && self.past_deadline() => Err(deadline_passed()),
            other => other,
        }
    }
}

impl<S: Write + Timeouts> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let budget = self.budget()?;
        if self.write_set != Some(budget) {
            self.inner.set_write_timeout(Some(budget))?;
            self.write_set = Some(budget);
        }
        match self.inner.write(buf) {
            Err(e) if is_timeout(&e) && self.past_deadline() => Err(deadline_passed()),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A stream read through a buffer that can grow to hold a whole head; see the module docs.
#[derive(Debug)]
pub struct Buffered<S> {
    inner: S,
    buf: Vec<u8>,
    /// The unread bytes are `buf[pos..filled]`.
    pos: usize,
    filled: usize,
}

impl<S: Read> Buffered<S> {
    /// `capacity` is the buffer's first size; [`Buffered::fill_more`] grows it.
    pub fn new(inner: S, capacity: usize) -> Buffered<S> {
        Buffered { inner, buf: vec![0; capacity.max(1)], pos: 0, filled: 0 }
    }

    /// The bytes read but not consumed yet.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// Read more after the unread bytes, growing the buffer so that it holds up to `max` unread
    /// bytes: the count read, 0 at the end of the stream. An error if `max` are held already.
    pub fn fill_more(&mut self, max: usize) -> io::Result<usize> {
        let unread = self.filled - self.pos;
        if unread >= max {
            return Err(io::Error::other(format!("the read buffer holds its maximum of {max} bytes")));
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.filled, 0);
            (self.pos, self.filled) = (0, unread);
        }
        if self.filled == self.buf.len() {
            let grown = self.buf.len().saturating_mul(2).clamp(1, max);
            self.buf.resize(grown, 0);
        }
        let room = (self.buf.len() - self.filled).min(max - unread);
        let n = self.inner.read(&mut self.buf[self.filled..self.filled + room])?;
        self.filled += n;
        Ok(n)
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: Read> Read for Buffered<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // Nothing buffered and a large read: straight into the caller's buffer.
        if self.pos == self.filled && out.len() >= self.buf.len() {
            return self.inner.read(out);
        }
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(out.len());
            out[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<S: Read> BufRead for Buffered<S> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            (self.pos, self.filled) = (0, 0);
            self.filled = self.inner.read(&mut self.buf)?;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.filled);
    }
}

impl<S: Write> Write for Buffered<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes a few at a time.
    struct Trickle(Vec<u8>, usize);

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.1).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn fill_more_grows_to_the_bound_and_no_further() {
        let mut b = Buffered::new(Trickle(vec![b'x'; 100], 7), 4);
        let mut total = 0;
        while b.buffer().len() < 50 {
            total += b.fill_more(50).unwrap();
        }
        assert_eq!((total, b.buffer().len()), (50, 50));
        assert!(b.fill_more(50).is_err());
        b.consume(45);
        assert_eq!(b.fill_more(50).unwrap(), 7);
        assert_eq!(b.buffer().len(), 12);
    }

    #[test]
    fn reads_drain_the_buffer_before_the_stream() {
        let mut b = Buffered::new(Trickle(b"head|body and more".to_vec(), 8), 16);
        b.fill_more(16).unwrap();
        b.consume(5);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"body and more");
    }

    #[test]
    fn a_passed_deadline_fails_before_touching_the_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut t = Timed::new(a, Duration::from_secs(5));
        t.set_deadline(Some(Instant::now()));
        let e = t.read(&mut [0; 4]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(t.past_deadline());
        let e = t.write(b"x").unwrap_err();
        assert_eq!(e.to_string(), "the deadline passed");
    }

    #[test]
    fn a_read_times_out_at_the_deadline_not_at_per_op() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut t = Timed::new(a, Duration::from_secs(30));
        t.set_deadline(Some(Instant::now() + Duration::from_millis(50)));
        let e = t.read(&mut [0; 4]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }
}
