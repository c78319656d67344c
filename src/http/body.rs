//! The one body-framing implementation: [`Body`] reads one message body from a [`BufRead`] as
//! its [`Framing`] says (`Content-Length`, chunked transfer coding, or up to the end of the
//! connection) and ends exactly where the message ends, so the next message on a kept-alive
//! connection is left intact.
//!
//! Errors are `io::Error`s whose text says what went wrong and where: a connection that ends
//! early is `UnexpectedEof` ("the connection closed after N of M bytes"), a malformed chunked
//! body is `InvalidData`; timeouts of the underlying stream come through as they are. Chunk
//! extensions and trailer fields are read and dropped; a chunk-size line or a trailer field is
//! at most [`MAX_CHUNK_LINE`] bytes and the trailer at most [`MAX_HEAD_BYTES`].

use std::io::{self, BufRead, Read};

use super::head::Framing;
use super::{printable, MAX_CHUNK_LINE, MAX_HEAD_BYTES};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `left` of `total` bytes still to come.
    Length {
        total: u64,
        left: u64,
    },
    /// Inside a chunk with `left` bytes to go (0: a size line is next).
    Chunked {
        left: u64,
    },
    Close,
    Done,
}

/// One message body read from `R`; see the module docs.
#[derive(Debug)]
pub struct Body<R> {
    inner: R,
    state: State,
    delivered: u64,
}

impl<R: BufRead> Body<R> {
    pub fn new(inner: R, framing: Framing) -> Body<R> {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length { total: n, left: n },
            Framing::Chunked => State::Chunked { left: 0 },
            Framing::Close => State::Close,
        };
        Body { inner, state, delivered: 0 }
    }

    /// The whole length, when the framing tells it in advance.
    pub fn length(&self) -> Option<u64> {
        match self.state {
            State::Length { total, .. } => Some(total),
            State::Done => Some(self.delivered),
            _ => None,
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The whole body, refused (before reading it, when the length is known) if it is over
    /// `max` bytes. A known length is allocated once, exactly.
    pub fn read_all(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let too_large =
            || io::Error::new(io::ErrorKind::InvalidData, format!("the body is larger than {max} bytes"));
        let mut out = match self.length() {
            Some(n) if n > max as u64 => return Err(too_large()),
            Some(n) => Vec::with_capacity(n as usize),
            None => Vec::new(),
        };
        (&mut *self).take(max as u64 + 1).read_to_end(&mut out)?;
        if out.len() > max {
            return Err(too_large());
        }
        Ok(out)
    }

    fn read_length(&mut self, out: &mut [u8], total: u64, left: u64) -> io::Result<usize> {
        let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            let got = total - left;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the connection closed after {got} of {total} bytes"),
            ));
        }
        let left = left - n as u64;
        self.state = if left == 0 { State::Done } else { State::Length { total, left } };
        Ok(n)
    }

    fn read_chunked(&mut self, out: &mut [u8], mut left: u64) -> io::Result<usize> {
        if left == 0 {
            let line = self.line()?;
            left = chunk_size(&line)?;
            if left == 0 {
                self.trailer()?;
                self.state = State::Done;
                return Ok(0);
            }
        }
        let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(self.closed());
        }
        left -= n as u64;
        if left == 0 && !self.line()?.is_empty() {
            return Err(invalid("a chunk is longer than its size line says".to_string()));
        }
        self.state = State::Chunked { left };
        Ok(n)
    }

    /// One line of a chunked body, without its line end.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        (&mut self.inner).take(MAX_CHUNK_LINE as u64).read_until(b'\n', &mut line)?;
        match line.strip_suffix(b"\n") {
            Some(l) => Ok(l.strip_suffix(b"\r").unwrap_or(l).to_vec()),
            None if line.len() >= MAX_CHUNK_LINE => {
                Err(invalid(format!("a chunked-body line is longer than {MAX_CHUNK_LINE} bytes")))
            }
            None => Err(self.closed()),
        }
    }

    /// The trailer fields after the last chunk, up to the empty line: read and dropped.
    fn trailer(&mut self) -> io::Result<()> {
        let mut size = 0;
        loop {
            let line = self.line()?;
            if line.is_empty() {
                return Ok(());
            }
            size += line.len() + 2;
            if size > MAX_HEAD_BYTES {
                return Err(invalid(format!(
                    "the chunked body's trailer is larger than {MAX_HEAD_BYTES} bytes"
                )));
            }
        }
    }

    fn closed(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the connection closed after {} bytes of a chunked body", self.delivered),
        )
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// `1A2;ext=value` → 0x1A2: hex digits (at most 16), then optional whitespace and extensions.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let rest_ok = rest.iter().find(|&&b| b != b' ' && b != b'\t').is_none_or(|&b| b == b';');
    let size =
        std::str::from_utf8(&line[..digits]).ok().filter(|d| !d.is_empty() && d.len() <= 16 && rest_ok);
    size.and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or_else(|| invalid(format!("invalid chunk size line '{}'", printable(line))))
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let n = match self.state {
            State::Done => return Ok(0),
            State::Length { total, left } => self.read_length(out, total, left)?,
            State::Chunked { left } => self.read_chunked(out, left)?,
            State::Close => {
                let n = self.inner.read(out)?;
                if n == 0 {
                    self.state = State::Done;
                }
                n
            }
        };
        self.delivered += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read(input: &[u8], framing: Framing) -> (io::Result<Vec<u8>>, Vec<u8>) {
        let mut cursor = Cursor::new(input.to_vec());
        let mut body = Body::new(&mut cursor, framing);
        let mut out = Vec::new();
        // Small reads, to cross every boundary.
        let mut piece = [0u8; 3];
        let result = loop {
            match body.read(&mut piece) {
                Ok(0) => break Ok(out),
                Ok(n) => out.extend_from_slice(&piece[..n]),
                Err(e) => break Err(e),
            }
        };
        let pos = cursor.position() as usize;
        (result, input[pos..].to_vec())
    }

    #[test]
    fn framings_end_exactly_at_the_message_end() {
        // (input, framing, body, what is left after it)
        type Case<'a> = (&'a [u8], Framing, &'a [u8], &'a [u8]);
        let cases: [Case<'_>; 8] = [
            (b"helloNEXT", Framing::Length(5), b"hello", b"NEXT"),
            (b"NEXT", Framing::Length(0), b"", b"NEXT"),
            (b"until the end", Framing::Close, b"until the end", b""),
            (b"5\r\nhello\r\n0\r\n\r\nNEXT", Framing::Chunked, b"hello", b"NEXT"),
            (
                b"2;ext=1\r\nhe\r\n3 ; a=b\r\nllo\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT",
                Framing::Chunked,
                b"hello",
                b"NEXT",
            ),
            (b"2\nhe\n3\nllo\n0\n\nNEXT", Framing::Chunked, b"hello", b"NEXT"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", Framing::Chunked, b"0123456789", b""),
            (b"0000\r\n\r\n", Framing::Chunked, b"", b""),
        ];
        for (input, framing, body, rest) in cases {
            let (got, left) = read(input, framing);
            assert_eq!(got.unwrap(), body, "{input:?}");
            assert_eq!(left, rest, "{input:?}");
        }
    }

    #[test]
    fn broken_bodies_say_what_broke() {
        let long_line = format!("{}\r\n", "1".repeat(MAX_CHUNK_LINE));
        let long_trailer = format!("0\r\n{}\r\n", format!("X-A: {}\r\n", "b".repeat(1000)).repeat(20));
        let cases: Vec<(&[u8], Framing, io::ErrorKind, &str)> = vec![
            (b"abc", Framing::Length(10), io::ErrorKind::UnexpectedEof, "closed after 3 of 10 bytes"),
            (b"", Framing::Chunked, io::ErrorKind::UnexpectedEof, "closed after 0 bytes of a chunked body"),
            (
                b"5\r\nhel",
                Framing::Chunked,
                io::ErrorKind::UnexpectedEof,
                "closed after 3 bytes of a chunked body",
            ),
            (b"5\r\nhello\r\n0\r\n", Framing::Chunked, io::ErrorKind::UnexpectedEof, "chunked"),
            (b"zz\r\n", Framing::Chunked, io::ErrorKind::InvalidData, "invalid chunk size line 'zz'"),
            (b"\r\n", Framing::Chunked, io::ErrorKind::InvalidData, "invalid chunk size line ''"),
            (b"-1\r\n", Framing::Chunked, io::ErrorKind::InvalidData, "invalid chunk size line"),
            (b"5 x\r\n", Framing::Chunked, io::ErrorKind::InvalidData, "invalid chunk size line"),
            (
                b"11111111111111111\r\n",
                Framing::Chunked,
                io::ErrorKind::InvalidData,
                "invalid chunk size line",
            ),
            (b"2\r\nhello\r\n", Framing::Chunked, io::ErrorKind::InvalidData, "longer than its size line"),
            (long_line.as_bytes(), Framing::Chunked, io::ErrorKind::InvalidData, "longer than 4096 bytes"),
            (long_trailer.as_bytes(), Framing::Chunked, io::ErrorKind::InvalidData, "trailer is larger"),
        ];
        for (input, framing, kind, text) in cases {
            let err = read(input, framing).0.expect_err("must fail");
            assert_eq!(err.kind(), kind, "{input:?}: {err}");
            assert!(err.to_string().contains(text), "{input:?}: {err} lacks {text:?}");
        }
    }

    #[test]
    fn read_all_bounds_the_body() {
        let mut body = Body::new(Cursor::new(b"0123456789".to_vec()), Framing::Length(10));
        assert!(body.read_all(9).unwrap_err().to_string().contains("larger than 9 bytes"));
        let mut body = Body::new(Cursor::new(b"0123456789".to_vec()), Framing::Close);
        assert!(body.read_all(9).unwrap_err().to_string().contains("larger than 9 bytes"));
        let mut body = Body::new(Cursor::new(b"5\r\nhello\r\n0\r\n\r\n".to_vec()), Framing::Chunked);
        assert_eq!(body.read_all(5).unwrap(), b"hello");
        assert_eq!(body.state, State::Done);
        let mut body = Body::new(Cursor::new(b"0123456789".to_vec()), Framing::Length(10));
        let all = body.read_all(10).unwrap();
        assert_eq!((all.len(), all.capacity()), (10, 10), "a known length is allocated exactly");
    }
}
