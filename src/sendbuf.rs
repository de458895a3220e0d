//! Unsent bytes of a non-blocking stream socket (a channel peer, the channel client, the status
//! link): appended at the back, written from the front as the socket takes them.
//!
//! Written bytes are skipped with an offset rather than removed on every partial write, which
//! would move the whole backlog each time (quadratic for a slow reader); the buffer is
//! compacted only once the written part is at least half of it, so every byte moves at most a
//! few times over its life.

use std::io::{self, Write};

/// A drained buffer that grew past this gives its memory back.
const KEEP_CAPACITY: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct SendBuf {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written.
    sent: usize,
}

impl SendBuf {
    /// The buffer to append to (encoders write into a `Vec<u8>`).
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes not yet written.
    pub fn len(&self) -> usize {
        self.buf.len() - self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything unsent (the connection is gone or starts afresh).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
    }

    /// Writes as much as `stream` takes now; the rest waits for the next writable event.
    pub fn write_to(&mut self, stream: &mut impl Write) -> io::Result<()> {
        let result = loop {
            if self.sent == self.buf.len() {
                break Ok(());
            }
            match stream.write(&self.buf[self.sent..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        if self.sent == self.buf.len() {
            self.clear();
        } else if self.sent >= self.buf.len() / 2 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `per_call` bytes per write.
    struct Slow {
        got: Vec<u8>,
        per_call: usize,
        calls_left: usize,
    }

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.calls_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls_left -= 1;
            let n = buf.len().min(self.per_call);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order_and_count() {
        let mut b = SendBuf::default();
        b.extend_from_slice(b"hello ");
        b.tail().extend_from_slice(b"world");
        let mut s = Slow { got: Vec::new(), per_call: 4, calls_left: 1 };
        b.write_to(&mut s).unwrap();
        assert_eq!(b.len(), 7);
        b.extend_from_slice(b"!");
        s.calls_left = 10;
        b.write_to(&mut s).unwrap();
        assert!(b.is_empty());
        assert_eq!(s.got, b"hello world!");
    }
}
