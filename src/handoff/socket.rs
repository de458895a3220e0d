//! The hand-off socket itself: a non-blocking `AF_UNIX` `SOCK_SEQPACKET` descriptor between
//! the old worker and its replacement. Every `sendmsg` is one record, with the descriptors of
//! its connections attached (`SCM_RIGHTS`); records keep their boundaries and order.
//!
//! A batch too big for one record is sent as `Part` records carrying the leading bytes of the
//! batch's body, then a `Batch` record carrying the rest and the descriptors; the receiver's
//! `Assembler` puts them back together (at most `MAX_BATCH_BYTES`).

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{
    sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

use super::record::{decode_record, encode_record, Bounds, HandOffError, Part, Record, BATCH_TAG, PART_TAG};

/// Most descriptors attached to one record (the kernel's own cap, SCM_MAX_FD, is 253).
pub const MAX_FDS_PER_RECORD: usize = 200;
/// Largest record, tag included.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
/// Largest batch after its Parts are put together: what a receiver is willing to buffer.
pub const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// Room for a Part record's tag and postcard length prefix (a varint of at most 5 bytes).
const PART_OVERHEAD: usize = 1 + 5;

/// What one `send` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The whole record is on its way (SEQPACKET sends all or nothing).
    Done,
    /// The socket's buffer is full: nothing was sent; try again when it is writable.
    WouldBlock,
}

/// One record as it came off the socket, with the descriptors attached to it.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One whole record put together by the `Assembler`, decoded and checked.
#[derive(Debug)]
pub struct Incoming {
    pub record: Record,
    /// One per connection of a `Batch`, in its order; empty for every other record.
    pub fds: Vec<OwnedFd>,
}

/// One end of the hand-off socket.
#[derive(Debug)]
pub struct HandOffSocket {
    fd: OwnedFd,
}

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Lets a record of `MAX_RECORD_BYTES` through: a unix datagram larger than the sender's
/// buffer fails with EMSGSIZE, and the default (wmem_default, ~208 KiB) is smaller. The
/// kernel doubles the value and caps it at wmem_max first, which leaves ~416 KiB by default.
fn size_send_buffer(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(&fd, sockopt::SndBuf, &MAX_RECORD_BYTES).map_err(errno)
}

impl HandOffSocket {
    /// Makes the connected pair the master hands out (close-on-exec; each side makes its end
    /// non-blocking with `new`).
    pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).map_err(errno)?;
        size_send_buffer(a.as_fd())?;
        size_send_buffer(b.as_fd())?;
        Ok((a, b))
    }

    /// Takes an end of the pair (inherited or received) and makes it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<HandOffSocket> {
        size_send_buffer(fd.as_fd())?;
        let socket = HandOffSocket { fd };
        socket.set_blocking(false)?;
        Ok(socket)
    }

    /// Switches blocking mode (for a side that wants to wait in `send`/`recv`).
    pub fn set_blocking(&self, blocking: bool) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = OFlag::from_bits_truncate(fcntl(self.fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(errno)?);
        let flags = if blocking { flags - OFlag::O_NONBLOCK } else { flags | OFlag::O_NONBLOCK };
        fcntl(self.fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(errno)?;
        Ok(())
    }

    /// Sends one record (`bytes`, at most `MAX_RECORD_BYTES`) with `fds` attached (at most
    /// `MAX_FDS_PER_RECORD`) in one `sendmsg`. The descriptors stay ours: the receiver gets
    /// copies, so the caller closes its own after the round commits.
    pub fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<Sent> {
        if bytes.is_empty() || bytes.len() > MAX_RECORD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("hand-off record of {} bytes (1..={MAX_RECORD_BYTES})", bytes.len()),
            ));
        }
        if fds.len() > MAX_FDS_PER_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("hand-off record with {} descriptors (at most {MAX_FDS_PER_RECORD})", fds.len()),
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(bytes)];
        loop {
            // MSG_NOSIGNAL: a vanished peer is an EPIPE error here, not a SIGPIPE.
            match sendmsg::<UnixAddr>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(_) => return Ok(Sent::Done),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(Sent::WouldBlock),
                Err(e) => return Err(errno(e)),
            }
        }
    }

    /// Receives one record and the descriptors attached to it; `Ok(None)` when there is none
    /// yet. The peer closing is `UnexpectedEof`; a record cut short, or descriptors lost
    /// (MSG_CTRUNC), is `InvalidData` — the descriptors that did arrive are closed.
    pub fn recv(&mut self) -> io::Result<Option<Received>> {
        self.recv_with_fd_room(MAX_FDS_PER_RECORD)
    }

    fn recv_with_fd_room(&mut self, max_fds: usize) -> io::Result<Option<Received>> {
        // One byte more than a record may have: a longer one is then seen as MSG_TRUNC.
        let mut buf = vec![0u8; MAX_RECORD_BYTES + 1];
        // The descriptors that arrived come back owned, so every error path below closes them.
        let (len, flags, fds) = loop {
            match crate::sys::recv_with_fds(self.fd.as_fd(), &mut buf, max_fds) {
                Ok(got) => break got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        };
        let flags = MsgFlags::from_bits_truncate(flags);
        check_flags(flags, fds.len())?;
        if len == 0 {
            // Every record has at least its tag byte: an empty read is the peer's close.
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "hand-off peer closed the socket"));
        }
        if len > MAX_RECORD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("hand-off record longer than {MAX_RECORD_BYTES} bytes"),
            ));
        }
        buf.truncate(len);
        Ok(Some(Received { bytes: buf, fds }))
    }

    /// Waits until a record (or the peer's close) can be read, at most until `deadline`;
    /// false when the deadline passed first.
    pub fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        self.wait(nix::poll::PollFlags::POLLIN, deadline)
    }

    /// Waits until a record can be sent, at most until `deadline`; false when it passed.
    pub fn wait_writable(&self, deadline: Instant) -> io::Result<bool> {
        self.wait(nix::poll::PollFlags::POLLOUT, deadline)
    }

    fn wait(&self, events: nix::poll::PollFlags, deadline: Instant) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollTimeout};
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up, so a wait never ends just short of the deadline and spins.
            let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
            let mut fds = [PollFd::new(self.fd.as_fd(), events)];
            match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
                // HUP/ERR count as ready: the next recv/send reports them.
                Ok(n) if n > 0 => return Ok(true),
                Ok(_) if Instant::now() >= deadline => return Ok(false),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
    }

    /// Sends `record` in state format `format`: a `Batch` whose encoding exceeds
    /// `MAX_RECORD_BYTES` goes as `Part`s then the final `Batch` record, which alone carries
    /// `fds`. Waits for room (poll) when the socket is full, until `deadline` (then TimedOut:
    /// the peer is not reading; the hand-off has failed).
    pub fn send_record(
        &mut self,
        record: &Record,
        format: u16,
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
    ) -> io::Result<()> {
        let pieces = split_record(&encode_record(record, format));
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter().enumerate() {
            let attached = if i == last { fds } else { &[] };
            while self.send(piece, attached)? == Sent::WouldBlock {
                if !self.wait_writable(deadline)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("hand-off peer read nothing until the deadline ({} record)", record.name()),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Turns an encoded record into the records to send: itself when it fits, else (a batch)
/// `Part`s carrying the leading bytes of its body, then a `Batch` record (tag + the rest).
pub fn split_record(encoded: &[u8]) -> Vec<Vec<u8>> {
    if encoded.len() <= MAX_RECORD_BYTES || encoded.first() != Some(&BATCH_TAG) {
        return vec![encoded.to_vec()];
    }
    let body = &encoded[1..];
    let chunk = MAX_RECORD_BYTES - PART_OVERHEAD;
    // The final record keeps the last (up to `chunk`) bytes so it is never empty.
    let tail_len = match body.len() % chunk {
        0 => chunk,
        n => n,
    };
    let (head, tail) = body.split_at(body.len() - tail_len);
    let mut pieces: Vec<Vec<u8>> =
        head.chunks(chunk).map(|c| encode_record(&Record::Part(Part { bytes: c.to_vec() }), 0)).collect();
    let mut last = Vec::with_capacity(1 + tail.len());
    last.push(BATCH_TAG);
    last.extend_from_slice(tail);
    pieces.push(last);
    pieces
}

fn check_flags(flags: MsgFlags, fds: usize) -> io::Result<()> {
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hand-off record lost descriptors (MSG_CTRUNC; {fds} arrived and are closed)"),
        ));
    }
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hand-off record longer than {MAX_RECORD_BYTES} bytes (MSG_TRUNC)"),
        ));
    }
    Ok(())
}

/// The receiving side's reassembly: concatenates `Part`s (bounded by `MAX_BATCH_BYTES`),
/// decodes each whole record in the agreed format, checks it against `Bounds` and that a
/// `Batch` came with exactly one descriptor per connection.
#[derive(Debug)]
pub struct Assembler {
    bounds: Bounds,
    /// The body bytes of the batch being put together (after its tag).
    parts: Vec<u8>,
}

impl Assembler {
    pub fn new(bounds: Bounds) -> Assembler {
        Assembler { bounds, parts: Vec::new() }
    }

    /// Whether Parts are waiting for their Batch record.
    pub fn in_progress(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Takes one received record; `Ok(None)` after a `Part`, the whole record after anything
    /// else. Any error leaves the assembler empty; the caller refuses and gives up the round.
    pub fn push(&mut self, received: Received, format: u16) -> Result<Option<Incoming>, HandOffError> {
        let result = self.push_inner(received, format);
        if result.is_err() {
            self.parts = Vec::new();
        }
        result
    }

    fn push_inner(&mut self, received: Received, format: u16) -> Result<Option<Incoming>, HandOffError> {
        let Received { bytes, fds } = received;
        match bytes.first() {
            Some(&PART_TAG) => {
                if !fds.is_empty() {
                    return Err(HandOffError::UnexpectedFds { record: "Part", fds: fds.len() });
                }
                let Record::Part(part) = decode_record(&bytes, format, &self.bounds)? else {
                    unreachable!("a record with the Part tag decodes as a Part")
                };
                let total = self.parts.len().saturating_add(part.bytes.len());
                if total > MAX_BATCH_BYTES {
                    return Err(HandOffError::BatchTooLarge { bytes: total, max: MAX_BATCH_BYTES });
                }
                self.parts.extend_from_slice(&part.bytes);
                Ok(None)
            }
            Some(&BATCH_TAG) if self.in_progress() => {
                let total = self.parts.len().saturating_add(bytes.len());
                if total > MAX_BATCH_BYTES {
                    return Err(HandOffError::BatchTooLarge { bytes: total, max: MAX_BATCH_BYTES });
                }
                let mut whole = std::mem::take(&mut self.parts);
                whole.insert(0, BATCH_TAG);
                whole.extend_from_slice(&bytes[1..]);
                finish(decode_record(&whole, format, &self.bounds)?, fds).map(Some)
            }
            _ => {
                let record = decode_record(&bytes, format, &self.bounds)?;
                if self.in_progress() {
                    return Err(HandOffError::PartsNotFollowedByBatch { record: record.name() });
                }
                finish(record, fds).map(Some)
            }
        }
    }
}

fn finish(record: Record, fds: Vec<OwnedFd>) -> Result<Incoming, HandOffError> {
    match &record {
        Record::Batch(batch) if batch.conns.len() != fds.len() => {
            Err(HandOffError::FdCount { conns: batch.conns.len(), fds: fds.len() })
        }
        Record::Batch(_) => Ok(Incoming { record, fds }),
        other if !fds.is_empty() => Err(HandOffError::UnexpectedFds { record: other.name(), fds: fds.len() }),
        _ => Ok(Incoming { record, fds }),
    }
}

impl AsFd for HandOffSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl mio::event::Source for HandOffSocket {
    fn register(&mut self, registry: &mio::Registry, token: mio::Token, interests: mio::Interest) -> io::Result<()> {
        mio::unix::SourceFd(&self.fd.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(&mut self, registry: &mio::Registry, token: mio::Token, interests: mio::Interest) -> io::Result<()> {
        mio::unix::SourceFd(&self.fd.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        mio::unix::SourceFd(&self.fd.as_raw_fd()).deregister(registry)
    }
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod tests;
