//! Both ends of the status link, a Unix socket pair made at spawn: `ChildLink` is the child's
//! end, driven by the child's own event loop (non-blocking, registered with mio);
//! `MasterLink` is the master's end, read with a deadline while the master gathers figures.
//! Every line is a `Request` (master to child) or a `Reply` (child to master) in JSON. A
//! request may carry a descriptor (SCM_RIGHTS, in the same sendmsg as its line): the hand-off
//! socket of `Request::HandOff`.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Instant;

use log::warn;
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};

use super::handoff::CHILD_LINK_FD;
use super::messages::{decode_line, encode_line, Reply, Request};
use crate::sendbuf::SendBuf;

/// Longest request line a child keeps; a longer one is not from the master and is dropped.
const MAX_REQUEST_LINE: usize = 4096;
/// Received descriptors kept for `take_fd`; older ones are closed beyond this (the master
/// sends one per `HandOff`, and the worker takes it at once).
const MAX_KEPT_FDS: usize = 4;

/// The child's end of the status link.
pub struct ChildLink {
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: SendBuf,
    /// Descriptors that came with requests, oldest first.
    fds: std::collections::VecDeque<OwnedFd>,
}

impl ChildLink {
    /// Adopts descriptor 4 and registers it; queues the `Ready` reply.
    pub fn inherit(registry: &Registry, token: Token) -> io::Result<ChildLink> {
        let fd = crate::sys::adopt_inherited_fd(CHILD_LINK_FD)?;
        ChildLink::new(StdUnixStream::from(fd), registry, token)
    }

    /// The child's end of a link made by the master (`inherit`), or by a test.
    fn new(std_stream: StdUnixStream, registry: &Registry, token: Token) -> io::Result<ChildLink> {
        std_stream.set_nonblocking(true)?;
        let mut stream = UnixStream::from_std(std_stream);
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut link = ChildLink { stream, inbuf: Vec::new(), outbuf: SendBuf::default(), fds: Default::default() };
        link.send_json(Reply::Ready)?;
        Ok(link)
    }

    /// Reads what the master sent, keeping descriptors that came with it (`take_fd`).
    /// `Ok(None)` at end of stream: the master is gone.
    pub fn read_requests(&mut self) -> io::Result<Option<Vec<Request>>> {
        let mut buf = [0u8; 512];
        loop {
            match self.receive(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let mut requests = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.inbuf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.inbuf[start..start + nl];
            match decode_line::<Request>(line) {
                Ok(request) => requests.push(request),
                Err(e) => warn!("ignoring a malformed request from the master: {e}"),
            }
            start += nl + 1;
        }
        self.inbuf.drain(..start);
        if self.inbuf.len() > MAX_REQUEST_LINE {
            self.inbuf.clear();
        }
        Ok(Some(requests))
    }

    /// One recvmsg: bytes into `buf`, descriptors onto `self.fds` (close-on-exec).
    fn receive(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut iov = [IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let n = msg.bytes;
        match msg.cmsgs() {
            Ok(cmsgs) => {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        self.fds.extend(crate::sys::own_received_fds(fds));
                    }
                }
            }
            // More descriptors than the master ever sends with one line: not from the master.
            Err(_) => warn!("descriptors from the master were cut off (MSG_CTRUNC)"),
        }
        while self.fds.len() > MAX_KEPT_FDS {
            self.fds.pop_front();
        }
        Ok(n)
    }

    /// The descriptor that came with the last request carrying one (`Request::HandOff`'s
    /// socket), if it was not taken yet.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        let newest = self.fds.pop_back();
        self.fds.clear();
        newest
    }

    /// Sends one reply (a `&ProcessStats` or a `&ConnectionList` converts into one).
    pub fn send_json<'a>(&mut self, reply: impl Into<Reply<'a>>) -> io::Result<()> {
        encode_line(&reply.into(), self.outbuf.tail()).map_err(io::Error::other)?;
        self.flush()
    }

    /// Writes what is queued; the rest waits for the next writable event.
    pub fn flush(&mut self) -> io::Result<()> {
        self.outbuf.write_to(&mut self.stream)
    }
}

/// How a `Reply::HandOff` line starts (serde's external enum tag).
const HANDOFF_REPLY_START: &[u8] = br#"{"hand_off""#;

/// The master's end of one child's status link.
pub struct MasterLink {
    stream: Option<StdUnixStream>,
    /// Bytes read that do not form a whole line yet.
    linebuf: Vec<u8>,
}

impl MasterLink {
    pub fn new(stream: StdUnixStream) -> MasterLink {
        MasterLink { stream: Some(stream), linebuf: Vec::new() }
    }

    /// Sends one request; false if the link is gone.
    pub fn send(&mut self, request: &Request) -> bool {
        let Some(stream) = self.stream.as_mut() else { return false };
        let mut line = Vec::new();
        if encode_line(request, &mut line).is_err()
            || stream.set_nonblocking(false).is_err()
            || stream.write_all(&line).is_err()
        {
            self.stream = None;
            return false;
        }
        true
    }

    /// Sends one request with `fd` attached (SCM_RIGHTS) to the same sendmsg as its line, so
    /// the child finds the descriptor when it reads the request; false if the link is gone.
    pub fn send_with_fd(&mut self, request: &Request, fd: BorrowedFd<'_>) -> bool {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let Some(stream) = self.stream.as_mut() else { return false };
        let mut line = Vec::new();
        if encode_line(request, &mut line).is_err() || stream.set_nonblocking(false).is_err() {
            self.stream = None;
            return false;
        }
        let fds = [fd.as_raw_fd()];
        let sent = loop {
            match sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&line)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        };
        // A short write leaves the rest of the line (the descriptor went with its first byte).
        let ok = match sent {
            Ok(n) => stream.write_all(&line[n..]).is_ok(),
            Err(_) => false,
        };
        if !ok {
            self.stream = None;
        }
        ok
    }

    /// Reads and discards whatever is already waiting (late answers to earlier requests that
    /// timed out, so they are not taken for the next one's); returns the replies that are not
    /// answers and must not be lost (`Ready`, `HandOff`).
    pub fn discard_pending(&mut self) -> Vec<Reply<'static>> {
        let mut kept = Vec::new();
        while let Ok(Some(reply)) = self.read_reply(None) {
            if matches!(reply, Reply::Ready | Reply::HandOff(_)) {
                kept.push(reply);
            }
        }
        // The start of a late answer is dropped (its rest then fails to parse and is skipped,
        // never taken for the next answer), except the start of a hand-off report, which is
        // no answer and must not be lost.
        let tag = HANDOFF_REPLY_START;
        if !(self.linebuf.starts_with(tag) || tag.starts_with(&self.linebuf)) {
            self.linebuf.clear();
        }
        kept
    }

    /// Reads one reply: blocking until `deadline`, or without blocking when `None`.
    /// `Ok(None)`: nothing (more) in time. A line that does not parse is skipped with a warning.
    pub fn read_reply(&mut self, deadline: Option<Instant>) -> io::Result<Option<Reply<'static>>> {
        loop {
            if let Some(nl) = self.linebuf.iter().position(|&b| b == b'\n') {
                let parsed = decode_line::<Reply<'static>>(&self.linebuf[..nl]);
                self.linebuf.drain(..=nl);
                match parsed {
                    Ok(reply) => return Ok(Some(reply)),
                    Err(e) => {
                        warn!("ignoring a malformed reply on a status link: {e}");
                        continue;
                    }
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                return Err(io::Error::new(io::ErrorKind::NotConnected, "no link to the process"));
            };
            match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(left))?;
                }
                None => stream.set_nonblocking(true)?,
            }
            let mut buf = [0u8; 16 * 1024];
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.stream = None;
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the process closed its link"));
                }
                Ok(n) => self.linebuf.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A request sent with a descriptor arrives with it: the child reads the line and takes
    /// the descriptor, a working socket; a `HandOff` report read while discarding late answers
    /// is kept.
    #[test]
    fn a_descriptor_travels_with_its_request() {
        let poll = mio::Poll::new().unwrap();
        let (master_end, child_end) = StdUnixStream::pair().unwrap();
        let mut master = MasterLink::new(master_end);
        let mut child = ChildLink::new(child_end, poll.registry(), Token(0)).unwrap();
        let (mut here, there) = StdUnixStream::pair().unwrap();
        let request = Request::HandOff { generation: 2, timeout_ms: 500 };
        assert!(master.send_with_fd(&request, std::os::fd::AsFd::as_fd(&there)));
        drop(there);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            got = child.read_requests().unwrap().expect("link open");
        }
        assert_eq!(got, vec![request]);
        let fd = child.take_fd().expect("the descriptor came with the request");
        assert!(child.take_fd().is_none(), "taken once");
        let mut passed = StdUnixStream::from(fd);
        passed.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        here.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");

        // Ready (sent at start, by `new`), then a hand-off report: neither is discarded.
        let report = crate::control::report::HandOffReport { index: 1, ..Default::default() };
        child.send_json(Reply::HandOff(report.clone())).unwrap();
        let mut kept = Vec::new();
        while kept.len() < 2 && Instant::now() < deadline {
            kept.extend(master.discard_pending());
        }
        assert!(matches!(kept.as_slice(), [Reply::Ready, Reply::HandOff(r)] if *r == report), "{kept:?}");
    }
}
