//! The TLS side of one client connection in a worker: rustls's unbuffered server connection
//! over the non-blocking socket, read and written with the same calls as a plain socket
//! (`worker::transport::Transport` picks one or the other).
//!
//! Unbuffered, because then the buffers are ours and an idle connection holds none: received
//! TLS bytes are read into a buffer borrowed from the worker (`POOL_IN`) and given back once
//! every whole record in it is processed; a connection keeps a buffer of its own only while
//! it holds part of a record. Records to send are encoded into a borrowed buffer too
//! (`POOL_OUT`), kept only while the socket does not take them all.
//!
//! Reads process records until plaintext appears or the socket says `WouldBlock`
//! (edge-triggered readiness: we must get there). Handshake records are written as soon as
//! rustls produces them, before any application data. Writes encrypt the out-queue's slices
//! (gathered into records of up to 16 KiB) only once the previous records have left, so at
//! most one batch sits encrypted here: everything else waits in the connection's out-queue,
//! where `limits.send_buffer_limit` and the slow-client policy see it, exactly as for `ws://`.
//!
//! An idle connection holds the boxed `UnbufferedServerConnection` (state machine, record
//! layer with both directions' AEAD keys) and nothing else; see docs/tls.md for figures.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::thread::LocalKey;

use mio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, WriteTraffic};
use rustls::ServerConfig;

/// Largest batch of plaintext encrypted per write: one full TLS record.
pub const MAX_BATCH: usize = 16 * 1024;
/// Room made in the receive buffer before each socket read.
const READ_ROOM: usize = 16 * 1024 + 512;
/// Most received bytes held while rustls waits for the rest of a record or handshake
/// message (a ClientHello may span records, up to 64 KiB).
const MAX_INCOMING: usize = 80 * 1024;

thread_local! {
    /// Receive buffer lent to whichever connection is being read (workers are one thread).
    static POOL_IN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Send buffer lent to whichever connection is encrypting.
    static POOL_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Gathers small writev slices into one record.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Takes the pool's buffer (or a new, empty one).
fn borrow(pool: &'static LocalKey<RefCell<Vec<u8>>>) -> Vec<u8> {
    pool.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// Returns an emptied buffer to the pool, unless it holds one already.
fn give_back(pool: &'static LocalKey<RefCell<Vec<u8>>>, mut buf: Vec<u8>) {
    buf.clear();
    pool.with(|p| {
        let mut p = p.borrow_mut();
        if p.capacity() < buf.capacity() {
            *p = buf;
        }
    });
}

/// What processing the received records led to.
enum Processed {
    /// This many plaintext bytes are in the caller's buffer.
    Data(usize),
    /// Every whole record is processed: more bytes are needed.
    NeedBytes,
    /// The peer sent close_notify.
    Closed,
}

pub struct TlsConn {
    tcp: TcpStream,
    tls: UnbufferedServerConnection,
    /// Received TLS bytes not processed yet: `incoming[start..end]`. Unallocated unless a
    /// record is partly here (or a read is under way).
    incoming: Vec<u8>,
    start: usize,
    end: usize,
    /// Encoded records not yet written: `outgoing[sent..]`. Unallocated once written.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted bytes that did not fit the caller's buffer (rare: records are at most
    /// 16 KiB, the worker reads 64 KiB at a time), or arrived while encrypting.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// The peer sent close_notify: reads end once `plaintext` is drained.
    peer_closed: bool,
    /// The TLS handshake ended with an error (a bad ClientHello, an alert, not TLS at all):
    /// the worker counts it in `tls_handshake_failures` when it drops the connection.
    handshake_failed: bool,
}

impl TlsConn {
    pub fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            tcp,
            tls: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            start: 0,
            end: 0,
            outgoing: Vec::new(),
            sent: 0,
            plaintext: Vec::new(),
            plain_at: 0,
            peer_closed: false,
            handshake_failed: false,
        })
    }

    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    pub fn handshake_failed(&self) -> bool {
        self.handshake_failed
    }

    /// Plaintext into `buf`: `Ok(0)` when the peer closed (TCP EOF or close_notify),
    /// `WouldBlock` once the socket is drained, `InvalidData` for a TLS error (its alert is
    /// sent, best effort).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.plain_at < self.plaintext.len() {
            return Ok(self.take_plaintext(buf));
        }
        loop {
            match self.process(buf) {
                Ok(Processed::Data(n)) => {
                    self.release_incoming();
                    // Records rustls made on the way (session tickets, a key update) go too.
                    self.write_records()?;
                    return Ok(n);
                }
                Ok(Processed::Closed) => return Ok(0),
                Ok(Processed::NeedBytes) if self.peer_closed => return Ok(0),
                Ok(Processed::NeedBytes) => {}
                Err(e) => {
                    self.release_incoming();
                    return Err(e);
                }
            }
            // Handshake replies go out now; if the socket is full, the writable event flushes them.
            self.write_records()?;
            self.make_room()?;
            let result = self.tcp.read(&mut self.incoming[self.end..]);
            match result {
                Ok(0) => {
                    self.release_incoming();
                    return Ok(0);
                }
                Ok(n) => self.end += n,
                Err(e) => {
                    self.release_incoming();
                    return Err(e);
                }
            }
        }
    }

    /// Encrypts what it can of `bufs` (up to `MAX_BATCH` bytes, as one record when they are
    /// small) and writes the records; `WouldBlock` while earlier records still wait.
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.write_records()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        if first.is_empty() {
            return Ok(0);
        }
        let written = if first.len() >= MAX_BATCH || bufs.len() == 1 {
            let plain = &first[..first.len().min(MAX_BATCH)];
            self.encrypt(plain)?;
            plain.len()
        } else {
            let mut gather = borrow(&GATHER);
            for b in bufs {
                let take = b.len().min(MAX_BATCH - gather.len());
                gather.extend_from_slice(&b[..take]);
                if gather.len() == MAX_BATCH {
                    break;
                }
            }
            let result = self.encrypt(&gather);
            let n = gather.len();
            give_back(&GATHER, gather);
            result?;
            n
        };
        // Blocked here is fine: the records are ours now; the next call or `write_records`
        // from the writable event sends them.
        self.write_records()?;
        Ok(written)
    }

    /// Writes the records held; `Ok(true)` once none is left.
    pub fn write_records(&mut self) -> io::Result<bool> {
        while self.sent < self.outgoing.len() {
            match self.tcp.write(&self.outgoing[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.outgoing.capacity() > 0 {
            self.sent = 0;
            give_back(&POOL_OUT, std::mem::take(&mut self.outgoing));
        }
        Ok(true)
    }

    /// Ends our direction: close_notify, then the TCP half-close (both best effort).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        let _ = self.with_write_traffic(|traffic, out| {
            encode_with(out, 64, |room| traffic.queue_close_notify(room))
                .map(|_| ())
                .map_err(|e| io::Error::other(e.to_string()))
        });
        let _ = self.write_records();
        self.tcp.shutdown(std::net::Shutdown::Write)
    }

    // ---- internals -----------------------------------------------------------------------

    fn take_plaintext(&mut self, buf: &mut [u8]) -> usize {
        let n = (self.plaintext.len() - self.plain_at).min(buf.len());
        buf[..n].copy_from_slice(&self.plaintext[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        if self.plain_at == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_at = 0;
        }
        n
    }

    /// Runs rustls over the received bytes until it needs more, has plaintext for `buf`, or
    /// fails. Handshake records it produces are appended to `outgoing`.
    fn process(&mut self, buf: &mut [u8]) -> io::Result<Processed> {
        let mut n = 0;
        loop {
            let status = self.tls.process_tls_records(&mut self.incoming[self.start..self.end]);
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    self.start += discard;
                    return Err(self.fail(e));
                }
            };
            let mut need_bytes = false;
            let mut closed = false;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        let take = record.payload.len().min(buf.len() - n);
                        buf[n..n + take].copy_from_slice(&record.payload[..take]);
                        n += take;
                        self.plaintext.extend_from_slice(&record.payload[take..]);
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    let out = outgoing_buf(&mut self.outgoing);
                    encode_with(out, 1024, |room| data.encode(room)).map_err(encode_error)?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed | ConnectionState::Closed => closed = true,
                // BlockedHandshake, WriteTraffic: every whole record is processed. Early
                // data is not enabled, so no ReadEarlyData.
                _ => need_bytes = true,
            }
            self.start += discard;
            if closed {
                self.peer_closed = true;
                return Ok(if n > 0 { Processed::Data(n) } else { Processed::Closed });
            }
            if n > 0 && (n == buf.len() || need_bytes || !self.plaintext.is_empty()) {
                return Ok(Processed::Data(n));
            }
            if need_bytes {
                return Ok(if n > 0 { Processed::Data(n) } else { Processed::NeedBytes });
            }
        }
    }

    /// Notes a TLS error, queues its alert (best effort) and makes it an I/O error.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.handshake_failed |= self.tls.is_handshaking();
        // The alert rustls queued comes out of the next round as a record to encode. The same
        // bytes go in again: rustls keeps offsets into them (a handshake message in parts).
        let status = self.tls.process_tls_records(&mut self.incoming[self.start..self.end]);
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state {
            let out = outgoing_buf(&mut self.outgoing);
            let _ = encode_with(out, 1024, |room| data.encode(room));
        }
        let _ = self.write_records();
        io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
    }

    /// Gets rustls to the state where application data may be encrypted and runs `f` there
    /// with the send buffer. Records met on the way (handshake, post-handshake messages) are
    /// encoded first; plaintext met on the way is kept for the next read. `WouldBlock` while
    /// the handshake is not done.
    fn with_write_traffic<R>(
        &mut self,
        f: impl FnOnce(&mut WriteTraffic<'_, rustls::server::ServerConnectionData>, &mut Vec<u8>) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut f = Some(f);
        loop {
            let status = self.tls.process_tls_records(&mut self.incoming[self.start..self.end]);
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    self.start += discard;
                    return Err(self.fail(e));
                }
            };
            let mut result = None;
            match state {
                ConnectionState::WriteTraffic(mut traffic) => {
                    let out = outgoing_buf(&mut self.outgoing);
                    let f = f.take().expect("WriteTraffic ends the loop");
                    result = Some(f(&mut traffic, out));
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    // Only when reading stopped early (budget, backpressure): kept in order.
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    let out = outgoing_buf(&mut self.outgoing);
                    encode_with(out, 1024, |room| data.encode(room)).map_err(encode_error)?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::Closed => result = Some(Err(io::ErrorKind::BrokenPipe.into())),
                _ => result = Some(Err(io::ErrorKind::WouldBlock.into())),
            }
            self.start += discard;
            if let Some(result) = result {
                return result;
            }
        }
    }

    fn encrypt(&mut self, plain: &[u8]) -> io::Result<()> {
        self.with_write_traffic(|traffic, out| {
            // Room for the records' headers and tags (at most 29 bytes each), so one call does.
            let room = plain.len() + 32 * (plain.len() / MAX_BATCH + 1);
            encode_with(out, room, |room| traffic.encrypt(plain, room)).map(|_| ()).map_err(|e| match e {
                EncryptError::EncryptExhausted => io::Error::other("TLS: encrypter exhausted"),
                e => io::Error::other(e.to_string()),
            })
        })
    }

    /// Before a socket read: a receive buffer with `READ_ROOM` free after `end`, whole records
    /// already processed dropped from its front.
    fn make_room(&mut self) -> io::Result<()> {
        if self.incoming.capacity() == 0 {
            self.incoming = borrow(&POOL_IN);
        }
        if self.start > 0 {
            self.incoming.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end >= MAX_INCOMING {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS: record or handshake message too large"));
        }
        if self.incoming.len() < self.end + READ_ROOM {
            self.incoming.resize(self.end + READ_ROOM, 0);
        }
        Ok(())
    }

    /// After the records in it are processed: back to the pool if nothing partial is left.
    fn release_incoming(&mut self) {
        if self.start == self.end && self.incoming.capacity() > 0 {
            self.start = 0;
            self.end = 0;
            give_back(&POOL_IN, std::mem::take(&mut self.incoming));
        }
    }
}

/// The send buffer, borrowed from the pool when there is none.
fn outgoing_buf(outgoing: &mut Vec<u8>) -> &mut Vec<u8> {
    if outgoing.capacity() == 0 {
        *outgoing = borrow(&POOL_OUT);
    }
    outgoing
}

/// Runs an encoder that writes into `room` bytes made at the end of `out`, growing that to the
/// size the encoder asks for when it does not fit.
fn encode_with<E: Into<SizeOr<E>>>(
    out: &mut Vec<u8>,
    room: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<usize, E> {
    let len = out.len();
    out.resize(len + room, 0);
    loop {
        match encode(&mut out[len..]) {
            Ok(written) => {
                out.truncate(len + written);
                return Ok(written);
            }
            Err(e) => match e.into() {
                SizeOr::Size(required) => out.resize(len + required, 0),
                SizeOr::Other(e) => {
                    out.truncate(len);
                    return Err(e);
                }
            },
        }
    }
}

/// An encoder's error: "give me this much room", or anything else.
enum SizeOr<E> {
    Size(usize),
    Other(E),
}

impl From<EncodeError> for SizeOr<EncodeError> {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(s) => SizeOr::Size(s.required_size),
            e => SizeOr::Other(e),
        }
    }
}

impl From<EncryptError> for SizeOr<EncryptError> {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(s) => SizeOr::Size(s.required_size),
            e => SizeOr::Other(e),
        }
    }
}

fn encode_error(e: EncodeError) -> io::Error {
    io::Error::other(format!("TLS: {e}"))
}
