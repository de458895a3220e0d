//! One HTTP connection of the API: its socket, what it sent that is not handled yet, what is
//! queued for it, and where it is in its request cycle, each phase with its own deadline
//! (`[api]` timeouts), so a silent or slow client costs a slot, never time.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::http::Response;
use crate::sendbuf::SendBuf;

/// Time a client has to take an answer that closes its connection.
pub const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes queued for a client before its next requests wait: a pipelining client that does
/// not read its answers must not grow our memory.
pub const MAX_QUEUED_ANSWERS: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Between requests (keep-alive): `keepalive_timeout_ms`.
    Idle,
    /// A request has begun: `request_timeout_ms` until it is whole.
    Reading,
    /// The request is with the bus or the master; their own timeouts answer it.
    Waiting,
    /// The last answer is queued; the connection ends once it is written.
    Closing,
}

pub struct HttpConn {
    pub stream: TcpStream,
    /// Tells this connection apart from a later one in the same slab slot, so a late answer
    /// never reaches the wrong client.
    pub serial: u64,
    pub inbuf: Vec<u8>,
    pub out: SendBuf,
    pub phase: Phase,
    pub deadline: Instant,
    /// The peer shut its side: after what it sent is answered, the connection ends.
    pub peer_done: bool,
    /// The poller saw the peer's FIN (`is_read_closed`): read on to the end of the stream even
    /// after a short read, as no later edge will tell of it.
    pub read_closed: bool,
    /// The request being answered wants the connection kept open.
    pub keep_alive: bool,
    /// A `100 Continue` went out for the request being read.
    pub continued: bool,
    /// Answers queued so far: a connection with none is a new one whose request may be on
    /// its way, not an idle keep-alive one.
    pub answered: u64,
}

impl HttpConn {
    pub fn new(stream: TcpStream, serial: u64, keepalive: Duration) -> HttpConn {
        HttpConn {
            stream,
            serial,
            inbuf: Vec::new(),
            out: SendBuf::default(),
            phase: Phase::Idle,
            deadline: Instant::now() + keepalive,
            peer_done: false,
            read_closed: false,
            keep_alive: true,
            continued: false,
            answered: 0,
        }
    }

    /// Reads what the socket has, up to `cap` bytes buffered (the rest stays in the kernel
    /// until the buffered requests are handled), through `scratch`. An error: drop the
    /// connection.
    pub fn read(&mut self, cap: usize, scratch: &mut [u8]) -> io::Result<()> {
        while self.inbuf.len() < cap {
            let room = (cap - self.inbuf.len()).min(scratch.len());
            match self.stream.read(&mut scratch[..room]) {
                Ok(0) => {
                    self.peer_done = true;
                    break;
                }
                // A short read drained the socket: bytes arriving later raise a new edge.
                Ok(n) if n < room && !self.read_closed => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    break;
                }
                Ok(n) => self.inbuf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues an answer. After one that closes, nothing more is read or answered.
    pub fn answer(&mut self, response: &Response) {
        // A peer that shut its side still gets an answer to every whole request it sent.
        let keep_alive = self.keep_alive && !response.close && !(self.peer_done && self.inbuf.is_empty());
        response.encode(keep_alive, self.out.tail());
        self.answered += 1;
        if !keep_alive {
            self.phase = Phase::Closing;
            self.deadline = Instant::now() + CLOSE_WRITE_TIMEOUT;
        }
    }

    /// Writes what is queued. `Ok(true)`: the connection is finished (closing and written).
    pub fn flush(&mut self) -> io::Result<bool> {
        self.out.write_to(&mut self.stream)?;
        Ok(self.phase == Phase::Closing && self.out.is_empty())
    }

    /// Back to waiting for the next request.
    pub fn idle(&mut self, keepalive: Duration) {
        self.phase = Phase::Idle;
        self.continued = false;
        self.deadline = Instant::now() + keepalive;
    }

    /// The first bytes of a request are here.
    pub fn reading(&mut self, request_timeout: Duration) {
        if self.phase == Phase::Idle {
            self.phase = Phase::Reading;
            self.deadline = Instant::now() + request_timeout;
        }
    }
}
