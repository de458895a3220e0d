//! The TLS side of one client connection in a worker: a rustls `ServerConnection` over the
//! non-blocking socket, read and written with the same calls as a plain socket
//! (`worker::transport::Transport` picks one or the other).
//!
//! Reads drain rustls's plaintext first, then pull records from the socket until plaintext
//! appears or the socket says `WouldBlock` (edge-triggered readiness: we must get there).
//! Handshake records are written as soon as rustls produces them, before any application data.
//! Writes hand plaintext to rustls only once its previous records have left, so rustls holds
//! at most one batch of encrypted records (`SEND_LIMIT`) beyond the kernel: everything else
//! waits in the connection's out-queue, where `limits.send_buffer_limit` and the slow-client
//! policy see it, exactly as for a plain connection.
//!
//! Memory of an idle connection (rustls 0.23): the `ServerConnection` itself (state machine,
//! record layer with both directions' AEAD keys), its 4 KiB receive buffer (rustls keeps one
//! read's worth even when idle), and empty queues. See docs/tls.md for the measured figure.

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

/// Bound of rustls's own send buffers (encrypted records not yet taken by the kernel, and
/// plaintext written before the handshake ends), in bytes. A batch of writev slices becomes
/// records of up to 16 KiB each; this is room for two such records.
pub const SEND_LIMIT: usize = 32 * 1024;

pub struct TlsConn {
    tcp: TcpStream,
    tls: ServerConnection,
    /// The TLS handshake ended with an error (a bad ClientHello, an alert, not TLS at all):
    /// the worker counts it in `tls_handshake_failures` when it drops the connection.
    handshake_failed: bool,
}

impl TlsConn {
    pub fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<TlsConn, rustls::Error> {
        let mut tls = ServerConnection::new(config)?;
        tls.set_buffer_limit(Some(SEND_LIMIT));
        Ok(TlsConn { tcp, tls, handshake_failed: false })
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
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => return Ok(0),
                Ok(_) => {}
                Err(e) => {
                    // rustls refuses a record too large to buffer (e.g. a huge handshake message).
                    self.handshake_failed |= e.kind() == io::ErrorKind::InvalidData && self.tls.is_handshaking();
                    return Err(e);
                }
            }
            if let Err(e) = self.tls.process_new_packets() {
                self.handshake_failed |= self.tls.is_handshaking();
                let _ = self.write_records();
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
            // Handshake replies go out now; if the socket is full, the writable event flushes them.
            self.write_records()?;
        }
    }

    /// Encrypts what rustls takes of `bufs` (records of up to 16 KiB, several slices per
    /// record) and writes the records; `WouldBlock` while earlier records still wait.
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.write_records()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.tls.writer().write_vectored(bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // Blocked here is fine: the bytes are ours (rustls's) now, the next call or
        // `write_records` from the writable event sends them.
        self.write_records()?;
        Ok(n)
    }

    /// Writes the records rustls holds; `Ok(true)` once none is left.
    pub fn write_records(&mut self) -> io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Ends our direction: close_notify, then the TCP half-close (both best effort).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.tls.send_close_notify();
        let _ = self.write_records();
        self.tcp.shutdown(std::net::Shutdown::Write)
    }
}
