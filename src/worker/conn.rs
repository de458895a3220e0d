//! One client connection's state: where it is in its life (`ConnState`), the bytes of a frame
//! still arriving, the frames waiting to be written, and the groups it belongs to.
//! Buffers exist only while in use, so an idle connection costs little more than this struct.

use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::groups::GroupId;
use super::outqueue::{Chunk, OutQueue};
use crate::ws::frame;

/// How a connection that is closing ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFlush {
    /// Drop the socket once everything queued is written (HTTP replies, answered close frames).
    Drop,
    /// We sent a close frame: half-close, then wait for the peer's close frame, EOF or the deadline.
    AwaitPeer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Waiting for (the rest of) the HTTP upgrade request.
    Handshaking,
    Open,
    /// No more commands are processed; see `AfterFlush`.
    Closing(AfterFlush),
}

impl ConnState {
    /// Whether the connection takes group messages.
    pub fn is_open(self) -> bool {
        matches!(self, ConnState::Open)
    }
}

/// A message arriving in several frames.
pub struct Fragment {
    pub text: bool,
    pub data: Vec<u8>,
}

pub struct Conn {
    pub stream: TcpStream,
    /// Unique for the worker's lifetime, unlike the slab key, which is reused: timers and
    /// logs name connections by it.
    pub id: u64,
    pub peer: SocketAddr,
    pub opened: Instant,
    pub state: ConnState,
    /// Received bytes of an incomplete handshake or frame; empty (unallocated) otherwise.
    pub inbuf: Vec<u8>,
    pub fragment: Option<Box<Fragment>>,
    pub out: OutQueue,
    /// Groups this connection joined, for leaving them all on close.
    pub groups: Vec<GroupId>,
    /// Already in the worker's list of connections to flush this turn.
    pub dirty: bool,
    pub bytes_in: u64,
    /// Commands received.
    pub messages_in: u64,
    /// Frames queued: deliveries and replies.
    pub messages_out: u64,
}

impl Conn {
    pub fn new(stream: TcpStream, id: u64, peer: SocketAddr) -> Conn {
        Conn {
            stream,
            id,
            peer,
            opened: Instant::now(),
            state: ConnState::Handshaking,
            inbuf: Vec::new(),
            fragment: None,
            out: OutQueue::default(),
            groups: Vec::new(),
            dirty: false,
            bytes_in: 0,
            messages_in: 0,
            messages_out: 0,
        }
    }

    /// Queues a text frame built for this connection alone.
    pub fn send_text(&mut self, payload: &[u8]) {
        self.out.push(Chunk::Owned(frame::text(payload).into_boxed_slice()));
    }

    pub fn send_raw(&mut self, bytes: Vec<u8>) {
        self.out.push(Chunk::Owned(bytes.into_boxed_slice()));
    }

    /// Starts a server-initiated close: queue the close frame, stop processing commands.
    /// Returns false if the connection was already closing.
    pub fn start_close(&mut self, code: u16, reason: &str) -> bool {
        match self.state {
            ConnState::Closing(_) => false,
            ConnState::Handshaking => {
                self.state = ConnState::Closing(AfterFlush::Drop);
                true
            }
            ConnState::Open => {
                self.send_raw(frame::close(code, reason));
                self.state = ConnState::Closing(AfterFlush::AwaitPeer);
                true
            }
        }
    }
}
